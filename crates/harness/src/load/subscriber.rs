//! The instructor's side of a load run: a real dashboard socket on the
//! class, timing each cell run from its scheduled POST to the
//! `student_update` that first counts it.
//!
//! A student's status counts their executions, and a simulated student's
//! runs are numbered 1, 2, 3, ...; an update that counts `k` executions
//! covers every run of that student up to the `k`-th (the persister may
//! fold several into one update).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use hdrhistogram::Histogram;

use super::stats::{histogram, record};

/// The largest message the instructor's socket takes.
const SNAPSHOT_LIMIT: usize = 512 << 20;

/// Where the instructor's socket goes.
#[derive(Debug, Clone)]
pub struct GatewaySpec {
    /// `ws://host:port/ws`
    pub url: String,
    /// An instructor's JWT.
    pub token: String,
    pub class: uuid::Uuid,
}

/// Runs sent but not seen yet on the socket (e-mail → execution → (phase,
/// scheduled instant)), and the end-to-end latencies of those seen, by
/// phase.
#[derive(Debug, Default)]
pub struct Pending {
    runs: HashMap<String, BTreeMap<u32, (usize, Instant)>>,
    latencies: Vec<Histogram<u64>>,
}

impl Pending {
    pub fn sent(&mut self, email: &str, execution: u32, phase: usize, scheduled: Instant) {
        self.runs
            .entry(email.to_owned())
            .or_default()
            .insert(execution, (phase, scheduled));
    }

    /// An update counting `executions` of `email` arrived at `now`: the
    /// latencies of the runs it covers, by phase.
    pub fn seen(
        &mut self,
        email: &str,
        executions: u32,
        now: Instant,
    ) -> Vec<(usize, std::time::Duration)> {
        let Some(runs) = self.runs.get_mut(email) else {
            return Vec::new();
        };
        let later = runs.split_off(&(executions + 1));
        let covered = std::mem::replace(runs, later);
        if runs.is_empty() {
            self.runs.remove(email);
        }
        covered
            .into_values()
            .map(|(phase, scheduled)| (phase, now.saturating_duration_since(scheduled)))
            .collect()
    }

    /// [`Self::seen`], recording the latencies.
    fn record_seen(&mut self, email: &str, executions: u32, now: Instant) {
        for (phase, latency) in self.seen(email, executions, now) {
            if self.latencies.len() <= phase {
                self.latencies.resize_with(phase + 1, histogram);
            }
            record(&mut self.latencies[phase], latency);
        }
    }

    /// The end-to-end latencies seen for a phase's runs.
    pub fn latencies(&self, phase: usize) -> Option<&Histogram<u64>> {
        self.latencies.get(phase).filter(|h| !h.is_empty())
    }

    /// A run the server refused: no update will count it.
    pub fn forget(&mut self, email: &str, execution: u32) {
        if let Some(runs) = self.runs.get_mut(email) {
            runs.remove(&execution);
            if runs.is_empty() {
                self.runs.remove(email);
            }
        }
    }

    /// Runs never seen.
    pub fn len(&self) -> usize {
        self.runs.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The parts of a `student_update` that matter here.
fn update_of(text: &str) -> Option<(String, u32)> {
    if !text.contains("\"student_update\"") {
        return None;
    }
    let message: serde_json::Value = serde_json::from_str(text).ok()?;
    let email = message["student"]["key"]["email"].as_str()?.to_owned();
    let executions = u32::try_from(message["status"]["executions"].as_u64()?).ok()?;
    Some((email, executions))
}

/// An instructor's socket.
pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens the socket and subscribes; returns once the snapshot arrived.
pub async fn connect(spec: &GatewaySpec) -> anyhow::Result<Socket> {
    let mut request = spec.url.as_str().into_client_request()?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_str(&format!("cellmon.v1, cellmon.jwt.{}", spec.token))?,
    );
    // A class of tens of thousands of simulated students has a snapshot of
    // tens of MB, past the client's default 16 MiB message limit.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(SNAPSHOT_LIMIT))
        .max_frame_size(Some(SNAPSHOT_LIMIT));
    let (mut socket, _) =
        tokio_tungstenite::connect_async_with_config(request, Some(config), false).await?;
    let subscribe = serde_json::json!({"type": "subscribe", "classId": spec.class});
    socket.send(Message::text(subscribe.to_string())).await?;
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(30), socket.next()).await {
            Ok(Some(Ok(Message::Text(text)))) if text.contains("\"type\":\"snapshot\"") => {
                return Ok(socket);
            }
            Ok(Some(Ok(Message::Text(text)))) if text.contains("\"type\":\"error\"") => {
                anyhow::bail!("the gateway refused the subscription: {text}")
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(error))) => return Err(error.into()),
            Ok(None) | Err(_) => anyhow::bail!("no snapshot from the gateway within 30 s"),
        }
    }
}

/// What the instructor's socket went through.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Followed {
    /// Times the gateway told it to resync (it was too far behind), after
    /// which it subscribed again and took a fresh snapshot.
    pub resyncs: u64,
    /// Times the socket was lost and opened again.
    pub reconnections: u64,
}

/// Reads `socket` (from [`connect`]) until `stop` fires, recording the
/// latencies of the runs in `pending`. Subscribes again when told to
/// resync, and reconnects (with a fresh snapshot) if the gateway drops the
/// socket.
pub async fn follow(
    spec: GatewaySpec,
    socket: Socket,
    pending: Arc<Mutex<Pending>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Followed {
    let mut followed = Followed::default();
    let mut connected = Some(socket);
    loop {
        let next = match connected.take() {
            Some(socket) => Ok(socket),
            None => connect(&spec).await,
        };
        let mut socket = match next {
            Ok(socket) => socket,
            Err(error) => {
                tracing::warn!("instructor socket: {error:#}");
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                    _ = stopped(&mut stop) => return followed,
                }
                followed.reconnections += 1;
                continue;
            }
        };
        loop {
            let frame = tokio::select! {
                frame = socket.next() => frame,
                _ = stopped(&mut stop) => {
                    let _ = socket.close(None).await;
                    return followed;
                }
            };
            match frame {
                Some(Ok(Message::Text(text))) => {
                    if text.contains("\"type\":\"resync\"") {
                        followed.resyncs += 1;
                        let subscribe =
                            serde_json::json!({"type": "subscribe", "classId": spec.class});
                        if socket
                            .send(Message::text(subscribe.to_string()))
                            .await
                            .is_err()
                        {
                            break;
                        }
                        continue;
                    }
                    let Some((email, executions)) = update_of(&text) else {
                        continue;
                    };
                    let now = Instant::now();
                    if let Ok(mut pending) = pending.lock() {
                        pending.record_seen(&email, executions, now);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            }
        }
        followed.reconnections += 1;
    }
}

/// Resolves once `stop` says so (or its sender is gone).
pub async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn an_update_covers_every_run_up_to_its_count() {
        let t0 = Instant::now();
        let mut pending = Pending::default();
        pending.sent("a@x.jp", 1, 0, t0);
        pending.sent("a@x.jp", 2, 0, t0 + Duration::from_millis(10));
        pending.sent("a@x.jp", 3, 1, t0 + Duration::from_millis(20));
        pending.sent("b@x.jp", 1, 0, t0);
        let now = t0 + Duration::from_millis(50);
        let mut seen = pending.seen("a@x.jp", 2, now);
        seen.sort();
        assert_eq!(
            seen,
            vec![
                (0, Duration::from_millis(40)),
                (0, Duration::from_millis(50))
            ]
        );
        // Seen once only.
        assert!(pending.seen("a@x.jp", 2, now).is_empty());
        assert_eq!(pending.len(), 2);
        assert_eq!(
            pending.seen("a@x.jp", 5, now),
            vec![(1, Duration::from_millis(30))]
        );
        assert!(pending.seen("nobody@x.jp", 1, now).is_empty());
        assert_eq!(pending.len(), 1);
        // A refused run is forgotten.
        pending.forget("b@x.jp", 1);
        assert!(pending.is_empty());
    }

    #[test]
    fn updates_are_read_from_the_wire_format() {
        let text = r#"{"type":"student_update","epoch":"e","offset":3,"classId":"c","student":{"id":"s","key":{"email":"a@x.jp"},"name":null,"team":null},"status":{"status":"active","help":[],"significantErrors":[],"lastExecutionFailed":false,"lastActivity":null,"executions":4,"failedExecutions":1}}"#;
        assert_eq!(update_of(text), Some(("a@x.jp".to_owned(), 4)));
        assert_eq!(update_of(r#"{"type":"alert"}"#), None);
    }
}
