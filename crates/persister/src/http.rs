//! The persister's HTTP side: `GET /health/live` (the process answers),
//! `GET /health/ready` ([`crate::health`]: 200, or 503 naming what fails)
//! and `GET /metrics` (Prometheus; on its own address when `listen.metrics`
//! is set).

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;

use crate::health::Readiness;
use crate::metrics::Metrics;

#[derive(Debug, Clone)]
struct HttpState {
    readiness: Readiness,
    metrics: Metrics,
}

/// The health routes, and `/metrics` unless `metrics_apart` (then
/// [`metrics_router`] serves them on their own address).
pub(crate) fn router(readiness: Readiness, metrics: Metrics, metrics_apart: bool) -> Router {
    let mut routes = Router::new()
        .route("/health/live", get(|| async { "ok" }))
        .route("/health/ready", get(ready));
    if !metrics_apart {
        routes = routes.route("/metrics", get(render_metrics));
    }
    routes.with_state(HttpState { readiness, metrics })
}

/// `/metrics` alone, for the separate metrics listener.
pub(crate) fn metrics_router(metrics: Metrics) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(metrics): State<Metrics>| async move {
                (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    metrics.render(),
                )
            }),
        )
        .with_state(metrics)
}

async fn ready(State(state): State<HttpState>) -> Response {
    let report = state.readiness.report().await;
    let status = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(report)).into_response()
}

async fn render_metrics(State(state): State<HttpState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}
