//! The engine as one task per job: started from the job's spec and endpoints, resuming
//! from its records; its outcome written as `Complete` or `Failed`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use tokio::sync::watch;
use tracing::info;

use super::pools::{self, Endpoints, Waiting};
use super::progress::{self, Progress, State};
use super::report::Ending;
use super::runs::{self, Ended, Running};
use super::status::{self, Admission};
use super::{Error, PREVIEW_BYTES, Reconciler, sandbox, store};
use crate::api::SwarmJobStatus;
use crate::controllers::api_keys;
use crate::swarm::pool::{Pool, Server};
use crate::swarm::record::{Store, StoreError};
use crate::swarm::{Job, Outcome, pools_used};

/// How long a running job's progress is gathered before the reconcile that writes it.
const PROGRESS_FOLD: Duration = Duration::from_millis(500);

impl Reconciler<'_> {
    /// The API keys of the job's external pools that name one, by the name the job uses,
    /// or why the job waits for them.
    pub(super) async fn api_keys(
        &self,
        endpoints: &[Endpoints],
    ) -> Result<BTreeMap<String, String>, Waiting> {
        let namespace = self.job.namespace().unwrap_or_default();
        let mut keys = BTreeMap::new();
        for e in endpoints {
            let Some(reference) = &e.api_key else {
                continue;
            };
            let key = api_keys::read(
                &self.ctx.client,
                &namespace,
                reference,
                &self.ctx.api_key_role,
            )
            .await
            .map_err(|err| Waiting {
                reason: status::reason::API_KEY_UNAVAILABLE,
                message: format!(
                    "the API key of pool {}: {}",
                    e.name,
                    crate::telemetry::chain(&err)
                ),
            })?;
            keys.insert(e.name.clone(), key);
        }
        Ok(keys)
    }

    /// In a namespace whose results go in Secrets, whether the operator may keep them
    /// there: the job waits for the RoleBinding rather than fail at its first checkpoint.
    pub(super) async fn results_writable(&self) -> Result<(), Waiting> {
        let store = store::ResultStore::new(self.ctx.client.clone(), self.job, &self.ctx.results);
        if store.kind() != store::Kind::Secret {
            return Ok(());
        }
        match store.load().await {
            Err(refused @ StoreError::Refused { .. }) => Err(Waiting {
                reason: status::reason::RESULTS_UNWRITABLE,
                message: crate::telemetry::chain(&refused),
            }),
            // Anything else is the engine's to retry from its records.
            _ => Ok(()),
        }
    }

    /// The engine as a task, resuming from the job's records.
    pub(super) fn start(
        &self,
        endpoints: &[Endpoints],
        keys: &BTreeMap<String, String>,
        start: Timestamp,
        state: State,
    ) -> Running {
        let pools: BTreeMap<String, Arc<Pool>> = endpoints
            .iter()
            .map(|e| {
                let http = match e.server {
                    Server::OpenAi => &self.ctx.external_http,
                    Server::Worker => &self.ctx.http,
                };
                let key = keys.get(&e.name).or(e.token.as_ref()).cloned();
                let pool =
                    Pool::with_api_key(&e.name, &e.model, e.server, &e.urls, http.clone(), key)
                        .with_cache_salt(e.cache_salt.clone())
                        .with_response_limit(self.ctx.response_limit);
                (e.name.clone(), Arc::new(pool))
            })
            .collect();
        let objects = endpoints
            .iter()
            .map(|e| (e.name.clone(), pools::pool_object_name(self.job, &e.name)))
            .collect();
        let wake = {
            let sender = self.ctx.wake.clone();
            let job = ObjectRef::from_obj(self.job);
            let pending = Arc::new(AtomicBool::new(false));
            Box::new(move || {
                // Progress comes in bursts (a fan-out's subagents finishing within moments
                // of each other): one reconcile, so one status write, a PROGRESS_FOLD
                // after the first of them carries all that came meanwhile. What comes
                // after the flag is cleared wakes again, so nothing is left unwritten.
                if pending.swap(true, Ordering::AcqRel) {
                    return;
                }
                let (sender, job, pending) = (sender.clone(), job.clone(), pending.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(PROGRESS_FOLD).await;
                    pending.store(false, Ordering::Release);
                    // Closed only when the controller stops, and then nobody needs waking.
                    let _ = sender.unbounded_send(job);
                });
            })
        };
        let progress = Arc::new(Progress::new(
            self.namespace.clone(),
            objects,
            self.ctx.metrics.clone(),
            state,
            wake,
        ));
        let (suspend, suspended) = watch::channel(self.job.spec.suspend == Some(true));
        let work = {
            let name = self.job.name_any();
            let spec = self.job.spec.clone();
            let store =
                store::ResultStore::new(self.ctx.client.clone(), self.job, &self.ctx.results);
            let pools = pools.clone();
            let observer = progress.clone();
            let options = self.ctx.options;
            let started = runs::started_at(start);
            let sandbox = sandbox::Pods::new(
                self.ctx.client.clone(),
                self.job,
                self.ctx.results.kind(&self.namespace),
                self.ctx.tests.clone(),
            );
            async move {
                Job {
                    name: &name,
                    spec: &spec,
                    pools: &pools,
                    store: &store,
                    observer: observer.as_ref(),
                    started,
                    suspended,
                    sandbox: &sandbox,
                    options,
                }
                .execute()
                .await
            }
        };
        Running::spawn(
            self.job.uid().unwrap_or_default(),
            pools,
            progress,
            suspend,
            work,
        )
    }

    /// Writes the engine's outcome: `Complete` or `Failed`, the result, the times.
    pub(super) async fn conclude(
        &self,
        old: &SwarmJobStatus,
        run: &Running,
        ended: Option<Ended>,
    ) -> Result<Action, Error> {
        let outcome: Outcome = match ended {
            Some(Ok(Ok(outcome))) => outcome,
            Some(Ok(Err(interrupted))) => return Err(interrupted.into()),
            Some(Err(join)) => return Err(Error::Engine(join.to_string())),
            None => return Err(Error::Engine("its outcome was already read".to_owned())),
        };
        let state = run.progress.state();
        let now = Timestamp::now();
        let result = &outcome.result;
        let preview = result
            .as_ref()
            .ok()
            .map(|(_, answer)| progress::bounded(answer.trim(), PREVIEW_BYTES));
        let verdict = result
            .as_ref()
            .map(|(r, _)| r.clone())
            .map_err(Clone::clone);
        let admission = Admission::Ready {
            pools: &pools_used(&self.job.spec),
        };
        let written = self
            .update_status(
                old,
                admission,
                &state,
                old.start_time.as_ref().map(|t| t.0),
                Some(&Ending {
                    outcome: &verdict,
                    at: now,
                    preview,
                }),
            )
            .await;
        let new = match written {
            Ok(new) => new,
            Err(err) => {
                // Not written (a 409 from a stale read, say): the run keeps its outcome
                // for the next reconcile, which writes it instead of starting again.
                run.unwritten(outcome);
                return Err(err);
            }
        };
        let (condition, reason) = match &verdict {
            Ok(result) if result.truncated() => {
                (status::COMPLETE, status::reason::ANSWER_TRUNCATED)
            }
            Ok(_) => (status::COMPLETE, status::reason::SUCCEEDED),
            Err(failure) => (status::FAILED, failure.reason.as_str()),
        };
        let seconds = old
            .start_time
            .as_ref()
            .map_or(0.0, |t| now.duration_since(t.0).as_secs_f64().max(0.0));
        self.ctx
            .metrics
            .job_finished(&self.namespace, condition, reason, seconds);
        info!(condition, reason, seconds, "the job finished");
        self.after_finish(&new).await
    }
}
