//! The kill matrix on the real control plane, with the real process. The operator is frozen
//! (SIGSTOP) at a named point of a job's run; what survives is read from the API server
//! while nothing can change it; then the process is SIGKILLed and started again. Freezing
//! first makes each kill land where it was aimed, and names the boundary from what the API
//! server holds rather than from timing.
//!
//! Each job is frozen at five points: a subagent's call answered by the model and its record
//! not stored; a record stored and not yet in the status; the synthesis answered and the
//! result not stored; the result stored and the status not final; the final status written
//! and the finalizer still on. At the first and the third the answer reaches a frozen
//! process: what SIGKILL loses is the same as when the process has read it, since nothing
//! in its memory survives. Jobs run until every boundary has had `KILLS` kills.
//!
//! The model is an instant mock on 127.0.0.77, the one loopback address the bed's tenancy
//! policy lets external pools reach: a real model adds nothing to what a kill loses.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kubeswarm::api::SwarmJob;
use kubeswarm::controllers::swarm_job::FINALIZER;
use kubeswarm_test_support::mock::{Mock, Reply, is_synthesis, part, text};
use serde_json::Value;
use tokio::sync::oneshot;

use crate::bed::{Bed, has_condition, json_condition, until};
use crate::swarm::{JOB_TIMEOUT, recorded, swarm_job, wait_available, wait_finished};

const ADDRESS: &str = "127.0.0.77:0";
const SUBTASKS: [&str; 4] = ["red", "green", "blue", "black"];
/// What the mock calls the aggregation's call in its tallies.
const SYNTHESIS: &str = "synthesis";
const MERGED: &str = "merged";
/// Kills each boundary must have had.
const KILLS: usize = 5;
/// Jobs run at most, should some freezes land off their boundary.
const MAX_JOBS: usize = 8;
/// How long a frozen operator's last requests get to reach the API server before the
/// snapshot: what it sent whole is applied, and nothing after.
const SETTLE: Duration = Duration::from_millis(300);
/// How long the mock holds the answer to the call a kill aims at: time for a restarted
/// operator's start to return and the test to freeze it before the answer goes out.
const HOLD: Duration = Duration::from_secs(2);
/// How long a kill waits for what it aims at.
const AIM_TIMEOUT: Duration = Duration::from_secs(120);

/// Where a frozen operator stood, read from what the API server held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Boundary {
    /// A subagent's call was answered; its record is not stored.
    BeforeCheckpoint,
    /// A record is stored; the status does not count it yet.
    AfterCheckpoint,
    /// The synthesis was answered; the result is not stored.
    DuringAggregation,
    /// The result is stored; the status does not yet say the job completed.
    AfterResult,
    /// The status says the job completed; its finalizer is still on.
    BeforeFinalizerRemoved,
    /// None of these: the freeze came too late for the point it was aimed at.
    Elsewhere,
}

/// What the API server and the mock held while the operator was frozen.
#[derive(Debug)]
struct Frozen {
    /// The call the operator was frozen at, answered by the mock after the freeze.
    answered: Option<String>,
    /// Calls the mock had received for this job, by subtask, and the synthesis.
    calls: BTreeMap<String, u64>,
    /// Subagents (indices) whose records were stored.
    recorded: BTreeSet<usize>,
    answer: bool,
    /// Subagents the status says have their output or have failed.
    in_status: usize,
    complete: bool,
    finalizer: bool,
    status: Value,
}

impl Frozen {
    fn boundary(&self) -> Boundary {
        if self.complete {
            return if self.finalizer {
                Boundary::BeforeFinalizerRemoved
            } else {
                Boundary::Elsewhere
            };
        }
        if self.answer {
            return Boundary::AfterResult;
        }
        match self.answered.as_deref() {
            Some(SYNTHESIS) => return Boundary::DuringAggregation,
            Some(subtask) if !index(subtask).is_some_and(|i| self.recorded.contains(&i)) => {
                return Boundary::BeforeCheckpoint;
            }
            _ => {}
        }
        if self.recorded.len() > self.in_status {
            Boundary::AfterCheckpoint
        } else {
            Boundary::Elsewhere
        }
    }
}

fn index(subtask: &str) -> Option<usize> {
    SUBTASKS.iter().position(|s| *s == subtask)
}

fn key(body: &Value) -> String {
    if is_synthesis(body) {
        SYNTHESIS.to_owned()
    } else {
        part(body)
    }
}

/// Calls the mock received from request `from` on, by key.
fn calls(model: &Mock, from: usize) -> BTreeMap<String, u64> {
    let mut calls = BTreeMap::new();
    for body in model.requests().iter().skip(from) {
        *calls.entry(key(body)).or_default() += 1;
    }
    calls
}

/// SIGSTOP to the operator whose pid the bed keeps in `pid_file`.
fn freeze(pid_file: &Path) -> anyhow::Result<()> {
    let pid = std::fs::read_to_string(pid_file).context("the operator is not running")?;
    let status = Command::new("kill").args(["-STOP", pid.trim()]).status()?;
    ensure!(status.success(), "kill -STOP {pid} failed ({status})");
    Ok(())
}

/// A call the mock holds its answer to for `HOLD`, telling the test it came.
type Armed = Arc<Mutex<Option<(String, oneshot::Sender<()>)>>>;

/// Arms the mock to hold the next call for `key`.
fn arm(armed: &Armed, key: &str) -> oneshot::Receiver<()> {
    let (tx, rx) = oneshot::channel();
    *armed.lock().unwrap() = Some((key.to_owned(), tx));
    rx
}

fn has_our_finalizer(job: &Value) -> bool {
    job["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| f.iter().any(|f| f == FINALIZER))
}

struct Matrix<'a> {
    bed: &'a Bed,
    ns: String,
    model: Mock,
    armed: Armed,
    pid_file: PathBuf,
}

impl Matrix<'_> {
    fn job_yaml(&self, name: &str) -> String {
        swarm_job(
            name,
            &format!(
                "  task: Describe a colour.\n  subtasks: [{}]\n  fanOut: {{pool: workers, subagents: {}, maxConcurrency: 1, maxTokens: 16, timeoutSeconds: 30}}\n  verification: {{mode: none}}\n  aggregation: {{strategy: synthesize, pool: workers}}\n",
                SUBTASKS.join(", "),
                SUBTASKS.len()
            ),
        )
    }

    /// Reads what survives of job `name` while the operator is frozen, then kills it.
    async fn snapshot_and_kill(
        &self,
        name: &str,
        from: usize,
        answered: Option<&str>,
    ) -> anyhow::Result<Frozen> {
        tokio::time::sleep(SETTLE).await;
        let map = self.result_map(name).await?;
        let job = serde_json::to_value(
            Api::<SwarmJob>::namespaced(self.bed.client.clone(), &self.ns)
                .get(name)
                .await?,
        )?;
        let frozen = Frozen {
            answered: answered.map(str::to_owned),
            calls: calls(&self.model, from),
            recorded: (0..SUBTASKS.len())
                .filter(|i| map.contains_key(&format!("subagent-{i:03}.json")))
                .collect(),
            answer: map.contains_key("answer"),
            in_status: job["status"]["subagents"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|s| s["state"] == "Succeeded" || s["state"] == "Failed")
                .count(),
            complete: has_condition(&job, "Complete", "True"),
            finalizer: has_our_finalizer(&job),
            status: job["status"].clone(),
        };
        self.bed.part("stop", "operator")?;
        Ok(frozen)
    }

    /// Starts the operator again, freezes it while the mock holds its call for `key`,
    /// lets the answer go out to the frozen process, and kills it. None when the work of
    /// `key` was stored before (an earlier freeze landed late), so no call for it comes.
    async fn at_call(&self, name: &str, from: usize, key: &str) -> anyhow::Result<Option<Frozen>> {
        // The operator is stopped (or has not reached this job's calls yet): what is
        // stored cannot change under this read.
        let stored = self.result_map(name).await?;
        let done = match index(key) {
            Some(i) => stored.contains_key(&format!("subagent-{i:03}.json")),
            None => stored.contains_key("answer"),
        };
        if done {
            return Ok(None);
        }
        let came = arm(&self.armed, key);
        let aimed = async {
            self.start_if_stopped()?;
            tokio::time::timeout(AIM_TIMEOUT, came)
                .await
                .map_err(|_| anyhow::anyhow!("{name}: no call for {key} came in {AIM_TIMEOUT:?}"))?
                .context("the mock went away")?;
            freeze(&self.pid_file)
        };
        if let Err(err) = aimed.await {
            self.armed.lock().unwrap().take();
            return Err(err);
        }
        // The answer goes out once the hold ends: wait until the mock has sent it.
        let deadline = Instant::now() + HOLD + Duration::from_secs(10);
        while self.model.in_flight() > 0 {
            ensure!(
                Instant::now() < deadline,
                "{name}: the mock still holds {key}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.snapshot_and_kill(name, from, Some(key))
            .await
            .map(Some)
    }

    async fn result_map(&self, name: &str) -> anyhow::Result<BTreeMap<String, String>> {
        Ok(
            Api::<ConfigMap>::namespaced(self.bed.client.clone(), &self.ns)
                .get_opt(&format!("{name}-result"))
                .await?
                .and_then(|m| m.data)
                .unwrap_or_default(),
        )
    }

    /// Starts the operator again, freezes it once `holds` holds for the job's result
    /// ConfigMap or the job (watched from before the start), and kills it.
    async fn at_write<K>(
        &self,
        name: &str,
        from: usize,
        object: &str,
        what: &'static str,
        holds: fn(&Value) -> bool,
    ) -> anyhow::Result<Frozen>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + serde::Serialize
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        let api: Api<K> = Api::namespaced(self.bed.client.clone(), &self.ns);
        let object = object.to_owned();
        let watch = tokio::spawn(async move {
            until(&api, &object, JOB_TIMEOUT, what, json_condition(holds))
                .await
                .map(drop)
        });
        self.start_if_stopped()?;
        watch.await??;
        freeze(&self.pid_file)?;
        self.snapshot_and_kill(name, from, None).await
    }

    fn start_if_stopped(&self) -> anyhow::Result<()> {
        if !self.pid_file.exists() {
            self.bed.part("start", "operator")?;
        }
        Ok(())
    }

    /// After a failure: whatever state it left the operator in (frozen, stopped), a
    /// running one for the tests after this.
    fn restart(&self) -> anyhow::Result<()> {
        self.armed.lock().unwrap().take();
        self.bed.part("stop", "operator")?;
        self.bed.part("start", "operator")
    }

    /// One job, frozen and killed at each boundary in turn; the freezes, after checking
    /// what the operator did after each.
    async fn job(&self, name: &str) -> anyhow::Result<(Vec<(Frozen, u64)>, u64)> {
        let from = self.model.requests().len();
        // Armed while the job is applied: its call for the second subtask comes after the
        // first's, which the mock holds 100 ms.
        let first = self.at_call(name, from, SUBTASKS[1]);
        let yaml = self.job_yaml(name);
        let apply = self.bed.apply(Some(&self.ns), &yaml);
        let (first, applied) = tokio::join!(first, apply);
        applied?;
        let result = format!("{name}-result");
        // The final status's Events are posted between its write and the finalizer's
        // removal, which keeps the last boundary wide enough to freeze in.
        let frozen: Vec<Frozen> = [
            first?,
            Some(
                self.at_write::<ConfigMap>(
                    name,
                    from,
                    &result,
                    "holding subagent 2's record",
                    |m| m["data"].get("subagent-002.json").is_some(),
                )
                .await?,
            ),
            self.at_call(name, from, SYNTHESIS).await?,
            Some(
                self.at_write::<ConfigMap>(name, from, &result, "holding the answer", |m| {
                    m["data"].get("answer").is_some()
                })
                .await?,
            ),
            Some(
                self.at_write::<SwarmJob>(name, from, name, "complete", |j| {
                    has_condition(j, "Complete", "True")
                })
                .await?,
            ),
        ]
        .into_iter()
        .flatten()
        .collect();
        self.start_if_stopped()?;
        let jobs: Api<SwarmJob> = Api::namespaced(self.bed.client.clone(), &self.ns);
        wait_finished(&jobs, name).await?;
        until(
            &jobs,
            name,
            JOB_TIMEOUT,
            "without its finalizer",
            json_condition(|j| !has_our_finalizer(j)),
        )
        .await?;
        let (again, lost) = self.check(name, from, &frozen).await?;
        Ok((frozen.into_iter().zip(again).collect(), lost))
    }

    /// After each freeze: no recorded subagent and no stored result was worked on again,
    /// an unrecorded one at most once; at the end the answer is whole and the recorded
    /// usage counts exactly the recorded work. Returns, for each kill, the calls made
    /// again (unrecorded work that had been asked for before the kill), and the calls
    /// whose work was lost in all.
    async fn check(
        &self,
        name: &str,
        from: usize,
        frozen: &[Frozen],
    ) -> anyhow::Result<(Vec<u64>, u64)> {
        let end = calls(&self.model, from);
        let mut again = Vec::new();
        for (i, kill) in frozen.iter().enumerate() {
            let next = frozen.get(i + 1).map_or(&end, |f| &f.calls);
            let boundary = kill.boundary();
            let mut repeated = 0;
            for (key, &after) in next {
                let before = kill.calls.get(key).copied().unwrap_or(0);
                let done = match index(key) {
                    Some(i) => kill.recorded.contains(&i),
                    None => kill.answer,
                };
                let limit = if done { 0 } else { 1 };
                ensure!(
                    after - before <= limit,
                    "{name}, kill {} at {boundary:?}: {key} was called {} more times ({} stored); frozen: {kill:?}",
                    i + 1,
                    after - before,
                    if done { "its work was" } else { "nothing was" }
                );
                if before > 0 && after > before {
                    repeated += 1;
                }
            }
            again.push(repeated);
        }
        let job = serde_json::to_value(
            Api::<SwarmJob>::namespaced(self.bed.client.clone(), &self.ns)
                .get(name)
                .await?,
        )?;
        let status = &job["status"];
        if let Some(done) = frozen
            .iter()
            .find(|f| f.boundary() == Boundary::BeforeFinalizerRemoved)
        {
            ensure!(
                done.status["completionTime"] == status["completionTime"]
                    && done.status["usage"] == status["usage"],
                "{name}: the final status changed after the kill: {} then {status}",
                done.status
            );
        }
        let answer = Api::<ConfigMap>::namespaced(self.bed.client.clone(), &self.ns)
            .get(&format!("{name}-result"))
            .await?
            .data
            .and_then(|d| d.get("answer").cloned());
        ensure!(
            answer.as_deref() == Some(MERGED),
            "{name}: the answer is {answer:?}"
        );
        let attempts: u64 = recorded(self.bed, &self.ns, name).await?.values().sum();
        let usage = status["usage"]
            .as_array()
            .and_then(|u| u.iter().find(|p| p["pool"] == "workers"))
            .and_then(|p| p["calls"].as_u64())
            .with_context(|| format!("{name}: no usage for the workers pool in {status}"))?;
        ensure!(
            usage == attempts + 1,
            "{name}: the usage counts {usage} calls; the records {attempts} and the synthesis 1"
        );
        let succeeded = status["subagents"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["state"] == "Succeeded")
            .count();
        ensure!(
            status["finishedSubagents"] == SUBTASKS.len() && succeeded == SUBTASKS.len(),
            "{name}: the final status does not count every subagent: {status}"
        );
        let made: u64 = end.values().sum();
        let lost = made
            .checked_sub(usage)
            .with_context(|| format!("{name}: the usage counts {usage} calls of {made} made"))?;
        Ok((again, lost))
    }
}

pub async fn operator_killed_at_each_boundary(bed: &Bed) -> anyhow::Result<()> {
    let ns = bed.namespace("e2e-kills").await?;
    let armed: Armed = Arc::default();
    let model = {
        let armed = armed.clone();
        Mock::start_on(ADDRESS, "m", move |body, _| {
            let key = key(body);
            let answer = text(if key == SYNTHESIS {
                MERGED.to_owned()
            } else {
                format!("{key} light")
            });
            let mut armed = armed.lock().unwrap();
            if armed.as_ref().is_some_and(|(k, _)| *k == key) {
                let (_, came) = armed.take().expect("armed");
                let _ = came.send(());
                return Reply::After(HOLD, Box::new(answer));
            }
            // Subagents take a moment, so that a freeze at a record lands before the next.
            if key == SYNTHESIS {
                answer
            } else {
                Reply::After(Duration::from_millis(100), Box::new(answer))
            }
        })
        .await
    };
    bed.apply(
        Some(&ns),
        &format!(
            "apiVersion: kubeswarm.dev/v1alpha1\nkind: ModelPool\nmetadata: {{name: workers}}\nspec: {{external: {{url: '{}', model: m}}}}\n",
            model.url
        ),
    )
    .await?;
    wait_available(bed, &ns, "workers").await?;

    let matrix = Matrix {
        bed,
        ns,
        model,
        armed,
        pid_file: bed.dir.join("pids").join("operator"),
    };
    let started = Instant::now();
    // Kills at each boundary, and the calls made again after them.
    let mut kills: BTreeMap<Boundary, (usize, u64)> = BTreeMap::new();
    let (mut jobs, mut lost) = (0, 0);
    let aimed = [
        Boundary::BeforeCheckpoint,
        Boundary::AfterCheckpoint,
        Boundary::DuringAggregation,
        Boundary::AfterResult,
        Boundary::BeforeFinalizerRemoved,
    ];
    while aimed
        .iter()
        .any(|b| kills.get(b).map_or(0, |k| k.0) < KILLS)
    {
        if jobs == MAX_JOBS {
            bail!("after {jobs} jobs the kills were {kills:?}; each boundary needs {KILLS}");
        }
        jobs += 1;
        let (frozen, wasted) = match matrix.job(&format!("kill-{jobs}")).await {
            Ok(done) => done,
            Err(err) => {
                if let Err(restart) = matrix.restart() {
                    eprintln!("the operator did not start again: {restart:#}");
                }
                return Err(err);
            }
        };
        lost += wasted;
        for (frozen, again) in frozen {
            let entry = kills.entry(frozen.boundary()).or_default();
            entry.0 += 1;
            entry.1 += again;
        }
    }
    println!(
        "  {} SIGKILLs over {jobs} jobs in {:.0?}; recorded work called again 0 times, unrecorded at most once; \
         {lost} calls' work lost in all; every answer whole, every usage the recorded work",
        kills.values().map(|k| k.0).sum::<usize>(),
        started.elapsed()
    );
    for (boundary, (count, again)) in &kills {
        println!("    {boundary:?}: {count} kills, {again} calls made again");
    }
    Ok(())
}
