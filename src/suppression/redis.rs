//! The cluster's suppression store: the list lives in Redis, and every node
//! keeps a full replica of it in a [`LocalStore`] (memory plus its durable
//! JSON-lines file), so that RCPT checks stay memory lookups.
//!
//! Redis layout (`<p>` = `[cluster] key_prefix`):
//!
//! * `<p>:supp:t:<tenant>`: a hash per tenant, field = normalized address,
//!   value = the [`Entry`] JSON (reason, source, queue id, created and
//!   expiry times). A hash rather than one key per entry with `PEXPIREAT`:
//!   listing a tenant or loading the whole list is then `SMEMBERS` plus one
//!   `HGETALL` per tenant instead of a `SCAN` over the whole keyspace, and
//!   expiry needs no Redis TTL because every reader already checks
//!   `expires_at` (the same rule as the local store); expired fields are
//!   deleted by the periodic resync.
//! * `<p>:supp:tenants`: the set of tenant keys that have a hash.
//! * `<p>:supp:changes`: a stream of changes (`op` = `add` with `entry`, or
//!   `remove` with `tenant` and `address`), capped with `MAXLEN ~`
//!   [`CHANGES_MAXLEN`]. Each change is written in one `MULTI` with the hash
//!   update, so the stream's order is the order of the writes.
//!
//! Why a replica, not a read-through lookup: [`SuppressionStore::lookup`]
//! runs for every RCPT and answers from memory. A Redis round trip there
//! would add latency to every recipient and, during an outage, a timeout
//! per recipient and a fallback list holding only this node's own entries.
//! With the replica each node keeps the whole list through an outage.
//!
//! * Writes ([`add`](SuppressionStore::add), [`remove`](SuppressionStore::remove))
//!   go to the local store first (visible at once, durable on disk), then
//!   to Redis through one writer task, in order. Their future resolves when
//!   the change is durable locally and Redis has taken it, or the first
//!   attempt failed: an API call never hangs on Redis. Changes Redis did
//!   not take wait in memory (at most [`MAX_PENDING`]) and are retried with
//!   backoff.
//! * A follower task loads the whole list from Redis at start, after every
//!   outage and every [`RESYNC_EVERY`] (Redis is then authoritative: local
//!   entries it lacks are removed), and between loads applies the change
//!   stream with `XREAD BLOCK`, so other nodes' changes arrive within
//!   milliseconds. Concurrent writes to one address converge on the last
//!   one Redis took, on every node.
//! * Redis down: lookups go on against the replica (the list as of the
//!   outage plus this node's own changes); the outage is logged once, and
//!   its end once.
//!
//! Limits: a change made during an outage and not yet pushed when the
//! process stops stays in the local file only, and the first load after
//! the restart (Redis authoritative) drops it.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use ::redis::Value;
use ::redis::aio::ConnectionManager;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Entry, LocalStore, StoreError, StoreFuture, SuppressionStore};
use crate::clock::unix_now;
use crate::config::Config;
use crate::metrics::Metrics;

/// `MAXLEN ~` of the change stream. A node that falls further behind (it
/// was cut off) reloads the whole list anyway.
pub const CHANGES_MAXLEN: u64 = 100_000;

/// Changes waiting for Redis at most; older ones are dropped beyond it
/// (they stay in the local list).
pub const MAX_PENDING: usize = 100_000;

/// How often the whole list is reloaded from Redis (and expired entries
/// deleted there).
pub const RESYNC_EVERY: Duration = Duration::from_secs(3600);

/// Longest `XREAD BLOCK`.
const READ_BLOCK: Duration = Duration::from_secs(1);

/// Most changes in one `MULTI`.
const BATCH: usize = 500;

const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// One change to push.
#[derive(Clone, Debug)]
enum Change {
    Add(Entry),
    Remove { tenant: String, address: String },
}

/// A change (none = flush marker), and whom to tell once it was tried.
type Job = (Option<Change>, Option<oneshot::Sender<()>>);

/// Key names under `[cluster] key_prefix`.
#[derive(Clone)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn hash(&self, tenant: &str) -> String {
        format!("{}:supp:t:{tenant}", self.prefix)
    }
    fn tenants(&self) -> String {
        format!("{}:supp:tenants", self.prefix)
    }
    fn changes(&self) -> String {
        format!("{}:supp:changes", self.prefix)
    }
}

/// What the two tasks and the store share.
#[derive(Default)]
struct State {
    /// Bumped by every local change: a full load that saw it move starts
    /// over (the change may not be in the snapshot).
    generation: AtomicU64,
    /// Local changes not yet taken by Redis (or dropped).
    pending: AtomicUsize,
    /// `herald_suppression_redis_*`.
    metrics: Arc<Metrics>,
}

/// See the module documentation.
pub struct RedisStore {
    local: Arc<LocalStore>,
    tx: mpsc::UnboundedSender<Job>,
    state: Arc<State>,
    stop: CancellationToken,
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn connection(
    url: &str,
    connect: Duration,
    response: Duration,
) -> std::io::Result<ConnectionManager> {
    let client = ::redis::Client::open(url)
        .map_err(|e| std::io::Error::other(format!("invalid Redis URL: {e}")))?;
    let cfg = ::redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(connect))
        .set_response_timeout(Some(response))
        .set_number_of_retries(1);
    ConnectionManager::new_lazy_with_config(client, cfg)
        .map_err(|e| std::io::Error::other(format!("cannot set up the Redis connection: {e}")))
}

impl RedisStore {
    /// Opens the local replica at `path` (see [`LocalStore::open`]) and
    /// starts the writer and follower tasks. Does not wait for Redis.
    pub async fn open(
        path: &Path,
        config: &Config,
        url: &str,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<RedisStore> {
        let timeout = config.cluster.redis_timeout.as_duration();
        let connect = timeout.max(Duration::from_millis(200));
        let response = timeout.max(Duration::from_secs(1));
        let writer_conn = connection(url, connect, response)?;
        // Its own connection: a blocked XREAD would hold up other commands
        // on a shared one.
        let reader_conn = connection(url, connect, READ_BLOCK + response)?;
        let local = Arc::new(LocalStore::open(path).await?);
        let keys = Keys {
            prefix: config.cluster.key_prefix.clone(),
        };
        let state = Arc::new(State {
            metrics,
            ..State::default()
        });
        let stop = CancellationToken::new();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(
            Writer {
                conn: writer_conn,
                keys: keys.clone(),
                state: state.clone(),
                deadline: response * 2,
            }
            .run(rx),
        );
        tokio::spawn(
            Follower {
                conn: reader_conn,
                keys,
                local: local.clone(),
                state: state.clone(),
                deadline: READ_BLOCK + response * 2,
            }
            .run(stop.clone()),
        );
        Ok(RedisStore {
            local,
            tx,
            state,
            stop,
        })
    }

    /// Hands a change to the writer; resolves once Redis took it or the
    /// first attempt failed.
    fn push(&self, change: Option<Change>) -> oneshot::Receiver<()> {
        let (ack, done) = oneshot::channel();
        if change.is_some() {
            self.state.generation.fetch_add(1, Ordering::SeqCst);
            self.state.pending.fetch_add(1, Ordering::SeqCst);
        }
        let counted = change.is_some();
        if self.tx.send((change, Some(ack))).is_err() && counted {
            self.state.pending.fetch_sub(1, Ordering::SeqCst);
        }
        done
    }
}

impl SuppressionStore for RedisStore {
    fn lookup(&self, tenant: &str, address: &str, now: u64) -> Option<Entry> {
        self.local.lookup(tenant, address, now)
    }

    fn add(&self, entry: Entry) -> StoreFuture<()> {
        let durable = self.local.add(entry.clone());
        let shared = self.push(Some(Change::Add(entry)));
        Box::pin(async move {
            durable.await?;
            let _ = shared.await;
            Ok(())
        })
    }

    fn remove(&self, tenant: &str, address: &str) -> StoreFuture<Option<Entry>> {
        let removed = self.local.remove(tenant, address);
        // Also when the replica has no such entry: it may lag behind Redis.
        let shared = self.push(Some(Change::Remove {
            tenant: tenant.to_string(),
            address: address.to_string(),
        }));
        Box::pin(async move {
            let removed = removed.await?;
            let _ = shared.await;
            Ok(removed)
        })
    }

    fn list(&self, tenant: Option<&str>, now: u64) -> StoreFuture<Vec<Entry>> {
        self.local.list(tenant, now)
    }

    fn flush(&self) -> StoreFuture<()> {
        let durable = self.local.flush();
        let shared = self.push(None);
        Box::pin(async move {
            durable.await?;
            shared.await.map_err(|_| StoreError::Closed)
        })
    }
}

/// Pushes local changes to Redis, in order.
struct Writer {
    conn: ConnectionManager,
    keys: Keys,
    state: Arc<State>,
    deadline: Duration,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Job>) {
        let mut queue: VecDeque<Job> = VecDeque::new();
        let mut backoff = BACKOFF_MIN;
        let mut outage = false;
        loop {
            if queue.is_empty() {
                match rx.recv().await {
                    Some(job) => queue.push_back(job),
                    None => return,
                }
            }
            let closed = loop {
                match rx.try_recv() {
                    Ok(job) => queue.push_back(job),
                    Err(mpsc::error::TryRecvError::Empty) => break false,
                    Err(mpsc::error::TryRecvError::Disconnected) => break true,
                }
            };
            self.trim(&mut queue);
            self.state.metrics.suppression_redis_pending.store(
                self.state.pending.load(Ordering::SeqCst) as u64,
                Ordering::Relaxed,
            );
            let n = queue.len().min(BATCH);
            let changes = queue.range(..n).any(|(c, _)| c.is_some());
            match self
                .send(queue.range(..n).filter_map(|(c, _)| c.as_ref()))
                .await
            {
                Ok(()) => {
                    for (change, ack) in queue.drain(..n) {
                        if change.is_some() {
                            self.state.pending.fetch_sub(1, Ordering::SeqCst);
                        }
                        if let Some(ack) = ack {
                            let _ = ack.send(());
                        }
                    }
                    if outage && changes {
                        backoff = BACKOFF_MIN;
                        outage = false;
                        tracing::info!(
                            "Redis reachable again: suppression changes are shared again"
                        );
                    }
                }
                Err(e) => {
                    self.state
                        .metrics
                        .suppression_redis_errors
                        .fetch_add(1, Ordering::Relaxed);
                    if !outage {
                        outage = true;
                        tracing::warn!(error = %e, "Redis unreachable: suppression changes are kept locally and retried");
                    }
                    // Callers waited for one attempt only.
                    for (_, ack) in queue.iter_mut() {
                        if let Some(ack) = ack.take() {
                            let _ = ack.send(());
                        }
                    }
                    queue.retain(|(c, _)| c.is_some());
                    if closed {
                        tracing::warn!(
                            changes = queue.len(),
                            "suppression changes not shared at shutdown (they are in the local list)"
                        );
                        return;
                    }
                    // Redis is known to be down: changes made meanwhile
                    // are queued and answered at once, without waiting for
                    // the next attempt.
                    let retry = tokio::time::sleep(backoff);
                    tokio::pin!(retry);
                    loop {
                        tokio::select! {
                            _ = &mut retry => break,
                            job = rx.recv() => match job {
                                Some((change, ack)) => {
                                    if let Some(ack) = ack {
                                        let _ = ack.send(());
                                    }
                                    if change.is_some() {
                                        queue.push_back((change, None));
                                    }
                                }
                                None => break,
                            },
                        }
                    }
                    self.trim(&mut queue);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
            self.state.metrics.suppression_redis_pending.store(
                self.state.pending.load(Ordering::SeqCst) as u64,
                Ordering::Relaxed,
            );
            if closed && queue.is_empty() {
                return;
            }
        }
    }

    /// Drops the oldest changes beyond [`MAX_PENDING`].
    fn trim(&self, queue: &mut VecDeque<Job>) {
        let mut dropped = 0;
        while queue.len() > MAX_PENDING {
            if let Some((change, ack)) = queue.pop_front() {
                if change.is_some() {
                    self.state.pending.fetch_sub(1, Ordering::SeqCst);
                    dropped += 1;
                }
                if let Some(ack) = ack {
                    let _ = ack.send(());
                }
            }
        }
        if dropped > 0 {
            tracing::error!(
                changes = dropped,
                "Redis down too long: oldest suppression changes not shared (they stay in the local list)"
            );
        }
    }

    async fn send<'a>(&mut self, changes: impl Iterator<Item = &'a Change>) -> Result<(), String> {
        match changes_pipeline(&self.keys, changes)? {
            Some(pipe) => bounded(self.deadline, pipe.query_async::<()>(&mut self.conn)).await,
            None => Ok(()),
        }
    }
}

/// One `MULTI`: per change the hash update, the tenant set and the change
/// stream entry; none when there is no change.
fn changes_pipeline<'a>(
    keys: &Keys,
    changes: impl Iterator<Item = &'a Change>,
) -> Result<Option<::redis::Pipeline>, String> {
    {
        let mut pipe = ::redis::pipe();
        pipe.atomic();
        let mut any = false;
        for change in changes {
            any = true;
            match change {
                Change::Add(e) => {
                    let json = serde_json::to_string(e).map_err(|e| e.to_string())?;
                    pipe.cmd("HSET")
                        .arg(keys.hash(&e.tenant))
                        .arg(&e.address)
                        .arg(&json)
                        .ignore();
                    pipe.cmd("SADD").arg(keys.tenants()).arg(&e.tenant).ignore();
                    xadd(&mut pipe, keys)
                        .arg("op")
                        .arg("add")
                        .arg("entry")
                        .arg(&json)
                        .ignore();
                }
                Change::Remove { tenant, address } => {
                    pipe.cmd("HDEL")
                        .arg(keys.hash(tenant))
                        .arg(address)
                        .ignore();
                    xadd(&mut pipe, keys)
                        .arg("op")
                        .arg("remove")
                        .arg("tenant")
                        .arg(tenant)
                        .arg("address")
                        .arg(address)
                        .ignore();
                }
            }
        }
        Ok(any.then_some(pipe))
    }
}

fn xadd<'p>(pipe: &'p mut ::redis::Pipeline, keys: &Keys) -> &'p mut ::redis::Pipeline {
    pipe.cmd("XADD")
        .arg(keys.changes())
        .arg("MAXLEN")
        .arg("~")
        .arg(CHANGES_MAXLEN)
        .arg("*")
}

async fn bounded<T>(
    deadline: Duration,
    fut: impl std::future::Future<Output = ::redis::RedisResult<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(deadline, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {deadline:?}")),
    }
}

/// Keeps the replica in step with Redis.
struct Follower {
    conn: ConnectionManager,
    keys: Keys,
    local: Arc<LocalStore>,
    state: Arc<State>,
    deadline: Duration,
}

impl Follower {
    async fn run(mut self, stop: CancellationToken) {
        // The last change applied; none = load the whole list first.
        let mut last: Option<String> = None;
        let mut next_load = Instant::now();
        let mut backoff = BACKOFF_MIN;
        let mut outage = false;
        loop {
            if stop.is_cancelled() {
                return;
            }
            // Local changes not in Redis yet would look like removals to a
            // load: it waits until the writer has pushed them (following
            // the stream meanwhile, when there is a place to follow from).
            let drained = self.state.pending.load(Ordering::SeqCst) == 0;
            if last.is_none() && !drained {
                if pause(&stop, Duration::from_millis(50)).await {
                    return;
                }
                continue;
            }
            if drained && (last.is_none() || Instant::now() >= next_load) {
                let generation = self.state.generation.load(Ordering::SeqCst);
                match self.load().await {
                    Ok(id) => {
                        // A local change during the load may be missing
                        // from the snapshot: load again soon.
                        next_load = if self.state.generation.load(Ordering::SeqCst) == generation {
                            Instant::now() + RESYNC_EVERY
                        } else {
                            Instant::now()
                        };
                        last = Some(id);
                        backoff = BACKOFF_MIN;
                        if outage {
                            outage = false;
                            tracing::info!("Redis reachable again: suppression list reloaded");
                        }
                    }
                    Err(e) => {
                        self.failed(&mut outage, &e);
                        if pause(&stop, backoff).await {
                            return;
                        }
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue;
                    }
                }
            }
            let Some(from) = last.clone() else { continue };
            let read = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.read(&from) => r,
            };
            match read {
                Ok(changes) => {
                    for (id, fields) in changes {
                        self.apply(&fields);
                        last = Some(id);
                    }
                }
                Err(e) => {
                    self.failed(&mut outage, &e);
                    last = None;
                    if pause(&stop, backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    fn failed(&self, outage: &mut bool, error: &str) {
        self.state
            .metrics
            .suppression_redis_errors
            .fetch_add(1, Ordering::Relaxed);
        if !*outage {
            *outage = true;
            tracing::warn!(error = %error, "Redis unreachable: RCPT checks use this node's copy of the suppression list");
        }
    }

    /// Loads the whole list into the replica; returns the id of the last
    /// change it includes (later ones are read from the stream).
    async fn load(&mut self) -> Result<String, String> {
        let last: Value = bounded(
            self.deadline,
            ::redis::cmd("XREVRANGE")
                .arg(self.keys.changes())
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut self.conn),
        )
        .await?;
        let last = stream_entries(&last)
            .into_iter()
            .next()
            .map(|(id, _)| id)
            .unwrap_or_else(|| "0-0".to_string());
        let tenants: Vec<String> = bounded(
            self.deadline,
            ::redis::cmd("SMEMBERS")
                .arg(self.keys.tenants())
                .query_async(&mut self.conn),
        )
        .await?;
        if tenants.is_empty() {
            // Nothing was ever written under this prefix (removals leave
            // the tenant set as it is): a new cluster. Seed it with this
            // node's list instead of emptying the list.
            let now = unix_now();
            let local = self
                .local
                .list(None, now)
                .await
                .map_err(|e| e.to_string())?;
            let seed: Vec<Change> = local.into_iter().map(Change::Add).collect();
            if let Some(pipe) = changes_pipeline(&self.keys, seed.iter())? {
                bounded(self.deadline, pipe.query_async::<()>(&mut self.conn)).await?;
                tracing::info!(
                    entries = seed.len(),
                    "suppression list in Redis seeded with this node's list"
                );
            }
        }
        let mut pipe = ::redis::pipe();
        for t in &tenants {
            pipe.cmd("HGETALL").arg(self.keys.hash(t));
        }
        let hashes: Vec<HashMap<String, String>> = if tenants.is_empty() {
            Vec::new()
        } else {
            bounded(self.deadline, pipe.query_async(&mut self.conn)).await?
        };
        let now = unix_now();
        let mut remote: HashMap<(String, String), Entry> = HashMap::new();
        let mut expired = ::redis::pipe();
        let mut any_expired = false;
        for (tenant, hash) in tenants.iter().zip(hashes) {
            for (address, json) in hash {
                match serde_json::from_str::<Entry>(&json) {
                    Ok(e) if e.is_active(now) => {
                        remote.insert((e.tenant.clone(), e.address.clone()), e);
                    }
                    Ok(_) => {
                        expired
                            .cmd("HDEL")
                            .arg(self.keys.hash(tenant))
                            .arg(&address)
                            .ignore();
                        any_expired = true;
                    }
                    Err(e) => {
                        tracing::warn!(tenant = %tenant, address = %address, error = %e, "skipping an unreadable suppression entry in Redis");
                    }
                }
            }
        }
        if any_expired
            && let Err(e) = bounded(self.deadline, expired.query_async::<()>(&mut self.conn)).await
        {
            tracing::debug!(error = %e, "expired suppression entries not deleted from Redis");
        }
        let local = self
            .local
            .list(None, now)
            .await
            .map_err(|e| e.to_string())?;
        let (mut added, mut removed) = (0usize, 0usize);
        for e in &local {
            if !remote.contains_key(&(e.tenant.clone(), e.address.clone())) {
                drop(self.local.remove(&e.tenant, &e.address));
                removed += 1;
            }
        }
        let count = remote.len();
        for (_, e) in remote {
            if self.local.lookup(&e.tenant, &e.address, now).as_ref() != Some(&e) {
                drop(self.local.add(e));
                added += 1;
            }
        }
        tracing::info!(
            entries = count,
            added,
            removed,
            "suppression list loaded from Redis"
        );
        Ok(last)
    }

    /// New changes after `from`, waiting up to [`READ_BLOCK`] for some.
    async fn read(&mut self, from: &str) -> Result<Vec<(String, HashMap<String, String>)>, String> {
        let v: Value = bounded(
            self.deadline,
            ::redis::cmd("XREAD")
                .arg("COUNT")
                .arg(BATCH)
                .arg("BLOCK")
                .arg(READ_BLOCK.as_millis() as u64)
                .arg("STREAMS")
                .arg(self.keys.changes())
                .arg(from)
                .query_async(&mut self.conn),
        )
        .await?;
        // [[stream, entries]] (RESP2) or {stream: entries} (RESP3); nil
        // when nothing came.
        let entries = match &v {
            Value::Array(streams) => streams
                .iter()
                .filter_map(|s| match s {
                    Value::Array(pair) => pair.get(1),
                    _ => None,
                })
                .flat_map(stream_entries)
                .collect(),
            Value::Map(streams) => streams
                .iter()
                .flat_map(|(_, e)| stream_entries(e))
                .collect(),
            _ => Vec::new(),
        };
        Ok(entries)
    }

    /// Applies one change of the stream to the replica. This node's own
    /// changes are applied again too: when two nodes write one address at
    /// once, every replica then ends with the write Redis took last.
    fn apply(&self, fields: &HashMap<String, String>) {
        match fields.get("op").map(String::as_str) {
            Some("add") => match fields
                .get("entry")
                .map(|j| serde_json::from_str::<Entry>(j))
            {
                Some(Ok(e)) => {
                    if self
                        .local
                        .lookup(&e.tenant, &e.address, unix_now())
                        .as_ref()
                        != Some(&e)
                    {
                        drop(self.local.add(e));
                    }
                }
                _ => tracing::warn!("skipping an unreadable suppression change in Redis"),
            },
            Some("remove") => {
                if let (Some(t), Some(a)) = (fields.get("tenant"), fields.get("address")) {
                    drop(self.local.remove(t, a));
                }
            }
            _ => tracing::warn!("skipping an unknown suppression change in Redis"),
        }
    }
}

/// Sleeps `d`; `true` when `stop` was cancelled first.
async fn pause(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

/// `[[id, [field, value, ...]], ...]` → (id, fields).
fn stream_entries(v: &Value) -> Vec<(String, HashMap<String, String>)> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let Value::Array(pair) = item else {
                return None;
            };
            let id = text(pair.first()?)?;
            let fields = match pair.get(1)? {
                Value::Array(kv) => kv
                    .chunks(2)
                    .filter_map(|c| Some((text(c.first()?)?, text(c.get(1)?)?)))
                    .collect(),
                Value::Map(kv) => kv
                    .iter()
                    .filter_map(|(k, v)| Some((text(k)?, text(v)?)))
                    .collect(),
                _ => HashMap::new(),
            };
            Some((id, fields))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn stream_entries_parse() {
        let v = Value::Array(vec![Value::Array(vec![
            bulk("1-0"),
            Value::Array(vec![
                bulk("op"),
                bulk("remove"),
                bulk("tenant"),
                bulk("acme"),
            ]),
        ])]);
        let e = stream_entries(&v);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].0, "1-0");
        assert_eq!(e[0].1["op"], "remove");
        assert_eq!(e[0].1["tenant"], "acme");
        assert!(stream_entries(&Value::Nil).is_empty());
    }

    #[test]
    fn keys_do_not_collide_with_tenant_names() {
        let k = Keys { prefix: "h".into() };
        assert_eq!(k.hash("tenants"), "h:supp:t:tenants");
        assert_ne!(k.hash("tenants"), k.tenants());
        assert_eq!(k.hash(""), "h:supp:t:");
    }
}
