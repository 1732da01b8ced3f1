//! The state of one run of a job, and what every step shares: the pools, the caller with
//! the job's budget and retry policy, the records and their size limit, suspension.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;

use super::answer::Extractor;
use super::call::{self, Budget, Caller, Ledger, Policy};
use super::checks::{self, Check};
use super::failure::{Fail, Failure, Interrupted, Reason};
use super::pool::Pool;
use super::record::{self, JobResult, Stage, Store, StoreError, SubagentRecord};
use super::{Event, Job, Observer};
use crate::api::{OutputCheckType, SwarmJobSpec};
use crate::telemetry;

/// Attempts at writing the records before a store fault interrupts the run: a write is
/// a merge of whole entries, so writing it again is safe, and an API server that blips
/// must not drop every call in flight.
const STORE_ATTEMPTS: u32 = 5;

/// Attempts at a plan or a verdict that came back malformed, before giving up.
pub(super) const STRUCTURED_ATTEMPTS: u32 = 3;

/// What a job's checks and answer extraction compile to, once per run.
pub(super) struct Rules {
    pub(super) checks: Vec<Check>,
    pub(super) extract: Extractor,
}

impl Rules {
    /// The job's rules; a bad pattern names its field.
    fn compile(spec: &SwarmJobSpec) -> Result<Self, String> {
        let extract = Extractor::compile(spec.aggregation.answer.as_ref())?;
        // CEL could say this only with a comprehension, which the API server's cost
        // analysis of CRD rules does not scope; the job says it when it starts.
        if extract.schema().is_some()
            && let Some(i) = spec
                .verification
                .checks
                .iter()
                .position(|c| matches!(c.type_, OutputCheckType::Svg | OutputCheckType::Xml))
        {
            return Err(format!(
                "spec.aggregation.answer of type jsonField makes every output a JSON object, which spec.verification.checks[{i}] would fail: remove that check, or find the answer another way"
            ));
        }
        Ok(Self {
            checks: checks::compile(&spec.verification.checks)?,
            extract,
        })
    }
}

/// Tells the observer what a run resumes from: how many subagents the plan has, each one
/// recorded before, and the usage recorded with them, so that a status written from the
/// events counts work a killed operator did.
pub(super) fn report_records<O: Observer>(
    observer: &O,
    subagents: usize,
    records: &BTreeMap<usize, SubagentRecord>,
    usage: &BTreeMap<String, call::Usage>,
) {
    observer.event(Event::Planned { subagents });
    for record in records.values() {
        observer.event(match record.stage {
            Stage::Generated => Event::Generated {
                index: record.index,
            },
            Stage::Finished => Event::Finished { record },
        });
    }
    if !records.is_empty() {
        observer.event(Event::Recorded { usage });
    }
}

/// The state of one run of a job: what it has spent and recorded so far.
pub(super) struct Run<'r, 'a, S: Store, O: Observer> {
    pub(super) job: &'r Job<'a, S, O>,
    pub(super) budget: Budget,
    pub(super) ledger: Ledger,
    /// Bytes of every entry written, to refuse a result that outgrows a ConfigMap.
    pub(super) sizes: Mutex<BTreeMap<String, usize>>,
    pub(super) records: Mutex<BTreeMap<usize, SubagentRecord>>,
}

impl<S: Store, O: Observer> Run<'_, '_, S, O> {
    pub(super) fn spec(&self) -> &SwarmJobSpec {
        self.job.spec
    }

    pub(super) fn pool(&self, name: &str) -> Result<&Pool, Failure> {
        self.job.pools.get(name).map(|p| p.as_ref()).ok_or_else(|| {
            Failure::new(
                Reason::PoolNotFound,
                format!("ModelPool {name} is not known to this run"),
            )
        })
    }

    pub(super) fn caller(&self) -> Caller<'_> {
        let fan_out = &self.spec().fan_out;
        Caller {
            budget: &self.budget,
            ledger: &self.ledger,
            policy: Policy {
                timeout: Duration::from_secs(fan_out.timeout_seconds.max(1) as u64),
                retries: fan_out.retries.max(0) as u32,
                backoff_base: self.job.options.backoff_base,
                backoff_cap: self.job.options.backoff_cap,
            },
            observer: self.job.observer,
        }
    }

    /// Plan, fan out (each subagent verified as it finishes), aggregate.
    pub(super) async fn drive(
        &self,
        plan: Option<Vec<String>>,
    ) -> Result<Result<(JobResult, String), Failure>, Interrupted> {
        let rules = match Rules::compile(self.spec()) {
            Ok(rules) => rules,
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
        if let Some(subtasks) = &subtasks
            && subtasks.len() != n
        {
            // fanOut.subagents cannot change once a job started: a plan of another length
            // was recorded for another job of the same name.
            return Ok(Err(Failure::new(
                Reason::ForeignRecords,
                format!(
                    "the job's records hold a plan of {} subtasks and the job has {n} subagents: they are another job's; delete them to start over",
                    subtasks.len()
                ),
            )));
        }
        report_records(
            self.job.observer,
            n,
            &self.records.lock().expect("records lock"),
            &self.ledger.snapshot(),
        );

        let concurrency = self
            .spec()
            .fan_out
            .max_concurrency
            .map_or(n, |c| c.max(1) as usize)
            .max(1);
        let subtasks = subtasks.as_deref();
        let mut outcomes = futures::stream::iter(0..n)
            .map(|index| self.subagent(index, subtasks.map(|s| s[index].as_str()), &rules))
            .buffer_unordered(concurrency);
        while let Some(outcome) = outcomes.next().await {
            match outcome {
                Ok(()) => {}
                // The job has failed: no subagent is started after it, and dropping the
                // stream cancels the calls in flight, which the workers stop decoding.
                Err(Fail::Job(failure)) => return Ok(Err(failure)),
                Err(Fail::Store(err)) => return Err(err),
            }
        }
        drop(outcomes);
        self.job.observer.event(Event::Aggregating);
        match self.aggregate(&rules.extract).await {
            Ok(result) => Ok(Ok(result)),
            Err(Fail::Job(failure)) => Ok(Err(failure)),
            Err(Fail::Store(err)) => Err(err),
        }
    }

    /// Writes a subagent's record with the usage so far.
    pub(super) async fn record(&self, record: &SubagentRecord) -> Result<(), Fail> {
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
    pub(super) async fn save(&self, mut entries: Vec<(String, String)>) -> Result<(), Fail> {
        let usage = self.ledger.snapshot();
        entries.push((record::USAGE.to_owned(), record::encode(&usage)));
        {
            let mut sizes = self.sizes.lock().expect("sizes lock");
            let mut next = sizes.clone();
            for (key, value) in &entries {
                next.insert(key.clone(), key.len() + value.len());
            }
            let total: usize = next.values().sum();
            let limit = self.job.options.max_result_bytes;
            if total > limit {
                let (key, value) = &entries[0];
                return Err(Failure::new(
                    Reason::ResultTooLarge,
                    format!(
                        "{key} ({} bytes) would take the job's result to {total} bytes, over the {limit} a ConfigMap or Secret holds: lower spec.fanOut.maxTokens or spec.fanOut.subagents",
                        value.len()
                    ),
                )
                .into());
            }
            *sizes = next;
        }
        let mut attempt = 1;
        loop {
            match self.job.store.save(entries.clone()).await {
                Ok(()) => break,
                Err(StoreError::TooLarge { place, message }) => {
                    return Err(Failure::new(
                        Reason::ResultTooLarge,
                        format!(
                            "{place} refused the job's records as too large ({message}): lower spec.fanOut.maxTokens or spec.fanOut.subagents"
                        ),
                    )
                    .into());
                }
                // Another engine run has the records: writing again would fight it.
                Err(err @ (StoreError::Superseded { .. } | StoreError::Foreign { .. })) => {
                    return Err(err.into());
                }
                Err(err) if attempt < STORE_ATTEMPTS => {
                    tracing::warn!(error = %telemetry::chain(&err), attempt, "the job's records could not be written; trying again");
                    let options = &self.job.options;
                    tokio::time::sleep(call::backoff(
                        options.backoff_base,
                        options.backoff_cap,
                        attempt,
                    ))
                    .await;
                    attempt += 1;
                }
                Err(err) => return Err(err.into()),
            }
        }
        self.job.observer.event(Event::Recorded { usage: &usage });
        Ok(())
    }

    /// Waits while the job is suspended; calls in flight are not affected.
    pub(super) async fn wait_unsuspended(&self) {
        let mut suspended = self.job.suspended.clone();
        // A closed channel means nobody can suspend the job any more.
        let _ = suspended.wait_for(|s| !*s).await;
    }

    /// Records a finished subagent and reports it.
    pub(super) async fn finish(&self, record: SubagentRecord) -> Result<(), Fail> {
        self.record(&record).await?;
        self.job.observer.event(Event::Finished { record: &record });
        Ok(())
    }
}
