//! Policy: checks run on a received message before it is accepted. Each
//! check returns a [`Verdict`]; a check that could not decide (timeout, DNS
//! error) never rejects. DKIM, SPF/DMARC alignment, DNSBL, rate limits and
//! spam scoring plug in here (see the policy issue); for now the header
//! sanity checks that every relay needs, and [`dkim`] signing, which the
//! receive stage runs last, on a message every check accepted.

pub mod dkim;

use crate::reply::{Enhanced, Reply};

/// The outcome of the policy stage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    /// 4xx: try again later.
    Tempfail {
        reply: Reply,
        rule: &'static str,
    },
    /// 5xx: do not send this.
    Reject {
        reply: Reply,
        rule: &'static str,
    },
}

impl Verdict {
    pub fn reject(
        rule: &'static str,
        code: u16,
        enhanced: Enhanced,
        text: impl Into<String>,
    ) -> Verdict {
        Verdict::Reject {
            reply: Reply::new(code, enhanced, text),
            rule,
        }
    }
}

/// Header sanity run on every message before it is queued: for now, that
/// the message has a From: field with a parseable address (RFC 5322 §3.6.2).
/// The receive stage calls this with the envelope and the message as it
/// will be stored (Received: field first).
pub fn check(envelope: &crate::queue::Envelope, message: &[u8]) -> Verdict {
    let _ = envelope;
    let from_ok = mail_parser::MessageParser::new()
        .parse_headers(message)
        .as_ref()
        .and_then(|m| m.from())
        .and_then(|a| a.first())
        .and_then(|a| a.address())
        .is_some_and(|a| a.contains('@'));
    if from_ok {
        Verdict::Accept
    } else {
        Verdict::reject(
            "header_from",
            550,
            Enhanced(5, 6, 0),
            "Message refused: it has no From: header field with a valid address (RFC 5322 section 3.6.2)",
        )
    }
}
