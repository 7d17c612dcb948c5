//! Prometheus metrics of the core (rendered by `GET /metrics`).

use std::time::Duration;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Registry};

pub struct Metrics {
    pub registry: Registry,
    pub commit_batches: IntCounter,
    pub committed_writes: IntCounter,
    pub batch_size: Histogram,
    pub commit_seconds: Histogram,
    pub queue_wait_seconds: Histogram,
    pub deliveries: IntCounter,
    pub sessions: IntGauge,
    pub overflows: IntCounter,
    pub webhooks_delivered: IntCounter,
    pub webhooks_failed: IntCounter,
    pub webhooks_dropped: IntCounter,
    /// Writes refused because another node had written their channel (cluster mode).
    pub stale_seq_refusals: IntCounter,
    /// Posts renumbered onto the next free seq inside the transaction (cluster mode).
    pub rebased_writes: IntCounter,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).unwrap_or_else(|_| unreachable_metric());
            let _ = registry.register(Box::new(c.clone()));
            c
        };
        let commit_batches = counter(
            "switchboard_commit_batches_total",
            "Group-commit transactions",
        );
        let committed_writes = counter("switchboard_committed_writes_total", "Writes committed");
        let deliveries = counter("switchboard_deliveries_total", "Events queued to sockets");
        let overflows = counter(
            "switchboard_session_overflows_total",
            "Sockets closed for a full outbound queue",
        );
        let webhooks_delivered = counter(
            "switchboard_webhooks_delivered_total",
            "Webhook requests answered 2xx",
        );
        let webhooks_failed = counter(
            "switchboard_webhooks_failed_total",
            "Webhook requests given up after the last attempt",
        );
        let webhooks_dropped = counter(
            "switchboard_webhooks_dropped_total",
            "Webhook events dropped for a full queue",
        );
        let stale_seq_refusals = counter(
            "switchboard_stale_seq_refusals_total",
            "Writes refused because another node wrote their channel first",
        );
        let rebased_writes = counter(
            "switchboard_rebased_writes_total",
            "Posts renumbered onto the next seq because another node wrote their channel first",
        );
        let sessions = IntGauge::new("switchboard_sessions", "Open realtime sessions")
            .unwrap_or_else(|_| unreachable_metric());
        let _ = registry.register(Box::new(sessions.clone()));
        let hist = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .unwrap_or_else(|_| unreachable_metric());
            let _ = registry.register(Box::new(h.clone()));
            h
        };
        let batch_size = hist(
            "switchboard_commit_batch_size",
            "Writes per group commit",
            vec![
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
            ],
        );
        let commit_seconds = hist(
            "switchboard_commit_seconds",
            "Time to commit one batch",
            vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5],
        );
        let queue_wait_seconds = hist(
            "switchboard_write_queue_wait_seconds",
            "Time a write waits in the persistence queue before its batch starts",
            vec![
                0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5,
            ],
        );
        Self {
            registry,
            queue_wait_seconds,
            commit_batches,
            committed_writes,
            batch_size,
            commit_seconds,
            deliveries,
            sessions,
            overflows,
            webhooks_delivered,
            webhooks_failed,
            webhooks_dropped,
            stale_seq_refusals,
            rebased_writes,
        }
    }

    pub fn observe_batch(&self, writes: usize, took: Duration) {
        self.commit_batches.inc();
        self.committed_writes.inc_by(writes as u64);
        self.batch_size.observe(writes as f64);
        self.commit_seconds.observe(took.as_secs_f64());
    }

    pub fn observe_queue_wait(&self, waited: Duration) {
        self.queue_wait_seconds.observe(waited.as_secs_f64());
    }

    pub fn render(&self) -> String {
        let encoder = prometheus::TextEncoder::new();
        encoder
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Metric names and help texts above are constants, so construction cannot fail.
fn unreachable_metric<T>() -> T {
    panic!("invalid metric definition")
}
