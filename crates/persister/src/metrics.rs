//! Prometheus metrics of the persister. Names follow
//! `cellmon_<name>_<unit>[_total]`; the `sink` label is `pg` or `influx`.

use prometheus::{
    Encoder as _, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// The persister's metrics; `sink` is `pg` or `influx`.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    pub batch_size: HistogramVec,
    pub write_seconds: HistogramVec,
    pub events: IntCounterVec,
    pub retries: IntCounterVec,
    pub dead_letters: IntCounterVec,
    pub reclaimed: IntCounterVec,
    pub backlog: IntGaugeVec,
    pub running: IntGaugeVec,
    pub status_failures: IntCounter,
    pub trimmed: IntCounter,
    pub swept: IntCounter,
    pub live_messages: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        cellmon_service::metrics::register_common(&registry, "persister")?;
        let batch_size = HistogramVec::new(
            HistogramOpts::new("cellmon_persist_batch_events", "Events per written batch").buckets(
                vec![1.0, 5.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0],
            ),
            &["sink"],
        )?;
        let write_seconds = HistogramVec::new(
            HistogramOpts::new(
                "cellmon_persist_write_duration_seconds",
                "Time to write one batch to its sink (commit included)",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["sink"],
        )?;
        let events = IntCounterVec::new(
            Opts::new(
                "cellmon_persist_events_total",
                "Events written, by sink and outcome (stored, or duplicate of a stored one)",
            ),
            &["sink", "outcome"],
        )?;
        let retries = IntCounterVec::new(
            Opts::new(
                "cellmon_persist_retries_total",
                "Batch writes retried after a transient sink failure",
            ),
            &["sink"],
        )?;
        let dead_letters = IntCounterVec::new(
            Opts::new(
                "cellmon_persist_dead_letters_total",
                "Entries moved to the dead-letter stream (undecodable, rejected, or delivered too often)",
            ),
            &["sink"],
        )?;
        let reclaimed = IntCounterVec::new(
            Opts::new(
                "cellmon_persist_reclaimed_total",
                "Entries taken over from consumers that did not acknowledge them",
            ),
            &["sink"],
        )?;
        let backlog = IntGaugeVec::new(
            Opts::new(
                "cellmon_persist_backlog_entries",
                "Entries a sink's consumer group has not yet acknowledged (lag plus pending)",
            ),
            &["sink"],
        )?;
        let running = IntGaugeVec::new(
            Opts::new(
                "cellmon_persist_sink_running",
                "1 while a sink consumes (its backend prepared, its group joined), else 0",
            ),
            &["sink"],
        )?;
        let status_failures = IntCounter::new(
            "cellmon_persist_status_failures_total",
            "Committed batches whose derived status could not be updated (recomputed with the next event)",
        )?;
        let trimmed = IntCounter::new(
            "cellmon_stream_trimmed_entries_total",
            "Stream entries trimmed after every group acknowledged them",
        )?;
        let live_messages = IntCounterVec::new(
            Opts::new(
                "cellmon_live_messages_total",
                "Live messages published to dashboards, by type",
            ),
            &["type"],
        )?;
        registry.register(Box::new(batch_size.clone()))?;
        registry.register(Box::new(write_seconds.clone()))?;
        registry.register(Box::new(events.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(dead_letters.clone()))?;
        registry.register(Box::new(reclaimed.clone()))?;
        registry.register(Box::new(backlog.clone()))?;
        registry.register(Box::new(running.clone()))?;
        registry.register(Box::new(status_failures.clone()))?;
        let swept = IntCounter::new(
            "cellmon_status_swept_total",
            "Students recomputed by the status sweep (time alone can change a status)",
        )?;
        registry.register(Box::new(trimmed.clone()))?;
        registry.register(Box::new(swept.clone()))?;
        registry.register(Box::new(live_messages.clone()))?;
        Ok(Self {
            registry,
            batch_size,
            write_seconds,
            events,
            retries,
            dead_letters,
            reclaimed,
            backlog,
            running,
            status_failures,
            trimmed,
            swept,
            live_messages,
        })
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
