//! The SwarmJob's result object (a ConfigMap, or a Secret where the platform team asks for
//! one) as the engine's checkpoint store, request by request.

use std::collections::BTreeMap;

use http::Method;
use kube::client::Body;
use kubeswarm::api::{SwarmJob, SwarmJobSpec};
use kubeswarm::controllers::swarm_job::store::{Kind, ResultStore, Results};
use kubeswarm::swarm::record::{Store, StoreError};
use serde_json::{Value, json};

use crate::harness::{NS, forbidden, not_found, serve, step};

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
    let steps = vec![
        // A new job: nothing recorded yet.
        step(
            Method::GET,
            &format!("{CM}/gallery-result"),
            404,
            not_found(),
        ),
        // The first checkpoint: the merge finds no ConfigMap, so it is created, owned by
        // the job, with the entry.
        step(
            Method::PATCH,
            &format!("{CM}/gallery-result"),
            404,
            not_found(),
        )
        .check(|body| {
            assert_eq!(
                body,
                &json!({"data": {"subagent-000.json": "{\"index\":0}"}})
            );
        }),
        step(
            Method::POST,
            CM,
            201,
            stored(json!({"subagent-000.json": "{\"index\":0}"})),
        )
        .check(|body| {
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
        }),
        // Later checkpoints merge: only their entries are sent, the others stay.
        step(
            Method::PATCH,
            &format!("{CM}/gallery-result"),
            200,
            stored(json!({})),
        )
        .check(|body| {
            assert_eq!(
                body,
                &json!({"data": {"subagent-001.json": "{\"index\":1}", "usage.json": "{}"}})
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

/// A store whose first request, `method` on its object, the API server refuses with
/// `code`: 403 (RBAC) or 422 (over the object's size limit).
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
    let refusal = step(method, &format!("{path}/gallery-result"), code, reply);
    (store, tokio::spawn(serve(handle, vec![refusal])))
}

#[tokio::test]
async fn a_refused_write_names_the_configmap_and_one_over_the_size_limit_is_too_large() {
    for code in [403, 422] {
        let (store, server) = refusing(&Results::default(), Method::PATCH, code);
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
        step(
            Method::PATCH,
            &format!("{SECRETS}/gallery-result"),
            404,
            not_found(),
        )
        .check(move |body| assert_eq!(body, &json!({"data": {"subagent-000.json": record}}))),
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
            assert_eq!(body["data"], json!({"subagent-000.json": record}));
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
