//! The local spool's two sides: writing events Redis could not take, and
//! replaying them to Redis, in order, acknowledging only what Redis took.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cellmon_domain::envelope::StreamEvent;

use crate::AppState;
use crate::error::ApiError;

/// Records per replay round trip, and about how many bytes: a round must
/// fit well within the Redis timeout.
const REPLAY_BATCH: usize = 500;
const REPLAY_BYTES: usize = 1024 * 1024;

/// Writes `events` to the spool durably, or says why the request must get
/// 503 (spool full or failing).
pub(crate) async fn spool(state: &AppState, events: &[StreamEvent]) -> Result<(), ApiError> {
    let mut records = Vec::with_capacity(events.len());
    for event in events {
        records.push(serde_json::to_vec(event).map_err(|e| {
            tracing::error!(error = %e, "event could not be encoded for the spool");
            ApiError::Unavailable
        })?);
    }
    match state.spool.append(records).await {
        Ok(_) => {
            state.metrics.events_spooled.inc_by(events.len() as u64);
            refresh_gauges(state);
            Ok(())
        }
        Err(error) => {
            tracing::warn!(%error, "spool refused events; answering 503");
            Err(ApiError::Unavailable)
        }
    }
}

pub(crate) fn refresh_gauges(state: &AppState) {
    let stats = state.spool.stats();
    state
        .metrics
        .spool_bytes
        .set(i64::try_from(stats.bytes.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
    state
        .metrics
        .spool_pending
        .set(i64::try_from(state.spool.pending()).unwrap_or(i64::MAX));
}

/// One replay round: up to a batch of spooled events to Redis. Returns how
/// many were delivered (0 when the spool is empty).
async fn replay_once(state: &AppState) -> anyhow::Result<usize> {
    let spool = state.spool.clone();
    let records =
        tokio::task::spawn_blocking(move || spool.read_pending(REPLAY_BATCH, REPLAY_BYTES))
            .await??;
    let Some(&(last_seq, _)) = records.last() else {
        return Ok(0);
    };
    let mut events = Vec::with_capacity(records.len());
    for (seq, data) in &records {
        match serde_json::from_slice::<StreamEvent>(data) {
            Ok(event) => events.push(event),
            Err(error) => {
                // A valid checksum over something that is not an event: a
                // bug or a foreign file. Counted and skipped, never retried.
                tracing::error!(seq, %error, "spooled record is not an event; dropped");
                state.metrics.spool_undecodable.inc();
            }
        }
    }
    state.producer.publish(&events).await?;
    let count = records.len() as u64;
    let spool = state.spool.clone();
    tokio::task::spawn_blocking(move || spool.ack(last_seq, count)).await??;
    state.metrics.events_replayed.inc_by(events.len() as u64);
    refresh_gauges(state);
    Ok(records.len())
}

/// Replays until the spool is empty or `deadline` passes.
pub(crate) async fn drain(state: &AppState, deadline: Instant) {
    while Instant::now() < deadline && state.spool.pending() > 0 {
        match replay_once(state).await {
            Ok(0) => return,
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, left = state.spool.pending(), "spool drain stopped");
                return;
            }
        }
    }
}

/// Runs for the life of the server: whenever the spool holds events, send
/// them to Redis; back off while Redis is away.
pub(crate) async fn run(state: AppState) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if state.spool.pending() == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        match replay_once(&state).await {
            // Counted as pending but not readable yet: do not spin.
            Ok(0) => tokio::time::sleep(Duration::from_millis(50)).await,
            Ok(_) => backoff = Duration::from_millis(100),
            Err(error) => {
                tracing::debug!(%error, pending = state.spool.pending(), "replay failed; will retry");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Watches Redis's identity: a changed `run_id` is a restart, and a restart
/// whose marker key is gone is amnesia (Redis came back without its data:
/// persistence off, or a new server at the same address). Both are counted
/// and logged; the server goes on (streams are recreated by the next XADD,
/// consumer groups by the persisters).
pub(crate) async fn watch_redis(state: AppState) {
    let mut known: Option<String> = None;
    let mut tick =
        tokio::time::interval(Duration::from_millis(state.config.redis_watch_ms.max(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok(run_id) = state.producer.run_id().await else {
            continue;
        };
        let restarted = known.as_ref().is_some_and(|old| *old != run_id);
        let Ok(marker_existed) = state.producer.ensure_marker().await else {
            continue;
        };
        if restarted {
            state.metrics.redis_restarts.inc();
            if marker_existed {
                tracing::warn!(%run_id, "Redis restarted with its data");
            } else {
                state.metrics.redis_amnesia.inc();
                tracing::error!(
                    %run_id,
                    "Redis restarted WITHOUT its data: events it had acknowledged are gone \
                     from Redis; check its persistence (appendonly yes)"
                );
            }
        }
        known = Some(run_id);
    }
}
