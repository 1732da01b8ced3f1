//! The ModelPool controller: worker pods (admitted through Kueue when the pool names a
//! queue), their headless Service and NetworkPolicy, and a status that says what is wrong.
//!
//! Each reconcile reads the pool's children, builds what they should be (`build`), writes
//! only the differences, and derives the status (`status`). A child is identified by its
//! deterministic name and carries a hash of what it was built from: a changed hash
//! replaces it, an equal one is left alone, so a second reconcile of the same state writes
//! nothing.

pub mod build;
pub mod status;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::scheduling::v1::PriorityClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use thiserror::Error;
use tracing::{Instrument, warn};

use self::build::Settings;
use self::status::Replica;
use crate::api::{ModelPool, ModelPoolStatus};
use crate::conditions::{self, Desired};
use crate::controllers::children::{
    ApiError, Child, api_error, apply_if_changed, apply_status, built_hash, create, delete,
};
use crate::controllers::{Backoff, key};
use crate::kueue::{self, Admission, Placement, ResourceFlavor, Workload};
use crate::metrics::Metrics;
use crate::pool_contract;

/// How often an external endpoint is probed, and a pool rechecked without any change.
const EXTERNAL_PROBE: Duration = Duration::from_secs(30);
const RESYNC: Duration = Duration::from_secs(300);
/// How often a pool whose queue needs a missing Kueue looks again.
const KUEUE_RECHECK: Duration = Duration::from_secs(60);

#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Api(#[from] ApiError),
}

impl Error {
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
    let delay = ctx.backoff.failed(&key(pool.as_ref()));
    warn!(pool = %key(pool.as_ref()), error = %crate::telemetry::chain(error), retry_in = ?delay, "reconcile failed");
    ctx.metrics.reconcile_failed("ModelPool", error.kind());
    Action::requeue(delay)
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

    async fn run(&self) -> Result<Action, Error> {
        if let Some(external) = &self.pool.spec.external {
            let probe = probe(&self.ctx.http, &external.url, &external.model).await;
            self.update_status(
                status::external(&external.url, &external.model, probe),
                0,
                0,
            )
            .await?;
            return Ok(Action::requeue(EXTERNAL_PROBE));
        }
        let template = match build::worker_template(self.pool, &self.ctx.settings) {
            Ok(template) => template,
            Err(invalid) => {
                self.update_status(status::invalid(invalid.to_string()), 0, 0)
                    .await?;
                return Ok(Action::await_change());
            }
        };
        let priority = match &self.pool.spec.priority_class_name {
            None => None,
            Some(class) => match self.priority(class).await? {
                Some(value) => Some(value),
                None => {
                    // The PriorityClass watch wakes the pool when the class appears.
                    self.update_status(status::priority_class_missing(class), 0, 0)
                        .await?;
                    return Ok(Action::await_change());
                }
            },
        };
        self.ensure(build::service(self.pool)).await?;
        self.ensure(build::network_policy(self.pool, &self.ctx.settings))
            .await?;

        let name = self.pool.name_any();
        let selector =
            ListParams::default().labels(&format!("{}={name}", pool_contract::POOL_LABEL));
        let pods: BTreeMap<String, Pod> = self
            .api::<Pod>()
            .list(&selector)
            .await
            .map_err(api_error("list", "Pod", &name))?
            .into_iter()
            .map(|p| (p.name_any(), p))
            .collect();
        let desired = self.pool.spec.replicas;
        let queue = self.pool.spec.queue_name.as_deref();
        let workloads: BTreeMap<String, Workload> = match queue {
            None => BTreeMap::new(),
            Some(queue) => match self.api::<Workload>().list(&selector).await {
                Ok(list) => list.into_iter().map(|w| (w.name_any(), w)).collect(),
                Err(err) if kueue::is_not_installed(&err) => {
                    self.update_status(status::kueue_missing(queue), 0, 0)
                        .await?;
                    return Ok(Action::requeue(KUEUE_RECHECK));
                }
                Err(err) => return Err(api_error("list", "Workload", &name)(err).into()),
            },
        };

        // Replicas admitted on the same flavor share one read of it.
        let mut flavors = BTreeMap::new();
        let mut replicas = Vec::new();
        for index in 0..desired {
            let replica_name = build::replica_name(self.pool, index);
            let pod = pods.get(&replica_name);
            let admission = match queue {
                None => Admission::Direct,
                Some(_) => {
                    let want = build::workload(self.pool, &template, index, priority);
                    self.sync_workload(want, workloads.get(&replica_name), pod)
                        .await?
                }
            };
            let health = match &admission {
                Admission::Direct | Admission::Admitted => {
                    let placement = match workloads.get(&replica_name) {
                        Some(wl) => self.placement(wl, &mut flavors).await?,
                        None => Placement::default(),
                    };
                    let want = build::pod(self.pool, &template, index, &placement);
                    self.sync_pod(want, pod).await?
                }
                Admission::Waiting(_) | Admission::Evicted { .. } => None,
            };
            replicas.push(Replica {
                name: replica_name,
                admission,
                pod: health,
            });
        }
        // Replicas past spec.replicas: a scale-down. Their Workloads go with them, so the
        // quota returns to the queue.
        for (pod_name, _) in pods.iter().filter(|(_, p)| beyond(*p, desired)) {
            self.delete::<Pod>(pod_name).await?;
        }
        for (wl_name, _) in workloads.iter().filter(|(_, w)| beyond(*w, desired)) {
            self.delete::<Workload>(wl_name).await?;
        }
        let (conditions, ready) = status::workers(desired, queue.is_some(), &replicas);
        self.update_status(conditions, desired, ready).await?;
        Ok(Action::requeue(RESYNC))
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
    async fn ensure<K: Child>(&self, want: K) -> Result<(), Error> {
        let name = want.name_any();
        let api = self.api::<K>();
        let kind = K::kind(&()).into_owned();
        let current = api
            .get_opt(&name)
            .await
            .map_err(api_error("get", &kind, &name))?;
        apply_if_changed(&api, current.as_ref(), &want).await?;
        Ok(())
    }

    /// Keeps replica `want`'s Workload as built, and reads where it stands with Kueue.
    async fn sync_workload(
        &self,
        want: Workload,
        current: Option<&Workload>,
        pod: Option<&Pod>,
    ) -> Result<Admission, Error> {
        let name = want.name_any();
        let Some(current) = current.filter(|c| built_hash(*c) == built_hash(&want)) else {
            // Kueue refuses changes to the pod sets of an admitted Workload: a changed
            // template is a new Workload, queued again.
            if current.is_some() {
                if pod.is_some() {
                    self.delete::<Pod>(&name).await?;
                }
                self.delete::<Workload>(&name).await?;
            }
            self.create(&want).await?;
            return Ok(Admission::Waiting(
                "the Workload was just created; Kueue has not looked at it yet".to_owned(),
            ));
        };
        let admission = kueue::admission_state(current);
        match &admission {
            Admission::Evicted { .. } => {
                // Kueue's protocol: stop the pods, then give the admission back so the
                // workload that evicted this one gets the quota.
                if pod.is_some() {
                    self.delete::<Pod>(&name).await?;
                } else if current
                    .status
                    .as_ref()
                    .is_some_and(|s| s.admission.is_some())
                {
                    self.patch_workload_status(
                        current,
                        kueue::release_admission(current, Timestamp::now()),
                    )
                    .await?;
                }
            }
            Admission::Admitted => {
                let ready = pod.is_some_and(|p| pool_contract::pod_health(p).ready);
                if kueue::pods_ready(current) != Some(ready) {
                    self.patch_workload_status(
                        current,
                        kueue::report_pods_ready(current, ready, Timestamp::now()),
                    )
                    .await?;
                }
            }
            Admission::Waiting(_) | Admission::Direct => {
                if pod.is_some() {
                    self.delete::<Pod>(&name).await?;
                }
            }
        }
        Ok(admission)
    }

    /// The admitted flavors' node labels and tolerations; `read` keeps the flavors read so
    /// far in this reconcile.
    async fn placement(
        &self,
        workload: &Workload,
        read: &mut BTreeMap<String, ResourceFlavor>,
    ) -> Result<Placement, Error> {
        let api: Api<ResourceFlavor> = Api::all(self.ctx.client.clone());
        let mut placement = Placement::default();
        for name in kueue::admitted_flavors(workload) {
            if !read.contains_key(&name) {
                let found =
                    api.get(&name)
                        .await
                        .map_err(api_error("get", "ResourceFlavor", &name))?;
                read.insert(name.clone(), found);
            }
            kueue::add_flavor(&mut placement, &read[&name]);
        }
        Ok(placement)
    }

    /// Creates replica `want`'s pod if it is missing, or deletes it to be created again
    /// when its spec changed (pod specs are immutable). Returns how the pod is doing.
    async fn sync_pod(
        &self,
        want: Pod,
        current: Option<&Pod>,
    ) -> Result<Option<pool_contract::PodHealth>, Error> {
        let name = want.name_any();
        match current {
            Some(pod) if built_hash(pod) == built_hash(&want) => {
                Ok(Some(pool_contract::pod_health(pod)))
            }
            Some(_) => {
                self.delete::<Pod>(&name).await?;
                Ok(None)
            }
            None => {
                self.create(&want).await?;
                Ok(Some(pool_contract::PodHealth {
                    ready: false,
                    failure: None,
                }))
            }
        }
    }

    async fn create<K: Child>(&self, object: &K) -> Result<(), Error> {
        create(&self.api::<K>(), object).await?;
        Ok(())
    }

    async fn delete<K: Child>(&self, name: &str) -> Result<(), Error> {
        delete(&self.api::<K>(), name).await?;
        Ok(())
    }

    async fn patch_workload_status(
        &self,
        current: &Workload,
        status: serde_json::Value,
    ) -> Result<(), Error> {
        let name = current.name_any();
        // A merge patch replaces the conditions list whole; the resourceVersion makes the
        // API server refuse it if Kueue changed the Workload since it was read.
        let patch = json!({
            "metadata": {"resourceVersion": current.resource_version()},
            "status": status,
        });
        self.api::<Workload>()
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(api_error("patch status of", "Workload", &name))?;
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
        // merge keeps transition times when nothing changed, so an unchanged status
        // compares equal and is not written.
        if old == new {
            return Ok(());
        }
        let name = self.pool.name_any();
        apply_status(&self.api::<ModelPool>(), &name, &new).await?;
        for changed in conditions::transitions(&old.conditions, &new.conditions) {
            self.publish(changed).await;
        }
        self.ctx
            .metrics
            .pool_conditions(&self.namespace, &name, &new.conditions);
        Ok(())
    }

    async fn publish(&self, condition: &Condition) {
        let bad = (condition.type_ == status::DEGRADED && condition.status == "True")
            || (condition.type_ == pool_contract::AVAILABLE && condition.status == "False");
        conditions::publish(
            &self.ctx.recorder,
            &self.pool.object_ref(&()),
            condition,
            bad,
        )
        .await;
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

/// A child whose replica label is at or past `replicas`.
fn beyond<K: Resource>(child: &K, replicas: i32) -> bool {
    child
        .meta()
        .labels
        .as_ref()
        .and_then(|l| l.get(build::REPLICA_LABEL))
        .and_then(|i| i.parse::<i32>().ok())
        .is_some_and(|index| index >= replicas)
}

/// Asks an OpenAI-compatible endpoint whether it serves `model`.
async fn probe(http: &reqwest::Client, url: &str, model: &str) -> Result<(), String> {
    let models_url = format!("{}/models", url.trim_end_matches('/'));
    let response = http
        .get(&models_url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|err| format!("GET {models_url}: {err}"))?;
    if !response.status().is_success() {
        return Err(format!("GET {models_url}: HTTP {}", response.status()));
    }
    let body: serde_json::Value = response
        .json()
        .await
        .map_err(|err| format!("GET {models_url}: not an OpenAI model list: {err}"))?;
    let served: Vec<&str> = body["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["id"].as_str())
        .collect();
    if served.contains(&model) {
        Ok(())
    } else {
        Err(format!(
            "{url} does not serve {model} (it serves: {}): fix spec.external.model",
            if served.is_empty() {
                "nothing".to_owned()
            } else {
                served.join(", ")
            }
        ))
    }
}
