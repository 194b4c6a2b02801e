//! The one reading of `Authorization: Bearer <token>` for every server, so
//! that the ingest server and the gateway accept exactly the same headers.

use http::HeaderMap;
use http::header::AUTHORIZATION;

/// The token of an `Authorization: Bearer <token>` header. The scheme is
/// matched without regard to case (RFC 9110 §11.1), the token is trimmed,
/// and an empty token, another scheme, or a header that is not text is no
/// token at all.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?.trim_start();
    let (scheme, token) = value.split_once(|c: char| c.is_ascii_whitespace())?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn token_of(value: &'static str) -> Option<String> {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, HeaderValue::from_static(value));
        bearer(&headers).map(str::to_owned)
    }

    #[test]
    fn the_scheme_is_case_insensitive_and_the_token_trimmed() {
        assert_eq!(token_of("Bearer abc.def"), Some("abc.def".into()));
        assert_eq!(token_of("bearer abc"), Some("abc".into()));
        assert_eq!(token_of("BEARER abc"), Some("abc".into()));
        assert_eq!(token_of("Bearer   abc  "), Some("abc".into()));
        assert_eq!(token_of("Bearer\tabc"), Some("abc".into()));
    }

    #[test]
    fn an_empty_token_or_another_scheme_is_none() {
        assert_eq!(bearer(&HeaderMap::new()), None, "no header");
        assert_eq!(token_of("Bearer"), None);
        assert_eq!(token_of("Bearer "), None);
        assert_eq!(token_of("Bearer    "), None);
        assert_eq!(token_of("Basic dXNlcjpwYXNz"), None);
        assert_eq!(token_of("Bearerabc"), None);
        assert_eq!(token_of("abc"), None);
    }

    #[test]
    fn a_header_that_is_not_text_is_none() {
        let mut headers = HeaderMap::new();
        headers.insert(
            AUTHORIZATION,
            HeaderValue::from_bytes(b"Bearer \xff\xfe").unwrap(),
        );
        assert_eq!(bearer(&headers), None);
    }
}
