//! `harness`: run the backends locally, and serve as the test run's setup
//! script. See `harness --help`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use cellmon_domain::lms::ClassId;
use cellmon_harness::backend::BackendKind;
use cellmon_harness::docker::Docker;
use cellmon_harness::stack::Stack;
use cellmon_harness::supervise;
use cellmon_ingest::config::ClassToken;

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
    /// Start Postgres, Redis and InfluxDB locally and the ingest server in
    /// front of them, print their URLs, and run until Ctrl-C (or SIGTERM),
    /// then stop the server and remove the backends.
    Up {
        /// Also write the URLs to this file as KEY=VALUE lines.
        #[arg(long)]
        env_file: Option<PathBuf>,
        /// Port of the ingest server on 127.0.0.1 (0: any free port).
        #[arg(long, default_value_t = 8080)]
        ingest_port: u16,
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
    /// Offer an open-loop load to an ingest server and report accepted
    /// events/s and latency percentiles (JSON on stdout).
    Load {
        /// Events URL, e.g. http://127.0.0.1:8080/api/v1/events?token=...
        #[arg(long)]
        url: String,
        /// Events per second offered.
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        /// Events per request.
        #[arg(long, default_value_t = 1)]
        batch: u32,
        /// Seconds to run.
        #[arg(long, default_value_t = 20)]
        duration: u64,
        /// Most requests in flight.
        #[arg(long, default_value_t = 256)]
        max_in_flight: usize,
        /// Students the events are spread over.
        #[arg(long, default_value_t = 100)]
        students: u32,
        /// Client addresses (127.0.1.1 ...) the requests come from.
        #[arg(long, default_value_t = 100)]
        clients: u8,
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
        Cmd::Up {
            env_file,
            ingest_port,
        } => up(env_file, ingest_port).await?,
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
        Cmd::Load {
            url,
            rate,
            batch,
            duration,
            max_in_flight,
            students,
            clients,
        } => {
            let spec = cellmon_harness::load::LoadSpec {
                url,
                rate,
                batch,
                duration: Duration::from_secs(duration),
                max_in_flight,
                students,
                clients,
            };
            eprintln!("offering {rate} events/s in batches of {batch} for {duration} s ...");
            let report = cellmon_harness::load::run(spec).await?;
            use std::io::Write as _;
            writeln!(
                std::io::stdout().lock(),
                "{}",
                serde_json::to_string_pretty(&report)?
            )?;
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

async fn up(env_file: Option<PathBuf>, ingest_port: u16) -> anyhow::Result<()> {
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

    // The ingest server, in this process, with one class and its token; in
    // open mode too, so the extension works without a token.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", ingest_port))
        .await
        .map_err(|e| {
            anyhow::anyhow!("cannot listen on 127.0.0.1:{ingest_port} ({e}); try --ingest-port")
        })?;
    let ingest_addr = listener.local_addr()?;
    let class_id = ClassId::random();
    let token = format!("dev-{}", uuid::Uuid::new_v4().simple());
    let spool_dir = std::env::temp_dir().join(format!("cellmon-up-{}", std::process::id()));
    let mut config = cellmon_ingest::Config {
        redis_url: stack.redis.url().into(),
        classes: vec![ClassToken {
            class_id,
            token: token.clone().into(),
        }],
        open_class: Some(class_id),
        ..cellmon_ingest::Config::default()
    };
    config.spool.dir = spool_dir.clone();
    let (stop_ingest, ingest_stopped) = tokio::sync::oneshot::channel::<()>();
    let ingest = tokio::spawn(cellmon_ingest::serve(config, listener, async {
        let _ = ingest_stopped.await;
    }));

    let mut env = String::new();
    for kind in BackendKind::ALL {
        let var = format!("CELLMON_{}_URL", kind.name().to_uppercase());
        env.push_str(&format!("{var}={}\n", stack.backend(kind).url()));
    }
    env.push_str(&format!("CELLMON_INGEST_URL=http://{ingest_addr}\n"));
    env.push_str(&format!("CELLMON_CLASS_ID={class_id}\n"));
    env.push_str(&format!("CELLMON_INGEST_TOKEN={token}\n"));
    if let Some(path) = env_file {
        supervise::write_atomically(&path, &env)?;
    }
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{env}")?;
        writeln!(
            out,
            "events: POST http://{ingest_addr}/api/v1/events?token={token} (or without a token)"
        )?;
        writeln!(out, "ready; press Ctrl-C to stop and remove the backends")?;
    }
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    eprintln!("stopping ...");
    let _ = stop_ingest.send(());
    match ingest.await {
        Ok(Err(error)) => eprintln!("ingest server: {error:#}"),
        Err(error) => eprintln!("ingest server task: {error}"),
        Ok(Ok(())) => {}
    }
    stack.shutdown().await?;
    let _ = std::fs::remove_dir_all(&spool_dir);
    eprintln!("backends removed");
    Ok(())
}
