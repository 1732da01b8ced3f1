use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use mistralrs_core::{AutoDeviceMapParams, ModelDType, ModelSelected, TokenSource};
use mistralrs_server_core::mistralrs_for_server_builder::MistralRsForServerBuilder;
use tokio::signal::unix::{SignalKind, signal};

use tracing::{info, warn};

mod access;
mod config;
mod metrics;
mod preflight;
mod requant;
mod serve;
mod server;

use config::{Config, CpuRequantize, ModelFormat};

fn main() -> ExitCode {
    let config = Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        // Colour codes only on a terminal: pod logs and log parsers get plain text.
        .with_ansi(std::io::stdout().is_terminal())
        .init();
    let model = match resolve_model(&config) {
        Ok(model) => model,
        Err(e) => {
            eprintln!("inference-worker: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(config, model)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("inference-worker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The model on disk, after the preflight checks passed.
enum Model {
    Gguf { dir: PathBuf, files: Vec<String> },
    Safetensors(PathBuf),
}

fn resolve_model(config: &Config) -> Result<Model, preflight::Error> {
    let path = &config.model_path;
    let format = config
        .format
        .unwrap_or_else(|| detect_format(path, &config.gguf_files));
    match format {
        ModelFormat::Gguf if config.isq.is_some() => Err(preflight::Error::IsqOnGguf),
        ModelFormat::Gguf => {
            let (dir, files) = if path.is_file() || config.gguf_files.is_empty() {
                let dir = path
                    .parent()
                    .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                (dir, vec![name])
            } else {
                (path.clone(), config.gguf_files.clone())
            };
            let architecture =
                preflight::check_gguf(&files.iter().map(|f| dir.join(f)).collect::<Vec<_>>())?;
            info!(%architecture, dir = %dir.display(), files = ?files, "GGUF model checked");
            Ok(Model::Gguf { dir, files })
        }
        ModelFormat::Safetensors => {
            preflight::check_safetensors_dir(path)?;
            Ok(Model::Safetensors(path.clone()))
        }
    }
}

/// On the CPU, the GGUF files with their tensors re-encoded for `target` into `scratch`
/// (see `requant`); the originals when nothing needed it.
fn requantize_for_cpu(
    dir: PathBuf,
    files: Vec<String>,
    scratch: &Path,
    target: requant::Target,
) -> Result<(PathBuf, Vec<String>), requant::Error> {
    let started = std::time::Instant::now();
    let mut done = Vec::new();
    for file in &files {
        done.push(requant::transcode(&dir.join(file), scratch, target)?);
    }
    let reencoded: usize = done.iter().map(|d| d.reencoded).sum();
    if reencoded == 0 {
        return Ok((dir, files));
    }
    info!(
        reencoded,
        tensors = done.iter().map(|d| d.tensors).sum::<usize>(),
        seconds = started.elapsed().as_secs_f32(),
        ?target,
        "re-encoded GGUF tensors for the CPU"
    );
    // Split models keep their split; unchanged parts are linked rather than copied.
    for (file, d) in files.iter().zip(&done) {
        if d.reencoded == 0 {
            std::fs::hard_link(&d.path, scratch.join(file))
                .or_else(|_| std::fs::copy(&d.path, scratch.join(file)).map(drop))
                .map_err(|e| requant::Error::Write {
                    path: scratch.join(file),
                    source: Box::new(e.into()),
                })?;
        }
    }
    Ok((scratch.to_owned(), files))
}

fn selected(model: Model) -> ModelSelected {
    match model {
        Model::Gguf { dir, files } => ModelSelected::GGUF {
            tok_model_id: None,
            quantized_model_id: dir.to_string_lossy().into_owned(),
            quantized_filename: files.join(" "),
            dtype: ModelDType::Auto,
            topology: None,
            max_seq_len: AutoDeviceMapParams::DEFAULT_MAX_SEQ_LEN,
            max_batch_size: AutoDeviceMapParams::DEFAULT_MAX_BATCH_SIZE,
        },
        Model::Safetensors(path) => ModelSelected::Plain {
            model_id: path.to_string_lossy().into_owned(),
            tokenizer_json: None,
            arch: None,
            dtype: ModelDType::Auto,
            topology: None,
            organization: None,
            write_uqff: None,
            from_uqff: None,
            imatrix: None,
            calibration_file: None,
            max_seq_len: AutoDeviceMapParams::DEFAULT_MAX_SEQ_LEN,
            max_batch_size: AutoDeviceMapParams::DEFAULT_MAX_BATCH_SIZE,
            hf_cache_path: None,
            matformer_config_path: None,
            matformer_slice_name: None,
        },
    }
}

fn detect_format(path: &Path, gguf_files: &[String]) -> ModelFormat {
    let is_gguf = |p: &Path| {
        p.extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    };
    if !gguf_files.is_empty() || is_gguf(path) {
        ModelFormat::Gguf
    } else {
        ModelFormat::Safetensors
    }
}

/// The GPUs the device plugin gave this container, as the runtime exposes them.
fn visible_gpus() -> Option<String> {
    ["CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"]
        .iter()
        .find_map(|k| std::env::var(k).ok())
}

async fn run(config: Config, model: Model) -> anyhow::Result<()> {
    let metrics = Arc::new(metrics::Metrics::new(config.max_seqs));
    let limits = server::Limits {
        max_tokens_cap: config.max_tokens_cap,
        max_prompt_tokens: config.max_prompt_tokens,
        max_n: config.max_n,
        max_in_flight: config.max_seqs as usize + config.max_waiting,
    };
    let app = Arc::new(server::AppState::new(
        config.served_model_name.clone(),
        config.token.clone(),
        limits,
        metrics,
    ));

    // Listen before loading, so probes see a live process that is not ready yet.
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    // The bound address, not the flag: with port 0 the kernel picks one, and tests read it here.
    info!(listen = %listener.local_addr()?, served = %config.served_model_name, "listening; loading the model");

    let cuda = cfg!(feature = "cuda") && !config.cpu;
    info!(device = if cuda { "cuda" } else { "cpu" }, visible_gpus = ?visible_gpus(), "device");
    let chat_template = config
        .chat_template
        .as_ref()
        .map(|p| p.to_string_lossy().into_owned());
    let builder = MistralRsForServerBuilder::new()
        .with_max_seqs(config.max_seqs as usize)
        .with_prefix_cache_n(config.prefix_cache_sequences)
        .with_no_kv_cache(false)
        .with_token_source(TokenSource::None)
        .with_cpu(!cuda)
        .with_chat_template_optional(chat_template)
        .with_in_situ_quant_optional(config.isq.clone())
        .with_paged_attn_gpu_mem_usage_optional(
            config.kv_cache_memory_percent.map(|p| f32::from(p) / 100.0),
        );
    let drain_timeout = config.drain_timeout;
    let loader_app = app.clone();
    let requantize = match config.cpu_requantize {
        _ if cuda => None,
        CpuRequantize::Q8_0 => Some(requant::Target::Q8_0),
        CpuRequantize::F32 => Some(requant::Target::F32),
        CpuRequantize::Off => None,
    };
    // Per process, so two workers sharing a scratch directory never share files.
    let scratch = config
        .scratch_dir
        .clone()
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("inference-worker-{}", std::process::id()));
    let loading = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let model = match model {
            Model::Gguf { dir, files } if let Some(target) = requantize => {
                let scratch = scratch.clone();
                let (dir, files) = tokio::task::spawn_blocking(move || {
                    requantize_for_cpu(dir, files, &scratch, target)
                })
                .await??;
                Model::Gguf { dir, files }
            }
            model => model,
        };
        let engine = builder.with_model(selected(model)).build().await;
        // The engine holds the weights in memory now; the copy on disk is no longer needed.
        if scratch.exists() {
            std::fs::remove_dir_all(&scratch)?;
        }
        let engine = engine?;
        loader_app.set_engine(engine);
        info!(
            seconds = started.elapsed().as_secs_f32(),
            "model loaded; ready"
        );
        anyhow::Ok(())
    });

    let drain_started = Arc::new(tokio::sync::Notify::new());
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let (drain_app, drain_notify) = (app.clone(), drain_started.clone());
    let shutdown = async move {
        tokio::select! {
            _ = terminate.recv() => info!("SIGTERM: draining"),
            _ = interrupt.recv() => info!("SIGINT: draining"),
        }
        drain_app.start_draining();
        drain_notify.notify_one();
    };
    let guards = serve::Guards {
        max_connections: config.max_connections as usize,
        header_timeout: config.header_timeout,
    };
    let mut serving = tokio::spawn(serve::serve(
        listener,
        server::router(app.clone()),
        guards,
        shutdown,
    ));

    // A model that fails to load ends the worker; one that loads waits for the signal.
    let load_failure = async {
        match loading.await {
            Ok(Ok(())) => std::future::pending().await,
            Ok(Err(e)) => e.context("loading the model"),
            Err(e) => anyhow::Error::new(e).context("the model loader panicked"),
        }
    };
    tokio::select! {
        failure = load_failure => return Err(failure),
        () = drain_started.notified() => {}
        served = &mut serving => return Ok(served?),
    }
    // Axum stops accepting and waits for open requests; give them the drain timeout.
    match tokio::time::timeout(drain_timeout, serving).await {
        Ok(served) => served?,
        Err(_) => warn!(
            in_flight = app.in_flight(),
            "drain timeout passed with requests in flight"
        ),
    }
    info!("stopped");
    Ok(())
}
