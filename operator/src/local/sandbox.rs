//! The sandbox of `tests` checks in local mode: `python3` in a process of its own, in
//! fresh user, network, mount and PID namespaces. No network at all (not even loopback to
//! the workers, nor a Unix socket under /tmp or /run); the user's home directory, /tmp,
//! /run and /dev/shm hidden under empty ones; a /proc that shows only the sandbox, so no
//! other process of the user's lends it a view of the host (`/proc/PID/root`); the
//! program as the namespace's init, so when it ends or is killed at its timeout everything
//! it started goes with it, whatever session it made. Resource limits, an empty
//! environment, and a scratch directory that goes too. What the program prints can reach
//! a model (as the repair round's instruction), so what it may read matters as much as
//! where it may connect.

// The one module that may: see the workspace's lints.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
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
/// Processes the sandbox may hold at once: room for a test's subprocesses, not a fork bomb.
const PROCESSES: u64 = 256;
/// Directories hidden under an empty file system, with its size and mode: where sockets
/// to the user's agents and services live, and scratch space of other programs.
const HIDDEN: [(&str, &CStr); 3] = [
    ("/tmp", c"size=64m,mode=1777"),
    ("/run", c"size=1m,mode=0755"),
    ("/dev/shm", c"size=16m,mode=1777"),
];

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
        let confinement = self.confinement(&scratch.0, program.timeout.as_secs() + 1)?;

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
        // SAFETY: between fork and exec only async-signal-safe system calls (setsid,
        // prctl, setrlimit, unshare, mount, fork, waitpid, close, _exit), on values made
        // before the fork, with no allocation.
        unsafe {
            command.pre_exec(move || confine(&confinement));
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
                what: "the tests check could not start its sandbox, a process in user, network, mount and PID namespaces of its own: this machine must allow unprivileged user namespaces (sysctl user.max_user_namespaces above 0, and kernel.unprivileged_userns_clone=1 where the kernel has it)".to_owned(),
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
        Ok(
            match program.judge(exit, program.finished_in(&printed), &printed) {
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
            },
        )
    }
}

impl Subprocess {
    /// What the sandbox does before it runs a program in `scratch`, as C strings made before
    /// the fork: the directories of `HIDDEN` that exist and the home directory, hidden, and
    /// the scratch directory bound again where it was if it is inside one of them. An
    /// interpreter inside one could not run, so that is refused with the fix.
    fn confinement(&self, scratch: &Path, cpu_seconds: u64) -> Result<Confinement, SandboxError> {
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .filter(|home| home.is_absolute() && home != Path::new("/") && home.is_dir());
        let mut hidden: Vec<(PathBuf, &'static CStr)> = HIDDEN
            .iter()
            .map(|(dir, options)| (PathBuf::from(dir), *options))
            .filter(|(dir, _)| dir.is_dir())
            .collect();
        if let Some(home) = home {
            hidden.push((home, c"size=1m,mode=0700"));
        }
        if self.python.is_absolute()
            && let Some((dir, _)) = hidden.iter().find(|(dir, _)| self.python.starts_with(dir))
        {
            return Err(SandboxError::Unavailable {
                what: format!(
                    "--python {} is under {}, which the tests' sandbox hides (it holds the credentials and sockets of the user's other programs): use a Python installed outside it, for example a virtualenv under /opt",
                    self.python.display(),
                    dir.display()
                ),
                source: None,
            });
        }
        let scratch = std::fs::canonicalize(scratch)
            .map_err(|err| broken("could not find its directory", err))?;
        // The directories from the innermost hidden one down to the scratch directory.
        let remake: Vec<PathBuf> = hidden
            .iter()
            .filter(|(dir, _)| scratch.starts_with(dir))
            .max_by_key(|(dir, _)| dir.as_os_str().len())
            .map(|(dir, _)| {
                let mut below: Vec<PathBuf> = scratch
                    .ancestors()
                    .take_while(|a| a != dir)
                    .map(Path::to_path_buf)
                    .collect();
                below.reverse();
                below
            })
            .unwrap_or_default();
        let c_path = |path: PathBuf| {
            CString::new(path.into_os_string().into_encoded_bytes()).map_err(|err| {
                SandboxError::Unavailable {
                    what: "a directory of the sandbox has a NUL in its name".to_owned(),
                    source: Some(Box::new(err)),
                }
            })
        };
        // SAFETY: plain system calls that cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        Ok(Confinement {
            cpu_seconds,
            uid_map: format!("{uid} {uid} 1").into_bytes(),
            gid_map: format!("{gid} {gid} 1").into_bytes(),
            hidden: hidden
                .into_iter()
                .map(|(dir, options)| Ok((c_path(dir)?, options)))
                .collect::<Result<_, SandboxError>>()?,
            scratch: remake.into_iter().map(c_path).collect::<Result<_, _>>()?,
        })
    }
}

/// What the sandbox's process does before it runs the program, made before the fork.
struct Confinement {
    cpu_seconds: u64,
    /// The user's own ids as the only ones of the new user namespace: files it makes in
    /// its own file systems need an owner there.
    uid_map: Vec<u8>,
    gid_map: Vec<u8>,
    /// Directories covered with an empty file system, with its options.
    hidden: Vec<(CString, &'static CStr)>,
    /// Where the scratch directory is inside a hidden one: the directories to make there,
    /// the last being the scratch directory's own path, which the current directory (the
    /// scratch directory, entered before) is bound to. Python opens its script by its
    /// absolute path.
    scratch: Vec<CString>,
}

/// Between fork and exec: a new session, death with the parent, limits, namespaces with no
/// network and with the hidden directories empty; then a fork, so that the program is the
/// init of the new PID namespace while this process waits for it and exits as it did.
fn confine(confinement: &Confinement) -> io::Result<()> {
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
    limit(libc::RLIMIT_CPU, confinement.cpu_seconds)?;
    limit(libc::RLIMIT_FSIZE, FILE_BYTES)?;
    limit(libc::RLIMIT_NOFILE, OPEN_FILES)?;
    limit(libc::RLIMIT_CORE, 0)?;
    // SAFETY: as above, with C strings made before the fork. A new network namespace has
    // only a loopback device, and it is down; the user namespace is what lets an
    // unprivileged process make the others and mount in its own mount namespace.
    unsafe {
        check(libc::unshare(
            libc::CLONE_NEWUSER | libc::CLONE_NEWNET | libc::CLONE_NEWNS | libc::CLONE_NEWPID,
        ))?;
    }
    // SAFETY: as above, on byte strings made before the fork.
    unsafe {
        write(c"/proc/self/setgroups", b"deny")?;
        write(c"/proc/self/uid_map", &confinement.uid_map)?;
        write(c"/proc/self/gid_map", &confinement.gid_map)?;
    }
    // Counted in the new user namespace (Linux 5.14 and later), so the user's other
    // processes do not count against it.
    limit(libc::RLIMIT_NPROC, PROCESSES)?;
    // SAFETY: as above. The current directory (the scratch directory, entered before this
    // runs) stays usable under a file system mounted over its path.
    unsafe {
        // Mounts made here must not propagate back to the host's namespace.
        check(libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
        for (dir, options) in &confinement.hidden {
            check(libc::mount(
                c"none".as_ptr(),
                dir.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                options.as_ptr().cast(),
            ))?;
        }
        if let Some(scratch) = confinement.scratch.last() {
            for dir in &confinement.scratch {
                if libc::mkdir(dir.as_ptr(), 0o700) == -1
                    && *libc::__errno_location() != libc::EEXIST
                {
                    return Err(io::Error::last_os_error());
                }
            }
            check(libc::mount(
                c".".as_ptr(),
                scratch.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ))?;
            check(libc::chdir(scratch.as_ptr()))?;
        }
        match libc::fork() {
            -1 => Err(io::Error::last_os_error()),
            0 => {
                // The init of the new PID namespace: it sees only its own processes.
                check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
                let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
                if libc::mount(
                    c"proc".as_ptr(),
                    c"/proc".as_ptr(),
                    c"proc".as_ptr(),
                    flags,
                    std::ptr::null(),
                ) == -1
                {
                    // Where the host's /proc has parts covered, a new one may not be
                    // mounted: then none at all.
                    check(libc::mount(
                        c"none".as_ptr(),
                        c"/proc".as_ptr(),
                        c"tmpfs".as_ptr(),
                        flags,
                        c"size=4k,mode=0555".as_ptr().cast(),
                    ))?;
                }
                Ok(())
            }
            child => {
                // The waiter holds nothing open: the spawning side reads the end of the
                // program's start from a pipe it must see closed.
                if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) == -1 {
                    for fd in 3..4096 {
                        libc::close(fd);
                    }
                }
                let mut status = 0;
                while libc::waitpid(child, &mut status, 0) == -1 {
                    if *libc::__errno_location() != libc::EINTR {
                        libc::_exit(127);
                    }
                }
                if libc::WIFSIGNALED(status) {
                    let signal = libc::WTERMSIG(status);
                    libc::signal(signal, libc::SIG_DFL);
                    libc::kill(libc::getpid(), signal);
                    libc::_exit(128 + signal);
                }
                libc::_exit(libc::WEXITSTATUS(status))
            }
        }
    }
}

/// Writes `content` to the file at `path`, with no allocation (between fork and exec).
///
/// # Safety
/// Only system calls on the given pointers.
unsafe fn write(path: &CStr, content: &[u8]) -> io::Result<()> {
    // SAFETY: plain system calls on a C string and a byte slice that outlive them.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd == -1 {
            return Err(io::Error::last_os_error());
        }
        let written = libc::write(fd, content.as_ptr().cast(), content.len());
        libc::close(fd);
        if written != content.len() as isize {
            return Err(io::Error::last_os_error());
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
mod tests;
