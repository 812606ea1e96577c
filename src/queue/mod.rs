//! The queue: the durable spool of accepted messages and the scheduler that
//! hands due recipients to delivery, applies the retry schedule and expires
//! what has waited too long.

pub mod dsn;
pub mod history;

pub mod schedule;
pub mod spool;
pub mod tlsrpt;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::{Notify as Wake, mpsc};
use tokio_util::sync::CancellationToken;

use crate::clock::{rfc3339, unix_now};
use crate::config::Config;
pub use crate::envelope::{Envelope, Notify, QueueId, RcptStatus, Recipient, Ret};
use crate::policy::dkim::Signer;
use crate::reply::{Enhanced, Reply};
use crate::report::tlsrpt::TlsRptCounts;
use crate::report::{Event, EventKind, Reason, Reporter};
use dsn::{DsnRecipient, DsnSettings};
use schedule::{NextStep, RetrySchedule};
use spool::{BodyLoc, Record, Spool};

/// Recipients of one message at one domain, due for an attempt.
#[derive(Clone, Debug)]
pub struct DeliveryJob {
    pub id: QueueId,
    pub envelope: Arc<Envelope>,
    /// The message as it goes on the wire (CRLF line ends, not dot-stuffed).
    pub body: Bytes,
    /// Lower-case recipient domain.
    pub domain: String,
    pub recipients: Vec<JobRecipient>,
    /// The envelope sender for this attempt when it is not the message's
    /// own: a VERP address (one recipient per job then).
    pub return_path: Option<String>,
}

impl DeliveryJob {
    /// The MAIL FROM address of this attempt.
    pub fn sender(&self) -> &str {
        self.return_path.as_deref().unwrap_or(&self.envelope.sender)
    }
}

#[derive(Clone, Debug)]
pub struct JobRecipient {
    /// Index of the recipient within its message.
    pub index: usize,
    pub address: String,
    pub orcpt: Option<String>,
    pub notify: Notify,
    /// This attempt's number, from 1.
    pub attempt: u32,
}

/// What one attempt did for one recipient.
#[derive(Clone, Debug)]
pub struct RcptOutcome {
    pub index: usize,
    pub result: AttemptResult,
    /// The host that answered, when one did.
    pub mx: Option<String>,
    /// The connection's TLS, when it had any.
    pub tls: Option<crate::event::TlsInfo>,
    /// The MX announced DSN, so NOTIFY and ORCPT went on with the message
    /// and success reports are the final hop's to send (RFC 3461 §5.2.2).
    pub next_hop_dsn: bool,
}

#[derive(Clone, Debug)]
pub enum AttemptResult {
    /// The MX took responsibility (2xx after DATA).
    Delivered(Reply),
    /// Try again later: a 4xx, or a local or network problem described as a
    /// 4xx reply (e.g. `451 4.4.1 connection refused by mx1...`).
    Deferred(Reply, Reason),
    /// Give up: a 5xx from the MX, or a permanent fact such as a null MX.
    Bounced(Reply, Reason),
    /// Not attempted (shutdown, destination limit): reschedule without
    /// counting an attempt.
    NotAttempted,
    /// Not attempted because delivery to its domain or for its tenant is
    /// suspended ([`crate::control`]): wait until this Unix time (or a
    /// resume, which makes it due at once) without counting an attempt.
    /// Nothing expires here: the lifetime is enforced at real attempts.
    Held(u64),
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("spool I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("the queue is shutting down")]
    Closed,
}

/// How often the compactor looks for old segments held by few messages.
const COMPACT_EVERY: Duration = Duration::from_secs(30);

/// The queue of one node. Shared by the receive stage (enqueue), delivery
/// (attempt outcomes) and admin (inspection).
///
/// A poisoned lock is taken over, as everywhere in herald: a panic caught in
/// one session or delivery leaves at worst one entry half-updated, and
/// refusing every later message for it would turn one bug into an outage.
pub struct Queue {
    spool: Spool,
    inner: Mutex<Inner>,
    jobs: mpsc::UnboundedSender<DeliveryJob>,
    schedule: RetrySchedule,
    reporter: Reporter,
    /// Wakes the scheduler when a timer earlier than its current one appears.
    wake: Wake,
    closed: AtomicBool,
    /// See `Inner::bytes_in_flight`.
    max_bytes_in_flight: u64,
    /// Bounce reports (RFC 3464); `None` when `[dsn] enabled = false`.
    dsn: Option<DsnSettings>,
    /// This queue, for the tasks that enqueue DSNs.
    me: std::sync::Weak<Queue>,
    /// Finished messages and the Message-ID index.
    history: history::History,
    /// Signs the DSNs the queue writes, like any message herald sends.
    dkim: Arc<Signer>,
    /// Delivery sessions counted for TLS reports (RFC 8460); none when
    /// `[delivery.tls_reports]` is off.
    tls_reports: Option<TlsRptCounts>,
}

#[derive(Default)]
struct Inner {
    messages: HashMap<QueueId, Entry>,
    /// (Unix seconds, id): when a message next has a recipient due.
    timers: BTreeSet<(u64, QueueId)>,
    /// Live messages per segment holding their body.
    live: BTreeMap<u64, usize>,
    /// Segments below this one have been handed to the spool for deletion.
    deleted_below: u64,
    /// The newest segment a message body went to (or the head at start).
    newest_segment: u64,
    /// Enqueues whose record is being written: their segment is not yet in
    /// `live`, so no segment may be deleted meanwhile.
    pending_enqueues: usize,
    /// Body bytes of messages with recipients handed to delivery: what the
    /// scheduler may not push past `max_bytes_in_flight`, so a large backlog
    /// (after a restart, a flush, a slow destination) is not read into
    /// memory all at once.
    bytes_in_flight: u64,
}

struct Entry {
    envelope: Arc<Envelope>,
    recipients: Vec<Recipient>,
    /// Recipients handed to delivery and not yet reported back.
    in_flight: Vec<bool>,
    body: BodyLoc,
    /// This entry's key in `Inner::timers`, when it has one.
    timer: Option<u64>,
}

/// A message as the admin API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct MessageView {
    pub id: QueueId,
    pub envelope: Envelope,
    pub recipients: Vec<Recipient>,
    pub size: u64,
}

impl Queue {
    /// Opens the spool, recovers every message that was accepted and not
    /// finished, and schedules their recipients again. Delivery jobs go to
    /// `jobs`; start the scheduler with [`Queue::run_scheduler`]. Damage
    /// found in the spool is skipped and reported ([`Queue::spool_damage`]);
    /// a disk too full for a new segment is no error either: the queue is
    /// delivered while new messages are refused ([`Queue::spool_full`]).
    pub fn open(
        config: &Config,
        reporter: Reporter,
        jobs: mpsc::UnboundedSender<DeliveryJob>,
    ) -> Result<Arc<Queue>, QueueError> {
        Queue::open_with_dkim(config, reporter, jobs, Arc::new(Signer::empty()))
    }

    /// [`Queue::open`], with the keys that sign the DSNs it writes (the
    /// same [`Signer`] as submitted mail, so the same key choice).
    pub fn open_with_dkim(
        config: &Config,
        reporter: Reporter,
        jobs: mpsc::UnboundedSender<DeliveryJob>,
        dkim: Arc<Signer>,
    ) -> Result<Arc<Queue>, QueueError> {
        let (spool, recovered, head) = Spool::open_with(
            &config.server.spool_dir,
            config.server.spool_segment_size.bytes(),
        )?;
        let now = unix_now();
        let mut inner = Inner {
            newest_segment: head,
            ..Inner::default()
        };
        let history =
            history::History::open(&config.server.spool_dir, config.history.limits(), now)?;
        let mut finished = Vec::new();
        for r in recovered {
            if r.recipients.iter().all(|x| x.status.is_final()) {
                // Finished just before the crash: late bounces and the
                // status API still find it.
                finished.push(r.id);
                history.finished(history::Finished {
                    id: r.id,
                    envelope: r.envelope,
                    recipients: r.recipients,
                    size: r.body.len,
                    finished_at: now,
                });
                continue;
            }
            *inner.live.entry(r.body.segment).or_default() += 1;
            let mut entry = Entry {
                in_flight: vec![false; r.recipients.len()],
                envelope: Arc::new(r.envelope),
                recipients: r.recipients,
                body: r.body,
                timer: None,
            };
            let due = entry.next_due().map(|t| t.max(now));
            set_timer(&mut inner.timers, r.id, &mut entry, due);
            history.accepted(
                r.id,
                &entry.envelope,
                entry.recipients.iter().map(|x| x.address.as_str()),
            );
            inner.messages.insert(r.id, entry);
        }
        if !inner.messages.is_empty() {
            tracing::info!(
                messages = inner.messages.len(),
                "recovered queued messages from the spool"
            );
        }
        for id in finished {
            spool.append(Record::done(id));
        }
        let tls_reports = if config.delivery.tls_reports.enabled {
            Some(TlsRptCounts::open(
                &config.server.spool_dir.join(tlsrpt::DIR),
            )?)
        } else {
            None
        };
        let queue = Arc::new_cyclic(|me| Queue {
            spool,
            inner: Mutex::new(inner),
            jobs,
            schedule: RetrySchedule::from_config(&config.delivery),
            reporter,
            wake: Wake::new(),
            closed: AtomicBool::new(false),
            max_bytes_in_flight: config.delivery.max_bytes_in_flight.bytes(),
            dsn: DsnSettings::from_config(config),
            me: me.clone(),
            history,
            dkim,
            tls_reports,
        });
        queue.collect_segments(&mut queue.inner.lock().unwrap_or_else(PoisonError::into_inner));
        Ok(queue)
    }

    /// Stores a message durably and hands it to delivery. Returns only once
    /// the message is on stable storage: the caller may then answer 250.
    pub async fn enqueue(
        &self,
        id: QueueId,
        envelope: Envelope,
        recipients: Vec<Recipient>,
        body: Bytes,
    ) -> Result<(), QueueError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(QueueError::Closed);
        }
        let record = Record::message(id, &envelope, &recipients, body.clone());
        let started = std::time::Instant::now();
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pending_enqueues += 1;
        let loc = match self.spool.append_durable(record).await {
            Ok(loc) => loc,
            Err(e) => {
                let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
                inner.pending_enqueues -= 1;
                self.collect_segments(&mut inner);
                return Err(e.into());
            }
        };
        let metrics = self.reporter.metrics();
        metrics.enqueue_latency.observe(started.elapsed());
        let envelope = Arc::new(envelope);
        let jobs = {
            let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            *inner.live.entry(loc.segment).or_default() += 1;
            inner.pending_enqueues -= 1;
            inner.newest_segment = inner.newest_segment.max(loc.segment);
            let mut entry = Entry {
                in_flight: vec![false; recipients.len()],
                envelope,
                recipients,
                body: loc,
                timer: None,
            };
            // Handed to delivery with the body it has in memory, unless that
            // would pass max_bytes_in_flight (a slow destination must not
            // keep every accepted body in memory): then the scheduler reads
            // it back from the spool when there is room.
            let room = inner.bytes_in_flight == 0
                || inner.bytes_in_flight + entry.body.len <= self.max_bytes_in_flight;
            let now = unix_now();
            let jobs = if room {
                entry.take_due_jobs(id, now, &body)
            } else {
                Vec::new()
            };
            if entry.busy() {
                inner.bytes_in_flight += entry.body.len;
            } else if let Some(due) = entry.next_due() {
                set_timer(&mut inner.timers, id, &mut entry, Some(due));
                self.wake.notify_one();
            }
            inner.messages.insert(id, entry);
            self.collect_segments(&mut inner);
            jobs
        };
        for job in jobs {
            let _ = self.jobs.send(job);
        }
        Ok(())
    }

    /// Records what an attempt did for some recipients of a message: updates
    /// their state durably, emits their events, and schedules retries.
    pub fn complete_attempt(&self, id: QueueId, outcomes: Vec<RcptOutcome>) {
        let now = unix_now();
        let mut rng = rand::rng();
        let mut events = Vec::new();
        let mut reports: Vec<DsnRecipient> = Vec::new();
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(entry) = inner.messages.get_mut(&id) else {
            return;
        };
        let was_busy = entry.busy();
        for o in outcomes {
            let Some(r) = entry.recipients.get_mut(o.index) else {
                continue;
            };
            entry.in_flight[o.index] = false;
            if r.status.is_final() {
                continue;
            }
            let (kind, reply, class) = match o.result {
                AttemptResult::NotAttempted => {
                    // Not a failure: come back soon, without counting it.
                    r.next_attempt = now + 1;
                    continue;
                }
                AttemptResult::Held(until) => {
                    r.next_attempt = until.max(now + 1);
                    continue;
                }
                AttemptResult::Delivered(reply) => {
                    r.status = RcptStatus::Delivered;
                    let waited = now.saturating_sub(entry.envelope.received_at);
                    let metrics = self.reporter.metrics();
                    metrics
                        .delivery_latency
                        .observe(Duration::from_secs(waited));
                    (EventKind::Delivered, reply, None)
                }
                AttemptResult::Bounced(reply, class) => {
                    r.status = RcptStatus::Bounced;
                    (EventKind::Bounced, reply, Some(class))
                }
                AttemptResult::Deferred(reply, class) => {
                    match self.schedule.next(
                        entry.envelope.received_at,
                        now,
                        r.attempts + 1,
                        &mut rng,
                    ) {
                        NextStep::RetryAt(t) => {
                            r.status = RcptStatus::Deferred;
                            r.next_attempt = t;
                            (EventKind::Deferred, reply, Some(class))
                        }
                        NextStep::Expire => {
                            r.status = RcptStatus::Expired;
                            (EventKind::Expired, reply, Some(class))
                        }
                    }
                }
            };
            r.attempts += 1;
            r.updated_at = now;
            r.last_mx = o.mx.clone();
            let mut ev = Event::for_message(kind, id, &entry.envelope).with_reply(&reply);
            // RFC 3461 §5.2.2: a next hop that speaks DSN got NOTIFY and
            // reports success itself; "relayed" is only for one that did not.
            let relayed_on = kind == EventKind::Delivered && o.next_hop_dsn;
            if let Some(d) = &self.dsn
                && !relayed_on
                && let Some(x) =
                    dsn::on_outcome(d, &entry.envelope, r, kind, &reply, o.mx.as_deref(), now)
            {
                reports.push(x);
            }
            r.last_reply = Some(reply);
            ev.recipient = Some(r.address.clone());
            ev.attempt = Some(r.attempts);
            ev.mx = o.mx;
            ev.tls = o.tls.as_ref().map(|t| t.version.clone());
            if kind == EventKind::Delivered {
                ev.tls_info = o.tls;
            }
            ev.classification = class.map(Reason::classification);
            ev.reason = class.map(|r| r.as_str().to_string());
            match kind {
                EventKind::Deferred => {
                    ev.permanent = Some(false);
                    ev.next_attempt = Some(rfc3339(r.next_attempt));
                }
                EventKind::Bounced | EventKind::Expired => ev.permanent = Some(true),
                _ => {}
            }
            self.spool.append(Record::update(id, o.index, r));
            events.push(ev);
        }
        let report = (!reports.is_empty()).then(|| (entry.envelope.clone(), entry.body, reports));
        if was_busy && !entry.busy() {
            let len = entry.body.len;
            inner.bytes_in_flight = inner.bytes_in_flight.saturating_sub(len);
            self.wake.notify_one();
        }
        // The body is read back off the lock; its segment stays pinned
        // until then, even if this message finishes now.
        if let Some((_, loc, _)) = &report {
            *inner.live.entry(loc.segment).or_default() += 1;
        }
        self.settle(&mut inner, id, now);
        drop(inner);
        if let Some((env, loc, reports)) = report {
            self.send_dsn(id, env, Some(loc), reports);
        }
        for ev in events {
            self.reporter.emit(ev);
        }
    }

    /// Builds one DSN for `reports`, signs it and enqueues it, with the null
    /// sender, to the message's sender: in a task, since the original is
    /// read back from the spool (its segment, when given, was pinned by the
    /// caller; without one the report leaves the original out). The report
    /// is then as durable as any message; one still being built when the
    /// process stops is lost.
    fn send_dsn(
        &self,
        id: QueueId,
        envelope: Arc<Envelope>,
        loc: Option<BodyLoc>,
        reports: Vec<DsnRecipient>,
    ) {
        let (Some(me), Ok(rt), Some(settings)) = (
            self.me.upgrade(),
            tokio::runtime::Handle::try_current(),
            self.dsn.clone(),
        ) else {
            if let Some(loc) = loc {
                self.unpin(loc.segment);
            }
            return;
        };
        rt.spawn(async move {
            let original = match loc {
                Some(loc) => {
                    let spool = me.spool.clone();
                    let read = tokio::task::spawn_blocking(move || spool.read_body(loc)).await;
                    me.unpin(loc.segment);
                    match read {
                        Ok(Ok(b)) => b,
                        _ => {
                            tracing::warn!(queue_id = %id, "cannot read the message back for its DSN; sending the report without it");
                            Vec::new()
                        }
                    }
                }
                None => Vec::new(),
            };
            let dsn_id = QueueId::generate();
            let (token, qid) = (dsn_id.to_string(), id.to_string());
            let report = dsn::Notification {
                reporting_mta: &settings.hostname,
                queue_id: &qid,
                envelope: &envelope,
                recipients: &reports,
                original: &original,
                date: unix_now(),
                token: &token,
                max_full: settings.max_full,
            };
            let dsn_env = Envelope {
                sender: String::new(),
                tenant: None,
                message_id: Some(report.message_id()),
                received_at: unix_now(),
                client_ip: std::net::Ipv4Addr::LOCALHOST.into(),
                smtputf8: !envelope.sender.is_ascii(),
                body_8bit: false,
                ret: None,
                env_id: None,
                require_tls: false,
                ignore_tls_policies: false,
            };
            // Signed like relayed mail (keys of the From: domain, a parent's,
            // or the fallback): a receiver enforcing that domain's DMARC
            // would otherwise drop the report. Should signing fail, the
            // report still goes, unsigned: the sender needs it more than a
            // signature.
            let bytes = match me.dkim.sign(&dsn_env, dsn::build(&report)).await {
                Ok(signed) => signed,
                Err(e) => {
                    tracing::warn!(queue_id = %id, error = %e, "cannot DKIM-sign the DSN; sending it unsigned");
                    dsn::build(&report)
                }
            };
            let to = vec![Recipient::new(envelope.sender.clone())];
            match me.enqueue(dsn_id, dsn_env, to, Bytes::from(bytes)).await {
                Ok(()) => tracing::info!(queue_id = %id, dsn = %dsn_id, "DSN queued for the sender"),
                Err(e) => tracing::warn!(queue_id = %id, error = %e, "cannot queue the DSN"),
            }
        });
    }

    /// A failure reported after delivery by a late bounce to the VERP
    /// return path: that report came to herald, so the message's sender
    /// hears of it only through a DSN from herald, sent under the rules of
    /// [`dsn::late_failure`] and at most once per recipient (while the
    /// history remembers it). The original goes along while the message is
    /// still queued; after that the report stands alone (RFC 6522 §3).
    /// Returns whether a DSN was queued.
    pub fn report_late_failure(
        &self,
        id: QueueId,
        index: usize,
        reply: Reply,
        remote_mta: Option<String>,
    ) -> bool {
        let Some(settings) = &self.dsn else {
            return false;
        };
        let Some(m) = self.find(id) else {
            return false;
        };
        let Some(report) = m.recipients.get(index).and_then(|r| {
            dsn::late_failure(settings, &m.envelope, r, reply, remote_mta, unix_now())
        }) else {
            return false;
        };
        if !self.history.first_report(id, index, history::LATE_DSN) {
            return false;
        }
        let loc = {
            let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            let loc = inner.messages.get(&id).map(|e| e.body);
            if let Some(loc) = &loc {
                *inner.live.entry(loc.segment).or_default() += 1;
            }
            loc
        };
        self.send_dsn(id, Arc::new(m.envelope), loc, vec![report]);
        true
    }

    /// Releases a segment pinned by [`Queue::send_dsn`]'s caller.
    fn unpin(&self, segment: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = inner.live.get_mut(&segment) {
            *n -= 1;
            if *n == 0 {
                inner.live.remove(&segment);
                self.collect_segments(&mut inner);
            }
        }
    }

    /// After a change to a message: drop it when every recipient is final,
    /// otherwise put its timer where its next due recipient says.
    fn settle(&self, inner: &mut Inner, id: QueueId, now: u64) {
        let Some(entry) = inner.messages.get_mut(&id) else {
            return;
        };
        if entry.recipients.iter().all(|r| r.status.is_final()) {
            let entry = inner.messages.remove(&id).expect("present");
            if let Some(t) = entry.timer {
                inner.timers.remove(&(t, id));
            }
            self.spool.append(Record::done(id));
            self.history.finished(history::Finished {
                id,
                envelope: Envelope::clone(&entry.envelope),
                recipients: entry.recipients,
                size: entry.body.len,
                finished_at: now,
            });
            if let Some(n) = inner.live.get_mut(&entry.body.segment) {
                *n -= 1;
                if *n == 0 {
                    inner.live.remove(&entry.body.segment);
                    self.collect_segments(inner);
                }
            }
            return;
        }
        let due = entry.next_due().map(|t| t.max(now));
        let earlier = match (due, inner.timers.first()) {
            (Some(d), Some(&(first, _))) => d < first,
            (Some(_), None) => true,
            _ => false,
        };
        set_timer(&mut inner.timers, id, entry, due);
        if earlier {
            self.wake.notify_one();
        }
    }

    /// Asks the spool to delete the segments no live message needs.
    /// Deletion goes oldest first, up to the oldest segment holding a live
    /// body (or the newest one written to, when nothing is live), and waits
    /// while an enqueue's segment is not yet counted.
    fn collect_segments(&self, inner: &mut Inner) {
        if inner.pending_enqueues > 0 {
            return;
        }
        let below = inner
            .live
            .keys()
            .next()
            .copied()
            .unwrap_or(inner.newest_segment);
        if below > inner.deleted_below {
            inner.deleted_below = below;
            self.spool.delete_below(below);
        }
    }

    /// Runs the scheduler until `shutdown`: hands recipients whose retry
    /// time has come to delivery.
    pub async fn run_scheduler(self: Arc<Self>, shutdown: CancellationToken) {
        tokio::spawn(self.clone().run_compactor(shutdown.clone()));
        loop {
            let wait = {
                let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
                match inner.timers.first() {
                    Some(&(t, _)) => Duration::from_secs(t.saturating_sub(unix_now())),
                    None => Duration::from_secs(3600),
                }
            };
            if !wait.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = self.wake.notified() => continue,
                    _ = shutdown.cancelled() => return,
                }
            }
            if shutdown.is_cancelled() {
                return;
            }
            if !self.dispatch_due().await {
                // At the in-flight limit: wait for deliveries to finish.
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    }

    /// Every [`COMPACT_EVERY`], moves long-waiting messages out of old
    /// segments so those can be deleted (see [`Queue::compact_once`]).
    async fn run_compactor(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(COMPACT_EVERY) => {}
                _ = shutdown.cancelled() => return,
            }
            self.compact_once().await;
        }
    }

    /// Segments are deleted oldest first, so one deferred message would keep
    /// every later segment on disk for up to the queue lifetime. When the
    /// oldest segment with a live body is at least two segments behind the
    /// newest, its live messages are written again at the head (their
    /// current state and body) and it becomes deletable. Returns how many
    /// messages moved.
    pub async fn compact_once(&self) -> usize {
        let (segment, ids) = {
            let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(&segment) = inner.live.keys().next() else {
                return 0;
            };
            if segment + 2 > inner.newest_segment {
                return 0;
            }
            let ids: Vec<(QueueId, BodyLoc)> = inner
                .messages
                .iter()
                .filter(|(_, e)| e.body.segment == segment)
                .map(|(id, e)| (*id, e.body))
                .collect();
            (segment, ids)
        };
        let mut moved = 0;
        for (id, loc) in ids {
            let spool = self.spool.clone();
            let Ok(Ok(body)) = tokio::task::spawn_blocking(move || spool.read_body(loc)).await
            else {
                tracing::warn!(queue_id = %id, "cannot read a body for compaction; segment kept");
                continue;
            };
            // The snapshot and its place in the log are taken under the lock,
            // so no update of this message can fall between them.
            let written = {
                let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
                let Some(e) = inner.messages.get(&id).filter(|e| e.body == loc) else {
                    continue;
                };
                self.spool.append_acked(Record::message(
                    id,
                    &e.envelope,
                    &e.recipients,
                    Bytes::from(body),
                ))
            };
            let new_loc = match written.await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(queue_id = %id, error = %e, "compaction write failed; segment kept");
                    return moved;
                }
            };
            let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            inner.newest_segment = inner.newest_segment.max(new_loc.segment);
            // Finished meanwhile: its Done record follows the copy in the log.
            let Some(e) = inner.messages.get_mut(&id) else {
                continue;
            };
            e.body = new_loc;
            *inner.live.entry(new_loc.segment).or_default() += 1;
            if let Some(n) = inner.live.get_mut(&segment) {
                *n -= 1;
                if *n == 0 {
                    inner.live.remove(&segment);
                }
            }
            moved += 1;
            self.collect_segments(&mut inner);
        }
        if moved > 0 {
            tracing::info!(segment, moved, "compacted spool segment");
        }
        moved
    }

    /// Hands every due recipient to delivery, reading bodies back from disk.
    /// Returns false when it stopped at the in-flight limit with recipients
    /// still due.
    async fn dispatch_due(&self) -> bool {
        let now = unix_now();
        let mut complete = true;
        let due: Vec<(QueueId, BodyLoc)> = {
            let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            let mut out = Vec::new();
            let mut budget = self
                .max_bytes_in_flight
                .saturating_sub(inner.bytes_in_flight);
            while let Some(&(t, id)) = inner.timers.first() {
                if t > now {
                    break;
                }
                let len = inner.messages.get(&id).map_or(0, |e| e.body.len);
                if len > budget && budget < self.max_bytes_in_flight {
                    // Over the limit (a single huge message may still go
                    // when nothing else is in flight).
                    complete = false;
                    break;
                }
                budget = budget.saturating_sub(len);
                inner.timers.pop_first();
                if let Some(e) = inner.messages.get_mut(&id) {
                    e.timer = None;
                    out.push((id, e.body));
                }
            }
            out
        };
        for (id, loc) in due {
            let spool = self.spool.clone();
            let body = match tokio::task::spawn_blocking(move || spool.read_body(loc)).await {
                Ok(Ok(b)) => Bytes::from(b),
                Ok(Err(e)) => {
                    tracing::error!(queue_id = %id, error = %e, "cannot read message body from the spool; retrying later");
                    self.retry_later(id, now + 60);
                    continue;
                }
                Err(_) => {
                    self.retry_later(id, now + 60);
                    continue;
                }
            };
            let jobs = {
                let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
                let Inner {
                    messages,
                    timers,
                    bytes_in_flight,
                    ..
                } = &mut *inner;
                let Some(entry) = messages.get_mut(&id) else {
                    continue;
                };
                let was_busy = entry.busy();
                let jobs = entry.take_due_jobs(id, now, &body);
                if !was_busy && entry.busy() {
                    *bytes_in_flight += entry.body.len;
                }
                let next = entry.next_due();
                set_timer(timers, id, entry, next);
                jobs
            };
            for job in jobs {
                let _ = self.jobs.send(job);
            }
        }
        complete
    }

    fn retry_later(&self, id: QueueId, at: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let Inner {
            messages, timers, ..
        } = &mut *inner;
        if let Some(e) = messages.get_mut(&id) {
            set_timer(timers, id, e, Some(at));
        }
    }

    /// Makes every waiting recipient of a message due now. False when the
    /// message is not in the queue.
    pub fn retry_now(&self, id: QueueId) -> bool {
        let now = unix_now();
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(entry) = inner.messages.get_mut(&id) else {
            return false;
        };
        for r in entry.recipients.iter_mut().filter(|r| !r.status.is_final()) {
            r.next_attempt = now;
        }
        self.settle(&mut inner, id, now);
        self.wake.notify_one();
        true
    }

    /// Makes every waiting recipient of every message due now. Returns the
    /// number of messages in the queue.
    pub fn flush(&self) -> usize {
        let now = unix_now();
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let ids: Vec<QueueId> = inner.messages.keys().copied().collect();
        for &id in &ids {
            if let Some(entry) = inner.messages.get_mut(&id) {
                for r in entry.recipients.iter_mut().filter(|r| !r.status.is_final()) {
                    r.next_attempt = now;
                }
            }
            self.settle(&mut inner, id, now);
        }
        self.wake.notify_one();
        ids.len()
    }

    /// Makes due now every waiting recipient for which `pred` holds (of a
    /// domain or tenant whose delivery was resumed). Returns the number of
    /// messages concerned.
    pub fn retry_where(&self, pred: impl Fn(&Envelope, &Recipient) -> bool) -> usize {
        let now = unix_now();
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let mut ids = Vec::new();
        for (id, entry) in inner.messages.iter_mut() {
            let mut any = false;
            for r in entry.recipients.iter_mut() {
                if !r.status.is_final() && pred(&entry.envelope, r) {
                    r.next_attempt = now;
                    any = true;
                }
            }
            if any {
                ids.push(*id);
            }
        }
        for &id in &ids {
            self.settle(&mut inner, id, now);
        }
        self.wake.notify_one();
        ids.len()
    }

    /// Per recipient domain with unfinished recipients: their number and
    /// the arrival (Unix seconds) of the oldest message among them. For
    /// metrics; walks the whole queue under its lock.
    pub fn waiting_by_domain(&self) -> HashMap<String, (u64, u64)> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out: HashMap<String, (u64, u64)> = HashMap::new();
        for e in inner.messages.values() {
            for r in e.recipients.iter().filter(|r| !r.status.is_final()) {
                let slot = out.entry(r.domain()).or_insert((0, u64::MAX));
                slot.0 += 1;
                slot.1 = slot.1.min(e.envelope.received_at);
            }
        }
        out
    }

    /// Removes a message from the queue without delivering it further.
    pub fn delete(&self, id: QueueId) -> bool {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(entry) = inner.messages.get_mut(&id) else {
            return false;
        };
        let now = unix_now();
        // The app hears of every recipient: a deleted one is "expired"
        // with a reply that says who gave up on it.
        let reply = Reply::new(
            554,
            Enhanced(5, 0, 0),
            "Deleted from the queue by the postmaster; not delivered",
        );
        let mut events = Vec::new();
        // Replies for recipients in flight will find no message: count its
        // body out now.
        let busy_len = if entry.busy() { entry.body.len } else { 0 };
        for (i, r) in entry.recipients.iter_mut().enumerate() {
            if !r.status.is_final() {
                r.status = RcptStatus::Expired;
                r.updated_at = now;
                r.last_reply = Some(reply.clone());
                self.spool.append(Record::update(id, i, r));
                let mut ev =
                    Event::for_message(EventKind::Expired, id, &entry.envelope).with_reply(&reply);
                ev.recipient = Some(r.address.clone());
                ev.attempt = Some(r.attempts);
                ev.classification = Some(Reason::Policy.classification());
                ev.reason = Some(Reason::Policy.as_str().into());
                ev.permanent = Some(true);
                events.push(ev);
            }
        }
        inner.bytes_in_flight = inner.bytes_in_flight.saturating_sub(busy_len);
        self.settle(&mut inner, id, now);
        drop(inner);
        for ev in events {
            self.reporter.emit(ev);
        }
        true
    }

    /// Stops taking messages and makes everything written durable.
    pub async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.spool.close().await;
        // Deliveries have ended: the counts are final until restart.
        if let Some(counts) = &self.tls_reports
            && let Err(e) = counts.flush().await
        {
            tracing::error!(error = %e, "TLS report counts not saved; the sessions since the last save are lost");
        }
    }

    /// Where delivery counts its sessions for TLS reports; none when they
    /// are off.
    pub fn tls_reports(&self) -> Option<&TlsRptCounts> {
        self.tls_reports.as_ref()
    }

    /// Messages in the queue, oldest first.
    pub fn list(&self) -> Vec<MessageView> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let mut v: Vec<MessageView> = inner.messages.iter().map(|(id, e)| e.view(*id)).collect();
        v.sort_by_key(|m| m.id);
        v
    }

    pub fn get(&self, id: QueueId) -> Option<MessageView> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.messages.get(&id).map(|e| e.view(id))
    }

    /// Where events go (and the metrics they feed).
    pub fn reporter(&self) -> &Reporter {
        &self.reporter
    }

    /// Finished messages and the Message-ID index.
    pub fn history(&self) -> &history::History {
        &self.history
    }

    /// What the spool's replay found damaged at start-up, and the files
    /// kept in its `corrupt/` directory.
    pub fn spool_damage(&self) -> spool::SpoolDamage {
        self.spool.damage()
    }

    /// True while the spool has no room for new messages (they are refused
    /// with [`std::io::ErrorKind::StorageFull`]); queued ones are still
    /// delivered.
    pub fn spool_full(&self) -> bool {
        self.spool.is_full()
    }

    /// A message in the queue, or one that finished within the history's
    /// retention.
    pub fn find(&self, id: QueueId) -> Option<MessageView> {
        self.get(id).or_else(|| {
            self.history.get(id).map(|f| MessageView {
                id: f.id,
                envelope: f.envelope,
                recipients: f.recipients,
                size: f.size,
            })
        })
    }

    /// Number of messages not yet finished.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .messages
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Moves a message's timer to `due` (or removes it).
fn set_timer(timers: &mut BTreeSet<(u64, QueueId)>, id: QueueId, e: &mut Entry, due: Option<u64>) {
    if let Some(t) = e.timer.take() {
        timers.remove(&(t, id));
    }
    if let Some(t) = due {
        timers.insert((t, id));
        e.timer = Some(t);
    }
}

impl Entry {
    fn busy(&self) -> bool {
        self.in_flight.iter().any(|b| *b)
    }

    /// The earliest next attempt among recipients that still need one and
    /// are not in flight.
    fn next_due(&self) -> Option<u64> {
        self.recipients
            .iter()
            .zip(&self.in_flight)
            .filter(|(r, busy)| !r.status.is_final() && !**busy)
            .map(|(r, _)| r.next_attempt)
            .min()
    }

    /// Marks every due recipient in flight and groups them by domain into
    /// delivery jobs.
    fn take_due_jobs(&mut self, id: QueueId, now: u64, body: &Bytes) -> Vec<DeliveryJob> {
        let mut by_domain: Vec<DeliveryJob> = Vec::new();
        for (index, r) in self.recipients.iter().enumerate() {
            if r.status.is_final() || self.in_flight[index] || r.next_attempt > now {
                continue;
            }
            self.in_flight[index] = true;
            let domain = r.domain();
            let jr = JobRecipient {
                index,
                address: r.address.clone(),
                orcpt: r.orcpt.clone(),
                notify: r.notify,
                attempt: r.attempts + 1,
            };
            match by_domain.iter_mut().find(|j| j.domain == domain) {
                Some(j) => j.recipients.push(jr),
                None => by_domain.push(DeliveryJob {
                    id,
                    envelope: self.envelope.clone(),
                    body: body.clone(),
                    domain,
                    recipients: vec![jr],
                    return_path: None,
                }),
            }
        }
        by_domain
    }

    fn view(&self, id: QueueId) -> MessageView {
        MessageView {
            id,
            envelope: (*self.envelope).clone(),
            recipients: self.recipients.clone(),
            size: self.body.len,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &std::path::Path) -> Config {
        let text = format!(
            r#"
            [server]
            spool_dir = "{}"
            [[listener]]
            address = "127.0.0.1:0"
            [delivery]
            retry = ["1h"]
            retry_jitter = 0.0
            "#,
            dir.display()
        );
        Config::from_toml_str(&text).unwrap()
    }

    /// One recipient's outcome, with no MX or TLS detail.
    /// Spool segment files in `dir` (the history file lives there too).
    fn segment_files(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                !name.to_string_lossy().starts_with("history")
            })
            .count()
    }

    fn only(index: usize, result: AttemptResult) -> Vec<RcptOutcome> {
        vec![RcptOutcome {
            index,
            result,
            mx: None,
            tls: None,
            next_hop_dsn: false,
        }]
    }

    fn envelope() -> Envelope {
        Envelope {
            sender: "billing@acme.example".into(),
            tenant: Some("acme".into()),
            message_id: Some("<1@acme.example>".into()),
            received_at: unix_now(),
            client_ip: "127.0.0.1".parse().unwrap(),
            smtputf8: false,
            body_8bit: false,
            ret: None,
            env_id: None,
            require_tls: false,
            ignore_tls_policies: false,
        }
    }

    #[tokio::test]
    async fn enqueue_dispatches_per_domain_and_outcomes_persist() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let q = Queue::open(&cfg, Reporter::discard(), tx).unwrap();
        let id = QueueId::generate();
        let rcpts = vec![
            Recipient::new("a@one.test".into()),
            Recipient::new("b@two.test".into()),
            Recipient::new("c@one.test".into()),
        ];
        q.enqueue(
            id,
            envelope(),
            rcpts,
            Bytes::from_static(b"Subject: x\r\n\r\nhi\r\n"),
        )
        .await
        .unwrap();
        let j1 = rx.recv().await.unwrap();
        let j2 = rx.recv().await.unwrap();
        assert_eq!(j1.domain, "one.test");
        assert_eq!(j1.recipients.len(), 2);
        assert_eq!(j2.domain, "two.test");
        assert_eq!(&j1.body[..], b"Subject: x\r\n\r\nhi\r\n");

        let ok = Reply::new(250, Enhanced(2, 0, 0), "ok");
        let later = Reply::new(451, Enhanced(4, 3, 0), "later");
        q.complete_attempt(
            id,
            vec![
                RcptOutcome {
                    index: 0,
                    result: AttemptResult::Delivered(ok.clone()),
                    mx: Some("mx.one.test".into()),
                    tls: None,
                    next_hop_dsn: false,
                },
                RcptOutcome {
                    index: 2,
                    result: AttemptResult::Bounced(
                        Reply::new(550, Enhanced(5, 1, 1), "no"),
                        Reason::UserUnknown,
                    ),
                    mx: None,
                    tls: None,
                    next_hop_dsn: false,
                },
            ],
        );
        q.complete_attempt(id, only(1, AttemptResult::Deferred(later, Reason::Other)));
        let view = q.get(id).unwrap();
        let st: Vec<_> = view.recipients.iter().map(|r| r.status).collect();
        assert_eq!(
            st,
            [
                RcptStatus::Delivered,
                RcptStatus::Deferred,
                RcptStatus::Bounced
            ]
        );
        assert!(view.recipients[1].next_attempt >= unix_now() + 3500);
        q.close().await;

        // After a restart the deferred recipient is still waiting, and only it.
        let (tx, _rx) = mpsc::unbounded_channel();
        let q = Queue::open(&cfg, Reporter::discard(), tx).unwrap();
        let view = q.get(id).unwrap();
        let st: Vec<_> = view.recipients.iter().map(|r| r.status).collect();
        assert_eq!(
            st,
            [
                RcptStatus::Delivered,
                RcptStatus::Deferred,
                RcptStatus::Bounced
            ]
        );
        assert_eq!(view.recipients[1].attempts, 1);
        q.close().await;
    }

    #[tokio::test]
    async fn finished_messages_leave_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let q = Queue::open(&cfg, Reporter::discard(), tx).unwrap();
        let id = QueueId::generate();
        q.enqueue(
            id,
            envelope(),
            vec![Recipient::new("a@one.test".into())],
            Bytes::from_static(b"x\r\n"),
        )
        .await
        .unwrap();
        let job = rx.recv().await.unwrap();
        q.complete_attempt(
            job.id,
            only(
                0,
                AttemptResult::Delivered(Reply::new(250, Enhanced(2, 0, 0), "ok")),
            ),
        );
        assert!(q.is_empty());
        q.close().await;
        let (tx, _rx) = mpsc::unbounded_channel();
        let q = Queue::open(&cfg, Reporter::discard(), tx).unwrap();
        assert!(q.is_empty());
        q.close().await;
        // Only the newest (empty) head segment remains after collection.
        let (tx, _rx) = mpsc::unbounded_channel();
        let q = Queue::open(&cfg, Reporter::discard(), tx).unwrap();
        q.close().await;
        let segs = std::fs::read_dir(dir.path()).unwrap().count();
        assert!(segs <= 2, "old segments should be deleted, found {segs}");
    }

    #[tokio::test]
    async fn segments_are_deleted_while_running() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.server.spool_segment_size = crate::config::Size(1024);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let q = Queue::open(&cfg, Reporter::discard(), tx).unwrap();
        for round in 0..3 {
            for _ in 0..4 {
                let id = QueueId::generate();
                let body = Bytes::from(vec![b'x'; 700]);
                q.enqueue(
                    id,
                    envelope(),
                    vec![Recipient::new("a@one.test".into())],
                    body,
                )
                .await
                .unwrap();
            }
            for _ in 0..4 {
                let job = rx.recv().await.unwrap();
                q.complete_attempt(
                    job.id,
                    only(
                        0,
                        AttemptResult::Delivered(Reply::new(250, Enhanced(2, 0, 0), "ok")),
                    ),
                );
            }
            assert!(q.is_empty());
            // Let the writer act on the deletions: a durable append is
            // processed after every request queued before it.
            let probe = QueueId::generate();
            q.enqueue(
                probe,
                envelope(),
                vec![Recipient::new("a@one.test".into())],
                Bytes::new(),
            )
            .await
            .unwrap();
            let job = rx.recv().await.unwrap();
            q.complete_attempt(
                job.id,
                only(
                    0,
                    AttemptResult::Delivered(Reply::new(250, Enhanced(2, 0, 0), "ok")),
                ),
            );
            let files = segment_files(dir.path());
            assert!(files <= 3, "round {round}: {files} segment files kept");
        }
        q.close().await;
    }

    #[tokio::test]
    async fn compaction_frees_old_segments_and_keeps_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.server.spool_segment_size = crate::config::Size(1024);
        let ok = || AttemptResult::Delivered(Reply::new(250, Enhanced(2, 0, 0), "ok"));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let q = Queue::open(&cfg, Reporter::discard(), tx).unwrap();
        // One message stays deferred: it pins its segment.
        let keep = QueueId::generate();
        let body = Bytes::from(vec![b'k'; 700]);
        q.enqueue(
            keep,
            envelope(),
            vec![Recipient::new("a@one.test".into())],
            body.clone(),
        )
        .await
        .unwrap();
        rx.recv().await.unwrap();
        q.complete_attempt(
            keep,
            only(
                0,
                AttemptResult::Deferred(Reply::new(451, Enhanced(4, 0, 0), "later"), Reason::Other),
            ),
        );
        // Traffic after it fills several more segments and is delivered.
        for _ in 0..8 {
            let id = QueueId::generate();
            q.enqueue(
                id,
                envelope(),
                vec![Recipient::new("b@one.test".into())],
                Bytes::from(vec![b'x'; 700]),
            )
            .await
            .unwrap();
            let job = rx.recv().await.unwrap();
            q.complete_attempt(job.id, only(0, ok()));
        }
        let segments = || segment_files(dir.path());
        let before = segments();
        assert!(before >= 4, "the deferred message pins {before} segments");
        assert_eq!(q.compact_once().await, 1);
        assert_eq!(q.compact_once().await, 0, "nothing left to move");
        // A durable write orders the writer after the deletions.
        let probe = QueueId::generate();
        q.enqueue(
            probe,
            envelope(),
            vec![Recipient::new("c@one.test".into())],
            Bytes::new(),
        )
        .await
        .unwrap();
        let after = segments();
        assert!(after <= 2, "old segments deleted: {before} -> {after}");
        q.close().await;

        let (tx, _rx) = mpsc::unbounded_channel();
        let q = Queue::open(&cfg, Reporter::discard(), tx).unwrap();
        let v = q.get(keep).expect("compacted message recovered");
        assert_eq!(v.recipients[0].status, RcptStatus::Deferred);
        assert_eq!(v.recipients[0].attempts, 1);
        let loc = q.inner.lock().unwrap().messages[&keep].body;
        assert_eq!(q.spool.read_body(loc).unwrap(), &body[..]);
        q.close().await;
    }

    #[tokio::test]
    async fn backlog_is_read_into_memory_only_up_to_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let q = Queue::open(&cfg, Reporter::discard(), tx).unwrap();
        let later =
            || AttemptResult::Deferred(Reply::new(451, Enhanced(4, 0, 0), "later"), Reason::Other);
        for _ in 0..3 {
            let id = QueueId::generate();
            q.enqueue(
                id,
                envelope(),
                vec![Recipient::new("a@one.test".into())],
                Bytes::from(vec![b'x'; 600]),
            )
            .await
            .unwrap();
            rx.recv().await.unwrap();
            q.complete_attempt(id, only(0, later()));
        }
        q.close().await;

        cfg.delivery.max_bytes_in_flight = crate::config::Size(1000);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let q = Queue::open(&cfg, Reporter::discard(), tx).unwrap();
        for m in q.list() {
            q.retry_now(m.id);
        }
        assert!(!q.dispatch_due().await, "limit reached with recipients due");
        let first = rx.try_recv().expect("one job within the limit");
        assert!(rx.try_recv().is_err(), "the second would pass the limit");
        q.complete_attempt(first.id, only(0, later()));
        assert!(!q.dispatch_due().await);
        let second = rx.try_recv().expect("room again after a reply");
        assert_ne!(second.id, first.id);
        assert!(rx.try_recv().is_err());
        q.close().await;
    }

    /// Freshly accepted messages count against the in-flight limit too: past
    /// it they wait on disk (their in-memory body is not kept) and are read
    /// back once deliveries finish.
    #[tokio::test]
    async fn new_messages_past_the_in_flight_limit_wait_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.delivery.max_bytes_in_flight = crate::config::Size(1000);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let q = Queue::open(&cfg, Reporter::discard(), tx).unwrap();
        let mut ids = Vec::new();
        for i in 0..3 {
            let id = QueueId::generate();
            q.enqueue(
                id,
                envelope(),
                vec![Recipient::new("a@one.test".into())],
                Bytes::from(vec![b'a' + i; 600]),
            )
            .await
            .unwrap();
            ids.push(id);
        }
        let first = rx.try_recv().expect("the first goes at once");
        assert_eq!(first.id, ids[0]);
        assert!(rx.try_recv().is_err(), "the others would pass the limit");
        q.complete_attempt(first.id, only(0, delivered()));
        assert!(!q.dispatch_due().await, "one more fits, not two");
        let second = rx.try_recv().expect("room again");
        assert_eq!(second.id, ids[1]);
        assert_eq!(
            &second.body[..],
            &[b'b'; 600][..],
            "read back from the spool"
        );
        assert!(rx.try_recv().is_err());
        q.close().await;
    }

    #[tokio::test]
    async fn retry_expires_after_lifetime() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.delivery.max_queue_lifetime = crate::config::Span(Duration::from_secs(60));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let q = Queue::open(&cfg, Reporter::discard(), tx).unwrap();
        let id = QueueId::generate();
        let mut env = envelope();
        env.received_at -= 120;
        q.enqueue(
            id,
            env,
            vec![Recipient::new("a@one.test".into())],
            Bytes::new(),
        )
        .await
        .unwrap();
        rx.recv().await.unwrap();
        q.complete_attempt(
            id,
            only(
                0,
                AttemptResult::Deferred(
                    Reply::new(451, Enhanced(4, 4, 1), "refused"),
                    Reason::Network,
                ),
            ),
        );
        assert!(
            q.get(id).is_none(),
            "expired recipient finishes the message"
        );
        q.close().await;
    }

    /// Every test below finishes within this.
    async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(60), f)
            .await
            .expect("test finished in time")
    }

    fn deferred() -> AttemptResult {
        AttemptResult::Deferred(Reply::new(451, Enhanced(4, 0, 0), "later"), Reason::Other)
    }

    fn delivered() -> AttemptResult {
        AttemptResult::Delivered(Reply::new(250, Enhanced(2, 0, 0), "ok"))
    }

    /// Queues `n` messages with one recipient each, left deferred.
    /// A closed spool in `dir` holding `n` deferred messages: its config,
    /// their ids and where each body is.
    async fn closed_spool(dir: &std::path::Path, n: usize) -> (Config, Vec<QueueId>, Vec<BodyLoc>) {
        let cfg = config(dir);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let q = Queue::open(&cfg, Reporter::discard(), tx).unwrap();
        let ids = queue_deferred(&q, &mut rx, n).await;
        let bodies = {
            let inner = q.inner.lock().unwrap();
            ids.iter().map(|id| inner.messages[id].body).collect()
        };
        q.close().await;
        (cfg, ids, bodies)
    }

    async fn queue_deferred(
        q: &Queue,
        rx: &mut mpsc::UnboundedReceiver<DeliveryJob>,
        n: usize,
    ) -> Vec<QueueId> {
        let mut ids = Vec::new();
        for i in 0..n {
            let id = QueueId::generate();
            let body = format!("Subject: {i}\r\n\r\nmessage {i}\r\n");
            q.enqueue(
                id,
                envelope(),
                vec![Recipient::new(format!("r{i}@one.test"))],
                Bytes::from(body),
            )
            .await
            .unwrap();
            rx.recv().await.unwrap();
            q.complete_attempt(id, only(0, deferred()));
            ids.push(id);
        }
        ids
    }

    /// Makes every message due, hands them to delivery and reports each
    /// delivered; returns the bodies delivered.
    async fn deliver_all(q: &Queue, rx: &mut mpsc::UnboundedReceiver<DeliveryJob>) -> Vec<Bytes> {
        q.flush();
        q.dispatch_due().await;
        let mut bodies = Vec::new();
        while let Ok(job) = rx.try_recv() {
            bodies.push(job.body.clone());
            q.complete_attempt(job.id, only(0, delivered()));
        }
        bodies
    }

    /// A durable write the writer handles after every earlier request.
    async fn probe(q: &Queue, rx: &mut mpsc::UnboundedReceiver<DeliveryJob>) {
        let id = QueueId::generate();
        q.enqueue(
            id,
            envelope(),
            vec![Recipient::new("p@one.test".into())],
            Bytes::new(),
        )
        .await
        .unwrap();
        let job = rx.recv().await.unwrap();
        q.complete_attempt(job.id, only(0, delivered()));
    }

    fn corrupt_files(dir: &std::path::Path) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(dir.join("corrupt")) else {
            return Vec::new();
        };
        entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }

    #[tokio::test]
    async fn one_damaged_record_loses_one_message_and_its_segment_is_kept() {
        within(async {
            let dir = tempfile::tempdir().unwrap();
            let (cfg, ids, bodies) = closed_spool(dir.path(), 60).await;
            let hit = bodies[17];
            let path = dir.path().join(format!("seg-{:016}.log", hit.segment));
            let mut bytes = std::fs::read(&path).unwrap();
            bytes[hit.offset as usize + 3] ^= 0x01;
            std::fs::write(&path, bytes).unwrap();

            let (tx, mut rx) = mpsc::unbounded_channel();
            let q = Queue::open(&cfg, Reporter::discard(), tx).unwrap();
            assert_eq!(q.len(), 59);
            assert!(q.get(ids[17]).is_none());
            let damage = q.spool_damage();
            assert_eq!(damage.lost_queue_ids, [ids[17]]);
            assert_eq!((damage.damaged_segments, damage.skipped_records), (1, 1));
            let bodies = deliver_all(&q, &mut rx).await;
            assert_eq!(bodies.len(), 59);
            assert!(q.is_empty());
            probe(&q, &mut rx).await;
            // Delivered, so its segment would go: it is kept instead.
            assert!(!path.exists());
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            assert_eq!(corrupt_files(dir.path()), [name]);
            assert_eq!(
                q.spool_damage().quarantined,
                [dir.path().join("corrupt").join(path.file_name().unwrap())]
            );
            q.close().await;
        })
        .await;
    }

    #[tokio::test]
    async fn a_damaged_segment_magic_loses_no_message() {
        within(async {
            let dir = tempfile::tempdir().unwrap();
            let (cfg, _, bodies) = closed_spool(dir.path(), 60).await;
            let seg = bodies[0].segment;
            let path = dir.path().join(format!("seg-{seg:016}.log"));
            let mut bytes = std::fs::read(&path).unwrap();
            bytes[2] ^= 0x20;
            std::fs::write(&path, bytes).unwrap();

            let (tx, mut rx) = mpsc::unbounded_channel();
            let q = Queue::open(&cfg, Reporter::discard(), tx).unwrap();
            assert_eq!(q.len(), 60);
            assert!(q.spool_damage().lost_queue_ids.is_empty());
            assert_eq!(deliver_all(&q, &mut rx).await.len(), 60);
            probe(&q, &mut rx).await;
            assert_eq!(corrupt_files(dir.path()).len(), 1);
            q.close().await;
        })
        .await;
    }

    #[tokio::test]
    async fn a_segment_number_past_counting_does_not_stop_the_queue() {
        within(async {
            let dir = tempfile::tempdir().unwrap();
            let (cfg, _, bodies) = closed_spool(dir.path(), 2).await;
            let seg = bodies[0].segment;
            std::fs::rename(
                dir.path().join(format!("seg-{seg:016}.log")),
                dir.path().join(format!("seg-{}.log", u64::MAX)),
            )
            .unwrap();
            // Restarts, each on the spool the previous one left.
            for _ in 0..2 {
                let (tx, _rx) = mpsc::unbounded_channel();
                let q = Queue::open(&cfg, Reporter::discard(), tx).unwrap();
                assert_eq!(q.len(), 2);
                q.close().await;
            }
            let (tx, mut rx) = mpsc::unbounded_channel();
            let q = Queue::open(&cfg, Reporter::discard(), tx).unwrap();
            let bodies = deliver_all(&q, &mut rx).await;
            assert_eq!(bodies.len(), 2);
            assert!(
                bodies
                    .iter()
                    .any(|b| &b[..] == b"Subject: 0\r\n\r\nmessage 0\r\n")
            );
            assert!(q.is_empty());
            q.close().await;
        })
        .await;
    }

    /// Waits (polling, bounded) until the spool takes messages again.
    async fn until_writable(q: &Queue) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while q.spool_full() {
            assert!(
                std::time::Instant::now() < deadline,
                "spool still full after 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_queue_on_a_full_disk_starts_delivers_and_recovers() {
        // Room for three segments (each has 4 MiB of zeros ahead).
        let Some(tmp) = spool::tmpfs::Tmpfs::mount("12m") else {
            return;
        };
        within(async {
            let (cfg, ids, _) = closed_spool(&tmp.path().join("spool"), 2).await;

            // Herald stopped; meanwhile the disk filled up.
            let filler = tmp.fill();
            let (tx, mut rx) = mpsc::unbounded_channel();
            let q = Queue::open(&cfg, Reporter::discard(), tx).unwrap();
            assert_eq!(q.len(), 2);
            assert!(q.spool_full());
            let refused = q
                .enqueue(
                    QueueId::generate(),
                    envelope(),
                    vec![Recipient::new("n@one.test".into())],
                    Bytes::new(),
                )
                .await;
            match refused {
                Err(QueueError::Io(e)) => {
                    assert_eq!(e.kind(), std::io::ErrorKind::StorageFull, "{e}")
                }
                other => panic!("expected StorageFull, got {other:?}"),
            }
            // Queued mail still goes out; its Done record waits in memory.
            q.retry_now(ids[0]);
            q.dispatch_due().await;
            let job = rx.try_recv().expect("a recovered message is delivered");
            assert_eq!(&job.body[..], b"Subject: 0\r\n\r\nmessage 0\r\n");
            q.complete_attempt(job.id, only(0, delivered()));
            // The postmaster makes room: the spool notices by itself.
            std::fs::remove_file(filler).unwrap();
            until_writable(&q).await;
            let later = QueueId::generate();
            q.enqueue(
                later,
                envelope(),
                vec![Recipient::new("l@one.test".into())],
                Bytes::new(),
            )
            .await
            .unwrap();
            rx.recv().await.unwrap();
            q.complete_attempt(later, only(0, deferred()));
            q.close().await;

            // Full again; this time delivering the queue makes the room.
            let filler = tmp.fill();
            let (tx, mut rx) = mpsc::unbounded_channel();
            let q = Queue::open(&cfg, Reporter::discard(), tx).unwrap();
            let mut left: Vec<QueueId> = q.list().iter().map(|m| m.id).collect();
            left.sort();
            let mut want = vec![ids[1], later];
            want.sort();
            assert_eq!(left, want, "the Done record kept in memory was written");
            assert!(q.spool_full());
            assert_eq!(deliver_all(&q, &mut rx).await.len(), 2);
            until_writable(&q).await;
            q.enqueue(
                QueueId::generate(),
                envelope(),
                vec![Recipient::new("m@one.test".into())],
                Bytes::new(),
            )
            .await
            .unwrap();
            q.close().await;
            drop(filler);
        })
        .await;
    }
}
