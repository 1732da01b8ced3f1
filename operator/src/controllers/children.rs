//! What both controllers do with the objects they own: create, apply when what they are
//! built from changed, delete, write their own status; and the marks every child carries
//! (owner reference, managed-by label, build hash).
//!
//! Layer: controllers. Uses `api` types only through generics.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference};
use kube::Resource;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use sha2::{Digest, Sha256};
use thiserror::Error;

use super::FIELD_MANAGER;

/// Annotation with a hash of what the child was built from; a child whose hash differs
/// from the desired one is replaced.
pub const HASH_ANNOTATION: &str = "kubeswarm.dev/spec-hash";
/// The label that says the operator manages a child.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "kubeswarm");

/// Short, stable hash of what a child is built from.
pub fn hash<T: serde::Serialize>(value: &T) -> String {
    let bytes = serde_json::to_vec(value).expect("built objects serialize");
    let digest = Sha256::digest(bytes);
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// `meta` with the build hash of `built_from` as its only annotation.
pub fn with_hash(mut meta: ObjectMeta, built_from: &impl serde::Serialize) -> ObjectMeta {
    meta.annotations = Some(BTreeMap::from([(
        HASH_ANNOTATION.to_owned(),
        hash(built_from),
    )]));
    meta
}

/// The hash a child was built with, if any.
pub fn built_hash<K: Resource>(child: &K) -> Option<&str> {
    child
        .meta()
        .annotations
        .as_ref()
        .and_then(|a| a.get(HASH_ANNOTATION))
        .map(String::as_str)
}

/// `owner` as controller of a child. blockOwnerDeletion: an owner deleted in the
/// foreground is gone only once its children are.
pub fn controller_owner<K: Resource<DynamicType = ()>>(owner: &K) -> OwnerReference {
    OwnerReference {
        block_owner_deletion: Some(true),
        ..owner
            .controller_owner_ref(&())
            .expect("a stored object has a name and uid")
    }
}

/// The managed-by label, with `more` labels.
pub fn labels<const N: usize>(more: [(&str, String); N]) -> BTreeMap<String, String> {
    std::iter::once((MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned()))
        .chain(more.into_iter().map(|(k, v)| (k.to_owned(), v)))
        .collect()
}

/// A request to the API server that failed, and what it was for.
#[derive(Debug, Error)]
#[error("{action} {kind} {name}")]
pub struct ApiError {
    pub action: &'static str,
    pub kind: String,
    pub name: String,
    #[source]
    pub source: kube::Error,
}

impl ApiError {
    /// Whether the API server refused a conditional write because the object changed since
    /// the version the write named: what was read is stale, not the request wrong.
    pub(crate) fn is_conflict(&self) -> bool {
        matches!(&self.source, kube::Error::Api(status) if status.code == 409 && status.reason == "Conflict")
    }
}

/// Names a failed request: `.map_err(api_error("list", "Pod", &name))`.
pub(crate) fn api_error(
    action: &'static str,
    kind: impl Into<String>,
    name: impl Into<String>,
) -> impl FnOnce(kube::Error) -> ApiError {
    let (kind, name) = (kind.into(), name.into());
    move |source| ApiError {
        action,
        kind,
        name,
        source,
    }
}

/// A namespaced kind the reconciles read and write: the pools' and jobs' children, and the
/// pools and jobs themselves for their status.
pub(crate) trait Child:
    kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
    + Clone
    + serde::Serialize
    + serde::de::DeserializeOwned
    + std::fmt::Debug
{
}

impl<K> Child for K where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug
{
}

/// Creates `object` under the operator's field manager.
pub(crate) async fn create<K: Child>(api: &Api<K>, object: &K) -> Result<K, ApiError> {
    let params = kube::api::PostParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..Default::default()
    };
    api.create(&params, object).await.map_err(api_error(
        "create",
        K::kind(&()),
        kube::ResourceExt::name_any(object),
    ))
}

/// Deletes `name`, its dependents in the background; one that is gone already counts as
/// deleted.
pub(crate) async fn delete<K: Child>(api: &Api<K>, name: &str) -> Result<(), ApiError> {
    match api
        .delete(name, &kube::api::DeleteParams::background())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(err) => Err(api_error("delete", K::kind(&()), name)(err)),
    }
}

/// Writes `status` to `name`'s status by server-side apply, owning every field in it, on
/// the condition that the object is still at `resource_version`: a status worked out from
/// a stale cache, or from a read that a write since has overtaken, is refused with 409
/// (`ApiError::is_conflict`) instead of written over the newer object's. Returns the
/// object as the API server stored it, with its new resourceVersion.
pub(crate) async fn apply_status<K: Child>(
    api: &Api<K>,
    name: &str,
    resource_version: Option<String>,
    status: &impl serde::Serialize,
) -> Result<K, ApiError> {
    let mut patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    if let Some(version) = resource_version {
        patch["metadata"] = serde_json::json!({ "resourceVersion": version });
    }
    api.patch_status(
        name,
        &kube::api::PatchParams::apply(FIELD_MANAGER).force(),
        &kube::api::Patch::Apply(&patch),
    )
    .await
    .map_err(api_error("apply status of", K::kind(&()), name))
}

/// A status with conditions, which `write_status` announces the transitions of.
pub(crate) trait Conditioned: serde::Serialize + PartialEq {
    fn conditions(&self) -> &[Condition];
}

impl Conditioned for crate::api::ModelPoolStatus {
    fn conditions(&self) -> &[Condition] {
        &self.conditions
    }
}

impl Conditioned for crate::api::SwarmJobStatus {
    fn conditions(&self) -> &[Condition] {
        &self.conditions
    }
}

/// A status change, written and announced: `new` goes to `object`'s status (unless equal to
/// `old`, as `conditions::merge` keeps transition times for what did not change) if the
/// object is still at `resource_version` (see `apply_status`), and each condition that
/// changed becomes an Event as `desired` asks. Returns the stored object, None when there
/// was nothing to write.
pub(crate) async fn write_status<K: Child, S: Conditioned>(
    api: &Api<K>,
    object: &K,
    resource_version: Option<String>,
    recorder: &kube::runtime::events::Recorder,
    old: &S,
    new: &S,
    desired: &[crate::conditions::Desired],
) -> Result<Option<K>, ApiError> {
    if old == new {
        return Ok(None);
    }
    let stored = apply_status(
        api,
        &kube::ResourceExt::name_any(object),
        resource_version,
        new,
    )
    .await?;
    crate::conditions::announce(
        recorder,
        &object.object_ref(&()),
        old.conditions(),
        new.conditions(),
        desired,
    )
    .await;
    Ok(Some(stored))
}

/// A typed object with apiVersion and kind set, for server-side apply.
pub(crate) fn typed<K: kube::Resource<DynamicType = ()> + serde::Serialize>(
    object: &K,
) -> serde_json::Value {
    let mut value = serde_json::to_value(object).expect("built objects serialize");
    value["apiVersion"] = serde_json::json!(K::api_version(&()));
    value["kind"] = serde_json::json!(K::kind(&()));
    value
}

/// Applies `want` unless `current` was built from the same thing (same hash).
pub(crate) async fn apply_if_changed<K: Child>(
    api: &Api<K>,
    current: Option<&K>,
    want: &K,
) -> Result<(), ApiError> {
    if current.and_then(built_hash) == built_hash(want) {
        return Ok(());
    }
    apply(api, want).await
}

/// Applies `want` by server-side apply, owning every field in it.
pub(crate) async fn apply<K: Child>(api: &Api<K>, want: &K) -> Result<(), ApiError> {
    let name = kube::ResourceExt::name_any(want);
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(typed(want)),
    )
    .await
    .map_err(api_error("apply", K::kind(&()), &name))?;
    Ok(())
}
