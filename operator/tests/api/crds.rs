//! The generated CRDs: committed copies in sync, names, columns, subresources, bounds.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use kubeswarm::api::{ModelPool, SwarmJob};
use serde_json::Value;

use crate::support::{repo_root, schema, walk};

#[test]
fn committed_crds_match_the_types() {
    let files = kubeswarm::crdgen::render().expect("CRDs render");
    for dir in ["crds", "charts/kubeswarm/crds"] {
        let mut committed: Vec<String> = std::fs::read_dir(repo_root().join(dir))
            .unwrap_or_else(|e| panic!("{dir}: {e}"))
            .map(|entry| {
                entry
                    .expect("dir entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        committed.sort();
        let mut expected: Vec<String> = files.iter().map(|f| f.file_name.clone()).collect();
        expected.sort();
        assert_eq!(
            committed, expected,
            "{dir} holds other files than the CRDs: run `make crds`"
        );
        for file in &files {
            let on_disk = std::fs::read_to_string(repo_root().join(dir).join(&file.file_name))
                .expect("readable");
            assert!(
                on_disk == file.yaml,
                "{dir}/{} differs from what the Rust types generate: run `make crds` and commit the result",
                file.file_name
            );
        }
    }
}

fn column_names(crd: &CustomResourceDefinition) -> Vec<String> {
    crd.spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.clone())
        .collect()
}

#[test]
fn names_columns_and_subresources() {
    let pool = ModelPool::crd();
    assert_eq!(
        pool.metadata.name.as_deref(),
        Some("modelpools.kubeswarm.dev")
    );
    assert_eq!(pool.spec.scope, "Namespaced");
    assert_eq!(pool.spec.names.short_names, Some(vec!["mp".to_owned()]));
    assert_eq!(
        pool.spec.names.categories,
        Some(vec!["kubeswarm".to_owned()])
    );
    assert_eq!(
        column_names(&pool),
        [
            "Model",
            "External",
            "Ready",
            "Desired",
            "Queue",
            "Available",
            "Age"
        ]
    );
    let subresources = pool.spec.versions[0]
        .subresources
        .as_ref()
        .expect("subresources");
    assert!(subresources.status.is_some());
    let scale = subresources
        .scale
        .as_ref()
        .expect("kubectl scale modelpool needs the scale subresource");
    assert_eq!(scale.spec_replicas_path, ".spec.replicas");
    assert_eq!(scale.status_replicas_path, ".status.replicas");

    let job = SwarmJob::crd();
    assert_eq!(
        job.metadata.name.as_deref(),
        Some("swarmjobs.kubeswarm.dev")
    );
    assert_eq!(job.spec.names.short_names, Some(vec!["sj".to_owned()]));
    assert_eq!(
        job.spec.names.categories,
        Some(vec!["kubeswarm".to_owned()])
    );
    assert_eq!(
        column_names(&job),
        [
            "Pool", "Finished", "Total", "Verified", "Complete", "Failed", "Age"
        ]
    );
    let subresources = job.spec.versions[0]
        .subresources
        .as_ref()
        .expect("subresources");
    assert!(subresources.status.is_some());
    assert!(subresources.scale.is_none());
}

#[test]
fn conditions_are_maps_keyed_by_type_and_there_is_no_phase() {
    for crd in [ModelPool::crd(), SwarmJob::crd()] {
        let schema = schema(&crd);
        let status = &schema["properties"]["status"];
        let conditions = &status["properties"]["conditions"];
        assert_eq!(
            conditions["x-kubernetes-list-type"], "map",
            "{}",
            crd.spec.names.kind
        );
        assert_eq!(
            conditions["x-kubernetes-list-map-keys"],
            serde_json::json!(["type"])
        );
        assert!(conditions["maxItems"].is_u64());
        assert!(conditions["items"]["properties"]["observedGeneration"].is_object());
        assert!(status["properties"]["observedGeneration"].is_object());
        assert!(status["properties"].get("phase").is_none());
    }
}

/// The API server estimates each rule's cost from the bounds of what it reads, and every
/// list multiplies the cost of the rules inside it: so every list and map in a spec is
/// bounded, and so is every string a rule reads.
#[test]
fn specs_are_bounded() {
    for crd in [ModelPool::crd(), SwarmJob::crd()] {
        let schema = schema(&crd);
        let mut unbounded = Vec::new();
        walk(
            &schema["properties"]["spec"],
            "spec",
            &mut |path, node: &Value| {
                let kind = node["type"].as_str();
                if kind == Some("array") && node.get("maxItems").is_none() {
                    unbounded.push(format!("{path}: list without maxItems"));
                }
                if node["additionalProperties"].is_object() && node.get("maxProperties").is_none() {
                    unbounded.push(format!("{path}: map without maxProperties"));
                }
                let has_rules = node.get("x-kubernetes-validations").is_some();
                if kind == Some("string") && has_rules && node.get("maxLength").is_none() {
                    unbounded.push(format!("{path}: string read by a rule without maxLength"));
                }
            },
        );
        assert!(
            unbounded.is_empty(),
            "{}: {}",
            crd.spec.names.kind,
            unbounded.join("\n")
        );
    }
}

/// `kubectl explain` shows the doc comments: every field has one.
#[test]
fn every_field_is_documented() {
    for crd in [ModelPool::crd(), SwarmJob::crd()] {
        let schema = schema(&crd);
        let mut undocumented = Vec::new();
        for part in ["spec", "status"] {
            walk(
                &schema["properties"][part],
                part,
                &mut |path, node: &Value| {
                    let is_field = !path.ends_with("[]") && !path.ends_with("{}");
                    if is_field
                        && node["description"]
                            .as_str()
                            .is_none_or(|d| d.trim().is_empty())
                    {
                        undocumented.push(path.to_owned());
                    }
                },
            );
        }
        assert!(
            undocumented.is_empty(),
            "{}: {}",
            crd.spec.names.kind,
            undocumented.join(", ")
        );
    }
}
