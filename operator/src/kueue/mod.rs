//! Kueue's Workload and ResourceFlavor (types generated from the pinned release's CRDs by
//! `generate`), and the part of Kueue's protocol an integration owns: reading admission,
//! reporting PodsReady, and giving an evicted Workload's admission back.
//!
//! Layer: a protocol beside `pool_contract` and `tenancy`; uses `api` and `conditions`,
//! knows no controller.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Toleration;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

use crate::conditions::transition_time;

#[allow(clippy::all, missing_docs)]
mod workload {
    // The generated pod set refers to its template by this name; Kubernetes' own type is
    // what Kueue stores there.
    use k8s_openapi::api::core::v1::PodTemplateSpec as WorkloadPodSetsTemplate;
    include!("generated/workload.rs");
}

#[allow(clippy::all, missing_docs)]
mod resource_flavor {
    include!("generated/resource_flavor.rs");
}

pub use resource_flavor::{ResourceFlavor, ResourceFlavorSpec, ResourceFlavorTolerations};
pub use workload::{
    Workload, WorkloadPodSets, WorkloadPriorityClassSource, WorkloadSpec, WorkloadStatus,
    WorkloadStatusAdmission, WorkloadStatusAdmissionPodSetAssignments,
};

/// Where Kueue placed a replica: the admitted flavors' node labels and tolerations.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Placement {
    pub node_labels: BTreeMap<String, String>,
    pub tolerations: Vec<Toleration>,
}

/// Where one replica stands with Kueue.
#[derive(Clone, Debug, PartialEq)]
pub enum Admission {
    /// The pool names no queue: Kueue is not involved and the pod is created directly.
    Direct,
    /// The Workload waits; Kueue's message says for what.
    Waiting(String),
    Admitted,
    /// Kueue took the admission back (preemption, pods-ready timeout, stopped queue).
    Evicted {
        reason: String,
        message: String,
    },
}

const QUOTA_RESERVED: &str = "QuotaReserved";
const ADMITTED: &str = "Admitted";
const EVICTED: &str = "Evicted";
const PODS_READY: &str = "PodsReady";

/// Kueue's own reasons (its `apis/kueue/v1beta1` constants), which its waitForPodsReady
/// reads: a pod that fails after the Workload started waits under `recoveryTimeout`, not
/// the start `timeout`.
mod reason {
    /// PodsReady=False: the pods have not all been ready since admission.
    pub const WAIT_FOR_START: &str = "WaitForStart";
    /// PodsReady=False: the pods were ready, and one is not any more.
    pub const WAIT_FOR_RECOVERY: &str = "WaitForRecovery";
    /// PodsReady=True, the first time.
    pub const STARTED: &str = "Started";
    /// PodsReady=True again after a recovery.
    pub const RECOVERED: &str = "Recovered";
    /// QuotaReserved=False once the admission is given back.
    pub const PENDING: &str = "Pending";
    /// Admitted=False once the admission is given back.
    pub const NO_RESERVATION: &str = "NoReservation";
}

fn condition<'a>(workload: &'a Workload, type_: &str) -> Option<&'a Condition> {
    workload
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
}

fn is_true(workload: &Workload, type_: &str) -> bool {
    condition(workload, type_).is_some_and(|c| c.status == "True")
}

/// Where a Workload stands, as the pool's status reports it.
pub fn admission_state(workload: &Workload) -> Admission {
    let admitted = workload
        .status
        .as_ref()
        .is_some_and(|s| s.admission.is_some());
    if let Some(evicted) = condition(workload, EVICTED).filter(|c| c.status == "True")
        && admitted
    {
        return Admission::Evicted {
            reason: evicted.reason.clone(),
            message: evicted.message.clone(),
        };
    }
    if admitted && is_true(workload, ADMITTED) {
        return Admission::Admitted;
    }
    let message = condition(workload, QUOTA_RESERVED)
        .filter(|c| c.status == "False" && !c.message.is_empty())
        .map(|c| c.message.clone())
        .unwrap_or_else(|| "waiting for Kueue to reserve quota".to_owned());
    Admission::Waiting(message)
}

/// The names of the flavors Kueue admitted the Workload's pods on.
pub fn admitted_flavors(workload: &Workload) -> Vec<String> {
    let mut flavors: Vec<String> = workload
        .status
        .as_ref()
        .and_then(|s| s.admission.as_ref())
        .into_iter()
        .flat_map(|a| &a.pod_set_assignments)
        .flat_map(|p| p.flavors.iter().flatten().map(|(_, flavor)| flavor.clone()))
        .collect();
    flavors.sort();
    flavors.dedup();
    flavors
}

/// Adds a flavor's node labels and tolerations to a placement, as Kueue does for the pods
/// of the jobs it admits.
pub fn add_flavor(placement: &mut Placement, flavor: &ResourceFlavor) {
    placement
        .node_labels
        .extend(flavor.spec.node_labels.clone().unwrap_or_default());
    for t in flavor.spec.tolerations.iter().flatten() {
        placement.tolerations.push(Toleration {
            key: t.key.clone(),
            operator: t.operator.clone(),
            value: t.value.clone(),
            effect: t.effect.clone(),
            toleration_seconds: t.toleration_seconds,
        });
    }
}

/// The PodsReady the Workload reports, if any.
pub fn pods_ready(workload: &Workload) -> Option<bool> {
    condition(workload, PODS_READY).map(|c| c.status == "True")
}

/// `conditions` with `new` (stamped now) in place of its type's condition, keeping the
/// transition time when the status is unchanged.
fn set_condition(conditions: &[Condition], mut new: Condition) -> Vec<Condition> {
    let mut out: Vec<Condition> = conditions
        .iter()
        .filter(|c| c.type_ != new.type_)
        .cloned()
        .collect();
    new.last_transition_time = transition_time(
        conditions,
        &new.type_,
        &new.status,
        new.last_transition_time.0,
    );
    out.push(new);
    out
}

fn new_condition(
    workload: &Workload,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    now: Timestamp,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        last_transition_time: Time(now),
        observed_generation: workload.metadata.generation,
    }
}

fn conditions(workload: &Workload) -> Vec<Condition> {
    workload
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default()
}

/// The status patch that reports whether the admitted pods are ready; Kueue's
/// waitForPodsReady reads it. Once the pods have been ready, a pod that stops being ready
/// is a recovery, not a start.
pub fn report_pods_ready(workload: &Workload, ready: bool, now: Timestamp) -> Value {
    let started_before = condition(workload, PODS_READY)
        .is_some_and(|c| c.status == "True" || c.reason == reason::WAIT_FOR_RECOVERY);
    let (reason, message) = match (ready, started_before) {
        (true, false) => (
            reason::STARTED,
            "All pods reached readiness and the workload is running",
        ),
        (true, true) => (
            reason::RECOVERED,
            "The pods are ready again and the workload is running",
        ),
        (false, false) => (
            reason::WAIT_FOR_START,
            "Not all pods are ready or succeeded",
        ),
        (false, true) => (
            reason::WAIT_FOR_RECOVERY,
            "A pod of the running workload is not ready; waiting for it to recover",
        ),
    };
    let condition = new_condition(workload, PODS_READY, ready, reason, message, now);
    json!({"conditions": set_condition(&conditions(workload), condition)})
}

/// The status patch that gives an evicted Workload's admission back once its pods are
/// gone: no admission, QuotaReserved false, Admitted false. Kueue then requeues it, and
/// the workload that caused the eviction gets the quota.
pub fn release_admission(workload: &Workload, now: Timestamp) -> Value {
    let why = condition(workload, EVICTED)
        .map(|c| c.message.clone())
        .unwrap_or_default();
    let mut list = conditions(workload);
    list = set_condition(
        &list,
        new_condition(workload, QUOTA_RESERVED, false, reason::PENDING, &why, now),
    );
    if list.iter().any(|c| c.type_ == ADMITTED) {
        list = set_condition(
            &list,
            new_condition(
                workload,
                ADMITTED,
                false,
                reason::NO_RESERVATION,
                "The workload has no reservation",
                now,
            ),
        );
    }
    if list.iter().any(|c| c.type_ == PODS_READY) {
        list = set_condition(
            &list,
            new_condition(
                workload,
                PODS_READY,
                false,
                reason::WAIT_FOR_START,
                "The workload was evicted",
                now,
            ),
        );
    }
    json!({"admission": null, "conditions": list})
}

/// An error that means the cluster does not serve Kueue's Workload API.
pub fn is_not_installed(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 404)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted_with(pods_ready: Option<(&str, &str)>) -> Workload {
        let mut conditions = vec![
            json!({"type": "Admitted", "status": "True", "reason": "Admitted", "message": "", "lastTransitionTime": "2026-11-21T10:00:00Z"}),
        ];
        if let Some((status, reason)) = pods_ready {
            conditions.push(json!({"type": "PodsReady", "status": status, "reason": reason, "message": "", "lastTransitionTime": "2026-11-21T10:01:00Z"}));
        }
        serde_json::from_value(json!({
            "apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "Workload",
            "metadata": {"name": "gemma-0", "generation": 1},
            "spec": {"podSets": []},
            "status": {"conditions": conditions}
        }))
        .unwrap()
    }

    fn reported(workload: &Workload, ready: bool) -> (String, String) {
        let patch = report_pods_ready(workload, ready, Timestamp::now());
        let pods_ready = patch["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == PODS_READY)
            .unwrap()
            .clone();
        (
            pods_ready["status"].as_str().unwrap().to_owned(),
            pods_ready["reason"].as_str().unwrap().to_owned(),
        )
    }

    #[test]
    fn pods_ready_uses_kueues_reasons_for_a_start_and_a_recovery() {
        let pair = |s: &str, r: &str| (s.to_owned(), r.to_owned());
        assert_eq!(
            reported(&admitted_with(None), false),
            pair("False", "WaitForStart")
        );
        assert_eq!(
            reported(&admitted_with(Some(("False", "WaitForStart"))), true),
            pair("True", "Started")
        );
        assert_eq!(
            reported(&admitted_with(Some(("True", "Started"))), false),
            pair("False", "WaitForRecovery"),
            "Kueue times a failure after the start with recoveryTimeout"
        );
        assert_eq!(
            reported(&admitted_with(Some(("False", "WaitForRecovery"))), true),
            pair("True", "Recovered")
        );
    }
}
