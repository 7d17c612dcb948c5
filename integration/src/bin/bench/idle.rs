//! `idle`: many idle WebSocket connections. Opens `--sockets` connections to
//! `/api/realtime/ws` (round-robin over `--members` entities' tokens, at most
//! `--connect-concurrency` handshakes at a time, each attempt bounded by
//! `--connect-timeout`, at most `--retries` retries per socket), holds them for `--hold`
//! seconds while reading every socket (so server pings are answered), and reports connect
//! times, the server's memory per socket, its CPU while idle and how many sockets survived.
//!
//! `--face pusher` opens `/app/{key}` sockets instead (see `bench/pusher.rs`): no entities
//! and no token; each socket waits for `connection_established`, subscribes to one of
//! `--members` public channels (`bench-idle-<tag>-<i>`, round-robin) and holds it, answering
//! the server's `pusher:ping` with `pusher:pong`.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use futures_util::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;

use crate::api::{self, Api};
use crate::cluster;
use crate::pusher::{self, Face, FaceArgs};
use crate::rawws::{self, RawWs, TextSocket};
use crate::report::{cpu_delta, opt};
use crate::server::{self, AppCreds, ProcSample};
use crate::subscriber::Ws;
use crate::workers::{self, WorkerSet};
use crate::{random_tag, Target, TargetArgs};

/// Files the bench needs besides its sockets (HTTP pool, stdio, runtime, logs).
pub(crate) const FD_MARGIN: u64 = 256;
/// A process of the bench may hold at most this many open files.
pub(crate) const FD_CAP: u64 = 20_000;
/// Concurrent entity creations.
const SETUP_CONCURRENCY: usize = 16;
/// Error messages kept for the report.
const KEEP_ERRORS: usize = 5;

#[derive(Args, Clone, Debug)]
pub struct IdleArgs {
    /// WebSocket connections to open and hold.
    #[arg(long, default_value_t = 19_000)]
    pub sockets: usize,
    /// Seconds to hold every socket open (idle) once all are established.
    #[arg(long, default_value_t = 10)]
    pub hold: u64,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,
    /// Entities whose tokens the sockets use, round-robin (chat face); with `--face pusher`:
    /// public channels the sockets subscribe to, round-robin.
    #[arg(long, default_value_t = 100)]
    pub members: usize,
    /// Seconds one connect attempt (TCP, upgrade, `realtime.ready`; Pusher:
    /// `connection_established` and `subscription_succeeded`) may take.
    #[arg(long, default_value_t = 10)]
    pub connect_timeout: u64,
    /// Retries per socket after a failed or timed-out attempt.
    #[arg(long, default_value_t = 2)]
    pub retries: u32,
    /// Loopback source addresses (127.0.0.2, 127.0.0.3, ...) the sockets are spread over;
    /// 0 lets the kernel pick 127.0.0.1 and a port. One source address runs into Linux's
    /// ephemeral-port search (half the port range, ~14k sockets, then a linear scan).
    #[arg(long, default_value_t = 8)]
    pub source_ips: u8,
    /// Overall bound of the connect phase in seconds; sockets not up by then count as failed.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Worker processes holding the sockets (`switchboard-bench worker`, like `fanout`); 0:
    /// every socket in this process (at most 19,744). Default: 0 when the sockets fit in
    /// this process, else one worker per 9,000 sockets. `--connect-concurrency` is split
    /// over the workers.
    #[arg(long)]
    pub workers: Option<usize>,
    #[command(flatten)]
    pub face: FaceArgs,
    #[command(flatten)]
    pub target: TargetArgs,
}

/// `switchboard-bench idle --help`: the faces and how to run them.
pub const HELP: &str = "\
Faces (--face):
  chat (default)  Sockets on /api/realtime/ws with the tokens of --members entities; each
                  waits for realtime.ready. WebSocket pings are answered by the client.
  pusher          Sockets on /app/{key}?protocol=2 (--protocol 2, Sockudo V2) or ?protocol=7
                  (--protocol 1, plain Pusher), no token, no entities; each waits for
                  connection_established, subscribes to one of --members public channels
                  (bench-idle-<tag>-<i>) and waits for subscription_succeeded, then holds,
                  answering the server's pusher:ping with pusher:pong (the server closes a
                  socket that does not with 4201; it pings after 120 s of silence by default,
                  SWITCHBOARD_PUSHER_ACTIVITY_TIMEOUT_SECONDS lowers that for a started server).

Examples:
  switchboard-bench idle --sockets 19000 --hold 10
  switchboard-bench idle --face pusher --sockets 19000 --hold 10
  switchboard-bench idle --face pusher --protocol 1 --sockets 500
  Another Pusher-compatible server on loopback (its app id, key and secret):
  switchboard-bench idle --face pusher --protocol 1 --url http://127.0.0.1:6001 \\
      --app ID:KEY:SECRET --server-pid PID --sockets 5000";

impl IdleArgs {
    fn validate(&self) -> Result<(), String> {
        if self.sockets == 0 || self.members == 0 || self.connect_concurrency == 0 {
            return Err("--sockets, --members and --connect-concurrency must be at least 1".into());
        }
        if self.source_ips > 253 {
            return Err("--source-ips must be at most 253 (127.0.0.2..127.0.0.254)".into());
        }
        if self.connect_timeout == 0 || self.timeout == 0 {
            return Err("--connect-timeout and --timeout must be at least 1".into());
        }
        if self.hold > 3600 || self.timeout > 3600 {
            return Err("--hold and --timeout are at most 3600 s".into());
        }
        Ok(())
    }

    /// Worker processes (0: the sockets live in this process).
    pub fn worker_count(&self) -> usize {
        self.workers
            .unwrap_or_else(|| {
                if self.sockets as u64 + FD_MARGIN <= FD_CAP {
                    0
                } else {
                    workers::default_workers(self.sockets)
                }
            })
            .min(self.sockets)
    }
}

/// Soft and hard `Max open files` of a process (`self` or a pid), from /proc.
pub(crate) fn nofile_limits(pid: &str) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let mut nums = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .map(|v| {
            if v == "unlimited" {
                Some(u64::MAX)
            } else {
                v.parse().ok()
            }
        });
    Some((nums.next()??, nums.next()??))
}

/// Checks the bench can hold `sockets` files. Neither `rlimit` nor `libc` is a dependency
/// of this crate, so the soft limit cannot be raised here: the shell must (`ulimit -n`).
fn check_nofile(sockets: usize) -> Result<(), String> {
    let need = sockets as u64 + FD_MARGIN;
    if need > FD_CAP {
        return Err(format!(
            "--sockets {sockets} needs about {need} open files; this bench holds at most {FD_CAP}: \
             use --sockets {} or fewer",
            FD_CAP - FD_MARGIN
        ));
    }
    let Some((soft, hard)) = nofile_limits("self") else {
        eprintln!("warning: cannot read /proc/self/limits; not checking RLIMIT_NOFILE");
        return Ok(());
    };
    if need > soft {
        let hint = if need <= hard {
            format!(
                "raise it in the shell first: `ulimit -n {}`",
                hard.min(FD_CAP)
            )
        } else {
            format!(
                "the hard limit is {hard} too: use --sockets {} or fewer",
                hard.saturating_sub(FD_MARGIN)
            )
        };
        return Err(format!(
            "--sockets {sockets} needs about {need} open files but the soft RLIMIT_NOFILE is \
             {soft} (hard {hard}); this bench cannot raise it (no rlimit/libc dependency): {hint}"
        ));
    }
    Ok(())
}

/// Counters the connect tasks, the readers and the progress line share.
#[derive(Default)]
struct Shared {
    established: AtomicU64,
    open: AtomicU64,
    lost: AtomicU64,
    failed: AtomicU64,
    retries: AtomicU64,
    pings: AtomicU64,
}

/// How one socket's reader ended.
struct ReaderEnd {
    /// Still open when told to stop.
    held: bool,
    frames: u64,
    why: Option<String>,
}

/// One socket's connect outcome.
struct Connected {
    node: usize,
    /// The successful attempt's duration, µs.
    micros: Option<u64>,
    reader: Option<JoinHandle<ReaderEnd>>,
    error: Option<String>,
}

/// Small buffers: this many idle sockets should not cost the bench 256 KiB each.
/// TCP connect (from `route`'s source address when given) and WebSocket upgrade of `req`.
pub(crate) async fn open_ws(
    req: tokio_tungstenite::tungstenite::handshake::client::Request,
    route: Option<(SocketAddr, Ipv4Addr)>,
) -> Result<Ws, String> {
    let (ws, _) = match route {
        Some((server, source)) => {
            let stream = rawws::dial_from(server, source).await?;
            tokio_tungstenite::client_async_with_config(
                req,
                MaybeTlsStream::Plain(stream),
                Some(crate::chat::ws_config(4096)),
            )
            .await
            .map_err(|e| format!("ws upgrade: {e}"))?
        }
        None => tokio_tungstenite::connect_async_with_config(
            req,
            Some(crate::chat::ws_config(4096)),
            true,
        )
        .await
        .map_err(|e| format!("ws connect: {e}"))?,
    };
    Ok(ws)
}

/// TCP connect (from `route`'s source address when given), upgrade, and the `realtime.ready`
/// frame, within `within`; the socket and the ready frame's cursor.
pub(crate) async fn connect_once(
    url: &str,
    token: &str,
    route: Option<(SocketAddr, Ipv4Addr)>,
    within: Duration,
) -> Result<(Ws, String), String> {
    let attempt = async {
        let mut req = url
            .into_client_request()
            .map_err(|e| format!("ws request: {e}"))?;
        req.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|e| format!("ws auth header: {e}"))?,
        );
        let mut ws = open_ws(req, route).await?;
        let cursor = await_ready(&mut ws).await?;
        Ok((ws, cursor))
    };
    tokio::time::timeout(within, attempt)
        .await
        .map_err(|_| format!("no realtime.ready within {within:?}"))?
}

/// [`connect_once`] through the lean client (`rawws.rs`), for a reader outside tokio.
pub(crate) async fn connect_once_raw(
    url: &str,
    token: &str,
    route: Option<(SocketAddr, Ipv4Addr)>,
    within: Duration,
) -> Result<(RawWs, String), String> {
    let attempt = async {
        let mut ws =
            rawws::upgrade(url, &[format!("Authorization: Bearer {token}")], route).await?;
        let cursor = await_ready(&mut ws).await?;
        Ok((ws, cursor))
    };
    tokio::time::timeout(within, attempt)
        .await
        .map_err(|_| format!("no realtime.ready within {within:?}"))?
}

/// The first frame must be `realtime.ready`: its cursor.
async fn await_ready<S: TextSocket>(ws: &mut S) -> Result<String, String> {
    let t = ws.next_text("realtime.ready").await?;
    let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
    match (
        v.get("type").and_then(Value::as_str),
        v.get("cursor").and_then(Value::as_str),
    ) {
        (Some("realtime.ready"), Some(cursor)) => Ok(cursor.to_string()),
        _ => Err(format!(
            "first frame is not realtime.ready with a cursor: {}",
            api::snippet(t.as_bytes())
        )),
    }
}

/// Reads the socket until told to stop (tungstenite answers WebSocket pings while reading;
/// the Pusher face answers `pusher:ping` frames with `pusher:pong`).
async fn read_until_stopped(
    mut ws: Ws,
    face: Face,
    mut stop: watch::Receiver<bool>,
    shared: Arc<Shared>,
) -> ReaderEnd {
    let mut frames = 0u64;
    let (held, why) = loop {
        if *stop.borrow() {
            break (true, None);
        }
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break (true, None);
                }
            }
            m = ws.next() => match m {
                Some(Ok(Message::Ping(_))) => {
                    frames += 1;
                    shared.pings.fetch_add(1, Ordering::Relaxed);
                }
                Some(Ok(Message::Close(c))) => {
                    break (false, Some(format!("closed by server: {c:?}")));
                }
                Some(Ok(Message::Text(t)))
                    if face == Face::Pusher && pusher::is_ping(t.as_str()) =>
                {
                    frames += 1;
                    shared.pings.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = ws.send(Message::text(pusher::PONG)).await {
                        break (false, Some(format!("ws send pong: {e}")));
                    }
                }
                Some(Ok(_)) => frames += 1,
                Some(Err(e)) => break (false, Some(format!("ws read: {e}"))),
                None => break (false, Some("ws ended".into())),
            },
        }
    };
    shared.open.fetch_sub(1, Ordering::Relaxed);
    if !held {
        shared.lost.fetch_add(1, Ordering::Relaxed);
    }
    ReaderEnd { held, frames, why }
}

/// How a socket is opened.
enum Dial {
    /// `/api/realtime/ws` with this bearer token.
    Chat(Arc<String>),
    /// `/app/{key}`, subscribed to this public channel.
    Pusher(Arc<String>),
}

struct ConnectJob {
    url: Arc<String>,
    /// The node it connects to (index into the target's nodes).
    node: usize,
    dial: Dial,
    route: Option<(SocketAddr, Ipv4Addr)>,
    within: Duration,
    retries: u32,
    deadline: Instant,
    stop: watch::Receiver<bool>,
    shared: Arc<Shared>,
}

impl ConnectJob {
    async fn run(self) -> Connected {
        let mut last = String::new();
        for attempt in 0..=self.retries {
            if attempt > 0 {
                self.shared.retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
            }
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                last = format!("connect phase deadline passed ({last})");
                break;
            }
            let started = Instant::now();
            let within = self.within.min(left);
            let connected = match &self.dial {
                Dial::Chat(token) => connect_once(&self.url, token, self.route, within)
                    .await
                    .map(|(ws, _)| (ws, Face::Chat)),
                Dial::Pusher(channel) => {
                    pusher::connect(&self.url, self.route, within, Some(channel))
                        .await
                        .map(|(ws, _)| (ws, Face::Pusher))
                }
            };
            match connected {
                Ok((ws, face)) => {
                    let micros = started.elapsed().as_micros() as u64;
                    self.shared.established.fetch_add(1, Ordering::Relaxed);
                    self.shared.open.fetch_add(1, Ordering::Relaxed);
                    let reader = tokio::spawn(read_until_stopped(
                        ws,
                        face,
                        self.stop.clone(),
                        self.shared.clone(),
                    ));
                    return Connected {
                        node: self.node,
                        micros: Some(micros),
                        reader: Some(reader),
                        error: None,
                    };
                }
                Err(e) => last = e,
            }
        }
        self.shared.failed.fetch_add(1, Ordering::Relaxed);
        Connected {
            node: self.node,
            micros: None,
            reader: None,
            error: Some(last),
        }
    }
}

fn kib(s: Option<ProcSample>) -> Option<f64> {
    s.map(|s| s.rss_kb as f64)
}

fn mib(s: Option<ProcSample>) -> Option<f64> {
    kib(s).map(|k| k / 1024.0)
}

/// (RSS of `after` − RSS of `before`) / `n`, KiB.
fn per_socket(before: Option<ProcSample>, after: Option<ProcSample>, n: u64) -> Option<f64> {
    match (kib(before), kib(after)) {
        (Some(b), Some(a)) if n > 0 => Some((a - b) / n as f64),
        _ => None,
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn row(key: &str, value: String) {
    println!("{key:<40} {value}");
}

pub struct IdleReport {
    args: IdleArgs,
    base: String,
    server_pid: Option<u32>,
    server_started_here: bool,
    established: u64,
    failed: u64,
    retries: u64,
    connect_secs: f64,
    connect_us: Histogram<u64>,
    held: u64,
    lost: u64,
    lost_reasons: Vec<String>,
    connect_errors: Vec<String>,
    pings: u64,
    frames_during_hold: u64,
    hold_secs: f64,
    server_before: Option<ProcSample>,
    server_established: Option<ProcSample>,
    server_after_hold: Option<ProcSample>,
    client_before: Option<ProcSample>,
    client_established: Option<ProcSample>,
    client_after_hold: Option<ProcSample>,
    server_log_problems: u64,
    server_log_sample: Vec<String>,
    /// Every node (node 0 first); the `server_*` samples above are sums over them.
    nodes: Vec<cluster::Node>,
    cluster: Value,
    cluster_label: String,
    requested_per_node: Vec<usize>,
    established_per_node: Vec<u64>,
    held_per_node: Vec<u64>,
    node_before: Vec<Option<ProcSample>>,
    node_established: Vec<Option<ProcSample>>,
    node_after_hold: Vec<Option<ProcSample>>,
    /// Worker processes that held the sockets (0: this process).
    workers: usize,
    worker_pids: Vec<u32>,
    /// The workers' RSS summed, as each reported when its sockets were up.
    workers_rss_kb: Option<u64>,
    worker_notes: Vec<String>,
}

impl IdleReport {
    pub fn failures(&self) -> Vec<String> {
        let n = self.args.sockets as u64;
        let mut out = Vec::new();
        if self.established < n {
            out.push(format!(
                "{} of {n} sockets established ({} failed)",
                self.established, self.failed
            ));
        }
        if self.lost > 0 {
            out.push(format!(
                "{} sockets lost during the hold ({} held)",
                self.lost, self.held
            ));
        }
        out
    }

    pub fn passed(&self) -> bool {
        self.failures().is_empty()
    }

    fn hold_cpu(&self) -> Option<f64> {
        cpu_delta(self.server_established, self.server_after_hold)
    }

    fn quantile_ms(&self, q: f64) -> Option<f64> {
        (!self.connect_us.is_empty()).then(|| ms(self.connect_us.value_at_quantile(q)))
    }

    pub fn print(&self) {
        let a = &self.args;
        println!();
        println!("switchboard-bench idle");
        println!("======================");
        let over = match a.face.face {
            Face::Chat => "members",
            Face::Pusher => "public channels",
        };
        row(
            "scenario",
            format!(
                "{} sockets over {} {over} from {} source IPs, {} connecting at once, hold {} s",
                a.sockets, a.members, a.source_ips, a.connect_concurrency, a.hold
            ),
        );
        row("face", a.face.label());
        row("nodes", self.cluster_label.clone());
        if self.workers > 0 {
            row(
                "generator",
                format!(
                    "{} worker processes (pids {:?})",
                    self.workers, self.worker_pids
                ),
            );
        }
        row(
            if self.nodes.len() > 1 {
                "node 0"
            } else {
                "server"
            },
            format!(
                "{} (pid {}, {})",
                self.base,
                self.server_pid
                    .map_or_else(|| "unknown".into(), |p| p.to_string()),
                if self.server_started_here {
                    "started by the bench"
                } else {
                    "--url"
                }
            ),
        );
        println!("-- connect");
        row(
            "established / requested",
            format!("{} / {}", self.established, a.sockets),
        );
        row(
            "failed / retries",
            format!("{} / {}", self.failed, self.retries),
        );
        row(
            "all established in",
            format!(
                "{:.2} s ({:.0} sockets/s)",
                self.connect_secs,
                self.established as f64 / self.connect_secs.max(1e-9)
            ),
        );
        row(
            "connect time p50 / p99 / max (ms)",
            format!(
                "{} / {} / {}",
                opt(self.quantile_ms(0.5), 2),
                opt(self.quantile_ms(0.99), 2),
                opt(self.quantile_ms(1.0), 2)
            ),
        );
        println!("-- hold");
        row(
            "sockets open at end of hold",
            format!("{} / {} (lost {})", self.held, self.established, self.lost),
        );
        row(
            match a.face.face {
                Face::Chat => "server pings answered / other frames",
                Face::Pusher => "pings (ws + pusher:ping) / other frames",
            },
            format!(
                "{} / {}",
                self.pings,
                self.frames_during_hold.saturating_sub(self.pings)
            ),
        );
        row(
            "server CPU s during hold (% of a core)",
            format!(
                "{} ({})",
                opt(self.hold_cpu(), 2),
                opt(
                    self.hold_cpu()
                        .map(|c| 100.0 * c / self.hold_secs.max(1e-9)),
                    1
                )
            ),
        );
        if self.nodes.len() > 1 {
            println!("-- server memory (sum over {} nodes)", self.nodes.len());
        } else {
            println!("-- server memory");
        }
        row(
            "RSS idle / established / held (MiB)",
            format!(
                "{} / {} / {}",
                opt(mib(self.server_before), 1),
                opt(mib(self.server_established), 1),
                opt(mib(self.server_after_hold), 1)
            ),
        );
        row(
            "RSS per socket (established / held)",
            format!(
                "{} / {} KiB",
                opt(
                    per_socket(
                        self.server_before,
                        self.server_established,
                        self.established
                    ),
                    1
                ),
                opt(
                    per_socket(self.server_before, self.server_after_hold, self.established),
                    1
                )
            ),
        );
        row(
            "server WARN/ERROR log lines",
            crate::report::log_lines_cell(self.server_started_here, self.server_log_problems),
        );
        if self.nodes.len() > 1 {
            println!("-- per node (server figures above are sums over the nodes)");
            for (k, n) in self.nodes.iter().enumerate() {
                let e = self.established_per_node.get(k).copied().unwrap_or(0);
                row(
                    &format!("node {k} {}", n.base.trim_start_matches("http://")),
                    format!(
                        "pid {}: {} / {} established, {} held; RSS {} MiB, {} KiB/socket; hold CPU {} s",
                        n.pid.map_or_else(|| "?".into(), |p| p.to_string()),
                        e,
                        self.requested_per_node.get(k).copied().unwrap_or(0),
                        self.held_per_node.get(k).copied().unwrap_or(0),
                        opt(mib(self.node_after_hold.get(k).copied().flatten()), 1),
                        opt(
                            per_socket(
                                self.node_before.get(k).copied().flatten(),
                                self.node_established.get(k).copied().flatten(),
                                e
                            ),
                            1
                        ),
                        opt(
                            cpu_delta(
                                self.node_established.get(k).copied().flatten(),
                                self.node_after_hold.get(k).copied().flatten()
                            ),
                            2
                        ),
                    ),
                );
            }
        }
        println!("-- bench client");
        row(
            if self.workers > 0 {
                "coordinator RSS idle / established (MiB)"
            } else {
                "RSS idle / established (MiB), per socket"
            },
            format!(
                "{} / {}, {} KiB",
                opt(mib(self.client_before), 1),
                opt(mib(self.client_established), 1),
                opt(
                    per_socket(
                        self.client_before,
                        self.client_established,
                        self.established
                    ),
                    1
                )
            ),
        );
        if let Some(kb) = self.workers_rss_kb {
            row(
                "workers' RSS when established (MiB), per socket",
                format!(
                    "{:.1}, {} KiB",
                    kb as f64 / 1024.0,
                    opt(
                        (self.established > 0).then(|| kb as f64 / self.established as f64),
                        1
                    )
                ),
            );
        }
        for e in &self.connect_errors {
            println!("  connect error: {e}");
        }
        for n in &self.worker_notes {
            println!("  worker: {n}");
        }
        for e in &self.lost_reasons {
            println!("  lost: {e}");
        }
        for l in &self.server_log_sample {
            println!("  server log: {l}");
        }
        let failures = self.failures();
        if failures.is_empty() {
            println!("RESULT: PASS");
        } else {
            println!();
            println!("!!! RESULT: FAIL (idle)");
            for f in failures {
                println!("!!!   {f}");
            }
        }
    }

    pub fn to_json(&self) -> Value {
        let a = &self.args;
        let s = |p: Option<ProcSample>| {
            p.map(|p| json!({"cpu_secs": p.cpu_secs, "rss_kb": p.rss_kb, "hwm_kb": p.hwm_kb}))
        };
        json!({
            "scenario": "idle",
            "face": a.face.face.as_str(),
            "protocol": a.face.protocol(),
            "passed": self.passed(),
            "failures": self.failures(),
            "params": {
                "face": a.face.face.as_str(),
                "protocol": a.face.protocol(),
                "sockets": a.sockets,
                "hold_secs": a.hold,
                "connect_concurrency": a.connect_concurrency,
                "members": a.members,
                "connect_timeout_secs": a.connect_timeout,
                "retries": a.retries,
                "source_ips": a.source_ips,
                "timeout_secs": a.timeout,
                "threads": a.target.threads,
                "workers": self.workers,
                "nodes": self.nodes.len(),
            },
            "cluster": self.cluster,
            "nodes": cluster::nodes_json(&self.nodes, |k| {
                let e = self.established_per_node.get(k).copied().unwrap_or(0);
                let at = |v: &Vec<Option<ProcSample>>| v.get(k).copied().flatten();
                json!({
                    "requested": self.requested_per_node.get(k),
                    "established": e,
                    "held": self.held_per_node.get(k),
                    "rss_per_socket_kib": per_socket(at(&self.node_before), at(&self.node_established), e),
                    "hold_cpu_secs": cpu_delta(at(&self.node_established), at(&self.node_after_hold)),
                    "before": s(at(&self.node_before)),
                    "established_sample": s(at(&self.node_established)),
                    "after_hold": s(at(&self.node_after_hold)),
                })
            }),
            "server": {
                "base": self.base,
                "pid": self.server_pid,
                "started_here": self.server_started_here,
                "log_problems": self.server_log_problems,
                "log_sample": self.server_log_sample,
            },
            "connect": {
                "established": self.established,
                "failed": self.failed,
                "retries": self.retries,
                "secs": self.connect_secs,
                "p50_ms": self.quantile_ms(0.5),
                "p99_ms": self.quantile_ms(0.99),
                "max_ms": self.quantile_ms(1.0),
                "errors_sample": self.connect_errors,
            },
            "hold": {
                "secs": self.hold_secs,
                "held": self.held,
                "lost": self.lost,
                "lost_sample": self.lost_reasons,
                "pings": self.pings,
                "frames": self.frames_during_hold,
                "server_cpu_secs": self.hold_cpu(),
            },
            "memory": {
                "server_rss_per_socket_kib": per_socket(self.server_before, self.server_established, self.established),
                "server_rss_per_socket_after_hold_kib": per_socket(self.server_before, self.server_after_hold, self.established),
                "client_rss_per_socket_kib": per_socket(self.client_before, self.client_established, self.established),
            },
            "samples": {
                "server_before": s(self.server_before),
                "server_established": s(self.server_established),
                "server_after_hold": s(self.server_after_hold),
                "client_before": s(self.client_before),
                "client_established": s(self.client_established),
                "client_after_hold": s(self.client_after_hold),
                "workers_rss_kb": self.workers_rss_kb,
            },
            "workers": {
                "count": self.workers,
                "pids": self.worker_pids,
                "notes": self.worker_notes,
            },
        })
    }
}

/// Connect and hold counters: established, open, lost, failed, retries.
type Counts = Box<dyn Fn() -> [u64; 5] + Send>;

/// Prints established/open/lost and the servers' RSS (summed over the nodes) once a second
/// until told to stop.
async fn progress_line(counts: Counts, mut stop: watch::Receiver<bool>, nodes: Vec<cluster::Node>) {
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        let srv = cluster::sum_samples(&cluster::sample_nodes(&nodes))
            .map(|s| {
                let what = if nodes.len() > 1 { "servers" } else { "server" };
                format!(" {what} cpu {:.1}s rss {} MiB", s.cpu_secs, s.rss_kb / 1024)
            })
            .unwrap_or_default();
        let [established, open, lost, failed, retries] = counts();
        eprintln!(
            "[{:>5.1}s] established {established} open {open} lost {lost} failed {failed} retries {retries}{srv}",
            start.elapsed().as_secs_f64(),
        );
    }
}

/// The server's address when `base` is `http://127.x.y.z:port`.
pub(crate) fn loopback_v4(base: &str) -> Option<SocketAddr> {
    let authority = base.strip_prefix("http://")?.split('/').next()?;
    let addr: SocketAddr = authority.parse().ok()?;
    (addr.is_ipv4() && addr.ip().is_loopback()).then_some(addr)
}

/// Checks the open-file limits; the caller opens the target afterwards.
pub fn preflight(args: &IdleArgs) -> Result<(), String> {
    args.validate()?;
    let k = args.worker_count();
    if k == 0 {
        return check_nofile(args.sockets);
    }
    let share = args.sockets.div_ceil(k) as u64;
    let soft = nofile_limits("self").map_or(FD_CAP, |(soft, _)| soft.min(FD_CAP));
    if share + FD_MARGIN > soft {
        return Err(format!(
            "{share} sockets per worker (of {k}) need about {} open files; a worker may hold \
             {soft}: use --workers {} or more",
            share + FD_MARGIN,
            (args.sockets as u64).div_ceil(soft.saturating_sub(FD_MARGIN).max(1))
        ));
    }
    Ok(())
}

/// Chat face: `--members` entities; the prefix of their ids (`<prefix><i>`).
async fn chat_members(args: &IdleArgs, target: &Target, tag: &str) -> Result<String, String> {
    let api = Api {
        client: api::http_client(SETUP_CONCURRENCY + 4)?,
        base: target.base.clone(),
        creds: target.creds.clone(),
    };
    let setup_deadline = Instant::now() + Duration::from_secs(60);
    let prefix = format!("bench-{tag}-idle");
    let ids: Vec<String> = (0..args.members).map(|i| format!("{prefix}{i}")).collect();
    let created = tokio::time::timeout_at(
        setup_deadline,
        futures_util::stream::iter(ids.iter().map(|id| {
            let api = &api;
            async move { api.create_entity(id, id, "human").await }
        }))
        .buffer_unordered(SETUP_CONCURRENCY)
        .collect::<Vec<_>>(),
    )
    .await
    .map_err(|_| "timed out creating entities".to_string())?;
    for r in created {
        r?;
    }
    eprintln!("created {} entities", ids.len());
    Ok(prefix)
}

/// What the sockets present, round-robin: chat bearer tokens of `<prefix><i>`, or Pusher
/// channel names `<prefix><i>`.
fn share_keys(
    face: Face,
    creds: &AppCreds,
    prefix: &str,
    members: usize,
) -> Result<Vec<Arc<String>>, String> {
    (0..members.max(1))
        .map(|i| {
            let name = format!("{prefix}{i}");
            match face {
                Face::Chat => api::mint_token(creds, &name, 7200).map(Arc::new),
                Face::Pusher => Ok(Arc::new(name)),
            }
        })
        .collect()
}

/// One process's share of the sockets: the bench itself, or one worker.
struct Share {
    face: Face,
    /// Per node: its WebSocket URL, and its address when sockets bind source addresses.
    urls: Vec<Arc<String>>,
    addrs: Vec<Option<SocketAddr>>,
    keys: Vec<Arc<String>>,
    /// Global indexes of the sockets: `first..first + count`.
    first: usize,
    count: usize,
    source_ips: u8,
    within: Duration,
    retries: u32,
    deadline: Instant,
    concurrency: usize,
}

impl Share {
    #[allow(clippy::too_many_arguments)]
    fn new(
        face: &FaceArgs,
        bases: &[String],
        app_key: &str,
        keys: Vec<Arc<String>>,
        first: usize,
        count: usize,
        source_ips: u8,
        within: Duration,
        retries: u32,
        deadline: Instant,
        concurrency: usize,
    ) -> Self {
        let urls = bases
            .iter()
            .map(|b| {
                Arc::new(match face.face {
                    Face::Chat => format!("{}/api/realtime/ws", b.replacen("http://", "ws://", 1)),
                    Face::Pusher => pusher::app_url(b, app_key, face.protocol),
                })
            })
            .collect();
        let addrs = bases
            .iter()
            .map(|b| loopback_v4(b).filter(|_| source_ips > 0))
            .collect();
        Self {
            face: face.face,
            urls,
            addrs,
            keys,
            first,
            count,
            source_ips,
            within,
            retries,
            deadline,
            concurrency: concurrency.max(1),
        }
    }
}

/// The sockets a share opened: readers by node, connect times, a few errors.
struct ShareConnect {
    readers: Vec<(usize, JoinHandle<ReaderEnd>)>,
    connect_us: Histogram<u64>,
    errors: Vec<String>,
    established_per_node: Vec<u64>,
}

/// Opens the share's sockets (socket `g` on node `g % nodes`, key `g % keys`, from
/// 127.0.0.(2 + `g % source_ips`)), at most `concurrency` handshakes at a time.
async fn connect_share(
    s: &Share,
    stop: &watch::Receiver<bool>,
    shared: &Arc<Shared>,
) -> Result<ShareConnect, String> {
    let n = s.urls.len().max(1);
    let outcomes: Vec<Connected> =
        futures_util::stream::iter((s.first..s.first + s.count).map(|g| {
            let node = cluster::node_of(g, n);
            let key = s.keys[g % s.keys.len()].clone();
            ConnectJob {
                url: s.urls[node].clone(),
                node,
                dial: match s.face {
                    Face::Chat => Dial::Chat(key),
                    Face::Pusher => Dial::Pusher(key),
                },
                route: s.addrs[node].map(|a| {
                    let k = (g % usize::from(s.source_ips.max(1))) as u8;
                    (a, Ipv4Addr::new(127, 0, 0, 2 + k))
                }),
                within: s.within,
                retries: s.retries,
                deadline: s.deadline,
                stop: stop.clone(),
                shared: shared.clone(),
            }
            .run()
        }))
        .buffer_unordered(s.concurrency)
        .collect()
        .await;
    let mut out = ShareConnect {
        readers: Vec::with_capacity(outcomes.len()),
        connect_us: Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)
            .map_err(|e| e.to_string())?,
        errors: Vec::new(),
        established_per_node: vec![0; n],
    };
    for c in outcomes {
        if let Some(us) = c.micros {
            out.connect_us
                .record(us.max(1))
                .map_err(|e| format!("histogram: {e}"))?;
            out.established_per_node[c.node] += 1;
        }
        if let Some(r) = c.reader {
            out.readers.push((c.node, r));
        }
        if let Some(e) = c.error {
            if out.errors.len() < KEEP_ERRORS {
                out.errors.push(e);
            }
        }
    }
    Ok(out)
}

/// How a share's sockets ended the hold.
#[derive(Serialize, Deserialize, Default)]
struct ShareHold {
    held: u64,
    lost: u64,
    frames: u64,
    lost_reasons: Vec<String>,
    held_per_node: Vec<u64>,
}

/// Waits for the readers (told to stop already) until `by`.
async fn collect_readers(
    readers: Vec<(usize, JoinHandle<ReaderEnd>)>,
    nodes: usize,
    by: Instant,
) -> Result<ShareHold, String> {
    let mut h = ShareHold {
        held_per_node: vec![0; nodes.max(1)],
        ..ShareHold::default()
    };
    for (node, r) in readers {
        match tokio::time::timeout_at(by, r).await {
            Ok(Ok(end)) => {
                h.frames += end.frames;
                if end.held {
                    h.held += 1;
                    h.held_per_node[node] += 1;
                } else {
                    h.lost += 1;
                    if let (Some(why), true) = (end.why, h.lost_reasons.len() < KEEP_ERRORS) {
                        h.lost_reasons.push(why);
                    }
                }
            }
            Ok(Err(e)) => {
                h.lost += 1;
                if h.lost_reasons.len() < KEEP_ERRORS {
                    h.lost_reasons.push(format!("reader task: {e}"));
                }
            }
            Err(_) => return Err("readers did not stop within 30s of the end of the hold".into()),
        }
    }
    Ok(h)
}

/// The figures a run gathers, in this process or from its workers.
struct Gathered {
    established: u64,
    failed: u64,
    retries: u64,
    pings: u64,
    connect_secs: f64,
    connect_us: Histogram<u64>,
    connect_errors: Vec<String>,
    established_per_node: Vec<u64>,
    hold: ShareHold,
    hold_secs: f64,
    node_established: Vec<Option<ProcSample>>,
    node_after_hold: Vec<Option<ProcSample>>,
    client_established: Option<ProcSample>,
    client_after_hold: Option<ProcSample>,
    worker_pids: Vec<u32>,
    workers_rss_kb: Option<u64>,
    worker_notes: Vec<String>,
}

/// The idle scenario on a ready target (one node or several).
pub async fn run(args: &IdleArgs, target: &Target) -> Result<IdleReport, String> {
    let n = target.nodes.len().max(1);
    let requested_per_node = cluster::per_node(args.sockets, n);
    for (k, node) in target.nodes.iter().enumerate() {
        let Some(pid) = node.pid else { continue };
        if let Some((soft, _)) = nofile_limits(&pid.to_string()) {
            if (requested_per_node[k] as u64) + FD_MARGIN > soft {
                eprintln!(
                    "warning: server pid {pid} may open only {soft} files; {} sockets will not fit",
                    requested_per_node[k]
                );
            }
        }
    }
    let tag = random_tag();
    // Chat: the members' tokens; Pusher: the channel names. Round-robin over the sockets.
    let prefix = match args.face.face {
        Face::Chat => chat_members(args, target, &tag).await?,
        Face::Pusher => format!("bench-idle-{tag}-"),
    };

    // Idle figures: let the set-up settle first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let node_before = target.sample_nodes();
    let client_before = server::sample_proc("self");
    eprintln!(
        "sockets: {} on {} node{} (round-robin), e.g. {}",
        args.face.label(),
        n,
        if n == 1 { "" } else { "s" },
        target.base
    );
    if idle_loopback(target) && args.source_ips > 0 {
        eprintln!("connecting from 127.0.0.2..127.0.0.{}", 1 + args.source_ips);
    } else {
        eprintln!("connecting from kernel-chosen source addresses");
    }
    let k = args.worker_count();
    let g = if k == 0 {
        run_here(args, target, &prefix).await?
    } else {
        run_workers(args, target, &prefix, k).await?
    };
    let (log_lines, log_sample) = target.log_problems();
    Ok(IdleReport {
        args: args.clone(),
        base: target.base.clone(),
        server_pid: target.server_pid,
        server_started_here: target.child.is_some(),
        established: g.established,
        failed: g.failed,
        retries: g.retries,
        connect_secs: g.connect_secs,
        connect_us: g.connect_us,
        held: g.hold.held,
        lost: g.hold.lost,
        lost_reasons: g.hold.lost_reasons,
        connect_errors: g.connect_errors,
        pings: g.pings,
        frames_during_hold: g.hold.frames,
        hold_secs: g.hold_secs,
        server_before: cluster::sum_samples(&node_before),
        server_established: cluster::sum_samples(&g.node_established),
        server_after_hold: cluster::sum_samples(&g.node_after_hold),
        client_before,
        client_established: g.client_established,
        client_after_hold: g.client_after_hold,
        server_log_problems: log_lines,
        server_log_sample: log_sample,
        nodes: target.nodes.clone(),
        cluster: target.cluster_json(),
        cluster_label: target.cluster_label(),
        requested_per_node,
        established_per_node: g.established_per_node,
        held_per_node: g.hold.held_per_node,
        node_before,
        node_established: g.node_established,
        node_after_hold: g.node_after_hold,
        workers: k,
        worker_pids: g.worker_pids,
        workers_rss_kb: g.workers_rss_kb,
        worker_notes: g.worker_notes,
    })
}

/// Every node is on 127.x (the sockets can bind source addresses).
fn idle_loopback(target: &Target) -> bool {
    target.nodes.iter().all(|n| loopback_v4(&n.base).is_some())
}

fn bases(target: &Target) -> Vec<String> {
    target.nodes.iter().map(|n| n.base.clone()).collect()
}

/// Every socket in this process.
async fn run_here(args: &IdleArgs, target: &Target, prefix: &str) -> Result<Gathered, String> {
    let n = target.nodes.len().max(1);
    let keys = share_keys(args.face.face, &target.creds, prefix, args.members)?;
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let share = Share::new(
        &args.face,
        &bases(target),
        &target.creds.key,
        keys,
        0,
        args.sockets,
        args.source_ips,
        Duration::from_secs(args.connect_timeout),
        args.retries,
        deadline,
        args.connect_concurrency,
    );
    let shared = Arc::new(Shared::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let (progress_tx, progress_rx) = watch::channel(false);
    let counts: Counts = {
        let sh = shared.clone();
        Box::new(move || {
            let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
            [
                l(&sh.established),
                l(&sh.open),
                l(&sh.lost),
                l(&sh.failed),
                l(&sh.retries),
            ]
        })
    };
    let progress = tokio::spawn(progress_line(counts, progress_rx, target.nodes.clone()));
    let connect_started = Instant::now();
    let c = connect_share(&share, &stop_rx, &shared).await?;
    let connect_secs = connect_started.elapsed().as_secs_f64();
    let established = shared.established.load(Ordering::Relaxed);
    eprintln!(
        "{established} of {} sockets established in {connect_secs:.2}s ({} failed, {} retries)",
        args.sockets,
        shared.failed.load(Ordering::Relaxed),
        shared.retries.load(Ordering::Relaxed)
    );

    // Hold: every reader keeps reading (and answering pings).
    let node_established = target.sample_nodes();
    let client_established = server::sample_proc("self");
    let hold_started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.hold)).await;
    let hold_secs = hold_started.elapsed().as_secs_f64();
    let node_after_hold = target.sample_nodes();
    let client_after_hold = server::sample_proc("self");
    let _ = stop_tx.send(true);
    let _ = progress_tx.send(true);
    let _ = progress.await;
    let hold = collect_readers(c.readers, n, Instant::now() + Duration::from_secs(30)).await?;
    Ok(Gathered {
        established,
        failed: shared.failed.load(Ordering::Relaxed),
        retries: shared.retries.load(Ordering::Relaxed),
        pings: shared.pings.load(Ordering::Relaxed),
        connect_secs,
        connect_us: c.connect_us,
        connect_errors: c.errors,
        established_per_node: c.established_per_node,
        hold,
        hold_secs,
        node_established,
        node_after_hold,
        client_established,
        client_after_hold,
        worker_pids: Vec::new(),
        workers_rss_kb: None,
        worker_notes: Vec::new(),
    })
}

// ---------------------------------------------------------------------------------------
// Worker processes (`--workers`, or more sockets than one process may open).

/// One worker's share of an idle run (the first line on its stdin).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct IdleJob {
    pub scenario: String,
    pub worker: usize,
    /// Every node's `http://host:port`; socket `g` goes to node `g % nodes.len()`.
    pub nodes: Vec<String>,
    /// Workspace credentials `id:key:secret` (chat tokens are minted in the worker).
    pub app: String,
    pub face: Face,
    pub protocol: u8,
    /// Chat: entity ids `<prefix><i>`; Pusher: channel names `<prefix><i>`, i < members.
    pub prefix: String,
    pub members: usize,
    pub first_socket: usize,
    pub sockets: usize,
    pub source_ips: u8,
    pub connect_concurrency: usize,
    pub connect_timeout_secs: u64,
    pub retries: u32,
    /// Bound of the connect phase from the worker's start.
    pub connect_phase_secs: u64,
    /// The worker stops by itself this long after it starts.
    pub max_secs: u64,
}

/// A worker's final line.
#[derive(Serialize, Deserialize, Default)]
struct IdleWorkerReport {
    worker: usize,
    established: u64,
    failed: u64,
    retries: u64,
    pings: u64,
    connect_hist: String,
    connect_errors: Vec<String>,
    established_per_node: Vec<u64>,
    hold: ShareHold,
    cpu_secs: f64,
    /// RSS when its sockets were up.
    rss_kb: u64,
}

fn idle_progress(kind: &str, sh: &Shared) -> Value {
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    json!({
        "type": kind,
        "established": l(&sh.established),
        "open": l(&sh.open),
        "lost": l(&sh.lost),
        "failed": l(&sh.failed),
        "retries": l(&sh.retries),
        "pings": l(&sh.pings),
        "rss_kb": server::sample_proc("self").map(|p| p.rss_kb),
    })
}

/// A worker's part of `idle` (`switchboard-bench worker`, job on stdin): connect its share,
/// say `ready`, hold until the coordinator says `stop` (or its pipe closes, or `max_secs`),
/// then report.
pub async fn worker(
    job: Value,
    mut control: watch::Receiver<Value>,
    out: workers::Out,
) -> Result<bool, String> {
    let job: IdleJob = serde_json::from_value(job).map_err(|e| format!("idle job: {e}"))?;
    let started = Instant::now();
    let end_by = started + Duration::from_secs(job.max_secs);
    let creds = AppCreds::parse(&job.app)?;
    let face = FaceArgs {
        face: job.face,
        protocol: job.protocol,
    };
    let keys = share_keys(job.face, &creds, &job.prefix, job.members)?;
    let share = Share::new(
        &face,
        &job.nodes,
        &creds.key,
        keys,
        job.first_socket,
        job.sockets,
        job.source_ips,
        Duration::from_secs(job.connect_timeout_secs),
        job.retries,
        (started + Duration::from_secs(job.connect_phase_secs)).min(end_by),
        job.connect_concurrency,
    );
    let shared = Arc::new(Shared::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let progress = {
        let (sh, out) = (shared.clone(), out.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            while Instant::now() < end_by {
                tick.tick().await;
                if !out.send(&idle_progress("progress", &sh)) {
                    return;
                }
            }
        })
    };
    let c = connect_share(&share, &stop_rx, &shared).await?;
    let ready = idle_progress("ready", &shared);
    let rss_kb = ready.get("rss_kb").and_then(Value::as_u64).unwrap_or(0);
    out.send(&ready);

    // Hold until told to stop (or the pipe closes, or the time is up).
    loop {
        let cmd = control
            .borrow_and_update()
            .get("cmd")
            .and_then(Value::as_str)
            .map(str::to_string);
        if matches!(cmd.as_deref(), Some("stop" | "abort" | "eof")) {
            break;
        }
        let left = end_by.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match tokio::time::timeout(left, control.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => break,
        }
    }
    let _ = stop_tx.send(true);
    progress.abort();
    let hold = collect_readers(
        c.readers,
        job.nodes.len(),
        Instant::now() + Duration::from_secs(30),
    )
    .await?;
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let report = IdleWorkerReport {
        worker: job.worker,
        established: l(&shared.established),
        failed: l(&shared.failed),
        retries: l(&shared.retries),
        pings: l(&shared.pings),
        connect_hist: workers::hist_to_hex(&c.connect_us)?,
        connect_errors: c.errors,
        established_per_node: c.established_per_node,
        hold,
        cpu_secs: server::sample_proc("self").map_or(0.0, |p| p.cpu_secs),
        rss_kb,
    };
    let mut line = serde_json::to_value(&report).map_err(|e| format!("report: {e}"))?;
    if let Some(o) = line.as_object_mut() {
        o.insert("type".into(), "report".into());
    }
    out.send(&line);
    Ok(true)
}

/// The sockets in `k` worker processes; this process only coordinates.
async fn run_workers(
    args: &IdleArgs,
    target: &Target,
    prefix: &str,
    k: usize,
) -> Result<Gathered, String> {
    let mut set = WorkerSet::spawn(k, 1)?;
    eprintln!(
        "started {k} worker processes (pids {:?}) for {} sockets",
        set.pids, args.sockets
    );
    let outcome = drive_workers(args, target, prefix, &mut set).await;
    let notes = set.shutdown(Duration::from_secs(10)).await;
    for n in &notes {
        eprintln!("{n}");
    }
    let mut g = outcome?;
    g.worker_pids = set.pids.clone();
    g.worker_notes.extend(notes);
    Ok(g)
}

async fn drive_workers(
    args: &IdleArgs,
    target: &Target,
    prefix: &str,
    set: &mut WorkerSet,
) -> Result<Gathered, String> {
    let k = set.len();
    let n = target.nodes.len().max(1);
    let creds = &target.creds;
    let (base_share, rem) = (args.sockets / k, args.sockets % k);
    let mut first = 0;
    for w in 0..k {
        let sockets = base_share + usize::from(w < rem);
        let job = IdleJob {
            scenario: "idle".into(),
            worker: w,
            nodes: bases(target),
            app: format!("{}:{}:{}", creds.id, creds.key, creds.secret),
            face: args.face.face,
            protocol: args.face.protocol,
            prefix: prefix.to_string(),
            members: args.members,
            first_socket: first,
            sockets,
            source_ips: args.source_ips,
            connect_concurrency: args.connect_concurrency.div_ceil(k),
            connect_timeout_secs: args.connect_timeout,
            retries: args.retries,
            connect_phase_secs: args.timeout,
            max_secs: args.timeout + args.hold + 60,
        };
        first += sockets;
        let line = serde_json::to_value(&job).map_err(|e| format!("job: {e}"))?;
        set.send(w, &line).await?;
    }
    let (progress_tx, progress_rx) = watch::channel(false);
    let counts: Counts = {
        let states = set.states.clone();
        Box::new(move || {
            let sum = |key: &str| states.iter().map(|s| s.counter(key)).sum::<u64>();
            [
                sum("established"),
                sum("open"),
                sum("lost"),
                sum("failed"),
                sum("retries"),
            ]
        })
    };
    let progress = tokio::spawn(progress_line(counts, progress_rx, target.nodes.clone()));
    let outcome = hold_with_workers(args, target, set, n).await;
    let _ = progress_tx.send(true);
    let _ = progress.await;
    outcome
}

async fn hold_with_workers(
    args: &IdleArgs,
    target: &Target,
    set: &mut WorkerSet,
    n: usize,
) -> Result<Gathered, String> {
    let connect_started = Instant::now();
    let connect_by = connect_started + Duration::from_secs(args.timeout + 10);
    if !set
        .wait_all(connect_by, |s| s.ready.load(Ordering::Relaxed))
        .await
    {
        return Err("workers did not connect their sockets before --timeout".into());
    }
    let connect_secs = connect_started.elapsed().as_secs_f64();
    let not_ready = set.count(|s| !s.ready.load(Ordering::Relaxed));
    if not_ready > 0 {
        let errs: Vec<String> = set.states.iter().filter_map(|s| s.error()).collect();
        return Err(format!(
            "{not_ready} workers exited before connecting: {}",
            errs.join("; ")
        ));
    }
    eprintln!(
        "{} of {} sockets established in {connect_secs:.2}s ({} failed, {} retries)",
        set.sum("established"),
        args.sockets,
        set.sum("failed"),
        set.sum("retries")
    );
    let node_established = target.sample_nodes();
    let client_established = server::sample_proc("self");
    let workers_rss_kb = Some(set.sum("rss_kb"));
    let hold_started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.hold)).await;
    let hold_secs = hold_started.elapsed().as_secs_f64();
    let node_after_hold = target.sample_nodes();
    let client_after_hold = server::sample_proc("self");
    let stop = json!({"cmd": "stop"});
    let mut notes = Vec::new();
    for i in 0..set.len() {
        if let Err(e) = set.send(i, &stop).await {
            notes.push(format!("stop not sent: {e}"));
        }
    }
    let all = set
        .wait_all(Instant::now() + Duration::from_secs(45), |s| s.has_report())
        .await;
    if !all {
        notes.push("not every worker reported within 45 s of the stop".into());
    }
    let mut g = Gathered {
        established: 0,
        failed: 0,
        retries: 0,
        pings: 0,
        connect_secs,
        connect_us: Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)
            .map_err(|e| e.to_string())?,
        connect_errors: Vec::new(),
        established_per_node: vec![0; n],
        hold: ShareHold {
            held_per_node: vec![0; n],
            ..ShareHold::default()
        },
        hold_secs,
        node_established,
        node_after_hold,
        client_established,
        client_after_hold,
        worker_pids: Vec::new(),
        workers_rss_kb,
        worker_notes: notes,
    };
    for (i, s) in set.states.iter().enumerate() {
        let Some(v) = s.take_report() else {
            // Its sockets count as failed: they are not in `established`.
            g.worker_notes.push(format!(
                "worker {i}: no report{}",
                s.error().map(|e| format!(" ({e})")).unwrap_or_default()
            ));
            continue;
        };
        let r: IdleWorkerReport =
            serde_json::from_value(v).map_err(|e| format!("worker {i} report: {e}"))?;
        g.established += r.established;
        g.failed += r.failed;
        g.retries += r.retries;
        g.pings += r.pings;
        g.connect_us
            .add(workers::hist_from_hex(&r.connect_hist)?)
            .map_err(|e| format!("merge histogram: {e}"))?;
        for e in r.connect_errors {
            if g.connect_errors.len() < KEEP_ERRORS {
                g.connect_errors.push(e);
            }
        }
        for (a, b) in g
            .established_per_node
            .iter_mut()
            .zip(&r.established_per_node)
        {
            *a += b;
        }
        g.hold.held += r.hold.held;
        g.hold.lost += r.hold.lost;
        g.hold.frames += r.hold.frames;
        for why in r.hold.lost_reasons {
            if g.hold.lost_reasons.len() < KEEP_ERRORS {
                g.hold.lost_reasons.push(why);
            }
        }
        for (a, b) in g.hold.held_per_node.iter_mut().zip(&r.hold.held_per_node) {
            *a += b;
        }
    }
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> IdleArgs {
        #[derive(clap::Parser)]
        struct W {
            #[command(flatten)]
            a: IdleArgs,
        }
        let mut argv = vec!["idle"];
        argv.extend_from_slice(extra);
        <W as clap::Parser>::try_parse_from(argv).expect("args").a
    }

    #[test]
    fn sockets_beyond_one_process_go_to_workers() {
        assert_eq!(args(&["--sockets", "19000"]).worker_count(), 0);
        assert_eq!(args(&["--sockets", "30000"]).worker_count(), 4);
        assert_eq!(
            args(&["--sockets", "30000", "--workers", "2"]).worker_count(),
            2
        );
        assert_eq!(
            args(&["--sockets", "3", "--workers", "8"]).worker_count(),
            3
        );
        assert!(preflight(&args(&["--sockets", "60000", "--workers", "2"])).is_err());
    }

    #[test]
    fn a_share_spreads_its_sockets_over_the_nodes() {
        let bases = vec![
            "http://127.0.0.1:7001".to_string(),
            "http://127.0.0.1:7002".to_string(),
            "http://127.0.0.1:7003".to_string(),
        ];
        let face = FaceArgs {
            face: Face::Pusher,
            protocol: 2,
        };
        let s = Share::new(
            &face,
            &bases,
            "k",
            vec![Arc::new("c".into())],
            4,
            5,
            8,
            Duration::from_secs(1),
            0,
            Instant::now(),
            0,
        );
        assert_eq!(s.urls.len(), 3);
        assert_eq!(s.urls[1].as_str(), "ws://127.0.0.1:7002/app/k?protocol=2");
        assert!(s.addrs.iter().all(Option::is_some));
        assert_eq!(s.concurrency, 1);
        // Sockets 4..9 of the run: nodes 1, 2, 0, 1, 2.
        assert_eq!(cluster::share_per_node(s.first, s.count, 3), vec![1, 2, 2]);
    }
}
