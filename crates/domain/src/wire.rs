//! The extension's wire format, exactly as it arrives.
//!
//! Every field is optional on the wire; [`crate::event::validate`] decides
//! what each event type requires. Decoding is split in two steps so that one
//! bad item of a batch never spoils the others: [`decode_batch`] only checks
//! the outer shape (an array, or a single object) and hands back each item's
//! raw JSON, and [`WireEvent::from_item`] decodes one item.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::limits::{MAX_BATCH_EVENTS, MAX_DECODED_BODY_BYTES, MAX_JSON_DEPTH};

/// One event as the JupyterLab extension sends it (camelCase, all optional).
///
/// Unknown fields are ignored so that newer extensions keep working.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireEvent {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email_address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notebook_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cell_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cell_index: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cell_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_count: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub has_error: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_duration_ms: Option<f64>,
}

impl WireEvent {
    /// Decodes one item of a batch. The error says which field was wrong and
    /// why, in serde's words (`invalid type: string "x", expected i64`).
    pub fn from_item(item: &RawValue) -> Result<Self, serde_json::Error> {
        serde_json::from_str(item.get())
    }
}

/// Why a request body could not be read as a batch of events at all.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("the body is empty")]
    Empty,
    #[error("the body is {size} bytes; at most {max} are accepted")]
    TooLarge { size: usize, max: usize },
    #[error("the body must be a JSON array of events or a single event object")]
    NotArrayOrObject,
    #[error("JSON nesting is deeper than {max} levels")]
    TooDeep { max: usize },
    #[error("the batch holds {len} events; at most {max} are accepted")]
    TooManyEvents { len: usize, max: usize },
    #[error("malformed JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Splits a request body into its events' raw JSON, without decoding them.
///
/// Accepts a JSON array of objects (what the extension sends, with one
/// element) or a single object. The body must be valid UTF-8 and valid JSON as
/// a whole, nested at most [`MAX_JSON_DEPTH`] levels.
pub fn decode_batch(body: &[u8]) -> Result<Vec<&RawValue>, DecodeError> {
    if body.len() > MAX_DECODED_BODY_BYTES {
        return Err(DecodeError::TooLarge {
            size: body.len(),
            max: MAX_DECODED_BODY_BYTES,
        });
    }
    // serde_json skips the content of raw values without its recursion limit,
    // so the depth is checked up front, in one pass without recursion.
    if nesting_depth(body) > MAX_JSON_DEPTH {
        return Err(DecodeError::TooDeep {
            max: MAX_JSON_DEPTH,
        });
    }
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    match first {
        None => Err(DecodeError::Empty),
        Some(b'[') => {
            let items: Vec<&RawValue> = serde_json::from_slice(body)?;
            if items.len() > MAX_BATCH_EVENTS {
                return Err(DecodeError::TooManyEvents {
                    len: items.len(),
                    max: MAX_BATCH_EVENTS,
                });
            }
            Ok(items)
        }
        Some(b'{') => {
            let item: &RawValue = serde_json::from_slice(body)?;
            Ok(vec![item])
        }
        Some(_) => {
            // Still report malformed JSON as such, so clients learn the real problem.
            serde_json::from_slice::<serde::de::IgnoredAny>(body)?;
            Err(DecodeError::NotArrayOrObject)
        }
    }
}

/// The deepest nesting of arrays and objects in `json`, ignoring brackets
/// inside strings. Malformed input gives some number; the parser that runs
/// next reports the real problem.
fn nesting_depth(json: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &byte in json {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_of_one_is_what_the_extension_sends() {
        let body = br#"[{"eventType":"cell_executed","emailAddress":"a@b.jp"}]"#;
        let items = decode_batch(body).unwrap();
        assert_eq!(items.len(), 1);
        let event = WireEvent::from_item(items[0]).unwrap();
        assert_eq!(event.event_type.as_deref(), Some("cell_executed"));
        assert_eq!(event.email_address.as_deref(), Some("a@b.jp"));
    }

    #[test]
    fn single_object_is_accepted() {
        let items = decode_batch(br#"  {"eventType":"help"}"#).unwrap();
        assert_eq!(items.len(), 1);
    }

    #[test]
    fn empty_array_is_an_empty_batch() {
        assert!(decode_batch(b"[]").unwrap().is_empty());
    }

    #[test]
    fn other_shapes_are_refused() {
        assert!(matches!(decode_batch(b""), Err(DecodeError::Empty)));
        assert!(matches!(decode_batch(b"  \n"), Err(DecodeError::Empty)));
        assert!(matches!(
            decode_batch(b"42"),
            Err(DecodeError::NotArrayOrObject)
        ));
        assert!(matches!(
            decode_batch(br#""event""#),
            Err(DecodeError::NotArrayOrObject)
        ));
        assert!(matches!(decode_batch(b"nul"), Err(DecodeError::Json(_))));
        assert!(matches!(decode_batch(b"[{}"), Err(DecodeError::Json(_))));
    }

    #[test]
    fn invalid_utf8_is_malformed_json() {
        let body = b"[{\"userName\":\"\xff\xfe\"}]";
        assert!(matches!(decode_batch(body), Err(DecodeError::Json(_))));
    }

    #[test]
    fn nesting_depth_ignores_brackets_in_strings() {
        assert_eq!(nesting_depth(b"[]"), 1);
        assert_eq!(nesting_depth(br#"[{"a":[1]}]"#), 3);
        assert_eq!(nesting_depth(br#"[{"a":"[[[[\"[["}]"#), 2);
        assert_eq!(nesting_depth(b"42"), 0);
    }

    #[test]
    fn deep_nesting_is_refused_without_overflowing_the_stack() {
        let depth = 10_000;
        let body = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        assert!(matches!(
            decode_batch(body.as_bytes()),
            Err(DecodeError::TooDeep { .. })
        ));
        let nested = format!(
            r#"[{{"eventType":"help","x":{}1{}}}]"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        assert!(decode_batch(nested.as_bytes()).is_err());
    }

    #[test]
    fn too_many_events_are_refused() {
        let body = format!("[{}{{}}]", "{},".repeat(MAX_BATCH_EVENTS));
        assert!(matches!(
            decode_batch(body.as_bytes()),
            Err(DecodeError::TooManyEvents { len, .. }) if len == MAX_BATCH_EVENTS + 1
        ));
    }

    #[test]
    fn a_wrongly_typed_item_fails_alone() {
        let body = br#"[{"cellIndex":"three"},{"cellIndex":3}]"#;
        let items = decode_batch(body).unwrap();
        let err = WireEvent::from_item(items[0]).unwrap_err();
        assert!(err.to_string().contains("invalid type"), "{err}");
        assert_eq!(WireEvent::from_item(items[1]).unwrap().cell_index, Some(3));
    }

    #[test]
    fn out_of_range_numbers_fail_the_item() {
        let items = decode_batch(br#"[{"executionDurationMs":1e400}]"#);
        // serde_json refuses infinite floats while splitting or while decoding
        // the item; either way nothing non-finite gets through.
        if let Ok(items) = items {
            assert!(WireEvent::from_item(items[0]).is_err());
        }
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let items = decode_batch(br#"{"eventType":"help","newField":{"a":[1,2]}}"#).unwrap();
        let event = WireEvent::from_item(items[0]).unwrap();
        assert_eq!(event.event_type.as_deref(), Some("help"));
    }
}
