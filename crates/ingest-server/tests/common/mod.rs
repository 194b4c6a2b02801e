//! Helpers shared by the ingest test binaries (each uses a subset).
#![allow(dead_code)]

use std::collections::HashSet;
use std::time::Duration;

use cellmon_bus::{StreamKeys, codec};
use cellmon_domain::lms::ClassId;
use cellmon_ingest::config::{ClassToken, RateLimit};
use cellmon_ingest::{Config, serve};
use cellmon_service::RedisSettings;
use cellmon_testkit::fixture::TestBackends;
use cellmon_testkit::server::TestServer;
use redis::AsyncCommands as _;
use redis::streams::StreamRangeReply;
use serde_json::{Value, json};

/// A server running in this test's process.
pub(crate) struct Ingest {
    pub(crate) url: String,
    pub(crate) class_id: ClassId,
    pub(crate) token: String,
    pub(crate) keys: StreamKeys,
    server: TestServer,
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
            redis: RedisSettings {
                url: backends.redis_url().into(),
                prefix: backends.redis_prefix().to_owned(),
                // Tests without faults must not spool because a shared CI
                // machine was slow for a moment; fault tests set their own
                // short timeouts.
                timeout: Duration::from_secs(10),
            },
            stream_shards: std::num::NonZeroU16::try_from(4)?,
            classes: vec![ClassToken {
                class_id,
                token: token.clone().into(),
            }],
            ..Config::default()
        };
        config.spool.dir = spool_dir.to_owned();
        tune(&mut config);
        let keys = StreamKeys::new(config.redis.prefix.clone(), config.stream_shards);
        let server = TestServer::start("ingest server", |listener, shutdown| {
            serve(config, listener, shutdown)
        })
        .await?;
        Ok(Self {
            url: server.url.clone(),
            class_id,
            token,
            keys,
            server,
            _spool: None,
        })
    }

    /// Graceful shutdown, waiting for it to finish.
    pub(crate) async fn shutdown(&mut self) -> anyhow::Result<()> {
        self.server.shutdown().await
    }

    pub(crate) async fn metrics(&self) -> anyhow::Result<String> {
        self.server.metrics().await
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

/// `per_second` and `burst` requests per client address.
pub(crate) fn limit(per_second: u32, burst: u32) -> RateLimit {
    RateLimit {
        per_second: per_second.try_into().expect("a test's rate is not 0"),
        burst: burst.try_into().expect("a test's burst is not 0"),
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

pub(crate) use cellmon_testkit::server::metric;

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
