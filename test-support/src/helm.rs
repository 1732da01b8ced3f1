//! The chart as the pinned `helm` renders it; shared by the test binaries that check it.

use std::path::PathBuf;
use std::process::Command;

use serde::Deserialize;
use serde_json::Value;

/// The repository's root, read when the test runs.
pub fn repo_root() -> PathBuf {
    // Read when the test runs: clones share one target directory (see support.rs).
    PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
        .join("..")
}

/// The pinned helm, built into the cache by `hack/install-tool` (instant once built).
pub fn helm() -> String {
    if let Ok(helm) = std::env::var("HELM") {
        return helm;
    }
    let out = Command::new(repo_root().join("hack/install-tool"))
        .arg("helm")
        .output()
        .expect("hack/install-tool runs");
    assert!(
        out.status.success(),
        "installing helm failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8 path")
        .trim()
        .to_owned()
}

pub fn render(values: Option<&str>) -> Vec<Value> {
    let chart = repo_root().join("charts/kubeswarm");
    let mut cmd = Command::new(helm());
    cmd.args([
        "template",
        "ks",
        "--namespace",
        "kubeswarm-system",
        "--kube-version",
        "1.33.0",
    ])
    .arg(&chart);
    if let Some(values) = values {
        cmd.arg("-f").arg(chart.join(values));
    }
    let out = cmd.output().expect("helm runs");
    assert!(
        out.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).expect("rendered YAML parses"))
        .filter(|doc| !doc.is_null())
        .collect()
}
