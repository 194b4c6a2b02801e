//! The gateway's HTTP side: the upgrade with its checks, tickets, and the
//! 1:1 message API for instructors (token) and students (class token and
//! e-mail). Errors are JSON `{"error": {"code", "message"}}`.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{FromRequest, FromRequestParts, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use cellmon_domain::lms::{ClassId, StudentId};
use cellmon_store::StoreError;
use cellmon_store::classes;
use cellmon_store::messages::{self, DirectMessage, Sender};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use crate::AppState;
use crate::auth::{self, AuthError};
use crate::hub::DirectEnvelope;
use crate::protocol::ServerMessage;

/// A JSON error with a stable code.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no such {what}"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", error.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        tracing::warn!(%error, "store call failed");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the class data is unavailable right now; try again",
        )
    }
}

impl From<messages::BodyError> for ApiError {
    fn from(error: messages::BodyError) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad_body",
            error.to_string(),
        )
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        Self::new(rejection.status(), "bad_request", rejection.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            rejection.body_text(),
        )
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            rejection.body_text(),
        )
    }
}

/// A JSON body; a malformed one is a JSON error too.
#[derive(Debug, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Body<T>(T);

/// Query parameters, with JSON errors.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(T);

/// Path parameters, with JSON errors.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(T);

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpgradeQuery {
    ticket: Option<String>,
}

/// The read buffer of a socket: dashboards send a few small messages (the
/// library's default, 128 KiB, is what a thousand sockets would feel).
const SOCKET_READ_BUFFER_BYTES: usize = 4 * 1024;
/// The write buffer of a socket, filled by a batch before a flush.
const SOCKET_WRITE_BUFFER_BYTES: usize = 16 * 1024;

/// `GET /ws`: Origin, capacity and token are checked before `101`.
pub async fn upgrade(
    State(state): State<AppState>,
    Query(query): Query<UpgradeQuery>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let refuse = |reason: &str| state.metrics.refused.with_label_values(&[reason]).inc();
    if !auth::origin_allowed(&headers, &state.config.allowed_origins) {
        refuse("origin");
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "origin_forbidden",
            "this origin may not open a socket",
        ));
    }
    let session = match (auth::protocol_token(&headers), query.ticket.as_deref()) {
        (Some(token), _) => state.verifier.session(token),
        (None, Some(ticket)) => state.verifier.ticket(ticket),
        (None, None) => Err(AuthError::Missing),
    };
    let session = session.inspect_err(|_| refuse("unauthorized"))?;
    let Ok(permit) = state.connections.clone().try_acquire_owned() else {
        refuse("capacity");
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "too many open sockets; try again later",
        ));
    };
    let max = state.config.max_message_bytes;
    let tracker = state.tracker.clone();
    Ok(ws
        .protocols([auth::PROTOCOL])
        .max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(SOCKET_READ_BUFFER_BYTES)
        .write_buffer_size(SOCKET_WRITE_BUFFER_BYTES)
        .on_upgrade(move |socket| {
            tracker.track_future(crate::socket::run(socket, session, state, permit))
        }))
}

fn instructor(state: &AppState, headers: &HeaderMap) -> Result<Uuid, ApiError> {
    let token = auth::bearer(headers).ok_or(AuthError::Missing)?;
    Ok(state.verifier.instructor(token)?)
}

/// `POST /api/v1/ws-ticket`: a short-lived ticket for `GET /ws?ticket=`.
pub async fn ticket(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let token = auth::bearer(&headers).ok_or(AuthError::Missing)?;
    let session = state.verifier.session(token)?;
    let (ticket, seconds) = state.verifier.issue_ticket(session)?;
    Ok(Json(json!({"ticket": ticket, "expiresInSeconds": seconds})))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Page {
    before: Option<i64>,
    limit: Option<i64>,
}

const DEFAULT_PAGE: i64 = 50;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewMessage {
    body: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MarkRead {
    up_to: i64,
}

async fn teaching(state: &AppState, headers: &HeaderMap, class: ClassId) -> Result<Uuid, ApiError> {
    let who = instructor(state, headers)?;
    if !classes::teaches(&state.pool, who, class).await? {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "you do not teach this class",
        ));
    }
    Ok(who)
}

/// `POST /api/v1/classes/{class}/students/{student}/messages`.
pub async fn instructor_send(
    State(state): State<AppState>,
    Path((class, student)): Path<(ClassId, StudentId)>,
    headers: HeaderMap,
    Body(new): Body<NewMessage>,
) -> Result<(StatusCode, Json<DirectMessage>), ApiError> {
    let who = teaching(&state, &headers, class).await?;
    let body = messages::check_body(&new.body)?;
    let message = messages::send(&state.pool, class, who, student, Sender::Instructor, body)
        .await?
        .ok_or_else(|| ApiError::not_found("student in this class"))?;
    state
        .metrics
        .direct_messages
        .with_label_values(&["instructor"])
        .inc();
    publish(&state, &message).await;
    Ok((StatusCode::CREATED, Json(message)))
}

/// `GET /api/v1/classes/{class}/students/{student}/messages?before=&limit=`.
pub async fn instructor_history(
    State(state): State<AppState>,
    Path((class, student)): Path<(ClassId, StudentId)>,
    Query(page): Query<Page>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let who = teaching(&state, &headers, class).await?;
    let limit = page.limit.unwrap_or(DEFAULT_PAGE);
    let list = messages::history(&state.pool, class, who, student, page.before, limit).await?;
    Ok(Json(paged(list, limit)))
}

/// `POST /api/v1/classes/{class}/students/{student}/messages/read`.
pub async fn instructor_read(
    State(state): State<AppState>,
    Path((class, student)): Path<(ClassId, StudentId)>,
    headers: HeaderMap,
    Body(read): Body<MarkRead>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let who = teaching(&state, &headers, class).await?;
    let marked = messages::mark_read(
        &state.pool,
        class,
        who,
        student,
        Sender::Instructor,
        read.up_to,
    )
    .await?;
    Ok(Json(json!({"marked": marked})))
}

/// `GET /api/v1/messages/unread`: the instructor's threads with unread
/// messages.
pub async fn instructor_unread(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let who = instructor(&state, &headers)?;
    let threads = messages::unread_for_instructor(&state.pool, who).await?;
    let total: i64 = threads.iter().map(|t| t.unread).sum();
    Ok(Json(json!({"total": total, "threads": threads})))
}

/// The student's class (by class token) and id (by e-mail).
async fn student(
    state: &AppState,
    headers: &HeaderMap,
    token: Option<&str>,
    email: &str,
) -> Result<(ClassId, StudentId), ApiError> {
    let token = token
        .or_else(|| auth::bearer(headers))
        .ok_or(AuthError::Missing)?;
    let class = classes::class_for_token(&state.pool, token)
        .await?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "unknown class token",
            )
        })?;
    let student = messages::student_by_email(&state.pool, class, email)
        .await?
        .ok_or_else(|| ApiError::not_found("student with this e-mail in the class"))?;
    Ok((class, student))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StudentQuery {
    email: String,
    token: Option<String>,
    before: Option<i64>,
    limit: Option<i64>,
}

/// `GET /api/v1/student/messages?email=&token=&before=&limit=`.
pub async fn student_history(
    State(state): State<AppState>,
    Query(query): Query<StudentQuery>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (class, student) = student(&state, &headers, query.token.as_deref(), &query.email).await?;
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    let list = messages::student_history(&state.pool, class, student, query.before, limit).await?;
    Ok(Json(paged(list, limit)))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StudentUnreadQuery {
    email: String,
    token: Option<String>,
}

/// `GET /api/v1/student/messages/unread?email=&token=`.
pub async fn student_unread(
    State(state): State<AppState>,
    Query(query): Query<StudentUnreadQuery>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (class, student) = student(&state, &headers, query.token.as_deref(), &query.email).await?;
    let threads = messages::unread_for_student(&state.pool, class, student).await?;
    let total: i64 = threads.iter().map(|t| t.unread).sum();
    Ok(Json(json!({"total": total, "threads": threads})))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StudentSend {
    email: String,
    token: Option<String>,
    instructor_id: Uuid,
    body: String,
}

/// `POST /api/v1/student/messages {email, instructorId, body}`.
pub async fn student_send(
    State(state): State<AppState>,
    headers: HeaderMap,
    Body(new): Body<StudentSend>,
) -> Result<(StatusCode, Json<DirectMessage>), ApiError> {
    let (class, student) = student(&state, &headers, new.token.as_deref(), &new.email).await?;
    let body = messages::check_body(&new.body)?;
    let message = messages::send(
        &state.pool,
        class,
        new.instructor_id,
        student,
        Sender::Student,
        body,
    )
    .await?
    .ok_or_else(|| ApiError::not_found("instructor of this class"))?;
    state
        .metrics
        .direct_messages
        .with_label_values(&["student"])
        .inc();
    publish(&state, &message).await;
    Ok((StatusCode::CREATED, Json(message)))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StudentRead {
    email: String,
    token: Option<String>,
    instructor_id: Uuid,
    up_to: i64,
}

/// `POST /api/v1/student/messages/read {email, instructorId, upTo}`.
pub async fn student_read(
    State(state): State<AppState>,
    headers: HeaderMap,
    Body(read): Body<StudentRead>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (class, student) = student(&state, &headers, read.token.as_deref(), &read.email).await?;
    let marked = messages::mark_read(
        &state.pool,
        class,
        read.instructor_id,
        student,
        Sender::Student,
        read.up_to,
    )
    .await?;
    Ok(Json(json!({"marked": marked})))
}

/// A page of messages, newest first; `nextBefore` is set when the page is
/// full (there may be more).
fn paged(list: Vec<DirectMessage>, limit: i64) -> serde_json::Value {
    let full = i64::try_from(list.len()).unwrap_or(i64::MAX) >= limit.clamp(1, messages::MAX_PAGE);
    let next = list.last().filter(|_| full).map(|m| m.id);
    json!({"messages": list, "nextBefore": next})
}

/// Tells every gateway's sockets of the instructor about a stored message.
/// Best effort: the message is stored, and a dashboard that misses it gets
/// it as unread when it connects.
async fn publish(state: &AppState, message: &DirectMessage) {
    let frame = ServerMessage::DirectMessage {
        message: message.clone(),
    };
    let Ok(frame) = serde_json::to_string(&frame) else {
        return;
    };
    let envelope = DirectEnvelope {
        instructor_id: message.instructor_id,
        message_id: message.id,
        frame,
    };
    let Ok(payload) = serde_json::to_string(&envelope) else {
        return;
    };
    let mut redis = state.redis.clone();
    let published: Result<i64, _> = redis::cmd("PUBLISH")
        .arg(state.keys.direct_channel())
        .arg(payload)
        .query_async(&mut redis)
        .await;
    if let Err(error) = published {
        tracing::warn!(%error, "a 1:1 message was stored but not pushed live");
    }
}
