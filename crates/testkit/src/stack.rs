//! All three backends together: what `harness up` runs and what the test
//! fixtures are made of.

use std::net::SocketAddr;

use crate::backend::{Backend, BackendKind};
use crate::docker::Docker;
use crate::pg;

/// A backend that another process runs: where it answers now, and its
/// container's id when known (then the proxy follows it if it moves).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    pub addr: SocketAddr,
    pub container: Option<String>,
}

impl Running {
    async fn attach(self, docker: Option<&Docker>, kind: BackendKind) -> anyhow::Result<Backend> {
        match (docker, self.container) {
            (Some(docker), Some(id)) => {
                Backend::attach_container(docker, kind, self.addr, &id).await
            }
            _ => Backend::attach(kind, self.addr).await,
        }
    }
}

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

    /// Proxies in front of backends another process runs, following the
    /// containers whose ids are known (with `docker` to ask where they are).
    pub async fn attach(
        docker: Option<&Docker>,
        [postgres, redis, influx]: [Running; 3],
    ) -> anyhow::Result<Self> {
        Ok(Self {
            postgres: postgres.attach(docker, BackendKind::Postgres).await?,
            redis: redis.attach(docker, BackendKind::Redis).await?,
            influx: influx.attach(docker, BackendKind::Influx).await?,
        })
    }

    /// What another process needs to attach to these backends: each
    /// container's address and id (not the proxies', which are this
    /// process's own).
    pub async fn running(&self) -> anyhow::Result<[Running; 3]> {
        let mut running = Vec::with_capacity(3);
        for kind in BackendKind::ALL {
            let backend = self.backend(kind);
            let container = backend.container();
            let addr = match container {
                Some(container) => SocketAddr::from(([127, 0, 0, 1], container.host_port().await?)),
                None => backend.proxy().upstream(),
            };
            running.push(Running {
                addr,
                container: container.map(|c| c.id().to_owned()),
            });
        }
        running
            .try_into()
            .map_err(|_| anyhow::anyhow!("a stack has three backends"))
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
