//! Cell Monitor's WebSocket gateway: the live state of a class for its
//! instructors' dashboards, and 1:1 help messages.
//!
//! * `GET /ws` upgrades after checking the `Origin` allow-list (403), the
//!   instructor's token (401) and the connection limit (503). The protocol
//!   ([`protocol`], `docs/gateway.md`): `subscribe` a class (only one the
//!   instructor teaches) for a `snapshot` and then every `student_update`
//!   and `alert`, each with the class's `{epoch, offset}`; resume with
//!   `since` after a reconnect.
//! * [`hub`]: one Redis pub/sub connection per process, rooms per class, a
//!   bounded queue per socket; a slow socket is resynced or closed and
//!   never slows the others.
//! * [`http`]: tickets for browsers, and the 1:1 message API (stored in
//!   Postgres, pushed live to every socket of the instructor).
//! * `GET /health/live`, `GET /health/ready`, `GET /metrics`.
//!
//! The binary's `main` only loads [`Config`] and calls [`serve`], so tests
//! run the very same server in-process on port 0.

pub mod auth;
pub mod config;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod protocol;
mod socket;

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::serve::ListenerExt as _;
use cellmon_bus::StreamKeys;
use cellmon_service::Settings as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::ExposeSecret as _;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;
pub use socket::close;

use crate::auth::Verifier;
use crate::hub::Hub;
use crate::metrics::Metrics;

/// What every handler and socket shares.
#[derive(Clone)]
pub struct AppState {
    config: Arc<Config>,
    verifier: Verifier,
    hub: Arc<Hub>,
    pool: PgPool,
    redis: ConnectionManager,
    keys: StreamKeys,
    metrics: Metrics,
    connections: Arc<Semaphore>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// The hub, for tests that look at rooms.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

/// Largest HTTP request body (a 1:1 message is at most 4,000 characters).
const MAX_BODY_BYTES: usize = 64 * 1024;
/// Longest an HTTP request may take, body included.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The routes.
pub fn router(state: AppState) -> Router {
    let student_messages = "/api/v1/classes/{class}/students/{student}/messages";
    let routes = Router::new()
        .route("/ws", get(http::upgrade))
        .route("/api/v1/ws-ticket", post(http::ticket))
        .route(
            student_messages,
            post(http::instructor_send).get(http::instructor_history),
        )
        .route(
            &format!("{student_messages}/read"),
            post(http::instructor_read),
        )
        .route("/api/v1/messages/unread", get(http::instructor_unread))
        .route(
            "/api/v1/student/messages",
            get(http::student_history).post(http::student_send),
        )
        .route("/api/v1/student/messages/read", post(http::student_read))
        .route("/api/v1/student/messages/unread", get(http::student_unread))
        .route("/health/live", get(|| async { "ok" }))
        .route("/health/ready", get(ready));
    // With `listen.metrics` set, metrics are served there only.
    let routes = if state.config.listen.metrics.is_none() {
        routes.route("/metrics", get(metrics))
    } else {
        routes
    };
    routes
        // Bodies are small JSON; a request may not hold a connection (or
        // shutdown) for long. An upgraded socket is not a request any more.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .with_state(state)
}

async fn ready(State(state): State<AppState>) -> (StatusCode, &'static str) {
    let mut redis = state.redis.clone();
    let redis_ok = redis::cmd("PING")
        .query_async::<String>(&mut redis)
        .await
        .is_ok();
    let pg_ok = sqlx::query("SELECT 1").execute(&state.pool).await.is_ok();
    let live_ok = state.metrics.pubsub_up.get() == 1;
    match (redis_ok && live_ok, pg_ok) {
        (true, true) => (StatusCode::OK, "ready"),
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "redis unavailable"),
        (true, false) => (StatusCode::SERVICE_UNAVAILABLE, "postgres unavailable"),
    }
}

async fn metrics(State(state): State<AppState>) -> String {
    state.metrics.render()
}

/// Builds the shared state, after the same validation as loading, since
/// tests and `harness up` build their configuration in code. Neither Redis
/// nor Postgres need be up yet: connections are made on first use.
pub fn state(config: Config, metrics: Metrics) -> anyhow::Result<AppState> {
    config
        .validate()
        .map_err(|problem| anyhow::anyhow!("bad configuration: {problem}"))?;
    let client = redis::Client::open(config.redis.url.expose_secret())
        .map_err(|e| anyhow::anyhow!("bad Redis URL: {e}"))?;
    let redis = ConnectionManager::new_lazy_with_config(
        client,
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.redis.timeout))
            .set_response_timeout(Some(config.redis.timeout)),
    )?;
    let pool = cellmon_store::pg::pool(&cellmon_store::pg::PgConfig {
        url: config.postgres.url.expose_secret().to_owned(),
        max_connections: config.postgres.max_connections,
        timeout: config.postgres.timeout,
    })?;
    Ok(AppState {
        // Whole seconds: checked by `validate`.
        verifier: Verifier::new(
            &config.jwt_secret,
            config.jwt_leeway.as_secs(),
            config.ticket_lifetime.as_secs(),
        ),
        hub: Arc::new(Hub::new(metrics.clone())),
        // Live channels and histories only: the number of event streams
        // does not matter here.
        keys: StreamKeys::new(config.redis.prefix.clone(), std::num::NonZeroU16::MIN),
        connections: Arc::new(Semaphore::new(config.max_connections)),
        config: Arc::new(config),
        pool,
        redis,
        metrics,
        shutdown: CancellationToken::new(),
        tracker: TaskTracker::new(),
    })
}

/// Serves until `shutdown` resolves, then closes every socket with 1001.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let state = state(config, Metrics::new()?)?;
    serve_state(state, listener, shutdown).await
}

/// [`serve`] with a state built by the caller (tests keep a copy to look
/// at rooms and metrics).
pub async fn serve_state(
    state: AppState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let client = redis::Client::open(state.config.redis.url.expose_secret())?;
    let pubsub = tokio::spawn(hub::run_pubsub(
        state.hub.clone(),
        client,
        state.redis.clone(),
        state.keys.clone(),
        state.config.pubsub_ping,
        state.shutdown.clone(),
    ));
    tracing::info!(addr = ?listener.local_addr().ok(), "ws-gateway listening");
    let send_buffer = state.config.socket_send_buffer_bytes;
    let listener = listener.tap_io(move |tcp| {
        let _ = tcp.set_nodelay(true);
        if send_buffer > 0 {
            let _ = socket2::SockRef::from(&*tcp).set_send_buffer_size(send_buffer);
        }
    });
    let token = state.shutdown.clone();
    let stop = token.clone();
    let tracker = state.tracker.clone();
    let grace = state.config.shutdown_grace;
    let metrics_server = cellmon_service::metrics::serve_apart(
        state.config.listen.metrics,
        Router::new()
            .route("/metrics", get(metrics))
            .with_state(state.clone()),
    )
    .await?;
    let served = axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            shutdown.await;
            stop.cancel();
        })
        .await;
    // Also when serving failed: sockets and pub/sub stop with it.
    token.cancel();
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!("some sockets did not close in time");
    }
    let _ = pubsub.await;
    if let Some(server) = metrics_server {
        server.stop().await;
    }
    Ok(served?)
}
