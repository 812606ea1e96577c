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
//! outcome); a file that cannot be read or appended to (a full disk) is
//! logged and the history works from memory. When the oldest entry in the file passes the retention, the
//! file becomes `history.old.jsonl` (replacing the previous one), so the
//! disk holds at most about two retention periods.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use crate::config::HistoryRetention;
use crate::envelope::{Envelope, QueueId, Recipient};

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

pub struct History {
    inner: Mutex<Inner>,
    limits: HistoryRetention,
    /// Lines for the writer thread: (JSON, finished_at).
    writer: Option<mpsc::Sender<Line>>,
}

type Line = (String, u64);

#[derive(Default)]
struct Inner {
    by_id: HashMap<QueueId, Finished>,
    /// Finished messages, oldest first: (finished_at, id).
    order: VecDeque<(u64, QueueId)>,
    /// Submission key → the submission, for live and finished messages
    /// within the idempotency window.
    submissions: HashMap<Key, Claimed>,
    /// Submission keys by acceptance time, oldest first, for expiry.
    submission_order: VecDeque<(u64, Key)>,
    /// (tenant, Message-ID) → the latest queue id, for the status API.
    latest: HashMap<(String, String), QueueId>,
    /// Claims whose message is not stored yet.
    pending: HashMap<QueueId, Key>,
    /// Late reports already counted: (queue id, recipient, kind).
    reports: std::collections::HashSet<(QueueId, usize, u8)>,
    reports_order: VecDeque<(QueueId, usize, u8)>,
}

/// The `kind` under which [`History::first_report`] remembers that a late
/// failure of a recipient was reported to the sender in a DSN (apart from
/// the kinds of the events a late report causes).
pub const LATE_DSN: u8 = u8::MAX;

/// Late reports remembered for deduplication.
const MAX_REPORTS: usize = 100_000;

/// What makes two submissions the same: the tenant (or "" for trusted
/// networks), the Message-ID as written, and a digest of the envelope
/// (sender and recipients). The envelope is part of it because one message
/// legitimately comes in several transactions: a client told "452 too many
/// recipients" sends the rest later under the same Message-ID, and so do
/// apps that submit once per recipient.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    tenant: String,
    message_id: String,
    envelope: [u8; 16],
}

#[derive(Clone, Copy, Debug)]
struct Claimed {
    id: QueueId,
    at: u64,
    /// Claimed, and the message not yet stored.
    pending: bool,
}

/// What [`History::claim`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// First submission: go on and store it, then [`History::confirm`].
    New,
    /// Already accepted under this queue id: answer 250 with it.
    Duplicate(QueueId),
    /// The first submission is still being stored: answer 4xx, so that
    /// the client asks again once the first one has its answer.
    InFlight,
}

/// The submission key of a message (see [`Key`]).
fn key<'a>(
    tenant: Option<&str>,
    message_id: &str,
    sender: &str,
    recipients: impl IntoIterator<Item = &'a str>,
) -> Key {
    use blake2::Digest as _;
    let mut rcpts: Vec<String> = recipients
        .into_iter()
        .map(|r| r.to_ascii_lowercase())
        .collect();
    rcpts.sort_unstable();
    let mut h = blake2::Blake2s256::new();
    h.update(sender.to_ascii_lowercase().as_bytes());
    for r in &rcpts {
        h.update(b"\0");
        h.update(r.as_bytes());
    }
    let digest = h.finalize();
    let mut envelope = [0u8; 16];
    envelope.copy_from_slice(&digest[..16]);
    Key {
        tenant: tenant.unwrap_or_default().to_string(),
        message_id: message_id.trim().to_string(),
        envelope,
    }
}

fn latest_key(tenant: Option<&str>, message_id: &str) -> (String, String) {
    (
        tenant.unwrap_or_default().to_string(),
        message_id.trim().to_string(),
    )
}

impl History {
    /// Loads what `dir` holds within the retention and starts the writer.
    pub fn open(dir: &Path, limits: HistoryRetention, now: u64) -> std::io::Result<History> {
        let mut found: Vec<Finished> = Vec::new();
        // When the current file's oldest line passes the retention, it is
        // rotated: only that file's own lines count for it.
        let mut first_in_file = None;
        for name in [OLD_FILE, FILE] {
            let path = dir.join(name);
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "cannot read the history file");
                    continue;
                }
            };
            // A torn line (crash mid-write, perhaps inside a UTF-8
            // character) is skipped; the lines after it still count.
            let mut reader = BufReader::new(file);
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(file = %path.display(), error = %e, "cannot read the rest of the history file");
                        break;
                    }
                }
                let Ok(f) = serde_json::from_slice::<Finished>(&line) else {
                    continue;
                };
                if name == FILE {
                    first_in_file =
                        Some(first_in_file.map_or(f.finished_at, |t: u64| t.min(f.finished_at)));
                }
                if now.saturating_sub(f.finished_at) < limits.retention_secs {
                    found.push(f);
                }
            }
        }
        found.sort_by_key(|f| f.finished_at);
        // Without its file (a full disk) the history still answers from
        // memory: not worth refusing to start the relay over.
        let writer = start_writer(dir.to_path_buf(), first_in_file, limits.retention_secs)
            .inspect_err(|e| {
                tracing::error!(error = %e, "cannot append to the history file; finished messages are kept in memory only")
            })
            .ok();
        let history = History {
            inner: Mutex::new(Inner::default()),
            limits,
            writer,
        };
        {
            let mut inner = history.inner.lock().unwrap_or_else(PoisonError::into_inner);
            for f in found {
                history.insert(&mut inner, f, now);
            }
        }
        Ok(history)
    }

    /// A history that keeps nothing on disk (tests, tools).
    pub fn in_memory(limits: HistoryRetention) -> History {
        History {
            inner: Mutex::new(Inner::default()),
            limits,
            writer: None,
        }
    }

    /// Notes a message recovered from the spool, so that its Message-ID
    /// finds it.
    pub fn accepted<'a>(
        &self,
        id: QueueId,
        envelope: &Envelope,
        recipients: impl IntoIterator<Item = &'a str>,
    ) {
        let Some(mid) = &envelope.message_id else {
            return;
        };
        let k = key(
            envelope.tenant.as_deref(),
            mid,
            &envelope.sender,
            recipients,
        );
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        self.index(&mut inner, k, id, envelope.received_at, false);
    }

    /// Atomically: whether this tenant submitted the same message (same
    /// Message-ID, sender and recipients) within the idempotency window;
    /// if not, claims it for `id`, so that a second submission racing this
    /// one finds it. Then [`History::confirm`] once the message is stored,
    /// or [`History::release`] when it is not.
    pub fn claim<'a>(
        &self,
        envelope: &Envelope,
        message_id: &str,
        recipients: impl IntoIterator<Item = &'a str>,
        id: QueueId,
        now: u64,
    ) -> Claim {
        if self.limits.idempotency_secs == 0 {
            return Claim::New;
        }
        let k = key(
            envelope.tenant.as_deref(),
            message_id,
            &envelope.sender,
            recipients,
        );
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        self.expire_submissions(&mut inner, now);
        match inner.submissions.get(&k) {
            Some(c) if c.pending => Claim::InFlight,
            Some(c) => Claim::Duplicate(c.id),
            None => {
                self.index(&mut inner, k, id, now, true);
                Claim::New
            }
        }
    }

    /// The claimed message is stored: later submissions are duplicates.
    pub fn confirm(&self, id: QueueId) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(k) = inner.pending.remove(&id)
            && let Some(c) = inner.submissions.get_mut(&k)
        {
            c.pending = false;
        }
    }

    /// Forgets a claim whose message was not stored after all.
    pub fn release(&self, id: QueueId) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(k) = inner.pending.remove(&id)
            && inner.submissions.get(&k).is_some_and(|c| c.id == id)
        {
            inner.submissions.remove(&k);
        }
    }

    /// The latest queue id a tenant's Message-ID was accepted under, if it
    /// is still remembered.
    pub fn by_message_id(&self, tenant: Option<&str>, message_id: &str) -> Option<QueueId> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(id) = inner.latest.get(&latest_key(tenant, message_id)) {
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

    /// Whether this is the first late report of `kind` about recipient
    /// `index` of message `id`: a receiver (or anyone holding the VERP
    /// address) may send the same report many times, and each copy must
    /// not count again against the tenant's reputation.
    pub fn first_report(&self, id: QueueId, index: usize, kind: u8) -> bool {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if !inner.reports.insert((id, index, kind)) {
            return false;
        }
        inner.reports_order.push_back((id, index, kind));
        if inner.reports_order.len() > MAX_REPORTS
            && let Some(old) = inner.reports_order.pop_front()
        {
            inner.reports.remove(&old);
        }
        true
    }

    /// Records a message that has left the queue.
    pub fn finished(&self, f: Finished) {
        if let Some(w) = &self.writer
            && let Ok(line) = serde_json::to_string(&f)
        {
            let _ = w.send((line, f.finished_at));
        }
        let now = f.finished_at;
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
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
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .by_id
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn insert(&self, inner: &mut Inner, f: Finished, now: u64) {
        if let Some(mid) = &f.envelope.message_id {
            let k = key(
                f.envelope.tenant.as_deref(),
                mid,
                &f.envelope.sender,
                f.recipients.iter().map(|r| r.address.as_str()),
            );
            self.index(inner, k, f.id, f.envelope.received_at, false);
        }
        inner.order.push_back((f.finished_at, f.id));
        inner.by_id.insert(f.id, f);
        while let Some(&(at, id)) = inner.order.front() {
            let expired = now.saturating_sub(at) >= self.limits.retention_secs;
            if !expired && inner.by_id.len() <= self.limits.max_messages {
                break;
            }
            inner.order.pop_front();
            if let Some(f) = inner.by_id.remove(&id)
                && let Some(mid) = &f.envelope.message_id
            {
                let lk = latest_key(f.envelope.tenant.as_deref(), mid);
                if inner.latest.get(&lk) == Some(&id) {
                    inner.latest.remove(&lk);
                }
            }
        }
        self.expire_submissions(inner, now);
    }

    /// Indexes a submission accepted at `at`, keeping the order by time
    /// (recovered and reloaded messages come with their own, older times)
    /// and the index within `max_messages`.
    fn index(&self, inner: &mut Inner, k: Key, id: QueueId, at: u64, pending: bool) {
        if self.limits.idempotency_secs == 0 || inner.submissions.contains_key(&k) {
            return;
        }
        inner
            .latest
            .insert(latest_key(Some(&k.tenant), &k.message_id), id);
        if pending {
            inner.pending.insert(id, k.clone());
        }
        inner
            .submissions
            .insert(k.clone(), Claimed { id, at, pending });
        let pos = inner.submission_order.partition_point(|(t, _)| *t <= at);
        inner.submission_order.insert(pos, (at, k));
        while inner.submission_order.len() > self.limits.max_messages {
            self.forget_oldest_submission(inner);
        }
    }

    fn expire_submissions(&self, inner: &mut Inner, now: u64) {
        while inner
            .submission_order
            .front()
            .is_some_and(|(at, _)| now.saturating_sub(*at) >= self.limits.idempotency_secs)
        {
            self.forget_oldest_submission(inner);
        }
    }

    fn forget_oldest_submission(&self, inner: &mut Inner) {
        let Some((at, k)) = inner.submission_order.pop_front() else {
            return;
        };
        let Some(c) = inner.submissions.get(&k).copied().filter(|c| c.at == at) else {
            return;
        };
        inner.submissions.remove(&k);
        inner.pending.remove(&c.id);
        // Finished messages stay findable from `by_id`; a live one that is
        // no longer indexed is not, which is only the status API's loss.
        let lk = latest_key(Some(&k.tenant), &k.message_id);
        if inner.latest.get(&lk) == Some(&c.id) {
            inner.latest.remove(&lk);
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
    use crate::envelope::RcptStatus;

    const LIMITS: HistoryRetention = HistoryRetention {
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
                require_tls: false,
                ignore_tls_policies: false,
            },
            recipients: vec![r],
            size: 10,
            finished_at: at,
        }
    }

    fn env(tenant: &str) -> Envelope {
        let mut e = finished(0, "<a@x>", 0).envelope;
        e.tenant = Some(tenant.into());
        e
    }

    #[test]
    fn claims_are_per_tenant_and_envelope_within_the_window() {
        let h = History::in_memory(LIMITS);
        let (acme, other) = (env("acme"), env("other"));
        let claim = |e: &Envelope, rcpts: &[&str], id: u128, now: u64| {
            h.claim(e, "<a@x>", rcpts.iter().copied(), QueueId(id), now)
        };
        assert_eq!(claim(&acme, &["b@y", "c@y"], 1, 1000), Claim::New);
        // The first is still being stored.
        assert_eq!(claim(&acme, &["c@y", "B@y"], 2, 1001), Claim::InFlight);
        h.confirm(QueueId(1));
        assert_eq!(
            claim(&acme, &["c@y", "B@y"], 2, 1005),
            Claim::Duplicate(QueueId(1))
        );
        // The rest of the recipients in another transaction (after a 452),
        // another tenant: not duplicates.
        assert_eq!(claim(&acme, &["d@y"], 3, 1005), Claim::New);
        assert_eq!(claim(&other, &["b@y", "c@y"], 4, 1005), Claim::New);
        // Past the window the same message is a new one.
        assert_eq!(claim(&acme, &["b@y", "c@y"], 5, 1011), Claim::New);
        // A released claim (not stored) is no duplicate.
        h.release(QueueId(5));
        assert_eq!(claim(&acme, &["b@y", "c@y"], 6, 1012), Claim::New);
        assert_eq!(h.by_message_id(Some("acme"), "<a@x>"), Some(QueueId(6)));
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
        let f8 = finished(8, "<8@x>", 1001);
        let rcpts = f8.recipients.iter().map(|r| r.address.as_str());
        assert_eq!(
            h.claim(&f8.envelope, "<8@x>", rcpts, QueueId(9), 1005),
            Claim::Duplicate(QueueId(8))
        );
        // Opened past the retention, nothing is loaded.
        let h = History::open(dir.path(), LIMITS, 2000).unwrap();
        assert!(h.is_empty());
    }

    #[test]
    fn history_without_a_writable_file_still_answers() {
        let dir = tempfile::tempdir().unwrap();
        let line = serde_json::to_string(&finished(7, "<7@x>", 1000)).unwrap();
        std::fs::write(dir.path().join(OLD_FILE), format!("{line}\n")).unwrap();
        // The current file cannot be opened for appending.
        std::fs::create_dir(dir.path().join(FILE)).unwrap();
        let h = History::open(dir.path(), LIMITS, 1005).unwrap();
        assert_eq!(h.get(QueueId(7)), Some(finished(7, "<7@x>", 1000)));
        h.finished(finished(8, "<8@x>", 1005));
        assert!(h.get(QueueId(8)).is_some());
    }
}
