//! The operator: the ModelPool and SwarmJob controllers behind a leader Lease, with
//! /metrics and probes.
//!
//! Layer: the top, beside `local` (neither imports the other); uses every layer below.

pub(crate) mod api_keys;
pub(crate) mod children;
pub mod leader;
pub mod model_pool;
pub mod swarm_job;

/// The one field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "kubeswarm";

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::scheduling::v1::PriorityClass;
use kube::api::Api;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::api::{ModelPool, SwarmJob};
use crate::kueue::Workload;
use crate::metrics::Metrics;
use crate::tenancy::{self, Policy};

/// How the operator runs.
pub struct Args {
    pub metrics_addr: SocketAddr,
    pub worker_image: String,
    pub leader_election_namespace: String,
    /// This replica's name in the Lease: its pod name in a cluster.
    pub identity: String,
    /// Labels of the operator's pods, which the workers' NetworkPolicy admits.
    pub operator_labels: BTreeMap<String, String>,
    /// What tenants' pools may ask for.
    pub tenancy: Policy,
    /// The ClusterRole that grants reads of external pools' API keys, per namespace.
    pub api_key_role: String,
    /// The key each pool's worker token is derived from.
    pub worker_key: String,
    /// Where each namespace's SwarmJob results are kept.
    pub results: swarm_job::store::Results,
    /// The most of an external endpoint's model list that is read.
    pub models_limit: usize,
    /// The most of one completion response that is read.
    pub response_limit: usize,
    /// What the pods of `tests` checks run, and their limits.
    pub tests: swarm_job::sandbox::Settings,
}

#[derive(Debug, Error)]
pub enum RunError {
    #[error("connecting to the Kubernetes API")]
    Client(#[source] kube::Error),
    #[error("serving metrics on {addr}")]
    Metrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The name of the Lease the replicas compete for.
const LEASE_NAME: &str = "kubeswarm-operator";

/// Runs the operator until SIGTERM. It leads while it holds the leader Lease; a replica
/// that loses it (another took it, or an API-server outage outlasted its claim) stops
/// every controller and engine, then waits for the Lease again like any standby, instead
/// of exiting: a restart would gain nothing, and an outage would crash-loop every replica.
pub async fn run(args: Args) -> Result<(), RunError> {
    let client = kube::Client::try_default()
        .await
        .map_err(RunError::Client)?;
    let metrics = Arc::new(Metrics::default());
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .map_err(|source| RunError::Metrics {
            addr: args.metrics_addr,
            source,
        })?;
    tokio::spawn(serve_metrics(listener, metrics.clone()));

    let elector = leader::Elector::new(
        client.clone(),
        &args.leader_election_namespace,
        LEASE_NAME,
        args.identity.clone(),
    );
    loop {
        info!(identity = %args.identity, "waiting for the leader Lease");
        tokio::select! {
            () = elector.acquire(leader::LEASE_DURATION / 3) => {}
            () = terminated() => return Ok(()),
        }
        metrics.leadership_gained();
        tokio::select! {
            () = lead(&client, &args, &metrics) => return Ok(()),
            lost = elector.keep() => {
                metrics.leadership_lost();
                warn!(error = %crate::telemetry::chain(&lost), "lost the leadership: every controller and engine has stopped");
            }
        }
    }
}

/// Waits for SIGTERM or SIGINT. The controllers watch for them too while they run; this
/// covers the time a standby waits for the Lease, once their handlers have replaced the
/// default action.
async fn terminated() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler installs");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Both controllers, with state of their own (caches, backoffs, the jobs' engines), until
/// a signal stops them. Dropping this future stops them and every engine at once.
async fn lead(client: &kube::Client, args: &Args, metrics: &Arc<Metrics>) {
    let client = client.clone();
    let metrics = metrics.clone();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "kubeswarm".to_owned(),
            instance: Some(args.identity.clone()),
        },
    );
    let worker_image = args.worker_image.clone();
    let external_http = tenancy::external_client(&args.tenancy.external);
    let ctx = Arc::new(model_pool::Context {
        client: client.clone(),
        settings: model_pool::build::Settings {
            worker_image: worker_image.clone(),
            operator_namespace: args.leader_election_namespace.clone(),
            operator_labels: args.operator_labels.clone(),
            tenancy: args.tenancy.clone(),
            api_key_role: args.api_key_role.clone(),
            worker_key: args.worker_key.clone(),
            models_limit: args.models_limit,
        },
        http: external_http.clone(),
        recorder: recorder.clone(),
        metrics: metrics.clone(),
        backoff: Backoff::default(),
    });
    let (key, value) = children::MANAGED_BY;
    let children = watcher::Config::default().labels(&format!("{key}={value}"));
    let controller = Controller::new(
        Api::<ModelPool>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(Api::<Pod>::all(client.clone()), children.clone())
    .owns(Api::<Service>::all(client.clone()), children.clone())
    .owns(Api::<NetworkPolicy>::all(client.clone()), children.clone());
    let known = controller.store();
    let mut controller = controller.watches(
        Api::<PriorityClass>::all(client.clone()),
        watcher::Config::default(),
        move |class| model_pool::pools_naming(&class, known.state()).collect::<Vec<_>>(),
    );
    if kueue_served(&client).await {
        controller = controller.owns(Api::<Workload>::all(client.clone()), children);
    } else {
        info!(
            "Kueue's Workload API is not served: pools with spec.queueName report KueueNotInstalled"
        );
    }
    let pools = controller
        .shutdown_on_signal()
        .run(model_pool::reconcile, model_pool::error_policy, ctx)
        .for_each(|result| async move {
            if let Err(err) = result {
                warn!(err = %crate::telemetry::chain(&err), "controller");
            }
        });
    let jobs = swarm_jobs(client, recorder, metrics, external_http, args, worker_image);
    futures::future::join(pools, jobs).await;
}

/// How many SwarmJob reconciles run at once. Each holds the namespace's ModelPools and
/// worker pods while it runs: unbounded, a burst of 1,000 new jobs took the operator to
/// 772 MiB (`make bench-operator`).
const SWARM_JOB_RECONCILES: u16 = 16;

/// How long the SwarmJob controller gathers triggers of one job before reconciling it.
/// Short: every new job's first reconcile waits for it. At 500 ms, apply → first call took
/// 0.53 s at 5 jobs/s (the Job controller's apply → Pod: 4 ms); with none, the echoes of a
/// reconcile's own writes (finalizer, status, milliseconds apart) each made a reconcile of
/// their own, from a cache not yet at the second write: a burst of 1,000 jobs cost 5.3
/// reconciles and 0.8 finalizer conflicts per job instead of 3.0 and none, and took 52 s
/// instead of 30 (`make bench-operator`).
const SWARM_JOB_DEBOUNCE: std::time::Duration = std::time::Duration::from_millis(100);

/// The SwarmJob controller: woken by its jobs, by changes to the ModelPools they call,
/// and by their engines' progress, which each run folds into a wake per half second
/// (`engine::PROGRESS_FOLD`).
async fn swarm_jobs(
    client: kube::Client,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    external_http: reqwest::Client,
    args: &Args,
    worker_image: String,
) {
    let (wake, woken) = futures::channel::mpsc::unbounded();
    let ctx = Arc::new(swarm_job::Context {
        client: client.clone(),
        http: crate::swarm::endpoint::worker_client(&args.identity),
        external_http,
        tenancy: args.tenancy.clone(),
        api_key_role: args.api_key_role.clone(),
        worker_key: args.worker_key.clone(),
        results: args.results.clone(),
        response_limit: args.response_limit,
        tests: args.tests.clone(),
        worker_image,
        recorder,
        metrics,
        backoff: Backoff::default(),
        runs: swarm_job::runs::Runs::default(),
        wake,
        options: crate::swarm::Options::default(),
    });
    let controller = Controller::new(
        Api::<SwarmJob>::all(client.clone()),
        watcher::Config::default(),
    )
    .with_config(
        kube::runtime::controller::Config::default()
            .debounce(SWARM_JOB_DEBOUNCE)
            .concurrency(SWARM_JOB_RECONCILES),
    );
    let jobs = controller.store();
    controller
        .watches(
            Api::<ModelPool>::all(client),
            watcher::Config::default(),
            move |pool| swarm_job::jobs_calling(&pool, jobs.state()).collect::<Vec<_>>(),
        )
        .reconcile_on(woken)
        .shutdown_on_signal()
        .run(swarm_job::reconcile, swarm_job::error_policy, ctx)
        .for_each(|result| async move {
            if let Err(err) = result {
                warn!(err = %crate::telemetry::chain(&err), "controller");
            }
        })
        .await;
}

async fn kueue_served(client: &kube::Client) -> bool {
    use kube::Resource;
    let group = Workload::group(&());
    match client
        .list_api_group_resources(&format!("{group}/{}", Workload::version(&())))
        .await
    {
        Ok(list) => list.resources.iter().any(|r| r.name == "workloads"),
        Err(_) => false,
    }
}

async fn serve_metrics(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.render(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }));
    if let Err(err) = axum::serve(listener, app).await {
        warn!(%err, "metrics server stopped");
    }
}

/// `namespace/name`: how the logs and the backoff name an object.
pub(crate) fn key(object: &impl kube::Resource) -> String {
    format!(
        "{}/{}",
        kube::ResourceExt::namespace(object).unwrap_or_default(),
        kube::ResourceExt::name_any(object)
    )
}

/// Per-object backoff after failed reconciles: 5 s, doubling to at most 5 minutes, and
/// forgotten after a success, so one broken object neither spins nor delays the others.
///
/// A conditional write that met a newer object (409) is no failure: the read was only
/// behind. The reconcile looks again within `AFTER_CONFLICT` (the newer object's watch
/// event usually brings it back sooner) and the backoff does not grow, up to
/// `MAX_CONFLICTS` in a row; past that the object changes faster than it can be read (or
/// the cache is stuck) and conflicts back off as failures do.
#[derive(Default)]
pub struct Backoff {
    failures: std::sync::Mutex<std::collections::HashMap<String, u32>>,
    conflicts: std::sync::Mutex<std::collections::HashMap<String, u32>>,
}

impl Backoff {
    const FIRST: std::time::Duration = std::time::Duration::from_secs(5);
    const MAX: std::time::Duration = std::time::Duration::from_secs(300);
    pub const AFTER_CONFLICT: std::time::Duration = std::time::Duration::from_secs(1);
    pub const MAX_CONFLICTS: u32 = 10;

    /// The delay before the next attempt at `key`, after one more failure.
    pub fn failed(&self, key: &str) -> std::time::Duration {
        let mut failures = self.failures.lock().expect("backoff lock");
        let n = failures.entry(key.to_owned()).or_insert(0);
        *n = n.saturating_add(1);
        Self::FIRST
            .saturating_mul(1 << (*n - 1).min(16))
            .min(Self::MAX)
    }

    /// The delay before the next attempt at `key`, after its write met a newer object, and
    /// whether it is past `MAX_CONFLICTS` in a row (then it is the failure backoff's).
    pub fn conflicted(&self, key: &str) -> (std::time::Duration, bool) {
        let n = {
            let mut conflicts = self.conflicts.lock().expect("backoff lock");
            let n = conflicts.entry(key.to_owned()).or_insert(0);
            *n = n.saturating_add(1);
            *n
        };
        if n > Self::MAX_CONFLICTS {
            (self.failed(key), true)
        } else {
            (Self::AFTER_CONFLICT, false)
        }
    }

    /// The next attempt at the object `key` of `kind` after its reconcile failed with
    /// `error`: soon after a write met a newer object, backing off after a real failure
    /// (and after too many conflicts in a row). Logged and counted here, once for both
    /// controllers.
    pub fn retry(
        &self,
        metrics: &Metrics,
        kind: &str,
        key: &str,
        error: &dyn std::error::Error,
        conflict: bool,
        error_kind: &str,
    ) -> kube::runtime::controller::Action {
        let error = crate::telemetry::chain(error);
        let delay = if conflict {
            let (delay, persistent) = self.conflicted(key);
            if persistent {
                warn!(kind, object = %key, %error, retry_in = ?delay, "writes keep meeting newer objects");
            } else {
                debug!(kind, object = %key, %error, retry_in = ?delay, "a write met a newer object; reading again");
            }
            metrics.reconcile_failed(kind, "Conflict");
            delay
        } else {
            let delay = self.failed(key);
            warn!(kind, object = %key, %error, retry_in = ?delay, "reconcile failed");
            metrics.reconcile_failed(kind, error_kind);
            delay
        };
        kube::runtime::controller::Action::requeue(delay)
    }

    pub fn succeeded(&self, key: &str) {
        self.failures.lock().expect("backoff lock").remove(key);
        self.conflicts.lock().expect("backoff lock").remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::Backoff;
    use std::time::Duration;

    #[test]
    fn backoff_doubles_per_object_up_to_five_minutes_and_resets_on_success() {
        let backoff = Backoff::default();
        let delays: Vec<u64> = (0..8)
            .map(|_| backoff.failed("team-a/gemma").as_secs())
            .collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(
            backoff.failed("team-b/other"),
            Duration::from_secs(5),
            "other objects are not delayed"
        );
        backoff.succeeded("team-a/gemma");
        assert_eq!(backoff.failed("team-a/gemma"), Duration::from_secs(5));
    }

    #[test]
    fn conflicts_retry_in_a_second_until_too_many_in_a_row_then_back_off() {
        let backoff = Backoff::default();
        for _ in 0..Backoff::MAX_CONFLICTS {
            assert_eq!(
                backoff.conflicted("team-a/review"),
                (Duration::from_secs(1), false)
            );
        }
        assert_eq!(
            backoff.conflicted("team-a/review"),
            (Duration::from_secs(5), true)
        );
        assert_eq!(
            backoff.conflicted("team-a/review"),
            (Duration::from_secs(10), true)
        );
        backoff.succeeded("team-a/review");
        assert_eq!(
            backoff.conflicted("team-a/review"),
            (Duration::from_secs(1), false)
        );
    }
}
