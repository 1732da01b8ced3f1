//! Flags and environment of the worker. Every flag has an environment variable, so the
//! operator can set them either way in a pod spec.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// mistral.rs behind an OpenAI-compatible HTTP API: one worker of a kubeswarm ModelPool.
///
/// Loads the model from local files only (it never reaches the network), then serves
/// /v1/chat/completions and /v1/models, with /health (liveness), /ready (model loaded and
/// accepting) and Prometheus /metrics. SIGTERM stops new requests, lets requests in flight
/// finish within --drain-timeout, and exits 0.
#[derive(Parser, Debug, Clone)]
#[command(name = "inference-worker", version)]
pub struct Config {
    /// The model: a GGUF file, a directory holding the --gguf-file(s), or a safetensors
    /// directory (config.json, tokenizer.json, *.safetensors).
    #[arg(long, env = "WORKER_MODEL_PATH")]
    pub model_path: PathBuf,

    /// Weight format; detected from --model-path when unset.
    #[arg(long, env = "WORKER_MODEL_FORMAT", value_enum)]
    pub format: Option<ModelFormat>,

    /// GGUF file name(s) inside --model-path, for split models repeat the flag (or
    /// separate with commas in the variable).
    #[arg(long = "gguf-file", env = "WORKER_GGUF_FILES", value_delimiter = ',')]
    pub gguf_files: Vec<String>,

    /// In-situ quantization for safetensors weights while they load (Q4K, Q8_0, ...).
    #[arg(long, env = "WORKER_ISQ")]
    pub isq: Option<String>,

    /// Bearer token every /v1 request must carry (`Authorization: Bearer TOKEN`); others
    /// get 401. Unset, /v1 is open: for a worker on a developer's machine. The operator
    /// sets it on every worker pod it creates.
    #[arg(long, env = "KUBESWARM_WORKER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Jinja chat template file that replaces the model's own.
    #[arg(long, env = "WORKER_CHAT_TEMPLATE")]
    pub chat_template: Option<PathBuf>,

    /// Model name clients must send as `model` (the ModelPool's name); other names get 404.
    #[arg(long, env = "WORKER_SERVED_MODEL_NAME")]
    pub served_model_name: String,

    /// Address to listen on.
    #[arg(long, env = "WORKER_LISTEN", default_value = "0.0.0.0:8000")]
    pub listen: SocketAddr,

    /// Sequences decoded at once with continuous batching; more requests wait in the
    /// engine's queue.
    #[arg(long, env = "WORKER_MAX_SEQS", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_seqs: u32,

    /// Percent of the GPU memory left after the weights that paged attention reserves for
    /// the KV cache (GPU builds only). Unset lets the engine choose.
    #[arg(long, env = "WORKER_KV_CACHE_MEMORY_PERCENT", value_parser = clap::value_parser!(u8).range(5..=95))]
    pub kv_cache_memory_percent: Option<u8>,

    /// Sequences whose KV cache is kept for reuse by later requests with the same prompt
    /// prefix; 0 turns the prefix cache off.
    #[arg(long, env = "WORKER_PREFIX_CACHE_SEQUENCES", default_value_t = 16)]
    pub prefix_cache_sequences: usize,

    /// Largest `max_tokens` a request may ask for; requests without one get this.
    #[arg(long, env = "WORKER_MAX_TOKENS_CAP", default_value_t = 4096)]
    pub max_tokens_cap: usize,

    /// Longest prompt, in tokens after the chat template, a request may send.
    #[arg(long, env = "WORKER_MAX_PROMPT_TOKENS", default_value_t = 8192)]
    pub max_prompt_tokens: usize,

    /// Requests that may wait for a free sequence beyond --max-seqs; more are answered
    /// 503 with `Retry-After`, so a flood is refused at once rather than queued for ever
    /// (the operator then tries another replica).
    #[arg(long, env = "WORKER_MAX_WAITING", default_value_t = 256)]
    pub max_waiting: usize,

    /// Connections open at once; more wait in the listen backlog until one closes.
    #[arg(long, env = "WORKER_MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_connections: u32,

    /// How long a client may take to send a request's headers (on a new connection, or
    /// between the requests of a kept-alive one) before the connection is closed.
    #[arg(long, env = "WORKER_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,

    /// Largest `n` (choices per request) a request may ask for.
    #[arg(long, env = "WORKER_MAX_N", default_value_t = 4)]
    pub max_n: usize,

    /// How long requests in flight may take to finish after SIGTERM.
    #[arg(long, env = "WORKER_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// On the CPU, re-encode GGUF tensors while loading. `q8_0`: the types candle has no
    /// SIMD kernel for (Q4_1, Q5_0, Q5_1) become Q8_0, faster at 8.5 bits a weight. `f32`:
    /// every tensor becomes f32, the most tokens/s with many concurrent requests on a small
    /// model, slower for one, at 32 bits a weight. `off`: as on disk. GPU builds ignore it.
    #[arg(long, env = "WORKER_CPU_REQUANTIZE", value_enum, default_value_t = CpuRequantize::Q8_0)]
    pub cpu_requantize: CpuRequantize,

    /// Writable directory for the re-encoded model while it loads (removed once loaded);
    /// defaults to the system temporary directory.
    #[arg(long, env = "WORKER_SCRATCH_DIR")]
    pub scratch_dir: Option<PathBuf>,

    /// Run on the CPU even in a CUDA build.
    #[arg(long, env = "WORKER_CPU")]
    pub cpu: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuRequantize {
    #[value(name = "q8_0")]
    Q8_0,
    F32,
    Off,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFormat {
    Gguf,
    Safetensors,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let value: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration such as 30s or 2m"))?;
    match unit {
        "" | "s" => Ok(Duration::from_secs(value)),
        "m" => Ok(Duration::from_secs(value * 60)),
        "ms" => Ok(Duration::from_millis(value)),
        _ => Err(format!("`{text}`: the unit must be ms, s or m")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5h").is_err());
    }

    #[test]
    fn flags_parse_and_bad_ones_are_refused() {
        let config = Config::try_parse_from([
            "inference-worker",
            "--model-path=/models/smol",
            "--gguf-file=a.gguf",
            "--gguf-file=b.gguf",
            "--served-model-name=smol",
        ])
        .unwrap();
        assert_eq!(config.gguf_files, ["a.gguf", "b.gguf"]);
        assert_eq!(config.max_seqs, 32);
        let err = Config::try_parse_from([
            "inference-worker",
            "--model-path=/m",
            "--served-model-name=smol",
            "--kv-cache-memory-percent=100",
        ])
        .unwrap_err();
        assert!(err.to_string().contains("kv-cache-memory-percent"), "{err}");
    }
}
