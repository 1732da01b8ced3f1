//! The children of a ModelPool, built from its spec alone: worker pods, the headless
//! Service, the NetworkPolicy and the Kueue Workloads. Pure functions, no client.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, HTTPGetAction, HostPathVolumeSource,
    PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, SecurityContext, Service, ServicePort, ServiceSpec,
    Volume, VolumeMount,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use thiserror::Error;

use crate::api::{MAX_CALL_TOKENS, ModelFormat, ModelPool, ModelSource};
use crate::controllers::children::{self, with_hash};
use crate::kueue::{
    Placement, Workload, WorkloadPodSets, WorkloadPriorityClassSource, WorkloadSpec,
};
use crate::pool_contract::{self, POOL_LABEL, TOKEN_ENV, WORKER_CONTAINER, WORKER_PORT};
use crate::tenancy::Policy;

/// Label on pods and Workloads: which replica they are.
pub const REPLICA_LABEL: &str = "kubeswarm.dev/replica";
const MODEL_MOUNT: &str = "/models";

/// What the builders need from the operator's own configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Image of the workers unless a pool's spec.template.image names another.
    pub worker_image: String,
    /// Namespace the operator runs in: the only source the workers accept traffic from.
    pub operator_namespace: String,
    /// Labels of the operator's pods, for the NetworkPolicy.
    pub operator_labels: BTreeMap<String, String>,
    /// What tenants' pools may ask for; a pool that asks for more gets no children.
    pub tenancy: Policy,
    /// The ClusterRole that, bound in a namespace, lets the operator read the API keys
    /// of its external pools; named in the message when it is not bound.
    pub api_key_role: String,
    /// The operator's key, from which each pool's worker token is derived.
    pub worker_key: String,
    /// The most of an external endpoint's model list the probe reads.
    pub models_limit: usize,
}

/// A spec the builders cannot turn into pods; the pool waits for an edit.
#[derive(Debug, Error, PartialEq)]
pub enum InvalidSpec {
    #[error(
        "spec.model.source {0} needs a hub download, and workers load only local files: copy the weights into a PersistentVolumeClaim and use pvc://claim/path, or a node path with file:///"
    )]
    HubSource(String),
    #[error("spec.model.source {0} is not a file:///, pvc:// or hf:// URL")]
    Source(String),
}

/// Where the worker finds the weights, and the volume that holds them.
struct ModelVolume {
    volume: Volume,
    /// --model-path inside the container.
    path: String,
}

fn model_volume(source: &ModelSource) -> Result<ModelVolume, InvalidSpec> {
    let volume = |name: &str| Volume {
        name: name.to_owned(),
        ..Volume::default()
    };
    if let Some(rest) = source.source.strip_prefix("pvc://") {
        let (claim, path) = rest.split_once('/').unwrap_or((rest, ""));
        return Ok(ModelVolume {
            volume: Volume {
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim.to_owned(),
                    read_only: Some(true),
                }),
                ..volume("model")
            },
            path: format!("{MODEL_MOUNT}/{path}")
                .trim_end_matches('/')
                .to_owned(),
        });
    }
    if let Some(path) = source.source.strip_prefix("file://") {
        // The whole directory is mounted, so a path to a file mounts its parent.
        let is_file = source.format != Some(ModelFormat::Safetensors)
            && source.files.is_none()
            && path.ends_with(".gguf");
        let (dir, file) = match (is_file, path.rsplit_once('/')) {
            (true, Some((dir, file))) => (if dir.is_empty() { "/" } else { dir }, Some(file)),
            _ => (path, None),
        };
        return Ok(ModelVolume {
            volume: Volume {
                host_path: Some(HostPathVolumeSource {
                    path: dir.to_owned(),
                    type_: Some("Directory".to_owned()),
                }),
                ..volume("model")
            },
            path: match file {
                Some(file) => format!("{MODEL_MOUNT}/{file}"),
                None => MODEL_MOUNT.to_owned(),
            },
        });
    }
    if source.source.starts_with("hf://") {
        return Err(InvalidSpec::HubSource(source.source.clone()));
    }
    Err(InvalidSpec::Source(source.source.clone()))
}

/// The worker's command line, from the pool's spec.
fn worker_args(pool: &ModelPool, source: &ModelSource, model_path: &str) -> Vec<String> {
    let engine = &pool.spec.engine;
    let mut args = vec![
        format!("--model-path={model_path}"),
        format!("--served-model-name={}", pool.name_any()),
        format!("--listen=0.0.0.0:{WORKER_PORT}"),
        format!("--max-seqs={}", engine.max_concurrent_sequences),
        format!("--prefix-cache-sequences={}", engine.prefix_cache_sequences),
        // The worker refuses a call whose max_tokens is over its cap (4096 unless told),
        // and a job may ask for up to the CRDs' bound: the two agree, or every call of a
        // job with a larger maxTokens fails.
        format!("--max-tokens-cap={MAX_CALL_TOKENS}"),
    ];
    if let Some(format) = source.format {
        args.push(format!(
            "--format={}",
            match format {
                ModelFormat::Gguf => "gguf",
                ModelFormat::Safetensors => "safetensors",
            }
        ));
    }
    for file in source.files.iter().flatten() {
        args.push(format!("--gguf-file={file}"));
    }
    if let Some(isq) = source.isq {
        let name = serde_json::to_value(isq).expect("an enum serializes");
        args.push(format!("--isq={}", name.as_str().unwrap_or_default()));
    }
    if let Some(percent) = engine.kv_cache_memory_percent {
        args.push(format!("--kv-cache-memory-percent={percent}"));
    }
    if let Some(tokens) = engine.max_context_tokens {
        args.push(format!("--max-prompt-tokens={tokens}"));
    }
    if pool.spec.resources.gpus == 0 {
        args.push("--cpu".to_owned());
    }
    args
}

fn probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("http".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

/// Labels every child of the pool carries.
pub fn pool_labels(pool: &ModelPool) -> BTreeMap<String, String> {
    children::labels([
        ("app.kubernetes.io/name", "inference-worker".to_owned()),
        (POOL_LABEL, pool.name_any()),
    ])
}

fn meta(pool: &ModelPool, name: String, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: pool.namespace(),
        labels: Some(labels),
        owner_references: Some(vec![children::controller_owner(pool)]),
        ..ObjectMeta::default()
    }
}

/// The pod template of one worker, before any placement Kueue decides.
pub fn worker_template(
    pool: &ModelPool,
    settings: &Settings,
) -> Result<PodTemplateSpec, InvalidSpec> {
    let Some(source) = &pool.spec.model else {
        return Err(InvalidSpec::Source(String::new()));
    };
    let model = model_volume(source)?;
    let resources = &pool.spec.resources;
    let mut limits = BTreeMap::new();
    if resources.gpus > 0 {
        limits.insert(
            resources.gpu_resource_name.clone(),
            Quantity(resources.gpus.to_string()),
        );
    }
    if let Some(memory) = &resources.memory {
        limits.insert("memory".to_owned(), memory.clone());
    }
    let mut requests = limits.clone();
    if let Some(cpu) = &resources.cpu {
        requests.insert("cpu".to_owned(), cpu.clone());
    }
    let template = pool.spec.template.clone().unwrap_or_default();
    let mut env = vec![EnvVar {
        name: "RUST_LOG".to_owned(),
        value: Some("info".to_owned()),
        ..EnvVar::default()
    }];
    env.extend(template.env);
    // Last, so that no entry of the template's can replace it.
    env.push(EnvVar {
        name: TOKEN_ENV.to_owned(),
        value: Some(pool_contract::worker_token(
            settings.worker_key.as_bytes(),
            pool,
        )),
        ..EnvVar::default()
    });
    let container = Container {
        name: WORKER_CONTAINER.to_owned(),
        image: Some(
            template
                .image
                .unwrap_or_else(|| settings.worker_image.clone()),
        ),
        args: Some(worker_args(pool, source, &model.path)),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("http".to_owned()),
            container_port: WORKER_PORT,
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        resources: Some(ResourceRequirements {
            limits: Some(limits),
            requests: Some(requests),
            ..ResourceRequirements::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: model.volume.name.clone(),
                mount_path: MODEL_MOUNT.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            // The root filesystem is read-only; the worker re-encodes GGUF tensors for the
            // CPU into its scratch directory.
            VolumeMount {
                name: "scratch".to_owned(),
                mount_path: "/tmp".to_owned(),
                ..VolumeMount::default()
            },
        ]),
        // Loading a large model takes minutes: 30 minutes before liveness counts.
        startup_probe: Some(probe("/health", 10, 180)),
        liveness_probe: Some(probe("/health", 10, 3)),
        readiness_probe: Some(probe("/ready", 5, 2)),
        // The worker's one-line load error ends up in the pod's status, where the pool's
        // Degraded condition reads it.
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    let scratch = Volume {
        name: "scratch".to_owned(),
        empty_dir: Some(Default::default()),
        ..Volume::default()
    };
    Ok(PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(pool_labels(pool)),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            containers: vec![container],
            volumes: Some(vec![model.volume, scratch]),
            node_selector: (!template.node_selector.is_empty()).then_some(template.node_selector),
            tolerations: (!template.tolerations.is_empty()).then_some(template.tolerations),
            priority_class_name: pool.spec.priority_class_name.clone(),
            // The worker drains for up to 30 s after SIGTERM; the rest is margin.
            termination_grace_period_seconds: Some(45),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(65532),
                run_as_group: Some(65532),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".to_owned(),
                    ..SeccompProfile::default()
                }),
                ..PodSecurityContext::default()
            }),
            ..PodSpec::default()
        }),
    })
}

/// Name of replica `index`'s pod, and of its Workload.
pub fn replica_name(pool: &ModelPool, index: i32) -> String {
    format!("{}-{index}", pool.name_any())
}

/// Name of the pool's headless Service, the pods' subdomain.
pub fn service_name(pool: &ModelPool) -> String {
    format!("{}-workers", pool.name_any())
}

fn replica_labels(pool: &ModelPool, index: i32) -> BTreeMap<String, String> {
    let mut labels = pool_labels(pool);
    labels.insert(REPLICA_LABEL.to_owned(), index.to_string());
    labels
}

/// Worker pod `index`, placed where Kueue admitted it (or anywhere without Kueue).
pub fn pod(pool: &ModelPool, template: &PodTemplateSpec, index: i32, placement: &Placement) -> Pod {
    let mut spec = template.spec.clone().unwrap_or_default();
    if !placement.node_labels.is_empty() {
        spec.node_selector
            .get_or_insert_with(BTreeMap::new)
            .extend(placement.node_labels.clone());
    }
    if !placement.tolerations.is_empty() {
        spec.tolerations
            .get_or_insert_with(Vec::new)
            .extend(placement.tolerations.clone());
    }
    let name = replica_name(pool, index);
    spec.hostname = Some(name.clone());
    spec.subdomain = Some(service_name(pool));
    Pod {
        metadata: with_hash(meta(pool, name, replica_labels(pool, index)), &spec),
        spec: Some(spec),
        status: None,
    }
}

/// The Kueue Workload that admits replica `index`.
///
/// One Workload per replica rather than one for the pool: replicas of an inference pool
/// serve independently and need no gang admission, so a pool whose quota covers two of
/// three replicas serves with two instead of waiting for all three; a resize adds or
/// deletes Workloads at the end instead of requeueing the whole pool (Kueue does not let
/// an admitted Workload's pod sets change); and a preemption takes one replica's GPUs,
/// not the pool's.
///
/// `priority` is the value of the pool's PriorityClass: Kueue orders and preempts by the
/// value, and refuses a Workload that names a class without it.
pub fn workload(
    pool: &ModelPool,
    template: &PodTemplateSpec,
    index: i32,
    priority: Option<i32>,
) -> Workload {
    let spec = WorkloadSpec {
        queue_name: pool.spec.queue_name.clone(),
        priority_class_name: pool.spec.priority_class_name.clone(),
        priority,
        priority_class_source: pool
            .spec
            .priority_class_name
            .as_ref()
            .map(|_| WorkloadPriorityClassSource::SchedulingK8sIoPriorityclass),
        pod_sets: vec![WorkloadPodSets {
            name: Some("worker".to_owned()),
            count: 1,
            min_count: None,
            template: template.clone(),
            topology_request: None,
        }],
        ..WorkloadSpec::default()
    };
    Workload {
        metadata: with_hash(
            meta(pool, replica_name(pool, index), replica_labels(pool, index)),
            &spec,
        ),
        spec,
        status: None,
    }
}

/// The headless Service that gives each worker a stable DNS name.
pub fn service(pool: &ModelPool) -> Service {
    let spec = ServiceSpec {
        cluster_ip: Some("None".to_owned()),
        selector: Some(BTreeMap::from([(POOL_LABEL.to_owned(), pool.name_any())])),
        ports: Some(vec![ServicePort {
            name: Some("http".to_owned()),
            port: WORKER_PORT,
            target_port: Some(IntOrString::String("http".to_owned())),
            protocol: Some("TCP".to_owned()),
            ..ServicePort::default()
        }]),
        // Workers are reachable by name while they load, so the operator can tell why
        // one is not ready.
        publish_not_ready_addresses: Some(true),
        ..ServiceSpec::default()
    };
    Service {
        metadata: with_hash(meta(pool, service_name(pool), pool_labels(pool)), &spec),
        spec: Some(spec),
        status: None,
    }
}

/// Only the operator may reach the workers, and only on their HTTP port.
pub fn network_policy(pool: &ModelPool, settings: &Settings) -> NetworkPolicy {
    let spec = NetworkPolicySpec {
        pod_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(POOL_LABEL.to_owned(), pool.name_any())])),
            ..LabelSelector::default()
        }),
        policy_types: Some(vec!["Ingress".to_owned()]),
        ingress: Some(vec![NetworkPolicyIngressRule {
            from: Some(vec![NetworkPolicyPeer {
                namespace_selector: Some(LabelSelector {
                    match_labels: Some(BTreeMap::from([(
                        "kubernetes.io/metadata.name".to_owned(),
                        settings.operator_namespace.clone(),
                    )])),
                    ..LabelSelector::default()
                }),
                pod_selector: Some(LabelSelector {
                    match_labels: Some(settings.operator_labels.clone()),
                    ..LabelSelector::default()
                }),
                ..NetworkPolicyPeer::default()
            }]),
            ports: Some(vec![NetworkPolicyPort {
                port: Some(IntOrString::Int(WORKER_PORT)),
                protocol: Some("TCP".to_owned()),
                ..NetworkPolicyPort::default()
            }]),
        }]),
        ..NetworkPolicySpec::default()
    };
    NetworkPolicy {
        metadata: with_hash(meta(pool, service_name(pool), pool_labels(pool)), &spec),
        spec: Some(spec),
    }
}

#[cfg(test)]
mod tests;
