//! Frames of the Pusher protocol. V1 speaks `pusher:` / `pusher_internal:`; V2 the same
//! events under `sockudo:` / `sockudo_internal:`. Inbound frames are accepted under either
//! prefix on both versions, as Sockudo does.

use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    V1,
    V2,
}

impl Protocol {
    /// `protocol=2` selects V2; anything else (Pusher clients send 7) is V1.
    pub fn from_query(v: Option<&str>) -> Self {
        if v == Some("2") {
            Self::V2
        } else {
            Self::V1
        }
    }

    /// The on-wire name of a protocol event given in its V1 spelling.
    pub fn name(self, v1_name: &str) -> String {
        if self == Self::V1 {
            return v1_name.to_string();
        }
        if let Some(rest) = v1_name.strip_prefix("pusher_internal:") {
            format!("sockudo_internal:{rest}")
        } else if let Some(rest) = v1_name.strip_prefix("pusher:") {
            format!("sockudo:{rest}")
        } else {
            v1_name.to_string()
        }
    }
}

/// How a V2 socket receives `message.append`: the fragment (delta) or the whole text (full).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendMode {
    Delta,
    Full,
}

impl AppendMode {
    pub fn parse(v: Option<&str>) -> Option<Self> {
        match v {
            None | Some("delta") => Some(Self::Delta),
            Some("full") => Some(Self::Full),
            Some(_) => None,
        }
    }
}

/// An inbound frame, by its canonical event whatever prefix it came with.
#[derive(Debug, PartialEq)]
pub enum Inbound {
    Ping,
    Pong,
    Subscribe(Value),
    Unsubscribe(Value),
    Signin(Value),
    /// V2 token refresh.
    Auth(Value),
    Resume(Value),
    ChannelHistory(Value),
    Client {
        event: String,
        channel: Option<String>,
        data: Value,
    },
    /// Logged and ignored.
    Unknown(String),
}

/// Why an inbound text frame is not a protocol frame.
pub const NOT_JSON: &str = "frames must be JSON objects with an 'event' string";

/// Parses a text frame. `data` may be an object or a JSON string holding one (both are seen
/// from Pusher clients); client events keep their data as sent.
pub fn parse(text: &str) -> Result<Inbound, &'static str> {
    let Ok(Value::Object(mut frame)) = serde_json::from_str::<Value>(text) else {
        return Err(NOT_JSON);
    };
    let Some(Value::String(event)) = frame.remove("event") else {
        return Err(NOT_JSON);
    };
    let data = frame.remove("data").unwrap_or(Value::Null);
    if event.starts_with("client-") {
        let channel = frame
            .remove("channel")
            .and_then(|c| c.as_str().map(str::to_string));
        return Ok(Inbound::Client {
            event,
            channel,
            data,
        });
    }
    let canonical = event
        .strip_prefix("pusher:")
        .or_else(|| event.strip_prefix("sockudo:"))
        .unwrap_or(&event);
    let object = || match &data {
        Value::String(s) => serde_json::from_str::<Value>(s).unwrap_or(Value::Null),
        other => other.clone(),
    };
    Ok(match canonical {
        "ping" => Inbound::Ping,
        "pong" => Inbound::Pong,
        "subscribe" => Inbound::Subscribe(object()),
        "unsubscribe" => Inbound::Unsubscribe(object()),
        "signin" => Inbound::Signin(object()),
        "auth" => Inbound::Auth(object()),
        "resume" => Inbound::Resume(object()),
        "channel_history" => Inbound::ChannelHistory(object()),
        _ => Inbound::Unknown(event),
    })
}

/// A frame whose `data` is a JSON string, as Pusher sends protocol events.
fn stringified(p: Protocol, v1_name: &str, channel: Option<&str>, data: &Value) -> String {
    let mut frame = json!({"event": p.name(v1_name), "data": data.to_string()});
    if let Some(c) = channel {
        frame["channel"] = json!(c);
    }
    frame.to_string()
}

pub fn connection_established(p: Protocol, socket_id: &str, activity_timeout: u64) -> String {
    stringified(
        p,
        "pusher:connection_established",
        None,
        &json!({"socket_id": socket_id, "activity_timeout": activity_timeout}),
    )
}

/// `pusher:error`: `data` is an object here (Pusher and Sockudo both send it so).
pub fn error(p: Protocol, code: u16, message: &str) -> String {
    json!({"event": p.name("pusher:error"), "data": {"code": code, "message": message}}).to_string()
}

pub fn ping(p: Protocol) -> String {
    json!({"event": p.name("pusher:ping"), "data": "{}"}).to_string()
}

pub fn pong(p: Protocol) -> String {
    json!({"event": p.name("pusher:pong"), "data": "{}"}).to_string()
}

/// `subscription_succeeded`; V2 adds the channel's stream and position at subscribe time.
pub fn subscription_succeeded(
    p: Protocol,
    channel: &str,
    data: &Value,
    position: Option<(&str, i64)>,
) -> String {
    let mut frame = json!({
        "event": p.name("pusher_internal:subscription_succeeded"),
        "channel": channel,
        "data": data.to_string(),
    });
    if let (Protocol::V2, Some((stream_id, serial))) = (p, position) {
        frame["stream_id"] = json!(stream_id);
        frame["serial"] = json!(serial);
    }
    frame.to_string()
}

pub fn member_added(p: Protocol, channel: &str, user_id: &str, user_info: &Value) -> String {
    stringified(
        p,
        "pusher_internal:member_added",
        Some(channel),
        &json!({"user_id": user_id, "user_info": user_info}),
    )
}

pub fn member_removed(p: Protocol, channel: &str, user_id: &str) -> String {
    stringified(
        p,
        "pusher_internal:member_removed",
        Some(channel),
        &json!({"user_id": user_id}),
    )
}

pub fn signin_success(p: Protocol, user_data: &str) -> String {
    json!({"event": p.name("pusher:signin_success"), "data": {"user_data": user_data}}).to_string()
}

/// A client event as relayed to the other subscribers: never stored, no serial.
pub fn client_event(channel: &str, event: &str, data: &Value, user_id: Option<&str>) -> String {
    let mut frame = json!({"event": event, "channel": channel, "data": data});
    if let Some(u) = user_id {
        frame["user_id"] = json!(u);
    }
    frame.to_string()
}

/// A V2-only event with an object `data` (`sockudo:auth_success`, `token_expired`, …).
pub fn v2_event(v1_name: &str, channel: Option<&str>, data: Value) -> String {
    let mut frame = json!({"event": Protocol::V2.name(v1_name), "data": data});
    if let Some(c) = channel {
        frame["channel"] = json!(c);
    }
    frame.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_renames_prefixes() {
        assert_eq!(Protocol::V2.name("pusher:pong"), "sockudo:pong");
        assert_eq!(
            Protocol::V2.name("pusher_internal:member_added"),
            "sockudo_internal:member_added"
        );
        assert_eq!(Protocol::V1.name("pusher:pong"), "pusher:pong");
        assert_eq!(Protocol::V2.name("client-x"), "client-x");
    }

    #[test]
    fn protocol_2_is_v2_and_anything_else_v1() {
        assert_eq!(Protocol::from_query(Some("2")), Protocol::V2);
        assert_eq!(Protocol::from_query(Some("7")), Protocol::V1);
        assert_eq!(Protocol::from_query(None), Protocol::V1);
    }

    #[test]
    fn parses_either_prefix_and_string_data() {
        let a = parse(r#"{"event":"pusher:subscribe","data":{"channel":"a"}}"#);
        let b = parse(r#"{"event":"sockudo:subscribe","data":"{\"channel\":\"a\"}"}"#);
        assert_eq!(a, b);
        assert_eq!(a, Ok(Inbound::Subscribe(json!({"channel": "a"}))));
        assert_eq!(parse(r#"{"event":"pusher:ping"}"#), Ok(Inbound::Ping));
        assert_eq!(
            parse(r#"{"event":"channel_history","data":{}}"#),
            Ok(Inbound::ChannelHistory(json!({})))
        );
    }

    #[test]
    fn client_events_keep_their_data() {
        let c = parse(r#"{"event":"client-typing","channel":"private-a","data":"{\"x\":1}"}"#);
        assert_eq!(
            c,
            Ok(Inbound::Client {
                event: "client-typing".into(),
                channel: Some("private-a".into()),
                data: json!("{\"x\":1}"),
            })
        );
    }

    #[test]
    fn rejects_what_is_not_a_frame() {
        for bad in ["", "nope", "[]", "{}", r#"{"event":1}"#, "null"] {
            assert_eq!(parse(bad), Err(NOT_JSON), "{bad}");
        }
        assert_eq!(
            parse(r#"{"event":"pusher:whatever"}"#),
            Ok(Inbound::Unknown("pusher:whatever".into()))
        );
    }

    #[test]
    fn established_data_is_a_string() {
        let f: Value =
            serde_json::from_str(&connection_established(Protocol::V1, "1.2", 120)).expect("json");
        assert_eq!(f["event"], "pusher:connection_established");
        let data: Value = serde_json::from_str(f["data"].as_str().expect("string")).expect("json");
        assert_eq!(data, json!({"socket_id": "1.2", "activity_timeout": 120}));
    }
}
