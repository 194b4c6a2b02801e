//! The producer against a real Redis, through the harness's proxy.

use std::collections::HashSet;
use std::num::NonZeroU16;
use std::time::Duration;

use cellmon_bus::codec;
use cellmon_bus::{Producer, ProducerConfig, PublishError, StreamKeys};
use cellmon_domain::envelope::StreamEvent;
use cellmon_domain::lms::ClassId;
use cellmon_domain::{WireEvent, validate};
use cellmon_testkit::fixture::TestBackends;
use cellmon_testkit::proxy::Fault;
use redis::AsyncCommands as _;
use redis::streams::StreamRangeReply;
use time::macros::datetime;

fn events(class: ClassId, students: usize, per_student: usize) -> Vec<StreamEvent> {
    let mut out = Vec::new();
    for s in 0..students {
        for i in 0..per_student {
            let wire = WireEvent {
                event_type: Some("cell_executed".into()),
                email_address: Some(format!("s{s}@example.ac.jp")),
                team_name: Some("チームA".into()),
                cell_id: Some(format!("c{i}")),
                event_time: Some(format!("2026-04-01T10:{:02}:00Z", i % 60)),
                ..WireEvent::default()
            };
            let event = validate(wire, datetime!(2026-04-01 10:00 UTC)).unwrap();
            out.push(StreamEvent {
                class_id: class,
                event,
            });
        }
    }
    out
}

async fn producer(backends: &TestBackends, timeout: Duration) -> anyhow::Result<Producer> {
    let config = ProducerConfig {
        keys: StreamKeys::new(backends.redis_prefix(), NonZeroU16::try_from(4)?),
        timeout,
    };
    Ok(Producer::connect(&backends.redis_url(), config).await?)
}

#[tokio::test]
async fn published_events_are_in_the_streams_exactly_once() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let producer = producer(&backends, Duration::from_secs(5)).await?;
    let class = ClassId::random();
    let sent = events(class, 20, 10);
    let entry_ids = producer.publish(&sent).await?;
    assert_eq!(entry_ids.len(), sent.len());

    let client = redis::Client::open(backends.redis_url())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut stored = Vec::new();
    for key in producer.keys().all_events() {
        let reply: StreamRangeReply = conn.xrange_all(&key).await?;
        for entry in reply.ids {
            let event = codec::decode(&entry.map)?;
            assert_eq!(codec::event_id(&entry.map), Some(event.event.id));
            // Each student's events are all in the shard it maps to.
            let shard = producer.keys().shard_for(class, &event.event.student.key);
            assert_eq!(key, producer.keys().events(shard));
            stored.push(event);
        }
    }
    assert_eq!(stored.len(), sent.len());
    let sent_ids: HashSet<_> = sent.iter().map(|e| e.event.id).collect();
    let stored_ids: HashSet<_> = stored.iter().map(|e| e.event.id).collect();
    assert_eq!(stored_ids, sent_ids);
    // Decoding gives back exactly what was sent.
    for event in &stored {
        assert!(sent.contains(event));
    }
    Ok(())
}

#[tokio::test]
async fn a_hung_redis_fails_within_the_timeout() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let timeout = Duration::from_millis(300);
    let producer = producer(&backends, timeout).await?;
    producer.publish(&events(ClassId::random(), 1, 1)).await?;

    backends.stack.redis.proxy().set_fault(Fault::Hang);
    let started = std::time::Instant::now();
    let result = producer.publish(&events(ClassId::random(), 1, 1)).await;
    assert!(
        matches!(result, Err(PublishError::Timeout(_))),
        "{result:?}"
    );
    // Bounded: the caller gets its answer, it does not wait for Redis.
    assert!(started.elapsed() < Duration::from_secs(5));

    backends.stack.redis.proxy().clear();
    cellmon_testkit::eventually(Duration::from_secs(10), || async {
        Ok(producer.publish(&events(ClassId::random(), 1, 1)).await?)
    })
    .await?;
    Ok(())
}
