//! How a job fails (`Failure`, its `Reason`s), how a run stops without failing the job
//! (`Interrupted`: the store failed), and `Fail`, which the steps return for either.

use super::call::CallError;
use super::record::StoreError;

/// Why a job failed. The names are the reasons of its `Failed` condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    PoolNotFound,
    InvalidSpec,
    PlanFailed,
    BudgetExceeded,
    DeadlineExceeded,
    /// No subagent produced an output: every call failed.
    SubagentsFailed,
    VerificationFailed,
    AggregationFailed,
    ResultTooLarge,
    ForeignRecords,
    TestsUnavailable,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PoolNotFound => "PoolNotFound",
            Self::InvalidSpec => "InvalidSpec",
            Self::PlanFailed => "PlanFailed",
            Self::BudgetExceeded => "BudgetExceeded",
            Self::DeadlineExceeded => "DeadlineExceeded",
            Self::SubagentsFailed => "SubagentsFailed",
            Self::VerificationFailed => "VerificationFailed",
            Self::AggregationFailed => "AggregationFailed",
            Self::ResultTooLarge => "ResultTooLarge",
            Self::ForeignRecords => "ForeignRecords",
            Self::TestsUnavailable => "TestsUnavailable",
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
    pub(super) fn new(reason: Reason, message: impl Into<String>) -> Self {
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
#[error("the job's records could not be written or read")]
pub struct Interrupted(#[from] pub StoreError);

/// Why a step stopped: the job failed, or the store did.
pub(super) enum Fail {
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
