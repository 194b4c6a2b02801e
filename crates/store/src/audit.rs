//! The audit log: who did what to which class, and when.
//!
//! An entry is written in the same transaction as the action it records,
//! so an action is never done without its entry, nor recorded without
//! being done. Entries hold ids and action names; a student's personal data
//! (e-mail, name, code) never goes into one, so erasing a student leaves
//! the log as it is.

use cellmon_domain::lms::ClassId;
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::StoreError;

/// Most entries one page may hold.
pub const MAX_PAGE: i64 = 200;

/// An action to record.
#[derive(Debug, Clone)]
pub struct AuditEntry<'a> {
    /// The account that acted; none for the command line (`create-admin`).
    pub actor: Option<Uuid>,
    /// A stable dotted name, e.g. `class.create`, `roster.import`.
    pub action: &'a str,
    /// The class acted on, if any.
    pub class: Option<ClassId>,
    /// The object acted on (an id), if any.
    pub target: Option<String>,
    /// Anything else worth keeping (counts, changed fields), never
    /// personal data of students.
    pub detail: serde_json::Value,
}

/// Records `entry`; pass the action's transaction.
pub async fn record<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    entry: &AuditEntry<'_>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO audit_log (actor_id, action, class_id, target, detail)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(entry.actor)
    .bind(entry.action)
    .bind(entry.class.map(|c| c.0))
    .bind(entry.target.as_deref())
    .bind(&entry.detail)
    .execute(executor)
    .await?;
    Ok(())
}

/// A recorded entry.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    /// Increases with time; the paging cursor.
    pub id: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub at: time::OffsetDateTime,
    pub actor_id: Option<Uuid>,
    pub action: String,
    pub class_id: Option<Uuid>,
    pub target: Option<String>,
    pub detail: serde_json::Value,
}

/// Entries newest first, older than `before` (an entry id) if given, at
/// most `limit` (1 to [`MAX_PAGE`]); only those of `class` if given.
pub async fn page(
    pool: &PgPool,
    class: Option<ClassId>,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<AuditRecord>, StoreError> {
    let records = sqlx::query_as(
        "SELECT id, at, actor_id, action, class_id, target, detail FROM audit_log
         WHERE ($1::uuid IS NULL OR class_id = $1) AND ($2::bigint IS NULL OR id < $2)
         ORDER BY id DESC LIMIT $3",
    )
    .bind(class.map(|c| c.0))
    .bind(before)
    .bind(limit.clamp(1, MAX_PAGE))
    .fetch_all(pool)
    .await?;
    Ok(records)
}
