//! Authentication: bearer tokens for the chat API, Pusher-style signatures for the server API.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{web, HttpRequest};
use switchboard_actors::auth;
use switchboard_actors::domain::capabilities::Capabilities;
use switchboard_actors::domain::entity::Entity;
use switchboard_actors::error::{ApiError, ApiResult};
use switchboard_actors::pusher::session::App;
use switchboard_actors::registry::CacheScope;
use switchboard_actors::store::queries;
use switchboard_actors::store::rows::Workspace;

use super::AppState;

/// The authenticated member behind a chat-API request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub workspace: Workspace,
    pub entity: Entity,
    /// The token's capability map (SPEC §6), as the token carried it.
    pub capabilities: Option<serde_json::Value>,
}

impl Caller {
    /// The token's capabilities; none when it carries no (readable) claim.
    pub fn capabilities(&self) -> Capabilities {
        self.capabilities
            .as_ref()
            .map(Capabilities::from_claim)
            .unwrap_or_default()
    }
}

pub fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The bearer token of a request: `Authorization: Bearer`, `?token=`, or (browsers) the
/// subprotocol `switchboard.bearer.<token>`.
pub fn bearer_token(req: &HttpRequest) -> Option<String> {
    if let Some(h) = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        if let Some(t) = h
            .strip_prefix("Bearer ")
            .or_else(|| h.strip_prefix("bearer "))
        {
            return Some(t.trim().to_string());
        }
    }
    if let Ok(q) = web::Query::<Vec<(String, String)>>::from_query(req.query_string()) {
        if let Some((_, t)) = q.iter().find(|(k, _)| k == "token") {
            return Some(t.clone());
        }
    }
    bearer_subprotocol(req).map(|(_, t)| t)
}

/// The `switchboard.bearer.<token>` subprotocol, if offered: (full protocol name, token).
pub fn bearer_subprotocol(req: &HttpRequest) -> Option<(String, String)> {
    let offered = req.headers().get("sec-websocket-protocol")?.to_str().ok()?;
    offered.split(',').map(str::trim).find_map(|p| {
        p.strip_prefix("switchboard.bearer.")
            .map(|t| (p.to_string(), t.to_string()))
    })
}

/// Verified tokens, so a busy client (an agent appending tokens) costs no database reads
/// per request. Any change to entities or settings on this node clears it, and in cluster
/// mode so does the same change on another node (its control notification or event, see
/// [`AuthCache::forget`]); entries also expire after [`AUTH_CACHE_TTL`] (the bound when a
/// notification is lost) and never outlive their token.
#[derive(Default)]
pub struct AuthCache {
    entries: Mutex<HashMap<String, CachedCaller>>,
    /// Workspaces by key for the Pusher face: a connect storm reads each app once.
    apps: Mutex<HashMap<String, (Arc<App>, Instant)>>,
    /// The last copy of each workspace this node read for a signed request, by app id, and
    /// when it was read: within [`AUTH_CACHE_TTL`] it verifies the next signed requests
    /// without a read (like a token or a Pusher key); while the store is unreachable, at
    /// any age, so that signed requests that need no store (occupancy, presence) still verify.
    signed: Mutex<HashMap<String, (Workspace, Instant)>>,
    /// Bumped by every clear: a lookup that began before a clear must not be cached.
    generation: AtomicU64,
}

struct CachedCaller {
    caller: Caller,
    token_exp: i64,
    cached_at: Instant,
}

pub const AUTH_CACHE_TTL: Duration = Duration::from_secs(5);
const AUTH_CACHE_MAX: usize = 50_000;

impl AuthCache {
    fn get(&self, token: &str) -> Option<Caller> {
        let map = self.entries.lock().ok()?;
        let hit = map.get(token)?;
        (hit.cached_at.elapsed() < AUTH_CACHE_TTL && hit.token_exp > now_secs())
            .then(|| hit.caller.clone())
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn put(&self, token: String, caller: Caller, token_exp: i64, generation: u64) {
        if let Ok(mut map) = self.entries.lock() {
            if self.generation() != generation {
                return;
            }
            if map.len() >= AUTH_CACHE_MAX {
                map.clear();
            }
            map.insert(
                token,
                CachedCaller {
                    caller,
                    token_exp,
                    cached_at: Instant::now(),
                },
            );
        }
    }

    /// Forgets every verified token: an entity, its role or a workspace's settings changed.
    pub fn clear(&self) {
        if let Ok(mut map) = self.entries.lock() {
            self.generation.fetch_add(1, Ordering::AcqRel);
            map.clear();
        }
        if let Ok(mut apps) = self.apps.lock() {
            apps.clear();
        }
        if let Ok(mut signed) = self.signed.lock() {
            signed.clear();
        }
    }

    /// Forgets what another node's change made stale (cluster mode): the tokens of one entity,
    /// everything of one workspace, or everything.
    pub fn forget(&self, scope: CacheScope<'_>) {
        let workspace_id = match scope {
            CacheScope::All => return self.clear(),
            CacheScope::Workspace(ws) => ws,
            // Channel names are not what a caller is verified against.
            CacheScope::Channels(_) => return,
            CacheScope::Entity {
                workspace_id,
                entity_id,
            } => {
                if let Ok(mut map) = self.entries.lock() {
                    self.generation.fetch_add(1, Ordering::AcqRel);
                    map.retain(|_, c| {
                        c.caller.workspace.id != workspace_id || c.caller.entity.id != entity_id
                    });
                }
                return;
            }
        };
        if let Ok(mut map) = self.entries.lock() {
            self.generation.fetch_add(1, Ordering::AcqRel);
            map.retain(|_, c| c.caller.workspace.id != workspace_id);
        }
        if let Ok(mut apps) = self.apps.lock() {
            apps.retain(|_, (app, _)| app.workspace_id != workspace_id);
        }
        if let Ok(mut signed) = self.signed.lock() {
            signed.remove(workspace_id);
        }
    }

    /// The app of a Pusher key, if read within the TTL.
    pub fn app(&self, key: &str) -> Option<Arc<App>> {
        let map = self.apps.lock().ok()?;
        let (app, at) = map.get(key)?;
        (at.elapsed() < AUTH_CACHE_TTL).then(|| app.clone())
    }

    pub fn put_app(&self, key: &str, app: Arc<App>, generation: u64) {
        if let Ok(mut map) = self.apps.lock() {
            if self.generation() != generation {
                return;
            }
            if map.len() >= AUTH_CACHE_MAX {
                map.clear();
            }
            map.insert(key.to_string(), (app, Instant::now()));
        }
    }

    pub fn current_generation(&self) -> u64 {
        self.generation()
    }

    /// The last copy of a workspace this node read (see `signed`), however old.
    fn signed_workspace(&self, app_id: &str) -> Option<Workspace> {
        self.signed.lock().ok()?.get(app_id).map(|(w, _)| w.clone())
    }

    /// The copy of a workspace read within the TTL (see `signed`).
    fn fresh_signed_workspace(&self, app_id: &str) -> Option<Workspace> {
        let map = self.signed.lock().ok()?;
        let (w, at) = map.get(app_id)?;
        (at.elapsed() < AUTH_CACHE_TTL).then(|| w.clone())
    }

    /// Remembers a workspace just read (with the generation read before reading it).
    pub fn put_signed_workspace(&self, workspace: &Workspace, generation: u64) {
        if let Ok(mut map) = self.signed.lock() {
            if self.generation() != generation {
                return;
            }
            if map.len() >= AUTH_CACHE_MAX {
                map.clear();
            }
            map.insert(workspace.id.clone(), (workspace.clone(), Instant::now()));
        }
    }
}

/// Verifies a token and loads its workspace and entity: the entity must be active (else
/// 401) and not blocked (else 403).
pub async fn authenticate(state: &AppState, token: String) -> ApiResult<Caller> {
    if let Some(c) = state.auth_cache.get(&token) {
        return Ok(c);
    }
    let key = auth::token_key_id(&token)?;
    let cache_key = token.clone();
    let generation = state.auth_cache.generation();
    let (caller, exp) = state
        .read(move |conn| {
            let workspace = queries::workspace_by_key(conn, &key)?
                .ok_or_else(|| ApiError::auth("unknown workspace key"))?;
            let claims = auth::verify_token(&token, &workspace.secret, now_secs())?;
            let subject = claims.subject().unwrap_or_default();
            let entity = queries::entity(conn, &workspace.id, subject)?
                .filter(|e| e.active)
                .ok_or_else(|| ApiError::auth("unknown or deactivated entity"))?;
            if entity.blocked {
                return Err(ApiError::forbidden("you are blocked in this workspace"));
            }
            let capabilities = claims.capabilities().cloned();
            Ok((
                Caller {
                    workspace,
                    entity,
                    capabilities,
                },
                claims.exp,
            ))
        })
        .await?;
    state
        .auth_cache
        .put_signed_workspace(&caller.workspace, generation);
    state
        .auth_cache
        .put(cache_key, caller.clone(), exp, generation);
    Ok(caller)
}

impl actix_web::FromRequest for Caller {
    type Error = super::error::HttpError;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self, Self::Error>>>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let state = req.app_data::<super::State>().cloned();
        let token = bearer_token(req);
        Box::pin(async move {
            let state = state.ok_or_else(|| ApiError::internal("application state missing"))?;
            let token = token.ok_or_else(|| ApiError::auth("missing bearer token"))?;
            let caller = authenticate(&state, token).await?;
            check_rate_limit(&state, &caller)?;
            Ok(caller)
        })
    }
}

/// The workspace's `rate_limits.chat_api`, per entity, on every `/api` request.
fn check_rate_limit(state: &AppState, caller: &Caller) -> ApiResult<()> {
    let Some(limit) = caller.workspace.settings.rate_limits.chat_api else {
        return Ok(());
    };
    let key = format!("{}/{}", caller.workspace.id, caller.entity.id);
    state
        .rate_limiter
        .check(&key, limit, Instant::now())
        .map_err(|wait| {
            ApiError::new(
                switchboard_actors::error::ErrorCode::RateLimited,
                format!(
                    "rate limit of {} requests per second (burst {}) exceeded; retry in {:.1} s",
                    limit.per_second,
                    limit.burst,
                    wait.as_secs_f64()
                ),
            )
            .retry_after(wait.as_secs_f64().ceil() as u64)
        })
}

/// Verifies a signed server-API request for `app_id` and returns its workspace.
pub async fn signed_app(
    state: &AppState,
    req: &HttpRequest,
    body: &[u8],
    app_id: &str,
) -> ApiResult<Workspace> {
    let query = web::Query::<Vec<(String, String)>>::from_query(req.query_string())
        .map_err(|_| ApiError::auth("malformed query string"))?
        .into_inner();
    let workspace = match state.auth_cache.fresh_signed_workspace(app_id) {
        Some(w) => w,
        None => read_signed_workspace(state, app_id).await?,
    };
    auth::verify_signed_request(
        req.method().as_str(),
        req.path(),
        &query,
        body,
        &workspace.key,
        &workspace.secret,
        now_secs(),
    )?;
    Ok(workspace)
}

/// Reads the workspace of a signed request (and caches it; see [`AuthCache`]).
async fn read_signed_workspace(state: &AppState, app_id: &str) -> ApiResult<Workspace> {
    let app = app_id.to_string();
    let generation = state.auth_cache.current_generation();
    let read = state
        .read(move |conn| Ok(queries::workspace_by_id(conn, &app)?))
        .await;
    let workspace = match read {
        Ok(Some(w)) => {
            state.auth_cache.put_signed_workspace(&w, generation);
            w
        }
        Ok(None) => {
            return Err(ApiError::new(
                switchboard_actors::error::ErrorCode::AppNotFound,
                "app not found",
            ))
        }
        // The store is unreachable: the last copy this node read verifies the signature, so
        // the requests that need no store (occupancy, presence, terminations) keep working;
        // the writes among them fail at the store with the same 503.
        Err(e) if e.code == switchboard_actors::error::ErrorCode::Backpressure => {
            state.auth_cache.signed_workspace(app_id).ok_or(e)?
        }
        Err(e) => return Err(e),
    };
    Ok(workspace)
}

/// Parses a JSON body read as bytes (signed requests need the raw bytes for `body_md5`).
pub fn parse_body<T: serde::de::DeserializeOwned>(req: &HttpRequest, body: &[u8]) -> ApiResult<T> {
    let ct = req
        .headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with("application/json") {
        return Err(ApiError::invalid("content type must be application/json"));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))
}
