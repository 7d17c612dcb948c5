//! Worker processes: a scenario that needs more sockets than one process may open (at most
//! 20,000 files here) spreads them over `switchboard-bench worker` child processes (this same
//! binary, `std::env::current_exe()`): `fanout` always, `idle` past one process's sockets
//! (its control line `{"cmd": "stop"}` ends the hold).
//!
//! Protocol, one JSON object per line:
//! - coordinator → worker stdin: first the job (`{"scenario": "fanout", ...}`), then control
//!   lines (`{"cmd": "drain", ...}`, `{"cmd": "abort"}`). When the worker's stdin closes (the
//!   coordinator ended or died) the worker aborts, reports what it has and exits.
//! - worker → coordinator stdout: `{"type": "progress", ...counters}` once a second,
//!   `{"type": "ready", ...counters}` when its sockets are connected, `{"type": "report", ...}`
//!   at the end (histograms as hdrhistogram V2 bytes, hex), `{"type": "error", "error": ..}`.
//!   Its stderr is the coordinator's.
//!
//! Every worker is bounded in time by its job; the coordinator closes the pipes at the end,
//! waits, and kills (by its own pid) a worker that has not exited.

use std::io::{BufRead as _, Write as _};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use clap::Args;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2Serializer};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

/// Sockets per worker process by default (well under the 20,000 open files a process may hold).
pub const SOCKETS_PER_WORKER: usize = 9_000;

/// How long a worker waits for its job after start.
const JOB_WAIT: Duration = Duration::from_secs(30);

/// Wall-clock nanoseconds since the Unix epoch: the one clock the coordinator and its worker
/// processes share on this host (stamps are taken with it, latencies subtract from it).
pub fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// One worker per [`SOCKETS_PER_WORKER`] sockets, at least one.
pub fn default_workers(sockets: usize) -> usize {
    sockets.div_ceil(SOCKETS_PER_WORKER).max(1)
}

/// A histogram as hdrhistogram's V2 serialization, hex-encoded.
pub fn hist_to_hex(h: &Histogram<u64>) -> Result<String, String> {
    let mut buf = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut buf)
        .map_err(|e| format!("serialize histogram: {e:?}"))?;
    Ok(hex::encode(buf))
}

pub fn hist_from_hex(s: &str) -> Result<Histogram<u64>, String> {
    let bytes = hex::decode(s).map_err(|e| format!("histogram hex: {e}"))?;
    Deserializer::new()
        .deserialize(&mut std::io::Cursor::new(bytes))
        .map_err(|e| format!("deserialize histogram: {e:?}"))
}

// ---------------------------------------------------------------------------------------
// Worker side.

#[derive(Args, Clone, Debug)]
pub struct WorkerArgs {
    /// Tokio threads of this worker process.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// This worker's number (for its messages).
    #[arg(long, default_value_t = 0)]
    pub index: usize,
}

/// Writes JSON lines to stdout, the coordinator's pipe.
#[derive(Clone, Default)]
pub struct Out {
    broken: Arc<AtomicBool>,
}

impl Out {
    /// `false` once the pipe is gone (the coordinator ended).
    pub fn send(&self, v: &Value) -> bool {
        if self.broken.load(Ordering::Relaxed) {
            return false;
        }
        let mut stdout = std::io::stdout().lock();
        let ok = writeln!(stdout, "{v}").is_ok() && stdout.flush().is_ok();
        if !ok {
            self.broken.store(true, Ordering::Relaxed);
        }
        ok
    }
}

/// Reads the job line, then control lines, from stdin on a plain thread (a blocking read in
/// tokio's pool would keep the runtime from shutting down). On EOF it publishes
/// `{"cmd": "eof"}`. Ends at EOF; the process exits without waiting for it.
fn stdin_loop(job: oneshot::Sender<Result<Value, String>>, control: watch::Sender<Value>) {
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let first = match lines.next() {
        Some(Ok(l)) => serde_json::from_str::<Value>(&l).map_err(|e| format!("job line: {e}")),
        Some(Err(e)) => Err(format!("read job: {e}")),
        None => Err("stdin closed before the job".into()),
    };
    let failed = first.is_err();
    let _ = job.send(first);
    if failed {
        return;
    }
    for line in lines {
        let Ok(line) = line else { break };
        match serde_json::from_str::<Value>(&line) {
            Ok(v) => {
                if control.send(v).is_err() {
                    return;
                }
            }
            Err(e) => eprintln!("worker: bad control line ({e}): {line}"),
        }
    }
    let _ = control.send(json!({"cmd": "eof"}));
}

/// `switchboard-bench worker`: runs the job its coordinator sends on stdin.
pub async fn worker_main(args: WorkerArgs) -> Result<bool, String> {
    let (job_tx, job_rx) = oneshot::channel();
    let (control_tx, control_rx) = watch::channel(Value::Null);
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || stdin_loop(job_tx, control_tx))
        .map_err(|e| format!("stdin thread: {e}"))?;
    let job = tokio::time::timeout(JOB_WAIT, job_rx)
        .await
        .map_err(|_| format!("worker {}: no job within {JOB_WAIT:?}", args.index))?
        .map_err(|_| "stdin thread ended".to_string())??;
    let out = Out::default();
    let result = match job.get("scenario").and_then(Value::as_str) {
        Some("fanout") => crate::fanout::worker(job, control_rx, out.clone()).await,
        Some("idle") => crate::idle::worker(job, control_rx, out.clone()).await,
        other => Err(format!("unknown worker scenario {other:?}")),
    };
    if let Err(e) = &result {
        out.send(&json!({"type": "error", "error": e}));
    }
    result
}

// ---------------------------------------------------------------------------------------
// Coordinator side.

/// What the coordinator knows of one worker, kept current by its stdout reader.
#[derive(Default)]
pub struct WorkerState {
    /// The last `progress` (or `ready`) line.
    pub progress: Mutex<Value>,
    pub ready: AtomicBool,
    pub report: Mutex<Option<Value>>,
    pub error: Mutex<Option<String>>,
    /// Its stdout ended.
    pub exited: AtomicBool,
}

impl WorkerState {
    pub fn counter(&self, key: &str) -> u64 {
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .and_then(Value::as_u64)
            .unwrap_or(0)
    }
    pub fn has_report(&self) -> bool {
        self.report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }
    pub fn take_report(&self) -> Option<Value> {
        self.report.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Reads a worker's stdout lines into its state until EOF (the worker exited).
async fn read_stdout(index: usize, stdout: tokio::process::ChildStdout, state: Arc<WorkerState>) {
    let mut lines = BufReader::new(stdout).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            eprintln!("worker {index}: {line}");
            continue;
        };
        match v.get("type").and_then(Value::as_str) {
            Some("progress") => *state.progress.lock().unwrap_or_else(|e| e.into_inner()) = v,
            Some("ready") => {
                *state.progress.lock().unwrap_or_else(|e| e.into_inner()) = v;
                state.ready.store(true, Ordering::Relaxed);
            }
            Some("report") => *state.report.lock().unwrap_or_else(|e| e.into_inner()) = Some(v),
            Some("error") => {
                let e = v
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string();
                eprintln!("worker {index}: error: {e}");
                *state.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
            }
            _ => eprintln!("worker {index}: {line}"),
        }
    }
    state.exited.store(true, Ordering::Relaxed);
}

/// The worker processes of one run.
pub struct WorkerSet {
    pub states: Vec<Arc<WorkerState>>,
    pub pids: Vec<u32>,
    children: Vec<Child>,
    stdins: Vec<Option<ChildStdin>>,
}

impl WorkerSet {
    /// Starts `count` workers (`<this binary> worker --threads T --index i`).
    pub fn spawn(count: usize, threads: usize) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let mut set = Self {
            states: Vec::with_capacity(count),
            pids: Vec::with_capacity(count),
            children: Vec::with_capacity(count),
            stdins: Vec::with_capacity(count),
        };
        for i in 0..count {
            let mut child = Command::new(&exe)
                .arg("worker")
                .arg("--threads")
                .arg(threads.max(1).to_string())
                .arg("--index")
                .arg(i.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("spawn worker {i} ({}): {e}", exe.display()))?;
            let pid = child.id().unwrap_or(0);
            let state = Arc::new(WorkerState::default());
            let stdout = child
                .stdout
                .take()
                .ok_or_else(|| format!("worker {i}: no stdout pipe"))?;
            tokio::spawn(read_stdout(i, stdout, state.clone()));
            set.stdins.push(child.stdin.take());
            set.children.push(child);
            set.states.push(state);
            set.pids.push(pid);
        }
        Ok(set)
    }

    pub fn len(&self) -> usize {
        self.children.len()
    }

    /// Writes one JSON line to worker `i`'s stdin (bounded: 5 s).
    pub async fn send(&mut self, i: usize, v: &Value) -> Result<(), String> {
        let stdin = self
            .stdins
            .get_mut(i)
            .and_then(Option::as_mut)
            .ok_or_else(|| format!("worker {i}: stdin closed"))?;
        let line = format!("{v}\n");
        tokio::time::timeout(Duration::from_secs(5), async {
            stdin.write_all(line.as_bytes()).await?;
            stdin.flush().await
        })
        .await
        .map_err(|_| format!("worker {i}: stdin write timed out"))?
        .map_err(|e| format!("worker {i}: stdin: {e}"))
    }

    /// Sum of one progress counter over the workers.
    pub fn sum(&self, key: &str) -> u64 {
        self.states.iter().map(|s| s.counter(key)).sum()
    }

    pub fn count(&self, f: impl Fn(&WorkerState) -> bool) -> usize {
        self.states.iter().filter(|s| f(s)).count()
    }

    /// Polls until every worker satisfies `done` or has exited; `false` when `deadline`
    /// passed first.
    pub async fn wait_all(&self, deadline: Instant, done: impl Fn(&WorkerState) -> bool) -> bool {
        loop {
            if self
                .states
                .iter()
                .all(|s| done(s) || s.exited.load(Ordering::Relaxed))
            {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Closes every stdin (the workers stop), waits up to `grace` for each to exit, then kills
    /// the ones still running (each by its own pid). Notes on how they ended.
    pub async fn shutdown(&mut self, grace: Duration) -> Vec<String> {
        self.stdins.iter_mut().for_each(|s| drop(s.take()));
        let until = Instant::now() + grace;
        let mut notes = Vec::new();
        for (i, child) in self.children.iter_mut().enumerate() {
            match tokio::time::timeout_at(until, child.wait()).await {
                Ok(Ok(status)) if status.success() => {}
                Ok(Ok(status)) => notes.push(format!("worker {i} exited with {status}")),
                Ok(Err(e)) => notes.push(format!("worker {i}: wait: {e}")),
                Err(_) => {
                    let _ = child.start_kill();
                    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                    notes.push(format!(
                        "worker {i} (pid {}) did not exit within {grace:?}: killed",
                        self.pids.get(i).copied().unwrap_or(0)
                    ));
                }
            }
        }
        notes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_survive_the_pipe() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("histogram");
        for v in [1u64, 10, 1_000, 25_000, 25_001, 599_000_000] {
            h.record(v).expect("record");
        }
        let back = hist_from_hex(&hist_to_hex(&h).expect("serialize")).expect("deserialize");
        assert_eq!(back.len(), h.len());
        assert_eq!(back.max(), h.max());
        assert_eq!(back.value_at_quantile(0.5), h.value_at_quantile(0.5));
        let mut merged = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("histogram");
        merged.add(&back).expect("merge");
        merged.add(&h).expect("merge");
        assert_eq!(merged.len(), 2 * h.len());
    }

    #[test]
    fn one_worker_per_nine_thousand_sockets() {
        assert_eq!(default_workers(0), 1);
        assert_eq!(default_workers(9_000), 1);
        assert_eq!(default_workers(9_001), 2);
        assert_eq!(default_workers(10_000), 2);
    }
}
