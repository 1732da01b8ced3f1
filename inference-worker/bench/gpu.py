"""`make bench-gpu`: the worker's throughput on one GPU, driven by the swarm engine itself.

Writes a random-weight GGUF of a real model's shape (random_gguf.py), starts the worker on
it, and at each concurrency C runs a SwarmJob of C subagents through `kubeswarm run`
against the worker (the engine's own client, C calls at once, every answer max_tokens
long). From the worker's own metrics, per level:

- aggregate tokens/s: completion tokens over the job's wall time (prefill included);
- decode tokens/s per sequence, from the worker's per-token times, and C times that;
- prompt time (the worker's time to first token, queueing excluded), mean;
- the memory-bandwidth roofline: a decoding step reads every active weight once, so
  tokens/s <= C * bandwidth / bytes read per step (for MoE, the experts C random tokens
  pick), and the fraction of it decoding reached.

Standard library only: it runs on the GPU machine (Python 3, the CUDA driver, PyTorch's
CUDA libraries) and, with --device cpu and the tiny shape, here.

    python3 gpu.py --worker BIN --kubeswarm BIN --shape llama3-8b --out DIR
"""

import argparse
import glob
import hashlib
import http.client
import json
import lzma
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "hack" / "lib"))
import random_gguf  # noqa: E402
from serving import free_port, wait_until_serving  # noqa: E402


def say(line):
    print(f"bench-gpu: {line}", file=sys.stderr, flush=True)


def cuda_libraries():
    """Folders of the CUDA libraries the worker links (cudart, cuBLAS, cuRAND) in the Python
    installations here: PyTorch's CUDA wheels ship them."""
    folders = []
    for site in sys.path + glob.glob("/usr/local/lib/python3*/dist-packages") + glob.glob(
        "/usr/lib/python3*/dist-packages"
    ):
        for lib in sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib"))) + glob.glob(
            os.path.join(site, "torch", "lib")
        ):
            if lib not in folders:
                folders.append(lib)
    return folders


def unpacked(binary, work):
    """The binary itself, or, for BINARY.xz (as make bench-gpu packs them to travel), the
    binary decompressed into the work folder."""
    if not binary.endswith(".xz"):
        return binary
    target = work / Path(binary).name.removesuffix(".xz")
    with lzma.open(binary) as packed, open(target, "wb") as out:
        shutil.copyfileobj(packed, out, 1 << 20)
    target.chmod(0o755)
    return str(target)


def missing_libraries(binary, env):
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, env=env).stdout
    return [line.split()[0] for line in out.splitlines() if "not found" in line]


def metrics(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    values = {}
    for line in conn.getresponse().read().decode().splitlines():
        if line.startswith("kubeswarm_worker_") and " " in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def delta(before, after, name):
    return after.get(name, 0.0) - before.get(name, 0.0)


def job(concurrency, max_tokens, name=None):
    subtasks = ", ".join(json.dumps(f"Chapter {i + 1}: the storm, told by voice {i + 1}.") for i in range(concurrency))
    return (
        "apiVersion: kubeswarm.dev/v1alpha1\nkind: SwarmJob\n"
        f"metadata: {{name: {name or f'bench-c{concurrency}'}}}\n"
        "spec:\n"
        "  task: Write a long story about a lighthouse keeper in a storm.\n"
        f"  subtasks: [{subtasks}]\n"
        f"  fanOut: {{pool: workers, subagents: {concurrency}, maxConcurrency: {concurrency}, "
        f"maxTokens: {max_tokens}, temperature: 1.0}}\n"
        "  verification: {mode: none}\n"
        "  aggregation: {strategy: collect}\n"
    )


def swarm(args, port, work, concurrency, max_tokens, name, watched=True):
    """Starts `kubeswarm run` on a SwarmJob of `concurrency` subagents against the worker;
    its stderr is kept for `finished` if `watched`."""
    manifest = work / f"{name}.yaml"
    manifest.write_text(job(concurrency, max_tokens, name))
    return subprocess.Popen(
        [args.kubeswarm, "run", str(manifest), "--pool", f"workers=http://127.0.0.1:{port}/v1",
         "--out", str(work / "runs")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE if watched else subprocess.DEVNULL, text=True,
    )


def finished(run, what):
    _, stderr = run.communicate()
    # Exit 3: the job ran, and its answers, all cut off at maxTokens as random weights make
    # them, failed verification. Anything else is a failure.
    if run.returncode not in (0, 3):
        sys.exit(f"bench-gpu: kubeswarm run ({what}) exited {run.returncode}:\n{stderr[-2000:]}")


def hang_up(args, port, work, level):
    """What a client that goes away costs the GPU: the worker must stop decoding a call
    nobody waits for (an operator killed, a job deleted, a timeout).

    At the top concurrency C, with every one of the worker's --max-seqs slots taken: C
    short calls are timed on the idle worker; then C long calls start, their client is
    SIGKILLed a tenth of a whole run after they are all in, and the same C short calls are
    timed again. They wait for free slots, so if the abandoned sequences decoded on, they
    would wait out nine tenths of a whole run. The extra wait over the idle time, at the
    decode step time measured at C, bounds the tokens each abandoned sequence decoded after
    its client went away."""
    c, short = level["concurrency"], 8
    idle = []
    for attempt in range(2):  # the second with the prefix cache as warm as it will be after
        began = time.monotonic()
        finished(swarm(args, port, work, c, short, f"short-idle-{attempt}"), "short calls, idle worker")
        idle.append(time.monotonic() - began)
    abandoned = swarm(args, port, work, c, args.max_tokens, "abandoned", watched=False)
    # Killed a tenth of a whole run after all C calls are in, not counted from the
    # process's start: a kill before they arrive would measure nothing.
    deadline = time.monotonic() + 60
    while metrics(port).get("kubeswarm_worker_running_sequences", 0) < c:
        if time.monotonic() > deadline or abandoned.poll() is not None:
            raise RuntimeError(f"the {c} calls to abandon never all ran at once")
        time.sleep(0.01)
    time.sleep(level["wall_seconds"] / 10)
    abandoned.kill()
    abandoned.wait()
    began = time.monotonic()
    finished(swarm(args, port, work, c, short, "short-after"), "short calls after a hang-up")
    after = time.monotonic() - began
    step = 1 / level["decode_tokens_per_second_per_sequence"] if level["decode_tokens_per_second_per_sequence"] else 0
    extra = max(after - idle[-1], 0.0)
    return {
        "concurrency": c,
        "killed_after_seconds": round(level["wall_seconds"] / 10, 2),
        "short_calls_idle_seconds": round(idle[-1], 2),
        "short_calls_after_hang_up_seconds": round(after, 2),
        "whole_run_seconds": level["wall_seconds"],
        # Steps of the abandoned sequences the short calls could have waited behind.
        "tokens_decoded_after_hang_up_at_most": round(extra / step) if step else None,
        "tokens_left_at_hang_up": round(args.max_tokens * 0.9),
        "short_call_tokens": short,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", required=True, help="the inference-worker binary (CUDA build on a GPU), or BIN.xz")
    parser.add_argument("--kubeswarm", required=True, help="the kubeswarm binary, whose engine drives the load, or BIN.xz")
    parser.add_argument("--shape", choices=sorted(random_gguf.SHAPES), default="llama3-8b")
    parser.add_argument("--concurrency", default="1,10,32,64")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--bandwidth-gbs", type=float, default=4800.0,
                        help="the device's memory bandwidth in GB/s (H200: 4800, H100 SXM: 3350)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--work", default="/tmp/kubeswarm-bench-gpu", help="where the model and runs go")
    parser.add_argument("--out", required=True, help="where the figures go (bench-gpu.json, bench-gpu.md)")
    parser.add_argument("--no-hang-up", action="store_true", help="skip the hang-up measurement")
    parser.add_argument("--deadline", type=float, default=450.0,
                        help="seconds after which no further concurrency level starts")
    args = parser.parse_args()
    started = time.monotonic()
    levels = [int(c) for c in args.concurrency.split(",")]
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    args.worker, args.kubeswarm = unpacked(args.worker, work), unpacked(args.kubeswarm, work)
    # Named by the generator's own hash, so a changed generator writes the model again.
    version = hashlib.sha256((HERE / "random_gguf.py").read_bytes()).hexdigest()[:12]
    model = work / f"random-{args.shape}-{version}.gguf"
    if not model.exists():
        random_gguf.write(model.with_suffix(".part"), args.shape)
        model.with_suffix(".part").rename(model)
    env = dict(os.environ)
    if args.device == "cuda":
        # No empty entry: it would put the current folder on the search path.
        env["LD_LIBRARY_PATH"] = ":".join(p for p in cuda_libraries() + [env.get("LD_LIBRARY_PATH", "")] if p)
    missing = missing_libraries(args.worker, env)
    if missing:
        sys.exit(f"bench-gpu: {args.worker} cannot find {', '.join(missing)}: install PyTorch's CUDA "
                 "13 wheels (or the CUDA toolkit) here, or set LD_LIBRARY_PATH to their folders")

    port = free_port()
    command = [args.worker, "--model-path", str(work), "--gguf-file", model.name, "--listen", f"127.0.0.1:{port}",
               "--served-model-name", "bench", "--max-seqs", str(max(levels)),
               "--max-tokens-cap", str(args.max_tokens)]
    if args.device == "cpu":
        command.append("--cpu")
    log = open(out / "worker.log", "w")
    loading = time.monotonic()
    worker = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until_serving(port, worker, "/ready", timeout=300)
        load_seconds = time.monotonic() - loading
        say(f"worker ready on {args.shape} in {load_seconds:.1f}s ({args.device})")
        per_step = random_gguf.weight_bytes(args.shape)
        rows = []
        for c in levels:
            if time.monotonic() - started > args.deadline:
                say(f"skipping concurrency {c}: past the {args.deadline:.0f}s deadline")
                continue
            before = metrics(port)
            began = time.monotonic()
            finished(swarm(args, port, work, c, args.max_tokens, f"bench-c{c}"), f"concurrency {c}")
            wall = time.monotonic() - began
            after = metrics(port)
            tokens = delta(before, after, "kubeswarm_worker_completion_tokens_total")
            itl = delta(before, after, "kubeswarm_worker_inter_token_latency_seconds_sum") / max(
                delta(before, after, "kubeswarm_worker_inter_token_latency_seconds_count"), 1)
            ttft = delta(before, after, "kubeswarm_worker_time_to_first_token_seconds_sum") / max(
                delta(before, after, "kubeswarm_worker_time_to_first_token_seconds_count"), 1)
            per_sequence = 1 / itl if itl else 0.0
            roofline = c * args.bandwidth_gbs * 1e9 / per_step(c)
            row = {
                "concurrency": c,
                "completion_tokens": int(tokens),
                # Whether answers ran to max_tokens, as the roofline comparison assumes.
                "of_max_tokens": round(tokens / (c * args.max_tokens), 3),
                "wall_seconds": round(wall, 2),
                "aggregate_tokens_per_second": round(tokens / wall, 1),
                "decode_tokens_per_second_per_sequence": round(per_sequence, 1),
                "decode_tokens_per_second": round(c * per_sequence, 1),
                "mean_prompt_seconds": round(ttft, 3),
                "weight_gb_read_per_step": round(per_step(c) / 1e9, 2),
                "roofline_tokens_per_second": round(roofline, 1),
                "roofline_fraction": round(c * per_sequence / roofline, 3),
            }
            rows.append(row)
            say(json.dumps(row))
        hung = None
        # Only at --max-seqs (the top level): below it the short calls would not wait for
        # the abandoned ones' slots, and the bound would mean nothing.
        if rows and rows[-1]["concurrency"] == max(levels) and not args.no_hang_up:
            try:
                hung = hang_up(args, port, work, rows[-1])
                say(json.dumps({"hang_up": hung}))
            except (RuntimeError, SystemExit) as failed:
                # The levels' figures are kept: a GPU's minutes are too few to lose them.
                hung = {"failed": str(failed)}
                say(f"hang-up measurement failed: {failed}")
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=40)
        except subprocess.TimeoutExpired:
            worker.kill()
    result = {
        "shape": args.shape,
        "device": args.device,
        "bandwidth_gbs": args.bandwidth_gbs,
        "max_tokens": args.max_tokens,
        "model_gb": round(model.stat().st_size / 1e9, 2),
        "load_seconds": round(load_seconds, 1),
        "levels": rows,
        "hang_up": hung,
        "seconds": round(time.monotonic() - started, 1),
    }
    (out / "bench-gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    table = [
        f"{args.shape} ({result['model_gb']} GB, random 4-bit weights) on {args.device}, "
        f"max_tokens {args.max_tokens}, roofline at {args.bandwidth_gbs:.0f} GB/s",
        "",
        "| concurrency | aggregate tok/s | decode tok/s per sequence | decode tok/s | mean prompt s | roofline tok/s | of roofline |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ] + [
        f"| {r['concurrency']} | {r['aggregate_tokens_per_second']} | {r['decode_tokens_per_second_per_sequence']} "
        f"| {r['decode_tokens_per_second']} | {r['mean_prompt_seconds']} | {r['roofline_tokens_per_second']} "
        f"| {r['roofline_fraction']:.1%} |"
        for r in rows
    ]
    if hung and "failed" in hung:
        table += ["", f"The hang-up measurement failed: {hung['failed']}"]
    elif hung:
        table += [
            "",
            f"A client killed {hung['killed_after_seconds']} s into {hung['concurrency']} answers of "
            f"{args.max_tokens} tokens ({hung['tokens_left_at_hang_up']} left each): {hung['concurrency']} "
            f"calls of {hung['short_call_tokens']} tokens then took {hung['short_calls_after_hang_up_seconds']} s, against "
            f"{hung['short_calls_idle_seconds']} s on the idle worker and {hung['whole_run_seconds']} s for a "
            f"whole run: at most {hung['tokens_decoded_after_hang_up_at_most']} tokens decoded per abandoned "
            "sequence after its client went away.",
        ]
    (out / "bench-gpu.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    say(f"done in {result['seconds']:.0f}s; figures in {out}")


if __name__ == "__main__":
    main()
