//! Container-level faults on private backends: stop and start (the host
//! port may change, the proxy address does not), pause, SIGKILL, and a
//! `docker restart` done behind the kit's back.
//! This binary runs in the `containers` test group, one test at a time.

use std::net::SocketAddr;
use std::time::Duration;

use cellmon_testkit::backend::Backend;
use cellmon_testkit::docker::Docker;
use cellmon_testkit::fixture::TestBackends;
use cellmon_testkit::influx::InfluxClient;
use redis::AsyncCommands as _;
use sqlx::{Connection as _, PgConnection};

const PATIENCE: Duration = Duration::from_secs(30);
/// How soon a backend restarted by hand must answer through its proxy again.
const FOLLOW_BOUND: Duration = Duration::from_secs(5);

#[tokio::test]
async fn backends_restarted_by_hand_are_reached_through_the_same_proxy_address()
-> anyhow::Result<()> {
    let backends = TestBackends::private().await?;
    let docker = Docker::connect().await?;
    let stack = &backends.stack;
    for backend in [&stack.redis, &stack.postgres, &stack.influx] {
        let kind = backend.kind();
        let container = backend
            .container()
            .expect("private backends own their containers");
        let before = container.host_port().await?;
        // A second proxy that knows the container by id only, as each
        // test's proxies know the run's shared containers.
        let by_id = Backend::attach_container(
            &docker,
            kind,
            SocketAddr::from(([127, 0, 0, 1], before)),
            container.id(),
        )
        .await?;
        kind.probe(backend.addr()).await?;
        kind.probe(by_id.addr()).await?;

        cellmon_testkit::docker::restart_by_hand(container.id()).await?;
        let after = container.host_port().await?;
        assert_ne!(
            before,
            after,
            "{} came back on the same host port: nothing to follow",
            kind.name()
        );
        for proxy in [backend.proxy(), by_id.proxy()] {
            cellmon_testkit::eventually(FOLLOW_BOUND, || kind.probe(proxy.addr()))
                .await
                .map_err(|e| e.context(format!("{} through {}", kind.name(), proxy.addr())))?;
            assert_eq!(proxy.upstream().port(), after);
            assert!(proxy.resolutions() >= 1);
        }
    }
    Ok(())
}

#[tokio::test]
async fn stopped_and_started_backends_are_reachable_at_the_same_proxy_address() -> anyhow::Result<()>
{
    let backends = TestBackends::private().await?;
    let stack = &backends.stack;
    let addrs = [
        stack.postgres.addr(),
        stack.redis.addr(),
        stack.influx.addr(),
    ];

    // Data in each backend before the stop.
    let mut pg = PgConnection::connect(&backends.pg_url()).await?;
    sqlx::query("CREATE TABLE kept (x int)")
        .execute(&mut pg)
        .await?;
    sqlx::query("INSERT INTO kept VALUES (7)")
        .execute(&mut pg)
        .await?;
    pg.close().await?;
    let redis = redis::Client::open(backends.redis_url())?;
    let mut conn = redis.get_multiplexed_async_connection().await?;
    let stream = backends.redis_key("events");
    let _: String = conn.xadd(&stream, "*", &[("event_id", "e1")]).await?;
    drop(conn);
    let influx = InfluxClient::new(&backends.influx_url())?;
    influx
        .write(
            backends.influx_database(),
            "m,t=a event_id=\"e1\" 1775037600000000000\n",
        )
        .await?;

    for backend in [&stack.postgres, &stack.redis, &stack.influx] {
        backend.stop(Duration::from_secs(10)).await?;
    }
    // Stopped means unreachable through the proxy.
    assert!(PgConnection::connect(&backends.pg_url()).await.is_err());
    assert!(influx.ping().await.is_err());

    for backend in [&stack.postgres, &stack.redis, &stack.influx] {
        backend.start_again().await?;
    }
    assert_eq!(
        [
            stack.postgres.addr(),
            stack.redis.addr(),
            stack.influx.addr()
        ],
        addrs,
        "proxy addresses must not move"
    );
    // Behind them, each proxy follows its container to wherever Docker
    // published it this time.
    for backend in [&stack.postgres, &stack.redis, &stack.influx] {
        let container = backend
            .container()
            .expect("private backends own their containers");
        assert_eq!(
            backend.proxy().upstream().port(),
            container.host_port().await?
        );
    }

    // Same addresses, same data.
    let mut pg = PgConnection::connect(&backends.pg_url()).await?;
    let x: i32 = sqlx::query_scalar("SELECT x FROM kept")
        .fetch_one(&mut pg)
        .await?;
    assert_eq!(x, 7);
    let mut conn = redis.get_multiplexed_async_connection().await?;
    let len: usize = conn.xlen(&stream).await?;
    assert_eq!(len, 1);
    assert_eq!(
        influx
            .count(backends.influx_database(), "m", "event_id")
            .await?,
        1
    );
    Ok(())
}

#[tokio::test]
async fn paused_redis_hangs_clients_until_unpaused() -> anyhow::Result<()> {
    let backends = TestBackends::private().await?;
    let client = redis::Client::open(backends.redis_url())?;
    // redis-rs gives up after 500 ms by default; this test watches the
    // hang itself.
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(PATIENCE));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let _: String = redis::cmd("PING").query_async(&mut conn).await?;

    backends.stack.redis.pause().await?;
    let stalled = tokio::time::timeout(
        Duration::from_millis(700),
        redis::cmd("PING").query_async::<String>(&mut conn),
    )
    .await;
    assert!(stalled.is_err(), "a paused Redis answered: {stalled:?}");

    backends.stack.redis.unpause().await?;
    let pong: String =
        tokio::time::timeout(PATIENCE, redis::cmd("PING").query_async(&mut conn)).await??;
    assert_eq!(pong, "PONG");
    Ok(())
}

#[tokio::test]
async fn sigkilled_redis_keeps_acknowledged_stream_entries() -> anyhow::Result<()> {
    // AOF is on: every XADD Redis acknowledged survives SIGKILL.
    let backends = TestBackends::private().await?;
    let client = redis::Client::open(backends.redis_url())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let stream = backends.redis_key("events");
    for i in 0..500 {
        let _: String = conn.xadd(&stream, "*", &[("event_id", i)]).await?;
    }
    backends.stack.redis.kill().await?;
    backends.stack.redis.start_again().await?;
    let mut conn = cellmon_testkit::eventually(PATIENCE, || async {
        Ok(client.get_multiplexed_async_connection().await?)
    })
    .await?;
    let len: usize = conn.xlen(&stream).await?;
    assert_eq!(len, 500);
    Ok(())
}
