//! Policy: checks run on a received message before it is accepted. Each
//! check returns a [`Verdict`]; a check that could not decide (timeout, DNS
//! error) never rejects. DKIM, SPF/DMARC alignment, DNSBL, rate limits and
//! spam scoring plug in here (see the policy issue); for now the header
//! sanity checks that every relay needs.

use crate::reply::{Enhanced, Reply};

/// The outcome of the policy stage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    /// 4xx: try again later.
    Tempfail { reply: Reply, rule: &'static str },
    /// 5xx: do not send this.
    Reject { reply: Reply, rule: &'static str },
}

impl Verdict {
    pub fn reject(rule: &'static str, code: u16, enhanced: Enhanced, text: impl Into<String>) -> Verdict {
        Verdict::Reject {
            reply: Reply::new(code, enhanced, text),
            rule,
        }
    }
}
