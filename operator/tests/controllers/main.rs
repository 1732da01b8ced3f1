//! The controllers against a mock API server: each scenario lists the exact
//! requests one reconcile makes, in order, and what the server answers. A request the
//! scenario does not list fails the test, so these also prove what is *not* written; and
//! every request must be one the chart's RBAC allows.

mod engine;
mod harness;
mod kill_matrix;
mod leader;
mod model_pool;
mod objects;
mod result_store;
mod store_faults;
mod swarm_job;
