//! The sandbox of `tests` checks in local mode: `python3` in a process of its own, in
//! fresh user, network and mount namespaces (no network at all, not even loopback to the
//! workers; the user's home directory, where credentials live, hidden under an empty
//! one), in a new session so a timeout kills whatever it started, with resource limits,
//! an empty environment and a scratch directory that goes with it. What the program
//! prints can reach a model (as the repair round's instruction), so what it may read
//! matters as much as where it may connect.

// The one module that may: see the workspace's lints.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use futures::future::BoxFuture;
use tokio::process::Command;

use crate::swarm::sandbox::{Exit, Program, Ran, Sandbox, SandboxError, TAIL_BYTES};

/// Address space a program may map: enough for the interpreter and a test's data.
const MEMORY_BYTES: u64 = 1 << 30;
/// Bytes a program may write to one file, its printout included: a program that prints
/// without end fails rather than fill the disk.
const FILE_BYTES: u64 = 8 << 20;
/// Files a program may hold open.
const OPEN_FILES: u64 = 64;

/// Runs each program with the `python3` found on the `PATH`, or the one given.
#[derive(Debug, Clone)]
pub struct Subprocess {
    python: PathBuf,
}

impl Default for Subprocess {
    fn default() -> Self {
        Self::new(PathBuf::from("python3"))
    }
}

impl Subprocess {
    pub fn new(python: PathBuf) -> Self {
        Self { python }
    }
}

impl Sandbox for Subprocess {
    fn run(&self, program: Program) -> BoxFuture<'_, Result<Ran, SandboxError>> {
        Box::pin(self.run_program(program))
    }
}

impl Subprocess {
    async fn run_program(&self, program: Program) -> Result<Ran, SandboxError> {
        let scratch = Scratch::new().map_err(|err| broken("could not make its directory", err))?;
        let file = scratch.0.join("program.py");
        std::fs::write(&file, &program.source)
            .map_err(|err| broken("could not write the program", err))?;
        let printout = scratch.0.join("printout");
        let out = std::fs::File::create(&printout)
            .map_err(|err| broken("could not make its printout file", err))?;
        let err_out = out
            .try_clone()
            .map_err(|err| broken("could not make its printout file", err))?;
        let cpu_seconds = program.timeout.as_secs() + 1;
        let hide = home_to_hide(&scratch.0);

        let mut command = Command::new(&self.python);
        command
            // Isolated (no environment, no user site), no bytecode files.
            .args(["-I", "-B", "program.py"])
            .current_dir(&scratch.0)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", &scratch.0)
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err_out)
            .kill_on_drop(true);
        // SAFETY: between fork and exec only async-signal-safe calls (setsid, prctl,
        // setrlimit, unshare), on values moved in, with no allocation.
        unsafe {
            command.pre_exec(move || confine(cpu_seconds, hide.as_deref()));
        }
        let mut child = command.spawn().map_err(|err| match err.kind() {
            io::ErrorKind::NotFound => SandboxError::Unavailable {
                what: format!(
                    "{} was not found: the tests check runs Python 3; install it or put it on the PATH",
                    self.python.display()
                ),
                source: Some(Box::new(err)),
            },
            _ => SandboxError::Unavailable {
                what: "the tests check could not start its sandbox, a process in user and network namespaces of its own: this machine must allow unprivileged user namespaces (sysctl user.max_user_namespaces above 0, and kernel.unprivileged_userns_clone=1 where the kernel has it)".to_owned(),
                source: Some(Box::new(err)),
            },
        })?;
        // The session the child leads: the timeout kills everything in it.
        let group = Group(child.id().map(|pid| pid as i32));
        let status = match tokio::time::timeout(program.timeout, child.wait()).await {
            Ok(status) => status.map_err(|err| broken("lost its program", err))?,
            Err(_) => return Ok(Ran::TimedOut),
        };
        drop(group);
        let exit = match (status.code(), status.signal()) {
            (Some(code), _) => Exit::Code(code),
            (None, Some(signal)) => Exit::Signal(signal),
            (None, None) => Exit::Signal(0),
        };
        let printed =
            read_tail(&printout).map_err(|err| broken("could not read its printout", err))?;
        Ok(match program.judge(exit, &printed) {
            // Python ignores SIGXFSZ: past the limit its writes fail instead.
            Ran::Failed { how, tail }
                if std::fs::metadata(&printout).is_ok_and(|m| m.len() >= FILE_BYTES) =>
            {
                Ran::Failed {
                    how: format!("{how}, after printing {FILE_BYTES} bytes, the most it may"),
                    tail,
                }
            }
            ran => ran,
        })
    }
}

/// The home directory to hide, unless the scratch directory is inside it (then hiding it
/// would hide the program too) or it is the root.
fn home_to_hide(scratch: &Path) -> Option<CString> {
    let home = PathBuf::from(std::env::var_os("HOME")?);
    if !home.is_absolute() || home == Path::new("/") || scratch.starts_with(&home) {
        return None;
    }
    CString::new(home.into_os_string().into_encoded_bytes()).ok()
}

/// Between fork and exec: a new session, death with the parent, limits, and namespaces
/// with no network and no home directory in them.
fn confine(cpu_seconds: u64, hide: Option<&std::ffi::CStr>) -> io::Result<()> {
    fn check(result: libc::c_int) -> io::Result<()> {
        if result == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
    fn limit(resource: libc::__rlimit_resource_t, value: u64) -> io::Result<()> {
        let limit = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: a plain system call on a stack value.
        check(unsafe { libc::setrlimit(resource, &limit) })
    }
    // SAFETY: plain system calls with constant arguments.
    unsafe {
        check(libc::setsid())?;
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
    }
    limit(libc::RLIMIT_AS, MEMORY_BYTES)?;
    limit(libc::RLIMIT_CPU, cpu_seconds)?;
    limit(libc::RLIMIT_FSIZE, FILE_BYTES)?;
    limit(libc::RLIMIT_NOFILE, OPEN_FILES)?;
    limit(libc::RLIMIT_CORE, 0)?;
    // SAFETY: as above, with C strings made before the fork. A new network namespace has
    // only a loopback device, and it is down; the user namespace is what lets an
    // unprivileged process make one, and mount in its own mount namespace.
    unsafe {
        check(libc::unshare(
            libc::CLONE_NEWUSER | libc::CLONE_NEWNET | libc::CLONE_NEWNS,
        ))?;
        if let Some(home) = hide {
            // Mounts made here must not propagate back to the host's namespace.
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                c"none".as_ptr(),
                home.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                c"size=1m,mode=0700".as_ptr().cast(),
            ))?;
        }
    }
    Ok(())
}

/// Kills a program's whole session when dropped: after a timeout, after it ended (what it
/// left running in the background), or when the job is cancelled mid-run.
struct Group(Option<i32>);

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: a signal to the process group the child leads; ESRCH is fine.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
    }
}

/// A private directory, removed with everything in it when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let path =
            std::env::temp_dir().join(format!("kubeswarm-tests-{:016x}", rand::random::<u64>()));
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        Ok(Self(path))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn read_tail(path: &Path) -> io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let length = file.metadata()?.len();
    // The tail and the marker line after it, with room for a character cut at the start.
    file.seek(SeekFrom::Start(
        length.saturating_sub(TAIL_BYTES as u64 + 64),
    ))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn broken(what: &str, err: io::Error) -> SandboxError {
    SandboxError::Broken {
        what: format!("the tests' sandbox {what}"),
        source: Some(Box::new(err)),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A program as the engine makes them: it prints its marker when it gets to the end.
    fn program(source: &str, seconds: u64) -> Program {
        let marker = "tests-done".to_owned();
        Program {
            source: format!("{source}\nprint({marker:?}, flush=True)\n"),
            timeout: Duration::from_secs(seconds),
            marker,
        }
    }

    async fn run(source: &str, seconds: u64) -> Ran {
        Subprocess::default()
            .run(program(source, seconds))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_program_that_exits_0_passes_and_a_failed_assertion_is_quoted() {
        assert_eq!(run("assert 1 + 1 == 2\n", 10).await, Ran::Passed);
        match run(
            "def add(a, b):\n    return a - b\n\nassert add(2, 3) == 5, 'add(2, 3)'\n",
            10,
        )
        .await
        {
            Ran::Failed { how, tail } => {
                assert_eq!(how, "exit status 1");
                assert!(tail.ends_with("AssertionError: add(2, 3)"), "{tail}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_program_past_its_time_is_killed_with_what_it_started() {
        let marker =
            std::env::temp_dir().join(format!("kubeswarm-orphan-{}", rand::random::<u32>()));
        // A grandchild that would write the marker after the program's time is up.
        let source = format!(
            "import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3); open({:?}, \"w\").write(\"x\")'])\nwhile True: pass\n",
            marker.display().to_string()
        );
        let started = std::time::Instant::now();
        assert_eq!(run(&source, 1).await, Ran::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(3));
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(!marker.exists(), "the program's child outlived the timeout");
    }

    #[tokio::test]
    async fn a_program_has_no_network_no_home_and_an_empty_environment() {
        let source = "import os, socket\nassert set(os.environ) <= {'PATH', 'HOME', 'LANG', 'LC_CTYPE'}, sorted(os.environ)\nfor host in ('127.0.0.1', '1.1.1.1'):\n    s = socket.socket()\n    s.settimeout(2)\n    assert s.connect_ex((host, 80)) != 0, host\n    try:\n        socket.create_connection((host, 80), timeout=2)\n        raise SystemExit('connected to ' + host)\n    except OSError as err:\n        print(host, err)\n";
        assert_eq!(run(source, 10).await, Ran::Passed);
        // Loopback is really unreachable, not just closed: a listener outside the
        // sandbox is not seen from inside.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let source = format!(
            "import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n    raise SystemExit('reached the host')\nexcept OSError:\n    pass\n"
        );
        assert_eq!(run(&source, 10).await, Ran::Passed);
        // The user's home directory is an empty one inside.
        let home = std::env::var("HOME").unwrap();
        if home_to_hide(&std::env::temp_dir()).is_some() {
            let source =
                format!("import os\nassert os.listdir({home:?}) == [], os.listdir({home:?})\n");
            assert_eq!(run(&source, 10).await, Ran::Passed);
        }
    }

    #[tokio::test]
    async fn a_program_that_prints_without_end_is_stopped_and_its_memory_bounded() {
        match run("while True: print('x' * 1000)\n", 20).await {
            Ran::Failed { how, .. } => assert!(how.contains("after printing"), "{how}"),
            other => panic!("{other:?}"),
        }
        match run("b = bytearray(2 << 30)\n", 10).await {
            Ran::Failed { tail, .. } => assert!(tail.ends_with("MemoryError"), "{tail}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn no_python_is_a_sandbox_that_is_unavailable() {
        let sandbox = Subprocess::new(PathBuf::from("/nonexistent/python3"));
        let err = sandbox.run(program("pass", 1)).await.unwrap_err();
        assert!(matches!(err, SandboxError::Unavailable { .. }), "{err}");
        assert!(err.to_string().contains("install it"), "{err}");
    }
}
