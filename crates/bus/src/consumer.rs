//! Reading the event streams as a consumer group member.
//!
//! Each sink (Postgres, InfluxDB) is one consumer group over every shard;
//! each persister process is one consumer in it (a fresh name per process,
//! so a dead process's entries are reclaimed by the living, never silently
//! resumed). The rules (ARCHITECTURE.md 3 and 4):
//!
//! * acknowledge an entry only after its sink committed it ([`Consumer::ack`]);
//! * reclaim entries that a consumer took and never acknowledged
//!   ([`Consumer::claim_stale`], `XAUTOCLAIM`);
//! * an entry that cannot be decoded, that its sink refuses, or that was
//!   delivered more than `max_deliveries` times (the rule below) goes to
//!   the group's dead-letter stream and is acknowledged, so it never blocks
//!   the others;
//! * trim a stream only below the oldest entry some group still needs
//!   ([`trim`], `XTRIM MINID`).
//!
//! # The delivery limit: `max_deliveries`
//!
//! This is the one place the rule is defined; the persister's setting of
//! the same name feeds [`ConsumerConfig::max_deliveries`].
//!
//! An entry is delivered, and so tried, at most `max_deliveries` times.
//! Redis counts a delivery each time a consumer reads the entry and each
//! time one takes it over from another (`XAUTOCLAIM`). A live consumer
//! keeps the entries it works on claimed ([`Consumer::touch`]) while it
//! writes them and while it waits to retry a failing sink, so an outage or
//! a slow backend adds no deliveries: every delivery past the first means a
//! consumer died or hung holding the entry. When reclaiming finds an entry
//! whose count is past the limit, it comes back in [`Claimed::exhausted`]
//! and goes to the dead-letter stream untried: it (or the batch it came
//! in) keeps killing its consumers, and trying it again would only kill
//! the next one.
//!
//! A read whose reply was lost (Redis restarted or the connection broke
//! while `XREADGROUP` was in flight) may have delivered entries that this
//! consumer never saw: they sit in its own pending list, and nobody would
//! take them over before `claim_idle`. So after any failed read or
//! acknowledgement the consumer first reads its own pending entries again
//! (`XREADGROUP` from id 0) until none are left, then goes on with new
//! ones. Such a re-read counts as a delivery too.
//!
//! Groups are created (from the start of the stream) whenever Redis says
//! they do not exist, which also recreates them after Redis lost its data.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cellmon_domain::envelope::StreamEvent;
use redis::Value;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{StreamAutoClaimReply, StreamPendingCountReply, StreamReadReply};
use tokio::time::Instant;

use crate::codec::{self, DecodeError};
use crate::keys::StreamKeys;

/// The consumer groups, one per sink. Trimming waits for all of them.
pub const GROUPS: [&str; 2] = ["pg", "influx"];

/// How one consumer reads.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub keys: StreamKeys,
    pub group: String,
    /// Unique per process (and per sink task).
    pub consumer: String,
    /// A batch ends at about this many entries (at most one more per
    /// shard) ... Not 0: Redis reads without a limit at `COUNT 0`.
    pub batch_max: NonZeroUsize,
    /// ... or this long after its first entry arrived, whichever is first.
    pub batch_wait: Duration,
    /// An entry pending this long with another consumer is reclaimed.
    pub claim_idle: Duration,
    /// The most times an entry is delivered; see [the delivery
    /// limit](self#the-delivery-limit-max_deliveries).
    pub max_deliveries: u64,
    /// Longest any one Redis call may take (besides a read's blocking time).
    pub timeout: Duration,
}

/// A Redis failure. All are worth retrying: the group is recreated, the
/// connection remade.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
}

/// One stream entry as delivered.
#[derive(Debug, Clone)]
pub struct Entry {
    pub stream: String,
    pub id: String,
    /// The event, or why the entry could not be read.
    pub event: Result<StreamEvent, String>,
    /// The entry's raw fields, kept for the dead-letter stream.
    pub fields: HashMap<String, Value>,
    /// How many times Redis delivered it, when known (reclaimed entries).
    pub deliveries: Option<u64>,
}

impl Entry {
    fn new(stream: &str, id: String, fields: HashMap<String, Value>) -> Self {
        let event = codec::decode(&fields).map_err(|e: DecodeError| e.to_string());
        Self {
            stream: stream.to_owned(),
            id,
            event,
            fields,
            deliveries: None,
        }
    }
}

/// What reclaiming found.
#[derive(Debug, Default)]
pub struct Claimed {
    /// Entries now owned by this consumer, to process again.
    pub entries: Vec<Entry>,
    /// Entries delivered more than `max_deliveries` times: dead-letter
    /// them untried ([the delivery limit](self#the-delivery-limit-max_deliveries)).
    pub exhausted: Vec<Entry>,
}

/// A member of one consumer group, reading all shards.
pub struct Consumer {
    conn: ConnectionManager,
    config: ConsumerConfig,
    streams: Vec<String>,
    /// Where the next `XAUTOCLAIM` scan of each stream continues, so that
    /// a long pending list is walked through rather than only its head.
    claim_cursors: std::sync::Mutex<HashMap<String, String>>,
    /// A read or acknowledgement failed, so entries may be pending for this
    /// consumer that it does not hold: read them again before new ones.
    recover_own: AtomicBool,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("config", &self.config)
            .finish()
    }
}

/// Which entries a read asks for.
#[derive(Debug, Clone, Copy)]
enum Position {
    /// Never delivered to any consumer of the group (`>`).
    New,
    /// Delivered to this consumer and not acknowledged (from id `0`).
    Own,
}

/// The blocking time of one read call; short, so shutdown and reclaiming
/// are never far away.
const READ_BLOCK: Duration = Duration::from_millis(500);

fn is_code(error: &redis::RedisError, code: &str) -> bool {
    error.code() == Some(code)
}

impl Consumer {
    /// Connects through `client` (retrying in the background after
    /// failures) and makes sure the group exists on every shard. The
    /// consumer has a connection of its own: its blocking reads would hold
    /// up any other command on a shared one.
    pub async fn connect(client: &redis::Client, config: ConsumerConfig) -> Result<Self, BusError> {
        let client = client.clone();
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(READ_BLOCK + config.batch_wait + config.timeout))
            .set_number_of_retries(1);
        let conn = tokio::time::timeout(
            config.timeout,
            ConnectionManager::new_with_config(client, manager_config),
        )
        .await
        .map_err(|_| BusError::Timeout(config.timeout))??;
        let streams = config.keys.all_events().collect();
        let consumer = Self {
            conn,
            config,
            streams,
            claim_cursors: std::sync::Mutex::new(HashMap::new()),
            recover_own: AtomicBool::new(false),
        };
        consumer.ensure_groups().await?;
        Ok(consumer)
    }

    pub fn config(&self) -> &ConsumerConfig {
        &self.config
    }

    async fn query<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
        extra: Duration,
    ) -> Result<T, BusError> {
        let limit = self.config.timeout + extra;
        let mut conn = self.conn.clone();
        tokio::time::timeout(limit, cmd.query_async::<T>(&mut conn))
            .await
            .map_err(|_| BusError::Timeout(limit))?
            .map_err(BusError::from)
    }

    /// Creates every sink's group on every shard, from the stream's start,
    /// unless it exists. Creating all groups (not only this consumer's)
    /// keeps trimming from discarding entries a sink that has not started
    /// yet still needs.
    pub async fn ensure_groups(&self) -> Result<(), BusError> {
        for stream in &self.streams {
            for group in GROUPS.iter().copied().chain([self.config.group.as_str()]) {
                let mut cmd = redis::cmd("XGROUP");
                cmd.arg("CREATE")
                    .arg(stream)
                    .arg(group)
                    .arg("0")
                    .arg("MKSTREAM");
                match self.query::<()>(&cmd, Duration::ZERO).await {
                    Ok(()) => {}
                    Err(BusError::Redis(e)) if is_code(&e, "BUSYGROUP") => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// Runs `op`; if Redis says the group is missing (it lost its data),
    /// recreates the groups and runs it once more.
    async fn with_group<T, F, Fut>(&self, op: F) -> Result<T, BusError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, BusError>>,
    {
        match op().await {
            Err(BusError::Redis(e)) if is_code(&e, "NOGROUP") => {
                tracing::warn!(group = %self.config.group, "consumer group missing; recreating it");
                self.ensure_groups().await?;
                op().await
            }
            other => other,
        }
    }

    /// One `XREADGROUP` for about `count` entries over all shards (COUNT
    /// applies per stream, so it is split between them, rounding up: each
    /// stream's COUNT is at least 1): new entries, or with `Position::Own`
    /// this consumer's own pending ones.
    async fn read_once(
        &self,
        block: Option<Duration>,
        count: NonZeroUsize,
        position: Position,
    ) -> Result<Vec<Entry>, BusError> {
        // There is a stream per shard, and at least one shard.
        let per_stream = count.get().div_ceil(self.streams.len());
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.config.group)
            .arg(&self.config.consumer)
            .arg("COUNT")
            .arg(per_stream);
        if let Some(block) = block {
            // BLOCK is in whole milliseconds and 0 blocks forever: the last
            // microseconds of a batch's wait round up to 1 ms, not to never.
            cmd.arg("BLOCK").arg(block.as_millis().max(1) as u64);
        }
        cmd.arg("STREAMS").arg(&self.streams);
        let id = match position {
            Position::New => ">",
            Position::Own => "0",
        };
        for _ in &self.streams {
            cmd.arg(id);
        }
        let reply: Option<StreamReadReply> = self
            .with_group(|| self.query(&cmd, block.unwrap_or_default()))
            .await
            .inspect_err(|_| self.recover_own.store(true, Ordering::Release))?;
        let mut entries = Vec::new();
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for id in key.ids {
                entries.push(Entry::new(&key.key, id.id, id.map));
            }
        }
        Ok(entries)
    }

    /// The next batch of new entries: waits up to about half a second for
    /// the first, then gathers more until the batch is full or `batch_wait`
    /// passed. Empty when nothing arrived.
    /// After a failed read or acknowledgement, the batch is this consumer's
    /// own pending entries first (see the module docs).
    pub async fn read(&self) -> Result<Vec<Entry>, BusError> {
        let max = self.config.batch_max;
        if self.recover_own.load(Ordering::Acquire) {
            let own = self.read_once(None, max, Position::Own).await?;
            if !own.is_empty() {
                tracing::info!(entries = own.len(), group = %self.config.group,
                    "reading again entries whose delivery was interrupted");
                return Ok(own);
            }
            self.recover_own.store(false, Ordering::Release);
        }
        let mut batch = self.read_once(Some(READ_BLOCK), max, Position::New).await?;
        if batch.is_empty() {
            return Ok(batch);
        }
        let deadline = Instant::now() + self.config.batch_wait;
        // A read may bring one entry more per shard than asked for.
        while let Some(room) = NonZeroUsize::new(max.get().saturating_sub(batch.len())) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let more = self.read_once(Some(left), room, Position::New).await?;
            if more.is_empty() {
                break;
            }
            batch.extend(more);
        }
        Ok(batch)
    }

    /// Takes over entries that other consumers (or an earlier life of this
    /// process) took and have not acknowledged for `claim_idle`, up to
    /// `batch_max`. Entries delivered more than `max_deliveries` times
    /// (this take-over included) come back as exhausted.
    pub async fn claim_stale(&self) -> Result<Claimed, BusError> {
        let mut claimed = Claimed::default();
        let idle = self.config.claim_idle.as_millis() as u64;
        for stream in &self.streams {
            let room = self
                .config
                .batch_max
                .get()
                .saturating_sub(claimed.entries.len());
            if room == 0 {
                break;
            }
            let cursor = self
                .claim_cursors
                .lock()
                .ok()
                .and_then(|c| c.get(stream).cloned())
                .unwrap_or_else(|| "0-0".to_owned());
            let mut cmd = redis::cmd("XAUTOCLAIM");
            cmd.arg(stream)
                .arg(&self.config.group)
                .arg(&self.config.consumer)
                .arg(idle)
                .arg(&cursor)
                .arg("COUNT")
                .arg(room);
            let reply: StreamAutoClaimReply =
                self.with_group(|| self.query(&cmd, Duration::ZERO)).await?;
            // "0-0" when the scan reached the end: the next one starts over.
            if let Ok(mut cursors) = self.claim_cursors.lock() {
                cursors.insert(stream.clone(), reply.next_stream_id.clone());
            }
            if reply.claimed.is_empty() {
                continue;
            }
            let deliveries = self.deliveries(stream, &reply.claimed).await?;
            for id in reply.claimed {
                let count = deliveries.get(&id.id).copied();
                let mut entry = Entry::new(stream, id.id, id.map);
                entry.deliveries = count;
                if count.is_some_and(|n| n > self.config.max_deliveries) {
                    claimed.exhausted.push(entry);
                } else {
                    claimed.entries.push(entry);
                }
            }
        }
        Ok(claimed)
    }

    /// Delivery counts of entries this consumer now owns.
    async fn deliveries(
        &self,
        stream: &str,
        ids: &[redis::streams::StreamId],
    ) -> Result<HashMap<String, u64>, BusError> {
        let (Some(first), Some(last)) = (ids.first(), ids.last()) else {
            return Ok(HashMap::new());
        };
        let mut cmd = redis::cmd("XPENDING");
        cmd.arg(stream)
            .arg(&self.config.group)
            .arg(&first.id)
            .arg(&last.id)
            .arg(ids.len())
            .arg(&self.config.consumer);
        let reply: StreamPendingCountReply = self.query(&cmd, Duration::ZERO).await?;
        Ok(reply
            .ids
            .into_iter()
            .map(|p| (p.id, p.times_delivered as u64))
            .collect())
    }

    /// Acknowledges entries (after their sink committed them).
    pub async fn ack<'a>(
        &self,
        entries: impl IntoIterator<Item = &'a Entry>,
    ) -> Result<(), BusError> {
        let mut by_stream: HashMap<&str, Vec<&str>> = HashMap::new();
        for entry in entries {
            by_stream.entry(&entry.stream).or_default().push(&entry.id);
        }
        if by_stream.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (stream, ids) in &by_stream {
            pipe.cmd("XACK")
                .arg(*stream)
                .arg(&self.config.group)
                .arg(ids);
        }
        let mut conn = self.conn.clone();
        let limit = self.config.timeout;
        let acked = tokio::time::timeout(limit, pipe.query_async::<Vec<u64>>(&mut conn))
            .await
            .map_err(|_| BusError::Timeout(limit))
            .and_then(|reply| reply.map_err(BusError::from));
        if acked.is_err() {
            // The entries stay pending for this consumer: deliver them again.
            self.recover_own.store(true, Ordering::Release);
        }
        acked.map(drop)
    }

    /// Resets the idle time of entries this consumer holds (`XCLAIM` with
    /// `JUSTID`, which does not count as a delivery), so that while it
    /// writes them or retries a failing sink nobody takes them over.
    pub async fn touch(&self, entries: &[Entry]) -> Result<(), BusError> {
        let mut by_stream: HashMap<&str, Vec<&str>> = HashMap::new();
        for entry in entries {
            by_stream.entry(&entry.stream).or_default().push(&entry.id);
        }
        for (stream, ids) in by_stream {
            let mut cmd = redis::cmd("XCLAIM");
            cmd.arg(stream)
                .arg(&self.config.group)
                .arg(&self.config.consumer)
                .arg(0)
                .arg(&ids)
                .arg("JUSTID");
            self.query::<Value>(&cmd, Duration::ZERO).await?;
        }
        Ok(())
    }

    /// Moves an entry to the group's dead-letter stream, with the reason,
    /// and acknowledges it, atomically.
    pub async fn dead_letter(&self, entry: &Entry, reason: &str) -> Result<(), BusError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        let add = pipe
            .cmd("XADD")
            .arg(self.config.keys.dead_letters(&self.config.group))
            .arg("MAXLEN")
            .arg("~")
            .arg(DEAD_LETTER_CAP)
            .arg("*")
            .arg("stream")
            .arg(&entry.stream)
            .arg("entry")
            .arg(&entry.id)
            .arg("reason")
            .arg(reason);
        for (name, value) in &entry.fields {
            if let Value::BulkString(bytes) = value {
                add.arg(format!("f:{name}")).arg(bytes.as_slice());
            }
        }
        pipe.cmd("XACK")
            .arg(&entry.stream)
            .arg(&self.config.group)
            .arg(&entry.id)
            .ignore();
        let mut conn = self.conn.clone();
        let limit = self.config.timeout;
        tokio::time::timeout(limit, pipe.query_async::<Value>(&mut conn))
            .await
            .map_err(|_| BusError::Timeout(limit))??;
        Ok(())
    }
}

/// Per consumer group: entries not yet delivered or not yet acknowledged,
/// over all shards (the group's `lag`, as Redis 7 counts it, plus its
/// pending entries). One `XINFO GROUPS` per shard covers every group.
pub async fn backlogs(
    conn: &mut ConnectionManager,
    keys: &StreamKeys,
) -> Result<HashMap<String, u64>, BusError> {
    let mut totals = HashMap::new();
    for stream in keys.all_events() {
        for info in group_infos(conn, &stream).await? {
            let Some(name) = text(&info, "name") else {
                continue;
            };
            let number = |name: &str| match info.get(name) {
                Some(Value::Int(n)) => u64::try_from(*n).unwrap_or(0),
                _ => 0,
            };
            *totals.entry(name).or_default() += number("lag") + number("pending");
        }
    }
    Ok(totals)
}

/// `XINFO GROUPS` of a stream; none while the stream does not exist.
async fn group_infos(
    conn: &mut ConnectionManager,
    stream: &str,
) -> Result<Vec<HashMap<String, Value>>, BusError> {
    match redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await
    {
        Ok(groups) => Ok(groups),
        Err(e) if e.code() == Some("ERR") => Ok(Vec::new()), // no such stream yet
        Err(e) => Err(e.into()),
    }
}

fn text(info: &HashMap<String, Value>, name: &str) -> Option<String> {
    match info.get(name) {
        Some(Value::BulkString(b)) => String::from_utf8(b.clone()).ok(),
        Some(Value::SimpleString(s)) => Some(s.clone()),
        _ => None,
    }
}

/// The most entries a dead-letter stream keeps.
pub const DEAD_LETTER_CAP: u64 = 100_000;

/// Trims every shard below the oldest entry that some group still needs:
/// the first entry pending in any group, or the first not yet delivered to
/// a group. Skips a shard unless every group in [`GROUPS`] exists on it.
/// Returns how many entries were removed.
pub async fn trim(conn: &mut ConnectionManager, keys: &StreamKeys) -> Result<u64, BusError> {
    let mut removed = 0;
    for stream in keys.all_events() {
        let groups = group_infos(conn, &stream).await?;
        let present: Vec<String> = groups.iter().filter_map(|g| text(g, "name")).collect();
        if !GROUPS.iter().all(|g| present.iter().any(|p| p == g)) {
            continue;
        }
        let mut floor: Option<StreamIdValue> = None;
        for group in &groups {
            let Some(name) = text(group, "name") else {
                continue;
            };
            // The oldest pending entry of the group, if any.
            let summary: Value = redis::cmd("XPENDING")
                .arg(&stream)
                .arg(&name)
                .query_async(conn)
                .await?;
            let oldest_pending = match &summary {
                Value::Array(items) => match items.get(1) {
                    Some(Value::BulkString(b)) => {
                        std::str::from_utf8(b).ok().and_then(StreamIdValue::parse)
                    }
                    _ => None,
                },
                _ => None,
            };
            let needed = match oldest_pending {
                Some(id) => id,
                None => {
                    let Some(last) =
                        text(group, "last-delivered-id").and_then(|s| StreamIdValue::parse(&s))
                    else {
                        continue;
                    };
                    last.next()
                }
            };
            floor = Some(floor.map_or(needed, |f| f.min(needed)));
        }
        if let Some(floor) = floor {
            let n: u64 = redis::cmd("XTRIM")
                .arg(&stream)
                .arg("MINID")
                .arg("~")
                .arg(floor.to_string())
                .query_async(conn)
                .await?;
            removed += n;
        }
    }
    Ok(removed)
}

/// A stream entry id, `ms-seq`, ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct StreamIdValue(pub u64, pub u64);

impl StreamIdValue {
    pub fn parse(text: &str) -> Option<Self> {
        let (ms, seq) = text.split_once('-')?;
        Some(Self(ms.parse().ok()?, seq.parse().ok()?))
    }

    /// The smallest id greater than this one.
    pub fn next(self) -> Self {
        match self.1.checked_add(1) {
            Some(seq) => Self(self.0, seq),
            None => Self(self.0 + 1, 0),
        }
    }
}

impl std::fmt::Display for StreamIdValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_order_numerically() {
        let a = StreamIdValue::parse("9-5").unwrap();
        let b = StreamIdValue::parse("10-0").unwrap();
        assert!(a < b);
        assert_eq!(a.next().to_string(), "9-6");
        assert_eq!(StreamIdValue(3, u64::MAX).next(), StreamIdValue(4, 0));
        assert_eq!(StreamIdValue::parse("x"), None);
    }
}
