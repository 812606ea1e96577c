//! Reporting: the bus every stage emits events on ([`Reporter`]; see
//! [`crate::event`] for the events), which counts each in the metrics and
//! hands it to the sinks registered with it, knowing them only as
//! [`EventSink`]s; and the sinks that tell the world: the events log,
//! appended to as JSON lines by one writer task so that sessions and
//! deliveries never wait on that file; signed webhooks from a durable
//! outbox ([`webhook`]); the Redis events stream ([`stream`]). The
//! suppression list and the reputation guard are sinks too, registered by
//! the server at start-up.

pub mod stream;
pub mod tlsrpt;
pub mod webhook;

use std::path::{Path, PathBuf};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

pub use crate::event::{Classification, Event, EventKind, Reason, SmtpDetail};
use crate::metrics::Metrics;

/// A consumer of events, registered with [`Reporter::add_sink`].
pub trait EventSink: Send + Sync {
    /// Takes one event; must not block (hand work to a task of its own).
    /// May return an event this one caused (a tenant paused for its
    /// reputation), which is emitted after every sink has seen this one.
    fn observe(&self, event: &Event) -> Option<Event>;
}

/// The bus: cheap to clone, never blocks. Every clone shares the sinks, so
/// a sink added at any time sees every later event of every clone.
#[derive(Clone)]
pub struct Reporter {
    /// Counters fed by every event: relaxed atomics, so emit stays cheap.
    metrics: Arc<Metrics>,
    sinks: Arc<RwLock<Vec<Arc<dyn EventSink>>>>,
    /// Set to have the events log reopened at its path (log rotation).
    reopen: Arc<AtomicBool>,
}

impl Default for Reporter {
    fn default() -> Self {
        Reporter::new()
    }
}

impl Reporter {
    /// A bus with fresh metrics and no sink yet (events are only counted).
    pub fn new() -> Reporter {
        Reporter {
            metrics: Default::default(),
            sinks: Default::default(),
            reopen: Default::default(),
        }
    }

    /// Has the events log closed and opened again at its path, after what
    /// was written so far (SIGHUP, SIGUSR1: `logrotate` has moved it).
    pub fn reopen_log(&self) {
        self.reopen.store(true, Ordering::Release);
    }

    /// A reporter for tools that need no record: events are counted only.
    pub fn discard() -> Reporter {
        Reporter::new()
    }

    /// Hands every later event to `sink` as well, after the sinks added
    /// before it.
    pub fn add_sink(&self, sink: Arc<dyn EventSink>) {
        self.sinks
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(sink);
    }

    /// The metrics this reporter's events are counted in.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn emit(&self, event: Event) {
        // The events log is the record; this line is for debugging only, so
        // that the hot path does not format and write a line per event.
        tracing::debug!(
            event = ?event.event,
            queue_id = event.queue_id.map(|q| q.to_string()).unwrap_or_default(),
            recipient = event.recipient.as_deref().unwrap_or(""),
            smtp = event.smtp.as_ref().map(|s| s.to_string()).unwrap_or_default(),
            "event"
        );
        self.metrics.observe(&event);
        let caused: Vec<Event> = self
            .sinks
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter_map(|s| s.observe(&event))
            .collect();
        for e in caused {
            self.emit(e);
        }
    }
}

/// The events log: appends every event to `[events] log` as a JSON line,
/// from a task of its own on a tick, so that sessions and deliveries never
/// wait on the file.
struct EventLog {
    tx: mpsc::UnboundedSender<Event>,
}

impl EventSink for EventLog {
    fn observe(&self, event: &Event) -> Option<Event> {
        let _ = self.tx.send(event.clone());
        None
    }
}

impl Reporter {
    /// A reporter whose events are written to the events log at `path` by a
    /// writer task; the task ends once every clone of the reporter is gone,
    /// after writing what is left.
    pub async fn start(path: &Path) -> std::io::Result<(Reporter, tokio::task::JoinHandle<()>)> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir).await?;
        }
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let reporter = Reporter::new();
        let task = tokio::spawn(write_events(
            file,
            path.to_path_buf(),
            rx,
            reporter.reopen.clone(),
        ));
        reporter.add_sink(Arc::new(EventLog { tx }));
        Ok((reporter, task))
    }
}

/// How often the writer collects queued events. Polling on a tick instead of
/// waiting on the channel means an event costs its sender no wake-up of
/// another thread (see PERFORMANCE.md: cross-core wake-ups are expensive).
const WRITE_TICK: std::time::Duration = std::time::Duration::from_millis(20);

/// Appends the queued events every [`WRITE_TICK`] and flushes once per
/// batch; when asked to, reopens the file at `path` between two batches,
/// so every event lands whole in the old file or the new one. The log
/// closes when every [`Reporter`] is dropped, after writing what is left.
async fn write_events(
    file: tokio::fs::File,
    path: PathBuf,
    mut rx: mpsc::UnboundedReceiver<Event>,
    reopen: Arc<AtomicBool>,
) {
    let mut out = tokio::io::BufWriter::new(file);
    let mut buf = Vec::new();
    let mut tick = tokio::time::interval(WRITE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        buf.clear();
        let closed = loop {
            match rx.try_recv() {
                Ok(ev) => {
                    if serde_json::to_writer(&mut buf, &ev).is_ok() {
                        buf.push(b'\n');
                    }
                }
                Err(mpsc::error::TryRecvError::Empty) => break false,
                Err(mpsc::error::TryRecvError::Disconnected) => break true,
            }
        };
        if !buf.is_empty()
            && let Err(e) = async {
                out.write_all(&buf).await?;
                out.flush().await
            }
            .await
        {
            tracing::error!(path = %path.display(), error = %e, "cannot write events log");
        }
        if closed {
            return;
        }
        if reopen.swap(false, Ordering::AcqRel) {
            // Opened before the old one is let go: should that fail, the
            // events keep going to the old file rather than nowhere.
            match tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .await
            {
                Ok(file) => {
                    out = tokio::io::BufWriter::new(file);
                    tracing::info!(path = %path.display(), "events log reopened");
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "cannot reopen the events log; still writing to the old file");
                }
            }
        }
    }
}
