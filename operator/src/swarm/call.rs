//! One model call as the engine makes it: the job's budget checked first, the pool's
//! replica chosen, a timeout, retries with jittered backoff on faults that may pass, and
//! the tokens charged to the job and the pool.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_openai::error::OpenAIError;
use async_openai::types::chat::{
    ChatCompletionRequestMessage, CreateChatCompletionRequest, ResponseFormat,
    ResponseFormatJsonSchema,
};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::grammar::Grammar;
use super::pool::{Answer, Pool, Request, Server};
use super::{Event, Observer};
use crate::api::FinishReason;

/// Why a call did not produce an answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CallError {
    /// The replica refused the request (4xx): sending it again would not help.
    #[error("{pool} refused the request ({status}): {message}")]
    Rejected {
        pool: String,
        status: u16,
        message: String,
    },
    /// Every attempt failed on something that might have passed (timeouts, refused
    /// connections, 5xx, unreadable answers).
    #[error("{pool}: {attempts} attempts failed, the last with: {last}")]
    Exhausted {
        pool: String,
        attempts: u32,
        last: String,
    },
    #[error("the job's token budget of {limit} tokens is spent")]
    BudgetExceeded { limit: u64 },
    #[error("the job's deadline has passed")]
    DeadlineExceeded,
}

impl CallError {
    /// Whether the error ends the whole job rather than one subagent.
    pub fn stops_job(&self) -> bool {
        matches!(self, Self::BudgetExceeded { .. } | Self::DeadlineExceeded)
    }
}

/// How one HTTP call to a replica ended, for the call metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    Ok,
    /// A 4xx: the request was refused.
    Rejected,
    /// A 5xx.
    ServerError,
    /// No answer within the call's timeout.
    Timeout,
    /// The connection failed (refused, reset, DNS).
    Unreachable,
    /// An answer that is not a usable chat completion.
    Malformed,
}

impl CallOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Rejected => "rejected",
            Self::ServerError => "server_error",
            Self::Timeout => "timeout",
            Self::Unreachable => "unreachable",
            Self::Malformed => "malformed",
        }
    }
}

/// Limits across every call of a job.
#[derive(Debug)]
pub struct Budget {
    max_tokens: Option<u64>,
    deadline: Option<Instant>,
    spent: AtomicU64,
}

impl Budget {
    /// `spent` carries over tokens recorded before a restart.
    pub fn new(max_tokens: Option<u64>, deadline: Option<Instant>, spent: u64) -> Self {
        Self {
            max_tokens,
            deadline,
            spent: AtomicU64::new(spent),
        }
    }

    pub fn spent(&self) -> u64 {
        self.spent.load(Ordering::Relaxed)
    }

    /// Whether another call may start, and for how many tokens and how long at most.
    fn admit(&self) -> Result<(Option<u64>, Option<Duration>), CallError> {
        let left = match self.max_tokens {
            Some(limit) => {
                let spent = self.spent();
                if spent >= limit {
                    return Err(CallError::BudgetExceeded { limit });
                }
                Some(limit - spent)
            }
            None => None,
        };
        let time = match self.deadline {
            Some(deadline) => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(CallError::DeadlineExceeded);
                }
                Some(deadline - now)
            }
            None => None,
        };
        Ok((left, time))
    }

    fn charge(&self, tokens: u64) {
        self.spent.fetch_add(tokens, Ordering::Relaxed);
    }
}

/// Calls and tokens per pool, as the status and `usage.json` report them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub calls: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Usage {
    pub fn tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}

/// Usage of every pool a job called.
#[derive(Debug, Default)]
pub struct Ledger(Mutex<BTreeMap<String, Usage>>);

impl Ledger {
    pub fn from_snapshot(snapshot: BTreeMap<String, Usage>) -> Self {
        Self(Mutex::new(snapshot))
    }

    pub fn snapshot(&self) -> BTreeMap<String, Usage> {
        self.0.lock().expect("ledger lock").clone()
    }

    fn record(&self, pool: &str, prompt: u64, completion: u64) {
        let mut usage = self.0.lock().expect("ledger lock");
        let entry = usage.entry(pool.to_owned()).or_default();
        entry.calls += 1;
        entry.prompt_tokens += prompt;
        entry.completion_tokens += completion;
    }
}

/// How calls are timed out and retried.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub timeout: Duration,
    pub retries: u32,
    /// First backoff; each retry doubles it up to `backoff_cap`, and the wait is drawn
    /// uniformly below it ("full jitter") so retries of many subagents do not align.
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
}

/// A request before the engine's limits are applied.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub messages: Vec<ChatCompletionRequestMessage>,
    pub max_tokens: u32,
    pub temperature: f32,
    /// Constrains the answer to a JSON schema, named for the server's logs.
    pub schema: Option<(&'static str, serde_json::Value)>,
    /// Constrains decoding where the pool's server takes grammars; elsewhere the request
    /// goes without and the checks alone hold the output to its format.
    pub grammar: Option<Grammar>,
    /// Hash of the prompt prefix shared with other calls, for replica affinity.
    pub affinity: Option<u64>,
    /// Asks the pool's server for its tokens' log-probabilities, to measure the model's
    /// confidence. Only kubeswarm's worker is asked: some OpenAI-compatible endpoints
    /// refuse `logprobs` for some models, and a vote is whole without confidence.
    pub logprobs: bool,
}

/// A completed call.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub content: String,
    /// Why the model stopped, when the server said.
    pub finish_reason: Option<FinishReason>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// HTTP calls made, the successful one included.
    pub attempts: u32,
    /// How sure the model was of `content`, from 0 to 1 (see `confidence`); None when
    /// the server sent no log-probabilities.
    pub confidence: Option<f64>,
}

impl Reply {
    /// Why a structured reply could not be read, saying so when the model was cut off at
    /// `limit`: a plan or verdict that ran out of tokens reads as malformed JSON, and
    /// the fix is a shorter answer, not a better prompt.
    pub fn unusable(&self, problem: String, limit: u32) -> String {
        match self.finish_reason {
            Some(FinishReason::Length) => {
                format!("{problem} (the reply was cut off at its limit of {limit} tokens)")
            }
            _ => problem,
        }
    }
}

/// Makes calls on behalf of one job.
pub struct Caller<'a> {
    pub budget: &'a Budget,
    pub ledger: &'a Ledger,
    pub policy: Policy,
    /// Told of every HTTP call's outcome and tokens.
    pub observer: &'a dyn Observer,
}

impl Caller<'_> {
    /// One call with its retries. Every HTTP call that returned usage is charged, retried
    /// or not, so the budget counts what the GPUs actually did.
    pub async fn call(&self, pool: &Pool, prompt: &Prompt) -> Result<Reply, CallError> {
        let mut attempts = 0;
        loop {
            let (tokens_left, time_left) = self.budget.admit()?;
            attempts += 1;
            let max_tokens = match tokens_left {
                Some(left) => u64::from(prompt.max_tokens).min(left) as u32,
                None => prompt.max_tokens,
            };
            let timeout = time_left.map_or(self.policy.timeout, |t| t.min(self.policy.timeout));
            let request = request(pool, prompt, max_tokens);
            let answer = pool.send(request, prompt.affinity, timeout).await;
            let failure = match answer {
                Answer::Ok(completion) => {
                    let confidence = confidence(completion.logprobs.as_deref());
                    let response = completion.response;
                    let (prompt_tokens, completion_tokens) =
                        response.usage.as_ref().map_or((0, 0), |u| {
                            (u64::from(u.prompt_tokens), u64::from(u.completion_tokens))
                        });
                    self.budget.charge(prompt_tokens + completion_tokens);
                    self.ledger
                        .record(pool.name(), prompt_tokens, completion_tokens);
                    let (content, finish_reason) = response
                        .choices
                        .into_iter()
                        .next()
                        .map_or((None, None), |c| {
                            (c.message.content, c.finish_reason.map(finish_reason))
                        });
                    let outcome = match content {
                        Some(_) => CallOutcome::Ok,
                        None => CallOutcome::Malformed,
                    };
                    self.observe(pool, outcome, prompt_tokens, completion_tokens);
                    match content {
                        Some(content) => {
                            return Ok(Reply {
                                content,
                                finish_reason,
                                prompt_tokens,
                                completion_tokens,
                                attempts,
                                confidence,
                            });
                        }
                        None => "the answer had no message content".to_owned(),
                    }
                }
                Answer::NoReplica => {
                    // A pool without a ready replica (preempted, restarting, released
                    // while the job was suspended) is waited for, and the wait spends
                    // no attempt: the job waits for its pools, it does not fail on them.
                    attempts -= 1;
                    tracing::debug!(pool = pool.name(), "waiting for a ready replica");
                    match time_left {
                        Some(left) => {
                            let _ = tokio::time::timeout(left, pool.wait_for_replicas()).await;
                        }
                        None => pool.wait_for_replicas().await,
                    }
                    continue;
                }
                Answer::TimedOut => {
                    self.observe(pool, CallOutcome::Timeout, 0, 0);
                    // When the job's deadline cut the call short, that is the error.
                    self.budget.admit()?;
                    format!("no answer within {:.1}s", timeout.as_secs_f64())
                }
                Answer::Err(OpenAIError::ApiError(api)) if api.status_code.is_client_error() => {
                    self.observe(pool, CallOutcome::Rejected, 0, 0);
                    return Err(CallError::Rejected {
                        pool: pool.name().to_owned(),
                        status: api.status_code.as_u16(),
                        message: api.api_error.message,
                    });
                }
                Answer::Err(err) => {
                    let outcome = match &err {
                        OpenAIError::ApiError(_) => CallOutcome::ServerError,
                        OpenAIError::Reqwest(_) => CallOutcome::Unreachable,
                        _ => CallOutcome::Malformed,
                    };
                    self.observe(pool, outcome, 0, 0);
                    one_line(&err)
                }
            };
            if attempts > self.policy.retries {
                return Err(CallError::Exhausted {
                    pool: pool.name().to_owned(),
                    attempts,
                    last: failure,
                });
            }
            tracing::debug!(pool = pool.name(), attempts, %failure, "retrying model call");
            tokio::time::sleep(self.backoff(attempts)).await;
        }
    }

    fn observe(
        &self,
        pool: &Pool,
        outcome: CallOutcome,
        prompt_tokens: u64,
        completion_tokens: u64,
    ) {
        self.observer.event(Event::Call {
            pool: pool.name(),
            outcome,
            prompt_tokens,
            completion_tokens,
        });
    }

    fn backoff(&self, attempt: u32) -> Duration {
        backoff(self.policy.backoff_base, self.policy.backoff_cap, attempt)
    }
}

/// The wait before retry `attempt` (from 1): `base` doubled per attempt up to `cap`, and
/// drawn uniformly below that ("full jitter"), so the retries of many callers do not align.
pub(super) fn backoff(base: Duration, cap: Duration, attempt: u32) -> Duration {
    let ceiling = base
        .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)))
        .min(cap);
    ceiling.mul_f64(rand::rng().random::<f64>())
}

fn request(pool: &Pool, prompt: &Prompt, max_tokens: u32) -> Request {
    let chat = CreateChatCompletionRequest {
        model: pool.model().to_owned(),
        messages: prompt.messages.clone(),
        max_completion_tokens: Some(max_tokens),
        temperature: Some(prompt.temperature),
        response_format: prompt
            .schema
            .as_ref()
            .map(|(name, schema)| ResponseFormat::JsonSchema {
                json_schema: ResponseFormatJsonSchema {
                    description: None,
                    name: (*name).to_owned(),
                    schema: schema.clone(),
                    strict: Some(true),
                },
            }),
        ..Default::default()
    };
    let (grammar, logprobs) = match pool.server() {
        Server::Worker => (prompt.grammar.clone(), prompt.logprobs),
        Server::OpenAi => (None, false),
    };
    let chat = CreateChatCompletionRequest {
        logprobs: logprobs.then_some(true),
        // The chosen tokens' figures are all a confidence needs; alternatives are sorted
        // out of the whole vocabulary at every step.
        top_logprobs: logprobs.then_some(0),
        ..chat
    };
    Request {
        chat,
        grammar,
        cache_salt: pool.cache_salt().map(str::to_owned),
    }
}

/// An error and its causes on one line: reqwest hides the useful part (connection refused)
/// in its source chain.
fn one_line(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

/// The lowest log-probability one token counts for: OpenAI reports -9999 for a token
/// outside its top 20, and one such token should not outweigh a whole output.
const LOWEST_LOGPROB: f64 = -20.0;

/// How sure the model was of what it wrote: the geometric mean of its tokens'
/// probabilities (the exponential of their mean log-probability), from 0 to 1. None
/// without log-probabilities. A log-probability is at most 0 and at least
/// `LOWEST_LOGPROB` here, whatever the server sent.
fn confidence(logprobs: Option<&[f64]>) -> Option<f64> {
    let tokens = logprobs.filter(|t| !t.is_empty())?;
    let sum: f64 = tokens.iter().map(|l| l.clamp(LOWEST_LOGPROB, 0.0)).sum();
    Some((sum / tokens.len() as f64).exp())
}

/// The API's name for why a model stopped, from the OpenAI one.
fn finish_reason(reason: async_openai::types::chat::FinishReason) -> FinishReason {
    use async_openai::types::chat::FinishReason as OpenAi;
    match reason {
        OpenAi::Stop => FinishReason::Stop,
        OpenAi::Length => FinishReason::Length,
        OpenAi::ToolCalls | OpenAi::ContentFilter | OpenAi::FunctionCall => FinishReason::Other,
    }
}
