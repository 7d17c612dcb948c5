//! Proof with real clients (SPEC §4, §5): pusher-js 8 in Node and the official Pusher Node
//! server SDK (`pusher` 5), both pinned in `integration/clients/node/package-lock.json`,
//! against a real server, unchanged. The checks themselves are in
//! `integration/clients/node/pusher_clients_test.mjs` (one `ok N - …` line each); this test
//! installs the packages with `npm ci` when `node_modules` is missing or was installed from
//! another lockfile, starts a server, runs the script and requires exit status 0.
//!
//! Node 18 or later and npm are required: without them the test fails, it never skips.
//! Run: `cargo test -p switchboard-integration --test pusher_js -- --nocapture`.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use switchboard_integration::harness::TestServer;

/// The script stops itself after this long (`PUSHER_TEST_TIMEOUT_MS`); it takes ~5 s.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);
/// A hard stop beyond the script's own timeout.
const RUN_TIMEOUT: Duration = Duration::from_secs(90);
/// How long to wait for another process's `npm ci` (it takes a few seconds).
const INSTALL_LOCK_WAIT: Duration = Duration::from_secs(300);
/// A lock file older than this was left by a killed install and is taken over.
const STALE_LOCK: Duration = Duration::from_secs(600);
/// Written into `node_modules` after a successful `npm ci`: the lockfile it installed.
const STAMP: &str = ".switchboard-installed-lock.json";

fn client_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("clients/node")
}

fn run(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: could not start it ({e})"));
    assert!(
        out.status.success(),
        "{what} failed ({})\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `node --version` must run and be v18 or later (the script uses the global `fetch`).
fn require_node() -> String {
    let out = Command::new("node").arg("--version").output();
    let version = match &out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        _ => panic!(
            "the pusher-js test needs Node.js 18 or later and npm on PATH \
             (https://nodejs.org/); `node --version` gave {out:?}"
        ),
    };
    let major = version
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse::<u32>().ok());
    assert!(
        major.is_some_and(|m| m >= 18),
        "the pusher-js test needs Node.js 18 or later, found {version}"
    );
    let npm = Command::new("npm").arg("--version").output();
    assert!(
        npm.as_ref().is_ok_and(|o| o.status.success()),
        "the pusher-js test needs npm on PATH (it installs the pinned clients with `npm ci`): {npm:?}"
    );
    version
}

fn installed(dir: &Path, lockfile: &str) -> bool {
    std::fs::read_to_string(dir.join("node_modules").join(STAMP))
        .ok()
        .as_deref()
        == Some(lockfile)
}

/// Holds `.npm-install.lock` (created exclusively) while one process installs; removed on drop.
struct InstallLock(PathBuf);

impl InstallLock {
    fn acquire(dir: &Path) -> InstallLock {
        let path = dir.join(".npm-install.lock");
        let deadline = Instant::now() + INSTALL_LOCK_WAIT;
        loop {
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(_) => return InstallLock(path),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let age = std::fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| SystemTime::now().duration_since(t).ok());
                    if age.is_some_and(|a| a > STALE_LOCK) {
                        let _ = std::fs::remove_file(&path);
                        continue;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "another `npm ci` held {} for over {INSTALL_LOCK_WAIT:?}",
                        path.display()
                    );
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("create {}: {e}", path.display()),
            }
        }
    }
}

impl Drop for InstallLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs `npm ci` unless `node_modules` holds exactly what the lockfile pins. Concurrent test
/// processes serialise on a lock file; the second one finds the install done.
fn ensure_installed(dir: &Path) {
    let lock_path = dir.join("package-lock.json");
    let lockfile = std::fs::read_to_string(&lock_path)
        .unwrap_or_else(|e| panic!("read {}: {e}", lock_path.display()));
    if installed(dir, &lockfile) {
        println!("node_modules is current with package-lock.json");
        return;
    }
    let _lock = InstallLock::acquire(dir);
    if installed(dir, &lockfile) {
        println!("node_modules was installed by another process");
        return;
    }
    let started = Instant::now();
    run(
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(dir),
        "npm ci in integration/clients/node (the npm registry must be reachable)",
    );
    let stamp = dir.join("node_modules").join(STAMP);
    if let Err(e) = std::fs::write(&stamp, &lockfile) {
        panic!("write {}: {e}", stamp.display());
    }
    println!("npm ci took {:.1?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pusher_js_and_the_pusher_server_sdk_work_unchanged() {
    let node = require_node();
    let dir = client_dir();
    let install_dir = dir.clone();
    tokio::task::spawn_blocking(move || ensure_installed(&install_dir))
        .await
        .unwrap_or_else(|e| panic!("npm ci task: {e}"));

    let server = TestServer::start().await;
    let addr: std::net::SocketAddr = server.addr().parse().expect("the server's address");
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg("pusher_clients_test.mjs")
        .current_dir(&dir)
        .env("SWITCHBOARD_HOST", addr.ip().to_string())
        .env("SWITCHBOARD_PORT", addr.port().to_string())
        .env("SWITCHBOARD_APP_ID", &server.app.id)
        .env("SWITCHBOARD_APP_KEY", &server.app.key)
        .env("SWITCHBOARD_APP_SECRET", &server.app.secret)
        .env(
            "PUSHER_TEST_TIMEOUT_MS",
            SCRIPT_TIMEOUT.as_millis().to_string(),
        )
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let started = Instant::now();
    let out = tokio::time::timeout(RUN_TIMEOUT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("node pusher_clients_test.mjs ran past {RUN_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("run node pusher_clients_test.mjs: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!(
        "node {node} pusher_clients_test.mjs: {} in {:.1?}\n{stdout}",
        out.status,
        started.elapsed()
    );
    if !stderr.trim().is_empty() {
        println!("stderr:\n{stderr}");
    }
    // The whole output is printed above; the failure names the failed check and what follows.
    let failed_from = stdout.find("not ok").unwrap_or(0);
    assert!(
        out.status.success(),
        "pusher-js / Pusher SDK checks failed ({}):\n{}\nstderr:\n{stderr}\nserver log:\n{}",
        out.status,
        &stdout[failed_from..],
        server.log_tail()
    );
    assert!(
        stdout.contains("# all ") && stdout.contains(" checks passed"),
        "the script exited 0 without its final line:\n{stdout}"
    );
}
