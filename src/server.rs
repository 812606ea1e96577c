//! Wires the stages together: events → DNS → queue (+ scheduler) → delivery
//! → submission listeners → admin API (its port is bound first, so that a
//! taken port fails the start), and takes them down in the reverse order so that
//! nothing accepted is lost: stop accepting, let sessions finish, let
//! deliveries in flight finish, then sync the spool.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminServer, AdminState};
use crate::config::{Config, ConfigErrors};
use crate::dns::Dns;
use crate::queue::Queue;
use crate::queue::tlsrpt::TlsReportSender;
use crate::receive::{self, ReceiveContext};
use crate::report::Reporter;
use crate::suppression::Suppressions;
use crate::{deliver, tls};

/// Log directive for rustls's SNI warnings: rustls warns about every
/// ClientHello whose SNI is an IP address (RFC 6066 §3 allows only host
/// names, yet clients connecting by IP send one) and then ignores it; the
/// other warnings there (a duplicate or malformed name) end in a refused
/// handshake herald sees anyway. A client's doing, one line per connection,
/// nothing for the operator to act on.
const QUIET_SNI: &str = "rustls::msgs::handshake=error";

/// The filter of herald's log: `rust_log` (the `RUST_LOG` variable) when it
/// is set and valid, else `info`; rustls's SNI warnings left out unless
/// `rust_log` names rustls itself.
pub fn log_filter(rust_log: Option<&str>) -> tracing_subscriber::EnvFilter {
    use tracing_subscriber::EnvFilter;
    let filter = rust_log
        .and_then(|s| EnvFilter::try_new(s).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    if rust_log.is_some_and(|s| s.contains("rustls")) {
        filter
    } else {
        filter.add_directive(QUIET_SNI.parse().expect("a valid directive"))
    }
}

/// A running relay.
pub struct Running {
    /// Bound submission addresses, in `[[listener]]` order.
    pub smtp_addrs: Vec<SocketAddr>,
    /// Bound admin API address (`[admin] address`; port 0 gets a free port).
    pub admin_addr: Option<SocketAddr>,
    pub queue: Arc<Queue>,
    admin: Option<AdminServer>,
    grace: Duration,
    stop_receiving: CancellationToken,
    stop_delivering: CancellationToken,
    receive_task: JoinHandle<()>,
    deliver_task: JoinHandle<()>,
    scheduler_task: JoinHandle<()>,
    events_task: JoinHandle<()>,
    /// The Redis events stream's writer, when clustered.
    stream_task: Option<JoinHandle<()>>,
    suppressions: Suppressions,
    webhooks: Option<crate::report::webhook::Webhooks>,
    /// Sends the daily TLS reports (RFC 8460), when `[delivery.tls_reports]`
    /// is on; [`TlsReportSender::send_day`] sends a day's at once.
    pub tls_reports: Option<Arc<TlsReportSender>>,
    tls_reports_task: Option<JoinHandle<()>>,
    /// The receive stage's context for new connections (config reload).
    receive: receive::Current,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(String),
    #[error("cannot open the events log {path}: {source}")]
    Events {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot open the suppression list {path}: {source}")]
    Suppressions {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot open the webhook outbox {path}: {source}")]
    Webhooks {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot read the suspensions and pauses {path}: {source}")]
    Control {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot open the spool: {0}")]
    Spool(#[from] crate::queue::QueueError),
    #[error("cannot listen: {0}")]
    Listen(std::io::Error),
}

/// Starts every stage. Listeners bound to port 0 get a free port; the
/// bound addresses are in [`Running::smtp_addrs`].
pub async fn start(config: Config) -> Result<Running, StartError> {
    let config = Arc::new(config);
    let tls = if config.needs_tls() {
        Some(tls::acceptor(&config).map_err(|e| StartError::Config(e.to_string()))?)
    } else {
        None
    };
    let dns = Dns::new(&config.dns).map_err(StartError::Config)?;
    crate::policy::alignment::warn_unjudged(&config);
    let dkim = Arc::new(
        crate::policy::dkim::Signer::load(&config)
            .map_err(|errs| StartError::Config(errs.to_string()))?,
    );
    if !dkim.is_empty() {
        // A warning only: DNS may lag behind a new key, and a lookup must
        // never hold up the start.
        let (dkim, dns) = (dkim.clone(), dns.clone());
        tokio::spawn(async move { crate::policy::dkim::warn_unpublished(&dkim, &dns).await });
    }
    let admin_listener = admin::bind(&config.admin)
        .await
        .map_err(StartError::Listen)?;
    let (reporter, events_task) = Reporter::start(&config.events.log)
        .await
        .map_err(|source| StartError::Events {
            path: config.events.log.display().to_string(),
            source,
        })?;
    let suppressions = Suppressions::open(&config, reporter.metrics().clone())
        .await
        .map_err(|source| StartError::Suppressions {
            path: config.suppression_file().display().to_string(),
            source,
        })?;
    let control = crate::control::Control::open(&config).map_err(|source| StartError::Control {
        path: config
            .server
            .spool_dir
            .join(crate::control::STATE_FILE)
            .display()
            .to_string(),
        source,
    })?;
    reporter.add_sink(Arc::new(suppressions.clone()));
    reporter.add_sink(Arc::new(control.clone()));
    // Every later clone of the resolver counts its lookups.
    let dns = dns.with_metrics(reporter.metrics().clone());
    let webhooks = crate::report::webhook::Webhooks::start(&config, reporter.metrics().clone())
        .await
        .map_err(|source| StartError::Webhooks {
            path: config.webhook_outbox().display().to_string(),
            source,
        })?;
    if let Some(w) = &webhooks {
        reporter.add_sink(Arc::new(w.outbox()));
    }
    // `[cluster] redis_url`: every event also goes to the Redis stream.
    let stream_task =
        match crate::report::stream::EventStream::start(&config, reporter.metrics().clone()) {
            Some(Ok((s, task))) => {
                reporter.add_sink(Arc::new(s));
                Some(task)
            }
            Some(Err(e)) => {
                tracing::error!(error = %e, "events stream disabled");
                None
            }
            None => None,
        };

    let (jobs_tx, jobs_rx) = mpsc::unbounded_channel();
    let queue = Queue::open_with_dkim(&config, reporter.clone(), jobs_tx, dkim.clone())?;
    let stop_delivering = CancellationToken::new();
    let scheduler_task = tokio::spawn(queue.clone().run_scheduler(stop_delivering.clone()));
    let tls_reports =
        TlsReportSender::new(&config, &queue, dns.clone()).map_err(StartError::Config)?;
    let tls_reports_task = tls_reports
        .clone()
        .map(|s| tokio::spawn(s.run(stop_delivering.clone())));
    let deliver_task = deliver::start_with_control(
        config.clone(),
        dns.clone(),
        queue.clone(),
        jobs_rx,
        stop_delivering.clone(),
        control.clone(),
    );

    let stop_receiving = CancellationToken::new();
    let metrics = reporter.metrics().clone();
    let ctx = Arc::new(
        ReceiveContext::new(
            config.clone(),
            queue.clone(),
            dns,
            reporter,
            tls,
            stop_receiving.clone(),
        )
        .with_suppressions(suppressions.clone())
        .with_control(control.clone())
        .with_dkim(dkim),
    );
    let receive_ctx = ctx.clone();
    let receive = receive::Current::new(ctx);
    let (smtp_addrs, receive_task) = receive::start_current(receive.clone())
        .await
        .map_err(StartError::Listen)?;
    let mut admin_state = AdminState::new(
        &config.admin,
        queue.clone(),
        metrics,
        Box::new(move || receive_ctx.open_connections()),
    )
    .with_suppressions(suppressions.clone())
    .with_control(control);
    if let Some(path) = config.source.clone() {
        let receive = receive.clone();
        admin_state.reload = Some(Box::new(move || reload_receive(&receive, &path)));
    }
    let admin = admin::serve(admin_listener, Arc::new(admin_state)).map_err(StartError::Listen)?;
    tracing::info!(listeners = ?smtp_addrs, hostname = %config.server.hostname, "herald is running");
    Ok(Running {
        smtp_addrs,
        admin_addr: Some(admin.addr),
        queue,
        admin: Some(admin),
        grace: config.server.shutdown_grace.as_duration(),
        stop_receiving,
        stop_delivering,
        receive_task,
        deliver_task,
        scheduler_task,
        events_task,
        stream_task,
        suppressions,
        webhooks,
        tls_reports,
        tls_reports_task,
        receive,
    })
}

/// The parts of `c` a reload does not apply, as text to compare: they
/// take effect after a restart. Some bind sockets, open files or start
/// tasks; the others are read by stages that keep the config they started
/// with (delivery, webhooks, DSNs).
fn restart_only_parts(c: &Config) -> Vec<(&'static str, String)> {
    // Debug hides secrets; a changed one must be seen too (these strings
    // are compared, never shown).
    let secret = |s: Option<&crate::config::Secret>| s.map(|s| s.expose().to_string());
    let tenant_routes: Vec<_> = c
        .tenants
        .iter()
        .map(|t| {
            (
                &t.name,
                &t.webhook_url,
                secret(t.webhook_secret.as_ref()),
                &t.smarthost,
            )
        })
        .collect();
    let smarthost_passwords: Vec<_> = c.smarthosts.iter().map(|s| s.password.expose()).collect();
    vec![
        ("listener", format!("{:?}", c.listeners)),
        ("server.spool_dir", format!("{:?}", c.server.spool_dir)),
        ("server.hostname", c.server.hostname.clone()),
        ("events", format!("{:?}", c.events)),
        (
            "admin",
            format!("{:?}{:?}", c.admin, secret(c.admin.token.as_ref())),
        ),
        // VERP addresses are made by delivery and read by the bounce
        // listener: both must keep one secret until a restart.
        (
            "bounces",
            format!(
                "{:?}{:?}",
                c.bounces,
                secret(c.bounces.verp_secret.as_ref())
            ),
        ),
        ("dns", format!("{:?}", c.dns)),
        ("cluster", format!("{:?}", c.cluster)),
        ("suppression", format!("{:?}", c.suppression)),
        ("history", format!("{:?}", c.history)),
        ("delivery", format!("{:?}", c.delivery)),
        (
            "smarthost",
            format!("{:?}{smarthost_passwords:?}{tenant_routes:?}", c.smarthosts),
        ),
        ("webhooks", format!("{:?}", c.webhooks)),
        ("dsn", format!("{:?}", c.dsn)),
        ("reputation", format!("{:?}", c.reputation)),
    ]
}

impl Running {
    /// Re-reads the config file and applies what can change while running
    /// to the connections accepted from now on: tenants (passwords, allowed
    /// senders), the TLS certificate and key, DKIM keys, policy (spam,
    /// DMARC, DNSBL), rate limits and classification rules. Sessions in
    /// flight finish with the config they started with. A file that does
    /// not validate, or a certificate or key that cannot be loaded, changes
    /// nothing: the error lists every problem. Returns what changed but
    /// takes effect only after a restart ("delivery changed: takes effect
    /// after restart").
    pub fn reload(&self, path: &std::path::Path) -> Result<Vec<String>, ConfigErrors> {
        reload_receive(&self.receive, path)
    }
}

/// [`Running::reload`], for whoever holds the receive stage's context.
fn reload_receive(
    receive: &receive::Current,
    path: &std::path::Path,
) -> Result<Vec<String>, ConfigErrors> {
    let mut fresh = Config::load(path)?;
    let current = receive.get();
    let old = &current.config;
    let (was, now) = (restart_only_parts(old), restart_only_parts(&fresh));
    let pending: Vec<String> = was
        .iter()
        .zip(&now)
        .filter(|(a, b)| a.1 != b.1)
        .map(|(a, _)| format!("{} changed: takes effect after restart", a.0))
        .collect();
    // What is bound, open or running stays as it is.
    fresh.listeners = old.listeners.clone();
    fresh.server.spool_dir = old.server.spool_dir.clone();
    fresh.events = old.events.clone();
    fresh.admin = old.admin.clone();
    fresh.bounces = old.bounces.clone();
    let mut errs = ConfigErrors::default();
    let tls = if fresh.needs_tls() {
        match tls::acceptor(&fresh) {
            Ok(a) => Some(a),
            Err(e) => {
                errs.push("tls", e.to_string());
                None
            }
        }
    } else {
        None
    };
    let dkim = match crate::policy::dkim::Signer::load(&fresh) {
        Ok(d) => Arc::new(d),
        Err(e) => {
            errs.0.extend(e.0);
            return Err(errs);
        }
    };
    if !errs.0.is_empty() {
        return Err(errs);
    }
    let fresh = Arc::new(fresh);
    receive.replace(Arc::new(current.reloaded(fresh, tls, dkim)));
    Ok(pending)
}

impl Running {
    /// Graceful shutdown: stop accepting, let sessions and deliveries in
    /// flight finish within the grace period, leave the rest queued.
    pub async fn shutdown(self) {
        tracing::info!("shutting down: no new connections");
        // The admin API first: it holds the queue (and so the events
        // writer) and has nothing to do once the relay stops.
        if let Some(admin) = self.admin {
            admin.shutdown().await;
        }
        self.stop_receiving.cancel();
        // Sessions get the grace period, then 421 and a few seconds to close.
        let receive_limit = self.grace + Duration::from_secs(10);
        if tokio::time::timeout(receive_limit, self.receive_task)
            .await
            .is_err()
        {
            tracing::warn!("sessions still open after the grace period; closing them");
        }
        self.stop_delivering.cancel();
        let mut deliver_task = self.deliver_task;
        if tokio::time::timeout(self.grace, &mut deliver_task)
            .await
            .is_err()
        {
            // Their recipients are still pending on disk: retried after restart.
            tracing::warn!("deliveries still running after the grace period; they stay queued");
            deliver_task.abort();
        }
        // The scheduler may be reading a backlog of bodies: bounded wait.
        let _ = tokio::time::timeout(Duration::from_secs(10), self.scheduler_task).await;
        // A report being sent is abandoned: it is not marked sent, so it
        // goes again after restart.
        if let Some(mut t) = self.tls_reports_task
            && tokio::time::timeout(Duration::from_secs(2), &mut t)
                .await
                .is_err()
        {
            t.abort();
        }
        drop(self.tls_reports);
        self.queue.close().await;
        // Entries added by the last bounces are written in the background.
        if let Ok(Err(e)) =
            tokio::time::timeout(Duration::from_secs(5), self.suppressions.flush()).await
        {
            tracing::error!(error = %e, "suppression list not saved");
        }
        // The events writer ends when the last reporter is gone.
        drop(self.queue);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.events_task).await;
        if let Some(t) = self.stream_task {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        // Last: every event offered to the webhook outbox is then on disk.
        if let Some(w) = self.webhooks {
            w.shutdown().await;
        }
        tracing::info!("stopped");
    }
}

/// `herald serve`: runs until SIGTERM or SIGINT, then shuts down gracefully;
/// SIGHUP re-reads the config from `path`.
pub async fn run_until_signal(config: Config, path: &std::path::Path) -> Result<(), StartError> {
    // Each client connection is a file descriptor: take what the hard limit
    // allows before the limits are sized from it.
    if let Some(soft) = crate::receive::admission::raise_fd_limit() {
        tracing::debug!(open_files = soft, "open-files limit");
    }
    // Message bodies are large, short-lived buffers. glibc raises its mmap
    // threshold after each large free, so that later bodies come from the
    // heap and stay there once freed; a fixed threshold keeps them mapped
    // and gives their memory back to the system when they are done.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before the
    // relay starts allocating bodies.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
    // Handlers first: a SIGHUP that follows READY at once must reload, not
    // end the process as its default action would.
    let signals = Signals::install();
    let running = start(config).await?;
    // The spool is replayed and every listener accepts: ready (systemd's
    // Type=notify waits for this before it starts what depends on herald).
    sd_notify("READY=1\nSTATUS=accepting mail");
    let watchdog = watchdog_interval().map(|every| {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                sd_notify("WATCHDOG=1");
            }
        })
    });
    match signals {
        Some(s) => s.wait(&running, path).await,
        // Without signal handlers, run until killed.
        None => std::future::pending::<()>().await,
    }
    sd_notify("STOPPING=1\nSTATUS=stopping: finishing sessions and deliveries");
    if let Some(w) = watchdog {
        w.abort();
    }
    running.shutdown().await;
    Ok(())
}

/// The signals `herald serve` answers.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Option<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Some(Signals {
            term: signal(SignalKind::terminate()).ok()?,
            int: signal(SignalKind::interrupt()).ok()?,
            hup: signal(SignalKind::hangup()).ok()?,
            usr1: signal(SignalKind::user_defined1()).ok()?,
        })
    }

    /// Runs until SIGTERM or SIGINT. SIGUSR1 and SIGHUP reopen the events
    /// log (after `logrotate` moved it); SIGHUP also reloads the config.
    async fn wait(self, running: &Running, path: &std::path::Path) {
        let Signals {
            mut term,
            mut int,
            mut hup,
            mut usr1,
        } = self;
        loop {
            tokio::select! {
                _ = term.recv() => return tracing::info!("SIGTERM received"),
                _ = int.recv() => return tracing::info!("SIGINT received"),
                _ = hup.recv() => {
                    running.queue.reporter().reopen_log();
                    sd_notify("RELOADING=1");
                    match running.reload(path) {
                        Ok(pending) => {
                            for p in &pending {
                                tracing::warn!(config = %path.display(), "{p}");
                            }
                            tracing::info!(config = %path.display(), "SIGHUP: config reloaded for new connections (tenants, TLS certificate, DKIM keys, policy, rate limits); events log reopened");
                        }
                        Err(errs) => {
                            for e in &errs.0 {
                                tracing::error!(config = %path.display(), "{e}");
                            }
                            tracing::error!(config = %path.display(), problems = errs.0.len(), "SIGHUP: the config does not validate; the running config stays");
                        }
                    }
                    sd_notify("READY=1");
                }
                _ = usr1.recv() => {
                    tracing::info!("SIGUSR1 received: reopening the events log");
                    running.queue.reporter().reopen_log();
                }
            }
        }
    }
}

/// Tells systemd (sd_notify(3)) how herald is doing, when it started herald
/// with `NOTIFY_SOCKET` set: a datagram to that socket, a path or, after
/// '@', an abstract name.
fn sd_notify(state: &str) {
    use std::os::unix::ffi::OsStrExt;
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = std::os::unix::net::UnixDatagram::unbound().and_then(|sock| {
        match target.as_bytes().strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                sock.send_to_addr(state.as_bytes(), &addr)
            }
            None => sock.send_to(state.as_bytes(), &target),
        }
    });
    if let Err(e) = sent {
        tracing::warn!(socket = ?target, error = %e, "cannot notify systemd");
    }
}

/// Half of systemd's watchdog timeout (`WATCHDOG_USEC`), when the watchdog
/// is on for this process.
fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// `herald check-config`: the checks that need more than the file itself
/// (certificate and key readable, resolver configurable).
pub async fn check(config: &Config) -> Result<(), ConfigErrors> {
    let mut errs = ConfigErrors::default();
    if config.needs_tls()
        && config.tls.cert.exists()
        && let Err(e) = tls::load(&config.tls.cert, &config.tls.key)
    {
        errs.0.push(crate::config::ConfigError {
            path: "tls".into(),
            message: e.to_string(),
        });
    }
    let dns = match Dns::new(&config.dns) {
        Ok(dns) => Some(dns),
        Err(e) => {
            errs.0.push(crate::config::ConfigError {
                path: "dns".into(),
                message: e,
            });
            None
        }
    };
    // DKIM keys readable, parseable, long enough; then (a warning, not an
    // error) published in DNS as they are.
    match crate::policy::dkim::Signer::load(config) {
        Ok(dkim) => {
            if let Some(dns) = dns {
                crate::policy::dkim::warn_unpublished(&dkim, &dns).await;
            }
        }
        Err(e) => errs.0.extend(e.0),
    }
    if errs.0.is_empty() { Ok(()) } else { Err(errs) }
}
