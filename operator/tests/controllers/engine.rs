//! The swarm engine as the SwarmJob controller runs it: on the cluster's result store
//! (here on an API server that keeps objects), calling one pool of workers, with fast
//! retries.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kubeswarm::api::SwarmJob;
use kubeswarm::controllers::swarm_job::store::{ResultStore, Results};
use kubeswarm::swarm::pool::{Pool, Server};
use kubeswarm::swarm::{Event, Interrupted, Job, Observer, Options, Outcome};
use kubeswarm_test_support::mock::Mock;
use tokio::sync::watch;

use crate::objects::Objects;

struct Quiet;

impl Observer for Quiet {
    fn event(&self, _: Event<'_>) {}
}

/// Runs `job` to its end, its only pool `workers` being `workers`, its records in `objects`.
/// A future: dropping it mid-await stops the engine dead.
pub(crate) async fn execute(
    job: &SwarmJob,
    objects: &Objects,
    workers: &Mock,
) -> Result<Outcome, Interrupted> {
    let store = ResultStore::new(objects.client(), job, &Results::default());
    let pools: BTreeMap<String, Arc<Pool>> = [(
        "workers".to_owned(),
        Arc::new(Pool::new(
            "workers",
            "m",
            Server::Worker,
            std::slice::from_ref(&workers.url),
            reqwest::Client::new(),
        )),
    )]
    .into();
    let (_tx, suspended) = watch::channel(false);
    let sandbox = kubeswarm::local::sandbox::Subprocess::default();
    Job {
        name: "job",
        spec: &job.spec,
        pools: &pools,
        store: &store,
        observer: &Quiet,
        started: Instant::now(),
        suspended,
        sandbox: &sandbox,
        options: Options {
            backoff_base: Duration::from_millis(2),
            backoff_cap: Duration::from_millis(10),
            ..Options::default()
        },
    }
    .execute()
    .await
}
