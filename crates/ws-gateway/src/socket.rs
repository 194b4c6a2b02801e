//! One dashboard socket: its subscriptions, its queue, its writes.
//!
//! A single task per socket reads the client, drains the socket's queue in
//! batches (feed many, flush once), heartbeats, and obeys shutdown. Per
//! subscribed class it remembers the `{epoch, offset}` it delivered last,
//! so whatever the order in which history and live messages arrive, the
//! client sees each offset once and in order: older ones are dropped, a
//! gap is filled from the class's history, a new epoch means a fresh
//! snapshot.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use cellmon_bus::live::{self, Since};
use cellmon_domain::live::LiveMessage;
use cellmon_domain::lms::ClassId;
use cellmon_store::status::ClassSnapshot;
use cellmon_store::{classes, messages};
use futures_util::SinkExt as _;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use uuid::Uuid;

use crate::AppState;
use crate::auth::Session;
use crate::hub::{Frame, Outbox};
use crate::protocol::{
    ClientMessage, ErrorCode, Position, ResyncReason, ServerMessage, SnapshotStudent,
};

/// Close codes used by the gateway.
pub mod close {
    /// The server is shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// The client sent something that is not the protocol (binary frames).
    pub const UNSUPPORTED: u16 = 1003;
    /// A client message over the size limit.
    pub const TOO_BIG: u16 = 1009;
    /// The client keeps falling behind; reconnect later.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// No message and no pong within the idle timeout.
    pub const NORMAL: u16 = 1000;
    /// The token the socket was opened with expired.
    pub const POLICY: u16 = 1008;
}

struct Subscription {
    epoch: String,
    offset: u64,
}

/// Why a socket ends.
enum End {
    /// The client went away or the connection broke.
    Gone,
    /// Close with this code and reason.
    Close(u16, &'static str),
}

struct Connection {
    state: AppState,
    socket: WebSocket,
    instructor: Uuid,
    outbox: Outbox,
    subs: HashMap<ClassId, Subscription>,
    /// The rooms this socket joined (a superset of `subs`: a subscription
    /// that failed half-way is in a room but not subscribed).
    joined: HashSet<ClassId>,
    resyncs: Vec<Instant>,
    /// Ids of the unread 1:1 messages pushed on connect: one of them may
    /// also arrive live, published just before the socket registered.
    pushed_unread: HashSet<u64>,
    tokens: TokenBucket,
    /// When the frames written since the last flush arrived, for the
    /// fan-out latency.
    pending: Vec<Instant>,
    written: usize,
}

/// Runs a socket until it ends. `_permit` counts it against the
/// connection limit until then.
pub(crate) async fn run(
    socket: WebSocket,
    session: Session,
    state: AppState,
    _permit: OwnedSemaphorePermit,
) {
    let instructor = session.instructor;
    let expires = Instant::now() + session.remaining();
    let config = state.config.clone();
    let (outbox, mut queue) = state.hub.outbox(config.queue_capacity);
    state.hub.add_user(instructor, &outbox);
    state.metrics.connections.inc();
    let mut conn = Connection {
        tokens: TokenBucket::new(
            config.client_messages_per_second,
            config.client_message_burst,
        ),
        state: state.clone(),
        socket,
        instructor,
        outbox,
        subs: HashMap::new(),
        joined: HashSet::new(),
        resyncs: Vec::new(),
        pushed_unread: HashSet::new(),
        pending: Vec::new(),
        written: 0,
    };
    let end = conn.serve(&mut queue, expires).await;
    if let End::Close(code, reason) = end {
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        };
        // The closing handshake: send ours, then let the client answer
        // before the connection goes.
        let _ = tokio::time::timeout(config.write_timeout, async {
            if conn.socket.send(Message::Close(Some(frame))).await.is_ok() {
                while let Some(Ok(_)) = conn.socket.recv().await {}
            }
        })
        .await;
    }
    for class in &conn.joined {
        state.hub.leave(*class, conn.outbox.id);
    }
    state.hub.remove_user(instructor, conn.outbox.id);
    state.metrics.connections.dec();
}

impl Connection {
    async fn serve(
        &mut self,
        queue: &mut tokio::sync::mpsc::Receiver<Frame>,
        expires: Instant,
    ) -> End {
        let config = self.state.config.clone();
        if let Err(end) = self.send_unread().await {
            return end;
        }
        let heartbeat_every = config.heartbeat;
        let idle_timeout = config.idle_timeout;
        let mut heartbeat =
            tokio::time::interval_at(Instant::now() + heartbeat_every, heartbeat_every);
        let mut last_heard = Instant::now();
        let mut batch = Vec::with_capacity(config.write_batch);
        let signals = self.outbox.signals.clone();
        loop {
            let step = tokio::select! {
                biased;
                () = self.state.shutdown.cancelled() => {
                    return End::Close(close::GOING_AWAY, "server shutting down");
                }
                () = tokio::time::sleep_until(expires) => {
                    return End::Close(close::POLICY, "token expired");
                }
                () = signals.notified() => self.fell_behind().await,
                received = queue.recv_many(&mut batch, config.write_batch) => {
                    if received == 0 {
                        return End::Gone;
                    }
                    self.relay_batch(&mut batch).await
                }
                message = self.socket.recv() => {
                    last_heard = Instant::now();
                    match message {
                        None => return End::Gone,
                        Some(Err(error)) => return read_error(&error),
                        Some(Ok(message)) => self.client_message(message).await,
                    }
                }
                _ = heartbeat.tick() => {
                    if last_heard.elapsed() >= idle_timeout {
                        return End::Close(close::NORMAL, "idle timeout");
                    }
                    self.write(Message::Ping(Default::default())).await
                }
            };
            if let Err(end) = step {
                return end;
            }
            if let Err(end) = self.flush().await {
                return end;
            }
        }
    }

    /// Pushes unread 1:1 messages to a newly connected dashboard.
    async fn send_unread(&mut self) -> Result<(), End> {
        let unread = messages::unread_messages_for_instructor(
            &self.state.pool,
            self.instructor,
            i64::from(self.state.config.unread_on_connect),
        )
        .await;
        match unread {
            Ok(unread) => {
                for message in unread {
                    self.pushed_unread
                        .insert(u64::try_from(message.id).unwrap_or_default());
                    self.send(&ServerMessage::DirectMessage { message }).await?;
                }
            }
            Err(error) => tracing::warn!(%error, "cannot load unread messages"),
        }
        self.flush().await
    }

    async fn client_message(&mut self, message: Message) -> Result<(), End> {
        let text = match message {
            Message::Text(text) => text,
            Message::Binary(_) => {
                return Err(End::Close(
                    close::UNSUPPORTED,
                    "binary frames are not supported",
                ));
            }
            Message::Close(_) => {
                // Sends the close reply the library queued.
                let timeout = self.state.config.write_timeout;
                let _ = tokio::time::timeout(timeout, self.socket.flush()).await;
                return Err(End::Gone);
            }
            Message::Ping(_) | Message::Pong(_) => return Ok(()),
        };
        if !self.tokens.take() {
            return self
                .send(&ServerMessage::error(
                    ErrorCode::RateLimited,
                    "too many messages; this one was ignored",
                    None,
                ))
                .await;
        }
        match serde_json::from_str::<ClientMessage>(&text) {
            Ok(ClientMessage::Ping) => self.send(&ServerMessage::Pong).await,
            Ok(ClientMessage::Subscribe { class_id, since }) => {
                self.subscribe(class_id, since).await
            }
            Ok(ClientMessage::Unsubscribe { class_id }) => {
                self.leave(class_id);
                self.send(&ServerMessage::Unsubscribed { class_id }).await
            }
            Err(error) => {
                self.send(&ServerMessage::error(
                    ErrorCode::BadMessage,
                    format!("not a message of this protocol: {error}"),
                    None,
                ))
                .await
            }
        }
    }

    async fn subscribe(&mut self, class: ClassId, since: Option<Position>) -> Result<(), End> {
        if !self.subs.contains_key(&class) && self.subs.len() >= self.state.config.max_subscriptions
        {
            return self
                .send(&ServerMessage::error(
                    ErrorCode::TooManySubscriptions,
                    format!(
                        "at most {} classes per socket",
                        self.state.config.max_subscriptions
                    ),
                    Some(class),
                ))
                .await;
        }
        match classes::teaches(&self.state.pool, self.instructor, class).await {
            Ok(true) => {}
            Ok(false) => {
                return self
                    .send(&ServerMessage::error(
                        ErrorCode::Forbidden,
                        "you do not teach this class",
                        Some(class),
                    ))
                    .await;
            }
            Err(error) => return self.unavailable(class, &error.to_string()).await,
        }
        // Join before reading the position, so nothing published after it
        // can be missed; what the queue holds from before is dropped by
        // offset.
        self.subs.remove(&class);
        self.joined.insert(class);
        self.state.hub.join(class, &self.outbox);
        match since {
            Some(since) => self.resume(class, since).await,
            None => self.snapshot(class).await,
        }
    }

    /// Sends what the class published after `since`, then `subscribed`;
    /// or, when that is no longer kept (another epoch, trimmed, a point
    /// past the end), `resync` and a snapshot.
    async fn resume(&mut self, class: ClassId, since: Position) -> Result<(), End> {
        let mut redis = self.state.redis.clone();
        let missed = live::since(
            &mut redis,
            &self.state.keys,
            class,
            &since.epoch,
            since.offset,
        )
        .await;
        let missed = match missed {
            Ok(Since::Messages(missed)) => missed,
            Ok(Since::Gone) => return self.restart(class, ResyncReason::Gone).await,
            Err(error) => return self.unavailable(class, &error.to_string()).await,
        };
        let mut offset = since.offset;
        for message in missed {
            offset = message.offset;
            self.send_live(&message).await?;
        }
        self.state.hub.seen(class, &since.epoch, offset);
        self.subs.insert(
            class,
            Subscription {
                epoch: since.epoch.clone(),
                offset,
            },
        );
        self.send(&ServerMessage::Subscribed {
            class_id: class,
            epoch: since.epoch,
            offset,
        })
        .await
    }

    fn leave(&mut self, class: ClassId) {
        self.subs.remove(&class);
        self.joined.remove(&class);
        self.state.hub.leave(class, self.outbox.id);
    }

    /// Sends a snapshot and starts the subscription at its position.
    async fn snapshot(&mut self, class: ClassId) -> Result<(), End> {
        let mut redis = self.state.redis.clone();
        let loaded = async {
            let lock = ClassSnapshot::lock(&self.state.pool, class).await?;
            let position = live::position(&mut redis, &self.state.keys, class).await?;
            let students = lock.load().await?;
            Ok::<_, anyhow::Error>((position, students))
        }
        .await;
        let ((epoch, offset), students) = match loaded {
            Ok(loaded) => loaded,
            Err(error) => return self.unavailable(class, &format!("{error:#}")).await,
        };
        self.state.hub.seen(class, &epoch, offset);
        self.subs.insert(
            class,
            Subscription {
                epoch: epoch.clone(),
                offset,
            },
        );
        self.send(&ServerMessage::Snapshot {
            class_id: class,
            epoch,
            offset,
            students: students
                .into_iter()
                .map(|(student, status)| SnapshotStudent { student, status })
                .collect(),
        })
        .await
    }

    /// `resync` with the class's position, then a fresh snapshot.
    async fn restart(&mut self, class: ClassId, reason: ResyncReason) -> Result<(), End> {
        let mut redis = self.state.redis.clone();
        let (epoch, offset) = match live::position(&mut redis, &self.state.keys, class).await {
            Ok(position) => position,
            Err(error) => return self.unavailable(class, &error.to_string()).await,
        };
        self.send(&ServerMessage::Resync {
            class_id: class,
            epoch,
            offset,
            reason,
        })
        .await?;
        self.snapshot(class).await
    }

    async fn unavailable(&mut self, class: ClassId, why: &str) -> Result<(), End> {
        tracing::warn!(%class, why, "subscription failed");
        self.leave(class);
        self.send(&ServerMessage::error(
            ErrorCode::Unavailable,
            "class data is unavailable right now; subscribe again",
            Some(class),
        ))
        .await
    }

    /// Restart the classes whose stream restarted. If the queue
    /// overflowed, drop those subscriptions with a `resync`, or close a
    /// socket that keeps falling behind.
    async fn fell_behind(&mut self) -> Result<(), End> {
        let (classes, restarted, direct_lost) = self.outbox.signals.take();
        for class in restarted {
            if self.subs.contains_key(&class) {
                self.restart(class, ResyncReason::Gone).await?;
            }
        }
        let now = Instant::now();
        self.resyncs
            .retain(|t| now.duration_since(*t) < Duration::from_secs(60));
        let mut behind = Vec::new();
        for class in classes {
            if let Some(sub) = self.subs.remove(&class) {
                behind.push((class, sub));
            }
        }
        if behind.is_empty() && !direct_lost {
            return Ok(());
        }
        self.resyncs.push(now);
        let too_often = self.resyncs.len()
            > usize::try_from(self.state.config.max_resyncs_per_minute).unwrap_or(usize::MAX);
        if direct_lost || too_often {
            self.state
                .metrics
                .slow_clients
                .with_label_values(&["close"])
                .inc();
            return Err(End::Close(
                close::TRY_AGAIN_LATER,
                "too slow; reconnect later",
            ));
        }
        self.state
            .metrics
            .slow_clients
            .with_label_values(&["resync"])
            .inc();
        for (class, sub) in behind {
            self.send(&ServerMessage::Resync {
                class_id: class,
                epoch: sub.epoch,
                offset: sub.offset,
                reason: ResyncReason::Behind,
            })
            .await?;
        }
        Ok(())
    }

    async fn relay_batch(&mut self, batch: &mut Vec<Frame>) -> Result<(), End> {
        for frame in batch.drain(..) {
            self.relay(frame).await?;
        }
        Ok(())
    }

    /// Delivers a queued frame if it is the next one of its class.
    async fn relay(&mut self, frame: Frame) -> Result<(), End> {
        let Some(class) = frame.class else {
            if self.pushed_unread.remove(&frame.offset) {
                return Ok(());
            }
            return self.write_frame(frame).await;
        };
        let Some(sub) = self.subs.get(&class) else {
            return Ok(());
        };
        if *frame.epoch != *sub.epoch {
            // Redis lost the class's history: numbering restarted.
            return self.restart(class, ResyncReason::Gone).await;
        }
        if frame.offset <= sub.offset {
            return Ok(());
        }
        if frame.offset > sub.offset + 1 {
            let (epoch, from) = (sub.epoch.clone(), sub.offset);
            let mut redis = self.state.redis.clone();
            match live::since(&mut redis, &self.state.keys, class, &epoch, from).await {
                Ok(Since::Messages(missed)) => {
                    for message in missed.iter().filter(|m| m.offset < frame.offset) {
                        self.state.metrics.gap_fills.inc();
                        self.send_live(message).await?;
                        if let Some(sub) = self.subs.get_mut(&class) {
                            sub.offset = message.offset;
                        }
                    }
                }
                Ok(Since::Gone) => return self.restart(class, ResyncReason::Gone).await,
                Err(error) => return self.unavailable(class, &error.to_string()).await,
            }
        }
        if let Some(sub) = self.subs.get_mut(&class) {
            sub.offset = frame.offset;
        }
        self.write_frame(frame).await
    }

    async fn send_live(&mut self, message: &LiveMessage) -> Result<(), End> {
        let text = serde_json::to_string(message).unwrap_or_default();
        self.write(Message::Text(text.into())).await
    }

    async fn write_frame(&mut self, frame: Frame) -> Result<(), End> {
        self.state
            .metrics
            .messages_out
            .with_label_values(&[frame.kind])
            .inc();
        self.pending.push(frame.received);
        self.write(Message::Text(frame.text)).await
    }

    async fn send(&mut self, message: &ServerMessage) -> Result<(), End> {
        let kind = match message {
            ServerMessage::Snapshot { .. } => "snapshot",
            ServerMessage::Subscribed { .. } => "subscribed",
            ServerMessage::Unsubscribed { .. } => "unsubscribed",
            ServerMessage::Resync { .. } => "resync",
            ServerMessage::DirectMessage { .. } => "direct_message",
            ServerMessage::Pong => "pong",
            ServerMessage::Error { .. } => "error",
        };
        self.state
            .metrics
            .messages_out
            .with_label_values(&[kind])
            .inc();
        let text = serde_json::to_string(message).unwrap_or_default();
        self.write(Message::Text(text.into())).await
    }

    /// Queues a message in the socket's write buffer (writing when it is
    /// full), bounded by the write timeout.
    async fn write(&mut self, message: Message) -> Result<(), End> {
        let timeout = self.state.config.write_timeout;
        match tokio::time::timeout(timeout, self.socket.feed(message)).await {
            Ok(Ok(())) => {
                self.written += 1;
                Ok(())
            }
            Ok(Err(_)) => Err(End::Gone),
            Err(_) => Err(self.stalled()),
        }
    }

    async fn flush(&mut self) -> Result<(), End> {
        if self.written == 0 {
            return Ok(());
        }
        let timeout = self.state.config.write_timeout;
        match tokio::time::timeout(timeout, self.socket.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(End::Gone),
            Err(_) => return Err(self.stalled()),
        }
        self.written = 0;
        let now = Instant::now();
        for received in self.pending.drain(..) {
            self.state
                .metrics
                .fanout_seconds
                .observe(now.duration_since(received).as_secs_f64());
        }
        Ok(())
    }

    fn stalled(&self) -> End {
        self.state
            .metrics
            .slow_clients
            .with_label_values(&["close"])
            .inc();
        End::Gone
    }
}

fn read_error(error: &axum::Error) -> End {
    let text = error.to_string();
    if text.contains("too long") || text.contains("Space limit") || text.contains("too big") {
        End::Close(close::TOO_BIG, "message too big")
    } else {
        End::Gone
    }
}

/// A token bucket for client messages.
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// Both at least 1 (checked at load): a bucket that never fills would
    /// refuse every message.
    fn new(per_second: u32, burst: u32) -> Self {
        let burst = f64::from(burst);
        Self {
            rate: f64::from(per_second),
            burst,
            tokens: burst,
            at: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
