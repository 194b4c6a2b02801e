//! Every error a client can get, with its status and stable code. Internal
//! causes are logged where they happen and never sent to clients.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the request body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("Content-Encoding {0:?} is not supported; send identity or gzip")]
    UnsupportedEncoding(String),
    #[error("no event in the batch is valid")]
    NothingValid { rejected: Vec<Rejected> },
    #[error("missing or unknown ingest token")]
    Unauthorized,
    #[error("too many requests from this client; retry after {0:?}")]
    RateLimited(Duration),
    #[error("events cannot be stored right now; retry later")]
    Unavailable,
    #[error("the server is at its limit of requests in flight; retry later")]
    Overloaded,
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(Duration),
}

/// One refused item of a batch.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rejected {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<&'static str>,
    pub error: String,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MalformedJson(_) | Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::NothingValid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable | Self::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// Stable, documented, for programs to branch on.
    pub fn code(&self) -> &'static str {
        match self {
            Self::MalformedJson(_) => "malformed_json",
            Self::BadRequest(_) => "bad_request",
            Self::TooLarge(_) => "too_large",
            Self::UnsupportedEncoding(_) => "unsupported_encoding",
            Self::NothingValid { .. } => "nothing_valid",
            Self::Unauthorized => "unauthorized",
            Self::RateLimited(_) => "rate_limited",
            Self::Unavailable => "unavailable",
            Self::Overloaded => "overloaded",
            Self::BodyTimeout(_) => "body_timeout",
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rejected: Option<&'a [Rejected]>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let rejected = match &self {
            Self::NothingValid { rejected } => Some(rejected.as_slice()),
            _ => None,
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message: self.to_string(),
            },
            rejected,
        };
        let mut response = (self.status(), Json(body)).into_response();
        let retry_after = match &self {
            // Whole seconds: a wait under one still says 1, since 0 would
            // invite the retry at once.
            Self::RateLimited(wait) => Some(wait.as_secs().max(1)),
            Self::Unavailable | Self::Overloaded => Some(1),
            _ => None,
        };
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
