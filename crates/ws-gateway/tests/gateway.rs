//! The gateway against real Redis and Postgres, with real WebSocket
//! clients: subscriptions, resume, authorization (WS-AUTHZ), fan-out to
//! many instructors and sockets, the protocol's limits, shutdown.

mod common;

use std::time::Duration;

use cellmon_testkit::fixture::TestBackends;
use common::{Gateway, Next, Ws, refused_with, seq};
use serde_json::json;

#[tokio::test]
async fn a_subscriber_gets_a_snapshot_then_every_update_in_order() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let mut gateway = Gateway::start(&backends, |_| {}).await?;
    let (class, _) = gateway.class().await?;
    let (_, token) = gateway.instructor(&[class]).await?;
    let mut ws = gateway.connect(&token).await?;
    let snapshot = ws.subscribe(class).await?;
    assert_eq!(snapshot["classId"], class.to_string());
    assert_eq!(snapshot["offset"], 0, "{snapshot}");
    assert_eq!(snapshot["students"], json!([]));
    let epoch = snapshot["epoch"].clone();
    assert!(epoch.as_str().is_some_and(|e| !e.is_empty()));

    gateway.publish(class, 1, 20, 3).await?;
    assert_eq!(ws.offsets(20).await?, seq(1, 20));

    // A second subscriber starts where the class is now.
    let mut late = gateway.connect(&token).await?;
    let snapshot = late.subscribe(class).await?;
    assert_eq!(snapshot["offset"], 20);
    assert_eq!(snapshot["epoch"], epoch);
    gateway.publish(class, 21, 1, 1).await?;
    assert_eq!(late.offsets(1).await?, vec![21]);
    assert_eq!(ws.offsets(1).await?, vec![21]);

    ws.send(json!({"type": "unsubscribe", "classId": class}))
        .await?;
    ws.expect("unsubscribed").await?;
    gateway.publish(class, 22, 1, 1).await?;
    assert_eq!(late.offsets(1).await?, vec![22]);
    ws.send(json!({"type": "ping"})).await?;
    // Nothing of the class arrives after unsubscribing: the next is the pong.
    ws.expect("pong").await?;
    gateway.stop().await
}

/// The pub/sub connection is pinged (every 5 s by default, every 250 ms
/// here, which is also how long an answer may take); a healthy one answers
/// and is kept (it used to be dropped and
/// re-made at every ping, because Redis answers PING on a subscribed
/// connection with an array).
#[tokio::test]
async fn a_healthy_pubsub_connection_is_kept_across_pings() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let mut gateway = Gateway::start(&backends, |config| {
        config.pubsub_ping = Duration::from_millis(250);
    })
    .await?;
    let metrics = gateway.state.metrics();
    common::wait_until(|| async { metrics.pubsub_pongs.get() >= 3 }).await?;
    assert_eq!(metrics.pubsub_connects.get(), 1);
    assert_eq!(metrics.pubsub_up.get(), 1);
    gateway.stop().await
}

#[tokio::test]
async fn resume_with_since_has_no_gap_and_no_duplicate() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let mut gateway = Gateway::start(&backends, |_| {}).await?;
    let (class, _) = gateway.class().await?;
    let (_, token) = gateway.instructor(&[class]).await?;

    let mut ws = gateway.connect(&token).await?;
    let snapshot = ws.subscribe(class).await?;
    let epoch = snapshot["epoch"].as_str().unwrap_or_default().to_owned();
    gateway.publish(class, 1, 10, 4).await?;
    assert_eq!(ws.offsets(10).await?, seq(1, 10));
    // The connection drops without a close frame.
    drop(ws);

    gateway.publish(class, 11, 15, 4).await?;
    let mut ws = gateway.connect(&token).await?;
    ws.send(
        json!({"type": "subscribe", "classId": class, "since": {"epoch": epoch, "offset": 10}}),
    )
    .await?;
    // Publishing goes on while the client resumes.
    let publishing = {
        let mut redis = gateway.redis.clone();
        let keys = gateway.keys.clone();
        tokio::spawn(async move {
            for n in 26..=40 {
                cellmon_bus::live::publish(&mut redis, &keys, class, &[common::update(class, n)])
                    .await?;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            anyhow::Ok(())
        })
    };
    let mut offsets = Vec::new();
    let mut subscribed = None;
    while offsets.len() < 30 {
        let value = ws.json().await?;
        match value["type"].as_str() {
            Some("student_update") => {
                offsets.push(value["offset"].as_u64().unwrap_or_default());
                assert_eq!(value["epoch"], epoch.as_str());
            }
            Some("subscribed") => subscribed = value["offset"].as_u64(),
            _ => anyhow::bail!("unexpected {value}"),
        }
    }
    publishing.await??;
    assert_eq!(
        offsets,
        seq(11, 40),
        "every missed and new update once, in order"
    );
    let subscribed = subscribed.ok_or_else(|| anyhow::anyhow!("no subscribed message"))?;
    assert!(
        (25..=40).contains(&subscribed),
        "subscribed at {subscribed}"
    );

    // A point from another epoch, or past the end, gets a resync and a
    // snapshot.
    for since in [
        json!({"epoch": "not-the-epoch", "offset": 3}),
        json!({"epoch": epoch, "offset": 1000}),
    ] {
        let mut ws = gateway.connect(&token).await?;
        ws.send(json!({"type": "subscribe", "classId": class, "since": since}))
            .await?;
        let resync = ws.expect("resync").await?;
        assert_eq!(resync["reason"], "gone");
        assert_eq!(resync["offset"], 40);
        let snapshot = ws.expect("snapshot").await?;
        assert_eq!(snapshot["offset"], 40);
    }

    // When Redis lost the history (a new epoch), a subscriber is restarted
    // with a resync and a snapshot instead of getting offsets that repeat.
    let mut ws = gateway.connect(&token).await?;
    ws.subscribe(class).await?;
    let _: () = redis::cmd("DEL")
        .arg(gateway.keys.history_meta(class))
        .arg(gateway.keys.history(class))
        .query_async(&mut gateway.redis)
        .await?;
    gateway.publish(class, 41, 1, 1).await?;
    let resync = ws.expect("resync").await?;
    assert_eq!(resync["reason"], "gone");
    assert_ne!(resync["epoch"], epoch.as_str());
    let snapshot = ws.expect("snapshot").await?;
    assert_eq!(snapshot["offset"], 1);
    gateway.stop().await
}

#[tokio::test]
async fn ws_authz() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let mut gateway =
        Gateway::start(&backends, |config| config.jwt_leeway = Duration::ZERO).await?;
    let (mine, _) = gateway.class().await?;
    let (theirs, _) = gateway.class().await?;
    let (me, token) = gateway.instructor(&[mine]).await?;
    let (_, other_token) = gateway.instructor(&[theirs]).await?;
    let url = gateway.url();

    // Refused before the upgrade.
    assert_eq!(refused_with(&url, None, None).await?, Some(401), "no token");
    let expired = {
        let verifier = &gateway.verifier;
        // Signed with the right secret, expired a second ago.
        let token = verifier.issue_token(me, 0)?;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        token
    };
    assert_eq!(
        refused_with(&url, Some(&expired), None).await?,
        Some(401),
        "expired"
    );
    let forged = cellmon_gateway::auth::Verifier::new(&"not-the-secret".to_owned().into(), 0, 30)
        .issue_token(me, 600)?;
    assert_eq!(
        refused_with(&url, Some(&forged), None).await?,
        Some(401),
        "forged"
    );
    assert_eq!(
        refused_with(&url, Some(&token), Some("https://evil.example")).await?,
        Some(403),
        "foreign Origin"
    );
    assert_eq!(
        refused_with(&url, Some(&token), Some("https://dash.example.edu")).await?,
        None,
        "allowed Origin"
    );
    let refused = gateway.state.metrics().refused.clone();
    assert_eq!(refused.with_label_values(&["unauthorized"]).get(), 3);
    assert_eq!(refused.with_label_values(&["origin"]).get(), 1);

    // A ticket works once traded for a token; a token is no ticket.
    let http = reqwest::Client::new();
    let response = http
        .post(format!("{}/api/v1/ws-ticket", gateway.http()))
        .bearer_auth(&token)
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    let ticket: serde_json::Value = response.json().await?;
    let ticket = ticket["ticket"].as_str().unwrap_or_default().to_owned();
    let mut by_ticket = Ws::connect(&format!("{url}?ticket={ticket}"), None, None).await?;
    by_ticket.subscribe(mine).await?;
    assert_eq!(
        refused_with(&format!("{url}?ticket={token}"), None, None).await?,
        Some(401),
        "a token passed as a ticket"
    );
    let response = http
        .post(format!("{}/api/v1/ws-ticket", gateway.http()))
        .send()
        .await?;
    assert_eq!(response.status(), 401);
    let body: serde_json::Value = response.json().await?;
    assert_eq!(body["error"]["code"], "unauthorized");

    // Another class's room is refused at subscribe, and nothing of it
    // reaches this socket while both classes are busy.
    let mut ws = gateway.connect(&token).await?;
    ws.send(json!({"type": "subscribe", "classId": theirs}))
        .await?;
    let error = ws.expect("error").await?;
    assert_eq!(error["code"], "forbidden");
    assert_eq!(error["classId"], theirs.to_string());
    ws.subscribe(mine).await?;
    let mut other = gateway.connect(&other_token).await?;
    other.subscribe(theirs).await?;
    for n in 0..10 {
        gateway.publish(theirs, n * 2, 2, 2).await?;
        gateway.publish(mine, n, 1, 1).await?;
    }
    for ws in [&mut ws, &mut by_ticket] {
        for expected in 1..=10 {
            let value = ws.expect("student_update").await?;
            assert_eq!(value["classId"], mine.to_string(), "{value}");
            assert_eq!(value["offset"], expected);
        }
        ws.send(json!({"type": "ping"})).await?;
        ws.expect("pong").await?;
    }
    assert_eq!(other.offsets(20).await?, seq(1, 20));

    // An open socket does not outlive its token, and one opened with a
    // ticket lives as long as the token the ticket came from.
    let short = gateway.verifier.issue_token(me, 2)?;
    let mut ws = gateway.connect(&short).await?;
    ws.subscribe(mine).await?;
    let ticket: serde_json::Value = http
        .post(format!("{}/api/v1/ws-ticket", gateway.http()))
        .bearer_auth(&short)
        .send()
        .await?
        .json()
        .await?;
    let ticket = ticket["ticket"].as_str().unwrap_or_default().to_owned();
    let mut by_short_ticket = Ws::connect(&format!("{url}?ticket={ticket}"), None, None).await?;
    for ws in [&mut ws, &mut by_short_ticket] {
        loop {
            match ws.next().await? {
                Next::Closed(code) => {
                    assert_eq!(code, Some(1008), "closed at expiry");
                    break;
                }
                Next::Json(_) => {}
            }
        }
    }
    gateway.stop().await
}

#[tokio::test]
async fn broadcast_to_100_instructors_with_several_sockets_each() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let mut gateway = Gateway::start(&backends, |_| {}).await?;
    let (class, _) = gateway.class().await?;
    let mut sockets = Vec::new();
    for i in 0..100 {
        let (_, token) = gateway.instructor(&[class]).await?;
        // Every tenth instructor has three dashboards open.
        for _ in 0..if i % 10 == 0 { 3 } else { 1 } {
            let mut ws = gateway.connect(&token).await?;
            ws.subscribe(class).await?;
            sockets.push(ws);
        }
    }
    assert_eq!(sockets.len(), 120);
    assert_eq!(gateway.state.hub().members(class), 120);
    assert_eq!(gateway.state.hub().users(), (100, 120));
    gateway.publish(class, 1, 50, 5).await?;
    let received =
        futures_util::future::try_join_all(sockets.iter_mut().map(|ws| ws.offsets(50))).await?;
    for offsets in received {
        assert_eq!(offsets, seq(1, 50));
    }
    gateway.stop().await
}

#[tokio::test]
async fn limits_errors_and_heartbeat() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let mut gateway = Gateway::start(&backends, |config| {
        config.max_subscriptions = 2;
        config.client_messages_per_second = 5;
        config.client_message_burst = 10;
        config.max_message_bytes = 1024;
        config.heartbeat = Duration::from_millis(200);
        config.idle_timeout = Duration::from_millis(600);
    })
    .await?;
    let (a, _) = gateway.class().await?;
    let (b, _) = gateway.class().await?;
    let (c, _) = gateway.class().await?;
    let (_, token) = gateway.instructor(&[a, b, c]).await?;

    let mut ws = gateway.connect(&token).await?;
    ws.send(json!({"type": "subscribe", "class": a})).await?;
    assert_eq!(ws.expect("error").await?["code"], "bad_message");
    ws.stream
        .send(tokio_tungstenite::tungstenite::Message::text("{not json"))
        .await?;
    assert_eq!(ws.expect("error").await?["code"], "bad_message");
    ws.subscribe(a).await?;
    ws.subscribe(b).await?;
    ws.send(json!({"type": "subscribe", "classId": c})).await?;
    assert_eq!(ws.expect("error").await?["code"], "too_many_subscriptions");
    // Resubscribing a class already held is no new subscription.
    ws.subscribe(a).await?;

    for _ in 0..30 {
        ws.send(json!({"type": "ping"})).await?;
    }
    let mut pongs = 0;
    let mut limited = 0;
    for _ in 0..30 {
        match ws.json().await?["type"].as_str() {
            Some("pong") => pongs += 1,
            Some("error") => limited += 1,
            other => anyhow::bail!("unexpected {other:?}"),
        }
    }
    // The burst was partly spent above; what is left is answered.
    assert!(limited > 0 && pongs > 0, "pongs {pongs}, limited {limited}");

    // A message over the limit closes with 1009.
    ws.send(json!({"type": "ping", "pad": "x".repeat(4096)}))
        .await?;
    loop {
        match ws.next().await? {
            Next::Closed(code) => {
                assert_eq!(code, Some(1009));
                break;
            }
            Next::Json(_) => {}
        }
    }

    // A client that answers nothing (no pong) is closed after the idle
    // timeout; reading only afterwards, it finds pings and then the close.
    let mut quiet = gateway.connect(&token).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(quiet.next().await?, Next::Closed(Some(1000)));

    // A binary frame is not the protocol.
    let mut binary = gateway.connect(&token).await?;
    binary
        .stream
        .send(tokio_tungstenite::tungstenite::Message::binary(vec![
            1, 2, 3,
        ]))
        .await?;
    assert_eq!(binary.next().await?, Next::Closed(Some(1003)));

    common::wait_until(|| async { gateway.state.metrics().connections.get() == 0 }).await?;
    assert_eq!(gateway.state.metrics().subscriptions.get(), 0);
    gateway.stop().await
}

#[tokio::test]
async fn shutdown_closes_sockets_with_1001() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let mut gateway = Gateway::start(&backends, |_| {}).await?;
    let (class, _) = gateway.class().await?;
    let (_, token) = gateway.instructor(&[class]).await?;
    let mut sockets = Vec::new();
    for _ in 0..5 {
        let mut ws = gateway.connect(&token).await?;
        ws.subscribe(class).await?;
        sockets.push(ws);
    }
    gateway.stop().await?;
    for ws in &mut sockets {
        assert_eq!(ws.next().await?, Next::Closed(Some(1001)));
    }
    Ok(())
}

use futures_util::SinkExt as _;
