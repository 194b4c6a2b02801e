//! `harness chaos SCENARIO`: a fault of RELIABILITY.md applied to a
//! running system while a fixed load runs through it, then the ledger
//! check. The command and the CI tests call the same [`run`].
//!
//! The load is one fixed-rate phase of `harness load` (so the report is the
//! same, with the fault's window shaded); the fault starts at `fault_at`
//! and is healed `fault_for` later; the verdict needs the phase to meet the
//! targets (accept p95, error rate) and the ledger check to pass: nothing
//! acknowledged lost, nothing stored twice, both sinks agreeing.

use std::time::Duration;

use crate::load::sampler::{SamplerSpec, backend_ports};
use crate::load::subscriber::GatewaySpec;
use crate::load::{self, LoadSpec, PhaseSpec, Targets};
use crate::report::{FaultWindow, Report};
use crate::system::LocalSystem;
use cellmon_testkit::backend::Backend;
use cellmon_testkit::backend::BackendKind;
use cellmon_testkit::proxy::Fault;
use cellmon_testkit::verify::{self, Verdict};

/// The scenarios `harness chaos` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// SIGKILL Redis (it comes back with its AOF on the same address).
    RedisKill,
    /// Redis paused (container pause: SIGSTOP).
    RedisHang,
    /// SIGKILL Postgres, start it again.
    PgKill,
    /// 500 ms added to every chunk to and from Postgres.
    PgSlow,
    /// SIGKILL InfluxDB, start it again.
    InfluxDown,
}

impl Scenario {
    pub const ALL: [Self; 5] = [
        Self::RedisKill,
        Self::RedisHang,
        Self::PgKill,
        Self::PgSlow,
        Self::InfluxDown,
    ];

    /// The name RELIABILITY.md gives it.
    pub fn name(self) -> &'static str {
        match self {
            Self::RedisKill => "REDIS-KILL",
            Self::RedisHang => "REDIS-HANG",
            Self::PgKill => "PG-KILL",
            Self::PgSlow => "PG-SLOW",
            Self::InfluxDown => "INFLUX-DOWN",
        }
    }

    /// By name, in any case, with `-` or `_`.
    pub fn parse(name: &str) -> Option<Self> {
        let wanted = name.trim().to_uppercase().replace('_', "-");
        Self::ALL.into_iter().find(|s| s.name() == wanted)
    }

    /// What the load must still meet under the fault: the defaults, and
    /// for REDIS-HANG an accept p95 within the ingest's Redis timeout +
    /// 100 ms (RELIABILITY.md).
    pub fn targets(self) -> Targets {
        let mut targets = Targets::default();
        if self == Self::RedisHang {
            targets.p95_ms =
                cellmon_ingest::Config::default().redis.timeout.as_millis() as f64 + 100.0;
        }
        targets
    }

    fn backend(self, system: &LocalSystem) -> &Backend {
        match self {
            Self::RedisKill | Self::RedisHang => &system.stack.redis,
            Self::PgKill | Self::PgSlow => &system.stack.postgres,
            Self::InfluxDown => &system.stack.influx,
        }
    }

    async fn apply(self, system: &LocalSystem) -> anyhow::Result<()> {
        let backend = self.backend(system);
        match self {
            Self::RedisKill | Self::PgKill | Self::InfluxDown => backend.kill().await,
            Self::RedisHang => backend.pause().await,
            Self::PgSlow => {
                backend
                    .proxy()
                    .set_fault(Fault::Latency(Duration::from_millis(500)));
                Ok(())
            }
        }
    }

    async fn heal(self, system: &LocalSystem) -> anyhow::Result<()> {
        let backend = self.backend(system);
        match self {
            Self::RedisKill | Self::PgKill | Self::InfluxDown => backend.start_again().await,
            Self::RedisHang => backend.unpause().await,
            Self::PgSlow => {
                backend.proxy().clear();
                Ok(())
            }
        }
    }
}

/// How hard and how long.
#[derive(Debug, Clone)]
pub struct ChaosSpec {
    /// Events per second, one per request.
    pub rate: f64,
    pub students: u32,
    pub duration: Duration,
    pub fault_at: Duration,
    pub fault_for: Duration,
    pub targets: Targets,
    /// How long the sinks may take to catch up after the load.
    pub verify_wait: Duration,
    pub progress: bool,
}

impl ChaosSpec {
    /// `rate` events/s for `duration`, the fault in its middle third, the
    /// scenario's targets.
    pub fn new(scenario: Scenario, rate: f64, duration: Duration) -> Self {
        Self {
            rate,
            students: 100,
            duration,
            fault_at: duration / 3,
            fault_for: duration / 3,
            targets: scenario.targets(),
            verify_wait: Duration::from_secs(120),
            progress: true,
        }
    }
}

/// The load spec that drives `system`: events with its token, the
/// instructor's socket, its processes and backend ports watched.
pub fn load_spec(system: &LocalSystem) -> LoadSpec {
    let backend_ports =
        backend_ports(BackendKind::ALL.map(|kind| (kind, system.stack.backend(kind).url())));
    LoadSpec {
        events_url: system.events_url(),
        gateway: Some(GatewaySpec {
            url: format!("ws://{}/ws", system.gateway_addr),
            token: system.instructor_token.clone(),
            class: system.class_id.0,
        }),
        sampler: SamplerSpec {
            server_pids: vec![std::process::id()],
            backend_ports,
        },
        ..LoadSpec::default()
    }
}

/// Checks `ledger` against the system's sinks, waiting up to `wait` for
/// them to catch up.
pub async fn verify_system(
    system: &LocalSystem,
    ledger: &verify::Ledger,
    students: &str,
    wait: Duration,
) -> anyhow::Result<Verdict> {
    let pool = sqlx::PgPool::connect(&system.database_url).await?;
    let influx = cellmon_testkit::influx::InfluxClient::new(&system.stack.influx.url())?;
    let verdict = verify::verify_until(
        ledger,
        &pool,
        &influx,
        "cellmon",
        Some(system.class_id.0),
        Some(students),
        wait,
    )
    .await;
    pool.close().await;
    verdict
}

/// Runs `scenario` on `system` and judges it.
pub async fn run(
    system: &LocalSystem,
    scenario: Scenario,
    spec: &ChaosSpec,
    command: String,
) -> anyhow::Result<(Report, Verdict)> {
    let load = LoadSpec {
        phases: vec![PhaseSpec::Rate {
            events_per_s: spec.rate,
            students: spec.students,
        }],
        ramp: false,
        phase_duration: spec.duration,
        targets: spec.targets,
        progress: spec.progress,
        ..load_spec(system)
    };
    let started_at = crate::now_rfc3339();
    let t0 = std::time::Instant::now();
    let fault = async {
        tokio::time::sleep(spec.fault_at).await;
        let start_s = t0.elapsed().as_secs_f64();
        eprintln!("{}: fault on at {start_s:.1} s", scenario.name());
        scenario.apply(system).await?;
        tokio::time::sleep(spec.fault_for).await;
        scenario.heal(system).await?;
        let end_s = t0.elapsed().as_secs_f64();
        eprintln!("{}: healed at {end_s:.1} s", scenario.name());
        anyhow::Ok(FaultWindow {
            name: scenario.name().to_owned(),
            start_s,
            end_s,
        })
    };
    let (result, window) = tokio::join!(load::run(&load), fault);
    let window = window?;
    let (result, ledger) = result?;
    eprintln!("checking the ledger of {} events ...", ledger.len());
    let verdict = verify_system(system, &ledger, &result.student_marker, spec.verify_wait).await?;
    let report = Report::new(
        format!("chaos {}", scenario.name()),
        command,
        started_at,
        &load,
        result,
        vec![window],
        Some(&verdict),
    );
    Ok((report, verdict))
}
