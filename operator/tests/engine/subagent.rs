//! The subagent step: a repair round after a failed check, decoding under a grammar.

use super::*;
use kubeswarm::api::FinishReason;

#[tokio::test]
async fn a_failed_check_gets_one_repair_with_the_critique() {
    let workers = Mock::start("m", |body, _| {
        let messages = body["messages"].as_array().unwrap();
        if messages.len() > 1 {
            text(r#"{"colour": "red"}"#)
        } else {
            text("red, I think")
        }
    })
    .await;
    let job = spec(
        r#"
task: Name a colour as JSON.
fanOut: {pool: workers, subagents: 1}
verification: {mode: none, repairRounds: 1, checks: [{type: json}]}
aggregation: {strategy: collect}
"#,
    );
    let outcome = run_job(
        &job,
        &pools(&[("workers", vec![workers.url.clone()])]),
        &Memory::default(),
    )
    .await;
    let record = &outcome.checkpoint.subagents[&0];
    assert!(record.passed() && record.repaired);
    assert_eq!(record.output, r#"{"colour": "red"}"#);
    assert_eq!(record.attempts, 2);
    let repair = &workers.requests()[1];
    // The task, the first answer, the critique: the conversation goes on.
    assert_eq!(repair["messages"][0]["content"], "Name a colour as JSON.");
    assert_eq!(repair["messages"][1]["role"], "assistant");
    assert_eq!(repair["messages"][1]["content"], "red, I think");
    assert!(
        part(repair).contains("the output is not valid JSON"),
        "{repair}"
    );
}

#[tokio::test]
async fn format_checks_constrain_decoding_on_workers_and_not_on_other_servers() {
    let svg = "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 4 3\"><rect width=\"4\" height=\"3\"/><circle cx=\"2\" cy=\"1.5\" r=\"1\" fill=\"red\"/></svg>";
    let job = spec(
        &FOUR
            .replace(
                "{mode: adversarial, pool: gate}",
                "{mode: adversarial, pool: gate, checks: [{type: svg}]}",
            )
            .replace("synthesize", "collect"),
    );
    for server in [Server::Worker, Server::OpenAi] {
        let workers = Mock::start("m", move |_, _| text(svg)).await;
        let gate = Mock::start("m", happy).await;
        let http = reqwest::Client::new();
        let pools = BTreeMap::from([
            (
                "workers".to_owned(),
                Arc::new(Pool::new(
                    "workers",
                    "m",
                    server,
                    std::slice::from_ref(&workers.url),
                    http.clone(),
                )),
            ),
            (
                "gate".to_owned(),
                Arc::new(Pool::new(
                    "gate",
                    "m",
                    server,
                    std::slice::from_ref(&gate.url),
                    http,
                )),
            ),
        ]);
        let outcome = run_job(&job, &pools, &Memory::default()).await;
        assert_eq!(outcome.result.unwrap().0.chosen, [0, 1, 2, 3]);
        for request in workers.requests() {
            match server {
                Server::Worker => {
                    assert_eq!(request["grammar"]["type"], "lark", "{request}");
                    let grammar = request["grammar"]["value"].as_str().unwrap();
                    assert!(grammar.starts_with("start: svg"), "{grammar}");
                }
                Server::OpenAi => assert!(request.get("grammar").is_none(), "{request}"),
            }
        }
        // The gate's verdicts are held to their JSON schema, never to the outputs' grammar.
        for request in gate.requests() {
            assert!(request.get("grammar").is_none(), "{request}");
            assert_eq!(request["response_format"]["type"], "json_schema");
        }
    }
}

#[tokio::test]
async fn a_truncated_output_fails_and_its_repair_is_asked_to_be_shorter() {
    // The first answer runs into maxTokens; the repair fits.
    let workers = Mock::start("m", |body, _| {
        if body["messages"].as_array().unwrap().len() > 1 {
            text("red")
        } else {
            Reply::Truncated("red is the colour of".to_owned())
        }
    })
    .await;
    let pools = pools(&[("workers", vec![workers.url.clone()])]);
    let job = |verification: &str| {
        spec(&format!(
            "task: Name a colour.\nfanOut: {{pool: workers, subagents: 1, maxTokens: 8}}\nverification: {verification}\naggregation: {{strategy: collect}}\n"
        ))
    };

    let repaired = run_job(
        &job("{mode: none, repairRounds: 1}"),
        &pools,
        &Memory::default(),
    )
    .await;
    let record = &repaired.checkpoint.subagents[&0];
    assert!(record.passed() && record.repaired, "{record:?}");
    assert_eq!(record.output, "red");
    assert_eq!(record.finish_reason, Some(FinishReason::Stop));
    let repair = part(&workers.requests()[1]);
    assert!(
        repair.contains("cut off at maxTokens (8 tokens): write a shorter answer"),
        "{repair}"
    );

    let failed = run_job(&job("{mode: none}"), &pools, &Memory::default()).await;
    let record = &failed.checkpoint.subagents[&0];
    assert!(!record.passed());
    assert_eq!(record.finish_reason, Some(FinishReason::Length));
    assert!(
        record.verdict.as_ref().unwrap().issues[0].starts_with("the output was cut off"),
        "{record:?}"
    );
    let failure = failed.result.unwrap_err();
    assert_eq!(failure.reason, Reason::VerificationFailed);

    let accepted = run_job(
        &job("{mode: none, truncated: accept}"),
        &pools,
        &Memory::default(),
    )
    .await;
    let record = &accepted.checkpoint.subagents[&0];
    assert!(record.passed() && record.truncated(), "{record:?}");
    let (result, _) = accepted.result.unwrap();
    assert!(
        result.truncated(),
        "an answer made of a cut-off output is cut off too: {result:?}"
    );
}

#[tokio::test]
async fn a_greedy_first_subagent_decodes_at_temperature_0_and_the_others_sample() {
    let workers = Mock::start("m", |body, _| text(part(body))).await;
    let outcome = run_on(
        &workers,
        r#"
task: Name a colour.
subtasks: [first, second, third]
fanOut: {pool: workers, subagents: 3, temperature: 0.8, firstSubagent: greedy}
verification: {mode: none}
aggregation: {strategy: collect}
"#,
    )
    .await;
    assert!(outcome.result.is_ok());
    let mut temperatures: Vec<(String, f64)> = workers
        .requests()
        .iter()
        .map(|r| (part(r), r["temperature"].as_f64().unwrap()))
        .collect();
    temperatures.sort_by(|a, b| a.0.cmp(&b.0));
    // Sent as f32: 0.8 reads back as 0.800000011920929.
    let rounded: Vec<(String, f64)> = temperatures
        .into_iter()
        .map(|(part, t)| (part, (t * 100.0).round() / 100.0))
        .collect();
    assert_eq!(
        rounded,
        [
            ("first".to_owned(), 0.0),
            ("second".to_owned(), 0.8),
            ("third".to_owned(), 0.8)
        ]
    );
}
