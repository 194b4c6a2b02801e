//! The real `ingest-server` binary refuses a bad configuration before it
//! touches anything: exit status 64, and stderr names the key, for an
//! unknown setting, a value out of range, and a value of the wrong type.
//! No backend is needed: a binary that accepted its settings would still
//! be running at the deadline, and the test would fail.

use std::path::Path;

use cellmon_testkit::process::refused_config;

const PREFIX: &str = "CELLMON_INGEST_";

/// A configuration that is good but for `bad`: a listener that could not
/// clash with anything and a spool of its own, should it ever start.
async fn refusal(bad: (&str, &str)) -> anyhow::Result<String> {
    let spool = tempfile::tempdir()?;
    let spool_dir = spool.path().display().to_string();
    let vars = [
        ("CELLMON_INGEST_LISTEN__ADDR", "127.0.0.1:0"),
        ("CELLMON_INGEST_SPOOL__DIR", spool_dir.as_str()),
        bad,
    ];
    let binary = Path::new(env!("CARGO_BIN_EXE_ingest-server"));
    Ok(refused_config(binary, PREFIX, &vars).await?)
}

/// Asserts that `stderr` has the refusal line of `key`.
fn names(stderr: &str, key: &str) {
    let line = format!("ingest-server: bad configuration: {key}: ");
    assert!(
        stderr.lines().any(|l| l.starts_with(&line)),
        "expected a line starting {line:?} in:\n{stderr}"
    );
}

#[tokio::test]
async fn an_unknown_setting_is_refused_by_name() -> anyhow::Result<()> {
    let stderr = refusal(("CELLMON_INGEST_REDIS__TIMEOT", "1s")).await?;
    names(&stderr, "redis.timeot");
    assert!(stderr.contains("CELLMON_INGEST_REDIS__TIMEOT"), "{stderr}");
    // The flat keys of old versions are unknown now, not silently ignored.
    names(
        &refusal(("CELLMON_INGEST_REDIS_TIMEOUT_MS", "500")).await?,
        "redis_timeout_ms",
    );
    Ok(())
}

#[tokio::test]
async fn an_out_of_range_setting_is_refused_with_its_reason() -> anyhow::Result<()> {
    let stderr = refusal(("CELLMON_INGEST_MAX_IN_FLIGHT", "0")).await?;
    names(&stderr, "max_in_flight");
    assert!(stderr.contains("must be at least 1"), "{stderr}");
    let stderr = refusal(("CELLMON_INGEST_STREAM_SHARDS", "0")).await?;
    names(&stderr, "stream_shards");
    assert!(stderr.contains("must be at least 1"), "{stderr}");
    names(
        &refusal(("CELLMON_INGEST_REDIS__TIMEOUT", "0s")).await?,
        "redis.timeout",
    );
    names(
        &refusal(("CELLMON_INGEST_RATE_LIMIT__PER_SECOND", "0")).await?,
        "rate_limit.per_second",
    );
    Ok(())
}

#[tokio::test]
async fn a_value_of_the_wrong_type_is_refused_by_name() -> anyhow::Result<()> {
    names(
        &refusal(("CELLMON_INGEST_MAX_IN_FLIGHT", "lots")).await?,
        "max_in_flight",
    );
    // A duration needs its unit.
    let stderr = refusal(("CELLMON_INGEST_BODY_TIMEOUT", "30")).await?;
    names(&stderr, "body_timeout");
    assert!(stderr.contains("such as 500ms, 5s or 2m"), "{stderr}");
    Ok(())
}

/// `/metrics` has the process metrics and the build info, on the main
/// port, or only on `listen.metrics` when that is set.
#[tokio::test]
async fn metrics_have_process_and_build_info_and_can_listen_apart() -> anyhow::Result<()> {
    let spool = tempfile::tempdir()?;
    let spool_dir = spool.path().display().to_string();
    let vars = [("CELLMON_INGEST_SPOOL__DIR", spool_dir.as_str())];
    let binary = Path::new(env!("CARGO_BIN_EXE_ingest-server"));
    cellmon_testkit::process::check_metrics_of_binary(binary, PREFIX, &vars, "ingest").await
}
