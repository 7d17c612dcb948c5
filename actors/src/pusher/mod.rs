//! The Pusher-compatible face (SPEC §4; Sockudo protocol V1 and V2).
//!
//! - `protocol`: wire frames in and out, and the V1/V2 prefix rules.
//! - `channel_auth`: channel kinds by prefix and the HMAC signatures of subscribe and signin.
//! - `delivery`: a committed `message.*` event as Pusher frames, built once per event.
//! - `hub`: the workspace actor's side: subscriptions, presence, occupancy, client events.
//! - `session`: one actor per `/app/{key}` socket.
//! - `replay`: V2 `resume` and `channel_history` from the durable log.

pub mod channel_auth;
pub mod delivery;
pub mod hub;
pub mod protocol;
pub mod replay;
pub mod resume;
pub mod session;
