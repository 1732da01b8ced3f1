//! The verify step: the gate's verdicts, asked again when malformed.

use super::*;

#[tokio::test]
async fn malformed_verdicts_are_asked_again_then_reported() {
    // The gate rambles once per output, then answers properly; for "black" it never does.
    let workers = Mock::start("m", |body, _| text(part(body))).await;
    let rambled = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
    let gate = Mock::start("m", move |body, _| {
        let about = part(body);
        let mut rambled = rambled.lock().unwrap();
        let n = rambled.entry(about.clone()).or_default();
        *n += 1;
        if about.contains("Answer to review:\nblack") || *n == 1 {
            text("I think this answer is quite good overall!")
        } else if about.contains("Answer to review:\nblue") {
            // A verdict cut off at its limit on every ask after the first.
            Reply::Truncated(r#"{"issues": ["the colour is"#.to_owned())
        } else {
            verdict(true, 70, &[])
        }
    })
    .await;
    let job = spec(&FOUR.replace("synthesize", "collect"));
    let outcome = run_gated(&workers, &gate, &job).await;
    let records = &outcome.checkpoint.subagents;
    assert!(records[&0].passed());
    assert_eq!(records[&0].verdict.as_ref().unwrap().score, Some(70));
    let error = records[&3].error.as_deref().unwrap();
    assert!(
        error.starts_with(
            "no usable verdict after 3 attempts: the gate's verdict is not the requested JSON"
        ),
        "{error}"
    );
    assert!(!records[&3].passed());
    let error = records[&2].error.as_deref().unwrap();
    assert!(
        error.ends_with("(the reply was cut off at its limit of 512 tokens)"),
        "{error}"
    );
    assert_eq!(outcome.result.unwrap().0.chosen, [0, 1]);
    assert_eq!(gate.count(), 2 * 2 + 3 + 3);
}

#[tokio::test]
async fn a_pass_needs_a_score_and_a_fail_says_why() {
    let workers = Mock::start("m", |body, _| text(part(body))).await;
    let gate = Mock::start("m", |body, _| match part(body).as_str() {
        // A pass with a score of 0 and a placeholder issue: what a weak gate says.
        s if s.contains("Answer to review:\nred\n") => verdict(true, 0, &["..."]),
        s if s.contains("Answer to review:\ngreen\n") => verdict(true, 50, &[]),
        s if s.contains("Answer to review:\nblue\n") => verdict(false, 90, &[" "]),
        _ => verdict(true, 49, &["too vague"]),
    })
    .await;
    let pools = pools(&[
        ("workers", vec![workers.url.clone()]),
        ("gate", vec![gate.url.clone()]),
    ]);
    let job = FOUR.replace("synthesize", "collect");
    let outcome = run_job(&spec(&job), &pools, &Memory::default()).await;
    let issues = |i: usize| {
        let verdict = outcome.checkpoint.subagents[&i].verdict.clone().unwrap();
        (verdict.pass, verdict.issues)
    };
    assert_eq!(
        issues(0),
        (
            false,
            vec!["the reviewer scored the answer 0/100, below the 50 it needs to pass".to_owned()]
        )
    );
    assert_eq!(issues(1), (true, vec![]));
    assert_eq!(
        issues(2),
        (
            false,
            vec!["the reviewer failed the answer without naming an issue".to_owned()]
        )
    );
    assert_eq!(issues(3), (false, vec!["too vague".to_owned()]));
    assert_eq!(outcome.result.unwrap().0.chosen, [1]);

    // minScore 0 leaves it to the gate's own pass.
    let lenient = job.replace("pool: gate}", "pool: gate, minScore: 0}");
    let outcome = run_job(&spec(&lenient), &pools, &Memory::default()).await;
    assert_eq!(outcome.result.unwrap().0.chosen, [0, 1, 3]);
}

const ADD: &str = r#"
task: Write a Python function add(a, b) that returns the sum of a and b.
subtasks: [first, second, third]
fanOut: {pool: workers, subagents: 3, maxTokens: 128, timeoutSeconds: 5}
verification:
  mode: adversarial
  pool: gate
  repairRounds: 1
  checks:
  - type: tests
    tests:
      prelude: "import math"
      source: |
        assert add(2, 3) == 5, "add(2, 3) should be 5"
        assert add(-1, 1) == 0
      timeoutSeconds: 5
aggregation: {strategy: collect}
"#;

#[tokio::test]
async fn the_tests_run_the_outputs_code_and_a_failure_is_repaired_with_its_traceback() {
    // The first subagent is right; the second is wrong, then right when it sees the
    // traceback; the third leaves the tests no chance to run, twice.
    let workers = Mock::start("m", |body, _| {
        let repairing = body["messages"].as_array().unwrap().len() > 2;
        let asked = body["messages"][0]["content"].as_str().unwrap().to_owned();
        match (asked.as_str(), repairing) {
            (s, _) if s.contains("first") => {
                text("Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nEnjoy.")
            }
            (s, false) if s.contains("second") => text("def add(a, b):\n    return a - b"),
            (s, true) if s.contains("second") => text("def add(a, b):\n    return b + a"),
            _ => text("import sys\ndef add(a, b):\n    return 0\nsys.exit(0)"),
        }
    })
    .await;
    let gate = Mock::start("m", happy).await;
    let outcome = run_gated(&workers, &gate, &spec(ADD)).await;
    let records = &outcome.checkpoint.subagents;
    assert!(records[&0].passed() && !records[&0].repaired);
    assert!(
        records[&1].passed() && records[&1].repaired,
        "{:?}",
        records[&1]
    );
    let repair = workers
        .requests()
        .into_iter()
        .find(|r| {
            let messages = r["messages"].as_array().unwrap();
            messages.len() > 2 && messages[0]["content"].as_str().unwrap().contains("second")
        })
        .unwrap();
    assert!(
        repair
            .to_string()
            .contains("AssertionError: add(2, 3) should be 5"),
        "the repair quotes the failed assertion: {repair}"
    );
    let third = records[&2].verdict.as_ref().unwrap();
    assert!(!third.pass);
    assert!(
        third.issues[0].contains("the program ended before the tests ran"),
        "{third:?}"
    );
    // The gate judged only the code that passed its tests: two outputs.
    assert_eq!(gate.count(), 2);
    assert_eq!(outcome.result.unwrap().0.chosen, [0, 1]);
}

/// A sandbox that can run nothing (here no Python; elsewhere no namespaces, no image)
/// fails the job with a reason of its own, not every output with a verdict it did not
/// earn.
#[tokio::test]
async fn no_sandbox_fails_the_job_as_tests_unavailable() {
    let workers = Mock::start("m", |_, _| text("def add(a, b):\n    return a + b")).await;
    let gate = Mock::start("m", happy).await;
    let pools = pools(&[
        ("workers", vec![workers.url.clone()]),
        ("gate", vec![gate.url.clone()]),
    ]);
    let (_tx, suspended) = watch::channel(false);
    let outcome = Job {
        name: "job",
        spec: &spec(ADD),
        pools: &pools,
        store: &Memory::default(),
        observer: &Log::default(),
        started: Instant::now(),
        suspended,
        sandbox: &kubeswarm::local::sandbox::Subprocess::new("/nonexistent/python3".into()),
        options: fast(),
    }
    .execute()
    .await
    .unwrap();
    let failure = outcome.result.unwrap_err();
    assert_eq!(failure.reason, Reason::TestsUnavailable);
    assert!(
        failure
            .message
            .contains("/nonexistent/python3 was not found"),
        "{failure}"
    );
    assert_eq!(gate.count(), 0);
}
