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

/// The SHA-256 of a token, as stored in `classes.ingest_token_sha256`; the
/// same digest ingest computes for a presented token.
pub fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The stored digest for `token`; an empty token is no token, so a request
/// that presents an empty one can never match a class.
fn stored_digest(token: Option<&str>) -> Option<[u8; 32]> {
    token.filter(|t| !t.is_empty()).map(token_digest)
}

/// Creates the class, or renames it and replaces its token: `None` (or an
/// empty token) removes the token, so no request is attributed to the class
/// by token any more. A token another class already has is refused (unique
/// violation, a non-transient [`StoreError`]).
pub async fn register(
    pool: &PgPool,
    class: ClassId,
    name: &str,
    token: Option<&str>,
) -> Result<(), StoreError> {
    let digest = stored_digest(token);
    sqlx::query(
        "INSERT INTO classes (id, name, ingest_token_sha256) VALUES ($1, $2, $3)
         ON CONFLICT (id) DO UPDATE SET
             name = EXCLUDED.name, ingest_token_sha256 = EXCLUDED.ingest_token_sha256",
    )
    .bind(class.0)
    .bind(name)
    .bind(digest.as_ref().map(<[u8; 32]>::as_slice))
    .execute(pool)
    .await?;
    Ok(())
}

/// The class whose ingest token is `token`, if any.
pub async fn class_for_token(pool: &PgPool, token: &str) -> Result<Option<ClassId>, StoreError> {
    let Some(digest) = stored_digest(Some(token)) else {
        return Ok(None);
    };
    let id: Option<Uuid> =
        sqlx::query_scalar("SELECT id FROM classes WHERE ingest_token_sha256 = $1")
            .bind(digest.as_slice())
            .fetch_optional(pool)
            .await?;
    Ok(id.map(ClassId))
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
