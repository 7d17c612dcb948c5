//! HTTP surfaces: one module per surface, one small handler per endpoint.

pub mod admin;
pub mod auth;
pub mod channel_names;
pub mod chat;
pub mod echo;
pub mod error;
pub mod ops;
pub mod prefer;
pub mod pusher_api;
pub mod pusher_ws;
pub mod realtime;
pub mod server_api;
pub mod server_messages;
pub mod upgrade;
pub mod versions;

use std::sync::Arc;

use actix_web::{web, HttpResponse};
use switchboard_actors::broker::Broker;
use switchboard_actors::error::{ApiError, ApiResult};
use switchboard_actors::metrics::Metrics;
use switchboard_actors::persistence::Persistence;
use switchboard_actors::registry::Registry;
use switchboard_actors::store::{DbPool, PooledConn};

use crate::config::Config;

/// Everything a handler needs, shared by all workers.
pub struct AppState {
    pub pool: DbPool,
    pub persistence: Persistence,
    pub registry: Arc<Registry>,
    pub broker: Arc<dyn Broker>,
    pub metrics: Arc<Metrics>,
    pub config: Arc<Config>,
    pub auth_cache: auth::AuthCache,
    /// Channel ids by name for the signed server API.
    pub channel_names: channel_names::ChannelNames,
    /// Per-entity buckets of the chat API's rate limit.
    pub rate_limiter: switchboard_actors::rate_limit::RateLimiter,
}

pub type State = web::Data<AppState>;

impl AppState {
    /// Runs a blocking read on a pooled connection off the async workers.
    pub async fn read<T, F>(&self, f: F) -> ApiResult<T>
    where
        F: FnOnce(&mut PooledConn) -> ApiResult<T> + Send + 'static,
        T: Send + 'static,
    {
        let pool = self.pool.clone();
        self.pool
            .run_blocking(move || {
                let mut conn = pool.get()?;
                f(&mut conn)
            })
            .await
            .map_err(ApiError::internal)?
    }
}

impl AppState {
    /// Asks a channel's actor. An actor that stopped for being idle between the lookup and
    /// the send never saw the message (it stops only with no write in flight, ten minutes
    /// after its last message), so the message goes once more to a fresh actor.
    pub async fn ask_channel<M>(
        &self,
        workspace_id: &str,
        channel_id: &str,
        msg: M,
    ) -> ApiResult<M::Result>
    where
        M: actix::Message + Clone + Send + 'static,
        M::Result: Send,
        switchboard_actors::channel::ChannelActor: actix::Handler<M>,
    {
        for attempt in 0..2 {
            let addr = self
                .registry
                .channel(workspace_id, channel_id, &self.persistence)?;
            match addr.send(msg.clone()).await {
                Ok(r) => return Ok(r),
                Err(actix::MailboxError::Closed) if attempt == 0 => continue,
                Err(e) => {
                    return Err(ApiError::backpressure(format!(
                        "the channel is unavailable ({e}); retry"
                    )))
                }
            }
        }
        Err(ApiError::backpressure("the channel is unavailable; retry"))
    }
}

/// 1 MiB: the HTTP body limit of SPEC §7.
pub const MAX_BODY: usize = 1 << 20;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(
        web::JsonConfig::default()
            .limit(MAX_BODY)
            .error_handler(error::json_error),
    )
    .app_data(web::PayloadConfig::new(MAX_BODY))
    .app_data(web::QueryConfig::default().error_handler(error::query_error))
    .app_data(web::PathConfig::default().error_handler(error::path_error))
    .route("/healthz", web::get().to(ops::healthz))
    .route("/readyz", web::get().to(ops::readyz))
    .route("/metrics", web::get().to(ops::metrics))
    .route("/admin/workspaces", web::post().to(admin::create_workspace))
    .route("/app/{key}", web::get().to(pusher_ws::connect))
    .route(
        "/test/echo",
        web::get()
            .guard(actix_web::guard::fn_guard(echo::enabled))
            .to(echo::echo),
    )
    .service(web::scope("/apps/{app_id}").configure(server_api::routes))
    .service(
        web::scope("/api")
            .configure(chat::routes)
            .configure(realtime::routes)
            .default_service(web::to(error::unknown_route)),
    )
    .default_service(web::to(error::unknown_route));
}

pub fn json<T: serde::Serialize>(status: actix_web::http::StatusCode, body: &T) -> HttpResponse {
    HttpResponse::build(status).json(body)
}
