//! Running a real binary the way an operator does, to see how it exits:
//! with chosen environment variables, none of the caller's own variables
//! of the binary's prefix, and a deadline.
//!
//! It serves the start-up checks every server shares (a bad configuration
//! exits with status 64 and names the key on stderr):
//!
//! ```no_run
//! # async fn demo() -> Result<(), cellmon_testkit::process::ProcessError> {
//! use std::path::Path;
//! use cellmon_testkit::process::refused_config;
//!
//! // In an integration test: Path::new(env!("CARGO_BIN_EXE_ws-gateway")).
//! let gateway = Path::new("target/debug/ws-gateway");
//! let vars = [("CELLMON_GATEWAY_QUEUE_CAPACITY", "0")];
//! let stderr = refused_config(gateway, "CELLMON_GATEWAY_", &vars).await?;
//! assert!(stderr.contains("bad configuration: queue_capacity: "));
//! # Ok(()) }
//! ```

use std::ffi::OsStr;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::process::{Child, Command};

/// The exit status of a refused configuration (EX_USAGE), as every server
/// binary uses it.
pub const EXIT_BAD_CONFIG: i32 = 64;

/// How long a binary may take to refuse its configuration: it does so
/// before it touches any backend, but a loaded machine starts processes
/// slowly.
pub const REFUSAL_DEADLINE: Duration = Duration::from_secs(30);

/// How a process ended.
#[derive(Debug, Clone)]
pub struct Exit {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Exit {
    /// The exit code; `None` when a signal ended the process.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// Why a run did not give the exit asked for.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot start {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot wait for {program}")]
    Wait {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// Still running at the deadline (and killed): for a configuration
    /// check, the binary accepted its settings.
    #[error("{program} was still running after {after:?}; stderr so far:\n{stderr}")]
    StillRunning {
        program: String,
        after: Duration,
        stderr: String,
    },
    #[error("{program} exited with {status}, not {expected}; stderr:\n{stderr}")]
    Status {
        program: String,
        status: ExitStatus,
        expected: i32,
        stderr: String,
    },
}

/// What to run: a program, its arguments, and its environment: `vars`
/// set, and every inherited variable starting with `env_prefix` removed (a
/// developer's own settings must not decide a test).
#[derive(Debug, Clone, Copy)]
pub struct Run<'a> {
    pub program: &'a Path,
    pub args: &'a [&'a str],
    pub env_prefix: &'a str,
    pub vars: &'a [(&'a str, &'a str)],
}

/// Runs `run` without input and waits for it to exit, at most `deadline`;
/// a process still running then is killed.
pub async fn run_to_exit(run: Run<'_>, deadline: Duration) -> Result<Exit, ProcessError> {
    let Run {
        program,
        args,
        env_prefix,
        vars,
    } = run;
    let name = program.display().to_string();
    let mut command = Command::new(program);
    command.args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with(env_prefix) {
            command.env_remove(&key);
        }
    }
    command
        .envs(vars.iter().map(|(k, v)| (OsStr::new(k), OsStr::new(v))))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(|source| ProcessError::Spawn {
        program: name.clone(),
        source,
    })?;
    // Read both pipes while waiting: a child that fills one would block.
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = wait(&mut child, deadline)
        .await
        .map_err(|source| ProcessError::Wait {
            program: name.clone(),
            source,
        })?;
    // The pipes close when the process is gone.
    let stdout = stdout.await.unwrap_or_default();
    let stderr = stderr.await.unwrap_or_default();
    match status {
        Some(status) => Ok(Exit {
            status,
            stdout,
            stderr,
        }),
        None => Err(ProcessError::StillRunning {
            program: name,
            after: deadline,
            stderr,
        }),
    }
}

/// Runs `program` without arguments, with `vars` and without inherited
/// `env_prefix` variables, and expects it to refuse its configuration:
/// exit status [`EXIT_BAD_CONFIG`] within [`REFUSAL_DEADLINE`]. Returns its
/// stderr, for the caller to look for the key it broke.
pub async fn refused_config(
    program: &Path,
    env_prefix: &str,
    vars: &[(&str, &str)],
) -> Result<String, ProcessError> {
    let run = Run {
        program,
        args: &[],
        env_prefix,
        vars,
    };
    let exit = run_to_exit(run, REFUSAL_DEADLINE).await?;
    if exit.code() == Some(EXIT_BAD_CONFIG) {
        Ok(exit.stderr)
    } else {
        Err(ProcessError::Status {
            program: program.display().to_string(),
            status: exit.status,
            expected: EXIT_BAD_CONFIG,
            stderr: exit.stderr,
        })
    }
}

/// How long a started binary may take to answer `/health/live`.
pub const START_DEADLINE: Duration = Duration::from_secs(30);

/// A port on 127.0.0.1 nothing listened on a moment ago, for a binary
/// that takes its addresses from its settings.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port())
}

/// Checks a server binary's metrics the way Prometheus sees them: started
/// with `vars` (plus `<prefix>LISTEN__ADDR` on a free port), its
/// `/metrics` on the main port has the process metrics and
/// `cellmon_build_info{service="<service>",...} 1`; started again with
/// `<prefix>LISTEN__METRICS` on another port, that port serves them and the
/// main port answers `/metrics` with 404 while it stays live. Needs no
/// backend: every server starts while its backends are down.
pub async fn check_metrics_of_binary(
    program: &Path,
    env_prefix: &str,
    vars: &[(&str, &str)],
    service: &str,
) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let main = format!("127.0.0.1:{}", free_port()?);
    let listen = format!("{env_prefix}LISTEN__ADDR");
    let mut with_main = vars.to_vec();
    with_main.push((&listen, &main));
    {
        let _child = spawn(program, env_prefix, &with_main)?;
        let text = wait_for_metrics(&http, &format!("http://{main}/metrics")).await?;
        has_common_metrics(&text, service)?;
    }
    let apart = format!("127.0.0.1:{}", free_port()?);
    let metrics_var = format!("{env_prefix}LISTEN__METRICS");
    let main = format!("127.0.0.1:{}", free_port()?);
    let mut with_apart = vars.to_vec();
    with_apart.push((&listen, &main));
    with_apart.push((&metrics_var, &apart));
    let _child = spawn(program, env_prefix, &with_apart)?;
    let text = wait_for_metrics(&http, &format!("http://{apart}/metrics")).await?;
    has_common_metrics(&text, service)?;
    let live = http
        .get(format!("http://{main}/health/live"))
        .send()
        .await?
        .status();
    anyhow::ensure!(live.is_success(), "main port not live: {live}");
    let on_main = http
        .get(format!("http://{main}/metrics"))
        .send()
        .await?
        .status();
    anyhow::ensure!(
        on_main == reqwest::StatusCode::NOT_FOUND,
        "the main port still serves /metrics ({on_main})"
    );
    Ok(())
}

fn spawn(program: &Path, env_prefix: &str, vars: &[(&str, &str)]) -> anyhow::Result<Child> {
    let mut command = Command::new(program);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with(env_prefix) {
            command.env_remove(&key);
        }
    }
    Ok(command
        .envs(vars.iter().map(|(k, v)| (OsStr::new(k), OsStr::new(v))))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?)
}

async fn wait_for_metrics(http: &reqwest::Client, url: &str) -> anyhow::Result<String> {
    crate::eventually(START_DEADLINE, || async {
        let response = http.get(url).send().await?;
        anyhow::ensure!(
            response.status().is_success(),
            "{url}: {}",
            response.status()
        );
        Ok(response.text().await?)
    })
    .await
}

fn has_common_metrics(text: &str, service: &str) -> anyhow::Result<()> {
    let build_info = "cellmon_build_info{revision=".to_owned();
    let line = text
        .lines()
        .find(|line| line.starts_with(&build_info))
        .ok_or_else(|| anyhow::anyhow!("no cellmon_build_info in:\n{text}"))?;
    anyhow::ensure!(
        line.contains(&format!("service=\"{service}\""))
            && line.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION")))
            && line.ends_with("} 1"),
        "build info: {line}"
    );
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        let value = crate::server::metric(text, name)
            .ok_or_else(|| anyhow::anyhow!("no {name} in:\n{text}"))?;
        anyhow::ensure!(value >= 0.0, "{name} = {value}");
    }
    let memory = crate::server::metric(text, "process_resident_memory_bytes").unwrap_or(0.0);
    anyhow::ensure!(memory > 0.0, "resident memory {memory}");
    Ok(())
}

/// The child's status once it exits, or `None` (after killing it) at the
/// deadline.
async fn wait(child: &mut Child, deadline: Duration) -> std::io::Result<Option<ExitStatus>> {
    match tokio::time::timeout(deadline, child.wait()).await {
        Ok(status) => status.map(Some),
        Err(_) => {
            child.kill().await?;
            Ok(None)
        }
    }
}

fn drain(pipe: Option<impl AsyncRead + Unpin + Send + 'static>) -> tokio::task::JoinHandle<String> {
    tokio::spawn(async move {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes).await;
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh<'a>(script: &'a [&'a str; 2], vars: &'a [(&'a str, &'a str)]) -> Run<'a> {
        Run {
            program: Path::new("/bin/sh"),
            args: script,
            env_prefix: "CELLMON_PROCESS_TEST_",
            vars,
        }
    }

    #[tokio::test]
    async fn status_output_and_variables_are_seen() {
        let script = [
            "-c",
            "echo \"out $CELLMON_PROCESS_TEST_X\"; echo err >&2; exit 3",
        ];
        let exit = run_to_exit(
            sh(&script, &[("CELLMON_PROCESS_TEST_X", "x")]),
            Duration::from_secs(30),
        )
        .await
        .expect("ran");
        assert_eq!(exit.code(), Some(3));
        assert_eq!(exit.stdout, "out x\n");
        assert_eq!(exit.stderr, "err\n");
    }

    #[tokio::test]
    async fn a_refusal_is_exit_64_and_anything_else_is_an_error() {
        let refuse = ["-c", "echo 'sh: bad configuration: x: no' >&2; exit 64"];
        let stderr = refused_config(Path::new("/bin/sh"), "CELLMON_PROCESS_TEST_", &[]).await;
        // Without arguments sh reads its (empty) input and exits 0.
        assert!(
            matches!(stderr, Err(ProcessError::Status { expected: 64, .. })),
            "{stderr:?}"
        );
        let exit = run_to_exit(sh(&refuse, &[]), REFUSAL_DEADLINE)
            .await
            .expect("ran");
        assert_eq!(exit.code(), Some(EXIT_BAD_CONFIG));
        assert!(exit.stderr.contains("bad configuration: x: no"));
    }

    #[tokio::test]
    async fn a_process_past_its_deadline_is_killed() {
        let script = ["-c", "echo started >&2; exec sleep 60"];
        let started = std::time::Instant::now();
        let error = run_to_exit(sh(&script, &[]), Duration::from_millis(200))
            .await
            .expect_err("still running");
        assert!(
            matches!(&error, ProcessError::StillRunning { stderr, .. } if stderr == "started\n"),
            "{error}"
        );
        // Killed, not waited out: far less than the 60 s it would sleep.
        assert!(started.elapsed() < Duration::from_secs(30));
    }
}
