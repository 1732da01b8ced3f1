//! The ModelPool controller: worker pods (admitted through Kueue when the pool names a
//! queue), their headless Service and NetworkPolicy, and a status that says what is wrong.
//!
//! Each reconcile is a pipeline. A pool that cannot run workers (external, invalid, a
//! missing PriorityClass or Kueue) only gets its status. Otherwise the Service and the
//! NetworkPolicy are applied when their build changed; then observe (the pool's pods,
//! Workloads and the flavors of the admitted ones), plan (pure, `plan`: the writes and
//! where each replica stands), make the writes, and write the status once (`status`). A child is identified by its
//! deterministic name and carries a hash of what it was built from: a changed hash
//! replaces it, an equal one is left alone, so a second reconcile of the same state writes
//! nothing.

pub mod build;
pub(crate) mod plan;
pub(crate) mod status;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::scheduling::v1::PriorityClass;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use thiserror::Error;
use tracing::Instrument;

use self::build::Settings;
use crate::api::{ExternalEndpoint, ModelPool, ModelPoolStatus};
use crate::conditions::{self, Desired};
use crate::controllers::children::{
    ApiError, Child, api_error, apply_if_changed, create, delete, write_status,
};
use crate::controllers::{Backoff, api_keys, key};
use crate::kueue::{self, ResourceFlavor, Workload};
use crate::metrics::Metrics;
use crate::pool_contract;
use crate::swarm::endpoint;

/// How often an external endpoint is probed, and a pool rechecked without any change.
const EXTERNAL_PROBE: Duration = Duration::from_secs(30);
const RESYNC: Duration = Duration::from_secs(300);
/// How long an external endpoint may take to answer the probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a pool whose child's name another object holds looks again.
const CONFLICT_RECHECK: Duration = Duration::from_secs(60);
/// How soon a pool read from a cache that was behind looks again.
const STALE_RECHECK: Duration = Duration::from_secs(1);
/// How often a pool whose queue needs a missing Kueue looks again.
const KUEUE_RECHECK: Duration = Duration::from_secs(60);

#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Api(#[from] ApiError),
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
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: kube::Client,
    pub settings: Settings,
    /// The client of external endpoints' probes: `tenancy::external_client`.
    pub http: reqwest::Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub backoff: Backoff,
}

/// The controller's entry point: one span, one timer, then the pipeline.
pub async fn reconcile(pool: Arc<ModelPool>, ctx: Arc<Context>) -> Result<Action, Error> {
    let span = tracing::info_span!("reconcile", kind = "ModelPool", namespace = %pool.namespace().unwrap_or_default(), name = %pool.name_any());
    let _timer = ctx.metrics.reconcile_timer("ModelPool");
    ctx.metrics.reconciled("ModelPool");
    let action = async { Reconciler::new(&pool, &ctx).run().await }
        .instrument(span)
        .await?;
    ctx.backoff.succeeded(&key(pool.as_ref()));
    Ok(action)
}

/// Transient errors back off per object; kube-runtime retries after the returned delay.
pub fn error_policy(pool: Arc<ModelPool>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.backoff.retry(
        &ctx.metrics,
        "ModelPool",
        &key(pool.as_ref()),
        error,
        error.is_conflict(),
        error.kind(),
    )
}

/// Where a reconcile leaves the pool: what its status says, and when to look again.
struct Report {
    conditions: Vec<Desired>,
    replicas: i32,
    ready: i32,
    next: Action,
}

impl Report {
    /// A pool that runs no workers now: external, or stopped before its first pod.
    fn no_workers(conditions: Vec<Desired>, next: Action) -> Self {
        Self {
            conditions,
            replicas: 0,
            ready: 0,
            next,
        }
    }
}

struct Reconciler<'a> {
    pool: &'a ModelPool,
    ctx: &'a Context,
    namespace: String,
}

impl<'a> Reconciler<'a> {
    fn new(pool: &'a ModelPool, ctx: &'a Context) -> Self {
        Self {
            pool,
            ctx,
            namespace: pool.namespace().unwrap_or_default(),
        }
    }

    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.ctx.client.clone(), &self.namespace)
    }

    /// Every way through the pipeline ends in one status write: `reconcile_children`
    /// decides what the status says, and when to look again.
    async fn run(&self) -> Result<Action, Error> {
        let Some(report) = self.reconcile_children().await? else {
            // The pool changed since the cache read it: its newer version comes next.
            return Ok(Action::requeue(STALE_RECHECK));
        };
        self.update_status(report.conditions, report.replicas, report.ready)
            .await?;
        Ok(report.next)
    }

    /// Makes the pool's children what its spec asks for, as far as it can, and says where
    /// the pool stands. Writes no status. None when the cached pool is older than the
    /// stored one and the plan would delete: nothing was written.
    async fn reconcile_children(&self) -> Result<Option<Report>, Error> {
        let settings = &self.ctx.settings;
        let denied = settings
            .tenancy
            .check(&self.pool.spec, &settings.worker_image);
        if !denied.is_empty() {
            // A change of the policy restarts the operator, which reconciles every pool.
            return Ok(Some(Report::no_workers(
                status::denied(&denied),
                Action::await_change(),
            )));
        }
        if let Some(external) = &self.pool.spec.external {
            let probe = self.probe_external(external).await;
            return Ok(Some(Report::no_workers(
                status::external(&external.url, &external.model, probe.err().as_ref()),
                Action::requeue(EXTERNAL_PROBE),
            )));
        }
        let template = match build::worker_template(self.pool, &self.ctx.settings) {
            Ok(template) => template,
            Err(invalid) => {
                return Ok(Some(Report::no_workers(
                    status::invalid(invalid.to_string()),
                    Action::await_change(),
                )));
            }
        };
        let priority = match &self.pool.spec.priority_class_name {
            None => None,
            Some(class) => match self.priority(class).await? {
                Some(value) => Some(value),
                // The PriorityClass watch wakes the pool when the class appears.
                None => {
                    return Ok(Some(Report::no_workers(
                        status::priority_class_missing(class),
                        Action::await_change(),
                    )));
                }
            },
        };
        let mut conflict = self.ensure(build::service(self.pool)).await?;
        if conflict.is_none() {
            conflict = self
                .ensure(build::network_policy(self.pool, &self.ctx.settings))
                .await?;
        }
        if let Some(conflict) = conflict {
            // Nothing of another's wakes the pool: it looks again now and then.
            return Ok(Some(Report::no_workers(
                status::name_conflict(&conflict),
                Action::requeue(CONFLICT_RECHECK),
            )));
        }

        let desired = plan::Blueprint {
            pool: self.pool,
            template: &template,
            priority,
        };
        let Some(observed) = self.observe(&desired).await? else {
            let queue = self.pool.spec.queue_name.as_deref().unwrap_or_default();
            return Ok(Some(Report::no_workers(
                status::kueue_missing(queue),
                Action::requeue(KUEUE_RECHECK),
            )));
        };
        let plan = plan::replicas(&desired, &observed, Timestamp::now());
        // Deletes are read again first: planned from a cached spec older than the stored
        // one (scaled back up, say), they would take away replicas it keeps.
        if plan.writes.iter().any(plan::Write::destroys) && self.changed_since_read().await? {
            return Ok(None);
        }
        for write in plan.writes {
            self.write(write).await?;
        }
        let replicas = self.pool.spec.replicas;
        let queued = self.pool.spec.queue_name.is_some();
        let (conditions, ready) = status::workers(replicas, queued, &plan.replicas);
        Ok(Some(Report {
            conditions,
            replicas,
            ready,
            next: Action::requeue(RESYNC),
        }))
    }

    /// Whether an external pool's endpoint serves its model, with its API key if it names one.
    async fn probe_external(&self, external: &ExternalEndpoint) -> Result<(), ProbeError> {
        let settings = &self.ctx.settings;
        let key = match &external.api_key_secret_ref {
            Some(reference) => Some(
                api_keys::read(
                    &self.ctx.client,
                    &self.namespace,
                    reference,
                    &settings.api_key_role,
                )
                .await?,
            ),
            None => None,
        };
        probe(
            &self.ctx.http,
            &external.url,
            key.as_deref(),
            &external.model,
            settings.models_limit,
        )
        .await
    }

    /// The pool's pods, its Workloads and the flavors they were admitted on; None when the
    /// pool names a queue and the cluster has no Kueue.
    async fn observe(
        &self,
        desired: &plan::Blueprint<'_>,
    ) -> Result<Option<plan::Observed>, Error> {
        let name = self.pool.name_any();
        let selector =
            ListParams::default().labels(&format!("{}={name}", pool_contract::POOL_LABEL));
        // Only what the pool controls is its own: a labelled pod of another's is neither
        // a replica nor deleted.
        let uid = self.uid();
        let mut observed = plan::Observed {
            pods: self
                .api::<Pod>()
                .list(&selector)
                .await
                .map_err(api_error("list", "Pod", &name))?
                .into_iter()
                .filter(|p| pool_contract::controlled_by(p, &uid))
                .map(|p| (p.name_any(), p))
                .collect(),
            ..plan::Observed::default()
        };
        if self.pool.spec.queue_name.is_none() {
            return Ok(Some(observed));
        }
        observed.workloads = match self.api::<Workload>().list(&selector).await {
            Ok(list) => list
                .into_iter()
                .filter(|w| pool_contract::controlled_by(w, &uid))
                .map(|w| (w.name_any(), w))
                .collect(),
            Err(err) if kueue::is_not_installed(&err) => return Ok(None),
            Err(err) => return Err(api_error("list", "Workload", &name)(err).into()),
        };
        let flavors: Api<ResourceFlavor> = Api::all(self.ctx.client.clone());
        for flavor in plan::flavors_to_read(desired, &observed) {
            let found =
                flavors
                    .get(&flavor)
                    .await
                    .map_err(api_error("get", "ResourceFlavor", &flavor))?;
            observed.flavors.insert(flavor, found);
        }
        Ok(Some(observed))
    }

    async fn write(&self, write: plan::Write) -> Result<(), Error> {
        match write {
            plan::Write::CreatePod(pod) => self.create(pod.as_ref()).await,
            plan::Write::DeletePod(name) => self.delete::<Pod>(&name).await,
            plan::Write::CreateWorkload(workload) => self.create(workload.as_ref()).await,
            plan::Write::DeleteWorkload(name) => self.delete::<Workload>(&name).await,
            plan::Write::WorkloadStatus {
                name,
                resource_version,
                status,
            } => {
                // A merge patch replaces the conditions list whole; the resourceVersion
                // makes the API server refuse it if Kueue changed the Workload since it
                // was read.
                let patch = json!({
                    "metadata": {"resourceVersion": resource_version},
                    "status": status,
                });
                self.api::<Workload>()
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map_err(api_error("patch status of", "Workload", &name))?;
                Ok(())
            }
        }
    }

    /// Whether the stored pool is not the one this reconcile read (changed, or gone).
    async fn changed_since_read(&self) -> Result<bool, Error> {
        let name = self.pool.name_any();
        let stored = self
            .api::<ModelPool>()
            .get_opt(&name)
            .await
            .map_err(api_error("get", "ModelPool", &name))?;
        Ok(stored.and_then(|p| p.resource_version()) != self.pool.resource_version())
    }

    /// The value of PriorityClass `class`, or None when there is no such class.
    async fn priority(&self, class: &str) -> Result<Option<i32>, Error> {
        let found = Api::<PriorityClass>::all(self.ctx.client.clone())
            .get_opt(class)
            .await
            .map_err(api_error("get", "PriorityClass", class))?;
        Ok(found.map(|c| c.value))
    }

    /// Creates or replaces a namespaced child whose build hash differs from what exists.
    /// Applies a child unless an object of its name exists that the pool does not
    /// control: that one is named, never taken over.
    async fn ensure<K: Child>(&self, want: K) -> Result<Option<String>, Error> {
        let name = want.name_any();
        let api = self.api::<K>();
        let kind = K::kind(&()).into_owned();
        let current = api
            .get_opt(&name)
            .await
            .map_err(api_error("get", &kind, &name))?;
        if let Some(current) = &current
            && !pool_contract::controlled_by(current, &self.uid())
        {
            return Ok(Some(format!("{kind} {name}")));
        }
        apply_if_changed(&api, current.as_ref(), &want).await?;
        Ok(None)
    }

    fn uid(&self) -> String {
        self.pool.metadata.uid.clone().unwrap_or_default()
    }

    async fn create<K: Child>(&self, object: &K) -> Result<(), Error> {
        create(&self.api::<K>(), object).await?;
        Ok(())
    }

    async fn delete<K: Child>(&self, name: &str) -> Result<(), Error> {
        delete(&self.api::<K>(), name).await?;
        Ok(())
    }

    /// Writes the status when it differs from the stored one, with an Event per condition
    /// transition.
    async fn update_status(
        &self,
        desired: Vec<Desired>,
        replicas: i32,
        ready: i32,
    ) -> Result<(), Error> {
        let old = self.pool.status.clone().unwrap_or_default();
        let generation = self.pool.metadata.generation;
        let conditions = conditions::merge(&old.conditions, &desired, generation, Timestamp::now());
        let new = ModelPoolStatus {
            conditions,
            replicas,
            ready_replicas: ready,
            workload: self
                .pool
                .spec
                .queue_name
                .as_ref()
                .map(|_| format!("{}={}", pool_contract::POOL_LABEL, self.pool.name_any())),
            observed_generation: generation,
        };
        let written = write_status(
            &self.api::<ModelPool>(),
            self.pool,
            self.pool.resource_version(),
            &self.ctx.recorder,
            &old,
            &new,
            &desired,
        )
        .await?;
        if written.is_some() {
            self.ctx.metrics.pool_conditions(
                &self.namespace,
                &self.pool.name_any(),
                &new.conditions,
            );
        }
        Ok(())
    }
}

/// The pools that name PriorityClass `class`, to reconcile when it appears or changes.
pub fn pools_naming<'a>(
    class: &'a PriorityClass,
    pools: impl IntoIterator<Item = Arc<ModelPool>> + 'a,
) -> impl Iterator<Item = ObjectRef<ModelPool>> + 'a {
    let name = class.name_any();
    pools
        .into_iter()
        .filter(move |pool| pool.spec.priority_class_name.as_ref() == Some(&name))
        .map(|pool| ObjectRef::from_obj(pool.as_ref()))
}

/// Why an external pool's endpoint cannot serve its jobs.
#[derive(Debug, Error)]
pub enum ProbeError {
    #[error(transparent)]
    Key(#[from] api_keys::KeyError),
    #[error(transparent)]
    Unreachable(#[from] endpoint::ModelsError),
    #[error("{url} does not serve {model} (it serves: {}): fix spec.external.model", served_list(.served))]
    NotServed {
        url: String,
        model: String,
        served: Vec<String>,
    },
}

fn served_list(served: &[String]) -> String {
    if served.is_empty() {
        "nothing".to_owned()
    } else {
        served.join(", ")
    }
}

/// Asks an OpenAI-compatible endpoint whether it serves `model`.
async fn probe(
    http: &reqwest::Client,
    url: &str,
    api_key: Option<&str>,
    model: &str,
    limit: usize,
) -> Result<(), ProbeError> {
    let served = endpoint::served_models(http, url, api_key, PROBE_TIMEOUT, limit).await?;
    if served.iter().any(|m| m == model) {
        return Ok(());
    }
    Err(ProbeError::NotServed {
        url: url.to_owned(),
        model: model.to_owned(),
        served,
    })
}
