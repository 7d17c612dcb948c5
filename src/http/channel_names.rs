//! Channel ids by name, for the signed server API: `/events` and every message route under
//! `/apps/{id}/channels/{name}/…` name their channel, and without this each request read the
//! name from the store on the blocking pool (a quarter of the server's CPU under a stream of
//! Pusher-face appends; docs/performance.md, "2026-12-07, 13:29–").
//!
//! A name's id changes only when a channel is renamed (channels are not deleted). A rename on
//! this node forgets the workspace's names once it is committed; one on another node does when
//! its `channel.updated` arrives (the registry's cache hook). A lookup that began before such a
//! forget is not remembered (the generation), and no entry is used after [`TTL`] in any case.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use switchboard_actors::registry::CacheScope;

/// How long a remembered id is used without reading it again.
pub const TTL: Duration = Duration::from_secs(5);
/// Entries kept before the map starts over (a bound, not an eviction policy).
const MAX_ENTRIES: usize = 10_000;

#[derive(Default)]
pub struct ChannelNames {
    /// (workspace id, channel name) → (channel id, when it was read).
    ids: Mutex<HashMap<(String, String), (String, Instant)>>,
    /// Bumped by every forget: a lookup that began before it must not be remembered.
    generation: AtomicU64,
}

impl ChannelNames {
    /// The id read for this name within [`TTL`].
    pub fn get(&self, workspace_id: &str, name: &str) -> Option<String> {
        let ids = self.ids.lock().ok()?;
        let (id, at) = ids.get(&(workspace_id.to_string(), name.to_string()))?;
        (at.elapsed() < TTL).then(|| id.clone())
    }

    /// Taken before a lookup, handed to [`Self::remember`] after it.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Keeps what a lookup begun at `generation` found, unless something was forgotten since.
    pub fn remember(&self, workspace_id: &str, name: &str, id: &str, generation: u64) {
        let Ok(mut ids) = self.ids.lock() else {
            return;
        };
        // Checked under the lock, which every forget takes too.
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        if ids.len() >= MAX_ENTRIES {
            ids.clear();
        }
        ids.insert(
            (workspace_id.to_string(), name.to_string()),
            (id.to_string(), Instant::now()),
        );
    }

    /// A channel of the workspace was renamed: its names are read again.
    pub fn forget_workspace(&self, workspace_id: &str) {
        if let Ok(mut ids) = self.ids.lock() {
            self.generation.fetch_add(1, Ordering::AcqRel);
            ids.retain(|(w, _), _| w != workspace_id);
        }
    }

    /// What another node's change made stale (cluster mode).
    pub fn forget(&self, scope: CacheScope<'_>) {
        match scope {
            CacheScope::All => {
                if let Ok(mut ids) = self.ids.lock() {
                    self.generation.fetch_add(1, Ordering::AcqRel);
                    ids.clear();
                }
            }
            CacheScope::Channels(ws) => self.forget_workspace(ws),
            CacheScope::Workspace(_) | CacheScope::Entity { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_remembered_per_workspace() {
        let names = ChannelNames::default();
        let g = names.generation();
        names.remember("w1", "room", "chn_1", g);
        assert_eq!(names.get("w1", "room").as_deref(), Some("chn_1"));
        assert_eq!(names.get("w2", "room"), None);
        assert_eq!(names.get("w1", "other"), None);
    }

    #[test]
    fn a_forget_drops_the_workspace_and_a_lookup_begun_before_it() {
        let names = ChannelNames::default();
        let g = names.generation();
        names.remember("w1", "room", "chn_1", g);
        names.remember("w2", "room", "chn_2", g);
        let before = names.generation();
        names.forget(CacheScope::Channels("w1"));
        assert_eq!(names.get("w1", "room"), None);
        assert_eq!(names.get("w2", "room").as_deref(), Some("chn_2"));
        // A lookup that read the old name before the rename was forgotten is not kept.
        names.remember("w1", "room", "chn_1", before);
        assert_eq!(names.get("w1", "room"), None);
        // Settings and entities are not channels.
        names.forget(CacheScope::Workspace("w2"));
        assert_eq!(names.get("w2", "room").as_deref(), Some("chn_2"));
        names.forget(CacheScope::All);
        assert_eq!(names.get("w2", "room"), None);
    }
}
