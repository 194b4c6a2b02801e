//! The consume loop, the same for every [`Sink`]: one consumer-group
//! member over every shard, in a task of its own, so one sink being down
//! or slow never holds up the other (ARCHITECTURE.md rule 4). For each
//! batch it:
//!
//! 1. sets aside entries that cannot be decoded (dead-letter stream);
//! 2. writes the rest with [`Sink::write`];
//! 3. on a transient failure (unreachable, timeout, 5xx, deadlock) keeps
//!    the batch and retries with capped exponential backoff;
//! 4. on a refusal of the data halves the batch until the refused entry is
//!    alone, and dead-letters just that one;
//! 5. acknowledges the entries only after the write committed (rule 3).
//!
//! While it writes a batch and while it waits to retry one, it keeps the
//! entries claimed, so other persisters take over only a dead (or hung)
//! consumer's entries, every `claim_interval`, and entries delivered
//! past `max_deliveries` go to the dead-letter stream untried: the rule of
//! `cellmon_bus::consumer` ("The delivery limit").

use std::error::Error;
use std::sync::Arc;
use std::time::Instant;

use cellmon_bus::StreamKeys;
use cellmon_bus::consumer::{Consumer, ConsumerConfig, Entry};
use cellmon_domain::envelope::StreamEvent;
use tokio_util::sync::CancellationToken;

use crate::backoff::{Backoff, pause_or_stop};
use crate::config::Config;
use crate::health::SinkHealth;
use crate::metrics::Metrics;
use crate::sink::{Sink, SinkError};

/// What every sink task shares.
#[derive(Debug, Clone)]
pub(crate) struct Context {
    /// The one Redis client of the process; each consumer opens its own
    /// connection through it.
    pub(crate) redis: redis::Client,
    pub(crate) keys: StreamKeys,
    /// Unique per process; a sink's consumer is `{sink}-{this}`.
    pub(crate) consumer_name: String,
    pub(crate) config: Arc<Config>,
    pub(crate) metrics: Metrics,
    pub(crate) stop: CancellationToken,
}

impl Context {
    fn backoff(&self) -> Backoff {
        Backoff::new(self.config.retry_initial, self.config.retry_max)
    }

    fn consumer_config(&self, group: &str) -> ConsumerConfig {
        let config = &self.config;
        ConsumerConfig {
            keys: self.keys.clone(),
            group: group.to_owned(),
            consumer: format!("{group}-{}", self.consumer_name),
            batch_max: config.batch_max,
            batch_wait: config.batch_wait,
            claim_idle: config.claim_idle,
            max_deliveries: config.max_deliveries,
            timeout: config.redis.timeout,
        }
    }
}

/// Runs `sink` until `context.stop` is cancelled; the batch in hand is
/// finished (or left pending for another consumer) before it returns.
#[tracing::instrument(skip_all, fields(sink = %sink.name()))]
pub(crate) async fn run<S: Sink>(mut sink: S, health: Arc<SinkHealth>, context: Context) {
    let name = sink.name();
    let running = context.metrics.running.with_label_values(&[name]);
    running.set(0);
    let stop = &context.stop;
    let mut backoff = context.backoff();
    while let Err(error) = sink.prepare().await {
        health.starting("preparing its backend", &error);
        tracing::warn!(error = &error as &dyn Error, "sink not ready; retrying");
        if pause_or_stop(backoff.next(), stop).await {
            return;
        }
    }
    backoff.reset();
    let config = context.consumer_config(name);
    let consumer = loop {
        match Consumer::connect(&context.redis, config.clone()).await {
            Ok(consumer) => break consumer,
            Err(error) => {
                health.starting("joining its consumer group", &error);
                tracing::warn!(
                    error = &error as &dyn Error,
                    "cannot join the consumer group; retrying"
                );
                if pause_or_stop(backoff.next(), stop).await {
                    return;
                }
            }
        }
    };
    backoff.reset();
    tracing::info!(consumer = %config.consumer, "sink consuming");
    health.consuming();
    running.set(1);
    let worker = Worker {
        consumer: &consumer,
        context: &context,
        health: &health,
        name,
    };
    let claim_interval = context.config.claim_interval;
    // Claim at once: a restarted persister finds what its previous life left.
    let mut next_claim = Instant::now();
    while !stop.is_cancelled() {
        let mut batch = Vec::new();
        if Instant::now() >= next_claim {
            next_claim = Instant::now() + claim_interval;
            batch = worker.reclaim().await;
            if !batch.is_empty() {
                // More may be waiting; look again soon.
                next_claim = Instant::now();
            }
        }
        if batch.is_empty() {
            match consumer.read().await {
                Ok(read) => {
                    health.consuming();
                    batch = read;
                }
                Err(error) => {
                    health.failing("reading the streams", &error);
                    tracing::warn!(
                        error = &error as &dyn Error,
                        "reading the streams failed; retrying"
                    );
                    if pause_or_stop(backoff.next(), stop).await {
                        break;
                    }
                    continue;
                }
            }
        }
        backoff.reset();
        if !batch.is_empty() {
            worker.process(&mut sink, batch).await;
        }
    }
    running.set(0);
    tracing::info!("sink stopped");
}

struct Worker<'a> {
    consumer: &'a Consumer,
    context: &'a Context,
    health: &'a SinkHealth,
    name: &'static str,
}

impl Worker<'_> {
    fn metrics(&self) -> &Metrics {
        &self.context.metrics
    }

    /// Takes over what dead consumers left pending; dead-letters, untried,
    /// what was delivered past the limit. Returns the entries to write.
    async fn reclaim(&self) -> Vec<Entry> {
        let claimed = match self.consumer.claim_stale().await {
            Ok(claimed) => claimed,
            Err(error) => {
                tracing::warn!(error = &error as &dyn Error, "reclaiming failed");
                return Vec::new();
            }
        };
        let limit = self.consumer.config().max_deliveries;
        for entry in &claimed.exhausted {
            let deliveries = entry.deliveries.unwrap_or_default();
            let reason = format!(
                "delivered {deliveries} times (max_deliveries {limit}), never acknowledged: \
                 the consumers that took it died or hung"
            );
            self.dead_letter(entry, &reason).await;
        }
        let n = claimed.entries.len() as u64;
        if n > 0 {
            tracing::info!(entries = n, "reclaimed pending entries");
            self.metrics()
                .reclaimed
                .with_label_values(&[self.name])
                .inc_by(n);
        }
        claimed.entries
    }

    /// Writes a batch and acknowledges it; see the module docs. Returns
    /// early, leaving entries pending, when shutdown interrupts a retry.
    async fn process<S: Sink>(&self, sink: &mut S, batch: Vec<Entry>) {
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
                    self.dead_letter(&entry, &reason).await;
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
            let written = keep_claimed(
                self.consumer,
                slice,
                self.write_until_done(sink, &events[range.clone()]),
            )
            .await;
            match written {
                Some(Ok(())) => self.ack(slice).await,
                Some(Err(error)) if slice.len() == 1 => {
                    tracing::error!(
                        entry = %slice[0].id,
                        error = &error as &dyn Error,
                        "entry refused by the sink; dead-lettered"
                    );
                    let reason = crate::health::describe(&error);
                    self.dead_letter(&slice[0], &reason).await;
                }
                Some(Err(error)) => {
                    tracing::warn!(
                        size = slice.len(),
                        error = &error as &dyn Error,
                        "batch refused; splitting it to find the refused entries"
                    );
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
    async fn write_until_done<S: Sink>(
        &self,
        sink: &mut S,
        events: &[StreamEvent],
    ) -> Option<Result<(), SinkError>> {
        let mut backoff = self.context.backoff();
        let labels = [self.name];
        loop {
            let started = Instant::now();
            match sink.write(events).await {
                Ok(written) => {
                    self.health.consuming();
                    let metrics = self.metrics();
                    metrics
                        .write_seconds
                        .with_label_values(&labels)
                        .observe(started.elapsed().as_secs_f64());
                    metrics
                        .batch_size
                        .with_label_values(&labels)
                        .observe(events.len() as f64);
                    metrics
                        .events
                        .with_label_values(&[self.name, "stored"])
                        .inc_by(written.stored);
                    metrics
                        .events
                        .with_label_values(&[self.name, "duplicate"])
                        .inc_by(written.duplicates);
                    return Some(Ok(()));
                }
                // The backend answered: it is the data that is refused.
                Err(error) if !error.is_transient() => {
                    self.health.consuming();
                    return Some(Err(error));
                }
                Err(error) => {
                    self.health.failing("writing", &error);
                    self.metrics().retries.with_label_values(&labels).inc();
                    let pause = backoff.next();
                    tracing::warn!(
                        error = &error as &dyn Error,
                        retry_in = ?pause,
                        "write failed; retrying"
                    );
                    if pause_or_stop(pause, &self.context.stop).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Acknowledges, retrying while Redis is away (an unacknowledged entry
    /// would be written again later: harmless, but wasted work).
    async fn ack(&self, entries: &[Entry]) {
        let mut backoff = self.context.backoff();
        while let Err(error) = self.consumer.ack(entries).await {
            tracing::warn!(
                error = &error as &dyn Error,
                "acknowledging failed; retrying"
            );
            if pause_or_stop(backoff.next(), &self.context.stop).await {
                return;
            }
        }
    }

    async fn dead_letter(&self, entry: &Entry, reason: &str) {
        let mut backoff = self.context.backoff();
        while let Err(error) = self.consumer.dead_letter(entry, reason).await {
            tracing::warn!(
                error = &error as &dyn Error,
                "dead-lettering failed; retrying"
            );
            if pause_or_stop(backoff.next(), &self.context.stop).await {
                return;
            }
        }
        tracing::warn!(entry = %entry.id, stream = %entry.stream, %reason, "entry moved to the dead-letter stream");
        self.metrics()
            .dead_letters
            .with_label_values(&[self.name])
            .inc();
    }
}

/// Runs `work` while keeping `entries` claimed by this consumer: their idle
/// time is reset every third of `claim_idle`, so no other consumer takes
/// them over while this one is alive and working on them (a long write, a
/// retry after a failure). Only deliveries to consumers that died or hung
/// then count towards the delivery limit. The refreshing runs beside the
/// work, never in its way: a Redis that hangs delays no write.
async fn keep_claimed<T>(
    consumer: &Consumer,
    entries: &[Entry],
    work: impl Future<Output = T>,
) -> T {
    tokio::select! {
        out = work => out,
        never = keep_refreshing(consumer, entries) => match never {},
    }
}

async fn keep_refreshing(consumer: &Consumer, entries: &[Entry]) -> std::convert::Infallible {
    let every = consumer.config().claim_idle / 3;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(error) = consumer.touch(entries).await {
            tracing::debug!(
                error = &error as &dyn Error,
                "could not refresh held entries"
            );
        }
    }
}
