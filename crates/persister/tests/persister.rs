//! The persister against real Postgres, Redis and InfluxDB (the run's shared
//! containers; faults here go through this test's own proxies), checked
//! with a client ledger (RELIABILITY.md).

mod common;

use std::time::Duration;

use cellmon_testkit::fixture::TestBackends;
use cellmon_testkit::proxy::Fault;
use cellmon_testkit::verify::Ledger;
use common::{
    Ingest, Persister, classroom_event, count_in_postgres, event_ids, metric,
    postgres_lag_under_load, send_all, verified,
};
use serde_json::{Value, json};

fn assert_pass(verdict: &cellmon_testkit::verify::Verdict) {
    eprintln!("{}", verdict.summary());
    assert!(verdict.passes(), "{verdict:#?}");
}

/// 10,000 events from 100 students: rows = points = distinct acknowledged
/// ids, per student and per event type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_from_100_students_agree() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let ingest = Ingest::start(&backends, |_| {}).await?;
    let _persister = Persister::start(&backends, |_| {}).await?;
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
    cellmon_testkit::eventually(Duration::from_secs(20), || {
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
        config.redis.timeout = Duration::from_millis(300)
    })
    .await?;
    let persister = Persister::start(&backends, |_| {}).await?;
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
    assert!(
        spooled >= 600.0,
        "the third copy went through the spool: {spooled}"
    );

    // Wait until the spool is replayed; `verified` then waits for both
    // groups to acknowledge everything (the replayed copies included).
    cellmon_testkit::eventually(Duration::from_secs(30), || async {
        let text = ingest.metrics().await?;
        let replayed = metric(&text, "cellmon_events_replayed_total").unwrap_or(0.0);
        anyhow::ensure!(replayed >= 600.0, "replayed {replayed}");
        Ok(())
    })
    .await?;
    let verdict = verified(&backends, ingest.class_id, &ledger, Duration::from_secs(60)).await?;
    assert_pass(&verdict);
    assert_eq!(verdict.postgres.stored, 600);
    assert_eq!(verdict.influx.stored, 600);
    // All three copies went in (the in-batch repeats are folded by ingest),
    // and the persister wrote each stream entry: new rows plus repeats.
    let text = ingest.metrics().await?;
    let count = |name: &str| metric(&text, name).unwrap_or(0.0);
    assert_eq!(count("cellmon_events_accepted_total"), 1_800.0, "{text}");
    assert_eq!(count("cellmon_events_duplicate_total"), 600.0, "{text}");
    let text = persister.metrics().await?;
    let count = |name: &str| metric(&text, name).unwrap_or(0.0);
    let stored = count(r#"cellmon_persist_events_total{outcome="stored",sink="pg"}"#);
    let repeated = count(r#"cellmon_persist_events_total{outcome="duplicate",sink="pg"}"#);
    assert!(stored <= 600.0 && stored + repeated >= 1_800.0, "{text}");
    Ok(())
}

/// INFLUX-POISON: a point InfluxDB refuses (field type conflict) becomes
/// exactly one dead letter; everything else is persisted; no retry loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn influx_poison() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let ingest = Ingest::start(&backends, |_| {}).await?;
    let persister = Persister::start(&backends, |_| {}).await?;
    // `duration_ms` is a string in the shard of 2001: the float the
    // persister writes there conflicts. Other times are unaffected.
    let influx = cellmon_testkit::influx::InfluxClient::new(&backends.influx_url())?;
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
    // Every event is in both sinks (InfluxDB kept the poison's `event`
    // point: only its `cell_execution` point was refused), and exactly that
    // one execution point is missing.
    let pool = sqlx::PgPool::connect(&backends.pg_url()).await?;
    let verdict = cellmon_testkit::eventually(Duration::from_secs(30), || async {
        let v = cellmon_testkit::verify::verify(
            &ledger,
            &pool,
            &influx,
            backends.influx_database(),
            Some(ingest.class_id.0),
        )
        .await?;
        anyhow::ensure!(
            v.postgres.passes() && v.influx.passes() && v.disagreements.is_empty(),
            "{}",
            v.summary()
        );
        anyhow::ensure!(v.executions.missing == vec![poison_id], "{}", v.summary());
        Ok(v)
    })
    .await?;
    eprintln!("{}", verdict.summary());
    assert!(verdict.executions.duplicates.is_empty() && verdict.executions.extra.is_empty());

    // The other points are written before the refused one is bisected out
    // and dead-lettered, so the count may follow the verdict by a moment.
    let text = cellmon_testkit::eventually(Duration::from_secs(10), || async {
        let text = persister.metrics().await?;
        let dead = metric(
            &text,
            r#"cellmon_persist_dead_letters_total{sink="influx"}"#,
        );
        anyhow::ensure!(dead == Some(1.0), "dead letters {dead:?}:\n{text}");
        Ok(text)
    })
    .await?;
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
    let ingest = Ingest::start(&backends, |_| {}).await?;
    let persister = Persister::start(&backends, |_| {}).await?;
    let events: Vec<Value> = (0..2_000).map(|n| classroom_event(n % 40, n)).collect();
    let mut ledger = Ledger::new();
    let url = ingest.events_url();
    let proxy = backends.stack.postgres.proxy();
    let sender = async { send_all(&url, &events, 10, 4, &mut ledger).await };
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
    let text = persister.metrics().await?;
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
    let ingest = Ingest::start(&backends, |_| {}).await?;
    let persister = Persister::start(&backends, |_| {}).await?;
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
    let acknowledged = ledger.ids(cellmon_testkit::verify::Outcome::Ok).len();
    let availability = acknowledged as f64 / attempted as f64;
    eprintln!(
        "PG-SLOW: {acknowledged}/{attempted} acknowledged ({:.2}%)",
        availability * 100.0
    );
    assert!(availability >= 0.999, "availability {availability}");
    let verdict = verified(&backends, ingest.class_id, &ledger, Duration::from_secs(60)).await?;
    assert_pass(&verdict);
    cellmon_testkit::eventually(Duration::from_secs(20), || async {
        let text = persister.metrics().await?;
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
    let ingest = Ingest::start(&backends, |_| {}).await?;
    let persister = Persister::start(&backends, |_| {}).await?;
    let pool = sqlx::PgPool::connect(&backends.pg_url()).await?;
    backends.stack.influx.proxy().set_fault(Fault::Down);
    let url = ingest.events_url();
    let mut ledger = Ledger::new();
    let worst_lag = postgres_lag_under_load(&url, &pool, 16, 25, 20, &mut ledger).await?;
    eprintln!("INFLUX-DOWN: worst Postgres lag {worst_lag:?}");
    assert!(
        worst_lag < Duration::from_secs(1),
        "Postgres lag {worst_lag:?}"
    );
    let text = persister.metrics().await?;
    let retries = metric(&text, r#"cellmon_persist_retries_total{sink="influx"}"#).unwrap_or(0.0);
    assert!(retries > 0.0, "InfluxDB was unreachable: {text}");
    backends.stack.influx.proxy().clear();
    let verdict = verified(&backends, ingest.class_id, &ledger, Duration::from_secs(60)).await?;
    assert_pass(&verdict);
    Ok(())
}

/// A persister as a child process of its own, so the test can SIGKILL it.
struct PersisterProcess {
    child: tokio::process::Child,
    url: String,
}

impl PersisterProcess {
    /// Starts one and waits until its `pg` sink consumes (it has migrated
    /// and joined the group).
    async fn spawn(backends: &TestBackends) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_persister"))
            .env(
                "CELLMON_PERSISTER_LISTEN__ADDR",
                format!("127.0.0.1:{port}"),
            )
            .env("CELLMON_PERSISTER_REDIS__URL", backends.redis_url())
            .env("CELLMON_PERSISTER_REDIS__PREFIX", backends.redis_prefix())
            .env("CELLMON_PERSISTER_REDIS__TIMEOUT", "3s")
            .env("CELLMON_PERSISTER_POSTGRES__URL", backends.pg_url())
            .env("CELLMON_PERSISTER_POSTGRES__TIMEOUT", "30s")
            .env("CELLMON_PERSISTER_INFLUX__URL", backends.influx_url())
            .env(
                "CELLMON_PERSISTER_INFLUX__DATABASE",
                backends.influx_database(),
            )
            .env("CELLMON_PERSISTER_BATCH_WAIT", "20ms")
            .env("CELLMON_PERSISTER_CLAIM_IDLE", "1s")
            .env("CELLMON_PERSISTER_CLAIM_INTERVAL", "250ms")
            .env(
                "RUST_LOG",
                std::env::var("PERSISTER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .kill_on_drop(true)
            .spawn()?;
        let url = format!("http://127.0.0.1:{port}");
        cellmon_testkit::eventually(Duration::from_secs(30), || async {
            let status = reqwest::get(format!("{url}/health/live")).await?.status();
            anyhow::ensure!(status.is_success());
            Ok(())
        })
        .await?;
        let process = Self { child, url };
        cellmon_testkit::eventually(Duration::from_secs(30), || async {
            let running = process
                .metric(r#"cellmon_persist_sink_running{sink="pg"}"#)
                .await?;
            anyhow::ensure!(running == 1.0, "the pg sink is not consuming yet");
            Ok(())
        })
        .await?;
        Ok(process)
    }

    async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let text = reqwest::get(format!("{}/metrics", self.url))
            .await?
            .text()
            .await?;
        Ok(metric(&text, name).unwrap_or(0.0))
    }

    async fn kill(mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }
}

/// Entries of the `pg` group delivered and not acknowledged, read straight
/// from Redis (not through the proxy, which the test may be hanging).
async fn pg_pending(
    backends: &TestBackends,
    keys: &cellmon_bus::StreamKeys,
) -> anyhow::Result<u64> {
    let direct = format!("redis://{}/", backends.stack.redis.proxy().upstream());
    let client = redis::Client::open(direct)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut pending = 0;
    for key in keys.all_events() {
        let summary: redis::Value = redis::cmd("XPENDING")
            .arg(&key)
            .arg("pg")
            .query_async(&mut conn)
            .await?;
        if let redis::Value::Array(items) = summary
            && let Some(redis::Value::Int(n)) = items.first()
        {
            pending += u64::try_from(*n).unwrap_or(0);
        }
    }
    Ok(pending)
}

/// PERSISTER-KILL: SIGKILL the persister between read and COMMIT, then
/// between COMMIT and XACK; its successors reclaim the pending entries and
/// the ledger check passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persister_kill() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let ingest = Ingest::start(&backends, |_| {}).await?;
    let url = ingest.events_url();
    let pg_proxy = backends.stack.postgres.proxy();
    let redis_proxy = backends.stack.redis.proxy();
    let mut ledger = Ledger::new();

    // 1. Between read and COMMIT: Postgres hangs while a batch is written.
    let first = PersisterProcess::spawn(&backends).await?;
    pg_proxy.set_fault(Fault::Hang);
    let events: Vec<Value> = (0..100).map(|n| classroom_event(n % 10, n)).collect();
    send_all(&url, &events, 10, 4, &mut ledger).await?;
    cellmon_testkit::eventually(Duration::from_secs(20), || async {
        let n = pg_pending(&backends, &ingest.keys).await?;
        anyhow::ensure!(n > 0, "nothing read yet");
        Ok(())
    })
    .await?;
    first.kill().await?;
    pg_proxy.clear();

    // The successor takes the dead consumer's entries over and drains them.
    let second = PersisterProcess::spawn(&backends).await?;
    cellmon_testkit::eventually(Duration::from_secs(30), || async {
        let n = pg_pending(&backends, &ingest.keys).await?;
        anyhow::ensure!(n == 0, "{n} still pending");
        Ok(())
    })
    .await?;
    let reclaimed = second
        .metric(r#"cellmon_persist_reclaimed_total{sink="pg"}"#)
        .await?;
    eprintln!("PERSISTER-KILL read->COMMIT: successor reclaimed {reclaimed}");
    assert!(reclaimed > 0.0);

    // 2. Between COMMIT and XACK: Postgres slow, so the batch is in flight
    // for seconds; Redis hung meanwhile, so after COMMIT nothing can be
    // acknowledged.
    pg_proxy.set_fault(Fault::Latency(Duration::from_millis(400)));
    let events: Vec<Value> = (100..200).map(|n| classroom_event(n % 10, n)).collect();
    let ids = event_ids(&events);
    // Straight to Postgres, not through the slowed proxy.
    let pool = sqlx::PgPool::connect(&format!(
        "postgres://postgres@{}/{}",
        pg_proxy.upstream(),
        backends.pg_database()
    ))
    .await?;
    send_all(&url, &events, 100, 1, &mut ledger).await?;
    // The persister has the batch once its transaction is open.
    cellmon_testkit::eventually(Duration::from_secs(20), || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE application_name = 'cellmon-persister' AND datname = $1
               AND xact_start IS NOT NULL",
        )
        .bind(backends.pg_database())
        .fetch_one(&pool)
        .await?;
        anyhow::ensure!(n > 0, "no batch being written yet");
        Ok(())
    })
    .await?;
    redis_proxy.set_fault(Fault::Hang);
    cellmon_testkit::eventually(Duration::from_secs(30), || async {
        let n = count_in_postgres(&pool, &ids).await?;
        anyhow::ensure!(n > 0, "nothing committed yet");
        Ok(())
    })
    .await?;
    let pending = pg_pending(&backends, &ingest.keys).await?;
    assert!(pending > 0, "committed and not yet acknowledged");
    second.kill().await?;
    redis_proxy.clear();
    pg_proxy.clear();

    let third = PersisterProcess::spawn(&backends).await?;
    cellmon_testkit::eventually(Duration::from_secs(30), || async {
        let n = pg_pending(&backends, &ingest.keys).await?;
        anyhow::ensure!(n == 0, "{n} still pending");
        Ok(())
    })
    .await?;
    let reclaimed = third
        .metric(r#"cellmon_persist_reclaimed_total{sink="pg"}"#)
        .await?;
    eprintln!(
        "PERSISTER-KILL COMMIT->XACK: {pending} pending at the kill, successor reclaimed {reclaimed}"
    );
    assert!(reclaimed > 0.0);

    let verdict = verified(&backends, ingest.class_id, &ledger, Duration::from_secs(30)).await?;
    assert_pass(&verdict);
    third.kill().await?;
    Ok(())
}

/// The same events, once in order and once shuffled into small requests
/// with every event sent twice, give identical derived status in two
/// independent deployments, and no fabricated significant errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shuffled_and_replayed_events_give_the_same_status() -> anyhow::Result<()> {
    let ordered_backends = TestBackends::shared().await?;
    let shuffled_backends = TestBackends::shared().await?;
    let ordered = Ingest::start(&ordered_backends, |_| {}).await?;
    let _ordered_persister = Persister::start(&ordered_backends, |_| {}).await?;
    let shuffled = Ingest::start(&shuffled_backends, |_| {}).await?;
    let _shuffled_persister = Persister::start(&shuffled_backends, |c| {
        c.batch_max = const { std::num::NonZeroUsize::new(4).unwrap() }
    })
    .await?;
    // The shuffled deployment has a second persister: two consumers per
    // group, committing the same students' events in parallel.
    let second = Persister::start(&shuffled_backends, |c| {
        c.batch_max = const { std::num::NonZeroUsize::new(4).unwrap() }
    })
    .await?;

    let start = time::OffsetDateTime::now_utc() - time::Duration::minutes(4);
    let at = |secs: i64| {
        (start + time::Duration::seconds(secs))
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    };
    let mut events = Vec::new();
    for student in 0..20 {
        let email = format!("s{student:02}@example.ac.jp");
        let mut push = |secs: i64, fields: Value| {
            let mut event = fields;
            event["eventId"] = json!(common::uuid());
            event["eventTime"] = json!(at(secs));
            event["emailAddress"] = json!(email.clone());
            event["notebookPath"] = json!("lesson1.ipynb");
            events.push(event);
        };
        let run = |cell: &str, failed: bool| json!({"eventType": "cell_executed", "cellId": cell, "hasError": failed});
        // Cell a: two failures, a success, two failures: never three in a
        // row by event time, though a worker's order could make it look so.
        for (i, failed) in [true, true, false, true, true].into_iter().enumerate() {
            push(10 + i as i64 * 10, run("a", failed));
        }
        // Cell b: three failures for even students: a significant error.
        if student % 2 == 0 {
            for i in 0..3 {
                push(70 + i * 5, run("b", true));
            }
        }
        if student % 3 == 0 {
            push(100, json!({"eventType": "help"}));
            push(110, json!({"eventType": "help"}));
            if student % 6 == 0 {
                push(115, json!({"eventType": "help_stop"}));
            }
        }
        push(5, json!({"eventType": "notebook_opened"}));
    }

    let mut ledger_a = Ledger::new();
    send_all(
        &ordered.events_url(),
        &events,
        events.len(),
        1,
        &mut ledger_a,
    )
    .await?;
    // Shuffled (a fixed permutation), in requests of 3, every event twice.
    let mut order: Vec<usize> = (0..events.len()).collect();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for i in (1..order.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        order.swap(i, (seed % (i as u64 + 1)) as usize);
    }
    let mut twice: Vec<Value> = order.iter().map(|&i| events[i].clone()).collect();
    twice.extend(order.iter().rev().map(|&i| events[i].clone()));
    let mut ledger_b = Ledger::new();
    send_all(&shuffled.events_url(), &twice, 3, 4, &mut ledger_b).await?;

    assert_pass(
        &verified(
            &ordered_backends,
            ordered.class_id,
            &ledger_a,
            Duration::from_secs(60),
        )
        .await?,
    );
    assert_pass(
        &verified(
            &shuffled_backends,
            shuffled.class_id,
            &ledger_b,
            Duration::from_secs(60),
        )
        .await?,
    );

    async fn statuses(
        backends: &TestBackends,
    ) -> anyhow::Result<std::collections::BTreeMap<String, Value>> {
        let pool = sqlx::PgPool::connect(&backends.pg_url()).await?;
        let rows: Vec<(String, sqlx::types::Json<Value>)> = sqlx::query_as(
            "SELECT s.student_key, st.detail FROM student_status st
             JOIN students s ON s.id = st.student_id",
        )
        .fetch_all(&pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(k, sqlx::types::Json(v))| (k, v))
            .collect())
    }
    // Every commit is followed by a recompute; wait for the last ones.
    let (a, b) = cellmon_testkit::eventually(Duration::from_secs(30), || async {
        let a = statuses(&ordered_backends).await?;
        let b = statuses(&shuffled_backends).await?;
        anyhow::ensure!(a.len() == 20 && a == b, "statuses differ (so far)");
        Ok((a, b))
    })
    .await?;
    assert_eq!(a, b);
    let mut significant = 0;
    for (student, status) in &a {
        let n: usize = student[1..3].parse()?;
        let errors = status["significantErrors"].as_array().map_or(0, Vec::len);
        assert_eq!(
            errors,
            usize::from(n.is_multiple_of(2)),
            "{student}: {status}"
        );
        significant += errors;
        let expected = if n.is_multiple_of(3) && !n.is_multiple_of(6) {
            "help"
        } else if n.is_multiple_of(2) {
            "significant_error"
        } else {
            "error"
        };
        assert_eq!(status["status"], expected, "{student}: {status}");
        assert_eq!(
            status["executions"],
            if n.is_multiple_of(2) { 8 } else { 5 }
        );
    }
    assert_eq!(significant, 10);
    let by_second = second
        .metric(r#"cellmon_persist_events_total{outcome="stored",sink="pg"}"#)
        .await?
        + second
            .metric(r#"cellmon_persist_events_total{outcome="duplicate",sink="pg"}"#)
            .await?;
    second.shutdown().await?;
    eprintln!("the second persister wrote {by_second} of the Postgres entries");
    assert!(by_second > 0.0, "both persisters took part");
    Ok(())
}

/// A persister that cannot run (here: a malformed database URL) stops the
/// process with a message instead of serving health checks while
/// persisting nothing.
#[tokio::test]
async fn a_persister_that_cannot_run_stops_the_process() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_persister"))
        .env("CELLMON_PERSISTER_LISTEN__ADDR", "127.0.0.1:0")
        .env("CELLMON_PERSISTER_REDIS__URL", backends.redis_url())
        .env("CELLMON_PERSISTER_REDIS__PREFIX", backends.redis_prefix())
        .env("CELLMON_PERSISTER_POSTGRES__URL", "not a url")
        .env("RUST_LOG", "error")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), output).await??;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("persister"), "{stderr}");
    Ok(())
}

/// A client's retry of an event that has no `eventTime`, a second or more
/// later, is the same event in both sinks: one row and one point (its time,
/// the first receive time, is part of the InfluxDB point's identity).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_without_event_time_are_one_event() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let ingest = Ingest::start(&backends, |_| {}).await?;
    let _persister = Persister::start(&backends, |_| {}).await?;
    let mut event = classroom_event(1, 4);
    event.as_object_mut().map(|o| o.remove("eventTime"));
    let mut ledger = Ledger::new();
    send_all(&ingest.events_url(), &[event.clone()], 1, 1, &mut ledger).await?;
    // The retry must land in another second of the receive clock.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    send_all(&ingest.events_url(), &[event], 1, 1, &mut ledger).await?;
    let verdict = verified(&backends, ingest.class_id, &ledger, Duration::from_secs(20)).await?;
    assert_pass(&verdict);
    assert_eq!((verdict.postgres.stored, verdict.influx.stored), (1, 1));
    // Both copies went through the stream (no in-request deduplication).
    let text = ingest.metrics().await?;
    assert_eq!(metric(&text, "cellmon_events_accepted_total"), Some(2.0));
    Ok(())
}

/// A student who stops sending events goes idle on the dashboards: the
/// sweep recomputes statuses that time alone changes and publishes them.
#[tokio::test]
async fn a_student_who_stops_goes_idle_on_the_live_channel() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let ingest = Ingest::start(&backends, |_| {}).await?;
    let persister =
        Persister::start(&backends, |c| c.status_sweep = Duration::from_millis(300)).await?;
    let now =
        time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339)?;
    let event = serde_json::json!({
        "eventId": uuid::Uuid::new_v4().to_string(), "eventType": "cell_executed",
        "eventTime": now, "emailAddress": "sleepy@example.ac.jp",
        "notebookPath": "lesson1.ipynb", "cellId": "c1", "code": "x", "hasError": false,
    });
    let mut ledger = Ledger::new();
    send_all(&ingest.events_url(), &[event], 1, 1, &mut ledger).await?;
    let pool = sqlx::PgPool::connect(&backends.pg_url()).await?;
    let status = |pool: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, String>("SELECT status FROM student_status")
            .fetch_optional(&pool)
            .await
            .ok()
            .flatten()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while status(pool.clone()).await.as_deref() != Some("active") {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "never active");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The class considers a student idle after one second.
    sqlx::query("UPDATE classes SET idle_after_seconds = 1 WHERE id = $1")
        .bind(ingest.class_id.0)
        .execute(&pool)
        .await?;
    while status(pool.clone()).await.as_deref() != Some("idle") {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "never idle");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The change went out on the live channel as the class's last message.
    let mut redis = redis::Client::open(backends.redis_url())?
        .get_multiplexed_async_connection()
        .await?;
    let (epoch, _) = cellmon_bus::live::position(&mut redis, &ingest.keys, ingest.class_id).await?;
    let cellmon_bus::live::Since::Messages(messages) =
        cellmon_bus::live::since(&mut redis, &ingest.keys, ingest.class_id, &epoch, 0).await?
    else {
        anyhow::bail!("the class's history is gone");
    };
    let last = messages.last().map(|m| &m.body);
    assert!(
        matches!(
            last,
            Some(cellmon_domain::live::LiveBody::StudentUpdate { status, .. })
                if status.status == cellmon_domain::status::Status::Idle
        ),
        "{messages:?}"
    );
    let text = persister.metrics().await?;
    assert!(metric(&text, "cellmon_status_swept_total").unwrap_or(0.0) >= 1.0);
    Ok(())
}

/// Readiness tells whether the persister persists: 503 naming the sink and
/// its error while Postgres cannot be reached (down, then hung: the answer
/// still comes, bounded by the Postgres timeout), the other checks fine,
/// and 200 once Postgres is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_503_naming_the_sink_while_postgres_is_down() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let persister = Persister::start(&backends, |_| {}).await?;
    let url = format!("{}/health/ready", persister.url());
    // Far longer than any check may take: a hung check fails the test.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let ready = |http: reqwest::Client, url: String| async move {
        let response = http.get(&url).send().await?;
        let status = response.status().as_u16();
        let body: Value = response.json().await?;
        anyhow::Ok((status, body))
    };
    let (status, body) = ready(http.clone(), url.clone()).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ready"], true, "{body}");

    let proxy = backends.stack.postgres.proxy();
    for fault in [Fault::Down, Fault::Hang] {
        proxy.set_fault(fault);
        let body = cellmon_testkit::eventually(Duration::from_secs(20), || async {
            let (status, body) = ready(http.clone(), url.clone()).await?;
            anyhow::ensure!(status == 503, "{status}: {body}");
            Ok(body)
        })
        .await?;
        let checks = body["checks"].as_array().cloned().unwrap_or_default();
        let check = |name: &str| {
            checks
                .iter()
                .find(|c| c["name"] == name)
                .cloned()
                .unwrap_or_default()
        };
        assert_eq!(body["ready"], false, "{body}");
        assert_eq!(check("pg")["ok"], false, "{fault:?}: {body}");
        let reason = check("pg")["error"].as_str().unwrap_or_default().to_owned();
        assert!(!reason.is_empty(), "{fault:?}: no reason in {body}");
        assert_eq!(check("redis")["ok"], true, "{fault:?}: {body}");
        assert_eq!(check("influx")["ok"], true, "{fault:?}: {body}");
        eprintln!("{fault:?}: pg: {reason}");
    }

    proxy.clear();
    cellmon_testkit::eventually(Duration::from_secs(30), || async {
        let (status, body) = ready(http.clone(), url.clone()).await?;
        anyhow::ensure!(status == 200, "{status}: {body}");
        Ok(())
    })
    .await?;
    Ok(())
}

/// A setting that cannot work is refused at load: the binary exits with
/// status 64 and names it (more cases in `tests/settings.rs`).
#[tokio::test]
async fn a_persister_with_an_unusable_setting_exits_64() -> anyhow::Result<()> {
    for (key, value, named) in [
        ("CELLMON_PERSISTER_BATCH_MAX", "0", "batch_max"),
        ("CELLMON_PERSISTER_MAX_DELIVERIES", "0", "max_deliveries"),
    ] {
        let stderr = cellmon_testkit::process::refused_config(
            std::path::Path::new(env!("CARGO_BIN_EXE_persister")),
            "CELLMON_PERSISTER_",
            &[
                ("CELLMON_PERSISTER_LISTEN__ADDR", "127.0.0.1:0"),
                (key, value),
            ],
        )
        .await?;
        let line = format!("persister: bad configuration: {named}: ");
        assert!(
            stderr.lines().any(|l| l.starts_with(&line)),
            "{key}: {stderr}"
        );
    }
    Ok(())
}
