"""Runs a batch of a SwarmJob's `tests` programs in a Kubernetes Job's pod, one Python
process each, and writes what each did to the termination message, where the operator
reads it. The operator mounts this file, the programs and batch.json at /kubeswarm.

The pod is the sandbox (no network, no service account token, limits, a deadline); this
script keeps the programs apart from each other and within their time. It is the
container's first process, so after each program it kills every other process in the
pod: nothing a program started (in a session of its own or not) outlives it to slow the
next one or to write the report. Its one argument, for tests, is where the report goes
instead of /dev/termination-log.
"""

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
# The most a termination message may hold; the kubelet cuts the rest.
MESSAGE_BYTES = 4096
# The most of each printout kept, before the message's limit shares it out.
TAIL_BYTES = 1100
# The most a program may write to one file, its printout included.
FILE_BYTES = 8 << 20


def limits():
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_BYTES, FILE_BYTES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def kill_the_rest():
    """Every process but this one, when this one is the pod's first: what a program left."""
    if os.getpid() != 1:
        return
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        pass
    # Reap them, so none is left as a zombie holding a file open.
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                break
        except ChildProcessError:
            break


def run(entry):
    with tempfile.TemporaryDirectory(dir="/tmp", ignore_cleanup_errors=True) as scratch:
        printout = os.path.join(scratch, ".printout")
        with open(printout, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", os.path.join(HERE, entry["file"])],
                cwd=scratch,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=limits,
                env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": scratch, "LANG": "C.UTF-8"},
            )
            try:
                code = proc.wait(timeout=entry["timeout"])
                result = {"exit": code} if code >= 0 else {"signal": -code}
            except subprocess.TimeoutExpired:
                result = {"timedOut": True}
            finally:
                # Whatever the program started goes with it.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
                kill_the_rest()
        size = os.path.getsize(printout)
        with open(printout, "rb") as f:
            f.seek(max(0, size - TAIL_BYTES - len(entry["marker"]) - 2))
            tail = f.read()
    # Whether the program got past its tests: the marker line it prints last. Reported on
    # its own, so that a short share of the message never cuts it off.
    marker = entry["marker"].encode()
    lines = tail.split(b"\n")
    result["finished"] = marker in (line.strip() for line in lines)
    result["printout"] = b"\n".join(line for line in lines if line.strip() != marker)[-TAIL_BYTES:]
    return result


def message(results):
    """The results as JSON within MESSAGE_BYTES: each printout shortened from its start."""
    share = max(64, (MESSAGE_BYTES - 64 * len(results)) // max(1, len(results)))
    while True:
        shown = []
        for result in results:
            entry = dict(result)
            entry["printout"] = result["printout"][-share:].decode("utf-8", "replace")
            shown.append(entry)
        text = json.dumps(shown, separators=(",", ":"))
        if len(text.encode()) <= MESSAGE_BYTES or share <= 8:
            return text
        share //= 2


def main():
    with open(os.path.join(HERE, "batch.json")) as f:
        batch = json.load(f)
    results = [run(entry) for entry in batch]
    kill_the_rest()
    report = sys.argv[1] if len(sys.argv) > 1 else "/dev/termination-log"
    with open(report, "w") as f:
        f.write(message(results))


if __name__ == "__main__":
    main()
