//! Class CRUD against a real Postgres.

use cellmon_domain::lms::ClassId;
use cellmon_store::classes::{self, ClassSettings};
use cellmon_store::pg;
use cellmon_testkit::fixture::TestBackends;
use uuid::Uuid;

#[tokio::test]
async fn classes_are_created_updated_paged_and_deleted_with_audit() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let pool = pg::pool(&pg::PgConfig {
        url: backends.pg_url(),
        max_connections: 4,
        timeout: std::time::Duration::from_secs(10),
    })?;
    let admin = Uuid::from_u128(0xad);
    let ids: Vec<ClassId> = (0..5)
        .map(|i| ClassId(Uuid::from_u128(0xc1a0 + i)))
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let settings = ClassSettings {
            name: Some(format!("クラス {i}")),
            ..ClassSettings::default()
        };
        let created = classes::create_class(&pool, Some(admin), *id, &settings).await?;
        assert_eq!(
            (
                created.consecutive_error_threshold,
                created.idle_after_seconds
            ),
            (3, 300)
        );
    }
    // Outside the schema's limits: refused, nothing written.
    let bad = ClassSettings {
        name: Some("bad".into()),
        consecutive_error_threshold: Some(0),
        ..ClassSettings::default()
    };
    let error = classes::create_class(&pool, Some(admin), ClassId(Uuid::from_u128(0xbad)), &bad)
        .await
        .expect_err("threshold 0 is refused");
    assert!(!error.is_transient());
    assert_eq!(
        classes::get_class(&pool, ClassId(Uuid::from_u128(0xbad))).await?,
        None
    );

    let changes = ClassSettings {
        idle_after_seconds: Some(120),
        ..ClassSettings::default()
    };
    let updated = classes::update_class(&pool, Some(admin), ids[1], &changes)
        .await?
        .expect("class exists");
    assert_eq!(
        (updated.name.as_str(), updated.idle_after_seconds),
        ("クラス 1", 120)
    );
    let missing = ClassId(Uuid::from_u128(0xdead));
    assert_eq!(
        classes::update_class(&pool, Some(admin), missing, &changes).await?,
        None
    );

    let first = classes::page_classes(&pool, None, 3).await?;
    let rest = classes::page_classes(&pool, first.last().map(|c| c.id), 3).await?;
    let paged: Vec<Uuid> = first.iter().chain(&rest).map(|c| c.id).collect();
    assert_eq!(paged, ids.iter().map(|c| c.0).collect::<Vec<_>>());

    classes::add_instructor(&pool, Uuid::from_u128(0x1), "t@example.jp", "T").await?;
    classes::assign(&pool, ids[0], Uuid::from_u128(0x1)).await?;
    assert!(classes::unassign(&pool, ids[0], Uuid::from_u128(0x1)).await?);
    assert!(!classes::unassign(&pool, ids[0], Uuid::from_u128(0x1)).await?);

    assert!(classes::delete_class(&pool, Some(admin), ids[4]).await?);
    assert!(!classes::delete_class(&pool, Some(admin), ids[4]).await?);
    assert_eq!(classes::get_class(&pool, ids[4]).await?, None);

    let actions: Vec<String> =
        sqlx::query_scalar("SELECT action FROM audit_log WHERE actor_id = $1 ORDER BY id")
            .bind(admin)
            .fetch_all(&pool)
            .await?;
    let mut expected = vec!["class.create"; 5];
    expected.extend(["class.update", "class.delete"]);
    assert_eq!(actions, expected);
    Ok(())
}
