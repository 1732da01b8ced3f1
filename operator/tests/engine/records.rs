//! The records of a run: resuming without repeating a finished subagent, a result that
//! would outgrow a ConfigMap (resumed too), and records that are another job's.

use super::*;
use kubeswarm::swarm::record::StoreError;

/// FOUR, collected without a gate.
fn collected() -> String {
    FOUR.replace("{mode: adversarial, pool: gate}", "{mode: none}")
        .replace("synthesize", "collect")
}

#[tokio::test]
async fn a_resumed_run_never_repeats_or_recounts_a_finished_subagent() {
    let workers = Mock::start("m", |body, _| text(part(body))).await;
    let job = spec(&collected());
    // A run that stopped after two subagents finished and one had its output.
    let store = Memory::default();
    let finished = |index: usize, output: &str, stage: Stage| SubagentRecord {
        index,
        stage,
        subtask: None,
        output: output.to_owned(),
        prompt_tokens: 100,
        completion_tokens: 50,
        attempts: 1,
        finish_reason: None,
        confidence: None,
        verdict: (stage == Stage::Finished).then(|| VerdictRecord {
            pass: true,
            score: None,
            issues: vec![],
        }),
        repaired: false,
        error: None,
    };
    let earlier = BTreeMap::from([(
        "workers".to_owned(),
        Usage {
            calls: 3,
            prompt_tokens: 300,
            completion_tokens: 150,
        },
    )]);
    store
        .save(vec![
            (
                record::subagent_key(0),
                record::encode(&finished(0, "RED from before", Stage::Finished)),
            ),
            (
                record::subagent_key(2),
                record::encode(&finished(2, "BLUE from before", Stage::Finished)),
            ),
            (
                record::subagent_key(3),
                record::encode(&finished(3, "BLACK from before", Stage::Generated)),
            ),
            (record::USAGE.to_owned(), record::encode(&earlier)),
        ])
        .await
        .unwrap();
    let (outcome, log) = run_logged(
        &job,
        &pools(&[("workers", vec![workers.url.clone()])]),
        &store,
        fast(),
    )
    .await;
    assert_eq!(
        workers.requests().iter().map(part).collect::<Vec<_>>(),
        ["green"]
    );
    assert_eq!(
        log[..4],
        [
            "planned 4",
            "finished 0 passed=true",
            "finished 2 passed=true",
            "generated 3"
        ],
        "what was recorded before is reported first, so a status can count it"
    );
    let records = &outcome.checkpoint.subagents;
    assert_eq!(records[&0].output, "RED from before");
    assert_eq!(
        records[&3].output, "BLACK from before",
        "a recorded output is verified, not regenerated"
    );
    assert_eq!(records[&3].stage, Stage::Finished);
    assert_eq!(
        outcome.checkpoint.usage["workers"],
        Usage {
            calls: 4,
            prompt_tokens: 310,
            completion_tokens: 155
        }
    );
    assert_eq!(outcome.result.unwrap().0.chosen, [0, 1, 2, 3]);
    // A finished job run again makes no call at all, and reports what it recorded as a
    // resumed run does: the status of a job whose operator died after storing the result
    // and before writing the status still counts every subagent and the usage.
    let (again, log) = run_logged(
        &job,
        &pools(&[("workers", vec![workers.url.clone()])]),
        &store,
        fast(),
    )
    .await;
    assert_eq!(workers.count(), 1);
    assert_eq!(
        log,
        [
            "planned 4",
            "finished 0 passed=true",
            "finished 1 passed=true",
            "finished 2 passed=true",
            "finished 3 passed=true",
            "recorded workers=4"
        ]
    );
    assert_eq!(
        again.result.unwrap().1,
        store.0.lock().unwrap()[record::ANSWER]
    );
}

#[tokio::test]
async fn a_result_too_large_for_a_configmap_is_refused_not_truncated() {
    let workers = Mock::start("m", |_, _| text("x".repeat(4000))).await;
    let job = spec(&collected());
    let options = Options {
        max_result_bytes: 10_000,
        ..fast()
    };
    let outcome = run_with(
        &job,
        &pools(&[("workers", vec![workers.url.clone()])]),
        &Memory::default(),
        options,
    )
    .await;
    let failure = outcome.result.unwrap_err();
    assert_eq!(failure.reason, Reason::ResultTooLarge);
    assert!(
        failure
            .message
            .contains("over the 10000 a ConfigMap or Secret holds"),
        "{}",
        failure.message
    );
    for record in outcome.checkpoint.subagents.values() {
        assert_eq!(record.output.len(), 4000, "kept whole");
    }
}

#[tokio::test]
async fn a_resumed_run_counts_what_was_written_before_against_the_size_limit() {
    let workers = Mock::start("m", |_, _| text("x".repeat(1000))).await;
    let job = spec(&collected());
    // Four outputs of 1000 bytes fit in 10000 alone; not after the 8000 an earlier run
    // of the job wrote.
    let store = Memory::default();
    store
        .save(vec![("earlier-output.md".to_owned(), "y".repeat(8000))])
        .await
        .unwrap();
    let options = Options {
        max_result_bytes: 10_000,
        ..fast()
    };
    let outcome = run_with(
        &job,
        &pools(&[("workers", vec![workers.url.clone()])]),
        &store,
        options,
    )
    .await;
    let failure = outcome.result.unwrap_err();
    assert_eq!(failure.reason, Reason::ResultTooLarge, "{failure:?}");
}

#[tokio::test]
async fn another_jobs_plan_in_the_records_fails_the_job_instead_of_running_it() {
    let workers = Mock::start("m", |body, _| text(part(body))).await;
    let store = Memory::default();
    store
        .save(vec![(
            record::PLAN.to_owned(),
            record::encode(&vec!["one", "two", "three"]),
        )])
        .await
        .unwrap();
    let outcome = run_job(
        &spec(&FOUR.replace("synthesize", "collect")),
        &pools(&[("workers", vec![workers.url.clone()])]),
        &store,
    )
    .await;
    let failure = outcome.result.unwrap_err();
    assert_eq!(failure.reason, Reason::ForeignRecords);
    assert!(
        failure
            .message
            .contains("a plan of 3 subtasks and the job has 4"),
        "{}",
        failure.message
    );
    assert_eq!(workers.count(), 0, "no subagent ran on the wrong plan");
}

/// A store whose first `failures` writes fail, as a ConfigMap write does while the API
/// server restarts.
#[derive(Default)]
struct Flaky {
    memory: Memory,
    failures: std::sync::atomic::AtomicUsize,
}

impl Flaky {
    fn failing(failures: usize) -> Self {
        Self {
            failures: failures.into(),
            ..Self::default()
        }
    }

    fn failures_left(&self) -> usize {
        self.failures.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Store for Flaky {
    async fn load(&self) -> Result<BTreeMap<String, String>, StoreError> {
        self.memory.load().await
    }

    async fn save(&self, entries: Vec<(String, String)>) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        if self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(StoreError::backend("writing", "ConfigMap job-result")(
                std::io::Error::other("connection reset by peer"),
            ));
        }
        self.memory.save(entries).await
    }
}

#[tokio::test]
async fn a_store_that_fails_for_a_moment_costs_no_call_in_flight() {
    let workers = Mock::start("m", |body, _| text(part(body))).await;
    let store = Flaky::failing(3);
    let outcome = run_job(
        &spec(&collected()),
        &pools(&[("workers", vec![workers.url.clone()])]),
        &store,
    )
    .await;
    let (result, _) = outcome.result.expect("the job completes");
    assert_eq!(result.chosen, [0, 1, 2, 3]);
    assert_eq!(store.failures_left(), 0);
    assert_eq!(workers.count(), 4, "no subagent was called again");
}

/// Runs four subagents one at a time on `workers` with `store`, which must interrupt it.
async fn interrupted_on(workers: &Mock, store: &impl Store) -> kubeswarm::swarm::Interrupted {
    let pools = pools(&[("workers", vec![workers.url.clone()])]);
    let (_tx, suspended) = watch::channel(false);
    let job = spec(&collected().replace("subagents: 4", "subagents: 4, maxConcurrency: 1"));
    Job {
        name: "job",
        spec: &job,
        pools: &pools,
        store,
        observer: &Log::default(),
        started: Instant::now(),
        suspended,
        sandbox: &kubeswarm::local::sandbox::Subprocess::default(),
        options: fast(),
    }
    .execute()
    .await
    .expect_err("the store interrupts the run")
}

#[tokio::test]
async fn a_store_that_stays_down_interrupts_the_run_after_five_attempts() {
    let workers = Mock::start("m", |body, _| text(part(body))).await;
    let store = Flaky::failing(1000);
    let interrupted = interrupted_on(&workers, &store).await;
    assert_eq!(
        1000 - store.failures_left(),
        5,
        "five attempts at the first write"
    );
    let said = kubeswarm::telemetry::chain(&interrupted);
    assert!(
        said.contains("writing ConfigMap job-result: connection reset by peer"),
        "{said}"
    );
}

/// A store the API server refuses as too large, as it answers a ConfigMap past 1 MiB with
/// a 422.
#[derive(Default)]
struct Full {
    saves: std::sync::atomic::AtomicUsize,
}

impl Store for Full {
    async fn load(&self) -> Result<BTreeMap<String, String>, StoreError> {
        Ok(BTreeMap::new())
    }

    async fn save(&self, _: Vec<(String, String)>) -> Result<(), StoreError> {
        self.saves.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Err(StoreError::TooLarge {
            place: "ConfigMap job-result".to_owned(),
            message: "Too long: must have at most 1048576 bytes".to_owned(),
        })
    }
}

#[tokio::test]
async fn records_refused_as_too_large_fail_the_job_without_a_retry() {
    let workers = Mock::start("m", |body, _| text(part(body))).await;
    let store = Full::default();
    let job = spec(&collected().replace("subagents: 4", "subagents: 4, maxConcurrency: 1"));
    let outcome = run_job(
        &job,
        &pools(&[("workers", vec![workers.url.clone()])]),
        &store,
    )
    .await;
    let failure = outcome.result.expect_err("the job fails");
    assert_eq!(failure.reason, Reason::ResultTooLarge, "{failure:?}");
    assert!(
        failure
            .message
            .contains("Too long: must have at most 1048576 bytes")
            && failure.message.contains("lower spec.fanOut.maxTokens"),
        "{}",
        failure.message
    );
    // Written once, not five times, and no subagent is called after it: a refusal for
    // size is never retried into a loop, and a failed job stops its fan-out.
    assert_eq!(store.saves.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(workers.count(), 1);
}

/// A store another engine run has taken over after `allowed` writes, as a new leader's
/// engine takes a deposed leader's records.
struct Taken {
    memory: Memory,
    allowed: usize,
    saves: std::sync::atomic::AtomicUsize,
}

impl Store for Taken {
    async fn load(&self) -> Result<BTreeMap<String, String>, StoreError> {
        self.memory.load().await
    }

    async fn save(&self, entries: Vec<(String, String)>) -> Result<(), StoreError> {
        if self.saves.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= self.allowed {
            return Err(StoreError::Superseded {
                place: "ConfigMap job-result".to_owned(),
                writer: "0123456789abcdef".to_owned(),
            });
        }
        self.memory.save(entries).await
    }
}

#[tokio::test]
async fn an_engine_whose_records_were_taken_over_stops_at_once_without_retrying() {
    let workers = Mock::start("m", |body, _| text(part(body))).await;
    let store = Taken {
        memory: Memory::default(),
        allowed: 1,
        saves: 0.into(),
    };
    let interrupted = interrupted_on(&workers, &store).await;
    let said = kubeswarm::telemetry::chain(&interrupted);
    assert!(
        said.contains("written by another engine run now (writer 0123456789abcdef)"),
        "{said}"
    );
    // The plan written, the first subagent's record refused once: no retry, and no
    // subagent called after it.
    assert_eq!(store.saves.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(workers.count(), 1);
}
