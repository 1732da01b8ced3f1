//! The images `hack/images` builds without a container engine are what the bed runs: the
//! chart installs them from the bed's registry, the operator and every worker pod run from
//! their pulled filesystems as the image's non-root user on a read-only root, a broken
//! image does not run, and a rebuild from the same binaries gives the same digests.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use serde_json::{Value, json};

use crate::bed::{Bed, repo_root};

/// The images, each with the port its config exposes.
const IMAGES: [(&str, Option<&str>); 2] =
    [("kubeswarm", None), ("inference-worker", Some("8000/tcp"))];

/// The user every image and pod runs as (distroless's `nonroot`).
const NONROOT: &str = "65532";

pub async fn are_what_the_bed_runs(bed: &Bed) -> anyhow::Result<()> {
    let version = app_version()?;
    let registry = &bed.env["REGISTRY"];
    for (name, port) in IMAGES {
        let reference = format!("{registry}/{name}:{version}");
        let config: Value = serde_json::from_str(&crane(bed, &["config", &reference])?)?;
        ensure!(
            config["os"] == "linux"
                && config["architecture"] == std::env::consts::ARCH.replace("x86_64", "amd64"),
            "{reference}: platform {}/{}",
            config["os"],
            config["architecture"]
        );
        let run = &config["config"];
        ensure!(
            run["User"] == format!("{NONROOT}:{NONROOT}"),
            "{reference}: User {}",
            run["User"]
        );
        ensure!(
            run["Entrypoint"] == json!([format!("/usr/local/bin/{name}")]),
            "{reference}: Entrypoint {}",
            run["Entrypoint"]
        );
        let labels = &run["Labels"];
        for (label, want) in [("title", name), ("version", version.as_str())] {
            ensure!(
                labels[format!("org.opencontainers.image.{label}")] == want,
                "{reference}: label {label} is {}",
                labels[format!("org.opencontainers.image.{label}")]
            );
        }
        ensure!(
            labels["org.opencontainers.image.revision"]
                .as_str()
                .is_some_and(|r| r.len() >= 40),
            "{reference}: no revision label"
        );
        let ports: Vec<String> = run["ExposedPorts"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(p, _)| p.clone())
            .collect();
        let want: Vec<String> = port.iter().map(|p| (*p).to_owned()).collect();
        ensure!(
            ports == want,
            "{reference}: exposed ports {ports:?}, not {want:?}"
        );
    }

    // The chart's Deployment names the operator image at the chart's appVersion, and the
    // bed runs the operator from exactly that image.
    let deployments: Api<Deployment> = Api::namespaced(bed.client.clone(), "kubeswarm-system");
    let deployment = deployments.get("kubeswarm").await?;
    let image = deployment
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|s| s.containers.into_iter().next())
        .and_then(|c| c.image)
        .context("the Deployment has no image")?;
    ensure!(
        image == format!("{registry}/kubeswarm:{version}"),
        "the Deployment runs {image}"
    );
    let pid = std::fs::read_to_string(bed.dir.join("pids/operator"))?;
    runs_from(bed, pid.trim(), &image).context("the operator")?;

    // A broken image fails here as on a node: the worker's, with a root user or an
    // entrypoint that is not in it.
    let worker = format!("{registry}/inference-worker:{version}");
    for (flag, value, error) in [
        ("--user", "0:0", "runAsNonRoot"),
        ("--entrypoint", "/usr/local/bin/absent", "No such file"),
    ] {
        let broken = format!("{registry}/inference-worker:broken-{}", &flag[2..]);
        crane(bed, &["mutate", &worker, flag, value, "-t", &broken])?;
        let out = Command::new("python3")
            .arg(repo_root().join("e2e/lib/run_image.py"))
            .arg("--crane")
            .arg(&bed.env["CRANE"])
            .arg("--store")
            .arg(bed.dir.join("images"))
            .args(["--non-root", &broken, "--", "--version"])
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && stderr.contains(error),
            "{broken} ({flag} {value}) ran: {stderr}"
        );
    }

    // Rebuilt from the same binaries and commit, with no cached layer: the same bytes.
    let out = bed.dir.join("rebuilt");
    let status = Command::new(repo_root().join("hack/images"))
        .args(["--rebuild", "--out"])
        .arg(&out)
        .status()?;
    ensure!(status.success(), "hack/images --rebuild failed ({status})");
    for (name, _) in IMAGES {
        let index: Value =
            serde_json::from_slice(&std::fs::read(out.join(name).join("index.json"))?)?;
        let rebuilt = &index["manifests"][0]["digest"];
        let pushed = crane(bed, &["digest", &format!("{registry}/{name}:{version}")])?;
        ensure!(
            rebuilt == pushed.trim(),
            "{name}: rebuilt as {rebuilt}, pushed as {}",
            pushed.trim()
        );
    }
    Ok(())
}

/// Every worker pod in the namespace runs its image, as the image's user, read-only.
pub async fn worker_pods_run_their_images(bed: &Bed, ns: &str) -> anyhow::Result<usize> {
    let pods: Api<Pod> = Api::namespaced(bed.client.clone(), ns);
    let list = pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=inference-worker"))
        .await?;
    for pod in &list.items {
        let image = pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .and_then(|c| c.image.clone())
            .context("a worker pod without an image")?;
        ensure!(
            image.starts_with(&bed.env["REGISTRY"]),
            "{}: runs {image}, not an image of the bed's registry",
            pod.name_any()
        );
        let pid = std::fs::read_to_string(
            bed.dir
                .join("pods")
                .join(format!("{ns}_{}/pid", pod.name_any())),
        )?;
        runs_from(bed, pid.trim(), &image).with_context(|| pod.name_any())?;
    }
    Ok(list.items.len())
}

/// Whether process `pid` has the image's filesystem as its root, mounted read-only, and
/// runs as the non-root user.
fn runs_from(bed: &Bed, pid: &str, image: &str) -> anyhow::Result<()> {
    let digest = crane(bed, &["digest", image])?;
    let want = bed.dir.join("images").join(digest.trim().replace(':', "-"));
    let proc = Path::new("/proc").join(pid);
    let root = std::fs::read_link(proc.join("root"))?;
    ensure!(
        root == want,
        "its root is {}, not {image} at {}",
        root.display(),
        want.display()
    );
    let status = std::fs::read_to_string(proc.join("status"))?;
    let uids = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .context("no Uid line in /proc/PID/status")?;
    ensure!(
        uids.split_whitespace().all(|uid| uid == NONROOT),
        "it runs as uids {uids}"
    );
    // mountinfo: ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS ...
    let mounts = std::fs::read_to_string(proc.join("mountinfo"))?;
    let Some(options) = mounts.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        (fields.get(4) == Some(&"/")).then(|| fields.get(5).copied().unwrap_or_default())
    }) else {
        bail!("it has no root mount");
    };
    ensure!(
        options.split(',').any(|o| o == "ro"),
        "its root is mounted {options}"
    );
    Ok(())
}

fn crane(bed: &Bed, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(&bed.env["CRANE"]).args(args).output()?;
    ensure!(
        out.status.success(),
        "crane {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

fn app_version() -> anyhow::Result<String> {
    let chart: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(
        repo_root().join("charts/kubeswarm/Chart.yaml"),
    )?)?;
    chart["appVersion"]
        .as_str()
        .map(str::to_owned)
        .context("the chart has no appVersion")
}
