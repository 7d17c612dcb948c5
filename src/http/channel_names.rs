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
    ids: Mutex<Names>,
    /// Bumped by every forget: a lookup that began before it must not be remembered.
    generation: AtomicU64,
}

/// Workspace id → channel name → (channel id, when it was read); nested so that a lookup
/// borrows its two keys instead of building them.
#[derive(Default)]
struct Names {
    by_workspace: HashMap<String, HashMap<String, (String, Instant)>>,
    entries: usize,
}

impl ChannelNames {
    /// The id read for this name within [`TTL`].
    pub fn get(&self, workspace_id: &str, name: &str) -> Option<String> {
        let ids = self.ids.lock().ok()?;
        let (id, at) = ids.by_workspace.get(workspace_id)?.get(name)?;
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
        if ids.entries >= MAX_ENTRIES {
            *ids = Names::default();
        }
        let fresh = ids
            .by_workspace
            .entry(workspace_id.to_string())
            .or_default()
            .insert(name.to_string(), (id.to_string(), Instant::now()))
            .is_none();
        ids.entries += usize::from(fresh);
    }

    /// A channel of the workspace was renamed: its names are read again.
    pub fn forget_workspace(&self, workspace_id: &str) {
        if let Ok(mut ids) = self.ids.lock() {
            self.generation.fetch_add(1, Ordering::AcqRel);
            if let Some(names) = ids.by_workspace.remove(workspace_id) {
                ids.entries -= names.len();
            }
        }
    }

    /// What another node's change made stale (cluster mode).
    pub fn forget(&self, scope: CacheScope<'_>) {
        match scope {
            CacheScope::All => {
                if let Ok(mut ids) = self.ids.lock() {
                    self.generation.fetch_add(1, Ordering::AcqRel);
                    *ids = Names::default();
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

    #[test]
    fn the_map_starts_over_at_its_bound() {
        let names = ChannelNames::default();
        let g = names.generation();
        for i in 0..MAX_ENTRIES - 1 {
            names.remember(&format!("w{}", i % 7), &format!("c{i}"), "chn", g);
        }
        // Remembering a name again does not count twice: one more new name still fits.
        names.remember("w0", "c0", "chn_again", g);
        names.remember("w0", "last", "chn", g);
        assert_eq!(names.get("w0", "c0").as_deref(), Some("chn_again"));
        assert_eq!(names.get("w0", "c7").as_deref(), Some("chn"));
        assert_eq!(names.get("w0", "last").as_deref(), Some("chn"));
        // A forgotten workspace's names no longer count.
        names.forget_workspace("w1");
        names.remember("w9", "d", "chn", g + 1);
        assert_eq!(names.get("w0", "c7").as_deref(), Some("chn"));
        for i in 0..MAX_ENTRIES {
            names.remember("w9", &format!("d{i}"), "chn", g + 1);
        }
        // Past the bound the map started over once: the oldest are gone, the newest kept.
        assert_eq!(names.get("w0", "c7"), None);
        let newest = format!("d{}", MAX_ENTRIES - 1);
        assert_eq!(names.get("w9", &newest).as_deref(), Some("chn"));
    }
}
