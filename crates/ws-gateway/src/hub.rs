//! Rooms and the one Redis subscription of the process.
//!
//! [`run_pubsub`] holds a single pub/sub connection (pattern `live:*` for
//! every class, and the 1:1 message channel) and hands each message to the
//! [`Hub`], which puts it, without waiting, in the bounded queue of every
//! socket in the class's room. A socket whose queue is full is taken out of
//! the room and told so through its [`Signals`]: it sends `resync` (or
//! closes) when it gets to it, and nobody else waits for it.
//!
//! Pub/sub forgets what it sent while a gateway was disconnected, so after
//! every reconnection the hub reads each room's missed messages from the
//! class's history; sockets drop what they already have by offset.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use cellmon_bus::StreamKeys;
use cellmon_bus::live::{self, Since};
use cellmon_domain::lms::ClassId;
use futures_util::StreamExt as _;
use redis::aio::ConnectionManager;
use serde::Deserialize;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::metrics::Metrics;

/// Identifies one socket within the process.
pub type ConnId = u64;

/// A message on its way to sockets.
#[derive(Debug, Clone)]
pub struct Frame {
    /// The class of a live message; `None` for a 1:1 message.
    pub class: Option<ClassId>,
    pub epoch: Arc<str>,
    /// The live message's offset, or the 1:1 message's id.
    pub offset: u64,
    /// The message's `type`, for metrics.
    pub kind: &'static str,
    /// The JSON text; cloning shares it.
    pub text: Utf8Bytes,
    /// When it reached this gateway.
    pub received: Instant,
}

/// What the hub tells one socket out of band.
#[derive(Debug, Default)]
pub struct Signals {
    overflowed: Mutex<Vec<ClassId>>,
    restarted: Mutex<Vec<ClassId>>,
    direct_lost: AtomicBool,
    notify: Notify,
}

impl Signals {
    /// Waits until there is something to take.
    pub async fn notified(&self) {
        self.notify.notified().await;
    }

    fn overflow(&self, class: ClassId) {
        lock(&self.overflowed).push(class);
        self.notify.notify_one();
    }

    fn restart(&self, class: ClassId) {
        lock(&self.restarted).push(class);
        self.notify.notify_one();
    }

    /// What happened since the last call: the classes whose messages
    /// overflowed the queue, the classes whose live stream restarted (its
    /// history was lost while this gateway was not listening), and whether
    /// a 1:1 message was lost.
    pub fn take(&self) -> (Vec<ClassId>, Vec<ClassId>, bool) {
        (
            std::mem::take(&mut *lock(&self.overflowed)),
            std::mem::take(&mut *lock(&self.restarted)),
            self.direct_lost.swap(false, Ordering::AcqRel),
        )
    }
}

/// The sending side of one socket's queue.
#[derive(Debug, Clone)]
pub struct Outbox {
    pub id: ConnId,
    tx: mpsc::Sender<Frame>,
    pub signals: Arc<Signals>,
}

#[derive(Debug, Default)]
struct Room {
    members: HashMap<ConnId, Outbox>,
    /// The last message seen for the class, to catch up after a reconnect.
    last: Option<(Arc<str>, u64)>,
}

/// Rooms per class and the connections per instructor.
#[derive(Debug)]
pub struct Hub {
    rooms: RwLock<HashMap<ClassId, Room>>,
    users: RwLock<HashMap<Uuid, HashMap<ConnId, Outbox>>>,
    next_id: AtomicU64,
    metrics: Metrics,
}

impl Hub {
    pub fn new(metrics: Metrics) -> Self {
        Self {
            rooms: RwLock::default(),
            users: RwLock::default(),
            next_id: AtomicU64::new(1),
            metrics,
        }
    }

    /// A new socket's queue, of `capacity` frames.
    ///
    /// # Panics
    ///
    /// If `capacity` is 0, which `queue_capacity`'s validation refuses.
    pub fn outbox(&self, capacity: usize) -> (Outbox, mpsc::Receiver<Frame>) {
        let (tx, rx) = mpsc::channel(capacity);
        let outbox = Outbox {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            tx,
            signals: Arc::default(),
        };
        (outbox, rx)
    }

    /// Puts a socket in a class's room (again: no change).
    pub fn join(&self, class: ClassId, outbox: &Outbox) {
        let mut rooms = self.rooms.write().unwrap_or_else(PoisonError::into_inner);
        let room = rooms.entry(class).or_default();
        if room.members.insert(outbox.id, outbox.clone()).is_none() {
            self.metrics.subscriptions.inc();
        }
        self.metrics.rooms.set(gauge(rooms.len()));
    }

    /// Records a position of a class read from Redis (a socket's snapshot
    /// or resume point), so a reconnect catches the room up from there
    /// even before its first live message.
    pub fn seen(&self, class: ClassId, epoch: &str, offset: u64) {
        let mut rooms = self.rooms.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(room) = rooms.get_mut(&class)
            && room
                .last
                .as_ref()
                .is_none_or(|(e, o)| &**e != epoch || *o < offset)
        {
            room.last = Some((Arc::from(epoch), offset));
        }
    }

    /// Tells every socket in a class's room that the class's stream
    /// restarted.
    fn restart(&self, class: ClassId) {
        let rooms = self.rooms.read().unwrap_or_else(PoisonError::into_inner);
        for outbox in rooms
            .get(&class)
            .into_iter()
            .flat_map(|r| r.members.values())
        {
            outbox.signals.restart(class);
        }
    }

    /// Takes a socket out of a class's room.
    pub fn leave(&self, class: ClassId, conn: ConnId) {
        let mut rooms = self.rooms.write().unwrap_or_else(PoisonError::into_inner);
        Self::remove(&mut rooms, class, conn, &self.metrics);
    }

    fn remove(rooms: &mut HashMap<ClassId, Room>, class: ClassId, conn: ConnId, metrics: &Metrics) {
        if let Some(room) = rooms.get_mut(&class) {
            if room.members.remove(&conn).is_some() {
                metrics.subscriptions.dec();
            }
            if room.members.is_empty() {
                rooms.remove(&class);
            }
        }
        metrics.rooms.set(gauge(rooms.len()));
    }

    /// Registers a socket of an instructor, for their 1:1 messages.
    pub fn add_user(&self, instructor: Uuid, outbox: &Outbox) {
        self.users
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(instructor)
            .or_default()
            .insert(outbox.id, outbox.clone());
    }

    pub fn remove_user(&self, instructor: Uuid, conn: ConnId) {
        let mut users = self.users.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(conns) = users.get_mut(&instructor) {
            conns.remove(&conn);
            if conns.is_empty() {
                users.remove(&instructor);
            }
        }
    }

    /// Sockets in a class's room.
    pub fn members(&self, class: ClassId) -> usize {
        self.rooms
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&class)
            .map_or(0, |r| r.members.len())
    }

    /// Instructors with a socket here, and their sockets.
    pub fn users(&self) -> (usize, usize) {
        let users = self.users.read().unwrap_or_else(PoisonError::into_inner);
        (users.len(), users.values().map(HashMap::len).sum())
    }

    /// Queues a live message for every socket in its class's room. A
    /// socket whose queue is full leaves the room and is signalled.
    pub fn deliver_live(&self, class: ClassId, frame: &Frame) {
        let mut rooms = self.rooms.write().unwrap_or_else(PoisonError::into_inner);
        let Some(room) = rooms.get_mut(&class) else {
            return;
        };
        if room
            .last
            .as_ref()
            .is_none_or(|(epoch, offset)| *epoch != frame.epoch || *offset < frame.offset)
        {
            room.last = Some((frame.epoch.clone(), frame.offset));
        }
        let mut gone = Vec::new();
        for outbox in room.members.values() {
            match outbox.tx.try_send(frame.clone()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    outbox.signals.overflow(class);
                    gone.push(outbox.id);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => gone.push(outbox.id),
            }
        }
        for conn in gone {
            Self::remove(&mut rooms, class, conn, &self.metrics);
        }
    }

    /// Queues a 1:1 message for every socket of an instructor.
    pub fn deliver_direct(&self, instructor: Uuid, frame: &Frame) {
        let users = self.users.read().unwrap_or_else(PoisonError::into_inner);
        for outbox in users.get(&instructor).into_iter().flat_map(HashMap::values) {
            if let Err(mpsc::error::TrySendError::Full(_)) = outbox.tx.try_send(frame.clone()) {
                outbox.signals.direct_lost.store(true, Ordering::Release);
                outbox.signals.notify.notify_one();
            }
        }
    }

    /// The classes with a room and the last message seen for each.
    fn positions(&self) -> Vec<(ClassId, Arc<str>, u64)> {
        self.rooms
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter_map(|(class, room)| {
                room.last
                    .as_ref()
                    .map(|(epoch, offset)| (*class, epoch.clone(), *offset))
            })
            .collect()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The fields of a live message the hub routes by.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LiveHeader {
    epoch: String,
    offset: u64,
    class_id: ClassId,
    #[serde(rename = "type")]
    kind: String,
}

/// A 1:1 message as published for the gateways.
#[derive(Debug, serde::Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DirectEnvelope {
    pub instructor_id: Uuid,
    pub message_id: i64,
    /// The `direct_message` server message, ready to send.
    pub frame: String,
}

fn kind(name: &str) -> &'static str {
    match name {
        "student_update" => "student_update",
        "alert" => "alert",
        _ => "other",
    }
}

/// A live message's frame, or `None` when it is not one.
pub fn live_frame(text: String, received: Instant) -> Option<(ClassId, Frame)> {
    let header: LiveHeader = serde_json::from_str(&text).ok()?;
    Some((
        header.class_id,
        Frame {
            class: Some(header.class_id),
            epoch: header.epoch.into(),
            offset: header.offset,
            kind: kind(&header.kind),
            text: text.into(),
            received,
        },
    ))
}

/// Holds the process's one pub/sub connection until `shutdown`,
/// reconnecting with backoff, and feeds the hub. The connection is pinged
/// every `ping`, which is also how long an answer or a new subscription
/// may take.
pub async fn run_pubsub(
    hub: Arc<Hub>,
    client: redis::Client,
    mut control: ConnectionManager,
    keys: StreamKeys,
    ping: Duration,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let connected = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.psubscribe(keys.live_pattern()).await?;
            pubsub.subscribe(keys.direct_channel()).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = tokio::select! {
            () = shutdown.cancelled() => return,
            result = tokio::time::timeout(ping, connected) => result,
        };
        let pubsub = match pubsub {
            Ok(Ok(pubsub)) => pubsub,
            failed => {
                let error = match failed {
                    Ok(Err(error)) => error.to_string(),
                    _ => "no answer".to_owned(),
                };
                tracing::warn!(%error, "redis pub/sub unavailable; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        hub.metrics.pubsub_connects.inc();
        hub.metrics.pubsub_up.set(1);
        backoff = Duration::from_millis(100);
        // Whatever was published while no connection listened (none, the
        // first time, unless sockets came before Redis did).
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = catch_up(&hub, &mut control, &keys) => {}
        }
        listen(&hub, pubsub, &keys, ping, &shutdown).await;
        hub.metrics.pubsub_up.set(0);
        if shutdown.is_cancelled() {
            return;
        }
    }
}

/// Feeds the hub from one pub/sub connection until it fails or `shutdown`.
async fn listen(
    hub: &Hub,
    pubsub: redis::aio::PubSub,
    keys: &StreamKeys,
    every: Duration,
    shutdown: &CancellationToken,
) {
    let direct = keys.direct_channel();
    let (mut sink, mut messages) = pubsub.split();
    // A connection that died without a reset would just go quiet: ping it,
    // and reconnect when it does not answer.
    let mut ping = tokio::time::interval(every);
    ping.reset();
    loop {
        let message = tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ping.tick() => {
                // In subscribed mode Redis answers PING with an array ([pong, ""]),
                // not a string: any answer will do.
                let pong = tokio::time::timeout(every, sink.ping::<redis::Value>()).await;
                if !matches!(pong, Ok(Ok(_))) {
                    tracing::warn!("redis pub/sub does not answer; reconnecting");
                    return;
                }
                hub.metrics.pubsub_pongs.inc();
                continue;
            }
            message = messages.next() => message,
        };
        let Some(message) = message else {
            tracing::warn!("redis pub/sub connection lost; reconnecting");
            return;
        };
        let received = Instant::now();
        let Ok(text) = String::from_utf8(message.get_payload_bytes().to_vec()) else {
            continue;
        };
        if message.get_channel_name() == direct {
            route_direct(hub, &text, received);
        } else if let Some((class, frame)) = live_frame(text, received) {
            hub.metrics.messages_in.inc();
            hub.deliver_live(class, &frame);
        }
    }
}

fn route_direct(hub: &Hub, text: &str, received: Instant) {
    let Ok(envelope) = serde_json::from_str::<DirectEnvelope>(text) else {
        return;
    };
    let frame = Frame {
        class: None,
        epoch: Arc::from(""),
        offset: u64::try_from(envelope.message_id).unwrap_or_default(),
        kind: "direct_message",
        text: envelope.frame.into(),
        received,
    };
    hub.deliver_direct(envelope.instructor_id, &frame);
}

/// Re-delivers what each room missed while pub/sub was away.
/// Tries of one class's catch-up before its sockets are told to resync.
const CATCH_UP_ATTEMPTS: u32 = 3;

async fn catch_up(hub: &Hub, control: &mut ConnectionManager, keys: &StreamKeys) {
    for (class, epoch, offset) in hub.positions() {
        // The control connection may have died in the same outage: the
        // manager reconnects after a failed command, so try again.
        let mut attempt = 0;
        let caught_up = loop {
            match live::since(control, keys, class, &epoch, offset).await {
                Err(error) if attempt < CATCH_UP_ATTEMPTS => {
                    attempt += 1;
                    tracing::debug!(%error, %class, attempt, "catch-up failed; again");
                    tokio::time::sleep(Duration::from_millis(200) * attempt).await;
                }
                result => break result,
            }
        };
        match caught_up {
            Ok(Since::Messages(messages)) => {
                for message in messages {
                    let Ok(text) = serde_json::to_string(&message) else {
                        continue;
                    };
                    if let Some((class, frame)) = live_frame(text, Instant::now()) {
                        hub.metrics.gap_fills.inc();
                        hub.deliver_live(class, &frame);
                    }
                }
            }
            Ok(Since::Gone) => hub.restart(class),
            Err(error) => {
                // Not silently behind: its sockets take a fresh snapshot.
                tracing::warn!(%error, %class, "cannot catch up a class; its sockets resync");
                hub.restart(class);
            }
        }
    }
}
