//! What a job has done so far, in the form its status reports it. A running job's engine
//! updates it through `Observer` events and wakes the controller, which writes it to the
//! status; a job that is not running starts from its stored status, so a restarted
//! operator reports what was recorded until the engine has read its records back.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::api::{
    FinishReason, PoolUsage, SubagentState, SubagentStatus, SubagentVerdict, SwarmJobStatus,
    VerdictOutcome,
};
use crate::metrics::Metrics;
use crate::swarm::call::Usage;
use crate::swarm::record::SubagentRecord;
use crate::swarm::{Event, Observer};

/// Messages in the status are bounded by the CRD at 256 characters.
const MAX_MESSAGE: usize = 256;

/// The progress of one job.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct State {
    /// Subagents, once the subtasks are known.
    pub planned: Option<usize>,
    pub subagents: BTreeMap<usize, SubagentStatus>,
    /// Usage per pool, by the names the job uses, as recorded.
    pub usage: BTreeMap<String, Usage>,
    pub aggregating: bool,
}

impl State {
    /// The progress a stored status reports.
    pub fn from_status(status: &SwarmJobStatus, planned: Option<usize>) -> Self {
        Self {
            planned,
            subagents: status
                .subagents
                .iter()
                .map(|s| (s.index.max(0) as usize, s.clone()))
                .collect(),
            usage: status
                .usage
                .iter()
                .map(|u| {
                    let usage = Usage {
                        calls: u.calls.max(0) as u64,
                        prompt_tokens: u.prompt_tokens.max(0) as u64,
                        completion_tokens: u.completion_tokens.max(0) as u64,
                    };
                    (u.pool.clone(), usage)
                })
                .collect(),
            aggregating: false,
        }
    }

    /// Subagents with a recorded output or a recorded failure.
    pub fn with_output(&self) -> usize {
        self.subagents
            .values()
            .filter(|s| matches!(s.state, SubagentState::Succeeded | SubagentState::Failed))
            .count()
    }

    /// Subagents that are done: verified, or failed for good.
    pub fn finished(&self) -> usize {
        self.subagents.values().filter(|s| done(s)).count()
    }

    /// Finished subagents whose last output was cut off at its token limit.
    pub fn truncated(&self) -> usize {
        self.subagents
            .values()
            .filter(|s| done(s) && s.finish_reason == Some(FinishReason::Length))
            .count()
    }

    pub fn failed(&self) -> usize {
        self.subagents
            .values()
            .filter(|s| s.state == SubagentState::Failed)
            .count()
    }

    pub fn passed(&self) -> usize {
        self.subagents
            .values()
            .filter(|s| {
                s.verdict
                    .as_ref()
                    .is_some_and(|v| v.outcome == VerdictOutcome::Pass)
                    && s.state == SubagentState::Succeeded
            })
            .count()
    }

    pub fn usage_status(&self) -> Vec<PoolUsage> {
        self.usage
            .iter()
            .map(|(pool, u)| PoolUsage {
                pool: pool.clone(),
                calls: u.calls as i64,
                prompt_tokens: u.prompt_tokens as i64,
                completion_tokens: u.completion_tokens as i64,
            })
            .collect()
    }

    fn apply(&mut self, event: &Event<'_>) {
        match *event {
            Event::Planned { subagents } => {
                self.planned = Some(subagents);
                for index in 0..subagents {
                    self.subagents.entry(index).or_insert(SubagentStatus {
                        index: index as i32,
                        state: SubagentState::Pending,
                        attempts: 0,
                        tokens: 0,
                        finish_reason: None,
                        verdict: None,
                        message: None,
                    });
                }
            }
            Event::Running { index } => {
                if let Some(s) = self.subagents.get_mut(&index) {
                    s.state = SubagentState::Running;
                }
            }
            Event::Generated { index } => {
                if let Some(s) = self.subagents.get_mut(&index) {
                    s.state = SubagentState::Succeeded;
                }
            }
            Event::Finished { record } => {
                self.subagents.insert(record.index, finished(record));
            }
            Event::Aggregating => self.aggregating = true,
            Event::Recorded { usage } => self.usage = usage.clone(),
            Event::Call { .. } => {}
        }
    }
}

fn done(s: &SubagentStatus) -> bool {
    s.state == SubagentState::Failed || s.verdict.is_some()
}

fn finished(record: &SubagentRecord) -> SubagentStatus {
    SubagentStatus {
        index: record.index as i32,
        state: if record.error.is_some() {
            SubagentState::Failed
        } else {
            SubagentState::Succeeded
        },
        attempts: record.attempts as i32,
        tokens: record.tokens() as i64,
        finish_reason: record.finish_reason,
        verdict: record.verdict.as_ref().map(|v| SubagentVerdict {
            outcome: if v.pass {
                VerdictOutcome::Pass
            } else {
                VerdictOutcome::Fail
            },
            score: v.score.map(i32::from),
            issues: v.issues.len() as i32,
        }),
        message: record.error.as_deref().map(|e| bounded(e, MAX_MESSAGE)),
    }
}

/// At most `max` bytes of `text`, cut at a character boundary.
pub fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// The observer a running job's engine reports to.
pub struct Progress {
    namespace: String,
    /// ModelPool names by the names the job uses, to label the call metrics.
    objects: BTreeMap<String, String>,
    metrics: Arc<Metrics>,
    /// Asks for a reconcile of the job.
    wake: Box<dyn Fn() + Send + Sync>,
    state: Mutex<State>,
}

impl Progress {
    pub fn new(
        namespace: String,
        objects: BTreeMap<String, String>,
        metrics: Arc<Metrics>,
        start: State,
        wake: Box<dyn Fn() + Send + Sync>,
    ) -> Self {
        Self {
            namespace,
            objects,
            metrics,
            wake,
            state: Mutex::new(start),
        }
    }

    pub fn state(&self) -> State {
        self.state.lock().expect("progress lock").clone()
    }

    pub fn wake(&self) {
        (self.wake)();
    }
}

impl Observer for Progress {
    fn event(&self, event: Event<'_>) {
        if let Event::Call {
            pool,
            outcome,
            prompt_tokens,
            completion_tokens,
        } = event
        {
            let object = self.objects.get(pool).map_or(pool, String::as_str);
            self.metrics.model_call(
                &self.namespace,
                object,
                outcome.as_str(),
                prompt_tokens,
                completion_tokens,
            );
            return;
        }
        self.state.lock().expect("progress lock").apply(&event);
        self.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::swarm::record::{Stage, VerdictRecord};

    fn record(index: usize, pass: Option<bool>, error: Option<&str>) -> SubagentRecord {
        SubagentRecord {
            index,
            stage: Stage::Finished,
            subtask: None,
            output: "out".to_owned(),
            prompt_tokens: 10,
            completion_tokens: 5,
            attempts: 2,
            finish_reason: None,
            confidence: None,
            verdict: pass.map(|pass| VerdictRecord {
                pass,
                score: Some(if pass { 90 } else { 20 }),
                issues: vec!["too short".to_owned(); usize::from(!pass)],
            }),
            repaired: false,
            error: error.map(str::to_owned),
        }
    }

    #[test]
    fn events_move_subagents_from_pending_to_their_verdicts() {
        let mut state = State::default();
        state.apply(&Event::Planned { subagents: 3 });
        state.apply(&Event::Running { index: 0 });
        state.apply(&Event::Running { index: 1 });
        state.apply(&Event::Generated { index: 1 });
        let states: Vec<SubagentState> = state.subagents.values().map(|s| s.state).collect();
        assert_eq!(
            states,
            [
                SubagentState::Running,
                SubagentState::Succeeded,
                SubagentState::Pending
            ]
        );
        assert_eq!((state.with_output(), state.finished()), (1, 0));

        let long = "x".repeat(400);
        state.apply(&Event::Finished {
            record: &record(0, Some(true), None),
        });
        state.apply(&Event::Finished {
            record: &record(1, Some(false), None),
        });
        state.apply(&Event::Finished {
            record: &record(2, None, Some(&long)),
        });
        assert_eq!(
            (
                state.with_output(),
                state.finished(),
                state.passed(),
                state.failed()
            ),
            (3, 3, 1, 1)
        );
        let first = &state.subagents[&0];
        assert_eq!((first.attempts, first.tokens), (2, 15));
        assert_eq!(
            first.verdict,
            Some(SubagentVerdict {
                outcome: VerdictOutcome::Pass,
                score: Some(90),
                issues: 0
            })
        );
        assert_eq!(state.subagents[&1].verdict.as_ref().unwrap().issues, 1);
        assert_eq!(state.subagents[&2].state, SubagentState::Failed);
        assert_eq!(state.subagents[&2].message.as_ref().unwrap().len(), 256);
    }

    #[test]
    fn a_stored_status_is_read_back_as_the_same_progress() {
        let mut state = State::default();
        state.apply(&Event::Planned { subagents: 2 });
        state.apply(&Event::Finished {
            record: &record(0, Some(true), None),
        });
        let usage = BTreeMap::from([(
            "worker".to_owned(),
            Usage {
                calls: 1,
                prompt_tokens: 10,
                completion_tokens: 5,
            },
        )]);
        state.apply(&Event::Recorded { usage: &usage });
        let status = SwarmJobStatus {
            subagents: state.subagents.values().cloned().collect(),
            usage: state.usage_status(),
            ..SwarmJobStatus::default()
        };
        assert_eq!(State::from_status(&status, Some(2)), state);
    }

    #[test]
    fn bounded_cuts_at_a_character_boundary() {
        assert_eq!(bounded("héllo", 2), "h");
        assert_eq!(bounded("héllo", 3), "hé");
        assert_eq!(bounded("short", 256), "short");
    }
}
