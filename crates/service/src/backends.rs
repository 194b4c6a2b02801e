//! The settings every binary writes the same way: the backends it talks
//! to and where it listens. A binary nests them under its own keys
//! (`redis`, `postgres`, `influx`, `listen`), sets its own defaults with
//! struct update syntax, and calls their `validate` under those keys:
//!
//! ```
//! use std::time::Duration;
//! use cellmon_service::{Invalid, RedisSettings};
//!
//! let redis = RedisSettings { timeout: Duration::ZERO, ..RedisSettings::default() };
//! let problem = redis.validate().map_err(|e| e.within("redis")).unwrap_err();
//! assert_eq!(problem.to_string(), "redis.timeout: must be longer than 0s");
//! # let _: Invalid = problem;
//! ```
//!
//! Secrets (URLs that may carry a password, tokens) are [`SecretString`]s:
//! never printed, never serialized. A secret left out of the file and the
//! environment takes the type's default below, not the binary's, so the
//! defaults of secrets are the same for every binary.

use std::net::SocketAddr;
use std::time::Duration;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use crate::settings::{Invalid, check};

/// A Redis server (`redis.*`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSettings {
    /// `redis://[user:password@]host:port/`. Secret: it may carry a
    /// password.
    #[serde(skip_serializing)]
    pub url: SecretString,
    /// The prefix of every key (streams, live channels, histories); every
    /// binary of one deployment uses the same.
    pub prefix: String,
    /// Longest a connection attempt or a command may take.
    #[serde(with = "crate::duration")]
    pub timeout: Duration,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: SecretString::from("redis://127.0.0.1:6379/"),
            prefix: "cellmon:".into(),
            timeout: Duration::from_secs(2),
        }
    }
}

impl RedisSettings {
    /// Keys relative to this table (`url`, `timeout`).
    pub fn validate(&self) -> Result<(), Invalid> {
        check::secret_set("url", &self.url)?;
        check::not_zero("timeout", self.timeout)
    }
}

/// A Postgres database (`postgres.*`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresSettings {
    /// `postgres://user[:password]@host:port/database`. Secret.
    #[serde(skip_serializing)]
    pub url: SecretString,
    /// Most connections in the pool.
    pub max_connections: u32,
    /// Longest a statement or a connection attempt may take.
    #[serde(with = "crate::duration")]
    pub timeout: Duration,
}

impl Default for PostgresSettings {
    fn default() -> Self {
        Self {
            url: SecretString::from("postgres://postgres@127.0.0.1:5432/cellmon"),
            max_connections: 8,
            timeout: Duration::from_secs(5),
        }
    }
}

impl PostgresSettings {
    /// Keys relative to this table (`url`, `max_connections`, `timeout`).
    pub fn validate(&self) -> Result<(), Invalid> {
        check::secret_set("url", &self.url)?;
        check::at_least_one("max_connections", self.max_connections)?;
        check::not_zero("timeout", self.timeout)
    }
}

/// An InfluxDB server, spoken to through its v1 HTTP API (`influx.*`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InfluxSettings {
    /// The base URL, e.g. `http://127.0.0.1:8086`.
    pub url: String,
    pub database: String,
    /// The token of InfluxDB 2.x or 3.x for its v1 compatibility API;
    /// none for 1.x without authentication. Secret.
    #[serde(skip_serializing)]
    pub token: Option<SecretString>,
    /// Longest a write or a query may take.
    #[serde(with = "crate::duration")]
    pub timeout: Duration,
}

impl Default for InfluxSettings {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8086".into(),
            database: "cellmon".into(),
            token: None,
            timeout: Duration::from_secs(10),
        }
    }
}

impl InfluxSettings {
    /// Keys relative to this table (`url`, `database`, `token`, `timeout`).
    pub fn validate(&self) -> Result<(), Invalid> {
        check::not_empty("url", &self.url)?;
        check::not_empty("database", &self.database)?;
        check::optional_secret_set("token", self.token.as_ref())?;
        check::not_zero("timeout", self.timeout)
    }
}

/// Where a server listens (`listen.*`). A table rather than one address,
/// so that a separate address for metrics can join it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenSettings {
    /// The address of the HTTP (and WebSocket) server, e.g. `0.0.0.0:8081`.
    pub addr: SocketAddr,
    /// A separate address for `GET /metrics`, e.g. `127.0.0.1:9100`, so
    /// metrics are not on the public port; unset (the default), the main
    /// address serves them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SocketAddr>,
}

impl ListenSettings {
    /// All interfaces, on `port`.
    pub fn port(port: u16) -> Self {
        Self {
            addr: SocketAddr::from(([0, 0, 0, 0], port)),
            metrics: None,
        }
    }
}
