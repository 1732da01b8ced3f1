"""What both evals share: the direct call a user would write, a SwarmJob through
`kubeswarm run`, the 95% interval, the table and the plot."""

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from openai import OpenAI

# The project's helpers for starting a server and waiting for it (hack/lib/serving.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hack" / "lib"))
from serving import free_port, wait_until_serving  # noqa: E402


def arguments(doc, limit, n, max_tokens):
    """The flags both evals take, with each one's defaults; add its own, then `run`."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--kubeswarm", required=True)
    parser.add_argument("--worker", required=True, help="the inference-worker binary")
    parser.add_argument("--model", required=True, help="the GGUF file every arm runs")
    parser.add_argument("--limit", type=int, default=limit, help="problems")
    parser.add_argument("--n", default=n, help="subagent counts of the swarm arms")
    parser.add_argument("--max-tokens", type=int, default=max_tokens)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--out", default="eval-out")
    return parser


def run(args, run_arms):
    """One worker for every arm, then `run_arms(args, counts, url, out)`."""
    counts = [int(n) for n in args.n.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with serving(args.worker, args.model, max(counts), out) as url:
        run_arms(args, counts, url, out)


@contextlib.contextmanager
def serving(worker_bin, model, max_seqs, out):
    """One inference-worker on `model` for every arm; yields its OpenAI base URL."""
    port = free_port()
    log = open(Path(out) / "worker.log", "w")
    worker = subprocess.Popen(
        [worker_bin, "--model-path", model, "--served-model-name", "worker",
         "--listen", f"127.0.0.1:{port}", "--max-seqs", str(max_seqs)],
        stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
    )
    try:
        wait_until_serving(port, worker, "/ready")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        worker.terminate()
        worker.wait()


def wilson(correct, n):
    """95% Wilson interval of a proportion, in points."""
    if n == 0:
        return (0.0, 0.0)
    z, p = 1.96, correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, 100 * (centre - half)), min(100.0, 100 * (centre + half)))


class Direct:
    """One chat completion, as a user would call the model."""

    def __init__(self, url, model):
        self.client = OpenAI(base_url=url, api_key="none")
        self.model = model

    def ask(self, text, max_tokens, temperature=0.0):
        started = time.monotonic()
        reply = self.client.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": text}],
            max_tokens=max_tokens,
            temperature=temperature,
        )
        return {
            "output": reply.choices[0].message.content,
            "tokens": reply.usage.total_tokens,
            "seconds": time.monotonic() - started,
        }


def kubeswarm_run(args, spec, workdir, *extra):
    """One SwarmJob through `kubeswarm run`, its pools `worker` and `gate` on the model
    `args.model`, served by inference-workers it starts itself, as a user's `kubeswarm run`
    does (a worker is a pool's own server: kubeswarm asks it for the log-probabilities a
    vote's ties are broken by): its answer, every subagent's output and confidence, usage,
    time, and whether it failed."""
    manifest = {
        "apiVersion": "kubeswarm.dev/v1alpha1",
        "kind": "SwarmJob",
        "metadata": {"name": "eval"},
        "spec": spec,
    }
    # JSON is YAML: kubeswarm run reads it as the manifest it is.
    job = Path(workdir) / "job.yaml"
    job.write_text(json.dumps(manifest, indent=1))
    out = Path(workdir) / "out"
    started = time.monotonic()
    run = subprocess.run(
        [args.kubeswarm, "run", str(job), "--out", str(out), "--worker", args.worker,
         "--model", args.model, *extra],
        capture_output=True,
        text=True,
    )
    seconds = time.monotonic() - started
    folder = out / "eval"
    usage = folder / "usage.json"
    answer = folder / "answer.md"
    records = [json.loads(record.read_text())
               for record in sorted((folder / "subagents").glob("*.json"))]
    outputs = [record.get("output", "") for record in records]
    return {
        # answer.md ends with kubeswarm's own lines (the tally); the answer is above them.
        "output": answer.read_text().split("\n\n> kubeswarm:")[0] if answer.exists() else "",
        "outputs": outputs,
        "confidences": [record.get("confidence") for record in records],
        # The outputs the job's verification passed: the ones that voted.
        "passed": [not record.get("error") and (record.get("verdict") or {}).get("pass", False)
                   for record in records],
        "tokens": json.loads(usage.read_text()).get("totalTokens", 0) if usage.exists() else 0,
        "seconds": seconds,
        "failed": run.returncode != 0,
        "error": run.stderr.strip().splitlines()[-1] if run.returncode and run.stderr.strip() else "",
    }


def summarize(arms, title, name, out):
    """The arms' accuracy, interval, tokens and time as a table (printed and written to
    OUT/NAME.md), the results as OUT/NAME.json and the plot as OUT/NAME.png."""
    rows = []
    for arm, results in arms.items():
        correct = sum(r["correct"] for r in results)
        low, high = wilson(correct, len(results))
        rows.append({
            "arm": arm,
            "n": results[0]["n"],
            "family": results[0]["family"],
            "accuracy": 100 * correct / len(results),
            "low": low,
            "high": high,
            "tokens": sum(r["tokens"] for r in results) / len(results),
            "seconds": sum(r["seconds"] for r in results) / len(results),
            "failed": sum(r.get("failed", False) for r in results),
        })
    table = ["| arm | accuracy | 95% interval | tokens / problem | seconds / problem | failed runs |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['arm']} | {r['accuracy']:.0f}% | {r['low']:.0f}–{r['high']:.0f} | "
                     f"{r['tokens']:.0f} | {r['seconds']:.1f} | {r['failed']} |")
    text = "\n".join(table)
    print(f"\n{title}\n\n{text}")
    out = Path(out)
    (out / f"{name}.md").write_text(text + "\n")
    (out / f"{name}.json").write_text(json.dumps({"rows": rows, "arms": arms}, indent=1))
    plot(rows, out / f"{name}.png")


def plot(rows, path):
    """Accuracy against N, one line per selection, with the baselines as levels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines = {}
    for r in rows:
        lines.setdefault(r["family"], []).append((r["n"], r["accuracy"]))
    for name, points in lines.items():
        points.sort()
        xs, ys = zip(*points)
        if name == "direct call":
            ax.axhline(ys[0], linestyle="--", linewidth=1, label=name)
        else:
            ax.plot(xs, ys, marker="o", label=name)
    ax.set_xticks(sorted({r["n"] for r in rows}))
    ax.set_xlabel("subagents (N)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
