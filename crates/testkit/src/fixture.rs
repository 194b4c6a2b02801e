//! Backends for one test, isolated from every other test.
//!
//! A test run shares one set of backend containers: the nextest setup
//! script (`testkit backends`) starts them once and passes their
//! addresses in `CELLMON_TEST_*_ADDR`. Each test then gets
//!
//! * its own fault proxies in front of them, so network faults it injects
//!   touch only its own connections;
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
use crate::stack::Stack;

/// Environment variables the setup script hands to tests.
pub const SHARED_ADDR_VARS: [(BackendKind, &str); 3] = [
    (BackendKind::Postgres, "CELLMON_TEST_POSTGRES_ADDR"),
    (BackendKind::Redis, "CELLMON_TEST_REDIS_ADDR"),
    (BackendKind::Influx, "CELLMON_TEST_INFLUX_ADDR"),
];

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
        match shared_addrs()? {
            Some([postgres, redis, influx]) => {
                let stack = Stack::attach(postgres, redis, influx).await?;
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

fn shared_addrs() -> anyhow::Result<Option<[SocketAddr; 3]>> {
    let mut addrs = Vec::with_capacity(3);
    for (_, var) in SHARED_ADDR_VARS {
        match std::env::var(var) {
            Ok(value) => addrs.push(
                value
                    .parse()
                    .with_context(|| format!("{var}={value} is not a socket address"))?,
            ),
            Err(_) => return Ok(None),
        }
    }
    Ok(addrs.try_into().ok())
}
