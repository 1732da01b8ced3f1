//! The operator's Prometheus metrics: reconciles, their errors and duration, and pools by
//! condition.

use std::sync::Mutex;
use std::time::Instant;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    kind: String,
    error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConditionLabels {
    namespace: String,
    pool: String,
    condition: String,
    status: String,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    reconciles: Family<KindLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    duration: Family<KindLabels, Histogram>,
    pools: Family<ConditionLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kubeswarm");
        let reconciles = registered(
            &mut registry,
            "reconciles",
            "Reconciles started, by kind",
            Family::default(),
        );
        let errors = registered(
            &mut registry,
            "reconcile_errors",
            "Reconciles that failed, by kind and error",
            Family::default(),
        );
        let duration = registered(
            &mut registry,
            "reconcile_duration_seconds",
            "Time one reconcile took, by kind",
            Family::<KindLabels, Histogram>::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 14))
            }),
        );
        let pools = registered(
            &mut registry,
            "model_pool_condition",
            "1 for each pool's current status of each condition",
            Family::default(),
        );
        Self {
            registry: Mutex::new(registry),
            reconciles,
            errors,
            duration,
            pools,
        }
    }
}

fn registered<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// Observes a reconcile's duration when dropped.
pub struct Timer {
    histogram: Histogram,
    start: Instant,
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

impl Metrics {
    pub fn reconciled(&self, kind: &str) {
        self.reconciles
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .inc();
    }

    pub fn reconcile_failed(&self, kind: &str, error: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                kind: kind.to_owned(),
                error: error.to_owned(),
            })
            .inc();
    }

    pub fn reconcile_timer(&self, kind: &str) -> Timer {
        Timer {
            histogram: self
                .duration
                .get_or_create(&KindLabels {
                    kind: kind.to_owned(),
                })
                .clone(),
            start: Instant::now(),
        }
    }

    /// Sets the pool's condition gauges: 1 on the current status, 0 on the others.
    pub fn pool_conditions(&self, namespace: &str, pool: &str, conditions: &[Condition]) {
        for condition in conditions {
            for status in ["True", "False", "Unknown"] {
                let labels = ConditionLabels {
                    namespace: namespace.to_owned(),
                    pool: pool.to_owned(),
                    condition: condition.type_.clone(),
                    status: status.to_owned(),
                };
                self.pools
                    .get_or_create(&labels)
                    .set(i64::from(condition.status == status));
            }
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(
            &mut out,
            &self.registry.lock().expect("metrics registry lock"),
        )
        .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconciles_errors_and_conditions_are_exported() {
        let metrics = Metrics::default();
        metrics.reconciled("ModelPool");
        metrics.reconcile_failed("ModelPool", "Pod");
        drop(metrics.reconcile_timer("ModelPool"));
        metrics.pool_conditions(
            "team-a",
            "gemma",
            &[Condition {
                type_: "Available".to_owned(),
                status: "True".to_owned(),
                reason: "MinimumReplicasAvailable".to_owned(),
                message: String::new(),
                last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                ),
                observed_generation: None,
            }],
        );
        let text = metrics.render();
        assert!(
            text.contains("kubeswarm_reconciles_total{kind=\"ModelPool\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("kubeswarm_reconcile_errors_total{kind=\"ModelPool\",error=\"Pod\"} 1")
        );
        assert!(text.contains("kubeswarm_reconcile_duration_seconds_count{kind=\"ModelPool\"} 1"));
        assert!(text.contains(
            "kubeswarm_model_pool_condition{namespace=\"team-a\",pool=\"gemma\",condition=\"Available\",status=\"True\"} 1"
        ));
        assert!(text.contains(
            "kubeswarm_model_pool_condition{namespace=\"team-a\",pool=\"gemma\",condition=\"Available\",status=\"False\"} 0"
        ));
    }
}
