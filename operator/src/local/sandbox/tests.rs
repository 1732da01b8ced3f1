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
    let marker = std::env::temp_dir().join(format!("kubeswarm-orphan-{}", rand::random::<u32>()));
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
    // The user's home directory, /tmp and /run are empty ones inside (but for the
    // program's own directory), and /proc shows the sandbox alone, with the program
    // as its init.
    let home = std::env::var("HOME").unwrap();
    let source = format!(
        "import os\nfor d in ({home:?}, '/tmp', '/run'):\n    assert os.listdir(d) in ([], [os.path.basename(os.getcwd())]), (d, os.listdir(d))\nassert os.getpid() == 1, os.getpid()\npids = [p for p in os.listdir('/proc') if p.isdigit()]\nassert pids in ([], ['1']), pids\n"
    );
    assert_eq!(run(&source, 10).await, Ran::Passed);
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
