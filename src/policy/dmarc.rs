//! DMARC records and the organizational domain: one reading for the
//! alignment check on every message and for `herald domain check`, so the
//! two cannot disagree.
//!
//! The records are parsed by mail-auth and found by the DMARCbis DNS tree
//! walk (RFC 9989 §4.10), as mail-auth's own verifier does. Where DNS has
//! no answer yet (no DMARC record anywhere above a domain) the registrable
//! domain from the Public Suffix List stands in for the organizational
//! domain: that is where a record would be published.

use std::sync::Arc;

use mail_auth::dmarc::Psd;
pub use mail_auth::dmarc::{Alignment as Mode, Dmarc, Policy};
use mail_auth::hickory_resolver::proto::op::ResponseCode;
use mail_auth::{MessageAuthenticator, ResolverCache, Txt};

/// The DMARC records found above a domain, longest name first.
pub type Walk = Vec<(String, Arc<Dmarc>)>;

/// DNS tree walk (RFC 9989 §4.10): every DMARC record from `domain` up to
/// its top-level domain, longest name first; at most eight queries. A
/// temporary DNS failure is an error; a missing or unparsable record is
/// no record.
pub async fn walk(
    auth: &MessageAuthenticator,
    domain: &str,
    cache: Option<&impl ResolverCache<Box<str>, Txt>>,
) -> Result<Walk, String> {
    let labels: Vec<&str> = domain.split('.').filter(|l| !l.is_empty()).collect();
    let total = labels.len();
    let mut found = Vec::new();
    if total < 2 {
        return Ok(found);
    }
    let mut count = total;
    loop {
        let name = labels[total - count..].join(".");
        let key = format!("_dmarc.{name}.");
        match auth.txt_lookup::<Dmarc>(key, cache).await {
            Ok(record) => {
                let stop = matches!(record.psd, Psd::Yes | Psd::No);
                found.push((name, record));
                if stop {
                    break;
                }
            }
            Err(e) => {
                if let Some(trouble) = dns_trouble(&e) {
                    return Err(trouble);
                }
            }
        }
        if count == 1 {
            break;
        }
        count = if count >= 8 { 7 } else { count - 1 };
    }
    Ok(found)
}

/// [`walk`] without a cache, for one-off checks.
pub async fn walk_uncached(auth: &MessageAuthenticator, domain: &str) -> Result<Walk, String> {
    walk(
        auth,
        domain,
        None::<&mail_auth::common::cache::NoCache<Box<str>, Txt>>,
    )
    .await
}

/// A lookup failure that says nothing about the records (timeout,
/// SERVFAIL, REFUSED), as text; `None` when there simply is no record.
pub fn dns_trouble(e: &mail_auth::Error) -> Option<String> {
    use mail_auth::{DnsError, Error};
    match e {
        Error::Dns(DnsError::RecordNotFound(code))
            if *code == ResponseCode::NXDomain || *code == ResponseCode::NoError =>
        {
            None
        }
        Error::Dns(DnsError::RecordNotFound(code)) => Some(format!("DNS answered {code}")),
        Error::Dns(DnsError::Resolver(reason)) => Some(reason.clone()),
        // No record that parses as DMARC: there is none.
        _ => None,
    }
}

/// The record that applies to a domain and the policy it sets for it.
#[derive(Clone, Debug)]
pub struct Applied {
    /// Where the record is published (without `_dmarc.`).
    pub domain: String,
    pub record: Arc<Dmarc>,
    /// The policy for the domain asked about: `p`, or `sp` when the record
    /// is inherited, lowered one step by `t=y`; `None` for a record with
    /// `rua=` and no `p=`.
    pub policy: Policy,
    /// The record is the domain's own (not inherited).
    pub own: bool,
    pub adkim: Mode,
    pub aspf: Mode,
}

/// RFC 9989 §4.10.1: the author domain's own record, else the
/// organizational domain's (its `sp`), else the shortest one found.
/// `None`: DMARC does not apply.
pub fn applied_policy(walk: &[(String, Arc<Dmarc>)], from: &str) -> Option<Applied> {
    let org = organizational_domain(walk, from);
    let (name, record, own) = if let Some((n, r)) = walk.iter().find(|(n, _)| n == from) {
        (n, r, true)
    } else {
        let (n, r) = walk.iter().find(|(n, _)| n == org).or(walk.last())?;
        (n, r, false)
    };
    let mut policy = if record.p == Policy::Unspecified {
        // Without p=, a record with rua= means p=none; without either,
        // DMARC does not apply.
        if record.rua.is_empty() {
            return None;
        }
        Policy::None
    } else if own {
        record.p
    } else {
        // A non-existent subdomain would get np=; herald's From: domains
        // exist, so sp= applies.
        record.sp
    };
    // t=y: the policy is applied one level lower (RFC 9989 §4.7).
    if record.t {
        policy = match policy {
            Policy::Reject => Policy::Quarantine,
            Policy::Quarantine => Policy::None,
            other => other,
        };
    }
    Some(Applied {
        domain: name.clone(),
        record: record.clone(),
        policy,
        own,
        adkim: record.adkim,
        aspf: record.aspf,
    })
}

/// RFC 9989 §4.10.2: the organizational domain from a tree walk; `start`
/// itself when the walk found nothing.
pub fn organizational_domain<'a>(walk: &'a [(String, Arc<Dmarc>)], start: &'a str) -> &'a str {
    for (name, record) in walk {
        match record.psd {
            Psd::No => return name,
            Psd::Yes if name != start => {
                let depth = name.split('.').count() + 1;
                let labels = start.split('.').count();
                return drop_labels(start, labels.saturating_sub(depth));
            }
            _ => {}
        }
    }
    walk.last().map_or(start, |(n, _)| n.as_str())
}

/// The organizational domain where DNS decides it, else the registrable
/// domain: for advice about records not yet published.
pub fn organizational_or_registrable<'a>(
    walk: &'a [(String, Arc<Dmarc>)],
    start: &'a str,
) -> &'a str {
    if walk.is_empty() {
        registrable_domain(start)
    } else {
        organizational_domain(walk, start)
    }
}

/// The registrable domain of a host name by the Public Suffix List
/// (`mail.example.co.uk` → `example.co.uk`); the name itself when it is a
/// public suffix or not a DNS name.
pub fn registrable_domain(name: &str) -> &str {
    let name = name.trim_end_matches('.');
    // The list is in lower case; ASCII case folding keeps byte offsets.
    let lower = name.to_ascii_lowercase();
    match psl::domain_str(&lower) {
        Some(d) if d.len() <= name.len() => &name[name.len() - d.len()..],
        _ => name,
    }
}

fn drop_labels(domain: &str, n: usize) -> &str {
    let mut rest = domain;
    for _ in 0..n {
        match rest.split_once('.') {
            Some((_, r)) => rest = r,
            None => return "",
        }
    }
    rest
}

/// `domain` is `parent` or below it.
pub fn in_domain(domain: &str, parent: &str) -> bool {
    // Bytes: either name may be UTF-8 (an SMTPUTF8 return path, a DNS
    // name), where `d - p` could fall inside a character.
    let (domain, parent) = (domain.as_bytes(), parent.as_bytes());
    let (d, p) = (domain.len(), parent.len());
    d >= p && domain[d - p..].eq_ignore_ascii_case(parent) && (d == p || domain[d - p - 1] == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;
    use mail_auth::common::parse::TxtRecordParser as _;
    use proptest::prelude::*;

    fn rec(t: &str) -> Arc<Dmarc> {
        Arc::new(Dmarc::parse(t.as_bytes()).unwrap())
    }

    #[test]
    fn organizational_domain_follows_the_tree_walk() {
        // Shortest name with a record.
        let walk = vec![
            ("a.b.example".to_string(), rec("v=DMARC1; p=none")),
            ("b.example".to_string(), rec("v=DMARC1; p=reject")),
        ];
        assert_eq!(organizational_domain(&walk, "a.b.example"), "b.example");
        // psd=y: one label below the public suffix domain.
        let walk = vec![("example".to_string(), rec("v=DMARC1; p=reject; psd=y"))];
        assert_eq!(
            organizational_domain(&walk, "x.acme.example"),
            "acme.example"
        );
        assert_eq!(
            organizational_domain(&[], "x.acme.example"),
            "x.acme.example"
        );
        assert!(in_domain("bounces.Acme.example", "acme.example"));
        assert!(in_domain("acme.example", "acme.example"));
        assert!(!in_domain("notacme.example", "acme.example"));
        assert!(!in_domain("example", "acme.example"));
        // UTF-8 names, the parent's length ending inside a character.
        assert!(!in_domain("ü.example", "x.example"));
        assert!(!in_domain("aé.example", "b.example"));
        assert!(!in_domain("😀", "x"));
        assert!(in_domain("mail.bücher.example", "bücher.example"));
    }

    #[test]
    fn without_records_the_public_suffix_list_decides() {
        assert_eq!(registrable_domain("mail.example.co.uk"), "example.co.uk");
        assert_eq!(registrable_domain("Mail.Example.COM."), "Example.COM");
        assert_eq!(registrable_domain("a.b.müller.de"), "müller.de");
        assert_eq!(registrable_domain("shop.example.com.au"), "example.com.au");
        // Private suffixes of the list count too.
        assert_eq!(registrable_domain("acme.github.io"), "acme.github.io");
        assert_eq!(registrable_domain("co.uk"), "co.uk");
        assert_eq!(
            organizational_or_registrable(&[], "x.acme.co.uk"),
            "acme.co.uk"
        );
        let walk = vec![("x.acme.co.uk".to_string(), rec("v=DMARC1; p=reject"))];
        assert_eq!(
            organizational_or_registrable(&walk, "x.acme.co.uk"),
            "x.acme.co.uk"
        );
    }

    #[test]
    fn applied_policy_uses_sp_for_subdomains_and_t_lowers_it() {
        let walk = vec![(
            "acme.example".to_string(),
            rec("v=DMARC1; p=reject; sp=quarantine"),
        )];
        let own = applied_policy(&walk, "acme.example").unwrap();
        assert_eq!(own.policy, Policy::Reject);
        assert!(own.own);
        let sub = applied_policy(&walk, "mail.acme.example").unwrap();
        assert_eq!(sub.policy, Policy::Quarantine);
        assert_eq!(sub.domain, "acme.example");
        assert!(!sub.own);
        let walk = vec![("acme.example".to_string(), rec("v=DMARC1; p=reject; t=y"))];
        assert_eq!(
            applied_policy(&walk, "acme.example").unwrap().policy,
            Policy::Quarantine
        );
        assert!(applied_policy(&[], "acme.example").is_none());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn domain_names_never_panic(a in "(?s).{0,40}", b in "[a-zé😀.]{0,20}") {
            prop_assert!(in_domain(&a, &a));
            let below = format!("{b}.{a}");
            prop_assert!(in_domain(&below, &a));
            let _ = in_domain(&a, &b);
            let _ = organizational_domain(&[], &a);
            let _ = drop_labels(&a, b.len() % 8);
            let r = registrable_domain(&a);
            prop_assert!(a.trim_end_matches('.').ends_with(r));
        }
    }
}
