//! Why a delivery failed, from the reply that said so: the enhanced status
//! code first (RFC 3463, with the registry of RFC 5248), then a few plain
//! text rules for servers that send none or send a vague one (`5.0.0`,
//! Outlook's `5.5.0 mailbox unavailable`).
//!
//! It trusts nothing about the text: any bytes, any case, any length. The
//! result only labels a failure; whether it is permanent is decided by the
//! reply code, never here.
//!
//! Self-contained on purpose: the bounces issue moves this into `report`
//! with configurable rules.

use crate::reply::Reply;
use crate::report::Classification;

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

/// Labels a failure reply for events and bounces.
pub fn classify(reply: &Reply) -> Classification {
    let text = reply.text.to_ascii_lowercase();
    let has = |words: &[&str]| words.iter().any(|w| text.contains(w));
    let by_text = || -> Option<Classification> {
        if has(SENDER) {
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

    if let Some(e) = reply.enhanced {
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
    match reply.code {
        421 => Classification::Network,
        _ => Classification::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Classification::*;

    fn c(code: u16, text: &str) -> Classification {
        classify(&Reply::from_wire(code, text))
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
