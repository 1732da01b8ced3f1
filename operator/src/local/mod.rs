//! Local mode, `kubeswarm run FILE.yaml`: a SwarmJob manifest run on one machine with no
//! cluster, by the same engine the operator runs.
//!
//! Layer: the top, beside `controllers` (neither imports the other); uses the engine and
//! the layers below it.

mod model;
mod output;
mod progress;
pub mod sandbox;
mod store;
mod worker;

pub use model::{Known, ModelError, fetch};
pub use worker::WorkerError;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::ResourceExt;

use crate::api::SwarmJob;
use crate::swarm::pool::{Pool, Server};
use crate::swarm::{self, Job, Options, endpoint};

/// What `kubeswarm run` was asked.
#[derive(Debug, Clone)]
pub struct Args {
    pub manifest: PathBuf,
    /// Pools served by existing OpenAI-compatible endpoints (base URL ending in `/v1`).
    pub external: Vec<(String, String)>,
    /// The models local workers serve: for one pool (`Some(pool)`) or for every pool
    /// (`None`); a pool with neither gets the default model.
    pub models: Vec<(Option<String>, PathBuf)>,
    pub worker: Option<PathBuf>,
    pub out: PathBuf,
    /// Continue from the records of an earlier run of the same job.
    pub resume: bool,
    /// Caps every subagent's `maxTokens` and the synthesis's `aggregation.maxTokens`, for a
    /// quick run on a small machine.
    pub max_tokens: Option<i32>,
    /// The Python of `tests` checks.
    pub python: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("{file}: {why}")]
    Manifest { file: String, why: String },
    #[error("{file}: SwarmJob {name} is invalid:\n  - {}", messages.join("\n  - "))]
    Invalid {
        file: String,
        name: String,
        messages: Vec<String>,
    },
    #[error(
        "the inference-worker binary was not found next to kubeswarm or on the PATH: build it with `make build`, or pass --worker PATH"
    )]
    NoWorker,
    #[error("--model names pool {pool}, and the job calls only {calls}: use one of those names")]
    UnknownPool { pool: String, calls: String },
    #[error("the default model")]
    Model(#[from] model::ModelError),
    #[error("the worker for pool {pool}")]
    Worker {
        pool: String,
        #[source]
        source: worker::WorkerError,
    },
    #[error("pool {pool} at {url}")]
    External {
        pool: String,
        url: String,
        #[source]
        source: EndpointError,
    },
    #[error("writing {path}")]
    Output {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Interrupted(#[from] swarm::Interrupted),
    #[error("job {name} failed: {failure}")]
    Failed {
        name: String,
        failure: swarm::Failure,
    },
}

/// Reads the one SwarmJob in a manifest and checks it as the API server would: the
/// schema's types through deserialization, then every CEL rule of the CRD, with the
/// same messages.
pub fn load(path: &Path) -> Result<SwarmJob, LocalError> {
    let file = path.display().to_string();
    let bad = |why: String| LocalError::Manifest {
        file: file.clone(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let mut jobs = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(&text) {
        let value: serde_json::Value =
            serde::Deserialize::deserialize(document).map_err(|e| bad(format!("not YAML: {e}")))?;
        if value.is_null() {
            continue;
        }
        if value["kind"] == "SwarmJob" {
            if value["apiVersion"] != "kubeswarm.dev/v1alpha1" {
                return Err(bad(format!(
                    "apiVersion {} is not served: use kubeswarm.dev/v1alpha1",
                    value["apiVersion"]
                )));
            }
            jobs.push(value);
        }
    }
    let value = match jobs.len() {
        1 => jobs.remove(0),
        0 => {
            return Err(bad(
                "has no SwarmJob (kind: SwarmJob, apiVersion: kubeswarm.dev/v1alpha1)".into(),
            ));
        }
        n => return Err(bad(format!("has {n} SwarmJobs: run one at a time"))),
    };
    let job: SwarmJob =
        serde_json::from_value(value).map_err(|e| bad(format!("not a valid SwarmJob: {e}")))?;
    let mut messages = Vec::new();
    let name = job.name_any();
    // The name becomes a folder under --out that a fresh run empties first: a name the
    // API server would refuse ("..", "/etc", "") could point that at any folder.
    if !object_name(&name) {
        messages.push(format!(
            "metadata.name {name:?} is not a Kubernetes object name: use lowercase letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters"
        ));
    }
    if let Err(errors) = kube::core::cel::validate_cel(&job) {
        messages.extend(errors.into_vec().into_iter().map(|e| e.message));
    }
    if !messages.is_empty() {
        return Err(LocalError::Invalid {
            file,
            name,
            messages,
        });
    }
    Ok(job)
}

/// A DNS-1123 subdomain, what the API server accepts as a custom object's name.
fn object_name(name: &str) -> bool {
    let label = |l: &str| {
        let b = l.as_bytes();
        !b.is_empty()
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            && b[0] != b'-'
            && b[b.len() - 1] != b'-'
    };
    !name.is_empty() && name.len() <= 253 && name.split('.').all(label)
}

/// Runs a manifest to its result; returns the folder the result is in.
pub async fn run(args: Args) -> Result<PathBuf, LocalError> {
    let mut job = load(&args.manifest)?;
    if let Some(cap) = args.max_tokens {
        job.spec.fan_out.max_tokens = job.spec.fan_out.max_tokens.min(cap);
        let aggregation = &mut job.spec.aggregation.max_tokens;
        *aggregation = Some(aggregation.map_or(cap, |limit| limit.min(cap)));
    }
    let used = swarm::pools_used(&job.spec);
    if let Some(pool) = args
        .models
        .iter()
        .filter_map(|(name, _)| name.as_ref())
        .find(|name| !used.contains(name))
    {
        return Err(LocalError::UnknownPool {
            pool: pool.clone(),
            calls: used.join(", "),
        });
    }
    let name = job.name_any();
    let dir = args.out.join(&name);
    let view = progress::View::new();
    let output_error = |path: &Path, e: std::io::Error| LocalError::Output {
        path: path.display().to_string(),
        source: e,
    };
    if !args.resume && dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| output_error(&dir, e))?;
    }
    std::fs::create_dir_all(&dir).map_err(|e| output_error(&dir, e))?;

    let http = endpoint::http_client();
    let mut workers = Vec::new();
    let mut pools = BTreeMap::new();
    for pool in swarm::pools_used(&job.spec) {
        // Endpoints named with --pool may be any OpenAI-compatible server: no grammars.
        let (url, server, token) = match args.external.iter().find(|(name, _)| *name == pool) {
            Some((_, url)) => (url.trim_end_matches('/').to_owned(), Server::OpenAi, None),
            None => {
                let chosen = args
                    .models
                    .iter()
                    .find(|(name, _)| name.as_deref() == Some(pool.as_str()))
                    .or_else(|| args.models.iter().find(|(name, _)| name.is_none()));
                let model = match chosen {
                    Some((_, model)) => model.clone(),
                    None => model::fetch(Known::default(), &|line| view.say(line))?,
                };
                let binary = worker::binary(args.worker.as_deref())?;
                view.say(&format!(
                    "pool {pool}: starting an inference-worker on {}",
                    model.display()
                ));
                let log = dir.join(format!("worker-{pool}.log"));
                let worker = worker::Worker::start(&binary, &model, &pool, log).await?;
                let (url, token) = (worker.url.clone(), worker.token.clone());
                workers.push(worker);
                (url, Server::Worker, Some(token))
            }
        };
        let served = served_model(&http, &pool, &url, token.as_deref()).await?;
        view.say(&format!("pool {pool}: {url} serves {served}"));
        pools.insert(
            pool.clone(),
            Arc::new(Pool::with_api_key(
                &pool,
                &served,
                server,
                &[url],
                http.clone(),
                token,
            )),
        );
    }

    let store = store::Files::new(dir.join("records"));
    let (_suspend, suspended) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let outcome = Job {
        name: &name,
        spec: &job.spec,
        pools: &pools,
        store: &store,
        observer: &view,
        started,
        suspended,
        sandbox: &sandbox::Subprocess::new(args.python.clone()),
        options: Options::default(),
    }
    .execute()
    .await?;
    drop(workers);
    view.finish();
    let cut = output::truncated_outputs(&outcome);
    if cut > 0 {
        view.say(&format!(
            "{cut} of {} outputs were cut off at spec.fanOut.maxTokens",
            outcome.checkpoint.subagents.len()
        ));
    }
    if let Ok((result, _)) = &outcome.result
        && result.truncated()
    {
        view.say(&format!(
            "the answer was cut off at its token limit ({}): answer.md says so",
            result.limit_field()
        ));
    }
    output::write(&dir, &job, &outcome, started.elapsed()).map_err(|e| output_error(&dir, e))?;
    match outcome.result {
        Ok(_) => Ok(dir),
        Err(failure) => Err(LocalError::Failed { name, failure }),
    }
}

/// Why an endpoint given with `--pool` cannot serve its pool.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error(transparent)]
    Models(#[from] endpoint::ModelsError),
    #[error("it serves {} models ({}), and none is named {pool}", served.len(), served.join(", "))]
    NoSuchModel { pool: String, served: Vec<String> },
}

/// The model an endpoint serves, from its `/models`: the pool's name when it serves that
/// (kubeswarm workers do), else its only model.
async fn served_model(
    http: &reqwest::Client,
    pool: &str,
    url: &str,
    token: Option<&str>,
) -> Result<String, LocalError> {
    let fail = |source: EndpointError| LocalError::External {
        pool: pool.to_owned(),
        url: url.to_owned(),
        source,
    };
    let ids = endpoint::served_models(
        http,
        url,
        token,
        Duration::from_secs(10),
        endpoint::MAX_MODELS_BYTES,
    )
    .await
    .map_err(|err| fail(err.into()))?;
    if ids.iter().any(|id| id == pool) {
        return Ok(pool.to_owned());
    }
    match ids.as_slice() {
        [only] => Ok(only.clone()),
        _ => Err(fail(EndpointError::NoSuchModel {
            pool: pool.to_owned(),
            served: ids,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::object_name;

    #[test]
    fn only_kubernetes_object_names_name_an_output_folder() {
        for good in ["a", "gallery", "job-1", "a.b", "x".repeat(253).as_str()] {
            assert!(object_name(good), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "/etc",
            "a/b",
            "A",
            "-a",
            "a-",
            "a..b",
            ".a",
            "a.",
            "a b",
            "é",
            &"x".repeat(254),
        ] {
            assert!(!object_name(bad), "{bad}");
        }
    }
}
