//! Model calls as every step makes them: retries, timeouts, replicas that fail or are
//! missing, the budget, the deadline, cancellation and suspension.

use super::*;

#[tokio::test]
async fn server_errors_are_retried_and_client_errors_are_not() {
    // Every subagent's first two calls get a 500; "black" always gets a 400.
    let tries = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
    let seen = tries.clone();
    let workers = Mock::start("m", move |body, _| {
        let subtask = part(body);
        let mut tries = seen.lock().unwrap();
        let n = tries.entry(subtask.clone()).or_default();
        *n += 1;
        match (subtask.as_str(), *n) {
            ("black", _) => Reply::Status(400),
            (_, 1 | 2) => Reply::Status(500),
            _ => text(subtask),
        }
    })
    .await;
    let job = spec(
        &FOUR
            .replace("{mode: adversarial, pool: gate}", "{mode: none}")
            .replace("synthesize", "collect"),
    );
    let (outcome, log) = run_logged(
        &job,
        &pools(&[("workers", vec![workers.url.clone()])]),
        &Memory::default(),
        fast(),
    )
    .await;
    let calls = |outcome: &str| {
        log.iter()
            .filter(|line| **line == format!("call workers {outcome}"))
            .count()
    };
    assert_eq!(
        (calls("ok"), calls("server_error"), calls("rejected")),
        (3, 6, 1),
        "every HTTP call is reported with its outcome: {log:?}"
    );

    let records = &outcome.checkpoint.subagents;
    assert_eq!(records[&0].attempts, 3, "two 500s, then success");
    assert_eq!(records[&0].output, "red");
    assert_eq!(records[&3].attempts, 0);
    let error = records[&3].error.as_deref().unwrap();
    assert!(
        error.contains("refused the request (400)") && error.contains("scripted 400"),
        "{error}"
    );
    assert_eq!(tries.lock().unwrap()["black"], 1, "a 400 is not retried");
    assert_eq!(outcome.result.unwrap().0.chosen, [0, 1, 2]);
    // Only answered calls are charged.
    assert_eq!(outcome.checkpoint.usage["workers"].calls, 3);
}

#[tokio::test]
async fn retries_give_up_after_the_limit_and_say_why() {
    let workers = Mock::start("m", |_, _| Reply::Status(503)).await;
    let job = spec(&FOUR.replace("{mode: adversarial, pool: gate}", "{mode: none}"));
    let outcome = run_job(
        &job,
        &pools(&[("workers", vec![workers.url.clone()])]),
        &Memory::default(),
    )
    .await;
    assert_eq!(
        workers.count(),
        4 * 3,
        "one call and two retries per subagent"
    );
    let failure = outcome.result.unwrap_err();
    // Nothing was verified: the job says its subagents failed, not its verification.
    assert_eq!(failure.reason, Reason::SubagentsFailed);
    assert!(
        failure
            .message
            .starts_with("none of the 4 subagents produced an output; subagent 0: "),
        "{}",
        failure.message
    );
    assert!(
        failure
            .message
            .contains("3 attempts failed, the last with: 503"),
        "{}",
        failure.message
    );
}

#[tokio::test]
async fn a_slow_replica_times_out_and_the_call_moves_to_a_healthy_one() {
    let slow = Mock::start("m", |_, _| {
        Reply::After(Duration::from_secs(30), Box::new(text("late")))
    })
    .await;
    let fast = Mock::start("m", |body, _| text(part(body))).await;
    let job = spec(
        &FOUR
            .replace("timeoutSeconds: 5", "timeoutSeconds: 1")
            .replace("{mode: adversarial, pool: gate}", "{mode: none}")
            .replace("synthesize", "collect"),
    );
    let pools = pools(&[("workers", vec![slow.url.clone(), fast.url.clone()])]);
    let started = Instant::now();
    let outcome = run_job(&job, &pools, &Memory::default()).await;
    assert_eq!(outcome.result.unwrap().0.chosen, [0, 1, 2, 3]);
    assert_eq!(fast.count(), 4, "every subagent ends on the fast replica");
    assert!(
        slow.count() >= 1,
        "some call went to the slow replica first"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "timeouts cut the slow calls short"
    );
    // The slow replica's dropped calls are not waited for.
    for record in outcome.checkpoint.subagents.values() {
        assert!(record.attempts <= 2, "{record:?}");
    }
}

#[tokio::test]
async fn a_replica_that_refuses_connections_is_skipped() {
    let alive = Mock::start("m", |body, _| text(part(body))).await;
    let job = spec(
        &FOUR
            .replace("{mode: adversarial, pool: gate}", "{mode: none}")
            .replace("synthesize", "collect"),
    );
    let pools = pools(&[(
        "workers",
        vec![mock::refusing_url().await, alive.url.clone()],
    )]);
    let outcome = run_job(&job, &pools, &Memory::default()).await;
    assert_eq!(outcome.result.unwrap().0.chosen, [0, 1, 2, 3]);
    let attempts: u32 = outcome
        .checkpoint
        .subagents
        .values()
        .map(|r| r.attempts)
        .sum();
    // After its first refusal the dead replica is ejected: at most the calls already on
    // their way to it fail once more.
    assert!(attempts <= 4 + 4, "{attempts} attempts for 4 subagents");
    assert_eq!(alive.count(), 4);
}

#[tokio::test]
async fn a_pool_without_ready_replicas_is_waited_for_without_spending_attempts() {
    let workers = Mock::start("m", |body, _| text(part(body))).await;
    let job = spec(
        &FOUR
            .replace("{mode: adversarial, pool: gate}", "{mode: none}")
            .replace("synthesize", "collect")
            .replace("retries: 2", "retries: 0"),
    );
    // A preempted pool: no replica until Kueue admits it again.
    let pools = pools(&[("workers", vec![])]);
    let readmit = {
        let pool = pools["workers"].clone();
        let url = workers.url.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            pool.set_replicas(&[url]);
        }
    };
    let store = Memory::default();
    let (outcome, ()) = tokio::join!(run_job(&job, &pools, &store), readmit);
    assert_eq!(outcome.result.unwrap().0.chosen, [0, 1, 2, 3]);
    assert!(
        outcome
            .checkpoint
            .subagents
            .values()
            .all(|r| r.attempts == 1),
        "the wait is not an attempt: {:?}",
        outcome.checkpoint.subagents
    );
    assert_eq!(workers.count(), 4);
}

#[tokio::test]
async fn subagents_sharing_a_prefix_stay_on_one_replica_until_it_is_busy() {
    let a = Mock::start("m", |body, _| text(part(body))).await;
    let b = Mock::start("m", |body, _| text(part(body))).await;
    let job = spec(
        &FOUR
            .replace("subagents: 4,", "subagents: 4, maxConcurrency: 1,")
            .replace("{mode: adversarial, pool: gate}", "{mode: none}")
            .replace("synthesize", "collect"),
    );
    let pools = pools(&[("workers", vec![a.url.clone(), b.url.clone()])]);
    run_job(&job, &pools, &Memory::default())
        .await
        .result
        .unwrap();
    // One at a time, every call of the job finds its affine replica idle.
    assert!(
        (a.count(), b.count()) == (4, 0) || (a.count(), b.count()) == (0, 4),
        "{} and {}",
        a.count(),
        b.count()
    );
}

#[tokio::test]
async fn the_token_budget_stops_new_calls_and_fails_the_job() {
    let workers = Mock::start("m", |body, _| text(part(body))).await;
    // 15 tokens a call: the third call finds 30 of 40 spent and is cut to 10 tokens, the
    // fourth finds the budget spent.
    let job = spec(
        &(FOUR
            .replace("{mode: adversarial, pool: gate}", "{mode: none}")
            .replace("subagents: 4,", "subagents: 4, maxConcurrency: 1,")
            + "budget: {maxTotalTokens: 40}\n"),
    );
    let outcome = run_job(
        &job,
        &pools(&[("workers", vec![workers.url.clone()])]),
        &Memory::default(),
    )
    .await;
    let failure = outcome.result.unwrap_err();
    assert_eq!(failure.reason, Reason::BudgetExceeded);
    assert_eq!(
        failure.message,
        "the job's token budget of 40 tokens is spent"
    );
    assert_eq!(workers.count(), 3);
    assert_eq!(workers.requests()[2]["max_completion_tokens"], 10);
    assert_eq!(
        outcome.checkpoint.subagents.len(),
        3,
        "finished subagents stay recorded"
    );
}

#[tokio::test]
async fn the_deadline_ends_calls_in_flight() {
    let workers = Mock::start("m", |_, _| {
        Reply::After(Duration::from_secs(60), Box::new(text("late")))
    })
    .await;
    let job = spec(
        &(FOUR.replace("{mode: adversarial, pool: gate}", "{mode: none}")
            + "budget: {deadlineSeconds: 1}\n"),
    );
    let started = Instant::now();
    let outcome = run_job(
        &job,
        &pools(&[("workers", vec![workers.url.clone()])]),
        &Memory::default(),
    )
    .await;
    assert_eq!(outcome.result.unwrap_err().reason, Reason::DeadlineExceeded);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn dropping_a_run_cancels_its_calls_in_flight() {
    let workers = Mock::start("m", |_, _| {
        Reply::After(Duration::from_secs(60), Box::new(text("late")))
    })
    .await;
    let job = spec(&FOUR.replace("{mode: adversarial, pool: gate}", "{mode: none}"));
    let pools = pools(&[("workers", vec![workers.url.clone()])]);
    let store = Memory::default();
    let task = {
        let (job, pools, store) = (job.clone(), pools.clone(), store.clone());
        tokio::spawn(async move { run_job(&job, &pools, &store).await })
    };
    wait_until(|| workers.in_flight() == 4).await;
    task.abort();
    // The server sees the connections close and its handlers end.
    wait_until(|| workers.in_flight() == 0).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(workers.count(), 4, "no call starts after the cancel");
    assert!(store.0.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_suspended_job_starts_no_call_until_resumed() {
    let workers = Mock::start("m", |body, _| text(part(body))).await;
    let job = spec(
        &FOUR
            .replace("{mode: adversarial, pool: gate}", "{mode: none}")
            .replace("synthesize", "collect"),
    );
    let pools = pools(&[("workers", vec![workers.url.clone()])]);
    let (suspend, suspended) = watch::channel(true);
    let store = Memory::default();
    let log = Log::default();
    let run = Job {
        name: "job",
        spec: &job,
        pools: &pools,
        store: &store,
        observer: &log,
        started: Instant::now(),
        suspended,
        sandbox: &kubeswarm::local::sandbox::Subprocess::default(),
        options: fast(),
    };
    let resume = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(workers.count(), 0, "suspended: no call");
        suspend.send(false).unwrap();
    };
    let (outcome, ()) = tokio::join!(run.execute(), resume);
    assert_eq!(outcome.unwrap().result.unwrap().0.chosen, [0, 1, 2, 3]);
    assert_eq!(workers.count(), 4);
    let events = log.0.lock().unwrap();
    assert_eq!(events.first().unwrap(), "planned 4");
    assert_eq!(
        events.iter().rfind(|e| !e.starts_with("recorded")).unwrap(),
        "aggregating"
    );
}

#[tokio::test]
async fn a_response_past_the_bound_is_not_read_and_fails_the_call() {
    let job = spec(
        &FOUR
            .replace("{mode: adversarial, pool: gate}", "{mode: none}")
            .replace("synthesize", "collect"),
    );
    // A hostile or broken endpoint: "black" gets an answer past the bound, the rest a
    // colour. The default bound (8 MiB) against 9 MiB, and the bound the operator was
    // given (--max-response-bytes=4096) against 8 KiB, far under the default.
    for (answer, bound) in [(9 << 20, None), (8 << 10, Some(4096))] {
        let workers = Mock::start("m", move |body, _| match part(body).as_str() {
            "black" => text("k".repeat(answer)),
            other => text(other),
        })
        .await;
        let pool = Pool::new(
            "workers",
            "m",
            Server::Worker,
            std::slice::from_ref(&workers.url),
            reqwest::Client::new(),
        );
        let pool = match bound {
            Some(bytes) => pool.with_response_limit(bytes),
            None => pool,
        };
        let pools = BTreeMap::from([("workers".to_owned(), Arc::new(pool))]);
        let (outcome, log) = run_logged(&job, &pools, &Memory::default(), fast()).await;
        let error = outcome.checkpoint.subagents[&3].error.as_deref().unwrap();
        let limit = bound.unwrap_or(8 << 20);
        assert!(
            error.contains(&format!(
                "the endpoint sent more than {limit} bytes in one response"
            )),
            "{error}"
        );
        assert!(
            log.iter().any(|line| line == "call workers malformed"),
            "{log:?}"
        );
        assert_eq!(outcome.result.unwrap().0.chosen, [0, 1, 2]);
    }
}

#[tokio::test]
async fn a_pool_with_a_cache_salt_and_an_api_key_sends_them_on_every_call() {
    let salted = Mock::start("m", |body, _| text(part(body))).await;
    let plain = Mock::start("m", |body, _| text(part(body))).await;
    let http = reqwest::Client::new();
    let job = spec(
        "task: Name a colour.\nsubtasks: [red, blue]\nfanOut: {pool: salted, subagents: 2}\nverification: {mode: none}\naggregation: {strategy: collect}\n",
    );
    for (mock, pool) in [
        (
            &salted,
            Pool::with_api_key(
                "salted",
                "m",
                Server::OpenAi,
                std::slice::from_ref(&salted.url),
                http.clone(),
                Some("sk-1".to_owned()),
            )
            .with_cache_salt(Some("salt-of-team-a".to_owned())),
        ),
        (
            &plain,
            Pool::new(
                "salted",
                "m",
                Server::OpenAi,
                std::slice::from_ref(&plain.url),
                http.clone(),
            ),
        ),
    ] {
        let pools = BTreeMap::from([("salted".to_owned(), Arc::new(pool))]);
        let outcome = run_job(&job, &pools, &Memory::default()).await;
        assert_eq!(outcome.result.unwrap().0.chosen, [0, 1]);
        assert_eq!(mock.count(), 2);
    }
    for body in salted.requests() {
        assert_eq!(body["cache_salt"], "salt-of-team-a", "{body}");
    }
    assert_eq!(
        salted.authorizations(),
        vec![Some("Bearer sk-1".to_owned()); 2]
    );
    for body in plain.requests() {
        assert!(body.get("cache_salt").is_none(), "{body}");
    }
}
