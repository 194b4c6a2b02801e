//! Ingest's request validation, in-process: the router the server runs
//! (`cellmon_ingest::router`), driven with `tower::ServiceExt::oneshot`,
//! answers every 4xx of `docs/ingest.md` with its status and stable
//! `code`, and rejects each bad item of a batch by index and field.
//!
//! No backend and no mock: the state's Redis is an address nothing listens
//! on, with a short timeout, and its spool a temporary directory, so an
//! item that passes validation is handed off as when Redis is down (the
//! real hand-off spools it and answers 202 `spooled`). That the accepted
//! items reach the streams exactly once is the Docker-backed
//! `tests/ingest.rs::bad_input`.

use std::convert::Infallible;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode, header};
use cellmon_domain::lms::ClassId;
use cellmon_ingest::config::{ClassToken, RateLimit};
use cellmon_ingest::metrics::Metrics;
use cellmon_ingest::{AppState, Config, router};
use http_body_util::BodyExt as _;
use serde_json::{Value, json};
use tower::ServiceExt as _;

const TOKEN: &str = "tok-requests";

/// The router of a server whose Redis never answers, and its spool.
struct App {
    router: Router,
    _spool: tempfile::TempDir,
}

impl App {
    async fn start() -> anyhow::Result<Self> {
        let spool = tempfile::tempdir()?;
        let mut config = Config {
            classes: vec![ClassToken {
                class_id: ClassId::random(),
                token: TOKEN.to_owned().into(),
            }],
            // Short enough that a body that stalls is seen in a moment.
            body_timeout: Duration::from_millis(300),
            // One request per client address at once: each row of the
            // table comes from an address of its own, and the 429 row from
            // an address that has just sent one.
            rate_limit: RateLimit {
                per_second: NonZeroU32::MIN,
                burst: NonZeroU32::MIN,
            },
            ..Config::default()
        };
        config.redis.url = format!("redis://{}/", unused_address()?).into();
        config.redis.timeout = Duration::from_millis(200);
        config.spool.dir = spool.path().to_owned();
        let state = AppState::new(config, Metrics::new()?).await?;
        Ok(Self {
            router: router(state),
            _spool: spool,
        })
    }

    /// `request` from `client`, as the server's connection would tag it;
    /// the answer's status and JSON body.
    async fn send(
        &self,
        client: IpAddr,
        mut request: Request<Body>,
    ) -> anyhow::Result<(StatusCode, Option<u64>, Value)> {
        request
            .extensions_mut()
            .insert(ConnectInfo(SocketAddr::new(client, 40_000)));
        let response = self.router.clone().oneshot(request).await?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().map(str::parse::<u64>))
            .transpose()?
            .transpose()?;
        let bytes = response.into_body().collect().await?.to_bytes();
        let body = serde_json::from_slice(&bytes)
            .map_err(|e| anyhow::anyhow!("{e}: {}", String::from_utf8_lossy(&bytes)))?;
        Ok((status, retry_after, body))
    }
}

/// A loopback address that nothing listens on: one the kernel just gave
/// out and took back. Connecting to it is refused at once.
fn unused_address() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// A client address no other row uses (the rate limit counts per address).
fn fresh_client() -> IpAddr {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 0)) + n))
}

fn gzip(bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(bytes)?;
    Ok(encoder.finish()?)
}

/// `POST /api/v1/events` with `query` (e.g. `?token=…`), these headers and
/// this body.
fn post(query: &str, headers: &[(&str, &str)], body: impl Into<Body>) -> Request<Body> {
    let mut request = Request::post(format!("/api/v1/events{query}"))
        .header(header::CONTENT_TYPE, "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(body.into()).expect("a valid request")
}

fn with_token(body: impl Into<Body>) -> Request<Body> {
    post(&format!("?token={TOKEN}"), &[], body)
}

fn gzipped(body: Vec<u8>) -> Request<Body> {
    post(
        &format!("?token={TOKEN}"),
        &[("content-encoding", "gzip")],
        body,
    )
}

/// A body whose first bytes arrive and whose rest never does.
fn stalling_body() -> Body {
    let first = futures_util::stream::iter([Ok::<_, Infallible>(Bytes::from_static(b"[{"))]);
    Body::from_stream(futures_util::StreamExt::chain(
        first,
        futures_util::stream::pending(),
    ))
}

/// A valid `cell_executed` event of `email`, as the extension sends it.
fn cell_executed(email: &str, n: usize) -> Value {
    json!({
        "eventId": uuid::Uuid::new_v4().to_string(),
        "eventType": "cell_executed",
        "eventTime": "2026-04-01T10:00:00.000Z",
        "emailAddress": email,
        "userName": "山田 花子",
        "notebookPath": "lesson1/intro.ipynb",
        "cellId": format!("cell-{n}"),
        "cellIndex": n,
        "code": "x = 1",
        "executionCount": n,
        "hasError": false,
        "executionDurationMs": 3.5
    })
}

/// The items a batch may hold that are refused one by one, each with the
/// field it names in `rejected` (`None`: the item is not an event at all).
fn bad_items() -> Vec<(&'static str, String, Option<&'static str>)> {
    let mut huge_code = cell_executed("ok@example.ac.jp", 2);
    huge_code["code"] = json!("x".repeat(300 * 1024));
    let mut bad_email = cell_executed("ok@example.ac.jp", 3);
    bad_email["emailAddress"] = json!("nope");
    vec![
        (
            "a field of the wrong type",
            r#"{"eventType":"help","emailAddress":"a@b.jp","cellIndex":"three"}"#.to_owned(),
            None,
        ),
        (
            "a number out of range (1e400)",
            r#"{"eventType":"cell_executed","emailAddress":"a@b.jp","cellId":"c","executionDurationMs":1e400}"#
                .to_owned(),
            None,
        ),
        ("a huge code field", huge_code.to_string(), Some("code")),
        ("a bad e-mail address", bad_email.to_string(), Some("emailAddress")),
        (
            "no e-mail address",
            r#"{"eventType":"help"}"#.to_owned(),
            Some("emailAddress"),
        ),
    ]
}

/// One row: a request, and the status and `code` it must get.
struct Case {
    name: &'static str,
    client: IpAddr,
    request: Request<Body>,
    status: StatusCode,
    code: &'static str,
}

fn case(name: &'static str, request: Request<Body>, status: u16, code: &'static str) -> Case {
    Case {
        name,
        client: fresh_client(),
        request,
        status: StatusCode::from_u16(status).expect("a status"),
        code,
    }
}

#[tokio::test]
async fn every_refusal_of_the_events_api_has_its_status_and_code() -> anyhow::Result<()> {
    let app = App::start().await?;
    let limits = Config::default();
    let deep = |levels: usize| format!("{}{}", "[".repeat(levels), "]".repeat(levels));
    let over_decoded = gzip(&vec![b'0'; 2 * limits.max_decoded_body_bytes])?;
    assert!(
        over_decoded.len() < limits.max_body_bytes,
        "a gzip bomb is small"
    );
    let many_events = format!("[{}]", vec!["{}"; 1_001].join(","));
    let noisy = fresh_client();

    let mut cases = vec![
        case("not JSON", with_token("[{nope"), 400, "malformed_json"),
        case(
            "invalid UTF-8",
            with_token(&b"[{\"userName\":\"\xff\xfe\"}]"[..]),
            400,
            "malformed_json",
        ),
        case(
            "neither an array nor an object",
            with_token("\"an event\""),
            400,
            "bad_request",
        ),
        case("an empty body", with_token(""), 400, "bad_request"),
        case(
            "nested deeper than 32 levels",
            with_token(deep(33)),
            400,
            "bad_request",
        ),
        case(
            "10,000 levels deep",
            with_token(deep(10_000)),
            400,
            "bad_request",
        ),
        case(
            "corrupt gzip",
            gzipped(b"\x1f\x8b\x08\x00 not gzip at all".to_vec()),
            400,
            "bad_request",
        ),
        case(
            "no token (and no open class)",
            post("", &[], "[]"),
            401,
            "unauthorized",
        ),
        case(
            "an unknown token",
            post("?token=nope", &[], "[]"),
            401,
            "unauthorized",
        ),
        case(
            "an unknown bearer token",
            post("", &[("authorization", "Bearer nope")], "[]"),
            401,
            "unauthorized",
        ),
        case(
            "a body that stops arriving",
            with_token(stalling_body()),
            408,
            "body_timeout",
        ),
        case(
            "over max_body_bytes as sent",
            with_token(vec![b' '; limits.max_body_bytes + 1]),
            413,
            "too_large",
        ),
        case(
            "over max_decoded_body_bytes once decompressed",
            gzipped(over_decoded),
            413,
            "too_large",
        ),
        case(
            "more than 1,000 events",
            with_token(many_events),
            413,
            "too_large",
        ),
        case(
            "an unknown Content-Encoding",
            post(
                &format!("?token={TOKEN}"),
                &[("content-encoding", "br")],
                "[]",
            ),
            415,
            "unsupported_encoding",
        ),
        // The first request of a client passes the limiter (burst 1) ...
        Case {
            client: noisy,
            ..case(
                "a client's first request",
                with_token("[{nope"),
                400,
                "malformed_json",
            )
        },
        // ... and its second at once is over its rate, whatever it holds.
        Case {
            client: noisy,
            ..case(
                "a client over its rate",
                with_token("[]"),
                429,
                "rate_limited",
            )
        },
    ];
    for (name, item, _) in bad_items() {
        cases.push(case(
            name,
            with_token(format!("[{item}]")),
            422,
            "nothing_valid",
        ));
    }

    for Case {
        name,
        client,
        request,
        status,
        code,
    } in cases
    {
        let (got, retry_after, body) = app.send(client, request).await?;
        assert_eq!(
            (got, body["error"]["code"].as_str()),
            (status, Some(code)),
            "{name}: {body}"
        );
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{name}: no message in {body}"
        );
        match code {
            "rate_limited" => assert!(
                retry_after.is_some_and(|secs| secs >= 1),
                "{name}: Retry-After {retry_after:?}"
            ),
            _ => assert_eq!(retry_after, None, "{name}"),
        }
        if code == "nothing_valid" {
            assert_eq!(body["rejected"][0]["index"], 0, "{name}: {body}");
        }
    }
    Ok(())
}

/// Each bad item of a batch is rejected by index, naming the field where
/// the item is an event; the valid ones are still accepted (spooled, as
/// Redis does not answer), and a batch of only bad items is 422.
#[tokio::test]
async fn bad_items_are_rejected_by_index_and_the_rest_accepted() -> anyhow::Result<()> {
    let app = App::start().await?;
    for (name, item, field) in bad_items() {
        let (status, _, body) = app
            .send(fresh_client(), with_token(format!("[{item}]")))
            .await?;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{name}: {body}");
        let rejected = &body["rejected"][0];
        assert_eq!(rejected["field"].as_str(), field, "{name}: {body}");
        assert!(rejected["error"].as_str().is_some_and(|e| !e.is_empty()));
    }

    // A mixed batch, gzipped as the extension may send it: valid, every
    // bad item, valid.
    let (first, last) = (
        cell_executed("ok@example.ac.jp", 1),
        cell_executed("ok2@example.ac.jp", 4),
    );
    let bad: Vec<(&str, String, Option<&str>)> = bad_items();
    let items: Vec<String> = std::iter::once(first.to_string())
        .chain(bad.iter().map(|(_, item, _)| item.clone()))
        .chain(std::iter::once(last.to_string()))
        .collect();
    let batch = format!("[{}]", items.join(","));
    let (status, _, body) = app
        .send(fresh_client(), gzipped(gzip(batch.as_bytes())?))
        .await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["accepted"], 2, "{body}");
    assert_eq!(body["eventIds"], json!([first["eventId"], last["eventId"]]));
    assert_eq!(body["spooled"], true, "Redis does not answer: {body}");
    let rejected: Vec<(u64, Option<&str>)> = body["rejected"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| (r["index"].as_u64().unwrap_or(u64::MAX), r["field"].as_str()))
        .collect();
    let expected: Vec<(u64, Option<&str>)> = bad
        .iter()
        .enumerate()
        .map(|(i, (_, _, field))| (i as u64 + 1, *field))
        .collect();
    assert_eq!(rejected, expected, "{body}");
    Ok(())
}
