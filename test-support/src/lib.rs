//! Test code shared by kubeswarm's test binaries and benchmarks (a dev-dependency only).

pub mod cel_cases;
pub mod examples;
pub mod helm;
pub mod mock;
