//! MAIL FROM (RFC 5321 §4.1.1.2): who may start a transaction, and with
//! which envelope sender. The first check an app's mis-set SMTP settings
//! meet, so the refusals name the address and the account's allowed
//! patterns ("my SMTP settings fail" is the most common support question).
//!
//! Parameters kept: SIZE (RFC 1870), BODY=8BITMIME (RFC 6152), SMTPUTF8
//! (RFC 6531), RET and ENVID (RFC 3461), AUTH= (RFC 4954, ignored). Others
//! that smtp-proto parses but herald does not advertise are refused with 555
//! rather than silently dropped.
//!
//! Input: a parsed MAIL command from a client; the address is still the
//! client's text.

use smtp_proto::MailFrom;

use super::session::{Next, Session, Transaction};
use crate::clock::unix_now;
use crate::config::senders;
use crate::config::{AuthMode, TenantConfig};
use crate::envelope::{Envelope, Ret};
use crate::event::RejectRule;
use crate::reply::{Enhanced, Reply, codes};
use crate::report::{Event, EventKind};

/// Refusal of a SIZE= or a message over the limit (RFC 1870 §6.1).
pub fn too_big(max: u64) -> Reply {
    Reply::new(
        552,
        Enhanced(5, 3, 4),
        format!("Message size exceeds fixed maximum message size of {max} bytes"),
    )
}

/// Checks the parameters of MAIL (`tls`: the session is encrypted); the
/// reply when one is refused.
pub fn check_parameters(from: &MailFrom<String>, max_size: u64, tls: bool) -> Result<(), Reply> {
    use smtp_proto::*;
    let unsupported = |name: &str| {
        Err(Reply::new(
            555,
            Enhanced(5, 5, 4),
            format!("The {name} parameter is not supported"),
        ))
    };
    if from.flags & MAIL_BODY_BINARYMIME != 0 {
        return unsupported("BODY=BINARYMIME");
    }
    // RFC 8689 §4.1: offered, and taken, only over TLS.
    if from.flags & MAIL_REQUIRETLS != 0 && !tls {
        return Err(Reply::new(
            530,
            Enhanced(5, 7, 10),
            "REQUIRETLS needs an encrypted session: use STARTTLS (or port 465) first",
        ));
    }
    if from.flags & (MAIL_BY_NOTIFY | MAIL_BY_RETURN | MAIL_BY_TRACE) != 0 {
        return unsupported("BY");
    }
    if from.flags & MAIL_CONPERM != 0 {
        return unsupported("CONPERM");
    }
    if from.hold_for != 0 || from.hold_until != 0 {
        return unsupported("HOLDFOR/HOLDUNTIL");
    }
    if from.mt_priority != 0 {
        return unsupported("MT-PRIORITY");
    }
    if from.mtrk.is_some() {
        return unsupported("MTRK");
    }
    if from.solicit.is_some() {
        return unsupported("SOLICIT");
    }
    if from.trans_id.is_some() {
        return unsupported("TRANSID");
    }
    if from.size as u64 > max_size {
        return Err(too_big(max_size));
    }
    check_sender_syntax(&from.address, from.flags & MAIL_SMTPUTF8 != 0)
}

/// The reverse path must be empty or `local@domain`, and ASCII unless the
/// client said SMTPUTF8 (RFC 6531 §3.4).
pub fn check_sender_syntax(address: &str, smtputf8: bool) -> Result<(), Reply> {
    if address.is_empty() {
        return Ok(());
    }
    if !smtputf8 && !address.is_ascii() {
        return Err(Reply::new(
            553,
            Enhanced(5, 6, 7),
            format!(
                "The sender address <{address}> has non-ASCII characters: send MAIL FROM with the SMTPUTF8 parameter"
            ),
        ));
    }
    match address.rsplit_once('@') {
        Some((local, domain)) if !local.is_empty() && !domain.is_empty() => Ok(()),
        _ => Err(Reply::new(
            501,
            Enhanced(5, 1, 7),
            format!("The sender address <{address}> is not valid: write MAIL FROM:<user@domain>"),
        )),
    }
}

/// The refusal of a sender the tenant may not use: names the address, the
/// account and the patterns, so the fix is obvious from the app's log.
pub fn sender_not_allowed(address: &str, tenant: &TenantConfig) -> Reply {
    Reply::new(
        553,
        Enhanced(5, 7, 1),
        format!(
            "Sender address <{address}> is not allowed for account \"{}\"; allowed: {}",
            tenant.name,
            tenant.allowed_senders.join(", ")
        ),
    )
}

/// A tenant's `MAIL FROM:<>`: the null sender marks delivery reports, which
/// herald writes itself; from an app it would be mail nobody can bounce.
pub fn null_sender_refused(tenant: &TenantConfig) -> Reply {
    Reply::new(
        553,
        Enhanced(5, 7, 1),
        format!(
            "The null sender <> is for delivery reports and is not allowed for account \"{}\"; send from an allowed address: {}",
            tenant.name,
            tenant.allowed_senders.join(", ")
        ),
    )
}

impl Session {
    pub(super) async fn mail_from(&mut self, from: MailFrom<String>) -> Next {
        if self.ctx.shutdown.is_cancelled() {
            self.reply(&codes::shutting_down());
            return Next::Close;
        }
        if self.helo.is_none() {
            return self.error(codes::bad_sequence("Send EHLO or HELO first"));
        }
        if self.txn.is_some() {
            return self.error(codes::bad_sequence(
                "A transaction is already open: send RSET to start another",
            ));
        }
        // No open relay: AUTH, or a network the listener trusts.
        if self.tenant.is_none() && !self.trusted && !self.is_bounce_listener() {
            let reply = if self.auth_offered() {
                codes::auth_required()
            } else if self.listener_cfg().auth == AuthMode::None {
                Reply::new(
                    530,
                    Enhanced(5, 7, 0),
                    "Authentication required: this port accepts mail only from its trusted networks",
                )
            } else {
                // AUTH becomes possible after STARTTLS.
                codes::tls_required()
            };
            return self.error(reply);
        }
        let max = self.ctx.config.server.max_message_size.0;
        if let Err(reply) = check_parameters(&from, max, self.tls.is_some()) {
            if reply.code == 552 {
                self.reject_event(RejectRule::MessageTooLarge, &reply, &from.address, None);
            }
            self.reply(&reply);
            return Next::Continue;
        }
        // The reputation guard (see crate::control): a paused tenant's
        // submissions wait for the postmaster.
        if let Some((t, pause)) = self.tenant_cfg().and_then(|t| {
            self.ctx
                .control
                .paused(&t.name)
                .map(|p| (t.name.clone(), p))
        }) {
            let reply = self.ctx.control.pause_reply(&t, &pause);
            tracing::info!(client_ip = %self.ip, tenant = %t, "MAIL refused: tenant paused for reputation");
            let mut e = Event::new(EventKind::Rejected, &from.address).with_reply(&reply);
            e.tenant = Some(t);
            e.client_ip = Some(self.ip);
            e.rule = Some(RejectRule::TenantPaused);
            e.reason = Some(format!("paused: {}", pause.reason));
            e.permanent = Some(reply.is_permanent());
            self.ctx.reporter.emit(e);
            self.reply(&reply);
            return Next::Continue;
        }
        if let Some(t) = self.tenant_cfg()
            && from.address.is_empty()
        {
            let reply = null_sender_refused(t);
            tracing::info!(client_ip = %self.ip, tenant = %t.name, "null sender refused");
            self.reject_event(RejectRule::NullSender, &reply, "", None);
            self.reply(&reply);
            return Next::Continue;
        }
        if let Some(t) = self.tenant_cfg()
            && !senders::allowed(&t.allowed_senders, &from.address)
        {
            let reply = sender_not_allowed(&from.address, t);
            tracing::info!(
                client_ip = %self.ip,
                tenant = %t.name,
                sender = %from.address,
                "sender not allowed"
            );
            self.reject_event(RejectRule::SenderNotAllowed, &reply, &from.address, None);
            self.reply(&reply);
            return Next::Continue;
        }
        // `limits.tenant_messages`: counted when a transaction starts.
        if let Some(t) = self.tenant
            && let Err(e) = self.ctx.rate_limits.tenant_message(t).await
        {
            tracing::info!(client_ip = %self.ip, limit = %e, "MAIL refused: rate limit");
            let reply = e.reply();
            self.reject_event(
                RejectRule::RateLimitTenantMessages,
                &reply,
                &from.address,
                None,
            );
            self.reply(&reply);
            return Next::Continue;
        }

        let declared_size = from.size;
        let ret = if from.flags & smtp_proto::MAIL_RET_FULL != 0 {
            Some(Ret::Full)
        } else if from.flags & smtp_proto::MAIL_RET_HDRS != 0 {
            Some(Ret::Hdrs)
        } else {
            None
        };
        self.txn = Some(Transaction {
            envelope: Envelope {
                sender: from.address,
                tenant: self.tenant_name(),
                message_id: None,
                received_at: unix_now(),
                client_ip: self.ip,
                smtputf8: from.flags & smtp_proto::MAIL_SMTPUTF8 != 0,
                body_8bit: from.flags & smtp_proto::MAIL_BODY_8BITMIME != 0,
                ret,
                env_id: from.env_id,
                require_tls: from.flags & smtp_proto::MAIL_REQUIRETLS != 0,
                ignore_tls_policies: false,
            },
            recipients: Vec::new(),
            rcpt_attempts: 0,
            declared_size,
            body: None,
            deadline: tokio::time::Instant::now()
                + self.ctx.config.server.transaction_timeout.as_duration(),
        });
        self.reply(&codes::sender_ok());
        Next::Continue
    }

    /// Emits a `rejected` event for a refusal an app wants to hear about.
    pub(super) fn reject_event(
        &self,
        rule: RejectRule,
        reply: &Reply,
        sender: &str,
        recipient: Option<&str>,
    ) {
        let mut e = Event::new(EventKind::Rejected, sender).with_reply(reply);
        e.tenant = self.tenant_name();
        e.recipient = recipient.map(str::to_string);
        e.client_ip = Some(self.ip);
        e.rule = Some(rule);
        e.permanent = Some(reply.is_permanent());
        self.ctx.reporter.emit(e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn mail(address: &str) -> MailFrom<String> {
        MailFrom {
            address: address.to_string(),
            ..Default::default()
        }
    }

    #[test]
    fn size_over_the_limit_is_552() {
        let mut m = mail("a@b.example");
        m.size = 1001;
        let r = check_parameters(&m, 1000, false).unwrap_err();
        assert_eq!((r.code, r.enhanced), (552, Some(Enhanced(5, 3, 4))));
        m.size = 1000;
        assert!(check_parameters(&m, 1000, false).is_ok());
    }

    #[test]
    fn unadvertised_parameters_are_refused() {
        let mut m = mail("a@b.example");
        m.flags = smtp_proto::MAIL_BODY_BINARYMIME;
        assert_eq!(check_parameters(&m, 1000, false).unwrap_err().code, 555);
        let mut m = mail("a@b.example");
        m.hold_for = 10;
        assert_eq!(check_parameters(&m, 1000, false).unwrap_err().code, 555);
        let mut m = mail("a@b.example");
        m.flags = smtp_proto::MAIL_BODY_8BITMIME | smtp_proto::MAIL_RET_HDRS;
        m.env_id = Some("abc".into());
        assert!(check_parameters(&m, 1000, false).is_ok());
    }

    #[test]
    fn requiretls_only_over_tls() {
        let mut m = mail("a@b.example");
        m.flags = smtp_proto::MAIL_REQUIRETLS;
        let r = check_parameters(&m, 1000, false).unwrap_err();
        assert_eq!((r.code, r.enhanced), (530, Some(Enhanced(5, 7, 10))));
        assert!(check_parameters(&m, 1000, true).is_ok());
    }

    #[test]
    fn sender_syntax() {
        assert!(check_sender_syntax("", false).is_ok());
        assert!(check_sender_syntax("a@b.example", false).is_ok());
        assert_eq!(
            check_sender_syntax("nodomain", false).unwrap_err().code,
            501
        );
        assert_eq!(
            check_sender_syntax("@b.example", false).unwrap_err().code,
            501
        );
        let r = check_sender_syntax("jö@b.example", false).unwrap_err();
        assert_eq!(r.enhanced, Some(Enhanced(5, 6, 7)));
        assert!(check_sender_syntax("jö@b.example", true).is_ok());
    }

    #[test]
    fn refusal_names_address_account_and_patterns() {
        let t = TenantConfig {
            name: "acme".into(),
            username: "acme".into(),
            password_hash: Secret::new("x"),
            allowed_senders: vec!["*@acme.example".into(), "billing@acme.test".into()],
            webhook_url: None,
            webhook_secret: None,
            dsn: true,
            smarthost: None,
            bind_from_header: true,
        };
        let r = sender_not_allowed("x@other.example", &t);
        assert_eq!(
            r.to_string(),
            "553 5.7.1 Sender address <x@other.example> is not allowed for account \"acme\"; allowed: *@acme.example, billing@acme.test"
        );
    }
}
