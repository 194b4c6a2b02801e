//! `harness up` as a person uses it: it prints working URLs, and Ctrl-C
//! (SIGINT) stops it and removes its containers.

use std::time::Duration;

use cellmon_harness::backend::BackendKind;
use cellmon_harness::docker::{Docker, LABEL, OWNER_LABEL};
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

    let env = cellmon_harness::eventually(Duration::from_secs(120), || async {
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

    // A short load with a ledger, then `harness verify`: the persister that
    // `harness up` runs has every acknowledged event in both sinks.
    let ledger = dir.join("ledger.jsonl");
    let load = Command::new(env!("CARGO_BIN_EXE_harness"))
        .args([
            "load",
            "--rate",
            "200",
            "--duration",
            "2",
            "--batch",
            "2",
            "--url",
        ])
        .arg(&events)
        .arg("--ledger")
        .arg(&ledger)
        .stdout(std::process::Stdio::null())
        .status()
        .await?;
    assert!(load.success());
    // The help event above is part of what this client sent.
    let mut lines = std::fs::read_to_string(&ledger)?;
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
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        report.contains("postgres: stored 401 lost 0 duplicates 0 unexpected 0"),
        "{report}"
    );
    assert!(
        report.contains("influxdb: stored 401 lost 0 duplicates 0 unexpected 0"),
        "{report}"
    );

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
