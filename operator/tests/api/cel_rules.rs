//! Every CEL rule of the CRDs, evaluated client-side on objects that break it. The same
//! rules run in the API server; the e2e suite checks them there too.

use std::collections::BTreeSet;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use kube::core::cel::{ScopeContext, analyze_rule, compile_schema};
use kubeswarm::api::{ModelPool, SwarmJob};
use serde_json::{Value, json};

use crate::support::{cel_errors, cel_rules, merge_patch, schema};

fn pool() -> Value {
    json!({
        "apiVersion": "kubeswarm.dev/v1alpha1",
        "kind": "ModelPool",
        "metadata": {"name": "smol", "namespace": "team-a"},
        "spec": {"model": {"source": "file:///models/smollm2"}, "resources": {"gpus": 0}}
    })
}

fn job() -> Value {
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
struct Case {
    name: &'static str,
    base: fn() -> Value,
    patch: Value,
    breaks: Option<&'static str>,
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

fn crd_of(object: &Value) -> CustomResourceDefinition {
    match object["kind"].as_str() {
        Some("ModelPool") => ModelPool::crd(),
        Some("SwarmJob") => SwarmJob::crd(),
        other => panic!("no CRD for kind {other:?}"),
    }
}

fn creation_cases() -> Vec<Case> {
    const EXACTLY_ONE: &str = "exactly one of spec.model or spec.external must be set";
    const SOURCE: &str =
        "spec.model.source must be file:///absolute/path, pvc://claim-name/path or hf://org/repo";
    const URL: &str = "spec.external.url must be an http:// or https:// URL";
    const GGUF_FILE: &str = "spec.model.format gguf needs the file to load";
    const SUBAGENTS: &str = "spec.fanOut.subagents must be between 1 and 100";
    const MAX_TOKENS: &str = "spec.fanOut.maxTokens must be between 1 and 32768";
    const DEADLINE: &str = "spec.budget.deadlineSeconds must be between 1 and 604800";
    const PATTERN: &str = "spec.verification.checks[].pattern is required for type regex";
    let external = json!({"url": "http://vllm:8000/v1", "model": "qwen"});
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
            json!({"spec": {"external": external}}),
            Some(EXACTLY_ONE),
        ),
        case(
            "external only",
            pool,
            json!({"spec": {"model": null, "resources": null, "external": external}}),
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
            json!({"spec": {"model": null, "external": {"url": "ftp://models/v1", "model": "m"}}}),
            Some(URL),
        ),
        case(
            "external url with a space",
            pool,
            json!({"spec": {"model": null, "external": {"url": "http://a b/v1", "model": "m"}}}),
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
            json!({"spec": {"model": null, "external": external, "template": {"image": "w:1"}}}),
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
            json!({"spec": {"pools": [{"name": "worker", "spec": {"model": {"source": "file:///m.gguf"}}}]}}),
            None,
        ),
    ]
}

#[test]
fn each_case_breaks_exactly_its_rule() {
    let mut failures = Vec::new();
    for case in creation_cases() {
        let mut object = (case.base)();
        merge_patch(&mut object, &case.patch);
        let errors = cel_errors(&crd_of(&object), &object, None);
        let ok = match case.breaks {
            None => errors.is_empty(),
            Some(expected) => errors.len() == 1 && errors[0].starts_with(expected),
        };
        if !ok {
            failures.push(format!(
                "{}: expected {:?}, got {errors:?}",
                case.name, case.breaks
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn started(mut job: Value) -> Value {
    job["status"] = json!({"startTime": "2026-11-21T10:00:00Z"});
    job
}

#[test]
fn started_jobs_keep_task_pool_and_subagents() {
    let cases = [
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
    ];
    for (patch, message) in cases {
        let old = started(job());
        let mut new = old.clone();
        merge_patch(&mut new, &patch);
        let errors = cel_errors(&SwarmJob::crd(), &new, Some(&old));
        assert!(
            errors.len() == 1 && errors[0].starts_with(message),
            "{patch}: expected {message:?}, got {errors:?}"
        );

        // Before the job starts the same edit is allowed.
        let mut edited = job();
        merge_patch(&mut edited, &patch);
        assert_eq!(
            cel_errors(&SwarmJob::crd(), &edited, Some(&job())),
            Vec::<String>::new(),
            "{patch}"
        );
    }

    // Other fields stay editable on a started job, for example to suspend it.
    let old = started(job());
    let mut new = old.clone();
    merge_patch(
        &mut new,
        &json!({"spec": {"suspend": true, "budget": {"maxTotalTokens": 5000}}}),
    );
    assert_eq!(
        cel_errors(&SwarmJob::crd(), &new, Some(&old)),
        Vec::<String>::new()
    );
}

/// Every rule in the generated CRDs is broken by at least one case above, so a rule
/// added without a test, or a message changed without its test, fails here.
#[test]
fn every_rule_in_the_crds_is_tested() {
    let broken: BTreeSet<&str> = creation_cases().iter().filter_map(|c| c.breaks).collect();
    let transition_messages = [
        "spec.task cannot",
        "spec.fanOut.pool cannot",
        "spec.fanOut.subagents cannot",
    ];
    let mut untested = Vec::new();
    for crd in [ModelPool::crd(), SwarmJob::crd()] {
        for (path, rule, message) in cel_rules(&schema(&crd)) {
            let tested = broken
                .iter()
                .chain(&transition_messages)
                .any(|prefix| message.starts_with(prefix));
            if !tested {
                untested.push(format!("{}{path}: {rule}", crd.spec.names.kind));
            }
        }
    }
    assert!(
        untested.is_empty(),
        "rules without a test case:\n{}",
        untested.join("\n")
    );
}

/// The API server refuses a CRD whose rules reference variables out of scope or may cost
/// more than its budget; catch both before a cluster does.
#[test]
fn rules_are_in_scope_and_within_cost_budget() {
    for crd in [ModelPool::crd(), SwarmJob::crd()] {
        let schema = schema(&crd);
        let compiled = compile_schema(&schema);
        assert!(
            !compiled.has_errors(),
            "{}: {:?}",
            crd.spec.names.kind,
            compiled.compilation_errors()
        );
        for (path, rule, _) in cel_rules(&schema) {
            let warnings = analyze_rule(&rule, &compiled, ScopeContext::CrdValidation);
            assert!(
                warnings.is_empty(),
                "{}{path}: {rule}: {warnings:?}",
                crd.spec.names.kind
            );
        }
    }
}

/// Every message names the field it is about, so `kubectl apply` tells the user what to fix.
#[test]
fn every_message_names_a_field() {
    for crd in [ModelPool::crd(), SwarmJob::crd()] {
        for (path, rule, message) in cel_rules(&schema(&crd)) {
            assert!(
                message.contains("spec."),
                "{path}: {rule}: message {message:?} names no field"
            );
        }
    }
}
