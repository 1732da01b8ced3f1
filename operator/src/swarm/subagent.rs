//! The fan-out step for one subagent: its call, its verification, one repair round if the
//! job allows it, each stage recorded so a resumed run picks it up where it stopped.

use tracing::Instrument;

use super::call::{self, Prompt};
use super::failure::{Fail, Failure};
use super::record::{Stage, Store, SubagentRecord};
use super::run::{Rules, Run};
use super::{Event, Observer, balance, grammar, prompts};
use crate::api::{AggregationStrategy, FirstSubagent};

impl<S: Store, O: Observer> Run<'_, '_, S, O> {
    /// One subagent from where its record left it to finished, recorded.
    pub(super) async fn subagent(
        &self,
        index: usize,
        subtask: Option<&str>,
        rules: &Rules,
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
                temperature: match (index, spec.fan_out.first_subagent) {
                    (0, FirstSubagent::Greedy) => 0.0,
                    _ => spec.fan_out.temperature as f32,
                },
                // A schema that holds the answer takes the place of the checks' grammar:
                // a request constrained twice would satisfy neither.
                schema: rules.extract.schema(),
                grammar: match rules.extract.schema() {
                    Some(_) => None,
                    None => grammar::for_checks(&spec.verification.checks),
                },
                affinity: Some(balance::prefix_key(&spec.task)),
                // A vote's ties, and bestOf's equal scores, go to the output the model
                // was surest of.
                logprobs: matches!(
                    spec.aggregation.strategy,
                    AggregationStrategy::Vote
                        | AggregationStrategy::WeightedVote
                        | AggregationStrategy::BestOf
                ),
            };
            let mut record = match recorded {
                Some(record) => record,
                None => {
                    self.wait_unsuspended().await;
                    self.job.observer.event(Event::Running { index });
                    let mut record = SubagentRecord {
                        index,
                        stage: Stage::Generated,
                        subtask: subtask.map(str::to_owned),
                        output: String::new(),
                        prompt_tokens: 0,
                        completion_tokens: 0,
                        attempts: 0,
                        finish_reason: None,
                        confidence: None,
                        verdict: None,
                        repaired: false,
                        error: None,
                    };
                    match self.caller().call(pool, &prompt).await {
                        Ok(reply) => {
                            record.add(&reply);
                            self.record(&record).await?;
                            self.job.observer.event(Event::Generated { index });
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
            let mut verdict = self.verify(&record, subtask, rules).await?;
            if !verdict.pass && spec.verification.repair_rounds > 0 && !record.repaired {
                self.wait_unsuspended().await;
                self.job.observer.event(Event::Running { index });
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
                        verdict = self.verify(&record, subtask, rules).await?;
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
}

impl SubagentRecord {
    pub(super) fn add(&mut self, reply: &call::Reply) {
        self.output.push_str(&reply.content);
        self.finish_reason = reply.finish_reason;
        self.confidence = reply.confidence;
        self.prompt_tokens += reply.prompt_tokens;
        self.completion_tokens += reply.completion_tokens;
        self.attempts += reply.attempts;
    }

    /// Why the subagent's output did not pass, in a few words.
    pub(super) fn why_not(&self) -> String {
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
