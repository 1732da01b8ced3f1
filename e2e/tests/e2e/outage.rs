//! The API server goes away mid-job, for 10 s and then for 60 s: the operator must not exit,
//! the job must complete, and no subagent recorded before an outage is called again.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kubeswarm::api::SwarmJob;

use crate::bed::{Bed, json_condition, until};
use crate::swarm::{JOB_TIMEOUT, job, recorded, served, tenant, wait_finished};

const JOB: &str = "outlast";
const SUBAGENTS: usize = 6;

/// Waits until job `job` has recorded more than `count` subagents.
pub async fn more_than(bed: &Bed, ns: &str, job: &str, count: usize) -> anyhow::Result<()> {
    let maps: Api<ConfigMap> = Api::namespaced(bed.client.clone(), ns);
    until(
        &maps,
        &format!("{job}-result"),
        JOB_TIMEOUT,
        &format!("holding more than {count} records"),
        json_condition(move |m| {
            m["data"]
                .as_object()
                .is_some_and(|d| d.keys().filter(|k| k.starts_with("subagent-")).count() > count)
        }),
    )
    .await
    .map(drop)
}

async fn leadership_lost(bed: &Bed) -> anyhow::Result<f64> {
    bed.operator_metric("kubeswarm_leadership_lost_total")
        .await?
        .context("the operator does not count lost leaderships")
}

pub async fn outages_mid_job(bed: &Bed) -> anyhow::Result<()> {
    let ns = bed.namespace("e2e-outage").await?;
    tenant(bed, &ns, "e2e-outage", 8, 4, "").await?;
    // One subagent at a time, so that each outage falls between records.
    bed.apply(Some(&ns), &job(bed, JOB, SUBAGENTS as u32, 1))
        .await?;
    let pid = bed.pid("operator")?;
    let lost_before = leadership_lost(bed).await?;
    let leases: Api<Lease> = Api::namespaced(bed.client.clone(), "kubeswarm-system");
    let mut figures = Vec::new();
    let mut seen = 0;
    for outage in [Duration::from_secs(10), Duration::from_secs(60)] {
        more_than(bed, &ns, JOB, seen).await?;
        let before = recorded(bed, &ns, JOB).await?;
        ensure!(
            before.len() < SUBAGENTS,
            "the job recorded every subagent before the {outage:?} outage"
        );
        bed.part("stop", "kube-apiserver")?;
        tokio::time::sleep(outage).await;
        bed.part("start", "kube-apiserver")?;
        let back = Instant::now();
        // The operator leads again: its Lease is renewed after the restart.
        let renewed = k8s_openapi::jiff::Timestamp::now();
        until(
            &leases,
            "kubeswarm-operator",
            Duration::from_secs(120),
            "renewed after the outage",
            json_condition(move |l| {
                l["spec"]["renewTime"]
                    .as_str()
                    .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
                    .is_some_and(|t| t > renewed)
            }),
        )
        .await?;
        let leading = back.elapsed();
        // And the job goes on: a subagent not recorded before is recorded now.
        more_than(bed, &ns, JOB, before.len()).await?;
        let progressing = back.elapsed();
        let after = recorded(bed, &ns, JOB).await?;
        for (key, attempts) in &before {
            ensure!(
                after.get(key) == Some(attempts),
                "{key} was recorded with {attempts} calls before the {outage:?} outage, then {:?}",
                after.get(key)
            );
        }
        figures.push(format!(
            "{outage:?} outage: leading again {leading:.1?} after the API server was back, next record after {progressing:.1?}"
        ));
        seen = after.len();
    }
    let jobs: Api<SwarmJob> = Api::namespaced(bed.client.clone(), &ns);
    more_than(bed, &ns, JOB, SUBAGENTS - 1).await?;
    let (served_total, in_flight) = served(bed, &ns, &format!("{JOB}-worker")).await?;
    wait_finished(&jobs, JOB).await?;

    ensure!(
        bed.pid("operator")? == pid && std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the operator exited during the outages"
    );
    let lost = leadership_lost(bed).await? - lost_before;
    ensure!(
        bed.operator_metric("kubeswarm_leader").await? == Some(1.0),
        "the operator does not lead after the outages"
    );
    let records = recorded(bed, &ns, JOB).await?;
    let needed: u64 = records.values().sum();
    // A call in flight when the engines stopped is abandoned and made again: at most one
    // per outage, the job running one subagent at a time.
    let abandoned = served_total.saturating_sub(needed + in_flight);
    ensure!(
        served_total >= needed && abandoned <= 2,
        "the workers served {served_total} calls for records of {needed} ({abandoned} abandoned)"
    );
    println!(
        "  {}; the leadership was lost {lost} times; {served_total} worker calls for {needed} recorded ({abandoned} abandoned, 0 recorded subagents called again); the operator (pid {pid}) never exited",
        figures.join("; ")
    );
    Ok(())
}
