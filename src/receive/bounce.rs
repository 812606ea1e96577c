//! The bounce listener (`[bounces] listener`): the same SMTP session as
//! submission, in a role where it takes mail only for the VERP return-path
//! addresses (and the domain's postmaster and abuse, RFC 5321 §4.5.1 and
//! RFC 2142), relays nothing, and hands each message to
//! [`crate::bounces::inbound`] instead of the queue.

use super::session::{Next, Session};
use crate::envelope::Recipient;
use crate::reply::{Enhanced, Reply, codes};

/// Role addresses at the return-path domain that take reports too.
const ROLE_LOCAL_PARTS: &[&str] = &["postmaster", "abuse"];

impl Session {
    pub(super) fn is_bounce_listener(&self) -> bool {
        self.listener_cfg().bounces
    }

    /// RCPT TO on the bounce listener: a VERP address with a valid token,
    /// or a role address of the return-path domain; 550 5.1.1 for anything
    /// else.
    pub(super) fn bounce_rcpt(&mut self, address: String) -> Next {
        // RFC 5321 §4.1.1.3: a bare <postmaster> must be accepted too.
        let bare_postmaster = address.eq_ignore_ascii_case("postmaster");
        let known = bare_postmaster
            || self.ctx.verp.as_ref().is_some_and(|verp| {
                verp.decode(&address).is_some()
                    || address.rsplit_once('@').is_some_and(|(local, domain)| {
                        domain.eq_ignore_ascii_case(verp.domain())
                            && ROLE_LOCAL_PARTS
                                .iter()
                                .any(|r| local.eq_ignore_ascii_case(r))
                    })
            });
        if !known {
            tracing::info!(client_ip = %self.ip, recipient = %address, "bounce listener: unknown recipient");
            self.reply(&Reply::new(
                550,
                Enhanced(5, 1, 1),
                format!(
                    "<{address}>: no such mailbox; this server takes only delivery reports for addresses it sent from"
                ),
            ));
            return Next::Continue;
        }
        if let Some(txn) = self.txn.as_mut() {
            txn.recipients.push(Recipient::new(address));
        }
        self.reply(&codes::recipient_ok());
        Next::Continue
    }

    /// The end of a report's DATA: read it, emit what it says, say 250 —
    /// also for what is not a report (an auto-reply), which is dropped
    /// rather than bounced back into a loop.
    pub(super) fn bounce_message(&mut self, recipients: &[Recipient], message: &[u8]) -> Next {
        let rcpts: Vec<&str> = recipients.iter().map(|r| r.address.as_str()).collect();
        let taken = crate::bounces::inbound::ingest(
            &self.ctx.classifier,
            self.ctx.verp.as_ref(),
            &self.ctx.queue,
            &self.ctx.reporter,
            &rcpts,
            message,
        );
        tracing::info!(client_ip = %self.ip, events = taken, "report taken in");
        self.reply(&Reply::new(250, Enhanced(2, 0, 0), "Ok: report taken in"));
        Next::Continue
    }
}
