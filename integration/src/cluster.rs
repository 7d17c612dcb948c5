//! Cluster mode for black-box tests (issue 6): several real `switchboard serve` processes on
//! one PostgreSQL database and one Redis of their own, sharing one bootstrap workspace.
//!
//! The database is the test's (a [`crate::pg_server::PgDatabase`] on the run's server, or a
//! private [`crate::pg_server::PgServer`] for outage tests); the Redis is the cluster's own
//! (pub/sub ignores database numbers, so two clusters on one Redis would hear each other).
//!
//! Also here: [`Tap`], which reads a socket on a task of its own (a socket that is not read
//! while hundreds of events are written overflows its outbound queue) and keeps every frame.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use crate::harness::{AppCreds, Frame, ServerBuilder, TestServer, WsClient};
use crate::redis_server::RedisServer;

/// Nodes of one cluster: the same database, the same Redis, the same workspace.
pub struct Cluster {
    pub nodes: Vec<TestServer>,
    pub redis: RedisServer,
    pub app: AppCreds,
    db_url: String,
    env: Vec<(String, String)>,
}

impl Cluster {
    /// `n` nodes on `db_url` (`postgres://…`) and a Redis of their own. The first node starts
    /// (and migrates) alone, the others together.
    pub async fn start(db_url: &str, n: usize) -> Cluster {
        Self::start_with(db_url, n, &[]).await
    }

    /// Like [`Cluster::start`], with extra environment variables for every node.
    pub async fn start_with(db_url: &str, n: usize, env: &[(&str, &str)]) -> Cluster {
        assert!(n >= 1, "a cluster has a node");
        let redis = RedisServer::start().await;
        let app = AppCreds::random("1001");
        let mut cluster = Cluster {
            nodes: Vec::new(),
            redis,
            app,
            db_url: db_url.to_owned(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let first = cluster.builder().start().await;
        cluster.nodes.push(first);
        let rest = (1..n).map(|_| cluster.builder().start());
        let rest = futures_util::future::join_all(rest).await;
        cluster.nodes.extend(rest);
        cluster
    }

    /// A builder for one more node of this cluster.
    pub fn builder(&self) -> ServerBuilder {
        let mut b = TestServer::builder()
            .app(&self.app)
            .database_url(&self.db_url)
            .env("SWITCHBOARD_BROKER", &self.redis.url())
            // Repairs, reconnections and outages are logged at info: shown if a test fails.
            .env("RUST_LOG", "info");
        for (k, v) in &self.env {
            b = b.env(k, v);
        }
        b
    }

    pub fn node(&self, i: usize) -> &TestServer {
        &self.nodes[i]
    }

    pub fn node_mut(&mut self, i: usize) -> &mut TestServer {
        &mut self.nodes[i]
    }

    pub fn db_url(&self) -> &str {
        &self.db_url
    }
}

/// How a [`Tap`]'s socket ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapEnd {
    /// [`Tap::stop`] was called; the socket is still open.
    Stopped,
    /// The socket closed (`Some(code)` with a close frame, `None` on EOF / reset).
    Closed(Option<u16>),
}

/// A socket read on a task of its own; every JSON frame is kept in arrival order.
pub struct Tap {
    frames: Arc<Mutex<Vec<Value>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(WsClient, TapEnd)>,
}

impl Tap {
    /// Starts reading `ws` (frames already read before are not in it).
    pub fn start(mut ws: WsClient) -> Tap {
        let frames = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (f, s) = (frames.clone(), stop.clone());
        let task = tokio::spawn(async move {
            loop {
                match ws.next_frame(Duration::from_millis(50)).await {
                    Frame::Json(v) => f.lock().expect("tap lock").push(v),
                    Frame::Closed(code) => return (ws, TapEnd::Closed(code)),
                    Frame::Timeout => {
                        if s.load(Ordering::Acquire) {
                            return (ws, TapEnd::Stopped);
                        }
                    }
                }
            }
        });
        Tap { frames, stop, task }
    }

    /// A copy of the frames read so far.
    pub fn frames(&self) -> Vec<Value> {
        self.frames.lock().expect("tap lock").clone()
    }

    /// Whether the socket has ended (closed).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits until `pred` holds for the frames read so far; panics after `timeout` with
    /// `what` and the last frames.
    pub async fn wait_for<F: Fn(&[Value]) -> bool>(
        &self,
        timeout: Duration,
        what: &str,
        pred: F,
    ) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let frames = self.frames();
            if pred(&frames) {
                return frames;
            }
            if Instant::now() >= deadline {
                let from = frames.len().saturating_sub(5);
                panic!(
                    "{what}: not within {timeout:?}; {} frames read{}, last: {:?}",
                    frames.len(),
                    if self.is_finished() {
                        " and the socket closed"
                    } else {
                        ""
                    },
                    &frames[from..]
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops reading (the socket stays open) and answers the socket, every frame and how it
    /// ended.
    pub async fn stop(self) -> (WsClient, Vec<Value>, TapEnd) {
        self.stop.store(true, Ordering::Release);
        let (ws, end) = self.task.await.expect("tap task");
        let frames = std::mem::take(&mut *self.frames.lock().expect("tap lock"));
        (ws, frames, end)
    }

    /// Waits (at most `timeout`) for the socket to close; answers every frame and how it
    /// ended. Panics if it is still open then.
    pub async fn closed(self, timeout: Duration) -> (Vec<Value>, TapEnd) {
        let task = self.task;
        let (_, end) = tokio::time::timeout(timeout, task)
            .await
            .unwrap_or_else(|_| panic!("socket still open after {timeout:?}"))
            .expect("tap task");
        let frames = std::mem::take(&mut *self.frames.lock().expect("tap lock"));
        (frames, end)
    }
}

/// Writes a node refused or renumbered because another node had written the channel first
/// (`/metrics`): tests of concurrent writers assert it is above zero, to prove the nodes
/// really contended.
pub async fn conflicts_seen(node: &TestServer) -> u64 {
    let (status, text) = node.get_text("/metrics").await;
    assert_eq!(status, 200, "metrics: {text}");
    text.lines()
        .filter(|l| {
            l.starts_with("switchboard_stale_seq_refusals_total ")
                || l.starts_with("switchboard_rebased_writes_total ")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// Nodes on one SQLite file and a Redis the test owns (cluster tests on one machine that do
/// not need PostgreSQL). Started one after the other (the first creates and migrates the
/// file); `settings`, if any, are applied through the first node before the others start, so
/// every node reads them fresh.
pub struct SharedFileNodes {
    pub nodes: Vec<TestServer>,
    _dir: tempfile::TempDir,
}

impl SharedFileNodes {
    pub async fn start(redis: &RedisServer, n: usize, settings: Option<&Value>) -> Self {
        assert!(n >= 1, "a cluster has a node");
        let dir = tempfile::Builder::new()
            .prefix("switchboard-cluster-")
            .tempdir()
            .expect("temp dir");
        let path = dir.path().join("shared.db");
        let app = AppCreds::random("1001");
        let node = || {
            TestServer::builder()
                .app(&app)
                .database(&path)
                .env("SWITCHBOARD_BROKER", &redis.url())
                // Repairs and reconnections are logged at info: shown if a test fails.
                .env("RUST_LOG", "info")
        };
        let mut nodes = vec![node().start().await];
        if let Some(s) = settings {
            crate::pusher_client::patch_settings(&nodes[0], s).await;
        }
        for _ in 1..n {
            nodes.push(node().start().await);
        }
        Self { nodes, _dir: dir }
    }
}
