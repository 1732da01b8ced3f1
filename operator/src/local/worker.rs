//! Local inference-worker processes, one per pool a manifest names.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::LocalError;

/// How long a worker may take to load its model.
const LOAD_PATIENCE: Duration = Duration::from_secs(600);

/// Why a local worker did not start serving.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot start {}", binary.display())]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write its log {}", log.display())]
    Log {
        log: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The worker's own last words say why (a missing file, a model it cannot load).
    #[error("it exited ({status}) while loading: {stderr}")]
    Exited {
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("not ready after {}s; its log is {}", patience.as_secs(), log.display())]
    NotReady { patience: Duration, log: PathBuf },
}

/// A running worker; dropping it stops the process.
pub struct Worker {
    child: Child,
    /// Base URL of its OpenAI-compatible API, ending in `/v1`.
    pub url: String,
    /// The bearer token it answers: random per run, so nothing else on this machine that
    /// finds the port can use the worker.
    pub token: String,
    /// Where its log goes.
    pub log: PathBuf,
}

/// The inference-worker binary: `--worker`, `KUBESWARM_WORKER`, next to this binary (as
/// `cargo build` places it; test binaries sit one level down, in deps/), or on the PATH.
pub fn binary(explicit: Option<&Path>) -> Result<PathBuf, LocalError> {
    if let Some(path) = explicit {
        return Ok(path.to_owned());
    }
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_owned));
    let near = exe_dir.iter().flat_map(|dir| {
        [Some(dir.clone()), dir.parent().map(Path::to_owned)]
            .into_iter()
            .flatten()
    });
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default();
    near.chain(on_path)
        .map(|dir| dir.join("inference-worker"))
        .find(|p| p.is_file())
        .ok_or(LocalError::NoWorker)
}

impl Worker {
    /// Starts a worker serving `model` as `served` on a free loopback port, logging into
    /// `log`, and waits until it is ready.
    pub async fn start(
        binary: &Path,
        model: &Path,
        served: &str,
        log: PathBuf,
    ) -> Result<Self, LocalError> {
        let failed = |source: WorkerError| LocalError::Worker {
            pool: served.to_owned(),
            source,
        };
        let token: String = {
            use rand::Rng;
            let mut rng = rand::rng();
            (0..32)
                .map(|_| format!("{:02x}", rng.random::<u8>()))
                .collect()
        };
        let mut child = Command::new(binary)
            .arg("--model-path")
            .arg(model)
            .args(["--served-model-name", served, "--listen", "127.0.0.1:0"])
            // As a pool's workers do: any maxTokens the job may ask for is served.
            .arg(format!("--max-tokens-cap={}", crate::api::MAX_CALL_TOKENS))
            .env(crate::pool_contract::TOKEN_ENV, &token)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| {
                failed(WorkerError::Spawn {
                    binary: binary.to_owned(),
                    source,
                })
            })?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut stderr = child.stderr.take().expect("stderr is piped");
        let mut file = std::fs::File::create(&log).map_err(|source| {
            failed(WorkerError::Log {
                log: log.clone(),
                source,
            })
        })?;
        let (addr_tx, addr_rx) = mpsc::channel();
        // The worker logs the address it bound; the rest of its log goes to the file so the
        // terminal shows the job's progress, not the engine's.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = writeln!(file, "{line}");
                if let Some(addr) = line.split("listen=").nth(1) {
                    let _ = addr_tx.send(
                        addr.split_whitespace()
                            .next()
                            .unwrap_or_default()
                            .to_owned(),
                    );
                }
            }
        });
        let (err_tx, err_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            let _ = err_tx.send(text.trim().to_owned());
        });
        let mut worker = Worker {
            child,
            url: String::new(),
            token,
            log,
        };
        let started = Instant::now();
        let http = reqwest::Client::new();
        let mut ready_url = None;
        loop {
            if let Ok(Some(status)) = worker.child.try_wait() {
                let why = err_rx
                    .recv_timeout(Duration::from_secs(5))
                    .unwrap_or_default();
                return Err(failed(WorkerError::Exited {
                    status,
                    stderr: why,
                }));
            }
            if ready_url.is_none()
                && let Ok(addr) = addr_rx.try_recv()
            {
                worker.url = format!("http://{addr}/v1");
                ready_url = Some(format!("http://{addr}/ready"));
            }
            if let Some(url) = &ready_url
                && let Ok(response) = http.get(url).send().await
                && response.status().is_success()
            {
                return Ok(worker);
            }
            if started.elapsed() > LOAD_PATIENCE {
                return Err(failed(WorkerError::NotReady {
                    patience: LOAD_PATIENCE,
                    log: worker.log.clone(),
                }));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
