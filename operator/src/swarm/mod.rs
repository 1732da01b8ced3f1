//! The swarm engine: plan, fan out, verify, aggregate. The SwarmJob controller and the
//! local mode (`kubeswarm run`) run this same code; they differ only in where pools are,
//! where records are kept, and how progress is shown.
//!
//! Layer: engine. Uses `api` and the helpers (`telemetry`); knows nothing of Kubernetes
//! clients, controllers or local mode. This module is the engine's public face: a `Job` (the inputs) runs with
//! `execute` to an `Outcome`, telling an `Observer` its `Event`s. The steps live one per
//! file: `plan`, `subagent`, `verify`, `aggregate`, over the state of a run in `run`. Code
//! that a `tests` check runs goes to the `Sandbox` the job is given (`sandbox`), never here.

pub(crate) mod aggregate;
mod answer;
pub(crate) mod balance;
mod bounded;
pub use bounded::MAX_RESPONSE_BYTES;
pub use endpoint::MAX_MODELS_BYTES;
pub mod call;
pub(crate) mod checks;
pub(crate) mod endpoint;
mod failure;
pub(crate) mod grammar;
mod plan;
pub mod pool;
pub mod prompts;
pub mod record;
pub(crate) mod render;
mod run;
pub mod sandbox;
mod subagent;
mod verify;
mod vote;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::Instrument;

use crate::api::{AggregationStrategy, SwarmJobSpec, VerificationMode};
use call::{Budget, CallOutcome, Ledger, Usage};
pub use failure::{Failure, Interrupted, Reason};
use pool::Pool;
use record::{Checkpoint, JobResult, MAX_RESULT_BYTES, Store, SubagentRecord};
use run::Run;
use sandbox::Sandbox;

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

/// A job to run: its spec and where its pools, records and progress go.
pub struct Job<'a, S: Store, O: Observer> {
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
    /// Where `tests` checks run the outputs' code.
    pub sandbox: &'a dyn Sandbox,
    pub options: Options,
}

impl<S: Store, O: Observer> Job<'_, S, O> {
    /// Runs the job to its result or failure, resuming from the store's records.
    /// Dropping the future cancels the calls in flight.
    pub async fn execute(self) -> Result<Outcome, Interrupted> {
        let span = tracing::info_span!("swarm_job", job = self.name);
        self.execute_in_span().instrument(span).await
    }

    async fn execute_in_span(self) -> Result<Outcome, Interrupted> {
        let entries = self.store.load().await?;
        let checkpoint = record::decode(&entries)?;
        if let Some(result) = checkpoint.result.clone() {
            // The run ended before, and the operator that ran it may have died before a
            // status said so: the status written from these events must still count
            // every subagent and the usage, as the one it would have written.
            run::report_records(
                self.observer,
                self.spec.fan_out.subagents.max(0) as usize,
                &checkpoint.subagents,
                &checkpoint.usage,
            );
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
        let run = Run {
            job: &self,
            budget: Budget::new(max_tokens, deadline, spent),
            ledger: Ledger::from_snapshot(checkpoint.usage.clone()),
            // What is written already counts against the size limit of a resumed run too.
            sizes: Mutex::new(
                entries
                    .iter()
                    .map(|(key, value)| (key.clone(), key.len() + value.len()))
                    .collect(),
            ),
            records: Mutex::new(checkpoint.subagents.clone()),
        };
        let result = run.drive(checkpoint.plan.clone()).await?;
        Ok(Outcome {
            result,
            checkpoint: record::decode(&self.store.load().await?)?,
        })
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
