//! The figures of an `ai-stream` run: a table on stdout and a JSON section.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use super::receiver::ReceiverTally;
use super::streamer::StreamerTally;
use super::AiStreamParams;
use crate::report::{cpu_delta, hist_json, ms, opt, proc_json, Window};
use crate::server::ProcSample;
use crate::Target;

/// Subscribers with a problem listed one by one in the results (the rest are summed).
const LISTED_SUBSCRIBERS: usize = 20;
/// Error sentences kept in the results.
const KEPT_ERRORS: usize = 5;

/// Server, client and Prometheus readings around the run.
#[derive(Default)]
pub struct Samples {
    pub server_before: Option<ProcSample>,
    pub server_after_streaming: Option<ProcSample>,
    pub server_after: Option<ProcSample>,
    pub client_before: Option<ProcSample>,
    pub client_after: Option<ProcSample>,
    pub metrics_before: BTreeMap<String, f64>,
    pub metrics_after: BTreeMap<String, f64>,
}

/// What the run hands over to be reported.
pub struct Inputs<'a> {
    pub params: AiStreamParams,
    pub target: &'a Target,
    pub connect_secs: f64,
    pub run_window: Window,
    pub start_ns: u64,
    pub streamed: Vec<StreamerTally>,
    pub received: Vec<ReceiverTally>,
    pub samples: Samples,
    pub timed_out: bool,
    pub server_log_problems: u64,
    pub server_log_sample: Vec<String>,
}

/// The appending side, summed over the streams.
#[derive(Default)]
pub struct Appends {
    pub scheduled: u64,
    pub sent: u64,
    pub acked_fragments: u64,
    pub closes_acked: u64,
    pub messages_opened: u64,
    /// Non-200 answers by status.
    pub refused: BTreeMap<u16, u64>,
    pub transport_errors: u64,
    pub unanswered: u64,
    pub first_errors: Vec<String>,
    /// Streams that stopped early, and why.
    pub stream_errors: Vec<String>,
}

impl Appends {
    pub fn durable(&self) -> u64 {
        self.acked_fragments + self.closes_acked
    }
    pub fn failed(&self) -> u64 {
        self.refused.values().sum::<u64>() + self.transport_errors + self.unanswered
    }
    /// Ticks that sent nothing: every slot was busy, or the stream stopped early.
    pub fn behind(&self) -> u64 {
        self.scheduled.saturating_sub(self.sent)
    }

    fn add(&mut self, s: &StreamerTally, stream: usize) {
        self.scheduled += s.acked.len() as u64;
        self.sent += s.sent;
        self.acked_fragments += s.acked_fragments;
        self.closes_acked += s.closes_acked;
        self.messages_opened += s.messages_opened;
        for (status, n) in &s.refused {
            *self.refused.entry(*status).or_insert(0) += n;
        }
        self.transport_errors += s.transport_errors;
        self.unanswered += s.unanswered;
        if let Some(e) = &s.first_error {
            keep(&mut self.first_errors, || format!("stream {stream}: {e}"));
        }
        if let Some(e) = &s.fatal {
            self.stream_errors.push(format!("stream {stream}: {e}"));
        }
    }
}

fn keep(errors: &mut Vec<String>, error: impl FnOnce() -> String) {
    if errors.len() < KEPT_ERRORS {
        errors.push(error());
    }
}

/// One subscriber's delivery problems.
#[derive(Default, Clone, Copy)]
pub struct Problems {
    /// Acknowledged appends (fragments and closes) it never got.
    pub lost: u64,
    pub duplicates: u64,
    /// Delivered although never acknowledged (a refused or unanswered append that committed).
    pub unacked_delivered: u64,
    pub out_of_order: u64,
    pub seq_gaps: u64,
    pub length_breaks: u64,
}

impl Problems {
    /// Compares what a subscriber got with what its stream had acknowledged.
    fn of(r: &ReceiverTally, s: &StreamerTally) -> Self {
        let mut p = Self {
            lost: s.closes_acked.saturating_sub(r.closes),
            duplicates: r.closes.saturating_sub(s.closes_acked),
            out_of_order: r.out_of_order,
            seq_gaps: r.seq_gaps,
            length_breaks: r.length_breaks,
            ..Self::default()
        };
        for (count, acked) in r.received.iter().zip(&s.acked) {
            let count = u64::from(*count);
            match (count, *acked) {
                (0, true) => p.lost += 1,
                (0, false) => {}
                (_, acked) => {
                    p.duplicates += count - 1;
                    p.unacked_delivered += u64::from(!acked);
                }
            }
        }
        p
    }

    fn is_clean(&self) -> bool {
        self.lost + self.duplicates + self.out_of_order + self.seq_gaps + self.length_breaks == 0
    }

    fn add(&mut self, o: &Self) {
        self.lost += o.lost;
        self.duplicates += o.duplicates;
        self.unacked_delivered += o.unacked_delivered;
        self.out_of_order += o.out_of_order;
        self.seq_gaps += o.seq_gaps;
        self.length_breaks += o.length_breaks;
    }

    fn to_json(self) -> Value {
        json!({
            "lost": self.lost,
            "duplicates": self.duplicates,
            "unacked_delivered": self.unacked_delivered,
            "out_of_order": self.out_of_order,
            "seq_gaps": self.seq_gaps,
            "length_breaks": self.length_breaks,
        })
    }
}

/// The receiving side, summed over the subscribers.
#[derive(Default)]
pub struct Deliveries {
    /// Acknowledged appends × the subscribers of their stream.
    pub expected: u64,
    /// `message.appended` frames received.
    pub frames: u64,
    pub problems: Problems,
    pub cursor_regressions: u64,
    pub foreign: u64,
    pub unparsable: u64,
    pub other_frames: u64,
    pub compacted_frames: u64,
    pub recovered_by_replay: u64,
    pub overflow_closes: u64,
    pub reconnects: u64,
    pub subscribers: u64,
    pub clean_subscribers: u64,
    /// Subscribers with a problem: (stream, subscriber, problems), the first few.
    pub listed: Vec<(usize, usize, Problems)>,
    pub socket_errors: Vec<String>,
    pub last_delivery_ns: u64,
}

impl Deliveries {
    fn add(&mut self, r: &ReceiverTally, stream: &StreamerTally) {
        let p = Problems::of(r, stream);
        self.expected += stream.acknowledged();
        self.frames += r.appended_frames;
        self.problems.add(&p);
        self.cursor_regressions += r.cursor_regressions;
        self.foreign += r.foreign;
        self.unparsable += r.unparsable;
        self.other_frames += r.other_frames;
        self.compacted_frames += r.compacted_frames;
        self.recovered_by_replay += r.recovered_by_replay;
        self.overflow_closes += u64::from(r.overflow_closes);
        self.reconnects += u64::from(r.reconnects);
        self.subscribers += 1;
        self.last_delivery_ns = self.last_delivery_ns.max(r.last_delivery_ns);
        if let Some(e) = &r.error {
            self.socket_errors.push(format!(
                "stream {} subscriber {}: {e}",
                r.stream, r.subscriber
            ));
        }
        if p.is_clean() && r.error.is_none() {
            self.clean_subscribers += 1;
        } else if self.listed.len() < LISTED_SUBSCRIBERS {
            self.listed.push((r.stream, r.subscriber, p));
        }
    }
}

pub struct AiStreamReport {
    pub params: AiStreamParams,
    pub base: String,
    pub server_pid: Option<u32>,
    pub server_started_here: bool,
    pub connect_secs: f64,
    pub appends: Appends,
    /// From the first tick to the last acknowledged append.
    pub append_window: Window,
    /// From the first tick to the last delivery.
    pub delivery_window: Window,
    pub run_window: Window,
    /// Append-to-receive latency, µs.
    pub latency: Histogram<u64>,
    /// Append round trip (HTTP, until durable), µs.
    pub rtt: Histogram<u64>,
    /// How late appends left after their tick, µs.
    pub send_lag: Histogram<u64>,
    pub deliveries: Deliveries,
    pub samples: Samples,
    pub timed_out: bool,
    pub server_log_problems: u64,
    pub server_log_sample: Vec<String>,
    /// Append-to-receive latency per second since the first tick (`--plot`).
    pub timeline: Option<Vec<crate::plot::Point>>,
}

fn histogram() -> Result<Histogram<u64>, String> {
    Histogram::new_with_bounds(1, 600_000_000, 3).map_err(|e| format!("histogram: {e}"))
}

fn merge(into: &mut Histogram<u64>, from: &Histogram<u64>) -> Result<(), String> {
    into.add(from).map_err(|e| format!("merge histogram: {e}"))
}

pub fn build(i: Inputs<'_>) -> Result<AiStreamReport, String> {
    let (mut rtt, mut send_lag, mut latency) = (histogram()?, histogram()?, histogram()?);
    let mut appends = Appends::default();
    let mut last_ack_ns = i.start_ns;
    for (stream, s) in i.streamed.iter().enumerate() {
        appends.add(s, stream);
        merge(&mut rtt, &s.rtt)?;
        merge(&mut send_lag, &s.send_lag)?;
        last_ack_ns = last_ack_ns.max(s.last_ack_ns);
    }
    let mut deliveries = Deliveries::default();
    for r in &i.received {
        let stream = i
            .streamed
            .get(r.stream)
            .ok_or_else(|| format!("subscriber of unknown stream {}", r.stream))?;
        deliveries.add(r, stream);
        merge(&mut latency, &r.latency)?;
    }
    Ok(AiStreamReport {
        params: i.params,
        base: i.target.base.clone(),
        server_pid: i.target.server_pid,
        server_started_here: i.target.child.is_some(),
        connect_secs: i.connect_secs,
        append_window: Window::new(i.start_ns, last_ack_ns),
        delivery_window: Window::new(i.start_ns, deliveries.last_delivery_ns),
        run_window: i.run_window,
        appends,
        latency,
        rtt,
        send_lag,
        deliveries,
        samples: i.samples,
        timed_out: i.timed_out,
        server_log_problems: i.server_log_problems,
        server_log_sample: i.server_log_sample,
        timeline: None,
    })
}

fn row(key: &str, value: String) {
    println!("{key:<40} {value}");
}

fn quantiles(h: &Histogram<u64>) -> String {
    format!(
        "{:.2} / {:.2} / {:.2} ms",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.max())
    )
}

fn mib(s: Option<ProcSample>, peak: bool) -> Option<f64> {
    s.map(|s| if peak { s.hwm_kb } else { s.rss_kb } as f64 / 1024.0)
}

impl AiStreamReport {
    /// Acknowledged (200) appends per second: fragments and closes.
    pub fn durable_appends_per_sec(&self) -> f64 {
        self.append_window.rate(self.appends.durable())
    }

    pub fn offered_appends_per_sec(&self) -> u64 {
        self.params.streams as u64 * u64::from(self.params.rate)
    }

    pub fn deliveries_per_sec(&self) -> f64 {
        self.delivery_window.rate(self.deliveries.frames)
    }

    pub fn server_cpu(&self) -> Option<f64> {
        cpu_delta(self.samples.server_before, self.samples.server_after)
    }

    fn write_queue_wait(&self) -> Option<(f64, f64)> {
        crate::report::write_queue_wait(&self.samples.metrics_before, &self.samples.metrics_after)
    }

    fn mean_commit_ms(&self) -> Option<f64> {
        crate::report::mean_commit_ms(&self.samples.metrics_before, &self.samples.metrics_after)
    }

    fn metric_delta(&self, name: &str) -> Option<f64> {
        let s = &self.samples;
        crate::report::metric_delta(&s.metrics_before, &s.metrics_after, name)
    }

    /// Everything that makes the run fail, as sentences.
    pub fn failures(&self) -> Vec<String> {
        let d = &self.deliveries;
        let p = &d.problems;
        let mut out = Vec::new();
        let mut check = |n: u64, what: &str| {
            if n > 0 {
                out.push(format!("{n} {what}"));
            }
        };
        check(p.lost, "lost deliveries");
        check(p.duplicates, "duplicate deliveries");
        check(p.out_of_order, "out-of-order seqs");
        check(p.seq_gaps, "seq gaps");
        check(p.length_breaks, "length mismatches");
        check(d.cursor_regressions, "cursor regressions");
        check(d.unparsable, "unparsable frames");
        check(self.appends.failed(), "failed appends");
        check(d.socket_errors.len() as u64, "subscriber socket errors");
        check(
            self.appends.stream_errors.len() as u64,
            "streams stopped early",
        );
        if self.appends.durable() == 0 {
            out.push("no append was acknowledged".into());
        }
        if self.timed_out {
            out.push("the run hit --timeout".into());
        }
        out
    }

    pub fn passed(&self) -> bool {
        self.failures().is_empty()
    }

    pub fn print(&self) {
        let (d, p) = (&self.deliveries, &self.params);
        println!();
        println!("switchboard-bench ai-stream");
        println!("===========================");
        row(
            "scenario",
            format!(
                "{} streams x {} appends/s for {} s, {} subscribers each (at most {} in flight), {} face",
                p.streams, p.rate, p.duration, p.subscribers, p.max_in_flight, p.face.as_str()
            ),
        );
        row("server", self.describe_server());
        row(
            "subscribers connected in",
            format!("{:.2} s", self.connect_secs),
        );
        self.print_appends();
        println!("-- deliveries (message.appended)");
        row(
            "deliveries",
            format!(
                "{} / {} expected in {:.2} s",
                d.frames,
                d.expected,
                self.delivery_window.secs()
            ),
        );
        row("deliveries/s", format!("{:.0}", self.deliveries_per_sec()));
        println!("-- append-to-receive latency (ms)");
        let l = &self.latency;
        row(
            "p50 / p90 / p99 / p99.9 / max",
            format!(
                "{:.2} / {:.2} / {:.2} / {:.2} / {:.2}",
                ms(l.value_at_quantile(0.5)),
                ms(l.value_at_quantile(0.9)),
                ms(l.value_at_quantile(0.99)),
                ms(l.value_at_quantile(0.999)),
                ms(l.max())
            ),
        );
        self.print_processes();
        self.print_correctness();
        self.print_verdict();
    }

    fn describe_server(&self) -> String {
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
        )
    }

    fn print_appends(&self) {
        let a = &self.appends;
        println!("-- appends");
        row(
            "scheduled / sent / behind",
            format!("{} / {} / {}", a.scheduled, a.sent, a.behind()),
        );
        row(
            "durable (200): fragments + closes",
            format!(
                "{} + {} in {:.2} s",
                a.acked_fragments,
                a.closes_acked,
                self.append_window.secs()
            ),
        );
        row(
            "durable appends/s",
            format!(
                "{:.0} (offered {})",
                self.durable_appends_per_sec(),
                self.offered_appends_per_sec()
            ),
        );
        row(
            "failed: by status / transport / no answer",
            format!(
                "{:?} / {} / {}",
                a.refused, a.transport_errors, a.unanswered
            ),
        );
        row("messages opened", a.messages_opened.to_string());
        row("append round trip p50/p99/max", quantiles(&self.rtt));
        row(
            "send lag behind tick p50/p99/max",
            quantiles(&self.send_lag),
        );
    }

    fn print_processes(&self) {
        let s = &self.samples;
        println!("-- server process");
        row(
            "CPU s (appending / appending+drain)",
            format!(
                "{} / {}",
                opt(cpu_delta(s.server_before, s.server_after_streaming), 2),
                opt(self.server_cpu(), 2)
            ),
        );
        row(
            "durable appends per server CPU s",
            opt(
                self.server_cpu()
                    .filter(|c| *c > 0.0)
                    .map(|c| self.appends.durable() as f64 / c),
                0,
            ),
        );
        row(
            "RSS before / after / peak (MiB)",
            format!(
                "{} / {} / {}",
                opt(mib(s.server_before, false), 1),
                opt(mib(s.server_after, false), 1),
                opt(mib(s.server_after, true), 1),
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
            "commit time mean (server metric)",
            opt(self.mean_commit_ms(), 3) + " ms",
        );
        row(
            "writer queue wait: mean / > 5 ms",
            match self.write_queue_wait() {
                Some((mean_ms, over)) => format!("{mean_ms:.2} ms / {:.2}%", over * 100.0),
                None => "-".to_string(),
            },
        );
        row(
            "server WARN/ERROR log lines",
            crate::report::log_lines_cell(self.server_started_here, self.server_log_problems),
        );
        row(
            "bench client CPU s",
            opt(cpu_delta(s.client_before, s.client_after), 2),
        );
    }

    fn print_correctness(&self) {
        let d = &self.deliveries;
        let p = &d.problems;
        println!("-- correctness");
        row(
            "subscribers clean",
            format!("{} / {}", d.clean_subscribers, d.subscribers),
        );
        row(
            "lost / duplicate / unacked delivered",
            format!("{} / {} / {}", p.lost, p.duplicates, p.unacked_delivered),
        );
        row(
            "out-of-order / seq gaps / length",
            format!("{} / {} / {}", p.out_of_order, p.seq_gaps, p.length_breaks),
        );
        row(
            "cursor / foreign / unparsable / other",
            format!(
                "{} / {} / {} / {}",
                d.cursor_regressions, d.foreign, d.unparsable, d.other_frames
            ),
        );
        row(
            "1013 closes / reconnects / compacted",
            format!(
                "{} / {} / {} ({} appends recovered)",
                d.overflow_closes, d.reconnects, d.compacted_frames, d.recovered_by_replay
            ),
        );
        for (stream, subscriber, p) in d.listed.iter().take(KEPT_ERRORS) {
            println!(
                "  stream {stream} subscriber {subscriber}: lost {}, duplicates {}, out of order {}, seq gaps {}, length {}",
                p.lost, p.duplicates, p.out_of_order, p.seq_gaps, p.length_breaks
            );
        }
        let a = &self.appends;
        let errors = a.first_errors.iter().map(|e| ("append error", e));
        let errors = errors.chain(a.stream_errors.iter().map(|e| ("stream error", e)));
        let errors = errors.chain(d.socket_errors.iter().map(|e| ("subscriber error", e)));
        for (what, e) in errors.take(3 * KEPT_ERRORS) {
            println!("  {what}: {e}");
        }
        for l in &self.server_log_sample {
            println!("  server log: {l}");
        }
    }

    fn print_verdict(&self) {
        let failures = self.failures();
        if failures.is_empty() {
            println!("RESULT: PASS");
        } else {
            println!();
            println!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
            println!("!!! RESULT: FAIL (ai-stream)");
            for f in &failures {
                println!("!!!   {f}");
            }
            println!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
        }
        let behind = self.appends.behind();
        if behind > 0 {
            println!(
                "WARNING: {behind} of {} scheduled appends were not sent: the stream already had --max-in-flight {} unanswered (the server or this client fell behind the offered {}/s)",
                self.appends.scheduled,
                self.params.max_in_flight,
                self.offered_appends_per_sec()
            );
        }
    }

    pub fn to_json(&self) -> Value {
        let (a, d, p, s) = (&self.appends, &self.deliveries, &self.params, &self.samples);
        let mut v = json!({
            "scenario": "ai-stream",
            "finished_at": chrono::Utc::now().to_rfc3339(),
            "passed": self.passed(),
            "failures": self.failures(),
            "config": {
                "face": p.face.as_str(),
                "streams": p.streams,
                "rate_per_stream": p.rate,
                "subscribers_per_stream": p.subscribers,
                "duration_secs": p.duration,
                "max_in_flight_per_stream": p.max_in_flight,
                "appends_per_message": p.appends_per_message,
                "full_answers": p.full_answers,
                "timeout_secs": p.timeout,
                "server": self.base,
                "server_started_by_bench": self.server_started_here,
            },
            "appends": {
                "offered_per_sec": self.offered_appends_per_sec(),
                "scheduled": a.scheduled,
                "sent": a.sent,
                "behind": a.behind(),
                "durable": a.durable(),
                "durable_fragments": a.acked_fragments,
                "durable_closes": a.closes_acked,
                "durable_per_sec": self.durable_appends_per_sec(),
                "window_secs": self.append_window.secs(),
                "failed": a.failed(),
                "failed_by_status": a.refused.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
                "transport_errors": a.transport_errors,
                "unanswered": a.unanswered,
                "messages_opened": a.messages_opened,
                "errors": a.first_errors,
                "stream_errors": a.stream_errors,
            },
            "deliveries": {
                "frames": d.frames,
                "expected": d.expected,
                "per_sec": self.deliveries_per_sec(),
                "window_secs": self.delivery_window.secs(),
                "run_secs_from_first_tick": self.run_window.secs(),
                "subscribers_connect_secs": self.connect_secs,
            },
            "latency_append_to_receive": hist_json(&self.latency),
            "append_round_trip": hist_json(&self.rtt),
            "send_lag_behind_schedule": hist_json(&self.send_lag),
            "server": {
                "pid": self.server_pid,
                "before": proc_json(s.server_before),
                "after_appending": proc_json(s.server_after_streaming),
                "after": proc_json(s.server_after),
                "cpu_secs": self.server_cpu(),
                "log_warn_error_lines": self.server_log_problems,
                "metrics_delta": {
                    "commit_batches": self.metric_delta("switchboard_commit_batches_total"),
                    "committed_writes": self.metric_delta("switchboard_committed_writes_total"),
                    "deliveries_queued": self.metric_delta("switchboard_deliveries_total"),
                    "session_overflows": self.metric_delta("switchboard_session_overflows_total"),
                    "commit_mean_ms": self.mean_commit_ms(),
                    "write_queue_wait_mean_ms": self.write_queue_wait().map(|w| w.0),
                    "writes_waiting_over_5ms_share": self.write_queue_wait().map(|w| w.1),
                },
            },
            "client": {
                "cpu_secs": cpu_delta(s.client_before, s.client_after),
            },
            "correctness": self.correctness_json(),
        });
        if let (Some(points), Some(o)) = (&self.timeline, v.as_object_mut()) {
            o.insert("timeline".into(), crate::plot::timeline_json(points));
        }
        v
    }

    fn correctness_json(&self) -> Value {
        let d = &self.deliveries;
        let mut totals = d.problems.to_json();
        let listed: Vec<Value> = d
            .listed
            .iter()
            .map(|(stream, subscriber, p)| {
                let mut v = p.to_json();
                v["stream"] = json!(stream);
                v["subscriber"] = json!(subscriber);
                v
            })
            .collect();
        let extra = json!({
            "subscribers": d.subscribers,
            "clean_subscribers": d.clean_subscribers,
            "subscribers_with_problems": listed,
            "cursor_regressions": d.cursor_regressions,
            "foreign": d.foreign,
            "unparsable": d.unparsable,
            "other_frames": d.other_frames,
            "overflow_closes": d.overflow_closes,
            "reconnects": d.reconnects,
            "compacted_replays": d.compacted_frames,
            "recovered_by_replay": d.recovered_by_replay,
            "socket_errors": d.socket_errors.iter().take(KEPT_ERRORS).collect::<Vec<_>>(),
            "timed_out": self.timed_out,
        });
        if let (Some(t), Value::Object(e)) = (totals.as_object_mut(), extra) {
            t.extend(e);
        }
        totals
    }
}
