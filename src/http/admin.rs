//! Operator API: `POST /admin/workspaces`, behind `SWITCHBOARD_ADMIN_TOKEN`.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use switchboard_actors::auth::constant_time_eq;
use switchboard_actors::error::ApiError;

use super::auth::bearer_token;
use super::error::HttpResult;
use super::{json, State};
use crate::workspaces::{self, NewWorkspace};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateWorkspace {
    id: Option<String>,
    name: String,
    key: Option<String>,
    secret: Option<String>,
}

pub async fn create_workspace(
    state: State,
    req: HttpRequest,
    body: web::Bytes,
) -> HttpResult<HttpResponse> {
    let expected = state
        .config
        .admin_token
        .clone()
        .ok_or_else(|| ApiError::auth("the operator API is disabled"))?;
    let given = bearer_token(&req).ok_or_else(|| ApiError::auth("missing operator token"))?;
    if !constant_time_eq(&given, &expected) {
        return Err(ApiError::auth("invalid operator token").into());
    }
    // The operator token is checked before the body is even read.
    let b: CreateWorkspace = super::auth::parse_body(&req, &body)?;
    let w = state
        .read(move |conn| {
            workspaces::create(
                conn,
                NewWorkspace {
                    id: b.id,
                    name: b.name,
                    key: b.key,
                    secret: b.secret,
                },
            )
        })
        .await?;
    Ok(json(
        StatusCode::CREATED,
        &serde_json::json!({"workspace": workspaces::to_json(&w)}),
    ))
}
