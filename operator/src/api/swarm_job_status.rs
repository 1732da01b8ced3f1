//! What a `SwarmJob` reports: conditions, each subagent's progress and verdict, the tokens
//! used per pool, and where the result is.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Observed state of a SwarmJob.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SwarmJobStatus {
    /// Progress through the phases: `Admitted`, `Planned`, `FanOutComplete`, `Verified`,
    /// `Aggregated`, then `Complete` or `Failed`. Reasons name the cause, such as
    /// `PoolNotFound`, `PoolUnavailable`, `BudgetExceeded`, `DeadlineExceeded`,
    /// `SubagentsFailed` or `VerificationFailed`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// When the job started its first model call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,

    /// When the job completed or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,

    /// Subagents that have finished, passed or not.
    #[serde(default)]
    pub finished_subagents: i32,

    /// Progress of each subagent, by index.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["index"]))]
    pub subagents: Vec<SubagentStatus>,

    /// Tokens and calls used so far, per ModelPool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["pool"]))]
    pub usage: Vec<PoolUsage>,

    /// Where the result is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<ResultReference>,
}

/// Progress of one subagent.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SubagentStatus {
    /// Position of the subagent, from 0.
    pub index: i32,
    /// Where the subagent is.
    pub state: SubagentState,
    /// Model calls made for this subagent, retries and repairs included.
    #[serde(default)]
    pub attempts: i32,
    /// Prompt plus completion tokens of this subagent's calls.
    #[serde(default)]
    pub tokens: i64,
    /// Why the model stopped writing the output: `Stop` when it finished, `Length` when
    /// it was cut off at its token limit, `Other` when the server stopped it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<FinishReason>,
    /// The gate's verdict on the output, once verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<SubagentVerdict>,
    /// Why the subagent failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub message: Option<String>,
}

/// Where a subagent is.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubagentState {
    /// Not started.
    Pending,
    /// A call is in flight.
    Running,
    /// Produced an output, recorded in the result ConfigMap.
    Succeeded,
    /// Gave up after its retries.
    Failed,
}

/// Why a model stopped writing.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// It finished: an end of turn, a stop sequence, or the end of its grammar.
    Stop,
    /// It was cut off at its token limit.
    Length,
    /// The server stopped it for another reason (a content filter, a tool call).
    Other,
}

/// The gate's verdict on one output.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SubagentVerdict {
    /// Whether the output passed.
    pub outcome: VerdictOutcome,
    /// The gate's score, 0 to 100; absent when no gate judged the output (mode `none`,
    /// or a deterministic check failed first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<i32>,
    /// Issues the gate raised; their text is in the result ConfigMap.
    #[serde(default)]
    pub issues: i32,
}

/// Outcome of a verification.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerdictOutcome {
    /// Passed the checks and the gate.
    Pass,
    /// Failed a check or the gate.
    Fail,
}

/// Tokens and calls used on one pool.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PoolUsage {
    /// The ModelPool.
    pub pool: String,
    /// Model calls made.
    #[serde(default)]
    pub calls: i64,
    /// Prompt tokens sent.
    #[serde(default)]
    pub prompt_tokens: i64,
    /// Completion tokens generated.
    #[serde(default)]
    pub completion_tokens: i64,
}

/// Where the result of a job is: a ConfigMap, or a Secret in namespaces whose results the
/// platform team keeps in Secrets (Helm value `results.secretNamespaces`). One of the two
/// names is set.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ResultReference {
    /// ConfigMap in the job's namespace, `<job>-result`, holding the final answer and each
    /// subagent's output and verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub config_map_name: Option<String>,
    /// Secret in the job's namespace, `<job>-result`, holding what the ConfigMap would.
    /// The answer then appears nowhere else: no preview, no tally, no answer in a
    /// condition or an Event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub secret_name: Option<String>,
    /// The start of the final answer (results in a ConfigMap only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub preview: Option<String>,
    /// How a vote chose the answer, for `vote` and `weightedVote` (results in a ConfigMap
    /// only; `result.json` holds it either way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tally: Option<Tally>,
}

/// The count behind a vote's answer.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Tally {
    /// The answer that won, as found and normalised, cut to 256 characters.
    #[schemars(length(max = 256))]
    pub answer: String,
    /// Outputs that gave it.
    pub votes: i32,
    /// Passing outputs that gave an answer, so that voted.
    pub of: i32,
    /// Passing outputs in which no answer was found; they did not vote.
    pub unanswered: i32,
    /// What decided between the answers: `Majority` (the most votes), `GateScore` (the
    /// most gate score: a weighted vote, or a tie in votes), `Confidence` (a tie in both,
    /// to the answer the model was surest of), `FirstGiven` (a tie nothing else broke, to
    /// the first subagent's answer).
    pub decided_by: Decision,
}

/// What decided a vote.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// More outputs gave the answer than any other.
    Majority,
    /// The answer carried the most gate score.
    GateScore,
    /// A tie in votes and gate score went to the answer the model was surest of: the
    /// most confidence (the geometric mean of its tokens' probabilities) over its outputs.
    Confidence,
    /// A tie nothing else broke went to the first subagent's answer.
    FirstGiven,
}
