//! `harness`: run the whole system on this machine, load it, inject faults,
//! check the ledger. See `harness --help`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use cellmon_harness::chaos::{self, ChaosSpec, Scenario};
use cellmon_harness::load::behaviour::Behaviour;
use cellmon_harness::load::sampler::{SamplerSpec, backend_ports};
use cellmon_harness::load::subscriber::GatewaySpec;
use cellmon_harness::load::{LoadSpec, PhaseSpec, Targets};
use cellmon_harness::report::Report;
use cellmon_harness::system::LocalSystem;
use cellmon_testkit::backend::BackendKind;
use cellmon_testkit::docker::Docker;
use cellmon_testkit::influx::InfluxClient;
use cellmon_testkit::supervise;
use cellmon_testkit::verify::{self, Ledger};

#[derive(Debug, Parser)]
#[command(
    name = "harness",
    version,
    about = "Cell Monitor's harness: run the whole system on this machine, load it, inject faults, check that nothing was lost",
    long_about = "Cell Monitor's harness: run the whole system on this machine (`up`), load it like a class (`load`), \
        run a fault scenario under load (`chaos`), benchmark the gateway's fan-out (`fanout`), and check a ledger \
        of sent events against both stores (`verify`). Everything runs on loopback; loads are bounded."
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
    /// Simulate a class against a running system on this machine (`harness
    /// up`, or any loopback URL): staged phases of students (10, 25, 50, 75, 100, then more until
    /// a phase misses the targets), open-loop; then the ledger check and a
    /// report (report.json, report.html, report.md). Exits with 1 when the
    /// run misses the targets or the ledger check fails.
    Load(Box<LoadArgs>),
    /// Run a fault scenario of RELIABILITY.md under a fixed load on a system
    /// of its own (fresh backends), then the ledger check; writes the same
    /// report as `load`, with the fault shaded. Exits with 1 on failure.
    Chaos {
        /// REDIS-KILL, REDIS-HANG, PG-KILL, PG-SLOW or INFLUX-DOWN.
        scenario: String,
        /// Events per second, one per request.
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        /// Seconds of load; the fault is on during the middle third.
        #[arg(long, default_value_t = 30)]
        duration: u64,
        /// Accept latency p95 target, ms (default: 500; REDIS-HANG: the
        /// Redis timeout + 100 ms).
        #[arg(long)]
        p95_ms: Option<f64>,
        /// Most refused or unanswered share of events.
        #[arg(long, default_value_t = 0.001)]
        max_error_rate: f64,
        /// Directory for the report files.
        #[arg(long, default_value = "chaos-report")]
        out: PathBuf,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
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
        /// Live messages per second, a multiple of 100 (they go out in
        /// 10 ms ticks); 0: open the sockets, hold, measure memory.
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
        /// A ledger written by `harness load` (ledger.jsonl in its report
        /// directory); repeat it to check
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

#[derive(Debug, clap::Args)]
struct LoadArgs {
    /// KEY=VALUE lines (as `harness up --env-file` writes them) that give
    /// the defaults of the URL, token and socket flags below; the process
    /// environment is used for what the file does not set.
    #[arg(long)]
    env_file: Option<PathBuf>,
    /// The events URL (default: $CELLMON_INGEST_URL/api/v1/events with
    /// ?token=$CELLMON_INGEST_TOKEN).
    #[arg(long)]
    url: Option<String>,
    /// Students in each phase, in order.
    #[arg(long, value_delimiter = ',', default_value = "10,25,50,75,100")]
    students: Vec<u32>,
    /// Stop after the listed phases instead of adding students (250, 500,
    /// 1000, 2500, ...) until a phase misses the targets.
    #[arg(long)]
    no_ramp: bool,
    /// The ramp stops before going past this many students.
    #[arg(long, default_value_t = 200_000)]
    max_students: u32,
    /// Instead of students: one phase of cell runs at this fixed rate
    /// (events/s), spread over --rate-students.
    #[arg(long)]
    rate: Option<f64>,
    /// Students a fixed rate is spread over.
    #[arg(long, default_value_t = 100)]
    rate_students: u32,
    /// Seconds per phase.
    #[arg(long, default_value_t = 20)]
    phase_secs: u64,
    /// Most events the whole run sends.
    #[arg(long, default_value_t = 5_000_000)]
    max_events: u64,
    /// Most requests in flight at once.
    #[arg(long, default_value_t = 2048)]
    max_in_flight: usize,
    /// Client addresses (127.0.1.1 ...) the students' requests come from.
    #[arg(long, default_value_t = 100)]
    clients: u8,
    /// Seconds between a student's cell runs: shortest and longest.
    #[arg(long, default_value_t = 12.0)]
    run_min_s: f64,
    #[arg(long, default_value_t = 18.0)]
    run_max_s: f64,
    /// Share of cell runs that fail (stuck runs included).
    #[arg(long, default_value_t = 0.15)]
    failure_rate: f64,
    /// Chance that a failure leaves the student stuck on that cell for two
    /// more failing runs (a significant error on dashboards).
    #[arg(long, default_value_t = 0.25)]
    stuck_chance: f64,
    /// Chance that a stuck student turns help on (until the cell works).
    #[arg(long, default_value_t = 0.4)]
    help_chance: f64,
    /// Seconds between the `help` events of a student whose toggle is on.
    #[arg(long, default_value_t = 10.0)]
    help_heartbeat_s: f64,
    /// Chance per run of a new cell that the student opens another notebook.
    #[arg(long, default_value_t = 0.03)]
    open_chance: f64,
    /// Target: accept latency p95 of each phase, ms.
    #[arg(long, default_value_t = 500.0)]
    p95_ms: f64,
    /// Target: events/s accepted in the best phase that met the others.
    #[arg(long)]
    min_eps: Option<f64>,
    /// Target: refused or unanswered share of events in each phase.
    #[arg(long, default_value_t = 0.001)]
    max_error_rate: f64,
    /// The gateway's socket URL, for end-to-end latency (default:
    /// $CELLMON_GATEWAY_URL).
    #[arg(long)]
    gateway_url: Option<String>,
    /// An instructor's JWT (default: $CELLMON_INSTRUCTOR_TOKEN).
    #[arg(long)]
    instructor_token: Option<String>,
    /// The class the events go to (default: $CELLMON_CLASS_ID).
    #[arg(long)]
    class: Option<uuid::Uuid>,
    /// Do not follow the class on an instructor socket.
    #[arg(long)]
    no_socket: bool,
    /// Postgres the persister writes (default: $CELLMON_DATABASE_URL).
    #[arg(long)]
    postgres_url: Option<String>,
    /// InfluxDB the persister writes (default: $CELLMON_INFLUXDB_URL).
    #[arg(long)]
    influx_url: Option<String>,
    /// (default: $CELLMON_INFLUX_DATABASE, else cellmon)
    #[arg(long)]
    influx_database: Option<String>,
    /// Skip the ledger check at the end.
    #[arg(long)]
    no_verify: bool,
    /// Seconds the ledger check waits for the sinks to catch up.
    #[arg(long, default_value_t = 120)]
    verify_wait: u64,
    /// Server processes to watch (default: $CELLMON_SERVER_PID; processes
    /// named ingest-server or ws-gateway are watched anyway).
    #[arg(long)]
    server_pid: Vec<u32>,
    /// Directory for report.json, report.html, report.md and ledger.jsonl.
    #[arg(long, default_value = "load-report")]
    out: PathBuf,
    /// Seed of the students' behaviour.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// Values from an env file, then from the process environment.
struct Defaults(std::collections::HashMap<String, String>);

impl Defaults {
    fn load(path: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let mut values = std::collections::HashMap::new();
        if let Some(path) = path {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
            for line in text.lines() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let line = line.strip_prefix("export ").unwrap_or(line);
                if let Some((key, value)) = line.split_once('=') {
                    values.insert(key.trim().to_owned(), value.trim().to_owned());
                }
            }
        }
        Ok(Self(values))
    }

    fn get(&self, key: &str) -> Option<String> {
        self.0
            .get(key)
            .cloned()
            .or_else(|| std::env::var(key).ok())
            .filter(|v| !v.is_empty())
    }
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
        Cmd::Load(args) => return load(*args).await,
        Cmd::Chaos {
            scenario,
            rate,
            duration,
            p95_ms,
            max_error_rate,
            out,
            quiet,
        } => {
            let Some(scenario) = Scenario::parse(&scenario) else {
                let names: Vec<&str> = Scenario::ALL.iter().map(|s| s.name()).collect();
                anyhow::bail!("unknown scenario {scenario:?}; one of {}", names.join(", "));
            };
            anyhow::ensure!(
                rate > 0.0 && duration >= 3,
                "--rate must be positive and --duration at least 3 s"
            );
            let mut spec = ChaosSpec::new(scenario, rate, Duration::from_secs(duration));
            spec.targets.max_error_rate = max_error_rate;
            if let Some(p95_ms) = p95_ms {
                spec.targets.p95_ms = p95_ms;
            }
            spec.progress = !quiet;
            let docker = Docker::connect().await?;
            eprintln!(
                "starting a system of its own (postgres, redis, influxdb, ingest, gateway) ..."
            );
            let system = LocalSystem::start(&docker, 0, 0).await?;
            eprintln!("{}: {rate} events/s for {duration} s ...", scenario.name());
            let outcome = chaos::run(&system, scenario, &spec, command_line()).await;
            system.shutdown().await?;
            let (report, _) = outcome?;
            return finish(&report, &out);
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
            let verdict = verify::verify_until(
                &ledger,
                &pool,
                &influx,
                &influx_database,
                class,
                None,
                Duration::from_secs(wait),
            )
            .await?;
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
    // A signal during start-up drops the half-started system, which removes
    // whatever containers it had created.
    let system = tokio::select! {
        system = LocalSystem::start(&docker, ingest_port, gateway_port) => system?,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("interrupted during start-up; backends removed");
            return Ok(());
        }
        _ = terminate.recv() => {
            eprintln!("terminated during start-up; backends removed");
            return Ok(());
        }
    };
    let env = system.env_text();
    if let Some(path) = env_file {
        supervise::write_atomically(&path, &env)?;
    }
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{env}")?;
        writeln!(
            out,
            "events: POST {} (or without a token)",
            system.events_url()
        )?;
        writeln!(
            out,
            "the persister writes them to Postgres ({}) and InfluxDB (database cellmon); \
             its health and metrics: http://{}/health/ready, /metrics",
            system.database_url, system.persister_addr
        )?;
        writeln!(
            out,
            "dashboards: ws://{}/ws with the sub-protocols cellmon.v1 and cellmon.jwt.$CELLMON_INSTRUCTOR_TOKEN",
            system.gateway_addr
        )?;
        writeln!(out, "ready; press Ctrl-C to stop and remove the backends")?;
    }
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    eprintln!("stopping ...");
    system.shutdown().await?;
    eprintln!("backends removed");
    Ok(())
}

/// The command line, for reports.
fn command_line() -> String {
    std::env::args().collect::<Vec<_>>().join(" ")
}

/// Writes the report files, prints the summary, and turns the outcome
/// into the exit code.
fn finish(report: &Report, out: &std::path::Path) -> anyhow::Result<ExitCode> {
    let paths = report.write(out)?;
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", report.markdown())?;
    for path in &paths {
        eprintln!("wrote {}", path.display());
    }
    Ok(if report.outcome.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn load(args: LoadArgs) -> anyhow::Result<ExitCode> {
    let defaults = Defaults::load(args.env_file.as_deref())?;
    let events_url = match args.url {
        Some(url) => url,
        None => {
            let base = defaults.get("CELLMON_INGEST_URL").ok_or_else(|| {
                anyhow::anyhow!(
                    "no --url, and no CELLMON_INGEST_URL (give --env-file from `harness up`)"
                )
            })?;
            match defaults.get("CELLMON_INGEST_TOKEN") {
                Some(token) => format!("{base}/api/v1/events?token={token}"),
                None => format!("{base}/api/v1/events"),
            }
        }
    };
    anyhow::ensure!(
        cellmon_harness::load::is_loopback_url(&events_url),
        "{events_url} is not on this machine: harness load sends from loopback addresses only"
    );
    anyhow::ensure!(
        args.run_min_s > 0.0 && args.run_max_s >= args.run_min_s,
        "--run-min-s must be positive and at most --run-max-s"
    );
    for (flag, share) in [
        ("--failure-rate", args.failure_rate),
        ("--stuck-chance", args.stuck_chance),
        ("--help-chance", args.help_chance),
        ("--open-chance", args.open_chance),
    ] {
        anyhow::ensure!(
            (0.0..=1.0).contains(&share),
            "{flag} is a share between 0 and 1"
        );
    }
    anyhow::ensure!(
        args.help_heartbeat_s >= 1.0,
        "--help-heartbeat-s must be at least 1"
    );
    anyhow::ensure!(args.phase_secs > 0, "--phase-secs must be positive");
    let phases: Vec<PhaseSpec> = match args.rate {
        Some(rate) => {
            anyhow::ensure!(rate > 0.0, "--rate must be positive");
            vec![PhaseSpec::Rate {
                events_per_s: rate,
                students: args.rate_students,
            }]
        }
        None => {
            anyhow::ensure!(
                !args.students.is_empty() && args.students.iter().all(|n| *n > 0),
                "--students needs positive counts"
            );
            args.students
                .iter()
                .copied()
                .map(PhaseSpec::Students)
                .collect()
        }
    };
    let class = args.class.or_else(|| {
        defaults
            .get("CELLMON_CLASS_ID")
            .and_then(|c| c.parse().ok())
    });
    let gateway = if args.no_socket {
        None
    } else {
        let url = args
            .gateway_url
            .or_else(|| defaults.get("CELLMON_GATEWAY_URL"));
        let token = args
            .instructor_token
            .or_else(|| defaults.get("CELLMON_INSTRUCTOR_TOKEN"));
        match (url, token, class) {
            (Some(url), Some(token), Some(class)) => Some(GatewaySpec { url, token, class }),
            _ => {
                eprintln!(
                    "no gateway URL, instructor token or class: end-to-end latency is not measured (give --env-file from `harness up`, or --no-socket)"
                );
                None
            }
        }
    };
    let mut server_pids = args.server_pid.clone();
    if server_pids.is_empty()
        && let Some(pid) = defaults
            .get("CELLMON_SERVER_PID")
            .and_then(|p| p.parse().ok())
    {
        server_pids.push(pid);
    }
    let backend_ports = backend_ports(
        BackendKind::ALL
            .into_iter()
            .filter_map(|kind| Some((kind, defaults.get(kind.url_var())?))),
    );
    let targets = Targets {
        p95_ms: args.p95_ms,
        max_error_rate: args.max_error_rate,
        min_events_per_s: args.min_eps,
    };
    let behaviour = Behaviour {
        run_min: Duration::from_secs_f64(args.run_min_s),
        run_max: Duration::from_secs_f64(args.run_max_s),
        failure_rate: args.failure_rate,
        stuck_chance: args.stuck_chance,
        help_chance: args.help_chance,
        help_heartbeat: Duration::from_secs_f64(args.help_heartbeat_s),
        open_chance: args.open_chance,
        ..Behaviour::default()
    };
    let spec = LoadSpec {
        events_url,
        phases,
        ramp: !args.no_ramp && args.rate.is_none(),
        max_students: args.max_students,
        phase_duration: Duration::from_secs(args.phase_secs),
        behaviour,
        max_in_flight: args.max_in_flight,
        clients: args.clients,
        max_events: args.max_events,
        targets,
        gateway,
        sampler: SamplerSpec {
            server_pids,
            backend_ports,
        },
        seed: args.seed,
        progress: !args.quiet,
        ..LoadSpec::default()
    };
    let started_at = cellmon_harness::now_rfc3339();
    let (result, ledger) = cellmon_harness::load::run(&spec).await?;
    std::fs::create_dir_all(&args.out)?;
    let ledger_path = args.out.join("ledger.jsonl");
    ledger.write(&ledger_path)?;
    eprintln!(
        "ledger of {} events written to {}",
        ledger.len(),
        ledger_path.display()
    );
    let postgres = args
        .postgres_url
        .or_else(|| defaults.get("CELLMON_DATABASE_URL"));
    let influx = args
        .influx_url
        .or_else(|| defaults.get("CELLMON_INFLUXDB_URL"));
    let verdict = match (args.no_verify, postgres, influx) {
        (false, Some(postgres), Some(influx_url)) => {
            eprintln!("checking the ledger against Postgres and InfluxDB ...");
            let database = args
                .influx_database
                .or_else(|| defaults.get("CELLMON_INFLUX_DATABASE"))
                .unwrap_or_else(|| "cellmon".to_owned());
            let pool = sqlx::PgPool::connect(&postgres).await?;
            let influx = InfluxClient::new(&influx_url)?;
            let verdict = verify::verify_until(
                &ledger,
                &pool,
                &influx,
                &database,
                class,
                Some(&result.student_marker),
                Duration::from_secs(args.verify_wait),
            )
            .await?;
            pool.close().await;
            Some(verdict)
        }
        (false, _, _) => {
            eprintln!(
                "no Postgres or InfluxDB URL: the ledger check is skipped (give --env-file from `harness up`, or --no-verify)"
            );
            None
        }
        (true, _, _) => None,
    };
    let report = Report::new(
        "load".to_owned(),
        command_line(),
        started_at,
        &spec,
        result,
        Vec::new(),
        verdict.as_ref(),
    );
    finish(&report, &args.out)
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
