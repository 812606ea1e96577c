//! The spool's bytes on disk: segment names, segment headers and record
//! framing. Format 2 is written; format 1 is still read, so that segments
//! written before an upgrade are replayed.
//!
//! Format 2 segment header (48 bytes):
//! `"HRLDSPL2" | key[16] | crc32("HRLDSPL2" ‖ key) | key[16] | crc32(…)`.
//! The key is random per segment and never leaves the file; it is written
//! twice so that one damaged copy does not make the segment unreadable.
//!
//! Format 2 record (17-byte header):
//! `len: u32 LE | crc32(kind ‖ payload): u32 LE | kind: u8 | tag[8] | payload[len]`,
//! where `tag` is BLAKE2b-MAC-64 keyed with the segment key over
//! `len ‖ crc ‖ kind ‖ offset of the record (u64 LE)`. The CRC finds damage
//! in the payload; the tag proves that a header was written by the spool
//! at that very offset. A message body is arbitrary bytes from the network
//! and may hold something shaped like a record, but without the key nobody
//! can make a tag that verifies (2^-64 per try), so a replay that searches
//! for the next record after a damaged one never stops inside a body.
//!
//! Format 1: header `"HRLDSPL1"`, records `len | crc32(kind ‖ payload) | kind |
//! payload` (9-byte header), no key: a record found by searching could be
//! one embedded in a body, so format 1 is only read by following lengths.

use blake2::Blake2bMac;
use blake2::digest::consts::U8;
use blake2::digest::{KeyInit, Mac};

pub(super) const SEGMENT_PREFIX: &str = "seg-";
pub(super) const SEGMENT_SUFFIX: &str = ".log";

pub(super) const MAGIC_V1: &[u8; 8] = b"HRLDSPL1";
pub(super) const MAGIC_V2: &[u8; 8] = b"HRLDSPL2";
const KEY_LEN: usize = 16;
/// One copy of the key with its CRC.
const KEY_COPY: usize = KEY_LEN + 4;
/// Length of a format 2 segment header: where its first record starts.
pub const SEGMENT_HEADER: u64 = (MAGIC_V2.len() + 2 * KEY_COPY) as u64;

pub(super) const KIND_MESSAGE: u8 = 1;
pub(super) const KIND_UPDATE: u8 = 2;
pub(super) const KIND_DONE: u8 = 3;

/// How records are framed in a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    V1,
    V2,
}

impl Layout {
    /// Length of a record header.
    pub fn record_header(self) -> u64 {
        match self {
            Layout::V1 => 9,
            Layout::V2 => 17,
        }
    }
}

/// A record header as read, not yet checked.
#[derive(Clone, Copy, Debug)]
pub(super) struct RecordHeader {
    pub len: u32,
    pub crc: u32,
    pub kind: u8,
}

impl RecordHeader {
    pub(super) fn parse(bytes: &[u8]) -> RecordHeader {
        RecordHeader {
            len: u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes")),
            crc: u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes")),
            kind: bytes[8],
        }
    }

    /// Whether `payload` is what this header's CRC was computed over.
    pub(super) fn crc_matches(&self, payload: &[u8]) -> bool {
        crc(self.kind, payload) == self.crc
    }
}

fn crc(kind: u8, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(payload);
    h.finalize()
}

/// A segment's secret: keys the tag of each of its records.
#[derive(Clone)]
pub struct SegmentKey {
    bytes: [u8; KEY_LEN],
    mac: Blake2bMac<U8>,
}

impl SegmentKey {
    pub(super) fn random() -> SegmentKey {
        SegmentKey::from_bytes(rand::random())
    }

    fn from_bytes(bytes: [u8; KEY_LEN]) -> SegmentKey {
        SegmentKey {
            bytes,
            mac: <Blake2bMac<U8> as KeyInit>::new_from_slice(&bytes).expect("16-byte key"),
        }
    }

    /// The tag of a format 2 record header (its first 9 bytes) at `offset`.
    fn tag(&self, header: &[u8], offset: u64) -> [u8; 8] {
        let mut mac = self.mac.clone();
        mac.update(&header[..9]);
        mac.update(&offset.to_le_bytes());
        mac.finalize().into_bytes().into()
    }

    /// Writes the tag of a framed record that goes at `offset`.
    pub fn seal(&self, record: &mut [u8], offset: u64) {
        let tag = self.tag(record, offset);
        record[9..17].copy_from_slice(&tag);
    }

    /// Whether a format 2 record header was written by the spool at `offset`.
    pub(super) fn verifies(&self, header: &[u8], offset: u64) -> bool {
        header.len() >= 17 && self.tag(header, offset) == header[9..17]
    }

    /// The segment header that carries this key.
    pub(super) fn segment_header(&self) -> [u8; SEGMENT_HEADER as usize] {
        let mut out = [0u8; SEGMENT_HEADER as usize];
        out[..8].copy_from_slice(MAGIC_V2);
        let copy = key_copy(&self.bytes);
        out[8..8 + KEY_COPY].copy_from_slice(&copy);
        out[8 + KEY_COPY..].copy_from_slice(&copy);
        out
    }
}

fn key_copy(key: &[u8; KEY_LEN]) -> [u8; KEY_COPY] {
    let mut h = crc32fast::Hasher::new();
    h.update(MAGIC_V2);
    h.update(key);
    let mut out = [0u8; KEY_COPY];
    out[..KEY_LEN].copy_from_slice(key);
    out[KEY_LEN..].copy_from_slice(&h.finalize().to_le_bytes());
    out
}

/// What a segment's first bytes say about how to read it.
pub struct SegmentStart {
    pub layout: Layout,
    /// The key, when the records' tags can be checked.
    pub key: Option<SegmentKey>,
    /// Offset of the first record.
    pub first: u64,
    /// The header was damaged (its records may still be readable).
    pub damaged: bool,
}

/// Reads a segment header from the first bytes of a file (up to
/// [`SEGMENT_HEADER`] of them; fewer when the file is shorter). `None` when
/// they are all zeros, or there are none: a crash while the segment was
/// being created, and it holds no record.
pub fn read_segment_header(bytes: &[u8]) -> Option<SegmentStart> {
    if bytes.iter().all(|b| *b == 0) {
        return None;
    }
    let magic = bytes.get(..8);
    // Either copy of the key proves the segment is format 2, even when the
    // magic itself is what was damaged.
    let key = [8, 8 + KEY_COPY].into_iter().find_map(|at| {
        let copy: [u8; KEY_COPY] = bytes.get(at..at + KEY_COPY)?.try_into().ok()?;
        let key: [u8; KEY_LEN] = copy[..KEY_LEN].try_into().ok()?;
        (key_copy(&key) == copy).then_some(key)
    });
    let both_copies =
        bytes.get(8..8 + KEY_COPY) == bytes.get(8 + KEY_COPY..SEGMENT_HEADER as usize);
    Some(match (magic, key) {
        (Some(m), Some(key)) => SegmentStart {
            layout: Layout::V2,
            key: Some(SegmentKey::from_bytes(key)),
            first: SEGMENT_HEADER,
            damaged: m != MAGIC_V2 || !both_copies,
        },
        (Some(m), None) if m == MAGIC_V1 => SegmentStart {
            layout: Layout::V1,
            key: None,
            first: MAGIC_V1.len() as u64,
            damaged: false,
        },
        // Format 2 whose key cannot be read: its records are read by their
        // lengths and CRCs only, as format 1 ones are.
        (Some(m), None) if m == MAGIC_V2 => SegmentStart {
            layout: Layout::V2,
            key: None,
            first: SEGMENT_HEADER,
            damaged: true,
        },
        // A damaged magic and no key: format 1, whose header is the magic
        // alone; reading resumes after it.
        _ => SegmentStart {
            layout: Layout::V1,
            key: None,
            first: MAGIC_V1.len() as u64,
            damaged: true,
        },
    })
}

/// A record in format 2 with an empty tag; the writer seals it once its
/// offset is known.
pub(super) fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(Layout::V2.record_header() as usize + payload.len());
    out.resize(Layout::V2.record_header() as usize, 0);
    out.extend_from_slice(payload);
    frame_parts(kind, &mut out, &[]);
    out
}

/// Fills in the header of a record whose payload is what follows the room
/// left for the header in `head`, then `rest` (a message's body, written
/// from where it is rather than copied).
pub fn frame_parts(kind: u8, head: &mut [u8], rest: &[u8]) {
    let header = Layout::V2.record_header() as usize;
    let (h, first) = head.split_at_mut(header);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&[kind]);
    crc.update(first);
    crc.update(rest);
    h[..4].copy_from_slice(&((first.len() + rest.len()) as u32).to_le_bytes());
    h[4..8].copy_from_slice(&crc.finalize().to_le_bytes());
    h[8] = kind;
    h[9..].fill(0);
}

/// The same record in format 1 (tests build old segments with it).
#[cfg(test)]
pub(super) fn frame_v1(v2: &[u8]) -> Vec<u8> {
    let mut out = v2[..9].to_vec();
    out.extend_from_slice(&v2[17..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tag_is_bound_to_its_key_offset_and_header() {
        let key = SegmentKey::random();
        let mut rec = frame(KIND_DONE, &[7u8; 16]);
        key.seal(&mut rec, 48);
        assert!(key.verifies(&rec[..17], 48));
        assert!(!key.verifies(&rec[..17], 49), "another offset");
        assert!(
            !SegmentKey::random().verifies(&rec[..17], 48),
            "another key"
        );
        for i in 0..9 {
            let mut bad = rec.clone();
            bad[i] ^= 1;
            assert!(!key.verifies(&bad[..17], 48), "byte {i} changed");
        }
    }

    #[test]
    fn segment_header_survives_damage_to_its_magic_or_one_key_copy() {
        let key = SegmentKey::random();
        let header = key.segment_header();
        for at in [0, 3, 8, 20, 27, 28, 40, 47] {
            let mut bad = header;
            bad[at] ^= 0x40;
            let start = read_segment_header(&bad).expect("not blank");
            assert_eq!(
                (start.layout, start.first, start.damaged),
                (Layout::V2, SEGMENT_HEADER, true)
            );
            assert_eq!(start.key.expect("key kept").bytes, key.bytes, "byte {at}");
        }
        let start = read_segment_header(&header).expect("not blank");
        assert!(!start.damaged && start.key.is_some());
        assert!(read_segment_header(&[0u8; 48]).is_none());
        assert!(read_segment_header(&[]).is_none());
    }
}
