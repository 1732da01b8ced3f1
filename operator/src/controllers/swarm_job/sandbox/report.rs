//! What a batch's objects say once it ran, read with no client: the pod's state, the
//! Job's failure, and the report in the pod's termination message.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use serde::Deserialize;

use crate::swarm::sandbox::{Exit, Program, Ran, SandboxError};

/// Whether the pod is the batch Job's (by uid: a Job deleted and made again under the
/// same name is another).
pub(super) fn controlled_by(pod: &Pod, job_uid: &str) -> bool {
    pod.owner_references()
        .iter()
        .any(|o| o.kind == "Job" && o.uid == job_uid && o.controller == Some(true))
}

pub(super) enum PodState {
    Running,
    /// The container ended: its termination message, and how it ended.
    Terminated {
        message: String,
        how: String,
    },
    /// An image that does not run: `lasting` when no retry can change that (a malformed
    /// name), else a pull that failed and may work later.
    BadImage {
        why: String,
        lasting: bool,
    },
}

/// Where a test pod is: its container's end and message, or an image that will never run.
pub(super) fn pod_state(pod: &Pod) -> PodState {
    let Some(container) = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
    else {
        return PodState::Running;
    };
    let state = container.state.as_ref();
    if let Some(terminated) = state.and_then(|s| s.terminated.as_ref()) {
        return PodState::Terminated {
            message: terminated.message.clone().unwrap_or_default(),
            how: format!(
                "{}, exit code {}",
                terminated.reason.as_deref().unwrap_or("no reason"),
                terminated.exit_code
            ),
        };
    }
    match state.and_then(|s| s.waiting.as_ref()) {
        Some(waiting) => {
            let reason = waiting.reason.as_deref().unwrap_or_default();
            let why = format!(
                "{reason}: {}",
                waiting.message.as_deref().unwrap_or_default()
            );
            match reason {
                "InvalidImageName" | "ErrImageNeverPull" => {
                    PodState::BadImage { why, lasting: true }
                }
                "ErrImagePull" | "ImagePullBackOff" => PodState::BadImage {
                    why,
                    lasting: false,
                },
                _ => PodState::Running,
            }
        }
        None => PodState::Running,
    }
}

pub(super) fn failed_condition(job: &Job) -> Option<String> {
    job.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Failed" && c.status == "True")
        .map(|c| {
            format!(
                "{}: {}",
                c.reason.as_deref().unwrap_or_default(),
                c.message.as_deref().unwrap_or_default()
            )
        })
}

/// One program's line of the runner's report.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Reported {
    exit: Option<i32>,
    signal: Option<i32>,
    #[serde(default)]
    timed_out: bool,
    /// The runner saw the program's marker line, which it leaves out of `printout`.
    finished: bool,
    #[serde(default)]
    printout: String,
}

/// The runner's report, one entry per program in order. The report is the pod's word,
/// from a container that ran model-written code: anything but one well-formed entry per
/// program is a broken batch, never a pass.
pub fn read_report(message: &str, programs: &[&Program]) -> Result<Vec<Ran>, SandboxError> {
    let unreadable = |why: String| SandboxError::Broken {
        what: format!("the test pod's report is unreadable: {why}"),
        source: None,
    };
    let reported: Vec<Reported> =
        serde_json::from_str(message).map_err(|err| unreadable(err.to_string()))?;
    if reported.len() != programs.len() {
        return Err(unreadable(format!(
            "{} entries for {} programs",
            reported.len(),
            programs.len()
        )));
    }
    reported
        .into_iter()
        .zip(programs)
        .map(|(r, program)| {
            let exit = match (r.timed_out, r.exit, r.signal) {
                (true, None, None) => Exit::TimedOut,
                (false, Some(code), None) => Exit::Code(code),
                (false, None, Some(signal)) => Exit::Signal(signal),
                _ => {
                    return Err(unreadable(
                        "an entry says more than one way it ended".to_owned(),
                    ));
                }
            };
            Ok(program.judge(exit, r.finished, &r.printout))
        })
        .collect()
}
