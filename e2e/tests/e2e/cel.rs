//! Test 1: the CRDs' CEL rules, enforced by the API server with their messages.

use anyhow::{Context, bail};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use kubeswarm::api::SwarmJob;
use serde_json::json;

use crate::bed::Bed;
use kubeswarm_test_support::cel_cases::{
    creation_cases, job, merge_patch, started, transition_cases,
};

pub async fn rules_are_enforced(bed: &Bed) -> anyhow::Result<()> {
    let ns = bed.namespace("e2e-cel").await?;
    let mut failures = Vec::new();
    for case in creation_cases() {
        let mut object = (case.base)();
        merge_patch(&mut object, &case.patch);
        object["metadata"]["namespace"] = json!(ns);
        // A dry run: the API server validates and stores nothing, so no valid case
        // starts a pool or a job.
        let answer = bed.dry_run_create(&ns, &object).await?;
        match (case.breaks, answer) {
            (None, Ok(())) => {}
            (Some(message), Err(kube::Error::Api(err)))
                if err.code == 422 && err.message.contains(message) => {}
            (expected, answer) => failures.push(format!(
                "{}: expected {expected:?}, got {answer:?}",
                case.name
            )),
        }
    }

    // Transition rules: a started job keeps its task, pool and subagents. The job calls a
    // pool that does not exist, so the operator leaves it waiting and never starts it;
    // the test writes startTime itself.
    let jobs: Api<SwarmJob> = Api::namespaced(bed.client.clone(), &ns);
    let mut object = job();
    object["metadata"]["namespace"] = json!(ns);
    let created = jobs
        .create(
            &PostParams::default(),
            &serde_json::from_value(object.clone())?,
        )
        .await
        .context("creating a valid job")?;
    let name = created.metadata.name.clone().context("a name")?;
    for (patch, _) in transition_cases() {
        // Before it starts, the same edit is allowed (and undone for the next case).
        jobs.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("{patch} before the job started"))?;
        jobs.patch(&name, &PatchParams::default(), &Patch::Merge(&object))
            .await?;
    }
    let status = started(json!({}));
    jobs.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .context("writing startTime")?;
    for (patch, message) in transition_cases() {
        match jobs
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Err(kube::Error::Api(err)) if err.code == 422 && err.message.contains(message) => {}
            answer => failures.push(format!(
                "{patch} on a started job: expected {message:?}, got {answer:?}"
            )),
        }
    }
    // Other fields stay editable: a started job can be suspended.
    jobs.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"suspend": true}})),
    )
    .await
    .context("suspending a started job")?;

    if !failures.is_empty() {
        bail!(
            "{} of the API server's answers differ:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    Ok(())
}
