//! The Redis broker (cluster mode): committed events are delivered to this node's sockets at
//! once, as the local broker does, and published on Redis for the other nodes. Redis is only a
//! notification pipe: a node that misses notifications repairs the gap from the database
//! (see `gap_repair`), so publishing is best effort and never blocks the writer.
//!
//! Redis I/O runs on a thread of its own with a small tokio runtime: one task publishes what
//! the writer queued, one task listens (`PSUBSCRIBE switchboard:*`) and reconnects.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};

use crate::broker::{Broker, Control, LocalBroker};
use crate::cluster_presence::{self, ClusterPresence};
use crate::domain::event::Event;
use crate::pusher::hub::PresenceResync;
use crate::redis_wire::{self, Envelope};
use crate::registry::Registry;
use crate::workspace::{CatchUp, Deliver, DeliverEphemeral};

/// Batches waiting to be published; past it they are dropped (and repaired by readers).
const OUTBOX: usize = 16_384;
/// Batches sent in one pipeline.
const PIPELINE: usize = 256;
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// A silent subscription (a half-open TCP connection) is noticed by a ping this often.
const PING_EVERY: Duration = Duration::from_secs(5);

enum Outgoing {
    Durable(Vec<Arc<Event>>),
    Ephemeral(Arc<Event>),
    Control(String, Control),
}

/// Control notifications kept while Redis is unreachable, published on reconnection; past
/// it the oldest go (the other nodes' caches still expire, see `docs/cluster.md`).
const PENDING_CONTROLS: usize = 1024;

/// What the broker's health looks like from outside.
#[derive(Default)]
pub struct RedisStats {
    /// Batches not published (Redis down or the queue full).
    pub dropped: AtomicU64,
    /// The subscription is up.
    pub subscribed: AtomicBool,
}

pub struct RedisBroker {
    local: LocalBroker,
    outbox: mpsc::Sender<Outgoing>,
    stats: Arc<RedisStats>,
}

impl RedisBroker {
    /// Starts the Redis thread for `url` (`redis://host:port[/db]`). Connecting happens in the
    /// background: the node serves its own sockets while Redis is unreachable.
    pub fn start(url: &str, registry: Arc<Registry>) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| format!("broker {url}: {e}"))?;
        let node = ulid::Ulid::new().to_string();
        let stats = Arc::new(RedisStats::default());
        let (tx, rx) = mpsc::channel(OUTBOX);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("broker runtime: {e}"))?;
        let (s, r) = (stats.clone(), registry.clone());
        // Presence and occupancy across nodes (see `cluster_presence`).
        let (presence, ops) = ClusterPresence::new(node.clone());
        registry.set_cluster(presence.clone());
        std::thread::Builder::new()
            .name("redis-broker".into())
            .spawn(move || {
                runtime.block_on(async move {
                    tokio::join!(
                        publisher(client.clone(), node.clone(), rx, s.clone()),
                        cluster_presence::run(client.clone(), presence, ops, r.clone()),
                        subscriber(client, node, r, s),
                    );
                });
            })
            .map_err(|e| format!("broker thread: {e}"))?;
        log::info!("cluster broker: {}", redacted(url));
        Ok(Self {
            local: LocalBroker::new(registry),
            outbox: tx,
            stats,
        })
    }

    pub fn stats(&self) -> &RedisStats {
        &self.stats
    }

    fn queue(&self, item: Outgoing) {
        if self.outbox.try_send(item).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Broker for RedisBroker {
    fn publish(&self, events: Vec<Arc<Event>>) {
        self.local.publish(events.clone());
        self.queue(Outgoing::Durable(events));
    }

    fn publish_ephemeral(&self, event: Arc<Event>) {
        self.local.publish_ephemeral(event.clone());
        self.queue(Outgoing::Ephemeral(event));
    }

    fn publish_control(&self, workspace_id: &str, control: Control) {
        self.queue(Outgoing::Control(workspace_id.to_string(), control));
    }
}

/// The URL without a password, for logs.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
        _ => url.to_string(),
    }
}

/// `(redis channel, payload)` of each workspace's events, in order.
fn encode(node: &str, item: &Outgoing) -> Vec<(String, String)> {
    match item {
        Outgoing::Control(ws, control) => vec![redis_wire::encode_control(node, ws, control)],
        Outgoing::Ephemeral(ev) => vec![(
            redis_wire::channel_of(&ev.workspace_id, false),
            redis_wire::encode(node, std::slice::from_ref(ev)),
        )],
        Outgoing::Durable(events) => events
            .chunk_by(|a, b| a.workspace_id == b.workspace_id)
            .map(|group| {
                (
                    redis_wire::channel_of(&group[0].workspace_id, true),
                    redis_wire::encode(node, group),
                )
            })
            .collect(),
    }
}

async fn connect(client: &redis::Client) -> Option<redis::aio::MultiplexedConnection> {
    match timeout(CONNECT_TIMEOUT, client.get_multiplexed_async_connection()).await {
        Ok(Ok(c)) => Some(c),
        Ok(Err(e)) => {
            log::debug!("redis publisher: {e}");
            None
        }
        Err(_) => None,
    }
}

/// Publishes what the writer queued. While Redis is unreachable, batches are dropped but the
/// newest committed one of each workspace is kept and published on reconnection: a node that
/// had subscribed again meanwhile then sees the gap and repairs it, even if nothing else
/// commits later.
async fn publisher(
    client: redis::Client,
    node: String,
    mut rx: mpsc::Receiver<Outgoing>,
    stats: Arc<RedisStats>,
) {
    let mut conn = None;
    let mut retry_at = Instant::now();
    let mut backoff = MIN_BACKOFF;
    // Redis channel -> the newest unpublished durable payload of that workspace.
    let mut pending: HashMap<String, String> = HashMap::new();
    // Control notifications not published yet, oldest first.
    let mut controls: Vec<(String, String)> = Vec::new();
    loop {
        let first = if pending.is_empty() && controls.is_empty() {
            rx.recv().await.map(Some)
        } else {
            tokio::select! {
                item = rx.recv() => item.map(Some),
                _ = tokio::time::sleep_until(retry_at) => Some(None),
            }
        };
        let Some(first) = first else { return };
        let mut messages = Vec::new();
        let mut batches: u64 = 0;
        if let Some(item) = first {
            messages.extend(encode(&node, &item));
            batches = 1;
            while batches < PIPELINE as u64 {
                let Ok(next) = rx.try_recv() else { break };
                messages.extend(encode(&node, &next));
                batches += 1;
            }
        }
        if conn.is_none() && Instant::now() >= retry_at {
            conn = connect(&client).await;
            if conn.is_none() {
                retry_at = Instant::now() + backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        let Some(c) = conn.as_mut() else {
            keep_newest(&mut pending, &mut controls, messages);
            stats.dropped.fetch_add(batches, Ordering::Relaxed);
            continue;
        };
        let was_failing = !pending.is_empty() || !controls.is_empty();
        // Older (kept) notifications first: receivers expect cursors to grow.
        let mut out: Vec<(String, String)> = pending.drain().collect();
        out.append(&mut controls);
        out.extend(messages);
        let mut pipe = redis::pipe();
        for (channel, payload) in &out {
            pipe.cmd("PUBLISH").arg(channel).arg(payload).ignore();
        }
        let sent = matches!(
            timeout(COMMAND_TIMEOUT, pipe.query_async::<()>(c)).await,
            Ok(Ok(()))
        );
        if sent {
            if was_failing {
                log::info!("redis publisher: publishing again");
            }
            backoff = MIN_BACKOFF;
        } else {
            if !was_failing {
                log::warn!("redis publisher: Redis unreachable; other nodes will repair");
            }
            conn = None;
            retry_at = Instant::now() + backoff;
            keep_newest(&mut pending, &mut controls, out);
            stats.dropped.fetch_add(batches, Ordering::Relaxed);
        }
    }
}

/// Keeps the newest durable payload per Redis channel (later ones overwrite earlier ones) and
/// every control notification (up to [`PENDING_CONTROLS`], the newest).
fn keep_newest(
    pending: &mut HashMap<String, String>,
    controls: &mut Vec<(String, String)>,
    messages: Vec<(String, String)>,
) {
    for (channel, payload) in messages {
        if channel.starts_with(redis_wire::EVENTS_PREFIX) {
            pending.insert(channel, payload);
        } else if channel.starts_with(redis_wire::CONTROL_PREFIX) {
            controls.push((channel, payload));
        }
    }
    if controls.len() > PENDING_CONTROLS {
        let excess = controls.len() - PENDING_CONTROLS;
        controls.drain(..excess);
    }
}

async fn subscribe(client: &redis::Client) -> Result<redis::aio::PubSub, String> {
    let mut pubsub = timeout(CONNECT_TIMEOUT, client.get_async_pubsub())
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    timeout(COMMAND_TIMEOUT, pubsub.psubscribe(redis_wire::PATTERN))
        .await
        .map_err(|_| "psubscribe timed out".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(pubsub)
}

async fn subscriber(
    client: redis::Client,
    node: String,
    registry: Arc<Registry>,
    stats: Arc<RedisStats>,
) {
    let mut backoff = MIN_BACKOFF;
    let mut reported = false;
    loop {
        match subscribe(&client).await {
            Ok(pubsub) => {
                log::info!("redis subscriber: subscribed to {}", redis_wire::PATTERN);
                stats.subscribed.store(true, Ordering::Relaxed);
                backoff = MIN_BACKOFF;
                reported = false;
                // Notifications sent while unsubscribed are gone: read the events back, and
                // drop every cache another node's change (events or controls) could have
                // made stale.
                registry.drop_caches(None);
                // Member changes published meanwhile are gone too: the hubs re-read their
                // presence channels' members (through pub/sub, so in order with later ones).
                for w in registry.all_workspaces() {
                    w.do_send(CatchUp);
                    w.do_send(PresenceResync { delay: None });
                }
                listen(pubsub, &node, &registry).await;
                stats.subscribed.store(false, Ordering::Relaxed);
                log::warn!("redis subscriber: subscription lost; reconnecting");
            }
            Err(e) if !reported => {
                log::warn!("redis subscriber: {e}; retrying");
                reported = true;
            }
            Err(e) => log::debug!("redis subscriber: {e}"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Hands received events to this node's workspace actors until the connection ends.
async fn listen(pubsub: redis::aio::PubSub, node: &str, registry: &Registry) {
    let (mut sink, mut stream) = pubsub.split();
    // Our own messages start with this (field order is fixed): skipped without parsing.
    let own = format!("{{\"node\":{}", serde_json::Value::from(node));
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    loop {
        tokio::select! {
            msg = stream.next() => match msg {
                Some(m) => receive(&m, own.as_bytes(), node, registry),
                None => return,
            },
            _ = ping.tick() => {
                let pong = timeout(COMMAND_TIMEOUT, sink.ping::<redis::Value>()).await;
                if !matches!(pong, Ok(Ok(_))) {
                    return;
                }
            }
        }
    }
}

fn receive(msg: &redis::Msg, own: &[u8], node: &str, registry: &Registry) {
    let payload = msg.get_payload_bytes();
    let name = msg.get_channel_name();
    // Hub messages: a node applies its own member changes too (in Redis's order).
    if let Some(ws) = name.strip_prefix(cluster_presence::HUB_PREFIX) {
        return cluster_presence::receive(registry, node, ws, payload);
    }
    if payload.starts_with(own) {
        return;
    }
    if let Some(workspace_id) = redis_wire::parse_control_channel(name) {
        match serde_json::from_slice::<redis_wire::ControlIn>(payload) {
            Ok(c) if c.node != node => registry.apply_control(workspace_id, &c.control),
            Ok(_) => {}
            Err(e) => log::warn!("redis subscriber: malformed control on {workspace_id}: {e}"),
        }
        return;
    }
    let Some((workspace_id, durable)) = redis_wire::parse_channel(name) else {
        return;
    };
    // No actor: no socket of that workspace here, and a new actor starts from the database;
    // what the events change in this node's caches (channel actors, tokens) still counts.
    let addr = registry.running_workspace(workspace_id);
    if addr.is_none() && !(durable && redis_wire::may_change_caches(payload)) {
        return;
    }
    let envelope: Envelope = match serde_json::from_slice(payload) {
        Ok(e) => e,
        Err(e) => {
            log::warn!("redis subscriber: malformed message on {workspace_id}: {e}");
            return;
        }
    };
    if envelope.node == node {
        return;
    }
    let events = redis_wire::decode(envelope, workspace_id, durable);
    if durable {
        if events.is_empty() {
            return;
        }
        // Sockets hear of a change first (a blocked member gets its event, then the close).
        if let Some(addr) = &addr {
            addr.do_send(Deliver(events.clone()));
        }
        registry.apply_remote_events(&events);
    } else if let Some(addr) = addr {
        for ev in events {
            addr.do_send(DeliverEphemeral(ev));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(
            redacted("redis://:pw@host:6379/0"),
            "redis://***@host:6379/0"
        );
        assert_eq!(redacted("redis://host:1"), "redis://host:1");
    }
}
