//! Cell Monitor's storage, reusable by any service that reads or writes
//! the class data.
//!
//! * [`MIGRATOR`]: the Postgres schema (`migrations/`), applied at start-up
//!   by the persister and once per test run into the harness's template.
//! * [`pg`]: the batch writer: one transaction per batch, one set-based
//!   insert per table, `ON CONFLICT DO NOTHING` on the event id.
//! * [`status`]: derived status after a commit (one query per batch), the
//!   stored snapshot, instructor actions.
//! * [`classes`]: classes, their ingest tokens (as digests) and who
//!   teaches them.
//! * [`audit`]: the audit log of admin and instructor actions.
//! * [`roster`]: enrolled students, the CSV import (all or nothing per
//!   file) and the roster with each student's status.
//! * [`messages`]: help conversations between an instructor and a student.
//! * [`influx`]: line protocol for events and the v1 `/write` client.
//! * [`ids`]: row keys derived from natural keys.
//! * [`error`]: [`StoreError`], with [`StoreError::is_transient`] telling a
//!   writer whether to retry or to set the input aside.

pub mod audit;
pub mod classes;
pub mod error;
pub mod ids;
pub mod influx;
pub mod messages;
pub mod pg;
pub mod roster;
pub mod status;

pub use error::StoreError;

/// The schema's migrations, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();
