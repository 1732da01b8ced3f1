//! The engine's record store in a cluster: the job's result object `<job>-result`, owned
//! by the job. A ConfigMap by default; a Secret in the namespaces the platform team names
//! (`Results`), for results that readers of ConfigMaps (the `view` role) must not see.
//! Each save merges its entries into the object (a JSON merge patch: other entries
//! stay), creating it on the first save; a checkpoint is durable once the API server has
//! accepted it.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::ResourceExt;
use kube::api::{Api, ApiResource, DynamicObject, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::api::SwarmJob;
use crate::controllers::FIELD_MANAGER;
use crate::swarm::record::{Store, StoreError};

/// Name of a job's result object.
pub fn result_name(job: &SwarmJob) -> String {
    format!("{}-result", job.name_any())
}

/// Which kind of object holds a job's result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    ConfigMap,
    Secret,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::ConfigMap => "ConfigMap",
            Kind::Secret => "Secret",
        }
    }

    /// Whether the answer may be shown outside the result object: in the job's status,
    /// its conditions and its Events.
    pub fn discloses_answer(self) -> bool {
        self == Kind::ConfigMap
    }

    pub(super) fn resource(self) -> ApiResource {
        match self {
            Kind::ConfigMap => ApiResource::erase::<ConfigMap>(&()),
            Kind::Secret => ApiResource::erase::<Secret>(&()),
        }
    }

    /// An entry as the object's `data` holds it: a Secret's values are base64.
    pub(super) fn encode(self, value: String) -> Value {
        match self {
            Kind::ConfigMap => Value::String(value),
            Kind::Secret => json!(ByteString(value.into_bytes())),
        }
    }

    fn decode(self, key: &str, value: Value) -> Result<String, StoreError> {
        let unreadable = |source| StoreError::Unreadable {
            key: key.to_owned(),
            source,
        };
        match self {
            Kind::ConfigMap => serde_json::from_value(value).map_err(unreadable),
            Kind::Secret => {
                let bytes: ByteString = serde_json::from_value(value).map_err(unreadable)?;
                String::from_utf8(bytes.0).map_err(|_| {
                    unreadable(serde::de::Error::custom("the entry is not UTF-8 text"))
                })
            }
        }
    }
}

/// Where each namespace's results are kept.
#[derive(Clone, Debug, Default)]
pub struct Results {
    /// Namespaces whose results go in Secrets rather than ConfigMaps.
    pub secret_namespaces: BTreeSet<String>,
    /// The ClusterRole that, bound in such a namespace, lets the operator write them.
    pub role: String,
}

impl Results {
    pub fn kind(&self, namespace: &str) -> Kind {
        if self.secret_namespaces.contains(namespace) {
            Kind::Secret
        } else {
            Kind::ConfigMap
        }
    }
}

pub struct ResultStore {
    kind: Kind,
    api: Api<DynamicObject>,
    /// The object as first created: name, labels and the job as owner.
    template: DynamicObject,
    /// What grants the operator a namespace's Secrets, for a refusal to name.
    fix: String,
}

impl ResultStore {
    pub fn new(client: kube::Client, job: &SwarmJob, results: &Results) -> Self {
        let namespace = job.namespace().unwrap_or_default();
        let kind = results.kind(&namespace);
        let resource = kind.resource();
        let mut template = DynamicObject::new(&result_name(job), &resource).within(&namespace);
        template.metadata = ObjectMeta {
            labels: Some(super::build::job_labels(job)),
            owner_references: Some(vec![crate::controllers::children::controller_owner(job)]),
            ..template.metadata
        };
        if kind == Kind::Secret {
            template.data = json!({"type": "Opaque"});
        }
        Self {
            kind,
            api: Api::namespaced_with(client, &namespace, &resource),
            template,
            fix: format!(
                "grant it with a RoleBinding in {namespace} to the ClusterRole {} (Helm value results.secretNamespaces)",
                results.role
            ),
        }
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    fn place(&self) -> String {
        format!("{} {}", self.kind.as_str(), self.template.name_any())
    }

    /// Whether `found` is this job's: owned by the job's uid.
    fn owns(&self, found: &DynamicObject) -> bool {
        let job = self.template.owner_references();
        found
            .owner_references()
            .iter()
            .any(|o| job.iter().any(|j| j.uid == o.uid))
    }

    /// A failed request as the store's error: a Secret the operator may not touch is a
    /// refusal that names the RoleBinding to add, since only a person can fix it.
    fn failed(&self, action: &'static str, err: kube::Error) -> StoreError {
        match err {
            // Over the object's size limit (422), or the request's (413): the engine's own
            // accounting missed it, and a retry would only be refused again.
            kube::Error::Api(status) if status.code == 422 || status.code == 413 => {
                StoreError::TooLarge {
                    place: self.place(),
                    message: status.message,
                }
            }
            kube::Error::Api(status) if status.code == 403 && self.kind == Kind::Secret => {
                StoreError::Refused {
                    place: self.place(),
                    fix: self.fix.clone(),
                }
            }
            err => StoreError::backend(action, self.place())(err),
        }
    }
}

impl Store for ResultStore {
    async fn load(&self) -> Result<BTreeMap<String, String>, StoreError> {
        match self.api.get_opt(&self.template.name_any()).await {
            Ok(None) => Ok(BTreeMap::new()),
            // A job created again under the same name must not resume, or finish with,
            // the records of the job it replaces.
            Ok(Some(found)) if !self.owns(&found) => Err(StoreError::Foreign {
                place: self.place(),
                owner: found
                    .owner_references()
                    .iter()
                    .map(|o| format!("{} {} uid {}", o.kind, o.name, o.uid))
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
            Ok(Some(mut found)) => match found.data.get_mut("data").map(Value::take) {
                None | Some(Value::Null) => Ok(BTreeMap::new()),
                Some(Value::Object(data)) => data
                    .into_iter()
                    .map(|(key, value)| Ok((key.clone(), self.kind.decode(&key, value)?)))
                    .collect(),
                Some(_) => Err(StoreError::Unreadable {
                    key: "data".to_owned(),
                    source: serde::de::Error::custom("not a map of entries"),
                }),
            },
            Err(err) => Err(self.failed("reading", err)),
        }
    }

    async fn save(&self, entries: Vec<(String, String)>) -> Result<(), StoreError> {
        let name = self.template.name_any();
        let data: serde_json::Map<String, Value> = entries
            .into_iter()
            .map(|(key, value)| (key, self.kind.encode(value)))
            .collect();
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
                first.data["data"] = Value::Object(data);
                let post = PostParams {
                    field_manager: Some(FIELD_MANAGER.to_owned()),
                    ..PostParams::default()
                };
                self.api
                    .create(&post, &first)
                    .await
                    .map(|_| ())
                    .map_err(|err| self.failed("creating", err))
            }
            Err(err) => Err(self.failed("writing", err)),
        }
    }
}
