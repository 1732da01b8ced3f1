//! Tests of the public API surface: the CRDs, their CEL rules, defaults, the examples
//! and the Helm chart. One test binary, so the suite links once.

mod cel_rules;
mod chart;
mod crds;
mod defaults;
mod examples;
mod support;
