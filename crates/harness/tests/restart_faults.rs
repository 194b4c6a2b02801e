//! `harness up`'s system keeps working when one of its backends is
//! restarted by hand (`docker restart`, which gives the container a new
//! host port): the proxy in front of it follows it, ingest replays what it
//! spooled meanwhile, the persister drains, and the ledger check finds
//! every acknowledged event in Postgres and InfluxDB exactly once.
//! This binary runs in the `containers` test group, one test at a time.

use std::time::Duration;

use cellmon_harness::chaos;
use cellmon_harness::system::LocalSystem;
use cellmon_testkit::backend::BackendKind;
use cellmon_testkit::docker::Docker;
use cellmon_testkit::verify::{Ledger, Outcome};
use serde_json::{Value, json};

/// Events per round; one round before the restart, one while it settles,
/// one after.
const ROUND: usize = 60;
const PER_REQUEST: usize = 5;

/// A cell run of one of ten students whose addresses carry `marker`.
fn event(marker: &str, n: usize) -> Value {
    json!({
        "eventId": uuid::Uuid::new_v4(),
        "eventType": "cell_executed",
        "eventTime": format!("2026-04-01T10:{:02}:{:02}.000Z", (n / 60) % 60, n % 60),
        "emailAddress": format!("{marker}s{}@example.ac.jp", n % 10),
        "userName": format!("学生 {}", n % 10),
        "teamName": "チーム1",
        "notebookPath": "lesson1/intro.ipynb",
        "cellId": format!("cell-{}", n % 4),
        "cellIndex": n % 4,
        "cellType": "code",
        "code": "print(x)",
        "executionCount": n,
        "hasError": false,
        "executionDurationMs": 1.5
    })
}

/// Posts events `range` in small requests, one at a time, and records what
/// the server said about each in the ledger.
async fn send(
    http: &reqwest::Client,
    url: &str,
    marker: &str,
    range: std::ops::Range<usize>,
    ledger: &mut Ledger,
) {
    let events: Vec<Value> = range.map(|n| event(marker, n)).collect();
    for chunk in events.chunks(PER_REQUEST) {
        let outcome = match http.post(url).json(chunk).send().await {
            Ok(response) if response.status().is_success() => Outcome::Ok,
            Ok(_) => Outcome::Fail,
            Err(_) => Outcome::Unknown,
        };
        for id in chunk
            .iter()
            .filter_map(|e| e["eventId"].as_str()?.parse().ok())
        {
            ledger.record(id, outcome);
        }
    }
}

async fn redis_restarted_by_hand(system: &LocalSystem) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let url = system.events_url();
    let marker = format!("restart{}", uuid::Uuid::new_v4().simple());
    let mut ledger = Ledger::new();
    send(&http, &url, &marker, 0..ROUND, &mut ledger).await;

    let redis = &system.stack.redis;
    let container = redis.container().expect("the system owns its containers");
    let before = container.host_port().await?;
    cellmon_testkit::docker::restart_by_hand(container.id()).await?;
    let after = container.host_port().await?;
    assert_ne!(before, after, "Redis came back on the same host port");

    // Events sent right away: Redis may not answer yet, so ingest spools.
    send(&http, &url, &marker, ROUND..2 * ROUND, &mut ledger).await;
    // The same proxy address reaches the restarted Redis.
    cellmon_testkit::eventually(Duration::from_secs(5), || {
        BackendKind::Redis.probe(redis.addr())
    })
    .await?;
    assert_eq!(redis.proxy().upstream().port(), after);
    send(&http, &url, &marker, 2 * ROUND..3 * ROUND, &mut ledger).await;

    let sent = 3 * ROUND;
    let verdict = chaos::verify_system(system, &ledger, &marker, Duration::from_secs(90)).await?;
    assert!(verdict.passes(), "{}", verdict.summary());
    // Every request got a 202 (Redis or the spool took it) ...
    assert_eq!(verdict.acknowledged, sent, "{}", verdict.summary());
    // ... and each event is in both sinks once.
    assert_eq!(verdict.postgres.stored, sent);
    assert_eq!(verdict.influx.stored, sent);
    Ok(())
}

#[tokio::test]
async fn the_system_survives_redis_restarted_by_hand() -> anyhow::Result<()> {
    cellmon_testkit::init_test_tracing();
    let docker = Docker::connect().await?;
    let system = LocalSystem::start(&docker, 0, 0).await?;
    let outcome = redis_restarted_by_hand(&system).await;
    system.shutdown().await?;
    outcome
}
