//! The plan step: the planner's subtasks, asked again when malformed.

use super::*;

#[tokio::test]
async fn the_planner_is_asked_again_for_a_malformed_plan_then_the_job_fails() {
    let planner = Mock::start("m", |body, n| {
        assert!(is_plan(body));
        if n == 0 {
            text("Here is a plan: first do a, then b.")
        } else {
            text(r#"{"subtasks": ["a", "b"]}"#)
        }
    })
    .await;
    let workers = Mock::start("m", |body, _| text(part(body))).await;
    let job = spec(
        r#"
task: Two things.
planner: {pool: planner}
fanOut: {pool: workers, subagents: 2}
verification: {mode: none}
aggregation: {strategy: collect}
"#,
    );
    let pools_ = pools(&[
        ("planner", vec![planner.url.clone()]),
        ("workers", vec![workers.url.clone()]),
    ]);
    let store = Memory::default();
    let outcome = run_job(&job, &pools_, &store).await;
    assert_eq!(outcome.result.unwrap().0.chosen, [0, 1]);
    assert_eq!(planner.count(), 2);
    let schema = &planner.requests()[0]["response_format"]["json_schema"]["schema"];
    assert_eq!(schema["properties"]["subtasks"]["minItems"], 2);
    assert_eq!(
        store.0.lock().unwrap()[record::PLAN],
        record::encode(&vec!["a", "b"])
    );
    let mut parts: Vec<String> = workers.requests().iter().map(part).collect();
    parts.sort();
    assert_eq!(parts, ["a", "b"]);

    let rambling = Mock::start("m", |_, _| text("no JSON today")).await;
    let outcome = run_job(
        &job,
        &pools(&[
            ("planner", vec![rambling.url.clone()]),
            ("workers", vec![workers.url.clone()]),
        ]),
        &Memory::default(),
    )
    .await;
    let failure = outcome.result.unwrap_err();
    assert_eq!(failure.reason, Reason::PlanFailed);
    assert!(
        failure
            .message
            .starts_with("no usable plan after 3 attempts"),
        "{}",
        failure.message
    );

    // A plan cut off at the planner's limit is malformed JSON, and the failure says why.
    let cut = Mock::start("m", |_, _| {
        Reply::Truncated(r#"{"subtasks": ["a", "#.to_owned())
    })
    .await;
    let outcome = run_job(
        &job,
        &pools(&[
            ("planner", vec![cut.url.clone()]),
            ("workers", vec![workers.url.clone()]),
        ]),
        &Memory::default(),
    )
    .await;
    let failure = outcome.result.unwrap_err();
    assert_eq!(failure.reason, Reason::PlanFailed);
    assert!(
        failure
            .message
            .ends_with("(the reply was cut off at its limit of 2048 tokens)"),
        "{}",
        failure.message
    );
}
