//! Helpers shared by the ingest test binaries (each uses a subset).
#![allow(dead_code)]

use std::collections::HashSet;
use std::time::Duration;

use cellmon_bus::{StreamKeys, codec};
use cellmon_domain::lms::ClassId;
use cellmon_ingest::config::ClassToken;
use cellmon_ingest::{Config, serve};
use cellmon_testkit::fixture::TestBackends;
use redis::AsyncCommands as _;
use redis::streams::StreamRangeReply;
use serde_json::{Value, json};
use tokio::sync::oneshot;

/// A server running in this test's process, stopped on drop.
pub(crate) struct Ingest {
    pub(crate) url: String,
    pub(crate) class_id: ClassId,
    pub(crate) token: String,
    pub(crate) keys: StreamKeys,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
    _spool: Option<tempfile::TempDir>,
}

impl Ingest {
    pub(crate) async fn start(
        backends: &TestBackends,
        tune: impl FnOnce(&mut Config),
    ) -> anyhow::Result<Self> {
        let spool = tempfile::tempdir()?;
        let mut ingest = Self::start_with_spool(backends, spool.path(), tune).await?;
        ingest._spool = Some(spool);
        Ok(ingest)
    }

    pub(crate) async fn start_with_spool(
        backends: &TestBackends,
        spool_dir: &std::path::Path,
        tune: impl FnOnce(&mut Config),
    ) -> anyhow::Result<Self> {
        let class_id = ClassId::random();
        let token = format!("tok-{}", uuid::Uuid::new_v4().simple());
        let mut config = Config {
            redis_url: backends.redis_url().into(),
            stream_prefix: backends.redis_prefix().to_owned(),
            stream_shards: 4,
            classes: vec![ClassToken {
                class_id,
                token: token.clone().into(),
            }],
            ..Config::default()
        };
        config.spool.dir = spool_dir.to_owned();
        // Tests without faults must not spool because a shared CI machine
        // was slow for a moment; fault tests set their own short timeouts.
        config.redis_timeout_ms = 10_000;
        tune(&mut config);
        let keys = StreamKeys::new(config.stream_prefix.clone(), config.stream_shards);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let done = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            if let Err(error) = serve(config, listener, shutdown).await {
                eprintln!("ingest server failed: {error:#}");
            }
        });
        let ingest = Self {
            url: format!("http://{addr}"),
            class_id,
            token,
            keys,
            stop: Some(stop),
            done: Some(done),
            _spool: None,
        };
        let http = reqwest::Client::new();
        cellmon_testkit::eventually(Duration::from_secs(10), || async {
            let status = http
                .get(format!("{}/health/live", ingest.url))
                .send()
                .await?
                .status();
            anyhow::ensure!(status.is_success(), "live: {status}");
            Ok(())
        })
        .await?;
        Ok(ingest)
    }

    /// Graceful shutdown, waiting for it to finish.
    pub(crate) async fn shutdown(&mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(done) = self.done.take() {
            done.await?;
        }
        Ok(())
    }

    pub(crate) async fn metrics(&self) -> anyhow::Result<String> {
        Ok(reqwest::get(format!("{}/metrics", self.url))
            .await?
            .text()
            .await?)
    }

    pub(crate) fn events_url(&self) -> String {
        format!("{}/api/v1/events?token={}", self.url, self.token)
    }

    /// Every event id in this test's streams, with repeats.
    pub(crate) async fn stored_ids(&self, backends: &TestBackends) -> anyhow::Result<Vec<String>> {
        Ok(stream_events(&backends.redis_url(), &self.keys)
            .await?
            .into_iter()
            .map(|e| e.event.id.to_string())
            .collect())
    }
}

pub(crate) fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

pub(crate) fn cell_executed(email: &str, n: usize) -> Value {
    let failed = n.is_multiple_of(7);
    json!({
        "eventId": uuid(),
        "eventType": "cell_executed",
        "eventTime": "2026-04-01T10:00:00.000Z",
        "emailAddress": email,
        "userName": "山田 花子",
        "teamName": "チーム12",
        "sessionId": "6f1e3a52-0c57-4d1e-a4f5-3b0b6a2d9c11",
        "notebookPath": "lesson1/intro.ipynb",
        "cellId": format!("cell-{n}"),
        "cellIndex": n,
        "cellType": "code",
        "code": "x = 1\nprint(x)",
        "executionCount": n,
        "hasError": failed,
        "errorMessage": if failed { Some("NameError: name 'y' is not defined") } else { None },
        "result": "1",
        "executionDurationMs": 3.5
    })
}

pub(crate) async fn post(
    http: &reqwest::Client,
    url: &str,
    body: &Value,
) -> anyhow::Result<(u16, Value)> {
    let response = http.post(url).json(body).send().await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await?))
}

/// Posts one event per request from `students` students until `stop`;
/// returns the ledger: (acknowledged ids, refused ids).
pub(crate) async fn load(
    url: String,
    requests: usize,
) -> anyhow::Result<(Vec<String>, Vec<String>, Vec<Duration>)> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let (mut ok, mut refused, mut latencies) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..requests {
        let event = cell_executed(&format!("s{:02}@example.ac.jp", i % 20), i);
        let id = event["eventId"].as_str().unwrap_or_default().to_owned();
        let started = std::time::Instant::now();
        let result = http.post(&url).json(&json!([event])).send().await;
        latencies.push(started.elapsed());
        match result {
            Ok(response) if response.status() == 202 => ok.push(id),
            Ok(_) => refused.push(id),
            // Unknown outcome: neither list; it may or may not be stored.
            Err(_) => {}
        }
    }
    Ok((ok, refused, latencies))
}

/// Every acknowledged id is in the stream and no refused one is. Repeats of
/// an id in the stream are allowed here: a hand-off that timed out may
/// still have reached Redis before the events were spooled and replayed;
/// the persisters store each id once. (The no-fault test checks that the
/// stream has no repeats at all.)
pub(crate) async fn assert_stored_exactly(
    ingest: &Ingest,
    backends: &TestBackends,
    ok: &[String],
    refused: &[String],
) -> anyhow::Result<()> {
    let ok_set: HashSet<&String> = ok.iter().collect();
    let stored = cellmon_testkit::eventually(Duration::from_secs(15), || async {
        let stored = ingest.stored_ids(backends).await?;
        let stored_set: HashSet<String> = stored.iter().cloned().collect();
        let lost = ok_set
            .iter()
            .filter(|id| !stored_set.contains(**id))
            .count();
        anyhow::ensure!(
            lost == 0,
            "{lost} acknowledged events not in the stream yet"
        );
        Ok(stored_set)
    })
    .await?;
    let unexpected: Vec<&String> = refused.iter().filter(|id| stored.contains(*id)).collect();
    assert!(
        unexpected.is_empty(),
        "refused events were stored: {unexpected:?}"
    );
    Ok(())
}

/// The value of a metric line `name value` (no labels), exactly.
pub(crate) fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(' ')?;
        (key == name).then(|| value.trim().parse().ok()).flatten()
    })
}

/// Every event in the streams named by `keys`, decoded, with repeats.
pub(crate) async fn stream_events(
    redis_url: &str,
    keys: &StreamKeys,
) -> anyhow::Result<Vec<cellmon_domain::envelope::StreamEvent>> {
    let client = redis::Client::open(redis_url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut events = Vec::new();
    for key in keys.all_events() {
        let reply: StreamRangeReply = conn.xrange_all(&key).await?;
        for entry in reply.ids {
            events.push(codec::decode(&entry.map)?);
        }
    }
    Ok(events)
}

/// Settings that make `Ingest` also run the persister against this test's
/// Postgres database and InfluxDB database, with short timings so faults
/// resolve quickly.
pub(crate) fn persisting(backends: &TestBackends) -> impl FnOnce(&mut Config) + use<> {
    let pg = backends.pg_url();
    let influx = backends.influx_url();
    let influx_db = backends.influx_database().to_owned();
    move |config: &mut Config| {
        config.role = cellmon_ingest::config::Role::All;
        // These tests post from one address far faster than a student.
        config.rate_limit.per_second = 1_000_000;
        config.rate_limit.burst = 1_000_000;
        let p = &mut config.persister;
        p.postgres_url = pg.into();
        p.influx_url = influx;
        p.influx_database = influx_db;
        p.postgres_timeout_ms = 3_000;
        p.influx_timeout_ms = 3_000;
        p.batch_wait_ms = 20;
        p.claim_idle_ms = 1_000;
        p.claim_interval_ms = 250;
        p.retry_initial_ms = 20;
        p.retry_max_ms = 500;
        p.trim_interval_ms = 200;
    }
}

/// A mix of what a class sends: runs (some failing), notebook opens, help.
pub(crate) fn classroom_event(student: usize, n: usize) -> Value {
    let email = format!("student{student:03}@example.ac.jp");
    let time = format!(
        "2026-04-01T10:{:02}:{:02}.{:03}Z",
        (n / 60) % 60,
        n % 60,
        student % 1000
    );
    let mut event = match n % 10 {
        0 => json!({"eventType": "notebook_opened"}),
        1 => json!({"eventType": "help"}),
        2 => json!({"eventType": "help_stop"}),
        _ => json!({
            "eventType": "cell_executed",
            "cellId": format!("cell-{}", n % 4),
            "code": "print(x)",
            "hasError": n.is_multiple_of(3),
            "errorMessage": "NameError: name 'x' is not defined",
            "executionCount": n,
            "executionDurationMs": 1.5
        }),
    };
    event["eventId"] = json!(uuid());
    event["eventTime"] = json!(time);
    event["emailAddress"] = json!(email);
    event["userName"] = json!(format!("学生 {student}"));
    event["teamName"] = json!(format!("チーム{}", student % 10));
    event["notebookPath"] = json!("lesson1/intro.ipynb");
    event
}

/// Posts `events` in requests of `per_request`, `concurrency` at a time,
/// and records every outcome in a ledger.
pub(crate) async fn send_all(
    url: &str,
    events: &[Value],
    per_request: usize,
    concurrency: usize,
    ledger: &mut cellmon_testkit::verify::Ledger,
) -> anyhow::Result<()> {
    use cellmon_testkit::verify::Outcome;
    use futures_util::StreamExt as _;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let results: Vec<(Vec<uuid::Uuid>, Outcome)> =
        futures_util::stream::iter(events.chunks(per_request.max(1)))
            .map(|chunk| {
                let http = http.clone();
                let ids = event_ids(chunk);
                let body = Value::Array(chunk.to_vec());
                async move {
                    let outcome = match http.post(url).json(&body).send().await {
                        Ok(r) if r.status().is_success() => Outcome::Ok,
                        Ok(_) => Outcome::Fail,
                        Err(_) => Outcome::Unknown,
                    };
                    (ids, outcome)
                }
            })
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
    for (ids, outcome) in results {
        for id in ids {
            ledger.record(id, outcome);
        }
    }
    Ok(())
}

/// Waits until both sinks hold every acknowledged event of the class and
/// the ledger check passes, then until both consumer groups acknowledged
/// everything in the streams (late copies could still add duplicates), and
/// checks once more; returns that verdict (the last one on timeout).
pub(crate) async fn verified(
    backends: &TestBackends,
    class: ClassId,
    ledger: &cellmon_testkit::verify::Ledger,
    timeout: Duration,
) -> anyhow::Result<cellmon_testkit::verify::Verdict> {
    let deadline = std::time::Instant::now() + timeout;
    let first = verified_once(backends, class, ledger, timeout).await?;
    if !first.passes() {
        return Ok(first);
    }
    let keys = StreamKeys::new(backends.redis_prefix(), 4);
    let redis = redis::Client::open(backends.redis_url())?;
    let mut conn = redis::aio::ConnectionManager::new(redis).await?;
    loop {
        let left: u64 = cellmon_bus::consumer::backlogs(&mut conn, &keys)
            .await?
            .values()
            .sum();
        if left == 0 || std::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let remaining = deadline.saturating_duration_since(std::time::Instant::now());
    verified_once(
        backends,
        class,
        ledger,
        remaining.max(Duration::from_secs(1)),
    )
    .await
}

async fn verified_once(
    backends: &TestBackends,
    class: ClassId,
    ledger: &cellmon_testkit::verify::Ledger,
    timeout: Duration,
) -> anyhow::Result<cellmon_testkit::verify::Verdict> {
    let pool = sqlx::PgPool::connect(&backends.pg_url()).await?;
    let influx = cellmon_testkit::influx::InfluxClient::new(&backends.influx_url())?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let verdict = cellmon_testkit::verify::verify(
            ledger,
            &pool,
            &influx,
            backends.influx_database(),
            Some(class.0),
        )
        .await;
        match verdict {
            Ok(v) if v.passes() => return Ok(v),
            Ok(v) if std::time::Instant::now() >= deadline => return Ok(v),
            Err(e) if std::time::Instant::now() >= deadline => return Err(e),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The event ids of wire events.
pub(crate) fn event_ids(events: &[Value]) -> Vec<uuid::Uuid> {
    events
        .iter()
        .filter_map(|e| e["eventId"].as_str()?.parse().ok())
        .collect()
}

/// How many of `ids` Postgres holds.
pub(crate) async fn count_in_postgres(
    pool: &sqlx::PgPool,
    ids: &[uuid::Uuid],
) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_id = ANY($1)")
            .bind(ids)
            .fetch_one(pool)
            .await?,
    )
}

/// Sends `rounds` rounds of `per_round` events from `students` students,
/// half a second apart, and returns the longest time Postgres took to hold
/// a round once it was acknowledged.
pub(crate) async fn postgres_lag_under_load(
    url: &str,
    pool: &sqlx::PgPool,
    rounds: usize,
    per_round: usize,
    students: usize,
    ledger: &mut cellmon_testkit::verify::Ledger,
) -> anyhow::Result<Duration> {
    let mut worst_lag = Duration::ZERO;
    for round in 0..rounds {
        let batch: Vec<Value> = (round * per_round..(round + 1) * per_round)
            .map(|i| classroom_event(i % students, i))
            .collect();
        let ids = event_ids(&batch);
        send_all(url, &batch, 5, 4, ledger).await?;
        let sent = std::time::Instant::now();
        cellmon_testkit::eventually(Duration::from_secs(10), || async {
            let n = count_in_postgres(pool, &ids).await?;
            anyhow::ensure!(n == ids.len() as i64, "{n} of {} in Postgres", ids.len());
            Ok(())
        })
        .await?;
        worst_lag = worst_lag.max(sent.elapsed());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(worst_lag)
}
