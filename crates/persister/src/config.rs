//! The persister's configuration: defaults, then an optional TOML file,
//! then `CELLMON_PERSISTER_*` environment variables, nested with `__`
//! (e.g. `CELLMON_PERSISTER_POSTGRES__URL`,
//! `CELLMON_PERSISTER_REDIS__TIMEOUT=5s`), checked once by
//! [`Settings::validate`]: values that cannot work (no delivery allowed, a
//! zero timeout or interval, a backoff whose longest pause is shorter than
//! its first) are refused at load, by key, and the binary exits with
//! status 64. The number of streams and the batch size are `NonZero`
//! types (the stream keys and the consumer take them so), refused at 0 as
//! they are read.

use std::num::{NonZeroU16, NonZeroUsize};
use std::path::Path;
use std::time::Duration;

use cellmon_service::{
    ConfigError, InfluxSettings, Invalid, ListenSettings, PostgresSettings, RedisSettings,
    Settings, check,
};
use serde::{Deserialize, Serialize};

/// Everything the persister needs. Tests build it directly; [`crate::serve`]
/// validates it as loading does.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where `main` serves health and metrics (tests pass their own
    /// listener).
    pub listen: ListenSettings,
    /// Redis with the event streams. Its `prefix` is the ingest server's;
    /// its `timeout` bounds every Redis call (connecting, acknowledging,
    /// reclaiming, publishing live updates, trimming, readiness); a read's
    /// blocking wait for new entries comes on top.
    pub redis: RedisSettings,
    /// Number of event streams (shards); the ingest server's.
    pub stream_shards: NonZeroU16,
    /// Postgres. Its `timeout` bounds a statement or a connection attempt;
    /// a whole batch may take ten times this (it is about ten statements).
    pub postgres: PostgresSettings,
    /// Apply the schema's migrations at start-up.
    pub migrate: bool,
    /// InfluxDB (v1 HTTP API). Its `timeout` bounds one request.
    pub influx: InfluxSettings,
    /// A batch is written at this many events ...
    pub batch_max: NonZeroUsize,
    /// ... or this long after its first event arrived (`0s`: whatever one
    /// read brought).
    #[serde(with = "cellmon_service::duration")]
    pub batch_wait: Duration,
    /// Entries another consumer has held this long unacknowledged are
    /// taken over (its process died or hangs). A live consumer keeps its
    /// entries claimed every third of this.
    #[serde(with = "cellmon_service::duration")]
    pub claim_idle: Duration,
    /// How often to look for such entries.
    #[serde(with = "cellmon_service::duration")]
    pub claim_interval: Duration,
    /// The most times an entry is delivered; past it, the entry goes to the
    /// dead-letter stream untried. The rule is defined once, in
    /// `cellmon_bus::consumer` ("The delivery limit").
    pub max_deliveries: u64,
    /// First and longest pause between retries of a failing sink.
    #[serde(with = "cellmon_service::duration")]
    pub retry_initial: Duration,
    #[serde(with = "cellmon_service::duration")]
    pub retry_max: Duration,
    /// How often streams are trimmed below what every group still needs.
    #[serde(with = "cellmon_service::duration")]
    pub trim_interval: Duration,
    /// How often students whose status can change by time alone (going
    /// idle, a help request lapsing) are recomputed, when nothing else
    /// recomputed them for that long.
    #[serde(with = "cellmon_service::duration")]
    pub status_sweep: Duration,
    /// Longest shutdown waits for the sinks to finish the batch in hand;
    /// what they have not acknowledged by then stays pending in Redis and
    /// is reclaimed by the next persister. May be `0s`.
    #[serde(with = "cellmon_service::duration")]
    pub shutdown_grace: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: ListenSettings::port(8082),
            redis: RedisSettings {
                timeout: Duration::from_secs(5),
                ..RedisSettings::default()
            },
            stream_shards: const { NonZeroU16::new(4).unwrap() },
            postgres: PostgresSettings {
                max_connections: 8,
                timeout: Duration::from_secs(10),
                ..PostgresSettings::default()
            },
            migrate: true,
            influx: InfluxSettings {
                timeout: Duration::from_secs(10),
                ..InfluxSettings::default()
            },
            batch_max: const { NonZeroUsize::new(2_000).unwrap() },
            batch_wait: Duration::from_millis(50),
            claim_idle: Duration::from_secs(30),
            claim_interval: Duration::from_secs(5),
            max_deliveries: 5,
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
            trim_interval: Duration::from_secs(10),
            status_sweep: Duration::from_secs(15),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Redis counts idle times in milliseconds, and held entries are refreshed
/// every third of `claim_idle`: below this, there is no third to wait.
const MIN_CLAIM_IDLE: Duration = Duration::from_millis(3);

impl Settings for Config {
    const ENV_PREFIX: &'static str = "CELLMON_PERSISTER_";
    // CELLMON_PERSISTER_CONFIG names the file; URL is what `harness up`
    // prints for clients (health and metrics).
    const NOT_SETTINGS: &'static [&'static str] = &["config", "url"];

    fn validate(&self) -> Result<(), Invalid> {
        self.redis.validate().map_err(|e| e.within("redis"))?;
        self.postgres.validate().map_err(|e| e.within("postgres"))?;
        self.influx.validate().map_err(|e| e.within("influx"))?;
        if self.max_deliveries == 0 {
            return Err(Invalid::new(
                "max_deliveries",
                "must be at least 1: with 0 every entry would be dead-lettered",
            ));
        }
        if self.claim_idle < MIN_CLAIM_IDLE {
            return Err(Invalid::new(
                "claim_idle",
                "must be at least 3ms: held entries are kept claimed every third of it",
            ));
        }
        check::not_zero("claim_interval", self.claim_interval)?;
        check::not_zero("retry_initial", self.retry_initial)?;
        check::not_shorter_than(
            "retry_max",
            self.retry_max,
            "retry_initial",
            self.retry_initial,
        )?;
        check::not_zero("trim_interval", self.trim_interval)?;
        check::not_zero("status_sweep", self.status_sweep)
    }
}

impl Config {
    /// Defaults, then `file` when given, then the environment; validated.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        cellmon_service::load(file)
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

    /// The one problem of a refused configuration, as `key: reason`.
    fn refusal(result: Result<Config, ConfigError>) -> String {
        let error = result.expect_err("refused");
        error
            .only_problem()
            .unwrap_or_else(|| panic!("not exactly one problem: {error}"))
    }

    #[test]
    fn file_then_environment_and_secrets_stay_hidden() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "persister.toml",
                r#"
                batch_max = 500
                claim_idle = "1m"
                [postgres]
                url = "postgres://u:hunter2@db/cellmon"
                [influx]
                token = "influx-secret"
                "#,
            )?;
            jail.set_env("CELLMON_PERSISTER_CONFIG", "persister.toml");
            jail.set_env("CELLMON_PERSISTER_URL", "http://127.0.0.1:8082");
            jail.set_env("CELLMON_PERSISTER_BATCH_MAX", "700");
            jail.set_env("CELLMON_PERSISTER_REDIS__TIMEOUT", "250ms");
            jail.set_env("CELLMON_PERSISTER_INFLUX__DATABASE", "class_data");
            let config =
                Config::load(Some(Path::new("persister.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(config.batch_max.get(), 700);
            assert_eq!(config.redis.timeout, Duration::from_millis(250));
            assert_eq!(config.claim_idle, Duration::from_secs(60));
            assert_eq!(config.influx.database, "class_data");
            assert_eq!(config.max_deliveries, 5);
            assert_eq!(config.postgres.timeout, Duration::from_secs(10));
            assert!(config.postgres.url.expose_secret().contains("hunter2"));
            let debug = format!("{config:?}");
            assert!(
                !debug.contains("hunter2") && !debug.contains("influx-secret"),
                "{debug}"
            );
            Ok(())
        });
    }

    #[test]
    fn unusable_values_are_refused_with_their_name() {
        figment::Jail::expect_with(|jail| {
            for (var, value, expected) in [
                (
                    "CELLMON_PERSISTER_BATCH_MAX",
                    "0",
                    "batch_max: must be at least 1 (in CELLMON_PERSISTER_BATCH_MAX)",
                ),
                (
                    "CELLMON_PERSISTER_MAX_DELIVERIES",
                    "0",
                    "max_deliveries: must be at least 1: with 0 every entry would be \
                     dead-lettered",
                ),
                (
                    "CELLMON_PERSISTER_REDIS__TIMEOUT",
                    "0s",
                    "redis.timeout: must be longer than 0s",
                ),
                (
                    "CELLMON_PERSISTER_POSTGRES__MAX_CONNECTIONS",
                    "0",
                    "postgres.max_connections: must be at least 1",
                ),
                (
                    "CELLMON_PERSISTER_INFLUX__DATABASE",
                    "",
                    "influx.database: must not be empty",
                ),
                (
                    "CELLMON_PERSISTER_RETRY_MAX",
                    "10ms",
                    "retry_max: must not be shorter than retry_initial (100ms), not 10ms",
                ),
                (
                    "CELLMON_PERSISTER_CLAIM_IDLE",
                    "1ms",
                    "claim_idle: must be at least 3ms: held entries are kept claimed every \
                     third of it",
                ),
                (
                    "CELLMON_PERSISTER_STATUS_SWEEP",
                    "0s",
                    "status_sweep: must be longer than 0s",
                ),
            ] {
                jail.clear_env();
                jail.set_env(var, value);
                assert_eq!(refusal(Config::load(None)), expected, "{var}={value}");
            }
            jail.clear_env();
            jail.set_env("CELLMON_PERSISTER_RETRY_MAX", "100ms");
            Config::load(None).map_err(|e| e.to_string())?;
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("CELLMON_PERSISTER_BATCH_MAXX", "5");
            let problem = refusal(Config::load(None));
            assert!(problem.starts_with("batch_maxx: unknown key"), "{problem}");
            // The flat keys of old versions are no longer settings.
            jail.clear_env();
            jail.set_env("CELLMON_PERSISTER_POSTGRES_URL", "postgres://db/cellmon");
            let problem = refusal(Config::load(None));
            assert!(
                problem.starts_with("postgres_url: unknown key"),
                "{problem}"
            );
            Ok(())
        });
    }
}
