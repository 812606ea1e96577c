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
//! Records carry a CRC-32; replay stops at the first torn or corrupt record
//! of a segment (what follows it was never acknowledged). A restart always
//! starts a new head segment. Old segments are deleted oldest first once no
//! live message has its body in them; deleting only in order keeps every
//! update record of a live message, since updates always follow the body.
//!
//! Record layout: `len: u32 LE | crc32(kind ‖ payload): u32 LE | kind: u8 |
//! payload[len]`. The head segment is kept zero-filled ahead of its last
//! record; an all-zero header marks the end of the records.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::message::{Envelope, QueueId, Recipient};

const SEGMENT_PREFIX: &str = "seg-";
const SEGMENT_SUFFIX: &str = ".log";
const SEGMENT_MAGIC: &[u8; 8] = b"HRLDSPL1";
const HEADER_LEN: u64 = 9;
/// A head segment past this size is closed and a new one started.
pub const SEGMENT_TARGET_SIZE: u64 = 64 << 20;
/// Records that nobody waits for are still made durable this often.
const BACKGROUND_SYNC: Duration = Duration::from_millis(500);
/// How far ahead of the last record the head segment is pre-filled with zeros.
const ZERO_AHEAD: u64 = 4 << 20;

const KIND_MESSAGE: u8 = 1;
const KIND_UPDATE: u8 = 2;
const KIND_DONE: u8 = 3;

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

/// An encoded record ready for the writer.
pub struct Record {
    bytes: Vec<u8>,
    /// Offset of the body inside `bytes`, for `Message` records.
    body_offset: u64,
}

impl Record {
    pub fn message(
        id: QueueId,
        envelope: &Envelope,
        recipients: &[Recipient],
        body: &[u8],
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
        let mut payload = Vec::with_capacity(4 + meta.len() + body.len());
        payload.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        payload.extend_from_slice(&meta);
        let body_offset = HEADER_LEN + payload.len() as u64;
        payload.extend_from_slice(body);
        Record {
            bytes: frame(KIND_MESSAGE, &payload),
            body_offset,
        }
    }

    pub fn update(id: QueueId, index: usize, recipient: &Recipient) -> Record {
        let payload = serde_json::to_vec(&StoredUpdate {
            id,
            index,
            recipient: recipient.clone(),
        })
        .expect("recipient serializes");
        Record {
            bytes: frame(KIND_UPDATE, &payload),
            body_offset: 0,
        }
    }

    pub fn done(id: QueueId) -> Record {
        Record {
            bytes: frame(KIND_DONE, &id.0.to_le_bytes()),
            body_offset: 0,
        }
    }
}

fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(payload);
    let mut out = Vec::with_capacity(HEADER_LEN as usize + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.push(kind);
    out.extend_from_slice(payload);
    out
}

enum Request {
    Append {
        record: Record,
        /// Present when the caller waits until the record is durable.
        ack: Option<oneshot::Sender<io::Result<BodyLoc>>>,
    },
    /// Delete every segment older than this one, except the head, once
    /// everything queued before is durable.
    DeleteBelow(u64),
    Close(oneshot::Sender<()>),
}

/// Handle to the writer thread. Cheap to clone.
#[derive(Clone)]
pub struct Spool {
    dir: PathBuf,
    tx: mpsc::Sender<Request>,
    syncs: Arc<AtomicU64>,
}

impl Spool {
    /// Opens the spool directory, replays every segment and starts the
    /// writer on a fresh head segment. Returns the live messages found, in
    /// arrival order, and the head segment's number.
    pub fn open(dir: &Path) -> io::Result<(Spool, Vec<Recovered>, u64)> {
        Spool::open_with(dir, SEGMENT_TARGET_SIZE)
    }

    /// [`Spool::open`] with another segment size (tests use tiny ones).
    pub fn open_with(dir: &Path, segment_size: u64) -> io::Result<(Spool, Vec<Recovered>, u64)> {
        fs::create_dir_all(dir)?;
        let mut segments = list_segments(dir)?;
        segments.sort_unstable();
        let mut found = indexmap_like::Map::default();
        for &seq in &segments {
            replay_segment(dir, seq, &mut found)?;
        }
        let head = segments.last().map(|s| s + 1).unwrap_or(1);
        let mut writer = Writer::create(dir.to_path_buf(), head, segment_size)?;
        writer.segments.extend(segments);
        let syncs = writer.syncs.clone();
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("herald-spool".into())
            .spawn(move || writer.run(rx))?;
        Ok((
            Spool {
                dir: dir.to_path_buf(),
                tx,
                syncs,
            },
            found.into_values(),
            head,
        ))
    }

    /// Appends a record and waits until it is on stable storage.
    pub async fn append_durable(&self, record: Record) -> io::Result<BodyLoc> {
        self.append_acked(record).await
    }

    /// Queues a record now (its place in the log is fixed by this call) and
    /// returns a future that resolves once it is on stable storage.
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
    /// batch or within [`BACKGROUND_SYNC`]. Losing it in a crash means a
    /// recipient is tried again (at-least-once), never that mail is lost.
    pub fn append(&self, record: Record) {
        let _ = self.tx.send(Request::Append { record, ack: None });
    }

    /// Deletes every segment numbered below `seq` (never the head) once
    /// everything queued before this call is durable.
    pub fn delete_below(&self, seq: u64) {
        let _ = self.tx.send(Request::DeleteBelow(seq));
    }

    /// How many times the writer has called `fdatasync` (for benchmarks:
    /// records per sync is the group-commit factor).
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
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

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{SEGMENT_PREFIX}{seq:016}{SEGMENT_SUFFIX}"))
}

fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(seq) = name
            .strip_prefix(SEGMENT_PREFIX)
            .and_then(|n| n.strip_suffix(SEGMENT_SUFFIX))
            .and_then(|n| n.parse().ok())
        {
            out.push(seq);
        }
    }
    Ok(out)
}

/// A map that remembers insertion order, so recovered messages come back in
/// arrival order.
mod indexmap_like {
    use std::collections::HashMap;

    use super::{QueueId, Recovered};

    #[derive(Default)]
    pub struct Map {
        order: Vec<QueueId>,
        items: HashMap<QueueId, Recovered>,
    }

    impl Map {
        pub fn insert(&mut self, r: Recovered) {
            if !self.items.contains_key(&r.id) {
                self.order.push(r.id);
            }
            self.items.insert(r.id, r);
        }
        pub fn get_mut(&mut self, id: &QueueId) -> Option<&mut Recovered> {
            self.items.get_mut(id)
        }
        pub fn remove(&mut self, id: &QueueId) {
            self.items.remove(id);
        }
        pub fn into_values(mut self) -> Vec<Recovered> {
            self.order
                .iter()
                .filter_map(|id| self.items.remove(id))
                .collect()
        }
    }
}

/// Applies one segment's records to `found`. A torn or corrupt record ends
/// the segment: nothing after it was ever acknowledged.
fn replay_segment(dir: &Path, seq: u64, found: &mut indexmap_like::Map) -> io::Result<()> {
    let path = segment_path(dir, seq);
    let file = File::open(&path)?;
    let file_len = file.metadata()?.len();
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut magic = [0u8; 8];
    if r.read_exact(&mut magic).is_err() || &magic != SEGMENT_MAGIC {
        tracing::warn!(segment = %path.display(), "spool segment without header; skipped");
        return Ok(());
    }
    let mut offset = SEGMENT_MAGIC.len() as u64;
    let mut header = [0u8; HEADER_LEN as usize];
    let mut payload = Vec::new();
    loop {
        match r.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
        let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
        let kind = header[8];
        if len == 0 && crc == 0 && kind == 0 {
            // The zero-filled space after the last record.
            break;
        }
        // A length past the end of the file is a torn or corrupt header:
        // stop before allocating for it (it may say up to 4 GiB).
        if offset + HEADER_LEN + len as u64 > file_len {
            tracing::warn!(segment = %path.display(), offset, "torn record at the end of a spool segment ignored");
            break;
        }
        payload.resize(len, 0);
        if r.read_exact(&mut payload).is_err() {
            tracing::warn!(segment = %path.display(), offset, "torn record at the end of a spool segment ignored");
            break;
        }
        let mut h = crc32fast::Hasher::new();
        h.update(&[kind]);
        h.update(&payload);
        if h.finalize() != crc {
            tracing::warn!(segment = %path.display(), offset, "corrupt spool record; rest of segment ignored");
            break;
        }
        apply(seq, offset, kind, &payload, found);
        offset += HEADER_LEN + len as u64;
    }
    Ok(())
}

fn apply(seq: u64, offset: u64, kind: u8, payload: &[u8], found: &mut indexmap_like::Map) {
    match kind {
        KIND_MESSAGE => {
            let Some(meta_len) = payload
                .get(..4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
            else {
                return;
            };
            let Some(meta) = payload.get(4..4 + meta_len) else {
                return;
            };
            let Ok(m) = serde_json::from_slice::<StoredMessage>(meta) else {
                tracing::warn!(segment = seq, offset, "unreadable message record skipped");
                return;
            };
            let body_start = 4 + meta_len as u64;
            found.insert(Recovered {
                id: m.id,
                envelope: m.envelope,
                recipients: m.recipients,
                body: BodyLoc {
                    segment: seq,
                    offset: offset + HEADER_LEN + body_start,
                    len: payload.len() as u64 - body_start,
                },
            });
        }
        KIND_UPDATE => {
            if let Ok(u) = serde_json::from_slice::<StoredUpdate>(payload)
                && let Some(m) = found.get_mut(&u.id)
                && let Some(slot) = m.recipients.get_mut(u.index)
            {
                *slot = u.recipient;
            }
        }
        KIND_DONE => {
            if let Some(b) = payload.get(..16) {
                found.remove(&QueueId(u128::from_le_bytes(b.try_into().expect("16"))));
            }
        }
        _ => tracing::warn!(segment = seq, offset, kind, "unknown spool record kind"),
    }
}

/// Owns the head segment; runs on its own thread.
struct Writer {
    dir: PathBuf,
    seq: u64,
    file: File,
    /// Bytes of records written (the segment's logical end).
    len: u64,
    /// The file is zero-filled up to here.
    zeroed: u64,
    /// A segment past this size is closed and the next one started.
    segment_size: u64,
    syncs: Arc<AtomicU64>,
    last_sync: std::time::Instant,
    /// A sync or write failed: what is on disk after `len` is unknown (Linux
    /// reports a failed writeback only once), so nothing more may be
    /// acknowledged from this segment. The next batch starts a new one.
    poisoned: bool,
    dirty: bool,
    /// Every segment on disk, the head included.
    segments: BTreeSet<u64>,
}

impl Writer {
    fn create(dir: PathBuf, seq: u64, segment_size: u64) -> io::Result<Writer> {
        let path = segment_path(&dir, seq);
        Writer::create_at(dir, seq, segment_size).inspect_err(|_| {
            // A half-made segment (disk full while zero-filling) would make
            // every later attempt fail with "exists".
            let _ = fs::remove_file(&path);
        })
    }

    fn create_at(dir: PathBuf, seq: u64, segment_size: u64) -> io::Result<Writer> {
        let file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(segment_path(&dir, seq))?;
        file.write_all_at(SEGMENT_MAGIC, 0)?;
        let mut w = Writer {
            dir,
            seq,
            file,
            len: SEGMENT_MAGIC.len() as u64,
            zeroed: SEGMENT_MAGIC.len() as u64,
            segment_size,
            syncs: Arc::new(AtomicU64::new(0)),
            last_sync: std::time::Instant::now(),
            poisoned: false,
            dirty: false,
            segments: BTreeSet::from([seq]),
        };
        w.ensure_zeroed(w.len)?;
        w.file.sync_all()?;
        // The new name must survive a crash too.
        File::open(&w.dir)?.sync_all()?;
        Ok(w)
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
        let target = end + ZERO_AHEAD;
        let zeros = vec![0u8; (target - self.zeroed) as usize];
        self.file.write_all_at(&zeros, self.zeroed)?;
        self.file.sync_data()?;
        self.zeroed = target;
        Ok(())
    }

    fn run(mut self, rx: mpsc::Receiver<Request>) {
        let mut batch = Vec::new();
        let mut buf = Vec::new();
        loop {
            let first = match rx.recv_timeout(BACKGROUND_SYNC) {
                Ok(r) => r,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if self.dirty {
                        let _ = self.sync();
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = self.sync();
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
            if self.process(&mut batch, &mut buf) {
                return;
            }
        }
    }

    /// Writes one batch; returns true when asked to close.
    fn process(&mut self, batch: &mut Vec<Request>, buf: &mut Vec<u8>) -> bool {
        let mut acks = Vec::new();
        let mut delete_below = None;
        let mut close = None;
        let mut wait = false;
        buf.clear();
        let mut result: io::Result<()> = if self.poisoned { self.rotate() } else { Ok(()) };
        for req in batch.drain(..) {
            match req {
                Request::Append { record, ack } => {
                    if self.len + buf.len() as u64 > self.segment_size
                        && self.len + buf.len() as u64 > SEGMENT_MAGIC.len() as u64
                    {
                        result = result
                            .and_then(|_| self.write(buf))
                            .and_then(|_| self.rotate());
                        buf.clear();
                    }
                    let loc = BodyLoc {
                        segment: self.seq,
                        offset: self.len + buf.len() as u64 + record.body_offset,
                        len: (record.bytes.len() as u64).saturating_sub(record.body_offset),
                    };
                    buf.extend_from_slice(&record.bytes);
                    if let Some(ack) = ack {
                        wait = true;
                        acks.push((ack, loc));
                    }
                }
                Request::DeleteBelow(seq) => {
                    delete_below = delete_below.max(Some(seq));
                }
                Request::Close(tx) => close = Some(tx),
            }
        }
        result = result.and_then(|_| self.write(buf));
        // Records nobody waits for are synced at least every
        // BACKGROUND_SYNC even when the writer is never idle.
        let overdue = self.dirty && self.last_sync.elapsed() >= BACKGROUND_SYNC;
        if result.is_ok() && (wait || overdue || delete_below.is_some() || close.is_some()) {
            result = self.sync();
        }
        if let Err(e) = &result {
            tracing::error!(error = %e, segment = self.seq, "spool write or sync failed; this batch is refused and a new segment is started");
            self.poisoned = true;
        }
        // Deletions first: whoever waits for a later record may rely on
        // every earlier request having been carried out.
        if result.is_ok()
            && let Some(below) = delete_below
        {
            self.delete_below(below);
        }
        for (ack, loc) in acks {
            let _ = ack.send(match &result {
                Ok(()) => Ok(loc),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            });
        }
        if let Some(tx) = close {
            let _ = tx.send(());
            return true;
        }
        false
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.ensure_zeroed(self.len + buf.len() as u64) {
            tracing::error!(error = %e, segment = self.seq, "cannot extend the spool (disk full?)");
            return Err(e);
        }
        match self.file.write_all_at(buf, self.len) {
            Ok(()) => {
                self.len += buf.len() as u64;
                self.dirty = true;
                Ok(())
            }
            Err(e) => {
                // A partial write must not leave garbage that would end
                // replay early: zero it again (the blocks exist already).
                tracing::error!(error = %e, segment = self.seq, "spool write failed");
                let _ = self.file.write_all_at(&vec![0u8; buf.len()], self.len);
                Err(e)
            }
        }
    }

    fn sync(&mut self) -> io::Result<()> {
        if self.dirty {
            if let Err(e) = self.file.sync_data() {
                self.poisoned = true;
                return Err(e);
            }
            self.syncs.fetch_add(1, Ordering::Relaxed);
            self.last_sync = std::time::Instant::now();
            self.dirty = false;
        }
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        if !self.poisoned {
            self.sync()?;
        }
        let mut next = Writer::create(self.dir.clone(), self.seq + 1, self.segment_size)?;
        next.segments.append(&mut self.segments);
        next.syncs = self.syncs.clone();
        *self = next;
        Ok(())
    }

    fn delete_below(&mut self, below: u64) {
        let doomed: Vec<u64> = self
            .segments
            .range(..below)
            .copied()
            .filter(|&s| s != self.seq)
            .collect();
        if doomed.is_empty() {
            return;
        }
        for seq in doomed {
            match fs::remove_file(segment_path(&self.dir, seq)) {
                Ok(()) => {
                    self.segments.remove(&seq);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.segments.remove(&seq);
                }
                Err(e) => tracing::warn!(segment = seq, error = %e, "cannot delete spool segment"),
            }
        }
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::message::{RcptStatus, unix_now};

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
            .append_durable(Record::message(a, &env, &rcpts, b"body A\r\n"))
            .await
            .unwrap();
        spool
            .append_durable(Record::message(b, &env, &rcpts, b"body B\r\n"))
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
        spool2.close().await;
    }

    #[tokio::test]
    async fn torn_tail_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _, head) = Spool::open(dir.path()).unwrap();
        let id = QueueId::generate();
        let rcpts = vec![Recipient::new("x@one.test".into())];
        let kept = Record::message(id, &envelope(), &rcpts, b"kept\r\n");
        let end = SEGMENT_MAGIC.len() + kept.bytes.len();
        spool.append_durable(kept).await.unwrap();
        spool.close().await;
        // A crash in the middle of the next write leaves half a record
        // before the zero-filled space.
        let torn = Record::message(QueueId::generate(), &envelope(), &rcpts, b"lost\r\n");
        let f = OpenOptions::new()
            .write(true)
            .open(segment_path(dir.path(), head))
            .unwrap();
        f.write_all_at(&torn.bytes[..torn.bytes.len() / 2], end as u64)
            .unwrap();
        drop(f);
        let (_spool, found, _) = Spool::open(dir.path()).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].id, id);
    }

    #[tokio::test]
    async fn corrupt_record_stops_replay_of_that_segment() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _, head) = Spool::open(dir.path()).unwrap();
        let rcpts = vec![Recipient::new("x@one.test".into())];
        let id = QueueId::generate();
        let rec = Record::message(id, &envelope(), &rcpts, b"one\r\n");
        let end = SEGMENT_MAGIC.len() + rec.bytes.len();
        spool.append_durable(rec).await.unwrap();
        spool.close().await;
        let path = segment_path(dir.path(), head);
        let mut bytes = fs::read(&path).unwrap();
        bytes[end - 3] ^= 0xff;
        fs::write(&path, bytes).unwrap();
        let (_s, found, _) = Spool::open(dir.path()).unwrap();
        assert!(found.is_empty());
    }

    #[tokio::test]
    async fn segments_rotate_and_all_replay_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _, head) = Spool::open_with(dir.path(), 1000).unwrap();
        let rcpts = vec![Recipient::new("x@one.test".into())];
        let mut ids = Vec::new();
        let mut segs = BTreeSet::new();
        for i in 0..5 {
            let id = QueueId::generate();
            let body = format!("{i}{}\r\n", "x".repeat(400));
            let loc = spool
                .append_durable(Record::message(id, &envelope(), &rcpts, body.as_bytes()))
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
}

/// Property tests of replay (STYLE.md point 9): whatever bytes follow the
/// valid records, or whatever burst of bytes is flipped inside one, replay
/// never panics and never yields a record past the first damaged one.
#[cfg(test)]
mod prop_tests {
    use super::*;
    use crate::queue::message::unix_now;
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
        }
    }

    /// A segment of `bodies.len()` message records: the file's bytes, the
    /// records' ids, and where each record starts and ends in the file.
    fn segment(bodies: &[Vec<u8>]) -> (Vec<u8>, Vec<QueueId>, Vec<(usize, usize)>) {
        let mut file = SEGMENT_MAGIC.to_vec();
        let mut ids = Vec::new();
        let mut spans = Vec::new();
        for (i, body) in bodies.iter().enumerate() {
            let id = QueueId(i as u128 + 1);
            let rcpts = vec![Recipient::new(format!("r{i}@one.test"))];
            let r = Record::message(id, &envelope(i), &rcpts, body);
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
        fs::write(segment_path(dir.path(), 1), file).unwrap();
        let mut found = indexmap_like::Map::default();
        replay_segment(dir.path(), 1, &mut found).unwrap();
        let found = found.into_values();
        for r in &found {
            let i = (r.id.0 - 1) as usize;
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
        fn replay_stops_at_a_damaged_record(
            bodies in bodies(),
            which in any::<prop::sample::Index>(),
            at in any::<prop::sample::Index>(),
            burst in prop::collection::vec(1u8..=255, 1..=4),
        ) {
            let (mut file, ids, spans) = segment(&bodies);
            let rec = which.index(spans.len());
            let (start, end) = spans[rec];
            // A burst of at most 4 bytes (32 bits) inside one record: CRC-32
            // detects every such error, so nothing from here on may replay.
            let from = start + at.index(end - start);
            for (i, x) in burst.iter().enumerate() {
                if let Some(b) = file.get_mut(from + i).filter(|_| from + i < end) {
                    *b ^= x;
                }
            }
            prop_assert_eq!(replay(&file, &bodies), ids[..rec].to_vec());
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
