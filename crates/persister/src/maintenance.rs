//! Beside the sinks, one task that keeps the backlog gauges fresh, trims
//! the streams below what every group still needs (ARCHITECTURE.md rule
//! 4), and sweeps statuses that time alone changes: nothing else
//! recomputes a student who stopped sending events, yet they go idle and
//! their help request lapses.

use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cellmon_bus::StreamKeys;
use cellmon_bus::consumer;
use cellmon_store::status;
use redis::aio::ConnectionManager;
use tokio_util::sync::CancellationToken;

use crate::backoff::pause_or_stop;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::status::StatusPublisher;

/// Most students recomputed by one sweep.
const SWEEP_BATCH: i64 = 1_000;
/// The longest pause between rounds, so the gauges stay fresh.
const MAX_PAUSE: Duration = Duration::from_secs(1);

/// What the task works with.
#[derive(Debug)]
pub(crate) struct Maintenance {
    /// Its Redis calls are bounded by the connection's response timeout
    /// (`redis.timeout`).
    pub(crate) redis: ConnectionManager,
    pub(crate) keys: StreamKeys,
    pub(crate) status: StatusPublisher,
    pub(crate) config: Arc<Config>,
    pub(crate) metrics: Metrics,
}

impl Maintenance {
    /// Runs until `stop` is cancelled.
    #[tracing::instrument(name = "maintenance", skip_all)]
    pub(crate) async fn run(mut self, stop: CancellationToken) {
        let trim_interval = self.config.trim_interval;
        let mut next_trim = Instant::now() + trim_interval;
        let sweep_interval = self.config.status_sweep;
        let mut next_sweep = Instant::now() + sweep_interval;
        loop {
            self.refresh_backlogs().await;
            if Instant::now() >= next_trim {
                next_trim = Instant::now() + trim_interval;
                self.trim().await;
            }
            if Instant::now() >= next_sweep {
                next_sweep = Instant::now() + sweep_interval;
                self.sweep(sweep_interval).await;
            }
            if pause_or_stop(sweep_interval.min(MAX_PAUSE), &stop).await {
                return;
            }
        }
    }

    async fn refresh_backlogs(&mut self) {
        match consumer::backlogs(&mut self.redis, &self.keys).await {
            Ok(backlogs) => {
                for group in consumer::GROUPS {
                    let n = backlogs.get(group).copied().unwrap_or(0);
                    self.metrics
                        .backlog
                        .with_label_values(&[group])
                        .set(i64::try_from(n).unwrap_or(i64::MAX));
                }
            }
            Err(error) => tracing::debug!(error = &error as &dyn Error, "backlog unknown"),
        }
    }

    async fn trim(&mut self) {
        match consumer::trim(&mut self.redis, &self.keys).await {
            Ok(n) => self.metrics.trimmed.inc_by(n),
            Err(error) => {
                tracing::warn!(error = &error as &dyn Error, "trimming the streams failed");
            }
        }
    }

    /// The status step for students not recomputed for `interval`.
    async fn sweep(&mut self, interval: Duration) {
        let due = status::due_for_sweep(self.status.pool(), interval, SWEEP_BATCH).await;
        match due {
            Ok(students) if !students.is_empty() => match self.status.publish(&students).await {
                Ok(()) => self.metrics.swept.inc_by(students.len() as u64),
                Err(error) => {
                    tracing::warn!(error = &error as &dyn Error, "status sweep failed");
                }
            },
            Ok(_) => {}
            Err(error) => tracing::debug!(error = &error as &dyn Error, "status sweep skipped"),
        }
    }
}
