//! What a ModelPool's status says, decided from what its children report. Pure.

use k8s_openapi::api::core::v1::Pod;

use super::build::WORKER_CONTAINER;
use crate::controllers::conditions::Desired;

pub const ADMITTED: &str = "Admitted";
pub const AVAILABLE: &str = "Available";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

/// Where one replica stands with Kueue.
#[derive(Clone, Debug, PartialEq)]
pub enum Admission {
    /// No queue: the pod is created directly.
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

/// How a worker pod is doing.
#[derive(Clone, Debug, PartialEq)]
pub struct PodHealth {
    pub ready: bool,
    /// Why the pod cannot become ready, as `pod: Reason: message`.
    pub failure: Option<String>,
}

/// One replica: its admission and its pod.
#[derive(Clone, Debug, PartialEq)]
pub struct Replica {
    pub name: String,
    pub admission: Admission,
    pub pod: Option<PodHealth>,
}

/// Container waiting reasons that do not fix themselves.
const STUCK: &[&str] = &[
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

pub fn pod_health(pod: &Pod) -> PodHealth {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let Some(status) = &pod.status else {
        return PodHealth {
            ready: false,
            failure: None,
        };
    };
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    let worker = status
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == WORKER_CONTAINER);
    let mut failure = None;
    if let Some(worker) = worker {
        let waiting = worker.state.as_ref().and_then(|s| s.waiting.as_ref());
        if let Some(waiting) =
            waiting.filter(|w| STUCK.contains(&w.reason.as_deref().unwrap_or("")))
        {
            // The worker's own last words (its termination message) say more than the
            // kubelet's back-off text.
            let last_words = worker
                .last_state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .and_then(|t| t.message.as_deref())
                .and_then(|m| m.lines().rev().find(|l| !l.trim().is_empty()))
                .map(str::trim);
            let detail = last_words.or(waiting.message.as_deref()).unwrap_or("");
            failure = Some(join(&name, waiting.reason.as_deref().unwrap_or(""), detail));
        }
    }
    if failure.is_none() && status.phase.as_deref() == Some("Failed") {
        failure = Some(join(
            &name,
            status.reason.as_deref().unwrap_or("Failed"),
            status.message.as_deref().unwrap_or(""),
        ));
    }
    if failure.is_none()
        && let Some(unschedulable) = status.conditions.iter().flatten().find(|c| {
            c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable")
        })
    {
        failure = Some(join(
            &name,
            "Unschedulable",
            unschedulable.message.as_deref().unwrap_or(""),
        ));
    }
    PodHealth { ready, failure }
}

fn join(pod: &str, reason: &str, detail: &str) -> String {
    if detail.is_empty() {
        format!("{pod}: {reason}")
    } else {
        format!("{pod}: {reason}: {detail}")
    }
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
            "NoQueue",
            "spec.queueName is not set: worker pods are created directly, without Kueue",
        )
    } else if let Some(first) = waiting.first() {
        let (reason, why) = match &first.admission {
            Admission::Evicted { reason, message } => ("Evicted", format!("{reason}: {message}")),
            Admission::Waiting(message) => ("WaitingForQuota", message.clone()),
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
            "Admitted",
            format!("Kueue admitted all {desired} replicas"),
        )
    };
    let available = if ready > 0 {
        Desired::new(
            AVAILABLE,
            true,
            "MinimumReplicasAvailable",
            format!("{ready} of {desired} workers ready"),
        )
    } else if desired == 0 {
        Desired::new(AVAILABLE, false, "ScaledToZero", "spec.replicas is 0")
    } else {
        Desired::new(
            AVAILABLE,
            false,
            "NoReadyReplicas",
            format!("0 of {desired} workers ready"),
        )
    };
    let progressing = if ready == desired {
        Desired::new(
            PROGRESSING,
            false,
            "ReplicasReady",
            format!("{ready} of {desired} workers ready"),
        )
    } else if !waiting.is_empty() {
        Desired::new(
            PROGRESSING,
            true,
            "WaitingForAdmission",
            format!("{} replicas wait for Kueue", waiting.len()),
        )
    } else {
        Desired::new(
            PROGRESSING,
            true,
            "ReplicasStarting",
            format!("{ready} of {desired} workers ready"),
        )
    };
    let failures: Vec<&str> = replicas
        .iter()
        .filter_map(|r| r.pod.as_ref()?.failure.as_deref())
        .collect();
    let degraded = if failures.is_empty() {
        Desired::new(DEGRADED, false, "AsExpected", "no worker is failing")
    } else {
        Desired::new(DEGRADED, true, "PodFailing", failures.join("; "))
    };
    (vec![admitted, available, progressing, degraded], ready)
}

/// The conditions of a pool whose queue names Kueue on a cluster without it.
pub fn kueue_missing(queue: &str) -> Vec<Desired> {
    not_admissible(
        "KueueNotInstalled",
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
        "PriorityClassNotFound",
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
            "NoReadyReplicas",
            "no worker runs until it can be admitted",
        ),
        Desired::new(PROGRESSING, false, reason, waiting),
        Desired::new(DEGRADED, false, "AsExpected", "no worker is failing"),
    ]
}

/// The conditions of a pool whose spec cannot run: it waits for an edit.
pub fn invalid(message: String) -> Vec<Desired> {
    vec![
        Desired::new(AVAILABLE, false, "InvalidSpec", message.clone()),
        Desired::new(
            PROGRESSING,
            false,
            "InvalidSpec",
            "waiting for the spec to be fixed",
        ),
        Desired::new(DEGRADED, true, "InvalidSpec", message),
    ]
}

/// The conditions of an external pool from its last probe.
pub fn external(url: &str, model: &str, probe: Result<(), String>) -> Vec<Desired> {
    let admitted = Desired::new(ADMITTED, true, "NoQueue", "an external pool runs no pods");
    match probe {
        Ok(()) => vec![
            admitted,
            Desired::new(
                AVAILABLE,
                true,
                "EndpointServesModel",
                format!("{url} serves {model}"),
            ),
            Desired::new(DEGRADED, false, "AsExpected", "the endpoint answers"),
        ],
        Err(why) => vec![
            admitted,
            Desired::new(AVAILABLE, false, "EndpointUnavailable", why.clone()),
            Desired::new(DEGRADED, true, "EndpointUnavailable", why),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus,
        PodCondition, PodStatus,
    };

    fn crashing(message: &str) -> Pod {
        Pod {
            metadata: kube::api::ObjectMeta {
                name: Some("gemma-1".to_owned()),
                ..Default::default()
            },
            spec: None,
            status: Some(PodStatus {
                phase: Some("Running".to_owned()),
                container_statuses: Some(vec![ContainerStatus {
                    name: WORKER_CONTAINER.to_owned(),
                    state: Some(ContainerState {
                        waiting: Some(ContainerStateWaiting {
                            reason: Some("CrashLoopBackOff".to_owned()),
                            message: Some("back-off 5m0s restarting failed container".to_owned()),
                        }),
                        ..Default::default()
                    }),
                    last_state: Some(ContainerState {
                        terminated: Some(ContainerStateTerminated {
                            exit_code: 1,
                            message: Some(message.to_owned()),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_crash_loop_is_reported_with_the_workers_last_words() {
        let health = pod_health(&crashing(
            "loading\ninference-worker: model file not found: /models/g.gguf\n",
        ));
        assert!(!health.ready);
        assert_eq!(
            health.failure.as_deref(),
            Some(
                "gemma-1: CrashLoopBackOff: inference-worker: model file not found: /models/g.gguf"
            )
        );
        let health = pod_health(&crashing(""));
        assert_eq!(
            health.failure.as_deref(),
            Some("gemma-1: CrashLoopBackOff: back-off 5m0s restarting failed container")
        );
    }

    #[test]
    fn an_unschedulable_pod_says_why() {
        let pod = Pod {
            metadata: kube::api::ObjectMeta {
                name: Some("gemma-0".to_owned()),
                ..Default::default()
            },
            spec: None,
            status: Some(PodStatus {
                phase: Some("Pending".to_owned()),
                conditions: Some(vec![PodCondition {
                    type_: "PodScheduled".to_owned(),
                    status: "False".to_owned(),
                    reason: Some("Unschedulable".to_owned()),
                    message: Some(
                        "0/6 nodes are available: 6 Insufficient nvidia.com/gpu.".to_owned(),
                    ),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        };
        assert_eq!(
            pod_health(&pod).failure.as_deref(),
            Some("gemma-0: Unschedulable: 0/6 nodes are available: 6 Insufficient nvidia.com/gpu.")
        );
    }

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
}
