//! The children a SwarmJob owns besides its result: its job-scoped ModelPools. Pure.

use std::collections::BTreeMap;

use kube::ResourceExt;
use kube::api::ObjectMeta;

use super::pools::pool_object_name;
use crate::api::{JobPool, ModelPool, SwarmJob};
use crate::controllers::children;

/// The job a child belongs to.
pub const JOB_LABEL: &str = "kubeswarm.dev/swarm-job";

/// Labels of every child of the job.
pub fn job_labels(job: &SwarmJob) -> BTreeMap<String, String> {
    children::labels([(JOB_LABEL, job.name_any())])
}

/// The ModelPool `<job>-<name>` for one of `spec.pools`.
pub fn job_pool(job: &SwarmJob, pool: &JobPool) -> ModelPool {
    let mut object = ModelPool::new(&pool_object_name(job, &pool.name), pool.spec.clone());
    object.metadata = ObjectMeta {
        name: object.metadata.name,
        namespace: job.namespace(),
        labels: Some(job_labels(job)),
        owner_references: Some(vec![children::controller_owner(job)]),
        ..ObjectMeta::default()
    };
    object.metadata = children::with_hash(object.metadata, &pool.spec);
    object
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::SwarmJobSpec;
    use crate::controllers::children::built_hash;

    fn job(replicas: i32) -> SwarmJob {
        let spec: SwarmJobSpec = serde_yaml_ng::from_str(&format!(
            "task: t\nfanOut: {{pool: worker, subagents: 2}}\nverification: {{mode: none}}\naggregation: {{strategy: collect}}\npools:\n- name: worker\n  spec: {{model: {{source: pvc://w/g.gguf}}, replicas: {replicas}, queueName: team-a}}\n"
        ))
        .unwrap();
        let mut job = SwarmJob::new("review", spec);
        job.metadata.namespace = Some("team-a".to_owned());
        job.metadata.uid = Some("job-uid".to_owned());
        job
    }

    #[test]
    fn a_job_pool_is_named_after_the_job_owned_by_it_and_hashed_by_its_spec() {
        let job = job(2);
        let pool = job_pool(&job, &job.spec.pools[0]);
        assert_eq!(pool.name_any(), "review-worker");
        assert_eq!(pool.namespace().as_deref(), Some("team-a"));
        assert_eq!(pool.labels()[JOB_LABEL], "review");
        let owner = &pool.owner_references()[0];
        assert_eq!(
            (
                owner.kind.as_str(),
                owner.uid.as_str(),
                owner.controller,
                owner.block_owner_deletion
            ),
            ("SwarmJob", "job-uid", Some(true), Some(true))
        );
        assert_eq!(pool.spec.replicas, 2);
        assert_eq!(pool.spec.queue_name.as_deref(), Some("team-a"));
        let resized = job_pool(&job, &self::job(3).spec.pools[0]);
        assert_ne!(built_hash(&pool), built_hash(&resized));
        assert_eq!(
            built_hash(&pool),
            built_hash(&job_pool(&job, &job.spec.pools[0]))
        );
    }
}
