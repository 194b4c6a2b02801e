//! A class's roster: the students a course admin put on it, one at a time
//! or from a CSV file, and each one's status.
//!
//! An enrolled student's row has the id the persister derives from the
//! class and the (normalized) e-mail ([`ids::student`]), so the student's
//! events land on the same row whether they come before or after the
//! enrollment. Teams are upserted with the persister's id ([`ids::team`])
//! and `ON CONFLICT DO NOTHING`, exactly as the persister does.
//!
//! An import is all-or-nothing: the file is checked line by line first
//! (every bad line reported with its line number), and only a file with no
//! bad line is written, in one transaction with its audit entry.

use cellmon_domain::event::StudentKey;
use cellmon_domain::fields::{DisplayName, Email};
use cellmon_domain::lms::{ClassId, StudentId};
use serde::Serialize;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::audit::{self, AuditEntry};
use crate::error::StoreError;
use crate::ids;

/// Most data lines one import file may hold.
pub const MAX_IMPORT_LINES: usize = 5_000;
/// Most bytes one import file may hold: 5,000 lines of a long e-mail, a
/// long Japanese name and a team name fit with room to spare.
pub const MAX_IMPORT_BYTES: usize = 2 * 1024 * 1024;
/// Most students one roster page may hold.
pub const MAX_PAGE: i64 = 500;
/// Most line errors one refused import reports (the rest are counted).
pub const MAX_REPORTED_ERRORS: usize = 100;

/// One student to enroll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RosterEntry {
    pub email: Email,
    pub name: DisplayName,
    /// None: no team (an empty `team` cell clears the student's team).
    pub team: Option<DisplayName>,
}

impl RosterEntry {
    /// The student row's id, the one the persister derives.
    pub fn student_id(&self, class: ClassId) -> StudentId {
        ids::student(class, &StudentKey::Email(self.email.clone()))
    }
}

/// What an enrollment did to the student's row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// Not enrolled before (the row may have existed from events).
    Created,
    /// Enrolled before, with another name or team.
    Updated,
    /// Enrolled before with the same name and team.
    Unchanged,
}

/// What an import did, line by line summed up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ImportCounts {
    pub created: u32,
    pub updated: u32,
    pub unchanged: u32,
}

/// One bad line of an import file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LineError {
    /// 1-based, counting the header as line 1.
    pub line: u64,
    /// The column at fault, if one is.
    pub field: Option<&'static str>,
    pub message: String,
}

/// Why an import file was refused; nothing of it was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    #[error("the file is {len} bytes; at most {max} are allowed")]
    TooLarge { len: usize, max: usize },
    #[error("the file has more than {max} data lines")]
    TooManyLines { max: usize },
    #[error("the header must be `email,name,team` or `email,name`")]
    BadHeader,
    #[error("the file has no data lines")]
    Empty,
    #[error("{total} lines are invalid")]
    Lines {
        /// The first [`MAX_REPORTED_ERRORS`] bad lines, in file order.
        errors: Vec<LineError>,
        total: usize,
    },
}

/// Parses an import file: a header `email,name,team` (or `email,name`),
/// UTF-8 with or without a byte-order mark. Checks every line and reports
/// every bad one (up to [`MAX_REPORTED_ERRORS`]): bad e-mail, missing or
/// too long name or team, an e-mail twice in the file, invalid UTF-8, a
/// wrong number of columns.
pub fn parse_csv(bytes: &[u8]) -> Result<Vec<RosterEntry>, ImportError> {
    if bytes.len() > MAX_IMPORT_BYTES {
        return Err(ImportError::TooLarge {
            len: bytes.len(),
            max: MAX_IMPORT_BYTES,
        });
    }
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(bytes);
    let mut records = reader.byte_records();
    let columns = match records.next() {
        Some(Ok(header)) => header_columns(&header)?,
        _ => return Err(ImportError::BadHeader),
    };
    let mut entries = Vec::new();
    let mut errors = Vec::new();
    let mut total = 0usize;
    let mut seen = std::collections::HashMap::new();
    let mut line_count = 0usize;
    for (index, record) in records.enumerate() {
        line_count += 1;
        if line_count > MAX_IMPORT_LINES {
            return Err(ImportError::TooManyLines {
                max: MAX_IMPORT_LINES,
            });
        }
        // Line 1 is the header; quoted fields may span lines, so prefer the
        // reader's own position when it has one.
        let fallback = index as u64 + 2;
        let outcome = match record {
            Ok(record) => {
                let line = record.position().map_or(fallback, |p| p.line());
                (line, parse_line(&record, columns))
            }
            Err(error) => {
                let line = error.position().map_or(fallback, |p| p.line());
                (line, Err((None, format!("not readable as CSV: {error}"))))
            }
        };
        match outcome {
            (line, Ok(entry)) => {
                if let Some(first) = seen.insert(entry.email.as_str().to_owned(), line) {
                    total += 1;
                    push_error(
                        &mut errors,
                        line,
                        Some("email"),
                        format!("the same e-mail is on line {first}"),
                    );
                } else {
                    entries.push(entry);
                }
            }
            (line, Err((field, message))) => {
                total += 1;
                push_error(&mut errors, line, field, message);
            }
        }
    }
    if total > 0 {
        return Err(ImportError::Lines { errors, total });
    }
    if entries.is_empty() {
        return Err(ImportError::Empty);
    }
    Ok(entries)
}

fn push_error(
    errors: &mut Vec<LineError>,
    line: u64,
    field: Option<&'static str>,
    message: String,
) {
    if errors.len() < MAX_REPORTED_ERRORS {
        errors.push(LineError {
            line,
            field,
            message,
        });
    }
}

/// 3 with a team column, 2 without.
fn header_columns(header: &csv::ByteRecord) -> Result<usize, ImportError> {
    let names: Vec<String> = header
        .iter()
        .map(|f| String::from_utf8_lossy(f).trim().to_ascii_lowercase())
        .collect();
    match names
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["email", "name", "team"] => Ok(3),
        ["email", "name"] => Ok(2),
        _ => Err(ImportError::BadHeader),
    }
}

type FieldProblem = (Option<&'static str>, String);

fn parse_line(record: &csv::ByteRecord, columns: usize) -> Result<RosterEntry, FieldProblem> {
    if record.len() != columns {
        return Err((
            None,
            format!("has {} columns; the header has {columns}", record.len()),
        ));
    }
    let text = |i: usize, field: &'static str| -> Result<&str, FieldProblem> {
        std::str::from_utf8(record.get(i).unwrap_or_default())
            .map_err(|_| (Some(field), "is not valid UTF-8".to_owned()))
    };
    let email = Email::parse(text(0, "email")?).map_err(|e| (Some("email"), format!("{e}")))?;
    let name = DisplayName::parse(text(1, "name")?).map_err(|e| (Some("name"), format!("{e}")))?;
    let team = if columns == 3 {
        let raw = text(2, "team")?;
        if raw.trim().is_empty() {
            None
        } else {
            Some(DisplayName::parse(raw).map_err(|e| (Some("team"), format!("{e}")))?)
        }
    } else {
        None
    };
    Ok(RosterEntry { email, name, team })
}

#[derive(sqlx::FromRow)]
struct Existing {
    name: Option<String>,
    team_id: Option<Uuid>,
    enrolled: bool,
}

/// Enrolls one student in `tx`, creating or updating their row.
async fn upsert(
    tx: &mut Transaction<'_, Postgres>,
    class: ClassId,
    entry: &RosterEntry,
) -> Result<(StudentId, Change), StoreError> {
    let student = entry.student_id(class);
    let team = entry.team.as_ref().map(|t| ids::team(class, t.as_str()));
    if let (Some(team_id), Some(team)) = (team, entry.team.as_ref()) {
        sqlx::query(
            "INSERT INTO teams (id, class_id, name) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(team_id)
        .bind(class.0)
        .bind(team.as_str())
        .execute(&mut **tx)
        .await?;
    }
    let existing: Option<Existing> = sqlx::query_as(
        "SELECT s.name, s.team_id, (e.student_id IS NOT NULL) AS enrolled
         FROM students s LEFT JOIN enrollments e ON e.student_id = s.id
         WHERE s.id = $1 FOR UPDATE OF s",
    )
    .bind(student.0)
    .fetch_optional(&mut **tx)
    .await?;
    let change = match &existing {
        Some(row) if row.enrolled => {
            if row.name.as_deref() == Some(entry.name.as_str()) && row.team_id == team {
                return Ok((student, Change::Unchanged));
            }
            Change::Updated
        }
        _ => Change::Created,
    };
    sqlx::query(
        "INSERT INTO students (id, class_id, student_key, email, name, team_id)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (id) DO UPDATE SET email = EXCLUDED.email, name = EXCLUDED.name,
                                        team_id = EXCLUDED.team_id",
    )
    .bind(student.0)
    .bind(class.0)
    .bind(ids::student_key_text(&StudentKey::Email(
        entry.email.clone(),
    )))
    .bind(entry.email.as_str())
    .bind(entry.name.as_str())
    .bind(team)
    .execute(&mut **tx)
    .await?;
    sqlx::query("INSERT INTO enrollments (student_id) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(student.0)
        .execute(&mut **tx)
        .await?;
    Ok((student, change))
}

/// Enrolls one student in `class` (which must exist: foreign key), with
/// an audit entry `roster.enroll` naming the student's id only.
pub async fn enroll(
    pool: &PgPool,
    actor: Option<Uuid>,
    class: ClassId,
    entry: &RosterEntry,
) -> Result<(StudentId, Change), StoreError> {
    let mut tx = pool.begin().await?;
    let (student, change) = upsert(&mut tx, class, entry).await?;
    audit::record(
        &mut *tx,
        &AuditEntry {
            actor,
            action: "roster.enroll",
            class: Some(class),
            target: Some(student.0.to_string()),
            detail: serde_json::json!({ "change": change }),
        },
    )
    .await?;
    tx.commit().await?;
    Ok((student, change))
}

/// Enrolls every entry of a parsed file in one transaction, with one audit
/// entry `roster.import` holding the counts: all or nothing.
pub async fn import(
    pool: &PgPool,
    actor: Option<Uuid>,
    class: ClassId,
    entries: &[RosterEntry],
) -> Result<ImportCounts, StoreError> {
    let mut tx = pool.begin().await?;
    let mut counts = ImportCounts::default();
    for entry in entries {
        match upsert(&mut tx, class, entry).await?.1 {
            Change::Created => counts.created += 1,
            Change::Updated => counts.updated += 1,
            Change::Unchanged => counts.unchanged += 1,
        }
    }
    audit::record(
        &mut *tx,
        &AuditEntry {
            actor,
            action: "roster.import",
            class: Some(class),
            target: None,
            detail: serde_json::json!({
                "created": counts.created,
                "updated": counts.updated,
                "unchanged": counts.unchanged,
            }),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(counts)
}

/// Takes `student` off the roster of `class`; the events they sent stay.
/// Returns false when they were not enrolled in it.
pub async fn remove(
    pool: &PgPool,
    actor: Option<Uuid>,
    class: ClassId,
    student: StudentId,
) -> Result<bool, StoreError> {
    let mut tx = pool.begin().await?;
    let removed = sqlx::query(
        "DELETE FROM enrollments e USING students s
         WHERE e.student_id = s.id AND s.id = $1 AND s.class_id = $2",
    )
    .bind(student.0)
    .bind(class.0)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        > 0;
    if removed {
        audit::record(
            &mut *tx,
            &AuditEntry {
                actor,
                action: "roster.remove",
                class: Some(class),
                target: Some(student.0.to_string()),
                detail: serde_json::json!({}),
            },
        )
        .await?;
    }
    tx.commit().await?;
    Ok(removed)
}

/// One enrolled student and their status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct RosterStudent {
    /// The paging cursor.
    pub id: Uuid,
    pub email: Option<String>,
    pub name: Option<String>,
    pub team: Option<String>,
    /// The derived status, or `not_started` before the first event.
    pub status: String,
}

/// Enrolled students of `class` by id, after `after` if given, at most
/// `limit` (1 to [`MAX_PAGE`]).
pub async fn page(
    pool: &PgPool,
    class: ClassId,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<RosterStudent>, StoreError> {
    let students = sqlx::query_as(
        "SELECT s.id, s.email, s.name, t.name AS team,
                coalesce(st.status, 'not_started') AS status
         FROM students s
         JOIN enrollments e ON e.student_id = s.id
         LEFT JOIN teams t ON t.id = s.team_id
         LEFT JOIN student_status st ON st.student_id = s.id
         WHERE s.class_id = $1 AND ($2::uuid IS NULL OR s.id > $2)
         ORDER BY s.id LIMIT $3",
    )
    .bind(class.0)
    .bind(after)
    .bind(limit.clamp(1, MAX_PAGE))
    .fetch_all(pool)
    .await?;
    Ok(students)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bom_japanese_and_optional_team() {
        let file =
            "\u{feff}email,name,team\nHanako@Example.ac.jp,山田 花子,チームA\nb@x.jp,鈴木 一郎,\n";
        let entries = parse_csv(file.as_bytes()).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].email.as_str(), "hanako@example.ac.jp");
        assert_eq!(entries[0].name.as_str(), "山田 花子");
        assert_eq!(entries[1].team, None);
        let no_team = parse_csv(b"email,name\na@x.jp,A\n").unwrap();
        assert_eq!(no_team[0].team, None);
    }

    #[test]
    fn every_bad_line_is_reported_with_its_number() {
        let mut file =
            b"email,name,team\na@x.jp,A,T\nnot-an-email,B,T\nc@x.jp,,T\nA@x.jp,D,T\n".to_vec();
        file.extend_from_slice(b"e@x.jp,\xff\xfe,T\nf@x.jp,F\n");
        file.extend_from_slice(format!("g@x.jp,{},T\n", "長".repeat(201)).as_bytes());
        let Err(ImportError::Lines { errors, total }) = parse_csv(&file) else {
            panic!("expected line errors");
        };
        assert_eq!(total, 6);
        let lines: Vec<_> = errors.iter().map(|e| (e.line, e.field)).collect();
        assert_eq!(
            lines,
            [
                (3, Some("email")),
                (4, Some("name")),
                (5, Some("email")),
                (6, Some("name")),
                (7, None),
                (8, Some("name")),
            ]
        );
    }

    #[test]
    fn limits_and_header() {
        assert_eq!(parse_csv(b"mail,name\n"), Err(ImportError::BadHeader));
        assert_eq!(parse_csv(b"email,name\n"), Err(ImportError::Empty));
        let mut big = String::from("email,name\n");
        for i in 0..=MAX_IMPORT_LINES {
            big.push_str(&format!("s{i}@x.jp,S\n"));
        }
        assert_eq!(
            parse_csv(big.as_bytes()),
            Err(ImportError::TooManyLines {
                max: MAX_IMPORT_LINES
            })
        );
        let huge = vec![b'a'; MAX_IMPORT_BYTES + 1];
        assert!(matches!(
            parse_csv(&huge),
            Err(ImportError::TooLarge { .. })
        ));
    }
}
