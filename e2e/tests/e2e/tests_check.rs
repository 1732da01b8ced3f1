//! A `tests` check through the operator: the outputs' code runs in Kubernetes Jobs in the
//! job's namespace (the bed's kubelet runs their pods with this host's python3), the
//! verdicts come back from the pods' termination messages, and the batches' objects go.

use anyhow::{Context, ensure};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use kubeswarm::api::SwarmJob;
use serde_json::Value;

use crate::bed::{Bed, has_condition, json_condition, until};
use crate::swarm::{JOB_TIMEOUT, finished, pool_spec, swarm_job, tenant};

/// A job whose outputs go through `source` as a `tests` check. The 135M test model writes
/// no code worth testing, so the prelude opens a string that the tests close: the output
/// is data, and what the tests do alone decides the verdict.
fn job(bed: &Bed, name: &str, subagents: u32, source: &str) -> String {
    swarm_job(
        name,
        &format!(
            r#"  task: Write the word hello.
  fanOut: {{pool: worker, subagents: {subagents}, maxTokens: 12, temperature: 0, timeoutSeconds: 300}}
  verification:
    mode: none
    truncated: accept
    checks:
    - type: tests
      tests:
        prelude: "output = r'''"
        source: "'''\n{source}"
        timeoutSeconds: 5
  aggregation: {{strategy: collect}}
  pools:
  - {{name: worker, spec: {worker}}}
  budget: {{deadlineSeconds: 900}}
"#,
            worker = pool_spec(bed, 1, 1, ""),
        ),
    )
}

pub async fn outputs_are_tested_in_job_pods(bed: &Bed) -> anyhow::Result<()> {
    let ns = bed.namespace("e2e-tests").await?;
    tenant(bed, &ns, "e2e-tests", 8, 4, "").await?;
    bed.apply(
        Some(&ns),
        &job(bed, "passing", 2, "assert isinstance(output, str)"),
    )
    .await?;
    bed.apply(
        Some(&ns),
        &job(
            bed,
            "failing",
            1,
            "raise SystemExit('kubeswarm-e2e: failed on purpose')",
        ),
    )
    .await?;
    let jobs: Api<SwarmJob> = Api::namespaced(bed.client.clone(), &ns);
    let wait = |name: &'static str| {
        let jobs = jobs.clone();
        async move {
            let job = until(
                &jobs,
                name,
                JOB_TIMEOUT,
                "finished",
                json_condition(finished),
            )
            .await?;
            anyhow::Ok(serde_json::to_value(job)?)
        }
    };
    let (passing, failing) = tokio::try_join!(wait("passing"), wait("failing"))?;

    ensure!(
        has_condition(&passing, "Complete", "True"),
        "the passing job did not complete: {:#}",
        passing["status"]["conditions"]
    );
    let records = result(bed, &ns, "passing").await?;
    for i in 0..2 {
        let record = &records[&format!("subagent-{i:03}.json")];
        ensure!(
            record["verdict"]["pass"] == true,
            "subagent {i} did not pass its tests: {record}"
        );
    }

    // The failing job fails verification, and its record quotes what the program said.
    let failed = crate::bed::condition(&failing, "Failed").context("no Failed condition")?;
    ensure!(
        failed["status"] == "True" && failed["reason"] == "VerificationFailed",
        "the failing job: {failed}"
    );
    let records = result(bed, &ns, "failing").await?;
    let issues = records["subagent-000.json"]["verdict"]["issues"].to_string();
    ensure!(
        issues.contains("the tests failed (exit status 1)")
            && issues.contains("kubeswarm-e2e: failed on purpose"),
        "the failing job's issues: {issues}"
    );

    // Each job's test pods are shut off by a NetworkPolicy it owns; its batches' Jobs and
    // programs went once read.
    for name in ["passing", "failing"] {
        let job = jobs.get(name).await?;
        let uid = job.uid().unwrap_or_default();
        let policies = Api::<NetworkPolicy>::namespaced(bed.client.clone(), &ns)
            .list(&ListParams::default().labels(&format!("kubeswarm.dev/tests-of={uid}")))
            .await?
            .items;
        ensure!(
            policies.len() == 1,
            "{name}: {} test NetworkPolicies",
            policies.len()
        );
        let policy = &policies[0];
        ensure!(
            policy
                .owner_references()
                .iter()
                .any(|o| o.uid == uid && o.controller == Some(true)),
            "{} is not controlled by the job {name}",
            policy.name_any()
        );
        let spec = policy.spec.clone().context("a policy with no spec")?;
        ensure!(
            spec.ingress.is_none()
                && spec.egress.is_none()
                && spec.policy_types == Some(vec!["Ingress".into(), "Egress".into()]),
            "{name}'s test NetworkPolicy does not deny every connection: {spec:?}"
        );
    }
    let batches = ListParams::default().labels("app.kubernetes.io/component=tests");
    let left = Api::<Job>::namespaced(bed.client.clone(), &ns)
        .list(&batches)
        .await?
        .items;
    ensure!(
        left.iter().all(|j| j.metadata.deletion_timestamp.is_some()),
        "batch Jobs left behind: {:?}",
        left.iter().map(|j| j.name_any()).collect::<Vec<_>>()
    );
    let programs = Api::<ConfigMap>::namespaced(bed.client.clone(), &ns)
        .list(&ListParams::default().labels("kubeswarm.dev/tests-of"))
        .await?
        .items;
    ensure!(
        programs
            .iter()
            .all(|c| c.metadata.deletion_timestamp.is_some()),
        "batch programs left behind: {:?}",
        programs.iter().map(|c| c.name_any()).collect::<Vec<_>>()
    );
    Ok(())
}

/// The records in a job's result ConfigMap, parsed.
async fn result(
    bed: &Bed,
    ns: &str,
    job: &str,
) -> anyhow::Result<std::collections::BTreeMap<String, Value>> {
    let map = Api::<ConfigMap>::namespaced(bed.client.clone(), ns)
        .get(&format!("{job}-result"))
        .await?;
    map.data
        .unwrap_or_default()
        .into_iter()
        .filter(|(key, _)| key.starts_with("subagent-"))
        .map(|(key, value)| Ok((key, serde_json::from_str(&value)?)))
        .collect()
}
