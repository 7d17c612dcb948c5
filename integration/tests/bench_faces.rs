//! The load generator end to end at a toy size, against a server it starts itself (the
//! debug build beside it): the scenarios' newest paths must pass their own checks of loss,
//! duplicates, order and durability. Speed is `make bench`'s business, not this file's.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// Runs `switchboard-bench ARGS`, which must succeed; its stdout.
fn bench(args: &[&str], results: Option<&Path>) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard-bench"));
    cmd.args(args);
    if let Some(dir) = results {
        cmd.arg("--results-dir").arg(dir);
    }
    let out = cmd.output().expect("run switchboard-bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{args:?} failed\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The one results file a run wrote into `dir`.
fn results_file(dir: &Path) -> Value {
    let files: Vec<_> = std::fs::read_dir(dir)
        .expect("results dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    serde_json::from_str(&std::fs::read_to_string(&files[0]).expect("read")).expect("json")
}

#[test]
fn ai_stream_on_the_pusher_face_delivers_every_append_once_in_serial_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 2 streams × 10/s × 2 s = 20 fragments each; 4 appends per message (three fragments
    // and the close), so each stream opens several messages through `/events`.
    bench(
        &[
            "ai-stream",
            "--face",
            "pusher",
            "--streams",
            "2",
            "--rate",
            "10",
            "--subscribers",
            "2",
            "--duration",
            "2",
            "--appends-per-message",
            "4",
        ],
        Some(dir.path()),
    );
    let r = results_file(dir.path());
    assert_eq!(r["passed"], true, "{r}");
    assert_eq!(r["config"]["face"], "pusher", "{r}");
    let appends = &r["appends"];
    assert_eq!(appends["sent"], 40, "{appends}");
    assert_eq!(appends["durable_fragments"], 40, "{appends}");
    assert!(appends["messages_opened"].as_u64() >= Some(12), "{appends}");
    // Every acknowledged append (fragments and closes) reached both subscribers of its stream.
    let durable = appends["durable"].as_u64().expect("durable");
    assert_eq!(
        r["deliveries"]["expected"].as_u64(),
        Some(durable * 2),
        "{r}"
    );
    assert_eq!(
        r["deliveries"]["frames"], r["deliveries"]["expected"],
        "{r}"
    );
    let c = &r["correctness"];
    for k in [
        "lost",
        "duplicates",
        "out_of_order",
        "seq_gaps",
        "unparsable",
        "foreign",
    ] {
        assert_eq!(c[k], 0, "{k}: {c}");
    }
    assert_eq!(c["clean_subscribers"], 4, "{c}");
}

/// A toy-size `floor` run (60 sockets × 20 ticks) with `extra` arguments: its JSON summary.
fn floor_run(extra: &[&str]) -> Value {
    let mut args = vec![
        "floor",
        "--subscribers",
        "60",
        "--rate",
        "20",
        "--duration",
        "1",
        "--frame-bytes",
        "64",
    ];
    args.extend_from_slice(extra);
    let out = bench(&args, None);
    serde_json::from_str(out.lines().last().unwrap_or("")).expect("json line")
}

#[test]
fn floor_reads_every_frame_through_its_reader_processes() {
    let last = floor_run(&[]);
    assert_eq!(last["expected"], 1_200, "{last}");
    assert_eq!(last["frames"], 1_200, "{last}");
    assert_eq!(last["short_sockets"], 0, "{last}");
    assert!(last["latency_ms"]["p99"].as_f64() > Some(0.0), "{last}");
}

#[test]
fn floor_pinned_reads_every_frame_with_each_reader_beside_its_sender() {
    let last = floor_run(&["--pin"]);
    assert_eq!(last["pinned"], true, "{last}");
    assert_eq!(last["frames"], 1_200, "{last}");
    assert_eq!(last["short_sockets"], 0, "{last}");
}
