//! Versioned messages: the rules of update, delete and append (SPEC §2, seed 000). No I/O:
//! given the latest state and a mutation, it makes the next state and the stored version.

use std::sync::Arc;

use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::message::{Message, StreamStatus, DEFAULT_EVENT_NAME};
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::settings::AiTransportLimits;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Create,
    Update,
    Delete,
    Append,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Update => "update",
            Self::Delete => "delete",
            Self::Append => "append",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "create" => Some(Self::Create),
            "update" => Some(Self::Update),
            "delete" => Some(Self::Delete),
            "append" => Some(Self::Append),
            _ => None,
        }
    }
    /// The realtime event of a version with this action.
    pub fn event_type(self) -> &'static str {
        match self {
            Self::Create => "message.created",
            Self::Update => "message.updated",
            Self::Delete => "message.deleted",
            Self::Append => "message.appended",
        }
    }
}

/// Distinguishes a field sent as `null` (present: replace) from one left out (keep).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// The body of update, delete and append, on both APIs.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MutationBody {
    #[serde(default, deserialize_with = "present")]
    pub name: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    pub data: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    pub extras: Option<Value>,
    #[serde(default)]
    pub clear_fields: Vec<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub metadata: Option<Value>,
    #[serde(default)]
    pub op_id: Option<String>,
    #[serde(default)]
    pub socket_id: Option<String>,
    #[serde(default)]
    pub client_id: Option<String>,
}

const PATCHABLE: &[&str] = &["name", "data", "extras"];

/// A validated mutation.
#[derive(Debug, Clone)]
pub struct Mutation {
    pub action: Action,
    pub body: MutationBody,
}

impl Mutation {
    /// Checks the body's shape for `action`; state-dependent rules come in [`apply`].
    pub fn parse(action: Action, body: MutationBody) -> ApiResult<Self> {
        if action == Action::Create {
            return Err(ApiError::invalid("create is not a mutation"));
        }
        if let Some(op) = &body.op_id {
            if !(1..=64).contains(&op.len()) {
                return Err(ApiError::invalid("op_id must be 1..64 bytes"));
            }
        }
        if let Some(c) = &body.client_id {
            if !(1..=128).contains(&c.len()) {
                return Err(ApiError::invalid("client_id must be 1..128 bytes"));
            }
        }
        if let Some(d) = &body.description {
            if d.len() > 1024 {
                return Err(ApiError::invalid("description must be at most 1024 bytes"));
            }
        }
        if let Some(m) = &body.metadata {
            super::validation::object("metadata", m)?;
        }
        for (i, f) in body.clear_fields.iter().enumerate() {
            if !PATCHABLE.contains(&f.as_str()) {
                return Err(ApiError::invalid(format!(
                    "clear_fields may name only name, data and extras, not '{f}'"
                )));
            }
            if body.clear_fields[..i].contains(f) {
                return Err(ApiError::invalid(format!(
                    "'{f}' is listed twice in clear_fields"
                )));
            }
        }
        for (field, value) in [
            ("name", &body.name),
            ("data", &body.data),
            ("extras", &body.extras),
        ] {
            if value.is_some() && body.clear_fields.iter().any(|c| c == field) {
                return Err(ApiError::invalid(format!(
                    "'{field}' cannot be both replaced and cleared"
                )));
            }
        }
        if let Some(n) = &body.name {
            match n.as_str() {
                Some(s) if (1..=200).contains(&s.len()) => {}
                _ => return Err(ApiError::invalid("name must be a string of 1..200 bytes")),
            }
        }
        if let Some(e) = &body.extras {
            super::validation::object("extras", e)?;
        }
        match action {
            Action::Update => {
                let changes_something = body.name.is_some()
                    || body.data.is_some()
                    || body.extras.is_some()
                    || !body.clear_fields.is_empty()
                    || body.description.is_some()
                    || body.metadata.is_some();
                if !changes_something {
                    return Err(ApiError::invalid(
                        "an update needs at least one of name, data, extras, clear_fields, description, metadata",
                    ));
                }
            }
            Action::Delete => {
                if body.name.is_some() {
                    return Err(ApiError::invalid("a delete cannot replace name"));
                }
            }
            Action::Append => {
                if body.name.is_some() || !body.clear_fields.is_empty() {
                    return Err(ApiError::invalid(
                        "an append takes data and extras only; name and clear_fields are not allowed",
                    ));
                }
                match &body.data {
                    Some(Value::String(_)) => {}
                    Some(_) => {
                        return Err(ApiError::invalid("an append fragment must be a string"))
                    }
                    None => return Err(ApiError::invalid("an append needs a data fragment")),
                }
            }
            Action::Create => {}
        }
        Ok(Self { action, body })
    }

    /// Identifies the payload for op_id idempotency (the actor fields are not part of it).
    pub fn fingerprint(&self) -> String {
        let b = &self.body;
        let canonical = json!({
            "action": self.action.as_str(),
            "name": b.name, "data": b.data, "extras": b.extras,
            "clear_fields": b.clear_fields, "description": b.description, "metadata": b.metadata,
        });
        hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
    }

    /// The text an append adds (empty for a closing append without one).
    pub fn fragment(&self) -> &str {
        self.body
            .data
            .as_ref()
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    fn clears(&self, field: &str) -> bool {
        self.body.clear_fields.iter().any(|c| c == field)
    }
}

/// An append whose extras say the stream is over (`complete` or `cancelled`), in the seed's
/// spelling or Sockudo's AI transport/codec spellings.
pub fn closes_stream(extras: Option<&Value>) -> bool {
    let Some(e) = extras else { return false };
    [
        e.get("status"),
        e.pointer("/ai/transport/status"),
        e.pointer("/ai/codec/status"),
    ]
    .into_iter()
    .flatten()
    .any(|s| matches!(s.as_str(), Some("complete" | "cancelled")))
}

/// What the channel knows about open streams when an append arrives.
#[derive(Debug, Clone, Copy)]
pub struct StreamContext {
    /// This message currently counts as an open stream (open and not idle).
    pub open_now: bool,
    /// Open, non-idle streams in the channel, this one included when `open_now`.
    pub open_in_channel: usize,
}

/// What applying a mutation writes and sends (the new state is left in place).
#[derive(Debug, Clone)]
pub struct Applied {
    /// The stored version: the visible fields after it (append: the fragment).
    pub version_body: Value,
    /// The realtime payload (without `direct_conversation_id`).
    pub event_payload: Value,
}

fn too_large(msg: String) -> ApiError {
    ApiError::new(ErrorCode::PayloadTooLarge, msg)
}

/// Applies `m` to the latest state `state`, as version `seq` at time `now`, and leaves the
/// new state in `state`; on an error `state` is unchanged.
///
/// An append extends the text in place when nothing else holds `state` (`Arc::make_mut`):
/// a stream's appends then cost the fragment, not the whole text so far. Whoever still holds
/// the previous state (an answer not yet sent) keeps it unchanged: the text is copied then.
pub fn apply(
    state: &mut Arc<Message>,
    m: &Mutation,
    seq: i64,
    now: &str,
    limits: &AiTransportLimits,
    stream: StreamContext,
) -> ApiResult<Applied> {
    let b = &m.body;
    let version_meta = json!({
        "client_id": b.client_id,
        "description": b.description,
        "metadata": b.metadata,
    });
    match m.action {
        Action::Create => Err(ApiError::invalid("create is not a mutation")),
        Action::Update | Action::Delete => {
            let current: &Message = state;
            // The data is copied only where the action keeps it.
            let mut next = current.clone_without_data();
            stamp(&mut next, m.action, seq, now);
            if let Some(n) = b.name.as_ref().and_then(Value::as_str) {
                next.name = n.to_string();
            }
            if m.clears("name") {
                next.name = DEFAULT_EVENT_NAME.to_string();
            }
            let (data_default, extras_default) = if m.action == Action::Delete {
                (Some(Value::Null), Some(json!({})))
            } else {
                (None, None)
            };
            next.data = match (&b.data, m.clears("data")) {
                (Some(d), _) => d.clone(),
                (None, true) => Value::Null,
                (None, false) => data_default.unwrap_or_else(|| current.data.clone()),
            };
            next.extras = match (&b.extras, m.clears("extras")) {
                (Some(e), _) => e.clone(),
                (None, true) => json!({}),
                (None, false) => extras_default.unwrap_or(next.extras),
            };
            if m.action == Action::Delete {
                next.deleted = true;
                if next.stream_status == StreamStatus::Open {
                    next.stream_status = StreamStatus::Closed;
                }
            }
            let version_body = json!({
                "name": next.name, "data": next.data, "extras": next.extras,
                "deleted": next.deleted, "version": version_meta,
            });
            let mut event_payload = serde_json::to_value(&next).map_err(ApiError::internal)?;
            event_payload["message_id"] = json!(next.message_serial);
            event_payload["author_id"] = json!((!next.sender.is_empty()).then_some(&next.sender));
            event_payload["action"] = json!(m.action.as_str());
            *state = Arc::new(next);
            Ok(Applied {
                version_body,
                event_payload,
            })
        }
        Action::Append => {
            let current: &Message = state;
            if current.deleted {
                return Err(ApiError::invalid("cannot append to a deleted message"));
            }
            if current.stream_status == StreamStatus::Closed {
                return Err(ApiError::invalid(
                    "cannot append to a terminal message: its stream was completed or cancelled",
                ));
            }
            let closing = closes_stream(b.extras.as_ref());
            let fragment = m.fragment();
            if fragment.is_empty() && !closing {
                return Err(ApiError::invalid(
                    "an append fragment must be a non-empty string",
                ));
            }
            let base = match &current.data {
                Value::Null => "",
                Value::String(s) => s.as_str(),
                _ => {
                    return Err(ApiError::invalid(
                        "append requires string message data; this message's data is JSON",
                    ))
                }
            };
            if current.append_count + 1 > limits.max_appends_per_message as i64 {
                return Err(too_large(format!(
                    "a message takes at most {} appends; continue the reply in a new message",
                    limits.max_appends_per_message
                )));
            }
            let length = base.len() + fragment.len();
            if length > limits.max_accumulated_message_bytes {
                return Err(too_large(format!(
                    "appended data would exceed the {} accumulated bytes a message may hold",
                    limits.max_accumulated_message_bytes
                )));
            }
            if !stream.open_now
                && !closing
                && stream.open_in_channel >= limits.max_open_streaming_messages_per_channel
            {
                return Err(too_large(format!(
                    "the channel already has {} open streaming messages; complete one first",
                    limits.max_open_streaming_messages_per_channel
                )));
            }
            // Checked: from here on nothing fails, so the state may change.
            let next = Arc::make_mut(state);
            stamp(next, m.action, seq, now);
            match &mut next.data {
                Value::String(text) => text.push_str(fragment),
                other => *other = Value::String(fragment.to_string()),
            }
            if let Some(e) = &b.extras {
                next.extras = e.clone();
            }
            next.append_count += 1;
            next.last_append_at = Some(now.to_string());
            next.stream_status = if closing {
                StreamStatus::Closed
            } else {
                StreamStatus::Open
            };
            let version_body = json!({
                "name": next.name, "data": fragment, "extras": next.extras,
                "deleted": false, "length": length, "version": version_meta,
            });
            let author = (!next.sender.is_empty()).then(|| next.sender.clone());
            let mut event_payload = json!({
                "message_id": next.message_serial,
                "author_id": author,
                "fragment": fragment,
                "length": length,
                "version_serial": next.version_serial,
            });
            if let Some(e) = &b.extras {
                event_payload["extras"] = e.clone();
            }
            if closing {
                event_payload["stream_status"] = json!("closed");
            }
            Ok(Applied {
                version_body,
                event_payload,
            })
        }
    }
}

/// The fields every version sets.
fn stamp(next: &mut Message, action: Action, seq: i64, now: &str) {
    next.version_serial = crate::ids::version_serial(seq);
    next.updated_at = now.to_string();
    next.last_action = action.as_str();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::message::NewMessage;

    fn msg(data: Value) -> Message {
        NewMessage {
            data: Some(data),
            ..Default::default()
        }
        .into_message("c", "alice", 1, "t0")
    }

    fn body(v: Value) -> MutationBody {
        serde_json::from_value(v).expect("body")
    }

    fn open() -> StreamContext {
        StreamContext {
            open_now: false,
            open_in_channel: 0,
        }
    }

    /// Applies to a copy of `current`: the new state and what was written.
    fn run(current: &Message, action: Action, b: Value) -> ApiResult<(Message, Applied)> {
        let m = Mutation::parse(action, body(b))?;
        let mut state = Arc::new(current.clone());
        let applied = apply(
            &mut state,
            &m,
            2,
            "t1",
            &AiTransportLimits::default(),
            open(),
        )?;
        Ok((Arc::unwrap_or_clone(state), applied))
    }

    #[test]
    fn tri_state_update() {
        let m = msg(json!("hello"));
        let (kept, _) = run(&m, Action::Update, json!({"name": "x"})).expect("ok");
        assert_eq!(kept.data, json!("hello"));
        assert_eq!(kept.name, "x");
        let (replaced, _) = run(&m, Action::Update, json!({"data": ""})).expect("ok");
        assert_eq!(replaced.data, json!(""));
        let (cleared, _) = run(&m, Action::Update, json!({"clear_fields": ["data"]})).expect("ok");
        assert_eq!(cleared.data, Value::Null);
        assert_eq!(cleared.version_serial, "v000000000002");
    }

    #[test]
    fn invalid_update_shapes() {
        for b in [
            json!({}),
            json!({"data": "a", "clear_fields": ["data"]}),
            json!({"clear_fields": ["data", "data"]}),
            json!({"clear_fields": ["sender"]}),
            json!({"name": ""}),
            json!({"extras": "x"}),
            json!({"op_id": ""}),
            json!({"unknown": 1}),
        ] {
            let parsed = serde_json::from_value::<MutationBody>(b.clone())
                .map_err(|e| ApiError::invalid(e.to_string()))
                .and_then(|b| Mutation::parse(Action::Update, b));
            assert!(parsed.is_err(), "{b} must be refused");
        }
    }

    #[test]
    fn delete_clears_unless_replaced() {
        let m = msg(json!("secret"));
        let (d, _) = run(&m, Action::Delete, json!({})).expect("ok");
        assert!(d.deleted);
        assert_eq!(d.data, Value::Null);
        let (t, _) = run(&m, Action::Delete, json!({"data": "[removed]"})).expect("ok");
        assert_eq!(t.data, json!("[removed]"));
        assert!(run(&m, Action::Delete, json!({"name": "n"})).is_err());
    }

    #[test]
    fn append_rules() {
        let empty = msg(Value::Null);
        let (a, applied) = run(&empty, Action::Append, json!({"data": "hé"})).expect("ok");
        assert_eq!(a.data, json!("hé"));
        assert_eq!(applied.event_payload["length"], json!(3));
        assert_eq!(a.stream_status, StreamStatus::Open);
        assert!(run(&empty, Action::Append, json!({"data": ""})).is_err());
        assert!(run(&empty, Action::Append, json!({"data": 5})).is_err());
        assert!(run(&msg(json!({"k": 1})), Action::Append, json!({"data": "x"})).is_err());
        let (closed, _) = run(
            &a,
            Action::Append,
            json!({"data": "", "extras": {"ai": {"transport": {"status": "complete"}}}}),
        )
        .expect("closing append may be empty");
        assert_eq!(closed.stream_status, StreamStatus::Closed);
        let later =
            run(&closed, Action::Append, json!({"data": "x"})).expect_err("terminal message");
        assert_eq!(later.code, ErrorCode::InvalidInput);
    }

    #[test]
    fn an_append_extends_the_text_in_place_unless_another_holds_it() {
        let m = Mutation::parse(Action::Append, body(json!({"data": "ab"}))).expect("valid");
        let limits = AiTransportLimits::default();
        let mut state = Arc::new(msg(json!("x")));
        apply(&mut state, &m, 2, "t", &limits, open()).expect("first");
        let alone = Arc::as_ptr(&state);
        apply(&mut state, &m, 3, "t", &limits, open()).expect("second");
        assert!(
            std::ptr::eq(alone, Arc::as_ptr(&state)),
            "held once: no copy"
        );
        assert_eq!(state.data, json!("xabab"));
        // An answer not sent yet still holds the previous state: it must not change.
        let answer = Arc::clone(&state);
        apply(&mut state, &m, 4, "t", &limits, open()).expect("third");
        assert_eq!(answer.data, json!("xabab"));
        assert_eq!(answer.version_serial, "v000000000003");
        assert_eq!(state.data, json!("xababab"));
        assert_eq!(state.version_serial, "v000000000004");
        assert_eq!(state.append_count, 3);
    }

    #[test]
    fn append_limits_at_and_over() {
        let limits = AiTransportLimits {
            max_accumulated_message_bytes: 4,
            max_appends_per_message: 2,
            max_open_streaming_messages_per_channel: 1,
            stream_idle_timeout_seconds: 600,
        };
        let m = Mutation::parse(Action::Append, body(json!({"data": "ab"}))).expect("valid");
        let ctx = open();
        let mut state = Arc::new(msg(Value::Null));
        apply(&mut state, &m, 2, "t", &limits, ctx).expect("1");
        let busy = StreamContext {
            open_now: true,
            open_in_channel: 1,
        };
        apply(&mut state, &m, 3, "t", &limits, busy).expect("at both limits");
        let before = Message::clone(&state);
        let over = apply(&mut state, &m, 4, "t", &limits, busy).expect_err("over");
        assert_eq!(over.code, ErrorCode::PayloadTooLarge);
        assert_eq!(*state, before, "a refused append changes nothing");
        let small = Mutation::parse(Action::Append, body(json!({"data": "abcde"}))).expect("v");
        let mut fresh = Arc::new(msg(Value::Null));
        let bytes = apply(&mut fresh, &small, 2, "t", &limits, ctx).expect_err("bytes");
        assert_eq!(bytes.code, ErrorCode::PayloadTooLarge);
        assert_ne!(bytes.message, over.message);
        let full = StreamContext {
            open_now: false,
            open_in_channel: 1,
        };
        let streams = apply(&mut fresh, &m, 2, "t", &limits, full).expect_err("streams");
        assert_eq!(streams.code, ErrorCode::PayloadTooLarge);
        assert_ne!(streams.message, over.message);
    }

    #[test]
    fn fingerprint_ignores_the_actor_fields() {
        let a =
            Mutation::parse(Action::Append, body(json!({"data": "x", "op_id": "1"}))).expect("v");
        let b = Mutation::parse(
            Action::Append,
            body(json!({"data": "x", "op_id": "1", "socket_id": "1.2"})),
        )
        .expect("v");
        let c =
            Mutation::parse(Action::Append, body(json!({"data": "y", "op_id": "1"}))).expect("v");
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), c.fingerprint());
    }
}
