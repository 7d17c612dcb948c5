//! Several server nodes as one target (issue 6, cluster mode).
//!
//! `--cluster N` starts N `switchboard serve` nodes, one after the other (the first creates
//! and migrates the database), on one shared database (`--database URL`, default a fresh
//! SQLite file in a temporary directory) and one Redis broker (`--broker redis://…`, default
//! a `redis-server` the bench starts itself on a free loopback port, no persistence, killed
//! at the end by its own pid). `--url` repeated or comma-separated names nodes that already
//! run (`--server-pid` likewise, in the same order).
//!
//! `idle` and `fanout` connect socket `g` (its global index) to node `g % N`; `fanout`
//! publishes to node 0 only, so every delivery on nodes 1.. crossed the broker. Server
//! figures are read from every node's /proc entry, summed and shown per node.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::server::{sample_proc, ProcSample};

/// How long a started `redis-server` may take to answer PING.
const REDIS_READY: Duration = Duration::from_secs(10);
/// Most nodes `--cluster` starts (2 cores: more would measure the scheduler).
pub const MAX_NODES: usize = 8;

/// One node of the target.
#[derive(Clone, Debug)]
pub struct Node {
    /// `http://host:port`.
    pub base: String,
    /// Whose CPU time and memory are read (unknown for a `--url` node without `--server-pid`).
    pub pid: Option<u32>,
}

/// The node socket `g` (global index over the run) connects to.
pub fn node_of(g: usize, nodes: usize) -> usize {
    g % nodes.max(1)
}

/// Sockets per node when `total` are spread round-robin over `nodes`.
pub fn per_node(total: usize, nodes: usize) -> Vec<usize> {
    let n = nodes.max(1);
    (0..n)
        .map(|k| total / n + usize::from(k < total % n))
        .collect()
}

/// `per_node` for the sockets `first..first + count` only (one worker's share).
#[cfg(test)]
pub fn share_per_node(first: usize, count: usize, nodes: usize) -> Vec<usize> {
    let n = nodes.max(1);
    let mut out = vec![0; n];
    for g in first..first + count {
        out[node_of(g, n)] += 1;
    }
    out
}

/// Every node's /proc figures, in node order (`None` where the pid is unknown or gone).
pub fn sample_nodes(nodes: &[Node]) -> Vec<Option<ProcSample>> {
    nodes
        .iter()
        .map(|n| n.pid.and_then(|p| sample_proc(&p.to_string())))
        .collect()
}

/// The sum over the nodes: CPU seconds, RSS and peak RSS added up. `None` unless every node
/// was sampled (a sum over some of them would pass for the whole cluster).
pub fn sum_samples(samples: &[Option<ProcSample>]) -> Option<ProcSample> {
    if samples.is_empty() {
        return None;
    }
    samples.iter().try_fold(ProcSample::default(), |acc, s| {
        s.map(|s| ProcSample {
            cpu_secs: acc.cpu_secs + s.cpu_secs,
            rss_kb: acc.rss_kb + s.rss_kb,
            hwm_kb: acc.hwm_kb + s.hwm_kb,
            threads: acc.threads + s.threads,
        })
    })
}

/// `sqlite`, `postgres` or `unknown` (a `--url` target whose `--database` was not given).
pub fn database_kind(url: Option<&str>) -> &'static str {
    match url {
        Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => "postgres",
        Some(u) if u.starts_with("sqlite:") => "sqlite",
        Some(_) => "other",
        None => "unknown",
    }
}

/// The URL without its password (`scheme://user:***@host…`), for logs and the results.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let masked = match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:***"),
                None => userinfo.to_string(),
            };
            format!("{scheme}://{masked}@{host}{tail}")
        }
        None => url.to_string(),
    }
}

/// The host of `scheme://[user[:pw]@]host[:port][/…]` (brackets kept for IPv6); empty when
/// none is given (a Unix socket or the client's default).
pub fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    Some(if host_port.starts_with('[') {
        host_port.find(']').map_or(host_port, |i| &host_port[..=i])
    } else {
        host_port.split(':').next().unwrap_or("")
    })
}

/// This bench sends traffic to loopback only: the broker and database it hands its nodes must
/// be there too (an empty host is a local Unix socket).
pub fn check_loopback_url(what: &str, url: &str) -> Result<(), String> {
    if url.starts_with("sqlite:") || url == "local" {
        return Ok(());
    }
    let host = url_host(url).ok_or_else(|| format!("{what} must be a URL, got {url}"))?;
    if matches!(host, "" | "localhost" | "[::1]") || host.starts_with("127.") {
        Ok(())
    } else {
        Err(format!(
            "{what} must be on loopback (this bench runs on one host), got host {host}"
        ))
    }
}

/// Node rows for the results JSON: base, pid and the given per-node figures.
pub fn nodes_json(nodes: &[Node], figures: impl Fn(usize) -> Value) -> Value {
    Value::Array(
        nodes
            .iter()
            .enumerate()
            .map(|(k, n)| {
                let mut v = json!({"node": k, "base": n.base, "pid": n.pid});
                if let (Some(o), Value::Object(extra)) = (v.as_object_mut(), figures(k)) {
                    o.extend(extra);
                }
                v
            })
            .collect(),
    )
}

/// A `redis-server` this bench started for its nodes: its own loopback port, no
/// persistence; stopped (by its own pid) when dropped.
pub struct RedisProc {
    child: Child,
    pub port: u16,
    pub pid: u32,
    _dir: tempfile::TempDir,
}

/// `--redis-bin`, `REDIS_SERVER_BIN` (the same flag), else `redis-server` on PATH.
fn redis_binary(flag: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = flag {
        return Ok(p.to_path_buf());
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("redis-server"))
                .find(|p| p.is_file())
        })
        .ok_or_else(|| {
            "redis-server not found: --cluster needs a Redis (apt-get install redis-server, \
             --redis-bin PATH, or --broker redis://127.0.0.1:PORT)"
                .to_string()
        })
}

impl RedisProc {
    /// Starts it on a free loopback port and waits (at most 10 s) until it answers PING.
    pub fn start(bin: Option<&Path>) -> Result<Self, String> {
        let bin = redis_binary(bin)?;
        let dir = tempfile::Builder::new()
            .prefix("switchboard-bench-redis-")
            .tempdir()
            .map_err(|e| format!("tempdir: {e}"))?;
        let port = crate::server::free_port()?;
        let log = std::fs::File::create(dir.path().join("redis.log"))
            .map_err(|e| format!("redis log: {e}"))?;
        let log_err = log.try_clone().map_err(|e| format!("redis log: {e}"))?;
        let child = Command::new(&bin)
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
        let pid = child.id();
        let mut redis = Self {
            child,
            port,
            pid,
            _dir: dir,
        };
        let until = Instant::now() + REDIS_READY;
        while !redis.answers_ping() {
            if let Ok(Some(status)) = redis.child.try_wait() {
                return Err(format!(
                    "redis-server exited with {status}: {}",
                    redis.log()
                ));
            }
            if Instant::now() >= until {
                return Err(format!(
                    "redis-server not ready within {REDIS_READY:?}: {}",
                    redis.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(redis)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn answers_ping(&self) -> bool {
        switchboard_integration::redis_server::answers_ping(self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("redis.log")).unwrap_or_default()
    }

    /// Kills it (its own child only) and reaps it.
    pub fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for RedisProc {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_go_round_robin_over_the_nodes() {
        assert_eq!(per_node(10, 3), vec![4, 3, 3]);
        assert_eq!(per_node(19_000, 1), vec![19_000]);
        assert_eq!(per_node(2, 3), vec![1, 1, 0]);
        assert_eq!(per_node(5, 0), vec![5]);
        assert_eq!(
            (0..7).map(|g| node_of(g, 3)).collect::<Vec<_>>(),
            vec![0, 1, 2, 0, 1, 2, 0]
        );
        // Workers' shares add up to the whole spread, whatever their boundaries.
        let (a, b) = (share_per_node(0, 5, 3), share_per_node(5, 5, 3));
        assert_eq!(a, vec![2, 2, 1]);
        assert_eq!(b, vec![2, 1, 2]);
        let sum: Vec<usize> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        assert_eq!(sum, per_node(10, 3));
    }

    #[test]
    fn node_figures_sum_only_when_every_node_was_read() {
        let s = |cpu: f64, rss: u64| {
            Some(ProcSample {
                cpu_secs: cpu,
                rss_kb: rss,
                hwm_kb: rss + 1,
                threads: 3,
            })
        };
        let sum = sum_samples(&[s(1.5, 100), s(2.0, 50), s(0.5, 10)]).expect("sum");
        assert!((sum.cpu_secs - 4.0).abs() < 1e-9);
        assert_eq!((sum.rss_kb, sum.hwm_kb), (160, 163));
        assert!(sum_samples(&[s(1.0, 1), None]).is_none());
        assert!(sum_samples(&[]).is_none());
        // This process is always there.
        let me = sample_nodes(&[Node {
            base: "http://127.0.0.1:1".into(),
            pid: Some(std::process::id()),
        }]);
        assert!(me[0].is_some_and(|p| p.rss_kb > 0));
    }

    #[test]
    fn urls_are_checked_for_loopback_and_redacted() {
        assert_eq!(url_host("redis://127.0.0.1:6379/0"), Some("127.0.0.1"));
        assert_eq!(
            url_host("postgres://u:p@localhost:5432/db"),
            Some("localhost")
        );
        assert_eq!(url_host("postgres:///db?host=/run/postgresql"), Some(""));
        assert_eq!(url_host("redis://[::1]:6379"), Some("[::1]"));
        assert!(check_loopback_url("--broker", "redis://127.0.0.1:6379").is_ok());
        assert!(check_loopback_url("--database", "postgres://u@127.0.0.5/x").is_ok());
        assert!(check_loopback_url("--database", "sqlite:///tmp/x.db").is_ok());
        assert!(check_loopback_url("--broker", "redis://10.0.0.1:6379").is_err());
        assert!(check_loopback_url("--database", "postgres://u:p@db.example/x").is_err());
        assert_eq!(
            redact("postgres://bench:secret@127.0.0.1:5432/sb"),
            "postgres://bench:***@127.0.0.1:5432/sb"
        );
        assert_eq!(
            redact("postgres://bench@127.0.0.1/sb"),
            "postgres://bench@127.0.0.1/sb"
        );
        assert_eq!(redact("redis://127.0.0.1:1"), "redis://127.0.0.1:1");
        assert_eq!(database_kind(Some("postgresql://x")), "postgres");
        assert_eq!(database_kind(Some("sqlite:///tmp/a.db")), "sqlite");
        assert_eq!(database_kind(None), "unknown");
    }
}
