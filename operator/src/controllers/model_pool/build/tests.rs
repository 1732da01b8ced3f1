//! The builders, object by object.
use k8s_openapi::api::core::v1::Toleration;

use super::*;
use crate::api::ModelPoolSpec;
use crate::controllers::children::built_hash;

fn settings() -> Settings {
    Settings {
        worker_image: "ghcr.io/kubeswarm/inference-worker:0.1.0".to_owned(),
        operator_namespace: "kubeswarm-system".to_owned(),
        operator_labels: BTreeMap::from([(
            "app.kubernetes.io/name".to_owned(),
            "kubeswarm".to_owned(),
        )]),
        tenancy: Default::default(),
        api_key_role: "kubeswarm-api-keys".to_owned(),
        worker_key: "a key of at least thirty-two characters".to_owned(),
        models_limit: crate::swarm::endpoint::MAX_MODELS_BYTES,
    }
}

fn pool(yaml: &str) -> ModelPool {
    let spec: ModelPoolSpec = serde_yaml_ng::from_str(yaml).unwrap();
    let mut pool = ModelPool::new("gemma", spec);
    pool.metadata.namespace = Some("team-a".to_owned());
    pool.metadata.uid = Some("0f4c-uid".to_owned());
    pool
}

const GGUF_ON_PVC: &str = "
model: {source: pvc://weights/gemma/gemma-3-27b-q4.gguf}
replicas: 2
resources: {gpus: 2, memory: 64Gi, cpu: '8'}
engine: {maxConcurrentSequences: 16, kvCacheMemoryPercent: 80, maxContextTokens: 32768}
priorityClassName: high
queueName: team-a
template:
  nodeSelector: {pool: inference}
  env: [{name: HF_HUB_OFFLINE, value: '1'}]
";

fn worker(pod: &Pod) -> &Container {
    &pod.spec.as_ref().unwrap().containers[0]
}

#[test]
fn a_worker_pod_asks_for_its_gpus_and_loads_from_the_claim_read_only() {
    let pool = pool(GGUF_ON_PVC);
    let template = worker_template(&pool, &settings()).unwrap();
    let pod = pod(&pool, &template, 1, &Placement::default());
    let c = worker(&pod);
    let limits = c.resources.as_ref().unwrap().limits.as_ref().unwrap();
    let requests = c.resources.as_ref().unwrap().requests.as_ref().unwrap();
    assert_eq!(limits["nvidia.com/gpu"], Quantity("2".to_owned()));
    assert_eq!(requests["nvidia.com/gpu"], Quantity("2".to_owned()));
    assert_eq!(limits["memory"], Quantity("64Gi".to_owned()));
    assert_eq!(requests["cpu"], Quantity("8".to_owned()));
    assert!(
        !limits.contains_key("cpu"),
        "no CPU limit: throttling a worker only slows decoding"
    );
    assert_eq!(
        c.args.as_ref().unwrap(),
        &[
            "--model-path=/models/gemma/gemma-3-27b-q4.gguf",
            "--served-model-name=gemma",
            "--listen=0.0.0.0:8000",
            "--max-seqs=16",
            "--prefix-cache-sequences=16",
            "--max-tokens-cap=32768",
            "--kv-cache-memory-percent=80",
            "--max-prompt-tokens=32768",
        ]
    );
    let spec = pod.spec.as_ref().unwrap();
    let claim = spec.volumes.as_ref().unwrap()[0]
        .persistent_volume_claim
        .as_ref()
        .unwrap();
    assert_eq!(claim.claim_name, "weights");
    assert_eq!(claim.read_only, Some(true));
    assert_eq!(c.volume_mounts.as_ref().unwrap()[0].read_only, Some(true));
    assert_eq!(spec.priority_class_name.as_deref(), Some("high"));
    assert_eq!(spec.node_selector.as_ref().unwrap()["pool"], "inference");
    assert_eq!(spec.hostname.as_deref(), Some("gemma-1"));
    assert_eq!(spec.subdomain.as_deref(), Some("gemma-workers"));
    assert!(
        c.env
            .as_ref()
            .unwrap()
            .iter()
            .any(|e| e.name == "HF_HUB_OFFLINE")
    );
    assert_eq!(
        c.image.as_deref(),
        Some("ghcr.io/kubeswarm/inference-worker:0.1.0")
    );
    assert_eq!(pod.metadata.name.as_deref(), Some("gemma-1"));
    assert_eq!(pod.metadata.labels.as_ref().unwrap()[REPLICA_LABEL], "1");
}

#[test]
fn probes_cover_loading_and_the_grace_period_covers_the_drain() {
    let pool = pool(GGUF_ON_PVC);
    let pod = pod(
        &pool,
        &worker_template(&pool, &settings()).unwrap(),
        0,
        &Placement::default(),
    );
    let c = worker(&pod);
    let path = |p: &Option<Probe>| {
        p.as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .clone()
            .unwrap()
    };
    assert_eq!(path(&c.liveness_probe), "/health");
    assert_eq!(path(&c.readiness_probe), "/ready");
    assert_eq!(path(&c.startup_probe), "/health");
    let startup = c.startup_probe.as_ref().unwrap();
    let budget = startup.period_seconds.unwrap() * startup.failure_threshold.unwrap();
    assert!(
        budget >= 1800,
        "a large model gets 30 minutes to load, got {budget}s"
    );
    let grace = pod
        .spec
        .as_ref()
        .unwrap()
        .termination_grace_period_seconds
        .unwrap();
    assert!(
        grace > 30,
        "the worker drains for 30 s after SIGTERM; grace {grace}s"
    );
}

#[test]
fn the_security_context_is_restricted() {
    let pool = pool(GGUF_ON_PVC);
    let pod = pod(
        &pool,
        &worker_template(&pool, &settings()).unwrap(),
        0,
        &Placement::default(),
    );
    let spec = pod.spec.as_ref().unwrap();
    let psc = spec.security_context.as_ref().unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(
        psc.seccomp_profile.as_ref().unwrap().type_,
        "RuntimeDefault"
    );
    let sc = worker(&pod).security_context.as_ref().unwrap();
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_ref().unwrap(),
        &["ALL"]
    );
    assert_eq!(spec.automount_service_account_token, Some(false));
}

#[test]
fn kueues_placement_adds_the_flavors_labels_and_tolerations() {
    let pool = pool(GGUF_ON_PVC);
    let template = worker_template(&pool, &settings()).unwrap();
    let placement = Placement {
        node_labels: BTreeMap::from([("gpu.nvidia.com/class".to_owned(), "H100".to_owned())]),
        tolerations: vec![Toleration {
            key: Some("nvidia.com/gpu".to_owned()),
            operator: Some("Exists".to_owned()),
            effect: Some("NoSchedule".to_owned()),
            ..Toleration::default()
        }],
    };
    let placed = pod(&pool, &template, 0, &placement);
    let spec = placed.spec.as_ref().unwrap();
    let selector = spec.node_selector.as_ref().unwrap();
    assert_eq!(selector["gpu.nvidia.com/class"], "H100");
    assert_eq!(
        selector["pool"], "inference",
        "the pool's own selector stays"
    );
    assert_eq!(spec.tolerations.as_ref().unwrap(), &placement.tolerations);
    let unplaced = pod(&pool, &template, 0, &Placement::default());
    assert_ne!(
        built_hash(&placed),
        built_hash(&unplaced),
        "a new placement is a new pod"
    );
}

#[test]
fn a_workload_per_replica_carries_the_template_queue_and_priority() {
    let pool = pool(GGUF_ON_PVC);
    let template = worker_template(&pool, &settings()).unwrap();
    let wl = workload(&pool, &template, 1, Some(1000));
    assert_eq!(wl.metadata.name.as_deref(), Some("gemma-1"));
    assert_eq!(wl.spec.queue_name.as_deref(), Some("team-a"));
    assert_eq!(wl.spec.priority_class_name.as_deref(), Some("high"));
    assert_eq!(wl.spec.priority, Some(1000));
    assert_eq!(
        wl.spec.priority_class_source,
        Some(WorkloadPriorityClassSource::SchedulingK8sIoPriorityclass)
    );
    assert_eq!(wl.spec.pod_sets.len(), 1);
    assert_eq!(wl.spec.pod_sets[0].count, 1);
    assert_eq!(wl.spec.pod_sets[0].template, template);
    let owner = &wl.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("ModelPool", "gemma", Some(true))
    );
    let json = serde_json::to_value(&wl).unwrap();
    assert_eq!(
        json["spec"]["podSets"][0]["template"]["spec"]["containers"][0]["name"],
        "worker"
    );
}

#[test]
fn service_and_network_policy_admit_only_the_operator() {
    let pool = pool(GGUF_ON_PVC);
    let svc = service(&pool);
    let spec = svc.spec.as_ref().unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
    assert_eq!(spec.selector.as_ref().unwrap()[POOL_LABEL], "gemma");
    let np = network_policy(&pool, &settings());
    let rule = &np.spec.as_ref().unwrap().ingress.as_ref().unwrap()[0];
    let peer = &rule.from.as_ref().unwrap()[0];
    assert_eq!(
        peer.namespace_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap()["kubernetes.io/metadata.name"],
        "kubeswarm-system"
    );
    assert_eq!(
        peer.pod_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap()["app.kubernetes.io/name"],
        "kubeswarm"
    );
    assert_eq!(
        rule.ports.as_ref().unwrap()[0].port,
        Some(IntOrString::Int(WORKER_PORT))
    );
    for owners in [
        &svc.metadata.owner_references,
        &np.metadata.owner_references,
    ] {
        assert_eq!(owners.as_ref().unwrap()[0].uid, "0f4c-uid");
    }
}

#[test]
fn a_file_source_mounts_the_directory_and_cpu_pools_ask_for_no_gpu() {
    let pool = pool("model: {source: 'file:///var/lib/models/smollm2.gguf'}\nresources: {gpus: 0}");
    let pod = pod(
        &pool,
        &worker_template(&pool, &settings()).unwrap(),
        0,
        &Placement::default(),
    );
    let host = pod.spec.as_ref().unwrap().volumes.as_ref().unwrap()[0]
        .host_path
        .clone()
        .unwrap();
    assert_eq!(host.path, "/var/lib/models");
    let c = worker(&pod);
    let args = c.args.as_ref().unwrap();
    assert!(args.contains(&"--model-path=/models/smollm2.gguf".to_owned()));
    assert!(args.contains(&"--cpu".to_owned()));
    assert!(
        c.resources
            .as_ref()
            .unwrap()
            .limits
            .as_ref()
            .unwrap()
            .is_empty()
    );
}

#[test]
fn a_hub_source_waits_for_an_edit_with_the_fix_in_the_message() {
    let pool = pool("model: {source: 'hf://google/gemma-3-27b-it', format: safetensors, isq: Q4K}");
    let err = worker_template(&pool, &settings()).unwrap_err();
    assert!(err.to_string().contains("pvc://claim/path"), "{err}");
}

/// Specs a tenant could write, mutated field by field: every one that deserializes goes
/// through the tenancy check and every builder without a panic, and a spec the policy
/// accepts builds pods that keep the worker's guarantees.
#[test]
fn arbitrary_specs_build_or_are_refused_never_a_panic() {
    use serde_json::{Value, json};
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
    let palette = |k: usize| -> Value {
        [
            Value::Null,
            json!(-1),
            json!(0),
            json!(i64::MAX),
            json!(""),
            json!("file:///../../etc"),
            json!("pvc://a/../../b.gguf"),
            json!("hf://x/y"),
            json!("gguf"),
            json!(["../x.gguf", "", "a\u{0}b"]),
            json!({"nvidia.com/gpu": "1"}),
            json!([{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]),
            json!("system-node-critical"),
        ][k]
            .clone()
    };
    let fields = [
        "/model/source",
        "/model/format",
        "/model/files",
        "/model/isq",
        "/replicas",
        "/resources/gpus",
        "/resources/memory",
        "/engine/maxConcurrentSequences",
        "/engine/maxContextTokens",
        "/priorityClassName",
        "/queueName",
        "/template/image",
        "/template/nodeSelector",
        "/template/tolerations",
        "/template/env",
    ];
    let base: Value = serde_json::to_value(pool(GGUF_ON_PVC).spec).unwrap();
    let (mut built, mut parsed) = (0, 0);
    for round in 0..5_000 {
        let mut spec = base.clone();
        for _ in 0..=next(3) {
            let field = fields[next(fields.len())];
            if let Some(slot) = spec.pointer_mut(field) {
                *slot = palette(next(13));
            }
        }
        let Ok(spec) = serde_json::from_value::<ModelPoolSpec>(spec) else {
            continue;
        };
        parsed += 1;
        let mut pool = ModelPool::new("gemma", spec);
        pool.metadata.namespace = Some("team-a".to_owned());
        pool.metadata.uid = Some("0f4c-uid".to_owned());
        let settings = Settings {
            tenancy: crate::tenancy::Policy {
                host_paths: vec!["/models".to_owned()],
                priority_classes: vec!["high".to_owned()],
                ..Default::default()
            },
            ..settings()
        };
        let denied = settings.tenancy.check(&pool.spec, &settings.worker_image);
        let _ = service(&pool);
        let _ = network_policy(&pool, &settings);
        let Ok(template) = worker_template(&pool, &settings) else {
            continue;
        };
        let pod = pod(&pool, &template, 0, &Placement::default());
        let _ = workload(&pool, &template, 0, Some(1_000));
        if denied.is_empty() {
            built += 1;
            let c = worker(&pod);
            let security = c.security_context.as_ref().unwrap();
            assert_eq!(
                security.allow_privilege_escalation,
                Some(false),
                "round {round}"
            );
            for volume in pod.spec.as_ref().unwrap().volumes.iter().flatten() {
                if let Some(host) = &volume.host_path {
                    assert!(
                        host.path.starts_with("/models") && !host.path.contains(".."),
                        "round {round}: {}",
                        host.path
                    );
                }
            }
        }
    }
    assert!(
        parsed > 1_000 && built > 100,
        "{parsed} parsed, {built} built"
    );
}
