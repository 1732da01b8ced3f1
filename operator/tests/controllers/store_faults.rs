//! The engine checkpointing through the cluster's result store while the API server fails
//! a share of its writes: no job is lost, none loops, and the calls wasted are counted.

use std::time::Duration;

use kubeswarm::api::{SwarmJob, SwarmJobSpec};
use kubeswarm::swarm::Reason;
use kubeswarm_test_support::mock::{Mock, part, text};

use crate::engine::execute;
use crate::objects::Objects;

const JOBS: usize = 20;
const SUBAGENTS: usize = 4;
const PERCENT: u64 = 5;

fn job(index: usize) -> SwarmJob {
    let spec: SwarmJobSpec = serde_yaml_ng::from_str(&format!(
        "task: Describe a colour.\nsubtasks: [red, green, blue, black]\nfanOut: {{pool: workers, subagents: {SUBAGENTS}, maxTokens: 64, timeoutSeconds: 5, retries: 2}}\nverification: {{mode: none}}\naggregation: {{strategy: collect}}\n"
    ))
    .unwrap();
    let mut job = SwarmJob::new(&format!("job-{index}"), spec);
    job.metadata.namespace = Some(crate::harness::NS.to_owned());
    job.metadata.uid = Some(format!("uid-{index}"));
    job
}

/// How the jobs ended when `PERCENT`% of the writes failed with `code`.
#[derive(Debug, Default)]
struct Tally {
    completed: usize,
    too_large: usize,
    interrupted: usize,
    injected: usize,
    calls: usize,
}

async fn run_jobs(code: u16) -> Tally {
    let workers = Mock::start("m", |body, _| text(part(body))).await;
    let objects = Objects::failing(PERCENT, code, 2026 + u64::from(code));
    let mut tally = Tally::default();
    for index in 0..JOBS {
        let job = job(index);
        let ended =
            tokio::time::timeout(Duration::from_secs(30), execute(&job, &objects, &workers))
                .await
                .unwrap_or_else(|_| panic!("job {index} looped on {code}s"));
        match ended {
            Ok(outcome) => match outcome.result {
                Ok((result, _)) => {
                    assert_eq!(result.chosen.len(), SUBAGENTS, "job {index}");
                    tally.completed += 1;
                }
                Err(failure) if failure.reason == Reason::ResultTooLarge => tally.too_large += 1,
                Err(failure) => panic!("job {index} failed on {code}s: {failure:?}"),
            },
            Err(interrupted) => {
                eprintln!("job {index}: {}", kubeswarm::telemetry::chain(&interrupted));
                tally.interrupted += 1;
            }
        }
    }
    tally.injected = objects.injected();
    tally.calls = workers.count();
    eprintln!(
        "{code} at {PERCENT}%: {tally:?}; {} calls for {} subagents",
        tally.calls,
        JOBS * SUBAGENTS
    );
    tally
}

#[tokio::test]
async fn conflicts_throttling_and_server_errors_lose_no_job_and_waste_no_call() {
    for code in [409, 429, 500] {
        let tally = run_jobs(code).await;
        assert!(
            tally.injected >= 5,
            "{code}: too few faults to mean anything: {tally:?}"
        );
        assert_eq!(tally.completed, JOBS, "{code}: {tally:?}");
        assert_eq!(
            tally.calls,
            JOBS * SUBAGENTS,
            "{code}: a subagent was called again"
        );
    }
}

#[tokio::test]
async fn a_refusal_for_size_fails_its_job_at_once_and_stops_its_calls() {
    let tally = run_jobs(422).await;
    assert!(tally.injected >= 3, "{tally:?}");
    // Each 422 ends one job (the API server says the records can never fit), never a loop.
    assert_eq!(tally.too_large, tally.injected, "{tally:?}");
    assert_eq!(tally.completed + tally.too_large, JOBS, "{tally:?}");
    assert_eq!(tally.interrupted, 0, "{tally:?}");
    assert!(tally.calls <= JOBS * SUBAGENTS, "{tally:?}");
}
