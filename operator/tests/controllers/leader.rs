//! The leader Lease: claimed, renewed, never taken from a live leader.

use http::{Method, Request, Response};
use kube::client::Body;
use serde_json::json;

use crate::harness::{NS, not_found, serve, step};
use kubeswarm::controllers::leader::Elector;

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/kubeswarm-system/leases";
const LEASE: &str =
    "/apis/coordination.k8s.io/v1/namespaces/kubeswarm-system/leases/kubeswarm-operator";

/// replica-a's elector, talking to the scenario's API server.
fn elector(service: tower_test::mock::Mock<Request<Body>, Response<Body>>) -> Elector {
    Elector::new(
        kube::Client::new(service, NS),
        "kubeswarm-system",
        "kubeswarm-operator",
        "replica-a".to_owned(),
    )
}

#[tokio::test(start_paused = true)]
async fn the_lease_is_claimed_renewed_and_never_taken_from_a_live_leader() {
    let held_by = |holder: &str, renewed: &str| {
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "kubeswarm-operator", "namespace": "kubeswarm-system", "resourceVersion": "5"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "renewTime": renewed, "leaseTransitions": 0}
        })
    };
    // replica-b's clock is an hour behind this one: every renewTime it writes is an hour
    // old by this clock, and must not read as a claim that ran out.
    let behind = ["2026-11-30T09:00:00.000000Z", "2026-11-30T09:00:05.000000Z"];
    let steps = vec![
        // No Lease yet: replica-a creates it and leads.
        step(Method::GET, LEASE, 404, not_found()),
        step(Method::POST, LEASES, 201, json!({})).check(|body| {
            assert_eq!(body["spec"]["holderIdentity"], "replica-a");
            assert_eq!(body["spec"]["leaseDurationSeconds"], 15);
        }),
        // replica-b holds it and renews every 5 s: nothing is written.
        step(Method::GET, LEASE, 200, held_by("replica-b", behind[0])),
        step(Method::GET, LEASE, 200, held_by("replica-b", behind[1])),
        // Then it stops: the same record, 10 s and then 16 s after this replica saw it.
        step(Method::GET, LEASE, 200, held_by("replica-b", behind[1])),
        step(Method::GET, LEASE, 200, held_by("replica-b", behind[1])),
        step(Method::PUT, LEASE, 200, json!({})).check(|body| {
            assert_eq!(
                body["metadata"]["resourceVersion"], "5",
                "the takeover is conditional on what was read"
            );
            assert_eq!(body["spec"]["holderIdentity"], "replica-a");
            assert_eq!(body["spec"]["leaseTransitions"], 1);
        }),
        // Another replica won the race for the stale Lease: a conflict is not leadership.
        step(Method::GET, LEASE, 200, held_by("replica-b", behind[1])),
        step(
            Method::PUT,
            LEASE,
            409,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "the object has been modified"}),
        ),
    ];
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let elector = elector(service);
    let server = tokio::spawn(serve(handle, steps));
    let wait = |s| tokio::time::advance(std::time::Duration::from_secs(s));
    assert!(elector.try_hold().await.unwrap(), "created");
    assert!(!elector.try_hold().await.unwrap(), "held by a live leader");
    wait(5).await;
    assert!(
        !elector.try_hold().await.unwrap(),
        "renewed, whatever its clock says"
    );
    wait(10).await;
    assert!(
        !elector.try_hold().await.unwrap(),
        "unchanged for 10 s of 15"
    );
    wait(6).await;
    assert!(
        elector.try_hold().await.unwrap(),
        "unchanged for 16 s: taken over"
    );
    assert!(!elector.try_hold().await.unwrap(), "lost the race");
    server.await.unwrap();
}

#[tokio::test]
async fn a_standby_waits_out_an_api_server_that_fails_instead_of_exiting() {
    let failure = |code: u16| json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "InternalError", "code": code, "message": "etcdserver: request timed out"});
    let steps = vec![
        step(Method::GET, LEASE, 500, failure(500)),
        step(Method::GET, LEASE, 503, failure(503)),
        // The API server is back, and nobody holds the Lease.
        step(Method::GET, LEASE, 404, not_found()),
        step(Method::POST, LEASES, 201, json!({})),
    ];
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let elector = elector(service);
    let server = tokio::spawn(serve(handle, steps));
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        elector.acquire(std::time::Duration::from_millis(10)),
    )
    .await
    .expect("the Lease is acquired once the API server answers");
    server.await.unwrap();
}

#[tokio::test]
async fn a_leader_whose_renewal_hangs_steps_down_before_its_claim_runs_out() {
    use kubeswarm::controllers::leader::Lost;
    use std::time::Duration;
    let ours = || {
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "kubeswarm-operator", "namespace": "kubeswarm-system", "resourceVersion": "5"},
            "spec": {"holderIdentity": "replica-a", "leaseDurationSeconds": 1,
                     "renewTime": format!("{:.6}", k8s_openapi::jiff::Timestamp::now()), "leaseTransitions": 0}
        })
    };
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    // One renewal goes through (GET, PUT); the next GET never gets an answer, as from an
    // API server behind a partition.
    let server = tokio::spawn(async move {
        for reply in [ours(), ours()] {
            let (request, send) = handle.next_request().await.expect("a renewal");
            assert_eq!(request.uri().path(), LEASE);
            send.send_response(
                Response::builder()
                    .status(200)
                    .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                    .unwrap(),
            );
        }
        let hung = handle.next_request().await.expect("the next renewal");
        assert_eq!(hung.0.uri().path(), LEASE);
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(hung);
    });
    let elector = elector(service).lasting(Duration::from_secs(1));
    // The renewal hangs for 30 s; the claim it would renew runs out after 1 s.
    let lost = tokio::time::timeout(Duration::from_secs(5), elector.keep())
        .await
        .expect("the leader stops waiting on a renewal that hangs");
    assert!(matches!(lost, Lost::Expired { .. }), "{lost}");
    server.abort();
}
