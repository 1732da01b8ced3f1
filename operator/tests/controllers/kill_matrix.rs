//! The kill matrix: an engine stopped dead at each boundary of its checkpoints, then a new
//! engine resuming from what the API server kept. Stopped dead means its future dropped
//! mid-await, as SIGKILL drops the process: nothing it held in memory survives, only the
//! records in the result ConfigMap (the real store, on an API server that keeps objects).
//! Six kills at each side of a checkpoint write (each write of the run), five during
//! aggregation and five after the result. The e2e suite SIGKILLs the real process at five
//! boundaries, five times each (`an_operator_killed_at_each_boundary_resumes`); this covers
//! each write of the run.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kubeswarm::api::{SwarmJob, SwarmJobSpec};
use kubeswarm::controllers::swarm_job::store::{ResultStore, Results};
use kubeswarm::swarm::Outcome;
use kubeswarm::swarm::record::{self, Store};
use kubeswarm_test_support::mock::{Mock, Reply, is_synthesis, part, text};

use crate::engine::execute;
use crate::objects::Objects;

const SUBTASKS: [&str; 4] = ["red", "green", "blue", "black"];

fn job() -> SwarmJob {
    let spec: SwarmJobSpec = serde_yaml_ng::from_str(
        "task: Describe a colour.\nsubtasks: [red, green, blue, black]\nfanOut: {pool: workers, subagents: 4, maxConcurrency: 1, maxTokens: 64, timeoutSeconds: 5}\nverification: {mode: none}\naggregation: {strategy: synthesize, pool: workers}\n",
    )
    .unwrap();
    let mut job = SwarmJob::new("colours", spec);
    job.metadata.namespace = Some(crate::harness::NS.to_owned());
    job.metadata.uid = Some("colours-uid".to_owned());
    job
}

/// Where the engine is stopped.
#[derive(Clone, Copy, Debug)]
enum Boundary {
    /// A call has returned; its record's write never reaches the API server.
    BeforeCheckpoint,
    /// The record is stored; the engine dies before it hears so (before any status).
    AfterCheckpoint,
    /// The synthesis call is in flight.
    DuringAggregation,
    /// The result is stored and the engine has ended; the controller dies before it
    /// writes the status and lets go of the finalizer.
    AfterResult,
}

/// Calls the workers received, by subtask ("synthesis" for the aggregation).
fn calls(workers: &Mock) -> BTreeMap<String, u64> {
    let mut calls = BTreeMap::new();
    for body in workers.requests() {
        let key = if is_synthesis(&body) {
            "synthesis".to_owned()
        } else {
            part(&body)
        };
        *calls.entry(key).or_default() += 1;
    }
    calls
}

/// Runs one engine on `objects` until it ends, or until `stop` says to stop it dead.
async fn engine(objects: &Objects, workers: &Mock, stop: impl Fn() -> bool) -> Option<Outcome> {
    let job = job();
    let run = execute(&job, objects, workers);
    tokio::pin!(run);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        tokio::select! {
            ended = &mut run => return Some(ended.expect("the records are written")),
            () = tokio::time::sleep(Duration::from_millis(1)) => {
                if stop() {
                    // Dropped here, mid-await: the kill.
                    return None;
                }
                assert!(Instant::now() < deadline, "the engine neither ended nor was stopped");
            }
        }
    }
}

/// Kills an engine at `boundary` (the `nth` write, where the boundary is a write), resumes
/// it, and checks what the resumed engine called and recorded.
async fn kill_and_resume(boundary: Boundary, nth: usize) {
    let workers = Mock::start("m", |body, _| {
        if is_synthesis(body) {
            // Long enough to be caught in flight.
            Reply::After(Duration::from_millis(300), Box::new(text("merged")))
        } else {
            text(format!("{} light", part(body)))
        }
    })
    .await;
    let objects = Objects::default();
    match boundary {
        Boundary::BeforeCheckpoint => objects.hold(nth, false),
        Boundary::AfterCheckpoint => objects.hold(nth, true),
        Boundary::DuringAggregation | Boundary::AfterResult => {}
    }
    let stopped = engine(&objects, &workers, || match boundary {
        Boundary::BeforeCheckpoint | Boundary::AfterCheckpoint => objects.held(),
        Boundary::DuringAggregation => workers.requests().iter().any(is_synthesis),
        Boundary::AfterResult => false,
    })
    .await;
    let case = format!("{boundary:?} at write {nth}");
    match boundary {
        Boundary::AfterResult => assert!(stopped.is_some(), "{case}: the first engine ends"),
        _ => assert!(stopped.is_none(), "{case}: the engine was not stopped"),
    }
    objects.release();
    let before = calls(&workers);
    let store = ResultStore::new(objects.client(), &job(), &Results::default());
    let recorded = record::decode(&store.load().await.unwrap()).unwrap();

    let outcome = engine(&objects, &workers, || false)
        .await
        .expect("the resumed engine ends");
    let total = calls(&workers);
    let again = |key: &str| total.get(key).unwrap_or(&0) - before.get(key).unwrap_or(&0);
    for (index, subtask) in SUBTASKS.iter().enumerate() {
        let called = again(subtask);
        if recorded.subagents.contains_key(&index) {
            assert_eq!(
                called, 0,
                "{case}: recorded subagent {subtask} was called again"
            );
        } else {
            assert!(
                called <= 1,
                "{case}: unrecorded {subtask} was called {called} times more"
            );
            assert!(
                total.get(*subtask).copied().unwrap_or(0) <= 2,
                "{case}: {subtask} was called {total:?}"
            );
        }
    }
    if recorded.result.is_some() {
        assert!(
            total == before,
            "{case}: a stored result was worked on again"
        );
    }
    let (result, answer) = outcome.result.expect("the job completes");
    assert_eq!(answer, "merged", "{case}");
    assert_eq!(result.chosen, [0, 1, 2, 3], "{case}");
    // The recorded usage counts exactly the calls whose work is recorded: each subagent's
    // attempts and the synthesis that produced the answer.
    let attempts: u64 = outcome
        .checkpoint
        .subagents
        .values()
        .map(|r| u64::from(r.attempts))
        .sum();
    let usage = &outcome.checkpoint.usage["workers"];
    let lost = total.values().sum::<u64>() - usage.calls;
    assert_eq!(usage.calls, attempts + 1, "{case}: usage {usage:?}");
    assert!(lost <= 1, "{case}: {lost} calls lost, {total:?}");
}

#[tokio::test]
async fn an_engine_killed_at_any_checkpoint_boundary_resumes_without_repeating_recorded_work() {
    // The run's writes, in order: the plan, each subagent's record (with the usage so
    // far), then the result with the answer. A kill on each of the six, before and after
    // the API server makes it.
    for nth in 1..=6 {
        kill_and_resume(Boundary::BeforeCheckpoint, nth).await;
        kill_and_resume(Boundary::AfterCheckpoint, nth).await;
    }
    for _ in 0..5 {
        kill_and_resume(Boundary::DuringAggregation, 0).await;
        kill_and_resume(Boundary::AfterResult, 0).await;
    }
}
