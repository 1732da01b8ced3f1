//! The sandbox of `tests` checks in a cluster: a Kubernetes Job per batch of programs,
//! in the SwarmJob's namespace and owned by it, from the image the platform allows
//! (`--tests-image`). Its pod runs under the restricted Pod Security Standard, with no
//! service account token, CPU and memory limits, a deadline, and a NetworkPolicy that
//! denies it every connection. The programs reach it in an object of the kind the job's
//! results use (a Secret where results are secret), and what they did comes back in the
//! pod's termination message. Programs that arrive while a batch runs form the next one,
//! so a fan-out of N outputs starts a few pods, not N.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, ObjectMeta, Patch, PatchParams};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::store::Kind;
use crate::api::SwarmJob;
use crate::controllers::FIELD_MANAGER;
use crate::controllers::children::{self, controller_owner};
use crate::swarm::sandbox::{Exit, Program, Ran, Sandbox, SandboxError};

/// The runner the pod executes, mounted beside the programs.
const RUNNER: &str = include_str!("tests_runner.py");
/// The label of a SwarmJob's test pods, which its NetworkPolicy selects.
pub const TESTS_OF: &str = "kubeswarm.dev/tests-of";
/// Programs and bytes one batch may take: one object holds them (a ConfigMap's limit is
/// 1 MiB), and one termination message (4 KiB) reports them.
const BATCH_PROGRAMS: usize = 16;
const BATCH_BYTES: usize = 512 * 1024;
/// Time a batch's pod may take to start (scheduling, pulling the image) on top of its
/// programs' time.
const START_SECONDS: u64 = 120;
/// How often a running batch is looked at.
const POLL: Duration = Duration::from_secs(1);

/// What the platform allows test pods: the image, and each pod's limits.
#[derive(Debug, Clone)]
pub struct Settings {
    /// A Python 3 image; unset, jobs with a `tests` check fail with `TestsUnavailable`.
    pub image: Option<String>,
    pub cpu: String,
    pub memory: String,
}

/// One job's test pods.
pub struct Pods {
    client: kube::Client,
    settings: Settings,
    namespace: String,
    job: String,
    uid: String,
    owner: k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
    kind: Kind,
    waiting: Mutex<Vec<Waiting>>,
    /// One batch at a time: whoever holds it runs every program waiting.
    turn: tokio::sync::Mutex<()>,
}

struct Waiting {
    program: Program,
    reply: oneshot::Sender<Result<Ran, SandboxError>>,
}

impl Pods {
    pub fn new(client: kube::Client, job: &SwarmJob, kind: Kind, settings: Settings) -> Self {
        Self {
            client,
            settings,
            namespace: job.namespace().unwrap_or_default(),
            job: job.name_any(),
            uid: job.uid().unwrap_or_default(),
            owner: controller_owner(job),
            kind,
            waiting: Mutex::new(Vec::new()),
            turn: tokio::sync::Mutex::new(()),
        }
    }

    async fn run_program(&self, program: Program) -> Result<Ran, SandboxError> {
        let Some(image) = self.settings.image.clone() else {
            return Err(SandboxError::Unavailable {
                what: "this cluster runs no tests: the platform has not set the image of test pods (Helm value tests.image, operator flag --tests-image)".to_owned(),
                source: None,
            });
        };
        let mut answer = self.queue(&program);
        loop {
            let _turn = self.turn.lock().await;
            match answer.try_recv() {
                Ok(ran) => return ran,
                // Taken by a batch that was cancelled before it answered: queue it again,
                // and run it in this turn.
                Err(oneshot::error::TryRecvError::Closed) => answer = self.queue(&program),
                // Still waiting, and nothing runs: this turn runs it, with the others.
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            let batch = self.take_batch();
            let programs: Vec<&Program> = batch.iter().map(|w| &w.program).collect();
            let outcome = self.run_batch(&image, &programs).await;
            match outcome {
                Ok(results) => {
                    for (waiting, ran) in batch.into_iter().zip(results) {
                        let _ = waiting.reply.send(Ok(ran));
                    }
                }
                Err(err) => {
                    for waiting in batch {
                        let _ = waiting.reply.send(Err(shared(&err)));
                    }
                }
            }
            if let Ok(ran) = answer.try_recv() {
                return ran;
            }
            // Ours did not fit this batch: the next turn takes it.
        }
    }

    /// Puts a program in the queue; the answer comes from whichever turn runs it.
    fn queue(&self, program: &Program) -> oneshot::Receiver<Result<Ran, SandboxError>> {
        let (reply, answer) = oneshot::channel();
        self.waiting.lock().expect("not poisoned").push(Waiting {
            program: program.clone(),
            reply,
        });
        answer
    }

    /// The programs waiting, oldest first, as many as one batch holds (always one).
    fn take_batch(&self) -> Vec<Waiting> {
        let mut waiting = self.waiting.lock().expect("not poisoned");
        let mut bytes = 0;
        let mut count = 0;
        for w in waiting.iter() {
            bytes += w.program.source.len();
            if count > 0 && (count == BATCH_PROGRAMS || bytes > BATCH_BYTES) {
                break;
            }
            count += 1;
        }
        waiting.drain(..count).collect()
    }

    async fn run_batch(
        &self,
        image: &str,
        programs: &[&Program],
    ) -> Result<Vec<Ran>, SandboxError> {
        let name = batch_name(&self.job, &self.uid, programs);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        self.apply_policy(&params).await?;
        let data = self.data_object(&name, programs);
        let resource = self.kind.resource();
        let objects: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &self.namespace, &resource);
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), &self.namespace);
        // Whatever happens from here, cancellation included, the batch's objects go (the
        // job's owner reference would collect them only with the job).
        let _cleanup = Cleanup {
            jobs: jobs.clone(),
            objects: objects.clone(),
            name: name.clone(),
        };
        objects
            .patch(&name, &params, &Patch::Apply(&data))
            .await
            .map_err(|err| self.refused_or_broken(err))?;
        let spec = Batch {
            name: &name,
            job: &self.job,
            uid: &self.uid,
            image,
            settings: &self.settings,
            kind: self.kind,
            deadline: deadline(programs),
        };
        let applied = jobs
            .patch(
                &name,
                &params,
                &Patch::Apply(&build_job(&spec, &self.owner)),
            )
            .await
            .map_err(|err| broken("applying the Job of test pods", err))?;
        self.wait(&applied, spec.deadline, programs).await
    }

    /// The NetworkPolicy that shuts the job's test pods off, unless an object of its name
    /// is not the job's: that is never applied over.
    async fn apply_policy(&self, params: &PatchParams) -> Result<(), SandboxError> {
        let policies: Api<NetworkPolicy> = Api::namespaced(self.client.clone(), &self.namespace);
        let policy = build_policy(&self.job, &self.uid, &self.owner);
        let name = policy.name_any();
        let found = policies
            .get_opt(&name)
            .await
            .map_err(|err| broken("reading the NetworkPolicy of test pods", err))?;
        if let Some(found) = found
            && !found
                .owner_references()
                .iter()
                .any(|o| o.uid == self.uid && o.controller == Some(true))
        {
            return Err(SandboxError::Unavailable {
                what: format!(
                    "NetworkPolicy {name}, which would shut this job's test pods off, exists and is not this job's: delete or rename it"
                ),
                source: None,
            });
        }
        policies
            .patch(&name, params, &Patch::Apply(&policy))
            .await
            .map_err(|err| broken("applying the NetworkPolicy of test pods", err))?;
        Ok(())
    }

    /// Waits for the batch's pod to end, and reads its report.
    async fn wait(
        &self,
        job: &Job,
        deadline: u64,
        programs: &[&Program],
    ) -> Result<Vec<Ran>, SandboxError> {
        let name = job.name_any();
        let uid = job.uid().unwrap_or_default();
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), &self.namespace);
        let selector = ListParams::default().labels(&format!("job-name={name}"));
        let started = tokio::time::Instant::now();
        // The Job's own deadline ends it; this one outlasts it, for a Job controller
        // that is not keeping up.
        let give_up = started + Duration::from_secs(deadline + 60);
        let unavailable = |what: String| SandboxError::Unavailable { what, source: None };
        while tokio::time::Instant::now() < give_up {
            tokio::time::sleep(POLL).await;
            let listed = pods
                .list(&selector)
                .await
                .map_err(|err| broken("listing the test pods", err))?;
            for pod in listed.items.iter().filter(|p| controlled_by(p, &uid)) {
                match pod_state(pod) {
                    PodState::Running => {}
                    PodState::Terminated { message, how } => {
                        return read_report(&message, programs).map_err(|err| {
                            SandboxError::Broken {
                                what: format!("the test pod ended ({how}): {err}"),
                                source: None,
                            }
                        });
                    }
                    PodState::BadImage { why, lasting } => {
                        // A registry that hiccups gets the time a pod has to start.
                        if lasting || started.elapsed() > Duration::from_secs(START_SECONDS) {
                            return Err(unavailable(format!(
                                "the image of test pods {} cannot be run: {why}",
                                self.settings.image.as_deref().unwrap_or_default()
                            )));
                        }
                    }
                }
            }
            let Some(now) = jobs
                .get_opt(&name)
                .await
                .map_err(|err| broken("reading the Job of test pods", err))?
            else {
                return Err(SandboxError::Broken {
                    what: format!("the Job of test pods {name} was deleted before it ended"),
                    source: None,
                });
            };
            if let Some(failed) = failed_condition(&now) {
                return Err(SandboxError::Broken {
                    what: format!("the Job of test pods {name} failed: {failed}"),
                    source: None,
                });
            }
            // Kueue set to manage every Job suspends one with no queue; it would wait forever.
            if now.spec.as_ref().and_then(|s| s.suspend) == Some(true)
                && started.elapsed() > Duration::from_secs(30)
            {
                return Err(unavailable(format!(
                    "the Job of test pods {name} is held suspended (Kueue's manageJobsWithoutQueueName?): exempt the namespace's test Jobs from queueing"
                )));
            }
        }
        Err(SandboxError::Broken {
            what: format!(
                "the Job of test pods {name} did not finish within {} s",
                deadline + 60
            ),
            source: None,
        })
    }

    /// The programs, the runner and the batch's list, in one object of the results' kind.
    fn data_object(&self, name: &str, programs: &[&Program]) -> DynamicObject {
        let resource = self.kind.resource();
        let mut entries = BTreeMap::new();
        entries.insert("run.py".to_owned(), RUNNER.to_owned());
        let batch: Vec<Value> = programs
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let file = format!("program-{i}.py");
                entries.insert(file.clone(), p.source.clone());
                json!({"file": file, "timeout": p.timeout.as_secs(), "marker": p.marker})
            })
            .collect();
        entries.insert("batch.json".to_owned(), Value::Array(batch).to_string());
        let mut object = DynamicObject::new(name, &resource).within(&self.namespace);
        object.metadata = ObjectMeta {
            labels: Some(children::labels([(TESTS_OF, self.uid.clone())])),
            owner_references: Some(vec![self.owner.clone()]),
            ..object.metadata
        };
        let data: serde_json::Map<String, Value> = entries
            .into_iter()
            .map(|(key, value)| (key, self.kind.encode(value)))
            .collect();
        object.data = json!({"data": data});
        if self.kind == Kind::Secret {
            object.data["type"] = json!("Opaque");
        }
        object
    }

    fn refused_or_broken(&self, err: kube::Error) -> SandboxError {
        match err {
            kube::Error::Api(status) if status.code == 403 && self.kind == Kind::Secret => {
                SandboxError::Unavailable {
                    what: format!(
                        "the operator may not write Secrets in {}, where the programs of test pods go: the results' RoleBinding grants it (Helm value results.secretNamespaces)",
                        self.namespace
                    ),
                    source: Some(Box::new(kube::Error::Api(status))),
                }
            }
            err => broken("writing the programs of test pods", err),
        }
    }
}

impl Sandbox for Pods {
    fn run(&self, program: Program) -> BoxFuture<'_, Result<Ran, SandboxError>> {
        Box::pin(self.run_program(program))
    }
}

/// The same error for each program of a batch.
fn shared(err: &SandboxError) -> SandboxError {
    let what = crate::telemetry::chain(err);
    match err {
        SandboxError::Unavailable { .. } => SandboxError::Unavailable { what, source: None },
        SandboxError::Broken { .. } => SandboxError::Broken { what, source: None },
    }
}

/// Deletes a batch's Job and programs when dropped, however the batch ended.
struct Cleanup {
    jobs: Api<Job>,
    objects: Api<DynamicObject>,
    name: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (jobs, objects, name) = (self.jobs.clone(), self.objects.clone(), self.name.clone());
        tokio::spawn(async move {
            let delete = DeleteParams::background();
            // Gone already, or going with the job: nothing to do either way.
            let _ = jobs.delete(&name, &delete).await;
            let _ = objects.delete(&name, &delete).await;
        });
    }
}

fn broken(what: &str, err: kube::Error) -> SandboxError {
    SandboxError::Broken {
        what: what.to_owned(),
        source: Some(Box::new(err)),
    }
}

/// A batch's name: the job's, cut to fit, and a hash of the job's uid and the programs,
/// so a name is never reused by another batch or another job.
pub fn batch_name(job: &str, uid: &str, programs: &[&Program]) -> String {
    let sources: Vec<(&str, u64)> = programs
        .iter()
        .map(|p| (p.source.as_str(), p.timeout.as_secs()))
        .collect();
    format!(
        "{}-tests-{}",
        prefix(job, 40),
        children::hash(&(uid, sources))
    )
}

/// The start of a job's name, cut where a child's name may end (not at `-` or `.`).
fn prefix(job: &str, length: usize) -> String {
    let cut: String = job.chars().take(length).collect();
    cut.trim_end_matches(['-', '.']).to_owned()
}

/// Seconds a batch may take: its programs one after the other, and its pod's start.
fn deadline(programs: &[&Program]) -> u64 {
    START_SECONDS
        + programs
            .iter()
            .map(|p| p.timeout.as_secs() + 2)
            .sum::<u64>()
}

/// What a batch's Job is built from.
pub struct Batch<'a> {
    pub name: &'a str,
    pub job: &'a str,
    pub uid: &'a str,
    pub image: &'a str,
    pub settings: &'a Settings,
    pub kind: Kind,
    pub deadline: u64,
}

/// The Job of one batch: one pod, never retried, restricted, read-only but for /tmp.
pub fn build_job(
    batch: &Batch<'_>,
    owner: &k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
) -> Job {
    let volume_source = match batch.kind {
        Kind::ConfigMap => json!({"configMap": {"name": batch.name}}),
        Kind::Secret => json!({"secret": {"secretName": batch.name}}),
    };
    let mut volume = json!({"name": "programs"});
    volume
        .as_object_mut()
        .expect("an object")
        .extend(volume_source.as_object().expect("an object").clone());
    let labels = children::labels([
        (TESTS_OF, batch.uid.to_owned()),
        ("app.kubernetes.io/component", "tests".to_owned()),
    ]);
    serde_json::from_value(json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": batch.name,
            "labels": labels,
            "ownerReferences": [owner],
            "annotations": {"kubeswarm.dev/swarm-job": batch.job},
        },
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": batch.deadline,
            "ttlSecondsAfterFinished": 300,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": false,
                    "enableServiceLinks": false,
                    "securityContext": {
                        "runAsNonRoot": true,
                        "runAsUser": 65532,
                        "runAsGroup": 65532,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [{
                        "name": "tests",
                        "image": batch.image,
                        "command": ["python3", "-I", "-B", "/kubeswarm/run.py"],
                        "workingDir": "/tmp",
                        "terminationMessagePolicy": "File",
                        "resources": {
                            "requests": {"cpu": batch.settings.cpu, "memory": batch.settings.memory},
                            "limits": {"cpu": batch.settings.cpu, "memory": batch.settings.memory},
                        },
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        "volumeMounts": [
                            {"name": "programs", "mountPath": "/kubeswarm", "readOnly": true},
                            {"name": "scratch", "mountPath": "/tmp"},
                        ],
                    }],
                    "volumes": [
                        volume,
                        {"name": "scratch", "emptyDir": {"sizeLimit": "64Mi"}},
                    ],
                },
            },
        },
    }))
    .expect("a valid Job")
}

/// Denies a job's test pods every connection, both ways.
pub fn build_policy(
    job: &str,
    uid: &str,
    owner: &k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
) -> NetworkPolicy {
    // The uid's hash keeps jobs whose names start alike apart.
    let uid_hash = children::hash(&uid);
    serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": format!("{}-tests-{}", prefix(job, 40), &uid_hash[..8]),
            "labels": children::labels([(TESTS_OF, uid.to_owned())]),
            "ownerReferences": [owner],
        },
        "spec": {
            "podSelector": {"matchLabels": {TESTS_OF: uid}},
            "policyTypes": ["Ingress", "Egress"],
        },
    }))
    .expect("a valid NetworkPolicy")
}

/// Whether the pod is the batch Job's (by uid: a Job deleted and made again under the
/// same name is another).
fn controlled_by(pod: &Pod, job_uid: &str) -> bool {
    pod.owner_references()
        .iter()
        .any(|o| o.kind == "Job" && o.uid == job_uid && o.controller == Some(true))
}

enum PodState {
    Running,
    /// The container ended: its termination message, and how it ended.
    Terminated {
        message: String,
        how: String,
    },
    /// An image that does not run: `lasting` when no retry can change that (a malformed
    /// name), else a pull that failed and may work later.
    BadImage {
        why: String,
        lasting: bool,
    },
}

/// Where a test pod is: its container's end and message, or an image that will never run.
fn pod_state(pod: &Pod) -> PodState {
    let Some(container) = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
    else {
        return PodState::Running;
    };
    let state = container.state.as_ref();
    if let Some(terminated) = state.and_then(|s| s.terminated.as_ref()) {
        return PodState::Terminated {
            message: terminated.message.clone().unwrap_or_default(),
            how: format!(
                "{}, exit code {}",
                terminated.reason.as_deref().unwrap_or("no reason"),
                terminated.exit_code
            ),
        };
    }
    match state.and_then(|s| s.waiting.as_ref()) {
        Some(waiting) => {
            let reason = waiting.reason.as_deref().unwrap_or_default();
            let why = format!(
                "{reason}: {}",
                waiting.message.as_deref().unwrap_or_default()
            );
            match reason {
                "InvalidImageName" | "ErrImageNeverPull" => {
                    PodState::BadImage { why, lasting: true }
                }
                "ErrImagePull" | "ImagePullBackOff" => PodState::BadImage {
                    why,
                    lasting: false,
                },
                _ => PodState::Running,
            }
        }
        None => PodState::Running,
    }
}

fn failed_condition(job: &Job) -> Option<String> {
    job.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Failed" && c.status == "True")
        .map(|c| {
            format!(
                "{}: {}",
                c.reason.as_deref().unwrap_or_default(),
                c.message.as_deref().unwrap_or_default()
            )
        })
}

/// One program's line of the runner's report.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Reported {
    exit: Option<i32>,
    signal: Option<i32>,
    #[serde(default)]
    timed_out: bool,
    /// The runner saw the program's marker line, which it leaves out of `printout`.
    finished: bool,
    #[serde(default)]
    printout: String,
}

/// The runner's report, one entry per program in order. The report is the pod's word,
/// from a container that ran model-written code: anything but one well-formed entry per
/// program is a broken batch, never a pass.
pub fn read_report(message: &str, programs: &[&Program]) -> Result<Vec<Ran>, SandboxError> {
    let unreadable = |why: String| SandboxError::Broken {
        what: format!("the test pod's report is unreadable: {why}"),
        source: None,
    };
    let reported: Vec<Reported> =
        serde_json::from_str(message).map_err(|err| unreadable(err.to_string()))?;
    if reported.len() != programs.len() {
        return Err(unreadable(format!(
            "{} entries for {} programs",
            reported.len(),
            programs.len()
        )));
    }
    reported
        .into_iter()
        .zip(programs)
        .map(|(r, program)| {
            let exit = match (r.timed_out, r.exit, r.signal) {
                (true, None, None) => Exit::TimedOut,
                (false, Some(code), None) => Exit::Code(code),
                (false, None, Some(signal)) => Exit::Signal(signal),
                _ => {
                    return Err(unreadable(
                        "an entry says more than one way it ended".to_owned(),
                    ));
                }
            };
            Ok(program.judge(exit, r.finished, &r.printout))
        })
        .collect()
}

#[cfg(test)]
mod tests;
