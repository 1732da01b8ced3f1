//! Tests 2 and 6: tenants' GPU quotas and priorities, enforced by Kueue.

use std::time::Duration;

use anyhow::{Context, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;
use kubeswarm::api::{ModelPool, SwarmJob};

use crate::bed::{Bed, all_gone, condition, delete_and_wait, json_condition, until};
use crate::swarm::{
    finished, pool_spec, swarm_job, tenant, wait_available, wait_finished, wait_started,
};

const ADMISSION_TIMEOUT: Duration = Duration::from_secs(120);

/// A job of four subtasks on one job-scoped pool of `gpus`, long enough to still run while
/// another pool is admitted or preempts it: each subagent writes exactly `tokens` tokens,
/// one at a time. The length must not depend on when the model chooses to stop (a short
/// answer once let the job finish before the preemption it waits for), so the subtask is
/// one that the default model, decoding greedily, never finishes: it is cut off at
/// `tokens`, which the job accepts.
fn job(bed: &Bed, name: &str, gpus: u32, tokens: u32, extra: &str) -> String {
    let count = "'Write the numbers from 1 to 1000, separated by commas. Write nothing else.'";
    swarm_job(
        name,
        &format!(
            r#"  task: You write a long list for a counting game.
  subtasks: [{count}, {count}, {count}, {count}]
  fanOut: {{pool: model, subagents: 4, maxConcurrency: 1, maxTokens: {tokens}, temperature: 0, timeoutSeconds: 300}}
  verification: {{mode: none, truncated: accept}}
  aggregation: {{strategy: collect}}
  pools: [{{name: model, spec: {spec}}}]
  budget: {{deadlineSeconds: 900}}
"#,
            spec = pool_spec(bed, 1, gpus, extra),
        ),
    )
}

fn standalone_pool(bed: &Bed, name: &str, gpus: u32, extra: &str) -> String {
    format!(
        "apiVersion: kubeswarm.dev/v1alpha1\nkind: ModelPool\nmetadata: {{name: {name}}}\nspec: {}\n",
        pool_spec(bed, 1, gpus, extra)
    )
}

/// Waits until pool `name` is not admitted with a reason and message `why` accepts, and
/// returns the message.
async fn not_admitted(
    pools: &Api<ModelPool>,
    name: &str,
    what: &str,
    why: impl Fn(&str, &str) -> bool,
) -> anyhow::Result<String> {
    let admitted = |pool: &serde_json::Value| {
        condition(pool, "Admitted")
            .filter(|c| c["status"] == "False")
            .map(|c| {
                let text = |field: &str| c[field].as_str().unwrap_or_default().to_owned();
                (text("reason"), text("message"))
            })
    };
    let pool = until(
        pools,
        name,
        ADMISSION_TIMEOUT,
        what,
        json_condition(|p| admitted(p).is_some_and(|(reason, message)| why(&reason, &message))),
    )
    .await?;
    let (_, message) = admitted(&serde_json::to_value(&pool)?).context("no Admitted")?;
    Ok(message)
}

pub async fn second_tenant_waits(bed: &Bed) -> anyhow::Result<()> {
    // Tenant A owns 2 H100s, tenant B 1, in one cohort: B's 2-GPU pool needs A's unused
    // GPU, and gets it only once A's job has released its pool.
    let a = bed.namespace("e2e-tenant-a").await?;
    let b = bed.namespace("e2e-tenant-b").await?;
    tenant(bed, &a, "e2e-quota", 2, 0, "").await?;
    tenant(bed, &b, "e2e-quota", 1, 0, "").await?;
    bed.apply(Some(&a), &job(bed, "first", 2, 256, "")).await?;
    wait_available(bed, &a, "first-model").await?;

    bed.apply(Some(&b), &standalone_pool(bed, "second", 2, ""))
        .await?;
    let pools: Api<ModelPool> = Api::namespaced(bed.client.clone(), &b);
    let message = not_admitted(&pools, "second", "waiting for quota", |_, message| {
        message.contains("quota")
    })
    .await?;
    let jobs: Api<SwarmJob> = Api::namespaced(bed.client.clone(), &a);
    let first = serde_json::to_value(jobs.get("first").await?)?;
    ensure!(
        !finished(&first),
        "tenant A's job ended before B's pool was seen waiting"
    );

    cut_at_max_tokens(&wait_finished(&jobs, "first").await?)?;
    wait_available(bed, &b, "second")
        .await
        .with_context(|| format!("B's pool waited with {message}"))?;
    Ok(())
}

pub async fn preemption(bed: &Bed) -> anyhow::Result<()> {
    let ns = bed.namespace("e2e-preempt").await?;
    bed.apply(
        None,
        r#"
apiVersion: scheduling.k8s.io/v1
kind: PriorityClass
metadata: {name: e2e-low}
value: 100
"#,
    )
    .await?;
    tenant(
        bed,
        &ns,
        "e2e-preempt",
        2,
        0,
        "preemption: {withinClusterQueue: LowerPriority}",
    )
    .await?;
    bed.apply(
        Some(&ns),
        &job(bed, "batch", 2, 400, ", priorityClassName: e2e-low"),
    )
    .await?;
    let jobs: Api<SwarmJob> = Api::namespaced(bed.client.clone(), &ns);
    wait_available(bed, &ns, "batch-model").await?;
    wait_started(&jobs, "batch").await?;

    // The urgent pool names a PriorityClass that does not exist yet: it says so and waits
    // until the class is created, which wakes it.
    bed.apply(
        Some(&ns),
        &standalone_pool(bed, "urgent", 2, ", priorityClassName: e2e-high"),
    )
    .await?;
    let pools: Api<ModelPool> = Api::namespaced(bed.client.clone(), &ns);
    not_admitted(
        &pools,
        "urgent",
        "waiting for its PriorityClass",
        |reason, _| reason == "PriorityClassNotFound",
    )
    .await?;

    // Once the class exists, the urgent pool takes the queue's only 2 GPUs from the
    // running job's pool.
    bed.apply(
        None,
        "{apiVersion: scheduling.k8s.io/v1, kind: PriorityClass, metadata: {name: e2e-high}, value: 1000}",
    )
    .await?;
    let message = not_admitted(&pools, "batch-model", "evicted", |reason, _| {
        reason == "Evicted"
    })
    .await?;
    ensure!(
        message.contains("Preempted"),
        "the evicted pool says {message:?}"
    );
    wait_available(bed, &ns, "urgent").await?;
    let pods: Api<Pod> = Api::namespaced(bed.client.clone(), &ns);
    let batch = ListParams::default().labels("kubeswarm.dev/pool=batch-model");
    all_gone(
        &pods,
        &batch,
        ADMISSION_TIMEOUT,
        "the preempted pool's pods",
    )
    .await?;
    let job = serde_json::to_value(jobs.get("batch").await?)?;
    ensure!(
        !finished(&job),
        "the preempted job finished without its pool"
    );

    // The urgent pool goes; the job's pool is readmitted and the job completes.
    delete_and_wait(&pools, "urgent", ADMISSION_TIMEOUT).await?;
    let job = wait_finished(&jobs, "batch").await?;
    cut_at_max_tokens(&job)
}

/// The timing of the quota tests rests on each subagent writing to its limit.
fn cut_at_max_tokens(job: &serde_json::Value) -> anyhow::Result<()> {
    let subagents = job["status"]["subagents"]
        .as_array()
        .context("no status.subagents")?;
    ensure!(
        subagents.iter().all(|s| s["finishReason"] == "Length"),
        "a subagent stopped before maxTokens, so the job may end before what the test waits for: {subagents:#?}"
    );
    Ok(())
}
