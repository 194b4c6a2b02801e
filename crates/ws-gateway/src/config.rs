//! The gateway's configuration: defaults, then an optional TOML file, then
//! `CELLMON_GATEWAY_*` environment variables (e.g.
//! `CELLMON_GATEWAY_JWT_SECRET`, `CELLMON_GATEWAY_ALLOWED_ORIGINS=[a,b]`).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

/// Everything the gateway needs. Tests build it directly.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where `main` listens (tests pass their own listener).
    pub listen: SocketAddr,
    /// Redis with the live channels and histories. Secret: it may carry a
    /// password.
    #[serde(skip_serializing)]
    pub redis_url: SecretString,
    /// Prefix of every Redis key (the same as the persister's).
    pub stream_prefix: String,
    /// Longest a Redis command (history, position) may take.
    pub redis_timeout_ms: u64,
    /// Postgres with the class data (snapshots, who teaches what, messages).
    #[serde(skip_serializing)]
    pub postgres_url: SecretString,
    pub postgres_max_connections: u32,
    /// Longest a Postgres statement may take.
    pub postgres_timeout_ms: u64,
    /// The HS256 secret instructor tokens are signed with. Required: the
    /// gateway refuses to start without one (exit status 64).
    #[serde(skip_serializing)]
    pub jwt_secret: SecretString,
    /// Clock skew tolerated on `exp` and `nbf`.
    pub jwt_leeway_seconds: u64,
    /// Lifetime of a WebSocket ticket (for browsers, which cannot set the
    /// protocol header to a token of their choosing before the upgrade).
    pub ticket_seconds: u64,
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
    pub write_timeout_ms: u64,
    /// Kernel send buffer per socket: small, so a stalled reader shows up
    /// as a full queue within a second instead of megabytes later.
    pub socket_send_buffer_bytes: usize,
    /// A socket resynced this many times within a minute is closed (1013).
    pub max_resyncs_per_minute: u32,
    /// Largest client message.
    pub max_message_bytes: usize,
    /// Client messages per second per socket, and the burst above it.
    pub client_messages_per_second: u32,
    pub client_message_burst: u32,
    /// How often the server pings; a socket silent for `idle_timeout_ms`
    /// (no message, no pong) is closed.
    pub heartbeat_ms: u64,
    pub idle_timeout_ms: u64,
    /// Unread 1:1 messages pushed to a newly connected dashboard.
    pub unread_on_connect: i64,
    /// Longest shutdown waits for sockets to take their close frame.
    pub shutdown_grace_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8081)),
            redis_url: SecretString::from("redis://127.0.0.1:6379/"),
            stream_prefix: "cellmon:".into(),
            redis_timeout_ms: 2_000,
            postgres_url: SecretString::from("postgres://postgres@127.0.0.1:5432/cellmon"),
            postgres_max_connections: 8,
            postgres_timeout_ms: 5_000,
            jwt_secret: SecretString::from(""),
            jwt_leeway_seconds: 30,
            ticket_seconds: 30,
            allowed_origins: Vec::new(),
            max_connections: 10_000,
            max_subscriptions: 16,
            queue_capacity: 512,
            write_batch: 64,
            write_timeout_ms: 3_000,
            socket_send_buffer_bytes: 64 * 1024,
            max_resyncs_per_minute: 3,
            max_message_bytes: 16 * 1024,
            client_messages_per_second: 20,
            client_message_burst: 40,
            heartbeat_ms: 15_000,
            idle_timeout_ms: 45_000,
            unread_on_connect: 100,
            shutdown_grace_ms: 5_000,
        }
    }
}

impl Config {
    pub fn load(file: Option<&Path>) -> Result<Self, Box<figment::Error>> {
        // CELLMON_GATEWAY_CONFIG names the file; the URLs are what
        // `harness up` prints for clients.
        cellmon_service::load_config(
            Config::default(),
            file,
            "CELLMON_GATEWAY_",
            &["config", "url", "http_url"],
        )?
        .checked()
    }

    fn checked(self) -> Result<Self, Box<figment::Error>> {
        match self.problem() {
            Some(problem) => Err(Box::new(figment::Error::from(problem.to_owned()))),
            None => Ok(self),
        }
    }

    /// What makes these settings unusable, if anything.
    pub fn problem(&self) -> Option<&'static str> {
        use secrecy::ExposeSecret as _;
        if self.jwt_secret.expose_secret().is_empty() {
            Some("jwt_secret is not set: instructors' tokens could not be checked")
        } else if self.queue_capacity == 0 || self.write_batch == 0 || self.max_subscriptions == 0 {
            Some("queue_capacity, write_batch and max_subscriptions must be at least 1")
        } else if self.idle_timeout_ms <= self.heartbeat_ms {
            Some("idle_timeout_ms must be longer than heartbeat_ms")
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
    fn file_then_environment() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("CELLMON_GATEWAY_URL", "ws://127.0.0.1:8081/ws");
            jail.create_file(
                "gateway.toml",
                r#"
                jwt_secret = "from-file"
                allowed_origins = ["https://dash.example.edu"]
                queue_capacity = 64
                "#,
            )?;
            jail.set_env("CELLMON_GATEWAY_QUEUE_CAPACITY", "128");
            let config =
                Config::load(Some(Path::new("gateway.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(config.jwt_secret.expose_secret(), "from-file");
            assert_eq!(config.allowed_origins, ["https://dash.example.edu"]);
            assert_eq!(config.queue_capacity, 128);
            assert_eq!(config.heartbeat_ms, Config::default().heartbeat_ms);
            Ok(())
        });
    }

    #[test]
    fn unknown_and_unusable_settings_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("typo.toml", "jwt_secret = \"s\"\nqueue_capacty = 64")?;
            assert!(Config::load(Some(Path::new("typo.toml"))).is_err());
            let no_secret = Config::load(None).expect_err("no secret");
            assert!(no_secret.to_string().contains("jwt_secret"), "{no_secret}");
            jail.create_file("idle.toml", "jwt_secret = \"s\"\nidle_timeout_ms = 100")?;
            assert!(Config::load(Some(Path::new("idle.toml"))).is_err());
            Ok(())
        });
    }
}
