//! Defaults: the API server applies the CRD schema's defaults, the Rust types apply serde's,
//! and the docs state them. All three agree.

use kube::CustomResourceExt;
use kube::core::cel::apply_defaults;
use kubeswarm::api::*;
use serde_json::{Value, json};

use crate::support::{schema, walk};

fn minimal_pool() -> Value {
    json!({
        "apiVersion": "kubeswarm.dev/v1alpha1",
        "kind": "ModelPool",
        "metadata": {"name": "p", "namespace": "n"},
        "spec": {"model": {"source": "pvc://models/gemma"}}
    })
}

fn minimal_job() -> Value {
    json!({
        "apiVersion": "kubeswarm.dev/v1alpha1",
        "kind": "SwarmJob",
        "metadata": {"name": "j", "namespace": "n"},
        "spec": {"task": "t", "fanOut": {"pool": "w", "subagents": 3}, "verification": {"pool": "g"}}
    })
}

#[test]
fn pool_defaults() {
    let pool: ModelPool = serde_json::from_value(minimal_pool()).expect("minimal pool parses");
    assert_eq!(pool.spec.replicas, 1);
    assert_eq!(pool.spec.resources.gpus, 1);
    assert_eq!(pool.spec.resources.gpu_resource_name, "nvidia.com/gpu");
    assert_eq!(pool.spec.engine.max_concurrent_sequences, 32);
    assert_eq!(pool.spec.engine.prefix_cache_sequences, 16);
    assert_eq!(pool.spec.engine.kv_cache_memory_percent, None);
    assert_eq!(pool.spec.queue_name, None);
}

#[test]
fn job_defaults() {
    let job: SwarmJob = serde_json::from_value(minimal_job()).expect("minimal job parses");
    let fan_out = &job.spec.fan_out;
    assert_eq!(fan_out.max_tokens, 1024);
    assert_eq!(fan_out.temperature, 0.7);
    assert_eq!(fan_out.timeout_seconds, 300);
    assert_eq!(fan_out.retries, 2);
    assert_eq!(fan_out.max_concurrency, None);
    assert_eq!(job.spec.verification.mode, VerificationMode::Adversarial);
    assert_eq!(job.spec.verification.repair_rounds, 0);
    assert_eq!(
        job.spec.aggregation.strategy,
        AggregationStrategy::Synthesize
    );
    assert_eq!(job.spec.suspend, None);
}

/// What the API server stores after defaulting a minimal object is what serde produces
/// from the same object, so the operator and `kubectl get -o yaml` see the same values.
#[test]
fn api_server_defaults_match_serde_defaults() {
    let defaulted = apply_defaults(&schema(&ModelPool::crd()), &minimal_pool());
    let from_server: ModelPool = serde_json::from_value(defaulted).expect("defaulted pool parses");
    let from_serde: ModelPool = serde_json::from_value(minimal_pool()).expect("pool parses");
    assert_eq!(from_server, from_serde);
    assert_eq!(
        serde_json::to_value(&from_server.spec).unwrap()["resources"]["gpus"],
        1
    );

    let defaulted = apply_defaults(&schema(&SwarmJob::crd()), &minimal_job());
    let from_server: SwarmJob =
        serde_json::from_value(defaulted.clone()).expect("defaulted job parses");
    let from_serde: SwarmJob = serde_json::from_value(minimal_job()).expect("job parses");
    assert_eq!(from_server, from_serde);
    assert_eq!(defaulted["spec"]["verification"]["mode"], "adversarial");
    assert_eq!(defaulted["spec"]["aggregation"]["strategy"], "synthesize");
}

/// Every scalar default in a spec is stated in its field's description as
/// "Defaults to `value`.", which `kubectl explain` shows.
#[test]
fn defaults_are_documented() {
    for crd in [ModelPool::crd(), SwarmJob::crd()] {
        let schema = schema(&crd);
        let mut wrong = Vec::new();
        let mut seen = 0;
        walk(
            &schema["properties"]["spec"],
            "spec",
            &mut |path, node: &Value| {
                let Some(default) = node.get("default").filter(|d| !d.is_object()) else {
                    return;
                };
                seen += 1;
                let shown = default
                    .as_str()
                    .map_or_else(|| default.to_string(), str::to_owned);
                let description = node["description"]
                    .as_str()
                    .unwrap_or_default()
                    .replace('\n', " ");
                if !description.contains(&format!("Defaults to `{shown}`")) {
                    wrong.push(format!("{path}: default {shown} not in {description:?}"));
                }
            },
        );
        assert!(seen > 0, "{}: no defaults found", crd.spec.names.kind);
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }
}

fn full_job() -> SwarmJob {
    let mut job: SwarmJob = serde_json::from_value(json!({
        "apiVersion": "kubeswarm.dev/v1alpha1",
        "kind": "SwarmJob",
        "metadata": {"name": "full", "namespace": "team-a"},
        "spec": {
            "task": "t",
            "planner": {"pool": "planner", "prompt": "split it"},
            "fanOut": {"pool": "w", "subagents": 2, "maxConcurrency": 1, "maxTokens": 64,
                       "temperature": 0.25, "timeoutSeconds": 30, "retries": 0},
            "verification": {"mode": "adversarial", "pool": "gate", "minScore": 70, "repairRounds": 1,
                             "checks": [{"type": "regex", "pattern": "^ok"}, {"type": "json"}]},
            "aggregation": {"strategy": "bestOf", "pool": "gate", "prompt": "merge"},
            "pools": [{"name": "w", "spec": {"model": {"source": "file:///m", "format": "gguf",
                        "files": ["a.gguf", "b.gguf"], "chatTemplate": "{{ messages }}"},
                        "replicas": 2, "resources": {"gpus": 2, "gpuResourceName": "amd.com/gpu",
                        "cpu": "4", "memory": "32Gi"},
                        "engine": {"maxConcurrentSequences": 8, "kvCacheMemoryPercent": 80,
                                   "prefixCacheSequences": 0, "maxContextTokens": 8192},
                        "template": {"image": "w:1", "nodeSelector": {"gpu": "h100"},
                                     "tolerations": [{"key": "gpu", "operator": "Exists"}],
                                     "env": [{"name": "A", "value": "b"}]},
                        "queueName": "gpus", "priorityClassName": "high"}}],
            "budget": {"maxTotalTokens": 100000, "deadlineSeconds": 600},
            "suspend": false,
            "ttlSecondsAfterFinished": 60
        }
    }))
    .expect("full job parses");
    job.status = Some(serde_json::from_value(json!({
        "conditions": [{"type": "Complete", "status": "True", "reason": "Aggregated", "message": "done",
                        "lastTransitionTime": "2026-11-21T10:00:00Z", "observedGeneration": 1}],
        "observedGeneration": 1,
        "startTime": "2026-11-21T09:00:00Z",
        "completionTime": "2026-11-21T10:00:00Z",
        "finishedSubagents": 2,
        "subagents": [{"index": 0, "state": "Succeeded", "attempts": 1, "tokens": 120,
                       "verdict": {"outcome": "Pass", "score": 90, "issues": 0}},
                      {"index": 1, "state": "Failed", "attempts": 3, "tokens": 0, "message": "timeout"}],
        "usage": [{"pool": "w", "calls": 4, "promptTokens": 100, "completionTokens": 20}],
        "result": {"configMapName": "full-result", "preview": "ok"}
    }))
    .expect("status parses"));
    job
}

#[test]
fn every_field_round_trips_through_json_and_yaml() {
    let job = full_job();
    let json = serde_json::to_string(&job).unwrap();
    assert_eq!(serde_json::from_str::<SwarmJob>(&json).unwrap(), job);
    let yaml = serde_yaml_ng::to_string(&job).unwrap();
    assert_eq!(serde_yaml_ng::from_str::<SwarmJob>(&yaml).unwrap(), job);
    // The full object is valid, so the round trip covered real values, not rejected ones.
    let value = serde_json::to_value(&job).unwrap();
    assert_eq!(
        crate::support::cel_errors(&SwarmJob::crd(), &value, None),
        Vec::<String>::new()
    );

    let pool = ModelPool::new("p", job.spec.pools[0].spec.clone());
    let yaml = serde_yaml_ng::to_string(&pool).unwrap();
    assert_eq!(serde_yaml_ng::from_str::<ModelPool>(&yaml).unwrap(), pool);
}

#[test]
fn unset_optionals_are_not_serialized() {
    let job: SwarmJob = serde_json::from_value(minimal_job()).unwrap();
    let value = serde_json::to_value(&job.spec).unwrap();
    for absent in [
        "subtasks",
        "planner",
        "pools",
        "budget",
        "suspend",
        "ttlSecondsAfterFinished",
    ] {
        assert!(
            value.get(absent).is_none(),
            "{absent} serialized while unset"
        );
    }
}
