//! The SwarmJob controller's parts. So far: the result ConfigMap the engine checkpoints
//! into, so that a restarted operator resumes a job where it stopped.

pub mod store;
