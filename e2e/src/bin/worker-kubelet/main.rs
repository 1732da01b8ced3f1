//! The kubelet of the e2e test bed's fake nodes, for inference workers and the pods of
//! SwarmJobs' `tests` checks (`tests_pods`).
//!
//! KWOK gives a pod bound to a fake node the Running phase and an address from the node's
//! pod CIDR (inside 127.0.0.0/8). This process runs each such worker pod's image, pulled
//! from the bed's registry (`e2e/lib/run_image.py`), listening on that address, with the
//! pod's arguments, environment, user and read-only root, and its volumes bind-mounted at
//! their mount paths; it marks the pod Ready when the worker's readiness endpoint answers,
//! as the readiness probe would, reports an exited worker in the container's status, and
//! stops the worker when its pod goes.

mod tests_pods;

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Container, Node, Pod, PodSpec};
use kube::api::{Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tracing::{info, warn};

#[derive(Parser)]
struct Args {
    /// The image runner, `e2e/lib/run_image.py`.
    #[arg(long)]
    run_image: PathBuf,
    /// go-containerregistry's crane, which the runner pulls images with.
    #[arg(long)]
    crane: PathBuf,
    /// Where the runner extracts pulled images, one folder per digest.
    #[arg(long)]
    images_dir: PathBuf,
    /// A folder of this host that pods may mount by hostPath (repeatable); any other
    /// hostPath fails the pod, as the kubelet runs pods as root on this machine.
    #[arg(long)]
    allow_host_path: Vec<PathBuf>,
    /// Where each pod gets a directory: its log, its pid, its emptyDir volumes.
    #[arg(long)]
    pods_dir: PathBuf,
    /// Label selector of the nodes this kubelet plays.
    #[arg(long)]
    node_selector: String,
    /// Label selector of the pods it runs.
    #[arg(long, default_value = "app.kubernetes.io/name=inference-worker")]
    pod_selector: String,
    /// Label selector of the `tests` check pods it runs with this host's python3.
    #[arg(long, default_value = "app.kubernetes.io/component=tests")]
    tests_selector: String,
}

/// How often readiness is probed, like the worker pods' readinessProbe period.
const PROBE_PERIOD: Duration = Duration::from_secs(1);
/// Every so many probes the pod's stored readiness is read back and written again if it
/// differs, as a kubelet's status manager does: the node lifecycle controller marks the
/// pods of a node it lost touch with not ready (an API-server outage does that), and
/// nothing else would ever mark them ready again.
const RESYNC_PROBES: u32 = 5;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    // Two rustls providers are compiled in (see the workspace's Cargo.toml): pick one.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let client = Client::try_default().await?;
    let pods: Api<Pod> = Api::all(client.clone());
    let nodes: Api<Node> = Api::all(client.clone());
    let tests = tests_pods::serve(
        client.clone(),
        args.pods_dir.clone(),
        args.node_selector.clone(),
        args.tests_selector.clone(),
    );
    tokio::spawn(async move {
        // A kubelet that stopped running half its pods must not look alive.
        if let Err(err) = tests.await {
            tracing::error!("{err:#}");
            std::process::exit(1);
        }
    });
    let mut running: HashMap<String, Worker> = HashMap::new();
    // Pods seen during a (re)list; the workers of pods missing from it are stopped.
    let mut listed: Vec<String> = Vec::new();

    let config = watcher::Config::default().labels(&args.pod_selector);
    // Backed off: an API server that is down is not retried in a busy loop.
    let mut events = watcher::watcher(pods.clone(), config)
        .default_backoff()
        .boxed();
    loop {
        let event = match events.try_next().await {
            Ok(Some(event)) => event,
            Ok(None) => bail!("the pod watch ended"),
            // The watcher re-lists after an error; keep going.
            Err(err) => {
                warn!(%err, "pod watch");
                continue;
            }
        };
        match event {
            Event::Init => listed.clear(),
            Event::InitApply(pod) => {
                listed.push(pod.uid().unwrap_or_default());
                sync(&args, &client, &nodes, &mut running, pod).await;
            }
            Event::InitDone => {
                let gone: Vec<String> = running
                    .keys()
                    .filter(|uid| !listed.contains(uid))
                    .cloned()
                    .collect();
                for uid in gone {
                    if let Some(worker) = running.remove(&uid) {
                        worker.stop().await;
                    }
                }
            }
            Event::Apply(pod) => sync(&args, &client, &nodes, &mut running, pod).await,
            Event::Delete(pod) => {
                if let Some(worker) = running.remove(&pod.uid().unwrap_or_default()) {
                    worker.stop().await;
                }
            }
        }
    }
}

async fn sync(
    args: &Args,
    client: &Client,
    nodes: &Api<Node>,
    running: &mut HashMap<String, Worker>,
    pod: Pod,
) {
    let uid = pod.uid().unwrap_or_default();
    if pod.metadata.deletion_timestamp.is_some() {
        if let Some(worker) = running.remove(&uid) {
            worker.stop().await;
        }
        return;
    }
    if running.contains_key(&uid) {
        return;
    }
    let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.clone()) else {
        return;
    };
    let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
        return;
    };
    match plays(nodes, &node, &args.node_selector).await {
        Ok(true) => {}
        Ok(false) => return,
        Err(err) => {
            warn!(%err, node, "reading the pod's node");
            return;
        }
    }
    let name = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
    match Worker::start(args, client, &pod, &ip).await {
        Ok(worker) => {
            info!(pod = name, %ip, "worker started");
            running.insert(uid, worker);
        }
        Err(err) => {
            warn!(pod = name, "{err:#}");
            let api: Api<Pod> =
                Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
            report_exit(
                &api,
                &pod.name_any(),
                container_name(&pod),
                128,
                &format!("{err:#}"),
            )
            .await;
        }
    }
}

/// Whether a node is one of ours: its labels match the selector (KEY=VALUE, comma-separated).
async fn plays(nodes: &Api<Node>, node: &str, selector: &str) -> kube::Result<bool> {
    let Some(node) = nodes.get_opt(node).await? else {
        return Ok(false);
    };
    let labels = node.labels();
    Ok(selector.split(',').all(|term| match term.split_once('=') {
        Some((key, value)) => labels.get(key).is_some_and(|v| v == value),
        None => labels.contains_key(term),
    }))
}

/// A pod's spec and its one container (the bed's pods have one).
fn spec_and_container(pod: &Pod) -> anyhow::Result<(&PodSpec, &Container)> {
    let spec = pod.spec.as_ref().context("the pod has no spec")?;
    let container = spec
        .containers
        .first()
        .context("the pod has no container")?;
    Ok((spec, container))
}

fn container_name(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .map_or("worker", |c| c.name.as_str())
}

/// One worker process and the task that watches it.
struct Worker {
    pid: Option<u32>,
    watch: JoinHandle<()>,
}

impl Worker {
    async fn start(args: &Args, client: &Client, pod: &Pod, ip: &str) -> anyhow::Result<Self> {
        let (spec, container) = spec_and_container(pod)?;
        let namespace = pod.namespace().unwrap_or_default();
        let dir = args
            .pods_dir
            .join(format!("{namespace}_{}", pod.name_any()));
        std::fs::create_dir_all(&dir)?;
        let mounts = mounts(spec, container, &dir, &args.allow_host_path)?;
        let image = container
            .image
            .as_deref()
            .context("the container names no image")?;
        let mut command = Command::new("python3");
        command
            .arg(&args.run_image)
            .arg("--crane")
            .arg(&args.crane)
            .arg("--store")
            .arg(&args.images_dir);
        // Without a group, the runner takes the user's own from the image's /etc/passwd.
        match run_as(spec, container) {
            (Some(user), Some(group)) => command.arg(format!("--user={user}:{group}")),
            (Some(user), None) => command.arg(format!("--user={user}")),
            (None, _) => &mut command,
        };
        // Never root, whatever the pod asks: these processes run on this host.
        command.arg("--non-root");
        if container
            .security_context
            .as_ref()
            .and_then(|s| s.read_only_root_filesystem)
            == Some(true)
        {
            command.arg("--read-only");
        }
        for (target, (source, read_only)) in &mounts {
            let mode = if *read_only { ":ro" } else { "" };
            command.arg(format!("--bind={}:{target}{mode}", source.display()));
        }
        for var in container.env.iter().flatten() {
            if let Some(value) = &var.value {
                command.arg(format!("--env={}={value}", var.name));
            }
        }
        for part in container.command.iter().flatten() {
            command.arg(format!("--command={part}"));
        }
        command
            .arg(image)
            .arg("--")
            .args(
                container
                    .args
                    .iter()
                    .flatten()
                    .map(|arg| on_pod_ip(arg, ip)),
            )
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("log"))?)
            .stderr(
                std::fs::File::options()
                    .append(true)
                    .open(dir.join("log"))?,
            );
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", args.run_image.display()))?;
        let pid = child.id();
        if let Some(pid) = pid {
            std::fs::write(dir.join("pid"), pid.to_string())?;
        }
        let port = container
            .ports
            .iter()
            .flatten()
            .next()
            .map_or(8000, |p| p.container_port);
        let api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
        let watch = tokio::spawn(watch(
            api,
            pod.name_any(),
            container.name.clone(),
            format!("http://{ip}:{port}/ready"),
            child,
            dir,
        ));
        Ok(Self { pid, watch })
    }

    /// SIGTERM, as the kubelet does, then SIGKILL after the worker's drain would be over.
    async fn stop(self) {
        self.watch.abort();
        let Some(pid) = self.pid else { return };
        let pid = pid.to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status().await;
        for _ in 0..100 {
            let alive = Command::new("kill")
                .args(["-0", &pid])
                .stderr(Stdio::null())
                .status()
                .await
                .is_ok_and(|s| s.success());
            if !alive {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = Command::new("kill").args(["-KILL", &pid]).status().await;
    }
}

/// The pod's mount paths, each with the directory here that stands in for its volume and
/// whether it is mounted read-only. Sorted by path, so a mount lands before any inside it.
fn mounts(
    spec: &PodSpec,
    container: &Container,
    dir: &Path,
    allowed: &[PathBuf],
) -> anyhow::Result<BTreeMap<String, (PathBuf, bool)>> {
    let mut mounts = BTreeMap::new();
    for mount in container.volume_mounts.iter().flatten() {
        let volume = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .with_context(|| format!("volume {} is not in the pod", mount.name))?;
        let path = if let Some(host) = &volume.host_path {
            let path = PathBuf::from(&host.path);
            if !allowed.iter().any(|folder| path.starts_with(folder))
                || path
                    .components()
                    .any(|c| c == std::path::Component::ParentDir)
            {
                bail!(
                    "volume {}: hostPath {} is not a folder this kubelet lets pods mount",
                    volume.name,
                    host.path
                );
            }
            path
        } else if volume.empty_dir.is_some() {
            let path = dir.join("volumes").join(&volume.name);
            std::fs::create_dir_all(&path)?;
            // As the kubelet makes an emptyDir: writable by whatever user the pod runs as.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777))?;
            path
        } else {
            bail!(
                "volume {}: only hostPath and emptyDir volumes exist on the test bed's nodes",
                volume.name
            );
        };
        mounts.insert(
            mount.mount_path.clone(),
            (path, mount.read_only.unwrap_or(false)),
        );
    }
    Ok(mounts)
}

/// An argument as the pod's process sees it: the listen address on the pod's IP, which
/// on a real node would be the pod's own network namespace.
fn on_pod_ip(arg: &str, ip: &str) -> String {
    match arg.split_once('=') {
        Some(("--listen", value)) => {
            let port = value.rsplit_once(':').map_or("8000", |(_, port)| port);
            format!("--listen={ip}:{port}")
        }
        _ => arg.to_owned(),
    }
}

/// The user and group the pod's securityContext asks for (the container's over the pod's);
/// None leaves the image's.
fn run_as(spec: &PodSpec, container: &Container) -> (Option<i64>, Option<i64>) {
    let pod = spec.security_context.as_ref();
    let container = container.security_context.as_ref();
    (
        container
            .and_then(|s| s.run_as_user)
            .or(pod.and_then(|s| s.run_as_user)),
        container
            .and_then(|s| s.run_as_group)
            .or(pod.and_then(|s| s.run_as_group)),
    )
}

/// Probes readiness until the worker exits, writing each change to the pod's status, and
/// reports the exit.
async fn watch(
    api: Api<Pod>,
    pod: String,
    container: String,
    ready_url: String,
    mut child: Child,
    dir: PathBuf,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("a plain HTTP client builds");
    let mut ready = false;
    let mut probes = 0u32;
    loop {
        tokio::select! {
            status = child.wait() => {
                let code = status.ok().and_then(|s| s.code()).unwrap_or(137);
                let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
                let last = log.lines().last().unwrap_or_default();
                warn!(pod, code, last, "worker exited");
                report_exit(&api, &pod, &container, code, last).await;
                return;
            }
            () = tokio::time::sleep(PROBE_PERIOD) => {
                let now = http
                    .get(&ready_url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                probes = probes.wrapping_add(1);
                let drifted = probes.is_multiple_of(RESYNC_PROBES)
                    && api.get(&pod).await.is_ok_and(|p| stored_ready(&p) != now);
                if now != ready || drifted {
                    match set_ready(&api, &pod, &container, now).await {
                        Ok(()) => ready = now,
                        Err(err) => warn!(pod, %err, "writing readiness"),
                    }
                }
            }
        }
    }
}

/// The pod's Ready condition as stored.
fn stored_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn condition(type_: &str, status: bool) -> serde_json::Value {
    json!({
        "type": type_,
        "status": if status { "True" } else { "False" },
        "reason": if status { serde_json::Value::Null } else { json!("ContainersNotReady") },
        "lastTransitionTime": k8s_openapi::jiff::Timestamp::now(),
    })
}

async fn set_ready(api: &Api<Pod>, pod: &str, container: &str, ready: bool) -> kube::Result<()> {
    let patch = json!({"status": {
        "conditions": [condition("Ready", ready), condition("ContainersReady", ready)],
        "containerStatuses": [{"name": container, "ready": ready}],
    }});
    api.patch_status(pod, &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .map(drop)
}

/// A container's status once it ended with `code`, as a kubelet reports it.
fn terminated(container: &str, code: i32, message: &str) -> serde_json::Value {
    json!({
        "name": container,
        "ready": false,
        "started": false,
        "state": {"running": null, "terminated": {
            "exitCode": code,
            "reason": if code == 0 { "Completed" } else { "Error" },
            "message": message,
            "finishedAt": k8s_openapi::jiff::Timestamp::now(),
        }},
    })
}

async fn report_exit(api: &Api<Pod>, pod: &str, container: &str, code: i32, message: &str) {
    let patch = json!({"status": {
        "conditions": [condition("Ready", false), condition("ContainersReady", false)],
        "containerStatuses": [terminated(container, code, message)],
    }});
    if let Err(err) = api
        .patch_status(pod, &PatchParams::default(), &Patch::Strategic(patch))
        .await
    {
        warn!(pod, %err, "reporting the worker's exit");
    }
}
