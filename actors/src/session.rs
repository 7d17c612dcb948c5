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

/// Checks the client's cursor against the tail and the retained window, then reads the
/// events after it up to the tail that this viewer may see.
#[allow(clippy::too_many_arguments)]
fn load_replay(
    registry: &Registry,
    workspace_id: &str,
    viewer_id: &str,
    is_guest: bool,
    guest_channels: &HashSet<String>,
    after_raw: &str,
    tail: i64,
    max_replay: i64,
) -> Result<Result<Vec<Arc<crate::domain::event::Event>>, Resync>, ApiError> {
    let Some(after) = crate::ids::parse_cursor(after_raw) else {
        return Ok(Err(Resync("unknown cursor; resync required")));
    };
    if after > tail {
        return Ok(Err(Resync("cursor is beyond the tail; resync required")));
    }
    let mut conn = registry.pool().get()?;
    let (_, pruned_through) = queries::workspace_cursor_state(&mut conn, workspace_id)?;
    if after < pruned_through
        || (after > pruned_through && !queries::event_exists(&mut conn, workspace_id, after)?)
    {
        return Ok(Err(Resync(
            "cursor was pruned or is unknown; resync required",
        )));
    }
    if tail - after > max_replay {
        return Ok(Err(Resync(
            "realtime replay limit exceeded; resync required",
        )));
    }
    let viewer = Viewer {
        entity_id: viewer_id,
        is_guest,
        guest_channels,
    };
    let mut rows = Vec::new();
    let mut from = after;
    while from < tail {
        let page =
            queries::events_after_for(&mut conn, workspace_id, viewer_id, from, tail, REPLAY_PAGE)?;
        let Some(last) = page.last() else { break };
        from = last.cursor;
        rows.extend(page);
    }
    // The connection goes back to the pool before the CPU work: a reconnect storm must not
    // hold every connection while frames are built.
    drop(conn);
    // Compaction needs `message.*` payloads, and only when a run of appends is possible.
    let appends = rows
        .iter()
        .filter(|r| r.event_type == "message.appended")
        .count();
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        if !viewer.may_see(None, row.channel_id.as_deref()) {
            continue;
        }
        let parse = appends >= 2 && row.event_type.starts_with("message.");
        out.push(row.into_replayed(parse));
    }
    if appends < 2 {
        return Ok(Ok(out));
    }
    let mut conn = registry.pool().get()?;
    let out = crate::compaction::compact_appends(out, |channel, serial, seq| {
        queries::text_at(&mut conn, channel, serial, seq)
            .map_err(|e| log::warn!("compaction read failed: {e}"))
            .ok()
            .flatten()
    });
    Ok(Ok(out))
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
        let registry = self.registry.clone();
        let (ws_id, viewer, is_guest, guests, after, max_replay) = (
            self.workspace_id.clone(),
            self.entity_id.clone(),
            self.is_guest,
            self.guest_channels.clone(),
            self.after_cursor.clone(),
            self.config.max_replay,
        );
        // The mailbox waits while the replay is read and written: live events queue behind it.
        let replay = async move {
            let tail = workspace.send(register).await.map_err(ApiError::internal)?;
            let Some(after) = after else {
                return Ok((tail, Ok(Vec::new())));
            };
            let pool = registry.pool().clone();
            let events = pool
                .run_blocking(move || {
                    load_replay(
                        &registry, &ws_id, &viewer, is_guest, &guests, &after, tail, max_replay,
                    )
                })
                .await
                .map_err(ApiError::internal)??;
            Ok::<_, ApiError>((tail, events))
        };
        ctx.wait(replay.into_actor(self).map(|res, act, ctx| match res {
            // No connection free (a reconnect storm): the client retries with its cursor.
            Err(e) if e.code == crate::error::ErrorCode::Backpressure => Self::close(
                ctx,
                close_code::TRY_AGAIN_LATER,
                "server busy; reconnect with after_cursor",
            ),
            Err(e) => {
                log::error!("replay failed: {e}");
                Self::close(ctx, 1011, "internal error");
            }
            Ok((_, Err(Resync(reason)))) => Self::close(ctx, close_code::RESYNC_REQUIRED, reason),
            Ok((tail, Ok(events))) => {
                let ready = serde_json::json!({"type": "realtime.ready",
                    "cursor": crate::ids::cursor_string(tail), "socket_id": act.socket_id});
                ctx.text(ready.to_string());
                for ev in events {
                    ctx.text(ev.frame.clone());
                }
                act.last_cursor = tail;
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
