//! Why a delivery failed, from the reply that said so: first the rules of
//! `[classification]` in the config (see [`Rule`]), then the built-in
//! defaults: the enhanced status code (RFC 3463, with the registry of RFC
//! 5248), then a few plain text rules for servers that send none or send a
//! vague one (`5.0.0`, Outlook's `5.5.0 mailbox unavailable`).
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
    /// basic code (0 when a late bounce gave none) and the text. Returns
    /// the category and whether the failure is permanent.
    pub fn classify_parts(
        &self,
        enhanced: Option<Enhanced>,
        code: u16,
        text: &str,
    ) -> (Classification, bool) {
        classify_with(&self.rules, enhanced, code, text)
    }

    /// Labels a failure reply for events and bounces.
    pub fn classify(&self, reply: &Reply) -> Classification {
        self.classify_parts(reply.enhanced, reply.code, &reply.text)
            .0
    }
}

/// [`Classifier::classify_parts`] with the given rules.
pub fn classify_with(
    rules: &[Rule],
    enhanced: Option<Enhanced>,
    code: u16,
    text: &str,
) -> (Classification, bool) {
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
        return (rule.category, rule.permanent.unwrap_or(permanent));
    }
    (built_in(enhanced, code, &lower), permanent)
}

/// Text that points at the sender rather than the recipient (checked first,
/// since such replies often also say "rejected" or "unknown").
const SENDER: &[&str] = &[
    "sender address rejected",
    "sender verify",
    "sender domain",
    "sender rejected",
    "sender is not allowed",
];
const MAILBOX_FULL: &[&str] = &[
    "mailbox full",
    "mailbox is full",
    "mailbox has exceeded",
    "over quota",
    "overquota",
    "quota exceeded",
    "exceeded quota",
    "exceeds quota",
    "quota",
    "out of storage",
    "insufficient storage",
    "storage space",
    "exceeded storage",
];
const TOO_LARGE: &[&str] = &[
    "message too large",
    "message too big",
    "too large",
    "too big",
    "size limit",
    "exceeds size",
    "size exceeds",
    "message size",
    "maximum size",
];
const SPAM: &[&str] = &[
    "spam",
    "unsolicited",
    "blocklist",
    "block list",
    "blacklist",
    "black list",
    "denylist",
    "blocked using",
    "listed at",
    "listed in",
    "listed on",
    "dnsbl",
    "spamhaus",
    "spamcop",
    "barracuda",
    "reputation",
    "complaint",
    "junk",
    "bulk mail",
];
const INVALID_RECIPIENT: &[&str] = &[
    "user unknown",
    "unknown user",
    "unknown recipient",
    "no such user",
    "no such recipient",
    "no such mailbox",
    "mailbox not found",
    "mailbox unavailable",
    "mailbox does not exist",
    "address does not exist",
    "account does not exist",
    "does not exist",
    "doesn't exist",
    "doesn't have a",
    "not a valid recipient",
    "invalid recipient",
    "recipient address rejected",
    "recipient rejected",
    "unrouteable address",
    "unroutable address",
    "address rejected",
    "mailbox disabled",
    "account disabled",
    "account has been disabled",
    "user not found",
    "recipient not found",
];
const POLICY: &[&str] = &[
    "policy",
    "policies",
    "prohibit",
    "not authorized",
    "not permitted",
    "unauthenticated",
    "authentication",
    "spf",
    "dkim",
    "dmarc",
    "relay",
    "access denied",
    "blocked",
    "greylist",
    "graylist",
    "rate limit",
    "too many",
];
const TLS: &[&str] = &["tls", "encryption", "certificate"];
const GREYLIST: &[&str] = &["greylist", "graylist", "grey-list", "gray-list"];

/// The built-in defaults; `text` is lower-cased.
fn built_in(enhanced: Option<Enhanced>, code: u16, text: &str) -> Classification {
    let has = |words: &[&str]| words.iter().any(|w| text.contains(w));
    let by_text = || -> Option<Classification> {
        // Greylisting texts often say "Recipient address rejected" too.
        if has(GREYLIST) || has(SENDER) {
            Some(Classification::Policy)
        } else if has(MAILBOX_FULL) {
            Some(Classification::MailboxFull)
        } else if has(TOO_LARGE) {
            Some(Classification::MessageTooLarge)
        } else if has(SPAM) {
            Some(Classification::SpamBlock)
        } else if has(INVALID_RECIPIENT) {
            Some(Classification::InvalidRecipient)
        } else if has(POLICY) {
            Some(Classification::Policy)
        } else if has(TLS) {
            Some(Classification::Tls)
        } else {
            None
        }
    };

    if let Some(e) = enhanced {
        use Classification::*;
        let by_code = match (e.1, e.2) {
            // x.1.7 bad sender mailbox syntax, x.1.8 bad sender system address.
            (1, 7 | 8) => Some(Policy),
            // x.1.10: the recipient's domain has a null MX (RFC 7505): that
            // address can never get mail, like an unknown user.
            (1, 10) => Some(InvalidRecipient),
            (1, _) if has(SENDER) => Some(Policy),
            (1, _) => Some(InvalidRecipient),
            (2, 1) => Some(InvalidRecipient),
            (2, 2) => Some(MailboxFull),
            (2, 3) | (3, 4) => Some(MessageTooLarge),
            // x.4.3 directory server failure, x.4.4 unable to route.
            (4, 3 | 4) => Some(Dns),
            // Microsoft answers "5.4.1 Recipient address rejected: Access
            // denied" for unknown users; other x.4.x are transport trouble
            // (and herald's own, whose text holds host names: no text rules).
            (4, _) if e.0 == 5 && has(INVALID_RECIPIENT) => Some(InvalidRecipient),
            (4, _) => Some(Network),
            // x.7.4 security features not supported, x.7.5 cryptographic
            // failure, x.7.10 encryption needed.
            (7, 4 | 5 | 10) => Some(Tls),
            // x.7.28 mail flood detected.
            (7, 28) => Some(SpamBlock),
            (7, _) if has(SPAM) => Some(SpamBlock),
            // "4.7.0 TLS required", "5.7.0 Must issue a STARTTLS command first".
            (7, _) if has(TLS) => Some(Tls),
            (7, _) => Some(Policy),
            // x.0.0, x.2.0, x.3.x, x.5.x, x.6.x: too vague, see the text.
            _ => None,
        };
        if let Some(c) = by_code {
            return c;
        }
    }
    if let Some(c) = by_text() {
        return c;
    }
    match code {
        421 => Classification::Network,
        _ => Classification::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Classification::*;

    fn c(code: u16, text: &str) -> Classification {
        Classifier::default().classify(&Reply::from_wire(code, text))
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
            InvalidRecipient
        );
        assert_eq!(
            c(
                550,
                "5.4.1 Recipient address rejected: Access denied. For more information see https://aka.ms/EXOSmtpErrors"
            ),
            InvalidRecipient
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
            SpamBlock
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

    /// (code, text as it follows the code on the wire, category, permanent)
    const CORPUS: &[(u16, &str, Classification, bool)] = &[
        // Gmail
        (
            550,
            "5.1.1 The email account that you tried to reach does not exist. Please try double-checking the recipient's email address for typos or unnecessary spaces.",
            InvalidRecipient,
            true,
        ),
        (
            550,
            "5.2.1 The email account that you tried to reach is disabled.",
            InvalidRecipient,
            true,
        ),
        (
            452,
            "4.2.2 The recipient's inbox is out of storage space. Please direct the recipient to https://support.google.com/mail/?p=OverQuotaTemp",
            MailboxFull,
            false,
        ),
        (
            552,
            "5.2.2 The recipient's inbox is out of storage space and inactive.",
            MailboxFull,
            true,
        ),
        (
            552,
            "5.3.4 Your message exceeded Google's message size limits.",
            MessageTooLarge,
            true,
        ),
        (
            550,
            "5.7.1 [192.0.2.1] Our system has detected that this message is likely unsolicited mail. To reduce the amount of spam sent to Gmail, this message has been blocked.",
            SpamBlock,
            true,
        ),
        (
            421,
            "4.7.28 [192.0.2.1] Our system has detected an unusual rate of unsolicited mail originating from your IP address. To protect our users from spam, mail sent from your IP address has been temporarily rate limited.",
            SpamBlock,
            false,
        ),
        (
            550,
            "5.7.26 This mail is unauthenticated, which poses a security risk to the sender and Gmail users, and has been blocked. The sender must authenticate with at least one of SPF or DKIM.",
            Policy,
            true,
        ),
        (
            550,
            "5.7.26 Unauthenticated email from acme.example is not accepted due to domain's DMARC policy.",
            Policy,
            true,
        ),
        (
            421,
            "4.7.0 [192.0.2.1] Our system has detected that this message is suspicious due to the very low reputation of the sending IP address.",
            SpamBlock,
            false,
        ),
        (
            421,
            "4.7.0 TLS required for RCPT domain, closing connection.",
            Tls,
            false,
        ),
        (
            451,
            "4.3.0 Mail server temporarily rejected message.",
            Other,
            false,
        ),
        (
            550,
            "5.7.25 [192.0.2.1] The IP address sending this message does not have a PTR record setup.",
            Policy,
            true,
        ),
        // Outlook / Office 365
        (
            550,
            "5.5.0 Requested action not taken: mailbox unavailable (S2017062302).",
            InvalidRecipient,
            true,
        ),
        (
            550,
            "5.4.1 Recipient address rejected: Access denied. For more information see https://aka.ms/EXOSmtpErrors",
            InvalidRecipient,
            true,
        ),
        (
            550,
            "5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
            InvalidRecipient,
            true,
        ),
        (
            550,
            "5.7.1 Unfortunately, messages from [192.0.2.1] weren't sent. Please contact your Internet service provider since part of their network is on our block list (S3140).",
            SpamBlock,
            true,
        ),
        (
            451,
            "4.7.650 The mail server [192.0.2.1] has been temporarily rate limited due to IP reputation.",
            SpamBlock,
            false,
        ),
        (
            550,
            "5.7.708 Service unavailable. Access denied, traffic not accepted from this IP.",
            Policy,
            true,
        ),
        (
            554,
            "5.2.2 mailbox full; STOREDRV.Deliver.Exception:QuotaExceededException.MapiExceptionShutoffQuotaExceeded",
            MailboxFull,
            true,
        ),
        (
            550,
            "5.7.509 Access denied, sending domain acme.example does not pass DMARC verification and has a DMARC policy of reject.",
            Policy,
            true,
        ),
        (452, "4.5.3 Too many recipients", Policy, false),
        // Yahoo / AOL
        (
            554,
            "5.7.9 Message not accepted for policy reasons. See https://help.yahoo.com/kb/postmaster/SLN7253.html",
            Policy,
            true,
        ),
        (
            421,
            "4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints",
            SpamBlock,
            false,
        ),
        (
            554,
            "delivery error: dd This user doesn't have a yahoo.com account (bob@yahoo.example) [0]",
            InvalidRecipient,
            true,
        ),
        (
            552,
            "1 Requested mail action aborted, mailbox not found",
            InvalidRecipient,
            true,
        ),
        (
            553,
            "5.7.2 [TSS09] All messages from 192.0.2.1 will be permanently deferred; Retrying will NOT succeed. See https://senders.yahooinc.com/smtp-error-codes",
            Policy,
            true,
        ),
        (
            554,
            "30 Sorry, your message size exceeds 41943040 bytes.",
            MessageTooLarge,
            true,
        ),
        (452, "4.2.2 Mailbox is over quota", MailboxFull, false),
        // iCloud
        (
            550,
            "5.1.1 <bob@icloud.example>: user does not exist",
            InvalidRecipient,
            true,
        ),
        (
            554,
            "5.7.1 [CS01] Message rejected due to local policy.",
            Policy,
            true,
        ),
        (
            552,
            "5.2.2 <bob@icloud.example>: user is over quota",
            MailboxFull,
            true,
        ),
        // GMX / Web.de
        (
            550,
            "Requested action not taken: mailbox unavailable",
            InvalidRecipient,
            true,
        ),
        (
            554,
            "Transaction failed Reject due to policy restrictions. For explanation visit https://postmaster.gmx.net/en/error-messages",
            Policy,
            true,
        ),
        (
            421,
            "gmx.net (mxgmx017) Nemesis ESMTP Service not available No SMTP service Bad DNS PTR resource record.",
            Network,
            false,
        ),
        // Mimecast
        (
            550,
            "Invalid Recipient - https://community.mimecast.com/docs/DOC-1369#550",
            InvalidRecipient,
            true,
        ),
        (
            554,
            "Email rejected due to security policies - https://community.mimecast.com/docs/DOC-1369#554",
            Policy,
            true,
        ),
        (
            451,
            "Internal resource temporarily unavailable - https://community.mimecast.com/docs/DOC-1369#451",
            Other,
            false,
        ),
        (
            550,
            "Rejected by header based Anti-Spoofing policy: billing@acme.example",
            Policy,
            true,
        ),
        // Proofpoint
        (
            554,
            "5.7.1 Blocked - see https://ipcheck.proofpoint.com/?ip=192.0.2.1",
            Policy,
            true,
        ),
        (
            550,
            "5.7.1 Message blocked due to spam content in the message.",
            SpamBlock,
            true,
        ),
        (550, "5.1.1 User Unknown", InvalidRecipient, true),
        // Barracuda
        (
            554,
            "Service unavailable; Client host [192.0.2.1] blocked using Barracuda Reputation; http://www.barracudanetworks.com/reputation/?r=1&ip=192.0.2.1",
            SpamBlock,
            true,
        ),
        (
            550,
            "permanent failure for one or more recipients (bob@one.example:550 No such user)",
            InvalidRecipient,
            true,
        ),
        // Spamhaus and other DNSBL listings
        (
            554,
            "5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org; https://www.spamhaus.org/query/ip/192.0.2.1",
            SpamBlock,
            true,
        ),
        (
            550,
            "5.7.1 Mail from 192.0.2.1 refused - see http://www.spamcop.net/bl.shtml?192.0.2.1",
            SpamBlock,
            true,
        ),
        (
            554,
            "Your access to this mail system has been rejected due to the sending MTA's poor reputation.",
            SpamBlock,
            true,
        ),
        // Greylisting
        (
            450,
            "4.2.0 <bob@one.example>: Recipient address rejected: Greylisted, see http://postgrey.schweikert.ch/help/one.example.html",
            Policy,
            false,
        ),
        (
            451,
            "4.7.1 Greylisting in action, please come back later",
            Policy,
            false,
        ),
        (
            451,
            "Temporary local problem - please try later",
            Other,
            false,
        ),
        // Mailbox full, elsewhere
        (
            552,
            "5.2.2 <bob@one.example>: Recipient address rejected: Mailbox is full",
            MailboxFull,
            true,
        ),
        (
            452,
            "4.2.2 Quota exceeded (mailbox for user is full)",
            MailboxFull,
            false,
        ),
        // Too large
        (
            552,
            "5.3.4 Message size exceeds fixed limit",
            MessageTooLarge,
            true,
        ),
        (
            552,
            "Message size exceeds maximum permitted",
            MessageTooLarge,
            true,
        ),
        // TLS required
        (530, "5.7.0 Must issue a STARTTLS command first", Tls, true),
        (
            454,
            "4.7.0 TLS not available due to local problem",
            Tls,
            false,
        ),
        (550, "5.7.10 Encryption needed", Tls, true),
        // SPF / DKIM / DMARC
        (
            550,
            "5.7.23 The message was rejected because of Sender Policy Framework violation",
            Policy,
            true,
        ),
        (
            550,
            "5.7.1 SPF check failed: 192.0.2.1 is not allowed to send mail from acme.example",
            Policy,
            true,
        ),
        (550, "5.7.20 No passing DKIM signature found", Policy, true),
        (
            550,
            "5.7.1 Email rejected per DMARC policy for acme.example",
            Policy,
            true,
        ),
        // Rate limiting
        (
            421,
            "4.7.0 Too many connections from your IP, try again later",
            Policy,
            false,
        ),
        (
            450,
            "4.7.1 Error: too much mail from 192.0.2.1",
            Policy,
            false,
        ),
        // Relaying and routing
        (
            554,
            "5.7.1 <bob@one.example>: Relay access denied",
            Policy,
            true,
        ),
        (
            550,
            "5.1.2 Host unknown: Domain one.example has no valid MX record",
            InvalidRecipient,
            true,
        ),
        (451, "4.4.0 Routing error", Network, false),
        (
            421,
            "4.4.2 mx.one.example Error: timeout exceeded",
            Network,
            false,
        ),
    ];

    #[test]
    fn real_reply_texts() {
        let mut wrong = Vec::new();
        for (code, text, category, permanent) in CORPUS {
            let r = Reply::from_wire(*code, text);
            let got = classify_with(&[], r.enhanced, r.code, &r.text);
            if got != (*category, *permanent) {
                wrong.push(format!(
                    "{code} {text}\n  expected {category:?}/{permanent}, got {got:?}"
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
            classify_with(&rules, r.enhanced, r.code, &r.text)
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
        assert_eq!(c(550, "mailbox unavailable"), (InvalidRecipient, true));
        assert_eq!(c(554, "5.7.1 Service unavailable"), (SpamBlock, true));
        // No rule: the defaults.
        assert_eq!(c(552, "5.2.2 Mailbox is full"), (MailboxFull, true));
    }

    #[test]
    fn status_prefix_matches_whole_components() {
        let rules = rules("[[rules]]\nstatus = \"5.7.1\"\ncategory = \"other\"").unwrap();
        assert_eq!(
            classify_with(&rules, Some(Enhanced(5, 7, 1)), 550, "x").0,
            Other
        );
        assert_eq!(
            classify_with(&rules, Some(Enhanced(5, 7, 10)), 550, "x").0,
            Tls
        );
        assert_eq!(classify_with(&rules, None, 550, "x").0, Other);
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
            classify_with(&[], Some(Enhanced(5, 1, 1)), 0, ""),
            (InvalidRecipient, true)
        );
        assert_eq!(
            classify_with(&[], Some(Enhanced(4, 2, 2)), 0, ""),
            (MailboxFull, false)
        );
        assert_eq!(
            classify_with(&[], None, 0, "user unknown"),
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
            let (_, permanent) = classify_with(&[], enhanced, code, &text);
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
                permanent: Some(true),
            };
            let (category, permanent) = classify_with(&[rule], enhanced, code, &text);
            if text.to_lowercase().contains(&needle.to_lowercase()) {
                prop_assert_eq!((category, permanent), (Classification::Policy, true));
            }
        }
    }
}
