//! A ModelPool as the engine sees it: the OpenAI-compatible endpoints of its ready
//! replicas, with pooled connections, per-replica load and passive health.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::types::chat::{CreateChatCompletionRequest, CreateChatCompletionResponse};
use serde::Serialize;
use serde_json::Value;

use super::balance::{self, Load};
use super::bounded::{self, Bounded};
use super::grammar::Grammar;

/// A failed replica is skipped for this long, doubled per consecutive failure up to
/// `MAX_EJECTION`, so a dead replica costs one failed call, not one per subagent.
const BASE_EJECTION: Duration = Duration::from_millis(500);
const MAX_EJECTION: Duration = Duration::from_secs(30);

/// What the servers behind a pool accept beyond the OpenAI API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// kubeswarm's inference worker: also `grammar`, for constrained decoding.
    Worker,
    /// Any OpenAI-compatible endpoint: the OpenAI API only.
    OpenAi,
}

/// A chat completion and the extensions the pool's server takes.
#[derive(Debug, Clone, Serialize)]
pub struct Request {
    #[serde(flatten)]
    pub chat: CreateChatCompletionRequest,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grammar: Option<Grammar>,
    /// vLLM's prefix-cache isolation key, for pools that ask for one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_salt: Option<String>,
}

/// The served replicas of one pool.
pub struct Pool {
    name: String,
    model: String,
    server: Server,
    http: reqwest::Client,
    /// Sent as the bearer token of every call.
    api_key: String,
    /// Sent as `cache_salt` in every request, when set.
    cache_salt: Option<String>,
    /// The most of one response that is read.
    response_limit: usize,
    replicas: Mutex<Vec<Arc<Replica>>>,
    /// Woken whenever the replicas are replaced.
    changed: tokio::sync::Notify,
    in_flight: AtomicUsize,
    rotation: AtomicUsize,
}

struct Replica {
    url: String,
    client: Client<OpenAIConfig>,
    outstanding: AtomicUsize,
    failures: AtomicU32,
    ejected_until: Mutex<Option<Instant>>,
}

/// What one HTTP call to a replica returned.
pub enum Answer {
    Ok(Box<Completion>),
    /// No replica is ready.
    NoReplica,
    /// The replica did not answer within the call's timeout; the call was dropped.
    TimedOut,
    Err(OpenAIError),
}

impl Pool {
    /// A pool named `name` whose replicas, all of the kind `server`, serve `model` at the
    /// base URLs `urls` (each ending in `/v1`). `http` is shared by every pool so
    /// connections are pooled per host.
    pub fn new(
        name: &str,
        model: &str,
        server: Server,
        urls: &[String],
        http: reqwest::Client,
    ) -> Self {
        Self::with_api_key(name, model, server, urls, http, None)
    }

    /// A pool whose endpoints want `api_key` as their bearer token (an external pool's
    /// `apiKeySecretRef`); without one a placeholder is sent, as OpenAI clients must.
    pub fn with_api_key(
        name: &str,
        model: &str,
        server: Server,
        urls: &[String],
        http: reqwest::Client,
        api_key: Option<String>,
    ) -> Self {
        let pool = Self {
            name: name.to_owned(),
            model: model.to_owned(),
            server,
            http,
            api_key: api_key.unwrap_or_else(|| "kubeswarm".to_owned()),
            cache_salt: None,
            response_limit: bounded::MAX_RESPONSE_BYTES,
            replicas: Mutex::new(Vec::new()),
            changed: tokio::sync::Notify::new(),
            in_flight: AtomicUsize::new(0),
            rotation: AtomicUsize::new(0),
        };
        pool.set_replicas(urls);
        pool
    }

    /// The same pool, its requests carrying `salt` as their `cache_salt`.
    pub fn with_cache_salt(self, salt: Option<String>) -> Self {
        Self {
            cache_salt: salt,
            ..self
        }
    }

    /// The same pool, reading at most `limit` bytes of each response.
    pub fn with_response_limit(mut self, limit: usize) -> Self {
        self.response_limit = limit;
        // The replicas made so far read to the old limit: made again.
        let urls: Vec<String> = std::mem::take(&mut *self.replicas.lock().expect("replica lock"))
            .iter()
            .map(|r| r.url.clone())
            .collect();
        self.set_replicas(&urls);
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn cache_salt(&self) -> Option<&str> {
        self.cache_salt.as_deref()
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    pub fn server(&self) -> Server {
        self.server
    }

    /// Replaces the set of ready replicas, keeping the load and health of those that stay.
    pub fn set_replicas(&self, urls: &[String]) {
        let mut replicas = self.replicas.lock().expect("replica lock");
        let mut next = Vec::with_capacity(urls.len());
        for url in urls {
            let url = url.trim_end_matches('/');
            let kept = replicas.iter().find(|r| r.url == url).cloned();
            next.push(kept.unwrap_or_else(|| {
                let config = OpenAIConfig::new()
                    .with_api_base(url)
                    .with_api_key(self.api_key.as_str());
                // A bare reqwest service: the client's default stack retries 5xx and
                // refused connections itself, behind the engine's back and budget. Its
                // responses are read to a bound.
                let client = Client::with_config(config).with_http_service(Bounded {
                    http: self.http.clone(),
                    limit: self.response_limit,
                });
                Arc::new(Replica {
                    url: url.to_owned(),
                    client,
                    outstanding: AtomicUsize::new(0),
                    failures: AtomicU32::new(0),
                    ejected_until: Mutex::new(None),
                })
            }));
        }
        *replicas = next;
        self.changed.notify_waiters();
    }

    /// Returns once the pool has a replica.
    pub async fn wait_for_replicas(&self) {
        loop {
            // Created before the check, so a change between the check and the wait is
            // not missed.
            let changed = self.changed.notified();
            if !self.replicas.lock().expect("replica lock").is_empty() {
                return;
            }
            changed.await;
        }
    }

    /// Calls sent to the pool and not yet answered, on replicas it still has or not.
    pub fn outstanding(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Sends one chat completion to the replica the balancer picks for `key`, giving up
    /// after `timeout`.
    pub async fn send(&self, request: Request, key: Option<u64>, timeout: Duration) -> Answer {
        let Some(replica) = self.choose(key) else {
            return Answer::NoReplica;
        };
        let _in_flight = (
            InFlight::new(&replica.outstanding),
            InFlight::new(&self.in_flight),
        );
        let chat = replica.client.chat();
        let call = chat.create_byot::<_, Value>(request);
        match tokio::time::timeout(timeout, call)
            .await
            .map(|r| r.and_then(Completion::read))
        {
            Ok(Ok(completion)) => {
                replica.failures.store(0, Ordering::Relaxed);
                Answer::Ok(Box::new(completion))
            }
            Ok(Err(err)) => {
                if replica_at_fault(&err) {
                    replica.eject();
                }
                Answer::Err(err)
            }
            Err(_) => {
                replica.eject();
                Answer::TimedOut
            }
        }
    }

    fn choose(&self, key: Option<u64>) -> Option<Arc<Replica>> {
        let replicas = self.replicas.lock().expect("replica lock");
        let now = Instant::now();
        let ids: Vec<&str> = replicas.iter().map(|r| r.url.as_str()).collect();
        let loads: Vec<Load> = replicas
            .iter()
            .map(|r| Load {
                outstanding: r.outstanding.load(Ordering::Relaxed),
                ejected: r
                    .ejected_until
                    .lock()
                    .expect("ejection lock")
                    .is_some_and(|until| until > now),
            })
            .collect();
        let rotation = self.rotation.fetch_add(1, Ordering::Relaxed);
        balance::pick(&ids, &loads, key, rotation).map(|i| replicas[i].clone())
    }
}

/// A chat completion, and its first choice's token log-probabilities.
#[derive(Debug)]
pub struct Completion {
    pub response: CreateChatCompletionResponse,
    /// None unless every token has a number for a log-probability.
    pub logprobs: Option<Vec<f64>>,
}

impl Completion {
    /// Reads a response. Log-probabilities only measure, so they are read apart and
    /// leniently: a server that writes them in another shape than OpenAI's (an older
    /// worker: `null` for a greedy token, alternatives as ids) still answers, and its
    /// confidence is unknown. The rest is read as strictly as ever.
    fn read(mut body: Value) -> Result<Self, OpenAIError> {
        let mut logprobs = None;
        if let Some(choices) = body.get_mut("choices").and_then(Value::as_array_mut) {
            for (i, choice) in choices.iter_mut().enumerate() {
                let Some(taken) = choice.as_object_mut().and_then(|c| c.remove("logprobs")) else {
                    continue;
                };
                if i == 0 {
                    logprobs = taken["content"]
                        .as_array()
                        .and_then(|tokens| tokens.iter().map(|t| t["logprob"].as_f64()).collect());
                }
            }
        }
        let response = serde_json::from_value(body).map_err(|err| {
            OpenAIError::JSONDeserialize(err, "a chat completion with a wrong field".to_owned())
        })?;
        Ok(Self { response, logprobs })
    }
}

impl Replica {
    fn eject(&self) {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed).min(6);
        let period = (BASE_EJECTION * 2u32.pow(failures)).min(MAX_EJECTION);
        *self.ejected_until.lock().expect("ejection lock") = Some(Instant::now() + period);
    }
}

/// Whether an error says the replica is unwell (so others should take its calls) rather
/// than that the request was wrong.
fn replica_at_fault(err: &OpenAIError) -> bool {
    match err {
        OpenAIError::Reqwest(_) => true,
        OpenAIError::ApiError(api) => api.status_code.is_server_error(),
        err if bounded::too_large(err) => true,
        _ => false,
    }
}

/// Counts a call as outstanding on its replica until it is answered or dropped.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
