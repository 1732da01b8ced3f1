//! The folder a local run leaves behind: `kubeswarm-out/<job>/` with the answer, every
//! subagent's output and verdict, the usage, and for a gallery an `index.html`.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use serde_json::json;

use crate::api::{AggregationStrategy, Decision, OutputCheckType, SwarmJob, Tally};
use crate::swarm::Outcome;
use crate::swarm::record::{self, JobResult, SubagentRecord};
use crate::swarm::{checks, render};

pub fn write(dir: &Path, job: &SwarmJob, outcome: &Outcome, took: Duration) -> std::io::Result<()> {
    let svg = job
        .spec
        .verification
        .checks
        .iter()
        .any(|c| c.type_ == OutputCheckType::Svg);
    let subagents = dir.join("subagents");
    std::fs::create_dir_all(&subagents)?;
    for record in outcome.checkpoint.subagents.values() {
        let (ext, body) = if svg && record.passed() {
            ("svg", checks::svg_document(&record.output))
        } else {
            ("md", record.output.as_str())
        };
        std::fs::write(subagents.join(format!("{:03}.{ext}", record.index)), body)?;
        // The thumbnail is the picture as the svg check rendered it.
        if ext == "svg"
            && let Some(png) = render::render(body, THUMBNAIL_WIDTH)
                .ok()
                .and_then(|p| p.encode_png().ok())
        {
            std::fs::write(subagents.join(format!("{:03}.png", record.index)), png)?;
        }
        std::fs::write(
            subagents.join(format!("{:03}.json", record.index)),
            record::encode(record),
        )?;
    }
    let usage = &outcome.checkpoint.usage;
    let total: u64 = usage.values().map(|u| u.tokens()).sum();
    let summary = json!({
        "job": job.metadata.name,
        "seconds": took.as_secs_f64(),
        "totalTokens": total,
        "pools": usage,
        "truncatedOutputs": truncated_outputs(outcome),
        "result": match &outcome.result {
            Ok((result, _)) => json!({"status": "Complete", "answerTruncated": result.truncated()}),
            Err(f) => json!({"status": "Failed", "reason": f.reason.as_str(), "message": f.message}),
        },
    });
    std::fs::write(dir.join("usage.json"), record::encode(&summary))?;
    if let Ok((result, answer)) = &outcome.result {
        let mut text = answer.clone();
        if result.truncated() {
            text.push_str(&truncated_answer(result));
        }
        if let Some(tally) = &result.tally {
            text.push_str(&tally_line(tally));
        }
        std::fs::write(dir.join("answer.md"), text)?;
        if svg && result.strategy == AggregationStrategy::Collect {
            let passed: Vec<&SubagentRecord> = result
                .chosen
                .iter()
                .filter_map(|i| outcome.checkpoint.subagents.get(i))
                .collect();
            std::fs::write(dir.join("index.html"), gallery(job, &passed))?;
        }
    }
    Ok(())
}

/// The line under an answer the model was cut off writing.
pub fn truncated_answer(result: &JobResult) -> String {
    format!(
        "\n\n> kubeswarm: this answer was cut off at its token limit and is incomplete: raise {}.\n",
        result.limit_field()
    )
}

/// The line under a vote's answer: what won, by how many, and what decided.
pub fn tally_line(tally: &Tally) -> String {
    let decided = match tally.decided_by {
        Decision::Majority => "the most votes",
        Decision::GateScore => "the most gate score",
        Decision::Confidence => "a tie, to the answer the model was surest of",
        Decision::FirstGiven => "a tie, to the first subagent's answer",
    };
    let unanswered = match tally.unanswered {
        0 => String::new(),
        n => format!("; {n} passing outputs gave no answer and did not vote"),
    };
    format!(
        "\n\n> kubeswarm: the answer `{}` won {} of {} votes, decided by {decided}{unanswered}.\n",
        tally.answer.replace('`', "'"),
        tally.votes,
        tally.of
    )
}

/// The gallery's thumbnails are drawn at the width they are shown at.
const THUMBNAIL_WIDTH: u32 = 400;

/// How many subagents' last outputs were cut off at `fanOut.maxTokens`.
pub fn truncated_outputs(outcome: &Outcome) -> usize {
    outcome
        .checkpoint
        .subagents
        .values()
        .filter(|r| r.stage == record::Stage::Finished && r.truncated())
        .count()
}

/// A page showing every picture that passed, with its subtask and the gate's score.
fn gallery(job: &SwarmJob, pictures: &[&SubagentRecord]) -> String {
    let title = escape(job.metadata.name.as_deref().unwrap_or("gallery"));
    let mut page = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title>\n<style>\
         body{{font-family:sans-serif;margin:2em}} .grid{{display:flex;flex-wrap:wrap;gap:1.5em}} \
         figure{{margin:0;width:400px}} img{{width:400px;height:auto;border:1px solid #ccc}}\
         </style></head><body>\n<h1>{title}</h1>\n<p>{} pictures passed verification.</p>\n<div class=\"grid\">\n",
        pictures.len()
    );
    for record in pictures {
        let caption = record.subtask.as_deref().unwrap_or("");
        let score = record
            .verdict
            .as_ref()
            .and_then(|v| v.score)
            .map(|s| format!(" (score {s})"))
            .unwrap_or_default();
        let _ = writeln!(
            page,
            "<figure><a href=\"subagents/{i:03}.svg\"><img src=\"subagents/{i:03}.png\" alt=\"{}\"></a><figcaption>{}{score}</figcaption></figure>",
            escape(caption),
            escape(caption),
            i = record.index,
        );
    }
    page.push_str("</div></body></html>\n");
    page
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tally_line_says_what_won_by_how_much_and_why() {
        let tally = Tally {
            answer: "a `b`".to_owned(),
            votes: 3,
            of: 5,
            unanswered: 2,
            decided_by: Decision::Majority,
        };
        assert_eq!(
            tally_line(&tally),
            "\n\n> kubeswarm: the answer `a 'b'` won 3 of 5 votes, decided by the most votes; 2 passing outputs gave no answer and did not vote.\n"
        );
    }
}
