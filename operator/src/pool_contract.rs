//! What a ModelPool promises its callers: the SwarmJob controller reads a pool through
//! this module alone, never through the ModelPool controller's internals.
//!
//! Layer: beside `kueue`, above `api` and `conditions`; it knows no controller.
//!
//! The promise: every worker pod of pool `P` carries the label `kubeswarm.dev/pool=P`
//! and a controller owner reference to `P`, serves the OpenAI API at
//! `http://<pod IP>:8000/v1` under the model name `P`, and is a ready replica when its
//! `Ready` condition is true. A pod with the label and another owner (or none) is anyone's
//! pod, not a replica: it never receives prompts. Its API answers only requests that carry
//! `Authorization: Bearer <worker_token>`, a token derived from the operator's key and the
//! pool, so only the operator (which holds the key) can produce it. The pool's `Available` condition is
//! true when at least one replica is ready (or, for an external pool, when its endpoint
//! answered the last probe), and its message says why not otherwise.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::ResourceExt;

use crate::api::ModelPool;

/// Label on every child of a pool: the pool it belongs to.
pub const POOL_LABEL: &str = "kubeswarm.dev/pool";
/// The workers' HTTP port.
pub const WORKER_PORT: i32 = 8000;
/// The worker's container name, which status messages about failing pods refer to.
pub const WORKER_CONTAINER: &str = "worker";
/// The pool condition that says whether callers can send it requests.
pub const AVAILABLE: &str = "Available";

/// The worker's environment variable that holds its pool's token.
pub const TOKEN_ENV: &str = "KUBESWARM_WORKER_TOKEN";

/// The bearer token of `pool`'s workers: HMAC-SHA256 of the pool's namespace, name and
/// uid under the operator's `key`, in hex. A pool deleted and created again under the same
/// name gets another.
pub fn worker_token(key: &[u8], pool: &ModelPool) -> String {
    let message = format!(
        "{}/{}/{}",
        pool.namespace().unwrap_or_default(),
        pool.name_any(),
        pool.metadata.uid.as_deref().unwrap_or_default()
    );
    hmac_sha256(key, message.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The `cache_salt` of `namespace`'s requests to shared external servers: an HMAC under
/// the operator's key, so no tenant can compute another's and share its cache.
pub fn cache_salt(key: &[u8], namespace: &str) -> String {
    hmac_sha256(key, format!("cache-salt/{namespace}").as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// HMAC-SHA256 (RFC 2104), with the sha2 crate the operator has already.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    const BLOCK: usize = 64;
    let mut block = [0u8; BLOCK];
    if key.len() > BLOCK {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.map(|b| b ^ byte);
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// The pool's `Available` condition, once the ModelPool controller has written one.
pub fn available(pool: &ModelPool) -> Option<&Condition> {
    pool.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == AVAILABLE)
}

/// Whether `object`'s controller owner reference is the object with `uid`: the only
/// proof that an object of a given name or label is the one its owner made.
pub fn controlled_by(object: &impl kube::Resource, uid: &str) -> bool {
    object
        .meta()
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && o.uid == uid)
}

/// The base URL of `pool`'s worker `pod` when it is a ready replica of that pool.
/// Pod IPs rather than the headless Service's names: they work the same in the cluster
/// and for an operator running outside it.
pub fn ready_worker_url(pod: &Pod, pool: &ModelPool) -> Option<String> {
    let name = pool.name_any();
    let uid = pool.metadata.uid.as_deref().unwrap_or_default();
    if pod.labels().get(POOL_LABEL) != Some(&name)
        || !controlled_by(pod, uid)
        || !pod_health(pod).ready
    {
        return None;
    }
    let ip = pod.status.as_ref()?.pod_ip.as_ref()?;
    Some(format!("http://{ip}:{WORKER_PORT}/v1"))
}

/// How a worker pod is doing.
#[derive(Clone, Debug, PartialEq)]
pub struct PodHealth {
    pub ready: bool,
    /// Why the pod cannot become ready, as `pod: Reason: message`.
    pub failure: Option<String>,
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
    fn the_worker_token_is_an_hmac_of_the_pool_under_the_operators_key() {
        let hex = |b: [u8; 32]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
        // RFC 4231, test cases 2 and 6 (a key longer than the block).
        assert_eq!(
            hex(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            hex(hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
        let pool = |ns: &str, uid: &str| {
            let mut p = ModelPool::new(
                "gemma",
                serde_yaml_ng::from_str("model: {source: pvc://w}").unwrap(),
            );
            p.metadata.namespace = Some(ns.to_owned());
            p.metadata.uid = Some(uid.to_owned());
            p
        };
        let token = worker_token(b"key", &pool("team-a", "u1"));
        assert_eq!(token.len(), 64);
        assert_ne!(
            token,
            worker_token(b"key", &pool("team-b", "u1")),
            "per namespace"
        );
        assert_ne!(
            token,
            worker_token(b"key", &pool("team-a", "u2")),
            "per pool object"
        );
        assert_ne!(
            token,
            worker_token(b"other", &pool("team-a", "u1")),
            "per operator key"
        );
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
}
