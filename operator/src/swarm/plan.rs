//! The plan step: the subtasks, given in the spec, split by the planner model, or none.

use tracing::Instrument;

use super::Observer;
use super::call::Prompt;
use super::failure::{Fail, Failure, Reason};
use super::prompts;
use super::record::{self, Store};
use super::run::{Run, STRUCTURED_ATTEMPTS};

/// The planner's answer is short; this cap keeps a rambling model from spending the
/// job's budget on it.
const PLAN_TOKENS: u32 = 2048;

impl<S: Store, O: Observer> Run<'_, '_, S, O> {
    /// The subtasks: given, planned by the planner, or none (every subagent gets the task).
    pub(super) async fn plan(&self) -> Result<Option<Vec<String>>, Fail> {
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
            logprobs: false,
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
                Err(problem) => last = reply.unusable(problem, PLAN_TOKENS),
            }
        }
        Err(Failure::new(
            Reason::PlanFailed,
            format!("no usable plan after {STRUCTURED_ATTEMPTS} attempts: {last}"),
        )
        .into())
    }
}
