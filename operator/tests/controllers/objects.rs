//! An API server that keeps the objects written to it, for scenarios about concurrent
//! writers: unlike the scripted steps of `harness`, it enforces resourceVersions as the
//! real one does. Every write moves the version; a merge patch that names another version
//! is refused with 409, as is a create of a name that exists; a patch of a missing object
//! is 404. It can fail a share of the writes, as a loaded or restarting API server does.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response};
use kube::client::Body;
use kubeswarm_test_support::cel_cases::merge_patch;
use serde_json::{Value, json};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

#[derive(Default)]
struct State {
    /// Objects by their path (`.../configmaps/NAME`).
    objects: BTreeMap<String, Value>,
    version: u64,
    faults: Option<Faults>,
    /// Writes answered so far, and the one to hold (see `hold`).
    writes: usize,
    hold: Option<Hold>,
}

/// A write that never gets its answer, as if the writer died waiting for it.
#[derive(Clone, Copy)]
struct Hold {
    /// Which write, counting from 1.
    nth: usize,
    /// Whether the API server made it before the writer died.
    made: bool,
}

/// Writes that fail: `percent` of them, with `code`, chosen by a seeded generator.
struct Faults {
    percent: u64,
    code: u16,
    seed: u64,
    injected: usize,
}

impl Faults {
    /// xorshift64*: the same seed gives the same faults.
    fn roll(&mut self) -> bool {
        self.seed ^= self.seed >> 12;
        self.seed ^= self.seed << 25;
        self.seed ^= self.seed >> 27;
        self.seed.wrapping_mul(0x2545_f491_4f6c_dd1d) % 100 < self.percent
    }
}

/// The objects, shared by every client served from them.
#[derive(Clone, Default)]
pub(crate) struct Objects(Arc<Mutex<State>>);

fn status(code: u16, reason: &str, message: String) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": message})
}

impl Objects {
    /// A new client whose requests these objects answer.
    pub(crate) fn client(&self) -> kube::Client {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        tokio::spawn(self.clone().serve(handle));
        kube::Client::new(service, crate::harness::NS)
    }

    /// Objects whose writes fail `percent` of the time with `code`. A 409 comes with a
    /// change by someone else first, so that the conflict is real.
    pub(crate) fn failing(percent: u64, code: u16, seed: u64) -> Self {
        let objects = Self::default();
        objects.0.lock().unwrap().faults = Some(Faults {
            percent,
            code,
            seed: seed.max(1),
            injected: 0,
        });
        objects
    }

    /// Holds the `nth` write from now on (made or not) without an answer, as if its writer
    /// died waiting; and reports that it did through `held`.
    pub(crate) fn hold(&self, nth: usize, made: bool) {
        let mut state = self.0.lock().unwrap();
        let nth = state.writes + nth;
        state.hold = Some(Hold { nth, made });
    }

    /// Whether the held write has arrived.
    pub(crate) fn held(&self) -> bool {
        let state = self.0.lock().unwrap();
        state.hold.is_some_and(|h| state.writes >= h.nth)
    }

    /// Answers every write again.
    pub(crate) fn release(&self) {
        self.0.lock().unwrap().hold = None;
    }

    /// How many writes failed on purpose.
    pub(crate) fn injected(&self) -> usize {
        self.0
            .lock()
            .unwrap()
            .faults
            .as_ref()
            .map_or(0, |f| f.injected)
    }

    /// The object at `path` as stored.
    pub(crate) fn get(&self, path: &str) -> Option<Value> {
        self.0.lock().unwrap().objects.get(path).cloned()
    }

    /// A change by someone else (a label added with kubectl): merges `patch` into the
    /// object at `path` and moves its version.
    pub(crate) fn touch(&self, path: &str, patch: &Value) {
        let mut state = self.0.lock().unwrap();
        state.version += 1;
        let version = state.version.to_string();
        let object = state.objects.get_mut(path).expect("an object to touch");
        merge_patch(object, patch);
        object["metadata"]["resourceVersion"] = json!(version);
    }

    /// A delete by someone else.
    pub(crate) fn remove(&self, path: &str) {
        self.0.lock().unwrap().objects.remove(path);
    }

    fn answer(&self, method: &Method, path: &str, body: Value) -> (u16, Value) {
        let mut state = self.0.lock().unwrap();
        let exists = state.objects.contains_key(path);
        if *method != Method::GET
            && let Some(faults) = state.faults.as_mut()
            && faults.roll()
        {
            faults.injected += 1;
            let code = faults.code;
            if code == 409 && exists {
                state.version += 1;
                let version = state.version.to_string();
                state.objects.get_mut(path).expect("exists")["metadata"]["resourceVersion"] =
                    json!(version);
            }
            let reason = match code {
                409 => "Conflict",
                422 => "Invalid",
                429 => "TooManyRequests",
                _ => "InternalError",
            };
            return (code, status(code, reason, format!("injected {code}")));
        }
        let next = (state.version + 1).to_string();
        match *method {
            Method::GET => match state.objects.get(path) {
                Some(object) => (200, object.clone()),
                None => (404, status(404, "NotFound", format!("{path} not found"))),
            },
            Method::POST => {
                let path = format!("{path}/{}", body["metadata"]["name"].as_str().unwrap());
                if state.objects.contains_key(&path) {
                    return (
                        409,
                        status(409, "AlreadyExists", format!("{path} already exists")),
                    );
                }
                let mut object = body;
                object["metadata"]["resourceVersion"] = json!(next);
                state.version += 1;
                state.objects.insert(path, object.clone());
                (201, object)
            }
            Method::PATCH => {
                let Some(object) = state.objects.get_mut(path) else {
                    return (404, status(404, "NotFound", format!("{path} not found")));
                };
                let asked = &body["metadata"]["resourceVersion"];
                if !asked.is_null() && *asked != object["metadata"]["resourceVersion"] {
                    return (
                        409,
                        status(
                            409,
                            "Conflict",
                            format!(
                                "Operation cannot be fulfilled on {path}: the object has been modified; please apply your changes to the latest version and try again"
                            ),
                        ),
                    );
                }
                merge_patch(object, &body);
                object["metadata"]["resourceVersion"] = json!(next);
                let object = object.clone();
                state.version += 1;
                (200, object)
            }
            _ => panic!("objects: {method} {path} is not served"),
        }
    }

    /// Whether this write is the held one, and whether to make it.
    fn holds(&self, method: &Method) -> Option<bool> {
        if *method == Method::GET {
            return None;
        }
        let mut state = self.0.lock().unwrap();
        state.writes += 1;
        let writes = state.writes;
        state.hold.filter(|h| h.nth == writes).map(|h| h.made)
    }

    async fn serve(self, mut handle: Handle) {
        while let Some((request, send)) = handle.next_request().await {
            let (method, path) = (request.method().clone(), request.uri().path().to_owned());
            let body = request.into_body().collect_bytes().await.unwrap();
            let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
            if let Some(made) = self.holds(&method) {
                if made {
                    self.answer(&method, &path, body.clone());
                }
                // Its writer is gone: this client gets no answer again.
                std::future::pending::<()>().await;
            }
            let (code, reply) = self.answer(&method, &path, body);
            let response = Response::builder()
                .status(code)
                .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                .unwrap();
            send.send_response(response);
        }
    }
}
