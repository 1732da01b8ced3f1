//! `kubeswarm run`, the real binary: manifests refused with the CRD's messages, and a
//! whole job through real inference-workers on SmolLM2.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn kubeswarm(args: &[&str], dir: &Path) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kubeswarm"));
    command.arg("run").args(args).current_dir(dir);
    if let Some(model) = std::env::var_os("KUBESWARM_TEST_MODEL") {
        command.env("KUBESWARM_MODEL", model);
    }
    command.output().expect("running kubeswarm")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kubeswarm-local-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn invalid_manifests_get_the_crds_messages_and_no_worker_starts() {
    let dir = scratch("invalid");
    std::fs::write(
        dir.join("job.yaml"),
        r#"
apiVersion: kubeswarm.dev/v1alpha1
kind: SwarmJob
metadata: {name: broken}
spec:
  task: Count to three.
  subtasks: [one, two]
  fanOut: {pool: workers, subagents: 3, maxConcurrency: 5}
  aggregation: {strategy: bestOf}
  verification: {mode: none}
"#,
    )
    .unwrap();
    let out = kubeswarm(&["job.yaml"], &dir);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for message in [
        "job.yaml: SwarmJob broken is invalid:",
        "  - spec.subtasks must have exactly spec.fanOut.subagents entries, one per subagent",
        "  - spec.fanOut.maxConcurrency cannot exceed spec.fanOut.subagents",
        "  - spec.aggregation.strategy bestOf ranks outputs by the gate's score",
    ] {
        assert!(
            stderr.contains(message),
            "missing {message:?} in:\n{stderr}"
        );
    }
    assert!(
        !dir.join("kubeswarm-out").exists(),
        "nothing is written for an invalid job"
    );

    std::fs::write(dir.join("typo.yaml"), "apiVersion: kubeswarm.dev/v1alpha1\nkind: SwarmJob\nmetadata: {name: t}\nspec: {task: x, fanOut: {pool: w, subagents: many}}\n").unwrap();
    let stderr = String::from_utf8_lossy(&kubeswarm(&["typo.yaml"], &dir).stderr).into_owned();
    assert!(
        stderr.contains("typo.yaml: not a valid SwarmJob") && stderr.contains("invalid type"),
        "{stderr}"
    );

    std::fs::write(
        dir.join("pool.yaml"),
        "apiVersion: kubeswarm.dev/v1alpha1\nkind: ModelPool\nmetadata: {name: p}\n",
    )
    .unwrap();
    let stderr = String::from_utf8_lossy(&kubeswarm(&["pool.yaml"], &dir).stderr).into_owned();
    assert!(stderr.contains("pool.yaml: has no SwarmJob"), "{stderr}");
}

#[test]
fn a_name_that_would_leave_the_output_folder_is_refused_and_nothing_is_removed() {
    let dir = scratch("escape");
    // A fresh run empties <out>/<name> first: these names would point it at the folder
    // above, at any absolute path (here one inside the scratch folder) or at the output
    // folder itself.
    std::fs::create_dir_all(dir.join("out/keep")).unwrap();
    std::fs::create_dir_all(dir.join("victim")).unwrap();
    std::fs::write(dir.join("precious"), "still here").unwrap();
    let absolute = dir.join("victim").display().to_string();
    for name in ["..", absolute.as_str(), "''"] {
        std::fs::write(
            dir.join("job.yaml"),
            format!(
                "apiVersion: kubeswarm.dev/v1alpha1\nkind: SwarmJob\nmetadata: {{name: {name}}}\nspec: {{task: x, fanOut: {{pool: w, subagents: 1}}, verification: {{mode: none}}, aggregation: {{strategy: collect}}}}\n"
            ),
        )
        .unwrap();
        let out = kubeswarm(&["job.yaml", "--out", "out"], &dir);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(
            stderr.contains("is not a Kubernetes object name"),
            "{name}: {stderr}"
        );
        assert!(
            dir.join("precious").exists(),
            "{name} removed a file above --out"
        );
        assert!(dir.join("out/keep").exists(), "{name} emptied --out");
        assert!(
            dir.join("victim").exists(),
            "{name} removed an absolute path"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_job_runs_through_real_workers_and_leaves_its_results() {
    let dir = scratch("real");
    std::fs::write(
        dir.join("job.yaml"),
        r#"
apiVersion: kubeswarm.dev/v1alpha1
kind: SwarmJob
metadata: {name: colours}
spec:
  task: Name one colour of the rainbow. Answer with one word.
  fanOut: {pool: workers, subagents: 3, maxTokens: 16, temperature: 0.9}
  # Every output reaches the gate, finished or cut off at 16 tokens.
  verification: {mode: adversarial, pool: gate, minScore: 0, truncated: accept}
  aggregation: {strategy: synthesize}
"#,
    )
    .unwrap();
    let out = kubeswarm(&["job.yaml", "--max-tokens", "48"], &dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kubeswarm run failed:\n{stderr}");
    let job = dir.join("kubeswarm-out/colours");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "kubeswarm-out/colours/answer.md"
    );
    assert!(
        !std::fs::read_to_string(job.join("answer.md"))
            .unwrap()
            .trim()
            .is_empty()
    );
    // Progress went to stderr as plain lines (not a terminal here).
    assert!(
        stderr.contains("pool workers: starting an inference-worker"),
        "{stderr}"
    );
    assert!(stderr.contains("fan out: 3 subagents"), "{stderr}");
    for i in 0..3 {
        let record: Value = serde_json::from_str(
            &std::fs::read_to_string(job.join(format!("subagents/{i:03}.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(record["stage"], "finished");
        assert!(record["completionTokens"].as_u64().unwrap() > 0);
        // The gate's answer was constrained to the verdict schema and read back. With
        // minScore 0 the pass is the gate's own, which a sampled 135M gate may refuse:
        // then it names why.
        assert!(
            record["verdict"]["score"].as_u64().unwrap() <= 100,
            "{record}"
        );
        let pass = record["verdict"]["pass"]
            .as_bool()
            .expect("a verdict's pass");
        assert!(
            pass || !record["verdict"]["issues"].as_array().unwrap().is_empty(),
            "{record}"
        );
    }
    let usage: Value =
        serde_json::from_str(&std::fs::read_to_string(job.join("usage.json")).unwrap()).unwrap();
    assert_eq!(usage["result"]["status"], "Complete");
    assert_eq!(usage["pools"]["workers"]["calls"], 3);
    assert_eq!(
        usage["pools"]["gate"]["calls"], 4,
        "three verdicts and the synthesis"
    );
    assert!(usage["totalTokens"].as_u64().unwrap() > 0);
    let _ = std::fs::remove_dir_all(&dir);
}

// The worker decodes under the SVG grammar, so whatever a subagent finishes is well-formed
// SVG; whether it is a picture the check renders it to see, and a blank one goes back to
// the model once with that as the issue. An output cut off at maxTokens fails before the
// check: a grammar cannot make a 135M model close its document in time. Greedy decoding
// keeps the run the same each time; the subtasks spell out coordinates because the 135M
// model otherwise draws small shapes at the corner of an empty canvas.
#[test]
fn an_svg_check_makes_every_finished_output_a_drawing() {
    let dir = scratch("svg");
    std::fs::write(
        dir.join("job.yaml"),
        r#"
apiVersion: kubeswarm.dev/v1alpha1
kind: SwarmJob
metadata: {name: shapes}
spec:
  task: Draw a simple picture as an SVG document.
  subtasks: ["a big red circle: cx 50, cy 50, r 40", "a blue square: x 10, y 10, width 80, height 80", "a green background rect of width 100 and height 100 with a yellow circle in the middle"]
  fanOut: {pool: workers, subagents: 3, maxTokens: 400, temperature: 0}
  verification: {mode: adversarial, pool: gate, minScore: 0, checks: [{type: svg}], repairRounds: 1}
  aggregation: {strategy: collect}
"#,
    )
    .unwrap();
    let out = kubeswarm(&["job.yaml"], &dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kubeswarm run failed:\n{stderr}");
    let job = dir.join("kubeswarm-out/shapes");
    let (mut drawings, mut blank) = (0, 0);
    for i in 0..3 {
        let record: Value = serde_json::from_str(
            &std::fs::read_to_string(job.join(format!("subagents/{i:03}.json"))).unwrap(),
        )
        .unwrap();
        let output = record["output"].as_str().unwrap();
        if record["finishReason"] != "Length" {
            let doc = roxmltree::Document::parse(output).unwrap_or_else(|e| {
                panic!("subagent {i} finished with malformed SVG ({e}): {output}")
            });
            assert_eq!(doc.root_element().tag_name().name(), "svg", "{output}");
            assert_eq!(record["finishReason"], "Stop", "{record}");
            if record["verdict"]["pass"] == true {
                assert!(job.join(format!("subagents/{i:03}.svg")).exists());
                let thumbnail = job.join(format!("subagents/{i:03}.png"));
                let png = std::fs::read(&thumbnail).unwrap();
                assert!(png.starts_with(b"\x89PNG"), "{}", thumbnail.display());
                drawings += 1;
            } else {
                // Well-formed but blank: the rendering check says so, for the repair round.
                let issue = record["verdict"]["issues"][0].as_str().unwrap();
                assert!(issue.starts_with("the picture "), "{record}");
                blank += 1;
            }
        } else {
            // Cut off mid-drawing: failed as cut off, before any check or gate.
            assert_eq!(record["verdict"]["pass"], false, "{record}");
            assert_eq!(record["finishReason"], "Length", "{record}");
            let issue = record["verdict"]["issues"][0].as_str().unwrap();
            assert!(
                issue.contains("cut off at maxTokens (400 tokens)"),
                "{record}"
            );
        }
    }
    assert!(
        drawings > 0,
        "no subagent finished a drawing ({blank} blank):\n{stderr}"
    );
    let gallery = std::fs::read_to_string(job.join("index.html")).unwrap();
    assert_eq!(gallery.matches(".png").count(), drawings, "{gallery}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn outputs_and_an_answer_cut_off_at_their_limits_say_so_in_the_output_folder() {
    let dir = scratch("truncated");
    std::fs::write(
        dir.join("job.yaml"),
        r#"
apiVersion: kubeswarm.dev/v1alpha1
kind: SwarmJob
metadata: {name: cut}
spec:
  task: Write three long sentences about the sea.
  fanOut: {pool: workers, subagents: 2, maxTokens: 3}
  verification: {mode: none, truncated: accept}
  aggregation: {strategy: synthesize, pool: writer, maxTokens: 3}
"#,
    )
    .unwrap();
    let out = kubeswarm(&["job.yaml"], &dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kubeswarm run failed:\n{stderr}");
    assert!(
        stderr.contains("2 of 2 outputs were cut off at spec.fanOut.maxTokens"),
        "{stderr}"
    );
    assert!(
        stderr.contains("the answer was cut off at its token limit (spec.aggregation.maxTokens): answer.md says so"),
        "{stderr}"
    );
    let job = dir.join("kubeswarm-out/cut");
    for i in 0..2 {
        let record: Value = serde_json::from_str(
            &std::fs::read_to_string(job.join(format!("subagents/{i:03}.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(record["finishReason"], "Length", "{record}");
        assert_eq!(record["verdict"]["pass"], true, "accepted: {record}");
    }
    let usage: Value =
        serde_json::from_str(&std::fs::read_to_string(job.join("usage.json")).unwrap()).unwrap();
    assert_eq!(usage["truncatedOutputs"], 2);
    assert_eq!(usage["result"]["answerTruncated"], true, "{usage}");
    let answer = std::fs::read_to_string(job.join("answer.md")).unwrap();
    assert!(
        answer.ends_with("this answer was cut off at its token limit and is incomplete: raise spec.aggregation.maxTokens.\n"),
        "{answer}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn each_pool_can_serve_its_own_model() {
    let dir = scratch("models");
    std::fs::write(
        dir.join("job.yaml"),
        r#"
apiVersion: kubeswarm.dev/v1alpha1
kind: SwarmJob
metadata: {name: two-models}
spec:
  task: Name a colour.
  fanOut: {pool: workers, subagents: 1, maxTokens: 8}
  verification: {mode: adversarial, pool: gate}
  aggregation: {strategy: collect}
"#,
    )
    .unwrap();
    // The gate gets a file that does not exist; the workers keep the default model and
    // start first, so the error is the gate's alone.
    let missing = dir.join("no-such-gate.gguf");
    let gate = format!("gate={}", missing.display());
    let out = kubeswarm(&["job.yaml", "--model", &gate], &dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let workers = stderr
        .lines()
        .find(|l| l.starts_with("pool workers: starting an inference-worker on"))
        .unwrap_or_else(|| panic!("no worker for pool workers:\n{stderr}"));
    assert!(
        workers.contains("SmolLM2") && !workers.contains("no-such-gate"),
        "the workers keep the default model: {workers}"
    );
    assert!(
        stderr.contains(&format!(
            "pool gate: starting an inference-worker on {}",
            missing.display()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("the worker for pool gate"), "{stderr}");

    std::fs::remove_dir_all(dir.join("kubeswarm-out")).unwrap();
    let out = kubeswarm(&["job.yaml", "--model", "judge=x.gguf"], &dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "--model names pool judge, and the job calls only workers, gate: use one of those names"
        ),
        "{stderr}"
    );
    assert!(!dir.join("kubeswarm-out").exists(), "nothing started");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_job_that_runs_and_fails_exits_3_and_keeps_its_records() {
    let dir = scratch("failed");
    std::fs::write(
        dir.join("job.yaml"),
        r#"
apiVersion: kubeswarm.dev/v1alpha1
kind: SwarmJob
metadata: {name: unanswered}
spec:
  task: Name a colour.
  fanOut: {pool: workers, subagents: 2, maxTokens: 8, firstSubagent: greedy}
  verification: {mode: none, truncated: accept}
  aggregation: {strategy: vote, answer: {type: regex, pattern: 'ZZZ(\d+)QQQ'}}
"#,
    )
    .unwrap();
    let out = kubeswarm(&["job.yaml"], &dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("AggregationFailed: none of the 2 passing outputs has an answer"),
        "{stderr}"
    );
    let job = dir.join("kubeswarm-out/unanswered");
    // A vote asks the worker for log-probabilities, greedy (subagent 0) and sampled: each
    // output's confidence, the geometric mean of its tokens' probabilities, is recorded.
    for record in ["subagents/000.json", "subagents/001.json"] {
        let record: Value =
            serde_json::from_str(&std::fs::read_to_string(job.join(record)).unwrap()).unwrap();
        let confidence = record["confidence"].as_f64();
        assert!(confidence.is_some_and(|c| c > 0.0 && c <= 1.0), "{record}");
    }
    let usage: Value =
        serde_json::from_str(&std::fs::read_to_string(job.join("usage.json")).unwrap()).unwrap();
    assert_eq!(usage["result"]["reason"], "AggregationFailed", "{usage}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `make bench-gpu`'s benchmark, whole, as a GPU machine will run it (a random-weight model
/// written there, the worker started on it, the engine driving it through `kubeswarm run`,
/// figures from the worker's metrics), here on the CPU and a tiny shape: a GPU's few
/// minutes are not spent finding a broken script.
#[test]
fn the_gpu_benchmark_runs_end_to_end_on_a_tiny_random_model() {
    let dir = scratch("bench-gpu");
    let kubeswarm = Path::new(env!("CARGO_BIN_EXE_kubeswarm"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("python3")
        .arg(root.join("inference-worker/bench/gpu.py"))
        .arg("--worker")
        .arg(kubeswarm.with_file_name("inference-worker"))
        .arg("--kubeswarm")
        .arg(kubeswarm)
        .args(["--shape", "tiny", "--device", "cpu", "--concurrency", "1,3"])
        .args(["--max-tokens", "32", "--bandwidth-gbs", "20"])
        .arg("--work")
        .arg(dir.join("work"))
        .arg("--out")
        .arg(dir.join("out"))
        .output()
        .expect("running python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let figures: Value =
        serde_json::from_slice(&std::fs::read(dir.join("out/bench-gpu.json")).unwrap()).unwrap();
    let levels = figures["levels"].as_array().expect("levels");
    assert_eq!(levels.len(), 2, "{figures:#}");
    for (level, concurrency) in levels.iter().zip([1, 3]) {
        assert_eq!(level["concurrency"], concurrency);
        // Every subagent's call reached the worker and decoded.
        assert!(
            level["completion_tokens"].as_u64().unwrap() >= concurrency,
            "{level}"
        );
        assert!(
            level["aggregate_tokens_per_second"].as_f64().unwrap() > 0.0,
            "{level}"
        );
        let fraction = level["roofline_fraction"].as_f64().unwrap();
        assert!(fraction > 0.0 && fraction <= 1.0, "{level}");
    }
    // The hang-up measurement ran at the top level: short calls after a killed client got
    // through, and the bound on tokens decoded after the hang-up was worked out.
    let hung = &figures["hang_up"];
    assert_eq!(hung["concurrency"], 3, "{figures:#}");
    assert!(
        hung["short_calls_after_hang_up_seconds"].as_f64().unwrap() > 0.0,
        "{hung}"
    );
    assert!(
        hung["tokens_decoded_after_hang_up_at_most"].is_u64(),
        "{hung}"
    );
    let table = std::fs::read_to_string(dir.join("out/bench-gpu.md")).unwrap();
    assert!(table.contains("| 3 |"), "{table}");
    assert!(
        table.contains("tokens decoded per abandoned sequence"),
        "{table}"
    );
}
