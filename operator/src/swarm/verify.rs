//! The verify step: deterministic checks first, then the job's tests in the sandbox, then
//! the gate model's verdict.

use tracing::Instrument;

use super::answer::Extractor;
use super::call::Prompt;
use super::checks;
use super::failure::{Fail, Failure, Reason};
use super::record::{Store, SubagentRecord, VerdictRecord};
use super::run::{Rules, Run, STRUCTURED_ATTEMPTS};
use super::sandbox::SandboxError;
use super::{Observer, balance, prompts};
use crate::api::{TruncatedOutputs, VerificationMode};

/// The gate's answer is short; this cap keeps a rambling model from spending the job's
/// budget on it.
const VERDICT_TOKENS: u32 = 512;

impl<S: Store, O: Observer> Run<'_, '_, S, O> {
    /// Checks, then the gate. A verdict the gate could not give is an error on the
    /// subagent, not a failed output.
    pub(super) async fn verify(
        &self,
        record: &SubagentRecord,
        subtask: Option<&str>,
        rules: &Rules,
    ) -> Result<Judgement, Fail> {
        let span = tracing::info_span!("verify");
        async move {
            let spec = self.spec();
            let output = record.output.as_str();
            if record.truncated() && spec.verification.truncated == TruncatedOutputs::Fail {
                // The issue doubles as the repair round's instruction.
                return Ok(Judgement::verdict(VerdictRecord {
                    pass: false,
                    score: None,
                    issues: vec![format!(
                        "the output was cut off at maxTokens ({} tokens): write a shorter answer that fits",
                        spec.fan_out.max_tokens
                    )],
                }));
            }
            let problems = checks::run(&rules.checks, output);
            if !problems.is_empty() {
                return Ok(Judgement::verdict(VerdictRecord {
                    pass: false,
                    score: None,
                    issues: problems,
                }));
            }
            // Code that passes the format checks is worth running; the gate then judges
            // only code that works.
            for program in checks::programs(&rules.checks, output) {
                let timeout = program.timeout;
                match self.job.sandbox.run(program).await {
                    Ok(ran) => {
                        if let Some(issue) = ran.issue(timeout) {
                            return Ok(Judgement::verdict(VerdictRecord {
                                pass: false,
                                score: None,
                                issues: vec![issue],
                            }));
                        }
                    }
                    Err(err @ SandboxError::Unavailable { .. }) => {
                        return Err(Failure::new(
                            Reason::TestsUnavailable,
                            crate::telemetry::chain(&err),
                        )
                        .into());
                    }
                    Err(err) => {
                        return Ok(Judgement::error(format!(
                            "the tests could not be run: {}",
                            crate::telemetry::chain(&err)
                        )));
                    }
                }
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
            let answer = match rules.extract {
                // The whole output is the answer: the gate has it in view already.
                Extractor::Whole => None,
                ref extract => Some(extract.found(output)),
            };
            let (messages, schema) = prompts::critique(&spec.task, subtask, output, answer);
            let prompt = Prompt {
                messages,
                max_tokens: VERDICT_TOKENS,
                temperature: 0.0,
                schema: Some(("verdict", schema)),
                grammar: None,
                affinity: Some(balance::prefix_key(&spec.task)),
                logprobs: false,
            };
            let mut last = String::new();
            for _ in 0..STRUCTURED_ATTEMPTS {
                self.wait_unsuspended().await;
                match self.caller().call(pool, &prompt).await {
                    Ok(reply) => match prompts::read_verdict(&reply.content) {
                        Ok(verdict) => {
                            return Ok(Judgement::verdict(judge(
                                verdict,
                                verification.min_score.unwrap_or(DEFAULT_MIN_SCORE),
                            )));
                        }
                        Err(problem) => last = reply.unusable(problem, VERDICT_TOKENS),
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
}

/// The score an output needs when the job sets no `verification.minScore`: a gate that
/// passes an output it scores 0 has not verified it.
pub const DEFAULT_MIN_SCORE: i32 = 50;

/// The record of a gate's verdict: a pass needs the gate's pass and a score of at least
/// `min_score`. Issues that say nothing (blank, or a placeholder like "...") are dropped,
/// and a fail that names no issue says why it failed, so the repair round has something
/// to fix.
pub fn judge(verdict: prompts::Verdict, min_score: i32) -> VerdictRecord {
    let mut issues: Vec<String> = verdict
        .issues
        .into_iter()
        .map(|issue| issue.trim().to_owned())
        .filter(|issue| issue.chars().any(char::is_alphanumeric))
        .collect();
    let high_enough = i32::from(verdict.score) >= min_score;
    let pass = verdict.pass && high_enough;
    if !pass && issues.is_empty() {
        issues.push(if high_enough {
            "the reviewer failed the answer without naming an issue".to_owned()
        } else {
            format!(
                "the reviewer scored the answer {}/100, below the {min_score} it needs to pass",
                verdict.score
            )
        });
    }
    VerdictRecord {
        pass,
        score: Some(verdict.score),
        issues,
    }
}

/// A verification's outcome: a verdict, or why there is none.
pub(super) struct Judgement {
    pub(super) verdict: Option<VerdictRecord>,
    pub(super) error: Option<String>,
    pub(super) pass: bool,
}

impl Judgement {
    pub(super) fn verdict(verdict: VerdictRecord) -> Self {
        Self {
            pass: verdict.pass,
            verdict: Some(verdict),
            error: None,
        }
    }

    pub(super) fn error(message: String) -> Self {
        Self {
            verdict: None,
            error: Some(message),
            pass: false,
        }
    }
}
