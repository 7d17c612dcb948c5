//! Finds or starts the actor of a workspace or channel. Actors start lazily and the database
//! can always rebuild them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use actix::{Actor, Addr};

use crate::channel::ChannelActor;
use crate::cluster_presence::ClusterPresence;
use crate::domain::capabilities::Capabilities;
use crate::error::{ApiError, ApiResult};
use crate::persistence::Persistence;
use crate::store::{queries, DbPool};
use crate::workspace::WorkspaceActor;

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

pub struct Registry {
    pool: DbPool,
    webhooks: std::sync::OnceLock<WebhookSink>,
    settings_changed: std::sync::OnceLock<SettingsHook>,
    /// Cluster mode (Redis broker): presence and occupancy shared between nodes.
    cluster: std::sync::OnceLock<Arc<ClusterPresence>>,
    workspaces: Mutex<HashMap<String, Addr<WorkspaceActor>>>,
    channels: Mutex<HashMap<String, Addr<ChannelActor>>>,
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
        if let Some(addr) = map.get(id).filter(|a| a.connected()) {
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
        map.insert(id.to_string(), addr.clone());
        Ok(addr)
    }

    pub fn remove_channel(&self, id: &str, addr: &Addr<ChannelActor>) {
        let mut map = lock(&self.channels);
        if map.get(id) == Some(addr) {
            map.remove(id);
        }
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
