//! Finds or starts the actor of a workspace or channel. Actors start lazily and the database
//! can always rebuild them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use actix::{Actor, Addr};

use crate::broker::Control;
use crate::channel::{ChannelActor, Refresh};
use crate::cluster_presence::ClusterPresence;
use crate::domain::capabilities::Capabilities;
use crate::domain::event::Event;
use crate::error::{ApiError, ApiResult};
use crate::persistence::Persistence;
use crate::store::{queries, DbPool};
use crate::workspace::{CloseEntity, WorkspaceActor};

/// What a connected socket is, for server requests that act through it (`socket_id`).
#[derive(Debug, Clone)]
pub struct SocketIdentity {
    pub workspace_id: String,
    pub entity_id: String,
    pub capabilities: Capabilities,
}

/// Where hub changes go as webhooks: (workspace id, one `events` entry).
pub type WebhookSink = Box<dyn Fn(&str, serde_json::Value) + Send + Sync>;
/// Told when a workspace's settings change, so caches of them (webhooks) drop at once.
pub type SettingsHook = Box<dyn Fn(&str) + Send + Sync>;
/// Told when another node changed something the HTTP layer caches (see [`CacheScope`]).
pub type CacheHook = Box<dyn Fn(CacheScope<'_>) + Send + Sync>;

/// What cached state another node made stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheScope<'a> {
    /// Anything may have changed (notifications may have been missed).
    All,
    /// The workspace's settings or keys.
    Workspace(&'a str),
    /// One entity of a workspace (its role, block, activity).
    Entity {
        workspace_id: &'a str,
        entity_id: &'a str,
    },
    /// The channels of a workspace (one may have been renamed).
    Channels(&'a str),
}

pub struct Registry {
    pool: DbPool,
    webhooks: std::sync::OnceLock<WebhookSink>,
    settings_changed: std::sync::OnceLock<SettingsHook>,
    /// Cluster mode (Redis broker): presence and occupancy shared between nodes.
    cluster: std::sync::OnceLock<Arc<ClusterPresence>>,
    workspaces: Mutex<HashMap<String, Addr<WorkspaceActor>>>,
    /// Channel actors by channel id, with their workspace.
    channels: Mutex<HashMap<String, (String, Addr<ChannelActor>)>>,
    /// Drops the HTTP layer's caches (verified tokens, apps) of a scope.
    cache_hook: std::sync::OnceLock<CacheHook>,
    sockets: Mutex<HashMap<String, SocketIdentity>>,
}

impl Registry {
    pub fn new(pool: DbPool) -> Arc<Self> {
        Arc::new(Self {
            pool,
            webhooks: std::sync::OnceLock::new(),
            settings_changed: std::sync::OnceLock::new(),
            cluster: std::sync::OnceLock::new(),
            workspaces: Mutex::default(),
            channels: Mutex::default(),
            cache_hook: std::sync::OnceLock::new(),
            sockets: Mutex::default(),
        })
    }

    /// The workspace's actor if one runs (it runs while it has sessions).
    pub fn running_workspace(&self, id: &str) -> Option<Addr<WorkspaceActor>> {
        self.workspaces
            .lock()
            .ok()?
            .get(id)
            .filter(|a| a.connected())
            .cloned()
    }

    /// Finds or starts the workspace actor. The start reads the committed cursor while the
    /// registry is locked, so the broker (which needs the lock to find it) delivers every
    /// later event to it and nothing is missed between the read and the registration.
    pub fn workspace(self: &Arc<Self>, id: &str) -> ApiResult<Addr<WorkspaceActor>> {
        let mut map = self
            .workspaces
            .lock()
            .map_err(|_| ApiError::internal("registry poisoned"))?;
        if let Some(addr) = map.get(id).filter(|a| a.connected()) {
            return Ok(addr.clone());
        }
        let mut conn = self.pool.get()?;
        let (last_cursor, _) = queries::workspace_cursor_state(&mut conn, id)?;
        let addr = WorkspaceActor::new(id.to_string(), last_cursor, self.clone()).start();
        map.insert(id.to_string(), addr.clone());
        Ok(addr)
    }

    /// Forgets a workspace actor that stopped for being idle.
    pub fn remove_workspace(&self, id: &str, addr: &Addr<WorkspaceActor>) {
        let mut map = lock(&self.workspaces);
        if map.get(id) == Some(addr) {
            map.remove(id);
        }
    }

    /// Finds or starts the channel actor; `not_found` when the channel does not exist in
    /// `workspace_id`.
    pub fn channel(
        self: &Arc<Self>,
        workspace_id: &str,
        id: &str,
        persistence: &Persistence,
    ) -> ApiResult<Addr<ChannelActor>> {
        let mut map = self
            .channels
            .lock()
            .map_err(|_| ApiError::internal("registry poisoned"))?;
        if let Some((_, addr)) = map.get(id).filter(|(_, a)| a.connected()) {
            return Ok(addr.clone());
        }
        let mut conn = self.pool.get()?;
        let channel = queries::channel(&mut conn, id)?
            .filter(|c| c.workspace_id == workspace_id)
            .ok_or_else(|| ApiError::not_found("channel not found"))?;
        let addr = ChannelActor::new(
            channel,
            self.pool.clone(),
            persistence.clone(),
            self.clone(),
        )
        .start();
        map.insert(id.to_string(), (workspace_id.to_string(), addr.clone()));
        Ok(addr)
    }

    pub fn remove_channel(&self, id: &str, addr: &Addr<ChannelActor>) {
        let mut map = lock(&self.channels);
        if map.get(id).map(|(_, a)| a) == Some(addr) {
            map.remove(id);
        }
    }

    /// The channel's actor if one runs on this node.
    pub fn running_channel(&self, id: &str) -> Option<Addr<ChannelActor>> {
        lock(&self.channels)
            .get(id)
            .map(|(_, a)| a)
            .filter(|a| a.connected())
            .cloned()
    }

    /// The running channel actors of one workspace (`None`: of every workspace).
    fn running_channels(&self, workspace_id: Option<&str>) -> Vec<Addr<ChannelActor>> {
        lock(&self.channels)
            .values()
            .filter(|(w, a)| workspace_id.is_none_or(|ws| ws == w) && a.connected())
            .map(|(_, a)| a.clone())
            .collect()
    }

    pub fn pool(&self) -> &DbPool {
        &self.pool
    }
}

impl Registry {
    /// Set once at start; without it webhooks are not sent (tests of the actors alone).
    pub fn set_webhook_sink(&self, sink: WebhookSink) {
        let _ = self.webhooks.set(sink);
    }

    pub fn set_settings_hook(&self, hook: SettingsHook) {
        let _ = self.settings_changed.set(hook);
    }

    pub fn settings_changed(&self, workspace_id: &str) {
        if let Some(hook) = self.settings_changed.get() {
            hook(workspace_id);
        }
    }

    pub fn set_cache_hook(&self, hook: CacheHook) {
        let _ = self.cache_hook.set(hook);
    }

    fn drop_http_caches(&self, scope: CacheScope<'_>) {
        if let Some(hook) = self.cache_hook.get() {
            hook(scope);
        }
    }

    /// Committed events another node wrote (received from the broker, or read back by gap
    /// repair): this node's caches of what they changed go before it checks later requests.
    /// A channel's actor reloads its view at once when its membership, roles or fields
    /// changed, and before its next seq-taking write when a message changed (a write on the
    /// stale view would be refused anyway); verified tokens of a moderated entity drop, and a
    /// blocked entity's sockets here close as they do on the node that blocked it.
    pub fn apply_remote_events(&self, events: &[Arc<Event>]) {
        for ev in events {
            match ev.event_type.as_str() {
                "channel.updated" => {
                    self.refresh_channel(ev.channel_id.as_deref(), true);
                    self.drop_http_caches(CacheScope::Channels(&ev.workspace_id));
                }
                "channel.member_added" | "channel.member_removed" => {
                    self.refresh_channel(ev.channel_id.as_deref(), true);
                }
                "message.updated" | "message.deleted" | "message.appended" => {
                    self.refresh_channel(ev.channel_id.as_deref(), false);
                }
                "member.moderation_updated" | "member.updated" => {
                    let Some(entity_id) = ev
                        .payload
                        .get("user_id")
                        .or_else(|| ev.payload.get("entity_id"))
                        .and_then(|v| v.as_str())
                    else {
                        self.drop_http_caches(CacheScope::Workspace(&ev.workspace_id));
                        continue;
                    };
                    self.drop_http_caches(CacheScope::Entity {
                        workspace_id: &ev.workspace_id,
                        entity_id,
                    });
                    if ev.payload.get("blocked").and_then(|v| v.as_bool()) == Some(true) {
                        self.close_entity(&ev.workspace_id, entity_id, "blocked");
                    }
                }
                _ => {}
            }
        }
    }

    /// A control notification from another node (see [`Control`]).
    pub fn apply_control(&self, workspace_id: &str, control: &Control) {
        match control {
            Control::Settings => {
                self.drop_http_caches(CacheScope::Workspace(workspace_id));
                self.settings_changed(workspace_id);
            }
            Control::Entity { entity_id, close } => {
                self.drop_http_caches(CacheScope::Entity {
                    workspace_id,
                    entity_id,
                });
                if let Some(reason) = close {
                    let reason = if reason == "blocked" {
                        "blocked"
                    } else {
                        "deactivated"
                    };
                    self.close_entity(workspace_id, entity_id, reason);
                }
            }
        }
    }

    /// Notifications may have been missed (the subscription was lost, or more events were
    /// missed than a repair reads back): every cache of `workspace_id` (`None`: of every
    /// workspace) goes, and running channel actors reload before they check anything else.
    pub fn drop_caches(&self, workspace_id: Option<&str>) {
        match workspace_id {
            Some(ws) => {
                self.drop_http_caches(CacheScope::Workspace(ws));
                self.settings_changed(ws);
            }
            None => {
                self.drop_http_caches(CacheScope::All);
                let mut known: Vec<String> = self.running_workspace_ids();
                known.extend(lock(&self.channels).values().map(|(w, _)| w.clone()));
                known.sort();
                known.dedup();
                for ws in known {
                    self.settings_changed(&ws);
                }
            }
        }
        for addr in self.running_channels(workspace_id) {
            addr.do_send(Refresh { now: true });
        }
    }

    fn refresh_channel(&self, channel_id: Option<&str>, now: bool) {
        if let Some(addr) = channel_id.and_then(|c| self.running_channel(c)) {
            addr.do_send(Refresh { now });
        }
    }

    /// Closes an entity's sockets on this node (1008, as `chat::close_sessions_of`).
    fn close_entity(&self, workspace_id: &str, entity_id: &str, reason: &'static str) {
        if let Some(w) = self.running_workspace(workspace_id) {
            w.do_send(CloseEntity {
                entity_id: entity_id.to_string(),
                code: crate::error::close_code::POLICY,
                reason,
            });
        }
    }

    pub fn emit_webhook(&self, workspace_id: &str, event: serde_json::Value) {
        if let Some(sink) = self.webhooks.get() {
            sink(workspace_id, event);
        }
    }

    pub fn add_socket(&self, socket_id: &str, identity: SocketIdentity) {
        lock(&self.sockets).insert(socket_id.to_string(), identity);
    }

    pub fn remove_socket(&self, socket_id: &str) {
        lock(&self.sockets).remove(socket_id);
    }

    /// The identity of a socket connected to this node in `workspace_id`.
    pub fn socket(&self, workspace_id: &str, socket_id: &str) -> Option<SocketIdentity> {
        lock(&self.sockets)
            .get(socket_id)
            .filter(|s| s.workspace_id == workspace_id)
            .cloned()
    }

    /// Set once at start by the Redis broker.
    pub fn set_cluster(&self, cluster: Arc<ClusterPresence>) {
        let _ = self.cluster.set(cluster);
    }

    pub fn cluster(&self) -> Option<Arc<ClusterPresence>> {
        self.cluster.get().cloned()
    }

    /// The ids of the running workspace actors.
    pub fn running_workspace_ids(&self) -> Vec<String> {
        lock(&self.workspaces)
            .iter()
            .filter(|(_, a)| a.connected())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Calls `f` with the workspace's running actor, or `None`, while no actor of it can
    /// start: what `f` does without one comes before anything a later actor does.
    pub fn with_workspace<R>(
        &self,
        id: &str,
        f: impl FnOnce(Option<&Addr<WorkspaceActor>>) -> R,
    ) -> R {
        let map = lock(&self.workspaces);
        f(map.get(id).filter(|a| a.connected()))
    }

    /// Every running workspace actor (graceful shutdown closes their sessions).
    pub fn all_workspaces(&self) -> Vec<Addr<WorkspaceActor>> {
        self.workspaces
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }
}

/// The maps hold only addresses, so a panic elsewhere cannot leave them inconsistent: a
/// poisoned lock is taken over rather than failing every later request.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
