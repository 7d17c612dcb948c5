//! What the chat API and the server API share about versioned messages: the item projection,
//! version and history paging, and sending a mutation to the channel actor.

use serde_json::Value;
use switchboard_actors::channel::{Mutate, MutationActor, MutationOutcome, VersionSettings};
use switchboard_actors::domain::versioned::{Action, Mutation, MutationBody};
use switchboard_actors::error::{ApiError, ApiResult, ErrorCode};
use switchboard_actors::settings::WorkspaceSettings;
use switchboard_actors::store::queries;
use switchboard_actors::{domain::validation, ids};

use super::State;

pub use switchboard_actors::store::listing::{
    self, latest_item, page, version_item, Listing, Page, PageQuery,
};

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
    let page = page.clone();
    state
        .read(move |conn| listing::history(conn, &cid, &name, &page))
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
