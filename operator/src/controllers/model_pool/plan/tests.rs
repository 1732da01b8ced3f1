//! The plan of a queued pool, case by case, with no API server.

use k8s_openapi::api::core::v1::{PodCondition, PodStatus};
use serde_json::json;

use super::*;
use crate::api::ModelPoolSpec;
use crate::controllers::model_pool::build::{Settings, worker_template};

fn pool(replicas: i32) -> ModelPool {
    let spec: ModelPoolSpec = serde_yaml_ng::from_str(&format!(
        "model: {{source: pvc://w/g.gguf}}\nreplicas: {replicas}\nqueueName: team-a\n"
    ))
    .unwrap();
    let mut pool = ModelPool::new("gemma", spec);
    pool.metadata.namespace = Some("team-a".to_owned());
    pool.metadata.uid = Some("uid-1".to_owned());
    pool
}

fn template(pool: &ModelPool) -> PodTemplateSpec {
    let settings = Settings {
        worker_image: "worker:1".to_owned(),
        operator_namespace: "kubeswarm-system".to_owned(),
        operator_labels: Default::default(),
        tenancy: Default::default(),
        api_key_role: "kubeswarm-api-keys".to_owned(),
        worker_key: "a key of at least thirty-two characters".to_owned(),
        models_limit: crate::swarm::endpoint::MAX_MODELS_BYTES,
    };
    worker_template(pool, &settings).unwrap()
}

fn blueprint<'a>(
    pool: &'a ModelPool,
    template: &'a PodTemplateSpec,
    priority: Option<i32>,
) -> Blueprint<'a> {
    Blueprint {
        pool,
        template,
        priority,
    }
}

/// Replica `index`'s Workload as built, with `status` as Kueue wrote it.
fn workload(desired: &Blueprint, index: i32, status: serde_json::Value) -> Workload {
    let mut workload = desired.workload(index);
    workload.metadata.resource_version = Some("7".to_owned());
    workload.status = Some(serde_json::from_value(status).unwrap());
    workload
}

fn admitted_on(flavor: &str) -> serde_json::Value {
    json!({
        "admission": {"clusterQueue": "team-a", "podSetAssignments": [
            {"name": "worker", "flavors": {"nvidia.com/gpu": flavor}, "count": 1}
        ]},
        "conditions": [
            {"type": "QuotaReserved", "status": "True", "reason": "QuotaReserved", "message": "", "lastTransitionTime": "2026-11-21T10:00:00Z"},
            {"type": "Admitted", "status": "True", "reason": "Admitted", "message": "", "lastTransitionTime": "2026-11-21T10:00:00Z"}
        ]
    })
}

fn h100() -> ResourceFlavor {
    serde_json::from_value(json!({
        "apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "ResourceFlavor",
        "metadata": {"name": "h100"},
        "spec": {"nodeLabels": {"gpu": "h100"}}
    }))
    .unwrap()
}

fn ready(mut pod: Pod) -> Pod {
    pod.status = Some(PodStatus {
        conditions: Some(vec![PodCondition {
            type_: "Ready".to_owned(),
            status: "True".to_owned(),
            ..Default::default()
        }]),
        ..Default::default()
    });
    pod
}

fn names(writes: &[Write]) -> Vec<String> {
    writes
        .iter()
        .map(|w| match w {
            Write::CreatePod(p) => format!("create pod {}", p.name_any()),
            Write::DeletePod(n) => format!("delete pod {n}"),
            Write::CreateWorkload(w) => format!("create workload {}", w.name_any()),
            Write::DeleteWorkload(n) => format!("delete workload {n}"),
            Write::WorkloadStatus { name, .. } => format!("status of workload {name}"),
        })
        .collect()
}

#[test]
fn a_new_queued_pool_creates_one_workload_per_replica_and_no_pod() {
    let pool = pool(2);
    let template = template(&pool);
    let desired = blueprint(&pool, &template, Some(100));
    let observed = Observed::default();
    assert!(flavors_to_read(&desired, &observed).is_empty());
    let plan = replicas(&desired, &observed, Timestamp::now());
    assert_eq!(
        names(&plan.writes),
        ["create workload gemma-0", "create workload gemma-1"]
    );
    let Write::CreateWorkload(created) = &plan.writes[0] else {
        unreachable!()
    };
    assert_eq!(created.spec.priority, Some(100));
    assert!(
        plan.replicas
            .iter()
            .all(|r| matches!(r.admission, Admission::Waiting(_)) && r.pod.is_none())
    );
}

#[test]
fn an_admitted_replica_gets_its_pod_on_the_flavor_and_reports_pods_ready() {
    let pool = pool(1);
    let template = template(&pool);
    let desired = blueprint(&pool, &template, None);
    let mut observed = Observed::default();
    observed.workloads.insert(
        "gemma-0".to_owned(),
        workload(&desired, 0, admitted_on("h100")),
    );
    assert_eq!(
        flavors_to_read(&desired, &observed),
        BTreeSet::from(["h100".to_owned()])
    );
    observed.flavors.insert("h100".to_owned(), h100());
    let now = Timestamp::now();
    let plan = replicas(&desired, &observed, now);
    assert_eq!(
        names(&plan.writes),
        ["status of workload gemma-0", "create pod gemma-0"]
    );
    let Write::WorkloadStatus {
        resource_version,
        status,
        ..
    } = &plan.writes[0]
    else {
        unreachable!()
    };
    assert_eq!(resource_version.as_deref(), Some("7"));
    let pods_ready = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "PodsReady")
        .unwrap();
    assert_eq!(pods_ready["status"], "False");
    let Write::CreatePod(pod) = &plan.writes[1] else {
        unreachable!()
    };
    let selector = pod.spec.as_ref().unwrap().node_selector.as_ref().unwrap();
    assert_eq!(selector["gpu"], "h100");

    // The pod is up and ready: nothing to write but PodsReady=True, once.
    observed
        .pods
        .insert("gemma-0".to_owned(), ready(*pod.clone()));
    let plan = replicas(&desired, &observed, now);
    assert_eq!(names(&plan.writes), ["status of workload gemma-0"]);
    assert_eq!(plan.replicas[0].pod.as_ref().map(|p| p.ready), Some(true));
    let Write::WorkloadStatus { status, .. } = &plan.writes[0] else {
        unreachable!()
    };
    let mut reported = observed.workloads["gemma-0"].clone();
    reported.status.as_mut().unwrap().conditions =
        Some(serde_json::from_value(status["conditions"].clone()).unwrap());
    observed.workloads.insert("gemma-0".to_owned(), reported);
    assert!(replicas(&desired, &observed, now).writes.is_empty());
}

#[test]
fn an_evicted_replica_stops_its_pod_then_gives_the_admission_back() {
    let pool = pool(1);
    let template = template(&pool);
    let desired = blueprint(&pool, &template, None);
    let mut evicted = admitted_on("h100");
    evicted["conditions"].as_array_mut().unwrap().push(json!(
        {"type": "Evicted", "status": "True", "reason": "Preempted", "message": "preempted by team-b", "lastTransitionTime": "2026-11-21T11:00:00Z"}
    ));
    let mut observed = Observed::default();
    observed
        .workloads
        .insert("gemma-0".to_owned(), workload(&desired, 0, evicted));
    observed.pods.insert(
        "gemma-0".to_owned(),
        build::pod(&pool, &template, 0, &Placement::default()),
    );
    assert!(flavors_to_read(&desired, &observed).is_empty());
    let plan = replicas(&desired, &observed, Timestamp::now());
    assert_eq!(names(&plan.writes), ["delete pod gemma-0"]);

    observed.pods.clear();
    let plan = replicas(&desired, &observed, Timestamp::now());
    assert_eq!(names(&plan.writes), ["status of workload gemma-0"]);
    let Write::WorkloadStatus { status, .. } = &plan.writes[0] else {
        unreachable!()
    };
    assert_eq!(status["admission"], serde_json::Value::Null);
    assert!(matches!(
        plan.replicas[0].admission,
        Admission::Evicted { .. }
    ));
}

#[test]
fn a_changed_template_queues_a_new_workload_and_a_scale_down_removes_the_rest() {
    let pool = pool(1);
    let template = template(&pool);
    let desired = blueprint(&pool, &template, None);
    // The Workloads were built when the pool's PriorityClass had another value.
    let older = blueprint(&pool, &template, Some(5));
    let mut observed = Observed::default();
    observed.workloads.insert(
        "gemma-0".to_owned(),
        workload(&older, 0, admitted_on("h100")),
    );
    observed.workloads.insert(
        "gemma-1".to_owned(),
        workload(&older, 1, admitted_on("h100")),
    );
    for index in 0..2 {
        observed.pods.insert(
            format!("gemma-{index}"),
            build::pod(&pool, &template, index, &Placement::default()),
        );
    }
    assert!(
        flavors_to_read(&desired, &observed).is_empty(),
        "a Workload about to be replaced needs no flavor"
    );
    let plan = replicas(&desired, &observed, Timestamp::now());
    assert_eq!(
        names(&plan.writes),
        [
            "delete pod gemma-0",
            "delete workload gemma-0",
            "create workload gemma-0",
            "delete pod gemma-1",
            "delete workload gemma-1",
        ]
    );
    assert_eq!(plan.replicas.len(), 1);
}
