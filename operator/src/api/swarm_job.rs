//! `SwarmJob`: one task fanned out to parallel subagents, verified by a gate model and
//! aggregated into one result.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::model_pool::ModelPoolSpec;
use super::swarm_job_status::SwarmJobStatus;

/// A task fanned out to parallel subagents on a ModelPool, checked by an adversarial gate
/// model, and aggregated into one result.
// Each printcolumn(...) repeats `type_ = ...`, which clippy mistakes for a duplicated
// attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kubeswarm.dev",
    version = "v1alpha1",
    kind = "SwarmJob",
    namespaced,
    status = "SwarmJobStatus",
    shortname = "sj",
    category = "kubeswarm",
    derive = "PartialEq",
    doc = "A task fanned out to parallel LLM subagents on a ModelPool, verified by a gate model and aggregated into one result.",
    printcolumn(name = "Pool", type_ = "string", json_path = ".spec.fanOut.pool", description = "ModelPool serving the subagents"),
    printcolumn(name = "Finished", type_ = "integer", json_path = ".status.finishedSubagents", description = "Subagents that have finished"),
    printcolumn(name = "Total", type_ = "integer", json_path = ".spec.fanOut.subagents", description = "Subagents in the job"),
    printcolumn(name = "Verified", type_ = "string", json_path = ".status.conditions[?(@.type==\"Verified\")].status", description = "Whether the verification pass is done"),
    printcolumn(name = "Complete", type_ = "string", json_path = ".status.conditions[?(@.type==\"Complete\")].status", description = "Whether the job produced its result"),
    printcolumn(name = "Failed", type_ = "string", json_path = ".status.conditions[?(@.type==\"Failed\")].status", description = "Whether the job failed; the condition's reason says why"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("!has(oldSelf.status) || !has(oldSelf.status.startTime) || self.spec.task == oldSelf.spec.task")
        .message("spec.task cannot change once the job has started (status.startTime is set): create a new SwarmJob for a different task"),
    validation = Rule::new("!has(oldSelf.status) || !has(oldSelf.status.startTime) || self.spec.fanOut.pool == oldSelf.spec.fanOut.pool")
        .message("spec.fanOut.pool cannot change once the job has started (status.startTime is set): create a new SwarmJob to use another pool"),
    validation = Rule::new("!has(oldSelf.status) || !has(oldSelf.status.startTime) || self.spec.fanOut.subagents == oldSelf.spec.fanOut.subagents")
        .message("spec.fanOut.subagents cannot change once the job has started (status.startTime is set): create a new SwarmJob with the new count")
)]
#[x_kube(
    validation = Rule::new("!has(self.subtasks) || !has(self.planner)")
        .message("set spec.subtasks or spec.planner, not both: subtasks are given explicitly, the planner writes them"),
    validation = Rule::new("!has(self.subtasks) || size(self.subtasks) == self.fanOut.subagents")
        .message("spec.subtasks must have exactly spec.fanOut.subagents entries, one per subagent"),
    validation = Rule::new("self.aggregation.strategy != 'bestOf' || self.verification.mode != 'none'")
        .message("spec.aggregation.strategy bestOf ranks outputs by the gate's score: set spec.verification.mode adversarial, or choose another strategy"),
    validation = Rule::new("self.aggregation.strategy != 'weightedVote' || self.verification.mode != 'none'")
        .message("spec.aggregation.strategy weightedVote weighs votes by the gate's score: set spec.verification.mode adversarial, or choose vote"),
    validation = Rule::new("!has(self.aggregation.answer) || self.aggregation.strategy in ['vote', 'weightedVote']")
        .message("spec.aggregation.answer says what a vote compares: set spec.aggregation.strategy vote or weightedVote, or remove it"),
    validation = Rule::new("self.aggregation.strategy != 'synthesize' || has(self.aggregation.pool) || has(self.verification.pool)")
        .message("spec.aggregation.strategy synthesize needs a model to merge the outputs: set spec.aggregation.pool, or spec.verification.pool to use the gate")
)]
#[serde(rename_all = "camelCase")]
pub struct SwarmJobSpec {
    /// The instruction every subagent works on. With `subtasks` or a `planner`, each
    /// subagent gets the task plus its own subtask; without, every subagent gets the task
    /// alone (useful with `vote` and `bestOf`). Cannot change once the job has started.
    #[schemars(length(min = 1, max = 32768))]
    pub task: String,

    /// One subtask per subagent, in order, when the split is known in advance. Exactly
    /// `fanOut.subagents` entries. Mutually exclusive with `planner`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 100), inner(length(min = 1, max = 8192)))]
    pub subtasks: Option<Vec<String>>,

    /// A model call that splits the task into `fanOut.subagents` subtasks before the fan
    /// out. Mutually exclusive with `subtasks`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub planner: Option<PlannerSpec>,

    /// How the subagents run.
    pub fan_out: FanOutSpec,

    /// The adversarial check of every subagent's output: name the gate pool, or set
    /// `mode: none` to go without. Required, with no default: the API server checks a
    /// default against the rules too, and an adversarial pass has no pool to default to.
    pub verification: VerificationSpec,

    /// How the outputs that passed verification become the result.
    #[serde(default)]
    pub aggregation: AggregationSpec,

    /// ModelPools that belong to this job: created when the job is admitted and deleted when
    /// it finishes, so their GPU quota returns to the queue. Referenced by name like any
    /// other pool; each is created as `<job>-<name>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub pools: Vec<JobPool>,

    /// Limits on the whole job across all model calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetSpec>,

    /// Pauses the job between model calls: calls in flight finish, no new ones start, and
    /// job-scoped pools are released. Setting it back to false resumes where it stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend: Option<bool>,

    /// Seconds after the job completes or fails before it is deleted with its result.
    /// Unset keeps it until someone deletes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 2592000").message("spec.ttlSecondsAfterFinished must be between 0 and 2592000 (30 days)"))]
    pub ttl_seconds_after_finished: Option<i32>,
}

/// A planner call that splits the task into subtasks.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PlannerSpec {
    /// ModelPool in this namespace, or a job-scoped pool, that writes the plan.
    #[schemars(length(min = 1, max = 63), pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub pool: String,

    /// Instructions for the planner, sent before the task. Unset uses kubeswarm's
    /// built-in planning prompt. The planner's answer is constrained to a JSON list of
    /// exactly `fanOut.subagents` subtasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16384))]
    pub prompt: Option<String>,
}

/// How the subagents run.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("!has(self.maxConcurrency) || self.maxConcurrency <= self.subagents")
        .message("spec.fanOut.maxConcurrency cannot exceed spec.fanOut.subagents: lower it, or leave it unset to run every subagent at once")
)]
#[serde(rename_all = "camelCase")]
pub struct FanOutSpec {
    /// ModelPool in this namespace, or a job-scoped pool, that serves the subagents.
    /// Cannot change once the job has started.
    #[schemars(length(min = 1, max = 63), pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub pool: String,

    /// Number of parallel subagents, between 1 and 100. Cannot change once the job has
    /// started.
    #[x_kube(validation = Rule::new("self >= 1 && self <= 100").message("spec.fanOut.subagents must be between 1 and 100"))]
    pub subagents: i32,

    /// Subagent calls in flight at once. Unset runs every subagent at once; the pool's
    /// workers queue what they cannot batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("spec.fanOut.maxConcurrency must be at least 1"))]
    pub max_concurrency: Option<i32>,

    /// Most tokens one subagent call may generate, between 1 and 32768. Defaults to `1024`.
    #[serde(default = "default_max_tokens")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 32768").message("spec.fanOut.maxTokens must be between 1 and 32768"))]
    pub max_tokens: i32,

    /// Sampling temperature of the subagents, between 0 (deterministic) and 2. Defaults to
    /// `0.7`.
    #[serde(default = "default_temperature")]
    #[x_kube(validation = Rule::new("self >= 0.0 && self <= 2.0").message("spec.fanOut.temperature must be between 0 and 2"))]
    pub temperature: f64,

    /// Seconds one subagent call may take before it is abandoned and retried, between 1
    /// and 3600. Defaults to `300`.
    #[serde(default = "default_timeout_seconds")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 3600").message("spec.fanOut.timeoutSeconds must be between 1 and 3600"))]
    pub timeout_seconds: i32,

    /// Retries of a subagent call after a timeout, a refused connection or a server error,
    /// with jittered backoff; client errors are not retried. Between 0 and 10. Defaults to
    /// `2`.
    #[serde(default = "default_retries")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 10").message("spec.fanOut.retries must be between 0 and 10"))]
    pub retries: i32,

    /// How the first subagent samples. `sampled`: at `temperature`, like the others.
    /// `greedy`: at temperature 0, so one output is the one a direct call of the model
    /// gives; a vote's ties go to it (the first given), and the samples can only outvote
    /// it or stand in for it when it fails verification. Defaults to `sampled`.
    #[serde(default)]
    pub first_subagent: FirstSubagent,
}

/// How the first subagent samples.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum FirstSubagent {
    /// At `fanOut.temperature`, like the others.
    #[default]
    Sampled,
    /// At temperature 0.
    Greedy,
}

fn default_max_tokens() -> i32 {
    1024
}

fn default_temperature() -> f64 {
    0.7
}

fn default_timeout_seconds() -> i32 {
    300
}

fn default_retries() -> i32 {
    2
}

/// The adversarial check of every subagent's output.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(
    validation = Rule::new("self.mode == 'none' || has(self.pool)")
        .message("spec.verification.pool is required when spec.verification.mode is adversarial: name the gate ModelPool, or set mode none")
)]
#[serde(rename_all = "camelCase")]
pub struct VerificationSpec {
    /// `adversarial`: the gate model critiques each output and returns a verdict (pass,
    /// score, issues). `none`: no critique; `checks` still apply. Defaults to `adversarial`.
    #[serde(default)]
    pub mode: VerificationMode,

    /// The gate: a ModelPool, usually of a stronger model than the subagents'. Required
    /// unless `mode` is `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub pool: Option<String>,

    /// Lowest gate score, 0 to 100, at which an output the gate passes counts as passed.
    /// Unset: 50, so a gate that passes an output it scores near 0 has not passed it; 0
    /// leaves it to the gate's own pass or fail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 100").message("spec.verification.minScore must be between 0 and 100"))]
    pub min_score: Option<i32>,

    /// Times a failed output goes back to its subagent with the gate's critique for a
    /// repair, 0 or 1. Defaults to `0`.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 1").message("spec.verification.repairRounds must be 0 or 1"))]
    pub repair_rounds: i32,

    /// What becomes of an output the model cut off at `fanOut.maxTokens`. `fail`: it fails
    /// verification with the issue that it was cut off, and gets the repair round, asked
    /// to be shorter, if the job has one. `accept`: it is checked and judged like a
    /// finished output. Defaults to `fail`.
    #[serde(default)]
    pub truncated: TruncatedOutputs,

    /// Deterministic checks every output must pass before the gate sees it. On pools of
    /// kubeswarm workers an `svg` or `json` check also constrains decoding with a grammar,
    /// so subagents write well-formed drawings or JSON; external pools are only checked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub checks: Vec<OutputCheck>,
}

/// What becomes of an output cut off at its token limit.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum TruncatedOutputs {
    /// It fails verification, and gets the repair round if the job has one.
    #[default]
    Fail,
    /// It is verified like a finished output.
    Accept,
}

/// How outputs are verified.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum VerificationMode {
    /// The gate model critiques each output and returns a structured verdict.
    #[default]
    Adversarial,
    /// No critique by a model.
    None,
}

/// A deterministic check of an output.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("(self.type == 'regex') == has(self.pattern)")
        .message("spec.verification.checks[].pattern is required for type regex and allowed only there"),
    validation = Rule::new("(self.type == 'tests') == has(self.tests)")
        .message("spec.verification.checks[].tests is required for type tests and allowed only there")
)]
#[serde(rename_all = "camelCase")]
pub struct OutputCheck {
    /// `json`, `xml` and `svg`: the output (or its first fenced code block) must parse as
    /// that format; `regex`: the output must match `pattern`; `tests`: the output's code
    /// must pass the job's `tests`, run in a sandbox.
    #[serde(rename = "type")]
    pub type_: OutputCheckType,

    /// Regular expression (RE2 syntax) the output must match, for type `regex`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub pattern: Option<String>,

    /// The tests the output's code must pass, for type `tests`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tests: Option<TestsCheck>,
}

/// Python 3 tests run against the code an output holds (its first fenced code block, or
/// the whole output when it has none). The program run is `prelude`, the output's code,
/// then `source`, as one file; the output passes when it exits with status 0 within
/// `timeoutSeconds`. It runs in a sandbox with no network, never in the operator: locally
/// a subprocess in namespaces of its own; in a cluster a Kubernetes Job in the job's
/// namespace, from the image the platform allows.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TestsCheck {
    /// Python run after the output's code, for example `assert add(2, 3) == 5`. A failed
    /// assertion, an exception or a non-zero exit fails the output, and the end of what
    /// the program printed becomes the output's issue (and its repair instruction).
    #[schemars(length(min = 1, max = 32768))]
    pub source: String,

    /// Python run before the output's code, for example the imports its signature needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 8192))]
    pub prelude: Option<String>,

    /// Seconds one output's program may run, between 1 and 300. Defaults to `10`.
    #[serde(default = "default_tests_timeout_seconds")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 300").message("spec.verification.checks[].tests.timeoutSeconds must be between 1 and 300"))]
    pub timeout_seconds: i32,
}

fn default_tests_timeout_seconds() -> i32 {
    10
}

/// Kinds of deterministic check.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum OutputCheckType {
    /// Parses as JSON.
    Json,
    /// Parses as well-formed XML.
    Xml,
    /// Parses as XML whose root element is `svg`.
    Svg,
    /// Matches `pattern`.
    Regex,
    /// Its code passes `tests`.
    Tests,
}

/// How the outputs that passed verification become the result.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AggregationSpec {
    /// `synthesize`: a model merges the outputs into one answer. `vote`: the answer most
    /// outputs give wins (see `answer`). `weightedVote`: each output's vote weighs its gate
    /// score. `bestOf`: the output with the highest gate score. `collect`: every passing
    /// output is kept, for example a gallery. Defaults to `synthesize`.
    #[serde(default)]
    pub strategy: AggregationStrategy,

    /// How to find the answer in an output, for `vote` and `weightedVote`; the gate sees
    /// the answer found. Unset: the whole output is the answer, which suits outputs that
    /// are nothing but the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<AnswerSpec>,

    /// ModelPool that synthesizes. Unset uses the verification pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub pool: Option<String>,

    /// Instructions for the synthesis, sent before the outputs. Unset uses kubeswarm's
    /// built-in prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16384))]
    pub prompt: Option<String>,

    /// Most tokens the synthesis (`synthesize`) may generate, between 1 and 32768. Unset:
    /// as many as the outputs it merges took together, at most 4096 (an inference-worker's
    /// default cap on one call) and at least `fanOut.maxTokens`. An answer cut off at its
    /// limit is reported as such (the `Aggregated` and `Complete` reasons say
    /// `AnswerTruncated`), never as a complete one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 32768").message("spec.aggregation.maxTokens must be between 1 and 32768"))]
    pub max_tokens: Option<i32>,
}

/// How to find the answer in an output.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("(self.type == 'regex') == has(self.pattern)")
        .message("spec.aggregation.answer.pattern is required for type regex and allowed only there"),
    validation = Rule::new("(self.type == 'jsonField') == has(self.field)")
        .message("spec.aggregation.answer.field is required for type jsonField and allowed only there"),
    validation = Rule::new("!has(self.field) || self.field != 'reasoning'")
        .message("spec.aggregation.answer.field cannot be reasoning: subagents write their reasoning in that field, before the answer; name the answer's field otherwise")
)]
#[serde(rename_all = "camelCase")]
pub struct AnswerSpec {
    /// `lastNumber`: the last number in the output, for arithmetic ("1,250.0" and "1250"
    /// are equal). `regex`: the capture group of the last match of `pattern`. `jsonField`:
    /// the field `field` of the JSON object the output is; subagents then write under a
    /// schema with a `reasoning` field first and `field` last.
    #[serde(rename = "type")]
    pub type_: AnswerType,

    /// Regular expression with exactly one capture group, around the answer, for type
    /// `regex`; other groups are written `(?:...)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub pattern: Option<String>,

    /// Name of the field holding the answer, for type `jsonField`; not `reasoning`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), pattern(r"^[A-Za-z_][A-Za-z0-9_]*$"))]
    pub field: Option<String>,
}

/// Ways to find an answer.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum AnswerType {
    /// The last number in the output.
    LastNumber,
    /// The capture group of `pattern`'s last match.
    Regex,
    /// A field of the JSON object the output is.
    JsonField,
}

/// Most tokens any one call may generate; the bound of every `maxTokens`.
pub const MAX_CALL_TOKENS: i32 = 32768;

/// Aggregation strategies.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum AggregationStrategy {
    /// A model merges the passing outputs into one answer.
    #[default]
    Synthesize,
    /// Majority over the answers found in the outputs.
    Vote,
    /// Majority over the answers found, each output's vote weighing its gate score.
    WeightedVote,
    /// The output with the highest verifier score; on equal scores, the one the model was
    /// surest of (on pools served by kubeswarm's inference-worker), then the first.
    BestOf,
    /// Every passing output, kept side by side.
    Collect,
}

/// A ModelPool that lives and dies with its job.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JobPool {
    /// Name the job's `fanOut.pool`, `planner.pool`, `verification.pool` or
    /// `aggregation.pool` uses for this pool.
    #[schemars(length(min = 1, max = 40), pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,

    /// The pool, as in a ModelPool's spec.
    pub spec: ModelPoolSpec,
}

/// Limits on the whole job.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BudgetSpec {
    /// Most tokens, prompt and completion, across every model call of the job. When it is
    /// spent no new call starts and the job fails with reason `BudgetExceeded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1000000000").message("spec.budget.maxTotalTokens must be between 1 and 1000000000"))]
    pub max_total_tokens: Option<i64>,

    /// Seconds the job may run from its start before it fails with reason
    /// `DeadlineExceeded`, between 1 and 604800 (7 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 604800").message("spec.budget.deadlineSeconds must be between 1 and 604800 (7 days)"))]
    pub deadline_seconds: Option<i64>,
}
