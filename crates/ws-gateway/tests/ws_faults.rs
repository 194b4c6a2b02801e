//! RELIABILITY.md's WebSocket scenarios with real sockets on real Redis
//! and Postgres: WS-SLOW (one dashboard that reads slowly among fast ones)
//! and WS-CHURN (hundreds of sockets, rapid connect/disconnect cycles,
//! publishing while sockets close).

mod common;

use std::sync::Arc;
use std::time::Duration;

use cellmon_domain::lms::ClassId;
use cellmon_testkit::fixture::TestBackends;
use common::{Gateway, Ws};
use futures_util::StreamExt as _;
use serde_json::json;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// What a fast reader saw.
struct Received {
    /// Offsets in arrival order.
    offsets: Vec<u64>,
    /// Arrival time per offset.
    at: Vec<(u64, Instant)>,
    resynced: bool,
}

/// Reads student updates until `last` arrives (or the socket ends).
async fn read_all(mut ws: Ws, last: Arc<std::sync::atomic::AtomicU64>) -> anyhow::Result<Received> {
    let mut received = Received {
        offsets: Vec::new(),
        at: Vec::new(),
        resynced: false,
    };
    loop {
        let done = last.load(std::sync::atomic::Ordering::Acquire);
        if done > 0 && received.offsets.last() == Some(&done) {
            return Ok(received);
        }
        let frame = tokio::time::timeout(common::WAIT, ws.stream.next())
            .await
            .map_err(|_| anyhow::anyhow!("a fast reader waited {:?}", common::WAIT))?;
        let Some(Ok(Message::Text(text))) = frame else {
            if matches!(frame, Some(Ok(Message::Ping(_) | Message::Pong(_)))) {
                continue;
            }
            anyhow::bail!("a fast reader's socket ended: {frame:?}");
        };
        let now = Instant::now();
        // Only the offset matters here; a full parse per message would make
        // the readers, not the gateway, the bottleneck of a debug build.
        if text.contains("\"type\":\"student_update\"") {
            let offset = field_u64(&text, "\"offset\":")
                .ok_or_else(|| anyhow::anyhow!("no offset in {text}"))?;
            received.offsets.push(offset);
            received.at.push((offset, now));
        } else if text.contains("\"type\":\"resync\"") {
            received.resynced = true;
        }
    }
}

/// The number after `key` in a JSON text.
fn field_u64(text: &str, key: &str) -> Option<u64> {
    let start = text.find(key)? + key.len();
    let digits: String = text[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Publishes `rate` updates per second for `seconds`, in batches every
/// 10 ms; returns the publication time of each offset.
async fn publish_at(
    gateway: &mut Gateway,
    class: ClassId,
    rate: u32,
    seconds: u32,
) -> anyhow::Result<Vec<(u64, Instant)>> {
    let per_tick = rate / 100;
    let mut ticks = tokio::time::interval(Duration::from_millis(10));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut published = Vec::new();
    for tick in 0..seconds * 100 {
        ticks.tick().await;
        let last = gateway
            .publish(class, tick * per_tick, per_tick, per_tick)
            .await?;
        let now = Instant::now();
        for offset in last + 1 - u64::from(per_tick)..=last {
            published.push((offset, now));
        }
    }
    Ok(published)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_slow() -> anyhow::Result<()> {
    const FAST: usize = 100;
    const RATE: u32 = 1_000;
    const SECONDS: u32 = 6;
    let backends = TestBackends::shared().await?;
    let mut gateway = Gateway::start(&backends, |_| {}).await?;
    let (class, _) = gateway.class().await?;
    let (_, token) = gateway.instructor(&[class]).await?;

    let last = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut readers = Vec::new();
    for _ in 0..FAST {
        let mut ws = gateway.connect(&token).await?;
        ws.subscribe(class).await?;
        readers.push(tokio::spawn(read_all(ws, last.clone())));
    }
    let mut slow = gateway.connect(&token).await?;
    slow.subscribe(class).await?;
    let rss_before = rss_kib();
    let started = Instant::now();
    // The slow dashboard reads one message a second.
    let (stop_slow, mut slow_stopped) = tokio::sync::oneshot::channel::<()>();
    let slow_reader = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut slow_stopped => return slow,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            if slow.stream.next().await.is_none() {
                return slow;
            }
        }
    });
    // When the gateway gives up on it.
    let metrics = gateway.state.metrics().clone();
    let watcher = tokio::spawn(async move {
        loop {
            let resynced = metrics.slow_clients.with_label_values(&["resync"]).get();
            let closed = metrics.slow_clients.with_label_values(&["close"]).get();
            if resynced + closed > 0 {
                return Some(started.elapsed());
            }
            if started.elapsed() > Duration::from_secs(60) {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });

    let published = publish_at(&mut gateway, class, RATE, SECONDS).await?;
    let publishing = started.elapsed();
    let total = published.last().map_or(0, |(offset, _)| *offset);
    last.store(total, std::sync::atomic::Ordering::Release);
    let dealt_with = watcher.await?;
    let rss_after = rss_kib();

    // Reading fast now, the slow dashboard finds the resync (or the close)
    // after what was already on its way.
    let _ = stop_slow.send(());
    let mut slow = slow_reader.await?;
    let mut slow_outcome = String::from("nothing");
    let mut slow_read = 0;
    while let Ok(Some(frame)) =
        tokio::time::timeout(Duration::from_secs(5), slow.stream.next()).await
    {
        match frame {
            Ok(Message::Text(text)) if text.contains("\"type\":\"resync\"") => {
                slow_outcome = format!("resync after {slow_read} updates");
                break;
            }
            Ok(Message::Text(_)) => slow_read += 1,
            Ok(Message::Close(frame)) => {
                slow_outcome = format!("closed {frame:?} after {slow_read} updates");
                break;
            }
            Ok(_) => {}
            Err(error) => {
                slow_outcome = format!("dropped ({error}) after {slow_read} updates");
                break;
            }
        }
    }

    let mut latencies = Vec::with_capacity(published.len() * FAST);
    for reader in readers {
        let received = reader.await??;
        assert!(!received.resynced, "a fast reader was resynced");
        assert_eq!(
            received.offsets,
            (1..=total).collect::<Vec<_>>(),
            "a fast reader missed or repeated updates"
        );
        for ((offset, sent), (got, at)) in published.iter().zip(&received.at) {
            assert_eq!(offset, got);
            latencies.push(at.duration_since(*sent));
        }
    }
    latencies.sort();
    let metrics = gateway.state.metrics();
    let resynced = metrics.slow_clients.with_label_values(&["resync"]).get();
    let closed = metrics.slow_clients.with_label_values(&["close"]).get();
    let dealt_with = dealt_with
        .ok_or_else(|| anyhow::anyhow!("the slow socket was never resynced or closed"))?;
    eprintln!(
        "WS-SLOW: {FAST} fast sockets x {total} updates ({RATE}/s offered, published in {:.1} s): \
         p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; slow socket dealt with after {:.1} s: \
         {slow_outcome} (resynced {resynced}, closed {closed}); test process RSS {} -> {} MiB",
        publishing.as_secs_f64(),
        percentile(&latencies, 0.50).as_secs_f64() * 1000.0,
        percentile(&latencies, 0.99).as_secs_f64() * 1000.0,
        percentile(&latencies, 1.0).as_secs_f64() * 1000.0,
        dealt_with.as_secs_f64(),
        rss_before / 1024,
        rss_after / 1024,
    );
    // A stalled reader's writes time out and its connection is dropped; one
    // that still reads now and then may get its resync first.
    assert!(
        ["resync", "closed", "dropped"]
            .iter()
            .any(|outcome| slow_outcome.starts_with(outcome)),
        "the slow socket was neither resynced nor closed: {slow_outcome}"
    );
    assert!(
        dealt_with < publishing,
        "the slow socket was only dealt with after the run ({dealt_with:?})"
    );
    gateway.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_churn() -> anyhow::Result<()> {
    const STEADY: usize = 500;
    const CYCLES: usize = 200;
    let backends = TestBackends::shared().await?;
    let mut gateway = Gateway::start(&backends, |_| {}).await?;
    let (class, _) = gateway.class().await?;
    let mut tokens = Vec::new();
    for _ in 0..10 {
        tokens.push(gateway.instructor(&[class]).await?.1);
    }

    let last = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    // Sixteen dashboards open at a time.
    let opened: Vec<Ws> = futures_util::stream::iter(0..STEADY)
        .map(|i| {
            let gateway = &gateway;
            let token = tokens[i % tokens.len()].clone();
            async move {
                let mut ws = gateway.connect(&token).await?;
                ws.subscribe(class).await?;
                anyhow::Ok(ws)
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let opening = started.elapsed();
    let readers: Vec<_> = opened
        .into_iter()
        .map(|ws| tokio::spawn(read_all(ws, last.clone())))
        .collect();
    assert_eq!(gateway.state.metrics().connections.get(), STEADY as i64);

    // Sockets come and go while the class is busy: some close properly,
    // some vanish mid-stream, some go before their snapshot arrives.
    let url = gateway.url();
    let churn_tokens = tokens.clone();
    let churn = tokio::spawn(async move {
        for cycle in 0..CYCLES {
            let token = &churn_tokens[cycle % churn_tokens.len()];
            let mut ws = Ws::connect(&url, Some(token), None).await?;
            ws.send(json!({"type": "subscribe", "classId": class}))
                .await?;
            match cycle % 3 {
                0 => {
                    ws.expect("snapshot").await?;
                    ws.close().await?;
                }
                1 => {
                    ws.expect("snapshot").await?;
                    drop(ws);
                }
                _ => drop(ws),
            }
        }
        anyhow::Ok(())
    });
    let mut total = 0;
    let mut n = 0;
    while !churn.is_finished() || n < 200 {
        total = gateway.publish(class, n, 1, 1).await?;
        n += 1;
        // 20 updates/s to 500 sockets: 10,000 messages/s, about what one
        // process of a debug build serves besides its 500 readers.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    churn.await??;
    let churning = started.elapsed() - opening;
    last.store(total, std::sync::atomic::Ordering::Release);
    for reader in readers {
        let received = reader.await??;
        assert_eq!(
            received.offsets,
            (1..=total).collect::<Vec<_>>(),
            "a steady socket missed or repeated updates"
        );
    }
    eprintln!(
        "WS-CHURN: {STEADY} steady sockets opened in {:.1} s; each got all {total} updates \
         during {CYCLES} connect/disconnect cycles ({:.1} s); all read after {:.1} s",
        opening.as_secs_f64(),
        churning.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );

    // Nothing is left behind once every socket is gone.
    let metrics = gateway.state.metrics().clone();
    common::wait_until(|| async { metrics.connections.get() == 0 }).await?;
    assert_eq!(metrics.subscriptions.get(), 0);
    assert_eq!(metrics.rooms.get(), 0);
    assert_eq!(gateway.state.hub().members(class), 0);
    assert_eq!(gateway.state.hub().users(), (0, 0));
    // And the gateway still serves.
    let mut ws = gateway.connect(&tokens[0]).await?;
    let snapshot = ws.subscribe(class).await?;
    assert_eq!(snapshot["offset"].as_u64(), Some(total));
    gateway.stop().await
}

/// REDIS faults between Redis and the gateway: what was published while
/// the gateway's pub/sub connection was away (closed, or silently hung)
/// reaches the sockets after it reconnects, without waiting for the class's
/// next message, also in a class that had no message yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_messages_missed_during_a_pubsub_outage_are_caught_up() -> anyhow::Result<()> {
    use cellmon_testkit::backend::BackendKind;
    use cellmon_testkit::proxy::Fault;

    let backends = TestBackends::shared().await?;
    let gateway = Gateway::start(&backends, |_| {}).await?;
    let proxy = backends.backend(BackendKind::Redis).proxy();
    // The publisher goes around the gateway's proxy.
    let mut direct = redis::Client::open(format!("redis://{}/", proxy.upstream()))?
        .get_multiplexed_async_connection()
        .await?;
    let (busy, _) = gateway.class().await?;
    let (quiet, _) = gateway.class().await?;
    let (_, token) = gateway.instructor(&[busy, quiet]).await?;
    let mut ws = gateway.connect(&token).await?;
    ws.subscribe(busy).await?;
    ws.subscribe(quiet).await?;
    let mut n = 0;
    let mut publish = async |class: ClassId| -> anyhow::Result<u64> {
        n += 1;
        let update = common::update(class, n);
        let (_, offset) =
            cellmon_bus::live::publish(&mut direct, &gateway.keys, class, &[update]).await?;
        Ok(offset)
    };
    publish(busy).await?;
    assert_eq!(ws.offsets(1).await?, vec![1]);

    for fault in [Fault::Down, Fault::Hang] {
        let connects = gateway.state.metrics().pubsub_connects.get();
        proxy.set_fault(fault);
        // A hang is only noticed by the ping (every 5 s).
        let metrics = gateway.state.metrics().clone();
        common::wait_until(|| async { metrics.pubsub_up.get() == 0 }).await?;
        let missed_busy = publish(busy).await?;
        let missed_quiet = publish(quiet).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        proxy.clear();
        let mut got = Vec::new();
        while got.len() < 2 {
            let value = ws.expect("student_update").await?;
            got.push((
                value["classId"].as_str().unwrap_or_default().to_owned(),
                value["offset"].as_u64().unwrap_or_default(),
            ));
        }
        got.sort();
        let mut expected = vec![
            (busy.to_string(), missed_busy),
            (quiet.to_string(), missed_quiet),
        ];
        expected.sort();
        assert_eq!(got, expected, "after {fault:?}");
        assert!(gateway.state.metrics().pubsub_connects.get() > connects);
    }
    // And live delivery goes on.
    let next = publish(busy).await?;
    let value = ws.expect("student_update").await?;
    assert_eq!(value["offset"].as_u64(), Some(next));
    Ok(())
}
