//! Durable and ephemeral events, and who may see them.

use std::sync::Arc;

use bytestring::ByteString;
use serde::Serialize;
use serde_json::Value;

/// An event before it is committed: the persistence actor gives it a cursor.
#[derive(Debug, Clone)]
pub struct EventDraft {
    pub event_type: &'static str,
    pub channel_id: Option<String>,
    pub seq: Option<i64>,
    pub payload: Value,
    /// `Some` for private events: only these entities ever receive it. Shared: a channel's
    /// events carry one list until its membership changes.
    pub recipients: Option<Arc<[String]>>,
    pub live: LiveRoute,
    /// `payload` as JSON text, written by the thread that queues the write
    /// ([`crate::persistence::Persistence::enqueue`]) so that the single writer thread does
    /// not have to; `None` until then.
    pub payload_text: Option<String>,
}

/// How a committed event travels live, beyond what the log stores: the channel's name (the
/// Pusher face subscribes by name) and the socket a publisher asked to leave out.
#[derive(Debug, Clone, Default)]
pub struct LiveRoute {
    pub channel_name: Option<Arc<str>>,
    pub except_socket: Option<Arc<str>>,
}

impl EventDraft {
    pub fn new(event_type: &'static str, payload: Value) -> Self {
        Self {
            event_type,
            channel_id: None,
            seq: None,
            payload,
            recipients: None,
            live: LiveRoute::default(),
            payload_text: None,
        }
    }
    pub fn live(mut self, live: LiveRoute) -> Self {
        self.live = live;
        self
    }
    pub fn channel(mut self, channel_id: &str) -> Self {
        self.channel_id = Some(channel_id.to_string());
        self
    }
    pub fn seq(mut self, seq: i64) -> Self {
        self.seq = Some(seq);
        self
    }
    pub fn private_to(mut self, recipients: Option<Vec<String>>) -> Self {
        self.recipients = recipients.map(Arc::from);
        self
    }
    pub fn private_to_shared(mut self, recipients: Option<Arc<[String]>>) -> Self {
        self.recipients = recipients;
        self
    }
}

/// The wire shape of an event (SPEC §3).
#[derive(Debug, Clone, Serialize)]
pub struct EventWire<'a> {
    pub id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    #[serde(rename = "type")]
    pub event_type: &'a str,
    pub workspace_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<i64>,
    pub created_at: &'a str,
    pub payload: &'a Value,
}

/// A committed (or ephemeral) event, serialized once and shared by every recipient.
#[derive(Debug)]
pub struct Event {
    pub id: String,
    /// `None` for ephemeral events, which are never stored.
    pub cursor: Option<i64>,
    pub event_type: String,
    pub workspace_id: String,
    pub channel_id: Option<String>,
    pub seq: Option<i64>,
    pub created_at: String,
    pub payload: Value,
    pub recipients: Option<Arc<[String]>>,
    /// The JSON text frame, built once.
    pub frame: ByteString,
    /// Live routing only; empty for events read back from the log.
    pub live: LiveRoute,
}

impl Event {
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        id: String,
        cursor: Option<i64>,
        event_type: String,
        workspace_id: String,
        channel_id: Option<String>,
        seq: Option<i64>,
        created_at: String,
        payload: Value,
        recipients: Option<Vec<String>>,
    ) -> Arc<Self> {
        Arc::new(Self::build_unshared(
            id,
            cursor,
            event_type,
            workspace_id,
            channel_id,
            seq,
            created_at,
            payload,
            recipients,
        ))
    }

    /// As `build`, before it is shared: the caller may still set `live`.
    #[allow(clippy::too_many_arguments)]
    pub fn build_unshared(
        id: String,
        cursor: Option<i64>,
        event_type: String,
        workspace_id: String,
        channel_id: Option<String>,
        seq: Option<i64>,
        created_at: String,
        payload: Value,
        recipients: Option<Vec<String>>,
    ) -> Self {
        let wire = EventWire {
            id: &id,
            cursor: cursor.map(crate::ids::cursor_string),
            event_type: &event_type,
            workspace_id: &workspace_id,
            channel_id: channel_id.as_deref(),
            seq,
            created_at: &created_at,
            payload: &payload,
        };
        let frame = ByteString::from(serde_json::to_string(&wire).unwrap_or_default());
        Self {
            id,
            cursor,
            event_type,
            workspace_id,
            channel_id,
            seq,
            created_at,
            payload,
            recipients: recipients.map(Arc::from),
            frame,
            live: LiveRoute::default(),
        }
    }

    /// An event read back from the log: the frame is spliced from the stored payload text, so
    /// a replay does not parse and re-serialize every payload. `payload` is what the caller
    /// needs parsed (`Value::Null` when nothing reads it).
    #[allow(clippy::too_many_arguments)]
    pub fn from_stored(
        id: String,
        cursor: i64,
        event_type: String,
        workspace_id: String,
        channel_id: Option<String>,
        seq: Option<i64>,
        created_at: String,
        payload_text: &str,
        payload: Value,
    ) -> Arc<Self> {
        Arc::new(Self::stored_unshared(
            id,
            cursor,
            event_type,
            workspace_id,
            channel_id,
            seq,
            created_at,
            payload_text,
            payload,
        ))
    }

    /// As `from_stored`, before it is shared: the writer uses it for the events it has just
    /// inserted, whose payload it has already serialized for the row.
    #[allow(clippy::too_many_arguments)]
    pub fn stored_unshared(
        id: String,
        cursor: i64,
        event_type: String,
        workspace_id: String,
        channel_id: Option<String>,
        seq: Option<i64>,
        created_at: String,
        payload_text: &str,
        payload: Value,
    ) -> Self {
        let frame = stored_frame(
            &id,
            cursor,
            &event_type,
            &workspace_id,
            channel_id.as_deref(),
            seq,
            &created_at,
            payload_text,
        );
        Self {
            id,
            cursor: Some(cursor),
            event_type,
            workspace_id,
            channel_id,
            seq,
            created_at,
            payload,
            recipients: None,
            frame: ByteString::from(frame),
            live: LiveRoute::default(),
        }
    }

    pub fn to_json(&self) -> Value {
        serde_json::from_str(&self.frame).unwrap_or(Value::Null)
    }
}

/// The wire frame of a stored event: its head, then its payload's JSON text as stored.
/// Written by hand: the writer builds one per event it commits, and serde's field-by-field
/// escaping of the head was most of that work (every head string but a hostile workspace id
/// is plain ASCII that needs none).
#[allow(clippy::too_many_arguments)]
fn stored_frame(
    id: &str,
    cursor: i64,
    event_type: &str,
    workspace_id: &str,
    channel_id: Option<&str>,
    seq: Option<i64>,
    created_at: &str,
    payload_text: &str,
) -> String {
    let strings = id.len() + event_type.len() + workspace_id.len() + created_at.len();
    let mut frame =
        String::with_capacity(128 + strings + channel_id.map_or(0, str::len) + payload_text.len());
    frame.push_str("{\"id\":");
    push_json_str(&mut frame, id);
    frame.push_str(",\"cursor\":\"");
    push_int(&mut frame, cursor);
    frame.push_str("\",\"type\":");
    push_json_str(&mut frame, event_type);
    frame.push_str(",\"workspace_id\":");
    push_json_str(&mut frame, workspace_id);
    if let Some(c) = channel_id {
        frame.push_str(",\"channel_id\":");
        push_json_str(&mut frame, c);
    }
    if let Some(n) = seq {
        frame.push_str(",\"seq\":");
        push_int(&mut frame, n);
    }
    frame.push_str(",\"created_at\":");
    push_json_str(&mut frame, created_at);
    frame.push_str(",\"payload\":");
    frame.push_str(if payload_text.is_empty() {
        "null"
    } else {
        payload_text
    });
    frame.push('}');
    frame
}

/// `n` in decimal, without `core::fmt` (a fifth of the frame's cost when it was used).
fn push_int(out: &mut String, n: i64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = n.unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if n < 0 {
        out.push('-');
    }
    for &d in &digits[at..] {
        out.push(d as char);
    }
}

/// `s` as a JSON string, exactly as serde_json writes it (which escapes only control
/// characters, `"` and `\\`).
fn push_json_str(out: &mut String, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        out.push_str(&serde_json::to_string(s).unwrap_or_default());
    }
}

/// What a viewer must be for an event to reach it. Used by live fan-out and by replay, so
/// that both surfaces agree.
pub struct Viewer<'a> {
    pub entity_id: &'a str,
    pub is_guest: bool,
    /// Channels a guest belongs to (guests see only those); ignored for others.
    pub guest_channels: &'a std::collections::HashSet<String>,
}

impl Viewer<'_> {
    pub fn may_see(&self, recipients: Option<&[String]>, channel_id: Option<&str>) -> bool {
        if let Some(r) = recipients {
            return r.iter().any(|e| e == self.entity_id);
        }
        match (self.is_guest, channel_id) {
            (true, Some(c)) => self.guest_channels.contains(c),
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// The frame as serde writes it (how it was built before `stored_frame`).
    #[allow(clippy::too_many_arguments)]
    fn serde_frame(
        id: &str,
        cursor: i64,
        event_type: &str,
        workspace_id: &str,
        channel_id: Option<&str>,
        seq: Option<i64>,
        created_at: &str,
        payload_text: &str,
    ) -> String {
        #[derive(Serialize)]
        struct Head<'a> {
            id: &'a str,
            cursor: String,
            #[serde(rename = "type")]
            event_type: &'a str,
            workspace_id: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            channel_id: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            seq: Option<i64>,
            created_at: &'a str,
        }
        let head = Head {
            id,
            cursor: cursor.to_string(),
            event_type,
            workspace_id,
            channel_id,
            seq,
            created_at,
        };
        let mut frame = serde_json::to_string(&head).expect("a head serializes");
        frame.pop();
        let payload = if payload_text.is_empty() {
            "null"
        } else {
            payload_text
        };
        format!("{frame},\"payload\":{payload}}}")
    }

    #[test]
    fn stored_frames_match_serde_byte_for_byte() {
        let odd = ["ws \"q\" \\ back", "tab\there\u{1}", "é ü 日本 \u{7f}", ""];
        for (i, workspace) in ["ws_01abc"].iter().chain(odd.iter()).enumerate() {
            for channel in [None, Some("chn_01x"), Some("a\"b")] {
                for seq in [
                    None,
                    Some(0),
                    Some(7),
                    Some(i64::MAX),
                    Some(-3),
                    Some(i64::MIN),
                ] {
                    for payload in ["", r#"{"a":1}"#] {
                        let args = (
                            "evt_01h",
                            i as i64 * 1_000_003,
                            "message.created",
                            *workspace,
                            channel,
                            seq,
                            "2026-12-06T11:00:00.000Z",
                            payload,
                        );
                        let ours = stored_frame(
                            args.0, args.1, args.2, args.3, args.4, args.5, args.6, args.7,
                        );
                        let theirs = serde_frame(
                            args.0, args.1, args.2, args.3, args.4, args.5, args.6, args.7,
                        );
                        assert_eq!(ours, theirs);
                        let v: Value = serde_json::from_str(&ours).expect("valid JSON");
                        assert_eq!(v["workspace_id"], Value::String(workspace.to_string()));
                    }
                }
            }
        }
    }

    #[test]
    fn private_events_reach_recipients_only() {
        let none = HashSet::new();
        let alice = Viewer {
            entity_id: "alice",
            is_guest: false,
            guest_channels: &none,
        };
        let carol = Viewer {
            entity_id: "carol",
            is_guest: false,
            guest_channels: &none,
        };
        let r = vec!["alice".to_string(), "bob".to_string()];
        assert!(alice.may_see(Some(&r), Some("c")));
        assert!(!carol.may_see(Some(&r), Some("c")));
        assert!(carol.may_see(None, Some("c")));
    }

    #[test]
    fn guests_see_public_channel_events_only_where_they_belong() {
        let mine: HashSet<String> = ["c1".to_string()].into_iter().collect();
        let g = Viewer {
            entity_id: "g",
            is_guest: true,
            guest_channels: &mine,
        };
        assert!(g.may_see(None, Some("c1")));
        assert!(!g.may_see(None, Some("c2")));
        assert!(g.may_see(None, None));
    }

    #[test]
    fn a_stored_frame_equals_a_built_one() {
        let payload = serde_json::json!({"message_id": "m1", "data": "a\"b"});
        let built = Event::build(
            "e".into(),
            Some(9),
            "message.created".into(),
            "1".into(),
            Some("c".into()),
            Some(2),
            "t".into(),
            payload.clone(),
            None,
        );
        let stored = Event::from_stored(
            "e".into(),
            9,
            "message.created".into(),
            "1".into(),
            Some("c".into()),
            Some(2),
            "t".into(),
            &payload.to_string(),
            Value::Null,
        );
        assert_eq!(built.frame, stored.frame);
    }

    #[test]
    fn frame_is_the_wire_shape() {
        let e = Event::build(
            "evt_1".into(),
            Some(5),
            "message.created".into(),
            "1".into(),
            Some("c".into()),
            Some(3),
            "t".into(),
            serde_json::json!({"a": 1}),
            None,
        );
        let v = e.to_json();
        assert_eq!(v["cursor"], "5");
        assert_eq!(v["type"], "message.created");
        assert_eq!(v["seq"], 3);
        assert_eq!(v["payload"]["a"], 1);
    }
}
