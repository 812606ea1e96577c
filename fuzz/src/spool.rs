//! `spool_replay`: the spool as herald finds it at start-up. The input is
//! written into a fresh spool directory as segment 1 and as the history
//! file, and the queue is opened on it with [`Queue::open`], the same call
//! `herald serve` makes: segment replay, the records' JSON, recovery of the
//! recipients' states and timers, and the history's JSON lines all read it.
//! The oracle: no panic, no allocation the input does not pay for (run with
//! `-rss_limit_mb`), and no more messages than the input has records.
//!
//! Herald writes segment format 2: the magic `HRLDSPL2` and a random
//! 16-byte key (twice, each copy with a CRC-32), then records whose 17-byte
//! header holds the length, a CRC-32 of kind and payload, the kind, and an
//! 8-byte tag (BLAKE2b-MAC-64, keyed with the segment key, over the first 9
//! header bytes and the record's offset). Format 1 (`HRLDSPL1`, 9-byte
//! headers, CRC only) is still read. A mutation almost always breaks a CRC
//! or a tag, and replay skips such a record; so a second copy of the input,
//! with every record re-framed, goes in as segment 2 and the fuzzer reaches
//! the record decoders too. [`with_crcs`] reads the input's header with
//! herald's own `read_segment_header` (which decides the layout and finds
//! the key, as replay does), follows the records' lengths, and for format 2
//! recomputes each CRC with the writer's `frame_parts` and each tag with
//! `SegmentKey::seal` under the key in the input; for format 1, and for a
//! format 2 segment whose key copies are both damaged (read by CRC alone),
//! it recomputes the CRCs only. Input with neither magic nor a readable key
//! is, as for replay, format 1 with a damaged header, so its CRCs are fixed
//! too (the target before format 2 left such input alone).

use std::path::Path;
use std::sync::OnceLock;

use bytes::Bytes;
use herald::clock::unix_now;
use herald::config::Config;
use herald::envelope::{Envelope, Notify, QueueId, Recipient, Ret};
use herald::queue::spool::format::{self, Layout, SEGMENT_HEADER, SegmentStart};
use herald::queue::{AttemptResult, Queue, RcptOutcome};
use herald::reply::{Enhanced, Reply};
use herald::report::{Reason, Reporter};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;

/// Segment files as the writer names them (`src/queue/spool.rs`).
fn segment_name(seq: u64) -> String {
    format!("seg-{seq:016}.log")
}
const HISTORY: &str = "history.jsonl";

/// The shortest record header (format 1), for the oracle's bound.
const MIN_RECORD_HEADER: usize = 9;

struct Env {
    rt: Runtime,
    config: Config,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| Env {
        rt: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime"),
        config: Config::from_toml_str(
            "[[listener]]\naddress = \"127.0.0.1:0\"\n[events]\nlog = \"/dev/null\"\n",
        )
        .unwrap_or_else(|e| panic!("{e}")),
    })
}

fn scratch() -> tempfile::TempDir {
    // tmpfs when there is one: opening a spool fsyncs a new head segment.
    let shm = Path::new("/dev/shm");
    let b = tempfile::Builder::new()
        .prefix("herald-fuzz-spool-")
        .to_owned();
    if shm.is_dir() {
        b.tempdir_in(shm)
    } else {
        b.tempdir()
    }
    .expect("temporary directory")
}

pub fn run(data: &[u8]) {
    let env = env();
    let dir = scratch();
    let spool = dir.path().join("spool");
    std::fs::create_dir_all(&spool).expect("spool dir");
    std::fs::write(spool.join(segment_name(1)), data).expect("write segment");
    if let Some(fixed) = with_crcs(data) {
        std::fs::write(spool.join(segment_name(2)), fixed).expect("write segment");
    }
    std::fs::write(spool.join(HISTORY), data).expect("write history");

    let mut config = env.config.clone();
    config.server.spool_dir = spool;
    let _rt = env.rt.enter();
    let (jobs, _jobs) = mpsc::unbounded_channel();
    let Ok(queue) = Queue::open(&config, Reporter::discard(), jobs) else {
        return;
    };
    let records = data.len() / MIN_RECORD_HEADER;
    assert!(
        queue.len() <= 2 * records,
        "{} messages from {} bytes",
        queue.len(),
        data.len()
    );
    for m in queue.list() {
        assert!(queue.find(m.id).is_some());
    }
    let _ = queue.waiting_by_domain();
    // Stop the writer before the directory goes.
    env.rt.block_on(queue.close());
}

/// How replay will read `segment`: its layout, key and first record, from
/// herald's own header reader. `None` for an empty or all-zero start.
fn segment_start(segment: &[u8]) -> Option<SegmentStart> {
    format::read_segment_header(&segment[..segment.len().min(SEGMENT_HEADER as usize)])
}

/// Where the records of `segment` lie, found by following their lengths
/// from the first one: `(start of header, end of payload)` each. Stops at an
/// all-zero header (the writer keeps zeros after the last record) or at a
/// record that would pass the end.
fn record_bounds(segment: &[u8], start: &SegmentStart) -> Vec<(usize, usize)> {
    let h = start.layout.record_header() as usize;
    let mut out = Vec::new();
    let mut pos = start.first as usize;
    while let Some(header) = segment.get(pos..pos + h) {
        if header.iter().all(|&b| b == 0) {
            break;
        }
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        let Some(end) = (pos + h).checked_add(len).filter(|&e| e <= segment.len()) else {
            break;
        };
        out.push((pos, end));
        pos = end;
    }
    out
}

/// `data` with every record made right as the writer would have framed it
/// there, when it is a segment and anything changed: in format 2 the CRC
/// (`frame_parts`) and, when the header's key can be read, the tag under
/// that key (`SegmentKey::seal`, bound to the record's offset); in format 1
/// and in a format 2 segment with no readable key, the CRC.
pub fn with_crcs(data: &[u8]) -> Option<Vec<u8>> {
    let start = segment_start(data)?;
    let mut out = data.to_vec();
    for (pos, end) in record_bounds(data, &start) {
        let record = &mut out[pos..end];
        match start.layout {
            Layout::V1 => {
                // `len | crc32(kind ‖ payload) | kind | payload`.
                let crc = crc32fast::hash(&record[8..]);
                record[4..8].copy_from_slice(&crc.to_le_bytes());
            }
            Layout::V2 => {
                // Keeps the length and kind, sets the CRC, zeroes the tag.
                format::frame_parts(record[8], record, &[]);
                if let Some(key) = &start.key {
                    key.seal(record, pos as u64);
                }
            }
        }
    }
    (out != data).then_some(out)
}

/// Where the records of a segment end (the writer keeps zeros after them).
fn records_end(segment: &[u8]) -> usize {
    let Some(start) = segment_start(segment) else {
        return 0;
    };
    record_bounds(segment, &start)
        .last()
        .map_or(start.first as usize, |&(_, end)| end)
        .min(segment.len())
}

fn envelope(sender: &str) -> Envelope {
    Envelope {
        sender: sender.into(),
        tenant: Some("acme".into()),
        message_id: Some("<seed@acme.test>".into()),
        received_at: unix_now(),
        client_ip: "127.0.0.1".parse().expect("IP"),
        smtputf8: true,
        body_8bit: true,
        ret: Some(Ret::Full),
        env_id: Some("env-1".into()),
        require_tls: true,
        ignore_tls_policies: false,
    }
}

/// Segments and a history file written by the current queue: two messages
/// queued; then one recipient deferred, one delivered, one bounced, so
/// that update and done records follow.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let env = env();
    let dir = scratch();
    let mut config = env.config.clone();
    config.server.spool_dir = dir.path().join("spool");
    let read_segments = |config: &Config| -> Vec<u8> {
        let mut names: Vec<_> = std::fs::read_dir(&config.server.spool_dir)
            .expect("spool dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("seg-"))
            .collect();
        names.sort();
        let seg = std::fs::read(
            config
                .server
                .spool_dir
                .join(names.last().expect("a segment")),
        )
        .expect("read segment");
        seg[..records_end(&seg)].to_vec()
    };
    env.rt.block_on(async {
        let (jobs, _jobs) = mpsc::unbounded_channel();
        let queue = Queue::open(&config, Reporter::discard(), jobs).expect("queue");
        let one = QueueId(0x0123_4567_89ab_cdef_0001);
        let two = QueueId(0x0123_4567_89ab_cdef_0002);
        let mut r = Recipient::new("b\u{fc}ro@example.test".into());
        r.notify = Notify {
            failure: true,
            delay: true,
            ..Notify::default()
        };
        r.orcpt = Some("rfc822;buero@example.test".into());
        let rcpts = vec![r, Recipient::new("bob@example.test".into())];
        queue
            .enqueue(
                one,
                envelope("billing@acme.test"),
                rcpts,
                Bytes::from_static(b"Subject: one\r\n\r\nfirst\r\n"),
            )
            .await
            .expect("enqueue");
        queue
            .enqueue(
                two,
                envelope(""),
                vec![Recipient::new("carol@example.test".into())],
                Bytes::from_static(b"Subject: two\r\n\r\n.second\r\n"),
            )
            .await
            .expect("enqueue");
        let queued = read_segments(&config);
        let outcome = |index, result| RcptOutcome {
            index,
            result,
            mx: Some("mx.example.test".into()),
            tls: Some(herald::event::TlsInfo {
                version: "TLSv1.3".into(),
                cipher: "TLS_AES_256_GCM_SHA384".into(),
                verified: "none".into(),
                policy: None,
                policy_failure: None,
            }),
            next_hop_dsn: true,
        };
        let later = Reply::new(451, Enhanced(4, 7, 1), "greylisted, try again");
        let gone = Reply::new(550, Enhanced(5, 1, 1), "no such user");
        queue.complete_attempt(
            one,
            vec![
                outcome(0, AttemptResult::Deferred(later, Reason::Policy)),
                outcome(1, AttemptResult::Bounced(gone, Reason::UserUnknown)),
            ],
        );
        queue.complete_attempt(
            two,
            vec![outcome(
                0,
                AttemptResult::Delivered(Reply::new(250, Enhanced(2, 0, 0), "ok")),
            )],
        );
        queue.close().await;
        let updated = read_segments(&config);
        let history = std::fs::read(config.server.spool_dir.join(HISTORY)).unwrap_or_default();
        let mut seeds = vec![
            ("segment-queued".to_string(), queued),
            ("segment-updated".to_string(), updated),
        ];
        if !history.is_empty() {
            seeds.push(("history".to_string(), history));
        }
        seeds
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The senders of the messages replayed from `segments` (segments 1,
    /// 2, … of a fresh spool), in queue id order.
    fn replayed(segments: &[&[u8]]) -> Vec<String> {
        let env = env();
        let dir = scratch();
        let spool = dir.path().join("spool");
        std::fs::create_dir_all(&spool).expect("spool dir");
        for (seq, data) in (1..).zip(segments) {
            std::fs::write(spool.join(segment_name(seq)), data).expect("write segment");
        }
        let mut config = env.config.clone();
        config.server.spool_dir = spool;
        let _rt = env.rt.enter();
        let (jobs, _jobs) = mpsc::unbounded_channel();
        let queue = Queue::open(&config, Reporter::discard(), jobs).expect("queue");
        let senders = queue
            .list()
            .into_iter()
            .map(|m| m.envelope.sender)
            .collect();
        env.rt.block_on(queue.close());
        senders
    }

    fn queued_seed() -> Vec<u8> {
        seeds()
            .into_iter()
            .find(|(name, _)| name == "segment-queued")
            .expect("seed")
            .1
    }

    /// `data` with the first `billing@` spelt `Billing@`.
    fn changed(mut data: Vec<u8>) -> Vec<u8> {
        let at = data
            .windows(8)
            .position(|w| w == b"billing@")
            .expect("sender in the segment");
        data[at] = b'B';
        data
    }

    #[test]
    fn a_changed_format_2_record_is_replayed_from_the_fixed_copy() {
        let queued = queued_seed();
        assert!(queued.starts_with(b"HRLDSPL2"));
        assert_eq!(replayed(&[&queued]), ["billing@acme.test", ""]);
        let bad = changed(queued);
        // CRC broken: replay skips the record.
        assert_eq!(replayed(&[&bad]), [""]);
        let fixed = with_crcs(&bad).expect("a record fixed");
        assert_eq!(replayed(&[&fixed]), ["Billing@acme.test", ""]);
    }

    #[test]
    fn a_changed_format_1_record_is_replayed_from_the_fixed_copy() {
        // The same records framed in format 1: magic, then each header's
        // first 9 bytes (no tag) and the payload.
        let queued = queued_seed();
        let start = segment_start(&queued).expect("segment");
        let mut v1 = b"HRLDSPL1".to_vec();
        for (pos, end) in record_bounds(&queued, &start) {
            v1.extend_from_slice(&queued[pos..pos + 9]);
            v1.extend_from_slice(&queued[pos + 17..end]);
        }
        assert_eq!(replayed(&[&v1]), ["billing@acme.test", ""]);
        let bad = changed(v1);
        assert_eq!(replayed(&[&bad]), [""]);
        let fixed = with_crcs(&bad).expect("a record fixed");
        assert_eq!(replayed(&[&fixed]), ["Billing@acme.test", ""]);
    }
}
