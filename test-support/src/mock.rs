//! Test doubles for the engine: an OpenAI-compatible server whose every answer a test
//! scripts (text, an HTTP error, a delay, or no answer at all), recording each request it
//! receives; and a record store in memory.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kubeswarm::swarm::record::{Store, StoreError};
use serde_json::{Value, json};

/// The records of a job, in memory.
#[derive(Default, Clone)]
pub struct Memory(pub Arc<Mutex<BTreeMap<String, String>>>);

impl Store for Memory {
    async fn load(&self) -> Result<BTreeMap<String, String>, StoreError> {
        Ok(self.0.lock().unwrap().clone())
    }
    async fn save(&self, entries: Vec<(String, String)>) -> Result<(), StoreError> {
        self.0.lock().unwrap().extend(entries);
        Ok(())
    }
}

/// What the server does with one request.
#[derive(Clone, Debug)]
pub enum Reply {
    /// 200 with this message content.
    Text(String),
    /// 200 with this message content, cut off at the token limit (`finish_reason: length`).
    Truncated(String),
    /// 200 with this message content and, when the request asks for `logprobs`, these
    /// entries as its `logprobs.content`, as given: a test may send what no server should.
    Logprobs(String, Vec<Value>),
    /// This status with an OpenAI error body (or a plain one for 5xx, as proxies send).
    Status(u16),
    /// Waits, then replies.
    After(Duration, Box<Reply>),
}

pub fn text(content: impl Into<String>) -> Reply {
    Reply::Text(content.into())
}

/// Decides the reply to a request body; the second argument counts requests from 0.
pub type Script = Arc<dyn Fn(&Value, usize) -> Reply + Send + Sync>;

/// Tokens the mock reports for every answer.
pub const PROMPT_TOKENS: u64 = 10;
pub const COMPLETION_TOKENS: u64 = 5;

#[derive(Clone)]
struct Shared {
    script: Script,
    model: String,
    seen: Arc<Mutex<Vec<Value>>>,
    /// The Authorization header of each request, in arrival order.
    authorizations: Arc<Mutex<Vec<Option<String>>>>,
    count: Arc<AtomicUsize>,
    in_flight: Arc<AtomicUsize>,
}

pub struct Mock {
    /// Base URL of its API, ending in /v1.
    pub url: String,
    shared: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl Mock {
    pub async fn start(
        model: &str,
        script: impl Fn(&Value, usize) -> Reply + Send + Sync + 'static,
    ) -> Mock {
        Self::start_on("127.0.0.1:0", model, script).await
    }

    /// Serves on `address` (an IP and port, 0 for any): a test whose endpoint must pass a
    /// policy that allows one address only.
    pub async fn start_on(
        address: &str,
        model: &str,
        script: impl Fn(&Value, usize) -> Reply + Send + Sync + 'static,
    ) -> Mock {
        let shared = Shared {
            script: Arc::new(script),
            model: model.to_owned(),
            seen: Arc::default(),
            authorizations: Arc::default(),
            count: Arc::default(),
            in_flight: Arc::default(),
        };
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/models", get(models))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind(address).await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Mock {
            url: format!("http://{addr}/v1"),
            shared,
            task,
        }
    }

    /// Request bodies received, in arrival order.
    pub fn requests(&self) -> Vec<Value> {
        self.shared.seen.lock().unwrap().clone()
    }

    /// The Authorization header of each request, in arrival order.
    pub fn authorizations(&self) -> Vec<Option<String>> {
        self.shared.authorizations.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.shared.count.load(Ordering::SeqCst)
    }

    /// Requests whose handler is still running (the client has not gone away).
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A URL where nothing listens: connections are refused.
pub async fn refusing_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}/v1")
}

struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn chat(
    State(shared): State<Shared>,
    headers: axum::http::HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let n = shared.count.fetch_add(1, Ordering::SeqCst);
    shared.seen.lock().unwrap().push(body.clone());
    shared.authorizations.lock().unwrap().push(
        headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    );
    shared.in_flight.fetch_add(1, Ordering::SeqCst);
    let _guard = InFlight(shared.in_flight.clone());
    let mut reply = (shared.script)(&body, n);
    loop {
        match reply {
            Reply::After(delay, next) => {
                tokio::time::sleep(delay).await;
                reply = *next;
            }
            Reply::Status(code) => {
                let status = StatusCode::from_u16(code).unwrap();
                return if status.is_server_error() {
                    (status, "upstream exploded").into_response()
                } else {
                    let error = json!({"error": {"message": format!("scripted {code}"), "type": "invalid_request_error", "param": null, "code": null}});
                    (status, Json(error)).into_response()
                };
            }
            Reply::Text(content) => return completion(&shared, n, content, "stop", None),
            Reply::Truncated(content) => {
                return completion(&shared, n, content, "length", None);
            }
            Reply::Logprobs(content, logprobs) => {
                let asked = body["logprobs"] == json!(true);
                let logprobs = asked.then(|| json!({"content": logprobs}));
                return completion(&shared, n, content, "stop", logprobs);
            }
        }
    }
}

/// `logprobs.content` entries as OpenAI writes them, one token of text "t" per figure.
pub fn token_logprobs(logprobs: &[f64]) -> Vec<Value> {
    logprobs
        .iter()
        .map(|l| json!({"token": "t", "logprob": l, "bytes": [116], "top_logprobs": []}))
        .collect()
}

/// A chat completion with `content`, stopped for `finish`, with `logprobs` when given.
fn completion(
    shared: &Shared,
    n: usize,
    content: String,
    finish: &str,
    logprobs: Option<Value>,
) -> Response {
    Json(json!({
        "id": format!("chatcmpl-{n}"),
        "object": "chat.completion",
        "created": 1_700_000_000u32,
        "model": shared.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish, "logprobs": logprobs}],
        "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS, "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS}
    }))
    .into_response()
}

async fn models(State(shared): State<Shared>) -> Json<Value> {
    Json(
        json!({"object": "list", "data": [{"id": shared.model, "object": "model", "owned_by": "mock"}]}),
    )
}

/// The text of a request's last user message.
pub fn last_user(body: &Value) -> String {
    body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .map(|m| m["content"].as_str().unwrap_or_default().to_owned())
        .unwrap_or_default()
}

/// What a request asks of the mock: its last user turn, less the job's task where a
/// subagent's own part follows it.
pub fn part(body: &Value) -> String {
    let text = last_user(body);
    match text.split_once(kubeswarm::swarm::prompts::SUBTASK) {
        Some((_, part)) => part.to_owned(),
        None => text,
    }
}

/// Whether a request is the gate's (it asks for a verdict).
pub fn is_verdict(body: &Value) -> bool {
    body["response_format"]["json_schema"]["name"] == "verdict"
}

/// Whether a request is the aggregation's synthesis (its system turn asks to merge).
pub fn is_synthesis(body: &Value) -> bool {
    body["messages"][0]["content"]
        .as_str()
        .is_some_and(|s| s.contains("merge several"))
}

pub fn is_plan(body: &Value) -> bool {
    body["response_format"]["json_schema"]["name"] == "subtasks"
}

pub fn verdict(pass: bool, score: u8, issues: &[&str]) -> Reply {
    text(json!({"pass": pass, "score": score, "issues": issues}).to_string())
}
