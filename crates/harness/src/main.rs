//! `harness`: run the backends locally, and serve as the test run's setup
//! script. See `harness --help`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use cellmon_harness::backend::BackendKind;
use cellmon_harness::docker::Docker;
use cellmon_harness::stack::Stack;
use cellmon_harness::supervise;

#[derive(Debug, Parser)]
#[command(
    name = "harness",
    version,
    about = "Cell Monitor's harness: real backends, faults, tests"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start Postgres, Redis and InfluxDB locally, print their URLs, and run
    /// until Ctrl-C (or SIGTERM), then remove them.
    Up {
        /// Also write the URLs to this file as KEY=VALUE lines.
        #[arg(long)]
        env_file: Option<PathBuf>,
    },
    /// nextest setup script: start the backends shared by one test run and
    /// hand their addresses to the tests through $NEXTEST_ENV.
    TestBackends {
        #[arg(long, hide = true)]
        serve: bool,
        #[arg(long, hide = true, requires = "serve")]
        watch_pid: Option<u32>,
        #[arg(long, hide = true, requires = "serve")]
        ready_file: Option<PathBuf>,
        #[arg(long, hide = true, requires = "serve")]
        log_file: Option<PathBuf>,
    },
    /// Remove harness containers whose owner has exited, waiting up to
    /// --wait seconds for running supervisors to finish their own clean-up.
    Cleanup {
        #[arg(long, default_value_t = 0)]
        wait: u64,
    },
}

fn main() -> ExitCode {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("harness: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(Cli::parse())) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("harness: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::Up { env_file } => up(env_file).await?,
        Cmd::TestBackends { serve: false, .. } => supervise::setup().await?,
        Cmd::TestBackends {
            serve: true,
            watch_pid,
            ready_file,
            log_file,
        } => {
            let (Some(pid), Some(file)) = (watch_pid, ready_file) else {
                anyhow::bail!("--serve needs --watch-pid and --ready-file");
            };
            supervise::serve(pid, &file, log_file.as_deref()).await?;
        }
        Cmd::Cleanup { wait } => {
            let left = supervise::cleanup(Duration::from_secs(wait)).await?;
            if left > 0 {
                eprintln!("harness: {left} harness container(s) still belong to running processes");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn up(env_file: Option<PathBuf>) -> anyhow::Result<()> {
    let docker = Docker::connect().await?;
    eprintln!("starting postgres, redis and influxdb ...");
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // A signal during start-up drops the half-started stack, which removes
    // whatever containers it had created.
    let stack = tokio::select! {
        stack = Stack::start(&docker) => stack?,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("interrupted during start-up; backends removed");
            return Ok(());
        }
        _ = terminate.recv() => {
            eprintln!("terminated during start-up; backends removed");
            return Ok(());
        }
    };
    let mut env = String::new();
    for kind in BackendKind::ALL {
        let var = format!("CELLMON_{}_URL", kind.name().to_uppercase());
        env.push_str(&format!("{var}={}\n", stack.backend(kind).url()));
    }
    if let Some(path) = env_file {
        supervise::write_atomically(&path, &env)?;
    }
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{env}")?;
        writeln!(out, "ready; press Ctrl-C to stop and remove the backends")?;
    }
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    eprintln!("stopping ...");
    stack.shutdown().await?;
    eprintln!("backends removed");
    Ok(())
}
