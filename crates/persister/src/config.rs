//! The persister's configuration: defaults, then an optional TOML file,
//! then `CELLMON_PERSISTER_*` environment variables (e.g.
//! `CELLMON_PERSISTER_POSTGRES_URL`). Values that cannot work (a batch of
//! nothing, no delivery allowed, a zero timeout) are refused at load, with
//! the setting's name, and the binary exits with status 64.

use std::net::SocketAddr;
use std::num::{NonZeroU16, NonZeroUsize};
use std::path::Path;
use std::time::Duration;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

/// Everything the persister needs. Tests build it directly.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where `main` serves health and metrics (tests pass their own
    /// listener).
    pub listen: SocketAddr,
    /// Redis with the event streams (`redis://host:6379/`). Secret: it may
    /// carry a password. Never serialized.
    #[serde(skip_serializing)]
    pub redis_url: SecretString,
    /// Prefix of every Redis key; the ingest server's.
    pub stream_prefix: String,
    /// Number of event streams (shards); the ingest server's.
    pub stream_shards: NonZeroU16,
    /// Longest one Redis call may take (connecting, acknowledging,
    /// reclaiming, publishing live updates, trimming); a read's blocking
    /// wait for new entries comes on top.
    pub redis_timeout_ms: u64,
    /// Postgres (`postgres://user@host:5432/db`). Secret; never serialized.
    #[serde(skip_serializing)]
    pub postgres_url: SecretString,
    pub postgres_max_connections: u32,
    /// Longest a Postgres statement or connection attempt may take. A
    /// whole batch may take ten times this (it is about ten statements).
    pub postgres_timeout_ms: u64,
    /// Apply the schema's migrations at start-up.
    pub migrate: bool,
    /// InfluxDB base URL (v1 HTTP API).
    pub influx_url: String,
    pub influx_database: String,
    /// InfluxDB 2.x/3.x token for the v1 compatibility API. Never serialized.
    #[serde(skip_serializing)]
    pub influx_token: Option<SecretString>,
    pub influx_timeout_ms: u64,
    /// A batch is written at this many events ...
    pub batch_max: NonZeroUsize,
    /// ... or this long after its first event arrived.
    pub batch_wait_ms: u64,
    /// Entries another consumer has held this long unacknowledged are
    /// taken over (its process died or hangs). A live consumer keeps its
    /// entries claimed every third of this.
    pub claim_idle_ms: u64,
    /// How often to look for such entries.
    pub claim_interval_ms: u64,
    /// The most times an entry is delivered; past it, the entry goes to the
    /// dead-letter stream untried. The rule is defined once, in
    /// `cellmon_bus::consumer` ("The delivery limit").
    pub max_deliveries: u64,
    /// First and longest pause between retries of a failing sink.
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    /// How often streams are trimmed below what every group still needs.
    pub trim_interval_ms: u64,
    /// How often students whose status can change by time alone (going
    /// idle, a help request lapsing) are recomputed, when nothing else
    /// recomputed them for that long.
    pub status_sweep_ms: u64,
    /// Longest shutdown waits for the sinks to finish the batch in hand;
    /// what they have not acknowledged by then stays pending in Redis and
    /// is reclaimed by the next persister.
    pub shutdown_grace_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8082)),
            redis_url: SecretString::from("redis://127.0.0.1:6379/"),
            stream_prefix: "cellmon:".into(),
            stream_shards: const { NonZeroU16::new(4).unwrap() },
            redis_timeout_ms: 5_000,
            postgres_url: SecretString::from("postgres://postgres@127.0.0.1:5432/cellmon"),
            postgres_max_connections: 8,
            postgres_timeout_ms: 10_000,
            migrate: true,
            influx_url: "http://127.0.0.1:8086".into(),
            influx_database: "cellmon".into(),
            influx_token: None,
            influx_timeout_ms: 10_000,
            batch_max: const { NonZeroUsize::new(2_000).unwrap() },
            batch_wait_ms: 50,
            claim_idle_ms: 30_000,
            claim_interval_ms: 5_000,
            max_deliveries: 5,
            retry_initial_ms: 100,
            retry_max_ms: 5_000,
            trim_interval_ms: 10_000,
            status_sweep_ms: 15_000,
            shutdown_grace_ms: 5_000,
        }
    }
}

impl Config {
    /// Defaults, then `file` when given, then the environment; refused
    /// when a value cannot work (see [`Self::problem`]).
    pub fn load(file: Option<&Path>) -> Result<Self, Box<figment::Error>> {
        // CELLMON_PERSISTER_CONFIG names the file; URL is what `harness up`
        // prints for clients (health and metrics).
        let config: Self = cellmon_service::load_config(
            Config::default(),
            file,
            "CELLMON_PERSISTER_",
            &["config", "url"],
        )?;
        match config.problem() {
            Some(problem) => Err(Box::new(figment::Error::from(problem.to_owned()))),
            None => Ok(config),
        }
    }

    /// What makes these settings unusable, if anything. Checked once, at
    /// load and by [`crate::serve`], so no use site needs to clamp.
    pub fn problem(&self) -> Option<&'static str> {
        let zero = |v: u64| v == 0;
        if self.max_deliveries == 0 {
            Some("max_deliveries must be at least 1: with 0 every entry would be dead-lettered")
        } else if self.postgres_max_connections == 0 {
            Some("postgres_max_connections must be at least 1")
        } else if [
            self.redis_timeout_ms,
            self.postgres_timeout_ms,
            self.influx_timeout_ms,
        ]
        .into_iter()
        .any(zero)
        {
            Some("redis_timeout_ms, postgres_timeout_ms and influx_timeout_ms must be at least 1")
        } else if self.claim_idle_ms < 3 {
            Some(
                "claim_idle_ms must be at least 3: held entries are kept claimed every third of it",
            )
        } else if [
            self.claim_interval_ms,
            self.retry_initial_ms,
            self.trim_interval_ms,
            self.status_sweep_ms,
        ]
        .into_iter()
        .any(zero)
        {
            Some(
                "claim_interval_ms, retry_initial_ms, trim_interval_ms and status_sweep_ms must be at least 1",
            )
        } else if self.retry_max_ms < self.retry_initial_ms {
            Some("retry_max_ms must be at least retry_initial_ms")
        } else {
            None
        }
    }

    pub(crate) fn ms(value: u64) -> Duration {
        Duration::from_millis(value)
    }
}

#[cfg(test)]
#[allow(
    clippy::result_large_err,
    reason = "figment::Jail's closures must return figment's own Result"
)]
mod tests {
    use secrecy::ExposeSecret as _;

    use super::*;

    #[test]
    fn file_then_environment_and_secrets_stay_hidden() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "persister.toml",
                r#"
                postgres_url = "postgres://u:hunter2@db/cellmon"
                batch_max = 500
                "#,
            )?;
            jail.set_env("CELLMON_PERSISTER_CONFIG", "persister.toml");
            jail.set_env("CELLMON_PERSISTER_URL", "http://127.0.0.1:8082");
            jail.set_env("CELLMON_PERSISTER_BATCH_MAX", "700");
            jail.set_env("CELLMON_PERSISTER_REDIS_TIMEOUT_MS", "250");
            let config =
                Config::load(Some(Path::new("persister.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(config.batch_max.get(), 700);
            assert_eq!(config.redis_timeout_ms, 250);
            assert_eq!(config.max_deliveries, 5);
            assert!(config.postgres_url.expose_secret().contains("hunter2"));
            let debug = format!("{config:?}");
            assert!(!debug.contains("hunter2"), "{debug}");
            Ok(())
        });
    }

    #[test]
    fn unusable_values_are_refused_with_their_name() {
        for (key, value, named) in [
            ("BATCH_MAX", "0", "batch_max"),
            ("MAX_DELIVERIES", "0", "max_deliveries"),
            ("REDIS_TIMEOUT_MS", "0", "redis_timeout_ms"),
            ("RETRY_MAX_MS", "10", "retry_max_ms"),
            ("CLAIM_IDLE_MS", "1", "claim_idle_ms"),
        ] {
            figment::Jail::expect_with(|jail| {
                jail.set_env(format!("CELLMON_PERSISTER_{key}"), value);
                let error = Config::load(None).expect_err(key);
                let error = error.to_string().to_lowercase();
                assert!(error.contains(named), "{key}: {error}");
                Ok(())
            });
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("CELLMON_PERSISTER_BATCH_MAXX", "5");
            assert!(Config::load(None).is_err());
            Ok(())
        });
    }
}
