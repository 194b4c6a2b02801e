//! Who is on the other end: instructor tokens (JWT, HS256), WebSocket
//! tickets, and the `Origin` allow-list.
//!
//! An instructor token is a JWT signed with the configured secret whose
//! `sub` is the instructor's id and which has an `exp`. A dashboard sends
//! it in `Authorization: Bearer` over HTTP, or, on the upgrade, as the
//! WebSocket sub-protocol `cellmon.jwt.<token>` next to `cellmon.v1`. A
//! browser page that should not hold the token can instead trade it for a
//! ticket (`POST /api/v1/ws-ticket`): a token of a few seconds' life with
//! the audience [`TICKET_AUDIENCE`], presented as `?ticket=`. A ticket is
//! good for nothing but the upgrade, and a token is no ticket.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, header};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The sub-protocol a client offers (and the server selects).
pub const PROTOCOL: &str = "cellmon.v1";
/// The prefix of the sub-protocol that carries the token.
pub const TOKEN_PROTOCOL_PREFIX: &str = "cellmon.jwt.";
/// The audience of a WebSocket ticket.
pub const TICKET_AUDIENCE: &str = "cellmon-ws-ticket";

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    aud: Option<String>,
    /// A ticket's session expiry: the `exp` of the token it was traded for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    session_exp: Option<u64>,
}

/// An authenticated socket: who, and until when (Unix seconds) their
/// token is good. The socket is closed then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    pub instructor: Uuid,
    pub expires: u64,
}

impl Session {
    /// The time left until the session expires.
    pub fn remaining(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.expires.saturating_sub(unix_now()))
    }
}

/// Why a request is not authenticated. Shown to the client as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "no token: send Authorization: Bearer, the sub-protocol cellmon.jwt.<token>, or ?ticket="
    )]
    Missing,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid: {0}")]
    Invalid(String),
}

/// Checks and issues instructor tokens.
#[derive(Clone)]
pub struct Verifier {
    decoding: DecodingKey,
    encoding: EncodingKey,
    leeway: u64,
    ticket_seconds: u64,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("leeway", &self.leeway)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    pub fn new(secret: &SecretString, leeway: u64, ticket_seconds: u64) -> Self {
        let bytes = secret.expose_secret().as_bytes();
        Self {
            decoding: DecodingKey::from_secret(bytes),
            encoding: EncodingKey::from_secret(bytes),
            leeway,
            ticket_seconds,
        }
    }

    /// The instructor of an access token (never a ticket).
    pub fn instructor(&self, token: &str) -> Result<Uuid, AuthError> {
        Ok(self.session(token)?.instructor)
    }

    /// The session of an access token (never a ticket).
    pub fn session(&self, token: &str) -> Result<Session, AuthError> {
        let (instructor, claims) = self.check(token, None)?;
        Ok(Session {
            instructor,
            expires: claims.exp,
        })
    }

    /// The session of a ticket (never an access token): it lasts as long
    /// as the token the ticket was traded for.
    pub fn ticket(&self, ticket: &str) -> Result<Session, AuthError> {
        let (instructor, claims) = self.check(ticket, Some(TICKET_AUDIENCE))?;
        Ok(Session {
            instructor,
            expires: claims.session_exp.unwrap_or(claims.exp),
        })
    }

    fn check(&self, token: &str, audience: Option<&str>) -> Result<(Uuid, Claims), AuthError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = self.leeway;
        if let Some(audience) = audience {
            validation.set_required_spec_claims(&["exp", "sub", "aud"]);
            validation.set_audience(&[audience]);
        } else {
            validation.set_required_spec_claims(&["exp", "sub"]);
        }
        let data = jsonwebtoken::decode::<Claims>(token.as_bytes(), &self.decoding, &validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                kind => AuthError::Invalid(format!("{kind:?}")),
            })?;
        let instructor = Uuid::parse_str(&data.claims.sub)
            .map_err(|_| AuthError::Invalid("sub is not an instructor id".into()))?;
        Ok((instructor, data.claims))
    }

    /// A ticket for a session, and its lifetime in seconds.
    pub fn issue_ticket(&self, session: Session) -> Result<(String, u64), AuthError> {
        let token = self.sign(
            session.instructor,
            self.ticket_seconds,
            Some(TICKET_AUDIENCE),
            Some(session.expires),
        )?;
        Ok((token, self.ticket_seconds))
    }

    /// An access token for `instructor`, valid `seconds` (for tools and tests;
    /// production tokens come from the course's sign-in).
    pub fn issue_token(&self, instructor: Uuid, seconds: u64) -> Result<String, AuthError> {
        self.sign(instructor, seconds, None, None)
    }

    fn sign(
        &self,
        instructor: Uuid,
        seconds: u64,
        audience: Option<&str>,
        session_exp: Option<u64>,
    ) -> Result<String, AuthError> {
        let now = unix_now();
        let claims = Claims {
            sub: instructor.to_string(),
            exp: now + seconds,
            iat: Some(now),
            aud: audience.map(str::to_owned),
            session_exp,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| AuthError::Invalid(e.to_string()))
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The bearer token of an HTTP request: the one reading every server
/// shares.
pub use cellmon_service::bearer;

/// The token offered as a sub-protocol on an upgrade.
pub fn protocol_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find_map(|p| p.strip_prefix(TOKEN_PROTOCOL_PREFIX))
}

/// Whether a browser origin may open a socket. No `Origin` (not a browser)
/// is allowed; a present one must be on the list.
pub fn origin_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    allowed
        .iter()
        .any(|a| a == "*" || a.trim_end_matches('/').eq_ignore_ascii_case(origin))
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn verifier() -> Verifier {
        Verifier::new(&SecretString::from("s3cret"), 0, 30)
    }

    #[test]
    fn tokens_and_tickets_do_not_mix() {
        let v = verifier();
        let who = Uuid::from_u128(7);
        let token = v.issue_token(who, 600).unwrap();
        let session = v.session(&token).unwrap();
        let (ticket, _) = v.issue_ticket(session).unwrap();
        assert_eq!(v.instructor(&token), Ok(who));
        assert_eq!(
            v.ticket(&ticket),
            Ok(session),
            "a ticket lasts as its token"
        );
        assert!(v.instructor(&ticket).is_err(), "a ticket is no token");
        assert!(v.ticket(&token).is_err(), "a token is no ticket");
    }

    #[test]
    fn wrong_secret_expiry_and_algorithm_are_refused() {
        let v = verifier();
        let other = Verifier::new(&SecretString::from("other"), 0, 30);
        let who = Uuid::from_u128(7);
        assert!(matches!(
            v.instructor(&other.issue_token(who, 60).unwrap()),
            Err(AuthError::Invalid(_))
        ));
        let expired = Claims {
            sub: who.to_string(),
            exp: unix_now() - 120,
            iat: None,
            aud: None,
            session_exp: None,
        };
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &expired,
            &EncodingKey::from_secret(b"s3cret"),
        )
        .unwrap();
        assert_eq!(v.instructor(&expired), Err(AuthError::Expired));
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &Claims {
                sub: who.to_string(),
                exp: unix_now() + 60,
                iat: None,
                aud: None,
                session_exp: None,
            },
            &EncodingKey::from_secret(b"s3cret"),
        )
        .unwrap();
        assert!(v.instructor(&hs512).is_err());
        assert!(v.instructor("not.a.jwt").is_err());
    }

    #[test]
    fn protocol_token_and_origin() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("cellmon.v1, cellmon.jwt.abc.def.ghi"),
        );
        assert_eq!(protocol_token(&headers), Some("abc.def.ghi"));
        let allowed = vec!["https://dash.example.edu".to_owned()];
        assert!(
            origin_allowed(&headers, &allowed),
            "no Origin: not a browser"
        );
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://dash.example.edu"),
        );
        assert!(origin_allowed(&headers, &allowed));
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(!origin_allowed(&headers, &allowed));
        assert!(origin_allowed(&headers, &["*".to_owned()]));
    }
}
