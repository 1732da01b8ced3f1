//! A real `inference-worker` process on the real test model, and what tests ask of it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// How long the model may take to load, and a request to finish, before a test fails.
pub const PATIENCE: Duration = Duration::from_secs(180);

pub const SERVED: &str = "smol";

/// The SmolLM2 GGUF file: `KUBESWARM_TEST_MODEL`, or fetched (once, then cached) by
/// `kubeswarm fetch-model`, which `make test` and CI run; cargo builds the kubeswarm binary
/// into the same directory as this test.
pub fn test_model() -> &'static Path {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| {
        if let Some(path) = std::env::var_os("KUBESWARM_TEST_MODEL") {
            return PathBuf::from(path);
        }
        let test = std::env::current_exe().expect("the test knows its path");
        let kubeswarm = test
            .parent()
            .and_then(Path::parent)
            .expect("tests run from <target>/<profile>/deps")
            .join("kubeswarm");
        let out = Command::new(&kubeswarm)
            .arg("fetch-model")
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "running {}: {e}; build it with `make build`, or set KUBESWARM_TEST_MODEL",
                    kubeswarm.display()
                )
            });
        assert!(
            out.status.success(),
            "{} fetch-model failed",
            kubeswarm.display()
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
}

pub fn repo_root() -> PathBuf {
    // Read when the test runs, not when it was compiled: clones of the repository share
    // one target directory, and a compiled-in path would name the clone that built it.
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

pub struct Worker {
    child: Child,
    pub base: String,
    pub http: reqwest::Client,
    /// Its log so far.
    log: Arc<Mutex<Vec<String>>>,
}

impl Worker {
    /// Starts the worker on the test model on a free port, and returns once it listens
    /// (the model is still loading then).
    pub fn start(extra: &[&str]) -> Worker {
        let mut child = Command::new(env!("CARGO_BIN_EXE_inference-worker"))
            .arg("--model-path")
            .arg(test_model())
            .args(["--served-model-name", SERVED, "--listen", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting inference-worker");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let keep = log.clone();
        // The worker logs its bound address; echo its log so a failing test shows it.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                println!("worker: {line}");
                keep.lock().unwrap().push(line.clone());
                if line.contains("listening")
                    && let Some(addr) = line.split("listen=").nth(1)
                {
                    let _ = tx.send(addr.split_whitespace().next().unwrap_or("").to_owned());
                }
            }
        });
        let addr = rx
            .recv_timeout(PATIENCE)
            .expect("the worker logs the address it listens on");
        Worker {
            child,
            base: format!("http://{addr}"),
            http: client(),
            log,
        }
    }

    /// Whether a line the worker logged so far contains `text`.
    pub fn logged(&self, text: &str) -> bool {
        self.log
            .lock()
            .unwrap()
            .iter()
            .any(|line| line.contains(text))
    }

    /// Starts the worker and waits until `/ready` answers 200.
    pub async fn ready(extra: &[&str]) -> Worker {
        let worker = Worker::start(extra);
        worker.wait_ready().await;
        worker
    }

    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let status = self.get("/ready").await.status();
            if status == reqwest::StatusCode::OK {
                return;
            }
            assert!(Instant::now() < deadline, "/ready still {status}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
    }

    pub async fn chat(&self, body: &Value) -> reqwest::Response {
        self.post_json(body.clone()).send().await.unwrap()
    }

    pub fn post_json(&self, body: Value) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}/v1/chat/completions", self.base))
            .json(&body)
    }

    pub fn post_raw(&self, body: &'static str) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}/v1/chat/completions", self.base))
            .header("content-type", "application/json")
            .body(body)
    }

    /// The value of a metric line, e.g. `kubeswarm_worker_requests_total{outcome="ok"}`.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.get("/metrics").await.text().await.unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .map_or(0.0, |value| value.trim().parse().unwrap())
    }

    pub fn signal_term(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub async fn exit_status(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the worker did not exit");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends a request and returns its status and JSON body; owns everything it needs, so it
/// runs on a task of its own.
pub async fn answer(request: reqwest::RequestBuilder) -> (reqwest::StatusCode, Value) {
    let response = request.send().await.unwrap();
    (response.status(), response.json().await.unwrap())
}

/// A client without pooled connections from earlier requests of another client.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(PATIENCE)
        .build()
        .unwrap()
}

pub fn chat_request(prompt: &str, max_tokens: u32) -> Value {
    json!({
        "model": SERVED,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
    })
}
