//! Every bound the domain enforces, in one place (ARCHITECTURE.md rule 6).
//!
//! Servers may apply tighter limits of their own (body size, rate), but never
//! looser ones: a value that passes these checks is safe to store and to show.

/// Most events one request may carry. The extension sends one per request;
/// batching clients and replays send more.
pub const MAX_BATCH_EVENTS: usize = 1_000;

/// Most bytes of a request body, after any decompression.
pub const MAX_DECODED_BODY_BYTES: usize = 16 * 1024 * 1024;

/// Deepest nesting of arrays and objects in a request body. The wire format
/// is flat (depth 2 for a batch); the slack is for unknown fields.
pub const MAX_JSON_DEPTH: usize = 32;

/// Most bytes of a cell's source code. Notebook cells are rarely past a few
/// kilobytes; anything larger is almost always pasted data.
pub const MAX_CODE_BYTES: usize = 256 * 1024;

/// Most bytes of a cell's text output kept with an execution.
pub const MAX_RESULT_BYTES: usize = 64 * 1024;

/// Most bytes of an error message (Python tracebacks can be long).
pub const MAX_ERROR_MESSAGE_BYTES: usize = 16 * 1024;

/// Most bytes of an e-mail address (RFC 5321 path limit).
pub const MAX_EMAIL_BYTES: usize = 254;

/// Most characters of a display name or team name.
pub const MAX_NAME_CHARS: usize = 200;

/// Most bytes of a notebook path.
pub const MAX_PATH_BYTES: usize = 1_024;

/// Most bytes of a client-made identifier (cell id, user id, non-UUID event id).
pub const MAX_ID_BYTES: usize = 128;

/// Most bytes of an event type name.
pub const MAX_EVENT_TYPE_BYTES: usize = 64;

/// Largest accepted `cellIndex` and `executionCount`.
pub const MAX_COUNTER: i64 = 1_000_000_000;

/// Longest accepted `executionDurationMs`: one week.
pub const MAX_DURATION_MS: f64 = 7.0 * 24.0 * 3_600_000.0;
