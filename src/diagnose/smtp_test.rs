//! `herald smtp-test`: checks, step by step, an SMTP server a tenant wants
//! to send through (their own provider, as a smarthost), and says for each
//! step `ok` or what failed, its likely cause and the fix.
//!
//! Steps: DNS → TCP connect → banner → EHLO → TLS (STARTTLS per RFC 3207,
//! or implicit TLS per RFC 8314, the certificate verified against the
//! system's trust store) → AUTH mechanisms offered (RFC 4954) → AUTH result
//! → MAIL FROM → QUIT. It never sends a message: no RCPT, no DATA.
//!
//! Safety of the tenant's password: it is sent only over TLS whose
//! certificate verified, and never printed, logged or put in the report.
//! Timeouts: one limit (`--timeout`) bounds the connect, the TLS handshake
//! and each reply, so a dead server costs a few multiples of it at most.
//!
//! Wrong TLS mode is detected rather than left as a puzzle: a server that
//! sends no banner in plain mode is probed with a TLS handshake (an
//! implicit-TLS port, 465, waits silently for one), and a failed handshake
//! with `--tls` is followed by a plain probe (a port that greets in
//! plaintext wants STARTTLS).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::Serialize;

use crate::config::Secret;
use crate::deliver::cert::{CertOutcome, RecordingVerifier};
use crate::deliver::client::{
    Capabilities, ClientError, MailParams, SmtpClient, Stage, Timeouts, Tls,
};
use crate::deliver::explain::{Advice, Step, explain_certificate, explain_reply};
use crate::deliver::failure::advice;
use crate::reply::Reply;

/// How the connection is secured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Security {
    /// Plain SMTP; no password is sent.
    Plain,
    /// Plain, then STARTTLS (port 587).
    StartTls,
    /// TLS from the first byte (port 465).
    Tls,
}

impl fmt::Display for Security {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Security::Plain => "plain SMTP",
            Security::StartTls => "STARTTLS",
            Security::Tls => "implicit TLS",
        })
    }
}

/// What to test.
#[derive(Clone, Debug)]
pub struct Options {
    /// `HOST:PORT` (`[v6]:PORT` for an IPv6 address).
    pub server: String,
    pub user: Option<String>,
    /// Needed when `user` is set.
    pub password: Option<Secret>,
    pub security: Security,
    /// Sender for the MAIL FROM step; the step is skipped without it.
    pub from: Option<String>,
    /// Bound on the connect, the TLS handshake and each reply.
    pub timeout: Duration,
    /// The name said in EHLO.
    pub helo: String,
}

/// A step's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Fail,
    /// Not run: not asked for, or not reached after a failure.
    Skip,
}

/// One line of the report.
#[derive(Clone, Debug, Serialize)]
pub struct StepResult {
    pub step: Step,
    pub status: Status,
    /// What was seen, in a sentence.
    pub detail: String,
    /// The server's reply, when the step turned on one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply: Option<Reply>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// The whole diagnosis; serialised as is for `--json`.
#[derive(Clone, Debug, Serialize)]
pub struct SmtpTestReport {
    pub server: String,
    pub security: Security,
    /// Every step passed (skipped ones that were not asked for count as passed).
    pub ok: bool,
    pub steps: Vec<StepResult>,
}

impl SmtpTestReport {
    pub fn failures(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| s.status == Status::Fail)
            .count()
    }
}

/// What a step that never ran says.
const NOT_REACHED: &str = "not reached: an earlier step failed";

impl fmt::Display for SmtpTestReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "herald smtp-test: {} ({})", self.server, self.security)?;
        let indent = " ".repeat(25);
        let mut unreached = Vec::new();
        for s in &self.steps {
            if s.status == Status::Skip && s.detail == NOT_REACHED {
                unreached.push(s.step.name());
                continue;
            }
            let status = match s.status {
                Status::Ok => "ok",
                Status::Fail => "FAIL",
                Status::Skip => "skip",
            };
            writeln!(f, "  {status:<5} {:<16} {}", s.step.name(), s.detail)?;
            if let Some(cause) = &s.cause {
                writeln!(f, "{indent}cause: {cause}")?;
            }
            if let Some(fix) = &s.fix {
                writeln!(f, "{indent}fix:   {fix}")?;
            }
        }
        if !unreached.is_empty() {
            writeln!(f, "  {:<5} {} (not reached)", "skip", unreached.join(", "))?;
        }
        match self.failures() {
            0 => write!(f, "result: every step passed; no message was sent"),
            1 => write!(f, "result: 1 step failed"),
            n => write!(f, "result: {n} steps failed"),
        }
    }
}

/// Splits `HOST:PORT` (or `[v6]:PORT`).
pub fn parse_server(s: &str) -> Result<(String, u16), String> {
    let bad = || format!("--server {s:?}: expected HOST:PORT, e.g. smtp.example.com:587");
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once("]:").ok_or_else(bad)?;
        (h, p)
    } else {
        let (h, p) = s.rsplit_once(':').ok_or_else(bad)?;
        if h.contains(':') {
            // A bare IPv6 address: its colons make the port ambiguous.
            return Err(format!(
                "--server {s:?}: write an IPv6 address in brackets, e.g. [2001:db8::1]:587"
            ));
        }
        (h, p)
    };
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

/// This machine's host name for EHLO, or `localhost` when unknown.
pub fn default_helo() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic()))
        .unwrap_or_else(|| "localhost".to_string())
}

/// Runs the diagnosis. `opts.server` must pass [`parse_server`]; a bad one
/// gives a report whose only step fails.
pub async fn run(opts: &Options) -> SmtpTestReport {
    let mut d = Diagnosis {
        opts,
        host: String::new(),
        port: 0,
        steps: Vec::new(),
    };
    match parse_server(&opts.server) {
        Ok((host, port)) => {
            d.host = host;
            d.port = port;
            d.session().await;
        }
        Err(e) => d.fail(
            Step::Dns,
            e,
            None,
            Advice::new(
                "the server is not written as HOST:PORT",
                "e.g. --server smtp.example.com:587",
            ),
        ),
    }
    let steps = complete(opts.security, d.steps);
    SmtpTestReport {
        server: opts.server.clone(),
        security: opts.security,
        ok: steps.iter().all(|s| s.status != Status::Fail),
        steps,
    }
}

/// The steps in the order a mode runs them, with those that never ran
/// filled in as skipped.
fn complete(security: Security, ran: Vec<StepResult>) -> Vec<StepResult> {
    let order: &[Step] = match security {
        Security::Tls => &[
            Step::Dns,
            Step::Connect,
            Step::Tls,
            Step::Banner,
            Step::Ehlo,
            Step::AuthMechanisms,
            Step::Auth,
            Step::MailFrom,
            Step::Quit,
        ],
        _ => &Step::ALL,
    };
    let mut ran = ran.into_iter().peekable();
    let mut out = Vec::with_capacity(order.len());
    for &step in order {
        match ran.next_if(|s| s.step == step) {
            Some(s) => out.push(s),
            None => out.push(StepResult {
                step,
                status: Status::Skip,
                detail: NOT_REACHED.into(),
                reply: None,
                cause: None,
                fix: None,
            }),
        }
    }
    out
}

struct Diagnosis<'a> {
    opts: &'a Options,
    host: String,
    port: u16,
    steps: Vec<StepResult>,
}

impl Diagnosis<'_> {
    fn push(
        &mut self,
        step: Step,
        status: Status,
        detail: String,
        reply: Option<Reply>,
        advice: Option<Advice>,
    ) {
        let (cause, fix) = match advice {
            Some(a) => (Some(a.cause), Some(a.fix)),
            None => (None, None),
        };
        self.steps.push(StepResult {
            step,
            status,
            detail,
            reply,
            cause,
            fix,
        });
    }

    fn ok(&mut self, step: Step, detail: impl Into<String>) {
        self.push(step, Status::Ok, detail.into(), None, None);
    }

    fn skip(&mut self, step: Step, detail: impl Into<String>) {
        self.push(step, Status::Skip, detail.into(), None, None);
    }

    fn fail(
        &mut self,
        step: Step,
        detail: impl Into<String>,
        reply: Option<Reply>,
        advice: Advice,
    ) {
        self.push(step, Status::Fail, detail.into(), reply, Some(advice));
    }

    /// A refused reply at `step`, explained from the table.
    fn refused(&mut self, step: Step, reply: Reply) {
        let advice = explain_reply(step, &reply);
        self.fail(step, reply.to_string(), Some(reply), advice);
    }

    fn timeouts(&self) -> Timeouts {
        let t = self.opts.timeout;
        Timeouts {
            connect: t,
            command: t,
            data: t,
        }
    }

    fn limit(&self) -> String {
        human(self.opts.timeout)
    }

    async fn session(&mut self) {
        let Some(addrs) = self.resolve().await else {
            return;
        };
        let verifier = RecordingVerifier::from_system();
        let Some(mut client) = self.connect(&addrs, &verifier).await else {
            return;
        };
        self.converse(&mut client, &verifier).await;
        if client.is_usable() {
            client.quit().await;
            self.ok(Step::Quit, "QUIT sent; no message was sent");
        } else {
            self.skip(
                Step::Quit,
                "the connection was already closed; no message was sent",
            );
        }
    }

    /// Step 1: the host's addresses.
    async fn resolve(&mut self) -> Option<Vec<SocketAddr>> {
        let (host, port) = (self.host.clone(), self.port);
        if let Ok(ip) = host.parse::<IpAddr>() {
            self.ok(
                Step::Dns,
                format!("{ip} is an IP address; nothing to look up"),
            );
            return Some(vec![SocketAddr::new(ip, port)]);
        }
        // herald's own resolver (hickory, the system's nameservers), as a
        // smarthost delivery would use: it tells "no such name" (NXDOMAIN,
        // no address) from "no answer", and never blocks a thread.
        let temporary = |detail: String| {
            (
                detail,
                Advice::new(
                    "this machine's DNS resolver did not answer (temporary)",
                    "check the resolver settings (/etc/resolv.conf) and try again",
                ),
            )
        };
        let cfg = crate::config::DnsConfig {
            nameservers: Vec::new(),
            timeout: crate::config::units::Span(self.opts.timeout),
            attempts: 2,
        };
        let result = match crate::dns::Dns::new(&cfg) {
            Err(e) => Err(temporary(e)),
            Ok(dns) => {
                // Attempts × timeout, plus slack: a bound even if the
                // resolver's own timers misbehave.
                let limit = self.opts.timeout * 3;
                match tokio::time::timeout(limit, dns.ips(&host)).await {
                    Err(_) => Err(temporary(format!(
                        "no DNS answer for {host} within {}",
                        human(limit)
                    ))),
                    Ok(Err(e)) => Err(temporary(e.to_string())),
                    Ok(Ok(ips)) if ips.is_empty() => Err((
                        format!("{host} has no address (no such name, or no A/AAAA record)"),
                        Advice::new(
                            "host name does not resolve: check spelling",
                            "compare the host name with the provider's documentation (e.g. smtp.gmail.com, smtp.office365.com)",
                        ),
                    )),
                    Ok(Ok(ips)) => Ok(ips),
                }
            }
        };
        match result {
            Err((detail, advice)) => {
                self.fail(Step::Dns, detail, None, advice);
                None
            }
            Ok(ips) => {
                let mut addrs: Vec<SocketAddr> = Vec::new();
                for ip in ips {
                    let a = SocketAddr::new(ip, port);
                    if !addrs.contains(&a) {
                        addrs.push(a);
                    }
                }
                let list: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
                self.ok(Step::Dns, format!("{host} has {}", list.join(", ")));
                Some(addrs)
            }
        }
    }

    /// Steps 2 and 3 (and the TLS step with `--tls`): the first address
    /// that takes the TCP connection decides.
    async fn connect(
        &mut self,
        addrs: &[SocketAddr],
        verifier: &std::sync::Arc<RecordingVerifier>,
    ) -> Option<SmtpClient> {
        let tls = verifier.tls();
        let mut tcp_failures: Vec<(SocketAddr, ClientError)> = Vec::new();
        for &addr in addrs {
            let result = match self.opts.security {
                Security::Tls => {
                    SmtpClient::connect_tls(addr, None, self.timeouts(), &tls, &self.host).await
                }
                _ => SmtpClient::connect(addr, None, self.timeouts()).await,
            };
            match result {
                Ok(c) => {
                    self.ok(Step::Connect, format!("connected to {addr}"));
                    if self.opts.security == Security::Tls {
                        self.tls_verdict(verifier, c.tls_version());
                    }
                    let greeting = c.greeting().to_string();
                    self.ok(Step::Banner, greeting);
                    return Some(c);
                }
                Err(
                    e @ (ClientError::Refused
                    | ClientError::Connect(_)
                    | ClientError::Timeout(Stage::Connect)),
                ) => {
                    tcp_failures.push((addr, e));
                }
                Err(e) => {
                    self.ok(Step::Connect, format!("connected to {addr}"));
                    self.after_connect_failure(addr, e, verifier).await;
                    return None;
                }
            }
        }
        self.tcp_failed(&tcp_failures);
        None
    }

    fn tcp_failed(&mut self, failures: &[(SocketAddr, ClientError)]) {
        let port = self.port;
        let limit = self.limit();
        let detail = failures
            .iter()
            .map(|(addr, e)| match e {
                ClientError::Timeout(_) => format!("{addr}: no answer within {limit}"),
                ClientError::Refused => format!("{addr}: connection refused"),
                other => format!("{addr}: {other}"),
            })
            .collect::<Vec<_>>()
            .join("; ");
        // The most telling failure decides the advice: a timeout (something
        // drops the packets) over a refusal over anything else.
        let telling = failures.iter().map(|(_, e)| e).min_by_key(|e| match e {
            ClientError::Timeout(_) => 0,
            ClientError::Refused => 1,
            _ => 2,
        });
        let advice = match telling {
            Some(e) => advice(e, port),
            None => advice(&ClientError::NotUsable, port),
        };
        self.fail(Step::Connect, detail, None, advice);
    }

    /// The TCP connection stood, but TLS (with `--tls`) or the banner failed.
    async fn after_connect_failure(
        &mut self,
        addr: SocketAddr,
        e: ClientError,
        verifier: &RecordingVerifier,
    ) {
        let limit = self.limit();
        match e {
            ClientError::Tls(_) | ClientError::Timeout(Stage::TlsHandshake) => {
                let detail = match &e {
                    ClientError::Tls(m) => format!("TLS handshake failed: {m}"),
                    _ => format!("no TLS handshake within {limit}"),
                };
                let advice = match self.probe_plain(addr).await {
                    Some(greeting) => Advice::new(
                        format!(
                            "this port speaks plain SMTP, not TLS (it greets with \"{greeting}\")"
                        ),
                        "use --starttls instead of --tls (implicit TLS is usually port 465)",
                    ),
                    None => advice(&e, self.port),
                };
                self.fail(Step::Tls, detail, None, advice);
            }
            other => {
                if self.opts.security == Security::Tls {
                    self.tls_verdict(verifier, None);
                }
                self.banner_failed(addr, other).await;
            }
        }
    }

    async fn banner_failed(&mut self, addr: SocketAddr, e: ClientError) {
        let limit = self.limit();
        match e {
            ClientError::Rejected { reply, .. } => self.refused(Step::Banner, reply),
            ClientError::Timeout(_) => {
                let advice = if self.opts.security != Security::Tls
                    && self.probe_implicit_tls(addr).await
                {
                    Advice::new(
                        "this looks like an implicit-TLS port: use --tls (the server waits for a TLS handshake before it greets)",
                        "add --tls (or use port 587 with --starttls)",
                    )
                } else {
                    Advice::new(
                        "the server took the connection but sent no greeting: it is overloaded, or a firewall or proxy holds the connection",
                        "try again later; check the port number with the provider",
                    )
                };
                self.fail(
                    Step::Banner,
                    format!("no banner within {limit}"),
                    None,
                    advice,
                );
            }
            ClientError::Closed(_) | ClientError::Io { .. } => {
                let advice = advice(&e, self.port);
                self.fail(
                    Step::Banner,
                    format!("the connection was closed without a greeting ({e})"),
                    None,
                    advice,
                )
            }
            ClientError::Protocol { what, .. } => {
                let advice = advice(&e, self.port);
                self.fail(
                    Step::Banner,
                    format!("the server's first words are not SMTP ({what})"),
                    None,
                    advice,
                )
            }
            other => {
                let advice = advice(&other, self.port);
                self.fail(Step::Banner, other.to_string(), None, advice)
            }
        }
    }

    /// Does the port complete a TLS handshake? (An implicit-TLS port waits
    /// silently for one.)
    async fn probe_implicit_tls(&self, addr: SocketAddr) -> bool {
        let result = SmtpClient::connect_tls(
            addr,
            None,
            self.timeouts(),
            &Tls::opportunistic(),
            &self.host,
        )
        .await;
        !matches!(
            result,
            Err(ClientError::Tls(_)
                | ClientError::Timeout(Stage::TlsHandshake | Stage::Connect)
                | ClientError::Refused
                | ClientError::Connect(_))
        )
    }

    /// Does the port greet in plaintext? Returns the greeting.
    async fn probe_plain(&self, addr: SocketAddr) -> Option<String> {
        match SmtpClient::connect(addr, None, self.timeouts()).await {
            Ok(c) => Some(c.greeting().to_string()),
            Err(ClientError::Rejected { reply, .. }) => Some(reply.to_string()),
            Err(_) => None,
        }
    }

    /// The TLS step from what the certificate check recorded.
    fn tls_verdict(&mut self, verifier: &RecordingVerifier, version: Option<&str>) -> bool {
        let version = version.unwrap_or("TLS");
        let host = self.host.clone();
        match verifier.outcome() {
            Some(CertOutcome::Verified) => {
                self.ok(
                    Step::Tls,
                    format!("{version}; certificate verified for {host}"),
                );
                true
            }
            Some(CertOutcome::Failed { error, self_signed }) => {
                let advice = explain_certificate(&error, &host, self_signed);
                self.fail(
                    Step::Tls,
                    format!("{version}; the certificate does not verify"),
                    None,
                    advice,
                );
                false
            }
            Some(CertOutcome::Error(e)) => {
                self.fail(
                    Step::Tls,
                    format!("{version}; certificate check failed: {e}"),
                    None,
                    Advice::new(
                        "the server's certificate could not be checked",
                        "ask the provider to fix its certificate",
                    ),
                );
                false
            }
            Some(CertOutcome::NoTrustStore) => {
                self.fail(
                    Step::Tls,
                    format!("{version}; the certificate could not be checked"),
                    None,
                    Advice::new(
                        "this machine has no trusted CA certificates to check the server's certificate against",
                        "install the system's CA certificates (Debian: apt-get install ca-certificates) or point SSL_CERT_FILE at a PEM bundle",
                    ),
                );
                false
            }
            None => {
                self.fail(
                    Step::Tls,
                    format!("{version}; no certificate was seen"),
                    None,
                    Advice::new(
                        "the handshake ended without a certificate check",
                        "try again",
                    ),
                );
                false
            }
        }
    }

    /// Steps 4 to 8 on a greeted connection.
    async fn converse(&mut self, c: &mut SmtpClient, verifier: &std::sync::Arc<RecordingVerifier>) {
        let helo = self.opts.helo.clone();
        // 4. EHLO
        match c.ehlo(&helo).await {
            Ok(caps) => {
                let detail = if caps.esmtp {
                    format!("{} offers {}", caps.hostname, extensions(caps).join(", "))
                } else {
                    format!(
                        "{} answered HELO only (no ESMTP: no STARTTLS, no AUTH)",
                        caps.hostname
                    )
                };
                self.ok(Step::Ehlo, detail);
            }
            Err(e) => {
                self.client_failed(Step::Ehlo, e);
                return;
            }
        }

        // 5. TLS
        let mut trusted = false;
        match self.opts.security {
            Security::Tls => trusted = matches!(verifier.outcome(), Some(CertOutcome::Verified)),
            Security::Plain => {
                let detail = if c.capabilities().starttls {
                    "not asked for (no --starttls or --tls); the server offers STARTTLS: add --starttls"
                } else {
                    "not asked for (no --starttls or --tls)"
                };
                self.skip(Step::Tls, detail);
            }
            Security::StartTls => {
                if !c.capabilities().starttls {
                    let cause = if c.capabilities().esmtp {
                        "the server does not offer STARTTLS on this port"
                    } else {
                        "the server does not speak ESMTP, so it cannot offer STARTTLS"
                    };
                    self.fail(
                        Step::Tls,
                        "STARTTLS not offered",
                        None,
                        Advice::new(cause, "use --tls on port 465, or ask the provider which port offers STARTTLS (usually 587)"),
                    );
                    return;
                }
                let host = self.host.clone();
                match c.starttls(&verifier.tls(), &host, &helo).await {
                    Ok(()) => trusted = self.tls_verdict(verifier, c.tls_version()),
                    Err(ClientError::Rejected {
                        stage: Stage::StartTls,
                        reply,
                    }) => {
                        self.refused(Step::Tls, reply);
                        return;
                    }
                    Err(e @ (ClientError::Tls(_) | ClientError::Timeout(Stage::TlsHandshake))) => {
                        let limit = self.limit();
                        let detail = match &e {
                            ClientError::Tls(m) => format!("TLS handshake failed: {m}"),
                            _ => format!("no TLS handshake within {limit}"),
                        };
                        self.fail(Step::Tls, detail, None, advice(&e, self.port));
                        return;
                    }
                    Err(e) => {
                        // TLS came up, EHLO after it failed.
                        self.tls_verdict(verifier, c.tls_version());
                        self.client_failed(Step::Ehlo, e);
                        return;
                    }
                }
            }
        }

        // 6. AUTH mechanisms (after TLS: RFC 3207 §4.2, what came before is forgotten)
        let user = self.opts.user.clone();
        let caps = c.capabilities().clone();
        let usable = caps.offers_auth("PLAIN") || caps.offers_auth("LOGIN");
        if caps.auth.is_empty() {
            if user.is_some() {
                let advice = if self.opts.security == Security::Plain && caps.starttls {
                    Advice::new("the server offers no AUTH before TLS", "add --starttls")
                } else {
                    Advice::new(
                        "the server offers no AUTH on this port",
                        "use the provider's submission port: 587 with --starttls or 465 with --tls (port 25 is for server-to-server mail and usually has no AUTH)",
                    )
                };
                self.fail(Step::AuthMechanisms, "none offered", None, advice);
            } else {
                self.ok(
                    Step::AuthMechanisms,
                    "none offered (none needed without --user)",
                );
            }
        } else if !usable && user.is_some() {
            self.fail(
                Step::AuthMechanisms,
                format!("{} offered", caps.auth.join(", ")),
                None,
                Advice::new(
                    "the server offers no password login herald can use (PLAIN or LOGIN)",
                    "ask the provider to allow password logins (PLAIN or LOGIN) for SMTP; accounts limited to OAuth cannot be used with a password",
                ),
            );
        } else {
            self.ok(Step::AuthMechanisms, caps.auth.join(", "));
        }

        // 7. AUTH
        let mut logged_in = false;
        match (&user, &self.opts.password) {
            (None, _) => self.skip(Step::Auth, "no --user given"),
            (Some(_), None) => self.skip(Step::Auth, "no password given"),
            (Some(_), Some(_)) if caps.auth.is_empty() || !usable => {
                self.skip(Step::Auth, "not tried: no usable AUTH mechanism")
            }
            (Some(_), Some(_)) if self.opts.security == Security::Plain => self.fail(
                Step::Auth,
                "not tried: herald sends no password over an unencrypted connection",
                None,
                Advice::new(
                    "the connection is not encrypted",
                    "use --starttls (port 587) or --tls (port 465)",
                ),
            ),
            (Some(_), Some(_)) if !trusted => self.skip(
                Step::Auth,
                "not tried: the certificate did not verify, so the password was not sent",
            ),
            (Some(u), Some(p)) => match c.auth_auto(u, p.expose()).await {
                Ok(()) => {
                    logged_in = true;
                    self.ok(Step::Auth, format!("logged in as {u}"));
                }
                Err(e) => self.client_failed(Step::Auth, e),
            },
        }

        // 8. MAIL FROM
        match &self.opts.from {
            None => self.skip(Step::MailFrom, "no --from given"),
            Some(_) if user.is_some() && !logged_in => {
                self.skip(Step::MailFrom, "not tried: not logged in")
            }
            Some(_) if !c.is_usable() => {}
            Some(from) => {
                let mail = MailParams {
                    from,
                    ..MailParams::default()
                };
                // No recipients: the client sends MAIL FROM alone, and
                // QUIT ends the transaction without a message.
                match c.send(&mail, &[], b"").await {
                    Ok(tx) if tx.mail.is_positive() => {
                        self.ok(Step::MailFrom, format!("<{from}> accepted: {}", tx.mail))
                    }
                    Ok(tx) => self.refused(Step::MailFrom, tx.mail),
                    Err(e) => self.client_failed(Step::MailFrom, e.error),
                }
            }
        }
    }

    /// A client error at `step`: a refusal is explained from the table,
    /// anything else is a broken connection.
    fn client_failed(&mut self, step: Step, e: ClientError) {
        let limit = self.limit();
        let advice = advice(&e, self.port);
        match e {
            ClientError::Rejected { reply, .. } => self.refused(step, reply),
            ClientError::Timeout(_) => {
                self.fail(step, format!("no reply within {limit}"), None, advice)
            }
            ClientError::InvalidArgument(what) => {
                self.fail(step, format!("{what} contains a line break"), None, advice)
            }
            other => self.fail(step, other.to_string(), None, advice),
        }
    }
}

/// The extensions an EHLO reply announced, as the server wrote them.
fn extensions(caps: &Capabilities) -> Vec<String> {
    let size = if caps.size > 0 {
        format!("SIZE {}", caps.size)
    } else {
        "SIZE".into()
    };
    let auth = format!("AUTH {}", caps.auth.join(" "));
    let out: Vec<String> = [
        (caps.pipelining, "PIPELINING"),
        (caps.size_ext, size.as_str()),
        (caps.starttls, "STARTTLS"),
        (!caps.auth.is_empty(), auth.as_str()),
        (caps.eightbitmime, "8BITMIME"),
        (caps.smtputf8, "SMTPUTF8"),
        (caps.dsn, "DSN"),
        (caps.enhanced_status_codes, "ENHANCEDSTATUSCODES"),
        (caps.chunking, "CHUNKING"),
    ]
    .into_iter()
    .filter(|(on, _)| *on)
    .map(|(_, name)| name.to_string())
    .collect();
    if out.is_empty() {
        vec!["no extensions".into()]
    } else {
        out
    }
}

/// `1 s`, `1.5 s`, `250 ms`.
fn human(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_addresses() {
        assert_eq!(
            parse_server("smtp.test:587").unwrap(),
            ("smtp.test".into(), 587)
        );
        assert_eq!(parse_server("[::1]:25").unwrap(), ("::1".into(), 25));
        assert_eq!(
            parse_server("127.0.0.1:465").unwrap(),
            ("127.0.0.1".into(), 465)
        );
        for bad in [
            "smtp.test",
            "smtp.test:",
            ":25",
            "smtp.test:0",
            "smtp.test:99999",
            "::1:25",
            "[::1]25",
        ] {
            assert!(parse_server(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn missing_steps_are_filled_in_order() {
        let ran = vec![StepResult {
            step: Step::Dns,
            status: Status::Fail,
            detail: "x".into(),
            reply: None,
            cause: None,
            fix: None,
        }];
        let steps = complete(Security::Tls, ran);
        let names: Vec<&str> = steps.iter().map(|s| s.step.name()).collect();
        assert_eq!(
            names,
            [
                "dns",
                "connect",
                "tls",
                "banner",
                "ehlo",
                "auth-mechanisms",
                "auth",
                "mail-from",
                "quit"
            ]
        );
        assert!(steps[1..].iter().all(|s| s.status == Status::Skip));
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human(Duration::from_secs(10)), "10 s");
        assert_eq!(human(Duration::from_millis(1500)), "1.5 s");
        assert_eq!(human(Duration::from_millis(250)), "250 ms");
    }

    #[test]
    fn extensions_are_listed() {
        let caps = Capabilities::parse_ehlo(
            "smtp.test\nPIPELINING\nSIZE 35882577\nSTARTTLS\nAUTH LOGIN PLAIN\n8BITMIME",
        );
        assert_eq!(
            extensions(&caps),
            [
                "PIPELINING",
                "SIZE 35882577",
                "STARTTLS",
                "AUTH LOGIN PLAIN",
                "8BITMIME"
            ]
        );
    }
}

/// `herald smtp-test` on the command line.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// HOST:PORT of the server, e.g. smtp.gmail.com:587 ([v6]:PORT for IPv6).
    #[arg(long)]
    pub server: String,
    /// Log in as this user. The password is never a command-line argument:
    /// it is prompted for (echo off), or read with --password-stdin.
    #[arg(long)]
    pub user: Option<String>,
    /// Read the password from the first line of standard input.
    #[arg(long, requires = "user")]
    pub password_stdin: bool,
    /// Upgrade with STARTTLS (port 587).
    #[arg(long, conflicts_with = "tls")]
    pub starttls: bool,
    /// Implicit TLS from the first byte (port 465).
    #[arg(long)]
    pub tls: bool,
    /// Try MAIL FROM with this sender (no message is sent).
    #[arg(long)]
    pub from: Option<String>,
    /// Bound on the connect, the TLS handshake and each reply ("10s", "500ms").
    #[arg(long, default_value = "10s", value_parser = parse_timeout)]
    pub timeout: Duration,
    /// Print the steps as JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = crate::config::units::Span::parse(s)?.0;
    if d.is_zero() {
        return Err("the timeout must be more than 0".into());
    }
    Ok(d)
}

/// Runs `herald smtp-test`: exit 0 when every step passed, 1 when one
/// failed, 2 when the command line cannot be used.
pub fn cli(args: Args, rt: &tokio::runtime::Runtime) -> std::process::ExitCode {
    use std::process::ExitCode;
    if let Err(e) = parse_server(&args.server) {
        eprintln!("herald smtp-test: {e}");
        return ExitCode::from(2);
    }
    let password = match &args.user {
        None => None,
        Some(user) => {
            match super::password::read_password(
                args.password_stdin,
                &format!("Password for {user}: "),
            ) {
                Ok(p) => Some(p),
                Err(e) => {
                    eprintln!("herald smtp-test: {e}");
                    return ExitCode::from(2);
                }
            }
        }
    };
    let opts = Options {
        server: args.server,
        user: args.user,
        password,
        security: if args.tls {
            Security::Tls
        } else if args.starttls {
            Security::StartTls
        } else {
            Security::Plain
        },
        from: args.from,
        timeout: args.timeout,
        helo: default_helo(),
    };
    let report = rt.block_on(run(&opts));
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("herald smtp-test: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        println!("{report}");
    }
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
