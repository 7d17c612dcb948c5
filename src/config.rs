//! Configuration: defaults, then an optional TOML-like `key = value` file, then
//! `SWITCHBOARD_*` environment variables, then command-line flags.

use std::collections::HashMap;
use std::time::Duration;

use switchboard_actors::pusher::session::PusherConfig;
use switchboard_actors::session::SessionConfig;

#[derive(Debug, Clone)]
pub struct Config {
    pub bind: String,
    pub database: String,
    /// Fan-out between nodes: `local` (one node) or `redis://host:port[/db]` (cluster mode).
    pub broker: String,
    pub bootstrap_app: Option<String>,
    pub admin_token: Option<String>,
    /// Browser origins admitted on `/api` (CORS) and the realtime WebSocket, for every
    /// workspace; a workspace's own `allowed_origins` setting adds to it.
    pub allowed_origins: Vec<String>,
    pub session: SessionConfig,
    /// The Pusher face's timeouts; its queue and replay budget follow `realtime.*`.
    pub pusher: PusherConfig,
    pub workers: usize,
    /// How long an idle HTTP/1.1 keep-alive connection stays open (`None`: closed after each
    /// answer). Longer than a load balancer's idle timeout (60 s on common ones), so the
    /// balancer, not the server, closes an idle connection: a server closing one while a
    /// request is on its way fails that request.
    pub keep_alive: Option<Duration>,
    /// How often old message versions are purged (workspaces with a retention window).
    pub purge_interval: Duration,
    /// fsync on every commit (`full`, the default) or only at checkpoints (`normal`).
    pub durability: switchboard_actors::store::Durability,
    /// Serves the echo WebSocket at `/test/echo` (`testing.echo_route`): only the Autobahn
    /// conformance test turns it on; otherwise the route does not exist.
    pub echo_route: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:6001".into(),
            database: "sqlite://data/switchboard.db".into(),
            broker: "local".into(),
            bootstrap_app: None,
            admin_token: None,
            allowed_origins: Vec::new(),
            session: SessionConfig::default(),
            pusher: PusherConfig::default(),
            workers: 2,
            keep_alive: Some(Duration::from_secs(75)),
            purge_interval: Duration::from_secs(60),
            durability: Default::default(),
            echo_route: false,
        }
    }
}

/// Settings read from a file or the environment, by their file key.
const KEYS: &[(&str, &str)] = &[
    ("bind", "SWITCHBOARD_BIND"),
    ("database", "SWITCHBOARD_DATABASE"),
    ("broker", "SWITCHBOARD_BROKER"),
    ("bootstrap_app", "SWITCHBOARD_BOOTSTRAP_APP"),
    ("admin_token", "SWITCHBOARD_ADMIN_TOKEN"),
    ("allowed_origins", "SWITCHBOARD_ALLOWED_ORIGINS"),
    ("realtime.max_replay", "SWITCHBOARD_REALTIME_MAX_REPLAY"),
    (
        "realtime.session_queue",
        "SWITCHBOARD_REALTIME_SESSION_QUEUE",
    ),
    (
        "realtime.heartbeat_seconds",
        "SWITCHBOARD_REALTIME_HEARTBEAT_SECONDS",
    ),
    (
        "pusher.activity_timeout_seconds",
        "SWITCHBOARD_PUSHER_ACTIVITY_TIMEOUT_SECONDS",
    ),
    (
        "pusher.pong_timeout_seconds",
        "SWITCHBOARD_PUSHER_PONG_TIMEOUT_SECONDS",
    ),
    ("workers", "SWITCHBOARD_WORKERS"),
    (
        "http.keep_alive_seconds",
        "SWITCHBOARD_HTTP_KEEP_ALIVE_SECONDS",
    ),
    ("durability", "SWITCHBOARD_DURABILITY"),
    (
        "versioned_messages.purge_interval_seconds",
        "SWITCHBOARD_VERSIONED_MESSAGES_PURGE_INTERVAL_SECONDS",
    ),
    ("testing.echo_route", "SWITCHBOARD_TESTING_ECHO_ROUTE"),
];

impl Config {
    /// Loads the file (if any) and the environment over the defaults.
    pub fn load(file: Option<&str>) -> Result<Self, String> {
        let mut values: HashMap<String, String> = HashMap::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read config {path}: {e}"))?;
            values.extend(parse_file(&text)?);
        }
        for (key, env) in KEYS {
            if let Ok(v) = std::env::var(env) {
                values.insert((*key).to_string(), v);
            }
        }
        let mut c = Config::default();
        for (k, v) in values {
            c.set(&k, &v)?;
        }
        Ok(c)
    }

    fn set(&mut self, key: &str, v: &str) -> Result<(), String> {
        let num = |v: &str| {
            v.parse::<i64>()
                .map_err(|_| format!("{key} must be a number"))
        };
        match key {
            "bind" => self.bind = v.into(),
            "database" => {
                // sqlite://path (or a bare path) or postgres://… (cluster mode).
                switchboard_actors::store::DatabaseUrl::parse(v)?;
                self.database = v.into()
            }
            "broker" => self.broker = parse_broker(v)?,
            "bootstrap_app" => {
                self.bootstrap_app = Some(v.into()).filter(|s: &String| !s.is_empty())
            }
            "admin_token" => self.admin_token = Some(v.into()).filter(|s: &String| !s.is_empty()),
            "allowed_origins" => {
                self.allowed_origins = v
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            }
            "realtime.max_replay" => self.session.max_replay = num(v)?.max(0),
            "realtime.session_queue" => self.session.queue = num(v)?.clamp(1, 1 << 20) as usize,
            "realtime.heartbeat_seconds" => {
                let s = num(v)?.clamp(1, 3600) as u64;
                self.session.heartbeat = Duration::from_secs(s);
                self.session.client_timeout = Duration::from_secs(s * 3);
            }
            "pusher.activity_timeout_seconds" => {
                self.pusher.activity_timeout = Duration::from_secs(num(v)?.clamp(1, 3600) as u64)
            }
            "pusher.pong_timeout_seconds" => {
                self.pusher.pong_timeout = Duration::from_secs(num(v)?.clamp(1, 600) as u64)
            }
            "workers" => self.workers = num(v)?.clamp(1, 64) as usize,
            "http.keep_alive_seconds" => {
                self.keep_alive = match num(v)?.clamp(0, 3600) as u64 {
                    0 => None,
                    s => Some(Duration::from_secs(s)),
                }
            }
            "durability" => self.durability = switchboard_actors::store::Durability::parse(v)?,
            "versioned_messages.purge_interval_seconds" => {
                self.purge_interval = Duration::from_secs(num(v)?.clamp(1, 86_400) as u64)
            }
            "testing.echo_route" => {
                self.echo_route = match v.trim().to_ascii_lowercase().as_str() {
                    "true" | "1" => true,
                    "false" | "0" | "" => false,
                    _ => return Err(format!("{key} must be true or false")),
                }
            }
            other => return Err(format!("unknown config key '{other}'")),
        }
        Ok(())
    }
}

/// `local` or a `redis://` URL (TLS is not built in).
pub fn parse_broker(v: &str) -> Result<String, String> {
    let v = v.trim();
    if v.is_empty() || v == "local" {
        Ok("local".into())
    } else if v.starts_with("redis://") && v.len() > "redis://".len() {
        Ok(v.to_string())
    } else {
        Err(format!(
            "broker must be local or redis://host:port, not '{v}'"
        ))
    }
}

/// `key = value` lines; `[section]` headers prefix keys; `#` comments; quotes optional.
fn parse_file(text: &str) -> Result<HashMap<String, String>, String> {
    let mut out = HashMap::new();
    let mut section = String::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.trim().to_string();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("config line {}: expected key = value", n + 1))?;
        let v = v.trim().trim_matches('"').to_string();
        let key = if section.is_empty() {
            k.trim().to_string()
        } else {
            format!("{section}.{}", k.trim())
        };
        out.insert(key, v);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_sections_become_dotted_keys() {
        let v = parse_file("bind = \"0.0.0.0:1\"\n[realtime]\nmax_replay = 10 # comment\n")
            .expect("parse");
        assert_eq!(v.get("bind").map(String::as_str), Some("0.0.0.0:1"));
        assert_eq!(v.get("realtime.max_replay").map(String::as_str), Some("10"));
        let mut c = Config::default();
        assert!(c.set("nope", "1").is_err());
    }

    #[test]
    fn keep_alive_defaults_past_load_balancer_idle_timeouts() {
        let mut c = Config::default();
        assert_eq!(c.keep_alive, Some(Duration::from_secs(75)));
        c.set("http.keep_alive_seconds", "5").expect("5");
        assert_eq!(c.keep_alive, Some(Duration::from_secs(5)));
        c.set("http.keep_alive_seconds", "0").expect("0");
        assert_eq!(c.keep_alive, None);
        c.set("http.keep_alive_seconds", "999999").expect("clamped");
        assert_eq!(c.keep_alive, Some(Duration::from_secs(3600)));
        assert!(c.set("http.keep_alive_seconds", "soon").is_err());
    }

    #[test]
    fn broker_is_local_unless_a_redis_url_is_given() {
        let mut c = Config::default();
        assert_eq!(c.broker, "local");
        c.set("broker", "redis://127.0.0.1:6379/0").expect("redis");
        assert_eq!(c.broker, "redis://127.0.0.1:6379/0");
        assert!(c.set("broker", "kafka://x").is_err());
        assert!(c.set("broker", "redis://").is_err());
        c.set("broker", "local").expect("local");
        assert_eq!(c.broker, "local");
    }

    #[test]
    fn database_selects_the_engine_by_url() {
        use switchboard_actors::store::DatabaseUrl;
        let mut c = Config::default();
        assert!(!DatabaseUrl::parse(&c.database)
            .expect("default")
            .is_postgres());
        c.set("database", "postgres://sb@db.internal:5432/switchboard")
            .expect("postgres");
        assert!(DatabaseUrl::parse(&c.database).expect("pg").is_postgres());
        assert!(c.set("database", "sqlite://").is_err());
    }

    #[test]
    fn durability_is_full_unless_asked() {
        use switchboard_actors::store::Durability;
        let mut c = Config::default();
        assert_eq!(c.durability, Durability::Full);
        c.set("durability", "normal").expect("normal");
        assert_eq!(c.durability, Durability::Normal);
        assert!(c.set("durability", "off").is_err());
    }

    #[test]
    fn echo_route_is_off_unless_asked() {
        let mut c = Config::default();
        assert!(!c.echo_route);
        c.set("testing.echo_route", "true").expect("true");
        assert!(c.echo_route);
        c.set("testing.echo_route", "false").expect("false");
        assert!(!c.echo_route);
        assert!(c.set("testing.echo_route", "yes please").is_err());
        let v = parse_file("[testing]\necho_route = true\n").expect("parse");
        assert_eq!(
            v.get("testing.echo_route").map(String::as_str),
            Some("true")
        );
        assert!(KEYS.contains(&("testing.echo_route", "SWITCHBOARD_TESTING_ECHO_ROUTE")));
    }
}
