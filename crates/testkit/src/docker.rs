//! A small Docker client for the harness's backend containers.
//!
//! It talks to the engine with bollard, with the API version negotiated
//! down to what the engine speaks. (testcontainers 0.28 pins API 1.53
//! through bollard 0.21 without negotiating, which engines older than
//! Docker 29, such as Debian's 20.10, refuse with "client version 1.53 is
//! too new".)
//!
//! Every container carries the label [`LABEL`] and the process id of its
//! owner, so [`Docker::sweep_orphans`] can remove what a killed test run
//! left behind, and a dropped [`Container`] removes itself.

use std::collections::HashMap;
use std::time::Duration;

use bollard::models::{ContainerCreateBody, HostConfig, PortBinding};
use bollard::query_parameters::{
    CreateContainerOptions, InspectContainerOptions, KillContainerOptions, ListContainersOptions,
    RemoveContainerOptions, StopContainerOptions,
};

/// Marks every container the harness starts.
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

/// Errors talking to the Docker engine.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error(
        "cannot reach the Docker engine (is dockerd running? see deploy/ensure-docker.sh): {0}"
    )]
    Connect(#[source] bollard::errors::Error),
    #[error(
        "image {image} is not on this machine; build local images with deploy/local-images.sh or pull it"
    )]
    MissingImage { image: String },
    #[error("Docker engine call `{call}` failed: {source}")]
    Call {
        call: &'static str,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("container {id} publishes no host port for {port}/tcp")]
    NoHostPort { id: String, port: u16 },
}

fn call(call: &'static str) -> impl FnOnce(bollard::errors::Error) -> DockerError {
    move |source| DockerError::Call { call, source }
}

/// A connection to the Docker engine.
#[derive(Debug, Clone)]
pub struct Docker {
    client: bollard::Docker,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    pub image: String,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    /// The one TCP port the service listens on inside the container.
    pub port: u16,
    /// A role name for logs and labels (`postgres`, `redis`, `influxdb`).
    pub role: &'static str,
}

impl Docker {
    /// Connects to the engine named by `DOCKER_HOST` (default: the local
    /// socket) and negotiates the API version.
    pub async fn connect() -> Result<Self, DockerError> {
        let client = bollard::Docker::connect_with_defaults()
            .map_err(DockerError::Connect)?
            .negotiate_version()
            .await
            .map_err(DockerError::Connect)?;
        Ok(Self { client })
    }

    /// Creates and starts a container whose port is published on an
    /// ephemeral loopback port of the host.
    pub async fn run(&self, spec: &ContainerSpec) -> Result<Container, DockerError> {
        let port_key = format!("{}/tcp", spec.port);
        let labels = HashMap::from([
            (LABEL.to_owned(), spec.role.to_owned()),
            (OWNER_LABEL.to_owned(), std::process::id().to_string()),
            (OWNER_HOST_LABEL.to_owned(), owner_host()),
        ]);
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            cmd: (!spec.cmd.is_empty()).then(|| spec.cmd.clone()),
            env: Some(spec.env.clone()),
            labels: Some(labels),
            exposed_ports: Some(vec![port_key.clone()]),
            host_config: Some(HostConfig {
                port_bindings: Some(HashMap::from([(
                    port_key,
                    Some(vec![PortBinding {
                        host_ip: Some("127.0.0.1".to_owned()),
                        host_port: Some(String::new()),
                    }]),
                )])),
                ..HostConfig::default()
            }),
            ..ContainerCreateBody::default()
        };
        let created = self
            .client
            .create_container(None::<CreateContainerOptions>, body)
            .await
            .map_err(|e| match e {
                bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                } => DockerError::MissingImage {
                    image: spec.image.clone(),
                },
                other => call("create")(other),
            })?;
        let container = Container {
            docker: self.clone(),
            id: created.id,
            port: spec.port,
            role: spec.role,
            removed: false,
        };
        container.start().await?;
        Ok(container)
    }

    /// Removes harness containers whose owning process, on this host, is
    /// gone (a test run that was killed before it could clean up). Returns
    /// how many. A container that vanishes meanwhile is not an error.
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

    /// The labels of every harness container (any state, any owner).
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

    /// Every harness container, in any state.
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

/// Whether a process with this id exists (Linux: its `/proc` entry).
pub fn process_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// A running (or stopped, or paused) container, removed when dropped.
#[derive(Debug)]
pub struct Container {
    docker: Docker,
    id: String,
    port: u16,
    role: &'static str,
    removed: bool,
}

impl Container {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn role(&self) -> &'static str {
        self.role
    }

    /// The loopback host port the service is published on right now. It
    /// changes when the container is stopped and started again.
    pub async fn host_port(&self) -> Result<u16, DockerError> {
        let info = self
            .docker
            .client
            .inspect_container(&self.id, None::<InspectContainerOptions>)
            .await
            .map_err(call("inspect"))?;
        let key = format!("{}/tcp", self.port);
        info.network_settings
            .and_then(|n| n.ports)
            .and_then(|mut ports| ports.remove(&key))
            .flatten()
            .into_iter()
            .flatten()
            .find_map(|b| b.host_port.and_then(|p| p.parse().ok()))
            .ok_or_else(|| DockerError::NoHostPort {
                id: self.id.clone(),
                port: self.port,
            })
    }

    pub async fn start(&self) -> Result<(), DockerError> {
        self.docker
            .client
            .start_container(&self.id, None)
            .await
            .map_err(call("start"))
    }

    /// Stops the container: SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(&self, grace: Duration) -> Result<(), DockerError> {
        let t = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX);
        self.docker
            .client
            .stop_container(
                &self.id,
                Some(StopContainerOptions {
                    t: Some(t),
                    ..StopContainerOptions::default()
                }),
            )
            .await
            .map_err(call("stop"))
    }

    /// SIGKILL: the process dies without any chance to flush.
    pub async fn kill(&self) -> Result<(), DockerError> {
        self.docker
            .client
            .kill_container(&self.id, None::<KillContainerOptions>)
            .await
            .map_err(call("kill"))
    }

    /// Freezes every process of the container (cgroup freezer): connections
    /// stay open and nothing answers, which is how a hung server looks.
    pub async fn pause(&self) -> Result<(), DockerError> {
        self.docker
            .client
            .pause_container(&self.id)
            .await
            .map_err(call("pause"))
    }

    pub async fn unpause(&self) -> Result<(), DockerError> {
        self.docker
            .client
            .unpause_container(&self.id)
            .await
            .map_err(call("unpause"))
    }

    /// Removes the container now and reports failures, unlike `Drop`.
    pub async fn remove(mut self) -> Result<(), DockerError> {
        self.removed = true;
        self.docker.remove(&self.id).await
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        // Drop cannot await, and the caller's runtime may be shutting down,
        // so the removal runs on a thread of its own with its own runtime.
        let id = std::mem::take(&mut self.id);
        let removal = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let Ok(runtime) = runtime else { return };
            runtime.block_on(async {
                match Docker::connect().await {
                    Ok(docker) => {
                        if let Err(error) = docker.remove(&id).await {
                            tracing::warn!(%error, container = %id, "could not remove container");
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, container = %id, "could not remove container")
                    }
                }
            });
        });
        let _ = removal.join();
    }
}
