//! The persister's HTTP side: `GET /health/live` (the process answers),
//! `GET /health/ready` ([`crate::health`]: 200, or 503 naming what fails)
//! and `GET /metrics` (Prometheus).

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

pub(crate) fn router(readiness: Readiness, metrics: Metrics) -> Router {
    Router::new()
        .route("/health/live", get(|| async { "ok" }))
        .route("/health/ready", get(ready))
        .route("/metrics", get(render_metrics))
        .with_state(HttpState { readiness, metrics })
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
