//! The gateway's configuration: defaults, then an optional TOML file, then
//! `CELLMON_GATEWAY_*` environment variables, nested with `__` (e.g.
//! `CELLMON_GATEWAY_JWT_SECRET`, `CELLMON_GATEWAY_REDIS__TIMEOUT=2s`,
//! `CELLMON_GATEWAY_ALLOWED_ORIGINS=[a,b]`), checked once by
//! [`Settings::validate`] so that nothing after start-up meets a value it
//! cannot use.

use std::path::Path;
use std::time::Duration;

use cellmon_service::{
    ConfigError, Invalid, ListenSettings, PostgresSettings, RedisSettings, Settings, check,
};
use cellmon_store::messages::MAX_PAGE;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

/// Everything the gateway needs. Tests build it directly; [`crate::state`]
/// validates it as loading does.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where `main` listens (tests pass their own listener).
    pub listen: ListenSettings,
    /// Redis with the live channels and histories; its `prefix` is the
    /// persister's, and its `timeout` bounds every command (history,
    /// position, 1:1 publish).
    pub redis: RedisSettings,
    /// Postgres with the class data (snapshots, who teaches what, messages).
    pub postgres: PostgresSettings,
    /// The HS256 secret instructor tokens are signed with. Required: the
    /// gateway refuses to start without one (exit status 64).
    #[serde(skip_serializing)]
    pub jwt_secret: SecretString,
    /// Clock skew tolerated on `exp` and `nbf` (whole seconds, as JWT
    /// times are).
    #[serde(with = "cellmon_service::duration")]
    pub jwt_leeway: Duration,
    /// Lifetime of a WebSocket ticket (for browsers, which cannot set the
    /// protocol header to a token of their choosing before the upgrade);
    /// whole seconds.
    #[serde(with = "cellmon_service::duration")]
    pub ticket_lifetime: Duration,
    /// Browser origins allowed to open a socket (`https://host[:port]`,
    /// exact match; `*` allows any). A request without `Origin` (not a
    /// browser) is allowed; it still needs a token.
    pub allowed_origins: Vec<String>,
    /// Most open sockets; beyond it the upgrade is refused with 503.
    pub max_connections: usize,
    /// Most classes one socket may subscribe to.
    pub max_subscriptions: usize,
    /// Messages queued for one socket; a socket that falls this far behind
    /// is resynced (its subscriptions dropped, a `resync` sent).
    pub queue_capacity: usize,
    /// Messages written to a socket before one flush.
    pub write_batch: usize,
    /// Longest a write to one socket may block before it is closed.
    #[serde(with = "cellmon_service::duration")]
    pub write_timeout: Duration,
    /// Kernel send buffer per socket: small, so a stalled reader shows up
    /// as a full queue within a second instead of megabytes later. 0
    /// leaves the kernel's default.
    pub socket_send_buffer_bytes: usize,
    /// A socket resynced more than this many times within a minute is
    /// closed (1013); 0 closes it at its first resync.
    pub max_resyncs_per_minute: u32,
    /// Largest client message.
    pub max_message_bytes: usize,
    /// Client messages per second per socket, and the burst above it.
    pub client_messages_per_second: u32,
    pub client_message_burst: u32,
    /// How often the server pings a socket; a socket silent for
    /// `idle_timeout` (no message, no pong) is closed.
    #[serde(with = "cellmon_service::duration")]
    pub heartbeat: Duration,
    #[serde(with = "cellmon_service::duration")]
    pub idle_timeout: Duration,
    /// How often the Redis pub/sub connection is pinged, and how long its
    /// answer (or a new subscription) may take before it is made anew.
    #[serde(with = "cellmon_service::duration")]
    pub pubsub_ping: Duration,
    /// Unread 1:1 messages pushed to a newly connected dashboard: 1 to a
    /// page of messages ([`cellmon_store::messages::MAX_PAGE`]).
    pub unread_on_connect: u32,
    /// Longest shutdown waits for sockets to take their close frame.
    #[serde(with = "cellmon_service::duration")]
    pub shutdown_grace: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: ListenSettings::port(8081),
            redis: RedisSettings {
                timeout: Duration::from_secs(2),
                ..RedisSettings::default()
            },
            postgres: PostgresSettings {
                max_connections: 8,
                timeout: Duration::from_secs(5),
                ..PostgresSettings::default()
            },
            jwt_secret: SecretString::from(""),
            jwt_leeway: Duration::from_secs(30),
            ticket_lifetime: Duration::from_secs(30),
            allowed_origins: Vec::new(),
            max_connections: 10_000,
            max_subscriptions: 16,
            queue_capacity: 512,
            write_batch: 64,
            write_timeout: Duration::from_secs(3),
            socket_send_buffer_bytes: 64 * 1024,
            max_resyncs_per_minute: 3,
            max_message_bytes: 16 * 1024,
            client_messages_per_second: 20,
            client_message_burst: 40,
            heartbeat: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(45),
            pubsub_ping: Duration::from_secs(5),
            unread_on_connect: 100,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

impl Settings for Config {
    const ENV_PREFIX: &'static str = "CELLMON_GATEWAY_";
    // CELLMON_GATEWAY_CONFIG names the file; the URLs are what `harness
    // up` prints for clients.
    const NOT_SETTINGS: &'static [&'static str] = &["config", "url", "http_url"];

    fn validate(&self) -> Result<(), Invalid> {
        if check::secret_set("jwt_secret", &self.jwt_secret).is_err() {
            return Err(Invalid::new(
                "jwt_secret",
                "is not set: instructors' tokens could not be checked",
            ));
        }
        self.redis.validate().map_err(|e| e.within("redis"))?;
        self.postgres.validate().map_err(|e| e.within("postgres"))?;
        check::whole_seconds("jwt_leeway", self.jwt_leeway)?;
        check::not_zero("ticket_lifetime", self.ticket_lifetime)?;
        check::whole_seconds("ticket_lifetime", self.ticket_lifetime)?;
        for (i, origin) in self.allowed_origins.iter().enumerate() {
            check_origin(origin).map_err(|reason| {
                Invalid::new(
                    format!("allowed_origins[{i}]"),
                    format!("{origin:?} {reason}"),
                )
            })?;
        }
        check::at_least_one("max_connections", self.max_connections)?;
        check::at_least_one("max_subscriptions", self.max_subscriptions)?;
        check::at_least_one("queue_capacity", self.queue_capacity)?;
        check::at_least_one("write_batch", self.write_batch)?;
        check::not_zero("write_timeout", self.write_timeout)?;
        check::at_least_one("max_message_bytes", self.max_message_bytes)?;
        check::at_least_one(
            "client_messages_per_second",
            self.client_messages_per_second,
        )?;
        check::at_least_one("client_message_burst", self.client_message_burst)?;
        check::not_zero("heartbeat", self.heartbeat)?;
        check::longer_than(
            "idle_timeout",
            self.idle_timeout,
            "heartbeat",
            self.heartbeat,
        )?;
        check::not_zero("pubsub_ping", self.pubsub_ping)?;
        if !(1..=MAX_PAGE).contains(&i64::from(self.unread_on_connect)) {
            return Err(Invalid::new(
                "unread_on_connect",
                format!("must be between 1 and {MAX_PAGE} (a page of messages)"),
            ));
        }
        check::not_zero("shutdown_grace", self.shutdown_grace)
    }
}

/// An allowed origin is compared with a browser's `Origin` header, which
/// is `scheme://host[:port]`: anything else would never match.
fn check_origin(origin: &str) -> Result<(), &'static str> {
    if origin == "*" {
        return Ok(());
    }
    let Some(host) = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
    else {
        return Err("is not an origin: it must start with https:// or http://, or be *");
    };
    let host = host.trim_end_matches('/');
    if host.is_empty() || host.contains('/') {
        Err("is not an origin: it has no host, or has a path")
    } else {
        Ok(())
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
    fn file_then_environment() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("CELLMON_GATEWAY_URL", "ws://127.0.0.1:8081/ws");
            jail.create_file(
                "gateway.toml",
                r#"
                jwt_secret = "from-file"
                allowed_origins = ["https://dash.example.edu"]
                queue_capacity = 64
                heartbeat = "10s"
                [redis]
                url = "redis://from-file:6379/"
                timeout = "750ms"
                "#,
            )?;
            jail.set_env("CELLMON_GATEWAY_QUEUE_CAPACITY", "128");
            jail.set_env("CELLMON_GATEWAY_REDIS__TIMEOUT", "1s");
            jail.set_env("CELLMON_GATEWAY_LISTEN__ADDR", "127.0.0.1:18081");
            let config =
                Config::load(Some(Path::new("gateway.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(config.jwt_secret.expose_secret(), "from-file");
            assert_eq!(config.allowed_origins, ["https://dash.example.edu"]);
            assert_eq!(config.queue_capacity, 128);
            assert_eq!(config.heartbeat, Duration::from_secs(10));
            assert_eq!(config.redis.url.expose_secret(), "redis://from-file:6379/");
            assert_eq!(config.redis.timeout, Duration::from_secs(1));
            assert_eq!(config.listen.addr.to_string(), "127.0.0.1:18081");
            assert_eq!(config.idle_timeout, Config::default().idle_timeout);
            assert_eq!(config.postgres.timeout, Duration::from_secs(5));
            let debug = format!("{config:?}");
            assert!(
                !debug.contains("from-file"),
                "secrets are not printed: {debug}"
            );
            Ok(())
        });
    }

    #[test]
    fn unknown_and_unusable_settings_are_refused_by_key() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("typo.toml", "jwt_secret = \"s\"\nqueue_capacty = 64")?;
            let typo = refusal(Config::load(Some(Path::new("typo.toml"))));
            assert!(typo.starts_with("queue_capacty: unknown key"), "{typo}");
            assert_eq!(
                refusal(Config::load(None)),
                "jwt_secret: is not set: instructors' tokens could not be checked"
            );
            for (var, value, expected) in [
                (
                    "CELLMON_GATEWAY_IDLE_TIMEOUT",
                    "100ms",
                    "idle_timeout: must be longer than heartbeat (15s), not 100ms",
                ),
                (
                    "CELLMON_GATEWAY_QUEUE_CAPACITY",
                    "0",
                    "queue_capacity: must be at least 1",
                ),
                (
                    "CELLMON_GATEWAY_REDIS__TIMEOUT",
                    "0s",
                    "redis.timeout: must be longer than 0s",
                ),
                (
                    "CELLMON_GATEWAY_POSTGRES__MAX_CONNECTIONS",
                    "0",
                    "postgres.max_connections: must be at least 1",
                ),
                (
                    "CELLMON_GATEWAY_UNREAD_ON_CONNECT",
                    "500",
                    "unread_on_connect: must be between 1 and 200 (a page of messages)",
                ),
                (
                    "CELLMON_GATEWAY_TICKET_LIFETIME",
                    "1500ms",
                    "ticket_lifetime: must be a whole number of seconds, not 1s 500ms",
                ),
                (
                    "CELLMON_GATEWAY_ALLOWED_ORIGINS",
                    "[https://ok.example,dash.example.edu]",
                    "allowed_origins[1]: \"dash.example.edu\" is not an origin: \
                     it must start with https:// or http://, or be *",
                ),
            ] {
                jail.clear_env();
                jail.set_env("CELLMON_GATEWAY_JWT_SECRET", "s");
                jail.set_env(var, value);
                assert_eq!(refusal(Config::load(None)), expected, "{var}={value}");
            }
            jail.clear_env();
            jail.set_env("CELLMON_GATEWAY_JWT_SECRET", "s");
            Config::load(None).map_err(|e| e.to_string())?;
            Ok(())
        });
    }

    #[test]
    fn origins() {
        for good in ["*", "https://dash.example.edu", "http://localhost:8081/"] {
            assert_eq!(check_origin(good), Ok(()), "{good}");
        }
        for bad in ["dash.example.edu", "https://", "https://host/path", ""] {
            assert!(check_origin(bad).is_err(), "{bad}");
        }
    }
}
