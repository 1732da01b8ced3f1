"""`make bench-rss`: what a hostile endpoint costs the process that calls it.

An endpoint on loopback answers a swarm's calls with 1 GiB each (chunked, no length
declared, so nothing can refuse it up front), or its model list with 1 GiB. The caller is
`kubeswarm run` with the endpoint as its pool: the same probe (`served_models`) and the
same bounded completion client (`swarm::bounded`) the operator runs. The peer is the
same run against the same server answering politely. Peak RSS is the kernel's (ru_maxrss
of the finished process); the figure that matters is the ratio, hostile over polite.

The target: a hostile endpoint raises the peak by less than 4 x --max-response-bytes
(8 MiB by default) over the polite run, whatever it sends. Exits 1 when it does not.
"""

import argparse
import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading

GIB = 1 << 30
CHUNK = 1 << 20
SUBAGENTS = 4


class Endpoint(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, mode):
        super().__init__(("127.0.0.1", 0), Handler)
        self.mode = mode
        self.sent = 0
        self.lock = threading.Lock()

    def count(self, n):
        with self.lock:
            self.sent += n


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *_):
        pass

    def reply(self, body):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.server.count(len(body))

    def endless(self, start):
        """`start`, then 1 GiB of spaces inside it, chunked: a body that never ends well."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        filler = b" " * CHUNK
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(start), start))
            for _ in range(GIB // CHUNK):
                self.wfile.write(b"%x\r\n" % CHUNK + filler + b"\r\n")
                self.server.count(CHUNK)
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True

    def do_GET(self):
        if self.server.mode == "model-list":
            self.endless(b'{"object": "list", "data": [')
        else:
            self.reply(json.dumps({"object": "list", "data": [{"id": "m"}]}).encode())

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.server.mode == "completion":
            self.endless(b'{"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "')
            return
        self.reply(
            json.dumps(
                {
                    "id": "x",
                    "object": "chat.completion",
                    "created": 0,
                    "model": "m",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "red"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
                }
            ).encode()
        )


JOB = f"""apiVersion: kubeswarm.dev/v1alpha1
kind: SwarmJob
metadata: {{name: rss}}
spec:
  task: Name a colour.
  fanOut: {{pool: m, subagents: {SUBAGENTS}, retries: 1, timeoutSeconds: 60}}
  verification: {{mode: none}}
  aggregation: {{strategy: collect}}
"""


def run(kubeswarm, mode, folder):
    server = Endpoint(mode)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    manifest = os.path.join(folder, "job.yaml")
    with open(manifest, "w") as f:
        f.write(JOB)
    process = subprocess.Popen(
        [kubeswarm, "run", manifest, "--pool", f"m={url}", "--out", os.path.join(folder, mode)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    stderr = process.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(process.pid, 0)
    server.shutdown()
    return {
        "mode": mode,
        "exit": os.waitstatus_to_exitcode(status),
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "sent_mib": server.sent / (1 << 20),
        "said": stderr.strip().splitlines()[-1] if stderr.strip() else "",
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeswarm", required=True)
    parser.add_argument("--limit-mib", type=float, default=8.0, help="--max-response-bytes, in MiB")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        rows = [run(args.kubeswarm, mode, folder) for mode in ("polite", "completion", "model-list")]
    polite = rows[0]["peak_rss_mib"]
    print(f"{'endpoint answers':<22}{'exit':>5}{'sent MiB':>10}{'peak RSS MiB':>14}{'x polite':>10}")
    for r in rows:
        label = {"polite": "politely", "completion": "1 GiB per completion", "model-list": "1 GiB model list"}[r["mode"]]
        print(f"{label:<22}{r['exit']:>5}{r['sent_mib']:>10.0f}{r['peak_rss_mib']:>14.1f}{r['peak_rss_mib'] / polite:>10.2f}")
    for r in rows[1:]:
        print(f"  {r['mode']}: {r['said']}")
    ok = rows[0]["exit"] == 0 and all(
        r["exit"] != 0 and r["peak_rss_mib"] - polite < 4 * args.limit_mib for r in rows[1:]
    )
    print(json.dumps({r["mode"]: round(r["peak_rss_mib"], 1) for r in rows}))
    if not ok:
        print("FAILED: a hostile endpoint raised the peak past 4 x the response bound, or the polite run failed")
        sys.exit(1)


if __name__ == "__main__":
    main()
