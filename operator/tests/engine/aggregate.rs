//! The aggregate step: a vote over the outputs, and the best by the gate's score.

use super::*;
use kubeswarm::api::Decision;
use kubeswarm_test_support::mock::token_logprobs;
use serde_json::json;

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
    let tally = voted.tally.unwrap();
    assert_eq!(voted.chosen, [0]);
    assert_eq!(
        (
            tally.answer.as_str(),
            tally.votes,
            tally.of,
            tally.decided_by
        ),
        ("paris", 2, 3, Decision::Majority)
    );
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

/// Subagents that reason before they answer, as small models get arithmetic right: no two
/// outputs are equal, and the vote is over the numbers they end on.
const REASONED: [&str; 6] = [
    "12 pens in 3 boxes of 4, so the total is 12.",
    "Each box holds 4; 4 + 4 + 4 = 13.",
    "3 * 4 = 12. The answer is 12.",
    "I am not sure how many there are.",
    "Three boxes, four pens: 13",
    "Four pens, three times: 12",
];

#[tokio::test]
async fn votes_count_the_answers_found_and_weighted_votes_trust_the_gate() {
    let workers = Mock::start("m", |_, n| text(REASONED[n % 6])).await;
    // The gate sees the answer the job found, and is surer of 13.
    let gate = Mock::start("m", |body, _| {
        let review = last_user(body);
        if review.contains("The final answer it gives: 13") {
            verdict(true, 95, &[])
        } else if review.contains("The final answer it gives: 12") {
            verdict(true, 55, &[])
        } else {
            assert!(review.contains("It gives no final answer"), "{review}");
            verdict(true, 60, &[])
        }
    })
    .await;
    let pools = pools(&[
        ("workers", vec![workers.url.clone()]),
        ("gate", vec![gate.url.clone()]),
    ]);
    let job = |strategy: &str| {
        spec(&format!(
            r#"
task: How many pens are in 3 boxes of 4?
fanOut: {{pool: workers, subagents: 6, maxConcurrency: 1}}
verification: {{mode: adversarial, pool: gate}}
aggregation: {{strategy: {strategy}, answer: {{type: lastNumber}}}}
"#
        ))
    };
    let tally = |strategy: &str| {
        let job = job(strategy);
        let pools = &pools;
        async move {
            let (result, answer) = run_job(&job, pools, &Memory::default())
                .await
                .result
                .unwrap();
            let t = result.tally.unwrap();
            (answer, t.answer, t.votes, t.of, t.unanswered, t.decided_by)
        }
    };
    assert_eq!(
        tally("vote").await,
        (
            REASONED[0].to_owned(),
            "12".to_owned(),
            3,
            5,
            1,
            Decision::Majority
        )
    );
    // 3 votes at 55 weigh less than 2 at 95.
    assert_eq!(
        tally("weightedVote").await,
        (
            REASONED[1].to_owned(),
            "13".to_owned(),
            2,
            5,
            1,
            Decision::GateScore
        )
    );
}

#[tokio::test]
async fn a_vote_with_no_answer_to_count_fails_and_says_what_to_change() {
    let workers = Mock::start("m", |_, _| text("I am not sure.")).await;
    let failure = run_on(
        &workers,
        r#"
task: How many pens are in 3 boxes of 4?
fanOut: {pool: workers, subagents: 2}
verification: {mode: none}
aggregation: {strategy: vote, answer: {type: lastNumber}}
"#,
    )
    .await
    .result
    .unwrap_err();
    assert_eq!(failure.reason, Reason::AggregationFailed);
    assert!(
        failure
            .message
            .contains("none of the 2 passing outputs has an answer"),
        "{}",
        failure.message
    );
}

#[tokio::test]
async fn an_answer_field_with_a_picture_check_is_refused_before_any_call() {
    let workers = Mock::start("m", |_, _| text("{}")).await;
    let failure = run_on(
        &workers,
        r#"
task: Draw.
fanOut: {pool: workers, subagents: 2}
verification: {mode: none, checks: [{type: json}, {type: svg}]}
aggregation: {strategy: vote, answer: {type: jsonField, field: result}}
"#,
    )
    .await
    .result
    .unwrap_err();
    assert_eq!(failure.reason, Reason::InvalidSpec);
    assert!(
        failure
            .message
            .contains("which spec.verification.checks[1] would fail"),
        "{}",
        failure.message
    );
    assert_eq!(workers.count(), 0);
}

#[tokio::test]
async fn an_answer_field_has_subagents_write_under_its_schema() {
    let workers = Mock::start("m", |_, n| {
        text(format!(
            r#"{{"reasoning": "counted", "result": {}}}"#,
            4 + n % 2
        ))
    })
    .await;
    let (result, _) = run_on(
        &workers,
        r#"
task: How many legs has a dog?
fanOut: {pool: workers, subagents: 3, maxConcurrency: 1}
verification: {mode: none, checks: [{type: json}]}
aggregation: {strategy: vote, answer: {type: jsonField, field: result}}
"#,
    )
    .await
    .result
    .unwrap();
    assert_eq!(result.tally.unwrap().answer, "4");
    for request in workers.requests() {
        let schema = &request["response_format"]["json_schema"]["schema"];
        assert_eq!(
            schema["required"],
            serde_json::json!(["reasoning", "result"])
        );
        // The schema replaces the json check's grammar: one constraint per request.
        assert!(request.get("grammar").is_none(), "{request}");
    }
}

/// Four samples, four answers: each sure of itself to a different degree, in
/// log-probabilities per token, some of them what no server should send (above 0, past
/// f32's range, OpenAI's -9999 for a token outside its top 20), and one in the shape an
/// older worker wrote (a greedy token's NaN as null, alternatives by id).
fn apart(_: &Value, n: usize) -> Reply {
    let (content, logprobs) = match n % 4 {
        0 => ("6 + 6 = 12, so 12", token_logprobs(&[-0.5, -0.5, -0.5])),
        1 => (
            "4 * 3 = 12, no: 13",
            token_logprobs(&[-0.1, 5.0, 1e39, -0.1]),
        ),
        2 => ("14", token_logprobs(&[-9999.0, -0.1])),
        _ => (
            "15",
            vec![json!({"token": "15", "logprob": null, "bytes": [49, 53],
                "top_logprobs": [{"token": 868, "logprob": -0.2, "bytes": "15"}]})],
        ),
    };
    Reply::Logprobs(content.to_owned(), logprobs)
}

#[tokio::test]
async fn a_tie_goes_to_the_output_the_worker_was_surest_of() {
    let job = r#"
task: How many pens are in 3 boxes of 4?
fanOut: {pool: workers, subagents: 4, maxConcurrency: 1}
verification: {mode: none}
aggregation: {strategy: vote, answer: {type: lastNumber}}
"#;
    let workers = Mock::start("m", apart).await;
    let store = Memory::default();
    let pools = pools(&[("workers", vec![workers.url.clone()])]);
    let (result, answer) = run_job(&spec(job), &pools, &store).await.result.unwrap();
    let tally = result.tally.unwrap();
    assert_eq!(
        (answer.as_str(), tally.answer.as_str(), tally.decided_by),
        ("4 * 3 = 12, no: 13", "13", Decision::Confidence)
    );
    assert!(
        workers
            .requests()
            .iter()
            .all(|r| r["logprobs"] == true && r["top_logprobs"] == 0)
    );
    // Recorded: the geometric mean of the tokens' probabilities, each log-probability
    // held to [-20, 0] whatever the server sent.
    let confidence = |index: usize| {
        let records = store.0.lock().unwrap();
        let record: SubagentRecord =
            serde_json::from_str(&records[&record::subagent_key(index)]).unwrap();
        record.confidence
    };
    // The older worker's answer stands; its confidence is unknown.
    assert_eq!(confidence(3), None);
    for (index, expected) in [
        (0, (-0.5f64).exp()),
        (1, (-0.05f64).exp()),
        (2, (-10.05f64).exp()),
    ] {
        let recorded = confidence(index).unwrap();
        assert!(
            (recorded - expected).abs() < 1e-6,
            "subagent {index}: {recorded}"
        );
    }

    // An OpenAI-compatible endpoint is not asked (some refuse logprobs): the tie falls
    // to the first answer, as it did before.
    let external = Mock::start("m", apart).await;
    let pools = pools_of(Server::OpenAi, &[("workers", vec![external.url.clone()])]);
    let (result, answer) = run_job(&spec(job), &pools, &Memory::default())
        .await
        .result
        .unwrap();
    assert_eq!(
        (answer.as_str(), result.tally.unwrap().decided_by),
        ("6 + 6 = 12, so 12", Decision::FirstGiven)
    );
    assert!(
        external
            .requests()
            .iter()
            .all(|r| r.get("logprobs").is_none())
    );
}

#[tokio::test]
async fn best_of_gives_equal_scores_to_the_output_the_worker_was_surest_of() {
    let workers = Mock::start("m", apart).await;
    // A gate that scores every output alike, as gates often do in round numbers.
    let gate = Mock::start("m", |_, _| verdict(true, 80, &[])).await;
    let pools = pools(&[
        ("workers", vec![workers.url.clone()]),
        ("gate", vec![gate.url.clone()]),
    ]);
    let job = r#"
task: How many pens are in 3 boxes of 4?
fanOut: {pool: workers, subagents: 4, maxConcurrency: 1}
verification: {mode: adversarial, pool: gate}
aggregation: {strategy: bestOf}
"#;
    let (result, answer) = run_job(&spec(job), &pools, &Memory::default())
        .await
        .result
        .unwrap();
    assert_eq!(
        (result.chosen.as_slice(), answer.as_str()),
        ([1].as_slice(), "4 * 3 = 12, no: 13")
    );
    assert!(
        workers
            .requests()
            .iter()
            .all(|r| r["logprobs"] == true && r["top_logprobs"] == 0)
    );
    // The gate's verdicts are not measured: nothing chooses by them.
    assert!(gate.requests().iter().all(|r| r.get("logprobs").is_none()));
}
