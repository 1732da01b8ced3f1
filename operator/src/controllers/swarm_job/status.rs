//! A SwarmJob's conditions, from where it waits and how far it got. Pure.

use crate::api::{AggregationStrategy, Decision, FinishReason, SwarmJobSpec, VerificationMode};
use crate::conditions::{Desired, Notice};
use crate::swarm::record::JobResult;
use crate::swarm::{Failure, Reason};

use super::pools::Waiting;
use super::progress::State;
use super::store::Kind;

pub const ADMITTED: &str = "Admitted";
pub const PLANNED: &str = "Planned";
pub const FAN_OUT_COMPLETE: &str = "FanOutComplete";
pub const VERIFIED: &str = "Verified";
pub const AGGREGATED: &str = "Aggregated";
pub const COMPLETE: &str = "Complete";
pub const FAILED: &str = "Failed";

/// The reasons of the conditions, as `kubectl describe` and Events show them. A
/// `Failed` condition's reason is the engine's `swarm::Reason`.
pub mod reason {
    pub const AGGREGATED: &str = "Aggregated";
    pub const API_KEY_UNAVAILABLE: &str = "ApiKeyUnavailable";
    pub const ANSWER_TRUNCATED: &str = "AnswerTruncated";
    pub const CHECKS_ONLY: &str = "ChecksOnly";
    pub const IN_PROGRESS: &str = "InProgress";
    pub const NAME_CONFLICT: &str = "NameConflict";
    pub const NOT_SPLIT: &str = "NotSplit";
    pub const OUTPUTS_RECEIVED: &str = "OutputsReceived";
    pub const PENDING: &str = "Pending";
    pub const PLANNED: &str = "Planned";
    pub const PLANNING: &str = "Planning";
    pub const POLICY_DENIED: &str = "PolicyDenied";
    pub const POOL_NOT_FOUND: &str = "PoolNotFound";
    pub const POOL_UNAVAILABLE: &str = "PoolUnavailable";
    pub const POOLS_READY: &str = "PoolsReady";
    pub const RESULTS_UNWRITABLE: &str = "ResultsUnwritable";
    pub const STOPPED: &str = "Stopped";
    pub const SUBTASKS_GIVEN: &str = "SubtasksGiven";
    pub const SUCCEEDED: &str = "Succeeded";
    pub const SUSPENDED: &str = "Suspended";
    pub const VERIFIED: &str = "Verified";
}

/// Why a job may or may not call its pools now.
pub enum Admission<'a> {
    /// Every pool has a ready endpoint.
    Ready {
        pools: &'a [String],
    },
    Waiting(&'a Waiting),
    Suspended,
}

pub fn admitted(admission: Admission<'_>) -> Desired {
    match admission {
        Admission::Ready { pools } => Desired::new(
            ADMITTED,
            true,
            reason::POOLS_READY,
            format!(
                "every pool the job calls has a ready endpoint: {}",
                pools.join(", ")
            ),
        ),
        Admission::Waiting(waiting) => {
            Desired::new(ADMITTED, false, waiting.reason, waiting.message.clone()).warning()
        }
        Admission::Suspended => Desired::new(
            ADMITTED,
            false,
            reason::SUSPENDED,
            "spec.suspend is true: no new model call starts and the job's own pools are released; set it to false to resume",
        ),
    }
}

/// The phase conditions, and `Complete` or `Failed` once the job has an outcome.
pub fn phases(
    spec: &SwarmJobSpec,
    started: bool,
    state: &State,
    outcome: Option<&Result<JobResult, Failure>>,
    kept_in: Kind,
) -> Vec<Desired> {
    let n = spec.fan_out.subagents.max(0) as usize;
    let mut out = Vec::with_capacity(6);

    out.push(match state.planned {
        Some(count) => match (&spec.subtasks, &spec.planner) {
            (Some(_), _) => Desired::new(
                PLANNED,
                true,
                reason::SUBTASKS_GIVEN,
                format!("{count} subtasks from spec.subtasks"),
            ),
            (None, Some(planner)) => Desired::new(
                PLANNED,
                true,
                reason::PLANNED,
                format!("pool {} split the task into {count} subtasks", planner.pool),
            ),
            (None, None) => Desired::new(
                PLANNED,
                true,
                reason::NOT_SPLIT,
                format!("all {count} subagents work on the task as given"),
            ),
        },
        None if started && spec.planner.is_some() => Desired::new(
            PLANNED,
            false,
            reason::PLANNING,
            "the planner is splitting the task",
        ),
        None => pending(PLANNED, "waiting for the job's pools"),
    });

    let outputs = state.with_output();
    out.push(if state.planned.is_some() && outputs >= n {
        let failed = state.failed();
        Desired::new(
            FAN_OUT_COMPLETE,
            true,
            reason::OUTPUTS_RECEIVED,
            match failed {
                0 => format!("all {n} subagents produced an output"),
                _ => format!(
                    "{} of {n} subagents produced an output; {failed} gave up (see status.subagents)",
                    n - failed
                ),
            },
        )
    } else if state.planned.is_some() {
        Desired::new(
            FAN_OUT_COMPLETE,
            false,
            reason::IN_PROGRESS,
            format!("{outputs} of {n} subagents have an output"),
        )
    } else {
        pending(FAN_OUT_COMPLETE, "waiting for the subtasks")
    });

    let finished = state.finished();
    let passed = state.passed();
    let gate = spec.verification.mode == VerificationMode::Adversarial;
    out.push(if state.planned.is_some() && finished >= n {
        let reason = if gate {
            reason::VERIFIED
        } else {
            reason::CHECKS_ONLY
        };
        let cut = match state.truncated() {
            0 => String::new(),
            t => format!("; {t} cut off at spec.fanOut.maxTokens"),
        };
        Desired::new(
            VERIFIED,
            true,
            reason,
            format!("{passed} of {n} outputs passed verification{cut}"),
        )
    } else if outputs > 0 {
        Desired::new(
            VERIFIED,
            false,
            reason::IN_PROGRESS,
            format!("{finished} of {n} outputs verified, {passed} passed"),
        )
    } else {
        pending(VERIFIED, "waiting for the subagents' outputs")
    });

    out.push(match outcome {
        Some(Ok(result)) if result.truncated() => Desired::new(
            AGGREGATED,
            true,
            reason::ANSWER_TRUNCATED,
            format!(
                "{}{}; the answer was cut off at its token limit: raise {}",
                aggregated(result, kept_in),
                used_cut(state, result),
                result.limit_field()
            ),
        )
        .warning(),
        Some(Ok(result)) => Desired::new(
            AGGREGATED,
            true,
            reason::AGGREGATED,
            format!("{}{}", aggregated(result, kept_in), used_cut(state, result)),
        ),
        _ if state.aggregating => Desired::new(
            AGGREGATED,
            false,
            reason::IN_PROGRESS,
            format!(
                "{} over {passed} outputs",
                strategy_name(spec.aggregation.strategy)
            ),
        ),
        _ => pending(AGGREGATED, "waiting for verification"),
    });

    match outcome {
        Some(Ok(result)) if result.truncated() => out.push(
            Desired::new(
                COMPLETE,
                true,
                reason::ANSWER_TRUNCATED,
                format!(
                    "the result is in the {} named by status.result, and its answer is cut off: raise {}",
                    kept_in.as_str(),
                    result.limit_field()
                ),
            )
            .warning(),
        ),
        Some(Ok(_)) => out.push(Desired::new(
            COMPLETE,
            true,
            reason::SUCCEEDED,
            format!(
                "the result is in the {} named by status.result",
                kept_in.as_str()
            ),
        )),
        Some(Err(failure)) => {
            // Phases the job never finished say so rather than look as if they go on.
            for phase in out.iter_mut().filter(|d| !d.status) {
                phase.reason = reason::STOPPED;
                phase.notice = Notice::Normal;
                phase.message =
                    "the job failed before this phase finished: see the Failed condition"
                        .to_owned();
            }
            let failed = Desired::new(
                FAILED,
                true,
                failure.reason.as_str(),
                failure.message.clone(),
            )
            .warning();
            // The gate's critiques quote what the job wrote, and a failed call's error may
            // quote what its endpoint sent: on the job, not in Events.
            out.push(if matches!(
                failure.reason,
                Reason::VerificationFailed | Reason::SubagentsFailed
            ) {
                failed.withheld()
            } else {
                failed
            });
        }
        None => {}
    }
    out
}

/// A phase the job has not reached: no news, so no Event.
fn pending(type_: &'static str, message: &str) -> Desired {
    Desired::new(type_, false, reason::PENDING, message).silent()
}

/// How the answer came about: the strategy and what it used, or the tally of a vote.
/// How many of the outputs an answer was made from were accepted although cut off
/// (`verification.truncated: accept`), as a clause for the Aggregated message.
fn used_cut(state: &State, result: &JobResult) -> String {
    let cut = result
        .chosen
        .iter()
        .filter(|i| {
            state
                .subagents
                .get(i)
                .is_some_and(|s| s.finish_reason == Some(FinishReason::Length))
        })
        .count();
    match cut {
        0 => String::new(),
        cut => format!(
            "; {cut} of the {} outputs it used were cut off at spec.fanOut.maxTokens",
            result.chosen.len()
        ),
    }
}

/// The winning answer is named only where results may be read by anyone who can read
/// the job: conditions go into Events too.
fn aggregated(result: &JobResult, kept_in: Kind) -> String {
    let strategy = strategy_name(result.strategy);
    match &result.tally {
        Some(tally) => format!(
            "{strategy}: {} won with {} of {} votes ({}{})",
            if kept_in.discloses_answer() {
                format!("{:?}", tally.answer)
            } else {
                "the answer".to_owned()
            },
            tally.votes,
            tally.of,
            match tally.decided_by {
                Decision::Majority => "majority",
                Decision::GateScore => "gate score",
                Decision::Confidence => "a tie, to the model's confidence",
                Decision::FirstGiven => "a tie, to the first given",
            },
            match tally.unanswered {
                0 => String::new(),
                n => format!("; {n} outputs gave no answer"),
            }
        ),
        None => match (result.strategy, result.chosen.as_slice()) {
            (AggregationStrategy::BestOf, [best]) => {
                format!("{strategy}: subagent {best}'s output scored highest")
            }
            _ => format!("{strategy} over {} outputs", result.chosen.len()),
        },
    }
}

fn strategy_name(strategy: AggregationStrategy) -> &'static str {
    match strategy {
        AggregationStrategy::Synthesize => "synthesize",
        AggregationStrategy::Vote => "vote",
        AggregationStrategy::WeightedVote => "weightedVote",
        AggregationStrategy::BestOf => "bestOf",
        AggregationStrategy::Collect => "collect",
    }
}

#[cfg(test)]
mod tests;
