//! The aggregate step: a vote over the outputs, and the best by the gate's score.

use super::*;

#[tokio::test]
async fn vote_and_best_of_choose_by_majority_and_score() {
    let answers = ["Paris", "paris.", "Lyon"];
    let workers = Mock::start("m", move |_, n| text(answers[n % 3])).await;
    let gate = Mock::start("m", |body, _| {
        let score = if part(body).contains("Lyon") { 95 } else { 60 };
        verdict(true, score, &[])
    })
    .await;
    let base = r#"
task: Capital of France?
fanOut: {pool: workers, subagents: 3, maxConcurrency: 1}
verification: {mode: adversarial, pool: gate}
"#;
    let pools = pools(&[
        ("workers", vec![workers.url.clone()]),
        ("gate", vec![gate.url.clone()]),
    ]);
    let (voted, answer) = run_job(
        &spec(&format!("{base}aggregation: {{strategy: vote}}")),
        &pools,
        &Memory::default(),
    )
    .await
    .result
    .unwrap();
    assert_eq!(answer, "Paris");
    let votes = voted.votes.unwrap();
    assert_eq!((votes.winner, votes.votes, votes.of), (0, 2, 3));
    let (best, answer) = run_job(
        &spec(&format!("{base}aggregation: {{strategy: bestOf}}")),
        &pools,
        &Memory::default(),
    )
    .await
    .result
    .unwrap();
    assert_eq!(
        (best.chosen.as_slice(), answer.as_str()),
        ([2].as_slice(), "Lyon")
    );
}

#[tokio::test]
async fn the_synthesis_has_its_own_limit_and_a_cut_off_answer_says_so() {
    let workers = Mock::start("m", |body, _| text(part(body))).await;
    let gate = Mock::start("m", |body, _| {
        if is_verdict(body) {
            verdict(true, 80, &[])
        } else {
            Reply::Truncated("Red, green, blue and".to_owned())
        }
    })
    .await;
    let pools = pools(&[
        ("workers", vec![workers.url.clone()]),
        ("gate", vec![gate.url.clone()]),
    ]);
    let (result, answer) = run_job(&spec(FOUR), &pools, &Memory::default())
        .await
        .result
        .unwrap();
    assert!(result.truncated(), "{result:?}");
    assert_eq!(answer, "Red, green, blue and");
    let synthesis = || {
        gate.requests()
            .into_iter()
            .rfind(|r| !is_verdict(r))
            .unwrap()
    };
    // Four outputs of 5 tokens each took 20: at least one subagent's 64.
    assert_eq!(synthesis()["max_completion_tokens"], 64);
    // With subagents limited to 4 tokens, the 20 the four outputs took.
    let small = FOUR.replace("maxTokens: 64", "maxTokens: 4");
    run_job(&spec(&small), &pools, &Memory::default())
        .await
        .result
        .unwrap();
    assert_eq!(synthesis()["max_completion_tokens"], 20);

    let own = FOUR.replace(
        "aggregation: {strategy: synthesize}",
        "aggregation: {strategy: synthesize, maxTokens: 3000}",
    );
    run_job(&spec(&own), &pools, &Memory::default())
        .await
        .result
        .unwrap();
    assert_eq!(synthesis()["max_completion_tokens"], 3000);
}
