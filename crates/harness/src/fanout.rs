//! The gateway's fan-out benchmark: many real dashboard sockets on one
//! class, live messages published into Redis at a fixed rate the way the
//! persister publishes them, and the delivery latency from publication to
//! each socket.
//!
//! The benchmark makes a class and an instructor of its own (so it is the
//! class's only publisher and knows every offset in advance), opens the
//! sockets, publishes, and reports latency percentiles, what was missed,
//! and the gateway's memory (resident set, from `/proc`) when its process
//! id is given.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cellmon_domain::live::Unnumbered;
use cellmon_domain::lms::ClassId;
use cellmon_testkit::sample::student_update;
use futures_util::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::load::Percentiles;

/// What to run.
#[derive(Debug, Clone)]
pub struct FanoutSpec {
    /// The gateway's socket URL (`ws://host:port/ws`).
    pub url: String,
    pub redis_url: String,
    /// The Redis key prefix the gateway uses.
    pub prefix: String,
    pub postgres_url: String,
    /// The gateway's JWT secret (to sign the benchmark instructor's token).
    pub jwt_secret: String,
    pub sockets: usize,
    /// Live messages per second (0: only open the sockets and hold them), in
    /// ticks of 10 ms: 0 or a multiple of 100.
    pub rate: u32,
    pub duration: Duration,
    /// The gateway's process, for its memory.
    pub gateway_pid: Option<u32>,
}

/// What it measured.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutReport {
    pub sockets: usize,
    pub connect_seconds: f64,
    pub rate: u32,
    pub seconds: f64,
    pub published: u64,
    /// Messages that reached sockets, over all sockets.
    pub delivered: u64,
    /// Messages a socket never got (expected `published` per socket).
    pub missing: u64,
    pub resynced_sockets: u64,
    pub closed_sockets: u64,
    /// From just before publication to arrival at a socket.
    pub latency_ms: Percentiles,
    /// The gateway's resident memory in KiB: before the sockets, with the
    /// sockets open and idle, and the most seen while publishing.
    pub gateway_rss_kib: Option<[u64; 3]>,
    /// (idle RSS with sockets − RSS before) / sockets.
    pub rss_per_socket_kib: Option<f64>,
}

struct Reader {
    histogram: Histogram<u64>,
    delivered: u64,
    resynced: bool,
    closed: bool,
}

/// The offset after `"offset":` in a message (cheaper than parsing it).
fn offset_of(text: &str) -> Option<u64> {
    let start = text.find("\"offset\":")? + "\"offset\":".len();
    let end = text[start..]
        .find(|c: char| !c.is_ascii_digit())
        .map_or(text.len(), |e| start + e);
    text[start..end].parse().ok()
}

/// Messages go out once per 10 ms tick, `rate / 100` at a time.
const TICKS_PER_SECOND: u32 = 100;

pub async fn run(spec: FanoutSpec) -> anyhow::Result<FanoutReport> {
    // Checked before anything starts, rather than rounded: a rate that
    // ticks cannot carry would publish at another rate than asked.
    anyhow::ensure!(
        spec.rate.is_multiple_of(TICKS_PER_SECOND),
        "rate (--rate) must be 0 or a multiple of {TICKS_PER_SECOND}: messages go out in \
         10 ms ticks of rate/{TICKS_PER_SECOND}, not {}",
        spec.rate
    );
    let pool = cellmon_store::pg::pool(&cellmon_store::pg::PgConfig {
        url: spec.postgres_url.clone(),
        max_connections: 2,
        timeout: Duration::from_secs(10),
    })?;
    let class = ClassId::random();
    let instructor = uuid::Uuid::new_v4();
    cellmon_store::classes::register(&pool, class, "Fan-out benchmark", None).await?;
    cellmon_store::classes::add_instructor(
        &pool,
        instructor,
        &format!("{instructor}@bench.invalid"),
        "Benchmark",
    )
    .await?;
    cellmon_store::classes::assign(&pool, class, instructor).await?;
    let token = cellmon_gateway::auth::Verifier::new(&spec.jwt_secret.clone().into(), 0, 30)
        .issue_token(instructor, 24 * 3600)?;

    let rss = |pid: Option<u32>| pid.and_then(crate::procfs::rss_kib);
    let rss_before = rss(spec.gateway_pid);
    let started = Instant::now();
    let mut sockets = Vec::with_capacity(spec.sockets);
    let mut opening = futures_util::stream::iter(0..spec.sockets)
        .map(|_| open(&spec.url, &token, class))
        .buffer_unordered(64);
    while let Some(socket) = opening.next().await {
        sockets.push(socket?);
        if sockets.len() % 1000 == 0 {
            eprintln!("fanout: {} of {} sockets open", sockets.len(), spec.sockets);
        }
    }
    drop(opening);
    let connect_seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "fanout: {} sockets open in {connect_seconds:.1} s",
        sockets.len()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle = rss(spec.gateway_pid);

    // Publication times by offset (from 1), as nanoseconds since `epoch`.
    let per_tick = spec.rate / TICKS_PER_SECOND;
    let ticks = if spec.rate == 0 {
        0
    } else {
        (spec.duration.as_millis() / 10) as u64
    };
    let total = ticks * u64::from(per_tick);
    let epoch = Instant::now();
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..=total).map(|_| AtomicU64::new(0)).collect());
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|socket| tokio::spawn(read(socket, sent.clone(), epoch, total)))
        .collect();

    let mut redis = redis::Client::open(spec.redis_url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    // Live channels and histories only: no event stream is read.
    let keys = cellmon_bus::StreamKeys::new(spec.prefix.clone(), std::num::NonZeroU16::MIN);
    let mut interval = tokio::time::interval(Duration::from_millis(10));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut published = 0u64;
    let mut rss_peak = rss_idle;
    let publishing = Instant::now();
    for tick in 0..ticks {
        interval.tick().await;
        let batch: Vec<Unnumbered> = (0..per_tick)
            .map(|i| student_update(class, published + u64::from(i)))
            .collect();
        let now = u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        for i in 1..=u64::from(per_tick) {
            sent[usize::try_from(published + i)?].store(now, Ordering::Release);
        }
        let (_, last) = cellmon_bus::live::publish(&mut redis, &keys, class, &batch).await?;
        published += u64::from(per_tick);
        anyhow::ensure!(
            last == published,
            "another publisher wrote to the benchmark class (offset {last}, expected {published})"
        );
        if tick % 100 == 0 {
            rss_peak = rss_peak.max(rss(spec.gateway_pid));
            eprintln!(
                "fanout: {published} of {total} published ({:.0} s)",
                publishing.elapsed().as_secs_f64()
            );
        }
    }
    let seconds = publishing.elapsed().as_secs_f64();

    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut report = FanoutReport {
        sockets: readers.len(),
        connect_seconds,
        rate: spec.rate,
        seconds,
        published,
        delivered: 0,
        missing: 0,
        resynced_sockets: 0,
        closed_sockets: 0,
        latency_ms: Percentiles::default(),
        gateway_rss_kib: None,
        rss_per_socket_kib: None,
    };
    for reader in readers {
        let reader = reader.await??;
        histogram.add(&reader.histogram)?;
        report.delivered += reader.delivered;
        report.missing += published.saturating_sub(reader.delivered);
        report.resynced_sockets += u64::from(reader.resynced);
        report.closed_sockets += u64::from(reader.closed);
    }
    report.latency_ms = Percentiles::from_micros(&histogram);
    if let (Some(before), Some(idle), Some(peak)) = (rss_before, rss_idle, rss_peak) {
        report.gateway_rss_kib = Some([before, idle, peak]);
        if report.sockets > 0 {
            report.rss_per_socket_kib =
                Some(idle.saturating_sub(before) as f64 / report.sockets as f64);
        }
    }
    Ok(report)
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a socket and subscribes it to the class (until the snapshot).
async fn open(url: &str, token: &str, class: ClassId) -> anyhow::Result<Socket> {
    let mut request = url.into_client_request()?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_str(&format!("cellmon.v1, cellmon.jwt.{token}"))?,
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await?;
    let subscribe = serde_json::json!({"type": "subscribe", "classId": class});
    socket.send(Message::text(subscribe.to_string())).await?;
    loop {
        match tokio::time::timeout(Duration::from_secs(30), socket.next()).await {
            Ok(Some(Ok(Message::Text(text)))) if text.contains("\"type\":\"snapshot\"") => {
                return Ok(socket);
            }
            Ok(Some(Ok(Message::Text(text)))) => anyhow::bail!("subscribe answered {text}"),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(error))) => return Err(error.into()),
            Ok(None) | Err(_) => anyhow::bail!("no snapshot"),
        }
    }
}

/// Reads until the last offset arrived, the socket ended, or 30 s passed
/// without a message.
async fn read(
    mut socket: Socket,
    sent: Arc<Vec<AtomicU64>>,
    epoch: Instant,
    last: u64,
) -> anyhow::Result<Reader> {
    let mut reader = Reader {
        histogram: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        delivered: 0,
        resynced: false,
        closed: false,
    };
    if last == 0 {
        return Ok(reader);
    }
    loop {
        let frame = match tokio::time::timeout(Duration::from_secs(30), socket.next()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(_) => {
                reader.closed = true;
                return Ok(reader);
            }
            Err(_) => return Ok(reader),
        };
        let Message::Text(text) = frame else {
            continue;
        };
        let arrived = u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        if text.contains("\"type\":\"resync\"") {
            reader.resynced = true;
            return Ok(reader);
        }
        let Some(offset) = offset_of(&text) else {
            continue;
        };
        let sent_at = usize::try_from(offset)
            .ok()
            .and_then(|o| sent.get(o))
            .map_or(0, |t| t.load(Ordering::Acquire));
        reader.delivered += 1;
        reader
            .histogram
            .saturating_record(arrived.saturating_sub(sent_at) / 1_000);
        if offset >= last {
            return Ok(reader);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_read_from_the_text() {
        assert_eq!(
            offset_of(r#"{"epoch":"e","offset":1234,"classId":"c"}"#),
            Some(1234)
        );
        assert_eq!(offset_of(r#"{"type":"pong"}"#), None);
    }
}
