//! The figures of a run: a table on stdout and a JSON file under `bench/results/`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::poster::PostResult;
use crate::server::ProcSample;
use crate::subscriber::SubResult;
use crate::QuickArgs;

/// A span of the run clock, in ns since the start.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub start_ns: u64,
    pub end_ns: u64,
}

impl Window {
    pub fn new(start_ns: u64, end_ns: u64) -> Self {
        Self {
            start_ns,
            end_ns: end_ns.max(start_ns),
        }
    }
    pub fn secs(&self) -> f64 {
        (self.end_ns - self.start_ns) as f64 / 1e9
    }
    /// `count` per second over this window (0 for an empty window).
    pub fn rate(&self, count: u64) -> f64 {
        let s = self.secs();
        if s > 0.0 {
            count as f64 / s
        } else {
            0.0
        }
    }
}

/// Delivery and posting checks, summed over all posters and subscribers.
#[derive(Default, Debug)]
pub struct Correctness {
    pub expected_deliveries: u64,
    pub message_frames: u64,
    pub other_frames: u64,
    pub missing: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub seq_gaps: u64,
    pub cursor_regressions: u64,
    pub wrong_channel: u64,
    pub foreign: u64,
    pub unparsable: u64,
    /// Delivered although the post was never acknowledged (e.g. a client-side timeout).
    pub unacked_delivered: u64,
    pub subscribers_complete: u64,
    pub subscriber_errors: Vec<String>,
    pub overflow_closes: u64,
    pub reconnects: u64,
    pub post_failed: u64,
    pub post_retries: u64,
    pub post_transport_errors: u64,
    pub nonce_replays: u64,
    pub post_statuses: BTreeMap<u16, u64>,
    pub post_first_errors: Vec<String>,
    pub retry_reasons: BTreeMap<String, u64>,
    pub timed_out: bool,
}

impl Correctness {
    pub fn add_post(&mut self, p: &PostResult) {
        self.post_failed += p.failed;
        self.post_retries += p.retries;
        self.post_transport_errors += p.transport_errors;
        self.nonce_replays += p.nonce_replays;
        for (s, n) in &p.status_counts {
            *self.post_statuses.entry(*s).or_insert(0) += n;
        }
        for (r, n) in &p.retry_reasons {
            *self.retry_reasons.entry(r.clone()).or_insert(0) += n;
        }
        if let Some(e) = &p.first_error {
            if self.post_first_errors.len() < 5 {
                self.post_first_errors.push(e.clone());
            }
        }
    }

    pub fn add_sub(&mut self, s: &SubResult, acked: &[bool]) {
        self.message_frames += s.message_frames;
        self.other_frames += s.other_frames;
        self.out_of_order += s.out_of_order;
        self.seq_gaps += s.seq_gaps;
        self.cursor_regressions += s.cursor_regressions;
        self.wrong_channel += s.wrong_channel;
        self.foreign += s.foreign;
        self.unparsable += s.unparsable;
        self.overflow_closes += u64::from(s.overflow_closes);
        self.reconnects += u64::from(s.reconnects);
        let mut missing = 0;
        for (slot, count) in s.received.iter().enumerate() {
            let count = u64::from(*count);
            if acked.get(slot).copied().unwrap_or(false) {
                if count == 0 {
                    missing += 1;
                } else {
                    self.duplicates += count - 1;
                }
            } else if count > 0 {
                self.unacked_delivered += 1;
                self.duplicates += count - 1;
            }
        }
        self.missing += missing;
        if missing == 0 && s.error.is_none() {
            self.subscribers_complete += 1;
        }
        if let Some(e) = &s.error {
            self.subscriber_errors.push(e.clone());
        }
    }

    /// Everything that makes the exit code non-zero, as sentences.
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut check = |n: u64, what: &str| {
            if n > 0 {
                out.push(format!("{n} {what}"));
            }
        };
        check(self.missing, "missing deliveries");
        check(self.duplicates, "duplicate deliveries");
        check(self.out_of_order, "out-of-order seqs");
        check(self.seq_gaps, "seq gaps");
        check(self.cursor_regressions, "cursor regressions");
        check(self.wrong_channel, "messages on the wrong channel");
        check(self.unparsable, "unparsable frames");
        check(self.post_failed, "failed posts");
        check(
            self.subscriber_errors.len() as u64,
            "subscriber socket errors",
        );
        if self.timed_out {
            out.push("the run hit --timeout".into());
        }
        out
    }
}

pub struct Report {
    pub args: QuickArgs,
    pub base: String,
    pub server_pid: Option<u32>,
    pub server_started_here: bool,
    pub acked: u64,
    pub post_window: Window,
    pub delivery_window: Window,
    pub first_delivery_after_ms: Option<f64>,
    pub run_window: Window,
    pub connect_secs: f64,
    /// Post-to-receive latency, µs.
    pub latency: Histogram<u64>,
    /// HTTP round trip of posts, µs.
    pub rtt: Histogram<u64>,
    pub correctness: Correctness,
    pub server_before: Option<ProcSample>,
    pub server_after_posting: Option<ProcSample>,
    pub server_after: Option<ProcSample>,
    pub client_before: Option<ProcSample>,
    pub client_after: Option<ProcSample>,
    pub metrics_before: BTreeMap<String, f64>,
    pub metrics_after: BTreeMap<String, f64>,
    pub server_log_problems: u64,
    pub server_log_sample: Vec<String>,
    /// Post-to-receive latency per second since the first post (`--plot`).
    pub timeline: Option<Vec<crate::plot::Point>>,
}

/// Microseconds as milliseconds.
pub fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

pub fn cpu_delta(a: Option<ProcSample>, b: Option<ProcSample>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(b.cpu_secs - a.cpu_secs),
        _ => None,
    }
}

/// A figure with `digits` decimals, or `n/a`.
pub fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.digits$}"))
}

/// Quantiles of a µs histogram, in ms.
pub fn hist_json(h: &Histogram<u64>) -> Value {
    json!({
        "count": h.len(),
        "p50_ms": ms(h.value_at_quantile(0.5)),
        "p90_ms": ms(h.value_at_quantile(0.9)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "p999_ms": ms(h.value_at_quantile(0.999)),
        "max_ms": ms(h.max()),
        "mean_ms": h.mean() / 1000.0,
    })
}

pub fn proc_json(s: Option<ProcSample>) -> Value {
    s.map_or(
        Value::Null,
        |s| json!({"cpu_secs": s.cpu_secs, "rss_kb": s.rss_kb, "peak_rss_kb": s.hwm_kb, "threads": s.threads}),
    )
}

/// Writes `<stem>-<UTC date-time>.json` into `dir` (created if needed).
pub fn write_results(dir: &Path, stem: &str, results: &Value) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let stem = format!("{stem}-{}", chrono::Utc::now().format("%Y%m%dT%H%M%SZ"));
    // Two runs in one second keep both files.
    let mut path = dir.join(format!("{stem}.json"));
    let mut n = 1;
    while path.exists() {
        path = dir.join(format!("{stem}-{n}.json"));
        n += 1;
    }
    let text = serde_json::to_string_pretty(results).map_err(|e| e.to_string())?;
    std::fs::write(&path, text + "\n").map_err(|e| format!("write {}: {e}", path.display()))?;
    Ok(path)
}

impl Report {
    pub fn messages_per_sec(&self) -> f64 {
        self.post_window.rate(self.acked)
    }
    pub fn deliveries_per_sec(&self) -> f64 {
        self.delivery_window.rate(self.correctness.message_frames)
    }
    pub fn server_cpu(&self) -> Option<f64> {
        cpu_delta(self.server_before, self.server_after)
    }
    pub fn deliveries_per_cpu_sec(&self) -> Option<f64> {
        self.server_cpu()
            .filter(|c| *c > 0.0)
            .map(|c| self.correctness.message_frames as f64 / c)
    }
    fn metric_delta(&self, name: &str) -> Option<f64> {
        metric_delta(&self.metrics_before, &self.metrics_after, name)
    }
    pub fn passed(&self) -> bool {
        self.correctness.failures().is_empty()
            && self.correctness.message_frames >= self.correctness.expected_deliveries
    }

    fn pct(&self, h: &Histogram<u64>, q: f64) -> f64 {
        ms(h.value_at_quantile(q))
    }

    pub fn print(&self) {
        let c = &self.correctness;
        let a = &self.args;
        let l = &self.latency;
        println!();
        println!("switchboard-bench quick");
        println!("======================");
        let row = |k: &str, v: String| println!("{k:<34} {v}");
        row(
            "scenario",
            format!(
                "{} messages, {} posters, {} subscribers, {} channels",
                a.messages, a.posters, a.subscribers, a.channels
            ),
        );
        row(
            "server",
            format!(
                "{} (pid {}{})",
                self.base,
                self.server_pid
                    .map_or_else(|| "?".into(), |p| p.to_string()),
                if self.server_started_here {
                    ", started by the bench"
                } else {
                    ""
                }
            ),
        );
        row(
            "subscribers connected in",
            format!("{:.2} s", self.connect_secs),
        );
        println!("-- throughput");
        row(
            "posts acknowledged",
            format!(
                "{} / {} in {:.2} s",
                self.acked,
                a.messages,
                self.post_window.secs()
            ),
        );
        row("messages/s", format!("{:.0}", self.messages_per_sec()));
        row(
            "deliveries (message.created)",
            format!(
                "{} / {} in {:.2} s",
                c.message_frames,
                c.expected_deliveries,
                self.delivery_window.secs()
            ),
        );
        row("deliveries/s", format!("{:.0}", self.deliveries_per_sec()));
        println!("-- post-to-receive latency (ms)");
        row(
            "p50 / p90 / p99 / p99.9 / max",
            format!(
                "{:.2} / {:.2} / {:.2} / {:.2} / {:.2}",
                self.pct(l, 0.50),
                self.pct(l, 0.90),
                self.pct(l, 0.99),
                self.pct(l, 0.999),
                ms(l.max())
            ),
        );
        row(
            "first delivery after first post",
            opt(self.first_delivery_after_ms, 2) + " ms",
        );
        row(
            "HTTP post round trip p50/p99/max",
            format!(
                "{:.2} / {:.2} / {:.2} ms",
                self.pct(&self.rtt, 0.5),
                self.pct(&self.rtt, 0.99),
                ms(self.rtt.max())
            ),
        );
        println!("-- server process");
        row(
            "CPU s (posting / posting+drain)",
            format!(
                "{} / {}",
                opt(cpu_delta(self.server_before, self.server_after_posting), 2),
                opt(self.server_cpu(), 2)
            ),
        );
        row(
            "deliveries per server CPU s",
            opt(self.deliveries_per_cpu_sec(), 0),
        );
        row(
            "RSS before / after / peak (MiB)",
            format!(
                "{} / {} / {}",
                opt(self.server_before.map(|s| s.rss_kb as f64 / 1024.0), 1),
                opt(self.server_after.map(|s| s.rss_kb as f64 / 1024.0), 1),
                opt(self.server_after.map(|s| s.hwm_kb as f64 / 1024.0), 1),
            ),
        );
        row(
            "group commits / writes",
            format!(
                "{} / {}",
                opt(self.metric_delta("switchboard_commit_batches_total"), 0),
                opt(self.metric_delta("switchboard_committed_writes_total"), 0)
            ),
        );
        row(
            "overflow closes (server metric)",
            opt(self.metric_delta("switchboard_session_overflows_total"), 0),
        );
        row(
            "server WARN/ERROR log lines",
            log_lines_cell(self.server_started_here, self.server_log_problems),
        );
        row(
            "bench client CPU s",
            opt(cpu_delta(self.client_before, self.client_after), 2),
        );
        println!("-- correctness");
        row(
            "subscribers complete",
            format!("{} / {}", c.subscribers_complete, a.subscribers),
        );
        row(
            "missing / duplicate",
            format!("{} / {}", c.missing, c.duplicates),
        );
        row(
            "out-of-order / seq gaps / cursor",
            format!(
                "{} / {} / {}",
                c.out_of_order, c.seq_gaps, c.cursor_regressions
            ),
        );
        row(
            "wrong channel / foreign / other",
            format!("{} / {} / {}", c.wrong_channel, c.foreign, c.other_frames),
        );
        row(
            "post statuses",
            format!(
                "{:?} (retries {}, transport errors {}, failed {})",
                c.post_statuses, c.post_retries, c.post_transport_errors, c.post_failed
            ),
        );
        row(
            "1013 overflow closes / reconnects",
            format!("{} / {}", c.overflow_closes, c.reconnects),
        );
        for (r, n) in &c.retry_reasons {
            println!("  retried {n}x: {r}");
        }
        for e in &c.post_first_errors {
            println!("  post error: {e}");
        }
        for e in c.subscriber_errors.iter().take(5) {
            println!("  subscriber error: {e}");
        }
        for l in &self.server_log_sample {
            println!("  server log: {l}");
        }
        let failures = c.failures();
        let short = c.message_frames < c.expected_deliveries;
        if failures.is_empty() && !short {
            println!("RESULT: PASS");
        } else {
            println!();
            println!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
            println!("!!! RESULT: FAIL");
            for f in &failures {
                println!("!!!   {f}");
            }
            if short {
                println!(
                    "!!!   {} of {} expected deliveries received",
                    c.message_frames, c.expected_deliveries
                );
            }
            println!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
        }
        if c.overflow_closes > 0 {
            println!(
                "WARNING: {} subscriber sockets were closed with 1013 (outbound queue overflow) and reconnected with their cursor",
                c.overflow_closes
            );
        }
    }

    pub fn to_json(&self) -> Value {
        let c = &self.correctness;
        let a = &self.args;
        let mut v = json!({
            "scenario": "quick",
            "finished_at": chrono::Utc::now().to_rfc3339(),
            "passed": self.passed(),
            "failures": c.failures(),
            "config": {
                "messages": a.messages,
                "posters": a.posters,
                "subscribers": a.subscribers,
                "channels": a.channels,
                "timeout_secs": a.timeout,
                "client_threads": a.target.threads,
                "server": self.base,
                "server_started_by_bench": self.server_started_here,
            },
            "throughput": {
                "posts_acknowledged": self.acked,
                "posting_secs": self.post_window.secs(),
                "messages_per_sec": self.messages_per_sec(),
                "deliveries": c.message_frames,
                "expected_deliveries": c.expected_deliveries,
                "delivery_secs": self.delivery_window.secs(),
                "deliveries_per_sec": self.deliveries_per_sec(),
                "first_delivery_after_ms": self.first_delivery_after_ms,
                "subscribers_connect_secs": self.connect_secs,
                "run_secs_from_first_post": self.run_window.secs(),
            },
            "latency_post_to_receive": hist_json(&self.latency),
            "http_post_round_trip": hist_json(&self.rtt),
            "server": {
                "pid": self.server_pid,
                "before": proc_json(self.server_before),
                "after_posting": proc_json(self.server_after_posting),
                "after": proc_json(self.server_after),
                "cpu_secs": self.server_cpu(),
                "deliveries_per_cpu_sec": self.deliveries_per_cpu_sec(),
                "log_warn_error_lines": self.server_log_problems,
                "metrics_delta": {
                    "commit_batches": self.metric_delta("switchboard_commit_batches_total"),
                    "committed_writes": self.metric_delta("switchboard_committed_writes_total"),
                    "deliveries_queued": self.metric_delta("switchboard_deliveries_total"),
                    "session_overflows": self.metric_delta("switchboard_session_overflows_total"),
                },
            },
            "client": {
                "cpu_secs": cpu_delta(self.client_before, self.client_after),
                "before": proc_json(self.client_before),
                "after": proc_json(self.client_after),
            },
            "correctness": {
                "missing": c.missing,
                "duplicates": c.duplicates,
                "out_of_order": c.out_of_order,
                "seq_gaps": c.seq_gaps,
                "cursor_regressions": c.cursor_regressions,
                "wrong_channel": c.wrong_channel,
                "foreign": c.foreign,
                "unparsable": c.unparsable,
                "other_frames": c.other_frames,
                "unacked_delivered": c.unacked_delivered,
                "subscribers_complete": c.subscribers_complete,
                "subscriber_errors": c.subscriber_errors,
                "overflow_closes": c.overflow_closes,
                "reconnects": c.reconnects,
                "post_statuses": c.post_statuses.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
                "post_retries": c.post_retries,
                "post_retry_reasons": c.retry_reasons,
                "post_transport_errors": c.post_transport_errors,
                "post_failed": c.post_failed,
                "nonce_replays": c.nonce_replays,
                "post_errors": c.post_first_errors,
                "timed_out": c.timed_out,
            },
        });
        if let (Some(points), Some(o)) = (&self.timeline, v.as_object_mut()) {
            o.insert("timeline".into(), crate::plot::timeline_json(points));
        }
        v
    }
}

/// A counter's (or histogram part's) growth between two scrapes of the server's metrics;
/// `None` when the later scrape lacks it (a series first seen later counts from 0).
pub fn metric_delta(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    name: &str,
) -> Option<f64> {
    Some(after.get(name)? - before.get(name).copied().unwrap_or(0.0))
}

/// How long writes waited for the server's writer over a run, from two scrapes of its
/// `switchboard_write_queue_wait_seconds` histogram: (mean in ms, share that waited > 5 ms).
pub fn write_queue_wait(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> Option<(f64, f64)> {
    const NAME: &str = "switchboard_write_queue_wait_seconds";
    let delta = |key: String| metric_delta(before, after, &key);
    let count = delta(format!("{NAME}_count")).filter(|c| *c > 0.0)?;
    let sum = delta(format!("{NAME}_sum"))?;
    let within_5ms = delta(format!("{NAME}_bucket{{le=\"0.005\"}}"))?;
    Some((sum / count * 1000.0, 1.0 - within_5ms / count))
}

/// The mean time one group commit took over a run (BEGIN to COMMIT, the sync included), in
/// ms, from two scrapes of the server's `switchboard_commit_seconds` histogram.
pub fn mean_commit_ms(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> Option<f64> {
    const NAME: &str = "switchboard_commit_seconds";
    let delta = |key: String| metric_delta(before, after, &key);
    let count = delta(format!("{NAME}_count")).filter(|c| *c > 0.0)?;
    Some(delta(format!("{NAME}_sum"))? / count * 1000.0)
}

/// The server's WARN/ERROR line count; known only for a server this run started.
pub fn log_lines_cell(started_here: bool, problems: u64) -> String {
    if started_here {
        problems.to_string()
    } else {
        "n/a".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_commit_time_comes_from_the_histograms_deltas() {
        let before = BTreeMap::from([
            ("switchboard_commit_seconds_sum".to_string(), 1.0),
            ("switchboard_commit_seconds_count".to_string(), 1000.0),
        ]);
        let after = BTreeMap::from([
            ("switchboard_commit_seconds_sum".to_string(), 3.0),
            ("switchboard_commit_seconds_count".to_string(), 5000.0),
        ]);
        let mean = mean_commit_ms(&before, &after).expect("commits happened");
        assert!((mean - 0.5).abs() < 1e-9, "{mean}");
        assert_eq!(mean_commit_ms(&after, &after), None, "no commits, no mean");
        assert_eq!(mean_commit_ms(&before, &BTreeMap::new()), None);
    }

    #[test]
    fn write_queue_wait_comes_from_the_histograms_deltas() {
        let scrape = |count: f64, sum: f64, within: f64| {
            BTreeMap::from([
                (
                    "switchboard_write_queue_wait_seconds_count".to_string(),
                    count,
                ),
                ("switchboard_write_queue_wait_seconds_sum".to_string(), sum),
                (
                    r#"switchboard_write_queue_wait_seconds_bucket{le="0.005"}"#.to_string(),
                    within,
                ),
            ])
        };
        let before = scrape(100.0, 0.5, 100.0);
        let after = scrape(1100.0, 1.5, 1090.0);
        let (mean_ms, over) = write_queue_wait(&before, &after).expect("summary");
        assert!((mean_ms - 1.0).abs() < 1e-9, "{mean_ms}");
        assert!((over - 0.01).abs() < 1e-9, "{over}");
        // No writes in between, or a server without the metric: nothing to say.
        assert_eq!(write_queue_wait(&after, &after), None);
        assert_eq!(write_queue_wait(&BTreeMap::new(), &BTreeMap::new()), None);
    }
}
