//! `spool_replay`: the spool as herald finds it at start-up. The input is
//! written into a fresh spool directory as segment 1 and as the history
//! file, and the queue is opened on it with [`Queue::open`], the same call
//! `herald serve` makes: segment replay, the records' JSON, recovery of the
//! recipients' states and timers, and the history's JSON lines all read it.
//! The oracle: no panic, no allocation the input does not pay for (run with
//! `-rss_limit_mb`), and no more messages than the input has records.
//!
//! Every record carries a CRC-32, which a mutation almost always breaks; so
//! when the input starts with the current segment magic, a copy with its
//! CRCs recomputed goes in as segment 2 and the fuzzer reaches the record
//! decoders too. That copy is the one place that knows the layout; under
//! another layout it is simply not made, and segment 1 still is.

use std::path::Path;
use std::sync::OnceLock;

use bytes::Bytes;
use herald::clock::unix_now;
use herald::config::Config;
use herald::envelope::{Envelope, Notify, QueueId, Recipient, Ret};
use herald::queue::{AttemptResult, Queue, RcptOutcome};
use herald::reply::{Enhanced, Reply};
use herald::report::{Classification, Reporter};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;

/// Segment files as the writer names them (`src/queue/spool.rs`).
fn segment_name(seq: u64) -> String {
    format!("seg-{seq:016}.log")
}
const HISTORY: &str = "history.jsonl";

/// Segment layout 1: magic, then `len: u32 LE | crc32(kind ‖ payload): u32
/// LE | kind: u8 | payload[len]` per record, zeros after the last.
const MAGIC_V1: &[u8] = b"HRLDSPL1";
const RECORD_HEADER: usize = 9;

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
    let records = data.len() / RECORD_HEADER;
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

/// `data` with every record's CRC made right, when it is a layout-1
/// segment and any CRC was wrong.
pub fn with_crcs(data: &[u8]) -> Option<Vec<u8>> {
    if !data.starts_with(MAGIC_V1) {
        return None;
    }
    let mut out = data.to_vec();
    let mut pos = MAGIC_V1.len();
    while let Some(header) = out.get(pos..pos + RECORD_HEADER) {
        if header.iter().all(|&b| b == 0) {
            break;
        }
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        let Some(end) = (pos + RECORD_HEADER)
            .checked_add(len)
            .filter(|&e| e <= out.len())
        else {
            break;
        };
        let crc = crc32fast::hash(&out[pos + 8..end]);
        out[pos + 4..pos + 8].copy_from_slice(&crc.to_le_bytes());
        pos = end;
    }
    (out != data).then_some(out)
}

/// Where the records of a layout-1 segment end (the writer keeps zeros
/// after them).
fn records_end(segment: &[u8]) -> usize {
    let mut pos = MAGIC_V1.len();
    while let Some(header) = segment.get(pos..pos + RECORD_HEADER) {
        if header.iter().all(|&b| b == 0) {
            break;
        }
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        match (pos + RECORD_HEADER).checked_add(len) {
            Some(end) if end <= segment.len() => pos = end,
            _ => break,
        }
    }
    pos.min(segment.len())
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
            tls: Some("TLSv1.3".into()),
            next_hop_dsn: true,
        };
        let later = Reply::new(451, Enhanced(4, 7, 1), "greylisted, try again");
        let gone = Reply::new(550, Enhanced(5, 1, 1), "no such user");
        queue.complete_attempt(
            one,
            vec![
                outcome(0, AttemptResult::Deferred(later, Classification::Policy)),
                outcome(
                    1,
                    AttemptResult::Bounced(gone, Classification::InvalidRecipient),
                ),
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
