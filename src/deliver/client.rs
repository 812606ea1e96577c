//! An async SMTP client: what herald speaks to recipients' MX hosts (and what
//! `herald loadgen` speaks to any SMTP server).
//!
//! It connects (optionally from a chosen source address, with `TCP_NODELAY`
//! set), reads the greeting, says EHLO (HELO when EHLO gets a 5xx), upgrades
//! with STARTTLS (RFC 3207) or starts in TLS (RFC 8314), authenticates with
//! PLAIN or LOGIN (RFC 4954), and runs mail transactions (RFC 5321 §3.3):
//! MAIL FROM with SIZE (RFC 1870), BODY=8BITMIME (RFC 6152), SMTPUTF8
//! (RFC 6531), RET/ENVID (RFC 3461); RCPT TO with NOTIFY/ORCPT; the envelope
//! and DATA pipelined in one write when the server offers PIPELINING
//! (RFC 2920); the body dot-stuffed on the fly (RFC 5321 §4.5.2).
//!
//! What it trusts: nothing the server sends. Replies go through smtp-proto's
//! incremental parser, which caps them at 4 KiB; every read and write has a
//! timeout; reply text is kept as data, never sliced by byte offsets that
//! could fall inside a UTF-8 sequence. What it sends is checked too: an
//! address or parameter with CR, LF or NUL is refused before it reaches the
//! wire, and the body never leaves with a bare CR or LF.
//!
//! Errors are typed ([`ClientError`]); turning them into the 4xx replies that
//! the queue records is the dispatcher's job.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ProtocolVersion};
use smtp_proto::response::parser::ResponseReceiver;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::envelope::{Notify, Ret};
use crate::reply::{Enhanced, Reply};

/// Size of the read buffer. Replies are small; a pipelined group of 100
/// RCPT replies is about 3 KiB.
const READ_BUF: usize = 8 * 1024;
/// Body pieces at least this large are written straight from the message
/// instead of being copied into the write buffer first.
const DIRECT_WRITE: usize = 16 * 1024;
/// The write buffer is flushed when it grows past this.
const WRITE_BUF: usize = 64 * 1024;
/// How long QUIT waits for its reply: the session is over either way.
const QUIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Per-step time limits (RFC 5321 §4.5.3.2 gives the classic values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect, and the TLS handshake.
    pub connect: Duration,
    /// Each command's reply, the greeting included.
    pub command: Duration,
    /// Sending the message body and reading the reply after the final dot.
    pub data: Duration,
}

impl Timeouts {
    /// The `[delivery]` connect, command and data timeouts.
    pub fn from_config(d: &crate::config::DeliveryConfig) -> Timeouts {
        Timeouts {
            connect: d.connect_timeout.as_duration(),
            command: d.command_timeout.as_duration(),
            data: d.data_timeout.as_duration(),
        }
    }
}

/// The step of a session that failed, for error messages ("timed out
/// waiting for the greeting").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Connect,
    Greeting,
    Ehlo,
    Helo,
    StartTls,
    TlsHandshake,
    Auth,
    Rset,
    Mail,
    Rcpt,
    Data,
    Body,
    /// Waiting for the reply after the final dot.
    DataEnd,
    Quit,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Connect => "while connecting",
            Stage::Greeting => "waiting for the greeting",
            Stage::Ehlo => "after EHLO",
            Stage::Helo => "after HELO",
            Stage::StartTls => "after STARTTLS",
            Stage::TlsHandshake => "during the TLS handshake",
            Stage::Auth => "during AUTH",
            Stage::Rset => "after RSET",
            Stage::Mail => "after MAIL FROM",
            Stage::Rcpt => "after RCPT TO",
            Stage::Data => "after DATA",
            Stage::Body => "while sending the message",
            Stage::DataEnd => "waiting for the reply to the message",
            Stage::Quit => "after QUIT",
        })
    }
}

/// Why a TLS handshake failed: the error's text, and what was wrong with
/// the server's certificate when that was it (for TLS-RPT's result types).
#[derive(Clone, Debug)]
pub struct TlsFailure {
    pub text: String,
    pub cert: Option<CertProblem>,
}

/// What a certificate check refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertProblem {
    /// Valid, but not for the host name asked for.
    HostMismatch,
    /// Outside its validity period.
    Expired,
    /// Its chain leads to no trusted root (self-signed, unknown issuer).
    NotTrusted,
    /// No TLSA record of the host names it (DANE).
    NoTlsaMatch,
    /// Anything else the verifier refused.
    Other,
}

impl CertProblem {
    pub fn of(e: &rustls::CertificateError) -> CertProblem {
        use rustls::CertificateError as C;
        match e {
            C::NotValidForName | C::NotValidForNameContext { .. } => CertProblem::HostMismatch,
            C::Expired
            | C::ExpiredContext { .. }
            | C::NotValidYet
            | C::NotValidYetContext { .. } => CertProblem::Expired,
            C::UnknownIssuer | C::BadSignature => CertProblem::NotTrusted,
            C::Other(o) if o.0.downcast_ref::<super::dane::NoMatch>().is_some() => {
                CertProblem::NoTlsaMatch
            }
            _ => CertProblem::Other,
        }
    }
}

impl fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl From<&str> for TlsFailure {
    fn from(text: &str) -> TlsFailure {
        TlsFailure {
            text: text.to_string(),
            cert: None,
        }
    }
}

impl TlsFailure {
    /// Reads what rustls (inside tokio-rustls's io::Error) refused.
    fn from_io(e: &io::Error) -> TlsFailure {
        use rustls::CertificateError as C;
        let cert = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .and_then(|r| match r {
                rustls::Error::InvalidCertificate(c) => Some(CertProblem::of(c)),
                _ => None,
            });
        // rustls shows a verifier's own error with Debug; its Display is
        // the sentence to quote.
        let text = match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(rustls::Error::InvalidCertificate(C::Other(o))) => {
                format!("invalid peer certificate: {}", o.0)
            }
            _ => e.to_string(),
        };
        TlsFailure { text, cert }
    }
}

/// Why a session step failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connection refused")]
    Refused,
    #[error("cannot connect: {0}")]
    Connect(io::Error),
    #[error("timed out {0}")]
    Timeout(Stage),
    #[error("connection closed by the server {0}")]
    Closed(Stage),
    #[error("connection lost {stage}: {source}")]
    Io { stage: Stage, source: io::Error },
    #[error("TLS handshake failed: {0}")]
    Tls(TlsFailure),
    #[error("protocol error {stage}: {what}")]
    Protocol { stage: Stage, what: &'static str },
    /// The server answered, but not with the reply the step needs.
    #[error("refused {stage}: {reply}")]
    Rejected { stage: Stage, reply: Reply },
    #[error("the server does not offer STARTTLS")]
    NoStartTls,
    #[error("the server offers no AUTH mechanism herald supports (PLAIN, LOGIN)")]
    NoAuthMechanism,
    /// A value herald was about to send contains CR, LF or NUL.
    #[error("{0} contains a line break or NUL and cannot be sent")]
    InvalidArgument(&'static str),
    #[error("the connection is no longer usable")]
    NotUsable,
}

/// Where a transaction stood when it failed: tells the caller whether the
/// server may have taken the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxStage {
    /// RSET, MAIL, RCPT or DATA: nothing of the message was handed over, so
    /// it may be retried at once on a fresh connection.
    Envelope,
    /// Sending the body: the message is incomplete on the server's side.
    Body,
    /// After the final dot: the server may have queued the message
    /// (RFC 1047's duplicate problem); only a later retry is safe.
    FinalReply,
}

/// A transaction that ended without a complete set of replies. The
/// connection is unusable afterwards.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct TransactionError {
    pub stage: TxStage,
    pub error: ClientError,
}

/// What the server announced in its EHLO reply (RFC 5321 §4.1.1.1).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// The server answered EHLO (false after a HELO fallback).
    pub esmtp: bool,
    /// The first line of the EHLO reply, usually the server's name.
    pub hostname: String,
    pub pipelining: bool,
    pub starttls: bool,
    /// SIZE was announced; `size` is its limit (0: no fixed limit).
    pub size_ext: bool,
    pub size: u64,
    pub eightbitmime: bool,
    pub smtputf8: bool,
    pub dsn: bool,
    pub enhanced_status_codes: bool,
    pub chunking: bool,
    /// RFC 8689: the server keeps a REQUIRETLS message's requirement.
    pub requiretls: bool,
    /// AUTH mechanisms, upper-cased, in the server's order.
    pub auth: Vec<String>,
}

impl Capabilities {
    /// Reads the EHLO reply text (lines joined by '\n', codes removed).
    ///
    /// Written here rather than with smtp-proto's `EhloResponse::parse`
    /// because that parser fails the whole reply on keywords it does not
    /// expect; a server's odd extension must not stop delivery to it.
    pub fn parse_ehlo(text: &str) -> Capabilities {
        let mut caps = Capabilities {
            esmtp: true,
            ..Capabilities::default()
        };
        let mut lines = text.split('\n');
        caps.hostname = lines
            .next()
            .and_then(|l| l.split_ascii_whitespace().next())
            .unwrap_or("")
            .to_string();
        for line in lines {
            // "AUTH=LOGIN PLAIN" is the pre-RFC 4954 form some servers still send.
            let mut words = line.split(|c: char| c.is_ascii_whitespace() || c == '=');
            let Some(keyword) = words.next() else {
                continue;
            };
            let keyword = keyword.to_ascii_uppercase();
            match keyword.as_str() {
                "PIPELINING" => caps.pipelining = true,
                "STARTTLS" => caps.starttls = true,
                "8BITMIME" => caps.eightbitmime = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "DSN" => caps.dsn = true,
                "ENHANCEDSTATUSCODES" => caps.enhanced_status_codes = true,
                "CHUNKING" => caps.chunking = true,
                "REQUIRETLS" => caps.requiretls = true,
                "SIZE" => {
                    caps.size_ext = true;
                    caps.size = words
                        .find(|w| !w.is_empty())
                        .and_then(|w| w.parse().ok())
                        .unwrap_or(0);
                }
                "AUTH" => {
                    for m in words.filter(|w| !w.is_empty()) {
                        let m = m.to_ascii_uppercase();
                        if !caps.auth.contains(&m) {
                            caps.auth.push(m);
                        }
                    }
                }
                _ => {}
            }
        }
        caps
    }

    /// Whether AUTH lists `mechanism` (upper case, e.g. `"PLAIN"`).
    pub fn offers_auth(&self, mechanism: &str) -> bool {
        self.auth.iter().any(|m| m == mechanism)
    }
}

/// SASL mechanisms the client can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMechanism {
    /// RFC 4616, sent as an initial response.
    Plain,
    /// The de-facto LOGIN mechanism (draft-murchison-sasl-login).
    Login,
}

/// The MAIL FROM part of a transaction.
#[derive(Clone, Copy, Debug, Default)]
pub struct MailParams<'a> {
    /// Reverse path without angle brackets; empty for the null sender.
    pub from: &'a str,
    /// Ask for BODY=8BITMIME when the server offers it.
    pub body_8bit: bool,
    /// Ask for SMTPUTF8 when the server offers it.
    pub smtputf8: bool,
    /// DSN RET, sent when the server offers DSN.
    pub ret: Option<Ret>,
    /// DSN ENVID (xtext-decoded), sent when the server offers DSN.
    pub env_id: Option<&'a str>,
    /// REQUIRETLS (RFC 8689); the caller checked the server offers it.
    pub require_tls: bool,
}

/// One RCPT TO.
#[derive(Clone, Copy, Debug, Default)]
pub struct RcptParams<'a> {
    pub address: &'a str,
    /// DSN NOTIFY, sent when the server offers DSN and some flag is set.
    pub notify: Notify,
    /// DSN ORCPT, `rfc822;addr` or just `addr` (xtext-decoded).
    pub orcpt: Option<&'a str>,
}

/// The replies of one transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransactionReplies {
    /// The reply to MAIL FROM. When it is not positive it answers for every
    /// recipient and `rcpts` may be empty.
    pub mail: Reply,
    /// One reply per recipient, in order, when MAIL FROM was accepted.
    pub rcpts: Vec<Reply>,
    /// The reply that decided the message for the accepted recipients: a
    /// refusal of DATA, or the reply after the final dot. `None` when no
    /// recipient was accepted.
    pub data: Option<Reply>,
}

impl TransactionReplies {
    /// Recipients accepted by RCPT TO.
    pub fn accepted(&self) -> usize {
        self.rcpts.iter().filter(|r| r.is_positive()).count()
    }
}

/// TLS settings shared by every connection: one rustls `ClientConfig`, so
/// session tickets are reused across connections to the same host.
#[derive(Clone)]
pub struct Tls {
    connector: TlsConnector,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Tls")
    }
}

impl Tls {
    /// Accepts any certificate, as opportunistic TLS does (RFC 7435 §1.3:
    /// encryption without authentication beats plaintext, and most MX
    /// certificates would fail a name check anyway). Handshake signatures are
    /// still verified, so the server must hold the key of what it shows.
    pub fn opportunistic() -> Tls {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        Tls::with_verifier(
            provider.clone(),
            Arc::new(crate::net::AcceptAnyCert(provider)),
        )
    }

    /// Verifies the server with any rustls verifier (DANE, MTA-STS, a
    /// smarthost's CA).
    pub fn with_verifier(
        provider: Arc<CryptoProvider>,
        verifier: Arc<dyn ServerCertVerifier>,
    ) -> Tls {
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            // The aws-lc-rs provider supports TLS 1.2 and 1.3; this cannot fail.
            .unwrap_or_else(|e| unreachable!("aws-lc-rs lacks default TLS versions: {e}"))
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Tls {
            connector: TlsConnector::from(Arc::new(config)),
        }
    }

    /// Verifies the server's certificate and name against the CA
    /// certificates in a PEM file (for a smarthost with a private CA).
    pub fn verify_with_ca_file(path: &Path) -> Result<Tls, String> {
        let file = std::fs::File::open(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut io::BufReader::new(file)) {
            let cert = cert.map_err(|e| format!("{}: bad PEM: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("{}: bad CA certificate: {e}", path.display()))?;
        }
        if roots.is_empty() {
            return Err(format!("{} holds no certificate", path.display()));
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Tls::with_verifier(provider, verifier))
    }
}

/// The name to send in SNI and check a certificate against: the host name,
/// or the address when the name is not a valid DNS name.
fn server_name(host: &str, ip: IpAddr) -> ServerName<'static> {
    ServerName::try_from(host.trim_end_matches('.').to_string())
        .unwrap_or_else(|_| ServerName::IpAddress(ip.into()))
}

/// The socket, plain or wrapped in TLS.
type Stream = crate::net::Stream<TlsStream<TcpStream>>;

/// One SMTP session with a server.
pub struct SmtpClient {
    stream: Stream,
    peer: SocketAddr,
    timeouts: Timeouts,
    greeting: Reply,
    caps: Capabilities,
    tls_version: Option<&'static str>,
    rbuf: Box<[u8]>,
    rpos: usize,
    rlen: usize,
    receiver: ResponseReceiver,
    /// Commands (and small body pieces) are assembled here, then written at once.
    wbuf: Vec<u8>,
    /// The last transaction ended without a final reply to the data, so the
    /// server still holds an envelope: send RSET before the next MAIL.
    need_rset: bool,
    /// A read or write failed, or the server said 421: nothing more can be sent.
    broken: bool,
}

impl fmt::Debug for SmtpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpClient")
            .field("peer", &self.peer)
            .field("tls", &self.tls_version)
            .field("broken", &self.broken)
            .finish()
    }
}

impl SmtpClient {
    /// Connects over plain TCP and reads the greeting. A greeting that is
    /// not 220 is [`ClientError::Rejected`] with [`Stage::Greeting`].
    pub async fn connect(
        addr: SocketAddr,
        source: Option<IpAddr>,
        timeouts: Timeouts,
    ) -> Result<SmtpClient, ClientError> {
        let tcp = tcp_connect(addr, source, timeouts.connect).await?;
        SmtpClient::start(Stream::Plain(tcp), addr, timeouts, None).await
    }

    /// Connects and starts TLS at once (implicit TLS, RFC 8314 §3.3, port
    /// 465), then reads the greeting.
    pub async fn connect_tls(
        addr: SocketAddr,
        source: Option<IpAddr>,
        timeouts: Timeouts,
        tls: &Tls,
        host: &str,
    ) -> Result<SmtpClient, ClientError> {
        let tcp = tcp_connect(addr, source, timeouts.connect).await?;
        let (stream, version) = handshake(tcp, tls, host, addr.ip(), timeouts.connect).await?;
        SmtpClient::start(Stream::Tls(stream), addr, timeouts, version).await
    }

    async fn start(
        stream: Stream,
        peer: SocketAddr,
        timeouts: Timeouts,
        tls_version: Option<&'static str>,
    ) -> Result<SmtpClient, ClientError> {
        let mut c = SmtpClient {
            stream,
            peer,
            timeouts,
            greeting: Reply::from_wire(220, ""),
            caps: Capabilities::default(),
            tls_version,
            rbuf: vec![0u8; READ_BUF].into_boxed_slice(),
            rpos: 0,
            rlen: 0,
            receiver: ResponseReceiver::default(),
            wbuf: Vec::with_capacity(1024),
            need_rset: false,
            broken: false,
        };
        let deadline = Instant::now() + timeouts.command;
        let greeting = c.read_reply(Stage::Greeting, deadline).await?;
        if greeting.code != 220 {
            c.broken = true;
            return Err(ClientError::Rejected {
                stage: Stage::Greeting,
                reply: greeting,
            });
        }
        c.greeting = greeting;
        Ok(c)
    }

    /// The server's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The 220 greeting.
    pub fn greeting(&self) -> &Reply {
        &self.greeting
    }

    /// What the last EHLO announced.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// `"TLSv1.2"` or `"TLSv1.3"` once TLS is up.
    pub fn tls_version(&self) -> Option<&'static str> {
        self.tls_version
    }

    /// The TLS cipher suite by its IANA name, once STARTTLS succeeded.
    pub fn tls_cipher(&self) -> Option<String> {
        match &self.stream {
            Stream::Tls(s) => s
                .get_ref()
                .1
                .negotiated_cipher_suite()
                .map(|c| crate::tls::cipher_name(c.suite())),
            _ => None,
        }
    }

    /// False once a read or write failed or the server closed the session;
    /// the connection must then be dropped.
    pub fn is_usable(&self) -> bool {
        !self.broken
    }

    /// Says EHLO, or HELO when EHLO is refused with a 5xx (RFC 5321
    /// §4.1.4: servers that predate ESMTP answer 500/502).
    pub async fn ehlo(&mut self, name: &str) -> Result<&Capabilities, ClientError> {
        check_line("the EHLO name", name)?;
        self.wbuf.clear();
        self.push_cmd(&[b"EHLO ", name.as_bytes()]);
        let reply = self.command(Stage::Ehlo).await?;
        if reply.code == 250 {
            self.caps = Capabilities::parse_ehlo(&reply.text);
            return Ok(&self.caps);
        }
        if !reply.is_permanent() {
            return Err(self.rejected(Stage::Ehlo, reply));
        }
        self.wbuf.clear();
        self.push_cmd(&[b"HELO ", name.as_bytes()]);
        let reply = self.command(Stage::Helo).await?;
        if reply.code != 250 {
            return Err(self.rejected(Stage::Helo, reply));
        }
        self.caps = Capabilities {
            hostname: reply
                .text
                .split_ascii_whitespace()
                .next()
                .unwrap_or("")
                .into(),
            ..Capabilities::default()
        };
        Ok(&self.caps)
    }

    /// STARTTLS, the handshake, and EHLO again (RFC 3207 §4.2: what was
    /// learnt before TLS is forgotten).
    ///
    /// When the server refuses the command ([`ClientError::Rejected`]) the
    /// session goes on in plaintext; when the handshake fails
    /// ([`ClientError::Tls`]) the connection is gone.
    pub async fn starttls(&mut self, tls: &Tls, host: &str, helo: &str) -> Result<(), ClientError> {
        if self.tls_version.is_some() {
            return Ok(());
        }
        if !self.caps.starttls {
            return Err(ClientError::NoStartTls);
        }
        self.wbuf.clear();
        self.push_cmd(&[b"STARTTLS"]);
        let reply = self.command(Stage::StartTls).await?;
        if reply.code != 220 {
            return Err(ClientError::Rejected {
                stage: Stage::StartTls,
                reply,
            });
        }
        // Anything the server sent after its 220 arrived before TLS and could
        // be injected by a man in the middle (CVE-2011-0411's mirror image):
        // refuse rather than read it as if it came over TLS.
        if self.rpos != self.rlen {
            self.broken = true;
            return Err(ClientError::Tls(
                "the server sent data after its 220 reply to STARTTLS".into(),
            ));
        }
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, Stream::Gone) else {
            self.broken = true;
            return Err(ClientError::NotUsable);
        };
        match handshake(tcp, tls, host, self.peer.ip(), self.timeouts.connect).await {
            Ok((stream, version)) => {
                self.stream = Stream::Tls(stream);
                self.tls_version = version;
            }
            Err(e) => {
                self.broken = true;
                return Err(e);
            }
        }
        self.caps = Capabilities::default();
        self.ehlo(helo).await?;
        Ok(())
    }

    /// Authenticates with PLAIN when offered, else LOGIN.
    pub async fn auth_auto(&mut self, user: &str, pass: &str) -> Result<(), ClientError> {
        let mech = if self.caps.offers_auth("PLAIN") {
            AuthMechanism::Plain
        } else if self.caps.offers_auth("LOGIN") {
            AuthMechanism::Login
        } else {
            return Err(ClientError::NoAuthMechanism);
        };
        self.auth(mech, user, pass).await
    }

    /// Authenticates (RFC 4954). The credentials never reach a log line
    /// or an error message.
    pub async fn auth(
        &mut self,
        mech: AuthMechanism,
        user: &str,
        pass: &str,
    ) -> Result<(), ClientError> {
        let mut reply = match mech {
            AuthMechanism::Plain => {
                let mut raw = Vec::with_capacity(user.len() + pass.len() + 2);
                raw.push(0);
                raw.extend_from_slice(user.as_bytes());
                raw.push(0);
                raw.extend_from_slice(pass.as_bytes());
                let token = BASE64.encode(&raw);
                self.wbuf.clear();
                self.push_cmd(&[b"AUTH PLAIN ", token.as_bytes()]);
                let reply = self.command(Stage::Auth).await?;
                if reply.code == 334 {
                    // A server that ignores the initial response asks again.
                    self.wbuf.clear();
                    self.push_cmd(&[token.as_bytes()]);
                    self.command(Stage::Auth).await?
                } else {
                    reply
                }
            }
            AuthMechanism::Login => {
                self.wbuf.clear();
                self.push_cmd(&[b"AUTH LOGIN"]);
                let mut reply = self.command(Stage::Auth).await?;
                // The first challenge is "Username:", the second "Password:".
                for secret in [user, pass] {
                    if reply.code != 334 {
                        break;
                    }
                    self.wbuf.clear();
                    self.push_cmd(&[BASE64.encode(secret).as_bytes()]);
                    reply = self.command(Stage::Auth).await?;
                }
                reply
            }
        };
        if reply.code == 334 {
            // Abort the exchange (RFC 4954 §4) so the session stays in step.
            self.wbuf.clear();
            self.push_cmd(&[b"*"]);
            reply = self.command(Stage::Auth).await?;
        }
        if reply.code == 235 {
            Ok(())
        } else {
            Err(self.rejected(Stage::Auth, reply))
        }
    }

    /// RSET (RFC 5321 §4.1.1.5). [`SmtpClient::send`] sends one by itself
    /// when the previous transaction was left open.
    pub async fn rset(&mut self) -> Result<(), ClientError> {
        self.wbuf.clear();
        self.push_cmd(&[b"RSET"]);
        let reply = self.command(Stage::Rset).await?;
        if reply.code != 250 {
            return Err(self.rejected(Stage::Rset, reply));
        }
        self.need_rset = false;
        Ok(())
    }

    /// QUIT and close. Errors do not matter any more and are ignored.
    pub async fn quit(mut self) {
        if !self.broken {
            self.wbuf.clear();
            self.push_cmd(&[b"QUIT"]);
            let _ = tokio::time::timeout(QUIT_TIMEOUT, async {
                self.flush_wbuf(Stage::Quit).await?;
                self.read_reply(Stage::Quit, Instant::now() + QUIT_TIMEOUT)
                    .await
            })
            .await;
        }
        let _ = tokio::time::timeout(QUIT_TIMEOUT, self.stream.shutdown()).await;
    }

    /// One mail transaction: MAIL FROM, RCPT TO for each recipient, and, if
    /// at least one was accepted, DATA and the body.
    ///
    /// `body` is the message with CRLF line ends, not dot-stuffed. It is
    /// sent byte for byte, except that a line starting with '.' gets one
    /// more (RFC 5321 §4.5.2), a bare CR or LF goes out as CRLF (herald never
    /// emits one, so no server can read a line end where another does not),
    /// and a CRLF is added when the body does not end with one.
    ///
    /// With PIPELINING, MAIL, every RCPT and DATA go out in one write
    /// (RFC 2920 §3.1); if the server still answers 354 though no recipient
    /// was accepted, an empty message is sent and its reply ignored.
    pub async fn send(
        &mut self,
        mail: &MailParams<'_>,
        rcpts: &[RcptParams<'_>],
        body: &[u8],
    ) -> Result<TransactionReplies, TransactionError> {
        let envelope = |error| TransactionError {
            stage: TxStage::Envelope,
            error,
        };
        if self.broken {
            return Err(envelope(ClientError::NotUsable));
        }
        check_line("the sender address", mail.from).map_err(envelope)?;
        if let Some(id) = mail.env_id {
            check_line("the ENVID", id).map_err(envelope)?;
        }
        for r in rcpts {
            check_line("a recipient address", r.address).map_err(envelope)?;
            if let Some(o) = r.orcpt {
                check_line("an ORCPT", o).map_err(envelope)?;
            }
        }

        let (mail_reply, rcpt_replies, data_reply) = if self.caps.pipelining {
            self.envelope_pipelined(mail, rcpts, body.len())
                .await
                .map_err(envelope)?
        } else {
            self.envelope_in_turn(mail, rcpts, body.len())
                .await
                .map_err(envelope)?
        };
        let mut tx = TransactionReplies {
            mail: mail_reply,
            rcpts: rcpt_replies,
            data: None,
        };
        let Some(data_reply) = data_reply else {
            // Nothing to send: the envelope failed, or no recipient was accepted.
            self.need_rset = true;
            return Ok(tx);
        };
        if data_reply.code != 354 {
            // DATA refused: the server may still hold the envelope.
            self.need_rset = true;
            if tx.accepted() > 0 {
                tx.data = Some(if data_reply.is_positive() {
                    // A 2xx here would read as "delivered" although no
                    // byte of the message was sent: a broken server.
                    Reply::new(
                        451,
                        Enhanced(4, 5, 0),
                        format!(
                            "server answered DATA with {} instead of 354: {}",
                            data_reply.code, data_reply.text
                        ),
                    )
                } else {
                    data_reply
                });
            }
            return Ok(tx);
        }

        // 354: the server now reads the message whatever RCPT said.
        let no_recipient = tx.accepted() == 0;
        let payload: &[u8] = if no_recipient { b"" } else { body };
        let deadline = Instant::now() + self.timeouts.data;
        if let Err(error) = self.write_body(payload, deadline).await {
            self.broken = true;
            return Err(TransactionError {
                stage: TxStage::Body,
                error,
            });
        }
        let reply = self
            .read_reply(Stage::DataEnd, deadline)
            .await
            .map_err(|error| TransactionError {
                stage: TxStage::FinalReply,
                error,
            })?;
        self.need_rset = false;
        if reply.code == 421 {
            self.broken = true;
        }
        if !no_recipient {
            tx.data = Some(reply);
        }
        Ok(tx)
    }

    /// The envelope in one write: [RSET], MAIL, RCPT..., DATA.
    async fn envelope_pipelined(
        &mut self,
        mail: &MailParams<'_>,
        rcpts: &[RcptParams<'_>],
        size: usize,
    ) -> Result<(Reply, Vec<Reply>, Option<Reply>), ClientError> {
        self.wbuf.clear();
        let rset = self.need_rset;
        if rset {
            self.push_cmd(&[b"RSET"]);
        }
        self.push_mail(mail, size);
        for r in rcpts {
            self.push_rcpt(r);
        }
        let send_data = !rcpts.is_empty();
        if send_data {
            self.push_cmd(&[b"DATA"]);
        }
        self.flush_wbuf(Stage::Mail).await?;

        if rset {
            let reply = self.next_reply(Stage::Rset).await?;
            if reply.code != 250 {
                return Err(self.rejected(Stage::Rset, reply));
            }
            self.need_rset = false;
        }
        let mail_reply = self.next_reply(Stage::Mail).await?;
        self.stop_on_421(&mail_reply, Stage::Mail)?;
        let mut replies = Vec::with_capacity(rcpts.len());
        for _ in rcpts {
            let reply = self.next_reply(Stage::Rcpt).await?;
            self.stop_on_421(&reply, Stage::Rcpt)?;
            replies.push(reply);
        }
        let data = if send_data {
            let reply = self.next_reply(Stage::Data).await?;
            self.stop_on_421(&reply, Stage::Data)?;
            Some(reply)
        } else {
            None
        };
        if !mail_reply.is_positive() {
            // The RCPT and DATA replies are only "503 need MAIL first" echoes.
            if data.as_ref().is_some_and(|d| d.code == 354) {
                // A server that reads a message without a sender is out of
                // step with us: do not use this session again.
                self.broken = true;
            }
            replies.clear();
            return Ok((mail_reply, replies, None));
        }
        if replies.iter().all(|r| !r.is_positive()) {
            // RFC 2920 §3.1: DATA must be answered, here by an empty message
            // if the server let it through anyway.
            if let Some(d) = &data
                && d.code == 354
            {
                return Ok((mail_reply, replies, data));
            }
            return Ok((mail_reply, replies, None));
        }
        Ok((mail_reply, replies, data))
    }

    /// The envelope one command at a time, stopping as soon as it fails.
    async fn envelope_in_turn(
        &mut self,
        mail: &MailParams<'_>,
        rcpts: &[RcptParams<'_>],
        size: usize,
    ) -> Result<(Reply, Vec<Reply>, Option<Reply>), ClientError> {
        if self.need_rset {
            self.rset().await?;
        }
        self.wbuf.clear();
        self.push_mail(mail, size);
        let mail_reply = self.command(Stage::Mail).await?;
        self.stop_on_421(&mail_reply, Stage::Mail)?;
        if !mail_reply.is_positive() {
            return Ok((mail_reply, Vec::new(), None));
        }
        let mut replies = Vec::with_capacity(rcpts.len());
        for r in rcpts {
            self.wbuf.clear();
            self.push_rcpt(r);
            let reply = self.command(Stage::Rcpt).await?;
            self.stop_on_421(&reply, Stage::Rcpt)?;
            replies.push(reply);
        }
        if replies.iter().all(|r| !r.is_positive()) {
            return Ok((mail_reply, replies, None));
        }
        self.wbuf.clear();
        self.push_cmd(&[b"DATA"]);
        let data = self.command(Stage::Data).await?;
        self.stop_on_421(&data, Stage::Data)?;
        Ok((mail_reply, replies, Some(data)))
    }

    /// A 421 means the server is closing the session (RFC 5321 §3.8): the
    /// replies that would follow never come.
    fn stop_on_421(&mut self, reply: &Reply, stage: Stage) -> Result<(), ClientError> {
        if reply.code == 421 {
            self.broken = true;
            return Err(ClientError::Rejected {
                stage,
                reply: reply.clone(),
            });
        }
        Ok(())
    }

    fn push_mail(&mut self, mail: &MailParams<'_>, size: usize) {
        let w = &mut self.wbuf;
        w.extend_from_slice(b"MAIL FROM:<");
        push_path(w, mail.from);
        w.push(b'>');
        if self.caps.size_ext {
            w.extend_from_slice(b" SIZE=");
            w.extend_from_slice(size.to_string().as_bytes());
        }
        if mail.body_8bit && self.caps.eightbitmime {
            w.extend_from_slice(b" BODY=8BITMIME");
        }
        if mail.smtputf8 && self.caps.smtputf8 {
            w.extend_from_slice(b" SMTPUTF8");
        }
        if mail.require_tls && self.caps.requiretls {
            w.extend_from_slice(b" REQUIRETLS");
        }
        if self.caps.dsn {
            match mail.ret {
                Some(Ret::Full) => w.extend_from_slice(b" RET=FULL"),
                Some(Ret::Hdrs) => w.extend_from_slice(b" RET=HDRS"),
                None => {}
            }
            if let Some(id) = mail.env_id {
                w.extend_from_slice(b" ENVID=");
                xtext(id, w);
            }
        }
        w.extend_from_slice(b"\r\n");
    }

    fn push_rcpt(&mut self, r: &RcptParams<'_>) {
        let w = &mut self.wbuf;
        w.extend_from_slice(b"RCPT TO:<");
        push_path(w, r.address);
        w.push(b'>');
        if self.caps.dsn {
            let n = r.notify;
            if n.never {
                w.extend_from_slice(b" NOTIFY=NEVER");
            } else if n.success || n.failure || n.delay {
                w.extend_from_slice(b" NOTIFY=");
                let mut first = true;
                for (set, word) in [
                    (n.success, &b"SUCCESS"[..]),
                    (n.failure, b"FAILURE"),
                    (n.delay, b"DELAY"),
                ] {
                    if set {
                        if !first {
                            w.push(b',');
                        }
                        w.extend_from_slice(word);
                        first = false;
                    }
                }
            }
            if let Some(orcpt) = r.orcpt {
                // RFC 3461 §4.2: ORCPT=addr-type;xtext. Kept as "rfc822;addr"
                // or plain "addr"; the type defaults to rfc822.
                let (kind, addr) = match orcpt.split_once(';') {
                    Some((k, a))
                        if !k.is_empty()
                            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') =>
                    {
                        (k, a)
                    }
                    _ => ("rfc822", orcpt),
                };
                if !addr.is_empty() {
                    w.extend_from_slice(b" ORCPT=");
                    w.extend_from_slice(kind.as_bytes());
                    w.push(b';');
                    xtext(addr, w);
                }
            }
        }
        w.extend_from_slice(b"\r\n");
    }

    /// Appends one command line to the write buffer.
    fn push_cmd(&mut self, parts: &[&[u8]]) {
        for p in parts {
            self.wbuf.extend_from_slice(p);
        }
        self.wbuf.extend_from_slice(b"\r\n");
    }

    /// Writes the buffered command(s) and reads one reply.
    async fn command(&mut self, stage: Stage) -> Result<Reply, ClientError> {
        self.flush_wbuf(stage).await?;
        self.next_reply(stage).await
    }

    async fn next_reply(&mut self, stage: Stage) -> Result<Reply, ClientError> {
        let deadline = Instant::now() + self.timeouts.command;
        self.read_reply(stage, deadline).await
    }

    fn rejected(&mut self, stage: Stage, reply: Reply) -> ClientError {
        if reply.code == 421 {
            self.broken = true;
        }
        ClientError::Rejected { stage, reply }
    }

    async fn flush_wbuf(&mut self, stage: Stage) -> Result<(), ClientError> {
        let deadline = Instant::now() + self.timeouts.command;
        let result = tokio::time::timeout_at(deadline, async {
            self.stream.write_all(&self.wbuf).await?;
            self.stream.flush().await
        })
        .await;
        self.wbuf.clear();
        self.io_result(result, stage)
    }

    fn io_result<T>(
        &mut self,
        result: Result<io::Result<T>, tokio::time::error::Elapsed>,
        stage: Stage,
    ) -> Result<T, ClientError> {
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => {
                self.broken = true;
                Err(ClientError::Io { stage, source })
            }
            Err(_) => {
                self.broken = true;
                Err(ClientError::Timeout(stage))
            }
        }
    }

    /// Writes the dot-stuffed body and the final ".CRLF", all before
    /// `deadline`. Small pieces are gathered in the write buffer; large runs
    /// of the message go straight from `body`, so a 25 MiB message is not
    /// copied whole.
    async fn write_body(&mut self, body: &[u8], deadline: Instant) -> Result<(), ClientError> {
        let result = tokio::time::timeout_at(deadline, async {
            self.wbuf.clear();
            for piece in Stuffer::new(body) {
                if piece.len() >= DIRECT_WRITE {
                    if !self.wbuf.is_empty() {
                        self.stream.write_all(&self.wbuf).await?;
                        self.wbuf.clear();
                    }
                    self.stream.write_all(piece).await?;
                } else {
                    self.wbuf.extend_from_slice(piece);
                    if self.wbuf.len() >= WRITE_BUF {
                        self.stream.write_all(&self.wbuf).await?;
                        self.wbuf.clear();
                    }
                }
            }
            self.wbuf.extend_from_slice(b".\r\n");
            self.stream.write_all(&self.wbuf).await?;
            self.stream.flush().await
        })
        .await;
        self.wbuf.clear();
        if self.wbuf.capacity() > 4 * WRITE_BUF {
            self.wbuf = Vec::with_capacity(1024);
        }
        self.io_result(result, Stage::Body)
    }

    /// Reads one complete reply, however it is split over reads, before
    /// `deadline`. Bytes after it (pipelined replies) stay buffered.
    async fn read_reply(&mut self, stage: Stage, deadline: Instant) -> Result<Reply, ClientError> {
        loop {
            if self.rpos < self.rlen {
                let mut it = self.rbuf[self.rpos..self.rlen].iter();
                let before = it.len();
                let parsed = self.receiver.parse(&mut it);
                self.rpos += before - it.len();
                match parsed {
                    Ok(r) => {
                        self.receiver.reset();
                        return self.reply_from(r, stage);
                    }
                    Err(smtp_proto::Error::NeedsMoreData { .. }) => {}
                    Err(smtp_proto::Error::ResponseTooLong) => {
                        self.broken = true;
                        return Err(ClientError::Protocol {
                            stage,
                            what: "reply longer than 4096 bytes",
                        });
                    }
                    Err(_) => {
                        self.broken = true;
                        return Err(ClientError::Protocol {
                            stage,
                            what: "malformed reply",
                        });
                    }
                }
            }
            // Keep what the parser left (it normally takes everything).
            if self.rpos > 0 {
                self.rbuf.copy_within(self.rpos..self.rlen, 0);
                self.rlen -= self.rpos;
                self.rpos = 0;
            }
            if self.rlen == self.rbuf.len() {
                self.broken = true;
                return Err(ClientError::Protocol {
                    stage,
                    what: "reply cannot be parsed",
                });
            }
            let result =
                tokio::time::timeout_at(deadline, self.stream.read(&mut self.rbuf[self.rlen..]))
                    .await;
            let n = self.io_result(result, stage)?;
            if n == 0 {
                self.broken = true;
                return Err(ClientError::Closed(stage));
            }
            self.rlen += n;
        }
    }

    fn reply_from(
        &mut self,
        r: smtp_proto::Response<String>,
        stage: Stage,
    ) -> Result<Reply, ClientError> {
        if !(200..600).contains(&r.code) {
            self.broken = true;
            return Err(ClientError::Protocol {
                stage,
                what: "reply code out of range",
            });
        }
        let [class, subject, detail] = r.esc;
        let enhanced =
            matches!(class, 2 | 4 | 5).then_some(Enhanced(class, subject as u16, detail as u16));
        Ok(Reply {
            code: r.code,
            enhanced,
            text: r.message,
        })
    }
}

/// TCP connect with a timeout, from `source` when given; `TCP_NODELAY` on,
/// since SMTP is a dialogue of small writes (PERFORMANCE.md: Nagle plus
/// delayed ACK stalls each message ~40-80 ms).
async fn tcp_connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
    limit: Duration,
) -> Result<TcpStream, ClientError> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(ClientError::Connect)?;
    if let Some(ip) = source {
        socket
            .bind(SocketAddr::new(ip, 0))
            .map_err(ClientError::Connect)?;
    }
    let tcp = match tokio::time::timeout(limit, socket.connect(addr)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            return Err(ClientError::Refused);
        }
        Ok(Err(e)) => return Err(ClientError::Connect(e)),
        Err(_) => return Err(ClientError::Timeout(Stage::Connect)),
    };
    tcp.set_nodelay(true).map_err(ClientError::Connect)?;
    Ok(tcp)
}

async fn handshake(
    tcp: TcpStream,
    tls: &Tls,
    host: &str,
    ip: IpAddr,
    limit: Duration,
) -> Result<(Box<TlsStream<TcpStream>>, Option<&'static str>), ClientError> {
    let name = server_name(host, ip);
    match tokio::time::timeout(limit, tls.connector.connect(name, tcp)).await {
        Ok(Ok(stream)) => {
            let version = match stream.get_ref().1.protocol_version() {
                Some(ProtocolVersion::TLSv1_3) => Some("TLSv1.3"),
                Some(ProtocolVersion::TLSv1_2) => Some("TLSv1.2"),
                Some(_) => Some("TLS"),
                None => None,
            };
            Ok((Box::new(stream), version))
        }
        Ok(Err(e)) => Err(ClientError::Tls(TlsFailure::from_io(&e))),
        Err(_) => Err(ClientError::Timeout(Stage::TlsHandshake)),
    }
}

/// Refuses values that would end the command line early.
fn check_line(what: &'static str, value: &str) -> Result<(), ClientError> {
    if value.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
        Err(ClientError::InvalidArgument(what))
    } else {
        Ok(())
    }
}

/// RFC 3461 §4: xtext encodes '+', '=', controls, space and non-ASCII as "+XX".
fn xtext(value: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in value.as_bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'+', HEX[(b >> 4) as usize], HEX[(b & 15) as usize]]);
        }
    }
}

/// Splits a message into the pieces that go on the wire for DATA: runs of
/// the message itself, and the few bytes added between them ("." before a
/// line that starts with one, CRLF for a bare CR or LF, a final CRLF). The
/// terminating ".CRLF" is not included.
pub struct Stuffer<'a> {
    body: &'a [u8],
    pos: usize,
    at_line_start: bool,
    done: bool,
}

impl<'a> Stuffer<'a> {
    /// Pieces of `body`, which starts at the beginning of a line.
    pub fn new(body: &'a [u8]) -> Stuffer<'a> {
        Stuffer {
            body,
            pos: 0,
            at_line_start: true,
            done: false,
        }
    }
}

impl<'a> Iterator for Stuffer<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let rest = &self.body[self.pos..];
        let Some(&first) = rest.first() else {
            if self.done {
                return None;
            }
            self.done = true;
            // An empty message stays empty; otherwise end on a line end.
            return (!self.at_line_start).then_some(&b"\r\n"[..]);
        };
        if self.at_line_start && first == b'.' {
            self.at_line_start = false;
            return Some(b".");
        }
        // A bare CR or LF becomes a line end of its own.
        if first == b'\n' || (first == b'\r' && rest.get(1) != Some(&b'\n')) {
            self.pos += 1;
            self.at_line_start = true;
            return Some(b"\r\n");
        }
        // The longest run that needs nothing added: up to a bare CR or LF,
        // or through a CRLF that a '.' (or the end) follows.
        let mut from = 0;
        loop {
            let Some(off) = rest[from..].iter().position(|&b| b == b'\r' || b == b'\n') else {
                self.pos = self.body.len();
                self.at_line_start = false;
                return Some(rest);
            };
            let at = from + off;
            if rest[at] == b'\r' && rest.get(at + 1) == Some(&b'\n') {
                let next = at + 2;
                if rest.get(next).is_none_or(|&b| b == b'.') {
                    self.pos += next;
                    self.at_line_start = true;
                    return Some(&rest[..next]);
                }
                from = next;
            } else {
                // `at` > 0: a bare line end at the start was handled above.
                self.pos += at;
                self.at_line_start = false;
                return Some(&rest[..at]);
            }
        }
    }
}

/// Writes an address for MAIL/RCPT. The receive stage keeps local parts
/// unquoted (`john smith@x`), so one that is not a dot-atom is quoted again
/// here (RFC 5321 §4.1.2), escaping `"` and `\`.
fn push_path(w: &mut Vec<u8>, address: &str) {
    let (local, domain) = match address.rsplit_once('@') {
        Some(parts) => parts,
        None => {
            w.extend_from_slice(address.as_bytes());
            return;
        }
    };
    if is_dot_atom(local) {
        w.extend_from_slice(address.as_bytes());
        return;
    }
    w.push(b'"');
    for b in local.bytes() {
        if b == b'"' || b == b'\\' {
            w.push(b'\\');
        }
        w.push(b);
    }
    w.push(b'"');
    w.push(b'@');
    w.extend_from_slice(domain.as_bytes());
}

/// RFC 5322 dot-atom, with any non-ASCII byte allowed (RFC 6531 UTF-8).
fn is_dot_atom(local: &str) -> bool {
    !local.is_empty()
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local
            .bytes()
            .all(|b| b >= 0x80 || b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~.".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deliver::fake;

    fn stuffed(body: &[u8]) -> Vec<u8> {
        Stuffer::new(body).flatten().copied().collect()
    }

    #[test]
    fn dot_stuffing() {
        assert_eq!(stuffed(b""), b"");
        assert_eq!(stuffed(b"a\r\n"), b"a\r\n");
        assert_eq!(stuffed(b"a"), b"a\r\n");
        assert_eq!(stuffed(b".\r\n"), b"..\r\n");
        assert_eq!(stuffed(b"a\r\n.b\r\n..\r\n"), b"a\r\n..b\r\n...\r\n");
        assert_eq!(stuffed(b"a\r\n."), b"a\r\n..\r\n");
        assert_eq!(stuffed(b"x.y\r\n. \r\n"), b"x.y\r\n.. \r\n");
        assert_eq!(stuffed(b"\r\n\r\n.\r\n"), b"\r\n\r\n..\r\n");
    }

    #[test]
    fn bare_line_ends_become_crlf_and_are_stuffed_after() {
        assert_eq!(stuffed(b"a\n.\r\nb"), b"a\r\n..\r\nb\r\n");
        assert_eq!(stuffed(b"a\r.b\r\n"), b"a\r\n..b\r\n");
        assert_eq!(stuffed(b"a\r"), b"a\r\n");
        assert_eq!(stuffed(b"\n"), b"\r\n");
    }

    #[test]
    fn runs_between_dots_are_borrowed_whole() {
        let line = b"0123456789012345678901234567890123456789012345678901234567890123456789\r\n";
        let mut body = Vec::new();
        for _ in 0..1000 {
            body.extend_from_slice(line);
        }
        let pieces: Vec<&[u8]> = Stuffer::new(&body).collect();
        assert_eq!(pieces.len(), 1);
        assert_eq!(pieces[0].as_ptr(), body.as_ptr());
        assert_eq!(pieces[0].len(), body.len());

        body.extend_from_slice(b".dot\r\n");
        body.extend_from_slice(line);
        let pieces: Vec<&[u8]> = Stuffer::new(&body).collect();
        assert_eq!(pieces.len(), 3, "{pieces:?}");
        assert_eq!(pieces[1], b".");
        assert!(
            [pieces[0], pieces[2]]
                .iter()
                .all(|p| body.as_ptr_range().contains(&p.as_ptr()))
        );
    }

    /// What a server reads from the wire after dot-unstuffing
    /// (RFC 5321 §4.5.2), up to the terminating ".CRLF".
    fn unstuff(wire: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for line in wire.split_inclusive(|&b| b == b'\n') {
            out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
        }
        out
    }

    #[test]
    fn stuffing_round_trips_random_bodies() {
        use rand::Rng;
        const ALPHABET: &[u8] = b"..\r\r\n\n\r\nab \xc3\xa9";
        let mut rng = rand::rng();
        for _ in 0..20_000 {
            let len = rng.random_range(0..40);
            let body: Vec<u8> = (0..len)
                .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())])
                .collect();
            let wire = stuffed(&body);
            // Only CRLF line ends, and no line that is a lone "." (which
            // would end the message early).
            let plain = wire.windows(2).filter(|w| w == b"\r\n").count();
            let crs = wire.iter().filter(|&&b| b == b'\r').count();
            let lfs = wire.iter().filter(|&&b| b == b'\n').count();
            assert!(plain == crs && plain == lfs, "{body:?} -> {wire:?}");
            assert!(wire.is_empty() || wire.ends_with(b"\r\n"));
            assert!(!wire.starts_with(b".\r\n") && !wire.windows(5).any(|w| w == b"\r\n.\r\n"));
            // A well-formed body comes back byte for byte.
            let mut normal = Vec::new();
            let mut i = 0;
            while i < body.len() {
                if body[i..].starts_with(b"\r\n") {
                    normal.extend_from_slice(b"\r\n");
                    i += 2;
                } else if body[i] == b'\r' || body[i] == b'\n' {
                    normal.extend_from_slice(b"\r\n");
                    i += 1;
                } else {
                    normal.push(body[i]);
                    i += 1;
                }
            }
            if !normal.is_empty() && !normal.ends_with(b"\r\n") {
                normal.extend_from_slice(b"\r\n");
            }
            assert_eq!(unstuff(&wire), normal, "{body:?}");
        }
    }

    #[tokio::test]
    async fn random_replies_never_panic() {
        use rand::Rng;
        use tokio::io::AsyncWriteExt as _;
        const ALPHABET: &[u8] = b"0122555-- .\r\n\r\nx\xc3\xa9\xff";
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut rng = rand::rng();
        for _ in 0..300 {
            let len = rng.random_range(0..60);
            let junk: Vec<u8> = (0..len)
                .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())])
                .collect();
            let server = async {
                let (mut s, _) = listener.accept().await.unwrap();
                let _ = s.write_all(&junk).await;
                let _ = s.shutdown().await;
            };
            let client = SmtpClient::connect(
                addr,
                None,
                Timeouts {
                    command: Duration::from_millis(500),
                    ..Timeouts::from_secs(5)
                },
            );
            let (_, result) = tokio::join!(server, client);
            if let Ok(c) = result {
                assert_eq!(c.greeting().code, 220);
            }
        }
    }

    #[test]
    fn parses_ehlo_capabilities() {
        let c = Capabilities::parse_ehlo(
            "mx.google.com at your service, [192.0.2.1]\nSIZE 157286400\n8BITMIME\nSTARTTLS\nENHANCEDSTATUSCODES\nPIPELINING\nCHUNKING\nSMTPUTF8",
        );
        assert_eq!(c.hostname, "mx.google.com");
        assert!(c.pipelining && c.starttls && c.eightbitmime && c.smtputf8 && c.chunking);
        assert!(c.size_ext);
        assert_eq!(c.size, 157_286_400);
        assert!(!c.dsn);

        let c = Capabilities::parse_ehlo(
            "smtp.example\nAUTH=LOGIN PLAIN\nAUTH login CRAM-MD5\nDSN\nSIZE\nX-WEIRD-THING =?*\n\n",
        );
        assert_eq!(c.auth, vec!["LOGIN", "PLAIN", "CRAM-MD5"]);
        assert!(c.dsn && c.size_ext);
        assert_eq!(c.size, 0);
        assert!(c.offers_auth("PLAIN"));
    }

    #[test]
    fn xtext_encodes_specials() {
        let mut out = Vec::new();
        xtext("a+b=c d@é", &mut out);
        assert_eq!(out, b"a+2Bb+3Dc+20d@+C3+A9");
    }

    #[test]
    fn command_lines() {
        let mut c = test_client();
        c.caps = Capabilities::parse_ehlo("x\nSIZE 100\nDSN\n8BITMIME\nSMTPUTF8");
        c.push_mail(
            &MailParams {
                from: "a@b",
                body_8bit: true,
                smtputf8: true,
                ret: Some(Ret::Hdrs),
                env_id: Some("id 1"),
                require_tls: false,
            },
            42,
        );
        c.push_rcpt(&RcptParams {
            address: "c@d",
            notify: Notify {
                success: true,
                failure: true,
                ..Notify::default()
            },
            orcpt: Some("rfc822;C+x@d"),
        });
        c.push_rcpt(&RcptParams {
            address: "e@f",
            notify: Notify {
                never: true,
                ..Notify::default()
            },
            orcpt: Some("e@f"),
        });
        assert_eq!(
            String::from_utf8(c.wbuf.clone()).unwrap(),
            "MAIL FROM:<a@b> SIZE=42 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=id+201\r\n\
             RCPT TO:<c@d> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;C+2Bx@d\r\n\
             RCPT TO:<e@f> NOTIFY=NEVER ORCPT=rfc822;e@f\r\n"
        );

        // Without the extensions, no parameters.
        c.wbuf.clear();
        c.caps = Capabilities::parse_ehlo("x");
        c.push_mail(
            &MailParams {
                from: "",
                body_8bit: true,
                smtputf8: true,
                ret: Some(Ret::Full),
                env_id: Some("x"),
                require_tls: false,
            },
            42,
        );
        assert_eq!(c.wbuf, b"MAIL FROM:<>\r\n");
    }

    #[test]
    fn refuses_line_breaks_in_arguments() {
        assert!(check_line("x", "a@b").is_ok());
        assert!(check_line("x", "a@b>\r\nRCPT TO:<c@d").is_err());
        assert!(check_line("x", "a\0").is_err());
    }

    /// A client without a connection, for tests of the command builders.
    fn test_client() -> SmtpClient {
        // The stream is never used by the builder tests.
        SmtpClient {
            stream: Stream::Gone,
            peer: SocketAddr::from(([127, 0, 0, 1], 25)),
            timeouts: Timeouts {
                connect: Duration::from_secs(1),
                command: Duration::from_secs(1),
                data: Duration::from_secs(1),
            },
            greeting: Reply::from_wire(220, ""),
            caps: Capabilities::default(),
            tls_version: None,
            rbuf: vec![0u8; READ_BUF].into_boxed_slice(),
            rpos: 0,
            rlen: 0,
            receiver: ResponseReceiver::default(),
            wbuf: Vec::new(),
            need_rset: false,
            broken: false,
        }
    }

    impl Timeouts {
        fn from_secs(secs: u64) -> Timeouts {
            let d = Duration::from_secs(secs);
            Timeouts {
                connect: d,
                command: d,
                data: d,
            }
        }
    }

    fn timeouts(secs: u64) -> Timeouts {
        Timeouts::from_secs(secs)
    }

    fn rcpt(address: &str) -> RcptParams<'_> {
        RcptParams {
            address,
            ..RcptParams::default()
        }
    }

    const BODY: &[u8] = b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\nmiddle . dot\r\n.\r\nend";

    #[tokio::test]
    async fn pipelined_transaction_with_one_refused_recipient() {
        let (addr, rec) = fake::start(fake::Script {
            rcpt: |a| {
                if a.starts_with("bad") {
                    "550 5.1.1 <bad@example.test>: no such user"
                } else {
                    "250 2.1.5 Ok"
                }
            },
            ..fake::Script::default()
        })
        .await;
        let mut c = SmtpClient::connect(addr, None, timeouts(5)).await.unwrap();
        assert_eq!(c.greeting().text, "fake.test ESMTP");
        let caps = c.ehlo("relay.test").await.unwrap();
        assert!(caps.pipelining && caps.dsn && caps.size_ext);
        let mail = MailParams {
            from: "app@acme.test",
            body_8bit: true,
            ..MailParams::default()
        };
        let tx = c
            .send(
                &mail,
                &[
                    rcpt("a@example.test"),
                    rcpt("bad@example.test"),
                    rcpt("c@example.test"),
                ],
                BODY,
            )
            .await
            .unwrap();
        assert_eq!(tx.mail.code, 250);
        let codes: Vec<u16> = tx.rcpts.iter().map(|r| r.code).collect();
        assert_eq!(codes, [250, 550, 250]);
        assert_eq!(tx.rcpts[1].enhanced, Some(Enhanced(5, 1, 1)));
        assert_eq!(tx.rcpts[1].text, "<bad@example.test>: no such user");
        assert_eq!(tx.data.as_ref().map(|d| d.code), Some(250));

        // A second message on the same connection needs no RSET.
        let tx = c
            .send(&mail, &[rcpt("a@example.test")], b"x\r\n")
            .await
            .unwrap();
        assert_eq!(tx.data.map(|d| d.code), Some(250));
        c.quit().await;

        tokio::time::sleep(Duration::from_millis(50)).await;
        let rec = rec.lock().unwrap();
        assert_eq!(
            rec.messages[0],
            b"Subject: dots\r\n\r\n..leading dot\r\n...two\r\nmiddle . dot\r\n..\r\nend\r\n"
        );
        assert_eq!(rec.messages[1], b"x\r\n");
        assert_eq!(rec.pipelined, [true, true]);
        assert_eq!(
            rec.lines[1],
            format!(
                "MAIL FROM:<app@acme.test> SIZE={} BODY=8BITMIME",
                BODY.len()
            )
        );
        assert!(!rec.lines.iter().any(|l| l == "RSET"), "{:?}", rec.lines);
        assert_eq!(rec.lines.last().map(String::as_str), Some("QUIT"));
    }

    #[tokio::test]
    async fn refused_envelope_is_reset_before_the_next_transaction() {
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
        let mut c = SmtpClient::connect(addr, None, timeouts(5)).await.unwrap();
        c.ehlo("relay.test").await.unwrap();
        let mail = MailParams {
            from: "app@acme.test",
            ..MailParams::default()
        };
        let tx = c.send(&mail, &[rcpt("bad@x.test")], BODY).await.unwrap();
        assert_eq!(tx.accepted(), 0);
        assert_eq!(tx.data, None);
        let tx = c.send(&mail, &[rcpt("good@x.test")], BODY).await.unwrap();
        assert_eq!(tx.data.map(|d| d.code), Some(250));
        assert!(c.is_usable());
        c.quit().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let lines = rec.lock().unwrap().lines.clone();
        let rset = lines.iter().position(|l| l == "RSET").expect("RSET sent");
        assert!(lines[rset + 1].starts_with("MAIL FROM:"), "{lines:?}");
    }

    #[tokio::test]
    async fn without_pipelining_commands_go_one_by_one_and_stop_early() {
        let (addr, rec) = fake::start(fake::Script {
            ehlo: Some(""),
            mail: |_| "553 5.7.1 Sender not allowed",
            ..fake::Script::default()
        })
        .await;
        let mut c = SmtpClient::connect(addr, None, timeouts(5)).await.unwrap();
        assert!(!c.ehlo("relay.test").await.unwrap().pipelining);
        let mail = MailParams {
            from: "app@acme.test",
            env_id: Some("ignored without DSN"),
            ..MailParams::default()
        };
        let tx = c.send(&mail, &[rcpt("a@x.test")], BODY).await.unwrap();
        assert_eq!(tx.mail.code, 553);
        assert!(tx.rcpts.is_empty() && tx.data.is_none());
        c.quit().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let rec = rec.lock().unwrap();
        assert_eq!(rec.lines[1], "MAIL FROM:<app@acme.test>");
        assert!(
            !rec.lines.iter().any(|l| l.starts_with("RCPT")),
            "{:?}",
            rec.lines
        );
        assert_eq!(rec.pipelined, [false]);
    }

    #[tokio::test]
    async fn starttls_then_auth() {
        let (addr, rec) = fake::start(fake::Script {
            ehlo: Some("PIPELINING\nSTARTTLS\nAUTH PLAIN LOGIN"),
            tls: Some(fake::tls_acceptor()),
            ..fake::Script::default()
        })
        .await;
        let mut c = SmtpClient::connect(addr, None, timeouts(5)).await.unwrap();
        c.ehlo("relay.test").await.unwrap();
        assert!(c.capabilities().starttls);
        c.starttls(&Tls::opportunistic(), "fake.test", "relay.test")
            .await
            .unwrap();
        assert_eq!(c.tls_version(), Some("TLSv1.3"));
        assert!(c.capabilities().offers_auth("PLAIN"));
        c.auth_auto("user", "secret").await.unwrap();
        let tx = c
            .send(&MailParams::default(), &[rcpt("a@x.test")], BODY)
            .await
            .unwrap();
        assert_eq!(tx.mail.code, 250);
        assert_eq!(tx.data.map(|d| d.code), Some(250));
        c.quit().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let rec = rec.lock().unwrap();
        // EHLO again after TLS (RFC 3207 §4.2).
        assert_eq!(
            rec.lines.iter().filter(|l| l.starts_with("EHLO")).count(),
            2
        );
        assert_eq!(rec.lines[4], "MAIL FROM:<>");
    }

    #[tokio::test]
    async fn implicit_tls_and_auth_login() {
        let (addr, _rec) = fake::start(fake::Script {
            ehlo: Some("AUTH LOGIN"),
            tls: Some(fake::tls_acceptor()),
            implicit_tls: true,
            ..fake::Script::default()
        })
        .await;
        let mut c =
            SmtpClient::connect_tls(addr, None, timeouts(5), &Tls::opportunistic(), "fake.test")
                .await
                .unwrap();
        assert_eq!(c.tls_version(), Some("TLSv1.3"));
        c.ehlo("relay.test").await.unwrap();
        c.auth_auto("user", "secret").await.unwrap();
        c.quit().await;
    }

    #[tokio::test]
    async fn plaintext_injected_after_starttls_is_refused() {
        let (addr, _rec) = fake::start(fake::Script {
            ehlo: Some("STARTTLS"),
            inject_after_starttls: true,
            ..fake::Script::default()
        })
        .await;
        let mut c = SmtpClient::connect(addr, None, timeouts(5)).await.unwrap();
        c.ehlo("relay.test").await.unwrap();
        let e = c
            .starttls(&Tls::opportunistic(), "fake.test", "relay.test")
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ClientError::Tls(m) if m.text.contains("after its 220")),
            "{e}"
        );
        assert!(!c.is_usable());
    }

    #[tokio::test]
    async fn verifying_tls_refuses_an_unknown_certificate() {
        let (addr, _rec) = fake::start(fake::Script {
            ehlo: Some("STARTTLS"),
            tls: Some(fake::tls_acceptor()),
            ..fake::Script::default()
        })
        .await;
        // A CA file with some other certificate than the server's.
        let other = rcgen::generate_simple_self_signed(vec!["other.test".to_string()]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, other.cert.pem()).unwrap();
        let tls = Tls::verify_with_ca_file(&path).unwrap();
        let mut c = SmtpClient::connect(addr, None, timeouts(5)).await.unwrap();
        c.ehlo("relay.test").await.unwrap();
        let e = c
            .starttls(&tls, "fake.test", "relay.test")
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::Tls(_)), "{e}");
        assert!(!c.is_usable());
        assert!(Tls::verify_with_ca_file(&dir.path().join("missing.pem")).is_err());
    }

    #[tokio::test]
    async fn wrong_credentials_are_a_rejection_without_the_secret() {
        let (addr, _rec) = fake::start(fake::Script {
            ehlo: Some("AUTH PLAIN"),
            ..fake::Script::default()
        })
        .await;
        let mut c = SmtpClient::connect(addr, None, timeouts(5)).await.unwrap();
        c.ehlo("relay.test").await.unwrap();
        let e = c.auth_auto("user", "hunter2").await.unwrap_err();
        assert!(
            matches!(&e, ClientError::Rejected { stage: Stage::Auth, reply } if reply.code == 535)
        );
        assert!(!e.to_string().contains("hunter2"));
        assert!(!format!("{e:?}").contains("hunter2"));
    }

    #[tokio::test]
    async fn ehlo_refused_falls_back_to_helo() {
        let (addr, _rec) = fake::start(fake::Script {
            ehlo: None,
            ..fake::Script::default()
        })
        .await;
        let mut c = SmtpClient::connect(addr, None, timeouts(5)).await.unwrap();
        let caps = c.ehlo("relay.test").await.unwrap();
        assert!(!caps.esmtp && !caps.pipelining);
        let tx = c
            .send(&MailParams::default(), &[rcpt("a@x.test")], b"")
            .await
            .unwrap();
        assert_eq!(tx.data.map(|d| d.code), Some(250));
    }

    #[tokio::test]
    async fn bad_greetings() {
        let (addr, _) = fake::start(fake::Script {
            greeting: b"554 5.7.1 go away\r\n",
            ..fake::Script::default()
        })
        .await;
        let e = SmtpClient::connect(addr, None, timeouts(5))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ClientError::Rejected { stage: Stage::Greeting, reply } if reply.code == 554),
            "{e}"
        );

        let (addr, _) = fake::start(fake::Script {
            greeting: b"hello there\r\n",
            ..fake::Script::default()
        })
        .await;
        let e = SmtpClient::connect(addr, None, timeouts(5))
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::Protocol { .. }), "{e}");

        // Not UTF-8, multi-line: kept as (lossy) text, no panic.
        let (addr, _) = fake::start(fake::Script {
            greeting: b"220-h\xc3\r\n220 \xff\xfe ok\r\n",
            ..fake::Script::default()
        })
        .await;
        let c = SmtpClient::connect(addr, None, timeouts(5)).await.unwrap();
        assert!(c.greeting().text.ends_with("ok"), "{:?}", c.greeting().text);

        // Never greets: a timeout, not a hang.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let e = SmtpClient::connect(
            addr,
            None,
            Timeouts {
                command: Duration::from_millis(200),
                ..timeouts(5)
            },
        )
        .await
        .unwrap_err();
        assert!(matches!(e, ClientError::Timeout(Stage::Greeting)), "{e}");

        // Nobody listening.
        drop(silent);
        let e = SmtpClient::connect(addr, None, timeouts(5))
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::Refused), "{e}");
    }

    #[test]
    fn local_parts_that_need_quotes_get_them() {
        let path = |a: &str| {
            let mut w = Vec::new();
            push_path(&mut w, a);
            String::from_utf8(w).unwrap()
        };
        assert_eq!(path("bob.smith+tag@x.test"), "bob.smith+tag@x.test");
        assert_eq!(path("john smith@x.test"), "\"john smith\"@x.test");
        assert_eq!(path("a>b@x.test"), "\"a>b\"@x.test");
        assert_eq!(path("q\"t@x.test"), r#""q\"t"@x.test"#);
        assert_eq!(path("jörg@x.test"), "jörg@x.test");
        assert_eq!(path(""), "");
    }

    /// Property tests (STYLE.md point 9): whatever a remote MX answers after
    /// its greeting, the client reads it without panic.
    mod replies {
        use super::*;
        use proptest::prelude::*;

        /// One reply line as a broken or hostile server might send it: any
        /// code and separator, an enhanced code or not, text in any script
        /// (or a few raw bytes), any line end.
        fn reply_line() -> impl Strategy<Value = Vec<u8>> {
            (
                prop::sample::select(vec![
                    "250", "220", "354", "421", "550", "199", "999", "25", "",
                ]),
                prop::sample::select(vec![" ", "-", ""]),
                prop::option::of("[245][.][0-9]{1,3}[.][0-9]{1,4} "),
                prop_oneof![
                    "[A-Z0-9 =.-]{0,12}[éİ€😀漢ß\u{0}]{0,3}[A-Z ]{0,6}",
                    "(?s).{0,30}",
                ],
                prop_oneof![
                    3 => Just(Vec::new()),
                    1 => prop::collection::vec(any::<u8>(), 1..3),
                ],
                prop::sample::select(vec!["\r\n", "\n", "\r", ""]),
            )
                .prop_map(|(code, sep, esc, text, bytes, end)| {
                    let esc = esc.unwrap_or_default();
                    [
                        code.as_bytes(),
                        sep.as_bytes(),
                        esc.as_bytes(),
                        text.as_bytes(),
                        &bytes,
                        end.as_bytes(),
                    ]
                    .concat()
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

            #[test]
            fn any_replies_after_the_greeting_never_panic(lines in prop::collection::vec(reply_line(), 0..12)) {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                    let addr = listener.local_addr().unwrap();
                    let junk = lines.concat();
                    let server = tokio::spawn(async move {
                        let (mut s, _) = listener.accept().await.unwrap();
                        let _ = s.write_all(b"220 mx.test ready\r\n").await;
                        let _ = s.write_all(&junk).await;
                        // End of input: the client reads what it got, then EOF.
                        let _ = s.shutdown().await;
                        let mut sink = Vec::new();
                        let _ = s.read_to_end(&mut sink).await;
                    });
                    let short = Timeouts {
                        command: Duration::from_millis(500),
                        ..Timeouts::from_secs(5)
                    };
                    if let Ok(mut c) = SmtpClient::connect(addr, None, short).await {
                        if c.ehlo("relay.test").await.is_ok() {
                            let mail = MailParams {
                                from: "billing@acme.test",
                                ..MailParams::default()
                            };
                            let _ = c.send(&mail, &[rcpt("bob@one.test"), rcpt("carol@one.test")], BODY).await;
                        }
                        c.quit().await;
                    }
                    server.abort();
                });
            }
        }
    }
}
