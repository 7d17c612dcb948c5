//! PusherSession: one actor per `/app/{key}` socket. It announces its socket id, keeps the
//! connection alive with Pusher's activity timeout, authorizes subscriptions (signatures,
//! signed-in members of chat channels, token capabilities), relays client events, and writes
//! what its workspace's hub sends it in its protocol's spelling. Its mailbox is the bounded
//! outbound queue: a full one makes the hub close this socket alone with 4100.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web_actors::ws;
use serde_json::{json, Value};

use super::channel_auth::{self, ChannelKind};
use super::delivery::{frame_of, PusherDelivery};
use super::hub::{
    merge_presence, ClientEvent, Connect, Disconnect, Identify, Join, Joined, Leave,
    PresenceMember, PusherOutbound,
};
use super::protocol::{self, AppendMode, Inbound, Protocol};
use super::replay;
use super::resume::{self, ResumeRun, Step, Wanted};
use crate::cluster_presence::{ClusterJoin, REPLY_TIMEOUT};
use crate::domain::capabilities::Capabilities;
use crate::domain::channel::ChannelType;
use crate::domain::versioned::Action;
use crate::error::close_code::{self, pusher as code};
use crate::error::ApiError;
use crate::heartbeat;
use crate::registry::{Registry, SocketIdentity};
use crate::settings::WorkspaceSettings;
use crate::store::queries;
use crate::workspace::WorkspaceActor;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Pusher's limit on one client event's data.
pub const MAX_CLIENT_EVENT_BYTES: usize = 10 * 1024;
/// Full-mode sockets keep the text of this many streaming messages to append to.
const MAX_FULL_TEXTS: usize = 64;
/// How long a socket whose token expired may send `sockudo:auth` before it is closed.
const TOKEN_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct PusherConfig {
    /// Announced in `connection_established`; the server pings after this much silence.
    pub activity_timeout: Duration,
    /// After a server ping, the socket closes with 4201 if nothing arrives within this.
    pub pong_timeout: Duration,
    /// Outbound queue bound (mailbox capacity).
    pub queue: usize,
    /// `resume` replays at most this many versions per channel.
    pub max_replay: i64,
}

impl Default for PusherConfig {
    fn default() -> Self {
        Self {
            activity_timeout: Duration::from_secs(120),
            pong_timeout: Duration::from_secs(30),
            queue: 1024,
            max_replay: 5000,
        }
    }
}

/// The workspace a socket connected to, as read at connect.
#[derive(Debug, Clone)]
pub struct App {
    pub workspace_id: String,
    pub key: String,
    pub secret: String,
    pub settings: WorkspaceSettings,
}

/// What a V2 `?token=` granted.
#[derive(Debug, Clone)]
pub struct TokenGrant {
    pub user_id: String,
    /// `None`: the token carries no capabilities, and prefix rules apply.
    pub capabilities: Option<Capabilities>,
    pub exp: i64,
}

/// How the connection was admitted.
pub enum Admission {
    Admit {
        app: Arc<App>,
        token: Option<TokenGrant>,
    },
    /// Sent as `pusher:error` with this code, then closed with it.
    Refuse(u16, String),
}

struct Subscription {
    /// Highest serial written to the socket on this channel.
    last_serial: i64,
    /// First serial delivered live: `resume` leaves out `[first_live, last_serial]`.
    first_live: Option<i64>,
    /// The entity whose membership admitted the socket to a chat channel (no signature):
    /// `resume` and `channel_history` check that it still may see the channel.
    via_member: Option<String>,
}

/// What a resume has answered so far, for its `resume_success`.
#[derive(Default)]
struct ResumeReport {
    recovered: Vec<Value>,
    failed: Vec<Value>,
    /// Frames sent of the channel being replayed.
    sent: usize,
    /// Channels not yet recovered or failed when the current step began.
    open: Vec<String>,
}

impl ResumeReport {
    /// Every failed channel gets its own `resume_failed` frame too, as Sockudo sends them.
    fn fail(&mut self, step: Step, ctx: &mut ws::WebsocketContext<PusherSession>) {
        let Step::Failed { channel, failure } = step else {
            return;
        };
        self.sent = 0;
        ctx.text(protocol::v2_event(
            "pusher:resume_failed",
            Some(&channel),
            json!(failure.to_string()),
        ));
        self.failed.push(failure);
    }

    fn finish(self, ctx: &mut ws::WebsocketContext<PusherSession>) {
        ctx.text(protocol::v2_event(
            "pusher:resume_success",
            None,
            json!(json!({"recovered": self.recovered, "failed": self.failed}).to_string()),
        ));
    }
}

/// Whether `via_member` (if any) still may see chat channel `name`.
fn still_visible(
    registry: &Registry,
    workspace_id: &str,
    name: &str,
    via_member: Option<&str>,
) -> Result<bool, ApiError> {
    let Some(entity) = via_member else {
        return Ok(true);
    };
    Ok(match lookup(registry, workspace_id, name, Some(entity))? {
        Known::Chat {
            visible_to_user, ..
        } => visible_to_user,
        _ => true,
    })
}

pub struct PusherSession {
    id: u64,
    socket_id: Arc<str>,
    protocol: Protocol,
    append_mode: AppendMode,
    admission: Option<Admission>,
    app: Option<Arc<App>>,
    registry: Arc<Registry>,
    config: PusherConfig,
    workspace: Option<Addr<WorkspaceActor>>,
    /// Signed in through the token or `pusher:signin`.
    user_id: Option<String>,
    token: Option<TokenGrant>,
    signin_capabilities: Capabilities,
    subscriptions: HashMap<String, Subscription>,
    last_seen: Instant,
    ping_sent: Option<Instant>,
    /// Client-event token bucket: (tokens, last refill).
    bucket: (f64, Instant),
    /// Full-mode append accumulators: message serial → text so far.
    texts: HashMap<String, String>,
    token_timer: Option<SpawnHandle>,
}

/// A channel as the log knows it, for authorization and V2 positions.
enum Known {
    /// Nothing was ever published under this name.
    Unknown,
    Implicit {
        id: String,
        last_seq: i64,
    },
    Chat {
        id: String,
        last_seq: i64,
        visible_to_user: bool,
    },
}

impl Known {
    fn position(&self) -> Option<(&str, i64)> {
        match self {
            Self::Unknown => None,
            Self::Implicit { id, last_seq } | Self::Chat { id, last_seq, .. } => {
                Some((id.as_str(), *last_seq))
            }
        }
    }
}

fn lookup(
    registry: &Registry,
    workspace_id: &str,
    name: &str,
    user_id: Option<&str>,
) -> Result<Known, ApiError> {
    let mut conn = registry.pool().get()?;
    let Some(id) = queries::channel_id_by_name(&mut conn, workspace_id, name)? else {
        return Ok(Known::Unknown);
    };
    let Some(channel) = queries::channel(&mut conn, &id)? else {
        return Ok(Known::Unknown);
    };
    if channel.channel_type == ChannelType::Implicit {
        return Ok(Known::Implicit {
            id,
            last_seq: channel.last_seq,
        });
    }
    let visible_to_user = match user_id {
        Some(u) => queries::entity(&mut conn, workspace_id, u)?
            .filter(|e| e.active && !e.blocked)
            .is_some_and(|e| channel.is_visible_to(&e)),
        None => false,
    };
    Ok(Known::Chat {
        id,
        last_seq: channel.last_seq,
        visible_to_user,
    })
}

/// SPEC §4 and §6: a token with capabilities allows only what it lists; a chat channel needs
/// a signed-in member who may see it or a signature; other names follow Pusher's prefixes.
fn may_subscribe(
    channel: &str,
    known: &Known,
    signature_ok: bool,
    token_caps: Option<&Capabilities>,
) -> Result<(), &'static str> {
    let kind = ChannelKind::of(channel);
    let granted = match token_caps {
        Some(caps) => {
            if !caps.allows("subscribe", channel)
                || (kind == ChannelKind::Presence && !caps.allows("presence", channel))
            {
                return Err("the token does not grant subscribing to this channel");
            }
            true
        }
        None => false,
    };
    match known {
        Known::Chat {
            visible_to_user, ..
        } => {
            if *visible_to_user || signature_ok {
                Ok(())
            } else {
                Err("this chat channel needs a signed-in member or a valid auth signature")
            }
        }
        _ if kind.needs_auth() && !signature_ok && !granted => {
            Err("Channel requires authentication: invalid or missing auth signature")
        }
        _ => Ok(()),
    }
}

impl PusherSession {
    pub fn new(
        protocol: Protocol,
        append_mode: AppendMode,
        admission: Admission,
        registry: Arc<Registry>,
        config: PusherConfig,
    ) -> Self {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        Self {
            id,
            socket_id: Arc::from(format!("{id}.{}", rand::random::<u32>())),
            protocol,
            append_mode,
            admission: Some(admission),
            app: None,
            registry,
            config,
            workspace: None,
            user_id: None,
            token: None,
            signin_capabilities: Capabilities::default(),
            subscriptions: HashMap::new(),
            last_seen: Instant::now(),
            ping_sent: None,
            // Starts full: the first refill caps it at the workspace's burst.
            bucket: (f64::MAX, Instant::now()),
            texts: HashMap::new(),
            token_timer: None,
        }
    }

    fn close(ctx: &mut ws::WebsocketContext<Self>, code: u16, reason: &str) {
        ctx.close(Some(ws::CloseReason {
            code: ws::CloseCode::from(code),
            description: Some(reason.to_string()),
        }));
        ctx.stop();
    }

    fn error(&self, ctx: &mut ws::WebsocketContext<Self>, code: u16, message: &str) {
        ctx.text(protocol::error(self.protocol, code, message));
    }

    fn capabilities(&self) -> Capabilities {
        match self.token.as_ref().and_then(|t| t.capabilities.clone()) {
            Some(c) => c,
            None => self.signin_capabilities.clone(),
        }
    }

    /// What server requests bound to this socket (`socket_id`) act as.
    fn publish_identity(&self) {
        if let Some(app) = &self.app {
            self.registry.add_socket(
                &self.socket_id,
                SocketIdentity {
                    workspace_id: app.workspace_id.clone(),
                    entity_id: self.user_id.clone().unwrap_or_default(),
                    capabilities: self.capabilities(),
                },
            );
        }
    }

    /// Pings after `activity_timeout` of silence; closes 4201 when no answer follows.
    fn start_liveness(&self, ctx: &mut ws::WebsocketContext<Self>) {
        let tick = (self.config.activity_timeout.min(self.config.pong_timeout) / 2)
            .clamp(Duration::from_millis(200), Duration::from_secs(15));
        // On the shared grid of `heartbeat`: the checks due in one slot share a wake-up.
        ctx.run_interval_at(heartbeat::first_tick(tick), tick, |act, ctx| {
            match act.ping_sent {
                Some(at) if at.elapsed() >= act.config.pong_timeout => {
                    Self::close(ctx, code::PONG_TIMEOUT, "Pong reply not received in time")
                }
                Some(_) => {}
                None if act.last_seen.elapsed() >= act.config.activity_timeout => {
                    act.ping_sent = Some(Instant::now());
                    ctx.text(protocol::ping(act.protocol));
                }
                None => {}
            }
        });
    }

    /// A token that expires gets `sockudo:token_expired`, then 30 s to be refreshed.
    fn arm_token_expiry(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        if let Some(h) = self.token_timer.take() {
            ctx.cancel_future(h);
        }
        let Some(t) = &self.token else { return };
        let left = (t.exp - chrono::Utc::now().timestamp()).max(0) as u64;
        let handle = ctx.run_later(Duration::from_secs(left), |act, ctx| {
            ctx.text(protocol::v2_event(
                "pusher:token_expired",
                None,
                json!({"code": 40142, "reason": "expired"}),
            ));
            act.token_timer = Some(ctx.run_later(TOKEN_GRACE, |_, ctx| {
                Self::close(ctx, code::UNAUTHORIZED, "token expired")
            }));
        });
        self.token_timer = Some(handle);
    }

    fn on_frame(&mut self, text: &str, ctx: &mut ws::WebsocketContext<Self>) {
        match protocol::parse(text) {
            Err(why) => self.error(ctx, code::INVALID_FRAME, why),
            Ok(Inbound::Ping) => ctx.text(protocol::pong(self.protocol)),
            Ok(Inbound::Pong) => {}
            Ok(Inbound::Subscribe(data)) => self.subscribe(data, ctx),
            Ok(Inbound::Unsubscribe(data)) => {
                if let Some(channel) = data.get("channel").and_then(Value::as_str) {
                    if self.subscriptions.remove(channel).is_some() {
                        if let Some(w) = &self.workspace {
                            w.do_send(Leave {
                                session_id: self.id,
                                channel: channel.to_string(),
                            });
                        }
                    }
                }
            }
            Ok(Inbound::Signin(data)) => self.signin(data, ctx),
            Ok(Inbound::Auth(data)) => self.refresh_token(data, ctx),
            Ok(Inbound::Resume(data)) => self.resume(data, ctx),
            Ok(Inbound::ChannelHistory(data)) => self.channel_history(data, ctx),
            Ok(Inbound::Client {
                event,
                channel,
                data,
            }) => self.client_event(event, channel, data, ctx),
            Ok(Inbound::Unknown(name)) => log::debug!("ignored pusher event {name}"),
        }
    }

    fn subscribe(&mut self, data: Value, ctx: &mut ws::WebsocketContext<Self>) {
        let (Some(app), Some(workspace)) = (self.app.clone(), self.workspace.clone()) else {
            return;
        };
        let Some(channel) = data.get("channel").and_then(Value::as_str) else {
            return self.error(ctx, code::CHANNEL_ERROR, "subscribe needs a channel");
        };
        let channel = channel.to_string();
        if let Err(e) = crate::domain::validation::pusher_channel_name(&channel) {
            return self.error(ctx, code::CHANNEL_ERROR, &e.message);
        }
        // Pusher's user channels (`sendToUser`) belong to the socket signed in as that user;
        // other `#` names are reserved.
        if let Some(owner) = channel.strip_prefix("#server-to-user-") {
            if self.user_id.as_deref() != Some(owner) {
                return self.error(
                    ctx,
                    code::UNAUTHORIZED,
                    "only the socket signed in as this user may subscribe to its user channel",
                );
            }
        } else if channel.starts_with('#') {
            return self.error(
                ctx,
                code::CHANNEL_ERROR,
                "channel names starting with '#' are reserved",
            );
        }
        let kind = ChannelKind::of(&channel);
        let channel_data = data.get("channel_data").and_then(Value::as_str);
        let signature_ok = data
            .get("auth")
            .and_then(Value::as_str)
            .is_some_and(|given| {
                channel_auth::verify_channel_auth(
                    &app.key,
                    &app.secret,
                    &self.socket_id,
                    &channel,
                    channel_data,
                    given,
                )
            });
        // A presence member is who the signed channel data names, else the signed-in user.
        let member = if kind == ChannelKind::Presence {
            let signed = channel_data
                .filter(|_| signature_ok)
                .and_then(|d| serde_json::from_str::<Value>(d).ok())
                .and_then(|d| {
                    let user_id = match d.get("user_id")? {
                        Value::String(s) if !s.is_empty() => s.clone(),
                        Value::Number(n) => n.to_string(),
                        _ => return None,
                    };
                    Some(PresenceMember {
                        user_id,
                        user_info: d.get("user_info").cloned().unwrap_or(json!({})),
                    })
                });
            match signed.or_else(|| {
                self.user_id.clone().map(|user_id| PresenceMember {
                    user_id,
                    user_info: json!({}),
                })
            }) {
                Some(m) => Some(m),
                None if signature_ok => {
                    return self.error(
                        ctx,
                        code::CHANNEL_ERROR,
                        "presence channel_data must be JSON with a user_id",
                    )
                }
                None => None,
            }
        } else {
            None
        };
        let token_caps = self.token.as_ref().and_then(|t| t.capabilities.clone());
        let registry = self.registry.clone();
        let after_join = (
            self.registry.clone(),
            app.workspace_id.clone(),
            channel.clone(),
        );
        let user = self.user_id.clone();
        let (session_id, ws_id) = (self.id, app.workspace_id.clone());
        let name = channel.clone();
        let pool = self.registry.pool().clone();
        let work = async move {
            let who = user.clone();
            let known = pool
                .run_blocking(move || lookup(&registry, &ws_id, &name, who.as_deref()))
                .await
                .map_err(ApiError::internal)??;
            if let Err(why) = may_subscribe(&channel, &known, signature_ok, token_caps.as_ref()) {
                return Ok((channel, Err(why), None, None));
            }
            if kind == ChannelKind::Presence && member.is_none() {
                return Ok((channel, Err("Channel requires authentication"), None, None));
            }
            // Admitted by membership alone: that grant ends with the membership.
            let via_member = match &known {
                Known::Chat {
                    visible_to_user: true,
                    ..
                } if !signature_ok => user,
                _ => None,
            };
            let joined = workspace
                .send(Join {
                    session_id,
                    channel: channel.clone(),
                    member,
                    via_member: via_member.clone(),
                })
                .await
                .map_err(ApiError::internal)?;
            let joined = match joined {
                Err(why) => Err(why),
                Ok(Joined {
                    presence,
                    cluster: None,
                }) => Ok(presence),
                // Cluster mode: the members of every node, or a channel full cluster-wide.
                Ok(Joined {
                    presence,
                    cluster: Some(answer),
                }) => match tokio::time::timeout(REPLY_TIMEOUT, answer).await {
                    Ok(Ok(ClusterJoin::Full)) => {
                        workspace.do_send(Leave {
                            session_id,
                            channel: channel.clone(),
                        });
                        Err("the presence channel is full")
                    }
                    Ok(Ok(ClusterJoin::Members(members))) => {
                        Ok(presence.map(|local| merge_presence(&local, members)))
                    }
                    _ => Ok(presence),
                },
            };
            // The position is read after joining: every later seq reaches this socket live,
            // and anything at or below it was committed before (V1 loses nothing between the
            // authorization read and the join).
            let mut position = known.position().map(|(id, s)| (id.to_string(), s));
            if joined.is_ok() {
                let (registry, ws_id, name) = after_join;
                let fresh = pool
                    .run_blocking(move || -> Result<_, ApiError> {
                        let mut conn = registry.pool().get()?;
                        let Some(id) = queries::channel_id_by_name(&mut conn, &ws_id, &name)?
                        else {
                            return Ok(None);
                        };
                        Ok(queries::channel(&mut conn, &id)?.map(|c| (id, c.last_seq)))
                    })
                    .await;
                if let Ok(Ok(p)) = fresh {
                    position = p;
                }
            }
            Ok::<_, ApiError>((channel, joined, position, via_member))
        };
        // The mailbox waits: no delivery on this channel may precede the confirmation.
        ctx.wait(work.into_actor(self).map(|res, act, ctx| match res {
            Err(e) => act.error(ctx, code::CHANNEL_ERROR, &e.message),
            Ok((_, Err(why), _, _)) => {
                let c = if why.contains("full") {
                    code::OVER_CAPACITY
                } else {
                    code::UNAUTHORIZED
                };
                act.error(ctx, c, why)
            }
            Ok((channel, Ok(presence), position, via_member)) => {
                let position = position.as_ref().map(|(id, s)| (id.as_str(), *s));
                let last = position.map_or(0, |(_, s)| s);
                act.subscriptions
                    .entry(channel.clone())
                    .or_insert(Subscription {
                        last_serial: last,
                        first_live: None,
                        via_member: None,
                    })
                    .via_member = via_member;
                let data = presence.unwrap_or_else(|| json!({}));
                ctx.text(protocol::subscription_succeeded(
                    act.protocol,
                    &channel,
                    &data,
                    position,
                ));
            }
        }));
    }

    fn signin(&mut self, data: Value, ctx: &mut ws::WebsocketContext<Self>) {
        let Some(app) = self.app.clone() else { return };
        let (Some(user_data), Some(auth)) = (
            data.get("user_data").and_then(Value::as_str),
            data.get("auth").and_then(Value::as_str),
        ) else {
            return self.error(ctx, code::UNAUTHORIZED, "signin needs user_data and auth");
        };
        if !channel_auth::verify_signin(&app.key, &app.secret, &self.socket_id, user_data, auth) {
            return self.error(ctx, code::UNAUTHORIZED, "Invalid signin signature");
        }
        let Some(parsed) = serde_json::from_str::<Value>(user_data).ok() else {
            return self.error(ctx, code::UNAUTHORIZED, "user_data must be a JSON object");
        };
        let user_id = match parsed.get("id") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => return self.error(ctx, code::UNAUTHORIZED, "user_data needs an id"),
        };
        if self.token.as_ref().is_some_and(|t| t.user_id != user_id) {
            return self.error(
                ctx,
                code::UNAUTHORIZED,
                "a signed-in token's user cannot change",
            );
        }
        self.signin_capabilities = parsed
            .get("capabilities")
            .map(Capabilities::from_claim)
            .unwrap_or_default();
        self.user_id = Some(user_id.clone());
        self.publish_identity();
        if let Some(w) = &self.workspace {
            w.do_send(Identify {
                session_id: self.id,
                user_id,
            });
        }
        ctx.text(protocol::signin_success(self.protocol, user_data));
    }

    /// `sockudo:auth {token}`: a fresh token for the same user.
    fn refresh_token(&mut self, data: Value, ctx: &mut ws::WebsocketContext<Self>) {
        let Some(app) = self.app.clone() else { return };
        let Some(token) = data.get("token").and_then(Value::as_str) else {
            return self.error(ctx, code::UNAUTHORIZED, "auth needs a token");
        };
        let now = chrono::Utc::now().timestamp();
        let claims = crate::auth::token_key_id(token).and_then(|kid| {
            if kid == app.key {
                crate::auth::verify_token(token, &app.secret, now)
            } else {
                Err(ApiError::auth("token is for another app"))
            }
        });
        let claims = match claims {
            Ok(c) => c,
            Err(e) => return self.error(ctx, code::UNAUTHORIZED, &e.message),
        };
        let Some(subject) = claims.subject().map(str::to_string) else {
            return self.error(ctx, code::UNAUTHORIZED, "token names no user");
        };
        if self.user_id.as_ref().is_some_and(|u| *u != subject) {
            return self.error(ctx, code::UNAUTHORIZED, "a refresh cannot change the user");
        }
        self.token = Some(TokenGrant {
            user_id: subject.clone(),
            capabilities: claims.capabilities().map(Capabilities::from_claim),
            exp: claims.exp,
        });
        self.user_id = Some(subject.clone());
        self.publish_identity();
        self.arm_token_expiry(ctx);
        ctx.text(protocol::v2_event(
            "pusher:auth_success",
            None,
            json!({"client_id": subject, "exp": claims.exp}),
        ));
    }

    fn client_event(
        &mut self,
        event: String,
        channel: Option<String>,
        data: Value,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        let Some(app) = self.app.clone() else { return };
        let Some(channel) = channel else {
            return self.error(ctx, code::CLIENT_EVENT, "a client event needs a channel");
        };
        if !app.settings.enable_client_messages {
            return self.error(
                ctx,
                code::CLIENT_EVENT,
                "To send client events, you must enable this feature in the Settings",
            );
        }
        if !ChannelKind::of(&channel).allows_client_events() {
            return self.error(
                ctx,
                code::CLIENT_EVENT,
                "client events are allowed on private and presence channels only",
            );
        }
        if !self.subscriptions.contains_key(&channel) {
            return self.error(
                ctx,
                code::CLIENT_EVENT,
                "client events need a subscription to the channel",
            );
        }
        if event.len() > 200 {
            return self.error(ctx, code::CLIENT_EVENT, "event name is too long");
        }
        let size = match &data {
            Value::String(s) => s.len(),
            other => other.to_string().len(),
        };
        if size > MAX_CLIENT_EVENT_BYTES {
            return self.error(ctx, code::CLIENT_EVENT, "client event data exceeds 10 KiB");
        }
        if self
            .token
            .as_ref()
            .and_then(|t| t.capabilities.as_ref())
            .is_some_and(|c| !c.allows("publish", &channel))
        {
            return self.error(ctx, code::CLIENT_EVENT, "the token does not grant publish");
        }
        if let Some(limit) = app.settings.rate_limits.client_events {
            let (tokens, at) = &mut self.bucket;
            let now = Instant::now();
            let burst = f64::from(limit.burst.max(1));
            *tokens = (*tokens + at.elapsed().as_secs_f64() * limit.per_second).min(burst);
            *at = now;
            if *tokens < 1.0 {
                return self.error(ctx, code::CLIENT_EVENT, "Client event rate limit exceeded");
            }
            *tokens -= 1.0;
        }
        if let Some(w) = &self.workspace {
            w.do_send(ClientEvent {
                session_id: self.id,
                channel,
                event,
                data,
            });
        }
    }

    /// V2: replays each channel from its position, then answers `resume_success`.
    fn resume(&mut self, data: Value, ctx: &mut ws::WebsocketContext<Self>) {
        let Some(app) = self.app.clone() else { return };
        if self.protocol != Protocol::V2 {
            return self.error(ctx, code::CHANNEL_ERROR, "resume needs protocol 2");
        }
        let Some(positions) = replay::parse_positions(&data) else {
            return self.error(
                ctx,
                code::NO_POSITIONS,
                "No channel recovery positions provided",
            );
        };
        let mut failed = Vec::new();
        let mut wanted = Vec::new();
        for (channel, pos) in positions {
            if let Some(sub) = self.subscriptions.get(&channel) {
                wanted.push(Wanted {
                    channel,
                    pos,
                    via_member: sub.via_member.clone(),
                });
            } else {
                let mut f = replay::failure(&channel, "continuity_unverifiable", None, None);
                f["reason"] = json!("the socket is not subscribed to this channel");
                // Every failed channel gets its own frame too, as Sockudo sends them.
                ctx.text(protocol::v2_event(
                    "pusher:resume_failed",
                    Some(&channel),
                    json!(f.to_string()),
                ));
                failed.push(f);
            }
        }
        let run = ResumeRun::new(
            app.workspace_id.clone(),
            self.config.max_replay,
            self.append_mode,
            wanted,
        );
        let report = ResumeReport {
            failed,
            ..ResumeReport::default()
        };
        if run.is_finished() {
            // Nothing to read: no channel asked for is subscribed here.
            return report.finish(ctx);
        }
        self.resume_step(run, report, ctx);
    }

    /// Reads the resume's next page in a pool slot and writes it. `wait`: the socket's
    /// frames and live events queue behind the replay, and the context is polled (so the next
    /// step asked for) only once the socket has taken what was written.
    fn resume_step(
        &mut self,
        mut run: ResumeRun,
        report: ResumeReport,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        let mut report = report;
        report.open = run.unfinished();
        let registry = self.registry.clone();
        let work = self.registry.pool().run_blocking(move || {
            let steps = run.step(&registry, still_visible);
            (run, steps)
        });
        ctx.wait(work.into_actor(self).map(move |res, act, ctx| match res {
            Ok((run, steps)) => act.write_resume_steps(run, steps, report, ctx),
            Err(e) => {
                // The run went with the failed task: what it had left cannot be read now.
                log::error!("resume: {e}");
                let mut report = report;
                for channel in std::mem::take(&mut report.open) {
                    report.fail(resume::unavailable(channel), ctx);
                }
                report.finish(ctx);
            }
        }));
    }

    fn write_resume_steps(
        &mut self,
        run: ResumeRun,
        steps: Vec<Step>,
        mut report: ResumeReport,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        for step in steps {
            match step {
                Step::Frames { channel, frames } => {
                    let Some(sub) = self.subscriptions.get_mut(&channel) else {
                        continue;
                    };
                    // Serials already delivered live are not sent again.
                    let live = sub.first_live.map(|f| (f, sub.last_serial));
                    for (serial, frame) in frames {
                        if !live.is_some_and(|(f, l)| serial >= f && serial <= l) {
                            ctx.text(frame);
                            sub.last_serial = sub.last_serial.max(serial);
                            report.sent += 1;
                        }
                    }
                }
                Step::Recovered(mut summary) => {
                    // What this socket was sent, not what the log held.
                    summary["replayed"] = json!(std::mem::take(&mut report.sent));
                    report.recovered.push(summary);
                }
                failed @ Step::Failed { .. } => report.fail(failed, ctx),
            }
        }
        if run.is_finished() {
            report.finish(ctx);
        } else {
            self.resume_step(run, report, ctx);
        }
    }

    fn channel_history(&mut self, data: Value, ctx: &mut ws::WebsocketContext<Self>) {
        let Some(app) = self.app.clone() else { return };
        let Some(channel) = data
            .get("params")
            .unwrap_or(&data)
            .get("channel")
            .or_else(|| data.get("channel"))
            .and_then(Value::as_str)
            .map(str::to_string)
        else {
            return self.error(ctx, code::CHANNEL_ERROR, "channel_history needs a channel");
        };
        if !self.subscriptions.contains_key(&channel)
            && self
                .token
                .as_ref()
                .and_then(|t| t.capabilities.as_ref())
                .is_none_or(|c| !c.allows("history", &channel))
        {
            return self.error(
                ctx,
                code::CHANNEL_ERROR,
                "channel_history needs a subscription or the history capability",
            );
        }
        if self
            .token
            .as_ref()
            .and_then(|t| t.capabilities.as_ref())
            .is_some_and(|c| !c.allows("history", &channel))
        {
            return self.error(ctx, code::CHANNEL_ERROR, "the token does not grant history");
        }
        // Neither a membership that ended nor a token's history grant reaches a chat channel
        // the user may not see (SPEC §6).
        let check_as = match self.subscriptions.get(&channel) {
            Some(sub) => sub.via_member.clone(),
            None => self.token.as_ref().map(|t| t.user_id.clone()),
        };
        let params = data.get("params").cloned().unwrap_or(data);
        let registry = self.registry.clone();
        let max_page = app.settings.versioned_messages.max_page_size as i64;
        let ws_id = app.workspace_id.clone();
        let name = channel.clone();
        let work = self.registry.pool().run_blocking(move || {
            if !still_visible(&registry, &ws_id, &name, check_as.as_deref())? {
                return Err(ApiError::forbidden(
                    "the signed-in user may not see this channel",
                ));
            }
            let mut conn = registry.pool().get()?;
            crate::store::listing::channel_history(&mut conn, &ws_id, &name, &params, max_page)
        });
        ctx.spawn(work.into_actor(self).map(move |res, act, ctx| {
            match res.map_err(ApiError::internal).and_then(|r| r) {
                Ok(listing) => ctx.text(protocol::v2_event(
                    "pusher:channel_history",
                    Some(&channel),
                    listing,
                )),
                Err(e) => act.error(ctx, code::CHANNEL_ERROR, &e.message),
            }
        }));
    }

    /// Writes a committed version in this socket's shape.
    fn deliver(&mut self, d: Arc<PusherDelivery>, ctx: &mut ws::WebsocketContext<Self>) {
        let Some(sub) = self.subscriptions.get_mut(&*d.channel) else {
            return;
        };
        if d.seq <= sub.last_serial {
            return;
        }
        sub.last_serial = d.seq;
        sub.first_live.get_or_insert(d.seq);
        match (self.protocol, self.append_mode) {
            (Protocol::V1, _) => {
                if let Some(f) = &d.v1 {
                    ctx.text(f.clone());
                }
            }
            (Protocol::V2, AppendMode::Delta) => ctx.text(d.v2.clone()),
            (Protocol::V2, AppendMode::Full) => self.deliver_full(d, ctx),
        }
    }

    /// Full mode: an append carries the whole text. The socket keeps the text of messages
    /// it saw; one that started before it connected is read from the log once.
    fn deliver_full(&mut self, d: Arc<PusherDelivery>, ctx: &mut ws::WebsocketContext<Self>) {
        let p = &d.event.payload;
        if d.action != Action::Append {
            match p.get("data") {
                Some(Value::String(s)) => {
                    if self.texts.len() >= MAX_FULL_TEXTS {
                        if let Some(k) = self.texts.keys().next().cloned() {
                            self.texts.remove(&k);
                        }
                    }
                    self.texts.insert(d.message_serial.clone(), s.clone());
                }
                _ => {
                    self.texts.remove(&d.message_serial);
                }
            }
            return ctx.text(d.v2.clone());
        }
        let fragment = p.get("fragment").and_then(Value::as_str).unwrap_or("");
        let length = p.get("length").and_then(Value::as_u64).unwrap_or(0) as usize;
        if let Some(text) = self.texts.get_mut(&d.message_serial) {
            if text.len() + fragment.len() == length {
                text.push_str(fragment);
                let data = Value::String(text.clone());
                if let Some(f) = frame_of(&d.event, &d.channel, Some(&data)) {
                    ctx.text(f.v2());
                }
                return;
            }
        }
        let registry = self.registry.clone();
        let (channel_id, serial, seq) = (
            d.event.channel_id.clone().unwrap_or_default(),
            d.message_serial.clone(),
            d.seq,
        );
        let read = self.registry.pool().run_blocking(move || {
            let mut conn = registry.pool().get()?;
            Ok::<_, ApiError>(queries::text_at(&mut conn, &channel_id, &serial, seq)?)
        });
        ctx.wait(read.into_actor(self).map(move |res, act, ctx| {
            let text = match res {
                Ok(Ok(Some(t))) => t,
                _ => return Self::close(ctx, close_code::pusher::RECONNECT, "stream read failed"),
            };
            let data = Value::String(text.clone());
            if let Some(f) = frame_of(&d.event, &d.channel, Some(&data)) {
                ctx.text(f.v2());
            }
            act.texts.insert(d.message_serial.clone(), text);
        }));
    }
}

impl Actor for PusherSession {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.config.queue);
        let (app, token) = match self.admission.take() {
            Some(Admission::Admit { app, token }) => (app, token),
            Some(Admission::Refuse(c, message)) => {
                self.error(ctx, c, &message);
                return Self::close(ctx, c, &message);
            }
            None => return Self::close(ctx, code::RECONNECT, "restarted"),
        };
        if let Some(m) = crate::METRICS.get() {
            m.sessions.inc();
        }
        self.user_id = token.as_ref().map(|t| t.user_id.clone());
        self.token = token;
        self.app = Some(app.clone());
        let workspace = match self.registry.workspace(&app.workspace_id) {
            Ok(w) => w,
            Err(e) => {
                log::error!("pusher session cannot reach its workspace: {e}");
                return Self::close(ctx, code::RECONNECT, "internal error");
            }
        };
        workspace.do_send(Connect {
            session_id: self.id,
            socket_id: self.socket_id.clone(),
            recipient: ctx.address().recipient(),
            user_id: self.user_id.clone(),
        });
        self.workspace = Some(workspace);
        self.publish_identity();
        self.start_liveness(ctx);
        self.arm_token_expiry(ctx);
        ctx.text(protocol::connection_established(
            self.protocol,
            &self.socket_id,
            self.config.activity_timeout.as_secs(),
        ));
    }

    fn stopping(&mut self, _: &mut Self::Context) -> Running {
        if let Some(w) = self.workspace.take() {
            self.registry.remove_socket(&self.socket_id);
            w.do_send(Disconnect {
                session_id: self.id,
            });
            if let Some(m) = crate::METRICS.get() {
                m.sessions.dec();
            }
        }
        Running::Stop
    }
}

impl Handler<PusherOutbound> for PusherSession {
    type Result = ();

    fn handle(&mut self, msg: PusherOutbound, ctx: &mut Self::Context) {
        match msg {
            PusherOutbound::Message(d) => self.deliver(d, ctx),
            PusherOutbound::Frame(f) => ctx.text(f.for_protocol(self.protocol).clone()),
            PusherOutbound::Close(c, reason) => Self::close(ctx, c, reason),
        }
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for PusherSession {
    fn handle(&mut self, msg: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        self.last_seen = Instant::now();
        self.ping_sent = None;
        match msg {
            Ok(ws::Message::Text(t)) => self.on_frame(&t, ctx),
            Ok(ws::Message::Ping(p)) => ctx.pong(&p),
            Ok(ws::Message::Pong(_)) | Ok(ws::Message::Nop) => {}
            Ok(ws::Message::Binary(_)) | Ok(ws::Message::Continuation(_)) => self.error(
                ctx,
                code::INVALID_FRAME,
                "binary and fragmented frames are not part of the protocol; send JSON text",
            ),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(v: Value) -> Capabilities {
        Capabilities::from_claim(&v)
    }

    #[test]
    fn prefixes_decide_without_a_token() {
        let u = Known::Unknown;
        assert!(may_subscribe("news", &u, false, None).is_ok());
        assert!(may_subscribe("private-a", &u, false, None).is_err());
        assert!(may_subscribe("private-a", &u, true, None).is_ok());
        assert!(may_subscribe("presence-a", &u, false, None).is_err());
        assert!(may_subscribe("private-encrypted-a", &u, true, None).is_ok());
    }

    #[test]
    fn a_chat_channel_needs_a_member_or_a_signature() {
        let hidden = Known::Chat {
            id: "c".into(),
            last_seq: 0,
            visible_to_user: false,
        };
        let seen = Known::Chat {
            id: "c".into(),
            last_seq: 0,
            visible_to_user: true,
        };
        // Even a public-looking name: chat channels are not open to anonymous sockets.
        assert!(may_subscribe("general", &hidden, false, None).is_err());
        assert!(may_subscribe("general", &hidden, true, None).is_ok());
        assert!(may_subscribe("general", &seen, false, None).is_ok());
    }

    #[test]
    fn a_token_with_capabilities_allows_only_what_it_lists() {
        let u = Known::Unknown;
        let c = caps(json!({"subscribe": ["private-ai:*", "news"], "presence": ["presence-x"]}));
        assert!(may_subscribe("private-ai:1", &u, false, Some(&c)).is_ok());
        assert!(may_subscribe("news", &u, false, Some(&c)).is_ok());
        assert!(may_subscribe("sports", &u, false, Some(&c)).is_err());
        // Presence needs both grants.
        assert!(may_subscribe("presence-x", &u, false, Some(&c)).is_err());
        let both = caps(json!({"subscribe": ["presence-x"], "presence": ["presence-x"]}));
        assert!(may_subscribe("presence-x", &u, false, Some(&both)).is_ok());
        // A signature does not widen a token's grants.
        assert!(may_subscribe("private-b", &u, true, Some(&c)).is_err());
    }
}
