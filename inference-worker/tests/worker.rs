//! The worker binary on SmolLM2-135M, over HTTP: what a ModelPool's clients and the kubelet's
//! probes see.

mod support;

use std::process::Command;
use std::time::Instant;

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{SERVED, Worker, answer, chat_request, client, repo_root};

#[tokio::test]
async fn not_ready_while_loading_then_serves_a_chat_completion() {
    let worker = Worker::start(&[]);
    // The model takes seconds to load; the process listens before it starts.
    assert_eq!(worker.get("/health").await.status(), StatusCode::OK);
    let ready = worker.get("/ready").await;
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready.text().await.unwrap(), "loading the model");
    let early = worker.chat(&chat_request("Hi", 8)).await;
    assert_eq!(early.status(), StatusCode::SERVICE_UNAVAILABLE);
    let early: Value = early.json().await.unwrap();
    assert_eq!(early["error"]["code"], "unavailable");

    worker.wait_ready().await;
    let models: Value = worker.get("/v1/models").await.json().await.unwrap();
    assert_eq!(models["data"][0]["id"], SERVED);

    let response = worker
        .chat(&chat_request("What is the capital of France?", 32))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], SERVED, "the served name, not the model path");
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!content.trim().is_empty(), "{body}");
    let completion = body["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=32).contains(&completion), "{body}");
    assert!(
        body["usage"]["prompt_tokens"].as_u64().unwrap() > 5,
        "{body}"
    );

    assert_eq!(
        worker
            .metric(r#"kubeswarm_worker_requests_total{outcome="ok"}"#)
            .await,
        1.0
    );
    assert_eq!(
        worker
            .metric(r#"kubeswarm_worker_requests_total{outcome="unavailable"}"#)
            .await,
        1.0
    );
    assert_eq!(
        worker
            .metric("kubeswarm_worker_completion_tokens_total")
            .await,
        completion as f64
    );
    assert_eq!(
        worker
            .metric("kubeswarm_worker_time_to_first_token_seconds_count")
            .await,
        1.0
    );
}

#[tokio::test]
async fn streams_chunks_and_ends_with_done() {
    // The model as it is on disk, Q4_1 on candle's scalar kernels; the other tests run it
    // re-encoded (the default).
    let worker = Worker::ready(&["--cpu-requantize=off"]).await;
    let mut request = chat_request("Name three colours.", 24);
    request["stream"] = json!(true);
    let response = worker.chat(&request).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let text = response.text().await.unwrap();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks.len() > 2, "{text}");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(!content.trim().is_empty(), "{text}");
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], SERVED);
    }
    assert_eq!(
        worker
            .metric(r#"kubeswarm_worker_requests_total{outcome="ok"}"#)
            .await,
        1.0
    );
    assert!(
        worker
            .metric("kubeswarm_worker_inter_token_latency_seconds_count")
            .await
            >= 1.0
    );
}

// Batched decoding must not mix sequences: greedy answers start as they do alone. (mistral.rs
// 0.8.1 gave every sequence in a CPU decode batch the last one's attention, and answers turned
// to other prompts' text within a few tokens; third_party/mistralrs-core.patch fixes it.)
// Only the start is compared: a batched matmul sums in another order, and where two tokens
// are nearly tied later on, greedy decoding may pick the other one.
#[tokio::test]
async fn ten_concurrent_requests_get_the_answers_they_get_alone() {
    let worker = Worker::ready(&[]).await;
    let prompt = |i: usize| chat_request(&format!("Write a haiku about the number {i}."), 24);
    let content = |body: &Value| {
        body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let mut alone = Vec::new();
    for i in 0..10 {
        let (status, body) = answer(worker.post_json(prompt(i))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        alone.push(content(&body));
    }
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..10 {
        let request = worker.post_json(prompt(i));
        calls.spawn(async move { (i, answer(request).await) });
    }
    let mut completed = 0;
    while let Some(call) = calls.join_next().await {
        let (i, (status, body)) = call.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(!alone[i].trim().is_empty(), "{body}");
        let batched = content(&body);
        let agreed = batched
            .chars()
            .zip(alone[i].chars())
            .take_while(|(a, b)| a == b)
            .count();
        assert!(
            agreed >= alone[i].chars().count().min(16),
            "request {i} in a batch of 10 answered {batched:?}, alone {:?}",
            alone[i]
        );
        completed += 1;
    }
    assert_eq!(completed, 10);
    assert_eq!(
        worker
            .metric(r#"kubeswarm_worker_requests_total{outcome="ok"}"#)
            .await,
        20.0
    );
    assert_eq!(
        worker.metric("kubeswarm_worker_running_sequences").await,
        0.0
    );
}

#[tokio::test]
async fn bad_requests_get_openai_errors_and_the_worker_keeps_serving() {
    let worker = Worker::ready(&["--max-prompt-tokens=64", "--max-tokens-cap=128"]).await;
    let long_prompt = "Please summarise this sentence. ".repeat(40);
    let cases: Vec<(&str, reqwest::RequestBuilder, StatusCode, &str)> =
        vec![
        (
            "malformed JSON",
            worker.post_raw(r#"{"model": "smol", "messages": ["#),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "not a request",
            worker.post_raw("[1, 2]"),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "unknown model",
            worker.post_json(
                json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}),
            ),
            StatusCode::NOT_FOUND,
            "model_not_found",
        ),
        (
            "prompt over the limit",
            worker.post_json(chat_request(&long_prompt, 8)),
            StatusCode::BAD_REQUEST,
            "context_length_exceeded",
        ),
        (
            // 8 KiB and one byte, more than 64 tokens' worth: refused before the tokenizer
            // (which holds the engine's lock) sees it.
            "a body longer than any prompt within the limit",
            worker.post_json(chat_request(&"x".repeat(64 * 128), 8)),
            StatusCode::BAD_REQUEST,
            "context_length_exceeded",
        ),
        (
            "max_tokens over the cap",
            worker.post_json(chat_request("Hi", 129)),
            StatusCode::BAD_REQUEST,
            "invalid_value",
        ),
        (
            "top_logprobs over the limit",
            worker.post_json(json!({"model": SERVED, "logprobs": true, "top_logprobs": 1000,
                "messages": [{"role": "user", "content": "Hi"}]})),
            StatusCode::BAD_REQUEST,
            "invalid_value",
        ),
        (
            "n over the limit",
            worker.post_json(
                json!({"model": SERVED, "messages": [{"role": "user", "content": "Hi"}], "n": 5}),
            ),
            StatusCode::BAD_REQUEST,
            "invalid_value",
        ),
    ];
    let refused = cases.len();
    for (what, request, status, code) in cases {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), status, "{what}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{what}: {body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{what}");
        assert!(
            !body["error"]["message"].as_str().unwrap().is_empty(),
            "{what}"
        );
    }
    let response = worker.chat(&chat_request("Hi", 8)).await;
    assert_eq!(response.status(), StatusCode::OK, "still serving");
    assert_eq!(
        worker
            .metric(r#"kubeswarm_worker_requests_total{outcome="client_error"}"#)
            .await,
        refused as f64
    );
}

/// A token's text and its log-probability.
type Figure = (String, f64);

/// The log-probabilities of each token of a completion, and of the alternatives listed,
/// with each one's text.
fn logprobs(body: &Value) -> Vec<(Figure, Vec<Figure>)> {
    let content = body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap_or_else(|| panic!("no logprobs content: {body}"));
    content
        .iter()
        .map(|token| {
            // A NaN reaches JSON as null: as_f64 is None and the test names the token.
            let chosen = token["logprob"]
                .as_f64()
                .unwrap_or_else(|| panic!("a logprob that is not a number: {token}"));
            let text = token["token"].as_str().unwrap().to_owned();
            // OpenAI's shape, which typed clients (async-openai, the operator's) insist on:
            // the alternative's text as `token` and its UTF-8 bytes as numbers.
            let top = token["top_logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| {
                    let text = t["token"].as_str().unwrap_or_else(|| panic!("{t}"));
                    let bytes: Vec<u8> = serde_json::from_value(t["bytes"].clone())
                        .unwrap_or_else(|e| panic!("{e}: {t}"));
                    assert_eq!(bytes, text.as_bytes(), "{t}");
                    let logprob = t["logprob"].as_f64().unwrap_or_else(|| panic!("{t}"));
                    (text.to_owned(), logprob)
                })
                .collect();
            ((text, chosen), top)
        })
        .collect()
}

#[tokio::test]
async fn logprobs_are_the_natural_log_probabilities_of_the_chosen_tokens() {
    let worker = Worker::ready(&[]).await;
    let mut greedy = chat_request("Name three colours.", 24);
    greedy["logprobs"] = json!(true);
    greedy["top_logprobs"] = json!(3);
    let (status, body) = answer(worker.post_json(greedy)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let tokens = logprobs(&body);
    assert_eq!(
        tokens.len() as u64,
        body["usage"]["completion_tokens"].as_u64().unwrap(),
        "one entry per generated token"
    );
    for ((_, chosen), top) in &tokens {
        assert!(*chosen <= 0.0, "a probability's log is at most 0: {chosen}");
        // Greedy decoding takes the likeliest token: it heads the alternatives, and the
        // alternatives' probabilities add up to at most 1 (natural logs, not base 10).
        assert_eq!(top.len(), 3);
        assert!((top[0].1 - chosen).abs() < 1e-3, "{chosen} against {top:?}");
        assert!(top.windows(2).all(|w| w[0].1 >= w[1].1), "{top:?}");
        let mass: f64 = top.iter().map(|(_, l)| l.exp()).sum();
        assert!(mass <= 1.0 + 1e-3, "{top:?}");
    }
    // A sampled call's figures are on the model's own distribution too, not the one
    // sharpened by its temperature: the first token, drawn from the same prompt, has the
    // greedy call's figure for it whichever token it is.
    let mut sampled = chat_request("Name three colours.", 24);
    sampled["temperature"] = json!(0.3);
    sampled["logprobs"] = json!(true);
    sampled["top_logprobs"] = json!(3);
    let (status, body) = answer(worker.post_json(sampled)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let sampled = logprobs(&body);
    let ((first, logprob), top) = &sampled[0];
    assert_eq!(
        top, &tokens[0].1,
        "the same alternatives, with the same figures"
    );
    if let Some((_, greedy)) = tokens[0].1.iter().find(|(text, _)| text == first) {
        assert!(
            (greedy - logprob).abs() < 1e-3,
            "{first}: {logprob} against {greedy}"
        );
    }
    assert!(sampled.iter().all(|((_, l), _)| *l <= 0.0), "{sampled:?}");
}

#[tokio::test]
async fn a_client_that_hangs_up_stops_its_decoding_and_the_worker_keeps_serving() {
    // One sequence at a time, so the next request waits for the engine to be done with
    // the abandoned one: soon if it was cancelled, after all its tokens if not.
    let worker = Worker::ready(&["--max-seqs=1"]).await;
    let long = || chat_request("Count from 1 to 100000, separated by spaces.", 400);
    let started = Instant::now();
    let (status, whole) = answer(worker.post_json(long())).await;
    assert_eq!(status, StatusCode::OK, "{whole}");
    assert_eq!(
        whole["choices"][0]["finish_reason"], "length",
        "it runs to its limit"
    );
    let whole_time = started.elapsed();

    for _ in 0..2 {
        // A whole (non-streamed) response, abandoned once it is decoding.
        let call = tokio::spawn(answer(
            client()
                .post(format!("{}/v1/chat/completions", worker.base))
                .json(&long()),
        ));
        let deadline = Instant::now() + support::PATIENCE;
        while worker.metric("kubeswarm_worker_running_sequences").await < 1.0 {
            assert!(Instant::now() < deadline, "the request never started");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        tokio::time::sleep(whole_time / 10).await;
        call.abort();
        let _ = call.await;

        let asked = Instant::now();
        let (status, body) = answer(worker.post_json(chat_request("Say hi.", 8))).await;
        let waited = asked.elapsed();
        // Before the fix the abandoned answer's send failed the engine's step and the
        // engine thread panicked: this was a 500, and so was every request after it.
        assert_eq!(status, StatusCode::OK, "{body}");
        // Not cancelled, it would wait out about nine tenths of a whole run.
        assert!(
            waited < whole_time / 3,
            "the next request waited {waited:?}: the abandoned one decoded on (a whole one takes {whole_time:?})"
        );
    }
}

#[tokio::test]
async fn clients_that_hang_up_before_their_prompt_is_tokenized_leave_the_worker_serving() {
    // The worker asks the engine to count a prompt's tokens before it admits it. While the
    // engine prefills a long prompt, those asks queue; a client that hangs up meanwhile
    // drops the receiver of its count. The engine's send of that count used to be an
    // expect: the engine thread panicked, the long request got a 500, and every request
    // after it a 400 ("the engine dropped the request"). Found by `make bench-gpu`'s
    // hang-up measurement, which kills a `kubeswarm run` mid-job.
    let worker = Worker::ready(&["--max-seqs=1"]).await;
    // A prompt whose prefill keeps the engine in one step for seconds on a CPU.
    let long = tokio::spawn(answer(
        worker.post_json(chat_request(&"word ".repeat(600), 16)),
    ));
    let deadline = Instant::now() + support::PATIENCE;
    while worker.metric("kubeswarm_worker_running_sequences").await < 1.0 {
        assert!(Instant::now() < deadline, "the long request never started");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Its own count is done by now; its prefill has begun.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut abandoned = Vec::new();
    for i in 1..=8u64 {
        let call = tokio::spawn(answer(
            client()
                .post(format!("{}/v1/chat/completions", worker.base))
                .json(&chat_request(&format!("Say hi {i}."), 8)),
        ));
        abandoned.push(tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(5 * i)).await;
            call.abort();
            let _ = call.await;
        }));
    }
    for hang_up in abandoned {
        hang_up.await.unwrap();
    }
    let (status, body) = long.await.unwrap();
    assert_eq!(status, StatusCode::OK, "the long request: {body}");
    let (status, body) = answer(worker.post_json(chat_request("Say hi.", 8))).await;
    assert_eq!(status, StatusCode::OK, "the next request: {body}");
    assert!(
        worker.logged("the tokenization's requester hung up"),
        "no count was answered to a client that had gone: the test missed its window"
    );
}

#[tokio::test]
async fn idle_and_slow_connections_are_closed_and_never_crowd_out_a_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let worker = Worker::ready(&["--header-timeout=2s"]).await;
    let addr = worker.base.trim_start_matches("http://").to_owned();
    // 250 connections that say nothing, and 250 that send half a request's headers.
    let mut held = Vec::new();
    for i in 0..500 {
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        if i % 2 == 1 {
            stream
                .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: w\r\n")
                .await
                .unwrap();
        }
        held.push(stream);
    }
    let response = worker.chat(&chat_request("Say hi.", 8)).await;
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "served beside 500 held connections"
    );
    // The header deadline closes every one of them: each read ends.
    for (i, stream) in held.iter_mut().enumerate() {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(support::PATIENCE, stream.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "connection {i} is still open");
    }
}

#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after() {
    // Room for one request and no queue: while it runs, the next is refused at once.
    let worker = Worker::ready(&["--max-seqs=1", "--max-waiting=0"]).await;
    let running = tokio::spawn(answer(worker.post_json(chat_request(
        "Count from 1 to 100000, separated by spaces.",
        400,
    ))));
    let deadline = Instant::now() + support::PATIENCE;
    while worker.metric("kubeswarm_worker_running_sequences").await < 1.0 {
        assert!(Instant::now() < deadline, "the request never started");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let response = worker.chat(&chat_request("Say hi.", 8)).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "1");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "server_error", "{body}");
    let (status, body) = running.await.unwrap();
    assert_eq!(status, StatusCode::OK, "the running one is served: {body}");
    let response = worker.chat(&chat_request("Say hi.", 8)).await;
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "room again once it is done"
    );
}

#[tokio::test]
async fn sigterm_lets_requests_in_flight_finish_and_refuses_new_ones() {
    let mut worker = Worker::ready(&["--drain-timeout=120s"]).await;
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..3 {
        let request = worker.post_json(chat_request(
            "Count from 1 to 500, one number per line.",
            300,
        ));
        calls.spawn(async move {
            let (status, body) = answer(request).await;
            (status, body, Instant::now())
        });
    }
    let deadline = Instant::now() + support::PATIENCE;
    while worker.metric("kubeswarm_worker_running_sequences").await < 3.0 {
        assert!(Instant::now() < deadline, "the requests never started");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    worker.signal_term();
    let signalled = Instant::now();

    // A new connection is refused, or answered 503 if it raced the listener closing.
    let deadline = Instant::now() + support::PATIENCE;
    loop {
        match client()
            .post(format!("{}/v1/chat/completions", worker.base))
            .json(&chat_request("Hi", 8))
            .send()
            .await
        {
            Err(e) if e.is_connect() => break,
            Ok(r) if r.status() == StatusCode::SERVICE_UNAVAILABLE => break,
            other => assert!(
                Instant::now() < deadline,
                "still accepting after SIGTERM: {other:?}"
            ),
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    while let Some(call) = calls.join_next().await {
        let (status, body, finished) = call.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(finished > signalled, "the request was in flight at SIGTERM");
        assert!(
            !body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .is_empty()
        );
    }
    let status = worker.exit_status().await;
    assert!(status.success(), "exit status {status}");
}

/// The worker's stderr and exit status when it cannot load `model`.
fn failed_start(model: &std::path::Path, extra: &[&str]) -> (String, std::process::ExitStatus) {
    let out = Command::new(env!("CARGO_BIN_EXE_inference-worker"))
        .arg("--model-path")
        .arg(model)
        .args(["--served-model-name", SERVED, "--listen", "127.0.0.1:0"])
        .args(extra)
        .output()
        .unwrap();
    (String::from_utf8(out.stderr).unwrap(), out.status)
}

#[test]
fn a_model_that_cannot_load_ends_the_worker_with_one_line() {
    let dir = std::env::temp_dir().join(format!("worker-bad-models-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A valid GGUF header naming an architecture mistral.rs 0.8.1 has no GGUF model for.
    let mut gemma = b"GGUF".to_vec();
    gemma.extend(3u32.to_le_bytes());
    gemma.extend(0u64.to_le_bytes());
    gemma.extend(1u64.to_le_bytes());
    gemma.extend(20u64.to_le_bytes());
    gemma.extend(b"general.architecture");
    gemma.extend(8u32.to_le_bytes()); // a string value
    gemma.extend(6u64.to_le_bytes());
    gemma.extend(b"gemma3");
    std::fs::write(dir.join("gemma.gguf"), gemma).unwrap();
    std::fs::write(dir.join("notes.gguf"), "not a model").unwrap();

    for (model, extra, expected) in [
        (dir.join("missing.gguf"), &[][..], "does not exist"),
        (
            dir.join("gemma.gguf"),
            &[],
            "GGUF architecture `gemma3` is not supported by mistral.rs 0.8.1 (supported: llama,",
        ),
        (dir.join("notes.gguf"), &[], "is not a GGUF file"),
        (dir.clone(), &[], "has no config.json"),
        (
            support::test_model().to_owned(),
            &["--isq", "Q4K"],
            "a GGUF model is already quantized: drop --isq",
        ),
    ] {
        let (stderr, status) = failed_start(&model, extra);
        assert!(!status.success(), "{}", model.display());
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(expected), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// The official OpenAI Python client, installed from PyPI, against the worker.
#[tokio::test]
async fn the_official_openai_python_client_completes_and_streams() {
    let worker = Worker::ready(&[]).await;
    let root = repo_root();
    let python = Command::new(root.join("hack/install-tool"))
        .arg("openai-python")
        .output()
        .unwrap();
    assert!(python.status.success(), "installing the openai client");
    let python = String::from_utf8(python.stdout).unwrap();
    let base = worker.base.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python.trim())
            .arg(root.join("inference-worker/tests/openai_client.py"))
            .args([format!("{base}/v1"), SERVED.to_owned()])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for line in [
        "completion: ok",
        "stream: ok",
        "unknown model: NotFoundError",
    ] {
        assert!(stdout.contains(line), "{stdout}\n{stderr}");
    }
}

#[tokio::test]
async fn with_a_token_the_api_answers_only_requests_that_carry_it() {
    let worker = Worker::ready(&["--token", "pool-token-1"]).await;
    // Probes and metrics stay open for the kubelet and Prometheus.
    assert_eq!(worker.get("/health").await.status(), StatusCode::OK);
    assert_eq!(worker.get("/ready").await.status(), StatusCode::OK);
    assert_eq!(worker.get("/metrics").await.status(), StatusCode::OK);

    let request = chat_request("Hi", 4);
    for (header, want) in [
        (None, StatusCode::UNAUTHORIZED),
        (Some("Bearer pool-token-2"), StatusCode::UNAUTHORIZED),
        (Some("Bearer pool-token-1x"), StatusCode::UNAUTHORIZED),
        (Some("pool-token-1"), StatusCode::UNAUTHORIZED),
        (Some("Bearer pool-token-1"), StatusCode::OK),
    ] {
        let mut post = worker.post_json(request.clone());
        let mut get = worker.http.get(format!("{}/v1/models", worker.base));
        if let Some(h) = header {
            post = post.header("authorization", h);
            get = get.header("authorization", h);
        }
        let answer = post.send().await.unwrap();
        assert_eq!(answer.status(), want, "{header:?}");
        assert_eq!(get.send().await.unwrap().status(), want, "{header:?}");
        if want == StatusCode::UNAUTHORIZED {
            let body: Value = answer.json().await.unwrap();
            assert_eq!(body["error"]["code"], "invalid_api_key");
        }
    }
}
