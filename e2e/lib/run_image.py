"""Runs a container image's entrypoint as a kubelet with a container runtime would, for the
e2e test bed's operator and worker pods: pulled from a registry with crane, its filesystem
the root (read-only when the pod asks), the user from the pod or the image, the image's
environment, and the pod's volumes bind-mounted at their mount paths. A broken image (a
missing library, a root user, a wrong entrypoint) fails here as it would on a node.

    python3 run_image.py --crane CRANE --store DIR [--user UID[:GID]] [--non-root] [--read-only]
        [--bind SRC:DST[:ro]]... [--env NAME=VALUE]... [--env-from NAME]... [--command PATH]...
        IMAGE [-- ARGS...]

--env-from passes a variable of this process's environment on, so that secrets stay out of
the command line (which /proc shows every user). Mount paths must be absolute, without
`..`, and resolve inside the image's root.

The process keeps this one's pid (unshare and chroot exec), so whoever started it can
signal the container's process. The network is the host's: the bed's pods listen on
their loopback addresses. Needs root, for the mount namespace and chroot.
"""

import argparse
import ctypes
import fcntl
import json
import os
import shutil
import subprocess
import sys

PR_SET_NO_NEW_PRIVS = 38
# What a container runtime gives every container under /dev.
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")


def fail(message):
    sys.exit(f"run_image: {message}")


def crane(args, *command):
    done = subprocess.run([args.crane, *command], capture_output=True)
    if done.returncode != 0:
        fail(f"crane {' '.join(command)}: {done.stderr.decode().strip()}")
    return done.stdout


def pull(args):
    """The image's root filesystem, with its config in .config.json, extracted once per
    digest under --store."""
    digest = crane(args, "digest", args.image).decode().strip()
    repository = args.image.rsplit("@", 1)[0]
    if ":" in repository.rsplit("/", 1)[-1]:
        repository = repository.rsplit(":", 1)[0]
    pinned = f"{repository}@{digest}"
    root = os.path.join(args.store, digest.replace(":", "-"))
    os.makedirs(args.store, exist_ok=True)
    with open(os.path.join(args.store, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(root, ".pulled")):
            shutil.rmtree(root, ignore_errors=True)
            os.makedirs(root)
            export = subprocess.Popen([args.crane, "export", pinned, "-"], stdout=subprocess.PIPE)
            untar = subprocess.Popen(["tar", "-x", "-p", "--numeric-owner", "-C", root], stdin=export.stdout)
            # tar holds the pipe now: if it stops early, crane gets EPIPE instead of blocking.
            export.stdout.close()
            untar.wait()
            if export.wait() != 0 or untar.returncode != 0:
                fail(f"could not export {pinned}")
            with open(os.path.join(root, ".config.json"), "wb") as config:
                config.write(crane(args, "config", pinned))
            # Mount points a runtime adds to every container.
            for folder in ("proc", "sys", "dev", "etc"):
                os.makedirs(os.path.join(root, folder), exist_ok=True)
            for name in ("etc/hosts", "etc/resolv.conf"):
                if not os.path.exists(os.path.join(root, name)):
                    open(os.path.join(root, name), "w").close()
            open(os.path.join(root, ".pulled"), "w").close()
    return root


def numeric(root, spec):
    """UID:GID of a user spec (a name or number, with an optional group), by the image's
    /etc/passwd and /etc/group as a runtime reads them."""
    user, _, group = spec.partition(":")

    def lookup(file, name):
        if name.isdigit():
            return int(name)
        try:
            with open(os.path.join(root, "etc", file)) as table:
                for line in table:
                    fields = line.split(":")
                    if fields[0] == name:
                        return int(fields[2])
        except OSError:
            pass
        fail(f"user or group {name!r} is not in the image's /etc/{file}")

    uid = lookup("passwd", user or "0")
    if group:
        gid = lookup("group", group)
    else:
        gid = 0
        with open(os.path.join(root, "etc/passwd")) as table:
            for line in table:
                fields = line.split(":")
                if len(fields) > 3 and fields[2] == str(uid):
                    gid = int(fields[3])
    return uid, gid


def inside_root(root, target):
    """Where a mount path lands in the image's root, refusing one that would leave it (`..`,
    or a symlink of the image's that points out), as runtimes resolve mount targets."""
    if not target.startswith("/") or ".." in target.split("/"):
        fail(f"mount path {target!r} must be absolute and free of '..'")
    path = os.path.join(root, target.lstrip("/"))
    real_root = os.path.realpath(root)
    if os.path.commonpath([os.path.realpath(path), real_root]) != real_root:
        fail(f"mount path {target!r} leaves the image's root")
    return path


def mount(*args):
    if subprocess.run(["mount", *args]).returncode != 0:
        fail(f"mount {' '.join(args)} failed")


def inside(args, root, config):
    """In a mount namespace of our own: the mounts, then chroot and exec."""
    mount("--bind", root, root)
    mount("-t", "proc", "proc", os.path.join(root, "proc"))
    mount("--bind", "/sys", os.path.join(root, "sys"))
    mount("-o", "remount,bind,ro", os.path.join(root, "sys"))
    mount("-t", "tmpfs", "-o", "mode=755,nosuid", "tmpfs", os.path.join(root, "dev"))
    for device in DEVICES:
        open(os.path.join(root, "dev", device), "w").close()
        mount("--bind", f"/dev/{device}", os.path.join(root, "dev", device))
    for name in ("etc/hosts", "etc/resolv.conf"):
        mount("--bind", f"/{name}", os.path.join(root, name))
        mount("-o", "remount,bind,ro", os.path.join(root, name))
    for bind in args.bind:
        source, target, *mode = bind.split(":")
        path = inside_root(root, target)
        if os.path.isdir(source):
            os.makedirs(path, exist_ok=True)
        elif not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "w").close()
        mount("--bind", source, path)
        if mode == ["ro"]:
            mount("-o", "remount,bind,ro", path)
    if args.read_only:
        mount("-o", "remount,bind,ro", root)

    uid, gid = numeric(root, args.user or config.get("User") or "0")
    if args.non_root and uid == 0:
        fail("container has runAsNonRoot and the image will run as root")
    env = dict(item.split("=", 1) for item in config.get("Env") or [])
    env.update(item.split("=", 1) for item in args.env)
    env.update((name, os.environ[name]) for name in args.env_from if name in os.environ)
    command = args.command or config.get("Entrypoint") or []
    argv = command + (args.args if args.args or args.command else config.get("Cmd") or [])
    if not argv:
        fail("the image has no entrypoint and the pod gives no command")
    os.chroot(root)
    os.chdir(config.get("WorkingDir") or "/")
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    # allowPrivilegeEscalation: false
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        fail("prctl(PR_SET_NO_NEW_PRIVS) failed")
    program = argv[0]
    if "/" not in program:
        for folder in env.get("PATH", "/usr/local/bin:/usr/bin:/bin").split(":"):
            if os.access(os.path.join(folder, program), os.X_OK):
                program = os.path.join(folder, program)
                break
    try:
        os.execve(program, argv, env)
    except OSError as err:
        fail(f"exec {argv[0]} in {args.image}: {err}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--crane", required=True)
    parser.add_argument("--store", required=True, help="where pulled images are extracted")
    parser.add_argument("--user", help="UID:GID from the pod's securityContext")
    parser.add_argument("--non-root", action="store_true", help="runAsNonRoot")
    parser.add_argument("--read-only", action="store_true", help="readOnlyRootFilesystem")
    parser.add_argument("--bind", action="append", default=[], metavar="SRC:DST[:ro]")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--env-from", action="append", default=[], metavar="NAME")
    parser.add_argument("--command", action="append", default=[], help="overrides the entrypoint")
    parser.add_argument("--inside", help=argparse.SUPPRESS)
    parser.add_argument("image")
    # The container's arguments are everything after the first `--`, verbatim (argparse
    # would drop any later `--` among them).
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.args = argv[split + 1:]
    if args.inside:
        with open(os.path.join(args.inside, ".config.json")) as config:
            inside(args, args.inside, json.load(config).get("config") or {})
        return
    root = pull(args)
    os.execvp(
        "unshare",
        ["unshare", "--mount", "--propagation", "private", sys.executable, os.path.abspath(__file__),
         "--inside", root, *argv],
    )


if __name__ == "__main__":
    main()
