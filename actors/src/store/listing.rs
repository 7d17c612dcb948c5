//! The item projections and pages of versioned messages, shared by the chat API, the
//! server API and the Pusher face's `channel_history`.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::domain::message::Message;
use crate::error::{ApiError, ApiResult};
use crate::ids;
use crate::store::rows::VersionRow;
use crate::store::{queries, Conn};

/// `?limit&direction&cursor` of the versions and history listings.
#[derive(Debug, Deserialize)]
pub struct PageQuery {
    pub limit: Option<i64>,
    pub direction: Option<String>,
    pub cursor: Option<String>,
}

/// A checked page request.
#[derive(Debug, Clone)]
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

/// A channel's messages (latest state, one per logical message), one page.
pub fn history(conn: &mut Conn, channel_id: &str, name: &str, page: &Page) -> ApiResult<Listing> {
    let (limit, newest, cursor) = (page.limit, page.newest_first, page.cursor);
    let mut rows = queries::history_page(conn, channel_id, newest, cursor, limit + 1)?;
    let has_more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next_cursor = has_more
        .then(|| rows.last().map(|m| m.history_serial.to_string()))
        .flatten();
    let seqs: Vec<i64> = rows
        .iter()
        .filter_map(|m| ids::parse_version_serial(&m.version_serial))
        .collect();
    let latest = queries::versions_at(conn, channel_id, &seqs)?;
    let items = rows
        .iter()
        .map(|m| {
            let v = ids::parse_version_serial(&m.version_serial).and_then(|seq| latest.get(&seq));
            latest_item(name, m, v)
        })
        .collect();
    Ok(Listing {
        items,
        has_more,
        next_cursor,
    })
}

/// The listing as JSON: `{channel, direction, limit, has_more, items, next_cursor?}`.
pub fn listing_json(channel: &str, page: &Page, l: Listing) -> Value {
    let mut v = json!({
        "channel": channel,
        "direction": page.direction(),
        "limit": page.limit,
        "has_more": l.has_more,
        "items": l.items,
    });
    if let Some(c) = l.next_cursor {
        v["next_cursor"] = json!(c);
    }
    v
}

/// V2 `channel_history` over the socket: the HTTP history page of a channel by name, with
/// `limit`, `direction` and `cursor` taken from the request's `data` (or `data.params`).
pub fn channel_history(
    conn: &mut Conn,
    workspace_id: &str,
    name: &str,
    params: &Value,
    max_page_size: i64,
) -> ApiResult<Value> {
    let q = PageQuery {
        limit: params.get("limit").and_then(Value::as_i64),
        direction: params
            .get("direction")
            .and_then(Value::as_str)
            .map(str::to_string),
        cursor: params.get("cursor").and_then(|c| match c {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }),
    };
    let page = page(&q, max_page_size.max(1) as usize, |c| {
        c.parse::<i64>().ok().filter(|n| *n >= 0)
    })?;
    let Some(id) = queries::channel_id_by_name(conn, workspace_id, name)? else {
        return Ok(listing_json(
            name,
            &page,
            Listing {
                items: Vec::new(),
                has_more: false,
                next_cursor: None,
            },
        ));
    };
    let listing = history(conn, &id, name, &page)?;
    Ok(listing_json(name, &page, listing))
}
