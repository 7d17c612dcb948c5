//! `switchboard-bench`: the load generator of Switchboard (issue 2, `make bench-quick`).
//!
//! `switchboard-bench quick` starts the server (or uses `--url` + `--app`), creates entities
//! through the signed server API, opens public channels, connects WebSocket subscribers to
//! `/api/realtime/ws`, posts messages from concurrent HTTP clients, and reports throughput,
//! post-to-receive latency, delivery correctness (exactly once, per-channel seq order) and
//! the server's CPU and memory; then it runs `ai-stream` with its defaults. Every phase is
//! bounded by `--timeout`.
//!
//! `switchboard-bench ai-stream` streams AI tokens: agents append fragments to their message
//! at a fixed rate while each stream's subscribers check every fragment arrives once, in
//! order (see `bench/ai_stream.rs`).
//!
//! `switchboard-bench idle` opens many idle `/api/realtime/ws` sockets, holds them, and
//! reports connect times, server RSS per socket and sockets kept (see `bench/idle.rs`).
//!
//! `switchboard-bench fanout` puts N subscribers on one public channel, spread over worker
//! processes (`switchboard-bench worker`, hidden), and publishes P messages/s to it: sustained
//! deliveries/s, latency, loss/duplicates/order, server CPU and RSS (see `bench/fanout.rs`).
//!
//! Both speak either face (`--face chat|pusher`, `--protocol 1|2`): the chat API or the
//! Pusher protocol on `/app/{key}` with signed `POST /apps/{id}/events` publishes, so they
//! also measure any other Pusher-compatible server (see `bench/pusher.rs`).
//!
//! `switchboard-bench chat` runs R private rooms × M members, one socket each, posting at a
//! total open-loop rate (see `bench/chat.rs`); `switchboard-bench reconnect` drops C clients,
//! posts E events, and reconnects them all at once with their cursor (see `bench/reconnect.rs`).

#[path = "bench/ai_stream.rs"]
mod ai_stream;
#[path = "bench/api.rs"]
mod api;
#[path = "bench/chat.rs"]
mod chat;
#[path = "bench/cluster.rs"]
mod cluster;
#[path = "bench/fanout.rs"]
mod fanout;
#[path = "bench/floor.rs"]
mod floor;
#[path = "bench/http1.rs"]
mod http1;
#[path = "bench/idle.rs"]
mod idle;
#[path = "bench/plot.rs"]
mod plot;
#[path = "bench/poster.rs"]
mod poster;
#[path = "bench/probe.rs"]
mod probe;
#[path = "bench/pusher.rs"]
mod pusher;
#[path = "bench/rawws.rs"]
mod rawws;
#[path = "bench/reconnect.rs"]
mod reconnect;
#[path = "bench/report.rs"]
mod report;
#[path = "bench/rxstamp.rs"]
mod rxstamp;
#[path = "bench/scan.rs"]
mod scan;
#[path = "bench/server.rs"]
mod server;
#[path = "bench/subscriber.rs"]
mod subscriber;
#[path = "bench/summary.rs"]
mod summary;
#[path = "bench/workers.rs"]
mod workers;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use futures_util::StreamExt as _;
use hdrhistogram::Histogram;
use serde_json::Value;
use tokio::time::Instant;

use crate::ai_stream::{AiStreamArgs, AiStreamParams};
use crate::api::Api;
use crate::idle::IdleArgs;
use crate::poster::{PostResult, PostShared, PosterTask};
use crate::report::{Correctness, Report, Window};
use crate::server::{AppCreds, ProcSample, ServerProc};
use crate::subscriber::{SubResult, SubShared, SubTask};

/// The clock every timestamp of a run is read from: posters stamp with it, subscribers
/// subtract from it (same process, monotonic).
static T0: OnceLock<std::time::Instant> = OnceLock::new();

pub fn now_ns() -> u64 {
    T0.get_or_init(std::time::Instant::now).elapsed().as_nanos() as u64
}

#[derive(Parser)]
#[command(
    name = "switchboard-bench",
    about = "Load generator for Switchboard: HTTP posters, WebSocket subscribers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// 20k messages from 50 HTTP clients over 10 public channels, 100 WebSocket subscribers;
    /// then `ai-stream` with its defaults.
    Quick(QuickArgs),
    /// AI token streams: agents append fragments at a fixed rate, subscribers check them.
    AiStream(AiStreamArgs),
    /// Many idle WebSocket connections: connect time, server RSS per socket, CPU while idle,
    /// sockets still open after the hold (`--face chat|pusher`).
    #[command(after_help = idle::HELP)]
    Idle(IdleArgs),
    /// N subscribers on one public channel, P publishes/s: sustained deliveries/s, latency,
    /// loss, server CPU and RSS per socket; sockets spread over worker processes
    /// (`--face chat|pusher`).
    #[command(after_help = fanout::HELP)]
    Fanout(fanout::FanoutArgs),
    /// A worker process of `fanout` (started by the bench itself; job on stdin).
    #[command(hide = true)]
    Worker(workers::WorkerArgs),
    /// R rooms × M members posting at a total rate: post-to-receive latency, loss, order.
    Chat(chat::ChatArgs),
    /// C clients drop and reconnect with their cursor, each catching up E events.
    Reconnect(reconnect::ReconnectArgs),
    /// The machine's floors, without Switchboard: one loopback TCP write, one fdatasync.
    Probe(probe::ProbeArgs),
    /// fanout's shape with no server and no protocol: one write per delivery from bare
    /// threads, read by bare epoll loops; the machine's floor under fanout's latency.
    Floor(floor::FloorArgs),
    /// A reader process of `floor` (started by the bench itself).
    #[command(hide = true)]
    FloorReader(floor::FloorReaderArgs),
    /// The targets of a merged `make bench` results file, met or missed, in one table.
    Summary(summary::SummaryArgs),
}

/// Which server to load and where the results go (shared by every run).
#[derive(Args, Clone, Debug)]
pub struct TargetArgs {
    /// Use a running server (http://host:port, loopback) instead of starting one. Repeat it
    /// or separate with commas for the nodes of one cluster (`idle`, `fanout`): sockets go
    /// round-robin over them, `fanout` publishes to the first.
    #[arg(long, requires = "app", value_delimiter = ',')]
    pub url: Vec<String>,
    /// Credentials of the workspace on `--url`: id:key:secret.
    #[arg(long)]
    pub app: Option<String>,
    /// Pid of the `--url` server, to read its CPU time and memory; one per `--url`, in the
    /// same order (repeat or separate with commas).
    #[arg(long, requires = "url", value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// Start this many server nodes (`idle`, `fanout`): cluster mode, one shared database
    /// (`--database`, default a fresh SQLite file) and one Redis (`--broker`, default a
    /// redis-server the bench starts on a free loopback port).
    #[arg(long, default_value_t = 1, conflicts_with = "url")]
    pub cluster: usize,
    /// Broker of the started nodes: redis://127.0.0.1:PORT (loopback). Default: `local` for
    /// one node, a redis-server of the bench's own for `--cluster` 2+. With `--url`: only
    /// recorded in the results.
    #[arg(long)]
    pub broker: Option<String>,
    /// Database of the started nodes, shared by all of them: sqlite://PATH or
    /// postgres://… on loopback (default: a fresh SQLite file in a temporary directory).
    /// With `--url`: only recorded in the results.
    #[arg(long)]
    pub database: Option<String>,
    /// redis-server binary for `--cluster` without `--broker` (default: on PATH).
    #[arg(long, env = "REDIS_SERVER_BIN")]
    pub redis_bin: Option<PathBuf>,
    /// Server binary to start (default: next to this binary, else target/release/switchboard).
    #[arg(long, env = "SWITCHBOARD_BIN")]
    pub server_bin: Option<PathBuf>,
    /// Directory for the JSON results.
    #[arg(long, default_value = "bench/results")]
    pub results_dir: PathBuf,
    /// Client worker threads (the server shares the machine).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
}

impl TargetArgs {
    /// How many nodes the target has.
    pub fn node_count(&self) -> usize {
        if self.url.is_empty() {
            self.cluster
        } else {
            self.url.len()
        }
    }

    fn validate(&self) -> Result<(), String> {
        if self.url.is_empty() && self.app.is_some() {
            return Err("--app needs --url".into());
        }
        if !(1..=cluster::MAX_NODES).contains(&self.cluster) {
            return Err(format!("--cluster must be 1..={}", cluster::MAX_NODES));
        }
        if !self.server_pid.is_empty() && self.server_pid.len() != self.url.len() {
            return Err(format!(
                "--server-pid: give one per --url, in the same order ({} pids for {} urls)",
                self.server_pid.len(),
                self.url.len()
            ));
        }
        if let Some(b) = &self.broker {
            if b != "local" && !b.starts_with("redis://") {
                return Err(format!(
                    "--broker must be local or redis://host:port, got {b}"
                ));
            }
            cluster::check_loopback_url("--broker", b)?;
            if b == "local" && self.cluster > 1 {
                return Err("--cluster 2+ needs a Redis broker, not --broker local".into());
            }
        }
        if let Some(d) = &self.database {
            cluster::check_loopback_url("--database", d)?;
        }
        Ok(())
    }

    /// Scenarios other than `idle` and `fanout` load one node.
    fn single_node(&self, scenario: &str) -> Result<(), String> {
        if self.node_count() > 1 {
            return Err(format!(
                "{scenario} loads one node: --cluster and several --url apply to idle and fanout"
            ));
        }
        Ok(())
    }
}

#[derive(Args, Clone, Debug)]
pub struct QuickArgs {
    /// Messages to post in total.
    #[arg(long, default_value_t = 20_000)]
    pub messages: usize,
    /// Concurrent HTTP posters (one request in flight each).
    #[arg(long, default_value_t = 50)]
    pub posters: usize,
    /// WebSocket subscribers of /api/realtime/ws.
    #[arg(long, default_value_t = 100)]
    pub subscribers: usize,
    /// Public group channels posted to round-robin.
    #[arg(long, default_value_t = 10)]
    pub channels: usize,
    /// Overall bound in seconds; on expiry the run stops and reports what it has.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// After posting ends, a subscriber stops after this many seconds without a frame.
    #[arg(long, default_value_t = 10)]
    pub drain_idle: u64,
    /// Run only the post scenario, not the `ai-stream` run after it.
    #[arg(long)]
    pub skip_ai_stream: bool,
    /// Write an SVG of the post scenario's post-to-receive latency percentiles per second
    /// here (and add a `timeline` to the JSON).
    #[arg(long, value_name = "PATH.svg")]
    pub plot: Option<PathBuf>,
    #[command(flatten)]
    pub target: TargetArgs,
}

/// Who posts what where: poster `p` sends `count_of(p)` messages, its `n`-th to channel
/// `(p + n) % channels`; each message has a slot `p * stride + n`.
pub struct Plan {
    pub posters: usize,
    pub channels: usize,
    pub stride: usize,
    pub slots: usize,
    base: usize,
    rem: usize,
}

impl Plan {
    fn new(messages: usize, posters: usize, channels: usize) -> Self {
        let base = messages / posters;
        let rem = messages % posters;
        let stride = base + usize::from(rem > 0);
        Self {
            posters,
            channels,
            stride,
            slots: stride * posters,
            base,
            rem,
        }
    }
    pub fn count_of(&self, p: usize) -> usize {
        self.base + usize::from(p < self.rem)
    }
    pub fn slot(&self, p: usize, n: usize) -> Option<usize> {
        (p < self.posters && n < self.count_of(p)).then(|| p * self.stride + n)
    }
    pub fn channel_of(&self, p: usize, n: usize) -> usize {
        (p + n) % self.channels
    }
}

fn main() -> ExitCode {
    let _ = now_ns();
    let cli = Cli::parse();
    let threads = match &cli.command {
        Command::Quick(a) => a.target.threads,
        Command::AiStream(a) => a.target.threads,
        Command::Idle(a) => a.target.threads,
        Command::Fanout(a) => a.target.threads,
        Command::Worker(a) => a.threads,
        Command::Chat(a) => a.target.threads,
        Command::Reconnect(a) => a.target.threads,
        Command::Probe(_) | Command::Summary(_) | Command::Floor(_) | Command::FloorReader(_) => 1,
    };
    let single = match &cli.command {
        Command::Quick(a) => a.target.single_node("quick"),
        Command::AiStream(a) => a.target.single_node("ai-stream"),
        Command::Chat(a) => a.target.single_node("chat"),
        Command::Reconnect(a) => a.target.single_node("reconnect"),
        _ => Ok(()),
    };
    if let Err(e) = single {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: tokio runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let outcome = runtime.block_on(async move {
        match cli.command {
            Command::Quick(args) => quick(args).await,
            Command::AiStream(args) => ai_stream_only(args).await,
            Command::Idle(args) => idle_only(args).await,
            Command::Fanout(args) => fanout::main(args).await,
            Command::Worker(args) => workers::worker_main(args).await,
            Command::Chat(args) => chat::chat_only(args).await,
            Command::Reconnect(args) => reconnect::reconnect_only(args).await,
            // Synchronous and short: it measures the kernel, not the runtime.
            Command::Probe(args) => probe::main(&args).map(|()| true),
            Command::Summary(args) => summary::main(&args),
            // Threads and processes of its own, blocking: nothing of the runtime is measured.
            Command::Floor(args) => floor::main(&args),
            Command::FloorReader(args) => floor::reader_main(&args),
        }
    });
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("\nswitchboard-bench: FAILED: {e}");
            ExitCode::from(2)
        }
    }
}

fn random_tag() -> String {
    use rand::Rng as _;
    rand::thread_rng()
        .sample_iter(&rand::distributions::Alphanumeric)
        .take(6)
        .map(char::from)
        .collect::<String>()
        .to_lowercase()
}

fn sample(pid: Option<u32>) -> Option<ProcSample> {
    pid.and_then(|p| server::sample_proc(&p.to_string()))
}

/// The server under test: nodes this bench started (`--cluster N`, one by default), or
/// `--url` (one or several nodes).
pub struct Target {
    /// Node 0 when this bench started it.
    pub child: Option<ServerProc>,
    /// Node 0: where set-up requests and `fanout`'s publishes go.
    pub base: String,
    pub creds: AppCreds,
    /// Node 0's pid (started, else `--server-pid`): whose CPU and memory are read by the
    /// scenarios that load one node.
    pub server_pid: Option<u32>,
    /// Every node, node 0 first.
    pub nodes: Vec<cluster::Node>,
    /// Nodes 1.. when this bench started them.
    others: Vec<ServerProc>,
    /// `local`, the broker URL, or what `--broker` said of a `--url` cluster.
    pub broker: String,
    pub broker_started_here: bool,
    /// The database URL (password redacted), or `unknown` for `--url` without `--database`.
    pub database: String,
    redis: Option<cluster::RedisProc>,
    /// Holds the shared SQLite file of started nodes; removed on drop.
    _shared_dir: Option<tempfile::TempDir>,
}

impl Target {
    /// Starts a server (or checks `--url` is loopback) and waits until it is ready.
    async fn open(args: &TargetArgs) -> Result<Self, String> {
        Self::open_face(args, pusher::Face::Chat).await
    }

    /// [`Target::open`]; for the Pusher face a `--url` server need not have `/readyz`
    /// (another Pusher-compatible server): any HTTP answer means it is up.
    pub async fn open_face(args: &TargetArgs, face: pusher::Face) -> Result<Self, String> {
        args.validate()?;
        if let (false, Some(app)) = (args.url.is_empty(), &args.app) {
            let bases: Vec<String> = args
                .url
                .iter()
                .map(|u| u.trim_end_matches('/').to_string())
                .collect();
            for b in &bases {
                check_loopback(b)?;
            }
            let nodes: Vec<cluster::Node> = bases
                .iter()
                .enumerate()
                .map(|(k, b)| cluster::Node {
                    base: b.clone(),
                    pid: args.server_pid.get(k).copied(),
                })
                .collect();
            let mut target = Self {
                child: None,
                base: bases[0].clone(),
                creds: AppCreds::parse(app)?,
                server_pid: nodes[0].pid,
                nodes,
                others: Vec::new(),
                broker: args
                    .broker
                    .clone()
                    .unwrap_or_else(|| if bases.len() > 1 { "unknown" } else { "local" }.into()),
                broker_started_here: false,
                database: args
                    .database
                    .as_deref()
                    .map_or_else(|| "unknown".into(), cluster::redact),
                redis: None,
                _shared_dir: None,
            };
            let any_answer = face == pusher::Face::Pusher;
            for k in 0..target.nodes.len() {
                if let Err(e) = target
                    .wait_ready(k, any_answer, target.nodes.len() > 1)
                    .await
                {
                    target.stop(true);
                    return Err(e);
                }
            }
            return Ok(target);
        }
        Self::start_nodes(args).await
    }

    /// Starts `--cluster` nodes one after the other (the first creates and migrates the
    /// database), each ready before the next starts. On failure everything started so far
    /// is stopped (by its own pid) when the partial target drops.
    async fn start_nodes(args: &TargetArgs) -> Result<Self, String> {
        let n = args.cluster;
        let creds = AppCreds::random();
        let bin = server::locate_binary(args.server_bin.as_deref());
        let mut redis = None;
        let broker = match (&args.broker, n) {
            (Some(b), _) => Some(b.clone()),
            (None, 1) => None,
            (None, _) => {
                let r = cluster::RedisProc::start(args.redis_bin.as_deref())?;
                eprintln!("started redis-server (pid {}) on {}", r.pid, r.url());
                let url = r.url();
                redis = Some(r);
                Some(url)
            }
        };
        // One node keeps its own SQLite file unless --database says otherwise; several share one.
        let (shared_dir, database) = match (&args.database, n) {
            (Some(d), _) => (None, Some(d.clone())),
            (None, 1) => (None, None),
            (None, _) => {
                let dir = tempfile::Builder::new()
                    .prefix("switchboard-bench-cluster-")
                    .tempdir()
                    .map_err(|e| format!("tempdir: {e}"))?;
                let url = format!("sqlite://{}", dir.path().join("cluster.db").display());
                (Some(dir), Some(url))
            }
        };
        let mut target = Self {
            child: None,
            base: String::new(),
            creds,
            server_pid: None,
            nodes: Vec::with_capacity(n),
            others: Vec::new(),
            broker: broker.clone().unwrap_or_else(|| "local".into()),
            broker_started_here: redis.is_some(),
            database: String::new(),
            redis,
            _shared_dir: shared_dir,
        };
        for k in 0..n {
            let (proc_, base) = ServerProc::spawn_node(
                &bin,
                &target.creds,
                database.as_deref(),
                broker.as_deref(),
            )?;
            eprintln!(
                "started node {k}: {} (pid {}) on {base}, database {}, broker {}",
                bin.display(),
                proc_.pid,
                proc_.database,
                target.broker
            );
            target.database = proc_.database.clone();
            target.nodes.push(cluster::Node {
                base: base.clone(),
                pid: Some(proc_.pid),
            });
            if k == 0 {
                target.base = base;
                target.server_pid = Some(proc_.pid);
                target.child = Some(proc_);
            } else {
                target.others.push(proc_);
            }
            if let Err(e) = target.wait_ready(k, false, n > 1).await {
                target.stop(true);
                return Err(e);
            }
        }
        Ok(target)
    }

    /// The started node `k`, if this bench started it.
    fn node_proc(&mut self, k: usize) -> Option<&mut ServerProc> {
        if k == 0 {
            self.child.as_mut()
        } else {
            self.others.get_mut(k - 1)
        }
    }

    async fn wait_ready(&mut self, k: usize, any_answer: bool, many: bool) -> Result<(), String> {
        let api = Api {
            client: api::http_client(4)?,
            base: self.nodes[k].base.clone(),
            creds: self.creds.clone(),
        };
        let mut child = self.node_proc(k);
        let ready_in = api
            .wait_ready(Duration::from_secs(20), any_answer, || match child {
                Some(ref mut c) => match c.exited() {
                    Some(status) => Err(format!(
                        "server node {k} exited during start-up ({status}):\n{}",
                        c.log_tail(30)
                    )),
                    None => Ok(()),
                },
                None => Ok(()),
            })
            .await?;
        if many {
            eprintln!("node {k} ready after {:.2}s", ready_in.as_secs_f64());
        } else {
            eprintln!("server ready after {:.2}s", ready_in.as_secs_f64());
        }
        Ok(())
    }

    /// Stops the nodes this bench started (each by its own pid), then its Redis; `failed`
    /// prints their log tails.
    fn stop(&mut self, failed: bool) {
        let n = self.nodes.len();
        for k in 0..n {
            if let Some(c) = self.node_proc(k) {
                if failed {
                    eprintln!("server node {k} log (tail):\n{}", c.log_tail(30));
                }
                c.stop(Duration::from_secs(5));
                eprintln!("stopped server pid {}", c.pid);
            }
        }
        if let Some(r) = self.redis.as_mut() {
            r.stop();
            eprintln!("stopped redis-server pid {}", r.pid);
        }
    }

    /// WARN/ERROR lines the started nodes logged so far, and a few of them.
    pub fn log_problems(&self) -> (u64, Vec<String>) {
        let mut total = 0;
        let mut sample = Vec::new();
        let many = !self.others.is_empty();
        for (k, c) in self.child.iter().chain(self.others.iter()).enumerate() {
            let (n, lines) = c.log_problems(5);
            total += n;
            for l in lines {
                if sample.len() < 5 {
                    sample.push(if many { format!("node {k}: {l}") } else { l });
                }
            }
        }
        (total, sample)
    }

    /// Every node's CPU and memory, in node order.
    pub fn sample_nodes(&self) -> Vec<Option<ProcSample>> {
        cluster::sample_nodes(&self.nodes)
    }

    /// Prometheus counters summed over the nodes (each node counts its own sockets).
    pub async fn metrics(&self, client: &reqwest::Client) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for n in &self.nodes {
            let api = Api {
                client: client.clone(),
                base: n.base.clone(),
                creds: self.creds.clone(),
            };
            for (k, v) in api.metrics().await {
                *out.entry(k).or_insert(0.0) += v;
            }
        }
        out
    }

    /// The `cluster` section of the results JSON.
    pub fn cluster_json(&self) -> Value {
        serde_json::json!({
            "nodes": self.nodes.len(),
            "started_here": self.child.is_some(),
            "broker": cluster::redact(&self.broker),
            "broker_kind": if self.broker == "local" { "local" } else if self.broker.starts_with("redis://") { "redis" } else { "unknown" },
            "broker_started_here": self.broker_started_here,
            "database": self.database,
            "database_kind": cluster::database_kind(
                (self.database != "unknown").then_some(self.database.as_str())
            ),
        })
    }

    /// One line for the report tables.
    pub fn cluster_label(&self) -> String {
        format!(
            "{} node{} ({}), broker {}, database {}",
            self.nodes.len(),
            if self.nodes.len() == 1 { "" } else { "s" },
            if self.child.is_some() {
                "started by the bench"
            } else {
                "--url"
            },
            cluster::redact(&self.broker),
            self.database
        )
    }
}

/// Runs the quick scenario, then `ai-stream` with its defaults, on one server; writes both
/// into one results file. `Ok(true)` when every check passed.
async fn quick(args: QuickArgs) -> Result<bool, String> {
    if args.posters == 0 || args.channels == 0 || args.messages == 0 {
        return Err("--messages, --posters and --channels must be at least 1".into());
    }
    if args.posters < 2 && args.subscribers == 0 {
        return Err("a group channel needs two members: use 2+ posters or 1+ subscribers".into());
    }
    let mut target = Target::open(&args.target).await?;
    let outcome = quick_then_ai_stream(&args, &target).await;
    target.stop(outcome.is_err());
    outcome
}

async fn quick_then_ai_stream(args: &QuickArgs, target: &Target) -> Result<bool, String> {
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let report = run_scenario(args, target, deadline).await?;
    report.print();
    if let (Some(path), Some(points)) = (&args.plot, &report.timeline) {
        let subtitle = format!(
            "{} messages from {} HTTP posters over {} channels, {} subscribers",
            args.messages, args.posters, args.channels, args.subscribers
        );
        plot::write_svg(
            path,
            "switchboard-bench quick: post-to-receive latency per second",
            &subtitle,
            points,
        )?;
    }
    let mut results = report.to_json();
    let mut passed = report.passed();
    if !args.skip_ai_stream {
        let section = match ai_stream::run(&AiStreamParams::default(), target).await {
            Ok(ai) => {
                ai.print();
                (ai.failures(), ai.to_json())
            }
            // The post scenario's figures are still written.
            Err(e) => {
                eprintln!("\nswitchboard-bench: ai-stream FAILED: {e}");
                let failure = format!("did not run to the end: {e}");
                (vec![failure], serde_json::json!({"error": e}))
            }
        };
        passed &= section.0.is_empty();
        merge_ai_stream(&mut results, section);
    }
    let path = report::write_results(&args.target.results_dir, "quick", &results)?;
    println!("results written to {}", path.display());
    Ok(passed)
}

/// Adds the `ai_stream` section (its failures, its JSON) to the quick results; the top-level
/// verdict and failures cover both.
fn merge_ai_stream(results: &mut serde_json::Value, (failures, section): (Vec<String>, Value)) {
    let Some(obj) = results.as_object_mut() else {
        return;
    };
    let quick_passed = obj.get("passed").and_then(Value::as_bool).unwrap_or(false);
    obj.insert(
        "passed".into(),
        (quick_passed && failures.is_empty()).into(),
    );
    if let Some(Value::Array(all)) = obj.get_mut("failures") {
        all.extend(
            failures
                .into_iter()
                .map(|f| format!("ai-stream: {f}").into()),
        );
    }
    obj.insert("ai_stream".into(), section);
}

/// `switchboard-bench ai-stream`: one run, its own results file.
async fn ai_stream_only(args: AiStreamArgs) -> Result<bool, String> {
    args.params.validate()?;
    let mut target = Target::open_face(&args.target, args.params.face).await?;
    let outcome = ai_stream::run(&args.params, &target).await;
    target.stop(outcome.is_err());
    let ai = outcome?;
    ai.print();
    let stem = match args.params.face {
        pusher::Face::Chat => "ai-stream",
        // Its own key in `make bench`'s merged file (named by the part before the first '-').
        pusher::Face::Pusher => "ai_stream_pusher",
    };
    let path = report::write_results(&args.target.results_dir, stem, &ai.to_json())?;
    println!("results written to {}", path.display());
    Ok(ai.passed())
}

/// `switchboard-bench idle`: one run, its own results file.
async fn idle_only(args: IdleArgs) -> Result<bool, String> {
    idle::preflight(&args)?;
    let mut target = Target::open_face(&args.target, args.face.face).await?;
    let outcome = idle::run(&args, &target).await;
    target.stop(outcome.is_err());
    let report = outcome?;
    report.print();
    let stem = match args.face.face {
        pusher::Face::Chat => "idle",
        pusher::Face::Pusher => "idle-pusher",
    };
    let path = report::write_results(&args.target.results_dir, stem, &report.to_json())?;
    println!("results written to {}", path.display());
    Ok(report.passed())
}

fn check_loopback(base: &str) -> Result<(), String> {
    let authority = base
        .strip_prefix("http://")
        .ok_or("--url must be http://host:port")?
        .split('/')
        .next()
        .unwrap_or("");
    let host = match authority.rfind(':') {
        Some(i) if !authority.ends_with(']') => &authority[..i],
        _ => authority,
    };
    if matches!(host, "127.0.0.1" | "localhost" | "[::1]" | "") || host.starts_with("127.") {
        Ok(())
    } else {
        Err(format!(
            "--url must be a loopback address (this bench runs on one host), got {host}"
        ))
    }
}

/// The post scenario on a ready server.
async fn run_scenario(
    args: &QuickArgs,
    target: &Target,
    deadline: Instant,
) -> Result<Report, String> {
    let plan = Arc::new(Plan::new(args.messages, args.posters, args.channels));
    let client = api::http_client(args.posters + 16)?;
    let (base, creds, server_pid) = (target.base.clone(), target.creds.clone(), target.server_pid);
    let api = Api {
        client: client.clone(),
        base: base.clone(),
        creds: creds.clone(),
    };
    let setup_started = Instant::now();

    // 2. Entities and tokens.
    let tag = random_tag();
    let poster_ids: Vec<String> = (0..args.posters)
        .map(|i| format!("bench-{tag}-p{i}"))
        .collect();
    let sub_ids: Vec<String> = (0..args.subscribers)
        .map(|i| format!("bench-{tag}-s{i}"))
        .collect();
    let all_ids: Vec<String> = poster_ids.iter().chain(sub_ids.iter()).cloned().collect();
    let created = tokio::time::timeout_at(
        deadline,
        futures_util::stream::iter(all_ids.iter().map(|id| {
            let api = &api;
            async move { api.create_entity(id, id, "human").await }
        }))
        .buffer_unordered(16)
        .collect::<Vec<_>>(),
    )
    .await
    .map_err(|_| "timed out creating entities".to_string())?;
    for r in created {
        r?;
    }
    let poster_tokens = poster_ids
        .iter()
        .map(|id| api::mint_token(&creds, id, 3600))
        .collect::<Result<Vec<_>, _>>()?;
    let sub_tokens = sub_ids
        .iter()
        .map(|id| api::mint_token(&creds, id, 3600))
        .collect::<Result<Vec<_>, _>>()?;
    eprintln!(
        "created {} entities ({} posters, {} subscribers)",
        all_ids.len(),
        poster_ids.len(),
        sub_ids.len()
    );

    // 3. Channels: public, open; every poster is a member.
    let channel_specs: Vec<(usize, String, Vec<String>)> = (0..args.channels)
        .map(|c| {
            let creator = c % args.posters;
            let mut members: Vec<String> = poster_ids
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != creator)
                .map(|(_, id)| id.clone())
                .collect();
            if members.is_empty() {
                members.extend(sub_ids.first().cloned());
            }
            (creator, format!("bench-{tag}-{c}"), members)
        })
        .collect();
    let made = tokio::time::timeout_at(
        deadline,
        futures_util::stream::iter(channel_specs.iter().map(|(creator, name, members)| {
            let api = &api;
            let token = &poster_tokens[*creator];
            async move { api.create_channel(token, name, members).await }
        }))
        .buffered(4)
        .collect::<Vec<_>>(),
    )
    .await
    .map_err(|_| "timed out creating channels".to_string())?;
    let channels: Vec<String> = made.into_iter().collect::<Result<_, _>>()?;
    let channels = Arc::new(channels);
    let channel_index: Arc<HashMap<String, usize>> = Arc::new(
        channels
            .iter()
            .enumerate()
            .map(|(i, c)| (c.clone(), i))
            .collect(),
    );
    eprintln!("created {} public channels", channels.len());

    // 4. Subscribers: all connected and ready before the first post.
    let ws_url = base.replacen("http://", "ws://", 1);
    let connect_started = Instant::now();
    let connected = tokio::time::timeout_at(
        deadline,
        futures_util::stream::iter(sub_tokens.iter().enumerate().map(|(i, token)| {
            let ws_url = &ws_url;
            async move { (i, subscriber::connect(ws_url, token, None).await) }
        }))
        .buffer_unordered(16)
        .collect::<Vec<_>>(),
    )
    .await
    .map_err(|_| "timed out connecting subscribers".to_string())?;
    let mut sockets = Vec::with_capacity(connected.len());
    for (i, r) in connected {
        let (ws, cursor) = r.map_err(|e| format!("subscriber {i}: {e}"))?;
        sockets.push((i, ws, cursor));
    }
    sockets.sort_by_key(|(i, _, _)| *i);
    let connect_secs = connect_started.elapsed().as_secs_f64();
    eprintln!(
        "{} subscribers ready in {connect_secs:.2}s; setup took {:.2}s",
        sockets.len(),
        setup_started.elapsed().as_secs_f64()
    );

    let sub_shared = Arc::new(SubShared {
        delivered: AtomicU64::new(0),
        acked_final: AtomicU64::new(u64::MAX),
        abort: AtomicBool::new(false),
    });
    let post_shared = Arc::new(PostShared {
        acked: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        abort: AtomicBool::new(false),
    });
    let timeline = plot::Recorder::new(args.plot.is_some(), now_ns());
    let mut sub_handles = Vec::with_capacity(sockets.len());
    for (i, ws, cursor) in sockets {
        let task = SubTask {
            ws,
            cursor,
            ws_url: ws_url.clone(),
            token: sub_tokens[i].clone(),
            plan: plan.clone(),
            channel_index: channel_index.clone(),
            shared: sub_shared.clone(),
            deadline,
            drain_idle: Duration::from_secs(args.drain_idle),
            result: SubResult {
                timeline: timeline.clone(),
                ..SubResult::new(plan.slots)?
            },
        };
        sub_handles.push(tokio::spawn(task.run()));
    }

    // 5. Before figures, then post.
    let metrics_before = api.metrics().await;
    let server_before = sample(server_pid);
    let client_before = server::sample_proc("self");
    let post_start_ns = now_ns();
    timeline.set_origin(post_start_ns);
    let mut post_handles = Vec::with_capacity(args.posters);
    for (p, token) in poster_tokens.iter().enumerate() {
        let task = PosterTask {
            index: p,
            client: client.clone(),
            base: base.clone(),
            auth: api::bearer(token)?,
            channels: channels.clone(),
            plan: plan.clone(),
            run_tag: tag.clone(),
            shared: post_shared.clone(),
            deadline,
            rtt: Histogram::new_with_bounds(1, 600_000_000, 3)
                .map_err(|e| format!("histogram: {e}"))?,
        };
        post_handles.push(tokio::spawn(task.run()));
    }
    let progress_stop = Arc::new(AtomicBool::new(false));
    let progress = tokio::spawn(progress_line(
        post_shared.clone(),
        sub_shared.clone(),
        progress_stop.clone(),
        args.messages as u64,
        args.subscribers as u64,
        target.child.as_ref().map(|c| c.pid),
    ));

    let mut posts: Vec<PostResult> = Vec::with_capacity(post_handles.len());
    for h in post_handles {
        posts.push(h.await.map_err(|e| format!("poster task: {e}"))?);
    }
    let post_end_ns = posts
        .iter()
        .map(|p| p.done_ns)
        .max()
        .unwrap_or(post_start_ns);
    let acked_total: u64 = posts
        .iter()
        .map(|p| p.acked.iter().filter(|a| **a).count() as u64)
        .sum();
    sub_shared.acked_final.store(acked_total, Ordering::Relaxed);
    let server_after_posting = sample(server_pid);

    // 6. Drain: subscribers stop when they have everything, go idle, or the deadline passes.
    let mut subs: Vec<SubResult> = Vec::with_capacity(sub_handles.len());
    for h in sub_handles {
        subs.push(h.await.map_err(|e| format!("subscriber task: {e}"))?);
    }
    let end_ns = now_ns();
    let timed_out = Instant::now() >= deadline;
    progress_stop.store(true, Ordering::Relaxed);
    let _ = progress.await;
    let server_after = sample(server_pid);
    let client_after = server::sample_proc("self");
    let metrics_after = api.metrics().await;

    // 7. Figures.
    let mut correctness = Correctness::default();
    let mut latency =
        Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).map_err(|e| e.to_string())?;
    let mut rtt =
        Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).map_err(|e| e.to_string())?;
    let mut acked_slots = vec![false; plan.slots];
    for (p, post) in posts.iter().enumerate() {
        for (n, a) in post.acked.iter().enumerate() {
            if let (true, Some(s)) = (*a, plan.slot(p, n)) {
                acked_slots[s] = true;
            }
        }
        rtt.add(&post.rtt)
            .map_err(|e| format!("merge histogram: {e}"))?;
        correctness.add_post(post);
    }
    let mut last_delivery_ns = post_start_ns;
    let mut first_delivery_ns = u64::MAX;
    for s in &subs {
        latency
            .add(&s.hist)
            .map_err(|e| format!("merge histogram: {e}"))?;
        correctness.add_sub(s, &acked_slots);
        if s.message_frames > 0 {
            last_delivery_ns = last_delivery_ns.max(s.last_delivery_ns);
            first_delivery_ns = first_delivery_ns.min(s.first_delivery_ns);
        }
    }
    correctness.timed_out = timed_out;
    correctness.expected_deliveries = acked_total * subs.len() as u64;
    let (log_lines, log_sample) = target.log_problems();
    let report = Report {
        args: args.clone(),
        base,
        server_pid,
        server_started_here: target.child.is_some(),
        acked: acked_total,
        post_window: Window::new(post_start_ns, post_end_ns),
        delivery_window: Window::new(post_start_ns, last_delivery_ns),
        first_delivery_after_ms: if first_delivery_ns == u64::MAX {
            None
        } else {
            Some(first_delivery_ns.saturating_sub(post_start_ns) as f64 / 1e6)
        },
        run_window: Window::new(post_start_ns, end_ns),
        connect_secs,
        latency,
        rtt,
        correctness,
        server_before,
        server_after_posting,
        server_after,
        client_before,
        client_after,
        metrics_before,
        metrics_after,
        server_log_problems: log_lines,
        server_log_sample: log_sample,
        timeline: timeline.snapshot().map(|t| t.points(post_start_ns)),
    };
    Ok(report)
}

/// Prints posted/delivered once a second to stderr until told to stop.
async fn progress_line(
    posts: Arc<PostShared>,
    subs: Arc<SubShared>,
    stop: Arc<AtomicBool>,
    messages: u64,
    subscribers: u64,
    pid: Option<u32>,
) {
    let start = Instant::now();
    let mut last = (0u64, 0u64);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let acked = posts.acked.load(Ordering::Relaxed);
        let failed = posts.failed.load(Ordering::Relaxed);
        let delivered = subs.delivered.load(Ordering::Relaxed);
        let cpu = sample(pid)
            .map(|s| format!(" server cpu {:.1}s rss {} MiB", s.cpu_secs, s.rss_kb / 1024))
            .unwrap_or_default();
        eprintln!(
            "[{:>5.1}s] posted {acked}/{messages} (+{}/s, failed {failed})  delivered {delivered}/{} (+{}/s){cpu}",
            start.elapsed().as_secs_f64(),
            acked - last.0,
            messages * subscribers,
            delivered - last.1,
        );
        last = (acked, delivered);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(argv: &[&str]) -> Result<TargetArgs, String> {
        #[derive(Parser)]
        struct W {
            #[command(flatten)]
            t: TargetArgs,
        }
        let mut all = vec!["bench"];
        all.extend_from_slice(argv);
        W::try_parse_from(all)
            .map(|w| w.t)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn several_urls_make_a_cluster_target() {
        let t = target(&[
            "--url",
            "http://127.0.0.1:1,http://127.0.0.1:2",
            "--url",
            "http://127.0.0.1:3",
            "--app",
            "1:k:s",
            "--server-pid",
            "11,12,13",
        ])
        .expect("parse");
        assert_eq!(t.url.len(), 3);
        assert_eq!(t.server_pid, vec![11, 12, 13]);
        assert_eq!(t.node_count(), 3);
        assert!(t.validate().is_ok());
        assert!(t.single_node("chat").is_err());

        let t = target(&[
            "--url",
            "http://127.0.0.1:1,http://127.0.0.1:2",
            "--app",
            "1:k:s",
            "--server-pid",
            "11",
        ])
        .expect("parse");
        assert!(t.validate().is_err(), "one pid for two urls");

        let t = target(&["--cluster", "3"]).expect("parse");
        assert_eq!(t.node_count(), 3);
        assert!(t.validate().is_ok());
        assert!(target(&[
            "--cluster",
            "3",
            "--url",
            "http://127.0.0.1:1",
            "--app",
            "1:k:s"
        ])
        .is_err());
        let t = target(&["--cluster", "3", "--broker", "local"]).expect("parse");
        assert!(t.validate().is_err());
        let t = target(&["--cluster", "2", "--broker", "redis://192.168.1.5:6379"]).expect("parse");
        assert!(t.validate().is_err(), "loopback only");
        let t = target(&["--cluster", "0"]).expect("parse");
        assert!(t.validate().is_err());
        let t = target(&[]).expect("parse");
        assert_eq!(t.node_count(), 1);
        assert!(t.single_node("quick").is_ok());
    }
}
