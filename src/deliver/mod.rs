//! Delivery to the recipients' MX hosts.
//!
//! The queue hands over [`DeliveryJob`]s (one message, the recipients at one
//! domain). The dispatcher groups them per domain in a ready queue and runs
//! at most `delivery.max_connections_per_domain` connection tasks per
//! domain. A connection task resolves the domain's MX hosts (RFC 5321 §5.1,
//! null MX per RFC 7505), tries each host's addresses in turn until one
//! greets and answers EHLO, upgrades with STARTTLS per `delivery.starttls`
//! (RFC 3207, opportunistic per RFC 7435), and then delivers job after job
//! over that connection: up to `max_messages_per_connection`, waiting up to
//! `idle_timeout` for more. Every job is reported back with one outcome per
//! recipient through [`Queue::complete_attempt`].
//!
//! Mail of a tenant or sender domain routed through a smarthost
//! ([`smarthost`]) goes to that smarthost's own pool instead, all of a
//! message's recipients in one job, without VERP.
//!
//! What it trusts: the jobs (the receive stage checked addresses and the
//! body's line ends). Nothing from DNS or the remote server: their failures
//! become synthesized 4xx replies, and only a remote 5xx or a permanent DNS
//! fact (null MX, no such domain) becomes a bounce. A temporary DNS or
//! network problem is never a bounce.
//!
//! Reach of a failure (as Postfix's `smtp_trouble.c` decides it): a RCPT
//! reply is per recipient; MAIL and DATA replies are per message; a DNS
//! verdict, or no host answering at all while no other connection to the
//! domain is up, is per destination and settles every job queued for it.

pub mod cert;
pub mod classify;
pub mod client;
pub mod dane;
pub mod explain;
pub mod failure;
#[cfg(test)]
pub(crate) mod fake;
pub mod mta_sts;
mod tls_policy;

use tls_policy::{
    Asked, dane_domain, dane_host, report_tls, required_tls, requiretls_refusal, site_deferral,
    sts_result_type, testing_outcome,
};
pub mod smarthost;

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::config::{Config, StarttlsPolicy};
use crate::dns::{Dns, MxLookup};
use crate::event::Reason;
use crate::queue::{AttemptResult, DeliveryJob, Queue, RcptOutcome};
use crate::reply::{Enhanced, Reply};
use mail_auth::report::tlsrpt::{PolicyDetails, PolicyType, ResultType};

pub use classify::Classifier;
use client::{
    ClientError, MailParams, RcptParams, SmtpClient, Stage, Timeouts, Tls, TransactionError,
    TransactionReplies, TxStage,
};

/// Where attempt outcomes go: the queue in production, a recorder in tests.
pub trait AttemptSink: Send + Sync + 'static {
    /// Records what an attempt did for some recipients of a message.
    fn complete_attempt(&self, id: crate::envelope::QueueId, outcomes: Vec<RcptOutcome>);

    /// Where delivery counts its connections; none in tests.
    fn metrics(&self) -> Option<&Arc<crate::metrics::Metrics>> {
        None
    }

    /// Where delivery counts TLS sessions for TLS-RPT (RFC 8460); none
    /// when reports are off.
    fn tls_reports(&self) -> Option<&crate::report::tlsrpt::TlsRptCounts> {
        None
    }
}

impl AttemptSink for Queue {
    fn complete_attempt(&self, id: crate::envelope::QueueId, outcomes: Vec<RcptOutcome>) {
        Queue::complete_attempt(self, id, outcomes)
    }

    fn metrics(&self) -> Option<&Arc<crate::metrics::Metrics>> {
        Some(self.reporter().metrics())
    }

    fn tls_reports(&self) -> Option<&crate::report::tlsrpt::TlsRptCounts> {
        Queue::tls_reports(self)
    }
}

/// Starts the delivery stage. It takes jobs from `jobs` until `shutdown`
/// is cancelled or every sender is gone; on shutdown it finishes the
/// transactions in flight, reports the jobs it has not started as
/// [`AttemptResult::NotAttempted`], says QUIT, and the returned task ends.
/// Jobs whose domain or tenant `control` has suspended are held back.
pub fn start_with_control(
    config: Arc<Config>,
    dns: Dns,
    queue: Arc<Queue>,
    jobs: mpsc::UnboundedReceiver<DeliveryJob>,
    shutdown: CancellationToken,
    control: crate::control::Control,
) -> tokio::task::JoinHandle<()> {
    start_inner(config, dns, queue, jobs, shutdown, Some(control))
}

/// The delivery stage reporting to any [`AttemptSink`], without
/// suspensions (tests drive it with a sink of their own).
pub fn start_with(
    config: Arc<Config>,
    dns: Dns,
    sink: Arc<dyn AttemptSink>,
    jobs: mpsc::UnboundedReceiver<DeliveryJob>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    start_inner(config, dns, sink, jobs, shutdown, None)
}

fn start_inner(
    config: Arc<Config>,
    dns: Dns,
    sink: Arc<dyn AttemptSink>,
    jobs: mpsc::UnboundedReceiver<DeliveryJob>,
    shutdown: CancellationToken,
    control: Option<crate::control::Control>,
) -> tokio::task::JoinHandle<()> {
    let mta_sts = config.delivery.mta_sts.enabled.then(|| {
        mta_sts::MtaSts::new(
            &config.delivery.mta_sts,
            dns.clone(),
            config.server.spool_dir.join("mta-sts-cache.json"),
        )
    });
    let mta_sts = match mta_sts {
        Some(Ok(m)) => {
            if let Some(metrics) = sink.metrics() {
                m.count_into(metrics.clone());
            }
            Some(m)
        }
        Some(Err(e)) => {
            // The config check reads ca_file first; this is a file that
            // went away since. Delivering as without policies is what
            // RFC 8461 §5 does when none can be had.
            tracing::error!(error = %e, "MTA-STS is off: cannot load its trust anchors");
            None
        }
        None => None,
    };
    // Certificates of MX hosts that must be verified (an enforced MTA-STS
    // policy, `tls_policy = "verify"`): WebPKI, names checked.
    let webpki = mta_sts::trust_roots(config.delivery.mta_sts.ca_file.as_deref())
        .ok()
        .filter(|roots| !roots.is_empty())
        .and_then(|roots| {
            rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
            )
            .build()
            .ok()
        });
    let verify_tls = webpki.as_ref().map(|v| {
        Tls::with_verifier(
            Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
            v.clone(),
        )
    });
    // DANE has a resolver of its own, which validates DNSSEC.
    let dane = match config.delivery.dane_anywhere().then(|| {
        config
            .delivery
            .dane
            .trust_anchors()
            .and_then(|anchors| Dns::validating(&config.dns, anchors))
    }) {
        Some(Ok(d)) => Some(match sink.metrics().or(dns.metrics()) {
            Some(m) => d.with_metrics(m.clone()),
            None => d,
        }),
        Some(Err(e)) => {
            // The config check read the trust anchors; this is a file that
            // went away since. Domains asking for DANE only then defer.
            tracing::error!(error = %e, "DANE is off: cannot build its validating resolver");
            None
        }
        None => None,
    };
    let ctx = Arc::new(Ctx {
        control,
        mta_sts,
        dane,
        verify_tls,
        webpki,
        timeouts: Timeouts::from_config(&config.delivery),
        helo: config.helo_name().to_string(),
        rate_limits: crate::ratelimit::RateLimits::new(
            &config,
            sink.metrics()
                .or(dns.metrics())
                .cloned()
                .unwrap_or_default(),
        ),
        verp: crate::verp::Verp::from_config(&config.bounces),
        smarthosts: smarthost::Routes::new(&config),
        classifier: Classifier::new(&config.classification),
        config,
        dns,
        sink,
        tls: Tls::opportunistic(),
        shutdown,
        next_source: AtomicUsize::new(0),
    });
    tokio::spawn(dispatch(ctx, jobs))
}

/// What every connection task shares.
struct Ctx {
    config: Arc<Config>,
    helo: String,
    dns: Dns,
    sink: Arc<dyn AttemptSink>,
    /// One rustls config for all connections (session resumption, no
    /// per-connection setup cost).
    tls: Tls,
    timeouts: Timeouts,
    shutdown: CancellationToken,
    next_source: AtomicUsize,
    /// `[limits] domains` / `domain_default` (traffic shaping).
    rate_limits: crate::ratelimit::RateLimits,
    /// `[classification]`: labels every failure.
    classifier: Classifier,
    /// `[bounces] return_path_domain`: one VERP sender per recipient.
    verp: Option<crate::verp::Verp>,
    /// Suspended domains and tenants: their jobs go back unattempted.
    control: Option<crate::control::Control>,
    /// `[[smarthost]]` routing by tenant and sender domain.
    smarthosts: smarthost::Routes,
    /// `[delivery.mta_sts]`: recipient domains' published TLS policies.
    mta_sts: Option<mta_sts::MtaSts>,
    /// The DNSSEC-validating resolver DANE asks for MX and TLSA records;
    /// `None` when neither `[delivery.dane]` nor a `tls_policy` line asks
    /// for DANE.
    dane: Option<Dns>,
    /// TLS that verifies the MX's certificate and name; `None` without any
    /// trusted root (a verified session then always fails).
    verify_tls: Option<Tls>,
    /// The verifier behind `verify_tls`, for sessions that check a
    /// certificate without refusing it (MTA-STS testing mode).
    webpki: Option<Arc<rustls::client::WebPkiServerVerifier>>,
}

impl Ctx {
    /// The next of `delivery.source_ips` of the destination's family, in
    /// turn; `None` lets the OS choose.
    fn source_for(&self, dest: IpAddr) -> Option<IpAddr> {
        let ips = &self.config.delivery.source_ips;
        let same = ips.iter().filter(|ip| ip.is_ipv4() == dest.is_ipv4());
        let n = same.clone().count();
        if n == 0 {
            return None;
        }
        let i = self.next_source.fetch_add(1, Ordering::Relaxed) % n;
        same.clone().nth(i).copied()
    }

    fn report(&self, job: &DeliveryJob, outcomes: Vec<RcptOutcome>) {
        self.sink.complete_attempt(job.id, outcomes);
    }

    /// The same result for every recipient of a job.
    fn report_all(&self, job: &DeliveryJob, result: &AttemptResult, mx: Option<&str>) {
        let outcomes = job
            .recipients
            .iter()
            .map(|r| RcptOutcome {
                index: r.index,
                result: result.clone(),
                mx: mx.map(str::to_string),
                tls: None,
                next_hop_dsn: false,
            })
            .collect();
        self.report(job, outcomes);
    }
}

/// One destination: a recipient domain, or a smarthost (then named
/// `smarthost:NAME`, which no domain can be); its ready queue and its
/// connection tasks.
struct Domain {
    name: String,
    /// Set for a smarthost's pool: connect there instead of to MX hosts.
    smarthost: Option<Arc<smarthost::Smarthost>>,
    state: Mutex<DomainState>,
}

#[derive(Default)]
struct DomainState {
    /// Jobs waiting for a connection.
    jobs: VecDeque<DeliveryJob>,
    /// Connection tasks running (each holds at most one connection).
    tasks: usize,
    /// Connections established right now.
    connected: usize,
    /// Idle connection tasks waiting for a job. The most recently idle one
    /// gets the next job, so that when traffic drops the others idle out.
    idle: VecDeque<oneshot::Sender<DeliveryJob>>,
}

impl Domain {
    fn lock(&self) -> MutexGuard<'_, DomainState> {
        // A panic elsewhere cannot leave this state half-updated in a way
        // that matters more than stopping delivery would.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn dispatch(ctx: Arc<Ctx>, mut jobs: mpsc::UnboundedReceiver<DeliveryJob>) {
    let mut d = Dispatcher {
        ctx: ctx.clone(),
        domains: HashMap::new(),
        tasks: JoinSet::new(),
        task_domain: HashMap::new(),
    };
    let mut batch = Vec::with_capacity(256);
    // Jobs for smarthosts within one batch, merged per message and
    // smarthost: the queue splits a message by recipient domain, but a
    // smarthost takes all its recipients in one transaction.
    let mut via: Vec<(Arc<smarthost::Smarthost>, DeliveryJob)> = Vec::new();
    loop {
        tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => break,
            Some(done) = d.tasks.join_next_with_id(), if !d.tasks.is_empty() => d.reap(done),
            n = jobs.recv_many(&mut batch, 256) => {
                if n == 0 {
                    break;
                }
                for job in batch.drain(..) {
                    // Suspended: back to the queue at once, no connection,
                    // no attempt counted; looked at again after a resume.
                    if let Some(control) = &ctx.control
                        && control.hold_if_suspended(
                            &job.domain,
                            job.envelope.tenant.as_deref(),
                            |until| ctx.report_all(&job, &AttemptResult::Held(until), None),
                        )
                    {
                        continue;
                    }
                    // No VERP through a smarthost: the provider wants the
                    // account's own sender.
                    if let Some(sh) = ctx.smarthosts.route(&job.envelope) {
                        match via
                            .iter_mut()
                            .find(|(s, j)| j.id == job.id && Arc::ptr_eq(s, sh))
                        {
                            Some((_, merged)) => merged.recipients.extend(job.recipients),
                            None => via.push((sh.clone(), job)),
                        }
                        continue;
                    }
                    match &ctx.verp {
                        Some(verp) => {
                            for job in with_verp(job, verp) {
                                d.route(job);
                            }
                        }
                        None => d.route(job),
                    }
                }
                for (sh, job) in via.drain(..) {
                    d.route_to(format!("smarthost:{}", sh.name), Some(sh), job);
                }
            }
        }
    }

    // No new jobs from here on. On shutdown, what has not started is handed
    // back; when the queue merely went away, the tasks finish what is queued.
    jobs.close();
    let mut drained = false;
    loop {
        if ctx.shutdown.is_cancelled() && !drained {
            drained = true;
            while let Some(job) = jobs.recv().await {
                ctx.report_all(&job, &AttemptResult::NotAttempted, None);
            }
            d.drain_all();
        }
        tokio::select! {
            done = d.tasks.join_next_with_id() => match done {
                Some(done) => d.reap(done),
                None => break,
            },
            _ = ctx.shutdown.cancelled(), if !drained => {}
        }
    }
    d.drain_all();
    while let Ok(job) = jobs.try_recv() {
        ctx.report_all(&job, &AttemptResult::NotAttempted, None);
    }
    tracing::debug!("delivery stopped");
}

struct Dispatcher {
    ctx: Arc<Ctx>,
    domains: HashMap<String, Arc<Domain>>,
    tasks: JoinSet<()>,
    task_domain: HashMap<tokio::task::Id, Arc<Domain>>,
}

impl Dispatcher {
    /// Hands a job to an idle connection of its domain, or queues it and
    /// starts another connection task if the domain's limit allows.
    fn route(&mut self, job: DeliveryJob) {
        let name = job.domain.clone();
        self.route_to(name, None, job);
    }

    /// [`Dispatcher::route`] to the pool `name` (a domain or a smarthost).
    fn route_to(
        &mut self,
        name: String,
        smarthost: Option<Arc<smarthost::Smarthost>>,
        job: DeliveryJob,
    ) {
        let domain = match self.domains.get(&name) {
            Some(d) => d.clone(),
            None => {
                let d = Arc::new(Domain {
                    name: name.clone(),
                    smarthost,
                    state: Mutex::new(DomainState::default()),
                });
                self.domains.insert(name, d.clone());
                d
            }
        };
        let spawn = {
            let mut st = domain.lock();
            let mut job = job;
            // Another part of the same message still waiting here (it came
            // in an earlier batch): one transaction for both. Only the last
            // few are looked at, so a backlog costs nothing.
            if domain.smarthost.is_some()
                && let Some(waiting) = st.jobs.iter_mut().rev().take(8).find(|j| j.id == job.id)
            {
                waiting.recipients.extend(job.recipients);
                return;
            }
            loop {
                let Some(waiter) = st.idle.pop_back() else {
                    break;
                };
                match waiter.send(job) {
                    Ok(()) => return,
                    // That task's idle time ran out just now.
                    Err(back) => job = back,
                }
            }
            st.jobs.push_back(job);
            let spawn = st.tasks < self.ctx.config.delivery.max_connections_per_domain;
            if spawn {
                st.tasks += 1;
            }
            spawn
        };
        if spawn {
            self.spawn(domain);
        }
    }

    fn spawn(&mut self, domain: Arc<Domain>) {
        let handle = self
            .tasks
            .spawn(connection_task(self.ctx.clone(), domain.clone()));
        self.task_domain.insert(handle.id(), domain);
    }

    /// A connection task ended: restart one if jobs were left behind (only
    /// after a panic), forget the domain when nothing is left of it.
    fn reap(&mut self, done: Result<(tokio::task::Id, ()), tokio::task::JoinError>) {
        let id = match &done {
            Ok((id, ())) => *id,
            Err(e) => e.id(),
        };
        let Some(domain) = self.task_domain.remove(&id) else {
            return;
        };
        let spawn = {
            let mut st = domain.lock();
            if let Err(e) = &done {
                // The task never got to count itself out.
                tracing::error!(domain = %domain.name, error = %e, "delivery task failed");
                st.tasks = st.tasks.saturating_sub(1);
            }
            let spawn = !st.jobs.is_empty()
                && st.tasks < self.ctx.config.delivery.max_connections_per_domain
                && !self.ctx.shutdown.is_cancelled();
            if spawn {
                st.tasks += 1;
            } else if st.tasks == 0
                && st.jobs.is_empty()
                && self
                    .domains
                    .get(&domain.name)
                    .is_some_and(|d| Arc::ptr_eq(d, &domain))
            {
                self.domains.remove(&domain.name);
            }
            spawn
        };
        if spawn {
            self.spawn(domain);
        }
    }

    /// Hands back every queued job as not attempted (shutdown).
    fn drain_all(&mut self) {
        for domain in self.domains.values() {
            let jobs: Vec<DeliveryJob> = domain.lock().jobs.drain(..).collect();
            for job in jobs {
                self.ctx
                    .report_all(&job, &AttemptResult::NotAttempted, None);
            }
        }
    }
}

/// An established connection to one MX host.
struct Session {
    client: SmtpClient,
    /// The MX host name, as reported in events.
    mx: String,
    /// Transactions completed on it.
    sent: usize,
    /// The smarthost this session is logged in to, if it is one.
    smarthost: Option<Arc<smarthost::Smarthost>>,
    /// How the server's certificate was checked, and the policy that asked
    /// (`tls_info` of delivered events).
    verified: &'static str,
    policy: Option<String>,
    /// What a policy in testing mode would have refused here.
    policy_failure: Option<String>,
    _live: Connected,
}

impl Session {
    fn tls_info(&self) -> Option<crate::event::TlsInfo> {
        Some(crate::event::TlsInfo {
            version: self.client.tls_version()?.to_string(),
            cipher: self.client.tls_cipher().unwrap_or_default(),
            verified: self.verified.to_string(),
            policy: self.policy.clone(),
            policy_failure: self.policy_failure.clone(),
        })
    }
}

/// Counts the domain's open connections while it lives.
struct Connected(Arc<Domain>);

impl Connected {
    fn new(domain: &Arc<Domain>) -> Connected {
        domain.lock().connected += 1;
        Connected(domain.clone())
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.connected = st.connected.saturating_sub(1);
    }
}

/// Why no connection to a domain could be made.
enum ConnectFailure {
    /// Applies to the domain as a whole.
    Site {
        result: AttemptResult,
        mx: Option<String>,
    },
    /// Shutdown began while connecting.
    Shutdown,
}

/// One connection to one domain, reused for job after job.
async fn connection_task(ctx: Arc<Ctx>, domain: Arc<Domain>) {
    let mut session: Option<Session> = None;
    while let Some(job) = next_job(&ctx, &domain, session.is_some()).await {
        // Traffic shaping: over the domain's rate, the job waits here, in
        // hand and unattempted; this task sleeps exactly as long as the
        // limiter says (no spinning), and other domains' tasks go on. On
        // shutdown the job goes back as not attempted.
        // Traffic shaping is per recipient domain; a smarthost pool mixes
        // domains, and the provider enforces its own limits.
        if domain.smarthost.is_none()
            && ctx.rate_limits.shapes_delivery()
            && let Err(e) = ctx.rate_limits.domain_message(&domain.name).await
        {
            // A wait longer than an idle connection is kept: close it
            // rather than hold it open against the server's timeout.
            if e.retry_after > ctx.config.delivery.idle_timeout.as_duration()
                && let Some(s) = session.take()
            {
                s.client.quit().await;
            }
            if !ctx
                .rate_limits
                .domain_ready(&domain.name, &ctx.shutdown)
                .await
            {
                ctx.report_all(&job, &AttemptResult::NotAttempted, None);
                continue;
            }
        }
        if ctx.shutdown.is_cancelled() {
            ctx.report_all(&job, &AttemptResult::NotAttempted, None);
            continue;
        }
        let guard = PanicGuard {
            ctx: &ctx,
            id: job.id,
            indices: job.recipients.iter().map(|r| r.index).collect(),
        };
        // Every log line about this attempt carries the queue id.
        let span = tracing::info_span!("delivery", queue_id = %job.id);
        session = deliver_job(&ctx, &domain, session, job)
            .instrument(span)
            .await;
        std::mem::forget(guard);
        if session
            .as_ref()
            .is_some_and(|s| s.sent >= ctx.config.delivery.max_messages_per_connection)
            && let Some(s) = session.take()
        {
            s.client.quit().await;
        }
    }
    if let Some(s) = session {
        s.client.quit().await;
    }
}

/// Reports the job in hand as deferred if its task panics, so that its
/// recipients do not stay "in flight" (and unscheduled) until a restart.
struct PanicGuard<'a> {
    ctx: &'a Ctx,
    id: crate::envelope::QueueId,
    indices: Vec<usize>,
}

impl Drop for PanicGuard<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let reply = Reply::new(
            451,
            Enhanced(4, 3, 0),
            "Local error during delivery; will retry",
        );
        let outcomes = self
            .indices
            .iter()
            .map(|&index| RcptOutcome {
                index,
                result: AttemptResult::Deferred(reply.clone(), Reason::Other),
                mx: None,
                tls: None,
                next_hop_dsn: false,
            })
            .collect();
        self.ctx.sink.complete_attempt(self.id, outcomes);
    }
}

/// The next job for this connection: from the ready queue, or, when the
/// connection is open, whatever arrives within `idle_timeout`. `None` when
/// the task should end; the task is then no longer counted.
async fn next_job(ctx: &Ctx, domain: &Domain, connected: bool) -> Option<DeliveryJob> {
    loop {
        let mut rx = {
            let mut st = domain.lock();
            if ctx.shutdown.is_cancelled() {
                st.tasks = st.tasks.saturating_sub(1);
                return None;
            }
            if let Some(job) = st.jobs.pop_front() {
                return Some(job);
            }
            if !connected {
                st.tasks = st.tasks.saturating_sub(1);
                return None;
            }
            let (tx, rx) = oneshot::channel();
            st.idle.push_back(tx);
            rx
        };
        tokio::select! {
            got = &mut rx => match got {
                Ok(job) => return Some(job),
                // Never happens (the dispatcher sends or drops on purpose);
                // look at the queue again.
                Err(_) => continue,
            },
            _ = tokio::time::sleep(ctx.config.delivery.idle_timeout.as_duration()) => {}
            _ = ctx.shutdown.cancelled() => {}
        }
        // Closing first makes the hand-over race-free: either the job was
        // sent before (and is taken here) or the dispatcher gets it back.
        rx.close();
        if let Ok(job) = rx.try_recv() {
            return Some(job);
        }
        let mut st = domain.lock();
        if !ctx.shutdown.is_cancelled()
            && let Some(job) = st.jobs.pop_front()
        {
            return Some(job);
        }
        st.idle.retain(|w| !w.is_closed());
        st.tasks = st.tasks.saturating_sub(1);
        return None;
    }
}

/// Delivers one job, connecting first if needed. Returns the connection if
/// it can carry another message.
async fn deliver_job(
    ctx: &Ctx,
    domain: &Arc<Domain>,
    mut session: Option<Session>,
    job: DeliveryJob,
) -> Option<Session> {
    let mut retried = false;
    loop {
        let mut s = match session.take() {
            Some(s) => s,
            None => match connect_domain(ctx, domain, false).await {
                Ok(s) => s,
                Err(ConnectFailure::Shutdown) => {
                    ctx.report_all(&job, &AttemptResult::NotAttempted, None);
                    return None;
                }
                Err(ConnectFailure::Site {
                    result: AttemptResult::Deferred(_, Reason::Tls),
                    ..
                }) if job.envelope.ignore_tls_policies => {
                    // Its own session, used for this job alone: the
                    // destination's other mail keeps its policy.
                    let relaxed = connect_domain(ctx, domain, true).await;
                    return relaxed_delivery(ctx, job, relaxed).await;
                }
                Err(ConnectFailure::Site { result, mx }) => {
                    ctx.report_all(&job, &result, mx.as_deref());
                    settle_domain(ctx, domain, &result, mx.as_deref());
                    return None;
                }
            },
        };
        if job.envelope.require_tls
            && let Some(reply) = requiretls_refusal(&s, &domain.name)
        {
            tracing::info!(domain = %domain.name, mx = %s.mx, queue_id = %job.id, reply = %reply, "REQUIRETLS message not delivered");
            let tls = s.tls_info();
            let outcomes = job
                .recipients
                .iter()
                .map(|r| RcptOutcome {
                    index: r.index,
                    result: AttemptResult::Bounced(reply.clone(), Reason::Tls),
                    mx: Some(s.mx.clone()),
                    tls: tls.clone(),
                    next_hop_dsn: false,
                })
                .collect();
            ctx.report(&job, outcomes);
            return Some(s);
        }
        let reused = s.sent > 0;
        match transact(&ctx.classifier, &mut s, &job).await {
            Ok(outcomes) => {
                ctx.report(&job, outcomes);
                s.sent += 1;
                return s.client.is_usable().then_some(s);
            }
            // A cached connection the server has dropped meanwhile (idle
            // timeout, message limit): nothing was handed over, so try once
            // more on a fresh one rather than defer.
            Err(e) if reused && !retried && e.stage == TxStage::Envelope => {
                tracing::debug!(domain = %domain.name, mx = %s.mx, error = %e, "reused connection failed, reconnecting");
                retried = true;
            }
            Err(e) => {
                let (reply, class) = match e.error {
                    // The server said why it ends the session: keep its words.
                    ClientError::Rejected { reply, .. } => {
                        let class = ctx.classifier.classify(&reply).reason;
                        (reply, class)
                    }
                    error => synthesize(&ctx.classifier, &error, &s.mx, s.client.peer()),
                };
                tracing::info!(domain = %domain.name, mx = %s.mx, queue_id = %job.id, reply = %reply, "transaction failed");
                let mx = s.mx.clone();
                let tls = s.tls_info();
                let outcomes = job
                    .recipients
                    .iter()
                    .map(|r| RcptOutcome {
                        index: r.index,
                        result: AttemptResult::Deferred(reply.clone(), class),
                        mx: Some(mx.clone()),
                        tls: tls.clone(),
                        next_hop_dsn: false,
                    })
                    .collect();
                ctx.report(&job, outcomes);
                return None;
            }
        }
    }
}

/// A job sent without the destination's published TLS policies over a
/// session of its own, closed afterwards.
async fn relaxed_delivery(
    ctx: &Ctx,
    job: DeliveryJob,
    session: Result<Session, ConnectFailure>,
) -> Option<Session> {
    let mut s = match session {
        Ok(s) => s,
        Err(ConnectFailure::Shutdown) => {
            ctx.report_all(&job, &AttemptResult::NotAttempted, None);
            return None;
        }
        Err(ConnectFailure::Site { result, mx }) => {
            ctx.report_all(&job, &result, mx.as_deref());
            return None;
        }
    };
    tracing::info!(mx = %s.mx, queue_id = %job.id, "TLS report delivered without the destination's TLS policy, which failed");
    match transact(&ctx.classifier, &mut s, &job).await {
        Ok(outcomes) => ctx.report(&job, outcomes),
        Err(e) => {
            let reply = match e.error {
                ClientError::Rejected { reply, .. } => reply,
                error => synthesize(&ctx.classifier, &error, &s.mx, s.client.peer()).0,
            };
            let class = ctx.classifier.classify(&reply).reason;
            ctx.report_all(&job, &AttemptResult::Deferred(reply, class), Some(&s.mx));
        }
    }
    s.client.quit().await;
    None
}

/// Settles every job queued for the domain with a destination-wide result
/// (a DNS verdict, or every host unreachable while no connection is up).
fn settle_domain(ctx: &Ctx, domain: &Domain, result: &AttemptResult, mx: Option<&str>) {
    let jobs: Vec<DeliveryJob> = {
        let mut st = domain.lock();
        if matches!(result, AttemptResult::Deferred(_, c) if *c != Reason::Dns) && st.connected > 0
        {
            // Another connection to the domain works: the failure was ours.
            return;
        }
        st.jobs.drain(..).collect()
    };
    for job in jobs {
        ctx.report_all(&job, result, mx);
    }
}

/// Opens a session to the destination: its smarthost, or the first of its
/// MX addresses that greets and answers EHLO (RFC 5321 §5.1: on to the
/// next address or host on a refused connection, a timeout, or a 4xx/5xx
/// greeting or EHLO). `relaxed`: without the destination's published TLS
/// policies (see [`Envelope::ignore_tls_policies`]).
///
/// [`Envelope::ignore_tls_policies`]: crate::envelope::Envelope::ignore_tls_policies
async fn connect_domain(
    ctx: &Ctx,
    domain: &Arc<Domain>,
    relaxed: bool,
) -> Result<Session, ConnectFailure> {
    let connect = async {
        match &domain.smarthost {
            Some(sh) => connect_smarthost(ctx, domain, sh).await,
            None => connect_domain_inner(ctx, domain, relaxed).await,
        }
    };
    tokio::select! {
        r = connect => r,
        _ = ctx.shutdown.cancelled() => Err(ConnectFailure::Shutdown),
    }
}

/// Connects and logs in to a smarthost; every failure defers (see
/// [`smarthost`]).
async fn connect_smarthost(
    ctx: &Ctx,
    domain: &Arc<Domain>,
    sh: &Arc<smarthost::Smarthost>,
) -> Result<Session, ConnectFailure> {
    match sh
        .open(&ctx.dns, &ctx.helo, ctx.timeouts, |ip| ctx.source_for(ip))
        .await
    {
        Ok(client) => {
            if let Some(m) = ctx.sink.metrics() {
                m.connections_out
                    .inc(client.tls_version().unwrap_or("none"));
            }
            Ok(Session {
                client,
                mx: sh.host.clone(),
                sent: 0,
                smarthost: Some(sh.clone()),
                verified: "smarthost",
                policy: None,
                policy_failure: None,
                _live: Connected::new(domain),
            })
        }
        Err((reply, class)) => Err(ConnectFailure::Site {
            result: AttemptResult::Deferred(reply, class),
            mx: Some(sh.host.clone()),
        }),
    }
}

async fn connect_domain_inner(
    ctx: &Ctx,
    domain: &Arc<Domain>,
    relaxed: bool,
) -> Result<Session, ConnectFailure> {
    let name = &domain.name;
    let hosts = match ctx.dns.mx(name).await {
        Ok(MxLookup::Hosts(hosts)) => hosts,
        Ok(MxLookup::NullMx) => {
            return Err(ConnectFailure::Site {
                result: AttemptResult::Bounced(
                    Reply::new(
                        556,
                        Enhanced(5, 1, 10),
                        format!(
                            "Recipient domain {name} has a null MX record (RFC 7505): it accepts no mail"
                        ),
                    ),
                    Reason::NotAccept,
                ),
                mx: None,
            });
        }
        Ok(MxLookup::NoMailServer) => {
            return Err(ConnectFailure::Site {
                result: AttemptResult::Bounced(
                    Reply::new(
                        550,
                        Enhanced(5, 1, 2),
                        format!(
                            "Recipient domain {name} does not exist or has no mail server (no MX or address records)"
                        ),
                    ),
                    Reason::HostUnknown,
                ),
                mx: None,
            });
        }
        Err(e) => {
            return Err(ConnectFailure::Site {
                result: AttemptResult::Deferred(
                    Reply::new(451, Enhanced(4, 4, 3), e.to_string()),
                    Reason::Dns,
                ),
                mx: None,
            });
        }
    };

    let mut last: Option<(Reply, Reason, String)> = None;
    // A config line may ask for more than the domain publishes; it asks
    // for less only when written with "!" (and then published policies,
    // MTA-STS and DANE, are not used).
    let plan = if relaxed {
        crate::config::TlsPlan {
            configured: None,
            overridden: true,
            dane_only: false,
            dane: false,
        }
    } else {
        ctx.config.delivery.tls_plan(name)
    };
    let (configured, overridden, dane_only) = (plan.configured, plan.overridden, plan.dane_only);
    // RFC 8461 §2: DANE wins over MTA-STS for a host with TLSA records;
    // MTA-STS still rules the hosts without.
    let dane = match &ctx.dane {
        Some(v) if plan.dane => Some(v),
        None if dane_only => {
            return Err(site_deferral(
                Reply::new(
                    451,
                    Enhanced(4, 7, 5),
                    format!(
                        "TLS policy for {name} (delivery.tls_policy: dane-only) requires DANE, but this relay has no DNSSEC-validating resolver (see the log)"
                    ),
                ),
                None,
            ));
        }
        _ => None,
    };
    let dane = match dane {
        Some(v) => match dane_domain(ctx, v, name, dane_only).await {
            Ok(secure) => secure.then_some(v),
            Err(reply) => return Err(site_deferral(reply, None)),
        },
        None => None,
    };
    // RFC 8461: an enforced policy names the MX hosts that may be used and
    // requires verified TLS to them; testing mode only reports.
    let published = match &ctx.mta_sts {
        Some(m) if !dane_only && !overridden => match m.lookup(name).await {
            mta_sts::Lookup::Policy(p) => Some(p),
            mta_sts::Lookup::Failed {
                result_type,
                detail,
            } => {
                tracing::info!(domain = %name, result_type, detail, "no usable MTA-STS policy; delivering as without one");
                if let Some(metrics) = ctx.sink.metrics() {
                    metrics.mta_sts_failures.inc(result_type);
                }
                report_tls(
                    ctx,
                    &PolicyDetails {
                        policy_type: PolicyType::Sts,
                        policy_string: Vec::new(),
                        policy_domain: name.to_string(),
                        mx_host: Vec::new(),
                    },
                    Some((sts_result_type(result_type), None, None, &detail)),
                );
                None
            }
            mta_sts::Lookup::NoPolicy => None,
        },
        _ => None,
    };
    let recorder;
    let asked = match (&published, configured) {
        (Some(p), _) if p.mode == mta_sts::Mode::Enforce => Asked::MtaSts {
            domain: name,
            policy: p,
        },
        (Some(p), None) if p.mode == mta_sts::Mode::Testing => {
            recorder = cert::RecordingVerifier::lenient(ctx.webpki.clone());
            Asked::MtaStsTesting {
                domain: name,
                policy: p,
                recorder: &recorder,
            }
        }
        (_, Some(c)) => Asked::Config {
            domain: name,
            level: c.level,
        },
        (_, None) => Asked::Default,
    };
    // Like Postfix's smtp_mx_address_limit: a domain with many dead hosts
    // must not hold a connection slot for connect_timeout × every address.
    let mut budget = ctx.config.delivery.max_mx_addresses;
    'hosts: for host in &hosts {
        let tlsa = match dane {
            Some(v) => match dane_host(ctx, v, name, &host.name, dane_only).await {
                Ok(tlsa) => tlsa,
                Err(reply) => {
                    last = Some((reply, Reason::Tls, host.name.clone()));
                    continue;
                }
            },
            None => None,
        };
        let asked = match &tlsa {
            Some(tlsa) => Asked::Dane { domain: name, tlsa },
            None => asked,
        };
        let mut unlisted = None;
        if let Asked::MtaSts { policy: p, .. } | Asked::MtaStsTesting { policy: p, .. } = asked
            && !p.allows_mx(&host.name)
        {
            if let Some(policy) = asked.tls_report_policy(&host.name) {
                report_tls(
                    ctx,
                    &policy,
                    Some((
                        ResultType::ValidationFailure,
                        Some(&host.name),
                        None,
                        "MX host not listed in the policy",
                    )),
                );
            }
            unlisted = Some(format!(
                "MTA-STS policy of {name} does not list mail server {} among {}",
                host.name,
                p.mx.join(", ")
            ));
        }
        if let (Some(_), Asked::MtaSts { policy: p, .. }) = (&unlisted, asked) {
            last = Some((
                Reply::new(
                    451,
                    Enhanced(4, 7, 5),
                    format!(
                        "MTA-STS policy of {name} (enforce, id {}) does not list mail server {} among {}; not used",
                        p.id,
                        host.name,
                        p.mx.join(", ")
                    ),
                ),
                Reason::Tls,
                host.name.clone(),
            ));
            continue;
        }
        let ips = match ctx.dns.ips(&host.name).await {
            Ok(ips) if !ips.is_empty() => ips,
            Ok(_) => {
                last = Some((
                    Reply::new(
                        451,
                        Enhanced(4, 4, 3),
                        format!("Mail server {} of {name} has no address", host.name),
                    ),
                    Reason::Dns,
                    host.name.clone(),
                ));
                continue;
            }
            Err(e) => {
                last = Some((
                    Reply::new(451, Enhanced(4, 4, 3), e.to_string()),
                    Reason::Dns,
                    host.name.clone(),
                ));
                continue;
            }
        };
        for ip in ips {
            if budget == 0 {
                break 'hosts;
            }
            if ip.is_unspecified() || ip.is_multicast() {
                last = Some((
                    Reply::new(
                        451,
                        Enhanced(4, 4, 4),
                        format!(
                            "Mail server {} of {name} has an unusable address {ip}",
                            host.name
                        ),
                    ),
                    Reason::Dns,
                    host.name.clone(),
                ));
                continue;
            }
            budget -= 1;
            let addr = SocketAddr::new(ip, ctx.config.delivery.port);
            let opened = open(ctx, &host.name, addr, asked).await;
            if let (Ok(client), Some(m)) = (&opened, ctx.sink.metrics()) {
                m.connections_out
                    .inc(client.tls_version().unwrap_or("none"));
            }
            match opened {
                Ok(client) => {
                    let policy_failure = match asked {
                        Asked::MtaStsTesting { recorder, .. } => {
                            testing_outcome(ctx, &asked, &client, recorder, &host.name, addr)
                                .or(unlisted)
                        }
                        _ => None,
                    };
                    return Ok(Session {
                        client,
                        mx: host.name.clone(),
                        sent: 0,
                        smarthost: None,
                        verified: asked.verified(),
                        policy: asked.policy(),
                        policy_failure,
                        _live: Connected::new(domain),
                    });
                }
                Err((reply, class)) => {
                    tracing::info!(domain = %name, mx = %host.name, %addr, reply = %reply, "cannot use MX address");
                    last = Some((reply, class, host.name.clone()));
                }
            }
        }
    }
    let (reply, class, mx) = last.unwrap_or_else(|| {
        (
            Reply::new(
                451,
                Enhanced(4, 4, 4),
                format!("No usable mail server for {name}"),
            ),
            Reason::Network,
            String::new(),
        )
    });
    Err(ConnectFailure::Site {
        result: AttemptResult::Deferred(reply, class),
        mx: (!mx.is_empty()).then_some(mx),
    })
}

/// Connects to one address: greeting, EHLO, and STARTTLS as `asked`: a
/// domain's enforced MTA-STS policy or its `[delivery.tls_policy]` level
/// beat `delivery.starttls`.
async fn open(
    ctx: &Ctx,
    host: &str,
    addr: SocketAddr,
    asked: Asked<'_>,
) -> Result<SmtpClient, (Reply, Reason)> {
    use crate::config::TlsLevel;
    let fail = |e: ClientError| synthesize(&ctx.classifier, &e, host, addr);
    let source = ctx.source_for(addr.ip());
    let mut client = SmtpClient::connect(addr, source, ctx.timeouts)
        .await
        .map_err(fail)?;
    client.ehlo(&ctx.helo).await.map_err(fail)?;
    let starttls = match asked {
        Asked::MtaSts { .. }
        | Asked::Dane { .. }
        | Asked::Config {
            level: TlsLevel::Verify | TlsLevel::Encrypt,
            ..
        } => return required_tls(ctx, client, host, addr, &asked).await,
        Asked::Config {
            level: TlsLevel::None,
            ..
        } => StarttlsPolicy::Disabled,
        // Hosts without TLSA records, under `dane`: as `may`. (`dane-only`
        // never opens a session to such a host.)
        Asked::Config {
            level: TlsLevel::May | TlsLevel::Dane | TlsLevel::DaneOnly,
            ..
        } => StarttlsPolicy::Opportunistic,
        Asked::Default | Asked::MtaStsTesting { .. } => ctx.config.delivery.starttls,
    };
    // Testing mode checks the certificate as enforce would, and only notes
    // what it finds.
    let testing_tls;
    let tls = match asked {
        Asked::MtaStsTesting { recorder, .. } => {
            testing_tls = recorder.tls();
            &testing_tls
        }
        _ => &ctx.tls,
    };
    match starttls {
        StarttlsPolicy::Disabled => Ok(client),
        StarttlsPolicy::Required => {
            client.starttls(tls, host, &ctx.helo).await.map_err(fail)?;
            Ok(client)
        }
        StarttlsPolicy::Opportunistic => {
            if !client.capabilities().starttls {
                return Ok(client);
            }
            match client.starttls(tls, host, &ctx.helo).await {
                Ok(()) => Ok(client),
                // Refused with a 4xx/5xx: the session goes on in plaintext.
                Err(ClientError::Rejected {
                    stage: Stage::StartTls,
                    ..
                }) if client.is_usable() => Ok(client),
                Err(e) => {
                    // RFC 7435: without TLS beats not at all. The failed
                    // handshake took the connection, so start over, plain.
                    tracing::info!(mx = %host, %addr, error = %e, "STARTTLS failed, delivering without TLS");
                    drop(client);
                    let mut client = SmtpClient::connect(addr, source, ctx.timeouts)
                        .await
                        .map_err(fail)?;
                    client.ehlo(&ctx.helo).await.map_err(fail)?;
                    Ok(client)
                }
            }
        }
    }
}

/// One job over an open session: local checks, the transaction, and the
/// per-recipient outcomes.
async fn transact(
    classifier: &Classifier,
    s: &mut Session,
    job: &DeliveryJob,
) -> Result<Vec<RcptOutcome>, TransactionError> {
    let env = &job.envelope;
    let tls = s.tls_info();
    let mx = s.mx.as_str();
    let local = |reply: Reply, class| {
        job.recipients
            .iter()
            .map(|r| RcptOutcome {
                index: r.index,
                result: AttemptResult::Bounced(reply.clone(), class),
                mx: Some(mx.to_string()),
                tls: tls.clone(),
                next_hop_dsn: false,
            })
            .collect::<Vec<_>>()
    };
    let caps = s.client.capabilities();
    // With VERP the next hop's own success report would come back to the
    // bounce listener, not to the sender: herald reports "relayed" then.
    let next_hop_dsn = caps.dsn && job.return_path.is_none();

    // RFC 1870 §6.1: a message over the server's fixed limit would only be
    // refused after the whole transfer.
    if caps.size_ext && caps.size > 0 && job.body.len() as u64 > caps.size {
        return Ok(local(
            Reply::new(
                552,
                Enhanced(5, 3, 4),
                format!(
                    "Message size ({} bytes) exceeds the limit of {} ({} bytes)",
                    job.body.len(),
                    s.mx,
                    caps.size
                ),
            ),
            Reason::MessageTooLarge,
        ));
    }
    // RFC 6531 §3.2: a message that needs SMTPUTF8 must not go to a server
    // without it.
    if env.smtputf8 && !caps.smtputf8 && needs_utf8(job) {
        return Ok(local(
            Reply::new(
                550,
                Enhanced(5, 6, 7),
                format!(
                    "The message needs SMTPUTF8, which {} does not support",
                    s.mx
                ),
            ),
            Reason::Other,
        ));
    }

    let mail = MailParams {
        from: job.sender(),
        body_8bit: env.body_8bit,
        smtputf8: env.smtputf8,
        ret: env.ret,
        env_id: env.env_id.as_deref(),
        require_tls: env.require_tls,
    };
    let rcpts: Vec<RcptParams<'_>> = job
        .recipients
        .iter()
        .map(|r| RcptParams {
            address: &r.address,
            notify: r.notify,
            orcpt: r.orcpt.as_deref(),
        })
        .collect();
    let tx = match s.client.send(&mail, &rcpts, &job.body).await {
        Ok(tx) => tx,
        Err(TransactionError {
            error: ClientError::InvalidArgument(what),
            ..
        }) => {
            // Nothing was sent; such an address can never be sent.
            return Ok(local(
                Reply::new(
                    553,
                    Enhanced(5, 1, 3),
                    format!("{what} contains a line break and cannot be sent"),
                ),
                Reason::Other,
            ));
        }
        Err(e) => return Err(e),
    };
    // A smarthost that refuses the sender: say why, in smtp-test's words,
    // keeping the reply's code (and so bounce or deferral) as it is.
    if let Some(sh) = &s.smarthost
        && !tx.mail.is_positive()
    {
        let explained = sh.mail_refused(&tx.mail, job.sender());
        let result = match mail_failure(classifier, &tx.mail) {
            AttemptResult::Bounced(_, class) => AttemptResult::Bounced(explained, class),
            AttemptResult::Deferred(_, class) => AttemptResult::Deferred(explained, class),
            other => other,
        };
        return Ok(job
            .recipients
            .iter()
            .map(|r| RcptOutcome {
                index: r.index,
                result: result.clone(),
                mx: Some(mx.to_string()),
                tls: tls.clone(),
                next_hop_dsn,
            })
            .collect());
    }
    Ok(outcomes(classifier, job, &tx, mx, tls, next_hop_dsn))
}

/// With VERP each recipient gets its own envelope sender, hence its own
/// transaction; a bounce (null sender) keeps its null sender.
fn with_verp(job: DeliveryJob, verp: &crate::verp::Verp) -> Vec<DeliveryJob> {
    if job.envelope.sender.is_empty() {
        return vec![job];
    }
    let DeliveryJob {
        id,
        envelope,
        body,
        domain,
        recipients,
        ..
    } = job;
    recipients
        .into_iter()
        .map(|r| DeliveryJob {
            id,
            envelope: envelope.clone(),
            body: body.clone(),
            domain: domain.clone(),
            return_path: Some(verp.address(id, r.index)),
            recipients: vec![r],
        })
        .collect()
}

/// Whether the envelope or the header section holds non-ASCII.
fn needs_utf8(job: &DeliveryJob) -> bool {
    let header_end = job
        .body
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(job.body.len());
    !job.sender().is_ascii()
        || job.recipients.iter().any(|r| !r.address.is_ascii())
        || !job.body[..header_end].is_ascii()
}

/// Per-recipient outcomes from a transaction's replies.
fn outcomes(
    classifier: &Classifier,
    job: &DeliveryJob,
    tx: &TransactionReplies,
    mx: &str,
    tls: Option<crate::event::TlsInfo>,
    next_hop_dsn: bool,
) -> Vec<RcptOutcome> {
    job.recipients
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let result = if !tx.mail.is_positive() {
                mail_failure(classifier, &tx.mail)
            } else {
                match (tx.rcpts.get(i), &tx.data) {
                    (Some(rr), Some(d)) if rr.is_positive() && d.is_positive() => {
                        AttemptResult::Delivered(d.clone())
                    }
                    (Some(rr), Some(d)) if rr.is_positive() => failure(classifier, d),
                    (Some(rr), _) if !rr.is_positive() => failure(classifier, rr),
                    // Accepted but no verdict on the data, or no reply for
                    // this recipient at all: cannot happen with a sane
                    // server, and is never a reason to give up.
                    _ => AttemptResult::Deferred(
                        Reply::new(
                            451,
                            Enhanced(4, 5, 0),
                            format!("{mx} gave no final reply for this recipient"),
                        ),
                        Reason::Other,
                    ),
                }
            };
            RcptOutcome {
                index: r.index,
                result,
                mx: Some(mx.to_string()),
                tls: tls.clone(),
                next_hop_dsn,
            }
        })
        .collect()
}

/// A refusal of MAIL FROM as every recipient's outcome: it is about the
/// sender, never about a recipient's mailbox, so no reason that would
/// suppress an address ("553 5.1.2 <sender> is not a valid address").
fn mail_failure(classifier: &Classifier, reply: &Reply) -> AttemptResult {
    match failure(classifier, reply) {
        AttemptResult::Bounced(r, reason) if reason.may_suppress() => {
            AttemptResult::Bounced(r, Reason::SenderRejected)
        }
        AttemptResult::Deferred(r, reason) if reason.may_suppress() => {
            AttemptResult::Deferred(r, Reason::SenderRejected)
        }
        other => other,
    }
}

/// A negative reply as an outcome: 5xx bounces, anything else defers.
fn failure(classifier: &Classifier, reply: &Reply) -> AttemptResult {
    // 5xx bounces and 4xx waits, unless a `[[classification.rules]]` rule
    // says otherwise (e.g. a provider's 5xx that only means "later").
    let v = classifier.classify(reply);
    if v.permanent {
        AttemptResult::Bounced(reply.clone(), v.reason)
    } else {
        AttemptResult::Deferred(reply.clone(), v.reason)
    }
}

/// A failure that is not an SMTP reply, described as the 4xx reply the
/// queue records.
fn synthesize(
    classifier: &Classifier,
    e: &ClientError,
    host: &str,
    addr: SocketAddr,
) -> (Reply, Reason) {
    let at = format!("{host} [{}]:{}", addr.ip(), addr.port());
    let mut f = failure::SessionFailure::of(classifier, e, &at, addr.port());
    if matches!(e, ClientError::NoStartTls) {
        f.what.push_str(", and delivery.starttls is \"required\"");
    }
    (f.deferral(), f.class)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(starttls: &str) -> Ctx {
        let text = format!(
            "[[listener]]\naddress = \"127.0.0.1:0\"\ntls = \"none\"\nauth = \"none\"\n\
             trusted_networks = [\"127.0.0.0/8\"]\n\
             [dns]\nnameservers = [\"127.0.0.1:9\"]\ntimeout = \"200ms\"\nattempts = 1\n\
             [delivery]\nhelo_name = \"relay.test\"\nconnect_timeout = \"5s\"\nstarttls = \"{starttls}\"\n"
        );
        let config = Arc::new(Config::from_toml_str(&text).unwrap());
        Ctx {
            timeouts: Timeouts::from_config(&config.delivery),
            helo: config.helo_name().to_string(),
            dns: Dns::new(&config.dns).unwrap(),
            sink: Arc::new(Discard),
            tls: Tls::opportunistic(),
            shutdown: CancellationToken::new(),
            next_source: AtomicUsize::new(0),
            rate_limits: crate::ratelimit::RateLimits::new(&config, Arc::default()),
            verp: None,
            control: None,
            smarthosts: smarthost::Routes::default(),
            mta_sts: None,
            dane: None,
            verify_tls: None,
            webpki: None,
            classifier: Classifier::default(),
            config,
        }
    }

    struct Discard;
    impl AttemptSink for Discard {
        fn complete_attempt(&self, _: crate::envelope::QueueId, _: Vec<RcptOutcome>) {}
    }

    fn broken_tls() -> fake::Script {
        fake::Script {
            ehlo: Some("PIPELINING\nSTARTTLS"),
            broken_tls: true,
            ..fake::Script::default()
        }
    }

    #[test]
    fn a_refused_mail_from_never_suppresses_recipients() {
        let c = Classifier::default();
        for (code, text) in [
            (
                553,
                "5.1.2 The sender address <bounces+x@relay.example> is not a valid address",
            ),
            (550, "5.1.1 <billing@acme.example>... User unknown"),
        ] {
            match mail_failure(&c, &Reply::from_wire(code, text)) {
                AttemptResult::Bounced(_, reason) => {
                    assert_eq!(reason, Reason::SenderRejected, "{text}")
                }
                other => panic!("{other:?}"),
            }
        }
        // Other causes keep their reason.
        match mail_failure(
            &c,
            &Reply::from_wire(554, "5.7.1 blocked using zen.spamhaus.org"),
        ) {
            AttemptResult::Bounced(_, reason) => assert_eq!(reason, Reason::Blocked),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn opportunistic_tls_falls_back_to_plaintext_on_a_new_connection() {
        let (addr, rec) = fake::start(broken_tls()).await;
        let c = open(&ctx("opportunistic"), "mx.test", addr, Asked::Default)
            .await
            .unwrap();
        assert_eq!(c.tls_version(), None);
        assert!(c.is_usable());
        assert_eq!(rec.lock().unwrap().connections, 2);
    }

    #[tokio::test]
    async fn required_tls_defers_when_the_handshake_fails_or_tls_is_missing() {
        let (addr, _) = fake::start(broken_tls()).await;
        let (r, c) = open(&ctx("required"), "mx.test", addr, Asked::Default)
            .await
            .unwrap_err();
        assert_eq!((r.code, r.enhanced), (451, Some(Enhanced(4, 7, 5))));
        assert!(
            r.text
                .starts_with("TLS handshake with mx.test [127.0.0.1]:"),
            "{r}"
        );
        assert_eq!(c, Reason::Tls);

        let (addr, _) = fake::start(fake::Script::default()).await;
        let (r, c) = open(&ctx("required"), "mx.test", addr, Asked::Default)
            .await
            .unwrap_err();
        assert_eq!(r.enhanced, Some(Enhanced(4, 7, 10)));
        assert_eq!(c, Reason::Tls);

        // Disabled: STARTTLS is not even tried.
        let (addr, rec) = fake::start(broken_tls()).await;
        let c = open(&ctx("disabled"), "mx.test", addr, Asked::Default)
            .await
            .unwrap();
        assert_eq!(c.tls_version(), None);
        assert!(!rec.lock().unwrap().lines.iter().any(|l| l == "STARTTLS"));
    }

    fn job(domain: &str) -> DeliveryJob {
        DeliveryJob {
            id: crate::envelope::QueueId::generate(),
            envelope: Arc::new(crate::envelope::Envelope {
                sender: "app@acme.test".into(),
                tenant: None,
                message_id: None,
                received_at: 0,
                client_ip: [127, 0, 0, 1].into(),
                smtputf8: false,
                body_8bit: false,
                ret: None,
                env_id: None,
                require_tls: false,
                ignore_tls_policies: false,
            }),
            body: bytes::Bytes::from_static(b"Subject: x\r\n\r\nx\r\n"),
            domain: domain.into(),
            recipients: vec![crate::queue::JobRecipient {
                index: 0,
                address: format!("a@{domain}"),
                orcpt: None,
                notify: crate::envelope::Notify::default(),
                attempt: 1,
            }],
            return_path: None,
        }
    }

    /// Records outcomes for the tests.
    struct Outcomes(Mutex<Vec<Vec<RcptOutcome>>>);
    impl AttemptSink for Outcomes {
        fn complete_attempt(&self, _: crate::envelope::QueueId, o: Vec<RcptOutcome>) {
            self.0.lock().unwrap().push(o);
        }
    }

    #[tokio::test]
    async fn a_dropped_reused_connection_is_retried_a_fresh_one_is_not() {
        let (addr, _) = fake::start(fake::Script {
            close_after: Some(1),
            ..fake::Script::default()
        })
        .await;
        let outcomes = Arc::new(Outcomes(Mutex::new(Vec::new())));
        let mut ctx = ctx("opportunistic");
        ctx.sink = outcomes.clone();
        let domain = Arc::new(Domain {
            name: "x.test".into(),
            smarthost: None,
            state: Mutex::new(DomainState::default()),
        });
        let session = |client| Session {
            client,
            mx: "mx.test".into(),
            sent: 0,
            smarthost: None,
            verified: "none",
            policy: None,
            policy_failure: None,
            _live: Connected::new(&domain),
        };

        // The first message goes through; the server then hangs up.
        let s = session(open(&ctx, "mx.test", addr, Asked::Default).await.unwrap());
        let s = deliver_job(&ctx, &domain, Some(s), job("x.test")).await;
        assert!(s.as_ref().is_some_and(|s| s.sent == 1));
        // The second finds the connection dead before anything was handed
        // over, and tries a fresh connection (whose DNS lookup fails here).
        assert!(deliver_job(&ctx, &domain, s, job("x.test")).await.is_none());
        {
            let got = outcomes.0.lock().unwrap();
            assert!(matches!(got[0][0].result, AttemptResult::Delivered(_)));
            assert!(
                matches!(&got[1][0].result, AttemptResult::Deferred(_, Reason::Dns)),
                "{:?}",
                got[1]
            );
        }

        // A connection that fails on its first message is not retried.
        let (addr, _) = fake::start(fake::Script {
            mail: |_| "421 4.7.0 go away",
            ..fake::Script::default()
        })
        .await;
        let s = session(open(&ctx, "mx.test", addr, Asked::Default).await.unwrap());
        assert!(
            deliver_job(&ctx, &domain, Some(s), job("x.test"))
                .await
                .is_none()
        );
        let got = outcomes.0.lock().unwrap();
        match &got[2][0].result {
            AttemptResult::Deferred(r, Reason::Policy) => assert_eq!(r.code, 421),
            other => panic!("{other:?}"),
        }
        assert_eq!(got[2][0].mx.as_deref(), Some("mx.test"));
    }

    #[tokio::test]
    async fn opportunistic_tls_is_used_when_it_works() {
        let (addr, _) = fake::start(fake::Script {
            ehlo: Some("STARTTLS"),
            tls: Some(fake::tls_acceptor()),
            ..fake::Script::default()
        })
        .await;
        let c = open(&ctx("opportunistic"), "mx.test", addr, Asked::Default)
            .await
            .unwrap();
        assert_eq!(c.tls_version(), Some("TLSv1.3"));
    }

    #[test]
    fn synthesized_replies_say_where() {
        let addr: SocketAddr = "127.0.0.2:25".parse().unwrap();
        let (r, c) = synthesize(
            &Classifier::default(),
            &ClientError::Refused,
            "mx1.example.net",
            addr,
        );
        assert_eq!(
            r.to_string(),
            "451 4.4.1 Connection to mx1.example.net [127.0.0.2]:25 refused"
        );
        assert_eq!(c, Reason::Network);

        let (r, c) = synthesize(
            &Classifier::default(),
            &ClientError::Timeout(Stage::Greeting),
            "mx1.example.net",
            "[::1]:2525".parse().unwrap(),
        );
        assert_eq!(
            r.to_string(),
            "451 4.4.2 Connection to mx1.example.net [::1]:2525 timed out waiting for the greeting"
        );
        assert_eq!(c, Reason::Network);

        let (r, c) = synthesize(
            &Classifier::default(),
            &ClientError::Tls("bad record".into()),
            "mx",
            addr,
        );
        assert_eq!(r.enhanced, Some(Enhanced(4, 7, 5)));
        assert_eq!(c, Reason::Tls);

        let (r, c) = synthesize(
            &Classifier::default(),
            &ClientError::Rejected {
                stage: Stage::Greeting,
                reply: Reply::from_wire(554, "5.7.1 Your IP is listed at zen.spamhaus.org"),
            },
            "mx",
            addr,
        );
        assert_eq!(r.code, 451);
        assert_eq!(r.enhanced, Some(Enhanced(4, 7, 1)));
        assert!(r.text.contains("554 5.7.1 Your IP"), "{r}");
        assert_eq!(c, Reason::Blocked);
    }

    #[test]
    fn failures_bounce_only_on_5xx() {
        assert!(matches!(
            failure(
                &Classifier::default(),
                &Reply::from_wire(550, "5.1.1 no such user")
            ),
            AttemptResult::Bounced(_, Reason::UserUnknown)
        ));
        assert!(matches!(
            failure(
                &Classifier::default(),
                &Reply::from_wire(452, "4.2.2 mailbox full")
            ),
            AttemptResult::Deferred(_, Reason::MailboxFull)
        ));
        assert!(matches!(
            failure(&Classifier::default(), &Reply::from_wire(354, "go ahead")),
            AttemptResult::Deferred(..)
        ));
    }
}
