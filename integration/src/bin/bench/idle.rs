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
use serde_json::{json, Value};
use tokio::net::TcpSocket;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;

use crate::api::{self, Api};
use crate::pusher::{self, Face, FaceArgs};
use crate::report::{cpu_delta, opt};
use crate::server::{self, ProcSample};
use crate::subscriber::Ws;
use crate::{random_tag, sample, Target, TargetArgs};

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
        Ok(())
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
    /// The successful attempt's duration, µs.
    micros: Option<u64>,
    reader: Option<JoinHandle<ReaderEnd>>,
    error: Option<String>,
}

/// Small buffers: this many idle sockets should not cost the bench 256 KiB each.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

/// TCP connect (from `route`'s source address when given) and WebSocket upgrade of `req`.
pub(crate) async fn open_ws(
    req: tokio_tungstenite::tungstenite::handshake::client::Request,
    route: Option<(SocketAddr, Ipv4Addr)>,
) -> Result<Ws, String> {
    let (ws, _) = match route {
        Some((server, source)) => {
            let sock = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
            sock.bind(SocketAddr::from((source, 0)))
                .map_err(|e| format!("bind {source}: {e}"))?;
            let stream = sock
                .connect(server)
                .await
                .map_err(|e| format!("tcp connect from {source}: {e}"))?;
            let _ = stream.set_nodelay(true);
            tokio_tungstenite::client_async_with_config(
                req,
                MaybeTlsStream::Plain(stream),
                Some(ws_config()),
            )
            .await
            .map_err(|e| format!("ws upgrade: {e}"))?
        }
        None => tokio_tungstenite::connect_async_with_config(req, Some(ws_config()), true)
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
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                match (
                    v.get("type").and_then(Value::as_str),
                    v.get("cursor").and_then(Value::as_str),
                ) {
                    (Some("realtime.ready"), Some(cursor)) => Ok((ws, cursor.to_string())),
                    _ => Err(format!(
                        "first frame is not realtime.ready with a cursor: {}",
                        api::snippet(t.as_bytes())
                    )),
                }
            }
            Some(Ok(Message::Close(c))) => Err(format!("closed before ready: {c:?}")),
            Some(Ok(other)) => Err(format!("unexpected first frame: {other:?}")),
            Some(Err(e)) => Err(format!("ws read: {e}")),
            None => Err("ws ended before ready".into()),
        }
    };
    tokio::time::timeout(within, attempt)
        .await
        .map_err(|_| format!("no realtime.ready within {within:?}"))?
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
        row(
            "server",
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
        println!("-- server memory");
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
        println!("-- bench client");
        row(
            "RSS idle / established (MiB), per socket",
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
        for e in &self.connect_errors {
            println!("  connect error: {e}");
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
            },
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
            },
        })
    }
}

/// Prints established/open/lost and the server's RSS once a second until told to stop.
async fn progress_line(shared: Arc<Shared>, mut stop: watch::Receiver<bool>, pid: Option<u32>) {
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
        let srv = sample(pid)
            .map(|s| format!(" server cpu {:.1}s rss {} MiB", s.cpu_secs, s.rss_kb / 1024))
            .unwrap_or_default();
        eprintln!(
            "[{:>5.1}s] established {} open {} lost {} failed {} retries {}{srv}",
            start.elapsed().as_secs_f64(),
            shared.established.load(Ordering::Relaxed),
            shared.open.load(Ordering::Relaxed),
            shared.lost.load(Ordering::Relaxed),
            shared.failed.load(Ordering::Relaxed),
            shared.retries.load(Ordering::Relaxed),
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
    check_nofile(args.sockets)
}

/// Chat face: `--members` entities and their tokens.
async fn chat_tokens(
    args: &IdleArgs,
    target: &Target,
    tag: &str,
) -> Result<Vec<Arc<String>>, String> {
    let api = Api {
        client: api::http_client(SETUP_CONCURRENCY + 4)?,
        base: target.base.clone(),
        creds: target.creds.clone(),
    };
    let setup_deadline = Instant::now() + Duration::from_secs(60);
    let ids: Vec<String> = (0..args.members)
        .map(|i| format!("bench-{tag}-idle{i}"))
        .collect();
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
    let tokens: Vec<Arc<String>> = ids
        .iter()
        .map(|id| api::mint_token(&target.creds, id, 3600).map(Arc::new))
        .collect::<Result<_, _>>()?;
    eprintln!("created {} entities", ids.len());
    Ok(tokens)
}

/// The idle scenario on a ready server.
pub async fn run(args: &IdleArgs, target: &Target) -> Result<IdleReport, String> {
    if let Some(pid) = target.server_pid {
        if let Some((soft, _)) = nofile_limits(&pid.to_string()) {
            if (args.sockets as u64) + FD_MARGIN > soft {
                eprintln!(
                    "warning: server pid {pid} may open only {soft} files; {} sockets will not fit",
                    args.sockets
                );
            }
        }
    }
    let tag = random_tag();
    // Chat: the members' tokens; Pusher: the channel names. Round-robin over the sockets.
    let keys: Vec<Arc<String>> = match args.face.face {
        Face::Chat => chat_tokens(args, target, &tag).await?,
        Face::Pusher => (0..args.members)
            .map(|i| Arc::new(format!("bench-idle-{tag}-{i}")))
            .collect(),
    };

    // Idle figures: let the set-up settle first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let server_before = sample(target.server_pid);
    let client_before = server::sample_proc("self");

    let shared = Arc::new(Shared::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let (progress_tx, progress_rx) = watch::channel(false);
    let progress = tokio::spawn(progress_line(
        shared.clone(),
        progress_rx,
        target.server_pid,
    ));

    let url = Arc::new(match args.face.face {
        Face::Chat => format!(
            "{}/api/realtime/ws",
            target.base.replacen("http://", "ws://", 1)
        ),
        Face::Pusher => pusher::app_url(&target.base, &target.creds.key, args.face.protocol),
    });
    eprintln!("sockets: {} on {url}", args.face.label());
    let server_addr = loopback_v4(&target.base).filter(|_| args.source_ips > 0);
    match server_addr {
        Some(a) => eprintln!(
            "connecting to {a} from 127.0.0.2..127.0.0.{}",
            1 + args.source_ips
        ),
        None => eprintln!("connecting from kernel-chosen source addresses"),
    }
    let within = Duration::from_secs(args.connect_timeout);
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let connect_started = Instant::now();
    let outcomes: Vec<Connected> = futures_util::stream::iter((0..args.sockets).map(|i| {
        let key = keys[i % keys.len()].clone();
        ConnectJob {
            url: url.clone(),
            dial: match args.face.face {
                Face::Chat => Dial::Chat(key),
                Face::Pusher => Dial::Pusher(key),
            },
            route: server_addr.map(|a| {
                let k = (i % usize::from(args.source_ips.max(1))) as u8;
                (a, Ipv4Addr::new(127, 0, 0, 2 + k))
            }),
            within,
            retries: args.retries,
            deadline,
            stop: stop_rx.clone(),
            shared: shared.clone(),
        }
        .run()
    }))
    .buffer_unordered(args.connect_concurrency)
    .collect()
    .await;
    let connect_secs = connect_started.elapsed().as_secs_f64();

    let mut connect_us =
        Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).map_err(|e| e.to_string())?;
    let mut readers = Vec::with_capacity(outcomes.len());
    let mut connect_errors = Vec::new();
    for c in outcomes {
        if let Some(us) = c.micros {
            connect_us
                .record(us.max(1))
                .map_err(|e| format!("histogram: {e}"))?;
        }
        readers.extend(c.reader);
        if let Some(e) = c.error {
            if connect_errors.len() < KEEP_ERRORS {
                connect_errors.push(e);
            }
        }
    }
    let established = shared.established.load(Ordering::Relaxed);
    eprintln!(
        "{established} of {} sockets established in {connect_secs:.2}s ({} failed, {} retries)",
        args.sockets,
        shared.failed.load(Ordering::Relaxed),
        shared.retries.load(Ordering::Relaxed)
    );

    // Hold: every reader keeps reading (and answering pings).
    let server_established = sample(target.server_pid);
    let client_established = server::sample_proc("self");
    let hold_started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.hold)).await;
    let hold_secs = hold_started.elapsed().as_secs_f64();
    let server_after_hold = sample(target.server_pid);
    let client_after_hold = server::sample_proc("self");
    let _ = stop_tx.send(true);
    let _ = progress_tx.send(true);
    let _ = progress.await;

    let mut held = 0u64;
    let mut lost = 0u64;
    let mut frames = 0u64;
    let mut lost_reasons = Vec::new();
    let collect_by = Instant::now() + Duration::from_secs(30);
    for r in readers {
        match tokio::time::timeout_at(collect_by, r).await {
            Ok(Ok(end)) => {
                frames += end.frames;
                if end.held {
                    held += 1;
                } else {
                    lost += 1;
                    if let (Some(why), true) = (end.why, lost_reasons.len() < KEEP_ERRORS) {
                        lost_reasons.push(why);
                    }
                }
            }
            Ok(Err(e)) => {
                lost += 1;
                if lost_reasons.len() < KEEP_ERRORS {
                    lost_reasons.push(format!("reader task: {e}"));
                }
            }
            Err(_) => {
                return Err("readers did not stop within 30s of the end of the hold".into());
            }
        }
    }
    let (log_lines, log_sample) = target.log_problems();
    Ok(IdleReport {
        args: args.clone(),
        base: target.base.clone(),
        server_pid: target.server_pid,
        server_started_here: target.child.is_some(),
        established,
        failed: shared.failed.load(Ordering::Relaxed),
        retries: shared.retries.load(Ordering::Relaxed),
        connect_secs,
        connect_us,
        held,
        lost,
        lost_reasons,
        connect_errors,
        pings: shared.pings.load(Ordering::Relaxed),
        frames_during_hold: frames,
        hold_secs,
        server_before,
        server_established,
        server_after_hold,
        client_before,
        client_established,
        client_after_hold,
        server_log_problems: log_lines,
        server_log_sample: log_sample,
    })
}
