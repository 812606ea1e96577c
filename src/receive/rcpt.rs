//! RCPT TO (RFC 5321 §4.1.1.3): the checks herald can make at once, so an
//! app learns during the SMTP session, not from a bounce days later, that an
//! address cannot work: syntax, the recipient limit (RFC 5321 §4.5.3.1.8),
//! the tenant's suppression list (`550 5.1.1`, see [`crate::suppression`]),
//! and whether the domain has a mail server at all (MX, or A/AAAA as
//! implicit MX; null MX per RFC 7505). DSN parameters NOTIFY and ORCPT
//! (RFC 3461) are kept with the recipient.
//!
//! A DNS failure is temporary and gets 451: it never turns into a 5xx. No
//! cache of its own: hickory's resolver caches answers (negative ones too)
//! for their TTL, which is the right lifetime.
//!
//! Input: a parsed RCPT command; the address is the client's text.

use smtp_proto::RcptTo;

use super::session::{Next, Session};
use crate::dns::MxLookup;
use crate::envelope::{Notify, Recipient};
use crate::event::RejectRule;
use crate::reply::{Enhanced, Reply, codes};

/// Checks the forward path and returns its domain (lower case, without a
/// trailing dot) for the DNS check.
pub fn check_recipient(address: &str, smtputf8: bool) -> Result<String, Reply> {
    let bad = |why: &str| {
        Reply::new(
            501,
            Enhanced(5, 1, 3),
            format!("The recipient address <{address}> is not valid: {why}"),
        )
    };
    if address.is_empty() {
        return Err(Reply::new(
            501,
            Enhanced(5, 1, 3),
            "The recipient address is empty: write RCPT TO:<user@domain>",
        ));
    }
    if !smtputf8 && !address.is_ascii() {
        return Err(Reply::new(
            553,
            Enhanced(5, 6, 7),
            format!(
                "The recipient address <{address}> has non-ASCII characters: send MAIL FROM with the SMTPUTF8 parameter"
            ),
        ));
    }
    let Some((local, domain)) = address.rsplit_once('@') else {
        return Err(bad("it has no domain; write user@domain"));
    };
    if local.is_empty() {
        return Err(bad("the part before @ is empty"));
    }
    if domain.starts_with('[') {
        return Err(bad("address literals are not accepted; use a domain name"));
    }
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    if !valid_domain(domain) {
        return Err(bad(&format!("\"{domain}\" is not a domain name")));
    }
    Ok(domain.to_lowercase())
}

/// Letters, digits and hyphens (or UTF-8 for internationalized names) in
/// dot-separated labels of 1 to 63 octets, at most 253 in all, no label
/// starting or ending with a hyphen (RFC 1035 §2.3.1, RFC 5890).
fn valid_domain(domain: &str) -> bool {
    !domain.is_empty()
        && domain.len() <= 253
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| {
                    c.is_ascii_alphanumeric() || c == '-' || (!c.is_ascii() && !c.is_control())
                })
        })
}

/// NOTIFY flags as the queue keeps them.
fn notify(flags: u64) -> Notify {
    Notify {
        success: flags & smtp_proto::RCPT_NOTIFY_SUCCESS != 0,
        failure: flags & smtp_proto::RCPT_NOTIFY_FAILURE != 0,
        delay: flags & smtp_proto::RCPT_NOTIFY_DELAY != 0,
        never: flags & smtp_proto::RCPT_NOTIFY_NEVER != 0,
    }
}

/// RFC 7505 §4.2: a domain that says it takes no mail.
pub fn null_mx(domain: &str) -> Reply {
    Reply::new(
        556,
        Enhanced(5, 1, 10),
        format!("Recipient domain <{domain}> does not accept mail (null MX, RFC 7505)"),
    )
}

/// No MX and no address: almost always a typo in the domain.
pub fn no_mail_server(domain: &str) -> Reply {
    Reply::new(
        550,
        Enhanced(5, 1, 2),
        format!(
            "Recipient domain <{domain}> has no mail server (no MX or A/AAAA record): check the address for typos"
        ),
    )
}

/// The lookup failed for now; it says nothing about the domain.
pub fn dns_tempfail(domain: &str) -> Reply {
    Reply::new(
        451,
        Enhanced(4, 4, 3),
        format!(
            "Cannot look up the mail servers of recipient domain <{domain}> right now, try again later"
        ),
    )
}

impl Session {
    pub(super) async fn rcpt_to(&mut self, to: RcptTo<String>) -> Next {
        let bounces = self.is_bounce_listener();
        if self.tenant.is_none() && !self.trusted && !bounces {
            return self.error(codes::auth_required());
        }
        let max = self.ctx.config.server.max_recipients;
        let Some(txn) = self.txn.as_mut() else {
            return self.error(codes::bad_sequence("Send MAIL first"));
        };
        if txn.body.is_some() {
            return self.error(codes::bad_sequence(
                "RCPT cannot follow BDAT in the same transaction",
            ));
        }
        txn.rcpt_attempts += 1;
        if txn.recipients.len() >= max {
            self.reply(&Reply::new(
                452,
                Enhanced(4, 5, 3),
                format!("Too many recipients: at most {max} per message, send the others in another message"),
            ));
            return Next::Continue;
        }
        if to.flags
            & (smtp_proto::RCPT_CONNEG
                | smtp_proto::RCPT_RRVS_REJECT
                | smtp_proto::RCPT_RRVS_CONTINUE)
            != 0
        {
            self.reply(&Reply::new(
                555,
                Enhanced(5, 5, 4),
                "The RRVS and CONNEG parameters are not supported",
            ));
            return Next::Continue;
        }
        if bounces {
            return self.bounce_rcpt(to.address);
        }
        let domain = match check_recipient(&to.address, txn.envelope.smtputf8) {
            Ok(d) => d,
            Err(reply) => {
                let sender = txn.envelope.sender.clone();
                self.reject_event(
                    RejectRule::RecipientSyntax,
                    &reply,
                    &sender,
                    Some(&to.address),
                );
                self.reply(&reply);
                return Next::Continue;
            }
        };
        // The same recipient twice would get the message twice.
        if txn
            .recipients
            .iter()
            .any(|r| same_address(&r.address, &to.address))
        {
            self.reply(&codes::recipient_ok());
            return Next::Continue;
        }
        let sender = txn.envelope.sender.clone();

        // Before DNS: a suppressed address is known bad whatever its domain
        // says. Only this session's tenant's list is consulted.
        let tenant = self.tenant_name();
        let key = tenant.as_deref().unwrap_or(crate::suppression::NO_TENANT);
        if let Some(entry) = self.ctx.suppressions.lookup(key, &to.address) {
            let reply = crate::suppression::refusal(&to.address, &entry);
            tracing::info!(client_ip = %self.ip, recipient = %to.address, "recipient refused: on the suppression list");
            self.ctx.reporter.emit(crate::suppression::suppressed_event(
                tenant,
                &sender,
                &to.address,
                self.ip,
                &reply,
                &entry,
            ));
            self.reply(&reply);
            return Next::Continue;
        }

        // Boxed: the resolver's future is large and rarely alive.
        let lookup = Box::pin(self.ctx.dns.mx(&domain)).await;
        let (reply, rule) = match lookup {
            Ok(MxLookup::Hosts(_)) => {
                // `limits.tenant_recipients`: counts recipients accepted.
                if let Some(t) = self.tenant
                    && let Err(e) = self.ctx.rate_limits.tenant_recipient(t).await
                {
                    tracing::info!(client_ip = %self.ip, limit = %e, "RCPT refused: rate limit");
                    let reply = e.reply();
                    self.reject_event(
                        RejectRule::RateLimitTenantRecipients,
                        &reply,
                        &sender,
                        Some(&to.address),
                    );
                    self.reply(&reply);
                    return Next::Continue;
                }
                let mut r = Recipient::new(to.address);
                r.orcpt = to.orcpt.map(|o| format!("rfc822;{o}"));
                r.notify = notify(to.flags);
                if let Some(txn) = self.txn.as_mut() {
                    txn.recipients.push(r);
                }
                self.reply(&codes::recipient_ok());
                return Next::Continue;
            }
            Ok(MxLookup::NullMx) => (null_mx(&domain), Some(RejectRule::RecipientNullMx)),
            Ok(MxLookup::NoMailServer) => (
                no_mail_server(&domain),
                Some(RejectRule::RecipientNoMailServer),
            ),
            Err(e) => {
                tracing::warn!(client_ip = %self.ip, domain = %domain, error = %e, "recipient domain lookup failed");
                (
                    dns_tempfail(&domain),
                    Some(RejectRule::RecipientDnsTempfail),
                )
            }
        };
        if let Some(rule) = rule {
            tracing::info!(client_ip = %self.ip, recipient = %to.address, rule = %rule, "recipient refused");
            self.reject_event(rule, &reply, &sender, Some(&to.address));
        }
        self.reply(&reply);
        Next::Continue
    }
}

/// Local parts compare exactly (RFC 5321 §2.4), domains without case.
fn same_address(a: &str, b: &str) -> bool {
    match (a.rsplit_once('@'), b.rsplit_once('@')) {
        (Some((la, da)), Some((lb, db))) => la == lb && da.eq_ignore_ascii_case(db),
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipient_syntax() {
        assert_eq!(
            check_recipient("Bob@Example.COM", false).unwrap(),
            "example.com"
        );
        assert_eq!(
            check_recipient("bob@example.com.", false).unwrap(),
            "example.com"
        );
        for bad in [
            "",
            "bob",
            "@example.com",
            "bob@",
            "bob@[192.0.2.1]",
            "bob@exa mple.com",
            "bob@-x.com",
            "bob@a..b",
        ] {
            let r = check_recipient(bad, false).unwrap_err();
            assert_eq!(r.code, 501, "{bad}: {r}");
            assert_eq!(r.enhanced, Some(Enhanced(5, 1, 3)), "{bad}");
        }
        let long = format!("bob@{}.com", "a".repeat(64));
        assert!(check_recipient(&long, false).is_err());
    }

    #[test]
    fn non_ascii_needs_smtputf8() {
        assert_eq!(
            check_recipient("jörg@bücher.example", false)
                .unwrap_err()
                .code,
            553
        );
        assert_eq!(
            check_recipient("jörg@bücher.example", true).unwrap(),
            "bücher.example"
        );
    }

    #[test]
    fn notify_flags() {
        let n = notify(smtp_proto::RCPT_NOTIFY_FAILURE | smtp_proto::RCPT_NOTIFY_DELAY);
        assert!(n.failure && n.delay && !n.success && !n.never);
    }

    #[test]
    fn replies_name_the_domain() {
        assert_eq!(
            null_mx("x.example").to_string(),
            "556 5.1.10 Recipient domain <x.example> does not accept mail (null MX, RFC 7505)"
        );
        assert!(
            no_mail_server("x.example")
                .to_string()
                .starts_with("550 5.1.2 Recipient domain <x.example> has no mail server")
        );
        assert!(dns_tempfail("x.example").is_transient());
    }

    #[test]
    fn duplicates() {
        assert!(same_address("bob@Example.com", "bob@example.COM"));
        assert!(!same_address("Bob@example.com", "bob@example.com"));
    }
}
