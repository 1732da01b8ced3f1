//! The operator's Prometheus metrics: reconciles, their errors and duration, pools by
//! condition, and the swarm jobs' model calls, tokens, durations and outcomes.
//!
//! Layer: a helper above `api`; uses nothing else of the crate.

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    namespace: String,
    pool: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    namespace: String,
    pool: String,
    /// `prompt` or `completion`.
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FinishedLabels {
    namespace: String,
    condition: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConditionOnly {
    condition: String,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    reconciles: Family<KindLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    duration: Family<KindLabels, Histogram>,
    pools: Family<ConditionLabels, Gauge>,
    calls: Family<CallLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    jobs: Family<FinishedLabels, Counter>,
    job_duration: Family<ConditionOnly, Histogram>,
    leading: Gauge,
    leadership_lost: Counter,
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
        let calls = registered(
            &mut registry,
            "model_calls",
            "HTTP calls of swarm jobs to model pools (subagents, planner, gate, synthesis), by outcome",
            Family::default(),
        );
        let tokens = registered(
            &mut registry,
            "tokens",
            "Tokens of swarm jobs' model calls, by namespace, pool and kind (prompt or completion)",
            Family::default(),
        );
        let jobs = registered(
            &mut registry,
            "swarm_jobs_finished",
            "Swarm jobs that finished, by final condition (Complete or Failed) and reason",
            Family::default(),
        );
        let job_duration = registered(
            &mut registry,
            "swarm_job_duration_seconds",
            "Time from a swarm job's start to its completion or failure",
            Family::<ConditionOnly, Histogram>::new_with_constructor(|| {
                Histogram::new(exponential_buckets(1.0, 2.0, 16))
            }),
        );
        let leading = registered(
            &mut registry,
            "leader",
            "1 while this replica holds the leader Lease and runs the controllers, else 0",
            Gauge::default(),
        );
        let leadership_lost = registered(
            &mut registry,
            "leadership_lost",
            "Times this replica lost the leader Lease and stopped its controllers and engines",
            Counter::default(),
        );
        Self {
            registry: Mutex::new(registry),
            reconciles,
            errors,
            duration,
            pools,
            calls,
            tokens,
            jobs,
            job_duration,
            leading,
            leadership_lost,
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
    /// This replica now leads.
    pub fn leadership_gained(&self) {
        self.leading.set(1);
    }

    /// This replica stopped leading: its controllers and engines have stopped.
    pub fn leadership_lost(&self) {
        self.leading.set(0);
        self.leadership_lost.inc();
    }

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

    /// One model call of a swarm job, and the tokens it used.
    pub fn model_call(
        &self,
        namespace: &str,
        pool: &str,
        outcome: &str,
        prompt_tokens: u64,
        completion_tokens: u64,
    ) {
        self.calls
            .get_or_create(&CallLabels {
                namespace: namespace.to_owned(),
                pool: pool.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
        for (kind, tokens) in [("prompt", prompt_tokens), ("completion", completion_tokens)] {
            if tokens > 0 {
                self.tokens
                    .get_or_create(&TokenLabels {
                        namespace: namespace.to_owned(),
                        pool: pool.to_owned(),
                        kind: kind.to_owned(),
                    })
                    .inc_by(tokens);
            }
        }
    }

    /// A swarm job reached its final condition after `seconds`.
    pub fn job_finished(&self, namespace: &str, condition: &str, reason: &str, seconds: f64) {
        self.jobs
            .get_or_create(&FinishedLabels {
                namespace: namespace.to_owned(),
                condition: condition.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
        self.job_duration
            .get_or_create(&ConditionOnly {
                condition: condition.to_owned(),
            })
            .observe(seconds);
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

    #[test]
    fn swarm_job_calls_tokens_and_outcomes_are_exported() {
        let metrics = Metrics::default();
        metrics.model_call("team-a", "gemma", "ok", 10, 5);
        metrics.model_call("team-a", "gemma", "ok", 10, 5);
        metrics.model_call("team-a", "gemma", "timeout", 0, 0);
        metrics.job_finished("team-a", "Failed", "BudgetExceeded", 42.0);
        let text = metrics.render();
        for line in [
            "kubeswarm_model_calls_total{namespace=\"team-a\",pool=\"gemma\",outcome=\"ok\"} 2",
            "kubeswarm_model_calls_total{namespace=\"team-a\",pool=\"gemma\",outcome=\"timeout\"} 1",
            "kubeswarm_tokens_total{namespace=\"team-a\",pool=\"gemma\",kind=\"prompt\"} 20",
            "kubeswarm_tokens_total{namespace=\"team-a\",pool=\"gemma\",kind=\"completion\"} 10",
            "kubeswarm_swarm_jobs_finished_total{namespace=\"team-a\",condition=\"Failed\",reason=\"BudgetExceeded\"} 1",
            "kubeswarm_swarm_job_duration_seconds_sum{condition=\"Failed\"} 42.0",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }
}
