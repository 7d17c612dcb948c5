//! The signed server API under `/apps/{app_id}` (SPEC §5): entities, tokens, settings.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};
use switchboard_actors::auth;
use switchboard_actors::broker::Control;
use switchboard_actors::domain::entity::{Entity, EntityKind, Role};
use switchboard_actors::domain::validation;
use switchboard_actors::error::{ApiError, ApiResult};
use switchboard_actors::persistence::Write;
use switchboard_actors::store::queries;
use switchboard_actors::store::rows::Workspace;
use switchboard_actors::{ids, settings::WorkspaceSettings};

use super::auth::{now_secs, parse_body, signed_app};
use super::error::HttpResult;
use super::{json, State};

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/entities", web::post().to(create_entity))
        .route("/entities", web::get().to(list_entities))
        .route("/entities/{id}", web::patch().to(patch_entity))
        .route("/entities/{id}", web::delete().to(delete_entity))
        .route("/tokens", web::post().to(create_token))
        .route("/settings", web::get().to(get_settings))
        .route("/settings", web::patch().to(patch_settings))
        .configure(super::server_messages::routes)
        .configure(super::pusher_api::routes)
        .default_service(web::to(super::error::unknown_route));
}

/// Tells the other nodes (cluster mode) of a change that emits no event, after this node
/// dropped its own caches of it: theirs drop when they hear of it.
fn announce(state: &State, workspace_id: &str, control: Control) {
    state.broker.publish_control(workspace_id, control);
}

fn entity_changed(entity_id: &str, close: Option<&str>) -> Control {
    Control::Entity {
        entity_id: entity_id.to_string(),
        close: close.map(str::to_string),
    }
}

/// A write that emits no event: entities and settings go through the one writer too.
async fn write_plain(
    state: &State,
    workspace_id: &str,
    apply: impl FnOnce(&mut switchboard_actors::store::Conn) -> ApiResult<()> + Send + 'static,
) -> ApiResult<()> {
    state
        .persistence
        .write(Write {
            workspace_id: workspace_id.to_string(),
            channel_seqs: None,
            apply: Box::new(move |conn| apply(conn).map(|_| true)),
            events: Vec::new(),
            version: None,
            savepoint: true,
        })
        .await?;
    // Entities and settings are what a verified token resolves to.
    state.auth_cache.clear();
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewEntity {
    id: String,
    name: String,
    kind: String,
    role: String,
    metadata: Option<Value>,
}

async fn create_entity(
    state: State,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
) -> HttpResult<HttpResponse> {
    let ws = signed_app(&state, &req, &body, &path).await?;
    let b: NewEntity = parse_body(&req, &body)?;
    validation::entity_id(&b.id)?;
    validation::display_name(&b.name)?;
    let metadata = b.metadata.unwrap_or_else(|| json!({}));
    validation::object("metadata", &metadata)?;
    let now = ids::now_rfc3339();
    let entity = Entity {
        id: b.id,
        workspace_id: ws.id.clone(),
        name: b.name,
        kind: EntityKind::parse(&b.kind)?,
        role: Role::parse(&b.role)?,
        metadata,
        timeout_until: None,
        blocked: false,
        active: true,
        created_at: now.clone(),
        updated_at: now,
    };
    let row = entity.clone();
    write_plain(&state, &ws.id, move |conn| {
        if queries::entity(conn, &row.workspace_id, &row.id)?.is_some() {
            return Err(ApiError::conflict("an entity with this id already exists"));
        }
        queries::insert_entity(conn, &row)?;
        Ok(())
    })
    .await?;
    announce(&state, &ws.id, entity_changed(&entity.id, None));
    Ok(json(StatusCode::CREATED, &json!({"entity": entity})))
}

#[derive(Deserialize)]
struct EntityQuery {
    q: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

async fn list_entities(
    state: State,
    req: HttpRequest,
    path: web::Path<String>,
) -> HttpResult<HttpResponse> {
    let ws = signed_app(&state, &req, &[], &path).await?;
    let q = web::Query::<EntityQuery>::from_query(req.query_string())
        .map_err(|_| ApiError::invalid("invalid query"))?
        .into_inner();
    let limit = q.limit.unwrap_or(100);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::invalid("limit must be 1..200").into());
    }
    let id = ws.id.clone();
    let list = state
        .read(move |conn| {
            Ok(queries::list_entities(
                conn,
                &id,
                q.q.as_deref(),
                q.cursor.as_deref(),
                limit,
            )?)
        })
        .await?;
    let next = (list.len() as i64 == limit)
        .then(|| list.last().map(|e| e.id.clone()))
        .flatten();
    Ok(json(
        StatusCode::OK,
        &json!({"entities": list, "next_cursor": next}),
    ))
}

async fn load_entity(state: &State, ws: &Workspace, id: &str) -> ApiResult<Entity> {
    let (w, i) = (ws.id.clone(), id.to_string());
    state
        .read(move |conn| Ok(queries::entity(conn, &w, &i)?))
        .await?
        .filter(|e| e.active)
        .ok_or_else(|| ApiError::not_found("entity not found"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntityPatch {
    name: Option<String>,
    kind: Option<String>,
    role: Option<String>,
    metadata: Option<Value>,
}

async fn patch_entity(
    state: State,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    body: web::Bytes,
) -> HttpResult<HttpResponse> {
    let (app, id) = path.into_inner();
    let ws = signed_app(&state, &req, &body, &app).await?;
    let p: EntityPatch = parse_body(&req, &body)?;
    let mut e = load_entity(&state, &ws, &id).await?;
    if let Some(n) = p.name {
        validation::display_name(&n)?;
        e.name = n;
    }
    if let Some(k) = p.kind {
        e.kind = EntityKind::parse(&k)?;
    }
    if let Some(r) = p.role {
        e.role = Role::parse(&r)?;
    }
    if let Some(m) = p.metadata {
        validation::object("metadata", &m)?;
        e.metadata = m;
    }
    e.updated_at = ids::now_rfc3339();
    let row = e.clone();
    write_plain(&state, &ws.id, move |conn| {
        queries::save_entity(conn, &row)
            .map(|_| ())
            .map_err(Into::into)
    })
    .await?;
    announce(&state, &ws.id, entity_changed(&e.id, None));
    Ok(json(StatusCode::OK, &json!({"entity": e})))
}

/// Deactivates: tokens stop working at once, sockets close; messages and memberships stay.
async fn delete_entity(
    state: State,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> HttpResult<HttpResponse> {
    let (app, id) = path.into_inner();
    let ws = signed_app(&state, &req, &[], &app).await?;
    let mut e = load_entity(&state, &ws, &id).await?;
    e.active = false;
    e.updated_at = ids::now_rfc3339();
    let row = e.clone();
    write_plain(&state, &ws.id, move |conn| {
        queries::save_entity(conn, &row)
            .map(|_| ())
            .map_err(Into::into)
    })
    .await?;
    super::chat::close_sessions_of(&state, &ws.id, &e.id, "deactivated");
    announce(&state, &ws.id, entity_changed(&e.id, Some("deactivated")));
    Ok(json(StatusCode::OK, &json!({"entity": e})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    entity_id: String,
    ttl_seconds: Option<i64>,
    capabilities: Option<Value>,
}

async fn create_token(
    state: State,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
) -> HttpResult<HttpResponse> {
    let ws = signed_app(&state, &req, &body, &path).await?;
    let b: TokenRequest = parse_body(&req, &body)?;
    if let Some(c) = &b.capabilities {
        validation::object("capabilities", c)?;
    }
    load_entity(&state, &ws, &b.entity_id).await?;
    let (token, exp) = auth::mint_token(
        &ws.key,
        &ws.secret,
        &b.entity_id,
        b.ttl_seconds.unwrap_or(3600),
        b.capabilities,
        now_secs(),
    )?;
    let expires_at = chrono::DateTime::from_timestamp(exp, 0)
        .map(ids::to_rfc3339)
        .unwrap_or_default();
    Ok(json(
        StatusCode::CREATED,
        &json!({"token": token, "expires_at": expires_at}),
    ))
}

async fn get_settings(
    state: State,
    req: HttpRequest,
    path: web::Path<String>,
) -> HttpResult<HttpResponse> {
    let ws = signed_app(&state, &req, &[], &path).await?;
    Ok(json(StatusCode::OK, &ws.settings))
}

async fn patch_settings(
    state: State,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
) -> HttpResult<HttpResponse> {
    let ws = signed_app(&state, &req, &body, &path).await?;
    let patch: Value = parse_body(&req, &body)?;
    let next: WorkspaceSettings = ws.settings.patched(&patch)?;
    let text = serde_json::to_string(&next).map_err(ApiError::internal)?;
    let id = ws.id.clone();
    write_plain(&state, &ws.id, move |conn| {
        queries::update_workspace_settings(conn, &id, &text)
            .map(|_| ())
            .map_err(Into::into)
    })
    .await?;
    state.registry.settings_changed(&ws.id);
    announce(&state, &ws.id, Control::Settings);
    Ok(json(StatusCode::OK, &next))
}
