//! A server of this workspace running inside the test's process, on a
//! port of its own, stopped gracefully on [`TestServer::shutdown`] (and
//! told to stop when dropped).
//!
//! Every server crate has `serve(config, listener, shutdown)`; a test
//! builds the config and hands the call over:
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! # async fn serve(_: (), _: tokio::net::TcpListener, _: impl std::future::Future<Output = ()>) -> anyhow::Result<()> { Ok(()) }
//! use cellmon_testkit::server::TestServer;
//!
//! let server = TestServer::start("ingest", |listener, shutdown| serve((), listener, shutdown)).await?;
//! let metrics = server.metrics().await?;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// The shutdown signal a test server gets.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A running server; see the module docs.
#[derive(Debug)]
pub struct TestServer {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    name: &'static str,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    /// Binds a port, runs `serve` on it in a task, and waits until
    /// `/health/live` answers (or `serve` fails first).
    pub async fn start<F, Fut>(name: &'static str, serve: F) -> anyhow::Result<Self>
    where
        F: FnOnce(TcpListener, Shutdown) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let url = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown: Shutdown = Box::pin(async {
            let _ = stopped.await;
        });
        let done = tokio::spawn(serve(listener, shutdown));
        let mut server = Self {
            url,
            name,
            stop: Some(stop),
            done: Some(done),
        };
        let http = reqwest::Client::new();
        let live = crate::eventually(Duration::from_secs(10), || async {
            if server.done.as_ref().is_some_and(|d| d.is_finished()) {
                return Ok(false);
            }
            let status = http
                .get(format!("{}/health/live", server.url))
                .send()
                .await?
                .status();
            anyhow::ensure!(status.is_success(), "{name} live: {status}");
            Ok(true)
        })
        .await?;
        if !live {
            // It ended before it answered: say why.
            server.shutdown().await?;
            anyhow::bail!("{name} stopped during start-up");
        }
        Ok(server)
    }

    /// Stops it gracefully and waits; returns what `serve` returned.
    pub async fn shutdown(&mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.done.take() {
            Some(done) => done
                .await
                .map_err(|e| anyhow::anyhow!("{} task: {e}", self.name))?,
            None => Ok(()),
        }
    }

    /// Whether `serve` has returned (it failed, or it was shut down).
    pub fn is_finished(&self) -> bool {
        self.done.as_ref().is_none_or(|d| d.is_finished())
    }

    /// Its `/metrics` text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        Ok(reqwest::get(format!("{}/metrics", self.url))
            .await?
            .text()
            .await?)
    }

    /// One metric of its `/metrics` (see [`metric`]), 0 when absent.
    pub async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        Ok(metric(&self.metrics().await?, name).unwrap_or(0.0))
    }
}

/// The value of the line `name value` of a Prometheus text exposition,
/// exactly (labels, if any, are part of `name`, sorted by key as the
/// encoder writes them: `x_total{a="1",b="2"}`).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(' ')?;
        (key == name).then(|| value.trim().parse().ok()).flatten()
    })
}
