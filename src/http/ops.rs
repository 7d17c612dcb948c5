//! Operations: liveness, readiness, Prometheus metrics.

use actix_web::HttpResponse;
use diesel::connection::SimpleConnection;

use super::State;

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

/// Ready when the database answers (`SELECT 1` on a pooled connection); while it is known
/// to be unreachable the pool answers at once, and so does this.
pub async fn readyz(state: State) -> HttpResponse {
    let engine = state.pool.url().engine();
    let ok = state
        .read(|conn| {
            conn.batch_execute("SELECT 1")
                .map_err(switchboard_actors::error::ApiError::internal)
        })
        .await
        .is_ok();
    if ok {
        HttpResponse::Ok().json(serde_json::json!({"status": "ready", "database": engine}))
    } else {
        super::error::envelope(
            switchboard_actors::error::ErrorCode::Backpressure,
            "database unreachable",
        )
    }
}

pub async fn metrics(state: State) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}
