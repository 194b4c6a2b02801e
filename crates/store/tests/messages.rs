//! Help conversations and class lookups against a real Postgres.

use cellmon_domain::envelope::StreamEvent;
use cellmon_domain::event::StudentKey;
use cellmon_domain::fields::Email;
use cellmon_domain::lms::{ClassId, StudentId};
use cellmon_domain::{WireEvent, validate};
use cellmon_store::messages::{
    self, BodyError, DirectMessage, MAX_BODY_CHARS, Sender, UnreadFromInstructor, UnreadThread,
    check_body,
};
use cellmon_store::{classes, ids, pg};
use cellmon_testkit::fixture::TestBackends;
use sqlx::PgPool;
use time::macros::datetime;
use uuid::Uuid;

use Sender::{Instructor, Student};

async fn pool(backends: &TestBackends) -> anyhow::Result<PgPool> {
    Ok(pg::pool(&pg::PgConfig {
        url: backends.pg_url(),
        max_connections: 4,
        timeout: std::time::Duration::from_secs(10),
    })?)
}

/// Puts students (`name@example.ac.jp`) in `class` the way they appear: by
/// their first event.
async fn students(pool: &PgPool, class: ClassId, names: &[&str]) -> anyhow::Result<Vec<StudentId>> {
    let time = datetime!(2026-04-01 10:00 UTC);
    let batch = names
        .iter()
        .map(|name| {
            let wire = WireEvent {
                event_id: Some(Uuid::new_v4().to_string()),
                event_type: Some("notebook_opened".into()),
                event_time: Some("2026-04-01T10:00:00Z".into()),
                email_address: Some(format!("{name}@example.ac.jp")),
                user_name: Some(format!("学生 {name}")),
                notebook_path: Some("lesson1.ipynb".into()),
                ..WireEvent::default()
            };
            Ok(StreamEvent {
                class_id: class,
                event: validate(wire, time)?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    pg::write_batch(pool, &batch).await?;
    names
        .iter()
        .map(|name| {
            let email = Email::parse(&format!("{name}@example.ac.jp"))?;
            Ok(ids::student(class, &StudentKey::Email(email)))
        })
        .collect()
}

/// A class with a name and no token, taught by the given instructors (who
/// are created as `<n>@teachers.example` named "Teacher <n>").
async fn class(pool: &PgPool, id: u128, instructors: &[Uuid]) -> anyhow::Result<ClassId> {
    let class = ClassId(Uuid::from_u128(id));
    classes::register(pool, class, &format!("Class {id:x}"), None).await?;
    for instructor in instructors {
        classes::add_instructor(
            pool,
            *instructor,
            &format!("{instructor}@teachers.example"),
            &format!("Teacher {instructor}"),
        )
        .await?;
        classes::assign(pool, class, *instructor).await?;
    }
    Ok(class)
}

async fn stored_messages(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM direct_messages")
        .fetch_one(pool)
        .await?)
}

fn ids_of(page: &[DirectMessage]) -> Vec<i64> {
    page.iter().map(|m| m.id).collect()
}

#[tokio::test]
async fn messages_go_both_ways_and_page_newest_first() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let pool = pool(&backends).await?;
    let (teacher, other_teacher) = (Uuid::from_u128(0x1001), Uuid::from_u128(0x1002));
    let class = class(&pool, 0xc1a5_5001, &[teacher, other_teacher]).await?;
    let [a, b] = students(&pool, class, &["a", "b"]).await?[..] else {
        unreachable!()
    };

    let mut sent = Vec::new();
    for (n, sender) in [Student, Instructor, Student, Instructor, Student]
        .into_iter()
        .enumerate()
    {
        let message = messages::send(&pool, class, teacher, a, sender, &format!("m{n}"))
            .await?
            .expect("a is in the class and teacher teaches it");
        assert_eq!(
            (message.class_id, message.instructor_id, message.student_id),
            (class, teacher, a)
        );
        assert_eq!(
            (message.sender, message.body.as_str()),
            (sender, &*format!("m{n}"))
        );
        assert_eq!(message.read_at, None);
        sent.push(message);
    }
    // Other threads: same student with another instructor, another student.
    let elsewhere = messages::send(&pool, class, other_teacher, a, Instructor, "hi")
        .await?
        .expect("stored");
    messages::send(&pool, class, teacher, b, Student, "b's question")
        .await?
        .expect("stored");
    let ids: Vec<i64> = ids_of(&sent);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");

    // Newest first, `before` excludes, `limit` caps.
    let page = messages::history(&pool, class, teacher, a, None, 2).await?;
    assert_eq!(ids_of(&page), [ids[4], ids[3]]);
    assert_eq!(page[0], sent[4]);
    let page = messages::history(&pool, class, teacher, a, Some(ids[3]), 2).await?;
    assert_eq!(ids_of(&page), [ids[2], ids[1]]);
    let page = messages::history(&pool, class, teacher, a, Some(ids[1]), 2).await?;
    assert_eq!(ids_of(&page), [ids[0]]);
    let page = messages::history(&pool, class, teacher, a, Some(ids[0]), 2).await?;
    assert!(page.is_empty());
    // Limits are clamped to 1..=200.
    let page = messages::history(&pool, class, teacher, a, None, 0).await?;
    assert_eq!(ids_of(&page), [ids[4]]);
    let page = messages::history(&pool, class, teacher, a, None, -5).await?;
    assert_eq!(ids_of(&page), [ids[4]]);
    let page = messages::history(&pool, class, teacher, a, None, i64::MAX).await?;
    assert_eq!(ids_of(&page), [ids[4], ids[3], ids[2], ids[1], ids[0]]);

    // The student sees every instructor's thread, and only their own.
    let page = messages::student_history(&pool, class, a, None, 3).await?;
    assert_eq!(ids_of(&page), [elsewhere.id, ids[4], ids[3]]);
    let page = messages::student_history(&pool, class, a, Some(ids[3]), 10).await?;
    assert_eq!(ids_of(&page), [ids[2], ids[1], ids[0]]);

    // The wire form.
    let json = serde_json::to_value(&sent[1])?;
    assert_eq!(json["sender"], "instructor");
    assert_eq!(json["classId"], class.0.to_string());
    assert_eq!(json["studentId"], a.0.to_string());
    assert_eq!(json["instructorId"], teacher.to_string());
    assert_eq!(json["readAt"], serde_json::Value::Null);
    assert!(json["sentAt"].as_str().is_some_and(|t| t.ends_with('Z')));
    let back: DirectMessage = serde_json::from_value(json)?;
    assert_eq!(back, sent[1]);
    Ok(())
}

#[tokio::test]
async fn threads_that_cannot_exist_store_nothing() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let pool = pool(&backends).await?;
    let (teacher, outsider) = (Uuid::from_u128(0x2001), Uuid::from_u128(0x2002));
    let class_a = class(&pool, 0xc1a5_5002, &[teacher]).await?;
    let class_b = class(&pool, 0xc1a5_5003, &[outsider]).await?;
    let [a] = students(&pool, class_a, &["a"]).await?[..] else {
        unreachable!()
    };
    let [b] = students(&pool, class_b, &["b"]).await?[..] else {
        unreachable!()
    };

    // A student of another class (same e-mail or not).
    let [a_in_b] = students(&pool, class_b, &["a"]).await?[..] else {
        unreachable!()
    };
    for sender in [Instructor, Student] {
        for student in [b, a_in_b] {
            let sent = messages::send(&pool, class_a, teacher, student, sender, "x").await?;
            assert_eq!(sent, None);
        }
        // An instructor who does not teach the class, or does not exist.
        for instructor in [outsider, Uuid::from_u128(0x2999)] {
            let sent = messages::send(&pool, class_a, instructor, a, sender, "x").await?;
            assert_eq!(sent, None);
        }
        // A student who does not exist; a class that does not exist.
        let ghost = StudentId(Uuid::from_u128(0x2998));
        assert_eq!(
            messages::send(&pool, class_a, teacher, ghost, sender, "x").await?,
            None
        );
        let nowhere = ClassId(Uuid::from_u128(0x2997));
        assert_eq!(
            messages::send(&pool, nowhere, teacher, a, sender, "x").await?,
            None
        );
    }
    assert_eq!(stored_messages(&pool).await?, 0);

    // The schema refuses what check_body refuses, as a final error.
    for body in [String::new(), "x".repeat(MAX_BODY_CHARS + 1), "a\0b".into()] {
        let error = messages::send(&pool, class_a, teacher, a, Student, &body)
            .await
            .expect_err("refused");
        assert!(!error.is_transient(), "{error}");
    }
    assert_eq!(stored_messages(&pool).await?, 0);
    Ok(())
}

#[tokio::test]
async fn unread_counts_drop_as_each_side_reads() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let pool = pool(&backends).await?;
    let (teacher, colleague) = (Uuid::from_u128(0x3001), Uuid::from_u128(0x3002));
    let class = class(&pool, 0xc1a5_5004, &[teacher, colleague]).await?;
    let [a, b] = students(&pool, class, &["a", "b"]).await?[..] else {
        unreachable!()
    };
    let send = |instructor, student, sender| {
        let pool = pool.clone();
        async move {
            let message = messages::send(&pool, class, instructor, student, sender, "text").await?;
            anyhow::Ok(message.expect("stored").id)
        }
    };
    let from_a1 = send(teacher, a, Student).await?;
    let to_a1 = send(teacher, a, Instructor).await?;
    let from_a2 = send(teacher, a, Student).await?;
    let to_a2 = send(teacher, a, Instructor).await?;
    let from_a3 = send(teacher, a, Student).await?;
    let from_b = send(teacher, b, Student).await?;
    let colleague_to_a = send(colleague, a, Instructor).await?;

    assert_eq!(
        messages::unread_for_instructor(&pool, teacher).await?,
        [
            UnreadThread {
                class_id: class,
                student_id: b,
                unread: 1,
                newest_id: from_b
            },
            UnreadThread {
                class_id: class,
                student_id: a,
                unread: 3,
                newest_id: from_a3
            },
        ]
    );
    assert!(
        messages::unread_for_instructor(&pool, colleague)
            .await?
            .is_empty()
    );
    let teacher_name = format!("Teacher {teacher}");
    let colleague_name = format!("Teacher {colleague}");
    assert_eq!(
        messages::unread_for_student(&pool, class, a).await?,
        [
            UnreadFromInstructor {
                instructor_id: colleague,
                instructor_name: colleague_name.clone(),
                unread: 1,
                newest_id: colleague_to_a
            },
            UnreadFromInstructor {
                instructor_id: teacher,
                instructor_name: teacher_name.clone(),
                unread: 2,
                newest_id: to_a2
            },
        ]
    );
    assert!(
        messages::unread_for_student(&pool, class, b)
            .await?
            .is_empty()
    );

    // The instructor reads up to from_a2: only the student's messages up to
    // it are marked, once.
    let marked = messages::mark_read(&pool, class, teacher, a, Instructor, from_a2).await?;
    assert_eq!(marked, 2);
    assert_eq!(
        messages::mark_read(&pool, class, teacher, a, Instructor, from_a2).await?,
        0
    );
    let page = messages::history(&pool, class, teacher, a, None, 10).await?;
    let read: Vec<(i64, bool)> = page.iter().map(|m| (m.id, m.read_at.is_some())).collect();
    assert_eq!(
        read,
        [
            (from_a3, false),
            (to_a2, false),
            (from_a2, true),
            (to_a1, false),
            (from_a1, true)
        ]
    );
    let unread = messages::unread_for_instructor(&pool, teacher).await?;
    let counts: Vec<(StudentId, i64)> = unread.iter().map(|t| (t.student_id, t.unread)).collect();
    assert_eq!(counts, [(b, 1), (a, 1)]);
    // ... and the student's side is untouched.
    assert_eq!(
        messages::unread_for_student(&pool, class, a).await?.len(),
        2
    );

    // The student reads the teacher's thread: the colleague's stays unread.
    assert_eq!(
        messages::mark_read(&pool, class, teacher, a, Student, i64::MAX).await?,
        2
    );
    assert_eq!(
        messages::unread_for_student(&pool, class, a).await?,
        [UnreadFromInstructor {
            instructor_id: colleague,
            instructor_name: colleague_name,
            unread: 1,
            newest_id: colleague_to_a
        }]
    );
    // The student marked nothing of their own.
    let unread = messages::unread_for_instructor(&pool, teacher).await?;
    assert_eq!(unread.iter().map(|t| t.unread).sum::<i64>(), 2);

    // An instructor who stops teaching the class stops seeing its threads.
    sqlx::query("DELETE FROM class_instructors WHERE instructor_id = $1")
        .bind(teacher)
        .execute(&pool)
        .await?;
    assert!(
        messages::unread_for_instructor(&pool, teacher)
            .await?
            .is_empty()
    );
    assert!(
        messages::unread_messages_for_instructor(&pool, teacher, 10)
            .await?
            .is_empty()
    );
    Ok(())
}

#[tokio::test]
async fn unread_messages_are_delivered_oldest_first_and_capped() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let pool = pool(&backends).await?;
    let (teacher, colleague) = (Uuid::from_u128(0x4001), Uuid::from_u128(0x4002));
    let class = class(&pool, 0xc1a5_5005, &[teacher, colleague]).await?;
    let [a, b] = students(&pool, class, &["a", "b"]).await?[..] else {
        unreachable!()
    };
    let mut expected = Vec::new();
    for (student, sender, instructor) in [
        (a, Student, teacher),
        (b, Student, teacher),
        (a, Instructor, teacher),
        (a, Student, colleague),
        (b, Student, teacher),
        (a, Student, teacher),
    ] {
        let message = messages::send(&pool, class, instructor, student, sender, "q")
            .await?
            .expect("stored");
        if sender == Student && instructor == teacher {
            expected.push(message);
        }
    }
    let all = messages::unread_messages_for_instructor(&pool, teacher, 100).await?;
    assert_eq!(all, expected);
    let capped = messages::unread_messages_for_instructor(&pool, teacher, 3).await?;
    assert_eq!(capped, expected[..3]);
    let one = messages::unread_messages_for_instructor(&pool, teacher, 0).await?;
    assert_eq!(one, expected[..1]);

    messages::mark_read(&pool, class, teacher, a, Instructor, expected[0].id).await?;
    let rest = messages::unread_messages_for_instructor(&pool, teacher, 100).await?;
    assert_eq!(rest, expected[1..]);
    Ok(())
}

#[tokio::test]
async fn students_are_found_by_email_within_their_class() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let pool = pool(&backends).await?;
    let class_a = class(&pool, 0xc1a5_5006, &[]).await?;
    let class_b = class(&pool, 0xc1a5_5007, &[]).await?;
    let [a] = students(&pool, class_a, &["hanako"]).await?[..] else {
        unreachable!()
    };
    let stored: String = sqlx::query_scalar("SELECT student_key FROM students WHERE id = $1")
        .bind(a.0)
        .fetch_one(&pool)
        .await?;
    assert_eq!(
        stored, "hanako@example.ac.jp",
        "the writer stores the bare address"
    );

    let found = |class, email: &'static str| {
        let pool = pool.clone();
        async move { messages::student_by_email(&pool, class, email).await }
    };
    assert_eq!(found(class_a, "hanako@example.ac.jp").await?, Some(a));
    assert_eq!(found(class_a, "  Hanako@Example.AC.jp ").await?, Some(a));
    assert_eq!(found(class_b, "hanako@example.ac.jp").await?, None);
    assert_eq!(found(class_a, "taro@example.ac.jp").await?, None);
    assert_eq!(found(class_a, "not an address").await?, None);
    assert_eq!(found(class_a, "").await?, None);
    Ok(())
}

#[tokio::test]
async fn classes_are_found_by_token_and_know_their_instructors() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let pool = pool(&backends).await?;
    let class_a = ClassId(Uuid::from_u128(0xc1a5_5008));
    let class_b = ClassId(Uuid::from_u128(0xc1a5_5009));
    classes::register(&pool, class_a, "Python 1", Some("token-a")).await?;
    classes::register(&pool, class_b, "Python 2", Some("token-b")).await?;
    assert_eq!(
        classes::class_for_token(&pool, "token-a").await?,
        Some(class_a)
    );
    assert_eq!(
        classes::class_for_token(&pool, "token-b").await?,
        Some(class_b)
    );
    assert_eq!(classes::class_for_token(&pool, "token-c").await?, None);
    assert_eq!(classes::class_for_token(&pool, "").await?, None);

    // Only digests are stored.
    let digest: Vec<u8> =
        sqlx::query_scalar("SELECT token_sha256 FROM class_ingest_tokens WHERE class_id = $1")
            .bind(class_a.0)
            .fetch_one(&pool)
            .await?;
    assert_eq!(digest, classes::token_digest("token-a"));

    // Registering again renames and replaces the token; None removes it.
    classes::register(&pool, class_a, "Python 1 (2026)", Some("token-a2")).await?;
    assert_eq!(classes::class_for_token(&pool, "token-a").await?, None);
    assert_eq!(
        classes::class_for_token(&pool, "token-a2").await?,
        Some(class_a)
    );
    let name: String = sqlx::query_scalar("SELECT name FROM classes WHERE id = $1")
        .bind(class_a.0)
        .fetch_one(&pool)
        .await?;
    assert_eq!(name, "Python 1 (2026)");
    classes::register(&pool, class_b, "Python 2", None).await?;
    assert_eq!(classes::class_for_token(&pool, "token-b").await?, None);
    // A token is one class's.
    let taken = classes::register(&pool, class_b, "Python 2", Some("token-a2")).await;
    assert!(taken.is_err_and(|e| !e.is_transient()));

    let (t1, t2) = (Uuid::from_u128(0x6001), Uuid::from_u128(0x6002));
    classes::add_instructor(&pool, t2, "t2@teachers.example", "T2").await?;
    classes::add_instructor(&pool, t1, "t1@teachers.example", "T1").await?;
    classes::add_instructor(&pool, t1, "t1@teachers.example", "T1 renamed").await?;
    classes::assign(&pool, class_a, t2).await?;
    classes::assign(&pool, class_a, t1).await?;
    classes::assign(&pool, class_a, t1).await?;
    assert_eq!(classes::instructors_of(&pool, class_a).await?, [t1, t2]);
    assert!(classes::instructors_of(&pool, class_b).await?.is_empty());
    assert!(classes::teaches(&pool, t1, class_a).await?);
    assert!(!classes::teaches(&pool, t1, class_b).await?);
    let name: String = sqlx::query_scalar("SELECT name FROM instructors WHERE id = $1")
        .bind(t1)
        .fetch_one(&pool)
        .await?;
    assert_eq!(name, "T1 renamed");
    Ok(())
}

#[test]
fn bodies_are_trimmed_and_bounded() {
    assert_eq!(
        check_body("  Why does cell 3 fail?\n"),
        Ok("Why does cell 3 fail?")
    );
    assert_eq!(check_body("line 1\n\tline 2"), Ok("line 1\n\tline 2"));
    assert_eq!(check_body(""), Err(BodyError::Empty));
    assert_eq!(check_body(" \n\t\u{3000} "), Err(BodyError::Empty));
    assert_eq!(check_body("a\0b"), Err(BodyError::Nul));
    let longest = "あ".repeat(MAX_BODY_CHARS);
    assert_eq!(check_body(&longest), Ok(longest.as_str()));
    assert_eq!(
        check_body(&format!("  {longest}  ")),
        Ok(longest.as_str()),
        "surrounding whitespace does not count"
    );
    assert_eq!(
        check_body(&"x".repeat(MAX_BODY_CHARS + 1)),
        Err(BodyError::TooLong {
            chars: MAX_BODY_CHARS + 1
        })
    );
    assert_eq!(
        serde_json::to_value(Sender::Student).ok(),
        Some(serde_json::json!("student"))
    );
}
