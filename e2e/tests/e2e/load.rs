//! `make bench-operator`: the operator under load in the e2e bed. A benchmark, not a test:
//! it runs only when named. 100 external ModelPools on one instant mock OpenAI endpoint and
//! 1,000 one-subagent SwarmJobs applied 32 at a time; then 300 more at a steady 5 a second,
//! as Kubernetes' own scalability tests measure pod startup latency (at a fixed creation
//! rate: in a burst, the p99 is only the burst's size over the throughput). On the
//! same bed and API server, the peer: Kubernetes' Job controller given the same Jobs the
//! same ways. Reported: apply → first model call (ours) against apply → first Pod (the Job
//! controller's), p50 and p99, burst and steady; the operator's peak RSS; reconciles per
//! second; and the API requests per job.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::runtime::watcher::{self, Event};
use kube::{Api, ResourceExt};
use kubeswarm::api::{ModelPool, SwarmJob};
use kubeswarm_test_support::mock::{Mock, last_user, text};

use crate::bed::{Bed, has_condition};
use crate::swarm::finished;

const POOLS: usize = 100;
const JOBS: usize = 1_000;
const AT_ONCE: usize = 32;
/// The steady phase: jobs, and jobs applied per second. At 5 a second the peer's client
/// (20 requests/s, about 3 per Job) keeps up, so neither side is measured as a queue.
const PACED: usize = 300;
const RATE: f64 = 5.0;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// p50 and p99 of the delays from `applied` to `reacted`, by name.
fn delays(
    applied: &HashMap<String, Instant>,
    reacted: &HashMap<String, Instant>,
) -> anyhow::Result<(Duration, Duration)> {
    let mut all: Vec<Duration> = applied
        .iter()
        .map(|(name, at)| {
            reacted
                .get(name)
                .map(|r| r.saturating_duration_since(*at))
                .with_context(|| format!("{name} never got a reaction"))
        })
        .collect::<anyhow::Result<_>>()?;
    all.sort();
    Ok((percentile(&all, 0.5), percentile(&all, 0.99)))
}

/// The API server's request counts by verb, resource and subresource.
fn api_requests(bed: &Bed) -> anyhow::Result<BTreeMap<(String, String, String), f64>> {
    let text = bed.kubectl(&["get", "--raw", "/metrics"])?;
    let mut counts = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let (labels, value) = line.rsplit_once(' ').context("a sample")?;
        let label = |key: &str| {
            labels
                .split(&format!("{key}=\""))
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .unwrap_or_default()
                .to_owned()
        };
        *counts
            .entry((label("verb"), label("resource"), label("subresource")))
            .or_default() += value.parse::<f64>()?;
    }
    Ok(counts)
}

/// SwarmJob reconciles the operator has started (none counted before the first).
async fn swarm_job_reconciles(bed: &Bed) -> anyhow::Result<f64> {
    Ok(bed
        .operator_metric("kubeswarm_reconciles_total{kind=\"SwarmJob\"}")
        .await?
        .unwrap_or(0.0))
}

/// A kB figure of the operator's /proc status (VmRSS, VmHWM), in MiB.
fn operator_memory(bed: &Bed, field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", bed.pid("operator")?))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .context("no such field")?
        .trim()
        .trim_end_matches(" kB")
        .parse()?;
    Ok(kb / 1024.0)
}

/// Applies `documents` (name, YAML) in `ns`, `AT_ONCE` at a time, and with a `rate` no
/// faster than that many a second (open loop: the i-th is sent at i / rate whatever became
/// of the others); when each was stored.
async fn apply_all(
    bed: &Bed,
    ns: &str,
    documents: Vec<(String, String)>,
    rate: Option<f64>,
) -> anyhow::Result<HashMap<String, Instant>> {
    let start = tokio::time::Instant::now();
    futures::stream::iter(documents.into_iter().enumerate())
        .map(|(i, (name, yaml))| async move {
            if let Some(rate) = rate {
                tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
            }
            bed.apply(Some(ns), &yaml).await?;
            anyhow::Ok((name, Instant::now()))
        })
        .buffer_unordered(AT_ONCE)
        .try_collect()
        .await
}

/// One-subagent SwarmJobs named `prefix-N` (the task is the name, so the mock knows
/// whose call it is), spread over the pools.
fn swarm_jobs(prefix: &str, count: usize) -> Vec<(String, String)> {
    (0..count)
        .map(|i| {
            let name = format!("{prefix}-{i}");
            let yaml = format!(
                "apiVersion: kubeswarm.dev/v1alpha1\nkind: SwarmJob\nmetadata: {{name: {name}}}\nspec:\n  task: {name}\n  fanOut: {{pool: pool-{}, subagents: 1, maxTokens: 8}}\n  verification: {{mode: none}}\n  aggregation: {{strategy: collect}}\n",
                i % POOLS
            );
            (name, yaml)
        })
        .collect()
}

/// Batch Jobs named `prefix-N` whose Pods stay Pending (no node matches them).
fn peer_jobs(prefix: &str, count: usize) -> Vec<(String, String)> {
    (0..count)
        .map(|i| {
            let name = format!("{prefix}-{i}");
            let yaml = format!(
                "apiVersion: batch/v1\nkind: Job\nmetadata: {{name: {name}}}\nspec:\n  template:\n    spec:\n      restartPolicy: Never\n      nodeSelector: {{kubeswarm.dev/bench: none}}\n      containers: [{{name: c, image: busybox}}]\n"
            );
            (name, yaml)
        })
        .collect()
}

/// The peer: the Job controller, on the same API server, reacting to `jobs` applied in
/// a namespace of their own by creating their Pods; apply → first Pod, p50 and p99.
async fn peer(
    bed: &Bed,
    ns: &str,
    jobs: Vec<(String, String)>,
    rate: Option<f64>,
) -> anyhow::Result<(Duration, Duration)> {
    let ns = bed.namespace(ns).await?;
    let expected = jobs.len();
    let created: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let watching = {
        let created = created.clone();
        let pods: Api<Pod> = Api::namespaced(bed.client.clone(), &ns);
        tokio::spawn(async move {
            let mut events = watcher::watcher(pods, watcher::Config::default()).boxed();
            while let Ok(Some(event)) = events.try_next().await {
                if let Event::Apply(pod) | Event::InitApply(pod) = event
                    && let Some(job) = pod.labels().get("job-name")
                {
                    created
                        .lock()
                        .unwrap()
                        .entry(job.clone())
                        .or_insert_with(Instant::now);
                }
            }
        })
    };
    let applied = apply_all(bed, &ns, jobs, rate).await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while created.lock().unwrap().len() < expected {
        if Instant::now() > deadline {
            bail!(
                "the Job controller created {} of {expected} pods",
                created.lock().unwrap().len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    watching.abort();
    delays(&applied, &created.lock().unwrap())
}

/// Waits until every SwarmJob in `ns` has finished, `expected` of them; how many completed.
async fn all_finished(api: &Api<SwarmJob>, expected: usize) -> anyhow::Result<usize> {
    wait_all(
        "jobs finished",
        expected,
        Duration::from_secs(900),
        || async {
            let list = api.list(&ListParams::default()).await?;
            Ok(list
                .iter()
                .filter(|j| serde_json::to_value(j).is_ok_and(|v| finished(&v)))
                .count())
        },
    )
    .await?;
    Ok(api
        .list(&ListParams::default())
        .await?
        .iter()
        .filter(|j| serde_json::to_value(j).is_ok_and(|v| has_condition(&v, "Complete", "True")))
        .count())
}

/// Waits until `done` holds for every object `list` returns, `expected` of them.
async fn wait_all<F, Fut>(
    what: &str,
    expected: usize,
    timeout: Duration,
    list: F,
) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<usize>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let done = list().await?;
        if done >= expected {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{done} of {expected} {what} after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

pub async fn operator_under_load(bed: &Bed) -> anyhow::Result<()> {
    let ns = bed.namespace("bench").await?;
    let first_call: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let seen = first_call.clone();
    let model = Mock::start("m", move |body, _| {
        let job = last_user(body);
        seen.lock()
            .unwrap()
            .entry(job.trim().to_owned())
            .or_insert_with(Instant::now);
        text("ok")
    })
    .await;

    let pools: Vec<(String, String)> = (0..POOLS)
        .map(|i| {
            let name = format!("pool-{i}");
            let yaml = format!(
                "apiVersion: kubeswarm.dev/v1alpha1\nkind: ModelPool\nmetadata: {{name: {name}}}\nspec: {{external: {{url: '{}', model: m}}}}\n",
                model.url
            );
            (name, yaml)
        })
        .collect();
    apply_all(bed, &ns, pools, None).await?;
    let pool_api: Api<ModelPool> = Api::namespaced(bed.client.clone(), &ns);
    wait_all(
        "pools available",
        POOLS,
        Duration::from_secs(300),
        || async {
            let list = pool_api.list(&ListParams::default()).await?;
            Ok(list
                .iter()
                .filter(|p| {
                    serde_json::to_value(p).is_ok_and(|v| has_condition(&v, "Available", "True"))
                })
                .count())
        },
    )
    .await?;

    let rss_idle = operator_memory(bed, "VmRSS")?;
    let job_api: Api<SwarmJob> = Api::namespaced(bed.client.clone(), &ns);
    let reconciles_before = swarm_job_reconciles(bed).await?;
    let requests_before = api_requests(bed)?;
    let started = Instant::now();
    let applied = apply_all(bed, &ns, swarm_jobs("job", JOBS), None).await?;
    let applying = started.elapsed();
    let complete = all_finished(&job_api, JOBS).await?;
    let elapsed = started.elapsed();
    let reconciles = swarm_job_reconciles(bed).await? - reconciles_before;
    let rss_peak = operator_memory(bed, "VmHWM")?;
    let requests_after = api_requests(bed)?;
    let (ours_p50, ours_p99) = delays(&applied, &first_call.lock().unwrap())?;

    // Steady, once the burst has finished: the operator is idle again (finished jobs ask
    // nothing of it), as the peer is in its steady phase, which comes before its burst
    // (the Job controller keeps working on its 1,000 pending Pods after it).
    let paced = apply_all(bed, &ns, swarm_jobs("paced", PACED), Some(RATE)).await?;
    let paced_complete = all_finished(&job_api, JOBS + PACED).await? - complete;
    let (paced_p50, paced_p99) = delays(&paced, &first_call.lock().unwrap())?;

    let (peer_paced_p50, peer_paced_p99) = peer(
        bed,
        "bench-peer-paced",
        peer_jobs("paced", PACED),
        Some(RATE),
    )
    .await?;
    let (peer_p50, peer_p99) = peer(bed, "bench-peer", peer_jobs("job", JOBS), None).await?;

    let per_job = |verb: &str, resource: &str, subresource: &str| {
        let key = (verb.to_owned(), resource.to_owned(), subresource.to_owned());
        (requests_after.get(&key).unwrap_or(&0.0) - requests_before.get(&key).unwrap_or(&0.0))
            / JOBS as f64
    };
    println!(
        "  {JOBS} SwarmJobs on {POOLS} external pools: {complete} complete in {elapsed:.1?} (applied in {applying:.1?}); \
         {:.1} SwarmJob reconciles/s, {:.1} per job",
        reconciles / elapsed.as_secs_f64(),
        reconciles / JOBS as f64
    );
    println!(
        "  apply → first model call: p50 {ours_p50:.0?}, p99 {ours_p99:.0?}; the Job controller's apply → first Pod: \
         p50 {peer_p50:.0?}, p99 {peer_p99:.0?}; ratio {:.2}x at p50, {:.2}x at p99",
        ours_p50.as_secs_f64() / peer_p50.as_secs_f64().max(1e-3),
        ours_p99.as_secs_f64() / peer_p99.as_secs_f64().max(1e-3)
    );
    println!(
        "  steady, {PACED} jobs at {RATE} a second ({paced_complete} complete): apply → first model call p50 {paced_p50:.0?}, \
         p99 {paced_p99:.0?}; the Job controller's apply → first Pod: p50 {peer_paced_p50:.0?}, p99 {peer_paced_p99:.0?}; \
         ratio {:.2}x at p50, {:.2}x at p99",
        paced_p50.as_secs_f64() / peer_paced_p50.as_secs_f64().max(1e-3),
        paced_p99.as_secs_f64() / peer_paced_p99.as_secs_f64().max(1e-3)
    );
    println!(
        "  operator RSS: {rss_idle:.1} MiB with {POOLS} pools and no job, peak {rss_peak:.1} MiB with {JOBS} jobs"
    );
    println!(
        "  API requests per job: result ConfigMap {:.1} create + {:.1} patch; SwarmJob {:.1} patch (finalizer) + {:.1} status apply; \
         {:.1} ModelPool lists, {:.1} Pod lists, {:.1} Event creates",
        per_job("POST", "configmaps", ""),
        per_job("PATCH", "configmaps", ""),
        per_job("PATCH", "swarmjobs", ""),
        per_job("APPLY", "swarmjobs", "status"),
        per_job("LIST", "modelpools", ""),
        per_job("LIST", "pods", ""),
        per_job("POST", "events", "")
    );
    Ok(())
}
