//! Loading a binary's settings and checking them once, so that nothing
//! past start-up meets an impossible value (a zero queue, a zero timeout)
//! and no use site has to repair one.
//!
//! A binary's configuration type implements [`Settings`]: its environment
//! prefix, and [`Settings::validate`], which names the first unusable value
//! by its dotted key (`redis.timeout`) and says why. [`load`] reads
//! defaults, an optional TOML file and the environment, then validates;
//! every failure, whether figment's (an unknown key, a value of the wrong
//! type) or the binary's own, comes back as a [`ConfigError`] made of
//! [`Invalid`] keys with reasons, which [`crate::run`] prints before it
//! exits with [`crate::EXIT_BAD_CONFIG`].
//!
//! A count that what it feeds cannot take at 0 (a number of shards, a
//! rate) may be typed `NonZero*`: 0 is then refused as it is read, with
//! the same "must be at least 1" as [`check::at_least_one`] gives.
//!
//! Durations are written the way people say them (`"500ms"`, `"5s"`,
//! `"2m"`) in TOML and in variables alike, through [`duration`]
//! (`#[serde(with = "cellmon_service::duration")]`), which writes them
//! back the same way so that the defaults go through figment unchanged.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format as _, Serialized, Toml};
use secrecy::SecretString;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Serde support for [`Duration`] fields as `"500ms"`, `"5s"`, `"2m"`,
/// `"1h 30m"`: `#[serde(with = "cellmon_service::duration")]`.
pub use humantime_serde as duration;

/// A binary's whole configuration.
pub trait Settings: Serialize + DeserializeOwned + Default {
    /// The prefix of its environment variables, e.g. `CELLMON_GATEWAY_`;
    /// nested keys are joined with `__` (`CELLMON_GATEWAY_REDIS__TIMEOUT`).
    const ENV_PREFIX: &'static str;
    /// Variables with the prefix that are not settings (lower case,
    /// without the prefix): the one naming the config file, and those
    /// that tools print for clients. Any other is a setting, and an
    /// unknown one is refused.
    const NOT_SETTINGS: &'static [&'static str];

    /// The first value that cannot be used, by its key, and why.
    fn validate(&self) -> Result<(), Invalid>;
}

/// [`Settings::default`], then `file` when given, then the environment;
/// then [`Settings::validate`].
pub fn load<S: Settings>(file: Option<&Path>) -> Result<S, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(S::default()));
    if let Some(file) = file {
        figment = figment.merge(Toml::file_exact(file));
    }
    let settings: S = figment
        .merge(
            Env::prefixed(S::ENV_PREFIX)
                .ignore(S::NOT_SETTINGS)
                .split("__"),
        )
        .extract()
        .map_err(|error| ConfigError::unreadable(Box::new(error), file))?;
    settings.validate()?;
    Ok(settings)
}

/// One setting that cannot be used: its dotted key and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct Invalid {
    key: String,
    reason: String,
}

impl Invalid {
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// The dotted key, e.g. `redis.timeout`.
    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// The same problem seen from the enclosing table: `timeout` within
    /// `redis` is `redis.timeout`. Nested settings validate with their own
    /// keys and the binary says where they sit.
    #[must_use]
    pub fn within(mut self, table: &str) -> Self {
        self.key = format!("{table}.{}", self.key);
        self
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value could not be read: an unknown key, a wrong type, a file
    /// that is missing or is not TOML.
    #[error("{}", Lines(problems))]
    Unreadable {
        problems: Vec<Invalid>,
        #[source]
        source: Box<figment::Error>,
    },
    /// Values were read, and one of them cannot be used.
    #[error(transparent)]
    Invalid(#[from] Invalid),
}

impl ConfigError {
    /// Every problem found, one per key (figment reports all it found; a
    /// validation stops at the first).
    pub fn problems(&self) -> &[Invalid] {
        match self {
            Self::Unreadable { problems, .. } => problems,
            Self::Invalid(invalid) => std::slice::from_ref(invalid),
        }
    }

    /// The problem, as `key: reason`, when there is exactly one (what a
    /// test of one bad setting expects).
    pub fn only_problem(&self) -> Option<String> {
        match self.problems() {
            [one] => Some(one.to_string()),
            _ => None,
        }
    }
}

impl ConfigError {
    /// Figment's errors, each as a key and a reason; a problem with the
    /// file as a whole (missing, not TOML) is named by the file.
    fn unreadable(error: Box<figment::Error>, file: Option<&Path>) -> Self {
        let problems = error
            .clone()
            .into_iter()
            .map(|e| from_figment(&e, file))
            .collect();
        Self::Unreadable {
            problems,
            source: error,
        }
    }
}

struct Lines<'a>(&'a [Invalid]);

impl fmt::Display for Lines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

/// One of figment's errors as a key and a reason. Figment's own message
/// puts the key last, after the profile name ("default.redis.timeout");
/// the key comes first here, as the binary's validation reports it, and
/// the reason says where the value came from (the variable's name or the
/// file's path), since that is what the operator has to edit.
fn from_figment(error: &figment::Error, file: Option<&Path>) -> Invalid {
    use figment::error::Kind;
    let mut path = error.path.clone();
    let mut reason = match &error.kind {
        Kind::UnknownField(field, expected) => {
            if path.last() != Some(field) {
                path.push(field.clone());
            }
            format!("unknown key; the keys here are {}", expected.join(", "))
        }
        kind @ (Kind::InvalidType(_, expected) | Kind::InvalidValue(_, expected))
            if expected == "a duration" =>
        {
            format!("{kind}, such as 500ms, 5s or 2m")
        }
        // A count typed `NonZero*` (because what it feeds cannot take 0)
        // is refused as it is read; said as `check::at_least_one` says it.
        Kind::InvalidValue(figment::error::Actual::Unsigned(0), expected)
            if expected.starts_with("a nonzero ") =>
        {
            "must be at least 1".to_owned()
        }
        kind => kind.to_string(),
    };
    let key = match (path.is_empty(), file) {
        (false, _) => path.join("."),
        (true, Some(file)) => file.display().to_string(),
        (true, None) => "configuration".to_owned(),
    };
    if let Some(metadata) = &error.metadata {
        let origin = match &metadata.source {
            Some(figment::Source::File(file)) => file.display().to_string(),
            _ => match env_prefix(&metadata.name) {
                Some(prefix) if !path.is_empty() => {
                    format!("{prefix}{}", path.join("__").to_ascii_uppercase())
                }
                _ => metadata.name.to_string(),
            },
        };
        reason.push_str(&format!(" (in {origin})"));
    }
    Invalid::new(key, reason)
}

/// The prefix in the name figment gives its environment provider,
/// "`CELLMON_GATEWAY_` environment variable(s)", to name the variable.
fn env_prefix(provider: &str) -> Option<&str> {
    let (prefix, rest) = provider.strip_prefix('`')?.split_once('`')?;
    rest.contains("environment").then_some(prefix)
}

/// The checks every binary's [`Settings::validate`] is made of.
pub mod check {
    use super::{Duration, Invalid, SecretString};
    use secrecy::ExposeSecret as _;

    /// A count, capacity or rate that 0 would make useless (a queue that
    /// holds nothing, a pool without connections).
    pub fn at_least_one<T: Default + PartialEq>(key: &str, value: T) -> Result<(), Invalid> {
        if value == T::default() {
            Err(Invalid::new(key, "must be at least 1"))
        } else {
            Ok(())
        }
    }

    /// A timeout or interval: 0 would fail every call, or spin.
    pub fn not_zero(key: &str, value: Duration) -> Result<(), Invalid> {
        if value.is_zero() {
            Err(Invalid::new(key, "must be longer than 0s"))
        } else {
            Ok(())
        }
    }

    /// A duration that is counted in whole seconds where it is used (JWT
    /// times are), so that `1500ms` is refused rather than cut to `1s`.
    pub fn whole_seconds(key: &str, value: Duration) -> Result<(), Invalid> {
        if value.subsec_nanos() == 0 {
            Ok(())
        } else {
            Err(Invalid::new(
                key,
                format!(
                    "must be a whole number of seconds, not {}",
                    humantime_serde::re::humantime::format_duration(value)
                ),
            ))
        }
    }

    /// `value` must be longer than the setting `other`.
    pub fn longer_than(
        key: &str,
        value: Duration,
        other_key: &str,
        other: Duration,
    ) -> Result<(), Invalid> {
        if value > other {
            Ok(())
        } else {
            let format = humantime_serde::re::humantime::format_duration;
            Err(Invalid::new(
                key,
                format!(
                    "must be longer than {other_key} ({}), not {}",
                    format(other),
                    format(value)
                ),
            ))
        }
    }

    /// `value` must be at least as long as the setting `other` (the
    /// longest pause of a backoff and its first).
    pub fn not_shorter_than(
        key: &str,
        value: Duration,
        other_key: &str,
        other: Duration,
    ) -> Result<(), Invalid> {
        if value >= other {
            Ok(())
        } else {
            let format = humantime_serde::re::humantime::format_duration;
            Err(Invalid::new(
                key,
                format!(
                    "must not be shorter than {other_key} ({}), not {}",
                    format(other),
                    format(value)
                ),
            ))
        }
    }

    /// A secret that must be set (a URL, a signing key).
    pub fn secret_set(key: &str, value: &SecretString) -> Result<(), Invalid> {
        if value.expose_secret().trim().is_empty() {
            Err(Invalid::new(key, "is not set"))
        } else {
            Ok(())
        }
    }

    /// A name or address that must not be empty.
    pub fn not_empty(key: &str, value: &str) -> Result<(), Invalid> {
        if value.trim().is_empty() {
            Err(Invalid::new(key, "must not be empty"))
        } else {
            Ok(())
        }
    }

    /// An optional secret that, when present, must not be empty: an empty
    /// token is a mistake, not "no token".
    pub fn optional_secret_set(key: &str, value: Option<&SecretString>) -> Result<(), Invalid> {
        match value {
            Some(secret) if secret.expose_secret().trim().is_empty() => {
                Err(Invalid::new(key, "is set but empty; leave it out for none"))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
#[allow(
    clippy::result_large_err,
    reason = "figment::Jail's closures must return figment's own Result"
)]
mod tests {
    use secrecy::ExposeSecret as _;
    use serde::Deserialize;

    use super::*;
    use crate::{PostgresSettings, RedisSettings};

    /// A binary's configuration in miniature: nested backends, a duration
    /// and a count of its own, and a rule between two durations.
    #[derive(Debug, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Demo {
        redis: RedisSettings,
        postgres: PostgresSettings,
        queue: usize,
        shards: std::num::NonZeroU16,
        #[serde(with = "crate::duration")]
        heartbeat: Duration,
        #[serde(with = "crate::duration")]
        idle_timeout: Duration,
    }

    impl Default for Demo {
        fn default() -> Self {
            Self {
                redis: RedisSettings {
                    timeout: Duration::from_millis(500),
                    ..RedisSettings::default()
                },
                postgres: PostgresSettings::default(),
                queue: 16,
                shards: std::num::NonZeroU16::MIN,
                heartbeat: Duration::from_secs(15),
                idle_timeout: Duration::from_secs(45),
            }
        }
    }

    impl Settings for Demo {
        const ENV_PREFIX: &'static str = "DEMO_";
        const NOT_SETTINGS: &'static [&'static str] = &["config"];

        fn validate(&self) -> Result<(), Invalid> {
            self.redis.validate().map_err(|e| e.within("redis"))?;
            self.postgres.validate().map_err(|e| e.within("postgres"))?;
            check::at_least_one("queue", self.queue)?;
            check::not_zero("heartbeat", self.heartbeat)?;
            check::longer_than(
                "idle_timeout",
                self.idle_timeout,
                "heartbeat",
                self.heartbeat,
            )
        }
    }

    /// The one problem of a refused configuration, as `key: reason`.
    fn refusal(result: Result<Demo, ConfigError>) -> String {
        let error = result.expect_err("refused");
        let problems = error.problems();
        assert_eq!(problems.len(), 1, "{error}");
        problems[0].to_string()
    }

    #[test]
    fn defaults_go_through_figment_unchanged() {
        figment::Jail::expect_with(|_| {
            let demo = load::<Demo>(None).map_err(|e| e.to_string())?;
            assert_eq!(demo.redis.timeout, Duration::from_millis(500));
            assert_eq!(demo.redis.url.expose_secret(), "redis://127.0.0.1:6379/");
            assert_eq!(demo.redis.prefix, "cellmon:");
            assert_eq!(demo.postgres.timeout, Duration::from_secs(5));
            assert_eq!(demo.heartbeat, Duration::from_secs(15));
            Ok(())
        });
    }

    #[test]
    fn durations_are_written_as_people_say_them() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "demo.toml",
                r#"
                heartbeat = "500ms"
                idle_timeout = "2m"
                [redis]
                url = "redis://from-file:6379/"
                timeout = "5s"
                "#,
            )?;
            jail.set_env("DEMO_POSTGRES__TIMEOUT", "1h 30m");
            let demo = load::<Demo>(Some(Path::new("demo.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(demo.heartbeat, Duration::from_millis(500));
            assert_eq!(demo.idle_timeout, Duration::from_secs(120));
            assert_eq!(demo.redis.timeout, Duration::from_secs(5));
            assert_eq!(demo.redis.url.expose_secret(), "redis://from-file:6379/");
            assert_eq!(demo.postgres.timeout, Duration::from_secs(90 * 60));
            // ... and serialized back the same way.
            let written = serde_json::to_value(&demo.redis).map_err(|e| e.to_string())?;
            assert_eq!(written["timeout"], "5s");
            assert!(written.get("url").is_none(), "secrets are never written");
            Ok(())
        });
    }

    #[test]
    fn a_value_that_is_not_a_duration_is_refused_with_its_key() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("DEMO_REDIS__TIMEOUT", "soon");
            let problem = refusal(load::<Demo>(None));
            assert!(
                problem.starts_with("redis.timeout: invalid value")
                    && problem.contains("\"soon\", expected a duration, such as 500ms")
                    && problem.ends_with("(in DEMO_REDIS__TIMEOUT)"),
                "{problem}"
            );
            // A number without a unit is no duration either.
            jail.set_env("DEMO_REDIS__TIMEOUT", "5");
            let problem = refusal(load::<Demo>(None));
            assert!(
                problem.starts_with("redis.timeout: invalid type"),
                "{problem}"
            );
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused_with_their_key() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("DEMO_REDIS__TIMEOT", "1s");
            let problem = refusal(load::<Demo>(None));
            assert!(
                problem
                    == "redis.timeot: unknown key; the keys here are url, prefix, timeout \
                        (in DEMO_REDIS__TIMEOT)",
                "{problem}"
            );
            jail.clear_env();
            jail.set_env("DEMO_QUEUE", "lots");
            let problem = refusal(load::<Demo>(None));
            assert!(problem.starts_with("queue: invalid type"), "{problem}");
            jail.clear_env();
            jail.create_file("typo.toml", "[postgres]\nmax_conections = 4\n")?;
            let problem = refusal(load::<Demo>(Some(Path::new("typo.toml"))));
            assert!(
                problem.starts_with("postgres.max_conections: unknown key")
                    && problem.contains("typo.toml"),
                "{problem}"
            );
            Ok(())
        });
    }

    #[test]
    fn a_nonzero_count_is_refused_at_0_as_any_count_is() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("DEMO_SHARDS", "0");
            assert_eq!(
                refusal(load::<Demo>(None)),
                "shards: must be at least 1 (in DEMO_SHARDS)"
            );
            // Too large is not "at least 1".
            jail.set_env("DEMO_SHARDS", "70000");
            let problem = refusal(load::<Demo>(None));
            assert!(
                problem.starts_with("shards: invalid value unsigned int `70000`"),
                "{problem}"
            );
            jail.set_env("DEMO_SHARDS", "3");
            let demo = load::<Demo>(None).map_err(|e| e.to_string())?;
            assert_eq!(demo.shards.get(), 3);
            Ok(())
        });
    }

    #[test]
    fn a_missing_or_broken_file_is_refused() {
        figment::Jail::expect_with(|jail| {
            let missing = refusal(load::<Demo>(Some(Path::new("absent.toml"))));
            assert!(missing.starts_with("absent.toml: "), "{missing}");
            jail.create_file("broken.toml", "queue = ")?;
            let broken = refusal(load::<Demo>(Some(Path::new("broken.toml"))));
            assert!(broken.starts_with("broken.toml: "), "{broken}");
            Ok(())
        });
    }

    #[test]
    fn validation_names_the_key_and_the_reason() {
        figment::Jail::expect_with(|jail| {
            for (var, value, expected) in [
                ("DEMO_QUEUE", "0", "queue: must be at least 1"),
                (
                    "DEMO_REDIS__TIMEOUT",
                    "0s",
                    "redis.timeout: must be longer than 0s",
                ),
                ("DEMO_REDIS__URL", "", "redis.url: is not set"),
                (
                    "DEMO_POSTGRES__MAX_CONNECTIONS",
                    "0",
                    "postgres.max_connections: must be at least 1",
                ),
                (
                    "DEMO_IDLE_TIMEOUT",
                    "15s",
                    "idle_timeout: must be longer than heartbeat (15s), not 15s",
                ),
            ] {
                jail.clear_env();
                jail.set_env(var, value);
                assert_eq!(refusal(load::<Demo>(None)), expected, "{var}={value}");
            }
            Ok(())
        });
    }

    #[test]
    fn checks() {
        assert_eq!(
            check::whole_seconds("jwt_leeway", Duration::from_millis(1500))
                .unwrap_err()
                .to_string(),
            "jwt_leeway: must be a whole number of seconds, not 1s 500ms"
        );
        assert!(check::whole_seconds("jwt_leeway", Duration::ZERO).is_ok());
        assert!(check::not_empty("influx.database", " ").is_err());
        let empty = SecretString::from("");
        assert_eq!(
            check::optional_secret_set("token", Some(&empty))
                .unwrap_err()
                .within("influx")
                .key(),
            "influx.token"
        );
        assert!(check::optional_secret_set("token", None).is_ok());
        assert!(check::at_least_one("n", 1_u32).is_ok());
        let (short, long) = (Duration::from_millis(100), Duration::from_secs(5));
        assert!(check::not_shorter_than("retry_max", short, "retry_initial", short).is_ok());
        assert!(check::not_shorter_than("retry_max", long, "retry_initial", short).is_ok());
        assert_eq!(
            check::not_shorter_than("retry_max", short, "retry_initial", long)
                .unwrap_err()
                .to_string(),
            "retry_max: must not be shorter than retry_initial (5s), not 100ms"
        );
    }
}
