//! The Postgres writer and the derived status against a real Postgres.

use cellmon_domain::envelope::StreamEvent;
use cellmon_domain::lms::ClassId;
use cellmon_domain::status::Status;
use cellmon_domain::{WireEvent, validate};
use cellmon_store::{pg, status};
use cellmon_testkit::fixture::TestBackends;
use sqlx::PgPool;
use time::OffsetDateTime;
use time::macros::datetime;

const CLASS: ClassId = ClassId(uuid::Uuid::from_u128(0xc1a55));

fn event(n: u32, kind: &str, student: &str, secs: i64, failed: Option<bool>) -> StreamEvent {
    let time = datetime!(2026-04-01 10:00 UTC) + time::Duration::seconds(secs);
    let wire = WireEvent {
        event_id: Some(uuid::Uuid::from_u128(u128::from(n)).to_string()),
        event_type: Some(kind.into()),
        event_time: Some(
            time.format(&time::format_description::well_known::Rfc3339)
                .unwrap(),
        ),
        email_address: Some(format!("{student}@example.ac.jp")),
        user_name: Some(format!("学生 {student}")),
        team_name: Some("チームA".into()),
        notebook_path: Some("lesson1.ipynb".into()),
        cell_id: failed.map(|_| "cell-1".into()),
        has_error: failed,
        code: failed.map(|_| "print(x)\0".into()),
        ..WireEvent::default()
    };
    StreamEvent {
        class_id: CLASS,
        event: validate(wire, time).unwrap(),
    }
}

async fn pool(backends: &TestBackends) -> anyhow::Result<PgPool> {
    let pool = pg::pool(&pg::PgConfig {
        url: backends.pg_url(),
        max_connections: 4,
        timeout: std::time::Duration::from_secs(10),
    })?;
    Ok(pool)
}

async fn count(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn batches_are_idempotent_and_fill_every_table() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let pool = pool(&backends).await?;
    let batch = vec![
        event(1, "notebook_opened", "a", 0, None),
        event(2, "cell_executed", "a", 10, Some(true)),
        event(2, "cell_executed", "a", 10, Some(true)),
        event(3, "help", "b", 20, None),
        event(4, "mystery_type", "b", 30, None),
    ];
    let outcome = pg::write_batch(&pool, &batch).await?;
    assert_eq!((outcome.inserted, outcome.duplicates), (4, 1));
    assert_eq!(outcome.students.len(), 2);
    let again = pg::write_batch(&pool, &batch).await?;
    assert_eq!((again.inserted, again.duplicates), (0, 5));

    assert_eq!(count(&pool, "events").await, 4);
    assert_eq!(count(&pool, "cell_executions").await, 1);
    assert_eq!(count(&pool, "help_events").await, 1);
    assert_eq!(count(&pool, "students").await, 2);
    assert_eq!(count(&pool, "teams").await, 1);
    assert_eq!(count(&pool, "notebooks").await, 2);
    assert_eq!(count(&pool, "cells").await, 1);
    let (executions, failed): (i64, i64) = sqlx::query_as(
        "SELECT executions, failed_executions FROM students WHERE student_key = 'a@example.ac.jp'",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!((executions, failed), (1, 1), "counters count new rows only");
    Ok(())
}

#[tokio::test]
async fn names_follow_the_newest_event_in_any_order() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let pool = pool(&backends).await?;
    let mut newer = event(10, "notebook_opened", "a", 100, None);
    newer.event.student.name = Some(cellmon_domain::fields::DisplayName::parse("New")?);
    let mut older = event(11, "notebook_opened", "a", 50, None);
    older.event.student.name = Some(cellmon_domain::fields::DisplayName::parse("Old")?);
    pg::write_batch(&pool, &[newer]).await?;
    pg::write_batch(&pool, &[older]).await?;
    let name: String = sqlx::query_scalar("SELECT name FROM students")
        .fetch_one(&pool)
        .await?;
    assert_eq!(name, "New");
    Ok(())
}

#[tokio::test]
async fn status_is_derived_from_stored_events() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let pool = pool(&backends).await?;
    let now = datetime!(2026-04-01 10:01 UTC);
    // Three failures of one cell (threshold 3), then help from student b.
    let batch = vec![
        event(1, "cell_executed", "a", 0, Some(false)),
        event(2, "cell_executed", "a", 10, Some(true)),
        event(3, "cell_executed", "a", 20, Some(true)),
        event(4, "cell_executed", "a", 30, Some(true)),
        event(5, "help", "b", 40, None),
    ];
    let outcome = pg::write_batch(&pool, &batch).await?;
    let recomputed = status::recompute(&pool, &outcome.students, now).await?;
    let mut by_key: Vec<(String, Status, u32)> = recomputed
        .changes
        .iter()
        .map(|c| {
            (
                c.student.key.to_string(),
                c.after.status,
                c.after.executions,
            )
        })
        .collect();
    by_key.sort();
    assert_eq!(
        by_key,
        vec![
            ("a@example.ac.jp".into(), Status::SignificantError, 4),
            ("b@example.ac.jp".into(), Status::Help, 0),
        ]
    );
    assert!(recomputed.changes.iter().all(|c| c.before.is_none()));
    recomputed.commit().await?;

    // A success clears the significant error; the stored status is "before".
    let outcome =
        pg::write_batch(&pool, &[event(6, "cell_executed", "a", 50, Some(false))]).await?;
    let recomputed = status::recompute(&pool, &outcome.students, now).await?;
    let change = &recomputed.changes[0];
    assert_eq!(
        change.before.as_ref().map(|s| s.status),
        Some(Status::SignificantError)
    );
    assert_eq!(change.after.status, Status::Active);
    recomputed.commit().await?;
    let snapshot = status::class_status(&pool, CLASS).await?;
    assert_eq!(snapshot.len(), 2);
    let _ = OffsetDateTime::now_utc();
    Ok(())
}
