//! A message version as Pusher frames. Live events are turned into frames once per event in
//! the workspace actor and shared by every subscriber; replayed versions (V2 `resume`) take
//! the same path, so both surfaces send the same bytes.
//!
//! V2 frames carry `serial` (the channel seq), `stream_id` (the channel id: it changes only if
//! the channel is recreated) and `message_id`; a create arrives under the message's own name,
//! update/delete/append as `sockudo:message.{action}`. V1 sockets get creates only, in plain
//! Pusher shape with string `data`.

use std::sync::Arc;

use bytestring::ByteString;
use serde_json::{json, Map, Value};

use crate::domain::event::Event;
use crate::domain::message::DEFAULT_EVENT_NAME;
use crate::domain::versioned::Action;

/// The fields of one version a frame is made of.
#[derive(Debug, Clone)]
pub struct MessageFrame<'a> {
    pub action: Action,
    pub channel: &'a str,
    pub stream_id: &'a str,
    pub serial: i64,
    pub message_serial: &'a str,
    pub version_serial: Option<&'a str>,
    pub name: Option<&'a str>,
    /// Appends: the fragment (or the whole text for a full-mode socket).
    pub data: &'a Value,
    pub extras: Option<&'a Value>,
    pub user_id: Option<&'a str>,
}

impl MessageFrame<'_> {
    /// The history serial of the create is encoded in the message serial (`m` + seq).
    fn history_serial(&self) -> Option<i64> {
        self.message_serial.strip_prefix('m')?.parse().ok()
    }

    pub fn v2(&self) -> String {
        let event = match self.action {
            Action::Create => self.name.unwrap_or(DEFAULT_EVENT_NAME).to_string(),
            other => format!("sockudo:message.{}", other.as_str()),
        };
        let mut extras = match self.extras {
            Some(Value::Object(m)) => m.clone(),
            _ => Map::new(),
        };
        let mut headers = match extras.remove("headers") {
            Some(Value::Object(h)) => h,
            _ => Map::new(),
        };
        headers.insert(
            "sockudo_action".into(),
            json!(format!("message.{}", self.action.as_str())),
        );
        headers.insert("sockudo_message_serial".into(), json!(self.message_serial));
        if let Some(v) = self.version_serial {
            headers.insert("sockudo_version_serial".into(), json!(v));
        }
        if let Some(h) = self.history_serial() {
            headers.insert("sockudo_history_serial".into(), json!(h));
        }
        extras.insert("headers".into(), Value::Object(headers));
        let mut frame = json!({
            "event": event,
            "channel": self.channel,
            "data": self.data,
            "message_id": self.message_serial,
            "stream_id": self.stream_id,
            "serial": self.serial,
            "extras": extras,
        });
        if self.action != Action::Create {
            if let Some(n) = self.name {
                frame["name"] = json!(n);
            }
        }
        if let Some(u) = self.user_id {
            frame["user_id"] = json!(u);
        }
        frame.to_string()
    }

    /// Plain Pusher: creates only, `data` a string as the Pusher libraries expect.
    pub fn v1(&self) -> Option<String> {
        if self.action != Action::Create {
            return None;
        }
        let data = match self.data {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        Some(
            json!({
                "event": self.name.unwrap_or(DEFAULT_EVENT_NAME),
                "channel": self.channel,
                "data": data,
            })
            .to_string(),
        )
    }
}

/// A committed event's frames, shared by every subscriber of its channel.
#[derive(Debug)]
pub struct PusherDelivery {
    pub channel: Arc<str>,
    pub seq: i64,
    pub action: Action,
    pub message_serial: String,
    /// The publisher's own socket, left out (`socket_id` on `/events`).
    pub except_socket: Option<Arc<str>>,
    pub v1: Option<ByteString>,
    pub v2: ByteString,
    /// Kept for full-mode appends, which a socket rebuilds with the whole text.
    pub event: Arc<Event>,
}

fn action_of(event_type: &str) -> Option<Action> {
    match event_type {
        "message.created" => Some(Action::Create),
        "message.updated" => Some(Action::Update),
        "message.deleted" => Some(Action::Delete),
        "message.appended" => Some(Action::Append),
        _ => None,
    }
}

/// The frame fields of a live `message.*` event; `data` replaces the event's own data (a
/// full-mode append's whole text).
pub fn frame_of<'a>(
    ev: &'a Event,
    channel: &'a str,
    data: Option<&'a Value>,
) -> Option<MessageFrame<'a>> {
    let action = action_of(&ev.event_type)?;
    let p = &ev.payload;
    let str_of = |k: &str| p.get(k).and_then(Value::as_str);
    let own_data = if action == Action::Append {
        p.get("fragment")
    } else {
        p.get("data")
    };
    Some(MessageFrame {
        action,
        channel,
        stream_id: ev.channel_id.as_deref()?,
        serial: ev.seq?,
        message_serial: str_of("message_id")?,
        version_serial: str_of("version_serial"),
        name: str_of("name"),
        data: data.or(own_data).unwrap_or(&Value::Null),
        extras: p.get("extras"),
        user_id: str_of("author_id"),
    })
}

impl PusherDelivery {
    /// `None` for events the Pusher face does not carry (reactions, membership, …).
    pub fn from_event(ev: &Arc<Event>, channel: &Arc<str>) -> Option<Self> {
        let frame = frame_of(ev, channel, None)?;
        Some(Self {
            channel: channel.clone(),
            seq: frame.serial,
            action: frame.action,
            message_serial: frame.message_serial.to_string(),
            except_socket: ev.live.except_socket.clone(),
            v1: frame.v1().map(ByteString::from),
            v2: ByteString::from(frame.v2()),
            event: ev.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(ty: &str, payload: Value) -> Arc<Event> {
        Event::build(
            "e".into(),
            Some(1),
            ty.into(),
            "1".into(),
            Some("chn_1".into()),
            Some(7),
            "t".into(),
            payload,
            None,
        )
    }

    fn parse(s: &str) -> Value {
        serde_json::from_str(s).expect("json")
    }

    #[test]
    fn a_create_reaches_v1_in_plain_pusher_shape() {
        let ev = event(
            "message.created",
            json!({"message_id": "m000000000007", "name": "order", "data": {"a": 1},
                   "version_serial": "v000000000007", "extras": {"headers": {"t": "x"}}}),
        );
        let d = PusherDelivery::from_event(&ev, &Arc::from("orders")).expect("carried");
        let v1 = parse(d.v1.as_deref().expect("v1"));
        assert_eq!(
            v1,
            json!({"event": "order", "channel": "orders", "data": "{\"a\":1}"})
        );
        let v2 = parse(&d.v2);
        assert_eq!(v2["event"], "order");
        assert_eq!(v2["serial"], 7);
        assert_eq!(v2["stream_id"], "chn_1");
        assert_eq!(v2["data"], json!({"a": 1}));
        assert_eq!(v2["extras"]["headers"]["t"], "x");
        assert_eq!(v2["extras"]["headers"]["sockudo_action"], "message.create");
        assert_eq!(v2["extras"]["headers"]["sockudo_history_serial"], 7);
    }

    #[test]
    fn mutations_are_v2_only() {
        let ev = event(
            "message.appended",
            json!({"message_id": "m000000000003", "fragment": "lo", "length": 5,
                   "version_serial": "v000000000007"}),
        );
        let d = PusherDelivery::from_event(&ev, &Arc::from("ai")).expect("carried");
        assert!(d.v1.is_none());
        let v2 = parse(&d.v2);
        assert_eq!(v2["event"], "sockudo:message.append");
        assert_eq!(v2["data"], "lo");
        assert_eq!(v2["message_id"], "m000000000003");
        let full = frame_of(&ev, "ai", Some(&json!("hello")))
            .expect("frame")
            .v2();
        assert_eq!(parse(&full)["data"], "hello");
    }

    #[test]
    fn other_events_are_not_carried() {
        let ev = event("reaction.added", json!({}));
        assert!(PusherDelivery::from_event(&ev, &Arc::from("c")).is_none());
    }
}
