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
    assert_eq!(find(&defaults, "NetworkPolicy").len(), 1);
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
fn values_schema_refuses_typos_and_bad_values() {
    let chart = repo_root().join("charts/kubeswarm");
    for (set, complaint) in [
        ("replicaCount=0", "replicaCount"),
        ("metrics.serviceMonitr.enabled=true", "serviceMonitr"),
        ("logFormat=xml", "logFormat"),
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
