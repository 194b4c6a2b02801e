//! Each backend, reached through this test's own fault proxy, round-trips
//! real data; each test's data is its own.

use cellmon_testkit::fixture::TestBackends;
use cellmon_testkit::influx::InfluxClient;
use redis::AsyncCommands as _;
use redis::streams::StreamRangeReply;
use sqlx::{Connection as _, PgConnection, Row as _};

#[tokio::test]
async fn postgres_insert_then_select_through_the_proxy() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let mut conn = PgConnection::connect(&backends.pg_url()).await?;
    sqlx::query("CREATE TABLE notes (id int PRIMARY KEY, body text NOT NULL)")
        .execute(&mut conn)
        .await?;
    sqlx::query("INSERT INTO notes SELECT i, 'チーム' || i FROM generate_series(1, 50) i")
        .execute(&mut conn)
        .await?;
    let row = sqlx::query("SELECT count(*) AS n, max(body) AS last FROM notes")
        .fetch_one(&mut conn)
        .await?;
    assert_eq!(row.get::<i64, _>("n"), 50);
    assert_eq!(row.get::<String, _>("last"), "チーム9");
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut conn)
        .await?;
    assert_eq!(db, backends.pg_database());
    assert!(backends.stack.postgres.proxy().accepted() >= 1);
    Ok(())
}

#[tokio::test]
async fn each_test_gets_its_own_database_cloned_from_the_template() -> anyhow::Result<()> {
    let first = TestBackends::shared().await?;
    let second = TestBackends::shared().await?;
    assert_ne!(first.pg_database(), second.pg_database());

    let mut a = PgConnection::connect(&first.pg_url()).await?;
    sqlx::query("CREATE TABLE only_in_first (x int)")
        .execute(&mut a)
        .await?;
    let mut b = PgConnection::connect(&second.pg_url()).await?;
    let visible: Option<String> = sqlx::query_scalar("SELECT to_regclass('only_in_first')::text")
        .fetch_one(&mut b)
        .await?;
    assert_eq!(visible, None);

    // Both were copied from the template, which is marked as one and
    // refuses connections so it can never block a clone.
    let template: (bool, bool) =
        sqlx::query_as("SELECT datistemplate, datallowconn FROM pg_database WHERE datname = $1")
            .bind(cellmon_testkit::pg::TEMPLATE_DB)
            .fetch_one(&mut b)
            .await?;
    assert_eq!(template, (true, false));
    Ok(())
}

#[tokio::test]
async fn redis_xadd_then_xrange_through_the_proxy() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let client = redis::Client::open(backends.redis_url())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let stream = backends.redis_key("events");
    let mut ids = Vec::new();
    for i in 0..3 {
        let id: String = conn
            .xadd(
                &stream,
                "*",
                &[("event_id", format!("e{i}")), ("team", "チームA".into())],
            )
            .await?;
        ids.push(id);
    }
    let reply: StreamRangeReply = conn.xrange_all(&stream).await?;
    let got: Vec<(String, Option<String>)> = reply
        .ids
        .iter()
        .map(|entry| (entry.id.clone(), entry.get::<String>("event_id")))
        .collect();
    assert_eq!(
        got,
        ids.iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), Some(format!("e{i}"))))
            .collect::<Vec<_>>()
    );
    assert!(stream.starts_with(backends.redis_prefix()));
    Ok(())
}

#[tokio::test]
async fn redis_prefixes_keep_tests_apart() -> anyhow::Result<()> {
    let first = TestBackends::shared().await?;
    let second = TestBackends::shared().await?;
    let client = redis::Client::open(first.redis_url())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let _: () = conn.set(first.redis_key("k"), 1).await?;
    let other: Option<i64> = conn.get(second.redis_key("k")).await?;
    assert_eq!(other, None);
    Ok(())
}

#[tokio::test]
async fn influx_line_protocol_write_then_influxql_count() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let influx = InfluxClient::new(&backends.influx_url())?;
    let db = backends.influx_database();
    let lines: String = (0..25)
        .map(|i| {
            format!(
                "cell_execution,team=チームA,event_type=cell_executed event_id=\"e{i}\",duration_ms={}.5 {}\n",
                i,
                1_775_037_600_000_000_000u64 + i
            )
        })
        .collect();
    influx.write(db, &lines).await?;
    assert_eq!(influx.count(db, "cell_execution", "event_id").await?, 25);
    // Writing the same points again rewrites them: same series, same time.
    influx.write(db, &lines).await?;
    assert_eq!(influx.count(db, "cell_execution", "event_id").await?, 25);
    // Another test's database sees none of it.
    let other = TestBackends::shared().await?;
    assert_eq!(
        influx
            .count(other.influx_database(), "cell_execution", "event_id")
            .await?,
        0
    );
    Ok(())
}

#[tokio::test]
async fn every_proxy_follows_its_container() -> anyhow::Result<()> {
    // The setup script hands over the shared containers' ids with their
    // addresses, so a test's own proxies can follow them if they move
    // (private containers are followed by their owner's proxies).
    let backends = TestBackends::shared().await?;
    for kind in cellmon_testkit::backend::BackendKind::ALL {
        let proxy = backends.backend(kind).proxy();
        assert!(
            proxy.is_following(),
            "{} proxy follows nothing",
            kind.name()
        );
    }
    Ok(())
}
