//! Tests 3, 4 and 5: SwarmJobs through the operator, on real workers behind Kueue.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret};
use kube::api::{DynamicObject, ListParams};
use kube::{Api, ResourceExt};
use kubeswarm::api::{ModelPool, SwarmJob};
use serde_json::Value;

use crate::bed::{Bed, all_gone, delete_and_wait, gone, has_condition, json_condition, until};

/// How long a job on the test model may take: its workers load, then 2 cores serve it.
pub const JOB_TIMEOUT: Duration = Duration::from_secs(900);
const POOLS_TIMEOUT: Duration = Duration::from_secs(300);

/// The GPU types of the fake nodes, one ResourceFlavor each, and a tenant's ClusterQueue
/// (GPUs of both) with its LocalQueue `gpus` in the namespace.
pub async fn tenant(
    bed: &Bed,
    ns: &str,
    cohort: &str,
    h100: u32,
    l4: u32,
    extra: &str,
) -> anyhow::Result<()> {
    bed.apply(
        None,
        &format!(
            r#"
apiVersion: kueue.x-k8s.io/v1beta2
kind: ResourceFlavor
metadata: {{name: h100}}
spec: {{nodeLabels: {{nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}}}}
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: ResourceFlavor
metadata: {{name: l4}}
spec: {{nodeLabels: {{nvidia.com/gpu.product: NVIDIA-L4}}}}
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: ClusterQueue
metadata: {{name: {ns}}}
spec:
  cohortName: {cohort}
  namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {ns}}}}}
  {extra}
  resourceGroups:
  - coveredResources: [nvidia.com/gpu]
    flavors:
    - name: h100
      resources: [{{name: nvidia.com/gpu, nominalQuota: {h100}}}]
    - name: l4
      resources: [{{name: nvidia.com/gpu, nominalQuota: {l4}}}]
"#
        ),
    )
    .await?;
    bed.apply(
        Some(ns),
        &format!(
            "apiVersion: kueue.x-k8s.io/v1beta2\nkind: LocalQueue\nmetadata: {{name: gpus}}\nspec: {{clusterQueue: {ns}}}\n"
        ),
    )
    .await
}

/// A pool spec on the test model: `gpus` each, in the namespace's queue.
pub fn pool_spec(bed: &Bed, replicas: u32, gpus: u32, extra: &str) -> String {
    format!(
        "{{model: {{source: 'file://{}'}}, replicas: {replicas}, resources: {{gpus: {gpus}}}, \
         engine: {{maxConcurrentSequences: 4}}, queueName: gpus{extra}}}",
        bed.model.display()
    )
}

/// A job of `subagents` short subtasks on a job-scoped worker pool, checked by a gate pool
/// and synthesized by it. The gate runs the 135M test model, which is no critic and scores
/// most outputs near 0: `minScore: 0` leaves the verdict to its pass, as these tests are
/// about the machinery, not the answers.
pub fn job(bed: &Bed, name: &str, subagents: u32, concurrency: u32) -> String {
    let subtasks: Vec<String> = [
        "lighthouse",
        "fox",
        "balloon",
        "sailboat",
        "mountain",
        "cat",
    ]
    .iter()
    .take(subagents as usize)
    .map(|s| format!("  - Describe a {s} in one sentence."))
    .collect();
    swarm_job(
        name,
        &format!(
            r#"  task: You write one short sentence for a picture book.
  subtasks:
{subtasks}
  fanOut: {{pool: worker, subagents: {subagents}, maxConcurrency: {concurrency}, maxTokens: 48, temperature: 0.2, timeoutSeconds: 300}}
  verification: {{mode: adversarial, pool: gate, repairRounds: 0, minScore: 0}}
  aggregation: {{strategy: synthesize, pool: gate}}
  pools:
  - {{name: worker, spec: {worker}}}
  - {{name: gate, spec: {gate}}}
  budget: {{deadlineSeconds: 900}}
"#,
            subtasks = subtasks.join("\n"),
            worker = pool_spec(bed, 2, 1, ""),
            gate = pool_spec(bed, 1, 2, ""),
        ),
    )
}

/// A SwarmJob manifest named `name`; `spec` is its spec, indented by two spaces.
pub fn swarm_job(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: kubeswarm.dev/v1alpha1\nkind: SwarmJob\nmetadata: {{name: {name}}}\nspec:\n{spec}"
    )
}

/// Complete or Failed.
pub fn finished(job: &Value) -> bool {
    has_condition(job, "Complete", "True") || has_condition(job, "Failed", "True")
}

/// Waits until the job finishes, and fails unless it completed.
pub async fn wait_finished(jobs: &Api<SwarmJob>, name: &str) -> anyhow::Result<Value> {
    let job = until(
        jobs,
        name,
        JOB_TIMEOUT,
        "finished",
        json_condition(finished),
    )
    .await?;
    let job = serde_json::to_value(job)?;
    ensure!(
        has_condition(&job, "Complete", "True"),
        "{name} failed: {:#}",
        job["status"]["conditions"]
    );
    Ok(job)
}

/// Waits until the job's engine has started (status.startTime is set).
pub async fn wait_started(jobs: &Api<SwarmJob>, name: &str) -> anyhow::Result<()> {
    until(
        jobs,
        name,
        JOB_TIMEOUT,
        "started",
        json_condition(|j| !j["status"]["startTime"].is_null()),
    )
    .await
    .map(drop)
}

/// Waits until a ModelPool has every replica ready.
pub async fn wait_available(bed: &Bed, ns: &str, pool: &str) -> anyhow::Result<ModelPool> {
    let pools: Api<ModelPool> = Api::namespaced(bed.client.clone(), ns);
    until(
        &pools,
        pool,
        POOLS_TIMEOUT,
        "available",
        json_condition(|p| has_condition(p, "Available", "True")),
    )
    .await
}

fn workloads(bed: &Bed, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(
        bed.client.clone(),
        ns,
        &bed.resource("kueue.x-k8s.io", "v1beta1", "Workload"),
    )
}

/// Every worker pod of the namespace is on a node of the flavor Kueue admitted its
/// Workload to (one Workload per replica, named like its pod).
async fn pods_on_admitted_flavors(bed: &Bed, ns: &str) -> anyhow::Result<usize> {
    let pods: Api<Pod> = Api::namespaced(bed.client.clone(), ns);
    let nodes: Api<Node> = Api::all(bed.client.clone());
    let flavors = Api::<DynamicObject>::all_with(
        bed.client.clone(),
        &bed.resource("kueue.x-k8s.io", "v1beta1", "ResourceFlavor"),
    );
    let mut checked = 0;
    for workload in workloads(bed, ns).list(&ListParams::default()).await? {
        let name = workload.name_any();
        let workload = serde_json::to_value(&workload)?;
        let flavor =
            workload["status"]["admission"]["podSetAssignments"][0]["flavors"]["nvidia.com/gpu"]
                .as_str()
                .with_context(|| {
                    format!("workload {name} is not admitted: {:#}", workload["status"])
                })?
                .to_owned();
        let labels =
            serde_json::to_value(flavors.get(&flavor).await?)?["spec"]["nodeLabels"].clone();
        let pod = pods
            .get(&name)
            .await
            .with_context(|| format!("the pod of workload {name}"))?;
        let node = pod
            .spec
            .and_then(|s| s.node_name)
            .context("an unscheduled pod")?;
        let node_labels = nodes.get(&node).await?.labels().clone();
        for (key, value) in labels.as_object().into_iter().flatten() {
            ensure!(
                node_labels.get(key).map(String::as_str) == value.as_str(),
                "{name} is on {node}, not a node of flavor {flavor}"
            );
        }
        checked += 1;
    }
    Ok(checked)
}

/// Anyone who reaches a worker without its pool's token gets 401 (where no CNI enforces
/// the NetworkPolicy, the token is the guard); the job completing shows the operator has it.
async fn workers_refuse_calls_without_their_token(bed: &Bed, ns: &str) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::namespaced(bed.client.clone(), ns);
    let http = reqwest::Client::new();
    let mut tried = 0;
    for pod in pods
        .list(&ListParams::default().labels("kubeswarm.dev/pool"))
        .await?
    {
        let Some(ip) = pod.status.and_then(|s| s.pod_ip) else {
            continue;
        };
        for token in [None, Some("kubeswarm")] {
            let mut request = http.get(format!("http://{ip}:8000/v1/models"));
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let status = request.send().await?.status();
            ensure!(
                status == 401,
                "{ip} answered {status} to a call with {token:?}"
            );
            tried += 1;
        }
    }
    ensure!(tried >= 2, "no worker pod to try");
    Ok(())
}

pub async fn runs_to_completion(bed: &Bed) -> anyhow::Result<()> {
    let ns = bed.namespace("e2e-job").await?;
    tenant(bed, &ns, "e2e-job", 8, 4, "").await?;
    bed.apply(Some(&ns), &job(bed, "pictures", 4, 4)).await?;

    // While it runs: each job-scoped pool is admitted and its pods sit on that flavor.
    wait_available(bed, &ns, "pictures-worker").await?;
    wait_available(bed, &ns, "pictures-gate").await?;
    let pods = pods_on_admitted_flavors(bed, &ns).await?;
    ensure!(
        pods == 3,
        "expected 3 worker pods (2 workers, 1 gate), checked {pods}"
    );
    let from_images = crate::images::worker_pods_run_their_images(bed, &ns).await?;
    ensure!(
        from_images == 3,
        "expected 3 worker pods run from their images, checked {from_images}"
    );
    workers_refuse_calls_without_their_token(bed, &ns).await?;

    let jobs: Api<SwarmJob> = Api::namespaced(bed.client.clone(), &ns);
    let job = wait_finished(&jobs, "pictures").await?;
    for condition in [
        "Admitted",
        "Planned",
        "FanOutComplete",
        "Verified",
        "Aggregated",
        "Complete",
    ] {
        ensure!(
            has_condition(&job, condition, "True"),
            "{condition} is not True: {:#}",
            job["status"]["conditions"]
        );
    }
    let status = &job["status"];
    ensure!(
        status["finishedSubagents"] == 4,
        "finishedSubagents: {}",
        status["finishedSubagents"]
    );
    for pool in ["worker", "gate"] {
        let usage = status["usage"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|u| u["pool"] == pool)
            .with_context(|| format!("no usage for pool {pool}: {:#}", status["usage"]))?;
        ensure!(
            usage["calls"].as_i64() > Some(0) && usage["completionTokens"].as_i64() > Some(0),
            "usage of {pool}: {usage}"
        );
    }
    let name = status["result"]["configMapName"]
        .as_str()
        .context("no result reference")?;
    let result = Api::<ConfigMap>::namespaced(bed.client.clone(), &ns)
        .get(name)
        .await?;
    let data = result.data.unwrap_or_default();
    ensure!(
        data.get("answer").is_some_and(|a| !a.trim().is_empty()),
        "empty answer: {data:?}"
    );
    for i in 0..4 {
        ensure!(
            data.contains_key(&format!("subagent-{i:03}.json")),
            "no record of subagent {i}"
        );
    }

    // The job's pools went with it, and their Workloads, so the quota is free again.
    let pools: Api<ModelPool> = Api::namespaced(bed.client.clone(), &ns);
    for pool in ["pictures-worker", "pictures-gate"] {
        if let Some(p) = pools.get_opt(pool).await? {
            gone(&pools, pool, &p.uid().unwrap_or_default(), POOLS_TIMEOUT).await?;
        }
    }
    Ok(())
}

pub async fn delete_mid_run(bed: &Bed) -> anyhow::Result<()> {
    let ns = bed.namespace("e2e-delete").await?;
    tenant(bed, &ns, "e2e-delete", 8, 4, "").await?;
    bed.apply(Some(&ns), &job(bed, "doomed", 4, 1)).await?;
    let jobs: Api<SwarmJob> = Api::namespaced(bed.client.clone(), &ns);
    // Mid-run: its pools serve and the engine has started.
    wait_available(bed, &ns, "doomed-worker").await?;
    wait_started(&jobs, "doomed").await?;
    let pods: Api<Pod> = Api::namespaced(bed.client.clone(), &ns);
    ensure!(
        !pods.list(&ListParams::default()).await?.items.is_empty(),
        "no worker pods mid-run"
    );

    delete_and_wait(&jobs, "doomed", POOLS_TIMEOUT).await?;
    let all = ListParams::default();
    let pools: Api<ModelPool> = Api::namespaced(bed.client.clone(), &ns);
    all_gone(&pools, &all, POOLS_TIMEOUT, "job-scoped pools").await?;
    all_gone(&workloads(bed, &ns), &all, POOLS_TIMEOUT, "Workloads").await?;
    all_gone(&pods, &all, POOLS_TIMEOUT, "worker pods").await?;
    Ok(())
}

/// Chat completion requests the worker pods of a pool have served, and requests in flight.
pub async fn served(bed: &Bed, ns: &str, pool: &str) -> anyhow::Result<(u64, u64)> {
    let pods: Api<Pod> = Api::namespaced(bed.client.clone(), ns);
    let http = reqwest::Client::new();
    let (mut requests, mut in_flight) = (0.0, 0.0);
    for pod in pods
        .list(&ListParams::default().labels(&format!("kubeswarm.dev/pool={pool}")))
        .await?
    {
        let ip = pod
            .status
            .and_then(|s| s.pod_ip)
            .context("a pod without an address")?;
        let text = http
            .get(format!("http://{ip}:8000/metrics"))
            .send()
            .await?
            .text()
            .await?;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let value: f64 = value.parse().unwrap_or(0.0);
            if name.starts_with("kubeswarm_worker_requests_total") {
                requests += value;
            } else if name.starts_with("kubeswarm_worker_running_sequences")
                || name.starts_with("kubeswarm_worker_waiting_sequences")
            {
                in_flight += value;
            }
        }
    }
    Ok((requests as u64, in_flight as u64))
}

/// Recorded subagents of a job's result object (its ConfigMap, or its Secret in a
/// namespace that keeps results in Secrets), by key, with their model calls.
pub async fn recorded(bed: &Bed, ns: &str, job: &str) -> anyhow::Result<BTreeMap<String, u64>> {
    let name = format!("{job}-result");
    let maps: Api<ConfigMap> = Api::namespaced(bed.client.clone(), ns);
    let data: Vec<(String, Vec<u8>)> = match maps.get_opt(&name).await? {
        Some(map) => map
            .data
            .into_iter()
            .flatten()
            .map(|(k, v)| (k, v.into_bytes()))
            .collect(),
        None => Api::<Secret>::namespaced(bed.client.clone(), ns)
            .get_opt(&name)
            .await?
            .and_then(|s| s.data)
            .into_iter()
            .flatten()
            .map(|(k, v)| (k, v.0))
            .collect(),
    };
    let mut records = BTreeMap::new();
    for (key, value) in data.into_iter().filter(|(k, _)| k.starts_with("subagent-")) {
        let record: Value = serde_json::from_slice(&value)?;
        records.insert(
            key,
            record["attempts"]
                .as_u64()
                .context("a record without attempts")?,
        );
    }
    Ok(records)
}

pub async fn operator_killed_mid_run(bed: &Bed) -> anyhow::Result<()> {
    let ns = bed.namespace("e2e-restart").await?;
    tenant(bed, &ns, "e2e-restart", 8, 4, "").await?;
    // One subagent at a time, so some have finished and some not when the operator dies.
    bed.apply(Some(&ns), &job(bed, "survivor", 4, 1)).await?;
    // The bed keeps this namespace's results in Secrets (Helm value
    // results.secretNamespaces): the records survive the kill there, through the
    // chart's RoleBinding.
    let maps: Api<Secret> = Api::namespaced(bed.client.clone(), &ns);
    until(
        &maps,
        "survivor-result",
        JOB_TIMEOUT,
        "holding a subagent's record",
        json_condition(|m| {
            m["data"]
                .as_object()
                .is_some_and(|d| d.keys().any(|k| k.starts_with("subagent-")))
        }),
    )
    .await?;

    bed.part("stop", "operator")?;
    let before = recorded(bed, &ns, "survivor").await?;
    ensure!(
        before.len() < 4,
        "every subagent had finished before the kill: {before:?}"
    );
    // The killed operator's last call may still be decoding; it ends within its maxTokens.
    let started = std::time::Instant::now();
    let served_before = loop {
        let (requests, in_flight) = served(bed, &ns, "survivor-worker").await?;
        if in_flight == 0 {
            break requests;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("the workers still decode {in_flight} requests two minutes after the kill");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    bed.part("start", "operator")?;
    let jobs: Api<SwarmJob> = Api::namespaced(bed.client.clone(), &ns);
    // The pools go when the job finishes: read the workers' counts just before, at the
    // moment the last subagent is recorded and only the synthesis is left.
    until(
        &maps,
        "survivor-result",
        JOB_TIMEOUT,
        "holding every record",
        json_condition(|m| {
            m["data"]
                .as_object()
                .is_some_and(|d| d.keys().filter(|k| k.starts_with("subagent-")).count() == 4)
        }),
    )
    .await?;
    let (served_after, _) = served(bed, &ns, "survivor-worker").await?;
    let finished = wait_finished(&jobs, "survivor").await?;
    let result = &finished["status"]["result"];
    ensure!(
        result["secretName"] == "survivor-result"
            && result.get("configMapName").is_none()
            && result.get("preview").is_none(),
        "a result kept in a Secret is referenced, and previewed nowhere: {result}"
    );
    ensure!(
        Api::<ConfigMap>::namespaced(bed.client.clone(), &ns)
            .get_opt("survivor-result")
            .await?
            .is_none(),
        "the results of a Secret namespace went into a ConfigMap too"
    );

    let after = recorded(bed, &ns, "survivor").await?;
    for (key, attempts) in &before {
        ensure!(
            after.get(key) == Some(attempts),
            "{key} was recorded with {attempts} calls, then {:?}",
            after.get(key)
        );
    }
    let expected: u64 = after
        .iter()
        .filter(|(k, _)| !before.contains_key(*k))
        .map(|(_, a)| a)
        .sum();
    ensure!(
        served_after - served_before == expected,
        "after the restart the workers served {} requests; the subagents not recorded before the kill made {expected} calls \
         (recorded before: {before:?}, after: {after:?})",
        served_after - served_before
    );
    Ok(())
}
