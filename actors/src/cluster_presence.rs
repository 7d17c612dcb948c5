//! Cluster-wide presence, occupancy and hub messages of the Pusher face (issue 6), with the
//! Redis broker. See `docs/cluster-presence.md` for the design; in short:
//!
//! - Each node's hubs stay the truth about their own sockets. Every change of a node's
//!   subscriptions or presence members on a channel is sent, in order, to one task on the
//!   broker's Redis thread, which applies it with a Lua script. Redis holds per channel the
//!   subscription count of each node and each node's presence members, so a script sees the
//!   cluster-wide count cross 0↔1 atomically: the node whose script saw it emits the webhook
//!   and the `member_added`/`member_removed` frames (to its own sockets directly, to the
//!   other nodes through pub/sub), exactly once.
//! - Each node keeps a liveness key with a TTL; any node's reaper removes the entries of a
//!   node whose key expired, in one script (so one reaper emits). A graceful shutdown removes
//!   its own at once.
//! - When Redis was unreachable, the node re-registers its whole local state when it comes
//!   back (diffed, so only real changes raise events; silently when Redis lost its data).
//! - Meanwhile, the node's own sockets keep working with the node's local view.
//! - After its pub/sub subscription comes back (and after a silent re-registration), each hub
//!   re-reads its presence channels' members, published through pub/sub in Redis's order,
//!   and tells its sockets the difference with what they were told (`PresenceSnapshot`).
//!
//! Redis I/O stays on the broker's thread: actors only push to an unbounded queue, and the
//! few callers that need an answer (a subscribe, the HTTP API) await a oneshot with a timeout
//! and fall back to the local view.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{timeout, Instant};

use crate::pusher::hub::{
    ChannelStat, ClusterResync, PresenceMember, PresenceResync, PresenceSeen, PresenceSnapshot,
    RemoteFrame, RemotePresence, TerminateUser, MAX_PRESENCE_MEMBERS,
};
use crate::registry::Registry;

/// Prefix of the pub/sub channel of hub messages: `switchboard:hub:{workspace}`.
pub const HUB_PREFIX: &str = "switchboard:hub:";
/// A node refreshes its liveness key this often.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
/// The liveness key's TTL: a node silent this long is dead.
pub const NODE_TTL: Duration = Duration::from_secs(8);
/// Every node looks for dead nodes this often.
pub const REAP_EVERY: Duration = Duration::from_secs(2);
/// A node that dies has its presence members and subscriptions removed within this bound
/// (its key expires at most `NODE_TTL` after its last heartbeat, and a reaper runs at most
/// `REAP_EVERY` later).
pub const DEAD_NODE_BOUND: Duration = Duration::from_secs(10);
/// Callers waiting for Redis (a subscribe, an HTTP query) fall back to the local view after
/// this.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(2);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// After Redis lost its data (its epoch was set anew), member lists are not re-read for
/// this long: every live node re-registers meanwhile (it reconnects within `MAX_BACKOFF` and
/// heartbeats every `HEARTBEAT_EVERY`), so a resync never reads a half-rebuilt list.
pub const SETTLE: Duration = Duration::from_secs(5);
/// Operations applied per wake-up at most (heartbeats are not starved by a busy queue).
const BATCH: usize = 256;

/// What a node-level subscribe learns from the cluster.
#[derive(Debug)]
pub enum ClusterJoin {
    /// The presence members of the whole cluster (empty on other channels).
    Members(Vec<(String, Value)>),
    /// The presence channel holds `MAX_PRESENCE_MEMBERS` other users cluster-wide.
    Full,
    /// Redis is unreachable: the local view stands.
    Unavailable,
}

/// One channel of a node as its hub knows it (for a re-registration).
#[derive(Debug, Serialize)]
pub struct ChannelState {
    pub name: String,
    pub count: usize,
    /// `(user_id, user_info as JSON text)`.
    pub members: Vec<(String, String)>,
}

/// Messages between nodes' hubs, on `switchboard:hub:{workspace}`. Member changes are
/// published by the Lua scripts themselves (every node, the sender included, applies them in
/// Redis's order); client events and terminations by the node that handled them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HubMessage {
    MemberAdded {
        channel: String,
        user_id: String,
        /// user_info as JSON text.
        info: String,
        /// The joining socket, on the node that ran the script: it is not told of itself.
        #[serde(default)]
        session: Option<String>,
    },
    MemberRemoved {
        channel: String,
        user_id: String,
    },
    /// A `client-*` event frame (the same for both protocols).
    Client {
        channel: String,
        frame: String,
    },
    Terminate {
        user_id: String,
    },
    /// The cluster-wide members of a channel, published by the snapshot script for the node
    /// that asked (a resync): in Redis's order with the member changes around it.
    Members {
        channel: String,
        /// `(user_id, user_info as JSON text)`.
        #[serde(default, deserialize_with = "list")]
        members: Vec<(String, String)>,
    },
    /// A node re-registered silently (Redis lost its data): every node re-reads its member
    /// lists.
    Resync,
}

#[derive(Serialize)]
struct EnvelopeOut<'a> {
    /// First, as in the broker's envelopes: a node skips its own messages by this prefix.
    node: &'a str,
    #[serde(flatten)]
    message: &'a HubMessage,
}

#[derive(Deserialize)]
struct EnvelopeIn {
    node: String,
    #[serde(flatten)]
    message: HubMessage,
}

pub(crate) enum Query {
    Channels { prefix: String },
    Channel { name: String },
    Users { name: String },
}

pub(crate) enum Answer {
    Channels(Vec<ChannelStat>),
    Channel(Option<ChannelStat>),
    Users(Vec<String>),
}

/// What hubs and the HTTP API ask of the Redis task, applied in the order sent.
pub(crate) enum Op {
    /// A socket subscribed: the node now has `count` subscriptions on the channel.
    Join {
        ws: String,
        channel: String,
        count: usize,
        member: Option<PresenceMember>,
        /// The member's first socket on this node (used when Redis is unreachable).
        arrived: bool,
        session: u64,
        reply: oneshot::Sender<ClusterJoin>,
    },
    /// A socket left: `count` subscriptions remain on this node; `departed` is a presence
    /// user whose last socket on this node it was.
    Leave {
        ws: String,
        channel: String,
        count: usize,
        departed: Option<String>,
    },
    /// Publish the cluster-wide members of these presence channels for this node's hub
    /// (`HubMessage::Members`), to resync what its sockets were told.
    Snapshot {
        ws: String,
        channels: Vec<String>,
    },
    /// This node's whole state in a workspace (channels absent from it are left).
    Sync {
        ws: String,
        channels: Vec<ChannelState>,
        silent: bool,
    },
    Publish {
        ws: String,
        message: HubMessage,
    },
    Query {
        ws: String,
        query: Query,
        reply: oneshot::Sender<Option<Answer>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// The handle hubs, sessions and the HTTP API use; the work happens on the broker's thread.
pub struct ClusterPresence {
    node: String,
    tx: mpsc::UnboundedSender<Op>,
}

impl ClusterPresence {
    pub(crate) fn new(node: String) -> (Arc<Self>, mpsc::UnboundedReceiver<Op>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Arc::new(Self { node, tx }), rx)
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub(crate) fn send(&self, op: Op) {
        // Closed only when the Redis thread is gone (the process is ending).
        let _ = self.tx.send(op);
    }

    async fn ask(&self, ws: &str, query: Query) -> Option<Answer> {
        let (reply, rx) = oneshot::channel();
        self.send(Op::Query {
            ws: ws.to_string(),
            query,
            reply,
        });
        timeout(REPLY_TIMEOUT, rx).await.ok()?.ok()?
    }

    /// Occupied channels of the cluster whose name starts with `prefix`, sorted by name;
    /// `None` when Redis cannot answer.
    pub async fn channels(&self, ws: &str, prefix: Option<&str>) -> Option<Vec<ChannelStat>> {
        let q = Query::Channels {
            prefix: prefix.unwrap_or("").to_string(),
        };
        match self.ask(ws, q).await? {
            Answer::Channels(mut list) => {
                list.sort_by(|a, b| a.name.cmp(&b.name));
                Some(list)
            }
            _ => None,
        }
    }

    /// One channel cluster-wide (`Some(None)`: nobody subscribes to it anywhere).
    pub async fn channel(&self, ws: &str, name: &str) -> Option<Option<ChannelStat>> {
        let q = Query::Channel {
            name: name.to_string(),
        };
        match self.ask(ws, q).await? {
            Answer::Channel(s) => Some(s),
            _ => None,
        }
    }

    /// The user ids of a presence channel cluster-wide, sorted.
    pub async fn users(&self, ws: &str, name: &str) -> Option<Vec<String>> {
        let q = Query::Users {
            name: name.to_string(),
        };
        match self.ask(ws, q).await? {
            Answer::Users(mut ids) => {
                ids.sort();
                Some(ids)
            }
            _ => None,
        }
    }

    /// Asks the other nodes to close the user's sockets (this node's are closed by the caller).
    pub fn terminate_user(&self, ws: &str, user_id: &str) {
        self.send(Op::Publish {
            ws: ws.to_string(),
            message: HubMessage::Terminate {
                user_id: user_id.to_string(),
            },
        });
    }

    /// Graceful shutdown: removes this node's entries (raising `member_removed` and
    /// `channel_vacated` where they were the last) and its liveness key.
    pub async fn shutdown(&self) {
        let (reply, rx) = oneshot::channel();
        self.send(Op::Shutdown { reply });
        let _ = timeout(Duration::from_secs(5), rx).await;
    }
}

/// A hub message from another node (`payload` on `switchboard:hub:{ws}`).
pub fn receive(registry: &Registry, node: &str, ws: &str, payload: &[u8]) {
    let Some(addr) = registry.running_workspace(ws) else {
        return;
    };
    let env: EnvelopeIn = match serde_json::from_slice(payload) {
        Ok(e) => e,
        Err(e) => {
            log::warn!("redis subscriber: malformed hub message on {ws}: {e}");
            return;
        }
    };
    let own = env.node == node;
    match env.message {
        HubMessage::MemberAdded {
            channel,
            user_id,
            info,
            session,
        } => addr.do_send(RemotePresence {
            channel,
            user_id,
            user_info: Some(info_value(&info)),
            except_session: session.filter(|_| own).and_then(|s| s.parse().ok()),
        }),
        HubMessage::MemberRemoved { channel, user_id } => addr.do_send(RemotePresence {
            channel,
            user_id,
            user_info: None,
            except_session: None,
        }),
        // This node's own were delivered to its sockets at once.
        HubMessage::Client { .. } | HubMessage::Terminate { .. } if own => {}
        HubMessage::Members { channel, members } => {
            // Asked for by this node's hub; the other nodes' sockets are not concerned.
            if own {
                addr.do_send(PresenceSnapshot {
                    channel,
                    members: members
                        .into_iter()
                        .map(|(u, i)| (u, info_value(&i)))
                        .collect(),
                });
            }
        }
        HubMessage::Resync => addr.do_send(PresenceResync { delay: None }),
        HubMessage::Client { channel, frame } => addr.do_send(RemoteFrame { channel, frame }),
        HubMessage::Terminate { user_id } => addr.do_send(TerminateUser { user_id }),
    }
}

// ------------------------------------------------------------------------------ Lua

/// Shared by every script. Keys (`{ws}` has no `:`, node ids are ULIDs):
/// - `node:{node}` liveness (TTL), `nodes` (set of known node ids), `epoch` (a value set
///   once: a different one means Redis lost its data);
/// - `subs:{ws}:{ch}` hash node → that node's subscription count;
/// - `pn:{ws}:{ch}` hash `{node}\n{user}` → user_info (JSON text);
/// - `pu:{ws}:{ch}` hash user → number of nodes where the user is present;
/// - `chans:{ws}` set of the occupied channels; `idx:{node}` set of `{ws}\n{ch}` where the
///   node has subscriptions (what a reaper removes).
const PRELUDE: &str = r#"
local P = 'switchboard:'
local function subs_key(ws, ch) return P .. 'subs:' .. ws .. ':' .. ch end
local function pu_key(ws, ch) return P .. 'pu:' .. ws .. ':' .. ch end
local function pn_key(ws, ch) return P .. 'pn:' .. ws .. ':' .. ch end
local function total(k)
  local t = 0
  for _, v in ipairs(redis.call('HVALS', k)) do t = t + tonumber(v) end
  return t
end
local function split(s)
  local nl = string.find(s, '\n', 1, true)
  return string.sub(s, 1, nl - 1), string.sub(s, nl + 1)
end
-- Sets a node's subscription count; answers 'occupied', 'vacated' or nil.
local function set_count(node, ws, ch, n)
  local k = subs_key(ws, ch)
  local before = total(k)
  local old = tonumber(redis.call('HGET', k, node) or '0')
  local idx, entry = P .. 'idx:' .. node, ws .. '\n' .. ch
  if n > 0 then
    redis.call('HSET', k, node, n)
    redis.call('SADD', idx, entry)
  else
    redis.call('HDEL', k, node)
    redis.call('SREM', idx, entry)
  end
  local after = before - old + n
  if after > 0 then
    redis.call('SADD', P .. 'chans:' .. ws, ch)
  else
    redis.call('SREM', P .. 'chans:' .. ws, ch)
  end
  if before == 0 and after > 0 then return 'occupied' end
  if before > 0 and after == 0 then return 'vacated' end
  return nil
end
-- true when the user was nowhere before.
local function add_member(node, ws, ch, user, info)
  local f = node .. '\n' .. user
  if redis.call('HSETNX', pn_key(ws, ch), f, info) == 0 then
    redis.call('HSET', pn_key(ws, ch), f, info)
    return false
  end
  return redis.call('HINCRBY', pu_key(ws, ch), user, 1) == 1
end
-- true when the user is now nowhere.
local function remove_member(node, ws, ch, user)
  if redis.call('HDEL', pn_key(ws, ch), node .. '\n' .. user) == 0 then return false end
  local left = redis.call('HINCRBY', pu_key(ws, ch), user, -1)
  if left <= 0 then
    redis.call('HDEL', pu_key(ws, ch), user)
    return true
  end
  return false
end
local function node_users(node, ws, ch)
  local prefix, out = node .. '\n', {}
  for _, f in ipairs(redis.call('HKEYS', pn_key(ws, ch))) do
    if string.sub(f, 1, #prefix) == prefix then table.insert(out, string.sub(f, #prefix + 1)) end
  end
  return out
end
local function snapshot(ws, ch)
  local seen, out = {}, {}
  local all = redis.call('HGETALL', pn_key(ws, ch))
  for i = 1, #all, 2 do
    local _, user = split(all[i])
    if not seen[user] then
      seen[user] = true
      table.insert(out, {user, all[i + 1]})
    end
  end
  return out
end
local function alive(node) return redis.call('EXISTS', P .. 'node:' .. node) == 1 end
"#;

/// Appended to the prelude: events are recorded for the caller and member changes published
/// to every node from inside the script, so all nodes see them in the order Redis applied
/// them. `ME` is the node running the script, `SESSION` the joining socket (if any), `QUIET`
/// a re-registration that announces nothing.
const NOTE: &str = r#"
local ME, SESSION, QUIET = '', '', false
local function note(ev, ws, ch, kind, user, info)
  table.insert(ev, {ws, ch, kind, user, info})
  if QUIET or (kind ~= 'added' and kind ~= 'removed') then return end
  local m = {node = ME, kind = 'member_' .. kind, channel = ch, user_id = user}
  if kind == 'added' then
    m.info = info
    if SESSION ~= '' then m.session = SESSION end
  end
  redis.call('PUBLISH', 'switchboard:hub:' .. ws, cjson.encode(m))
end
-- Removes everything of a node in one channel.
local function clear_channel(node, ws, ch, ev)
  for _, u in ipairs(node_users(node, ws, ch)) do
    if remove_member(node, ws, ch, u) then note(ev, ws, ch, 'removed', u, '') end
  end
  local occ = set_count(node, ws, ch, 0)
  if occ then note(ev, ws, ch, occ, '', '') end
end
"#;

/// ARGV: node, ws, channel, count, user ('' off presence), user_info, limit, snapshot (0/1),
/// session.
const JOIN: &str = r#"
local node, ws, ch, n = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local user, info = ARGV[5], ARGV[6]
ME, SESSION = node, ARGV[9]
if not alive(node) then return cjson.encode({lost = true}) end
if user ~= '' then
  local pu = pu_key(ws, ch)
  if redis.call('HEXISTS', pu, user) == 0 and redis.call('HLEN', pu) >= tonumber(ARGV[7]) then
    return cjson.encode({full = true})
  end
end
local ev = {}
local occ = set_count(node, ws, ch, n)
if occ then note(ev, ws, ch, occ, '', '') end
if user ~= '' and add_member(node, ws, ch, user, info) then
  note(ev, ws, ch, 'added', user, info)
end
local res = {ev = ev}
if ARGV[8] == '1' then res.members = snapshot(ws, ch) end
return cjson.encode(res)
"#;

/// ARGV: node, ws, channel, count, departed user ('' none).
const LEAVE: &str = r#"
local node, ws, ch, n, user = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
ME = node
if not alive(node) then return cjson.encode({lost = true}) end
local ev = {}
if user ~= '' and remove_member(node, ws, ch, user) then note(ev, ws, ch, 'removed', user, '') end
local occ = set_count(node, ws, ch, n)
if occ then note(ev, ws, ch, occ, '', '') end
return cjson.encode({ev = ev})
"#;

/// ARGV: node, ws, JSON `[{name, count, members: [[user, info]]}]`, quiet (0/1): the node's
/// whole state in the workspace; the differences are applied and reported.
const SYNC: &str = r#"
local node, ws = ARGV[1], ARGV[2]
ME, QUIET = node, ARGV[4] == '1'
if not alive(node) then return cjson.encode({lost = true}) end
local want = cjson.decode(ARGV[3])
local ev, keep = {}, {}
for _, c in ipairs(want) do keep[c.name] = true end
for _, entry in ipairs(redis.call('SMEMBERS', P .. 'idx:' .. node)) do
  local ews, ech = split(entry)
  if ews == ws and not keep[ech] then clear_channel(node, ws, ech, ev) end
end
for _, c in ipairs(want) do
  local present = {}
  for _, m in ipairs(c.members) do present[m[1]] = true end
  for _, u in ipairs(node_users(node, ws, c.name)) do
    if not present[u] and remove_member(node, ws, c.name, u) then
      note(ev, ws, c.name, 'removed', u, '')
    end
  end
  local occ = set_count(node, ws, c.name, c.count)
  if occ == 'occupied' then note(ev, ws, c.name, occ, '', '') end
  for _, m in ipairs(c.members) do
    if add_member(node, ws, c.name, m[1], m[2]) then note(ev, ws, c.name, 'added', m[1], m[2]) end
  end
  if occ == 'vacated' then note(ev, ws, c.name, occ, '', '') end
end
return cjson.encode({ev = ev})
"#;

/// ARGV: a node to remove (graceful shutdown), or '' for every node whose liveness key
/// expired; the caller. One script: exactly one caller gets the events of a dead node.
const REAP: &str = r#"
local targets, ev = {}, {}
ME = ARGV[2]
if ARGV[1] ~= '' then
  targets = {ARGV[1]}
else
  for _, n in ipairs(redis.call('SMEMBERS', P .. 'nodes')) do
    if not alive(n) then table.insert(targets, n) end
  end
end
for _, n in ipairs(targets) do
  local idx = P .. 'idx:' .. n
  for _, entry in ipairs(redis.call('SMEMBERS', idx)) do
    local ws, ch = split(entry)
    clear_channel(n, ws, ch, ev)
  end
  redis.call('DEL', idx)
  redis.call('SREM', P .. 'nodes', n)
  redis.call('DEL', P .. 'node:' .. n)
end
return cjson.encode({ev = ev, dead = targets})
"#;

/// ARGV: node, ttl ms, a new epoch (used if none is set), settle ms (no member list is
/// re-read for that long after a new epoch: see `SETTLE`). Answers the epoch and whether the
/// node's key was still there.
const HEARTBEAT: &str = r#"
local e = redis.call('GET', P .. 'epoch')
if not e then
  redis.call('SET', P .. 'epoch', ARGV[3])
  redis.call('SET', P .. 'settling', '1', 'PX', ARGV[4])
  e = ARGV[3]
end
local was = alive(ARGV[1])
redis.call('SET', P .. 'node:' .. ARGV[1], '1', 'PX', ARGV[2])
redis.call('SADD', P .. 'nodes', ARGV[1])
return cjson.encode({epoch = e, alive = was})
"#;

/// ARGV: node, ws, JSON list of channel names: publishes each channel's cluster-wide members
/// for that node (`HubMessage::Members`), in Redis's order with the member changes. Answers
/// `wait` (ms) while the cluster is still re-registering after a data loss.
const MEMBERS: &str = r#"
local node, ws = ARGV[1], ARGV[2]
if not alive(node) then return cjson.encode({lost = true}) end
local settling = redis.call('PTTL', P .. 'settling')
if settling > 0 then return cjson.encode({wait = settling}) end
for _, ch in ipairs(cjson.decode(ARGV[3])) do
  local m = {node = node, kind = 'members', channel = ch, members = snapshot(ws, ch)}
  redis.call('PUBLISH', 'switchboard:hub:' .. ws, cjson.encode(m))
end
return cjson.encode({ev = {}})
"#;

/// ARGV: 'channels' ws prefix | 'channel' ws name | 'users' ws name | 'index' node.
const QUERY: &str = r#"
local what, ws, arg = ARGV[1], ARGV[2], ARGV[3]
if what == 'channels' then
  local out = {}
  for _, ch in ipairs(redis.call('SMEMBERS', P .. 'chans:' .. ws)) do
    if string.sub(ch, 1, #arg) == arg then
      local t = total(subs_key(ws, ch))
      if t > 0 then table.insert(out, {ch, t, redis.call('HLEN', pu_key(ws, ch))}) end
    end
  end
  return cjson.encode(out)
elseif what == 'channel' then
  return cjson.encode({total(subs_key(ws, arg)), redis.call('HLEN', pu_key(ws, arg))})
elseif what == 'users' then
  return cjson.encode(redis.call('HKEYS', pu_key(ws, arg)))
else
  local out = {}
  for _, entry in ipairs(redis.call('SMEMBERS', P .. 'idx:' .. ws)) do
    local w, _ = split(entry)
    table.insert(out, w)
  end
  return cjson.encode(out)
end
"#;

#[derive(Clone, Copy)]
enum Script {
    Join,
    Leave,
    Sync,
    Reap,
    Heartbeat,
    Query,
    Members,
}

const SCRIPTS: [(Script, &str); 7] = [
    (Script::Join, JOIN),
    (Script::Leave, LEAVE),
    (Script::Sync, SYNC),
    (Script::Reap, REAP),
    (Script::Heartbeat, HEARTBEAT),
    (Script::Query, QUERY),
    (Script::Members, MEMBERS),
];

/// cjson encodes an empty table as `{}`: read it as an empty list.
fn list<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum L<T> {
        List(Vec<T>),
        #[allow(dead_code)]
        Empty(serde_json::Map<String, Value>),
    }
    Ok(match L::deserialize(d)? {
        L::List(v) => v,
        L::Empty(_) => Vec::new(),
    })
}

fn parse_list<T: for<'de> Deserialize<'de>>(text: &str) -> Option<Vec<T>> {
    let mut d = serde_json::Deserializer::from_str(text);
    list(&mut d).ok()
}

/// `(ws, channel, kind, user, info)`.
type Transition = (String, String, String, String, String);

#[derive(Deserialize, Default)]
struct Reply {
    #[serde(default)]
    lost: bool,
    #[serde(default)]
    full: bool,
    #[serde(default, deserialize_with = "list")]
    ev: Vec<Transition>,
    #[serde(default, deserialize_with = "list")]
    members: Vec<(String, String)>,
    /// The member lists cannot be read yet (ms): see `SETTLE`.
    #[serde(default)]
    wait: u64,
}

#[derive(Deserialize)]
struct Beat {
    epoch: String,
    alive: bool,
}

fn members_of(list: &[(String, String)]) -> Vec<(String, Value)> {
    list.iter()
        .map(|(u, i)| (u.clone(), info_value(i)))
        .collect()
}

fn info_value(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| json!({}))
}

// ------------------------------------------------------------------------------ the task

struct Task {
    client: redis::Client,
    node: String,
    handle: Arc<ClusterPresence>,
    registry: Arc<Registry>,
    conn: Option<redis::aio::MultiplexedConnection>,
    shas: Vec<String>,
    retry_at: Instant,
    backoff: Duration,
    /// The epoch Redis had when this node last registered.
    epoch: Option<String>,
    /// Redis was unreachable: said once in the log.
    down_reported: bool,
    stopped: bool,
}

/// Runs on the broker's thread until the process ends.
pub(crate) async fn run(
    client: redis::Client,
    handle: Arc<ClusterPresence>,
    mut rx: mpsc::UnboundedReceiver<Op>,
    registry: Arc<Registry>,
) {
    let mut task = Task {
        client,
        node: handle.node.clone(),
        handle,
        registry,
        conn: None,
        shas: Vec::new(),
        retry_at: Instant::now(),
        backoff: MIN_BACKOFF,
        epoch: None,
        down_reported: false,
        stopped: false,
    };
    let mut beat = tokio::time::interval(HEARTBEAT_EVERY);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reap = tokio::time::interval(REAP_EVERY);
    reap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            op = rx.recv() => {
                let Some(op) = op else { return };
                task.apply(op).await;
                for _ in 1..BATCH {
                    let Ok(op) = rx.try_recv() else { break };
                    task.apply(op).await;
                }
            }
            _ = beat.tick() => {
                if !task.stopped && task.connected().await {
                    task.heartbeat().await;
                }
            }
            _ = reap.tick() => {
                if !task.stopped && task.connected().await {
                    task.reap("").await;
                }
            }
        }
    }
}

impl Task {
    /// Connects when disconnected (not before the backoff allows); a new connection loads
    /// the scripts, registers the node and re-registers its state.
    async fn connected(&mut self) -> bool {
        if self.conn.is_some() {
            return true;
        }
        if self.stopped || Instant::now() < self.retry_at {
            return false;
        }
        match self.connect().await {
            Ok(()) => {
                if self.down_reported {
                    log::info!("cluster presence: Redis reachable again; re-registering");
                }
                self.down_reported = false;
                self.backoff = MIN_BACKOFF;
                self.heartbeat().await;
                self.conn.is_some()
            }
            Err(e) => {
                if !self.down_reported {
                    log::warn!("cluster presence: Redis unreachable ({e}); local view only");
                    self.down_reported = true;
                }
                self.retry_at = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                false
            }
        }
    }

    async fn connect(&mut self) -> Result<(), String> {
        let mut conn = timeout(
            CONNECT_TIMEOUT,
            self.client.get_multiplexed_async_connection(),
        )
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
        let mut shas = Vec::new();
        for (_, text) in SCRIPTS {
            let body = format!("{PRELUDE}\n{NOTE}\n{text}");
            let sha: String = timeout(
                COMMAND_TIMEOUT,
                redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(body)
                    .query_async(&mut conn),
            )
            .await
            .map_err(|_| "SCRIPT LOAD timed out".to_string())?
            .map_err(|e| e.to_string())?;
            shas.push(sha);
        }
        self.shas = shas;
        self.conn = Some(conn);
        Ok(())
    }

    fn disconnect(&mut self, why: &str) {
        if self.conn.take().is_some() {
            log::warn!("cluster presence: {why}; reconnecting");
        }
        self.retry_at = Instant::now() + self.backoff;
    }

    /// Runs a script; `None` (and the connection dropped) on any failure.
    async fn eval(&mut self, script: Script, args: &[&str]) -> Option<String> {
        let sha = self.shas.get(script as usize)?.clone();
        let conn = self.conn.as_mut()?;
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(sha).arg(0);
        for a in args {
            cmd.arg(*a);
        }
        match timeout(COMMAND_TIMEOUT, cmd.query_async::<String>(conn)).await {
            Ok(Ok(s)) => Some(s),
            Ok(Err(e)) => {
                self.disconnect(&format!("script failed: {e}"));
                None
            }
            Err(_) => {
                self.disconnect("Redis did not answer in time");
                None
            }
        }
    }

    /// A mutating script; a node found dead (reaped while it was cut off) registers again
    /// and retries once.
    async fn mutate(&mut self, script: Script, args: &[&str]) -> Option<Reply> {
        for _ in 0..2 {
            if !self.connected().await {
                return None;
            }
            let text = self.eval(script, args).await?;
            let reply: Reply = match serde_json::from_str(&text) {
                Ok(r) => r,
                Err(e) => {
                    log::error!("cluster presence: unreadable script answer ({e}): {text}");
                    return None;
                }
            };
            if !reply.lost {
                return Some(reply);
            }
            self.heartbeat().await;
        }
        None
    }

    async fn heartbeat(&mut self) {
        let ttl = NODE_TTL.as_millis().to_string();
        let fresh = ulid::Ulid::new().to_string();
        let settle = SETTLE.as_millis().to_string();
        let node = self.node.clone();
        let Some(text) = self
            .eval(Script::Heartbeat, &[&node, &ttl, &fresh, &settle])
            .await
        else {
            return;
        };
        let Ok(beat) = serde_json::from_str::<Beat>(&text) else {
            log::error!("cluster presence: unreadable heartbeat answer: {text}");
            return;
        };
        let lost_data = self.epoch.as_ref().is_some_and(|e| *e != beat.epoch);
        let first = self.epoch.is_none();
        self.epoch = Some(beat.epoch);
        if lost_data {
            log::warn!("cluster presence: Redis lost its data; re-registering this node");
            self.resync(true).await;
        } else if !beat.alive {
            if !first {
                log::warn!("cluster presence: this node was taken for dead; re-registering");
            }
            self.resync(false).await;
        }
    }

    /// Asks every hub of this node to send its whole state (in order with its later
    /// changes), and clears what Redis holds for workspaces this node no longer serves.
    async fn resync(&mut self, silent: bool) {
        let mut workspaces: HashSet<String> =
            self.registry.running_workspace_ids().into_iter().collect();
        let node = self.node.clone();
        if let Some(text) = self.eval(Script::Query, &["index", &node, ""]).await {
            workspaces.extend(parse_list::<String>(&text).unwrap_or_default());
        }
        for ws in workspaces {
            let tx = &self.handle;
            self.registry.with_workspace(&ws, |running| match running {
                Some(addr) => addr.do_send(ClusterResync { silent }),
                None => tx.send(Op::Sync {
                    ws: ws.clone(),
                    channels: Vec::new(),
                    silent,
                }),
            });
        }
    }

    async fn reap(&mut self, node: &str) {
        let me = self.node.clone();
        let Some(reply) = self.mutate(Script::Reap, &[node, &me]).await else {
            return;
        };
        if !reply.ev.is_empty() && node.is_empty() {
            log::warn!(
                "cluster presence: removed {} presence/occupancy entries of dead nodes",
                reply.ev.len()
            );
        }
        self.emit(reply.ev, false);
    }

    async fn apply(&mut self, op: Op) {
        if self.stopped {
            return self.fallback(op);
        }
        match op {
            Op::Join {
                ws,
                channel,
                count,
                member,
                arrived,
                session,
                reply,
            } => {
                let (user, info) = match &member {
                    Some(m) => (m.user_id.clone(), m.user_info.to_string()),
                    None => (String::new(), String::new()),
                };
                let limit = MAX_PRESENCE_MEMBERS.to_string();
                let snapshot = if member.is_some() { "1" } else { "0" };
                let node = self.node.clone();
                let args = [
                    node.as_str(),
                    &ws,
                    &channel,
                    &count.to_string(),
                    &user,
                    &info,
                    &limit,
                    snapshot,
                    &session.to_string(),
                ];
                match self.mutate(Script::Join, &args).await {
                    Some(r) if r.full => {
                        let _ = reply.send(ClusterJoin::Full);
                    }
                    Some(r) => {
                        let members = r
                            .members
                            .iter()
                            .map(|(u, i)| (u.clone(), info_value(i)))
                            .collect();
                        // The script announced the arrival before this answer: whoever
                        // the joiner tells next has been told already.
                        self.emit(r.ev, false);
                        if !r.members.is_empty() {
                            // What the joiner is told: the hub's view of the channel's members.
                            let seen: Vec<(String, Value)> = members_of(&r.members);
                            self.local_seen(&ws, channel, seen);
                        }
                        let _ = reply.send(ClusterJoin::Members(members));
                    }
                    None => self.fallback(Op::Join {
                        ws,
                        channel,
                        count,
                        member,
                        arrived,
                        session,
                        reply,
                    }),
                }
            }
            Op::Leave {
                ws,
                channel,
                count,
                departed,
            } => {
                let node = self.node.clone();
                let user = departed.clone().unwrap_or_default();
                let args = [node.as_str(), &ws, &channel, &count.to_string(), &user];
                match self.mutate(Script::Leave, &args).await {
                    Some(r) => self.emit(r.ev, false),
                    None => self.fallback(Op::Leave {
                        ws,
                        channel,
                        count,
                        departed,
                    }),
                }
            }
            Op::Sync {
                ws,
                channels,
                silent,
            } => {
                let node = self.node.clone();
                let state = serde_json::to_string(&channels).unwrap_or_else(|_| "[]".into());
                // cjson wants a list: `[]`, never `{}`.
                let quiet = if silent { "1" } else { "0" };
                if let Some(r) = self
                    .mutate(Script::Sync, &[&node, &ws, &state, quiet])
                    .await
                {
                    if !r.ev.is_empty() {
                        log::info!(
                            "cluster presence: workspace {ws} re-registered ({} changes{})",
                            r.ev.len(),
                            if silent { ", not announced" } else { "" }
                        );
                    }
                    let changed = !r.ev.is_empty();
                    self.emit(r.ev, silent);
                    if silent && changed {
                        // Nothing was announced: every node re-reads its member lists.
                        self.publish(&ws, &HubMessage::Resync).await;
                    }
                }
            }
            Op::Snapshot { ws, channels } => {
                let node = self.node.clone();
                let names = serde_json::to_string(&channels).unwrap_or_else(|_| "[]".into());
                // Asked again later while the cluster settles or Redis cannot answer.
                let again = match self.mutate(Script::Members, &[&node, &ws, &names]).await {
                    Some(r) if r.wait > 0 => Some(Duration::from_millis(r.wait + 100)),
                    Some(_) => None,
                    None => Some(MAX_BACKOFF),
                };
                if let (Some(delay), Some(addr)) = (again, self.registry.running_workspace(&ws)) {
                    addr.do_send(PresenceResync { delay: Some(delay) });
                }
            }
            Op::Publish { ws, message } => {
                if self.connected().await {
                    self.publish(&ws, &message).await;
                }
            }
            Op::Query { ws, query, reply } => {
                let answer = if self.connected().await {
                    self.query(&ws, query).await
                } else {
                    None
                };
                let _ = reply.send(answer);
            }
            Op::Shutdown { reply } => {
                let node = self.node.clone();
                if self.connected().await {
                    self.reap(&node).await;
                }
                self.stopped = true;
                let _ = reply.send(());
            }
        }
    }

    /// Redis unreachable: the node acts as if it were alone, for its own sockets only (no
    /// webhooks: another node may have raised them). Its state is re-registered later.
    fn fallback(&mut self, op: Op) {
        match op {
            Op::Join {
                ws,
                channel,
                member,
                arrived,
                session,
                reply,
                ..
            } => {
                let _ = reply.send(ClusterJoin::Unavailable);
                if let (Some(m), true) = (member, arrived) {
                    self.local(
                        &ws,
                        RemotePresence {
                            channel,
                            user_id: m.user_id,
                            user_info: Some(m.user_info),
                            except_session: Some(session),
                        },
                    );
                }
            }
            Op::Leave {
                ws,
                channel,
                departed: Some(user_id),
                ..
            } => self.local(
                &ws,
                RemotePresence {
                    channel,
                    user_id,
                    user_info: None,
                    except_session: None,
                },
            ),
            Op::Query { reply, .. } => {
                let _ = reply.send(None);
            }
            Op::Shutdown { reply } => {
                self.stopped = true;
                let _ = reply.send(());
            }
            // A resync is asked for again when the subscription comes back.
            Op::Leave { .. } | Op::Sync { .. } | Op::Publish { .. } | Op::Snapshot { .. } => {}
        }
    }

    fn local_seen(&self, ws: &str, channel: String, members: Vec<(String, Value)>) {
        if let Some(addr) = self.registry.running_workspace(ws) {
            addr.do_send(PresenceSeen { channel, members });
        }
    }

    fn local(&self, ws: &str, msg: RemotePresence) {
        if let Some(addr) = self.registry.running_workspace(ws) {
            addr.do_send(msg);
        }
    }

    /// The webhooks of what a script decided (its member frames were published by the
    /// script itself), once for the cluster.
    fn emit(&self, events: Vec<Transition>, silent: bool) {
        if silent {
            return;
        }
        for (ws, channel, kind, user, _) in events {
            let hook = match kind.as_str() {
                "occupied" | "vacated" => {
                    json!({"name": format!("channel_{kind}"), "channel": channel})
                }
                "added" | "removed" => json!({
                    "name": format!("member_{kind}"), "channel": channel, "user_id": user
                }),
                other => {
                    log::error!("cluster presence: unknown transition {other}");
                    continue;
                }
            };
            self.registry.emit_webhook(&ws, hook);
        }
    }

    async fn publish(&mut self, ws: &str, message: &HubMessage) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let payload = serde_json::to_string(&EnvelopeOut {
            node: &self.node,
            message,
        })
        .unwrap_or_default();
        let sent = timeout(
            COMMAND_TIMEOUT,
            redis::cmd("PUBLISH")
                .arg(format!("{HUB_PREFIX}{ws}"))
                .arg(payload)
                .query_async::<i64>(conn),
        )
        .await;
        if !matches!(sent, Ok(Ok(_))) {
            self.disconnect("publish failed");
        }
    }

    async fn query(&mut self, ws: &str, query: Query) -> Option<Answer> {
        let presence = |name: &str| name.starts_with("presence-");
        match query {
            Query::Channels { prefix } => {
                let text = self.eval(Script::Query, &["channels", ws, &prefix]).await?;
                let rows: Vec<(String, usize, usize)> = parse_list(&text)?;
                Some(Answer::Channels(
                    rows.into_iter()
                        .map(|(name, subs, users)| ChannelStat {
                            user_count: presence(&name).then_some(users),
                            name,
                            subscription_count: subs,
                        })
                        .collect(),
                ))
            }
            Query::Channel { name } => {
                let text = self.eval(Script::Query, &["channel", ws, &name]).await?;
                let (subs, users): (usize, usize) = serde_json::from_str(&text).ok()?;
                Some(Answer::Channel((subs > 0).then(|| ChannelStat {
                    user_count: presence(&name).then_some(users),
                    name,
                    subscription_count: subs,
                })))
            }
            Query::Users { name } => {
                let text = self.eval(Script::Query, &["users", ws, &name]).await?;
                Some(Answer::Users(parse_list(&text)?))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_lua_tables_read_as_empty_lists() {
        let r: Reply = serde_json::from_str(r#"{"ev":{}}"#).expect("reply");
        assert!(r.ev.is_empty());
        let r: Reply = serde_json::from_str(
            r#"{"ev":[["7","presence-a","added","u1","{}"]],"members":[["u1","{\"n\":1}"]]}"#,
        )
        .expect("reply");
        assert_eq!(r.ev[0].2, "added");
        assert_eq!(info_value(&r.members[0].1), json!({"n": 1}));
        assert_eq!(parse_list::<String>("{}"), Some(vec![]));
        assert_eq!(
            parse_list::<(String, usize, usize)>(r#"[["a",2,0]]"#),
            Some(vec![("a".into(), 2, 0)])
        );
    }

    #[test]
    fn hub_messages_start_with_the_node() {
        let m = HubMessage::Client {
            channel: "private-a".into(),
            frame: "{}".into(),
        };
        // As the scripts publish member changes (cjson: any key order, no `node` first).
        let lua = r#"{"user_id":"u1","kind":"member_added","channel":"presence-a","node":"n2","info":"{\"a\":1}","session":"12"}"#;
        let back: EnvelopeIn = serde_json::from_str(lua).expect("parse");
        assert!(matches!(
            back.message,
            HubMessage::MemberAdded { ref session, .. } if session.as_deref() == Some("12")
        ));
        let text = serde_json::to_string(&EnvelopeOut {
            node: "n1",
            message: &m,
        })
        .expect("json");
        assert!(text.starts_with("{\"node\":\"n1\""), "{text}");
        let back: EnvelopeIn = serde_json::from_str(&text).expect("parse");
        assert_eq!(back.node, "n1");
        assert!(matches!(back.message, HubMessage::Client { .. }));
        // A snapshot as the members script publishes it (an empty list is `{}` in cjson).
        let lua = r#"{"node":"n2","kind":"members","channel":"presence-a","members":{}}"#;
        let back: EnvelopeIn = serde_json::from_str(lua).expect("parse");
        assert!(matches!(
            back.message,
            HubMessage::Members { ref members, .. } if members.is_empty()
        ));
        let lua =
            r#"{"members":[["u1","{}"]],"channel":"presence-a","kind":"members","node":"n2"}"#;
        let back: EnvelopeIn = serde_json::from_str(lua).expect("parse");
        assert!(matches!(
            back.message,
            HubMessage::Members { ref members, .. } if members.len() == 1
        ));
        let text = serde_json::to_string(&EnvelopeOut {
            node: "n1",
            message: &HubMessage::Resync,
        })
        .expect("json");
        let back: EnvelopeIn = serde_json::from_str(&text).expect("parse");
        assert!(matches!(back.message, HubMessage::Resync), "{text}");
    }
}
