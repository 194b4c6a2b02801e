//! Cell Monitor's event bus on Redis Streams.
//!
//! * [`keys`]: where events go: `{prefix}events:{N}` for shard N. The shard
//!   number sits in a Redis Cluster hash tag, so each shard is one slot and
//!   shards spread over a cluster; a student always maps to the same shard.
//! * [`codec`]: how a [`StreamEvent`](cellmon_domain::envelope::StreamEvent)
//!   is laid out as stream entry fields.
//! * [`producer`]: [`Producer`], which appends events with pipelined `XADD`
//!   under a hard timeout and reports success only once Redis acknowledged
//!   every entry (the Redis half of ARCHITECTURE.md rule 1; [`handoff`]
//!   holds the whole rule).
//! * [`consumer`]: consumer groups for the sinks: batched reads, ack after
//!   commit, reclaiming, dead letters, trimming below what groups still need.
//! * [`live`]: the per-class live channel and its numbered, capped history.
//! * [`spool`]: the local fsync'd spool ingest falls back to, one process
//!   per directory (locked), with its record encoding.
//! * [`handoff`]: [`Handoff`], the durable hand-off of rule 1 in one place:
//!   Redis within its timeout, else the spool, else a typed "unavailable";
//!   and the replay of spooled events to Redis.

pub mod codec;
pub mod consumer;
pub mod handoff;
pub mod keys;
pub mod live;
pub mod producer;
pub mod spool;

pub use handoff::{HandedOff, Handoff, HandoffError, HandoffMetrics};
pub use keys::StreamKeys;
pub use producer::{Producer, ProducerConfig, PublishError};
