//! The ingest server end to end: real HTTP, real Redis through the
//! harness's proxy, every acknowledged id checked against the stream.

use std::collections::HashSet;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use cellmon_bus::StreamKeys;
use cellmon_domain::lms::ClassId;
use cellmon_testkit::fixture::TestBackends;
use cellmon_testkit::proxy::Fault;
use serde_json::{Value, json};

mod common;

use common::{
    Ingest, assert_stored_exactly, cell_executed, limit, load, metric, post, stream_events, uuid,
};

/// No rate limit: for tests that send more than a classroom would.
fn unlimited(config: &mut cellmon_ingest::Config) {
    config.rate_limit = limit(100_000, 100_000);
}

#[tokio::test]
async fn real_extension_payloads_are_accepted_with_their_ids() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let ingest = Ingest::start(&backends, |_| {}).await?;
    let http = reqwest::Client::new();
    let email = "hanako.yamada@example.ac.jp";

    let mut large = cell_executed(email, 1);
    large["code"] = json!("import pandas as pd\n".repeat(5_000)); // ~100 KB
    let mut payloads = vec![json!([cell_executed(email, 2)]), json!([large])];
    // Help toggled on (heartbeats every 10 s), then off; and an open with
    // the empty team name the extension sends when none is set.
    for i in 0..3 {
        payloads.push(json!([{
            "eventId": uuid(), "eventType": "help", "emailAddress": email,
            "userName": "山田 花子", "teamName": "チームA",
            "notebookPath": "lesson1/intro.ipynb",
            "eventTime": format!("2026-04-01T10:00:{:02}.000Z", i * 10)
        }]));
    }
    payloads.push(json!([{ "eventId": uuid(), "eventType": "help_stop", "emailAddress": email, "notebookPath": "lesson1/intro.ipynb" }]));
    payloads.push(json!([{ "eventId": uuid(), "eventType": "notebook_opened", "emailAddress": email, "teamName": "", "notebookPath": "lesson2.ipynb" }]));

    let mut acknowledged = Vec::new();
    for payload in &payloads {
        let (status, body) = post(&http, &ingest.events_url(), payload).await?;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["accepted"], 1, "{body}");
        assert_eq!(body["eventIds"], json!([payload[0]["eventId"]]));
        acknowledged.push(
            payload[0]["eventId"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
    }
    let stored: HashSet<String> = ingest.stored_ids(&backends).await?.into_iter().collect();
    assert_eq!(stored, acknowledged.into_iter().collect());
    Ok(())
}

#[tokio::test]
async fn ten_thousand_events_from_a_hundred_students_are_in_the_stream_exactly()
-> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let ingest = Ingest::start(&backends, unlimited).await?;
    let http = reqwest::Client::new();

    // Batches of 1 to 200 events, sizes from a fixed pseudo-random sequence.
    let mut events: Vec<Value> = (0..10_000)
        .map(|i| cell_executed(&format!("student{:03}@example.ac.jp", i % 100), i))
        .collect();
    let mut batches = Vec::new();
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    while !events.is_empty() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let size = (1 + seed % 200) as usize;
        let rest = events.split_off(size.min(events.len()));
        batches.push(std::mem::replace(&mut events, rest));
    }

    // The ledger: every id answered 202, by four concurrent clients.
    let mut ledger = Vec::new();
    let mut pending = futures_util::stream::FuturesUnordered::new();
    let url = ingest.events_url();
    for batch in batches {
        let http = http.clone();
        let url = url.clone();
        pending.push(async move {
            let ids: Vec<String> = batch
                .iter()
                .map(|e| e["eventId"].as_str().unwrap_or_default().to_owned())
                .collect();
            let (status, body) = post(&http, &url, &Value::Array(batch)).await?;
            anyhow::ensure!(status == 202, "status {status}: {body}");
            anyhow::ensure!(body["accepted"] == ids.len(), "{body}");
            Ok::<_, anyhow::Error>(ids)
        });
        if pending.len() >= 4
            && let Some(result) = futures_util::StreamExt::next(&mut pending).await
        {
            ledger.extend(result?);
        }
    }
    while let Some(result) = futures_util::StreamExt::next(&mut pending).await {
        ledger.extend(result?);
    }
    assert_eq!(ledger.len(), 10_000);

    let stored = ingest.stored_ids(&backends).await?;
    let stored_set: HashSet<&String> = stored.iter().collect();
    let ledger_set: HashSet<&String> = ledger.iter().collect();
    assert_eq!(stored.len(), stored_set.len(), "duplicates in the stream");
    assert_eq!(stored_set, ledger_set, "lost or unexpected events");
    Ok(())
}

fn gzip(bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(bytes)?;
    Ok(encoder.finish()?)
}

async fn raw(
    http: &reqwest::Client,
    url: &str,
    body: Vec<u8>,
    encoding: Option<&str>,
) -> anyhow::Result<(u16, Value)> {
    let mut request = http
        .post(url)
        .header("content-type", "application/json")
        .body(body);
    if let Some(encoding) = encoding {
        request = request.header("content-encoding", encoding);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await?))
}

/// BAD-INPUT against the real hand-off: the refusals themselves, each
/// status and code of `docs/ingest.md`, are the in-process table of
/// `tests/requests.rs`; here the accepted items of a mixed batch, and only
/// they, reach the stream exactly once, and the server stays fine.
#[tokio::test]
async fn bad_input() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let ingest = Ingest::start(&backends, unlimited).await?;
    let http = reqwest::Client::new();
    let url = ingest.events_url();
    let no_token = format!("{}/api/v1/events", ingest.url);

    // A repeated or odd query string: the first token counts.
    let odd = format!("{no_token}?token={}&token=x&%zz", ingest.token);
    let (status, body) = post(&http, &odd, &json!([cell_executed("a@b.jp", 1)])).await?;
    assert_eq!(status, 202, "{body}");
    let mut acknowledged: Vec<String> = body["eventIds"]
        .as_array()
        .map(|ids| {
            ids.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();

    // A mixed batch: wrong types, 1e400, a huge code field and a bad e-mail
    // are reported by index; the valid items are still accepted.
    let valid = cell_executed("ok@example.ac.jp", 1);
    let mut huge = cell_executed("ok@example.ac.jp", 2);
    huge["code"] = json!("x".repeat(300 * 1024));
    let mut bad_email = cell_executed("nope", 3);
    bad_email["emailAddress"] = json!("nope");
    let body = format!(
        "[{},{{\"eventType\":\"help\",\"emailAddress\":\"a@b.jp\",\"cellIndex\":\"three\"}},{{\"eventType\":\"cell_executed\",\"emailAddress\":\"a@b.jp\",\"cellId\":\"c\",\"executionDurationMs\":1e400}},{},{},{}]",
        valid,
        huge,
        bad_email,
        cell_executed("ok2@example.ac.jp", 4)
    );
    let (status, body) = raw(&http, &url, gzip(body.as_bytes())?, Some("gzip")).await?;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"], 2, "{body}");
    acknowledged.extend(
        body["eventIds"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned)),
    );
    let rejected: Vec<u64> = body["rejected"]
        .as_array()
        .map(|r| r.iter().filter_map(|x| x["index"].as_u64()).collect())
        .unwrap_or_default();
    assert_eq!(rejected, vec![1, 2, 3, 4], "{body}");
    assert_eq!(body["rejected"][2]["field"], "code");
    assert_eq!(body["rejected"][3]["field"], "emailAddress");

    // The server is still fine, and exactly the acknowledged events were
    // stored (compared as sets, eventually: under a loaded machine a slow
    // hand-off is spooled and reaches the stream a moment later).
    let after = cell_executed("after@example.ac.jp", 5);
    let (status, _) = post(&http, &url, &json!([after])).await?;
    assert_eq!(status, 202);
    acknowledged.push(after["eventId"].as_str().unwrap_or_default().to_owned());
    let refused = [&huge, &bad_email].map(|e| e["eventId"].as_str().unwrap_or_default().to_owned());
    assert_stored_exactly(&ingest, &backends, &acknowledged, &refused).await?;
    let stored: HashSet<String> = ingest.stored_ids(&backends).await?.into_iter().collect();
    assert_eq!(stored.len(), acknowledged.len());
    Ok(())
}

#[tokio::test]
async fn rate_limit() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let ingest = Ingest::start(&backends, |c| {
        c.rate_limit = limit(2, 5);
    })
    .await?;
    let noisy = reqwest::Client::new();
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for i in 0..50 {
        let response = noisy
            .post(ingest.events_url())
            .json(&json!([cell_executed("noisy@example.ac.jp", i)]))
            .send()
            .await?;
        if response.status() == 429 {
            retry_after = response.headers().get("retry-after").cloned();
            let body: Value = response.json().await?;
            assert_eq!(body["error"]["code"], "rate_limited");
            statuses.push(429);
        } else {
            statuses.push(response.status().as_u16());
        }
    }
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert!(limited >= 40, "only {limited} of 50 limited: {statuses:?}");
    assert!(
        statuses[..5].iter().all(|s| *s == 202),
        "the burst must pass: {statuses:?}"
    );
    let retry_after: u64 = retry_after.expect("Retry-After on 429").to_str()?.parse()?;
    assert!(retry_after >= 1);

    // Another client (another source address) is unaffected.
    let other = reqwest::Client::builder()
        .local_address(IpAddr::from([127, 0, 0, 2]))
        .build()?;
    let response = other
        .post(ingest.events_url())
        .json(&json!([cell_executed("quiet@example.ac.jp", 1)]))
        .send()
        .await?;
    assert_eq!(response.status(), 202);
    Ok(())
}

#[tokio::test]
async fn redis_down_or_hung_events_are_spooled_then_replayed() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let ingest = Ingest::start(&backends, |c| c.redis.timeout = Duration::from_millis(300)).await?;
    let http = reqwest::Client::new();
    let proxy = backends.stack.redis.proxy();

    let mut ok = Vec::new();
    for fault in [Fault::Down, Fault::Hang] {
        proxy.set_fault(fault);
        for i in 0..5 {
            let event = cell_executed("a@example.ac.jp", i);
            let (status, body) = post(&http, &ingest.events_url(), &json!([event])).await?;
            assert_eq!(status, 202, "under {fault:?}: {body}");
            assert_eq!(body["spooled"], true, "{body}");
            ok.push(event["eventId"].as_str().unwrap_or_default().to_owned());
        }
        // Redis is away but the spool has room: still ready.
        let ready = http
            .get(format!("{}/health/ready", ingest.url))
            .send()
            .await?;
        assert_eq!(ready.status(), 200);
        proxy.clear();
    }
    assert_stored_exactly(&ingest, &backends, &ok, &[]).await?;
    let metrics = ingest.metrics().await?;
    assert!(
        metrics.contains("cellmon_events_spooled_total 10"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cellmon_events_replayed_total 10"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cellmon_spool_pending_events 0"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn spool_full() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let ingest = Ingest::start(&backends, |c| {
        c.redis.timeout = Duration::from_millis(200);
        // Room for about 15 of these events.
        c.spool.max_bytes = 10 * 1024;
    })
    .await?;
    backends.stack.redis.proxy().set_fault(Fault::Down);
    let (ok, refused, _) = load(ingest.events_url(), 40).await?;
    // The spool took what fitted, then the server said 503, never 202.
    assert!(
        !ok.is_empty() && !refused.is_empty(),
        "ok {} refused {}",
        ok.len(),
        refused.len()
    );
    let response = reqwest::Client::new()
        .post(ingest.events_url())
        .json(&json!([cell_executed("b@example.ac.jp", 1)]))
        .send()
        .await?;
    assert_eq!(response.status(), 503);
    assert_eq!(
        response.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    let ready = reqwest::get(format!("{}/health/ready", ingest.url)).await?;
    assert_eq!(ready.status(), 503);

    backends.stack.redis.proxy().clear();
    assert_stored_exactly(&ingest, &backends, &ok, &refused).await?;

    // Drained, the spool has room again for the next outage.
    cellmon_testkit::eventually(Duration::from_secs(10), || async {
        let text = ingest.metrics().await?;
        anyhow::ensure!(
            metric(&text, "cellmon_spool_pending_events") == Some(0.0),
            "not drained"
        );
        Ok(())
    })
    .await?;
    backends.stack.redis.proxy().set_fault(Fault::Down);
    let (again, refused_again, _) = load(ingest.events_url(), 5).await?;
    assert_eq!(
        (again.len(), refused_again.len()),
        (5, 0),
        "no room after draining"
    );
    backends.stack.redis.proxy().clear();
    assert_stored_exactly(&ingest, &backends, &again, &[]).await?;
    Ok(())
}

#[tokio::test]
async fn spool_corrupt() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let spool_dir = tempfile::tempdir()?;
    // A server spools 30 events while Redis is down, then stops.
    let mut first = Ingest::start_with_spool(&backends, spool_dir.path(), |c| {
        c.redis.timeout = Duration::from_millis(200);
        c.spool.drain_on_shutdown = Duration::ZERO;
    })
    .await?;
    backends.stack.redis.proxy().set_fault(Fault::Down);
    let (ok, _, _) = load(first.events_url(), 30).await?;
    assert_eq!(ok.len(), 30);
    first.shutdown().await?;
    backends.stack.redis.proxy().clear();

    // Flip a byte inside the 10th record and tear the last one.
    let segment = std::fs::read_dir(spool_dir.path())?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            std::fs::metadata(p).map(|m| m.len() > 0).unwrap_or(false)
                && p.extension().is_some_and(|x| x == "log")
        })
        .expect("a spool segment");
    let mut bytes = std::fs::read(&segment)?;
    let frame = bytes.len() / 30;
    bytes[9 * frame + frame / 2] ^= 0x5a;
    bytes.truncate(bytes.len() - frame / 3);
    std::fs::write(&segment, &bytes)?;

    // A new server starts fine, delivers every valid record, counts the damage.
    let second = Ingest::start_with_spool(&backends, spool_dir.path(), |_| {}).await?;
    let stored = cellmon_testkit::eventually(Duration::from_secs(15), || async {
        let stored: HashSet<String> = second.stored_ids(&backends).await?.into_iter().collect();
        anyhow::ensure!(stored.len() >= 28, "{} stored so far", stored.len());
        Ok(stored)
    })
    .await?;
    // Records are near-equal in size, so the flipped byte hit record 9 or
    // its neighbour, and the tear hit the last one: 28 survive, all valid.
    assert_eq!(stored.len(), 28, "{stored:?}");
    assert!(stored.iter().all(|id| ok.contains(id)));
    let metrics = second.metrics().await?;
    assert!(
        metrics.contains("cellmon_spool_corrupt_regions 1"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn ingest_kill() -> anyhow::Result<()> {
    // The server as a child process: events spooled while Redis hangs, the
    // server SIGKILLed, restarted on the same spool; every 202 reaches Redis.
    let backends = TestBackends::shared().await?;
    let spool_dir = tempfile::tempdir()?;
    let class = ClassId::random();
    let spawn = |port: u16| -> anyhow::Result<tokio::process::Child> {
        Ok(
            tokio::process::Command::new(env!("CARGO_BIN_EXE_ingest-server"))
                .env("CELLMON_INGEST_LISTEN__ADDR", format!("127.0.0.1:{port}"))
                .env("CELLMON_INGEST_REDIS__URL", backends.redis_url())
                .env("CELLMON_INGEST_REDIS__PREFIX", backends.redis_prefix())
                .env("CELLMON_INGEST_OPEN_CLASS", class.to_string())
                .env("CELLMON_INGEST_REDIS__TIMEOUT", "200ms")
                .env("CELLMON_INGEST_SPOOL__DIR", spool_dir.path())
                .env("RUST_LOG", "warn")
                .kill_on_drop(true)
                .spawn()?,
        )
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let wait_live = || async {
        cellmon_testkit::eventually(Duration::from_secs(30), || async {
            let status = reqwest::get(format!("{url}/health/live")).await?.status();
            anyhow::ensure!(status.is_success());
            Ok(())
        })
        .await
    };

    let mut child = spawn(port)?;
    wait_live().await?;
    // Down, not Hang: nothing held in a buffer can reach Redis later, so
    // only the spool's replay can deliver these.
    backends.stack.redis.proxy().set_fault(Fault::Down);
    let (ok, refused, _) = load(format!("{url}/api/v1/events"), 20).await?;
    assert_eq!(ok.len(), 20, "refused: {refused:?}");
    child.start_kill()?;
    child.wait().await?;

    backends.stack.redis.proxy().clear();
    let _child = spawn(port)?;
    wait_live().await?;
    let keys = StreamKeys::new(
        backends.redis_prefix(),
        cellmon_ingest::Config::default().stream_shards,
    );
    let started = std::time::Instant::now();
    cellmon_testkit::eventually(Duration::from_secs(10), || async {
        let stored: HashSet<String> = stream_events(&backends.redis_url(), &keys)
            .await?
            .into_iter()
            .map(|e| e.event.id.to_string())
            .collect();
        let lost = ok.iter().filter(|id| !stored.contains(*id)).count();
        anyhow::ensure!(lost == 0, "{lost} acknowledged events not replayed yet");
        Ok(())
    })
    .await?;
    eprintln!(
        "spool replayed {} s after restart",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[tokio::test]
async fn open_mode_bearer_tokens_cors_and_metrics() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let open_class = ClassId::random();
    let ingest = Ingest::start(&backends, |c| c.open_class = Some(open_class)).await?;
    let http = reqwest::Client::new();
    let email = "open@example.ac.jp";

    // Tokenless events go to the open class; a bearer token to its class.
    let (status, _) = post(
        &http,
        &format!("{}/api/v1/events", ingest.url),
        &cell_executed(email, 1),
    )
    .await?;
    assert_eq!(status, 202);
    let response = http
        .post(format!("{}/api/v1/events", ingest.url))
        .bearer_auth(&ingest.token)
        .json(&json!([cell_executed(email, 2)]))
        .send()
        .await?;
    assert_eq!(response.status(), 202);
    let classes: HashSet<ClassId> = stream_events(&backends.redis_url(), &ingest.keys)
        .await?
        .into_iter()
        .map(|e| e.class_id)
        .collect();
    assert_eq!(classes, HashSet::from([open_class, ingest.class_id]));

    // The browser's preflight from a Jupyter origin.
    let preflight = http
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/api/v1/events", ingest.url),
        )
        .header("origin", "https://jupyter.example.ac.jp")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .send()
        .await?;
    assert!(preflight.status().is_success());
    assert_eq!(
        preflight
            .headers()
            .get("access-control-allow-origin")
            .map(|v| v.as_bytes()),
        Some(&b"*"[..])
    );

    let metrics = http
        .get(format!("{}/metrics", ingest.url))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains("cellmon_events_accepted_total 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"cellmon_ingest_requests_total{route="/api/v1/events",status="202"} 2"#),
        "{metrics}"
    );
    assert!(metrics.contains("cellmon_ingest_accept_duration_seconds_bucket"));
    let _: SocketAddr = ingest.url.trim_start_matches("http://").parse()?;
    Ok(())
}

/// One server per spool directory: while one has it open, the binary
/// started on the same directory exits with status 64 and names it; once
/// the first stops, the directory is free again.
#[tokio::test]
async fn a_second_server_on_a_locked_spool_exits_64() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let spool_dir = tempfile::tempdir()?;
    let mut first = Ingest::start_with_spool(&backends, spool_dir.path(), |_| {}).await?;
    let (redis_url, dir) = (backends.redis_url(), spool_dir.path().display().to_string());
    let stderr = cellmon_testkit::process::refused_config(
        std::path::Path::new(env!("CARGO_BIN_EXE_ingest-server")),
        "CELLMON_INGEST_",
        &[
            ("CELLMON_INGEST_LISTEN__ADDR", "127.0.0.1:0"),
            ("CELLMON_INGEST_REDIS__URL", &redis_url),
            ("CELLMON_INGEST_REDIS__PREFIX", backends.redis_prefix()),
            ("CELLMON_INGEST_SPOOL__DIR", &dir),
            ("RUST_LOG", "error"),
        ],
    )
    .await?;
    assert!(
        stderr.contains("ingest-server: bad configuration: the setting `spool.dir` cannot be used")
            && stderr.contains(&dir)
            && stderr.contains("in use"),
        "{stderr}"
    );
    // The first one is unaffected.
    let (status, body) = post(
        &reqwest::Client::new(),
        &first.events_url(),
        &json!([cell_executed("a@example.ac.jp", 1)]),
    )
    .await?;
    assert_eq!(status, 202, "{body}");

    // Stopped, it leaves the directory to the next server.
    first.shutdown().await?;
    let second = Ingest::start_with_spool(&backends, spool_dir.path(), |_| {}).await?;
    let ready = reqwest::get(format!("{}/health/ready", second.url)).await?;
    assert_eq!(ready.status(), 200);
    Ok(())
}
