//! Black-box test harness: spawns the real `switchboard` binary as a child process and
//! talks to it over real sockets only (HTTP via reqwest, WebSockets via tokio-tungstenite).
//!
//! Nothing here links against the server crates: every assertion is about what a client sees.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use hmac::{Hmac, Mac};
use md5::{Digest as _, Md5};
use rand::distributions::Alphanumeric;
use rand::Rng as _;
use reqwest::Method;
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

/// How long `TestServer::start` waits for `GET /readyz` to answer 200.
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Starts of a test server before giving up on finding a port no other test took.
const PORT_ATTEMPTS: usize = 5;
/// Default wait for one WebSocket frame.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

type HmacSha256 = Hmac<Sha256>;

/// A workspace's Pusher-style credentials.
#[derive(Clone, Debug)]
pub struct AppCreds {
    pub id: String,
    pub key: String,
    pub secret: String,
}

impl AppCreds {
    /// Workspace `id` with a fresh random key and secret.
    pub fn random(id: &str) -> Self {
        Self {
            id: id.to_owned(),
            key: format!("key{}", random_string(16)),
            secret: random_string(32),
        }
    }
}

/// Random lowercase-alphanumeric string of `n` characters.
pub fn random_string(n: usize) -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(n)
        .map(char::from)
        .collect::<String>()
        .to_lowercase()
}

/// A unique id suffix, handy for channel names.
pub fn uniq(prefix: &str) -> String {
    format!("{prefix}-{}", random_string(8))
}

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener
        .local_addr()
        .expect("local addr of ephemeral listener")
        .port()
}

fn default_bin() -> PathBuf {
    match std::env::var_os("SWITCHBOARD_BIN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/switchboard"),
    }
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("build reqwest client")
}

/// Parses a response body: empty → `Value::Null`; anything else must be JSON or the test
/// fails loudly (SPEC §8: no framework page ever leaks).
pub fn parse_body(status: u16, bytes: &[u8], what: &str) -> Value {
    if bytes.is_empty() {
        return Value::Null;
    }
    match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => panic!(
            "{what}: status {status} with a non-JSON body ({e}): {:?}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(2000)])
        ),
    }
}

/// Builder for a [`TestServer`] with extra environment variables.
#[derive(Default)]
pub struct ServerBuilder {
    env: Vec<(String, String)>,
    app_id: Option<String>,
    app: Option<AppCreds>,
    database: Option<PathBuf>,
    database_url: Option<String>,
    port: Option<u16>,
}

impl ServerBuilder {
    /// Tries this port first (a test of what happens when it is taken); another is picked if
    /// it is.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Adds an environment variable for the server process (e.g.
    /// `SWITCHBOARD_REALTIME_MAX_REPLAY`, `SWITCHBOARD_REALTIME_SESSION_QUEUE`,
    /// `SWITCHBOARD_ALLOWED_ORIGINS`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Overrides the bootstrap app id (default "1001").
    pub fn app_id(mut self, id: &str) -> Self {
        self.app_id = Some(id.to_owned());
        self
    }

    /// Bootstraps these credentials instead of fresh ones (nodes of one cluster share them).
    pub fn app(mut self, app: &AppCreds) -> Self {
        self.app = Some(app.clone());
        self
    }

    /// Uses this SQLite file instead of one in the server's own temp dir (nodes of one
    /// cluster share it).
    pub fn database(mut self, path: &std::path::Path) -> Self {
        self.database = Some(path.to_path_buf());
        self
    }

    /// Uses this database URL (`postgres://…`: cluster mode on PostgreSQL) instead of a
    /// SQLite file.
    pub fn database_url(mut self, url: &str) -> Self {
        self.database_url = Some(url.to_owned());
        self
    }

    pub async fn start(self) -> TestServer {
        let dir = tempfile::Builder::new()
            .prefix("switchboard-it-")
            .tempdir()
            .expect("create temp dir");
        let app = self
            .app
            .unwrap_or_else(|| AppCreds::random(self.app_id.as_deref().unwrap_or("1001")));
        let mut server = TestServer {
            bin: default_bin(),
            port: self.port.unwrap_or_else(free_port),
            dir,
            database: self.database,
            database_url: self.database_url,
            app,
            admin_token: random_string(40),
            extra_env: self.env,
            child: None,
            http: http_client(),
        };
        server.spawn().await;
        server
    }
}

/// How one start of the child went.
enum Started {
    Ready,
    /// Another process had the port (the child could not bind, or another server answered).
    PortTaken,
}

/// A running `switchboard serve` child process with its own SQLite database.
pub struct TestServer {
    bin: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    /// A database file outside `dir` (shared with other servers), if one was given.
    database: Option<PathBuf>,
    /// A database URL given instead of a SQLite file (PostgreSQL).
    database_url: Option<String>,
    /// The bootstrap workspace (`SWITCHBOARD_BOOTSTRAP_APP`).
    pub app: AppCreds,
    /// `SWITCHBOARD_ADMIN_TOKEN`.
    pub admin_token: String,
    extra_env: Vec<(String, String)>,
    child: Option<Child>,
    http: reqwest::Client,
}

impl TestServer {
    pub fn builder() -> ServerBuilder {
        ServerBuilder::default()
    }

    /// Starts a server with default settings.
    pub async fn start() -> TestServer {
        ServerBuilder::default().start().await
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn db_path(&self) -> PathBuf {
        self.database
            .clone()
            .unwrap_or_else(|| self.dir.path().join("sb.db"))
    }

    pub fn db_url(&self) -> String {
        if let Some(url) = &self.database_url {
            return url.clone();
        }
        format!("sqlite://{}", self.db_path().display())
    }

    pub fn bin(&self) -> PathBuf {
        self.bin.clone()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// What the server wrote to the log from byte `start` on.
    fn log_since(&self, start: u64) -> String {
        use std::io::{Seek, SeekFrom};
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.log_path()) {
            if f.seek(SeekFrom::Start(start)).is_ok() {
                let _ = f.read_to_string(&mut s);
            }
        }
        s
    }

    /// The last lines the server wrote to stdout/stderr (for diagnostics).
    pub fn log_tail(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.log_path()) {
            let _ = f.read_to_string(&mut s);
        }
        let lines: Vec<&str> = s.lines().collect();
        let from = lines.len().saturating_sub(60);
        lines[from..].join("\n")
    }

    /// Starts the child and waits until it answers. Ports come from [`free_port`], which
    /// another test may pick too between its probe and our bind: a child that could not bind,
    /// or a port where another test's server answers, gets a fresh port and a new start.
    async fn spawn(&mut self) {
        for _ in 0..PORT_ATTEMPTS {
            match self.spawn_once().await {
                Started::Ready => return,
                Started::PortTaken => {
                    self.kill_hard();
                    self.port = free_port();
                }
            }
        }
        panic!("switchboard could not get a free port in {PORT_ATTEMPTS} attempts");
    }

    async fn spawn_once(&mut self) -> Started {
        assert!(
            self.bin.exists(),
            "switchboard binary not found at {} (build it with `cargo build` or set SWITCHBOARD_BIN)",
            self.bin.display()
        );
        let log_start = std::fs::metadata(self.log_path()).map_or(0, |m| m.len());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open server log");
        let log2 = log.try_clone().expect("clone log handle");
        let mut cmd = Command::new(&self.bin);
        cmd.arg("serve")
            .arg("--bind")
            .arg(self.addr())
            .arg("--database")
            .arg(self.db_url())
            .env(
                "SWITCHBOARD_BOOTSTRAP_APP",
                format!("{}:{}:{}", self.app.id, self.app.key, self.app.secret),
            )
            .env("SWITCHBOARD_ADMIN_TOKEN", &self.admin_token)
            .env("RUST_LOG", "warn")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn switchboard");
        self.child = Some(child);
        self.wait_ready(log_start).await
    }

    /// `log_start`: where this start's output begins in the log (which keeps earlier ones).
    async fn wait_ready(&mut self, log_start: u64) -> Started {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        let url = format!("{}/readyz", self.base_url());
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    if self.log_since(log_start).contains("Address already in use") {
                        return Started::PortTaken;
                    }
                    panic!(
                        "switchboard exited during start-up with {status}; log:\n{}",
                        self.log_tail()
                    );
                }
            }
            if let Ok(resp) = self
                .http
                .get(&url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
            {
                if resp.status().as_u16() == 200 {
                    return if self.answers_as_ours().await {
                        Started::Ready
                    } else {
                        Started::PortTaken
                    };
                }
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "switchboard did not become ready within {READY_TIMEOUT:?}; log:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether the server on our port is our child: only it knows our operator token, so it
    /// answers an (invalid, changing nothing) operator request with 400 instead of 401.
    async fn answers_as_ours(&self) -> bool {
        let resp = self
            .http
            .post(format!("{}/admin/workspaces", self.base_url()))
            .bearer_auth(&self.admin_token)
            .header("content-type", "application/json")
            .body("{}")
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        matches!(resp, Ok(r) if r.status().as_u16() != 401)
    }

    /// SIGKILL (no graceful shutdown, no flush) and reap the child.
    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM (graceful shutdown); waits up to `timeout` for the process to exit and returns
    /// its exit status, or `None` if it is still running (it is then killed on drop).
    pub async fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let pid = self.child.as_ref()?.id();
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .expect("run kill -TERM");
        assert!(status.success(), "kill -TERM {pid}");
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(st)) = child.try_wait() {
                    self.child = None;
                    return Some(st);
                }
            }
            if tokio::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts the server again on the same port and database file.
    pub async fn restart(&mut self) {
        self.kill_hard();
        self.spawn().await;
    }

    /// Whether the child process is still alive.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Runs `switchboard <args…>` (e.g. an admin command) and returns (exit ok, stdout, stderr).
    pub async fn run_cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = tokio::process::Command::new(&self.bin)
            .args(args)
            .env("RUST_LOG", "warn")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .await
            .expect("run switchboard CLI");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `switchboard admin events prune --workspace <id> --keep-latest <n> --database <db>`.
    pub async fn prune_keep_latest(&self, keep: u64) {
        let keep = keep.to_string();
        let db = self.db_url();
        let (ok, stdout, stderr) = self
            .run_cli(&[
                "admin",
                "events",
                "prune",
                "--workspace",
                &self.app.id,
                "--keep-latest",
                &keep,
                "--database",
                &db,
            ])
            .await;
        assert!(
            ok,
            "admin events prune failed\nstdout: {stdout}\nstderr: {stderr}"
        );
    }

    // ---------------------------------------------------------------- plain HTTP

    /// Unauthenticated GET of any path; returns (status, body text).
    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let resp = self
            .http
            .get(format!("{}{}", self.base_url(), path))
            .send()
            .await
            .expect("GET request");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("read body");
        (status, text)
    }

    /// Any request with an optional bearer, an optional raw body and content type.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        bearer: Option<&str>,
        content_type: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{}", self.base_url(), path));
        if let Some(t) = bearer {
            req = req.bearer_auth(t);
        }
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: request failed: {e}"));
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.expect("read response body");
        (
            status,
            parse_body(status, &bytes, &format!("{method} {path}")),
        )
    }

    // ---------------------------------------------------------------- signed server API

    /// A signed request with the bootstrap app's credentials.
    pub async fn signed(&self, method: Method, path: &str, body: Option<&Value>) -> (u16, Value) {
        self.signed_with(&self.app, method, path, body, SignOpts::default())
            .await
    }

    /// A signed request with explicit credentials and signing options.
    pub async fn signed_with(
        &self,
        creds: &AppCreds,
        method: Method,
        path: &str,
        body: Option<&Value>,
        opts: SignOpts,
    ) -> (u16, Value) {
        let body_bytes = match body {
            Some(v) => serde_json::to_vec(v).expect("serialize body"),
            None => Vec::new(),
        };
        let include_md5 = opts
            .include_body_md5
            .unwrap_or(method == Method::POST || !body_bytes.is_empty());
        let query = sign_query(
            creds,
            method.as_str(),
            path,
            &body_bytes,
            &opts.extra_query,
            now_secs() + opts.timestamp_offset,
            include_md5,
            opts.tamper_signature,
        );
        let url = format!("{}{}?{}", self.base_url(), path, query);
        let mut req = self.http.request(method.clone(), url);
        if body.is_some() {
            req = req
                .header("content-type", "application/json")
                .body(body_bytes);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("signed {method} {path}: request failed: {e}"));
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.expect("read response body");
        (
            status,
            parse_body(status, &bytes, &format!("signed {method} {path}")),
        )
    }

    /// `POST /apps/{appId}/entities {id, name, kind, role}` → 201 `{entity}`.
    pub async fn create_entity(&self, id: &str, name: &str, kind: &str, role: &str) -> Value {
        let path = format!("/apps/{}/entities", self.app.id);
        let (status, body) = self
            .signed(
                Method::POST,
                &path,
                Some(&json!({"id": id, "name": name, "kind": kind, "role": role})),
            )
            .await;
        assert_eq!(status, 201, "create entity {id}: {body}");
        assert_eq!(
            body["entity"]["id"],
            json!(id),
            "create entity {id}: {body}"
        );
        body["entity"].clone()
    }

    /// Deactivates an entity: `DELETE /apps/{appId}/entities/{id}`.
    pub async fn delete_entity(&self, id: &str) -> (u16, Value) {
        let path = format!("/apps/{}/entities/{}", self.app.id, id);
        self.signed(Method::DELETE, &path, None).await
    }

    /// A token minted locally with the jsonwebtoken crate (HS256, kid = app key,
    /// sub/iat/exp = now + 3600).
    pub fn token_for(&self, entity_id: &str) -> String {
        let now = now_secs();
        mint_token(
            &self.app.key,
            &self.app.secret,
            &json!({"sub": entity_id, "iat": now, "exp": now + 3600}),
        )
    }

    /// A token from `POST /apps/{appId}/tokens {entity_id}` → 201 `{token, expires_at}`.
    pub async fn api_token(&self, entity_id: &str) -> String {
        let path = format!("/apps/{}/tokens", self.app.id);
        let (status, body) = self
            .signed(Method::POST, &path, Some(&json!({"entity_id": entity_id})))
            .await;
        assert_eq!(status, 201, "mint token for {entity_id}: {body}");
        assert!(
            body["expires_at"].is_string() || body["expires_at"].is_number(),
            "token response carries expires_at: {body}"
        );
        body["token"]
            .as_str()
            .unwrap_or_else(|| panic!("token response has a string token: {body}"))
            .to_owned()
    }

    /// A chat-API client for `token`.
    pub fn client(&self, entity_id: &str, token: &str) -> ApiClient {
        ApiClient {
            http: self.http.clone(),
            base: self.base_url(),
            token: token.to_owned(),
            id: entity_id.to_owned(),
        }
    }

    /// Creates an entity (name = id) and returns a client with a locally minted token.
    pub async fn user(&self, id: &str, kind: &str, role: &str) -> ApiClient {
        self.create_entity(id, id, kind, role).await;
        self.client(id, &self.token_for(id))
    }

    /// `POST /admin/workspaces` with the operator token; returns the new workspace's creds.
    pub async fn create_workspace(&self, name: &str) -> AppCreds {
        let (status, body) = self
            .raw(
                Method::POST,
                "/admin/workspaces",
                Some(&self.admin_token),
                Some("application/json"),
                Some(serde_json::to_vec(&json!({"name": name})).expect("serialize workspace body")),
            )
            .await;
        assert_eq!(status, 201, "create workspace: {body}");
        let ws = &body["workspace"];
        let s = |k: &str| -> String {
            match &ws[k] {
                Value::String(s) => s.clone(),
                other => panic!("workspace.{k} is a string: {other} in {body}"),
            }
        };
        assert_eq!(ws["name"], json!(name), "workspace name echoed: {body}");
        AppCreds {
            id: s("id"),
            key: s("key"),
            secret: s("secret"),
        }
    }

    // ---------------------------------------------------------------- WebSocket

    /// Connects to `/api/realtime/ws` with a bearer token (and an optional `after_cursor`) and
    /// reads the `realtime.ready` frame.
    pub async fn ws(&self, token: &str, after_cursor: Option<&str>) -> WsClient {
        let mut ws = self
            .ws_connect(WsOpts {
                token: Some(token.to_owned()),
                after_cursor: after_cursor.map(str::to_owned),
                ..WsOpts::default()
            })
            .await
            .unwrap_or_else(|e| panic!("websocket connect refused: {e:?}"));
        ws.read_ready().await;
        ws
    }

    /// Connects without reading anything; returns the HTTP status on a refused upgrade.
    pub async fn ws_connect(&self, opts: WsOpts) -> Result<WsClient, WsConnectError> {
        let mut url = format!(
            "ws://{}{}",
            self.addr(),
            opts.path.as_deref().unwrap_or("/api/realtime/ws")
        );
        let mut params: Vec<String> = Vec::new();
        if let Some(c) = &opts.after_cursor {
            params.push(format!("after_cursor={}", urlencode(c)));
        }
        if let Some(w) = &opts.workspace_id {
            params.push(format!("workspace_id={}", urlencode(w)));
        }
        if !params.is_empty() {
            url.push(if url.contains('?') { '&' } else { '?' });
            url.push_str(&params.join("&"));
        }
        let mut req = url
            .as_str()
            .into_client_request()
            .expect("build websocket request");
        if let Some(t) = &opts.token {
            req.headers_mut().insert(
                "authorization",
                HeaderValue::from_str(&format!("Bearer {t}")).expect("header value"),
            );
        }
        if let Some(o) = &opts.origin {
            req.headers_mut().insert(
                "origin",
                HeaderValue::from_str(o).expect("origin header value"),
            );
        }
        let socket = tokio::net::TcpSocket::new_v4().expect("tcp socket");
        if let Some(n) = opts.recv_buffer {
            socket.set_recv_buffer_size(n).expect("set SO_RCVBUF");
        }
        let addr = self.addr().parse().expect("socket addr");
        let stream = socket
            .connect(addr)
            .await
            .map_err(|e| WsConnectError::Other(format!("tcp connect: {e}")))?;
        match tokio_tungstenite::client_async(req, stream).await {
            Ok((stream, _resp)) => Ok(WsClient {
                stream,
                ready_cursor: None,
            }),
            Err(tungstenite::Error::Http(resp)) => {
                let status = resp.status().as_u16();
                let body = resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                Err(WsConnectError::Http(status, body))
            }
            Err(e) => Err(WsConnectError::Other(e.to_string())),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- switchboard log tail ({}) ----\n{}\n----",
                self.addr(),
                self.log_tail()
            );
        }
        self.kill_hard();
    }
}

/// Options for a signed server-API request (negative tests bend them).
#[derive(Clone, Debug, Default)]
pub struct SignOpts {
    /// Seconds added to `auth_timestamp`.
    pub timestamp_offset: i64,
    /// `Some(false)` omits `body_md5`; default: present on POST or with a body.
    pub include_body_md5: Option<bool>,
    /// Flip the signature's first hex digit.
    pub tamper_signature: bool,
    /// Extra query parameters (signed too).
    pub extra_query: Vec<(String, String)>,
}

/// Builds the signed query string (SPEC §5) including `auth_signature`.
#[allow(clippy::too_many_arguments)]
pub fn sign_query(
    creds: &AppCreds,
    method: &str,
    path: &str,
    body: &[u8],
    extra: &[(String, String)],
    timestamp: i64,
    include_body_md5: bool,
    tamper: bool,
) -> String {
    let mut params: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in extra {
        params.insert(k.to_lowercase(), v.clone());
    }
    params.insert("auth_key".into(), creds.key.clone());
    params.insert("auth_timestamp".into(), timestamp.to_string());
    params.insert("auth_version".into(), "1.0".into());
    if include_body_md5 {
        params.insert("body_md5".into(), hex::encode(Md5::digest(body)));
    }
    let qs = params
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let to_sign = format!("{}\n{}\n{}", method.to_uppercase(), path, qs);
    let mut mac = HmacSha256::new_from_slice(creds.secret.as_bytes()).expect("hmac key");
    mac.update(to_sign.as_bytes());
    let mut sig = hex::encode(mac.finalize().into_bytes());
    if tamper {
        let first = if sig.starts_with('0') { "1" } else { "0" };
        sig.replace_range(0..1, first);
    }
    format!("{qs}&auth_signature={sig}")
}

/// Mints an HS256 JWT with header `kid` and arbitrary claims.
pub fn mint_token(kid: &str, secret: &str, claims: &Value) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(
        &header,
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode jwt")
}

/// Minimal percent-encoding for query values.
pub fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

// -------------------------------------------------------------------- chat API client

/// A chat-API client (`/api/...`) carrying one entity's bearer token.
#[derive(Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    pub token: String,
    pub id: String,
}

impl ApiClient {
    pub async fn request(&self, method: Method, path: &str, body: Option<&Value>) -> (u16, Value) {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{}", self.base, path))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{} {method} {path}: request failed: {e}", self.id));
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.expect("read response body");
        (
            status,
            parse_body(status, &bytes, &format!("{} {method} {path}", self.id)),
        )
    }

    /// Like [`ApiClient::request`] but a transport error (e.g. the server was killed) is an
    /// `Err` instead of a panic.
    pub async fn try_request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), String> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{}", self.base, path))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|e| e.to_string())?;
        Ok((
            status,
            parse_body(status, &bytes, &format!("{} {method} {path}", self.id)),
        ))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.request(Method::GET, path, None).await
    }

    /// POSTs with a `Prefer` header (RFC 7240); answers the status, the
    /// `Preference-Applied` header if any, and the body.
    pub async fn post_preferring(
        &self,
        path: &str,
        body: &Value,
        prefer: &str,
    ) -> (u16, Option<String>, Value) {
        let resp = self
            .http
            .post(format!("{}{}", self.base, path))
            .bearer_auth(&self.token)
            .header("prefer", prefer)
            .json(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{} POST {path}: {e}", self.id));
        let status = resp.status().as_u16();
        let applied = resp
            .headers()
            .get("preference-applied")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = resp
            .bytes()
            .await
            .unwrap_or_else(|e| panic!("{} POST {path}: {e}", self.id));
        let body = parse_body(status, &bytes, &format!("{} POST {path}", self.id));
        (status, applied, body)
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.request(Method::POST, path, Some(body)).await
    }

    pub async fn patch(&self, path: &str, body: &Value) -> (u16, Value) {
        self.request(Method::PATCH, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.request(Method::DELETE, path, None).await
    }

    /// A request with a raw body and explicit content type (or none).
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{}", self.base, path))
            .bearer_auth(&self.token)
            .body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{} {method} {path}: request failed: {e}", self.id));
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.expect("read response body");
        (
            status,
            parse_body(status, &bytes, &format!("{} raw {method} {path}", self.id)),
        )
    }

    // ---- domain conveniences (each asserts its success shape)

    /// `POST /api/channels` with `{name, members}` merged with `extra`; expects 201 `{channel}`.
    pub async fn create_group(&self, name: &str, members: &[&str], extra: Value) -> Value {
        let mut body = json!({"name": name, "members": members});
        if let (Some(obj), Value::Object(more)) = (body.as_object_mut(), extra) {
            for (k, v) in more {
                obj.insert(k, v);
            }
        }
        let (status, resp) = self.post("/api/channels", &body).await;
        assert_eq!(status, 201, "create channel {name}: {resp}");
        assert_eq!(resp["channel"]["name"], json!(name), "{resp}");
        resp["channel"].clone()
    }

    /// `POST /api/direct-channels {entity_id}`; expects 200 or 201 `{channel}`.
    pub async fn direct(&self, other: &str) -> Value {
        let (status, resp) = self
            .post("/api/direct-channels", &json!({"entity_id": other}))
            .await;
        assert!(
            status == 200 || status == 201,
            "direct channel with {other}: {status} {resp}"
        );
        resp["channel"].clone()
    }

    /// Posts a message; expects 201 `{message, event}` and returns the whole body.
    pub async fn post_message(&self, channel_id: &str, body: &Value) -> Value {
        let (status, resp) = self
            .post(&format!("/api/channels/{channel_id}/messages"), body)
            .await;
        assert_eq!(status, 201, "post message in {channel_id}: {resp}");
        assert!(resp["message"].is_object(), "{resp}");
        assert!(resp["event"].is_object(), "{resp}");
        resp
    }

    /// Posts `{"data": text}`; returns the whole `{message, event}` body.
    pub async fn say(&self, channel_id: &str, text: &str) -> Value {
        self.post_message(channel_id, &json!({"data": text})).await
    }

    /// `GET /api/channels/{id}` → the channel object (expects 200).
    pub async fn channel(&self, channel_id: &str) -> Value {
        let (status, resp) = self.get(&format!("/api/channels/{channel_id}")).await;
        assert_eq!(status, 200, "get channel {channel_id}: {resp}");
        resp["channel"].clone()
    }

    /// All of `GET /api/channels` (follows next_cursor).
    pub async fn channels(&self) -> Vec<Value> {
        let mut out = Vec::new();
        let mut path = "/api/channels?limit=200".to_owned();
        for _ in 0..100 {
            let (status, resp) = self.get(&path).await;
            assert_eq!(status, 200, "list channels: {resp}");
            let page = resp["channels"]
                .as_array()
                .unwrap_or_else(|| panic!("channels is an array: {resp}"))
                .clone();
            let done = page.is_empty();
            out.extend(page);
            match &resp["next_cursor"] {
                Value::Null => break,
                c if !done => {
                    path = format!(
                        "/api/channels?limit=200&cursor={}",
                        urlencode(&cursor_str(c))
                    )
                }
                _ => break,
            }
        }
        out
    }

    /// Root messages of a channel, oldest first (`after_seq=0`, follows pages by seq).
    pub async fn messages(&self, channel_id: &str) -> Vec<Value> {
        let mut out: Vec<Value> = Vec::new();
        let mut after = 0i64;
        for _ in 0..1000 {
            let (status, resp) = self
                .get(&format!(
                    "/api/channels/{channel_id}/messages?after_seq={after}&limit=200"
                ))
                .await;
            assert_eq!(status, 200, "list messages of {channel_id}: {resp}");
            let page = resp["messages"]
                .as_array()
                .unwrap_or_else(|| panic!("messages is an array: {resp}"))
                .clone();
            if page.is_empty() {
                break;
            }
            let last = page
                .iter()
                .filter_map(|m| m["history_serial"].as_i64())
                .max()
                .unwrap_or_else(|| panic!("messages carry history_serial: {resp}"));
            assert!(last > after, "paging by after_seq makes progress: {resp}");
            after = last;
            out.extend(page);
        }
        out
    }

    /// One page of `GET /api/realtime/events`.
    pub async fn events_page(&self, after: Option<&str>, limit: u32) -> (u16, Value) {
        let path = match after {
            Some(c) => format!(
                "/api/realtime/events?after_cursor={}&limit={limit}",
                urlencode(c)
            ),
            None => format!("/api/realtime/events?limit={limit}"),
        };
        self.get(&path).await
    }

    /// Every durable event visible to this caller after `after` (None: from the start).
    pub async fn pull_all(&self, after: Option<&str>) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor = after.map(str::to_owned);
        for _ in 0..10_000 {
            let (status, resp) = self.events_page(cursor.as_deref(), 500).await;
            assert_eq!(status, 200, "pull events after {cursor:?}: {resp}");
            let page = resp["events"]
                .as_array()
                .unwrap_or_else(|| panic!("events is an array: {resp}"))
                .clone();
            assert!(
                !resp["next_cursor"].is_null(),
                "next_cursor is never null: {resp}"
            );
            if page.is_empty() {
                break;
            }
            cursor = Some(cursor_str(&resp["next_cursor"]));
            out.extend(page);
        }
        out
    }
}

/// `v` as a string; panics naming `what` otherwise.
pub fn str_of(v: &Value, what: &str) -> String {
    v.as_str()
        .unwrap_or_else(|| panic!("{what} is a string: {v}"))
        .to_owned()
}

/// `v` as an integer; panics naming `what` otherwise.
pub fn i64_of(v: &Value, what: &str) -> i64 {
    v.as_i64()
        .unwrap_or_else(|| panic!("{what} is an integer: {v}"))
}

/// A cursor as a string (cursors are opaque; accept a JSON string or number).
pub fn cursor_str(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => panic!("cursor is a string or number, got {other}"),
    }
}

/// Asserts SPEC §8's envelope: exactly `{error, code, status}`, with the given status/code.
pub fn assert_error(resp: &(u16, Value), status: u16, code: &str) {
    let (got, body) = resp;
    assert_eq!(
        (*got, body["code"].as_str()),
        (status, Some(code)),
        "expected {status} {code}, got {got} {body}"
    );
    let obj = body
        .as_object()
        .unwrap_or_else(|| panic!("error body is an object: {body}"));
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        vec!["code", "error", "status"],
        "error body is exactly the envelope: {body}"
    );
    assert_eq!(body["status"], json!(status), "envelope status: {body}");
    assert!(
        body["error"].as_str().is_some_and(|s| !s.is_empty()),
        "envelope error sentence: {body}"
    );
}

/// The ids (strings) of a JSON array of strings or of objects with `id`.
pub fn ids(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected an array, got {v}"))
        .iter()
        .map(|x| match x {
            Value::String(s) => s.clone(),
            Value::Object(o) => match o.get("id").or_else(|| o.get("entity_id")) {
                Some(Value::String(s)) => s.clone(),
                _ => panic!("array element has an id: {x}"),
            },
            _ => panic!("array element is a string or object: {x}"),
        })
        .collect()
}

// -------------------------------------------------------------------- WebSocket client

#[derive(Clone, Debug, Default)]
pub struct WsOpts {
    pub token: Option<String>,
    pub after_cursor: Option<String>,
    pub workspace_id: Option<String>,
    pub origin: Option<String>,
    /// SO_RCVBUF for the client socket (to make a slow reader).
    pub recv_buffer: Option<u32>,
    /// Another endpoint than `/api/realtime/ws` (path and query), e.g. `/app/KEY?protocol=7`.
    pub path: Option<String>,
}

#[derive(Debug)]
pub enum WsConnectError {
    /// The upgrade was refused with this HTTP status (and body).
    Http(u16, String),
    Other(String),
}

/// One thing read from a socket.
#[derive(Debug)]
pub enum Frame {
    Json(Value),
    /// Closed: `Some(code)` with a close frame, `None` on EOF / reset without one.
    Closed(Option<u16>),
    Timeout,
}

/// What [`WsClient::read_for`] saw.
#[derive(Debug, Default)]
pub struct ReadTally {
    pub pings: usize,
    pub texts: usize,
    /// `Some(code)` once closed (`Some(None)`: without a close frame).
    pub closed: Option<Option<u16>>,
}

pub struct WsClient {
    stream: WebSocketStream<TcpStream>,
    /// The cursor of the `realtime.ready` frame, once read.
    pub ready_cursor: Option<String>,
}

impl WsClient {
    /// Reads the next JSON text frame, a close, or times out.
    pub async fn next_frame(&mut self, timeout: Duration) -> Frame {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = tokio::time::timeout_at(deadline, self.stream.next()).await;
            match next {
                Err(_) => return Frame::Timeout,
                Ok(None) => return Frame::Closed(None),
                Ok(Some(Err(_))) => return Frame::Closed(None),
                Ok(Some(Ok(msg))) => match msg {
                    Message::Text(t) => {
                        let v: Value = serde_json::from_str(t.as_str()).unwrap_or_else(|e| {
                            panic!("websocket text frame is JSON ({e}): {}", t.as_str())
                        });
                        return Frame::Json(v);
                    }
                    Message::Close(frame) => {
                        return Frame::Closed(frame.map(|f: CloseFrame| u16::from(f.code)))
                    }
                    Message::Binary(b) => panic!("unexpected binary frame of {} bytes", b.len()),
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
                },
            }
        }
    }

    /// Reads everything that arrives for `window` (answering pings, as any client does) and
    /// counts it; stops early if the socket closes.
    pub async fn read_for(&mut self, window: Duration) -> ReadTally {
        let deadline = tokio::time::Instant::now() + window;
        let mut tally = ReadTally::default();
        loop {
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return tally,
                Ok(None) | Ok(Some(Err(_))) => {
                    tally.closed = Some(None);
                    return tally;
                }
                Ok(Some(Ok(Message::Close(frame)))) => {
                    tally.closed = Some(frame.map(|f: CloseFrame| u16::from(f.code)));
                    return tally;
                }
                Ok(Some(Ok(Message::Ping(_)))) => tally.pings += 1,
                Ok(Some(Ok(Message::Text(_)))) => tally.texts += 1,
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// Reads the next JSON frame; panics on close or timeout.
    pub async fn next_json(&mut self, timeout: Duration) -> Value {
        match self.next_frame(timeout).await {
            Frame::Json(v) => v,
            other => panic!("expected a JSON frame, got {other:?}"),
        }
    }

    /// Reads the first frame, which must be `{"type":"realtime.ready","cursor":…}`.
    pub async fn read_ready(&mut self) -> String {
        let v = self.next_json(FRAME_TIMEOUT).await;
        assert_eq!(v["type"], json!("realtime.ready"), "first frame: {v}");
        let c = cursor_str(&v["cursor"]);
        self.ready_cursor = Some(c.clone());
        c
    }

    /// Reads until the socket closes; returns the JSON frames read before it and the code.
    /// Panics on timeout.
    pub async fn read_until_close(&mut self, timeout: Duration) -> (Vec<Value>, Option<u16>) {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut frames = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_frame(left).await {
                Frame::Json(v) => frames.push(v),
                Frame::Closed(code) => return (frames, code),
                Frame::Timeout => panic!(
                    "socket still open after {timeout:?}; read {} frames, last: {:?}",
                    frames.len(),
                    frames.last()
                ),
            }
        }
    }

    /// Reads frames until `pred` matches one (inclusive); panics on close or timeout.
    pub async fn collect_until<F: FnMut(&Value) -> bool>(
        &mut self,
        timeout: Duration,
        mut pred: F,
    ) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut frames = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_frame(left).await {
                Frame::Json(v) => {
                    let stop = pred(&v);
                    frames.push(v);
                    if stop {
                        return frames;
                    }
                }
                other => panic!(
                    "while waiting for a frame: {other:?} after {} frames; last: {:?}",
                    frames.len(),
                    frames.last()
                ),
            }
        }
    }

    /// Collects every frame that arrives within `window` (the socket must stay open).
    pub async fn drain(&mut self, window: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + window;
        let mut frames = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_frame(left).await {
                Frame::Json(v) => frames.push(v),
                Frame::Timeout => return frames,
                Frame::Closed(code) => panic!(
                    "socket closed ({code:?}) while draining after {} frames",
                    frames.len()
                ),
            }
        }
    }

    /// Sends a close frame (best effort).
    pub async fn close(mut self) {
        let _ = self.stream.close(None).await;
    }

    /// Sends any frame (binary, ping, close …).
    pub async fn send_message(&mut self, msg: Message) {
        self.stream.send(msg).await.expect("send frame");
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: &str) {
        self.stream
            .send(Message::Text(text.into()))
            .await
            .expect("send text frame");
    }
}

/// Events of a type among frames.
pub fn of_type<'a>(frames: &'a [Value], ty: &str) -> Vec<&'a Value> {
    frames.iter().filter(|f| f["type"] == json!(ty)).collect()
}

/// Numeric value of a decimal-digit cursor, if it is one (this implementation's cursors are;
/// the contract only promises opaque strings, so use it only as a secondary check).
pub fn cursor_num(c: &str) -> Option<u128> {
    if !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()) {
        c.parse().ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked example of Pusher's HTTP API reference.
    #[test]
    fn signature_matches_pusher_reference_example() {
        let creds = AppCreds {
            id: "3".into(),
            key: "278d425bdf160c739803".into(),
            secret: "7ad3773142a6692b25b8".into(),
        };
        let body = br#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        let q = sign_query(
            &creds,
            "POST",
            "/apps/3/events",
            body,
            &[],
            1353088179,
            true,
            false,
        );
        assert_eq!(
            q,
            "auth_key=278d425bdf160c739803&auth_timestamp=1353088179&auth_version=1.0\
             &body_md5=ec365a775a4cd0599faeb73354201b6f\
             &auth_signature=da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
        );
    }

    #[test]
    fn locally_minted_token_has_kid_and_claims() {
        let t = mint_token("k", "s", &json!({"sub": "a", "iat": 1, "exp": 2}));
        let header = jsonwebtoken::decode_header(&t).expect("header");
        assert_eq!(header.kid.as_deref(), Some("k"));
        assert_eq!(header.alg, jsonwebtoken::Algorithm::HS256);
    }
}
