//! A local, durable, bounded queue for events Redis could not take.
//!
//! When Redis is down or slower than its timeout, ingest writes events here
//! and answers 202 only after they are on disk (fsync'd); a replayer sends
//! them to Redis later, in order, and acknowledges only what Redis took.
//!
//! Layout: a directory of segment files `segment-<first seq>.log` and a
//! cursor file `acked` holding the highest acknowledged sequence number.
//! Each record is framed as
//!
//! ```text
//! [len: u32 LE][crc32: u32 LE over len bytes and payload][payload: seq u64 LE, data]
//! ```
//!
//! Why not an embedded database: the spool must reopen after a torn tail
//! and after a flipped byte, still deliver every valid record, and count
//! the damage (RELIABILITY.md SPOOL-CORRUPT). Measured here, redb refuses to
//! open a truncated file and returns a wrong value silently after a flipped
//! byte; fjall refuses to open on a bad journal checksum and silently drops
//! every record after a corrupt length field. A CRC per frame and a forward
//! scan to the next valid frame do what the scenario needs.
//!
//! Concurrency: one committer thread owns the file being written. Callers
//! hand it batches; it writes every batch waiting at that moment and makes
//! them durable with one `fdatasync` (group commit), then answers each.
//! One process per directory: [`Spool::open`] locks it ([`lock`]).
//!
//! * [`record`]: what a record holds (an event, as JSON).
//! * [`lock`]: the directory's lock.

pub mod lock;
pub mod record;

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};

use tokio::sync::oneshot;

use self::lock::DirLock;

const HEADER: usize = 8;
const SEQ: usize = 8;
/// Larger frames are taken as garbage when scanning (a record is one event).
const MAX_FRAME: usize = 16 * 1024 * 1024;
/// Batches waiting for the committer; beyond it appends are refused.
const QUEUE: usize = 4096;
/// Longest an append waits for its fsync before the caller gives up (the
/// records may still be written; the caller treats the outcome as unknown).
const APPEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Where the spool lives and how much it may hold.
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    /// Most bytes on disk; appends beyond it fail with [`SpoolError::Full`].
    pub max_bytes: u64,
    /// A segment is closed and a new one started past this size.
    pub segment_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Another process (or another open spool in this one) has the
    /// directory.
    #[error(
        "the spool directory {} is in use by another process{}; one server per spool directory",
        .dir.display(),
        .holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
    )]
    Locked { dir: PathBuf, holder: Option<u32> },
    #[error("the spool is full ({max_bytes} bytes)")]
    Full { max_bytes: u64 },
    #[error("spool I/O failed: {0}")]
    Io(#[from] io::Error),
    #[error("the spool's committer has stopped")]
    Stopped,
    #[error("the spool's disk is too slow; try later")]
    Busy,
}

/// What recovery found and what the spool has done since it opened.
#[derive(Debug, Default)]
pub struct SpoolStats {
    /// Records waiting for replay.
    pub pending: AtomicU64,
    /// Bytes on disk.
    pub bytes: AtomicU64,
    /// Corrupt regions skipped when opening (each may hold several records).
    pub corrupt_regions: AtomicU64,
    /// Bytes of incomplete records at segment ends (torn writes) when opening.
    pub torn_bytes: AtomicU64,
    /// Records written since opening.
    pub appended: AtomicU64,
    /// fdatasync calls since opening (fewer than appends: group commit).
    pub syncs: AtomicU64,
    /// The last append was refused for lack of room, and nothing was
    /// acknowledged since.
    pub full: AtomicBool,
}

#[derive(Debug, Clone)]
struct Segment {
    path: PathBuf,
    /// Highest durable record in it (0 while empty).
    last_seq: u64,
    bytes: u64,
}

#[derive(Debug)]
struct State {
    segments: VecDeque<Segment>,
    acked: u64,
}

struct Commit {
    records: Vec<Vec<u8>>,
    reply: oneshot::Sender<Result<(u64, u64), SpoolError>>,
}

/// A handle to the spool; clones share it. The directory stays locked
/// until the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Spool {
    config: Arc<SpoolConfig>,
    state: Arc<Mutex<State>>,
    stats: Arc<SpoolStats>,
    writer: Arc<Writer>,
}

/// The way to the committer thread, and the directory's lock.
#[derive(Debug)]
struct Writer {
    commits: Option<mpsc::SyncSender<Commit>>,
    committer: Option<std::thread::JoinHandle<()>>,
    // Declared last: released only after the committer has stopped.
    _lock: DirLock,
}

impl Drop for Writer {
    /// Stops the committer and waits for it (at most the batch in hand,
    /// one fsync), so the lock is released only once nothing writes any
    /// more: a process that opens the directory next sees every record.
    fn drop(&mut self) {
        drop(self.commits.take());
        if let Some(committer) = self.committer.take() {
            let _ = committer.join();
        }
    }
}

impl std::fmt::Debug for Commit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Commit")
            .field("records", &self.records.len())
            .finish()
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while holding the lock leaves consistent data (every update is
    // a single assignment), so a poisoned lock is still usable.
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl Spool {
    /// Opens (or creates) the spool, recovering whatever a crash left, and
    /// starts a fresh segment so nothing is ever appended after damage.
    /// Fails with [`SpoolError::Locked`] while another process has the
    /// directory open. Blocking: call it from a blocking thread.
    pub fn open(mut config: SpoolConfig) -> Result<Self, SpoolError> {
        // Several segments must fit in the limit, or acknowledged records
        // could never be deleted to make room.
        config.segment_bytes = config
            .segment_bytes
            .clamp(4096, (config.max_bytes / 4).max(4096));
        fs::create_dir_all(&config.dir)?;
        // Before reading anything: another process may be writing.
        let lock = DirLock::acquire(&config.dir)?;
        let acked = read_cursor(&config.dir)?;
        let stats = Arc::new(SpoolStats::default());
        let mut segments = VecDeque::new();
        let mut max_seq = acked;
        for path in segment_paths(&config.dir)? {
            let scan = scan_segment(&path)?;
            stats
                .corrupt_regions
                .fetch_add(scan.corrupt_regions, Ordering::Relaxed);
            stats
                .torn_bytes
                .fetch_add(scan.torn_bytes, Ordering::Relaxed);
            if scan.corrupt_regions > 0 || scan.torn_bytes > 0 {
                tracing::warn!(
                    segment = %path.display(),
                    corrupt_regions = scan.corrupt_regions,
                    torn_bytes = scan.torn_bytes,
                    "spool damage skipped; valid records kept"
                );
            }
            let pending = scan.seqs.iter().filter(|s| **s > acked).count() as u64;
            stats.pending.fetch_add(pending, Ordering::Relaxed);
            let last_seq = scan.seqs.iter().copied().max().unwrap_or(0);
            max_seq = max_seq.max(last_seq);
            if pending == 0 {
                fs::remove_file(&path)?;
                continue;
            }
            let bytes = fs::metadata(&path)?.len();
            stats.bytes.fetch_add(bytes, Ordering::Relaxed);
            segments.push_back(Segment {
                path,
                last_seq,
                bytes,
            });
        }
        let next_seq = max_seq + 1;
        let active = new_segment(&config.dir, next_seq)?;
        segments.push_back(Segment {
            path: active.1,
            last_seq: 0,
            bytes: 0,
        });
        let state = Arc::new(Mutex::new(State { segments, acked }));
        let (commits, queue) = mpsc::sync_channel(QUEUE);
        let config = Arc::new(config);
        let committer = Committer {
            config: Arc::clone(&config),
            state: Arc::clone(&state),
            stats: Arc::clone(&stats),
            file: active.0,
            next_seq,
        };
        let committer = std::thread::Builder::new()
            .name("spool-committer".into())
            .spawn(move || committer.run(queue))?;
        Ok(Self {
            config,
            state,
            stats,
            writer: Arc::new(Writer {
                commits: Some(commits),
                committer: Some(committer),
                _lock: lock,
            }),
        })
    }

    /// The directory it lives in.
    pub fn dir(&self) -> &Path {
        &self.config.dir
    }

    pub fn stats(&self) -> &SpoolStats {
        &self.stats
    }

    pub fn pending(&self) -> u64 {
        self.stats.pending.load(Ordering::Relaxed)
    }

    /// Whether the last append was refused for lack of room (and nothing
    /// was acknowledged since).
    pub fn is_full(&self) -> bool {
        self.stats.full.load(Ordering::Relaxed)
    }

    /// Appends records durably; returns their sequence numbers (first, last)
    /// once they are fsync'd.
    pub async fn append(&self, records: Vec<Vec<u8>>) -> Result<(u64, u64), SpoolError> {
        let (reply, answer) = oneshot::channel();
        let commits = self.writer.commits.as_ref().ok_or(SpoolError::Stopped)?;
        // A full queue means the disk is far behind: refuse rather than wait.
        commits
            .try_send(Commit { records, reply })
            .map_err(|e| match e {
                mpsc::TrySendError::Full(_) => SpoolError::Busy,
                mpsc::TrySendError::Disconnected(_) => SpoolError::Stopped,
            })?;
        match tokio::time::timeout(APPEND_TIMEOUT, answer).await {
            Ok(answer) => answer.map_err(|_| SpoolError::Stopped)?,
            Err(_) => Err(SpoolError::Busy),
        }
    }

    /// Up to `max` unacknowledged records and about `max_bytes` of them,
    /// oldest first, with their sequence numbers. Reads the files; holds no
    /// lock while doing so.
    pub fn read_pending(
        &self,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, SpoolError> {
        let (segments, acked) = {
            let state = lock(&self.state);
            (state.segments.clone(), state.acked)
        };
        let mut out = Vec::new();
        let mut bytes = 0;
        for segment in segments.iter().filter(|s| s.last_seq > acked) {
            for (seq, data) in scan_segment_records(&segment.path, segment.last_seq)? {
                if seq > acked {
                    bytes += data.len();
                    out.push((seq, data));
                    if out.len() >= max || bytes >= max_bytes {
                        return Ok(out);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Marks every record up to `through` as delivered (`count` of them were
    /// pending) and deletes segments holding nothing else.
    pub fn ack(&self, through: u64, count: u64) -> Result<(), SpoolError> {
        write_cursor(&self.config.dir, through)?;
        let removable = {
            let mut state = lock(&self.state);
            state.acked = state.acked.max(through);
            take_acked_segments(&mut state)
        };
        self.stats.pending.fetch_sub(
            count.min(self.stats.pending.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        delete_segments(&self.stats, removable);
        self.stats.full.store(false, Ordering::Relaxed);
        Ok(())
    }
}

struct Committer {
    config: Arc<SpoolConfig>,
    state: Arc<Mutex<State>>,
    stats: Arc<SpoolStats>,
    file: File,
    next_seq: u64,
}

impl Committer {
    fn run(mut self, queue: mpsc::Receiver<Commit>) {
        while let Ok(first) = queue.recv() {
            let mut batch = vec![first];
            while let Ok(more) = queue.try_recv() {
                batch.push(more);
            }
            self.commit(batch);
        }
    }

    fn commit(&mut self, batch: Vec<Commit>) {
        // A fully acknowledged active segment is replaced first and deleted,
        // so acknowledged bytes never keep the spool full.
        self.retire_acked_active();
        let mut accepted = Vec::with_capacity(batch.len());
        let mut buffer = Vec::new();
        let mut bytes = self.stats.bytes.load(Ordering::Relaxed);
        for commit in batch {
            let size: u64 = commit
                .records
                .iter()
                .map(|r| (HEADER + SEQ + r.len()) as u64)
                .sum();
            if bytes + size > self.config.max_bytes {
                self.stats.full.store(true, Ordering::Relaxed);
                let _ = commit.reply.send(Err(SpoolError::Full {
                    max_bytes: self.config.max_bytes,
                }));
                continue;
            }
            bytes += size;
            let first = self.next_seq;
            for record in &commit.records {
                frame(&mut buffer, self.next_seq, record);
                self.next_seq += 1;
            }
            accepted.push((commit, first, self.next_seq - 1));
        }
        if accepted.is_empty() {
            return;
        }
        let written = self.next_seq - accepted[0].1;
        let result = self.write_durably(&buffer, self.next_seq - 1, written);
        for (commit, first, last) in accepted {
            let answer = match &result {
                Ok(()) => Ok((first, last)),
                Err(e) => Err(SpoolError::Io(io::Error::new(e.kind(), e.to_string()))),
            };
            let _ = commit.reply.send(answer);
        }
        if result.is_ok() && self.active_is_large() {
            self.rotate();
        }
    }

    /// Writes and fsyncs a batch, then publishes it to readers: the new
    /// last sequence number and the pending count change together, under
    /// the lock, so a reader never acknowledges records not yet counted.
    fn write_durably(&mut self, buffer: &[u8], last_seq: u64, records: u64) -> io::Result<()> {
        self.file.write_all(buffer)?;
        self.file.sync_data()?;
        self.stats.syncs.fetch_add(1, Ordering::Relaxed);
        let mut state = lock(&self.state);
        if let Some(active) = state.segments.back_mut() {
            active.last_seq = last_seq;
            active.bytes += buffer.len() as u64;
        }
        self.stats
            .bytes
            .fetch_add(buffer.len() as u64, Ordering::Relaxed);
        self.stats.pending.fetch_add(records, Ordering::Relaxed);
        self.stats.appended.fetch_add(records, Ordering::Relaxed);
        Ok(())
    }

    fn active_is_large(&self) -> bool {
        let state = lock(&self.state);
        state
            .segments
            .back()
            .is_some_and(|a| a.bytes >= self.config.segment_bytes)
    }

    fn retire_acked_active(&mut self) {
        let acked_active = {
            let state = lock(&self.state);
            state
                .segments
                .back()
                .is_some_and(|a| a.bytes > 0 && a.last_seq <= state.acked)
        };
        if acked_active {
            self.rotate();
            let retired = take_acked_segments(&mut lock(&self.state));
            delete_segments(&self.stats, retired);
        }
    }

    /// Starts a new segment. On failure the current one stays in use: the
    /// data written is safe, and rotation is tried again later.
    fn rotate(&mut self) {
        match new_segment(&self.config.dir, self.next_seq) {
            Ok((file, path)) => {
                self.file = file;
                lock(&self.state).segments.push_back(Segment {
                    path,
                    last_seq: 0,
                    bytes: 0,
                });
            }
            Err(error) => {
                tracing::warn!(%error, "could not start a new spool segment; keeping the current one")
            }
        }
    }
}

/// Removes from the list the oldest segments whose records are all
/// acknowledged. The last segment is the one being written; it stays.
fn take_acked_segments(state: &mut State) -> Vec<Segment> {
    let mut taken = Vec::new();
    while state.segments.len() > 1
        && state
            .segments
            .front()
            .is_some_and(|s| s.last_seq <= state.acked)
    {
        taken.extend(state.segments.pop_front());
    }
    taken
}

/// Deletes acknowledged segments. A file that cannot be deleted is logged
/// and left (it holds nothing to replay); the acknowledgement itself has
/// already been made durable, so it is not reported as failed.
fn delete_segments(stats: &SpoolStats, segments: Vec<Segment>) {
    for segment in segments {
        match fs::remove_file(&segment.path) {
            Ok(()) => {
                stats.bytes.fetch_sub(segment.bytes, Ordering::Relaxed);
            }
            Err(error) => {
                tracing::warn!(%error, segment = %segment.path.display(), "could not delete spool segment");
            }
        }
    }
}

fn frame(out: &mut Vec<u8>, seq: u64, data: &[u8]) {
    let len = (SEQ + data.len()) as u32;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&len.to_le_bytes());
    hasher.update(&seq.to_le_bytes());
    hasher.update(data);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&hasher.finalize().to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(data);
}

/// The frame at the start of `bytes`, if it is complete and its CRC holds:
/// (seq, data, frame length).
fn parse_frame(bytes: &[u8]) -> Option<(u64, &[u8], usize)> {
    let len = u32::from_le_bytes(bytes.get(0..4)?.try_into().ok()?) as usize;
    if !(SEQ..=MAX_FRAME).contains(&len) {
        return None;
    }
    let crc = u32::from_le_bytes(bytes.get(4..8)?.try_into().ok()?);
    let payload = bytes.get(HEADER..HEADER + len)?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&bytes[0..4]);
    hasher.update(payload);
    if hasher.finalize() != crc {
        return None;
    }
    let seq = u64::from_le_bytes(payload[..SEQ].try_into().ok()?);
    Some((seq, &payload[SEQ..], HEADER + len))
}

struct Scan {
    seqs: Vec<u64>,
    corrupt_regions: u64,
    torn_bytes: u64,
}

/// Every valid record of a segment. Damage in the middle is skipped by
/// scanning forward to the next valid frame; an incomplete or invalid tail
/// with no valid frame after it is a torn write.
fn scan_bytes(bytes: &[u8]) -> (Vec<(u64, &[u8])>, u64, u64) {
    let mut records = Vec::new();
    let (mut corrupt, mut torn) = (0u64, 0u64);
    let mut at = 0;
    while at < bytes.len() {
        if let Some((seq, data, len)) = parse_frame(&bytes[at..]) {
            records.push((seq, data));
            at += len;
            continue;
        }
        // Find the next valid frame, if any.
        match (at + 1..bytes.len()).find(|&i| parse_frame(&bytes[i..]).is_some()) {
            Some(next) => {
                corrupt += 1;
                at = next;
            }
            None => {
                torn = (bytes.len() - at) as u64;
                break;
            }
        }
    }
    (records, corrupt, torn)
}

fn scan_segment(path: &Path) -> io::Result<Scan> {
    let bytes = fs::read(path)?;
    let (records, corrupt_regions, torn_bytes) = scan_bytes(&bytes);
    Ok(Scan {
        seqs: records.iter().map(|(seq, _)| *seq).collect(),
        corrupt_regions,
        torn_bytes,
    })
}

fn scan_segment_records(path: &Path, through: u64) -> io::Result<Vec<(u64, Vec<u8>)>> {
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    let (records, _, _) = scan_bytes(&bytes);
    Ok(records
        .into_iter()
        .filter(|(seq, _)| *seq <= through)
        .map(|(seq, data)| (seq, data.to_vec()))
        .collect())
}

fn segment_paths(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut paths: Vec<(u64, PathBuf)> = fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let seq = name
                .strip_prefix("segment-")?
                .strip_suffix(".log")?
                .parse()
                .ok()?;
            Some((seq, entry.path()))
        })
        .collect();
    paths.sort();
    Ok(paths.into_iter().map(|(_, p)| p).collect())
}

fn new_segment(dir: &Path, first_seq: u64) -> io::Result<(File, PathBuf)> {
    let path = dir.join(format!("segment-{first_seq:020}.log"));
    let file = OpenOptions::new().create(true).append(true).open(&path)?;
    // The new name must survive a crash too.
    File::open(dir)?.sync_all()?;
    Ok((file, path))
}

fn read_cursor(dir: &Path) -> io::Result<u64> {
    match fs::read_to_string(dir.join("acked")) {
        Ok(text) => Ok(text.trim().parse().unwrap_or(0)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

fn write_cursor(dir: &Path, through: u64) -> io::Result<()> {
    let tmp = dir.join("acked.tmp");
    let mut file = File::create(&tmp)?;
    file.write_all(through.to_string().as_bytes())?;
    file.sync_all()?;
    fs::rename(&tmp, dir.join("acked"))?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> SpoolConfig {
        SpoolConfig {
            dir: dir.to_owned(),
            max_bytes: 10 * 1024 * 1024,
            segment_bytes: 64 * 1024,
        }
    }

    fn record(i: usize) -> Vec<u8> {
        // Fixed width, so tests can find frame boundaries by arithmetic.
        format!("{{\"event\":{i:06},\"pad\":\"{}\"}}", "x".repeat(500)).into_bytes()
    }

    async fn fill(spool: &Spool, n: usize) {
        for i in 0..n {
            spool.append(vec![record(i)]).await.unwrap();
        }
    }

    /// Records as text, so a failing assertion prints something readable.
    fn data(records: &[(u64, Vec<u8>)]) -> Vec<String> {
        records
            .iter()
            .map(|(_, d)| String::from_utf8_lossy(&d[..12.min(d.len())]).into_owned())
            .collect()
    }

    fn texts(records: impl Iterator<Item = Vec<u8>>) -> Vec<String> {
        records
            .map(|d| String::from_utf8_lossy(&d[..12.min(d.len())]).into_owned())
            .collect()
    }

    #[tokio::test]
    async fn appended_records_come_back_in_order_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(config(dir.path())).unwrap();
        fill(&spool, 300).await;
        assert_eq!(spool.pending(), 300);
        let expected = texts((0..300).map(record));
        assert_eq!(
            data(&spool.read_pending(1000, usize::MAX).unwrap()),
            expected
        );
        drop(spool);
        let reopened = Spool::open(config(dir.path())).unwrap();
        assert_eq!(reopened.pending(), 300);
        assert_eq!(
            data(&reopened.read_pending(1000, usize::MAX).unwrap()),
            expected
        );
        assert_eq!(reopened.stats().corrupt_regions.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn concurrent_appends_share_commits() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(config(dir.path())).unwrap();
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let spool = spool.clone();
                tokio::spawn(async move { spool.append(vec![record(i), record(i + 1000)]).await })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert_eq!(spool.pending(), 128);
        // Group commit: fewer fsyncs than appends.
        let syncs = spool.stats().syncs.load(Ordering::Relaxed);
        assert!(syncs < 64, "{syncs} fsyncs for 64 concurrent appends");
        let seqs: Vec<u64> = spool
            .read_pending(1000, usize::MAX)
            .unwrap()
            .iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(seqs, (1..=128).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn acknowledged_records_are_gone_and_segments_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(config(dir.path())).unwrap();
        fill(&spool, 500).await;
        let segments_before = segment_paths(dir.path()).unwrap().len();
        assert!(segments_before > 2, "{segments_before} segments");
        let first = spool.read_pending(400, usize::MAX).unwrap();
        spool
            .ack(first.last().unwrap().0, first.len() as u64)
            .unwrap();
        assert_eq!(spool.pending(), 100);
        assert!(segment_paths(dir.path()).unwrap().len() < segments_before);
        let rest = spool.read_pending(1000, usize::MAX).unwrap();
        assert_eq!(data(&rest), texts((400..500).map(record)));
        // The cursor survives a restart.
        drop(spool);
        let reopened = Spool::open(config(dir.path())).unwrap();
        assert_eq!(
            data(&reopened.read_pending(1000, usize::MAX).unwrap()),
            data(&rest)
        );
    }

    #[tokio::test]
    async fn a_full_spool_refuses_appends() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(SpoolConfig {
            max_bytes: 8 * 1024,
            ..config(dir.path())
        })
        .unwrap();
        let mut accepted = 0;
        for i in 0..100 {
            match spool.append(vec![record(i)]).await {
                Ok(_) => accepted += 1,
                Err(SpoolError::Full { .. }) => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert!((10..20).contains(&accepted), "{accepted} accepted");
        assert!(spool.stats().full.load(Ordering::Relaxed));
        // Once everything is acknowledged, there is room again, even though
        // the limit is smaller than a segment.
        let all = spool.read_pending(1000, usize::MAX).unwrap();
        spool.ack(all.last().unwrap().0, all.len() as u64).unwrap();
        assert_eq!(spool.pending(), 0);
        for i in 0..accepted {
            spool.append(vec![record(i as usize)]).await.unwrap();
        }
        assert_eq!(spool.pending(), accepted);
        // What was accepted is all there.
        assert_eq!(
            spool.read_pending(1000, usize::MAX).unwrap().len() as u64,
            accepted
        );
    }

    #[tokio::test]
    async fn a_directory_is_open_once_until_its_spool_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(config(dir.path())).unwrap();
        fill(&spool, 3).await;
        let clone = spool.clone();
        match Spool::open(config(dir.path())) {
            Err(SpoolError::Locked {
                dir: locked,
                holder,
            }) => {
                assert_eq!(locked, dir.path());
                assert_eq!(holder, Some(std::process::id()));
            }
            other => panic!("a second open must be refused: {other:?}"),
        }
        let message = Spool::open(config(dir.path())).unwrap_err().to_string();
        assert!(
            message.contains(&dir.path().display().to_string()),
            "{message}"
        );
        // Every clone holds the lock; the last one releases it.
        drop(spool);
        assert!(matches!(
            Spool::open(config(dir.path())),
            Err(SpoolError::Locked { .. })
        ));
        drop(clone);
        let reopened = Spool::open(config(dir.path())).unwrap();
        assert_eq!(reopened.pending(), 3);
    }

    #[tokio::test]
    async fn torn_tail_and_flipped_byte_keep_every_valid_record() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(SpoolConfig {
            segment_bytes: u64::MAX,
            ..config(dir.path())
        })
        .unwrap();
        fill(&spool, 100).await;
        drop(spool);
        let path = segment_paths(dir.path()).unwrap().remove(0);
        let mut bytes = fs::read(&path).unwrap();
        let frame_len = bytes.len() / 100;
        // Flip a byte of record 50's checksum, and tear the last record.
        bytes[50 * frame_len + 5] ^= 0xff;
        bytes.truncate(bytes.len() - frame_len / 2);
        fs::write(&path, &bytes).unwrap();

        let reopened = Spool::open(config(dir.path())).unwrap();
        let stats = reopened.stats();
        assert_eq!(stats.corrupt_regions.load(Ordering::Relaxed), 1);
        assert!(stats.torn_bytes.load(Ordering::Relaxed) > 0);
        let kept = data(&reopened.read_pending(1000, usize::MAX).unwrap());
        let expected = texts((0..99).filter(|i| *i != 50).map(record));
        assert_eq!(kept, expected);
        // New appends go to a fresh segment, after the damage.
        reopened.append(vec![record(1000)]).await.unwrap();
        let last = reopened.read_pending(1000, usize::MAX).unwrap();
        assert_eq!(
            data(&last[last.len() - 1..]),
            texts([record(1000)].into_iter())
        );
    }
}
