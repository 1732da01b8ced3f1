//! What a reconcile writes back to its job: the status, with an Event per condition
//! transition, and the finalizer.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Patch, PatchParams};
use serde_json::json;

use super::progress::State;
use super::status::{self, Admission};
use super::{Error, FINALIZER, Reconciler, store};
use crate::api::{ResultReference, SwarmJob, SwarmJobStatus};
use crate::conditions::{self, Desired};
use crate::controllers::children::{api_error, write_status};
use crate::swarm;

/// How a job ended: its outcome, when, and the start of its answer for the status.
pub(super) struct Ending<'o> {
    pub(super) outcome: &'o Result<swarm::record::JobResult, swarm::Failure>,
    pub(super) at: Timestamp,
    pub(super) preview: Option<String>,
}

impl Reconciler<'_> {
    /// Adds or removes the finalizer; a merge patch conditional on the resourceVersion
    /// this reconcile last saw (its own status write moves it), so a concurrent change to
    /// the list is not overwritten.
    pub(super) async fn set_finalizer(&self, present: bool) -> Result<(), Error> {
        let current = self.job.finalizers();
        if current.iter().any(|f| f == FINALIZER) == present {
            return Ok(());
        }
        let mut next: Vec<&str> = current
            .iter()
            .map(String::as_str)
            .filter(|f| *f != FINALIZER)
            .collect();
        if present {
            next.push(FINALIZER);
        }
        let name = self.job.name_any();
        let patch = json!({
            "metadata": {"finalizers": next, "resourceVersion": self.resource_version()},
        });
        match self
            .api::<SwarmJob>()
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(job) => {
                self.wrote(&job);
                Ok(())
            }
            // Gone already: nothing is left to hold.
            Err(kube::Error::Api(status)) if status.code == 404 && !present => Ok(()),
            Err(err) => Err(api_error("patch finalizers of", "SwarmJob", name)(err).into()),
        }
    }

    /// Writes the status when it differs from the stored one, with an Event per condition
    /// transition. `end` is how the job ended, once it has.
    pub(super) async fn update_status(
        &self,
        old: &SwarmJobStatus,
        admission: Admission<'_>,
        state: &State,
        start: Option<Timestamp>,
        end: Option<&Ending<'_>>,
    ) -> Result<SwarmJobStatus, Error> {
        let generation = self.job.metadata.generation;
        let kept_in = self.ctx.results.kind(&self.namespace);
        let started = start.is_some() || old.start_time.is_some();
        let mut desired: Vec<Desired> = vec![status::admitted(admission)];
        desired.extend(status::phases(
            &self.job.spec,
            started,
            state,
            end.map(|e| e.outcome),
            kept_in,
        ));
        let conditions = conditions::merge(&old.conditions, &desired, generation, Timestamp::now());
        let new = SwarmJobStatus {
            conditions,
            observed_generation: generation,
            start_time: start.map(Time).or_else(|| old.start_time.clone()),
            completion_time: end.map(|e| Time(e.at)),
            finished_subagents: state.finished() as i32,
            subagents: state.subagents.values().cloned().collect(),
            usage: state.usage_status(),
            result: match end {
                Some(Ending {
                    outcome: Ok(result),
                    preview,
                    ..
                }) => Some(match kept_in {
                    store::Kind::ConfigMap => ResultReference {
                        config_map_name: Some(store::result_name(self.job)),
                        secret_name: None,
                        preview: preview.clone(),
                        tally: result.tally.clone(),
                    },
                    store::Kind::Secret => ResultReference {
                        config_map_name: None,
                        secret_name: Some(store::result_name(self.job)),
                        preview: None,
                        tally: None,
                    },
                }),
                _ => None,
            },
        };
        if let Some(stored) = write_status(
            &self.api::<SwarmJob>(),
            self.job,
            self.resource_version(),
            &self.ctx.recorder,
            old,
            &new,
            &desired,
        )
        .await?
        {
            self.wrote(&stored);
        }
        Ok(new)
    }
}
