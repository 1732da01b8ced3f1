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
    let outcome = run_job(
        &job,
        &pools(&[
            ("workers", vec![workers.url.clone()]),
            ("gate", vec![gate.url.clone()]),
        ]),
        &Memory::default(),
    )
    .await;
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
