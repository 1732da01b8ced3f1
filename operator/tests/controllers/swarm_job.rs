//! The SwarmJob controller, request by request: the reconcile's writes, and the engine's
//! checkpoints into the result ConfigMap, against a mock API server; model calls go to
//! a scripted OpenAI-compatible server on loopback.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::channel::mpsc::UnboundedReceiver;
use http::{Method, Request, Response};
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kubeswarm::api::{ModelPool, ModelPoolSpec, SwarmJob, SwarmJobSpec};
use kubeswarm::controllers::swarm_job::store::Results;
use kubeswarm::controllers::swarm_job::{Context, FINALIZER, reconcile};
use kubeswarm::metrics::Metrics;
use kubeswarm::swarm::Options;
use kubeswarm::tenancy::{self, External, Policy};
use serde_json::{Value, json};

use crate::harness::{
    NS, condition, event, forbidden, list, not_found, recorder, says, serve, step,
};
use kubeswarm_test_support::mock::{Mock, Reply, part, text};

const POOLS: &str = "/apis/kubeswarm.dev/v1alpha1/namespaces/team-a/modelpools";
const PODS: &str = "/api/v1/namespaces/team-a/pods";
const JOB: &str = "/apis/kubeswarm.dev/v1alpha1/namespaces/team-a/swarmjobs/review";
const JOB_STATUS: &str = "/apis/kubeswarm.dev/v1alpha1/namespaces/team-a/swarmjobs/review/status";
const CMS: &str = "/api/v1/namespaces/team-a/configmaps";
const CM: &str = "/api/v1/namespaces/team-a/configmaps/review-result";

/// Two subagents, one at a time so the engine's checkpoints come in a fixed order, on
/// the pool `ext`; collected without a gate.
const TWO: &str = "task: Name a colour.\nsubtasks: [warm, cold]\nfanOut: {pool: ext, subagents: 2, maxConcurrency: 1, maxTokens: 16, timeoutSeconds: 5, retries: 0}\nverification: {mode: none}\naggregation: {strategy: collect}\n";

fn job(yaml: &str, finalizer: bool, status: Value) -> SwarmJob {
    let spec: SwarmJobSpec = serde_yaml_ng::from_str(yaml).unwrap();
    let mut job = SwarmJob::new("review", spec);
    job.metadata.namespace = Some(NS.to_owned());
    job.metadata.uid = Some("job-uid".to_owned());
    job.metadata.generation = Some(1);
    job.metadata.resource_version = Some("5".to_owned());
    if finalizer {
        job.metadata.finalizers = Some(vec![FINALIZER.to_owned()]);
    }
    if !status.is_null() {
        job.status = Some(serde_json::from_value(status).unwrap());
    }
    job
}

/// A ModelPool serving `url` as an external endpoint, probed available.
fn external_pool(name: &str, url: &str) -> Value {
    let spec: ModelPoolSpec =
        serde_yaml_ng::from_str(&format!("external: {{url: '{url}', model: m}}")).unwrap();
    let mut pool = serde_json::to_value(ModelPool::new(name, spec)).unwrap();
    pool["apiVersion"] = json!("kubeswarm.dev/v1alpha1");
    pool["kind"] = json!("ModelPool");
    pool["metadata"]["namespace"] = json!(NS);
    pool["status"] = json!({"conditions": [{"type": "Available", "status": "True", "reason": "EndpointServesModel", "message": "", "lastTransitionTime": "2026-11-22T10:00:00Z"}]});
    pool
}

/// The stored job at `version`, as the API server answers a write that moved it.
fn at_version(version: &str) -> Value {
    let mut stored = stored_job();
    stored["metadata"]["resourceVersion"] = json!(version);
    stored
}

fn stored_job() -> Value {
    let mut value = serde_json::to_value(job(TWO, true, Value::Null)).unwrap();
    value["apiVersion"] = json!("kubeswarm.dev/v1alpha1");
    value["kind"] = json!("SwarmJob");
    value
}

/// The result ConfigMap as stored, at resourceVersion 7.
fn configmap(data: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "review-result", "namespace": NS, "resourceVersion": "7", "ownerReferences": [{"apiVersion": "kubeswarm.dev/v1alpha1", "kind": "SwarmJob", "name": "review", "uid": "job-uid", "controller": true}]}, "data": data})
}

struct Harness {
    ctx: Arc<Context>,
    woken: UnboundedReceiver<ObjectRef<SwarmJob>>,
    server: tokio::task::JoinHandle<()>,
}

/// A context whose API calls are answered by `steps`, in order, across every reconcile
/// and the engine's checkpoints.
fn loopback() -> External {
    External {
        allow: vec!["127.0.0.0/8".parse().unwrap()],
        deny: Vec::new(),
    }
}

fn harness(steps: Vec<crate::harness::Step>) -> Harness {
    harness_keeping(steps, Results::default())
}

/// A harness whose operator keeps `results` as given.
fn harness_keeping(steps: Vec<crate::harness::Step>, results: Results) -> Harness {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, NS);
    let (wake, woken) = futures::channel::mpsc::unbounded();
    let ctx = Arc::new(Context {
        client: client.clone(),
        http: reqwest::Client::new(),
        // The scenarios' external pools are mock endpoints on loopback.
        external_http: tenancy::external_client(&loopback()),
        tenancy: Policy {
            external: loopback(),
            ..Policy::default()
        },
        worker_image: "ghcr.io/kubeswarm/inference-worker:0.1.0".to_owned(),
        api_key_role: "kubeswarm-api-keys".to_owned(),
        worker_key: "a key of at least thirty-two characters".to_owned(),
        results,
        response_limit: kubeswarm::swarm::MAX_RESPONSE_BYTES,
        tests: kubeswarm::controllers::swarm_job::sandbox::Settings {
            image: None,
            cpu: "1".into(),
            memory: "512Mi".into(),
        },
        recorder: recorder(client),
        metrics: Arc::new(Metrics::default()),
        backoff: Default::default(),
        runs: Default::default(),
        wake,
        options: Options {
            backoff_base: Duration::from_millis(1),
            backoff_cap: Duration::from_millis(5),
            ..Options::default()
        },
    });
    Harness {
        ctx,
        woken,
        server: tokio::spawn(serve(handle, steps)),
    }
}

impl Harness {
    async fn reconcile(&self, job: SwarmJob) -> Action {
        self.attempt(job).await.expect("reconcile")
    }

    async fn attempt(
        &self,
        job: SwarmJob,
    ) -> Result<Action, kubeswarm::controllers::swarm_job::Error> {
        tokio::time::timeout(
            Duration::from_secs(10),
            reconcile(Arc::new(job), self.ctx.clone()),
        )
        .await
        .expect("the reconcile waited on a request the scenario does not answer")
    }

    /// Waits until the job's engine has ended (it wakes the controller last).
    async fn engine_ended(&mut self) {
        use futures::StreamExt;
        let key = format!("{NS}/review");
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if self
                    .ctx
                    .runs
                    .get(&key, "job-uid")
                    .is_some_and(|run| run.is_finished())
                {
                    return;
                }
                self.woken.next().await.expect("the wake channel is open");
            }
        })
        .await
        .expect("the engine did not end");
    }

    async fn done(self) {
        self.server.await.expect("the mock API server's checks");
    }
}

/// Keeps a status write's body, to feed the next reconcile.
fn kept() -> (Arc<Mutex<Value>>, impl Fn(&Value) + Send + 'static) {
    let kept = Arc::new(Mutex::new(Value::Null));
    let k = kept.clone();
    (kept, move |body: &Value| {
        *k.lock().unwrap() = body["status"].clone()
    })
}

fn reason(body: &Value, type_: &str) -> String {
    condition(body, type_).1
}

/// A checkpoint: a merge into the result ConfigMap at the version last seen.
fn merge() -> crate::harness::Step {
    step(Method::PATCH, CM, 200, configmap(json!({}))).check(|body| {
        assert_eq!(body["metadata"]["resourceVersion"], "7", "{body}");
        assert!(body["data"]["writer"].is_string(), "{body}");
    })
}

/// The engine's checkpoints for a collect job without a gate: each subagent is recorded
/// with its output, then finished; then the result; then the records are read back.
fn checkpoints(first_save_creates: bool, subagents: &[usize]) -> Vec<crate::harness::Step> {
    let mut steps = Vec::new();
    for (n, index) in subagents.iter().enumerate() {
        let key = format!("subagent-{index:03}.json");
        if n == 0 && first_save_creates {
            steps.push(
                step(Method::POST, CMS, 201, configmap(json!({}))).check(|body| {
                    assert_eq!(body["metadata"]["ownerReferences"][0]["uid"], "job-uid");
                }),
            );
        } else {
            steps.push(merge());
        }
        steps.push(
            step(Method::PATCH, CM, 200, configmap(json!({}))).check(move |body| {
                assert_eq!(body["metadata"]["resourceVersion"], "7", "{body}");
                let record: Value =
                    serde_json::from_str(body["data"][&key].as_str().unwrap()).unwrap();
                assert_eq!(record["stage"], "finished", "{record}");
            }),
        );
    }
    steps.push(
        step(Method::PATCH, CM, 200, configmap(json!({}))).check(|body| {
            assert_eq!(body["metadata"]["resourceVersion"], "7", "{body}");
            assert!(body["data"]["answer"].is_string(), "{body}");
        }),
    );
    steps.push(step(Method::GET, CM, 200, configmap(json!({}))));
    steps
}

#[tokio::test]
async fn a_job_runs_through_every_phase_to_complete_and_lets_go_of_its_finalizer() {
    let model = Mock::start("m", |body, _| text(part(body).to_uppercase())).await;
    let pools = list("ModelPool", vec![external_pool("ext", &model.url)]);
    let (started, keep_started) = kept();
    let (ended, keep_ended) = kept();
    let mut steps = vec![
        step(Method::GET, POOLS, 200, pools),
        step(Method::GET, PODS, 200, list("Pod", vec![])),
        step(Method::PATCH, JOB, 200, at_version("6")).check(|body| {
            assert_eq!(
                body,
                &json!({"metadata": {"finalizers": [FINALIZER], "resourceVersion": "5"}})
            );
        }),
        step(Method::PATCH, JOB_STATUS, 200, stored_job()).check(move |body| {
            // Conditional on the version the finalizer patch left, not the one read.
            assert_eq!(body["metadata"]["resourceVersion"], "6", "{body}");
            assert_eq!(reason(body, "Admitted"), "PoolsReady");
            assert_eq!(reason(body, "Planned"), "Pending");
            assert!(body["status"]["startTime"].is_string());
            keep_started(body);
        }),
        event("PoolsReady"),
        // The engine: nothing recorded yet.
        step(Method::GET, CM, 404, not_found()),
    ];
    steps.extend(checkpoints(true, &[0, 1]));
    steps.extend([
        // The API server answers the status write with the job's next resourceVersion.
        step(Method::PATCH, JOB_STATUS, 200, at_version("6")).check(move |body| {
            assert_eq!(body["metadata"]["resourceVersion"], "5", "{body}");
            for (type_, want) in [
                ("Planned", "SubtasksGiven"),
                ("FanOutComplete", "OutputsReceived"),
                ("Verified", "ChecksOnly"),
                ("Aggregated", "Aggregated"),
                ("Complete", "Succeeded"),
            ] {
                assert_eq!(condition(body, type_).0, "True", "{type_}: {body}");
                assert_eq!(reason(body, type_), want);
            }
            let status = &body["status"];
            assert_eq!(status["finishedSubagents"], 2);
            assert_eq!(status["subagents"][1]["state"], "Succeeded");
            assert_eq!(status["subagents"][1]["tokens"], 15);
            assert_eq!(
                status["usage"],
                json!([{"pool": "ext", "calls": 2, "promptTokens": 20, "completionTokens": 10}])
            );
            assert_eq!(status["result"]["configMapName"], "review-result");
            assert!(
                status["result"]["preview"]
                    .as_str()
                    .unwrap()
                    .contains("WARM"),
                "{status}"
            );
            assert!(status["completionTime"].is_string());
            keep_ended(body);
        }),
        event("SubtasksGiven"),
        event("OutputsReceived"),
        event("ChecksOnly"),
        event("Aggregated"),
        event("Succeeded"),
        step(Method::PATCH, JOB, 200, stored_job()).check(|body| {
            assert_eq!(body["metadata"]["finalizers"], json!([]));
            assert_eq!(
                body["metadata"]["resourceVersion"], "6",
                "conditional on the version the job's own status write made, not the one read before it (a 409 on every completed job)"
            );
        }),
    ]);
    let mut harness = harness(steps);

    let action = harness.reconcile(job(TWO, false, Value::Null)).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    harness.engine_ended().await;
    let status = started.lock().unwrap().clone();
    let action = harness.reconcile(job(TWO, true, status)).await;
    assert_eq!(action, Action::await_change());
    assert!(harness.ctx.runs.is_empty());
    assert_eq!(model.count(), 2);

    // Finished: a later reconcile writes nothing at all.
    let finished = ended.lock().unwrap().clone();
    harness.done().await;
    let quiet = self::harness(vec![]);
    assert_eq!(
        quiet.reconcile(job(TWO, false, finished)).await,
        Action::await_change()
    );
    quiet.done().await;
}

#[tokio::test]
async fn an_outcome_whose_status_write_meets_a_newer_job_is_written_on_the_next_reconcile() {
    let model = Mock::start("m", |body, _| text(part(body).to_uppercase())).await;
    let pools = list("ModelPool", vec![external_pool("ext", &model.url)]);
    let (started, keep_started) = kept();
    let mut steps = vec![
        step(Method::GET, POOLS, 200, pools),
        step(Method::GET, PODS, 200, list("Pod", vec![])),
        step(Method::PATCH, JOB, 200, stored_job()),
        step(Method::PATCH, JOB_STATUS, 200, stored_job()).check(move |body| keep_started(body)),
        event("PoolsReady"),
        step(Method::GET, CM, 404, not_found()),
    ];
    steps.extend(checkpoints(true, &[0, 1]));
    steps.extend([
        // The reconcile read the job at version 5; it has moved on since.
        step(
            Method::PATCH,
            JOB_STATUS,
            409,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409,
                   "message": "Operation cannot be fulfilled on swarmjobs.kubeswarm.dev \"review\": the object has been modified; please apply your changes to the latest version and try again"}),
        )
        .check(|body| assert_eq!(body["metadata"]["resourceVersion"], "5", "{body}")),
        // The next reconcile, on the job as it now is, writes the same outcome: no records
        // read, no model called, no engine started again.
        step(Method::PATCH, JOB_STATUS, 200, at_version("9")).check(|body| {
            assert_eq!(body["metadata"]["resourceVersion"], "8", "{body}");
            assert_eq!(reason(body, "Complete"), "Succeeded", "{body}");
            assert_eq!(body["status"]["usage"][0]["calls"], 2, "{body}");
        }),
        event("SubtasksGiven"),
        event("OutputsReceived"),
        event("ChecksOnly"),
        event("Aggregated"),
        event("Succeeded"),
        step(Method::PATCH, JOB, 200, stored_job())
            .check(|body| assert_eq!(body["metadata"]["resourceVersion"], "9", "{body}")),
    ]);
    let mut harness = harness(steps);
    harness.reconcile(job(TWO, false, Value::Null)).await;
    harness.engine_ended().await;
    let status = started.lock().unwrap().clone();
    let error = harness
        .attempt(job(TWO, true, status.clone()))
        .await
        .expect_err("the status write was refused");
    assert!(error.is_conflict(), "{error:?}");
    assert!(
        !harness.ctx.runs.is_empty(),
        "the run and its outcome are kept"
    );

    let mut newer = job(TWO, true, status);
    newer.metadata.resource_version = Some("8".to_owned());
    assert_eq!(harness.reconcile(newer).await, Action::await_change());
    assert!(harness.ctx.runs.is_empty());
    assert_eq!(model.count(), 2, "each subagent called once");
    harness.done().await;
}

#[tokio::test]
async fn a_restarted_operator_resumes_from_the_records_and_never_repeats_a_subagent() {
    let model = Mock::start("m", |body, _| text(part(body).to_uppercase())).await;
    // The endpoint wants an API key, which the job reads from the pool's Secret.
    let mut keyed = external_pool("ext", &model.url);
    keyed["spec"]["external"]["apiKeySecretRef"] = json!({"name": "ext-key", "key": "token"});
    let pools = list("ModelPool", vec![keyed]);
    // The last operator recorded subagent 0 and its usage, then died.
    let recorded = json!({
        "subagent-000.json": json!({"index": 0, "stage": "finished", "output": "EMBER", "promptTokens": 100, "completionTokens": 50, "attempts": 1, "verdict": {"pass": true, "issues": []}}).to_string(),
        "usage.json": json!({"ext": {"calls": 1, "promptTokens": 100, "completionTokens": 50}}).to_string(),
    });
    let earlier = json!({"startTime": "2026-11-22T09:00:00Z"});
    let mut steps = vec![
        step(Method::GET, POOLS, 200, pools),
        step(Method::GET, PODS, 200, list("Pod", vec![])),
        // base64 of "sk-ext-7".
        step(
            Method::GET,
            "/api/v1/namespaces/team-a/secrets/ext-key",
            200,
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "ext-key", "labels": {"kubeswarm.dev/api-key": "true"}}, "data": {"token": "c2stZXh0LTc="}}),
        ),
        step(Method::PATCH, JOB_STATUS, 200, stored_job()).check(|body| {
            assert_eq!(body["status"]["startTime"], "2026-11-22T09:00:00Z");
            assert!(!body.to_string().contains("sk-ext-7"));
        }),
        event("PoolsReady"),
        step(Method::GET, CM, 200, configmap(recorded)),
    ];
    steps.extend(checkpoints(false, &[1]));
    steps.extend([
        step(Method::PATCH, JOB_STATUS, 200, stored_job()).check(|body| {
            let status = &body["status"];
            assert_eq!(status["finishedSubagents"], 2);
            assert_eq!(
                status["subagents"][0]["tokens"], 150,
                "as recorded: {status}"
            );
            assert_eq!(
                status["usage"],
                json!([{"pool": "ext", "calls": 2, "promptTokens": 110, "completionTokens": 55}]),
                "the recorded usage plus the one new call"
            );
            assert_eq!(reason(body, "Complete"), "Succeeded");
        }),
        event("SubtasksGiven"),
        event("OutputsReceived"),
        event("ChecksOnly"),
        event("Aggregated"),
        event("Succeeded"),
        step(Method::PATCH, JOB, 200, stored_job()),
    ]);
    let mut harness = harness(steps);
    harness.reconcile(job(TWO, true, earlier.clone())).await;
    harness.engine_ended().await;
    let mut running = earlier;
    running["conditions"] = json!([{"type": "Admitted", "status": "True", "reason": "PoolsReady", "message": "", "lastTransitionTime": "2026-11-22T10:00:00Z"}]);
    harness.reconcile(job(TWO, true, running)).await;
    harness.done().await;
    assert_eq!(model.count(), 1, "only the unfinished subagent is called");
    assert!(part(&model.requests()[0]).contains("cold"));
    assert_eq!(model.authorizations(), [Some("Bearer sk-ext-7".to_owned())]);
}

#[tokio::test]
async fn deleting_a_running_job_cancels_its_calls_in_flight() {
    let model = Mock::start("m", |_, _| {
        Reply::After(Duration::from_secs(60), Box::new(text("late")))
    })
    .await;
    let pools = list("ModelPool", vec![external_pool("ext", &model.url)]);
    let steps = vec![
        step(Method::GET, POOLS, 200, pools),
        step(Method::GET, PODS, 200, list("Pod", vec![])),
        step(Method::PATCH, JOB_STATUS, 200, stored_job()),
        event("PoolsReady"),
        step(Method::GET, CM, 404, not_found()),
        // The delete: the run is cancelled, then the finalizer goes.
        step(Method::PATCH, JOB, 200, stored_job()).check(|body| {
            assert_eq!(body["metadata"]["finalizers"], json!([]));
        }),
    ];
    let harness = harness(steps);
    harness.reconcile(job(TWO, true, Value::Null)).await;
    wait_until(|| model.in_flight() == 1).await;

    let mut deleted = job(TWO, true, Value::Null);
    deleted.metadata.deletion_timestamp = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
    );
    assert_eq!(harness.reconcile(deleted).await, Action::await_change());
    wait_until(|| model.in_flight() == 0).await;
    assert!(harness.ctx.runs.is_empty());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(model.count(), 1, "no call starts after the delete");
    harness.done().await;
}

#[tokio::test]
async fn a_missing_pool_makes_the_job_wait_with_a_reason_not_fail() {
    let steps = vec![
        step(Method::GET, POOLS, 200, list("ModelPool", vec![])),
        step(Method::GET, PODS, 200, list("Pod", vec![])),
        step(Method::PATCH, JOB_STATUS, 200, stored_job()).check(|body| {
            let missing = "has no ModelPool ext: create it";
            says(body, "Admitted", ("False", "PoolNotFound", missing));
            assert!(body["status"].get("startTime").is_none());
            assert!(
                body["status"]["conditions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|c| c["type"] != "Failed")
            );
        }),
        event("PoolNotFound"),
    ];
    let harness = harness(steps);
    let action = harness.reconcile(job(TWO, false, Value::Null)).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    assert!(
        harness.ctx.runs.is_empty(),
        "no engine runs for a waiting job"
    );
    harness.done().await;
}

#[tokio::test]
async fn a_job_whose_results_go_in_secrets_waits_for_the_rolebinding_and_calls_nothing() {
    let forbidden = forbidden("secrets \"review-result\"");
    let steps = vec![
        step(
            Method::GET,
            POOLS,
            200,
            list(
                "ModelPool",
                vec![external_pool("ext", "http://127.0.0.1:9/v1")],
            ),
        ),
        step(Method::GET, PODS, 200, list("Pod", vec![])),
        step(
            Method::GET,
            "/api/v1/namespaces/team-a/secrets/review-result",
            403,
            forbidden,
        ),
        step(Method::PATCH, JOB_STATUS, 200, stored_job()).check(|body| {
            says(
                body,
                "Admitted",
                (
                    "False",
                    "ResultsUnwritable",
                    "grant it with a RoleBinding in team-a to the ClusterRole kubeswarm-results",
                ),
            );
            assert!(body["status"].get("startTime").is_none());
        }),
        event("ResultsUnwritable"),
    ];
    let harness = harness_keeping(
        steps,
        Results {
            secret_namespaces: [NS.to_owned()].into(),
            role: "kubeswarm-results".to_owned(),
        },
    );
    let action = harness.reconcile(job(TWO, false, Value::Null)).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    assert!(
        harness.ctx.runs.is_empty(),
        "no engine runs without its store"
    );
    harness.done().await;
}

const SCOPED: &str = "task: Name a colour.\nfanOut: {pool: worker, subagents: 2}\nverification: {mode: none}\naggregation: {strategy: collect}\npools:\n- name: worker\n  spec: {model: {source: pvc://weights/g.gguf}, queueName: team-a}\n";

fn owned_pool() -> Value {
    let job = job(SCOPED, false, Value::Null);
    let mut pool = serde_json::to_value(kubeswarm::controllers::swarm_job::build::job_pool(
        &job,
        &job.spec.pools[0],
    ))
    .unwrap();
    pool["apiVersion"] = json!("kubeswarm.dev/v1alpha1");
    pool["kind"] = json!("ModelPool");
    pool
}

/// A job letting go of its pools: the owned pool is listed, then deleted.
fn release_owned_pool() -> Vec<crate::harness::Step> {
    vec![
        step(
            Method::GET,
            POOLS,
            200,
            list("ModelPool", vec![owned_pool()]),
        ),
        step(
            Method::DELETE,
            &format!("{POOLS}/review-worker"),
            200,
            owned_pool(),
        ),
    ]
}

#[tokio::test]
async fn job_scoped_pools_are_created_for_the_job_and_it_waits_for_their_workers() {
    let steps = vec![
        step(Method::GET, POOLS, 200, list("ModelPool", vec![])),
        step(Method::POST, POOLS, 201, owned_pool()).check(|body| {
            assert_eq!(body["metadata"]["name"], "review-worker");
            assert_eq!(body["metadata"]["ownerReferences"][0]["uid"], "job-uid");
            assert_eq!(body["spec"]["queueName"], "team-a");
        }),
        step(Method::GET, PODS, 200, list("Pod", vec![])),
        step(Method::PATCH, JOB_STATUS, 200, stored_job()).check(|body| {
            let (_, reason, message) = condition(body, "Admitted");
            assert_eq!(reason, "PoolUnavailable");
            assert_eq!(
                message,
                "ModelPool review-worker is not available: no worker is ready yet"
            );
        }),
        event("PoolUnavailable"),
    ];
    let harness = harness(steps);
    harness.reconcile(job(SCOPED, false, Value::Null)).await;
    harness.done().await;
}

#[tokio::test]
async fn a_job_whose_own_pool_the_tenancy_policy_refuses_creates_nothing_and_waits_for_an_edit() {
    // Only the status write is answered: a listed or created pool would fail the scenario.
    let steps = vec![
        step(Method::PATCH, JOB_STATUS, 200, stored_job()).check(|body| {
            let (status, reason, message) = condition(body, "Admitted");
            assert_eq!((status.as_str(), reason.as_str()), ("False", "PolicyDenied"));
            assert!(
                message.starts_with("refused by the tenancy policy: spec.pools[0].spec.model.source: file:///var/log/pods mounts a node path"),
                "{message}"
            );
        }),
        event("PolicyDenied"),
    ];
    let harness = harness(steps);
    let escaping = SCOPED.replace("pvc://weights/g.gguf", "'file:///var/log/pods'");
    let action = harness.reconcile(job(&escaping, false, Value::Null)).await;
    assert_eq!(action, Action::await_change());
    assert!(harness.ctx.runs.is_empty());
    harness.done().await;
}

#[tokio::test]
async fn a_pool_of_another_owner_under_the_name_of_the_jobs_own_is_never_taken_over() {
    let mut squatter = owned_pool();
    squatter["metadata"]["ownerReferences"] = json!(null);
    squatter["metadata"]["uid"] = json!("someone-elses");
    // Reads and the status write only: an apply over the pool would fail the scenario.
    let steps = vec![
        step(Method::GET, POOLS, 200, list("ModelPool", vec![squatter])),
        step(Method::GET, PODS, 200, list("Pod", vec![])),
        step(Method::PATCH, JOB_STATUS, 200, stored_job()).check(|body| {
            says(
                body,
                "Admitted",
                (
                    "False",
                    "NameConflict",
                    "ModelPool review-worker exists and is not this job's",
                ),
            );
        }),
        event("NameConflict"),
    ];
    let harness = harness(steps);
    harness.reconcile(job(SCOPED, false, Value::Null)).await;
    harness.done().await;
}

#[tokio::test]
async fn a_suspended_job_releases_its_pools_and_says_so() {
    let mut steps = release_owned_pool();
    steps.extend([
        step(Method::GET, PODS, 200, list("Pod", vec![])),
        step(Method::PATCH, JOB_STATUS, 200, stored_job()).check(|body| {
            assert_eq!(reason(body, "Admitted"), "Suspended");
        }),
        event("Suspended"),
    ]);
    let harness = harness(steps);
    let suspended = job(&format!("{SCOPED}suspend: true\n"), false, Value::Null);
    assert_eq!(harness.reconcile(suspended).await, Action::await_change());
    harness.done().await;
}

#[tokio::test]
async fn a_finished_job_releases_its_pools_and_is_deleted_after_its_ttl() {
    let finished = json!({
        "startTime": "2026-01-02T09:00:00Z",
        "completionTime": "2026-01-02T09:05:00Z",
        "conditions": [{"type": "Complete", "status": "True", "reason": "Succeeded", "message": "", "lastTransitionTime": "2026-01-02T09:05:00Z"}],
    });
    let mut steps = release_owned_pool();
    steps.extend([
        step(Method::PATCH, JOB, 200, stored_job()).check(|body| {
            assert_eq!(body["metadata"]["finalizers"], json!([]));
        }),
        step(Method::DELETE, JOB, 200, stored_job()),
    ]);
    let harness = harness(steps);
    let job = job(
        &format!("{SCOPED}ttlSecondsAfterFinished: 60\n"),
        true,
        finished.clone(),
    );
    assert_eq!(harness.reconcile(job).await, Action::await_change());
    harness.done().await;

    // Within its ttl, a finished job without pools or finalizer waits for the rest of it.
    let mut recent = finished;
    recent["completionTime"] = json!(k8s_openapi::jiff::Timestamp::now().to_string());
    let harness = self::harness(vec![]);
    let action = harness
        .reconcile(self::job(
            &format!("{TWO}ttlSecondsAfterFinished: 3600\n"),
            false,
            recent,
        ))
        .await;
    assert_ne!(
        action,
        Action::await_change(),
        "requeued for the rest of its ttl"
    );
    harness.done().await;
}

async fn wait_until(condition: impl Fn() -> bool) {
    tokio::time::timeout(Duration::from_secs(5), async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("condition not reached in time");
}
