//! Helpers shared by the gateway's test binaries (each uses a subset): a
//! gateway in this process on real Redis and Postgres, classes and
//! instructors in Postgres, live messages published the way the persister
//! publishes them, and a real WebSocket client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use cellmon_bus::StreamKeys;
use cellmon_domain::live::Unnumbered;
use cellmon_domain::lms::{ClassId, StudentId};
use cellmon_gateway::auth::Verifier;
use cellmon_gateway::metrics::Metrics;
use cellmon_gateway::{AppState, Config};
use cellmon_store::classes;
use cellmon_testkit::fixture::TestBackends;
use futures_util::{SinkExt as _, StreamExt as _};
use redis::aio::MultiplexedConnection;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

/// How long a test waits for one message before it fails.
pub(crate) const WAIT: Duration = Duration::from_secs(15);

/// A gateway running in this test's process.
pub(crate) struct Gateway {
    pub(crate) addr: SocketAddr,
    pub(crate) state: AppState,
    pub(crate) pool: PgPool,
    pub(crate) redis: MultiplexedConnection,
    pub(crate) keys: StreamKeys,
    pub(crate) verifier: Verifier,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Gateway {
    pub(crate) async fn start(
        backends: &TestBackends,
        tune: impl FnOnce(&mut Config),
    ) -> anyhow::Result<Self> {
        let secret = format!("secret-{}", Uuid::new_v4().simple());
        let mut config = Config {
            jwt_secret: secret.clone().into(),
            allowed_origins: vec!["https://dash.example.edu".into()],
            ..Config::default()
        };
        config.redis.url = backends.redis_url().into();
        config.redis.prefix = backends.redis_prefix().to_owned();
        config.postgres.url = backends.pg_url().into();
        tune(&mut config);
        let verifier = Verifier::new(&config.jwt_secret, 0, config.ticket_lifetime.as_secs());
        let keys = StreamKeys::new(config.redis.prefix.clone(), std::num::NonZeroU16::MIN);
        let state = cellmon_gateway::state(config, Metrics::new()?)?;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let done = tokio::spawn(cellmon_gateway::serve_state(
            state.clone(),
            listener,
            async {
                let _ = stopped.await;
            },
        ));
        let pool = cellmon_store::pg::pool(&cellmon_store::pg::PgConfig {
            url: backends.pg_url(),
            max_connections: 4,
            timeout: Duration::from_secs(10),
        })?;
        let redis = redis::Client::open(backends.redis_url())?
            .get_multiplexed_async_connection()
            .await?;
        let gateway = Self {
            addr,
            state,
            pool,
            redis,
            keys,
            verifier,
            stop: Some(stop),
            done: Some(done),
        };
        // The pub/sub subscription is made in the background; wait for it
        // so a test's first message is not published before it.
        wait_until(|| async { gateway.state.metrics().pubsub_connects.get() >= 1 }).await?;
        Ok(gateway)
    }

    pub(crate) fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub(crate) fn http(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the gateway (sockets get 1001) and waits for it.
    pub(crate) async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(done) = self.done.take() {
            done.await??;
        }
        Ok(())
    }

    /// A new class with an ingest token.
    pub(crate) async fn class(&self) -> anyhow::Result<(ClassId, String)> {
        let class = ClassId::random();
        let token = format!("tok-{}", Uuid::new_v4().simple());
        classes::register(&self.pool, class, "Test class", Some(&token)).await?;
        Ok((class, token))
    }

    /// A new instructor teaching `teaches`, and a token for them.
    pub(crate) async fn instructor(&self, teaches: &[ClassId]) -> anyhow::Result<(Uuid, String)> {
        let id = Uuid::new_v4();
        classes::add_instructor(&self.pool, id, &format!("{id}@example.edu"), "Instructor").await?;
        for class in teaches {
            classes::assign(&self.pool, *class, id).await?;
        }
        Ok((id, self.verifier.issue_token(id, 600)?))
    }

    /// Publishes `count` student updates to a class as the persister does
    /// (one script call per `per_call`); the updates' `executions` count
    /// from `first`. Returns the last offset.
    pub(crate) async fn publish(
        &mut self,
        class: ClassId,
        first: u32,
        count: u32,
        per_call: u32,
    ) -> anyhow::Result<u64> {
        let mut last = 0;
        let mut n = first;
        while n < first + count {
            let batch: Vec<Unnumbered> = (n..(n + per_call).min(first + count))
                .map(|i| update(class, i))
                .collect();
            n += u32::try_from(batch.len())?;
            let (_, offset) =
                cellmon_bus::live::publish(&mut self.redis, &self.keys, class, &batch).await?;
            last = offset;
        }
        Ok(last)
    }

    pub(crate) async fn connect(&self, token: &str) -> anyhow::Result<Ws> {
        Ws::connect(&self.url(), Some(token), None).await
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A student update whose `executions` is `n`.
pub(crate) fn update(class: ClassId, n: u32) -> Unnumbered {
    cellmon_testkit::sample::student_update(class, u64::from(n))
}

/// Polls `check` every 20 ms until it is true, for at most [`WAIT`].
pub(crate) async fn wait_until<F, Fut>(mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A dashboard's socket.
pub(crate) struct Ws {
    pub(crate) stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What the server said when it closed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Next {
    Json(Value),
    Closed(Option<u16>),
}

impl Ws {
    /// Opens a socket with the token as a sub-protocol (or a `?ticket=` in
    /// `url`), and an `Origin` if given.
    pub(crate) async fn connect(
        url: &str,
        token: Option<&str>,
        origin: Option<&str>,
    ) -> anyhow::Result<Self> {
        let (stream, _) = tokio_tungstenite::connect_async(request(url, token, origin)?).await?;
        Ok(Self { stream })
    }

    pub(crate) async fn send(&mut self, value: Value) -> anyhow::Result<()> {
        self.stream.send(Message::text(value.to_string())).await?;
        Ok(())
    }

    /// The next JSON message, or the close; pings and pongs are skipped.
    pub(crate) async fn next(&mut self) -> anyhow::Result<Next> {
        loop {
            let frame = tokio::time::timeout(WAIT, self.stream.next())
                .await
                .map_err(|_| anyhow::anyhow!("no message within {WAIT:?}"))?;
            match frame {
                None => return Ok(Next::Closed(None)),
                Some(Err(
                    tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed,
                )) => {
                    return Ok(Next::Closed(None));
                }
                Some(Err(error)) => return Err(error.into()),
                Some(Ok(Message::Text(text))) => {
                    return Ok(Next::Json(serde_json::from_str(&text)?));
                }
                Some(Ok(Message::Close(frame))) => {
                    return Ok(Next::Closed(frame.map(|f| u16::from(f.code))));
                }
                Some(Ok(_)) => {}
            }
        }
    }

    /// The next JSON message; failing on a close.
    pub(crate) async fn json(&mut self) -> anyhow::Result<Value> {
        match self.next().await? {
            Next::Json(value) => Ok(value),
            Next::Closed(code) => anyhow::bail!("closed ({code:?}) while waiting for a message"),
        }
    }

    /// The next message, which must be of `kind`.
    pub(crate) async fn expect(&mut self, kind: &str) -> anyhow::Result<Value> {
        let value = self.json().await?;
        anyhow::ensure!(value["type"] == kind, "expected {kind}, got {value}");
        Ok(value)
    }

    /// Subscribes and returns the snapshot.
    pub(crate) async fn subscribe(&mut self, class: ClassId) -> anyhow::Result<Value> {
        self.send(json!({"type": "subscribe", "classId": class}))
            .await?;
        self.expect("snapshot").await
    }

    /// Reads `count` student updates and returns their offsets.
    pub(crate) async fn offsets(&mut self, count: usize) -> anyhow::Result<Vec<u64>> {
        let mut offsets = Vec::with_capacity(count);
        while offsets.len() < count {
            let value = self.expect("student_update").await?;
            offsets.push(value["offset"].as_u64().unwrap_or_default());
        }
        Ok(offsets)
    }

    pub(crate) async fn close(mut self) -> anyhow::Result<()> {
        self.stream
            .close(Some(tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            }))
            .await?;
        Ok(())
    }
}

/// The upgrade request a dashboard sends.
pub(crate) fn request(
    url: &str,
    token: Option<&str>,
    origin: Option<&str>,
) -> anyhow::Result<tungstenite::handshake::client::Request> {
    let mut request = url.into_client_request()?;
    let protocols = match token {
        Some(token) => format!("cellmon.v1, cellmon.jwt.{token}"),
        None => "cellmon.v1".to_owned(),
    };
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_str(&protocols)?);
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("Origin", HeaderValue::from_str(origin)?);
    }
    Ok(request)
}

/// The HTTP status an upgrade was refused with (`None`: it was accepted).
pub(crate) async fn refused_with(
    url: &str,
    token: Option<&str>,
    origin: Option<&str>,
) -> anyhow::Result<Option<u16>> {
    match tokio_tungstenite::connect_async(request(url, token, origin)?).await {
        Ok(_) => Ok(None),
        Err(tungstenite::Error::Http(response)) => Ok(Some(response.status().as_u16())),
        Err(error) => Err(error.into()),
    }
}

/// A 1-to-`n` sequence, for comparing offsets.
pub(crate) fn seq(from: u64, to: u64) -> Vec<u64> {
    (from..=to).collect()
}

/// A student of `class` in Postgres, written the way the persister writes
/// one (from a `notebook_opened` event).
pub(crate) async fn student(
    pool: &PgPool,
    class: ClassId,
    email: &str,
) -> anyhow::Result<StudentId> {
    let now = time::OffsetDateTime::now_utc();
    let wire = cellmon_domain::WireEvent {
        event_id: Some(Uuid::new_v4().to_string()),
        event_type: Some("notebook_opened".into()),
        email_address: Some(email.into()),
        notebook_path: Some("lesson1.ipynb".into()),
        ..cellmon_domain::WireEvent::default()
    };
    let event = cellmon_domain::validate(wire, now)
        .map_err(|e| anyhow::anyhow!("invalid test event: {e:?}"))?;
    let stream_event = cellmon_domain::envelope::StreamEvent {
        class_id: class,
        event,
    };
    cellmon_store::pg::write_batch(pool, &[stream_event]).await?;
    cellmon_store::messages::student_by_email(pool, class, email)
        .await?
        .ok_or_else(|| anyhow::anyhow!("student {email} was not written"))
}
