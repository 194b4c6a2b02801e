//! The persister against real Postgres, Redis and InfluxDB (the run's shared
//! containers; faults here go through this test's own proxies), checked
//! with a client ledger (RELIABILITY.md).

mod common;

use std::time::Duration;

use cellmon_harness::fixture::TestBackends;
use cellmon_harness::proxy::Fault;
use cellmon_harness::verify::Ledger;
use common::{Ingest, classroom_event, metric, persisting, send_all, verified};
use serde_json::{Value, json};

fn assert_pass(verdict: &cellmon_harness::verify::Verdict) {
    eprintln!("{}", verdict.summary());
    assert!(verdict.passes(), "{verdict:#?}");
}

/// 10,000 events from 100 students: rows = points = distinct acknowledged
/// ids, per student and per event type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_from_100_students_agree() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let ingest = Ingest::start(&backends, persisting(&backends)).await?;
    let events: Vec<Value> = (0..10_000)
        .map(|n| classroom_event(n % 100, n / 100))
        .collect();
    let mut ledger = Ledger::new();
    let started = std::time::Instant::now();
    send_all(&ingest.events_url(), &events, 50, 8, &mut ledger).await?;
    let verdict = verified(&backends, ingest.class_id, &ledger, Duration::from_secs(90)).await?;
    eprintln!(
        "10,000 events acknowledged and in both sinks after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_pass(&verdict);
    assert_eq!(verdict.acknowledged, 10_000);
    assert_eq!(verdict.postgres.stored, 10_000);
    assert_eq!(verdict.influx.stored, 10_000);
    assert_eq!(verdict.groups, 100 * 4, "100 students x 4 event types");

    // Once both groups acknowledged everything, the streams are trimmed.
    let redis = redis::Client::open(backends.redis_url())?;
    let conn = redis.get_multiplexed_async_connection().await?;
    cellmon_harness::eventually(Duration::from_secs(20), || {
        let mut conn = conn.clone();
        let keys = ingest.keys.clone();
        async move {
            let mut left = 0u64;
            for key in keys.all_events() {
                left += redis::cmd("XLEN")
                    .arg(&key)
                    .query_async::<u64>(&mut conn)
                    .await?;
            }
            // MINID ~ trims whole nodes only; a small tail may stay.
            anyhow::ensure!(left < 1_000, "{left} entries still in the streams");
            Ok(())
        }
    })
    .await?;
    Ok(())
}

/// DUP-STORM: every event sent three times (alone, inside a batch that
/// repeats it, and once more through the spool while Redis is away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dup_storm() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let ingest = Ingest::start(&backends, |config| {
        persisting(&backends)(config);
        config.redis_timeout_ms = 300;
    })
    .await?;
    let events: Vec<Value> = (0..600).map(|n| classroom_event(n % 30, n)).collect();
    let mut ledger = Ledger::new();
    // 1: one per request.
    send_all(&ingest.events_url(), &events, 1, 8, &mut ledger).await?;
    // 2: batches in which every event appears twice.
    let doubled: Vec<Value> = events
        .chunks(25)
        .flat_map(|chunk| chunk.iter().chain(chunk.iter()).cloned())
        .collect();
    send_all(&ingest.events_url(), &doubled, 50, 4, &mut ledger).await?;
    // 3: Redis unreachable, so everything goes to the spool; then replayed.
    backends.stack.redis.proxy().set_fault(Fault::Down);
    send_all(&ingest.events_url(), &events, 20, 4, &mut ledger).await?;
    let spooled = metric(&ingest.metrics().await?, "cellmon_events_spooled_total").unwrap_or(0.0);
    backends.stack.redis.proxy().clear();
    assert!(spooled >= 600.0, "the third copy went through the spool: {spooled}");

    let verdict = verified(&backends, ingest.class_id, &ledger, Duration::from_secs(60)).await?;
    assert_pass(&verdict);
    assert_eq!(verdict.postgres.stored, 600);
    assert_eq!(verdict.influx.stored, 600);
    // Everything replayed, and the persister saw the copies and kept one.
    cellmon_harness::eventually(Duration::from_secs(20), || async {
        let text = ingest.metrics().await?;
        let replayed = metric(&text, "cellmon_events_replayed_total").unwrap_or(0.0);
        anyhow::ensure!(replayed >= 600.0, "replayed {replayed}");
        Ok(())
    })
    .await?;
    Ok(())
}

/// INFLUX-POISON: a point InfluxDB refuses (field type conflict) becomes
/// exactly one dead letter; everything else is persisted; no retry loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn influx_poison() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let ingest = Ingest::start(&backends, persisting(&backends)).await?;
    // `duration_ms` is a string in the shard of 2001: the float the
    // persister writes there conflicts. Other times are unaffected.
    let influx = cellmon_harness::influx::InfluxClient::new(&backends.influx_url())?;
    influx
        .write(
            backends.influx_database(),
            "cell_execution,class=poison duration_ms=\"slow\" 978307200000000000",
        )
        .await?;
    let mut events: Vec<Value> = (0..200).map(|n| classroom_event(n % 10, n)).collect();
    let mut poison = classroom_event(3, 3);
    poison["eventTime"] = json!("2001-01-01T00:00:01Z");
    let poison_id: uuid::Uuid = poison["eventId"].as_str().unwrap_or_default().parse()?;
    events.insert(77, poison);
    let mut ledger = Ledger::new();
    send_all(&ingest.events_url(), &events, 201, 1, &mut ledger).await?;
    let verdict = verified(&backends, ingest.class_id, &ledger, Duration::from_secs(30)).await?;
    assert_pass(&verdict);

    let text = ingest.metrics().await?;
    assert_eq!(
        metric(&text, r#"cellmon_persist_dead_letters_total{sink="influx"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, r#"cellmon_persist_retries_total{sink="influx"}"#).unwrap_or(0.0),
        0.0,
        "a refused point is not retried"
    );
    // The dead letter names the event; Postgres is unaffected.
    let redis = redis::Client::open(backends.redis_url())?;
    let mut conn = redis.get_multiplexed_async_connection().await?;
    let dead: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(ingest.keys.dead_letters("influx"))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await?;
    assert_eq!(dead.ids.len(), 1);
    let id = match dead.ids[0].map.get("f:id") {
        Some(redis::Value::BulkString(b)) => String::from_utf8(b.clone())?,
        other => anyhow::bail!("dead letter without the event id: {other:?}"),
    };
    assert_eq!(id, poison_id.to_string());
    assert!(
        metric(&text, r#"cellmon_persist_dead_letters_total{sink="pg"}"#).unwrap_or(0.0) == 0.0
    );
    Ok(())
}

/// PG-AMBIGUOUS: connections to Postgres reset while batches commit; the
/// retries are absorbed by ON CONFLICT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_ambiguous() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let ingest = Ingest::start(&backends, persisting(&backends)).await?;
    let events: Vec<Value> = (0..2_000).map(|n| classroom_event(n % 40, n)).collect();
    let mut ledger = Ledger::new();
    let url = ingest.events_url();
    let proxy = backends.stack.postgres.proxy();
    let sender = async {
        send_all(&url, &events, 10, 4, &mut ledger).await
    };
    // Reset every Postgres connection a few times while batches are in
    // flight: some land during COMMIT, whose outcome the client never learns.
    let faults = async {
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            proxy.set_fault(Fault::Reset);
            tokio::time::sleep(Duration::from_millis(30)).await;
            proxy.clear();
        }
    };
    let (sent, ()) = tokio::join!(sender, faults);
    sent?;
    let verdict = verified(&backends, ingest.class_id, &ledger, Duration::from_secs(60)).await?;
    assert_pass(&verdict);
    let text = ingest.metrics().await?;
    let retries = metric(&text, r#"cellmon_persist_retries_total{sink="pg"}"#).unwrap_or(0.0);
    eprintln!("pg retries after resets: {retries}");
    assert!(retries > 0.0, "the resets were felt: {text}");
    Ok(())
}

/// PG-SLOW (bounded): 500 ms latency on Postgres for 8 s under load. The
/// events API stays available; the backlog returns to zero afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_slow() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let ingest = Ingest::start(&backends, persisting(&backends)).await?;
    let proxy = backends.stack.postgres.proxy();
    proxy.set_fault(Fault::Latency(Duration::from_millis(500)));
    let url = ingest.events_url();
    let mut ledger = Ledger::new();
    // 100 events/s for 8 s, one event per request.
    let started = std::time::Instant::now();
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(8) {
        let batch: Vec<Value> = (n..n + 10).map(|i| classroom_event(i % 20, i)).collect();
        n += 10;
        send_all(&url, &batch, 1, 10, &mut ledger).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    proxy.clear();
    let attempted = ledger.len();
    let acknowledged = ledger.ids(cellmon_harness::verify::Outcome::Ok).len();
    let availability = acknowledged as f64 / attempted as f64;
    eprintln!("PG-SLOW: {acknowledged}/{attempted} acknowledged ({:.2}%)", availability * 100.0);
    assert!(availability >= 0.999, "availability {availability}");
    let verdict = verified(&backends, ingest.class_id, &ledger, Duration::from_secs(60)).await?;
    assert_pass(&verdict);
    cellmon_harness::eventually(Duration::from_secs(20), || async {
        let text = ingest.metrics().await?;
        let backlog = metric(&text, r#"cellmon_persist_backlog_entries{sink="pg"}"#);
        anyhow::ensure!(backlog == Some(0.0), "pg backlog {backlog:?}");
        Ok(())
    })
    .await?;
    Ok(())
}

/// INFLUX-DOWN (bounded: 8 s, InfluxDB unreachable): Postgres keeps up with
/// a lag under a second; InfluxDB catches up afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn influx_down() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let ingest = Ingest::start(&backends, persisting(&backends)).await?;
    let pool = sqlx::PgPool::connect(&backends.pg_url()).await?;
    backends.stack.influx.proxy().set_fault(Fault::Down);
    let url = ingest.events_url();
    let mut ledger = Ledger::new();
    let mut worst_lag = Duration::ZERO;
    for round in 0..16 {
        let batch: Vec<Value> = (round * 25..round * 25 + 25)
            .map(|i| classroom_event(i % 20, i))
            .collect();
        let ids: Vec<uuid::Uuid> = batch
            .iter()
            .filter_map(|e| e["eventId"].as_str()?.parse().ok())
            .collect();
        send_all(&url, &batch, 5, 5, &mut ledger).await?;
        // How long until Postgres holds this round's events.
        let sent = std::time::Instant::now();
        cellmon_harness::eventually(Duration::from_secs(10), || async {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_id = ANY($1)")
                .bind(&ids)
                .fetch_one(&pool)
                .await?;
            anyhow::ensure!(n == ids.len() as i64, "{n} of {} in Postgres", ids.len());
            Ok(())
        })
        .await?;
        worst_lag = worst_lag.max(sent.elapsed());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("INFLUX-DOWN: worst Postgres lag {worst_lag:?}");
    assert!(worst_lag < Duration::from_secs(1), "Postgres lag {worst_lag:?}");
    let text = ingest.metrics().await?;
    let retries = metric(&text, r#"cellmon_persist_retries_total{sink="influx"}"#).unwrap_or(0.0);
    assert!(retries > 0.0, "InfluxDB was unreachable: {text}");
    backends.stack.influx.proxy().clear();
    let verdict = verified(&backends, ingest.class_id, &ledger, Duration::from_secs(60)).await?;
    assert_pass(&verdict);
    Ok(())
}
