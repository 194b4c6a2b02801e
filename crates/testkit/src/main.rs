//! `testkit`: the test run's shared backends (the nextest setup script) and
//! the sweep of containers a killed run left behind.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use cellmon_testkit::supervise;

#[derive(Debug, Parser)]
#[command(
    name = "testkit",
    version,
    about = "Backends for Cell Monitor's test runs: shared per run, swept afterwards"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// nextest setup script: start the backends shared by one test run and
    /// hand their addresses to the tests through $NEXTEST_ENV (printed
    /// when run by hand).
    Backends {
        #[arg(long, hide = true)]
        serve: bool,
        #[arg(long, hide = true, requires = "serve")]
        watch_pid: Option<u32>,
        #[arg(long, hide = true, requires = "serve")]
        ready_file: Option<PathBuf>,
        #[arg(long, hide = true, requires = "serve")]
        log_file: Option<PathBuf>,
    },
    /// Remove test containers whose owner has exited, waiting up to --wait
    /// seconds for running supervisors to finish their own clean-up.
    Cleanup {
        #[arg(long, default_value_t = 0)]
        wait: u64,
    },
}

fn main() -> ExitCode {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
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
            eprintln!("testkit: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(Cli::parse())) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("testkit: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::Backends { serve: false, .. } => supervise::setup().await?,
        Cmd::Backends {
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
                eprintln!("testkit: {left} test container(s) still belong to running processes");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
