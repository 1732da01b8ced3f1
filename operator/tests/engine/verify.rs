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
    assert_eq!(outcome.result.unwrap().0.chosen, [0, 1, 2]);
    assert_eq!(gate.count(), 3 * 2 + 3);
}
