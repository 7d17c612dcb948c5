//! What the chat API and the server API share about versioned messages: the item projection,
//! version and history paging, and sending a mutation to the channel actor.

use serde::Deserialize;
use serde_json::{json, Value};
use switchboard_actors::channel::{Mutate, MutationActor, MutationOutcome, VersionSettings};
use switchboard_actors::domain::message::Message;
use switchboard_actors::domain::versioned::{Action, Mutation, MutationBody};
use switchboard_actors::error::{ApiError, ApiResult, ErrorCode};
use switchboard_actors::settings::WorkspaceSettings;
use switchboard_actors::store::queries;
use switchboard_actors::store::rows::VersionRow;
use switchboard_actors::{domain::validation, ids};

use super::State;

/// `?limit&direction&cursor` of the versions and history listings.
#[derive(Debug, Deserialize)]
pub struct PageQuery {
    pub limit: Option<i64>,
    pub direction: Option<String>,
    pub cursor: Option<String>,
}

/// A checked page request.
pub struct Page {
    pub limit: i64,
    pub newest_first: bool,
    pub cursor: Option<i64>,
}

impl Page {
    pub fn direction(&self) -> &'static str {
        if self.newest_first {
            "newest_first"
        } else {
            "oldest_first"
        }
    }
}

/// Checks a page request; `parse_cursor` reads the endpoint's cursor format.
pub fn page(
    q: &PageQuery,
    max_page_size: usize,
    parse_cursor: impl Fn(&str) -> Option<i64>,
) -> ApiResult<Page> {
    let max = max_page_size.max(1) as i64;
    let limit = q.limit.unwrap_or(max);
    if !(1..=max).contains(&limit) {
        return Err(ApiError::invalid(format!("limit must be 1..{max}")));
    }
    let newest_first = match q.direction.as_deref() {
        None | Some("newest_first") | Some("backwards") => true,
        Some("oldest_first") | Some("forwards") => false,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "direction must be newest_first or oldest_first, not '{other}'"
            )))
        }
    };
    let cursor = match &q.cursor {
        None => None,
        Some(c) => Some(parse_cursor(c).ok_or_else(|| ApiError::invalid("invalid cursor"))?),
    };
    Ok(Page {
        limit,
        newest_first,
        cursor,
    })
}

pub fn check_enabled(settings: &WorkspaceSettings) -> ApiResult<()> {
    if settings.versioned_messages.enabled {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::FeatureDisabled,
            "versioned messages are disabled in this workspace",
        ))
    }
}

fn version_meta(row: Option<&VersionRow>) -> Value {
    let Some(row) = row else {
        return json!({});
    };
    let body: Value = serde_json::from_str(&row.body).unwrap_or(Value::Null);
    let mut meta = json!({
        "serial": ids::version_serial(row.seq),
        "client_id": row.actor,
        "created_at": row.created_at,
    });
    for key in ["description", "metadata"] {
        if let Some(v) = body
            .pointer(&format!("/version/{key}"))
            .filter(|v| !v.is_null())
        {
            meta[key] = v.clone();
        }
    }
    meta
}

fn sender_json(m: &Message) -> Value {
    if m.sender.is_empty() {
        Value::Null
    } else {
        json!(m.sender)
    }
}

/// A message's latest visible state as an item.
pub fn latest_item(channel: &str, m: &Message, latest: Option<&VersionRow>) -> Value {
    json!({
        "channel": channel,
        "message_serial": m.message_serial,
        "history_serial": m.history_serial,
        "version_serial": m.version_serial,
        "delivery_serial": ids::parse_version_serial(&m.version_serial),
        "action": m.last_action,
        "sender": sender_json(m),
        "name": m.name,
        "data": m.data,
        "extras": m.extras,
        "deleted": m.deleted,
        "thread_id": m.thread_id,
        "stream_status": m.stream_status,
        "version": version_meta(latest),
        "created_at": m.created_at,
        "updated_at": m.updated_at,
    })
}

/// One stored version as an item: the visible fields after it (an append: its fragment).
pub fn version_item(channel: &str, m: &Message, row: &VersionRow) -> Value {
    let body: Value = serde_json::from_str(&row.body).unwrap_or(Value::Null);
    let field = |k: &str| body.get(k).cloned().unwrap_or(Value::Null);
    json!({
        "channel": channel,
        "message_serial": m.message_serial,
        "history_serial": m.history_serial,
        "version_serial": ids::version_serial(row.seq),
        "delivery_serial": row.seq,
        "action": row.action,
        "sender": sender_json(m),
        "name": field("name"),
        "data": field("data"),
        "extras": body.get("extras").cloned().unwrap_or_else(|| json!({})),
        "deleted": body.get("deleted").and_then(Value::as_bool).unwrap_or(false),
        "thread_id": m.thread_id,
        "version": version_meta(Some(row)),
        "created_at": m.created_at,
        "updated_at": row.created_at,
    })
}

/// Items of one page plus whether more follow and the cursor of the next page.
pub struct Listing {
    pub items: Vec<Value>,
    pub has_more: bool,
    pub next_cursor: Option<String>,
}

/// A message's versions, one page.
pub async fn list_versions(
    state: &State,
    channel_id: &str,
    channel_name: &str,
    serial: &str,
    page: &Page,
) -> ApiResult<Listing> {
    validation::serial(serial)?;
    let (cid, name, serial) = (
        channel_id.to_string(),
        channel_name.to_string(),
        serial.to_string(),
    );
    let (limit, newest, cursor) = (page.limit, page.newest_first, page.cursor);
    state
        .read(move |conn| {
            let m = queries::message(conn, &cid, &serial)?.ok_or_else(|| {
                ApiError::not_found(format!(
                    "Message '{serial}' was not found in channel '{name}'"
                ))
            })?;
            let mut rows = queries::versions_page(conn, &cid, &serial, newest, cursor, limit + 1)?;
            let has_more = rows.len() as i64 > limit;
            rows.truncate(limit as usize);
            let next_cursor = has_more
                .then(|| rows.last().map(|r| ids::version_serial(r.seq)))
                .flatten();
            Ok(Listing {
                items: rows.iter().map(|r| version_item(&name, &m, r)).collect(),
                has_more,
                next_cursor,
            })
        })
        .await
}

/// A channel's messages (latest state, one per logical message), one page.
pub async fn list_history(
    state: &State,
    channel_id: &str,
    channel_name: &str,
    page: &Page,
) -> ApiResult<Listing> {
    let (cid, name) = (channel_id.to_string(), channel_name.to_string());
    let (limit, newest, cursor) = (page.limit, page.newest_first, page.cursor);
    state
        .read(move |conn| {
            let mut rows = queries::history_page(conn, &cid, newest, cursor, limit + 1)?;
            let has_more = rows.len() as i64 > limit;
            rows.truncate(limit as usize);
            let next_cursor = has_more
                .then(|| rows.last().map(|m| m.history_serial.to_string()))
                .flatten();
            let seqs: Vec<i64> = rows
                .iter()
                .filter_map(|m| ids::parse_version_serial(&m.version_serial))
                .collect();
            let latest = queries::versions_at(conn, &cid, &seqs)?;
            let items = rows
                .iter()
                .map(|m| {
                    let v = ids::parse_version_serial(&m.version_serial)
                        .and_then(|seq| latest.get(&seq));
                    latest_item(&name, m, v)
                })
                .collect();
            Ok(Listing {
                items,
                has_more,
                next_cursor,
            })
        })
        .await
}

/// One message's latest state as an item.
pub async fn get_item(
    state: &State,
    channel_id: &str,
    channel_name: &str,
    serial: &str,
) -> ApiResult<Value> {
    validation::serial(serial)?;
    let (cid, name, serial) = (
        channel_id.to_string(),
        channel_name.to_string(),
        serial.to_string(),
    );
    state
        .read(move |conn| {
            let m = queries::message(conn, &cid, &serial)?.ok_or_else(|| {
                ApiError::not_found(format!(
                    "Message '{serial}' was not found in channel '{name}'"
                ))
            })?;
            let latest = ids::parse_version_serial(&m.version_serial)
                .map(|seq| queries::version_at(conn, &cid, seq))
                .transpose()?
                .flatten();
            Ok(latest_item(&name, &m, latest.as_ref()))
        })
        .await
}

pub fn parse_action(raw: &str) -> ApiResult<Action> {
    match Action::parse(raw) {
        Some(a) if a != Action::Create => Ok(a),
        _ => Err(ApiError::not_found(
            "unknown message action; use update, delete or append",
        )),
    }
}

/// Sends a validated mutation to the channel's actor.
#[allow(clippy::too_many_arguments)]
pub async fn mutate(
    state: &State,
    workspace_id: &str,
    channel_id: &str,
    actor: MutationActor,
    serial: String,
    action: Action,
    body: MutationBody,
    settings: &WorkspaceSettings,
) -> ApiResult<MutationOutcome> {
    let mutation = Mutation::parse(action, body)?;
    state
        .ask_channel(
            workspace_id,
            channel_id,
            Mutate {
                actor,
                serial,
                mutation,
                settings: VersionSettings {
                    enabled: settings.versioned_messages.enabled,
                    ai: settings.ai_transport.clone(),
                },
            },
        )
        .await?
}

pub fn status_word(o: &MutationOutcome) -> &'static str {
    if o.duplicate {
        "duplicate"
    } else {
        "applied"
    }
}
