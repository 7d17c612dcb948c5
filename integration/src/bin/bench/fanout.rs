//! `fanout`: N WebSocket subscribers on one public channel, P publishes/s.
//!
//! The coordinator (this process) starts the server (or uses `--url`), creates a publisher and
//! `--members` plain workspace members (one per subscriber by default) and one PUBLIC group
//! channel. Members of the workspace receive a public channel's events on
//! `/api/realtime/ws` without joining it (the workspace fan-out filters only private
//! recipients and guests), so the subscribers need no channel membership and the channel
//! stays under `max_channel_members`. The subscriber sockets live in `--workers` worker
//! processes (`bench/workers.rs`), spread over source addresses 127.0.0.2.. like `idle`.
//! Sockets connect through the generator's own lean WebSocket client (`bench/rawws.rs`) and,
//! once all are subscribed, one thread per worker reads them all from one epoll set
//! (`bench/fanout_rx.rs`), pausing `--read-pause-us` between waits that found few ready.
//!
//! The publisher posts at a fixed rate (open loop, at most `--max-in-flight` posts
//! unanswered; a tick that finds that many is skipped and counted). Each message's data is
//! `"<n>:<send time, Unix ns>"`; every subscriber checks every `message.created` for loss,
//! duplicates and seq order and records send-to-receive latency in its worker's HDR histogram
//! (same host, one wall clock); workers count deliveries in 1 s bins, so the coordinator can
//! give the sustained rate (the slowest 1 s window after `--warmup`). Server CPU and RSS come
//! from the server's own /proc entries.
//!
//! `--face pusher` (see `bench/pusher.rs`) loads the Pusher face instead: no entities and no
//! chat channel; the sockets connect to `/app/{key}` (`--protocol 2`: `?protocol=2`, `1`:
//! `?protocol=7`), subscribe to the public channel `bench-fanout-<tag>` and answer the
//! server's `pusher:ping`; the publisher sends signed `POST /apps/{id}/events` (event
//! `bench`, the same `"<n>:<send ns>"` data). The same checks run on the `bench` events: V2's
//! `serial` takes the place of `seq` (order, gaps; the first expected serial is the one
//! `subscription_succeeded` announced), V1 frames carry none (loss and duplicates only). A
//! 4100 close (the server's outbound queue for the socket overflowed) counts as an overflow
//! close and ends the socket as failed: this version does not resume.

use std::borrow::Cow;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use futures_util::StreamExt as _;
use hdrhistogram::Histogram;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::api::{self, Api};
use crate::chat::quantiles;
use crate::idle::{self, FD_CAP, FD_MARGIN};
use crate::plot::{Point, Recorder, Timeline};
use crate::poster::{reason, retry_after};
use crate::pusher::{self, Face, FaceArgs, PusherFrame};
use crate::report::{cpu_delta, hist_json, opt, proc_json};
use crate::scan::Scanner;
use crate::server::{self, AppCreds, ProcSample};
use crate::subscriber::cursor_gt;
use crate::workers::{self, hist_from_hex, hist_to_hex, unix_ns, Out, WorkerSet};
use crate::{random_tag, Target, TargetArgs};

/// Concurrent entity creations.
const SETUP_CONCURRENCY: usize = 16;
/// How often a subscriber looks at its worker's phase (drain, abort) and its deadline.
const TICK: Duration = Duration::from_millis(250);
/// Reconnects (with the last cursor) per subscriber after a 1013 overflow close.
const MAX_RECONNECTS: u64 = 5;
/// Attempts per publish on 429/503 or a transport error.
const MAX_ATTEMPTS: u32 = 3;
/// Error messages kept per worker and in the report.
const KEEP_ERRORS: usize = 5;
/// Most subscriber bitmap memory (subscribers × publishes / 8) the workers may hold.
const MAX_BITMAP_BYTES: usize = 512 << 20;

/// `switchboard-bench fanout --help`: the faces and how to run them.
pub const HELP: &str = "\
Faces (--face):
  chat (default)  Sockets on /api/realtime/ws, logged in as --members workspace entities; a
                  publisher entity posts POST /api/channels/{id}/messages to one public chat
                  channel; every message.created is checked (seq order and gaps, cursor); a
                  1013 overflow close reconnects with the last cursor (at most 5 times).
  pusher          Sockets on /app/{key}?protocol=2 (--protocol 2, Sockudo V2) or ?protocol=7
                  (--protocol 1, plain Pusher), no token, no entities; each subscribes to the
                  public channel bench-fanout-<tag> and answers pusher:ping with pusher:pong.
                  Publishes are signed POST /apps/{id}/events (event \"bench\", data
                  \"<n>:<send ns>\"). V2 checks order and gaps by `serial`; V1 frames have no
                  serial (loss and duplicates only). A 4100 close (the server's outbound queue
                  for the socket overflowed) is counted as an overflow close and the socket
                  fails: no resume in this version.

Examples:
  switchboard-bench fanout --subscribers 10000 --rate 15 --duration 60
  switchboard-bench fanout --face pusher --subscribers 10000 --rate 15 --duration 60
  switchboard-bench fanout --face pusher --protocol 1 --subscribers 200 --rate 5 --duration 5
  Another Pusher-compatible server on loopback (its app id, key and secret):
  switchboard-bench fanout --face pusher --protocol 1 --url http://127.0.0.1:6001 \\
      --app ID:KEY:SECRET --server-pid PID --subscribers 1000 --rate 10 --duration 30";

#[derive(Args, Clone, Debug)]
pub struct FanoutArgs {
    /// WebSocket subscribers, all receiving the one public channel.
    #[arg(long, default_value_t = 10_000)]
    pub subscribers: usize,
    /// Publishes per second (open loop).
    #[arg(long, default_value_t = 15.0)]
    pub rate: f64,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 60)]
    pub duration: u64,
    /// Worker processes holding the sockets (default: one per 9,000 sockets, at least 1).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Tokio threads per worker process (connects, control; one more thread reads the
    /// sockets).
    #[arg(long, default_value_t = 1)]
    pub worker_threads: usize,
    /// Entities the sockets log in as, round-robin (default: one per subscriber; chat face).
    #[arg(long)]
    pub members: Option<usize>,
    /// Seconds at the start of publishing left out of the sustained (slowest 1 s) rate.
    #[arg(long, default_value_t = 5)]
    pub warmup: u64,
    /// Unanswered publishes at most; a tick that finds this many is skipped and counted.
    #[arg(long, default_value_t = 64)]
    pub max_in_flight: usize,
    /// Handshakes in flight at once, per worker.
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,
    /// Seconds one connect attempt (TCP, upgrade, `realtime.ready`) may take.
    #[arg(long, default_value_t = 10)]
    pub connect_timeout: u64,
    /// Retries per socket after a failed or timed-out connect attempt.
    #[arg(long, default_value_t = 2)]
    pub retries: u32,
    /// Loopback source addresses (127.0.0.2, ...) the sockets are spread over; 0: kernel's.
    #[arg(long, default_value_t = 8)]
    pub source_ips: u8,
    /// After publishing ends, a subscriber stops after this many seconds without a frame.
    #[arg(long, default_value_t = 10)]
    pub drain_idle: u64,
    /// µs a worker's receive thread pauses after an epoll wait that found fewer than 1,024
    /// ready sockets, so it reads deliveries in batches instead of being woken for each one
    /// (on loopback the server's send pays for that wake-up). Adds at most this much to a
    /// delivery's latency; 0: no pause.
    #[arg(long, default_value_t = 1000)]
    pub read_pause_us: u64,
    /// Nice value (0..=19) of each worker's receive thread. Above 0 the server's threads
    /// get the cores first when both want them, so the send-to-arrival figure shows the
    /// fan-out with less of the generator in its way (the send-to-receive figure then
    /// includes a longer read queue).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub reader_nice: i32,
    /// Overall bound in seconds (after the server is ready); every process stops by then.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Fail the run if the sustained deliveries/s is below this.
    #[arg(long)]
    pub expect_rate: Option<f64>,
    /// Fail the run if the p99 send-to-receive latency (ms) is above this.
    #[arg(long)]
    pub expect_p99_ms: Option<f64>,
    /// Write an SVG of send-to-receive latency percentiles per second here (and add a
    /// `timeline` to the JSON); the workers send per-second histograms.
    #[arg(long, value_name = "PATH.svg")]
    pub plot: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub face: FaceArgs,
    #[command(flatten)]
    pub target: TargetArgs,
}

impl FanoutArgs {
    fn publishes(&self) -> usize {
        ((self.rate * self.duration as f64).round() as usize).max(1)
    }

    fn worker_count(&self) -> usize {
        self.workers
            .unwrap_or_else(|| workers::default_workers(self.subscribers))
            .clamp(1, self.subscribers.max(1))
    }

    fn validate(&self) -> Result<(), String> {
        if self.subscribers == 0 || self.connect_concurrency == 0 || self.max_in_flight == 0 {
            return Err(
                "--subscribers, --connect-concurrency and --max-in-flight must be at least 1"
                    .into(),
            );
        }
        if !(self.rate > 0.0 && self.rate <= 10_000.0) {
            return Err("--rate must be in (0, 10000] publishes/s".into());
        }
        if self.duration == 0 || self.connect_timeout == 0 {
            return Err("--duration and --connect-timeout must be at least 1".into());
        }
        if self.members == Some(0) || self.workers == Some(0) {
            return Err("--members and --workers must be at least 1".into());
        }
        if self.source_ips > 253 {
            return Err("--source-ips must be at most 253 (127.0.0.2..127.0.0.254)".into());
        }
        if self.duration + self.drain_idle + 30 > self.timeout {
            return Err(format!(
                "--timeout {} leaves no room for set-up: use at least --duration + --drain-idle + 30 = {}",
                self.timeout,
                self.duration + self.drain_idle + 30
            ));
        }
        let bitmap = self
            .subscribers
            .saturating_mul(self.publishes().div_ceil(8));
        if bitmap > MAX_BITMAP_BYTES {
            return Err(format!(
                "{} subscribers × {} publishes need {} MiB of delivery bitmaps (at most {} MiB): \
                 lower --rate, --duration or --subscribers",
                self.subscribers,
                self.publishes(),
                bitmap >> 20,
                MAX_BITMAP_BYTES >> 20
            ));
        }
        let k = self.worker_count();
        let share = self.subscribers.div_ceil(k) as u64;
        let soft = idle::nofile_limits("self").map_or(FD_CAP, |(soft, _)| soft.min(FD_CAP));
        if share + FD_MARGIN > soft {
            return Err(format!(
                "{share} sockets per worker (of {k}) need about {} open files; a worker may hold \
                 {soft}: use --workers {} or more",
                share + FD_MARGIN,
                (self.subscribers as u64).div_ceil(soft.saturating_sub(FD_MARGIN).max(1))
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// What crosses the pipe.

/// One worker's share of the run (the first line on its stdin).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct FanoutJob {
    pub scenario: String,
    pub worker: usize,
    pub base: String,
    /// Every node's `http://host:port` (cluster): socket `g` connects to node
    /// `g % nodes.len()`; empty: all to `base`.
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Workspace credentials `id:key:secret` (tokens are minted in the worker).
    pub app: String,
    /// Socket `g` logs in as entity `<prefix><g % members>`.
    pub entity_prefix: String,
    pub members: usize,
    /// Global index of this worker's first socket, and how many it holds.
    pub first_socket: usize,
    pub sockets: usize,
    pub source_ips: u8,
    /// Chat: the channel's id; Pusher: its name.
    pub channel_id: String,
    #[serde(default)]
    pub face: Face,
    /// Pusher protocol version (1 or 2).
    #[serde(default)]
    pub protocol: u8,
    /// Publishes planned (message numbers 0..slots).
    pub slots: usize,
    pub connect_concurrency: usize,
    pub connect_timeout_secs: u64,
    pub retries: u32,
    pub drain_idle_secs: u64,
    #[serde(default)]
    pub read_pause_us: u64,
    #[serde(default)]
    pub reader_nice: i32,
    /// Unix ns the delivery bins count from (bin i: [epoch + i s, epoch + (i+1) s)).
    pub epoch_ns: u64,
    /// The worker stops by itself this long after it starts.
    pub max_secs: u64,
    /// Keep per-second latency histograms (from `epoch_ns`) for `--plot`.
    #[serde(default)]
    pub plot: bool,
}

/// Additive delivery checks: per socket, per worker, per run.
#[derive(Serialize, Deserialize, Default, Clone, Debug)]
pub struct Tally {
    pub frames: u64,
    pub message_frames: u64,
    pub other_frames: u64,
    pub missing: u64,
    pub duplicates: u64,
    pub unacked_delivered: u64,
    pub out_of_order: u64,
    pub seq_gaps: u64,
    pub cursor_regressions: u64,
    /// `message.created` of another channel, or without this run's stamp.
    pub foreign: u64,
    pub unparsable: u64,
    /// Chat: 1013 closes; Pusher: 4100 closes.
    pub overflow_closes: u64,
    pub reconnects: u64,
    /// Pusher: `pusher:ping` frames answered with `pusher:pong` (counted in other frames too).
    #[serde(default)]
    pub pings: u64,
    /// Bench messages read without a kernel receive stamp (bytes read with the handshake,
    /// or a kernel that does not stamp): not in the arrival histogram.
    #[serde(default)]
    pub unstamped: u64,
    /// Sockets that received every acknowledged publish and ended without an error.
    pub complete: u64,
    /// Sockets stopped by the deadline.
    pub timed_out: u64,
    pub socket_errors: u64,
}

impl Tally {
    fn add(&mut self, o: &Tally) {
        self.frames += o.frames;
        self.message_frames += o.message_frames;
        self.other_frames += o.other_frames;
        self.missing += o.missing;
        self.duplicates += o.duplicates;
        self.unacked_delivered += o.unacked_delivered;
        self.out_of_order += o.out_of_order;
        self.seq_gaps += o.seq_gaps;
        self.cursor_regressions += o.cursor_regressions;
        self.foreign += o.foreign;
        self.unparsable += o.unparsable;
        self.overflow_closes += o.overflow_closes;
        self.reconnects += o.reconnects;
        self.pings += o.pings;
        self.unstamped += o.unstamped;
        self.complete += o.complete;
        self.timed_out += o.timed_out;
        self.socket_errors += o.socket_errors;
    }
}

/// One node's share of a worker's (or the run's) sockets.
#[derive(Serialize, Deserialize, Default, Clone, Debug, PartialEq, Eq)]
pub struct NodeTally {
    pub established: u64,
    pub deliveries: u64,
    pub missing: u64,
    pub complete: u64,
    pub socket_errors: u64,
}

impl NodeTally {
    fn add(&mut self, o: &NodeTally) {
        self.established += o.established;
        self.deliveries += o.deliveries;
        self.missing += o.missing;
        self.complete += o.complete;
        self.socket_errors += o.socket_errors;
    }
}

/// Adds `from` into `into` node by node (growing it as needed).
fn add_per_node(into: &mut Vec<NodeTally>, from: &[NodeTally]) {
    if into.len() < from.len() {
        into.resize(from.len(), NodeTally::default());
    }
    for (a, b) in into.iter_mut().zip(from) {
        a.add(b);
    }
}

/// A worker's final line.
#[derive(Serialize, Deserialize, Default, Debug)]
pub struct WorkerReport {
    pub worker: usize,
    pub sockets: usize,
    pub established: u64,
    pub failed: u64,
    pub retries: u64,
    pub connect_secs: f64,
    pub connect_errors: Vec<String>,
    pub socket_error_sample: Vec<String>,
    /// µs, hdrhistogram V2, hex.
    pub connect_hist: String,
    pub latency_hist: String,
    /// Send-to-arrival by the kernel's receive stamp (`rxstamp.rs`), µs, V2 hex.
    #[serde(default)]
    pub arrival_hist: String,
    pub tally: Tally,
    /// Whether the coordinator's drain (the list of acknowledged publishes) arrived.
    pub drained: bool,
    pub first_delivery_ns: u64,
    pub last_delivery_ns: u64,
    pub bins: Vec<u64>,
    pub cpu_secs: f64,
    pub rss_kb: u64,
    /// `--plot`: non-empty seconds since `epoch_ns` as (bin, µs histogram V2 hex).
    #[serde(default)]
    pub timeline: Vec<(usize, String)>,
    /// By node (cluster): sockets established, deliveries, loss.
    #[serde(default)]
    pub per_node: Vec<NodeTally>,
}

/// What the coordinator tells the subscribers.
#[derive(Clone)]
enum Phase {
    Run,
    /// Publishing ended: these were acknowledged; stop once all are in (or idle).
    Drain(Arc<Drain>),
    Abort,
}

struct Drain {
    expected: u64,
    acked: Vec<bool>,
}

// ---------------------------------------------------------------------------------------
// Worker side: one socket.

/// State every socket of a worker shares.
struct SockCtx {
    face: Face,
    /// Chat: the channel's id; Pusher: its name.
    channel: String,
    slots: usize,
    epoch_ns: u64,
    drain_idle: Duration,
    /// See `--read-pause-us`.
    read_pause: Duration,
    /// See `--reader-nice`.
    reader_nice: i32,
    reconnect_within: Duration,
    deadline: Instant,
    /// Send-to-receive latency, µs.
    hist: Mutex<Histogram<u64>>,
    /// Send-to-arrival latency by the kernel's receive stamp, µs.
    arrival_hist: Mutex<Histogram<u64>>,
    /// The same latencies by second of receipt since `epoch_ns` (`--plot`).
    timeline: Recorder,
    bins: Vec<AtomicU64>,
    delivered: AtomicU64,
    open: AtomicU64,
    errors: AtomicU64,
}

impl SockCtx {
    fn new(job: &FanoutJob, deadline: Instant) -> Result<Self, String> {
        Ok(Self {
            face: job.face,
            channel: job.channel_id.clone(),
            slots: job.slots,
            epoch_ns: job.epoch_ns,
            drain_idle: Duration::from_secs(job.drain_idle_secs),
            read_pause: Duration::from_micros(job.read_pause_us),
            reader_nice: job.reader_nice,
            reconnect_within: Duration::from_secs(job.connect_timeout_secs),
            deadline,
            hist: Mutex::new(latency_hist()?),
            arrival_hist: Mutex::new(latency_hist()?),
            timeline: Recorder::new(job.plot, job.epoch_ns),
            bins: (0..=job.max_secs).map(|_| AtomicU64::new(0)).collect(),
            delivered: AtomicU64::new(0),
            open: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        })
    }
}

fn latency_hist() -> Result<Histogram<u64>, String> {
    // Microseconds, 1 µs .. 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).map_err(|e| format!("histogram: {e}"))
}

/// A frame of the chat face (`/api/realtime/ws`).
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type")]
    ty: &'a str,
    #[serde(default)]
    cursor: Option<&'a str>,
    #[serde(default)]
    channel_id: Option<&'a str>,
    #[serde(default)]
    seq: Option<i64>,
    #[serde(default, borrow)]
    payload: Option<Payload<'a>>,
}

#[derive(Deserialize)]
struct Payload<'a> {
    #[serde(default)]
    data: Option<&'a str>,
}

/// `"<n>:<send ns>"`.
fn parse_stamp(data: &str) -> Option<(usize, u64)> {
    let (n, t) = data.split_once(':')?;
    Some((n.parse().ok()?, t.parse().ok()?))
}

#[derive(Debug, PartialEq, Eq)]
enum Kind {
    /// A bench publish: chat `message.created`, Pusher event `bench`.
    Message,
    /// The Pusher protocol's `pusher:ping` / `sockudo:ping`: answer it.
    Ping,
    Other,
}

/// What the checks read of a frame, whichever face it came from.
struct Seen<'a> {
    kind: Kind,
    /// Chat only.
    cursor: Option<&'a str>,
    /// Chat: `channel_id`; Pusher: `channel`.
    channel: Option<Cow<'a, str>>,
    /// Chat: `seq`; Pusher V2: `serial` (V1: none).
    seq: Option<i64>,
    /// Chat: `payload.data`; Pusher: `data`.
    data: Option<Cow<'a, str>>,
}

impl<'a> Seen<'a> {
    fn parse(face: Face, text: &'a str) -> Option<Self> {
        match face {
            Face::Chat => {
                if let Some(seen) = Self::scan_chat(text) {
                    return Some(seen);
                }
                let f: Frame<'a> = serde_json::from_str(text).ok()?;
                Some(Self {
                    kind: if f.ty == "message.created" {
                        Kind::Message
                    } else {
                        Kind::Other
                    },
                    cursor: f.cursor,
                    channel: f.channel_id.map(Cow::Borrowed),
                    seq: f.seq,
                    data: f.payload.and_then(|p| p.data).map(Cow::Borrowed),
                })
            }
            Face::Pusher => {
                let f: PusherFrame<'a> = serde_json::from_str(text).ok()?;
                let kind = if f.event == pusher::EVENT {
                    Kind::Message
                } else if f.is_ping() {
                    Kind::Ping
                } else {
                    Kind::Other
                };
                Some(Self {
                    kind,
                    cursor: None,
                    channel: f.channel,
                    seq: f.serial,
                    data: f.data.0,
                })
            }
        }
    }

    /// The chat face's fast path: the members the checks read, borrowed, stopping at
    /// `payload.data` once the others are known (the server writes `payload` last). `None`
    /// (escapes, an unexpected shape) leaves the frame to serde.
    fn scan_chat(text: &'a str) -> Option<Self> {
        let mut s = Scanner::new(text);
        s.begin_object()?;
        let (mut ty, mut cursor, mut channel, mut seq, mut data) = (None, None, None, None, None);
        while let Some(key) = s.next_key().ok()? {
            match key {
                "type" => ty = Some(s.plain_str()?),
                "cursor" => cursor = Some(s.plain_str()?),
                "channel_id" => {
                    channel = if s.null()? {
                        None
                    } else {
                        Some(s.plain_str()?)
                    }
                }
                "seq" => seq = s.int()?,
                "payload" => {
                    if s.null()? {
                        continue;
                    }
                    s.begin_object()?;
                    let mut complete = false;
                    while let Some(key) = s.next_key().ok()? {
                        if key != "data" {
                            s.skip()?;
                            continue;
                        }
                        data = if s.null()? {
                            None
                        } else {
                            Some(s.plain_str()?)
                        };
                        complete = ty.is_some()
                            && cursor.is_some()
                            && channel.is_some()
                            && seq.is_some()
                            && data.is_some();
                        if complete {
                            break;
                        }
                    }
                    if complete {
                        break;
                    }
                }
                _ => s.skip()?,
            }
        }
        let ty = ty?;
        Some(Self {
            kind: if ty == "message.created" {
                Kind::Message
            } else {
                Kind::Other
            },
            cursor,
            channel: channel.map(Cow::Borrowed),
            seq,
            data: data.map(Cow::Borrowed),
        })
    }
}

/// One subscriber's checks.
struct Check {
    /// Bit n: message n arrived.
    seen: Vec<u8>,
    unique: u64,
    last_seq: Option<i64>,
    cursor: String,
    tally: Tally,
    first_ns: u64,
    last_ns: u64,
}

impl Check {
    /// `cursor`: the chat face's `realtime.ready` cursor (Pusher: empty); `last_seq`: the
    /// channel's seq before the first expected delivery, when known (Pusher V2's
    /// `subscription_succeeded` serial), else the first delivery's seq is taken as it is.
    fn new(slots: usize, cursor: String, last_seq: Option<i64>) -> Self {
        Self {
            seen: vec![0; slots.div_ceil(8)],
            unique: 0,
            last_seq,
            cursor,
            tally: Tally::default(),
            first_ns: 0,
            last_ns: 0,
        }
    }

    /// Checks one text frame; `true` when it is a Pusher ping the socket must answer.
    /// `arrived_ns`: the kernel's receive stamp of the read that completed it, if any.
    fn frame(&mut self, text: &str, ctx: &SockCtx, arrived_ns: Option<u64>) -> bool {
        let recv_ns = unix_ns();
        self.tally.frames += 1;
        let Some(f) = Seen::parse(ctx.face, text) else {
            self.tally.unparsable += 1;
            return false;
        };
        if let Some(c) = f.cursor {
            if !cursor_gt(c, &self.cursor) {
                self.tally.cursor_regressions += 1;
            }
            self.cursor.clear();
            self.cursor.push_str(c);
        }
        match f.kind {
            Kind::Message => {}
            Kind::Ping => {
                self.tally.other_frames += 1;
                self.tally.pings += 1;
                return true;
            }
            Kind::Other => {
                self.tally.other_frames += 1;
                return false;
            }
        }
        self.tally.message_frames += 1;
        ctx.delivered.fetch_add(1, Ordering::Relaxed);
        let bin = (recv_ns.saturating_sub(ctx.epoch_ns) / 1_000_000_000) as usize;
        if let Some(b) = ctx.bins.get(bin).or(ctx.bins.last()) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        if self.first_ns == 0 {
            self.first_ns = recv_ns;
        }
        self.last_ns = recv_ns;
        if f.channel.as_deref() != Some(ctx.channel.as_str()) {
            self.tally.foreign += 1;
            return false;
        }
        if let Some(seq) = f.seq {
            match self.last_seq {
                Some(last) if seq <= last => self.tally.out_of_order += 1,
                last => {
                    if last.is_some_and(|l| seq != l + 1) {
                        self.tally.seq_gaps += 1;
                    }
                    self.last_seq = Some(seq);
                }
            }
        }
        let Some((n, sent_ns)) = f.data.as_deref().and_then(parse_stamp) else {
            self.tally.foreign += 1;
            return false;
        };
        let Some(byte) = self.seen.get_mut(n / 8).filter(|_| n < ctx.slots) else {
            self.tally.foreign += 1;
            return false;
        };
        let bit = 1u8 << (n % 8);
        if *byte & bit != 0 {
            self.tally.duplicates += 1;
        } else {
            *byte |= bit;
            self.unique += 1;
        }
        let latency_us = (recv_ns.saturating_sub(sent_ns) / 1_000).max(1);
        ctx.hist
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .saturating_record(latency_us);
        ctx.timeline.record(recv_ns, latency_us);
        match arrived_ns {
            Some(at) => {
                let arrival_us = (at.saturating_sub(sent_ns) / 1_000).max(1);
                ctx.arrival_hist
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .saturating_record(arrival_us);
            }
            None => self.tally.unstamped += 1,
        }
        false
    }

    /// Loss against the acknowledged publishes (unknown without a drain).
    fn finish(&mut self, drain: Option<&Drain>) {
        let Some(d) = drain else { return };
        for (n, acked) in d.acked.iter().enumerate() {
            let seen = self
                .seen
                .get(n / 8)
                .is_some_and(|b| b & (1 << (n % 8)) != 0);
            match (seen, *acked) {
                (false, true) => self.tally.missing += 1,
                (true, false) => self.tally.unacked_delivered += 1,
                _ => {}
            }
        }
    }
}

struct SockEnd {
    node: usize,
    tally: Tally,
    error: Option<String>,
    first_ns: u64,
    last_ns: u64,
}

#[path = "fanout_rx.rs"]
mod rx;

// ---------------------------------------------------------------------------------------
// Worker side: the process.

#[derive(Default)]
struct ConnectCounts {
    established: AtomicU64,
    failed: AtomicU64,
    retries: AtomicU64,
}

fn progress_json(kind: &str, c: &ConnectCounts, ctx: &SockCtx) -> Value {
    json!({
        "type": kind,
        "established": c.established.load(Ordering::Relaxed),
        "failed": c.failed.load(Ordering::Relaxed),
        "retries": c.retries.load(Ordering::Relaxed),
        "open": ctx.open.load(Ordering::Relaxed),
        "delivered": ctx.delivered.load(Ordering::Relaxed),
        "errors": ctx.errors.load(Ordering::Relaxed),
    })
}

/// Turns the coordinator's control lines into the subscribers' phase. Ends with the pipe.
async fn translate_control(mut control: watch::Receiver<Value>, phase: watch::Sender<Phase>) {
    loop {
        if control.changed().await.is_err() {
            let _ = phase.send(Phase::Abort);
            return;
        }
        let v = control.borrow_and_update().clone();
        match v.get("cmd").and_then(Value::as_str) {
            Some("drain") => {
                let sent = v.get("sent").and_then(Value::as_u64).unwrap_or(0) as usize;
                let mut acked = vec![true; sent];
                for n in v
                    .get("unacked")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_u64)
                {
                    if let Some(a) = acked.get_mut(n as usize) {
                        *a = false;
                    }
                }
                let expected = acked.iter().filter(|a| **a).count() as u64;
                let _ = phase.send(Phase::Drain(Arc::new(Drain { expected, acked })));
            }
            Some("abort") | Some("eof") => {
                let _ = phase.send(Phase::Abort);
                return;
            }
            _ => {}
        }
    }
}

/// A connected subscriber and the connect attempt's µs.
type Subscribed = (rx::Subscriber, u64);

struct ConnectJob {
    node: usize,
    url: Arc<String>,
    token: Arc<String>,
    route: Option<(SocketAddr, Ipv4Addr)>,
    within: Duration,
    retries: u32,
    deadline: Instant,
    counts: Arc<ConnectCounts>,
    ctx: Arc<SockCtx>,
    phase: watch::Receiver<Phase>,
}

impl ConnectJob {
    /// The subscriber's node and task and the successful attempt's µs, or the last error.
    async fn run(self) -> Result<Subscribed, String> {
        let mut last = String::new();
        for attempt in 0..=self.retries {
            if attempt > 0 {
                self.counts.retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
            }
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || matches!(*self.phase.borrow(), Phase::Abort) {
                last = format!("connect phase over ({last})");
                break;
            }
            let started = Instant::now();
            let within = self.within.min(left);
            let connected = match self.ctx.face {
                Face::Chat => idle::connect_once_raw(&self.url, &self.token, self.route, within)
                    .await
                    .map(|(ws, cursor)| (ws, cursor, None)),
                Face::Pusher => {
                    pusher::connect_raw(&self.url, self.route, within, Some(&self.ctx.channel))
                        .await
                        .map(|(ws, hello)| (ws, String::new(), hello.serial))
                }
            };
            match connected {
                Ok((ws, cursor, last_seq)) => {
                    let micros = started.elapsed().as_micros() as u64;
                    self.counts.established.fetch_add(1, Ordering::Relaxed);
                    let sub = rx::Subscriber {
                        node: self.node,
                        ws,
                        cursor,
                        last_seq,
                        url: self.url,
                        token: self.token,
                        route: self.route,
                    };
                    return Ok((sub, micros));
                }
                Err(e) => last = e,
            }
        }
        self.counts.failed.fetch_add(1, Ordering::Relaxed);
        Err(last)
    }
}

/// A worker's part of `fanout` (`switchboard-bench worker`, job on stdin).
pub async fn worker(job: Value, control: watch::Receiver<Value>, out: Out) -> Result<bool, String> {
    let job: FanoutJob = serde_json::from_value(job).map_err(|e| format!("fanout job: {e}"))?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(job.max_secs);
    let creds = AppCreds::parse(&job.app)?;
    let ctx = Arc::new(SockCtx::new(&job, deadline)?);
    let counts = Arc::new(ConnectCounts::default());
    let (phase_tx, phase_rx) = watch::channel(Phase::Run);
    tokio::spawn(translate_control(control, phase_tx));

    // Progress once a second until the end (or the deadline).
    let progress_stop = Arc::new(AtomicBool::new(false));
    let progress = {
        let (ctx, counts, out, stop) = (
            ctx.clone(),
            counts.clone(),
            out.clone(),
            progress_stop.clone(),
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                tick.tick().await;
                if !out.send(&progress_json("progress", &counts, &ctx)) {
                    return;
                }
            }
        })
    };

    // Connect, spreading over the nodes and source addresses by global socket index.
    let bases = if job.nodes.is_empty() {
        vec![job.base.clone()]
    } else {
        job.nodes.clone()
    };
    let urls: Vec<Arc<String>> = bases
        .iter()
        .map(|b| {
            Arc::new(match job.face {
                Face::Chat => format!("{}/api/realtime/ws", b.replacen("http://", "ws://", 1)),
                Face::Pusher => pusher::app_url(b, &creds.key, job.protocol),
            })
        })
        .collect();
    let addrs: Vec<Option<SocketAddr>> = bases
        .iter()
        .map(|b| idle::loopback_v4(b).filter(|_| job.source_ips > 0))
        .collect();
    let mut per_node = vec![NodeTally::default(); bases.len()];
    let no_token = Arc::new(String::new());
    let within = Duration::from_secs(job.connect_timeout_secs);
    let connect_started = Instant::now();
    let mut jobs = Vec::with_capacity(job.sockets);
    for i in 0..job.sockets {
        let g = job.first_socket + i;
        let token = match job.face {
            Face::Chat => {
                let entity = format!("{}{}", job.entity_prefix, g % job.members.max(1));
                Arc::new(api::mint_token(&creds, &entity, 7200)?)
            }
            Face::Pusher => no_token.clone(),
        };
        let node = crate::cluster::node_of(g, bases.len());
        jobs.push(ConnectJob {
            node,
            url: urls[node].clone(),
            token,
            route: addrs[node].map(|a| {
                let k = (g % usize::from(job.source_ips.max(1))) as u8;
                (a, Ipv4Addr::new(127, 0, 0, 2 + k))
            }),
            within,
            retries: job.retries,
            deadline,
            counts: counts.clone(),
            ctx: ctx.clone(),
            phase: phase_rx.clone(),
        });
    }
    let outcomes: Vec<Result<Subscribed, String>> =
        futures_util::stream::iter(jobs.into_iter().map(ConnectJob::run))
            .buffer_unordered(job.connect_concurrency.max(1))
            .collect()
            .await;
    let connect_secs = connect_started.elapsed().as_secs_f64();
    let mut connect_hist = latency_hist()?;
    let mut subs = Vec::with_capacity(outcomes.len());
    let mut connect_errors = Vec::new();
    for o in outcomes {
        match o {
            Ok((sub, us)) => {
                connect_hist.saturating_record(us.max(1));
                per_node[sub.node].established += 1;
                subs.push(sub);
            }
            Err(e) if connect_errors.len() < KEEP_ERRORS => connect_errors.push(e),
            Err(_) => {}
        }
    }
    out.send(&progress_json("ready", &counts, &ctx));

    // One thread reads every subscriber until the drain completes, they go idle, abort, or
    // the deadline.
    let receive = {
        let (ctx, phase, rt) = (
            ctx.clone(),
            phase_rx.clone(),
            tokio::runtime::Handle::current(),
        );
        tokio::task::spawn_blocking(move || rx::run(subs, ctx, phase, rt))
    };
    let collect_by = deadline + Duration::from_secs(5);
    let ends = match tokio::time::timeout_at(collect_by, receive).await {
        Ok(Ok(ends)) => ends?,
        Ok(Err(e)) => return Err(format!("receive loop: {e}")),
        Err(_) => return Err("subscribers did not stop by the worker's deadline".into()),
    };
    let mut tally = Tally::default();
    let mut errors = Vec::new();
    let (mut first_ns, mut last_ns) = (u64::MAX, 0u64);
    for end in ends {
        tally.add(&end.tally);
        if let Some(n) = per_node.get_mut(end.node) {
            n.deliveries += end.tally.message_frames;
            n.missing += end.tally.missing;
            n.complete += end.tally.complete;
            n.socket_errors += end.tally.socket_errors;
        }
        if end.tally.message_frames > 0 {
            first_ns = first_ns.min(end.first_ns);
            last_ns = last_ns.max(end.last_ns);
        }
        if let (Some(e), true) = (end.error, errors.len() < KEEP_ERRORS) {
            errors.push(e);
        }
    }
    progress_stop.store(true, Ordering::Relaxed);
    progress.abort();
    let drained = matches!(*phase_rx.borrow(), Phase::Drain(_));
    let me = server::sample_proc("self").unwrap_or_default();
    let latency = ctx.hist.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let arrival = ctx
        .arrival_hist
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let report = WorkerReport {
        worker: job.worker,
        sockets: job.sockets,
        established: counts.established.load(Ordering::Relaxed),
        failed: counts.failed.load(Ordering::Relaxed),
        retries: counts.retries.load(Ordering::Relaxed),
        connect_secs,
        connect_errors,
        socket_error_sample: errors,
        connect_hist: hist_to_hex(&connect_hist)?,
        latency_hist: hist_to_hex(&latency)?,
        arrival_hist: hist_to_hex(&arrival)?,
        tally,
        drained,
        first_delivery_ns: if first_ns == u64::MAX { 0 } else { first_ns },
        last_delivery_ns: last_ns,
        bins: ctx.bins.iter().map(|b| b.load(Ordering::Relaxed)).collect(),
        cpu_secs: me.cpu_secs,
        rss_kb: me.rss_kb,
        timeline: match ctx.timeline.snapshot() {
            Some(t) => t.to_wire()?,
            None => Vec::new(),
        },
        per_node,
    };
    let mut line = serde_json::to_value(&report).map_err(|e| format!("report: {e}"))?;
    if let Some(o) = line.as_object_mut() {
        o.insert("type".into(), "report".into());
    }
    out.send(&line);
    Ok(true)
}

// ---------------------------------------------------------------------------------------
// Coordinator: the publisher.

#[derive(Default)]
struct PubShared {
    acked: AtomicU64,
    failed: AtomicU64,
    skipped: AtomicU64,
    in_flight: AtomicU64,
}

struct PubOutcome {
    n: usize,
    acked: bool,
    /// Round trip of the acknowledged attempt, µs.
    rtt_us: Option<u64>,
    statuses: Vec<u16>,
    retries: u32,
    error: Option<String>,
}

/// Where the publishes go.
enum PubRoute {
    /// `POST /api/channels/{id}/messages` as the publisher entity (idempotent by its nonce).
    Chat { url: String, auth: HeaderValue },
    /// Signed `POST /apps/{id}/events`, event `bench` (no idempotency key: only a failed
    /// connect is retried, not a request that may have reached the server).
    Pusher {
        base: String,
        creds: AppCreds,
        channel: String,
    },
}

struct Publisher {
    client: reqwest::Client,
    route: PubRoute,
    tag: String,
    shared: Arc<PubShared>,
    deadline: Instant,
}

impl Publisher {
    async fn post(self: Arc<Self>, n: usize) -> PubOutcome {
        let data = format!("{n}:{}", unix_ns());
        let body = json!({"data": data, "nonce": format!("{}-{n}", self.tag)}).to_string();
        let mut o = PubOutcome {
            n,
            acked: false,
            rtt_us: None,
            statuses: Vec::new(),
            retries: 0,
            error: None,
        };
        for attempt in 1..=MAX_ATTEMPTS {
            let request = match &self.route {
                PubRoute::Chat { url, auth } => self
                    .client
                    .post(url.as_str())
                    .header(AUTHORIZATION, auth.clone())
                    .body(body.clone()),
                PubRoute::Pusher {
                    base,
                    creds,
                    channel,
                } => {
                    // Signed per attempt: the signature covers the timestamp.
                    let (url, signed_body) =
                        pusher::trigger(base, creds, channel, pusher::EVENT, &data);
                    self.client.post(url).body(signed_body)
                }
            };
            let sent = Instant::now();
            let resp = tokio::time::timeout_at(
                self.deadline,
                request.header(CONTENT_TYPE, "application/json").send(),
            )
            .await;
            let again = match resp {
                Err(_) => {
                    o.error = Some("publish deadline passed".into());
                    false
                }
                Ok(Err(e)) => {
                    o.error = Some(format!("transport: {}", crate::api::error_chain(&e)));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    matches!(self.route, PubRoute::Chat { .. }) || e.is_connect()
                }
                Ok(Ok(r)) => {
                    let status = r.status().as_u16();
                    o.statuses.push(status);
                    let wait = retry_after(&r);
                    let bytes = r.bytes().await.unwrap_or_default();
                    match status {
                        200 | 201 => {
                            o.acked = true;
                            o.rtt_us = Some(sent.elapsed().as_micros() as u64);
                            o.error = None;
                            false
                        }
                        429 | 503 => {
                            o.error = Some(reason(status, &bytes));
                            tokio::time::sleep(wait).await;
                            true
                        }
                        _ => {
                            o.error = Some(format!("HTTP {}", reason(status, &bytes)));
                            false
                        }
                    }
                }
            };
            if !again || attempt == MAX_ATTEMPTS {
                break;
            }
            o.retries += 1;
        }
        if o.acked {
            self.shared.acked.fetch_add(1, Ordering::Relaxed);
        } else {
            self.shared.failed.fetch_add(1, Ordering::Relaxed);
        }
        self.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
        o
    }
}

/// Open loop: publish `n` at `start + n / rate`; skipped when `max_in_flight` are unanswered.
async fn publish_all(
    publisher: Arc<Publisher>,
    total: usize,
    rate: f64,
    max_in_flight: usize,
) -> Vec<JoinHandle<PubOutcome>> {
    let start = Instant::now();
    let mut handles = Vec::with_capacity(total);
    for n in 0..total {
        let at = start + Duration::from_secs_f64(n as f64 / rate);
        if at >= publisher.deadline {
            break;
        }
        tokio::time::sleep_until(at).await;
        let shared = &publisher.shared;
        if shared.in_flight.load(Ordering::Relaxed) >= max_in_flight as u64 {
            shared.skipped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        shared.in_flight.fetch_add(1, Ordering::Relaxed);
        handles.push(tokio::spawn(publisher.clone().post(n)));
    }
    handles
}

/// Prints sockets, publishes, deliveries and the server's CPU/RSS once a second.
async fn progress_line(
    states: Vec<Arc<workers::WorkerState>>,
    pubs: Arc<PubShared>,
    total_publishes: usize,
    subscribers: usize,
    nodes: Vec<crate::cluster::Node>,
    mut stop: watch::Receiver<bool>,
) {
    let start = Instant::now();
    let mut last = (0u64, 0u64);
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
        let sum = |k: &str| states.iter().map(|s| s.counter(k)).sum::<u64>();
        let (delivered, acked) = (sum("delivered"), pubs.acked.load(Ordering::Relaxed));
        let srv = crate::cluster::sum_samples(&crate::cluster::sample_nodes(&nodes))
            .map(|s| {
                format!(
                    " | {} cpu {:.1}s rss {} MiB",
                    if nodes.len() > 1 { "servers" } else { "server" },
                    s.cpu_secs,
                    s.rss_kb / 1024
                )
            })
            .unwrap_or_default();
        eprintln!(
            "[{:>5.1}s] sockets {}/{subscribers} open {} failed {} | published {acked}/{total_publishes} (+{}/s, failed {}, skipped {}) | delivered {delivered} (+{}/s) errors {}{srv}",
            start.elapsed().as_secs_f64(),
            sum("established"),
            sum("open"),
            sum("failed"),
            acked - last.0.min(acked),
            pubs.failed.load(Ordering::Relaxed),
            pubs.skipped.load(Ordering::Relaxed),
            delivered - last.1.min(delivered),
            sum("errors"),
        );
        last = (acked, delivered);
    }
}

// ---------------------------------------------------------------------------------------
// Coordinator: the run.

/// `switchboard-bench fanout`: one run, its own results file.
pub async fn main(args: FanoutArgs) -> Result<bool, String> {
    args.validate()?;
    let mut target = Target::open_face(&args.target, args.face.face).await?;
    let outcome = run(&args, &target).await;
    target.stop(outcome.is_err());
    let report = outcome?;
    report.print();
    if let (Some(path), Some(points)) = (&args.plot, report.timeline()) {
        let subtitle = format!(
            "{} subscribers on one channel ({}), {} publishes/s for {} s, {} worker processes",
            args.subscribers,
            args.face.label(),
            args.rate,
            args.duration,
            report.workers
        );
        crate::plot::write_svg(
            path,
            "switchboard-bench fanout: send-to-receive latency per second",
            &subtitle,
            &points,
        )?;
    }
    let stem = match args.face.face {
        Face::Chat => "fanout",
        Face::Pusher => "fanout-pusher",
    };
    let path = crate::report::write_results(&args.target.results_dir, stem, &report.to_json())?;
    println!("results written to {}", path.display());
    Ok(report.passed())
}

async fn run(args: &FanoutArgs, target: &Target) -> Result<FanoutReport, String> {
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let per_node = crate::cluster::per_node(args.subscribers, target.nodes.len());
    for (k, node) in target.nodes.iter().enumerate() {
        let Some(pid) = node.pid else { continue };
        if let Some((soft, _)) = idle::nofile_limits(&pid.to_string()) {
            if per_node[k] as u64 + FD_MARGIN > soft {
                eprintln!(
                    "warning: server pid {pid} may open only {soft} files; {} sockets will not fit",
                    per_node[k]
                );
            }
        }
    }
    if target.nodes.len() > 1 {
        eprintln!(
            "{} nodes: sockets round-robin {:?}; every publish goes to node 0 ({}), so \
             deliveries on nodes 1.. cross the broker ({})",
            target.nodes.len(),
            per_node,
            target.base,
            crate::cluster::redact(&target.broker)
        );
    }
    let client = api::http_client(args.max_in_flight + SETUP_CONCURRENCY)?;
    let api = Api {
        client: client.clone(),
        base: target.base.clone(),
        creds: target.creds.clone(),
    };
    let tag = random_tag();
    let setup = match args.face.face {
        Face::Chat => setup_chat(args, &api, &tag, deadline).await?,
        Face::Pusher => setup_pusher(&api, &tag, deadline).await?,
    };

    // Workers: their share of the sockets each.
    let k = args.worker_count();
    let slots = args.publishes();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let node_before = target.sample_nodes();
    let epoch_ns = unix_ns();
    let max_secs = deadline
        .saturating_duration_since(Instant::now())
        .as_secs()
        .max(1);
    let mut set = WorkerSet::spawn(k, args.worker_threads)?;
    eprintln!(
        "started {k} worker processes (pids {:?}) for {} sockets from {} source IPs",
        set.pids, args.subscribers, args.source_ips
    );
    let outcome = drive(
        args,
        target,
        &mut set,
        Plan {
            deadline,
            client,
            tag,
            prefix: setup.prefix,
            members: setup.members,
            channel_id: setup.channel,
            pub_token: setup.pub_token,
            slots,
            epoch_ns,
            max_secs,
            node_before,
        },
    )
    .await;
    let notes = set.shutdown(Duration::from_secs(10)).await;
    for n in &notes {
        eprintln!("{n}");
    }
    let mut report = outcome?;
    report.worker_notes.extend(notes);
    Ok(report)
}

/// What the sockets and the publisher need, by face.
struct Setup {
    /// Chat: entities `<prefix>0..members` the sockets log in as (Pusher: none).
    members: usize,
    prefix: String,
    /// Chat: the channel's id; Pusher: its name.
    channel: String,
    /// Chat: the publisher entity's token.
    pub_token: Option<String>,
}

/// Chat face: a publisher and the members the sockets log in as, and one public channel.
async fn setup_chat(
    args: &FanoutArgs,
    api: &Api,
    tag: &str,
    deadline: Instant,
) -> Result<Setup, String> {
    let members = args.members.unwrap_or(args.subscribers).max(1);
    let prefix = format!("bench-{tag}-f");
    let publisher_id = format!("bench-{tag}-pub");
    let ids: Vec<String> = std::iter::once(publisher_id.clone())
        .chain((0..members).map(|i| format!("{prefix}{i}")))
        .collect();
    let setup_started = Instant::now();
    let created = tokio::time::timeout_at(
        deadline,
        futures_util::stream::iter(
            ids.iter()
                .map(|id| async move { api.create_entity(id, id, "human").await }),
        )
        .buffer_unordered(SETUP_CONCURRENCY)
        .collect::<Vec<_>>(),
    )
    .await
    .map_err(|_| "timed out creating entities".to_string())?;
    for r in created {
        r?;
    }
    eprintln!(
        "created {} entities in {:.1}s",
        ids.len(),
        setup_started.elapsed().as_secs_f64()
    );
    let pub_token = api::mint_token(&api.creds, &publisher_id, 7200)?;
    let channel_name = format!("bench-{tag}-fanout");
    let channel_id = api
        .create_channel(&pub_token, &channel_name, &[format!("{prefix}0")])
        .await?;
    eprintln!("created public channel {channel_id}");
    Ok(Setup {
        members,
        prefix,
        channel: channel_id,
        pub_token: Some(pub_token),
    })
}

/// Pusher face: no entities; one signed publish (event `bench-setup`) creates the public
/// channel, so V2 subscribers learn its serial, and checks the credentials before any
/// socket connects.
async fn setup_pusher(api: &Api, tag: &str, deadline: Instant) -> Result<Setup, String> {
    let channel = format!("bench-fanout-{tag}");
    tokio::time::timeout_at(
        deadline,
        pusher::publish_once(
            &api.client,
            &api.base,
            &api.creds,
            &channel,
            "bench-setup",
            "setup",
        ),
    )
    .await
    .map_err(|_| "timed out on the set-up publish".to_string())??;
    eprintln!("published the set-up event to public channel {channel}");
    Ok(Setup {
        members: 0,
        prefix: String::new(),
        channel,
        pub_token: None,
    })
}

/// What `run` set up for `drive`.
struct Plan {
    deadline: Instant,
    client: reqwest::Client,
    tag: String,
    prefix: String,
    members: usize,
    /// Chat: the channel's id; Pusher: its name.
    channel_id: String,
    /// Chat: the publisher entity's token.
    pub_token: Option<String>,
    slots: usize,
    epoch_ns: u64,
    max_secs: u64,
    /// Every node's figures before the sockets connect.
    node_before: Vec<Option<ProcSample>>,
}

/// Sends the jobs, waits for the sockets, publishes, drains, and gathers the reports.
async fn drive(
    args: &FanoutArgs,
    target: &Target,
    set: &mut WorkerSet,
    plan: Plan,
) -> Result<FanoutReport, String> {
    let k = set.len();
    let creds = &target.creds;
    let (base_share, rem) = (args.subscribers / k, args.subscribers % k);
    let mut first = 0;
    for w in 0..k {
        let sockets = base_share + usize::from(w < rem);
        let job = FanoutJob {
            scenario: "fanout".into(),
            worker: w,
            base: target.base.clone(),
            nodes: target.nodes.iter().map(|n| n.base.clone()).collect(),
            app: format!("{}:{}:{}", creds.id, creds.key, creds.secret),
            entity_prefix: plan.prefix.clone(),
            members: plan.members,
            first_socket: first,
            sockets,
            source_ips: args.source_ips,
            channel_id: plan.channel_id.clone(),
            face: args.face.face,
            protocol: args.face.protocol,
            slots: plan.slots,
            connect_concurrency: args.connect_concurrency,
            connect_timeout_secs: args.connect_timeout,
            retries: args.retries,
            drain_idle_secs: args.drain_idle,
            read_pause_us: args.read_pause_us,
            reader_nice: args.reader_nice,
            epoch_ns: plan.epoch_ns,
            max_secs: plan.max_secs + 10,
            plot: args.plot.is_some(),
        };
        first += sockets;
        let line = serde_json::to_value(&job).map_err(|e| format!("job: {e}"))?;
        set.send(w, &line).await?;
    }

    let pubs = Arc::new(PubShared::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let progress = tokio::spawn(progress_line(
        set.states.clone(),
        pubs.clone(),
        plan.slots,
        args.subscribers,
        target.nodes.clone(),
        stop_rx,
    ));
    let outcome = publish_and_drain(args, target, set, &plan, pubs).await;
    let _ = stop_tx.send(true);
    let _ = progress.await;
    outcome
}

async fn publish_and_drain(
    args: &FanoutArgs,
    target: &Target,
    set: &mut WorkerSet,
    plan: &Plan,
    pubs: Arc<PubShared>,
) -> Result<FanoutReport, String> {
    // 1. Every worker connected its sockets (or gave up).
    let connect_started = Instant::now();
    if !set
        .wait_all(plan.deadline, |s| s.ready.load(Ordering::Relaxed))
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
    let established = set.sum("established");
    eprintln!(
        "{established} of {} sockets established in {connect_secs:.2}s ({} failed)",
        args.subscribers,
        set.sum("failed")
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let node_connected = target.sample_nodes();
    let client_before = server::sample_proc("self");
    let metrics_before = target.metrics(&plan.client).await;

    // 2. Publish (open loop).
    let route = match (&args.face.face, &plan.pub_token) {
        (Face::Chat, Some(token)) => PubRoute::Chat {
            url: format!("{}/api/channels/{}/messages", target.base, plan.channel_id),
            auth: api::bearer(token)?,
        },
        (Face::Chat, None) => return Err("no publisher token for the chat face".into()),
        (Face::Pusher, _) => PubRoute::Pusher {
            base: target.base.clone(),
            creds: target.creds.clone(),
            channel: plan.channel_id.clone(),
        },
    };
    let publisher = Arc::new(Publisher {
        client: plan.client.clone(),
        route,
        tag: plan.tag.clone(),
        shared: pubs.clone(),
        deadline: plan.deadline,
    });
    let pub_start_ns = unix_ns();
    let handles = publish_all(publisher, plan.slots, args.rate, args.max_in_flight).await;
    let mut acked = vec![false; plan.slots];
    let mut rtt = latency_hist()?;
    let mut statuses: std::collections::BTreeMap<u16, u64> = Default::default();
    let (mut pub_retries, mut pub_errors) = (0u64, Vec::new());
    for h in handles {
        let o = tokio::time::timeout_at(plan.deadline + Duration::from_secs(1), h)
            .await
            .map_err(|_| "publishes did not finish before --timeout".to_string())?
            .map_err(|e| format!("publish task: {e}"))?;
        if let Some(a) = acked.get_mut(o.n) {
            *a = o.acked;
        }
        if let Some(us) = o.rtt_us {
            rtt.saturating_record(us.max(1));
        }
        for s in o.statuses {
            *statuses.entry(s).or_insert(0) += 1;
        }
        pub_retries += u64::from(o.retries);
        if let (Some(e), true) = (o.error, pub_errors.len() < KEEP_ERRORS) {
            pub_errors.push(e);
        }
    }
    let pub_end_ns = unix_ns();
    let node_published = target.sample_nodes();

    // 3. Drain: the workers learn which publishes were acknowledged and finish.
    let unacked: Vec<usize> = (0..plan.slots).filter(|n| !acked[*n]).collect();
    let sent = plan.slots;
    // A worker whose sockets all ended (e.g. every one closed by the server) has reported and
    // exited already: its pipe is gone, and its report says it ended before the drain.
    let drain = json!({"cmd": "drain", "sent": sent, "unacked": unacked});
    let mut drain_notes = Vec::new();
    for i in 0..set.len() {
        if let Err(e) = set.send(i, &drain).await {
            eprintln!("drain not sent: {e}");
            drain_notes.push(format!("drain not sent: {e}"));
        }
    }
    let drain_by = (Instant::now() + Duration::from_secs(args.drain_idle + 20)).min(plan.deadline);
    let all_reported = set.wait_all(drain_by, |s| s.has_report()).await;
    let drain_end_ns = unix_ns();
    let node_after = target.sample_nodes();
    let client_after = server::sample_proc("self");
    let metrics_after = target.metrics(&plan.client).await;

    // 4. Merge the workers' reports.
    let mut merged = Merged::new()?;
    merged.timeline = args.plot.is_some().then(|| Timeline::new(plan.epoch_ns));
    for (i, s) in set.states.iter().enumerate() {
        match s.take_report() {
            Some(v) => {
                let r: WorkerReport =
                    serde_json::from_value(v).map_err(|e| format!("worker {i} report: {e}"))?;
                merged.add(&r)?;
            }
            None => merged.missing_reports.push(format!(
                "worker {i}: no report{}",
                s.error().map(|e| format!(" ({e})")).unwrap_or_default()
            )),
        }
    }
    if !all_reported && merged.missing_reports.is_empty() {
        merged
            .missing_reports
            .push("not every worker reported in time".into());
    }
    let (log_lines, log_sample) = target.log_problems();
    Ok(FanoutReport {
        args: args.clone(),
        base: target.base.clone(),
        server_pid: target.server_pid,
        server_started_here: target.child.is_some(),
        workers: set.len(),
        worker_pids: set.pids.clone(),
        worker_notes: drain_notes,
        channel_id: plan.channel_id.clone(),
        members: plan.members,
        connect_secs,
        publishes_planned: plan.slots,
        published: acked.iter().filter(|a| **a).count() as u64,
        pub_failed: pubs.failed.load(Ordering::Relaxed),
        pub_skipped: pubs.skipped.load(Ordering::Relaxed),
        pub_retries,
        pub_statuses: statuses,
        pub_errors,
        rtt,
        epoch_ns: plan.epoch_ns,
        pub_start_ns,
        pub_end_ns,
        drain_end_ns,
        merged,
        server_before: crate::cluster::sum_samples(&plan.node_before),
        server_connected: crate::cluster::sum_samples(&node_connected),
        server_published: crate::cluster::sum_samples(&node_published),
        server_after: crate::cluster::sum_samples(&node_after),
        nodes: target.nodes.clone(),
        cluster: target.cluster_json(),
        cluster_label: target.cluster_label(),
        node_before: plan.node_before.clone(),
        node_connected,
        node_published,
        node_after,
        client_before,
        client_after,
        metrics_before,
        metrics_after,
        server_log_problems: log_lines,
        server_log_sample: log_sample,
    })
}

/// The workers' reports, summed.
struct Merged {
    established: u64,
    failed: u64,
    retries: u64,
    connect_hist: Histogram<u64>,
    latency: Histogram<u64>,
    /// Send-to-arrival by the kernel's receive stamps.
    arrival: Histogram<u64>,
    tally: Tally,
    drained_workers: usize,
    connect_errors: Vec<String>,
    socket_errors: Vec<String>,
    missing_reports: Vec<String>,
    first_delivery_ns: u64,
    last_delivery_ns: u64,
    bins: Vec<u64>,
    worker_cpu_secs: f64,
    worker_rss_kb: u64,
    /// Per-second latency histograms merged over the workers (`--plot`).
    timeline: Option<Timeline>,
    per_node: Vec<NodeTally>,
}

impl Merged {
    fn new() -> Result<Self, String> {
        Ok(Self {
            established: 0,
            failed: 0,
            retries: 0,
            connect_hist: latency_hist()?,
            latency: latency_hist()?,
            arrival: latency_hist()?,
            tally: Tally::default(),
            drained_workers: 0,
            connect_errors: Vec::new(),
            socket_errors: Vec::new(),
            missing_reports: Vec::new(),
            first_delivery_ns: u64::MAX,
            last_delivery_ns: 0,
            bins: Vec::new(),
            worker_cpu_secs: 0.0,
            worker_rss_kb: 0,
            timeline: None,
            per_node: Vec::new(),
        })
    }

    fn add(&mut self, r: &WorkerReport) -> Result<(), String> {
        self.established += r.established;
        self.failed += r.failed;
        self.retries += r.retries;
        self.connect_hist
            .add(hist_from_hex(&r.connect_hist)?)
            .map_err(|e| format!("merge histogram: {e}"))?;
        self.latency
            .add(hist_from_hex(&r.latency_hist)?)
            .map_err(|e| format!("merge histogram: {e}"))?;
        if !r.arrival_hist.is_empty() {
            self.arrival
                .add(hist_from_hex(&r.arrival_hist)?)
                .map_err(|e| format!("merge histogram: {e}"))?;
        }
        self.tally.add(&r.tally);
        self.drained_workers += usize::from(r.drained);
        let keep = |all: &mut Vec<String>, new: &[String]| {
            all.extend(
                new.iter()
                    .take(KEEP_ERRORS.saturating_sub(all.len()))
                    .cloned(),
            )
        };
        keep(&mut self.connect_errors, &r.connect_errors);
        keep(&mut self.socket_errors, &r.socket_error_sample);
        if r.tally.message_frames > 0 {
            self.first_delivery_ns = self.first_delivery_ns.min(r.first_delivery_ns);
            self.last_delivery_ns = self.last_delivery_ns.max(r.last_delivery_ns);
        }
        if self.bins.len() < r.bins.len() {
            self.bins.resize(r.bins.len(), 0);
        }
        for (a, b) in self.bins.iter_mut().zip(&r.bins) {
            *a += b;
        }
        self.worker_cpu_secs += r.cpu_secs;
        self.worker_rss_kb += r.rss_kb;
        if let Some(t) = self.timeline.as_mut() {
            t.merge_wire(&r.timeline)?;
        }
        add_per_node(&mut self.per_node, &r.per_node);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Report.

pub struct FanoutReport {
    args: FanoutArgs,
    base: String,
    server_pid: Option<u32>,
    server_started_here: bool,
    workers: usize,
    worker_pids: Vec<u32>,
    worker_notes: Vec<String>,
    channel_id: String,
    members: usize,
    connect_secs: f64,
    publishes_planned: usize,
    published: u64,
    pub_failed: u64,
    pub_skipped: u64,
    pub_retries: u64,
    pub_statuses: std::collections::BTreeMap<u16, u64>,
    pub_errors: Vec<String>,
    /// Publish round trip, µs.
    rtt: Histogram<u64>,
    epoch_ns: u64,
    pub_start_ns: u64,
    pub_end_ns: u64,
    drain_end_ns: u64,
    merged: Merged,
    server_before: Option<ProcSample>,
    server_connected: Option<ProcSample>,
    server_published: Option<ProcSample>,
    server_after: Option<ProcSample>,
    client_before: Option<ProcSample>,
    client_after: Option<ProcSample>,
    metrics_before: std::collections::BTreeMap<String, f64>,
    metrics_after: std::collections::BTreeMap<String, f64>,
    server_log_problems: u64,
    server_log_sample: Vec<String>,
    /// Every node (node 0 first, where the publishes go); the `server_*` samples above are
    /// sums over them.
    nodes: Vec<crate::cluster::Node>,
    cluster: Value,
    cluster_label: String,
    node_before: Vec<Option<ProcSample>>,
    node_connected: Vec<Option<ProcSample>>,
    node_published: Vec<Option<ProcSample>>,
    node_after: Vec<Option<ProcSample>>,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn mib(s: Option<ProcSample>) -> Option<f64> {
    s.map(|s| s.rss_kb as f64 / 1024.0)
}

fn secs(a: u64, b: u64) -> f64 {
    b.saturating_sub(a) as f64 / 1e9
}

impl FanoutReport {
    fn expected_deliveries(&self) -> u64 {
        self.published * self.merged.established
    }

    /// Latency per second since the first publish (`--plot`).
    fn timeline(&self) -> Option<Vec<Point>> {
        self.merged
            .timeline
            .as_ref()
            .map(|t| t.points(self.pub_start_ns))
    }

    fn publish_secs(&self) -> f64 {
        secs(self.pub_start_ns, self.pub_end_ns)
    }

    /// From the first publish to the last delivery.
    fn delivery_secs(&self) -> f64 {
        secs(
            self.pub_start_ns,
            self.merged.last_delivery_ns.max(self.pub_start_ns),
        )
    }

    fn deliveries_per_sec(&self) -> f64 {
        self.merged.tally.message_frames as f64 / self.delivery_secs().max(1e-9)
    }

    /// Deliveries of each whole second after the warm-up until publishing ended.
    fn windows(&self) -> Vec<u64> {
        let from = self.pub_start_ns + self.args.warmup * 1_000_000_000;
        let first = from.saturating_sub(self.epoch_ns).div_ceil(1_000_000_000) as usize;
        let end = (self.pub_end_ns.saturating_sub(self.epoch_ns) / 1_000_000_000) as usize;
        self.merged
            .bins
            .get(first..end.min(self.merged.bins.len()))
            .map(<[u64]>::to_vec)
            .unwrap_or_default()
    }

    fn sustained(&self) -> Option<u64> {
        self.windows().into_iter().min()
    }

    fn window_mean(&self) -> Option<f64> {
        let w = self.windows();
        (!w.is_empty()).then(|| w.iter().sum::<u64>() as f64 / w.len() as f64)
    }

    /// Server CPU s from the first publish until every worker reported.
    fn server_cpu(&self) -> Option<f64> {
        cpu_delta(self.server_connected, self.server_after)
    }

    fn deliveries_per_cpu_sec(&self) -> Option<f64> {
        self.server_cpu()
            .filter(|c| *c > 0.0)
            .map(|c| self.merged.tally.message_frames as f64 / c)
    }

    fn rss_per_socket_kib(&self) -> Option<f64> {
        match (self.server_before, self.server_connected) {
            (Some(b), Some(a)) if self.merged.established > 0 => {
                Some((a.rss_kb as f64 - b.rss_kb as f64) / self.merged.established as f64)
            }
            _ => None,
        }
    }

    fn metric_delta(&self, name: &str) -> Option<f64> {
        crate::report::metric_delta(&self.metrics_before, &self.metrics_after, name)
    }

    fn p(&self, q: f64) -> Option<f64> {
        let l = &self.merged.latency;
        (!l.is_empty()).then(|| ms(l.value_at_quantile(q)))
    }

    pub fn failures(&self) -> Vec<String> {
        let a = &self.args;
        let m = &self.merged;
        let t = &m.tally;
        let mut out = Vec::new();
        if m.established < a.subscribers as u64 {
            out.push(format!(
                "{} of {} sockets established ({} failed)",
                m.established, a.subscribers, m.failed
            ));
        }
        let mut check = |n: u64, what: &str| {
            if n > 0 {
                out.push(format!("{n} {what}"));
            }
        };
        check(t.missing, "missing deliveries");
        check(t.duplicates, "duplicate deliveries");
        check(t.out_of_order, "out-of-order seqs");
        check(t.seq_gaps, "seq gaps");
        check(t.cursor_regressions, "cursor regressions");
        check(t.foreign, "foreign message frames");
        check(t.unparsable, "unparsable frames");
        check(t.socket_errors, "subscriber socket errors");
        check(t.timed_out, "subscribers stopped by the deadline");
        check(self.pub_failed, "failed publishes");
        check(self.pub_skipped, "skipped publishes (too many in flight)");
        let short = self.expected_deliveries().saturating_sub(t.message_frames);
        if short > 0 && t.missing == 0 {
            out.push(format!("{short} fewer deliveries than expected"));
        }
        out.extend(m.missing_reports.iter().cloned());
        if m.drained_workers < self.workers {
            out.push(format!(
                "{} of {} workers ended before the drain",
                self.workers - m.drained_workers,
                self.workers
            ));
        }
        if let Some(want) = a.expect_rate {
            match self.sustained() {
                Some(got) if got as f64 >= want => {}
                got => out.push(format!(
                    "sustained deliveries/s {} below the expected {want:.0}",
                    got.map_or_else(|| "n/a".into(), |g| g.to_string())
                )),
            }
        }
        if let Some(want) = a.expect_p99_ms {
            match self.p(0.99) {
                Some(got) if got <= want => {}
                got => out.push(format!(
                    "p99 latency {} ms above the expected {want} ms",
                    opt(got, 2)
                )),
            }
        }
        out
    }

    pub fn passed(&self) -> bool {
        self.failures().is_empty()
    }

    pub fn print(&self) {
        let a = &self.args;
        let m = &self.merged;
        let t = &m.tally;
        let pusher = a.face.face == Face::Pusher;
        let row = |k: &str, v: String| println!("{k:<42} {v}");
        println!();
        println!("switchboard-bench fanout");
        println!("========================");
        let who = if pusher {
            String::new()
        } else {
            format!(" ({} members)", self.members)
        };
        row(
            "scenario",
            format!(
                "{} subscribers{who} on 1 public channel, {} publishes/s for {} s",
                a.subscribers, a.rate, a.duration
            ),
        );
        row("face", a.face.label());
        row("nodes", self.cluster_label.clone());
        if self.nodes.len() > 1 {
            row(
                "publishes go to",
                format!(
                    "node 0 only: deliveries on nodes 1..{} cross the broker",
                    self.nodes.len() - 1
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
        row(
            "workers",
            format!(
                "{} processes × {} thread(s), pids {:?}, {} source IPs",
                self.workers, a.worker_threads, self.worker_pids, a.source_ips
            ),
        );
        println!("-- sockets");
        row(
            "established / requested (failed, retries)",
            format!(
                "{} / {} ({}, {}) in {:.2} s",
                m.established, a.subscribers, m.failed, m.retries, self.connect_secs
            ),
        );
        row(
            "connect p50 / p99 / max (ms)",
            format!(
                "{:.1} / {:.1} / {:.1}",
                ms(m.connect_hist.value_at_quantile(0.5)),
                ms(m.connect_hist.value_at_quantile(0.99)),
                ms(m.connect_hist.max())
            ),
        );
        println!("-- publishing (open loop)");
        row(
            "acknowledged / planned",
            format!(
                "{} / {} in {:.2} s ({:.2}/s; failed {}, skipped {}, retries {})",
                self.published,
                self.publishes_planned,
                self.publish_secs(),
                self.published as f64 / self.publish_secs().max(1e-9),
                self.pub_failed,
                self.pub_skipped,
                self.pub_retries
            ),
        );
        row(
            "publish round trip p50 / p99 / max (ms)",
            format!(
                "{:.2} / {:.2} / {:.2}",
                ms(self.rtt.value_at_quantile(0.5)),
                ms(self.rtt.value_at_quantile(0.99)),
                ms(self.rtt.max())
            ),
        );
        println!("-- deliveries");
        row(
            if pusher {
                "`bench` events received / expected"
            } else {
                "message.created received / expected"
            },
            format!(
                "{} / {} (acknowledged × established)",
                t.message_frames,
                self.expected_deliveries()
            ),
        );
        row(
            "offered deliveries/s (rate × sockets)",
            format!("{:.0}", a.rate * m.established as f64),
        );
        row(
            "deliveries/s (first publish → last delivery)",
            format!(
                "{:.0} over {:.2} s",
                self.deliveries_per_sec(),
                self.delivery_secs()
            ),
        );
        let w = self.windows();
        row(
            "1 s windows after warm-up: min / mean / max",
            format!(
                "{} / {} / {} ({} windows, warm-up {} s)",
                self.sustained()
                    .map_or_else(|| "n/a".into(), |v| v.to_string()),
                opt(self.window_mean(), 0),
                w.iter()
                    .max()
                    .map_or_else(|| "n/a".into(), |v| v.to_string()),
                w.len(),
                a.warmup
            ),
        );
        row(
            "send-to-receive p50/p90/p99/p99.9/max ms",
            quantiles(&m.latency),
        );
        row(
            "send-to-arrival (kernel stamp), same",
            format!(
                "{} ({} messages without a stamp)",
                quantiles(&m.arrival),
                t.unstamped
            ),
        );
        println!("-- correctness");
        row(
            "subscribers complete",
            format!("{} / {}", t.complete, m.established),
        );
        row(
            "missing / duplicate / unacked delivered",
            format!("{} / {} / {}", t.missing, t.duplicates, t.unacked_delivered),
        );
        if pusher {
            row(
                "out-of-order / serial gaps",
                if a.face.protocol == 2 {
                    format!("{} / {}", t.out_of_order, t.seq_gaps)
                } else {
                    "not checked (V1 frames carry no serial)".into()
                },
            );
        } else {
            row(
                "out-of-order / seq gaps / cursor regress.",
                format!(
                    "{} / {} / {}",
                    t.out_of_order, t.seq_gaps, t.cursor_regressions
                ),
            );
        }
        row(
            "foreign / unparsable / other frames",
            format!("{} / {} / {}", t.foreign, t.unparsable, t.other_frames),
        );
        if pusher {
            row(
                "socket errors / timed out / 4100 closes",
                format!(
                    "{} / {} / {}",
                    t.socket_errors, t.timed_out, t.overflow_closes
                ),
            );
            row("pusher:ping answered", t.pings.to_string());
        } else {
            row(
                "socket errors / timed out / 1013 / reconn.",
                format!(
                    "{} / {} / {} / {}",
                    t.socket_errors, t.timed_out, t.overflow_closes, t.reconnects
                ),
            );
        }
        if self.nodes.len() > 1 {
            println!("-- server processes (sum over {} nodes)", self.nodes.len());
        } else {
            println!("-- server process");
        }
        let cpu = self.server_cpu();
        let wall = secs(self.pub_start_ns, self.drain_end_ns);
        row(
            "CPU s publishing / publishing + drain",
            format!(
                "{} / {} ({} % of one core over {:.1} s)",
                opt(cpu_delta(self.server_connected, self.server_published), 2),
                opt(cpu, 2),
                opt(cpu.map(|c| 100.0 * c / wall.max(1e-9)), 0),
                wall
            ),
        );
        row(
            "deliveries per server CPU s",
            opt(self.deliveries_per_cpu_sec(), 0),
        );
        row(
            "RSS idle / connected / after (MiB)",
            format!(
                "{} / {} / {} (peak {})",
                opt(mib(self.server_before), 1),
                opt(mib(self.server_connected), 1),
                opt(mib(self.server_after), 1),
                opt(self.server_after.map(|s| s.hwm_kb as f64 / 1024.0), 1)
            ),
        );
        row(
            "RSS per socket (connected − idle)",
            format!("{} KiB", opt(self.rss_per_socket_kib(), 1)),
        );
        row(
            "deliveries queued / overflows (metrics)",
            format!(
                "{} / {}",
                opt(self.metric_delta("switchboard_deliveries_total"), 0),
                opt(self.metric_delta("switchboard_session_overflows_total"), 0)
            ),
        );
        row(
            "server WARN/ERROR log lines",
            crate::report::log_lines_cell(self.server_started_here, self.server_log_problems),
        );
        if self.nodes.len() > 1 {
            println!("-- per node (server figures above are sums over the nodes)");
            for (k, n) in self.nodes.iter().enumerate() {
                let nt = m.per_node.get(k).cloned().unwrap_or_default();
                let at = |v: &Vec<Option<ProcSample>>| v.get(k).copied().flatten();
                let rss_per_socket = match (at(&self.node_before), at(&self.node_connected)) {
                    (Some(b), Some(c)) if nt.established > 0 => {
                        Some((c.rss_kb as f64 - b.rss_kb as f64) / nt.established as f64)
                    }
                    _ => None,
                };
                row(
                    &format!("node {k} {}", n.base.trim_start_matches("http://")),
                    format!(
                        "pid {}: {} sockets, {} deliveries ({:.0}/s), {} missing; CPU {} s; {} KiB/socket",
                        n.pid.map_or_else(|| "?".into(), |p| p.to_string()),
                        nt.established,
                        nt.deliveries,
                        nt.deliveries as f64 / self.delivery_secs().max(1e-9),
                        nt.missing,
                        opt(cpu_delta(at(&self.node_connected), at(&self.node_after)), 2),
                        opt(rss_per_socket, 1)
                    ),
                );
            }
        }
        println!("-- bench client");
        row(
            "CPU s: coordinator / workers (whole life)",
            format!(
                "{} / {:.2}",
                opt(cpu_delta(self.client_before, self.client_after), 2),
                m.worker_cpu_secs
            ),
        );
        row(
            "workers' RSS at end (MiB)",
            format!("{:.1}", m.worker_rss_kb as f64 / 1024.0),
        );
        for e in &self.pub_errors {
            println!("  publish error: {e}");
        }
        for e in &m.connect_errors {
            println!("  connect error: {e}");
        }
        for e in &m.socket_errors {
            println!("  socket error: {e}");
        }
        for n in &self.worker_notes {
            println!("  worker: {n}");
        }
        for l in &self.server_log_sample {
            println!("  server log: {l}");
        }
        let failures = self.failures();
        if failures.is_empty() {
            println!("RESULT: PASS");
        } else {
            println!();
            println!("!!! RESULT: FAIL (fanout)");
            for f in failures {
                println!("!!!   {f}");
            }
        }
    }

    pub fn to_json(&self) -> Value {
        let a = &self.args;
        let m = &self.merged;
        let t = &m.tally;
        let endpoint = match a.face.face {
            Face::Chat => "/api/realtime/ws".to_string(),
            Face::Pusher => format!(
                "/app/{{key}}?protocol={}",
                pusher::query_protocol(a.face.protocol)
            ),
        };
        let mut v = json!({
            "scenario": "fanout",
            "face": a.face.face.as_str(),
            "protocol": a.face.protocol(),
            "finished_at": chrono::Utc::now().to_rfc3339(),
            "passed": self.passed(),
            "failures": self.failures(),
            "params": {
                "face": a.face.face.as_str(),
                "protocol": a.face.protocol(),
                "subscribers": a.subscribers,
                "members": self.members,
                "rate": a.rate,
                "duration_secs": a.duration,
                "workers": self.workers,
                "worker_threads": a.worker_threads,
                "warmup_secs": a.warmup,
                "max_in_flight": a.max_in_flight,
                "connect_concurrency": a.connect_concurrency,
                "source_ips": a.source_ips,
                "drain_idle_secs": a.drain_idle,
                "read_pause_us": a.read_pause_us,
                "reader_nice": a.reader_nice,
                "timeout_secs": a.timeout,
                "client_threads": a.target.threads,
                "nodes": self.nodes.len(),
            },
            "cluster": self.cluster,
            "nodes": crate::cluster::nodes_json(&self.nodes, |k| {
                let nt = m.per_node.get(k).cloned().unwrap_or_default();
                let at = |v: &Vec<Option<ProcSample>>| v.get(k).copied().flatten();
                json!({
                    "publishes_here": k == 0,
                    "sockets": nt.established,
                    "deliveries": nt.deliveries,
                    "deliveries_per_sec": nt.deliveries as f64 / self.delivery_secs().max(1e-9),
                    "missing": nt.missing,
                    "complete": nt.complete,
                    "socket_errors": nt.socket_errors,
                    "cpu_secs_publishing": cpu_delta(at(&self.node_connected), at(&self.node_published)),
                    "cpu_secs": cpu_delta(at(&self.node_connected), at(&self.node_after)),
                    "idle": proc_json(at(&self.node_before)),
                    "connected": proc_json(at(&self.node_connected)),
                    "after": proc_json(at(&self.node_after)),
                })
            }),
            "server": {
                "base": self.base,
                "pid": self.server_pid,
                "started_here": self.server_started_here,
                "channel_id": self.channel_id,
                "endpoint": endpoint,
                "idle": proc_json(self.server_before),
                "connected": proc_json(self.server_connected),
                "after_publishing": proc_json(self.server_published),
                "after": proc_json(self.server_after),
                "cpu_secs_publishing": cpu_delta(self.server_connected, self.server_published),
                "cpu_secs": self.server_cpu(),
                "deliveries_per_cpu_sec": self.deliveries_per_cpu_sec(),
                "rss_per_socket_kib": self.rss_per_socket_kib(),
                "log_warn_error_lines": self.server_log_problems,
                "log_sample": self.server_log_sample,
                "metrics_delta": {
                    "deliveries_queued": self.metric_delta("switchboard_deliveries_total"),
                    "session_overflows": self.metric_delta("switchboard_session_overflows_total"),
                    "commit_batches": self.metric_delta("switchboard_commit_batches_total"),
                    "committed_writes": self.metric_delta("switchboard_committed_writes_total"),
                },
            },
            "sockets": {
                "established": m.established,
                "failed": m.failed,
                "retries": m.retries,
                "connect_secs": self.connect_secs,
                "connect": hist_json(&m.connect_hist),
                "errors_sample": m.connect_errors,
            },
            "publishing": {
                "planned": self.publishes_planned,
                "acknowledged": self.published,
                "failed": self.pub_failed,
                "skipped": self.pub_skipped,
                "retries": self.pub_retries,
                "statuses": self.pub_statuses.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
                "secs": self.publish_secs(),
                "round_trip": hist_json(&self.rtt),
                "errors_sample": self.pub_errors,
            },
            "deliveries": {
                "received": t.message_frames,
                "expected": self.expected_deliveries(),
                "offered_per_sec": a.rate * m.established as f64,
                "per_sec": self.deliveries_per_sec(),
                "secs": self.delivery_secs(),
                "sustained_min_per_sec": self.sustained(),
                "window_mean_per_sec": self.window_mean(),
                "windows_after_warmup": self.windows(),
            },
            "latency_send_to_receive": hist_json(&m.latency),
            // The same messages, to their arrival by the kernel's receive stamp (`rxstamp.rs`):
            // without the generator's own read queue on the shared cores.
            "latency_send_to_arrival": hist_json(&m.arrival),
            "correctness": t,
            "client": {
                "coordinator_cpu_secs": cpu_delta(self.client_before, self.client_after),
                "workers_cpu_secs": m.worker_cpu_secs,
                "workers_rss_kb": m.worker_rss_kb,
                "worker_notes": self.worker_notes,
                "socket_errors_sample": m.socket_errors,
            },
        });
        if let (Some(points), Some(o)) = (self.timeline(), v.as_object_mut()) {
            o.insert("timeline".into(), crate::plot::timeline_json(&points));
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(slots: usize) -> SockCtx {
        ctx_of(Face::Chat, slots)
    }

    pub(super) fn ctx_of(face: Face, slots: usize) -> SockCtx {
        SockCtx {
            face,
            channel: "c".into(),
            slots,
            epoch_ns: unix_ns(),
            drain_idle: Duration::from_secs(1),
            read_pause: Duration::ZERO,
            reader_nice: 0,
            reconnect_within: Duration::from_secs(1),
            deadline: Instant::now(),
            hist: Mutex::new(latency_hist().expect("histogram")),
            arrival_hist: Mutex::new(latency_hist().expect("histogram")),
            timeline: Recorder::default(),
            bins: (0..10).map(|_| AtomicU64::new(0)).collect(),
            delivered: AtomicU64::new(0),
            open: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        }
    }

    /// `(kind, cursor, channel, seq, data)` as read from a frame.
    type Read = (
        Kind,
        Option<String>,
        Option<String>,
        Option<i64>,
        Option<String>,
    );

    /// What serde reads of a chat frame, for comparison with the fast path.
    fn serde_seen(text: &str) -> Option<Read> {
        let f: Frame<'_> = serde_json::from_str(text).ok()?;
        Some((
            if f.ty == "message.created" {
                Kind::Message
            } else {
                Kind::Other
            },
            f.cursor.map(str::to_string),
            f.channel_id.map(str::to_string),
            f.seq,
            f.payload.and_then(|p| p.data).map(str::to_string),
        ))
    }

    #[test]
    fn the_chat_fast_path_reads_what_serde_reads() {
        let frames = [
            // The server's order: payload last, data among sorted payload keys.
            r#"{"id":"evt_1","cursor":"17","type":"message.created","workspace_id":"w","channel_id":"c","seq":4,"created_at":"t","payload":{"attachments":[],"author_id":"a","data":"3:99","extras":{"k":[1,{"x":"}"}]},"tags":null}}"#,
            // Another order, whitespace, data before the top-level members.
            r#"{ "payload" : { "data" : "5:1" , "z" : 1 } , "seq" : 9 , "type" : "message.created" , "cursor" : "2" , "channel_id" : "c" }"#,
            // Nulls and absences.
            r#"{"type":"realtime.ready","cursor":"0","payload":null}"#,
            r#"{"type":"channel.updated","channel_id":null,"seq":null,"payload":{"name":"x"}}"#,
            r#"{"type":"message.created","cursor":"3","channel_id":"c","seq":1,"payload":{"data":null}}"#,
        ];
        for text in frames {
            let fast = Seen::scan_chat(text).unwrap_or_else(|| panic!("fast path: {text}"));
            let fast = (
                fast.kind,
                fast.cursor.map(str::to_string),
                fast.channel.map(|c| c.into_owned()),
                fast.seq,
                fast.data.map(|d| d.into_owned()),
            );
            assert_eq!(Some(fast), serde_seen(text), "{text}");
        }
        // An escaped string: the fast path declines and leaves the frame to serde (which
        // borrows its strings, so it refuses it too: the frame counts as unparsable).
        let escaped = r#"{"type":"message.created","cursor":"1","channel_id":"c\u0041","seq":1,"payload":{"data":"1:2"}}"#;
        assert!(Seen::scan_chat(escaped).is_none());
        assert!(Seen::parse(Face::Chat, escaped).is_none());
        assert!(serde_seen(escaped).is_none());
        // Not an object of this shape: neither path reads it.
        for bad in [
            r#"{"type":1}"#,
            r#"{"cursor":"1"}"#,
            r#"{"type":"x","seq":"1"}"#,
            "nope",
        ] {
            assert!(Seen::parse(Face::Chat, bad).is_none(), "{bad}");
        }
    }

    fn frame(cursor: u64, channel: &str, seq: i64, n: usize) -> String {
        json!({
            "id": "evt_x", "cursor": cursor.to_string(), "type": "message.created",
            "workspace_id": "1", "channel_id": channel, "seq": seq,
            "payload": {"message_id": "m", "author_id": "a", "data": format!("{n}:{}", unix_ns())},
        })
        .to_string()
    }

    #[test]
    fn checks_loss_duplicates_order_and_strangers() {
        let ctx = ctx(4);
        let mut c = Check::new(4, "10".into(), None);
        c.frame(&frame(11, "c", 5, 0), &ctx, None); // first seen: any seq
        c.frame(&frame(12, "c", 7, 1), &ctx, None); // gap
        c.frame(&frame(13, "c", 6, 1), &ctx, None); // out of order and duplicate
        c.frame(&frame(13, "c", 8, 9), &ctx, None); // cursor did not advance; n beyond the plan
        c.frame(&frame(14, "other", 9, 2), &ctx, None); // another channel
        c.frame(r#"{"type":"channel.updated","cursor":"15"}"#, &ctx, None);
        c.frame("not json", &ctx, None);
        let t = &c.tally;
        assert_eq!(
            (t.frames, t.message_frames, t.other_frames, t.unparsable),
            (7, 5, 1, 1)
        );
        assert_eq!((t.seq_gaps, t.out_of_order, t.duplicates), (1, 1, 1));
        assert_eq!((t.cursor_regressions, t.foreign), (1, 2));
        assert_eq!(c.unique, 2);
        assert_eq!(ctx.delivered.load(Ordering::Relaxed), 5);
        assert_eq!(ctx.hist.lock().expect("lock").len(), 3);
        // Acknowledged: 0, 1, 2 (3 was not): 2 is missing.
        c.finish(Some(&Drain {
            expected: 3,
            acked: vec![true, true, true, false],
        }));
        assert_eq!((c.tally.missing, c.tally.unacked_delivered), (1, 0));
    }

    #[test]
    fn a_stamped_read_records_the_arrival_and_an_unstamped_one_is_counted() {
        let ctx = ctx(4);
        let mut c = Check::new(4, "10".into(), None);
        let sent = unix_ns();
        let text = json!({
            "id": "evt_x", "cursor": "11", "type": "message.created", "workspace_id": "1",
            "channel_id": "c", "seq": 1,
            "payload": {"message_id": "m", "author_id": "a", "data": format!("0:{sent}")},
        })
        .to_string();
        // Arrived 7 ms after it was sent, whenever it was read.
        c.frame(&text, &ctx, Some(sent + 7_000_000));
        c.frame(&frame(12, "c", 2, 1), &ctx, None);
        let arrival = ctx.arrival_hist.lock().expect("lock");
        assert_eq!(arrival.len(), 1);
        assert!(
            arrival.equivalent(arrival.max(), 7_000),
            "{}",
            arrival.max()
        );
        assert_eq!(ctx.hist.lock().expect("lock").len(), 2);
        assert_eq!(c.tally.unstamped, 1);
    }

    /// A Pusher delivery: V1 (`serial: None`) or V2 with the channel's serial.
    fn pusher_frame(channel: &str, serial: Option<i64>, n: usize) -> String {
        let mut f =
            json!({"event": "bench", "channel": channel, "data": format!("{n}:{}", unix_ns())});
        if let Some(s) = serial {
            f["serial"] = json!(s);
            f["stream_id"] = json!("chn_1");
            f["message_id"] = json!(format!("m{s:012}"));
            f["extras"] = json!({"headers": {"sockudo_action": "message.create"}});
        }
        f.to_string()
    }

    #[test]
    fn pusher_v2_frames_feed_the_same_checks() {
        let ctx = ctx_of(Face::Pusher, 4);
        // subscription_succeeded announced serial 1 (the set-up publish): 2 comes first.
        let mut c = Check::new(4, String::new(), Some(1));
        assert!(!c.frame(&pusher_frame("c", Some(2), 0), &ctx, None));
        assert!(!c.frame(&pusher_frame("c", Some(4), 1), &ctx, None)); // gap (3 missed)
        assert!(!c.frame(&pusher_frame("c", Some(3), 1), &ctx, None)); // out of order, duplicate
        assert!(!c.frame(&pusher_frame("other", Some(5), 2), &ctx, None)); // another channel
        assert!(c.frame(r#"{"event":"sockudo:ping","data":"{}"}"#, &ctx, None));
        assert!(c.frame(r#"{"event":"pusher:ping","data":{}}"#, &ctx, None));
        assert!(!c.frame(
            r#"{"event":"pusher:error","data":{"code":4300,"message":"x"}}"#,
            &ctx,
            None
        ));
        assert!(!c.frame("[1,2]", &ctx, None));
        let t = &c.tally;
        assert_eq!(
            (
                t.frames,
                t.message_frames,
                t.other_frames,
                t.unparsable,
                t.pings
            ),
            (8, 4, 3, 1, 2)
        );
        assert_eq!((t.seq_gaps, t.out_of_order, t.duplicates), (1, 1, 1));
        assert_eq!((t.cursor_regressions, t.foreign), (0, 1));
        assert_eq!(c.unique, 2);
        assert_eq!(ctx.hist.lock().expect("lock").len(), 3);
        c.finish(Some(&Drain {
            expected: 3,
            acked: vec![true, true, true, false],
        }));
        assert_eq!((c.tally.missing, c.tally.unacked_delivered), (1, 0));
    }

    #[test]
    fn pusher_v2_gap_from_the_announced_serial() {
        let ctx = ctx_of(Face::Pusher, 2);
        let mut c = Check::new(2, String::new(), Some(1));
        c.frame(&pusher_frame("c", Some(3), 0), &ctx, None); // serial 2 never came
        c.frame(&pusher_frame("c", Some(4), 1), &ctx, None);
        assert_eq!((c.tally.seq_gaps, c.tally.out_of_order), (1, 0));
        assert_eq!(c.unique, 2);
    }

    #[test]
    fn pusher_v1_frames_check_loss_and_duplicates_without_serials() {
        let ctx = ctx_of(Face::Pusher, 3);
        let mut c = Check::new(3, String::new(), None);
        c.frame(&pusher_frame("c", None, 1), &ctx, None);
        c.frame(&pusher_frame("c", None, 0), &ctx, None); // no serial: no order check
        c.frame(&pusher_frame("c", None, 1), &ctx, None); // duplicate
        c.frame(
            r#"{"event":"bench","channel":"c","data":"junk"}"#,
            &ctx,
            None,
        ); // not a stamp
        let t = &c.tally;
        assert_eq!((t.message_frames, t.duplicates, t.foreign), (4, 1, 1));
        assert_eq!((t.seq_gaps, t.out_of_order), (0, 0));
        c.finish(Some(&Drain {
            expected: 3,
            acked: vec![true, true, true],
        }));
        assert_eq!(c.tally.missing, 1);
    }

    #[test]
    fn a_chat_frame_is_not_a_pusher_message_and_back() {
        let pusher_ctx = ctx_of(Face::Pusher, 2);
        let mut c = Check::new(2, String::new(), None);
        c.frame(&frame(11, "c", 1, 0), &pusher_ctx, None); // no `event`: unparsable
        assert_eq!((c.tally.unparsable, c.tally.message_frames), (1, 0));
        let chat_ctx = ctx(2);
        let mut c = Check::new(2, "10".into(), None);
        c.frame(&pusher_frame("c", Some(1), 0), &chat_ctx, None); // no `type`: unparsable
        assert_eq!((c.tally.unparsable, c.tally.message_frames), (1, 0));
    }

    #[test]
    fn per_node_tallies_add_up_over_workers() {
        let t = |e, d| NodeTally {
            established: e,
            deliveries: d,
            ..NodeTally::default()
        };
        let mut all = Vec::new();
        add_per_node(&mut all, &[t(2, 20), t(1, 10)]);
        add_per_node(&mut all, &[t(1, 10), t(2, 20), t(2, 20)]);
        assert_eq!(all, vec![t(3, 30), t(3, 30), t(2, 20)]);
        // A worker of an older bench (no per-node figures) still parses.
        let r: WorkerReport = serde_json::from_value(json!({
            "worker": 0, "sockets": 1, "established": 1, "failed": 0, "retries": 0,
            "connect_secs": 0.1, "connect_errors": [], "socket_error_sample": [],
            "connect_hist": "", "latency_hist": "", "tally": Tally::default(),
            "drained": true, "first_delivery_ns": 0, "last_delivery_ns": 0, "bins": [],
            "cpu_secs": 0.0, "rss_kb": 0
        }))
        .expect("report");
        assert!(r.per_node.is_empty());
    }

    #[test]
    fn stamps_parse() {
        assert_eq!(parse_stamp("12:345"), Some((12, 345)));
        assert_eq!(parse_stamp("x:1"), None);
        assert_eq!(parse_stamp("12"), None);
    }
}
