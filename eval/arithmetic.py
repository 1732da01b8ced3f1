"""Does the swarm help? Multi-step arithmetic word problems, every arm on the same model.

Each swarm arm is a SwarmJob run with `kubeswarm run`, so the product itself is measured;
the baselines are what a user would write instead, a few lines with the official openai
client against the same worker. The problems are generated from a seed, with integer
answers, in the style of GSM8K (2 to 4 steps). Answers are graded by the last number in
the final answer against the generator's; the swarm selects with what a user has (its
outputs and its own gate), never with the held-back answer.

    python eval/arithmetic.py --kubeswarm BIN --worker BIN --model FILE [--limit 30] [--n 1,3,5]
"""

import random
import re
import sys
import tempfile

from common import Direct, arguments, kubeswarm_run, run, summarize


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


def swarm(args, question, n, strategy, workdir):
    """One SwarmJob through `kubeswarm run`: its answer, every subagent's output, usage."""
    spec = {
        "task": PROMPT + question,
        "fanOut": {
            "pool": "worker",
            "subagents": n,
            "maxTokens": args.max_tokens,
            # One subagent decodes greedily, like the direct call; a vote needs variety.
            "temperature": 0.0 if n == 1 else args.temperature,
            "timeoutSeconds": 600,
            "firstSubagent": args.first_subagent,
        },
        "verification": {"mode": "none"},
        "aggregation": {"strategy": strategy},
    }
    if strategy in ("weightedVote", "bestOf"):
        spec["verification"] = {"mode": "adversarial", "pool": "gate", "repairRounds": 0}
    if strategy in ("vote", "weightedVote"):
        spec["aggregation"]["answer"] = {"type": "lastNumber"}
    return kubeswarm_run(args, spec, workdir)


def first_given_vote(result):
    """The answer a vote of the same outputs gives when a tie goes to the first output, as
    kubeswarm's did before it broke ties by the model's confidence: the comparison on the
    very same samples, to isolate what the confidence does."""
    counts = {}
    for output, passed in zip(result["outputs"], result["passed"]):
        answer = last_number(output) if passed else None
        if answer is not None:
            counts[answer] = counts.get(answer, 0) + 1
    # dicts keep first-seen order, and max keeps the first of equal counts.
    return str(max(counts, key=counts.get)) if counts else ""


def main():
    parser = arguments(__doc__, limit=30, n="1,3,5", max_tokens=320)
    parser.add_argument("--strategies", default="vote,weightedVote",
                        help="selections of the N>1 arms (vote, weightedVote, bestOf)")
    parser.add_argument("--first-subagent", default="sampled", choices=["greedy", "sampled"],
                        help="fanOut.firstSubagent of the N>1 arms")
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="fanOut.temperature of the N>1 arms: lower agrees more, varies less")
    run(parser.parse_args(), run_arms)


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
                    result = swarm(args, problem["question"], n, strategy, work)
                arm = "kubeswarm, 1 subagent" if n == 1 else f"kubeswarm {strategy}, N={n}"
                score(arm, problem, result, n, f"kubeswarm {strategy}")
                if strategy == "vote" and n > 1:
                    first = {"output": first_given_vote(result), "tokens": result["tokens"],
                             "seconds": result["seconds"]}
                    score(f"same outputs, ties to the first, N={n}", problem, first, n,
                          "vote, ties to the first")
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

    summarize(arms, f"{args.limit} problems, seed {args.seed}, maxTokens {args.max_tokens}",
              "arithmetic", out)


if __name__ == "__main__":
    main()
