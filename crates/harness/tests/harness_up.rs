//! `harness up` as a person uses it: it prints working URLs, and Ctrl-C
//! (SIGINT) stops it and removes its containers.

use std::time::Duration;

use cellmon_testkit::backend::BackendKind;
use cellmon_testkit::docker::{Docker, LABEL, OWNER_LABEL};
use tokio::process::Command;

#[tokio::test]
async fn up_prints_working_urls_and_ctrl_c_removes_the_backends() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("harness-up-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let env_file = dir.join("backends.env");
    let mut child = Command::new(env!("CARGO_BIN_EXE_harness"))
        .arg("up")
        .args(["--ingest-port", "0", "--gateway-port", "0"])
        .arg("--env-file")
        .arg(&env_file)
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().expect("running child");

    let env = cellmon_testkit::eventually(Duration::from_secs(120), || async {
        Ok(std::fs::read_to_string(&env_file)?)
    })
    .await?;
    let url = |name: &str| -> anyhow::Result<String> {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("CELLMON_{name}_URL=")))
            .map(str::to_owned)
            .ok_or_else(|| anyhow::anyhow!("no {name} URL in {env}"))
    };
    // Every printed URL answers a real request.
    for kind in BackendKind::ALL {
        let url = url(&kind.name().to_uppercase())?;
        let addr = url
            .split("://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .and_then(|authority| authority.rsplit('@').next())
            .ok_or_else(|| anyhow::anyhow!("unexpected URL {url}"))?
            .parse()?;
        kind.probe(addr).await?;
    }
    // The ingest server takes an event with the printed token.
    let events = format!(
        "{}/api/v1/events?token={}",
        url("INGEST")?,
        env.lines()
            .find_map(|l| l.strip_prefix("CELLMON_INGEST_TOKEN="))
            .unwrap_or_default()
    );
    let help_id = uuid::Uuid::new_v4();
    let response = reqwest::Client::new()
        .post(&events)
        .header("content-type", "application/json")
        .body(format!(
            r#"[{{"eventId":"{help_id}","eventType":"help","emailAddress":"hanako@example.ac.jp"}}]"#
        ))
        .send()
        .await?;
    assert_eq!(response.status(), 202);
    let body: serde_json::Value = response.json().await?;
    assert_eq!(body["accepted"], 1, "{body}");

    // The staged class load against what `harness up` runs, in one
    // command with its env file: two short phases, the instructor socket,
    // the ledger check, and the three report files.
    let out = dir.join("report");
    let load = Command::new(env!("CARGO_BIN_EXE_harness"))
        .args([
            "load",
            "--students",
            "20,50",
            "--phase-secs",
            "5",
            "--no-ramp",
        ])
        .args(["--quiet", "--verify-wait", "60", "--env-file"])
        .arg(&env_file)
        .arg("--out")
        .arg(&out)
        .output()
        .await?;
    let summary = String::from_utf8_lossy(&load.stdout);
    assert!(
        load.status.success(),
        "{summary}{}",
        String::from_utf8_lossy(&load.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json"))?)?;
    check_load_report(&report)?;
    assert!(summary.contains("| 2 | 50 students |"), "{summary}");
    assert!(summary.contains("Result: **PASS**"), "{summary}");
    assert_eq!(
        std::fs::read_to_string(out.join("report.md"))?.trim(),
        summary.trim()
    );
    check_charts_in_a_browser(&out.join("report.html")).await?;

    // `harness verify` on that run's ledger (plus the help event above,
    // also sent by this client): every acknowledged event in both sinks.
    let ledger = out.join("ledger.jsonl");
    let mut lines = std::fs::read_to_string(&ledger)?;
    let sent = lines.lines().count();
    assert_eq!(
        sent as u64,
        report["ledger"]["acknowledged"].as_u64().unwrap()
    );
    lines.push_str(&format!("{{\"id\":\"{help_id}\",\"outcome\":\"ok\"}}\n"));
    std::fs::write(&ledger, lines)?;
    let mut verify = Command::new(env!("CARGO_BIN_EXE_harness"));
    verify
        .args(["verify", "--wait", "30", "--ledger"])
        .arg(&ledger);
    for line in env.lines() {
        if let Some((key, value)) = line.split_once('=') {
            verify.env(key, value);
        }
    }
    let output = verify.output().await?;
    let verdict = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{verdict}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for sink in ["postgres", "influxdb"] {
        let line = format!(
            "{sink}: stored {} lost 0 duplicates 0 unexpected 0",
            sent + 1
        );
        assert!(verdict.contains(&line), "{verdict}");
    }

    // A target the run cannot meet fails it, with the reason and exit 1.
    let missed = dir.join("missed");
    let load = Command::new(env!("CARGO_BIN_EXE_harness"))
        .args([
            "load",
            "--rate",
            "50",
            "--phase-secs",
            "2",
            "--min-eps",
            "100000",
        ])
        .args(["--no-socket", "--no-verify", "--quiet", "--url"])
        .arg(&events)
        .arg("--out")
        .arg(&missed)
        .output()
        .await?;
    assert_eq!(load.status.code(), Some(1));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(missed.join("report.json"))?)?;
    assert_eq!(report["outcome"]["passed"], false);
    assert!(
        report["outcome"]["reasons"][0]
            .as_str()
            .is_some_and(|r| r.contains("target 100000")),
        "{report}"
    );
    assert_eq!(report["phases"][0]["statuses"]["202"], 100, "{report}");

    // The gateway `harness up` runs serves dashboards: a short fan-out
    // run with the printed settings reaches every socket.
    let mut fanout = Command::new(env!("CARGO_BIN_EXE_harness"));
    fanout.args([
        "fanout",
        "--sockets",
        "5",
        "--rate",
        "200",
        "--duration",
        "1",
    ]);
    for line in env.lines() {
        if let Some((key, value)) = line.split_once('=') {
            fanout.env(key, value);
        }
    }
    let output = fanout.output().await?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(report["published"], 200, "{report}");
    assert_eq!(report["delivered"], 1000, "{report}");
    assert_eq!(report["missing"], 0, "{report}");
    assert_eq!(report["resynced_sockets"], 0, "{report}");

    let docker = Docker::connect().await?;
    assert_eq!(owned_by(&docker, pid).await?, 3);

    // Ctrl-C: a clean exit, and nothing left behind.
    let status = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .await?;
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(60), child.wait()).await??;
    assert!(exit.success(), "harness up exited with {exit}");
    assert_eq!(owned_by(&docker, pid).await?, 0);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

async fn owned_by(docker: &Docker, pid: u32) -> anyhow::Result<usize> {
    let owned = docker.list_harness_containers().await?;
    Ok(owned
        .iter()
        .filter(|labels| {
            labels.get(OWNER_LABEL) == Some(&pid.to_string()) && labels.contains_key(LABEL)
        })
        .count())
}

/// What a short, healthy staged run must show.
fn check_load_report(report: &serde_json::Value) -> anyhow::Result<()> {
    assert_eq!(report["schema"], "cellmon.load-report.v1");
    assert_eq!(report["outcome"]["passed"], true, "{report}");
    let phases = report["phases"].as_array().unwrap();
    assert_eq!(phases.len(), 2);
    let mut sent = 0;
    for (phase, students) in phases.iter().zip([20, 50]) {
        assert_eq!(phase["spec"]["students"], students);
        let events = phase["events"].as_u64().unwrap();
        // Each student opens a notebook within the first 18 s; in 5 s
        // about a quarter of them, plus their first runs.
        assert!(events >= 3, "{phase}");
        assert_eq!(phase["accepted"], events, "{phase}");
        assert_eq!(phase["statuses"]["202"], events, "{phase}");
        assert!(phase["accept_latency_ms"]["p95"].as_f64().unwrap() > 0.0);
        assert_eq!(phase["met_targets"], true);
        // The instructor's socket saw cell runs.
        assert!(phase["end_to_end_seen"].as_u64().unwrap() > 0, "{phase}");
        assert!(phase["end_to_end_ms"]["p99"].as_f64().unwrap() > 0.0);
        // The server and its backends were watched.
        assert!(
            phase["rss_mib"]["server"].as_f64().unwrap() > 1.0,
            "{phase}"
        );
        for backend in ["postgres", "redis", "influxdb"] {
            assert!(phase["rss_mib"][backend].as_f64().unwrap() > 1.0, "{phase}");
            assert!(
                phase["connections"][backend].as_u64().unwrap() > 0,
                "{phase}"
            );
        }
        sent += events;
    }
    let ledger = &report["ledger"];
    assert_eq!(ledger["acknowledged"], sent);
    for field in [
        "postgres_lost",
        "postgres_duplicates",
        "influx_lost",
        "influx_duplicates",
    ] {
        assert_eq!(ledger[field], 0, "{ledger}");
    }
    assert_eq!(ledger["postgres_stored"], sent);
    assert_eq!(ledger["influx_stored"], sent);
    let offered: u64 = report["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["offered"].as_u64().unwrap())
        .sum();
    assert_eq!(offered, sent);
    assert!(report["resources"].as_array().unwrap().len() >= 8);
    assert_eq!(report["capacity"]["students"], 50);
    Ok(())
}

/// Opens the HTML report in headless Chromium: every chart is laid out with
/// its lines (the page's own script counts them once loaded).
async fn check_charts_in_a_browser(page: &std::path::Path) -> anyhow::Result<()> {
    let browser = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| which(b))
        .ok_or_else(|| {
            anyhow::anyhow!("no Chromium on PATH (scripts/test installs Debian's `chromium`)")
        })?;
    let profile = page.with_file_name("chromium-profile");
    let output = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--virtual-time-budget=5000", "--dump-dom"])
        .arg(format!("file://{}", page.display()))
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(90), output).await??;
    let dom = String::from_utf8_lossy(&output.stdout);
    assert!(
        dom.contains(r#"data-charts="4""#) && dom.contains(r#"data-charts-rendered="4""#),
        "the browser did not lay out 4 charts: {}\n{}",
        dom.lines()
            .find(|l| l.contains("<body"))
            .unwrap_or("(no body)"),
        String::from_utf8_lossy(&output.stderr)
    );
    for chart in ["throughput", "latency", "cpu", "rss"] {
        assert!(
            dom.contains(&format!(r#"id="chart-{chart}""#)),
            "no {chart} chart"
        );
    }
    Ok(())
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}
