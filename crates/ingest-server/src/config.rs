//! The ingest server's configuration: defaults, then an optional TOML file,
//! then `CELLMON_INGEST_*` environment variables (nested keys with `__`,
//! e.g. `CELLMON_INGEST_RATE_LIMIT__PER_SECOND=20`).

use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cellmon_domain::lms::ClassId;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

/// Everything the server needs. Tests build it directly.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where `main` listens (tests pass their own listener).
    pub listen: SocketAddr,
    /// Redis, with AOF on (`redis://host:6379/`). Secret: it may carry a
    /// password. Never serialized; a missing value takes the default.
    #[serde(skip_serializing)]
    pub redis_url: SecretString,
    /// Prefix of every Redis key this server writes.
    pub stream_prefix: String,
    /// Number of event streams (shards).
    pub stream_shards: NonZeroU16,
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
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            redis_url: SecretString::from("redis://127.0.0.1:6379/"),
            stream_prefix: "cellmon:".into(),
            stream_shards: const { NonZeroU16::new(4).unwrap() },
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
        }
    }
}

impl Config {
    /// Defaults, then `file` when given, then the environment; refused
    /// when a value cannot work (see [`Self::problem`]).
    pub fn load(file: Option<&Path>) -> Result<Self, Box<figment::Error>> {
        // CELLMON_INGEST_CONFIG names the file; URL and TOKEN are what
        // `harness up` prints for clients.
        let config: Self = cellmon_service::load_config(
            Config::default(),
            file,
            "CELLMON_INGEST_",
            &["config", "url", "token"],
        )?;
        match config.problem() {
            Some(problem) => Err(Box::new(figment::Error::from(problem.to_owned()))),
            None => Ok(config),
        }
    }

    /// What makes these settings unusable, if anything. Checked once, at
    /// load and by [`crate::serve`], so no use site needs to clamp.
    pub fn problem(&self) -> Option<&'static str> {
        if self.max_in_flight == 0 {
            Some("max_in_flight must be at least 1: with 0 every request would be refused")
        } else if self.rate_limit.per_second == 0 || self.rate_limit.burst == 0 {
            Some("rate_limit.per_second and rate_limit.burst must be at least 1")
        } else if self.redis_timeout_ms == 0 || self.redis_watch_ms == 0 {
            Some("redis_timeout_ms and redis_watch_ms must be at least 1")
        } else if self.spool.max_bytes == 0 {
            Some("spool.max_bytes must be at least 1: with 0 nothing could be spooled")
        } else {
            None
        }
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
            assert_eq!(config.stream_shards.get(), 4);
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
            assert_eq!(config.stream_shards.get(), 16);
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

    #[test]
    fn unusable_values_are_refused_with_their_name() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("CELLMON_INGEST_MAX_IN_FLIGHT", "0");
            let error = Config::load(None).expect_err("max_in_flight = 0");
            assert!(error.to_string().contains("max_in_flight"), "{error}");
            Ok(())
        });
    }
}
