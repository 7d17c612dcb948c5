//! `switchboard-bench summary FILE`: the targets of `make bench` in one table.
//!
//! `make bench` merges every scenario's results into one `bench/results/<date>.json`. Each
//! scenario prints its own table as it runs; this reads the merged file and answers, target
//! by target, what was measured and whether it was met, so that one run's verdict is one
//! table (and the README's is copied from it). The targets are issue 4's, on the build
//! machine. A target whose figures are missing from the file (a scenario that did not run)
//! is reported as such. Misses do not fail the command: the scenarios' own correctness
//! checks decide whether a run passed.

use std::path::PathBuf;

use clap::Args;
use serde_json::Value;

#[derive(Args, Clone, Debug)]
pub struct SummaryArgs {
    /// A merged results file of `make bench` (`bench/results/<date>.json`).
    pub file: PathBuf,
}

/// One target and what the run measured for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub scenario: &'static str,
    pub target: &'static str,
    pub measured: String,
    /// `None`: the file holds no figure for it.
    pub met: Option<bool>,
}

pub fn main(args: &SummaryArgs) -> Result<bool, String> {
    let text =
        std::fs::read_to_string(&args.file).map_err(|e| format!("{}: {e}", args.file.display()))?;
    let merged: Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", args.file.display()))?;
    print!("{}", render(&rows(&merged)));
    Ok(true)
}

fn num(v: &Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_f64()
}

/// How a target is judged.
enum Check {
    /// One figure at `path` in the scenario's section, at most this value.
    AtMost(&'static [&'static str], f64, Shown),
    /// One figure at `path`, at least this value.
    AtLeast(&'static [&'static str], f64, Shown),
    /// Several figures of the scenario's section, judged together.
    Figures(fn(&Value) -> Option<(String, bool)>),
    /// Figures of the whole file (the scenario's and another section's).
    Merged(fn(&Value) -> Option<(String, bool)>),
}

/// How a single figure is printed: decimals and unit.
type Shown = (usize, &'static str);

/// Issue 4's targets: scenario as printed, its section in the merged file, target, check.
const TARGETS: &[(&str, &str, &str, Check)] = &[
    (
        "idle",
        "idle",
        "19,000 sockets up in ≤ 10 s",
        Check::Figures(idle_up),
    ),
    (
        "idle",
        "idle",
        "≤ 16 KiB server RSS per socket",
        Check::AtMost(&["memory", "server_rss_per_socket_kib"], 16.0, (1, " KiB")),
    ),
    (
        "idle",
        "idle",
        "stretch: ≤ 8 KiB server RSS per socket",
        Check::AtMost(&["memory", "server_rss_per_socket_kib"], 8.0, (1, " KiB")),
    ),
    (
        "fanout",
        "fanout",
        "10,000 subscribers, ≥ 150,000 deliveries/s (99% of offered)",
        Check::Figures(fanout_rate),
    ),
    ("fanout", "fanout", "zero loss", Check::Figures(fanout_loss)),
    ("fanout", "fanout", "p99 ≤ 40 ms", Check::Merged(fanout_p99)),
    (
        "chat",
        "chat",
        "500 posts/s persisted first (99% acknowledged)",
        Check::AtLeast(&["posting", "acked_posts_per_sec"], 495.0, (0, "/s")),
    ),
    (
        "chat",
        "chat",
        "post-to-receive p50 ≤ 1 ms",
        Check::AtMost(
            &["delivery", "latency_post_to_receive", "p50_ms"],
            1.0,
            (2, " ms"),
        ),
    ),
    (
        "chat",
        "chat",
        "post-to-receive p99 ≤ 5 ms",
        Check::AtMost(
            &["delivery", "latency_post_to_receive", "p99_ms"],
            5.0,
            (2, " ms"),
        ),
    ),
    (
        "ai-stream",
        "ai",
        "every append durable",
        Check::Figures(ai_durable),
    ),
    (
        "ai-stream",
        "ai",
        "p99 ≤ 10 ms",
        Check::AtMost(&["latency_append_to_receive", "p99_ms"], 10.0, (2, " ms")),
    ),
    (
        "ai-stream (Pusher)",
        "ai_stream_pusher",
        "every append durable",
        Check::Figures(ai_durable),
    ),
    (
        "ai-stream (Pusher)",
        "ai_stream_pusher",
        "p99 ≤ 10 ms",
        Check::AtMost(&["latency_append_to_receive", "p99_ms"], 10.0, (2, " ms")),
    ),
    (
        "reconnect",
        "reconnect",
        "1,000 clients × 500 events: ≤ 5 s, none missing",
        Check::Figures(own_targets),
    ),
    (
        "reconnect (Pusher)",
        "reconnect_pusher",
        "1,000 clients × 500 events: ≤ 5 s, none missing",
        Check::Figures(own_targets),
    ),
    (
        "persistence",
        "persistence",
        "≥ 100,000 durable appends/s",
        Check::AtLeast(&["appends_per_sec"], 100_000.0, (0, "/s")),
    ),
];

/// Issue 4's targets, read from a merged results file; a target whose figures are missing
/// gets a row without a verdict.
pub fn rows(m: &Value) -> Vec<Row> {
    TARGETS
        .iter()
        .map(|(scenario, section, target, check)| {
            let whole = m;
            let section = &m[*section];
            let single = |path: &[&str], (precision, unit): Shown, met: &dyn Fn(f64) -> bool| {
                num(section, path).map(|x| (format!("{x:.precision$}{unit}"), met(x)))
            };
            let figure = match check {
                Check::AtMost(path, limit, shown) => single(path, *shown, &|x| x <= *limit),
                Check::AtLeast(path, limit, shown) => single(path, *shown, &|x| x >= *limit),
                Check::Figures(judge) => judge(section),
                Check::Merged(judge) => judge(whole),
            };
            let (measured, met) = match figure {
                Some((measured, met)) => (measured, Some(met)),
                None => ("not in this file".into(), None),
            };
            Row {
                scenario,
                target,
                measured,
                met,
            }
        })
        .collect()
}

fn idle_up(idle: &Value) -> Option<(String, bool)> {
    let up = num(idle, &["connect", "established"])?;
    let secs = num(idle, &["connect", "secs"])?;
    Some((
        format!("{up:.0} up in {secs:.2} s"),
        up >= 19_000.0 && secs <= 10.0,
    ))
}

fn fanout_rate(fanout: &Value) -> Option<(String, bool)> {
    let rate = num(fanout, &["deliveries", "per_sec"])?;
    let subs = num(fanout, &["sockets", "established"])?;
    Some((
        format!("{rate:.0}/s to {subs:.0}"),
        rate >= 148_500.0 && subs >= 10_000.0,
    ))
}

/// Judged at the generator's read (`send-to-receive`). Shown beside it when the file has
/// them: the kernel's arrival stamp, and the p99 of `floor` (the same fan-out from bare
/// threads, no server) measured in the same run.
fn fanout_p99(m: &Value) -> Option<(String, bool)> {
    let fanout = &m["fanout"];
    let p99 = num(fanout, &["latency_send_to_receive", "p99_ms"])?;
    let beside: Vec<String> = [
        num(fanout, &["latency_send_to_arrival", "p99_ms"])
            .map(|v| format!("at arrival {v:.1} ms")),
        num(&m["floor"], &["latency_ms", "p99"]).map(|v| format!("machine floor {v:.1} ms")),
    ]
    .into_iter()
    .flatten()
    .collect();
    let shown = if beside.is_empty() {
        format!("{p99:.1} ms")
    } else {
        format!("{p99:.1} ms ({})", beside.join("; "))
    };
    Some((shown, p99 <= 40.0))
}

fn fanout_loss(fanout: &Value) -> Option<(String, bool)> {
    lost(fanout, &["missing", "duplicates", "out_of_order"])
}

fn ai_durable(ai: &Value) -> Option<(String, bool)> {
    let durable = num(ai, &["appends", "durable_fragments"])?;
    let sent = num(ai, &["appends", "sent"])?;
    let failed = num(ai, &["appends", "failed"])?;
    Some((
        format!("{durable:.0} of {sent:.0} sent durable, {failed:.0} failed"),
        durable >= sent && failed == 0.0,
    ))
}

/// Sum of the named correctness counters: zero is met.
fn lost(scenario: &Value, counters: &[&str]) -> Option<(String, bool)> {
    let total = counters
        .iter()
        .map(|c| num(scenario, &["correctness", c]))
        .sum::<Option<f64>>()?;
    Some((
        format!("{total:.0} lost, duplicated or out of order"),
        total == 0.0,
    ))
}

/// A scenario that judges its own targets (`targets: [{target, met}]`): all of them met.
fn own_targets(scenario: &Value) -> Option<(String, bool)> {
    let targets = scenario.get("targets")?.as_array()?;
    if targets.is_empty() {
        return None;
    }
    let mut said = Vec::new();
    let mut all = true;
    for t in targets {
        said.push(t.get("target")?.as_str()?.to_string());
        all &= t.get("met")?.as_bool()?;
    }
    Some((said.join("; "), all))
}

/// The rows as a plain-text table.
pub fn render(rows: &[Row]) -> String {
    let mut out = String::from("\nmake bench: the targets\n=======================\n");
    for r in rows {
        let verdict = match r.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "-",
        };
        out.push_str(&format!(
            "{:<7} {:<19} {:<61} {}\n",
            verdict, r.scenario, r.target, r.measured
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn merged() -> Value {
        json!({
            "idle": {"connect": {"established": 19000, "secs": 1.62},
                     "memory": {"server_rss_per_socket_kib": 3.15}},
            "fanout": {"deliveries": {"per_sec": 149920.7},
                       "sockets": {"established": 10000},
                       "correctness": {"missing": 0, "duplicates": 0, "out_of_order": 0},
                       "latency_send_to_receive": {"p99_ms": 122.6}},
            "ai": {"appends": {"durable_fragments": 100000, "sent": 100000, "failed": 0},
                   "latency_append_to_receive": {"p99_ms": 7.24}},
            "reconnect": {"targets": [{"target": "all caught up in 1.03 s ≤ 5 s", "met": true},
                                      {"target": "0 events missing = 0", "met": true}]},
            "reconnect_pusher": {"targets": [{"target": "all caught up in 6.2 s ≤ 5 s", "met": false},
                                             {"target": "0 events missing = 0", "met": true}]},
            "persistence": {"appends_per_sec": 173209.8}
        })
    }

    fn verdict(rows: &[Row], scenario: &str, target_starts: &str) -> Option<bool> {
        rows.iter()
            .find(|r| r.scenario == scenario && r.target.starts_with(target_starts))
            .unwrap_or_else(|| panic!("no row {scenario} / {target_starts}"))
            .met
    }

    #[test]
    fn each_target_is_judged_from_its_figure() {
        let rows = rows(&merged());
        assert_eq!(verdict(&rows, "idle", "19,000"), Some(true));
        assert_eq!(verdict(&rows, "idle", "≤ 16 KiB"), Some(true));
        assert_eq!(verdict(&rows, "idle", "stretch"), Some(true));
        assert_eq!(verdict(&rows, "fanout", "10,000"), Some(true));
        assert_eq!(verdict(&rows, "fanout", "zero loss"), Some(true));
        assert_eq!(verdict(&rows, "fanout", "p99"), Some(false));
        assert_eq!(verdict(&rows, "ai-stream", "every append"), Some(true));
        assert_eq!(verdict(&rows, "ai-stream", "p99"), Some(true));
        assert_eq!(verdict(&rows, "reconnect", "1,000"), Some(true));
        // One of its own targets missed: the row is missed.
        assert_eq!(verdict(&rows, "reconnect (Pusher)", "1,000"), Some(false));
        assert_eq!(verdict(&rows, "persistence", "≥ 100,000"), Some(true));
        // No chat section in this file: no verdict rather than a guess.
        assert_eq!(verdict(&rows, "chat", "500"), None);
        let text = render(&rows);
        assert!(text.contains("MISSED  fanout"), "{text}");
        assert!(text.contains("122.6 ms"), "{text}");
        assert!(!text.contains("at arrival"), "{text}");
    }

    #[test]
    fn fanout_p99_is_judged_at_the_read_and_shows_the_arrival() {
        let mut m = merged();
        m["fanout"]["latency_send_to_arrival"] = json!({"p99_ms": 38.2});
        let rows = rows(&m);
        // Arrival under 40 ms does not make the target: the read is what is judged.
        assert_eq!(verdict(&rows, "fanout", "p99"), Some(false));
        let text = render(&rows);
        assert!(text.contains("122.6 ms (at arrival 38.2 ms)"), "{text}");
    }

    #[test]
    fn fanout_p99_shows_the_machine_floor_of_the_same_run() {
        let mut m = merged();
        m["fanout"]["latency_send_to_arrival"] = json!({"p99_ms": 60.1});
        m["floor"] = json!({"latency_ms": {"p99": 45.25}});
        let rows = rows(&m);
        assert_eq!(verdict(&rows, "fanout", "p99"), Some(false));
        let text = render(&rows);
        assert!(
            text.contains("122.6 ms (at arrival 60.1 ms; machine floor 45.2 ms)"),
            "{text}"
        );
    }

    #[test]
    fn the_edges_are_judged_as_the_targets_say() {
        let mut m = merged();
        m["fanout"]["latency_send_to_receive"]["p99_ms"] = json!(40.0);
        m["fanout"]["correctness"]["duplicates"] = json!(1);
        m["ai"]["appends"]["durable_fragments"] = json!(99_999);
        m["idle"]["connect"]["secs"] = json!(10.01);
        m["persistence"]["appends_per_sec"] = json!(99_999.0);
        m["idle"]["memory"]["server_rss_per_socket_kib"] = json!(8.5);
        let rows = rows(&m);
        assert_eq!(verdict(&rows, "fanout", "p99"), Some(true));
        assert_eq!(verdict(&rows, "fanout", "zero loss"), Some(false));
        assert_eq!(verdict(&rows, "ai-stream", "every append"), Some(false));
        assert_eq!(verdict(&rows, "idle", "19,000"), Some(false));
        assert_eq!(verdict(&rows, "persistence", "≥ 100,000"), Some(false));
        assert_eq!(verdict(&rows, "idle", "≤ 16 KiB"), Some(true));
        assert_eq!(verdict(&rows, "idle", "stretch"), Some(false));
    }

    #[test]
    fn the_committed_latest_run_reads_whole() {
        // The file `make bench` wrote at 2026-12-07 14:29: every target has a figure.
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../bench/results/20261207T142918Z.json"
        );
        let text = std::fs::read_to_string(path).expect("results file");
        let m: Value = serde_json::from_str(&text).expect("json");
        let rows = rows(&m);
        for r in &rows {
            assert!(r.met.is_some(), "no figure for {r:?}");
        }
        assert_eq!(verdict(&rows, "fanout", "p99"), Some(false));
        assert_eq!(verdict(&rows, "chat", "500"), Some(true));
        assert_eq!(verdict(&rows, "chat", "post-to-receive p50"), Some(true));
        assert_eq!(verdict(&rows, "ai-stream (Pusher)", "p99"), Some(true));
        let text = render(&rows);
        assert!(text.contains("machine floor 45.2 ms"), "{text}");
    }
}
