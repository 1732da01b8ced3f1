//! The swarm engine: plan, fan out, verify, aggregate. The SwarmJob controller and the
//! local mode (`kubeswarm run`) run this same code; they differ only in where pools are,
//! where records are kept, and how progress is shown.

pub mod aggregate;
pub mod balance;
pub mod call;
pub mod checks;
pub mod grammar;
pub mod pool;
pub mod prompts;
pub mod record;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::watch;
use tracing::Instrument;

use crate::api::{AggregationStrategy, SwarmJobSpec, VerificationMode};
use call::{Budget, CallError, CallOutcome, Caller, Ledger, Policy, Prompt, Usage};
use checks::Check;
use pool::Pool;
use record::{
    Checkpoint, JobResult, MAX_RESULT_BYTES, Stage, Store, StoreError, SubagentRecord,
    VerdictRecord,
};

/// Attempts at a plan or a verdict that came back malformed, before giving up.
const STRUCTURED_ATTEMPTS: u32 = 3;
/// The gate's and the planner's answers are short; these caps keep a rambling model from
/// spending the job's budget on them.
const VERDICT_TOKENS: u32 = 512;
const PLAN_TOKENS: u32 = 2048;

/// Why a job failed. The names are the reasons of its `Failed` condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    PoolNotFound,
    InvalidSpec,
    PlanFailed,
    BudgetExceeded,
    DeadlineExceeded,
    VerificationFailed,
    AggregationFailed,
    ResultTooLarge,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PoolNotFound => "PoolNotFound",
            Self::InvalidSpec => "InvalidSpec",
            Self::PlanFailed => "PlanFailed",
            Self::BudgetExceeded => "BudgetExceeded",
            Self::DeadlineExceeded => "DeadlineExceeded",
            Self::VerificationFailed => "VerificationFailed",
            Self::AggregationFailed => "AggregationFailed",
            Self::ResultTooLarge => "ResultTooLarge",
        }
    }
}

/// A job that could not produce its result, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}: {message}", reason.as_str())]
pub struct Failure {
    pub reason: Reason,
    pub message: String,
}

impl Failure {
    fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

impl From<CallError> for Failure {
    fn from(err: CallError) -> Self {
        let reason = match err {
            CallError::BudgetExceeded { .. } => Reason::BudgetExceeded,
            CallError::DeadlineExceeded => Reason::DeadlineExceeded,
            _ => Reason::AggregationFailed,
        };
        Self::new(reason, err.to_string())
    }
}

/// Why the engine stopped without an outcome: the store failed. Nothing is lost, the
/// records written so far stand, and a new run resumes from them.
#[derive(Debug, thiserror::Error)]
#[error("the job's records could not be written or read: {0}")]
pub struct Interrupted(#[from] pub StoreError);

/// What a run ends with.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub result: Result<(JobResult, String), Failure>,
    pub checkpoint: Checkpoint,
}

/// Progress, as it happens.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// The subtasks are known (planned now, given, or read back from the records). A
    /// resumed run follows this with `Generated` or `Finished` for each subagent it
    /// recorded before.
    Planned {
        subagents: usize,
    },
    /// A subagent's model call is in flight.
    Running {
        index: usize,
    },
    /// A subagent has its output (recorded).
    Generated {
        index: usize,
    },
    /// A subagent is finished, verdict included (recorded).
    Finished {
        record: &'a SubagentRecord,
    },
    Aggregating,
    /// One HTTP call to a pool ended, retries counted one by one.
    Call {
        pool: &'a str,
        outcome: CallOutcome,
        prompt_tokens: u64,
        completion_tokens: u64,
    },
    /// The usage per pool as just recorded: what a status may count.
    Recorded {
        usage: &'a BTreeMap<String, Usage>,
    },
}

pub trait Observer: Send + Sync {
    fn event(&self, event: Event<'_>);
}

/// Engine settings that are not part of the job.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    pub max_result_bytes: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            backoff_base: Duration::from_millis(250),
            backoff_cap: Duration::from_secs(10),
            max_result_bytes: MAX_RESULT_BYTES,
        }
    }
}

/// One run of a job.
pub struct Run<'a, S: Store, O: Observer> {
    pub name: &'a str,
    pub spec: &'a SwarmJobSpec,
    /// Pools by the names the spec uses.
    pub pools: &'a BTreeMap<String, Arc<Pool>>,
    pub store: &'a S,
    pub observer: &'a O,
    /// When the job started, for its deadline: the first start, not this run's.
    pub started: Instant,
    /// `true` pauses the job between calls (`spec.suspend`).
    pub suspended: watch::Receiver<bool>,
    pub options: Options,
}

impl<S: Store, O: Observer> Run<'_, S, O> {
    /// Runs the job to its result or failure, resuming from the store's records.
    /// Dropping the future cancels the calls in flight.
    pub async fn execute(self) -> Result<Outcome, Interrupted> {
        let span = tracing::info_span!("swarm_job", job = self.name);
        self.execute_in_span().instrument(span).await
    }

    async fn execute_in_span(self) -> Result<Outcome, Interrupted> {
        let checkpoint = record::decode(&self.store.load().await?)?;
        if let Some(result) = checkpoint.result.clone() {
            return Ok(Outcome {
                result: Ok(result),
                checkpoint,
            });
        }
        let spent = checkpoint.usage.values().map(Usage::tokens).sum();
        let deadline = self
            .spec
            .budget
            .as_ref()
            .and_then(|b| b.deadline_seconds)
            .map(|s| self.started + Duration::from_secs(s.max(0) as u64));
        let max_tokens = self
            .spec
            .budget
            .as_ref()
            .and_then(|b| b.max_total_tokens)
            .map(|t| t.max(0) as u64);
        let job = Job {
            run: &self,
            budget: Budget::new(max_tokens, deadline, spent),
            ledger: Ledger::from_snapshot(checkpoint.usage.clone()),
            sizes: Mutex::new(BTreeMap::new()),
            records: Mutex::new(checkpoint.subagents.clone()),
        };
        let result = job.run(checkpoint.plan.clone()).await?;
        Ok(Outcome {
            result,
            checkpoint: record::decode(&self.store.load().await?)?,
        })
    }
}

/// The state of one run.
struct Job<'r, 'a, S: Store, O: Observer> {
    run: &'r Run<'a, S, O>,
    budget: Budget,
    ledger: Ledger,
    /// Bytes of every entry written, to refuse a result that outgrows a ConfigMap.
    sizes: Mutex<BTreeMap<String, usize>>,
    records: Mutex<BTreeMap<usize, SubagentRecord>>,
}

impl<S: Store, O: Observer> Job<'_, '_, S, O> {
    fn spec(&self) -> &SwarmJobSpec {
        self.run.spec
    }

    fn pool(&self, name: &str) -> Result<&Pool, Failure> {
        self.run.pools.get(name).map(|p| p.as_ref()).ok_or_else(|| {
            Failure::new(
                Reason::PoolNotFound,
                format!("ModelPool {name} is not known to this run"),
            )
        })
    }

    fn caller(&self) -> Caller<'_> {
        let fan_out = &self.spec().fan_out;
        Caller {
            budget: &self.budget,
            ledger: &self.ledger,
            policy: Policy {
                timeout: Duration::from_secs(fan_out.timeout_seconds.max(1) as u64),
                retries: fan_out.retries.max(0) as u32,
                backoff_base: self.run.options.backoff_base,
                backoff_cap: self.run.options.backoff_cap,
            },
            observer: self.run.observer,
        }
    }

    async fn run(
        &self,
        plan: Option<Vec<String>>,
    ) -> Result<Result<(JobResult, String), Failure>, Interrupted> {
        let checks = match checks::compile(&self.spec().verification.checks) {
            Ok(checks) => checks,
            Err(message) => return Ok(Err(Failure::new(Reason::InvalidSpec, message))),
        };
        let subtasks = match plan {
            Some(plan) => Some(plan),
            None => match self.plan().await {
                Ok(plan) => plan,
                Err(Fail::Job(failure)) => return Ok(Err(failure)),
                Err(Fail::Store(err)) => return Err(err),
            },
        };
        let n = self.spec().fan_out.subagents.max(0) as usize;
        self.run.observer.event(Event::Planned { subagents: n });
        {
            let records = self.records.lock().expect("records lock");
            for record in records.values() {
                self.run.observer.event(match record.stage {
                    Stage::Generated => Event::Generated {
                        index: record.index,
                    },
                    Stage::Finished => Event::Finished { record },
                });
            }
            if !records.is_empty() {
                self.run.observer.event(Event::Recorded {
                    usage: &self.ledger.snapshot(),
                });
            }
        }

        let concurrency = self
            .spec()
            .fan_out
            .max_concurrency
            .map_or(n, |c| c.max(1) as usize)
            .max(1);
        let subtasks = subtasks.as_deref();
        let mut stops = Vec::new();
        let mut outcomes = futures::stream::iter(0..n)
            .map(|index| self.subagent(index, subtasks.map(|s| s[index].as_str()), &checks))
            .buffer_unordered(concurrency);
        while let Some(outcome) = outcomes.next().await {
            match outcome {
                Ok(()) => {}
                Err(Fail::Job(failure)) => stops.push(failure),
                Err(Fail::Store(err)) => return Err(err),
            }
        }
        drop(outcomes);
        if let Some(failure) = stops.into_iter().next() {
            return Ok(Err(failure));
        }
        self.run.observer.event(Event::Aggregating);
        match self.aggregate().await {
            Ok(result) => Ok(Ok(result)),
            Err(Fail::Job(failure)) => Ok(Err(failure)),
            Err(Fail::Store(err)) => Err(err),
        }
    }

    /// The subtasks: given, planned by the planner, or none (every subagent gets the task).
    async fn plan(&self) -> Result<Option<Vec<String>>, Fail> {
        if let Some(subtasks) = &self.spec().subtasks {
            return Ok(Some(subtasks.clone()));
        }
        let Some(planner) = &self.spec().planner else {
            return Ok(None);
        };
        let pool = self.pool(&planner.pool)?;
        let n = self.spec().fan_out.subagents.max(0) as usize;
        let (messages, schema) = prompts::plan(&self.spec().task, planner.prompt.as_deref(), n);
        let prompt = Prompt {
            messages,
            max_tokens: PLAN_TOKENS,
            temperature: 0.2,
            schema: Some(("subtasks", schema)),
            grammar: None,
            affinity: None,
        };
        let mut last = String::new();
        for _ in 0..STRUCTURED_ATTEMPTS {
            let reply = self
                .caller()
                .call(pool, &prompt)
                .instrument(tracing::info_span!("plan", pool = pool.name()))
                .await
                .map_err(|err| {
                    if err.stops_job() {
                        Failure::from(err)
                    } else {
                        Failure::new(
                            Reason::PlanFailed,
                            format!("the planner call failed: {err}"),
                        )
                    }
                })?;
            match prompts::read_plan(&reply.content, n) {
                Ok(subtasks) => {
                    self.save(vec![(record::PLAN.to_owned(), record::encode(&subtasks))])
                        .await?;
                    return Ok(Some(subtasks));
                }
                Err(problem) => last = problem,
            }
        }
        Err(Failure::new(
            Reason::PlanFailed,
            format!("no usable plan after {STRUCTURED_ATTEMPTS} attempts: {last}"),
        )
        .into())
    }

    /// One subagent from where its record left it to finished, recorded.
    async fn subagent(
        &self,
        index: usize,
        subtask: Option<&str>,
        checks: &[Check],
    ) -> Result<(), Fail> {
        let recorded = self
            .records
            .lock()
            .expect("records lock")
            .get(&index)
            .cloned();
        if recorded
            .as_ref()
            .is_some_and(|r| r.stage == Stage::Finished)
        {
            return Ok(());
        }
        let span = tracing::info_span!("subagent", index);
        async move {
            let spec = self.spec();
            let pool = self.pool(&spec.fan_out.pool)?;
            let conversation = prompts::subagent(&spec.task, subtask);
            let prompt = Prompt {
                messages: conversation.clone(),
                max_tokens: spec.fan_out.max_tokens.max(1) as u32,
                temperature: spec.fan_out.temperature as f32,
                schema: None,
                grammar: grammar::for_checks(&spec.verification.checks),
                affinity: Some(balance::prefix_key(&spec.task)),
            };
            let mut record = match recorded {
                Some(record) => record,
                None => {
                    self.wait_unsuspended().await;
                    self.run.observer.event(Event::Running { index });
                    let mut record = SubagentRecord {
                        index,
                        stage: Stage::Generated,
                        subtask: subtask.map(str::to_owned),
                        output: String::new(),
                        prompt_tokens: 0,
                        completion_tokens: 0,
                        attempts: 0,
                        verdict: None,
                        repaired: false,
                        error: None,
                    };
                    match self.caller().call(pool, &prompt).await {
                        Ok(reply) => {
                            record.add(&reply);
                            self.record(&record).await?;
                            self.run.observer.event(Event::Generated { index });
                        }
                        Err(err) if err.stops_job() => return Err(Failure::from(err).into()),
                        Err(err) => {
                            record.error = Some(err.to_string());
                            record.stage = Stage::Finished;
                            return self.finish(record).await;
                        }
                    }
                    record
                }
            };
            let mut verdict = self.verify(&record.output, subtask, checks).await?;
            if !verdict.pass && spec.verification.repair_rounds > 0 && !record.repaired {
                self.wait_unsuspended().await;
                self.run.observer.event(Event::Running { index });
                let issues = verdict
                    .verdict
                    .as_ref()
                    .map(|v| v.issues.clone())
                    .unwrap_or_default();
                let repair = Prompt {
                    messages: prompts::repair(conversation, &record.output, &issues),
                    ..prompt
                };
                match self
                    .caller()
                    .call(pool, &repair)
                    .instrument(tracing::info_span!("repair"))
                    .await
                {
                    Ok(reply) => {
                        record.output.clear();
                        record.add(&reply);
                        record.repaired = true;
                        verdict = self.verify(&record.output, subtask, checks).await?;
                    }
                    Err(err) if err.stops_job() => return Err(Failure::from(err).into()),
                    Err(err) => verdict.error = Some(format!("the repair failed: {err}")),
                }
            }
            record.verdict = verdict.verdict;
            record.error = verdict.error;
            record.stage = Stage::Finished;
            self.finish(record).await
        }
        .instrument(span)
        .await
    }

    async fn finish(&self, record: SubagentRecord) -> Result<(), Fail> {
        self.record(&record).await?;
        self.run.observer.event(Event::Finished { record: &record });
        Ok(())
    }

    /// Checks, then the gate. A verdict the gate could not give is an error on the
    /// subagent, not a failed output.
    async fn verify(
        &self,
        output: &str,
        subtask: Option<&str>,
        checks: &[Check],
    ) -> Result<Judgement, Fail> {
        let span = tracing::info_span!("verify");
        async move {
            let spec = self.spec();
            let problems = checks::run(checks, output);
            if !problems.is_empty() {
                return Ok(Judgement::verdict(VerdictRecord {
                    pass: false,
                    score: None,
                    issues: problems,
                }));
            }
            let verification = &spec.verification;
            let gate = match (verification.mode, &verification.pool) {
                (VerificationMode::Adversarial, Some(gate)) => gate,
                _ => {
                    return Ok(Judgement::verdict(VerdictRecord {
                        pass: true,
                        score: None,
                        issues: Vec::new(),
                    }));
                }
            };
            let pool = self.pool(gate)?;
            let (messages, schema) = prompts::critique(&spec.task, subtask, output);
            let prompt = Prompt {
                messages,
                max_tokens: VERDICT_TOKENS,
                temperature: 0.0,
                schema: Some(("verdict", schema)),
                grammar: None,
                affinity: Some(balance::prefix_key(&spec.task)),
            };
            let mut last = String::new();
            for _ in 0..STRUCTURED_ATTEMPTS {
                self.wait_unsuspended().await;
                match self.caller().call(pool, &prompt).await {
                    Ok(reply) => match prompts::read_verdict(&reply.content) {
                        Ok(verdict) => {
                            let pass = match verification.min_score {
                                Some(min) => i32::from(verdict.score) >= min,
                                None => verdict.pass,
                            };
                            return Ok(Judgement::verdict(VerdictRecord {
                                pass,
                                score: Some(verdict.score),
                                issues: verdict.issues,
                            }));
                        }
                        Err(problem) => last = problem,
                    },
                    Err(err) if err.stops_job() => return Err(Failure::from(err).into()),
                    Err(err) => {
                        return Ok(Judgement::error(format!("the gate call failed: {err}")));
                    }
                }
            }
            Ok(Judgement::error(format!(
                "no usable verdict after {STRUCTURED_ATTEMPTS} attempts: {last}"
            )))
        }
        .instrument(span)
        .await
    }

    async fn aggregate(&self) -> Result<(JobResult, String), Fail> {
        let span = tracing::info_span!("aggregate");
        async move {
            let spec = self.spec();
            let records = self.records.lock().expect("records lock").clone();
            let passing: Vec<&SubagentRecord> = records.values().filter(|r| r.passed()).collect();
            if passing.is_empty() {
                let reasons: Vec<String> = records
                    .values()
                    .take(3)
                    .map(|r| format!("subagent {}: {}", r.index, r.why_not()))
                    .collect();
                return Err(Failure::new(
                    Reason::VerificationFailed,
                    format!(
                        "none of the {} outputs passed verification; {}",
                        records.len(),
                        reasons.join("; ")
                    ),
                )
                .into());
            }
            let candidates: Vec<aggregate::Candidate> = passing
                .iter()
                .map(|r| aggregate::Candidate {
                    index: r.index,
                    output: &r.output,
                    score: r.verdict.as_ref().and_then(|v| v.score),
                })
                .collect();
            let strategy = spec.aggregation.strategy;
            let mut result = JobResult {
                strategy,
                chosen: Vec::new(),
                votes: None,
            };
            let answer = match strategy {
                AggregationStrategy::Vote => {
                    let tally = aggregate::vote(&candidates).expect("candidates are not empty");
                    result.chosen = vec![tally.index];
                    result.votes = Some(tally.into());
                    records[&tally.index].output.clone()
                }
                AggregationStrategy::BestOf => {
                    let best = aggregate::best_of(&candidates).expect("candidates are not empty");
                    result.chosen = vec![best];
                    records[&best].output.clone()
                }
                AggregationStrategy::Collect => {
                    result.chosen = passing.iter().map(|r| r.index).collect();
                    passing
                        .iter()
                        .map(|r| format!("## Subagent {}\n\n{}\n", r.index, r.output.trim()))
                        .collect::<Vec<_>>()
                        .join("\n")
                }
                AggregationStrategy::Synthesize => {
                    let name = spec
                        .aggregation
                        .pool
                        .as_ref()
                        .or(spec.verification.pool.as_ref())
                        .ok_or_else(|| Failure::new(Reason::InvalidSpec, "spec.aggregation.strategy synthesize needs spec.aggregation.pool or spec.verification.pool"))?;
                    let pool = self.pool(name)?;
                    result.chosen = passing.iter().map(|r| r.index).collect();
                    let outputs: Vec<&str> = passing.iter().map(|r| r.output.as_str()).collect();
                    let prompt = Prompt {
                        messages: prompts::synthesize(&spec.task, spec.aggregation.prompt.as_deref(), &outputs),
                        max_tokens: spec.fan_out.max_tokens.max(1) as u32,
                        temperature: 0.2,
                        schema: None,
                        grammar: None,
                        affinity: None,
                    };
                    self.wait_unsuspended().await;
                    let reply = self.caller().call(pool, &prompt).await.map_err(|err| {
                        if err.stops_job() {
                            Failure::from(err)
                        } else {
                            Failure::new(Reason::AggregationFailed, format!("the synthesis call failed: {err}"))
                        }
                    })?;
                    reply.content
                }
            };
            self.save(vec![
                (record::RESULT.to_owned(), record::encode(&result)),
                (record::ANSWER.to_owned(), answer.clone()),
            ])
            .await?;
            Ok((result, answer))
        }
        .instrument(span)
        .await
    }

    /// Writes a subagent's record with the usage so far.
    async fn record(&self, record: &SubagentRecord) -> Result<(), Fail> {
        self.save(vec![(
            record::subagent_key(record.index),
            record::encode(record),
        )])
        .await?;
        self.records
            .lock()
            .expect("records lock")
            .insert(record.index, record.clone());
        Ok(())
    }

    /// Saves entries with the usage so far, unless they would take the result past what a
    /// ConfigMap holds.
    async fn save(&self, mut entries: Vec<(String, String)>) -> Result<(), Fail> {
        let usage = self.ledger.snapshot();
        entries.push((record::USAGE.to_owned(), record::encode(&usage)));
        {
            let mut sizes = self.sizes.lock().expect("sizes lock");
            let mut next = sizes.clone();
            for (key, value) in &entries {
                next.insert(key.clone(), key.len() + value.len());
            }
            let total: usize = next.values().sum();
            let limit = self.run.options.max_result_bytes;
            if total > limit {
                let (key, value) = &entries[0];
                return Err(Failure::new(
                    Reason::ResultTooLarge,
                    format!(
                        "{key} ({} bytes) would take the job's result to {total} bytes, over the {limit} a ConfigMap holds: lower spec.fanOut.maxTokens or spec.fanOut.subagents",
                        value.len()
                    ),
                )
                .into());
            }
            *sizes = next;
        }
        self.run.store.save(entries).await?;
        self.run.observer.event(Event::Recorded { usage: &usage });
        Ok(())
    }

    /// Waits while the job is suspended; calls in flight are not affected.
    async fn wait_unsuspended(&self) {
        let mut suspended = self.run.suspended.clone();
        // A closed channel means nobody can suspend the job any more.
        let _ = suspended.wait_for(|s| !*s).await;
    }
}

/// Why a step stopped: the job failed, or the store did.
enum Fail {
    Job(Failure),
    Store(Interrupted),
}

impl From<Failure> for Fail {
    fn from(f: Failure) -> Self {
        Self::Job(f)
    }
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        Self::Store(Interrupted(e))
    }
}

impl From<Interrupted> for Fail {
    fn from(e: Interrupted) -> Self {
        Self::Store(e)
    }
}

/// A verification's outcome: a verdict, or why there is none.
struct Judgement {
    verdict: Option<VerdictRecord>,
    error: Option<String>,
    pass: bool,
}

impl Judgement {
    fn verdict(verdict: VerdictRecord) -> Self {
        Self {
            pass: verdict.pass,
            verdict: Some(verdict),
            error: None,
        }
    }

    fn error(message: String) -> Self {
        Self {
            verdict: None,
            error: Some(message),
            pass: false,
        }
    }
}

impl SubagentRecord {
    fn add(&mut self, reply: &call::Reply) {
        self.output.push_str(&reply.content);
        self.prompt_tokens += reply.prompt_tokens;
        self.completion_tokens += reply.completion_tokens;
        self.attempts += reply.attempts;
    }

    /// Why the subagent's output did not pass, in a few words.
    fn why_not(&self) -> String {
        if let Some(error) = &self.error {
            return error.clone();
        }
        match &self.verdict {
            Some(v) if !v.issues.is_empty() => v.issues[0].clone(),
            Some(v) => format!("the gate failed it (score {})", v.score.unwrap_or(0)),
            None => "not verified".to_owned(),
        }
    }
}

/// Pool names the job calls, in the order they are first needed.
pub fn pools_used(spec: &SwarmJobSpec) -> Vec<String> {
    let mut names = Vec::new();
    let mut add = |name: Option<&String>| {
        if let Some(name) = name
            && !names.contains(name)
        {
            names.push(name.clone());
        }
    };
    add(spec.planner.as_ref().map(|p| &p.pool));
    add(Some(&spec.fan_out.pool));
    if spec.verification.mode == VerificationMode::Adversarial {
        add(spec.verification.pool.as_ref());
    }
    if spec.aggregation.strategy == AggregationStrategy::Synthesize {
        add(spec
            .aggregation
            .pool
            .as_ref()
            .or(spec.verification.pool.as_ref()));
    }
    names
}
