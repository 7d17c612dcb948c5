//! The Pusher side of a workspace actor: which sockets subscribe to which channel names,
//! presence members (one entry per user however many sockets it has), occupancy, client
//! events, and the webhooks these changes raise. It lives in the WorkspaceActor so that a
//! committed message and a presence change reach sockets in one order.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytestring::ByteString;
use serde_json::{json, Value};

use super::delivery::PusherDelivery;
use super::protocol::{self, Protocol};
use crate::cluster_presence::{ChannelState, ClusterJoin, ClusterPresence, HubMessage, Op};
use crate::domain::event::Event;
use crate::error::close_code;
use crate::workspace::WorkspaceActor;

/// Pusher's limit of members on one presence channel.
pub const MAX_PRESENCE_MEMBERS: usize = 100;

/// What a Pusher socket receives from its workspace.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub enum PusherOutbound {
    /// A committed message version on a subscribed channel.
    Message(Arc<PusherDelivery>),
    /// A presence or client event, in each protocol's spelling.
    Frame(Arc<Frames>),
    Close(u16, &'static str),
}

#[derive(Debug)]
pub struct Frames {
    pub v1: ByteString,
    pub v2: ByteString,
}

impl Frames {
    fn per_protocol(build: impl Fn(Protocol) -> String) -> Arc<Self> {
        Arc::new(Self {
            v1: build(Protocol::V1).into(),
            v2: build(Protocol::V2).into(),
        })
    }
    fn same(frame: String) -> Arc<Self> {
        let f = ByteString::from(frame);
        Arc::new(Self {
            v1: f.clone(),
            v2: f,
        })
    }
    pub fn for_protocol(&self, p: Protocol) -> &ByteString {
        match p {
            Protocol::V1 => &self.v1,
            Protocol::V2 => &self.v2,
        }
    }
}

#[derive(Debug, Clone)]
pub struct PresenceMember {
    pub user_id: String,
    pub user_info: Value,
}

/// A socket joins its workspace's hub once, at connect.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Connect {
    pub session_id: u64,
    pub socket_id: Arc<str>,
    pub recipient: Recipient<PusherOutbound>,
    /// The signed-in user (token or `pusher:signin`), for `terminate_connections`.
    pub user_id: Option<String>,
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Identify {
    pub session_id: u64,
    pub user_id: String,
}

/// Subscribes; answers the presence data of a presence channel (`None` otherwise), or why
/// the subscription is refused.
#[derive(Message)]
#[rtype(result = "Result<Joined, &'static str>")]
pub struct Join {
    pub session_id: u64,
    pub channel: String,
    pub member: Option<PresenceMember>,
    /// The entity whose membership of a private chat channel admitted this socket (no
    /// signature): it receives that channel's messages only while it stays a recipient.
    pub via_member: Option<String>,
}

/// What a subscribe answers.
#[derive(Debug)]
pub struct Joined {
    /// The presence data this node knows of (presence channels only).
    pub presence: Option<Value>,
    /// Cluster mode: the cluster's answer (members on other nodes, or a full channel).
    pub cluster: Option<tokio::sync::oneshot::Receiver<ClusterJoin>>,
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Leave {
    pub session_id: u64,
    pub channel: String,
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnect {
    pub session_id: u64,
}

/// A `client-*` event from one socket to the other subscribers of its channel.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ClientEvent {
    pub session_id: u64,
    pub channel: String,
    pub event: String,
    pub data: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChannelStat {
    pub name: String,
    pub subscription_count: usize,
    /// Presence channels only.
    pub user_count: Option<usize>,
}

/// Occupied channels, optionally those whose name starts with `prefix`.
#[derive(Message)]
#[rtype(result = "Vec<ChannelStat>")]
pub struct ListChannels {
    pub prefix: Option<String>,
}

/// One channel; `None` when nobody subscribes to it.
#[derive(Message)]
#[rtype(result = "Option<ChannelStat>")]
pub struct ChannelStatus {
    pub name: String,
}

/// The user ids of a presence channel.
#[derive(Message)]
#[rtype(result = "Vec<String>")]
pub struct PresenceUsers {
    pub name: String,
}

/// Closes every socket signed in as this user; answers how many.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct TerminateUser {
    pub user_id: String,
}

/// Cluster mode: a presence change decided by the cluster (or, while Redis is unreachable,
/// by this node), for this node's subscribers of the channel. `user_info` is set on arrivals.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RemotePresence {
    pub channel: String,
    pub user_id: String,
    pub user_info: Option<Value>,
    /// The socket whose subscribe caused the arrival: it gets `subscription_succeeded`.
    pub except_session: Option<u64>,
}

/// Cluster mode: a client event sent by a socket of another node.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RemoteFrame {
    pub channel: String,
    pub frame: String,
}

/// Cluster mode: send this node's whole state of the workspace to the cluster again.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ClusterResync {
    /// Redis lost its data: rebuild without announcing anything.
    pub silent: bool,
}

/// Cluster mode: re-read the cluster-wide members of this workspace's presence channels and
/// tell the local sockets what they missed (the pub/sub subscription came back, or a node
/// re-registered after Redis lost its data).
#[derive(Message)]
#[rtype(result = "()")]
pub struct PresenceResync {
    /// `None`: the default debounce (`RESYNC_DEBOUNCE`).
    pub delay: Option<Duration>,
}

/// Cluster mode: the cluster-wide members of a channel, delivered in Redis's order with the
/// member changes (`HubMessage::Members`): the hub tells its sockets the difference with what
/// they were told.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PresenceSnapshot {
    pub channel: String,
    pub members: Vec<(String, Value)>,
}

/// Cluster mode: members a joining socket was told of (`subscription_succeeded`), counted as
/// told (no frame is sent).
#[derive(Message)]
#[rtype(result = "()")]
pub struct PresenceSeen {
    pub channel: String,
    pub members: Vec<(String, Value)>,
}

/// Resync requests arriving within this are served by one read.
const RESYNC_DEBOUNCE: Duration = Duration::from_millis(300);

/// The presence data of `subscription_succeeded`: `{presence: {ids, hash, count}}`.
pub fn presence_data(members: impl IntoIterator<Item = (String, Value)>) -> Value {
    let hash: serde_json::Map<String, Value> = members.into_iter().collect();
    let ids: Vec<&String> = hash.keys().collect();
    json!({"presence": {"ids": ids, "hash": hash, "count": hash.len()}})
}

/// The local presence data completed with the cluster's members (the local ones win: they
/// are newer than a snapshot).
pub fn merge_presence(local: &Value, cluster: Vec<(String, Value)>) -> Value {
    let mut members: Vec<(String, Value)> = cluster;
    if let Some(hash) = local["presence"]["hash"].as_object() {
        members.extend(hash.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    presence_data(members)
}

struct HubSession {
    recipient: Recipient<PusherOutbound>,
    socket_id: Arc<str>,
    user_id: Option<String>,
    channels: Vec<String>,
}

#[derive(Default)]
struct HubChannel {
    /// Subscribed sessions, each with its presence user id on presence channels.
    /// Ordered by session id (connect order), so a broadcast walks memory in allocation
    /// order, as `WorkspaceActor::sessions` does.
    subscribers: BTreeMap<u64, Option<String>>,
    /// Presence: user id → (user_info, sockets of that user on this channel).
    members: HashMap<String, (Value, usize)>,
    presence: bool,
    /// Sessions admitted by an entity's membership rather than a signature (see `Join`).
    via_member: HashMap<u64, String>,
    /// Cluster mode, presence: the cluster-wide members this node's sockets were told of
    /// (user id → user_info), as of the last member frame or snapshot; a resync tells them
    /// the difference with the cluster's list.
    told: HashMap<String, Value>,
}

impl HubChannel {
    fn stat(&self, name: &str) -> ChannelStat {
        ChannelStat {
            name: name.to_string(),
            subscription_count: self.subscribers.len(),
            user_count: self.presence.then_some(self.members.len()),
        }
    }

    fn presence_data(&self) -> Value {
        presence_data(
            self.members
                .iter()
                .map(|(id, (info, _))| (id.clone(), info.clone())),
        )
    }

    fn state(&self, name: &str) -> ChannelState {
        ChannelState {
            name: name.to_string(),
            count: self.subscribers.len(),
            members: self
                .members
                .iter()
                .map(|(id, (info, _))| (id.clone(), info.to_string()))
                .collect(),
        }
    }
}

/// Cluster mode: the Redis task and this hub's workspace.
struct ClusterLink {
    presence: Arc<ClusterPresence>,
    workspace_id: String,
}

/// The hub's state inside a WorkspaceActor.
#[derive(Default)]
pub struct PusherHub {
    sessions: BTreeMap<u64, HubSession>,
    channels: HashMap<String, HubChannel>,
    /// Set with the Redis broker: occupancy and presence events are then decided
    /// cluster-wide (see `cluster_presence`), not by this hub.
    cluster: Option<ClusterLink>,
    /// A presence resync is scheduled.
    resync_pending: bool,
}

impl PusherHub {
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    fn send(&mut self, to: u64, msg: PusherOutbound, overflow: &mut Vec<u64>) {
        if let Some(s) = self.sessions.get(&to) {
            match s.recipient.try_send(msg) {
                Ok(()) => {}
                Err(SendError::Full(PusherOutbound::Message(_))) => overflow.push(to),
                // Presence and client events are best-effort on a full queue.
                Err(_) => {}
            }
        }
    }

    /// Sends to every subscriber of `channel` but `except`.
    fn broadcast(&mut self, channel: &str, frames: Arc<Frames>, except: Option<u64>) {
        let Some(ch) = self.channels.get(channel) else {
            return;
        };
        let ids: Vec<u64> = ch
            .subscribers
            .keys()
            .copied()
            .filter(|id| Some(*id) != except)
            .collect();
        let mut overflow = Vec::new();
        for id in ids {
            self.send(id, PusherOutbound::Frame(frames.clone()), &mut overflow);
        }
    }

    /// Removes a session from one channel: presence departures and vacancy follow.
    fn leave(&mut self, session_id: u64, channel: &str, hooks: &mut Vec<Value>) {
        let Some(ch) = self.channels.get_mut(channel) else {
            return;
        };
        let Some(member) = ch.subscribers.remove(&session_id) else {
            return;
        };
        ch.via_member.remove(&session_id);
        let mut departed = None;
        if let Some(user) = member {
            if let Some((_, sockets)) = ch.members.get_mut(&user) {
                *sockets -= 1;
                if *sockets == 0 {
                    ch.members.remove(&user);
                    departed = Some(user);
                }
            }
        }
        let count = ch.subscribers.len();
        let vacant = count == 0;
        if vacant {
            self.channels.remove(channel);
        }
        if let Some(s) = self.sessions.get_mut(&session_id) {
            s.channels.retain(|c| c != channel);
        }
        if let Some(link) = &self.cluster {
            link.presence.send(Op::Leave {
                ws: link.workspace_id.clone(),
                channel: channel.to_string(),
                count,
                departed,
            });
            return;
        }
        if let Some(user) = departed {
            hooks.push(json!({"name": "member_removed", "channel": channel, "user_id": user}));
            let frames = Frames::per_protocol(|p| protocol::member_removed(p, channel, &user));
            self.broadcast(channel, frames, None);
        }
        if vacant {
            hooks.push(json!({"name": "channel_vacated", "channel": channel}));
        }
    }

    fn disconnect(&mut self, session_id: u64, hooks: &mut Vec<Value>) -> Option<HubSession> {
        let channels = self.sessions.get(&session_id)?.channels.clone();
        for c in channels {
            self.leave(session_id, &c, hooks);
        }
        self.sessions.remove(&session_id)
    }

    /// Fans a committed message version out to the channel's subscribers.
    pub fn deliver(&mut self, ev: &Arc<Event>) -> Vec<u64> {
        let mut overflow = Vec::new();
        let Some(name) = &ev.live.channel_name else {
            return overflow;
        };
        let Some(ch) = self.channels.get(&**name) else {
            return overflow;
        };
        let Some(d) = PusherDelivery::from_event(ev, name) else {
            return overflow;
        };
        let d = Arc::new(d);
        let ids: Vec<u64> = ch.subscribers.keys().copied().collect();
        let mut delivered = 0u64;
        for id in ids {
            let Some(s) = self.sessions.get(&id) else {
                continue;
            };
            if d.except_socket.as_deref() == Some(&*s.socket_id) {
                continue;
            }
            // A member removed from a private channel stops receiving it, as on the chat
            // face; a re-added one receives it again.
            if let (Some(recipients), Some(entity)) = (&ev.recipients, ch.via_member.get(&id)) {
                if !recipients.contains(entity) {
                    continue;
                }
            }
            match s.recipient.try_send(PusherOutbound::Message(d.clone())) {
                Ok(()) => delivered += 1,
                Err(SendError::Full(_)) => overflow.push(id),
                Err(SendError::Closed(_)) => {}
            }
        }
        if let Some(m) = crate::METRICS.get() {
            m.deliveries.inc_by(delivered);
        }
        overflow
    }

    /// Closes the sessions whose outbound queue overflowed (4100: reconnect with backoff).
    pub fn close_overflowed(&mut self, ids: Vec<u64>, hooks: &mut Vec<Value>) {
        for id in ids {
            if let Some(s) = self.disconnect(id, hooks) {
                s.recipient.do_send(PusherOutbound::Close(
                    close_code::pusher::OVER_CAPACITY,
                    "outbound buffer overflow; reconnect",
                ));
                if let Some(m) = crate::METRICS.get() {
                    m.overflows.inc();
                }
            }
        }
    }

    /// Closes every socket of a user (terminate_connections, a blocked member).
    pub fn close_user(
        &mut self,
        user_id: &str,
        code: u16,
        reason: &'static str,
        hooks: &mut Vec<Value>,
    ) -> usize {
        let ids: Vec<u64> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.user_id.as_deref() == Some(user_id))
            .map(|(id, _)| *id)
            .collect();
        let n = ids.len();
        for id in ids {
            if let Some(s) = self.disconnect(id, hooks) {
                s.recipient.do_send(PusherOutbound::Close(code, reason));
            }
        }
        n
    }

    pub fn close_all(&mut self, code: u16, reason: &'static str) {
        self.channels.clear();
        if let Some(link) = &self.cluster {
            // Nothing of this workspace is left on this node.
            link.presence.send(Op::Sync {
                ws: link.workspace_id.clone(),
                channels: Vec::new(),
                silent: false,
            });
        }
        for s in std::mem::take(&mut self.sessions).into_values() {
            s.recipient.do_send(PusherOutbound::Close(code, reason));
        }
    }
}

impl WorkspaceActor {
    fn emit_hooks(&self, hooks: Vec<Value>) {
        for h in hooks {
            self.registry.emit_webhook(&self.id, h);
        }
    }
}

impl Handler<Connect> for WorkspaceActor {
    type Result = ();

    fn handle(&mut self, msg: Connect, _: &mut Self::Context) {
        if self.pusher.cluster.is_none() {
            self.pusher.cluster = self.registry.cluster().map(|presence| ClusterLink {
                presence,
                workspace_id: self.id.clone(),
            });
        }
        self.pusher.sessions.insert(
            msg.session_id,
            HubSession {
                recipient: msg.recipient,
                socket_id: msg.socket_id,
                user_id: msg.user_id,
                channels: Vec::new(),
            },
        );
    }
}

impl Handler<Identify> for WorkspaceActor {
    type Result = ();

    fn handle(&mut self, msg: Identify, _: &mut Self::Context) {
        if let Some(s) = self.pusher.sessions.get_mut(&msg.session_id) {
            s.user_id = Some(msg.user_id);
        }
    }
}

impl Handler<Join> for WorkspaceActor {
    type Result = Result<Joined, &'static str>;

    fn handle(&mut self, msg: Join, _: &mut Self::Context) -> Self::Result {
        let hub = &mut self.pusher;
        let Some(session) = hub.sessions.get_mut(&msg.session_id) else {
            return Err("the socket is closing");
        };
        let ch = hub.channels.entry(msg.channel.clone()).or_default();
        let occupied = ch.subscribers.is_empty();
        ch.presence = msg.member.is_some();
        if let Some(m) = &msg.member {
            if !ch.members.contains_key(&m.user_id) && ch.members.len() >= MAX_PRESENCE_MEMBERS {
                if occupied {
                    hub.channels.remove(&msg.channel);
                }
                return Err("the presence channel is full");
            }
        }
        match &msg.via_member {
            Some(entity) => ch.via_member.insert(msg.session_id, entity.clone()),
            None => ch.via_member.remove(&msg.session_id),
        };
        // A second subscribe of the same socket changes nothing but is answered again.
        let again = ch.subscribers.contains_key(&msg.session_id);
        let mut arrived = None;
        if !again {
            session.channels.push(msg.channel.clone());
            ch.subscribers.insert(
                msg.session_id,
                msg.member.as_ref().map(|m| m.user_id.clone()),
            );
            if let Some(m) = &msg.member {
                let entry = ch
                    .members
                    .entry(m.user_id.clone())
                    .or_insert_with(|| (m.user_info.clone(), 0));
                entry.1 += 1;
                if entry.1 == 1 {
                    arrived = Some(m.clone());
                }
            }
        }
        let answer = ch.presence.then(|| ch.presence_data());
        if let Some(link) = &hub.cluster {
            // The cluster decides occupancy and arrivals, and knows the other nodes' members.
            let (reply, rx) = tokio::sync::oneshot::channel();
            link.presence.send(Op::Join {
                ws: link.workspace_id.clone(),
                channel: msg.channel.clone(),
                count: ch.subscribers.len(),
                member: msg.member,
                arrived: arrived.is_some(),
                session: msg.session_id,
                reply,
            });
            return Ok(Joined {
                presence: answer,
                cluster: Some(rx),
            });
        }
        if again {
            return Ok(Joined {
                presence: answer,
                cluster: None,
            });
        }
        let mut hooks = Vec::new();
        if occupied {
            hooks.push(json!({"name": "channel_occupied", "channel": msg.channel}));
        }
        if let Some(m) = arrived {
            hooks.push(
                json!({"name": "member_added", "channel": msg.channel, "user_id": m.user_id}),
            );
            let channel = msg.channel.clone();
            let frames = Frames::per_protocol(|p| {
                protocol::member_added(p, &channel, &m.user_id, &m.user_info)
            });
            hub.broadcast(&msg.channel, frames, Some(msg.session_id));
        }
        self.emit_hooks(hooks);
        Ok(Joined {
            presence: answer,
            cluster: None,
        })
    }
}

impl Handler<Leave> for WorkspaceActor {
    type Result = ();

    fn handle(&mut self, msg: Leave, _: &mut Self::Context) {
        let mut hooks = Vec::new();
        self.pusher.leave(msg.session_id, &msg.channel, &mut hooks);
        self.emit_hooks(hooks);
    }
}

impl Handler<Disconnect> for WorkspaceActor {
    type Result = ();

    fn handle(&mut self, msg: Disconnect, ctx: &mut Self::Context) {
        let mut hooks = Vec::new();
        self.pusher.disconnect(msg.session_id, &mut hooks);
        self.emit_hooks(hooks);
        self.stop_when_idle(ctx);
    }
}

impl Handler<ClientEvent> for WorkspaceActor {
    type Result = ();

    fn handle(&mut self, msg: ClientEvent, _: &mut Self::Context) {
        let hub = &mut self.pusher;
        let Some(sender) = hub.sessions.get(&msg.session_id) else {
            return;
        };
        let Some(ch) = hub.channels.get(&msg.channel) else {
            return;
        };
        // On presence channels the relayed event names its sender's user.
        let user_id = ch.subscribers.get(&msg.session_id).cloned().flatten();
        // Pusher's webhook carries the client's data as a string.
        let data_text = match &msg.data {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let mut hook = json!({
            "name": "client_event", "channel": msg.channel, "event": msg.event,
            "data": data_text, "socket_id": &*sender.socket_id,
        });
        if let Some(u) = &user_id {
            hook["user_id"] = json!(u);
        }
        let frame = protocol::client_event(&msg.channel, &msg.event, &msg.data, user_id.as_deref());
        if let Some(link) = &hub.cluster {
            link.presence.send(Op::Publish {
                ws: link.workspace_id.clone(),
                message: HubMessage::Client {
                    channel: msg.channel.clone(),
                    frame: frame.clone(),
                },
            });
        }
        hub.broadcast(&msg.channel, Frames::same(frame), Some(msg.session_id));
        self.emit_hooks(vec![hook]);
    }
}

impl Handler<RemotePresence> for WorkspaceActor {
    type Result = ();

    fn handle(&mut self, msg: RemotePresence, _: &mut Self::Context) {
        let channel = msg.channel;
        if let Some(ch) = self.pusher.channels.get_mut(&channel) {
            match &msg.user_info {
                Some(info) => ch.told.insert(msg.user_id.clone(), info.clone()),
                None => ch.told.remove(&msg.user_id),
            };
        }
        let frames = match &msg.user_info {
            Some(info) => {
                Frames::per_protocol(|p| protocol::member_added(p, &channel, &msg.user_id, info))
            }
            None => Frames::per_protocol(|p| protocol::member_removed(p, &channel, &msg.user_id)),
        };
        self.pusher.broadcast(&channel, frames, msg.except_session);
    }
}

impl Handler<PresenceSeen> for WorkspaceActor {
    type Result = ();

    fn handle(&mut self, msg: PresenceSeen, _: &mut Self::Context) {
        if let Some(ch) = self.pusher.channels.get_mut(&msg.channel) {
            for (user, info) in msg.members {
                ch.told.entry(user).or_insert(info);
            }
        }
    }
}

impl Handler<PresenceResync> for WorkspaceActor {
    type Result = ();

    fn handle(&mut self, msg: PresenceResync, ctx: &mut Self::Context) {
        if self.pusher.cluster.is_none() || self.pusher.resync_pending {
            return;
        }
        self.pusher.resync_pending = true;
        ctx.run_later(msg.delay.unwrap_or(RESYNC_DEBOUNCE), |act, _| {
            act.pusher.resync_pending = false;
            let Some(link) = &act.pusher.cluster else {
                return;
            };
            let mut channels: Vec<String> = act
                .pusher
                .channels
                .iter()
                .filter(|(_, ch)| ch.presence)
                .map(|(name, _)| name.clone())
                .collect();
            if channels.is_empty() {
                return;
            }
            channels.sort();
            // Behind this node's earlier operations; the answer comes back through pub/sub,
            // in order with the member changes (`PresenceSnapshot`).
            link.presence.send(Op::Snapshot {
                ws: link.workspace_id.clone(),
                channels,
            });
        });
    }
}

impl Handler<PresenceSnapshot> for WorkspaceActor {
    type Result = ();

    fn handle(&mut self, msg: PresenceSnapshot, _: &mut Self::Context) {
        let hub = &mut self.pusher;
        let Some(ch) = hub.channels.get_mut(&msg.channel) else {
            return;
        };
        if !ch.presence {
            return;
        }
        let now: HashMap<String, Value> = msg.members.into_iter().collect();
        let mut removed: Vec<String> = ch
            .told
            .keys()
            .filter(|u| !now.contains_key(*u))
            .cloned()
            .collect();
        let mut added: Vec<(String, Value)> = now
            .iter()
            .filter(|(u, _)| !ch.told.contains_key(*u))
            .map(|(u, i)| (u.clone(), i.clone()))
            .collect();
        removed.sort();
        added.sort_by(|a, b| a.0.cmp(&b.0));
        if !removed.is_empty() || !added.is_empty() {
            log::info!(
                "cluster presence: {} resynced ({} added, {} removed)",
                msg.channel,
                added.len(),
                removed.len()
            );
        }
        ch.told = now;
        // The sockets only: the webhooks were decided by the scripts.
        let channel = msg.channel;
        for user in removed {
            let frames = Frames::per_protocol(|p| protocol::member_removed(p, &channel, &user));
            hub.broadcast(&channel, frames, None);
        }
        for (user, info) in added {
            let frames =
                Frames::per_protocol(|p| protocol::member_added(p, &channel, &user, &info));
            hub.broadcast(&channel, frames, None);
        }
    }
}

impl Handler<RemoteFrame> for WorkspaceActor {
    type Result = ();

    fn handle(&mut self, msg: RemoteFrame, _: &mut Self::Context) {
        self.pusher
            .broadcast(&msg.channel, Frames::same(msg.frame), None);
    }
}

impl Handler<ClusterResync> for WorkspaceActor {
    type Result = ();

    fn handle(&mut self, msg: ClusterResync, _: &mut Self::Context) {
        let Some(presence) = self.registry.cluster() else {
            return;
        };
        let channels = self
            .pusher
            .channels
            .iter()
            .map(|(name, ch)| ch.state(name))
            .collect();
        presence.send(Op::Sync {
            ws: self.id.clone(),
            channels,
            silent: msg.silent,
        });
    }
}

impl Handler<ListChannels> for WorkspaceActor {
    type Result = Vec<ChannelStat>;

    fn handle(&mut self, msg: ListChannels, _: &mut Self::Context) -> Self::Result {
        let mut list: Vec<ChannelStat> = self
            .pusher
            .channels
            .iter()
            .filter(|(name, _)| msg.prefix.as_deref().is_none_or(|p| name.starts_with(p)))
            .map(|(name, ch)| ch.stat(name))
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }
}

impl Handler<ChannelStatus> for WorkspaceActor {
    type Result = Option<ChannelStat>;

    fn handle(&mut self, msg: ChannelStatus, _: &mut Self::Context) -> Self::Result {
        self.pusher
            .channels
            .get(&msg.name)
            .map(|c| c.stat(&msg.name))
    }
}

impl Handler<PresenceUsers> for WorkspaceActor {
    type Result = Vec<String>;

    fn handle(&mut self, msg: PresenceUsers, _: &mut Self::Context) -> Self::Result {
        let mut ids: Vec<String> = self
            .pusher
            .channels
            .get(&msg.name)
            .map(|c| c.members.keys().cloned().collect())
            .unwrap_or_default();
        ids.sort();
        ids
    }
}

impl Handler<TerminateUser> for WorkspaceActor {
    type Result = usize;

    fn handle(&mut self, msg: TerminateUser, _: &mut Self::Context) -> usize {
        let mut hooks = Vec::new();
        let n = self.pusher.close_user(
            &msg.user_id,
            close_code::pusher::UNAUTHORIZED,
            "connections terminated by the server",
            &mut hooks,
        );
        self.emit_hooks(hooks);
        n
    }
}
