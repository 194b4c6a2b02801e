//! The roster and its CSV import against a real Postgres.

use cellmon_domain::envelope::StreamEvent;
use cellmon_domain::lms::ClassId;
use cellmon_domain::status::Status;
use cellmon_domain::{WireEvent, validate};
use cellmon_store::roster::{self, Change, ImportCounts, ImportError};
use cellmon_store::{classes, pg, status};
use cellmon_testkit::fixture::TestBackends;
use sqlx::PgPool;
use time::macros::datetime;
use uuid::Uuid;

async fn pool(backends: &TestBackends) -> anyhow::Result<PgPool> {
    Ok(pg::pool(&pg::PgConfig {
        url: backends.pg_url(),
        max_connections: 4,
        timeout: std::time::Duration::from_secs(10),
    })?)
}

async fn class(pool: &PgPool, id: u128) -> anyhow::Result<ClassId> {
    let class = ClassId(Uuid::from_u128(id));
    classes::register(pool, class, "Roster class", None).await?;
    Ok(class)
}

async fn count(pool: &PgPool, sql: &'static str, class: ClassId) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(sql)
        .bind(class.0)
        .fetch_one(pool)
        .await?)
}

const STUDENTS: &str = "SELECT count(*) FROM students WHERE class_id = $1";
const ENROLLED: &str = "SELECT count(*) FROM enrollments e JOIN students s ON s.id = e.student_id WHERE s.class_id = $1";
const AUDIT: &str = "SELECT count(*) FROM audit_log WHERE class_id = $1";

/// 240 students with Japanese names, four teams, a byte-order mark.
fn roster_file(renamed: usize) -> String {
    let mut file = String::from("\u{feff}email,name,team\n");
    for i in 0..240 {
        let name = if i < renamed {
            "改名 太郎"
        } else {
            "山田 花子"
        };
        file.push_str(&format!(
            "s{i:03}@example.ac.jp,{name}{i},チーム{}\n",
            i % 4
        ));
    }
    file
}

#[tokio::test]
async fn import_is_idempotent_and_updates_changed_lines() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let pool = pool(&backends).await?;
    let class = class(&pool, 0x7051).await?;

    let entries = roster::parse_csv(roster_file(0).as_bytes())?;
    let first = roster::import(&pool, None, class, &entries).await?;
    assert_eq!(
        first,
        ImportCounts {
            created: 240,
            updated: 0,
            unchanged: 0
        }
    );
    let again = roster::import(&pool, None, class, &entries).await?;
    assert_eq!(
        again,
        ImportCounts {
            created: 0,
            updated: 0,
            unchanged: 240
        }
    );
    let renamed = roster::parse_csv(roster_file(2).as_bytes())?;
    let third = roster::import(&pool, None, class, &renamed).await?;
    assert_eq!(
        third,
        ImportCounts {
            created: 0,
            updated: 2,
            unchanged: 238
        }
    );
    assert_eq!(count(&pool, STUDENTS, class).await?, 240);
    assert_eq!(count(&pool, ENROLLED, class).await?, 240);

    // Paged by id, every student once, all not started yet.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = roster::page(&pool, class, after, 100).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        seen.extend(page);
    }
    assert_eq!(seen.len(), 240);
    assert!(seen.iter().all(|s| s.status == "not_started"));
    let first = seen
        .iter()
        .find(|s| s.email.as_deref() == Some("s000@example.ac.jp"))
        .expect("s000 listed");
    assert_eq!(first.name.as_deref(), Some("改名 太郎0"));
    assert_eq!(first.team.as_deref(), Some("チーム0"));

    // The audit log has one entry per import, with counts and no e-mail.
    let details: Vec<serde_json::Value> =
        sqlx::query_scalar("SELECT detail FROM audit_log WHERE class_id = $1 ORDER BY id")
            .bind(class.0)
            .fetch_all(&pool)
            .await?;
    assert_eq!(details.len(), 3);
    assert_eq!(details[2]["updated"], 2);
    assert!(details.iter().all(|d| !d.to_string().contains('@')));
    Ok(())
}

#[tokio::test]
async fn a_file_with_bad_lines_writes_nothing() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let pool = pool(&backends).await?;
    let class = class(&pool, 0x7052).await?;
    let mut file = roster_file(0);
    file.push_str("not-an-email,名前,\n");
    file.push_str("ok@example.ac.jp,,チーム1\n");
    file.push_str("S001@example.ac.jp,重複,チーム1\n");
    let Err(ImportError::Lines { errors, total }) = roster::parse_csv(file.as_bytes()) else {
        panic!("expected line errors");
    };
    assert_eq!(total, 3);
    let lines: Vec<u64> = errors.iter().map(|e| e.line).collect();
    assert_eq!(lines, [242, 243, 244]);
    assert_eq!(count(&pool, STUDENTS, class).await?, 0);
    assert_eq!(count(&pool, AUDIT, class).await?, 0);
    Ok(())
}

#[tokio::test]
async fn an_enrolled_students_events_land_on_the_roster_row() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let pool = pool(&backends).await?;
    let class = class(&pool, 0x7053).await?;
    let entry =
        roster::parse_csv("email,name,team\nHanako@Example.ac.jp,山田 花子,A\n".as_bytes())?
            .remove(0);
    let (student, change) = roster::enroll(&pool, None, class, &entry).await?;
    assert_eq!(change, Change::Created);
    assert_eq!(
        roster::enroll(&pool, None, class, &entry).await?.1,
        Change::Unchanged
    );

    // Before any event: in the dashboard snapshot as not started.
    let snapshot = status::ClassSnapshot::lock(&pool, class)
        .await?
        .load()
        .await?;
    assert_eq!(snapshot.len(), 1);
    assert_eq!(snapshot[0].0.id, student);
    assert_eq!(
        snapshot[0].0.name.as_ref().map(|n| n.as_str()),
        Some("山田 花子")
    );
    assert_eq!(snapshot[0].1.status, Status::NotStarted);
    let listed = status::class_status(&pool, class).await?;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].1.status, Status::NotStarted);

    let time = datetime!(2026-04-01 10:00 UTC);
    let wire = WireEvent {
        event_id: Some(Uuid::from_u128(0x7053_0001).to_string()),
        event_type: Some("notebook_opened".into()),
        event_time: Some("2026-04-01T10:00:00Z".into()),
        email_address: Some("HANAKO@example.ac.jp".into()),
        user_name: Some("山田 花子".into()),
        team_name: Some("A".into()),
        notebook_path: Some("lesson1.ipynb".into()),
        ..WireEvent::default()
    };
    let event = StreamEvent {
        class_id: class,
        event: validate(wire, time)?,
    };
    let outcome = pg::write_batch(&pool, &[event]).await?;
    assert_eq!(outcome.inserted, 1);
    assert_eq!(count(&pool, STUDENTS, class).await?, 1);
    let owner: Uuid = sqlx::query_scalar("SELECT student_id FROM events WHERE class_id = $1")
        .bind(class.0)
        .fetch_one(&pool)
        .await?;
    assert_eq!(owner, student.0);

    assert!(roster::remove(&pool, None, class, student).await?);
    assert!(!roster::remove(&pool, None, class, student).await?);
    assert!(roster::page(&pool, class, None, 10).await?.is_empty());
    // Removal keeps the student's events.
    assert_eq!(count(&pool, STUDENTS, class).await?, 1);
    Ok(())
}
