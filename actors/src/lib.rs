//! Switchboard's domain and actors, usable without HTTP.
//!
//! - `domain`: pure rules (channels, entities, messages, events), unit-tested.
//! - `store`: diesel schema and one function per query.
//! - `persistence`: the one writer, with group commit; `checkpointer`: SQLite's WAL copies.
//! - `channel`, `workspace`, `session`: the actors.
//! - `broker`: the seam between this node and others.

pub mod auth;
pub mod broker;
pub mod channel;
pub mod checkpointer;
pub mod cluster_presence;
pub mod compaction;
pub mod domain;
pub mod error;
pub mod gap_repair;
pub mod heartbeat;
pub mod ids;
pub mod metrics;
pub mod persistence;
pub mod pusher;
pub mod rate_limit;
pub mod redis_broker;
pub mod redis_wire;
pub mod registry;
pub mod retention;
pub mod session;
pub mod settings;
pub mod store;
pub mod webhooks;
pub mod workspace;

use std::sync::{Arc, OnceLock};

/// The process's metrics; set once at start, read by actors on hot paths.
pub static METRICS: OnceLock<Arc<metrics::Metrics>> = OnceLock::new();
