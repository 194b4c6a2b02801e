//! What one spool record holds: a [`StreamEvent`] as JSON, as handed to
//! the producer. The frame around it (length, checksum, sequence number)
//! is the spool's own ([`super`]); the spool itself never looks inside.

use cellmon_domain::envelope::StreamEvent;

/// A record that is not an event: a bug, or a file that is not ours. Its
/// checksum held, so it is what was written; retrying cannot help.
#[derive(Debug, thiserror::Error)]
#[error("spool record is not an event")]
pub struct RecordError(#[source] serde_json::Error);

/// The record for `event`.
pub fn encode(event: &StreamEvent) -> Result<Vec<u8>, RecordError> {
    serde_json::to_vec(event).map_err(RecordError)
}

/// The event a record holds.
pub fn decode(record: &[u8]) -> Result<StreamEvent, RecordError> {
    serde_json::from_slice(record).map_err(RecordError)
}
