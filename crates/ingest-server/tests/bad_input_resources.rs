//! BAD-INPUT's resource criteria, on the server as its own process: every
//! hostile body gets a 4xx JSON answer quickly, and the server's resident
//! memory grows by less than 50 MB however many it gets.

use std::io::Write as _;
use std::time::{Duration, Instant};

use cellmon_domain::lms::ClassId;
use cellmon_testkit::fixture::TestBackends;

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for {pid}"))
}

fn gzip(bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(bytes)?;
    Ok(encoder.finish()?)
}

#[tokio::test]
async fn bad_input_answers_fast_and_memory_stays_bounded() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let spool = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ingest-server"))
        .env("CELLMON_INGEST_LISTEN__ADDR", format!("127.0.0.1:{port}"))
        .env("CELLMON_INGEST_REDIS__URL", backends.redis_url())
        .env("CELLMON_INGEST_REDIS__PREFIX", backends.redis_prefix())
        .env("CELLMON_INGEST_OPEN_CLASS", ClassId::random().to_string())
        .env("CELLMON_INGEST_RATE_LIMIT__PER_SECOND", "100000")
        .env("CELLMON_INGEST_RATE_LIMIT__BURST", "100000")
        .env("CELLMON_INGEST_SPOOL__DIR", spool.path())
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().expect("running");
    let url = format!("http://127.0.0.1:{port}/api/v1/events");
    let http = reqwest::Client::new();
    cellmon_testkit::eventually(Duration::from_secs(30), || async {
        anyhow::ensure!(
            http.get(format!("http://127.0.0.1:{port}/health/live"))
                .send()
                .await?
                .status()
                .is_success()
        );
        Ok(())
    })
    .await?;

    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes();
    let bomb = gzip(&vec![b'0'; 64 * 1024 * 1024])?;
    let over = vec![b' '; 2 * 1024 * 1024];
    let huge_code = format!(
        r#"[{{"eventType":"cell_executed","emailAddress":"a@b.jp","cellId":"c","code":"{}"}}]"#,
        "x".repeat(300 * 1024)
    )
    .into_bytes();
    let nan = br#"[{"eventType":"cell_executed","emailAddress":"a@b.jp","cellId":"c","executionDurationMs":1e400}]"#.to_vec();
    let cases: Vec<(&str, Vec<u8>, Option<&str>, u16)> = vec![
        ("deep", deep, None, 400),
        ("gzip bomb", bomb, Some("gzip"), 413),
        ("over limit", over, None, 413),
        (
            "invalid utf-8",
            b"[{\"userName\":\"\xff\"}]".to_vec(),
            None,
            400,
        ),
        ("huge code", huge_code, None, 422),
        ("1e400", nan, None, 422),
    ];

    // Warm up once, then measure.
    for (_, body, encoding, _) in &cases {
        let mut request = http.post(&url).body(body.clone());
        if let Some(encoding) = encoding {
            request = request.header("content-encoding", *encoding);
        }
        request.send().await?;
    }
    let before = rss_kib(pid)?;
    let mut slowest = Duration::ZERO;
    for round in 0..20 {
        for (name, body, encoding, expected) in &cases {
            let mut request = http.post(&url).body(body.clone());
            if let Some(encoding) = encoding {
                request = request.header("content-encoding", *encoding);
            }
            let started = Instant::now();
            let response = request.send().await?;
            let status = response.status().as_u16();
            let json: serde_json::Value = response.json().await?;
            let took = started.elapsed();
            slowest = slowest.max(took);
            assert_eq!(status, *expected, "{name} (round {round}): {json}");
            assert!(json["error"]["code"].is_string(), "{name}: {json}");
        }
    }
    let after = rss_kib(pid)?;
    let growth_mib = after.saturating_sub(before) as f64 / 1024.0;
    eprintln!(
        "BAD-INPUT: 120 hostile requests, slowest answer {slowest:?}, RSS {:.1} -> {:.1} MiB (+{growth_mib:.1})",
        before as f64 / 1024.0,
        after as f64 / 1024.0
    );
    assert!(growth_mib < 50.0, "RSS grew by {growth_mib:.1} MiB");
    // Generous bound for a shared CI machine; the measured figure is printed.
    assert!(
        slowest < Duration::from_secs(2),
        "slowest answer {slowest:?}"
    );
    // And the server is still serving.
    assert!(child.try_wait()?.is_none(), "the server died");
    Ok(())
}
