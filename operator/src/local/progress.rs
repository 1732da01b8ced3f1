//! Progress of a local run: bars in a terminal, plain lines otherwise (CI logs, pipes).

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::swarm::{Event, Observer};

pub struct View {
    bars: Option<Bars>,
    counts: Mutex<Counts>,
}

struct Bars {
    multi: MultiProgress,
    phase: ProgressBar,
    subagents: ProgressBar,
}

#[derive(Default)]
struct Counts {
    total: usize,
    finished: usize,
    passed: usize,
}

impl View {
    pub fn new() -> Self {
        let bars = std::io::stderr().is_terminal().then(|| {
            let multi = MultiProgress::new();
            let phase = multi.add(ProgressBar::new_spinner());
            phase.set_style(ProgressStyle::with_template("{spinner} {msg}").expect("template"));
            phase.enable_steady_tick(Duration::from_millis(120));
            let subagents = multi.add(ProgressBar::new(0));
            subagents.set_style(
                ProgressStyle::with_template("  subagents [{bar:30}] {pos}/{len} {msg}")
                    .expect("template")
                    .progress_chars("=> "),
            );
            Bars {
                multi,
                phase,
                subagents,
            }
        });
        Self {
            bars,
            counts: Mutex::new(Counts::default()),
        }
    }

    /// A line of its own, above the bars in a terminal.
    pub fn say(&self, line: &str) {
        match &self.bars {
            Some(bars) => bars.multi.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }

    fn phase(&self, text: &str) {
        match &self.bars {
            Some(bars) => bars.phase.set_message(text.to_owned()),
            None => eprintln!("{text}"),
        }
    }

    pub fn finish(&self) {
        if let Some(bars) = &self.bars {
            bars.phase.finish_and_clear();
            bars.subagents.finish();
        }
    }
}

impl Observer for View {
    fn event(&self, event: Event<'_>) {
        let mut counts = self.counts.lock().expect("counts lock");
        match event {
            Event::Planned { subagents } => {
                counts.total = subagents;
                if let Some(bars) = &self.bars {
                    bars.subagents.set_length(subagents as u64);
                }
                self.phase(&format!(
                    "fan out: {subagents} subagents, verifying as they finish"
                ));
            }
            Event::Running { index } => {
                if self.bars.is_none() {
                    eprintln!("subagent {index}: calling the model");
                }
            }
            Event::Generated { index } => {
                if self.bars.is_none() {
                    eprintln!("subagent {index}: output received, verifying");
                }
            }
            Event::Finished { record } => {
                counts.finished += 1;
                if record.passed() {
                    counts.passed += 1;
                }
                let verdict = match (&record.error, &record.verdict) {
                    (Some(error), _) => format!("failed: {error}"),
                    (None, Some(v)) if v.pass => match v.score {
                        Some(score) => format!("passed (score {score})"),
                        None => "passed".to_owned(),
                    },
                    (None, Some(v)) => format!(
                        "rejected: {}",
                        v.issues.first().map_or("no reason given", String::as_str)
                    ),
                    (None, None) => "finished".to_owned(),
                };
                match &self.bars {
                    Some(bars) => {
                        bars.subagents.inc(1);
                        bars.subagents
                            .set_message(format!("{} passed", counts.passed));
                        bars.multi
                            .suspend(|| eprintln!("subagent {}: {verdict}", record.index));
                    }
                    None => eprintln!(
                        "subagent {}: {verdict} [{}/{} finished]",
                        record.index, counts.finished, counts.total
                    ),
                }
            }
            Event::Aggregating => self.phase(&format!(
                "aggregating {} passing outputs of {}",
                counts.passed, counts.total
            )),
            // usage.json reports the tokens at the end.
            Event::Call { .. } | Event::Recorded { .. } => {}
        }
    }
}
