//! `chat`: R rooms × M members posting at a total rate (issue: "2,000 sockets in 200 rooms,
//! 500 posts/s persisted before fan-out, p50 ≤ 1 ms, p99 ≤ 5 ms post-to-receive").
//!
//! Every room is a private group channel (the server's default visibility) created by its
//! first member with the others as members, so each member is in exactly one room and sees
//! only that room's events. Every member holds one `/api/realtime/ws` socket. One scheduler
//! posts on an open-loop schedule: post `k` is due at `start + k / rate`, goes to room
//! `k % rooms`, and is sent by member `(k / rooms) % members` of that room through
//! `POST /api/channels/{id}/messages`; at most `--max-in-flight` posts are unanswered, and a
//! tick that finds them all busy is skipped and counted as behind. A post's `data` is
//! `"<k>@<send ns>"`, so a socket knows which post it got and when it was sent. Each socket
//! checks its room's `message.created` seqs (contiguous from 1: a gap is a loss, a repeat a
//! duplicate or a reorder), that every acknowledged post of its room arrives exactly once,
//! and records post-to-receive latency; the scheduler records the HTTP round trip to 201.
//!
//! `--face pusher` runs the same load on the Pusher protocol, so that any Pusher-compatible
//! server can be measured: each room is a public channel `bench-<tag>-room<r>`, each member a
//! `/app/{key}` socket subscribed to it, and post `k` a signed `POST /apps/{id}/events`
//! (event `bench`, answered 200). V2 deliveries carry the channel's `serial`, checked like the
//! chat face's seqs (from the serial `subscription_succeeded` announced, else from the first
//! delivery); V1 deliveries are checked for loss and duplicates only. Pings are answered.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use crate::api::{self, Api};
use crate::plot::{Point, Recorder};
use crate::poster::reason;
use crate::pusher::{self, Face, FaceArgs, PusherFrame};
use crate::report::{cpu_delta, hist_json, ms, opt, proc_json, write_results, Window};
use crate::server::{self, AppCreds, ProcSample};
use crate::subscriber::{cursor_gt, Ws};
use crate::{now_ns, random_tag, sample, Target, TargetArgs};

/// Concurrent setup requests (entities, channels).
pub const SETUP_CONCURRENCY: usize = 16;
/// Error sentences kept in the results.
pub const KEEP_ERRORS: usize = 5;
/// How long one socket connect (TCP, upgrade, `realtime.ready`) may take during setup.
pub const CONNECT_WITHIN: Duration = Duration::from_secs(10);

#[derive(Args, Clone, Debug)]
pub struct ChatArgs {
    /// Rooms: private group channels, each with its own members.
    #[arg(long, default_value_t = 200)]
    pub rooms: usize,
    /// Members per room (each in exactly one room, each with one WebSocket); at least the
    /// workspace's `min_group_members`.
    #[arg(long, default_value_t = 10)]
    pub members: usize,
    /// Posts per second over all rooms (open loop).
    #[arg(long, default_value_t = 500)]
    pub rate: u32,
    /// Seconds of posting.
    #[arg(long, default_value_t = 30)]
    pub duration: u64,
    /// Unanswered posts at most; a tick that finds them all busy is skipped (behind).
    #[arg(long, default_value_t = 64)]
    pub max_in_flight: usize,
    /// Socket handshakes in flight at once during setup.
    #[arg(long, default_value_t = 32)]
    pub connect_concurrency: usize,
    /// After posting ends, a socket stops after this many seconds without a frame.
    #[arg(long, default_value_t = 5)]
    pub drain_idle: u64,
    /// Overall bound in seconds (setup, posting, drain); on expiry the run reports.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Write an SVG of post-to-receive latency percentiles per second here (and add a
    /// `timeline` to the JSON).
    #[arg(long, value_name = "PATH.svg")]
    pub plot: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub face: FaceArgs,
    #[command(flatten)]
    pub target: TargetArgs,
}

impl ChatArgs {
    pub fn validate(&self) -> Result<(), String> {
        let at_least_one = [
            (self.rooms, "--rooms"),
            (self.rate as usize, "--rate"),
            (self.duration as usize, "--duration"),
            (self.max_in_flight, "--max-in-flight"),
            (self.connect_concurrency, "--connect-concurrency"),
        ];
        if let Some((_, flag)) = at_least_one.iter().find(|(v, _)| *v == 0) {
            return Err(format!("{flag} must be at least 1"));
        }
        if self.members < 2 {
            return Err("--members must be at least 2 (a group channel's minimum)".into());
        }
        if self.rooms * self.members > 19_000 {
            return Err("--rooms × --members must be at most 19,000 sockets".into());
        }
        if self.timeout <= self.duration {
            return Err("--timeout must be longer than --duration".into());
        }
        Ok(())
    }

    fn total_posts(&self) -> usize {
        self.rate as usize * self.duration as usize
    }

    fn posts_per_room(&self) -> usize {
        self.total_posts().div_ceil(self.rooms)
    }
}

/// A message's data: which post, sent when (run clock, ns).
pub fn stamp(k: usize, sent_ns: u64) -> String {
    format!("{k}@{sent_ns}")
}

pub fn parse_stamp(s: &str) -> Option<(usize, u64)> {
    let (k, t) = s.split_once('@')?;
    Some((k.parse().ok()?, t.parse().ok()?))
}

/// The fields of a realtime frame the bench reads.
#[derive(Deserialize)]
pub struct Frame<'a> {
    #[serde(rename = "type")]
    pub ty: &'a str,
    #[serde(default)]
    pub cursor: Option<&'a str>,
    #[serde(default)]
    pub channel_id: Option<&'a str>,
    #[serde(default)]
    pub seq: Option<i64>,
    #[serde(default, borrow)]
    pub payload: Option<FramePayload<'a>>,
}

#[derive(Deserialize)]
pub struct FramePayload<'a> {
    #[serde(default, borrow)]
    pub data: Option<Cow<'a, str>>,
}

/// A `message.created` frame's `(k, sent ns)` stamp.
pub fn frame_stamp(f: &Frame<'_>) -> Option<(usize, u64)> {
    f.payload
        .as_ref()
        .and_then(|p| p.data.as_deref())
        .and_then(parse_stamp)
}

pub fn ws_config(read_buffer: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(read_buffer)
        .write_buffer_size(0)
}

/// Connects (optionally replaying after `after_cursor`) and reads `realtime.ready`; the
/// socket and the ready cursor.
pub async fn connect(
    ws_url: &str,
    token: &str,
    after_cursor: Option<&str>,
    read_buffer: usize,
    within: Duration,
) -> Result<(Ws, String), String> {
    let url = match after_cursor {
        Some(c) => format!("{ws_url}/api/realtime/ws?after_cursor={c}"),
        None => format!("{ws_url}/api/realtime/ws"),
    };
    let attempt = async {
        let mut req = url
            .as_str()
            .into_client_request()
            .map_err(|e| format!("ws request: {e}"))?;
        req.headers_mut().insert(AUTHORIZATION, api::bearer(token)?);
        let (mut ws, _) =
            tokio_tungstenite::connect_async_with_config(req, Some(ws_config(read_buffer)), true)
                .await
                .map_err(|e| format!("ws connect: {e}"))?;
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                let f: Frame<'_> =
                    serde_json::from_str(t.as_str()).map_err(|e| format!("ready frame: {e}"))?;
                match (f.ty, f.cursor) {
                    ("realtime.ready", Some(c)) => {
                        let c = c.to_string();
                        Ok((ws, c))
                    }
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

/// The workspace's `min_group_members` (signed `GET /apps/{id}/settings`); 2 if unreadable.
pub async fn min_group_members(api: &Api) -> usize {
    let path = format!("/apps/{}/settings", api.creds.id);
    let q = api::signed_query(&api.creds, "GET", &path, b"");
    let Ok(r) = api
        .client
        .get(format!("{}{path}?{q}", api.base))
        .send()
        .await
    else {
        return 2;
    };
    let Ok(v) = r.json::<Value>().await else {
        return 2;
    };
    v.get("min_group_members")
        .or_else(|| v.pointer("/settings/min_group_members"))
        .and_then(Value::as_u64)
        .map_or(2, |n| n as usize)
}

/// Creates `ids` as human members of the workspace, `SETUP_CONCURRENCY` at a time.
pub async fn create_humans(api: &Api, ids: &[String], deadline: Instant) -> Result<(), String> {
    let created = tokio::time::timeout_at(
        deadline,
        futures_util::stream::iter(ids.iter().map(|id| api.create_entity(id, id, "human")))
            .buffer_unordered(SETUP_CONCURRENCY)
            .collect::<Vec<_>>(),
    )
    .await
    .map_err(|_| "timed out creating entities".to_string())?;
    created.into_iter().collect()
}

/// One room as set up.
struct Room {
    /// Chat: the channel's id; Pusher: its name.
    channel_id: Arc<str>,
    /// Chat: tokens of its members, member 0 (the creator) first; Pusher: none.
    tokens: Vec<String>,
}

/// Counters every task bumps and the progress line reads.
#[derive(Default)]
struct Progress {
    acked: AtomicU64,
    failed: AtomicU64,
    behind: AtomicU64,
    deliveries: AtomicU64,
}

/// What a room's sockets wait for: `u64::MAX` while posting, then its acknowledged posts.
struct RoomEnd {
    acked: AtomicU64,
}

/// One socket's figures.
struct SocketTally {
    room: usize,
    member: usize,
    /// Post-to-receive, µs.
    hist: Histogram<u64>,
    /// Times each post of the room (by its index in the room) arrived, saturating.
    received: Vec<u8>,
    message_frames: u64,
    other_frames: u64,
    /// A seq more than one above the last: the seqs between were never delivered.
    seq_gaps: u64,
    /// A seq at or below the last one seen: a duplicate or a reorder.
    seq_repeats: u64,
    /// Pusher: pings answered.
    pings: u64,
    cursor_regressions: u64,
    wrong_channel: u64,
    unparsable: u64,
    /// `message.created` without this run's stamp, or a post of another room.
    foreign: u64,
    /// The room's seq (Pusher V2: serial) before the next expected delivery; `None`: take
    /// the first delivery's as it comes.
    last_seq: Option<i64>,
    last_delivery_ns: u64,
    error: Option<String>,
}

impl SocketTally {
    /// Member `member` of room `room`, expecting `posts` posts of its room; `last_seq`: see
    /// the field.
    fn new(
        room: usize,
        member: usize,
        posts: usize,
        last_seq: Option<i64>,
    ) -> Result<Self, String> {
        Ok(Self {
            room,
            member,
            hist: histogram()?,
            received: vec![0; posts],
            message_frames: 0,
            other_frames: 0,
            seq_gaps: 0,
            seq_repeats: 0,
            pings: 0,
            cursor_regressions: 0,
            wrong_channel: 0,
            unparsable: 0,
            foreign: 0,
            last_seq,
            last_delivery_ns: 0,
            error: None,
        })
    }
}

struct SocketTask {
    ws: Ws,
    face: Face,
    cursor: String,
    rooms: usize,
    channel_id: Arc<str>,
    end: Arc<RoomEnd>,
    progress: Arc<Progress>,
    deadline: Instant,
    drain_idle: Duration,
    tally: SocketTally,
    timeline: Recorder,
}

impl SocketTask {
    async fn run(mut self) -> SocketTally {
        let mut unique: u64 = 0;
        let mut last_frame = Instant::now();
        let tick = Duration::from_millis(250);
        while Instant::now() < self.deadline {
            let acked = self.end.acked.load(Ordering::Relaxed);
            if acked != u64::MAX && (unique >= acked || last_frame.elapsed() >= self.drain_idle) {
                break;
            }
            let next = match tokio::time::timeout(tick, self.ws.next()).await {
                Err(_) => continue,
                Ok(n) => n,
            };
            last_frame = Instant::now();
            match next {
                Some(Ok(Message::Text(t))) => {
                    let seen = match self.face {
                        Face::Chat => self.handle(t.as_str()),
                        Face::Pusher => self.handle_pusher(t.as_str()),
                    };
                    match seen {
                        Seen::First => unique += 1,
                        Seen::Ping => {
                            let pong = Message::Text(pusher::PONG.into());
                            if let Err(e) = self.ws.send(pong).await {
                                self.tally.error = Some(format!("ws write: {e}"));
                                break;
                            }
                        }
                        Seen::Other => {}
                    }
                }
                Some(Ok(Message::Close(c))) => {
                    self.tally.error = Some(format!("server closed the socket: {c:?}"));
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    self.tally.error = Some(format!("ws read: {e}"));
                    break;
                }
                None => {
                    self.tally.error = Some("ws ended".into());
                    break;
                }
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.ws.close(None)).await;
        self.tally
    }

    /// Books one frame of the chat face.
    fn handle(&mut self, text: &str) -> Seen {
        let recv_ns = now_ns();
        let r = &mut self.tally;
        let Ok(f) = serde_json::from_str::<Frame<'_>>(text) else {
            r.unparsable += 1;
            return Seen::Other;
        };
        if let Some(c) = f.cursor {
            if !cursor_gt(c, &self.cursor) {
                r.cursor_regressions += 1;
            }
            self.cursor.clear();
            self.cursor.push_str(c);
        }
        if f.ty != "message.created" {
            r.other_frames += 1;
            return Seen::Other;
        }
        let stamp = frame_stamp(&f);
        self.book(recv_ns, f.channel_id, f.seq, stamp)
    }

    /// Books one frame of the Pusher face.
    fn handle_pusher(&mut self, text: &str) -> Seen {
        let recv_ns = now_ns();
        let Ok(f) = serde_json::from_str::<PusherFrame<'_>>(text) else {
            self.tally.unparsable += 1;
            return Seen::Other;
        };
        if f.is_ping() {
            self.tally.other_frames += 1;
            self.tally.pings += 1;
            return Seen::Ping;
        }
        if f.event != pusher::EVENT {
            self.tally.other_frames += 1;
            return Seen::Other;
        }
        let stamp = f.data.0.as_deref().and_then(parse_stamp);
        self.book(recv_ns, f.channel.as_deref(), f.serial, stamp)
    }

    /// Books one delivered post of either face: its room, its seq, its stamp.
    fn book(
        &mut self,
        recv_ns: u64,
        channel: Option<&str>,
        seq: Option<i64>,
        stamp: Option<(usize, u64)>,
    ) -> Seen {
        let r = &mut self.tally;
        r.message_frames += 1;
        r.last_delivery_ns = recv_ns;
        self.progress.deliveries.fetch_add(1, Ordering::Relaxed);
        if channel != Some(&*self.channel_id) {
            r.wrong_channel += 1;
            return Seen::Other;
        }
        if let Some(seq) = seq {
            match r.last_seq {
                Some(last) if seq <= last => r.seq_repeats += 1,
                last => {
                    if last.is_some_and(|l| seq != l + 1) {
                        r.seq_gaps += 1;
                    }
                    r.last_seq = Some(seq);
                }
            }
        }
        let Some((k, sent_ns)) = stamp else {
            r.foreign += 1;
            return Seen::Other;
        };
        if k % self.rooms != r.room {
            r.foreign += 1;
            return Seen::Other;
        }
        let Some(count) = r.received.get_mut(k / self.rooms) else {
            r.foreign += 1;
            return Seen::Other;
        };
        *count = count.saturating_add(1);
        let latency_us = (recv_ns.saturating_sub(sent_ns) / 1_000).max(1);
        r.hist.saturating_record(latency_us);
        self.timeline.record(recv_ns, latency_us);
        if *count == 1 {
            Seen::First
        } else {
            Seen::Other
        }
    }
}

/// What one frame was to its socket.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// A post of this room, the first time.
    First,
    /// A Pusher ping: answer it.
    Ping,
    Other,
}

/// The status of an acknowledged post: 201 (chat API), 200 (`/events`).
fn acked_status(face: Face) -> u16 {
    match face {
        Face::Chat => 201,
        Face::Pusher => 200,
    }
}

/// What the scheduler did.
struct PostTally {
    scheduled: u64,
    sent: u64,
    /// Acknowledged (201) by post index.
    acked: Vec<bool>,
    statuses: BTreeMap<u16, u64>,
    transport_errors: u64,
    unanswered: u64,
    /// HTTP round trip of acknowledged posts, µs.
    rtt: Histogram<u64>,
    /// How late a post left after its due time, µs.
    send_lag: Histogram<u64>,
    first_errors: Vec<String>,
    end_ns: u64,
}

enum Answer {
    Created,
    Refused(u16, String),
    Transport(String),
}

type InFlight = FuturesUnordered<Pin<Box<dyn Future<Output = (usize, Answer, u64)> + Send>>>;

/// Where and as whom posts go.
enum Posts {
    Chat {
        /// `{base}/api/channels/{id}/messages` per room.
        urls: Vec<String>,
        /// Bearer header of member m of room r at `r * members + m`.
        auths: Vec<HeaderValue>,
    },
    /// A signed `POST /apps/{id}/events` on each room's channel.
    Pusher {
        base: String,
        creds: AppCreds,
        channels: Vec<Arc<str>>,
    },
}

struct Scheduler {
    client: reqwest::Client,
    posts: Posts,
    /// See [`acked_status`].
    acked_status: u16,
    rooms: usize,
    members: usize,
    period: Duration,
    max_in_flight: usize,
    deadline: Instant,
    progress: Arc<Progress>,
    tally: PostTally,
}

impl Scheduler {
    async fn run(mut self) -> PostTally {
        let ticks = self.tally.acked.len();
        let start = Instant::now();
        let stop_at =
            (start + self.period * ticks as u32 + Duration::from_secs(1)).min(self.deadline);
        let mut ticker = tokio::time::interval_at(start, self.period);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
        let mut in_flight = InFlight::new();
        let mut k = 0;
        while k < ticks && Instant::now() < stop_at {
            tokio::select! {
                Some(done) = in_flight.next(), if !in_flight.is_empty() => self.settle(done),
                _ = ticker.tick() => {
                    let due = start + self.period * k as u32;
                    self.tally.scheduled += 1;
                    if in_flight.len() < self.max_in_flight {
                        let lag = Instant::now().saturating_duration_since(due).as_micros() as u64;
                        self.tally.send_lag.saturating_record(lag.max(1));
                        in_flight.push(self.send(k));
                    } else {
                        self.progress.behind.fetch_add(1, Ordering::Relaxed);
                    }
                    k += 1;
                }
                _ = tokio::time::sleep_until(stop_at) => break,
            }
        }
        while !in_flight.is_empty() {
            match tokio::time::timeout_at(self.deadline, in_flight.next()).await {
                Ok(Some(done)) => self.settle(done),
                Ok(None) => break,
                Err(_) => {
                    self.tally.unanswered += in_flight.len() as u64;
                    break;
                }
            }
        }
        self.tally.end_ns = now_ns();
        self.tally
    }

    fn send(&mut self, k: usize) -> Pin<Box<dyn Future<Output = (usize, Answer, u64)> + Send>> {
        self.tally.sent += 1;
        let room = k % self.rooms;
        let member = (k / self.rooms) % self.members;
        let data = stamp(k, now_ns());
        let request = match &self.posts {
            Posts::Chat { urls, auths } => self
                .client
                .post(&urls[room])
                .header(AUTHORIZATION, auths[room * self.members + member].clone())
                .body(format!(r#"{{"data":"{data}"}}"#)),
            Posts::Pusher {
                base,
                creds,
                channels,
            } => {
                let (url, body) =
                    pusher::trigger(base, creds, &channels[room], pusher::EVENT, &data);
                self.client.post(url).body(body)
            }
        }
        .header(CONTENT_TYPE, "application/json");
        let created = self.acked_status;
        Box::pin(async move {
            let sent = Instant::now();
            let answer = match request.send().await {
                Err(e) => Answer::Transport(crate::api::error_chain(&e)),
                Ok(r) => {
                    let status = r.status().as_u16();
                    match (status, r.bytes().await) {
                        (s, Ok(_)) if s == created => Answer::Created,
                        (_, Ok(b)) => Answer::Refused(status, reason(status, &b)),
                        (_, Err(e)) => Answer::Transport(format!(
                            "reading the answer: {}",
                            crate::api::error_chain(&e)
                        )),
                    }
                }
            };
            (k, answer, sent.elapsed().as_micros() as u64)
        })
    }

    fn settle(&mut self, (k, answer, rtt_us): (usize, Answer, u64)) {
        let t = &mut self.tally;
        match answer {
            Answer::Created => {
                *t.statuses.entry(self.acked_status).or_insert(0) += 1;
                if let Some(a) = t.acked.get_mut(k) {
                    *a = true;
                }
                t.rtt.saturating_record(rtt_us.max(1));
                self.progress.acked.fetch_add(1, Ordering::Relaxed);
            }
            Answer::Refused(status, e) => {
                *t.statuses.entry(status).or_insert(0) += 1;
                if t.first_errors.len() < KEEP_ERRORS {
                    t.first_errors.push(e);
                }
                self.progress.failed.fetch_add(1, Ordering::Relaxed);
            }
            Answer::Transport(e) => {
                t.transport_errors += 1;
                if t.first_errors.len() < KEEP_ERRORS {
                    t.first_errors.push(format!("transport: {e}"));
                }
                self.progress.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

pub fn histogram() -> Result<Histogram<u64>, String> {
    Histogram::new_with_bounds(1, 600_000_000, 3).map_err(|e| format!("histogram: {e}"))
}

/// `switchboard-bench chat`: one run, its own results file. `Ok(true)` when every check
/// passed (the latency targets are reported, not enforced).
pub async fn chat_only(args: ChatArgs) -> Result<bool, String> {
    args.validate()?;
    let mut target = Target::open(&args.target).await?;
    let outcome = run(&args, &target).await;
    target.stop(outcome.is_err());
    let report = outcome?;
    report.print();
    if let (Some(path), Some(points)) = (&args.plot, &report.timeline) {
        let title = "switchboard-bench chat: post-to-receive latency per second";
        let subtitle = format!(
            "{} rooms x {} members, {} posts/s for {} s, max {} in flight",
            args.rooms, args.members, args.rate, args.duration, args.max_in_flight
        );
        crate::plot::write_svg(path, title, &subtitle, points)?;
    }
    let name = match args.face.face {
        Face::Chat => "chat",
        Face::Pusher => "chat-pusher",
    };
    let path = write_results(&args.target.results_dir, name, &report.to_json())?;
    println!("results written to {}", path.display());
    Ok(report.passed())
}

async fn run(args: &ChatArgs, target: &Target) -> Result<ChatReport, String> {
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let client = api::http_client(args.max_in_flight + SETUP_CONCURRENCY)?;
    let api = Api {
        client: client.clone(),
        base: target.base.clone(),
        creds: target.creds.clone(),
    };
    let face = args.face.face;
    if face == Face::Chat {
        let min_members = min_group_members(&api).await;
        if args.members < min_members {
            return Err(format!(
                "--members {} is below the workspace's min_group_members {min_members}",
                args.members
            ));
        }
    }
    eprintln!(
        "chat: {} rooms x {} members ({} sockets), {} posts/s for {} s, {}",
        args.rooms,
        args.members,
        args.rooms * args.members,
        args.rate,
        args.duration,
        args.face.label()
    );
    let setup_started = Instant::now();
    let server_idle = sample(target.server_pid);
    let rooms = match face {
        Face::Chat => set_up_rooms(&api, args, deadline).await?,
        Face::Pusher => pusher_rooms(args.rooms),
    };
    let ws_url = target.base.replacen("http://", "ws://", 1);
    let app_url = pusher::app_url(&target.base, &target.creds.key, args.face.protocol);
    let connect_started = Instant::now();
    let wanted = (0..args.rooms).flat_map(|r| (0..args.members).map(move |m| (r, m)));
    let connected = tokio::time::timeout_at(
        deadline,
        futures_util::stream::iter(wanted.map(|(r, m)| {
            let (ws_url, app_url, room) = (&ws_url, &app_url, &rooms[r]);
            async move {
                let socket = match face {
                    // The chat face's seqs count from 1 in a new room.
                    Face::Chat => connect(ws_url, &room.tokens[m], None, 16 * 1024, CONNECT_WITHIN)
                        .await
                        .map(|(ws, cursor)| (ws, cursor, Some(0))),
                    Face::Pusher => {
                        pusher::connect(app_url, None, CONNECT_WITHIN, Some(&room.channel_id))
                            .await
                            .map(|(ws, hello)| (ws, String::new(), hello.serial))
                    }
                };
                socket
                    .map(|(ws, cursor, last_seq)| (r, m, ws, cursor, last_seq))
                    .map_err(|e| format!("room {r} member {m}: {e}"))
            }
        }))
        .buffer_unordered(args.connect_concurrency)
        .collect::<Vec<_>>(),
    )
    .await
    .map_err(|_| "chat: timed out connecting sockets".to_string())?;
    let connected = connected.into_iter().collect::<Result<Vec<_>, _>>()?;
    let connect_secs = connect_started.elapsed().as_secs_f64();
    eprintln!(
        "chat: {} sockets ready in {connect_secs:.2}s; setup took {:.2}s",
        connected.len(),
        setup_started.elapsed().as_secs_f64()
    );

    let progress = Arc::new(Progress::default());
    let ends: Vec<Arc<RoomEnd>> = (0..args.rooms)
        .map(|_| {
            Arc::new(RoomEnd {
                acked: AtomicU64::new(u64::MAX),
            })
        })
        .collect();
    let timeline = Recorder::new(args.plot.is_some(), now_ns());
    let mut sockets: Vec<JoinHandle<SocketTally>> = Vec::with_capacity(connected.len());
    for (r, m, ws, cursor, last_seq) in connected {
        let task = SocketTask {
            ws,
            face,
            cursor,
            rooms: args.rooms,
            channel_id: rooms[r].channel_id.clone(),
            end: ends[r].clone(),
            progress: progress.clone(),
            deadline,
            drain_idle: Duration::from_secs(args.drain_idle),
            tally: SocketTally::new(r, m, args.posts_per_room(), last_seq)?,
            timeline: timeline.clone(),
        };
        sockets.push(tokio::spawn(task.run()));
    }

    let server_before = sample(target.server_pid);
    let client_before = server::sample_proc("self");
    let metrics_before = api.metrics().await;
    let posts = match face {
        Face::Chat => Posts::Chat {
            urls: rooms
                .iter()
                .map(|room| format!("{}/api/channels/{}/messages", target.base, room.channel_id))
                .collect(),
            auths: rooms
                .iter()
                .flat_map(|room| room.tokens.iter().map(|t| api::bearer(t)))
                .collect::<Result<Vec<_>, _>>()?,
        },
        Face::Pusher => Posts::Pusher {
            base: target.base.clone(),
            creds: target.creds.clone(),
            channels: rooms.iter().map(|room| room.channel_id.clone()).collect(),
        },
    };
    let scheduler = Scheduler {
        client: client.clone(),
        posts,
        acked_status: acked_status(face),
        rooms: args.rooms,
        members: args.members,
        period: Duration::from_secs_f64(1.0 / f64::from(args.rate)),
        max_in_flight: args.max_in_flight,
        deadline,
        progress: progress.clone(),
        tally: PostTally {
            scheduled: 0,
            sent: 0,
            acked: vec![false; args.total_posts()],
            statuses: BTreeMap::new(),
            transport_errors: 0,
            unanswered: 0,
            rtt: histogram()?,
            send_lag: histogram()?,
            first_errors: Vec::new(),
            end_ns: 0,
        },
    };
    let start_ns = now_ns();
    timeline.set_origin(start_ns);
    let stop_progress = Arc::new(AtomicBool::new(false));
    let progress_task = tokio::spawn(progress_line(
        progress.clone(),
        stop_progress.clone(),
        args.total_posts() as u64,
        target.server_pid,
    ));
    let posted = tokio::spawn(scheduler.run())
        .await
        .map_err(|e| format!("scheduler task: {e}"))?;
    let server_after_posting = sample(target.server_pid);
    let mut per_room = vec![0u64; args.rooms];
    for (k, a) in posted.acked.iter().enumerate() {
        if *a {
            per_room[k % args.rooms] += 1;
        }
    }
    for (end, n) in ends.iter().zip(&per_room) {
        end.acked.store(*n, Ordering::Relaxed);
    }
    let mut tallies = Vec::with_capacity(sockets.len());
    for h in sockets {
        tallies.push(h.await.map_err(|e| format!("socket task: {e}"))?);
    }
    let end_ns = now_ns();
    stop_progress.store(true, Ordering::Relaxed);
    let _ = progress_task.await;
    let (log_lines, log_sample) = target.log_problems();
    let mut report = ChatReport {
        args: args.clone(),
        base: target.base.clone(),
        server_pid: target.server_pid,
        server_started_here: target.child.is_some(),
        connect_secs,
        sockets: tallies.len() as u64,
        post_window: Window::new(start_ns, posted.end_ns),
        run_window: Window::new(start_ns, end_ns),
        server_idle,
        server_before,
        server_after_posting,
        server_after: sample(target.server_pid),
        client_before,
        client_after: server::sample_proc("self"),
        metrics_before,
        metrics_after: api.metrics().await,
        timed_out: Instant::now() >= deadline,
        server_log_problems: log_lines,
        server_log_sample: log_sample,
        latency: histogram()?,
        checks: Checks::default(),
        posted,
        timeline: timeline.snapshot().map(|t| t.points(start_ns)),
    };
    report.tally_sockets(&tallies, &per_room)?;
    Ok(report)
}

/// Entities (rooms × members), their tokens, and one private group channel per room created
/// by its member 0 with the others as members.
async fn set_up_rooms(api: &Api, args: &ChatArgs, deadline: Instant) -> Result<Vec<Room>, String> {
    let tag = random_tag();
    let id = |r: usize, m: usize| format!("bench-{tag}-r{r}-m{m}");
    let ids: Vec<String> = (0..args.rooms)
        .flat_map(|r| (0..args.members).map(move |m| (r, m)))
        .map(|(r, m)| id(r, m))
        .collect();
    let started = Instant::now();
    create_humans(api, &ids, deadline).await?;
    eprintln!(
        "chat: created {} entities in {:.2}s",
        ids.len(),
        started.elapsed().as_secs_f64()
    );
    let made = tokio::time::timeout_at(
        deadline,
        futures_util::stream::iter((0..args.rooms).map(|r| {
            let members: Vec<String> = (1..args.members).map(|m| id(r, m)).collect();
            let creator = id(r, 0);
            let name = format!("bench-{tag}-room{r}");
            async move {
                let tokens = std::iter::once(&creator)
                    .chain(members.iter())
                    .map(|m| api::mint_token(&api.creds, m, 3600))
                    .collect::<Result<Vec<_>, _>>()?;
                let channel_id = api
                    .create_private_channel(&tokens[0], &name, &members)
                    .await?;
                Ok::<_, String>(Room {
                    channel_id: channel_id.into(),
                    tokens,
                })
            }
        }))
        .buffered(SETUP_CONCURRENCY)
        .collect::<Vec<_>>(),
    )
    .await
    .map_err(|_| "chat: timed out creating rooms".to_string())?;
    let rooms = made.into_iter().collect::<Result<Vec<_>, _>>()?;
    eprintln!("chat: created {} private group channels", rooms.len());
    Ok(rooms)
}

/// The Pusher face's rooms: public channels of a name of this run's own.
fn pusher_rooms(rooms: usize) -> Vec<Room> {
    let tag = random_tag();
    (0..rooms)
        .map(|r| Room {
            channel_id: format!("bench-{tag}-room{r}").into(),
            tokens: Vec::new(),
        })
        .collect()
}

/// Prints posts and deliveries once a second to stderr until told to stop.
async fn progress_line(
    progress: Arc<Progress>,
    stop: Arc<AtomicBool>,
    scheduled: u64,
    pid: Option<u32>,
) {
    let start = Instant::now();
    let mut last = (0u64, 0u64);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let acked = progress.acked.load(Ordering::Relaxed);
        let failed = progress.failed.load(Ordering::Relaxed);
        let behind = progress.behind.load(Ordering::Relaxed);
        let deliveries = progress.deliveries.load(Ordering::Relaxed);
        eprintln!(
            "[{:>5.1}s] posts acked {acked}/{scheduled} (+{}/s, failed {failed}, behind {behind})  deliveries {deliveries} (+{}/s){}",
            start.elapsed().as_secs_f64(),
            acked - last.0,
            deliveries - last.1,
            describe_proc(sample(pid)),
        );
        last = (acked, deliveries);
    }
}

pub fn describe_proc(s: Option<ProcSample>) -> String {
    s.map(|s| format!(" server cpu {:.1}s rss {} MiB", s.cpu_secs, s.rss_kb / 1024))
        .unwrap_or_default()
}

pub fn mib(s: Option<ProcSample>) -> Option<f64> {
    s.map(|s| s.rss_kb as f64 / 1024.0)
}

pub fn row(key: &str, value: String) {
    println!("{key:<40} {value}");
}

/// p50 / p90 / p99 / p99.9 / max of a µs histogram, in ms.
pub fn quantiles(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "n/a".into();
    }
    format!(
        "{:.2} / {:.2} / {:.2} / {:.2} / {:.2}",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.9)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max())
    )
}

/// Delivery checks summed over the sockets.
#[derive(Default)]
struct Checks {
    expected_deliveries: u64,
    deliveries: u64,
    missing: u64,
    duplicates: u64,
    seq_gaps: u64,
    seq_repeats: u64,
    cursor_regressions: u64,
    wrong_channel: u64,
    unparsable: u64,
    foreign: u64,
    other_frames: u64,
    /// Pusher: pings answered (counted in other frames too).
    pings: u64,
    /// Delivered although the post was not acknowledged (e.g. it failed on the client side).
    unacked_delivered: u64,
    sockets_complete: u64,
    socket_errors: Vec<String>,
    socket_error_count: u64,
    last_delivery_ns: u64,
}

struct ChatReport {
    args: ChatArgs,
    base: String,
    server_pid: Option<u32>,
    server_started_here: bool,
    connect_secs: f64,
    sockets: u64,
    posted: PostTally,
    post_window: Window,
    run_window: Window,
    latency: Histogram<u64>,
    checks: Checks,
    server_idle: Option<ProcSample>,
    server_before: Option<ProcSample>,
    server_after_posting: Option<ProcSample>,
    server_after: Option<ProcSample>,
    client_before: Option<ProcSample>,
    client_after: Option<ProcSample>,
    metrics_before: BTreeMap<String, f64>,
    metrics_after: BTreeMap<String, f64>,
    timed_out: bool,
    server_log_problems: u64,
    server_log_sample: Vec<String>,
    /// Post-to-receive latency per second since the first post (`--plot`).
    timeline: Option<Vec<Point>>,
}

impl ChatReport {
    fn tally_sockets(&mut self, tallies: &[SocketTally], per_room: &[u64]) -> Result<(), String> {
        let rooms = self.args.rooms;
        let c = &mut self.checks;
        for t in tallies {
            self.latency
                .add(&t.hist)
                .map_err(|e| format!("merge histogram: {e}"))?;
            c.expected_deliveries += per_room.get(t.room).copied().unwrap_or(0);
            c.deliveries += t.message_frames;
            c.seq_gaps += t.seq_gaps;
            c.seq_repeats += t.seq_repeats;
            c.cursor_regressions += t.cursor_regressions;
            c.wrong_channel += t.wrong_channel;
            c.unparsable += t.unparsable;
            c.foreign += t.foreign;
            c.other_frames += t.other_frames;
            c.pings += t.pings;
            c.last_delivery_ns = c.last_delivery_ns.max(t.last_delivery_ns);
            let mut missing = 0;
            for (j, n) in t.received.iter().enumerate() {
                let k = j * rooms + t.room;
                let acked = self.posted.acked.get(k).copied().unwrap_or(false);
                let n = u64::from(*n);
                match (acked, n) {
                    (true, 0) => missing += 1,
                    (false, 0) => {}
                    (false, _) => c.unacked_delivered += 1,
                    _ => {}
                }
                c.duplicates += n.saturating_sub(1);
            }
            c.missing += missing;
            if let Some(e) = &t.error {
                c.socket_error_count += 1;
                if c.socket_errors.len() < KEEP_ERRORS {
                    c.socket_errors
                        .push(format!("room {} member {}: {e}", t.room, t.member));
                }
            } else if missing == 0 {
                c.sockets_complete += 1;
            }
        }
        Ok(())
    }

    fn acked(&self) -> u64 {
        self.posted.acked.iter().filter(|a| **a).count() as u64
    }

    fn failed_posts(&self) -> u64 {
        self.posted.sent.saturating_sub(self.acked())
    }

    fn behind(&self) -> u64 {
        self.posted.scheduled.saturating_sub(self.posted.sent)
    }

    fn metric_delta(&self, name: &str) -> Option<f64> {
        crate::report::metric_delta(&self.metrics_before, &self.metrics_after, name)
    }

    fn server_cpu_posting(&self) -> Option<f64> {
        cpu_delta(self.server_before, self.server_after_posting)
    }

    fn failures(&self) -> Vec<String> {
        let c = &self.checks;
        let mut out = Vec::new();
        let mut check = |n: u64, what: &str| {
            if n > 0 {
                out.push(format!("{n} {what}"));
            }
        };
        check(c.missing, "missing deliveries");
        check(c.duplicates, "duplicate deliveries");
        check(c.seq_gaps, "seq gaps");
        check(c.seq_repeats, "repeated or out-of-order seqs");
        check(c.cursor_regressions, "cursor regressions");
        check(c.wrong_channel, "messages of another room");
        check(c.unparsable, "unparsable frames");
        check(c.foreign, "messages without this run's stamp");
        check(self.failed_posts(), "failed posts");
        check(c.socket_error_count, "socket errors");
        if self.timed_out {
            out.push("the run hit --timeout".into());
        }
        out
    }

    fn passed(&self) -> bool {
        self.failures().is_empty() && self.checks.deliveries >= self.checks.expected_deliveries
    }

    /// `(name, met)` of the issue's targets.
    fn targets(&self) -> Vec<(String, bool)> {
        let l = &self.latency;
        let p50 = ms(l.value_at_quantile(0.5));
        let p99 = ms(l.value_at_quantile(0.99));
        let rate = self.post_window.rate(self.acked());
        let wanted = f64::from(self.args.rate);
        vec![
            (
                format!("{rate:.0} posts/s acknowledged ≥ 99% of {wanted:.0}"),
                rate >= 0.99 * wanted,
            ),
            (
                format!("post-to-receive p50 {p50:.2} ms ≤ 1 ms"),
                !l.is_empty() && p50 <= 1.0,
            ),
            (
                format!("post-to-receive p99 {p99:.2} ms ≤ 5 ms"),
                !l.is_empty() && p99 <= 5.0,
            ),
        ]
    }

    fn print(&self) {
        let a = &self.args;
        let c = &self.checks;
        let p = &self.posted;
        let created = acked_status(a.face.face);
        println!();
        println!("switchboard-bench chat");
        println!("======================");
        row(
            "scenario",
            format!(
                "{} rooms x {} members = {} sockets, {} posts/s for {} s, max {} in flight",
                a.rooms,
                a.members,
                a.rooms * a.members,
                a.rate,
                a.duration,
                a.max_in_flight
            ),
        );
        row("face", a.face.label());
        row(
            "server",
            format!(
                "{} (pid {}{})",
                self.base,
                opt(self.server_pid.map(f64::from), 0),
                if self.server_started_here {
                    ", started by the bench"
                } else {
                    ""
                }
            ),
        );
        row(
            "sockets connected in",
            format!("{} in {:.2} s", self.sockets, self.connect_secs),
        );
        println!("-- posting");
        row(
            &format!("posts scheduled / sent / acked ({created})"),
            format!("{} / {} / {}", p.scheduled, p.sent, self.acked()),
        );
        row(
            "failed / behind (no free slot)",
            format!("{} / {}", self.failed_posts(), self.behind()),
        );
        row(
            "posts/s acknowledged",
            format!(
                "{:.0} over {:.2} s",
                self.post_window.rate(self.acked()),
                self.post_window.secs()
            ),
        );
        row(
            &format!("HTTP post→{created} p50/p90/p99/p99.9/max ms"),
            quantiles(&p.rtt),
        );
        row("send lag behind schedule p50/p99 ms", {
            let s = &p.send_lag;
            format!(
                "{:.2} / {:.2}",
                ms(s.value_at_quantile(0.5)),
                ms(s.value_at_quantile(0.99))
            )
        });
        println!(
            "-- delivery ({})",
            match a.face.face {
                Face::Chat => "message.created",
                Face::Pusher => pusher::EVENT,
            }
        );
        row(
            "deliveries / expected",
            format!("{} / {}", c.deliveries, c.expected_deliveries),
        );
        row(
            "deliveries/s",
            format!("{:.0}", self.post_window.rate(c.deliveries)),
        );
        row(
            "post→receive p50/p90/p99/p99.9/max ms",
            quantiles(&self.latency),
        );
        println!("-- server process");
        row(
            "CPU s posting / posting+drain",
            format!(
                "{} / {}",
                opt(self.server_cpu_posting(), 2),
                opt(cpu_delta(self.server_before, self.server_after), 2)
            ),
        );
        row(
            "CPU ms per acked post (posting)",
            opt(
                self.server_cpu_posting()
                    .filter(|_| self.acked() > 0)
                    .map(|s| s * 1000.0 / self.acked() as f64),
                3,
            ),
        );
        row(
            "RSS idle / sockets up / after (MiB)",
            format!(
                "{} / {} / {} (peak {})",
                opt(mib(self.server_idle), 1),
                opt(mib(self.server_before), 1),
                opt(mib(self.server_after), 1),
                opt(self.server_after.map(|s| s.hwm_kb as f64 / 1024.0), 1)
            ),
        );
        let batches = self.metric_delta("switchboard_commit_batches_total");
        let writes = self.metric_delta("switchboard_committed_writes_total");
        row(
            "group commits / writes (avg batch)",
            format!(
                "{} / {} ({})",
                opt(batches, 0),
                opt(writes, 0),
                opt(
                    batches
                        .zip(writes)
                        .filter(|(b, _)| *b > 0.0)
                        .map(|(b, w)| w / b),
                    2
                )
            ),
        );
        row(
            "commit time mean (server metric)",
            opt(self.mean_commit_ms(), 3) + " ms",
        );
        row(
            "overflow closes (server metric)",
            opt(self.metric_delta("switchboard_session_overflows_total"), 0),
        );
        row(
            "server WARN/ERROR log lines",
            crate::report::log_lines_cell(self.server_started_here, self.server_log_problems),
        );
        row(
            "bench client CPU s",
            opt(cpu_delta(self.client_before, self.client_after), 2),
        );
        println!("-- correctness");
        row(
            "sockets complete",
            format!("{} / {}", c.sockets_complete, self.sockets),
        );
        row(
            "missing / duplicate",
            format!("{} / {}", c.missing, c.duplicates),
        );
        row(
            "seq gaps / repeats / cursor regressions",
            format!(
                "{} / {} / {}",
                c.seq_gaps, c.seq_repeats, c.cursor_regressions
            ),
        );
        row(
            "wrong room / foreign / other / bad",
            format!(
                "{} / {} / {} / {}",
                c.wrong_channel, c.foreign, c.other_frames, c.unparsable
            ),
        );
        row("post statuses", format!("{:?}", p.statuses));
        for e in &p.first_errors {
            println!("  post error: {e}");
        }
        for e in &c.socket_errors {
            println!("  socket error: {e}");
        }
        for l in &self.server_log_sample {
            println!("  server log: {l}");
        }
        println!("-- targets");
        for (name, met) in self.targets() {
            row(if met { "met" } else { "MISSED" }, name);
        }
        print_verdict(&self.failures(), c.deliveries, c.expected_deliveries);
    }

    fn mean_commit_ms(&self) -> Option<f64> {
        crate::report::mean_commit_ms(&self.metrics_before, &self.metrics_after)
    }

    fn to_json(&self) -> Value {
        let a = &self.args;
        let c = &self.checks;
        let p = &self.posted;
        let mut v = json!({
            "scenario": "chat",
            "finished_at": chrono::Utc::now().to_rfc3339(),
            "passed": self.passed(),
            "failures": self.failures(),
            "targets": self.targets().into_iter().map(|(name, met)| json!({"target": name, "met": met})).collect::<Vec<_>>(),
            "config": {
                "face": a.face.face.as_str(),
                "protocol": a.face.protocol(),
                "rooms": a.rooms,
                "members_per_room": a.members,
                "sockets": a.rooms * a.members,
                "rate_posts_per_sec": a.rate,
                "duration_secs": a.duration,
                "max_in_flight": a.max_in_flight,
                "timeout_secs": a.timeout,
                "client_threads": a.target.threads,
                "server": self.base,
                "server_started_by_bench": self.server_started_here,
            },
            "setup": {
                "sockets_connected": self.sockets,
                "connect_secs": self.connect_secs,
            },
            "posting": {
                "scheduled": p.scheduled,
                "sent": p.sent,
                "acknowledged": self.acked(),
                "failed": self.failed_posts(),
                "behind": self.behind(),
                "unanswered": p.unanswered,
                "transport_errors": p.transport_errors,
                "statuses": p.statuses.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
                "errors": p.first_errors,
                "posting_secs": self.post_window.secs(),
                "acked_posts_per_sec": self.post_window.rate(self.acked()),
                "http_round_trip": hist_json(&p.rtt),
                "send_lag": hist_json(&p.send_lag),
            },
            "delivery": {
                "deliveries": c.deliveries,
                "expected": c.expected_deliveries,
                "deliveries_per_sec": self.post_window.rate(c.deliveries),
                "run_secs": self.run_window.secs(),
                "latency_post_to_receive": hist_json(&self.latency),
            },
            "correctness": {
                "sockets_complete": c.sockets_complete,
                "missing": c.missing,
                "duplicates": c.duplicates,
                "seq_gaps": c.seq_gaps,
                "seq_repeats": c.seq_repeats,
                "cursor_regressions": c.cursor_regressions,
                "wrong_channel": c.wrong_channel,
                "foreign": c.foreign,
                "other_frames": c.other_frames,
                "pings": c.pings,
                "unparsable": c.unparsable,
                "unacked_delivered": c.unacked_delivered,
                "socket_errors": c.socket_error_count,
                "socket_error_sample": c.socket_errors,
                "timed_out": self.timed_out,
            },
            "server": {
                "pid": self.server_pid,
                "idle": proc_json(self.server_idle),
                "before": proc_json(self.server_before),
                "after_posting": proc_json(self.server_after_posting),
                "after": proc_json(self.server_after),
                "cpu_secs_posting": self.server_cpu_posting(),
                "cpu_secs_total": cpu_delta(self.server_before, self.server_after),
                "log_warn_error_lines": self.server_log_problems,
                "log_sample": self.server_log_sample,
                "metrics_delta": {
                    "commit_batches": self.metric_delta("switchboard_commit_batches_total"),
                    "committed_writes": self.metric_delta("switchboard_committed_writes_total"),
                    "deliveries_queued": self.metric_delta("switchboard_deliveries_total"),
                    "session_overflows": self.metric_delta("switchboard_session_overflows_total"),
                    "commit_mean_ms": self.mean_commit_ms(),
                },
            },
            "client": {
                "cpu_secs": cpu_delta(self.client_before, self.client_after),
                "after": proc_json(self.client_after),
            },
        });
        if let (Some(points), Some(o)) = (&self.timeline, v.as_object_mut()) {
            o.insert("timeline".into(), crate::plot::timeline_json(points));
        }
        v
    }
}

/// PASS, or FAIL with the reasons.
pub fn print_verdict(failures: &[String], got: u64, expected: u64) {
    let short = got < expected;
    if failures.is_empty() && !short {
        println!("RESULT: PASS");
        return;
    }
    println!();
    println!("!!! RESULT: FAIL");
    for f in failures {
        println!("!!!   {f}");
    }
    if short {
        println!("!!!   {got} of {expected} expected deliveries received");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_and_frames_parse() {
        assert_eq!(parse_stamp(&stamp(42, 1_234)), Some((42, 1_234)));
        assert_eq!(parse_stamp("x@1"), None);
        let text = json!({"type": "message.created", "cursor": "12", "channel_id": "c1",
            "seq": 3, "payload": {"data": stamp(7, 99)}})
        .to_string();
        let f: Frame<'_> = serde_json::from_str(&text).expect("frame");
        assert_eq!(
            (f.ty, f.cursor, f.seq),
            ("message.created", Some("12"), Some(3))
        );
        assert_eq!(frame_stamp(&f), Some((7, 99)));
        let other: Frame<'_> =
            serde_json::from_str(r#"{"type":"channel.updated","payload":{"name":"x"}}"#)
                .expect("frame");
        assert_eq!(frame_stamp(&other), None);
    }

    /// A scripted Pusher server on a real socket: greets, confirms the subscription at
    /// serial 4, sends `frames`, reads one client frame (the pong), then closes.
    async fn scripted_pusher(frames: Vec<String>) -> (String, JoinHandle<String>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("ws://{}/app/k?protocol=2", l.local_addr().expect("addr"));
        let server = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.expect("accept");
            let mut ws = tokio_tungstenite::accept_async(tcp).await.expect("upgrade");
            let hello = r#"{"event":"pusher:connection_established","data":"{\"socket_id\":\"1.1\",\"activity_timeout\":120}"}"#;
            ws.send(Message::Text(hello.into())).await.expect("hello");
            let subscribe = ws.next().await.expect("frame").expect("ok");
            assert!(subscribe
                .to_text()
                .expect("text")
                .contains("pusher:subscribe"));
            let ok = r#"{"event":"pusher_internal:subscription_succeeded","channel":"room0","serial":4}"#;
            ws.send(Message::Text(ok.into())).await.expect("ok");
            for f in frames {
                ws.send(Message::Text(f.into())).await.expect("frame");
            }
            let pong = ws.next().await.expect("frame").expect("ok");
            let _ = ws.close(None).await;
            pong.to_text().expect("text").to_string()
        });
        (url, server)
    }

    #[tokio::test]
    async fn the_pusher_face_checks_serials_stamps_and_rooms_and_answers_pings() {
        let bench = |channel: &str, serial: i64, k: usize| {
            json!({"event": "bench", "channel": channel, "serial": serial,
                   "data": stamp(k, now_ns())})
            .to_string()
        };
        // Two rooms: room 0 gets posts 0, 2, 4.
        let frames = vec![
            bench("room0", 5, 0),
            r#"{"event":"pusher:ping","data":{}}"#.to_string(),
            bench("room0", 7, 2), // serial 6 never came: a gap
            bench("room0", 7, 2), // repeated serial, duplicate post
            bench("room1", 8, 4), // another room's channel
            bench("room0", 8, 1), // post 1 is room 1's: foreign
            r#"{"event":"bench","channel":"room0","serial":9,"data":"junk"}"#.to_string(),
            "not json".to_string(),
        ];
        let (url, server) = scripted_pusher(frames).await;
        let (ws, hello) = pusher::connect(&url, None, Duration::from_secs(5), Some("room0"))
            .await
            .expect("connected");
        assert_eq!(hello.serial, Some(4));
        let end = Arc::new(RoomEnd {
            acked: AtomicU64::new(3),
        });
        let task = SocketTask {
            ws,
            face: Face::Pusher,
            cursor: String::new(),
            rooms: 2,
            channel_id: "room0".into(),
            end,
            progress: Arc::new(Progress::default()),
            deadline: Instant::now() + Duration::from_secs(10),
            drain_idle: Duration::from_secs(1),
            tally: SocketTally::new(0, 0, 3, hello.serial).expect("tally"),
            timeline: Recorder::default(),
        };
        let t = task.run().await;
        assert_eq!(server.await.expect("server"), pusher::PONG);
        assert_eq!(t.pings, 1);
        assert_eq!(t.received, vec![1, 2, 0]);
        assert_eq!((t.seq_gaps, t.seq_repeats), (1, 1));
        assert_eq!((t.wrong_channel, t.foreign, t.unparsable), (1, 2, 1));
        assert_eq!(t.message_frames, 6);
        assert_eq!(t.hist.len(), 3);
    }
}
