//! The Docker engine, as the kit uses it around the `testcontainers` crate.
//!
//! Containers are created, waited for, started, stopped, paused and removed
//! by testcontainers ([`crate::container`]). This module holds what is
//! around that:
//!
//! * the labels every kit container carries ([`LABEL`], and its owner's
//!   process id and host), and the sweep of containers whose owner is gone
//!   ([`Docker::sweep_orphans`]), so a killed test run leaves nothing
//!   behind for long;
//! * a few engine calls testcontainers 0.28 has no API for, made with the
//!   bollard client testcontainers itself configured (same `DOCKER_HOST`,
//!   same connection): listing containers by label (the sweep), SIGKILL
//!   (its `stop` sends SIGTERM first, which lets a server shut down
//!   cleanly: not the fault a kill test means), whether an image is on this
//!   machine (testcontainers pulls a missing image, and there is no
//!   registry here), and the published port of a container this process
//!   does not own (the shared backends of a test run, reached by id).
//!
//! testcontainers' own reaper needs no switching off: the Rust crate has
//! no "ryuk" container, and its signal watchdog is a feature the kit does
//! not turn on. The owner labels and the sweep do that job.

use std::collections::HashMap;
use std::net::SocketAddr;

use testcontainers::bollard;
use testcontainers::bollard::query_parameters::{
    InspectContainerOptions, KillContainerOptions, ListContainersOptions, RemoveContainerOptions,
};
use testcontainers::core::ports::Ports;

use crate::proxy::{ResolveError, Resolver};

/// Marks every container the kit starts; its value is the backend's role.
pub const LABEL: &str = "cellmon.harness";
/// The process id of the process that owns the container.
pub const OWNER_LABEL: &str = "cellmon.owner-pid";
/// Where that process id means something: the boot and the PID namespace.
/// An engine shared between hosts or containers never sees another's
/// containers swept because a pid happens not to exist here.
pub const OWNER_HOST_LABEL: &str = "cellmon.owner-host";

/// This boot and PID namespace, as the value of [`OWNER_HOST_LABEL`].
pub fn owner_host() -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let pid_ns = std::fs::read_link("/proc/self/ns/pid")
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    format!("{}/{pid_ns}", boot.trim())
}

/// Whether a process with this id exists (Linux: its `/proc` entry).
pub fn process_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Errors talking to the Docker engine.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("cannot reach the Docker engine (is dockerd running? see deploy/ensure-docker.sh)")]
    Connect(#[source] testcontainers::core::client::ClientError),
    #[error("cannot reach the Docker engine (is dockerd running? see deploy/ensure-docker.sh)")]
    Ping(#[source] bollard::errors::Error),
    #[error(
        "image {image} is not on this machine; build local images with deploy/local-images.sh or pull it"
    )]
    MissingImage { image: String },
    #[error("Docker engine call `{call}` failed")]
    Call {
        call: &'static str,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("testcontainers could not {action} the {role} container")]
    Container {
        action: &'static str,
        role: &'static str,
        // Boxed: the error is large, and every kit call returns this type.
        #[source]
        source: Box<testcontainers::TestcontainersError>,
    },
    #[error("container {id} publishes no host port for {port}/tcp (is it running?)")]
    NoHostPort { id: String, port: u16 },
    #[error("the {role} backend belongs to another process (the test run's shared set)")]
    NotOwned { role: &'static str },
}

fn call(call: &'static str) -> impl FnOnce(bollard::errors::Error) -> DockerError {
    move |source| DockerError::Call { call, source }
}

/// The Docker engine, through the client testcontainers configured.
#[derive(Debug, Clone)]
pub struct Docker {
    client: bollard::Docker,
}

impl Docker {
    /// Connects to the engine testcontainers finds (`DOCKER_HOST`, else the
    /// local socket) and checks that it answers, so a missing engine is one
    /// clear error here instead of a confusing one at the first container.
    pub async fn connect() -> Result<Self, DockerError> {
        let client = testcontainers::core::client::docker_client_instance()
            .await
            .map_err(DockerError::Connect)?;
        client.ping().await.map_err(DockerError::Ping)?;
        Ok(Self { client })
    }

    /// Fails unless `image` is on this machine. Called before every start:
    /// testcontainers pulls an image it cannot find, and the kit must never
    /// try (machines without a registry build theirs locally).
    pub async fn require_image(&self, image: &str) -> Result<(), DockerError> {
        match self.client.inspect_image(image).await {
            Ok(_) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Err(DockerError::MissingImage {
                image: image.to_owned(),
            }),
            Err(other) => Err(call("inspect image")(other)),
        }
    }

    /// The loopback host port that container `id` publishes `port` on right
    /// now; it changes whenever the container is started again.
    pub async fn published_port(&self, id: &str, port: u16) -> Result<u16, DockerError> {
        let info = self
            .client
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .map_err(call("inspect"))?;
        let no_port = || DockerError::NoHostPort {
            id: id.to_owned(),
            port,
        };
        let map = info
            .network_settings
            .and_then(|n| n.ports)
            .ok_or_else(no_port)?;
        // testcontainers' own reading of the port map, as for the
        // containers it started.
        Ports::try_from(map)
            .ok()
            .and_then(|ports| ports.map_to_host_port_ipv4(port))
            .ok_or_else(no_port)
    }

    /// A [`Resolver`] for a proxy in front of container `id`: where `port`
    /// is published now.
    pub fn resolver(&self, id: &str, port: u16) -> Resolver {
        let docker = self.clone();
        let id = id.to_owned();
        Resolver::new(move || {
            let docker = docker.clone();
            let id = id.clone();
            async move {
                let host_port = docker
                    .published_port(&id, port)
                    .await
                    .map_err(ResolveError::new)?;
                Ok(SocketAddr::from(([127, 0, 0, 1], host_port)))
            }
        })
    }

    /// SIGKILL: the process dies without any chance to flush.
    pub async fn kill(&self, id: &str) -> Result<(), DockerError> {
        self.client
            .kill_container(id, None::<KillContainerOptions>)
            .await
            .map_err(call("kill"))
    }

    /// Removes kit containers whose owning process, on this host, is gone
    /// (a test run that was killed before it could clean up). Returns how
    /// many. A container that vanishes meanwhile is not an error.
    pub async fn sweep_orphans(&self) -> Result<usize, DockerError> {
        let list = self.list().await?;
        let here = owner_host();
        let mut removed = 0;
        for summary in list {
            let labels = summary.labels.unwrap_or_default();
            if labels.get(OWNER_HOST_LABEL) != Some(&here) {
                continue;
            }
            let owner = labels
                .get(OWNER_LABEL)
                .and_then(|pid| pid.parse::<u32>().ok());
            if owner.is_some_and(process_alive) {
                continue;
            }
            let Some(id) = summary.id else { continue };
            match self.remove(&id).await {
                Ok(()) => removed += 1,
                Err(error) => tracing::debug!(%error, container = %id, "sweep: already gone"),
            }
        }
        Ok(removed)
    }

    /// The labels of every kit container (any state, any owner).
    pub async fn list_harness_containers(
        &self,
    ) -> Result<Vec<HashMap<String, String>>, DockerError> {
        Ok(self
            .list()
            .await?
            .into_iter()
            .map(|c| c.labels.unwrap_or_default())
            .collect())
    }

    /// Every kit container, in any state.
    async fn list(&self) -> Result<Vec<bollard::models::ContainerSummary>, DockerError> {
        let filters = HashMap::from([("label".to_owned(), vec![LABEL.to_owned()])]);
        self.client
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..ListContainersOptions::default()
            }))
            .await
            .map_err(call("list"))
    }

    /// Removes a container this process holds no handle for (the sweep's
    /// orphans).
    async fn remove(&self, id: &str) -> Result<(), DockerError> {
        self.client
            .remove_container(
                id,
                Some(RemoveContainerOptions {
                    force: true,
                    v: true,
                    ..RemoveContainerOptions::default()
                }),
            )
            .await
            .map_err(call("remove"))
    }
}

/// `docker restart ID`, run the way a person would: the real CLI, not the
/// kit, so nothing in this process (no proxy, no fixture) is told.
pub async fn restart_by_hand(id: &str) -> anyhow::Result<()> {
    let output = tokio::process::Command::new("docker")
        .args(["restart", id])
        .output()
        .await?;
    anyhow::ensure!(
        output.status.success(),
        "docker restart {id}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}
