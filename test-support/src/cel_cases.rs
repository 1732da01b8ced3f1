//! The CEL rules of the CRDs, each with a change to a valid object that breaks it. The API
//! tests evaluate them client-side (operator/tests/api); the e2e suite sends them to a real
//! API server (e2e/tests/e2e).

use serde_json::{Value, json};

/// RFC 7386 JSON merge patch: objects merge, `null` removes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    target.remove(key);
                } else {
                    merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}

pub fn pool() -> Value {
    json!({
        "apiVersion": "kubeswarm.dev/v1alpha1",
        "kind": "ModelPool",
        "metadata": {"name": "smol", "namespace": "team-a"},
        // Inside the e2e bed's tenancy policy too: a node path under /models, a queue.
        "spec": {"model": {"source": "file:///models/smollm2"}, "resources": {"gpus": 0}, "queueName": "gpus"}
    })
}

pub fn job() -> Value {
    json!({
        "apiVersion": "kubeswarm.dev/v1alpha1",
        "kind": "SwarmJob",
        "metadata": {"name": "j", "namespace": "team-a"},
        "spec": {
            "task": "Draw a gallery.",
            "fanOut": {"pool": "worker", "subagents": 4},
            "verification": {"pool": "gate"}
        }
    })
}

/// A change to a valid object and the message of the rule it must break; `None` for a
/// change that must be accepted.
pub struct Case {
    pub name: &'static str,
    pub base: fn() -> Value,
    pub patch: Value,
    pub breaks: Option<&'static str>,
}

fn case(
    name: &'static str,
    base: fn() -> Value,
    patch: Value,
    breaks: Option<&'static str>,
) -> Case {
    Case {
        name,
        base,
        patch,
        breaks,
    }
}

pub fn creation_cases() -> Vec<Case> {
    const EXACTLY_ONE: &str = "exactly one of spec.model or spec.external must be set";
    const SOURCE: &str =
        "spec.model.source must be file:///absolute/path, pvc://claim-name/path or hf://org/repo";
    const URL: &str = "spec.external.url must be an http:// or https:// URL";
    const GGUF_FILE: &str = "spec.model.format gguf needs the file to load";
    const SUBAGENTS: &str = "spec.fanOut.subagents must be between 1 and 100";
    const MAX_TOKENS: &str = "spec.fanOut.maxTokens must be between 1 and 32768";
    const AGGREGATION_TOKENS: &str = "spec.aggregation.maxTokens must be between 1 and 32768";
    const DEADLINE: &str = "spec.budget.deadlineSeconds must be between 1 and 604800";
    const PATTERN: &str = "spec.verification.checks[].pattern is required for type regex";
    const TESTS: &str = "spec.verification.checks[].tests is required for type tests";
    let external = json!({"url": "http://vllm.example.com:8000/v1", "model": "qwen"});
    vec![
        // ModelPool
        case("pool as given", pool, json!({}), None),
        case(
            "neither model nor external",
            pool,
            json!({"spec": {"model": null}}),
            Some(EXACTLY_ONE),
        ),
        case(
            "model and external",
            pool,
            json!({"spec": {"external": external, "queueName": null}}),
            Some(EXACTLY_ONE),
        ),
        case(
            "external only",
            pool,
            json!({"spec": {"model": null, "queueName": null, "resources": null, "external": external}}),
            None,
        ),
        case(
            "pvc source",
            pool,
            json!({"spec": {"model": {"source": "pvc://models/gemma-4-26b"}}}),
            None,
        ),
        case(
            "hub source",
            pool,
            json!({"spec": {"model": {"source": "hf://google/gemma-3-1b-it"}}}),
            None,
        ),
        case(
            "s3 source",
            pool,
            json!({"spec": {"model": {"source": "s3://bucket/model"}}}),
            Some(SOURCE),
        ),
        case(
            "relative file source",
            pool,
            json!({"spec": {"model": {"source": "file://models/x"}}}),
            Some(SOURCE),
        ),
        case(
            "claim name with capitals",
            pool,
            json!({"spec": {"model": {"source": "pvc://Models/x"}}}),
            Some(SOURCE),
        ),
        case(
            "hub source without repo",
            pool,
            json!({"spec": {"model": {"source": "hf://google"}}}),
            Some(SOURCE),
        ),
        case(
            "isq on gguf",
            pool,
            json!({"spec": {"model": {"format": "gguf", "files": ["m.gguf"], "isq": "Q4K"}}}),
            Some("spec.model.isq quantizes safetensors weights"),
        ),
        case(
            "isq on safetensors",
            pool,
            json!({"spec": {"model": {"format": "safetensors", "isq": "Q4K"}}}),
            None,
        ),
        case(
            "files on safetensors",
            pool,
            json!({"spec": {"model": {"format": "safetensors", "files": ["m.gguf"]}}}),
            Some("spec.model.files lists GGUF files"),
        ),
        case(
            "gguf without a file",
            pool,
            json!({"spec": {"model": {"format": "gguf"}}}),
            Some(GGUF_FILE),
        ),
        case(
            "gguf source is the file",
            pool,
            json!({"spec": {"model": {"format": "gguf", "source": "file:///models/smol.gguf"}}}),
            None,
        ),
        case(
            "gguf with files",
            pool,
            json!({"spec": {"model": {"format": "gguf", "files": ["smol.gguf"]}}}),
            None,
        ),
        case(
            "external ftp url",
            pool,
            json!({"spec": {"model": null, "queueName": null, "external": {"url": "ftp://models/v1", "model": "m"}}}),
            Some(URL),
        ),
        case(
            "external url with a space",
            pool,
            json!({"spec": {"model": null, "queueName": null, "external": {"url": "http://a b/v1", "model": "m"}}}),
            Some(URL),
        ),
        case(
            "external with a queue",
            pool,
            json!({"spec": {"model": null, "external": external, "queueName": "gpus"}}),
            Some("spec.queueName admits worker pods through Kueue"),
        ),
        case(
            "external with a template",
            pool,
            json!({"spec": {"model": null, "queueName": null, "external": external, "template": {"image": "w:1"}}}),
            Some("spec.template customises worker pods"),
        ),
        case(
            "65 replicas",
            pool,
            json!({"spec": {"replicas": 65}}),
            Some("spec.replicas must be between 0 and 64"),
        ),
        case(
            "negative replicas",
            pool,
            json!({"spec": {"replicas": -1}}),
            Some("spec.replicas must be between 0 and 64"),
        ),
        case(
            "zero replicas",
            pool,
            json!({"spec": {"replicas": 0}}),
            None,
        ),
        case(
            "17 gpus",
            pool,
            json!({"spec": {"resources": {"gpus": 17}}}),
            Some("spec.resources.gpus must be between 0 and 16"),
        ),
        case(
            "no sequences",
            pool,
            json!({"spec": {"engine": {"maxConcurrentSequences": 0}}}),
            Some("spec.engine.maxConcurrentSequences must be between 1 and 1024"),
        ),
        case(
            "whole GPU for the KV cache",
            pool,
            json!({"spec": {"engine": {"kvCacheMemoryPercent": 100}}}),
            Some("spec.engine.kvCacheMemoryPercent must be between 5 and 95"),
        ),
        case(
            "negative prefix cache",
            pool,
            json!({"spec": {"engine": {"prefixCacheSequences": -1}}}),
            Some("spec.engine.prefixCacheSequences must be between 0 and 1024"),
        ),
        case(
            "tiny context",
            pool,
            json!({"spec": {"engine": {"maxContextTokens": 100}}}),
            Some("spec.engine.maxContextTokens must be between 256 and 1048576"),
        ),
        // SwarmJob
        case("job as given", job, json!({}), None),
        case(
            "no subagents",
            job,
            json!({"spec": {"fanOut": {"subagents": 0}}}),
            Some(SUBAGENTS),
        ),
        case(
            "101 subagents",
            job,
            json!({"spec": {"fanOut": {"subagents": 101}}}),
            Some(SUBAGENTS),
        ),
        case(
            "100 subagents",
            job,
            json!({"spec": {"fanOut": {"subagents": 100}}}),
            None,
        ),
        case(
            "concurrency above subagents",
            job,
            json!({"spec": {"fanOut": {"maxConcurrency": 5}}}),
            Some("spec.fanOut.maxConcurrency cannot exceed spec.fanOut.subagents"),
        ),
        case(
            "zero concurrency",
            job,
            json!({"spec": {"fanOut": {"maxConcurrency": 0}}}),
            Some("spec.fanOut.maxConcurrency must be at least 1"),
        ),
        case(
            "no tokens",
            job,
            json!({"spec": {"fanOut": {"maxTokens": 0}}}),
            Some(MAX_TOKENS),
        ),
        case(
            "too many tokens",
            job,
            json!({"spec": {"fanOut": {"maxTokens": 40000}}}),
            Some(MAX_TOKENS),
        ),
        case(
            "a synthesis limit of nothing",
            job,
            json!({"spec": {"aggregation": {"maxTokens": 0}}}),
            Some(AGGREGATION_TOKENS),
        ),
        case(
            "a synthesis limit past any call's",
            job,
            json!({"spec": {"aggregation": {"maxTokens": 40000}}}),
            Some(AGGREGATION_TOKENS),
        ),
        case(
            "a synthesis limit in range",
            job,
            json!({"spec": {"aggregation": {"maxTokens": 4096}}}),
            None,
        ),
        case(
            "hot temperature",
            job,
            json!({"spec": {"fanOut": {"temperature": 2.5}}}),
            Some("spec.fanOut.temperature must be between 0 and 2"),
        ),
        case(
            "no time",
            job,
            json!({"spec": {"fanOut": {"timeoutSeconds": 0}}}),
            Some("spec.fanOut.timeoutSeconds must be between 1 and 3600"),
        ),
        case(
            "11 retries",
            job,
            json!({"spec": {"fanOut": {"retries": 11}}}),
            Some("spec.fanOut.retries must be between 0 and 10"),
        ),
        case(
            "adversarial without a gate",
            job,
            json!({"spec": {"verification": {"pool": null}, "aggregation": {"pool": "gate"}}}),
            Some("spec.verification.pool is required when spec.verification.mode is adversarial"),
        ),
        case(
            "no verification, collected",
            job,
            json!({"spec": {"verification": {"mode": "none", "pool": null}, "aggregation": {"strategy": "collect"}}}),
            None,
        ),
        case(
            "bestOf without scores",
            job,
            json!({"spec": {"verification": {"mode": "none"}, "aggregation": {"strategy": "bestOf"}}}),
            Some("spec.aggregation.strategy bestOf ranks outputs by the gate's score"),
        ),
        case(
            "weightedVote without scores",
            job,
            json!({"spec": {"verification": {"mode": "none"}, "aggregation": {"strategy": "weightedVote"}}}),
            Some("spec.aggregation.strategy weightedVote weighs votes by the gate's score"),
        ),
        case(
            "a vote on the last number",
            job,
            json!({"spec": {"aggregation": {"strategy": "weightedVote", "answer": {"type": "lastNumber"}}}}),
            None,
        ),
        case(
            "an answer to find with nothing voting",
            job,
            json!({"spec": {"aggregation": {"strategy": "bestOf", "answer": {"type": "lastNumber"}}}}),
            Some("spec.aggregation.answer says what a vote compares"),
        ),
        case(
            "an answer by regex without a pattern",
            job,
            json!({"spec": {"aggregation": {"strategy": "vote", "answer": {"type": "regex"}}}}),
            Some("spec.aggregation.answer.pattern is required for type regex"),
        ),
        case(
            "a last number with a field",
            job,
            json!({"spec": {"aggregation": {"strategy": "vote", "answer": {"type": "lastNumber", "field": "x"}}}}),
            Some(
                "spec.aggregation.answer.field is required for type jsonField and allowed only there",
            ),
        ),
        case(
            "an answer in the reasoning field",
            job,
            json!({"spec": {"aggregation": {"strategy": "vote", "answer": {"type": "jsonField", "field": "reasoning"}}}}),
            Some("spec.aggregation.answer.field cannot be reasoning"),
        ),
        case(
            "an answer field in checked JSON",
            job,
            json!({"spec": {"verification": {"checks": [{"type": "json"}]}, "aggregation": {"strategy": "vote", "answer": {"type": "jsonField", "field": "result"}}}}),
            None,
        ),
        case(
            "an answer field",
            job,
            json!({"spec": {"aggregation": {"strategy": "vote", "answer": {"type": "jsonField", "field": "result"}}}}),
            None,
        ),
        case(
            "synthesis without a model",
            job,
            json!({"spec": {"verification": {"mode": "none", "pool": null}}}),
            Some("spec.aggregation.strategy synthesize needs a model"),
        ),
        case(
            "subtasks and a planner",
            job,
            json!({"spec": {"subtasks": ["a", "b", "c", "d"], "planner": {"pool": "worker"}}}),
            Some("set spec.subtasks or spec.planner, not both"),
        ),
        case(
            "three subtasks for four subagents",
            job,
            json!({"spec": {"subtasks": ["a", "b", "c"]}}),
            Some("spec.subtasks must have exactly spec.fanOut.subagents entries"),
        ),
        case(
            "one subtask each",
            job,
            json!({"spec": {"subtasks": ["a", "b", "c", "d"]}}),
            None,
        ),
        case(
            "regex without pattern",
            job,
            json!({"spec": {"verification": {"checks": [{"type": "regex"}]}}}),
            Some(PATTERN),
        ),
        case(
            "svg with a pattern",
            job,
            json!({"spec": {"verification": {"checks": [{"type": "svg", "pattern": "x"}]}}}),
            Some(PATTERN),
        ),
        case(
            "tests as given",
            job,
            json!({"spec": {"verification": {"checks": [{"type": "tests", "tests": {"source": "assert f(1) == 2", "timeoutSeconds": 30}}]}}}),
            None,
        ),
        case(
            "tests without tests",
            job,
            json!({"spec": {"verification": {"checks": [{"type": "tests"}]}}}),
            Some(TESTS),
        ),
        case(
            "json with tests",
            job,
            json!({"spec": {"verification": {"checks": [{"type": "json", "tests": {"source": "pass"}}]}}}),
            Some(TESTS),
        ),
        case(
            "tests that may run for an hour",
            job,
            json!({"spec": {"verification": {"checks": [{"type": "tests", "tests": {"source": "pass", "timeoutSeconds": 3600}}]}}}),
            Some("spec.verification.checks[].tests.timeoutSeconds must be between 1 and 300"),
        ),
        case(
            "score above 100",
            job,
            json!({"spec": {"verification": {"minScore": 101}}}),
            Some("spec.verification.minScore must be between 0 and 100"),
        ),
        case(
            "two repair rounds",
            job,
            json!({"spec": {"verification": {"repairRounds": 2}}}),
            Some("spec.verification.repairRounds must be 0 or 1"),
        ),
        case(
            "no token budget",
            job,
            json!({"spec": {"budget": {"maxTotalTokens": 0}}}),
            Some("spec.budget.maxTotalTokens must be between 1 and 1000000000"),
        ),
        case(
            "no time budget",
            job,
            json!({"spec": {"budget": {"deadlineSeconds": 0}}}),
            Some(DEADLINE),
        ),
        case(
            "a fortnight",
            job,
            json!({"spec": {"budget": {"deadlineSeconds": 1209600}}}),
            Some(DEADLINE),
        ),
        case(
            "negative ttl",
            job,
            json!({"spec": {"ttlSecondsAfterFinished": -1}}),
            Some("spec.ttlSecondsAfterFinished must be between 0 and 2592000"),
        ),
        case(
            "job-scoped pool breaks a pool rule",
            job,
            json!({"spec": {"pools": [{"name": "worker", "spec": {"resources": {"gpus": 0}}}]}}),
            Some(EXACTLY_ONE),
        ),
        case(
            "job-scoped pool",
            job,
            json!({"spec": {"pools": [{"name": "worker", "spec": {"model": {"source": "file:///models/m.gguf"}, "queueName": "gpus"}}]}}),
            None,
        ),
    ]
}

pub fn started(mut job: Value) -> Value {
    job["status"] = json!({"startTime": "2026-11-21T10:00:00Z"});
    job
}

/// Edits a started job refuses, with the message of the rule each breaks; allowed before
/// the job starts.
pub fn transition_cases() -> Vec<(Value, &'static str)> {
    vec![
        (
            json!({"spec": {"task": "Something else."}}),
            "spec.task cannot change once the job has started",
        ),
        (
            json!({"spec": {"fanOut": {"pool": "other"}}}),
            "spec.fanOut.pool cannot change once the job has started",
        ),
        (
            json!({"spec": {"fanOut": {"subagents": 3}}}),
            "spec.fanOut.subagents cannot change once the job has started",
        ),
    ]
}
