//! The swarm engine against scripted OpenAI-compatible servers: every phase, and the
//! faults a fleet of GPU workers produces.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kubeswarm::api::SwarmJobSpec;
use kubeswarm::swarm::call::Usage;
use kubeswarm::swarm::pool::{Pool, Server};
use kubeswarm::swarm::record::{self, Stage, Store, SubagentRecord, VerdictRecord};
use kubeswarm::swarm::{Event, Job, Observer, Options, Outcome, Reason};
use kubeswarm_test_support::mock::{
    self, Memory, Mock, Reply, is_plan, is_verdict, last_user, part, text, verdict,
};
use serde_json::Value;
use tokio::sync::watch;

/// Events as text, to assert on order and content.
#[derive(Default)]
struct Log(Mutex<Vec<String>>);

impl Observer for Log {
    fn event(&self, event: Event<'_>) {
        let line = match event {
            Event::Planned { subagents } => format!("planned {subagents}"),
            Event::Running { index } => format!("running {index}"),
            Event::Generated { index } => format!("generated {index}"),
            Event::Finished { record } => {
                format!("finished {} passed={}", record.index, record.passed())
            }
            Event::Aggregating => "aggregating".to_owned(),
            Event::Call { pool, outcome, .. } => format!("call {pool} {}", outcome.as_str()),
            Event::Recorded { .. } => return,
        };
        self.0.lock().unwrap().push(line);
    }
}

fn spec(yaml: &str) -> SwarmJobSpec {
    serde_yaml_ng::from_str(yaml).unwrap()
}

fn fast() -> Options {
    Options {
        backoff_base: Duration::from_millis(5),
        backoff_cap: Duration::from_millis(20),
        ..Options::default()
    }
}

fn pools(entries: &[(&str, Vec<String>)]) -> BTreeMap<String, Arc<Pool>> {
    let http = reqwest::Client::new();
    entries
        .iter()
        .map(|(name, urls)| {
            (
                (*name).to_owned(),
                Arc::new(Pool::new(name, "m", Server::Worker, urls, http.clone())),
            )
        })
        .collect()
}

async fn run_job(
    spec: &SwarmJobSpec,
    pools: &BTreeMap<String, Arc<Pool>>,
    store: &Memory,
) -> Outcome {
    run_with(spec, pools, store, fast()).await
}

async fn run_with(
    spec: &SwarmJobSpec,
    pools: &BTreeMap<String, Arc<Pool>>,
    store: &Memory,
    options: Options,
) -> Outcome {
    run_logged(spec, pools, store, options).await.0
}

/// Runs a job and returns what its observer was told, one line per event.
async fn run_logged(
    spec: &SwarmJobSpec,
    pools: &BTreeMap<String, Arc<Pool>>,
    store: &Memory,
    options: Options,
) -> (Outcome, Vec<String>) {
    let (_tx, suspended) = watch::channel(false);
    let log = Log::default();
    let outcome = Job {
        name: "job",
        spec,
        pools,
        store,
        observer: &log,
        started: Instant::now(),
        suspended,
        options,
    }
    .execute()
    .await
    .expect("the in-memory store never fails");
    (outcome, log.0.into_inner().unwrap())
}

/// Subagents answer with their subtask in upper case; the gate passes everything with
/// score 80; anything else (synthesis) answers "merged".
fn happy(body: &Value, _: usize) -> Reply {
    if is_verdict(body) {
        verdict(true, 80, &[])
    } else if body["messages"][0]["content"]
        .as_str()
        .unwrap()
        .starts_with("You merge")
    {
        text("merged")
    } else {
        text(part(body).to_uppercase())
    }
}

const FOUR: &str = r#"
task: Describe a colour.
subtasks: [red, green, blue, black]
fanOut: {pool: workers, subagents: 4, maxTokens: 64, timeoutSeconds: 5, retries: 2}
verification: {mode: adversarial, pool: gate}
aggregation: {strategy: synthesize}
"#;

#[tokio::test]
async fn a_job_fans_out_verifies_every_output_and_synthesizes() {
    let workers = Mock::start("m", happy).await;
    let gate = Mock::start("m", happy).await;
    let pools = pools(&[
        ("workers", vec![workers.url.clone()]),
        ("gate", vec![gate.url.clone()]),
    ]);
    let store = Memory::default();
    let outcome = run_job(&spec(FOUR), &pools, &store).await;

    let (result, answer) = outcome.result.expect("the job completes");
    assert_eq!(answer, "merged");
    assert_eq!(result.chosen, [0, 1, 2, 3]);
    // Each subagent's request carries the shared task first and its own subtask last.
    let mut subtasks: Vec<String> = workers.requests().iter().map(part).collect();
    subtasks.sort();
    assert_eq!(subtasks, ["black", "blue", "green", "red"]);
    for request in workers.requests() {
        // One user turn, as a direct call sends: the task as written, then the part.
        assert_eq!(request["messages"].as_array().unwrap().len(), 1);
        assert_eq!(
            last_user(&request),
            format!(
                "Describe a colour.\n\nYour part of this task: {}",
                part(&request)
            )
        );
        assert_eq!(request["max_completion_tokens"], 64);
        assert_eq!(request["model"], "m");
    }
    // Four verdicts and one synthesis on the gate, which saw every output.
    assert_eq!(gate.requests().iter().filter(|r| is_verdict(r)).count(), 4);
    assert_eq!(gate.count(), 5);
    let synthesis = part(gate.requests().iter().find(|r| !is_verdict(r)).unwrap());
    for colour in ["RED", "GREEN", "BLUE", "BLACK"] {
        assert!(synthesis.contains(colour), "{synthesis}");
    }
    // Every subagent is recorded with its output, tokens and verdict.
    let records = &outcome.checkpoint.subagents;
    assert_eq!(records.len(), 4);
    assert_eq!(records[&0].output, "RED");
    assert_eq!(records[&0].stage, Stage::Finished);
    assert_eq!(
        records[&0].tokens(),
        mock::PROMPT_TOKENS + mock::COMPLETION_TOKENS
    );
    assert_eq!(
        records[&0].verdict,
        Some(VerdictRecord {
            pass: true,
            score: Some(80),
            issues: vec![]
        })
    );
    let per_call = Usage {
        calls: 1,
        prompt_tokens: mock::PROMPT_TOKENS,
        completion_tokens: mock::COMPLETION_TOKENS,
    };
    assert_eq!(
        outcome.checkpoint.usage["workers"],
        Usage {
            calls: 4,
            prompt_tokens: 40,
            completion_tokens: 20
        }
    );
    assert_eq!(outcome.checkpoint.usage["gate"].calls, 5);
    assert_eq!(
        outcome.checkpoint.usage["gate"].prompt_tokens,
        5 * per_call.prompt_tokens
    );
    assert_eq!(store.0.lock().unwrap()[record::ANSWER], "merged");
}

#[tokio::test]
async fn server_errors_are_retried_and_client_errors_are_not() {
    // Every subagent's first two calls get a 500; "black" always gets a 400.
    let tries = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
    let seen = tries.clone();
    let workers = Mock::start("m", move |body, _| {
        let subtask = part(body);
        let mut tries = seen.lock().unwrap();
        let n = tries.entry(subtask.clone()).or_default();
        *n += 1;
        match (subtask.as_str(), *n) {
            ("black", _) => Reply::Status(400),
            (_, 1 | 2) => Reply::Status(500),
            _ => text(subtask),
        }
    })
    .await;
    let job = spec(
        &FOUR
            .replace("{mode: adversarial, pool: gate}", "{mode: none}")
            .replace("synthesize", "collect"),
    );
    let (outcome, log) = run_logged(
        &job,
        &pools(&[("workers", vec![workers.url.clone()])]),
        &Memory::default(),
        fast(),
    )
    .await;
    let calls = |outcome: &str| {
        log.iter()
            .filter(|line| **line == format!("call workers {outcome}"))
            .count()
    };
    assert_eq!(
        (calls("ok"), calls("server_error"), calls("rejected")),
        (3, 6, 1),
        "every HTTP call is reported with its outcome: {log:?}"
    );

    let records = &outcome.checkpoint.subagents;
    assert_eq!(records[&0].attempts, 3, "two 500s, then success");
    assert_eq!(records[&0].output, "red");
    assert_eq!(records[&3].attempts, 0);
    let error = records[&3].error.as_deref().unwrap();
    assert!(
        error.contains("refused the request (400)") && error.contains("scripted 400"),
        "{error}"
    );
    assert_eq!(tries.lock().unwrap()["black"], 1, "a 400 is not retried");
    assert_eq!(outcome.result.unwrap().0.chosen, [0, 1, 2]);
    // Only answered calls are charged.
    assert_eq!(outcome.checkpoint.usage["workers"].calls, 3);
}

#[tokio::test]
async fn retries_give_up_after_the_limit_and_say_why() {
    let workers = Mock::start("m", |_, _| Reply::Status(503)).await;
    let job = spec(&FOUR.replace("{mode: adversarial, pool: gate}", "{mode: none}"));
    let outcome = run_job(
        &job,
        &pools(&[("workers", vec![workers.url.clone()])]),
        &Memory::default(),
    )
    .await;
    assert_eq!(
        workers.count(),
        4 * 3,
        "one call and two retries per subagent"
    );
    let failure = outcome.result.unwrap_err();
    assert_eq!(failure.reason, Reason::VerificationFailed);
    assert!(
        failure.message.contains("none of the 4 outputs passed"),
        "{}",
        failure.message
    );
    assert!(
        failure
            .message
            .contains("3 attempts failed, the last with: 503"),
        "{}",
        failure.message
    );
}

#[tokio::test]
async fn a_slow_replica_times_out_and_the_call_moves_to_a_healthy_one() {
    let slow = Mock::start("m", |_, _| {
        Reply::After(Duration::from_secs(30), Box::new(text("late")))
    })
    .await;
    let fast = Mock::start("m", |body, _| text(part(body))).await;
    let job = spec(
        &FOUR
            .replace("timeoutSeconds: 5", "timeoutSeconds: 1")
            .replace("{mode: adversarial, pool: gate}", "{mode: none}")
            .replace("synthesize", "collect"),
    );
    let pools = pools(&[("workers", vec![slow.url.clone(), fast.url.clone()])]);
    let started = Instant::now();
    let outcome = run_job(&job, &pools, &Memory::default()).await;
    assert_eq!(outcome.result.unwrap().0.chosen, [0, 1, 2, 3]);
    assert_eq!(fast.count(), 4, "every subagent ends on the fast replica");
    assert!(
        slow.count() >= 1,
        "some call went to the slow replica first"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "timeouts cut the slow calls short"
    );
    // The slow replica's dropped calls are not waited for.
    for record in outcome.checkpoint.subagents.values() {
        assert!(record.attempts <= 2, "{record:?}");
    }
}

#[tokio::test]
async fn a_replica_that_refuses_connections_is_skipped() {
    let alive = Mock::start("m", |body, _| text(part(body))).await;
    let job = spec(
        &FOUR
            .replace("{mode: adversarial, pool: gate}", "{mode: none}")
            .replace("synthesize", "collect"),
    );
    let pools = pools(&[(
        "workers",
        vec![mock::refusing_url().await, alive.url.clone()],
    )]);
    let outcome = run_job(&job, &pools, &Memory::default()).await;
    assert_eq!(outcome.result.unwrap().0.chosen, [0, 1, 2, 3]);
    let attempts: u32 = outcome
        .checkpoint
        .subagents
        .values()
        .map(|r| r.attempts)
        .sum();
    // After its first refusal the dead replica is ejected: at most the calls already on
    // their way to it fail once more.
    assert!(attempts <= 4 + 4, "{attempts} attempts for 4 subagents");
    assert_eq!(alive.count(), 4);
}

#[tokio::test]
async fn malformed_verdicts_are_asked_again_then_reported() {
    // The gate rambles once per output, then answers properly; for "black" it never does.
    let workers = Mock::start("m", |body, _| text(part(body))).await;
    let rambled = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
    let gate = Mock::start("m", move |body, _| {
        let about = part(body);
        let mut rambled = rambled.lock().unwrap();
        let n = rambled.entry(about.clone()).or_default();
        *n += 1;
        if about.contains("Answer to review:\nblack") || *n == 1 {
            text("I think this answer is quite good overall!")
        } else {
            verdict(true, 70, &[])
        }
    })
    .await;
    let job = spec(&FOUR.replace("synthesize", "collect"));
    let outcome = run_job(
        &job,
        &pools(&[
            ("workers", vec![workers.url.clone()]),
            ("gate", vec![gate.url.clone()]),
        ]),
        &Memory::default(),
    )
    .await;
    let records = &outcome.checkpoint.subagents;
    assert!(records[&0].passed());
    assert_eq!(records[&0].verdict.as_ref().unwrap().score, Some(70));
    let error = records[&3].error.as_deref().unwrap();
    assert!(
        error.starts_with(
            "no usable verdict after 3 attempts: the gate's verdict is not the requested JSON"
        ),
        "{error}"
    );
    assert!(!records[&3].passed());
    assert_eq!(outcome.result.unwrap().0.chosen, [0, 1, 2]);
    assert_eq!(gate.count(), 3 * 2 + 3);
}

#[tokio::test]
async fn the_token_budget_stops_new_calls_and_fails_the_job() {
    let workers = Mock::start("m", |body, _| text(part(body))).await;
    // 15 tokens a call: the third call finds 30 of 40 spent and is cut to 10 tokens, the
    // fourth finds the budget spent.
    let job = spec(
        &(FOUR
            .replace("{mode: adversarial, pool: gate}", "{mode: none}")
            .replace("subagents: 4,", "subagents: 4, maxConcurrency: 1,")
            + "budget: {maxTotalTokens: 40}\n"),
    );
    let outcome = run_job(
        &job,
        &pools(&[("workers", vec![workers.url.clone()])]),
        &Memory::default(),
    )
    .await;
    let failure = outcome.result.unwrap_err();
    assert_eq!(failure.reason, Reason::BudgetExceeded);
    assert_eq!(
        failure.message,
        "the job's token budget of 40 tokens is spent"
    );
    assert_eq!(workers.count(), 3);
    assert_eq!(workers.requests()[2]["max_completion_tokens"], 10);
    assert_eq!(
        outcome.checkpoint.subagents.len(),
        3,
        "finished subagents stay recorded"
    );
}

#[tokio::test]
async fn the_deadline_ends_calls_in_flight() {
    let workers = Mock::start("m", |_, _| {
        Reply::After(Duration::from_secs(60), Box::new(text("late")))
    })
    .await;
    let job = spec(
        &(FOUR.replace("{mode: adversarial, pool: gate}", "{mode: none}")
            + "budget: {deadlineSeconds: 1}\n"),
    );
    let started = Instant::now();
    let outcome = run_job(
        &job,
        &pools(&[("workers", vec![workers.url.clone()])]),
        &Memory::default(),
    )
    .await;
    assert_eq!(outcome.result.unwrap_err().reason, Reason::DeadlineExceeded);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn dropping_a_run_cancels_its_calls_in_flight() {
    let workers = Mock::start("m", |_, _| {
        Reply::After(Duration::from_secs(60), Box::new(text("late")))
    })
    .await;
    let job = spec(&FOUR.replace("{mode: adversarial, pool: gate}", "{mode: none}"));
    let pools = pools(&[("workers", vec![workers.url.clone()])]);
    let store = Memory::default();
    let task = {
        let (job, pools, store) = (job.clone(), pools.clone(), store.clone());
        tokio::spawn(async move { run_job(&job, &pools, &store).await })
    };
    wait_until(|| workers.in_flight() == 4).await;
    task.abort();
    // The server sees the connections close and its handlers end.
    wait_until(|| workers.in_flight() == 0).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(workers.count(), 4, "no call starts after the cancel");
    assert!(store.0.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_resumed_run_never_repeats_or_recounts_a_finished_subagent() {
    let workers = Mock::start("m", |body, _| text(part(body))).await;
    let job = spec(
        &FOUR
            .replace("{mode: adversarial, pool: gate}", "{mode: none}")
            .replace("synthesize", "collect"),
    );
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
    // A finished job run again makes no call at all.
    let again = run_job(
        &job,
        &pools(&[("workers", vec![workers.url.clone()])]),
        &store,
    )
    .await;
    assert_eq!(workers.count(), 1);
    assert_eq!(
        again.result.unwrap().1,
        store.0.lock().unwrap()[record::ANSWER]
    );
}

#[tokio::test]
async fn the_planner_is_asked_again_for_a_malformed_plan_then_the_job_fails() {
    let planner = Mock::start("m", |body, n| {
        assert!(is_plan(body));
        if n == 0 {
            text("Here is a plan: first do a, then b.")
        } else {
            text(r#"{"subtasks": ["a", "b"]}"#)
        }
    })
    .await;
    let workers = Mock::start("m", |body, _| text(part(body))).await;
    let job = spec(
        r#"
task: Two things.
planner: {pool: planner}
fanOut: {pool: workers, subagents: 2}
verification: {mode: none}
aggregation: {strategy: collect}
"#,
    );
    let pools_ = pools(&[
        ("planner", vec![planner.url.clone()]),
        ("workers", vec![workers.url.clone()]),
    ]);
    let store = Memory::default();
    let outcome = run_job(&job, &pools_, &store).await;
    assert_eq!(outcome.result.unwrap().0.chosen, [0, 1]);
    assert_eq!(planner.count(), 2);
    let schema = &planner.requests()[0]["response_format"]["json_schema"]["schema"];
    assert_eq!(schema["properties"]["subtasks"]["minItems"], 2);
    assert_eq!(
        store.0.lock().unwrap()[record::PLAN],
        record::encode(&vec!["a", "b"])
    );
    let mut parts: Vec<String> = workers.requests().iter().map(part).collect();
    parts.sort();
    assert_eq!(parts, ["a", "b"]);

    let rambling = Mock::start("m", |_, _| text("no JSON today")).await;
    let outcome = run_job(
        &job,
        &pools(&[
            ("planner", vec![rambling.url.clone()]),
            ("workers", vec![workers.url.clone()]),
        ]),
        &Memory::default(),
    )
    .await;
    let failure = outcome.result.unwrap_err();
    assert_eq!(failure.reason, Reason::PlanFailed);
    assert!(
        failure
            .message
            .starts_with("no usable plan after 3 attempts"),
        "{}",
        failure.message
    );
}

#[tokio::test]
async fn a_failed_check_gets_one_repair_with_the_critique() {
    let workers = Mock::start("m", |body, _| {
        let messages = body["messages"].as_array().unwrap();
        if messages.len() > 1 {
            text(r#"{"colour": "red"}"#)
        } else {
            text("red, I think")
        }
    })
    .await;
    let job = spec(
        r#"
task: Name a colour as JSON.
fanOut: {pool: workers, subagents: 1}
verification: {mode: none, repairRounds: 1, checks: [{type: json}]}
aggregation: {strategy: collect}
"#,
    );
    let outcome = run_job(
        &job,
        &pools(&[("workers", vec![workers.url.clone()])]),
        &Memory::default(),
    )
    .await;
    let record = &outcome.checkpoint.subagents[&0];
    assert!(record.passed() && record.repaired);
    assert_eq!(record.output, r#"{"colour": "red"}"#);
    assert_eq!(record.attempts, 2);
    let repair = &workers.requests()[1];
    // The task, the first answer, the critique: the conversation goes on.
    assert_eq!(repair["messages"][0]["content"], "Name a colour as JSON.");
    assert_eq!(repair["messages"][1]["role"], "assistant");
    assert_eq!(repair["messages"][1]["content"], "red, I think");
    assert!(
        part(repair).contains("the output is not valid JSON"),
        "{repair}"
    );
}

#[tokio::test]
async fn vote_and_best_of_choose_by_majority_and_score() {
    let answers = ["Paris", "paris.", "Lyon"];
    let workers = Mock::start("m", move |_, n| text(answers[n % 3])).await;
    let gate = Mock::start("m", |body, _| {
        let score = if part(body).contains("Lyon") { 95 } else { 60 };
        verdict(true, score, &[])
    })
    .await;
    let base = r#"
task: Capital of France?
fanOut: {pool: workers, subagents: 3, maxConcurrency: 1}
verification: {mode: adversarial, pool: gate}
"#;
    let pools = pools(&[
        ("workers", vec![workers.url.clone()]),
        ("gate", vec![gate.url.clone()]),
    ]);
    let (voted, answer) = run_job(
        &spec(&format!("{base}aggregation: {{strategy: vote}}")),
        &pools,
        &Memory::default(),
    )
    .await
    .result
    .unwrap();
    assert_eq!(answer, "Paris");
    let votes = voted.votes.unwrap();
    assert_eq!((votes.winner, votes.votes, votes.of), (0, 2, 3));
    let (best, answer) = run_job(
        &spec(&format!("{base}aggregation: {{strategy: bestOf}}")),
        &pools,
        &Memory::default(),
    )
    .await
    .result
    .unwrap();
    assert_eq!(
        (best.chosen.as_slice(), answer.as_str()),
        ([2].as_slice(), "Lyon")
    );
}

#[tokio::test]
async fn a_result_too_large_for_a_configmap_is_refused_not_truncated() {
    let workers = Mock::start("m", |_, _| text("x".repeat(4000))).await;
    let job = spec(
        &FOUR
            .replace("{mode: adversarial, pool: gate}", "{mode: none}")
            .replace("synthesize", "collect"),
    );
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
        failure.message.contains("over the 10000 a ConfigMap holds"),
        "{}",
        failure.message
    );
    for record in outcome.checkpoint.subagents.values() {
        assert_eq!(record.output.len(), 4000, "kept whole");
    }
}

#[tokio::test]
async fn a_pool_without_ready_replicas_is_waited_for_without_spending_attempts() {
    let workers = Mock::start("m", |body, _| text(part(body))).await;
    let job = spec(
        &FOUR
            .replace("{mode: adversarial, pool: gate}", "{mode: none}")
            .replace("synthesize", "collect")
            .replace("retries: 2", "retries: 0"),
    );
    // A preempted pool: no replica until Kueue admits it again.
    let pools = pools(&[("workers", vec![])]);
    let readmit = {
        let pool = pools["workers"].clone();
        let url = workers.url.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            pool.set_replicas(&[url]);
        }
    };
    let store = Memory::default();
    let (outcome, ()) = tokio::join!(run_job(&job, &pools, &store), readmit);
    assert_eq!(outcome.result.unwrap().0.chosen, [0, 1, 2, 3]);
    assert!(
        outcome
            .checkpoint
            .subagents
            .values()
            .all(|r| r.attempts == 1),
        "the wait is not an attempt: {:?}",
        outcome.checkpoint.subagents
    );
    assert_eq!(workers.count(), 4);
}

#[tokio::test]
async fn a_suspended_job_starts_no_call_until_resumed() {
    let workers = Mock::start("m", |body, _| text(part(body))).await;
    let job = spec(
        &FOUR
            .replace("{mode: adversarial, pool: gate}", "{mode: none}")
            .replace("synthesize", "collect"),
    );
    let pools = pools(&[("workers", vec![workers.url.clone()])]);
    let (suspend, suspended) = watch::channel(true);
    let store = Memory::default();
    let log = Log::default();
    let run = Job {
        name: "job",
        spec: &job,
        pools: &pools,
        store: &store,
        observer: &log,
        started: Instant::now(),
        suspended,
        options: fast(),
    };
    let resume = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(workers.count(), 0, "suspended: no call");
        suspend.send(false).unwrap();
    };
    let (outcome, ()) = tokio::join!(run.execute(), resume);
    assert_eq!(outcome.unwrap().result.unwrap().0.chosen, [0, 1, 2, 3]);
    assert_eq!(workers.count(), 4);
    let events = log.0.lock().unwrap();
    assert_eq!(events.first().unwrap(), "planned 4");
    assert_eq!(events.last().unwrap(), "aggregating");
}

#[tokio::test]
async fn subagents_sharing_a_prefix_stay_on_one_replica_until_it_is_busy() {
    let a = Mock::start("m", |body, _| text(part(body))).await;
    let b = Mock::start("m", |body, _| text(part(body))).await;
    let job = spec(
        &FOUR
            .replace("subagents: 4,", "subagents: 4, maxConcurrency: 1,")
            .replace("{mode: adversarial, pool: gate}", "{mode: none}")
            .replace("synthesize", "collect"),
    );
    let pools = pools(&[("workers", vec![a.url.clone(), b.url.clone()])]);
    run_job(&job, &pools, &Memory::default())
        .await
        .result
        .unwrap();
    // One at a time, every call of the job finds its affine replica idle.
    assert!(
        (a.count(), b.count()) == (4, 0) || (a.count(), b.count()) == (0, 4),
        "{} and {}",
        a.count(),
        b.count()
    );
}

async fn wait_until(condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "condition not reached in 10s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn format_checks_constrain_decoding_on_workers_and_not_on_other_servers() {
    let svg = "<svg xmlns=\"http://www.w3.org/2000/svg\"><rect width=\"4\" height=\"3\"/></svg>";
    let job = spec(
        &FOUR
            .replace(
                "{mode: adversarial, pool: gate}",
                "{mode: adversarial, pool: gate, checks: [{type: svg}]}",
            )
            .replace("synthesize", "collect"),
    );
    for server in [Server::Worker, Server::OpenAi] {
        let workers = Mock::start("m", move |_, _| text(svg)).await;
        let gate = Mock::start("m", happy).await;
        let http = reqwest::Client::new();
        let pools = BTreeMap::from([
            (
                "workers".to_owned(),
                Arc::new(Pool::new(
                    "workers",
                    "m",
                    server,
                    std::slice::from_ref(&workers.url),
                    http.clone(),
                )),
            ),
            (
                "gate".to_owned(),
                Arc::new(Pool::new(
                    "gate",
                    "m",
                    server,
                    std::slice::from_ref(&gate.url),
                    http,
                )),
            ),
        ]);
        let outcome = run_job(&job, &pools, &Memory::default()).await;
        assert_eq!(outcome.result.unwrap().0.chosen, [0, 1, 2, 3]);
        for request in workers.requests() {
            match server {
                Server::Worker => {
                    assert_eq!(request["grammar"]["type"], "lark", "{request}");
                    let grammar = request["grammar"]["value"].as_str().unwrap();
                    assert!(grammar.starts_with("start: svg"), "{grammar}");
                }
                Server::OpenAi => assert!(request.get("grammar").is_none(), "{request}"),
            }
        }
        // The gate's verdicts are held to their JSON schema, never to the outputs' grammar.
        for request in gate.requests() {
            assert!(request.get("grammar").is_none(), "{request}");
            assert_eq!(request["response_format"]["type"], "json_schema");
        }
    }
}
