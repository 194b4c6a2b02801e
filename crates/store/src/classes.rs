//! Classes, their ingest tokens and who teaches them: what the gateway
//! needs to attribute a token to a class and to authorize an instructor.
//!
//! Tokens are stored as SHA-256 digests only (as ingest keeps them), so the
//! database never holds a usable token.

use cellmon_domain::lms::ClassId;
use sha2::{Digest as _, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::StoreError;

/// The SHA-256 of a token, as stored in `class_ingest_tokens`; the same
/// digest ingest computes for a presented token.
pub fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The stored digest for `token`; an empty token is no token, so a request
/// that presents an empty one can never match a class.
fn stored_digest(token: Option<&str>) -> Option<[u8; 32]> {
    token.filter(|t| !t.is_empty()).map(token_digest)
}

/// Creates the class, or renames it and replaces its tokens: every token it
/// had stops working at once, and `token` (if given and not empty) becomes
/// its only one. A token another class already has is refused (unique
/// violation, a non-transient [`StoreError`]). For a rotation that keeps
/// the old token working for a while, see the control-plane API.
pub async fn register(
    pool: &PgPool,
    class: ClassId,
    name: &str,
    token: Option<&str>,
) -> Result<(), StoreError> {
    let digest = stored_digest(token);
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO classes (id, name) VALUES ($1, $2)
         ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name",
    )
    .bind(class.0)
    .bind(name)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM class_ingest_tokens WHERE class_id = $1")
        .bind(class.0)
        .execute(&mut *tx)
        .await?;
    if let Some(digest) = digest {
        sqlx::query("INSERT INTO class_ingest_tokens (token_sha256, class_id) VALUES ($1, $2)")
            .bind(digest.as_slice())
            .bind(class.0)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// The class whose ingest token is `token`, if the token is still valid
/// (not past the grace period of a rotation).
pub async fn class_for_token(pool: &PgPool, token: &str) -> Result<Option<ClassId>, StoreError> {
    let Some(digest) = stored_digest(Some(token)) else {
        return Ok(None);
    };
    let id: Option<Uuid> = sqlx::query_scalar(
        "SELECT class_id FROM class_ingest_tokens
         WHERE token_sha256 = $1 AND (expires_at IS NULL OR expires_at > now())",
    )
    .bind(digest.as_slice())
    .fetch_optional(pool)
    .await?;
    Ok(id.map(ClassId))
}

/// Adds `token` as the class's newest ingest token and lets every older
/// one work for `grace` more (an older token that already expires sooner
/// keeps its earlier time), so extensions running in a lesson are not cut
/// off. Returns false when there is no such class. A token any class
/// already has is refused (unique violation).
pub async fn rotate_token(
    pool: &PgPool,
    class: ClassId,
    token: &str,
    grace: std::time::Duration,
) -> Result<bool, StoreError> {
    let Some(digest) = stored_digest(Some(token)) else {
        return Ok(false);
    };
    let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
    let mut tx = pool.begin().await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM classes WHERE id = $1 FOR UPDATE)")
            .bind(class.0)
            .fetch_one(&mut *tx)
            .await?;
    if !exists {
        return Ok(false);
    }
    sqlx::query(
        "UPDATE class_ingest_tokens
         SET expires_at = LEAST(COALESCE(expires_at, 'infinity'),
                                now() + make_interval(secs => $2::double precision / 1000))
         WHERE class_id = $1",
    )
    .bind(class.0)
    .bind(grace_ms)
    .execute(&mut *tx)
    .await?;
    sqlx::query("INSERT INTO class_ingest_tokens (token_sha256, class_id) VALUES ($1, $2)")
        .bind(digest.as_slice())
        .bind(class.0)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(true)
}

/// One valid ingest token: its digest, its class and when it stops
/// working (none: until rotated).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TokenGrant {
    pub token_sha256: Vec<u8>,
    pub class_id: Uuid,
    pub expires_at: Option<time::OffsetDateTime>,
}

/// Every ingest token still valid now (what ingest caches).
pub async fn valid_tokens(pool: &PgPool) -> Result<Vec<TokenGrant>, StoreError> {
    let grants = sqlx::query_as(
        "SELECT token_sha256, class_id, expires_at FROM class_ingest_tokens
         WHERE expires_at IS NULL OR expires_at > now()",
    )
    .fetch_all(pool)
    .await?;
    Ok(grants)
}

/// Creates the instructor, or updates their e-mail and name. An e-mail
/// another instructor already has is refused (unique violation).
pub async fn add_instructor(
    pool: &PgPool,
    id: Uuid,
    email: &str,
    name: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO instructors (id, email, name) VALUES ($1, $2, $3)
         ON CONFLICT (id) DO UPDATE SET email = EXCLUDED.email, name = EXCLUDED.name",
    )
    .bind(id)
    .bind(email)
    .bind(name)
    .execute(pool)
    .await?;
    Ok(())
}

/// Makes `instructor` teach `class`; assigning twice changes nothing. Both
/// must exist (foreign keys).
pub async fn assign(pool: &PgPool, class: ClassId, instructor: Uuid) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO class_instructors (class_id, instructor_id) VALUES ($1, $2)
         ON CONFLICT DO NOTHING",
    )
    .bind(class.0)
    .bind(instructor)
    .execute(pool)
    .await?;
    Ok(())
}

/// Whether `instructor` teaches `class`.
pub async fn teaches(pool: &PgPool, instructor: Uuid, class: ClassId) -> Result<bool, StoreError> {
    let teaches: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM class_instructors WHERE class_id = $1 AND instructor_id = $2)",
    )
    .bind(class.0)
    .bind(instructor)
    .fetch_one(pool)
    .await?;
    Ok(teaches)
}

/// The instructors of `class`, by id.
pub async fn instructors_of(pool: &PgPool, class: ClassId) -> Result<Vec<Uuid>, StoreError> {
    let ids = sqlx::query_scalar(
        "SELECT instructor_id FROM class_instructors WHERE class_id = $1 ORDER BY instructor_id",
    )
    .bind(class.0)
    .fetch_all(pool)
    .await?;
    Ok(ids)
}

/// Most classes one page may hold.
pub const MAX_CLASS_PAGE: i64 = 200;

/// A class as the control plane shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct ClassRecord {
    /// The paging cursor.
    pub id: Uuid,
    pub name: String,
    /// 1 to 255 (schema check).
    pub consecutive_error_threshold: i16,
    /// Above 0 (schema check).
    pub idle_after_seconds: i32,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: time::OffsetDateTime,
}

/// The settings of a class to create, or the changes to make to one (a
/// `None` keeps the stored value).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClassSettings {
    pub name: Option<String>,
    pub consecutive_error_threshold: Option<i16>,
    pub idle_after_seconds: Option<i32>,
}

const CLASS_COLUMNS: &str = "id, name, consecutive_error_threshold, idle_after_seconds, created_at";

/// Creates class `id` with `settings` (a missing name is refused by the
/// schema; missing numbers take the schema's defaults) and its audit entry
/// `class.create`, in one transaction. Values outside the schema's limits
/// are refused (check violation, a non-transient [`StoreError`]).
pub async fn create_class(
    pool: &PgPool,
    actor: Option<Uuid>,
    id: ClassId,
    settings: &ClassSettings,
) -> Result<ClassRecord, StoreError> {
    let mut tx = pool.begin().await?;
    let record = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO classes (id, name, consecutive_error_threshold, idle_after_seconds)
         VALUES ($1, $2, coalesce($3, 3), coalesce($4, 300)) RETURNING {CLASS_COLUMNS}"
    )))
    .bind(id.0)
    .bind(settings.name.as_deref())
    .bind(settings.consecutive_error_threshold)
    .bind(settings.idle_after_seconds)
    .fetch_one(&mut *tx)
    .await?;
    crate::audit::record(&mut *tx, &class_entry(actor, "class.create", id)).await?;
    tx.commit().await?;
    Ok(record)
}

fn class_entry(
    actor: Option<Uuid>,
    action: &'static str,
    class: ClassId,
) -> crate::audit::AuditEntry<'static> {
    crate::audit::AuditEntry {
        actor,
        action,
        class: Some(class),
        target: Some(class.0.to_string()),
        detail: serde_json::json!({}),
    }
}

/// The class, if it exists.
pub async fn get_class(pool: &PgPool, id: ClassId) -> Result<Option<ClassRecord>, StoreError> {
    let record = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {CLASS_COLUMNS} FROM classes WHERE id = $1"
    )))
    .bind(id.0)
    .fetch_optional(pool)
    .await?;
    Ok(record)
}

/// Applies `changes` to the class, with an audit entry `class.update`;
/// none when there is no such class.
pub async fn update_class(
    pool: &PgPool,
    actor: Option<Uuid>,
    id: ClassId,
    changes: &ClassSettings,
) -> Result<Option<ClassRecord>, StoreError> {
    let mut tx = pool.begin().await?;
    let record: Option<ClassRecord> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE classes SET name = coalesce($2, name),
             consecutive_error_threshold = coalesce($3, consecutive_error_threshold),
             idle_after_seconds = coalesce($4, idle_after_seconds)
         WHERE id = $1 RETURNING {CLASS_COLUMNS}"
    )))
    .bind(id.0)
    .bind(changes.name.as_deref())
    .bind(changes.consecutive_error_threshold)
    .bind(changes.idle_after_seconds)
    .fetch_optional(&mut *tx)
    .await?;
    if record.is_some() {
        crate::audit::record(&mut *tx, &class_entry(actor, "class.update", id)).await?;
    }
    tx.commit().await?;
    Ok(record)
}

/// Deletes the class and everything of it (cascade), with an audit entry
/// `class.delete`; false when there is no such class.
pub async fn delete_class(
    pool: &PgPool,
    actor: Option<Uuid>,
    id: ClassId,
) -> Result<bool, StoreError> {
    let mut tx = pool.begin().await?;
    let deleted = sqlx::query("DELETE FROM classes WHERE id = $1")
        .bind(id.0)
        .execute(&mut *tx)
        .await?
        .rows_affected()
        > 0;
    if deleted {
        crate::audit::record(&mut *tx, &class_entry(actor, "class.delete", id)).await?;
    }
    tx.commit().await?;
    Ok(deleted)
}

/// Classes by id after `after` if given, at most `limit` (1 to
/// [`MAX_CLASS_PAGE`]).
pub async fn page_classes(
    pool: &PgPool,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<ClassRecord>, StoreError> {
    let records = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {CLASS_COLUMNS} FROM classes WHERE ($1::uuid IS NULL OR id > $1)
         ORDER BY id LIMIT $2"
    )))
    .bind(after)
    .bind(limit.clamp(1, MAX_CLASS_PAGE))
    .fetch_all(pool)
    .await?;
    Ok(records)
}

/// Stops `instructor` teaching `class`; false when they did not.
pub async fn unassign(pool: &PgPool, class: ClassId, instructor: Uuid) -> Result<bool, StoreError> {
    let removed =
        sqlx::query("DELETE FROM class_instructors WHERE class_id = $1 AND instructor_id = $2")
            .bind(class.0)
            .bind(instructor)
            .execute(pool)
            .await?
            .rows_affected()
            > 0;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_plain_sha256() {
        // FIPS 180-2 test vector for "abc".
        let hex: String = token_digest("abc")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            hex,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(stored_digest(Some("")), None);
        assert_eq!(stored_digest(None), None);
    }
}
