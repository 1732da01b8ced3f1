//! The engine runs of the jobs this operator is working on: one task per job, on the
//! leader only. Dropping a run cancels its calls in flight.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::progress::Progress;
use crate::swarm::pool::Pool;
use crate::swarm::{Interrupted, Outcome};

/// What a run ended with: an outcome, the store failing, or the task failing.
pub type Ended = Result<Result<Outcome, Interrupted>, tokio::task::JoinError>;

/// One job's engine task.
pub struct Running {
    /// The job's uid: a job deleted and created again under its name is another job.
    pub uid: String,
    /// The pools the engine calls, by the names the job uses; the controller keeps their
    /// replicas up to date.
    pub pools: BTreeMap<String, Arc<Pool>>,
    pub progress: Arc<Progress>,
    suspended: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<Result<Outcome, Interrupted>>>>,
    /// The engine's outcome when the status write that was to hold it failed: kept for
    /// the next reconcile to write (None otherwise, and once taken).
    unwritten: Mutex<Option<Outcome>>,
}

impl Running {
    /// Starts `work` (the engine's run) as a task.
    pub fn spawn(
        uid: String,
        pools: BTreeMap<String, Arc<Pool>>,
        progress: Arc<Progress>,
        suspended: watch::Sender<bool>,
        work: impl Future<Output = Result<Outcome, Interrupted>> + Send + 'static,
    ) -> Self {
        let wake = progress.clone();
        let task = tokio::spawn(async move {
            let ended = work.await;
            // The controller reads the outcome on its next reconcile.
            wake.wake();
            ended
        });
        Self {
            uid,
            pools,
            progress,
            suspended,
            task: Mutex::new(Some(task)),
            unwritten: Mutex::new(None),
        }
    }

    /// Pauses or resumes the run between calls.
    pub fn suspend(&self, suspended: bool) {
        self.suspended.send_replace(suspended);
    }

    /// Model calls in flight on any of the job's pools.
    pub fn in_flight(&self) -> usize {
        self.pools.values().map(|p| p.outstanding()).sum()
    }

    pub fn is_finished(&self) -> bool {
        self.task
            .lock()
            .expect("run lock")
            .as_ref()
            .is_none_or(JoinHandle::is_finished)
    }

    /// The run's end, once `is_finished`: the engine's, or the outcome whose write
    /// failed (`unwritten`); `None` if it was taken already.
    pub async fn ended(&self) -> Option<Ended> {
        if let Some(outcome) = self.unwritten.lock().expect("run lock").take() {
            return Some(Ok(Ok(outcome)));
        }
        let task = self.task.lock().expect("run lock").take()?;
        Some(task.await)
    }

    /// Keeps `outcome`, which could not be written, for the next `ended`.
    pub fn unwritten(&self, outcome: Outcome) {
        *self.unwritten.lock().expect("run lock") = Some(outcome);
    }

    /// Whether an outcome waits to be written.
    pub fn has_unwritten(&self) -> bool {
        self.unwritten.lock().expect("run lock").is_some()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(task) = self.task.lock().expect("run lock").take() {
            task.abort();
        }
    }
}

/// The runs, by `namespace/name` of their job.
#[derive(Default)]
pub struct Runs(Mutex<HashMap<String, Arc<Running>>>);

impl Runs {
    /// The run of job `key` with this `uid`; a run of an older job of the same name is
    /// cancelled.
    pub fn get(&self, key: &str, uid: &str) -> Option<Arc<Running>> {
        let mut runs = self.0.lock().expect("runs lock");
        match runs.get(key) {
            Some(run) if run.uid == uid => Some(run.clone()),
            Some(_) => {
                runs.remove(key);
                None
            }
            None => None,
        }
    }

    pub fn insert(&self, key: String, run: Arc<Running>) {
        self.0.lock().expect("runs lock").insert(key, run);
    }

    /// Forgets job `key`'s run; the run's task is cancelled when the last reference to
    /// it goes.
    pub fn remove(&self, key: &str) -> Option<Arc<Running>> {
        self.0.lock().expect("runs lock").remove(key)
    }

    pub fn is_empty(&self) -> bool {
        self.0.lock().expect("runs lock").is_empty()
    }
}

/// The instant a job started, as this process's clock sees it, from its recorded start.
pub fn started_at(start: k8s_openapi::jiff::Timestamp) -> Instant {
    let ago = k8s_openapi::jiff::Timestamp::now().duration_since(start);
    if ago.is_negative() {
        // A start in the future is clock skew between API server and operator.
        return Instant::now();
    }
    Instant::now()
        .checked_sub(ago.unsigned_abs())
        .unwrap_or_else(Instant::now)
}
