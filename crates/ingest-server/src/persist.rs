//! The persister role: Redis Streams to Postgres and to InfluxDB.
//!
//! Two sinks, each a consumer group over every shard, each in its own task,
//! so one being down or slow never holds up the other (ARCHITECTURE.md
//! rule 4). For each batch a sink:
//!
//! 1. sets aside entries that cannot be decoded (dead-letter stream);
//! 2. writes the rest (Postgres: one transaction; InfluxDB: one `/write`);
//! 3. on a transient failure (unreachable, timeout, 5xx, deadlock) keeps
//!    the batch and retries with capped exponential backoff;
//! 4. on a permanent failure (the data itself is refused) halves the batch
//!    until the refused entry is alone, and dead-letters just that one;
//! 5. acknowledges the entries only after the write committed (rule 3).
//!
//! After a Postgres commit the sink recomputes the status of the students
//! the batch touched and publishes updates and alerts to the live channel
//! before it acknowledges; a failure there retries the batch, which the
//! writer's `ON CONFLICT` makes harmless.
//!
//! Beside the sinks, a maintenance task reclaims nothing itself but keeps
//! the backlog gauges fresh and trims the streams below what every group
//! still needs. Each sink reclaims entries that a dead consumer left
//! pending for `claim_idle_ms`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cellmon_bus::StreamKeys;
use cellmon_bus::consumer::{self, Consumer, ConsumerConfig, Entry};
use cellmon_bus::live;
use cellmon_domain::envelope::StreamEvent;
use cellmon_domain::live::{LiveBody, Unnumbered, alerts};
use cellmon_domain::lms::ClassId;
use cellmon_store::influx::{InfluxConfig, InfluxError, InfluxWriter, encode_batch};
use cellmon_store::{StoreError, pg, status};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::ExposeSecret as _;
use sqlx::PgPool;
use tokio::sync::watch;

use crate::config::PersisterSettings;
use crate::metrics::PersistMetrics;

/// A sink failure, sorted by what to do about it.
#[derive(Debug, thiserror::Error)]
enum SinkError {
    /// Try the same batch again later.
    #[error("{0}")]
    Transient(String),
    /// The data is refused; retrying fails the same way.
    #[error("{0}")]
    Permanent(String),
}

impl From<StoreError> for SinkError {
    fn from(error: StoreError) -> Self {
        if error.is_transient() {
            Self::Transient(error.to_string())
        } else {
            Self::Permanent(error.to_string())
        }
    }
}

impl From<live::LiveError> for SinkError {
    fn from(error: live::LiveError) -> Self {
        Self::Transient(format!("publishing live updates: {error}"))
    }
}

enum Sink {
    Postgres {
        pool: PgPool,
        control: ConnectionManager,
        keys: StreamKeys,
        metrics: PersistMetrics,
        /// Longest one batch (or its status step) may take.
        limit: Duration,
    },
    Influx(InfluxWriter),
}

impl Sink {
    fn name(&self) -> &'static str {
        match self {
            Self::Postgres { .. } => "pg",
            Self::Influx(_) => "influx",
        }
    }

    async fn write(&mut self, batch: &[StreamEvent]) -> Result<(u64, u64), SinkError> {
        match self {
            Self::Postgres {
                pool,
                control,
                keys,
                metrics,
                limit,
            } => {
                // statement_timeout is the server's; this bounds a
                // connection that stopped answering altogether.
                let outcome = tokio::time::timeout(*limit, pg::write_batch(pool, batch))
                    .await
                    .map_err(|_| SinkError::Transient(format!("no answer within {limit:?}")))??;
                let status = tokio::time::timeout(
                    *limit,
                    publish_status(pool, control, keys, metrics, &outcome.students),
                )
                .await;
                match status {
                    Ok(Ok(())) => {}
                    // The events are committed; a retry of the batch writes
                    // nothing again and only redoes this step.
                    Ok(Err(SinkError::Transient(reason))) => {
                        return Err(SinkError::Transient(reason));
                    }
                    Err(_) => {
                        return Err(SinkError::Transient(format!(
                            "status not updated within {limit:?}"
                        )));
                    }
                    // Never a reason to set committed events aside: the
                    // status is recomputed with the student's next event.
                    Ok(Err(SinkError::Permanent(reason))) => {
                        metrics.status_failures.inc();
                        tracing::error!(%reason, "derived status not updated for a committed batch");
                    }
                }
                Ok((outcome.inserted, outcome.duplicates))
            }
            Self::Influx(writer) => match writer.write(encode_batch(batch)).await {
                Ok(()) => Ok((batch.len() as u64, 0)),
                Err(error) => {
                    // The database went away (a new or wiped server): make it
                    // again; the retry then succeeds.
                    if matches!(error, InfluxError::Status { status: 404, .. }) {
                        let _ = writer.create_database().await;
                    }
                    Err(StoreError::from(error).into())
                }
            },
        }
    }
}

/// Recomputes the touched students' status, publishes what changed per
/// class, then stores it (the rows stay locked until then, so concurrent
/// persisters publish a student's updates in commit order).
async fn publish_status(
    pool: &PgPool,
    control: &mut ConnectionManager,
    keys: &StreamKeys,
    metrics: &PersistMetrics,
    students: &[cellmon_domain::lms::StudentId],
) -> Result<(), SinkError> {
    if students.is_empty() {
        return Ok(());
    }
    let recomputed = status::recompute(pool, students, time::OffsetDateTime::now_utc()).await?;
    let mut by_class: BTreeMap<ClassId, Vec<Unnumbered>> = BTreeMap::new();
    for change in &recomputed.changes {
        let messages = by_class.entry(change.class_id).or_default();
        for alert in alerts(change.before.as_ref(), &change.after) {
            messages.push(Unnumbered {
                class_id: change.class_id,
                body: LiveBody::Alert {
                    student: change.student.clone(),
                    alert,
                },
            });
        }
        if change.before.as_ref() != Some(&change.after) {
            messages.push(Unnumbered {
                class_id: change.class_id,
                body: LiveBody::StudentUpdate {
                    student: change.student.clone(),
                    status: change.after.clone(),
                },
            });
        }
    }
    for (class, messages) in &by_class {
        if messages.is_empty() {
            continue;
        }
        live::publish(control, keys, *class, messages).await?;
        for message in messages {
            let kind = match message.body {
                LiveBody::StudentUpdate { .. } => "student_update",
                LiveBody::Alert { .. } => "alert",
            };
            metrics.live_messages.with_label_values(&[kind]).inc();
        }
    }
    recomputed.commit().await?;
    Ok(())
}

/// Runs the persister until `shutdown` turns true; the batch in hand is
/// finished (or left pending for another consumer) before it returns.
pub async fn run(
    settings: PersisterSettings,
    redis_url: String,
    keys: StreamKeys,
    metrics: PersistMetrics,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let timeout = Duration::from_millis(settings.postgres_timeout_ms.max(100));
    let control = connect_control(&redis_url, timeout, shutdown.clone()).await?;
    let Some(control) = control else {
        return Ok(());
    };
    let pool = pg::pool(&pg::PgConfig {
        url: settings.postgres_url.expose_secret().to_owned(),
        max_connections: settings.postgres_max_connections,
        timeout,
    })?;
    let influx = InfluxWriter::new(InfluxConfig {
        url: settings.influx_url.clone(),
        database: settings.influx_database.clone(),
        token: settings
            .influx_token
            .as_ref()
            .map(|t| t.expose_secret().to_owned()),
        timeout: Duration::from_millis(settings.influx_timeout_ms.max(100)),
    })?;

    let consumer_name = format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
    let pg_sink = Sink::Postgres {
        pool: pool.clone(),
        control: control.clone(),
        keys: keys.clone(),
        metrics: metrics.clone(),
        // A batch is about ten statements, each under statement_timeout.
        limit: timeout * 10,
    };
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(run_sink(
        pg_sink,
        Prepare::Migrate(pool.clone(), settings.migrate),
        settings.clone(),
        redis_url.clone(),
        keys.clone(),
        consumer_name.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(run_sink(
        Sink::Influx(influx.clone()),
        Prepare::CreateDatabase(Box::new(influx)),
        settings.clone(),
        redis_url.clone(),
        keys.clone(),
        consumer_name,
        metrics.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(maintain(
        pool.clone(),
        control,
        keys,
        settings,
        metrics,
        shutdown.clone(),
    ));
    while let Some(ended) = tasks.join_next().await {
        // Tasks end only when asked to; anything else (a panic) must not
        // leave a persister that looks alive and persists nothing.
        if !*shutdown.borrow() {
            let why = match ended {
                Ok(()) => "returned".to_owned(),
                Err(error) => error.to_string(),
            };
            anyhow::bail!("a persister task stopped unexpectedly: {why}");
        }
        ended?;
    }
    pool.close().await;
    Ok(())
}

async fn connect_control(
    url: &str,
    timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<Option<ConnectionManager>> {
    let client = redis::Client::open(url)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1);
    loop {
        match ConnectionManager::new_with_config(client.clone(), config.clone()).await {
            Ok(conn) => return Ok(Some(conn)),
            Err(error) => tracing::warn!(%error, "persister: Redis unreachable; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return Ok(None),
        }
    }
}

/// What a sink must have done before it consumes.
enum Prepare {
    Migrate(PgPool, bool),
    CreateDatabase(Box<InfluxWriter>),
}

impl Prepare {
    async fn run(&self) -> Result<(), String> {
        match self {
            Self::Migrate(_, false) => Ok(()),
            Self::Migrate(pool, true) => pg::migrate(pool).await.map_err(|e| e.to_string()),
            Self::CreateDatabase(writer) => {
                writer.create_database().await.map_err(|e| e.to_string())
            }
        }
    }
}

/// Sleeps `pause`, or less if shutdown is asked for; returns whether to
/// stop.
async fn pause_or_stop(pause: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    if *shutdown.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(pause) => *shutdown.borrow(),
        _ = shutdown.changed() => true,
    }
}

#[allow(clippy::too_many_arguments, reason = "a private task entry point")]
async fn run_sink(
    mut sink: Sink,
    prepare: Prepare,
    settings: PersisterSettings,
    redis_url: String,
    keys: StreamKeys,
    consumer_name: String,
    metrics: PersistMetrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let name = sink.name();
    metrics.running.with_label_values(&[name]).set(0);
    let retry_max = Duration::from_millis(settings.retry_max_ms.max(1));
    let mut backoff = Backoff::new(
        Duration::from_millis(settings.retry_initial_ms.max(1)),
        retry_max,
    );
    while let Err(error) = prepare.run().await {
        tracing::warn!(sink = name, %error, "sink not ready; retrying");
        if pause_or_stop(backoff.next(), &mut shutdown).await {
            return;
        }
    }
    backoff.reset();
    let config = ConsumerConfig {
        keys,
        group: name.to_owned(),
        consumer: format!("{name}-{consumer_name}"),
        batch_max: settings.batch_max.max(1),
        batch_wait: Duration::from_millis(settings.batch_wait_ms),
        claim_idle: Duration::from_millis(settings.claim_idle_ms.max(1)),
        max_deliveries: settings.max_deliveries.max(1),
        timeout: Duration::from_millis(settings.postgres_timeout_ms.max(100)),
    };
    let consumer = loop {
        match Consumer::connect(&redis_url, config.clone()).await {
            Ok(consumer) => break consumer,
            Err(error) => {
                tracing::warn!(sink = name, %error, "cannot join the consumer group; retrying");
                if pause_or_stop(backoff.next(), &mut shutdown).await {
                    return;
                }
            }
        }
    };
    backoff.reset();
    tracing::info!(sink = name, consumer = %config.consumer, "persister sink running");
    metrics.running.with_label_values(&[name]).set(1);
    let claim_interval = Duration::from_millis(settings.claim_interval_ms.max(1));
    // Claim at once: a restarted persister finds what its previous life left.
    let mut next_claim = Instant::now();
    let mut worker = Worker {
        consumer: &consumer,
        metrics: &metrics,
        name,
        retry_initial: Duration::from_millis(settings.retry_initial_ms.max(1)),
        retry_max,
    };
    while !*shutdown.borrow() {
        let batch = if Instant::now() >= next_claim {
            next_claim = Instant::now() + claim_interval;
            match consumer.claim_stale().await {
                Ok(claimed) => {
                    // Delivered often: maybe an entry that kills its
                    // consumer, maybe only consumers that died during an
                    // outage. Each is tried alone, like any entry (refused:
                    // dead letter; outage: retried); only one that keeps
                    // coming back far past the limit is set aside untried.
                    for entry in claimed.exhausted {
                        let deliveries = entry.deliveries.unwrap_or_default();
                        if deliveries >= config.max_deliveries.saturating_mul(3) {
                            let reason = format!(
                                "delivered {deliveries} times; its consumers never acknowledged it"
                            );
                            worker.dead_letter(&entry, &reason, &mut shutdown).await;
                        } else {
                            tracing::warn!(sink = name, entry = %entry.id, deliveries, "entry delivered often; writing it alone");
                            metrics.reclaimed.with_label_values(&[name]).inc();
                            worker.process(&mut sink, vec![entry], &mut shutdown).await;
                        }
                    }
                    let n = claimed.entries.len() as u64;
                    if n > 0 {
                        tracing::info!(sink = name, entries = n, "reclaimed pending entries");
                        metrics.reclaimed.with_label_values(&[name]).inc_by(n);
                        // More may be waiting; look again soon.
                        next_claim = Instant::now();
                    }
                    claimed.entries
                }
                Err(error) => {
                    tracing::warn!(sink = name, %error, "reclaiming failed");
                    Vec::new()
                }
            }
        } else {
            Vec::new()
        };
        let batch = if batch.is_empty() {
            match consumer.read().await {
                Ok(batch) => batch,
                Err(error) => {
                    tracing::warn!(sink = name, %error, "reading the streams failed; retrying");
                    if pause_or_stop(backoff.next(), &mut shutdown).await {
                        break;
                    }
                    continue;
                }
            }
        } else {
            batch
        };
        backoff.reset();
        if batch.is_empty() {
            continue;
        }
        worker.process(&mut sink, batch, &mut shutdown).await;
    }
    metrics.running.with_label_values(&[name]).set(0);
    tracing::info!(sink = name, "persister sink stopped");
}

struct Worker<'a> {
    consumer: &'a Consumer,
    metrics: &'a PersistMetrics,
    name: &'static str,
    retry_initial: Duration,
    retry_max: Duration,
}

impl Worker<'_> {
    /// Writes a batch and acknowledges it; see the module docs. Returns
    /// early, leaving entries pending, when shutdown interrupts a retry.
    async fn process(
        &mut self,
        sink: &mut Sink,
        batch: Vec<Entry>,
        shutdown: &mut watch::Receiver<bool>,
    ) {
        // The decoded events move out of their entries (which keep what
        // acknowledging and dead-lettering need), so nothing is copied.
        let mut good = Vec::with_capacity(batch.len());
        let mut events = Vec::with_capacity(batch.len());
        for mut entry in batch {
            match std::mem::replace(&mut entry.event, Err(String::new())) {
                Ok(event) => {
                    events.push(event);
                    good.push(entry);
                }
                Err(reason) => {
                    let reason = format!("undecodable entry: {reason}");
                    self.dead_letter(&entry, &reason, shutdown).await;
                }
            }
        }
        // Ranges still to write; a refused range is halved until the
        // refused entry is alone.
        let mut todo = Vec::new();
        todo.push(0..good.len());
        while let Some(range) = todo.pop() {
            if range.is_empty() {
                continue;
            }
            let slice = &good[range.clone()];
            match self
                .write_with_retries(sink, slice, &events[range.clone()], shutdown)
                .await
            {
                Some(Ok(())) => self.ack(slice, shutdown).await,
                Some(Err(reason)) if slice.len() == 1 => {
                    tracing::error!(sink = self.name, entry = %slice[0].id, %reason, "entry refused by the sink; dead-lettered");
                    self.dead_letter(&slice[0], &reason, shutdown).await;
                }
                Some(Err(reason)) => {
                    tracing::warn!(sink = self.name, size = slice.len(), %reason, "batch refused; splitting it to find the refused entries");
                    let middle = range.start + range.len() / 2;
                    todo.push(middle..range.end);
                    todo.push(range.start..middle);
                }
                None => return,
            }
        }
    }

    /// `Some(Ok)` once written, `Some(Err)` when the sink refuses the data,
    /// `None` when shutdown came first.
    ///
    /// While it retries, it keeps the entries its own (their idle time is
    /// reset), so other persisters do not take them over and pile up
    /// deliveries while the sink is down: only a dead consumer's entries
    /// are reclaimed.
    async fn write_with_retries(
        &mut self,
        sink: &mut Sink,
        entries: &[Entry],
        events: &[StreamEvent],
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<Result<(), String>> {
        let mut backoff = Backoff::new(self.retry_initial, self.retry_max);
        let mut touched = Instant::now();
        loop {
            if touched.elapsed() >= self.consumer.config().claim_idle / 3 {
                touched = Instant::now();
                if let Err(error) = self.consumer.touch(entries).await {
                    tracing::debug!(sink = self.name, %error, "could not refresh held entries");
                }
            }
            let started = Instant::now();
            match sink.write(events).await {
                Ok((stored, duplicates)) => {
                    let labels = [self.name];
                    self.metrics
                        .write_seconds
                        .with_label_values(&labels)
                        .observe(started.elapsed().as_secs_f64());
                    self.metrics
                        .batch_size
                        .with_label_values(&labels)
                        .observe(events.len() as f64);
                    self.metrics
                        .events
                        .with_label_values(&[self.name, "stored"])
                        .inc_by(stored);
                    self.metrics
                        .events
                        .with_label_values(&[self.name, "duplicate"])
                        .inc_by(duplicates);
                    return Some(Ok(()));
                }
                Err(SinkError::Permanent(reason)) => return Some(Err(reason)),
                Err(SinkError::Transient(reason)) => {
                    self.metrics.retries.with_label_values(&[self.name]).inc();
                    let pause = backoff.next();
                    tracing::warn!(sink = self.name, %reason, retry_in = ?pause, "write failed; retrying");
                    if pause_or_stop(pause, shutdown).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Acknowledges, retrying while Redis is away (an unacknowledged entry
    /// would be written again later: harmless, but wasted work).
    async fn ack(&mut self, entries: &[Entry], shutdown: &mut watch::Receiver<bool>) {
        let mut backoff = Backoff::new(self.retry_initial, self.retry_max);
        while let Err(error) = self.consumer.ack(entries).await {
            tracing::warn!(sink = self.name, %error, "acknowledging failed; retrying");
            if pause_or_stop(backoff.next(), shutdown).await {
                return;
            }
        }
    }

    async fn dead_letter(
        &mut self,
        entry: &Entry,
        reason: &str,
        shutdown: &mut watch::Receiver<bool>,
    ) {
        let mut backoff = Backoff::new(self.retry_initial, self.retry_max);
        while let Err(error) = self.consumer.dead_letter(entry, reason).await {
            tracing::warn!(sink = self.name, %error, "dead-lettering failed; retrying");
            if pause_or_stop(backoff.next(), shutdown).await {
                return;
            }
        }
        tracing::warn!(sink = self.name, entry = %entry.id, stream = %entry.stream, %reason, "entry moved to the dead-letter stream");
        self.metrics
            .dead_letters
            .with_label_values(&[self.name])
            .inc();
    }
}

/// Most students recomputed by one sweep.
const SWEEP_BATCH: i64 = 1_000;

/// Keeps the backlog gauges fresh, trims the streams, and sweeps statuses
/// that time alone changes (nothing else recomputes a student who stopped
/// sending events).
async fn maintain(
    pool: PgPool,
    mut control: ConnectionManager,
    keys: StreamKeys,
    settings: PersisterSettings,
    metrics: PersistMetrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let trim_interval = Duration::from_millis(settings.trim_interval_ms.max(100));
    let mut next_trim = Instant::now() + trim_interval;
    let sweep_interval = Duration::from_millis(settings.status_sweep_ms.max(100));
    let mut next_sweep = Instant::now() + sweep_interval;
    loop {
        match consumer::backlogs(&mut control, &keys).await {
            Ok(backlogs) => {
                for group in consumer::GROUPS {
                    let n = backlogs.get(group).copied().unwrap_or(0);
                    metrics
                        .backlog
                        .with_label_values(&[group])
                        .set(i64::try_from(n).unwrap_or(i64::MAX));
                }
            }
            Err(error) => tracing::debug!(%error, "backlog unknown"),
        }
        if Instant::now() >= next_trim {
            next_trim = Instant::now() + trim_interval;
            match consumer::trim(&mut control, &keys).await {
                Ok(n) => metrics.trimmed.inc_by(n),
                Err(error) => tracing::warn!(%error, "trimming the streams failed"),
            }
        }
        if Instant::now() >= next_sweep {
            next_sweep = Instant::now() + sweep_interval;
            match status::due_for_sweep(&pool, sweep_interval, SWEEP_BATCH).await {
                Ok(students) if !students.is_empty() => {
                    let swept =
                        publish_status(&pool, &mut control, &keys, &metrics, &students).await;
                    match swept {
                        Ok(()) => metrics.swept.inc_by(students.len() as u64),
                        Err(error) => tracing::warn!(?error, "status sweep failed"),
                    }
                }
                Ok(_) => {}
                Err(error) => tracing::debug!(%error, "status sweep skipped"),
            }
        }
        let pause = sweep_interval.min(Duration::from_secs(1));
        if pause_or_stop(pause, &mut shutdown).await {
            return;
        }
    }
}

/// Capped exponential backoff.
struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            next: initial,
        }
    }

    fn next(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * 2).min(self.max);
        pause
    }

    fn reset(&mut self) {
        self.next = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let pauses: Vec<u128> = (0..4).map(|_| b.next().as_millis()).collect();
        assert_eq!(pauses, vec![100, 200, 350, 350]);
        b.reset();
        assert_eq!(b.next(), Duration::from_millis(100));
    }
}
