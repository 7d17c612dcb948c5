//! The Broker is the boundary between this node and the others. Committed events enter it in
//! commit order; it hands them to the WorkspaceActors that have sessions. The local broker
//! delivers in-process; a Redis broker (cluster mode) can implement the same trait.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::domain::event::Event;
use crate::registry::Registry;
use crate::workspace::{Deliver, DeliverEphemeral};

pub trait Broker: Send + Sync {
    /// Committed events, in cursor order within each workspace.
    fn publish(&self, events: Vec<Arc<Event>>);
    /// Ephemeral events: never stored, delivered best-effort.
    fn publish_ephemeral(&self, event: Arc<Event>);
    /// A change of `workspace_id` that emits no durable event but makes what other nodes
    /// cached stale (settings, entities). The node that made it has already dropped its own
    /// caches: one node alone has nothing to tell.
    fn publish_control(&self, _workspace_id: &str, _control: Control) {}
}

/// What a control notification tells the other nodes (cluster mode, see `redis_broker`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Control {
    /// The workspace's settings (or anything else of the workspace row) changed.
    Settings,
    /// An entity was created, changed or deactivated; `close` names why its sockets close
    /// (`deactivated`), when they must.
    Entity {
        entity_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        close: Option<String>,
    },
}

/// In-process broker: the node is the whole cluster.
pub struct LocalBroker {
    registry: Arc<Registry>,
}

impl LocalBroker {
    pub fn new(registry: Arc<Registry>) -> Self {
        Self { registry }
    }
}

impl Broker for LocalBroker {
    fn publish(&self, events: Vec<Arc<Event>>) {
        // Group by workspace, keeping order; most batches hold one workspace.
        let mut start = 0;
        while start < events.len() {
            let ws = &events[start].workspace_id;
            let end = events[start..]
                .iter()
                .position(|e| &e.workspace_id != ws)
                .map_or(events.len(), |p| start + p);
            if let Some(addr) = self.registry.running_workspace(ws) {
                addr.do_send(Deliver(events[start..end].to_vec()));
            }
            start = end;
        }
    }

    fn publish_ephemeral(&self, event: Arc<Event>) {
        if let Some(addr) = self.registry.running_workspace(&event.workspace_id) {
            addr.do_send(DeliverEphemeral(event));
        }
    }
}
