//! The Helm chart as rendered by the real `helm`: least-privilege RBAC, a hardened
//! Deployment, optional parts only when asked for.

use std::process::Command;

use serde_json::Value;

use crate::support::repo_root;
use kubeswarm_test_support::helm::{helm, render};

fn find<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found = find(docs, kind);
    assert_eq!(found.len(), 1, "expected one {kind}");
    found[0]
}

#[test]
fn rbac_lists_verbs_and_never_wildcards() {
    let docs = render(None);
    for kind in ["ClusterRole", "Role"] {
        for role in find(&docs, kind) {
            for rule in role["rules"].as_array().expect("rules") {
                for field in ["apiGroups", "resources", "verbs"] {
                    let entries = rule[field].as_array().expect("explicit list");
                    assert!(!entries.is_empty(), "{kind} rule without {field}");
                    assert!(
                        entries.iter().all(|e| e != "*"),
                        "{kind} grants a wildcard in {field}"
                    );
                }
                assert!(rule.get("nonResourceURLs").is_none());
            }
        }
    }
    let lease = one(&docs, "Role");
    assert_eq!(lease["metadata"]["namespace"], "kubeswarm-system");
    assert_eq!(
        lease["rules"][0]["resources"],
        serde_json::json!(["leases"])
    );
    // The bindings name the ServiceAccount the Deployment runs as.
    let account = one(&docs, "ServiceAccount")["metadata"]["name"].clone();
    let deployment = one(&docs, "Deployment");
    assert_eq!(
        deployment["spec"]["template"]["spec"]["serviceAccountName"],
        account
    );
    for binding in find(&docs, "ClusterRoleBinding")
        .into_iter()
        .chain(find(&docs, "RoleBinding"))
    {
        assert_eq!(binding["subjects"][0]["name"], account);
    }
}

#[test]
fn operator_runs_restricted() {
    for values in [None, Some("ci/all-features-values.yaml")] {
        let docs = render(values);
        let pod = &one(&docs, "Deployment")["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        let container = &pod["containers"][0];
        let security = &container["securityContext"];
        assert_eq!(security["allowPrivilegeEscalation"], false);
        assert_eq!(security["readOnlyRootFilesystem"], true);
        assert_eq!(security["runAsNonRoot"], true);
        assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
        assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault");
        for part in ["requests", "limits"] {
            for resource in ["cpu", "memory"] {
                assert!(
                    !container["resources"][part][resource].is_null(),
                    "no {part}.{resource}"
                );
            }
        }
        assert_eq!(container["args"][0], "operator");
        assert!(container["livenessProbe"].is_object() && container["readinessProbe"].is_object());
    }
}

#[test]
fn optional_parts_follow_the_values() {
    let defaults = render(None);
    assert!(find(&defaults, "ServiceMonitor").is_empty());
    let policy = one(&defaults, "NetworkPolicy");
    assert_eq!(
        policy["spec"]["ingress"][0]["from"],
        serde_json::json!([{"podSelector": {}}]),
        "metrics are open to the operator's own namespace only, unless the values say more"
    );
    assert_eq!(find(&defaults, "Service").len(), 1);
    assert!(
        find(&defaults, "CustomResourceDefinition").is_empty(),
        "CRDs belong in crds/, not templates/"
    );

    let all = render(Some("ci/all-features-values.yaml"));
    let monitor = one(&all, "ServiceMonitor");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    let policy = one(&all, "NetworkPolicy");
    assert_eq!(
        policy["spec"]["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "monitoring"
    );
    let env = &one(&all, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"];
    assert!(
        env.as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "OTEL_EXPORTER_OTLP_ENDPOINT")
    );
}

#[test]
fn the_tenancy_values_reach_the_operator_and_its_admission_policy_alike() {
    let defaults = render(None);
    let policies = find(&defaults, "ValidatingAdmissionPolicy");
    let kinds: Vec<&str> = policies
        .iter()
        .map(|p| {
            p["spec"]["matchConstraints"]["resourceRules"][0]["resources"][0]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(kinds, ["modelpools", "swarmjobs"]);
    assert_eq!(find(&defaults, "ValidatingAdmissionPolicyBinding").len(), 2);
    // The networks refused by default are the operator's own list, not a copy that drifts.
    let external = policies[0]["spec"]["validations"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|v| {
            v["expression"]
                .as_str()
                .filter(|e| e.contains("external.url"))
        })
        .unwrap();
    for net in kubeswarm::tenancy::DENIED
        .iter()
        .chain(kubeswarm::tenancy::CLUSTER_SUFFIXES)
    {
        assert!(
            external.contains(&format!("\"{net}\"")),
            "{net} is not in {external}"
        );
    }
    let args = |docs: &[Value]| -> Vec<String> {
        one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .filter(|a| {
                a.starts_with("--allow-") || a.starts_with("--deny-") || a.starts_with("--require-")
            })
            .collect()
    };
    assert_eq!(args(&defaults), ["--require-queue=true"]);

    let all = render(Some("ci/all-features-values.yaml"));
    assert_eq!(
        args(&all),
        [
            "--require-queue=true",
            "--allow-host-path=/var/lib/kubeswarm/models",
            "--allow-worker-image=registry.corp.example/kubeswarm/cuda-worker:0.1.0",
            "--allow-worker-image=registry.corp.example/team-a/*",
            "--allow-priority-class=batch-low",
            "--allow-priority-class=batch-high",
            "--allow-external=vllm.inference.svc.cluster.local",
            "--allow-external=*.gpu.corp.example",
            "--allow-external=10.20.0.0/16",
            "--deny-external=203.0.113.0/24",
        ]
    );
    let text = serde_json::to_string(&find(&all, "ValidatingAdmissionPolicy")).unwrap();
    for value in [
        "[\\\"/var/lib/kubeswarm/models\\\"]",
        "registry.corp.example/team-a/",
        "batch-high",
        "gpu.corp.example",
        "10.20.0.0/16",
        "203.0.113.0/24",
    ] {
        assert!(
            text.contains(value),
            "{value} is not in the admission policies"
        );
    }

    let off = Command::new(helm())
        .args([
            "template",
            "ks",
            "--kube-version",
            "1.33.0",
            "--set",
            "tenancy.admissionPolicy=false",
        ])
        .arg(repo_root().join("charts/kubeswarm"))
        .output()
        .expect("helm runs");
    assert!(off.status.success());
    assert!(!String::from_utf8_lossy(&off.stdout).contains("kind: ValidatingAdmissionPolicy"));
}

#[test]
fn secret_results_endpoint_limits_and_an_existing_worker_key_follow_the_values() {
    let container = |docs: &[Value]| {
        one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0].clone()
    };
    let flags = |docs: &[Value]| -> Vec<String> {
        container(docs)["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .filter(|a| {
                a.starts_with("--secret-results")
                    || a.starts_with("--results-role")
                    || a.starts_with("--max-")
                    || a.starts_with("--tests-")
            })
            .collect()
    };
    let key_secret = |docs: &[Value]| {
        container(docs)["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "KUBESWARM_WORKER_KEY")
            .map(|e| e["valueFrom"]["secretKeyRef"]["name"].clone())
            .unwrap()
    };
    let bound = |docs: &[Value]| -> Vec<String> {
        find(docs, "RoleBinding")
            .iter()
            .filter(|b| b["roleRef"]["name"] == "ks-kubeswarm-results")
            .map(|b| b["metadata"]["namespace"].as_str().unwrap().to_owned())
            .collect()
    };

    let defaults = render(None);
    assert_eq!(
        flags(&defaults),
        [
            "--results-role=ks-kubeswarm-results",
            "--max-models-bytes=1048576",
            "--max-response-bytes=8388608",
            "--tests-cpu=1",
            "--tests-memory=512Mi"
        ]
    );
    assert!(
        bound(&defaults).is_empty(),
        "no namespace's Secrets by default"
    );
    assert_eq!(key_secret(&defaults), "ks-kubeswarm-worker-key");
    assert_eq!(
        find(&defaults, "Secret")[0]["metadata"]["name"],
        "ks-kubeswarm-worker-key"
    );

    let all = render(Some("ci/all-features-values.yaml"));
    assert_eq!(
        flags(&all),
        [
            "--results-role=ks-kubeswarm-results",
            "--max-models-bytes=1048576",
            "--max-response-bytes=16777216",
            "--tests-image=registry.corp.example/python:3.12-slim",
            "--tests-cpu=500m",
            "--tests-memory=1Gi",
            "--secret-results=team-a",
            "--secret-results=team-b"
        ]
    );
    assert_eq!(bound(&all), ["team-a", "team-b"]);
    // The ClusterRole grants what the store and the tests' batches do with a Secret, and
    // no list or watch.
    let role = find(&all, "ClusterRole")
        .into_iter()
        .find(|r| r["metadata"]["name"] == "ks-kubeswarm-results")
        .unwrap();
    assert_eq!(
        role["rules"],
        serde_json::json!([{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "create", "patch", "delete"]}])
    );
    // A GitOps render never makes a key of its own when one is named.
    assert_eq!(key_secret(&all), "kubeswarm-worker-key-from-vault");
    assert!(find(&all, "Secret").is_empty());
}

#[test]
fn values_schema_refuses_typos_and_bad_values() {
    let chart = repo_root().join("charts/kubeswarm");
    for (set, complaint) in [
        ("replicaCount=0", "replicaCount"),
        ("metrics.serviceMonitr.enabled=true", "serviceMonitr"),
        ("logFormat=xml", "logFormat"),
        ("tenancy.hostPaths={/models/../etc}", "hostPaths"),
        ("tenancy.requireQueu=false", "requireQueu"),
        ("results.secretNamespaces={Team_A}", "secretNamespaces"),
        ("workerKey.existingSecret=Bad_Name", "existingSecret"),
        ("endpointLimits.responseBytes=10", "responseBytes"),
        ("tests.resources.memory=lots", "memory"),
        ("tests.imag=python:3", "imag"),
    ] {
        let out = Command::new(helm())
            .args(["template", "ks", "--kube-version", "1.33.0", "--set", set])
            .arg(&chart)
            .output()
            .expect("helm runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(complaint),
            "--set {set}: {stderr}"
        );
    }
}
