//! `ai-stream`: AI token streaming under load (issue: "100 concurrent streams appending 50
//! tokens/s each with 5 subscribers per stream, printing durable appends/s and p50/p99
//! append-to-receive latency").
//!
//! Each stream is one agent entity with its own private group channel whose other members
//! are the stream's subscribers, each holding one `/api/realtime/ws` socket. The agent posts
//! an empty message, then appends one fragment per tick of a fixed schedule (open loop: a
//! slow answer does not slow the schedule; a tick that finds `--max-in-flight` appends
//! unanswered is skipped and counted as behind). A 200 answer is a durable append. Every
//! fragment is `"<ordinal>@<send µs>;"`, so a subscriber knows which append it got and when
//! it was sent; it checks the `length` of every `message.appended` against the fragments it
//! has, and that each acknowledged append arrives exactly once. A message takes
//! `--appends-per-message` appends, the last one closing it; the stream then continues in a
//! new message, and closes its last message when the run ends.

#[path = "ai_stream/receiver.rs"]
mod receiver;
#[path = "ai_stream/report.rs"]
mod report;
#[path = "ai_stream/streamer.rs"]
mod streamer;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use futures_util::StreamExt as _;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::api::{self, Api};
use crate::http1::Http1;
use crate::plot::Recorder;
use crate::pusher::{self, Face};
use crate::report::Window;
use crate::server::{self, ProcSample};
use crate::subscriber::{self, Ws};
use crate::{now_ns, random_tag, sample, Target, TargetArgs};

pub use report::AiStreamReport;

use receiver::{ReceiverTally, ReceiverTask};
use report::Samples;
use streamer::{Route, Schedule, StreamerTally, StreamerTask};

const DEFAULT_STREAMS: usize = 100;
const DEFAULT_RATE: u32 = 50;
const DEFAULT_SUBSCRIBERS: usize = 5;
const DEFAULT_DURATION_SECS: u64 = 20;
const DEFAULT_MAX_IN_FLIGHT: usize = 4;
/// SPEC §7 `ai_transport.max_appends_per_message`.
const DEFAULT_APPENDS_PER_MESSAGE: usize = 4096;
const DEFAULT_DRAIN_IDLE_SECS: u64 = 5;
const DEFAULT_TIMEOUT_SECS: u64 = 120;
/// Concurrent setup requests (entities, channels, socket connects).
const SETUP_CONCURRENCY: usize = 16;

/// The shape of an `ai-stream` run (`quick` runs it with these defaults).
#[derive(Args, Clone, Debug)]
pub struct AiStreamParams {
    /// Concurrent streams: one agent, one private group channel, one open message each.
    #[arg(long, default_value_t = DEFAULT_STREAMS)]
    pub streams: usize,
    /// Appends per second of each stream, on a fixed schedule (open loop).
    #[arg(long, default_value_t = DEFAULT_RATE)]
    pub rate: u32,
    /// WebSocket subscribers per stream, each a member of the stream's channel.
    #[arg(long, default_value_t = DEFAULT_SUBSCRIBERS)]
    pub subscribers: usize,
    /// Seconds of appending.
    #[arg(long, default_value_t = DEFAULT_DURATION_SECS)]
    pub duration: u64,
    /// Unanswered appends one stream may have; a tick finding them all busy is skipped.
    #[arg(long, default_value_t = DEFAULT_MAX_IN_FLIGHT)]
    pub max_in_flight: usize,
    /// Appends one message takes, the closing one included; then a new message continues.
    #[arg(long, default_value_t = DEFAULT_APPENDS_PER_MESSAGE)]
    pub appends_per_message: usize,
    /// Ask for the whole message in every append's answer, as a client without
    /// `Prefer: return=minimal` gets it (by default appends send that header, as an agent
    /// streaming a long reply would: the whole-message answer grows with the text).
    #[arg(long)]
    pub full_answers: bool,
    /// After appending ends, a subscriber stops after this many seconds without a frame.
    #[arg(long, default_value_t = DEFAULT_DRAIN_IDLE_SECS)]
    pub drain_idle: u64,
    /// Overall bound in seconds (setup, appending, drain); on expiry the run reports.
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_SECS)]
    pub timeout: u64,
    /// Write an SVG of append-to-receive latency percentiles per second here (and add a
    /// `timeline` to the JSON).
    #[arg(long, value_name = "PATH.svg")]
    pub plot: Option<std::path::PathBuf>,
    /// `chat`: agents create and append through `/api/channels/{id}/messages` on private
    /// group channels, members read `/api/realtime/ws`. `pusher`: signed `POST
    /// /apps/{id}/events` creates and `/apps/{id}/channels/{c}/messages/{serial}/append`
    /// appends on public channels, read by Protocol V2 sockets (`/app/{key}?protocol=2`) as
    /// `sockudo:message.append` fragments, each checked by its `serial`.
    #[arg(long, value_enum, default_value_t = Face::Chat)]
    pub face: Face,
}

impl Default for AiStreamParams {
    fn default() -> Self {
        Self {
            streams: DEFAULT_STREAMS,
            rate: DEFAULT_RATE,
            subscribers: DEFAULT_SUBSCRIBERS,
            duration: DEFAULT_DURATION_SECS,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            appends_per_message: DEFAULT_APPENDS_PER_MESSAGE,
            full_answers: false,
            drain_idle: DEFAULT_DRAIN_IDLE_SECS,
            timeout: DEFAULT_TIMEOUT_SECS,
            plot: None,
            face: Face::Chat,
        }
    }
}

impl AiStreamParams {
    pub fn validate(&self) -> Result<(), String> {
        let at_least_one = [
            (self.streams, "--streams"),
            (self.rate as usize, "--rate"),
            (self.subscribers, "--subscribers"),
            (self.duration as usize, "--duration"),
            (self.max_in_flight, "--max-in-flight"),
        ];
        if let Some((_, flag)) = at_least_one.iter().find(|(v, _)| *v == 0) {
            // (--subscribers: a stream's group channel needs a member besides its agent.)
            return Err(format!("{flag} must be at least 1"));
        }
        if self.appends_per_message < 2 {
            return Err(
                "--appends-per-message must be at least 2 (a fragment and the close)".into(),
            );
        }
        if self.timeout <= self.duration {
            return Err("--timeout must be longer than --duration".into());
        }
        Ok(())
    }

    /// Appends each stream is scheduled to send (one per tick).
    pub fn ticks_per_stream(&self) -> usize {
        self.rate as usize * self.duration as usize
    }

    fn period(&self) -> Duration {
        Duration::from_secs_f64(1.0 / f64::from(self.rate))
    }
}

#[derive(Args, Clone, Debug)]
pub struct AiStreamArgs {
    #[command(flatten)]
    pub params: AiStreamParams,
    #[command(flatten)]
    pub target: TargetArgs,
}

/// Counters every task bumps and the progress line reads.
#[derive(Default)]
pub struct Progress {
    pub acked: AtomicU64,
    pub failed: AtomicU64,
    pub deliveries: AtomicU64,
    /// Append-to-receive latency by second of receipt (`--plot`; off otherwise).
    pub timeline: Recorder,
}

/// What one stream's subscribers wait for: `u64::MAX` while it appends, then the number of
/// its acknowledged appends (fragments and closes).
pub struct StreamEnd {
    pub acknowledged: AtomicU64,
}

/// One stream as set up.
struct StreamSetup {
    /// Chat: the agent's bearer token (Pusher: none, requests are signed).
    agent_token: Option<String>,
    /// What the stream's frames name: the chat channel's id, the Pusher channel's name.
    channel: String,
    /// Chat: one token per subscriber. Pusher: none (a public channel).
    subscriber_tokens: Vec<String>,
}

/// A connected subscriber socket of stream `stream`.
struct Connected {
    stream: usize,
    subscriber: usize,
    ws: Ws,
    /// Chat: the `realtime.ready` cursor (Pusher: empty).
    cursor: String,
    /// Pusher: the channel's serial at subscription (chat: 0, the first seq is taken as it comes).
    last_serial: i64,
}

/// Runs `ai-stream` on a ready server and returns its figures.
pub async fn run(params: &AiStreamParams, target: &Target) -> Result<AiStreamReport, String> {
    params.validate()?;
    eprintln!(
        "ai-stream: {} streams x {} appends/s for {} s, {} subscribers per stream",
        params.streams, params.rate, params.duration, params.subscribers
    );
    let deadline = Instant::now() + Duration::from_secs(params.timeout);
    // Setup only: the streamers' appends go through their own connections (`Http1`).
    let client = api::http_client(SETUP_CONCURRENCY)?;
    let api = Api {
        client: client.clone(),
        base: target.base.clone(),
        creds: target.creds.clone(),
    };
    let setup_started = Instant::now();
    let (streams, ws_url) = match params.face {
        Face::Chat => (
            set_up_streams(&api, params, deadline).await?,
            target.base.replacen("http://", "ws://", 1),
        ),
        Face::Pusher => (
            pusher_streams(params),
            // Delta appends (the default, named for servers that differ).
            format!(
                "{}&append_mode=delta",
                pusher::app_url(&target.base, &target.creds.key, 2)
            ),
        ),
    };
    let connect_started = Instant::now();
    let sockets = match params.face {
        Face::Chat => connect_subscribers(&ws_url, &streams, deadline).await?,
        Face::Pusher => connect_pusher_subscribers(&ws_url, params, &streams, deadline).await?,
    };
    let connect_secs = connect_started.elapsed().as_secs_f64();
    eprintln!(
        "ai-stream: {} subscribers ready in {connect_secs:.2}s; setup took {:.2}s",
        sockets.len(),
        setup_started.elapsed().as_secs_f64()
    );

    let progress = Arc::new(Progress {
        timeline: Recorder::new(params.plot.is_some(), now_ns()),
        ..Progress::default()
    });
    let timeline = progress.timeline.clone();
    let ends: Vec<Arc<StreamEnd>> = (0..streams.len())
        .map(|_| {
            Arc::new(StreamEnd {
                acknowledged: AtomicU64::new(u64::MAX),
            })
        })
        .collect();
    let receivers = spawn_receivers(
        params, sockets, &streams, &ends, &ws_url, &progress, deadline,
    )?;

    let streamers = prepare_streamers(params, target, &streams, &progress, deadline).await?;
    let mut samples = Samples {
        server_before: sample(target.server_pid),
        client_before: server::sample_proc("self"),
        metrics_before: api.metrics().await,
        ..Samples::default()
    };
    let start_ns = now_ns();
    timeline.set_origin(start_ns);
    let streamers = spawn_streamers(params, streamers, deadline);
    let stop_progress = Arc::new(AtomicBool::new(false));
    let progress_task = tokio::spawn(progress_line(
        progress.clone(),
        stop_progress.clone(),
        (params.streams * params.ticks_per_stream()) as u64,
        target.server_pid,
    ));

    let streamed = join_all(streamers, "streamer").await?;
    for (end, tally) in ends.iter().zip(&streamed) {
        end.acknowledged
            .store(tally.acknowledged(), Ordering::Relaxed);
    }
    samples.server_after_streaming = sample(target.server_pid);
    let received = join_all(receivers, "subscriber").await?;
    let end_ns = now_ns();
    stop_progress.store(true, Ordering::Relaxed);
    let _ = progress_task.await;
    samples.server_after = sample(target.server_pid);
    samples.client_after = server::sample_proc("self");
    samples.metrics_after = api.metrics().await;

    let (log_lines, log_sample) = target.log_problems();
    let mut report = report::build(report::Inputs {
        params: params.clone(),
        target,
        connect_secs,
        run_window: Window::new(start_ns, end_ns),
        start_ns,
        streamed,
        received,
        samples,
        timed_out: Instant::now() >= deadline,
        server_log_problems: log_lines,
        server_log_sample: log_sample,
    })?;
    report.timeline = timeline.snapshot().map(|t| t.points(start_ns));
    if let (Some(path), Some(points)) = (&params.plot, &report.timeline) {
        let subtitle = format!(
            "{} streams x {} appends/s for {} s, {} subscribers per stream, {} appends per message",
            params.streams,
            params.rate,
            params.duration,
            params.subscribers,
            params.appends_per_message
        );
        crate::plot::write_svg(
            path,
            "switchboard-bench ai-stream: append-to-receive latency per second",
            &subtitle,
            points,
        )?;
    }
    Ok(report)
}

/// Entities (one agent and its subscribers per stream), their tokens, and one private group
/// channel per stream created by its agent with its subscribers as members.
async fn set_up_streams(
    api: &Api,
    params: &AiStreamParams,
    deadline: Instant,
) -> Result<Vec<StreamSetup>, String> {
    let tag = random_tag();
    let agent_id = |s: usize| format!("bench-{tag}-agent{s}");
    let subscriber_id = |s: usize, j: usize| format!("bench-{tag}-agent{s}-s{j}");
    let mut entities: Vec<(String, &str)> = Vec::new();
    for s in 0..params.streams {
        entities.push((agent_id(s), "agent"));
        entities.extend((0..params.subscribers).map(|j| (subscriber_id(s, j), "human")));
    }
    create_entities(api, &entities, deadline).await?;
    eprintln!("ai-stream: created {} entities", entities.len());

    let mut streams = Vec::with_capacity(params.streams);
    for s in 0..params.streams {
        let members: Vec<String> = (0..params.subscribers)
            .map(|j| subscriber_id(s, j))
            .collect();
        streams.push((format!("bench-{tag}-ai{s}"), agent_id(s), members));
    }
    let made = tokio::time::timeout_at(
        deadline,
        futures_util::stream::iter(streams.iter().map(|(name, agent, members)| async move {
            let agent_token = api::mint_token(&api.creds, agent, 3600)?;
            let channel_id = api
                .create_private_channel(&agent_token, name, members)
                .await?;
            let subscriber_tokens = members
                .iter()
                .map(|m| api::mint_token(&api.creds, m, 3600))
                .collect::<Result<Vec<_>, _>>()?;
            Ok::<_, String>(StreamSetup {
                agent_token: Some(agent_token),
                channel: channel_id,
                subscriber_tokens,
            })
        }))
        .buffered(SETUP_CONCURRENCY)
        .collect::<Vec<_>>(),
    )
    .await
    .map_err(|_| "ai-stream: timed out creating channels".to_string())?;
    let made = made.into_iter().collect::<Result<Vec<_>, _>>()?;
    eprintln!("ai-stream: created {} private group channels", made.len());
    Ok(made)
}

/// One public channel per stream, made by its first create (no entities, no tokens).
fn pusher_streams(params: &AiStreamParams) -> Vec<StreamSetup> {
    let tag = random_tag();
    (0..params.streams)
        .map(|s| StreamSetup {
            agent_token: None,
            channel: format!("bench-{tag}-ai{s}"),
            subscriber_tokens: Vec::new(),
        })
        .collect()
}

/// `--subscribers` V2 sockets per stream, each subscribed to its stream's channel before any
/// create; the serial `subscription_succeeded` gave is where its checks start.
async fn connect_pusher_subscribers(
    app_url: &str,
    params: &AiStreamParams,
    streams: &[StreamSetup],
    deadline: Instant,
) -> Result<Vec<Connected>, String> {
    let wanted = streams.iter().enumerate().flat_map(|(s, setup)| {
        (0..params.subscribers).map(move |j| (s, j, setup.channel.as_str()))
    });
    let connects = wanted.map(|(stream, subscriber, channel)| async move {
        let (ws, hello) =
            pusher::connect(app_url, None, crate::chat::CONNECT_WITHIN, Some(channel))
                .await
                .map_err(|e| format!("stream {stream} subscriber {subscriber}: {e}"))?;
        Ok(Connected {
            stream,
            subscriber,
            ws,
            cursor: String::new(),
            last_serial: hello.serial.unwrap_or(0),
        })
    });
    connect_all(connects, deadline).await
}

/// The subscribers' connects, [`SETUP_CONCURRENCY`] at a time, all within the deadline.
async fn connect_all(
    connects: impl Iterator<Item = impl std::future::Future<Output = Result<Connected, String>>>,
    deadline: Instant,
) -> Result<Vec<Connected>, String> {
    let connected = tokio::time::timeout_at(
        deadline,
        futures_util::stream::iter(connects)
            .buffer_unordered(SETUP_CONCURRENCY)
            .collect::<Vec<_>>(),
    )
    .await
    .map_err(|_| "ai-stream: timed out connecting subscribers".to_string())?;
    connected.into_iter().collect()
}

async fn create_entities(
    api: &Api,
    entities: &[(String, &str)],
    deadline: Instant,
) -> Result<(), String> {
    let created = tokio::time::timeout_at(
        deadline,
        futures_util::stream::iter(
            entities
                .iter()
                .map(|(id, kind)| api.create_entity(id, id, kind)),
        )
        .buffer_unordered(SETUP_CONCURRENCY)
        .collect::<Vec<_>>(),
    )
    .await
    .map_err(|_| "ai-stream: timed out creating entities".to_string())?;
    created.into_iter().collect()
}

/// One socket per subscriber, each ready (its `realtime.ready` read) before any append.
async fn connect_subscribers(
    ws_url: &str,
    streams: &[StreamSetup],
    deadline: Instant,
) -> Result<Vec<Connected>, String> {
    let wanted = streams.iter().enumerate().flat_map(|(s, setup)| {
        setup
            .subscriber_tokens
            .iter()
            .enumerate()
            .map(move |(j, token)| (s, j, token))
    });
    let connects = wanted.map(|(stream, subscriber, token)| async move {
        let (ws, cursor) = subscriber::connect(ws_url, token, None)
            .await
            .map_err(|e| format!("stream {stream} subscriber {subscriber}: {e}"))?;
        Ok(Connected {
            stream,
            subscriber,
            ws,
            cursor,
            last_serial: 0,
        })
    });
    connect_all(connects, deadline).await
}

fn spawn_receivers(
    params: &AiStreamParams,
    sockets: Vec<Connected>,
    streams: &[StreamSetup],
    ends: &[Arc<StreamEnd>],
    ws_url: &str,
    progress: &Arc<Progress>,
    deadline: Instant,
) -> Result<Vec<JoinHandle<ReceiverTally>>, String> {
    let mut handles = Vec::with_capacity(sockets.len());
    for c in sockets {
        let setup = &streams[c.stream];
        let task = ReceiverTask {
            face: params.face,
            ws: c.ws,
            cursor: c.cursor,
            last_serial: c.last_serial,
            ws_url: ws_url.to_string(),
            token: setup
                .subscriber_tokens
                .get(c.subscriber)
                .cloned()
                .unwrap_or_default(),
            channel: setup.channel.clone(),
            end: ends[c.stream].clone(),
            progress: progress.clone(),
            deadline,
            drain_idle: Duration::from_secs(params.drain_idle),
            tally: ReceiverTally::new(c.stream, c.subscriber, params.ticks_per_stream())?,
        };
        handles.push(tokio::spawn(task.run()));
    }
    Ok(handles)
}

/// One streamer per stream, each with its first message open, ready to start.
async fn prepare_streamers(
    params: &AiStreamParams,
    target: &Target,
    streams: &[StreamSetup],
    progress: &Arc<Progress>,
    deadline: Instant,
) -> Result<Vec<StreamerTask>, String> {
    let mut opening = Vec::with_capacity(streams.len());
    for setup in streams {
        let (http, route) = match &setup.agent_token {
            Some(token) => (
                Http1::new(
                    &target.base,
                    &[("Authorization", &format!("Bearer {token}"))],
                )?,
                Route::Chat {
                    messages_path: format!("/api/channels/{}/messages", setup.channel),
                },
            ),
            None => (
                Http1::new(&target.base, &[])?,
                Route::Pusher {
                    creds: target.creds.clone(),
                    channel: setup.channel.clone(),
                },
            ),
        };
        let task = StreamerTask {
            http,
            route,
            // Set when the run starts (`spawn_streamers`).
            schedule: Schedule {
                start: deadline,
                period: params.period(),
                ticks: params.ticks_per_stream(),
                stop_at: deadline,
            },
            max_in_flight: params.max_in_flight,
            fragments_per_message: params.appends_per_message - 1,
            minimal_answers: !params.full_answers,
            deadline,
            progress: progress.clone(),
            tally: StreamerTally::new(params.ticks_per_stream())?,
            first_message: None,
        };
        opening.push(tokio::spawn(task.open_first_message()));
    }
    join_all(opening, "streamer").await
}

/// Starts the streamers' schedules now, spread over one period rather than all at once.
fn spawn_streamers(
    params: &AiStreamParams,
    streamers: Vec<StreamerTask>,
    deadline: Instant,
) -> Vec<JoinHandle<StreamerTally>> {
    let first_tick = Instant::now();
    let period = params.period();
    let count = streamers.len();
    streamers
        .into_iter()
        .enumerate()
        .map(|(s, mut task)| {
            let start = first_tick + period.mul_f64(s as f64 / count as f64);
            task.schedule = Schedule {
                start,
                period,
                ticks: params.ticks_per_stream(),
                stop_at: (start + Duration::from_secs(params.duration) + Duration::from_secs(1))
                    .min(deadline),
            };
            tokio::spawn(task.run())
        })
        .collect()
}

async fn join_all<T>(handles: Vec<JoinHandle<T>>, what: &str) -> Result<Vec<T>, String> {
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.map_err(|e| format!("{what} task: {e}"))?);
    }
    Ok(out)
}

/// Prints acknowledged appends and deliveries once a second to stderr until told to stop.
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
        let deliveries = progress.deliveries.load(Ordering::Relaxed);
        let server = sample(pid).map(describe_proc).unwrap_or_default();
        eprintln!(
            "[{:>5.1}s] appends acked {acked}/{scheduled} (+{}/s, failed {failed})  deliveries {deliveries} (+{}/s){server}",
            start.elapsed().as_secs_f64(),
            acked - last.0,
            deliveries - last.1,
        );
        last = (acked, deliveries);
    }
}

fn describe_proc(s: ProcSample) -> String {
    format!(" server cpu {:.1}s rss {} MiB", s.cpu_secs, s.rss_kb / 1024)
}
