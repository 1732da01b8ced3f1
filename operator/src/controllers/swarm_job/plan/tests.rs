use super::*;
use crate::api::SwarmJobSpec;
use crate::pool_contract::{AVAILABLE, POOL_LABEL};
use k8s_openapi::api::core::v1::{PodCondition, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::ObjectMeta;

const KEY: &str = "operator-key";

/// A job that calls its own pool `worker` (`replicas` of them) and the shared pool `gate`.
fn job(replicas: i32) -> SwarmJob {
    let spec: SwarmJobSpec = serde_yaml_ng::from_str(&format!(
        "task: t\nfanOut: {{pool: worker, subagents: 2}}\nverification: {{pool: gate}}\naggregation: {{strategy: collect}}\npools:\n- name: worker\n  spec: {{model: {{source: pvc://w/g.gguf}}, replicas: {replicas}}}\n"
    ))
    .unwrap();
    let mut job = SwarmJob::new("review", spec);
    job.metadata.namespace = Some("team-a".to_owned());
    job.metadata.uid = Some("job-uid".to_owned());
    job
}

/// The job's own pool as the API server stores it.
fn stored(job: &SwarmJob) -> ModelPool {
    let mut pool = build::job_pool(job, &job.spec.pools[0]);
    pool.metadata.uid = Some("uid-review-worker".to_owned());
    pool
}

/// A shared pool that runs workers.
fn shared(name: &str) -> ModelPool {
    let mut pool = ModelPool::new(
        name,
        serde_yaml_ng::from_str("model: {source: pvc://w/g.gguf}").unwrap(),
    );
    pool.metadata.uid = Some(format!("uid-{name}"));
    pool.status = Some(crate::api::ModelPoolStatus {
        conditions: vec![Condition {
            type_: AVAILABLE.to_owned(),
            status: "False".to_owned(),
            reason: "NoReadyReplicas".to_owned(),
            message: "0 of 1 replicas ready".to_owned(),
            last_transition_time: Time(Timestamp::UNIX_EPOCH),
            observed_generation: None,
        }],
        ..Default::default()
    });
    pool
}

/// A ready worker pod of `pool`.
fn worker(pool: &ModelPool, ip: &str) -> Pod {
    let name = pool.name_any();
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("{name}-0")),
            labels: Some([(POOL_LABEL.to_owned(), name)].into()),
            owner_references: Some(vec![OwnerReference {
                uid: pool.uid().unwrap(),
                controller: Some(true),
                ..Default::default()
            }]),
            ..Default::default()
        },
        spec: None,
        status: Some(PodStatus {
            pod_ip: Some(ip.to_owned()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".to_owned(),
                status: "True".to_owned(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

fn created(write: &PoolWrite) -> &ModelPool {
    match write {
        PoolWrite::Create(pool) | PoolWrite::Apply(pool) => pool,
        PoolWrite::Release(name) => panic!("expected a pool, got a release of {name}"),
    }
}

#[test]
fn a_missing_pool_is_created_an_unchanged_one_left_and_a_changed_one_applied() {
    let job = job(2);
    let writes = pool_writes(&job, &[], false, 0);
    assert!(matches!(writes[..], [PoolWrite::Create(_)]), "{writes:?}");
    assert_eq!(created(&writes[0]).name_any(), "review-worker");
    assert_eq!(created(&writes[0]).spec.replicas, 2);

    assert_eq!(pool_writes(&job, &[stored(&job)], false, 0), vec![]);

    let resized = self::job(3);
    let writes = pool_writes(&resized, &[stored(&job)], false, 0);
    assert!(matches!(writes[..], [PoolWrite::Apply(_)]), "{writes:?}");
    assert_eq!(created(&writes[0]).spec.replicas, 3);
}

#[test]
fn another_objects_pool_of_the_same_name_is_never_written() {
    let job = job(2);
    let mut foreign = stored(&self::job(5));
    foreign.metadata.owner_references = None;
    assert_eq!(pool_writes(&job, &[foreign.clone()], false, 0), vec![]);
    assert_eq!(pool_writes(&job, &[foreign], true, 0), vec![]);
}

#[test]
fn a_suspended_job_releases_its_pools_only_once_no_call_is_in_flight() {
    let job = job(2);
    let existing = [stored(&job), shared("gate")];
    assert_eq!(pool_writes(&job, &existing, true, 3), vec![]);
    assert_eq!(
        pool_writes(&job, &existing, true, 0),
        vec![PoolWrite::Release("review-worker".to_owned())]
    );
    let mut going = stored(&job);
    going.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
    assert_eq!(pool_writes(&job, &[going], true, 0), vec![]);
}

#[test]
fn a_pool_that_lost_its_workers_gets_no_replicas_and_the_job_says_why() {
    let job = job(1);
    let own = stored(&job);
    let gate = shared("gate");
    let called = ["gate".to_owned(), "worker".to_owned()];
    let observed = Observed {
        pods: vec![worker(&own, "10.0.0.7"), worker(&gate, "10.0.0.9")],
        pools: vec![own.clone(), gate.clone()],
    };
    let (urls, waiting) = replicas(&job, &called, &observed, KEY);
    assert_eq!(urls["worker"], ["http://10.0.0.7:8000/v1"]);
    assert_eq!(urls["gate"], ["http://10.0.0.9:8000/v1"]);
    assert!(waiting.is_none());

    let preempted = Observed {
        pods: vec![worker(&own, "10.0.0.7")],
        pools: vec![own, gate],
    };
    let (urls, waiting) = replicas(&job, &called, &preempted, KEY);
    assert_eq!(urls["worker"], ["http://10.0.0.7:8000/v1"]);
    assert!(urls["gate"].is_empty());
    let waiting = waiting.expect("the job waits for the gate's workers");
    assert_eq!(
        waiting.reason,
        super::super::status::reason::POOL_UNAVAILABLE
    );
    assert_eq!(
        waiting.message,
        "ModelPool gate is not available: 0 of 1 replicas ready"
    );
}
