//! The aggregate step: the answer from the outputs that passed, by the job's strategy.
//! `vote`, `weightedVote` and `bestOf` need no model; `synthesize` asks one; `collect` keeps them all.

use tracing::Instrument;

use super::answer::Extractor;
use super::call::Prompt;
use super::failure::{Fail, Failure, Reason};
use super::record::{self, JobResult, Store, SubagentRecord};
use super::run::Run;
use super::vote::vote;
use super::{Observer, prompts};
use crate::api::{AggregationStrategy, FinishReason, MAX_CALL_TOKENS, SwarmJobSpec};

impl<S: Store, O: Observer> Run<'_, '_, S, O> {
    /// The answer from the outputs that passed, by the job's strategy; recorded.
    pub(super) async fn aggregate(&self, extract: &Extractor) -> Result<(JobResult, String), Fail> {
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
                // Nothing to verify is not a failed verification: say the calls failed.
                let produced_nothing = records
                    .values()
                    .all(|r| r.output.is_empty() && r.error.is_some());
                let (reason, what) = if produced_nothing {
                    (
                        Reason::SubagentsFailed,
                        format!("none of the {} subagents produced an output", records.len()),
                    )
                } else {
                    (
                        Reason::VerificationFailed,
                        format!("none of the {} outputs passed verification", records.len()),
                    )
                };
                return Err(Failure::new(reason, format!("{what}; {}", reasons.join("; "))).into());
            }
            let candidates: Vec<Candidate> = passing
                .iter()
                .map(|r| Candidate {
                    index: r.index,
                    output: &r.output,
                    score: r.verdict.as_ref().and_then(|v| v.score),
                    confidence: r.confidence,
                })
                .collect();
            let strategy = spec.aggregation.strategy;
            let mut result = JobResult {
                strategy,
                chosen: Vec::new(),
                tally: None,
                finish_reason: None,
            };
            let answer = match strategy {
                AggregationStrategy::Vote | AggregationStrategy::WeightedVote => {
                    let weighted = strategy == AggregationStrategy::WeightedVote;
                    let won = vote(&candidates, extract, weighted).ok_or_else(|| {
                        Failure::new(
                            Reason::AggregationFailed,
                            match spec.aggregation.answer {
                                Some(_) => format!(
                                    "none of the {} passing outputs has an answer spec.aggregation.answer finds: make the task ask for the answer in that form, or change spec.aggregation.answer",
                                    candidates.len()
                                ),
                                None => format!(
                                    "the {} passing outputs are empty, so nothing could be voted on",
                                    candidates.len()
                                ),
                            },
                        )
                    })?;
                    result.chosen = vec![won.index];
                    result.tally = Some(won.tally);
                    result.finish_reason = answer_finish(&[&records[&won.index]]);
                    records[&won.index].output.clone()
                }
                AggregationStrategy::BestOf => {
                    let best = best_of(&candidates).expect("candidates are not empty");
                    result.chosen = vec![best];
                    result.finish_reason = answer_finish(&[&records[&best]]);
                    records[&best].output.clone()
                }
                AggregationStrategy::Collect => {
                    result.chosen = passing.iter().map(|r| r.index).collect();
                    result.finish_reason = answer_finish(&passing);
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
                        max_tokens: synthesis_tokens(spec, &passing),
                        temperature: 0.2,
                        schema: None,
                        grammar: None,
                        affinity: None,
                        logprobs: false,
                    };
                    self.wait_unsuspended().await;
                    let reply = self.caller().call(pool, &prompt).await.map_err(|err| {
                        if err.stops_job() {
                            Failure::from(err)
                        } else {
                            Failure::new(Reason::AggregationFailed, format!("the synthesis call failed: {err}"))
                        }
                    })?;
                    result.finish_reason = reply.finish_reason;
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
}

/// The synthesis's token limit: `aggregation.maxTokens`, else as many tokens as the
/// outputs it merges took together, at least one subagent's limit and at most
/// `DEFAULT_SYNTHESIS_TOKENS`. One subagent's limit alone cuts a merge of several off
/// mid-sentence.
fn synthesis_tokens(spec: &SwarmJobSpec, merged: &[&SubagentRecord]) -> u32 {
    let limit = match spec.aggregation.max_tokens {
        Some(limit) => i64::from(limit),
        None => {
            let written: u64 = merged.iter().map(|r| r.completion_tokens).sum();
            i64::try_from(written)
                .unwrap_or(i64::MAX)
                .min(DEFAULT_SYNTHESIS_TOKENS)
                .max(i64::from(spec.fan_out.max_tokens))
        }
    };
    limit.clamp(1, i64::from(MAX_CALL_TOKENS)) as u32
}

/// The most a default synthesis limit grows to: the inference-worker's own default cap
/// on one call (`--max-tokens-cap`), which refuses a request past it.
const DEFAULT_SYNTHESIS_TOKENS: i64 = 4096;

/// Why the model that wrote an answer made of `chosen` outputs stopped: the answer is as
/// cut off as any output in it (outputs a job accepts cut off).
fn answer_finish(chosen: &[&SubagentRecord]) -> Option<FinishReason> {
    if chosen.iter().any(|r| r.truncated()) {
        Some(FinishReason::Length)
    } else {
        chosen.first().and_then(|r| r.finish_reason)
    }
}

/// An output that passed verification.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub index: usize,
    pub output: &'a str,
    pub score: Option<u8>,
    /// How sure the model was of the output, from 0 to 1, when its server said.
    pub confidence: Option<f64>,
}

impl Candidate<'_> {
    /// The confidence in millionths, so selection keys stay integers; 0 when unknown
    /// (other servers, records written before it was kept).
    pub fn confidence_ppm(&self) -> u64 {
        self.confidence
            .map_or(0, |c| (c.clamp(0.0, 1.0) * 1e6).round() as u64)
    }
}

/// The output with the highest gate score; on equal scores the one the model was surest
/// of (a gate often gives several outputs the same round score), then the first given.
pub fn best_of(candidates: &[Candidate]) -> Option<usize> {
    candidates
        .iter()
        .max_by(|a, b| {
            a.score
                .cmp(&b.score)
                .then(a.confidence_ppm().cmp(&b.confidence_ppm()))
                .then(b.index.cmp(&a.index))
        })
        .map(|c| c.index)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A candidate, for the selection tests here and in `vote`.
    pub(in crate::swarm) fn c(index: usize, output: &str, score: Option<u8>) -> Candidate<'_> {
        Candidate {
            index,
            output,
            score,
            confidence: None,
        }
    }

    #[test]
    fn best_of_takes_the_highest_score_and_the_first_on_a_tie() {
        let outputs = [
            c(0, "x", Some(70)),
            c(1, "y", Some(95)),
            c(2, "z", Some(95)),
        ];
        assert_eq!(best_of(&outputs), Some(1));
        assert_eq!(best_of(&[]), None);
    }

    #[test]
    fn best_of_gives_a_tied_score_to_the_surest_and_never_a_lower_one() {
        let sure = |index, score, confidence| Candidate {
            confidence: Some(confidence),
            ..c(index, "x", Some(score))
        };
        // Equal scores: the surer output, though given later.
        let tied = [sure(0, 90, 0.80), sure(1, 90, 0.95), sure(2, 70, 0.99)];
        assert_eq!(best_of(&tied), Some(1));
        // A higher score wins however unsure the model was of it.
        let scored = [sure(0, 90, 0.10), sure(1, 80, 0.99)];
        assert_eq!(best_of(&scored), Some(0));
        // Confidence unknown counts as none: a known one wins the tie.
        let unknown = [c(0, "x", Some(90)), sure(1, 90, 0.5)];
        assert_eq!(best_of(&unknown), Some(1));
        // Out-of-range figures are held to [0, 1], so 1e39 ties with 1.0 and the first stays.
        let hostile = [sure(0, 90, 1.0), sure(1, 90, 1e39), sure(2, 90, f64::NAN)];
        assert_eq!(best_of(&hostile), Some(0));
    }
}
