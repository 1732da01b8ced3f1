//! Where a `tests` check runs an output's code: a `Sandbox`, given by whoever runs the
//! engine (a subprocess locally, a Kubernetes Job in a cluster). The engine only builds
//! the program and reads the verdict; code a model wrote never runs in this process.

use std::time::Duration;

use futures::future::BoxFuture;

/// One output's code with the job's tests around it, as one Python 3 file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Program {
    pub source: String,
    pub timeout: Duration,
    /// The line the program prints last, after the tests: exit status 0 without it is
    /// code that ended the program before the tests ran (`sys.exit()` in a main block).
    pub marker: String,
}

/// How a program's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
    TimedOut,
}

impl Program {
    /// Whether a printout holds the marker line, which the program prints last.
    pub fn finished_in(&self, printout: &str) -> bool {
        printout.lines().any(|line| line.trim() == self.marker)
    }

    /// What the program did, from how it ended, whether it printed its marker, and the end
    /// of its printout.
    pub fn judge(&self, exit: Exit, finished: bool, printout: &str) -> Ran {
        let printed = tail(&printout.replace(&self.marker, ""));
        match exit {
            Exit::Code(0) if finished => Ran::Passed,
            Exit::Code(0) => Ran::Failed {
                how: "the program ended before the tests ran; the code must not exit".to_owned(),
                tail: printed,
            },
            Exit::Code(code) => Ran::Failed {
                how: format!("exit status {code}"),
                tail: printed,
            },
            Exit::Signal(signal) => Ran::Failed {
                how: format!("killed by signal {signal}"),
                tail: printed,
            },
            Exit::TimedOut => Ran::TimedOut,
        }
    }
}

/// What a program did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ran {
    /// It exited with status 0 within its time.
    Passed,
    /// It exited otherwise: `how` says how (status, signal), `tail` is the end of what it
    /// printed, the traceback of a failed assertion for example.
    Failed { how: String, tail: String },
    /// It was still running when its time was up, and was killed.
    TimedOut,
}

/// A sandbox that could not run a program.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// It cannot run any program (no sandbox to be had, no interpreter, no image): the
    /// job fails rather than fail every output for a reason none of them caused.
    #[error("{what}")]
    Unavailable {
        what: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// This run went wrong (a pod evicted, an API call refused); the output is left
    /// without a verdict, as a gate call that failed would leave it.
    #[error("{what}")]
    Broken {
        what: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

/// Runs programs away from the engine, with no network and a time limit.
pub trait Sandbox: Send + Sync {
    fn run(&self, program: Program) -> BoxFuture<'_, Result<Ran, SandboxError>>;
}

/// The most of a program's printout an issue quotes: the end, where a traceback ends.
pub const TAIL_BYTES: usize = 1000;

/// The last `TAIL_BYTES` of `text` at a character boundary, trimmed.
pub fn tail(text: &str) -> String {
    let mut start = text.len().saturating_sub(TAIL_BYTES);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].trim().to_owned()
}

impl Ran {
    /// The output's issue, if it failed: it doubles as the repair round's instruction.
    pub fn issue(&self, timeout: Duration) -> Option<String> {
        match self {
            Ran::Passed => None,
            Ran::Failed { how, tail } if tail.is_empty() => {
                Some(format!("the tests failed ({how}) and printed nothing"))
            }
            Ran::Failed { how, tail } => Some(format!("the tests failed ({how}):\n{tail}")),
            Ran::TimedOut => Some(format!(
                "the tests did not finish within {} s: the code is too slow or never ends",
                timeout.as_secs()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tail_keeps_the_end_at_a_character_boundary() {
        let text = format!("{}é{}", "a".repeat(10), "b".repeat(TAIL_BYTES - 1));
        assert_eq!(tail(&text), "b".repeat(TAIL_BYTES - 1));
        assert_eq!(tail("  short\n"), "short");
    }

    #[test]
    fn a_pass_needs_status_0_and_the_marker_printed_after_the_tests() {
        let program = Program {
            source: String::new(),
            timeout: Duration::from_secs(1),
            marker: "done-7".into(),
        };
        assert_eq!(
            program.judge(Exit::Code(0), true, "ok\ndone-7\n"),
            Ran::Passed
        );
        assert_eq!(
            program.judge(Exit::Code(0), false, "bye\n"),
            Ran::Failed {
                how: "the program ended before the tests ran; the code must not exit".into(),
                tail: "bye".into()
            }
        );
        // A marker printed, then a failure, is a failure.
        assert!(
            matches!(program.judge(Exit::Code(1), true, "done-7\nTraceback"), Ran::Failed { how, .. } if how == "exit status 1")
        );
        assert!(
            matches!(program.judge(Exit::Signal(9), false, ""), Ran::Failed { how, .. } if how == "killed by signal 9")
        );
        assert_eq!(program.judge(Exit::TimedOut, true, "done-7"), Ran::TimedOut);
    }

    #[test]
    fn issues_say_how_it_failed() {
        let second = Duration::from_secs(3);
        assert_eq!(Ran::Passed.issue(second), None);
        assert_eq!(
            Ran::Failed {
                how: "exit status 1".into(),
                tail: "AssertionError".into()
            }
            .issue(second)
            .unwrap(),
            "the tests failed (exit status 1):\nAssertionError"
        );
        assert!(Ran::TimedOut.issue(second).unwrap().contains("within 3 s"));
    }
}
