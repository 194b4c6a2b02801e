//! Persister faults that kill a backend container: private containers (the
//! run's shared ones are never killed). Bounded versions of RELIABILITY.md's
//! scenarios: seconds, not minutes.

mod common;

use std::time::{Duration, Instant};

use cellmon_testkit::fixture::TestBackends;
use cellmon_testkit::verify::Ledger;
use common::{Ingest, Persister, classroom_event, postgres_lag_under_load, send_all, verified};
use serde_json::Value;

/// Sends `per_tick` events every 100 ms until `until`, recording outcomes.
async fn steady_load(
    url: &str,
    until: Instant,
    per_tick: usize,
    ledger: &mut Ledger,
) -> anyhow::Result<()> {
    let mut n = 0;
    while Instant::now() < until {
        let batch: Vec<Value> = (n..n + per_tick)
            .map(|i| classroom_event(i % 25, i))
            .collect();
        n += per_tick;
        send_all(url, &batch, 1, per_tick, ledger).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// PG-KILL (bounded: Postgres SIGKILLed for 4 s under 100 events/s): no
/// acknowledgement before COMMIT (nothing acknowledged is lost), and the
/// writer catches up within 10 s of Postgres answering again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_kill() -> anyhow::Result<()> {
    let backends = TestBackends::private().await?;
    let ingest = Ingest::start(&backends, |_| {}).await?;
    let persister = Persister::start(&backends, |_| {}).await?;
    let url = ingest.events_url();
    let mut ledger = Ledger::new();

    steady_load(
        &url,
        Instant::now() + Duration::from_secs(2),
        10,
        &mut ledger,
    )
    .await?;
    backends.stack.postgres.kill().await?;
    let killed = Instant::now();
    steady_load(&url, killed + Duration::from_secs(4), 10, &mut ledger).await?;
    // While Postgres is gone its group's backlog grows; InfluxDB keeps up.
    let backlog = persister
        .metric(r#"cellmon_persist_backlog_entries{sink="pg"}"#)
        .await?;
    assert!(backlog > 0.0, "pg backlog during the outage: {backlog}");
    backends.stack.postgres.start_again().await?;
    let back = Instant::now();
    eprintln!(
        "PG-KILL: Postgres down {:.1} s",
        (back - killed).as_secs_f64()
    );

    let verdict = verified(&backends, ingest.class_id, &ledger, Duration::from_secs(10)).await?;
    let recovered = back.elapsed();
    eprintln!("{}", verdict.summary());
    eprintln!(
        "PG-KILL: every acknowledged event in Postgres {:.1} s after it answered",
        recovered.as_secs_f64()
    );
    assert!(verdict.passes(), "{verdict:#?}");
    assert!(
        recovered <= Duration::from_secs(10),
        "recovery took {recovered:?}"
    );
    assert!(
        persister
            .metric(r#"cellmon_persist_retries_total{sink="pg"}"#)
            .await?
            > 0.0
    );
    Ok(())
}

/// REDIS-AMNESIA for the persister: Redis comes back empty; the consumer
/// groups are recreated and new events reach both sinks, with no crash
/// loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_amnesia_recreates_the_groups() -> anyhow::Result<()> {
    let mut backends = TestBackends::private().await?;
    let ingest = Ingest::start(&backends, |_| {}).await?;
    let persister = Persister::start(&backends, |_| {}).await?;
    let url = ingest.events_url();
    let mut ledger = Ledger::new();
    let before: Vec<Value> = (0..50).map(|i| classroom_event(i % 5, i)).collect();
    send_all(&url, &before, 5, 2, &mut ledger).await?;
    let verdict = verified(&backends, ingest.class_id, &ledger, Duration::from_secs(20)).await?;
    assert!(verdict.passes(), "{verdict:#?}");

    let docker = cellmon_testkit::docker::Docker::connect().await?;
    backends.stack.redis.replace_container(&docker).await?;
    let after: Vec<Value> = (50..100).map(|i| classroom_event(i % 5, i)).collect();
    send_all(&url, &after, 5, 2, &mut ledger).await?;
    let verdict = verified(&backends, ingest.class_id, &ledger, Duration::from_secs(30)).await?;
    eprintln!("{}", verdict.summary());
    assert!(verdict.passes(), "{verdict:#?}");

    let redis = redis::Client::open(backends.redis_url())?;
    let mut conn = redis.get_multiplexed_async_connection().await?;
    for key in ingest.keys.all_events() {
        let groups: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&key)
            .query_async(&mut conn)
            .await?;
        assert_eq!(groups.len(), 2, "{key}: both groups recreated");
    }
    // No crash loop: both sinks still consume, and both servers are ready.
    persister.consuming(Duration::from_secs(1)).await?;
    for url in [&ingest.url, &persister.url().to_owned()] {
        let ready = reqwest::get(format!("{url}/health/ready")).await?;
        assert_eq!(ready.status(), 200, "{url}");
    }
    Ok(())
}

/// INFLUX-DOWN with the server really gone (bounded: influxd SIGKILLed for
/// 6 s under load): Postgres keeps a lag under a second; InfluxDB catches up
/// once it is back, with nothing lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn influx_killed() -> anyhow::Result<()> {
    let backends = TestBackends::private().await?;
    let ingest = Ingest::start(&backends, |_| {}).await?;
    let _persister = Persister::start(&backends, |_| {}).await?;
    let pool = sqlx::PgPool::connect(&backends.pg_url()).await?;
    let url = ingest.events_url();
    let mut ledger = Ledger::new();
    backends.stack.influx.kill().await?;
    let worst_lag = postgres_lag_under_load(&url, &pool, 12, 20, 10, &mut ledger).await?;
    eprintln!("INFLUX-DOWN (killed): worst Postgres lag {worst_lag:?}");
    assert!(
        worst_lag < Duration::from_secs(1),
        "Postgres lag {worst_lag:?}"
    );
    backends.stack.influx.start_again().await?;
    let back = Instant::now();
    let verdict = verified(&backends, ingest.class_id, &ledger, Duration::from_secs(60)).await?;
    eprintln!("{}", verdict.summary());
    eprintln!(
        "InfluxDB caught up {:.1} s after it was back",
        back.elapsed().as_secs_f64()
    );
    assert!(verdict.passes(), "{verdict:#?}");
    Ok(())
}
