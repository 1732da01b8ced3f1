//! kubeswarm: a Kubernetes operator that runs agent swarms of open-weight LLMs on a
//! company's own GPUs.

pub mod api;
pub mod crdgen;
pub mod local;
pub mod swarm;
pub mod telemetry;
