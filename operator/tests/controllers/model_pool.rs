//! The ModelPool controller, one reconcile per scenario: Kueue's admission protocol,
//! eviction, scaling, placement, priority, external endpoints.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response};
use k8s_openapi::api::core::v1::{Pod, PodCondition, PodStatus};
use k8s_openapi::api::scheduling::v1::PriorityClass;
use kube::ResourceExt;
use kube::client::Body;
use kubeswarm::api::{ModelPool, ModelPoolSpec, ModelPoolStatus};
use kubeswarm::controllers::model_pool::build::{self, Settings};
use kubeswarm::controllers::model_pool::{self, Context, reconcile};
use kubeswarm::kueue::{Placement, Workload};
use kubeswarm::metrics::Metrics;
use kubeswarm::tenancy::{self, External, Policy};
use serde_json::{Value, json};

use crate::harness::{
    Check, NS, Step, condition, event, forbidden, list, not_found, recorder, says, serve, step,
};

const SVC: &str = "/api/v1/namespaces/team-a/services/gemma-workers";
const NETPOL: &str = "/apis/networking.k8s.io/v1/namespaces/team-a/networkpolicies/gemma-workers";
const PODS: &str = "/api/v1/namespaces/team-a/pods";
const WORKLOADS: &str = "/apis/kueue.x-k8s.io/v1beta1/namespaces/team-a/workloads";
const STATUS: &str = "/apis/kubeswarm.dev/v1alpha1/namespaces/team-a/modelpools/gemma/status";
const FLAVOR: &str = "/apis/kueue.x-k8s.io/v1beta1/resourceflavors/h100";
const URGENT: &str = "/apis/scheduling.k8s.io/v1/priorityclasses/urgent";

fn settings() -> Settings {
    Settings {
        worker_image: "ghcr.io/kubeswarm/inference-worker:0.1.0".to_owned(),
        operator_namespace: "kubeswarm-system".to_owned(),
        operator_labels: [("app.kubernetes.io/name".to_owned(), "kubeswarm".to_owned())].into(),
        // The scenarios' pools run without a queue, at the PriorityClass urgent, or at an
        // external endpoint on loopback; the policy's refusals have scenarios of their own.
        tenancy: Policy {
            require_queue: false,
            priority_classes: vec!["urgent".to_owned()],
            external: External {
                allow: vec!["127.0.0.0/8".parse().unwrap()],
                deny: Vec::new(),
            },
            ..Policy::default()
        },
        api_key_role: "kubeswarm-api-keys".to_owned(),
        worker_key: "a key of at least thirty-two characters".to_owned(),
        models_limit: kubeswarm::swarm::MAX_MODELS_BYTES,
    }
}

fn pool(replicas: i32, queue: bool, status: Option<ModelPoolStatus>) -> ModelPool {
    let queue = if queue { "queueName: team-a\n" } else { "" };
    let spec: ModelPoolSpec = serde_yaml_ng::from_str(&format!(
        "model: {{source: pvc://weights/g.gguf}}\nreplicas: {replicas}\n{queue}"
    ))
    .unwrap();
    let mut pool = ModelPool::new("gemma", spec);
    pool.metadata.namespace = Some(NS.to_owned());
    pool.metadata.uid = Some("pool-uid".to_owned());
    pool.metadata.generation = Some(1);
    pool.metadata.resource_version = Some("3".to_owned());
    pool.status = status;
    pool
}

const POOL: &str = "/apis/kubeswarm.dev/v1alpha1/namespaces/team-a/modelpools/gemma";

/// The read of the pool that precedes any delete: the stored pool is `stored`.
fn read_again(stored: &ModelPool) -> Step {
    step(
        Method::GET,
        POOL,
        200,
        typed(stored, "kubeswarm.dev/v1alpha1", "ModelPool"),
    )
}

/// The children as the controller builds them, so their hashes match.
fn built_pod(pool: &ModelPool, index: i32, placement: &Placement, ready: bool) -> Value {
    let template = build::worker_template(pool, &settings()).unwrap();
    let mut pod = build::pod(pool, &template, index, placement);
    pod.metadata.resource_version = Some("7".to_owned());
    pod.status = Some(PodStatus {
        phase: Some("Running".to_owned()),
        conditions: Some(vec![PodCondition {
            type_: "Ready".to_owned(),
            status: if ready { "True" } else { "False" }.to_owned(),
            ..PodCondition::default()
        }]),
        ..PodStatus::default()
    });
    serde_json::to_value(&pod).unwrap()
}

fn built_workload(pool: &ModelPool, index: i32, status: Value) -> Value {
    let template = build::worker_template(pool, &settings()).unwrap();
    let mut wl = serde_json::to_value(build::workload(pool, &template, index, None)).unwrap();
    wl["apiVersion"] = json!("kueue.x-k8s.io/v1beta1");
    wl["kind"] = json!("Workload");
    wl["metadata"]["resourceVersion"] = json!("42");
    wl["status"] = status;
    wl
}

fn typed<T: serde::Serialize>(object: &T, api_version: &str, kind: &str) -> Value {
    let mut value = serde_json::to_value(object).unwrap();
    value["apiVersion"] = json!(api_version);
    value["kind"] = json!(kind);
    value
}

fn existing_service(pool: &ModelPool) -> Value {
    typed(&build::service(pool), "v1", "Service")
}

fn existing_policy(pool: &ModelPool) -> Value {
    typed(
        &build::network_policy(pool, &settings()),
        "networking.k8s.io/v1",
        "NetworkPolicy",
    )
}

/// What the API server answers to a Workload status write.
fn stored_workload() -> Value {
    built_workload(&pool(1, true, None), 0, Value::Null)
}

/// What the API server answers to a status write: the stored pool.
fn stored() -> Value {
    typed(&pool(1, true, None), "kubeswarm.dev/v1alpha1", "ModelPool")
}

/// Runs one reconcile of `pool` against `steps`.
async fn scenario(pool: ModelPool, steps: Vec<Step>) {
    scenario_under(settings(), pool, steps).await;
}

/// Runs one reconcile of `pool` against `steps`, with the operator configured by `settings`.
async fn scenario_under(settings: Settings, pool: ModelPool, steps: Vec<Step>) {
    attempt(settings, pool, steps).await.0.expect("reconcile");
}

/// One reconcile of `pool` against `steps`: its outcome, and the context it ran in.
async fn attempt(
    settings: Settings,
    pool: ModelPool,
    steps: Vec<Step>,
) -> (
    Result<kube::runtime::controller::Action, model_pool::Error>,
    Arc<Context>,
) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, NS);
    let ctx = Arc::new(Context {
        client: client.clone(),
        http: tenancy::external_client(&settings.tenancy.external),
        settings,
        recorder: recorder(client),
        metrics: Arc::new(Metrics::default()),
        backoff: Default::default(),
    });
    let server = tokio::spawn(serve(handle, steps));
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        reconcile(Arc::new(pool), ctx.clone()),
    )
    .await
    .expect("the reconcile waited on a request the scenario does not answer");
    server.await.expect("the mock API server's checks");
    (result, ctx)
}

/// Keeps what a check saw, for the next reconcile's input.
fn keep() -> (Arc<Mutex<Value>>, impl Fn(Value) -> Check) {
    let kept = Arc::new(Mutex::new(Value::Null));
    let k = kept.clone();
    (kept, move |expected_reason: Value| {
        let k = k.clone();
        Box::new(move |body: &Value| {
            if !expected_reason.is_null() {
                assert_eq!(condition(body, "Admitted").1, expected_reason, "{body}");
            }
            *k.lock().unwrap() = body.clone();
        })
    })
}

fn status_of(kept: &Arc<Mutex<Value>>) -> Option<ModelPoolStatus> {
    Some(serde_json::from_value(kept.lock().unwrap()["status"].clone()).unwrap())
}

fn waiting_for_quota() -> Value {
    json!({"conditions": [{
        "type": "QuotaReserved", "status": "False", "reason": "Pending",
        "message": "couldn't assign flavors to pod set worker: insufficient unused quota for nvidia.com/gpu in flavor h100, 1 more needed",
        "lastTransitionTime": "2026-11-21T10:00:00Z"
    }]})
}

fn admitted(extra: Vec<Value>) -> Value {
    let mut conditions = vec![
        json!({"type": "QuotaReserved", "status": "True", "reason": "QuotaReserved", "message": "Quota reserved in ClusterQueue team-a", "lastTransitionTime": "2026-11-21T10:01:00Z"}),
        json!({"type": "Admitted", "status": "True", "reason": "Admitted", "message": "The workload is admitted", "lastTransitionTime": "2026-11-21T10:01:00Z"}),
    ];
    conditions.extend(extra);
    json!({
        "admission": {"clusterQueue": "team-a", "podSetAssignments": [{"name": "worker", "count": 1, "flavors": {"nvidia.com/gpu": "h100"}}]},
        "conditions": conditions
    })
}

fn h100() -> Value {
    json!({
        "apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "ResourceFlavor",
        "metadata": {"name": "h100"},
        "spec": {
            "nodeLabels": {"gpu.nvidia.com/class": "H100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        }
    })
}

fn h100_placement() -> Placement {
    let mut placement = Placement::default();
    kubeswarm::kueue::add_flavor(&mut placement, &serde_json::from_value(h100()).unwrap());
    placement
}

/// The requests every reconcile of a pool with its Service and NetworkPolicy in place
/// starts with: reads only.
fn settled_start(pool: &ModelPool, pods: Vec<Value>, workloads: Option<Vec<Value>>) -> Vec<Step> {
    let mut steps = vec![
        step(Method::GET, SVC, 200, existing_service(pool)),
        step(Method::GET, NETPOL, 200, existing_policy(pool)),
        step(Method::GET, PODS, 200, list("Pod", pods)),
    ];
    if let Some(workloads) = workloads {
        steps.push(step(
            Method::GET,
            WORKLOADS,
            200,
            list("Workload", workloads),
        ));
    }
    steps
}

#[tokio::test]
async fn kueue_protocol_from_waiting_for_quota_to_pods_ready() {
    // 1. A new pool: Service and NetworkPolicy applied, a Workload per replica, no pod.
    let (kept, keeping) = keep();
    let fresh = pool(1, true, None);
    let wl_created = built_workload(&fresh, 0, Value::Null);
    scenario(
        fresh.clone(),
        vec![
            step(Method::GET, SVC, 404, not_found()),
            step(Method::PATCH, SVC, 200, existing_service(&fresh))
                .check(|body| assert_eq!(body["spec"]["clusterIP"], "None")),
            step(Method::GET, NETPOL, 404, not_found()),
            step(Method::PATCH, NETPOL, 200, existing_policy(&fresh)),
            step(Method::GET, PODS, 200, list("Pod", vec![])),
            step(Method::GET, WORKLOADS, 200, list("Workload", vec![])),
            step(Method::POST, WORKLOADS, 201, wl_created.clone()).check(|body| {
                assert_eq!(body["metadata"]["name"], "gemma-0");
                assert_eq!(body["spec"]["queueName"], "team-a");
                assert_eq!(body["spec"]["podSets"][0]["count"], 1);
                assert_eq!(body["metadata"]["ownerReferences"][0]["kind"], "ModelPool");
            }),
            Step {
                check: Some(keeping(json!("WaitingForQuota"))),
                ..step(Method::PATCH, STATUS, 200, stored())
            },
            event("WaitingForQuota"),
            event("NoReadyReplicas"),
            event("WaitingForAdmission"),
            event("AsExpected"),
        ],
    )
    .await;

    // 2. Kueue says why it waits: the pool's Admitted condition carries the message; no
    //    pod, no write to the Workload, no Event (the reason did not change).
    let waiting = pool(1, true, status_of(&kept));
    let (kept, keeping) = keep();
    let says_why = keeping(json!("WaitingForQuota"));
    scenario(
        waiting.clone(),
        [
            settled_start(
                &waiting,
                vec![],
                Some(vec![built_workload(&waiting, 0, waiting_for_quota())]),
            ),
            vec![Step {
                check: Some(Box::new(move |body: &Value| {
                    let (status, _, message) = condition(body, "Admitted");
                    assert_eq!(status, "False");
                    assert!(
                        message.contains(
                            "insufficient unused quota for nvidia.com/gpu in flavor h100"
                        ),
                        "{message}"
                    );
                    says_why(body);
                })),
                ..step(Method::PATCH, STATUS, 200, stored())
            }],
        ]
        .into_iter()
        .flatten()
        .collect(),
    )
    .await;

    // 3. Admitted on flavor h100: PodsReady=False reported, the pod created on the
    //    flavor's nodes with its tolerations.
    let admitted_pool = pool(1, true, status_of(&kept));
    let (kept, keeping) = keep();
    scenario(
        admitted_pool.clone(),
        [
            settled_start(
                &admitted_pool,
                vec![],
                Some(vec![built_workload(&admitted_pool, 0, admitted(vec![]))]),
            ),
            vec![
                // The flavor is read with the rest, before any write.
                step(Method::GET, FLAVOR, 200, h100()),
                step(
                    Method::PATCH,
                    &format!("{WORKLOADS}/gemma-0/status"),
                    200,
                    stored_workload(),
                )
                .check(|body| {
                    assert_eq!(
                        body["metadata"]["resourceVersion"], "42",
                        "the patch is conditional on what was read"
                    );
                    let (status, reason, _) = condition(body, "PodsReady");
                    assert_eq!(
                        (status.as_str(), reason.as_str()),
                        ("False", "WaitForStart")
                    );
                    assert_eq!(
                        body["status"]["conditions"].as_array().unwrap().len(),
                        3,
                        "Kueue's conditions are kept"
                    );
                }),
                step(Method::POST, PODS, 201, json!({})).check(|body| {
                    assert_eq!(body["metadata"]["name"], "gemma-0");
                    assert_eq!(body["spec"]["nodeSelector"]["gpu.nvidia.com/class"], "H100");
                    assert_eq!(body["spec"]["tolerations"][0]["key"], "nvidia.com/gpu");
                }),
                Step {
                    check: Some(keeping(json!("Admitted"))),
                    ..step(Method::PATCH, STATUS, 200, stored())
                },
                event("Admitted"),
                event("ReplicasStarting"),
            ],
        ]
        .into_iter()
        .flatten()
        .collect(),
    )
    .await;

    // 4. The worker is ready: PodsReady=True, the pool Available.
    let (ready_kept, keeping) = keep();
    let running = pool(1, true, status_of(&kept));
    let pods_ready_false = json!({"type": "PodsReady", "status": "False", "reason": "WaitForStart", "message": "Not all pods are ready or succeeded", "lastTransitionTime": "2026-11-21T10:01:01Z"});
    scenario(
        running.clone(),
        [
            settled_start(
                &running,
                vec![built_pod(&running, 0, &h100_placement(), true)],
                Some(vec![built_workload(
                    &running,
                    0,
                    admitted(vec![pods_ready_false]),
                )]),
            ),
            vec![
                step(Method::GET, FLAVOR, 200, h100()),
                step(
                    Method::PATCH,
                    &format!("{WORKLOADS}/gemma-0/status"),
                    200,
                    stored_workload(),
                )
                .check(|body| {
                    let (status, reason, _) = condition(body, "PodsReady");
                    assert_eq!(
                        (status.as_str(), reason.as_str()),
                        ("True", "Started"),
                        "Kueue's own reason for a start"
                    );
                }),
                Step {
                    check: Some(keeping(Value::Null)),
                    ..step(Method::PATCH, STATUS, 200, stored())
                },
                event("MinimumReplicasAvailable"),
                event("ReplicasReady"),
            ],
        ]
        .into_iter()
        .flatten()
        .collect(),
    )
    .await;
    let (available, _, message) = condition(&ready_kept.lock().unwrap(), "Available");
    assert_eq!(
        (available.as_str(), message.as_str()),
        ("True", "1 of 1 workers ready")
    );

    // 5. The same state again: reads only, not one write.
    let settled = pool(1, true, status_of(&ready_kept));
    let pods_ready_true = json!({"type": "PodsReady", "status": "True", "reason": "Started", "message": "All pods reached readiness and the workload is running", "lastTransitionTime": "2026-11-21T10:02:00Z"});
    scenario(
        settled.clone(),
        [
            settled_start(
                &settled,
                vec![built_pod(&settled, 0, &h100_placement(), true)],
                Some(vec![built_workload(
                    &settled,
                    0,
                    admitted(vec![pods_ready_true]),
                )]),
            ),
            vec![step(Method::GET, FLAVOR, 200, h100())],
        ]
        .into_iter()
        .flatten()
        .collect(),
    )
    .await;
}

#[tokio::test]
async fn eviction_stops_the_pod_then_gives_the_admission_back() {
    let preempted = json!({"type": "Evicted", "status": "True", "reason": "Preempted", "message": "Preempted to accommodate a workload (UID: 77) due to prioritization in the ClusterQueue", "lastTransitionTime": "2026-11-21T11:00:00Z"});
    let evicted_pool = pool(1, true, None);
    let evicted_status = admitted(vec![preempted]);

    // The pod still runs: it is deleted first, and the pool says why.
    scenario(
        evicted_pool.clone(),
        [
            settled_start(
                &evicted_pool,
                vec![built_pod(&evicted_pool, 0, &h100_placement(), true)],
                Some(vec![built_workload(
                    &evicted_pool,
                    0,
                    evicted_status.clone(),
                )]),
            ),
            vec![
                read_again(&evicted_pool),
                step(
                    Method::DELETE,
                    &format!("{PODS}/gemma-0"),
                    200,
                    built_pod(&evicted_pool, 0, &h100_placement(), true),
                ),
                step(Method::PATCH, STATUS, 200, stored()).check(|body| {
                    says(
                        body,
                        "Admitted",
                        (
                            "False",
                            "Evicted",
                            "gemma-0: Preempted: Preempted to accommodate",
                        ),
                    );
                }),
                event("Evicted"),
                event("NoReadyReplicas"),
                event("WaitingForAdmission"),
                event("AsExpected"),
            ],
        ]
        .into_iter()
        .flatten()
        .collect(),
    )
    .await;

    // The pod is gone: the admission is cleared so the preempting workload gets the quota.
    scenario(
        evicted_pool.clone(),
        [
            settled_start(
                &evicted_pool,
                vec![],
                Some(vec![built_workload(&evicted_pool, 0, evicted_status)]),
            ),
            vec![
                step(
                    Method::PATCH,
                    &format!("{WORKLOADS}/gemma-0/status"),
                    200,
                    stored_workload(),
                )
                .check(|body| {
                    assert!(
                        body["status"]["admission"].is_null()
                            && body["status"].get("admission").is_some(),
                        "admission removed: {body}"
                    );
                    let (status, reason, _) = condition(body, "QuotaReserved");
                    assert_eq!((status.as_str(), reason.as_str()), ("False", "Pending"));
                    assert_eq!(condition(body, "Admitted").0, "False");
                    assert_eq!(
                        condition(body, "Evicted").0,
                        "True",
                        "Kueue's eviction record stays"
                    );
                }),
                step(Method::PATCH, STATUS, 200, stored()),
                event("Evicted"),
                event("NoReadyReplicas"),
                event("WaitingForAdmission"),
                event("AsExpected"),
            ],
        ]
        .into_iter()
        .flatten()
        .collect(),
    )
    .await;

    // Readmitted: the pod comes back.
    let readmitted = pool(1, true, None);
    let mut steps = settled_start(
        &readmitted,
        vec![],
        Some(vec![built_workload(&readmitted, 0, admitted(vec![]))]),
    );
    steps.extend([
        step(Method::GET, FLAVOR, 200, h100()),
        step(
            Method::PATCH,
            &format!("{WORKLOADS}/gemma-0/status"),
            200,
            stored_workload(),
        ),
        step(Method::POST, PODS, 201, json!({}))
            .check(|body| assert_eq!(body["metadata"]["name"], "gemma-0")),
        step(Method::PATCH, STATUS, 200, stored()),
        event("Admitted"),
        event("NoReadyReplicas"),
        event("ReplicasStarting"),
        event("AsExpected"),
    ]);
    scenario(readmitted, steps).await;
}

#[tokio::test]
async fn scaling_down_deletes_the_last_replicas_pod_and_workload() {
    let before = pool(2, true, None);
    let after = pool(1, true, None);
    let pods: Vec<Value> = (0..2)
        .map(|i| built_pod(&before, i, &h100_placement(), true))
        .collect();
    let pods_ready = json!({"type": "PodsReady", "status": "True", "reason": "Started", "message": "", "lastTransitionTime": "2026-11-21T10:02:00Z"});
    let workloads: Vec<Value> = (0..2)
        .map(|i| built_workload(&before, i, admitted(vec![pods_ready.clone()])))
        .collect();
    let mut steps = settled_start(&after, pods, Some(workloads));
    steps.extend([
        step(Method::GET, FLAVOR, 200, h100()),
        read_again(&after),
        step(
            Method::DELETE,
            &format!("{PODS}/gemma-1"),
            200,
            built_pod(&before, 1, &h100_placement(), true),
        ),
        step(
            Method::DELETE,
            &format!("{WORKLOADS}/gemma-1"),
            200,
            built_workload(&before, 1, Value::Null),
        ),
        step(Method::PATCH, STATUS, 200, stored()).check(|body| {
            assert_eq!(body["status"]["replicas"], 1);
            assert_eq!(body["status"]["readyReplicas"], 1);
            assert_eq!(body["status"]["workload"], "kubeswarm.dev/pool=gemma");
        }),
        event("Admitted"),
        event("MinimumReplicasAvailable"),
        event("ReplicasReady"),
        event("AsExpected"),
    ]);
    scenario(after, steps).await;
}

/// The cache still holds the pool at 1 replica; it was scaled back to 2 since. The deletes
/// planned from the old spec are not made, and nothing else is written: the newer pool
/// is reconciled next.
#[tokio::test]
async fn deletes_planned_from_a_stale_cache_are_not_made() {
    let current = pool(2, true, None);
    let mut cached = pool(1, true, None);
    cached.metadata.resource_version = Some("2".to_owned());
    let pods: Vec<Value> = (0..2)
        .map(|i| built_pod(&current, i, &h100_placement(), true))
        .collect();
    let pods_ready = json!({"type": "PodsReady", "status": "True", "reason": "Started", "message": "", "lastTransitionTime": "2026-11-21T10:02:00Z"});
    let workloads: Vec<Value> = (0..2)
        .map(|i| built_workload(&current, i, admitted(vec![pods_ready.clone()])))
        .collect();
    let mut steps = settled_start(&cached, pods, Some(workloads));
    steps.extend([step(Method::GET, FLAVOR, 200, h100()), read_again(&current)]);
    scenario(cached, steps).await;
}

#[tokio::test]
async fn replicas_on_the_same_flavor_share_one_read_of_it() {
    let two = pool(2, true, None);
    let pods_ready = json!({"type": "PodsReady", "status": "True", "reason": "Started", "message": "", "lastTransitionTime": "2026-11-21T10:02:00Z"});
    let pods: Vec<Value> = (0..2)
        .map(|i| built_pod(&two, i, &h100_placement(), true))
        .collect();
    let workloads: Vec<Value> = (0..2)
        .map(|i| built_workload(&two, i, admitted(vec![pods_ready.clone()])))
        .collect();
    let mut steps = settled_start(&two, pods, Some(workloads));
    steps.push(step(Method::GET, FLAVOR, 200, h100()));
    steps.push(
        step(Method::PATCH, STATUS, 200, stored())
            .check(|body| assert_eq!(body["status"]["readyReplicas"], 2)),
    );
    steps.extend(
        [
            "Admitted",
            "MinimumReplicasAvailable",
            "ReplicasReady",
            "AsExpected",
        ]
        .map(event),
    );
    scenario(two, steps).await;
}

#[tokio::test]
async fn without_a_queue_pods_are_created_directly_and_a_changed_spec_replaces_them() {
    let direct = pool(1, false, None);
    let mut steps = settled_start(&direct, vec![], None);
    steps.extend([
        step(Method::POST, PODS, 201, json!({})).check(|body| {
            assert_eq!(body["metadata"]["name"], "gemma-0");
            assert!(body["spec"].get("nodeSelector").is_none());
        }),
        step(Method::PATCH, STATUS, 200, stored()).check(|body| {
            assert_eq!(condition(body, "Admitted").1, "NoQueue");
            assert!(body["status"].get("workload").is_none());
        }),
        event("NoQueue"),
        event("NoReadyReplicas"),
        event("ReplicasStarting"),
        event("AsExpected"),
    ]);
    scenario(direct.clone(), steps).await;

    // The pool's model moves: the old pod (other hash) is deleted, to be created anew.
    let mut moved = direct.clone();
    moved.spec.model.as_mut().unwrap().source = "pvc://weights/g2.gguf".to_owned();
    let old_pod = built_pod(&direct, 0, &Placement::default(), true);
    let mut steps = vec![
        step(Method::GET, SVC, 200, existing_service(&moved)),
        step(Method::GET, NETPOL, 200, existing_policy(&moved)),
        step(Method::GET, PODS, 200, list("Pod", vec![old_pod])),
        read_again(&moved),
        step(
            Method::DELETE,
            &format!("{PODS}/gemma-0"),
            200,
            built_pod(&direct, 0, &Placement::default(), true),
        ),
        step(Method::PATCH, STATUS, 200, stored()),
    ];
    steps.extend(
        [
            "NoQueue",
            "NoReadyReplicas",
            "ReplicasStarting",
            "AsExpected",
        ]
        .map(event),
    );
    scenario(moved, steps).await;
}

/// The reads of a reconcile of a queued pool on a cluster without Kueue, up to its
/// status write: the Workload list is a 404 for the whole resource.
fn without_kueue(queued: &ModelPool) -> Vec<Step> {
    let mut steps = settled_start(queued, vec![], None);
    steps.push(step(
        Method::GET,
        WORKLOADS,
        404,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "the server could not find the requested resource"}),
    ));
    steps
}

#[tokio::test]
async fn a_queue_without_kueue_is_reported_and_rechecked() {
    let queued = pool(1, true, None);
    let mut steps = without_kueue(&queued);
    steps.extend([
        step(Method::PATCH, STATUS, 200, stored()).check(|body| {
            says(
                body,
                "Admitted",
                (
                    "False",
                    "KueueNotInstalled",
                    "install Kueue or remove spec.queueName",
                ),
            );
        }),
        event("KueueNotInstalled"),
        event("NoReadyReplicas"),
        event("KueueNotInstalled"),
        event("AsExpected"),
    ]);
    scenario(queued, steps).await;
}

/// A reconcile of a queued pool with no Kueue whose status write gets `code`: the write
/// must name the version the pool was read at.
fn status_write_answered(queued: &ModelPool, code: u16, reason: &str, message: &str) -> Vec<Step> {
    let mut steps = without_kueue(queued);
    steps.extend([
        step(
            Method::PATCH,
            STATUS,
            code,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": message}),
        )
        .check(|body| {
            assert_eq!(body["metadata"]["resourceVersion"], "3", "{body}");
            says(
                body,
                "Admitted",
                ("False", "KueueNotInstalled", "install Kueue or remove spec.queueName"),
            );
        }),
    ]);
    steps
}

#[tokio::test]
async fn a_status_worked_out_from_a_stale_read_is_refused_and_read_again_soon() {
    // The cache holds the pool at resourceVersion 3; the API server has moved on (another
    // replica's last write, or this one's not yet seen). The status write names version 3,
    // so the API server refuses it instead of letting an older view overwrite a newer one,
    // and no Event announces a transition worked out from that view (the scripted server
    // fails the scenario on any request it was not given).
    use kube::runtime::controller::Action;
    let queued = pool(1, true, None);
    let steps = status_write_answered(
        &queued,
        409,
        "Conflict",
        "Operation cannot be fulfilled on modelpools.kubeswarm.dev \"gemma\": the object has been modified; please apply your changes to the latest version and try again",
    );
    let (result, ctx) = attempt(settings(), queued.clone(), steps).await;
    let error = result.expect_err("the refused write fails the reconcile");
    assert!(error.is_conflict(), "{error:?}");
    // Read again in a second, every time: nothing is broken, so no backoff grows.
    for _ in 0..3 {
        assert_eq!(
            model_pool::error_policy(Arc::new(queued.clone()), &error, ctx.clone()),
            Action::requeue(Duration::from_secs(1))
        );
    }

    // A write that fails for another reason backs off, and from its first step, 5 s: the
    // three conflicts before it (in the same context) did not count as failures.
    let steps = status_write_answered(
        &queued,
        500,
        "InternalError",
        "etcdserver: request timed out",
    );
    let failed = attempt(settings(), queued.clone(), steps)
        .await
        .0
        .expect_err("a failed write fails the reconcile");
    assert!(!failed.is_conflict(), "{failed:?}");
    assert_eq!(
        model_pool::error_policy(Arc::new(queued.clone()), &failed, ctx.clone()),
        Action::requeue(Duration::from_secs(5))
    );
    assert_eq!(
        model_pool::error_policy(Arc::new(queued), &failed, ctx),
        Action::requeue(Duration::from_secs(10))
    );
}

fn urgent_pool() -> ModelPool {
    let mut urgent = pool(1, true, None);
    urgent.spec.priority_class_name = Some("urgent".to_owned());
    urgent
}

#[tokio::test]
async fn a_missing_priority_class_is_reported_and_nothing_is_created() {
    scenario(
        urgent_pool(),
        vec![
            step(Method::GET, URGENT, 404, not_found()),
            step(Method::PATCH, STATUS, 200, stored()).check(|body| {
                let missing = "spec.priorityClassName urgent names no PriorityClass";
                says(
                    body,
                    "Admitted",
                    ("False", "PriorityClassNotFound", missing),
                );
                assert_eq!(condition(body, "Progressing").1, "PriorityClassNotFound");
            }),
            event("PriorityClassNotFound"),
            event("NoReadyReplicas"),
            event("PriorityClassNotFound"),
            event("AsExpected"),
        ],
    )
    .await;
}

#[tokio::test]
async fn the_workloads_carry_the_value_of_the_pools_priority_class() {
    let urgent = urgent_pool();
    let mut steps = vec![step(
        Method::GET,
        URGENT,
        200,
        json!({
            "apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
            "metadata": {"name": "urgent"}, "value": 100000
        }),
    )];
    steps.extend(settled_start(&urgent, vec![], Some(vec![])));
    steps.extend([
        step(Method::POST, WORKLOADS, 201, stored_workload()).check(|body| {
            assert_eq!(body["spec"]["priorityClassName"], "urgent");
            assert_eq!(
                body["spec"]["priorityClassSource"],
                "scheduling.k8s.io/priorityclass"
            );
            assert_eq!(body["spec"]["priority"], 100000);
        }),
        step(Method::PATCH, STATUS, 200, stored()),
        event("WaitingForQuota"),
        event("NoReadyReplicas"),
        event("WaitingForAdmission"),
        event("AsExpected"),
    ]);
    scenario(urgent, steps).await;
}

#[test]
fn a_priority_class_wakes_only_the_pools_that_name_it() {
    let class: PriorityClass = serde_json::from_value(json!({
        "metadata": {"name": "urgent"}, "value": 100000
    }))
    .unwrap();
    let mut elsewhere = urgent_pool();
    elsewhere.metadata.namespace = Some("team-b".to_owned());
    let pools = [urgent_pool(), pool(1, true, None), elsewhere].map(Arc::new);
    let woken: Vec<String> = model_pool::pools_naming(&class, pools)
        .map(|r| format!("{}/{}", r.namespace.unwrap_or_default(), r.name))
        .collect();
    assert_eq!(woken, ["team-a/gemma", "team-b/gemma"]);
}

#[test]
fn every_child_is_owned_by_its_pool_so_deleting_the_pool_removes_them() {
    let pool = pool(1, true, None);
    let template = build::worker_template(&pool, &settings()).unwrap();
    let pod: Pod = build::pod(&pool, &template, 0, &Placement::default());
    let wl: Workload = build::workload(&pool, &template, 0, None);
    let owners = [
        pod.metadata.owner_references.clone(),
        wl.metadata.owner_references.clone(),
        build::service(&pool).metadata.owner_references,
        build::network_policy(&pool, &settings())
            .metadata
            .owner_references,
    ];
    for owner in owners {
        let owner = &owner.unwrap()[0];
        assert_eq!(
            (
                owner.uid.as_str(),
                owner.controller,
                owner.block_owner_deletion
            ),
            ("pool-uid", Some(true), Some(true))
        );
    }
    assert_eq!(pod.name_any(), "gemma-0");
}

#[tokio::test]
async fn an_external_pool_is_available_when_its_endpoint_serves_the_model() {
    // A real OpenAI-style /v1/models endpoint on loopback.
    let app = axum::Router::new().route(
        "/v1/models",
        axum::routing::get(|| async {
            axum::Json(json!({"object": "list", "data": [{"id": "llama-3", "object": "model"}]}))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let external = |model: &str| {
        let spec: ModelPoolSpec =
            serde_yaml_ng::from_str(&format!("external: {{url: '{url}', model: {model}}}"))
                .unwrap();
        let mut pool = ModelPool::new("gemma", spec);
        pool.metadata.namespace = Some(NS.to_owned());
        pool.metadata.uid = Some("pool-uid".to_owned());
        pool
    };
    scenario(
        external("llama-3"),
        vec![
            step(Method::PATCH, STATUS, 200, stored()).check(|body| {
                let (status, reason, _) = condition(body, "Available");
                assert_eq!(
                    (status.as_str(), reason.as_str()),
                    ("True", "EndpointServesModel")
                );
            }),
            event("NoQueue"),
            event("EndpointServesModel"),
            event("AsExpected"),
        ],
    )
    .await;
    scenario(
        external("gpt-4"),
        vec![
            step(Method::PATCH, STATUS, 200, stored()).check(|body| {
                let why = "does not serve gpt-4 (it serves: llama-3): fix spec.external.model";
                says(body, "Available", ("False", "EndpointUnavailable", why));
            }),
            event("NoQueue"),
            event("EndpointUnavailable"),
            event("EndpointUnavailable"),
        ],
    )
    .await;
}

#[tokio::test]
async fn a_pool_the_tenancy_policy_refuses_gets_its_status_and_nothing_else() {
    // Refused by the chart's default policy: a node path, another image, no queue and a
    // PriorityClass off the list. The scenario answers only the status write, so any
    // Service, NetworkPolicy, Pod or Workload the reconcile tried to create fails it.
    let strict = Settings {
        tenancy: Policy::default(),
        ..settings()
    };
    let mut escaping = urgent_pool();
    escaping.spec = serde_yaml_ng::from_str(
        "model: {source: 'file:///etc'}\ntemplate: {image: 'evil/miner:1'}\npriorityClassName: system-node-critical",
    )
    .unwrap();
    scenario_under(
        strict.clone(),
        escaping,
        vec![
            step(Method::PATCH, STATUS, 200, stored()).check(|body| {
                let (status, reason, message) = condition(body, "Available");
                assert_eq!(
                    (status.as_str(), reason.as_str()),
                    ("False", "PolicyDenied")
                );
                for field in [
                    "spec.model.source: file:///etc mounts a node path",
                    "spec.template.image: evil/miner:1 is not an allowed worker image",
                    "spec.queueName: a pool that runs workers must name",
                    "spec.priorityClassName: PriorityClass system-node-critical",
                ] {
                    assert!(message.contains(field), "{field:?} in {message}");
                }
                assert_eq!(condition(body, "Degraded").1, "PolicyDenied");
            }),
            event("PolicyDenied"),
            event("PolicyDenied"),
            event("PolicyDenied"),
        ],
    )
    .await;

    // An external pool on loopback is refused before anything connects to it.
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = hits.clone();
    let app = axum::Router::new().fallback(move || {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async { "{}" }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let mut external = pool(1, false, None);
    external.spec =
        serde_yaml_ng::from_str(&format!("external: {{url: '{url}', model: m}}")).unwrap();
    scenario_under(
        strict,
        external,
        vec![
            step(Method::PATCH, STATUS, 200, stored()).check(|body| {
                let (_, reason, message) = condition(body, "Available");
                assert_eq!(reason, "PolicyDenied");
                assert!(
                    message.contains("spec.external.url: 127.0.0.1 is in 127.0.0.0/8"),
                    "{message}"
                );
            }),
            event("PolicyDenied"),
            event("PolicyDenied"),
            event("PolicyDenied"),
        ],
    )
    .await;
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the endpoint was never called"
    );
}

#[tokio::test]
async fn another_owners_service_is_named_as_a_conflict_and_never_taken_over() {
    let direct = pool(1, false, None);
    let mut foreign = existing_service(&direct);
    foreign["metadata"]["ownerReferences"] = json!(null);
    foreign["metadata"]["annotations"] = json!(null);
    scenario(
        direct,
        vec![
            // Only a read: an apply over the Service would fail the scenario.
            step(Method::GET, SVC, 200, foreign),
            step(Method::PATCH, STATUS, 200, stored()).check(|body| {
                says(
                    body,
                    "Available",
                    (
                        "False",
                        "NameConflict",
                        "Service gemma-workers exists and is not this pool's",
                    ),
                );
            }),
            event("NameConflict"),
            event("NameConflict"),
            event("NameConflict"),
        ],
    )
    .await;
}

#[tokio::test]
async fn a_labelled_pod_of_another_owner_is_neither_a_replica_nor_deleted() {
    let direct = pool(1, false, None);
    // Ready, labelled as replica 5 of the pool, beyond its one replica: a pod the pool
    // made would be deleted; this one is not the pool's.
    let mut foreign = built_pod(&direct, 5, &Placement::default(), true);
    foreign["metadata"]["ownerReferences"] = json!(null);
    let mut steps = settled_start(
        &direct,
        vec![built_pod(&direct, 0, &Placement::default(), false), foreign],
        None,
    );
    steps.extend([
        step(Method::PATCH, STATUS, 200, stored()).check(|body| {
            assert_eq!(body["status"]["readyReplicas"], 0, "{body}");
        }),
        event("NoQueue"),
        event("NoReadyReplicas"),
        event("ReplicasStarting"),
        event("AsExpected"),
    ]);
    scenario(direct, steps).await;
}

const KEY: &str = "/api/v1/namespaces/team-a/secrets/vllm-key";

#[tokio::test]
async fn an_external_pools_api_key_is_read_from_its_secret_and_never_shown() {
    // An endpoint that serves its models only with the right bearer token.
    let app = axum::Router::new().route(
        "/v1/models",
        axum::routing::get(|headers: axum::http::HeaderMap| async move {
            if headers.get("authorization").and_then(|v| v.to_str().ok())
                != Some("Bearer sk-live-1")
            {
                return (axum::http::StatusCode::UNAUTHORIZED, axum::Json(json!({})))
                    .into_response();
            }
            axum::Json(json!({"object": "list", "data": [{"id": "llama-3"}]})).into_response()
        }),
    );
    use axum::response::IntoResponse;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let mut keyed = pool(1, false, None);
    keyed.spec = serde_yaml_ng::from_str(&format!(
        "external: {{url: '{url}', model: llama-3, apiKeySecretRef: {{name: vllm-key, key: token}}}}"
    ))
    .unwrap();
    // "sk-live-1\n", as `kubectl create secret --from-file` stores a file with its newline.
    let mut secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "vllm-key", "labels": {"kubeswarm.dev/api-key": "true"}}, "data": {"token": "c2stbGl2ZS0xCg=="}});
    scenario(
        keyed.clone(),
        vec![
            step(Method::GET, KEY, 200, secret.clone()),
            step(Method::PATCH, STATUS, 200, stored()).check(|body| {
                assert_eq!(
                    condition(body, "Available").1,
                    "EndpointServesModel",
                    "{body}"
                );
            }),
            event("NoQueue"),
            event("EndpointServesModel"),
            event("AsExpected"),
        ],
    )
    .await;

    // A Secret its owner did not mark as an endpoint's key (a database password a tenant
    // who cannot read Secrets names, to have it sent to a server of its own) is never
    // sent: the pool waits for the label, and the endpoint sees no request. Without the
    // RoleBinding the read is forbidden: the pool says which one it needs.
    secret["metadata"]["labels"] = json!({});
    for (read, says_why) in [
        (
            step(Method::GET, KEY, 200, secret),
            "Secret vllm-key is not labelled kubeswarm.dev/api-key=true, so the operator sends none of its keys anywhere: if it holds this endpoint's key, label it (kubectl label secret vllm-key -n team-a kubeswarm.dev/api-key=true)",
        ),
        (
            step(Method::GET, KEY, 403, forbidden("secrets \"vllm-key\"")),
            "the operator may not read Secret vllm-key in namespace team-a: grant it with a RoleBinding in team-a to the ClusterRole kubeswarm-api-keys",
        ),
    ] {
        scenario(
            keyed.clone(),
            vec![
                read,
                step(Method::PATCH, STATUS, 200, stored()).check(move |body| {
                    says(body, "Available", ("False", "ApiKeyUnavailable", says_why));
                    assert!(!body.to_string().contains("sk-live"));
                }),
                event("NoQueue"),
                event("ApiKeyUnavailable"),
                event("ApiKeyUnavailable"),
            ],
        )
        .await;
    }
}
