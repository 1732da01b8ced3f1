//! External pools' API keys, read from a Secret in the pool's namespace. The operator has
//! no cluster-wide Secret reads: the chart's ClusterRole for them is bound per namespace,
//! by the platform team (Helm value `tenancy.apiKeyNamespaces`, or a RoleBinding of its
//! own). A key is never written into a status, an Event or a log.
//!
//! Only a Secret labelled `kubeswarm.dev/api-key=true` is read. A tenant who may create
//! pools but not read Secrets could otherwise name any Secret of the namespace (a
//! database password) and have the operator send it to an endpoint of the tenant's
//! choosing; the label is set by whoever owns the Secret, which says it is a key meant
//! for a model endpoint.

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, ResourceExt};

use crate::api::SecretKeyReference;

/// The label, with the value `true`, that lets a Secret's keys go to pools' endpoints.
pub const API_KEY_LABEL: &str = "kubeswarm.dev/api-key";

/// Why a pool's API key could not be read; the messages name the fix, never the key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "the operator may not read Secret {secret} in namespace {namespace}: grant it with a RoleBinding in {namespace} to the ClusterRole {role} (Helm value tenancy.apiKeyNamespaces)"
    )]
    NotReadable {
        namespace: String,
        secret: String,
        role: String,
    },
    #[error(
        "spec.external.apiKeySecretRef names Secret {secret}, and namespace {namespace} has none"
    )]
    NoSecret { namespace: String, secret: String },
    #[error(
        "Secret {secret} is not labelled {API_KEY_LABEL}=true, so the operator sends none of its keys anywhere: if it holds this endpoint's key, label it (kubectl label secret {secret} -n {namespace} {API_KEY_LABEL}=true)"
    )]
    NotLabelled { namespace: String, secret: String },
    #[error("Secret {secret} has no non-empty key {key} (spec.external.apiKeySecretRef.key)")]
    NoKey { secret: String, key: String },
    #[error("reading Secret {secret}")]
    Api {
        secret: String,
        #[source]
        source: kube::Error,
    },
}

/// The key `reference` names in `namespace`, trimmed of the newline `kubectl create
/// secret --from-file` keeps. `role` is the ClusterRole that grants the read.
pub async fn read(
    client: &kube::Client,
    namespace: &str,
    reference: &SecretKeyReference,
    role: &str,
) -> Result<String, KeyError> {
    let secret = reference.name.clone();
    let found = Api::<Secret>::namespaced(client.clone(), namespace)
        .get_opt(&secret)
        .await
        .map_err(|source| match source {
            kube::Error::Api(status) if status.code == 403 => KeyError::NotReadable {
                namespace: namespace.to_owned(),
                secret: secret.clone(),
                role: role.to_owned(),
            },
            source => KeyError::Api {
                secret: secret.clone(),
                source,
            },
        })?
        .ok_or_else(|| KeyError::NoSecret {
            namespace: namespace.to_owned(),
            secret: secret.clone(),
        })?;
    if found.labels().get(API_KEY_LABEL).map(String::as_str) != Some("true") {
        return Err(KeyError::NotLabelled {
            namespace: namespace.to_owned(),
            secret,
        });
    }
    found
        .data
        .as_ref()
        .and_then(|d| d.get(&reference.key))
        .and_then(|v| String::from_utf8(v.0.clone()).ok())
        .map(|k| k.trim().to_owned())
        .filter(|k| !k.is_empty())
        .ok_or_else(|| KeyError::NoKey {
            secret,
            key: reference.key.clone(),
        })
}
