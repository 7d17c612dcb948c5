//! Starting and stopping the server: store, actors, HTTP, graceful shutdown.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix_http::{HttpService, KeepAlive};
use actix_service::{
    fn_factory, fn_service, map_config, IntoServiceFactory, ServiceFactory, ServiceFactoryExt,
};
use actix_web::dev::{AppConfig, Service};
use actix_web::{web, App};
use futures_util::FutureExt;
use switchboard_actors::broker::{Broker, LocalBroker};
use switchboard_actors::error::close_code;
use switchboard_actors::metrics::Metrics;
use switchboard_actors::persistence::{Persistence, PersistenceConfig};
use switchboard_actors::redis_broker::RedisBroker;
use switchboard_actors::registry::Registry;
use switchboard_actors::store::{self, queries};
use switchboard_actors::webhooks::{WebhookConfig, WebhookDispatcher};
use switchboard_actors::workspace::CloseAll;

use crate::config::Config;
use crate::http::{self, AppState};

pub fn serve(config: Config, demo: bool) -> Result<(), String> {
    let url = store::DatabaseUrl::parse(&config.database)?;
    // SQLite: one writer and readers on one file. PostgreSQL: several nodes share the
    // server's connections (100 by default), so each node keeps to a dozen.
    let pool_size = if url.is_postgres() { 12 } else { 16 };
    log::info!("database: {} ({})", url.redacted(), url.engine());
    let pool = store::open_with(&url, pool_size, config.durability)?;
    if let Some(spec) = &config.bootstrap_app {
        let mut conn = pool.get().map_err(|e| e.to_string())?;
        let w = crate::workspaces::bootstrap(&mut conn, spec)?;
        log::info!("bootstrap workspace {} ready", w.id);
    }
    if demo {
        crate::server::print_demo(&pool, &config)?;
    }
    let metrics = Arc::new(Metrics::new());
    let _ = switchboard_actors::METRICS.set(metrics.clone());
    let registry = Registry::new(pool.clone());
    let broker: Arc<dyn Broker> = if config.broker == "local" {
        Arc::new(LocalBroker::new(registry.clone()))
    } else {
        Arc::new(RedisBroker::start(&config.broker, registry.clone())?)
    };
    let (persistence, writer) = Persistence::start(
        &pool,
        broker.clone(),
        metrics.clone(),
        PersistenceConfig::default(),
    )?;
    let purger = (pool.clone(), persistence.clone(), config.purge_interval);
    let hooks_pool = pool.clone();
    let exit_pool = pool.clone();
    let state = web::Data::new(AppState {
        pool,
        persistence: persistence.clone(),
        registry: registry.clone(),
        broker,
        metrics,
        config: Arc::new(config.clone()),
        auth_cache: Default::default(),
        channel_names: Default::default(),
        rate_limiter: Default::default(),
    });
    // Cluster mode: another node's change drops this node's verified tokens and apps too.
    let caches = state.clone();
    registry.set_cache_hook(Box::new(move |scope| {
        caches.auth_cache.forget(scope);
        caches.channel_names.forget(scope);
    }));
    let system = actix_web::rt::System::new();
    let result: std::io::Result<()> = system.block_on(async move {
        switchboard_actors::retention::spawn_purger(purger.0, purger.1, purger.2);
        // Webhooks leave from their own actor, never from a request or a hub.
        let mut hooks_at_exit = None;
        match WebhookDispatcher::start(hooks_pool, WebhookConfig::default()) {
            Ok(sink) => {
                hooks_at_exit = Some(sink.clone());
                let on_change = sink.clone();
                registry.set_settings_hook(Box::new(move |ws| on_change.settings_changed(ws)));
                registry.set_webhook_sink(Box::new(move |ws, ev| sink.emit(ws, ev)));
            }
            Err(e) => log::error!("webhooks are off: {e}"),
        }
        let server = http_server(&config, state)?;
        let handle = server.handle();
        log::info!("switchboard listening on http://{}", config.bind);
        actix_web::rt::spawn(async move {
            wait_for_signal().await;
            log::info!("shutting down: closing sockets, flushing writes");
            for w in registry.all_workspaces() {
                let _ = w
                    .send(CloseAll {
                        code: close_code::RECONNECT,
                        reason: "server shutting down",
                    })
                    .await;
            }
            // WebSockets run outside the server's connection tracking (`http::upgrade`):
            // give them the server's shutdown timeout to write their close frames.
            if !http::upgrade::all_closed(std::time::Duration::from_secs(5)).await {
                log::warn!("shutting down with sockets still open after 5 s");
            }
            // Cluster mode: this node's presence members and subscriptions leave at once.
            if let Some(cluster) = registry.cluster() {
                cluster.shutdown().await;
            }
            if let Some(hooks) = hooks_at_exit {
                hooks.drain(std::time::Duration::from_secs(3)).await;
            }
            handle.stop(true).await;
        });
        server.await?;
        persistence.flush().await;
        Ok(())
    });
    result.map_err(|e| format!("server error: {e}"))?;
    drop(writer);
    match switchboard_actors::checkpointer::truncate_at_exit(&exit_pool) {
        Ok(true) => {}
        Ok(false) => log::warn!("the WAL could not be emptied at exit (a reader held it)"),
        Err(e) => log::warn!("WAL checkpoint at exit: {e}"),
    }
    log::info!("stopped");
    Ok(())
}

/// The HTTP server: actix-web's app on every worker, and the same app answering upgrade
/// requests, whose connections leave the HTTP/1 dispatcher (`http::upgrade`). This is what
/// `actix_web::HttpServer` builds, plus the upgrade service it has no setting for.
fn http_server(
    config: &Config,
    state: web::Data<AppState>,
) -> std::io::Result<actix_server::Server> {
    let app = move || {
        App::new()
            .app_data(state.clone())
            .wrap_fn(|req, srv| {
                srv.call(req)
                    .map(|res| res.map(http::error::ensure_envelope))
            })
            .wrap(crate::server::Cors)
            .configure(http::configure)
    };
    let keep_alive = match config.keep_alive {
        Some(idle) => KeepAlive::Timeout(idle),
        None => KeepAlive::Disabled,
    };
    let builder = actix_server::Server::build();
    let shutdown = builder.graceful_shutdown_signal();
    let server = builder
        .workers(config.workers)
        .backlog(4096)
        .max_concurrent_connections(50_000)
        .disable_signals()
        .shutdown_timeout(5)
        .bind("switchboard", &config.bind, move || {
            let shutdown = shutdown.clone();
            let upgrade_app = app.clone();
            let upgrade = fn_factory(move || {
                let factory = upgrade_app().into_factory();
                async move {
                    let app = Rc::new(factory.new_service(AppConfig::default()).await?);
                    Ok::<_, ()>(fn_service(move |(req, framed)| {
                        http::upgrade::serve(app.clone(), req, framed)
                    }))
                }
            });
            let main = app()
                .into_factory()
                .map_err(|err: actix_web::Error| err.error_response());
            HttpService::build()
                .graceful_shutdown_signal(move || {
                    let signal = shutdown.clone();
                    async move { signal.notified().await }
                })
                .keep_alive(keep_alive)
                // actix-web's defaults for `HttpServer`.
                .client_request_timeout(Duration::from_secs(5))
                .client_disconnect_timeout(Duration::from_secs(1))
                .upgrade(upgrade)
                // Its host and address are only read by `url_for` and `connection_info`,
                // which no handler uses.
                .finish(map_config(main, |_| AppConfig::default()))
                .tcp()
        })?
        .run();
    Ok(server)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The demo of `make run`: a workspace, three members and ready tokens, printed with
/// copy-paste examples.
pub fn print_demo(pool: &store::DbPool, config: &Config) -> Result<(), String> {
    use switchboard_actors::domain::entity::{Entity, EntityKind, Role};
    let mut conn = pool.get().map_err(|e| e.to_string())?;
    let spec = config
        .bootstrap_app
        .clone()
        .unwrap_or_else(|| "1000:demo-app-key:demo-app-secret-change-me".into());
    let w = crate::workspaces::bootstrap(&mut conn, &spec)?;
    let now = switchboard_actors::ids::now_rfc3339();
    let members = [
        ("alice", "Alice", EntityKind::Human, Role::Owner),
        ("bob", "Bob", EntityKind::Human, Role::Member),
        ("helper", "Helper bot", EntityKind::Agent, Role::Member),
    ];
    for (id, name, kind, role) in members {
        if queries::entity(&mut conn, &w.id, id)
            .map_err(|e| e.to_string())?
            .is_none()
        {
            let e = Entity {
                id: id.into(),
                workspace_id: w.id.clone(),
                name: name.into(),
                kind,
                role,
                metadata: serde_json::json!({}),
                timeout_until: None,
                blocked: false,
                active: true,
                created_at: now.clone(),
                updated_at: now.clone(),
            };
            queries::insert_entity(&mut conn, &e).map_err(|e| e.to_string())?;
        }
    }
    let t = chrono::Utc::now().timestamp();
    let token = |id: &str| {
        switchboard_actors::auth::mint_token(&w.key, &w.secret, id, 86_400, None, t)
            .map(|x| x.0)
            .map_err(|e| e.message)
    };
    let (alice, bob) = (token("alice")?, token("bob")?);
    let base = format!("http://{}", config.bind);
    println!(
        "\n=== Switchboard demo ===\napp id:     {id}\napp key:    {key}\napp secret: {secret}\nmembers:    alice (owner), bob (member), helper (agent)\n\n\
         export ALICE={alice}\nexport BOB={bob}\n\n\
         # alice opens a direct channel with bob and says hello:\n\
         CH=$(curl -s -X POST {base}/api/direct-channels -H \"Authorization: Bearer $ALICE\" -H 'Content-Type: application/json' -d '{{\"entity_id\":\"bob\"}}' | sed 's/.*\"id\":\"\\(chn_[a-z0-9]*\\)\".*/\\1/')\n\
         curl -s -X POST {base}/api/channels/$CH/messages -H \"Authorization: Bearer $ALICE\" -H 'Content-Type: application/json' -d '{{\"data\":\"hello bob\"}}'\n\n\
         # bob watches his realtime stream (replays everything from the start):\n\
         websocat \"ws://{bind}/api/realtime/ws?after_cursor=0\" -H \"Authorization: Bearer $BOB\"\n\
         ========================\n",
        id = w.id,
        key = w.key,
        secret = w.secret,
        bind = config.bind,
    );
    Ok(())
}

pub use cors::Cors;

mod cors {
    //! CORS for `/api`, driven by `allowed_origins`: preflights are answered here.
    use std::future::{ready, Ready};

    use actix_web::body::EitherBody;
    use actix_web::dev::{forward_ready, Service, ServiceRequest, ServiceResponse, Transform};
    use actix_web::http::header::{self, HeaderValue};
    use actix_web::{Error, HttpResponse};
    use futures_util::future::LocalBoxFuture;

    use crate::http::State;

    pub struct Cors;

    impl<S, B> Transform<S, ServiceRequest> for Cors
    where
        S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
        B: 'static,
    {
        type Response = ServiceResponse<EitherBody<B>>;
        type Error = Error;
        type Transform = CorsService<S>;
        type InitError = ();
        type Future = Ready<Result<Self::Transform, Self::InitError>>;

        fn new_transform(&self, service: S) -> Self::Future {
            ready(Ok(CorsService { service }))
        }
    }

    pub struct CorsService<S> {
        service: S,
    }

    fn allowed_origin(req: &ServiceRequest) -> Option<HeaderValue> {
        if !req.path().starts_with("/api") {
            return None;
        }
        let origin = req.headers().get(header::ORIGIN)?;
        let state = req.app_data::<State>()?;
        let o = origin.to_str().ok()?;
        state
            .config
            .allowed_origins
            .iter()
            .any(|a| a == o || a == "*")
            .then(|| origin.clone())
    }

    impl<S, B> Service<ServiceRequest> for CorsService<S>
    where
        S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
        B: 'static,
    {
        type Response = ServiceResponse<EitherBody<B>>;
        type Error = Error;
        type Future = LocalBoxFuture<'static, Result<Self::Response, Self::Error>>;

        forward_ready!(service);

        fn call(&self, req: ServiceRequest) -> Self::Future {
            let origin = allowed_origin(&req);
            if req.method() == actix_web::http::Method::OPTIONS {
                if let Some(o) = origin {
                    let res = HttpResponse::NoContent()
                        .insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, o))
                        .insert_header((
                            header::ACCESS_CONTROL_ALLOW_METHODS,
                            "GET, POST, PATCH, DELETE, OPTIONS",
                        ))
                        .insert_header((
                            header::ACCESS_CONTROL_ALLOW_HEADERS,
                            "authorization, content-type, prefer",
                        ))
                        .insert_header((header::ACCESS_CONTROL_MAX_AGE, "600"))
                        .insert_header((header::VARY, "Origin"))
                        .finish();
                    return Box::pin(
                        async move { Ok(req.into_response(res).map_into_right_body()) },
                    );
                }
            }
            let fut = self.service.call(req);
            Box::pin(async move {
                let mut res = fut.await?;
                if let Some(o) = origin {
                    res.headers_mut()
                        .insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o);
                    res.headers_mut()
                        .insert(header::VARY, HeaderValue::from_static("Origin"));
                    // A browser app may read whether `Prefer: return=minimal` was applied.
                    res.headers_mut().insert(
                        header::ACCESS_CONTROL_EXPOSE_HEADERS,
                        HeaderValue::from_static("preference-applied"),
                    );
                }
                Ok(res.map_into_left_body())
            })
        }
    }
}
