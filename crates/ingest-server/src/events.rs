//! `POST /api/v1/events`: the extension's endpoint.

use std::collections::HashSet;
use std::io::Read as _;
use std::net::SocketAddr;
use std::time::Instant;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use cellmon_bus::HandedOff;
use cellmon_domain::envelope::StreamEvent;
use cellmon_domain::{DecodeError, WireEvent, decode_batch, validate};
use http_body_util::BodyExt as _;
use serde::Serialize;
use time::OffsetDateTime;

use crate::AppState;
use crate::error::{ApiError, Rejected};

/// The answer to an accepted request.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Accepted {
    /// Events handed off (each distinct id once).
    accepted: usize,
    /// Items that repeated an id already in this batch.
    duplicates: usize,
    rejected: Vec<Rejected>,
    /// The ids of the accepted events, in batch order.
    event_ids: Vec<String>,
    /// True when Redis could not take the events and they were written to
    /// the local spool instead (durably; they reach Redis later).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    spooled: bool,
}

pub(crate) async fn post_events(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let result = handle(&state, peer, query.as_deref(), &headers, body).await;
    let response = match result {
        Ok(accepted) => (StatusCode::ACCEPTED, Json(accepted)).into_response(),
        Err(error) => error.into_response(),
    };
    let status = response.status();
    state
        .metrics
        .accept_seconds
        .with_label_values(&[status.as_str()])
        .observe(started.elapsed().as_secs_f64());
    response
}

async fn handle(
    state: &AppState,
    peer: SocketAddr,
    query: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Accepted, ApiError> {
    let _permit = state
        .in_flight
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::Overloaded)?;
    if let Err(not_until) = state.limiter.check_key(&client_key(peer.ip())) {
        let wait = not_until.wait_time_from(governor::clock::Clock::now(
            &governor::clock::DefaultClock::default(),
        ));
        return Err(ApiError::RateLimited(wait));
    }
    // The first `token` parameter; any other parameter is ignored.
    let token = query
        .and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(key, _)| key == "token")
                .map(|(_, value)| value.into_owned())
        })
        .or_else(|| cellmon_service::bearer(headers).map(str::to_owned));
    let class_id = state
        .tokens
        .class_for(token.as_deref())
        .ok_or(ApiError::Unauthorized)?;

    let body = read_body(state, headers, body).await?;
    let received_at = OffsetDateTime::now_utc();
    let items = decode_batch(&body).map_err(|e| match e {
        DecodeError::TooLarge { .. } | DecodeError::TooManyEvents { .. } => {
            ApiError::TooLarge(e.to_string())
        }
        DecodeError::Json(json) => ApiError::MalformedJson(json.to_string()),
        other => ApiError::BadRequest(other.to_string()),
    })?;

    let mut events = Vec::with_capacity(items.len());
    let mut rejected = Vec::new();
    let mut seen = HashSet::with_capacity(items.len());
    let mut duplicates = 0;
    for (index, item) in items.into_iter().enumerate() {
        let wire = match WireEvent::from_item(item) {
            Ok(wire) => wire,
            Err(error) => {
                rejected.push(Rejected {
                    index,
                    event_id: None,
                    field: None,
                    error: error.to_string(),
                });
                continue;
            }
        };
        let client_id = wire.event_id.clone();
        match validate(wire, received_at) {
            Ok(event) => {
                if seen.insert(event.id) {
                    events.push(StreamEvent { class_id, event });
                } else {
                    duplicates += 1;
                }
            }
            Err(error) => rejected.push(Rejected {
                index,
                event_id: client_id,
                field: Some(error.field),
                error: error.to_string(),
            }),
        }
    }
    state.metrics.events_rejected.inc_by(rejected.len() as u64);
    if events.is_empty() && !rejected.is_empty() {
        return Err(ApiError::NothingValid { rejected });
    }

    let spooled = match state.handoff.hand_off(&events).await {
        Ok(HandedOff::Redis) => false,
        Ok(HandedOff::Spooled) => true,
        Err(error) => {
            tracing::warn!(
                error = &error as &dyn std::error::Error,
                events = events.len(),
                "neither Redis nor the spool took the events; answering 503"
            );
            return Err(ApiError::Unavailable);
        }
    };
    state.metrics.events_accepted.inc_by(events.len() as u64);
    state.metrics.events_duplicate.inc_by(duplicates as u64);
    Ok(Accepted {
        accepted: events.len(),
        duplicates,
        rejected,
        event_ids: events.iter().map(|e| e.event.id.to_string()).collect(),
        spooled,
    })
}

/// Whom the rate limit counts: the address, or for IPv6 its /64 (one
/// machine or site usually has a whole /64 to rotate through).
fn client_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => std::net::IpAddr::V4(v4),
            None => std::net::IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !((1u128 << 64) - 1),
            )),
        },
        v4 => v4,
    }
}

/// Most bytes of an oversized body read and thrown away before answering
/// 413, and the longest time spent on it.
const DRAIN_BYTES: usize = 64 * 1024 * 1024;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads and discards the rest of an oversized body, within bounds. Closing
/// a connection with unread data makes the kernel send RST, which can
/// destroy the 413 before the client reads it; draining lets it arrive.
async fn drain(mut body: Body) {
    let mut left = DRAIN_BYTES;
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while let Some(Ok(frame)) = body.frame().await {
            let Ok(data) = frame.into_data() else {
                continue;
            };
            left = left.saturating_sub(data.len());
            if left == 0 {
                break;
            }
        }
    })
    .await;
}

/// Reads the body within the encoded limit, then decompresses gzip within
/// the decoded limit (a gzip bomb stops at the limit, not at the end).
async fn read_body(state: &AppState, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let max = state.config.max_body_bytes;
    let timeout = state.config.body_timeout;
    let mut body = body;
    let mut raw = Vec::new();
    let read = tokio::time::timeout(timeout, async {
        while let Some(frame) = body.frame().await {
            let frame =
                frame.map_err(|_| ApiError::BadRequest("the body could not be read".into()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if raw.len() + data.len() > max {
                return Ok(false);
            }
            raw.extend_from_slice(&data);
        }
        Ok(true)
    })
    .await
    .map_err(|_| ApiError::BodyTimeout(timeout))?;
    if !read? {
        drain(body).await;
        return Err(ApiError::TooLarge(format!("the body is over {max} bytes")));
    }
    let raw = Bytes::from(raw);
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase());
    match encoding.as_deref() {
        None | Some("identity") | Some("") => Ok(raw),
        Some("gzip") | Some("x-gzip") => {
            let max = state.config.max_decoded_body_bytes;
            tokio::task::spawn_blocking(move || {
                let mut decoded = Vec::new();
                flate2::read::GzDecoder::new(&raw[..])
                    .take(max as u64 + 1)
                    .read_to_end(&mut decoded)
                    .map_err(|e| ApiError::BadRequest(format!("the gzip body is corrupt: {e}")))?;
                if decoded.len() > max {
                    return Err(ApiError::TooLarge(format!(
                        "the body is over {max} bytes once decompressed"
                    )));
                }
                Ok(Bytes::from(decoded))
            })
            .await
            .map_err(|_| ApiError::Unavailable)?
        }
        Some(other) => Err(ApiError::UnsupportedEncoding(other.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_keys_group_ipv6_by_64() {
        let a: std::net::IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: std::net::IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let other: std::net::IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(other));
        let mapped: std::net::IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(
            client_key(mapped),
            "192.0.2.7".parse::<std::net::IpAddr>().unwrap()
        );
    }
}
