//! Cell Monitor's domain: what the JupyterLab extension sends, what a valid
//! event is, and how a student's dashboard status follows from their events.
//!
//! This crate does no I/O and reads no clock: every function that depends on
//! time takes it as an argument, so servers, tests and replays all agree.
//!
//! * [`wire`]: the extension's JSON, all fields optional, and batch decoding
//!   (an array or a single object; one bad item never spoils the others).
//! * [`event`]: validation per event type into a typed [`Event`], with
//!   errors that name the field.
//! * [`id`]: [`EventId`], the idempotency key (the client's UUID, or a
//!   deterministic UUIDv5 so that retries keep their id).
//! * [`fields`]: validated field newtypes ([`fields::Email`], ...).
//! * [`limits`]: every size bound, in one place.
//! * [`lms`]: classes, instructors, students, teams, assignments, ...
//! * [`status`]: help, significant error, error, active and idle.
//! * [`envelope`]: [`envelope::StreamEvent`], what producers and consumers
//!   of the event stream exchange.
//! * [`live`]: the status updates and alerts published to live dashboards.
//!
//! ```
//! use cellmon_domain::{decode_batch, validate, WireEvent};
//! use time::macros::datetime;
//!
//! let body = br#"[{"eventType":"help","emailAddress":"hanako@example.ac.jp"}]"#;
//! let received_at = datetime!(2026-04-01 10:00 UTC);
//! for item in decode_batch(body)? {
//!     let event = validate(WireEvent::from_item(item)?, received_at)?;
//!     assert_eq!(event.kind.type_name(), "help");
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod envelope;
pub mod event;
pub mod fields;
pub mod id;
pub mod limits;
pub mod live;
pub mod lms;
pub mod status;
pub mod wire;

pub use event::{Event, EventKind, ValidationError, validate};
pub use id::EventId;
pub use wire::{DecodeError, WireEvent, decode_batch};
