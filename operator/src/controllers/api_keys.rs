//! External pools' API keys, read from a Secret in the pool's namespace. The operator has
//! no cluster-wide Secret reads: the chart's ClusterRole for them is bound per namespace,
//! by the platform team (Helm value `tenancy.apiKeyNamespaces`, or a RoleBinding of its
//! own). A key is never written into a status, an Event or a log.

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use crate::api::SecretKeyReference;

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
