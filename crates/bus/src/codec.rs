//! The layout of one event as a stream entry.
//!
//! | field | value |
//! | --- | --- |
//! | `id` | the event id (consumers dedupe on it without parsing JSON) |
//! | `v` | [`STREAM_FORMAT_VERSION`] |
//! | `e` | the [`StreamEvent`] as JSON |

use std::collections::HashMap;

use cellmon_domain::EventId;
use cellmon_domain::envelope::{STREAM_FORMAT_VERSION, StreamEvent};
use redis::Value;

/// Why an entry could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("entry has no `{0}` field")]
    MissingField(&'static str),
    #[error("entry format version {0} is not known to this version")]
    UnknownVersion(String),
    #[error("entry payload is not a valid event: {0}")]
    Payload(#[from] serde_json::Error),
}

/// The fields of the entry for `event`, in order.
pub fn encode(event: &StreamEvent) -> Result<[(&'static str, Vec<u8>); 3], serde_json::Error> {
    Ok([
        ("id", event.event.id.to_string().into_bytes()),
        ("v", STREAM_FORMAT_VERSION.to_string().into_bytes()),
        ("e", serde_json::to_vec(event)?),
    ])
}

fn field<'a>(
    fields: &'a HashMap<String, Value>,
    name: &'static str,
) -> Result<&'a [u8], DecodeError> {
    match fields.get(name) {
        Some(Value::BulkString(bytes)) => Ok(bytes),
        _ => Err(DecodeError::MissingField(name)),
    }
}

/// Reads an entry's fields back into the event.
pub fn decode(fields: &HashMap<String, Value>) -> Result<StreamEvent, DecodeError> {
    let version = field(fields, "v")?;
    if version != STREAM_FORMAT_VERSION.to_string().as_bytes() {
        return Err(DecodeError::UnknownVersion(
            String::from_utf8_lossy(version).into_owned(),
        ));
    }
    Ok(serde_json::from_slice(field(fields, "e")?)?)
}

/// The event id of an entry, without decoding its payload.
pub fn event_id(fields: &HashMap<String, Value>) -> Option<EventId> {
    let raw = field(fields, "id").ok()?;
    std::str::from_utf8(raw)
        .ok()?
        .parse::<uuid::Uuid>()
        .ok()
        .map(EventId::from_uuid)
}
