//! One backend container, run by the `testcontainers` crate.
//!
//! [`Container::run`] turns a [`ContainerSpec`] into a testcontainers
//! request (image, command, environment, the kit's owner labels, the one
//! port published on loopback only), starts it and waits for the server's
//! "ready" log line; the backend's real probe follows in
//! [`crate::backend`]. Stop, start, pause, unpause, the host port and the
//! logs are testcontainers calls; SIGKILL is the one lifecycle call it
//! lacks (see [`crate::docker`]).
//!
//! A [`Container`] is removed when dropped, as testcontainers does, or by
//! [`Container::remove`], which reports failures. A value that owns one
//! must live as long as the container is meant to (the test run's
//! supervisor holds its set until the run ends).

use std::collections::HashMap;
use std::time::Duration;

use testcontainers::bollard::models::{HostConfig, PortBinding};
use testcontainers::core::{IntoContainerPort as _, WaitFor};
use testcontainers::runners::AsyncRunner as _;
use testcontainers::{ContainerAsync, GenericImage, ImageExt as _};

use crate::docker::{Docker, DockerError, LABEL, OWNER_HOST_LABEL, OWNER_LABEL, owner_host};

/// How long a container may take to print its ready line.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// What to run.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    /// `name[:tag]`, e.g. `redis:7-alpine` or `cellmon-local/redis:7-r1`.
    pub image: String,
    pub cmd: Vec<String>,
    pub env: Vec<(String, String)>,
    /// The one TCP port the service listens on inside the container.
    pub port: u16,
    /// What the server prints (on stdout or stderr) once it accepts
    /// connections.
    pub ready_line: &'static str,
    /// A role name for logs and labels (`postgres`, `redis`, `influxdb`).
    pub role: &'static str,
}

impl ContainerSpec {
    /// The testcontainers request for this spec.
    fn request(&self) -> testcontainers::ContainerRequest<GenericImage> {
        let (name, tag) = split_image(&self.image);
        let port_key = format!("{}/tcp", self.port);
        let mut request = GenericImage::new(name, tag)
            .with_exposed_port(self.port.tcp())
            .with_wait_for(WaitFor::message_on_either_std(self.ready_line))
            .with_label(LABEL, self.role)
            .with_label(OWNER_LABEL, std::process::id().to_string())
            .with_label(OWNER_HOST_LABEL, owner_host())
            .with_startup_timeout(STARTUP_TIMEOUT)
            // testcontainers publishes every exposed port on all interfaces;
            // a Postgres with trust authentication must only be reachable
            // from this machine, so the one port is bound to loopback, on a
            // port the engine picks (a new one after every start).
            .with_host_config_modifier(move |host: &mut HostConfig| {
                host.publish_all_ports = Some(false);
                host.port_bindings = Some(HashMap::from([(
                    port_key.clone(),
                    Some(vec![PortBinding {
                        host_ip: Some("127.0.0.1".to_owned()),
                        host_port: Some(String::new()),
                    }]),
                )]));
            });
        if !self.cmd.is_empty() {
            request = request.with_cmd(&self.cmd);
        }
        for (key, value) in &self.env {
            request = request.with_env_var(key, value);
        }
        request
    }
}

/// `name[:tag]` into name and tag (`latest` when none). A colon before the
/// last `/` belongs to a registry's port, not to a tag.
fn split_image(image: &str) -> (&str, &str) {
    match image.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name, tag),
        _ => (image, "latest"),
    }
}

/// A running (or stopped, or paused) container, removed when dropped.
#[derive(Debug)]
pub struct Container {
    /// Always `Some` until [`Container::remove`] or `Drop` takes it.
    inner: Option<ContainerAsync<GenericImage>>,
    id: String,
    docker: Docker,
    port: u16,
    role: &'static str,
}

impl Container {
    /// Starts a container from `spec` and waits for its ready line. The
    /// image must be on this machine: nothing is ever pulled.
    pub async fn run(docker: &Docker, spec: &ContainerSpec) -> Result<Self, DockerError> {
        docker.require_image(&spec.image).await?;
        let inner = spec
            .request()
            .start()
            .await
            .map_err(|source| DockerError::Container {
                action: "start",
                role: spec.role,
                source: Box::new(source),
            })?;
        Ok(Self {
            id: inner.id().to_owned(),
            inner: Some(inner),
            docker: docker.clone(),
            port: spec.port,
            role: spec.role,
        })
    }

    fn inner(&self) -> &ContainerAsync<GenericImage> {
        self.inner
            .as_ref()
            .expect("a container is only taken out by remove or drop")
    }

    fn failed(
        &self,
        action: &'static str,
    ) -> impl FnOnce(testcontainers::TestcontainersError) -> DockerError {
        let role = self.role;
        move |source| DockerError::Container {
            action,
            role,
            source: Box::new(source),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn role(&self) -> &'static str {
        self.role
    }

    /// The port the service listens on inside the container.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The loopback host port the service is published on right now. It
    /// changes when the container is stopped and started again.
    pub async fn host_port(&self) -> Result<u16, DockerError> {
        self.inner()
            .get_host_port_ipv4(self.port)
            .await
            .map_err(self.failed("read the host port of"))
    }

    /// Starts the stopped or killed container again (it keeps its data).
    pub async fn start(&self) -> Result<(), DockerError> {
        self.inner().start().await.map_err(self.failed("start"))
    }

    /// Stops the container: SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(&self, grace: Duration) -> Result<(), DockerError> {
        let seconds = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX);
        self.inner()
            .stop_with_timeout(Some(seconds))
            .await
            .map_err(self.failed("stop"))
    }

    /// SIGKILL: the process dies without any chance to flush.
    pub async fn kill(&self) -> Result<(), DockerError> {
        self.docker.kill(&self.id).await
    }

    /// Freezes every process of the container (cgroup freezer): connections
    /// stay open and nothing answers, which is how a hung server looks.
    pub async fn pause(&self) -> Result<(), DockerError> {
        self.inner().pause().await.map_err(self.failed("pause"))
    }

    pub async fn unpause(&self) -> Result<(), DockerError> {
        self.inner().unpause().await.map_err(self.failed("unpause"))
    }

    /// What the server printed so far, stdout then stderr: for a test that
    /// failed to say why.
    pub async fn logs(&self) -> Result<String, DockerError> {
        let stdout = self
            .inner()
            .stdout_to_vec()
            .await
            .map_err(self.failed("read the logs of"))?;
        let stderr = self
            .inner()
            .stderr_to_vec()
            .await
            .map_err(self.failed("read the logs of"))?;
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ))
    }

    /// Removes the container now and reports failures, unlike `Drop`.
    pub async fn remove(mut self) -> Result<(), DockerError> {
        let role = self.role;
        match self.inner.take() {
            Some(inner) => inner.rm().await.map_err(|source| DockerError::Container {
                action: "remove",
                role,
                source: Box::new(source),
            }),
            None => Ok(()),
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let Some(inner) = self.inner.take() else {
            return;
        };
        // testcontainers removes the container in its own `Drop`, on the
        // current tokio runtime. A value dropped where there is none (after
        // its runtime ended) gets one on a thread of its own.
        if tokio::runtime::Handle::try_current().is_ok() {
            drop(inner);
            return;
        }
        let removal = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            match runtime {
                Ok(runtime) => runtime.block_on(async move { drop(inner) }),
                Err(error) => tracing::warn!(%error, "cannot remove a container: no runtime"),
            }
        });
        let _ = removal.join();
    }
}

#[cfg(test)]
mod tests {
    use super::split_image;

    #[test]
    fn image_names_split_into_name_and_tag() {
        assert_eq!(split_image("redis:7-alpine"), ("redis", "7-alpine"));
        assert_eq!(
            split_image("cellmon-local/postgres:15-r1"),
            ("cellmon-local/postgres", "15-r1")
        );
        assert_eq!(split_image("influxdb"), ("influxdb", "latest"));
        assert_eq!(
            split_image("registry.local:5000/team/redis"),
            ("registry.local:5000/team/redis", "latest")
        );
        assert_eq!(
            split_image("registry.local:5000/team/redis:7"),
            ("registry.local:5000/team/redis", "7")
        );
    }
}
