//! The `kubeswarm.dev/v1alpha1` API: types only, no runtime code. Doc comments become the
//! `kubectl explain` text, and the CEL rules in the attributes become the CRDs'
//! `x-kubernetes-validations`, so the API server itself refuses invalid objects.
//!
//! Layer: the lowest. Types, their schemas and CEL rules only; no runtime code, no
//! import from the crate.

mod model_pool;
mod swarm_job;
mod swarm_job_status;

pub use model_pool::*;
pub use swarm_job::*;
pub use swarm_job_status::*;
