//! PostgreSQL for integration tests (issue 6, "Services for tests").
//!
//! - [`PgDatabase::fresh`]: a database of its own on the shared test server that
//!   `make test` provides (`SWITCHBOARD_TEST_POSTGRES`, set by `scripts/test-services.sh`),
//!   named `<run database>_<random>` and dropped on drop. For tests that only need a database.
//! - [`PgServer::start`]: a PostgreSQL instance of its own (initdb into a temp dir, a free
//!   loopback port, fsync off) for tests that stop or restart PostgreSQL, so they never disturb
//!   a server other tests rely on. Stopped and removed on drop.
//!
//! Both shell out to the PostgreSQL client and server programs. A missing server or program
//! fails the test with the reason; nothing is ever skipped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::distributions::Alphanumeric;
use rand::Rng as _;

/// The environment variable `scripts/test-services.sh` sets to the run's database URL.
pub const TEST_POSTGRES_ENV: &str = "SWITCHBOARD_TEST_POSTGRES";
/// The environment variable `scripts/test-services.sh` sets to the loopback Redis URL.
pub const TEST_REDIS_ENV: &str = "SWITCHBOARD_TEST_REDIS";

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// The run's database URL (`SWITCHBOARD_TEST_POSTGRES`); panics with how to get one.
pub fn test_postgres_url() -> String {
    match std::env::var(TEST_POSTGRES_ENV) {
        Ok(url) if !url.trim().is_empty() => url.trim().to_string(),
        _ => panic!(
            "{TEST_POSTGRES_ENV} is not set: PostgreSQL tests need the server that `make test` \
             provides. Run them through make test (or `scripts/test-services.sh cargo test …`)"
        ),
    }
}

/// The shared loopback Redis URL (`SWITCHBOARD_TEST_REDIS`); panics with how to get one.
pub fn test_redis_url() -> String {
    match std::env::var(TEST_REDIS_ENV) {
        Ok(url) if !url.trim().is_empty() => url.trim().to_string(),
        _ => panic!(
            "{TEST_REDIS_ENV} is not set: run the tests through make test \
             (or `scripts/test-services.sh cargo test …`)"
        ),
    }
}

/// Splits `postgres://auth@host:port/db?query` into (`postgres://auth@host:port`, `db`,
/// `?query` or "").
fn split_url(url: &str) -> (String, String, String) {
    let (rest, query) = match url.find('?') {
        Some(i) => (&url[..i], url[i..].to_string()),
        None => (url, String::new()),
    };
    let scheme_end = rest.find("://").map(|i| i + 3).unwrap_or_else(|| {
        panic!("not a postgres:// URL: {url}");
    });
    match rest[scheme_end..].find('/') {
        Some(i) => {
            let slash = scheme_end + i;
            (
                rest[..slash].to_string(),
                rest[slash + 1..].to_string(),
                query,
            )
        }
        None => (rest.to_string(), String::new(), query),
    }
}

fn random_suffix(n: usize) -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(n)
        .map(char::from)
        .collect::<String>()
        .to_lowercase()
}

/// The directory of the PostgreSQL server programs (`initdb`, `postgres`, `pg_isready`):
/// `PG_BIN`, else the newest `/usr/lib/postgresql/*/bin`, else where `initdb` is on PATH.
fn server_bin_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("PG_BIN") {
        return PathBuf::from(p);
    }
    let mut debian: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    debian.sort();
    if let Some((_, bin)) = debian.pop() {
        return bin;
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("initdb"))
            .find(|p| p.is_file())
    });
    match on_path {
        Some(p) => std::fs::canonicalize(&p)
            .unwrap_or(p)
            .parent()
            .expect("initdb has a directory")
            .to_path_buf(),
        None => panic!(
            "PostgreSQL server programs (initdb, postgres) not found: tests that run their own \
             PostgreSQL need them (apt-get install postgresql, or set PG_BIN); `make test` \
             installs them"
        ),
    }
}

/// `psql`: on PATH, else next to the server programs.
fn psql_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PSQL_BIN") {
        return PathBuf::from(p);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("psql"))
            .find(|p| p.is_file())
    });
    on_path.unwrap_or_else(|| server_bin_dir().join("psql"))
}

/// Runs one SQL command with psql against `url`; the output, or why it failed.
pub fn psql(url: &str, sql: &str) -> Result<String, String> {
    let bin = psql_bin();
    let out: Output = Command::new(&bin)
        .args(["-w", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1"])
        .arg(url)
        .arg("-c")
        .arg(sql)
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "psql {url} -c {sql:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A database of its own on the shared test server, dropped (connections and all) on drop.
pub struct PgDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl PgDatabase {
    /// Creates `<database of SWITCHBOARD_TEST_POSTGRES>_<random>` on that server. Panics when
    /// the variable is not set or the server cannot be reached.
    pub fn fresh() -> PgDatabase {
        let run_url = test_postgres_url();
        let (base, run_db, query) = split_url(&run_url);
        assert!(
            !run_db.is_empty(),
            "{TEST_POSTGRES_ENV}={run_url} names no database"
        );
        let name = format!("{run_db}_{}", random_suffix(10));
        let admin_url = format!("{base}/postgres{query}");
        psql(&admin_url, &format!("CREATE DATABASE \"{name}\"")).unwrap_or_else(|e| {
            panic!(
                "cannot create a test database on the server of {TEST_POSTGRES_ENV} \
                 (is PostgreSQL running? run the tests through make test): {e}"
            )
        });
        let url = format!("{base}/{name}{query}");
        PgDatabase {
            admin_url,
            name,
            url,
        }
    }

    pub fn url(&self) -> String {
        self.url.clone()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs SQL in this database (psql); the unaligned output.
    pub fn query(&self, sql: &str) -> String {
        psql(&self.url, sql).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        // FORCE terminates the connections still open (nodes still running, pools).
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        if let Err(e) = psql(&self.admin_url, &sql) {
            // Never panic in drop; scripts/test-services.sh drops leftovers after the run.
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// `id -u postgres` and `id -g postgres`.
fn postgres_ids() -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .expect("run id");
        assert!(
            out.status.success(),
            "running as root, PostgreSQL must run as the postgres user, and there is none \
             (apt-get install postgresql creates it)"
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("numeric id")
    };
    (id("-u"), id("-g"))
}

/// Sends a signal (by name: INT, QUIT, KILL) to a process.
fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .args(["-s", name, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// A PostgreSQL instance of its own: data in a temp dir, a free loopback port, the unix
/// socket in the temp dir, fsync off. Superuser `postgres` with trust auth.
pub struct PgServer {
    port: u16,
    bin: PathBuf,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// initdb and postgres refuse to run as root: as root they run as the postgres user.
    as_postgres: bool,
}

/// The database [`PgServer::url`] points at (created at the first start).
const OWN_DB: &str = "switchboard";

impl PgServer {
    /// initdb, start, wait until it accepts connections, create database `switchboard`.
    pub async fn start() -> PgServer {
        let bin = server_bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("switchboard-pg-")
            .tempdir()
            .expect("temp dir");
        let as_postgres = is_root();
        if as_postgres {
            let (uid, gid) = postgres_ids();
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown {} to postgres: {e}", dir.path().display()));
        }
        let mut server = PgServer {
            port: free_port(),
            bin,
            dir,
            child: None,
            as_postgres,
        };
        let init = server.command("initdb");
        let data = server.data_dir();
        let out = tokio::task::spawn_blocking(move || {
            let mut init = init;
            init.arg("-D")
                .arg(&data)
                .args(["-A", "trust", "-U", "postgres", "-E", "UTF8"])
                .args(["--no-locale", "--no-sync", "--no-instructions"])
                .stdin(Stdio::null())
                .output()
        })
        .await
        .expect("initdb task")
        .unwrap_or_else(|e| panic!("cannot run initdb: {e}"));
        assert!(
            out.status.success(),
            "initdb failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        server.spawn().await;
        psql(
            &server.admin_url(),
            &format!("CREATE DATABASE \"{OWN_DB}\""),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        server
    }

    /// `postgres://postgres@127.0.0.1:<port>/switchboard`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{OWN_DB}", self.port)
    }

    /// The maintenance database `postgres` (to create more databases).
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Fast shutdown (SIGINT): open connections are cut, the data is kept. Returns once the
    /// port refuses connections.
    pub fn stop(&mut self) {
        self.shut_down("INT");
    }

    /// Immediate shutdown (SIGQUIT), as when the server crashes: no checkpoint, recovery at
    /// the next start.
    pub fn kill(&mut self) {
        self.shut_down("QUIT");
    }

    /// Starts it again on the same port with the same data (stops it first if it runs).
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }

    /// Runs SQL in [`Self::url`]'s database (psql); the unaligned output.
    pub fn query(&self, sql: &str) -> String {
        psql(&self.url(), sql).unwrap_or_else(|e| panic!("{e}"))
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// A server program, run as the postgres user when we are root. `setpriv` execs the
    /// program itself, so the child's pid is the postmaster's.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.as_postgres {
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--",
            ])
            .arg(path)
            // Its home, not root's, for anything it may look up there.
            .env("HOME", self.dir.path());
            c
        } else {
            Command::new(path)
        }
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("postgres log");
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().display()
            ))
            // fsync off: fast, and a crash of the server process (not of the machine) still
            // keeps every acknowledged commit. synchronous_commit stays on for that reason.
            .args(["-c", "fsync=off"])
            .args(["-c", "full_page_writes=off"])
            .args(["-c", "max_connections=300"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("clone log")))
            .stderr(Stdio::from(log));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn postgres in {}: {e}", self.bin.display()));
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        while !self.accepts() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                panic!("postgres exited with {status}: {}", self.log());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "postgres not ready within {READY_TIMEOUT:?}: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// pg_isready over TCP: accepting connections (not starting up or shutting down).
    fn accepts(&self) -> bool {
        Command::new(self.bin.join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-d", "postgres", "-U", "postgres", "-t", "1"])
            .stdin(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    fn shut_down(&mut self, sig: &str) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        signal(child.id(), sig);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The temp dir holding the data, the socket and `postgres.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::split_url;

    #[test]
    fn splits_urls() {
        assert_eq!(
            split_url("postgres://root@127.0.0.1:5432/switchboard_test_1_2"),
            (
                "postgres://root@127.0.0.1:5432".into(),
                "switchboard_test_1_2".into(),
                String::new()
            )
        );
        assert_eq!(
            split_url("postgres://u:p@h:1/db?sslmode=disable"),
            (
                "postgres://u:p@h:1".into(),
                "db".into(),
                "?sslmode=disable".into()
            )
        );
        assert_eq!(
            split_url("postgres://h:1"),
            ("postgres://h:1".into(), String::new(), String::new())
        );
    }
}
