//! Which endpoints serve the pools a SwarmJob calls. Pure: from the job, the ModelPools
//! and the worker pods in its namespace. A pool that is missing or has no ready worker
//! makes the job wait with a reason, not fail.

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use super::status::reason;
use crate::api::{CacheSalt, ModelPool, SecretKeyReference, SwarmJob};
use crate::pool_contract;
use crate::swarm::pool::Server;
use crate::swarm::pools_used;
use crate::tenancy::Policy;

/// A pool the engine can call: the model name its servers expect and their base URLs.
#[derive(Clone, Debug, PartialEq)]
pub struct Endpoints {
    /// The name the job uses for the pool.
    pub name: String,
    pub model: String,
    pub server: Server,
    pub urls: Vec<String>,
    /// The Secret key holding an external pool's API key, read when the job starts.
    pub api_key: Option<SecretKeyReference>,
    /// The bearer token of a pool's own workers.
    pub token: Option<String>,
    /// The `cache_salt` of an external pool that asks for one.
    pub cache_salt: Option<String>,
}

/// Why a job cannot call its pools yet.
#[derive(Clone, Debug, PartialEq)]
pub struct Waiting {
    /// `PoolNotFound` or `PoolUnavailable`.
    pub reason: &'static str,
    pub message: String,
}

/// Why the job's own pools (`spec.pools`) may not be created, if the tenancy policy
/// refuses any: the job waits for an edit, and none of its pools is created.
pub fn denied(job: &SwarmJob, policy: &Policy, worker_image: &str) -> Option<Waiting> {
    let denied: Vec<String> = job
        .spec
        .pools
        .iter()
        .enumerate()
        .flat_map(|(i, entry)| {
            policy
                .check(&entry.spec, worker_image)
                .into_iter()
                .map(move |d| format!("spec.pools[{i}].{d}"))
        })
        .collect();
    (!denied.is_empty()).then(|| Waiting {
        reason: reason::POLICY_DENIED,
        message: format!("refused by the tenancy policy: {}", denied.join("; ")),
    })
}

/// The ModelPool behind a name the job uses: `<job>-<name>` for a job-scoped pool.
pub fn pool_object_name(job: &SwarmJob, name: &str) -> String {
    if job.spec.pools.iter().any(|p| p.name == name) {
        format!("{}-{name}", job.name_any())
    } else {
        name.to_owned()
    }
}

/// Every pool the job calls, with its ready endpoints, or why the job waits.
pub fn resolve(
    job: &SwarmJob,
    pools: &[ModelPool],
    pods: &[Pod],
    worker_key: &str,
) -> Result<Vec<Endpoints>, Waiting> {
    pools_used(&job.spec)
        .into_iter()
        .map(|name| endpoints(job, &name, pools, pods, worker_key))
        .collect()
}

/// The ready endpoints of the pool the job calls `name`, or why there are none.
pub fn endpoints(
    job: &SwarmJob,
    name: &str,
    pools: &[ModelPool],
    pods: &[Pod],
    worker_key: &str,
) -> Result<Endpoints, Waiting> {
    let namespace = job.namespace().unwrap_or_default();
    let object = pool_object_name(job, name);
    let pool = pools.iter().find(|p| p.name_any() == object).ok_or_else(|| Waiting {
        reason: reason::POOL_NOT_FOUND,
        message: format!(
            "the job calls pool {name}, and namespace {namespace} has no ModelPool {object}: create it, or fix the pool name in the job"
        ),
    })?;
    // A job-scoped pool is the job's only if the job controls it: a ModelPool that
    // happens to have its name is someone else's, and gets none of the job's prompts.
    if object != name
        && !pool_contract::controlled_by(pool, job.metadata.uid.as_deref().unwrap_or_default())
    {
        return Err(Waiting {
            reason: reason::NAME_CONFLICT,
            message: format!(
                "ModelPool {object} exists and is not this job's: rename the pool in spec.pools, or delete {object}"
            ),
        });
    }
    let available = pool_contract::available(pool);
    let unavailable = |detail: String| Waiting {
        reason: reason::POOL_UNAVAILABLE,
        message: format!("ModelPool {object} is not available: {detail}"),
    };
    if let Some(external) = &pool.spec.external {
        // Only a probe of this very spec counts: an edited URL is not called before the
        // ModelPool controller has checked it against the tenancy policy and probed it.
        let current = |c: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition| {
            c.observed_generation == pool.metadata.generation
        };
        return match available {
            Some(c) if !current(c) => Err(unavailable(
                "its endpoint has not been probed since its last change".to_owned(),
            )),
            Some(c) if c.status == "True" => Ok(Endpoints {
                name: name.to_owned(),
                model: external.model.clone(),
                server: Server::OpenAi,
                urls: vec![external.url.clone()],
                api_key: external.api_key_secret_ref.clone(),
                token: None,
                cache_salt: (external.cache_salt == Some(CacheSalt::Namespace))
                    .then(|| pool_contract::cache_salt(worker_key.as_bytes(), &namespace)),
            }),
            Some(c) => Err(unavailable(c.message.clone())),
            None => Err(unavailable(
                "its endpoint has not been probed yet".to_owned(),
            )),
        };
    }
    let urls: Vec<String> = pods
        .iter()
        .filter_map(|p| pool_contract::ready_worker_url(p, pool))
        .collect();
    if urls.is_empty() {
        let why = available
            .map(|c| c.message.clone())
            .unwrap_or_else(|| "no worker is ready yet".to_owned());
        return Err(unavailable(why));
    }
    Ok(Endpoints {
        name: name.to_owned(),
        model: object,
        server: Server::Worker,
        urls,
        api_key: None,
        token: Some(pool_contract::worker_token(worker_key.as_bytes(), pool)),
        cache_salt: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ModelPoolSpec, SwarmJobSpec};
    use crate::pool_contract::{AVAILABLE, POOL_LABEL};
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use kube::api::ObjectMeta;

    fn job(extra: &str) -> SwarmJob {
        let spec: SwarmJobSpec = serde_yaml_ng::from_str(&format!(
            "task: Review.\nfanOut: {{pool: worker, subagents: 2}}\nverification: {{pool: gate}}\naggregation: {{strategy: synthesize}}\n{extra}"
        ))
        .unwrap();
        let mut job = SwarmJob::new("review", spec);
        job.metadata.namespace = Some("team-a".to_owned());
        job.metadata.uid = Some("job-uid".to_owned());
        job
    }

    /// A controller owner reference to the object with `uid`.
    fn controller(uid: &str) -> Option<Vec<OwnerReference>> {
        Some(vec![OwnerReference {
            uid: uid.to_owned(),
            controller: Some(true),
            ..Default::default()
        }])
    }

    fn pool(name: &str, spec: &str, available: Option<(&str, &str)>) -> ModelPool {
        let mut pool = ModelPool::new(
            name,
            serde_yaml_ng::from_str::<ModelPoolSpec>(spec).unwrap(),
        );
        pool.metadata.uid = Some(format!("uid-{name}"));
        // A job's own pool is controlled by its job.
        if name.starts_with("review-") {
            pool.metadata.owner_references = controller("job-uid");
        }
        pool.status = available.map(|(status, message)| crate::api::ModelPoolStatus {
            conditions: vec![Condition {
                type_: AVAILABLE.to_owned(),
                status: status.to_owned(),
                reason: "r".to_owned(),
                message: message.to_owned(),
                last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
                observed_generation: None,
            }],
            ..Default::default()
        });
        pool
    }

    fn pod(pool: &str, index: u8, ready: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(format!("{pool}-{index}")),
                labels: Some([(POOL_LABEL.to_owned(), pool.to_owned())].into()),
                owner_references: controller(&format!("uid-{pool}")),
                ..Default::default()
            },
            spec: None,
            status: Some(PodStatus {
                pod_ip: Some(format!("10.0.0.{index}")),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".to_owned(),
                    status: if ready { "True" } else { "False" }.to_owned(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    const WORKERS: &str = "model: {source: pvc://w/g.gguf}";
    const KEY: &str = "operator-key";
    const EXTERNAL: &str = "external: {url: 'http://vllm:8000/v1', model: llama}";

    #[test]
    fn ready_workers_and_available_external_pools_resolve() {
        let pools = [
            pool("worker", WORKERS, Some(("True", ""))),
            pool("gate", EXTERNAL, Some(("True", ""))),
        ];
        let pods = [
            pod("worker", 0, true),
            pod("worker", 1, false),
            pod("worker", 2, true),
            pod("gate-x", 0, true),
        ];
        let resolved = resolve(&job(""), &pools, &pods, KEY).unwrap();
        assert_eq!(
            resolved,
            [
                Endpoints {
                    name: "worker".to_owned(),
                    model: "worker".to_owned(),
                    server: Server::Worker,
                    urls: vec![
                        "http://10.0.0.0:8000/v1".to_owned(),
                        "http://10.0.0.2:8000/v1".to_owned()
                    ],
                    api_key: None,
                    token: Some(pool_contract::worker_token(KEY.as_bytes(), &pools[0])),
                    cache_salt: None,
                },
                Endpoints {
                    name: "gate".to_owned(),
                    model: "llama".to_owned(),
                    server: Server::OpenAi,
                    urls: vec!["http://vllm:8000/v1".to_owned()],
                    api_key: None,
                    token: None,
                    cache_salt: None,
                },
            ]
        );
    }

    #[test]
    fn a_missing_pool_names_itself_and_the_fix() {
        let waiting = resolve(
            &job(""),
            &[pool("worker", WORKERS, None)],
            &[pod("worker", 0, true)],
            KEY,
        )
        .unwrap_err();
        assert_eq!(waiting.reason, "PoolNotFound");
        assert!(
            waiting.message.contains("no ModelPool gate: create it"),
            "{}",
            waiting.message
        );
    }

    #[test]
    fn a_pool_without_ready_workers_waits_with_its_own_message() {
        let pools = [
            pool("worker", WORKERS, Some(("False", "0 of 2 workers ready"))),
            pool("gate", EXTERNAL, Some(("True", ""))),
        ];
        let waiting = resolve(&job(""), &pools, &[pod("worker", 0, false)], KEY).unwrap_err();
        assert_eq!(waiting.reason, "PoolUnavailable");
        assert_eq!(
            waiting.message,
            "ModelPool worker is not available: 0 of 2 workers ready"
        );
    }

    #[test]
    fn job_scoped_pools_are_found_under_the_jobs_name() {
        let scoped = job("pools:\n- name: worker\n  spec: {model: {source: pvc://w/g.gguf}}\n");
        assert_eq!(pool_object_name(&scoped, "worker"), "review-worker");
        assert_eq!(pool_object_name(&scoped, "gate"), "gate");
        let pools = [
            pool("review-worker", WORKERS, Some(("True", ""))),
            pool("gate", EXTERNAL, Some(("True", ""))),
        ];
        let resolved = resolve(&scoped, &pools, &[pod("review-worker", 3, true)], KEY).unwrap();
        assert_eq!(resolved[0].model, "review-worker");
        assert_eq!(resolved[0].urls, ["http://10.0.0.3:8000/v1"]);
    }

    #[test]
    fn only_what_the_pool_or_job_controls_gets_prompts() {
        // A ready pod labelled as a replica, made by someone else: not a replica.
        let mut foreign = pod("worker", 7, true);
        foreign.metadata.owner_references = None;
        let pools = [
            pool("worker", WORKERS, Some(("True", ""))),
            pool("gate", EXTERNAL, Some(("True", ""))),
        ];
        let resolved = resolve(
            &job(""),
            &pools,
            &[foreign.clone(), pod("worker", 1, true)],
            KEY,
        )
        .unwrap();
        assert_eq!(resolved[0].urls, ["http://10.0.0.1:8000/v1"]);
        let waiting = resolve(&job(""), &pools, &[foreign], KEY).unwrap_err();
        assert_eq!(waiting.reason, "PoolUnavailable");

        // A ModelPool with the name of the job's own pool, made by someone else.
        let scoped = job("pools:\n- name: worker\n  spec: {model: {source: pvc://w/g.gguf}}\n");
        let mut squatter = pool("review-worker", WORKERS, Some(("True", "")));
        squatter.metadata.owner_references = None;
        let waiting = resolve(
            &scoped,
            &[squatter, pool("gate", EXTERNAL, Some(("True", "")))],
            &[pod("review-worker", 3, true)],
            KEY,
        )
        .unwrap_err();
        assert_eq!(waiting.reason, "NameConflict");
        assert_eq!(
            waiting.message,
            "ModelPool review-worker exists and is not this job's: rename the pool in spec.pools, or delete review-worker"
        );
    }

    #[test]
    fn an_external_pool_that_asks_for_it_gets_its_namespaces_cache_salt() {
        let salted = "external: {url: 'http://vllm:8000/v1', model: llama, cacheSalt: Namespace}";
        let pools = [
            pool("worker", WORKERS, Some(("True", ""))),
            pool("gate", salted, Some(("True", ""))),
        ];
        let resolved = resolve(&job(""), &pools, &[pod("worker", 0, true)], KEY).unwrap();
        let salt = resolved[1].cache_salt.clone().unwrap();
        assert_eq!(salt, pool_contract::cache_salt(KEY.as_bytes(), "team-a"));
        assert_ne!(salt, pool_contract::cache_salt(KEY.as_bytes(), "team-b"));
        assert_ne!(
            salt,
            pool_contract::cache_salt(b"another operator", "team-a")
        );
        assert_eq!(
            resolved[0].cache_salt, None,
            "the pool's own workers serve one tenant"
        );
    }

    #[test]
    fn an_external_pool_is_called_only_once_its_current_spec_was_checked() {
        // Available from a probe of generation 1; the URL was edited since (generation 2).
        let mut edited = pool("gate", EXTERNAL, Some(("True", "")));
        edited.metadata.generation = Some(2);
        if let Some(status) = edited.status.as_mut() {
            status.conditions[0].observed_generation = Some(1);
        }
        let pools = [pool("worker", WORKERS, Some(("True", ""))), edited];
        let waiting = resolve(&job(""), &pools, &[pod("worker", 0, true)], KEY).unwrap_err();
        assert_eq!(waiting.reason, "PoolUnavailable");
        assert!(
            waiting
                .message
                .ends_with("has not been probed since its last change"),
            "{}",
            waiting.message
        );
    }
}
