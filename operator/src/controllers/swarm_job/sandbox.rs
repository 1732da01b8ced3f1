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
use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::store::Kind;
use crate::api::SwarmJob;
use crate::controllers::FIELD_MANAGER;
use crate::controllers::children::{self, controller_owner};
use crate::swarm::sandbox::{Program, Ran, Sandbox, SandboxError};

/// The runner the pod executes, mounted beside the programs.
mod build;
mod report;

use build::deadline;
pub use build::{Batch, batch_name, build_job, build_policy};
use report::{PodState, controlled_by, failed_condition, pod_state, read_report};

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

#[cfg(test)]
mod tests;
