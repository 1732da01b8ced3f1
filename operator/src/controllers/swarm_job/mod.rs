//! The SwarmJob controller: resolves the pools a job calls, creates its job-scoped pools,
//! runs the swarm engine as one task per job (on the leader only, as the whole operator
//! is), and reports each phase as a condition.
//!
//! The engine checkpoints into the job's result object (`store`: a ConfigMap, or a
//! Secret) before it reports a subagent, and a reconcile writes only what the engine has
//! reported (`progress`, written back by `report`), so the status never counts work that
//! a restarted operator would do again. A job whose engine is running carries a
//! finalizer: deleting the job cancels its calls in flight before the job goes. Finished
//! jobs drop it, and their pools.
//!
//! Each reconcile finds where the job stands (`Stage`, one method each), reads the pools
//! and worker pods it calls, asks the pure `plan` for the writes to its own pools and
//! where each pool's calls go, makes the writes, and writes the status once (`report`).

pub mod build;
mod engine;
mod plan;
pub(crate) mod pools;
pub(crate) mod progress;
mod report;
pub(crate) mod runs;
pub mod sandbox;
pub(crate) mod status;
pub mod store;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::channel::mpsc::UnboundedSender;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ListParams};
use kube::runtime::controller::Action;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use thiserror::Error;
use tracing::{Instrument, info};

use self::pools::{Endpoints, Waiting};
use self::progress::State;
use self::runs::Running;
use self::status::Admission;
use crate::api::{ModelPool, SwarmJob, SwarmJobStatus};
use crate::controllers::children::{ApiError, api_error, apply, create, delete};
use crate::controllers::{Backoff, key};
use crate::metrics::Metrics;
use crate::pool_contract::POOL_LABEL;
use crate::swarm::{self, Options, pools_used};
use crate::tenancy::Policy;

/// Keeps a job's calls cancellable: removed once no run of the job is left.
pub const FINALIZER: &str = "kubeswarm.dev/cancel-calls";
/// How often a running job's pool endpoints are refreshed without any other change
/// (a worker restarted with a new IP and the same ready count).
const RUNNING_RESYNC: Duration = Duration::from_secs(30);
/// How often a waiting job looks at its pools again; a ModelPool change wakes it sooner.
const WAITING_RECHECK: Duration = Duration::from_secs(30);
/// How soon a suspended job looks again whether its calls in flight have finished, so
/// that its pools can be released.
const DRAIN_CHECK: Duration = Duration::from_secs(2);
/// The status keeps the start of the answer; the rest is in the result object.
const PREVIEW_BYTES: usize = 256;

#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The records could not be read or written; the next attempt resumes from them.
    #[error(transparent)]
    Interrupted(#[from] swarm::Interrupted),
    #[error("the job's engine task ended without an outcome: {0}")]
    Engine(String),
}

impl Error {
    /// Whether a conditional write found the object changed since it was read.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Api(err) if err.is_conflict())
    }

    /// A short label for the reconcile-error metric.
    pub fn kind(&self) -> &str {
        match self {
            Error::Api(err) => &err.kind,
            Error::Interrupted(_) => "ResultStore",
            Error::Engine(_) => "Engine",
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: kube::Client,
    /// Shared by every pool of every job, so connections to workers are pooled.
    pub http: reqwest::Client,
    /// The client of external pools' endpoints: `tenancy::external_client`.
    pub external_http: reqwest::Client,
    /// What the job's own pools (`spec.pools`) may ask for, as for any ModelPool.
    pub tenancy: Policy,
    /// The operator's worker image, which every pool may run.
    pub worker_image: String,
    /// The ClusterRole that grants reads of external pools' API keys, per namespace.
    pub api_key_role: String,
    /// The key the workers' tokens are derived from (`pool_contract::worker_token`).
    pub worker_key: String,
    /// Where each namespace's results are kept.
    pub results: store::Results,
    /// The most of one completion response that is read.
    pub response_limit: usize,
    /// What the pods of `tests` checks run, and their limits.
    pub tests: sandbox::Settings,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub backoff: Backoff,
    pub runs: runs::Runs,
    /// Asks the controller for a reconcile of a job: its engine has news.
    pub wake: UnboundedSender<ObjectRef<SwarmJob>>,
    pub options: Options,
}

/// The controller's entry point: one span, one timer, then the pipeline.
pub async fn reconcile(job: Arc<SwarmJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    let span = tracing::info_span!("reconcile", kind = "SwarmJob", namespace = %job.namespace().unwrap_or_default(), name = %job.name_any());
    let _timer = ctx.metrics.reconcile_timer("SwarmJob");
    ctx.metrics.reconciled("SwarmJob");
    let action = async { Reconciler::new(&job, &ctx).run().await }
        .instrument(span)
        .await?;
    ctx.backoff.succeeded(&key(job.as_ref()));
    Ok(action)
}

/// Transient errors back off per object; kube-runtime retries after the returned delay.
pub fn error_policy(job: Arc<SwarmJob>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.backoff.retry(
        &ctx.metrics,
        "SwarmJob",
        &key(job.as_ref()),
        error,
        error.is_conflict(),
        error.kind(),
    )
}

/// The jobs a ModelPool change concerns: those in its namespace that call it and have
/// not finished.
pub fn jobs_calling<'a>(
    pool: &'a ModelPool,
    jobs: impl IntoIterator<Item = Arc<SwarmJob>> + 'a,
) -> impl Iterator<Item = ObjectRef<SwarmJob>> + 'a {
    let namespace = pool.namespace();
    let name = pool.name_any();
    jobs.into_iter()
        .filter(move |job| job.namespace() == namespace && !finished(job.status.as_ref()))
        .filter(move |job| {
            pools_used(&job.spec)
                .iter()
                .any(|used| pools::pool_object_name(job, used) == name)
        })
        .map(|job| ObjectRef::from_obj(job.as_ref()))
}

/// Whether the job has completed or failed.
pub fn finished(status: Option<&SwarmJobStatus>) -> bool {
    status.is_some_and(|s| {
        s.conditions.iter().any(|c| {
            (c.type_ == status::COMPLETE || c.type_ == status::FAILED) && c.status == "True"
        })
    })
}

/// What a job with no engine here waits for, and when it looks again; or what it starts with.
enum Gate {
    Wait(Waiting, Action),
    Suspended,
    Start(Vec<Endpoints>, BTreeMap<String, String>),
}

/// Where a job stands, as one reconcile sees it; each has one method of the reconciler.
enum Stage {
    /// Deleted: cancel the calls in flight, then let it go.
    Deleting,
    /// `Complete` or `Failed`: release what it holds, and expire it.
    Finished(SwarmJobStatus),
    /// Its engine has an outcome that is not written yet.
    Ended(SwarmJobStatus, Arc<Running>),
    /// Its engine runs on this replica.
    Running(SwarmJobStatus, Arc<Running>),
    /// No engine runs it here: not started, or started by a replica that is gone.
    NotStarted(SwarmJobStatus),
}

struct Reconciler<'a> {
    job: &'a SwarmJob,
    ctx: &'a Context,
    namespace: String,
    key: String,
    /// The job's resourceVersion as of the reconcile's last write of it: a status write
    /// moves it, and the finalizer patch after it is conditional on the new one.
    resource_version: std::sync::Mutex<Option<String>>,
}

impl<'a> Reconciler<'a> {
    fn new(job: &'a SwarmJob, ctx: &'a Context) -> Self {
        Self {
            job,
            ctx,
            namespace: job.namespace().unwrap_or_default(),
            key: key(job),
            resource_version: std::sync::Mutex::new(job.resource_version()),
        }
    }

    fn resource_version(&self) -> Option<String> {
        self.resource_version
            .lock()
            .expect("resource version lock")
            .clone()
    }

    /// Remembers the resourceVersion of the job as a write returned it.
    fn wrote(&self, job: &SwarmJob) {
        *self.resource_version.lock().expect("resource version lock") = job.resource_version();
    }

    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.ctx.client.clone(), &self.namespace)
    }

    /// Where the job stands, from the object and the runs this replica holds.
    fn stage(&self) -> Stage {
        if self.job.metadata.deletion_timestamp.is_some() {
            return Stage::Deleting;
        }
        let old = self.job.status.clone().unwrap_or_default();
        if finished(Some(&old)) {
            return Stage::Finished(old);
        }
        match self
            .ctx
            .runs
            .get(&self.key, &self.job.uid().unwrap_or_default())
        {
            Some(run) if run.is_finished() => Stage::Ended(old, run),
            Some(run) => Stage::Running(old, run),
            None => Stage::NotStarted(old),
        }
    }

    async fn run(&self) -> Result<Action, Error> {
        match self.stage() {
            Stage::Deleting => self.cancel().await,
            Stage::Finished(old) => {
                self.ctx.runs.remove(&self.key);
                self.after_finish(&old).await
            }
            Stage::Ended(old, run) => {
                let ended = run.ended().await;
                let concluded = self.conclude(&old, &run, ended).await;
                // An outcome whose write failed stays with its run for the next attempt:
                // without it, that attempt would find no run and start the job again.
                if !run.has_unwritten() {
                    self.ctx.runs.remove(&self.key);
                }
                concluded
            }
            Stage::Running(old, run) => self.keep_running(&old, &run).await,
            Stage::NotStarted(old) => self.start_when_ready(&old).await,
        }
    }

    /// A deleted job: dropping its run drops the engine's future, which closes the
    /// connections of its calls in flight; then the finalizer goes.
    async fn cancel(&self) -> Result<Action, Error> {
        self.ctx.runs.remove(&self.key);
        self.set_finalizer(false).await?;
        Ok(Action::await_change())
    }

    /// The pools and worker pods in the job's namespace, with the writes `plan::pool_writes`
    /// asks for made to the job's own pools.
    async fn observe_pools(&self, running: Option<&Running>) -> Result<plan::Observed, Error> {
        let suspended = self.job.spec.suspend == Some(true);
        let name = self.job.name_any();
        let mut pools: Vec<ModelPool> = self
            .api::<ModelPool>()
            .list(&ListParams::default())
            .await
            .map_err(api_error("list", "ModelPool", &name))?
            .items;
        if let Some(run) = running {
            run.suspend(suspended);
        }
        let in_flight = running.map_or(0, Running::in_flight);
        let writes = plan::pool_writes(self.job, &pools, suspended, in_flight);
        pools.extend(self.write_pools(writes).await?);
        let pods: Vec<Pod> = self
            .api::<Pod>()
            .list(&ListParams::default().labels(POOL_LABEL))
            .await
            .map_err(api_error("list", "Pod", &name))?
            .items;
        Ok(plan::Observed { pools, pods })
    }

    /// A running job: its pools' replicas follow the ready workers, and the status the
    /// engine's progress.
    async fn keep_running(&self, old: &SwarmJobStatus, run: &Running) -> Result<Action, Error> {
        let suspended = self.job.spec.suspend == Some(true);
        let observed = self.observe_pools(Some(run)).await?;
        let used = pools_used(&self.job.spec);
        let (replicas, waiting) =
            plan::replicas(self.job, run.pools.keys(), &observed, &self.ctx.worker_key);
        for (name, pool) in &run.pools {
            pool.set_replicas(replicas.get(name).map_or(&[], Vec::as_slice));
        }
        let admission = match (&waiting, suspended) {
            (_, true) => Admission::Suspended,
            (Some(why), false) => Admission::Waiting(why),
            (None, false) => Admission::Ready { pools: &used },
        };
        let state = run.progress.state();
        self.update_status(old, admission, &state, None, None)
            .await?;
        Ok(Action::requeue(if suspended && run.in_flight() > 0 {
            DRAIN_CHECK
        } else {
            RUNNING_RESYNC
        }))
    }

    /// Whether a job with no run on this replica may start: what it waits for, or the
    /// endpoints and API keys it starts with.
    async fn gate(&self) -> Result<Gate, Error> {
        if let Some(denied) = pools::denied(self.job, &self.ctx.tenancy, &self.ctx.worker_image) {
            // A change of the policy restarts the operator, which reconciles every job.
            return Ok(Gate::Wait(denied, Action::await_change()));
        }
        let observed = self.observe_pools(None).await?;
        if self.job.spec.suspend == Some(true) {
            return Ok(Gate::Suspended);
        }
        let recheck = |why| Gate::Wait(why, Action::requeue(WAITING_RECHECK));
        let endpoints = match pools::resolve(
            self.job,
            &observed.pools,
            &observed.pods,
            &self.ctx.worker_key,
        ) {
            Ok(endpoints) => endpoints,
            Err(why) => return Ok(recheck(why)),
        };
        let keys = match self.api_keys(&endpoints).await {
            Ok(keys) => keys,
            Err(why) => return Ok(recheck(why)),
        };
        if let Err(why) = self.results_writable().await {
            return Ok(recheck(why));
        }
        Ok(Gate::Start(endpoints, keys))
    }

    /// A job with no run on this replica: started once every pool it calls is ready, or
    /// resumed from its records after a restart.
    async fn start_when_ready(&self, old: &SwarmJobStatus) -> Result<Action, Error> {
        let state = State::from_status(old, planned(old, &self.job.spec));
        let used = pools_used(&self.job.spec);
        let gate = self.gate().await?;
        let (admission, start) = match &gate {
            Gate::Wait(why, _) => (Admission::Waiting(why), None),
            Gate::Suspended => (Admission::Suspended, None),
            Gate::Start(..) => (
                Admission::Ready { pools: &used },
                Some(old.start_time.as_ref().map_or_else(Timestamp::now, |t| t.0)),
            ),
        };
        if start.is_some() {
            // The finalizer first: from the first call on, a delete must cancel.
            self.set_finalizer(true).await?;
        }
        self.update_status(old, admission, &state, start, None)
            .await?;
        match (gate, start) {
            (Gate::Start(endpoints, keys), Some(start)) => {
                let run = self.start(&endpoints, &keys, start, state);
                info!(pools = ?used, "started the job's engine");
                self.ctx.runs.insert(self.key.clone(), Arc::new(run));
                Ok(Action::requeue(RUNNING_RESYNC))
            }
            (Gate::Wait(_, next), _) => Ok(next),
            _ => Ok(Action::await_change()),
        }
    }

    /// A finished job: its pools go, its finalizer goes, and after
    /// `ttlSecondsAfterFinished` the job goes.
    async fn after_finish(&self, status: &SwarmJobStatus) -> Result<Action, Error> {
        if !self.job.spec.pools.is_empty() {
            let selector = format!("{}={}", build::JOB_LABEL, self.job.name_any());
            let pools = self
                .api::<ModelPool>()
                .list(&ListParams::default().labels(&selector))
                .await
                .map_err(api_error("list", "ModelPool", self.job.name_any()))?
                .items;
            self.write_pools(plan::release(self.job, &pools)).await?;
        }
        self.set_finalizer(false).await?;
        let (Some(ttl), Some(done)) = (
            self.job.spec.ttl_seconds_after_finished,
            status.completion_time.as_ref(),
        ) else {
            return Ok(Action::await_change());
        };
        let expires = done.0 + SignedDuration::from_secs(i64::from(ttl.max(0)));
        let left = expires.duration_since(Timestamp::now());
        if left.is_positive() {
            return Ok(Action::requeue(left.unsigned_abs()));
        }
        info!(
            ttl,
            "deleting the finished job: its ttlSecondsAfterFinished has passed"
        );
        delete(&self.api::<SwarmJob>(), &self.job.name_any()).await?;
        Ok(Action::await_change())
    }

    /// Makes the writes to the job's own pools; returns the pools it created.
    async fn write_pools(&self, writes: Vec<plan::PoolWrite>) -> Result<Vec<ModelPool>, Error> {
        let api = self.api::<ModelPool>();
        let mut created = Vec::new();
        for write in writes {
            match write {
                plan::PoolWrite::Create(want) => {
                    created.push(create(&api, &want).await?);
                    info!(pool = %want.name_any(), "created a job-scoped pool");
                }
                plan::PoolWrite::Apply(want) => apply(&api, &want).await?,
                plan::PoolWrite::Release(name) => {
                    delete(&api, &name).await?;
                    info!(pool = %name, "released a job-scoped pool");
                }
            }
        }
        Ok(created)
    }
}

/// The subagents a stored status says are planned: known once `Planned` is true.
fn planned(stored: &SwarmJobStatus, spec: &crate::api::SwarmJobSpec) -> Option<usize> {
    stored
        .conditions
        .iter()
        .any(|c| c.type_ == status::PLANNED && c.status == "True")
        .then_some(spec.fan_out.subagents.max(0) as usize)
}
