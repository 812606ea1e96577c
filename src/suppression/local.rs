//! The single-node suppression store: every entry in memory (a read-write
//! locked map of tenant → address → entry) and an append-only JSON-lines
//! log on disk, one `{"op":"add",...}` or `{"op":"remove",...}` per change.
//!
//! At start the log is replayed and rewritten compacted (only the active
//! entries; temp file, fsync, rename, fsync of the directory), so it stays
//! about as large as the list. A torn last line from a crash is skipped.
//! Changes are applied to memory at once and appended by one writer thread,
//! which fsyncs each batch before acknowledging it: RCPT checks never wait
//! on the disk, and an API call answers only once its change is durable.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, mpsc};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::{Entry, StoreError, StoreFuture, SuppressionStore};
use crate::clock::unix_now;

/// How often expired entries are dropped from memory.
const PURGE_EVERY: Duration = Duration::from_secs(3600);

/// tenant → address → entry.
type Map = HashMap<String, HashMap<String, Entry>>;

/// One line of the log.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum LogRecord {
    Add(Entry),
    Remove {
        tenant: String,
        address: String,
        at: u64,
    },
}

type Ack = oneshot::Sender<io::Result<()>>;

/// A record to append (none for a flush), and whom to tell once durable.
type Job = (Option<LogRecord>, Option<Ack>);

/// See the module documentation.
pub struct LocalStore {
    map: Arc<RwLock<Map>>,
    /// To the writer thread; none for a store kept in memory only.
    writer: Option<mpsc::Sender<Job>>,
}

impl LocalStore {
    /// Loads and compacts the log at `path` (created when missing) and
    /// starts its writer thread.
    pub async fn open(path: &Path) -> io::Result<LocalStore> {
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || LocalStore::open_blocking(&path))
            .await
            .map_err(io::Error::other)?
    }

    fn open_blocking(path: &Path) -> io::Result<LocalStore> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir)?;
        }
        let map = load(path, unix_now())?;
        compact(path, &map)?;
        let file = OpenOptions::new().append(true).open(path)?;
        let count: usize = map.values().map(HashMap::len).sum();
        tracing::info!(path = %path.display(), entries = count, "suppression list loaded");
        let map = Arc::new(RwLock::new(map));
        let (tx, rx) = mpsc::channel();
        let shared = Arc::clone(&map);
        let path = path.to_path_buf();
        std::thread::Builder::new()
            .name("suppressions".into())
            .spawn(move || write_log(file, path, rx, shared))?;
        Ok(LocalStore {
            map,
            writer: Some(tx),
        })
    }

    /// A store without a file: empty at start, lost at exit.
    pub fn in_memory() -> LocalStore {
        LocalStore {
            map: Arc::default(),
            writer: None,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Map> {
        self.map.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Map> {
        self.map.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands a record to the writer; the future resolves once it is synced.
    fn append(&self, record: Option<LogRecord>) -> StoreFuture<()> {
        let Some(writer) = &self.writer else {
            return Box::pin(std::future::ready(Ok(())));
        };
        let (ack, done) = oneshot::channel();
        if writer.send((record, Some(ack))).is_err() {
            return Box::pin(std::future::ready(Err(StoreError::Closed)));
        }
        Box::pin(async move {
            done.await
                .map_err(|_| StoreError::Closed)?
                .map_err(StoreError::Io)
        })
    }
}

impl SuppressionStore for LocalStore {
    fn lookup(&self, tenant: &str, address: &str, now: u64) -> Option<Entry> {
        self.read()
            .get(tenant)?
            .get(address)
            .filter(|e| e.is_active(now))
            .cloned()
    }

    fn add(&self, entry: Entry) -> StoreFuture<()> {
        self.write()
            .entry(entry.tenant.clone())
            .or_default()
            .insert(entry.address.clone(), entry.clone());
        self.append(Some(LogRecord::Add(entry)))
    }

    fn remove(&self, tenant: &str, address: &str) -> StoreFuture<Option<Entry>> {
        let removed = {
            let mut map = self.write();
            let removed = map.get_mut(tenant).and_then(|m| m.remove(address));
            if map.get(tenant).is_some_and(HashMap::is_empty) {
                map.remove(tenant);
            }
            removed
        };
        let Some(removed) = removed else {
            return Box::pin(std::future::ready(Ok(None)));
        };
        let written = self.append(Some(LogRecord::Remove {
            tenant: tenant.to_string(),
            address: address.to_string(),
            at: unix_now(),
        }));
        Box::pin(async move {
            written.await?;
            Ok(removed.is_active(unix_now()).then_some(removed))
        })
    }

    fn list(&self, tenant: Option<&str>, now: u64) -> StoreFuture<Vec<Entry>> {
        let mut out: Vec<Entry> = {
            let map = self.read();
            let tenants: Box<dyn Iterator<Item = &HashMap<String, Entry>>> = match tenant {
                Some(t) => Box::new(map.get(t).into_iter()),
                None => Box::new(map.values()),
            };
            tenants
                .flat_map(HashMap::values)
                .filter(|e| e.is_active(now))
                .cloned()
                .collect()
        };
        out.sort_by(|a, b| (&a.tenant, &a.address).cmp(&(&b.tenant, &b.address)));
        Box::pin(std::future::ready(Ok(out)))
    }

    fn flush(&self) -> StoreFuture<()> {
        self.append(None)
    }
}

/// Replays the log: the entries active at `now`.
fn load(path: &Path, now: u64) -> io::Result<Map> {
    let mut map = Map::new();
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(map),
        Err(e) => return Err(e),
    };
    let mut bad = 0usize;
    for (n, line) in BufReader::new(file).split(b'\n').enumerate() {
        let line = line?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<LogRecord>(&line) {
            Ok(LogRecord::Add(e)) => {
                map.entry(e.tenant.clone())
                    .or_default()
                    .insert(e.address.clone(), e);
            }
            Ok(LogRecord::Remove {
                tenant, address, ..
            }) => {
                if let Some(m) = map.get_mut(&tenant) {
                    m.remove(&address);
                }
            }
            Err(e) => {
                bad += 1;
                tracing::warn!(path = %path.display(), line = n + 1, error = %e, "skipping an unreadable suppression list line");
            }
        }
    }
    if bad > 0 {
        tracing::warn!(path = %path.display(), lines = bad, "suppression list had unreadable lines (a torn write at a crash leaves one)");
    }
    for m in map.values_mut() {
        m.retain(|_, e| e.is_active(now));
    }
    map.retain(|_, m| !m.is_empty());
    Ok(map)
}

/// Rewrites the log with one `add` per entry, atomically.
fn compact(path: &Path, map: &Map) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut entries: Vec<&Entry> = map.values().flat_map(HashMap::values).collect();
    entries.sort_by(|a, b| (&a.tenant, &a.address).cmp(&(&b.tenant, &b.address)));
    let mut buf = Vec::new();
    for e in entries {
        serde_json::to_writer(&mut buf, &LogRecord::Add(e.clone())).map_err(io::Error::other)?;
        buf.push(b'\n');
    }
    let mut f = File::create(&tmp)?;
    f.write_all(&buf)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)?;
    sync_dir(path);
    Ok(())
}

/// Makes a rename in the file's directory durable.
fn sync_dir(path: &Path) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// The writer thread: appends each batch of records, syncs, then answers
/// their acks. Also drops expired entries from memory every
/// [`PURGE_EVERY`]. Ends when the store is dropped.
fn write_log(mut file: File, path: PathBuf, rx: mpsc::Receiver<Job>, map: Arc<RwLock<Map>>) {
    let mut next_purge = std::time::Instant::now() + PURGE_EVERY;
    loop {
        let wait = next_purge.saturating_duration_since(std::time::Instant::now());
        let first = match rx.recv_timeout(wait) {
            Ok(job) => job,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                purge(&map, unix_now());
                next_purge = std::time::Instant::now() + PURGE_EVERY;
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let mut buf = Vec::new();
        for (record, _) in &batch {
            if let Some(r) = record
                && serde_json::to_writer(&mut buf, r).is_ok()
            {
                buf.push(b'\n');
            }
        }
        let result = if buf.is_empty() {
            Ok(())
        } else {
            file.write_all(&buf).and_then(|()| file.sync_data())
        };
        if let Err(e) = &result {
            tracing::error!(path = %path.display(), error = %e, "cannot write the suppression list");
        }
        for (_, ack) in batch {
            if let Some(ack) = ack {
                let r = match &result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                };
                let _ = ack.send(r);
            }
        }
    }
}

fn purge(map: &RwLock<Map>, now: u64) {
    let mut map = map.write().unwrap_or_else(|p| p.into_inner());
    for m in map.values_mut() {
        m.retain(|_, e| e.is_active(now));
    }
    map.retain(|_, m| !m.is_empty());
}

#[cfg(test)]
mod tests {
    use super::super::Source;
    use super::*;

    fn entry(tenant: &str, address: &str, expires_at: Option<u64>) -> Entry {
        Entry {
            tenant: tenant.into(),
            address: address.into(),
            reason: "550 5.1.1 user unknown".into(),
            source: Source::Bounce,
            queue_id: Some("0192F3A1C2D40000A1B2".into()),
            created_at: 1000,
            expires_at,
        }
    }

    #[tokio::test]
    async fn survives_reopen_and_compacts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("var").join("suppressions.jsonl");
        let s = LocalStore::open(&path).await.unwrap();
        let now = unix_now();
        s.add(entry("acme", "a@x.test", None)).await.unwrap();
        s.add(entry("acme", "b@x.test", Some(now + 3600)))
            .await
            .unwrap();
        s.add(entry("acme", "old@x.test", Some(now - 1)))
            .await
            .unwrap();
        s.add(entry("", "a@x.test", None)).await.unwrap();
        assert!(s.remove("acme", "b@x.test").await.unwrap().is_some());
        assert!(s.remove("acme", "b@x.test").await.unwrap().is_none());
        assert!(s.lookup("acme", "old@x.test", now).is_none(), "expired");
        drop(s);

        // A crash in the middle of an append leaves a torn line.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"op\":\"add\",\"tenant\":\"ac").unwrap();
        drop(f);

        let s = LocalStore::open(&path).await.unwrap();
        let all = s.list(None, now).await.unwrap();
        let keys: Vec<(&str, &str)> = all
            .iter()
            .map(|e| (e.tenant.as_str(), e.address.as_str()))
            .collect();
        assert_eq!(keys, vec![("", "a@x.test"), ("acme", "a@x.test")]);
        assert_eq!(
            s.lookup("acme", "a@x.test", now).unwrap(),
            entry("acme", "a@x.test", None)
        );
        assert_eq!(s.list(Some("acme"), now).await.unwrap().len(), 1);
        assert!(s.list(Some("other"), now).await.unwrap().is_empty());
        // Compacted: one line per active entry, nothing torn or expired.
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        s.flush().await.unwrap();
    }

    #[test]
    fn purge_drops_expired_entries() {
        let map = RwLock::new(Map::new());
        {
            let mut m = map.write().unwrap();
            let t = m.entry("acme".into()).or_default();
            t.insert("a@x.test".into(), entry("acme", "a@x.test", Some(10)));
            t.insert("b@x.test".into(), entry("acme", "b@x.test", None));
        }
        purge(&map, 10);
        assert_eq!(map.read().unwrap()["acme"].len(), 1);
        purge(&map, 10);
        let mut m = map.write().unwrap();
        m.get_mut("acme").unwrap().clear();
        drop(m);
        purge(&map, 10);
        assert!(map.read().unwrap().is_empty());
    }
}
