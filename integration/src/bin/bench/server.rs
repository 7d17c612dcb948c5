//! The server under test: a child process this bench starts (and kills by its own pid), or
//! an already running server given by `--url`. Also reads CPU time and memory from /proc.

use std::fs::File;
use std::io::{BufRead as _, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Clock ticks per second of /proc/<pid>/stat times (USER_HZ, 100 on Linux).
const CLK_TCK: f64 = 100.0;

/// A workspace's Pusher-style credentials (`id:key:secret`).
#[derive(Clone, Debug)]
pub struct AppCreds {
    pub id: String,
    pub key: String,
    pub secret: String,
}

impl AppCreds {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut parts = s.splitn(3, ':');
        let (Some(id), Some(key), Some(secret)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("--app must be id:key:secret, got '{s}'"));
        };
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
            return Err("app id must be digits".into());
        }
        Ok(Self {
            id: id.into(),
            key: key.into(),
            secret: secret.into(),
        })
    }

    /// Fresh credentials for a server this bench starts.
    pub fn random() -> Self {
        use rand::Rng as _;
        let mut rng = rand::thread_rng();
        let mut word = |n: usize| {
            (&mut rng)
                .sample_iter(&rand::distributions::Alphanumeric)
                .take(n)
                .map(char::from)
                .collect::<String>()
        };
        Self {
            id: format!("{}", rand::thread_rng().gen_range(100_000..999_999u32)),
            key: format!("benchkey{}", word(12)),
            secret: format!("benchsecret{}", word(24)),
        }
    }
}

/// A server child process. Dropping it stops the server (SIGTERM, then SIGKILL).
pub struct ServerProc {
    child: Child,
    pub pid: u32,
    pub log_path: PathBuf,
    /// The database URL it was started with (password redacted).
    pub database: String,
    // Held for its Drop: removes the database (when it is the node's own) and the log.
    _dir: tempfile::TempDir,
}

pub fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind ephemeral port: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("local addr: {e}"))
}

/// Where the server binary is: the flag, `SWITCHBOARD_BIN`, next to this executable, or
/// `target/release/switchboard`.
pub fn locate_binary(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    if let Some(p) = std::env::var_os("SWITCHBOARD_BIN") {
        return PathBuf::from(p);
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            let sibling = dir.join("switchboard");
            if sibling.is_file() {
                return sibling;
            }
        }
    }
    PathBuf::from("target/release/switchboard")
}

impl ServerProc {
    /// Starts `switchboard serve` on a free loopback port with a fresh SQLite database.
    pub fn spawn(bin: &Path, creds: &AppCreds) -> Result<(Self, String), String> {
        Self::spawn_node(bin, creds, None, None)
    }

    /// [`ServerProc::spawn`] as a cluster node: on `database` (a URL shared by the nodes;
    /// `None`: a fresh SQLite file of its own) with `--broker broker` when given.
    pub fn spawn_node(
        bin: &Path,
        creds: &AppCreds,
        database: Option<&str>,
        broker: Option<&str>,
    ) -> Result<(Self, String), String> {
        if !bin.is_file() {
            return Err(format!(
                "server binary {} not found: build it with `cargo build --release --bin switchboard`",
                bin.display()
            ));
        }
        let dir = tempfile::Builder::new()
            .prefix("switchboard-bench-")
            .tempdir()
            .map_err(|e| format!("tempdir: {e}"))?;
        let port = free_port()?;
        let bind = format!("127.0.0.1:{port}");
        let database = match database {
            Some(url) => url.to_string(),
            None => format!("sqlite://{}", dir.path().join("bench.db").display()),
        };
        let log_path = dir.path().join("server.log");
        let log = File::create(&log_path).map_err(|e| format!("create server log: {e}"))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("clone server log: {e}"))?;
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--bind")
            .arg(&bind)
            .arg("--database")
            .arg(&database);
        if let Some(b) = broker {
            cmd.arg("--broker").arg(b);
        }
        let child = cmd
            .env(
                "SWITCHBOARD_BOOTSTRAP_APP",
                format!("{}:{}:{}", creds.id, creds.key, creds.secret),
            )
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
        let pid = child.id();
        Ok((
            Self {
                child,
                pid,
                log_path,
                database: crate::cluster::redact(&database),
                _dir: dir,
            },
            format!("http://{bind}"),
        ))
    }

    /// `Some(status)` if the server has exited.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(s)) => Some(s.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("unknown ({e})")),
        }
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let Ok(f) = File::open(&self.log_path) else {
            return String::new();
        };
        let all: Vec<String> = BufReader::new(f).lines().map_while(Result::ok).collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Lines the server logged at WARN or ERROR (it runs with RUST_LOG=warn), and a few of them.
    pub fn log_problems(&self, keep: usize) -> (u64, Vec<String>) {
        let Ok(f) = File::open(&self.log_path) else {
            return (0, Vec::new());
        };
        let mut n = 0;
        let mut sample = Vec::new();
        for line in BufReader::new(f).lines().map_while(Result::ok) {
            if line.contains("WARN") || line.contains("ERROR") {
                n += 1;
                if sample.len() < keep {
                    sample.push(line);
                }
            }
        }
        (n, sample)
    }

    /// SIGTERM (graceful shutdown), up to `grace`, then SIGKILL. Only this child's own pid.
    pub fn stop(&mut self, grace: Duration) {
        if self.exited().is_some() {
            return;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let until = Instant::now() + grace;
        while Instant::now() < until {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// CPU seconds (user + system) and memory of one process, from /proc.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcSample {
    pub cpu_secs: f64,
    pub rss_kb: u64,
    pub hwm_kb: u64,
    /// Threads in the process when sampled.
    pub threads: u64,
}

/// `pid` is a number or `self`.
pub fn sample_proc(pid: &str) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields are counted after its closing parenthesis.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some(ProcSample {
        cpu_secs: (utime + stime) as f64 / CLK_TCK,
        rss_kb: field("VmRSS:"),
        hwm_kb: field("VmHWM:"),
        threads: field("Threads:"),
    })
}
