//! `make bench-engine`: the swarm engine's own cost per model call, against an instant
//! mock server, side by side with the same fan-out in Python asyncio and the official
//! `openai` client, in the same run on the same server.
//!
//! Figures: calls per second with 64 in flight, and the latency the engine adds to one
//! call (a sequential engine call minus a bare HTTP request to the same server).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kubeswarm::api::SwarmJobSpec;
use kubeswarm::swarm::pool::{Pool, Server};
use kubeswarm::swarm::{Event, Job, Observer, Options};
use kubeswarm_test_support::mock;

const SUBAGENTS: usize = 100;
const JOBS: usize = 40;
const CONCURRENCY: usize = 64;
const SEQUENTIAL_JOBS: usize = 10;
const RAW_CALLS: usize = 2000;

struct Quiet;

impl Observer for Quiet {
    fn event(&self, _: Event<'_>) {}
}

fn job(concurrency: usize) -> SwarmJobSpec {
    let subtasks: Vec<String> = (0..SUBAGENTS).map(|i| format!("\"subtask {i}\"")).collect();
    serde_yaml_ng::from_str(&format!(
        "task: Describe a colour.\nsubtasks: [{}]\nfanOut: {{pool: workers, subagents: {SUBAGENTS}, maxConcurrency: {concurrency}, maxTokens: 64}}\nverification: {{mode: none}}\naggregation: {{strategy: collect}}\n",
        subtasks.join(", ")
    ))
    .expect("the bench job parses")
}

async fn run_jobs(
    pools: &BTreeMap<String, Arc<Pool>>,
    spec: &SwarmJobSpec,
    jobs: usize,
) -> Duration {
    let started = Instant::now();
    for _ in 0..jobs {
        let (_tx, suspended) = tokio::sync::watch::channel(false);
        let outcome = Job {
            name: "bench",
            spec,
            pools,
            store: &mock::Memory::default(),
            observer: &Quiet,
            started: Instant::now(),
            suspended,
            sandbox: &kubeswarm::local::sandbox::Subprocess::default(),
            options: Options::default(),
        }
        .execute()
        .await
        .expect("in-memory store");
        assert_eq!(
            outcome.result.expect("bench job completes").0.chosen.len(),
            SUBAGENTS
        );
    }
    started.elapsed()
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    // `cargo test --all-targets` runs this without `--bench`: one job, as a smoke test of
    // the benchmark itself, without the Python peer.
    if !std::env::args().any(|arg| arg == "--bench") {
        let server = runtime.block_on(mock::Mock::start("m", |_, _| mock::text("a colour")));
        let pool = Pool::new(
            "workers",
            "m",
            Server::OpenAi,
            std::slice::from_ref(&server.url),
            reqwest::Client::new(),
        );
        let pools = BTreeMap::from([("workers".to_owned(), Arc::new(pool))]);
        runtime.block_on(run_jobs(&pools, &job(CONCURRENCY), 1));
        return;
    }
    let python = std::env::var("OPENAI_PYTHON")
        .expect("OPENAI_PYTHON: a python with the openai package (make bench-engine sets it)");
    let server = runtime.block_on(mock::Mock::start("m", |_, _| mock::text("a colour")));
    let http = reqwest::Client::new();
    let pools = BTreeMap::from([(
        "workers".to_owned(),
        Arc::new(Pool::new(
            "workers",
            "m",
            Server::OpenAi,
            std::slice::from_ref(&server.url),
            http.clone(),
        )),
    )]);

    let (raw, sequential, parallel) = runtime.block_on(async {
        let body = serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 64});
        let url = format!("{}/chat/completions", server.url);
        for _ in 0..100 {
            http.post(&url).json(&body).send().await.unwrap().bytes().await.unwrap();
        }
        let started = Instant::now();
        for _ in 0..RAW_CALLS {
            http.post(&url).json(&body).send().await.unwrap().bytes().await.unwrap();
        }
        let raw = started.elapsed() / RAW_CALLS as u32;
        run_jobs(&pools, &job(CONCURRENCY), 2).await;
        let sequential = run_jobs(&pools, &job(1), SEQUENTIAL_JOBS).await / (SEQUENTIAL_JOBS * SUBAGENTS) as u32;
        let parallel = run_jobs(&pools, &job(CONCURRENCY), JOBS).await;
        (raw, sequential, parallel)
    });
    let engine_rate = (JOBS * SUBAGENTS) as f64 / parallel.as_secs_f64();

    // The checkout running the bench, which may not be the one that compiled it.
    let script = std::path::Path::new(
        &std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    )
    .join("benches/engine_asyncio.py");
    let out = std::process::Command::new(&python)
        .arg(script)
        .args([
            "--url",
            &server.url,
            "--calls",
            &(JOBS * SUBAGENTS / 4).to_string(),
        ])
        .args([
            "--sequential-calls",
            "500",
            "--concurrency",
            &CONCURRENCY.to_string(),
        ])
        .output()
        .expect("running the Python peer");
    assert!(
        out.status.success(),
        "the Python peer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let peer: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("the peer prints JSON");
    let peer_rate = peer["calls"].as_f64().unwrap() / peer["seconds"].as_f64().unwrap();
    let peer_sequential = peer["sequential_ms"].as_f64().unwrap();

    let added_ms = (sequential.as_secs_f64() - raw.as_secs_f64()) * 1e3;
    println!(
        "engine benchmark: instant mock server, {SUBAGENTS} subagents a job, {CONCURRENCY} calls in flight"
    );
    println!("{:<44} {:>12} {:>14}", "", "calls/s", "ms per call");
    println!(
        "{:<44} {:>12} {:>14.3}",
        "bare HTTP request (reqwest), sequential",
        "",
        raw.as_secs_f64() * 1e3
    );
    println!(
        "{:<44} {:>12.0} {:>14.3}",
        "kubeswarm engine",
        engine_rate,
        sequential.as_secs_f64() * 1e3
    );
    println!(
        "{:<44} {:>12.0} {:>14.3}",
        "Python asyncio + openai client", peer_rate, peer_sequential
    );
    println!(
        "ratio engine/python calls per second: {:.1}x (target at least 10x)",
        engine_rate / peer_rate
    );
    println!("latency the engine adds per call: {added_ms:.3} ms (target at most 1 ms)");
}
