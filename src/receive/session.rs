//! One SMTP session, from greeting to close, on one task: reading, framing
//! commands, pipelining (RFC 2920), timeouts, limits, STARTTLS (RFC 3207)
//! and the commands that need no file of their own (EHLO, HELO, RSET, NOOP,
//! QUIT, VRFY, HELP). MAIL, RCPT, DATA/BDAT and AUTH live in `mail.rs`,
//! `rcpt.rs`, `data.rs` and `auth.rs`.
//!
//! Input: bytes from an untrusted client. Commands are framed here, one LF-
//! terminated line at a time, never longer than [`MAX_LINE`]; only complete
//! lines reach smtp-proto's parser, so an over-long line is refused as a
//! whole and its tail is never read as a command. Everything the client
//! sent after STARTTLS in the same packet is discarded (CVE-2011-0411).
//!
//! Pipelining: every complete command in the input is handled in order and
//! its reply appended to one output buffer, which is written in one go when
//! the input runs dry, so a pipelined MAIL/RCPT/DATA group costs one write.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt as _;
use smtp_proto::Request;
use smtp_proto::request::receiver::{DataReceiver, DummyDataReceiver};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;

use super::ReceiveContext;
use super::admission::ConnSlot;
use super::auth::SaslState;
use crate::config::{AuthMode, ListenerConfig, TenantConfig, TlsMode};
use crate::envelope::{Envelope, QueueId, Recipient};
use crate::event::RejectRule;
use crate::reply::{Enhanced, Reply, codes};

/// Longest command line accepted, CRLF included: smtp-proto's limit, well
/// above RFC 5321's 512 octets to leave room for extension parameters.
pub const MAX_LINE: usize = smtp_proto::request::receiver::MAX_LINE_LENGTH;

/// Read size while waiting for commands: small, because thousands of idle
/// sessions each hold one.
const COMMAND_READ: usize = 4096;
/// Read size during DATA and BDAT, where bigger reads mean fewer wakeups.
const DATA_READ: usize = 64 * 1024;
/// Output buffer capacity kept between replies.
const OUT_KEEP: usize = 1024;

/// The client's connection, before or after TLS.
pub(super) type Stream = crate::net::Stream<TlsStream<TcpStream>>;

/// What the client said in EHLO or HELO.
pub(super) struct Helo {
    pub name: String,
    pub esmtp: bool,
}

/// The negotiated TLS parameters, for the Received: field and logs.
pub(super) struct TlsInfo {
    /// `TLSv1.2` or `TLSv1.3`.
    pub version: &'static str,
    pub cipher: String,
}

impl TlsInfo {
    fn of(s: &TlsStream<TcpStream>) -> TlsInfo {
        let conn = s.get_ref().1;
        let version = match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "TLS",
        };
        let cipher = conn
            .negotiated_cipher_suite()
            .map_or_else(|| "unknown".into(), |s| crate::tls::cipher_name(s.suite()));
        TlsInfo { version, cipher }
    }
}

/// The message being received, from DATA or the first BDAT on.
pub(super) struct Body {
    pub id: QueueId,
    /// The Received: field followed by the message as it arrives.
    pub buf: Vec<u8>,
    /// Length of the Received: field at the start of `buf`.
    pub prefix_len: usize,
    /// The message went over `server.max_message_size`: what follows is
    /// read and thrown away, and the end gets 552.
    pub too_big: bool,
    /// `server.max_receiving_bytes` could not hold the message: as with
    /// `too_big`, but the end gets 452.
    pub no_room: bool,
    /// The share of `server.max_receiving_bytes` this message holds.
    pub reservation: super::admission::Reservation,
    pub bdat: bool,
    /// End of the whole transfer (`server.data_timeout`).
    pub deadline: Instant,
}

/// One mail transaction: MAIL, RCPTs and the message.
pub(super) struct Transaction {
    pub envelope: Envelope,
    pub recipients: Vec<Recipient>,
    /// RCPT commands tried, accepted or not: tells "no valid recipients"
    /// from "no RCPT yet".
    pub rcpt_attempts: u32,
    /// MAIL's SIZE= parameter (RFC 1870), 0 when not given.
    pub declared_size: usize,
    pub body: Option<Body>,
    /// End of the whole transaction (`server.transaction_timeout`).
    pub deadline: Instant,
}

/// What the next input bytes are.
pub(super) enum Mode {
    Command,
    /// A SASL response line (after a 334).
    Auth(SaslState),
    /// DATA content up to CRLF.CRLF; `discard` takes over when the message
    /// is over the size limit.
    Data {
        rx: DataReceiver,
        discard: Option<DummyDataReceiver>,
    },
    /// `remaining` bytes of a BDAT chunk of `size` bytes, due by
    /// `deadline`.
    Bdat {
        size: usize,
        remaining: usize,
        last: bool,
        fate: ChunkFate,
        deadline: Instant,
    },
}

/// What becomes of a BDAT chunk's bytes.
pub(super) enum ChunkFate {
    Store,
    /// Read and drop them, then send this reply (RFC 3030 §2: a refused
    /// BDAT's data is still on the wire and must not be taken as commands).
    Discard(Reply),
}

/// Whether a RCPT command line's path is `<postmaster>` (any case).
fn names_bare_postmaster(line: &[u8]) -> bool {
    let Some(open) = line.iter().position(|&b| b == b'<') else {
        return false;
    };
    line.get(open + 1..)
        .and_then(|rest| rest.split(|&b| b == b'>').next())
        .is_some_and(|path| path.eq_ignore_ascii_case(b"postmaster"))
}

/// What the session does after a piece of input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Next {
    Continue,
    Close,
    StartTls,
}

enum ReadOutcome {
    Data,
    Eof,
    Timeout,
    Shutdown,
    Error(io::Error),
}

pub(super) struct Session {
    pub ctx: Arc<ReceiveContext>,
    pub listener: usize,
    /// The client's address; IPv4-mapped IPv6 addresses in IPv4 form.
    pub ip: IpAddr,
    /// The client is in the listener's `trusted_networks`.
    pub trusted: bool,
    pub helo: Option<Helo>,
    pub tls: Option<TlsInfo>,
    /// Index into `config.tenants` after a successful AUTH.
    pub tenant: Option<usize>,
    pub txn: Option<Transaction>,
    pub mode: Mode,
    pub bad_commands: u32,
    /// NOOP, RSET, VRFY, HELP, EHLO and HELO since the last accepted
    /// message (`server.max_junk_commands`).
    pub junk_commands: u32,
    /// Replies not yet written.
    pub out: Vec<u8>,
    /// Inside an over-long line: drop input up to its LF.
    skipping_line: bool,
    /// When the first byte of the command line still incomplete arrived:
    /// the line must be complete within `server.command_timeout` of it.
    line_started: Option<Instant>,
    /// This connection's place in the connection limits.
    slot: Option<ConnSlot>,
}

impl Session {
    /// `trusted`: the client is in the listener's `trusted_networks`.
    pub(super) fn new(
        ctx: Arc<ReceiveContext>,
        listener: usize,
        peer: SocketAddr,
        trusted: bool,
    ) -> Session {
        let ip = peer.ip().to_canonical();
        Session {
            ctx,
            listener,
            ip,
            trusted,
            helo: None,
            tls: None,
            tenant: None,
            txn: None,
            mode: Mode::Command,
            bad_commands: 0,
            junk_commands: 0,
            out: Vec::new(),
            skipping_line: false,
            line_started: None,
            slot: None,
        }
    }

    pub(super) fn listener_cfg(&self) -> &ListenerConfig {
        &self.ctx.config.listeners[self.listener]
    }

    pub(super) fn tenant_cfg(&self) -> Option<&TenantConfig> {
        self.tenant.and_then(|i| self.ctx.config.tenants.get(i))
    }

    pub(super) fn tenant_name(&self) -> Option<String> {
        self.tenant_cfg().map(|t| t.name.clone())
    }

    /// Queues a reply for the next write.
    pub(super) fn reply(&mut self, reply: &Reply) {
        reply.write_to(&mut self.out);
    }

    /// Queues the reply to a protocol error and counts it; past
    /// `server.max_bad_commands` the session ends with 421 instead.
    pub(super) fn error(&mut self, reply: Reply) -> Next {
        self.bad_commands += 1;
        if self.bad_commands > self.ctx.config.server.max_bad_commands {
            tracing::info!(client_ip = %self.ip, "too many bad commands, closing");
            self.reply(&codes::too_many_errors());
            return Next::Close;
        }
        self.reply(&reply);
        Next::Continue
    }

    /// Counts a command that moves no mail (NOOP, RSET, ...); past
    /// `server.max_junk_commands` since the last accepted message the
    /// session ends with 421, so it cannot be held open forever.
    fn junk(&mut self) -> Option<Next> {
        self.junk_commands += 1;
        if self.junk_commands > self.ctx.config.server.max_junk_commands {
            tracing::info!(client_ip = %self.ip, "too many commands without a message, closing");
            self.reply(&Reply::new(
                421,
                Enhanced(4, 7, 0),
                "Too many commands without sending a message, closing the connection",
            ));
            return Some(Next::Close);
        }
        None
    }

    /// The client logged in: its connection leaves the strangers' limits.
    pub(super) fn logged_in(&mut self) {
        if let Some(slot) = self.slot.as_mut() {
            slot.logged_in();
        }
    }

    /// Runs the session to its end. `slot` is this connection's place in
    /// the connection limits, given back when the session ends.
    pub(super) async fn run(mut self, tcp: TcpStream, slot: ConnSlot) {
        self.slot = Some(slot);
        let command_timeout = self.ctx.config.server.command_timeout.as_duration();
        let mut stream = if self.listener_cfg().tls == TlsMode::Implicit {
            match self.handshake(tcp, command_timeout).await {
                Some(s) => s,
                None => return,
            }
        } else {
            Stream::Plain(tcp)
        };
        // `limits.ip_connections`: refused in the protocol (inside TLS on
        // an implicit-TLS port), then closed.
        if let Err(e) = self.ctx.rate_limits.ip_connection(self.ip).await {
            tracing::info!(client_ip = %self.ip, limit = %e, "connection refused: rate limit");
            let reply = e.connect_reply();
            self.reject_event(RejectRule::RateLimitIpConnections, &reply, "", None);
            self.reply(&reply);
            let _ = self.flush(&mut stream).await;
            let _ = tokio::time::timeout(Duration::from_secs(5), stream.shutdown()).await;
            return;
        }
        let greeting = format!("220 {} ESMTP herald\r\n", self.ctx.config.server.hostname);
        self.out.extend_from_slice(greeting.as_bytes());

        let mut inbuf: Vec<u8> = Vec::new();
        loop {
            let (used, step) = match AssertUnwindSafe(self.process(&inbuf)).catch_unwind().await {
                Ok(done) => done,
                Err(panic) => (inbuf.len(), self.internal_error(panic.as_ref())),
            };
            inbuf.drain(..used);
            self.track_line_start(used, inbuf.is_empty());
            match step {
                Next::Continue => {}
                Next::Close => {
                    let _ = self.flush(&mut stream).await;
                    let _ = tokio::time::timeout(Duration::from_secs(5), stream.shutdown()).await;
                    return;
                }
                Next::StartTls => {
                    if self.flush(&mut stream).await.is_err() {
                        return;
                    }
                    if !inbuf.is_empty() {
                        // Plaintext pipelined after STARTTLS could be an
                        // injection by a man in the middle: drop it.
                        tracing::info!(
                            client_ip = %self.ip,
                            bytes = inbuf.len(),
                            "discarding input pipelined after STARTTLS"
                        );
                        inbuf = Vec::new();
                    }
                    let Stream::Plain(tcp) = std::mem::replace(&mut stream, Stream::Gone) else {
                        return;
                    };
                    match self.handshake(tcp, command_timeout).await {
                        Some(s) => stream = s,
                        None => return,
                    }
                    // RFC 3207 §4.2: forget everything learnt before TLS.
                    self.helo = None;
                    self.tenant = None;
                    self.txn = None;
                    self.mode = Mode::Command;
                    continue;
                }
            }
            if self.flush(&mut stream).await.is_err() {
                return;
            }
            // An idle session keeps only a small buffer.
            if inbuf.is_empty() && inbuf.capacity() > 2 * COMMAND_READ {
                inbuf = Vec::new();
            }
            match self.read_more(&mut stream, &mut inbuf).await {
                ReadOutcome::Data => {}
                ReadOutcome::Eof => {
                    tracing::debug!(client_ip = %self.ip, "client closed the connection");
                    return;
                }
                ReadOutcome::Error(e) => {
                    tracing::debug!(client_ip = %self.ip, error = %e, "read failed");
                    return;
                }
                ReadOutcome::Timeout => {
                    tracing::info!(client_ip = %self.ip, "timeout, closing");
                    self.reply(&codes::timeout());
                    let _ = self.flush(&mut stream).await;
                    return;
                }
                ReadOutcome::Shutdown => {
                    self.reply(&codes::shutting_down());
                    let _ = self.flush(&mut stream).await;
                    return;
                }
            }
        }
    }

    /// A bug met while handling the client's input: the client is told
    /// (451, so an app tries again later rather than never hearing back),
    /// the operator gets the context, and the session ends, since its state
    /// may be half-updated.
    fn internal_error(&mut self, panic: &(dyn std::any::Any + Send)) -> Next {
        let what = panic
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let queue_id = self
            .txn
            .as_ref()
            .and_then(|t| t.body.as_ref())
            .map(|b| b.id.to_string());
        tracing::error!(
            client_ip = %self.ip,
            tenant = self.tenant_name().as_deref().unwrap_or(""),
            sender = self.txn.as_ref().map_or("", |t| t.envelope.sender.as_str()),
            queue_id = queue_id.as_deref().unwrap_or(""),
            panic = what,
            "internal error in SMTP session; answered 451 and closed"
        );
        self.txn = None;
        self.mode = Mode::Command;
        self.reply(&Reply::new(
            451,
            Enhanced(4, 3, 0),
            "Internal error: the message was not accepted; try again later",
        ));
        Next::Close
    }

    /// Keeps `line_started` for the command line left incomplete after
    /// `used` bytes were handled: a line that started is due within
    /// `command_timeout` of its first byte, however slowly it trickles in.
    fn track_line_start(&mut self, used: usize, nothing_left: bool) {
        let in_line = matches!(self.mode, Mode::Command | Mode::Auth(_))
            && (!nothing_left || self.skipping_line);
        self.line_started = if !in_line {
            None
        } else if used > 0 && !self.skipping_line {
            // Whole lines were taken: what is left began in the last read.
            Some(Instant::now())
        } else {
            self.line_started.or_else(|| Some(Instant::now()))
        };
    }

    /// TLS handshake within `limit`; `None` when it fails (logged).
    async fn handshake(&mut self, tcp: TcpStream, limit: Duration) -> Option<Stream> {
        let acceptor = self.ctx.tls.clone()?;
        // Boxed: the handshake state is large and would otherwise sit in
        // every session's future, idle or not.
        match tokio::time::timeout(limit, Box::pin(acceptor.accept(tcp))).await {
            Ok(Ok(tls)) => {
                let info = TlsInfo::of(&tls);
                tracing::debug!(client_ip = %self.ip, version = info.version, cipher = %info.cipher, "TLS established");
                self.ctx.reporter.metrics().tls_in.inc(info.version);
                self.tls = Some(info);
                Some(Stream::Tls(Box::new(tls)))
            }
            Ok(Err(e)) => {
                tracing::info!(client_ip = %self.ip, error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                tracing::info!(client_ip = %self.ip, "TLS handshake timed out");
                None
            }
        }
    }

    /// Writes the queued replies in one go.
    async fn flush(&mut self, stream: &mut Stream) -> io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let limit = self.ctx.config.server.command_timeout.as_duration();
        let result = tokio::time::timeout(limit, async {
            stream.write_all(&self.out).await?;
            stream.flush().await
        })
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()));
        self.out.clear();
        self.out.shrink_to(OUT_KEEP);
        result
    }

    /// Waits for more input within the deadline of the current mode.
    async fn read_more(&mut self, stream: &mut Stream, inbuf: &mut Vec<u8>) -> ReadOutcome {
        let server = &self.ctx.config.server;
        let now = Instant::now();
        let command_timeout = server.command_timeout.as_duration();
        let mut deadline = now + command_timeout;
        if let Some(started) = self.line_started {
            deadline = deadline.min(started + command_timeout);
        }
        if let Some(txn) = &self.txn {
            deadline = deadline.min(txn.deadline);
        }
        let in_data = matches!(self.mode, Mode::Data { .. } | Mode::Bdat { .. });
        if in_data && let Some(body) = self.txn.as_ref().and_then(|t| t.body.as_ref()) {
            deadline = deadline.min(body.deadline);
        }
        if let Mode::Bdat { deadline: d, .. } = &self.mode {
            deadline = deadline.min(*d);
        }
        let want = if in_data { DATA_READ } else { COMMAND_READ };
        if inbuf.capacity() - inbuf.len() < want / 2 {
            inbuf.reserve(want);
        }
        // Shutdown lets a transaction in progress finish; an idle session
        // is told at once.
        let idle = matches!(self.mode, Mode::Command) && self.txn.is_none();
        let ctx = Arc::clone(&self.ctx);
        tokio::select! {
            biased;
            _ = ctx.hard_stop.cancelled() => ReadOutcome::Shutdown,
            _ = ctx.shutdown.cancelled(), if idle => ReadOutcome::Shutdown,
            r = tokio::time::timeout_at(deadline, stream.read_buf(inbuf)) => match r {
                Err(_) => ReadOutcome::Timeout,
                Ok(Ok(0)) => ReadOutcome::Eof,
                Ok(Ok(_)) => ReadOutcome::Data,
                Ok(Err(e)) => ReadOutcome::Error(e),
            },
        }
    }

    /// Handles as much of `input` as forms complete units (command lines,
    /// SASL lines, message data). Returns the bytes used and what next.
    async fn process(&mut self, input: &[u8]) -> (usize, Next) {
        let mut pos = 0;
        loop {
            let rest = &input[pos..];
            let step = match &mut self.mode {
                Mode::Command | Mode::Auth(_) => {
                    let Some(lf) = rest.iter().position(|&b| b == b'\n') else {
                        if rest.len() >= MAX_LINE {
                            // Keep nothing of an over-long line; its end
                            // gets the reply.
                            self.skipping_line = true;
                            return (input.len(), Next::Continue);
                        }
                        return (pos, Next::Continue);
                    };
                    let line = &rest[..=lf];
                    pos += lf + 1;
                    if self.skipping_line || line.len() > MAX_LINE {
                        self.skipping_line = false;
                        self.mode = Mode::Command;
                        self.error(codes::line_too_long())
                    } else if let Mode::Auth(state) = &self.mode {
                        let state = state.clone();
                        self.mode = Mode::Command;
                        self.sasl_line(state, line).await
                    } else {
                        self.command(line).await
                    }
                }
                Mode::Data { rx, discard } => {
                    let Some(body) = self.txn.as_mut().and_then(|t| t.body.as_mut()) else {
                        // Cannot happen: DATA mode is entered with a body.
                        self.mode = Mode::Command;
                        self.reply(&codes::local_error());
                        continue;
                    };
                    let mut it = rest.iter();
                    let done = match discard {
                        Some(d) => d.ingest(&mut it),
                        None => {
                            let done = rx.ingest(&mut it, &mut body.buf);
                            let too_big = body.buf.len() - body.prefix_len
                                > self.ctx.config.server.max_message_size.0 as usize;
                            let no_room =
                                !too_big && !body.reservation.grow_to(body.buf.capacity());
                            if too_big || no_room {
                                // Over a limit: read on to the end, keep nothing.
                                body.too_big = too_big;
                                body.no_room = no_room;
                                body.buf.truncate(body.prefix_len);
                                body.buf.shrink_to_fit();
                                *discard = Some(DummyDataReceiver::new_data(rx));
                            }
                            done
                        }
                    };
                    pos += rest.len() - it.as_slice().len();
                    if !done {
                        return (pos, Next::Continue);
                    }
                    self.mode = Mode::Command;
                    self.finish_message_boxed().await
                }
                Mode::Bdat {
                    size,
                    remaining,
                    last,
                    fate,
                    ..
                } => {
                    let n = (*remaining).min(rest.len());
                    if let ChunkFate::Store = fate
                        && let Some(body) = self.txn.as_mut().and_then(|t| t.body.as_mut())
                    {
                        body.buf.extend_from_slice(&rest[..n]);
                    }
                    pos += n;
                    *remaining -= n;
                    if *remaining > 0 {
                        return (pos, Next::Continue);
                    }
                    let (size, last) = (*size, *last);
                    let Mode::Bdat { fate, .. } = std::mem::replace(&mut self.mode, Mode::Command)
                    else {
                        unreachable!("matched above")
                    };
                    match fate {
                        ChunkFate::Discard(reply) => self.error(reply),
                        ChunkFate::Store if last => self.finish_message_boxed().await,
                        ChunkFate::Store => {
                            self.reply(&Reply::new(
                                250,
                                Enhanced(2, 0, 0),
                                format!("Ok: {size} octets received"),
                            ));
                            Next::Continue
                        }
                    }
                }
            };
            if step != Next::Continue {
                return (pos, step);
            }
        }
    }

    /// The end of a message, on the heap: policy, signing and the spool
    /// write make a large future, which an idle session should not carry.
    async fn finish_message_boxed(&mut self) -> Next {
        Box::pin(self.finish_message()).await
    }

    /// One command line, LF included.
    async fn command(&mut self, line: &[u8]) -> Next {
        let request = match Request::parse(&mut line.iter()) {
            Ok(r) => r.into_owned(),
            Err(e) => return self.parse_error(e),
        };
        let junk = matches!(
            request,
            Request::Ehlo { .. }
                | Request::Helo { .. }
                | Request::Rset
                | Request::Noop { .. }
                | Request::Vrfy { .. }
                | Request::Help { .. }
        );
        if junk && let Some(step) = self.junk() {
            return step;
        }
        match request {
            Request::Ehlo { host } => self.ehlo(host, true),
            Request::Helo { host } => self.ehlo(host, false),
            Request::Mail { from } => self.mail_from(from).await,
            Request::Rcpt { mut to } => {
                // smtp-proto reads a path without a domain as empty; RFC
                // 5321 §4.1.1.3 wants a bare <postmaster> accepted.
                if to.address.is_empty() && names_bare_postmaster(line) {
                    to.address = "postmaster".to_string();
                }
                self.rcpt_to(to).await
            }
            Request::Data => self.data(),
            Request::Bdat {
                chunk_size,
                is_last,
            } => self.bdat(chunk_size, is_last),
            Request::Auth {
                mechanism,
                initial_response,
            } => self.auth(mechanism, &initial_response).await,
            Request::StartTls => self.starttls(),
            Request::Rset => {
                self.txn = None;
                self.reply(&codes::reset_ok());
                Next::Continue
            }
            Request::Noop { .. } => {
                self.reply(&codes::ok());
                Next::Continue
            }
            Request::Quit => {
                self.reply(&codes::bye());
                Next::Close
            }
            // RFC 5321 §3.5.3: 252 when we will not say whether a mailbox
            // exists, which for a relay is always.
            Request::Vrfy { .. } => {
                self.reply(&Reply::new(
                    252,
                    Enhanced(2, 5, 0),
                    "Cannot verify the address, but will accept the message and attempt delivery",
                ));
                Next::Continue
            }
            Request::Help { .. } => {
                self.reply(&Reply::new(
                    214,
                    Enhanced(2, 0, 0),
                    "herald: EHLO HELO AUTH STARTTLS MAIL RCPT DATA BDAT RSET NOOP VRFY HELP QUIT",
                ));
                Next::Continue
            }
            Request::Expn { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. }
            | Request::Lhlo { .. } => self.error(codes::not_implemented(&format!(
                "{} is not implemented",
                request.name()
            ))),
        }
    }

    /// The reply to a line smtp-proto could not parse.
    fn parse_error(&mut self, e: smtp_proto::Error) -> Next {
        use smtp_proto::Error as E;
        let reply = match e {
            E::UnknownCommand => codes::unknown_command(),
            E::InvalidSenderAddress => Reply::new(
                501,
                Enhanced(5, 1, 7),
                "The sender address is not valid: write MAIL FROM:<user@domain>",
            ),
            E::InvalidRecipientAddress => Reply::new(
                501,
                Enhanced(5, 1, 3),
                "The recipient address is not valid: write RCPT TO:<user@domain>",
            ),
            E::SyntaxError { syntax } => Reply::new(
                501,
                Enhanced(5, 5, 4),
                format!("Syntax error: expected {syntax}"),
            ),
            E::InvalidParameter { param } => Reply::new(
                501,
                Enhanced(5, 5, 4),
                format!("The value of the {param} parameter is not valid"),
            ),
            // RFC 5321 §4.1.1.11: 555 for an unrecognized MAIL/RCPT parameter.
            E::UnsupportedParameter { param } => Reply::new(
                555,
                Enhanced(5, 5, 4),
                format!("The {param} parameter is not supported"),
            ),
            E::ResponseTooLong => codes::line_too_long(),
            E::NeedsMoreData { .. } | E::InvalidResponse { .. } => {
                codes::syntax("Syntax error in command")
            }
        };
        self.error(reply)
    }

    fn ehlo(&mut self, host: String, esmtp: bool) -> Next {
        // RFC 5321 §4.1.4: EHLO/HELO in a session resets the transaction.
        self.txn = None;
        let hostname = &self.ctx.config.server.hostname;
        let mut text = format!("{hostname} Hello {}", host.escape_default());
        if esmtp {
            for cap in self.capabilities() {
                text.push('\n');
                text.push_str(&cap);
            }
        }
        // RFC 2034 §3: EHLO and HELO replies carry no enhanced code.
        self.reply(&Reply {
            code: 250,
            enhanced: None,
            text,
        });
        self.helo = Some(Helo { name: host, esmtp });
        Next::Continue
    }

    /// The EHLO keywords for this session's state.
    pub(super) fn capabilities(&self) -> Vec<String> {
        let l = self.listener_cfg();
        let mut caps = vec![
            "PIPELINING".to_string(),
            format!("SIZE {}", self.ctx.config.server.max_message_size.0),
            "8BITMIME".into(),
            "SMTPUTF8".into(),
            "ENHANCEDSTATUSCODES".into(),
            "DSN".into(),
            "CHUNKING".into(),
        ];
        if l.tls == TlsMode::Starttls && self.tls.is_none() && self.ctx.tls.is_some() {
            caps.push("STARTTLS".into());
        }
        if self.tls.is_some() {
            caps.push("REQUIRETLS".into());
        }
        if self.auth_offered() {
            caps.push("AUTH PLAIN LOGIN".into());
        }
        caps
    }

    /// AUTH is offered over TLS, or in clear where the listener allows it.
    pub(super) fn auth_offered(&self) -> bool {
        let l = self.listener_cfg();
        l.auth != AuthMode::None && (self.tls.is_some() || l.allow_plaintext_auth)
    }

    fn starttls(&mut self) -> Next {
        if self.tls.is_some() {
            return self.error(codes::bad_sequence("TLS is already active"));
        }
        if self.listener_cfg().tls != TlsMode::Starttls {
            return self.error(codes::not_implemented(
                "STARTTLS is not offered on this port",
            ));
        }
        if self.ctx.tls.is_none() {
            self.reply(&Reply::new(
                454,
                Enhanced(4, 7, 0),
                "TLS not available due to temporary reason",
            ));
            return Next::Continue;
        }
        self.reply(&codes::ready_tls());
        Next::StartTls
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a panic in a command handler leads to: a 451 for the client,
    /// the transaction dropped, the session closed.
    async fn test_context(dir: &tempfile::TempDir) -> Arc<ReceiveContext> {
        let d = dir.path().display();
        let config = Arc::new(
            crate::config::Config::from_toml_str(&format!(
                "[server]\nspool_dir = \"{d}/spool\"\n[[listener]]\naddress = \"127.0.0.1:0\"\ntls = \"none\"\nauth = \"none\"\ntrusted_networks = [\"127.0.0.0/8\"]\n[events]\nlog = \"{d}/events.jsonl\"\n"
            ))
            .unwrap(),
        );
        let (reporter, _task) = crate::report::Reporter::start(&config.events.log)
            .await
            .unwrap();
        let (jobs, _rx) = tokio::sync::mpsc::unbounded_channel();
        let queue = crate::queue::Queue::open(&config, reporter.clone(), jobs).unwrap();
        let dns = crate::dns::Dns::new(&config.dns).unwrap();
        Arc::new(ReceiveContext::new(
            config,
            queue,
            dns,
            reporter,
            None,
            tokio_util::sync::CancellationToken::new(),
        ))
    }

    #[tokio::test]
    async fn a_bug_answers_451_and_closes() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = test_context(&dir).await;
        let mut s = Session::new(ctx, 0, "192.0.2.7:4000".parse().unwrap(), false);
        s.mode = Mode::Auth(SaslState::LoginUsername);
        let payload: Box<dyn std::any::Any + Send> = Box::new("index out of bounds");
        assert_eq!(s.internal_error(payload.as_ref()), Next::Close);
        assert_eq!(
            String::from_utf8(s.out.clone()).unwrap(),
            "451 4.3.0 Internal error: the message was not accepted; try again later\r\n"
        );
        assert!(s.txn.is_none());
        assert!(matches!(s.mode, Mode::Command));
    }

    /// An idle session holds its whole future: keep it small (thousands of
    /// idle connections each hold one).
    #[tokio::test]
    async fn an_idle_sessions_future_is_small() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = test_context(&dir).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let slot = ctx
            .limits
            .acquire("127.0.0.1".parse().unwrap(), true)
            .unwrap();
        let s = Session::new(ctx, 0, "127.0.0.1:4000".parse().unwrap(), true);
        let run = s.run(tcp, slot);
        let size = std::mem::size_of_val(&run);
        assert!(size < 4096, "a session's future takes {size} bytes");
    }

    #[test]
    fn bare_postmaster_paths() {
        assert!(names_bare_postmaster(b"RCPT TO:<postmaster>\r\n"));
        assert!(names_bare_postmaster(
            b"rcpt to:<PostMaster> NOTIFY=NEVER\r\n"
        ));
        assert!(!names_bare_postmaster(b"RCPT TO:<>\r\n"));
        assert!(!names_bare_postmaster(
            b"RCPT TO:<postmaster@x.example>\r\n"
        ));
        assert!(!names_bare_postmaster(
            "RCPT TO:<pöstmaster>\r\n".as_bytes()
        ));
        assert!(!names_bare_postmaster(b"RCPT TO:postmaster\r\n"));
    }
}
