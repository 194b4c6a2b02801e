//! The real `ws-gateway` binary refuses a bad configuration before it
//! touches anything: exit status 64, and stderr names the key, for an
//! unknown setting, a value out of range, and a value of the wrong type.

use std::path::Path;

use cellmon_testkit::process::refused_config;

const PREFIX: &str = "CELLMON_GATEWAY_";

/// A configuration that is good but for `bad`: a secret, and a listener
/// that could not clash with anything, should it ever start.
async fn refusal(bad: (&str, &str)) -> anyhow::Result<String> {
    let vars = [
        ("CELLMON_GATEWAY_JWT_SECRET", "a-secret"),
        ("CELLMON_GATEWAY_LISTEN__ADDR", "127.0.0.1:0"),
        bad,
    ];
    Ok(refused_config(Path::new(env!("CARGO_BIN_EXE_ws-gateway")), PREFIX, &vars).await?)
}

/// Asserts that `stderr` has the refusal line of `key`.
fn names(stderr: &str, key: &str) {
    let line = format!("ws-gateway: bad configuration: {key}: ");
    assert!(
        stderr.lines().any(|l| l.starts_with(&line)),
        "expected a line starting {line:?} in:\n{stderr}"
    );
}

#[tokio::test]
async fn an_unknown_setting_is_refused_by_name() -> anyhow::Result<()> {
    let stderr = refusal(("CELLMON_GATEWAY_REDIS__TIMEOT", "1s")).await?;
    names(&stderr, "redis.timeot");
    assert!(stderr.contains("CELLMON_GATEWAY_REDIS__TIMEOT"), "{stderr}");
    names(
        &refusal(("CELLMON_GATEWAY_QUEUE_CAPACTY", "8")).await?,
        "queue_capacty",
    );
    Ok(())
}

#[tokio::test]
async fn an_out_of_range_setting_is_refused_with_its_reason() -> anyhow::Result<()> {
    let stderr = refusal(("CELLMON_GATEWAY_QUEUE_CAPACITY", "0")).await?;
    names(&stderr, "queue_capacity");
    assert!(stderr.contains("must be at least 1"), "{stderr}");
    names(
        &refusal(("CELLMON_GATEWAY_REDIS__TIMEOUT", "0s")).await?,
        "redis.timeout",
    );
    names(
        &refusal(("CELLMON_GATEWAY_IDLE_TIMEOUT", "1s")).await?,
        "idle_timeout",
    );
    Ok(())
}

#[tokio::test]
async fn a_value_of_the_wrong_type_is_refused_by_name() -> anyhow::Result<()> {
    names(
        &refusal(("CELLMON_GATEWAY_QUEUE_CAPACITY", "lots")).await?,
        "queue_capacity",
    );
    // A duration needs its unit.
    names(
        &refusal(("CELLMON_GATEWAY_POSTGRES__TIMEOUT", "5")).await?,
        "postgres.timeout",
    );
    Ok(())
}

#[tokio::test]
async fn no_secret_is_refused() -> anyhow::Result<()> {
    let stderr = refused_config(
        Path::new(env!("CARGO_BIN_EXE_ws-gateway")),
        PREFIX,
        &[("CELLMON_GATEWAY_LISTEN__ADDR", "127.0.0.1:0")],
    )
    .await?;
    names(&stderr, "jwt_secret");
    Ok(())
}

/// `/metrics` has the process metrics and the build info, on the main
/// port, or only on `listen.metrics` when that is set.
#[tokio::test]
async fn metrics_have_process_and_build_info_and_can_listen_apart() -> anyhow::Result<()> {
    let vars = [("CELLMON_GATEWAY_JWT_SECRET", "a-secret")];
    let binary = Path::new(env!("CARGO_BIN_EXE_ws-gateway"));
    cellmon_testkit::process::check_metrics_of_binary(binary, PREFIX, &vars, "gateway").await
}
