//! `reconnect`: C clients drop and reconnect with their cursor, each catching up E events
//! (issue: "1,000 clients each catching up 500 events: all caught up in ≤ 5 s, none
//! missing").
//!
//! Every client is a workspace member; one public channel (created by a poster with a second
//! poster as its other member) carries the events, and a public channel's events reach every
//! member of the workspace. 1. Each client connects once, notes the `realtime.ready` cursor
//! and disconnects. 2. The poster posts E messages (closed loop, `--post-concurrency` in
//! flight): each client now has E `message.created` events to catch up, and the workspace
//! tail is E events past every client's cursor (within `realtime.max_replay`, default 5000).
//! 3. All clients reconnect at once with `after_cursor` and read until they hold every
//! acknowledged post. Each client checks its events: the bench channel only, seqs 1..E
//! contiguous, cursors strictly increasing, each post exactly once. Times run from the moment
//! the reconnect storm starts: to a client's `realtime.ready`, to its last missing event, and
//! to the last client caught up (the total).
//!
//! `--face pusher` does the same on the Pusher face (`/app/{key}?protocol=2`): one public
//! channel, opened by a first publish; each client subscribes, notes the channel's `serial`
//! and leaves; E messages are published (`POST /apps/{id}/events`); then every client
//! reconnects at once, subscribes again and sends `sockudo:resume` from the serial it left
//! at. It checks each message: its channel, serials contiguous after the position, each
//! publish once, and a `resume_success` with no failed channel.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use futures_util::StreamExt as _;
use hdrhistogram::Histogram;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::api::{self, Api};
use crate::chat::{
    connect, create_humans, describe_proc, frame_stamp, histogram, mib, print_verdict, quantiles,
    row, stamp, Frame, CONNECT_WITHIN, KEEP_ERRORS, SETUP_CONCURRENCY,
};
use crate::poster::reason;
use crate::pusher::{self, Face, PusherFrame};
use crate::report::{cpu_delta, hist_json, ms, opt, proc_json, write_results};
use crate::server::{self, ProcSample};
use crate::subscriber::{cursor_gt, Ws};
use crate::{now_ns, random_tag, sample, Target, TargetArgs};

/// The server's default `realtime.max_replay`: a cursor further behind gets 4001.
const DEFAULT_MAX_REPLAY: usize = 5000;
/// Read buffer of a catching-up socket (a replay arrives as one burst).
const READ_BUFFER: usize = 64 * 1024;

#[derive(Args, Clone, Debug)]
pub struct ReconnectArgs {
    /// Clients: workspace members, one socket each.
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// Events each client catches up (messages posted while all are disconnected).
    #[arg(long, default_value_t = 500)]
    pub events: usize,
    /// Which WebSocket reconnects: `chat` (/api/realtime/ws with `after_cursor`) or `pusher`
    /// (/app/{key}?protocol=2: subscribe, then `sockudo:resume` from the serial it left at).
    #[arg(long, value_enum, default_value_t = Face::Chat)]
    pub face: Face,
    /// Socket handshakes in flight at once for the first connect (the reconnect is all at
    /// once).
    #[arg(long, default_value_t = 32)]
    pub connect_concurrency: usize,
    /// Posts in flight at once while the clients are away.
    #[arg(long, default_value_t = 16)]
    pub post_concurrency: usize,
    /// Seconds from the start of the reconnect until a client not caught up gives up.
    #[arg(long, default_value_t = 60)]
    pub catchup_timeout: u64,
    /// Overall bound in seconds (setup, posting, reconnect); on expiry the run reports.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    #[command(flatten)]
    pub target: TargetArgs,
}

impl ReconnectArgs {
    fn validate(&self) -> Result<(), String> {
        let at_least_one = [
            (self.clients, "--clients"),
            (self.events, "--events"),
            (self.connect_concurrency, "--connect-concurrency"),
            (self.post_concurrency, "--post-concurrency"),
            (self.catchup_timeout as usize, "--catchup-timeout"),
        ];
        if let Some((_, flag)) = at_least_one.iter().find(|(v, _)| *v == 0) {
            return Err(format!("{flag} must be at least 1"));
        }
        if self.clients > 19_000 {
            return Err("--clients must be at most 19,000".into());
        }
        if self.timeout <= self.catchup_timeout {
            return Err("--timeout must be longer than --catchup-timeout".into());
        }
        if self.events > DEFAULT_MAX_REPLAY {
            eprintln!(
                "warning: --events {} is over the default realtime.max_replay ({DEFAULT_MAX_REPLAY}): \
                 the server must run with a larger SWITCHBOARD_REALTIME_MAX_REPLAY, else every \
                 reconnect is closed with 4001",
                self.events
            );
        }
        Ok(())
    }
}

/// One client as set up: its token and the cursor it left with (on the Pusher face no token,
/// and the channel's serial as its cursor).
struct Client {
    token: String,
    cursor: String,
}

/// Counters the clients bump and the progress line reads.
#[derive(Default)]
struct Progress {
    ready: AtomicU64,
    caught_up: AtomicU64,
    ended: AtomicU64,
    events: AtomicU64,
}

/// One client's reconnect.
struct ClientTally {
    client: usize,
    /// From the storm's start to `realtime.ready`, µs.
    ready_us: Option<u64>,
    /// From the storm's start to holding every acknowledged post, µs.
    caught_up_us: Option<u64>,
    /// Times each post arrived, saturating.
    received: Vec<u8>,
    /// Pusher face: `resume_success` arrived with no failed channel.
    resumed: bool,
    message_frames: u64,
    other_frames: u64,
    seq_gaps: u64,
    seq_repeats: u64,
    cursor_regressions: u64,
    wrong_channel: u64,
    foreign: u64,
    unparsable: u64,
    error: Option<String>,
}

impl ClientTally {
    fn new(client: usize, events: usize) -> Self {
        Self {
            client,
            ready_us: None,
            caught_up_us: None,
            received: vec![0; events],
            resumed: false,
            message_frames: 0,
            other_frames: 0,
            seq_gaps: 0,
            seq_repeats: 0,
            cursor_regressions: 0,
            wrong_channel: 0,
            foreign: 0,
            unparsable: 0,
            error: None,
        }
    }
}

struct ClientTask {
    face: Face,
    /// `ws://host:port`, or on the Pusher face the app's URL.
    ws_url: Arc<String>,
    token: String,
    cursor: String,
    /// The chat channel's id, or the Pusher channel's name.
    channel_id: Arc<str>,
    /// Acknowledged posts: what "caught up" means.
    expected: u64,
    go: watch::Receiver<Option<Instant>>,
    stop: watch::Receiver<bool>,
    catchup_deadline: Duration,
    progress: Arc<Progress>,
    tally: ClientTally,
}

impl ClientTask {
    async fn run(mut self) -> ClientTally {
        let started = match self.go.wait_for(Option::is_some).await {
            Ok(v) => *v,
            Err(_) => None,
        };
        if let Some(started) = started {
            self.reconnect(started).await;
        } else {
            self.tally.error = Some("the reconnect was never started".into());
        }
        self.progress.ended.fetch_add(1, Ordering::Relaxed);
        self.tally
    }

    async fn reconnect(&mut self, started: Instant) {
        let deadline = started + self.catchup_deadline;
        let within = deadline.saturating_duration_since(Instant::now());
        let connected = match self.face {
            Face::Chat => connect(
                &self.ws_url,
                &self.token,
                Some(&self.cursor),
                READ_BUFFER,
                within,
            )
            .await
            .map(|(ws, _ready_cursor)| ws),
            Face::Pusher => self.resume(within).await,
        };
        let mut ws = match connected {
            Ok(ws) => ws,
            Err(e) => {
                self.tally.error = Some(format!("reconnect: {e}"));
                return;
            }
        };
        self.tally.ready_us = Some(started.elapsed().as_micros() as u64);
        self.progress.ready.fetch_add(1, Ordering::Relaxed);
        let mut unique = 0u64;
        let mut last_seq = 0i64;
        while unique < self.expected || (self.face == Face::Pusher && !self.tally.resumed) {
            let next = match tokio::time::timeout_at(deadline, ws.next()).await {
                Ok(n) => n,
                Err(_) => {
                    self.tally.error = Some(format!(
                        "not caught up within {} s ({unique} of {})",
                        self.catchup_deadline.as_secs(),
                        self.expected
                    ));
                    break;
                }
            };
            match next {
                Some(Ok(Message::Text(t))) => {
                    if self.handle(t.as_str(), &mut last_seq) {
                        unique += 1;
                    }
                    if self.tally.error.is_some() {
                        break;
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
        if self.tally.error.is_none() && unique >= self.expected {
            self.tally.caught_up_us = Some(started.elapsed().as_micros() as u64);
            self.progress.caught_up.fetch_add(1, Ordering::Relaxed);
            // Hold the socket (reading, so nothing piles up) until every client is done: a
            // close would add work to the server while others still catch up.
            let stop = self.stop.clone();
            self.hold(&mut ws, stop, &mut last_seq).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    }

    async fn hold(&mut self, ws: &mut Ws, mut stop: watch::Receiver<bool>, last_seq: &mut i64) {
        loop {
            if *stop.borrow() {
                return;
            }
            tokio::select! {
                changed = stop.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                m = ws.next() => match m {
                    Some(Ok(Message::Text(t))) => {
                        self.handle(t.as_str(), last_seq);
                    }
                    Some(Ok(_)) => {}
                    _ => return,
                },
            }
        }
    }

    /// Pusher face: connects, subscribes and asks to resume from the serial it left at.
    async fn resume(&mut self, within: Duration) -> Result<Ws, String> {
        let (mut ws, _hello) =
            pusher::connect(&self.ws_url, None, within, Some(&self.channel_id)).await?;
        let serial: i64 = self.cursor.parse().map_err(|_| "no serial".to_string())?;
        let resume = json!({
            "event": "sockudo:resume",
            "data": {"channel_positions": {&*self.channel_id: {"serial": serial}}},
        });
        futures_util::SinkExt::send(&mut ws, Message::text(resume.to_string()))
            .await
            .map_err(|e| format!("sending resume: {e}"))?;
        Ok(ws)
    }

    /// Books one frame; `true` for a post seen for the first time.
    fn handle(&mut self, text: &str, last_seq: &mut i64) -> bool {
        if self.face == Face::Pusher {
            return self.handle_pusher(text, last_seq);
        }
        let t = &mut self.tally;
        let Ok(f) = serde_json::from_str::<Frame<'_>>(text) else {
            t.unparsable += 1;
            return false;
        };
        if let Some(c) = f.cursor {
            if !cursor_gt(c, &self.cursor) {
                t.cursor_regressions += 1;
            }
            self.cursor.clear();
            self.cursor.push_str(c);
        }
        if f.ty != "message.created" {
            t.other_frames += 1;
            return false;
        }
        t.message_frames += 1;
        self.progress.events.fetch_add(1, Ordering::Relaxed);
        if f.channel_id != Some(&*self.channel_id) {
            t.wrong_channel += 1;
            return false;
        }
        if let Some(seq) = f.seq {
            if seq <= *last_seq {
                t.seq_repeats += 1;
            } else {
                if seq != *last_seq + 1 {
                    t.seq_gaps += 1;
                }
                *last_seq = seq;
            }
        }
        let Some(count) = frame_stamp(&f).and_then(|(k, _)| t.received.get_mut(k)) else {
            t.foreign += 1;
            return false;
        };
        *count = count.saturating_add(1);
        *count == 1
    }
}

impl ClientTask {
    /// [`ClientTask::handle`] on the Pusher face: `serial` instead of `seq`, the serial the
    /// client left at instead of a cursor, and the resume's own answer.
    fn handle_pusher(&mut self, text: &str, last_serial: &mut i64) -> bool {
        let t = &mut self.tally;
        let Ok(f) = serde_json::from_str::<PusherFrame<'_>>(text) else {
            t.unparsable += 1;
            return false;
        };
        if f.event != pusher::EVENT {
            match pusher::protocol_event(&f.event) {
                Some("resume_success") => {
                    let answer = f
                        .data
                        .0
                        .as_deref()
                        .and_then(|d| serde_json::from_str::<Value>(d).ok());
                    match answer {
                        Some(a) if a["failed"].as_array().is_some_and(Vec::is_empty) => {
                            t.resumed = true
                        }
                        other => {
                            t.error = Some(format!("resume: {}", other.unwrap_or(Value::Null)))
                        }
                    }
                }
                Some("resume_failed") => {
                    t.error = Some(format!(
                        "resume_failed: {}",
                        f.data.0.as_deref().unwrap_or("")
                    ));
                }
                _ => {}
            }
            t.other_frames += 1;
            return false;
        }
        t.message_frames += 1;
        self.progress.events.fetch_add(1, Ordering::Relaxed);
        if f.channel.as_deref() != Some(&*self.channel_id) {
            t.wrong_channel += 1;
            return false;
        }
        if let Some(serial) = f.serial {
            if *last_serial == 0 {
                // The first one follows the serial the client left at.
                *last_serial = self.cursor.parse().unwrap_or(0);
            }
            if serial <= *last_serial {
                t.seq_repeats += 1;
            } else {
                if serial != *last_serial + 1 {
                    t.seq_gaps += 1;
                }
                *last_serial = serial;
            }
        }
        let stamped = f.data.0.as_deref().and_then(crate::chat::parse_stamp);
        let Some(count) = stamped.and_then(|(k, _)| t.received.get_mut(k)) else {
            t.foreign += 1;
            return false;
        };
        *count = count.saturating_add(1);
        *count == 1
    }
}

/// `switchboard-bench reconnect`: one run, its own results file. `Ok(true)` when every
/// check passed (the 5 s target is reported, not enforced).
pub async fn reconnect_only(args: ReconnectArgs) -> Result<bool, String> {
    args.validate()?;
    let mut target = Target::open(&args.target).await?;
    let outcome = run(&args, &target).await;
    target.stop(outcome.is_err());
    let report = outcome?;
    report.print();
    // Its own name on the Pusher face: `make bench` merges results files by name.
    let name = match args.face {
        Face::Chat => "reconnect",
        Face::Pusher => "reconnect_pusher",
    };
    let path = write_results(&args.target.results_dir, name, &report.to_json())?;
    println!("results written to {}", path.display());
    Ok(report.passed())
}

async fn run(args: &ReconnectArgs, target: &Target) -> Result<ReconnectReport, String> {
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let client = api::http_client(args.post_concurrency + SETUP_CONCURRENCY)?;
    let api = Api {
        client: client.clone(),
        base: target.base.clone(),
        creds: target.creds.clone(),
    };
    eprintln!(
        "reconnect: {} clients, {} events each, {} face",
        args.clients,
        args.events,
        args.face.as_str()
    );
    let server_idle = sample(target.server_pid);

    // 1. The channel; every client connects once, notes where it is and leaves.
    let tag = random_tag();
    let Away {
        clients,
        ws_url,
        channel_id,
        publisher,
        first_connect_secs,
    } = match args.face {
        Face::Chat => chat_away(args, target, &api, &tag, deadline).await?,
        Face::Pusher => pusher_away(args, target, &client, &tag, deadline).await?,
    };
    eprintln!(
        "reconnect: {} clients connected, noted their position and left in {first_connect_secs:.2}s",
        clients.len()
    );

    // 2. Post E messages while they are away.
    let posts = post_all(&client, target, &channel_id, &publisher, args, deadline).await?;
    let acked = posts.acked.iter().filter(|a| **a).count() as u64;
    eprintln!(
        "reconnect: {acked}/{} posts acknowledged in {:.2}s",
        args.events, posts.secs
    );
    // Let the server settle (sessions of the first connects gone, commits flushed).
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 3. Everyone reconnects at once.
    let progress = Arc::new(Progress::default());
    let (go_tx, go_rx) = watch::channel(None);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut handles = Vec::with_capacity(clients.len());
    for (i, c) in clients.into_iter().enumerate() {
        let task = ClientTask {
            face: args.face,
            ws_url: ws_url.clone(),
            token: c.token,
            cursor: c.cursor,
            channel_id: channel_id.clone(),
            expected: acked,
            go: go_rx.clone(),
            stop: stop_rx.clone(),
            catchup_deadline: Duration::from_secs(args.catchup_timeout),
            progress: progress.clone(),
            tally: ClientTally::new(i, args.events),
        };
        handles.push(tokio::spawn(task.run()));
    }
    drop(go_rx);
    drop(stop_rx);
    // The tasks wait on `go`; each starts its clock at the instant sent with it.
    tokio::task::yield_now().await;
    let server_before = sample(target.server_pid);
    let client_before = server::sample_proc("self");
    let metrics_before = api.metrics().await;
    let stop_progress = Arc::new(AtomicBool::new(false));
    let progress_task = tokio::spawn(progress_line(
        progress.clone(),
        stop_progress.clone(),
        args.clients as u64,
        acked * args.clients as u64,
        target.server_pid,
    ));
    let started = Instant::now();
    let storm_deadline = (started + Duration::from_secs(args.catchup_timeout + 2)).min(deadline);
    let _ = go_tx.send(Some(started));
    let total = args.clients as u64;
    // The server's threads, read every 50 ms: a storm must not grow a thread per client.
    let mut server_threads_peak = server_before.map(|s| s.threads);
    let mut polls = 0u32;
    while progress.caught_up.load(Ordering::Relaxed) + progress_failed(&progress) < total
        && Instant::now() < storm_deadline
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
        polls += 1;
        if polls % 10 == 0 {
            if let Some(s) = sample(target.server_pid) {
                server_threads_peak = server_threads_peak.max(Some(s.threads));
            }
        }
    }
    let storm_secs = started.elapsed().as_secs_f64();
    let server_after = sample(target.server_pid);
    server_threads_peak = server_threads_peak.max(server_after.map(|s| s.threads));
    let client_after = server::sample_proc("self");
    let metrics_after = api.metrics().await;
    let _ = stop_tx.send(true);
    let mut tallies = Vec::with_capacity(handles.len());
    for h in handles {
        tallies.push(h.await.map_err(|e| format!("client task: {e}"))?);
    }
    stop_progress.store(true, Ordering::Relaxed);
    let _ = progress_task.await;
    let (log_lines, log_sample) = target.log_problems();
    let mut report = ReconnectReport {
        args: args.clone(),
        base: target.base.clone(),
        server_pid: target.server_pid,
        server_started_here: target.child.is_some(),
        first_connect_secs,
        posts,
        acked,
        storm_secs,
        ready: histogram()?,
        caught_up: histogram()?,
        checks: Checks::default(),
        server_idle,
        server_before,
        server_after,
        server_end: sample(target.server_pid),
        server_threads_peak,
        client_before,
        client_after,
        metrics_before,
        metrics_after,
        timed_out: Instant::now() >= deadline,
        server_log_problems: log_lines,
        server_log_sample: log_sample,
    };
    report.tally(&tallies);
    Ok(report)
}

/// Where the clients left: step 1 of either face.
struct Away {
    clients: Vec<Client>,
    ws_url: Arc<String>,
    channel_id: Arc<str>,
    publisher: Publisher,
    first_connect_secs: f64,
}

/// Who posts the events while the clients are away.
enum Publisher {
    /// A member of the chat channel, by `POST /api/channels/{id}/messages` (201).
    Member { token: String },
    /// The server API, by a signed `POST /apps/{id}/events` (200).
    App,
}

/// Step 1: each client's first connect, `--connect-concurrency` at a time, within `deadline`.
async fn first_connects<F, Fut>(
    args: &ReconnectArgs,
    deadline: Instant,
    connect_once: F,
) -> Result<Vec<Client>, String>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<Client, String>>,
{
    tokio::time::timeout_at(
        deadline,
        futures_util::stream::iter((0..args.clients).map(connect_once))
            .buffered(args.connect_concurrency)
            .collect::<Vec<_>>(),
    )
    .await
    .map_err(|_| "reconnect: timed out on the first connects".to_string())?
    .into_iter()
    .collect()
}

/// The chat face: entities, tokens, a public channel; each client's `realtime.ready` cursor.
async fn chat_away(
    args: &ReconnectArgs,
    target: &Target,
    api: &Api,
    tag: &str,
    deadline: Instant,
) -> Result<Away, String> {
    let poster = format!("bench-{tag}-poster");
    let second = format!("bench-{tag}-poster2");
    let ids: Vec<String> = (0..args.clients)
        .map(|i| format!("bench-{tag}-c{i}"))
        .chain([poster.clone(), second.clone()])
        .collect();
    let setup_started = Instant::now();
    create_humans(api, &ids, deadline).await?;
    let poster_token = api::mint_token(&api.creds, &poster, 3600)?;
    let channel_id: Arc<str> = api
        .create_channel(&poster_token, &format!("bench-{tag}-replay"), &[second])
        .await?
        .into();
    eprintln!(
        "reconnect: created {} entities and a public channel in {:.2}s",
        ids.len(),
        setup_started.elapsed().as_secs_f64()
    );
    let ws_url = Arc::new(target.base.replacen("http://", "ws://", 1));
    let first_started = Instant::now();
    let clients = first_connects(args, deadline, |i| {
        let ws_url = ws_url.clone();
        let (creds, id) = (&api.creds, &ids[i]);
        async move {
            let token = api::mint_token(creds, id, 3600)?;
            let (mut ws, cursor) = connect(&ws_url, &token, None, 4096, CONNECT_WITHIN)
                .await
                .map_err(|e| format!("client {i} first connect: {e}"))?;
            let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
            Ok(Client { token, cursor })
        }
    })
    .await?;
    Ok(Away {
        clients,
        ws_url,
        channel_id,
        publisher: Publisher::Member {
            token: poster_token,
        },
        first_connect_secs: first_started.elapsed().as_secs_f64(),
    })
}

/// The Pusher face: a public channel opened by one publish (serial 1); each client's serial
/// at subscribe time.
async fn pusher_away(
    args: &ReconnectArgs,
    target: &Target,
    client: &reqwest::Client,
    tag: &str,
    deadline: Instant,
) -> Result<Away, String> {
    let channel = format!("bench-{tag}-resume");
    pusher::publish_once(
        client,
        &target.base,
        &target.creds,
        &channel,
        pusher::EVENT,
        "open",
    )
    .await?;
    let ws_url = Arc::new(pusher::app_url(&target.base, &target.creds.key, 2));
    let first_started = Instant::now();
    let clients = first_connects(args, deadline, |i| {
        let (ws_url, channel) = (ws_url.clone(), channel.as_str());
        async move {
            let (mut ws, hello) = pusher::connect(&ws_url, None, CONNECT_WITHIN, Some(channel))
                .await
                .map_err(|e| format!("client {i} first connect: {e}"))?;
            let serial = hello
                .serial
                .ok_or_else(|| format!("client {i}: no serial at subscribe (not a V2 server?)"))?;
            let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
            Ok(Client {
                token: String::new(),
                cursor: serial.to_string(),
            })
        }
    })
    .await?;
    Ok(Away {
        clients,
        ws_url,
        channel_id: channel.into(),
        publisher: Publisher::App,
        first_connect_secs: first_started.elapsed().as_secs_f64(),
    })
}

/// Clients whose task ended before the stop: only those that did not catch up (an error or
/// the catch-up deadline), since a caught-up client holds its socket until the stop.
fn progress_failed(p: &Progress) -> u64 {
    p.ended.load(Ordering::Relaxed)
}

/// The posting phase.
struct Posts {
    /// Acknowledged (201) by post index.
    acked: Vec<bool>,
    statuses: BTreeMap<u16, u64>,
    errors: Vec<String>,
    rtt: Histogram<u64>,
    secs: f64,
}

async fn post_all(
    client: &reqwest::Client,
    target: &Target,
    channel_id: &str,
    publisher: &Publisher,
    args: &ReconnectArgs,
    deadline: Instant,
) -> Result<Posts, String> {
    let url = format!("{}/api/channels/{channel_id}/messages", target.base);
    let (auth, acked_status) = match publisher {
        Publisher::Member { token } => (Some(api::bearer(token)?), 201),
        Publisher::App => (None, 200),
    };
    let started = Instant::now();
    let answers = tokio::time::timeout_at(
        deadline,
        futures_util::stream::iter((0..args.events).map(|k| {
            let data = stamp(k, now_ns());
            let request = match &auth {
                Some(auth) => client
                    .post(&url)
                    .header(AUTHORIZATION, auth.clone())
                    .body(format!(r#"{{"data":"{data}"}}"#)),
                None => {
                    let (url, body) = pusher::trigger(
                        &target.base,
                        &target.creds,
                        channel_id,
                        pusher::EVENT,
                        &data,
                    );
                    client.post(url).body(body)
                }
            }
            .header(CONTENT_TYPE, "application/json");
            async move {
                let sent = Instant::now();
                let answer = match request.send().await {
                    Err(e) => Err((0, format!("transport: {}", crate::api::error_chain(&e)))),
                    Ok(r) => {
                        let status = r.status().as_u16();
                        match (status, r.bytes().await) {
                            (s, Ok(_)) if s == acked_status => Ok(()),
                            (_, Ok(b)) => Err((status, reason(status, &b))),
                            (_, Err(e)) => Err((
                                status,
                                format!("reading the answer: {}", crate::api::error_chain(&e)),
                            )),
                        }
                    }
                };
                (k, answer, sent.elapsed().as_micros() as u64)
            }
        }))
        .buffer_unordered(args.post_concurrency)
        .collect::<Vec<_>>(),
    )
    .await
    .map_err(|_| "reconnect: timed out posting".to_string())?;
    let mut posts = Posts {
        acked: vec![false; args.events],
        statuses: BTreeMap::new(),
        errors: Vec::new(),
        rtt: histogram()?,
        secs: started.elapsed().as_secs_f64(),
    };
    for (k, answer, rtt_us) in answers {
        match answer {
            Ok(()) => {
                posts.acked[k] = true;
                *posts.statuses.entry(acked_status).or_insert(0) += 1;
                posts.rtt.saturating_record(rtt_us.max(1));
            }
            Err((status, e)) => {
                *posts.statuses.entry(status).or_insert(0) += 1;
                if posts.errors.len() < KEEP_ERRORS {
                    posts.errors.push(e);
                }
            }
        }
    }
    Ok(posts)
}

/// Prints ready / caught-up clients and events received once a second until told to stop.
async fn progress_line(
    progress: Arc<Progress>,
    stop: Arc<AtomicBool>,
    clients: u64,
    expected_events: u64,
    pid: Option<u32>,
) {
    let start = Instant::now();
    let mut last = 0u64;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let events = progress.events.load(Ordering::Relaxed);
        eprintln!(
            "[{:>5.1}s] ready {}/{clients}  caught up {}/{clients}  events {events}/{expected_events} (+{}/s){}",
            start.elapsed().as_secs_f64(),
            progress.ready.load(Ordering::Relaxed),
            progress.caught_up.load(Ordering::Relaxed),
            events - last,
            describe_proc(sample(pid)),
        );
        last = events;
    }
}

#[derive(Default)]
struct Checks {
    caught_up: u64,
    expected_events: u64,
    events: u64,
    missing: u64,
    duplicates: u64,
    seq_gaps: u64,
    seq_repeats: u64,
    cursor_regressions: u64,
    wrong_channel: u64,
    foreign: u64,
    unparsable: u64,
    other_frames: u64,
    errors: u64,
    error_sample: Vec<String>,
    /// Largest time from the storm's start to a client caught up, µs.
    last_caught_up_us: Option<u64>,
}

struct ReconnectReport {
    args: ReconnectArgs,
    base: String,
    server_pid: Option<u32>,
    server_started_here: bool,
    first_connect_secs: f64,
    posts: Posts,
    acked: u64,
    /// From the storm's start until every client was caught up or gave up.
    storm_secs: f64,
    /// Storm start → `realtime.ready`, µs.
    ready: Histogram<u64>,
    /// Storm start → caught up, µs.
    caught_up: Histogram<u64>,
    checks: Checks,
    server_idle: Option<ProcSample>,
    server_before: Option<ProcSample>,
    server_after: Option<ProcSample>,
    server_end: Option<ProcSample>,
    /// Most threads the server had during the storm (read every 50 ms).
    server_threads_peak: Option<u64>,
    client_before: Option<ProcSample>,
    client_after: Option<ProcSample>,
    metrics_before: BTreeMap<String, f64>,
    metrics_after: BTreeMap<String, f64>,
    timed_out: bool,
    server_log_problems: u64,
    server_log_sample: Vec<String>,
}

impl ReconnectReport {
    fn tally(&mut self, tallies: &[ClientTally]) {
        let c = &mut self.checks;
        for t in tallies {
            if let Some(us) = t.ready_us {
                self.ready.saturating_record(us.max(1));
            }
            if let Some(us) = t.caught_up_us {
                self.caught_up.saturating_record(us.max(1));
                c.caught_up += 1;
                c.last_caught_up_us = c.last_caught_up_us.max(Some(us));
            }
            c.expected_events += self.acked;
            c.events += t.message_frames;
            for (k, n) in t.received.iter().enumerate() {
                let n = u64::from(*n);
                if n == 0 && self.posts.acked.get(k).copied().unwrap_or(false) {
                    c.missing += 1;
                }
                c.duplicates += n.saturating_sub(1);
            }
            c.seq_gaps += t.seq_gaps;
            c.seq_repeats += t.seq_repeats;
            c.cursor_regressions += t.cursor_regressions;
            c.wrong_channel += t.wrong_channel;
            c.foreign += t.foreign;
            c.unparsable += t.unparsable;
            c.other_frames += t.other_frames;
            if let Some(e) = &t.error {
                c.errors += 1;
                if c.error_sample.len() < KEEP_ERRORS {
                    c.error_sample.push(format!("client {}: {e}", t.client));
                }
            }
        }
    }

    fn failures(&self) -> Vec<String> {
        let c = &self.checks;
        let mut out = Vec::new();
        let mut check = |n: u64, what: &str| {
            if n > 0 {
                out.push(format!("{n} {what}"));
            }
        };
        check(
            self.args.clients as u64 - c.caught_up.min(self.args.clients as u64),
            "clients not caught up",
        );
        check(c.missing, "missing events");
        check(c.duplicates, "duplicate events");
        check(c.seq_gaps, "seq gaps");
        check(c.seq_repeats, "repeated or out-of-order seqs");
        check(c.cursor_regressions, "cursor regressions");
        check(c.wrong_channel, "events of another channel");
        check(c.foreign, "messages without this run's stamp");
        check(c.unparsable, "unparsable frames");
        check(
            self.args.events as u64 - self.acked.min(self.args.events as u64),
            "failed posts",
        );
        check(c.errors, "client errors");
        if self.timed_out {
            out.push("the run hit --timeout".into());
        }
        out
    }

    fn passed(&self) -> bool {
        self.failures().is_empty()
    }

    fn total_secs(&self) -> Option<f64> {
        let c = &self.checks;
        (c.caught_up == self.args.clients as u64)
            .then_some(c.last_caught_up_us)
            .flatten()
            .map(|us| us as f64 / 1e6)
    }

    fn metric_delta(&self, name: &str) -> Option<f64> {
        crate::report::metric_delta(&self.metrics_before, &self.metrics_after, name)
    }

    fn targets(&self) -> Vec<(String, bool)> {
        let total = self.total_secs();
        vec![
            (
                format!(
                    "all {} clients caught up in {} s ≤ 5 s",
                    self.args.clients,
                    opt(total, 2)
                ),
                total.is_some_and(|t| t <= 5.0),
            ),
            (
                format!("{} events missing = 0", self.checks.missing),
                self.checks.missing == 0 && self.checks.caught_up == self.args.clients as u64,
            ),
        ]
    }

    fn print(&self) {
        let a = &self.args;
        let c = &self.checks;
        println!();
        println!("switchboard-bench reconnect");
        println!("===========================");
        row(
            "scenario",
            format!(
                "{} clients reconnect at once, {} events each to catch up ({} face)",
                a.clients,
                a.events,
                a.face.as_str()
            ),
        );
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
            "first connects (note cursor, leave)",
            format!("{:.2} s", self.first_connect_secs),
        );
        row(
            "posts while away acked / in",
            format!(
                "{} / {} in {:.2} s (HTTP p50 {:.2} ms, statuses {:?})",
                self.acked,
                a.events,
                self.posts.secs,
                ms(self.posts.rtt.value_at_quantile(0.5)),
                self.posts.statuses
            ),
        );
        for e in &self.posts.errors {
            println!("  post error: {e}");
        }
        println!("-- reconnect storm (times from its start)");
        row(
            "clients caught up",
            format!("{} / {}", c.caught_up, a.clients),
        );
        row("all caught up after", opt(self.total_secs(), 3) + " s");
        row("ready p50/p90/p99/p99.9/max ms", quantiles(&self.ready));
        row(
            "caught up p50/p90/p99/p99.9/max ms",
            quantiles(&self.caught_up),
        );
        row(
            "events received / expected",
            format!("{} / {}", c.events, c.expected_events),
        );
        row(
            "events/s delivered",
            format!(
                "{:.0}",
                if self.storm_secs > 0.0 {
                    c.events as f64 / self.storm_secs
                } else {
                    0.0
                }
            ),
        );
        println!("-- server process");
        let cpu = cpu_delta(self.server_before, self.server_after);
        row(
            "CPU s during the storm",
            format!(
                "{} over {:.2} s wall ({} µs per event)",
                opt(cpu, 2),
                self.storm_secs,
                opt(
                    cpu.filter(|_| c.events > 0)
                        .map(|s| s * 1e6 / c.events as f64),
                    1
                )
            ),
        );
        row(
            "RSS idle / before / after storm (MiB)",
            format!(
                "{} / {} / {} (peak {})",
                opt(mib(self.server_idle), 1),
                opt(mib(self.server_before), 1),
                opt(mib(self.server_after), 1),
                opt(self.server_end.map(|s| s.hwm_kb as f64 / 1024.0), 1)
            ),
        );
        row(
            "server threads before / peak during storm",
            format!(
                "{} / {}",
                opt(self.server_before.map(|s| s.threads as f64), 0),
                opt(self.server_threads_peak.map(|t| t as f64), 0)
            ),
        );
        row(
            "deliveries queued (server metric)",
            opt(self.metric_delta("switchboard_deliveries_total"), 0),
        );
        row(
            "server WARN/ERROR log lines",
            crate::report::log_lines_cell(self.server_started_here, self.server_log_problems),
        );
        row(
            "bench client CPU s during the storm",
            opt(cpu_delta(self.client_before, self.client_after), 2),
        );
        println!("-- correctness");
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
            "wrong channel / foreign / other / bad",
            format!(
                "{} / {} / {} / {}",
                c.wrong_channel, c.foreign, c.other_frames, c.unparsable
            ),
        );
        row("client errors", c.errors.to_string());
        for e in &c.error_sample {
            println!("  client error: {e}");
        }
        for l in &self.server_log_sample {
            println!("  server log: {l}");
        }
        println!("-- targets");
        for (name, met) in self.targets() {
            row(if met { "met" } else { "MISSED" }, name);
        }
        print_verdict(&self.failures(), c.events, c.expected_events);
    }

    fn to_json(&self) -> Value {
        let a = &self.args;
        let c = &self.checks;
        json!({
            "scenario": "reconnect",
            "finished_at": chrono::Utc::now().to_rfc3339(),
            "passed": self.passed(),
            "failures": self.failures(),
            "targets": self.targets().into_iter().map(|(name, met)| json!({"target": name, "met": met})).collect::<Vec<_>>(),
            "config": {
                "clients": a.clients,
                "events": a.events,
                "face": a.face.as_str(),
                "connect_concurrency": a.connect_concurrency,
                "post_concurrency": a.post_concurrency,
                "catchup_timeout_secs": a.catchup_timeout,
                "timeout_secs": a.timeout,
                "client_threads": a.target.threads,
                "server": self.base,
                "server_started_by_bench": self.server_started_here,
            },
            "setup": {
                "first_connect_secs": self.first_connect_secs,
                "posts_acknowledged": self.acked,
                "posting_secs": self.posts.secs,
                "post_statuses": self.posts.statuses.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
                "post_errors": self.posts.errors,
                "http_post_round_trip": hist_json(&self.posts.rtt),
            },
            "storm": {
                "clients_caught_up": c.caught_up,
                "all_caught_up_secs": self.total_secs(),
                "storm_secs": self.storm_secs,
                "ready": hist_json(&self.ready),
                "caught_up": hist_json(&self.caught_up),
                "events": c.events,
                "expected_events": c.expected_events,
            },
            "correctness": {
                "missing": c.missing,
                "duplicates": c.duplicates,
                "seq_gaps": c.seq_gaps,
                "seq_repeats": c.seq_repeats,
                "cursor_regressions": c.cursor_regressions,
                "wrong_channel": c.wrong_channel,
                "foreign": c.foreign,
                "unparsable": c.unparsable,
                "other_frames": c.other_frames,
                "client_errors": c.errors,
                "client_error_sample": c.error_sample,
                "timed_out": self.timed_out,
            },
            "server": {
                "pid": self.server_pid,
                "idle": proc_json(self.server_idle),
                "before_storm": proc_json(self.server_before),
                "after_storm": proc_json(self.server_after),
                "end": proc_json(self.server_end),
                "cpu_secs_storm": cpu_delta(self.server_before, self.server_after),
                "threads_peak_storm": self.server_threads_peak,
                "log_warn_error_lines": self.server_log_problems,
                "log_sample": self.server_log_sample,
                "metrics_delta": {
                    "deliveries_queued": self.metric_delta("switchboard_deliveries_total"),
                    "sessions_gauge_after": self.metrics_after.get("switchboard_sessions"),
                },
            },
            "client": {
                "cpu_secs_storm": cpu_delta(self.client_before, self.client_after),
                "after": proc_json(self.client_after),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Pusher-face client that left channel `ch` at serial 1 and expects 3 posts.
    fn pusher_client() -> ClientTask {
        let (_go_tx, go) = watch::channel(None);
        let (_stop_tx, stop) = watch::channel(false);
        ClientTask {
            face: Face::Pusher,
            ws_url: Arc::new(String::new()),
            token: String::new(),
            cursor: "1".into(),
            channel_id: "ch".into(),
            expected: 3,
            go,
            stop,
            catchup_deadline: Duration::from_secs(1),
            progress: Arc::default(),
            tally: ClientTally::new(0, 3),
        }
    }

    fn message(channel: &str, serial: i64, post: usize) -> String {
        json!({"event": "bench", "channel": channel, "serial": serial, "data": stamp(post, 7)})
            .to_string()
    }

    #[test]
    fn pusher_frames_are_checked_for_serials_posts_and_the_resume_answer() {
        let mut c = pusher_client();
        let mut last = 0;
        assert!(
            c.handle(&message("ch", 2, 0), &mut last),
            "first after serial 1"
        );
        assert!(c.handle(&message("ch", 3, 2), &mut last));
        assert!(!c.handle(&message("ch", 3, 2), &mut last), "a repeat");
        assert!(
            !c.handle(&message("other", 4, 1), &mut last),
            "another channel"
        );
        assert!(c.handle(&message("ch", 5, 1), &mut last), "after a gap");
        assert!(
            !c.handle(&message("ch", 6, 9), &mut last),
            "not a post of this run"
        );
        let t = &c.tally;
        assert_eq!(
            (t.seq_repeats, t.seq_gaps, t.wrong_channel, t.foreign),
            (1, 1, 1, 1)
        );
        assert_eq!(t.received, vec![1, 1, 2]);
        assert!(!t.resumed);

        let success = |failed: Value| {
            json!({"event": "sockudo:resume_success",
                   "data": json!({"recovered": [], "failed": failed}).to_string()})
            .to_string()
        };
        c.handle(&success(json!([])), &mut last);
        assert!(c.tally.resumed && c.tally.error.is_none());

        let mut failed = pusher_client();
        failed.handle(&success(json!([{"channel": "ch"}])), &mut last);
        assert!(!failed.tally.resumed && failed.tally.error.is_some());
        let mut refused = pusher_client();
        let frame = json!({"event": "sockudo:resume_failed", "channel": "ch", "data": "{}"});
        refused.handle(&frame.to_string(), &mut last);
        assert!(refused.tally.error.is_some());
    }
}
