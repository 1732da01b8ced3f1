//! The SwarmJob's result object (a ConfigMap, or a Secret where the platform team asks for
//! one) as the engine's checkpoint store, request by request.

use std::collections::BTreeMap;

use http::Method;
use kube::client::Body;
use kubeswarm::api::{SwarmJob, SwarmJobSpec};
use kubeswarm::controllers::swarm_job::store::{Kind, ResultStore, Results, WRITER};
use kubeswarm::swarm::record::{Store, StoreError};
use serde_json::{Value, json};

use crate::harness::{NS, forbidden, not_found, serve, step};
use crate::objects::Objects;

const CM: &str = "/api/v1/namespaces/team-a/configmaps";
const SECRETS: &str = "/api/v1/namespaces/team-a/secrets";

/// Results of namespace team-a kept in Secrets.
fn in_secrets() -> Results {
    Results {
        secret_namespaces: [NS.to_owned()].into(),
        role: "kubeswarm-results".to_owned(),
    }
}

fn job() -> SwarmJob {
    let spec: SwarmJobSpec = serde_yaml_ng::from_str(
        "task: Draw.\nfanOut: {pool: gemma, subagents: 2}\nverification: {mode: none}\naggregation: {strategy: collect}\n",
    )
    .unwrap();
    let mut job = SwarmJob::new("gallery", spec);
    job.metadata.namespace = Some(NS.to_owned());
    job.metadata.uid = Some("job-uid".to_owned());
    job
}

/// `object` at resourceVersion `version`.
fn with_version(mut object: Value, version: &str) -> Value {
    object["metadata"]["resourceVersion"] = json!(version);
    object
}

fn stored(data: Value) -> Value {
    stored_for("job-uid", data)
}

/// The ConfigMap as the API server keeps it, owned by the job with `uid`.
fn stored_for(uid: &str, data: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "gallery-result", "namespace": NS, "ownerReferences": [{"apiVersion": "kubeswarm.dev/v1alpha1", "kind": "SwarmJob", "name": "gallery", "uid": uid, "controller": true}]}, "data": data})
}

#[tokio::test]
async fn checkpoints_create_the_owned_configmap_then_merge_into_it() {
    let (service, handle) = tower_test::mock::pair::<http::Request<Body>, http::Response<Body>>();
    let store = ResultStore::new(kube::Client::new(service, NS), &job(), &Results::default());
    let first = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
    let written = first.clone();
    let steps = vec![
        // A new job: nothing recorded yet.
        step(
            Method::GET,
            &format!("{CM}/gallery-result"),
            404,
            not_found(),
        ),
        // The first checkpoint: there was no ConfigMap, so it is created, owned by the
        // job, with the entry and the name of the engine run that writes it.
        step(
            Method::POST,
            CM,
            201,
            with_version(stored(json!({"subagent-000.json": "{\"index\":0}"})), "10"),
        )
        .check(move |body| {
            let owner = &body["metadata"]["ownerReferences"][0];
            assert_eq!(
                (
                    owner["kind"].as_str(),
                    owner["uid"].as_str(),
                    owner["controller"].as_bool()
                ),
                (Some("SwarmJob"), Some("job-uid"), Some(true))
            );
            assert_eq!(
                body["metadata"]["labels"]["kubeswarm.dev/swarm-job"],
                "gallery"
            );
            assert_eq!(body["data"]["subagent-000.json"], "{\"index\":0}");
            *first.lock().unwrap() = body["data"][WRITER].as_str().map(str::to_owned);
        }),
        // Later checkpoints merge: only their entries are sent, the others stay; and only
        // into the version this store wrote.
        step(
            Method::PATCH,
            &format!("{CM}/gallery-result"),
            200,
            with_version(stored(json!({})), "11"),
        )
        .check(move |body| {
            let writer = written.lock().unwrap().clone().expect("the create named a writer");
            assert_eq!(writer.len(), 16, "{writer}");
            assert_eq!(
                body,
                &json!({"metadata": {"resourceVersion": "10"}, "data": {"subagent-001.json": "{\"index\":1}", "usage.json": "{}", WRITER: writer}})
            );
        }),
        // A restarted operator reads every entry back.
        step(
            Method::GET,
            &format!("{CM}/gallery-result"),
            200,
            stored(
                json!({"subagent-000.json": "{\"index\":0}", "subagent-001.json": "{\"index\":1}"}),
            ),
        ),
    ];
    let server = tokio::spawn(serve(handle, steps));
    assert!(store.load().await.unwrap().is_empty());
    store
        .save(vec![(
            "subagent-000.json".to_owned(),
            "{\"index\":0}".to_owned(),
        )])
        .await
        .unwrap();
    store
        .save(vec![
            ("subagent-001.json".to_owned(), "{\"index\":1}".to_owned()),
            ("usage.json".to_owned(), "{}".to_owned()),
        ])
        .await
        .unwrap();
    let loaded = store.load().await.unwrap();
    assert_eq!(
        loaded,
        BTreeMap::from([
            ("subagent-000.json".to_owned(), "{\"index\":0}".to_owned()),
            ("subagent-001.json".to_owned(), "{\"index\":1}".to_owned()),
        ])
    );
    server.await.unwrap();
}

/// A store whose first request, `method` (a GET of its object, or a POST that creates it),
/// the API server refuses with `code`: 403 (RBAC) or 422 (over the object's size limit).
fn refusing(
    results: &Results,
    method: Method,
    code: u16,
) -> (ResultStore, tokio::task::JoinHandle<()>) {
    let (service, handle) = tower_test::mock::pair::<http::Request<Body>, http::Response<Body>>();
    let store = ResultStore::new(kube::Client::new(service, NS), &job(), results);
    let (path, what) = match store.kind() {
        Kind::ConfigMap => (CM, "configmaps"),
        Kind::Secret => (SECRETS, "secrets"),
    };
    let reply = match code {
        403 => forbidden(&format!("{what} \"gallery-result\"")),
        _ => {
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid", "code": code,
                    "message": "ConfigMap \"gallery-result\" is invalid: []: Too long: must have at most 1048576 bytes"})
        }
    };
    let at = match method {
        Method::POST => path.to_owned(),
        _ => format!("{path}/gallery-result"),
    };
    let refusal = step(method, &at, code, reply);
    (store, tokio::spawn(serve(handle, vec![refusal])))
}

#[tokio::test]
async fn a_refused_write_names_the_configmap_and_one_over_the_size_limit_is_too_large() {
    for code in [403, 422] {
        let (store, server) = refusing(&Results::default(), Method::POST, code);
        let err = store
            .save(vec![("answer".to_owned(), "x".to_owned())])
            .await
            .unwrap_err();
        let said = kubeswarm::telemetry::chain(&err);
        match code {
            // RBAC, or anything else: an error of the backend, which the engine retries.
            403 => assert!(
                said.starts_with("writing ConfigMap gallery-result: "),
                "{said}"
            ),
            // Too large: never retried, the job fails ResultTooLarge.
            _ => assert!(
                matches!(&err, StoreError::TooLarge { place, message }
                    if place == "ConfigMap gallery-result" && message.contains("Too long")),
                "{err:?}"
            ),
        }
        server.await.unwrap();
    }
}

#[tokio::test]
async fn the_records_of_a_job_of_the_same_name_are_not_read_as_this_ones() {
    let (service, handle) = tower_test::mock::pair::<http::Request<Body>, http::Response<Body>>();
    let store = ResultStore::new(kube::Client::new(service, NS), &job(), &Results::default());
    let server = tokio::spawn(serve(
        handle,
        vec![step(
            Method::GET,
            &format!("{CM}/gallery-result"),
            200,
            stored_for(
                "deleted-job-uid",
                json!({"answer": "the old answer", "result.json": "{}"}),
            ),
        )],
    ));
    let err = store.load().await.unwrap_err();
    let said = kubeswarm::telemetry::chain(&err);
    assert!(
        said.contains(
            "ConfigMap gallery-result belongs to another job (SwarmJob gallery uid deleted-job-uid)"
        ),
        "{said}"
    );
    server.await.unwrap();
}

#[tokio::test]
async fn in_a_secret_namespace_the_records_go_in_an_owned_secret_base64_encoded() {
    let (service, handle) = tower_test::mock::pair::<http::Request<Body>, http::Response<Body>>();
    let store = ResultStore::new(kube::Client::new(service, NS), &job(), &in_secrets());
    // "{\"index\":0}" and "42" in base64, as a Secret's data holds them.
    let (record, answer) = ("eyJpbmRleCI6MH0=", "NDI=");
    let steps = vec![
        step(Method::POST, SECRETS, 201, json!({})).check(move |body| {
            assert_eq!(
                (body["kind"].as_str(), body["type"].as_str()),
                (Some("Secret"), Some("Opaque"))
            );
            let owner = &body["metadata"]["ownerReferences"][0];
            assert_eq!(
                (owner["uid"].as_str(), owner["controller"].as_bool()),
                (Some("job-uid"), Some(true))
            );
            assert_eq!(body["data"]["subagent-000.json"], record);
            // The writer's name is base64 too: 16 hex digits are 24 characters.
            assert_eq!(body["data"][WRITER].as_str().map(str::len), Some(24));
        }),
        step(
            Method::GET,
            &format!("{SECRETS}/gallery-result"),
            200,
            json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                   "metadata": {"name": "gallery-result", "namespace": NS, "ownerReferences": [{"apiVersion": "kubeswarm.dev/v1alpha1", "kind": "SwarmJob", "name": "gallery", "uid": "job-uid", "controller": true}]},
                   "data": {"subagent-000.json": record, "answer": answer}}),
        ),
    ];
    let server = tokio::spawn(serve(handle, steps));
    store
        .save(vec![(
            "subagent-000.json".to_owned(),
            "{\"index\":0}".to_owned(),
        )])
        .await
        .unwrap();
    assert_eq!(
        store.load().await.unwrap(),
        BTreeMap::from([
            ("answer".to_owned(), "42".to_owned()),
            ("subagent-000.json".to_owned(), "{\"index\":0}".to_owned()),
        ])
    );
    server.await.unwrap();
}

#[tokio::test]
async fn a_secret_the_operator_may_not_write_names_the_rolebinding_to_add() {
    let (store, server) = refusing(&in_secrets(), Method::GET, 403);
    let said = kubeswarm::telemetry::chain(&store.load().await.unwrap_err());
    assert_eq!(
        said,
        "the operator may not write Secret gallery-result: grant it with a RoleBinding in team-a to the ClusterRole kubeswarm-results (Helm value results.secretNamespaces)"
    );
    server.await.unwrap();
}

const OBJECT: &str = "/api/v1/namespaces/team-a/configmaps/gallery-result";

fn entry(key: &str) -> Vec<(String, String)> {
    vec![(key.to_owned(), "{}".to_owned())]
}

/// The writer named in the stored ConfigMap, and its entries' keys.
fn stored_records(objects: &Objects) -> (String, Vec<String>) {
    let object = objects.get(OBJECT).expect("the ConfigMap exists");
    let data = object["data"].as_object().unwrap();
    (
        data[WRITER].as_str().unwrap().to_owned(),
        data.keys().filter(|k| *k != WRITER).cloned().collect(),
    )
}

#[tokio::test]
async fn a_deposed_leaders_engine_stops_instead_of_overwriting_the_new_leaders_records() {
    let objects = Objects::default();
    let old = ResultStore::new(objects.client(), &job(), &Results::default());
    assert!(old.load().await.unwrap().is_empty());
    old.save(entry("subagent-000.json")).await.unwrap();
    let (old_writer, _) = stored_records(&objects);

    // The new leader resumes from the records and writes its own.
    let new = ResultStore::new(objects.client(), &job(), &Results::default());
    assert!(new.load().await.unwrap().contains_key("subagent-000.json"));
    new.save(entry("subagent-001.json")).await.unwrap();
    let (new_writer, _) = stored_records(&objects);
    assert_ne!(new_writer, old_writer);

    // The deposed leader's next checkpoint is refused, and it writes nothing.
    let err = old.save(entry("subagent-002.json")).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Superseded { place, writer }
            if place == "ConfigMap gallery-result" && *writer == new_writer),
        "{err:?}"
    );
    assert_eq!(
        stored_records(&objects),
        (
            new_writer,
            vec![
                "subagent-000.json".to_owned(),
                "subagent-001.json".to_owned()
            ]
        )
    );
}

#[tokio::test]
async fn a_new_engine_takes_the_records_over_even_after_the_old_one_wrote_since_its_read() {
    let objects = Objects::default();
    let old = ResultStore::new(objects.client(), &job(), &Results::default());
    old.save(entry("subagent-000.json")).await.unwrap();
    let new = ResultStore::new(objects.client(), &job(), &Results::default());
    new.load().await.unwrap();
    // The old engine checkpoints once more before the new one's first write: that write
    // is refused as stale, read again, and made at the new version.
    old.save(entry("subagent-001.json")).await.unwrap();
    new.save(entry("subagent-002.json")).await.unwrap();
    let (writer, keys) = stored_records(&objects);
    assert_eq!(keys.len(), 3, "{keys:?}");
    assert!(matches!(
        old.save(entry("subagent-003.json")).await,
        Err(StoreError::Superseded { writer: w, .. }) if w == writer
    ));
}

#[tokio::test]
async fn a_change_by_someone_else_is_written_over_not_taken_for_a_new_writer() {
    let objects = Objects::default();
    let store = ResultStore::new(objects.client(), &job(), &Results::default());
    store.save(entry("subagent-000.json")).await.unwrap();
    objects.touch(OBJECT, &json!({"metadata": {"labels": {"team": "a"}}}));
    store.save(entry("subagent-001.json")).await.unwrap();
    let object = objects.get(OBJECT).unwrap();
    assert_eq!(object["metadata"]["labels"]["team"], "a");
    assert!(object["data"]["subagent-001.json"].is_string());
    // Deleted under it: created again, with the entry.
    objects.remove(OBJECT);
    store.save(entry("subagent-002.json")).await.unwrap();
    assert!(objects.get(OBJECT).unwrap()["data"]["subagent-002.json"].is_string());
}
