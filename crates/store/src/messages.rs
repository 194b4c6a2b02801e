//! Help conversations: 1:1 messages between an instructor and a student of
//! a class the instructor teaches. A thread is (class, instructor, student);
//! message ids increase with time and are the paging cursor.
//!
//! Every function is one statement. Callers authorize the person asking
//! (the instructor teaches the class, the student is who they claim); the
//! store still refuses to create a message in a thread that cannot exist.

use cellmon_domain::event::StudentKey;
use cellmon_domain::fields::Email;
use cellmon_domain::lms::{ClassId, StudentId};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::error::StoreError;
use crate::ids;

/// The longest message body, in characters (the schema checks it too).
pub const MAX_BODY_CHARS: usize = 4000;
/// The most messages one page returns.
pub const MAX_PAGE: i64 = 200;

/// Which side of a thread wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sender {
    Instructor,
    Student,
}

impl Sender {
    /// The form stored in `direct_messages.sender` (and sent on the wire).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Instructor => "instructor",
            Self::Student => "student",
        }
    }

    /// The other side: the recipient of what this side sends.
    pub fn other(self) -> Self {
        match self {
            Self::Instructor => Self::Student,
            Self::Student => Self::Instructor,
        }
    }
}

/// How `direct_messages.sender` is read back.
impl TryFrom<String> for Sender {
    type Error = StoreError;

    fn try_from(text: String) -> Result<Self, StoreError> {
        match text.as_str() {
            "instructor" => Ok(Self::Instructor),
            "student" => Ok(Self::Student),
            other => Err(StoreError::Corrupt(format!("message sender {other:?}"))),
        }
    }
}

/// One stored message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct DirectMessage {
    pub id: i64,
    #[sqlx(try_from = "Uuid")]
    pub class_id: ClassId,
    pub instructor_id: Uuid,
    #[sqlx(try_from = "Uuid")]
    pub student_id: StudentId,
    #[sqlx(try_from = "String")]
    pub sender: Sender,
    pub body: String,
    #[serde(with = "time::serde::rfc3339")]
    pub sent_at: OffsetDateTime,
    /// When the recipient read it.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub read_at: Option<OffsetDateTime>,
}

/// An instructor's thread with unread messages from the student.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct UnreadThread {
    #[sqlx(try_from = "Uuid")]
    pub class_id: ClassId,
    #[sqlx(try_from = "Uuid")]
    pub student_id: StudentId,
    pub unread: i64,
    /// The newest unread message (what to mark read up to).
    pub newest_id: i64,
}

/// A student's thread with unread messages from one instructor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct UnreadFromInstructor {
    pub instructor_id: Uuid,
    pub instructor_name: String,
    pub unread: i64,
    /// The newest unread message (what to mark read up to).
    pub newest_id: i64,
}

/// Why a message body was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("message is empty")]
    Empty,
    #[error("message is {chars} characters long; at most {MAX_BODY_CHARS} are allowed")]
    TooLong { chars: usize },
    #[error("message contains a NUL character")]
    Nul,
}

/// The body to store: `body` trimmed, refused if that is empty, longer than
/// [`MAX_BODY_CHARS`] characters, or contains NUL (which Postgres text
/// cannot hold). Line breaks and tabs inside are kept.
pub fn check_body(body: &str) -> Result<&str, BodyError> {
    let trimmed = body.trim();
    if trimmed.is_empty() {
        return Err(BodyError::Empty);
    }
    if trimmed.contains('\0') {
        return Err(BodyError::Nul);
    }
    // Bytes bound characters from above: count only when it can matter.
    if trimmed.len() > MAX_BODY_CHARS {
        let chars = trimmed.chars().count();
        if chars > MAX_BODY_CHARS {
            return Err(BodyError::TooLong { chars });
        }
    }
    Ok(trimmed)
}

fn page_size(limit: i64) -> i64 {
    limit.clamp(1, MAX_PAGE)
}

/// The exclusive upper bound of a page's ids. No cursor is `i64::MAX`, so
/// every page is one `id < $n` range the index serves, even under a cached
/// generic plan (which an `$n IS NULL OR ...` would defeat).
fn cursor(before: Option<i64>) -> i64 {
    before.unwrap_or(i64::MAX)
}

/// The columns of a [`DirectMessage`], for queries written as literals.
macro_rules! message_columns {
    () => {
        "id, class_id, instructor_id, student_id, sender, body, sent_at, read_at"
    };
}

/// Stores a message of the thread (class, instructor, student) and returns
/// it; `None`, storing nothing, when the student is not in that class or the
/// instructor does not teach it. `body` should be [`check_body`]'s output;
/// Postgres refuses an empty or too long one, or one with NUL, as a
/// non-transient error.
pub async fn send(
    pool: &PgPool,
    class: ClassId,
    instructor: Uuid,
    student: StudentId,
    sender: Sender,
    body: &str,
) -> Result<Option<DirectMessage>, StoreError> {
    // One statement: the checks and the insert see the same snapshot.
    let message = sqlx::query_as(concat!(
        "INSERT INTO direct_messages (class_id, instructor_id, student_id, sender, body)
         SELECT $1::uuid, $2::uuid, $3::uuid, $4::text, $5::text
         WHERE EXISTS (SELECT 1 FROM students WHERE id = $3 AND class_id = $1)
           AND EXISTS (SELECT 1 FROM class_instructors
                       WHERE class_id = $1 AND instructor_id = $2)
         RETURNING ",
        message_columns!()
    ))
    .bind(class.0)
    .bind(instructor)
    .bind(student.0)
    .bind(sender.as_str())
    .bind(body)
    .fetch_optional(pool)
    .await?;
    Ok(message)
}

/// A page of one thread, newest first: at most `limit` (clamped to
/// 1..=[`MAX_PAGE`]) messages with ids below `before` (all when `None`).
/// The next page is `before = ` the last id returned.
pub async fn history(
    pool: &PgPool,
    class: ClassId,
    instructor: Uuid,
    student: StudentId,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<DirectMessage>, StoreError> {
    let messages = sqlx::query_as(concat!(
        "SELECT ",
        message_columns!(),
        " FROM direct_messages
         WHERE student_id = $3 AND instructor_id = $2 AND class_id = $1
           AND id < $4
         ORDER BY id DESC
         LIMIT $5"
    ))
    .bind(class.0)
    .bind(instructor)
    .bind(student.0)
    .bind(cursor(before))
    .bind(page_size(limit))
    .fetch_all(pool)
    .await?;
    Ok(messages)
}

/// A page of a student's threads in `class` with any instructor, newest
/// first; paged like [`history`]. The student's view of their help
/// conversations.
pub async fn student_history(
    pool: &PgPool,
    class: ClassId,
    student: StudentId,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<DirectMessage>, StoreError> {
    let messages = sqlx::query_as(concat!(
        "SELECT ",
        message_columns!(),
        " FROM direct_messages
         WHERE student_id = $2 AND class_id = $1
           AND id < $3
         ORDER BY id DESC
         LIMIT $4"
    ))
    .bind(class.0)
    .bind(student.0)
    .bind(cursor(before))
    .bind(page_size(limit))
    .fetch_all(pool)
    .await?;
    Ok(messages)
}

/// Marks as read, for `reader`, the thread's messages the other side sent
/// with ids up to `up_to` that were unread; returns how many. Up to an id,
/// not "all", so a message that arrives while the reader looks stays unread.
pub async fn mark_read(
    pool: &PgPool,
    class: ClassId,
    instructor: Uuid,
    student: StudentId,
    reader: Sender,
    up_to: i64,
) -> Result<u64, StoreError> {
    let done = sqlx::query(
        "UPDATE direct_messages SET read_at = now()
         WHERE student_id = $3 AND instructor_id = $2 AND class_id = $1
           AND sender = $4 AND id <= $5 AND read_at IS NULL",
    )
    .bind(class.0)
    .bind(instructor)
    .bind(student.0)
    .bind(reader.other().as_str())
    .bind(up_to)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// The instructor's threads with unread messages from students, newest
/// first, in the classes they still teach (a former instructor of a class
/// sees none of its students).
pub async fn unread_for_instructor(
    pool: &PgPool,
    instructor: Uuid,
) -> Result<Vec<UnreadThread>, StoreError> {
    let threads = sqlx::query_as(
        "SELECT m.class_id, m.student_id, count(*) AS unread, max(m.id) AS newest_id
         FROM direct_messages m
         JOIN class_instructors ci
           ON ci.class_id = m.class_id AND ci.instructor_id = m.instructor_id
         WHERE m.instructor_id = $1 AND m.sender = 'student' AND m.read_at IS NULL
         GROUP BY m.class_id, m.student_id
         ORDER BY newest_id DESC",
    )
    .bind(instructor)
    .fetch_all(pool)
    .await?;
    Ok(threads)
}

/// The student's threads in `class` with unread messages from instructors,
/// newest first. Messages from an instructor who no longer teaches the
/// class are included: they were sent to the student, who may still read
/// them.
pub async fn unread_for_student(
    pool: &PgPool,
    class: ClassId,
    student: StudentId,
) -> Result<Vec<UnreadFromInstructor>, StoreError> {
    let threads = sqlx::query_as(
        "SELECT m.instructor_id, i.name AS instructor_name, count(*) AS unread,
                max(m.id) AS newest_id
         FROM direct_messages m
         JOIN instructors i ON i.id = m.instructor_id
         WHERE m.student_id = $2 AND m.class_id = $1
           AND m.sender = 'instructor' AND m.read_at IS NULL
         GROUP BY m.instructor_id, i.name
         ORDER BY newest_id DESC",
    )
    .bind(class.0)
    .bind(student.0)
    .fetch_all(pool)
    .await?;
    Ok(threads)
}

/// The unread messages students sent to the instructor, in classes they
/// still teach, oldest first, at most `limit` (clamped to 1..=[`MAX_PAGE`]):
/// what a newly connected dashboard is handed; [`unread_for_instructor`]
/// has the full counts.
pub async fn unread_messages_for_instructor(
    pool: &PgPool,
    instructor: Uuid,
    limit: i64,
) -> Result<Vec<DirectMessage>, StoreError> {
    let messages = sqlx::query_as(concat!(
        "SELECT ",
        message_columns!(),
        " FROM direct_messages m
         WHERE instructor_id = $1 AND sender = 'student' AND read_at IS NULL
           AND EXISTS (SELECT 1 FROM class_instructors ci
                       WHERE ci.class_id = m.class_id AND ci.instructor_id = $1)
         ORDER BY id
         LIMIT $2"
    ))
    .bind(instructor)
    .bind(page_size(limit))
    .fetch_all(pool)
    .await?;
    Ok(messages)
}

/// The student of `class` identified by `email` (compared as the writer
/// stores it: trimmed and lower-cased), if they have appeared in the class.
/// A malformed address names no student.
pub async fn student_by_email(
    pool: &PgPool,
    class: ClassId,
    email: &str,
) -> Result<Option<StudentId>, StoreError> {
    let Ok(email) = Email::parse(email) else {
        return Ok(None);
    };
    let id = ids::student(class, &StudentKey::Email(email));
    let found: Option<Uuid> =
        sqlx::query_scalar("SELECT id FROM students WHERE id = $1 AND class_id = $2")
            .bind(id.0)
            .bind(class.0)
            .fetch_optional(pool)
            .await?;
    Ok(found.map(StudentId))
}
