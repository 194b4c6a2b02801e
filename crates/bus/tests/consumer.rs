//! The consumer against a real Redis, through the test kit's proxy.

use std::num::{NonZeroU16, NonZeroUsize};
use std::time::Duration;

use cellmon_bus::consumer::{Consumer, ConsumerConfig};
use cellmon_bus::{Producer, ProducerConfig, StreamKeys};
use cellmon_domain::envelope::StreamEvent;
use cellmon_domain::lms::ClassId;
use cellmon_domain::{WireEvent, validate};
use cellmon_testkit::eventually;
use cellmon_testkit::fixture::TestBackends;
use cellmon_testkit::proxy::Fault;
use time::macros::datetime;

fn events(class: ClassId, n: usize) -> Vec<StreamEvent> {
    (0..n)
        .map(|i| {
            let wire = WireEvent {
                event_type: Some("cell_executed".into()),
                email_address: Some(format!("s{i}@example.ac.jp")),
                cell_id: Some(format!("c{i}")),
                ..WireEvent::default()
            };
            StreamEvent {
                class_id: class,
                event: validate(wire, datetime!(2026-04-01 10:00 UTC)).unwrap(),
            }
        })
        .collect()
}

/// A read whose reply never arrived leaves entries pending for a consumer
/// that did not see them. The consumer delivers them again on its next read
/// after the failure, long before any other consumer could take them over.
#[tokio::test]
async fn entries_of_a_lost_read_reply_are_delivered_again() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let keys = StreamKeys::new(backends.redis_prefix(), NonZeroU16::try_from(2)?);
    let producer = Producer::connect(
        &backends.redis_url(),
        ProducerConfig {
            keys: keys.clone(),
            timeout: Duration::from_secs(5),
        },
    )
    .await?;
    let config = ConsumerConfig {
        keys: keys.clone(),
        group: "pg".into(),
        consumer: "lost-reply".into(),
        batch_max: NonZeroUsize::try_from(100)?,
        batch_wait: Duration::from_millis(20),
        // Nobody takes anything over during this test.
        claim_idle: Duration::from_secs(600),
        max_deliveries: 5,
        timeout: Duration::from_secs(2),
    };
    let client = redis::Client::open(backends.redis_url())?;
    let consumer = Consumer::connect(&client, config).await?;
    let class = ClassId::random();
    producer.publish(&events(class, 6)).await?;

    // What Redis did for a read whose reply was lost: the entries are now
    // pending for this consumer, which never saw them.
    let mut raw = client.get_multiplexed_async_connection().await?;
    let streams: Vec<String> = keys.all_events().collect();
    let mut read = redis::cmd("XREADGROUP");
    read.arg("GROUP")
        .arg("pg")
        .arg("lost-reply")
        .arg("STREAMS")
        .arg(&streams);
    for _ in &streams {
        read.arg(">");
    }
    let lost: redis::streams::StreamReadReply = read.query_async(&mut raw).await?;
    let mut lost: Vec<String> = lost
        .keys
        .iter()
        .flat_map(|k| k.ids.iter().map(|id| id.id.clone()))
        .collect();
    lost.sort();
    assert_eq!(lost.len(), 6);

    // The consumer's own read fails (the connection is reset) ...
    let proxy = backends.stack.redis.proxy();
    proxy.set_fault(Fault::Reset);
    assert!(consumer.read().await.is_err());
    proxy.clear();

    // ... and its next reads bring back exactly what it had not seen.
    let again = eventually(Duration::from_secs(5), || async {
        let batch = consumer.read().await?;
        anyhow::ensure!(!batch.is_empty(), "nothing read yet");
        Ok(batch)
    })
    .await?;
    let mut ids: Vec<String> = again.iter().map(|e| e.id.clone()).collect();
    ids.sort();
    assert_eq!(ids, lost);
    assert!(again.iter().all(|e| e.event.is_ok()));
    // The connection may still be coming back: retry as the persister does.
    eventually(Duration::from_secs(5), || async {
        Ok(consumer.ack(&again).await?)
    })
    .await?;

    // Once they are acknowledged, reads go on with new entries only.
    let more = events(class, 3);
    eventually(Duration::from_secs(5), || async {
        Ok(producer.publish(&more).await?)
    })
    .await?;
    let next = eventually(Duration::from_secs(5), || async {
        let batch = consumer.read().await?;
        anyhow::ensure!(!batch.is_empty(), "nothing read yet");
        Ok(batch)
    })
    .await?;
    assert_eq!(next.len(), 3);
    assert!(next.iter().all(|e| !lost.contains(&e.id)));
    Ok(())
}
