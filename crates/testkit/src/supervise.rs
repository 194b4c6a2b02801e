//! Backends shared by a whole test run, started by a nextest setup script.
//!
//! nextest runs every test in its own process, so a container held in a
//! `static` would live once per test and never be dropped. Instead the
//! setup script `testkit backends` starts a detached supervisor that
//! owns one set of containers for the run, hands their addresses and
//! container ids to the tests through `$NEXTEST_ENV`, and removes the
//! containers as soon as the nextest process that ran the script has
//! exited.
//!
//! The supervisor's [`Stack`] holds testcontainers handles, which remove
//! their containers when dropped; it lives in [`serve`] until the run ends
//! and is then removed explicitly ([`Stack::shutdown`]), so nothing is
//! dropped before it is meant to be.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::docker::{Docker, process_alive};
use crate::fixture::shared_env;
use crate::stack::Stack;

/// How long the setup script waits for the supervisor's backends.
const START_TIMEOUT: Duration = Duration::from_secs(180);

/// The setup script: start the supervisor, wait until its backends are
/// ready, and write their addresses to `$NEXTEST_ENV` (or print them when
/// run by hand).
pub async fn setup() -> anyhow::Result<()> {
    let docker = Docker::connect().await?;
    let swept = docker.sweep_orphans().await?;
    if swept > 0 {
        eprintln!("removed {swept} container(s) left behind by an earlier run");
    }

    let watch_pid = std::os::unix::process::parent_id();
    let tag = format!("cellmon-backends-{}", std::process::id());
    let ready_file = std::env::temp_dir().join(format!("{tag}.env"));
    let log_file = std::env::temp_dir().join(format!("{tag}.log"));
    let log = std::fs::File::create(&log_file)?;
    let mut child = {
        use std::os::unix::process::CommandExt as _;
        Command::new(std::env::current_exe()?)
            .args(["backends", "--serve", "--watch-pid"])
            .arg(watch_pid.to_string())
            .arg("--ready-file")
            .arg(&ready_file)
            .arg("--log-file")
            .arg(&log_file)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: a Ctrl-C to the test run must not kill
            // it before it has removed the containers.
            .process_group(0)
            .spawn()
            .context("starting the backend supervisor")?
    };

    let started = Instant::now();
    let env = loop {
        if let Ok(env) = std::fs::read_to_string(&ready_file) {
            break env;
        }
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(&log_file).unwrap_or_default();
            anyhow::bail!("backend supervisor exited with {status} before it was ready:\n{log}");
        }
        if started.elapsed() > START_TIMEOUT {
            // SIGTERM lets the supervisor remove what it started.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
            anyhow::bail!(
                "backends not ready after {START_TIMEOUT:?}; see {}",
                log_file.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = std::fs::remove_file(&ready_file);
    eprintln!(
        "shared backends ready in {:.1} s (supervisor pid {}, log {})",
        started.elapsed().as_secs_f64(),
        child.id(),
        log_file.display()
    );
    match std::env::var_os("NEXTEST_ENV") {
        Some(path) => {
            let mut file = std::fs::OpenOptions::new().append(true).open(path)?;
            file.write_all(env.as_bytes())?;
        }
        None => std::io::stdout().write_all(env.as_bytes())?,
    }
    Ok(())
}

/// The supervisor: run the backends until `watch_pid` exits or a signal
/// arrives, then remove them.
pub async fn serve(
    watch_pid: u32,
    ready_file: &Path,
    log_file: Option<&Path>,
) -> anyhow::Result<()> {
    let docker = Docker::connect().await?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // A signal during start-up drops the half-started stack, which removes
    // whatever containers it had created.
    let stack = tokio::select! {
        stack = Stack::start(&docker) => stack?,
        _ = tokio::signal::ctrl_c() => return Ok(()),
        _ = terminate.recv() => return Ok(()),
    };
    let env = shared_env(&stack.running().await?);
    write_atomically(ready_file, &env)?;
    tracing::info!(watch_pid, "backends ready; waiting for the test run to end");

    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {
                if !process_alive(watch_pid) {
                    tracing::info!("test run ended");
                    break;
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        }
    }
    stack.shutdown().await?;
    tracing::info!("backends removed");
    // A clean run leaves nothing behind; a failed one keeps its log.
    if let Some(log) = log_file {
        let _ = std::fs::remove_file(log);
    }
    Ok(())
}

/// Writes `contents` so that readers see all of it or nothing.
pub fn write_atomically(path: &Path, contents: &str) -> anyhow::Result<()> {
    let mut tmp = PathBuf::from(path);
    tmp.set_extension("partial");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Waits up to `wait` for supervisors to finish removing their containers,
/// then removes whatever has no living owner. Returns what is left.
pub async fn cleanup(wait: Duration) -> anyhow::Result<usize> {
    let docker = Docker::connect().await?;
    let deadline = Instant::now() + wait;
    loop {
        docker.sweep_orphans().await?;
        let left = docker.list_harness_containers().await?.len();
        if left == 0 || Instant::now() >= deadline {
            return Ok(left);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
