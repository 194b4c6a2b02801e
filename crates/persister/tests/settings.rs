//! The real `persister` binary refuses a bad configuration before it
//! touches anything: exit status 64, and stderr names the key, for an
//! unknown setting, a value out of range, a value of the wrong type, and a
//! URL that does not parse. No backend is needed: a binary that accepted
//! its settings would still be running at the deadline, and the test
//! would fail.

use std::path::Path;

use cellmon_testkit::process::refused_config;

const PREFIX: &str = "CELLMON_PERSISTER_";

/// A configuration that is good but for `bad`: a listener that could not
/// clash with anything, should it ever start.
async fn refusal(bad: (&str, &str)) -> anyhow::Result<String> {
    let vars = [("CELLMON_PERSISTER_LISTEN__ADDR", "127.0.0.1:0"), bad];
    let binary = Path::new(env!("CARGO_BIN_EXE_persister"));
    Ok(refused_config(binary, PREFIX, &vars).await?)
}

/// Asserts that `stderr` has the refusal line of `key`.
fn names(stderr: &str, key: &str) {
    let line = format!("persister: bad configuration: {key}: ");
    assert!(
        stderr.lines().any(|l| l.starts_with(&line)),
        "expected a line starting {line:?} in:\n{stderr}"
    );
}

#[tokio::test]
async fn an_unknown_setting_is_refused_by_name() -> anyhow::Result<()> {
    let stderr = refusal(("CELLMON_PERSISTER_BATCH_MAXX", "5")).await?;
    names(&stderr, "batch_maxx");
    assert!(stderr.contains("CELLMON_PERSISTER_BATCH_MAXX"), "{stderr}");
    names(
        &refusal(("CELLMON_PERSISTER_INFLUX__DATABSE", "cellmon")).await?,
        "influx.databse",
    );
    // The flat keys of old versions are unknown now, not silently ignored.
    names(
        &refusal(("CELLMON_PERSISTER_POSTGRES_URL", "postgres://db/cellmon")).await?,
        "postgres_url",
    );
    Ok(())
}

#[tokio::test]
async fn an_out_of_range_setting_is_refused_with_its_reason() -> anyhow::Result<()> {
    let stderr = refusal(("CELLMON_PERSISTER_BATCH_MAX", "0")).await?;
    names(&stderr, "batch_max");
    assert!(stderr.contains("must be at least 1"), "{stderr}");
    let stderr = refusal(("CELLMON_PERSISTER_RETRY_MAX", "10ms")).await?;
    names(&stderr, "retry_max");
    assert!(stderr.contains("retry_initial (100ms)"), "{stderr}");
    names(
        &refusal(("CELLMON_PERSISTER_POSTGRES__MAX_CONNECTIONS", "0")).await?,
        "postgres.max_connections",
    );
    names(
        &refusal(("CELLMON_PERSISTER_CLAIM_IDLE", "1ms")).await?,
        "claim_idle",
    );
    Ok(())
}

#[tokio::test]
async fn a_value_of_the_wrong_type_is_refused_by_name() -> anyhow::Result<()> {
    names(
        &refusal(("CELLMON_PERSISTER_MAX_DELIVERIES", "lots")).await?,
        "max_deliveries",
    );
    // A duration needs its unit.
    let stderr = refusal(("CELLMON_PERSISTER_CLAIM_INTERVAL", "250")).await?;
    names(&stderr, "claim_interval");
    assert!(stderr.contains("such as 500ms, 5s or 2m"), "{stderr}");
    Ok(())
}

/// A URL is checked when the persister builds its clients, before any
/// connection: that, too, is the configuration's fault, and named.
#[tokio::test]
async fn a_url_that_does_not_parse_is_refused_by_its_key() -> anyhow::Result<()> {
    let stderr = refusal(("CELLMON_PERSISTER_POSTGRES__URL", "not a url")).await?;
    assert!(
        stderr.contains("persister: bad configuration: the setting `postgres.url` cannot be used"),
        "{stderr}"
    );
    Ok(())
}

/// `/metrics` has the process metrics and the build info, on the main
/// port, or only on `listen.metrics` when that is set. The persister
/// starts with its backends down, so none is needed.
#[tokio::test]
async fn metrics_have_process_and_build_info_and_can_listen_apart() -> anyhow::Result<()> {
    let binary = Path::new(env!("CARGO_BIN_EXE_persister"));
    cellmon_testkit::process::check_metrics_of_binary(binary, PREFIX, &[], "persister").await
}
