//! What a node publishes on Redis for the others: one JSON envelope per workspace and batch,
//! on `switchboard:events:{workspace}` (committed) or `switchboard:ephemeral:{workspace}`.
//! It carries everything a receiving node needs to rebuild the events, live routing included.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::broker::Control;
use crate::domain::event::{Event, LiveRoute};

pub const EVENTS_PREFIX: &str = "switchboard:events:";
pub const EPHEMERAL_PREFIX: &str = "switchboard:ephemeral:";
/// Control notifications (see `broker::Control`): caches other nodes must drop.
pub const CONTROL_PREFIX: &str = "switchboard:control:";
/// The pattern a node subscribes to.
pub const PATTERN: &str = "switchboard:*";

#[derive(Serialize)]
struct EnvelopeOut<'a> {
    node: &'a str,
    events: Vec<EventOut<'a>>,
}

#[derive(Serialize)]
struct EventOut<'a> {
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    cursor: Option<i64>,
    #[serde(rename = "type")]
    event_type: &'a str,
    workspace_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel_id: Option<&'a str>,
    /// The channel's name: the Pusher face routes by it.
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<i64>,
    created_at: &'a str,
    payload: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    recipients: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    except_socket: Option<&'a str>,
}

/// The envelope as received: every field is checked, nothing is trusted to be present.
#[derive(Deserialize)]
pub struct Envelope {
    pub node: String,
    pub events: Vec<EventIn>,
}

#[derive(Deserialize)]
pub struct EventIn {
    id: String,
    #[serde(default)]
    cursor: Option<i64>,
    #[serde(rename = "type")]
    event_type: String,
    workspace_id: String,
    #[serde(default)]
    channel_id: Option<String>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    seq: Option<i64>,
    created_at: String,
    #[serde(default)]
    payload: Value,
    #[serde(default)]
    recipients: Option<Vec<String>>,
    #[serde(default)]
    except_socket: Option<String>,
}

/// The Redis channel of a workspace's committed or ephemeral events.
pub fn channel_of(workspace_id: &str, durable: bool) -> String {
    let prefix = if durable {
        EVENTS_PREFIX
    } else {
        EPHEMERAL_PREFIX
    };
    format!("{prefix}{workspace_id}")
}

/// Encodes events of one workspace published by `node`.
pub fn encode(node: &str, events: &[Arc<Event>]) -> String {
    let envelope = EnvelopeOut {
        node,
        events: events
            .iter()
            .map(|e| EventOut {
                id: &e.id,
                cursor: e.cursor,
                event_type: &e.event_type,
                workspace_id: &e.workspace_id,
                channel_id: e.channel_id.as_deref(),
                channel: e.live.channel_name.as_deref(),
                seq: e.seq,
                created_at: &e.created_at,
                payload: &e.payload,
                recipients: e.recipients.as_deref(),
                except_socket: e.live.except_socket.as_deref(),
            })
            .collect(),
    };
    serde_json::to_string(&envelope).unwrap_or_default()
}

/// A control notification published by `node`.
#[derive(Serialize)]
struct ControlOut<'a> {
    node: &'a str,
    control: &'a Control,
}

#[derive(Deserialize)]
pub struct ControlIn {
    pub node: String,
    pub control: Control,
}

/// `(redis channel, payload)` of a control notification of `workspace_id`.
pub fn encode_control(node: &str, workspace_id: &str, control: &Control) -> (String, String) {
    (
        format!("{CONTROL_PREFIX}{workspace_id}"),
        serde_json::to_string(&ControlOut { node, control }).unwrap_or_default(),
    )
}

/// A received control notification's workspace, from the Redis channel name.
pub fn parse_control_channel(name: &str) -> Option<&str> {
    name.strip_prefix(CONTROL_PREFIX).filter(|w| !w.is_empty())
}

/// Whether a durable batch may hold an event that changes what nodes cache (channels,
/// members, messages), judged from its bytes: a node without sockets of the workspace
/// decodes only those.
pub fn may_change_caches(payload: &[u8]) -> bool {
    // `message.created`, by far the most frequent, changes nothing cached: only mutations do.
    const NEEDLES: [&[u8]; 5] = [
        b"\"type\":\"channel.",
        b"\"type\":\"member.",
        b"\"type\":\"message.updated\"",
        b"\"type\":\"message.deleted\"",
        b"\"type\":\"message.appended\"",
    ];
    NEEDLES
        .iter()
        .any(|n| payload.windows(n.len()).any(|w| w == *n))
}

/// A received message: its workspace and whether it is durable, from the Redis channel name.
pub fn parse_channel(name: &str) -> Option<(&str, bool)> {
    if let Some(ws) = name.strip_prefix(EVENTS_PREFIX) {
        return Some((ws, true)).filter(|(w, _)| !w.is_empty());
    }
    name.strip_prefix(EPHEMERAL_PREFIX)
        .filter(|w| !w.is_empty())
        .map(|w| (w, false))
}

/// Rebuilds the events of an envelope that belong to `workspace_id`; durable ones must have
/// a cursor. Anything else is dropped (the repair path covers a lost durable event).
pub fn decode(envelope: Envelope, workspace_id: &str, durable: bool) -> Vec<Arc<Event>> {
    envelope
        .events
        .into_iter()
        .filter(|e| e.workspace_id == workspace_id && e.cursor.is_some() == durable)
        .map(|e| {
            let mut ev = Event::build_unshared(
                e.id,
                e.cursor,
                e.event_type,
                e.workspace_id,
                e.channel_id,
                e.seq,
                e.created_at,
                e.payload,
                e.recipients,
            );
            ev.live = LiveRoute {
                channel_name: e.channel.map(Arc::from),
                except_socket: e.except_socket.map(Arc::from),
            };
            Arc::new(ev)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(cursor: Option<i64>) -> Arc<Event> {
        let mut ev = Event::build_unshared(
            "evt_1".into(),
            cursor,
            "message.created".into(),
            "7".into(),
            Some("chn_1".into()),
            Some(3),
            "t".into(),
            serde_json::json!({"message_id": "m1", "data": "hi"}),
            Some(vec!["alice".into()]),
        );
        ev.live = LiveRoute {
            channel_name: Some(Arc::from("general")),
            except_socket: Some(Arc::from("1.2")),
        };
        Arc::new(ev)
    }

    #[test]
    fn an_event_survives_the_trip() {
        let sent = event(Some(9));
        let text = encode("node-a", std::slice::from_ref(&sent));
        let env: Envelope = serde_json::from_str(&text).expect("json");
        assert_eq!(env.node, "node-a");
        let got = decode(env, "7", true);
        assert_eq!(got.len(), 1);
        let ev = &got[0];
        assert_eq!(ev.frame, sent.frame, "the same frame reaches sockets");
        assert_eq!(ev.recipients.as_deref(), sent.recipients.as_deref());
        assert_eq!(ev.live.channel_name.as_deref(), Some("general"));
        assert_eq!(ev.live.except_socket.as_deref(), Some("1.2"));
    }

    #[test]
    fn foreign_or_malformed_events_are_dropped() {
        let text = encode("n", &[event(Some(1))]);
        let env: Envelope = serde_json::from_str(&text).expect("json");
        assert!(decode(env, "8", true).is_empty(), "another workspace");
        let env: Envelope = serde_json::from_str(&text).expect("json");
        assert!(decode(env, "7", false).is_empty(), "a cursor on ephemeral");
        assert!(serde_json::from_str::<Envelope>("{\"node\":1}").is_err());
    }

    #[test]
    fn control_notifications_survive_the_trip() {
        let c = Control::Entity {
            entity_id: "bob".into(),
            close: Some("deactivated".into()),
        };
        let (channel, text) = encode_control("node-a", "7", &c);
        assert_eq!(parse_control_channel(&channel), Some("7"));
        let got: ControlIn = serde_json::from_str(&text).expect("json");
        assert_eq!(got.node, "node-a");
        assert_eq!(got.control, c);
        let (_, text) = encode_control("n", "7", &Control::Settings);
        let got: ControlIn = serde_json::from_str(&text).expect("json");
        assert_eq!(got.control, Control::Settings);
        assert!(
            serde_json::from_str::<ControlIn>("{\"node\":\"n\",\"control\":{\"kind\":\"x\"}}")
                .is_err()
        );
        assert_eq!(parse_control_channel("switchboard:control:"), None);
    }

    #[test]
    fn cache_changing_batches_are_recognised() {
        let created = encode("n", &[event(Some(1))]);
        assert!(!may_change_caches(created.as_bytes()));
        let removed = created.replace("message.created", "channel.member_removed");
        assert!(may_change_caches(removed.as_bytes()));
        let deleted = created.replace("message.created", "message.deleted");
        assert!(may_change_caches(deleted.as_bytes()));
    }

    #[test]
    fn channel_names() {
        assert_eq!(channel_of("7", true), "switchboard:events:7");
        assert_eq!(parse_channel("switchboard:events:7"), Some(("7", true)));
        assert_eq!(parse_channel("switchboard:ephemeral:7"), Some(("7", false)));
        assert_eq!(parse_channel("switchboard:events:"), None);
        assert_eq!(parse_channel("other"), None);
    }
}
