//! Messages: the latest visible state of one logical message, and the rules for posting.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult};

/// Where a message is in its life as an AI token stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StreamStatus {
    /// Never appended to.
    #[default]
    None,
    Open,
    Closed,
}

impl StreamStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Open => "open",
            Self::Closed => "closed",
        }
    }
    pub fn parse(s: &str) -> Self {
        match s {
            "open" => Self::Open,
            "closed" => Self::Closed,
            _ => Self::None,
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Message {
    pub message_serial: String,
    pub history_serial: i64,
    pub version_serial: String,
    pub channel_id: String,
    /// The creator; empty for a server-created message without `client_id` (unidentified),
    /// shown as `null`.
    #[serde(serialize_with = "empty_as_null")]
    pub sender: String,
    pub name: String,
    pub data: Value,
    pub extras: Value,
    pub thread_id: Option<String>,
    pub content_ref: Option<String>,
    pub attachments: Vec<String>,
    pub tags: Vec<String>,
    pub metadata: Value,
    pub nonce: Option<String>,
    pub deleted: bool,
    pub reply_count: i64,
    pub stream_status: StreamStatus,
    pub created_at: String,
    pub updated_at: String,
    /// The action of the latest version.
    #[serde(skip)]
    pub last_action: &'static str,
    #[serde(skip)]
    pub append_count: i64,
    #[serde(skip)]
    pub last_append_at: Option<String>,
}

fn empty_as_null<S: serde::Serializer>(v: &str, s: S) -> Result<S::Ok, S::Error> {
    if v.is_empty() {
        s.serialize_none()
    } else {
        s.serialize_str(v)
    }
}

impl Message {
    /// A copy with `data` null (the caller sets it): a streamed text is large.
    pub fn clone_without_data(&self) -> Message {
        Message {
            message_serial: self.message_serial.clone(),
            history_serial: self.history_serial,
            version_serial: self.version_serial.clone(),
            channel_id: self.channel_id.clone(),
            sender: self.sender.clone(),
            name: self.name.clone(),
            data: Value::Null,
            extras: self.extras.clone(),
            thread_id: self.thread_id.clone(),
            content_ref: self.content_ref.clone(),
            attachments: self.attachments.clone(),
            tags: self.tags.clone(),
            metadata: self.metadata.clone(),
            nonce: self.nonce.clone(),
            deleted: self.deleted,
            reply_count: self.reply_count,
            stream_status: self.stream_status,
            created_at: self.created_at.clone(),
            updated_at: self.updated_at.clone(),
            last_action: self.last_action,
            append_count: self.append_count,
            last_append_at: self.last_append_at.clone(),
        }
    }

    /// The payload of `message.*` events: `message_id`, `author_id`, the direct conversation
    /// when there is one, and the message's visible fields.
    pub fn event_payload(&self, direct_conversation_id: Option<&str>) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or_else(|_| json!({}));
        if let Value::Object(map) = &mut v {
            map.insert("message_id".into(), json!(self.message_serial));
            map.insert("author_id".into(), json!(self.sender));
            if self.sender.is_empty() {
                map.insert("author_id".into(), Value::Null);
            }
            if let Some(d) = direct_conversation_id {
                map.insert("direct_conversation_id".into(), json!(d));
            }
        }
        v
    }
}

/// `POST /api/channels/{id}/messages`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewMessage {
    #[serde(default)]
    pub data: Option<Value>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub extras: Option<Value>,
    #[serde(default)]
    pub thread_id: Option<String>,
    #[serde(default)]
    pub content_ref: Option<String>,
    #[serde(default)]
    pub attachments: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub metadata: Option<Value>,
    #[serde(default)]
    pub nonce: Option<String>,
}

pub const DEFAULT_EVENT_NAME: &str = "message";

impl NewMessage {
    /// Field rules; the thread root and the nonce are checked against the channel's state.
    pub fn validate(&self, max_attachments: usize) -> ApiResult<()> {
        if self.data.is_none() && self.content_ref.is_none() {
            return Err(ApiError::invalid("a message needs data or content_ref"));
        }
        if let Some(name) = &self.name {
            if !(1..=200).contains(&name.len()) {
                return Err(ApiError::invalid("name must be 1..200 bytes"));
            }
        }
        if let Some(extras) = &self.extras {
            super::validation::object("extras", extras)?;
        }
        if let Some(m) = &self.metadata {
            super::validation::object("metadata", m)?;
        }
        if let Some(t) = &self.thread_id {
            super::validation::serial(t)?;
        }
        if let Some(c) = &self.content_ref {
            if !(1..=128).contains(&c.len()) {
                return Err(ApiError::invalid("content_ref must be 1..128 bytes"));
            }
        }
        if self.attachments.len() > max_attachments {
            return Err(ApiError::limit(format!(
                "a message has at most {max_attachments} attachments"
            )));
        }
        if self
            .attachments
            .iter()
            .any(|a| !(1..=128).contains(&a.len()))
        {
            return Err(ApiError::invalid(
                "each attachment must be a document id of 1..128 bytes",
            ));
        }
        super::validation::tags(&self.tags)?;
        if let Some(n) = &self.nonce {
            if !(1..=128).contains(&n.len()) {
                return Err(ApiError::invalid("nonce must be 1..128 bytes"));
            }
        }
        Ok(())
    }

    /// The message as first stored, at channel seq `seq`.
    pub fn into_message(self, channel_id: &str, sender: &str, seq: i64, now: &str) -> Message {
        Message {
            message_serial: crate::ids::message_serial(seq),
            history_serial: seq,
            version_serial: crate::ids::version_serial(seq),
            channel_id: channel_id.to_string(),
            sender: sender.to_string(),
            name: self.name.unwrap_or_else(|| DEFAULT_EVENT_NAME.to_string()),
            data: self.data.unwrap_or(Value::Null),
            extras: self.extras.unwrap_or_else(|| json!({})),
            thread_id: self.thread_id,
            content_ref: self.content_ref,
            attachments: self.attachments,
            tags: self.tags,
            metadata: self.metadata.unwrap_or_else(|| json!({})),
            nonce: self.nonce,
            deleted: false,
            reply_count: 0,
            stream_status: StreamStatus::None,
            created_at: now.to_string(),
            updated_at: now.to_string(),
            last_action: "create",
            append_count: 0,
            last_append_at: None,
        }
    }
}

/// Emoji for reactions: 1..64 bytes, no whitespace.
pub fn validate_emoji(e: &str) -> ApiResult<()> {
    if (1..=64).contains(&e.len()) && !e.chars().any(char::is_whitespace) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "emoji must be 1..64 bytes without whitespace",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    #[test]
    fn needs_data_or_content_ref() {
        assert!(NewMessage::default().validate(100).is_err());
        let m = NewMessage {
            content_ref: Some("doc_1".into()),
            ..Default::default()
        };
        assert!(m.validate(100).is_ok());
    }

    #[test]
    fn attachment_limit_edges() {
        let at = |n: usize| NewMessage {
            data: Some(json!("x")),
            attachments: (0..n).map(|i| format!("doc{i}")).collect(),
            ..Default::default()
        };
        assert!(at(100).validate(100).is_ok());
        assert_eq!(
            at(101).validate(100).expect_err("101").code,
            ErrorCode::LimitExceeded
        );
    }

    #[test]
    fn nonce_length() {
        let m = |n: usize| NewMessage {
            data: Some(json!("x")),
            nonce: Some("n".repeat(n)),
            ..Default::default()
        };
        assert!(m(128).validate(100).is_ok());
        assert!(m(129).validate(100).is_err());
        assert!(m(0).validate(100).is_err());
    }

    #[test]
    fn payload_names_message_and_author() {
        let m = NewMessage {
            data: Some(json!("hi")),
            ..Default::default()
        }
        .into_message("c", "alice", 7, "t");
        let p = m.event_payload(Some("c"));
        assert_eq!(p["message_id"], json!("m000000000007"));
        assert_eq!(p["author_id"], json!("alice"));
        assert_eq!(p["direct_conversation_id"], json!("c"));
        assert_eq!(p["history_serial"], json!(7));
    }
}
