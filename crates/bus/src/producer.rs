//! Appending events to the streams.

use std::sync::Arc;
use std::time::Duration;

use cellmon_domain::envelope::StreamEvent;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::codec;
use crate::keys::StreamKeys;

/// How the producer talks to Redis.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    pub keys: StreamKeys,
    /// Longest a publish may take, connecting included. Past it the caller
    /// must treat the events as not handed off (spool them or answer 503).
    pub timeout: Duration,
}

/// Why events were not handed off. Some of them may still have reached
/// Redis (a pipeline is not a transaction); a retry then adds duplicates,
/// which every consumer drops by event id.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("Redis did not acknowledge within {0:?}")]
    Timeout(Duration),
    #[error("Redis refused or failed: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("event could not be encoded: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Appends events to their students' shards with pipelined `XADD`.
///
/// Cheap to clone; clones share one multiplexed connection, made on first
/// use (so a server can start while Redis is down) and remade by itself
/// after Redis comes back. One connection attempt runs at a time; while it
/// runs, or shortly after one failed, callers fail at once instead of
/// queueing behind it, so every call ends within its timeout.
#[derive(Clone)]
pub struct Producer {
    client: redis::Client,
    slot: Arc<Mutex<Slot>>,
    config: ProducerConfig,
}

#[derive(Default)]
struct Slot {
    conn: Option<ConnectionManager>,
    last_failure: Option<Instant>,
}

/// How long the first receive time of an event without a client time is
/// remembered; retries of it within this window are one event.
pub const FIRST_SEEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// After a failed connection attempt, calls fail at once for this long.
const RETRY_PAUSE: Duration = Duration::from_millis(250);

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("config", &self.config)
            .finish()
    }
}

impl Producer {
    /// A producer for Redis at `url`; connects on first use.
    pub fn new(url: &str, config: ProducerConfig) -> Result<Self, PublishError> {
        Ok(Self {
            client: redis::Client::open(url)?,
            slot: Arc::new(Mutex::new(Slot::default())),
            config,
        })
    }

    /// A producer that has connected once already.
    pub async fn connect(url: &str, config: ProducerConfig) -> Result<Self, PublishError> {
        let producer = Self::new(url, config)?;
        producer.connection(producer.deadline()).await?;
        Ok(producer)
    }

    pub fn keys(&self) -> &StreamKeys {
        &self.config.keys
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.config.timeout
    }

    fn timed_out(&self) -> PublishError {
        PublishError::Timeout(self.config.timeout)
    }

    async fn connection(&self, deadline: Instant) -> Result<ConnectionManager, PublishError> {
        let mut slot = tokio::time::timeout_at(deadline, self.slot.lock())
            .await
            .map_err(|_| self.timed_out())?;
        if let Some(conn) = &slot.conn {
            return Ok(conn.clone());
        }
        if slot.last_failure.is_some_and(|t| t.elapsed() < RETRY_PAUSE) {
            return Err(self.timed_out());
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(remaining))
            .set_response_timeout(Some(self.config.timeout))
            .set_number_of_retries(1);
        let attempt = tokio::time::timeout_at(
            deadline,
            ConnectionManager::new_with_config(self.client.clone(), manager_config),
        )
        .await;
        match attempt {
            Ok(Ok(conn)) => {
                slot.conn = Some(conn.clone());
                slot.last_failure = None;
                Ok(conn)
            }
            Ok(Err(error)) => {
                slot.last_failure = Some(Instant::now());
                Err(self.classify(error))
            }
            Err(_) => {
                slot.last_failure = Some(Instant::now());
                Err(self.timed_out())
            }
        }
    }

    fn classify(&self, error: redis::RedisError) -> PublishError {
        // The connection's own response timeout: the same outcome.
        if error.is_timeout() {
            self.timed_out()
        } else {
            PublishError::Redis(error)
        }
    }

    /// Runs `cmd` within one deadline that covers connecting too.
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, PublishError> {
        let deadline = self.deadline();
        let mut conn = self.connection(deadline).await?;
        tokio::time::timeout_at(deadline, cmd.query_async::<T>(&mut conn))
            .await
            .map_err(|_| self.timed_out())?
            .map_err(|e| self.classify(e))
    }

    /// Whether Redis answers a PING within the timeout.
    pub async fn ping(&self) -> Result<(), PublishError> {
        self.query::<String>(&redis::cmd("PING")).await.map(|_| ())
    }

    /// The `run_id` of the Redis server: it changes whenever Redis restarts.
    pub async fn run_id(&self) -> Result<String, PublishError> {
        let mut cmd = redis::cmd("INFO");
        cmd.arg("server");
        let info: String = self.query(&cmd).await?;
        info.lines()
            .find_map(|line| line.strip_prefix("run_id:"))
            .map(|id| id.trim().to_owned())
            .ok_or_else(|| {
                PublishError::Redis(redis::RedisError::from((
                    redis::ErrorKind::UnexpectedReturnType,
                    "INFO server has no run_id",
                )))
            })
    }

    /// Sets this deployment's marker key unless it exists; returns whether
    /// it existed. Nothing else writes or deletes it, so after a Redis
    /// restart a missing marker means Redis came back without its data.
    pub async fn ensure_marker(&self) -> Result<bool, PublishError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.config.keys.marker()).arg("1").arg("NX");
        let set: Option<String> = self.query(&cmd).await?;
        Ok(set.is_none())
    }

    /// Appends every event, in order within each shard, and returns the
    /// entry ids once Redis acknowledged all of them, all within one
    /// deadline.
    ///
    /// An event without a client time is ordered and stored by its receive
    /// time, which would differ between a client's retries of it. So the
    /// first receive time of each such event id is kept in Redis for
    /// [`FIRST_SEEN_TTL`] (`SET NX GET`) and every later copy carries that
    /// one: all copies are then the same event to every sink (InfluxDB in
    /// particular, where the time is part of a point's identity).
    pub async fn publish(&self, events: &[StreamEvent]) -> Result<Vec<String>, PublishError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let deadline = self.deadline();
        let keys = &self.config.keys;
        let timeless: Vec<usize> = (0..events.len())
            .filter(|&i| events[i].event.client_time.is_none())
            .collect();
        let mut adjusted = std::borrow::Cow::Borrowed(events);
        if !timeless.is_empty() {
            let mut pipe = redis::pipe();
            for &i in &timeless {
                let event = &events[i].event;
                let received = event
                    .received_at
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default();
                pipe.cmd("SET")
                    .arg(keys.first_seen(&event.id))
                    .arg(received)
                    .arg("NX")
                    .arg("GET")
                    .arg("EX")
                    .arg(FIRST_SEEN_TTL.as_secs());
            }
            let mut conn = self.connection(deadline).await?;
            let earlier: Vec<Option<String>> =
                tokio::time::timeout_at(deadline, pipe.query_async(&mut conn))
                    .await
                    .map_err(|_| self.timed_out())?
                    .map_err(|e| self.classify(e))?;
            for (&i, first) in timeless.iter().zip(earlier) {
                let first = first.and_then(|t| {
                    time::OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339)
                        .ok()
                });
                if let Some(first) = first {
                    adjusted.to_mut()[i].event.received_at = first;
                }
            }
        }
        let events: &[StreamEvent] = &adjusted;
        let mut pipe = redis::pipe();
        for event in events {
            let shard = keys.shard_for(event.class_id, &event.event.student.key);
            let cmd = pipe.cmd("XADD").arg(keys.events(shard)).arg("*");
            for (name, value) in codec::encode(event)? {
                cmd.arg(name).arg(value);
            }
        }
        let mut conn = self.connection(deadline).await?;
        tokio::time::timeout_at(deadline, pipe.query_async::<Vec<String>>(&mut conn))
            .await
            .map_err(|_| self.timed_out())?
            .map_err(|e| self.classify(e))
    }
}
