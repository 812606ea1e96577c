//! Policy: checks run on a received message before it is accepted, in
//! [`Policy::check`]: header sanity, outbound spam heuristics ([`spam`]),
//! DNS blocklists for the client IP and the message's domains ([`dnsbl`])
//! and whether the message would pass DMARC at the receiver
//! ([`alignment`]); the lookups run concurrently. Each check returns a
//! [`Verdict`]; a check that could not decide (timeout, DNS error) never
//! rejects. [`dkim`] signing runs last, in the receive stage, on a message
//! every check accepted. Rate limits are checked earlier, at MAIL and RCPT
//! (the `limits` module).

pub mod alignment;
pub mod dkim;
pub mod dmarc;
pub mod dnsbl;
pub mod headers;
pub mod spam;

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::Config;
use crate::dns::Dns;
use crate::envelope::Envelope;
pub use crate::event::RejectRule;
use crate::reply::{Enhanced, Reply};
use alignment::Alignment;
use dnsbl::{Dnsbl, Listing, ZoneAction};
use headers::HeaderView;
use spam::{FiredRule, SpamRules};

/// The outcome of the policy stage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    /// 4xx: try again later.
    Tempfail {
        reply: Reply,
        rule: RejectRule,
    },
    /// 5xx: do not send this.
    Reject {
        reply: Reply,
        rule: RejectRule,
    },
}

impl Verdict {
    pub fn reject(
        rule: RejectRule,
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

/// What the policy stage says about one message.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub verdict: Verdict,
    /// The spam score, when spam scoring ran.
    pub spam_score: Option<f64>,
    /// Findings that did not refuse the message (DMARC `warn`, blocklist
    /// `log` listings): logged and put in the `received` event.
    pub warnings: Vec<String>,
    /// The header block as the checks read it; DKIM signing picks its keys
    /// from it.
    pub headers: HeaderView,
}

/// The checks, built once from config.
pub struct Policy {
    spam: SpamRules,
    dnsbl: Dnsbl,
    alignment: Alignment,
    /// `[bounces] return_path_domain`: the envelope domain receivers
    /// check SPF on when VERP is on.
    return_path_domain: Option<String>,
    /// Tenants whose From: header must name one of their own domains
    /// (`bind_from_header`), with their `allowed_senders`.
    from_bound: HashMap<String, Vec<String>>,
}

impl Policy {
    pub fn new(config: &Config, dns: &Dns, dkim: Arc<dkim::Signer>) -> Policy {
        Policy {
            spam: SpamRules::new(&config.policy.spam),
            dnsbl: Dnsbl::new(&config.policy.dnsbl, dns.clone()),
            alignment: Alignment::new(config, dns, dkim),
            return_path_domain: config.bounces.return_path_domain.clone(),
            from_bound: config
                .tenants
                .iter()
                .filter(|t| t.bind_from_header)
                .map(|t| (t.name.clone(), t.allowed_senders.clone()))
                .collect(),
        }
    }

    /// The refusal of a tenant's message whose From: names a domain the
    /// tenant may not send as: the envelope sender alone is not what the
    /// recipient sees (a tenant allowed `*@acme.example` must not write
    /// `From: ceo@victim.org`).
    fn foreign_from(&self, tenant: Option<&str>, from: &[String]) -> Option<Verdict> {
        let patterns = self.from_bound.get(tenant?)?;
        let bad = from.iter().find(|a| {
            let domain = a.rsplit_once('@').map_or("", |(_, d)| d);
            !crate::config::senders::domain_allowed(patterns, domain)
        })?;
        Some(Verdict::reject(
            RejectRule::FromNotAllowed,
            550,
            Enhanced(5, 7, 1),
            format!(
                "Message refused: the From: header address <{bad}> is not allowed for account \"{}\"; its domain must be one of: {}",
                tenant.unwrap_or_default(),
                patterns.join(", ")
            ),
        ))
    }

    /// The domain of the envelope sender receivers will see: the VERP
    /// domain, or the app's own sender's (empty for the null sender).
    fn return_path_domain<'a>(&'a self, envelope: &'a Envelope) -> &'a str {
        match &self.return_path_domain {
            Some(d) if !envelope.sender.is_empty() => d,
            _ => envelope.sender.rsplit_once('@').map_or("", |(_, d)| d),
        }
    }

    /// Runs every check on `message` (as it will be queued, before DKIM
    /// signing).
    pub async fn check(&self, envelope: &Envelope, message: &[u8]) -> Outcome {
        let headers = HeaderView::read(message);
        let mut outcome = self.judge(envelope, message, &headers).await;
        outcome.headers = headers;
        outcome
    }

    async fn judge(&self, envelope: &Envelope, message: &[u8], headers: &HeaderView) -> Outcome {
        let mut outcome = Outcome {
            verdict: Verdict::Accept,
            spam_score: None,
            warnings: Vec::new(),
            headers: HeaderView::default(),
        };
        let FromField {
            address: from,
            domain: from_domain,
            all,
        } = match from_field(headers) {
            Ok(f) => f,
            Err(verdict) => {
                outcome.verdict = verdict;
                return outcome;
            }
        };
        if let Some(verdict) = self.foreign_from(envelope.tenant.as_deref(), &all) {
            outcome.verdict = verdict;
            return outcome;
        }
        let spam = self
            .spam
            .enabled()
            .then(|| self.spam.score_with(message, headers));

        let mut domains = vec![from_domain];
        match &spam {
            Some(report) => domains.extend(report.url_domains.iter().cloned()),
            None if !self.dnsbl.is_empty() => {
                domains.extend(spam::url_domains_with(message, headers))
            }
            None => {}
        }
        // The lookups of both checks at once: each is bounded by its own
        // timeout and cached.
        let (listings, alignment) = tokio::join!(
            self.dnsbl.check(Some(envelope.client_ip), &domains),
            self.alignment.check(
                envelope.tenant.as_deref(),
                &from,
                self.return_path_domain(envelope)
            ),
        );

        if let Some(verdict) = listed(&listings) {
            outcome.verdict = verdict;
            return outcome;
        }
        let (dmarc, warning) = self.alignment.verdict(&alignment);
        outcome.warnings.extend(warning);
        if let Some(verdict) = dmarc {
            outcome.verdict = verdict;
            return outcome;
        }
        for l in listings.iter().filter(|l| l.action == ZoneAction::Log) {
            outcome.warnings.push(describe_listing(l));
        }
        if let Some(mut report) = spam {
            for l in listings.iter().filter(|l| l.action == ZoneAction::Score) {
                report.score += l.weight;
                report.fired.push(FiredRule {
                    name: "dnsbl_listed",
                    weight: l.weight,
                    detail: describe_listing(l),
                });
            }
            outcome.spam_score = Some(report.score);
            if report.score >= self.spam.threshold() {
                outcome.verdict = spam_refusal(&report.fired, report.score, self.spam.threshold());
                return outcome;
            }
        }
        outcome
    }
}

/// The From: header's addresses.
#[derive(Debug, PartialEq, Eq)]
struct FromField {
    /// The first address: the one DMARC judges.
    address: String,
    /// Its domain, lower case.
    domain: String,
    /// Every address of the field (RFC 5322 allows a list).
    all: Vec<String>,
}

/// The From: addresses, or the refusal of a message without a usable
/// From: (RFC 5322 §3.6.2).
fn from_field(headers: &HeaderView) -> Result<FromField, Verdict> {
    headers
        .from_address()
        .and_then(|a| {
            let (_, d) = a.rsplit_once('@')?;
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            (!d.is_empty()).then(|| FromField {
                address: a.to_string(),
                domain: d,
                all: headers.from.clone(),
            })
        })
        .ok_or_else(|| {
            Verdict::reject(
                RejectRule::HeaderFrom,
                550,
                Enhanced(5, 6, 0),
                "Message refused: it has no From: header field with a valid address (RFC 5322 section 3.6.2)",
            )
        })
}

fn describe_listing(l: &Listing) -> String {
    match &l.reason {
        Some(reason) => format!("{} is listed by {}: {reason}", l.listed, l.zone),
        None => format!("{} is listed by {}", l.listed, l.zone),
    }
}

/// The refusal for the first blocklist listing whose action is reject.
fn listed(listings: &[Listing]) -> Option<Verdict> {
    let l = listings.iter().find(|l| l.action == ZoneAction::Reject)?;
    Some(Verdict::reject(
        RejectRule::Dnsbl,
        554,
        Enhanced(5, 7, 1),
        format!("Message refused: {}", describe_listing(l)),
    ))
}

/// 550 5.7.1 naming each rule that fired, heaviest first.
fn spam_refusal(fired: &[FiredRule], score: f64, threshold: f64) -> Verdict {
    let mut fired: Vec<&FiredRule> = fired.iter().filter(|r| r.weight > 0.0).collect();
    fired.sort_by(|a, b| b.weight.total_cmp(&a.weight));
    let rules: Vec<String> = fired
        .iter()
        .map(|r| format!("{} ({:.1})", r.name, r.weight))
        .collect();
    Verdict::reject(
        RejectRule::SpamScore,
        550,
        Enhanced(5, 7, 1),
        format!(
            "Message refused as likely spam: score {score:.1} reaches the threshold {threshold:.1}; rules: {}",
            rules.join(", ")
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_address_needs_an_address() {
        let from_address = |m: &[u8]| from_field(&HeaderView::read(m));
        let f = from_address(b"From: Billing <Billing@Acme.Example>\r\n\r\nhi\r\n").unwrap();
        assert_eq!(
            (f.address.as_str(), f.domain.as_str()),
            ("Billing@Acme.Example", "acme.example")
        );
        let f = from_address(
            "From: Grünbäume GmbH <billing@acme.example>, ceo@victim.org\r\n\r\nhi\r\n".as_bytes(),
        )
        .unwrap();
        assert_eq!(f.all, ["billing@acme.example", "ceo@victim.org"]);
        for bad in [&b"Subject: x\r\n\r\nhi\r\n"[..], b"From: nobody\r\n\r\n"] {
            match from_address(bad) {
                Err(Verdict::Reject { rule, reply }) => {
                    assert_eq!(rule, RejectRule::HeaderFrom);
                    assert_eq!(reply.code, 550);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn spam_refusal_lists_rules_heaviest_first() {
        let fired = [
            FiredRule {
                name: "subject_caps",
                weight: 1.5,
                detail: String::new(),
            },
            FiredRule {
                name: "html_only",
                weight: 4.0,
                detail: String::new(),
            },
        ];
        let Verdict::Reject { reply, rule } = spam_refusal(&fired, 5.5, 5.0) else {
            panic!()
        };
        assert_eq!((rule, reply.code), (RejectRule::SpamScore, 550));
        assert_eq!(reply.enhanced, Some(Enhanced(5, 7, 1)));
        assert!(
            reply
                .text
                .ends_with("rules: html_only (4.0), subject_caps (1.5)"),
            "{}",
            reply.text
        );
    }

    #[test]
    fn a_reject_listing_names_zone_and_reason() {
        let l = Listing {
            zone: "zen.example".into(),
            listed: "192.0.2.1".into(),
            action: ZoneAction::Reject,
            weight: 1.0,
            reason: Some("https://zen.example/query/ip/192.0.2.1".into()),
        };
        let mut log = l.clone();
        log.action = ZoneAction::Log;
        assert_eq!(listed(std::slice::from_ref(&log)), None);
        let Some(Verdict::Reject { reply, rule }) = listed(&[log, l]) else {
            panic!()
        };
        assert_eq!((rule, reply.code), (RejectRule::Dnsbl, 554));
        assert_eq!(
            reply.text,
            "Message refused: 192.0.2.1 is listed by zen.example: https://zen.example/query/ip/192.0.2.1"
        );
    }
}
