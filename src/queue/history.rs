//! What became of messages that have left the queue, for a while
//! (`[history] retention`): the status API answers for finished messages,
//! a late bounce finds the recipient its VERP token names, and a tenant's
//! Message-ID maps to the queue id it was first accepted under
//! (idempotent submission, `[history] idempotency_window`).
//!
//! Finished messages are kept in memory and appended as JSON lines to
//! `history.jsonl` in the spool directory by one writer thread, off the
//! queue's lock. The file is a convenience, not a promise: it is not
//! fsynced, and a crash may lose its last lines (the events log has every
//! outcome). When the oldest entry in the file passes the retention, the
//! file becomes `history.old.jsonl` (replacing the previous one), so the
//! disk holds at most about two retention periods.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::mpsc;

use serde::{Deserialize, Serialize};

use super::message::{Envelope, QueueId, Recipient};

const FILE: &str = "history.jsonl";
const OLD_FILE: &str = "history.old.jsonl";

/// A message that has left the queue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Finished {
    pub id: QueueId,
    pub envelope: Envelope,
    pub recipients: Vec<Recipient>,
    pub size: u64,
    /// Unix seconds.
    pub finished_at: u64,
}

/// How long, and how much, is kept.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub retention_secs: u64,
    pub max_messages: usize,
    /// A tenant's Message-ID seen within this many seconds is a duplicate;
    /// 0 = idempotent submission off.
    pub idempotency_secs: u64,
}

pub struct History {
    inner: Mutex<Inner>,
    limits: Limits,
    /// Lines for the writer thread: (JSON, finished_at).
    writer: Option<mpsc::Sender<Line>>,
}

type Line = (String, u64);

#[derive(Default)]
struct Inner {
    by_id: HashMap<QueueId, Finished>,
    /// Finished messages, oldest first: (finished_at, id).
    order: VecDeque<(u64, QueueId)>,
    /// (tenant, Message-ID) → (queue id, accepted at), for live and
    /// finished messages within the idempotency window.
    by_message_id: HashMap<(String, String), (QueueId, u64)>,
    /// Index keys in acceptance order, for expiry.
    id_order: VecDeque<(u64, (String, String))>,
}

/// The key a Message-ID is indexed under: the tenant (or "" for trusted
/// networks) and the Message-ID as written, without surrounding space.
fn key(tenant: Option<&str>, message_id: &str) -> (String, String) {
    (
        tenant.unwrap_or_default().to_string(),
        message_id.trim().to_string(),
    )
}

impl History {
    /// Loads what `dir` holds within the retention and starts the writer.
    pub fn open(dir: &Path, limits: Limits, now: u64) -> std::io::Result<History> {
        let mut found: Vec<Finished> = Vec::new();
        for name in [OLD_FILE, FILE] {
            let path = dir.join(name);
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            // A torn last line (crash mid-write) is skipped, not fatal.
            for line in BufReader::new(file).lines() {
                let Ok(line) = line else { break };
                if let Ok(f) = serde_json::from_str::<Finished>(&line)
                    && now.saturating_sub(f.finished_at) < limits.retention_secs
                {
                    found.push(f);
                }
            }
        }
        found.sort_by_key(|f| f.finished_at);
        let first_in_file = found.first().map(|f| f.finished_at);
        let history = History {
            inner: Mutex::new(Inner::default()),
            limits,
            writer: Some(start_writer(
                dir.to_path_buf(),
                first_in_file,
                limits.retention_secs,
            )?),
        };
        {
            let mut inner = history.inner.lock().expect("history lock");
            for f in found {
                history.insert(&mut inner, f, now);
            }
        }
        Ok(history)
    }

    /// A history that keeps nothing on disk (tests, tools).
    pub fn in_memory(limits: Limits) -> History {
        History {
            inner: Mutex::new(Inner::default()),
            limits,
            writer: None,
        }
    }

    /// Notes a message accepted now (or recovered from the spool), so that
    /// its Message-ID finds it.
    pub fn accepted(&self, id: QueueId, envelope: &Envelope) {
        if self.limits.idempotency_secs == 0 {
            return;
        }
        let Some(mid) = &envelope.message_id else {
            return;
        };
        let mut inner = self.inner.lock().expect("history lock");
        self.index(
            &mut inner,
            id,
            envelope.tenant.as_deref(),
            mid,
            envelope.received_at,
        );
    }

    /// Atomically: the queue id this tenant's Message-ID was accepted under
    /// within the idempotency window, or else claims it for `id` (so that
    /// a second submission racing this one finds it). Undo with
    /// [`History::release`] when the message is then not accepted.
    pub fn claim(
        &self,
        tenant: Option<&str>,
        message_id: &str,
        id: QueueId,
        now: u64,
    ) -> Option<QueueId> {
        if self.limits.idempotency_secs == 0 {
            return None;
        }
        let mut inner = self.inner.lock().expect("history lock");
        self.expire_ids(&mut inner, now);
        let k = key(tenant, message_id);
        if let Some(&(first, _)) = inner.by_message_id.get(&k) {
            return Some(first);
        }
        self.index(&mut inner, id, tenant, message_id, now);
        None
    }

    /// Forgets a claim whose message was not accepted after all.
    pub fn release(&self, tenant: Option<&str>, message_id: &str, id: QueueId) {
        let mut inner = self.inner.lock().expect("history lock");
        let k = key(tenant, message_id);
        if inner.by_message_id.get(&k).is_some_and(|(q, _)| *q == id) {
            inner.by_message_id.remove(&k);
        }
    }

    /// The queue id a tenant's Message-ID was accepted under, if it is
    /// still remembered.
    pub fn by_message_id(&self, tenant: Option<&str>, message_id: &str) -> Option<QueueId> {
        let inner = self.inner.lock().expect("history lock");
        if let Some((id, _)) = inner.by_message_id.get(&key(tenant, message_id)) {
            return Some(*id);
        }
        // Past the idempotency window, finished messages are still found.
        let mid = message_id.trim();
        inner
            .order
            .iter()
            .rev()
            .filter_map(|(_, id)| inner.by_id.get(id))
            .find(|f| {
                f.envelope.tenant.as_deref() == tenant
                    && f.envelope.message_id.as_deref().map(str::trim) == Some(mid)
            })
            .map(|f| f.id)
    }

    /// Records a message that has left the queue.
    pub fn finished(&self, f: Finished) {
        if let Some(w) = &self.writer
            && let Ok(line) = serde_json::to_string(&f)
        {
            let _ = w.send((line, f.finished_at));
        }
        let now = f.finished_at;
        let mut inner = self.inner.lock().expect("history lock");
        self.insert(&mut inner, f, now);
    }

    pub fn get(&self, id: QueueId) -> Option<Finished> {
        self.inner
            .lock()
            .expect("history lock")
            .by_id
            .get(&id)
            .cloned()
    }

    /// Finished messages remembered now.
    pub fn len(&self) -> usize {
        self.inner.lock().expect("history lock").by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn insert(&self, inner: &mut Inner, f: Finished, now: u64) {
        if let Some(mid) = &f.envelope.message_id
            && self.limits.idempotency_secs > 0
            && now.saturating_sub(f.envelope.received_at) < self.limits.idempotency_secs
        {
            let (tenant, received) = (f.envelope.tenant.clone(), f.envelope.received_at);
            self.index(inner, f.id, tenant.as_deref(), mid, received);
        }
        inner.order.push_back((f.finished_at, f.id));
        inner.by_id.insert(f.id, f);
        while let Some(&(at, id)) = inner.order.front() {
            let expired = now.saturating_sub(at) >= self.limits.retention_secs;
            if !expired && inner.by_id.len() <= self.limits.max_messages {
                break;
            }
            inner.order.pop_front();
            inner.by_id.remove(&id);
        }
        self.expire_ids(inner, now);
    }

    fn index(&self, inner: &mut Inner, id: QueueId, tenant: Option<&str>, mid: &str, at: u64) {
        let k = key(tenant, mid);
        if inner.by_message_id.contains_key(&k) {
            return;
        }
        inner.by_message_id.insert(k.clone(), (id, at));
        inner.id_order.push_back((at, k));
    }

    fn expire_ids(&self, inner: &mut Inner, now: u64) {
        while let Some((at, _)) = inner.id_order.front() {
            if now.saturating_sub(*at) < self.limits.idempotency_secs {
                break;
            }
            let Some((at, k)) = inner.id_order.pop_front() else {
                break;
            };
            if inner.by_message_id.get(&k).is_some_and(|(_, a)| *a == at) {
                inner.by_message_id.remove(&k);
            }
        }
    }
}

/// The writer thread: appends lines, flushes when it has nothing more to
/// do, and rotates the file when its oldest line passes the retention.
fn start_writer(
    dir: PathBuf,
    first_in_file: Option<u64>,
    retention_secs: u64,
) -> std::io::Result<mpsc::Sender<Line>> {
    let path = dir.join(FILE);
    let open = |p: &Path| OpenOptions::new().create(true).append(true).open(p);
    let mut file = open(&path)?;
    // After a crash mid-line: end the torn line, so the next one stands alone.
    let torn = {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = File::open(&path)?;
        let len = f.seek(SeekFrom::End(0))?;
        let mut last = [0u8; 1];
        len > 0
            && f.seek(SeekFrom::End(-1)).is_ok()
            && f.read_exact(&mut last).is_ok()
            && last[0] != b'\n'
    };
    if torn {
        file.write_all(b"\n")?;
    }
    let mut out = BufWriter::new(file);
    let (tx, rx) = mpsc::channel::<Line>();
    std::thread::Builder::new()
        .name("herald-history".into())
        .spawn(move || {
            let mut oldest = first_in_file;
            while let Ok(msg) = rx.recv() {
                let mut next = Some(msg);
                while let Some((line, at)) = next {
                    if oldest.is_some_and(|o| at.saturating_sub(o) >= retention_secs) {
                        let _ = out.flush();
                        let _ = std::fs::rename(&path, dir.join(OLD_FILE));
                        match open(&path) {
                            Ok(f) => out = BufWriter::new(f),
                            Err(e) => {
                                tracing::error!(error = %e, "cannot reopen the history file");
                                return;
                            }
                        }
                        oldest = None;
                    }
                    oldest.get_or_insert(at);
                    if let Err(e) = writeln!(out, "{line}") {
                        tracing::warn!(error = %e, "cannot append to the history file");
                    }
                    next = rx.try_recv().ok();
                }
                let _ = out.flush();
            }
            let _ = out.flush();
        })?;
    Ok(tx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::message::RcptStatus;

    const LIMITS: Limits = Limits {
        retention_secs: 100,
        max_messages: 3,
        idempotency_secs: 10,
    };

    fn finished(id: u128, mid: &str, at: u64) -> Finished {
        let mut r = Recipient::new(format!("r{id}@one.example"));
        r.status = RcptStatus::Delivered;
        Finished {
            id: QueueId(id),
            envelope: Envelope {
                sender: "billing@acme.example".into(),
                tenant: Some("acme".into()),
                message_id: Some(mid.into()),
                received_at: at,
                client_ip: [127, 0, 0, 1].into(),
                smtputf8: false,
                body_8bit: false,
                ret: None,
                env_id: None,
            },
            recipients: vec![r],
            size: 10,
            finished_at: at,
        }
    }

    #[test]
    fn claims_are_per_tenant_within_the_window_and_can_be_released() {
        let h = History::in_memory(LIMITS);
        assert_eq!(h.claim(Some("acme"), "<a@x>", QueueId(1), 1000), None);
        assert_eq!(
            h.claim(Some("acme"), " <a@x> ", QueueId(2), 1005),
            Some(QueueId(1))
        );
        assert_eq!(h.claim(Some("other"), "<a@x>", QueueId(3), 1005), None);
        // Past the window the same Message-ID is a new message.
        assert_eq!(h.claim(Some("acme"), "<a@x>", QueueId(4), 1011), None);
        h.release(Some("acme"), "<a@x>", QueueId(4));
        assert_eq!(h.claim(Some("acme"), "<a@x>", QueueId(5), 1012), None);
    }

    #[test]
    fn finished_messages_expire_by_age_and_count() {
        let h = History::in_memory(LIMITS);
        for (i, at) in [(1, 1000), (2, 1050), (3, 1060), (4, 1070)] {
            h.finished(finished(i, &format!("<{i}@x>"), at));
        }
        // At most 3: the oldest went.
        assert_eq!(h.len(), 3);
        assert!(h.get(QueueId(1)).is_none());
        assert_eq!(h.by_message_id(Some("acme"), "<2@x>"), Some(QueueId(2)));
        // Past the retention of 2, 3 and 4.
        h.finished(finished(5, "<5@x>", 1165));
        assert!(h.get(QueueId(2)).is_none());
        assert!(h.get(QueueId(4)).is_some());
        assert!(h.get(QueueId(5)).is_some());
    }

    #[test]
    fn history_survives_a_restart_and_skips_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        {
            let h = History::open(dir.path(), LIMITS, 1000).unwrap();
            h.finished(finished(7, "<7@x>", 1000));
            h.finished(finished(8, "<8@x>", 1001));
            // The writer thread owns the file: wait for both lines.
            let path = dir.path().join(FILE);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .count()
                < 2
            {
                assert!(std::time::Instant::now() < deadline, "history not written");
                std::thread::yield_now();
            }
        }
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(FILE))
            .unwrap();
        f.write_all(b"{\"id\":\"0000").unwrap();
        let h = History::open(dir.path(), LIMITS, 1005).unwrap();
        assert_eq!(h.get(QueueId(7)), Some(finished(7, "<7@x>", 1000)));
        // A line written after the torn one is whole.
        h.finished(finished(10, "<10@x>", 1005));
        drop(h);
        let path = dir.path().join(FILE);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !std::fs::read_to_string(&path).unwrap().ends_with("}\n") {
            assert!(std::time::Instant::now() < deadline, "history not written");
            std::thread::yield_now();
        }
        let h = History::open(dir.path(), LIMITS, 1006).unwrap();
        assert!(h.get(QueueId(10)).is_some());
        assert_eq!(h.by_message_id(Some("acme"), "<8@x>"), Some(QueueId(8)));
        // A claim within the window still finds the message after restart.
        assert_eq!(
            h.claim(Some("acme"), "<8@x>", QueueId(9), 1005),
            Some(QueueId(8))
        );
        // Opened past the retention, nothing is loaded.
        let h = History::open(dir.path(), LIMITS, 2000).unwrap();
        assert!(h.is_empty());
    }
}
