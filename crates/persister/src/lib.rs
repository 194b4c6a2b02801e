//! Cell Monitor's persister: the event streams into Postgres and InfluxDB,
//! and the derived status of every student onto the live channel.
//!
//! The ingest server appends events to the Redis streams
//! `{prefix}events:{0..S-1}`; the persister reads them as two consumer
//! groups, `pg` and `influx`, one task each, and stores every event once in
//! each backend (ARCHITECTURE.md rules 2 to 4). Start as many persister
//! processes as you like: they join the same groups and share the work.
//!
//! * [`sink`]: the `Sink` trait and one file per sink: `sink/postgres.rs`
//!   (one transaction per batch, then the status step), `sink/influx.rs`
//!   (one `/write` per batch);
//! * `worker`: the consume loop every sink runs (ack after commit,
//!   retries, halving refused batches, dead letters, reclaiming);
//! * `status`: the derived-status step (recompute, publish, store), after
//!   every Postgres commit and on the sweep;
//! * `maintenance`: backlog gauges, trimming, the status sweep;
//! * `health` and `http`: `GET /health/live`, `GET /health/ready` (503
//!   naming the sink and its error while a backend cannot be reached),
//!   `GET /metrics`;
//! * [`config`], [`metrics`].
//!
//! The binary's `main` only loads [`Config`] and calls [`serve`], so tests
//! run the very same persister in-process on port 0. A task that stops
//! unexpectedly stops the whole process (its supervisor restarts it)
//! rather than leave it answering health checks while persisting nothing.

mod backoff;
pub mod config;
mod health;
mod http;
mod maintenance;
pub mod metrics;
mod sink;
mod status;
mod worker;

use std::future::{Future, IntoFuture as _};
use std::sync::Arc;

use cellmon_bus::StreamKeys;
use cellmon_service::{BadSetting, Invalid, Settings as _};
use cellmon_store::influx::{InfluxConfig, InfluxError, InfluxWriter};
use cellmon_store::{StoreError, pg};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::ExposeSecret as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

use crate::health::{Readiness, SinkHealth};
use crate::maintenance::Maintenance;
use crate::metrics::Metrics;
use crate::sink::Sink as _;
use crate::sink::influx::InfluxSink;
use crate::sink::postgres::PostgresSink;
use crate::status::StatusPublisher;
use crate::worker::Context;

/// Why the persister could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A configuration built in code that loading would have refused.
    #[error(transparent)]
    Config(#[from] Invalid),
    #[error("bad Redis URL")]
    Redis(#[source] redis::RedisError),
    #[error("bad Postgres settings")]
    Postgres(#[source] StoreError),
    #[error("bad InfluxDB settings")]
    Influx(#[source] InfluxError),
}

impl StartError {
    /// Each is the configuration's fault: marked so the binary exits with
    /// status 64.
    fn into_anyhow(self) -> anyhow::Error {
        let setting = match self {
            Self::Config(_) => return BadSetting::settings(self).into(),
            Self::Redis(_) => "redis.url",
            Self::Postgres(_) => "postgres.url",
            Self::Influx(_) => "influx.url",
        };
        BadSetting::new(setting, self).into()
    }
}

/// Runs the persister until `shutdown` resolves, then lets the sinks finish
/// the batch in hand for up to `shutdown_grace`; whatever they have not
/// acknowledged stays pending in Redis for the next persister. Returns an
/// error when a task stopped unexpectedly.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config
        .validate()
        .map_err(|e| StartError::from(e).into_anyhow())?;
    let config = Arc::new(config);
    let metrics = Metrics::new()?;
    let keys = StreamKeys::new(config.redis.prefix.clone(), config.stream_shards);
    let redis_timeout = config.redis.timeout;
    let redis = redis::Client::open(config.redis.url.expose_secret())
        .map_err(|e| StartError::Redis(e).into_anyhow())?;
    // Shared by the status step, maintenance and readiness; lazy, so the
    // persister starts while Redis is down.
    let control = ConnectionManager::new_lazy_with_config(
        redis.clone(),
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(redis_timeout))
            .set_response_timeout(Some(redis_timeout))
            .set_number_of_retries(1),
    )
    .map_err(|e| StartError::Redis(e).into_anyhow())?;
    let postgres_timeout = config.postgres.timeout;
    let pool = pg::pool(&pg::PgConfig {
        url: config.postgres.url.expose_secret().to_owned(),
        max_connections: config.postgres.max_connections,
        timeout: postgres_timeout,
    })
    .map_err(|e| StartError::Postgres(e).into_anyhow())?;
    let influx = InfluxWriter::new(InfluxConfig {
        url: config.influx.url.clone(),
        database: config.influx.database.clone(),
        token: config
            .influx
            .token
            .as_ref()
            .map(|t| t.expose_secret().to_owned()),
        timeout: config.influx.timeout,
    })
    .map_err(|e| StartError::Influx(e).into_anyhow())?;

    let status = StatusPublisher::new(pool.clone(), control.clone(), keys.clone(), metrics.clone());
    let pg_sink = PostgresSink::new(
        status.clone(),
        config.migrate,
        metrics.clone(),
        postgres_timeout,
    );
    let influx_sink = InfluxSink::new(influx);
    let pg_health = SinkHealth::new(pg_sink.name(), pg_sink.probe());
    let influx_health = SinkHealth::new(influx_sink.name(), influx_sink.probe());
    let readiness = Readiness::new(
        control.clone(),
        redis_timeout,
        vec![pg_health.clone(), influx_health.clone()],
    );

    let stop = CancellationToken::new();
    let context = Context {
        redis,
        keys: keys.clone(),
        consumer_name: format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()),
        config: Arc::clone(&config),
        metrics: metrics.clone(),
        stop: stop.clone(),
    };
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(worker::run(pg_sink, pg_health, context.clone()));
    tasks.spawn(worker::run(influx_sink, influx_health, context));
    let maintenance = Maintenance {
        redis: control,
        keys,
        status,
        config: Arc::clone(&config),
        metrics: metrics.clone(),
    };
    tasks.spawn(maintenance.run(stop.clone()));

    let addr = listener.local_addr()?;
    let metrics_apart = config.listen.metrics.is_some();
    let metrics_server = cellmon_service::metrics::serve_apart(
        config.listen.metrics,
        http::metrics_router(metrics.clone()),
    )
    .await?;
    let http = tokio::spawn(
        axum::serve(listener, http::router(readiness, metrics, metrics_apart))
            .with_graceful_shutdown(stop.clone().cancelled_owned())
            .into_future(),
    );
    tracing::info!(%addr, "persister running (health and metrics over HTTP)");

    // Tasks end only when asked to; anything else (a panic, a return) must
    // not leave a persister that looks alive and persists nothing.
    let failure = tokio::select! {
        () = shutdown => None,
        ended = tasks.join_next() => Some(match ended {
            Some(Ok(())) => "returned".to_owned(),
            Some(Err(error)) => error.to_string(),
            None => "no task left".to_owned(),
        }),
    };
    if let Some(why) = &failure {
        tracing::error!(why, "a persister task stopped unexpectedly; shutting down");
    }
    stop.cancel();
    let grace = config.shutdown_grace;
    let stopped = tokio::time::timeout(grace, async {
        while let Some(ended) = tasks.join_next().await {
            if let Err(error) = ended {
                tracing::error!(%error, "a persister task failed while stopping");
            }
        }
    })
    .await;
    if stopped.is_err() {
        // What they hold stays pending and is reclaimed by the next one.
        tracing::warn!(?grace, "the sinks did not stop within the grace period");
        tasks.shutdown().await;
    }
    let served = http.await;
    if let Some(server) = metrics_server {
        server.stop().await;
    }
    pool.close().await;
    if let Some(why) = failure {
        anyhow::bail!("a persister task stopped unexpectedly: {why}");
    }
    served??;
    tracing::info!("persister stopped");
    Ok(())
}
