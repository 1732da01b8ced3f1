//! kubeswarm: a Kubernetes operator that runs agent swarms of open-weight LLMs on a
//! company's own GPUs.

pub mod api;
pub mod controllers;
pub mod crdgen;
pub mod kueue;
pub mod local;
pub mod metrics;
pub mod swarm;
pub mod telemetry;
