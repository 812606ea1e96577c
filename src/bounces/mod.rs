//! Late bounces and complaints: what a message arriving at herald's
//! return-path (VERP) address says about an earlier delivery.
//!
//! [`parse`] turns the raw message into a [`Report`]: a [`Bounce`] (a
//! delivery status notification, standard or not) or a [`Complaint`] (a
//! feedback report). It is pure: no I/O, no clock, no config. The inbound
//! listener and the VERP token (which queue id, which recipient) are the
//! caller's; so is turning a report into `bounced` / `complained` events.
//!
//! Input trusted: none. The message comes from anyone on the internet; any
//! bytes are accepted, nothing panics, and work is bounded (see
//! [`parse::MAX_INPUT`]).
//!
//! Standards: RFC 3464 (delivery status notifications, `multipart/report`
//! of RFC 6522), RFC 6533 (`message/global-delivery-status`, UTF-8), RFC
//! 5965 (ARF, `message/feedback-report`), RFC 3463 (enhanced status codes),
//! RFC 3834 (auto-replies). Non-standard bounces recognised by their text:
//! Exim, qmail, Sendmail and old Postfix plain text, Microsoft Exchange /
//! Outlook NDR text, Yahoo, Gmail's plain form; anything else that plainly
//! comes from a mail system and carries an SMTP error is
//! [`BounceFormat::Unknown`].

pub mod explain;
pub mod inbound;
pub mod parse;

pub use parse::parse;

use crate::deliver::classify::{Classifier, Verdict};
use crate::reply::Enhanced;

/// What a message sent to the return path turned out to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Report {
    Bounce(Bounce),
    Complaint(Complaint),
}

/// Where a bounce's structure came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BounceFormat {
    /// `multipart/report; report-type=delivery-status` with a
    /// `message/delivery-status` part (RFC 3464) or its UTF-8 form
    /// `message/global-delivery-status` (RFC 6533). Postfix, Gmail,
    /// Exchange, Exim with DSNs on, and herald itself send these.
    Rfc3464,
    /// Exim's plain text ("This message was created automatically by mail
    /// delivery software.").
    Exim,
    /// qmail-send's plain text ("Hi. This is the qmail-send program").
    Qmail,
    /// Postfix without a DSN part ("This is the mail system at host", then
    /// `<addr>: host ... said: ...` paragraphs).
    Postfix,
    /// Sendmail's plain text ("----- The following addresses had permanent
    /// fatal errors -----").
    Sendmail,
    /// Microsoft Exchange / Outlook NDR text ("Delivery has failed to these
    /// recipients or groups:", "Remote Server returned '...'").
    Exchange,
    /// Yahoo's qmail-derived text ("Sorry, we were unable to deliver your
    /// message to the following address.").
    Yahoo,
    /// Gmail's plain text form ("Delivery to the following recipient failed
    /// permanently", "Your message wasn't delivered to ...").
    Gmail,
    /// No known layout, but from a mail system (mailer-daemon, postmaster,
    /// a null return path or a bounce subject) and with an SMTP error in the
    /// text: recipients and codes found by heuristics, so less certain.
    Unknown,
}

/// The Action of one recipient (RFC 3464 §2.3.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Failed,
    Delayed,
    Delivered,
    Relayed,
    Expanded,
}

/// A delivery status notification. `recipients` may be empty when a
/// bounce's layout is known but names no address it could be read from:
/// the VERP token still says which recipient it is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bounce {
    pub format: BounceFormat,
    /// The MTA that wrote the report (`Reporting-MTA`, without its `dns;`
    /// type; for plain text, the host the text names).
    pub reporting_mta: Option<String>,
    pub recipients: Vec<BouncedRecipient>,
    /// The Message-ID of the returned message or headers, as written
    /// (angle brackets kept).
    pub original_message_id: Option<String>,
    /// `Original-Envelope-Id`: the ENVID herald gave at MAIL FROM.
    pub original_envelope_id: Option<String>,
}

impl Bounce {
    /// The recipients whose delivery failed for good: what a `bounced`
    /// event is about. Success DSNs (NOTIFY=SUCCESS) and delay warnings
    /// carry other actions.
    pub fn failed(&self) -> impl Iterator<Item = &BouncedRecipient> {
        self.recipients
            .iter()
            .filter(|r| r.action == Action::Failed)
    }

    /// What the report says about `address`: its failed or delayed
    /// recipient block, or, when none names it, the first failed or delayed
    /// one (with VERP a report is about one recipient, the one in the
    /// token, and many reports name it differently: a forwarder's final
    /// address, an alias). `None` when the report has no such block.
    pub fn about(&self, address: &str) -> Option<&BouncedRecipient> {
        let mut relevant = self
            .recipients
            .iter()
            .filter(|r| matches!(r.action, Action::Failed | Action::Delayed));
        let first = relevant.clone().next();
        relevant
            .find(|r| {
                [&r.final_recipient, &r.original_recipient].iter().any(|a| {
                    a.as_deref()
                        .is_some_and(|a| a.eq_ignore_ascii_case(address))
                })
            })
            .or(first)
    }
}

/// One recipient of a [`Bounce`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BouncedRecipient {
    /// `Final-Recipient` without its address type (`rfc822;`), or the
    /// address a plain-text bounce names.
    pub final_recipient: Option<String>,
    /// `Original-Recipient` (from ORCPT) without its address type.
    pub original_recipient: Option<String>,
    pub action: Action,
    /// The enhanced status code: `Status` of an RFC 3464 report, or the
    /// first one in a plain-text diagnostic; see `status_derived`.
    pub status: Option<Enhanced>,
    /// `true` when no enhanced code was reported and `status` was derived
    /// from unambiguous text ("user unknown" → x.1.1, "mailbox full" →
    /// x.2.2, "message too large" → x.3.4; the class from the SMTP code or
    /// the action). A consumer that wants only what the remote side said
    /// ignores a derived status.
    pub status_derived: bool,
    /// The remote diagnostic, e.g. `smtp; 550 5.1.1 user unknown` for RFC
    /// 3464 (`Diagnostic-Code` as written), or the reply text of a plain
    /// bounce, lines joined by one space.
    pub diagnostic: Option<String>,
    /// `Remote-MTA` without its `dns;` type, or the host a plain bounce
    /// names.
    pub remote_mta: Option<String>,
    /// The basic SMTP reply code found in the diagnostic.
    pub smtp_code: Option<u16>,
}

impl BouncedRecipient {
    /// The reason and permanence of this failure, by the same rules as a
    /// reply at delivery time ([`Classifier::classify_parts`]): its status
    /// (derived or not), SMTP code (0 when none) and diagnostic.
    pub fn classify(&self, classifier: &Classifier) -> Verdict {
        // A status herald derived from the text is not a code the remote
        // side gave: the text is classified on its own words.
        classifier.classify_parts(
            self.status.filter(|_| !self.status_derived),
            self.smtp_code.unwrap_or(0),
            self.diagnostic.as_deref().unwrap_or(""),
        )
    }

    /// What this report means for the recipient: [`Self::classify`], with
    /// permanence from the action (a reporting MTA that says `failed` has
    /// given up, whatever the last reply's class). A reason that would
    /// suppress the address stays temporary when the reply itself was
    /// temporary ("450 4.1.1 mailbox unknown, try later" then expired):
    /// only a server that said it for good may get an address suppressed.
    pub fn outcome(&self, classifier: &Classifier) -> Verdict {
        let v = self.classify(classifier);
        let said_temporary = match self.smtp_code {
            Some(code) => code / 100 == 4,
            None => self
                .status
                .is_some_and(|s| s.0 == 4 && !self.status_derived),
        };
        let permanent = self.action == Action::Failed
            && !(said_temporary && v.reason.may_suppress())
            && v.ruled_permanent != Some(false);
        Verdict { permanent, ..v }
    }
}

/// A feedback report (ARF, RFC 5965): a recipient marked a message as spam
/// (or fraud, virus...).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Complaint {
    /// `Feedback-Type`, lower-cased: abuse, fraud, virus, other, not-spam,
    /// auth-failure (RFC 6591).
    pub feedback_type: String,
    pub user_agent: Option<String>,
    /// `Original-Mail-From` without angle brackets.
    pub original_mail_from: Option<String>,
    /// The first `Original-Rcpt-To` without angle brackets.
    pub original_rcpt_to: Option<String>,
    pub reported_domain: Option<String>,
    pub source_ip: Option<String>,
    /// `Arrival-Date` (or the older `Received-Date`), as written.
    pub arrival_date: Option<String>,
    /// The Message-ID of the returned original (third part), as written.
    pub original_message_id: Option<String>,
    /// The address of the original's `To:` (or Microsoft's
    /// `X-HmXmrOriginalRecipient` when `To:` is missing or redacted away).
    pub original_recipient_header: Option<String>,
}
