//! Every manifest under examples/ is valid: kubeswarm objects parse into the types and
//! pass the CRDs' rules, and the objects they reference exist in the examples.

use std::collections::BTreeSet;

use kube::CustomResourceExt;
use kubeswarm::api::{ModelPool, SwarmJob};
use serde_json::Value;

use kubeswarm_test_support::examples::{Doc, documents as examples, pool_specs};

use crate::support::cel_errors;

fn key(doc: &Value) -> (String, String, String) {
    let field = |p: &str| {
        doc.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    (
        field("/kind"),
        field("/metadata/namespace"),
        field("/metadata/name"),
    )
}

#[test]
fn kubeswarm_objects_parse_and_pass_the_crd_rules() {
    let mut seen = BTreeSet::new();
    for Doc { file, value } in examples() {
        let (kind, _, name) = key(&value);
        let errors = match kind.as_str() {
            "ModelPool" => {
                serde_json::from_value::<ModelPool>(value.clone())
                    .unwrap_or_else(|e| panic!("{file} {name}: {e}"));
                cel_errors(&ModelPool::crd(), &value, None)
            }
            "SwarmJob" => {
                serde_json::from_value::<SwarmJob>(value.clone())
                    .unwrap_or_else(|e| panic!("{file} {name}: {e}"));
                cel_errors(&SwarmJob::crd(), &value, None)
            }
            "Namespace" => Vec::new(),
            "ResourceFlavor" | "ClusterQueue" | "LocalQueue" => {
                assert_eq!(
                    value["apiVersion"], "kueue.x-k8s.io/v1beta2",
                    "{file} {name}"
                );
                Vec::new()
            }
            other => panic!("{file}: unexpected kind {other}"),
        };
        assert!(errors.is_empty(), "{file} {kind} {name}: {errors:?}");
        seen.insert(kind);
    }
    for kind in [
        "ModelPool",
        "SwarmJob",
        "ResourceFlavor",
        "ClusterQueue",
        "LocalQueue",
    ] {
        assert!(seen.contains(kind), "no example of {kind}");
    }
}

/// The examples form one working setup: jobs name pools that exist in their namespace,
/// pools name LocalQueues that exist, and LocalQueues name ClusterQueues that exist.
#[test]
fn references_between_examples_resolve() {
    let docs: Vec<Value> = examples().into_iter().map(|d| d.value).collect();
    let objects: BTreeSet<_> = docs.iter().map(key).collect();
    let exists = |kind: &str, namespace: &str, name: &str| {
        objects.contains(&(kind.to_owned(), namespace.to_owned(), name.to_owned()))
    };
    let mut dangling = Vec::new();
    for doc in &docs {
        let (kind, namespace, name) = key(doc);
        match kind.as_str() {
            "SwarmJob" => {
                let job: SwarmJob = serde_json::from_value(doc.clone()).unwrap();
                let scoped: BTreeSet<_> = job.spec.pools.iter().map(|p| p.name.clone()).collect();
                let referenced = [
                    Some(job.spec.fan_out.pool.clone()),
                    job.spec.planner.map(|p| p.pool),
                    job.spec.verification.pool,
                    job.spec.aggregation.pool,
                ];
                for pool in referenced.into_iter().flatten() {
                    if !scoped.contains(&pool) && !exists("ModelPool", &namespace, &pool) {
                        dangling.push(format!("SwarmJob {name} -> ModelPool {pool}"));
                    }
                }
            }
            "ModelPool" => {
                let pool: ModelPool = serde_json::from_value(doc.clone()).unwrap();
                if let Some(queue) = pool.spec.queue_name
                    && !exists("LocalQueue", &namespace, &queue)
                {
                    dangling.push(format!("ModelPool {name} -> LocalQueue {queue}"));
                }
            }
            "LocalQueue" => {
                let cluster_queue = doc["spec"]["clusterQueue"].as_str().unwrap_or_default();
                if !exists("ClusterQueue", "", cluster_queue) {
                    dangling.push(format!("LocalQueue {name} -> ClusterQueue {cluster_queue}"));
                }
            }
            "ClusterQueue" => {
                for flavor in doc
                    .pointer("/spec/resourceGroups/0/flavors")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let flavor = flavor["name"].as_str().unwrap_or_default();
                    if !exists("ResourceFlavor", "", flavor) {
                        dangling.push(format!("ClusterQueue {name} -> ResourceFlavor {flavor}"));
                    }
                }
            }
            _ => {}
        }
    }
    assert!(dangling.is_empty(), "{}", dangling.join("\n"));
}

/// The gallery is the demo the README promises: ten subagents drawing SVG, an adversarial
/// gate, every passing picture collected.
#[test]
fn the_gallery_is_the_demo() {
    let docs = examples();
    let gallery = docs
        .iter()
        .find(|d| d.file == "gallery.yaml")
        .expect("examples/gallery.yaml");
    let job: SwarmJob = serde_json::from_value(gallery.value.clone()).unwrap();
    assert_eq!(job.spec.fan_out.subagents, 10);
    assert_eq!(job.spec.subtasks.as_ref().map(Vec::len), Some(10));
    assert_eq!(
        job.spec.verification.mode,
        kubeswarm::api::VerificationMode::Adversarial
    );
    assert!(
        job.spec
            .verification
            .checks
            .iter()
            .any(|c| c.type_ == kubeswarm::api::OutputCheckType::Svg)
    );
    assert_eq!(
        job.spec.aggregation.strategy,
        kubeswarm::api::AggregationStrategy::Collect
    );
}

#[test]
fn example_pools_pass_the_default_tenancy_policy_with_the_allowance_they_document() {
    // pools.yaml says its vLLM endpoint needs tenancy.external.allow; nothing else does.
    let policy = kubeswarm::tenancy::Policy {
        external: kubeswarm::tenancy::External {
            allow: vec!["vllm.inference.svc.cluster.local".parse().unwrap()],
            deny: Vec::new(),
        },
        ..Default::default()
    };
    let worker = "ghcr.io/kubeswarm/inference-worker:0.1.0";
    let mut checked = 0;
    for (file, spec) in pool_specs() {
        let spec: kubeswarm::api::ModelPoolSpec = serde_json::from_value(spec).unwrap();
        let denied = policy.check(&spec, worker);
        assert!(denied.is_empty(), "{file}: {denied:?}");
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} pools checked");
}
