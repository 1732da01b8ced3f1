use std::process::Command;

use super::*;

fn program(source: &str, seconds: u64) -> Program {
    let marker = format!("done-{}", source.len());
    Program {
        source: format!("{source}\nimport os\nos.write(1, b'\\n{marker}\\n')\n"),
        timeout: Duration::from_secs(seconds),
        marker,
    }
}

fn owner() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
        api_version: "kubeswarm.dev/v1alpha1".into(),
        kind: "SwarmJob".into(),
        name: "j".into(),
        uid: "u-1".into(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

fn settings() -> Settings {
    Settings {
        image: Some("registry.internal/python:3.12".into()),
        cpu: "500m".into(),
        memory: "256Mi".into(),
    }
}

/// A job's test pods, with a client that is never called.
fn pods(settings: Settings) -> Pods {
    let job: SwarmJob = serde_json::from_value(json!({
        "apiVersion": "kubeswarm.dev/v1alpha1", "kind": "SwarmJob",
        "metadata": {"name": "j", "namespace": "team-a", "uid": "u-1"},
        "spec": {
            "task": "t",
            "fanOut": {"pool": "p", "subagents": 1},
            "verification": {"mode": "none"},
            "aggregation": {"strategy": "collect"},
        },
    }))
    .unwrap();
    // Both of rustls' providers are compiled in with the whole workspace: pick one.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let client =
        kube::Client::try_from(kube::Config::new("http://127.0.0.1:1".parse().unwrap())).unwrap();
    Pods::new(client, &job, Kind::ConfigMap, settings)
}

#[test]
fn a_batch_pod_is_restricted_closed_and_bounded() {
    let settings = settings();
    let job = build_job(
        &Batch {
            name: "j-tests-0123",
            job: "j",
            uid: "u-1",
            image: "registry.internal/python:3.12",
            settings: &settings,
            kind: Kind::Secret,
            deadline: 150,
        },
        &owner(),
    );
    let spec = job.spec.unwrap();
    assert_eq!(spec.backoff_limit, Some(0));
    assert_eq!(spec.active_deadline_seconds, Some(150));
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.automount_service_account_token, Some(false));
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    let security = pod.security_context.unwrap();
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(security.seccomp_profile.unwrap().type_, "RuntimeDefault");
    let container = &pod.containers[0];
    let context = container.security_context.clone().unwrap();
    assert_eq!(context.allow_privilege_escalation, Some(false));
    assert_eq!(context.read_only_root_filesystem, Some(true));
    assert_eq!(context.capabilities.unwrap().drop.unwrap(), ["ALL"]);
    let limits = container.resources.clone().unwrap().limits.unwrap();
    assert_eq!(limits["cpu"].0, "500m");
    assert_eq!(limits["memory"].0, "256Mi");
    // Where results are secret, so are the programs, which hold the outputs.
    let volumes = pod.volumes.unwrap();
    assert_eq!(
        volumes[0].secret.as_ref().unwrap().secret_name.as_deref(),
        Some("j-tests-0123")
    );
    assert!(volumes[0].config_map.is_none());
    assert_eq!(job.metadata.owner_references.unwrap()[0].uid, "u-1");

    let policy = build_policy("j", "u-1", &owner()).spec.unwrap();
    assert_eq!(policy.policy_types.unwrap(), ["Ingress", "Egress"]);
    assert!(policy.ingress.is_none() && policy.egress.is_none());
    assert_eq!(
        policy.pod_selector.unwrap().match_labels.unwrap()[TESTS_OF],
        "u-1"
    );
    // The pods the Job makes carry the label the policy selects.
    assert_eq!(
        spec.template.metadata.unwrap().labels.unwrap()[TESTS_OF],
        "u-1"
    );
}

#[test]
fn batch_names_fit_a_label_and_differ_by_job_and_programs() {
    let a = program("pass", 1);
    let b = program("assert False", 1);
    let long = "x".repeat(253);
    let name = batch_name(&long, "u-1", &[&a]);
    assert!(name.len() <= 63, "{name}");
    assert_eq!(batch_name("j", "u-1", &[&a]), batch_name("j", "u-1", &[&a]));
    assert_ne!(batch_name("j", "u-1", &[&a]), batch_name("j", "u-2", &[&a]));
    assert_ne!(batch_name("j", "u-1", &[&a]), batch_name("j", "u-1", &[&b]));
    // Cut where a name may not end, the cut is trimmed.
    let dotted = format!("{}.{}", "a".repeat(39), "b".repeat(20));
    assert!(batch_name(&dotted, "u-1", &[&a]).starts_with(&format!("{}-tests-", "a".repeat(39))));
    // Jobs whose names start alike get policies of their own.
    let one = build_policy(&long, "u-1", &owner()).metadata.name.unwrap();
    let two = build_policy(&long, "u-2", &owner()).metadata.name.unwrap();
    assert_ne!(one, two);
    assert!(one.len() <= 63, "{one}");
}

#[test]
fn a_hostile_or_short_report_is_a_broken_batch_never_a_pass() {
    let a = program("pass", 1);
    let b = program("pass", 2);
    let programs = [&a, &b];
    // The format the runner writes: see the_runner_reports_each_program_within_a_termination_message.
    let good = r#"[{"exit":0,"finished":true,"printout":"ok\n"},{"timedOut":true,"finished":false,"printout":""}]"#;
    assert_eq!(
        read_report(good, &programs).unwrap(),
        [Ran::Passed, Ran::TimedOut]
    );
    for bad in [
        String::new(),
        "not json".to_owned(),
        r#"[{"exit":0,"finished":true,"printout":""}]"#.to_owned(),
        r#"[{"exit":0,"signal":9,"finished":true,"printout":""},{"exit":0,"finished":true,"printout":""}]"#.to_owned(),
        r#"[{"exit":0,"pass":true,"finished":true,"printout":""},{"exit":0,"finished":true,"printout":""}]"#.to_owned(),
        r#"[{"finished":true,"printout":""},{"exit":0,"finished":true,"printout":""}]"#.to_owned(),
        // Saying nothing of the marker is not having printed it.
        r#"[{"exit":0,"printout":""},{"exit":0,"finished":true,"printout":""}]"#.to_owned(),
    ] {
        let err = read_report(&bad, &programs).unwrap_err();
        assert!(matches!(err, SandboxError::Broken { .. }), "{bad:?}: {err}");
    }
    // Status 0 without the marker: the code exited before the tests.
    let early = r#"[{"exit":0,"finished":false,"printout":"bye"},{"exit":1,"finished":true,"printout":"Traceback"}]"#;
    let ran = read_report(early, &programs).unwrap();
    assert!(matches!(&ran[0], Ran::Failed { how, .. } if how.contains("before the tests ran")));
    assert!(matches!(&ran[1], Ran::Failed { how, .. } if how == "exit status 1"));
}

/// The runner the pods run, run here with the local Python: its report is what
/// `read_report` reads, within a termination message's 4 KiB however much the
/// programs print.
#[tokio::test]
async fn the_runner_reports_each_program_within_a_termination_message() {
    let dir = std::env::temp_dir().join(format!("kubeswarm-runner-{}", rand::random::<u32>()));
    std::fs::create_dir(&dir).unwrap();
    let programs = [
        program("assert 1 + 1 == 2", 5),
        program("print('x' * 100000)\nassert 1 + 1 == 3, 'arithmetic'", 5),
        program("import time\ntime.sleep(30)", 1),
        program("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", 5),
        program("import sys\nprint('leaving')\nsys.exit(0)", 5),
    ];
    let refs: Vec<&Program> = programs.iter().collect();
    let pods = pods(settings());
    let object = pods.data_object("j-tests-1", &refs);
    for (file, content) in object.data["data"].as_object().unwrap() {
        std::fs::write(dir.join(file), content.as_str().unwrap()).unwrap();
    }
    let report = dir.join("report");
    let status = Command::new("python3")
        .arg(dir.join("run.py"))
        .arg(&report)
        .status()
        .unwrap();
    assert!(status.success());
    let message = std::fs::read_to_string(&report).unwrap();
    assert!(message.len() <= 4096, "{} bytes", message.len());
    let ran = read_report(&message, &refs).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(ran[0], Ran::Passed);
    assert!(
        matches!(&ran[1], Ran::Failed { how, tail } if how == "exit status 1" && tail.ends_with("AssertionError: arithmetic")),
        "{:?}",
        ran[1]
    );
    assert_eq!(ran[2], Ran::TimedOut);
    assert!(matches!(&ran[3], Ran::Failed { how, .. } if how == "killed by signal 9"));
    assert!(matches!(&ran[4], Ran::Failed { how, .. } if how.contains("before the tests ran")));
}

#[tokio::test]
async fn with_no_image_the_cluster_runs_no_tests_and_says_which_value_to_set() {
    let pods = pods(Settings {
        image: None,
        ..settings()
    });
    let err = pods.run(program("pass", 1)).await.unwrap_err();
    assert!(matches!(err, SandboxError::Unavailable { .. }));
    assert!(err.to_string().contains("tests.image"), "{err}");
}

#[tokio::test]
async fn a_batch_takes_at_most_its_share_and_always_one() {
    let pods = pods(settings());
    let mut receivers = Vec::new();
    let mut queue = |source: String| {
        let (reply, answer) = oneshot::channel();
        receivers.push(answer);
        pods.waiting.lock().unwrap().push(Waiting {
            program: program(&source, 1),
            reply,
        });
    };
    for _ in 0..20 {
        queue("pass".into());
    }
    assert_eq!(pods.take_batch().len(), BATCH_PROGRAMS);
    assert_eq!(pods.take_batch().len(), 4);
    queue("#".repeat(BATCH_BYTES * 2));
    queue("pass".into());
    // A program bigger than a batch still runs, alone.
    assert_eq!(pods.take_batch().len(), 1);
    assert_eq!(pods.take_batch().len(), 1);
}
