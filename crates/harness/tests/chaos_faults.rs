//! Fault scenarios run the way `harness chaos` runs them (the same
//! `chaos::run`), on a system of their own: fresh Postgres, Redis and
//! InfluxDB containers, the ingest server with its persister, and the
//! gateway, under a fixed load with an instructor socket following the
//! class. The verdict is the ledger check: nothing acknowledged lost, nothing
//! stored twice, both sinks agreeing.

use std::time::Duration;

use cellmon_harness::chaos::{self, ChaosSpec, Scenario};
use cellmon_harness::system::LocalSystem;
use cellmon_testkit::docker::Docker;

fn spec(scenario: Scenario) -> ChaosSpec {
    let mut spec = ChaosSpec::new(scenario, 100.0, Duration::from_secs(12));
    spec.fault_at = Duration::from_secs(3);
    spec.fault_for = Duration::from_secs(5);
    spec.verify_wait = Duration::from_secs(90);
    spec.progress = false;
    spec
}

async fn run(scenario: Scenario) -> anyhow::Result<cellmon_harness::report::Report> {
    cellmon_testkit::init_test_tracing();
    let docker = Docker::connect().await?;
    let system = LocalSystem::start(&docker, 0, 0).await?;
    let outcome = chaos::run(
        &system,
        scenario,
        &spec(scenario),
        format!("test {}", scenario.name()),
    )
    .await;
    system.shutdown().await?;
    let (report, verdict) = outcome?;
    eprintln!("{}", report.markdown());
    assert!(verdict.passes(), "{}", verdict.summary());
    // Every event of the load was acknowledged, and is in both sinks once.
    let phase = &report.phases[0];
    assert_eq!(phase.events, 1200, "{:?}", phase.statuses);
    assert_eq!(verdict.acknowledged, 1200);
    assert_eq!(verdict.postgres.stored, 1200);
    assert_eq!(verdict.influx.stored, 1200);
    assert!(report.outcome.passed, "{:?}", report.outcome.reasons);
    // The window is in the report, and shaded on the time charts.
    let window = &report.faults[0];
    assert_eq!(window.name, scenario.name());
    assert!(
        window.start_s >= 2.5 && window.end_s >= window.start_s + 5.0,
        "{window:?}"
    );
    assert!(report.html()?.contains("fault"));
    Ok(report)
}

/// REDIS-KILL: the spool takes the events while Redis is gone, so the
/// clients keep getting 202 throughout, and the replay delivers them.
#[tokio::test]
async fn redis_kill_under_load_loses_nothing() -> anyhow::Result<()> {
    let report = run(Scenario::RedisKill).await?;
    let window = &report.faults[0];
    let during: u64 = report
        .timeline
        .iter()
        .enumerate()
        .filter(|(t, _)| (*t as f64) > window.start_s + 1.0 && (*t as f64) + 1.0 < window.end_s)
        .map(|(_, s)| s.accepted)
        .sum();
    assert!(
        during >= 200,
        "{during} events accepted while Redis was down"
    );
    Ok(())
}

/// INFLUX-DOWN: Postgres keeps up, InfluxDB catches up once it is back.
#[tokio::test]
async fn influx_down_under_load_loses_nothing() -> anyhow::Result<()> {
    run(Scenario::InfluxDown).await?;
    Ok(())
}

#[test]
fn scenarios_are_found_by_their_reliability_names() {
    assert_eq!(Scenario::parse("redis-kill"), Some(Scenario::RedisKill));
    assert_eq!(Scenario::parse("PG_SLOW"), Some(Scenario::PgSlow));
    assert_eq!(Scenario::parse("INFLUX-DOWN"), Some(Scenario::InfluxDown));
    assert_eq!(Scenario::parse("nonsense"), None);
}
