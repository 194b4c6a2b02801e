//! The live channel and the per-class history of live messages.
//!
//! The persister publishes each class's [`LiveMessage`]s twice, in one Lua
//! script so both see the same numbering: `XADD` to the class's capped
//! history stream (entry id `offset-0`, so a reader resumes with
//! `XRANGE (offset-0 +`), and `PUBLISH` on the class's channel for the
//! gateways listening now. The class's `{epoch, offset}` lives in a hash
//! beside the history; when Redis loses it, the next message starts a new
//! epoch (and an empty history), which tells clients to take a snapshot.
//!
//! [`LiveMessage`]: cellmon_domain::live::LiveMessage

use cellmon_domain::live::{LiveMessage, Unnumbered};
use cellmon_domain::lms::ClassId;
use redis::aio::ConnectionLike;

use crate::keys::StreamKeys;

/// How many messages a class's history keeps (about; trimming is lazy).
pub const HISTORY_CAP: u64 = 10_000;

/// Lua: the class's epoch in `epoch`, starting one (`ARGV[1]`, with an
/// empty history) when the class has none.
macro_rules! ensure_epoch {
    () => {
        r#"
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'epoch', epoch, 'offset', 0)
end
"#
    };
}

const PUBLISH: &str = concat!(
    ensure_epoch!(),
    r#"local last = 0
for i = 4, #ARGV do
  last = redis.call('HINCRBY', KEYS[2], 'offset', 1)
  local msg = '{"epoch":"' .. epoch .. '","offset":' .. last .. ',' .. string.sub(ARGV[i], 2)
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], last .. '-0', 'm', msg)
  redis.call('PUBLISH', ARGV[3], msg)
end
return {epoch, last}
"#
);

const POSITION: &str = concat!(
    ensure_epoch!(),
    "return {epoch, tonumber(redis.call('HGET', KEYS[2], 'offset'))}\n"
);

/// Why publishing failed.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("message could not be encoded: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Numbers, records and publishes `messages` (all of one class), in order.
/// Returns the epoch and the offset of the last one.
pub async fn publish<C: ConnectionLike>(
    conn: &mut C,
    keys: &StreamKeys,
    class: ClassId,
    messages: &[Unnumbered],
) -> Result<(String, u64), LiveError> {
    let script = redis::Script::new(PUBLISH);
    let mut invocation = script.key(keys.history(class));
    invocation
        .key(keys.history_meta(class))
        .arg(uuid::Uuid::new_v4().simple().to_string())
        .arg(HISTORY_CAP)
        .arg(keys.live_channel(class));
    for message in messages {
        invocation.arg(serde_json::to_string(message)?);
    }
    let (epoch, last): (String, u64) = invocation.invoke_async(conn).await?;
    Ok((epoch, last))
}

/// The class's current `{epoch, offset}`: the offset of the last message
/// published (0 for none). Starts an epoch when the class has none, the
/// same way [`publish`] does, so a snapshot taken before the class's first
/// message has a position that the messages after it continue.
pub async fn position<C: ConnectionLike>(
    conn: &mut C,
    keys: &StreamKeys,
    class: ClassId,
) -> Result<(String, u64), LiveError> {
    let (epoch, offset): (String, u64) = redis::Script::new(POSITION)
        .key(keys.history(class))
        .key(keys.history_meta(class))
        .arg(uuid::Uuid::new_v4().simple().to_string())
        .invoke_async(conn)
        .await?;
    Ok((epoch, offset))
}

/// What a class's history holds after a given point.
#[derive(Debug, Clone, PartialEq)]
pub enum Since {
    /// Every message after the point, in order (possibly none).
    Messages(Vec<LiveMessage>),
    /// The point is from another epoch or older than the history keeps:
    /// the client needs a fresh snapshot.
    Gone,
}

/// The messages of a class after `{epoch, offset}`: all of them up to
/// the class's current offset, or [`Since::Gone`] when that is impossible
/// (another epoch, trimmed, or a point past the end).
pub async fn since<C: ConnectionLike>(
    conn: &mut C,
    keys: &StreamKeys,
    class: ClassId,
    epoch: &str,
    offset: u64,
) -> Result<Since, LiveError> {
    let (current, last): (Option<String>, Option<u64>) = redis::cmd("HMGET")
        .arg(keys.history_meta(class))
        .arg("epoch")
        .arg("offset")
        .query_async(conn)
        .await?;
    let last = last.unwrap_or_default();
    if current.as_deref() != Some(epoch) || offset > last {
        return Ok(Since::Gone);
    }
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(keys.history(class))
        .arg(format!("({offset}-0"))
        .arg("+")
        .query_async(conn)
        .await?;
    let mut messages = Vec::with_capacity(entries.len());
    for (_, fields) in entries {
        if let Some((_, json)) = fields.into_iter().find(|(name, _)| name == "m") {
            messages.push(serde_json::from_str::<LiveMessage>(&json)?);
        }
    }
    // The history was trimmed past the point (or lost while its counter
    // survived): something in between is gone.
    let continues = match messages.first() {
        Some(first) => first.offset == offset + 1,
        None => offset == last,
    };
    if !continues {
        return Ok(Since::Gone);
    }
    Ok(Since::Messages(messages))
}
