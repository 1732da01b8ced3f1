//! Prometheus metrics of the worker, served at /metrics.

use std::sync::atomic::{AtomicI64, Ordering};

use prometheus_client::encoding::{
    EncodeLabelSet, EncodeLabelValue, LabelValueEncoder, text::encode,
};
use prometheus_client::metrics::{
    counter::Counter, family::Family, gauge::Gauge, histogram::Histogram,
};
use prometheus_client::registry::{Metric, Registry};

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// Answered in full.
    Ok,
    /// Refused as the client's mistake (4xx).
    ClientError,
    /// Not served: the model is loading or the worker is draining (503).
    Unavailable,
    /// Failed inside the engine (5xx).
    ServerError,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ClientError => "client_error",
            Outcome::Unavailable => "unavailable",
            Outcome::ServerError => "server_error",
        }
    }
}

// By hand because the derive writes variant names as they are (`ClientError`), and
// Prometheus label values are snake_case by convention.
impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        self.as_str().encode(encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: Outcome,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<OutcomeLabels, Counter>,
    prompt_tokens: Counter,
    completion_tokens: Counter,
    running: Gauge,
    waiting: Gauge,
    time_to_first_token: Histogram,
    inter_token_latency: Histogram,
    in_flight: AtomicI64,
    max_seqs: i64,
}

impl Metrics {
    pub fn new(max_seqs: u32) -> Self {
        let mut registry = Registry::with_prefix("kubeswarm_worker");
        let requests = registered(
            &mut registry,
            "requests",
            "Chat completion requests by outcome",
            Family::<OutcomeLabels, Counter>::default(),
        );
        let prompt_tokens = registered(
            &mut registry,
            "prompt_tokens",
            "Prompt tokens processed",
            Counter::default(),
        );
        let completion_tokens = registered(
            &mut registry,
            "completion_tokens",
            "Completion tokens generated",
            Counter::default(),
        );
        let running = registered(
            &mut registry,
            "running_sequences",
            "Requests the engine decodes now",
            Gauge::default(),
        );
        let waiting = registered(
            &mut registry,
            "waiting_sequences",
            "Requests queued behind the engine's concurrent sequence limit",
            Gauge::default(),
        );
        let time_to_first_token = registered(
            &mut registry,
            "time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token",
            // 10 ms to about 80 s: a cold prompt on a CPU worker is slow, a cached one on a GPU fast.
            Histogram::new(exponential(0.01, 2.0, 14)),
        );
        let inter_token_latency = registered(
            &mut registry,
            "inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request",
            // 1 ms to about 4 s per token.
            Histogram::new(exponential(0.001, 2.0, 13)),
        );
        Self {
            registry,
            requests,
            prompt_tokens,
            completion_tokens,
            running,
            waiting,
            time_to_first_token,
            inter_token_latency,
            in_flight: AtomicI64::new(0),
            max_seqs: i64::from(max_seqs),
        }
    }

    pub fn record_outcome(&self, outcome: Outcome) {
        self.requests
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn record_tokens(&self, prompt: usize, completion: usize) {
        self.prompt_tokens.inc_by(prompt as u64);
        self.completion_tokens.inc_by(completion as u64);
    }

    pub fn observe_first_token(&self, seconds: f64) {
        self.time_to_first_token.observe(seconds);
    }

    pub fn observe_inter_token(&self, seconds: f64) {
        self.inter_token_latency.observe(seconds);
    }

    /// Counts a request into the engine until the guard drops.
    pub fn enter(self: &std::sync::Arc<Self>) -> InFlight {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.set_sequences(now);
        InFlight {
            metrics: self.clone(),
        }
    }

    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::SeqCst)
    }

    // The engine decodes up to max_seqs sequences and queues the rest, so in-flight
    // requests split into running and waiting at that limit.
    fn set_sequences(&self, in_flight: i64) {
        self.running.set(in_flight.min(self.max_seqs));
        self.waiting.set((in_flight - self.max_seqs).max(0));
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

pub struct InFlight {
    metrics: std::sync::Arc<Metrics>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = self.metrics.in_flight.fetch_sub(1, Ordering::SeqCst) - 1;
        self.metrics.set_sequences(now);
    }
}

/// Registers `metric` and hands it back: the registry and the field share one metric.
fn registered<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

fn exponential(start: f64, factor: f64, count: u16) -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(start, factor, count)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn outcomes_are_snake_case_and_sequences_split_at_max_seqs() {
        let metrics = Arc::new(Metrics::new(2));
        metrics.record_outcome(Outcome::ClientError);
        metrics.record_outcome(Outcome::Ok);
        metrics.record_outcome(Outcome::Ok);
        let guards: Vec<_> = (0..3).map(|_| metrics.enter()).collect();
        let text = metrics.encode();
        assert!(
            text.contains(r#"kubeswarm_worker_requests_total{outcome="client_error"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"kubeswarm_worker_requests_total{outcome="ok"} 2"#),
            "{text}"
        );
        assert!(
            text.contains("kubeswarm_worker_running_sequences 2"),
            "{text}"
        );
        assert!(
            text.contains("kubeswarm_worker_waiting_sequences 1"),
            "{text}"
        );
        drop(guards);
        let text = metrics.encode();
        assert!(
            text.contains("kubeswarm_worker_running_sequences 0"),
            "{text}"
        );
        assert!(
            text.contains("kubeswarm_worker_waiting_sequences 0"),
            "{text}"
        );
    }
}
