//! The whole path with real components: the extension's POST to ingest →
//! Redis Streams → persister (Postgres, status, live channel) → gateway →
//! an instructor's socket.

mod common;

use std::time::{Duration, Instant};

use cellmon_ingest::config::ClassToken;
use cellmon_testkit::fixture::TestBackends;
use cellmon_testkit::server::TestServer;
use common::Gateway;
use serde_json::{Value, json};

/// The ingest server and the persister, in this process.
struct Ingest {
    url: String,
    server: TestServer,
    persister: TestServer,
    _spool: tempfile::TempDir,
}

async fn ingest(
    backends: &TestBackends,
    class: cellmon_domain::lms::ClassId,
    token: &str,
) -> anyhow::Result<Ingest> {
    let spool = tempfile::tempdir()?;
    let mut config = cellmon_ingest::Config {
        classes: vec![ClassToken {
            class_id: class,
            token: token.to_owned().into(),
        }],
        ..cellmon_ingest::Config::default()
    };
    config.redis.url = backends.redis_url().into();
    config.redis.prefix = backends.redis_prefix().to_owned();
    config.redis.timeout = Duration::from_secs(10);
    config.spool.dir = spool.path().to_owned();
    let server = TestServer::start("ingest server", |listener, shutdown| {
        cellmon_ingest::serve(config, listener, shutdown)
    })
    .await?;
    let mut persister_config = cellmon_persister::Config {
        batch_wait: Duration::from_millis(5),
        ..cellmon_persister::Config::default()
    };
    persister_config.redis.url = backends.redis_url().into();
    persister_config.redis.prefix = backends.redis_prefix().to_owned();
    persister_config.postgres.url = backends.pg_url().into();
    persister_config.influx.url = backends.influx_url();
    persister_config.influx.database = backends.influx_database().to_owned();
    let persister = TestServer::start("persister", |listener, shutdown| {
        cellmon_persister::serve(persister_config, listener, shutdown)
    })
    .await?;
    Ok(Ingest {
        url: server.url.clone(),
        server,
        persister,
        _spool: spool,
    })
}

impl Ingest {
    async fn post(&self, token: &str, event: Value) -> anyhow::Result<()> {
        let response = reqwest::Client::new()
            .post(format!("{}/api/v1/events?token={token}", self.url))
            .json(&json!([event]))
            .send()
            .await?;
        anyhow::ensure!(
            response.status() == 202,
            "ingest answered {}",
            response.status()
        );
        Ok(())
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        self.server.shutdown().await?;
        self.persister.shutdown().await
    }
}

fn event(kind: &str, email: &str, extra: Value) -> Value {
    let mut event = json!({
        "eventId": uuid::Uuid::new_v4().to_string(),
        "eventType": kind,
        "eventTime": time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        "emailAddress": email,
        "userName": "山田 花子",
        "notebookPath": "lesson1.ipynb",
    });
    if let (Some(event), Some(extra)) = (event.as_object_mut(), extra.as_object()) {
        event.extend(extra.clone());
    }
    event
}

/// A run of `cell`, failed or not.
fn run(email: &str, cell: &str, failed: bool) -> Value {
    event(
        "cell_executed",
        email,
        json!({"cellId": cell, "code": "print(1)", "hasError": failed}),
    )
}

/// The next message of `kind`, skipping others (the persister may send a
/// `student_update` before an `alert`, or more than one).
async fn next_of(ws: &mut common::Ws, kind: &str) -> anyhow::Result<Value> {
    loop {
        let value = ws.json().await?;
        if value["type"] == kind {
            return Ok(value);
        }
    }
}

#[tokio::test]
async fn an_event_posted_to_ingest_reaches_the_instructor_socket() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let mut gateway = Gateway::start(&backends, |_| {}).await?;
    let (class, token) = gateway.class().await?;
    let (_, instructor) = gateway.instructor(&[class]).await?;
    let ingest = ingest(&backends, class, &token).await?;
    let email = "hanako@example.ac.jp";

    let mut ws = gateway.connect(&instructor).await?;
    let snapshot = ws.subscribe(class).await?;
    assert_eq!(snapshot["students"], json!([]));

    let started = Instant::now();
    ingest.post(&token, run(email, "c1", false)).await?;
    let update = ws.expect("student_update").await?;
    let run_latency = started.elapsed();
    assert_eq!(update["classId"], class.to_string());
    assert!(update["student"].to_string().contains(email), "{update}");
    assert_eq!(update["status"]["executions"], 1, "{update}");
    assert_eq!(update["status"]["status"], "active", "{update}");

    let started = Instant::now();
    ingest.post(&token, event("help", email, json!({}))).await?;
    let alert = next_of(&mut ws, "alert").await?;
    let help_latency = started.elapsed();
    assert_eq!(alert["alert"], "help", "{alert}");
    assert_eq!(alert["notebook"], "lesson1.ipynb", "{alert}");
    assert!(alert["student"].to_string().contains(email), "{alert}");
    eprintln!(
        "POST to socket: cell run {:.0} ms, help alert {:.0} ms (debug build, shared machine)",
        run_latency.as_secs_f64() * 1000.0,
        help_latency.as_secs_f64() * 1000.0
    );

    // Three failures of one cell are a significant error.
    for _ in 0..3 {
        ingest.post(&token, run(email, "c2", true)).await?;
    }
    let alert = next_of(&mut ws, "alert").await?;
    assert_eq!(alert["alert"], "significant_error", "{alert}");

    // A dashboard opened now sees the same state in its snapshot, at the
    // offset the first socket has reached.
    let mut late = gateway.connect(&instructor).await?;
    let snapshot = late.subscribe(class).await?;
    let students = snapshot["students"].as_array().cloned().unwrap_or_default();
    assert_eq!(students.len(), 1, "{snapshot}");
    assert_eq!(students[0]["status"]["status"], "help", "{snapshot}");
    assert_eq!(
        students[0]["status"]["significantErrors"]
            .as_array()
            .map(Vec::len),
        Some(1),
        "{snapshot}"
    );
    // Nothing is in flight now: the first socket has everything up to the
    // snapshot's offset.
    tokio::time::sleep(Duration::from_millis(300)).await;
    ws.send(json!({"type": "ping"})).await?;
    let mut last = alert["offset"].as_u64().unwrap_or_default();
    loop {
        let value = ws.json().await?;
        if value["type"] == "pong" {
            break;
        }
        last = value["offset"].as_u64().unwrap_or(last);
    }
    assert_eq!(snapshot["offset"].as_u64(), Some(last), "{snapshot}");

    ingest.stop().await?;
    gateway.stop().await
}
