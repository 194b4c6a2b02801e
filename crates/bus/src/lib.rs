//! Cell Monitor's event bus on Redis Streams.
//!
//! * [`keys`]: where events go: `{prefix}events:{N}` for shard N. The shard
//!   number sits in a Redis Cluster hash tag, so each shard is one slot and
//!   shards spread over a cluster; a student always maps to the same shard.
//! * [`codec`]: how a [`StreamEvent`](cellmon_domain::envelope::StreamEvent)
//!   is laid out as stream entry fields.
//! * [`producer`]: [`Producer`], which appends events with pipelined `XADD`
//!   under a hard timeout and reports success only once Redis acknowledged
//!   every entry (ARCHITECTURE.md rule 1).

pub mod codec;
pub mod keys;
pub mod producer;
pub mod spool;

pub use keys::StreamKeys;
pub use producer::{Producer, ProducerConfig, PublishError};
