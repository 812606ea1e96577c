//! Receiving: the submission SMTP server (RFC 5321, RFC 6409) where apps
//! hand herald their mail.
//!
//! [`start`] binds every `[[listener]]` and runs one accept loop per
//! listener; each accepted connection becomes a session task (`session.rs`)
//! that handles the whole SMTP dialogue on that task. Checks that can be
//! made at once are made at once, so that the app gets a clear SMTP error
//! instead of a bounce later: AUTH (`auth.rs`), the sender against the
//! tenant's patterns (`mail.rs`, `senders.rs`), recipient syntax, the
//! suppression list and the domain (`rcpt.rs`), size, bare LF/CR and policy
//! (`data.rs`). A message is answered with 250 only after the queue has
//! stored it durably.
//!
//! Trust: every byte from a client is untrusted; trusted networks may relay
//! without AUTH but get the same protocol checks.
//!
//! Shutdown: when [`ReceiveContext::shutdown`] is cancelled, listeners stop
//! accepting; idle sessions get `421 4.3.2` at once; sessions inside a
//! transaction may finish it within `server.shutdown_grace`, after which they
//! get `421 4.3.2` too. The handle returned by [`start`] ends when every
//! session has.

pub mod admission;
pub mod auth;
mod bounce;
mod data;
pub mod longlines;
mod mail;
pub mod message;
mod rcpt;

mod session;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::config::{Config, TlsMode};
use crate::dns::Dns;
use crate::queue::Queue;
use crate::reply::{Enhanced, Reply};
use crate::report::Reporter;
use crate::suppression::Suppressions;
use admission::{ByteBudget, ConnLimits, ConnLimitsConfig, LimitHit};
use auth::Authenticator;
use session::Session;

/// How long sessions still running after the grace period get to say 421
/// and close before they are aborted.
const HARD_STOP_WAIT: Duration = Duration::from_secs(5);
/// Connections refused over implicit TLS at once: each costs a handshake.
const TLS_REFUSALS_AT_ONCE: usize = 32;

/// Everything the receive stage shares between its listeners and sessions.
pub struct ReceiveContext {
    pub config: Arc<Config>,
    pub queue: Arc<Queue>,
    pub dns: Dns,
    pub reporter: Reporter,
    /// Checked at RCPT TO; empty unless set with
    /// [`ReceiveContext::with_suppressions`].
    pub suppressions: Suppressions,
    /// Signs each accepted message; no keys unless set with
    /// [`ReceiveContext::with_dkim`].
    pub dkim: Arc<crate::policy::dkim::Signer>,
    /// Spam heuristics, blocklists and DMARC alignment, run on each
    /// message; rebuilt by [`ReceiveContext::with_dkim`] so that alignment
    /// knows herald's keys.
    pub policy: Arc<crate::policy::Policy>,
    /// `[bounces]` VERP addresses, for the bounce listener.
    pub verp: Option<crate::verp::Verp>,
    /// Tenants paused for reputation are refused at MAIL FROM; nothing is
    /// paused unless set with [`ReceiveContext::with_control`].
    pub control: crate::control::Control,
    /// Needed by STARTTLS and implicit-TLS listeners.
    pub tls: Option<TlsAcceptor>,
    /// Cancel to shut the stage down gracefully.
    pub shutdown: CancellationToken,
    /// Cancelled when the grace period is over: sessions still open close.
    hard_stop: CancellationToken,
    limits: Arc<ConnLimits>,
    /// `server.max_receiving_bytes`: message bytes being received at once.
    pub(crate) receiving: Arc<ByteBudget>,
    /// `[limits]`: tenant message/recipient rates, connections per IP.
    pub(crate) rate_limits: crate::ratelimit::RateLimits,
    /// `[classification]`, for the reports the bounce listener takes in.
    pub classifier: crate::deliver::classify::Classifier,
    auth: Authenticator,
    tls_refusals: Arc<Semaphore>,
    /// Unix second of the last "connection refused" warning (rate limit).
    last_refusal_log: AtomicU64,
    refusals_unlogged: AtomicU64,
    /// Unix second of the last "accept failed" warning (rate limit).
    last_accept_error_log: AtomicU64,
}

impl ReceiveContext {
    pub fn new(
        config: Arc<Config>,
        queue: Arc<Queue>,
        dns: Dns,
        reporter: Reporter,
        tls: Option<TlsAcceptor>,
        shutdown: CancellationToken,
    ) -> ReceiveContext {
        let server = &config.server;
        let conn_limits = ConnLimitsConfig::from_server(server, admission::fd_capacity());
        if conn_limits.max_total < server.max_connections {
            tracing::warn!(
                max_connections = server.max_connections,
                usable = conn_limits.max_total,
                "server.max_connections is more than the open-files limit allows; taking at most {} connections (raise it with ulimit -n or systemd's LimitNOFILE)",
                conn_limits.max_total
            );
        }
        let policy = Arc::new(crate::policy::Policy::new(
            &config,
            &dns,
            Arc::new(crate::policy::dkim::Signer::empty()),
        ));
        ReceiveContext {
            policy,
            verp: crate::verp::Verp::from_config(&config.bounces),
            limits: ConnLimits::new(conn_limits),
            receiving: ByteBudget::new(
                usize::try_from(server.max_receiving_bytes.0).unwrap_or(usize::MAX),
            ),
            rate_limits: crate::ratelimit::RateLimits::new(&config, reporter.metrics().clone()),
            classifier: crate::deliver::classify::Classifier::new(&config.classification),
            auth: Authenticator::new(
                server.auth_failure_window.as_duration(),
                server.max_auth_failures,
            ),
            config: Arc::clone(&config),
            queue,
            dns,
            reporter,
            suppressions: Suppressions::in_memory(),
            dkim: Arc::new(crate::policy::dkim::Signer::empty()),
            control: crate::control::Control::in_memory(&config),
            tls,
            shutdown,
            hard_stop: CancellationToken::new(),
            tls_refusals: Arc::new(Semaphore::new(TLS_REFUSALS_AT_ONCE)),
            last_refusal_log: AtomicU64::new(0),
            refusals_unlogged: AtomicU64::new(0),
            last_accept_error_log: AtomicU64::new(0),
        }
    }

    /// Refuse recipients on this suppression list at RCPT TO.
    pub fn with_suppressions(mut self, suppressions: Suppressions) -> ReceiveContext {
        self.suppressions = suppressions;
        self
    }

    /// Refuse the MAIL FROM of tenants this control has paused.
    pub fn with_control(mut self, control: crate::control::Control) -> ReceiveContext {
        self.control = control;
        self
    }

    /// Sign accepted messages with these DKIM keys.
    pub fn with_dkim(mut self, dkim: Arc<crate::policy::dkim::Signer>) -> ReceiveContext {
        self.policy = Arc::new(crate::policy::Policy::new(
            &self.config,
            &self.dns,
            dkim.clone(),
        ));
        self.dkim = dkim;
        self
    }

    /// A context for `config` (re-read and validated), its TLS acceptor and
    /// DKIM keys, for the connections accepted from now on: tenants and
    /// their passwords, the certificate, DKIM keys, policy, rate limits and
    /// classification are the new ones; the queue, the bus, the lists, the
    /// connection counts and the shutdown signals are this one's. The
    /// password cache and the count of failed logins start afresh (a
    /// changed password must not pass from the cache).
    pub fn reloaded(
        &self,
        config: Arc<Config>,
        tls: Option<TlsAcceptor>,
        dkim: Arc<crate::policy::dkim::Signer>,
    ) -> ReceiveContext {
        let server = &config.server;
        ReceiveContext {
            policy: Arc::new(crate::policy::Policy::new(&config, &self.dns, dkim.clone())),
            verp: crate::verp::Verp::from_config(&config.bounces),
            limits: self.limits.clone(),
            receiving: self.receiving.clone(),
            rate_limits: crate::ratelimit::RateLimits::new(
                &config,
                self.reporter.metrics().clone(),
            ),
            classifier: crate::deliver::classify::Classifier::new(&config.classification),
            auth: Authenticator::new(
                server.auth_failure_window.as_duration(),
                server.max_auth_failures,
            ),
            queue: self.queue.clone(),
            dns: self.dns.clone(),
            reporter: self.reporter.clone(),
            suppressions: self.suppressions.clone(),
            dkim,
            control: self.control.clone(),
            tls,
            shutdown: self.shutdown.clone(),
            hard_stop: self.hard_stop.clone(),
            tls_refusals: self.tls_refusals.clone(),
            last_refusal_log: AtomicU64::new(0),
            refusals_unlogged: AtomicU64::new(0),
            last_accept_error_log: AtomicU64::new(0),
            config,
        }
    }

    /// Client connections open now, over all listeners.
    pub fn open_connections(&self) -> usize {
        self.limits.open()
    }

    /// Connections taken at most: `server.max_connections`, or less when
    /// the file-descriptor limit does not allow that many.
    pub fn max_connections(&self) -> usize {
        self.limits.max_total()
    }
}

/// The context new connections get; a config reload replaces it, and
/// sessions keep the one they started with.
#[derive(Clone)]
pub struct Current(Arc<std::sync::RwLock<Arc<ReceiveContext>>>);

impl Current {
    pub fn new(ctx: Arc<ReceiveContext>) -> Current {
        Current(Arc::new(std::sync::RwLock::new(ctx)))
    }

    pub fn get(&self) -> Arc<ReceiveContext> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Makes `ctx` (from [`ReceiveContext::reloaded`]) the one new
    /// connections get.
    pub fn replace(&self, ctx: Arc<ReceiveContext>) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = ctx;
    }
}

/// Binds every `[[listener]]` and starts accepting. Returns the bound
/// addresses in config order (a port 0 in the config becomes the port the
/// OS chose) and a handle that ends once, after shutdown, every session has
/// finished.
pub async fn start(ctx: Arc<ReceiveContext>) -> io::Result<(Vec<SocketAddr>, JoinHandle<()>)> {
    start_current(Current::new(ctx)).await
}

/// [`start`] with the context taken from `current` for every connection.
pub async fn start_current(current: Current) -> io::Result<(Vec<SocketAddr>, JoinHandle<()>)> {
    let ctx = current.get();
    let mut bound = Vec::with_capacity(ctx.config.listeners.len());
    let mut sockets = Vec::with_capacity(ctx.config.listeners.len());
    for (i, l) in ctx.config.listeners.iter().enumerate() {
        if l.tls != TlsMode::None && ctx.tls.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "listener[{i}] ({}) uses TLS but no certificate is loaded",
                    l.address
                ),
            ));
        }
        let socket = TcpListener::bind(l.address).await.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("listener[{i}]: cannot listen on {}: {e}", l.address),
            )
        })?;
        bound.push(socket.local_addr()?);
        sockets.push(socket);
    }
    let mut loops = JoinSet::new();
    for (i, socket) in sockets.into_iter().enumerate() {
        let span = tracing::info_span!("listener", index = i, address = %bound[i]);
        loops.spawn(accept_loop(current.clone(), i, socket).instrument(span));
    }
    let handle = tokio::spawn(async move { while loops.join_next().await.is_some() {} });
    Ok((bound, handle))
}

/// Accepts connections on one listener until shutdown, then waits for its
/// sessions (the hickory-dns `ServerFuture` pattern).
async fn accept_loop(current: Current, index: usize, socket: TcpListener) {
    let ctx = current.get();
    // Every context shares these: a reload changes neither.
    let (shutdown, hard_stop) = (ctx.shutdown.clone(), ctx.hard_stop.clone());
    let grace = ctx.config.server.shutdown_grace.as_duration();
    drop(ctx);
    let mode = current.get().config.listeners[index].tls;
    tracing::info!(tls = ?mode, "accepting SMTP connections");
    let mut sessions = JoinSet::new();
    // Kept open so that, out of file descriptors, one can be freed to
    // accept a client and tell it 421 rather than leave it hanging.
    let mut spare = std::fs::File::open("/dev/null").ok();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(done) = sessions.join_next(), if !sessions.is_empty() => {
                if let Err(e) = done && e.is_panic() {
                    tracing::error!(error = %e, "SMTP session panicked");
                }
            }
            accepted = socket.accept() => match accepted {
                Ok((tcp, peer)) => connection(&current.get(), index, tcp, peer, &mut sessions),
                Err(e) => accept_failed(&current.get(), index, &socket, e, &mut spare).await,
            },
        }
    }
    drop(socket);
    tracing::info!(
        sessions = sessions.len(),
        "listener closed; waiting for sessions"
    );
    if tokio::time::timeout(grace, drain(&mut sessions))
        .await
        .is_err()
    {
        tracing::warn!(
            sessions = sessions.len(),
            "grace period over; closing sessions"
        );
        hard_stop.cancel();
        if tokio::time::timeout(HARD_STOP_WAIT, drain(&mut sessions))
            .await
            .is_err()
        {
            sessions.abort_all();
            drain(&mut sessions).await;
        }
    }
}

/// An accept that failed: out of file descriptors (EMFILE, ENFILE) the
/// spare descriptor is given up to accept one client and tell it 421;
/// either way the error is logged at most every 10 s and the loop pauses a
/// little rather than spin on it.
async fn accept_failed(
    ctx: &ReceiveContext,
    index: usize,
    socket: &TcpListener,
    e: io::Error,
    spare: &mut Option<std::fs::File>,
) {
    let out_of_fds = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
    if every_10s(&ctx.last_accept_error_log) {
        tracing::warn!(error = %e, max_connections = ctx.max_connections(), "accept failed; raise the open-files limit (ulimit -n, LimitNOFILE) or lower server.max_connections");
    }
    if out_of_fds && spare.take().is_some() {
        if let Ok((tcp, _)) = socket.accept().await {
            let reply = Reply::new(
                421,
                Enhanced(4, 3, 2),
                "Too many connections: the server is out of resources, try again later",
            );
            if ctx.config.listeners[index].tls != TlsMode::Implicit {
                let _ = tcp.try_write(&reply.to_wire());
            }
        }
        *spare = std::fs::File::open("/dev/null").ok();
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
}

/// True at most once per 10 seconds for one `last` (a Unix second).
fn every_10s(last: &AtomicU64) -> bool {
    let now = crate::clock::unix_now();
    let before = last.load(Ordering::Relaxed);
    now >= before + 10
        && last
            .compare_exchange(before, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

async fn drain(sessions: &mut JoinSet<()>) {
    while sessions.join_next().await.is_some() {}
}

/// Starts a session for a new connection, or refuses it over a limit.
fn connection(
    ctx: &Arc<ReceiveContext>,
    index: usize,
    tcp: TcpStream,
    peer: SocketAddr,
    sessions: &mut JoinSet<()>,
) {
    // Replies are small and pipelined: Nagle would hold each one back for
    // a delayed ACK (~40 ms) on the client's side.
    let _ = tcp.set_nodelay(true);
    let ip = peer.ip().to_canonical();
    let trusted = ctx.config.listeners[index]
        .trusted_networks
        .iter()
        .any(|n| n.contains(&ip));
    match ctx.limits.acquire(ip, trusted || ctx.limits.is_known(ip)) {
        Ok(slot) => {
            let session = Session::new(Arc::clone(ctx), index, peer, trusted);
            let span = tracing::debug_span!("smtp", client = %peer);
            sessions.spawn(session.run(tcp, slot).instrument(span));
        }
        Err(hit) => refuse(ctx, index, tcp, peer, hit, sessions),
    }
}

/// `421 4.7.0` naming the limit, then close.
fn refuse(
    ctx: &Arc<ReceiveContext>,
    index: usize,
    tcp: TcpStream,
    peer: SocketAddr,
    hit: LimitHit,
    sessions: &mut JoinSet<()>,
) {
    log_refusal(ctx, peer, hit);
    let reply = Reply::new(421, Enhanced(4, 7, 0), hit.reply_text()).to_wire();
    if ctx.config.listeners[index].tls != TlsMode::Implicit {
        // A fresh socket's send buffer is empty: this write does not block.
        let _ = tcp.try_write(&reply);
        return;
    }
    // Implicit TLS: the reply means something only inside TLS. Bounded, so a
    // flood of refused connections cannot make us do unbounded handshakes.
    let (Ok(permit), Some(acceptor)) = (
        Arc::clone(&ctx.tls_refusals).try_acquire_owned(),
        ctx.tls.clone(),
    ) else {
        return;
    };
    sessions.spawn(async move {
        let _permit = permit;
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            use tokio::io::AsyncWriteExt as _;
            let mut tls = acceptor.accept(tcp).await?;
            tls.write_all(&reply).await?;
            tls.shutdown().await
        })
        .await;
    });
}

/// Warns about refused connections at most once per 10 seconds, with the
/// number refused since the last warning, so a flood does not flood the log.
fn log_refusal(ctx: &ReceiveContext, peer: SocketAddr, hit: LimitHit) {
    let unlogged = ctx.refusals_unlogged.fetch_add(1, Ordering::Relaxed) + 1;
    if every_10s(&ctx.last_refusal_log) {
        ctx.refusals_unlogged.store(0, Ordering::Relaxed);
        tracing::warn!(client = %peer, limit = ?hit, refused = unlogged, "connection limit reached, refusing connections");
    }
}
