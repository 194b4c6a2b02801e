//! All three backends together: what `harness up` runs and what the test
//! fixtures are made of.

use std::net::SocketAddr;

use crate::backend::{Backend, BackendKind};
use crate::docker::Docker;
use crate::pg;

/// Postgres, Redis and InfluxDB, each behind its own fault proxy.
#[derive(Debug)]
pub struct Stack {
    pub postgres: Backend,
    pub redis: Backend,
    pub influx: Backend,
}

impl Stack {
    /// Starts the three containers at once and prepares the Postgres
    /// template. Whatever started is removed again if anything fails.
    pub async fn start(docker: &Docker) -> anyhow::Result<Self> {
        let (postgres, redis, influx) = tokio::try_join!(
            Backend::start(docker, BackendKind::Postgres),
            Backend::start(docker, BackendKind::Redis),
            Backend::start(docker, BackendKind::Influx),
        )?;
        let stack = Self {
            postgres,
            redis,
            influx,
        };
        pg::prepare_template(&stack.postgres.url(), pg::MIGRATIONS).await?;
        Ok(stack)
    }

    /// Proxies in front of backends another process runs.
    pub async fn attach(
        postgres: SocketAddr,
        redis: SocketAddr,
        influx: SocketAddr,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            postgres: Backend::attach(BackendKind::Postgres, postgres).await?,
            redis: Backend::attach(BackendKind::Redis, redis).await?,
            influx: Backend::attach(BackendKind::Influx, influx).await?,
        })
    }

    pub fn backend(&self, kind: BackendKind) -> &Backend {
        match kind {
            BackendKind::Postgres => &self.postgres,
            BackendKind::Redis => &self.redis,
            BackendKind::Influx => &self.influx,
        }
    }

    /// Removes the containers now (rather than in `Drop`), all at once,
    /// reporting errors. Their data is thrown away, so there is no graceful
    /// stop.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let removals = [self.postgres, self.redis, self.influx]
            .into_iter()
            .filter_map(Backend::into_container)
            .map(|container| container.remove());
        for result in futures_util::future::join_all(removals).await {
            result?;
        }
        Ok(())
    }
}
