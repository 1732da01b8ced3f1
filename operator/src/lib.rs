//! kubeswarm: a Kubernetes operator that runs agent swarms of open-weight LLMs on a
//! company's own GPUs.

pub mod api;
pub mod conditions;
pub mod controllers;
pub mod crdgen;
pub mod kueue;
#[cfg(test)]
mod layers;
pub mod local;
pub mod metrics;
pub mod pool_contract;
pub mod swarm;
pub mod telemetry;
