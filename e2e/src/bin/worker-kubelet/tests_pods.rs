//! The pods of SwarmJobs' `tests` checks (`--tests-selector`), as a kubelet would run
//! them: the container's command with this host's interpreter, its ConfigMap, Secret and
//! emptyDir volumes as directories here, and its exit and termination message written to
//! the pod's status. The termination message file is passed as the last argument, which
//! the operator's runner takes in place of /dev/termination-log (a real kubelet mounts a
//! file there; this one has no mount namespace to do it in).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret};
use kube::api::{Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::process::Command;
use tracing::{info, warn};

/// What a kubelet keeps of a termination message.
const MESSAGE_BYTES: usize = 4096;

/// Runs every test pod bound to one of this kubelet's nodes, once.
pub async fn serve(
    client: Client,
    pods_dir: PathBuf,
    node_selector: String,
    selector: String,
) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::all(client.clone());
    let nodes: Api<Node> = Api::all(client.clone());
    let mut started: HashSet<String> = HashSet::new();
    let config = watcher::Config::default().labels(&selector);
    let mut events = watcher::watcher(pods, config).default_backoff().boxed();
    loop {
        let pod = match events.try_next().await {
            Ok(Some(Event::Apply(pod) | Event::InitApply(pod))) => pod,
            Ok(Some(_)) => continue,
            Ok(None) => bail!("the test pod watch ended"),
            Err(err) => {
                warn!(%err, "test pod watch");
                continue;
            }
        };
        let uid = pod.uid().unwrap_or_default();
        let terminated = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .is_some_and(|c| c.state.as_ref().is_some_and(|s| s.terminated.is_some()));
        let bound = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .filter(|_| pod.status.as_ref().is_some_and(|s| s.pod_ip.is_some()));
        let Some(node) = bound else { continue };
        if terminated || pod.metadata.deletion_timestamp.is_some() || started.contains(&uid) {
            continue;
        }
        match super::plays(&nodes, &node, &node_selector).await {
            Ok(true) => {}
            Ok(false) => continue,
            Err(err) => {
                warn!(%err, node, "reading the test pod's node");
                continue;
            }
        }
        started.insert(uid);
        let client = client.clone();
        let dir = pods_dir.join(format!(
            "{}_{}",
            pod.namespace().unwrap_or_default(),
            pod.name_any()
        ));
        tokio::spawn(async move {
            let name = pod.name_any();
            let api: Api<Pod> =
                Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
            let (code, message) = match run(&client, &pod, &dir).await {
                Ok(ended) => ended,
                Err(err) => (128, format!("{err:#}")),
            };
            info!(pod = name, code, "test pod ended");
            report(&api, &pod, code, &message).await;
        });
    }
}

/// Runs the pod's container to its end: its exit code and termination message.
async fn run(client: &Client, pod: &Pod, dir: &Path) -> anyhow::Result<(i32, String)> {
    let (spec, container) = super::spec_and_container(pod)?;
    let namespace = pod.namespace().unwrap_or_default();
    std::fs::create_dir_all(dir)?;
    let mut mounts = BTreeMap::new();
    for mount in container.volume_mounts.iter().flatten() {
        let volume = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .with_context(|| format!("volume {} is not in the pod", mount.name))?;
        let path = dir.join("volumes").join(&volume.name);
        std::fs::create_dir_all(&path)?;
        let files: BTreeMap<String, Vec<u8>> = if let Some(source) = &volume.config_map {
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
            let map = api.get(&source.name).await?;
            map.data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect()
        } else if let Some(source) = &volume.secret {
            let api: Api<Secret> = Api::namespaced(client.clone(), &namespace);
            let name = source.secret_name.as_deref().unwrap_or_default();
            let secret = api.get(name).await?;
            secret
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect()
        } else if volume.empty_dir.is_some() {
            BTreeMap::new()
        } else {
            bail!(
                "volume {}: test pods get configMap, secret and emptyDir volumes here",
                volume.name
            );
        };
        for (file, bytes) in files {
            std::fs::write(path.join(file), bytes)?;
        }
        mounts.insert(mount.mount_path.clone(), path);
    }
    let host = |value: &str| -> String {
        for (mount, path) in mounts.iter().rev() {
            if let Some(rest) = value.strip_prefix(mount.as_str())
                && (rest.is_empty() || rest.starts_with('/'))
            {
                return format!("{}{rest}", path.display());
            }
        }
        value.to_owned()
    };
    let mut argv: Vec<String> = container
        .command
        .iter()
        .flatten()
        .chain(container.args.iter().flatten())
        .map(|a| host(a))
        .collect();
    let report = dir.join("termination-log");
    argv.push(report.display().to_string());
    let (program, args) = argv.split_first().context("the container has no command")?;
    let log = std::fs::File::create(dir.join("log"))?;
    let status = Command::new(program)
        .args(args)
        .current_dir(host(container.working_dir.as_deref().unwrap_or("/")))
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .status()
        .await
        .with_context(|| format!("starting {program}"))?;
    let mut message = std::fs::read_to_string(&report).unwrap_or_default();
    message.truncate(MESSAGE_BYTES);
    Ok((status.code().unwrap_or(137), message))
}

async fn report(api: &Api<Pod>, pod: &Pod, code: i32, message: &str) {
    let container = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .map_or("tests", |c| c.name.as_str());
    let patch = json!({"status": {
        "phase": if code == 0 { "Succeeded" } else { "Failed" },
        "containerStatuses": [super::terminated(container, code, message)],
    }});
    if let Err(err) = api
        .patch_status(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Strategic(patch),
        )
        .await
    {
        warn!(pod = pod.name_any(), %err, "reporting the test pod's end");
    }
}
