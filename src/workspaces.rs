//! Creating workspaces: shared by the CLI, `POST /admin/workspaces` and the bootstrap.

use rand::Rng;
use switchboard_actors::error::{ApiError, ApiResult};
use switchboard_actors::store::rows::{Workspace, WorkspaceRow};
use switchboard_actors::store::{queries, Conn};

pub struct NewWorkspace {
    pub id: Option<String>,
    pub name: String,
    pub key: Option<String>,
    pub secret: Option<String>,
}

fn random_hex(bytes: usize) -> String {
    let mut rng = rand::thread_rng();
    (0..bytes)
        .map(|_| format!("{:02x}", rng.gen::<u8>()))
        .collect()
}

fn random_app_id() -> String {
    let mut rng = rand::thread_rng();
    format!("{}", rng.gen_range(100_000..10_000_000u64))
}

/// App ids are 1..20 digits (official Pusher SDKs refuse others).
pub fn validate_app_id(id: &str) -> ApiResult<()> {
    if (1..=20).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_digit()) {
        Ok(())
    } else {
        Err(ApiError::invalid("app id must be 1..20 digits"))
    }
}

fn validate_credential(what: &str, v: &str) -> ApiResult<()> {
    if (8..=128).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "{what} must be 8..128 characters of [A-Za-z0-9_-]"
        )))
    }
}

pub fn create(conn: &mut Conn, new: NewWorkspace) -> ApiResult<Workspace> {
    let id = new.id.unwrap_or_else(random_app_id);
    validate_app_id(&id)?;
    if !(1..=100).contains(&new.name.chars().count()) {
        return Err(ApiError::invalid("name must be 1..100 characters"));
    }
    let key = new.key.unwrap_or_else(|| random_hex(10));
    let secret = new.secret.unwrap_or_else(|| random_hex(16));
    validate_credential("key", &key)?;
    validate_credential("secret", &secret)?;
    if queries::workspace_by_id(conn, &id)?.is_some()
        || queries::workspace_by_key(conn, &key)?.is_some()
    {
        return Err(ApiError::conflict(
            "a workspace with this id or key already exists",
        ));
    }
    let row = WorkspaceRow {
        id,
        app_key: key,
        secret,
        name: new.name,
        settings: "{}".into(),
        last_cursor: 0,
        pruned_through: 0,
        created_at: switchboard_actors::ids::now_rfc3339(),
    };
    queries::insert_workspace(conn, &row)?;
    Ok(Workspace::from(row))
}

/// `SWITCHBOARD_BOOTSTRAP_APP=id:key:secret`: makes sure that workspace exists (idempotent).
pub fn bootstrap(conn: &mut Conn, spec: &str) -> Result<Workspace, String> {
    let parts: Vec<&str> = spec.split(':').collect();
    let [id, key, secret] = parts.as_slice() else {
        return Err("SWITCHBOARD_BOOTSTRAP_APP must be id:key:secret".into());
    };
    if let Some(w) = queries::workspace_by_id(conn, id).map_err(|e| e.to_string())? {
        if w.key != *key || w.secret != *secret {
            return Err(format!("workspace {id} exists with other credentials"));
        }
        return Ok(w);
    }
    create(
        conn,
        NewWorkspace {
            id: Some(id.to_string()),
            name: format!("app {id}"),
            key: Some(key.to_string()),
            secret: Some(secret.to_string()),
        },
    )
    .map_err(|e| e.message)
}

pub fn to_json(w: &Workspace) -> serde_json::Value {
    serde_json::json!({"id": w.id, "key": w.key, "secret": w.secret, "name": w.name,
                       "settings": w.settings, "created_at": w.created_at})
}
