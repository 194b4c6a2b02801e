//! Cell Monitor's ingest server: the HTTP API the JupyterLab extension posts
//! events to.
//!
//! `POST /api/v1/events` takes a JSON array of events or a single event
//! (optionally gzip-compressed), attributes it to a class by ingest token
//! (or to the configured open class), validates every item, and answers
//! `202 {accepted, duplicates, rejected, eventIds}` only after Redis
//! acknowledged every accepted event, or, when Redis is down or slower than
//! its timeout, after they were fsync'd to the local spool (ARCHITECTURE.md
//! rule 1); a replayer sends spooled events to Redis when it is back, and at
//! start-up. Otherwise it
//! answers with a JSON error with a stable `code` (see [`error::ApiError`]):
//! 400 malformed, 413 too large, 415 unknown encoding, 422 nothing valid,
//! 401 bad token, 429 rate limited, 503 when neither Redis nor the spool
//! can take the events.
//!
//! Also: `GET /health/live`, `GET /health/ready` (Redis answers) and
//! `GET /metrics` (Prometheus).
//!
//! The same binary is the persister ([`persist`]): with `role = "persister"`
//! it consumes the streams into Postgres and InfluxDB (serving only health
//! and metrics), with `role = "all"` it does both in one process.
//!
//! The binary's `main` only loads [`Config`] and calls [`serve`], so tests
//! run the very same server in-process on port 0.

pub mod auth;
pub mod config;
pub mod error;
mod events;
pub mod metrics;
pub mod persist;
mod replay;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use cellmon_bus::spool::{Spool, SpoolConfig};
use cellmon_bus::{Producer, ProducerConfig, StreamKeys};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use secrecy::ExposeSecret as _;
use tokio::net::TcpListener;
use tower_http::cors::{Any, CorsLayer};

pub use config::Config;

use crate::auth::Tokens;
use crate::metrics::Metrics;

/// What every request handler shares.
#[derive(Clone)]
pub struct AppState {
    config: Arc<Config>,
    tokens: Arc<Tokens>,
    producer: Producer,
    spool: Spool,
    metrics: Metrics,
    limiter: Arc<DefaultKeyedRateLimiter<IpAddr>>,
    in_flight: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("config", &self.config)
            .finish()
    }
}

impl AppState {
    /// Opens the spool (recovering what a crash left) and builds the shared
    /// state. Redis need not be up: the producer connects on first use.
    pub async fn new(config: Config, metrics: Metrics) -> anyhow::Result<Self> {
        let producer = Producer::new(
            config.redis_url.expose_secret(),
            ProducerConfig {
                keys: StreamKeys::new(config.stream_prefix.clone(), config.stream_shards),
                timeout: config.redis_timeout(),
            },
        )
        .map_err(|e| anyhow::anyhow!("bad Redis URL: {e}"))?;
        let spool_config = SpoolConfig {
            dir: config.spool.dir.clone(),
            max_bytes: config.spool.max_bytes,
            segment_bytes: config.spool.segment_bytes,
        };
        let spool = tokio::task::spawn_blocking(move || Spool::open(spool_config))
            .await?
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot open the spool in {}: {e}",
                    config.spool.dir.display()
                )
            })?;
        let per_second = std::num::NonZeroU32::new(config.rate_limit.per_second.max(1))
            .unwrap_or(std::num::NonZeroU32::MIN);
        let burst = std::num::NonZeroU32::new(config.rate_limit.burst.max(1))
            .unwrap_or(std::num::NonZeroU32::MIN);
        let limiter = RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst));
        Ok(Self {
            in_flight: Arc::new(tokio::sync::Semaphore::new(config.max_in_flight.max(1))),
            tokens: Arc::new(Tokens::from_config(&config)),
            config: Arc::new(config),
            producer,
            spool,
            metrics,
            limiter: Arc::new(limiter),
        })
    }
}

/// The HTTP routes with their middleware.
pub fn router(state: AppState) -> Router {
    // The extension runs on each deployment's own Jupyter origin, so any
    // origin may post; tokens, not origins, attribute events.
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([Method::POST, Method::GET, Method::OPTIONS])
        .allow_headers([
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            header::CONTENT_ENCODING,
            HeaderName::from_static("x-requested-with"),
        ])
        .max_age(Duration::from_secs(3600));
    Router::new()
        .route("/api/v1/events", post(events::post_events))
        .route("/health/live", get(|| async { "ok" }))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .layer(cors)
        .with_state(state)
}

/// Ready when events can be acknowledged: Redis answers, or the spool has
/// room.
async fn ready(State(state): State<AppState>) -> Response {
    match state.producer.ping().await {
        Ok(()) => (StatusCode::OK, "ready: redis").into_response(),
        Err(error) => {
            let full = state
                .spool
                .stats()
                .full
                .load(std::sync::atomic::Ordering::Relaxed);
            if !full {
                (StatusCode::OK, "ready: spool (redis unreachable)").into_response()
            } else {
                tracing::warn!(%error, "not ready: Redis does not answer and the spool is full");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "redis unreachable, spool full",
                )
                    .into_response()
            }
        }
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn count_requests(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let response = next.run(request).await;
    state
        .metrics
        .requests
        .with_label_values(&[route.as_str(), response.status().as_str()])
        .inc();
    response
}

/// Runs the configured role until `shutdown` resolves: the events API
/// (then drains in-flight requests and the spool), the persister (then
/// finishes its batches), or both.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let metrics = Metrics::new()?;
    let (stop_persister, stopped) = tokio::sync::watch::channel(false);
    // A persister that fails stops the whole process (its supervisor
    // restarts it) rather than leave it serving while persisting nothing.
    let (failed, persister_failed) = tokio::sync::oneshot::channel::<()>();
    let persister = config.role.persists().then(|| {
        let run = persist::run(
            config.persister.clone(),
            config.redis_url.expose_secret().to_owned(),
            StreamKeys::new(config.stream_prefix.clone(), config.stream_shards),
            metrics.persist.clone(),
            stopped,
        );
        tokio::spawn(async move {
            let result = run.await;
            if let Err(error) = &result {
                tracing::error!(%error, "persister failed; shutting down");
                let _ = failed.send(());
            }
            result
        })
    });
    let shutdown = async move {
        tokio::select! {
            () = shutdown => {}
            Ok(()) = persister_failed => {}
        }
    };
    let grace = Duration::from_millis(config.spool.drain_on_shutdown_ms);
    let result = if config.role.ingests() {
        serve_events(config, metrics, listener, shutdown).await
    } else {
        serve_health(metrics, listener, shutdown).await
    };
    let _ = stop_persister.send(true);
    if let Some(persister) = persister {
        match tokio::time::timeout(grace, persister).await {
            Ok(Ok(Ok(()))) => tracing::info!("persister stopped"),
            Ok(Ok(Err(error))) => return Err(error.context("persister failed")),
            Ok(Err(error)) => return Err(anyhow::anyhow!("persister task failed: {error}")),
            // Whatever it had not acknowledged stays pending in Redis and is
            // reclaimed by the next persister.
            Err(_) => tracing::warn!("persister did not stop within the grace period"),
        }
    }
    result
}

/// The persister role's HTTP side: health and metrics only.
async fn serve_health(
    metrics: Metrics,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/health/live", get(|| async { "ok" }))
        .route("/health/ready", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        metrics.render(),
                    )
                }
            }),
        );
    tracing::info!(addr = %listener.local_addr()?, "persister listening (health and metrics)");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

/// Serves the events API until `shutdown` resolves, then drains in-flight
/// requests.
async fn serve_events(
    config: Config,
    metrics: Metrics,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let state = AppState::new(config, metrics).await?;
    let corrupt = state
        .spool
        .stats()
        .corrupt_regions
        .load(std::sync::atomic::Ordering::Relaxed);
    state
        .metrics
        .spool_corrupt_regions
        .set(i64::try_from(corrupt).unwrap_or(i64::MAX));
    replay::refresh_gauges(&state);
    let replayer = tokio::spawn(replay::run(state.clone()));
    let watcher = tokio::spawn(replay::watch_redis(state.clone()));
    // Forget idle clients now and then, so the limiter's memory stays bounded.
    let limiter = Arc::clone(&state.limiter);
    let sweeper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    });
    tracing::info!(addr = %listener.local_addr()?, "ingest server listening");
    let result = axum::serve(
        listener,
        router(state.clone()).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await;
    sweeper.abort();
    replayer.abort();
    watcher.abort();
    // In-flight requests are done; hand what the spool holds to Redis while
    // the grace period lasts. The rest waits on disk for the next start.
    let grace = Duration::from_millis(state.config.spool.drain_on_shutdown_ms);
    replay::drain(&state, std::time::Instant::now() + grace).await;
    tracing::info!(
        left_in_spool = state.spool.pending(),
        "ingest server stopped"
    );
    Ok(result?)
}
