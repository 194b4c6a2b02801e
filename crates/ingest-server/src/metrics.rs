//! Prometheus metrics of the ingest server. Names follow
//! `cellmon_<name>_<unit>[_total]`; labels are low-cardinality (route
//! template and status, never paths or e-mails).

use std::sync::atomic::Ordering;

use cellmon_bus::HandoffMetrics;
use cellmon_bus::spool::Spool;
use prometheus::{
    Encoder as _, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub accept_seconds: HistogramVec,
    pub events_accepted: IntCounter,
    pub events_rejected: IntCounter,
    pub events_duplicate: IntCounter,
    pub events_spooled: IntCounter,
    pub events_replayed: IntCounter,
    pub spool_bytes: IntGauge,
    pub spool_pending: IntGauge,
    pub spool_corrupt_regions: IntGauge,
    pub spool_undecodable: IntCounter,
    pub redis_restarts: IntCounter,
    pub redis_amnesia: IntCounter,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        cellmon_service::metrics::register_common(&registry, "ingest")?;
        let requests = IntCounterVec::new(
            Opts::new(
                "cellmon_ingest_requests_total",
                "HTTP requests by route and status",
            ),
            &["route", "status"],
        )?;
        let accept_seconds = HistogramVec::new(
            HistogramOpts::new(
                "cellmon_ingest_accept_duration_seconds",
                "Time from request to answer on the events route, by status",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            &["status"],
        )?;
        let events_accepted = IntCounter::new(
            "cellmon_events_accepted_total",
            "Events handed to Redis and acknowledged with 202",
        )?;
        let events_rejected =
            IntCounter::new("cellmon_events_rejected_total", "Events refused as invalid")?;
        let events_duplicate = IntCounter::new(
            "cellmon_events_duplicate_total",
            "Events repeated within one batch (stored once)",
        )?;
        let events_spooled = IntCounter::new(
            "cellmon_events_spooled_total",
            "Events written to the local spool because Redis could not take them",
        )?;
        let events_replayed = IntCounter::new(
            "cellmon_events_replayed_total",
            "Spooled events handed to Redis later",
        )?;
        let spool_bytes = IntGauge::new("cellmon_spool_bytes", "Bytes of the local spool on disk")?;
        let spool_pending = IntGauge::new(
            "cellmon_spool_pending_events",
            "Spooled events not yet handed to Redis",
        )?;
        let spool_corrupt_regions = IntGauge::new(
            "cellmon_spool_corrupt_regions",
            "Damaged regions skipped when the spool was opened",
        )?;
        let spool_undecodable = IntCounter::new(
            "cellmon_spool_undecodable_total",
            "Spooled records with a valid checksum that are not an event (dropped)",
        )?;
        let redis_restarts = IntCounter::new(
            "cellmon_redis_restarts_total",
            "Redis restarts seen (its run_id changed)",
        )?;
        let redis_amnesia = IntCounter::new(
            "cellmon_redis_amnesia_total",
            "Redis restarts that lost the data (persistence off or a new server)",
        )?;
        registry.register(Box::new(redis_restarts.clone()))?;
        registry.register(Box::new(redis_amnesia.clone()))?;
        for gauge in [&spool_bytes, &spool_pending, &spool_corrupt_regions] {
            registry.register(Box::new(gauge.clone()))?;
        }
        registry.register(Box::new(events_spooled.clone()))?;
        registry.register(Box::new(events_replayed.clone()))?;
        registry.register(Box::new(spool_undecodable.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(accept_seconds.clone()))?;
        registry.register(Box::new(events_accepted.clone()))?;
        registry.register(Box::new(events_rejected.clone()))?;
        registry.register(Box::new(events_duplicate.clone()))?;
        Ok(Self {
            registry,
            requests,
            accept_seconds,
            events_accepted,
            events_rejected,
            events_duplicate,
            events_spooled,
            events_replayed,
            spool_bytes,
            spool_pending,
            spool_corrupt_regions,
            spool_undecodable,
            redis_restarts,
            redis_amnesia,
        })
    }

    /// Sets the spool's gauges from what it says now.
    pub fn observe_spool(&self, spool: &Spool) {
        let stats = spool.stats();
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.spool_bytes
            .set(gauge(stats.bytes.load(Ordering::Relaxed)));
        self.spool_pending.set(gauge(spool.pending()));
        self.spool_corrupt_regions
            .set(gauge(stats.corrupt_regions.load(Ordering::Relaxed)));
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The hand-off's counters, under the names ingest always had.
impl HandoffMetrics for Metrics {
    fn spooled(&self, events: usize) {
        self.events_spooled.inc_by(events as u64);
    }

    fn replayed(&self, events: usize) {
        self.events_replayed.inc_by(events as u64);
    }

    fn undecodable(&self) {
        self.spool_undecodable.inc();
    }
}
