//! Each fault the proxy injects is seen by a real client of a real backend,
//! and clearing it restores service. The proxies are this test's own, so
//! the shared backends behind them are unaffected.

use std::time::{Duration, Instant};

use cellmon_testkit::fixture::TestBackends;
use cellmon_testkit::proxy::Fault;
use redis::aio::MultiplexedConnection;
use sqlx::{Connection as _, PgConnection};

const PATIENCE: Duration = Duration::from_secs(10);

async fn redis_conn(url: &str) -> anyhow::Result<MultiplexedConnection> {
    let client = redis::Client::open(url)?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(5)));
    Ok(client
        .get_multiplexed_async_connection_with_config(&config)
        .await?)
}

async fn ping(conn: &mut MultiplexedConnection) -> anyhow::Result<()> {
    let pong: String = redis::cmd("PING").query_async(conn).await?;
    anyhow::ensure!(pong == "PONG", "unexpected reply {pong}");
    Ok(())
}

#[tokio::test]
async fn down_closes_connections_and_clearing_restores_service() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let proxy = backends.stack.redis.proxy();
    let url = backends.redis_url();
    let mut open = redis_conn(&url).await?;
    ping(&mut open).await?;

    proxy.set_fault(Fault::Down);
    // The open connection is closed under the client ...
    let err = ping(&mut open)
        .await
        .expect_err("PING on a closed connection");
    let redis_err = err
        .downcast_ref::<redis::RedisError>()
        .expect("a Redis client error");
    assert!(
        redis_err.is_connection_dropped() || redis_err.is_io_error(),
        "expected a dropped connection, got {redis_err:?}"
    );
    // ... and new ones do not get through.
    let fresh = async { ping(&mut redis_conn(&url).await?).await };
    assert!(
        fresh.await.is_err(),
        "a new connection got through a Down proxy"
    );

    proxy.clear();
    let mut again = redis_conn(&url).await?;
    ping(&mut again).await?;
    Ok(())
}

#[tokio::test]
async fn hang_stalls_requests_until_cleared() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let proxy = backends.stack.redis.proxy();
    let mut conn = redis_conn(&backends.redis_url()).await?;
    ping(&mut conn).await?;

    proxy.set_fault(Fault::Hang);
    let mut stalled = conn.clone();
    let pending = tokio::spawn(async move { ping(&mut stalled).await });
    // Nothing comes back while the proxy hangs ...
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!pending.is_finished(), "a reply got through a hung proxy");

    // ... and the held request completes once the fault is cleared: the
    // bytes were held, not dropped.
    proxy.clear();
    tokio::time::timeout(PATIENCE, pending).await???;
    ping(&mut conn).await?;
    Ok(())
}

#[tokio::test]
async fn reset_breaks_postgres_connections_until_cleared() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let proxy = backends.stack.postgres.proxy();
    let url = backends.pg_url();
    let mut conn = PgConnection::connect(&url).await?;
    sqlx::query("SELECT 1").execute(&mut conn).await?;

    proxy.set_fault(Fault::Reset);
    let err = sqlx::query("SELECT 1")
        .execute(&mut conn)
        .await
        .expect_err("query on a reset connection");
    // A reset, not a clean close (which sqlx would report as UnexpectedEof).
    let sqlx::Error::Io(io) = &err else {
        panic!("expected an I/O error, got {err:?}");
    };
    assert!(
        matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
        "expected a reset, got {io:?}"
    );
    let refused = PgConnection::connect(&url).await;
    assert!(
        refused.is_err(),
        "a new connection got through a Reset proxy"
    );

    proxy.clear();
    let mut again = PgConnection::connect(&url).await?;
    let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&mut again).await?;
    assert_eq!(one, 1);
    Ok(())
}

#[tokio::test]
async fn latency_delays_every_round_trip_until_cleared() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let proxy = backends.stack.redis.proxy();
    let mut conn = redis_conn(&backends.redis_url()).await?;
    ping(&mut conn).await?;

    let delay = Duration::from_millis(150);
    proxy.set_fault(Fault::Latency(delay));
    for _ in 0..3 {
        let started = Instant::now();
        ping(&mut conn).await?;
        // The request and the reply are each held for `delay`.
        assert!(
            started.elapsed() >= delay * 2,
            "round trip took {:?} under {delay:?} of latency each way",
            started.elapsed()
        );
    }

    proxy.clear();
    // Ten round trips in less time than one delayed round trip would take:
    // no latency is left.
    let started = Instant::now();
    for _ in 0..10 {
        ping(&mut conn).await?;
    }
    assert!(
        started.elapsed() < delay * 2 * 10,
        "still slow after clearing: {:?}",
        started.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn influx_down_then_restored() -> anyhow::Result<()> {
    let backends = TestBackends::shared().await?;
    let influx = cellmon_testkit::influx::InfluxClient::new(&backends.influx_url())?;
    influx.ping().await?;
    backends.stack.influx.proxy().set_fault(Fault::Down);
    assert!(influx.ping().await.is_err());
    backends.stack.influx.proxy().clear();
    cellmon_testkit::eventually(PATIENCE, || influx.ping()).await?;
    Ok(())
}
