//! `herald loadgen`: an SMTP load generator in the manner of Postfix's
//! `smtp-source`, built on herald's own client ([`crate::deliver::client`]).
//!
//! `concurrency` sessions send `messages` messages of about `size` bytes
//! between them, each message a valid RFC 5322 message (From, To, Subject,
//! Date, a unique Message-ID, 76-character body lines). With `reuse`
//! (smtp-source's `-d`) a session sends message after message over one
//! connection; without it every message gets a connection of its own, with
//! its own EHLO, STARTTLS and AUTH, as a naive application would.
//!
//! The report gives the accepted messages per second, the accept latency
//! (from starting MAIL FROM to the 250 after the final dot) at p50, p99 and
//! max, and the failures by reply code or error. It trusts the target with
//! nothing: certificates are not checked (it is a benchmark, often against a
//! self-signed test certificate), and the password is never printed.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::Secret;
use crate::deliver::client::{
    ClientError, MailParams, RcptParams, SmtpClient, Timeouts, Tls, TransactionReplies,
};
use crate::deliver::failure;

/// How the load generator secures its connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LoadgenTls {
    /// Plain SMTP.
    #[default]
    None,
    /// STARTTLS after the first EHLO (`--starttls`, port 587).
    StartTls,
    /// TLS from the first byte (`--tls`, port 465).
    Implicit,
}

/// What to send, where, how hard.
#[derive(Clone, Debug)]
pub struct LoadgenOptions {
    /// `HOST:PORT`; the host is also the TLS server name.
    pub target: String,
    /// Messages to send in all.
    pub messages: usize,
    /// Sessions running at once.
    pub concurrency: usize,
    /// Approximate size of each message in bytes, headers included.
    pub size: usize,
    /// AUTH user and password (PLAIN, else LOGIN).
    pub auth: Option<(String, Secret)>,
    pub tls: LoadgenTls,
    /// Envelope sender and From: address.
    pub from: String,
    /// Envelope recipient and To: address.
    pub to: String,
    /// Send many messages per connection (smtp-source -d) instead of one.
    pub reuse: bool,
    /// The name given in EHLO.
    pub helo: String,
    /// Limit on connecting and on each command; the data phase gets four
    /// times as long.
    pub timeout: Duration,
    /// Show a progress line on stderr, updated five times a second.
    pub progress: bool,
}

impl Default for LoadgenOptions {
    fn default() -> Self {
        LoadgenOptions {
            target: "127.0.0.1:2525".into(),
            messages: 1000,
            concurrency: 10,
            size: 2048,
            auth: None,
            tls: LoadgenTls::None,
            from: "loadgen@example.com".into(),
            to: "sink@example.net".into(),
            reuse: false,
            helo: "loadgen.localhost".into(),
            timeout: Duration::from_secs(30),
            progress: false,
        }
    }
}

/// What a run achieved.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadgenReport {
    /// Messages attempted.
    pub messages: usize,
    /// Messages the target accepted (2xx after the final dot).
    pub accepted: usize,
    pub failed: usize,
    /// Connections opened.
    pub connections: usize,
    pub elapsed: Duration,
    /// Accepted messages per second of the whole run.
    pub messages_per_sec: f64,
    /// Accept latency of accepted messages (zero when none was accepted).
    pub latency_p50: Duration,
    pub latency_p99: Duration,
    pub latency_max: Duration,
    /// Failures by reply ("550 5.7.1") or error ("connection refused").
    pub failures: BTreeMap<String, usize>,
}

impl fmt::Display for LoadgenReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        writeln!(
            f,
            "{} messages: {} accepted, {} failed, in {:.2} s over {} connections",
            self.messages,
            self.accepted,
            self.failed,
            self.elapsed.as_secs_f64(),
            self.connections
        )?;
        writeln!(f, "rate: {:.1} messages/s accepted", self.messages_per_sec)?;
        write!(
            f,
            "accept latency: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            ms(self.latency_p50),
            ms(self.latency_p99),
            ms(self.latency_max)
        )?;
        if !self.failures.is_empty() {
            write!(f, "\nfailures:")?;
            for (what, n) in &self.failures {
                write!(f, "\n  {n:>8}  {what}")?;
            }
        }
        Ok(())
    }
}

/// Runs the load and returns its report. Fails only for options that make
/// no run possible (an unresolvable target, zero concurrency); every SMTP
/// failure is counted in the report instead.
pub async fn run(opts: LoadgenOptions) -> Result<LoadgenReport, String> {
    if opts.concurrency == 0 {
        return Err("--concurrency must be at least 1".into());
    }
    let host = match opts.target.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => {
            h.trim_start_matches('[').trim_end_matches(']').to_string()
        }
        _ => return Err(format!("--target {:?} is not HOST:PORT", opts.target)),
    };
    let addr = tokio::net::lookup_host(opts.target.as_str())
        .await
        .map_err(|e| format!("cannot resolve {}: {e}", opts.target))?
        .next()
        .ok_or_else(|| format!("{} has no address", opts.target))?;
    for (what, a) in [("--from", &opts.from), ("--to", &opts.to)] {
        if a.bytes()
            .any(|b| b.is_ascii_control() || b == b' ' || b == b'<' || b == b'>')
        {
            return Err(format!("{what} {a:?} is not a plain address"));
        }
    }

    let shared = Arc::new(Shared {
        next: AtomicUsize::new(0),
        accepted: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        connections: AtomicUsize::new(0),
    });
    let plan = Arc::new(Plan::new(&opts, addr, host));
    let start = Instant::now();
    let progress = opts.progress.then(|| {
        let shared = shared.clone();
        let total = opts.messages;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                shared.show(total, start.elapsed());
            }
        })
    });

    let workers: Vec<_> = (0..opts.concurrency.min(opts.messages.max(1)))
        .map(|_| tokio::spawn(worker(plan.clone(), shared.clone())))
        .collect();
    let mut latencies = Vec::with_capacity(opts.messages);
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    for w in workers {
        let stats = w.await.map_err(|e| format!("a load task failed: {e}"))?;
        latencies.extend(stats.latencies);
        for (k, n) in stats.failures {
            *failures.entry(k).or_default() += n;
        }
    }
    let elapsed = start.elapsed();
    if let Some(p) = progress {
        p.abort();
        shared.show(opts.messages, elapsed);
        eprintln!();
    }

    latencies.sort_unstable();
    let accepted = shared.accepted.load(Ordering::Relaxed);
    Ok(LoadgenReport {
        messages: opts.messages,
        accepted,
        failed: shared.failed.load(Ordering::Relaxed),
        connections: shared.connections.load(Ordering::Relaxed),
        elapsed,
        messages_per_sec: accepted as f64 / elapsed.as_secs_f64().max(1e-9),
        latency_p50: percentile(&latencies, 50.0),
        latency_p99: percentile(&latencies, 99.0),
        latency_max: latencies.last().copied().unwrap_or_default(),
        failures,
    })
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Counters all sessions update.
struct Shared {
    /// The next message number to send.
    next: AtomicUsize,
    accepted: AtomicUsize,
    failed: AtomicUsize,
    connections: AtomicUsize,
}

impl Shared {
    fn show(&self, total: usize, elapsed: Duration) {
        let ok = self.accepted.load(Ordering::Relaxed);
        let failed = self.failed.load(Ordering::Relaxed);
        let rate = ok as f64 / elapsed.as_secs_f64().max(1e-9);
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r{:>8}/{total} accepted  {failed} failed  {rate:>9.1} msg/s  {:>6.1} s",
            ok,
            elapsed.as_secs_f64()
        );
        let _ = err.flush();
    }
}

/// Everything a session needs, prepared once.
struct Plan {
    addr: SocketAddr,
    host: String,
    opts: LoadgenOptions,
    tls: Tls,
    timeouts: Timeouts,
    /// Headers shared by every message (From, To, Date, MIME), CRLF-ended.
    headers: Vec<u8>,
    /// The padded body, CRLF-ended lines of 76 characters.
    body: Vec<u8>,
    /// Unique per run: Message-IDs stay unique across runs.
    run_id: String,
    /// Right-hand side of the Message-IDs.
    id_domain: String,
}

impl Plan {
    fn new(opts: &LoadgenOptions, addr: SocketAddr, host: String) -> Plan {
        let date = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc2822)
            .unwrap_or_else(|_| "Thu, 01 Jan 1970 00:00:00 +0000".into());
        let headers = format!(
            "From: <{}>\r\nTo: <{}>\r\nDate: {date}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n",
            opts.from, opts.to
        )
        .into_bytes();
        // Subject and Message-ID add about 90 bytes per message.
        let body = padding(opts.size.saturating_sub(headers.len() + 90 + 2));
        let id_domain = opts
            .from
            .rsplit_once('@')
            .map(|(_, d)| d)
            .filter(|d| !d.is_empty())
            .unwrap_or("loadgen.invalid")
            .to_string();
        Plan {
            addr,
            host,
            opts: opts.clone(),
            tls: Tls::opportunistic(),
            timeouts: Timeouts {
                connect: opts.timeout,
                command: opts.timeout,
                data: opts.timeout * 4,
            },
            headers,
            body,
            run_id: format!("{:016x}", rand::random::<u64>()),
            id_domain,
        }
    }

    /// Writes message number `i` into `out`.
    fn message(&self, i: usize, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&self.headers);
        let _ = write!(
            out,
            "Subject: herald loadgen message {i}\r\nMessage-ID: <loadgen.{}.{i}@{}>\r\n\r\n",
            self.run_id, self.id_domain
        );
        out.extend_from_slice(&self.body);
    }

    async fn connect(&self) -> Result<SmtpClient, ClientError> {
        let o = &self.opts;
        let mut c = match o.tls {
            LoadgenTls::Implicit => {
                SmtpClient::connect_tls(self.addr, None, self.timeouts, &self.tls, &self.host)
                    .await?
            }
            _ => SmtpClient::connect(self.addr, None, self.timeouts).await?,
        };
        c.ehlo(&o.helo).await?;
        if o.tls == LoadgenTls::StartTls {
            c.starttls(&self.tls, &self.host, &o.helo).await?;
        }
        if let Some((user, pass)) = &o.auth {
            c.auth_auto(user, pass.expose()).await?;
        }
        Ok(c)
    }
}

/// About `n` bytes of CRLF-ended 76-character lines (at least one line).
fn padding(n: usize) -> Vec<u8> {
    const LINE: &[u8; 76] =
        b"The quick brown fox jumps over the lazy dog; herald loadgen padding 0123456.";
    let mut body = Vec::with_capacity(n + 78);
    while body.len() + 78 <= n {
        body.extend_from_slice(LINE);
        body.extend_from_slice(b"\r\n");
    }
    let rest = n.saturating_sub(body.len() + 2).min(LINE.len());
    if rest > 0 || body.is_empty() {
        body.extend_from_slice(&LINE[..rest.max(1)]);
        body.extend_from_slice(b"\r\n");
    }
    body
}

#[derive(Default)]
struct WorkerStats {
    latencies: Vec<Duration>,
    failures: BTreeMap<String, usize>,
}

impl WorkerStats {
    fn fail(&mut self, shared: &Shared, what: String) {
        shared.failed.fetch_add(1, Ordering::Relaxed);
        *self.failures.entry(what).or_default() += 1;
    }
}

/// One session: takes message numbers until all are taken.
async fn worker(plan: Arc<Plan>, shared: Arc<Shared>) -> WorkerStats {
    let mut stats = WorkerStats::default();
    let mut conn: Option<SmtpClient> = None;
    let mut msg = Vec::with_capacity(plan.opts.size + 512);
    let mail = MailParams {
        from: &plan.opts.from,
        ..MailParams::default()
    };
    let rcpts = [RcptParams {
        address: &plan.opts.to,
        ..RcptParams::default()
    }];
    loop {
        let i = shared.next.fetch_add(1, Ordering::Relaxed);
        if i >= plan.opts.messages {
            break;
        }
        let mut c = match conn.take() {
            Some(c) => c,
            None => {
                shared.connections.fetch_add(1, Ordering::Relaxed);
                match plan.connect().await {
                    Ok(c) => c,
                    Err(e) => {
                        stats.fail(&shared, failure::kind(&e));
                        continue;
                    }
                }
            }
        };
        plan.message(i, &mut msg);
        let t0 = Instant::now();
        let result = c.send(&mail, &rcpts, &msg).await;
        let latency = t0.elapsed();
        match result {
            Ok(tx) => match verdict(&tx) {
                Ok(()) => {
                    shared.accepted.fetch_add(1, Ordering::Relaxed);
                    stats.latencies.push(latency);
                }
                Err(what) => stats.fail(&shared, what),
            },
            Err(e) => stats.fail(&shared, failure::kind(&e.error)),
        }
        if plan.opts.reuse && c.is_usable() {
            conn = Some(c);
        } else {
            c.quit().await;
        }
    }
    if let Some(c) = conn {
        c.quit().await;
    }
    stats
}

/// `Ok` when the message was accepted, else the failure's key.
fn verdict(tx: &TransactionReplies) -> Result<(), String> {
    let reply = if !tx.mail.is_positive() {
        &tx.mail
    } else if let Some(r) = tx.rcpts.iter().find(|r| !r.is_positive()) {
        r
    } else {
        match &tx.data {
            Some(d) if d.is_positive() => return Ok(()),
            Some(d) => d,
            None => return Err("no reply to DATA".into()),
        }
    };
    Err(match reply.enhanced {
        Some(e) => format!("{} {e}", reply.code),
        None => reply.code.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deliver::fake;

    #[test]
    fn messages_are_valid_and_near_the_size() {
        let opts = LoadgenOptions {
            size: 2048,
            ..LoadgenOptions::default()
        };
        let plan = Plan::new(&opts, "127.0.0.1:25".parse().unwrap(), "localhost".into());
        let mut a = Vec::new();
        let mut b = Vec::new();
        plan.message(1, &mut a);
        plan.message(2, &mut b);
        assert!((1900..2200).contains(&a.len()), "{}", a.len());
        let text = String::from_utf8(a.clone()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        for h in [
            "From: ",
            "To: ",
            "Subject: ",
            "Date: ",
            "Message-ID: <loadgen.",
        ] {
            assert!(head.contains(h), "{h} missing in {head}");
        }
        assert!(body.split("\r\n").all(|l| l.len() <= 76));
        assert!(body.ends_with("\r\n"));
        assert!(!text.replace("\r\n", "").contains(['\r', '\n']));
        let id = |m: &[u8]| {
            String::from_utf8_lossy(m)
                .lines()
                .find(|l| l.starts_with("Message-ID"))
                .unwrap()
                .to_string()
        };
        assert_ne!(id(&a), id(&b));

        // Tiny sizes still give a message with a body line.
        let plan = Plan::new(
            &LoadgenOptions {
                size: 10,
                ..LoadgenOptions::default()
            },
            "127.0.0.1:25".parse().unwrap(),
            "localhost".into(),
        );
        plan.message(0, &mut a);
        assert!(String::from_utf8_lossy(&a).contains("\r\n\r\nT\r\n"));
    }

    #[test]
    fn percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&v, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&[], 99.0), Duration::ZERO);
        assert_eq!(percentile(&v[..1], 99.0), Duration::from_millis(1));
    }

    #[tokio::test]
    async fn runs_with_and_without_reuse() {
        let (addr, rec) = fake::start(fake::Script {
            rcpt: |a| {
                if a.starts_with("bad") {
                    "550 5.1.1 no such user"
                } else {
                    "250 2.1.5 Ok"
                }
            },
            ..fake::Script::default()
        })
        .await;
        let opts = LoadgenOptions {
            target: addr.to_string(),
            messages: 20,
            concurrency: 4,
            size: 1000,
            reuse: true,
            ..LoadgenOptions::default()
        };
        let r = run(opts.clone()).await.unwrap();
        assert_eq!((r.accepted, r.failed), (20, 0));
        assert_eq!(r.connections, 4);
        assert!(r.latency_p50 <= r.latency_p99 && r.latency_p99 <= r.latency_max);
        assert!(r.to_string().contains("20 accepted"), "{r}");

        let r = run(LoadgenOptions {
            reuse: false,
            to: "bad@example.net".into(),
            ..opts
        })
        .await
        .unwrap();
        assert_eq!((r.accepted, r.failed), (0, 20));
        assert_eq!(r.connections, 20);
        assert_eq!(r.failures.get("550 5.1.1"), Some(&20));
        assert!(r.to_string().contains("550 5.1.1"), "{r}");
        assert_eq!(rec.lock().unwrap().connections, 24);
    }

    #[tokio::test]
    async fn starttls_and_auth() {
        let (addr, _rec) = fake::start(fake::Script {
            ehlo: Some("PIPELINING\nSTARTTLS\nAUTH PLAIN LOGIN"),
            tls: Some(fake::tls_acceptor()),
            ..fake::Script::default()
        })
        .await;
        let opts = LoadgenOptions {
            target: addr.to_string(),
            messages: 3,
            concurrency: 1,
            tls: LoadgenTls::StartTls,
            auth: Some(("user".into(), Secret::new("secret"))),
            ..LoadgenOptions::default()
        };
        let r = run(opts.clone()).await.unwrap();
        assert_eq!(r.accepted, 3, "{r}");

        let r = run(LoadgenOptions {
            auth: Some(("user".into(), Secret::new("wrong-pw"))),
            ..opts
        })
        .await
        .unwrap();
        assert_eq!(r.failed, 3);
        assert!(!r.to_string().contains("wrong-pw"));
        assert!(r.to_string().contains("535 5.7.8 during AUTH"), "{r}");
    }

    #[tokio::test]
    async fn unusable_targets() {
        assert!(
            run(LoadgenOptions {
                target: "nonsense".into(),
                ..LoadgenOptions::default()
            })
            .await
            .is_err()
        );
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = free.local_addr().unwrap();
        drop(free);
        let r = run(LoadgenOptions {
            target: addr.to_string(),
            messages: 5,
            concurrency: 2,
            ..LoadgenOptions::default()
        })
        .await
        .unwrap();
        assert_eq!(r.failed, 5);
        assert_eq!(r.failures.get("connection refused"), Some(&5));
    }
}
