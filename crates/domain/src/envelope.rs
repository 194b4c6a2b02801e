//! What travels through the event stream: a validated event and the class
//! it belongs to. Producers (ingest) and consumers (persisters) agree on
//! this type; the bus crate decides how it is laid out in Redis.

use serde::{Deserialize, Serialize};

use crate::event::Event;
use crate::lms::ClassId;

/// The version of [`StreamEvent`]'s encoding. Consumers refuse versions
/// they do not know rather than misread them.
pub const STREAM_FORMAT_VERSION: u32 = 1;

/// One event on its way to the sinks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamEvent {
    pub class_id: ClassId,
    pub event: Event,
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;
    use crate::{WireEvent, validate};

    #[test]
    fn round_trips_through_json() {
        let wire = WireEvent {
            event_type: Some("help".into()),
            email_address: Some("hanako@example.ac.jp".into()),
            team_name: Some("チームA".into()),
            ..WireEvent::default()
        };
        let event = validate(wire, datetime!(2026-04-01 10:00 UTC)).unwrap();
        let envelope = StreamEvent {
            class_id: ClassId(uuid::Uuid::from_u128(7)),
            event,
        };
        let json = serde_json::to_vec(&envelope).unwrap();
        // Times are RFC 3339 strings, readable by any consumer.
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(
            text.contains(r#""received_at":"2026-04-01T10:00:00Z""#),
            "{text}"
        );
        let back: StreamEvent = serde_json::from_slice(&json).unwrap();
        assert_eq!(back, envelope);
    }
}
