//! Realtime surfaces (seed 003): the WebSocket (replay then live), pull replay, ephemerals.

use std::collections::HashSet;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_actors::ws;
use serde::Deserialize;
use serde_json::{json, Value};
use switchboard_actors::domain::entity::EntityKind;
use switchboard_actors::domain::event::{Event, Viewer};
use switchboard_actors::error::{ApiError, ApiResult, ErrorCode};
use switchboard_actors::session::RealtimeSession;
use switchboard_actors::store::queries;
use switchboard_actors::{channel::GetChannel, ids};

use super::auth::{authenticate, bearer_subprotocol, bearer_token, Caller};
use super::error::HttpResult;
use super::{json, AppState, State};

/// Inbound WebSocket frames above this close the socket with 1009.
pub const MAX_FRAME: usize = 64 * 1024;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/realtime/ws", web::get().to(websocket))
        .route("/realtime/events", web::get().to(pull_events))
        .route("/realtime/ephemeral", web::post().to(ephemeral));
}

/// A browser origin must be configured (globally or by the workspace); no Origin is a
/// non-browser client and is admitted.
fn check_origin(state: &AppState, caller: &Caller, req: &HttpRequest) -> ApiResult<()> {
    let Some(origin) = req.headers().get("origin") else {
        return Ok(());
    };
    let origin = origin
        .to_str()
        .map_err(|_| ApiError::forbidden("origin not allowed"))?;
    let allowed = state
        .config
        .allowed_origins
        .iter()
        .chain(caller.workspace.settings.allowed_origins.iter());
    if allowed.into_iter().any(|o| o == origin || o == "*") {
        Ok(())
    } else {
        Err(ApiError::forbidden("origin not allowed"))
    }
}

#[derive(Deserialize)]
struct WsQuery {
    workspace_id: Option<String>,
    after_cursor: Option<String>,
}

async fn websocket(
    state: State,
    req: HttpRequest,
    stream: web::Payload,
) -> HttpResult<HttpResponse> {
    let q = web::Query::<WsQuery>::from_query(req.query_string())
        .map_err(|_| ApiError::invalid("invalid query"))?
        .into_inner();
    let token = bearer_token(&req).ok_or_else(|| ApiError::auth("missing bearer token"))?;
    // Membership is checked on every connect.
    let caller = authenticate(&state, token).await?;
    check_origin(&state, &caller, &req)?;
    if let Some(w) = &q.workspace_id {
        if w != &caller.workspace.id {
            return Err(ApiError::forbidden("token is not for this workspace").into());
        }
    }
    let guest_channels: HashSet<String> = if caller.entity.is_guest() {
        let (ws, who) = (caller.workspace.id.clone(), caller.entity.id.clone());
        state
            .read(move |conn| Ok(queries::member_channel_ids(conn, &ws, &who)?))
            .await?
            .into_iter()
            .collect()
    } else {
        HashSet::new()
    };
    let session = RealtimeSession::new(
        caller.workspace.id.clone(),
        caller.entity.id.clone(),
        caller.entity.is_guest(),
        guest_channels,
        q.after_cursor,
        state.registry.clone(),
        state.config.session.clone(),
    )
    .with_capabilities(caller.capabilities());
    let protocol = bearer_subprotocol(&req).map(|(p, _)| p);
    let protocols: Vec<&str> = protocol.iter().map(String::as_str).collect();
    let builder = ws::WsResponseBuilder::new(session, &req, stream).frame_size(MAX_FRAME);
    let res = if protocols.is_empty() {
        builder.start()
    } else {
        builder.protocols(&protocols).start()
    };
    res.map_err(|_| ApiError::invalid("not a valid WebSocket upgrade").into())
}

#[derive(Deserialize)]
struct PullQuery {
    after_cursor: Option<String>,
    limit: Option<i64>,
    workspace_id: Option<String>,
}

async fn pull_events(
    state: State,
    caller: Caller,
    q: web::Query<PullQuery>,
) -> HttpResult<HttpResponse> {
    let q = q.into_inner();
    if q.workspace_id
        .as_ref()
        .is_some_and(|w| w != &caller.workspace.id)
    {
        return Err(ApiError::forbidden("token is not for this workspace").into());
    }
    let limit = match q.limit {
        None => 500,
        Some(l) if (1..=500).contains(&l) => l,
        Some(_) => return Err(ApiError::invalid("limit must be 1..500").into()),
    };
    let resync = || {
        ApiError::new(
            ErrorCode::ResyncRequired,
            "cursor was pruned or is unknown; resync required",
        )
    };
    // No cursor: from the oldest event still kept.
    let after = match q.after_cursor.as_deref() {
        None | Some("") => None,
        Some(raw) => Some(ids::parse_cursor(raw).ok_or_else(resync)?),
    };
    let (ws, who, is_guest) = (
        caller.workspace.id.clone(),
        caller.entity.id.clone(),
        caller.entity.is_guest(),
    );
    let (events, next) = state
        .read(move |conn| {
            let (tail, pruned) = queries::workspace_cursor_state(conn, &ws)?;
            let after = after.unwrap_or(pruned);
            let known = after == 0 || after == pruned || queries::event_exists(conn, &ws, after)?;
            if after > tail || after < pruned || !known {
                return Err(resync());
            }
            let guest_channels: HashSet<String> = if is_guest {
                queries::member_channel_ids(conn, &ws, &who)?
                    .into_iter()
                    .collect()
            } else {
                HashSet::new()
            };
            let rows = queries::events_after_for(conn, &ws, &who, after, tail, limit)?;
            let full = rows.len() as i64 == limit;
            let next = if full {
                rows.last().map_or(tail, |r| r.cursor)
            } else {
                tail
            };
            let viewer = Viewer {
                entity_id: &who,
                is_guest,
                guest_channels: &guest_channels,
            };
            let events: Vec<Value> = rows
                .into_iter()
                .map(|r| r.into_event())
                .filter(|e| viewer.may_see(None, e.channel_id.as_deref()))
                .map(|e| e.to_json())
                .collect();
            Ok((events, next))
        })
        .await?;
    Ok(json(
        StatusCode::OK,
        &json!({"events": events, "next_cursor": ids::cursor_string(next)}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EphemeralBody {
    #[serde(rename = "type")]
    event_type: String,
    channel_id: Option<String>,
    payload: Option<Value>,
}

const EPHEMERAL_TYPES: &[&str] = &[
    "typing.started",
    "typing.stopped",
    "presence.changed",
    "agent.progress",
];

async fn ephemeral(
    state: State,
    caller: Caller,
    body: web::Json<EphemeralBody>,
) -> HttpResult<HttpResponse> {
    let body = body.into_inner();
    let Some(event_type) = EPHEMERAL_TYPES.iter().find(|t| **t == body.event_type) else {
        return Err(ApiError::invalid(format!(
            "type must be one of {}",
            EPHEMERAL_TYPES.join(", ")
        ))
        .into());
    };
    if *event_type == "agent.progress" {
        if caller.entity.kind != EntityKind::Agent {
            return Err(ApiError::forbidden("only agents may send agent.progress").into());
        }
        if body.channel_id.is_none() {
            return Err(ApiError::invalid("agent.progress must name exactly one channel").into());
        }
    }
    let mut payload = body.payload.unwrap_or_else(|| json!({}));
    let Value::Object(map) = &mut payload else {
        return Err(ApiError::invalid("payload must be a JSON object").into());
    };
    if serde_json::to_vec(&map).map(|v| v.len()).unwrap_or(0) > 16 * 1024 {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            "ephemeral payload exceeds 16 KiB",
        )
        .into());
    }
    // The server, not the client, says who sent it.
    map.insert("user_id".into(), json!(caller.entity.id));
    let recipients = match &body.channel_id {
        Some(id) => {
            let channel = state
                .ask_channel(
                    &caller.workspace.id,
                    id,
                    GetChannel {
                        viewer: caller.entity.clone(),
                    },
                )
                .await??;
            channel.check_member(&caller.entity)?;
            if channel.channel_type == switchboard_actors::domain::channel::ChannelType::Direct {
                map.insert("direct_conversation_id".into(), json!(channel.id));
            }
            channel.private_recipients()
        }
        None => None,
    };
    let event = Event::build(
        format!("eph_{}", ulid::Ulid::new().to_string().to_lowercase()),
        None,
        event_type.to_string(),
        caller.workspace.id.clone(),
        body.channel_id,
        None,
        ids::now_rfc3339(),
        payload,
        recipients,
    );
    state.broker.publish_ephemeral(event.clone());
    Ok(json(
        StatusCode::ACCEPTED,
        &json!({"event": event.to_json()}),
    ))
}
