//! The ingest server's configuration: defaults, then an optional TOML file,
//! then `CELLMON_INGEST_*` environment variables, nested with `__` (e.g.
//! `CELLMON_INGEST_REDIS__TIMEOUT=500ms`,
//! `CELLMON_INGEST_RATE_LIMIT__PER_SECOND=20`), checked once by
//! [`Settings::validate`] so that nothing after start-up meets a value it
//! cannot use. The counts that what they feed cannot take at 0 (the
//! number of streams, the rate limiter's quota) are `NonZero` types, so 0
//! is refused as they are read, even in a configuration built in code.

use std::num::{NonZeroU16, NonZeroU32};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cellmon_domain::lms::ClassId;
use cellmon_service::{ConfigError, Invalid, ListenSettings, RedisSettings, Settings, check};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

/// Everything the server needs. Tests build it directly;
/// [`crate::AppState::new`] validates it as loading does.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where `main` listens (tests pass their own listener).
    pub listen: ListenSettings,
    /// Redis, with AOF on. Its `prefix` is the persister's; its `timeout`
    /// is the longest a hand-off may take before the events are spooled
    /// instead.
    pub redis: RedisSettings,
    /// Number of event streams (shards); the persister's.
    pub stream_shards: NonZeroU16,
    /// How often the server checks whether Redis restarted (and whether it
    /// came back without its data).
    #[serde(with = "cellmon_service::duration")]
    pub redis_watch: Duration,
    /// Most bytes of a request body as sent (compressed or not).
    pub max_body_bytes: usize,
    /// Most bytes of a request body after gzip decompression.
    pub max_decoded_body_bytes: usize,
    /// Most event requests being handled at once; beyond it, 503
    /// `overloaded`. Bounds memory: each may hold a decoded body.
    pub max_in_flight: usize,
    /// Longest a client may take to send its body.
    #[serde(with = "cellmon_service::duration")]
    pub body_timeout: Duration,
    /// Class ingest tokens: the extension sends one as `?token=` or
    /// `Authorization: Bearer`.
    pub classes: Vec<ClassToken>,
    /// Open mode: tokenless events belong to this class. Unset: a token is
    /// required.
    pub open_class: Option<ClassId>,
    pub rate_limit: RateLimit,
    pub spool: SpoolSettings,
}

/// The local spool that takes events when Redis cannot.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpoolSettings {
    /// Directory of the spool's files. One server per directory: it is
    /// locked while a server has it open, and a second server on it exits
    /// with status 64.
    pub dir: PathBuf,
    /// Most bytes on disk; beyond it requests get 503.
    pub max_bytes: u64,
    /// Size at which a segment file is closed and a new one started.
    pub segment_bytes: u64,
    /// Longest the server spends sending spooled events to Redis when it
    /// shuts down; what is left is replayed at the next start. May be
    /// `0s`: leave it all for the next start.
    #[serde(with = "cellmon_service::duration")]
    pub drain_on_shutdown: Duration,
}

impl Default for SpoolSettings {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("data/ingest-spool"),
            max_bytes: 1024 * 1024 * 1024,
            // Replay re-reads a segment per round; small segments keep that cheap.
            segment_bytes: 8 * 1024 * 1024,
            drain_on_shutdown: Duration::from_secs(5),
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
    pub per_second: NonZeroU32,
    /// Requests a client may send at once before the sustained rate applies.
    pub burst: NonZeroU32,
}

impl Default for RateLimit {
    fn default() -> Self {
        // The extension sends about one request per cell run; a class of
        // students behind one NAT address shares this budget.
        Self {
            per_second: const { NonZeroU32::new(200).unwrap() },
            burst: const { NonZeroU32::new(400).unwrap() },
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: ListenSettings::port(8080),
            redis: RedisSettings {
                timeout: Duration::from_millis(500),
                ..RedisSettings::default()
            },
            stream_shards: const { NonZeroU16::new(4).unwrap() },
            redis_watch: Duration::from_secs(1),
            max_body_bytes: 1024 * 1024,
            max_decoded_body_bytes: 8 * 1024 * 1024,
            max_in_flight: 512,
            body_timeout: Duration::from_secs(30),
            classes: Vec::new(),
            open_class: None,
            rate_limit: RateLimit::default(),
            spool: SpoolSettings::default(),
        }
    }
}

impl Settings for Config {
    const ENV_PREFIX: &'static str = "CELLMON_INGEST_";
    // CELLMON_INGEST_CONFIG names the file; URL and TOKEN are what
    // `harness up` prints for clients.
    const NOT_SETTINGS: &'static [&'static str] = &["config", "url", "token"];

    fn validate(&self) -> Result<(), Invalid> {
        self.redis.validate().map_err(|e| e.within("redis"))?;
        check::not_zero("redis_watch", self.redis_watch)?;
        check::at_least_one("max_body_bytes", self.max_body_bytes)?;
        check::at_least_one("max_decoded_body_bytes", self.max_decoded_body_bytes)?;
        check::at_least_one("max_in_flight", self.max_in_flight)?;
        check::not_zero("body_timeout", self.body_timeout)?;
        for (i, class) in self.classes.iter().enumerate() {
            // An empty token would let `?token=` in.
            check::secret_set("token", &class.token)
                .map_err(|e| e.within(&format!("classes[{i}]")))?;
        }
        if self.spool.dir.as_os_str().is_empty() {
            return Err(Invalid::new("spool.dir", "must not be empty"));
        }
        check::at_least_one("spool.max_bytes", self.spool.max_bytes)
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
    fn defaults_survive_loading() {
        figment::Jail::expect_with(|_| {
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(config.redis.url.expose_secret(), "redis://127.0.0.1:6379/");
            assert_eq!(config.redis.timeout, Duration::from_millis(500));
            assert_eq!(config.stream_shards.get(), 4);
            assert_eq!(config.body_timeout, Duration::from_secs(30));
            assert_eq!(config.spool.drain_on_shutdown, Duration::from_secs(5));
            assert_eq!(config.listen.addr.to_string(), "0.0.0.0:8080");
            Ok(())
        });
    }

    #[test]
    fn file_then_environment_and_the_config_variable_is_not_a_setting() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "ingest.toml",
                r#"
                stream_shards = 8
                body_timeout = "10s"
                [redis]
                url = "redis://from-file:6379/"
                timeout = "750ms"
                [[classes]]
                class_id = "6f1e3a52-0c57-4d1e-a4f5-3b0b6a2d9c11"
                token = "secret-token"
                "#,
            )?;
            jail.set_env("CELLMON_INGEST_CONFIG", "ingest.toml");
            jail.set_env("CELLMON_INGEST_URL", "http://127.0.0.1:8080");
            jail.set_env("CELLMON_INGEST_TOKEN", "dev-token");
            jail.set_env("CELLMON_INGEST_STREAM_SHARDS", "16");
            jail.set_env("CELLMON_INGEST_REDIS__TIMEOUT", "1s");
            jail.set_env("CELLMON_INGEST_SPOOL__MAX_BYTES", "1000000");
            jail.set_env("CELLMON_INGEST_SPOOL__DRAIN_ON_SHUTDOWN", "0s");
            jail.set_env("CELLMON_INGEST_LISTEN__ADDR", "127.0.0.1:18080");
            let config = Config::load(Some(Path::new("ingest.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(config.redis.url.expose_secret(), "redis://from-file:6379/");
            assert_eq!(config.redis.timeout, Duration::from_secs(1));
            assert_eq!(config.stream_shards.get(), 16);
            assert_eq!(config.body_timeout, Duration::from_secs(10));
            assert_eq!(config.spool.max_bytes, 1_000_000);
            assert_eq!(config.spool.drain_on_shutdown, Duration::ZERO);
            assert_eq!(config.listen.addr.to_string(), "127.0.0.1:18080");
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
            // The flat key of old versions is no longer a setting.
            jail.set_env("CELLMON_INGEST_REDIS_TIMEOUT_MS", "500");
            let problem = refusal(Config::load(None));
            assert!(
                problem.starts_with("redis_timeout_ms: unknown key")
                    && problem.ends_with("(in CELLMON_INGEST_REDIS_TIMEOUT_MS)"),
                "{problem}"
            );
            jail.clear_env();
            jail.set_env("CELLMON_INGEST_SPOOL__DRAIN_ON_SHUTDOWN_MS", "0");
            let problem = refusal(Config::load(None));
            assert!(
                problem.starts_with("spool.drain_on_shutdown_ms: unknown key"),
                "{problem}"
            );
            Ok(())
        });
    }

    #[test]
    fn unusable_values_are_refused_with_their_name() {
        figment::Jail::expect_with(|jail| {
            for (var, value, expected) in [
                (
                    "CELLMON_INGEST_MAX_IN_FLIGHT",
                    "0",
                    "max_in_flight: must be at least 1",
                ),
                (
                    "CELLMON_INGEST_STREAM_SHARDS",
                    "0",
                    "stream_shards: must be at least 1 (in CELLMON_INGEST_STREAM_SHARDS)",
                ),
                (
                    "CELLMON_INGEST_RATE_LIMIT__BURST",
                    "0",
                    "rate_limit.burst: must be at least 1 (in CELLMON_INGEST_RATE_LIMIT__BURST)",
                ),
                (
                    "CELLMON_INGEST_REDIS__TIMEOUT",
                    "0s",
                    "redis.timeout: must be longer than 0s",
                ),
                (
                    "CELLMON_INGEST_REDIS_WATCH",
                    "0s",
                    "redis_watch: must be longer than 0s",
                ),
                (
                    "CELLMON_INGEST_BODY_TIMEOUT",
                    "0s",
                    "body_timeout: must be longer than 0s",
                ),
                (
                    "CELLMON_INGEST_MAX_BODY_BYTES",
                    "0",
                    "max_body_bytes: must be at least 1",
                ),
                (
                    "CELLMON_INGEST_SPOOL__MAX_BYTES",
                    "0",
                    "spool.max_bytes: must be at least 1",
                ),
                (
                    "CELLMON_INGEST_SPOOL__DIR",
                    "",
                    "spool.dir: must not be empty",
                ),
            ] {
                jail.clear_env();
                jail.set_env(var, value);
                assert_eq!(refusal(Config::load(None)), expected, "{var}={value}");
            }
            jail.clear_env();
            jail.create_file(
                "empty-token.toml",
                r#"
                [[classes]]
                class_id = "6f1e3a52-0c57-4d1e-a4f5-3b0b6a2d9c11"
                token = ""
                "#,
            )?;
            assert_eq!(
                refusal(Config::load(Some(Path::new("empty-token.toml")))),
                "classes[0].token: is not set"
            );
            // A duration needs its unit.
            jail.set_env("CELLMON_INGEST_BODY_TIMEOUT", "30");
            let problem = refusal(Config::load(None));
            assert!(
                problem.starts_with("body_timeout: invalid type"),
                "{problem}"
            );
            Ok(())
        });
    }
}
