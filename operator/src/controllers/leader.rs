//! Leader election on a `coordination.k8s.io` Lease, so that of several operator replicas
//! exactly one reconciles. Every write carries the Lease's resourceVersion: two replicas
//! that race for an expired Lease cannot both win.
//!
//! A holder's claim is judged on this replica's own clock, as client-go does: it runs out
//! once the Lease's record has not changed for its duration since this replica saw it
//! change. Comparing the holder's `renewTime` with this node's clock would let a node
//! whose clock runs ahead take the Lease from a live leader.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use std::sync::Mutex;

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::time::Instant;
use tracing::{info, warn};

/// How long a leader's claim lasts without renewal; it renews at a third of that.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);

pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    /// How long a claim lasts without renewal.
    duration: Duration,
    /// The Lease's record as last read, and when this replica saw it change.
    seen: Mutex<Option<(Record, Instant)>>,
}

/// What changes each time a holder renews or another takes over.
#[derive(Clone, Debug, PartialEq)]
struct Record {
    holder: String,
    renewed: Option<MicroTime>,
    transitions: Option<i32>,
}

impl Record {
    fn of(spec: Option<&LeaseSpec>) -> Self {
        Self {
            holder: spec
                .and_then(|s| s.holder_identity.clone())
                .unwrap_or_default(),
            renewed: spec.and_then(|s| s.renew_time.clone()),
            transitions: spec.and_then(|s| s.lease_transitions),
        }
    }
}

/// What a Lease allows `identity` to do, its record unchanged for `unchanged` on this
/// replica's clock.
fn may_hold(lease: &Lease, identity: &str, unchanged: Duration) -> bool {
    let Some(spec) = &lease.spec else { return true };
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder.is_empty() || holder == identity {
        return true;
    }
    let duration = spec
        .lease_duration_seconds
        .map_or(LEASE_DURATION, |s| Duration::from_secs(s.max(1) as u64));
    unchanged > duration
}

impl Elector {
    pub fn new(client: kube::Client, namespace: &str, name: &str, identity: String) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity,
            duration: LEASE_DURATION,
            seen: Mutex::new(None),
        }
    }

    /// How long the record read in `lease` has been unchanged, as this replica saw it.
    fn unchanged(&self, lease: &Lease) -> Duration {
        let record = Record::of(lease.spec.as_ref());
        let now = Instant::now();
        let mut seen = self.seen.lock().expect("lease record lock");
        match &*seen {
            Some((last, since)) if *last == record => now.duration_since(*since),
            _ => {
                *seen = Some((record, now));
                Duration::ZERO
            }
        }
    }

    /// The same elector with claims that last `duration` (whole seconds, at least one).
    pub fn lasting(self, duration: Duration) -> Self {
        Self {
            duration: duration.max(Duration::from_secs(1)),
            ..self
        }
    }

    /// Claims or renews the Lease; `Ok(false)` while another replica holds it.
    pub async fn try_hold(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(now, now, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                Err(err) => Err(err),
            };
        };
        if !may_hold(&lease, &self.identity, self.unchanged(&lease)) {
            return Ok(false);
        }
        let previous = lease.spec.clone().unwrap_or_default();
        let ours = previous.holder_identity.as_deref() == Some(self.identity.as_str());
        let acquired = match (ours, &previous.acquire_time) {
            (true, Some(MicroTime(at))) => *at,
            _ => now,
        };
        let transitions = previous.lease_transitions.unwrap_or(0) + i32::from(!ours);
        lease.spec = Some(self.spec(now, acquired, transitions));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                if !ours {
                    info!(lease = %self.name, identity = %self.identity, "became the leader");
                }
                Ok(true)
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(err) => Err(err),
        }
    }

    fn spec(&self, now: Timestamp, acquired: Timestamp, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
            acquire_time: Some(MicroTime(acquired)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// Waits until this replica holds the Lease, trying `every` so often. An API server
    /// that cannot be reached is waited out like a live leader: a standby that exited on
    /// it would crash-loop every replica through a short outage.
    pub async fn acquire(&self, every: Duration) {
        loop {
            match self.try_hold().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(err) => {
                    warn!(lease = %self.name, error = %crate::telemetry::chain(&err), "could not read the leader Lease; trying again");
                }
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Renews the Lease at a third of its duration until it cannot: another replica holds
    /// it, or no renewal succeeded before the last claim ran out. A renewal that hangs is
    /// abandoned when the claim runs out, because from then on another replica may lead.
    pub async fn keep(&self) -> Lost {
        // When the last successful renewal was sent: the claim runs from there.
        let mut claimed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.duration / 3).await;
            let sent = tokio::time::Instant::now();
            let left = self.duration.saturating_sub(claimed.elapsed());
            match tokio::time::timeout(left, self.try_hold()).await {
                Ok(Ok(true)) => claimed = sent,
                Ok(Ok(false)) => {
                    return Lost::Taken {
                        lease: self.name.clone(),
                    };
                }
                Ok(Err(source)) if claimed.elapsed() >= self.duration => {
                    return Lost::NotRenewed {
                        lease: self.name.clone(),
                        source,
                    };
                }
                Ok(Err(_)) => {}
                Err(_) => {
                    return Lost::Expired {
                        lease: self.name.clone(),
                        after: self.duration,
                    };
                }
            }
        }
    }
}

/// Why this replica no longer leads.
#[derive(Debug, thiserror::Error)]
pub enum Lost {
    #[error("another replica holds Lease {lease}")]
    Taken { lease: String },
    #[error("could not renew Lease {lease} before it ran out")]
    NotRenewed {
        lease: String,
        #[source]
        source: kube::Error,
    },
    #[error("no renewal of Lease {lease} answered within its {after:?}")]
    Expired { lease: String, after: Duration },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str) -> Lease {
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.to_owned()),
                lease_duration_seconds: Some(15),
                renew_time: Some(MicroTime(Timestamp::from_second(1_000).unwrap())),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn a_lease_is_taken_only_from_a_holder_whose_record_stopped_changing() {
        let secs = Duration::from_secs;
        assert!(may_hold(&lease("me"), "me", secs(0)), "our own lease");
        assert!(
            !may_hold(&lease("other"), "me", secs(10)),
            "unchanged for 10 s, lasts 15 s"
        );
        assert!(may_hold(&lease("other"), "me", secs(16)), "ran out 1 s ago");
        assert!(may_hold(&lease(""), "me", secs(0)), "released");
    }
}
