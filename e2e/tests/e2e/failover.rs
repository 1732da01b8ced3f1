//! Two operator replicas; the leader is killed mid-job. The standby must take over, finish
//! the job without calling a recorded subagent again, and never call the workers while the
//! old leader still does: measured at the workers, which log each call with the replica
//! that made it (the `kubeswarm-caller` header) and when it started and ended.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kubeswarm::api::SwarmJob;

use crate::bed::{Bed, json_condition, until};
use crate::outage::more_than;
use crate::swarm::{job, recorded, tenant, wait_finished};

const JOB: &str = "handover";
const SUBAGENTS: usize = 6;
const LEADER: &str = "kubeswarm-e2e";
const STANDBY: &str = "kubeswarm-e2e-2";

/// One chat completion as a worker logged it.
#[derive(Debug)]
struct Call {
    caller: String,
    started_ms: u64,
    ended_ms: u64,
}

/// Drops ANSI colour sequences, which the workers' log lines carry.
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Every chat completion the workers of namespace `ns` logged.
fn calls(bed: &Bed, ns: &str) -> anyhow::Result<Vec<Call>> {
    let mut calls = Vec::new();
    for entry in std::fs::read_dir(bed.dir.join("pods"))? {
        let dir = entry?.path();
        let named = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if !named.starts_with(&format!("{ns}_")) {
            continue;
        }
        let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
        for line in log
            .lines()
            .map(plain)
            .filter(|l| l.contains("chat completion"))
        {
            let field = |key: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(&format!("{key}=")))
                    .map(str::to_owned)
                    .with_context(|| format!("no {key} in {line}"))
            };
            calls.push(Call {
                caller: field("caller")?,
                started_ms: field("started_ms")?.parse()?,
                ended_ms: field("ended_ms")?.parse()?,
            });
        }
    }
    Ok(calls)
}

/// How long calls of both replicas were in progress at once, in milliseconds.
fn overlap(calls: &[Call]) -> u64 {
    let of = |who: &'static str| calls.iter().filter(move |c| c.caller == who);
    of(LEADER)
        .flat_map(|a| {
            of(STANDBY).map(move |b| {
                a.ended_ms
                    .min(b.ended_ms)
                    .saturating_sub(a.started_ms.max(b.started_ms))
            })
        })
        .sum()
}

/// Waits until the operator's Lease names `who`.
async fn held_by(bed: &Bed, who: &'static str) -> anyhow::Result<()> {
    let leases: Api<Lease> = Api::namespaced(bed.client.clone(), "kubeswarm-system");
    until(
        &leases,
        "kubeswarm-operator",
        Duration::from_secs(120),
        &format!("held by {who}"),
        json_condition(move |l| l["spec"]["holderIdentity"] == who),
    )
    .await
    .map(drop)
}

pub async fn standby_takes_over(bed: &Bed) -> anyhow::Result<()> {
    let ns = bed.namespace("e2e-failover").await?;
    tenant(bed, &ns, "e2e-failover", 8, 4, "").await?;
    bed.part("start", "operator-2")?;
    bed.apply(Some(&ns), &job(bed, JOB, SUBAGENTS as u32, 1))
        .await?;
    more_than(bed, &ns, JOB, 1).await?;
    let before = recorded(bed, &ns, JOB).await?;
    ensure!(
        before.len() < SUBAGENTS,
        "every subagent was recorded before the kill"
    );

    bed.part("stop", "operator")?;
    let killed = Instant::now();
    held_by(bed, STANDBY).await?;
    let takeover = killed.elapsed();
    more_than(bed, &ns, JOB, before.len()).await?;
    let progressing = killed.elapsed();
    let jobs: Api<SwarmJob> = Api::namespaced(bed.client.clone(), &ns);
    wait_finished(&jobs, JOB).await?;

    let after = recorded(bed, &ns, JOB).await?;
    for (key, attempts) in &before {
        ensure!(
            after.get(key) == Some(attempts),
            "{key} was recorded with {attempts} calls before the kill, then {:?}",
            after.get(key)
        );
    }
    let calls = calls(bed, &ns)?;
    let by = |who: &str| calls.iter().filter(|c| c.caller == who).count();
    ensure!(
        by(LEADER) > 0 && by(STANDBY) > 0 && by(LEADER) + by(STANDBY) == calls.len(),
        "the workers logged calls by {} (leader), {} (standby) of {}: {calls:?}",
        by(LEADER),
        by(STANDBY),
        calls.len()
    );
    let both = overlap(&calls);
    ensure!(
        both == 0,
        "both replicas called the workers at once for {both} ms"
    );
    let last_old = calls
        .iter()
        .filter(|c| c.caller == LEADER)
        .map(|c| c.ended_ms)
        .max()
        .unwrap_or(0);
    let first_new = calls
        .iter()
        .filter(|c| c.caller == STANDBY)
        .map(|c| c.started_ms)
        .min()
        .unwrap_or(0);
    // The bed as it was: the first replica leads again, the second is gone.
    bed.part("stop", "operator-2")?;
    bed.part("start", "operator")?;
    held_by(bed, LEADER).await?;
    println!(
        "  the standby led {takeover:.1?} after the leader was killed and recorded the next subagent after {progressing:.1?}; \
         the old leader's last call ended {:.1} s before the new one's first began: 0 ms with both calling; \
         {} calls by the old leader, {} by the new; 0 recorded subagents called again",
        (first_new.saturating_sub(last_old)) as f64 / 1000.0,
        by(LEADER),
        by(STANDBY)
    );
    Ok(())
}
