//! `herald domain check DOMAIN`: is a customer's sending domain set up so
//! that mail herald sends from it is authenticated and can be answered?
//!
//! Each item gets pass / warn / fail, a one-line finding and, for warn and
//! fail, where possible the exact DNS record to publish. Items: MX (the
//! domain must accept replies and bounces), SPF (one record, syntax, at most
//! 10 DNS lookups and 2 void lookups, herald's sending IPs authorised, the
//! `all` qualifier; RFC 7208), DKIM (herald's key published at
//! `selector._domainkey.DOMAIN`; RFC 6376), DMARC (record, policy, whether
//! herald's mail aligns; RFC 7489), MTA-STS and TLS-RPT records (RFC 8461,
//! RFC 8460), the MTA-STS policy file and each MX host's certificate and
//! TLSA records ([`super::domain_tls`]), and the VERP return-path domain
//! when one is configured (MX for bounces, SPF, alignment).
//!
//! What it trusts: nothing DNS says. Records are parsed (SPF with
//! mail-auth's parser) and evaluated here; a lookup that fails temporarily
//! makes its item "could not check" (warn), never a pass or a fail.
//!
//! DMARC records, the policy that applies and the organizational domain
//! come from [`crate::policy::dmarc`], the same reading the relay applies to
//! every message (the DNS tree walk; the Public Suffix List where no record
//! is published yet).

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use mail_auth::common::parse::TxtRecordParser as _;
use mail_auth::spf::{Macro, Mechanism, Qualifier, Spf, Variables};
use serde::Serialize;

use crate::config::Config;
use crate::dns::{Dns, DnsError};
use crate::policy::dkim::{self, Published, Signer};
use crate::policy::dmarc::{self, Applied, Dmarc, Policy};

/// RFC 7208 §4.6.4: at most 10 terms that cause DNS lookups.
pub const MAX_LOOKUPS: u32 = 10;
/// RFC 7208 §4.6.4: at most 2 lookups that find nothing.
pub const MAX_VOID_LOOKUPS: u32 = 2;

/// The verdict on one item.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

/// What to change: a DNS record to publish, a file to serve or a
/// certificate to install.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Fix {
    /// Owner name without the trailing dot; for `FILE` its URL, for `CERT`
    /// the host to install it on.
    pub name: String,
    /// `TXT`, `MX` or `TLSA` (DNS records), `FILE` (the MTA-STS policy
    /// file), `CERT` (a certificate).
    #[serde(rename = "type")]
    pub rtype: String,
    /// The record's value (one TXT string, unsplit; `10 host.` for MX;
    /// `3 1 1 <hex>` for TLSA); the whole file; the certificate wanted.
    pub value: String,
}

impl Fix {
    fn txt(name: &str, value: impl Into<String>) -> Option<Fix> {
        Some(Fix {
            name: name.to_string(),
            rtype: "TXT".into(),
            value: value.into(),
        })
    }
}

/// One checked item.
#[derive(Clone, Debug, Serialize)]
pub struct Item {
    /// Stable name: `mx`, `spf`, `spf-lookups`, `spf-herald`, `spf-all`,
    /// `dkim`, `dmarc`, `dmarc-alignment`, `mta-sts`, `tls-rpt`,
    /// `mta-sts-policy`, `mta-sts-mx`, `mta-sts-cert`, `dane-tlsa` (the last
    /// three once per MX host), `return-path`, `return-path-mx`,
    /// `return-path-spf...`.
    pub check: String,
    pub status: Status,
    pub finding: String,
    pub fix: Option<Fix>,
}

impl Item {
    pub(super) fn new(
        check: &str,
        status: Status,
        finding: impl Into<String>,
        fix: Option<Fix>,
    ) -> Item {
        Item {
            check: check.to_string(),
            status,
            finding: finding.into(),
            fix,
        }
    }

    pub(super) fn pass(check: &str, finding: impl Into<String>) -> Item {
        Item::new(check, Status::Pass, finding, None)
    }

    pub(super) fn unknown(check: &str, cause: impl fmt::Display) -> Item {
        Item::new(
            check,
            Status::Warn,
            format!("could not check: {cause}"),
            None,
        )
    }
}

/// Counts by status.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    /// The worst status of any item.
    pub status: Option<Status>,
    pub pass: usize,
    pub warn: usize,
    pub fail: usize,
}

/// The whole check of one domain.
#[derive(Clone, Debug, Serialize)]
pub struct DomainReport {
    pub domain: String,
    pub items: Vec<Item>,
    pub summary: Summary,
}

impl DomainReport {
    fn new(domain: String, items: Vec<Item>) -> DomainReport {
        let mut summary = Summary::default();
        for i in &items {
            match i.status {
                Status::Pass => summary.pass += 1,
                Status::Warn => summary.warn += 1,
                Status::Fail => summary.fail += 1,
            }
        }
        summary.status = items.iter().map(|i| i.status).max();
        DomainReport {
            domain,
            items,
            summary,
        }
    }

    /// Any item failed.
    pub fn failed(&self) -> bool {
        self.summary.fail > 0
    }
}

impl fmt::Display for DomainReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "herald domain check: {}", self.domain)?;
        let indent = " ".repeat(32);
        for i in &self.items {
            let status = match i.status {
                Status::Pass => "pass",
                Status::Warn => "warn",
                Status::Fail => "FAIL",
            };
            writeln!(f, "  {status:<5} {:<23} {}", i.check, i.finding)?;
            match i.fix.as_ref() {
                Some(fix) if fix.rtype == "FILE" => {
                    writeln!(f, "{indent}serve:   {} (text/plain):", fix.name)?;
                    for line in fix.value.lines() {
                        writeln!(f, "{indent}           {line}")?;
                    }
                }
                Some(fix) if fix.rtype == "CERT" => {
                    writeln!(f, "{indent}install: on {}: {}", fix.name, fix.value)?;
                }
                Some(fix) => {
                    let value = if fix.rtype == "TXT" {
                        format!("\"{}\"", fix.value)
                    } else {
                        fix.value.clone()
                    };
                    writeln!(f, "{indent}publish: {}. {} {value}", fix.name, fix.rtype)?;
                }
                None => {}
            }
        }
        write!(
            f,
            "result: {} failed, {} warning(s), {} passed",
            self.summary.fail, self.summary.warn, self.summary.pass
        )
    }
}

/// What else to check.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// DKIM selectors to look at besides herald's own keys (another
    /// provider's, a key about to be configured).
    pub selectors: Vec<String>,
}

/// Lower case, no trailing dot, and a plausible DNS name.
pub fn normalize_domain(domain: &str) -> Result<String, String> {
    let d = domain.trim().trim_end_matches('.').to_ascii_lowercase();
    let ok = !d.is_empty()
        && d.len() <= 253
        && d.contains('.')
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(d)
    } else {
        Err(format!(
            "{domain:?} is not a domain name (expected e.g. acme.example)"
        ))
    }
}

/// Checks `domain` with herald's keys, sending IPs and return-path domain
/// from `config`, asking `dns`. Never fails: DNS trouble becomes "could not
/// check" items.
pub async fn check_domain(
    config: &Config,
    dns: &Dns,
    domain: &str,
    opts: &Options,
) -> DomainReport {
    match Signer::load(config) {
        Ok(signer) => check_domain_with_signer(config, &signer, dns, domain, opts).await,
        Err(e) => run(config, Err(e.to_string()), dns, domain, opts).await,
    }
}

/// [`check_domain`] with herald's DKIM keys already loaded (the running
/// relay's, or the CLI's).
pub async fn check_domain_with_signer(
    config: &Config,
    signer: &Signer,
    dns: &Dns,
    domain: &str,
    opts: &Options,
) -> DomainReport {
    run(config, Ok(signer), dns, domain, opts).await
}

async fn run(
    config: &Config,
    signer: Result<&Signer, String>,
    dns: &Dns,
    domain: &str,
    opts: &Options,
) -> DomainReport {
    let domain = match normalize_domain(domain) {
        Ok(d) => d,
        Err(e) => {
            return DomainReport::new(
                domain.to_string(),
                vec![Item::new("domain", Status::Fail, e, None)],
            );
        }
    };
    let ips: Vec<IpAddr> = config.sending_ips().to_vec();
    let helo = config.helo_name().to_string();
    let return_path = config
        .bounces
        .return_path_domain
        .as_deref()
        .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
        .filter(|d| !d.is_empty() && *d != domain);

    let mut items = vec![check_mx(dns, &domain).await];
    let auth = mail_auth::MessageAuthenticator(dns.resolver().clone());
    let walk = dmarc::walk_uncached(&auth, &domain).await;
    let org = match &walk {
        Ok(w) => dmarc::organizational_or_registrable(w, &domain).to_string(),
        Err(_) => dmarc::registrable_domain(&domain).to_string(),
    };

    // SPF of the customer's domain. With a VERP return path, receivers
    // evaluate SPF on the return-path domain (RFC 7208 §2.4: MAIL FROM), so
    // problems here do not affect herald's mail: warn only.
    let spf = SpfTarget {
        domain: domain.clone(),
        prefix: "",
        ips: &ips,
        helo: &helo,
        softened_by: return_path.clone(),
    };
    let (spf_items, customer_spf) = check_spf(dns, &spf).await;
    items.extend(spf_items);

    let (dkim_items, dkim_aligned) = check_dkim(signer, dns, &domain, opts).await;
    items.extend(dkim_items);

    // SPF alignment for DMARC: the MAIL FROM domain is the return path when
    // one is configured, else the app's sender at this domain.
    let mut rp_items = Vec::new();
    let spf_alignment = match &return_path {
        None => customer_spf.map(|pass| {
            pass.then(|| format!("SPF (envelope sender at {domain}, herald's IPs authorised)"))
        }),
        Some(rp) => {
            // Relaxed alignment, as the relay judges it: the return path is
            // in the same organizational domain.
            let rp_org = match dmarc::walk_uncached(&auth, rp).await {
                Ok(w) => dmarc::organizational_or_registrable(&w, rp).to_string(),
                Err(_) => dmarc::registrable_domain(rp).to_string(),
            };
            let aligned = rp_org.eq_ignore_ascii_case(&org);
            rp_items.push(if aligned {
                Item::pass(
                    "return-path",
                    format!(
                        "return path {rp} is in {domain}'s organizational domain: SPF can align under relaxed alignment"
                    ),
                )
            } else {
                Item::new(
                    "return-path",
                    Status::Warn,
                    format!(
                        "return path {rp} is not in {domain}'s organizational domain ({org}): SPF cannot align for DMARC, so DKIM must carry alignment"
                    ),
                    None,
                )
            });
            rp_items.push(check_return_path_mx(config, dns, rp).await);
            let target = SpfTarget {
                domain: rp.clone(),
                prefix: "return-path-",
                ips: &ips,
                helo: &helo,
                softened_by: None,
            };
            let (items, rp_spf) = check_spf(dns, &target).await;
            rp_items.extend(items);
            rp_spf.map(|pass| {
                (pass && aligned)
                    .then(|| format!("SPF (return path {rp}, herald's IPs authorised)"))
            })
        }
    };

    let (dmarc_items, dmarc) = check_dmarc(dns, &domain, walk).await;
    items.extend(dmarc_items);
    items.push(dmarc_alignment(
        &domain,
        &org,
        dmarc,
        dkim_aligned,
        spf_alignment,
        return_path.is_some(),
    ));
    let sts = check_mta_sts(dns, &domain).await;
    let sts_record_ok = sts.status == Status::Pass;
    items.push(sts);
    items.push(check_tls_rpt(dns, &domain).await);
    items.extend(super::domain_tls::check(config, dns, &domain, sts_record_ok).await);
    items.extend(rp_items);
    DomainReport::new(domain, items)
}

// ---------------------------------------------------------------------------
// MX

async fn check_mx(dns: &Dns, domain: &str) -> Item {
    let fix = Some(Fix {
        name: domain.to_string(),
        rtype: "MX".into(),
        value: "10 <your inbound mail server>.".into(),
    });
    match dns.mx_records(domain).await {
        Err(e) => Item::unknown("mx", e),
        Ok(hosts) if hosts.iter().any(|h| h.name.is_empty()) => Item::new(
            "mx",
            Status::Warn,
            format!(
                "{domain} publishes a null MX (RFC 7505): it accepts no mail, so replies and bounces to its addresses are refused (and some receivers refuse mail from it); a sending domain should accept mail"
            ),
            fix,
        ),
        Ok(hosts) if hosts.is_empty() => Item::new(
            "mx",
            Status::Warn,
            format!(
                "{domain} has no MX record: it cannot receive replies and bounces to its addresses; a sending domain should accept mail"
            ),
            fix,
        ),
        Ok(hosts) => Item::pass(
            "mx",
            format!(
                "MX: {}",
                hosts
                    .iter()
                    .map(|h| format!("{} ({})", h.name, h.preference))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
    }
}

async fn check_return_path_mx(config: &Config, dns: &Dns, rp: &str) -> Item {
    let fix = Some(Fix {
        name: rp.to_string(),
        rtype: "MX".into(),
        value: format!("10 {}.", config.server.hostname.trim_end_matches('.')),
    });
    match dns.mx_records(rp).await {
        Err(e) => Item::unknown("return-path-mx", e),
        Ok(hosts) if hosts.is_empty() || hosts.iter().any(|h| h.name.is_empty()) => Item::new(
            "return-path-mx",
            Status::Fail,
            format!(
                "return path {rp} has no usable MX: bounces and complaints sent to it are lost; point it at herald's bounce listener"
            ),
            fix,
        ),
        Ok(hosts) => Item::pass(
            "return-path-mx",
            format!(
                "return path {rp} has MX {} (must reach herald's bounce listener)",
                hosts
                    .iter()
                    .map(|h| format!("{} ({})", h.name, h.preference))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
    }
}

// ---------------------------------------------------------------------------
// SPF

/// One domain whose SPF is checked.
struct SpfTarget<'a> {
    domain: String,
    /// Prefix of the item names (`""` or `"return-path-"`).
    prefix: &'static str,
    ips: &'a [IpAddr],
    helo: &'a str,
    /// The return path that makes this domain's SPF irrelevant to herald's
    /// mail: failures become warnings.
    softened_by: Option<String>,
}

/// Is a TXT record an SPF record (RFC 7208 §4.5: `v=spf1` then a space or
/// the end)?
fn is_spf(txt: &str) -> bool {
    let t = txt.trim_start().as_bytes();
    t.len() >= 6 && t[..6].eq_ignore_ascii_case(b"v=spf1") && t.get(6).is_none_or(|c| *c == b' ')
}

/// The SPF items for one domain, and whether herald's IPs are authorised
/// (`None`: unknown).
async fn check_spf(dns: &Dns, t: &SpfTarget<'_>) -> (Vec<Item>, Option<bool>) {
    let name = |s: &str| format!("{}{s}", t.prefix);
    let d = t.domain.as_str();
    let mut items = Vec::new();
    let records: Vec<String> = match dns.txt(d).await {
        Ok(txt) => txt.into_iter().filter(|r| is_spf(r)).collect(),
        Err(e) => {
            items.push(Item::unknown(&name("spf"), e));
            return (soften(items, t), None);
        }
    };
    if records.is_empty() {
        items.push(Item::new(
            &name("spf"),
            Status::Fail,
            format!("{d} has no SPF record: receivers cannot tell herald's IPs from forgers"),
            Fix::txt(d, recommended_spf(None, t.ips)),
        ));
        return (soften(items, t), Some(false));
    }
    if records.len() > 1 {
        let merged = merge_spf(&records);
        items.push(Item::new(
            &name("spf"),
            Status::Fail,
            format!(
                "{d} has {} SPF records: receivers return permerror (RFC 7208 §4.5); publish one record instead",
                records.len()
            ),
            Fix::txt(d, recommended_spf(Some(&merged), t.ips)),
        ));
        return (soften(items, t), Some(false));
    }
    let record = records[0].trim().to_string();
    let spf = match Spf::parse(record.as_bytes()) {
        Ok(spf) => spf,
        Err(_) => {
            let bad = invalid_terms(&record);
            let cleaned: Vec<&str> = record
                .split_whitespace()
                .filter(|term| !bad.iter().any(|b| b == term))
                .collect();
            items.push(Item::new(
                &name("spf"),
                Status::Fail,
                format!(
                    "{d}'s SPF record has a syntax error (receivers return permerror): {}",
                    if bad.is_empty() {
                        format!("\"{record}\"")
                    } else {
                        format!("invalid term(s) {}", bad.join(" "))
                    }
                ),
                Fix::txt(d, recommended_spf(Some(&cleaned.join(" ")), t.ips)),
            ));
            return (soften(items, t), Some(false));
        }
    };
    items.push(Item::pass(&name("spf"), format!("\"{record}\"")));

    // Lookup count over the whole tree, as a receiver evaluating mail from
    // an IP that matches nothing would count them.
    let mut walk = Walk::default();
    match walk.walk(dns, d.to_string(), spf.clone(), 0).await {
        Err(e) => items.push(Item::unknown(&name("spf-lookups"), e)),
        Ok(()) => {
            let per_domain = walk
                .per_domain
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(dom, n)| format!("{dom} {n}"))
                .collect::<Vec<_>>()
                .join(", ");
            let mut problems = walk.problems.clone();
            if walk.lookups > MAX_LOOKUPS {
                problems.insert(
                    0,
                    format!(
                        "{} DNS lookups, more than the {MAX_LOOKUPS} allowed (RFC 7208 §4.6.4): receivers return permerror; remove includes or replace them with ip4:/ip6: terms ({per_domain})",
                        walk.lookups
                    ),
                );
            }
            if walk.void > MAX_VOID_LOOKUPS {
                problems.push(format!(
                    "{} lookups find nothing, more than the {MAX_VOID_LOOKUPS} allowed (RFC 7208 §4.6.4): receivers return permerror",
                    walk.void
                ));
            }
            if problems.is_empty() {
                let mut finding = format!(
                    "{} DNS lookup(s) of {MAX_LOOKUPS} allowed, {} void of {MAX_VOID_LOOKUPS}",
                    walk.lookups, walk.void
                );
                if !per_domain.is_empty() {
                    finding.push_str(&format!(" ({per_domain})"));
                }
                if !walk.notes.is_empty() {
                    finding.push_str(&format!("; note: {}", walk.notes.join("; ")));
                }
                items.push(Item::pass(&name("spf-lookups"), finding));
            } else {
                items.push(Item::new(
                    &name("spf-lookups"),
                    Status::Fail,
                    problems.join("; "),
                    None,
                ));
            }
        }
    }

    // Does it authorise each of herald's sending IPs?
    let mut authorised = None;
    if t.ips.is_empty() {
        items.push(Item::new(
            &name("spf-herald"),
            Status::Warn,
            "herald's sending IPs are not configured (delivery.public_ips, else delivery.source_ips): cannot tell whether SPF authorises them",
            None,
        ));
    } else {
        let mut missing = Vec::new();
        let mut passed = Vec::new();
        let mut unknown = None;
        for ip in t.ips {
            let mut eval = Eval {
                dns,
                ip: *ip,
                sender: format!("postmaster@{d}"),
                helo: t.helo.to_string(),
                lookups: 0,
                void: 0,
            };
            match eval.check_host(d.to_string()).await {
                (SpfResult::Pass, via) => passed.push(match via {
                    Some(via) => format!("{ip} (via {via})"),
                    None => ip.to_string(),
                }),
                (SpfResult::TempError(e), _) => unknown = Some(e),
                (other, _) => missing.push((*ip, other)),
            }
        }
        if let Some(e) = unknown {
            items.push(Item::unknown(&name("spf-herald"), e));
        } else if missing.is_empty() {
            authorised = Some(true);
            items.push(Item::pass(
                &name("spf-herald"),
                format!("authorises herald's IPs: {}", passed.join(", ")),
            ));
        } else {
            authorised = Some(false);
            let ips: Vec<IpAddr> = missing.iter().map(|(ip, _)| *ip).collect();
            let permerror = missing
                .iter()
                .any(|(_, r)| matches!(r, SpfResult::PermError(_)));
            // Evaluation stops at the first match, so herald's terms first
            // pass its mail before a limit is reached; the record's own
            // errors are the other items' business.
            let (fix, hint) = if permerror {
                (
                    herald_first_spf(&record, t.ips),
                    "; herald's terms first let its mail pass before the error is reached (fix the error too)",
                )
            } else {
                (recommended_spf(Some(&record), &ips), "")
            };
            items.push(Item::new(
                &name("spf-herald"),
                Status::Fail,
                format!(
                    "does not authorise herald's IP(s) {}{hint}",
                    missing
                        .iter()
                        .map(|(ip, r)| format!("{ip} (result: {r})"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                Fix::txt(d, fix),
            ));
        }
    }

    // The `all` at the end of the evaluation: this record's, or the one
    // a redirect= leads to.
    let all = final_all(dns, &spf, d).await;
    match all {
        None => items.push(Item::unknown(
            &name("spf-all"),
            "the record its redirect= leads to could not be read",
        )),
        Some(Some(Qualifier::Fail)) => items.push(Item::pass(&name("spf-all"), "ends in -all")),
        Some(Some(Qualifier::SoftFail)) => items.push(Item::pass(&name("spf-all"), "ends in ~all")),
        Some(q) => {
            let what = match q {
                Some(Qualifier::Pass) => {
                    "ends in +all: every host on the internet may send as this domain"
                }
                Some(Qualifier::Neutral) => {
                    "ends in ?all: mail from other hosts is neutral, so SPF protects nothing"
                }
                _ => "has no all: mail from other hosts is neutral, so SPF protects nothing",
            };
            let missing: Vec<IpAddr> = if authorised == Some(false) {
                t.ips.to_vec()
            } else {
                Vec::new()
            };
            items.push(Item::new(
                &name("spf-all"),
                Status::Warn,
                format!("{what}; end it with ~all (or -all)"),
                Fix::txt(d, recommended_spf(Some(&record), &missing)),
            ));
        }
    }
    (soften(items, t), authorised)
}

/// With a return path configured, the customer domain's SPF does not
/// decide herald's mail: failures become warnings that say why.
fn soften(items: Vec<Item>, t: &SpfTarget<'_>) -> Vec<Item> {
    let Some(rp) = &t.softened_by else {
        return items;
    };
    items
        .into_iter()
        .map(|mut i| {
            if i.status == Status::Fail {
                i.status = Status::Warn;
                i.finding = if i.check.ends_with("spf-herald") {
                    format!(
                        "{} (not needed while herald's mail uses the return path {rp}, where receivers check SPF)",
                        i.finding
                    )
                } else {
                    format!(
                        "{} (herald's mail uses the return path {rp}, where receivers check SPF; this matters for other mail from {})",
                        i.finding, t.domain
                    )
                };
            }
            i
        })
        .collect()
}

/// The terms of `record` that mail-auth's parser refuses, each tried alone.
fn invalid_terms(record: &str) -> Vec<String> {
    record
        .split_whitespace()
        .skip(1)
        .filter(|term| Spf::parse(format!("v=spf1 {term}").as_bytes()).is_err())
        .map(str::to_string)
        .collect()
}

fn is_all_term(term: &str) -> bool {
    term.trim_start_matches(['+', '-', '~', '?'])
        .eq_ignore_ascii_case("all")
}

fn ip_term(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("ip4:{v4}"),
        IpAddr::V6(v6) => format!("ip6:{v6}"),
    }
}

/// The SPF record to publish: `current` with `ip4:`/`ip6:` terms for
/// `add` inserted before its `all` (or before `redirect=`, or at the end),
/// and a missing, `+all` or `?all` turned into `~all`; or a fresh
/// `v=spf1 ip4:… ~all`.
pub fn recommended_spf(current: Option<&str>, add: &[IpAddr]) -> String {
    let mut terms: Vec<String> = match current {
        Some(r) => r.split_whitespace().map(str::to_string).collect(),
        None => vec!["v=spf1".to_string()],
    };
    if terms.is_empty() || !is_spf(&terms[0]) {
        terms.insert(0, "v=spf1".to_string());
    }
    let new: Vec<String> = add
        .iter()
        .map(ip_term)
        .filter(|t| !terms.iter().any(|x| x.eq_ignore_ascii_case(t)))
        .collect();
    let all_at = terms.iter().position(|t| is_all_term(t));
    let redirect_at = terms
        .iter()
        .position(|t| t.to_ascii_lowercase().starts_with("redirect="));
    match (all_at, redirect_at) {
        (Some(i), _) => {
            if !(terms[i].starts_with('-') || terms[i].starts_with('~')) {
                terms[i] = "~all".to_string();
            }
            terms.splice(i..i, new);
        }
        // A redirect supplies the `all` of the record it leads to.
        (None, Some(i)) => {
            terms.splice(i..i, new);
        }
        (None, None) => {
            terms.extend(new);
            terms.push("~all".to_string());
        }
    }
    terms.join(" ")
}

/// `current` with herald's `ip4:`/`ip6:` terms moved to the front.
pub fn herald_first_spf(current: &str, ips: &[IpAddr]) -> String {
    let ours: Vec<String> = ips.iter().map(ip_term).collect();
    let rest = current
        .split_whitespace()
        .skip(1)
        .filter(|t| !ours.iter().any(|o| o.eq_ignore_ascii_case(t)));
    let terms: Vec<String> = std::iter::once("v=spf1".to_string())
        .chain(ours.iter().cloned())
        .chain(rest.map(str::to_string))
        .collect();
    recommended_spf(Some(&terms.join(" ")), &[])
}

/// One record out of several: the terms of all of them, once each, with
/// the first one's `all` at the end.
fn merge_spf(records: &[String]) -> String {
    let mut terms = vec!["v=spf1".to_string()];
    let mut all = None;
    for r in records {
        for t in r.split_whitespace().skip(1) {
            if is_all_term(t) {
                all.get_or_insert_with(|| t.to_string());
            } else if !terms.iter().any(|x| x.eq_ignore_ascii_case(t)) {
                terms.push(t.to_string());
            }
        }
    }
    terms.extend(all);
    terms.join(" ")
}

/// The qualifier of the `all` that ends an evaluation where nothing else
/// matched: the record's own, or that of the record its `redirect=` leads
/// to (`Some(None)`: there is none; `None`: unknown, a lookup failed or a
/// macro is in the way).
async fn final_all(dns: &Dns, spf: &Spf, domain: &str) -> Option<Option<Qualifier>> {
    let mut spf = spf.clone();
    let mut domain = domain.to_string();
    for _ in 0..MAX_LOOKUPS {
        if let Some(all) = spf
            .directives
            .iter()
            .find(|d| d.mechanism == Mechanism::All)
        {
            return Some(Some(all.qualifier.clone()));
        }
        let Some(r) = &spf.redirect else {
            return Some(None);
        };
        domain = static_target(r, &domain)?;
        let records: Vec<String> = dns
            .txt(&domain)
            .await
            .ok()?
            .into_iter()
            .filter(|r| is_spf(r))
            .collect();
        let [one] = records.as_slice() else {
            return None;
        };
        spf = Spf::parse(one.trim().as_bytes()).ok()?;
    }
    None
}

/// DNS lookups a mechanism costs toward the limit of 10 (RFC 7208
/// §4.6.4: include, a, mx, ptr and exists; ip4, ip6 and all cost none).
fn lookup_cost(m: &Mechanism) -> u32 {
    match m {
        Mechanism::All | Mechanism::Ip4 { .. } | Mechanism::Ip6 { .. } => 0,
        Mechanism::Include { .. }
        | Mechanism::A { .. }
        | Mechanism::Mx { .. }
        | Mechanism::Ptr { .. }
        | Mechanism::Exists { .. } => 1,
    }
}

/// A target name that does not depend on the connecting IP or sender.
fn static_target(m: &Macro, current: &str) -> Option<String> {
    match m {
        Macro::None => Some(current.to_string()),
        Macro::Literal(b) => Some(
            String::from_utf8_lossy(b)
                .trim_end_matches('.')
                .to_ascii_lowercase(),
        ),
        _ => None,
    }
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A walk over a record and everything it includes or redirects to,
/// counting the terms that cost DNS lookups.
#[derive(Default)]
struct Walk {
    lookups: u32,
    void: u32,
    /// Per record, in walk order: its own lookup terms.
    per_domain: Vec<(String, u32)>,
    /// Each makes receivers return permerror.
    problems: Vec<String>,
    /// Worth knowing, not errors.
    notes: Vec<String>,
    /// Names on the current include/redirect path (loop detection).
    path: Vec<String>,
}

/// Deeper than this is a loop or abuse; the lookup limit is far exceeded.
const MAX_DEPTH: usize = 12;

impl Walk {
    fn walk<'a>(
        &'a mut self,
        dns: &'a Dns,
        domain: String,
        spf: Spf,
        depth: usize,
    ) -> BoxFuture<'a, Result<(), DnsError>> {
        Box::pin(async move {
            self.path.push(domain.clone());
            let slot = self.per_domain.len();
            self.per_domain.push((domain.clone(), 0));
            let mut own = 0;
            let mut has_all = false;
            for d in spf.directives.iter() {
                let cost = lookup_cost(&d.mechanism);
                own += cost;
                self.lookups += cost;
                match &d.mechanism {
                    Mechanism::All => has_all = true,
                    Mechanism::Ip4 { .. } | Mechanism::Ip6 { .. } => {}
                    Mechanism::Include { macro_string } => {
                        match static_target(macro_string, &domain) {
                            Some(t) => self.follow(dns, &t, "include", depth).await?,
                            None => self.notes.push(format!(
                                "an include in {domain} depends on the sender (macro): its own lookups are not counted"
                            )),
                        }
                    }
                    Mechanism::A { macro_string, .. } => {
                        if let Some(t) = static_target(macro_string, &domain) {
                            let v4 = dns.addresses(&t, false).await?;
                            let v6 = dns.addresses(&t, true).await?;
                            if v4.is_empty() && v6.is_empty() {
                                self.void += 1;
                                self.notes.push(format!("a:{t} has no address"));
                            }
                        }
                    }
                    Mechanism::Mx { macro_string, .. } => {
                        if let Some(t) = static_target(macro_string, &domain) {
                            let hosts = dns.mx_records(&t).await?;
                            if hosts.is_empty() {
                                self.void += 1;
                                self.notes.push(format!("mx:{t} has no MX"));
                            } else if hosts.len() > 10 {
                                self.problems.push(format!(
                                    "mx:{t} has {} MX hosts, more than the 10 allowed (RFC 7208 §4.6.4)",
                                    hosts.len()
                                ));
                            }
                        }
                    }
                    Mechanism::Ptr { .. } => {
                        self.notes.push(format!(
                            "{domain} uses ptr, which RFC 7208 §5.5 says not to use (slow, unreliable; many receivers ignore it)"
                        ));
                    }
                    Mechanism::Exists { macro_string } => {
                        if let Some(t) = static_target(macro_string, &domain)
                            && dns.addresses(&t, false).await?.is_empty()
                        {
                            self.void += 1;
                        }
                    }
                }
            }
            // RFC 7208 §6.1: redirect is ignored when the record has `all`.
            if let (false, Some(r)) = (has_all, &spf.redirect) {
                own += 1;
                self.lookups += 1;
                if let Some(t) = static_target(r, &domain) {
                    self.follow(dns, &t, "redirect", depth).await?;
                }
            }
            self.per_domain[slot].1 = own;
            self.path.pop();
            Ok(())
        })
    }

    /// Fetches and walks an included or redirected-to record.
    async fn follow(
        &mut self,
        dns: &Dns,
        target: &str,
        how: &str,
        depth: usize,
    ) -> Result<(), DnsError> {
        if self.path.iter().any(|p| p == target) {
            self.problems
                .push(format!("{how}:{target} loops back to itself"));
            return Ok(());
        }
        if depth >= MAX_DEPTH || self.lookups > 3 * MAX_LOOKUPS {
            return Ok(());
        }
        let records: Vec<String> = dns
            .txt(target)
            .await?
            .into_iter()
            .filter(|r| is_spf(r))
            .collect();
        match records.as_slice() {
            [] => {
                self.void += 1;
                self.problems.push(format!(
                    "{how}:{target} has no SPF record (receivers return permerror)"
                ));
            }
            [one] => match Spf::parse(one.trim().as_bytes()) {
                Ok(spf) => self.walk(dns, target.to_string(), spf, depth + 1).await?,
                Err(_) => self.problems.push(format!(
                    "{how}:{target} has an invalid SPF record \"{one}\""
                )),
            },
            _ => self.problems.push(format!(
                "{how}:{target} has {} SPF records (receivers return permerror)",
                records.len()
            )),
        }
        Ok(())
    }
}

/// check_host()'s result (RFC 7208 §2.6).
#[derive(Clone, Debug, PartialEq, Eq)]
enum SpfResult {
    Pass,
    Fail,
    SoftFail,
    Neutral,
    None,
    PermError(String),
    TempError(String),
}

impl fmt::Display for SpfResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpfResult::Pass => f.write_str("pass"),
            SpfResult::Fail => f.write_str("fail"),
            SpfResult::SoftFail => f.write_str("softfail"),
            SpfResult::Neutral => f.write_str("neutral"),
            SpfResult::None => f.write_str("none"),
            SpfResult::PermError(e) => write!(f, "permerror: {e}"),
            SpfResult::TempError(e) => write!(f, "temperror: {e}"),
        }
    }
}

fn qualifier_result(q: &Qualifier) -> SpfResult {
    match q {
        Qualifier::Pass => SpfResult::Pass,
        Qualifier::Fail => SpfResult::Fail,
        Qualifier::SoftFail => SpfResult::SoftFail,
        Qualifier::Neutral => SpfResult::Neutral,
    }
}

fn in_net(ip: IpAddr, net: IpAddr, mask4: u32, mask6: u128) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => u32::from(a) & mask4 == u32::from(b) & mask4,
        (IpAddr::V6(a), IpAddr::V6(b)) => u128::from(a) & mask6 == u128::from(b) & mask6,
        _ => false,
    }
}

/// RFC 7208 §4 check_host() for one IP, with its lookup limits.
struct Eval<'a> {
    dns: &'a Dns,
    ip: IpAddr,
    sender: String,
    helo: String,
    lookups: u32,
    void: u32,
}

impl Eval<'_> {
    fn count(&mut self) -> Result<(), SpfResult> {
        self.lookups += 1;
        if self.lookups > MAX_LOOKUPS {
            return Err(SpfResult::PermError(format!(
                "more than {MAX_LOOKUPS} DNS lookups"
            )));
        }
        Ok(())
    }

    fn void_found(&mut self) -> Result<(), SpfResult> {
        self.void += 1;
        if self.void > MAX_VOID_LOOKUPS {
            return Err(SpfResult::PermError(format!(
                "more than {MAX_VOID_LOOKUPS} void lookups"
            )));
        }
        Ok(())
    }

    /// The result, and the term that matched (`include:x` when inside one).
    fn check_host(&mut self, domain: String) -> BoxFuture<'_, (SpfResult, Option<String>)> {
        Box::pin(async move {
            match self.check_host_inner(&domain).await {
                Ok(r) => r,
                Err(r) => (r, None),
            }
        })
    }

    async fn check_host_inner(
        &mut self,
        domain: &str,
    ) -> Result<(SpfResult, Option<String>), SpfResult> {
        let records: Vec<String> = self
            .dns
            .txt(domain)
            .await
            .map_err(|e| SpfResult::TempError(e.to_string()))?
            .into_iter()
            .filter(|r| is_spf(r))
            .collect();
        let record = match records.as_slice() {
            [] => return Ok((SpfResult::None, None)),
            [one] => one.trim().to_string(),
            _ => {
                return Err(SpfResult::PermError(format!(
                    "{domain} has several SPF records"
                )));
            }
        };
        let spf = Spf::parse(record.as_bytes())
            .map_err(|_| SpfResult::PermError(format!("{domain} has an invalid SPF record")))?;
        let mut vars = Variables::new();
        vars.set_ip(&self.ip);
        vars.set_sender(self.sender.clone().into_bytes());
        vars.set_domain(domain.as_bytes().to_vec());
        vars.set_helo_domain(self.helo.clone().into_bytes());
        let expand = |m: &Macro| -> String {
            m.eval(&vars, domain, false)
                .trim_end_matches('.')
                .to_ascii_lowercase()
        };
        let v6 = self.ip.is_ipv6();
        for d in spf.directives.iter() {
            let (matched, via) = match &d.mechanism {
                Mechanism::All => (true, "all".to_string()),
                Mechanism::Ip4 { addr, mask } => (
                    in_net(self.ip, IpAddr::V4(*addr), *mask, 0),
                    format!("ip4:{addr}/{}", mask.count_ones()),
                ),
                Mechanism::Ip6 { addr, mask } => (
                    in_net(self.ip, IpAddr::V6(*addr), 0, *mask),
                    format!("ip6:{addr}/{}", mask.count_ones()),
                ),
                Mechanism::A {
                    macro_string,
                    ip4_mask,
                    ip6_mask,
                } => {
                    self.count()?;
                    let target = expand(macro_string);
                    let found = self
                        .dns
                        .addresses(&target, v6)
                        .await
                        .map_err(|e| SpfResult::TempError(e.to_string()))?;
                    if found.is_empty() {
                        self.void_found()?;
                    }
                    (
                        found
                            .iter()
                            .any(|a| in_net(self.ip, *a, *ip4_mask, *ip6_mask)),
                        format!("a:{target}"),
                    )
                }
                Mechanism::Mx {
                    macro_string,
                    ip4_mask,
                    ip6_mask,
                } => {
                    self.count()?;
                    let target = expand(macro_string);
                    let hosts = self
                        .dns
                        .mx_records(&target)
                        .await
                        .map_err(|e| SpfResult::TempError(e.to_string()))?;
                    if hosts.is_empty() {
                        self.void_found()?;
                    }
                    if hosts.len() > 10 {
                        return Err(SpfResult::PermError(format!(
                            "mx:{target} has more than 10 MX hosts"
                        )));
                    }
                    let mut m = false;
                    for h in hosts.iter().filter(|h| !h.name.is_empty()) {
                        let found = self
                            .dns
                            .addresses(&h.name, v6)
                            .await
                            .map_err(|e| SpfResult::TempError(e.to_string()))?;
                        if found
                            .iter()
                            .any(|a| in_net(self.ip, *a, *ip4_mask, *ip6_mask))
                        {
                            m = true;
                            break;
                        }
                    }
                    (m, format!("mx:{target}"))
                }
                // Not evaluated (no reverse lookups here; RFC 7208 §5.5
                // says not to use it): it never matches.
                Mechanism::Ptr { .. } => {
                    self.count()?;
                    (false, String::new())
                }
                Mechanism::Exists { macro_string } => {
                    self.count()?;
                    let target = expand(macro_string);
                    let found = self
                        .dns
                        .addresses(&target, false)
                        .await
                        .map_err(|e| SpfResult::TempError(e.to_string()))?;
                    if found.is_empty() {
                        self.void_found()?;
                    }
                    (!found.is_empty(), format!("exists:{target}"))
                }
                Mechanism::Include { macro_string } => {
                    self.count()?;
                    let target = expand(macro_string);
                    // RFC 7208 §5.2: only pass matches; none is permerror.
                    match self.check_host(target.clone()).await {
                        (SpfResult::Pass, _) => (true, format!("include:{target}")),
                        (SpfResult::Fail | SpfResult::SoftFail | SpfResult::Neutral, _) => {
                            (false, String::new())
                        }
                        (SpfResult::TempError(e), _) => return Err(SpfResult::TempError(e)),
                        (SpfResult::None, _) => {
                            return Err(SpfResult::PermError(format!(
                                "include:{target} has no SPF record"
                            )));
                        }
                        (p @ SpfResult::PermError(_), _) => return Err(p),
                    }
                }
            };
            if matched {
                return Ok((qualifier_result(&d.qualifier), Some(via)));
            }
        }
        if let Some(r) = &spf.redirect {
            self.count()?;
            let target = expand(r);
            return match self.check_host(target.clone()).await {
                (SpfResult::None, _) => Err(SpfResult::PermError(format!(
                    "redirect={target} has no SPF record"
                ))),
                (r, via) => Ok((r, via.or(Some(format!("redirect={target}"))))),
            };
        }
        Ok((SpfResult::Neutral, None))
    }
}

// ---------------------------------------------------------------------------
// DKIM

/// The DKIM items, and the aligned signing domain when one of herald's keys
/// for this domain is published correctly (`Err`: unknown).
async fn check_dkim(
    signer: Result<&Signer, String>,
    dns: &Dns,
    domain: &str,
    opts: &Options,
) -> (Vec<Item>, Result<Option<String>, String>) {
    let mut items = Vec::new();
    let signer = match signer {
        Ok(s) => s,
        Err(e) => {
            let msg = format!("herald's DKIM keys cannot be loaded: {e}");
            items.push(Item::new("dkim", Status::Fail, msg.clone(), None));
            return (items, Err(msg));
        }
    };
    // The keys that sign this domain's mail: its own, or its nearest
    // parent's (relaxed alignment); not the fallback keys of another domain.
    let probe = format!("postmaster@{domain}");
    let keys: Vec<_> = signer
        .keys_for(None, Some(&probe))
        .iter()
        .filter(|k| domain == k.domain || domain.ends_with(&format!(".{}", k.domain)))
        .cloned()
        .collect();
    let mut aligned: Result<Option<String>, String> = Ok(None);
    let mut checked = HashSet::new();
    if keys.is_empty() {
        let fallback = signer
            .keys_for(None, Some(&probe))
            .first()
            .map(|k| {
                format!(
                    "its mail is signed only with the fallback key d={} (valid, not aligned for DMARC)",
                    k.domain
                )
            })
            .unwrap_or_else(|| "its mail goes out unsigned".to_string());
        items.push(Item::new(
            "dkim",
            Status::Fail,
            format!(
                "herald has no DKIM key for {domain}: {fallback}; run `herald dkim keygen --domain {domain} --selector herald1`, add the [[dkim]] table it prints to the config and publish the TXT record it prints"
            ),
            None,
        ));
    }
    for key in &keys {
        checked.insert(key.selector.to_ascii_lowercase());
        let name = key.dns_name();
        let record = key.txt_record();
        // The public half, read back from the record herald would publish.
        let public = record
            .rsplit_once("p=")
            .and_then(|(_, p)| BASE64.decode(p).ok())
            .unwrap_or_default();
        let found = match dns.txt(&name).await {
            Ok(records) => dkim::compare_published(key.algorithm, &public, &records),
            Err(e) => Published::Unknown(e.to_string()),
        };
        let fix = Fix::txt(&name, record.clone());
        items.push(match found {
            Published::Matches => {
                if aligned == Ok(None) {
                    aligned = Ok(Some(key.domain.clone()));
                }
                Item::pass(
                    "dkim",
                    format!("{name} publishes herald's key ({} bits)", key.bits),
                )
            }
            Published::Missing => Item::new(
                "dkim",
                Status::Fail,
                format!(
                    "{name} is not published: receivers cannot verify herald's signatures for {domain}"
                ),
                fix,
            ),
            Published::Revoked => Item::new(
                "dkim",
                Status::Fail,
                format!("{name} is revoked (empty p=): herald's signatures fail"),
                fix,
            ),
            Published::Mismatch => Item::new(
                "dkim",
                Status::Fail,
                format!(
                    "{name} publishes a different key than herald signs with: its signatures fail; publish herald's key (or fix dkim[{}].key)",
                    key.index
                ),
                fix,
            ),
            Published::Unknown(e) => {
                if aligned == Ok(None) {
                    aligned = Err(e.clone());
                }
                Item::unknown("dkim", format!("{name}: {e}"))
            }
        });
    }
    for selector in &opts.selectors {
        if !checked.insert(selector.to_ascii_lowercase()) {
            continue;
        }
        let name = format!("{selector}._domainkey.{domain}");
        items.push(match dns.txt(&name).await {
            Err(e) => Item::unknown("dkim", e),
            Ok(records) => match dkim_record_state(&records) {
                Ok(k) => Item::pass(
                    "dkim",
                    format!("{name} publishes a {k} key (not one of herald's keys)"),
                ),
                Err(e) => Item::new("dkim", Status::Fail, format!("{name}: {e}"), None),
            },
        });
    }
    (items, aligned)
}

/// A DKIM key record's key type, or what is wrong with it.
fn dkim_record_state(records: &[String]) -> Result<String, String> {
    let Some(r) = records
        .iter()
        .find(|r| r.contains("p=") || r.trim_start().starts_with("v=DKIM1"))
    else {
        return Err("no DKIM key record".into());
    };
    let mut k = "rsa".to_string();
    let mut p = None;
    for tag in r.split(';') {
        let Some((name, value)) = tag.split_once('=') else {
            continue;
        };
        match name.trim() {
            "v" if value.trim() != "DKIM1" => {
                return Err(format!("v={} is not DKIM1", value.trim()));
            }
            "k" => k = value.trim().to_string(),
            "p" => p = Some(value.split_whitespace().collect::<String>()),
            _ => {}
        }
    }
    match p {
        None => Err("the record has no p= (public key)".into()),
        Some(p) if p.is_empty() => Err("the key is revoked (empty p=)".into()),
        Some(p) if BASE64.decode(&p).is_err() => Err("p= is not valid base64".into()),
        Some(_) => Ok(k),
    }
}

// ---------------------------------------------------------------------------
// DMARC

/// What is wrong with a DMARC record, naming the tag (RFC 7489 §6.3,
/// RFC 9989 §4.7); `None` when nothing is. Only explains: what the record
/// means is mail-auth's reading ([`crate::policy::dmarc`]).
pub fn dmarc_syntax_error(record: &str) -> Option<String> {
    let mut tags: Vec<(String, String)> = Vec::new();
    for part in record.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = part.split_once('=') else {
            return Some(format!("\"{part}\" is not a tag=value pair"));
        };
        let k = k.trim().to_ascii_lowercase();
        if tags.iter().any(|(t, _)| *t == k) {
            return Some(format!("the tag {k}= appears twice"));
        }
        tags.push((k, v.trim().to_string()));
    }
    match tags.first() {
        Some((k, v)) if k == "v" && v == "DMARC1" => {}
        _ => return Some("the record must start with v=DMARC1".into()),
    }
    for (k, v) in &tags[1..] {
        let l = v.to_ascii_lowercase();
        let problem = match k.as_str() {
            "p" | "sp" | "np" if !["none", "quarantine", "reject"].contains(&l.as_str()) => {
                format!("{k}={v} is not a policy (none, quarantine or reject)")
            }
            "adkim" | "aspf" if !["r", "s"].contains(&l.as_str()) => {
                format!("{k}={v} is not r or s")
            }
            "pct" if v.parse::<u8>().ok().is_none_or(|n| n > 100) => {
                format!("pct={v} is not a number from 0 to 100")
            }
            "t" | "psd" if !["y", "n", "u"].contains(&l.as_str()) || (k == "t" && l == "u") => {
                format!("{k}={v} is not y or n")
            }
            "rua" | "ruf" => match v.split(',').map(str::trim).find(|u| {
                let l = u.to_ascii_lowercase();
                !((l.starts_with("mailto:") && u.contains('@'))
                    || l.starts_with("https:")
                    || l.starts_with("http:"))
            }) {
                Some(u) => format!("{k}= \"{u}\" is not a mailto: or https: URI"),
                None => continue,
            },
            // fo, rf, ri and unknown tags are ignored (RFC 7489 §6.3).
            _ => continue,
        };
        return Some(problem);
    }
    // Without p=, rua= alone means p=none (RFC 9989 §4.7); without either
    // the record does nothing.
    if !tags.iter().any(|(k, _)| k == "p" || k == "rua") {
        return Some("the record has no p= (required)".into());
    }
    if Dmarc::parse(record.as_bytes()).is_err() {
        return Some("the record does not parse as DMARC".into());
    }
    None
}

/// A policy as DMARC records write it.
fn policy_name(p: Policy) -> &'static str {
    match p {
        Policy::Reject => "reject",
        Policy::Quarantine => "quarantine",
        Policy::None | Policy::Unspecified => "none",
    }
}

/// `record` with `tag=value` set: replaced where it is, else appended.
fn dmarc_with(record: &str, tag: &str, value: &str) -> String {
    let mut parts: Vec<String> = record
        .split(';')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    let new = format!("{tag}={value}");
    match parts.iter().position(|p| {
        p.split_once('=')
            .is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case(tag))
    }) {
        Some(i) => parts[i] = new,
        None => parts.push(new),
    }
    parts.join("; ")
}

/// The DMARC record that applies to the domain, for the alignment item.
type DmarcFound = Applied;

/// The TXT records at `name` whose first tag is `v=DMARC1` (spaces around
/// `=` and the case of the value as mail-auth accepts them).
async fn dmarc_records(dns: &Dns, name: &str) -> Result<Vec<String>, DnsError> {
    let is_dmarc = |r: &str| {
        let first: String = r
            .split(';')
            .next()
            .unwrap_or("")
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        first.eq_ignore_ascii_case("v=DMARC1")
    };
    dns.txt(name).await.map(|v| {
        v.into_iter()
            .filter(|r| is_dmarc(r))
            .map(|r| r.trim().to_string())
            .collect()
    })
}

/// Receivers ignore every DMARC record at a name that has more than one.
fn several_records(at: &str, records: &[String]) -> Item {
    Item::new(
        "dmarc",
        Status::Fail,
        format!(
            "{at} has {} DMARC records: receivers ignore them all (RFC 7489 §6.6.3); keep one",
            records.len()
        ),
        Fix::txt(at, records[0].clone()),
    )
}

async fn check_dmarc(
    dns: &Dns,
    domain: &str,
    walk: Result<dmarc::Walk, String>,
) -> (Vec<Item>, Result<Option<DmarcFound>, String>) {
    let name = format!("_dmarc.{domain}");
    let item =
        |status, finding: String, fix| (vec![Item::new("dmarc", status, finding, fix)], Ok(None));
    let suggested = format!("v=DMARC1; p=none; rua=mailto:dmarc@{domain}");
    let own = match dmarc_records(dns, &name).await {
        Ok(r) => r,
        Err(e) => return (vec![Item::unknown("dmarc", &e)], Err(e.to_string())),
    };
    // The domain's own records first: broken ones are the customer's to fix
    // even where receivers fall back to a parent's.
    if own.len() > 1 {
        return (vec![several_records(&name, &own)], Ok(None));
    }
    if let [one] = own.as_slice()
        && let Some(e) = dmarc_syntax_error(one)
    {
        return item(
            Status::Fail,
            format!("{name} has a syntax error: {e} (\"{one}\")"),
            Fix::txt(&name, suggested),
        );
    }
    let walk = match walk {
        Ok(w) => w,
        Err(e) => return (vec![Item::unknown("dmarc", &e)], Err(e)),
    };
    let Some(applied) = dmarc::applied_policy(&walk, domain) else {
        return item(
            Status::Warn,
            format!(
                "no DMARC record at {name}: receivers apply no policy and send no reports; start by monitoring"
            ),
            Fix::txt(&name, suggested),
        );
    };
    let found_at = format!("_dmarc.{}", applied.domain);
    let records = if applied.own {
        own
    } else {
        match dmarc_records(dns, &found_at).await {
            Ok(r) => r,
            Err(e) => return (vec![Item::unknown("dmarc", &e)], Err(e.to_string())),
        }
    };
    let record = match records.as_slice() {
        [one] => one.clone(),
        [] => {
            let why = format!(
                "{found_at}: two lookups of the DMARC record disagreed (a DNS change in progress?); run the check again"
            );
            return (vec![Item::unknown("dmarc", &why)], Err(why));
        }
        _ => return (vec![several_records(&found_at, &records)], Ok(None)),
    };
    if let Some(e) = dmarc_syntax_error(&record) {
        return item(
            Status::Fail,
            format!("{found_at} has a syntax error: {e} (\"{record}\")"),
            None,
        );
    }
    let r = &applied.record;
    let strictness = |m| if m == dmarc::Mode::Strict { "s" } else { "r" };
    let mut desc = format!(
        "p={}{}; adkim={}, aspf={}{}, rua={}",
        policy_name(r.p),
        if r.sp != r.p {
            format!(", sp={}", policy_name(r.sp))
        } else {
            String::new()
        },
        strictness(r.adkim),
        strictness(r.aspf),
        if r.t {
            ", t=y (applied one step lower)"
        } else {
            ""
        },
        if r.rua.is_empty() {
            "none".to_string()
        } else {
            r.rua.iter().map(|u| u.uri()).collect::<Vec<_>>().join(",")
        }
    );
    let policy = policy_name(applied.policy);
    if !applied.own {
        desc = format!("no record at {name}; {found_at} applies (policy {policy}): {desc}");
    }
    // The tag that sets this domain's policy: `sp` for an inherited record
    // with a `p`, else `p`.
    let policy_tag = if applied.own || r.p == Policy::Unspecified {
        "p"
    } else {
        "sp"
    };
    let it = if r.t
        && applied.policy != Policy::Reject
        && matches!(r.p, Policy::Quarantine | Policy::Reject)
    {
        Item::new(
            "dmarc",
            Status::Warn,
            format!(
                "{desc}: t=y (testing) has receivers apply one step less than the policy, here {policy}; remove it once reports show all your mail aligns"
            ),
            Fix::txt(&found_at, dmarc_with(&record, "t", "n")),
        )
    } else if applied.policy == Policy::None {
        Item::new(
            "dmarc",
            Status::Warn,
            format!(
                "{desc}: p=none is monitoring only, receivers take no action on mail that fails; move to quarantine once reports show all your mail aligns"
            ),
            Fix::txt(&found_at, dmarc_with(&record, policy_tag, "quarantine")),
        )
    } else if r.rua.is_empty() {
        Item::new(
            "dmarc",
            Status::Warn,
            format!("{desc}: no rua=, so nobody receives the aggregate reports"),
            Fix::txt(
                &found_at,
                dmarc_with(&record, "rua", &format!("mailto:dmarc@{domain}")),
            ),
        )
    } else {
        Item::pass("dmarc", desc)
    };
    (vec![it], Ok(Some(applied)))
}

/// Would herald's mail from this domain pass DMARC?
fn dmarc_alignment(
    domain: &str,
    org: &str,
    dmarc: Result<Option<DmarcFound>, String>,
    dkim: Result<Option<String>, String>,
    spf: Option<Option<String>>,
    spf_via_return_path: bool,
) -> Item {
    const CHECK: &str = "dmarc-alignment";
    let dmarc = match dmarc {
        Ok(d) => d,
        Err(e) => return Item::unknown(CHECK, e),
    };
    let strict = dmarc
        .as_ref()
        .is_some_and(|d| d.adkim == dmarc::Mode::Strict);
    let dkim_ok = match &dkim {
        Ok(Some(d)) => {
            let ok = d.eq_ignore_ascii_case(domain) || (!strict && dmarc::in_domain(d, org));
            ok.then(|| format!("DKIM (d={d})"))
        }
        _ => None,
    };
    let spf_ok = spf.clone().flatten().filter(|_| {
        // Strict SPF alignment needs the exact domain, which a return path
        // never is; the customer-domain case is exact already.
        !(spf_via_return_path
            && dmarc
                .as_ref()
                .is_some_and(|d| d.aspf == dmarc::Mode::Strict))
    });
    let ways: Vec<String> = dkim_ok.into_iter().chain(spf_ok).collect();
    if !ways.is_empty() {
        return Item::pass(
            CHECK,
            format!("herald's mail aligns via {}", ways.join(" and ")),
        );
    }
    if let Err(e) = &dkim {
        return Item::unknown(CHECK, e);
    }
    if spf.is_none() {
        return Item::unknown(CHECK, "the SPF check did not complete");
    }
    let what = "herald's mail would not align: no published herald DKIM key for this domain and no aligned, authorising SPF";
    match dmarc {
        Some(d) if d.policy != Policy::None => Item::new(
            CHECK,
            Status::Fail,
            format!(
                "{what}: under p={} receivers will {} it; publish herald's DKIM key (see the dkim item)",
                policy_name(d.policy),
                if d.policy == Policy::Reject {
                    "reject"
                } else {
                    "quarantine"
                }
            ),
            None,
        ),
        Some(_) => Item::new(
            CHECK,
            Status::Warn,
            format!("{what}: it fails DMARC (no action under p=none)"),
            None,
        ),
        None => Item::new(
            CHECK,
            Status::Warn,
            format!("{what}: it would fail DMARC once a policy is published"),
            None,
        ),
    }
}

// ---------------------------------------------------------------------------
// MTA-STS and TLS-RPT

/// `k=v; k=v` tags, `v` first.
fn tags(record: &str) -> Vec<(String, String)> {
    record
        .split(';')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.trim().to_string(), v.trim().to_string()),
            None => (p.to_string(), String::new()),
        })
        .collect()
}

async fn check_mta_sts(dns: &Dns, domain: &str) -> Item {
    const CHECK: &str = "mta-sts";
    let name = format!("_mta-sts.{domain}");
    let policy_url = format!("https://mta-sts.{domain}/.well-known/mta-sts.txt");
    let records: Vec<String> = match dns.txt(&name).await {
        Ok(r) => r
            .into_iter()
            .filter(|r| r.trim_start().starts_with("v=STSv1"))
            .collect(),
        Err(e) => return Item::unknown(CHECK, e),
    };
    let id = time::OffsetDateTime::now_utc()
        .format(time::macros::format_description!(
            "[year][month][day]T[hour][minute][second]"
        ))
        .unwrap_or_else(|_| "1".into());
    let fresh = format!("v=STSv1; id={id}");
    match records.as_slice() {
        [] => Item::new(
            CHECK,
            Status::Warn,
            format!(
                "no MTA-STS record at {name} (optional: lets senders require TLS to {domain}); publish it with the policy file at {policy_url}"
            ),
            Fix::txt(&name, fresh),
        ),
        [one] => {
            let t = tags(one);
            let id = t.iter().find(|(k, _)| k == "id").map(|(_, v)| v.as_str());
            let bad = t.first().is_none_or(|(k, v)| k != "v" || v != "STSv1");
            match id {
                Some(id)
                    if !bad
                        && !id.is_empty()
                        && id.len() <= 32
                        && id.bytes().all(|b| b.is_ascii_alphanumeric()) =>
                {
                    Item::pass(
                        CHECK,
                        format!(
                            "v=STSv1; id={id} (the policy file at {policy_url}: see mta-sts-policy)"
                        ),
                    )
                }
                _ => Item::new(
                    CHECK,
                    Status::Fail,
                    format!(
                        "{name} is not valid (\"{one}\"): it needs v=STSv1 first and id= of 1 to 32 letters and digits"
                    ),
                    Fix::txt(&name, fresh),
                ),
            }
        }
        _ => Item::new(
            CHECK,
            Status::Fail,
            format!(
                "{name} has {} MTA-STS records: senders ignore them (RFC 8461 §3.1); keep one",
                records.len()
            ),
            Fix::txt(&name, fresh),
        ),
    }
}

async fn check_tls_rpt(dns: &Dns, domain: &str) -> Item {
    const CHECK: &str = "tls-rpt";
    let name = format!("_smtp._tls.{domain}");
    let records: Vec<String> = match dns.txt(&name).await {
        Ok(r) => r
            .into_iter()
            .filter(|r| r.trim_start().starts_with("v=TLSRPTv1"))
            .collect(),
        Err(e) => return Item::unknown(CHECK, e),
    };
    let fresh = format!("v=TLSRPTv1; rua=mailto:tlsrpt@{domain}");
    match records.as_slice() {
        [] => Item::new(
            CHECK,
            Status::Warn,
            format!(
                "no TLS-RPT record at {name} (optional: senders report TLS failures delivering to {domain})"
            ),
            Fix::txt(&name, fresh),
        ),
        [one] => {
            let t = tags(one);
            let first_ok = t.first().is_some_and(|(k, v)| k == "v" && v == "TLSRPTv1");
            let rua = t.iter().find(|(k, _)| k == "rua").map(|(_, v)| v.clone());
            let rua_ok = rua.as_deref().is_some_and(|r| {
                r.split(',').all(|u| {
                    let u = u.trim().to_ascii_lowercase();
                    (u.starts_with("mailto:") && u.contains('@')) || u.starts_with("https://")
                })
            });
            if first_ok && rua_ok {
                Item::pass(CHECK, format!("\"{}\"", one.trim()))
            } else {
                Item::new(
                    CHECK,
                    Status::Fail,
                    format!(
                        "{name} is not valid (\"{one}\"): it needs v=TLSRPTv1 first and rua= with mailto: or https: URIs"
                    ),
                    Fix::txt(&name, fresh),
                )
            }
        }
        _ => Item::new(
            CHECK,
            Status::Fail,
            format!(
                "{name} has {} TLS-RPT records: senders ignore them (RFC 8460 §3); keep one",
                records.len()
            ),
            Fix::txt(&name, fresh),
        ),
    }
}

// ---------------------------------------------------------------------------
// Command line

/// `herald domain ...`
#[derive(clap::Subcommand, Debug)]
pub enum DomainCommand {
    /// Check a sending domain's MX, SPF, DKIM, DMARC, MTA-STS and TLS-RPT
    /// records for herald's mail; each item pass / warn / fail with the
    /// record to publish.
    Check(CheckArgs),
}

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// The customer's sending domain, e.g. acme.example.
    pub domain: String,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also check this DKIM selector (repeatable).
    #[arg(long = "selector")]
    pub selectors: Vec<String>,
}

/// Runs `herald domain ...`: exit 0 when no item failed, 1 when one did,
/// 2 for an unusable command line or config.
pub fn cli(
    command: DomainCommand,
    config: &std::path::Path,
    rt: &tokio::runtime::Runtime,
) -> std::process::ExitCode {
    use std::process::ExitCode;
    let DomainCommand::Check(args) = command;
    let domain = match normalize_domain(&args.domain) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("herald domain check: {e}");
            return ExitCode::from(2);
        }
    };
    for s in &args.selectors {
        if normalize_domain(&format!("{s}.x")).is_err() {
            eprintln!("herald domain check: --selector {s:?} is not a DNS label");
            return ExitCode::from(2);
        }
    }
    let Some(cfg) = Config::load_or_print(config) else {
        return ExitCode::from(2);
    };
    let signer = match Signer::load(&cfg) {
        Ok(s) => s,
        Err(errs) => {
            eprintln!("{}: {} problem(s):\n{errs}", config.display(), errs.0.len());
            return ExitCode::from(2);
        }
    };
    let dns = match Dns::new(&cfg.dns) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("herald domain check: dns: {e}");
            return ExitCode::from(2);
        }
    };
    let opts = Options {
        selectors: args.selectors,
    };
    let report = rt.block_on(check_domain_with_signer(
        &cfg, &signer, &dns, &domain, &opts,
    ));
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("herald domain check: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        println!("{report}");
    }
    if report.failed() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn recommended_spf_adds_ips_before_all_and_fixes_weak_all() {
        let add = ips(&["192.0.2.10", "2001:db8::10"]);
        assert_eq!(
            recommended_spf(None, &add),
            "v=spf1 ip4:192.0.2.10 ip6:2001:db8::10 ~all"
        );
        assert_eq!(
            recommended_spf(Some("v=spf1 include:_spf.google.com -all"), &add),
            "v=spf1 include:_spf.google.com ip4:192.0.2.10 ip6:2001:db8::10 -all"
        );
        // ?all and +all become ~all; a missing all is added.
        assert_eq!(
            recommended_spf(Some("v=spf1 mx ?all"), &add[..1]),
            "v=spf1 mx ip4:192.0.2.10 ~all"
        );
        assert_eq!(
            recommended_spf(Some("v=spf1 mx +all"), &[]),
            "v=spf1 mx ~all"
        );
        assert_eq!(
            recommended_spf(Some("v=spf1 mx"), &add[..1]),
            "v=spf1 mx ip4:192.0.2.10 ~all"
        );
        // A redirect supplies the all: insert before it, add none.
        assert_eq!(
            recommended_spf(Some("v=spf1 mx redirect=_spf.example.net"), &add[..1]),
            "v=spf1 mx ip4:192.0.2.10 redirect=_spf.example.net"
        );
        // Already there: not twice.
        assert_eq!(
            recommended_spf(Some("v=spf1 ip4:192.0.2.10 -all"), &add[..1]),
            "v=spf1 ip4:192.0.2.10 -all"
        );
    }

    #[test]
    fn herald_terms_move_first() {
        assert_eq!(
            herald_first_spf(
                "v=spf1 include:a.example include:b.example ip4:192.0.2.10 -all",
                &ips(&["192.0.2.10", "2001:db8::10"])
            ),
            "v=spf1 ip4:192.0.2.10 ip6:2001:db8::10 include:a.example include:b.example -all"
        );
    }

    #[test]
    fn two_records_merge_into_one() {
        let merged = merge_spf(&[
            "v=spf1 ip4:192.0.2.10 -all".to_string(),
            "v=spf1 include:x.example ip4:192.0.2.10 ~all".to_string(),
        ]);
        assert_eq!(merged, "v=spf1 ip4:192.0.2.10 include:x.example -all");
    }

    #[test]
    fn spf_records_are_recognised_and_bad_terms_named() {
        assert!(is_spf("v=spf1 -all"));
        assert!(is_spf("V=SPF1"));
        assert!(!is_spf("v=spf10 -all"));
        assert!(!is_spf("google-site-verification=x"));
        assert_eq!(
            invalid_terms("v=spf1 ip4:192.0.2 mx include: -all"),
            ["ip4:192.0.2", "include:"]
        );
        assert!(invalid_terms("v=spf1 ip4:192.0.2.0/24 mx -all").is_empty());
    }

    #[test]
    fn lookup_cost_counts_the_terms_rfc_7208_counts() {
        let spf = Spf::parse(
            b"v=spf1 ip4:192.0.2.1 ip6:2001:db8::/32 a mx ptr exists:%{i}.x.example include:y.example all",
        )
        .unwrap();
        let n: u32 = spf
            .directives
            .iter()
            .map(|d| lookup_cost(&d.mechanism))
            .sum();
        assert_eq!(n, 5);
    }

    #[test]
    fn dmarc_syntax_errors_name_the_tag() {
        assert_eq!(
            dmarc_syntax_error(
                "v=DMARC1; p=reject; sp=quarantine; adkim=s; pct=50; rua=mailto:a@x.example,mailto:b@x.example",
            ),
            None
        );
        // rua= alone is p=none, as the relay reads it.
        assert_eq!(dmarc_syntax_error("v=DMARC1; rua=mailto:a@x.example"), None);
        for (bad, want) in [
            ("v=DMARC1; p=rejct", "p=rejct is not a policy"),
            ("p=reject; v=DMARC1", "must start with v=DMARC1"),
            ("v=DMARC1; adkim=s", "no p="),
            ("v=DMARC1; p=none; pct=150", "pct=150"),
            ("v=DMARC1; p=none; aspf=x", "aspf=x"),
            ("v=DMARC1; p=none; t=maybe", "t=maybe"),
            ("v=DMARC1; p=none; rua=a@x.example", "not a mailto:"),
            ("v=DMARC1; p=none; p=reject", "twice"),
            ("v=DMARC1; p=none; junk", "not a tag=value"),
        ] {
            let e = dmarc_syntax_error(bad).unwrap_or_default();
            assert!(e.contains(want), "{bad}: {e}");
        }
        assert_eq!(
            dmarc_with(
                "v=DMARC1; p=none; rua=mailto:a@x.example",
                "p",
                "quarantine"
            ),
            "v=DMARC1; p=quarantine; rua=mailto:a@x.example"
        );
        assert_eq!(
            dmarc_with("v=DMARC1; p=reject", "rua", "mailto:d@x.example"),
            "v=DMARC1; p=reject; rua=mailto:d@x.example"
        );
    }

    #[test]
    fn domains_are_normalised_or_refused() {
        assert_eq!(normalize_domain("Acme.Example.").unwrap(), "acme.example");
        assert!(normalize_domain("not a domain").is_err());
        assert!(normalize_domain("localhost").is_err());
        assert!(normalize_domain("a..b").is_err());
    }

    #[test]
    fn fix_lines_show_name_type_and_quoted_value() {
        let r = DomainReport::new(
            "acme.example".into(),
            vec![
                Item::pass("mx", "MX: mx.acme.example (10)"),
                Item::new(
                    "spf",
                    Status::Fail,
                    "no SPF record",
                    Fix::txt("acme.example", "v=spf1 ip4:192.0.2.10 ~all"),
                ),
            ],
        );
        let text = r.to_string();
        assert!(text.contains("  FAIL  spf "), "{text}");
        assert!(
            text.contains("publish: acme.example. TXT \"v=spf1 ip4:192.0.2.10 ~all\""),
            "{text}"
        );
        assert!(text.ends_with("result: 1 failed, 0 warning(s), 1 passed"));
        assert!(r.failed());
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["items"][1]["fix"]["type"], "TXT");
        assert_eq!(json["summary"]["status"], "fail");
    }
}
