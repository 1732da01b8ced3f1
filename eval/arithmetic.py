"""Does the swarm help? Multi-step arithmetic word problems, every arm on the same model.

Each swarm arm is a SwarmJob run with `kubeswarm run`, so the product itself is measured;
the baselines are what a user would write instead, a few lines with the official openai
client against the same worker. The problems are generated from a seed, with integer
answers, in the style of GSM8K (2 to 4 steps). Answers are graded by the last number in
the final answer against the generator's; the swarm selects with what a user has (its
outputs and its own gate), never with the held-back answer.

    python eval/arithmetic.py --kubeswarm BIN --worker BIN --model FILE [--limit 30] [--n 1,3,5]
"""

import argparse
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from openai import OpenAI

# The project's helpers for starting a server and waiting for it (hack/lib/serving.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hack" / "lib"))
from serving import free_port, wait_until_serving  # noqa: E402

PROMPT = (
    "Solve the math word problem. Think step by step, then write the final answer on the "
    "last line as 'Answer: <number>'.\n\n"
)


def problems(seed, count):
    """`count` word problems with their integer answers, the same for the same seed."""
    rng = random.Random(seed)
    makers = [
        lambda a, b, c, d: (
            f"A baker makes {a} trays of {b} muffins. She sells {c} muffins in the morning "
            f"and {d} in the afternoon. How many muffins are left?",
            a * b - c - d,
        ),
        lambda a, b, c, d: (
            f"Tom has {a * b + c + 5 * d} dollars. He buys {a} books at {b} dollars each and "
            f"a pen for {c} dollars. How many dollars does he have left?",
            5 * d,
        ),
        lambda a, b, c, d: (
            f"A farm has {a} cows and {b} chickens. A cow has 4 legs and a chicken has 2. "
            f"The farmer buys {c} more chickens. How many legs do the animals have in total?",
            4 * a + 2 * (b + c),
        ),
        lambda a, b, c, d: (
            f"A train travels at {a * 10} km per hour for {b} hours, then at {c * 10} km per "
            f"hour for {d} hours. How many km does it travel in total?",
            a * 10 * b + c * 10 * d,
        ),
        lambda a, b, c, d: (
            f"A class of {a * b} students splits into groups of {b}. Each group gets {c} "
            f"pencils and {d} erasers. How many pencils and erasers are handed out in total?",
            a * (c + d),
        ),
        lambda a, b, c, d: (
            f"Sara reads {a} pages a day for {b} days, then {c} pages a day for {d} days. "
            f"Her book has {a * b + c * d + 17 * a} pages. How many pages are left to read?",
            17 * a,
        ),
        lambda a, b, c, d: (
            f"A shop has {a * 12} eggs packed in boxes of 12. It sells {b} boxes and then "
            f"receives {c} new boxes. Each box sells for {d} dollars. What are the boxes it "
            f"now has worth in dollars?",
            (a - b + c) * d,
        ),
        lambda a, b, c, d: (
            f"Each of {a} friends pays {b * 3} dollars for a meal. They split the total "
            f"equally among {a} people after adding a tip of {c * a} dollars. How many "
            f"dollars does each friend pay in the end?",
            b * 3 + c,
        ),
    ]
    out = []
    for i in range(count):
        make = makers[i % len(makers)]
        while True:
            a, b, c, d = (rng.randint(2, 12) for _ in range(4))
            b = max(b, 3)
            question, answer = make(a, b, c, d)
            if answer > 0 and (i % len(makers) != 6 or a > b):
                break
        out.append({"id": i, "question": question, "answer": answer})
    return out


def last_number(text):
    """The answer a reply gives: the last number in it, as an integer if it is one."""
    # A minus sign counts only where a sign can stand ("7-8 hours" ends on 8), as in
    # kubeswarm's own lastNumber.
    found = re.findall(r"(?:(?<=^)|(?<=[\s(=:$]))-?\d[\d,]*(?:\.\d+)?|\d[\d,]*(?:\.\d+)?", text or "")
    if not found:
        return None
    value = float(found[-1].replace(",", ""))
    return int(value) if value == int(value) else value


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


def swarm(kubeswarm, url, question, n, strategy, max_tokens, workdir):
    """One SwarmJob through `kubeswarm run`: its answer, every subagent's output, usage."""
    spec = {
        "task": PROMPT + question,
        "fanOut": {
            "pool": "worker",
            "subagents": n,
            "maxTokens": max_tokens,
            # One subagent decodes greedily, like the direct call; a vote needs variety.
            "temperature": 0.0 if n == 1 else 0.7,
            "timeoutSeconds": 600,
        },
        "verification": {"mode": "none"},
        "aggregation": {"strategy": strategy},
    }
    if strategy in ("weightedVote", "bestOf"):
        spec["verification"] = {"mode": "adversarial", "pool": "gate", "repairRounds": 0}
    if strategy in ("vote", "weightedVote"):
        spec["aggregation"]["answer"] = {"type": "lastNumber"}
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
        [kubeswarm, "run", str(job), "--out", str(out),
         "--pool", f"worker={url}", "--pool", f"gate={url}"],
        capture_output=True,
        text=True,
    )
    seconds = time.monotonic() - started
    folder = out / "eval"
    usage = folder / "usage.json"
    answer = folder / "answer.md"
    outputs = [
        json.loads(record.read_text()).get("output", "")
        for record in sorted((folder / "subagents").glob("*.json"))
    ]
    return {
        # answer.md ends with kubeswarm's own lines (the tally); the answer is above them.
        "output": answer.read_text().split("\n\n> kubeswarm:")[0] if answer.exists() else "",
        "outputs": outputs,
        "tokens": json.loads(usage.read_text()).get("totalTokens", 0) if usage.exists() else 0,
        "seconds": seconds,
        "failed": run.returncode != 0,
        "error": run.stderr.strip().splitlines()[-1] if run.returncode and run.stderr.strip() else "",
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeswarm", required=True)
    parser.add_argument("--worker", required=True, help="the inference-worker binary")
    parser.add_argument("--model", required=True, help="the GGUF file every arm runs")
    parser.add_argument("--limit", type=int, default=30, help="problems")
    parser.add_argument("--n", default="1,3,5", help="subagent counts of the swarm arms")
    parser.add_argument("--max-tokens", type=int, default=320)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--strategies", default="vote,weightedVote",
                        help="selections of the N>1 arms (vote, weightedVote, bestOf)")
    parser.add_argument("--out", default="eval-out")
    args = parser.parse_args()
    counts = [int(n) for n in args.n.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    log = open(out / "worker.log", "w")
    worker = subprocess.Popen(
        [args.worker, "--model-path", args.model, "--served-model-name", "worker",
         "--listen", f"127.0.0.1:{port}", "--max-seqs", str(max(counts))],
        stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
    )
    try:
        wait_until_serving(port, worker, "/ready")
        run_arms(args, counts, url, out)
    finally:
        worker.terminate()
        worker.wait()


def run_arms(args, counts, url, out):
    direct = Direct(url, "worker")
    arms = {}

    def score(arm, problem, result, n=1, family=None):
        result["correct"] = last_number(result["output"]) == problem["answer"]
        result["n"] = n
        # The plot's line: arms of one family at several N.
        result["family"] = family or arm
        arms.setdefault(arm, []).append(result)

    for problem in problems(args.seed, args.limit):
        text = PROMPT + problem["question"]
        score("direct call", problem, direct.ask(text, args.max_tokens))
        for n in counts:
            strategies = ["vote"] if n == 1 else args.strategies.split(",")
            for strategy in strategies:
                with tempfile.TemporaryDirectory() as work:
                    result = swarm(args.kubeswarm, url, problem["question"], n,
                                   strategy, args.max_tokens, work)
                arm = "kubeswarm, 1 subagent" if n == 1 else f"kubeswarm {strategy}, N={n}"
                score(arm, problem, result, n, f"kubeswarm {strategy}")
                if strategy == "vote" and n > 1:
                    oracle = {
                        "output": str(problem["answer"]) if any(
                            last_number(o) == problem["answer"] for o in result["outputs"]
                        ) else "",
                        "tokens": result["tokens"],
                        "seconds": result["seconds"],
                    }
                    score(f"oracle (any of N={n} right)", problem, oracle, n, "oracle (any right)")
            if n > 1:
                # The swarm's whole token budget in one call.
                matched = direct.ask(
                    text + "\n\nTake your time: solve it, then check each step again "
                    "before the final line.", args.max_tokens * n)
                score(f"one call, N={n} tokens", problem, matched, n, "one call, N x tokens")
        done = len(arms["direct call"])
        print(f"problem {done}/{args.limit}: " + ", ".join(
            f"{arm} {sum(r['correct'] for r in rs)}/{len(rs)}" for arm, rs in arms.items()
        ), file=sys.stderr, flush=True)

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
    print(f"\n{args.limit} problems, seed {args.seed}, maxTokens {args.max_tokens}\n\n{text}")
    (out / "arithmetic.md").write_text(text + "\n")
    (out / "arithmetic.json").write_text(json.dumps({"rows": rows, "arms": arms}, indent=1))
    plot(rows, out / "arithmetic.png")


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


if __name__ == "__main__":
    main()
