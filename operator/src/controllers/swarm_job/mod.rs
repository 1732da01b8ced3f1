//! The SwarmJob controller's parts. So far: resolving the pools a job calls to ready
//! endpoints, and the result ConfigMap the engine checkpoints into, so that a restarted
//! operator resumes a job where it stopped.

pub mod pools;
pub mod store;
