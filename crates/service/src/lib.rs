//! What Cell Monitor's server binaries share, so each `main.rs` only names
//! its configuration and its `serve`:
//!
//! * [`settings`]: the [`Settings`] a binary's configuration implements,
//!   [`load`] (defaults, then an optional TOML file, then `<PREFIX>*`
//!   environment variables with `__` for nesting, then validation), and the
//!   [`Invalid`] key and reason a refusal names;
//! * [`backends`]: the settings written the same way by every binary:
//!   [`RedisSettings`], [`PostgresSettings`], [`InfluxSettings`],
//!   [`ListenSettings`];
//! * [`metrics`]: the process metrics and `cellmon_build_info` every
//!   binary registers, and the optional separate metrics listener;
//! * [`bearer()`]: the one reading of `Authorization: Bearer`;
//! * [`run`]: logging, arguments (`--config FILE`), the runtime, the
//!   listener, and SIGINT/SIGTERM as the shutdown signal. A bad
//!   configuration exits with status 64 and prints
//!   `<bin>: bad configuration: <key>: <reason>`, and so does a
//!   [`BadSetting`] that `serve` returns.

pub mod backends;
mod bearer;
pub mod metrics;
pub mod settings;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::ExitCode;

pub use backends::{InfluxSettings, ListenSettings, PostgresSettings, RedisSettings};
pub use bearer::bearer;
pub use settings::{ConfigError, Invalid, Settings, check, duration, load};

/// The exit status of a bad configuration or command line (EX_USAGE).
pub const EXIT_BAD_CONFIG: u8 = 64;

/// A start-up failure that is the configuration's fault although the
/// configuration loaded: a setting names something this process cannot
/// have (such as a spool directory another process holds). `serve` returns
/// it (anywhere in its error's chain) and [`run`] exits with
/// [`EXIT_BAD_CONFIG`], as for a configuration that does not load.
#[derive(Debug, thiserror::Error)]
#[error("{}", match .setting {
    Some(setting) => format!("the setting `{setting}` cannot be used"),
    None => "the settings cannot be used".to_owned(),
})]
pub struct BadSetting {
    setting: Option<&'static str>,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl BadSetting {
    /// `setting` (its name as in the configuration file) cannot be used,
    /// because of `source`.
    pub fn new(
        setting: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self {
            setting: Some(setting),
            source: source.into(),
        }
    }

    /// The settings together cannot be used; `source` says which and why.
    pub fn settings(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self {
            setting: None,
            source: source.into(),
        }
    }

    /// The setting's name, when one alone is at fault.
    pub fn setting(&self) -> Option<&'static str> {
        self.setting
    }
}

/// Logs to stderr: JSON when `CELLMON_LOG_FORMAT=json`, the filter from
/// `RUST_LOG` (default `info`).
pub fn init_tracing() {
    let json = std::env::var("CELLMON_LOG_FORMAT").is_ok_and(|f| f == "json");
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
    tracing::info!("shutting down");
}

/// The shutdown signal handed to `serve`.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A server binary: its name, the variable naming its config file, and
/// where its settings are documented.
#[derive(Debug, Clone, Copy)]
pub struct Binary {
    pub name: &'static str,
    pub config_var: &'static str,
    pub docs: &'static str,
}

/// The whole `main` of a server binary: logging, `--config FILE` (or the
/// binary's config variable), `load`, a multi-threaded runtime, a listener
/// on `listen(&config)`, and `serve` until SIGINT or SIGTERM. `load` is
/// [`load`]`::<Config>` (or a wrapper of it); a refusal is printed one key
/// per line and exits with [`EXIT_BAD_CONFIG`].
pub fn run<C, Fut>(
    binary: Binary,
    load: impl FnOnce(Option<&Path>) -> Result<C, ConfigError>,
    listen: impl FnOnce(&C) -> SocketAddr,
    serve: impl FnOnce(C, tokio::net::TcpListener, Shutdown) -> Fut,
) -> ExitCode
where
    Fut: Future<Output = anyhow::Result<()>>,
{
    init_tracing();
    let name = binary.name;
    let mut args = std::env::args().skip(1);
    let mut file = std::env::var_os(binary.config_var).map(PathBuf::from);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" => file = args.next().map(PathBuf::from),
            "--help" | "-h" => {
                eprintln!(
                    "usage: {name} [--config FILE]   (settings: {})",
                    binary.docs
                );
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("{name}: unknown argument {other:?}");
                return ExitCode::from(EXIT_BAD_CONFIG);
            }
        }
    }
    let config = match load(file.as_deref()) {
        Ok(config) => config,
        Err(error) => {
            for problem in error.problems() {
                eprintln!("{name}: bad configuration: {problem}");
            }
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("{name}: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let addr = listen(&config);
    let result = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        serve(config, listener, Box::pin(shutdown_signal())).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.chain().any(|cause| cause.is::<BadSetting>()) => {
            eprintln!("{name}: bad configuration: {error:#}");
            ExitCode::from(EXIT_BAD_CONFIG)
        }
        Err(error) => {
            eprintln!("{name}: {error:#}");
            ExitCode::FAILURE
        }
    }
}
