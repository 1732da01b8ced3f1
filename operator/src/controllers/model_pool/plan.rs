//! What a pool that runs workers does in one reconcile, decided from what it read: the
//! writes to its pods and Workloads, in order, and where each replica stands. Pure: the
//! reconcile reads (`Observed`), asks `replicas` for the plan, then makes the writes.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use k8s_openapi::jiff::Timestamp;
use kube::{Resource, ResourceExt};
use serde_json::Value;

use super::build::{self, REPLICA_LABEL};
use super::status::Replica;
use crate::api::ModelPool;
use crate::controllers::children::built_hash;
use crate::kueue::{self, Admission, Placement, ResourceFlavor, Workload};
use crate::pool_contract::{self, PodHealth};

/// What the pool's replicas are built from: its spec, the worker template and the value
/// of its PriorityClass.
pub struct Blueprint<'a> {
    pub pool: &'a ModelPool,
    pub template: &'a PodTemplateSpec,
    pub priority: Option<i32>,
}

/// The pool's pods and Workloads by name, and the ResourceFlavors its admitted Workloads
/// were admitted on (those `flavors_to_read` names).
#[derive(Default)]
pub struct Observed {
    pub pods: BTreeMap<String, Pod>,
    pub workloads: BTreeMap<String, Workload>,
    pub flavors: BTreeMap<String, ResourceFlavor>,
}

/// One write, in the order the plan makes them.
#[derive(Debug, PartialEq)]
pub enum Write {
    CreatePod(Box<Pod>),
    DeletePod(String),
    CreateWorkload(Box<Workload>),
    DeleteWorkload(String),
    /// A merge patch of a Workload's status, refused by the API server if Kueue changed
    /// the Workload since it was read.
    WorkloadStatus {
        name: String,
        resource_version: Option<String>,
        status: Value,
    },
}

impl Write {
    /// Whether the write deletes something.
    pub fn destroys(&self) -> bool {
        matches!(self, Write::DeletePod(_) | Write::DeleteWorkload(_))
    }
}

/// The writes, and where each replica stands once they are made.
#[derive(Debug, PartialEq)]
pub struct Plan {
    pub writes: Vec<Write>,
    pub replicas: Vec<Replica>,
}

impl Blueprint<'_> {
    fn workload(&self, index: i32) -> Workload {
        build::workload(self.pool, self.template, index, self.priority)
    }
}

/// The Workload named like `want` as it stands, when it was built from what `want` is.
fn as_built<'o>(observed: &'o Observed, want: &Workload) -> Option<&'o Workload> {
    observed
        .workloads
        .get(&want.name_any())
        .filter(|w| built_hash(*w) == built_hash(want))
}

/// The flavors to read before planning: those of the replicas' admitted Workloads.
pub fn flavors_to_read(desired: &Blueprint, observed: &Observed) -> BTreeSet<String> {
    if desired.pool.spec.queue_name.is_none() {
        return BTreeSet::new();
    }
    (0..desired.pool.spec.replicas)
        .filter_map(|index| as_built(observed, &desired.workload(index)))
        .filter(|w| kueue::admission_state(w) == Admission::Admitted)
        .flat_map(kueue::admitted_flavors)
        .collect()
}

/// Every replica of the pool to `spec.replicas`, and the ones past it removed.
pub fn replicas(desired: &Blueprint, observed: &Observed, now: Timestamp) -> Plan {
    let pool = desired.pool;
    let queued = pool.spec.queue_name.is_some();
    let mut writes = Vec::new();
    let mut replicas = Vec::new();
    for index in 0..pool.spec.replicas {
        let name = build::replica_name(pool, index);
        let pod = observed.pods.get(&name);
        let (admission, admitted) = if queued {
            workload(desired, observed, index, pod, now, &mut writes)
        } else {
            (Admission::Direct, None)
        };
        let health = match &admission {
            Admission::Direct | Admission::Admitted => {
                // The Workload `flavors_to_read` read the flavors of, so none is missing.
                let placement = admitted
                    .map(|w| placement(w, &observed.flavors))
                    .unwrap_or_default();
                let want = build::pod(pool, desired.template, index, &placement);
                pod_step(want, pod, &mut writes)
            }
            Admission::Waiting(_) | Admission::Evicted { .. } => None,
        };
        replicas.push(Replica {
            name,
            admission,
            pod: health,
        });
    }
    // Replicas past spec.replicas: a scale-down. Their Workloads go with them, so the
    // quota returns to the queue.
    let desired_count = pool.spec.replicas;
    for name in observed
        .pods
        .iter()
        .filter(|(_, p)| beyond(*p, desired_count))
    {
        writes.push(Write::DeletePod(name.0.clone()));
    }
    for name in observed
        .workloads
        .iter()
        .filter(|(_, w)| beyond(*w, desired_count))
    {
        writes.push(Write::DeleteWorkload(name.0.clone()));
    }
    Plan { writes, replicas }
}

/// Keeps replica `index`'s Workload as built, following Kueue's protocol for where it
/// stands; returns that, and the Workload when it is the one built now.
fn workload<'o>(
    desired: &Blueprint,
    observed: &'o Observed,
    index: i32,
    pod: Option<&Pod>,
    now: Timestamp,
    writes: &mut Vec<Write>,
) -> (Admission, Option<&'o Workload>) {
    let name = build::replica_name(desired.pool, index);
    let want = desired.workload(index);
    let Some(current) = as_built(observed, &want) else {
        // Kueue refuses changes to the pod sets of an admitted Workload: a changed template
        // is a new Workload, queued again.
        if observed.workloads.contains_key(&name) {
            if pod.is_some() {
                writes.push(Write::DeletePod(name.clone()));
            }
            writes.push(Write::DeleteWorkload(name));
        }
        writes.push(Write::CreateWorkload(Box::new(want)));
        return (
            Admission::Waiting(
                "the Workload was just created; Kueue has not looked at it yet".to_owned(),
            ),
            None,
        );
    };
    let status = |status: Value| Write::WorkloadStatus {
        name: name.clone(),
        resource_version: current.resource_version(),
        status,
    };
    let admission = kueue::admission_state(current);
    match &admission {
        Admission::Evicted { .. } => {
            // Kueue's protocol: stop the pods, then give the admission back so the workload
            // that evicted this one gets the quota.
            if pod.is_some() {
                writes.push(Write::DeletePod(name.clone()));
            } else if current
                .status
                .as_ref()
                .is_some_and(|s| s.admission.is_some())
            {
                writes.push(status(kueue::release_admission(current, now)));
            }
        }
        Admission::Admitted => {
            let ready = pod.is_some_and(|p| pool_contract::pod_health(p).ready);
            if kueue::pods_ready(current) != Some(ready) {
                writes.push(status(kueue::report_pods_ready(current, ready, now)));
            }
        }
        Admission::Waiting(_) | Admission::Direct => {
            if pod.is_some() {
                writes.push(Write::DeletePod(name.clone()));
            }
        }
    }
    (admission, Some(current))
}

/// The admitted flavors' node labels and tolerations.
fn placement(workload: &Workload, flavors: &BTreeMap<String, ResourceFlavor>) -> Placement {
    let mut placement = Placement::default();
    for name in kueue::admitted_flavors(workload) {
        if let Some(flavor) = flavors.get(&name) {
            kueue::add_flavor(&mut placement, flavor);
        }
    }
    placement
}

/// Creates replica `want`'s pod if it is missing, or deletes it to be created again when
/// its spec changed (pod specs are immutable). Returns how the pod is doing.
fn pod_step(want: Pod, current: Option<&Pod>, writes: &mut Vec<Write>) -> Option<PodHealth> {
    match current {
        Some(pod) if built_hash(pod) == built_hash(&want) => Some(pool_contract::pod_health(pod)),
        Some(_) => {
            writes.push(Write::DeletePod(want.name_any()));
            None
        }
        None => {
            writes.push(Write::CreatePod(Box::new(want)));
            Some(PodHealth {
                ready: false,
                failure: None,
            })
        }
    }
}

/// Whether a child belongs to a replica past `replicas`.
fn beyond<K: Resource>(child: &K, replicas: i32) -> bool {
    child
        .meta()
        .labels
        .as_ref()
        .and_then(|l| l.get(REPLICA_LABEL))
        .and_then(|i| i.parse::<i32>().ok())
        .is_some_and(|i| i >= replicas)
}

#[cfg(test)]
mod tests;
