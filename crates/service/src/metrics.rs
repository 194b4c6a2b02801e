//! What every binary's `/metrics` shows besides its own metrics, and the
//! separate metrics listener:
//!
//! * [`register_common`]: the process metrics (`process_cpu_seconds_total`,
//!   `process_resident_memory_bytes`, `process_open_fds`,
//!   `process_max_fds`, `process_start_time_seconds`, ... on Linux) and
//!   `cellmon_build_info{service,version,revision} 1`, so a dashboard can
//!   show which build runs where and an alert can join on it;
//! * [`serve_apart`]: when `listen.metrics` is set, `/metrics` is served
//!   on that address only (the public port does not show it); unset, the
//!   binary keeps `/metrics` on its main port.

use std::net::SocketAddr;

use prometheus::{IntGaugeVec, Opts, Registry};

use crate::BadSetting;

/// The source revision the binary was built from, when the build said
/// (`CELLMON_REVISION` at compile time), else `unknown`.
pub const REVISION: &str = match option_env!("CELLMON_REVISION") {
    Some(revision) => revision,
    None => "unknown",
};

/// The workspace version every binary carries.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Registers the process metrics (Linux) and `cellmon_build_info` for
/// `service` (`ingest`, `persister`, `gateway`) in `registry`.
pub fn register_common(registry: &Registry, service: &str) -> Result<(), prometheus::Error> {
    let build_info = IntGaugeVec::new(
        Opts::new(
            "cellmon_build_info",
            "Always 1; the labels say which service, version and revision run",
        ),
        &["service", "version", "revision"],
    )?;
    build_info
        .with_label_values(&[service, VERSION, REVISION])
        .set(1);
    registry.register(Box::new(build_info))?;
    #[cfg(target_os = "linux")]
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    Ok(())
}

/// A metrics server on its own address. [`MetricsServer::stop`] ends it
/// and waits until what its routes hold is released; dropping it only
/// asks it to end. Nothing is drained: a scrape cut short is retried by
/// Prometheus.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsServer {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops it and waits until its task, and so what its routes hold
    /// (a binary's state), is gone.
    pub async fn stop(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `routes` (the binary's `/metrics`) on `addr` when set; `None`
/// when unset (the binary then serves `/metrics` on its main port). An
/// address that cannot be bound is the setting `listen.metrics`'s fault.
pub async fn serve_apart(
    addr: Option<SocketAddr>,
    routes: axum::Router,
) -> Result<Option<MetricsServer>, BadSetting> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|error| BadSetting::new("listen.metrics", error))?;
    let addr = listener
        .local_addr()
        .map_err(|error| BadSetting::new("listen.metrics", error))?;
    let task = tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, routes).await {
            tracing::error!(%error, "the metrics listener stopped");
        }
    });
    tracing::info!(%addr, "metrics listening on their own address");
    Ok(Some(MetricsServer { addr, task }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_info_and_process_metrics_are_registered() {
        let registry = Registry::new();
        register_common(&registry, "ingest").unwrap();
        let names: Vec<String> = registry
            .gather()
            .iter()
            .map(|family| family.name().to_owned())
            .collect();
        assert!(
            names.contains(&"cellmon_build_info".to_owned()),
            "{names:?}"
        );
        #[cfg(target_os = "linux")]
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
        ] {
            assert!(
                names.contains(&name.to_owned()),
                "{name} missing: {names:?}"
            );
        }
    }

    #[test]
    fn registering_twice_in_one_registry_is_refused() {
        let registry = Registry::new();
        register_common(&registry, "ingest").unwrap();
        assert!(register_common(&registry, "ingest").is_err());
    }
}
