//! The ingest server's configuration: defaults, then an optional TOML file,
//! then `CELLMON_INGEST_*` environment variables (nested keys with `__`,
//! e.g. `CELLMON_INGEST_RATE_LIMIT__PER_SECOND=20`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cellmon_domain::lms::ClassId;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

/// Everything the server needs. Tests build it directly.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// What this process does: `ingest` (the events API), `persister`
    /// (Redis Streams to Postgres and InfluxDB, with only health and
    /// metrics over HTTP), or `all` (both, the one-machine deployment).
    pub role: Role,
    /// Where `main` listens (tests pass their own listener).
    pub listen: SocketAddr,
    /// Redis, with AOF on (`redis://host:6379/`). Secret: it may carry a
    /// password. Never serialized; a missing value takes the default.
    #[serde(skip_serializing)]
    pub redis_url: SecretString,
    /// Prefix of every Redis key this server writes.
    pub stream_prefix: String,
    /// Number of event streams (shards).
    pub stream_shards: u16,
    /// Longest a hand-off to Redis may take before the events are spooled.
    pub redis_timeout_ms: u64,
    /// How often the server checks whether Redis restarted (and whether it
    /// came back without its data).
    pub redis_watch_ms: u64,
    /// Most bytes of a request body as sent (compressed or not).
    pub max_body_bytes: usize,
    /// Most bytes of a request body after gzip decompression.
    pub max_decoded_body_bytes: usize,
    /// Most event requests being handled at once; beyond it, 503
    /// `overloaded`. Bounds memory: each may hold a decoded body.
    pub max_in_flight: usize,
    /// Longest a client may take to send its body.
    pub body_timeout_ms: u64,
    /// Class ingest tokens: the extension sends one as `?token=` or
    /// `Authorization: Bearer`.
    pub classes: Vec<ClassToken>,
    /// Open mode: tokenless events belong to this class. Unset: a token is
    /// required.
    pub open_class: Option<ClassId>,
    pub rate_limit: RateLimit,
    pub spool: SpoolSettings,
    pub persister: PersisterSettings,
}

/// What a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Ingest,
    Persister,
    All,
}

impl Role {
    pub fn ingests(self) -> bool {
        matches!(self, Self::Ingest | Self::All)
    }

    pub fn persists(self) -> bool {
        matches!(self, Self::Persister | Self::All)
    }
}

/// The persister: consumer groups `pg` and `influx` over the event streams.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PersisterSettings {
    /// Postgres (`postgres://user@host:5432/db`). Secret; never serialized.
    #[serde(skip_serializing)]
    pub postgres_url: SecretString,
    pub postgres_max_connections: u32,
    /// Longest a Postgres statement or connection attempt may take.
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
    pub batch_max: usize,
    /// ... or this long after its first event arrived.
    pub batch_wait_ms: u64,
    /// Entries another consumer has held this long unacknowledged are
    /// taken over (its process died or hangs).
    pub claim_idle_ms: u64,
    /// How often to look for such entries.
    pub claim_interval_ms: u64,
    /// After this many deliveries an entry goes to the dead-letter stream.
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
}

impl Default for PersisterSettings {
    fn default() -> Self {
        Self {
            postgres_url: SecretString::from("postgres://postgres@127.0.0.1:5432/cellmon"),
            postgres_max_connections: 8,
            postgres_timeout_ms: 10_000,
            migrate: true,
            influx_url: "http://127.0.0.1:8086".into(),
            influx_database: "cellmon".into(),
            influx_token: None,
            influx_timeout_ms: 10_000,
            batch_max: 2_000,
            batch_wait_ms: 50,
            claim_idle_ms: 30_000,
            claim_interval_ms: 5_000,
            max_deliveries: 5,
            retry_initial_ms: 100,
            retry_max_ms: 5_000,
            trim_interval_ms: 10_000,
            status_sweep_ms: 15_000,
        }
    }
}

/// The local spool that takes events when Redis cannot.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpoolSettings {
    /// Directory of the spool's files; one server per directory.
    pub dir: PathBuf,
    /// Most bytes on disk; beyond it requests get 503.
    pub max_bytes: u64,
    /// Size at which a segment file is closed and a new one started.
    pub segment_bytes: u64,
    /// Longest the server spends sending spooled events to Redis when it
    /// shuts down; what is left is replayed at the next start.
    pub drain_on_shutdown_ms: u64,
}

impl Default for SpoolSettings {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("data/ingest-spool"),
            max_bytes: 1024 * 1024 * 1024,
            // Replay re-reads a segment per round; small segments keep that cheap.
            segment_bytes: 8 * 1024 * 1024,
            drain_on_shutdown_ms: 5_000,
        }
    }
}

/// One class's ingest token.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassToken {
    pub class_id: ClassId,
    /// Never serialized.
    #[serde(skip_serializing)]
    pub token: SecretString,
}

/// Requests per client address.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained requests per second per client address.
    pub per_second: u32,
    /// Requests a client may send at once before the sustained rate applies.
    pub burst: u32,
}

impl Default for RateLimit {
    fn default() -> Self {
        // The extension sends about one request per cell run; a class of
        // students behind one NAT address shares this budget.
        Self {
            per_second: 200,
            burst: 400,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            role: Role::Ingest,
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            redis_url: SecretString::from("redis://127.0.0.1:6379/"),
            stream_prefix: "cellmon:".into(),
            stream_shards: 4,
            redis_timeout_ms: 500,
            redis_watch_ms: 1_000,
            max_body_bytes: 1024 * 1024,
            max_decoded_body_bytes: 8 * 1024 * 1024,
            max_in_flight: 512,
            body_timeout_ms: 30_000,
            classes: Vec::new(),
            open_class: None,
            rate_limit: RateLimit::default(),
            spool: SpoolSettings::default(),
            persister: PersisterSettings::default(),
        }
    }
}

impl Config {
    /// Defaults, then `file` when given, then the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, Box<figment::Error>> {
        // CELLMON_INGEST_CONFIG names the file; URL and TOKEN are what
        // `harness up` prints for clients.
        cellmon_service::load_config(
            Config::default(),
            file,
            "CELLMON_INGEST_",
            &["config", "url", "token"],
        )
    }

    pub fn redis_timeout(&self) -> Duration {
        Duration::from_millis(self.redis_timeout_ms)
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
    fn defaults_survive_loading() {
        figment::Jail::expect_with(|_| {
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(config.redis_url.expose_secret(), "redis://127.0.0.1:6379/");
            assert_eq!(config.stream_shards, 4);
            Ok(())
        });
    }

    #[test]
    fn file_then_environment_and_the_config_variable_is_not_a_setting() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "ingest.toml",
                r#"
                redis_url = "redis://from-file:6379/"
                stream_shards = 8
                [[classes]]
                class_id = "6f1e3a52-0c57-4d1e-a4f5-3b0b6a2d9c11"
                token = "secret-token"
                "#,
            )?;
            jail.set_env("CELLMON_INGEST_CONFIG", "ingest.toml");
            jail.set_env("CELLMON_INGEST_STREAM_SHARDS", "16");
            jail.set_env("CELLMON_INGEST_SPOOL__MAX_BYTES", "1000000");
            let config = Config::load(Some(Path::new("ingest.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(config.redis_url.expose_secret(), "redis://from-file:6379/");
            assert_eq!(config.stream_shards, 16);
            assert_eq!(config.spool.max_bytes, 1_000_000);
            assert_eq!(config.classes[0].token.expose_secret(), "secret-token");
            // Debug output never shows secrets.
            let debug = format!("{config:?}");
            assert!(
                !debug.contains("secret-token") && !debug.contains("from-file"),
                "{debug}"
            );
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("CELLMON_INGEST_REDIS_TIMOUT_MS", "5");
            assert!(Config::load(None).is_err());
            Ok(())
        });
    }
}
