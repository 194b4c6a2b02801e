//! Readiness: whether this persister persists right now.
//!
//! Ready (200) when Redis answers and every sink consumes and its backend
//! answers; otherwise 503, with a JSON body that names each check and, for
//! a failing one, why:
//!
//! ```json
//! {"ready": false, "checks": [
//!   {"name": "redis", "ok": true},
//!   {"name": "pg", "ok": false, "error": "no answer within 3s"},
//!   {"name": "influx", "ok": true}]}
//! ```
//!
//! A sink's state comes from its task (not consuming yet, and why; or its
//! last write failed, and why), and its backend is also probed on each
//! request, so an idle sink whose backend went away shows too. Every check
//! is bounded by its backend's timeout and they run at once: a readiness
//! request takes at most the longest of them.

use std::error::Error;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::future::join_all;
use redis::aio::ConnectionManager;
use serde::Serialize;

use crate::sink::Probe;

/// What the sink's task last said.
#[derive(Debug, Clone)]
enum SinkState {
    /// Not consuming yet: preparing its backend or joining its group.
    Starting(String),
    Consuming,
    /// Its last write (or read) failed; it is retrying.
    Failing(String),
}

/// One sink's health, written by its task and read by the readiness route.
#[derive(Debug)]
pub(crate) struct SinkHealth {
    name: &'static str,
    state: Mutex<SinkState>,
    probe: Probe,
}

/// `error` and its causes, `: `-separated, for a readiness answer or a
/// reason string.
pub(crate) fn describe(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(next) = cause {
        let next_text = next.to_string();
        // Some errors repeat their source in their own message.
        if !text.ends_with(&next_text) {
            text.push_str(": ");
            text.push_str(&next_text);
        }
        cause = next.source();
    }
    text
}

impl SinkHealth {
    pub(crate) fn new(name: &'static str, probe: Probe) -> Arc<Self> {
        Arc::new(Self {
            name,
            state: Mutex::new(SinkState::Starting("starting".into())),
            probe,
        })
    }

    fn state(&self) -> MutexGuard<'_, SinkState> {
        // Every update is one assignment: a poisoned lock holds a whole
        // value still.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Not consuming yet, because of `error`.
    pub(crate) fn starting(&self, what: &str, error: &dyn Error) {
        *self.state() = SinkState::Starting(format!("{what}: {}", describe(error)));
    }

    /// The backend (or Redis) answered.
    pub(crate) fn consuming(&self) {
        *self.state() = SinkState::Consuming;
    }

    /// The last write or read failed with `error`.
    pub(crate) fn failing(&self, what: &str, error: &dyn Error) {
        *self.state() = SinkState::Failing(format!("{what}: {}", describe(error)));
    }

    async fn check(&self) -> Check {
        let state = self.state().clone();
        let error = match state {
            SinkState::Starting(why) => Some(format!("not consuming yet ({why})")),
            SinkState::Failing(why) => Some(why),
            SinkState::Consuming => self.probe.run().await.err().map(|e| describe(&e)),
        };
        Check::new(self.name, error)
    }
}

/// One line of the readiness answer.
#[derive(Debug, Serialize)]
pub(crate) struct Check {
    name: &'static str,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl Check {
    fn new(name: &'static str, error: Option<String>) -> Self {
        Self {
            name,
            ok: error.is_none(),
            error,
        }
    }
}

/// The readiness answer's body.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub(crate) ready: bool,
    checks: Vec<Check>,
}

/// Everything readiness looks at.
#[derive(Debug, Clone)]
pub(crate) struct Readiness {
    redis: ConnectionManager,
    redis_timeout: Duration,
    sinks: Vec<Arc<SinkHealth>>,
}

impl Readiness {
    pub(crate) fn new(
        redis: ConnectionManager,
        redis_timeout: Duration,
        sinks: Vec<Arc<SinkHealth>>,
    ) -> Self {
        Self {
            redis,
            redis_timeout,
            sinks,
        }
    }

    async fn check_redis(&self) -> Check {
        let mut redis = self.redis.clone();
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut redis);
        let error = match tokio::time::timeout(self.redis_timeout, ping).await {
            Ok(Ok(_)) => None,
            Ok(Err(error)) => Some(describe(&error)),
            Err(_) => Some(format!("no answer within {:?}", self.redis_timeout)),
        };
        Check::new("redis", error)
    }

    /// Runs every check at once.
    pub(crate) async fn report(&self) -> Report {
        let sinks = self.sinks.iter().map(|sink| sink.check());
        let (redis, sinks) = tokio::join!(self.check_redis(), join_all(sinks));
        let mut checks = vec![redis];
        checks.extend(sinks);
        Report {
            ready: checks.iter().all(|c| c.ok),
            checks,
        }
    }
}
