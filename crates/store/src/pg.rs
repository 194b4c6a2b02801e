//! Writing batches of events to Postgres: one transaction per batch, one
//! set-based `INSERT ... SELECT FROM UNNEST(...)` per table, and
//! `ON CONFLICT DO NOTHING` on every event-keyed table, so a batch that is
//! written twice (a retry after an ambiguous COMMIT, a reclaimed delivery, a
//! replayed spool) changes nothing the second time.

use std::collections::BTreeMap;
use std::time::Duration;

use cellmon_domain::envelope::StreamEvent;
use cellmon_domain::event::{EventKind, StudentKey};
use cellmon_domain::lms::{ClassId, StudentId};
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Transaction};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::error::StoreError;
use crate::ids;

/// How to reach Postgres.
#[derive(Debug, Clone)]
pub struct PgConfig {
    pub url: String,
    /// At least 1. The binaries' `postgres.max_connections` is checked at
    /// load (`cellmon_service::PostgresSettings` refuses 0), so it is used
    /// as it is; a pool of 0 would time out every acquire.
    pub max_connections: u32,
    /// Longest wait for a connection, and for any one statement.
    pub timeout: Duration,
}

/// Connects lazily: the pool opens connections on demand, so a persister
/// starts (and keeps its other sink running) while Postgres is down.
pub fn pool(config: &PgConfig) -> Result<PgPool, StoreError> {
    let options: PgConnectOptions = config.url.parse()?;
    let timeout_ms = config.timeout.as_millis().to_string();
    let options = options
        .options([("statement_timeout", timeout_ms.as_str())])
        .application_name("cellmon-persister");
    Ok(PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(config.timeout)
        .connect_lazy_with(options))
}

/// Applies the schema's migrations (idempotent).
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    crate::MIGRATOR.run(pool).await?;
    Ok(())
}

/// What writing one batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteOutcome {
    /// Events stored by this batch.
    pub inserted: u64,
    /// Events already stored (replays and retries), or repeated in the batch.
    pub duplicates: u64,
    /// The students whose events the batch carried, each once, sorted.
    pub students: Vec<StudentId>,
}

/// Writes `batch` in one transaction and returns once it committed.
///
/// The batch may hold the same event more than once; it is stored once.
/// Rows are sorted by key before every statement, so concurrent writers lock
/// rows in one order and cannot deadlock each other.
pub async fn write_batch(pool: &PgPool, batch: &[StreamEvent]) -> Result<WriteOutcome, StoreError> {
    let rows = Rows::build(batch);
    let mut tx = pool.begin().await?;
    rows.insert(&mut tx).await?;
    let inserted = rows.insert_events(&mut tx).await?;
    rows.insert_details(&mut tx).await?;
    tx.commit().await?;
    Ok(WriteOutcome {
        inserted,
        duplicates: batch.len() as u64 - inserted,
        students: rows.students.keys().copied().collect(),
    })
}

/// Postgres refuses NUL in text and jsonb; free text from students (code,
/// output, unknown event type names) may contain it.
fn text(value: &str) -> String {
    value.replace('\0', "\u{FFFD}")
}

fn clean_json(value: &mut Value) {
    match value {
        Value::String(s) if s.contains('\0') => *s = text(s),
        Value::Array(items) => items.iter_mut().for_each(clean_json),
        Value::Object(map) => map.values_mut().for_each(clean_json),
        _ => {}
    }
}

struct StudentRow {
    class: ClassId,
    key: StudentKey,
    email: Option<String>,
    name: Option<String>,
    team: Option<Uuid>,
    profile_time: Option<OffsetDateTime>,
    first_seen: OffsetDateTime,
    last_seen: OffsetDateTime,
}

struct TeamRow {
    class: ClassId,
    name: String,
}

struct SessionRow {
    student: StudentId,
    client_session: String,
    first_seen: OffsetDateTime,
    last_seen: OffsetDateTime,
}

struct NotebookRow {
    student: StudentId,
    path: String,
}

struct CellRow {
    student: StudentId,
    notebook: Option<Uuid>,
    client_cell_id: String,
    cell_type: Option<String>,
}

/// The batch, deduplicated by event id and laid out in columns per table.
#[derive(Default)]
struct Rows {
    classes: Vec<Uuid>,
    teams: BTreeMap<Uuid, TeamRow>,
    students: BTreeMap<StudentId, StudentRow>,
    sessions: BTreeMap<Uuid, SessionRow>,
    notebooks: BTreeMap<Uuid, NotebookRow>,
    cells: BTreeMap<Uuid, CellRow>,
    events: Events,
    executions: Executions,
    help: Help,
}

#[derive(Default)]
struct Events {
    id: Vec<Uuid>,
    class: Vec<Uuid>,
    student: Vec<Uuid>,
    kind: Vec<String>,
    time: Vec<OffsetDateTime>,
    client_time: Vec<Option<OffsetDateTime>>,
    received_at: Vec<OffsetDateTime>,
    session: Vec<Option<Uuid>>,
    notebook: Vec<Option<Uuid>>,
    cell: Vec<Option<Uuid>>,
    payload: Vec<Value>,
}

#[derive(Default)]
struct Executions {
    id: Vec<Uuid>,
    student: Vec<Uuid>,
    cell: Vec<Uuid>,
    time: Vec<OffsetDateTime>,
    code: Vec<Option<String>>,
    result: Vec<Option<String>>,
    error_message: Vec<Option<String>>,
    has_error: Vec<bool>,
    duration_ms: Vec<Option<f64>>,
    execution_count: Vec<Option<i32>>,
    cell_index: Vec<Option<i32>>,
}

#[derive(Default)]
struct Help {
    id: Vec<Uuid>,
    student: Vec<Uuid>,
    notebook_path: Vec<Option<String>>,
    time: Vec<OffsetDateTime>,
    kind: Vec<&'static str>,
}

impl Rows {
    fn build(batch: &[StreamEvent]) -> Self {
        let mut unique: BTreeMap<Uuid, &StreamEvent> = BTreeMap::new();
        for item in batch {
            unique.entry(*item.event.id.as_uuid()).or_insert(item);
        }
        let mut rows = Rows::default();
        let mut classes = std::collections::BTreeSet::new();
        for (id, item) in unique {
            let event = &item.event;
            let class = item.class_id;
            classes.insert(class.0);
            let time = event.time();
            let student = ids::student(class, &event.student.key);
            let team = event.student.team.as_ref().map(|name| {
                let id = ids::team(class, name.as_str());
                rows.teams.entry(id).or_insert_with(|| TeamRow {
                    class,
                    name: name.to_string(),
                });
                id
            });
            let named = event.student.name.is_some() || team.is_some();
            let row = rows.students.entry(student).or_insert_with(|| StudentRow {
                class,
                key: event.student.key.clone(),
                email: match &event.student.key {
                    StudentKey::Email(email) => Some(email.to_string()),
                    StudentKey::UserId(_) => None,
                },
                name: None,
                team: None,
                profile_time: None,
                first_seen: time,
                last_seen: time,
            });
            row.first_seen = row.first_seen.min(time);
            row.last_seen = row.last_seen.max(time);
            if named && row.profile_time.is_none_or(|t| t <= time) {
                row.profile_time = Some(time);
                row.name = event.student.name.as_ref().map(ToString::to_string);
                row.team = team;
            }

            let session = event.session_id.as_ref().map(|s| {
                let id = ids::session(student, s.as_str());
                let entry = rows.sessions.entry(id).or_insert_with(|| SessionRow {
                    student,
                    client_session: s.to_string(),
                    first_seen: time,
                    last_seen: time,
                });
                entry.first_seen = entry.first_seen.min(time);
                entry.last_seen = entry.last_seen.max(time);
                id
            });
            let notebook = event.notebook.as_ref().map(|path| {
                let id = ids::notebook(student, path);
                rows.notebooks.entry(id).or_insert_with(|| NotebookRow {
                    student,
                    path: path.to_string(),
                });
                id
            });
            let cell = event.cell.as_ref().map(|cell| {
                let id = ids::cell(student, event.notebook.as_ref(), &cell.id);
                rows.cells.entry(id).or_insert_with(|| CellRow {
                    student,
                    notebook,
                    client_cell_id: cell.id.to_string(),
                    cell_type: cell.cell_type.map(|t| t.as_str().to_owned()),
                });
                id
            });

            let mut payload_event = event.clone();
            match &mut payload_event.kind {
                EventKind::CellExecuted(exec) => {
                    // Stored once, in cell_executions.
                    let e = &mut rows.executions;
                    e.id.push(id);
                    e.student.push(student.0);
                    e.cell.push(cell.unwrap_or_default());
                    e.time.push(time);
                    e.code.push(exec.code.take().map(|s| text(&s)));
                    e.result.push(exec.result.take().map(|s| text(&s)));
                    e.error_message
                        .push(exec.error_message.take().map(|s| text(&s)));
                    e.has_error.push(exec.has_error);
                    e.duration_ms.push(exec.duration_ms);
                    e.execution_count
                        .push(exec.execution_count.and_then(|n| i32::try_from(n).ok()));
                    e.cell_index.push(
                        event
                            .cell
                            .as_ref()
                            .and_then(|c| c.index)
                            .and_then(|n| i32::try_from(n).ok()),
                    );
                }
                EventKind::Help | EventKind::HelpStop => {
                    let h = &mut rows.help;
                    h.id.push(id);
                    h.student.push(student.0);
                    h.notebook_path
                        .push(event.notebook.as_ref().map(ToString::to_string));
                    h.time.push(time);
                    h.kind.push(if matches!(event.kind, EventKind::Help) {
                        "help"
                    } else {
                        "help_stop"
                    });
                }
                _ => {}
            }
            let mut payload = serde_json::to_value(&payload_event).unwrap_or(Value::Null);
            clean_json(&mut payload);

            let e = &mut rows.events;
            e.id.push(id);
            e.class.push(class.0);
            e.student.push(student.0);
            e.kind.push(text(event.kind.type_name()));
            e.time.push(time);
            e.client_time.push(event.client_time);
            e.received_at.push(event.received_at);
            e.session.push(session);
            e.notebook.push(notebook);
            e.cell.push(cell);
            e.payload.push(payload);
        }
        rows.classes = classes.into_iter().collect();
        rows
    }

    /// Classes, teams, students, sessions, notebooks and cells.
    async fn insert(&self, tx: &mut Transaction<'_, Postgres>) -> Result<(), StoreError> {
        // A class that only exists in ingest's configuration gets a row with
        // default settings; an admin can rename and tune it later.
        sqlx::query(
            "INSERT INTO classes (id, name)
             SELECT id, id::text FROM UNNEST($1::uuid[]) AS t(id)
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&self.classes)
        .execute(&mut **tx)
        .await?;

        let (team_ids, (team_classes, team_names)): (Vec<Uuid>, (Vec<Uuid>, Vec<String>)) = self
            .teams
            .iter()
            .map(|(id, team)| (*id, (team.class.0, team.name.clone())))
            .unzip();
        sqlx::query(
            "INSERT INTO teams (id, class_id, name)
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[])
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&team_ids)
        .bind(&team_classes)
        .bind(&team_names)
        .execute(&mut **tx)
        .await?;

        let mut s_id = Vec::new();
        let mut s_class = Vec::new();
        let mut s_key = Vec::new();
        let mut s_email = Vec::new();
        let mut s_name = Vec::new();
        let mut s_team = Vec::new();
        let mut s_profile = Vec::new();
        let mut s_first = Vec::new();
        let mut s_last = Vec::new();
        for (id, row) in &self.students {
            s_id.push(id.0);
            s_class.push(row.class.0);
            s_key.push(ids::student_key_text(&row.key));
            s_email.push(row.email.clone());
            s_name.push(row.name.clone());
            s_team.push(row.team);
            s_profile.push(row.profile_time);
            s_first.push(row.first_seen);
            s_last.push(row.last_seen);
        }
        // Name and team follow the newest event that carried them, whatever
        // order batches commit in.
        sqlx::query(
            "INSERT INTO students
                 (id, class_id, student_key, email, name, team_id, profile_time, first_seen, last_seen)
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[],
                                  $6::uuid[], $7::timestamptz[], $8::timestamptz[], $9::timestamptz[])
             ON CONFLICT (id) DO UPDATE SET
                 name = CASE WHEN (EXCLUDED.profile_time IS NOT NULL
                                 AND (students.profile_time IS NULL
                                      OR EXCLUDED.profile_time >= students.profile_time)) THEN coalesce(EXCLUDED.name, students.name)
                             ELSE students.name END,
                 team_id = CASE WHEN (EXCLUDED.profile_time IS NOT NULL
                                 AND (students.profile_time IS NULL
                                      OR EXCLUDED.profile_time >= students.profile_time)) THEN coalesce(EXCLUDED.team_id, students.team_id)
                                ELSE students.team_id END,
                 profile_time = CASE WHEN (EXCLUDED.profile_time IS NOT NULL
                                 AND (students.profile_time IS NULL
                                      OR EXCLUDED.profile_time >= students.profile_time)) THEN EXCLUDED.profile_time
                                     ELSE students.profile_time END,
                 first_seen = LEAST(students.first_seen, EXCLUDED.first_seen),
                 last_seen = GREATEST(students.last_seen, EXCLUDED.last_seen)",
        )
        .bind(&s_id)
        .bind(&s_class)
        .bind(&s_key)
        .bind(&s_email)
        .bind(&s_name)
        .bind(&s_team)
        .bind(&s_profile)
        .bind(&s_first)
        .bind(&s_last)
        .execute(&mut **tx)
        .await?;

        let mut ss_id = Vec::new();
        let mut ss_student = Vec::new();
        let mut ss_client = Vec::new();
        let mut ss_first = Vec::new();
        let mut ss_last = Vec::new();
        for (id, session) in &self.sessions {
            ss_id.push(*id);
            ss_student.push(session.student.0);
            ss_client.push(session.client_session.clone());
            ss_first.push(session.first_seen);
            ss_last.push(session.last_seen);
        }
        sqlx::query(
            "INSERT INTO sessions (id, student_id, client_session, first_seen, last_seen)
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::timestamptz[], $5::timestamptz[])
             ON CONFLICT (id) DO UPDATE SET
                 first_seen = LEAST(sessions.first_seen, EXCLUDED.first_seen),
                 last_seen = GREATEST(sessions.last_seen, EXCLUDED.last_seen)",
        )
        .bind(&ss_id)
        .bind(&ss_student)
        .bind(&ss_client)
        .bind(&ss_first)
        .bind(&ss_last)
        .execute(&mut **tx)
        .await?;

        let (n_id, (n_student, n_path)): (Vec<Uuid>, (Vec<Uuid>, Vec<String>)) = self
            .notebooks
            .iter()
            .map(|(id, notebook)| (*id, (notebook.student.0, notebook.path.clone())))
            .unzip();
        sqlx::query(
            "INSERT INTO notebooks (id, student_id, path)
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[])
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&n_id)
        .bind(&n_student)
        .bind(&n_path)
        .execute(&mut **tx)
        .await?;

        let mut c_id = Vec::new();
        let mut c_student = Vec::new();
        let mut c_notebook = Vec::new();
        let mut c_client = Vec::new();
        let mut c_type = Vec::new();
        for (id, cell) in &self.cells {
            c_id.push(*id);
            c_student.push(cell.student.0);
            c_notebook.push(cell.notebook);
            c_client.push(cell.client_cell_id.clone());
            c_type.push(cell.cell_type.clone());
        }
        sqlx::query(
            "INSERT INTO cells (id, student_id, notebook_id, client_cell_id, cell_type)
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[])
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&c_id)
        .bind(&c_student)
        .bind(&c_notebook)
        .bind(&c_client)
        .bind(&c_type)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// The events table; returns how many were new.
    async fn insert_events(&self, tx: &mut Transaction<'_, Postgres>) -> Result<u64, StoreError> {
        let e = &self.events;
        let done = sqlx::query(
            "INSERT INTO events (event_id, class_id, student_id, event_type, event_time, client_time,
                                 received_at, session_id, notebook_id, cell_id, payload)
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::timestamptz[],
                                  $6::timestamptz[], $7::timestamptz[], $8::uuid[], $9::uuid[],
                                  $10::uuid[], $11::jsonb[])
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(&e.id)
        .bind(&e.class)
        .bind(&e.student)
        .bind(&e.kind)
        .bind(&e.time)
        .bind(&e.client_time)
        .bind(&e.received_at)
        .bind(&e.session)
        .bind(&e.notebook)
        .bind(&e.cell)
        .bind(&e.payload)
        .execute(&mut **tx)
        .await?;
        Ok(done.rows_affected())
    }

    /// Executions (and the students' counters, for new ones only) and help.
    async fn insert_details(&self, tx: &mut Transaction<'_, Postgres>) -> Result<(), StoreError> {
        let x = &self.executions;
        if !x.id.is_empty() {
            sqlx::query(
                "WITH new AS (
                     INSERT INTO cell_executions (event_id, student_id, cell_id, event_time, code,
                         result, error_message, has_error, duration_ms, execution_count, cell_index)
                     SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::timestamptz[],
                         $5::text[], $6::text[], $7::text[], $8::bool[], $9::float8[], $10::int4[],
                         $11::int4[])
                     ON CONFLICT (event_id) DO NOTHING
                     RETURNING student_id, has_error
                 )
                 UPDATE students s
                 SET executions = s.executions + n.total,
                     failed_executions = s.failed_executions + n.failed
                 FROM (SELECT student_id, count(*) AS total, count(*) FILTER (WHERE has_error) AS failed
                       FROM new GROUP BY student_id) n
                 WHERE s.id = n.student_id",
            )
            .bind(&x.id)
            .bind(&x.student)
            .bind(&x.cell)
            .bind(&x.time)
            .bind(&x.code)
            .bind(&x.result)
            .bind(&x.error_message)
            .bind(&x.has_error)
            .bind(&x.duration_ms)
            .bind(&x.execution_count)
            .bind(&x.cell_index)
            .execute(&mut **tx)
            .await?;
        }
        let h = &self.help;
        if !h.id.is_empty() {
            sqlx::query(
                "INSERT INTO help_events (event_id, student_id, notebook_path, event_time, kind)
                 SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::timestamptz[], $5::text[])
                 ON CONFLICT (event_id) DO NOTHING",
            )
            .bind(&h.id)
            .bind(&h.student)
            .bind(&h.notebook_path)
            .bind(&h.time)
            .bind(&h.kind)
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_is_replaced_everywhere() {
        let mut value = serde_json::json!({"a": ["x\0y", {"b": "\0"}], "c": 1});
        clean_json(&mut value);
        assert_eq!(
            value,
            serde_json::json!({"a": ["x\u{FFFD}y", {"b": "\u{FFFD}"}], "c": 1})
        );
    }
}
