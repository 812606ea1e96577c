//! DATA (RFC 5321 §4.1.1.4) and BDAT (RFC 3030 CHUNKING): taking in the
//! message, then turning it into what the queue stores, and the 250 that
//! carries its queue id only once the queue has it on disk.
//!
//! DATA content is un-dot-stuffed by smtp-proto's `DataReceiver`, which ends
//! a message only at CRLF.CRLF; `\n.\r\n`, `\r\n.\n` and the like stay
//! content. Any bare LF or CR then refuses the whole message (SMTP
//! smuggling defence). BDAT chunks are counted bytes; the same check holds,
//! since herald offers no BINARYMIME and every body is text.
//!
//! A message over `server.max_message_size` is read to its end and dropped
//! (552 5.3.4), so the session stays in step with the client.
//!
//! The stored message is built in one buffer: the Received: field is written
//! first, the content is appended as it arrives, and a missing Message-ID:
//! or Date: is inserted after the Received: field at the end.

use bytes::Bytes;
use smtp_proto::request::receiver::DataReceiver;
use tokio::time::Instant;

use super::mail::too_big;
use super::message::{self, Protocol, TraceInfo};
use super::session::{Body, ChunkFate, Mode, Next, Session};
use crate::clock::unix_now;
use crate::envelope::QueueId;
use crate::event::RejectRule;
use crate::policy::{self, Verdict};
use crate::queue::history::Claim;
use crate::reply::{Enhanced, Reply, codes};
use crate::report::{Event, EventKind};

/// Room for the Received: field and any header fields herald adds.
const HEADER_ROOM: usize = 512;
/// First allocation for a message of unknown size.
const INITIAL_BODY: usize = 8 * 1024;

/// The refusal of a message with a line end other than CRLF.
pub fn bare_line_end() -> Reply {
    Reply::new(
        550,
        Enhanced(5, 5, 2),
        "Message refused: it contains a bare LF or CR; every line must end with CRLF (SMTP smuggling protection)",
    )
}

/// The refusal of a message with a NUL byte: receivers that strip NULs
/// would see a different message (and may end it early), so it is not
/// relayed (RFC 5321 §4.1.1.4 forbids it in mail data outside BINARYMIME).
pub fn nul_byte() -> Reply {
    Reply::new(
        550,
        Enhanced(5, 6, 0),
        "Message refused: it contains a NUL byte, which SMTP mail must not carry; encode binary content (base64) in a MIME part",
    )
}

/// Too many messages are being received at once for
/// `server.max_receiving_bytes`.
fn no_room() -> Reply {
    codes::insufficient_storage(
        "Insufficient system storage: the server is receiving too much mail at once, try again in a moment",
    )
}

fn no_valid_recipients() -> Reply {
    Reply::new(554, Enhanced(5, 5, 1), "No valid recipients")
}

impl Session {
    /// Why no message may start now, if so; `None` when one may.
    fn message_refusal(&self) -> Option<Reply> {
        let Some(txn) = &self.txn else {
            return Some(codes::bad_sequence("Send MAIL first"));
        };
        if txn.recipients.is_empty() {
            return Some(if txn.rcpt_attempts > 0 {
                no_valid_recipients()
            } else {
                codes::bad_sequence("Send RCPT first")
            });
        }
        None
    }

    pub(super) fn data(&mut self) -> Next {
        if let Some(reply) = self.message_refusal() {
            return self.error(reply);
        }
        if self.txn.as_ref().is_some_and(|t| t.body.is_some()) {
            return self.error(codes::bad_sequence(
                "DATA cannot follow BDAT in the same transaction",
            ));
        }
        let body = match self.new_body(false) {
            Ok(body) => body,
            Err(reply) => {
                self.end_transaction(RejectRule::ReceivingBudget, &reply);
                self.reply(&reply);
                return Next::Continue;
            }
        };
        let mut rx = DataReceiver::new();
        let Some(txn) = self.txn.as_mut() else {
            return Next::Continue;
        };
        let body = txn.body.insert(body);
        // smtp-proto only sees ".CRLF" as the end after a CRLF: feed it the
        // CRLF that ended the DATA command, then drop that from the body, so
        // that an empty message (DATA, then ".") ends where it should.
        rx.ingest(&mut b"\r\n".iter(), &mut body.buf);
        body.buf.truncate(body.prefix_len);
        self.mode = Mode::Data { rx, discard: None };
        self.reply(&codes::start_data());
        Next::Continue
    }

    pub(super) fn bdat(&mut self, size: usize, last: bool) -> Next {
        let max = self.ctx.config.server.max_message_size.0;
        let deadline = Instant::now() + self.ctx.config.server.data_timeout.as_duration();
        // RFC 3030 §2 wants a refused chunk read and dropped, but an absurd
        // chunk, or a refused one from a client that has neither logged in
        // nor is trusted, may be endless bytes meant to hold the session:
        // refuse it and close.
        let stranger = self.tenant.is_none() && !self.trusted;
        let absurd = size as u64 > max.saturating_mul(4);
        if absurd || (stranger && (self.txn.is_none() || size as u64 > max)) {
            let reply = if size as u64 > max {
                too_big(max)
            } else {
                codes::bad_sequence("Send MAIL first")
            };
            if let Some(txn) = self.txn.take() {
                self.reject_event(
                    RejectRule::MessageTooLarge,
                    &reply,
                    &txn.envelope.sender,
                    None,
                );
            }
            tracing::info!(client_ip = %self.ip, size, "BDAT refused, closing");
            self.reply(&reply);
            return Next::Close;
        }
        let fate = if let Some(reply) = self.message_refusal() {
            ChunkFate::Discard(reply)
        } else {
            if self.txn.as_ref().is_some_and(|t| t.body.is_none()) {
                match self.new_body(true) {
                    Ok(body) => {
                        if let Some(txn) = self.txn.as_mut() {
                            txn.body = Some(body);
                        }
                    }
                    Err(reply) => {
                        self.end_transaction(RejectRule::ReceivingBudget, &reply);
                        self.mode = Mode::Bdat {
                            size,
                            remaining: size,
                            last,
                            fate: ChunkFate::Discard(reply),
                            deadline,
                        };
                        return Next::Continue;
                    }
                }
            }
            let received = self
                .txn
                .as_ref()
                .and_then(|t| t.body.as_ref())
                .map_or(0, |b| b.buf.len() - b.prefix_len);
            if (received as u64).saturating_add(size as u64) > max {
                // RFC 3030 §2: after a refused chunk the transaction has
                // failed; later chunks already in the pipeline are read and
                // refused (no transaction).
                let reply = too_big(max);
                if let Some(txn) = self.txn.take() {
                    self.reject_event(
                        RejectRule::MessageTooLarge,
                        &reply,
                        &txn.envelope.sender,
                        None,
                    );
                }
                ChunkFate::Discard(reply)
            } else if self
                .txn
                .as_mut()
                .and_then(|t| t.body.as_mut())
                .is_some_and(|b| {
                    b.buf.reserve(size);
                    if b.reservation.grow_to(b.buf.capacity()) {
                        return true;
                    }
                    b.buf = Vec::new();
                    false
                })
            {
                ChunkFate::Store
            } else {
                let reply = no_room();
                self.end_transaction(RejectRule::ReceivingBudget, &reply);
                ChunkFate::Discard(reply)
            }
        };
        self.mode = Mode::Bdat {
            size,
            remaining: size,
            last,
            fate,
            deadline,
        };
        Next::Continue
    }

    /// Ends the transaction with a `rejected` event for `reply`, which the
    /// caller sends (at once for DATA, after the chunk for BDAT).
    fn end_transaction(&mut self, rule: RejectRule, reply: &Reply) {
        if let Some(txn) = self.txn.take() {
            tracing::info!(client_ip = %self.ip, rule = %rule, reply = %reply, "message refused");
            self.reject_event(rule, reply, &txn.envelope.sender, None);
        }
    }

    /// Starts the message buffer with its Received: field.
    /// `Err(452)` when `server.max_receiving_bytes` has no room for it.
    fn new_body(&self, bdat: bool) -> Result<Body, Reply> {
        let id = QueueId::generate();
        let server = &self.ctx.config.server;
        let (envelope, recipients, declared) = match &self.txn {
            Some(t) => (Some(&t.envelope), t.recipients.as_slice(), t.declared_size),
            None => (None, &[][..], 0),
        };
        // SIZE= is the client's estimate: allocate it once (within the
        // limit) rather than grow the buffer step by step.
        let expected = if declared > 0 { declared } else { INITIAL_BODY }
            .min(server.max_message_size.0 as usize);
        let reservation = self
            .ctx
            .receiving
            .reserve(expected + HEADER_ROOM)
            .ok_or_else(no_room)?;
        let mut buf = Vec::with_capacity(expected + HEADER_ROOM);
        let id_text = id.to_string();
        let date = crate::clock::rfc5322_now();
        message::write_received(
            &mut buf,
            &TraceInfo {
                helo: self.helo.as_ref().map_or("", |h| h.name.as_str()),
                client_ip: self.ip,
                hostname: &server.hostname,
                protocol: Protocol {
                    esmtp: self.helo.as_ref().is_some_and(|h| h.esmtp),
                    tls: self.tls.is_some(),
                    authenticated: self.tenant.is_some(),
                    utf8: envelope.is_some_and(|e| e.smtputf8),
                },
                tls: self.tls.as_ref().map(|t| (t.version, t.cipher.as_str())),
                queue_id: &id_text,
                single_recipient: match recipients {
                    [one] => Some(one.address.as_str()),
                    _ => None,
                },
                date: &date,
            },
        );
        Ok(Body {
            id,
            prefix_len: buf.len(),
            buf,
            too_big: false,
            no_room: false,
            reservation,
            bdat,
            deadline: Instant::now() + server.data_timeout.as_duration(),
        })
    }

    /// The message is complete (end of DATA, or BDAT LAST): check it, store
    /// it, reply. The transaction ends here whatever the outcome.
    pub(super) async fn finish_message(&mut self) -> Next {
        let started = Instant::now();
        let Some(mut txn) = self.txn.take() else {
            self.reply(&codes::local_error());
            return Next::Continue;
        };
        let Some(body) = txn.body.take() else {
            self.reply(&codes::local_error());
            return Next::Continue;
        };
        let Body {
            id,
            mut buf,
            prefix_len,
            too_big: over,
            no_room: short,
            bdat,
            reservation,
            ..
        } = body;
        // Held until the queue has the message (it then counts it itself;
        // the spool writes the same buffer, it does not copy it).
        let _reservation = reservation;
        let sender = txn.envelope.sender.clone();

        if short {
            let reply = no_room();
            tracing::info!(client_ip = %self.ip, queue_id = %id, "message refused: server.max_receiving_bytes reached");
            self.reject_event(RejectRule::ReceivingBudget, &reply, &sender, None);
            self.reply(&reply);
            return Next::Continue;
        }

        if over {
            let reply = too_big(self.ctx.config.server.max_message_size.0);
            tracing::info!(client_ip = %self.ip, queue_id = %id, "message refused: too large");
            self.reject_event(RejectRule::MessageTooLarge, &reply, &sender, None);
            self.reply(&reply);
            return Next::Continue;
        }
        if let Some(at) = message::find_bare_line_end(&buf[prefix_len..]) {
            let reply = bare_line_end();
            tracing::info!(client_ip = %self.ip, queue_id = %id, offset = at, "message refused: bare LF or CR");
            self.reject_event(RejectRule::BareLineEnd, &reply, &sender, None);
            self.reply(&reply);
            // What follows may be a smuggled transaction (a sender that
            // ended DATA at "\n.\r\n" or "\r\n.\r\r\n"): never read it
            // as commands. Postfix's smtpd_forbid_bare_newline does the same.
            return Next::Close;
        }
        if let Some(at) = buf[prefix_len..].iter().position(|&b| b == 0) {
            let reply = nul_byte();
            tracing::info!(client_ip = %self.ip, queue_id = %id, offset = at, "message refused: NUL byte");
            self.reject_event(RejectRule::NulByte, &reply, &sender, None);
            self.reply(&reply);
            return Next::Continue;
        }
        // A BDAT body need not end with a line end; the queue stores what
        // goes on the wire after DATA, which must.
        if bdat && buf.len() > prefix_len && !buf.ends_with(b"\r\n") {
            buf.extend_from_slice(b"\r\n");
        }

        if self.is_bounce_listener() {
            return self.bounce_message(&txn.recipients, &buf[prefix_len..]);
        }

        // RFC 5321 §4.5.3.1.6: no line over 998 octets may reach an MX, which
        // would refuse the whole message after herald said 250. Re-encode
        // before signing, so the signature covers what is sent.
        let mut notes = Vec::new();
        match super::longlines::fix_long_lines(&buf[prefix_len..]) {
            Ok(None) => {}
            Ok(Some(fixed)) => {
                tracing::info!(client_ip = %self.ip, queue_id = %id, "long lines re-encoded");
                buf.truncate(prefix_len);
                buf.extend_from_slice(&fixed);
                notes.push(
                    "lines longer than 998 octets were re-encoded (quoted-printable, folded or rewrapped) so that receivers accept the message".to_string(),
                );
            }
            Err(e) => {
                let reply = Reply::new(554, Enhanced(5, 6, 3), e.reply_text());
                tracing::info!(client_ip = %self.ip, queue_id = %id, line = e.line, length = e.length, "message refused: a line over 998 octets cannot be re-encoded");
                self.reject_event(RejectRule::LineTooLong, &reply, &sender, None);
                self.reply(&reply);
                return Next::Continue;
            }
        }

        let info = message::inspect_headers(&buf[prefix_len..]);
        let id_text = id.to_string();
        let (added, message_id) = message::missing_fields(
            &info,
            &id_text,
            &self.ctx.config.server.hostname,
            &crate::clock::rfc5322_now(),
        );
        if !added.is_empty() {
            buf.splice(prefix_len..prefix_len, added);
        }
        txn.envelope.message_id = Some(message_id);
        txn.envelope.received_at = unix_now();
        // Only a Message-ID the app chose says "the same message again".
        let app_message_id = info.message_id.clone();

        let policy::Outcome {
            mut verdict,
            spam_score,
            mut warnings,
            headers,
        } = self.ctx.policy.check(&txn.envelope, &buf).await;
        for warning in &warnings {
            tracing::warn!(client_ip = %self.ip, queue_id = %id, warning = %warning, "policy warning");
        }
        if verdict == Verdict::Accept {
            // DKIM signing comes last, over the message exactly as it will be
            // queued (herald's Message-ID:/Date: included); RSA runs off
            // this I/O thread (policy::dkim).
            match self
                .ctx
                .dkim
                .sign_with_headers(&txn.envelope, &headers, std::mem::take(&mut buf))
                .await
            {
                Ok(signed) => buf = signed,
                Err(e) => {
                    tracing::error!(queue_id = %id, error = %e, "cannot DKIM-sign message");
                    verdict = policy::dkim::sign_failed();
                }
            }
        }
        match verdict {
            Verdict::Accept => {}
            Verdict::Tempfail { reply, rule } | Verdict::Reject { reply, rule } => {
                tracing::info!(client_ip = %self.ip, queue_id = %id, rule = %rule, reply = %reply, "message refused by policy");
                let mut e = Event::new(EventKind::Rejected, &sender).with_reply(&reply);
                e.message_id = txn.envelope.message_id.clone();
                e.tenant = txn.envelope.tenant.clone();
                e.client_ip = Some(self.ip);
                e.rule = Some(rule);
                e.permanent = Some(reply.is_permanent());
                self.ctx.reporter.emit(e);
                self.reply(&reply);
                return Next::Continue;
            }
        }

        // The queue may keep the body in memory until it is delivered: do
        // not let it carry a mostly empty allocation along.
        if buf.capacity() - buf.len() > buf.len() / 4 + HEADER_ROOM {
            buf.shrink_to_fit();
        }
        let size = buf.len() as u64;
        let history = self.ctx.queue.history();
        if let Some(mid) = &app_message_id {
            let rcpts = txn.recipients.iter().map(|r| r.address.as_str());
            match history.claim(&txn.envelope, mid, rcpts, id, unix_now()) {
                Claim::New => {}
                Claim::Duplicate(first) => return self.duplicate(&txn.envelope, first, size),
                Claim::InFlight => {
                    self.reply(&Reply::new(
                        451,
                        Enhanced(4, 3, 0),
                        "The first submission of this message (same Message-ID) is still being stored; try again in a moment",
                    ));
                    return Next::Continue;
                }
            }
        }
        let mut event = Event::for_message(EventKind::Received, id, &txn.envelope);
        event.recipients = Some(txn.recipients.iter().map(|r| r.address.clone()).collect());
        event.size = Some(size);
        event.client_ip = Some(self.ip);
        event.spam_score = spam_score;
        warnings.extend(notes);
        if !warnings.is_empty() {
            event.warnings = Some(warnings);
        }
        // Boxed: the spool's future is large and alive only here.
        let stored = Box::pin(self.ctx.queue.enqueue(
            id,
            txn.envelope,
            txn.recipients,
            Bytes::from(buf),
        ))
        .await;
        match stored {
            Ok(()) => {
                if app_message_id.is_some() {
                    self.ctx.queue.history().confirm(id);
                }
                let metrics = self.ctx.reporter.metrics();
                metrics.accept_latency.observe(started.elapsed());
                self.ctx.reporter.emit(event);
                self.junk_commands = 0;
                self.reply(&Reply::new(
                    250,
                    Enhanced(2, 0, 0),
                    format!("Ok: queued as {id}"),
                ));
            }
            Err(e) => {
                // Nothing was promised: the client keeps the message and
                // tries again.
                if app_message_id.is_some() {
                    self.ctx.queue.history().release(id);
                }
                tracing::error!(queue_id = %id, error = %e, "cannot queue message");
                let disk_full = matches!(&e, crate::queue::QueueError::Io(io)
                    if matches!(io.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded));
                self.reply(&if disk_full {
                    codes::insufficient_storage(
                        "Insufficient system storage: the spool disk is full, try again later",
                    )
                } else {
                    codes::local_error()
                });
            }
        }
        Next::Continue
    }

    /// A message whose Message-ID this tenant already submitted within
    /// `[history] idempotency_window`: 250 with the first queue id, and not
    /// sent again (an app that retries after a lost 250 must not mail an
    /// invoice twice).
    fn duplicate(
        &mut self,
        envelope: &crate::envelope::Envelope,
        first: QueueId,
        size: u64,
    ) -> Next {
        tracing::info!(client_ip = %self.ip, queue_id = %first, message_id = envelope.message_id.as_deref().unwrap_or(""), "duplicate submission; not sent again");
        let mut event = Event::for_message(EventKind::Received, first, envelope);
        event.size = Some(size);
        event.client_ip = Some(self.ip);
        event.duplicate = Some(true);
        self.ctx.reporter.emit(event);
        self.reply(&Reply::new(
            250,
            Enhanced(2, 0, 0),
            // "queued as <id>" last, where apps look for the queue id.
            format!(
                "Ok: duplicate Message-ID, accepted before and not sent again; queued as {first}"
            ),
        ));
        Next::Continue
    }
}
