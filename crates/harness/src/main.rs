//! `harness`: run the backends locally, and serve as the test run's setup
//! script. See `harness --help`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use cellmon_domain::lms::ClassId;
use cellmon_harness::backend::BackendKind;
use cellmon_harness::docker::Docker;
use cellmon_harness::influx::InfluxClient;
use cellmon_harness::stack::Stack;
use cellmon_harness::supervise;
use cellmon_harness::verify::{self, Ledger};
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
    /// Start Postgres, Redis and InfluxDB locally, the ingest server in
    /// front of them, the persister behind them and the WebSocket gateway
    /// for dashboards, print their URLs (with a class, its token, and an
    /// instructor's token), and run until Ctrl-C (or SIGTERM), then stop
    /// everything and remove the backends.
    Up {
        /// Also write the URLs to this file as KEY=VALUE lines.
        #[arg(long)]
        env_file: Option<PathBuf>,
        /// Port of the ingest server on 127.0.0.1 (0: any free port).
        #[arg(long, default_value_t = 8080)]
        ingest_port: u16,
        /// Port of the WebSocket gateway on 127.0.0.1 (0: any free port).
        #[arg(long, default_value_t = 8081)]
        gateway_port: u16,
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
        /// Write the ledger (every event id and its outcome, JSON Lines)
        /// here, for `harness verify`.
        #[arg(long)]
        ledger: Option<PathBuf>,
    },
    /// Benchmark a gateway's fan-out: open dashboard sockets on a class of
    /// the benchmark's own, publish live messages into Redis at a fixed
    /// rate, and report the delivery latency from publication to socket
    /// (JSON on stdout). Defaults come from the variables `harness up`
    /// prints.
    Fanout {
        /// The gateway's socket URL.
        #[arg(long, env = "CELLMON_GATEWAY_URL")]
        url: String,
        #[arg(long, env = "CELLMON_REDIS_URL")]
        redis_url: String,
        /// The Redis key prefix the gateway uses.
        #[arg(long, default_value = "cellmon:")]
        prefix: String,
        /// The database the gateway reads (the benchmark adds its class
        /// and instructor there).
        #[arg(long, env = "CELLMON_DATABASE_URL")]
        postgres_url: String,
        /// The gateway's JWT secret.
        #[arg(long, env = "CELLMON_JWT_SECRET", hide_env_values = true)]
        jwt_secret: String,
        #[arg(long, default_value_t = 100)]
        sockets: usize,
        /// Live messages per second (0: open the sockets, hold, measure
        /// memory).
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        /// Seconds to publish.
        #[arg(long, default_value_t = 20)]
        duration: u64,
        /// The gateway's process id, to report its memory.
        #[arg(long)]
        gateway_pid: Option<u32>,
    },
    /// Check a ledger against Postgres and InfluxDB: lost, duplicates and
    /// unexpected events per sink, and their agreement per student and
    /// event type. Exits with 1 when the check fails. Defaults come from
    /// the variables `harness up` prints.
    Verify {
        /// The ledger written by `harness load --ledger`; repeat it to check
        /// several runs into the same class together.
        #[arg(long, required = true)]
        ledger: Vec<PathBuf>,
        /// Postgres database the persister writes.
        #[arg(long, env = "CELLMON_DATABASE_URL")]
        postgres_url: String,
        #[arg(long, env = "CELLMON_INFLUXDB_URL")]
        influx_url: String,
        #[arg(long, env = "CELLMON_INFLUX_DATABASE", default_value = "cellmon")]
        influx_database: String,
        /// Only this class (default: everything stored).
        #[arg(long, env = "CELLMON_CLASS_ID")]
        class: Option<uuid::Uuid>,
        /// Keep checking until the check passes or this many seconds
        /// passed (the sinks may still be catching up).
        #[arg(long, default_value_t = 60)]
        wait: u64,
        /// Print the verdict as JSON instead of a summary.
        #[arg(long)]
        json: bool,
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
            gateway_port,
        } => up(env_file, ingest_port, gateway_port).await?,
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
            ledger,
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
            let (report, events) = cellmon_harness::load::run(spec).await?;
            if let Some(path) = ledger {
                events.write(&path)?;
                eprintln!(
                    "ledger of {} events written to {}",
                    events.len(),
                    path.display()
                );
            }
            print_json(&report)?;
        }
        Cmd::Fanout {
            url,
            redis_url,
            prefix,
            postgres_url,
            jwt_secret,
            sockets,
            rate,
            duration,
            gateway_pid,
        } => {
            let spec = cellmon_harness::fanout::FanoutSpec {
                url,
                redis_url,
                prefix,
                postgres_url,
                jwt_secret,
                sockets,
                rate,
                duration: Duration::from_secs(duration),
                gateway_pid,
            };
            eprintln!("{sockets} sockets, {rate} live messages/s for {duration} s ...");
            let report = cellmon_harness::fanout::run(spec).await?;
            print_json(&report)?;
        }
        Cmd::Verify {
            ledger,
            postgres_url,
            influx_url,
            influx_database,
            class,
            wait,
            json,
        } => {
            let mut combined = Ledger::new();
            for path in &ledger {
                combined.merge(Ledger::read(path)?);
            }
            let ledger = combined;
            let pool = sqlx::PgPool::connect(&postgres_url).await?;
            let influx = InfluxClient::new(&influx_url)?;
            let deadline = std::time::Instant::now() + Duration::from_secs(wait);
            let verdict = loop {
                let verdict =
                    verify::verify(&ledger, &pool, &influx, &influx_database, class).await?;
                if verdict.passes() || std::time::Instant::now() >= deadline {
                    break verdict;
                }
                eprintln!(
                    "  waiting for the sinks: postgres {} / influxdb {} of {} acknowledged",
                    verdict.acknowledged - verdict.postgres.lost.len(),
                    verdict.acknowledged - verdict.influx.lost.len(),
                    verdict.acknowledged
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            };
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&verdict)?)?;
            } else {
                writeln!(out, "{}", verdict.summary())?;
            }
            if !verdict.passes() {
                return Ok(ExitCode::FAILURE);
            }
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

async fn up(env_file: Option<PathBuf>, ingest_port: u16, gateway_port: u16) -> anyhow::Result<()> {
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
    // The persister writes to a database of its own, which it migrates.
    let database_url = cellmon_harness::pg::with_database(&stack.postgres.url(), "cellmon");
    create_database(&stack.postgres.url(), "cellmon").await?;
    let mut config = cellmon_ingest::Config {
        role: cellmon_ingest::config::Role::All,
        redis_url: stack.redis.url().into(),
        classes: vec![ClassToken {
            class_id,
            token: token.clone().into(),
        }],
        open_class: Some(class_id),
        ..cellmon_ingest::Config::default()
    };
    config.spool.dir = spool_dir.clone();
    config.persister.postgres_url = database_url.clone().into();
    config.persister.influx_url = stack.influx.url();
    config.persister.influx_database = "cellmon".into();
    // The schema first: the gateway reads it from its first request on.
    let pool = cellmon_store::pg::pool(&cellmon_store::pg::PgConfig {
        url: database_url.clone(),
        max_connections: 2,
        timeout: std::time::Duration::from_secs(10),
    })?;
    cellmon_store::MIGRATOR.run(&pool).await?;
    let instructor = uuid::Uuid::new_v4();
    cellmon_store::classes::register(&pool, class_id, "Local class", Some(&token)).await?;
    cellmon_store::classes::add_instructor(&pool, instructor, "instructor@localhost", "Instructor")
        .await?;
    cellmon_store::classes::assign(&pool, class_id, instructor).await?;
    pool.close().await;

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let signal = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }
    };
    let ingest = tokio::spawn(cellmon_ingest::serve(config, listener, signal()));

    let gateway_listener = tokio::net::TcpListener::bind(("127.0.0.1", gateway_port))
        .await
        .map_err(|e| {
            anyhow::anyhow!("cannot listen on 127.0.0.1:{gateway_port} ({e}); try --gateway-port")
        })?;
    let gateway_addr = gateway_listener.local_addr()?;
    let jwt_secret = uuid::Uuid::new_v4().simple().to_string();
    let gateway_config = cellmon_gateway::Config {
        redis_url: stack.redis.url().into(),
        postgres_url: database_url.clone().into(),
        jwt_secret: jwt_secret.clone().into(),
        allowed_origins: vec![format!("http://{gateway_addr}"), "http://localhost".into()],
        ..cellmon_gateway::Config::default()
    };
    let instructor_token = cellmon_gateway::auth::Verifier::new(&jwt_secret.clone().into(), 0, 30)
        .issue_token(instructor, 7 * 24 * 3600)?;
    let gateway = tokio::spawn(cellmon_gateway::serve(
        gateway_config,
        gateway_listener,
        signal(),
    ));

    let mut env = String::new();
    for kind in BackendKind::ALL {
        let var = format!("CELLMON_{}_URL", kind.name().to_uppercase());
        env.push_str(&format!("{var}={}\n", stack.backend(kind).url()));
    }
    env.push_str(&format!("CELLMON_DATABASE_URL={database_url}\n"));
    env.push_str("CELLMON_INFLUX_DATABASE=cellmon\n");
    env.push_str(&format!("CELLMON_INGEST_URL=http://{ingest_addr}\n"));
    env.push_str(&format!("CELLMON_CLASS_ID={class_id}\n"));
    env.push_str(&format!("CELLMON_INGEST_TOKEN={token}\n"));
    env.push_str(&format!("CELLMON_GATEWAY_URL=ws://{gateway_addr}/ws\n"));
    env.push_str(&format!("CELLMON_GATEWAY_HTTP_URL=http://{gateway_addr}\n"));
    env.push_str(&format!("CELLMON_INSTRUCTOR_ID={instructor}\n"));
    env.push_str(&format!("CELLMON_INSTRUCTOR_TOKEN={instructor_token}\n"));
    env.push_str(&format!("CELLMON_JWT_SECRET={jwt_secret}\n"));
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
        writeln!(
            out,
            "the persister writes them to Postgres ({database_url}) and InfluxDB (database cellmon)"
        )?;
        writeln!(
            out,
            "dashboards: ws://{gateway_addr}/ws with the sub-protocols cellmon.v1 and cellmon.jwt.$CELLMON_INSTRUCTOR_TOKEN"
        )?;
        writeln!(out, "ready; press Ctrl-C to stop and remove the backends")?;
    }
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    eprintln!("stopping ...");
    let _ = stop.send(true);
    for (name, task) in [("ingest server", ingest), ("gateway", gateway)] {
        match task.await {
            Ok(Err(error)) => eprintln!("{name}: {error:#}"),
            Err(error) => eprintln!("{name} task: {error}"),
            Ok(Ok(())) => {}
        }
    }
    stack.shutdown().await?;
    let _ = std::fs::remove_dir_all(&spool_dir);
    eprintln!("backends removed");
    Ok(())
}

/// A report as pretty JSON on stdout.
fn print_json(report: &impl serde::Serialize) -> anyhow::Result<()> {
    use std::io::Write as _;
    writeln!(
        std::io::stdout().lock(),
        "{}",
        serde_json::to_string_pretty(report)?
    )?;
    Ok(())
}

/// `CREATE DATABASE name` unless it exists.
async fn create_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    use sqlx::Connection as _;
    let mut admin = sqlx::PgConnection::connect(admin_url).await?;
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(name)
        .fetch_optional(&mut admin)
        .await?;
    if exists.is_none() {
        // `name` is a constant of this program, never input.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut admin)
            .await?;
    }
    admin.close().await?;
    Ok(())
}
