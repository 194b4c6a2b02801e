//! Cell Monitor's test kit: real backends, a fault proxy, per-test
//! isolation and the ledger check. A dev-dependency only: no product crate
//! links it into a binary.
//!
//! Everything the project claims about durability is proven against real
//! Postgres, Redis and InfluxDB servers in containers (run by the
//! `testcontainers` crate), reached through a TCP proxy the kit controls,
//! so a test can take a backend down, hang it, reset its connections or
//! slow it, and can stop, kill, pause and restart its container while
//! clients keep one address; the proxy follows a container to its new host
//! port after any restart, one done by hand with `docker restart` too.
//!
//! * [`container`]: one labelled container through testcontainers: start
//!   and wait for its ready line, stop, start, pause, kill, logs, removal.
//! * [`docker`]: the engine around it: owner labels and the sweep of what
//!   a killed run left behind, the few calls testcontainers lacks.
//! * [`backend`]: the three backends: images (from `CELLMON_*_IMAGE`),
//!   command lines, readiness probes, and [`backend::Backend`], a
//!   backend behind its [`proxy::FaultProxy`].
//! * [`proxy`]: the fault-injecting TCP proxy, which can follow its
//!   backend with a [`proxy::Resolver`].
//! * [`stack`]: all three together.
//! * [`fixture`]: [`fixture::TestBackends`], one test's isolated view
//!   (own database, key prefix, proxies).
//! * [`supervise`]: the nextest setup script (`testkit backends`) that
//!   shares one set of containers across a test run and removes it
//!   afterwards, and the orphan sweep.
//! * [`pg`], [`influx`]: the little each backend needs for set-up and checks.
//! * [`verify`]: the ledger and its check (lost, duplicates, unexpected per
//!   sink; Postgres and InfluxDB agreement).
//! * [`sample`]: made-up data shaped like the real thing.
//! * [`server`]: a workspace server run in the test's process, and reading
//!   its metrics.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use cellmon_testkit::fixture::TestBackends;
//! use cellmon_testkit::proxy::Fault;
//!
//! let backends = TestBackends::shared().await?;
//! let redis = redis::Client::open(backends.redis_url())?;
//! backends.stack.redis.proxy().set_fault(Fault::Hang);
//! // ... the client now times out; clearing the fault restores service.
//! backends.stack.redis.proxy().clear();
//! # Ok(()) }
//! ```

pub mod backend;
pub mod container;
pub mod docker;
pub mod fixture;
pub mod influx;
pub mod pg;
pub mod process;
pub mod proxy;
pub mod sample;
pub mod server;
pub mod stack;
pub mod supervise;
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
