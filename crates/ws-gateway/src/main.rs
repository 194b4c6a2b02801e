//! `ws-gateway`: loads the configuration and serves.
//!
//! Configuration: defaults, then the TOML file named by `--config FILE` or
//! `CELLMON_GATEWAY_CONFIG`, then `CELLMON_GATEWAY_*` variables. A bad
//! configuration exits with status 64 and says what is wrong.

use std::path::PathBuf;
use std::process::ExitCode;

use cellmon_gateway::{Config, serve};

fn main() -> ExitCode {
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

    let mut args = std::env::args().skip(1);
    let mut file = std::env::var_os("CELLMON_GATEWAY_CONFIG").map(PathBuf::from);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" => file = args.next().map(PathBuf::from),
            "--help" | "-h" => {
                eprintln!(
                    "usage: ws-gateway [--config FILE]   (see CELLMON_GATEWAY_* in docs/gateway.md)"
                );
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("ws-gateway: unknown argument {other:?}");
                return ExitCode::from(64);
            }
        }
    }
    let config = match Config::load(file.as_deref()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("ws-gateway: bad configuration: {error}");
            return ExitCode::from(64);
        }
    };

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("ws-gateway: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        serve(config, listener, shutdown_signal()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ws-gateway: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
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
    tracing::info!("shutting down: closing sockets with 1001");
}
