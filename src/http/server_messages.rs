//! Messages on the signed server API (SPEC §5, seed 000): `POST /events` creates versioned
//! messages; update, delete, append, reads, versions and history address a channel by name.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use switchboard_actors::auth::constant_time_eq;
use switchboard_actors::channel::{Author, ChannelLimits, MutationActor, PostMessage};
use switchboard_actors::domain::channel::new_implicit;
use switchboard_actors::domain::message::NewMessage;
use switchboard_actors::domain::validation;
use switchboard_actors::domain::versioned::MutationBody;
use switchboard_actors::error::{ApiError, ApiResult, ErrorCode};
use switchboard_actors::ids;
use switchboard_actors::persistence::Write;
use switchboard_actors::store::queries;
use switchboard_actors::store::rows::Workspace;

use super::auth::{parse_body, signed_app};
use super::error::HttpResult;
use super::versions::{self, PageQuery};
use super::{json, State};

/// Pusher's limits: 100 channels per trigger, 64 KiB of event data.
const MAX_TRIGGER_CHANNELS: usize = 100;
const MAX_EVENT_DATA: usize = 64 * 1024;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/events", web::post().to(trigger))
        .route("/channels/{channel}/history", web::get().to(history))
        .route(
            "/channels/{channel}/messages/{serial}",
            web::get().to(get_message),
        )
        .route(
            "/channels/{channel}/messages/{serial}/versions",
            web::get().to(list_versions),
        )
        .route(
            "/channels/{channel}/messages/{serial}/{action}",
            web::post().to(mutate),
        );
}

/// The id of the channel of a name: the chat channel so named, else the implicit one
/// (created when `create` is set, else 404). Remembered for a few seconds (`channel_names`).
async fn channel_named(
    state: &State,
    ws: &Workspace,
    name: &str,
    create: bool,
) -> ApiResult<String> {
    validation::pusher_channel_name(name)?;
    if let Some(id) = state.channel_names.get(&ws.id, name) {
        return Ok(id);
    }
    for _ in 0..2 {
        let generation = state.channel_names.generation();
        let (w, n) = (ws.id.clone(), name.to_string());
        let found = state
            .read(move |conn| Ok(queries::channel_id_by_name(conn, &w, &n)?))
            .await?;
        if let Some(id) = found {
            state.channel_names.remember(&ws.id, name, &id, generation);
            return Ok(id);
        }
        if !create {
            break;
        }
        let now = ids::now_rfc3339();
        let channel = new_implicit(ids::new_channel_id(), ws.id.clone(), name, &now)?;
        let row = channel.clone();
        let created = state
            .persistence
            .write(Write {
                workspace_id: ws.id.clone(),
                channel_seqs: None,
                apply: Box::new(move |conn| {
                    if queries::channel_id_by_name(conn, &row.workspace_id, &row.name)?.is_some() {
                        return Ok(false);
                    }
                    queries::insert_channel(conn, &row)?;
                    Ok(true)
                }),
                events: Vec::new(),
                version: None,
                savepoint: true,
            })
            .await;
        match created {
            // Created, or someone else created it first: read it again.
            Ok(_) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(ApiError::not_found(format!("channel '{name}' not found")))
}

#[derive(Deserialize)]
pub struct TriggerBody {
    name: String,
    data: Value,
    channel: Option<String>,
    channels: Option<Vec<String>>,
    socket_id: Option<String>,
    /// `subscription_count`, `user_count` (comma-separated); any value also asks for the
    /// message serials of each create.
    info: Option<Value>,
    /// Extension: names the creator, so `*_own` rights can match it later.
    client_id: Option<String>,
}

impl TriggerBody {
    pub fn has_info(&self) -> bool {
        self.info.is_some()
    }
}

/// `POST /apps/{appId}/events`: one versioned create per channel.
async fn trigger(
    state: State,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
) -> HttpResult<HttpResponse> {
    let ws = signed_app(&state, &req, &body, &path).await?;
    let b: TriggerBody = parse_body(&req, &body)?;
    let channels = check_trigger(&b)?;
    let answer = publish(&state, &ws, b, channels).await?;
    Ok(json(StatusCode::OK, &answer))
}

/// The channels of a trigger, after Pusher's limits: 100 channels, 200-byte names, 64 KiB
/// of data. Checked for every event of a batch before any is published.
pub fn check_trigger(b: &TriggerBody) -> ApiResult<Vec<String>> {
    let channels: Vec<String> = match (&b.channel, &b.channels) {
        (Some(c), None) => vec![c.clone()],
        (None, Some(list)) => list.clone(),
        _ => {
            return Err(ApiError::invalid(
                "give exactly one of channel and channels",
            ))
        }
    };
    if channels.is_empty() {
        return Err(ApiError::invalid("channels must not be empty"));
    }
    if channels.len() > MAX_TRIGGER_CHANNELS {
        return Err(ApiError::limit(format!(
            "an event goes to at most {MAX_TRIGGER_CHANNELS} channels"
        )));
    }
    if !(1..=200).contains(&b.name.len()) {
        return Err(ApiError::invalid("name must be 1..200 bytes"));
    }
    let data_len = match &b.data {
        Value::String(s) => s.len(),
        other => other.to_string().len(),
    };
    if data_len > MAX_EVENT_DATA {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("event data exceeds {MAX_EVENT_DATA} bytes"),
        ));
    }
    for c in &channels {
        validation::pusher_channel_name(c)?;
    }
    if let Some(s) = &b.socket_id {
        if !is_socket_id(s) {
            return Err(ApiError::invalid(format!(
                "Invalid socket id: '{}'",
                s.chars().take(64).collect::<String>()
            )));
        }
    }
    if let Some(c) = &b.client_id {
        validation::entity_id(c)?;
    }
    Ok(channels)
}

/// Pusher's socket id shape, `digits.digits`: anything else cannot name a socket.
fn is_socket_id(s: &str) -> bool {
    s.len() <= 64
        && s.split_once('.').is_some_and(|(a, b)| {
            [a, b]
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()))
        })
}

/// Publishes one checked event: a versioned create on each channel. Answers `{}`, or with
/// `info` the channels' serials and the asked counts.
pub async fn publish(
    state: &State,
    ws: &Workspace,
    b: TriggerBody,
    channels: Vec<String>,
) -> ApiResult<Value> {
    let creator = match (&b.client_id, &b.socket_id) {
        (Some(c), _) => Some(c.clone()),
        (None, Some(s)) => state
            .registry
            .socket(&ws.id, s)
            .map(|s| s.entity_id)
            .filter(|e| !e.is_empty()),
        (None, None) => None,
    };
    let limits = ChannelLimits {
        max_members: ws.settings.max_channel_members,
        max_attachments: ws.settings.max_attachments,
    };
    let mut acks = Map::new();
    for name in channels {
        let channel_id = channel_named(state, ws, &name, true).await?;
        let out = state
            .ask_channel(
                &ws.id,
                &channel_id,
                PostMessage {
                    author: Author::Server {
                        client_id: creator.clone(),
                    },
                    input: NewMessage {
                        data: Some(b.data.clone()),
                        name: Some(b.name.clone()),
                        ..Default::default()
                    },
                    limits,
                    except_socket: b.socket_id.clone(),
                },
            )
            .await??;
        let m = out.message;
        acks.insert(
            name,
            json!({
                "message_serial": m.message_serial,
                "history_serial": m.history_serial,
                "delivery_serial": m.history_serial,
                "version_serial": m.version_serial,
            }),
        );
    }
    let Some(info) = &b.info else {
        return Ok(json!({}));
    };
    let wanted = super::pusher_api::InfoFields::parse(info.as_str().unwrap_or(""));
    for (name, ack) in acks.iter_mut() {
        super::pusher_api::add_counts(state, &ws.id, name, wanted, ack).await;
    }
    Ok(json!({ "channels": acks }))
}

/// `POST .../channels/{channel}/messages/{serial}/update|delete|append`.
async fn mutate(
    state: State,
    req: HttpRequest,
    path: web::Path<(String, String, String, String)>,
    body: web::Bytes,
) -> HttpResult<HttpResponse> {
    let (app, channel_name, serial, action) = path.into_inner();
    let ws = signed_app(&state, &req, &body, &app).await?;
    let action = versions::parse_action(&action)?;
    let b: MutationBody = parse_body(&req, &body)?;
    let actor = match &b.socket_id {
        Some(socket_id) => {
            let refused = || {
                ApiError::auth(format!(
                    "Connection is not allowed to {} message on channel '{channel_name}'",
                    action.as_str()
                ))
            };
            let socket = state
                .registry
                .socket(&ws.id, socket_id)
                .ok_or_else(refused)?;
            if let Some(c) = &b.client_id {
                if !constant_time_eq(c, &socket.entity_id) {
                    return Err(refused().into());
                }
            }
            let (w, who) = (ws.id.clone(), socket.entity_id.clone());
            let entity = state
                .read(move |conn| Ok(queries::entity(conn, &w, &who)?))
                .await?
                .filter(|e| e.active && !e.blocked)
                .ok_or_else(refused)?;
            MutationActor::Connection {
                entity,
                capabilities: socket.capabilities,
            }
        }
        None => MutationActor::Privileged {
            client_id: b.client_id.clone(),
        },
    };
    let channel_id = channel_named(&state, &ws, &channel_name, false).await?;
    let out = versions::mutate(
        &state,
        &ws.id,
        &channel_id,
        actor,
        serial,
        action,
        b,
        &ws.settings,
    )
    .await?;
    Ok(json(
        StatusCode::OK,
        &json!({
            "channel": channel_name,
            "message_serial": out.message.message_serial,
            "action": out.action.as_str(),
            "accepted": true,
            "version_serial": out.version_serial,
            "history_serial": out.message.history_serial,
            "delivery_serial": out.delivery_serial,
            "status": versions::status_word(&out),
        }),
    ))
}

async fn get_message(
    state: State,
    req: HttpRequest,
    path: web::Path<(String, String, String)>,
) -> HttpResult<HttpResponse> {
    let (app, channel_name, serial) = path.into_inner();
    let ws = signed_app(&state, &req, &[], &app).await?;
    let channel_id = channel_named(&state, &ws, &channel_name, false).await?;
    let item = versions::get_item(&state, &channel_id, &channel_name, &serial).await?;
    Ok(json(
        StatusCode::OK,
        &json!({"channel": channel_name, "item": item}),
    ))
}

async fn list_versions(
    state: State,
    req: HttpRequest,
    path: web::Path<(String, String, String)>,
) -> HttpResult<HttpResponse> {
    let (app, channel_name, serial) = path.into_inner();
    let ws = signed_app(&state, &req, &[], &app).await?;
    let q = query(&req)?;
    let page = versions::page(
        &q,
        ws.settings.versioned_messages.max_page_size,
        ids::parse_version_serial,
    )?;
    versions::check_enabled(&ws.settings)?;
    let channel_id = channel_named(&state, &ws, &channel_name, false).await?;
    let listing =
        versions::list_versions(&state, &channel_id, &channel_name, &serial, &page).await?;
    Ok(json(
        StatusCode::OK,
        &versions::listing::listing_json(&channel_name, &page, listing),
    ))
}

async fn history(
    state: State,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> HttpResult<HttpResponse> {
    let (app, channel_name) = path.into_inner();
    let ws = signed_app(&state, &req, &[], &app).await?;
    let q = query(&req)?;
    let page = versions::page(&q, ws.settings.versioned_messages.max_page_size, |c| {
        c.parse::<i64>().ok().filter(|n| *n >= 0)
    })?;
    let channel_id = channel_named(&state, &ws, &channel_name, false).await?;
    let listing = versions::list_history(&state, &channel_id, &channel_name, &page).await?;
    Ok(json(
        StatusCode::OK,
        &versions::listing::listing_json(&channel_name, &page, listing),
    ))
}

/// The page parameters; signed requests carry auth parameters in the same query string.
fn query(req: &HttpRequest) -> ApiResult<PageQuery> {
    let pairs = web::Query::<Vec<(String, String)>>::from_query(req.query_string())
        .map_err(|_| ApiError::invalid("invalid query"))?
        .into_inner();
    let get = |k: &str| {
        pairs
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    let limit = match get("limit") {
        None => None,
        Some(l) => Some(
            l.parse::<i64>()
                .map_err(|_| ApiError::invalid("limit must be an integer"))?,
        ),
    };
    Ok(PageQuery {
        limit,
        direction: get("direction"),
        cursor: get("cursor"),
    })
}
