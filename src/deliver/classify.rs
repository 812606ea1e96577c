//! Why a delivery failed, from the reply that said so: first the rules of
//! `[classification]` in the config (see [`Rule`]), then the built-in
//! defaults. The result is a [`Verdict`]: a [`Reason`] from the taxonomy of
//! bounce reasons (which implies the coarse [`Classification`]) and whether
//! the failure is permanent.
//!
//! The defaults read the text first and the enhanced status code (RFC
//! 3463, with the registry of RFC 5248) second: a code is one number a
//! server chose, often carelessly ("5.1.1" for a blocklisted IP, "#5.1.1"
//! for a full mailbox), while a text that names a cause is the server
//! saying what it means. Where the text names no cause the code decides;
//! where neither does, the reason is `other`. Only a permanent failure
//! whose reason says the address cannot receive mail
//! ([`Reason::may_suppress`]) may put it on a suppression list, so the
//! phrases for those reasons are narrow and every other cause is checked
//! before them.
//!
//! It trusts nothing about the text: any bytes, any case, any length.
//! Whether a failure is permanent follows the reply code (5xx yes, 4xx no;
//! without a code, the enhanced code's class) unless a config rule says
//! otherwise, e.g. for a server that answers 5xx to greylisting.
//!
//! A [`Classifier`] is built from `[classification]` by each stage that
//! labels failures (delivery, each smarthost, the bounce listener); the
//! same rules serve synchronous replies ([`Classifier::classify`]) and late
//! bounces ([`Classifier::classify_parts`], fed by the bounce parser).

use std::sync::Arc;

pub use crate::config::classification::{ClassificationConfig, Rule};
use crate::event::Reason;
use crate::reply::{Enhanced, Reply};
use crate::report::Classification;

impl Rule {
    fn matches(&self, enhanced: Option<Enhanced>, code: u16, lower_text: &str) -> bool {
        self.needle
            .as_deref()
            .is_none_or(|n| lower_text.contains(n))
            && self.code.is_none_or(|c| c == code)
            && self.status.as_deref().is_none_or(|prefix| {
                enhanced.is_some_and(|e| {
                    let parts = [u16::from(e.0), e.1, e.2];
                    prefix.iter().zip(parts).all(|(p, e)| *p == e)
                })
            })
    }
}

/// What a failure means: its reason and whether it is for good.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub reason: Reason,
    pub permanent: bool,
    /// A `[[classification.rules]]` rule set the permanence: it stands
    /// whatever else a report says.
    pub ruled_permanent: Option<bool>,
}

impl Verdict {
    pub fn classification(&self) -> Classification {
        self.reason.classification()
    }

    /// The category and permanence, as tests compare them.
    #[cfg(test)]
    pub(crate) fn pair(self) -> (Classification, bool) {
        (self.classification(), self.permanent)
    }

    /// Whether this failure may put the address on a suppression list.
    pub fn suppresses(&self) -> bool {
        self.permanent && self.reason.may_suppress()
    }
}

/// The configured rules, then the built-in defaults. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Classifier {
    rules: Arc<[Rule]>,
}

impl Classifier {
    /// `[[classification.rules]]` first, then the defaults.
    pub fn new(config: &ClassificationConfig) -> Classifier {
        Classifier {
            rules: config.rules.clone().into(),
        }
    }

    /// Classifies a failure from its parts: an enhanced code if any, the
    /// basic code (0 when a late bounce gave none) and the text.
    pub fn classify_parts(&self, enhanced: Option<Enhanced>, code: u16, text: &str) -> Verdict {
        classify_with(&self.rules, enhanced, code, text)
    }

    /// Classifies a failure reply.
    pub fn classify(&self, reply: &Reply) -> Verdict {
        self.classify_parts(reply.enhanced, reply.code, &reply.text)
    }
}

/// [`Classifier::classify_parts`] with the given rules.
pub fn classify_with(rules: &[Rule], enhanced: Option<Enhanced>, code: u16, text: &str) -> Verdict {
    let lower = text.to_lowercase();
    let by_code = match code / 100 {
        5 => Some(true),
        4 => Some(false),
        _ => None,
    };
    let permanent = by_code
        .or_else(|| enhanced.map(|e| e.0 == 5))
        .unwrap_or(false);
    if let Some(rule) = rules.iter().find(|r| r.matches(enhanced, code, &lower)) {
        return Verdict {
            reason: rule.reason,
            permanent: rule.permanent.unwrap_or(permanent),
            ruled_permanent: rule.permanent,
        };
    }
    Verdict {
        reason: built_in(enhanced, code, &lower),
        permanent,
        ruled_permanent: None,
    }
}

/// [`classify_with`]'s category and permanence, as tests compare them.
#[cfg(test)]
fn classify_pair(
    rules: &[Rule],
    enhanced: Option<Enhanced>,
    code: u16,
    text: &str,
) -> (Classification, bool) {
    classify_with(rules, enhanced, code, text).pair()
}

/// Phrases that name a cause, tried in this order; the first group with a
/// phrase in the (lower-cased) text wins. Causes that are not the
/// address's come first, because their replies often also say "rejected",
/// "unknown" or "does not exist" about something else (a sender, an IP, a
/// DNS name).
const BY_TEXT: &[(Reason, &[&str])] = &[
    (
        Reason::SenderRejected,
        &[
            "sender address rejected",
            "sender verify",
            "sender verification",
            "verification failed for <",
            "sender domain",
            "sender rejected",
            "sender is not allowed",
            "sender not allowed",
            "sender denied",
            "sender blocked",
            "sender address is not valid",
            "domain of sender address",
            "sender's domain",
            "not accepting mail from",
            "unroutable sender",
            "unrouteable sender",
            "does not accept mail from",
            "doesn't accept mail from",
            "unverified sender",
            "envelope sender",
            "mail from address",
            "sender address has null mx",
        ],
    ),
    (
        Reason::Policy,
        &[
            "greylist",
            "graylist",
            "grey-list",
            "gray-list",
            "greylisted",
            "try again later, closing",
            "virus",
            "malware",
            "infected",
            "attachment",
            "content rejected",
        ],
    ),
    (
        Reason::AuthFailure,
        &[
            "spf",
            "dkim",
            "dmarc",
            "unauthenticated",
            "sender policy framework",
            "not authenticated",
            "authentication failed",
            "authentication check",
            "domainkeys",
            "sender authentication",
            "dns based verification",
            "purported responsible address",
        ],
    ),
    (
        Reason::SystemError,
        &[
            "mail loop",
            "loop detected",
            "loops back",
            "too many hops",
            "hop count exceeded",
            "forwarding loop",
            "alias loop",
            "aliasing loop",
            "loop broken",
            "looping",
            "command died",
            "command output",
        ],
    ),
    (
        Reason::RateLimited,
        &[
            "rate limit",
            "ratelimit",
            "rate-limit",
            "rate limited",
            "at a rate that",
            "receiving mail at a rate",
            "too many",
            "too much mail from",
            "relay quota",
            "sending quota",
            "throttl",
            "unexpected volume",
            "exceeded the rate",
            "sending rate",
            "connection rate",
            "message rate",
            "limit on the number",
            "slow down",
            "frequency limited",
            "temporarily deferred",
            "[tss0",
            "try to reduce",
        ],
    ),
    (
        Reason::Blocked,
        &[
            "blocklist",
            "block list",
            "blocklisted",
            "blacklist",
            "black list",
            "denylist",
            "deny list",
            "blocked using",
            "listed at",
            "listed on",
            "listed by",
            "is listed",
            "are listed",
            "been listed",
            "dnsbl",
            "rbl",
            "spamhaus",
            "spamcop",
            "sorbs",
            "barracuda",
            "cloudmark",
            "reputation",
            "client host rejected",
            "client host",
            "your ip",
            "ip address",
            "ip addresses",
            "from this ip",
            "your host",
            "your server",
            "reverse dns",
            "reverse lookup",
            "rdns",
            "ptr record",
            "ipcheck",
            "sending ip",
            "smtp server of your isp",
            "dns ptr",
            "ptr resource record",
            "no ptr",
            "hostname lookup",
            "does not resolve to your ip",
            "connection refused by",
            "not allowed to send mail",
            "access denied, banned",
            "banned",
            "poor reputation",
            "dynamic ip",
            "dial-up",
            "dialup",
            "residential",
            "not accepted from this ip",
            "rly:",
            "hvu:",
            "dyn:",
            "cbl",
            "(cn)",
            "your network",
            "their network",
            "unable to verify your",
            "helo",
            "ehlo",
        ],
    ),
    (
        Reason::SpamDetected,
        &[
            "spam",
            "unsolicited",
            "junk",
            "bulk mail",
            "bulk e-mail",
            "suspicious",
            "scam",
            "phish",
            "fraud",
            "message content",
            "content filter",
            "rejected by the content",
        ],
    ),
    (
        Reason::MailboxFull,
        &[
            "mailbox full",
            "mailbox is full",
            "mailbox has exceeded",
            "mailbox size limit",
            "mailbox exceeds",
            "over quota",
            "overquota",
            "over the quota",
            "quota exceeded",
            "exceeded quota",
            "exceeds quota",
            "quota",
            "out of storage",
            "insufficient storage",
            "storage space",
            "exceeded storage",
            "mailbox is too large",
            "box full",
            "inbox is full",
            "user's mailbox is full",
            "not enough space",
            "disk full",
            "mailfolder is full",
        ],
    ),
    (
        Reason::MessageTooLarge,
        &[
            "message too large",
            "message too big",
            "message is too large",
            "message is too big",
            "too large",
            "too big",
            "message size",
            "size limit",
            "exceeds size",
            "size exceeds",
            "maximum size",
            "maximum allowed size",
            "message length exceeds",
            "message exceeded",
        ],
    ),
    (
        Reason::RelayingDenied,
        &[
            "relay access denied",
            "relaying denied",
            "relay denied",
            "relay not permitted",
            "relaying not permitted",
            "relaying not allowed",
            "not permitted to relay",
            "unable to relay",
            "we do not relay",
            "not allowed to relay",
            "relay prohibited",
            "relaying mail to",
            "no relaying",
            "not a gateway",
            "cannot relay",
            "relay access",
            "turn on smtp authentication",
        ],
    ),
    (
        Reason::NotAccept,
        &["null mx", "accepts no mail", "domain does not accept mail"],
    ),
    (
        Reason::MailboxDisabled,
        &[
            "disabled",
            "suspended",
            "inactive",
            "deactivated",
            "not active",
            "is locked",
            "account locked",
            "mailbox locked",
            "frozen",
            "on hold",
            "expired account",
            "account has expired",
            "blocked account",
        ],
    ),
    (
        Reason::HasMoved,
        &[
            "has moved",
            "user has moved",
            "address has changed",
            "not local; please try",
            "no longer at this address",
            "no longer with",
            "no longer employed",
            "address is no longer valid",
            "address is no longer available",
            "mailbox is no longer available",
            "account is no longer available",
        ],
    ),
    (
        Reason::Dns,
        &[
            "host not found, try again",
            "temporary failure in name resolution",
            "dns lookup failed",
            "dns timeout",
            "servfail",
            "dns temporary",
            "temporary dns",
        ],
    ),
    (
        Reason::HostUnknown,
        &[
            "host unknown",
            "unknown host",
            "host not found",
            "host or domain name not found",
            "domain not found",
            "domain name not found",
            "no such domain",
            "domain does not exist",
            "domain doesn't exist",
            "unrouteable mail domain",
            "unroutable mail domain",
            "nxdomain",
            "name or service not known",
            "unknown domain",
            "invalid domain",
            "no mx record",
            "no mail exchanger",
            "mail exchanger not found",
            "domain is not configured",
            "all relevant mx records point to non-existent hosts",
            "no valid mx",
            "bad destination system address",
            "domain could not be found",
        ],
    ),
    (
        Reason::UserUnknown,
        &[
            "user unknown",
            "unknown user",
            "unknown recipient",
            "recipient unknown",
            "no such user",
            "no such recipient",
            "no such mailbox",
            "no such address",
            "no such account",
            "no such person",
            "no mailbox here",
            "no mailbox by that name",
            "mailbox not found",
            "mailbox does not exist",
            "mailbox doesn't exist",
            "mailbox unknown",
            "unknown mailbox",
            "mailbox is not valid",
            "invalid mailbox",
            "not a valid mailbox",
            "address does not exist",
            "address doesn't exist",
            "account does not exist",
            "account doesn't exist",
            "recipient does not exist",
            "user does not exist",
            "user doesn't exist",
            "user doesn't have a",
            "doesn't have a yahoo",
            "does not have an account",
            "email account that you tried to reach does not exist",
            "not a valid recipient",
            "invalid recipient",
            "recipient not found",
            "user not found",
            "address not found",
            "recipnotfound",
            "recipientnotfound",
            "unrouteable address",
            "unroutable address",
            "unknown address",
            "address unknown",
            "addressee unknown",
            "unknown local part",
            "unknown or illegal alias",
            "no account by that name",
            "not our customer",
            "invalid user",
            "user invalid",
            "bad destination mailbox address",
            "is not a valid user",
            "user account is unavailable",
            "destination mailbox address invalid",
            "this address no longer accepts mail",
            "recipient name is not recognized",
            "user not known",
            "address is wrong",
            // German, French, Spanish, Italian, Portuguese, Dutch.
            "benutzer unbekannt",
            "empfänger unbekannt",
            "unbekannter empfänger",
            "unbekannter benutzer",
            "postfach existiert nicht",
            "utilisateur inconnu",
            "destinataire inconnu",
            "adresse inconnue",
            "non recensé",
            "usuario desconocido",
            "destinatario desconocido",
            "utente sconosciuto",
            "destinatario sconosciuto",
            "usuário desconhecido",
            "onbekende gebruiker",
            "invalid final delivery userid",
            "not listed in domino directory",
            "not listed in public name & address book",
            "does not like recipient",
            "no such user here",
            "unknown in virtual",
            "unknown in local",
        ],
    ),
    (
        Reason::Other,
        &[
            "does not exist",
            "doesn't exist",
            "not found in",
            "could not be found",
            "couldn't be found",
            "not listed in",
            "no valid recipients",
            "mailbox unavailable",
            "mailbox is unavailable",
            "mailbox not available",
        ],
    ),
    (
        Reason::Tls,
        &[
            "tls",
            "starttls",
            "tls required",
            "tls is required",
            "encryption required",
            "must issue a starttls",
            "certificate",
            "tls handshake",
            "tls negotiation",
        ],
    ),
    (
        Reason::Expired,
        &[
            "retry timeout exceeded",
            "delivery time expired",
            "message expired",
            "has been undeliverable for",
            "could not be delivered within",
            "retry time not reached",
            "delivery expired",
            "message timed out",
            "too long in queue",
            "was not delivered within",
            "attempts:",
            "maximum delivery attempts",
        ],
    ),
    (
        Reason::Network,
        &[
            "connection refused",
            "connection timed out",
            "timed out",
            "timeout",
            "connection reset",
            "lost connection",
            "connection dropped",
            "no route to host",
            "network is unreachable",
            "network unreachable",
            "could not connect",
            "connection to mail exchanger failed",
            "connection failed",
            "couldn't connect",
            "unable to connect",
            "connection closed",
        ],
    ),
    (
        Reason::SystemError,
        &[
            "system error",
            "internal error",
            "local error",
            "configuration error",
            "config error",
            "misconfigured",
            "server error",
            "system full",
            "out of memory",
            "insufficient system",
            "resources temporarily",
            "mailer error",
            "unknown mailer",
            "temporary failure",
            "local problem",
            "internal resource",
            "temporarily unable",
            "local delivery failed",
        ],
    ),
    (
        Reason::Policy,
        &[
            "policy",
            "policies",
            "prohibit",
            "not authorized",
            "not permitted",
            "not allowed",
            "access denied",
            "denied",
            "refused",
            "rejected",
            "blocked",
        ],
    ),
];

/// The reason an enhanced status code names on its own (RFC 3463, RFC
/// 5248); `None` for the vague ones (detail 0, "other or undefined"),
/// which leave it to the text (see [`vague_code`]).
fn by_code(e: Enhanced) -> Option<Reason> {
    use Reason::*;
    Some(match (e.1, e.2) {
        (_, 0) => return None,
        (1, 1) => UserUnknown,
        (1, 2) => HostUnknown,
        (1, 3) => SyntaxError,
        (1, 6) => HasMoved,
        (1, 7 | 8) => SenderRejected,
        (1, 10) => NotAccept,
        (2, 1) => MailboxDisabled,
        (2, 2) => MailboxFull,
        (2, 3) | (3, 4) => MessageTooLarge,
        (2, 4) | (3, _) => SystemError,
        (4, 1 | 2) => Network,
        (4, 3) => Dns,
        (4, 4) if e.0 == 5 => HostUnknown,
        (4, 4) => Dns,
        (4, 5) => RateLimited,
        (4, 6) => SystemError,
        (4, 7) => Expired,
        (4, _) => Network,
        (5, 3) => RateLimited,
        (5, _) => SyntaxError,
        (6, _) => Policy,
        (7, 1) => Policy,
        (7, 4 | 5 | 10 | 11) => Tls,
        (7, 13) => MailboxDisabled,
        (7, 20..=27) => AuthFailure,
        (7, 28) => RateLimited,
        (7, _) => Policy,
        _ => return None,
    })
}

/// What a vague code (x.Y.0) says when the text names no cause: its
/// subject, never a reason that suppresses.
fn vague_code(e: Enhanced) -> Option<Reason> {
    use Reason::*;
    Some(match e.1 {
        3 => SystemError,
        4 => Network,
        5 => SyntaxError,
        6 | 7 => Policy,
        _ => return None,
    })
}

/// Whether a text match may stand against a code that names another
/// cause. The generic words of the last [`BY_TEXT`] group ("rejected",
/// "denied") do not: "550 5.1.1 ... rejected" is still an unknown user.
fn text_overrides(text_reason: Reason, generic: bool, code_reason: Reason, code: Enhanced) -> bool {
    if generic {
        return false;
    }
    // A code that suppresses is believed only when the text agrees or says
    // nothing: "5.1.1 mailbox over quota", "5.1.1 blocked by Spamhaus".
    // A text that would suppress stands against a mailbox or addressing
    // code ("5.2.1 User unknown"), never against a policy, network or
    // system one.
    code_reason.may_suppress()
        || !text_reason.may_suppress()
        || (matches!(code.1, 1 | 2 | 5) && code_reason != Reason::SenderRejected)
}

/// The built-in defaults; `text` is lower-cased.
fn built_in(enhanced: Option<Enhanced>, code: u16, text: &str) -> Reason {
    let mut by_text = None;
    let last = BY_TEXT.len() - 1;
    for (i, (reason, phrases)) in BY_TEXT.iter().enumerate() {
        if phrases.iter().any(|p| text.contains(p)) {
            // The last group's words and the `other` group's ("does not
            // exist": what does not?) only fill in for a missing code.
            by_text = Some((*reason, i == last || *reason == Reason::Other));
            break;
        }
    }
    let coded = enhanced.and_then(by_code);
    match (by_text, coded) {
        // A server that answered cannot mean x.4.x "no answer from host":
        // Microsoft's "5.4.1 Recipient address rejected: Access denied" is
        // a refusal, whatever its reason.
        (Some((t, true)), Some(Reason::Network))
            if t != Reason::Other && enhanced.is_some_and(|e| e.0 == 5) =>
        {
            t
        }
        (Some((t, generic)), Some(c)) if t != c => {
            if enhanced.is_some_and(|e| text_overrides(t, generic, c, e)) {
                t
            } else {
                c
            }
        }
        (Some((Reason::Other, true)), None) => Reason::Other,
        (Some((t, true)), None) => enhanced.and_then(vague_code).unwrap_or(t),
        (Some((t, _)), _) => t,
        (None, Some(c)) => c,
        (None, None) => match (enhanced.and_then(vague_code), code) {
            (Some(r), _) => r,
            (None, 421) => Reason::Network,
            (None, _) => Reason::Other,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Classification::*;

    fn c(code: u16, text: &str) -> Classification {
        Classifier::default()
            .classify(&Reply::from_wire(code, text))
            .classification()
    }

    #[test]
    fn gmail() {
        assert_eq!(
            c(
                550,
                "5.1.1 The email account that you tried to reach does not exist. Please try\ndouble-checking the recipient's email address for typos or\nunnecessary spaces. https://support.google.com/mail/?p=NoSuchUser"
            ),
            InvalidRecipient
        );
        assert_eq!(
            c(
                452,
                "4.2.2 The recipient's inbox is out of storage space. Please direct the\nrecipient to https://support.google.com/mail/?p=OverQuotaTemp"
            ),
            MailboxFull
        );
        assert_eq!(
            c(
                550,
                "5.7.1 [192.0.2.1] Our system has detected that this message is likely\nunsolicited mail. To reduce the amount of spam sent to Gmail, this message\nhas been blocked."
            ),
            SpamBlock
        );
        assert_eq!(
            c(
                550,
                "5.7.26 This mail is unauthenticated, which poses a security risk to the\nsender and Gmail users, and has been blocked."
            ),
            Policy
        );
        assert_eq!(
            c(
                552,
                "5.3.4 Your message exceeded Google's message size limits."
            ),
            MessageTooLarge
        );
        assert_eq!(
            c(
                421,
                "4.7.0 [192.0.2.1] Our system has detected an unusual rate of unsolicited\nmail originating from your IP address."
            ),
            SpamBlock
        );
    }

    #[test]
    fn outlook() {
        assert_eq!(
            c(
                550,
                "5.5.0 Requested action not taken: mailbox unavailable (S2017062302)."
            ),
            Other
        );
        assert_eq!(
            c(
                550,
                "5.4.1 Recipient address rejected: Access denied. For more information see https://aka.ms/EXOSmtpErrors"
            ),
            Policy
        );
        assert_eq!(
            c(
                550,
                "5.7.1 Unfortunately, messages from [192.0.2.1] weren't sent. Please contact your Internet service provider since part of their network is on our block list (S3140)."
            ),
            SpamBlock
        );
    }

    #[test]
    fn yahoo() {
        assert_eq!(
            c(
                554,
                "5.7.9 Message not accepted for policy reasons. See https://help.yahoo.com/kb/postmaster/SLN7253.html"
            ),
            Policy
        );
        assert_eq!(
            c(
                421,
                "4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints"
            ),
            Policy
        );
        assert_eq!(
            c(552, "1 Requested mail action aborted, mailbox not found"),
            InvalidRecipient
        );
        assert_eq!(
            c(
                554,
                "delivery error: dd This user doesn't have a yahoo.com account (bob@yahoo.com) [0]"
            ),
            InvalidRecipient
        );
    }

    #[test]
    fn postfix_and_exim() {
        assert_eq!(
            c(
                550,
                "5.1.1 <bob@example.com>: Recipient address rejected: User unknown in virtual mailbox table"
            ),
            InvalidRecipient
        );
        assert_eq!(
            c(
                554,
                "5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org"
            ),
            SpamBlock
        );
        assert_eq!(
            c(
                450,
                "4.1.8 <a@nonexist.example>: Sender address rejected: Domain not found"
            ),
            Policy
        );
        assert_eq!(c(552, "5.2.2 Mailbox is full"), MailboxFull);
        assert_eq!(c(550, "Unrouteable address"), InvalidRecipient);
        assert_eq!(c(550, "Administrative prohibition"), Policy);
        assert_eq!(
            c(552, "Message size exceeds maximum permitted"),
            MessageTooLarge
        );
        assert_eq!(
            c(
                550,
                "Verification failed for <x@y>\nUnrouteable address\nSender verify failed"
            ),
            Policy
        );
        assert_eq!(c(451, "4.3.5 Server configuration problem"), Other);
    }

    #[test]
    fn herald_synthesized_replies() {
        assert_eq!(
            c(
                451,
                "4.4.1 Connection to mx1.example.net [127.0.0.2]:25 refused"
            ),
            Network
        );
        assert_eq!(c(451, "4.4.3 DNS lookup of example.net failed"), Dns);
        assert_eq!(c(451, "4.7.5 TLS handshake with mx failed"), Tls);
        assert_eq!(
            c(556, "5.1.10 Recipient domain x has a null MX record"),
            InvalidRecipient
        );
        assert_eq!(c(550, "5.1.2 no mail server"), InvalidRecipient);
        assert_eq!(c(421, "service not available"), Network);
        assert_eq!(c(554, "\u{fffd}\u{0}weird"), Other);
    }
}

/// A corpus of real reply texts (addresses and IPs replaced by documentation
/// ones), each with the category and permanence herald's defaults give.
#[cfg(test)]
mod corpus {
    use super::*;
    use Classification::*;

    /// (code, text as it follows the code on the wire, reason, permanent)
    const CORPUS: &[(u16, &str, Reason, bool)] = &[
        // Gmail
        (
            550,
            "5.1.1 The email account that you tried to reach does not exist. Please try double-checking the recipient's email address for typos or unnecessary spaces.",
            Reason::UserUnknown,
            true,
        ),
        (
            550,
            "5.2.1 The email account that you tried to reach is disabled.",
            Reason::MailboxDisabled,
            true,
        ),
        (
            452,
            "4.2.2 The recipient's inbox is out of storage space. Please direct the recipient to https://support.google.com/mail/?p=OverQuotaTemp",
            Reason::MailboxFull,
            false,
        ),
        (
            552,
            "5.2.2 The recipient's inbox is out of storage space and inactive.",
            Reason::MailboxFull,
            true,
        ),
        (
            552,
            "5.3.4 Your message exceeded Google's message size limits.",
            Reason::MessageTooLarge,
            true,
        ),
        (
            550,
            "5.7.1 [192.0.2.1] Our system has detected that this message is likely unsolicited mail. To reduce the amount of spam sent to Gmail, this message has been blocked.",
            Reason::SpamDetected,
            true,
        ),
        (
            421,
            "4.7.28 [192.0.2.1] Our system has detected an unusual rate of unsolicited mail originating from your IP address. To protect our users from spam, mail sent from your IP address has been temporarily rate limited.",
            Reason::RateLimited,
            false,
        ),
        (
            550,
            "5.7.26 This mail is unauthenticated, which poses a security risk to the sender and Gmail users, and has been blocked. The sender must authenticate with at least one of SPF or DKIM.",
            Reason::AuthFailure,
            true,
        ),
        (
            550,
            "5.7.26 Unauthenticated email from acme.example is not accepted due to domain's DMARC policy.",
            Reason::AuthFailure,
            true,
        ),
        (
            421,
            "4.7.0 [192.0.2.1] Our system has detected that this message is suspicious due to the very low reputation of the sending IP address.",
            Reason::Blocked,
            false,
        ),
        (
            421,
            "4.7.0 TLS required for RCPT domain, closing connection.",
            Reason::Tls,
            false,
        ),
        (
            451,
            "4.3.0 Mail server temporarily rejected message.",
            Reason::SystemError,
            false,
        ),
        (
            550,
            "5.7.25 [192.0.2.1] The IP address sending this message does not have a PTR record setup.",
            Reason::Blocked,
            true,
        ),
        // Outlook / Office 365
        (
            550,
            "5.5.0 Requested action not taken: mailbox unavailable (S2017062302).",
            Reason::Other,
            true,
        ),
        (
            550,
            "5.4.1 Recipient address rejected: Access denied. For more information see https://aka.ms/EXOSmtpErrors",
            Reason::Policy,
            true,
        ),
        (
            550,
            "5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
            Reason::UserUnknown,
            true,
        ),
        (
            550,
            "5.7.1 Unfortunately, messages from [192.0.2.1] weren't sent. Please contact your Internet service provider since part of their network is on our block list (S3140).",
            Reason::Blocked,
            true,
        ),
        (
            451,
            "4.7.650 The mail server [192.0.2.1] has been temporarily rate limited due to IP reputation.",
            Reason::RateLimited,
            false,
        ),
        (
            550,
            "5.7.708 Service unavailable. Access denied, traffic not accepted from this IP.",
            Reason::Blocked,
            true,
        ),
        (
            554,
            "5.2.2 mailbox full; STOREDRV.Deliver.Exception:QuotaExceededException.MapiExceptionShutoffQuotaExceeded",
            Reason::MailboxFull,
            true,
        ),
        (
            550,
            "5.7.509 Access denied, sending domain acme.example does not pass DMARC verification and has a DMARC policy of reject.",
            Reason::AuthFailure,
            true,
        ),
        (452, "4.5.3 Too many recipients", Reason::RateLimited, false),
        // Yahoo / AOL
        (
            554,
            "5.7.9 Message not accepted for policy reasons. See https://help.yahoo.com/kb/postmaster/SLN7253.html",
            Reason::Policy,
            true,
        ),
        (
            421,
            "4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints",
            Reason::RateLimited,
            false,
        ),
        (
            554,
            "delivery error: dd This user doesn't have a yahoo.com account (bob@yahoo.example) [0]",
            Reason::UserUnknown,
            true,
        ),
        (
            552,
            "1 Requested mail action aborted, mailbox not found",
            Reason::UserUnknown,
            true,
        ),
        (
            553,
            "5.7.2 [TSS09] All messages from 192.0.2.1 will be permanently deferred; Retrying will NOT succeed. See https://senders.yahooinc.com/smtp-error-codes",
            Reason::RateLimited,
            true,
        ),
        (
            554,
            "30 Sorry, your message size exceeds 41943040 bytes.",
            Reason::MessageTooLarge,
            true,
        ),
        (
            452,
            "4.2.2 Mailbox is over quota",
            Reason::MailboxFull,
            false,
        ),
        // iCloud
        (
            550,
            "5.1.1 <bob@icloud.example>: user does not exist",
            Reason::UserUnknown,
            true,
        ),
        (
            554,
            "5.7.1 [CS01] Message rejected due to local policy.",
            Reason::Policy,
            true,
        ),
        (
            552,
            "5.2.2 <bob@icloud.example>: user is over quota",
            Reason::MailboxFull,
            true,
        ),
        // GMX / Web.de
        (
            550,
            "Requested action not taken: mailbox unavailable",
            Reason::Other,
            true,
        ),
        (
            554,
            "Transaction failed Reject due to policy restrictions. For explanation visit https://postmaster.gmx.net/en/error-messages",
            Reason::Policy,
            true,
        ),
        (
            421,
            "gmx.net (mxgmx017) Nemesis ESMTP Service not available No SMTP service Bad DNS PTR resource record.",
            Reason::Blocked,
            false,
        ),
        // Mimecast
        (
            550,
            "Invalid Recipient - https://community.mimecast.com/docs/DOC-1369#550",
            Reason::UserUnknown,
            true,
        ),
        (
            554,
            "Email rejected due to security policies - https://community.mimecast.com/docs/DOC-1369#554",
            Reason::Policy,
            true,
        ),
        (
            451,
            "Internal resource temporarily unavailable - https://community.mimecast.com/docs/DOC-1369#451",
            Reason::SystemError,
            false,
        ),
        (
            550,
            "Rejected by header based Anti-Spoofing policy: billing@acme.example",
            Reason::Policy,
            true,
        ),
        // Proofpoint
        (
            554,
            "5.7.1 Blocked - see https://ipcheck.proofpoint.com/?ip=192.0.2.1",
            Reason::Blocked,
            true,
        ),
        (
            550,
            "5.7.1 Message blocked due to spam content in the message.",
            Reason::SpamDetected,
            true,
        ),
        (550, "5.1.1 User Unknown", Reason::UserUnknown, true),
        // Barracuda
        (
            554,
            "Service unavailable; Client host [192.0.2.1] blocked using Barracuda Reputation; http://www.barracudanetworks.com/reputation/?r=1&ip=192.0.2.1",
            Reason::Blocked,
            true,
        ),
        (
            550,
            "permanent failure for one or more recipients (bob@one.example:550 No such user)",
            Reason::UserUnknown,
            true,
        ),
        // Spamhaus and other DNSBL listings
        (
            554,
            "5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org; https://www.spamhaus.org/query/ip/192.0.2.1",
            Reason::Blocked,
            true,
        ),
        (
            550,
            "5.7.1 Mail from 192.0.2.1 refused - see http://www.spamcop.net/bl.shtml?192.0.2.1",
            Reason::Blocked,
            true,
        ),
        (
            554,
            "Your access to this mail system has been rejected due to the sending MTA's poor reputation.",
            Reason::Blocked,
            true,
        ),
        // Greylisting
        (
            450,
            "4.2.0 <bob@one.example>: Recipient address rejected: Greylisted, see http://postgrey.schweikert.ch/help/one.example.html",
            Reason::Policy,
            false,
        ),
        (
            451,
            "4.7.1 Greylisting in action, please come back later",
            Reason::Policy,
            false,
        ),
        (
            451,
            "Temporary local problem - please try later",
            Reason::SystemError,
            false,
        ),
        // Mailbox full, elsewhere
        (
            552,
            "5.2.2 <bob@one.example>: Recipient address rejected: Mailbox is full",
            Reason::MailboxFull,
            true,
        ),
        (
            452,
            "4.2.2 Quota exceeded (mailbox for user is full)",
            Reason::MailboxFull,
            false,
        ),
        // Too large
        (
            552,
            "5.3.4 Message size exceeds fixed limit",
            Reason::MessageTooLarge,
            true,
        ),
        (
            552,
            "Message size exceeds maximum permitted",
            Reason::MessageTooLarge,
            true,
        ),
        // TLS required
        (
            530,
            "5.7.0 Must issue a STARTTLS command first",
            Reason::Tls,
            true,
        ),
        (
            454,
            "4.7.0 TLS not available due to local problem",
            Reason::Tls,
            false,
        ),
        (550, "5.7.10 Encryption needed", Reason::Tls, true),
        // SPF / DKIM / DMARC
        (
            550,
            "5.7.23 The message was rejected because of Sender Policy Framework violation",
            Reason::AuthFailure,
            true,
        ),
        (
            550,
            "5.7.1 SPF check failed: 192.0.2.1 is not allowed to send mail from acme.example",
            Reason::AuthFailure,
            true,
        ),
        (
            550,
            "5.7.20 No passing DKIM signature found",
            Reason::AuthFailure,
            true,
        ),
        (
            550,
            "5.7.1 Email rejected per DMARC policy for acme.example",
            Reason::AuthFailure,
            true,
        ),
        // Rate limiting
        (
            421,
            "4.7.0 Too many connections from your IP, try again later",
            Reason::RateLimited,
            false,
        ),
        (
            450,
            "4.7.1 Error: too much mail from 192.0.2.1",
            Reason::RateLimited,
            false,
        ),
        // Relaying and routing
        (
            554,
            "5.7.1 <bob@one.example>: Relay access denied",
            Reason::RelayingDenied,
            true,
        ),
        (
            550,
            "5.1.2 Host unknown: Domain one.example has no valid MX record",
            Reason::HostUnknown,
            true,
        ),
        (451, "4.4.0 Routing error", Reason::Network, false),
        (
            421,
            "4.4.2 mx.one.example Error: timeout exceeded",
            Reason::Network,
            false,
        ),
        // The code says one thing, the text another: the text wins where
        // it names a cause, and only the address's own causes suppress.
        (
            450,
            "4.2.1 The user you are trying to contact is receiving mail at a rate that prevents additional messages from being delivered. Please resend your message at a later point.",
            Reason::RateLimited,
            false,
        ),
        (
            550,
            "5.1.1 Service unavailable; client [192.0.2.1] blocked using zen.spamhaus.org",
            Reason::Blocked,
            true,
        ),
        (
            550,
            "mailbox is over quota temporarily (#5.1.1)",
            Reason::MailboxFull,
            true,
        ),
        (
            550,
            "5.1.1 <bob@one.example>: Recipient address rejected: SPF check failed for 192.0.2.1",
            Reason::AuthFailure,
            true,
        ),
        (
            550,
            "5.1.1 Message rejected as spam by Content Filtering.",
            Reason::SpamDetected,
            true,
        ),
        (
            554,
            "5.1.1 Too many messages from 192.0.2.1, slow down",
            Reason::RateLimited,
            true,
        ),
        (
            550,
            "5.2.1 <bob@one.example>... User Unknown",
            Reason::UserUnknown,
            true,
        ),
        (
            550,
            "5.1.7 No such domain sender.example",
            Reason::SenderRejected,
            true,
        ),
        (
            554,
            "5.7.1 <bob@one.example>: Relay access denied",
            Reason::RelayingDenied,
            true,
        ),
        (
            550,
            "Requested action not taken: mailbox unavailable or not local",
            Reason::Other,
            true,
        ),
    ];

    #[test]
    fn real_reply_texts() {
        let mut wrong = Vec::new();
        for (code, text, reason, permanent) in CORPUS {
            let r = Reply::from_wire(*code, text);
            let got = classify_with(&[], r.enhanced, r.code, &r.text);
            if (got.reason, got.permanent) != (*reason, *permanent) {
                wrong.push(format!(
                    "{code} {text}\n  expected {reason:?}/{permanent}, got {got:?}"
                ));
            }
        }
        assert!(CORPUS.len() >= 60);
        assert!(
            wrong.is_empty(),
            "{} of {}:\n{}",
            wrong.len(),
            CORPUS.len(),
            wrong.join("\n")
        );
    }

    fn rules(toml: &str) -> Result<Vec<Rule>, String> {
        toml::from_str::<ClassificationConfig>(toml)
            .map(|c| c.rules)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn configured_rules_run_first() {
        let rules = rules(
            r#"
            [[rules]]
            match = "Greylisted"
            category = "network"
            [[rules]]
            match = "mailbox unavailable"
            status = "5.5"
            category = "other"
            permanent = false
            [[rules]]
            code = 554
            category = "spam_block"
            "#,
        )
        .unwrap();
        let c = |code, text: &str| {
            let r = Reply::from_wire(code, text);
            classify_pair(&rules, r.enhanced, r.code, &r.text)
        };
        // The case of `match` does not matter.
        assert_eq!(
            c(450, "4.2.0 Recipient address rejected: GREYLISTED"),
            (Network, false)
        );
        // All conditions must hold: the status prefix by components.
        assert_eq!(
            c(550, "5.5.0 Requested action not taken: mailbox unavailable"),
            (Other, false)
        );
        assert_eq!(
            c(550, "5.1.1 mailbox unavailable"),
            (InvalidRecipient, true)
        );
        // RFC 5321's words for any 550, not evidence of a missing mailbox.
        assert_eq!(c(550, "mailbox unavailable"), (Other, true));
        assert_eq!(c(554, "5.7.1 Service unavailable"), (SpamBlock, true));
        // No rule: the defaults.
        assert_eq!(c(552, "5.2.2 Mailbox is full"), (MailboxFull, true));
    }

    #[test]
    fn status_prefix_matches_whole_components() {
        let rules = rules("[[rules]]\nstatus = \"5.7.1\"\ncategory = \"other\"").unwrap();
        assert_eq!(
            classify_pair(&rules, Some(Enhanced(5, 7, 1)), 550, "x").0,
            Other
        );
        assert_eq!(
            classify_pair(&rules, Some(Enhanced(5, 7, 10)), 550, "x").0,
            Tls
        );
        assert_eq!(classify_pair(&rules, None, 550, "x").0, Other);
    }

    #[test]
    fn bad_rules_are_refused() {
        for (toml, needle) in [
            ("[[rules]]\ncategory = \"other\"", "at least one of"),
            (
                "[[rules]]\nmatch = \"\"\ncategory = \"other\"",
                "must not be empty",
            ),
            (
                "[[rules]]\nstatus = \"3.1\"\ncategory = \"other\"",
                "not an enhanced status code",
            ),
            (
                "[[rules]]\nstatus = \"5.x\"\ncategory = \"other\"",
                "not an enhanced status code",
            ),
            (
                "[[rules]]\ncode = 700\ncategory = \"other\"",
                "SMTP reply code",
            ),
            (
                "[[rules]]\nmatch = \"x\"\ncategory = \"bogus\"",
                "unknown variant",
            ),
        ] {
            let e = rules(toml).unwrap_err();
            assert!(e.contains(needle), "{toml}: {e}");
        }
    }

    #[test]
    fn config_section_loads_and_errors_name_the_key() {
        let base = "[[listener]]\naddress = \"127.0.0.1:2587\"\n";
        let c = crate::config::Config::from_toml_str(&format!(
            "{base}[classification]\nrules = [{{ match = \"Over Quota\", category = \"mailbox_full\", permanent = false }}]\n"
        ))
        .unwrap();
        assert_eq!(c.classification.rules.len(), 1);
        assert_eq!(
            c.classification.rules[0].needle.as_deref(),
            Some("over quota")
        );

        let errs = crate::config::Config::from_toml_str(&format!(
            "{base}[[classification.rules]]\nmatch = \"x\"\ncategory = \"other\"\n\
             [[classification.rules]]\nstatus = \"9.9\"\ncategory = \"other\"\nwhen = 1\n"
        ))
        .unwrap_err();
        let text = errs.to_string();
        // Both problems, each with its key path.
        assert!(
            text.contains("classification.rules[1].when: unknown key"),
            "{text}"
        );
        assert!(
            text.contains("classification.rules[1]: status \"9.9\" is not an enhanced status code"),
            "{text}"
        );
    }

    #[test]
    fn permanence_without_a_code() {
        // A late bounce that gave only an enhanced code, or nothing.
        assert_eq!(
            classify_pair(&[], Some(Enhanced(5, 1, 1)), 0, ""),
            (InvalidRecipient, true)
        );
        assert_eq!(
            classify_pair(&[], Some(Enhanced(4, 2, 2)), 0, ""),
            (MailboxFull, false)
        );
        assert_eq!(
            classify_pair(&[], None, 0, "user unknown"),
            (InvalidRecipient, false)
        );
    }
}

/// Property tests (STYLE.md point 9): any reply a server sends (any code,
/// enhanced code and text in any Unicode) is classified without panic, and
/// its permanence follows its code; so are configured rules in any script.
#[cfg(test)]
mod prop_tests {
    use super::*;
    use proptest::prelude::*;

    /// Reply text biased to multi-byte characters (and 'İ', which grows
    /// when lower-cased) beside the phrases the defaults look for, or any
    /// Unicode.
    fn reply_text() -> impl Strategy<Value = String> {
        prop_oneof![
            "([245][.][0-9]{1,3}[.][0-9]{1,3} )?[a-zA-Z .:<>@#-]{0,12}[éİ€😀漢ßẞ\u{0}]{0,3}(user unknown|quota|spam|tls|policy|greylist)?[a-zé ]{0,8}",
            "(?s).{0,60}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn any_reply_classifies(
            code in 0u16..1000,
            text in reply_text(),
            needle in "[a-zİé😀 ]{1,6}",
            status in prop::option::of((0u8..10, 0u16..1000, 0u16..1000)),
        ) {
            let reply = Reply::from_wire(code, &text);
            let _ = Classifier::default().classify(&reply);
            let enhanced = status.map(|(c, s, d)| Enhanced(c, s, d));
            let (_, permanent) = classify_pair(&[], enhanced, code, &text);
            match code / 100 {
                5 => prop_assert!(permanent),
                4 => prop_assert!(!permanent),
                _ => {}
            }
            let rule = Rule {
                needle: Some(needle.to_lowercase()),
                status: None,
                code: None,
                category: Classification::Policy,
                reason: Reason::Policy,
                permanent: Some(true),
            };
            let (category, permanent) = classify_pair(&[rule], enhanced, code, &text);
            if text.to_lowercase().contains(&needle.to_lowercase()) {
                prop_assert_eq!((category, permanent), (Classification::Policy, true));
            }
        }
    }
}
