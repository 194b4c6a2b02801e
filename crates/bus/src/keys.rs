//! Stream key names and sharding.

use std::num::{NonZeroU16, NonZeroU64};

use cellmon_domain::event::StudentKey;
use cellmon_domain::lms::ClassId;

/// Names the streams of one deployment (or one test: the prefix isolates).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamKeys {
    prefix: String,
    shards: NonZeroU16,
}

impl StreamKeys {
    /// `prefix` is prepended to every key (e.g. `cellmon:`); `shards` is the
    /// number of event streams. The binaries' `stream_shards` setting has
    /// the same type, so a 0 is refused where it is written.
    pub fn new(prefix: impl Into<String>, shards: NonZeroU16) -> Self {
        Self {
            prefix: prefix.into(),
            shards,
        }
    }

    pub fn shards(&self) -> u16 {
        self.shards.get()
    }

    /// The events stream of `shard`, with the shard as a hash tag.
    pub fn events(&self, shard: u16) -> String {
        format!("{}events:{{{shard}}}", self.prefix)
    }

    /// A key whose disappearance reveals that Redis lost its data.
    pub fn marker(&self) -> String {
        format!("{}marker", self.prefix)
    }

    /// The receive time first recorded for an event that has no client
    /// time (see [`Producer::publish`](crate::Producer::publish)).
    pub fn first_seen(&self, event: &cellmon_domain::EventId) -> String {
        format!("{}first-seen:{event}", self.prefix)
    }

    /// A consumer group's dead-letter stream.
    pub fn dead_letters(&self, group: &str) -> String {
        format!("{}dead:{group}", self.prefix)
    }

    /// A class's capped history of live messages (the class id is the
    /// hash tag, so the history and its counter share a slot).
    pub fn history(&self, class: ClassId) -> String {
        format!("{}history:{{{class}}}", self.prefix)
    }

    /// The epoch and last offset of a class's history.
    pub fn history_meta(&self, class: ClassId) -> String {
        format!("{}history-meta:{{{class}}}", self.prefix)
    }

    /// The pub/sub channel of a class's live messages.
    pub fn live_channel(&self, class: ClassId) -> String {
        format!("{}live:{class}", self.prefix)
    }

    /// The pattern matching every class's live channel.
    pub fn live_pattern(&self) -> String {
        format!("{}live:*", self.prefix)
    }

    /// The pub/sub channel of 1:1 messages for every gateway (each routes
    /// them to its own connections of the recipient).
    pub fn direct_channel(&self) -> String {
        format!("{}direct", self.prefix)
    }

    /// Every events stream, in shard order.
    pub fn all_events(&self) -> impl Iterator<Item = String> + '_ {
        (0..self.shards.get()).map(|shard| self.events(shard))
    }

    /// The shard of a student: stable across processes and versions, so a
    /// student's events stay in one stream, in order.
    pub fn shard_for(&self, class: ClassId, student: &StudentKey) -> u16 {
        let mut hash = Fnv1a::new();
        hash.write(class.0.as_bytes());
        hash.write(student.to_string().as_bytes());
        // Below `shards`, so it fits.
        (hash.finish() % NonZeroU64::from(self.shards)) as u16
    }
}

/// FNV-1a, 64 bit: tiny, and fixed forever (std's hasher may change).
struct Fnv1a(u64);

impl Fnv1a {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use cellmon_domain::fields::Email;
    use uuid::Uuid;

    use super::*;

    fn shards(n: u16) -> NonZeroU16 {
        NonZeroU16::new(n).expect("a test's shard count is not 0")
    }

    #[test]
    fn keys_carry_the_shard_as_a_hash_tag() {
        let keys = StreamKeys::new("cellmon:", shards(4));
        assert_eq!(keys.events(3), "cellmon:events:{3}");
        assert_eq!(keys.all_events().count(), 4);
    }

    #[test]
    fn a_student_always_maps_to_the_same_shard() {
        let keys = StreamKeys::new("p:", shards(8));
        let class = ClassId(Uuid::from_u128(1));
        let student = StudentKey::Email(Email::parse("hanako@example.ac.jp").unwrap());
        let shard = keys.shard_for(class, &student);
        assert_eq!(shard, keys.shard_for(class, &student));
        // Pinned: changing the hash would move students between streams.
        assert_eq!(shard, 2);
    }

    #[test]
    fn students_spread_over_shards() {
        let keys = StreamKeys::new("p:", shards(4));
        let class = ClassId(Uuid::from_u128(1));
        let mut seen = [0u32; 4];
        for i in 0..400 {
            let email = Email::parse(&format!("s{i}@example.ac.jp")).unwrap();
            seen[usize::from(keys.shard_for(class, &StudentKey::Email(email)))] += 1;
        }
        assert!(seen.iter().all(|n| *n > 50), "uneven spread {seen:?}");
    }

    #[test]
    fn one_shard_is_one_stream() {
        let keys = StreamKeys::new("p:", NonZeroU16::MIN);
        assert_eq!(keys.all_events().collect::<Vec<_>>(), ["p:events:{0}"]);
        let class = ClassId(Uuid::from_u128(1));
        let student = StudentKey::Email(Email::parse("hanako@example.ac.jp").unwrap());
        assert_eq!(keys.shard_for(class, &student), 0);
    }
}
