//! The durable hand-off, ARCHITECTURE.md rule 1, in one place: an event is
//! acknowledged to a client only once Redis acknowledged it (AOF on) or it
//! is fsync'd in the local spool.
//!
//! * [`Handoff::hand_off`]: publish to Redis within the producer's timeout;
//!   if Redis does not take the events (down, slower than the timeout,
//!   refusing), append them to the spool and wait for the fsync; if the
//!   spool cannot take them either (full, failing), a typed
//!   [`HandoffError`]: the caller answers "unavailable" and acknowledges
//!   nothing. A publish that timed out may still have reached Redis; the
//!   spooled copy then arrives a second time, which every consumer drops by
//!   event id.
//! * [`Handoff::run_replayer`]: for the life of the server, spooled events
//!   go to Redis in order, and a spool record is acknowledged only once
//!   Redis acknowledged its event. [`Handoff::drain`] does the same until a
//!   deadline, at shutdown; what is left waits on disk for the next start.
//! * [`Handoff::accepting`]: whether events could be acknowledged now (the
//!   readiness of a server that takes events).
//!
//! What it did is reported through [`HandoffMetrics`], a trait whose
//! methods do nothing by default, so the bus needs no metrics library and
//! the server keeps its own metric names. The spool's gauges (bytes,
//! pending records, damage found at opening) are read from
//! [`Spool::stats`] whenever they are wanted.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cellmon_domain::envelope::StreamEvent;

use crate::producer::{Producer, PublishError};
use crate::spool::record::{self, RecordError};
use crate::spool::{Spool, SpoolConfig, SpoolError};

/// Records per replay round trip, and about how many bytes: a round must
/// fit well within the Redis timeout.
const REPLAY_BATCH: usize = 500;
const REPLAY_BYTES: usize = 1024 * 1024;
/// How often an idle replayer looks at the spool.
const IDLE_POLL: Duration = Duration::from_millis(100);
/// Pause when records are counted as pending but not readable yet (their
/// fsync is being published), so the replayer does not spin.
const NOT_YET_READABLE: Duration = Duration::from_millis(50);
/// The replayer's backoff while Redis is away.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// What the hand-off reports as it works. Every method does nothing unless
/// the server overrides it.
pub trait HandoffMetrics: Send + Sync + std::fmt::Debug {
    /// `events` went to the spool because Redis did not take them.
    fn spooled(&self, events: usize) {
        let _ = events;
    }

    /// `events` spooled earlier were handed to Redis.
    fn replayed(&self, events: usize) {
        let _ = events;
    }

    /// A spooled record with a valid checksum was not an event and was
    /// dropped (a bug, or a file that is not ours; never retried).
    fn undecodable(&self) {}
}

/// [`HandoffMetrics`] that counts nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoMetrics;

impl HandoffMetrics for NoMetrics {}

/// Where accepted events went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandedOff {
    /// Redis acknowledged every one.
    Redis,
    /// Redis did not take them; they are fsync'd in the spool and reach
    /// Redis later.
    Spooled,
}

/// Why events were not handed off: neither Redis nor the spool took them.
/// Nothing of them may be acknowledged to the client.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("Redis did not take the events ({redis}) and the spool is full")]
    SpoolFull {
        redis: PublishError,
        #[source]
        spool: SpoolError,
    },
    #[error("Redis did not take the events ({redis}) and the spool failed")]
    SpoolFailed {
        redis: PublishError,
        #[source]
        spool: SpoolError,
    },
    #[error("Redis did not take the events ({redis}) and one could not be encoded for the spool")]
    Encode {
        redis: PublishError,
        #[source]
        record: RecordError,
    },
}

/// Whether events could be acknowledged now.
#[derive(Debug)]
pub enum Accepting {
    /// Redis answers.
    Redis,
    /// Redis does not answer, but the spool has room.
    SpoolOnly(PublishError),
    /// Redis does not answer and the last append found the spool full.
    No(PublishError),
}

/// Why a replay round stopped; the records stay in the spool.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("reading or acknowledging the spool failed")]
    Spool(#[from] SpoolError),
    #[error("Redis did not take the spooled events")]
    Redis(#[from] PublishError),
    #[error("the spool's blocking task failed")]
    Blocking(#[from] tokio::task::JoinError),
}

/// Redis first, the spool second. Cheap to clone; clones share the
/// producer's connection and the spool.
#[derive(Debug, Clone)]
pub struct Handoff {
    producer: Producer,
    spool: Spool,
    metrics: Arc<dyn HandoffMetrics>,
}

impl Handoff {
    /// Opens the spool (recovering what a crash left; refused with
    /// [`SpoolError::Locked`] while another process has its directory) in
    /// front of `producer`.
    pub async fn open(
        producer: Producer,
        spool: SpoolConfig,
        metrics: Arc<dyn HandoffMetrics>,
    ) -> Result<Self, SpoolError> {
        let spool = tokio::task::spawn_blocking(move || Spool::open(spool))
            .await
            .map_err(|e| SpoolError::Io(std::io::Error::other(e)))??;
        Ok(Self {
            producer,
            spool,
            metrics,
        })
    }

    pub fn producer(&self) -> &Producer {
        &self.producer
    }

    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// Hands `events` off durably: Redis, else the spool, else an error.
    pub async fn hand_off(&self, events: &[StreamEvent]) -> Result<HandedOff, HandoffError> {
        let redis = match self.producer.publish(events).await {
            Ok(_) => return Ok(HandedOff::Redis),
            Err(error) => error,
        };
        tracing::debug!(error = %redis, events = events.len(), "Redis did not take the events; spooling");
        let mut records = Vec::with_capacity(events.len());
        for event in events {
            match record::encode(event) {
                Ok(record) => records.push(record),
                Err(record) => return Err(HandoffError::Encode { redis, record }),
            }
        }
        match self.spool.append(records).await {
            Ok(_) => {
                self.metrics.spooled(events.len());
                Ok(HandedOff::Spooled)
            }
            Err(spool @ SpoolError::Full { .. }) => Err(HandoffError::SpoolFull { redis, spool }),
            Err(spool) => Err(HandoffError::SpoolFailed { redis, spool }),
        }
    }

    /// Whether events could be acknowledged now: Redis answers a PING
    /// within its timeout, or else the spool has room.
    pub async fn accepting(&self) -> Accepting {
        match self.producer.ping().await {
            Ok(()) => Accepting::Redis,
            Err(error) if self.spool.is_full() => Accepting::No(error),
            Err(error) => Accepting::SpoolOnly(error),
        }
    }

    /// One replay round: up to a batch of spooled events to Redis. Returns
    /// how many records it delivered (0 when none were readable).
    pub async fn replay_once(&self) -> Result<usize, ReplayError> {
        let spool = self.spool.clone();
        let records =
            tokio::task::spawn_blocking(move || spool.read_pending(REPLAY_BATCH, REPLAY_BYTES))
                .await??;
        let Some(&(last_seq, _)) = records.last() else {
            return Ok(0);
        };
        let mut events = Vec::with_capacity(records.len());
        for (seq, data) in &records {
            match record::decode(data) {
                Ok(event) => events.push(event),
                Err(error) => {
                    tracing::error!(seq, error = %error, cause = ?std::error::Error::source(&error), "spooled record is not an event; dropped");
                    self.metrics.undecodable();
                }
            }
        }
        self.producer.publish(&events).await?;
        let count = records.len() as u64;
        let spool = self.spool.clone();
        tokio::task::spawn_blocking(move || spool.ack(last_seq, count)).await??;
        self.metrics.replayed(events.len());
        Ok(records.len())
    }

    /// Replays until the spool is empty or `deadline` passes (at shutdown).
    pub async fn drain(&self, deadline: Instant) {
        while Instant::now() < deadline && self.spool.pending() > 0 {
            match self.replay_once().await {
                Ok(0) => return,
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, left = self.spool.pending(), "spool drain stopped");
                    return;
                }
            }
        }
    }

    /// Replays for as long as the server runs: whenever the spool holds
    /// events, sends them to Redis, backing off while Redis is away. Returns
    /// once `stop` resolves (never in the middle of a round).
    pub async fn run_replayer(&self, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        let mut backoff = RETRY_FIRST;
        loop {
            let pause = if self.spool.pending() == 0 {
                IDLE_POLL
            } else {
                match self.replay_once().await {
                    Ok(0) => NOT_YET_READABLE,
                    Ok(_) => {
                        backoff = RETRY_FIRST;
                        Duration::ZERO
                    }
                    Err(error) => {
                        tracing::debug!(%error, pending = self.spool.pending(), "replay failed; will retry");
                        let pause = backoff;
                        backoff = (backoff * 2).min(RETRY_MAX);
                        pause
                    }
                }
            };
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }
}
