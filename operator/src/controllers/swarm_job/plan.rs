//! What a job does with its pools in one reconcile, decided from what it read: the writes
//! to its own pools, and where each pool it calls gets its replicas. Pure: the reconcile
//! reads (`Observed`), asks for the plan, makes the writes, then writes the status once.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use super::build;
use super::pools::{self, Waiting};
use crate::api::{ModelPool, SwarmJob};
use crate::controllers::children::built_hash;
use crate::pool_contract;

/// The pools and the worker pods in the job's namespace.
#[derive(Default)]
pub(super) struct Observed {
    pub(super) pools: Vec<ModelPool>,
    pub(super) pods: Vec<Pod>,
}

/// One write to the job's own pools.
#[derive(Debug, PartialEq)]
pub(super) enum PoolWrite {
    /// A pool of `spec.pools` that does not exist yet.
    Create(Box<ModelPool>),
    /// One of the job's pools whose entry in `spec.pools` changed.
    Apply(Box<ModelPool>),
    /// One of the job's pools, deleted so that its quota goes back to the queue.
    Release(String),
}

/// The writes that make the job's own pools what `spec.pools` says: created or updated
/// while the job may call them, released once it is suspended and no call is in flight
/// (calls in flight finish on the pools they started on). A pool of the same name that
/// the job does not control is never written; the job waits with NameConflict
/// (`pools::endpoints`).
pub(super) fn pool_writes(
    job: &SwarmJob,
    existing: &[ModelPool],
    suspended: bool,
    calls_in_flight: usize,
) -> Vec<PoolWrite> {
    if suspended {
        return if calls_in_flight == 0 {
            release(job, existing)
        } else {
            Vec::new()
        };
    }
    let uid = job.uid().unwrap_or_default();
    job.spec
        .pools
        .iter()
        .filter_map(|entry| {
            let want = build::job_pool(job, entry);
            match existing.iter().find(|p| p.name_any() == want.name_any()) {
                None => Some(PoolWrite::Create(Box::new(want))),
                Some(current)
                    if pool_contract::controlled_by(current, &uid)
                        && built_hash(current) != built_hash(&want) =>
                {
                    Some(PoolWrite::Apply(Box::new(want)))
                }
                Some(_) => None,
            }
        })
        .collect()
}

/// Releases of the job's own pools among `existing` that are not going already.
pub(super) fn release(job: &SwarmJob, existing: &[ModelPool]) -> Vec<PoolWrite> {
    let uid = job.uid().unwrap_or_default();
    existing
        .iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none() && pool_contract::controlled_by(*p, &uid)
        })
        .map(|p| PoolWrite::Release(p.name_any()))
        .collect()
}

/// Where a running job's calls go: the ready replicas of each pool it calls (none for a
/// pool that lost its workers, preempted or restarting, so that its calls wait for them
/// instead of failing), and the first reason it has to wait.
pub(super) fn replicas<'n>(
    job: &SwarmJob,
    called: impl IntoIterator<Item = &'n String>,
    observed: &Observed,
    worker_key: &str,
) -> (BTreeMap<String, Vec<String>>, Option<Waiting>) {
    let mut waiting = None;
    let urls = called
        .into_iter()
        .map(|name| {
            let urls =
                match pools::endpoints(job, name, &observed.pools, &observed.pods, worker_key) {
                    Ok(endpoints) => endpoints.urls,
                    Err(why) => {
                        waiting.get_or_insert(why);
                        Vec::new()
                    }
                };
            (name.clone(), urls)
        })
        .collect();
    (urls, waiting)
}

#[cfg(test)]
mod tests;
