//! `GET /app/{key}`: the Pusher-compatible WebSocket (SPEC §4). Everything a socket can be
//! refused for at connect (unknown key, origin, token) is answered after the upgrade, as
//! Pusher clients expect: a `pusher:error` frame, then a close with the same code.

use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_actors::ws;
use serde::Deserialize;
use std::sync::Arc;
use switchboard_actors::auth;
use switchboard_actors::domain::capabilities::Capabilities;
use switchboard_actors::error::close_code::pusher as code;
use switchboard_actors::error::ApiError;
use switchboard_actors::pusher::protocol::{AppendMode, Protocol};
use switchboard_actors::pusher::session::{
    Admission, App, PusherConfig, PusherSession, TokenGrant,
};
use switchboard_actors::store::queries;

use super::auth::now_secs;
use super::error::HttpResult;
use super::realtime::MAX_FRAME;
use super::{AppState, State};

#[derive(Deserialize)]
struct ConnectQuery {
    protocol: Option<String>,
    append_mode: Option<String>,
    token: Option<String>,
}

pub async fn connect(
    state: State,
    req: HttpRequest,
    key: web::Path<String>,
    stream: web::Payload,
) -> HttpResult<HttpResponse> {
    let q = web::Query::<ConnectQuery>::from_query(req.query_string())
        .map_err(|_| ApiError::invalid("invalid query"))?
        .into_inner();
    let protocol = Protocol::from_query(q.protocol.as_deref());
    let append_mode = match protocol {
        // V1 never receives appends; the parameter is V2's.
        Protocol::V1 => AppendMode::Full,
        Protocol::V2 => AppendMode::parse(q.append_mode.as_deref())
            .ok_or_else(|| ApiError::invalid("append_mode must be delta or full"))?,
    };
    let key = key.into_inner();
    let admission = match load_app(&state, &key).await? {
        None => Admission::Refuse(
            code::APP_NOT_FOUND,
            format!("App key {key} not in this cluster"),
        ),
        Some(app) => admit(&state, &req, app, protocol, q.token.as_deref()).await,
    };
    let config = PusherConfig {
        queue: state.config.session.queue,
        max_replay: state.config.session.max_replay,
        ..state.config.pusher.clone()
    };
    let session = PusherSession::new(
        protocol,
        append_mode,
        admission,
        state.registry.clone(),
        config,
    );
    ws::WsResponseBuilder::new(session, &req, stream)
        .frame_size(MAX_FRAME)
        .start()
        .map_err(|_| ApiError::invalid("not a valid WebSocket upgrade").into())
}

/// The workspace of a key, shared by its sockets (and cached: a connect storm reads it once;
/// settings changes clear the cache).
async fn load_app(state: &AppState, key: &str) -> Result<Option<Arc<App>>, ApiError> {
    if let Some(app) = state.auth_cache.app(key) {
        return Ok(Some(app));
    }
    let generation = state.auth_cache.current_generation();
    let k = key.to_string();
    let Some(ws) = state
        .read(move |conn| Ok(queries::workspace_by_key(conn, &k)?))
        .await?
    else {
        return Ok(None);
    };
    state.auth_cache.put_signed_workspace(&ws, generation);
    let app = Arc::new(App {
        workspace_id: ws.id,
        key: ws.key,
        secret: ws.secret,
        settings: ws.settings,
    });
    state.auth_cache.put_app(key, app.clone(), generation);
    Ok(Some(app))
}

/// Origin (any, unless the workspace lists its own) and the V2 token.
async fn admit(
    state: &AppState,
    req: &HttpRequest,
    app: Arc<App>,
    protocol: Protocol,
    token: Option<&str>,
) -> Admission {
    if let Some(origin) = req.headers().get("origin") {
        let allowed = &app.settings.allowed_origins;
        let ok = allowed.is_empty()
            || origin
                .to_str()
                .is_ok_and(|o| allowed.iter().any(|a| a == o || a == "*"));
        if !ok {
            return Admission::Refuse(code::UNAUTHORIZED, "Origin not allowed".into());
        }
    }
    let grant = match (protocol, token) {
        (Protocol::V2, Some(t)) => match verify_token(state, &app, t).await {
            Ok(g) => Some(g),
            Err(e) => return Admission::Refuse(code::UNAUTHORIZED, e.message),
        },
        _ => None,
    };
    Admission::Admit { app, token: grant }
}

/// A §3 token of this workspace naming an active, unblocked entity.
async fn verify_token(state: &AppState, app: &App, token: &str) -> Result<TokenGrant, ApiError> {
    if auth::token_key_id(token)? != app.key {
        return Err(ApiError::auth("token is for another app"));
    }
    let claims = auth::verify_token(token, &app.secret, now_secs())?;
    let subject = claims
        .subject()
        .ok_or_else(|| ApiError::auth("token names no user"))?
        .to_string();
    let (w, s) = (app.workspace_id.clone(), subject.clone());
    let entity = state
        .read(move |conn| Ok(queries::entity(conn, &w, &s)?))
        .await?;
    if !entity.is_some_and(|e| e.active && !e.blocked) {
        return Err(ApiError::auth("token's entity is not an active member"));
    }
    Ok(TokenGrant {
        user_id: subject,
        capabilities: claims.capabilities().map(Capabilities::from_claim),
        exp: claims.exp,
    })
}
