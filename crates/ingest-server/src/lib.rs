//! Cell Monitor's ingest server: the HTTP API the JupyterLab extension posts
//! events to, and nothing else.
//!
//! `POST /api/v1/events` takes a JSON array of events or a single event
//! (optionally gzip-compressed), attributes it to a class by ingest token
//! (or to the configured open class), validates every item, and hands the
//! valid ones off durably with [`cellmon_bus::Handoff`] (ARCHITECTURE.md
//! rule 1: Redis within its timeout, else the fsync'd local spool). It
//! answers `202 {accepted, duplicates, rejected, eventIds}` only once that
//! succeeded; a replayer sends spooled events to Redis when it is back, and
//! at start-up. Otherwise it answers with a JSON error with a stable `code`
//! (see [`error::ApiError`]): 400 malformed, 413 too large, 415 unknown
//! encoding, 422 nothing valid, 401 bad token, 429 rate limited, 503 when
//! neither Redis nor the spool can take the events.
//!
//! Also: `GET /health/live`, `GET /health/ready` (Redis answers, or the
//! spool has room) and `GET /metrics` (Prometheus).
//!
//! The persister, which reads the streams into Postgres and InfluxDB, is
//! its own crate and binary (`cellmon-persister`).
//!
//! The binary's `main` only loads [`Config`] and calls [`serve`], so tests
//! run the very same server in-process on port 0.

pub mod auth;
pub mod config;
pub mod error;
mod events;
pub mod metrics;
mod redis_watch;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use cellmon_bus::handoff::Accepting;
use cellmon_bus::spool::{SpoolConfig, SpoolError};
use cellmon_bus::{Handoff, Producer, ProducerConfig, PublishError, StreamKeys};
use cellmon_service::{Invalid, Settings as _};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use secrecy::ExposeSecret as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::cors::{Any, CorsLayer};

pub use config::Config;

use crate::auth::Tokens;
use crate::metrics::Metrics;

/// What every request handler shares.
#[derive(Clone)]
pub struct AppState {
    config: Arc<Config>,
    tokens: Arc<Tokens>,
    handoff: Handoff,
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

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A configuration built in code that loading would have refused.
    #[error(transparent)]
    Config(#[from] Invalid),
    #[error("bad Redis URL")]
    RedisUrl(#[source] PublishError),
    #[error("cannot open the spool in {}", .dir.display())]
    Spool {
        dir: PathBuf,
        #[source]
        source: SpoolError,
    },
}

impl StartError {
    /// For `serve`'s caller: a configuration that cannot work on this
    /// machine (a spool directory another process holds) is marked, so the
    /// binary exits with status 64 as for any bad configuration.
    fn into_anyhow(self) -> anyhow::Error {
        match self {
            Self::Spool {
                source: SpoolError::Locked { .. },
                ..
            } => cellmon_service::BadSetting::new("spool.dir", self).into(),
            Self::Config(_) => cellmon_service::BadSetting::settings(self).into(),
            other => other.into(),
        }
    }
}

impl AppState {
    /// Checks `config` as loading does, opens the spool (locking its
    /// directory, recovering what a crash left) and builds the shared
    /// state. Redis need not be up: the producer connects on first use.
    pub async fn new(config: Config, metrics: Metrics) -> Result<Self, StartError> {
        config.validate()?;
        let producer = Producer::new(
            config.redis.url.expose_secret(),
            ProducerConfig {
                keys: StreamKeys::new(config.redis.prefix.clone(), config.stream_shards),
                timeout: config.redis.timeout,
            },
        )
        .map_err(StartError::RedisUrl)?;
        let spool = SpoolConfig {
            dir: config.spool.dir.clone(),
            max_bytes: config.spool.max_bytes,
            segment_bytes: config.spool.segment_bytes,
        };
        let handoff = Handoff::open(producer, spool, Arc::new(metrics.clone()))
            .await
            .map_err(|source| StartError::Spool {
                dir: config.spool.dir.clone(),
                source,
            })?;
        let quota =
            Quota::per_second(config.rate_limit.per_second).allow_burst(config.rate_limit.burst);
        let limiter = RateLimiter::keyed(quota);
        Ok(Self {
            in_flight: Arc::new(tokio::sync::Semaphore::new(config.max_in_flight)),
            tokens: Arc::new(Tokens::from_config(&config)),
            config: Arc::new(config),
            handoff,
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
    let mut routes = Router::new()
        .route("/api/v1/events", post(events::post_events))
        .route("/health/live", get(|| async { "ok" }))
        .route("/health/ready", get(ready));
    // With `listen.metrics` set, metrics are served there only.
    if state.config.listen.metrics.is_none() {
        routes = routes.route("/metrics", get(render_metrics));
    }
    routes
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
    match state.handoff.accepting().await {
        Accepting::Redis => (StatusCode::OK, "ready: redis").into_response(),
        Accepting::SpoolOnly(_) => {
            (StatusCode::OK, "ready: spool (redis unreachable)").into_response()
        }
        Accepting::No(error) => {
            tracing::warn!(%error, "not ready: Redis does not answer and the spool is full");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "redis unreachable, spool full",
            )
                .into_response()
        }
    }
}

async fn render_metrics(State(state): State<AppState>) -> Response {
    state.metrics.observe_spool(state.handoff.spool());
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

/// Serves the events API until `shutdown` resolves, then drains in-flight
/// requests and, for up to `spool.drain_on_shutdown`, the spool.
///
/// A setting that loading would have refused, or a spool directory
/// another process holds, fails with a [`cellmon_service::BadSetting`]
/// (the binary exits with status 64).
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let metrics = Metrics::new()?;
    let state = AppState::new(config, metrics)
        .await
        .map_err(StartError::into_anyhow)?;
    let spool = state.handoff.spool();
    tracing::info!(
        dir = %spool.dir().display(),
        pending = spool.pending(),
        "spool open"
    );
    let stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    {
        let handoff = state.handoff.clone();
        let stop = stop.clone();
        tasks.spawn(async move { handoff.run_replayer(stop.cancelled()).await });
    }
    tasks.spawn(redis_watch::run(state.clone(), stop.clone()));
    // Forget idle clients now and then, so the limiter's memory stays bounded.
    let limiter = Arc::clone(&state.limiter);
    let stop_sweeper = stop.clone();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                () = stop_sweeper.cancelled() => return,
                _ = tick.tick() => {}
            }
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    });
    let metrics_server = cellmon_service::metrics::serve_apart(
        state.config.listen.metrics,
        Router::new()
            .route("/metrics", get(render_metrics))
            .with_state(state.clone()),
    )
    .await?;
    tracing::info!(addr = %listener.local_addr()?, "ingest server listening");
    let result = axum::serve(
        listener,
        router(state.clone()).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await;
    // Each ends within a Redis timeout; the replayer never mid-round.
    stop.cancel();
    while tasks.join_next().await.is_some() {}
    // In-flight requests are done; hand what the spool holds to Redis while
    // the grace period lasts. The rest waits on disk for the next start.
    let grace = state.config.spool.drain_on_shutdown;
    state.handoff.drain(std::time::Instant::now() + grace).await;
    tracing::info!(
        left_in_spool = state.handoff.spool().pending(),
        "ingest server stopped"
    );
    if let Some(server) = metrics_server {
        server.stop().await;
    }
    // The last handle on the spool: its directory is unlocked once this
    // returns, so a successor can open it at once.
    drop(state);
    Ok(result?)
}
