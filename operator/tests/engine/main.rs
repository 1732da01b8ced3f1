//! The swarm engine against scripted OpenAI-compatible servers: every phase, and the
//! faults a fleet of GPU workers produces. The whole pipeline here; one file per step
//! (plan, subagent, verify, aggregate), for the calls every step makes, and for the records.

mod aggregate;
mod calls;
mod fuzz;
mod plan;
mod records;
mod subagent;
mod verify;

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
            Event::Recorded { usage } => format!(
                "recorded {}",
                usage
                    .iter()
                    .map(|(pool, u)| format!("{pool}={}", u.calls))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
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
    pools_of(Server::Worker, entries)
}

/// Pools whose servers are of the kind `server`.
fn pools_of(server: Server, entries: &[(&str, Vec<String>)]) -> BTreeMap<String, Arc<Pool>> {
    let http = reqwest::Client::new();
    entries
        .iter()
        .map(|(name, urls)| {
            (
                (*name).to_owned(),
                Arc::new(Pool::new(name, "m", server, urls, http.clone())),
            )
        })
        .collect()
}

async fn run_job(
    spec: &SwarmJobSpec,
    pools: &BTreeMap<String, Arc<Pool>>,
    store: &impl Store,
) -> Outcome {
    run_with(spec, pools, store, fast()).await
}

/// A job whose only pool, `workers`, is `workers`.
async fn run_on(workers: &Mock, yaml: &str) -> Outcome {
    let pools = pools(&[("workers", vec![workers.url.clone()])]);
    run_job(&spec(yaml), &pools, &Memory::default()).await
}

/// A job whose pools are `workers` and its gate, `gate`.
async fn run_gated(workers: &Mock, gate: &Mock, spec: &SwarmJobSpec) -> Outcome {
    let pools = pools(&[
        ("workers", vec![workers.url.clone()]),
        ("gate", vec![gate.url.clone()]),
    ]);
    run_job(spec, &pools, &Memory::default()).await
}

async fn run_with(
    spec: &SwarmJobSpec,
    pools: &BTreeMap<String, Arc<Pool>>,
    store: &impl Store,
    options: Options,
) -> Outcome {
    run_logged(spec, pools, store, options).await.0
}

/// Runs a job and returns what its observer was told, one line per event.
async fn run_logged(
    spec: &SwarmJobSpec,
    pools: &BTreeMap<String, Arc<Pool>>,
    store: &impl Store,
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
        sandbox: &kubeswarm::local::sandbox::Subprocess::default(),
        options,
    }
    .execute()
    .await
    .expect("the records are written");
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

async fn wait_until(condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "condition not reached in 10s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
