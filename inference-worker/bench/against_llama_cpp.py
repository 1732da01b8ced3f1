"""The inference worker against llama.cpp's OpenAI-compatible server, same file, same threads.

Starts each server in turn on the same GGUF file with the same thread count (never both at
once: they would share the cores), sends the same streamed chat requests at each
concurrency, and prints aggregate completion tokens/s, time to first token p50/p95 and the
server's peak RSS, with the worker/llama.cpp ratio. llama.cpp's Python server runs one
request at a time (queued, not batched); the worker batches up to --max-seqs. Standard library only, so the client
adds the same small overhead to both.

    python3 against_llama_cpp.py --worker BIN --llama-python PY --model FILE
"""

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

# The project's helpers for starting a server and waiting for it (hack/lib/serving.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "hack" / "lib"))
from serving import free_port, wait_until_serving  # noqa: E402

PROMPT = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle. "
    "Describe the sea, the weather and what the message says."
)
MODEL = "bench"


def one_request(port, number, max_tokens, results):
    """A streamed chat completion; records (time to first token, tokens, seconds)."""
    # A different first line per request, so neither server answers from a cached prompt
    # (llama.cpp's server reuses the previous request's prompt state).
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"Request {number}. {PROMPT}"}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
        }
    )
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    first, tokens = None, 0
    # Each content chunk of a stream carries one token in both servers.
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[len("data: "):])
        choices = chunk.get("choices") or [{}]
        if choices[0].get("delta", {}).get("content"):
            tokens += 1
            if first is None:
                first = time.monotonic() - started
    if tokens == 0:
        raise RuntimeError(f"request {number} streamed no tokens")
    results.append((first, tokens, time.monotonic() - started))


def run_level(port, concurrency, requests, max_tokens):
    results = []
    started = time.monotonic()
    pending = list(range(requests))
    lock = threading.Lock()

    def client():
        while True:
            with lock:
                if not pending:
                    return
                number = pending.pop()
            one_request(port, f"{concurrency}-{number}", max_tokens, results)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    if len(results) != requests:
        sys.exit(f"{requests - len(results)} requests failed at concurrency {concurrency}")
    ttft = sorted(r[0] for r in results)
    return {
        "tokens_per_s": sum(r[1] for r in results) / wall,
        "ttft_p50": statistics.median(ttft),
        "ttft_p95": ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))],
        "tokens": sum(r[1] for r in results),
        "wall": wall,
    }


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def bench_server(name, command, ready_path, env, port, levels, max_tokens):
    print(f"== {name}: {' '.join(command)}", flush=True)
    log = open(os.path.join(os.environ.get("BENCH_LOG_DIR", "/tmp"), f"bench-{name}.log"), "w")
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        load_started = time.monotonic()
        wait_until_serving(port, proc, ready_path)
        load = time.monotonic() - load_started
        run_level(port, 1, 1, 8)  # warm-up: first-call allocations, page cache
        out = {"load_s": load}
        for concurrency in levels:
            # Every client sends two requests, so each level sees a full batch twice.
            out[concurrency] = run_level(port, concurrency, 2 * concurrency, max_tokens)
            r = out[concurrency]
            print(
                f"   c={concurrency:<3} {r['tokens_per_s']:7.1f} tok/s  "
                f"TTFT p50 {r['ttft_p50']:.3f}s p95 {r['ttft_p95']:.3f}s  "
                f"({r['tokens']} tokens in {r['wall']:.1f}s)",
                flush=True,
            )
        out["rss_mib"] = peak_rss_mib(proc.pid)
        return out
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", required=True, help="the inference-worker binary")
    parser.add_argument("--llama-python", required=True, help="a python with llama-cpp-python[server]")
    parser.add_argument("--model", required=True, help="the GGUF file both servers load")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--concurrency", default="1,4,10")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--worker-modes", default="q8_0,f32",
                        help="the worker's --cpu-requantize settings to run, comma-separated")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    env = dict(os.environ)
    # candle's CPU kernels run on rayon's pool; pin both servers to the same thread count.
    env["RAYON_NUM_THREADS"] = str(args.threads)
    env.setdefault("RUST_LOG", "warn")
    results = {}
    for mode in args.worker_modes.split(","):
        port = free_port()
        results[f"worker {mode}"] = bench_server(
            f"inference-worker-{mode}",
            [
                args.worker,
                "--model-path", args.model,
                "--served-model-name", MODEL,
                "--listen", f"127.0.0.1:{port}",
                "--max-seqs", str(max(levels)),
                "--cpu-requantize", mode,
            ],
            "/ready",
            env, port, levels, args.max_tokens,
        )
    port = free_port()
    llama = bench_server(
        "llama.cpp",
        [
            args.llama_python, "-m", "llama_cpp.server",
            "--model", args.model,
            "--model_alias", MODEL,
            "--host", "127.0.0.1", "--port", str(port),
            "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
            "--n_ctx", "4096",
            # By default a new request cuts off the one in progress; queue them instead.
            "--interrupt_requests", "False",
        ],
        # Its server answers only once the model is loaded.
        "/v1/models",
        env, port, levels, args.max_tokens,
    )

    print()
    print(f"{os.path.basename(args.model)}, {args.threads} threads, max_tokens {args.max_tokens}, "
          f"streamed; each worker column is followed by its ratio to llama.cpp")
    header = f"{'':13}{'llama.cpp':>10}"
    for name in results:
        header += f"{name:>20}{'ratio':>7}"
    print(header)

    def row(label, key, fmt):
        for c in levels:
            line = f"c={c:<3} {label:7}{fmt(llama[c][key]):>10}"
            for out in results.values():
                line += f"{fmt(out[c][key]):>20}{out[c][key] / llama[c][key]:7.2f}"
            print(line)

    row("tok/s", "tokens_per_s", lambda v: f"{v:.1f}")
    row("TTFT50", "ttft_p50", lambda v: f"{v:.3f}s")
    row("TTFT95", "ttft_p95", lambda v: f"{v:.3f}s")
    line = f"{'peak RSS':13}{llama['rss_mib']:>7.0f}MiB"
    for out in results.values():
        line += f"{out['rss_mib']:>17.0f}MiB{out['rss_mib'] / llama['rss_mib']:7.2f}"
    print(line)
    line = f"{'load':13}{llama['load_s']:>9.1f}s"
    for out in results.values():
        line += f"{out['load_s']:>19.1f}s{'':7}"
    print(line)


if __name__ == "__main__":
    main()
