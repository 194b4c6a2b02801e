//! Appending events to the streams.

use std::time::Duration;

use cellmon_domain::envelope::StreamEvent;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

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
/// Cheap to clone; clones share one multiplexed connection, which
/// reconnects by itself after Redis comes back.
#[derive(Clone)]
pub struct Producer {
    conn: ConnectionManager,
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
    /// Connects to Redis at `url`. Fails when Redis cannot be reached
    /// within the timeout.
    pub async fn connect(url: &str, config: ProducerConfig) -> Result<Self, PublishError> {
        let client = redis::Client::open(url)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(1);
        let conn = tokio::time::timeout(
            config.timeout,
            ConnectionManager::new_with_config(client, manager_config),
        )
        .await
        .map_err(|_| PublishError::Timeout(config.timeout))??;
        Ok(Self { conn, config })
    }

    pub fn keys(&self) -> &StreamKeys {
        &self.config.keys
    }

    /// Whether Redis answers a PING within the timeout.
    pub async fn ping(&self) -> Result<(), PublishError> {
        let mut conn = self.conn.clone();
        let timeout = self.config.timeout;
        tokio::time::timeout(timeout, redis::cmd("PING").query_async::<String>(&mut conn))
            .await
            .map_err(|_| PublishError::Timeout(timeout))??;
        Ok(())
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
        let mut conn = self.conn.clone();
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
