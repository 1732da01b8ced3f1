//! Every CEL rule of the CRDs, evaluated client-side on objects that break it. The same
//! rules run in the API server; the e2e suite checks them there too.

use std::collections::BTreeSet;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use kube::core::cel::{ScopeContext, analyze_rule, compile_schema};
use kubeswarm::api::{ModelPool, SwarmJob};
use serde_json::{Value, json};

use crate::support::{cel_errors, cel_rules, schema};
use kubeswarm_test_support::cel_cases::{
    creation_cases, job, merge_patch, started, transition_cases,
};

fn crd_of(object: &Value) -> CustomResourceDefinition {
    match object["kind"].as_str() {
        Some("ModelPool") => ModelPool::crd(),
        Some("SwarmJob") => SwarmJob::crd(),
        other => panic!("no CRD for kind {other:?}"),
    }
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

#[test]
fn started_jobs_keep_task_pool_and_subagents() {
    for (patch, message) in transition_cases() {
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
    let transitions = transition_cases();
    let transition_messages: Vec<&str> = transitions.iter().map(|(_, message)| *message).collect();
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
