//! Test 7: what `kubectl get` and `kubectl explain` show for kubeswarm's kinds.

use std::collections::BTreeMap;

use anyhow::{Context, ensure};
use kube::CustomResourceExt;
use kubeswarm::api::{ModelPool, SwarmJob};
use serde_json::Value;

use crate::bed::Bed;

/// `kubectl get` of one object: the column names, and the row as name to value. Values
/// are cut at the columns' offsets: an empty cell is blank, not a word to split on.
fn table(out: &str) -> anyhow::Result<(Vec<&str>, BTreeMap<&str, &str>)> {
    let mut lines = out.lines();
    let header = lines.next().context("no header")?;
    let row = lines.next().context("no row")?;
    let starts: Vec<usize> = header
        .char_indices()
        .filter(|&(i, c)| c != ' ' && (i == 0 || header.as_bytes()[i - 1] == b' '))
        .map(|(i, _)| i)
        .collect();
    let mut cells = BTreeMap::new();
    for (n, &start) in starts.iter().enumerate() {
        let end = starts
            .get(n + 1)
            .copied()
            .unwrap_or(row.len())
            .min(row.len());
        cells.insert(
            header[start..].split(' ').next().unwrap_or_default(),
            row.get(start..end).unwrap_or_default().trim(),
        );
    }
    Ok((header.split_whitespace().collect(), cells))
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
    // An external pool at an address that answers nothing (TEST-NET-1, which the tenancy
    // policy does not refuse), and a job that calls a pool
    // that does not exist: both stay unavailable, waiting, and show it.
    bed.apply(
        Some(&ns),
        r#"
apiVersion: kubeswarm.dev/v1alpha1
kind: ModelPool
metadata: {name: vllm}
spec:
  external: {url: "http://192.0.2.1:9/v1", model: qwen}
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

    // The endpoint of an external pool is a wide column: most pools have none.
    let pools = bed.kubectl(&["get", "modelpools", "-n", &ns])?;
    let (header, row) = table(&pools)?;
    ensure!(
        header
            == [
                "NAME",
                "MODEL",
                "READY",
                "DESIRED",
                "QUEUE",
                "AVAILABLE",
                "AGE"
            ],
        "modelpool columns: {header:?}"
    );
    ensure!(
        row["NAME"] == "vllm"
            && row["MODEL"].is_empty()
            && row["DESIRED"] == "1"
            && row["QUEUE"].is_empty(),
        "modelpool row: {row:?}"
    );
    let pools = bed.kubectl(&["get", "modelpools", "-n", &ns, "-o", "wide"])?;
    let (header, row) = table(&pools)?;
    ensure!(
        header[..3] == ["NAME", "MODEL", "EXTERNAL"],
        "modelpool wide columns: {header:?}"
    );
    ensure!(
        row["EXTERNAL"] == "http://192.0.2.1:9/v1",
        "modelpool wide row: {row:?}"
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
        row["NAME"] == "review" && row["POOL"] == "missing" && row["TOTAL"] == "4",
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
