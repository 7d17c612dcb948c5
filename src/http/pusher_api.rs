//! The Pusher HTTP API beside `/events` (SPEC §5): batches, channel occupancy and presence
//! users, and terminating a user's connections. Occupancy counts the sockets subscribed
//! through the Pusher face: of the whole cluster with the Redis broker (falling back to this
//! node's hub while Redis cannot answer), of this node otherwise.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use switchboard_actors::domain::validation;
use switchboard_actors::error::{ApiError, ApiResult};
use switchboard_actors::pusher::channel_auth::ChannelKind;
use switchboard_actors::pusher::hub::{
    ChannelStat, ChannelStatus, ListChannels, PresenceUsers, TerminateUser,
};

use super::auth::{parse_body, signed_app};
use super::error::HttpResult;
use super::server_messages::{check_trigger, publish, TriggerBody};
use super::{json, AppState, State};

/// Pusher's limit of events in one batch.
const MAX_BATCH: usize = 10;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/batch_events", web::post().to(batch_events))
        .route("/channels", web::get().to(list_channels))
        .route("/channels/{channel}", web::get().to(channel_info))
        .route("/channels/{channel}/users", web::get().to(channel_users))
        .route(
            "/users/{user_id}/terminate_connections",
            web::post().to(terminate_connections),
        );
}

/// The `info` attributes a request asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct InfoFields {
    pub subscription_count: bool,
    pub user_count: bool,
}

impl InfoFields {
    pub fn parse(s: &str) -> Self {
        let has = |f: &str| s.split(',').any(|p| p.trim() == f);
        Self {
            subscription_count: has("subscription_count"),
            user_count: has("user_count"),
        }
    }
}

fn counts(stat: Option<&ChannelStat>, wanted: InfoFields, channel: &str) -> Map<String, Value> {
    let mut m = Map::new();
    if wanted.subscription_count {
        m.insert(
            "subscription_count".into(),
            json!(stat.map_or(0, |s| s.subscription_count)),
        );
    }
    if wanted.user_count && ChannelKind::of(channel) == ChannelKind::Presence {
        m.insert(
            "user_count".into(),
            json!(stat.and_then(|s| s.user_count).unwrap_or(0)),
        );
    }
    m
}

async fn stat_of(state: &AppState, workspace_id: &str, channel: &str) -> Option<ChannelStat> {
    if let Some(cluster) = state.registry.cluster() {
        if let Some(stat) = cluster.channel(workspace_id, channel).await {
            return stat;
        }
    }
    let hub = state.registry.running_workspace(workspace_id)?;
    hub.send(ChannelStatus {
        name: channel.to_string(),
    })
    .await
    .ok()
    .flatten()
}

/// Adds the asked counts of `channel` to a trigger's acknowledgement.
pub async fn add_counts(
    state: &AppState,
    workspace_id: &str,
    channel: &str,
    wanted: InfoFields,
    ack: &mut Value,
) {
    if wanted == InfoFields::default() {
        return;
    }
    let stat = stat_of(state, workspace_id, channel).await;
    if let Value::Object(m) = ack {
        m.extend(counts(stat.as_ref(), wanted, channel));
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Batch {
    batch: Vec<TriggerBody>,
}

/// `POST /batch_events`: up to 10 events, each checked before any is published.
async fn batch_events(
    state: State,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
) -> HttpResult<HttpResponse> {
    let ws = signed_app(&state, &req, &body, &path).await?;
    let b: Batch = parse_body(&req, &body)?;
    if b.batch.is_empty() {
        return Err(ApiError::invalid("batch must not be empty").into());
    }
    if b.batch.len() > MAX_BATCH {
        return Err(ApiError::limit(format!("a batch holds at most {MAX_BATCH} events")).into());
    }
    let mut checked = Vec::with_capacity(b.batch.len());
    for event in b.batch {
        let channels = check_trigger(&event)?;
        if channels.len() != 1 {
            return Err(ApiError::invalid("each batch event names one channel").into());
        }
        checked.push((event, channels));
    }
    let any_info = checked.iter().any(|(e, _)| e.has_info());
    let mut answers = Vec::with_capacity(checked.len());
    for (event, channels) in checked {
        let name = channels[0].clone();
        let answer = publish(&state, &ws, event, channels).await?;
        answers.push(answer["channels"][&name].clone());
    }
    let body = if any_info {
        json!({"batch": answers.into_iter().map(|a| if a.is_null() { json!({}) } else { a }).collect::<Vec<_>>()})
    } else {
        json!({})
    };
    Ok(json(StatusCode::OK, &body))
}

#[derive(Deserialize)]
struct ChannelsQuery {
    filter_by_prefix: Option<String>,
    info: Option<String>,
}

fn channels_query(req: &HttpRequest) -> ApiResult<ChannelsQuery> {
    // Signed requests carry auth_* parameters too: read only ours.
    let pairs = web::Query::<Vec<(String, String)>>::from_query(req.query_string())
        .map_err(|_| ApiError::invalid("invalid query"))?
        .into_inner();
    let get = |k: &str| {
        pairs
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    Ok(ChannelsQuery {
        filter_by_prefix: get("filter_by_prefix"),
        info: get("info"),
    })
}

/// `GET /channels`: occupied channels, `{channels: {name: {counts asked}}}`.
async fn list_channels(
    state: State,
    req: HttpRequest,
    path: web::Path<String>,
) -> HttpResult<HttpResponse> {
    let ws = signed_app(&state, &req, &[], &path).await?;
    let q = channels_query(&req)?;
    let wanted = InfoFields::parse(q.info.as_deref().unwrap_or(""));
    // Pusher: user counts exist only on presence channels, so they must be filtered to them.
    if wanted.user_count
        && !q
            .filter_by_prefix
            .as_deref()
            .is_some_and(|p| p.starts_with("presence-"))
    {
        return Err(ApiError::invalid("info=user_count needs filter_by_prefix=presence-").into());
    }
    let cluster = match state.registry.cluster() {
        Some(c) => c.channels(&ws.id, q.filter_by_prefix.as_deref()).await,
        None => None,
    };
    let list = match (cluster, state.registry.running_workspace(&ws.id)) {
        (Some(list), _) => list,
        (None, Some(hub)) => hub
            .send(ListChannels {
                prefix: q.filter_by_prefix,
            })
            .await
            .map_err(ApiError::internal)?,
        (None, None) => Vec::new(),
    };
    let channels: Map<String, Value> = list
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                Value::Object(counts(Some(s), wanted, &s.name)),
            )
        })
        .collect();
    Ok(json(StatusCode::OK, &json!({ "channels": channels })))
}

/// `GET /channels/{channel}`: `{occupied, subscription_count?, user_count?}`.
async fn channel_info(
    state: State,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> HttpResult<HttpResponse> {
    let (app, channel) = path.into_inner();
    let ws = signed_app(&state, &req, &[], &app).await?;
    validation::pusher_channel_name(&channel)?;
    let q = channels_query(&req)?;
    let wanted = InfoFields::parse(q.info.as_deref().unwrap_or(""));
    if wanted.user_count && ChannelKind::of(&channel) != ChannelKind::Presence {
        return Err(ApiError::invalid("user_count is only available on presence channels").into());
    }
    let stat = stat_of(&state, &ws.id, &channel).await;
    let mut body = counts(stat.as_ref(), wanted, &channel);
    body.insert("occupied".into(), json!(stat.is_some()));
    Ok(json(StatusCode::OK, &Value::Object(body)))
}

/// `GET /channels/{channel}/users`: `{users: [{id}]}` of a presence channel.
async fn channel_users(
    state: State,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> HttpResult<HttpResponse> {
    let (app, channel) = path.into_inner();
    let ws = signed_app(&state, &req, &[], &app).await?;
    validation::pusher_channel_name(&channel)?;
    if ChannelKind::of(&channel) != ChannelKind::Presence {
        return Err(ApiError::invalid("users are only available on presence channels").into());
    }
    let cluster = match state.registry.cluster() {
        Some(c) => c.users(&ws.id, &channel).await,
        None => None,
    };
    let ids = match (cluster, state.registry.running_workspace(&ws.id)) {
        (Some(ids), _) => ids,
        (None, Some(hub)) => hub
            .send(PresenceUsers { name: channel })
            .await
            .map_err(ApiError::internal)?,
        (None, None) => Vec::new(),
    };
    let users: Vec<Value> = ids.into_iter().map(|id| json!({ "id": id })).collect();
    Ok(json(StatusCode::OK, &json!({ "users": users })))
}

/// `POST /users/{id}/terminate_connections`: closes the user's sockets (4009) on every node.
/// `{}`.
async fn terminate_connections(
    state: State,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    body: web::Bytes,
) -> HttpResult<HttpResponse> {
    let (app, user_id) = path.into_inner();
    let ws = signed_app(&state, &req, &body, &app).await?;
    validation::entity_id(&user_id)?;
    // Every node closes its own sockets of the user.
    if let Some(cluster) = state.registry.cluster() {
        cluster.terminate_user(&ws.id, &user_id);
    }
    if let Some(hub) = state.registry.running_workspace(&ws.id) {
        hub.send(TerminateUser { user_id })
            .await
            .map_err(ApiError::internal)?;
    }
    Ok(json(StatusCode::OK, &json!({})))
}
