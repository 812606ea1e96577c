//! The durable spool: an append-only log of segment files with group commit.
//!
//! Every accepted message is one `Message` record (envelope, recipient
//! states, body); each later change of a recipient is an `Update` record, and
//! a finished message gets a `Done` record. One writer thread owns the head
//! segment: it takes all records queued since its last write, writes them
//! with one `write`, and — when any of them waits for durability — calls
//! `fdatasync` once for the whole batch before acknowledging them. Many
//! sessions therefore share one fsync (group commit), which is what lets a
//! durable queue pass the ~1,000 fsyncs/s a disk allows.
//!
//! A restart always starts a new head segment. Old segments are deleted
//! oldest first once no live message has its body in them; deleting only in
//! order keeps every update record of a live message, since updates always
//! follow the body. The head segment is kept zero-filled ahead of its last
//! record; an all-zero record header marks the end of the records. The
//! bytes on disk are described in `format.rs`: each segment has a random
//! key, and each record a CRC-32 of its payload and a tag, keyed by the
//! segment's key, over its header and offset.
//!
//! Replay (`replay.rs`) skips a record that fails its checks and resumes
//! at the next valid one: after it when its header is intact, otherwise at
//! the next offset whose tag verifies — never inside a message body, whose
//! bytes nobody without the key can make into a record that verifies.
//! Segments of the previous format (no key) resume only where the damaged
//! record's length leads to a valid record. Skipped bytes with no valid
//! record after them are a torn tail (a write interrupted by a crash,
//! never acknowledged) and are ignored. Anything else is damage: logged
//! with the queue ids concerned, reported as [`SpoolDamage`], and its
//! segment is never deleted: once no message needs it, it is moved to
//! `corrupt/` in the spool directory, as is any file named like a segment
//! that cannot be used. Segment numbers count up from 1; one too high to
//! count on from is renumbered, in order, at start-up (`files.rs`).
//!
//! A disk too full for a new head segment does not stop the spool: the
//! messages already on disk are replayed and delivered, appends that wait
//! for durability (new messages) fail at once with
//! [`io::ErrorKind::StorageFull`], records nobody waits for (recipient
//! states) are kept in memory, bounded, and the writer tries again every
//! second and as soon as segments are deleted.

mod files;
// Public, and hidden from the docs, only for the fuzz target
// `spool_replay` (`fuzz/src/spool.rs`), which re-frames and re-seals
// records of a mutated segment with the writer's own code.
#[doc(hidden)]
pub mod format;
mod replay;
// Shared with the integration tests, which mount one for the binary.
#[cfg(test)]
#[path = "../../tests/common/tmpfs.rs"]
pub(crate) mod tmpfs;

use std::collections::{BTreeSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::envelope::{Envelope, QueueId, Recipient};
use files::segment_path;
use format::{KIND_DONE, KIND_MESSAGE, KIND_UPDATE, Layout, SEGMENT_HEADER, SegmentKey};

/// A head segment past this size is closed and a new one started.
pub const SEGMENT_TARGET_SIZE: u64 = 64 << 20;
/// Records that nobody waits for are still made durable this often.
const BACKGROUND_SYNC: Duration = Duration::from_millis(500);
/// How far ahead of the last record the head segment is pre-filled with zeros.
const ZERO_AHEAD: u64 = 4 << 20;
/// How often the writer tries again to make a head segment while it has none.
const HEAD_RETRY: Duration = Duration::from_secs(1);
/// Records nobody waits for, kept in memory while there is no head segment
/// (some 50,000 recipient updates). Past it they are dropped: at worst a
/// recipient is delivered again after a restart.
const MAX_BACKLOG_BYTES: usize = 16 << 20;

/// Where a message body lives on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyLoc {
    pub segment: u64,
    pub offset: u64,
    pub len: u64,
}

/// The metadata part of a `Message` record.
#[derive(Serialize, Deserialize)]
struct StoredMessage {
    id: QueueId,
    envelope: Envelope,
    recipients: Vec<Recipient>,
}

#[derive(Serialize, Deserialize)]
struct StoredUpdate {
    id: QueueId,
    index: usize,
    recipient: Recipient,
}

/// A message as found on disk at start-up.
pub struct Recovered {
    pub id: QueueId,
    pub envelope: Envelope,
    pub recipients: Vec<Recipient>,
    pub body: BodyLoc,
}

/// What replay found damaged at start-up, and the files kept for
/// inspection. Empty on a healthy spool.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpoolDamage {
    /// Segments with a damaged header or damaged records.
    pub damaged_segments: u64,
    /// Records (or unreadable stretches) that replay skipped.
    pub skipped_records: u64,
    /// Accepted messages that will not be delivered: their record is
    /// damaged, or state records name them and their message record is
    /// missing. The log has their senders and recipients.
    pub lost_queue_ids: Vec<QueueId>,
    /// Messages still queued whose recipient-state record was damaged: a
    /// recipient may be delivered again.
    pub redelivery_queue_ids: Vec<QueueId>,
    /// Where damaged segments and unusable files are kept.
    pub corrupt_dir: PathBuf,
    /// Files now in `corrupt_dir`, from this start or earlier ones.
    pub quarantined: Vec<PathBuf>,
}

impl SpoolDamage {
    /// Nothing to report.
    pub fn is_empty(&self) -> bool {
        self.damaged_segments == 0
            && self.skipped_records == 0
            && self.lost_queue_ids.is_empty()
            && self.quarantined.is_empty()
    }
}

/// An encoded record ready for the writer.
pub struct Record {
    /// The header and the payload, but for a message's body.
    bytes: Vec<u8>,
    /// A message's body, shared with the queue's in-memory copy: the record
    /// does not copy it (it is written from where it is).
    body: Bytes,
    /// Offset of the body inside the record, for `Message` records.
    body_offset: u64,
}

impl Record {
    pub fn message(
        id: QueueId,
        envelope: &Envelope,
        recipients: &[Recipient],
        body: Bytes,
    ) -> Record {
        #[derive(Serialize)]
        struct Ref<'a> {
            id: QueueId,
            envelope: &'a Envelope,
            recipients: &'a [Recipient],
        }
        let meta = serde_json::to_vec(&Ref {
            id,
            envelope,
            recipients,
        })
        .expect("envelope serializes");
        let header = Layout::V2.record_header() as usize;
        let mut bytes = Vec::with_capacity(header + 4 + meta.len());
        bytes.resize(header, 0);
        bytes.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&meta);
        let body_offset = bytes.len() as u64;
        format::frame_parts(KIND_MESSAGE, &mut bytes, &body);
        Record {
            bytes,
            body,
            body_offset,
        }
    }

    /// Bytes on disk.
    fn len(&self) -> usize {
        self.bytes.len() + self.body.len()
    }

    /// The whole record in one buffer (tests write segments by hand).
    #[cfg(test)]
    fn contiguous(&self) -> Vec<u8> {
        [&self.bytes[..], &self.body[..]].concat()
    }

    pub fn update(id: QueueId, index: usize, recipient: &Recipient) -> Record {
        let payload = serde_json::to_vec(&StoredUpdate {
            id,
            index,
            recipient: recipient.clone(),
        })
        .expect("recipient serializes");
        Record {
            bytes: format::frame(KIND_UPDATE, &payload),
            body: Bytes::new(),
            body_offset: 0,
        }
    }

    pub fn done(id: QueueId) -> Record {
        Record {
            bytes: format::frame(KIND_DONE, &id.0.to_le_bytes()),
            body: Bytes::new(),
            body_offset: 0,
        }
    }
}

type Ack = oneshot::Sender<io::Result<BodyLoc>>;

enum Request {
    Append {
        record: Record,
        /// Present when the caller waits until the record is durable.
        ack: Option<Ack>,
    },
    /// Delete every segment older than this one, except the head, once
    /// everything queued before is durable.
    DeleteBelow(u64),
    Close(oneshot::Sender<()>),
}

/// What the writer thread and the handles share.
struct Shared {
    syncs: AtomicU64,
    /// No head segment: appends that wait are refused.
    full: AtomicBool,
    damage: Mutex<SpoolDamage>,
}

/// Handle to the writer thread. Cheap to clone.
#[derive(Clone)]
pub struct Spool {
    dir: PathBuf,
    tx: mpsc::Sender<Request>,
    shared: Arc<Shared>,
}

impl Spool {
    /// Opens the spool directory, replays every segment and starts the
    /// writer on a fresh head segment. Returns the live messages found, in
    /// arrival order, and the head segment's number. A disk too full for a
    /// head segment is no error: see the module documentation.
    pub fn open(dir: &Path) -> io::Result<(Spool, Vec<Recovered>, u64)> {
        Spool::open_with(dir, SEGMENT_TARGET_SIZE)
    }

    /// [`Spool::open`] with another segment size (tests use tiny ones).
    pub fn open_with(dir: &Path, segment_size: u64) -> io::Result<(Spool, Vec<Recovered>, u64)> {
        fs::create_dir_all(dir)?;
        let listing = files::list(dir)?;
        for (path, why) in &listing.unusable {
            if let Err(e) = files::quarantine(dir, path, why) {
                // Left in place; the listing skips it again next time.
                tracing::error!(file = %path.display(), error = %e, "cannot move an unusable spool file to corrupt/");
            }
        }
        let mut segments = listing.segments;
        files::renumber_if_needed(dir, &mut segments)?;
        let mut replay = replay::Replay::default();
        for &seq in &segments {
            let path = segment_path(dir, seq);
            if let Err(e) = replay.segment(&path, seq) {
                replay.unreadable(&path, seq, &e);
            }
        }
        let found = replay.finish();
        // Every number on disk is at most RENUMBER_ABOVE by now.
        let head = segments.last().map_or(1, |s| s + 1);
        let damage = SpoolDamage {
            damaged_segments: found.damaged_segments.len() as u64,
            skipped_records: found.skipped_records,
            lost_queue_ids: found.lost,
            redelivery_queue_ids: found.redelivery,
            corrupt_dir: dir.join(files::CORRUPT_DIR),
            quarantined: Vec::new(),
        };
        if !found.damaged_segments.is_empty() {
            tracing::error!(
                damaged_segments = damage.damaged_segments,
                skipped_records = damage.skipped_records,
                lost = ?damage.lost_queue_ids.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
                may_be_delivered_again = ?damage.redelivery_queue_ids.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
                "the spool was damaged: the records that failed their checks were skipped, everything else is queued; damaged segments are kept and moved to {} once no message needs them",
                damage.corrupt_dir.display(),
            );
            // Now, while there may be room: a full disk may refuse it later.
            if let Err(e) = files::make_corrupt_dir(dir) {
                tracing::warn!(error = %e, "cannot create the spool's corrupt/ directory");
            }
        }
        let shared = Arc::new(Shared {
            syncs: AtomicU64::new(0),
            full: AtomicBool::new(false),
            damage: Mutex::new(SpoolDamage {
                quarantined: files::quarantined(dir),
                ..damage
            }),
        });
        let writer = Writer::start(
            dir.to_path_buf(),
            head,
            segment_size,
            segments.into_iter().collect(),
            found.damaged_segments,
            shared.clone(),
        )?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("herald-spool".into())
            .spawn(move || writer.run(rx))?;
        Ok((
            Spool {
                dir: dir.to_path_buf(),
                tx,
                shared,
            },
            found.recovered,
            head,
        ))
    }

    /// Appends a record and waits until it is on stable storage.
    pub async fn append_durable(&self, record: Record) -> io::Result<BodyLoc> {
        self.append_acked(record).await
    }

    /// Queues a record now (its place in the log is fixed by this call) and
    /// returns a future that resolves once it is on stable storage. Without
    /// room for a head segment it fails at once with
    /// [`io::ErrorKind::StorageFull`].
    pub fn append_acked(
        &self,
        record: Record,
    ) -> impl std::future::Future<Output = io::Result<BodyLoc>> + use<> {
        let (ack, rx) = oneshot::channel();
        let sent = self.tx.send(Request::Append {
            record,
            ack: Some(ack),
        });
        async move {
            sent.map_err(|_| closed())?;
            rx.await.map_err(|_| closed())?
        }
    }

    /// Appends a record without waiting; it becomes durable with the next
    /// batch or within [`BACKGROUND_SYNC`] (or, without room for a head
    /// segment, once there is room). Losing it in a crash means a recipient
    /// is tried again (at-least-once), never that mail is lost.
    pub fn append(&self, record: Record) {
        let _ = self.tx.send(Request::Append { record, ack: None });
    }

    /// Deletes every segment numbered below `seq` (never the head) once
    /// everything queued before this call is durable. A segment replay
    /// found damaged is moved to `corrupt/` instead.
    pub fn delete_below(&self, seq: u64) {
        let _ = self.tx.send(Request::DeleteBelow(seq));
    }

    /// How many times the writer has called `fdatasync` (for benchmarks:
    /// records per sync is the group-commit factor).
    pub fn syncs(&self) -> u64 {
        self.shared.syncs.load(Ordering::Relaxed)
    }

    /// True while the writer has no head segment (disk full): new messages
    /// are refused, recipient states wait in memory.
    pub fn is_full(&self) -> bool {
        self.shared.full.load(Ordering::Relaxed)
    }

    /// What replay found damaged at start-up, and what is in `corrupt/`.
    pub fn damage(&self) -> SpoolDamage {
        self.shared
            .damage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reads a message body back from its segment.
    pub fn read_body(&self, loc: BodyLoc) -> io::Result<Vec<u8>> {
        let file = File::open(segment_path(&self.dir, loc.segment))?;
        let mut buf = vec![0u8; loc.len as usize];
        file.read_exact_at(&mut buf, loc.offset)?;
        Ok(buf)
    }

    /// Syncs what is pending and stops the writer.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Request::Close(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

fn closed() -> io::Error {
    io::Error::other("spool writer has stopped")
}

/// The segment records are appended to.
struct Head {
    seq: u64,
    file: File,
    key: SegmentKey,
    /// Bytes of records written (the segment's logical end).
    len: u64,
    /// The file is zero-filled up to here.
    zeroed: u64,
    dirty: bool,
    /// A sync or write failed: what is on disk after `len` is unknown (Linux
    /// reports a failed writeback only once), so nothing more may be
    /// acknowledged from this segment. The next batch starts a new one.
    poisoned: bool,
    last_sync: Instant,
}

impl Head {
    fn create(dir: &Path, seq: u64) -> io::Result<Head> {
        let path = segment_path(dir, seq);
        let file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)?;
        Head::init(dir, seq, file).inspect_err(|_| {
            // A half-made segment (disk full while zero-filling) would make
            // every later attempt fail with "exists", and hold the space.
            let _ = fs::remove_file(&path);
        })
    }

    fn init(dir: &Path, seq: u64, file: File) -> io::Result<Head> {
        let key = SegmentKey::random();
        file.write_all_at(&key.segment_header(), 0)?;
        let mut h = Head {
            seq,
            file,
            key,
            len: SEGMENT_HEADER,
            zeroed: SEGMENT_HEADER,
            dirty: false,
            poisoned: false,
            last_sync: Instant::now(),
        };
        // Zeros ahead from the start: a disk without room for them refuses
        // the segment now, not its first write.
        h.zero_to(SEGMENT_HEADER + ZERO_AHEAD)?;
        h.file.sync_all()?;
        // The new name must survive a crash too.
        files::sync_dir(dir)?;
        Ok(h)
    }

    /// Keeps [`ZERO_AHEAD`] bytes of zeros written past `end`. Records then
    /// overwrite blocks that already exist, so `fdatasync` need not commit
    /// a journal transaction for a new file size each time (measured here:
    /// ~50% more syncs per second), and a full disk shows up here, before
    /// any record is written, instead of as a torn record.
    fn ensure_zeroed(&mut self, end: u64) -> io::Result<()> {
        if end <= self.zeroed {
            return Ok(());
        }
        self.zero_to(end + ZERO_AHEAD)
    }

    fn zero_to(&mut self, target: u64) -> io::Result<()> {
        // One static block written as often as needed: a fresh zeroed
        // buffer of megabytes per extension would cost the allocator a map
        // and an unmap each time.
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        let mut left = target.saturating_sub(self.zeroed) as usize;
        let mut parts: Vec<&[u8]> = Vec::with_capacity(left / ZEROS.len() + 1);
        while left > 0 {
            let n = left.min(ZEROS.len());
            parts.push(&ZEROS[..n]);
            left -= n;
        }
        write_all_vectored_at(&self.file, &parts, self.zeroed)?;
        self.file.sync_data()?;
        self.zeroed = target;
        Ok(())
    }

    /// Appends `parts`, one after another, in one system call where the
    /// kernel takes them all (a batch's large bodies are written from
    /// where they are, not copied together first).
    fn write(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if total == 0 {
            return Ok(());
        }
        if let Err(e) = self.ensure_zeroed(self.len + total as u64) {
            tracing::error!(error = %e, segment = self.seq, "cannot extend the spool (disk full?)");
            return Err(e);
        }
        match write_all_vectored_at(&self.file, parts, self.len) {
            Ok(()) => {
                self.len += total as u64;
                self.dirty = true;
                Ok(())
            }
            Err(e) => {
                // A partial write must not leave garbage that would read as
                // a damaged record: zero it again (the blocks exist already).
                tracing::error!(error = %e, segment = self.seq, "spool write failed");
                let _ = self.file.write_all_at(&vec![0u8; total], self.len);
                Err(e)
            }
        }
    }

    fn sync(&mut self, syncs: &AtomicU64) -> io::Result<()> {
        if self.dirty {
            if let Err(e) = self.file.sync_data() {
                self.poisoned = true;
                return Err(e);
            }
            syncs.fetch_add(1, Ordering::Relaxed);
            self.last_sync = Instant::now();
            self.dirty = false;
        }
        Ok(())
    }
}

/// Records placed after the head's last record and not yet written, in
/// order: small ones gathered in `buf`, large ones kept as they are (a
/// message body is not copied a second time).
#[derive(Default)]
struct Pending {
    /// Written before `buf`: what was gathered before each large record,
    /// and the record.
    large: Vec<(Vec<u8>, Record)>,
    buf: Vec<u8>,
    /// Bytes in `large` and `buf`.
    len: u64,
    acks: Vec<(Ack, BodyLoc)>,
    /// Records nobody waits for, kept to be written again if this write
    /// fails.
    unacked: Vec<Record>,
}

/// Owns the head segment; runs on its own thread.
struct Writer {
    dir: PathBuf,
    /// A segment past this size is closed and the next one started.
    segment_size: u64,
    shared: Arc<Shared>,
    /// `None` while no head segment could be made (disk full).
    head: Option<Head>,
    /// The number the next head segment gets.
    next_seq: u64,
    /// Every segment on disk, the head included.
    segments: BTreeSet<u64>,
    /// Segments replay found damaged: moved to `corrupt/`, never deleted.
    damaged: BTreeSet<u64>,
    /// Records nobody waits for, kept while there is no head segment, in
    /// order; they are written before anything newer.
    backlog: VecDeque<Record>,
    backlog_bytes: usize,
    /// Backlog records given up (over [`MAX_BACKLOG_BYTES`]).
    dropped: u64,
    /// Why there is no head segment: the kind appends are refused with,
    /// and the error's text.
    missing: Option<(io::ErrorKind, String)>,
    retry_at: Instant,
    /// A deletion asked for and not yet carried out.
    delete_below: Option<u64>,
}

impl Writer {
    /// The writer on a new head segment `seq`; without one when the disk
    /// has no room for it.
    fn start(
        dir: PathBuf,
        seq: u64,
        segment_size: u64,
        segments: BTreeSet<u64>,
        damaged: BTreeSet<u64>,
        shared: Arc<Shared>,
    ) -> io::Result<Writer> {
        let mut w = Writer {
            dir,
            segment_size,
            shared,
            head: None,
            next_seq: seq,
            segments,
            damaged,
            backlog: VecDeque::new(),
            backlog_bytes: 0,
            dropped: 0,
            missing: None,
            retry_at: Instant::now(),
            delete_below: None,
        };
        match Head::create(&w.dir, seq) {
            Ok(h) => w.adopt(h),
            // Replay needed no room: the recovered messages can be
            // delivered, which frees segments and so makes room.
            Err(e) if no_room(e.kind()) => {
                tracing::error!(error = %e, spool = %w.dir.display(), "no room for a new spool segment: starting without one; queued messages are delivered, new ones refused until there is room");
                w.lost_head(e);
            }
            Err(e) => return Err(e),
        }
        Ok(w)
    }

    fn adopt(&mut self, h: Head) {
        self.segments.insert(h.seq);
        self.next_seq = h.seq.saturating_add(1);
        if self.missing.take().is_some() {
            tracing::info!(
                segment = h.seq,
                "the spool has a head segment again: new messages are accepted"
            );
            if self.dropped > 0 {
                tracing::error!(
                    records = self.dropped,
                    "recipient-state records were dropped while the spool had no room: after a restart those recipients may be delivered again"
                );
                self.dropped = 0;
            }
        }
        self.shared.full.store(false, Ordering::Relaxed);
        self.head = Some(h);
    }

    fn lost_head(&mut self, e: io::Error) {
        if self.missing.is_none() {
            tracing::error!(error = %e, segment = self.next_seq, "cannot make a new spool segment: new messages are refused until there is room; trying again every second");
        }
        let kind = if no_room(e.kind()) {
            io::ErrorKind::StorageFull
        } else {
            e.kind()
        };
        self.missing = Some((kind, e.to_string()));
        self.shared.full.store(true, Ordering::Relaxed);
        self.retry_at = Instant::now() + HEAD_RETRY;
    }

    /// Makes a head segment when there is none (at most every
    /// [`HEAD_RETRY`] unless `now`) or the head is poisoned.
    fn ensure_head(&mut self, now: bool) {
        match &self.head {
            Some(h) if !h.poisoned => return,
            // Poisoned: its next records go to a new segment at once.
            Some(_) => self.head = None,
            None if !now && Instant::now() < self.retry_at => return,
            None => {}
        }
        let seq = self.next_seq;
        match Head::create(&self.dir, seq) {
            Ok(h) => self.adopt(h),
            Err(e) => {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    // Not one of ours: leave it to deletion, use the next.
                    self.segments.insert(seq);
                    self.next_seq = seq.saturating_add(1);
                }
                self.lost_head(e);
            }
        }
    }

    /// Gets ready to place records: a usable head, with the backlog placed
    /// first (it is older than anything that comes now). False when there
    /// is no head.
    fn prepare(&mut self, p: &mut Pending) -> bool {
        self.ensure_head(false);
        let Writer {
            head: Some(h),
            backlog,
            backlog_bytes,
            ..
        } = self
        else {
            return false;
        };
        while let Some(record) = backlog.pop_front() {
            *backlog_bytes -= record.len();
            put(h, record, None, p);
        }
        true
    }

    fn place(
        &mut self,
        record: Record,
        ack: Option<Ack>,
        p: &mut Pending,
        replies: &mut Vec<Reply>,
    ) {
        if let Some(h) = &self.head {
            let end = h.len + p.len;
            if end > self.segment_size && end > SEGMENT_HEADER {
                let _ = self.commit(p, true, replies);
                // Synced (or poisoned): either way the next record goes
                // to a new segment.
                self.head = None;
                self.ensure_head(true);
            }
        }
        if !self.prepare(p) {
            match ack {
                Some(ack) => replies.push((ack, Err(self.refusal()))),
                None => self.keep(record, false),
            }
            return;
        }
        put(self.head.as_ref().expect("prepared"), record, ack, p);
    }

    /// Writes what is placed, syncs when asked (or when a record waits, or
    /// the last sync is overdue), and settles what was placed.
    fn commit(&mut self, p: &mut Pending, sync: bool, replies: &mut Vec<Reply>) -> io::Result<()> {
        let Some(h) = self.head.as_mut().filter(|h| !h.poisoned) else {
            // Nothing is placed without a usable head.
            return Ok(());
        };
        let overdue = h.dirty && h.last_sync.elapsed() >= BACKGROUND_SYNC;
        let large = std::mem::take(&mut p.large);
        let mut parts: Vec<&[u8]> = Vec::with_capacity(large.len() * 3 + 1);
        for (before, record) in &large {
            parts.extend([&before[..], &record.bytes[..], &record.body[..]]);
        }
        parts.push(&p.buf);
        let mut result = h.write(&parts);
        drop(parts);
        drop(large);
        if result.is_ok() && (sync || overdue || !p.acks.is_empty()) {
            result = h.sync(&self.shared.syncs);
        }
        p.buf.clear();
        p.len = 0;
        match &result {
            Ok(()) => {
                replies.extend(p.acks.drain(..).map(|(ack, loc)| (ack, Ok(loc))));
                p.unacked.clear();
            }
            Err(e) => {
                tracing::error!(error = %e, segment = h.seq, "spool write or sync failed; this batch is refused and a new segment is started");
                h.poisoned = true;
                replies.extend(
                    p.acks
                        .drain(..)
                        .map(|(ack, _)| (ack, Err(io::Error::new(e.kind(), e.to_string())))),
                );
                // Older than anything kept meanwhile: they go first.
                let unacked: Vec<Record> = p.unacked.drain(..).collect();
                for record in unacked.into_iter().rev() {
                    self.keep(record, true);
                }
            }
        }
        result
    }

    /// Keeps a record nobody waits for until there is a head segment.
    fn keep(&mut self, record: Record, front: bool) {
        if self.backlog_bytes + record.len() > MAX_BACKLOG_BYTES {
            if self.dropped == 0 {
                tracing::error!(
                    "too many recipient-state records wait for room in the spool: dropping them (after a restart those recipients may be delivered again)"
                );
            }
            self.dropped += 1;
            return;
        }
        self.backlog_bytes += record.len();
        if front {
            self.backlog.push_front(record);
        } else {
            self.backlog.push_back(record);
        }
    }

    fn refusal(&self) -> io::Error {
        let (kind, why) = self
            .missing
            .clone()
            .unwrap_or((io::ErrorKind::Other, "no head segment".into()));
        io::Error::new(kind, format!("the spool cannot take new records: {why}"))
    }

    fn run(mut self, rx: mpsc::Receiver<Request>) {
        let mut batch = Vec::new();
        let mut p = Pending::default();
        loop {
            let first = match rx.recv_timeout(BACKGROUND_SYNC) {
                Ok(r) => r,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.tick(&mut p);
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.stop(&mut p);
                    return;
                }
            };
            batch.push(first);
            // Take whatever else is already queued: this is the group commit.
            while batch.len() < 4096 {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            if self.process(&mut batch, &mut p) {
                return;
            }
        }
    }

    /// Idle: syncs what nobody waited for, and without a head segment tries
    /// to make one and write the backlog to it.
    fn tick(&mut self, p: &mut Pending) {
        let mut replies = Vec::new();
        self.prepare(p);
        if self.commit(p, true, &mut replies).is_ok() {
            self.delete();
        }
        debug_assert!(replies.is_empty(), "nothing waits on an idle tick");
    }

    /// Writes one batch; returns true when asked to close.
    fn process(&mut self, batch: &mut Vec<Request>, p: &mut Pending) -> bool {
        let mut replies = Vec::new();
        let mut close = None;
        self.prepare(p);
        for req in batch.drain(..) {
            match req {
                Request::Append { record, ack } => self.place(record, ack, p, &mut replies),
                Request::DeleteBelow(seq) => self.delete_below = self.delete_below.max(Some(seq)),
                Request::Close(tx) => close = Some(tx),
            }
        }
        let sync = self.delete_below.is_some() || close.is_some();
        // Deletions before the acks: whoever waits for a later record may
        // rely on every earlier request having been carried out.
        if self.commit(p, sync, &mut replies).is_ok() {
            self.delete();
        }
        if close.is_some() {
            self.stop(p);
        }
        for (ack, result) in replies {
            let _ = ack.send(result);
        }
        if let Some(tx) = close {
            let _ = tx.send(());
            return true;
        }
        false
    }

    /// Last chance for the backlog before the writer stops.
    fn stop(&mut self, p: &mut Pending) {
        let mut replies = Vec::new();
        if !self.backlog.is_empty() {
            self.ensure_head(true);
        }
        self.prepare(p);
        let _ = self.commit(p, true, &mut replies);
        let left = self.backlog.len() as u64 + self.dropped;
        if left > 0 {
            tracing::error!(
                records = left,
                "recipient-state records could not be written (no room in the spool): after a restart those recipients may be delivered again"
            );
        }
    }

    /// Carries out the deletion asked for, once what was queued before it
    /// is durable (the caller's commit succeeded) or nothing can be written
    /// (no head: deleting is then what makes room). Either way it is safe:
    /// a segment is asked to go only when no live message has its body in
    /// it or below, and records of a live message never precede its body.
    fn delete(&mut self) {
        let Some(below) = self.delete_below.take() else {
            return;
        };
        let head = self.head.as_ref().map(|h| h.seq);
        let doomed: Vec<u64> = self
            .segments
            .range(..below)
            .copied()
            .filter(|&s| Some(s) != head)
            .collect();
        if doomed.is_empty() {
            return;
        }
        let mut freed = false;
        for seq in doomed {
            let path = segment_path(&self.dir, seq);
            if self.damaged.contains(&seq) {
                // Kept as evidence: its damaged records are still there.
                match files::quarantine(&self.dir, &path, "replay found it damaged") {
                    Ok(to) => {
                        self.segments.remove(&seq);
                        self.damaged.remove(&seq);
                        let mut d = self.shared.damage.lock().unwrap_or_else(|p| p.into_inner());
                        d.quarantined.push(to);
                    }
                    Err(e) => {
                        tracing::error!(segment = seq, error = %e, "cannot move a damaged spool segment to corrupt/; it stays in the spool")
                    }
                }
                continue;
            }
            match fs::remove_file(&path) {
                Ok(()) => {
                    self.segments.remove(&seq);
                    freed = true;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.segments.remove(&seq);
                }
                Err(e) => tracing::warn!(segment = seq, error = %e, "cannot delete spool segment"),
            }
        }
        let _ = files::sync_dir(&self.dir);
        if freed && self.head.is_none() {
            self.ensure_head(true);
        }
    }
}

/// One element of a batch's answers: a waiting caller and its result.
type Reply = (Ack, io::Result<BodyLoc>);

/// Places a record after what `p` holds in head `h`: seals it for its
/// offset and notes where its body is.
fn put(h: &Head, mut record: Record, ack: Option<Ack>, p: &mut Pending) {
    let offset = h.len + p.len;
    h.key.seal(&mut record.bytes, offset);
    p.len += record.len() as u64;
    match ack {
        Some(ack) => {
            let loc = BodyLoc {
                segment: h.seq,
                offset: offset + record.body_offset,
                len: (record.len() as u64).saturating_sub(record.body_offset),
            };
            p.acks.push((ack, loc));
            if record.len() >= LARGE_RECORD {
                p.large.push((std::mem::take(&mut p.buf), record));
            } else {
                p.buf.extend_from_slice(&record.bytes);
                p.buf.extend_from_slice(&record.body);
            }
        }
        None => {
            p.buf.extend_from_slice(&record.bytes);
            p.buf.extend_from_slice(&record.body);
            p.unacked.push(record);
        }
    }
}

/// A record at least this large is written from its own buffer rather
/// than copied into the batch.
const LARGE_RECORD: usize = 64 << 10;

/// Writes `parts` one after another at `offset` with `pwritev`, again
/// where the kernel took only some of them.
fn write_all_vectored_at(file: &File, parts: &[&[u8]], mut offset: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    /// Linux's `IOV_MAX`.
    const MAX_SLICES: usize = 1024;
    let mut slices: Vec<io::IoSlice<'_>> = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| io::IoSlice::new(p))
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let count = rest.len().min(MAX_SLICES) as libc::c_int;
        let at = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::other("spool offset past the file size limit"))?;
        // SAFETY: `IoSlice` is ABI-compatible with `iovec` on Unix, and the
        // slices (and what they point to) outlive the call.
        let written = unsafe { libc::pwritev(file.as_raw_fd(), rest.as_ptr().cast(), count, at) };
        if written < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        offset += written as u64;
        io::IoSlice::advance_slices(&mut rest, written as usize);
    }
    Ok(())
}

/// Errors that mean the disk (or the quota) has no room.
fn no_room(kind: io::ErrorKind) -> bool {
    matches!(
        kind,
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

#[cfg(test)]
mod tests {
    /// A message record with its body inline, as tests build segments from
    /// one buffer.
    pub(super) fn message_record(
        id: QueueId,
        env: &Envelope,
        rcpts: &[Recipient],
        body: &[u8],
    ) -> Record {
        let r = Record::message(id, env, rcpts, Bytes::copy_from_slice(body));
        Record {
            bytes: r.contiguous(),
            body: Bytes::new(),
            body_offset: r.body_offset,
        }
    }

    use super::*;
    use crate::clock::unix_now;
    use crate::envelope::RcptStatus;
    use format::{MAGIC_V1, frame_v1};

    /// Every test here finishes within this.
    const LIMIT: Duration = Duration::from_secs(60);

    async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(LIMIT, f)
            .await
            .expect("test finished in time")
    }

    fn envelope() -> Envelope {
        Envelope {
            sender: "a@acme.example".into(),
            tenant: Some("acme".into()),
            message_id: Some("<m1@acme.example>".into()),
            received_at: unix_now(),
            client_ip: "127.0.0.1".parse().unwrap(),
            smtputf8: false,
            body_8bit: false,
            ret: None,
            env_id: None,
            require_tls: false,
            ignore_tls_policies: false,
        }
    }

    fn rcpts() -> Vec<Recipient> {
        vec![Recipient::new("x@one.test".into())]
    }

    fn body(i: usize) -> Vec<u8> {
        format!("Subject: message {i:03}\r\n\r\nbody of message number {i:03}\r\n").into_bytes()
    }

    /// Writes `n` messages through the writer into one new segment; returns
    /// their ids, where each record starts, and the segment's number.
    async fn fill(dir: &Path, n: usize) -> (Vec<QueueId>, Vec<u64>, u64) {
        let (spool, _, head) = Spool::open(dir).unwrap();
        let (mut ids, mut starts) = (Vec::new(), Vec::new());
        let mut at = SEGMENT_HEADER;
        for i in 0..n {
            let id = QueueId::generate();
            let rec = message_record(id, &envelope(), &rcpts(), &body(i));
            starts.push(at);
            at += rec.bytes.len() as u64;
            let loc = spool.append_durable(rec).await.unwrap();
            assert_eq!(loc.segment, head);
            ids.push(id);
        }
        spool.close().await;
        (ids, starts, head)
    }

    /// XORs `mask` into the byte at `at` of segment `seq`.
    fn flip(dir: &Path, seq: u64, at: u64, mask: u8) {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(segment_path(dir, seq))
            .unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ mask], at).unwrap();
    }

    fn ids(found: &[Recovered]) -> Vec<QueueId> {
        found.iter().map(|r| r.id).collect()
    }

    /// Checks each recovered body against what was written.
    fn bodies_intact(spool: &Spool, found: &[Recovered], all: &[QueueId]) {
        for r in found {
            let i = all.iter().position(|x| *x == r.id).unwrap();
            assert_eq!(spool.read_body(r.body).unwrap(), body(i), "body of {i}");
        }
    }

    #[tokio::test]
    async fn messages_updates_and_done_replay() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, found, _) = Spool::open(dir.path()).unwrap();
        assert!(found.is_empty());
        let env = envelope();
        let rcpts = vec![
            Recipient::new("x@one.test".into()),
            Recipient::new("y@two.test".into()),
        ];
        let a = QueueId::generate();
        let b = QueueId::generate();
        let loc_a = spool
            .append_durable(message_record(a, &env, &rcpts, b"body A\r\n"))
            .await
            .unwrap();
        spool
            .append_durable(message_record(b, &env, &rcpts, b"body B\r\n"))
            .await
            .unwrap();
        assert_eq!(spool.read_body(loc_a).unwrap(), b"body A\r\n");
        let mut delivered = rcpts[0].clone();
        delivered.status = RcptStatus::Delivered;
        spool.append(Record::update(a, 0, &delivered));
        spool.append(Record::done(b));
        spool.close().await;

        let (spool2, found, head) = Spool::open(dir.path()).unwrap();
        assert_eq!(head, 2);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].id, a);
        assert_eq!(found[0].recipients[0].status, RcptStatus::Delivered);
        assert_eq!(found[0].recipients[1].status, RcptStatus::Pending);
        assert_eq!(spool2.read_body(found[0].body).unwrap(), b"body A\r\n");
        assert!(spool2.damage().is_empty());
        spool2.close().await;
    }

    #[test]
    fn vectored_writes_put_every_part_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(dir.path().join("v"))
            .unwrap();
        // More parts than one pwritev takes, empty ones among them.
        let owned: Vec<Vec<u8>> = (0..3000u32)
            .map(|i| vec![(i % 251) as u8; (i % 5) as usize])
            .collect();
        let parts: Vec<&[u8]> = owned.iter().map(Vec::as_slice).collect();
        write_all_vectored_at(&file, &parts, 7).unwrap();
        let want: Vec<u8> = owned.concat();
        let mut got = vec![0u8; want.len()];
        file.read_exact_at(&mut got, 7).unwrap();
        assert_eq!(got, want);
    }

    /// Large records are written from their own buffers, small ones
    /// gathered: in one batch, mixed, every record lands in order.
    #[tokio::test]
    async fn large_and_small_records_in_one_batch_replay_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _, _) = Spool::open(dir.path()).unwrap();
        let env = envelope();
        let bodies: Vec<Vec<u8>> = [10, LARGE_RECORD + 7, 3, 3 * LARGE_RECORD, 1]
            .iter()
            .enumerate()
            .map(|(i, &n)| vec![b'a' + i as u8; n])
            .collect();
        let ids: Vec<QueueId> = bodies.iter().map(|_| QueueId::generate()).collect();
        let waits: Vec<_> = ids
            .iter()
            .zip(&bodies)
            .map(|(id, b)| spool.append_durable(message_record(*id, &env, &rcpts(), b)))
            .collect();
        for (w, body) in futures_util::future::join_all(waits)
            .await
            .into_iter()
            .zip(&bodies)
        {
            assert_eq!(&spool.read_body(w.unwrap()).unwrap(), body);
        }
        spool.append(Record::done(ids[2]));
        spool.close().await;
        let (spool, found, _) = Spool::open(dir.path()).unwrap();
        let mut want = ids.clone();
        want.remove(2);
        assert_eq!(found.iter().map(|r| r.id).collect::<Vec<_>>(), want);
        for r in &found {
            let i = ids.iter().position(|id| *id == r.id).unwrap();
            assert_eq!(spool.read_body(r.body).unwrap(), bodies[i]);
        }
        assert!(spool.damage().is_empty());
        spool.close().await;
    }

    #[tokio::test]
    async fn torn_tail_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _, head) = Spool::open(dir.path()).unwrap();
        let id = QueueId::generate();
        let kept = message_record(id, &envelope(), &rcpts(), b"kept\r\n");
        let end = SEGMENT_HEADER + kept.bytes.len() as u64;
        spool.append_durable(kept).await.unwrap();
        spool.close().await;
        // A crash in the middle of the next write leaves half a record
        // before the zero-filled space.
        let head_seg = spool_head(dir.path(), head);
        let mut torn = message_record(QueueId::generate(), &envelope(), &rcpts(), b"lost\r\n");
        head_seg.seal(&mut torn.bytes, end);
        let f = OpenOptions::new()
            .write(true)
            .open(segment_path(dir.path(), head))
            .unwrap();
        f.write_all_at(&torn.bytes[..torn.bytes.len() / 2], end)
            .unwrap();
        drop(f);
        let (spool, found, _) = Spool::open(dir.path()).unwrap();
        assert_eq!(ids(&found), [id]);
        assert!(spool.damage().is_empty(), "a torn tail is no damage");
    }

    /// The key of segment `seq` (tests write records as the writer would).
    fn spool_head(dir: &Path, seq: u64) -> SegmentKey {
        let bytes = fs::read(segment_path(dir, seq)).unwrap();
        format::read_segment_header(&bytes[..SEGMENT_HEADER as usize])
            .and_then(|s| s.key)
            .expect("segment has a key")
    }

    #[tokio::test]
    async fn one_flipped_byte_loses_only_its_record() {
        within(async {
            let dir = tempfile::tempdir().unwrap();
            let (all, starts, seq) = fill(dir.path(), 60).await;
            // In the body of message 17: its header still verifies.
            let at = starts[18] - 5;
            flip(dir.path(), seq, at, 0x01);
            let (spool, found, _) = Spool::open(dir.path()).unwrap();
            let mut want = all.clone();
            want.remove(17);
            assert_eq!(ids(&found), want);
            bodies_intact(&spool, &found, &all);
            let d = spool.damage();
            assert_eq!(d.damaged_segments, 1);
            assert_eq!(d.skipped_records, 1);
            assert_eq!(d.lost_queue_ids, [all[17]]);
            spool.close().await;
        })
        .await;
    }

    #[tokio::test]
    async fn a_damaged_length_resynchronises_on_the_next_record() {
        within(async {
            let dir = tempfile::tempdir().unwrap();
            let (all, starts, seq) = fill(dir.path(), 10).await;
            // The length of message 4 now says ~1 GiB.
            flip(dir.path(), seq, starts[4] + 3, 0x40);
            let (spool, found, _) = Spool::open(dir.path()).unwrap();
            let mut want = all.clone();
            want.remove(4);
            assert_eq!(ids(&found), want);
            bodies_intact(&spool, &found, &all);
            let d = spool.damage();
            assert_eq!((d.damaged_segments, d.skipped_records), (1, 1));
            // Its metadata still reads: the message is named.
            assert_eq!(d.lost_queue_ids, [all[4]]);
            spool.close().await;
        })
        .await;
    }

    #[tokio::test]
    async fn a_damaged_segment_magic_loses_nothing() {
        within(async {
            let dir = tempfile::tempdir().unwrap();
            let (all, _, seq) = fill(dir.path(), 60).await;
            flip(dir.path(), seq, 2, 0x20);
            let (spool, found, _) = Spool::open(dir.path()).unwrap();
            assert_eq!(ids(&found), all);
            bodies_intact(&spool, &found, &all);
            let d = spool.damage();
            assert_eq!((d.damaged_segments, d.skipped_records), (1, 0));
            assert!(d.lost_queue_ids.is_empty());
            spool.close().await;
        })
        .await;
    }

    #[tokio::test]
    async fn without_a_readable_key_records_are_read_by_their_lengths() {
        within(async {
            let dir = tempfile::tempdir().unwrap();
            let (all, starts, seq) = fill(dir.path(), 10).await;
            // Both copies of the key, and the body of message 6.
            flip(dir.path(), seq, 10, 0x01);
            flip(dir.path(), seq, 30, 0x01);
            flip(dir.path(), seq, starts[7] - 3, 0x01);
            let (spool, found, _) = Spool::open(dir.path()).unwrap();
            let mut want = all.clone();
            want.remove(6);
            assert_eq!(ids(&found), want);
            bodies_intact(&spool, &found, &all);
            assert_eq!(spool.damage().lost_queue_ids, [all[6]]);
            spool.close().await;
        })
        .await;
    }

    /// A body made of records: framed as the spool frames them, sealed
    /// with a key the sender made up, and in format 1; each with its own
    /// envelope, as an attacker would send to turn damage into relaying.
    fn forged_body(from: u64) -> (Vec<u8>, Vec<QueueId>) {
        let mut out = b"Subject: hello\r\n\r\n".to_vec();
        let mut forged = Vec::new();
        let guess = SegmentKey::random();
        for i in 0..8u128 {
            let id = QueueId(0xF0F0_0000 + i);
            let mut env = envelope();
            env.sender = "attacker@evil.test".into();
            let mut rec = message_record(
                id,
                &env,
                &[Recipient::new("victim@far.test".into())],
                b"spam",
            );
            if i % 2 == 0 {
                guess.seal(&mut rec.bytes, from + out.len() as u64);
                out.extend_from_slice(&rec.bytes);
            } else {
                out.extend_from_slice(&frame_v1(&rec.bytes));
            }
            forged.push(id);
        }
        (out, forged)
    }

    #[tokio::test]
    async fn records_inside_a_body_are_never_replayed() {
        within(async {
            let dir = tempfile::tempdir().unwrap();
            let (spool, _, seq) = Spool::open(dir.path()).unwrap();
            let (a, b, c) = (
                QueueId::generate(),
                QueueId::generate(),
                QueueId::generate(),
            );
            let first = spool
                .append_durable(message_record(a, &envelope(), &rcpts(), b"first\r\n"))
                .await
                .unwrap();
            let probe = message_record(b, &envelope(), &rcpts(), b"");
            let body_at = first.offset + first.len + probe.body_offset;
            let (evil, forged) = forged_body(body_at);
            let loc = spool
                .append_durable(message_record(b, &envelope(), &rcpts(), &evil))
                .await
                .unwrap();
            assert_eq!(loc.offset, body_at);
            spool
                .append_durable(message_record(c, &envelope(), &rcpts(), b"last\r\n"))
                .await
                .unwrap();
            spool.close().await;
            let b_start = first.offset + first.len;
            // Each damage makes replay look for the next record across the
            // forged ones: the length, the CRC, the kind, the tag.
            for at in [1, 5, 8, 12] {
                flip(dir.path(), seq, b_start + at, 0x10);
                let (spool, found, _) = Spool::open(dir.path()).unwrap();
                assert_eq!(ids(&found), [a, c], "damage at +{at}");
                assert!(found.iter().all(|r| !forged.contains(&r.id)));
                spool.close().await;
                flip(dir.path(), seq, b_start + at, 0x10);
            }
        })
        .await;
    }

    /// A format 1 segment of the given records, as the previous version
    /// wrote them; returns each record's start.
    fn write_v1(dir: &Path, seq: u64, records: &[Record]) -> Vec<u64> {
        let mut file = MAGIC_V1.to_vec();
        let mut starts = Vec::new();
        for r in records {
            starts.push(file.len() as u64);
            file.extend_from_slice(&frame_v1(&r.bytes));
        }
        file.extend_from_slice(&[0u8; 4096]);
        fs::write(segment_path(dir, seq), file).unwrap();
        starts
    }

    #[tokio::test]
    async fn format_1_segments_replay_and_resume_only_by_length() {
        within(async {
            let dir = tempfile::tempdir().unwrap();
            let all: Vec<QueueId> = (0..5).map(|_| QueueId::generate()).collect();
            let records = || -> Vec<Record> {
                all.iter()
                    .enumerate()
                    .map(|(i, id)| message_record(*id, &envelope(), &rcpts(), &body(i)))
                    .collect()
            };
            let starts = write_v1(dir.path(), 1, &records());
            let (spool, found, head) = Spool::open(dir.path()).unwrap();
            assert_eq!(ids(&found), all);
            bodies_intact(&spool, &found, &all);
            assert_eq!(head, 2);
            assert!(spool.damage().is_empty());
            spool.close().await;
            fs::remove_file(segment_path(dir.path(), 2)).unwrap();

            // A damaged body: its length leads to the next record.
            flip(dir.path(), 1, starts[3] - 2, 0x01);
            let (spool, found, head) = Spool::open(dir.path()).unwrap();
            assert_eq!(ids(&found), [all[0], all[1], all[3], all[4]]);
            assert_eq!(spool.damage().lost_queue_ids, [all[2]]);
            spool.close().await;
            fs::remove_file(segment_path(dir.path(), head)).unwrap();

            // A damaged length: no safe way on, the rest is skipped and
            // reported, not searched.
            write_v1(dir.path(), 1, &records());
            flip(dir.path(), 1, starts[2] + 1, 0x01);
            let (spool, found, _) = Spool::open(dir.path()).unwrap();
            assert_eq!(ids(&found), [all[0], all[1]]);
            let d = spool.damage();
            assert_eq!((d.damaged_segments, d.skipped_records), (1, 1));
            spool.close().await;
        })
        .await;
    }

    #[tokio::test]
    async fn a_damaged_update_names_its_message_for_redelivery() {
        within(async {
            let dir = tempfile::tempdir().unwrap();
            let (spool, _, seq) = Spool::open(dir.path()).unwrap();
            let (m, n) = (QueueId::generate(), QueueId::generate());
            let loc = spool
                .append_durable(message_record(m, &envelope(), &rcpts(), b"m\r\n"))
                .await
                .unwrap();
            let mut delivered = rcpts()[0].clone();
            delivered.status = RcptStatus::Delivered;
            spool.append(Record::update(m, 0, &delivered));
            spool
                .append_durable(message_record(n, &envelope(), &rcpts(), b"n\r\n"))
                .await
                .unwrap();
            spool.close().await;
            // The recipient's address in the update: still JSON, but the
            // CRC fails.
            let rec = Record::update(m, 0, &delivered);
            let pos = rec
                .bytes
                .windows(10)
                .position(|w| w == b"x@one.test")
                .unwrap();
            flip(dir.path(), seq, loc.offset + loc.len + pos as u64, 0x02);
            let (spool, found, _) = Spool::open(dir.path()).unwrap();
            assert_eq!(ids(&found), [m, n]);
            assert_eq!(found[0].recipients[0].status, RcptStatus::Pending);
            let d = spool.damage();
            assert_eq!(d.skipped_records, 1);
            assert!(d.lost_queue_ids.is_empty());
            assert_eq!(d.redelivery_queue_ids, [m]);
            spool.close().await;
        })
        .await;
    }

    #[tokio::test]
    async fn an_update_names_a_message_whose_record_is_unreadable() {
        within(async {
            let dir = tempfile::tempdir().unwrap();
            let (spool, _, seq) = Spool::open(dir.path()).unwrap();
            let m = QueueId::generate();
            let first = message_record(m, &envelope(), &rcpts(), b"m\r\n");
            spool.append_durable(first).await.unwrap();
            let mut deferred = rcpts()[0].clone();
            deferred.status = RcptStatus::Deferred;
            spool.append(Record::update(m, 0, &deferred));
            spool.close().await;
            // The metadata length and the header: nothing of it reads.
            flip(dir.path(), seq, SEGMENT_HEADER + 2, 0x08);
            flip(dir.path(), seq, SEGMENT_HEADER + 17 + 3, 0x08);
            let (spool, found, _) = Spool::open(dir.path()).unwrap();
            assert!(found.is_empty());
            assert_eq!(spool.damage().lost_queue_ids, [m]);
            spool.close().await;
        })
        .await;
    }

    #[tokio::test]
    async fn a_damaged_segment_is_moved_to_corrupt_instead_of_deleted() {
        within(async {
            let dir = tempfile::tempdir().unwrap();
            let (spool, _, clean) = Spool::open(dir.path()).unwrap();
            spool.close().await;
            let (_, starts, seq) = fill(dir.path(), 3).await;
            flip(dir.path(), seq, starts[2] - 3, 0x01);
            let (spool, found, head) = Spool::open(dir.path()).unwrap();
            assert_eq!(found.len(), 2);
            spool.delete_below(u64::MAX);
            spool.close().await;
            assert!(
                !segment_path(dir.path(), clean).exists(),
                "clean one deleted"
            );
            assert!(!segment_path(dir.path(), seq).exists());
            assert!(segment_path(dir.path(), head).exists());
            let kept = dir
                .path()
                .join("corrupt")
                .join(segment_path(dir.path(), seq).file_name().unwrap());
            assert!(kept.is_file(), "damaged segment kept in corrupt/");
            assert_eq!(spool.damage().quarantined, std::slice::from_ref(&kept));
            // Still reported after a restart, by what corrupt/ holds.
            let (spool, found, _) = Spool::open(dir.path()).unwrap();
            assert!(found.is_empty());
            let d = spool.damage();
            assert_eq!(d.quarantined, [kept]);
            assert_eq!(d.damaged_segments, 0);
            assert!(!d.is_empty());
            spool.close().await;
        })
        .await;
    }

    #[tokio::test]
    async fn files_named_like_segments_that_cannot_be_used_are_quarantined() {
        within(async {
            let dir = tempfile::tempdir().unwrap();
            let (all, _, seq) = fill(dir.path(), 2).await;
            let d = dir.path();
            fs::copy(segment_path(d, seq), d.join("seg-7.log")).unwrap();
            fs::write(d.join("seg-abc.log"), b"x").unwrap();
            fs::write(d.join("seg-99999999999999999999.log"), b"x").unwrap();
            fs::create_dir(segment_path(d, 9)).unwrap();
            fs::write(d.join("notes.txt"), b"not a segment").unwrap();
            let (spool, found, head) = Spool::open(d).unwrap();
            assert_eq!(ids(&found), all);
            assert_eq!(head, seq + 1);
            let names: Vec<String> = spool
                .damage()
                .quarantined
                .iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect();
            assert_eq!(
                names,
                [
                    "seg-0000000000000009.log",
                    "seg-7.log",
                    "seg-99999999999999999999.log",
                    "seg-abc.log"
                ]
            );
            assert!(d.join("notes.txt").exists(), "other files are left alone");
            spool.close().await;
        })
        .await;
    }

    #[tokio::test]
    async fn a_segment_number_that_cannot_be_followed_is_renumbered() {
        within(async {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path();
            let (all, _, first) = fill(d, 2).await;
            let (spool, _, second) = Spool::open(d).unwrap();
            spool.append_durable(Record::done(all[0])).await.unwrap();
            spool.close().await;
            // The last number there is, and one below it (in order).
            fs::rename(segment_path(d, first), segment_path(d, u64::MAX - 1)).unwrap();
            fs::rename(segment_path(d, second), segment_path(d, u64::MAX)).unwrap();
            for restart in 0..3 {
                let (spool, found, head) = Spool::open(d).unwrap();
                assert_eq!(ids(&found), [all[1]], "restart {restart}");
                bodies_intact(&spool, &found, &all);
                assert!(head < 10, "head {head}");
                spool.close().await;
            }
            assert!(!segment_path(d, u64::MAX).exists());
        })
        .await;
    }

    #[tokio::test]
    async fn segments_rotate_and_all_replay_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _, head) = Spool::open_with(dir.path(), 1000).unwrap();
        let mut ids = Vec::new();
        let mut segs = BTreeSet::new();
        for i in 0..5 {
            let id = QueueId::generate();
            let body = format!("{i}{}\r\n", "x".repeat(400));
            let loc = spool
                .append_durable(message_record(id, &envelope(), &rcpts(), body.as_bytes()))
                .await
                .unwrap();
            assert_eq!(spool.read_body(loc).unwrap(), body.as_bytes());
            segs.insert(loc.segment);
            ids.push(id);
        }
        assert!(segs.len() >= 2, "expected rotation, got {segs:?}");
        assert_eq!(*segs.first().unwrap(), head);
        spool.append(Record::done(ids[0]));
        spool.close().await;
        let (spool, found, _) = Spool::open(dir.path()).unwrap();
        let got: Vec<QueueId> = found.iter().map(|r| r.id).collect();
        assert_eq!(got, ids[1..]);
        for r in &found {
            assert_eq!(spool.read_body(r.body).unwrap().len(), 403);
        }
        spool.close().await;
    }

    #[tokio::test]
    async fn deleted_segments_are_gone_after_sync() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _, head) = Spool::open(dir.path()).unwrap();
        spool.close().await;
        let (spool, _, head2) = Spool::open(dir.path()).unwrap();
        assert_eq!(head2, head + 1);
        spool.delete_below(u64::MAX);
        spool.close().await;
        assert!(!segment_path(dir.path(), head).exists());
        assert!(segment_path(dir.path(), head2).exists());
    }

    /// Waits (polling, bounded) until the spool has a head segment again.
    async fn until_writable(spool: &Spool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while spool.is_full() {
            assert!(Instant::now() < deadline, "spool still full after 10 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_spool_on_a_full_disk_opens_replays_and_recovers() {
        // Room for three segments (each has 4 MiB of zeros ahead).
        let Some(tmp) = tmpfs::Tmpfs::mount("12m") else {
            return;
        };
        within(async {
            let dir = tmp.path().join("spool");
            let (all, _, first) = fill(&dir, 3).await;
            let filler = tmp.fill();
            let (spool, found, head) = Spool::open(&dir).unwrap();
            assert_eq!(ids(&found), all, "replay needs no room");
            bodies_intact(&spool, &found, &all);
            assert!(spool.is_full());
            let e = spool
                .append_durable(message_record(
                    QueueId::generate(),
                    &envelope(),
                    &rcpts(),
                    b"x",
                ))
                .await
                .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::StorageFull, "{e}");
            // Kept in memory until there is a head segment.
            spool.append(Record::done(all[0]));
            fs::remove_file(filler).unwrap();
            until_writable(&spool).await;
            spool.close().await;
            assert!(segment_path(&dir, head).exists());

            // Deleting segments makes room too: the writer tries at once.
            let filler = tmp.fill();
            let (spool, found, _) = Spool::open(&dir).unwrap();
            assert_eq!(ids(&found), all[1..], "the Done record was written");
            assert!(spool.is_full());
            spool.delete_below(head + 1);
            until_writable(&spool).await;
            spool.close().await;
            assert!(!segment_path(&dir, first).exists());
            fs::remove_file(filler).unwrap();
        })
        .await;
    }

    #[tokio::test]
    async fn a_full_disk_refuses_with_storage_full_keeps_states_and_recovers() {
        let Some(tmp) = tmpfs::Tmpfs::mount("12m") else {
            return;
        };
        within(async {
            let dir = tmp.path().join("spool");
            // Another file holds 5 MiB: with 4 MiB of zeros ahead per
            // segment, the spool's second segment does not fit.
            let ballast = tmp.path().join("ballast");
            fs::write(&ballast, vec![1u8; 5 << 20]).unwrap();
            let (spool, _, _) = Spool::open_with(&dir, 256 << 10).unwrap();
            let mut accepted = Vec::new();
            let refusal = loop {
                let id = QueueId::generate();
                let rec = message_record(id, &envelope(), &rcpts(), &[b'x'; 8 << 10]);
                match spool.append_durable(rec).await {
                    Ok(_) => accepted.push(id),
                    Err(e) => break e,
                }
                assert!(accepted.len() < 2000, "the disk never filled");
            };
            assert_eq!(refusal.kind(), io::ErrorKind::StorageFull, "{refusal}");
            // Refused at once from now on, without a head segment.
            let again = spool
                .append_durable(message_record(
                    QueueId::generate(),
                    &envelope(),
                    &rcpts(),
                    b"x",
                ))
                .await
                .unwrap_err();
            assert_eq!(again.kind(), io::ErrorKind::StorageFull);
            assert!(spool.is_full(), "{again}");
            // State changes wait in memory.
            let mut delivered = rcpts()[0].clone();
            delivered.status = RcptStatus::Delivered;
            spool.append(Record::update(accepted[0], 0, &delivered));
            spool.append(Record::done(accepted[1]));
            // Room appears; the writer finds it by itself.
            fs::remove_file(&ballast).unwrap();
            until_writable(&spool).await;
            let late = QueueId::generate();
            spool
                .append_durable(message_record(late, &envelope(), &rcpts(), b"late\r\n"))
                .await
                .unwrap();
            spool.close().await;

            let (spool, found, _) = Spool::open_with(&dir, 256 << 10).unwrap();
            let mut want: Vec<QueueId> = accepted
                .iter()
                .copied()
                .filter(|i| *i != accepted[1])
                .collect();
            want.push(late);
            assert_eq!(ids(&found), want);
            assert_eq!(found[0].recipients[0].status, RcptStatus::Delivered);
            assert!(spool.damage().is_empty());
            spool.close().await;
        })
        .await;
    }
}

/// Property tests of replay (STYLE.md point 9): whatever bytes follow the
/// valid records, whatever burst of bytes is flipped inside one, and
/// whatever records a body carries, replay never panics, never yields a
/// record that was not written as one, and loses only the damaged record.
#[cfg(test)]
mod prop_tests {
    use super::tests::message_record;
    use super::*;
    use crate::clock::unix_now;
    use format::frame_v1;
    use proptest::prelude::*;

    fn envelope(i: usize) -> Envelope {
        Envelope {
            sender: format!("s{i}@acme.example"),
            tenant: Some("acme".into()),
            message_id: Some(format!("<m{i}@acme.example>")),
            received_at: unix_now(),
            client_ip: "127.0.0.1".parse().unwrap(),
            smtputf8: false,
            body_8bit: false,
            ret: None,
            env_id: None,
            require_tls: false,
            ignore_tls_policies: false,
        }
    }

    /// A segment of `bodies.len()` message records, as the writer makes
    /// one: the file's bytes, the records' ids, and where each record
    /// starts and ends in the file.
    fn segment(bodies: &[Vec<u8>]) -> (Vec<u8>, Vec<QueueId>, Vec<(usize, usize)>) {
        let key = SegmentKey::random();
        let mut file = key.segment_header().to_vec();
        let mut ids = Vec::new();
        let mut spans = Vec::new();
        for (i, body) in bodies.iter().enumerate() {
            let id = QueueId(i as u128 + 1);
            let rcpts = vec![Recipient::new(format!("r{i}@one.test"))];
            let mut r = message_record(id, &envelope(i), &rcpts, body);
            key.seal(&mut r.bytes, file.len() as u64);
            spans.push((file.len(), file.len() + r.bytes.len()));
            file.extend_from_slice(&r.bytes);
            ids.push(id);
        }
        (file, ids, spans)
    }

    /// Replays `file` as segment 1; returns the ids found, after checking
    /// that each recovered body reads back as `bodies[its index]`.
    fn replay(file: &[u8], bodies: &[Vec<u8>]) -> Vec<QueueId> {
        let dir = tempfile::tempdir().unwrap();
        let path = segment_path(dir.path(), 1);
        fs::write(&path, file).unwrap();
        let mut replay = replay::Replay::default();
        replay.segment(&path, 1).unwrap();
        let found = replay.finish().recovered;
        for r in &found {
            let i = (r.id.0 - 1) as usize;
            assert!(i < bodies.len(), "record {:?} was never written", r.id);
            let start = r.body.offset as usize;
            let end = start + r.body.len as usize;
            assert_eq!(r.body.segment, 1);
            assert_eq!(
                file.get(start..end),
                Some(&bodies[i][..]),
                "body of record {i}"
            );
            assert_eq!(r.envelope.sender, format!("s{i}@acme.example"));
        }
        found.iter().map(|r| r.id).collect()
    }

    fn bodies() -> impl Strategy<Value = Vec<Vec<u8>>> {
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 1..5)
    }

    /// Junk after the records: random bytes, or a plausible header (a small
    /// length and a kind) with a CRC that does not match.
    fn junk() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 1..64),
            (
                0u32..40,
                any::<u32>(),
                0u8..5,
                prop::collection::vec(any::<u8>(), 0..48)
            )
                .prop_map(|(len, crc, kind, rest)| {
                    let mut v = len.to_le_bytes().to_vec();
                    v.extend_from_slice(&crc.to_le_bytes());
                    v.push(kind);
                    v.extend_from_slice(&rest);
                    v
                }),
        ]
    }

    /// Records a body may carry: each framed as the spool frames them,
    /// sealed with a made-up key or in format 1, with ids never written.
    fn forged() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec((any::<bool>(), any::<u64>(), 0usize..3), 1..4).prop_map(|recs| {
            let mut out = Vec::new();
            for (i, (v1, offset, pad)) in recs.into_iter().enumerate() {
                out.extend(std::iter::repeat_n(b'.', pad));
                let id = QueueId(1000 + i as u128);
                let rcpts = vec![Recipient::new("victim@far.test".into())];
                let mut r = message_record(id, &envelope(1000), &rcpts, b"spam");
                SegmentKey::random().seal(&mut r.bytes, offset);
                out.extend_from_slice(&if v1 { frame_v1(&r.bytes) } else { r.bytes });
            }
            out
        })
    }

    /// Found by `bytes_after_the_records_are_never_replayed`: a header
    /// saying 4 GiB made replay allocate (and zero) 4 GiB before it found
    /// the record torn; the test ran for minutes at 3 GB of memory.
    #[test]
    fn a_huge_length_after_the_records_is_a_torn_tail() {
        let bodies = vec![b"one\r\n".to_vec()];
        let (mut file, ids, _) = segment(&bodies);
        file.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4, KIND_MESSAGE, b'x']);
        assert_eq!(replay(&file, &bodies), ids);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        #[test]
        fn bytes_after_the_records_are_never_replayed(bodies in bodies(), junk in junk(), zeros in any::<bool>()) {
            let (mut file, ids, _) = segment(&bodies);
            file.extend_from_slice(&junk);
            if zeros {
                // As in a head segment: zero-filled space after the tail.
                file.extend_from_slice(&[0u8; 64]);
            }
            prop_assert_eq!(replay(&file, &bodies), ids);
        }

        #[test]
        fn replay_skips_only_the_damaged_record(
            bodies in bodies(),
            which in any::<prop::sample::Index>(),
            at in any::<prop::sample::Index>(),
            burst in prop::collection::vec(1u8..=255, 1..=4),
        ) {
            let (mut file, ids, spans) = segment(&bodies);
            let rec = which.index(spans.len());
            let (start, end) = spans[rec];
            // A burst of at most 4 bytes (32 bits) inside one record: the
            // CRC detects every such error in the payload, the tag any
            // change to the header; the other records are all replayed.
            let from = start + at.index(end - start);
            for (i, x) in burst.iter().enumerate() {
                if let Some(b) = file.get_mut(from + i).filter(|_| from + i < end) {
                    *b ^= x;
                }
            }
            let mut want = ids.clone();
            want.remove(rec);
            prop_assert_eq!(replay(&file, &bodies), want);
        }

        #[test]
        fn records_carried_in_a_body_are_never_replayed(
            bodies in bodies(),
            which in any::<prop::sample::Index>(),
            evil in forged(),
            at in any::<prop::sample::Index>(),
            mask in 1u8..=255,
        ) {
            let mut bodies = bodies;
            let rec = which.index(bodies.len());
            bodies[rec].extend_from_slice(&evil);
            let (mut file, ids, spans) = segment(&bodies);
            // Damage to the carrying record's header sends replay looking
            // for the next record across the forged ones.
            let (start, _) = spans[rec];
            file[start + at.index(17)] ^= mask;
            let mut want = ids.clone();
            want.remove(rec);
            prop_assert_eq!(replay(&file, &bodies), want);
        }

        #[test]
        fn truncation_anywhere_keeps_only_whole_records(bodies in bodies(), cut in any::<prop::sample::Index>()) {
            let (file, ids, spans) = segment(&bodies);
            let cut = cut.index(file.len() + 1);
            let whole = spans.iter().take_while(|(_, e)| *e <= cut).count();
            prop_assert_eq!(replay(&file[..cut], &bodies), ids[..whole].to_vec());
        }
    }
}
