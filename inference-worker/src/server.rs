//! The HTTP API. Chat completions go through mistral.rs server core's own request parsing,
//! engine submission and streaming; this module adds what a pool worker needs on top:
//! the served-name check, per-request limits, readiness while the model loads, draining on
//! SIGTERM, and metrics.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use either::Either;
use indexmap::IndexMap;
use mistralrs_core::{ChatCompletionChunkResponse, Request, TokenizationRequest};
use mistralrs_server_core::chat_completion::{
    ChatCompletionResponder, create_streamer, handle_error, parse_request,
    process_non_streaming_response,
};
use mistralrs_server_core::handler_core::{create_response_channel, send_request};
use mistralrs_server_core::openai::ChatCompletionRequest;
use mistralrs_server_core::types::SharedMistralRsState;
use serde_json::{Value, json};

use crate::metrics::{Metrics, Outcome};

/// Request bodies above this are refused before parsing: a prompt this large is over any
/// sensible --max-prompt-tokens anyway.
const MAX_BODY_BYTES: usize = 16 << 20;

pub struct Limits {
    pub max_tokens_cap: usize,
    pub max_prompt_tokens: usize,
    pub max_n: usize,
    /// Requests running and waiting together; more are refused with 503.
    pub max_in_flight: usize,
}

/// Bytes of request that any one prompt token can account for (JSON escapes included,
/// with room to spare): a body longer than this many per allowed token holds a prompt
/// over the limit, and is refused without being tokenized. Tokenizing runs under the
/// engine's lock, so one huge prompt would stall every sequence decoding.
const BYTES_PER_TOKEN_BOUND: usize = 128;

/// The most alternatives per token `top_logprobs` may ask for, as in OpenAI's API. Each is
/// sorted out of the whole vocabulary and decoded at every step: unbounded, one request
/// could ask for every token of a 150k vocabulary at each of its steps.
const MAX_TOP_LOGPROBS: usize = 20;

pub struct AppState {
    served_model_name: String,
    /// What `Authorization: Bearer` must say on /v1, when set.
    token: Option<String>,
    limits: Limits,
    engine: OnceLock<SharedMistralRsState>,
    draining: AtomicBool,
    metrics: Arc<Metrics>,
    started: u64,
}

impl AppState {
    pub fn new(
        served_model_name: String,
        token: Option<String>,
        limits: Limits,
        metrics: Arc<Metrics>,
    ) -> Self {
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self {
            served_model_name,
            token,
            limits,
            engine: OnceLock::new(),
            draining: AtomicBool::new(false),
            metrics,
            started,
        }
    }

    /// The model is loaded: from now on /ready answers 200 and requests are served.
    pub fn set_engine(&self, engine: SharedMistralRsState) {
        // Set once by the loader; a second call would be a bug, and is ignored.
        let _ = self.engine.set(engine);
    }

    /// SIGTERM: /ready turns 503 so the Service stops sending, and new requests are refused.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn in_flight(&self) -> i64 {
        self.metrics.in_flight()
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    // The probes and metrics stay open for the kubelet and Prometheus; the API needs the
    // token.
    let api = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorized,
        ));
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .merge(api)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Lets a request through when the worker has no token or the request carries it.
async fn authorized(
    State(app): State<Arc<AppState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(token) = &app.token else {
        return next.run(request).await;
    };
    let given = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|g| same(g.as_bytes(), token.as_bytes())) {
        return next.run(request).await;
    }
    Refusal {
        status: StatusCode::UNAUTHORIZED,
        param: None,
        code: "invalid_api_key",
        message: "this worker serves only its pool's operator: send Authorization: Bearer <the pool's token>".to_owned(),
    }
    .into_response()
}

/// Compares in time that depends on the length only, so the token cannot be guessed a
/// byte at a time from response times.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A request refused before it reaches the engine, answered as an OpenAI-style error.
#[derive(Debug, PartialEq, Eq)]
struct Refusal {
    status: StatusCode,
    param: Option<&'static str>,
    code: &'static str,
    message: String,
}

impl Refusal {
    fn invalid(param: &'static str, code: &'static str, message: String) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            param: Some(param),
            code,
            message,
        }
    }

    fn unavailable(message: &str) -> Self {
        // Retry-After goes with every 503 (IntoResponse).
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            param: None,
            code: "unavailable",
            message: message.to_owned(),
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let kind = if self.status.is_client_error() {
            "invalid_request_error"
        } else {
            "server_error"
        };
        let body = json!({"error": {
            "message": self.message, "type": kind, "param": self.param, "code": self.code,
        }});
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        response
    }
}

/// Parses a request and applies the checks that need no engine: the served name, `n`,
/// `top_logprobs` and `max_tokens`. A request without `max_tokens` gets the cap, so no
/// request generates without bound.
fn admit(body: &[u8], served: &str, limits: &Limits) -> Result<ChatCompletionRequest, Refusal> {
    let mut request: ChatCompletionRequest = serde_json::from_slice(body).map_err(|e| Refusal {
        status: StatusCode::BAD_REQUEST,
        param: None,
        code: "invalid_json",
        message: format!("the body is not a valid chat completion request: {e}"),
    })?;
    if request.model != served {
        return Err(Refusal {
            status: StatusCode::NOT_FOUND,
            param: Some("model"),
            code: "model_not_found",
            message: format!(
                "the model `{}` does not exist: this worker serves `{served}`",
                request.model
            ),
        });
    }
    if request.n_choices == 0 || request.n_choices > limits.max_n {
        return Err(Refusal::invalid(
            "n",
            "invalid_value",
            format!("n must be between 1 and {}", limits.max_n),
        ));
    }
    if let Some(k) = request.top_logprobs.filter(|&k| k > MAX_TOP_LOGPROBS) {
        return Err(Refusal::invalid(
            "top_logprobs",
            "invalid_value",
            format!("top_logprobs is {k}, above the most allowed, {MAX_TOP_LOGPROBS}"),
        ));
    }
    match request.max_tokens {
        Some(0) => {
            return Err(Refusal::invalid(
                "max_tokens",
                "invalid_value",
                "max_tokens must be at least 1".into(),
            ));
        }
        Some(n) if n > limits.max_tokens_cap => {
            return Err(Refusal::invalid(
                "max_tokens",
                "invalid_value",
                format!(
                    "max_tokens is {n}, above this worker's cap of {}",
                    limits.max_tokens_cap
                ),
            ));
        }
        Some(_) => {}
        None => request.max_tokens = Some(limits.max_tokens_cap),
    }
    Ok(request)
}

fn check_prompt_length(tokens: usize, limits: &Limits) -> Result<(), Refusal> {
    if tokens > limits.max_prompt_tokens {
        return Err(Refusal::invalid(
            "messages",
            "context_length_exceeded",
            format!(
                "the prompt is {tokens} tokens, above this worker's limit of {}",
                limits.max_prompt_tokens
            ),
        ));
    }
    Ok(())
}

async fn ready(State(app): State<Arc<AppState>>) -> Response {
    if app.draining.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
    } else if app.engine.get().is_none() {
        (StatusCode::SERVICE_UNAVAILABLE, "loading the model").into_response()
    } else {
        "ready".into_response()
    }
}

async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.encode(),
    )
        .into_response()
}

async fn models(State(app): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": app.served_model_name, "object": "model", "created": app.started, "owned_by": "kubeswarm"}]
    }))
}

async fn chat_completions(
    State(app): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    let mut served = crate::access::Served::start(&headers);
    let response = serve_chat(&app, body).await;
    let status = response.status();
    served.answered(status.as_u16());
    // Streams record their own outcome when they end; everything else is final here.
    if !is_stream(&response) {
        app.metrics.record_outcome(match status {
            s if s.is_success() => Outcome::Ok,
            StatusCode::SERVICE_UNAVAILABLE => Outcome::Unavailable,
            s if s.is_client_error() => Outcome::ClientError,
            _ => Outcome::ServerError,
        });
    }
    response
}

fn is_stream(response: &Response) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
}

async fn serve_chat(app: &Arc<AppState>, body: Bytes) -> Response {
    if app.draining.load(Ordering::SeqCst) {
        return Refusal::unavailable("this worker is shutting down; retry on another replica")
            .into_response();
    }
    let Some(engine) = app.engine.get().cloned() else {
        return Refusal::unavailable("the model is still loading; retry when /ready answers 200")
            .into_response();
    };
    if app.in_flight() >= app.limits.max_in_flight as i64 {
        return Refusal::unavailable(
            "this worker's queue is full; retry on another replica or after Retry-After",
        )
        .into_response();
    }
    if body.len() > app.limits.max_prompt_tokens * BYTES_PER_TOKEN_BOUND {
        return Refusal::invalid(
            "messages",
            "context_length_exceeded",
            format!(
                "the request is {} bytes, more than any prompt within this worker's limit of {} tokens",
                body.len(),
                app.limits.max_prompt_tokens
            ),
        )
        .into_response();
    }
    let mut request = match admit(&body, &app.served_model_name, &app.limits) {
        Ok(request) => request,
        Err(refusal) => return refusal.into_response(),
    };
    // Counted from here, so requests waiting for the tokenizer (which goes through the
    // engine) count against --max-waiting too.
    let in_flight = app.metrics.enter();
    let counted = match prompt_tokens(&engine, &request).await {
        Ok(tokens) => check_prompt_length(tokens, &app.limits),
        Err(e) => Err(Refusal::invalid(
            "messages",
            "invalid_value",
            format!("the messages cannot be tokenized: {e}"),
        )),
    };
    if let Err(refusal) = counted {
        return refusal.into_response();
    }
    // The engine serves one model; its server core routes `default` to it.
    request.model = "default".to_owned();

    let arrived = Instant::now();
    let (tx, mut rx) = create_response_channel(None);
    let (engine_request, streaming) = match parse_request(request, engine.clone(), tx).await {
        Ok(parsed) => parsed,
        Err(e) => return handle_error(engine, e.into()).into_response(),
    };
    if let Err(e) = send_request(&engine, engine_request).await {
        return handle_error(engine, e.into()).into_response();
    }
    if streaming {
        return stream(app, engine, rx, arrived, in_flight);
    }
    let mut responder = process_non_streaming_response(&mut rx, engine).await;
    drop(in_flight);
    if let ChatCompletionResponder::Json(response)
    | ChatCompletionResponder::ModelError(_, response) = &mut responder
    {
        // The engine names its model by the path it loaded; clients know the pool's name.
        response.model.clone_from(&app.served_model_name);
        let usage = &response.usage;
        app.metrics
            .record_tokens(usage.prompt_tokens, usage.completion_tokens);
        app.metrics
            .observe_first_token(f64::from(usage.total_prompt_time_sec));
        if usage.completion_tokens > 1 {
            let per_token =
                f64::from(usage.total_completion_time_sec) / (usage.completion_tokens - 1) as f64;
            app.metrics.observe_inter_token(per_token);
        }
    }
    responder.into_response()
}

fn stream(
    app: &Arc<AppState>,
    engine: SharedMistralRsState,
    rx: tokio::sync::mpsc::Receiver<mistralrs_core::Response>,
    arrived: Instant,
    in_flight: crate::metrics::InFlight,
) -> Response {
    let last_token: Mutex<Option<Instant>> = Mutex::new(None);
    let on_chunk_metrics = app.metrics.clone();
    let served = app.served_model_name.clone();
    let on_chunk = Box::new(move |mut chunk: ChatCompletionChunkResponse| {
        let now = Instant::now();
        let mut last = last_token.lock().unwrap_or_else(|e| e.into_inner());
        match *last {
            None => on_chunk_metrics.observe_first_token(now.duration_since(arrived).as_secs_f64()),
            Some(previous) => {
                on_chunk_metrics.observe_inter_token(now.duration_since(previous).as_secs_f64())
            }
        }
        *last = Some(now);
        chunk.model.clone_from(&served);
        chunk
    });
    let on_done_metrics = app.metrics.clone();
    // The guard lives in the callback, which lives as long as the stream: a client that
    // hangs up mid-stream still leaves the in-flight count.
    let in_flight = Mutex::new(Some(in_flight));
    let on_done = Box::new(move |chunks: &[ChatCompletionChunkResponse]| {
        if let Some(usage) = chunks.iter().rev().find_map(|c| c.usage.as_ref()) {
            on_done_metrics.record_tokens(usage.prompt_tokens, usage.completion_tokens);
        }
        on_done_metrics.record_outcome(Outcome::Ok);
        in_flight.lock().unwrap_or_else(|e| e.into_inner()).take();
    });
    create_streamer(rx, engine, Some(on_chunk), Some(on_done)).into_response()
}

/// The prompt's length in tokens, with the model's chat template applied, counted by the
/// engine's own tokenizer.
async fn prompt_tokens(
    engine: &SharedMistralRsState,
    request: &ChatCompletionRequest,
) -> anyhow::Result<usize> {
    let text = match &request.messages {
        Either::Right(prompt) => Either::Right(prompt.clone()),
        Either::Left(messages) => Either::Left(
            messages
                .iter()
                .map(|m| {
                    let content = serde_json::to_value(&m.content)
                        .map(|v| text_of(&v))
                        .unwrap_or_default();
                    IndexMap::from([
                        ("role".to_owned(), Either::Left(m.role.clone())),
                        ("content".to_owned(), Either::Left(content)),
                    ])
                })
                .collect(),
        ),
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let tokenize = Request::Tokenize(TokenizationRequest {
        text,
        tools: None,
        add_generation_prompt: true,
        add_special_tokens: true,
        enable_thinking: None,
        reasoning_effort: None,
        response: tx,
    });
    engine.get_sender(None)?.send(tokenize).await?;
    let tokens = rx
        .recv()
        .await
        .ok_or_else(|| anyhow::anyhow!("the engine dropped the request"))??;
    Ok(tokens.len())
}

/// The text of a message's content: a string, or the text parts of a list of parts.
fn text_of(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_tokens_cap: 512,
        max_prompt_tokens: 100,
        max_n: 2,
        max_in_flight: 8,
    };

    fn admit_json(body: Value) -> Result<ChatCompletionRequest, Refusal> {
        admit(body.to_string().as_bytes(), "smol", &LIMITS)
    }

    fn chat(extra: Value) -> Value {
        let mut body = json!({"model": "smol", "messages": [{"role": "user", "content": "hi"}]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    }

    #[test]
    fn a_request_within_limits_is_admitted_and_gets_the_cap_as_max_tokens() {
        let request = admit_json(chat(json!({}))).unwrap();
        assert_eq!(request.max_tokens, Some(512));
        let request = admit_json(chat(json!({"max_tokens": 512, "n": 2}))).unwrap();
        assert_eq!((request.max_tokens, request.n_choices), (Some(512), 2));
        // OpenAI's newer name for the same limit.
        let request = admit_json(chat(json!({"max_completion_tokens": 7}))).unwrap();
        assert_eq!(request.max_tokens, Some(7));
    }

    #[test]
    fn malformed_json_is_a_400_naming_the_problem() {
        let refusal = admit(b"{\"model\": \"smol\", \"messages\": [", "smol", &LIMITS).unwrap_err();
        assert_eq!(refusal.status, StatusCode::BAD_REQUEST);
        assert_eq!(refusal.code, "invalid_json");
        assert!(refusal.message.contains("EOF"), "{}", refusal.message);
        let refusal = admit_json(json!({"model": "smol"})).unwrap_err();
        assert!(refusal.message.contains("messages"), "{}", refusal.message);
    }

    #[test]
    fn another_model_name_is_a_404_naming_the_served_one() {
        let refusal = admit_json(chat(json!({"model": "gpt-4o"}))).unwrap_err();
        assert_eq!(refusal.status, StatusCode::NOT_FOUND);
        assert_eq!(
            (refusal.param, refusal.code),
            (Some("model"), "model_not_found")
        );
        assert!(refusal.message.contains("`gpt-4o`") && refusal.message.contains("`smol`"));
    }

    #[test]
    fn n_top_logprobs_and_max_tokens_outside_the_limits_are_400s_naming_the_field() {
        for (extra, param, message) in [
            (
                json!({"logprobs": true, "top_logprobs": 21}),
                "top_logprobs",
                "top_logprobs is 21, above the most allowed, 20",
            ),
            (json!({"n": 0}), "n", "n must be between 1 and 2"),
            (json!({"n": 3}), "n", "n must be between 1 and 2"),
            (
                json!({"max_tokens": 0}),
                "max_tokens",
                "max_tokens must be at least 1",
            ),
            (
                json!({"max_tokens": 513}),
                "max_tokens",
                "max_tokens is 513, above this worker's cap of 512",
            ),
        ] {
            let refusal = admit_json(chat(extra)).unwrap_err();
            assert_eq!(refusal.status, StatusCode::BAD_REQUEST);
            assert_eq!(refusal.param, Some(param));
            assert_eq!(refusal.message, message);
        }
    }

    #[test]
    fn a_prompt_over_the_limit_is_context_length_exceeded() {
        assert_eq!(check_prompt_length(100, &LIMITS), Ok(()));
        let refusal = check_prompt_length(101, &LIMITS).unwrap_err();
        assert_eq!(refusal.code, "context_length_exceeded");
        assert_eq!(
            refusal.message,
            "the prompt is 101 tokens, above this worker's limit of 100"
        );
    }

    #[test]
    fn refusals_are_openai_error_bodies() {
        let response = Refusal::unavailable("loading").into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let response = check_prompt_length(101, &LIMITS)
            .unwrap_err()
            .into_response();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    }

    /// A small deterministic generator (xorshift64), so a failure names its seed.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        /// A JSON value of the kinds a hostile client sends: wrong types, extremes, deep
        /// nesting, odd text.
        fn value(&mut self, depth: usize) -> Value {
            match self.below(if depth > 3 { 8 } else { 10 }) {
                0 => Value::Null,
                1 => json!(self.below(2) == 1),
                2 => json!(-1),
                3 => json!(u64::MAX),
                4 => json!(1e308),
                5 => json!(self.below(10)),
                6 => json!("smol"),
                7 => json!("\u{0}\u{feff}\u{10ffff}<|im_end|>"),
                8 => Value::Array((0..self.below(4)).map(|_| self.value(depth + 1)).collect()),
                _ => {
                    let keys = [
                        "role",
                        "content",
                        "type",
                        "text",
                        "n",
                        "max_tokens",
                        "model",
                    ];
                    let mut object = serde_json::Map::new();
                    for _ in 0..self.below(4) {
                        object.insert(
                            keys[self.below(keys.len())].to_owned(),
                            self.value(depth + 1),
                        );
                    }
                    Value::Object(object)
                }
            }
        }
    }

    #[test]
    fn hostile_bodies_are_admitted_within_the_limits_or_refused_never_a_panic() {
        let fields = [
            "model",
            "messages",
            "max_tokens",
            "max_completion_tokens",
            "n",
            "temperature",
            "stream",
            "grammar",
            "response_format",
            "tools",
            "stop",
            "logit_bias",
        ];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut admitted, mut refused) = (0, 0);
        for round in 0..20_000 {
            let mut body = chat(json!({"max_tokens": 8}));
            for _ in 0..=rng.below(3) {
                let field = fields[rng.below(fields.len())];
                body[field] = rng.value(0);
            }
            let mut bytes = body.to_string().into_bytes();
            // Some bodies are also cut short or have a byte changed, as a broken client's.
            match rng.below(4) {
                0 => bytes.truncate(rng.below(bytes.len() + 1)),
                1 => {
                    let at = rng.below(bytes.len());
                    bytes[at] = rng.next() as u8;
                }
                _ => {}
            }
            match admit(&bytes, "smol", &LIMITS) {
                Ok(request) => {
                    admitted += 1;
                    assert_eq!(request.model, "smol", "round {round}");
                    assert!(
                        request
                            .max_tokens
                            .is_some_and(|t| t <= LIMITS.max_tokens_cap),
                        "round {round}: max_tokens {:?}",
                        request.max_tokens
                    );
                    assert!(
                        (1..=LIMITS.max_n).contains(&request.n_choices),
                        "round {round}: n {}",
                        request.n_choices
                    );
                }
                Err(refusal) => {
                    refused += 1;
                    assert!(
                        refusal.status.is_client_error(),
                        "round {round}: {refusal:?}"
                    );
                    assert!(!refusal.message.is_empty(), "round {round}");
                }
            }
        }
        // Both sides are exercised, or the generator tests nothing.
        assert!(
            admitted > 500 && refused > 5_000,
            "{admitted} admitted, {refused} refused"
        );
    }
}
