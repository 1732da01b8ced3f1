//! The engine's record store in a cluster: the job's result ConfigMap `<job>-result`,
//! owned by the job. Each save merges its entries into the ConfigMap (a JSON merge patch:
//! other entries stay), creating it on the first save; a checkpoint is durable once the
//! API server has accepted it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::api::SwarmJob;
use crate::controllers::FIELD_MANAGER;
use crate::swarm::record::{Store, StoreError};

/// Name of a job's result ConfigMap.
pub fn result_name(job: &SwarmJob) -> String {
    format!("{}-result", job.name_any())
}

pub struct ResultConfigMap {
    api: Api<ConfigMap>,
    /// The ConfigMap as first created: name, labels and the job as owner.
    template: ConfigMap,
}

impl ResultConfigMap {
    pub fn new(client: kube::Client, job: &SwarmJob) -> Self {
        let namespace = job.namespace().unwrap_or_default();
        let template = ConfigMap {
            metadata: ObjectMeta {
                name: Some(result_name(job)),
                namespace: Some(namespace.clone()),
                labels: Some(super::build::job_labels(job)),
                owner_references: Some(vec![crate::controllers::children::controller_owner(job)]),
                ..ObjectMeta::default()
            },
            ..ConfigMap::default()
        };
        Self {
            api: Api::namespaced(client, &namespace),
            template,
        }
    }

    fn name(&self) -> String {
        self.template.name_any()
    }

    /// Whether `found` is this job's: owned by the job's uid.
    fn owns(&self, found: &ConfigMap) -> bool {
        let job = self.template.owner_references();
        found
            .owner_references()
            .iter()
            .any(|o| job.iter().any(|j| j.uid == o.uid))
    }
}

impl Store for ResultConfigMap {
    async fn load(&self) -> Result<BTreeMap<String, String>, StoreError> {
        let name = self.name();
        match self.api.get_opt(&name).await {
            Ok(None) => Ok(BTreeMap::new()),
            // A job created again under the same name must not resume, or finish with,
            // the records of the job it replaces.
            Ok(Some(found)) if !self.owns(&found) => Err(StoreError::Foreign {
                place: format!("ConfigMap {name}"),
                owner: found
                    .owner_references()
                    .iter()
                    .map(|o| format!("{} {} uid {}", o.kind, o.name, o.uid))
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
            Ok(Some(found)) => Ok(found.data.unwrap_or_default()),
            Err(err) => Err(StoreError::backend("reading", format!("ConfigMap {name}"))(
                err,
            )),
        }
    }

    async fn save(&self, entries: Vec<(String, String)>) -> Result<(), StoreError> {
        let name = self.name();
        let data: BTreeMap<String, String> = entries.into_iter().collect();
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PatchParams::default()
        };
        match self
            .api
            .patch(&name, &params, &Patch::Merge(json!({"data": data})))
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => {
                let mut first = self.template.clone();
                first.data = Some(data);
                let post = PostParams {
                    field_manager: Some(FIELD_MANAGER.to_owned()),
                    ..PostParams::default()
                };
                self.api
                    .create(&post, &first)
                    .await
                    .map(|_| ())
                    .map_err(StoreError::backend("creating", format!("ConfigMap {name}")))
            }
            Err(err) => Err(StoreError::backend("writing", format!("ConfigMap {name}"))(
                err,
            )),
        }
    }
}
