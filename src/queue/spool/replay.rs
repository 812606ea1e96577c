//! Replay: reads segments back at start-up, skipping damaged records.
//!
//! A record that fails its checks is skipped and reading resumes at the next
//! record. In a keyed segment (format 2) that is right after it when its
//! header's tag verifies (the length is then the one written), otherwise at
//! the next offset whose header tag verifies: only the spool can make one,
//! so a record-shaped run of bytes inside a message body is never taken for
//! a record. In a segment without a usable key (format 1, or a format 2
//! header whose key copies are both damaged) reading resumes only where the
//! damaged record's own length leads to a valid record or to the clean end;
//! a byte search there could stop inside a body.
//!
//! Skipped records followed by no valid record are a torn tail: the write
//! a crash interrupted, never acknowledged. They are logged and nothing
//! more. Any other skipped record is damage: counted, logged with the queue
//! ids concerned, and its segment reported so that it is kept.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::format::{
    KIND_DONE, KIND_MESSAGE, KIND_UPDATE, Layout, RecordHeader, SegmentKey, read_segment_header,
};
use super::{BodyLoc, Recovered, StoredMessage, StoredUpdate};
use crate::envelope::QueueId;

/// Bytes read from a segment at a time.
const WINDOW: usize = 1 << 20;
/// In a segment without a key, a record after an unreadable stretch is only
/// looked for (to tell damage from a torn tail, never to replay it) among
/// records this small: it bounds the work, and state records are this size.
const SMALL_RECORD: u32 = 64 << 10;

/// Reads a segment through a window, so that headers read one at a time
/// and a byte-by-byte search cost few system calls.
struct Reader {
    file: File,
    len: u64,
    start: u64,
    buf: Vec<u8>,
}

impl Reader {
    fn new(file: File) -> io::Result<Reader> {
        let len = file.metadata()?.len();
        Ok(Reader {
            file,
            len,
            start: 0,
            buf: Vec::new(),
        })
    }

    /// `n` bytes at `at`, or `None` when they pass the end of the file.
    fn get(&mut self, at: u64, n: usize) -> io::Result<Option<&[u8]>> {
        let Some(end) = at.checked_add(n as u64).filter(|e| *e <= self.len) else {
            return Ok(None);
        };
        if at < self.start || end > self.start + self.buf.len() as u64 {
            let want = (n.max(WINDOW) as u64).min(self.len - at) as usize;
            self.buf.resize(want, 0);
            if let Err(e) = self.file.read_exact_at(&mut self.buf, at) {
                self.buf.clear();
                return Err(e);
            }
            self.start = at;
        }
        let s = (at - self.start) as usize;
        Ok(Some(&self.buf[s..s + n]))
    }

    /// Whatever is left from `at` to the end, when shorter than `n`.
    fn rest_is_zero(&mut self, at: u64) -> io::Result<bool> {
        let n = self.len.saturating_sub(at) as usize;
        Ok(self.get(at, n)?.is_none_or(|b| b.iter().all(|x| *x == 0)))
    }
}

/// What lies at an offset where a record should start.
enum At {
    /// The end of the records: end of file, or the zero-filled space.
    End,
    /// A record that passes every check; the next one starts at `next`.
    Record { header: RecordHeader, next: u64 },
    /// Something that does not pass. `authentic` when the header's tag
    /// verifies: its length can then be trusted.
    Bad {
        header: Option<RecordHeader>,
        authentic: bool,
    },
}

/// One segment being read.
struct Segment<'a> {
    seq: u64,
    path: &'a Path,
    layout: Layout,
    key: Option<SegmentKey>,
    /// Damage confirmed in this segment.
    damaged: bool,
    skipped: u64,
    /// Skipped records not yet known to be more than a torn tail: that is
    /// decided by whether a valid record follows them.
    suspects: Vec<Suspect>,
    /// Queue ids named by this segment's damage, for its summary line.
    named: Vec<QueueId>,
}

struct Suspect {
    offset: u64,
    about: Option<About>,
}

/// What a skipped record was, when its bounds are known and enough of it
/// can be read.
enum About {
    Message {
        id: QueueId,
        sender: String,
        recipients: Vec<String>,
    },
    /// An `Update` or `Done` record of this message.
    State(QueueId),
}

/// Replay state across all segments, in order.
#[derive(Default)]
pub(super) struct Replay {
    found: Map,
    /// Messages with a `Done` record.
    done: HashSet<QueueId>,
    /// Damaged `Message` records whose metadata could be read.
    damaged_messages: Vec<QueueId>,
    /// Messages whose `Update` or `Done` record was damaged.
    damaged_state: BTreeSet<QueueId>,
    /// `Update` records, after damage was seen, for a message with no
    /// `Message` record: that one may be the damaged record.
    orphans: BTreeSet<QueueId>,
    damage_seen: bool,
    damaged_segments: BTreeSet<u64>,
    skipped: u64,
}

/// What replay found, for [`super::SpoolDamage`].
pub(super) struct Findings {
    pub recovered: Vec<Recovered>,
    pub damaged_segments: BTreeSet<u64>,
    pub skipped_records: u64,
    pub lost: Vec<QueueId>,
    pub redelivery: Vec<QueueId>,
}

impl Replay {
    /// Applies one segment's records. An error means the file could not be
    /// opened; a read error inside it counts as damage to the rest of it.
    pub(super) fn segment(&mut self, path: &Path, seq: u64) -> io::Result<()> {
        let mut r = Reader::new(File::open(path)?)?;
        let head_len = (super::format::SEGMENT_HEADER).min(r.len) as usize;
        let start = match r.get(0, head_len) {
            Ok(b) => read_segment_header(b.unwrap_or_default()),
            Err(e) => {
                self.unreadable(path, seq, &e);
                return Ok(());
            }
        };
        let Some(start) = start else {
            return Ok(());
        };
        let (layout, key, first, damaged) = (start.layout, start.key, start.first, start.damaged);
        if damaged {
            tracing::warn!(segment = %path.display(), "damaged spool segment header; reading its records after it");
        }
        let mut seg = Segment {
            seq,
            path,
            layout,
            key,
            damaged,
            skipped: 0,
            suspects: Vec::new(),
            named: Vec::new(),
        };
        let read = self
            .records(&mut r, &mut seg, first)
            .and_then(|()| self.close(&mut r, &mut seg));
        if let Err(e) = read {
            tracing::error!(segment = %path.display(), error = %e, "cannot read the rest of a spool segment");
            self.confirm(&mut seg);
            seg.damaged = true;
            seg.skipped += 1;
        }
        if seg.damaged {
            self.damage_seen = true;
            self.damaged_segments.insert(seq);
            self.skipped += seg.skipped;
            tracing::error!(
                segment = %path.display(),
                skipped = seg.skipped,
                queue_ids = ?seg.named.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
                "damaged spool segment: {} record(s) skipped, the rest replayed; the segment is kept (moved to corrupt/ once no message needs it)",
                seg.skipped,
            );
        }
        Ok(())
    }

    /// A segment that exists but cannot be opened or read at all.
    pub(super) fn unreadable(&mut self, path: &Path, seq: u64, e: &io::Error) {
        tracing::error!(segment = %path.display(), error = %e, "cannot read a spool segment: its records are not replayed");
        self.damage_seen = true;
        self.damaged_segments.insert(seq);
        self.skipped += 1;
    }

    fn records(&mut self, r: &mut Reader, seg: &mut Segment, first: u64) -> io::Result<()> {
        let h = seg.layout.record_header();
        let mut o = first;
        loop {
            match record_at(r, seg.layout, seg.key.as_ref(), o)? {
                At::Record { header, next } => {
                    self.confirm(seg);
                    let payload = r.get(o + h, header.len as usize)?.expect("checked");
                    self.apply(seg.seq, o + h, header.kind, payload);
                    o = next;
                }
                At::End => {
                    // Zeros where records should be (a lost page) end a
                    // key-less segment, reported when records follow them;
                    // in a keyed one the search goes on.
                    let Some(key) = &seg.key else {
                        if small_record_after(r, seg.layout, o + 1)? {
                            seg.suspects.push(Suspect {
                                offset: o,
                                about: None,
                            });
                        }
                        break;
                    };
                    let Some(p) = search(r, key, o + 1)? else {
                        break;
                    };
                    seg.suspects.push(Suspect {
                        offset: o,
                        about: None,
                    });
                    o = p;
                }
                At::Bad { header, authentic } => {
                    let next = header.map(|hd| o + h + hd.len as u64);
                    let resume = if authentic {
                        next
                    } else if let Some(key) = &seg.key {
                        search(r, key, o + 1)?
                    } else {
                        match next {
                            Some(n) if self.follows(r, seg, n)? => Some(n),
                            _ => None,
                        }
                    };
                    // `o` is where a record starts (reached from the
                    // segment header, a valid record or a verified tag), so
                    // what can be parsed there names it, for the report.
                    // Its payload ends where its length says when reading
                    // resumes there, else at most where reading resumes.
                    let about = match header {
                        Some(hd) => {
                            let start = o + h;
                            let limit = match resume {
                                Some(p) if next == Some(p) => hd.len as u64,
                                Some(p) => p.saturating_sub(start),
                                None => r.len.saturating_sub(start).min(hd.len as u64),
                            };
                            describe(r, start, hd.kind, limit)?
                        }
                        None => None,
                    };
                    seg.suspects.push(Suspect { offset: o, about });
                    match resume {
                        Some(p) => o = p,
                        None => break,
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether a valid record or the clean end is at `at` (the length test
    /// of a key-less segment).
    fn follows(&mut self, r: &mut Reader, seg: &Segment, at: u64) -> io::Result<bool> {
        Ok(matches!(
            record_at(r, seg.layout, None, at)?,
            At::Record { .. } | At::End
        ))
    }

    /// A valid record follows the suspects: they were damage, not a tail.
    fn confirm(&mut self, seg: &mut Segment) {
        if seg.suspects.is_empty() {
            return;
        }
        seg.damaged = true;
        self.damage_seen = true;
        for s in seg.suspects.drain(..) {
            seg.skipped += 1;
            match s.about {
                Some(About::Message {
                    id,
                    sender,
                    recipients,
                }) => {
                    tracing::error!(
                        segment = %seg.path.display(), offset = s.offset, queue_id = %id,
                        sender = %sender, recipients = ?recipients,
                        "damaged message record skipped: this accepted message is not delivered (its record failed its check)"
                    );
                    self.damaged_messages.push(id);
                    seg.named.push(id);
                }
                Some(About::State(id)) => {
                    tracing::warn!(
                        segment = %seg.path.display(), offset = s.offset, queue_id = %id,
                        "damaged recipient-state record skipped: a recipient of this message may be delivered again"
                    );
                    self.damaged_state.insert(id);
                    seg.named.push(id);
                }
                None => tracing::warn!(
                    segment = %seg.path.display(), offset = s.offset,
                    "damaged spool record skipped (unreadable; what it was is unknown)"
                ),
            }
        }
    }

    /// End of a segment: suspects with nothing valid after them are a torn
    /// tail, unless (key-less segments) a record is seen after them that
    /// could not be reached.
    fn close(&mut self, r: &mut Reader, seg: &mut Segment) -> io::Result<()> {
        let Some(first) = seg.suspects.first().map(|s| s.offset) else {
            return Ok(());
        };
        if seg.key.is_none() && small_record_after(r, seg.layout, first + 1)? {
            tracing::error!(segment = %seg.path.display(), offset = first, "records follow an unreadable spool record that cannot be resynchronised safely (segment without a key): the rest of the segment is not replayed");
            self.confirm(seg);
            return Ok(());
        }
        for s in seg.suspects.drain(..) {
            let id = match &s.about {
                Some(About::Message { id, .. } | About::State(id)) => Some(id.to_string()),
                None => None,
            };
            tracing::warn!(segment = %seg.path.display(), offset = s.offset, queue_id = ?id, "torn record at the end of a spool segment ignored (written as the process stopped, never acknowledged)");
        }
        Ok(())
    }

    fn apply(&mut self, seq: u64, payload_at: u64, kind: u8, payload: &[u8]) {
        match kind {
            KIND_MESSAGE => {
                let Some((m, body_start)) = metadata(payload) else {
                    tracing::warn!(
                        segment = seq,
                        offset = payload_at,
                        "unreadable message record skipped"
                    );
                    return;
                };
                self.found.insert(Recovered {
                    id: m.id,
                    envelope: m.envelope,
                    recipients: m.recipients,
                    body: BodyLoc {
                        segment: seq,
                        offset: payload_at + body_start as u64,
                        len: (payload.len() - body_start) as u64,
                    },
                });
            }
            KIND_UPDATE => {
                let Ok(u) = serde_json::from_slice::<StoredUpdate>(payload) else {
                    return;
                };
                match self.found.get_mut(&u.id) {
                    Some(m) => {
                        if let Some(slot) = m.recipients.get_mut(u.index) {
                            *slot = u.recipient;
                        }
                    }
                    // Normal once a message's first segment is deleted after
                    // compaction; after damage, its message record may be
                    // the one lost.
                    None if self.damage_seen && !self.done.contains(&u.id) => {
                        self.orphans.insert(u.id);
                    }
                    None => {}
                }
            }
            KIND_DONE => {
                if let Some(b) = payload.get(..16) {
                    let id = QueueId(u128::from_le_bytes(b.try_into().expect("16")));
                    self.found.remove(&id);
                    self.done.insert(id);
                }
            }
            _ => tracing::warn!(
                segment = seq,
                offset = payload_at,
                kind,
                "unknown spool record kind"
            ),
        }
    }

    pub(super) fn finish(self) -> Findings {
        let live: HashSet<QueueId> = self.found.ids().collect();
        let mut lost: Vec<QueueId> = self
            .damaged_messages
            .iter()
            .chain(&self.orphans)
            .filter(|id| !live.contains(id) && !self.done.contains(id))
            .copied()
            .collect();
        lost.sort_unstable();
        lost.dedup();
        let redelivery = self
            .damaged_state
            .iter()
            .filter(|id| live.contains(id))
            .copied()
            .collect();
        Findings {
            recovered: self.found.into_values(),
            damaged_segments: self.damaged_segments,
            skipped_records: self.skipped,
            lost,
            redelivery,
        }
    }
}

fn record_at(r: &mut Reader, layout: Layout, key: Option<&SegmentKey>, o: u64) -> io::Result<At> {
    let h = layout.record_header();
    let Some(bytes) = r.get(o, h as usize)? else {
        return Ok(if r.rest_is_zero(o)? {
            At::End
        } else {
            At::Bad {
                header: None,
                authentic: false,
            }
        });
    };
    if bytes.iter().all(|b| *b == 0) {
        return Ok(At::End);
    }
    let header = RecordHeader::parse(bytes);
    let authentic = key.is_some_and(|k| k.verifies(bytes, o));
    let bad = At::Bad {
        header: Some(header),
        authentic,
    };
    if key.is_some() && !authentic {
        return Ok(bad);
    }
    let next = o + h + header.len as u64;
    // A length past the end of the file is checked before anything is
    // allocated for it (it may say up to 4 GiB).
    if next > r.len {
        return Ok(bad);
    }
    let payload = r.get(o + h, header.len as usize)?.expect("within the file");
    if !header.crc_matches(payload) {
        return Ok(bad);
    }
    Ok(At::Record { header, next })
}

/// The first offset from `from` on where a record header written by the
/// spool starts (its tag verifies with the segment key).
fn search(r: &mut Reader, key: &SegmentKey, from: u64) -> io::Result<Option<u64>> {
    let h = Layout::V2.record_header();
    let mut p = from;
    while p + h <= r.len {
        let n = (r.len - p).min(WINDOW as u64 + h) as usize;
        let len = r.len;
        let chunk = r.get(p, n)?.expect("within the file");
        let last = n - h as usize;
        for i in 0..=last {
            let hd = &chunk[i..i + h as usize];
            // Cheap tests first: a known kind, a length that fits.
            if !(KIND_MESSAGE..=KIND_DONE).contains(&hd[8]) {
                continue;
            }
            let at = p + i as u64;
            let rec_len = u32::from_le_bytes(hd[0..4].try_into().expect("4 bytes")) as u64;
            if at + h + rec_len > len {
                continue;
            }
            if key.verifies(hd, at) {
                return Ok(Some(at));
            }
        }
        p += last as u64 + 1;
    }
    Ok(None)
}

/// Whether a small valid record starts anywhere from `from` on (key-less
/// segments: tells damage from a torn tail; what it finds is not replayed).
fn small_record_after(r: &mut Reader, layout: Layout, from: u64) -> io::Result<bool> {
    let h = layout.record_header();
    let mut p = from;
    while p + h <= r.len {
        let n = (r.len - p).min(WINDOW as u64 + h) as usize;
        let len = r.len;
        let chunk = r.get(p, n)?.expect("within the file");
        let last = n - h as usize;
        let candidates: Vec<(u64, RecordHeader)> = (0..=last)
            .filter_map(|i| {
                let hd = RecordHeader::parse(&chunk[i..]);
                let at = p + i as u64;
                ((KIND_MESSAGE..=KIND_DONE).contains(&hd.kind)
                    && hd.len <= SMALL_RECORD
                    && at + h + hd.len as u64 <= len)
                    .then_some((at, hd))
            })
            .collect();
        for (at, hd) in candidates {
            let payload = r.get(at + h, hd.len as usize)?.expect("within the file");
            if hd.crc_matches(payload) {
                return Ok(true);
            }
        }
        p += last as u64 + 1;
    }
    Ok(false)
}

/// Names a skipped record from what can still be parsed of its payload
/// (at `at`, at most `limit` bytes). Only for reporting: nothing of it is
/// delivered, and a name that is not a queued message is dropped later.
fn describe(r: &mut Reader, at: u64, kind: u8, limit: u64) -> io::Result<Option<About>> {
    let limit = limit.min(r.len.saturating_sub(at)) as usize;
    Ok(match kind {
        KIND_MESSAGE => {
            let Some(meta_len) = r
                .get(at, 4)?
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
                .filter(|m| m.saturating_add(4) <= limit)
            else {
                return Ok(None);
            };
            r.get(at + 4, meta_len)?
                .and_then(|meta| serde_json::from_slice::<StoredMessage>(meta).ok())
                .map(|m| About::Message {
                    id: m.id,
                    sender: m.envelope.sender,
                    recipients: m.recipients.into_iter().map(|x| x.address).collect(),
                })
        }
        // The first JSON value: the length may be a bound, not the size.
        KIND_UPDATE => r.get(at, limit.min(SMALL_RECORD as usize))?.and_then(|p| {
            serde_json::Deserializer::from_slice(p)
                .into_iter::<StoredUpdate>()
                .next()
                .and_then(Result::ok)
                .map(|u| About::State(u.id))
        }),
        KIND_DONE if limit >= 16 => r
            .get(at, 16)?
            .map(|b| About::State(QueueId(u128::from_le_bytes(b.try_into().expect("16"))))),
        _ => None,
    })
}

/// The metadata of a `Message` record and where its body starts.
fn metadata(payload: &[u8]) -> Option<(StoredMessage, usize)> {
    let meta_len = u32::from_le_bytes(payload.get(..4)?.try_into().expect("4 bytes")) as usize;
    let meta = payload.get(4..4usize.checked_add(meta_len)?)?;
    let m = serde_json::from_slice::<StoredMessage>(meta).ok()?;
    Some((m, 4 + meta_len))
}

/// A map that remembers insertion order, so recovered messages come back in
/// arrival order.
#[derive(Default)]
struct Map {
    order: Vec<QueueId>,
    items: HashMap<QueueId, Recovered>,
}

impl Map {
    fn insert(&mut self, r: Recovered) {
        if !self.items.contains_key(&r.id) {
            self.order.push(r.id);
        }
        self.items.insert(r.id, r);
    }
    fn get_mut(&mut self, id: &QueueId) -> Option<&mut Recovered> {
        self.items.get_mut(id)
    }
    fn remove(&mut self, id: &QueueId) {
        self.items.remove(id);
    }
    fn ids(&self) -> impl Iterator<Item = QueueId> + '_ {
        self.items.keys().copied()
    }
    fn into_values(mut self) -> Vec<Recovered> {
        self.order
            .iter()
            .filter_map(|id| self.items.remove(id))
            .collect()
    }
}
