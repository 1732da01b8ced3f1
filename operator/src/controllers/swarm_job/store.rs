//! The engine's record store in a cluster: the job's result object `<job>-result`, owned
//! by the job. A ConfigMap by default; a Secret in the namespaces the platform team names
//! (`Results`), for results that readers of ConfigMaps (the `view` role) must not see.
//! Each save merges its entries into the object (a JSON merge patch: other entries
//! stay), creating it on the first save; a checkpoint is durable once the API server has
//! accepted it.
//!
//! Writes are fenced. Each engine run's store has a random writer name that every save
//! puts in the `writer` entry, and every save is conditional on the resourceVersion the
//! store last saw. When the object changed in between, the store reads it again: another
//! writer's name there means a newer engine has taken the job over (a new leader's, while
//! a deposed leader's engine still runs), and the older one stops with `Superseded`
//! instead of overwriting its records. A store that has not written yet takes over.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::ResourceExt;
use kube::api::{Api, ApiResource, DynamicObject, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::api::SwarmJob;
use crate::controllers::FIELD_MANAGER;
use crate::swarm::record::{Store, StoreError};

/// The entry that names the engine run writing the records.
pub const WRITER: &str = "writer";
/// How many times a save reads a changed object again and retries before it gives up.
const CONFLICTS: usize = 4;

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
    /// This store's name in the `writer` entry.
    writer: String,
    /// What this store last saw of the object; saves queue on it.
    fence: tokio::sync::Mutex<Fence>,
}

/// The object's resourceVersion as the store last read or wrote it (None: no object), and
/// whether this store has written it since.
#[derive(Default)]
struct Fence {
    version: Option<String>,
    claimed: bool,
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
            writer: format!("{:016x}", rand::random::<u64>()),
            fence: tokio::sync::Mutex::default(),
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

    /// The error for an object of this name that another job owns.
    fn foreign(&self, found: &DynamicObject) -> StoreError {
        StoreError::Foreign {
            place: self.place(),
            owner: found
                .owner_references()
                .iter()
                .map(|o| format!("{} {} uid {}", o.kind, o.name, o.uid))
                .collect::<Vec<_>>()
                .join(", "),
        }
    }

    /// The writer named in a stored object.
    fn writer_of(&self, found: &DynamicObject) -> Option<String> {
        let value = found.data.get("data")?.get(WRITER)?.clone();
        self.kind.decode(WRITER, value).ok()
    }

    /// One conditional write of `data`: a merge patch at the version the store last saw,
    /// or the object's creation when it saw none.
    async fn write(
        &self,
        version: Option<&str>,
        data: &serde_json::Map<String, Value>,
    ) -> Result<DynamicObject, kube::Error> {
        match version {
            Some(version) => {
                let params = PatchParams {
                    field_manager: Some(FIELD_MANAGER.to_owned()),
                    ..PatchParams::default()
                };
                let patch = json!({"metadata": {"resourceVersion": version}, "data": data});
                self.api
                    .patch(&self.template.name_any(), &params, &Patch::Merge(patch))
                    .await
            }
            None => {
                let mut first = self.template.clone();
                first.data["data"] = Value::Object(data.clone());
                let post = PostParams {
                    field_manager: Some(FIELD_MANAGER.to_owned()),
                    ..PostParams::default()
                };
                self.api.create(&post, &first).await
            }
        }
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
        let mut fence = self.fence.lock().await;
        let found = self.api.get_opt(&self.template.name_any()).await;
        if let Ok(found) = &found {
            fence.version = found.as_ref().and_then(|f| f.resource_version());
        }
        match found {
            Ok(None) => Ok(BTreeMap::new()),
            // A job created again under the same name must not resume, or finish with,
            // the records of the job it replaces.
            Ok(Some(found)) if !self.owns(&found) => Err(self.foreign(&found)),
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
        let data: serde_json::Map<String, Value> = entries
            .into_iter()
            .chain([(WRITER.to_owned(), self.writer.clone())])
            .map(|(key, value)| (key, self.kind.encode(value)))
            .collect();
        let mut fence = self.fence.lock().await;
        for _ in 0..CONFLICTS {
            let conflict = match self.write(fence.version.as_deref(), &data).await {
                Ok(written) => {
                    fence.version = written.resource_version();
                    fence.claimed = true;
                    return Ok(());
                }
                // Changed since this store saw it (409), or gone (404): look again.
                Err(kube::Error::Api(status)) if status.code == 409 || status.code == 404 => status,
                Err(err) => return Err(self.failed("writing", err)),
            };
            let current = self
                .api
                .get_opt(&self.template.name_any())
                .await
                .map_err(|err| self.failed("reading", err))?;
            if let Some(current) = &current {
                if !self.owns(current) {
                    return Err(self.foreign(current));
                }
                let writer = self.writer_of(current);
                if fence.claimed && writer.as_deref() != Some(self.writer.as_str()) {
                    return Err(StoreError::Superseded {
                        place: self.place(),
                        writer: writer.unwrap_or_else(|| "nobody".to_owned()),
                    });
                }
            }
            tracing::debug!(
                code = conflict.code,
                "the job's records changed since they were read; writing again at the new version"
            );
            fence.version = current.and_then(|c| c.resource_version());
        }
        Err(StoreError::backend("writing", self.place())(
            std::io::Error::other(format!(
                "the object changed under each of {CONFLICTS} writes"
            )),
        ))
    }
}
