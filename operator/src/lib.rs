//! kubeswarm: a Kubernetes operator that runs agent swarms of open-weight LLMs on a
//! company's own GPUs.
//!
//! Modules are in layers (`layers.rs` lists them and a test checks the imports). What is
//! `pub` here is what the binary, the benchmarks and the tests of public behaviour use;
//! the rest is `pub(crate)`.

pub mod api;
pub(crate) mod conditions;
pub mod controllers;
pub mod crdgen;
pub mod kueue;
#[cfg(test)]
mod layers;
pub mod local;
pub mod metrics;
pub(crate) mod pool_contract;
pub mod swarm;
pub mod telemetry;
pub mod tenancy;
