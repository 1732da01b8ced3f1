//! Conditions as Kubernetes expects them: one per type, `lastTransitionTime` moved only
//! when the status changes, `observedGeneration` on each.
//!
//! Layer: a helper above `api`; uses nothing else of the crate.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// What a condition's transition tells the object's readers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notice {
    /// Progress: a Normal Event.
    Normal,
    /// Something is wrong: a Warning Event.
    Warning,
    /// No news (a phase the object has not reached): no Event.
    Silent,
}

/// A condition as a controller decides it, before times and generations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub type_: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
    pub notice: Notice,
    /// The message stays on the object and out of its Events: it may quote what a
    /// tenant's job wrote, and Events are often shipped to cluster-wide logs.
    pub withheld: bool,
}

impl Desired {
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason,
            message: message.into(),
            notice: Notice::Normal,
            withheld: false,
        }
    }

    /// The same condition, whose Event names the condition but not its message.
    pub fn withheld(self) -> Self {
        Self {
            withheld: true,
            ..self
        }
    }

    /// The same condition, announced as something wrong.
    pub fn warning(self) -> Self {
        Self {
            notice: Notice::Warning,
            ..self
        }
    }

    /// The same condition, not announced.
    pub fn silent(self) -> Self {
        Self {
            notice: Notice::Silent,
            ..self
        }
    }
}

/// Condition messages stay well under the API's 32 KiB bound and readable in `kubectl get`.
const MAX_MESSAGE: usize = 1024;

fn status_word(status: bool) -> &'static str {
    if status { "True" } else { "False" }
}

/// The conditions to store: `desired` in order, keeping each old condition's transition
/// time when its status is unchanged.
pub fn merge(
    old: &[Condition],
    desired: &[Desired],
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    desired
        .iter()
        .map(|d| {
            let status = status_word(d.status);
            let last_transition_time = transition_time(old, d.type_, status, now);
            let mut message = d.message.clone();
            if message.len() > MAX_MESSAGE {
                let mut end = MAX_MESSAGE;
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                message.truncate(end);
            }
            Condition {
                type_: d.type_.to_owned(),
                status: status.to_owned(),
                reason: d.reason.to_owned(),
                message,
                last_transition_time,
                observed_generation: generation,
            }
        })
        .collect()
}

/// When a condition of `type_` with `status` last changed: the old condition's time when
/// its status is the same, else `now`.
pub fn transition_time(old: &[Condition], type_: &str, status: &str, now: Timestamp) -> Time {
    match old.iter().find(|c| c.type_ == type_) {
        Some(previous) if previous.status == status => previous.last_transition_time.clone(),
        _ => Time(now),
    }
}

/// The conditions of `new` whose status or reason differs from `old`, each with the
/// notice its desired condition asks for (one Event each, unless silent) and whether its
/// message is withheld from the Event.
pub fn transitions<'a>(
    old: &[Condition],
    new: &'a [Condition],
    desired: &[Desired],
) -> Vec<(&'a Condition, Notice, bool)> {
    new.iter()
        .filter(|n| {
            !old.iter()
                .any(|o| o.type_ == n.type_ && o.status == n.status && o.reason == n.reason)
        })
        .map(|n| {
            let wanted = desired.iter().find(|d| d.type_ == n.type_);
            let notice = wanted.map_or(Notice::Normal, |d| d.notice);
            (n, notice, wanted.is_some_and(|d| d.withheld))
        })
        .collect()
}

/// An Event for each transition from `old` to `new`, as its desired condition's notice
/// asks.
pub async fn announce(
    recorder: &kube::runtime::events::Recorder,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    old: &[Condition],
    new: &[Condition],
    desired: &[Desired],
) {
    for (changed, notice, withheld) in transitions(old, new, desired) {
        publish(recorder, reference, changed, notice, withheld).await;
    }
}

/// An Event for a condition's transition, as its notice asks. An Event is a courtesy:
/// failing to write one is logged, not returned.
async fn publish(
    recorder: &kube::runtime::events::Recorder,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    condition: &Condition,
    notice: Notice,
    withheld: bool,
) {
    use kube::runtime::events::{Event, EventType};
    let type_ = match notice {
        Notice::Silent => return,
        Notice::Warning => EventType::Warning,
        Notice::Normal => EventType::Normal,
    };
    let event = Event {
        type_,
        reason: condition.reason.clone(),
        note: Some(if withheld {
            format!(
                "{}={}: the details are in the object's {} condition",
                condition.type_, condition.status, condition.type_
            )
        } else {
            format!(
                "{}={}: {}",
                condition.type_, condition.status, condition.message
            )
        }),
        action: format!("Set{}", condition.type_),
        secondary: None,
    };
    if let Err(err) = recorder.publish(&event, reference).await {
        tracing::warn!(%err, "could not publish an Event");
    } else {
        tracing::info!(condition = %condition.type_, status = %condition.status, reason = %condition.reason, "condition changed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).unwrap()
    }

    #[test]
    fn transition_time_moves_only_when_the_status_changes() {
        let first = merge(
            &[],
            &[Desired::new("Available", false, "Starting", "0 of 1")],
            Some(1),
            at(100),
        );
        assert_eq!(first[0].last_transition_time, Time(at(100)));

        let same = merge(
            &first,
            &[Desired::new("Available", false, "Loading", "still 0 of 1")],
            Some(2),
            at(200),
        );
        assert_eq!(
            same[0].last_transition_time,
            Time(at(100)),
            "reason and message changes keep the time"
        );
        assert_eq!(same[0].reason, "Loading");
        assert_eq!(same[0].observed_generation, Some(2));

        let flipped = merge(
            &same,
            &[Desired::new("Available", true, "Ready", "1 of 1")],
            Some(2),
            at(300),
        );
        assert_eq!(flipped[0].last_transition_time, Time(at(300)));
    }

    #[test]
    fn an_event_per_status_or_reason_change() {
        let old = merge(
            &[],
            &[
                Desired::new("Available", false, "Starting", ""),
                Desired::new("Degraded", false, "AsExpected", ""),
            ],
            None,
            at(1),
        );
        let desired = [
            Desired::new("Available", false, "Starting", "other message"),
            Desired::new("Degraded", true, "PodFailing", "w-0: CrashLoopBackOff")
                .warning()
                .withheld(),
        ];
        let new = merge(&old, &desired, None, at(2));
        let changed: Vec<(&str, Notice, bool)> = transitions(&old, &new, &desired)
            .iter()
            .map(|(c, notice, withheld)| (c.type_.as_str(), *notice, *withheld))
            .collect();
        assert_eq!(changed, [("Degraded", Notice::Warning, true)]);
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let long = "é".repeat(MAX_MESSAGE);
        let merged = merge(
            &[],
            &[Desired::new("Degraded", true, "PodFailing", long)],
            None,
            at(1),
        );
        assert!(merged[0].message.len() <= MAX_MESSAGE);
        assert!(merged[0].message.chars().all(|c| c == 'é'));
    }
}
