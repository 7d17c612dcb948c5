//! Row types and their conversion to domain values. JSON columns are TEXT.

use std::collections::BTreeSet;

use diesel::prelude::*;
use serde_json::Value;

use super::schema::*;
use crate::domain::channel::{Channel, ChannelType, JoinPolicy, Permissions, Visibility};
use crate::domain::entity::{Entity, EntityKind, Role};
use crate::domain::message::Message;
use crate::settings::WorkspaceSettings;

pub(crate) fn json_or(raw: &str, default: Value) -> Value {
    serde_json::from_str(raw).unwrap_or(default)
}

fn string_list(raw: &str) -> Vec<String> {
    serde_json::from_str(raw).unwrap_or_default()
}

pub fn to_json_text<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = workspaces)]
pub struct WorkspaceRow {
    pub id: String,
    pub app_key: String,
    pub secret: String,
    pub name: String,
    pub settings: String,
    pub last_cursor: i64,
    pub pruned_through: i64,
    pub created_at: String,
}

#[cfg(test)]
impl WorkspaceRow {
    /// A workspace with fixed credentials and no events, for unit tests.
    pub fn for_tests(id: &str) -> Self {
        Self {
            id: id.into(),
            app_key: "k".into(),
            secret: "s".into(),
            name: "w".into(),
            settings: "{}".into(),
            last_cursor: 0,
            pruned_through: 0,
            created_at: "t".into(),
        }
    }
}

/// A workspace as the rest of the server sees it.
#[derive(Debug, Clone)]
pub struct Workspace {
    pub id: String,
    pub key: String,
    pub secret: String,
    pub name: String,
    pub settings: WorkspaceSettings,
    pub created_at: String,
}

impl From<WorkspaceRow> for Workspace {
    fn from(r: WorkspaceRow) -> Self {
        Self {
            settings: WorkspaceSettings::from_stored(&r.settings),
            id: r.id,
            key: r.app_key,
            secret: r.secret,
            name: r.name,
            created_at: r.created_at,
        }
    }
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable, AsChangeset)]
#[diesel(table_name = entities, treat_none_as_null = true)]
pub struct EntityRow {
    pub workspace_id: String,
    pub id: String,
    pub name: String,
    pub kind: String,
    pub role: String,
    pub metadata: String,
    pub timeout_until: Option<String>,
    pub blocked: bool,
    pub active: bool,
    pub created_at: String,
    pub updated_at: String,
}

impl From<EntityRow> for Entity {
    fn from(r: EntityRow) -> Self {
        Self {
            kind: EntityKind::parse(&r.kind).unwrap_or(EntityKind::Human),
            role: Role::parse(&r.role).unwrap_or(Role::Guest),
            metadata: json_or(&r.metadata, serde_json::json!({})),
            id: r.id,
            workspace_id: r.workspace_id,
            name: r.name,
            timeout_until: r.timeout_until,
            blocked: r.blocked,
            active: r.active,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

impl From<&Entity> for EntityRow {
    fn from(e: &Entity) -> Self {
        Self {
            workspace_id: e.workspace_id.clone(),
            id: e.id.clone(),
            name: e.name.clone(),
            kind: e.kind.as_str().into(),
            role: e.role.as_str().into(),
            metadata: to_json_text(&e.metadata),
            timeout_until: e.timeout_until.clone(),
            blocked: e.blocked,
            active: e.active,
            created_at: e.created_at.clone(),
            updated_at: e.updated_at.clone(),
        }
    }
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable, AsChangeset)]
#[diesel(table_name = channels, treat_none_as_null = true)]
pub struct ChannelRow {
    pub id: String,
    pub workspace_id: String,
    pub name: String,
    pub description: String,
    pub channel_type: String,
    pub visibility: String,
    pub join_policy: String,
    pub modify_members: String,
    pub immutable: bool,
    pub tags: String,
    pub metadata: String,
    pub created_by: String,
    pub created_at: String,
    pub updated_at: String,
    pub archived_at: Option<String>,
    pub last_seq: i64,
}

impl ChannelRow {
    pub fn into_channel(self, members: BTreeSet<String>) -> Channel {
        Channel {
            channel_type: ChannelType::parse(&self.channel_type).unwrap_or(ChannelType::Group),
            permissions: Permissions {
                visibility: Visibility::parse(&self.visibility).unwrap_or(Visibility::Private),
                join_policy: JoinPolicy::parse(&self.join_policy).unwrap_or(JoinPolicy::InviteOnly),
                modify_members: string_list(&self.modify_members),
            },
            tags: string_list(&self.tags),
            metadata: json_or(&self.metadata, serde_json::json!({})),
            members,
            id: self.id,
            workspace_id: self.workspace_id,
            name: self.name,
            description: self.description,
            immutable: self.immutable,
            created_by: self.created_by,
            created_at: self.created_at,
            updated_at: self.updated_at,
            archived_at: self.archived_at,
            last_seq: self.last_seq,
        }
    }
}

impl From<&Channel> for ChannelRow {
    fn from(c: &Channel) -> Self {
        Self {
            id: c.id.clone(),
            workspace_id: c.workspace_id.clone(),
            name: c.name.clone(),
            description: c.description.clone(),
            channel_type: c.channel_type.as_str().into(),
            visibility: c.permissions.visibility.as_str().into(),
            join_policy: c.permissions.join_policy.as_str().into(),
            modify_members: to_json_text(&c.permissions.modify_members),
            immutable: c.immutable,
            tags: to_json_text(&c.tags),
            metadata: to_json_text(&c.metadata),
            created_by: c.created_by.clone(),
            created_at: c.created_at.clone(),
            updated_at: c.updated_at.clone(),
            archived_at: c.archived_at.clone(),
            last_seq: c.last_seq,
        }
    }
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable, AsChangeset)]
#[diesel(table_name = messages, treat_none_as_null = true, treat_none_as_default_value = false)]
pub struct MessageRow {
    pub channel_id: String,
    pub message_serial: String,
    pub history_seq: i64,
    pub workspace_id: String,
    pub sender: String,
    pub name: String,
    pub data: Option<String>,
    pub extras: String,
    pub thread_id: Option<String>,
    pub content_ref: Option<String>,
    pub attachments: String,
    pub tags: String,
    pub metadata: String,
    pub nonce: Option<String>,
    pub deleted: bool,
    pub version_serial: String,
    pub reply_count: i64,
    pub last_reply_at: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub last_action: String,
    pub append_count: i64,
    pub stream_status: String,
    pub last_append_at: Option<String>,
    /// The version through which `data` is written, when appends after it are not (see
    /// `queries::complete_texts`); `None` when `data` is current.
    pub text_seq: Option<i64>,
}

impl From<MessageRow> for Message {
    fn from(r: MessageRow) -> Self {
        Self {
            data: r
                .data
                .as_deref()
                .map(|d| json_or(d, Value::Null))
                .unwrap_or(Value::Null),
            extras: json_or(&r.extras, serde_json::json!({})),
            attachments: string_list(&r.attachments),
            tags: string_list(&r.tags),
            metadata: json_or(&r.metadata, serde_json::json!({})),
            message_serial: r.message_serial,
            history_serial: r.history_seq,
            version_serial: r.version_serial,
            channel_id: r.channel_id,
            sender: r.sender,
            name: r.name,
            thread_id: r.thread_id,
            content_ref: r.content_ref,
            nonce: r.nonce,
            deleted: r.deleted,
            reply_count: r.reply_count,
            stream_status: crate::domain::message::StreamStatus::parse(&r.stream_status),
            created_at: r.created_at,
            updated_at: r.updated_at,
            last_action: crate::domain::versioned::Action::parse(&r.last_action)
                .map_or("create", |a| a.as_str()),
            append_count: r.append_count,
            last_append_at: r.last_append_at,
        }
    }
}

impl MessageRow {
    pub fn from_message(m: &Message, workspace_id: &str) -> Self {
        Self {
            channel_id: m.channel_id.clone(),
            message_serial: m.message_serial.clone(),
            history_seq: m.history_serial,
            workspace_id: workspace_id.to_string(),
            sender: m.sender.clone(),
            name: m.name.clone(),
            data: if m.data.is_null() {
                None
            } else {
                Some(to_json_text(&m.data))
            },
            extras: to_json_text(&m.extras),
            thread_id: m.thread_id.clone(),
            content_ref: m.content_ref.clone(),
            attachments: to_json_text(&m.attachments),
            tags: to_json_text(&m.tags),
            metadata: to_json_text(&m.metadata),
            nonce: m.nonce.clone(),
            deleted: m.deleted,
            version_serial: m.version_serial.clone(),
            reply_count: m.reply_count,
            last_reply_at: None,
            created_at: m.created_at.clone(),
            updated_at: m.updated_at.clone(),
            last_action: m.last_action.to_string(),
            append_count: m.append_count,
            stream_status: m.stream_status.as_str().to_string(),
            last_append_at: m.last_append_at.clone(),
            text_seq: None,
        }
    }
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = message_versions, treat_none_as_default_value = false)]
pub struct VersionRow {
    pub channel_id: String,
    pub seq: i64,
    pub message_serial: String,
    pub action: String,
    pub actor: Option<String>,
    pub op_id: Option<String>,
    pub body: String,
    pub created_at: String,
    pub fingerprint: Option<String>,
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = events, treat_none_as_default_value = false)]
pub struct EventRow {
    pub workspace_id: String,
    pub cursor: i64,
    pub id: String,
    pub event_type: String,
    pub channel_id: Option<String>,
    pub seq: Option<i64>,
    pub payload: String,
    pub is_private: bool,
    pub created_at: String,
    /// Private events: `,a,b,` (see [`recipients_text`]); `None` for public ones.
    pub recipients: Option<String>,
}

/// The stored form of a recipient list: ids between commas, so `instr` finds `,id,`.
pub fn recipients_text(recipients: &[String]) -> String {
    let len = 2 + recipients.iter().map(|r| r.len() + 1).sum::<usize>();
    let mut s = String::with_capacity(len);
    s.push(',');
    for r in recipients {
        s.push_str(r);
        s.push(',');
    }
    if recipients.is_empty() {
        s.push(',');
    }
    s
}

impl EventRow {
    /// The event as fanned out live; its payload is parsed.
    pub fn into_event(self) -> std::sync::Arc<crate::domain::event::Event> {
        self.into_replayed(true)
    }

    /// The event as replayed: the frame reuses the stored payload text; the payload value is
    /// parsed only when `parse_payload` (replay compaction reads `message.*` payloads).
    pub fn into_replayed(self, parse_payload: bool) -> std::sync::Arc<crate::domain::event::Event> {
        let payload = if parse_payload {
            json_or(&self.payload, Value::Null)
        } else {
            Value::Null
        };
        crate::domain::event::Event::from_stored(
            self.id,
            self.cursor,
            self.event_type,
            self.workspace_id,
            self.channel_id,
            self.seq,
            self.created_at,
            &self.payload,
            payload,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::recipients_text;

    #[test]
    fn recipients_text_puts_every_id_between_commas() {
        let ids = ["ent_a".to_string(), "ent_bc".to_string()];
        assert_eq!(recipients_text(&ids), ",ent_a,ent_bc,");
        assert_eq!(recipients_text(&ids[..1]), ",ent_a,");
        // No recipient: nobody's `,id,` is found in it.
        assert_eq!(recipients_text(&[]), ",,");
    }
}
