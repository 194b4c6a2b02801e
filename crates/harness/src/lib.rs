//! Cell Monitor's test harness: real backends, a fault proxy, and the
//! commands that run them.
//!
//! Everything the project claims about durability is proven against real
//! Postgres, Redis and InfluxDB servers in containers, reached through a
//! TCP proxy the harness controls, so a test can take a backend down, hang
//! it, reset its connections or slow it, and can stop, kill, pause and
//! restart its container while clients keep one address.
//!
//! * [`docker`]: start, stop, kill, pause and remove labelled containers;
//!   sweep what a killed run left behind.
//! * [`backend`]: the three backends: images (from `CELLMON_*_IMAGE`),
//!   command lines, readiness probes, and [`backend::Backend`], a
//!   backend behind its [`proxy::FaultProxy`].
//! * [`proxy`]: the fault-injecting TCP proxy.
//! * [`stack`]: all three together.
//! * [`fixture`]: [`fixture::TestBackends`], one test's isolated view
//!   (own database, key prefix, proxies).
//! * [`supervise`]: the nextest setup script that shares one set of
//!   containers across a test run and removes it afterwards.
//! * [`pg`], [`influx`]: the little each backend needs for set-up and checks.
//! * [`load`]: an open-loop load generator for the ingest API.
//! * [`verify`]: the ledger check (lost, duplicates, unexpected per sink;
//!   Postgres and InfluxDB agreement).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use cellmon_harness::fixture::TestBackends;
//! use cellmon_harness::proxy::Fault;
//!
//! let backends = TestBackends::shared().await?;
//! let redis = redis::Client::open(backends.redis_url())?;
//! backends.stack.redis.proxy().set_fault(Fault::Hang);
//! // ... the client now times out; clearing the fault restores service.
//! backends.stack.redis.proxy().clear();
//! # Ok(()) }
//! ```

pub mod backend;
pub mod chaos;
pub mod docker;
pub mod fanout;
pub mod fixture;
pub mod influx;
pub mod load;
pub mod pg;
pub mod proxy;
pub mod report;
pub mod stack;
pub mod supervise;
pub mod system;
pub mod verify;

use std::future::Future;
use std::sync::Once;
use std::time::{Duration, Instant};

/// Turns on log output in tests when `TEST_LOG` is set (its value is the
/// filter, e.g. `TEST_LOG=debug`). Safe to call from every test.
pub fn init_test_tracing() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        if let Ok(filter) = std::env::var("TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
    });
}

/// Polls `check` until it succeeds or `timeout` passes; then returns its
/// last error. The bounded alternative to sleeping in tests.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(value) => return Ok(value),
            Err(error) if Instant::now() >= deadline => {
                return Err(error.context(format!("still failing after {timeout:?}")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
