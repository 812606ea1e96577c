//! Webhooks: every event of a tenant that has a `webhook_url` is POSTed to
//! that URL, signed with the tenant's `webhook_secret`, and retried with
//! exponential backoff and jitter until the receiver answers 2xx or
//! `[webhooks] retry_for` has passed since the event.
//!
//! **Request.** `POST` with the event JSON as body — byte for byte the line
//! written to the events log — and these headers:
//!
//! * `Content-Type: application/json`
//! * `X-Herald-Event-Id`: the event's `event_id` (also in the body)
//! * `X-Herald-Timestamp`: Unix seconds when this attempt was sent
//! * `X-Herald-Signature`: hex HMAC-SHA256 of the body, keyed with the secret
//! * `X-Herald-Signature-V2`: hex HMAC-SHA256 of `timestamp + "." + body`,
//!   so that a receiver can also refuse old, replayed requests.
//!
//! **Durability: at least once.** [`Outbox::offer`] (called by
//! [`super::Reporter::emit`]) only hands the event to the outbox writer
//! thread, so mail never waits on webhooks. The writer appends each batch to
//! a JSON-lines log (`webhooks.jsonl` in the spool dir), fsyncs it, and only
//! then hands the events to the dispatcher. When an event is delivered or
//! given up, a `done` record is appended. At start the log is replayed and
//! rewritten with the pending events only; they are sent again. An event
//! delivered just before a crash may therefore arrive twice: the app
//! deduplicates on `event_id`. The window in which a crash loses an event is
//! the one between `emit` and the writer's fsync (a few milliseconds), the
//! same as for the events log; a graceful stop loses nothing.
//!
//! **Memory.** The dispatcher keeps per pending event only its position in
//! the log, its tenant and its retry time; bodies are read back from the log
//! for each attempt. The log is emptied whenever nothing is pending and it
//! has grown past [`TRUNCATE_AT`].
//!
//! **Ordering.** None is promised, per tenant or otherwise: up to
//! `max_concurrency` requests run at once, and a failed event is retried
//! later while newer ones go ahead. Receivers order by the event's
//! `timestamp` (and `attempt`) if they need to.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use axum::body::Body;
use hyper::{Request, header};
use hyper_util::rt::TokioIo;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Event;
pub use crate::config::webhook::Target;
use crate::config::{Config, Secret, WebhooksConfig};
use crate::metrics::Metrics;

/// When nothing is pending and the log is larger than this, it is emptied.
pub const TRUNCATE_AT: u64 = 16 << 20;

/// Hex HMAC-SHA256 of the concatenated `parts`, keyed with `secret`.
pub fn sign(secret: &[u8], parts: &[&[u8]]) -> String {
    use aws_lc_rs::hmac;
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut ctx = hmac::Context::with_key(&key);
    for p in parts {
        ctx.update(p);
    }
    let tag = ctx.sign();
    let mut out = String::with_capacity(64);
    for b in tag.as_ref() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Outcome {
    Delivered,
    GaveUp,
}

/// One line of the outbox log.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Record {
    /// An event to send; `at` is when it entered the outbox (Unix ms).
    Event {
        seq: u64,
        tenant: String,
        at: u64,
        event_id: String,
        body: String,
    },
    Done {
        seq: u64,
        outcome: Outcome,
    },
}

/// What the writer thread is asked to do.
enum Job {
    Event(Box<Event>),
    Done(u64, Outcome),
}

/// A pending event as the dispatcher knows it: where it is in the log.
#[derive(Clone, Debug)]
struct Meta {
    seq: u64,
    tenant: Arc<str>,
    at_ms: u64,
    offset: u64,
    len: usize,
}

/// The emit side: hands events of tenants with a webhook to the writer.
/// Cheap to clone; never blocks.
#[derive(Clone)]
pub struct Outbox {
    tx: std_mpsc::Sender<Job>,
    tenants: Arc<HashSet<String>>,
}

impl Outbox {
    /// Queues `event` for its tenant's webhook, if that tenant has one.
    pub fn offer(&self, event: &Event) {
        if let Some(t) = &event.tenant
            && self.tenants.contains(t)
        {
            let _ = self.tx.send(Job::Event(Box::new(event.clone())));
        }
    }
}

/// The running webhook service: the outbox writer thread and the dispatcher.
pub struct Webhooks {
    outbox: Outbox,
    stop: CancellationToken,
    dispatcher: tokio::task::JoinHandle<()>,
    writer_done: oneshot::Receiver<()>,
}

struct Hook {
    target: Target,
    secret: Secret,
}

impl Webhooks {
    /// Opens (replays and compacts) the outbox and starts sending. None
    /// when no tenant has a `webhook_url`.
    pub async fn start(config: &Config, metrics: Arc<Metrics>) -> io::Result<Option<Webhooks>> {
        let mut hooks = HashMap::new();
        for t in &config.tenants {
            if let (Some(url), Some(secret)) = (&t.webhook_url, &t.webhook_secret) {
                let target = Target::parse(url).map_err(io::Error::other)?;
                hooks.insert(
                    t.name.clone(),
                    Arc::new(Hook {
                        target,
                        secret: secret.clone(),
                    }),
                );
            }
        }
        if hooks.is_empty() {
            return Ok(None);
        }
        let path = config.webhook_outbox();
        let (pending, next_seq, len) = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || open_log(&path))
                .await
                .map_err(io::Error::other)??
        };
        if !pending.is_empty() {
            tracing::info!(path = %path.display(), pending = pending.len(), "webhook outbox: resuming pending events");
        }
        let file = OpenOptions::new().append(true).open(&path)?;
        let reader = Arc::new(File::open(&path)?);
        let (tx, rx) = std_mpsc::channel();
        let (fresh_tx, fresh_rx) = mpsc::unbounded_channel();
        let (done_tx, writer_done) = oneshot::channel();
        let writer = Writer {
            file,
            path: path.clone(),
            len,
            next_seq,
            outstanding: pending.len() as u64,
            fresh: fresh_tx,
            metrics: metrics.clone(),
        };
        std::thread::Builder::new()
            .name("webhook-outbox".into())
            .spawn(move || {
                writer.run(rx);
                let _ = done_tx.send(());
            })?;
        let tls = if hooks.values().any(|h| h.target.https) {
            Some(tls_connector())
        } else {
            None
        };
        let stop = CancellationToken::new();
        let d = Dispatcher {
            hooks,
            cfg: config.webhooks.clone(),
            reader,
            metrics,
            done: tx.clone(),
            tls,
        };
        let dispatcher = tokio::spawn(d.run(pending, fresh_rx, stop.clone()));
        let tenants = Arc::new(
            config
                .tenants
                .iter()
                .filter(|t| t.webhook_url.is_some())
                .map(|t| t.name.clone())
                .collect(),
        );
        Ok(Some(Webhooks {
            outbox: Outbox { tx, tenants },
            stop,
            dispatcher,
            writer_done,
        }))
    }

    /// The handle for [`super::Reporter::with_webhooks`].
    pub fn outbox(&self) -> Outbox {
        self.outbox.clone()
    }

    /// Stops sending (requests in flight are abandoned and sent again after
    /// restart) and waits until every event offered so far is on disk.
    /// Call once every [`super::Reporter`] is gone.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let mut dispatcher = self.dispatcher;
        if tokio::time::timeout(Duration::from_secs(5), &mut dispatcher)
            .await
            .is_err()
        {
            dispatcher.abort();
        }
        drop(self.outbox);
        if tokio::time::timeout(Duration::from_secs(5), self.writer_done)
            .await
            .is_err()
        {
            tracing::warn!("webhook outbox writer still busy after 5s");
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Replays the log and rewrites it with the pending events only (temp
/// file, fsync, rename, fsync of the directory). Returns them with their
/// new positions, the next sequence number and the log's length.
fn open_log(path: &Path) -> io::Result<(Vec<Meta>, u64, u64)> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir)?;
    }
    let mut events: BTreeMap<u64, Record> = BTreeMap::new();
    let mut max_seq = 0;
    match File::open(path) {
        Ok(f) => {
            for line in BufReader::new(f).split(b'\n') {
                let line = line?;
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                match serde_json::from_slice::<Record>(&line) {
                    Ok(r @ Record::Event { seq, .. }) => {
                        max_seq = max_seq.max(seq);
                        events.insert(seq, r);
                    }
                    Ok(Record::Done { seq, .. }) => {
                        events.remove(&seq);
                    }
                    // A torn last line from a crash: that event was never
                    // acknowledged to the dispatcher, nor sent.
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "skipping an unreadable webhook outbox line")
                    }
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut buf = Vec::new();
    let mut pending = Vec::new();
    for r in events.values() {
        let offset = buf.len() as u64;
        serde_json::to_writer(&mut buf, r).map_err(io::Error::other)?;
        let len = buf.len() - offset as usize;
        buf.push(b'\n');
        if let Record::Event {
            seq, tenant, at, ..
        } = r
        {
            pending.push(Meta {
                seq: *seq,
                tenant: tenant.as_str().into(),
                at_ms: *at,
                offset,
                len,
            });
        }
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp)?;
    f.write_all(&buf)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok((pending, max_seq + 1, buf.len() as u64))
}

/// The outbox writer thread's state.
struct Writer {
    file: File,
    path: PathBuf,
    /// Length of the log, i.e. the offset of the next record.
    len: u64,
    next_seq: u64,
    /// Events in the log without a `done` record.
    outstanding: u64,
    /// Events on disk, to the dispatcher.
    fresh: mpsc::UnboundedSender<Meta>,
    metrics: Arc<Metrics>,
}

impl Writer {
    /// Appends each batch, fsyncs it, then hands its events on. Ends when
    /// every [`Outbox`] and the dispatcher are gone.
    fn run(mut self, rx: std_mpsc::Receiver<Job>) {
        while let Ok(first) = rx.recv() {
            let mut buf = Vec::new();
            let mut fresh = Vec::new();
            let mut done = 0u64;
            for job in std::iter::once(first).chain(rx.try_iter()) {
                let start = buf.len();
                let ok = match job {
                    Job::Event(ev) => {
                        let Some(tenant) = ev.tenant.clone() else {
                            continue;
                        };
                        // Exactly the bytes the events log writes.
                        let Ok(body) = serde_json::to_string(&ev) else {
                            continue;
                        };
                        let seq = self.next_seq;
                        let at = unix_ms();
                        let r = Record::Event {
                            seq,
                            tenant: tenant.clone(),
                            at,
                            event_id: ev.event_id.clone(),
                            body,
                        };
                        let ok = serde_json::to_writer(&mut buf, &r).is_ok();
                        if ok {
                            self.next_seq += 1;
                            fresh.push(Meta {
                                seq,
                                tenant: tenant.into(),
                                at_ms: at,
                                offset: self.len + start as u64,
                                len: buf.len() - start,
                            });
                        }
                        ok
                    }
                    Job::Done(seq, outcome) => {
                        done += 1;
                        serde_json::to_writer(&mut buf, &Record::Done { seq, outcome }).is_ok()
                    }
                };
                if ok {
                    buf.push(b'\n');
                } else {
                    buf.truncate(start);
                }
            }
            if buf.is_empty() {
                continue;
            }
            if let Err(e) = self
                .file
                .write_all(&buf)
                .and_then(|()| self.file.sync_data())
            {
                // Nothing durable to hand on: say so loudly, count them.
                tracing::error!(path = %self.path.display(), error = %e, events = fresh.len(), "cannot write the webhook outbox; these events will not be sent");
                self.metrics
                    .webhooks_failed
                    .fetch_add(fresh.len() as u64, Ordering::Relaxed);
                // Where the file ends now is unknown: find out.
                self.len = self.file.metadata().map_or(self.len, |m| m.len());
                continue;
            }
            self.len += buf.len() as u64;
            self.outstanding = (self.outstanding + fresh.len() as u64).saturating_sub(done);
            for m in fresh {
                let _ = self.fresh.send(m);
            }
            if self.outstanding == 0 && self.len > TRUNCATE_AT {
                match self.file.set_len(0).and_then(|()| self.file.sync_all()) {
                    Ok(()) => self.len = 0,
                    Err(e) => {
                        tracing::warn!(path = %self.path.display(), error = %e, "cannot empty the webhook outbox")
                    }
                }
            }
        }
    }
}

fn tls_connector() -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    let loaded = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(loaded.certs);
    if roots.is_empty() {
        tracing::warn!("no trusted root certificates found: https webhooks will fail");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("the default provider supports the default versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

struct Dispatcher {
    hooks: HashMap<String, Arc<Hook>>,
    cfg: WebhooksConfig,
    reader: Arc<File>,
    metrics: Arc<Metrics>,
    done: std_mpsc::Sender<Job>,
    tls: Option<tokio_rustls::TlsConnector>,
}

/// A pending event and the failed attempts so far (since start).
struct Item {
    meta: Meta,
    failures: u32,
}

impl Dispatcher {
    async fn run(
        self,
        pending: Vec<Meta>,
        mut fresh: mpsc::UnboundedReceiver<Meta>,
        stop: CancellationToken,
    ) {
        // Due time and sequence → item.
        let mut due: BTreeMap<(Instant, u64), Item> = BTreeMap::new();
        let now = Instant::now();
        for meta in pending {
            due.insert((now, meta.seq), Item { meta, failures: 0 });
        }
        let mut inflight: JoinSet<(Item, Result<(), String>)> = JoinSet::new();
        let mut fresh_open = true;
        let max = self.cfg.max_concurrency.max(1);
        loop {
            let now = Instant::now();
            while inflight.len() < max {
                let Some(entry) = due.first_entry() else {
                    break;
                };
                if entry.key().0 > now {
                    break;
                }
                let item = entry.remove();
                self.start_attempt(&mut inflight, item);
            }
            self.metrics
                .webhooks_backlog
                .store((due.len() + inflight.len()) as u64, Ordering::Relaxed);
            let next = if inflight.len() < max {
                due.keys().next().map(|k| k.0)
            } else {
                None
            };
            tokio::select! {
                _ = stop.cancelled() => break,
                m = fresh.recv(), if fresh_open => match m {
                    Some(meta) => {
                        due.insert((Instant::now(), meta.seq), Item { meta, failures: 0 });
                    }
                    None => fresh_open = false,
                },
                Some(joined) = inflight.join_next() => {
                    // A panicked attempt leaves its event pending on disk.
                    if let Ok((item, result)) = joined {
                        self.settle(&mut due, item, result);
                    }
                }
                _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {}
            }
        }
        inflight.abort_all();
    }

    fn start_attempt(&self, inflight: &mut JoinSet<(Item, Result<(), String>)>, item: Item) {
        let Some(hook) = self.hooks.get(&*item.meta.tenant).cloned() else {
            tracing::warn!(tenant = %item.meta.tenant, seq = item.meta.seq, "webhook event dropped: the tenant has no webhook_url any more");
            self.metrics.webhooks_failed.fetch_add(1, Ordering::Relaxed);
            let _ = self.done.send(Job::Done(item.meta.seq, Outcome::GaveUp));
            return;
        };
        let reader = self.reader.clone();
        let tls = self.tls.clone();
        let timeout = self.cfg.timeout.0;
        inflight.spawn(async move {
            let result = attempt(&reader, &hook, tls.as_ref(), &item.meta, timeout).await;
            (item, result)
        });
    }

    fn settle(
        &self,
        due: &mut BTreeMap<(Instant, u64), Item>,
        mut item: Item,
        result: Result<(), String>,
    ) {
        let seq = item.meta.seq;
        let error = match result {
            Ok(()) => {
                self.metrics
                    .webhooks_delivered
                    .fetch_add(1, Ordering::Relaxed);
                let _ = self.done.send(Job::Done(seq, Outcome::Delivered));
                return;
            }
            Err(e) => e,
        };
        item.failures += 1;
        let wait = backoff(&self.cfg, item.failures, &mut rand::rng());
        let deadline = item.meta.at_ms + self.cfg.retry_for.0.as_millis() as u64;
        if unix_ms() + wait.as_millis() as u64 > deadline {
            tracing::warn!(tenant = %item.meta.tenant, seq, failures = item.failures, error = %error, "webhook given up: no 2xx within webhooks.retry_for");
            self.metrics.webhooks_failed.fetch_add(1, Ordering::Relaxed);
            let _ = self.done.send(Job::Done(seq, Outcome::GaveUp));
            return;
        }
        tracing::info!(tenant = %item.meta.tenant, seq, failures = item.failures, retry_in = ?wait, error = %error, "webhook failed; will retry");
        due.insert((Instant::now() + wait, seq), item);
    }
}

/// The wait after the `failures`-th failure: `backoff_min` doubled per
/// further failure, capped at `backoff_max`, then scaled by a random factor
/// in [0.5, 1] so that many events failing together spread out.
fn backoff(cfg: &WebhooksConfig, failures: u32, rng: &mut impl Rng) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    let base = cfg
        .backoff_min
        .0
        .saturating_mul(1 << exp)
        .min(cfg.backoff_max.0);
    base.mul_f64(rng.random_range(0.5..=1.0))
}

/// One POST of one event: Ok on 2xx.
async fn attempt(
    reader: &Arc<File>,
    hook: &Hook,
    tls: Option<&tokio_rustls::TlsConnector>,
    meta: &Meta,
    timeout: Duration,
) -> Result<(), String> {
    let (event_id, body) = {
        let reader = reader.clone();
        let (offset, len) = (meta.offset, meta.len);
        tokio::task::spawn_blocking(move || {
            let mut line = vec![0; len];
            reader.read_exact_at(&mut line, offset)?;
            match serde_json::from_slice(&line) {
                Ok(Record::Event { event_id, body, .. }) => Ok((event_id, body)),
                _ => Err(io::Error::other("not an event record")),
            }
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("reading the outbox: {e}"))?
    };
    let ts = (unix_ms() / 1000).to_string();
    let secret = hook.secret.expose().as_bytes();
    let t = &hook.target;
    let req = Request::post(t.path_and_query.as_str())
        .header(header::HOST, t.authority.as_str())
        .header(header::CONTENT_TYPE, "application/json")
        .header(
            header::USER_AGENT,
            concat!("herald/", env!("CARGO_PKG_VERSION")),
        )
        .header("X-Herald-Event-Id", event_id.as_str())
        .header("X-Herald-Timestamp", ts.as_str())
        .header("X-Herald-Signature", sign(secret, &[body.as_bytes()]))
        .header(
            "X-Herald-Signature-V2",
            sign(secret, &[ts.as_bytes(), b".", body.as_bytes()]),
        )
        .body(Body::from(body))
        .map_err(|e| format!("bad request: {e}"))?;
    let status = tokio::time::timeout(timeout, async {
        let tcp = tokio::net::TcpStream::connect((t.host.as_str(), t.port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        if t.https {
            let tls = tls.ok_or("no TLS client")?;
            let name = rustls::pki_types::ServerName::try_from(t.host.clone())
                .map_err(|e| format!("server name: {e}"))?;
            let stream = tls
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            send(stream, req).await
        } else {
            send(tcp, req).await
        }
    })
    .await
    .map_err(|_| format!("no answer within {timeout:?}"))??;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("answered {status}"))
    }
}

/// One HTTP/1.1 request on `io`; the answer's status (the body is not
/// read). Also used by the TLS report sender.
pub(super) async fn send<S>(io: S, req: Request<Body>) -> Result<hyper::StatusCode, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let conn = tokio::spawn(conn);
    let resp = sender.send_request(req).await;
    drop(sender);
    conn.abort();
    Ok(resp.map_err(|e| format!("HTTP: {e}"))?.status())
}

/// Fed every event by the bus.
impl super::EventSink for Outbox {
    fn observe(&self, event: &Event) -> Option<Event> {
        self.offer(event);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_sha256_matches_rfc4231_case_2() {
        assert_eq!(
            sign(b"Jefe", &[b"what do ya want ", b"for nothing?"]),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let cfg = WebhooksConfig {
            backoff_min: crate::config::Span(Duration::from_secs(10)),
            backoff_max: crate::config::Span(Duration::from_secs(60)),
            ..WebhooksConfig::default()
        };
        let mut rng = rand::rng();
        for (n, full) in [(1, 10), (2, 20), (3, 40), (4, 60), (40, 60)] {
            let d = backoff(&cfg, n, &mut rng);
            assert!(
                d >= Duration::from_secs(full) / 2 && d <= Duration::from_secs(full),
                "{n}: {d:?}"
            );
        }
    }

    #[test]
    fn urls_are_checked() {
        let t = Target::parse("https://hooks.example.net/herald?x=1").unwrap();
        assert!(t.https);
        assert_eq!((t.host.as_str(), t.port), ("hooks.example.net", 443));
        assert_eq!(t.path_and_query, "/herald?x=1");
        let t = Target::parse("http://127.0.0.1:9000").unwrap();
        assert_eq!((t.port, t.path_and_query.as_str()), (9000, "/"));
        assert!(Target::parse("ftp://x/").is_err());
        assert!(Target::parse("http://u:p@x/").is_err());
        assert!(Target::parse("not a url").is_err());
    }

    #[test]
    fn config_needs_a_secret_with_the_url_and_sane_webhooks_keys() {
        let text = format!(
            r#"
            [[listener]]
            address = "127.0.0.1:2587"
            {}
            webhook_url = "gopher://x/"
            [webhooks]
            max_concurrency = 0
            backoff_min = "1m"
            backoff_max = "10s"
            "#,
            crate::config::test_support::tenant("acme", r#""*@acme.test""#)
        );
        let errs = Config::from_toml_str(&text).unwrap_err();
        let paths: Vec<&str> = errs.0.iter().map(|e| e.path.as_str()).collect();
        for want in [
            "tenant[0].webhook_url",
            "tenant[0].webhook_secret",
            "webhooks.max_concurrency",
            "webhooks.backoff_max",
        ] {
            assert!(paths.contains(&want), "missing {want} in {paths:?}");
        }
        let c = Config::from_toml_str("[[listener]]\naddress = \"127.0.0.1:2587\"\n").unwrap();
        assert_eq!(c.webhooks.retry_for.0, Duration::from_secs(3 * 24 * 3600));
        assert_eq!(c.webhooks.max_concurrency, 8);
        assert!(c.webhook_outbox().ends_with("webhooks.jsonl"));
    }

    #[test]
    fn replay_keeps_only_pending_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("webhooks.jsonl");
        let ev = |seq: u64| Record::Event {
            seq,
            tenant: "acme".into(),
            at: 1,
            event_id: format!("e{seq}"),
            body: "{}".into(),
        };
        let mut text = Vec::new();
        for r in [
            ev(1),
            ev(2),
            Record::Done {
                seq: 1,
                outcome: Outcome::Delivered,
            },
            ev(3),
        ] {
            serde_json::to_writer(&mut text, &r).unwrap();
            text.push(b'\n');
        }
        text.extend_from_slice(b"{\"op\":\"event\",\"seq\":4,\"ten");
        fs::write(&path, &text).unwrap();
        let (pending, next, len) = open_log(&path).unwrap();
        let seqs: Vec<u64> = pending.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, vec![2, 3]);
        assert_eq!(next, 4);
        let bytes = fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, len);
        let m = &pending[1];
        let rec: Record =
            serde_json::from_slice(&bytes[m.offset as usize..m.offset as usize + m.len]).unwrap();
        assert!(matches!(rec, Record::Event { seq: 3, .. }));
    }
}
