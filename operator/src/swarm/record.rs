//! What the engine writes down as it goes: the plan, each finished subagent, the usage and
//! the result, as named entries of a key-value store (the result ConfigMap in a cluster,
//! files in local mode). A restarted engine reads them back and goes on from there.

use std::collections::BTreeMap;
use std::future::Future;

use serde::{Deserialize, Serialize};

use super::call::Usage;
use crate::api::{AggregationStrategy, FinishReason, Tally};

/// Most bytes the entries of one job may hold: a ConfigMap is limited to 1 MiB, and its
/// metadata needs room too. Local mode keeps the same limit so a job that runs locally
/// also fits in a cluster.
pub const MAX_RESULT_BYTES: usize = 1_000_000;

pub const PLAN: &str = "plan.json";
pub const USAGE: &str = "usage.json";
pub const RESULT: &str = "result.json";
pub const ANSWER: &str = "answer";

pub fn subagent_key(index: usize) -> String {
    format!("subagent-{index:03}.json")
}

/// Where a subagent is, as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Stage {
    /// Has an output, not yet verified.
    Generated,
    /// Verified (or failed for good): never run again.
    Finished,
}

/// One subagent's work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SubagentRecord {
    pub index: usize,
    pub stage: Stage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subtask: Option<String>,
    /// The output verified last (the repaired one after a repair).
    pub output: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Model calls for this subagent: generation, retries and repair.
    pub attempts: u32,
    /// Why the model stopped writing `output`, when the server said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<FinishReason>,
    /// How sure the model was of `output`: the geometric mean of its tokens'
    /// probabilities, from 0 to 1, when the pool's server reported them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confidence: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<VerdictRecord>,
    /// Whether the output is a repair after a failed verdict.
    #[serde(default)]
    pub repaired: bool,
    /// Why the subagent has no usable output or verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl SubagentRecord {
    pub fn passed(&self) -> bool {
        self.error.is_none() && self.verdict.as_ref().is_some_and(|v| v.pass)
    }

    pub fn tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }

    /// Whether the model was cut off at its token limit while writing `output`.
    pub fn truncated(&self) -> bool {
        self.finish_reason == Some(FinishReason::Length)
    }
}

/// How an output was judged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VerdictRecord {
    pub pass: bool,
    /// The gate's score; absent when no gate judged it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<u8>,
    pub issues: Vec<String>,
}

/// The final result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobResult {
    pub strategy: AggregationStrategy,
    /// Subagents whose outputs make up the answer.
    pub chosen: Vec<usize>,
    /// How a vote chose the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tally: Option<Tally>,
    /// Why the model that wrote the answer stopped: the synthesis call's reason for
    /// `synthesize`, and for the other strategies `Length` when an answer is made of an
    /// output accepted although cut off (`verification.truncated: accept`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<FinishReason>,
}

impl JobResult {
    /// Whether the answer was cut off at its token limit.
    pub fn truncated(&self) -> bool {
        self.finish_reason == Some(FinishReason::Length)
    }

    /// The field whose limit cut a truncated answer: the synthesis has its own, the
    /// other strategies pass on the subagents' outputs.
    pub fn limit_field(&self) -> &'static str {
        match self.strategy {
            AggregationStrategy::Synthesize => "spec.aggregation.maxTokens",
            _ => "spec.fanOut.maxTokens",
        }
    }
}

/// Everything recorded for a job so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Checkpoint {
    pub plan: Option<Vec<String>>,
    pub subagents: BTreeMap<usize, SubagentRecord>,
    pub usage: BTreeMap<String, Usage>,
    pub result: Option<(JobResult, String)>,
}

/// A store the engine's entries survive in.
pub trait Store: Send + Sync {
    /// Every entry, by key.
    fn load(&self) -> impl Future<Output = Result<BTreeMap<String, String>, StoreError>> + Send;
    /// Writes (adds or replaces) these entries; others stay as they are.
    fn save(
        &self,
        entries: Vec<(String, String)>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// A store that could not be read or written; the job stays where it was.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Where the records live failed: the API server, the file system.
    #[error("{action} {place}")]
    Backend {
        action: &'static str,
        place: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The records found are another job's: one deleted and created again under the same
    /// name, whose records the garbage collector has not removed yet.
    #[error(
        "{place} belongs to another job ({owner}); it goes when that job's dependents are collected"
    )]
    Foreign { place: String, owner: String },
    /// Another engine run writes the records now (a new leader's, while this one is a
    /// deposed leader's): this one stops rather than overwrite them.
    #[error("{place} is written by another engine run now (writer {writer}); this one stops")]
    Superseded { place: String, writer: String },
    /// The place the records go refused them as too large (the API server's 422 or 413):
    /// writing them again cannot succeed.
    #[error("{place} refused the records as too large: {message}")]
    TooLarge { place: String, message: String },
    /// The place the records go is closed to the operator until someone grants it.
    #[error("the operator may not write {place}: {fix}")]
    Refused { place: String, fix: String },
    /// An entry the engine wrote cannot be read back.
    #[error("entry {key} is unreadable")]
    Unreadable {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

impl StoreError {
    /// `.map_err(StoreError::backend("writing", path))`
    pub fn backend<E: std::error::Error + Send + Sync + 'static>(
        action: &'static str,
        place: impl std::fmt::Display,
    ) -> impl FnOnce(E) -> Self {
        let place = place.to_string();
        move |source| Self::Backend {
            action,
            place,
            source: Box::new(source),
        }
    }
}

/// Reads entries back; unreadable entries are an error (they were written by us).
pub fn decode(entries: &BTreeMap<String, String>) -> Result<Checkpoint, StoreError> {
    fn parse<T: for<'de> Deserialize<'de>>(key: &str, text: &str) -> Result<T, StoreError> {
        serde_json::from_str(text).map_err(|source| StoreError::Unreadable {
            key: key.to_owned(),
            source,
        })
    }
    let mut checkpoint = Checkpoint::default();
    for (key, text) in entries {
        if key == PLAN {
            checkpoint.plan = Some(parse(key, text)?);
        } else if key == USAGE {
            checkpoint.usage = parse(key, text)?;
        } else if key.starts_with("subagent-") && key.ends_with(".json") {
            let record: SubagentRecord = parse(key, text)?;
            checkpoint.subagents.insert(record.index, record);
        }
    }
    if let (Some(result), Some(answer)) = (entries.get(RESULT), entries.get(ANSWER)) {
        checkpoint.result = Some((parse(RESULT, result)?, answer.clone()));
    }
    Ok(checkpoint)
}

pub fn encode<T: Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).expect("records serialize")
}
