//! The objects of one batch, built with no client: its name, its Job and the NetworkPolicy
//! that shuts its pod off from every connection.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::json;

use super::{START_SECONDS, Settings, TESTS_OF};
use crate::controllers::children;
use crate::controllers::swarm_job::store::Kind;
use crate::swarm::sandbox::Program;

/// A batch's name: the job's, cut to fit, and a hash of the job's uid and the programs,
/// so a name is never reused by another batch or another job.
pub fn batch_name(job: &str, uid: &str, programs: &[&Program]) -> String {
    let sources: Vec<(&str, u64)> = programs
        .iter()
        .map(|p| (p.source.as_str(), p.timeout.as_secs()))
        .collect();
    format!(
        "{}-tests-{}",
        prefix(job, 40),
        children::hash(&(uid, sources))
    )
}

/// The start of a job's name, cut where a child's name may end (not at `-` or `.`).
fn prefix(job: &str, length: usize) -> String {
    let cut: String = job.chars().take(length).collect();
    cut.trim_end_matches(['-', '.']).to_owned()
}

/// Seconds a batch may take: its programs one after the other, and its pod's start.
pub(super) fn deadline(programs: &[&Program]) -> u64 {
    START_SECONDS
        + programs
            .iter()
            .map(|p| p.timeout.as_secs() + 2)
            .sum::<u64>()
}

/// What a batch's Job is built from.
pub struct Batch<'a> {
    pub name: &'a str,
    pub job: &'a str,
    pub uid: &'a str,
    pub image: &'a str,
    pub settings: &'a Settings,
    pub kind: Kind,
    pub deadline: u64,
}

/// The Job of one batch: one pod, never retried, restricted, read-only but for /tmp.
pub fn build_job(
    batch: &Batch<'_>,
    owner: &k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
) -> Job {
    let volume_source = match batch.kind {
        Kind::ConfigMap => json!({"configMap": {"name": batch.name}}),
        Kind::Secret => json!({"secret": {"secretName": batch.name}}),
    };
    let mut volume = json!({"name": "programs"});
    volume
        .as_object_mut()
        .expect("an object")
        .extend(volume_source.as_object().expect("an object").clone());
    let labels = children::labels([
        (TESTS_OF, batch.uid.to_owned()),
        ("app.kubernetes.io/component", "tests".to_owned()),
    ]);
    serde_json::from_value(json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": batch.name,
            "labels": labels,
            "ownerReferences": [owner],
            "annotations": {"kubeswarm.dev/swarm-job": batch.job},
        },
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": batch.deadline,
            "ttlSecondsAfterFinished": 300,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": false,
                    "enableServiceLinks": false,
                    "securityContext": {
                        "runAsNonRoot": true,
                        "runAsUser": 65532,
                        "runAsGroup": 65532,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [{
                        "name": "tests",
                        "image": batch.image,
                        "command": ["python3", "-I", "-B", "/kubeswarm/run.py"],
                        "workingDir": "/tmp",
                        "terminationMessagePolicy": "File",
                        "resources": {
                            "requests": {"cpu": batch.settings.cpu, "memory": batch.settings.memory},
                            "limits": {"cpu": batch.settings.cpu, "memory": batch.settings.memory},
                        },
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        "volumeMounts": [
                            {"name": "programs", "mountPath": "/kubeswarm", "readOnly": true},
                            {"name": "scratch", "mountPath": "/tmp"},
                        ],
                    }],
                    "volumes": [
                        volume,
                        {"name": "scratch", "emptyDir": {"sizeLimit": "64Mi"}},
                    ],
                },
            },
        },
    }))
    .expect("a valid Job")
}

/// Denies a job's test pods every connection, both ways.
pub fn build_policy(
    job: &str,
    uid: &str,
    owner: &k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
) -> NetworkPolicy {
    // The uid's hash keeps jobs whose names start alike apart.
    let uid_hash = children::hash(&uid);
    serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": format!("{}-tests-{}", prefix(job, 40), &uid_hash[..8]),
            "labels": children::labels([(TESTS_OF, uid.to_owned())]),
            "ownerReferences": [owner],
        },
        "spec": {
            "podSelector": {"matchLabels": {TESTS_OF: uid}},
            "policyTypes": ["Ingress", "Egress"],
        },
    }))
    .expect("a valid NetworkPolicy")
}
