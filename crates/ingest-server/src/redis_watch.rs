//! Watches Redis's identity: a changed `run_id` is a restart, and a restart
//! whose marker key is gone is amnesia (Redis came back without its data:
//! persistence off, or a new server at the same address). Both are counted
//! and logged; the server goes on (streams are recreated by the next XADD,
//! consumer groups by the persisters).

use tokio_util::sync::CancellationToken;

use crate::AppState;

/// Runs until `stop` is cancelled.
pub(crate) async fn run(state: AppState, stop: CancellationToken) {
    let producer = state.handoff.producer();
    let mut known: Option<String> = None;
    let mut tick = tokio::time::interval(state.config.redis_watch);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(run_id) = producer.run_id().await else {
            continue;
        };
        let restarted = known.as_ref().is_some_and(|old| *old != run_id);
        let Ok(marker_existed) = producer.ensure_marker().await else {
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
