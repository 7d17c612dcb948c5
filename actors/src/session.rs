//! SessionActor for `GET /api/realtime/ws`: one per WebSocket. On start it registers with its
//! workspace (learning the tail cursor), replays the durable events after the client's cursor
//! up to that tail, then streams live events above it: no gap, no duplicate. Its mailbox is
//! the bounded outbound queue: it is only polled as fast as the socket drains, and a full
//! mailbox makes the workspace close this socket alone with 1013.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web_actors::ws;

use crate::domain::event::Viewer;
use crate::error::{close_code, ApiError};
use crate::heartbeat;
use crate::registry::Registry;
use crate::store::queries;
use crate::workspace::{Outbound, Register, Unregister, WorkspaceActor};

static NEXT_SESSION_ID: AtomicU64 = AtomicU64::new(1);

/// Replay reads the log in pages of this many events.
pub const REPLAY_PAGE: i64 = 500;

#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Outbound queue bound (mailbox capacity), in events.
    pub queue: usize,
    /// Replay budget: a cursor further behind than this gets 4001.
    pub max_replay: i64,
    pub heartbeat: Duration,
    pub client_timeout: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            queue: 1024,
            max_replay: 5000,
            heartbeat: Duration::from_secs(20),
            client_timeout: Duration::from_secs(60),
        }
    }
}

pub struct RealtimeSession {
    id: u64,
    /// Announced in `realtime.ready`; server requests may act through it.
    socket_id: String,
    capabilities: crate::domain::capabilities::Capabilities,
    workspace_id: String,
    entity_id: String,
    is_guest: bool,
    guest_channels: HashSet<String>,
    after_cursor: Option<String>,
    registry: Arc<Registry>,
    config: SessionConfig,
    heartbeat_at: Instant,
    /// Highest cursor written to the socket; live events at or below it are duplicates.
    last_cursor: i64,
    workspace: Option<Addr<WorkspaceActor>>,
}

/// Why a replay cannot be served: the client must resync over HTTP.
struct Resync(&'static str);

impl RealtimeSession {
    pub fn new(
        workspace_id: String,
        entity_id: String,
        is_guest: bool,
        guest_channels: HashSet<String>,
        after_cursor: Option<String>,
        registry: Arc<Registry>,
        config: SessionConfig,
    ) -> Self {
        let id = NEXT_SESSION_ID.fetch_add(1, Ordering::Relaxed);
        Self {
            id,
            socket_id: format!("{id}.{}", rand::random::<u32>()),
            capabilities: Default::default(),
            workspace_id,
            entity_id,
            is_guest,
            guest_channels,
            after_cursor,
            registry,
            config,
            heartbeat_at: Instant::now(),
            last_cursor: 0,
            workspace: None,
        }
    }

    /// The token's capabilities, for server requests bound to this socket.
    pub fn with_capabilities(mut self, c: crate::domain::capabilities::Capabilities) -> Self {
        self.capabilities = c;
        self
    }

    fn close(ctx: &mut ws::WebsocketContext<Self>, code: u16, reason: &str) {
        ctx.close(Some(ws::CloseReason {
            code: ws::CloseCode::from(code),
            description: Some(reason.to_string()),
        }));
        ctx.stop();
    }

    /// Pings every `heartbeat`, starting at a random slot of the first period: sockets that
    /// connect together (a restart, a reconnect storm) do not all ping in the same instant,
    /// and the pings due in one slot share a wake-up (see `heartbeat`).
    fn start_heartbeat(&self, ctx: &mut ws::WebsocketContext<Self>) {
        let period = self.config.heartbeat.max(heartbeat::SLOT);
        ctx.run_interval_at(heartbeat::first_tick(period), period, |act, ctx| {
            act.heartbeat(ctx)
        });
    }

    fn heartbeat(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        if self.heartbeat_at.elapsed() > self.config.client_timeout {
            Self::close(ctx, close_code::NORMAL, "heartbeat timeout");
        } else {
            ctx.ping(b"");
        }
    }
}

/// Whose replay and up to where: the reader (what it may see) and the tail it registered at.
struct ReplayScope {
    registry: Arc<Registry>,
    workspace_id: String,
    viewer_id: String,
    is_guest: bool,
    guest_channels: HashSet<String>,
    tail: i64,
}

/// One page of a replay, and the cursor the next page reads after (`None`: it was the last).
struct ReplayPage {
    events: Vec<Arc<crate::domain::event::Event>>,
    next: Option<i64>,
}

impl ReplayScope {
    /// Checks the client's cursor against the tail and the retained window: the cursor to
    /// replay after, or why the client must resync.
    fn check_cursor(
        &self,
        after_raw: &str,
        max_replay: i64,
    ) -> Result<Result<i64, Resync>, ApiError> {
        let Some(after) = crate::ids::parse_cursor(after_raw) else {
            return Ok(Err(Resync("unknown cursor; resync required")));
        };
        if after > self.tail {
            return Ok(Err(Resync("cursor is beyond the tail; resync required")));
        }
        let mut conn = self.registry.pool().get()?;
        let (_, pruned_through) = queries::workspace_cursor_state(&mut conn, &self.workspace_id)?;
        if after < pruned_through
            || (after > pruned_through
                && !queries::event_exists(&mut conn, &self.workspace_id, after)?)
        {
            return Ok(Err(Resync(
                "cursor was pruned or is unknown; resync required",
            )));
        }
        if self.tail - after > max_replay {
            return Ok(Err(Resync(
                "realtime replay limit exceeded; resync required",
            )));
        }
        Ok(Ok(after))
    }

    /// Reads the next [`REPLAY_PAGE`] events after `from` up to the tail, and keeps those this
    /// viewer may see. A page with two or more appends is read on to the tail: a run of
    /// appends is compacted into one event at its last position, so compaction must see
    /// each run whole (and what it leaves is small).
    fn page(&self, from: i64) -> Result<ReplayPage, ApiError> {
        if from >= self.tail {
            // Nothing missed (the usual reconnect): no connection needed.
            return Ok(ReplayPage {
                events: Vec::new(),
                next: None,
            });
        }
        let mut conn = self.registry.pool().get()?;
        let mut rows = Vec::new();
        let mut next = Some(from);
        let mut appends = 0;
        while let Some(after) = next {
            let page = queries::events_after_for(
                &mut conn,
                &self.workspace_id,
                &self.viewer_id,
                after,
                self.tail,
                REPLAY_PAGE,
            )?;
            next = match page.last() {
                Some(last) if page.len() as i64 == REPLAY_PAGE && last.cursor < self.tail => {
                    Some(last.cursor)
                }
                _ => None,
            };
            appends += page
                .iter()
                .filter(|r| r.event_type == "message.appended")
                .count();
            rows.extend(page);
            if appends < 2 {
                break;
            }
        }
        // The connection goes back to the pool before the CPU work: a reconnect storm must
        // not hold every connection while frames are built.
        drop(conn);
        let viewer = Viewer {
            entity_id: &self.viewer_id,
            is_guest: self.is_guest,
            guest_channels: &self.guest_channels,
        };
        // Compaction needs `message.*` payloads, and only when a run of appends is possible.
        let mut events = Vec::with_capacity(rows.len());
        for row in rows {
            if !viewer.may_see(None, row.channel_id.as_deref()) {
                continue;
            }
            let parse = appends >= 2 && row.event_type.starts_with("message.");
            events.push(row.into_replayed(parse));
        }
        if appends >= 2 {
            let mut conn = self.registry.pool().get()?;
            events = crate::compaction::compact_appends(events, |channel, serial, seq| {
                queries::text_at(&mut conn, channel, serial, seq)
                    .map_err(|e| log::warn!("compaction read failed: {e}"))
                    .ok()
                    .flatten()
            });
        }
        Ok(ReplayPage { events, next })
    }
}

impl RealtimeSession {
    /// Writes one page of the replay and reads the next. The next page is written once the
    /// socket has taken this one (the context is polled only as the socket drains), so a
    /// replaying session holds about two pages however far behind its client was, unless a
    /// page holds appends to compact (see [`ReplayScope::page`]).
    fn write_replay_page(
        &mut self,
        page: ReplayPage,
        scope: Arc<ReplayScope>,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        for ev in page.events {
            ctx.text(ev.frame.clone());
        }
        let Some(from) = page.next else { return };
        let reader = scope.clone();
        let read = scope
            .registry
            .pool()
            .run_blocking(move || reader.page(from));
        // `wait`: live events keep queueing in the mailbox behind the replay.
        ctx.wait(read.into_actor(self).map(move |res, act, ctx| {
            match res.map_err(ApiError::internal).and_then(|page| page) {
                Ok(page) => act.write_replay_page(page, scope, ctx),
                Err(e) => Self::replay_failed(e, ctx),
            }
        }));
    }

    fn replay_failed(e: ApiError, ctx: &mut ws::WebsocketContext<Self>) {
        if e.code == crate::error::ErrorCode::Backpressure {
            // No connection free (a reconnect storm): the client retries with its cursor.
            Self::close(
                ctx,
                close_code::TRY_AGAIN_LATER,
                "server busy; reconnect with after_cursor",
            )
        } else {
            log::error!("replay failed: {e}");
            Self::close(ctx, 1011, "internal error");
        }
    }
}

impl Actor for RealtimeSession {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.config.queue);
        if let Some(m) = crate::METRICS.get() {
            m.sessions.inc();
        }
        self.start_heartbeat(ctx);
        self.registry.add_socket(
            &self.socket_id,
            crate::registry::SocketIdentity {
                workspace_id: self.workspace_id.clone(),
                entity_id: self.entity_id.clone(),
                capabilities: self.capabilities.clone(),
            },
        );
        let workspace = match self.registry.workspace(&self.workspace_id) {
            Ok(w) => w,
            Err(e) => {
                log::error!("session cannot reach its workspace: {e}");
                return Self::close(ctx, 1011, "internal error");
            }
        };
        self.workspace = Some(workspace.clone());
        let register = Register {
            session_id: self.id,
            recipient: ctx.address().recipient(),
            entity_id: self.entity_id.clone(),
            is_guest: self.is_guest,
            guest_channels: self.guest_channels.clone(),
        };
        let mut scope = ReplayScope {
            registry: self.registry.clone(),
            workspace_id: self.workspace_id.clone(),
            viewer_id: self.entity_id.clone(),
            is_guest: self.is_guest,
            guest_channels: self.guest_channels.clone(),
            tail: 0,
        };
        let (after, max_replay) = (self.after_cursor.clone(), self.config.max_replay);
        // The mailbox waits while the replay is read and written: live events queue behind it.
        let first_page = async move {
            scope.tail = workspace.send(register).await.map_err(ApiError::internal)?;
            let scope = Arc::new(scope);
            let Some(after) = after else {
                return Ok((scope, Ok(None)));
            };
            let reader = scope.clone();
            let page = scope
                .registry
                .pool()
                .run_blocking(move || {
                    Ok::<_, ApiError>(match reader.check_cursor(&after, max_replay)? {
                        Ok(after) => Ok(Some(reader.page(after)?)),
                        Err(resync) => Err(resync),
                    })
                })
                .await
                .map_err(ApiError::internal)??;
            Ok::<_, ApiError>((scope, page))
        };
        ctx.wait(first_page.into_actor(self).map(|res, act, ctx| match res {
            Err(e) => Self::replay_failed(e, ctx),
            Ok((_, Err(Resync(reason)))) => Self::close(ctx, close_code::RESYNC_REQUIRED, reason),
            Ok((scope, Ok(page))) => {
                let ready = serde_json::json!({"type": "realtime.ready",
                    "cursor": crate::ids::cursor_string(scope.tail), "socket_id": act.socket_id});
                ctx.text(ready.to_string());
                act.last_cursor = scope.tail;
                if let Some(page) = page {
                    act.write_replay_page(page, scope, ctx);
                }
            }
        }));
    }

    fn stopping(&mut self, _: &mut Self::Context) -> Running {
        self.registry.remove_socket(&self.socket_id);
        if let Some(w) = &self.workspace {
            w.do_send(Unregister {
                session_id: self.id,
            });
        }
        if let Some(m) = crate::METRICS.get() {
            m.sessions.dec();
        }
        Running::Stop
    }
}

impl Handler<Outbound> for RealtimeSession {
    type Result = ();

    fn handle(&mut self, msg: Outbound, ctx: &mut Self::Context) {
        match msg {
            Outbound::Event(ev) => {
                if let Some(c) = ev.cursor {
                    if c <= self.last_cursor {
                        return;
                    }
                    self.last_cursor = c;
                }
                ctx.text(ev.frame.clone());
            }
            Outbound::Overflow => Self::close(
                ctx,
                close_code::TRY_AGAIN_LATER,
                "realtime buffer overflow; reconnect with after_cursor to replay",
            ),
            Outbound::Close(code, reason) => Self::close(ctx, code, reason),
        }
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for RealtimeSession {
    fn handle(&mut self, msg: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        match msg {
            Ok(ws::Message::Ping(p)) => {
                self.heartbeat_at = Instant::now();
                ctx.pong(&p);
            }
            Ok(ws::Message::Pong(_)) => self.heartbeat_at = Instant::now(),
            Ok(ws::Message::Text(t)) => {
                self.heartbeat_at = Instant::now();
                // The stream is server-to-client; an application-level ping is answered.
                if t.contains("\"ping\"") {
                    ctx.text(r#"{"type":"pong"}"#);
                }
            }
            Ok(ws::Message::Binary(_))
            | Ok(ws::Message::Continuation(_))
            | Ok(ws::Message::Nop) => {
                self.heartbeat_at = Instant::now();
            }
            Ok(ws::Message::Close(reason)) => {
                ctx.close(reason);
                ctx.stop();
            }
            Err(ws::ProtocolError::Overflow) => {
                Self::close(ctx, close_code::TOO_BIG, "frame too large")
            }
            Err(e) => {
                log::debug!("websocket protocol error: {e}");
                Self::close(ctx, 1002, "protocol error");
            }
        }
    }
}
