use super::*;
use crate::swarm::{Event, Observer, Reason};

fn spec(extra: &str) -> SwarmJobSpec {
    serde_yaml_ng::from_str(&format!(
        "task: t\nfanOut: {{pool: worker, subagents: 2}}\nverification: {{pool: gate}}\n{extra}"
    ))
    .unwrap()
}

/// A verified subagent's record, scored 50.
fn finished(
    index: usize,
    pass: bool,
    finish_reason: Option<FinishReason>,
) -> crate::swarm::record::SubagentRecord {
    crate::swarm::record::SubagentRecord {
        index,
        stage: crate::swarm::record::Stage::Finished,
        subtask: None,
        output: "o".to_owned(),
        prompt_tokens: 1,
        completion_tokens: 1,
        attempts: 1,
        finish_reason,
        confidence: None,
        verdict: Some(crate::swarm::record::VerdictRecord {
            pass,
            score: Some(50),
            issues: vec![],
        }),
        repaired: false,
        error: None,
    }
}

fn summary(desired: &[Desired]) -> Vec<(&str, bool, &str)> {
    desired
        .iter()
        .map(|d| (d.type_, d.status, d.reason))
        .collect()
}

#[test]
fn a_job_that_has_not_started_is_pending_in_every_phase() {
    let phases = phases(&spec(""), false, &State::default(), None, Kind::ConfigMap);
    assert_eq!(
        summary(&phases),
        [
            (PLANNED, false, "Pending"),
            (FAN_OUT_COMPLETE, false, "Pending"),
            (VERIFIED, false, "Pending"),
            (AGGREGATED, false, "Pending"),
        ]
    );
}

#[test]
fn phases_turn_true_as_outputs_and_verdicts_are_recorded() {
    let spec = spec("planner: {pool: worker}\n");
    let mut state = State::default();
    assert_eq!(
        phases(&spec, true, &state, None, Kind::ConfigMap)[0].reason,
        "Planning"
    );

    let progress = super::super::progress::Progress::new(
        "ns".to_owned(),
        Default::default(),
        Default::default(),
        state.clone(),
        Box::new(|| {}),
    );
    progress.event(Event::Planned { subagents: 2 });
    progress.event(Event::Generated { index: 0 });
    state = progress.state();
    let mid = phases(&spec, true, &state, None, Kind::ConfigMap);
    assert_eq!(
        summary(&mid),
        [
            (PLANNED, true, "Planned"),
            (FAN_OUT_COMPLETE, false, "InProgress"),
            (VERIFIED, false, "InProgress"),
            (AGGREGATED, false, "Pending"),
        ]
    );
    assert_eq!(mid[1].message, "1 of 2 subagents have an output");

    let record = |index| finished(index, index == 0, None);
    progress.event(Event::Finished { record: &record(0) });
    progress.event(Event::Finished { record: &record(1) });
    progress.event(Event::Aggregating);
    let result = JobResult {
        strategy: AggregationStrategy::Synthesize,
        chosen: vec![0],
        tally: None,
        finish_reason: None,
    };
    let done = phases(
        &spec,
        true,
        &progress.state(),
        Some(&Ok(result)),
        Kind::ConfigMap,
    );
    assert_eq!(
        summary(&done),
        [
            (PLANNED, true, "Planned"),
            (FAN_OUT_COMPLETE, true, "OutputsReceived"),
            (VERIFIED, true, "Verified"),
            (AGGREGATED, true, "Aggregated"),
            (COMPLETE, true, "Succeeded"),
        ]
    );
    assert_eq!(done[2].message, "1 of 2 outputs passed verification");
    assert_eq!(done[3].message, "synthesize over 1 outputs");
}

#[test]
fn a_failure_names_its_reason_and_stops_the_unfinished_phases() {
    let state = State {
        planned: Some(2),
        ..State::default()
    };
    let failure = Failure {
        reason: Reason::BudgetExceeded,
        message: "the job's token budget of 100 tokens is spent".to_owned(),
    };
    let failed = phases(
        &spec("subtasks: [a, b]\n"),
        true,
        &state,
        Some(&Err(failure)),
        Kind::ConfigMap,
    );
    assert_eq!(
        summary(&failed),
        [
            (PLANNED, true, "SubtasksGiven"),
            (FAN_OUT_COMPLETE, false, "Stopped"),
            (VERIFIED, false, "Stopped"),
            (AGGREGATED, false, "Stopped"),
            (FAILED, true, "BudgetExceeded"),
        ]
    );
    assert_eq!(
        failed[4].message,
        "the job's token budget of 100 tokens is spent"
    );
}

#[test]
fn only_news_is_announced_and_only_trouble_as_a_warning() {
    let notices = |d: &[Desired]| d.iter().map(|d| d.notice).collect::<Vec<_>>();
    let pending = phases(&spec(""), false, &State::default(), None, Kind::ConfigMap);
    assert_eq!(notices(&pending), [Notice::Silent; 4]);
    let failure = Failure {
        reason: Reason::PlanFailed,
        message: "no usable plan".to_owned(),
    };
    let failed = phases(
        &spec(""),
        true,
        &State::default(),
        Some(&Err(failure)),
        Kind::ConfigMap,
    );
    assert_eq!(
        notices(&failed),
        [
            Notice::Normal,
            Notice::Normal,
            Notice::Normal,
            Notice::Normal,
            Notice::Warning
        ],
        "the phases it never finished say Stopped as news; Failed is trouble"
    );
    let waiting = Waiting {
        reason: reason::POOL_UNAVAILABLE,
        message: "no worker is ready yet".to_owned(),
    };
    assert_eq!(
        admitted(Admission::Waiting(&waiting)).notice,
        Notice::Warning
    );
    assert_eq!(admitted(Admission::Suspended).notice, Notice::Normal);
    assert_eq!(
        admitted(Admission::Ready { pools: &[] }).notice,
        Notice::Normal
    );
}

#[test]
fn outputs_and_an_answer_cut_off_at_their_limits_are_reported() {
    let spec = spec("subtasks: [a, b]\n");
    let progress = super::super::progress::Progress::new(
        "ns".to_owned(),
        Default::default(),
        Default::default(),
        State::default(),
        Box::new(|| {}),
    );
    progress.event(Event::Planned { subagents: 2 });
    for (index, finish) in [(0, FinishReason::Stop), (1, FinishReason::Length)] {
        let record = finished(index, true, Some(finish));
        progress.event(Event::Finished { record: &record });
    }
    let state = progress.state();
    assert_eq!(
        state.subagents[&1].finish_reason,
        Some(FinishReason::Length)
    );
    let result = JobResult {
        strategy: AggregationStrategy::Synthesize,
        chosen: vec![0, 1],
        tally: None,
        finish_reason: Some(FinishReason::Length),
    };
    let done = phases(&spec, true, &state, Some(&Ok(result)), Kind::ConfigMap);
    assert_eq!(
        done[2].message,
        "2 of 2 outputs passed verification; 1 cut off at spec.fanOut.maxTokens"
    );
    assert_eq!(
        summary(&done)[3..],
        [
            (AGGREGATED, true, "AnswerTruncated"),
            (COMPLETE, true, "AnswerTruncated"),
        ]
    );
    assert!(done[3..].iter().all(|d| d.notice == Notice::Warning));
    assert_eq!(
        done[3].message,
        "synthesize over 2 outputs; 1 of the 2 outputs it used were cut off at spec.fanOut.maxTokens; the answer was cut off at its token limit: raise spec.aggregation.maxTokens"
    );

    // A vote whose winner was accepted although cut off: the limit to raise is the
    // subagents', since no aggregation call wrote the answer.
    let voted = JobResult {
        strategy: AggregationStrategy::BestOf,
        chosen: vec![1],
        tally: None,
        finish_reason: Some(FinishReason::Length),
    };
    let done = phases(&spec, true, &state, Some(&Ok(voted)), Kind::ConfigMap);
    assert_eq!(
        done[3].message,
        "bestOf: subagent 1's output scored highest; 1 of the 1 outputs it used were cut off at spec.fanOut.maxTokens; the answer was cut off at its token limit: raise spec.fanOut.maxTokens"
    );
    assert!(done[4].message.ends_with("raise spec.fanOut.maxTokens"));
}

#[test]
fn the_aggregated_condition_says_what_won_a_vote_and_what_a_best_of_chose() {
    let voted = JobResult {
        strategy: AggregationStrategy::WeightedVote,
        chosen: vec![3],
        tally: Some(crate::api::Tally {
            answer: "13".to_owned(),
            votes: 2,
            of: 5,
            unanswered: 1,
            decided_by: Decision::GateScore,
        }),
        finish_reason: None,
    };
    assert_eq!(
        aggregated(&voted, Kind::ConfigMap),
        "weightedVote: \"13\" won with 2 of 5 votes (gate score; 1 outputs gave no answer)"
    );
    // Results kept in a Secret keep their answer out of conditions and so out of Events.
    assert_eq!(
        aggregated(&voted, Kind::Secret),
        "weightedVote: the answer won with 2 of 5 votes (gate score; 1 outputs gave no answer)"
    );
    let done = phases(
        &spec(""),
        true,
        &State::default(),
        Some(&Ok(voted)),
        Kind::Secret,
    );
    assert!(done.iter().all(|d| !d.message.contains("13")), "{done:?}");
    assert_eq!(
        done.last().map(|d| (d.type_, d.message.as_str())),
        Some((
            COMPLETE,
            "the result is in the Secret named by status.result"
        ))
    );
    let best = JobResult {
        strategy: AggregationStrategy::BestOf,
        chosen: vec![2],
        tally: None,
        finish_reason: None,
    };
    assert_eq!(
        aggregated(&best, Kind::ConfigMap),
        "bestOf: subagent 2's output scored highest"
    );
}

#[test]
fn admission_says_what_the_job_waits_for() {
    let waiting = Waiting {
        reason: "PoolNotFound",
        message: "no ModelPool gate".to_owned(),
    };
    let d = admitted(Admission::Waiting(&waiting));
    assert_eq!(
        (d.status, d.reason, d.message.as_str()),
        (false, "PoolNotFound", "no ModelPool gate")
    );
    assert_eq!(admitted(Admission::Suspended).reason, "Suspended");
    let pools = ["worker".to_owned(), "gate".to_owned()];
    let ready = admitted(Admission::Ready { pools: &pools });
    assert!(ready.status);
    assert!(ready.message.ends_with("worker, gate"));
}

#[test]
fn the_gates_critiques_stay_out_of_events() {
    let failed = |reason: Reason| {
        let failure = Failure {
            reason,
            message: "none of the 2 outputs passed verification; subagent 0: the secret plan leaks"
                .to_owned(),
        };
        let phases = phases(
            &spec(""),
            true,
            &State::default(),
            Some(&Err(failure)),
            Kind::ConfigMap,
        );
        let failed = phases.iter().find(|d| d.type_ == FAILED).unwrap().clone();
        (failed.withheld, failed.message)
    };
    let (withheld, message) = failed(Reason::VerificationFailed);
    assert!(withheld, "the Event names the condition only");
    assert!(
        message.contains("the secret plan leaks"),
        "the condition keeps it: {message}"
    );
    assert!(
        failed(Reason::SubagentsFailed).0,
        "a failed call's error may quote its endpoint"
    );
    assert!(!failed(Reason::PlanFailed).0);
}
