//! Appending events to the streams.

use std::sync::Arc;
use std::time::Duration;

use cellmon_domain::envelope::StreamEvent;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::OnceCell;

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
/// after Redis comes back.
#[derive(Clone)]
pub struct Producer {
    client: redis::Client,
    conn: Arc<OnceCell<ConnectionManager>>,
    config: ProducerConfig,
}

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
            conn: Arc::new(OnceCell::new()),
            config,
        })
    }

    /// A producer that has connected once already.
    pub async fn connect(url: &str, config: ProducerConfig) -> Result<Self, PublishError> {
        let producer = Self::new(url, config)?;
        producer.connection().await?;
        Ok(producer)
    }

    async fn connection(&self) -> Result<ConnectionManager, PublishError> {
        let timeout = self.config.timeout;
        let conn = self
            .conn
            .get_or_try_init(|| async {
                let manager_config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(1);
                tokio::time::timeout(
                    timeout,
                    ConnectionManager::new_with_config(self.client.clone(), manager_config),
                )
                .await
                .map_err(|_| PublishError::Timeout(timeout))?
                .map_err(PublishError::from)
            })
            .await?;
        Ok(conn.clone())
    }

    pub fn keys(&self) -> &StreamKeys {
        &self.config.keys
    }

    /// Whether Redis answers a PING within the timeout.
    pub async fn ping(&self) -> Result<(), PublishError> {
        let mut conn = self.connection().await?;
        let timeout = self.config.timeout;
        tokio::time::timeout(timeout, redis::cmd("PING").query_async::<String>(&mut conn))
            .await
            .map_err(|_| PublishError::Timeout(timeout))??;
        Ok(())
    }

    /// The `run_id` of the Redis server: it changes whenever Redis restarts.
    pub async fn run_id(&self) -> Result<String, PublishError> {
        let mut conn = self.connection().await?;
        let timeout = self.config.timeout;
        let info: String = tokio::time::timeout(
            timeout,
            redis::cmd("INFO").arg("server").query_async(&mut conn),
        )
        .await
        .map_err(|_| PublishError::Timeout(timeout))??;
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
        let mut conn = self.connection().await?;
        let timeout = self.config.timeout;
        let set: Option<String> = tokio::time::timeout(
            timeout,
            redis::cmd("SET")
                .arg(self.config.keys.marker())
                .arg("1")
                .arg("NX")
                .query_async(&mut conn),
        )
        .await
        .map_err(|_| PublishError::Timeout(timeout))??;
        Ok(set.is_none())
    }

    /// Appends every event, in order within each shard, and returns the
    /// entry ids once Redis acknowledged all of them.
    pub async fn publish(&self, events: &[StreamEvent]) -> Result<Vec<String>, PublishError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let keys = &self.config.keys;
        let mut pipe = redis::pipe();
        for event in events {
            let shard = keys.shard_for(event.class_id, &event.event.student.key);
            let cmd = pipe.cmd("XADD").arg(keys.events(shard)).arg("*");
            for (name, value) in codec::encode(event)? {
                cmd.arg(name).arg(value);
            }
        }
        let mut conn = self.connection().await?;
        let timeout = self.config.timeout;
        tokio::time::timeout(timeout, pipe.query_async::<Vec<String>>(&mut conn))
            .await
            .map_err(|_| PublishError::Timeout(timeout))?
            .map_err(|e| {
                // The connection's own response timeout: the same outcome.
                if e.is_timeout() {
                    PublishError::Timeout(timeout)
                } else {
                    PublishError::Redis(e)
                }
            })
    }
}
