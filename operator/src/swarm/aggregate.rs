//! The aggregate step: the answer from the outputs that passed, by the job's strategy.
//! `vote` and `bestOf` need no model; `synthesize` asks one; `collect` keeps them all.

use tracing::Instrument;

use super::call::Prompt;
use super::failure::{Fail, Failure, Reason};
use super::record::{self, JobResult, Store, SubagentRecord};
use super::run::Run;
use super::{Observer, prompts};
use crate::api::{AggregationStrategy, FinishReason, MAX_CALL_TOKENS, SwarmJobSpec};

impl<S: Store, O: Observer> Run<'_, '_, S, O> {
    /// The answer from the outputs that passed, by the job's strategy; recorded.
    pub(super) async fn aggregate(&self) -> Result<(JobResult, String), Fail> {
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
            let candidates: Vec<Candidate> = passing
                .iter()
                .map(|r| Candidate {
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
                finish_reason: None,
            };
            let answer = match strategy {
                AggregationStrategy::Vote => {
                    let tally = vote(&candidates).expect("candidates are not empty");
                    result.chosen = vec![tally.index];
                    result.votes = Some(tally.into());
                    result.finish_reason = answer_finish(&[&records[&tally.index]]);
                    records[&tally.index].output.clone()
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
}

/// The result of a vote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// The subagent whose wording of the winning answer is reported.
    pub index: usize,
    pub votes: usize,
    pub of: usize,
}

/// Majority over normalised answers. Ties go to the answer with the higher total score,
/// then to the one first given, so the result does not depend on timing.
pub fn vote(candidates: &[Candidate]) -> Option<Tally> {
    // (normalised answer, first index, votes, total score), in first-seen order.
    let mut groups: Vec<(String, usize, usize, u32)> = Vec::new();
    let mut sorted = candidates.to_vec();
    sorted.sort_by_key(|c| c.index);
    for candidate in &sorted {
        let key = normalise(candidate.output);
        let score = u32::from(candidate.score.unwrap_or(0));
        match groups.iter_mut().find(|g| g.0 == key) {
            Some(group) => {
                group.2 += 1;
                group.3 += score;
            }
            None => groups.push((key, candidate.index, 1, score)),
        }
    }
    let best = groups
        .iter()
        .max_by(|a, b| a.2.cmp(&b.2).then(a.3.cmp(&b.3)).then(b.1.cmp(&a.1)))?;
    Some(Tally {
        index: best.1,
        votes: best.2,
        of: candidates.len(),
    })
}

/// The output with the highest gate score; the first given wins a tie.
pub fn best_of(candidates: &[Candidate]) -> Option<usize> {
    candidates
        .iter()
        .max_by(|a, b| a.score.cmp(&b.score).then(b.index.cmp(&a.index)))
        .map(|c| c.index)
}

/// A short answer reduced to what a vote compares: case, surrounding whitespace and
/// punctuation, inner runs of whitespace, and a leading "the answer is" do not count.
pub fn normalise(answer: &str) -> String {
    let lower = answer.trim().to_lowercase();
    let words: Vec<&str> = lower.split_whitespace().collect();
    let joined = words.join(" ");
    let stripped = ["final answer:", "answer:", "the answer is"]
        .iter()
        .find_map(|prefix| joined.strip_prefix(prefix))
        .unwrap_or(&joined);
    stripped
        .trim_matches(|c: char| c.is_whitespace() || c.is_ascii_punctuation())
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(index: usize, output: &str, score: Option<u8>) -> Candidate<'_> {
        Candidate {
            index,
            output,
            score,
        }
    }

    #[test]
    fn normalising_ignores_case_spacing_punctuation_and_preamble() {
        assert_eq!(normalise("  Paris. "), "paris");
        assert_eq!(normalise("The answer is   PARIS!"), "paris");
        assert_eq!(normalise("Answer: \"Paris\""), "paris");
        assert_eq!(normalise("New  York"), "new york");
    }

    #[test]
    fn the_majority_wins() {
        let votes = [
            c(0, "Lyon", None),
            c(1, "paris", None),
            c(2, "Paris.", None),
            c(3, "Nice", None),
        ];
        assert_eq!(
            vote(&votes),
            Some(Tally {
                index: 1,
                votes: 2,
                of: 4
            })
        );
    }

    #[test]
    fn ties_go_to_the_higher_score_then_the_first_answer() {
        let by_score = [c(0, "a", Some(50)), c(1, "b", Some(90))];
        assert_eq!(vote(&by_score).unwrap().index, 1);
        let by_order = [c(3, "b", None), c(2, "a", None)];
        assert_eq!(vote(&by_order).unwrap().index, 2);
        assert_eq!(vote(&[]), None);
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
}
