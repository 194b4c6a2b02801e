//! The line-protocol writer against a real InfluxDB.

use std::time::Duration;

use cellmon_domain::envelope::StreamEvent;
use cellmon_domain::lms::ClassId;
use cellmon_domain::{WireEvent, validate};
use cellmon_store::influx::{InfluxConfig, InfluxError, InfluxWriter, encode_batch};
use cellmon_testkit::fixture::TestBackends;
use cellmon_testkit::influx::InfluxClient;
use time::macros::datetime;

fn writer(backends: &TestBackends) -> anyhow::Result<InfluxWriter> {
    Ok(InfluxWriter::new(InfluxConfig {
        url: backends.influx_url(),
        database: backends.influx_database().to_owned(),
        token: None,
        timeout: Duration::from_secs(10),
    })?)
}

fn event(n: u32, team: &str) -> StreamEvent {
    let wire = WireEvent {
        // Hash-like ids, as clients make them; fixed so the test is too.
        event_id: Some(
            uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, &n.to_be_bytes()).to_string(),
        ),
        event_type: Some("cell_executed".into()),
        // One event time for all: the worst case for point identity.
        event_time: Some("2026-04-01T10:00:00.000Z".into()),
        email_address: Some(format!("s{}@example.ac.jp", n % 100)),
        team_name: Some(team.into()),
        notebook_path: Some("dir/my notebook, v2.ipynb".into()),
        cell_id: Some("c1".into()),
        has_error: Some(n.is_multiple_of(7)),
        execution_duration_ms: Some(1.5),
        ..WireEvent::default()
    };
    StreamEvent {
        class_id: ClassId(uuid::Uuid::from_u128(1)),
        event: validate(wire, datetime!(2026-04-01 10:00 UTC)).unwrap(),
    }
}

/// 20,000 events of one second in one series are 20,000 points, written
/// twice; tags with spaces, commas, equals signs and Japanese survive.
#[tokio::test]
async fn same_second_events_stay_distinct_and_rewrites_are_idempotent() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let writer = writer(&backends)?;
    let batch: Vec<StreamEvent> = (0..20_000).map(|n| event(n, "チーム A,=1")).collect();
    for chunk in batch.chunks(5_000) {
        writer.write(encode_batch(chunk)).await?;
    }
    writer.write(encode_batch(&batch[..5_000])).await?;
    let influx = InfluxClient::new(&backends.influx_url())?;
    let db = backends.influx_database();
    assert_eq!(influx.count(db, "event", "event_id").await?, 20_000);
    assert_eq!(
        influx.count(db, "cell_execution", "event_id").await?,
        20_000
    );
    let teams = influx
        .query(
            Some(db),
            "SHOW TAG VALUES FROM \"event\" WITH KEY = \"team\"",
        )
        .await?;
    assert_eq!(
        teams["results"][0]["series"][0]["values"][0][1],
        "チーム A,=1"
    );
    // A tag value ending in a backslash cannot be written as is; it is kept
    // readable instead of refused.
    writer
        .write(encode_batch(&[event(20_001, "team\\")]))
        .await?;
    let teams = influx
        .query(
            Some(db),
            "SHOW TAG VALUES FROM \"event\" WITH KEY = \"team\"",
        )
        .await?;
    let values = teams["results"][0]["series"][0]["values"].to_string();
    assert!(values.contains("team\u{FF3C}"), "{values}");
    Ok(())
}

/// A field type conflict is a refusal (never retried); an unreachable
/// server is transient.
#[tokio::test]
async fn refusals_and_outages_are_told_apart() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let writer = writer(&backends)?;
    writer
        .write("cell_execution,class=x duration_ms=\"text\" 1775037600000000000".into())
        .await?;
    let error = writer
        .write(encode_batch(&[event(1, "t")]))
        .await
        .expect_err("type conflict");
    assert!(
        matches!(error, InfluxError::Rejected { status: 400, .. }),
        "{error}"
    );
    assert!(!error.is_transient());

    backends
        .stack
        .influx
        .proxy()
        .set_fault(cellmon_testkit::proxy::Fault::Down);
    let error = writer
        .write(encode_batch(&[event(2, "t")]))
        .await
        .expect_err("down");
    assert!(error.is_transient(), "{error}");
    backends.stack.influx.proxy().clear();
    Ok(())
}
