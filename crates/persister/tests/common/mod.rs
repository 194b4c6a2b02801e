//! Helpers shared by the persister's test binaries (each uses a subset):
//! an ingest server and a persister in the test's process, classroom
//! traffic, and the ledger check against both sinks.
#![allow(dead_code)]

use std::num::{NonZeroU16, NonZeroU32};
use std::time::Duration;

use cellmon_bus::StreamKeys;
use cellmon_domain::lms::ClassId;
use cellmon_ingest::config::ClassToken;
use cellmon_persister::Config;
use cellmon_service::{InfluxSettings, PostgresSettings, RedisSettings};
use cellmon_testkit::fixture::TestBackends;
use cellmon_testkit::server::TestServer;
use serde_json::{Value, json};

/// The event streams of every test: the ingest server's and the
/// persister's must agree.
pub(crate) const SHARDS: NonZeroU16 = NonZeroU16::new(4).unwrap();

#[allow(unused_imports, reason = "not every test binary reads metrics")]
pub(crate) use cellmon_testkit::server::metric;

/// An ingest server in this test's process: where the test's events come
/// in. No rate limit (these tests post from one address far faster than a
/// student), its own spool.
pub(crate) struct Ingest {
    pub(crate) url: String,
    pub(crate) class_id: ClassId,
    pub(crate) token: String,
    pub(crate) keys: StreamKeys,
    server: TestServer,
    _spool: tempfile::TempDir,
}

impl Ingest {
    pub(crate) async fn start(
        backends: &TestBackends,
        tune: impl FnOnce(&mut cellmon_ingest::Config),
    ) -> anyhow::Result<Self> {
        let spool = tempfile::tempdir()?;
        let class_id = ClassId::random();
        let token = format!("tok-{}", uuid::Uuid::new_v4().simple());
        let mut config = cellmon_ingest::Config {
            redis: RedisSettings {
                url: backends.redis_url().into(),
                prefix: backends.redis_prefix().to_owned(),
                // Not to spool because a shared CI machine was slow for a
                // moment; tests that want the spool set a short timeout.
                timeout: Duration::from_secs(10),
            },
            stream_shards: SHARDS,
            classes: vec![ClassToken {
                class_id,
                token: token.clone().into(),
            }],
            ..cellmon_ingest::Config::default()
        };
        config.rate_limit.per_second = const { NonZeroU32::new(1_000_000).unwrap() };
        config.rate_limit.burst = const { NonZeroU32::new(1_000_000).unwrap() };
        config.spool.dir = spool.path().to_owned();
        tune(&mut config);
        let keys = StreamKeys::new(config.redis.prefix.clone(), config.stream_shards);
        let server = TestServer::start("ingest server", |listener, shutdown| {
            cellmon_ingest::serve(config, listener, shutdown)
        })
        .await?;
        Ok(Self {
            url: server.url.clone(),
            class_id,
            token,
            keys,
            server,
            _spool: spool,
        })
    }

    pub(crate) fn events_url(&self) -> String {
        format!("{}/api/v1/events?token={}", self.url, self.token)
    }

    pub(crate) async fn metrics(&self) -> anyhow::Result<String> {
        self.server.metrics().await
    }
}

/// The persister's settings for this test's Postgres database, InfluxDB
/// database and Redis prefix, with short timings so faults resolve
/// quickly.
pub(crate) fn persister_config(backends: &TestBackends) -> Config {
    let timeout = Duration::from_secs(3);
    Config {
        redis: RedisSettings {
            url: backends.redis_url().into(),
            prefix: backends.redis_prefix().to_owned(),
            timeout,
        },
        stream_shards: SHARDS,
        postgres: PostgresSettings {
            url: backends.pg_url().into(),
            timeout,
            ..PostgresSettings::default()
        },
        influx: InfluxSettings {
            url: backends.influx_url(),
            database: backends.influx_database().to_owned(),
            timeout,
            ..InfluxSettings::default()
        },
        batch_wait: Duration::from_millis(20),
        claim_idle: Duration::from_secs(1),
        claim_interval: Duration::from_millis(250),
        retry_initial: Duration::from_millis(20),
        retry_max: Duration::from_millis(500),
        trim_interval: Duration::from_millis(200),
        ..Config::default()
    }
}

/// A persister in this test's process.
pub(crate) struct Persister {
    pub(crate) server: TestServer,
}

impl Persister {
    /// Starts one with [`persister_config`] as `tune` changes it, and waits
    /// until both sinks consume.
    pub(crate) async fn start(
        backends: &TestBackends,
        tune: impl FnOnce(&mut Config),
    ) -> anyhow::Result<Self> {
        let mut config = persister_config(backends);
        tune(&mut config);
        let server = TestServer::start("persister", |listener, shutdown| {
            cellmon_persister::serve(config, listener, shutdown)
        })
        .await?;
        let persister = Self { server };
        persister.consuming(Duration::from_secs(30)).await?;
        Ok(persister)
    }

    /// Waits until both sinks consume (their backends prepared, their
    /// groups joined).
    pub(crate) async fn consuming(&self, timeout: Duration) -> anyhow::Result<()> {
        cellmon_testkit::eventually(timeout, || async {
            for sink in ["pg", "influx"] {
                let running = self
                    .metric(&format!("cellmon_persist_sink_running{{sink=\"{sink}\"}}"))
                    .await?;
                anyhow::ensure!(running == 1.0, "the {sink} sink is not consuming yet");
            }
            Ok(())
        })
        .await
    }

    pub(crate) fn url(&self) -> &str {
        &self.server.url
    }

    pub(crate) async fn metrics(&self) -> anyhow::Result<String> {
        self.server.metrics().await
    }

    /// One of its metrics, 0 when absent.
    pub(crate) async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        self.server.metric(name).await
    }

    pub(crate) async fn shutdown(mut self) -> anyhow::Result<()> {
        self.server.shutdown().await
    }
}

pub(crate) fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
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
    anyhow::ensure!(
        per_request > 0 && concurrency > 0,
        "send_all sends at least one event per request, one request at a time"
    );
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let results: Vec<(Vec<uuid::Uuid>, Outcome)> =
        futures_util::stream::iter(events.chunks(per_request))
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
            .buffer_unordered(concurrency)
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
    let keys = StreamKeys::new(backends.redis_prefix(), SHARDS);
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
