//! Derived status after a commit: load what the status rules need for the
//! students a batch touched (one query for the whole batch), apply the pure
//! rules of `cellmon_domain::status`, and store the result.
//!
//! The rules see the events in canonical order (event time, then id) as
//! stored, never in the order a worker received them, so the result depends
//! only on *which* events are stored (ARCHITECTURE.md rule 5).
//!
//! What is loaded per student, so the work stays proportional to a batch
//! and not to a student's whole history:
//!
//! * per cell, its runs since (and including) its newest success, at most
//!   [`MAX_TRAILING_RUNS`]; a longer failure streak is reported as that many;
//! * the newest [`MAX_HELP_EVENTS`] `help`/`help_stop` events;
//! * the newest event of any type (last activity);
//! * the instructor's dismissals and resolutions;
//! * the execution counters kept by the writer.
//!
//! Concurrent persisters serialise per student: a first statement locks the
//! students' rows (in id order), a second one loads (so it sees everything
//! committed before the lock was granted), and the caller publishes the
//! changes before committing, so the last status published for a student is
//! computed from every event committed before it.

use cellmon_domain::event::StudentKey;
use cellmon_domain::fields::{ClientId, DisplayName, Email, NotebookPath};
use cellmon_domain::id::EventId;
use cellmon_domain::live::StudentRef;
use cellmon_domain::lms::{ClassId, StudentId};
use cellmon_domain::status::{
    Activity, ActivityEvent, CellKey, HELP_WINDOW, HelpRequest, InstructorAction, OrderKey,
    StatusRules, StudentStatus, derive_status,
};
use serde::Deserialize;
use sqlx::types::Json;
use sqlx::{PgPool, Postgres, Transaction};
use std::num::NonZeroU8;
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

use crate::error::StoreError;

/// The most runs of one cell loaded per recompute.
pub const MAX_TRAILING_RUNS: i64 = 64;
/// The most help events of one student loaded per recompute.
pub const MAX_HELP_EVENTS: i64 = 1_000;

/// One student's status before and after the batch.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusChange {
    pub class_id: ClassId,
    pub student: StudentRef,
    pub before: Option<StudentStatus>,
    pub after: StudentStatus,
}

/// Recomputed statuses, with the students' rows still locked. Publish the
/// changes, then [`commit`](Self::commit) to store them and release the
/// locks; dropping it stores nothing.
#[derive(Debug)]
pub struct Recomputed {
    tx: Transaction<'static, Postgres>,
    pub changes: Vec<StatusChange>,
    now: OffsetDateTime,
}

#[derive(Deserialize)]
struct Run {
    event_id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    event_time: OffsetDateTime,
    has_error: bool,
    notebook: Option<String>,
    cell: String,
}

#[derive(Deserialize)]
struct HelpRow {
    event_id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    event_time: OffsetDateTime,
    kind: String,
    notebook: Option<String>,
}

#[derive(Deserialize)]
struct Latest {
    event_id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    event_time: OffsetDateTime,
}

#[derive(Deserialize)]
struct Dismissal {
    notebook: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    through_time: OffsetDateTime,
    through_event_id: Uuid,
}

#[derive(Deserialize)]
struct Resolution {
    notebook: Option<String>,
    cell: String,
    #[serde(with = "time::serde::rfc3339")]
    through_time: OffsetDateTime,
    through_event_id: Uuid,
}

const LOAD: &str = "
SELECT s.id, s.class_id, s.student_key, s.name, t.name AS team,
       s.executions, s.failed_executions,
       c.consecutive_error_threshold, c.idle_after_seconds,
       st.detail AS before,
       (SELECT coalesce(jsonb_agg(r), '[]'::jsonb) FROM (
            SELECT x.event_id, x.event_time, x.has_error, n.path AS notebook,
                   cl.client_cell_id AS cell
            FROM cells cl
            LEFT JOIN notebooks n ON n.id = cl.notebook_id
            LEFT JOIN LATERAL (
                SELECT ok.event_time, ok.event_id FROM cell_executions ok
                WHERE ok.cell_id = cl.id AND NOT ok.has_error
                ORDER BY ok.event_time DESC, ok.event_id DESC LIMIT 1
            ) last_ok ON true
            CROSS JOIN LATERAL (
                SELECT e.event_id, e.event_time, e.has_error FROM cell_executions e
                WHERE e.cell_id = cl.id
                  AND (last_ok.event_time IS NULL
                       OR (e.event_time, e.event_id) >= (last_ok.event_time, last_ok.event_id))
                ORDER BY e.event_time DESC, e.event_id DESC LIMIT $2
            ) x
            WHERE cl.student_id = s.id) r) AS runs,
       (SELECT coalesce(jsonb_agg(h), '[]'::jsonb) FROM (
            SELECT event_id, event_time, kind, notebook_path AS notebook FROM help_events
            WHERE student_id = s.id
            ORDER BY event_time DESC, event_id DESC LIMIT $3) h) AS help,
       (SELECT to_jsonb(l) FROM (
            SELECT event_id, event_time FROM events WHERE student_id = s.id
            ORDER BY event_time DESC, event_id DESC LIMIT 1) l) AS latest,
       (SELECT coalesce(jsonb_agg(d), '[]'::jsonb) FROM (
            SELECT notebook_path AS notebook, through_time, through_event_id
            FROM help_dismissals WHERE student_id = s.id) d) AS dismissals,
       (SELECT coalesce(jsonb_agg(v), '[]'::jsonb) FROM (
            SELECT n.path AS notebook, cl.client_cell_id AS cell, r.through_time, r.through_event_id
            FROM error_resolutions r
            JOIN cells cl ON cl.id = r.cell_id
            LEFT JOIN notebooks n ON n.id = cl.notebook_id
            WHERE r.student_id = s.id) v) AS resolutions
FROM students s
JOIN classes c ON c.id = s.class_id
LEFT JOIN teams t ON t.id = s.team_id
LEFT JOIN student_status st ON st.student_id = s.id
WHERE s.id = ANY($1)
ORDER BY s.id";

fn key(time: OffsetDateTime, id: Uuid) -> OrderKey {
    OrderKey {
        time,
        id: EventId::from_uuid(id),
    }
}

fn path(raw: Option<String>) -> Result<Option<NotebookPath>, StoreError> {
    raw.map(|p| NotebookPath::parse(&p).map_err(|e| StoreError::Corrupt(format!("path: {e}"))))
        .transpose()
}

fn cell_key(notebook: Option<String>, cell: &str) -> Result<CellKey, StoreError> {
    Ok(CellKey {
        notebook: path(notebook)?,
        cell: ClientId::parse(cell).map_err(|e| StoreError::Corrupt(format!("cell: {e}")))?,
    })
}

fn student_key(text: &str) -> Result<StudentKey, StoreError> {
    let corrupt = |e| StoreError::Corrupt(format!("student key {text:?}: {e}"));
    match text.strip_prefix("user:") {
        Some(id) => Ok(StudentKey::UserId(ClientId::parse(id).map_err(corrupt)?)),
        None => Ok(StudentKey::Email(Email::parse(text).map_err(corrupt)?)),
    }
}

fn display(raw: Option<String>) -> Option<DisplayName> {
    raw.and_then(|n| DisplayName::parse(&n).ok())
}

/// A student's identity columns (`id`, `student_key`, `name`, `team`).
#[derive(sqlx::FromRow)]
struct StudentRow {
    id: Uuid,
    student_key: String,
    name: Option<String>,
    team: Option<String>,
}

impl StudentRow {
    fn into_ref(self) -> Result<StudentRef, StoreError> {
        Ok(StudentRef {
            id: StudentId(self.id),
            key: student_key(&self.student_key)?,
            name: display(self.name),
            team: display(self.team),
        })
    }
}

/// One row of [`LOAD`]: everything the status rules need of one student.
#[derive(sqlx::FromRow)]
struct Loaded {
    #[sqlx(flatten)]
    student: StudentRow,
    class_id: Uuid,
    executions: i64,
    failed_executions: i64,
    consecutive_error_threshold: i16,
    idle_after_seconds: i32,
    before: Option<Json<StudentStatus>>,
    runs: Json<Vec<Run>>,
    help: Json<Vec<HelpRow>>,
    latest: Option<Json<Latest>>,
    dismissals: Json<Vec<Dismissal>>,
    resolutions: Json<Vec<Resolution>>,
}

impl Loaded {
    fn rules(&self) -> StatusRules {
        StatusRules {
            consecutive_errors: NonZeroU8::new(
                u8::try_from(self.consecutive_error_threshold).unwrap_or(u8::MAX),
            )
            .unwrap_or(NonZeroU8::MIN),
            idle_after: Duration::seconds(i64::from(self.idle_after_seconds)),
            help_window: HELP_WINDOW,
        }
    }

    /// The student's runs, help events and newest event, unordered (the
    /// rules order them).
    fn events(&self) -> Result<Vec<ActivityEvent>, StoreError> {
        let mut events = Vec::with_capacity(self.runs.0.len() + self.help.0.len() + 1);
        for run in &self.runs.0 {
            events.push(ActivityEvent {
                key: key(run.event_time, run.event_id),
                activity: Activity::Execution {
                    cell: cell_key(run.notebook.clone(), &run.cell)?,
                    failed: run.has_error,
                },
            });
        }
        for h in &self.help.0 {
            let notebook = path(h.notebook.clone())?;
            events.push(ActivityEvent {
                key: key(h.event_time, h.event_id),
                activity: if h.kind == "help" {
                    Activity::Help { notebook }
                } else {
                    Activity::HelpStop { notebook }
                },
            });
        }
        if let Some(Json(latest)) = &self.latest {
            // Its kind does not matter: if it is a run or a help event it is
            // loaded above too, and duplicates by id count once.
            if !events
                .iter()
                .any(|e| e.key.id.as_uuid() == &latest.event_id)
            {
                events.push(ActivityEvent {
                    key: key(latest.event_time, latest.event_id),
                    activity: Activity::Other,
                });
            }
        }
        Ok(events)
    }

    /// The instructors' dismissals and resolutions.
    fn actions(&self) -> Result<Vec<InstructorAction>, StoreError> {
        let mut actions = Vec::with_capacity(self.dismissals.0.len() + self.resolutions.0.len());
        for d in &self.dismissals.0 {
            actions.push(InstructorAction::DismissHelp {
                notebook: path(d.notebook.clone())?,
                through: key(d.through_time, d.through_event_id),
            });
        }
        for r in &self.resolutions.0 {
            actions.push(InstructorAction::ResolveError {
                cell: cell_key(r.notebook.clone(), &r.cell)?,
                through: key(r.through_time, r.through_event_id),
            });
        }
        Ok(actions)
    }

    fn change(self, now: OffsetDateTime) -> Result<StatusChange, StoreError> {
        let mut after = derive_status(&self.events()?, &self.actions()?, &self.rules(), now);
        // The counters cover the whole history; the loaded runs do not.
        after.executions = u32::try_from(self.executions).unwrap_or(u32::MAX);
        after.failed_executions = u32::try_from(self.failed_executions).unwrap_or(u32::MAX);
        Ok(StatusChange {
            class_id: ClassId(self.class_id),
            student: self.student.into_ref()?,
            before: self.before.map(|Json(s)| s),
            after,
        })
    }
}

/// Locks and loads the students (two statements; the load is one query for
/// all of them), and derives their status at `now`.
pub async fn recompute(
    pool: &PgPool,
    students: &[StudentId],
    now: OffsetDateTime,
) -> Result<Recomputed, StoreError> {
    let ids: Vec<Uuid> = students.iter().map(|s| s.0).collect();
    let mut tx = pool.begin().await?;
    // Classes first (shared: persisters never wait for each other here; a
    // snapshot waits for them, see [`ClassSnapshot`]), then students.
    sqlx::query(SHARE_CLASSES)
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
    // Lock first, load second: under READ COMMITTED a statement sees the
    // data of when it started, so a load that had to wait for a lock would
    // miss what the lock holder committed meanwhile.
    sqlx::query("SELECT id FROM students WHERE id = ANY($1) ORDER BY id FOR UPDATE")
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
    let rows: Vec<Loaded> = sqlx::query_as(LOAD)
        .bind(&ids)
        .bind(MAX_TRAILING_RUNS)
        .bind(MAX_HELP_EVENTS)
        .fetch_all(&mut *tx)
        .await?;
    let changes = rows
        .into_iter()
        .map(|row| row.change(now))
        .collect::<Result<_, _>>()?;
    Ok(Recomputed { tx, changes, now })
}

impl Recomputed {
    /// Stores the new statuses and releases the students' rows.
    pub async fn commit(mut self) -> Result<(), StoreError> {
        let mut student = Vec::with_capacity(self.changes.len());
        let mut class = Vec::with_capacity(self.changes.len());
        let mut status = Vec::with_capacity(self.changes.len());
        let mut detail = Vec::with_capacity(self.changes.len());
        for change in &self.changes {
            student.push(change.student.id.0);
            class.push(change.class_id.0);
            status.push(
                serde_json::to_value(change.after.status)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
            );
            detail.push(serde_json::to_value(&change.after).unwrap_or_default());
        }
        sqlx::query(
            "INSERT INTO student_status (student_id, class_id, status, detail, computed_at)
             SELECT s, c, st, d, $5 FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::jsonb[])
                 AS t(s, c, st, d)
             ON CONFLICT (student_id) DO UPDATE SET
                 status = EXCLUDED.status, detail = EXCLUDED.detail,
                 computed_at = EXCLUDED.computed_at",
        )
        .bind(&student)
        .bind(&class)
        .bind(&status)
        .bind(&detail)
        .bind(self.now)
        .execute(&mut *self.tx)
        .await?;
        self.tx.commit().await?;
        Ok(())
    }
}

/// Students whose stored status may have changed by time alone (an
/// active student going idle, a help request lapsing): not idle, and not
/// recomputed for `stale`. At most `limit`, oldest first.
pub async fn due_for_sweep(
    pool: &PgPool,
    stale: std::time::Duration,
    limit: i64,
) -> Result<Vec<StudentId>, StoreError> {
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "SELECT student_id FROM student_status
         WHERE status <> 'idle' AND computed_at < now() - make_interval(secs => $1)
         ORDER BY computed_at LIMIT $2",
    )
    .bind(stale.as_secs_f64())
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(ids.into_iter().map(StudentId).collect())
}

/// Records an instructor's dismissal of the help request that contains the
/// `help` event `through` (the newest one they saw).
pub async fn dismiss_help(
    pool: &PgPool,
    student: StudentId,
    request: &HelpRequest,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO help_dismissals (student_id, notebook_path, through_time, through_event_id)
         VALUES ($1, $2, $3, $4)",
    )
    .bind(student.0)
    .bind(request.notebook.as_ref().map(ToString::to_string))
    .bind(request.latest.time)
    .bind(request.latest.id.as_uuid())
    .execute(pool)
    .await?;
    Ok(())
}

/// The advisory-lock key of a class (SQL over a uuid column): its id's
/// first 64 bits.
macro_rules! class_lock_key {
    ($column:literal) => {
        concat!(
            "('x' || left(replace(",
            $column,
            "::text, '-', ''), 16))::bit(64)::bigint"
        )
    };
}

/// Shared advisory locks on the classes of the students `$1`, in key order.
const SHARE_CLASSES: &str = concat!(
    "SELECT pg_advisory_xact_lock_shared(k) FROM (SELECT DISTINCT ",
    class_lock_key!("class_id"),
    " AS k FROM students WHERE id = ANY($1) ORDER BY k) classes"
);

/// The exclusive advisory lock on the class `$1`.
const LOCK_CLASS: &str = concat!(
    "SELECT pg_advisory_xact_lock(",
    class_lock_key!("$1::uuid"),
    ")"
);

/// A class's statuses, consistent with the live messages published so far.
///
/// The persister publishes a student's live messages *before* it commits
/// the status row (so concurrent persisters publish in commit order). A
/// dashboard joining the class therefore needs a point where every message
/// published so far has its status committed. [`ClassSnapshot::lock`] takes
/// the class's advisory lock exclusively: it waits for every recompute of
/// the class in flight (they hold it shared) and holds new ones back. While
/// it is held, the caller reads the class's live position; [`load`] then
/// reads the statuses and releases the lock. Hold it briefly: recomputes of
/// the class wait meanwhile.
///
/// [`load`]: ClassSnapshot::load
#[derive(Debug)]
pub struct ClassSnapshot {
    tx: Transaction<'static, Postgres>,
    class: ClassId,
}

impl ClassSnapshot {
    pub async fn lock(pool: &PgPool, class: ClassId) -> Result<Self, StoreError> {
        let mut tx = pool.begin().await?;
        sqlx::query(LOCK_CLASS)
            .bind(class.0)
            .execute(&mut *tx)
            .await?;
        Ok(Self { tx, class })
    }

    /// Every student of the class that has a status, and every enrolled
    /// one that has sent nothing yet (as [`Status::NotStarted`]), by id;
    /// releases the lock.
    ///
    /// [`Status::NotStarted`]: cellmon_domain::status::Status::NotStarted
    pub async fn load(mut self) -> Result<Vec<(StudentRef, StudentStatus)>, StoreError> {
        let rows: Vec<SnapshotRow> = sqlx::query_as(
            "SELECT s.id, s.student_key, s.name, t.name AS team, st.detail
             FROM students s
             LEFT JOIN student_status st ON st.student_id = s.id
             LEFT JOIN teams t ON t.id = s.team_id
             WHERE s.class_id = $1
               AND (st.student_id IS NOT NULL
                    OR EXISTS (SELECT 1 FROM enrollments e WHERE e.student_id = s.id))
             ORDER BY s.id",
        )
        .bind(self.class.0)
        .fetch_all(&mut *self.tx)
        .await?;
        self.tx.commit().await?;
        rows.into_iter()
            .map(|row| {
                let status = row.detail.map_or_else(not_started, |detail| detail.0);
                Ok((row.student.into_ref()?, status))
            })
            .collect()
    }
}

#[derive(sqlx::FromRow)]
struct SnapshotRow {
    #[sqlx(flatten)]
    student: StudentRow,
    detail: Option<Json<StudentStatus>>,
}

/// The stored status of every student of a class.
pub async fn class_status(
    pool: &PgPool,
    class: ClassId,
) -> Result<Vec<(StudentId, StudentStatus)>, StoreError> {
    // Enrolled students without a stored status have sent nothing yet:
    // they are listed as not started.
    let rows: Vec<StatusRow> = sqlx::query_as(
        "SELECT s.id AS student_id, st.detail FROM students s
         LEFT JOIN student_status st ON st.student_id = s.id
         WHERE s.class_id = $1
           AND (st.student_id IS NOT NULL
                OR EXISTS (SELECT 1 FROM enrollments e WHERE e.student_id = s.id))
         ORDER BY s.id",
    )
    .bind(class.0)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let status = row.detail.map_or_else(not_started, |detail| detail.0);
            (StudentId(row.student_id), status)
        })
        .collect())
}

/// The status of an enrolled student who has sent no event yet.
fn not_started() -> StudentStatus {
    StudentStatus {
        status: cellmon_domain::status::Status::NotStarted,
        help: Vec::new(),
        significant_errors: Vec::new(),
        last_execution_failed: false,
        last_activity: None,
        executions: 0,
        failed_executions: 0,
    }
}

#[derive(sqlx::FromRow)]
struct StatusRow {
    student_id: Uuid,
    detail: Option<Json<StudentStatus>>,
}
