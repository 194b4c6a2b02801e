//! Event identity: the idempotency key that travels unchanged from the
//! extension to every sink (ARCHITECTURE.md rule 2).

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::wire::WireEvent;

/// Namespace for ids this crate derives (UUIDv5). Changing it would give
/// every retried tokenless event a new id, so it is fixed forever.
const NAMESPACE: Uuid = Uuid::from_u128(0x6b1c_34d1_7f0e_4c1a_9d55_2a0e_c3b1_5e77);

/// Where an [`EventId`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdOrigin {
    /// The client's own UUID, used as is.
    Client,
    /// The client sent a non-UUID string; the id is derived from that string.
    ClientString,
    /// The client sent none; the id is derived from the event's content.
    Content,
}

/// The identity of one event, unique across all classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventId(Uuid);

impl EventId {
    /// The id for `wire`: its `eventId` when that is a UUID; otherwise a
    /// deterministic UUIDv5, so that a retry of the same event gets the same
    /// id and is stored once.
    ///
    /// A non-UUID `eventId` string is hashed on its own (the client meant it
    /// as the key). With no `eventId`, every other field is hashed in a fixed
    /// order; two events identical in every field are then the same event,
    /// which is exactly what a retry looks like.
    pub fn for_wire(wire: &WireEvent) -> (Self, IdOrigin) {
        match wire.event_id.as_deref().map(str::trim) {
            Some(raw) if !raw.is_empty() => match Uuid::parse_str(raw) {
                Ok(uuid) => (Self(uuid), IdOrigin::Client),
                Err(_) => (
                    Self(Uuid::new_v5(&NAMESPACE, format!("client:{raw}").as_bytes())),
                    IdOrigin::ClientString,
                ),
            },
            _ => (Self::from_content(wire), IdOrigin::Content),
        }
    }

    fn from_content(wire: &WireEvent) -> Self {
        let mut canonical = wire.clone();
        canonical.event_id = None;
        // Struct fields serialise in declaration order, so this is canonical.
        let bytes = serde_json::to_vec(&canonical).unwrap_or_default();
        let mut name = Vec::with_capacity(bytes.len() + 8);
        name.extend_from_slice(b"content:");
        name.extend_from_slice(&bytes);
        Self(Uuid::new_v5(&NAMESPACE, &name))
    }

    /// Wraps a UUID read back from storage.
    pub const fn from_uuid(uuid: Uuid) -> Self {
        Self(uuid)
    }

    pub const fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire() -> WireEvent {
        WireEvent {
            event_type: Some("cell_executed".into()),
            email_address: Some("hanako@example.ac.jp".into()),
            cell_id: Some("c1".into()),
            event_time: Some("2026-04-01T10:00:00.000Z".into()),
            ..WireEvent::default()
        }
    }

    #[test]
    fn client_uuid_is_kept() {
        let id = "0b3c4f9e-8a61-4f5e-9c47-2f6f1d9b7a10";
        let w = WireEvent {
            event_id: Some(id.into()),
            ..wire()
        };
        let (event_id, origin) = EventId::for_wire(&w);
        assert_eq!(event_id.to_string(), id);
        assert_eq!(origin, IdOrigin::Client);
    }

    #[test]
    fn uppercase_uuid_means_the_same_event() {
        let lower = WireEvent {
            event_id: Some("0b3c4f9e-8a61-4f5e-9c47-2f6f1d9b7a10".into()),
            ..wire()
        };
        let upper = WireEvent {
            event_id: Some("0B3C4F9E-8A61-4F5E-9C47-2F6F1D9B7A10".into()),
            ..wire()
        };
        assert_eq!(EventId::for_wire(&lower).0, EventId::for_wire(&upper).0);
    }

    #[test]
    fn derived_id_is_stable_across_retries() {
        let (a, origin) = EventId::for_wire(&wire());
        let (b, _) = EventId::for_wire(&wire());
        assert_eq!(a, b);
        assert_eq!(origin, IdOrigin::Content);
        assert_eq!(a.as_uuid().get_version_num(), 5);
    }

    #[test]
    fn derived_id_changes_with_any_field() {
        let base = EventId::for_wire(&wire()).0;
        let later = WireEvent {
            event_time: Some("2026-04-01T10:00:00.001Z".into()),
            ..wire()
        };
        let other_cell = WireEvent {
            cell_id: Some("c2".into()),
            ..wire()
        };
        assert_ne!(base, EventId::for_wire(&later).0);
        assert_ne!(base, EventId::for_wire(&other_cell).0);
    }

    #[test]
    fn non_uuid_client_id_is_hashed_on_its_own() {
        let a = WireEvent {
            event_id: Some("evt-42".into()),
            ..wire()
        };
        let b = WireEvent {
            event_id: Some("evt-42".into()),
            code: Some("print(1)".into()),
            ..wire()
        };
        let (id_a, origin) = EventId::for_wire(&a);
        assert_eq!(origin, IdOrigin::ClientString);
        assert_eq!(id_a, EventId::for_wire(&b).0);
    }

    #[test]
    fn blank_client_id_counts_as_absent() {
        let blank = WireEvent {
            event_id: Some("  ".into()),
            ..wire()
        };
        assert_eq!(EventId::for_wire(&blank), EventId::for_wire(&wire()));
    }
}
