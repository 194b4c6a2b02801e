//! Backends for one test, isolated from every other test.
//!
//! A test run shares one set of backend containers: the nextest setup
//! script (`testkit backends`) starts them once and passes their
//! addresses in `CELLMON_TEST_*_ADDR` and their container ids in
//! `CELLMON_TEST_*_CONTAINER`. Each test then gets
//!
//! * its own fault proxies in front of them, so network faults it injects
//!   touch only its own connections; the proxies follow the containers by
//!   id if they move (a `docker restart` by hand);
//! * its own Postgres database cloned from the migrated template;
//! * its own Redis key prefix;
//! * its own InfluxDB database.
//!
//! Tests that stop, kill or pause a backend must not touch the shared
//! containers: they call [`TestBackends::private`] and get containers of
//! their own, removed when the fixture drops. Without the setup script
//! (plain `cargo test`), [`TestBackends::shared`] falls back to private
//! containers too, so every test still runs, only slower.

use std::net::SocketAddr;

use anyhow::Context as _;

use crate::backend::{Backend, BackendKind};
use crate::docker::Docker;
use crate::influx::InfluxClient;
use crate::pg;
use crate::stack::{Running, Stack};

/// Environment variables the setup script hands to tests: each shared
/// backend's address.
pub const SHARED_ADDR_VARS: [(BackendKind, &str); 3] = [
    (BackendKind::Postgres, "CELLMON_TEST_POSTGRES_ADDR"),
    (BackendKind::Redis, "CELLMON_TEST_REDIS_ADDR"),
    (BackendKind::Influx, "CELLMON_TEST_INFLUX_ADDR"),
];

/// ... and its container's id, for proxies that follow it.
pub const SHARED_CONTAINER_VARS: [(BackendKind, &str); 3] = [
    (BackendKind::Postgres, "CELLMON_TEST_POSTGRES_CONTAINER"),
    (BackendKind::Redis, "CELLMON_TEST_REDIS_CONTAINER"),
    (BackendKind::Influx, "CELLMON_TEST_INFLUX_CONTAINER"),
];

/// The `KEY=VALUE` lines that hand `running` backends to tests.
pub fn shared_env(running: &[Running; 3]) -> String {
    let mut env = String::new();
    for (i, backend) in running.iter().enumerate() {
        env.push_str(&format!("{}={}\n", SHARED_ADDR_VARS[i].1, backend.addr));
        if let Some(id) = &backend.container {
            env.push_str(&format!("{}={id}\n", SHARED_CONTAINER_VARS[i].1));
        }
    }
    env
}

/// One test's isolated view of the three backends.
#[derive(Debug)]
pub struct TestBackends {
    pub stack: Stack,
    pg_database: String,
    redis_prefix: String,
    influx_database: String,
    shared: bool,
}

impl TestBackends {
    /// The run's shared backends when the setup script started them,
    /// otherwise private ones.
    pub async fn shared() -> anyhow::Result<Self> {
        crate::init_test_tracing();
        match shared_backends()? {
            Some(running) => {
                // Following the shared containers needs the engine; a test
                // that cannot reach it still works, its proxies just stay put
                // (nothing restarts the shared set during a run).
                let docker = if running.iter().any(|r| r.container.is_some()) {
                    Docker::connect()
                        .await
                        .inspect_err(|error| {
                            tracing::warn!(%error, "shared backends: proxies will not follow")
                        })
                        .ok()
                } else {
                    None
                };
                let stack = Stack::attach(docker.as_ref(), running).await?;
                Self::isolate(stack, true).await
            }
            None => Self::private().await,
        }
    }

    /// Containers of this test's own, for tests that stop, kill or pause
    /// a backend.
    pub async fn private() -> anyhow::Result<Self> {
        crate::init_test_tracing();
        let docker = Docker::connect().await?;
        let stack = Stack::start(&docker).await?;
        Self::isolate(stack, false).await
    }

    async fn isolate(stack: Stack, shared: bool) -> anyhow::Result<Self> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let pg_database = pg::create_test_database(&stack.postgres.url())
            .await
            .context("cloning the Postgres template")?;
        let influx_database = format!("test_{id}");
        InfluxClient::new(&stack.influx.url())?
            .create_database(&influx_database)
            .await
            .context("creating the InfluxDB database")?;
        Ok(Self {
            stack,
            pg_database,
            redis_prefix: format!("test:{id}:"),
            influx_database,
            shared,
        })
    }

    /// Whether these are the run's shared containers (no container faults).
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    pub fn backend(&self, kind: BackendKind) -> &Backend {
        self.stack.backend(kind)
    }

    /// This test's database, through its proxy.
    pub fn pg_url(&self) -> String {
        pg::with_database(&self.stack.postgres.url(), &self.pg_database)
    }

    pub fn pg_database(&self) -> &str {
        &self.pg_database
    }

    pub fn redis_url(&self) -> String {
        self.stack.redis.url()
    }

    /// Every Redis key this test uses starts with this.
    pub fn redis_prefix(&self) -> &str {
        &self.redis_prefix
    }

    /// `key` under this test's prefix.
    pub fn redis_key(&self, key: &str) -> String {
        format!("{}{key}", self.redis_prefix)
    }

    pub fn influx_url(&self) -> String {
        self.stack.influx.url()
    }

    pub fn influx_database(&self) -> &str {
        &self.influx_database
    }
}

/// The shared backends the setup script handed over, if it ran.
fn shared_backends() -> anyhow::Result<Option<[Running; 3]>> {
    let mut running = Vec::with_capacity(3);
    for ((_, addr_var), (_, container_var)) in
        SHARED_ADDR_VARS.into_iter().zip(SHARED_CONTAINER_VARS)
    {
        let Ok(value) = std::env::var(addr_var) else {
            return Ok(None);
        };
        let addr: SocketAddr = value
            .parse()
            .with_context(|| format!("{addr_var}={value} is not a socket address"))?;
        let container = std::env::var(container_var)
            .ok()
            .filter(|id| !id.trim().is_empty());
        running.push(Running { addr, container });
    }
    Ok(running.try_into().ok())
}
