//! Test 7: what `kubectl get` and `kubectl explain` show for kubeswarm's kinds.

use anyhow::{Context, ensure};
use kube::CustomResourceExt;
use kubeswarm::api::{ModelPool, SwarmJob};
use serde_json::Value;

use crate::bed::Bed;

/// Columns of `kubectl get`: the header, and the row of the one object.
fn table(out: &str) -> anyhow::Result<(Vec<&str>, Vec<&str>)> {
    let mut lines = out.lines();
    let header = lines
        .next()
        .context("no header")?
        .split_whitespace()
        .collect();
    let row = lines.next().context("no row")?.split_whitespace().collect();
    Ok((header, row))
}

/// The description the CRD gives a field (a path of property names under spec).
fn description(crd: &Value, path: &[&str]) -> anyhow::Result<String> {
    let mut schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    for name in path {
        schema = &schema["properties"][name];
    }
    schema["description"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("{path:?} has no description"))
}

pub async fn printer_columns_and_explain(bed: &Bed) -> anyhow::Result<()> {
    let ns = bed.namespace("e2e-columns").await?;
    // An external pool at an address that answers nothing, and a job that calls a pool
    // that does not exist: both stay unavailable, waiting, and show it.
    bed.apply(
        Some(&ns),
        r#"
apiVersion: kubeswarm.dev/v1alpha1
kind: ModelPool
metadata: {name: vllm}
spec:
  external: {url: "http://127.0.0.1:9/v1", model: qwen}
---
apiVersion: kubeswarm.dev/v1alpha1
kind: SwarmJob
metadata: {name: review}
spec:
  task: Review the change.
  fanOut: {pool: missing, subagents: 4}
  verification: {mode: none}
  aggregation: {strategy: collect}
"#,
    )
    .await?;

    let pools = bed.kubectl(&["get", "modelpools", "-n", &ns])?;
    let (header, row) = table(&pools)?;
    ensure!(
        header
            == [
                "NAME",
                "MODEL",
                "EXTERNAL",
                "READY",
                "DESIRED",
                "QUEUE",
                "AVAILABLE",
                "AGE"
            ],
        "modelpool columns: {header:?}"
    );
    ensure!(
        row[..3] == ["vllm", "<none>", "http://127.0.0.1:9/v1"] && row[5] == "<none>",
        "modelpool row: {row:?}"
    );

    let jobs = bed.kubectl(&["get", "swarmjobs", "-n", &ns])?;
    let (header, row) = table(&jobs)?;
    ensure!(
        header
            == [
                "NAME", "POOL", "FINISHED", "TOTAL", "VERIFIED", "COMPLETE", "FAILED", "AGE"
            ],
        "swarmjob columns: {header:?}"
    );
    ensure!(
        row[..2] == ["review", "missing"] && row[3] == "4",
        "swarmjob row: {row:?}"
    );

    // explain reads the schema the API server publishes: the doc comments of the types.
    for (resource, crd, path) in [
        (
            "swarmjobs.spec.fanOut.subagents",
            SwarmJob::crd(),
            ["fanOut", "subagents"].as_slice(),
        ),
        (
            "swarmjobs.spec.verification",
            SwarmJob::crd(),
            ["verification"].as_slice(),
        ),
        (
            "modelpools.spec.queueName",
            ModelPool::crd(),
            ["queueName"].as_slice(),
        ),
    ] {
        let crd = serde_json::to_value(crd)?;
        let mut full = vec!["spec"];
        full.extend(path);
        let text = description(&crd, &full)?;
        let out = bed.kubectl(&["explain", resource])?;
        let first: String = text
            .split_whitespace()
            .take(8)
            .collect::<Vec<_>>()
            .join(" ");
        let shown: String = out.split_whitespace().collect::<Vec<_>>().join(" ");
        ensure!(
            shown.contains(&first),
            "kubectl explain {resource} lacks {first:?}:\n{out}"
        );
    }
    Ok(())
}
