//! What a ModelPool's status says, decided from what its children report. Pure.

use super::ProbeError;
use crate::conditions::Desired;
use crate::kueue::Admission;
use crate::pool_contract::{AVAILABLE, PodHealth};
use crate::telemetry;
use crate::tenancy::Denied;

pub const ADMITTED: &str = "Admitted";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

/// The reasons of the conditions, as `kubectl describe` and Events show them.
pub mod reason {
    pub const ADMITTED: &str = "Admitted";
    pub const API_KEY_UNAVAILABLE: &str = "ApiKeyUnavailable";
    pub const AS_EXPECTED: &str = "AsExpected";
    pub const ENDPOINT_SERVES_MODEL: &str = "EndpointServesModel";
    pub const ENDPOINT_UNAVAILABLE: &str = "EndpointUnavailable";
    pub const EVICTED: &str = "Evicted";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const KUEUE_NOT_INSTALLED: &str = "KueueNotInstalled";
    pub const MINIMUM_REPLICAS_AVAILABLE: &str = "MinimumReplicasAvailable";
    pub const NAME_CONFLICT: &str = "NameConflict";
    pub const NO_QUEUE: &str = "NoQueue";
    pub const NO_READY_REPLICAS: &str = "NoReadyReplicas";
    pub const POD_FAILING: &str = "PodFailing";
    pub const POLICY_DENIED: &str = "PolicyDenied";
    pub const PRIORITY_CLASS_NOT_FOUND: &str = "PriorityClassNotFound";
    pub const REPLICAS_READY: &str = "ReplicasReady";
    pub const REPLICAS_STARTING: &str = "ReplicasStarting";
    pub const SCALED_TO_ZERO: &str = "ScaledToZero";
    pub const WAITING_FOR_ADMISSION: &str = "WaitingForAdmission";
    pub const WAITING_FOR_QUOTA: &str = "WaitingForQuota";
}

/// One replica: its admission and its pod.
#[derive(Clone, Debug, PartialEq)]
pub struct Replica {
    pub name: String,
    pub admission: Admission,
    pub pod: Option<PodHealth>,
}

/// The conditions of a pool that runs workers, and its ready count.
pub fn workers(desired: i32, queued: bool, replicas: &[Replica]) -> (Vec<Desired>, i32) {
    let ready = replicas
        .iter()
        .filter(|r| r.pod.as_ref().is_some_and(|p| p.ready))
        .count() as i32;
    let waiting: Vec<&Replica> = replicas
        .iter()
        .filter(|r| {
            matches!(
                r.admission,
                Admission::Waiting(_) | Admission::Evicted { .. }
            )
        })
        .collect();
    let admitted = if !queued {
        Desired::new(
            ADMITTED,
            true,
            reason::NO_QUEUE,
            "spec.queueName is not set: worker pods are created directly, without Kueue",
        )
    } else if let Some(first) = waiting.first() {
        let (reason, why) = match &first.admission {
            Admission::Evicted {
                reason: kueue_reason,
                message,
            } => (reason::EVICTED, format!("{kueue_reason}: {message}")),
            Admission::Waiting(message) => (reason::WAITING_FOR_QUOTA, message.clone()),
            _ => unreachable!("filtered above"),
        };
        Desired::new(
            ADMITTED,
            false,
            reason,
            format!(
                "{} of {desired} replicas admitted; {}: {why}",
                desired - waiting.len() as i32,
                first.name
            ),
        )
    } else {
        Desired::new(
            ADMITTED,
            true,
            reason::ADMITTED,
            format!("Kueue admitted all {desired} replicas"),
        )
    };
    let available = if ready > 0 {
        Desired::new(
            AVAILABLE,
            true,
            reason::MINIMUM_REPLICAS_AVAILABLE,
            format!("{ready} of {desired} workers ready"),
        )
    } else if desired == 0 {
        Desired::new(
            AVAILABLE,
            false,
            reason::SCALED_TO_ZERO,
            "spec.replicas is 0",
        )
        .warning()
    } else {
        Desired::new(
            AVAILABLE,
            false,
            reason::NO_READY_REPLICAS,
            format!("0 of {desired} workers ready"),
        )
        .warning()
    };
    let progressing = if ready == desired {
        Desired::new(
            PROGRESSING,
            false,
            reason::REPLICAS_READY,
            format!("{ready} of {desired} workers ready"),
        )
    } else if !waiting.is_empty() {
        Desired::new(
            PROGRESSING,
            true,
            reason::WAITING_FOR_ADMISSION,
            format!("{} replicas wait for Kueue", waiting.len()),
        )
    } else {
        Desired::new(
            PROGRESSING,
            true,
            reason::REPLICAS_STARTING,
            format!("{ready} of {desired} workers ready"),
        )
    };
    let failures: Vec<&str> = replicas
        .iter()
        .filter_map(|r| r.pod.as_ref()?.failure.as_deref())
        .collect();
    let degraded = if failures.is_empty() {
        Desired::new(DEGRADED, false, reason::AS_EXPECTED, "no worker is failing")
    } else {
        Desired::new(DEGRADED, true, reason::POD_FAILING, failures.join("; ")).warning()
    };
    (vec![admitted, available, progressing, degraded], ready)
}

/// The conditions of a pool whose queue names Kueue on a cluster without it.
pub fn kueue_missing(queue: &str) -> Vec<Desired> {
    not_admissible(
        reason::KUEUE_NOT_INSTALLED,
        format!(
            "spec.queueName {queue} needs Kueue (workloads.kueue.x-k8s.io), which this cluster does not serve: install Kueue or remove spec.queueName"
        ),
        "waiting for Kueue to be installed",
    )
}

/// The conditions of a pool whose spec.priorityClassName names no PriorityClass: the API
/// server refuses its pods and Kueue its Workloads until the class exists.
pub fn priority_class_missing(class: &str) -> Vec<Desired> {
    not_admissible(
        reason::PRIORITY_CLASS_NOT_FOUND,
        format!(
            "spec.priorityClassName {class} names no PriorityClass (scheduling.k8s.io/v1): create it, or set spec.priorityClassName to one that exists"
        ),
        format!("waiting for PriorityClass {class}"),
    )
}

/// A pool whose workers cannot be admitted until something outside it changes.
fn not_admissible(reason: &'static str, why: String, waiting: impl Into<String>) -> Vec<Desired> {
    vec![
        Desired::new(ADMITTED, false, reason, why),
        Desired::new(
            AVAILABLE,
            false,
            reason::NO_READY_REPLICAS,
            "no worker runs until it can be admitted",
        )
        .warning(),
        Desired::new(PROGRESSING, false, reason, waiting),
        Desired::new(DEGRADED, false, reason::AS_EXPECTED, "no worker is failing"),
    ]
}

/// The conditions of a pool whose spec cannot run: it waits for an edit.
pub fn invalid(message: String) -> Vec<Desired> {
    stopped(
        reason::INVALID_SPEC,
        message,
        "waiting for the spec to be fixed",
    )
}

/// The conditions of a pool one of whose children's names another object holds: the pool
/// creates nothing until it is gone or renamed.
pub fn name_conflict(object: &str) -> Vec<Desired> {
    let message = format!(
        "{object} exists and is not this pool's, so the pool does not take it over: delete it or rename the pool"
    );
    stopped(
        reason::NAME_CONFLICT,
        message,
        "waiting for the name to be free",
    )
}

/// The conditions of a pool that asks for more than the tenancy policy allows: nothing
/// is created, and it waits for an edit (or a change of the policy, at the next resync).
pub fn denied(denied: &[Denied]) -> Vec<Desired> {
    let message = format!(
        "refused by the tenancy policy: {}",
        denied
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    );
    stopped(
        reason::POLICY_DENIED,
        message,
        "waiting for the spec to be fixed",
    )
}

/// A pool that runs nothing for `reason`: unavailable and degraded with `message`, not
/// progressing while it waits for `waiting`.
fn stopped(reason: &'static str, message: String, waiting: &str) -> Vec<Desired> {
    vec![
        Desired::new(AVAILABLE, false, reason, message.clone()).warning(),
        Desired::new(PROGRESSING, false, reason, waiting),
        Desired::new(DEGRADED, true, reason, message).warning(),
    ]
}

/// The conditions of an external pool from its last probe, and why it failed if it did.
pub fn external(url: &str, model: &str, failed: Option<&ProbeError>) -> Vec<Desired> {
    let admitted = Desired::new(
        ADMITTED,
        true,
        reason::NO_QUEUE,
        "an external pool runs no pods",
    );
    match failed {
        None => vec![
            admitted,
            Desired::new(
                AVAILABLE,
                true,
                reason::ENDPOINT_SERVES_MODEL,
                format!("{url} serves {model}"),
            ),
            Desired::new(DEGRADED, false, reason::AS_EXPECTED, "the endpoint answers"),
        ],
        Some(err) => {
            let why = telemetry::chain(err);
            let reason = match err {
                ProbeError::Key(_) => reason::API_KEY_UNAVAILABLE,
                _ => reason::ENDPOINT_UNAVAILABLE,
            };
            vec![
                admitted,
                Desired::new(AVAILABLE, false, reason, why.clone()).warning(),
                Desired::new(DEGRADED, true, reason, why).warning(),
            ]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kueue::Admission;
    use crate::pool_contract::PodHealth;

    fn replica(name: &str, admission: Admission, ready: Option<bool>) -> Replica {
        Replica {
            name: name.to_owned(),
            admission,
            pod: ready.map(|ready| PodHealth {
                ready,
                failure: None,
            }),
        }
    }

    fn find<'a>(conditions: &'a [Desired], type_: &str) -> &'a Desired {
        conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn waiting_for_quota_carries_kueues_message() {
        let replicas = [
            replica("p-0", Admission::Admitted, Some(true)),
            replica(
                "p-1",
                Admission::Waiting("couldn't assign flavors to pod set worker: insufficient unused quota for nvidia.com/gpu in flavor h100, 1 more needed".to_owned()),
                None,
            ),
        ];
        let (conditions, ready) = workers(2, true, &replicas);
        assert_eq!(ready, 1);
        let admitted = find(&conditions, ADMITTED);
        assert!(!admitted.status);
        assert_eq!(admitted.reason, "WaitingForQuota");
        assert!(
            admitted
                .message
                .contains("1 of 2 replicas admitted; p-1: couldn't assign flavors"),
            "{}",
            admitted.message
        );
        assert!(find(&conditions, AVAILABLE).status);
        assert_eq!(find(&conditions, PROGRESSING).reason, "WaitingForAdmission");
    }

    #[test]
    fn eviction_is_named_in_admitted() {
        let replicas = [replica(
            "p-0",
            Admission::Evicted {
                reason: "Preempted".to_owned(),
                message: "Preempted to accommodate a workload (UID: 1) due to prioritization in the ClusterQueue".to_owned(),
            },
            Some(false),
        )];
        let (conditions, _) = workers(1, true, &replicas);
        let admitted = find(&conditions, ADMITTED);
        assert_eq!(admitted.reason, "Evicted");
        assert!(
            admitted
                .message
                .contains("p-0: Preempted: Preempted to accommodate")
        );
        assert!(!find(&conditions, AVAILABLE).status);
    }

    #[test]
    fn all_ready_without_a_queue() {
        let replicas = [
            replica("p-0", Admission::Direct, Some(true)),
            replica("p-1", Admission::Direct, Some(true)),
        ];
        let (conditions, ready) = workers(2, false, &replicas);
        assert_eq!(ready, 2);
        assert_eq!(find(&conditions, ADMITTED).reason, "NoQueue");
        assert!(!find(&conditions, PROGRESSING).status);
        assert!(!find(&conditions, DEGRADED).status);
    }

    #[test]
    fn an_unavailable_or_degraded_pool_is_announced_as_a_warning() {
        use crate::conditions::Notice;
        let healthy = [replica("p-0", Admission::Direct, Some(true))];
        let (conditions, _) = workers(1, false, &healthy);
        assert!(conditions.iter().all(|c| c.notice == Notice::Normal));
        let failing = [Replica {
            name: "p-0".to_owned(),
            admission: Admission::Direct,
            pod: Some(PodHealth {
                ready: false,
                failure: Some("p-0: CrashLoopBackOff".to_owned()),
            }),
        }];
        let (conditions, _) = workers(1, false, &failing);
        assert_eq!(find(&conditions, AVAILABLE).notice, Notice::Warning);
        assert_eq!(find(&conditions, DEGRADED).notice, Notice::Warning);
        assert_eq!(find(&conditions, PROGRESSING).notice, Notice::Normal);
    }
}
