//! Pusher-style webhooks (`channel_occupied`, `channel_vacated`, `member_added`,
//! `member_removed`, `client_event`), delivered off the request path.
//!
//! Emitters hand events to a [`WebhookSink`] (a `try_send`, never blocking). The
//! [`WebhookDispatcher`] actor queues them per workspace and, every flush interval or as soon
//! as a batch is full, POSTs `{"time_ms", "events"}` to each configured webhook, signed with
//! `X-Pusher-Key` / `X-Pusher-Signature` (hex HMAC-SHA256 of the body with the app secret).
//! Workspace rows are read on the blocking pool and cached briefly; requests run as tasks with
//! retries and exponential backoff, so the actor only ever moves events between queues.
//!
//! Order: events of one workspace reach a webhook in emit order within a batch, and batches
//! are sent in order; a batch being retried can be overtaken by the next one (as with Pusher,
//! receivers order by `time_ms`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::settings::Webhook;
use crate::store::{queries, DbPool};

/// One webhook event of one workspace: an entry of Pusher's `events` array, with at least
/// `name` and `channel`.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct WebhookEvent {
    pub workspace_id: String,
    pub event: Value,
}

impl WebhookEvent {
    pub fn channel_occupied(workspace_id: impl Into<String>, channel: &str) -> Self {
        Self::new(
            workspace_id,
            json!({"name": "channel_occupied", "channel": channel}),
        )
    }

    pub fn channel_vacated(workspace_id: impl Into<String>, channel: &str) -> Self {
        Self::new(
            workspace_id,
            json!({"name": "channel_vacated", "channel": channel}),
        )
    }

    pub fn member_added(workspace_id: impl Into<String>, channel: &str, user_id: &str) -> Self {
        Self::new(
            workspace_id,
            json!({"name": "member_added", "channel": channel, "user_id": user_id}),
        )
    }

    pub fn member_removed(workspace_id: impl Into<String>, channel: &str, user_id: &str) -> Self {
        Self::new(
            workspace_id,
            json!({"name": "member_removed", "channel": channel, "user_id": user_id}),
        )
    }

    /// `data` is the event's data as the client sent it, a string (Pusher sends it as is);
    /// `user_id` is set on presence channels.
    pub fn client_event(
        workspace_id: impl Into<String>,
        channel: &str,
        event: &str,
        data: &str,
        socket_id: &str,
        user_id: Option<&str>,
    ) -> Self {
        let mut body = json!({
            "name": "client_event",
            "channel": channel,
            "event": event,
            "data": data,
            "socket_id": socket_id,
        });
        if let (Some(user_id), Value::Object(map)) = (user_id, &mut body) {
            map.insert("user_id".into(), Value::String(user_id.into()));
        }
        Self::new(workspace_id, body)
    }

    pub fn new(workspace_id: impl Into<String>, event: Value) -> Self {
        Self {
            workspace_id: workspace_id.into(),
            event,
        }
    }
}

fn event_name(event: &Value) -> &str {
    event.get("name").and_then(Value::as_str).unwrap_or("")
}

/// How the dispatcher batches and retries.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// How often each workspace's queue is flushed.
    pub flush_interval: Duration,
    /// Events per request at most; a full batch is sent without waiting for the interval.
    pub max_batch: usize,
    /// Tries per request, the first included.
    pub attempts: u32,
    /// Wait before the second try; doubled before each later one.
    pub backoff: Duration,
    /// Connect and whole-request timeout of one try.
    pub request_timeout: Duration,
    /// Events of one workspace queued or in flight at most; more are dropped and counted.
    pub max_queued_per_workspace: usize,
    /// Requests open at once, all workspaces together.
    pub max_concurrent_requests: usize,
    /// How long a workspace's key, secret and webhooks are reused before being read again.
    pub settings_ttl: Duration,
    /// Events waiting for the actor at most; more are dropped and counted.
    pub mailbox_capacity: usize,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            flush_interval: Duration::from_millis(250),
            max_batch: 50,
            attempts: 4,
            backoff: Duration::from_secs(1),
            request_timeout: Duration::from_secs(5),
            max_queued_per_workspace: 10_000,
            max_concurrent_requests: 64,
            settings_ttl: Duration::from_secs(5),
            mailbox_capacity: 65_536,
        }
    }
}

/// Counts since start: requests answered 2xx, requests given up after the last try, events
/// dropped for a full queue or mailbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WebhookStats {
    pub delivered: u64,
    pub failed: u64,
    pub dropped: u64,
}

#[derive(Debug, Default)]
struct Counters {
    delivered: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
}

impl Counters {
    fn delivered(&self) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = crate::METRICS.get() {
            m.webhooks_delivered.inc();
        }
    }

    fn failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = crate::METRICS.get() {
            m.webhooks_failed.inc();
        }
    }

    /// Returns the total dropped so far.
    fn dropped(&self, n: u64) -> u64 {
        if let Some(m) = crate::METRICS.get() {
            m.webhooks_dropped.inc_by(n);
        }
        self.dropped.fetch_add(n, Ordering::Relaxed) + n
    }
}

/// The emitters' handle: cheap to clone, never blocks. [`WebhookSink::disabled`] drops
/// everything, for servers and tests without webhooks.
#[derive(Clone)]
pub struct WebhookSink {
    inner: Option<(Addr<WebhookDispatcher>, Arc<Counters>)>,
}

impl WebhookSink {
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    /// Queues `event` (one entry of Pusher's `events`) for `workspace_id`.
    pub fn emit(&self, workspace_id: impl Into<String>, event: Value) {
        self.send(WebhookEvent::new(workspace_id, event));
    }

    pub fn send(&self, event: WebhookEvent) {
        let Some((addr, counters)) = &self.inner else {
            return;
        };
        // A full mailbox means the dispatcher is behind: drop rather than slow the caller.
        if let Err(SendError::Full(ev)) = addr.try_send(event) {
            let total = counters.dropped(1);
            // Powers of two: a log line now and then, not one per event.
            if total.is_power_of_two() {
                log::warn!(
                    "webhooks: dispatcher mailbox full, dropped an event of workspace {} \
                     ({total} dropped in all)",
                    ev.workspace_id
                );
            }
        }
    }

    /// A workspace's settings changed (its webhooks, key or secret): the dispatcher forgets
    /// what it cached and reads them again before the next delivery, so a webhook added to
    /// an app with live traffic gets the very next events instead of losing those of the
    /// cache's lifetime. Call it after the change is committed.
    pub fn settings_changed(&self, workspace_id: impl Into<String>) {
        if let Some((addr, _)) = &self.inner {
            // A control message: past the mailbox bound, it must not be dropped.
            addr.do_send(SettingsChanged {
                workspace_id: workspace_id.into(),
            });
        }
    }

    /// Sends what is queued now and waits, up to `within`, until nothing is queued or in
    /// flight (graceful shutdown: the last occupancy and presence events still leave).
    pub async fn drain(&self, within: Duration) {
        let Some((addr, _)) = &self.inner else {
            return;
        };
        let deadline = Instant::now() + within;
        loop {
            match addr.send(Drain).await {
                Ok(0) | Err(_) => return,
                Ok(_) if Instant::now() >= deadline => return,
                Ok(_) => actix_web::rt::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    pub fn stats(&self) -> WebhookStats {
        match &self.inner {
            Some((_, c)) => WebhookStats {
                delivered: c.delivered.load(Ordering::Relaxed),
                failed: c.failed.load(Ordering::Relaxed),
                dropped: c.dropped.load(Ordering::Relaxed),
            },
            None => WebhookStats::default(),
        }
    }
}

/// What a workspace's webhooks need: its credentials and valid webhooks (none → `None`).
#[derive(Debug)]
struct Target {
    key: String,
    secret: String,
    webhooks: Vec<Webhook>,
}

struct Cached {
    at: Instant,
    target: Option<Arc<Target>>,
}

#[derive(Default)]
struct Queue {
    events: Vec<Value>,
    /// Events handed to delivery tasks and not yet done; counts toward the bound.
    in_flight: Arc<AtomicUsize>,
    /// Dropped since the last log line.
    dropped: u64,
}

/// The actor that batches, signs and delivers webhooks. See the module docs.
pub struct WebhookDispatcher {
    pool: DbPool,
    config: WebhookConfig,
    client: reqwest::Client,
    permits: Arc<Semaphore>,
    counters: Arc<Counters>,
    queues: HashMap<String, Queue>,
    targets: HashMap<String, Cached>,
    loading: HashSet<String>,
    /// Bumped by every [`SettingsChanged`]: a read that began before one is not cached.
    epoch: u64,
}

/// See [`WebhookSink::settings_changed`].
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct SettingsChanged {
    workspace_id: String,
}

impl WebhookDispatcher {
    /// Starts the dispatcher on the current arbiter (inside a running actix system) and
    /// returns the emitters' handle. Fails only if the HTTP client cannot be built.
    pub fn start(pool: DbPool, config: WebhookConfig) -> Result<WebhookSink, String> {
        let client = reqwest::Client::builder()
            .connect_timeout(config.request_timeout)
            .timeout(config.request_timeout)
            // A redirected POST is not a delivery: treat 3xx as a failure.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("switchboard-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the webhook HTTP client: {e}"))?;
        let counters = Arc::new(Counters::default());
        let actor = Self {
            pool,
            permits: Arc::new(Semaphore::new(config.max_concurrent_requests.max(1))),
            config,
            client,
            counters: counters.clone(),
            queues: HashMap::new(),
            targets: HashMap::new(),
            loading: HashSet::new(),
            epoch: 0,
        };
        let addr = actor.start();
        Ok(WebhookSink {
            inner: Some((addr, counters)),
        })
    }

    fn fresh(&self, workspace_id: &str) -> Option<Option<Arc<Target>>> {
        self.targets
            .get(workspace_id)
            .filter(|c| c.at.elapsed() <= self.config.settings_ttl)
            .map(|c| c.target.clone())
    }

    fn flush(&mut self, workspace_id: &str, ctx: &mut Context<Self>) {
        if self
            .queues
            .get(workspace_id)
            .is_none_or(|q| q.events.is_empty())
        {
            return;
        }
        match self.fresh(workspace_id) {
            Some(target) => self.dispatch(workspace_id, target),
            None => self.load(workspace_id.to_string(), ctx),
        }
    }

    /// Reads the workspace on the blocking pool; its queue waits meanwhile and is dispatched
    /// when the row arrives (on a read error it waits for the next tick's retry).
    fn load(&mut self, workspace_id: String, ctx: &mut Context<Self>) {
        if !self.loading.insert(workspace_id.clone()) {
            return;
        }
        let pool = self.pool.clone();
        let id = workspace_id.clone();
        let epoch = self.epoch;
        let read = async move {
            let conn_pool = pool.clone();
            pool.run_blocking(move || {
                let mut conn = conn_pool.get().map_err(|e| e.to_string())?;
                queries::workspace_by_id(&mut conn, &id).map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r)
        };
        ctx.spawn(read.into_actor(self).map(move |res, act, _| {
            act.loading.remove(&workspace_id);
            match res {
                Ok(row) => {
                    let target = row.and_then(|w| {
                        let webhooks = w.settings.webhook_targets();
                        (!webhooks.is_empty()).then(|| {
                            Arc::new(Target {
                                key: w.key,
                                secret: w.secret,
                                webhooks,
                            })
                        })
                    });
                    // Settings changed during the read: use it once, cache nothing.
                    if act.epoch == epoch {
                        act.targets.insert(
                            workspace_id.clone(),
                            Cached {
                                at: Instant::now(),
                                target: target.clone(),
                            },
                        );
                    }
                    act.dispatch(&workspace_id, target);
                }
                Err(e) => log::warn!("webhooks: cannot read workspace {workspace_id}: {e}"),
            }
        }));
    }

    /// Hands the workspace's queue, in batches, to delivery tasks (or drops it when the
    /// workspace has no webhook).
    fn dispatch(&mut self, workspace_id: &str, target: Option<Arc<Target>>) {
        let Some(queue) = self.queues.get_mut(workspace_id) else {
            return;
        };
        let events = std::mem::take(&mut queue.events);
        let Some(target) = target else {
            return;
        };
        let mut events = events.into_iter();
        loop {
            let batch: Vec<Value> = events.by_ref().take(self.config.max_batch.max(1)).collect();
            if batch.is_empty() {
                break;
            }
            queue.in_flight.fetch_add(batch.len(), Ordering::Relaxed);
            actix::spawn(deliver(
                Delivery {
                    client: self.client.clone(),
                    permits: self.permits.clone(),
                    counters: self.counters.clone(),
                    attempts: self.config.attempts.max(1),
                    backoff: self.config.backoff,
                    workspace_id: workspace_id.to_string(),
                    target: target.clone(),
                },
                batch,
                queue.in_flight.clone(),
            ));
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        let ids: Vec<String> = self.queues.keys().cloned().collect();
        for id in &ids {
            self.flush(id, ctx);
        }
        for (id, queue) in &mut self.queues {
            if queue.dropped > 0 {
                log::warn!(
                    "webhooks: queue of workspace {id} full ({} events), dropped {} events",
                    self.config.max_queued_per_workspace,
                    queue.dropped
                );
                queue.dropped = 0;
            }
        }
        self.queues
            .retain(|_, q| !q.events.is_empty() || q.in_flight.load(Ordering::Relaxed) > 0);
        let ttl = self.config.settings_ttl;
        self.targets.retain(|_, c| c.at.elapsed() <= ttl);
    }
}

impl Actor for WebhookDispatcher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.config.mailbox_capacity.max(1));
        ctx.run_interval(self.config.flush_interval, |act, ctx| act.tick(ctx));
    }
}

impl Handler<WebhookEvent> for WebhookDispatcher {
    type Result = ();

    fn handle(&mut self, msg: WebhookEvent, ctx: &mut Self::Context) {
        // Known to have no webhook: nothing to queue.
        if let Some(None) = self.fresh(&msg.workspace_id) {
            return;
        }
        let bound = self.config.max_queued_per_workspace;
        let queue = self.queues.entry(msg.workspace_id.clone()).or_default();
        if queue.events.len() + queue.in_flight.load(Ordering::Relaxed) >= bound {
            queue.dropped += 1;
            self.counters.dropped(1);
            return;
        }
        queue.events.push(msg.event);
        if queue.events.len() >= self.config.max_batch {
            self.flush(&msg.workspace_id, ctx);
        }
    }
}

/// Flushes every queue now; answers the events still queued, loading or in flight.
#[derive(Debug, Message)]
#[rtype(result = "usize")]
struct Drain;

impl Handler<Drain> for WebhookDispatcher {
    type Result = usize;

    fn handle(&mut self, _: Drain, ctx: &mut Self::Context) -> usize {
        let ids: Vec<String> = self.queues.keys().cloned().collect();
        for id in &ids {
            self.flush(id, ctx);
        }
        self.queues
            .values()
            .map(|q| q.events.len() + q.in_flight.load(Ordering::Relaxed))
            .sum::<usize>()
            + self.loading.len()
    }
}

impl Handler<SettingsChanged> for WebhookDispatcher {
    type Result = ();

    fn handle(&mut self, msg: SettingsChanged, _: &mut Self::Context) {
        self.targets.remove(&msg.workspace_id);
        self.epoch = self.epoch.wrapping_add(1);
    }
}

/// What one delivery task needs, all owned so the task outlives nothing.
struct Delivery {
    client: reqwest::Client,
    permits: Arc<Semaphore>,
    counters: Arc<Counters>,
    attempts: u32,
    backoff: Duration,
    workspace_id: String,
    target: Arc<Target>,
}

/// Sends one batch to every webhook of the workspace that wants some of its events.
async fn deliver(d: Delivery, batch: Vec<Value>, in_flight: Arc<AtomicUsize>) {
    let time_ms = chrono::Utc::now().timestamp_millis();
    let sends = d.target.webhooks.iter().filter_map(|hook| {
        let events: Vec<&Value> = batch.iter().filter(|e| hook.wants(event_name(e))).collect();
        if events.is_empty() {
            return None;
        }
        let body = json!({"time_ms": time_ms, "events": events}).to_string();
        Some(post(&d, hook, body, events.len()))
    });
    futures_util::future::join_all(sends).await;
    in_flight.fetch_sub(batch.len(), Ordering::Relaxed);
}

/// POSTs one signed body, retrying non-2xx answers and transport errors with backoff.
async fn post(d: &Delivery, hook: &Webhook, body: String, n_events: usize) {
    let signature = crate::auth::hmac_sha256_hex(&d.target.secret, &body);
    // Bytes: each try reuses the body without copying it.
    let body = bytes::Bytes::from(body);
    let mut last_error = String::new();
    for attempt in 0..d.attempts {
        if attempt > 0 {
            let wait = d.backoff.saturating_mul(1u32 << (attempt - 1).min(16));
            tokio::time::sleep(wait).await;
        }
        let outcome = {
            // Held for the request only, not the backoff.
            let _permit = d.permits.acquire().await.ok();
            d.client
                .post(&hook.url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header("X-Pusher-Key", &d.target.key)
                .header("X-Pusher-Signature", &signature)
                .body(body.clone())
                .send()
                .await
        };
        match outcome {
            Ok(resp) if resp.status().is_success() => {
                d.counters.delivered();
                return;
            }
            Ok(resp) => last_error = format!("answered {}", resp.status()),
            Err(e) => last_error = e.to_string(),
        }
        log::debug!(
            "webhooks: {} (workspace {}) try {}/{}: {last_error}",
            hook.url,
            d.workspace_id,
            attempt + 1,
            d.attempts
        );
    }
    d.counters.failed();
    log::warn!(
        "webhooks: gave up on {} (workspace {}) after {} tries ({last_error}); \
         dropped {n_events} events",
        hook.url,
        d.workspace_id,
        d.attempts
    );
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};

    use super::*;
    use crate::store::rows::WorkspaceRow;

    #[derive(Debug, Clone)]
    struct Received {
        path: String,
        key: Option<String>,
        signature: Option<String>,
        content_type: Option<String>,
        body: String,
    }

    impl Received {
        fn json(&self) -> Value {
            serde_json::from_str(&self.body).expect("json body")
        }

        fn events(&self) -> Value {
            self.json()["events"].clone()
        }
    }

    #[derive(Default)]
    struct Receiver {
        got: Mutex<Vec<Received>>,
        /// Statuses to answer, in order; 200 once used up.
        statuses: Mutex<VecDeque<u16>>,
    }

    impl Receiver {
        fn got(&self) -> Vec<Received> {
            self.got.lock().expect("lock").clone()
        }

        fn count(&self) -> usize {
            self.got.lock().expect("lock").len()
        }
    }

    async fn receive(
        req: HttpRequest,
        body: web::Bytes,
        state: web::Data<Receiver>,
    ) -> HttpResponse {
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        state.got.lock().expect("lock").push(Received {
            path: req.path().to_string(),
            key: header("X-Pusher-Key"),
            signature: header("X-Pusher-Signature"),
            content_type: header("Content-Type"),
            body: String::from_utf8(body.to_vec()).expect("utf-8 body"),
        });
        let status = state
            .statuses
            .lock()
            .expect("lock")
            .pop_front()
            .unwrap_or(200);
        HttpResponse::build(actix_web::http::StatusCode::from_u16(status).expect("status")).finish()
    }

    /// A local HTTP receiver that records every request; returns its base URL.
    fn receiver(statuses: &[u16]) -> (String, web::Data<Receiver>) {
        let state = web::Data::new(Receiver {
            got: Mutex::new(Vec::new()),
            statuses: Mutex::new(statuses.iter().copied().collect()),
        });
        let shared = state.clone();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(shared.clone())
                .default_service(web::to(receive))
        })
        .workers(1)
        .disable_signals()
        .bind(("127.0.0.1", 0))
        .expect("bind");
        let addr = server.addrs()[0];
        actix_web::rt::spawn(server.run());
        (format!("http://{addr}"), state)
    }

    /// A database holding workspaces `(id, settings)`, each with key `key-{id}` and secret
    /// `secret-{id}`.
    fn db(workspaces: &[(&str, Value)]) -> (tempfile::TempDir, DbPool) {
        let (dir, pool) = crate::store::test_pool(4);
        let mut conn = pool.get().expect("conn");
        for (id, settings) in workspaces {
            let row = WorkspaceRow {
                app_key: format!("key-{id}"),
                secret: format!("secret-{id}"),
                settings: settings.to_string(),
                ..WorkspaceRow::for_tests(id)
            };
            queries::insert_workspace(&mut conn, &row).expect("workspace");
        }
        (dir, pool)
    }

    fn fast() -> WebhookConfig {
        WebhookConfig {
            flush_interval: Duration::from_millis(20),
            backoff: Duration::from_millis(20),
            request_timeout: Duration::from_secs(2),
            settings_ttl: Duration::ZERO,
            ..WebhookConfig::default()
        }
    }

    async fn wait_for(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn hooks(list: Value) -> Value {
        json!({ "webhooks": list })
    }

    #[actix::test]
    async fn delivers_a_signed_batch_with_events_in_order() {
        let (base, rx) = receiver(&[]);
        let (_dir, pool) = db(&[("1", hooks(json!([{"url": format!("{base}/hook")}])))]);
        let sink = WebhookDispatcher::start(pool, fast()).expect("start");
        let before = chrono::Utc::now().timestamp_millis();
        sink.send(WebhookEvent::channel_occupied("1", "presence-x"));
        sink.send(WebhookEvent::member_added("1", "presence-x", "42"));
        sink.send(WebhookEvent::client_event(
            "1",
            "presence-x",
            "client-typing",
            "{\"a\":1}",
            "1.2",
            Some("42"),
        ));
        sink.emit("1", json!({"name": "channel_vacated", "channel": "c"}));
        wait_for("one request", || rx.count() == 1).await;
        let got = rx.got().remove(0);
        assert_eq!(got.path, "/hook");
        assert_eq!(got.key.as_deref(), Some("key-1"));
        assert_eq!(got.content_type.as_deref(), Some("application/json"));
        let expected_signature = crate::auth::hmac_sha256_hex("secret-1", &got.body);
        assert_eq!(got.signature.as_deref(), Some(expected_signature.as_str()));
        let body = got.json();
        let time_ms = body["time_ms"].as_i64().expect("time_ms");
        assert!(time_ms >= before && time_ms <= chrono::Utc::now().timestamp_millis());
        assert_eq!(
            body,
            json!({"time_ms": time_ms, "events": [
                {"name": "channel_occupied", "channel": "presence-x"},
                {"name": "member_added", "channel": "presence-x", "user_id": "42"},
                {"name": "client_event", "channel": "presence-x", "event": "client-typing",
                 "data": "{\"a\":1}", "socket_id": "1.2", "user_id": "42"},
                {"name": "channel_vacated", "channel": "c"},
            ]})
        );
        wait_for("delivered count", || sink.stats().delivered == 1).await;
        assert_eq!(sink.stats().failed, 0);
    }

    #[actix::test]
    async fn each_webhook_gets_only_its_event_types() {
        let (base, rx) = receiver(&[]);
        let (_dir, pool) = db(&[(
            "1",
            hooks(json!([
                {"url": format!("{base}/all")},
                {"url": format!("{base}/members"), "event_types": ["member_added", "member_removed"]},
                {"url": format!("{base}/occupied"), "event_types": ["channel_occupied"]},
            ])),
        )]);
        let sink = WebhookDispatcher::start(pool, fast()).expect("start");
        sink.send(WebhookEvent::member_added("1", "presence-a", "1"));
        sink.send(WebhookEvent::client_event(
            "1",
            "private-a",
            "client-x",
            "d",
            "1.1",
            None,
        ));
        sink.send(WebhookEvent::member_removed("1", "presence-a", "1"));
        sink.send(WebhookEvent::channel_vacated("1", "presence-a"));
        wait_for("two requests", || rx.count() >= 2).await;
        // Let a wrongly sent third request show up.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let got = rx.got();
        assert_eq!(
            got.len(),
            2,
            "no request for a webhook that wants none: {got:?}"
        );
        let by_path = |p: &str| {
            got.iter()
                .find(|r| r.path == p)
                .unwrap_or_else(|| panic!("no request to {p}"))
                .events()
        };
        let names = |events: Value| -> Vec<String> {
            events
                .as_array()
                .expect("events")
                .iter()
                .map(|e| e["name"].as_str().expect("name").to_string())
                .collect()
        };
        assert_eq!(
            names(by_path("/all")),
            [
                "member_added",
                "client_event",
                "member_removed",
                "channel_vacated"
            ]
        );
        assert_eq!(
            names(by_path("/members")),
            ["member_added", "member_removed"]
        );
        for r in &got {
            assert_eq!(
                r.signature.as_deref(),
                Some(crate::auth::hmac_sha256_hex("secret-1", &r.body).as_str())
            );
        }
    }

    #[actix::test]
    async fn a_failing_receiver_gets_the_same_batch_until_it_answers_2xx() {
        let (base, rx) = receiver(&[500, 500]);
        let (_dir, pool) = db(&[("1", hooks(json!([{"url": format!("{base}/hook")}])))]);
        let sink = WebhookDispatcher::start(pool, fast()).expect("start");
        sink.send(WebhookEvent::channel_occupied("1", "c"));
        wait_for("three tries", || rx.count() == 3).await;
        wait_for("delivered count", || sink.stats().delivered == 1).await;
        let got = rx.got();
        assert_eq!(got[0].body, got[1].body);
        assert_eq!(got[1].body, got[2].body);
        assert_eq!(
            got[2].events(),
            json!([{"name": "channel_occupied", "channel": "c"}])
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(rx.count(), 3, "nothing after the 2xx");
        assert_eq!(sink.stats().failed, 0);
    }

    #[actix::test]
    async fn a_batch_is_given_up_after_the_last_try() {
        let (base, rx) = receiver(&[500, 503, 500]);
        let (_dir, pool) = db(&[("1", hooks(json!([{"url": format!("{base}/hook")}])))]);
        let config = WebhookConfig {
            attempts: 3,
            ..fast()
        };
        let sink = WebhookDispatcher::start(pool, config).expect("start");
        sink.send(WebhookEvent::channel_occupied("1", "c"));
        wait_for("failed count", || sink.stats().failed == 1).await;
        assert_eq!(rx.count(), 3);
        // The receiver is back: later events still go out, the dropped batch does not.
        sink.send(WebhookEvent::channel_vacated("1", "c"));
        wait_for("delivered count", || sink.stats().delivered == 1).await;
        let got = rx.got();
        assert_eq!(got.len(), 4);
        assert_eq!(
            got[3].events(),
            json!([{"name": "channel_vacated", "channel": "c"}])
        );
    }

    #[actix::test]
    async fn unreachable_receiver_counts_as_a_failure() {
        // Bind then close a port so nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let (_dir, pool) = db(&[(
            "1",
            hooks(json!([{"url": format!("http://127.0.0.1:{port}/hook")}])),
        )]);
        let config = WebhookConfig {
            attempts: 2,
            ..fast()
        };
        let sink = WebhookDispatcher::start(pool, config).expect("start");
        sink.send(WebhookEvent::channel_occupied("1", "c"));
        wait_for("failed count", || sink.stats().failed == 1).await;
        assert_eq!(sink.stats().delivered, 0);
    }

    #[actix::test]
    async fn nothing_is_sent_for_a_workspace_without_webhooks() {
        let (base, rx) = receiver(&[]);
        let (_dir, pool) = db(&[
            ("1", json!({})),
            ("2", hooks(json!([{"url": format!("{base}/two")}]))),
        ]);
        let sink = WebhookDispatcher::start(pool, fast()).expect("start");
        sink.send(WebhookEvent::channel_occupied("1", "c1"));
        sink.send(WebhookEvent::channel_occupied("missing", "c"));
        sink.send(WebhookEvent::channel_occupied("2", "c2"));
        wait_for("workspace 2's request", || rx.count() == 1).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let got = rx.got();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].path, "/two");
        assert_eq!(
            got[0].events(),
            json!([{"name": "channel_occupied", "channel": "c2"}])
        );
        assert_eq!(sink.stats().dropped, 0);
    }

    #[actix::test]
    async fn settings_changes_apply_after_the_cache() {
        let (base, rx) = receiver(&[]);
        let (_dir, pool) = db(&[("1", json!({}))]);
        let sink = WebhookDispatcher::start(pool.clone(), fast()).expect("start");
        sink.send(WebhookEvent::channel_occupied("1", "before"));
        tokio::time::sleep(Duration::from_millis(150)).await;
        let settings = hooks(json!([{"url": format!("{base}/hook")}])).to_string();
        queries::update_workspace_settings(&mut pool.get().expect("conn"), "1", &settings)
            .expect("update");
        // The zero TTL of the test config lets the next flush see the change.
        tokio::time::sleep(Duration::from_millis(50)).await;
        sink.send(WebhookEvent::channel_occupied("1", "after"));
        wait_for("one request", || rx.count() == 1).await;
        assert_eq!(
            rx.got()[0].events(),
            json!([{"name": "channel_occupied", "channel": "after"}])
        );
    }

    #[actix::test]
    async fn settings_changed_drops_the_cache_at_once() {
        let (base, rx) = receiver(&[]);
        let (_dir, pool) = db(&[("1", json!({}))]);
        let config = WebhookConfig {
            // Without the notice, nothing would be read again during the test.
            settings_ttl: Duration::from_secs(600),
            ..fast()
        };
        let sink = WebhookDispatcher::start(pool.clone(), config).expect("start");
        sink.send(WebhookEvent::channel_occupied("1", "before"));
        // Read and cached as "no webhooks"; meanwhile events are dropped on arrival.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let settings = hooks(json!([{"url": format!("{base}/hook")}])).to_string();
        queries::update_workspace_settings(&mut pool.get().expect("conn"), "1", &settings)
            .expect("update");
        sink.send(WebhookEvent::channel_occupied("1", "stale"));
        sink.settings_changed("1");
        sink.send(WebhookEvent::channel_occupied("1", "after"));
        wait_for("one request", || rx.count() == 1).await;
        assert_eq!(
            rx.got()[0].events(),
            json!([{"name": "channel_occupied", "channel": "after"}])
        );
        // Removing the webhook stops deliveries as soon as the notice arrives.
        queries::update_workspace_settings(&mut pool.get().expect("conn"), "1", "{}")
            .expect("update");
        sink.settings_changed("1");
        sink.send(WebhookEvent::channel_vacated("1", "after"));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(rx.count(), 1, "nothing after the webhook was removed");
    }

    #[actix::test]
    async fn large_queues_go_out_in_batches_of_max_batch() {
        let (base, rx) = receiver(&[]);
        let (_dir, pool) = db(&[("1", hooks(json!([{"url": format!("{base}/hook")}])))]);
        let config = WebhookConfig {
            max_batch: 2,
            ..fast()
        };
        let sink = WebhookDispatcher::start(pool, config).expect("start");
        for i in 0..5 {
            sink.emit(
                "1",
                json!({"name": "channel_occupied", "channel": format!("c{i}")}),
            );
        }
        wait_for("all events", || {
            rx.got()
                .iter()
                .map(|r| r.events().as_array().map_or(0, Vec::len))
                .sum::<usize>()
                == 5
        })
        .await;
        let got = rx.got();
        assert!(got.len() >= 3);
        let mut channels: Vec<String> = Vec::new();
        for r in &got {
            let events = r.events();
            let events = events.as_array().expect("events");
            assert!(events.len() <= 2, "batch of {}", events.len());
            // In order within a batch.
            let batch: Vec<String> = events
                .iter()
                .map(|e| e["channel"].as_str().expect("channel").to_string())
                .collect();
            let mut sorted = batch.clone();
            sorted.sort();
            assert_eq!(batch, sorted);
            channels.extend(batch);
        }
        channels.sort();
        assert_eq!(channels, ["c0", "c1", "c2", "c3", "c4"]);
    }

    #[actix::test]
    async fn events_past_the_queue_bound_are_dropped_and_counted() {
        let (base, rx) = receiver(&[]);
        let (_dir, pool) = db(&[("1", hooks(json!([{"url": format!("{base}/hook")}])))]);
        let config = WebhookConfig {
            // No flush during the test until the queue is over the bound.
            flush_interval: Duration::from_millis(300),
            max_queued_per_workspace: 3,
            ..fast()
        };
        let sink = WebhookDispatcher::start(pool, config).expect("start");
        for i in 0..5 {
            sink.emit(
                "1",
                json!({"name": "channel_occupied", "channel": format!("c{i}")}),
            );
        }
        wait_for("dropped count", || sink.stats().dropped == 2).await;
        wait_for("one request", || rx.count() == 1).await;
        assert_eq!(
            rx.got()[0].events(),
            json!([
                {"name": "channel_occupied", "channel": "c0"},
                {"name": "channel_occupied", "channel": "c1"},
                {"name": "channel_occupied", "channel": "c2"},
            ])
        );
    }

    #[actix::test]
    async fn a_disabled_sink_drops_everything() {
        let sink = WebhookSink::disabled();
        sink.send(WebhookEvent::channel_occupied("1", "c"));
        assert_eq!(sink.stats(), WebhookStats::default());
    }
}
