//! The mock API server of the scenarios: each step is one request the reconcile must
//! make and the answer it gets; a request not listed, or one the chart's RBAC does not
//! allow, fails the test.

use std::sync::OnceLock;
use std::time::Duration;

use http::{Method, Request, Response};
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use serde_json::{Value, json};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
pub(crate) type Check = Box<dyn FnOnce(&Value) + Send>;

/// One request the reconcile must make, and the answer it gets.
pub(crate) struct Step {
    pub(crate) method: Method,
    pub(crate) path: String,
    pub(crate) code: u16,
    pub(crate) reply: Value,
    pub(crate) check: Option<Check>,
}

pub(crate) fn step(method: Method, path: &str, code: u16, reply: Value) -> Step {
    Step {
        method,
        path: path.to_owned(),
        code,
        reply,
        check: None,
    }
}

impl Step {
    pub(crate) fn check(mut self, check: impl FnOnce(&Value) + Send + 'static) -> Self {
        self.check = Some(Box::new(check));
        self
    }
}

pub(crate) const NS: &str = "team-a";
pub(crate) const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/team-a/events";

/// The API server's answer to a request RBAC does not allow, for `what` ("secrets \"x\"").
pub(crate) fn forbidden(what: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403, "message": format!("{what} is forbidden")})
}

pub(crate) fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
}

pub(crate) fn list(kind: &str, items: Vec<Value>) -> Value {
    json!({"kind": format!("{kind}List"), "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items})
}

/// A condition of the object in a request body (a pool's or a Workload's status).
pub(crate) fn condition(status: &Value, type_: &str) -> (String, String, String) {
    let c = status["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"));
    (
        c["status"].as_str().unwrap().to_owned(),
        c["reason"].as_str().unwrap().to_owned(),
        c["message"].as_str().unwrap().to_owned(),
    )
}

/// Asserts a condition in a request body: its status, its reason and a part of its message.
pub(crate) fn says(body: &Value, type_: &str, (status, reason, part): (&str, &str, &str)) {
    let (found_status, found_reason, message) = condition(body, type_);
    assert_eq!(
        (found_status.as_str(), found_reason.as_str()),
        (status, reason),
        "{type_}: {message}"
    );
    assert!(
        message.contains(part),
        "{type_}: {message:?} lacks {part:?}"
    );
}

pub(crate) fn event(reason: &'static str) -> Step {
    step(Method::POST, EVENTS, 201, json!({}))
        .check(move |body| assert_eq!(body["reason"], reason, "event {body}"))
}

/// The RBAC verb, API group and resource of a request.
fn access(method: &Method, path: &str) -> (&'static str, String, String) {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, rest) = match parts[0] {
        "api" => ("", &parts[2..]),
        _ => (parts[1], &parts[3..]),
    };
    let rest = if rest.first() == Some(&"namespaces") {
        &rest[2..]
    } else {
        rest
    };
    let resource = match rest {
        [resource, _, sub] => format!("{resource}/{sub}"),
        [resource, ..] => (*resource).to_owned(),
        [] => panic!("no resource in {path}"),
    };
    let verb = match *method {
        Method::GET if rest.len() == 1 => "list",
        Method::GET => "get",
        Method::POST => "create",
        Method::PATCH => "patch",
        Method::PUT => "update",
        Method::DELETE => "delete",
        _ => panic!("unexpected method {method}"),
    };
    (verb, group.to_owned(), resource)
}

/// Whether the chart's ClusterRole or Role grants a request.
fn chart_allows(method: &Method, path: &str) -> bool {
    static RULES: OnceLock<Vec<Value>> = OnceLock::new();
    let rules = RULES.get_or_init(|| {
        kubeswarm_test_support::helm::render(None)
            .iter()
            .filter(|doc| doc["kind"] == "ClusterRole" || doc["kind"] == "Role")
            .flat_map(|doc| doc["rules"].as_array().cloned().unwrap_or_default())
            .collect()
    });
    let (verb, group, resource) = access(method, path);
    let has =
        |list: &Value, item: &str| list.as_array().is_some_and(|l| l.iter().any(|v| v == item));
    rules.iter().any(|r| {
        has(&r["apiGroups"], &group) && has(&r["resources"], &resource) && has(&r["verbs"], verb)
    })
}

/// Answers the steps in order, then fails on any further request.
pub(crate) async fn serve(mut handle: Handle, steps: Vec<Step>) {
    for (n, step) in steps.into_iter().enumerate() {
        let (request, send) = tokio::time::timeout(Duration::from_secs(30), handle.next_request())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "step {n}: the reconcile ended without {} {}",
                    step.method, step.path
                )
            })
            .expect("the client is gone");
        let (method, path) = (request.method().clone(), request.uri().path().to_owned());
        assert_eq!(
            (&method, path.as_str()),
            (&step.method, step.path.as_str()),
            "step {n}: request {}",
            request.uri()
        );
        assert!(
            chart_allows(&method, &path),
            "step {n}: the chart's RBAC does not allow {:?}",
            access(&method, &path)
        );
        let body = request.into_body().collect_bytes().await.unwrap();
        if let Some(check) = step.check {
            check(&serde_json::from_slice(&body).unwrap_or(Value::Null));
        }
        let response = Response::builder()
            .status(step.code)
            .body(Body::from(serde_json::to_vec(&step.reply).unwrap()))
            .unwrap();
        send.send_response(response);
    }
    if let Ok(Some((request, _))) =
        tokio::time::timeout(Duration::from_millis(200), handle.next_request()).await
    {
        panic!(
            "a request the scenario does not expect: {} {}",
            request.method(),
            request.uri()
        );
    }
}

/// The Event recorder of the scenarios' reconciles.
pub(crate) fn recorder(client: kube::Client) -> Recorder {
    Recorder::new(
        client,
        Reporter {
            controller: "kubeswarm".to_owned(),
            instance: None,
        },
    )
}
