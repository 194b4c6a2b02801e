//! The three real backends (Postgres, Redis, InfluxDB): which image runs
//! each, how it is started, how we know it is ready (its log line, then a
//! real request), and the fault proxy every client goes through.
//!
//! The proxy of a backend whose container the kit can inspect follows it:
//! after any restart, the kit's own [`Backend::start_again`] or a
//! `docker restart` by hand, the container has a new host port, and the
//! proxy finds it at the first refused connection (see [`crate::proxy`]).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::container::{Container, ContainerSpec};
use crate::docker::{Docker, DockerError};
use crate::influx::InfluxClient;
use crate::proxy::FaultProxy;

/// How long a backend may take to accept its first real request.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// One of the backends the system stores events in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    Postgres,
    Redis,
    Influx,
}

impl BackendKind {
    pub const ALL: [Self; 3] = [Self::Postgres, Self::Redis, Self::Influx];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Redis => "redis",
            Self::Influx => "influxdb",
        }
    }

    /// The environment variable with this backend's URL, as `harness up`
    /// prints it.
    pub const fn url_var(self) -> &'static str {
        match self {
            Self::Postgres => "CELLMON_POSTGRES_URL",
            Self::Redis => "CELLMON_REDIS_URL",
            Self::Influx => "CELLMON_INFLUXDB_URL",
        }
    }

    /// The environment variable that names this backend's image.
    pub const fn image_var(self) -> &'static str {
        match self {
            Self::Postgres => "CELLMON_POSTGRES_IMAGE",
            Self::Redis => "CELLMON_REDIS_IMAGE",
            Self::Influx => "CELLMON_INFLUX_IMAGE",
        }
    }

    /// The official image used when the variable is not set.
    pub const fn default_image(self) -> &'static str {
        match self {
            Self::Postgres => "postgres:16-alpine",
            Self::Redis => "redis:7-alpine",
            Self::Influx => "influxdb:1.8",
        }
    }

    /// The port the server listens on inside its container.
    pub const fn port(self) -> u16 {
        match self {
            Self::Postgres => 5432,
            Self::Redis => 6379,
            Self::Influx => 8086,
        }
    }

    /// The image from the environment, else the official default.
    pub fn image(self) -> String {
        std::env::var(self.image_var())
            .ok()
            .filter(|v| !v.trim().is_empty())
            .unwrap_or_else(|| self.default_image().to_owned())
    }

    /// How to run this backend. The same command line works for the official
    /// images and for the local ones `deploy/local-images.sh` builds.
    pub fn spec(self) -> ContainerSpec {
        let strings = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let pairs = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<Vec<_>>()
        };
        let (cmd, env) = match self {
            // fsync=off is for test speed only: tests kill processes, not the
            // OS, and synchronous_commit stays on, so no acknowledged commit
            // is lost on SIGKILL (RELIABILITY.md).
            Self::Postgres => (
                strings(&["-c", "fsync=off", "-c", "max_connections=300"]),
                pairs(&[("POSTGRES_HOST_AUTH_METHOD", "trust")]),
            ),
            // AOF on: without it, acknowledged stream entries vanish on SIGKILL.
            Self::Redis => (
                strings(&[
                    "redis-server",
                    "--appendonly",
                    "yes",
                    "--save",
                    "",
                    "--protected-mode",
                    "no",
                ]),
                Vec::new(),
            ),
            Self::Influx => (
                Vec::new(),
                pairs(&[
                    ("INFLUXDB_REPORTING_DISABLED", "true"),
                    ("INFLUXDB_HTTP_LOG_ENABLED", "false"),
                    ("INFLUXDB_DATA_QUERY_LOG_ENABLED", "false"),
                ]),
            ),
        };
        ContainerSpec {
            image: self.image(),
            cmd,
            env,
            port: self.port(),
            ready_line: self.ready_line(),
            role: self.name(),
        }
    }

    /// What the server logs once it accepts connections, in the official
    /// images and the local ones alike. The official Postgres image prints
    /// it twice (its set-up server, then the real one): the probe that
    /// follows the line is what says the server is ready.
    const fn ready_line(self) -> &'static str {
        match self {
            Self::Postgres => "database system is ready to accept connections",
            Self::Redis => "Ready to accept connections",
            Self::Influx => "Listening on HTTP",
        }
    }

    /// The URL a client uses to reach this backend at `addr`.
    pub fn url(self, addr: SocketAddr) -> String {
        match self {
            Self::Postgres => format!("postgres://postgres@{addr}/postgres"),
            Self::Redis => format!("redis://{addr}/"),
            Self::Influx => format!("http://{addr}"),
        }
    }

    /// One real request: a query, a PING, an InfluxQL statement.
    pub async fn probe(self, addr: SocketAddr) -> anyhow::Result<()> {
        let attempt = async {
            match self {
                Self::Postgres => {
                    use sqlx::Connection;
                    let mut conn = sqlx::PgConnection::connect(&self.url(addr)).await?;
                    sqlx::query("SELECT 1").execute(&mut conn).await?;
                    conn.close().await?;
                }
                Self::Redis => {
                    let client = redis::Client::open(self.url(addr))?;
                    let mut conn = client.get_multiplexed_async_connection().await?;
                    let _: String = redis::cmd("PING").query_async(&mut conn).await?;
                }
                Self::Influx => {
                    InfluxClient::new(&self.url(addr))?.ping().await?;
                }
            }
            anyhow::Ok(())
        };
        tokio::time::timeout(Duration::from_secs(5), attempt)
            .await
            .map_err(|_| anyhow::anyhow!("{} at {addr} did not answer within 5 s", self.name()))?
    }

    /// Probes until the backend answers, or fails after `timeout`.
    pub async fn wait_ready(self, addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(50);
        loop {
            match self.probe(addr).await {
                Ok(()) => return Ok(()),
                Err(error) if Instant::now() >= deadline => {
                    return Err(error.context(format!(
                        "{} at {addr} not ready after {timeout:?}",
                        self.name()
                    )));
                }
                Err(_) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
            }
        }
    }
}

/// A backend reached through a [`FaultProxy`]. It either owns its container
/// (and can stop, kill, pause and restart it) or fronts a backend that
/// another process owns (the shared backends of a test run).
#[derive(Debug)]
pub struct Backend {
    kind: BackendKind,
    container: Option<Container>,
    proxy: FaultProxy,
}

impl Backend {
    /// Starts a container of this kind, waits until it answers, and puts a
    /// proxy in front of it that follows it to wherever it is published.
    pub async fn start(docker: &Docker, kind: BackendKind) -> anyhow::Result<Self> {
        let started = Instant::now();
        let container = Container::run(docker, &kind.spec()).await?;
        let upstream = loopback(container.host_port().await?);
        // Boxed: the three clients' futures are KiB each, and a stack
        // starts three backends side by side.
        Box::pin(kind.wait_ready(upstream, READY_TIMEOUT)).await?;
        tracing::info!(
            backend = kind.name(),
            %upstream,
            container = container.id(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "backend ready"
        );
        let proxy =
            FaultProxy::following(upstream, docker.resolver(container.id(), kind.port())).await?;
        Ok(Self {
            kind,
            container: Some(container),
            proxy,
        })
    }

    /// Puts a proxy in front of a backend that is already running.
    pub async fn attach(kind: BackendKind, upstream: SocketAddr) -> anyhow::Result<Self> {
        Ok(Self {
            kind,
            container: None,
            proxy: FaultProxy::start(upstream).await?,
        })
    }

    /// Puts a proxy in front of container `id`, which another process owns
    /// and which answers at `upstream` now; the proxy follows it if it
    /// moves. This backend cannot stop, kill or pause it.
    pub async fn attach_container(
        docker: &Docker,
        kind: BackendKind,
        upstream: SocketAddr,
        id: &str,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            kind,
            container: None,
            proxy: FaultProxy::following(upstream, docker.resolver(id, kind.port())).await?,
        })
    }

    pub fn kind(&self) -> BackendKind {
        self.kind
    }

    /// The address clients use: the proxy's.
    pub fn addr(&self) -> SocketAddr {
        self.proxy.addr()
    }

    /// The client URL, through the proxy.
    pub fn url(&self) -> String {
        self.kind.url(self.addr())
    }

    pub fn proxy(&self) -> &FaultProxy {
        &self.proxy
    }

    /// The container, when this backend owns one.
    pub fn container(&self) -> Option<&Container> {
        self.container.as_ref()
    }

    /// Gives up the proxy and hands over the container, if any.
    pub fn into_container(self) -> Option<Container> {
        self.container
    }

    fn owned(&self) -> Result<&Container, DockerError> {
        self.container.as_ref().ok_or(DockerError::NotOwned {
            role: self.kind.name(),
        })
    }

    /// Starts the stopped or killed container again, points the proxy at
    /// its new host port, and waits until it answers through the proxy.
    pub async fn start_again(&self) -> anyhow::Result<()> {
        let container = self.owned()?;
        container.start().await?;
        let upstream = loopback(container.host_port().await?);
        self.proxy.set_upstream(upstream);
        self.kind.wait_ready(self.addr(), READY_TIMEOUT).await
    }

    /// Replaces the container with a fresh one of the same kind, with none
    /// of the old one's data (a server restarted without persistence), and
    /// points the proxy at it. Clients keep their address.
    pub async fn replace_container(&mut self, docker: &Docker) -> anyhow::Result<()> {
        let fresh = Container::run(docker, &self.kind.spec()).await?;
        let upstream = loopback(fresh.host_port().await?);
        // The proxy follows the new container from now on, not the old one.
        self.proxy
            .set_resolver(Some(docker.resolver(fresh.id(), self.kind.port())));
        if let Some(old) = self.container.replace(fresh) {
            old.remove().await?;
        }
        self.proxy.set_upstream(upstream);
        self.kind.wait_ready(self.addr(), READY_TIMEOUT).await
    }

    /// Stops the container (SIGTERM, SIGKILL after `grace`).
    pub async fn stop(&self, grace: Duration) -> anyhow::Result<()> {
        Ok(self.owned()?.stop(grace).await?)
    }

    /// SIGKILLs the container.
    pub async fn kill(&self) -> anyhow::Result<()> {
        Ok(self.owned()?.kill().await?)
    }

    pub async fn pause(&self) -> anyhow::Result<()> {
        Ok(self.owned()?.pause().await?)
    }

    pub async fn unpause(&self) -> anyhow::Result<()> {
        Ok(self.owned()?.unpause().await?)
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}
