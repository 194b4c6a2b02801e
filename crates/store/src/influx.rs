//! Events as InfluxDB points, written with line protocol over the v1 HTTP
//! API (`POST /write`), which InfluxDB 1.x, 2.x (v1 compatibility) and 3.x
//! all accept.
//!
//! Two measurements:
//!
//! * `event`: one point per event. Tags `class`, `event_type`, and when
//!   known `team` and `notebook` (all low-cardinality); fields `event_id`,
//!   `student` (high-cardinality, hence fields) and `event_time_ms`.
//! * `cell_execution`: one more point per `cell_executed`, with tags
//!   `class`, `team`, `notebook` and fields `event_id`, `student`, `cell`,
//!   `has_error`, `duration_ms`/`execution_count` when known, and
//!   `event_time_ms`.
//!
//! A point's identity is measurement + tags + timestamp, so the timestamp is
//! derived from the event: its time in whole seconds plus a nanosecond
//! offset (0 to 999,999,999) taken from the event id. Writing an event again
//! rewrites the same point; two different events overwrite each other only
//! if they share the second, the tags and the offset (for n events in one
//! second and series, about n² / 2·10⁹: 1,000 events give 0.0005). The exact
//! event time is kept in the field `event_time_ms`.
//!
//! Why seconds and not milliseconds plus a 10⁶-wide offset: a load of
//! 20,000 events with one event time lost 13 points to offset collisions in
//! 12 series (the birthday bound is n² / 2·10⁶ per series); the wider offset
//! makes that negligible.

use std::fmt::Write as _;
use std::time::Duration;

use cellmon_domain::EventKind;
use cellmon_domain::envelope::StreamEvent;
use reqwest::StatusCode;

/// The measurement every event is written to.
pub const EVENT_MEASUREMENT: &str = "event";
/// The measurement cell executions are also written to.
pub const EXECUTION_MEASUREMENT: &str = "cell_execution";

/// The point timestamp of an event, in nanoseconds since the epoch.
pub fn timestamp_ns(item: &StreamEvent) -> i128 {
    let seconds = i128::from(item.event.time().unix_timestamp());
    let id = item.event.id.as_uuid().as_u128();
    seconds * 1_000_000_000 + (id % 1_000_000_000) as i128
}

fn event_time_ms(item: &StreamEvent) -> i128 {
    item.event
        .time()
        .unix_timestamp_nanos()
        .div_euclid(1_000_000)
}

/// Escapes a measurement, tag key or tag value: commas, equals signs and
/// spaces get a backslash. Validated fields hold no line breaks. A trailing
/// backslash cannot be written at all (InfluxDB 1.x reads it as escaping
/// the separator after it, doubled or not), so it becomes U+FF3C, the
/// full-width reverse solidus.
fn tag(out: &mut String, value: &str) {
    let trimmed = value.trim_end_matches('\\');
    for c in trimmed.chars() {
        match c {
            ',' | '=' | ' ' => {
                out.push('\\');
                out.push(c);
            }
            '\n' | '\r' => out.push(' '),
            _ => out.push(c),
        }
    }
    for _ in trimmed.len()..value.len() {
        out.push('\u{FF3C}');
    }
}

/// A string field value, quoted, with `"` and `\` escaped.
fn string_field(out: &mut String, value: &str) {
    out.push('"');
    for c in value.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// Appends the lines (points) of one event to `out`.
pub fn encode(item: &StreamEvent, out: &mut String) {
    let event = &item.event;
    // Tags are written sorted by key, as InfluxDB prefers: class <
    // event_type < notebook < team.
    let mut class = String::from(",class=");
    tag(&mut class, &item.class_id.to_string());
    let mut rest = String::new();
    if let Some(notebook) = &event.notebook {
        rest.push_str(",notebook=");
        tag(&mut rest, notebook.as_str());
    }
    if let Some(team) = &event.student.team {
        rest.push_str(",team=");
        tag(&mut rest, team.as_str());
    }
    // Fields every point starts with, and how every point ends.
    let mut ident = String::from(" event_id=");
    string_field(&mut ident, &event.id.to_string());
    ident.push_str(",student=");
    string_field(&mut ident, &event.student.key.to_string());
    let end = format!(
        ",event_time_ms={}i {}\n",
        event_time_ms(item),
        timestamp_ns(item)
    );

    out.push_str(EVENT_MEASUREMENT);
    out.push_str(&class);
    out.push_str(",event_type=");
    tag(out, event.kind.type_name());
    out.push_str(&rest);
    out.push_str(&ident);
    out.push_str(&end);

    if let EventKind::CellExecuted(exec) = &event.kind {
        out.push_str(EXECUTION_MEASUREMENT);
        out.push_str(&class);
        out.push_str(&rest);
        out.push_str(&ident);
        if let Some(cell) = &event.cell {
            out.push_str(",cell=");
            string_field(out, cell.id.as_str());
        }
        let _ = write!(out, ",has_error={}", exec.has_error);
        if let Some(ms) = exec.duration_ms.filter(|ms| ms.is_finite()) {
            let _ = write!(out, ",duration_ms={ms:?}");
        }
        if let Some(count) = exec.execution_count {
            let _ = write!(out, ",execution_count={count}i");
        }
        out.push_str(&end);
    }
}

/// The points of a whole batch.
pub fn encode_batch(batch: &[StreamEvent]) -> String {
    let mut out = String::with_capacity(batch.len() * 256);
    for item in batch {
        encode(item, &mut out);
    }
    out
}

/// How to reach InfluxDB.
#[derive(Debug, Clone)]
pub struct InfluxConfig {
    /// Base URL, such as `http://127.0.0.1:8086`.
    pub url: String,
    pub database: String,
    /// For InfluxDB 2.x/3.x v1-compatibility: sent as `Authorization: Token`.
    pub token: Option<String>,
    /// Longest any one request may take.
    pub timeout: Duration,
}

/// Why a write failed.
#[derive(Debug, thiserror::Error)]
pub enum InfluxError {
    /// InfluxDB refused the points themselves (400: bad line protocol, field
    /// type conflict; 413: too large; 422: outside retention): writing them
    /// again unchanged fails the same way.
    #[error("points rejected ({status}): {body}")]
    Rejected { status: u16, body: String },
    /// InfluxDB answered with another error (5xx, 404 no database, auth).
    #[error("write failed ({status}): {body}")]
    Status { status: u16, body: String },
    /// No answer: connection refused or reset, or the timeout passed.
    #[error("unreachable: {0}")]
    Unreachable(#[from] reqwest::Error),
    #[error("bad InfluxDB URL {url:?}")]
    Url {
        url: String,
        #[source]
        source: url::ParseError,
    },
}

impl InfluxError {
    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        !matches!(self, Self::Rejected { .. } | Self::Url { .. })
    }
}

/// Writes points to one database.
#[derive(Debug, Clone)]
pub struct InfluxWriter {
    http: reqwest::Client,
    write_url: reqwest::Url,
    query_url: reqwest::Url,
    ping_url: reqwest::Url,
    config: InfluxConfig,
}

impl InfluxWriter {
    pub fn new(config: InfluxConfig) -> Result<Self, InfluxError> {
        let bad_url = |source| InfluxError::Url {
            url: config.url.clone(),
            source,
        };
        let base = reqwest::Url::parse(&config.url).map_err(bad_url)?;
        let join = |path| base.join(path).map_err(bad_url);
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .no_proxy()
            .build()?;
        Ok(Self {
            http,
            write_url: join("write")?,
            query_url: join("query")?,
            ping_url: join("ping")?,
            config,
        })
    }

    pub fn database(&self) -> &str {
        &self.config.database
    }

    /// The longest any one request may take.
    pub fn timeout(&self) -> Duration {
        self.config.timeout
    }

    /// Whether InfluxDB answers (`GET /ping`, 204 on every version with
    /// the v1 API), within the request timeout.
    pub async fn ping(&self) -> Result<(), InfluxError> {
        let response = self
            .authorize(self.http.get(self.ping_url.clone()))
            .send()
            .await?;
        check(response).await
    }

    fn authorize(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.config.token {
            Some(token) => request.header("Authorization", format!("Token {token}")),
            None => request,
        }
    }

    /// `CREATE DATABASE` (a no-op when it exists).
    pub async fn create_database(&self) -> Result<(), InfluxError> {
        let q = format!(
            "CREATE DATABASE \"{}\"",
            self.config.database.replace('"', "\\\"")
        );
        let response = self
            .authorize(self.http.post(self.query_url.clone()))
            .query(&[("q", q.as_str())])
            .send()
            .await?;
        check(response).await
    }

    /// Writes line protocol with nanosecond timestamps.
    pub async fn write(&self, lines: String) -> Result<(), InfluxError> {
        let response = self
            .authorize(self.http.post(self.write_url.clone()))
            .query(&[("db", self.config.database.as_str()), ("precision", "ns")])
            .body(lines)
            .send()
            .await?;
        check(response).await
    }
}

async fn check(response: reqwest::Response) -> Result<(), InfluxError> {
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let mut body = response.text().await.unwrap_or_default();
    body.truncate(1_000);
    // 400: bad line protocol, field type conflict; 413: body too large
    // (halving the batch helps); 422: points outside the retention policy
    // (2.x/3.x). All fail the same way if sent again unchanged.
    if matches!(
        status,
        StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNPROCESSABLE_ENTITY
    ) {
        Err(InfluxError::Rejected {
            status: status.as_u16(),
            body,
        })
    } else {
        Err(InfluxError::Status {
            status: status.as_u16(),
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use cellmon_domain::lms::ClassId;
    use cellmon_domain::{WireEvent, validate};
    use time::macros::datetime;

    use super::*;

    fn item(wire: WireEvent) -> StreamEvent {
        StreamEvent {
            class_id: ClassId(uuid::Uuid::from_u128(1)),
            event: validate(wire, datetime!(2026-04-01 10:00 UTC)).unwrap(),
        }
    }

    #[test]
    fn executions_give_two_points_with_escaped_tags() {
        let lines = encode_batch(&[item(WireEvent {
            event_id: Some("00000000-0000-0000-0000-00000012d687".into()),
            event_type: Some("cell_executed".into()),
            event_time: Some("2026-04-01T10:00:00.123456Z".into()),
            email_address: Some("a@b.c".into()),
            team_name: Some("チーム A,=x".into()),
            notebook_path: Some("dir/my nb.ipynb".into()),
            cell_id: Some("c\"1".into()),
            has_error: Some(true),
            execution_count: Some(4),
            execution_duration_ms: Some(12.5),
            ..WireEvent::default()
        })]);
        let lines: Vec<&str> = lines.lines().collect();
        // 0x12d687 = 1234567: the offset is 1234567 ns past the second.
        let ts = "1775037600001234567";
        assert_eq!(
            lines,
            vec![
                format!(
                    "event,class=00000000-0000-0000-0000-000000000001,event_type=cell_executed,\
                     notebook=dir/my\\ nb.ipynb,team=チーム\\ A\\,\\=x \
                     event_id=\"00000000-0000-0000-0000-00000012d687\",student=\"a@b.c\",\
                     event_time_ms=1775037600123i {ts}"
                ),
                format!(
                    "cell_execution,class=00000000-0000-0000-0000-000000000001,\
                     notebook=dir/my\\ nb.ipynb,team=チーム\\ A\\,\\=x \
                     event_id=\"00000000-0000-0000-0000-00000012d687\",student=\"a@b.c\",\
                     cell=\"c\\\"1\",has_error=true,duration_ms=12.5,execution_count=4i,\
                     event_time_ms=1775037600123i {ts}"
                ),
            ]
        );
    }

    #[test]
    fn same_event_same_timestamp_and_distinct_events_differ() {
        let a = item(WireEvent {
            event_type: Some("help".into()),
            event_time: Some("2026-04-01T10:00:00Z".into()),
            email_address: Some("a@b.c".into()),
            ..WireEvent::default()
        });
        let mut b = a.clone();
        b.event.id = cellmon_domain::EventId::from_uuid(uuid::Uuid::from_u128(99));
        assert_eq!(timestamp_ns(&a), timestamp_ns(&a.clone()));
        assert_ne!(timestamp_ns(&a), timestamp_ns(&b));
        // Both stay within the event's second.
        let second = 1_775_037_600i128 * 1_000_000_000;
        for t in [timestamp_ns(&a), timestamp_ns(&b)] {
            assert!((second..second + 1_000_000_000).contains(&t));
        }
    }
}
