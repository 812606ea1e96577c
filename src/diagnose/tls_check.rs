//! `herald tls check DOMAIN`: for a destination that defers for TLS,
//! which TLS policy applies and why, what each MX host does with STARTTLS,
//! its certificate and its TLSA records, and what delivery will therefore
//! do — with the fix when it will defer.
//!
//! The precedence is delivery's (`deliver::connect_domain_inner`), applied
//! to what delivery's own code finds: a `[delivery.tls_policy]` line with
//! `!` sets published policies aside; DANE (RFC 7672: MX records proven by
//! DNSSEC and usable TLSA records for the host) beats MTA-STS (RFC 8461)
//! host by host; an enforced MTA-STS policy beats a weaker config line;
//! `dane-only` requires TLSA records; bogus DNSSEC defers. The MTA-STS
//! policy is fetched with delivery's code and an empty cache (what is
//! published now, not what the running relay may have cached); sessions
//! use herald's SMTP client, and certificates are judged by delivery's
//! verifiers (see [`super::tls_probe`]).
//!
//! What it trusts: nothing the DNS, the policy host or the MX hosts say;
//! all of it is reported as data. It sends no message (EHLO, STARTTLS,
//! QUIT only).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::tls_probe::{
    self, CertFault, CertReport, Probe, StsReport, StsStatus, judge_certificate, webpki_fix,
};
use crate::config::{Config, StarttlsPolicy, TlsLevel, TlsPolicyEntry};
use crate::deliver::client::Timeouts;
use crate::deliver::dane::TlsaSet;
use crate::deliver::mta_sts::Policy;
use crate::dns::{Dns, MxLookup, Validated};

/// What to check.
#[derive(Clone, Debug)]
pub struct Options {
    /// Bound on each SMTP step: connect, TLS handshake, each reply.
    pub timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            timeout: Duration::from_secs(10),
        }
    }
}

/// What checks the certificate of a session to one MX host.
#[derive(Clone, Debug)]
enum Rule {
    /// `delivery.starttls` alone.
    Default(StarttlsPolicy),
    /// The domain's `[delivery.tls_policy]` level.
    Config(TlsLevel),
    /// The domain's enforced MTA-STS policy.
    MtaSts(Arc<Policy>),
    /// The host's TLSA records, proven by DNSSEC.
    Dane(Arc<TlsaSet>),
}

/// What a session must reach, from a [`Rule`] (delivery's `open` and
/// `required_tls`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Need {
    /// No STARTTLS at all.
    Plain,
    /// STARTTLS when offered; plaintext when missing, refused or failed.
    Opportunistic,
    /// STARTTLS must succeed; any certificate.
    Encrypt,
    /// STARTTLS with a certificate valid for the host under WebPKI.
    Verify,
    /// STARTTLS with a certificate a TLSA record names.
    Dane,
}

impl Rule {
    fn need(&self) -> Need {
        match self {
            Rule::Default(StarttlsPolicy::Disabled) | Rule::Config(TlsLevel::None) => Need::Plain,
            Rule::Default(StarttlsPolicy::Opportunistic)
            | Rule::Config(TlsLevel::May | TlsLevel::Dane | TlsLevel::DaneOnly) => {
                Need::Opportunistic
            }
            Rule::Default(StarttlsPolicy::Required) | Rule::Config(TlsLevel::Encrypt) => {
                Need::Encrypt
            }
            Rule::Config(TlsLevel::Verify) | Rule::MtaSts(_) => Need::Verify,
            Rule::Dane(set) if set.any_usable() => Need::Dane,
            Rule::Dane(_) => Need::Encrypt,
        }
    }

    /// The short name in the report: `dane`, `mta-sts`, `tls_policy`, `default`.
    fn kind(&self) -> &'static str {
        match self {
            Rule::Default(_) => "default",
            Rule::Config(_) => "tls_policy",
            Rule::MtaSts(_) => "mta-sts",
            Rule::Dane(_) => "dane",
        }
    }

    /// Who asks, as delivery's deferrals say it.
    fn who(&self, domain: &str) -> String {
        match self {
            Rule::Default(_) => "delivery.starttls".into(),
            Rule::Config(level) => format!(
                "TLS policy for {domain} (delivery.tls_policy: {})",
                level.as_str()
            ),
            Rule::MtaSts(p) => format!("MTA-STS policy of {domain} (enforce, id {})", p.id),
            Rule::Dane(set) => format!("DANE for {domain} (TLSA records at {})", set.name),
        }
    }
}

// ---------------------------------------------------------------------------
// The report

/// DNSSEC and DANE for the domain.
#[derive(Clone, Debug, Serialize)]
pub struct DaneReport {
    /// `off` (delivery does not use DANE here), `secure` (MX records
    /// proven: DANE applies to hosts with TLSA records), `insecure` (MX
    /// records not signed), `bogus`, `error` (lookup failed or no
    /// validating resolver).
    pub status: &'static str,
    pub detail: String,
}

/// The TLSA records of one MX host.
#[derive(Clone, Debug, Serialize)]
pub struct TlsaReport {
    /// `_25._tcp.mx1.example.com`.
    pub name: String,
    /// `secure`, `insecure`, `bogus` or `error`.
    pub dnssec: &'static str,
    /// As published: `3 1 1 <hex>`.
    pub records: Vec<String>,
    /// Any DANE-TA or DANE-EE record this relay can use.
    pub usable: bool,
}

/// One address of an MX host.
#[derive(Clone, Debug, Serialize)]
pub struct AddrReport {
    pub ip: IpAddr,
    /// The session failed outside TLS (connect, greeting, EHLO).
    pub error: Option<String>,
    /// EHLO offered STARTTLS; `null` when not reached.
    pub starttls: Option<bool>,
    pub starttls_refused: Option<String>,
    pub handshake_error: Option<String>,
    /// `TLSv1.3` once the handshake succeeded.
    pub tls: Option<&'static str>,
    pub cipher: Option<String>,
    pub certificate: Option<CertReport>,
    /// What was found, in a few words (`mx1.example.com presents a
    /// certificate for other.example`).
    pub finding: String,
    /// Delivery over this address would go ahead.
    pub delivers: bool,
    /// …encrypted.
    pub encrypted: bool,
    /// What delivery does here, in a sentence.
    pub result: String,
    /// The enhanced status code of delivery's deferral, when it defers.
    pub code: Option<&'static str>,
    pub fix: Option<String>,
}

/// One MX host.
#[derive(Clone, Debug, Serialize)]
pub struct MxReport {
    pub host: String,
    pub preference: u16,
    /// What checks its certificate: `dane`, `mta-sts`, `tls_policy`, `default`.
    pub policy: &'static str,
    /// What a session must reach: `none`, `opportunistic`, `encrypt`,
    /// `verify` (WebPKI, name), `dane` (TLSA match).
    pub requires: &'static str,
    /// Listed in the MTA-STS policy (`null`: no policy).
    pub in_mta_sts: Option<bool>,
    pub tlsa: Option<TlsaReport>,
    pub addresses: Vec<AddrReport>,
    pub delivers: bool,
    /// What was found, in a few words.
    pub finding: String,
    pub result: String,
    pub code: Option<&'static str>,
    pub fix: Option<String>,
}

/// The whole diagnosis; serialised as is for `--json`.
#[derive(Clone, Debug, Serialize)]
pub struct TlsReport {
    pub domain: String,
    /// Delivery with the policy that applies would succeed now.
    pub delivers: bool,
    /// What decides the session delivery would use (or the one that
    /// fails first): `dane`, `mta-sts`, `tls_policy`, `default`.
    pub policy: &'static str,
    /// Which policy applies and why, in words.
    pub applies: String,
    /// What delivery will do, with the fix: the one-line answer.
    pub verdict: String,
    /// Every fix found, most important first.
    pub fixes: Vec<String>,
    /// The `[delivery.tls_policy]` entry for the domain (`verify`, `may!`).
    pub tls_policy: Option<String>,
    pub mta_sts: StsReport,
    pub dane: DaneReport,
    pub mx: Vec<MxReport>,
}

fn need_name(need: Need) -> &'static str {
    match need {
        Need::Plain => "none",
        Need::Opportunistic => "opportunistic",
        Need::Encrypt => "encrypt",
        Need::Verify => "verify",
        Need::Dane => "dane",
    }
}

/// A deferral of the whole domain before any MX is tried.
struct Stop {
    code: &'static str,
    text: String,
    fix: String,
}

// ---------------------------------------------------------------------------
// Running the check

/// The config-level facts delivery decides from.
struct Plan<'a> {
    config: &'a Config,
    domain: &'a str,
    configured: Option<TlsPolicyEntry>,
    overridden: bool,
    dane_only: bool,
    dane: bool,
}

/// Checks `domain` as delivery would deliver to it now. `Err` only for a
/// resolver that cannot be built from `[dns]`.
pub async fn check(config: &Config, domain: &str, opts: &Options) -> Result<TlsReport, String> {
    let domain = super::domain_check::normalize_domain(domain)?;
    let dns = Dns::new(&config.dns)?;
    let d = &config.delivery;
    let rules = d.tls_plan(&domain);
    let configured = rules.configured;
    let plan = Plan {
        config,
        domain: &domain,
        configured,
        overridden: rules.overridden,
        dane_only: rules.dane_only,
        dane: rules.dane,
    };
    let mut report = TlsReport {
        domain: domain.clone(),
        delivers: false,
        policy: "default",
        applies: String::new(),
        verdict: String::new(),
        fixes: Vec::new(),
        tls_policy: configured.map(|c| {
            format!(
                "{}{}",
                c.level.as_str(),
                if c.overrides_published { "!" } else { "" }
            )
        }),
        mta_sts: StsReport {
            status: StsStatus::Disabled,
            txt: Vec::new(),
            id: None,
            mode: None,
            mx: Vec::new(),
            max_age: None,
            error: None,
            url: String::new(),
            policy: None,
        },
        dane: DaneReport {
            status: "off",
            detail: String::new(),
        },
        mx: Vec::new(),
    };

    // The MX hosts, as delivery finds them (then in preference order, ties
    // by name, so the report reads the same every time).
    let hosts = match dns.mx(&domain).await {
        Ok(MxLookup::Hosts(mut hosts)) => {
            hosts.sort_by(|a, b| (a.preference, &a.name).cmp(&(b.preference, &b.name)));
            hosts
        }
        Ok(MxLookup::NullMx) => {
            return Ok(report.stopped(Stop {
                code: "5.1.10",
                text: format!("{domain} publishes a null MX (RFC 7505): it accepts no mail, so delivery bounces"),
                fix: format!("nothing to fix on the sending side: {domain} takes no mail"),
            }));
        }
        Ok(MxLookup::NoMailServer) => {
            return Ok(report.stopped(Stop {
                code: "5.1.2",
                text: format!("{domain} has no MX or address records: delivery bounces"),
                fix: format!("check the recipient domain name; its owner must publish an MX record for {domain}"),
            }));
        }
        Err(e) => {
            return Ok(report.stopped(Stop {
                code: "4.4.3",
                text: format!("{e}: delivery defers"),
                fix: "check [dns] nameservers and the domain's nameservers".into(),
            }));
        }
    };

    // DANE, as delivery decides it for the domain.
    let (validating, stop) = dane_for_domain(&plan).await;
    let mut stop = stop;
    let mut dane_secure = false;
    match (&validating, &stop) {
        (Some(v), None) => match v.mx_validated(&domain).await {
            Ok(Validated::Secure(h)) if !h.is_empty() => {
                dane_secure = true;
                report.dane = DaneReport {
                    status: "secure",
                    detail: format!(
                        "the MX records of {domain} are signed (DNSSEC secure): DANE applies to MX hosts with TLSA records"
                    ),
                };
            }
            Ok(Validated::Secure(_) | Validated::Insecure(_)) => {
                report.dane = DaneReport {
                    status: "insecure",
                    detail: format!(
                        "the MX records of {domain} are not signed (DNSSEC insecure): DANE does not apply"
                    ),
                };
                if plan.dane_only {
                    stop = Some(Stop {
                        code: "4.7.5",
                        text: format!(
                            "TLS policy for {domain} (delivery.tls_policy: dane-only) requires DANE, but the MX records of {domain} are not signed (DNSSEC insecure)"
                        ),
                        fix: format!(
                            "sign the zone of {domain} with DNSSEC and publish TLSA records for its MX hosts, or change the dane-only line for {domain} in [delivery.tls_policy]"
                        ),
                    });
                }
            }
            Ok(Validated::Bogus) => {
                report.dane = DaneReport {
                    status: "bogus",
                    detail: format!(
                        "the MX records of {domain} fail DNSSEC validation (bogus: signatures missing, expired or not matching)"
                    ),
                };
                stop = Some(Stop {
                    code: "4.7.5",
                    text: format!(
                        "DANE: the MX records of {domain} fail DNSSEC validation (bogus); delivery defers until they validate"
                    ),
                    fix: format!(
                        "repair DNSSEC for {domain}: re-sign the zone (expired or missing RRSIGs) and check that the DS record at the parent matches the zone's DNSKEY"
                    ),
                });
            }
            Err(e) => {
                report.dane = DaneReport {
                    status: "error",
                    detail: e.to_string(),
                };
                stop = Some(Stop {
                    code: "4.4.3",
                    text: format!(
                        "DANE: {e}; DNSSEC-validated MX records are needed before delivering"
                    ),
                    fix: "check that [dns] nameservers answer and pass DNSSEC records through"
                        .into(),
                });
            }
        },
        (None, _) => report.dane.detail = dane_off_reason(&plan),
        (Some(_), Some(_)) => {}
    }
    if stop.is_some() && report.dane.status == "off" {
        report.dane.status = "error";
    }

    // MTA-STS, fetched for the report even where it does not apply.
    report.mta_sts = tls_probe::fetch_policy(&d.mta_sts, &dns, &domain).await;
    let published = report.mta_sts.policy.clone();
    let enforced = published
        .clone()
        .filter(|p| p.mode == crate::deliver::mta_sts::Mode::Enforce)
        .filter(|_| !plan.dane_only && !plan.overridden);
    let asked = match (&enforced, configured) {
        (Some(p), _) => Rule::MtaSts(p.clone()),
        (None, Some(c)) => Rule::Config(c.level),
        (None, None) => Rule::Default(d.starttls),
    };
    report.applies = applies(&plan, &report.mta_sts, &asked, dane_secure);

    if let Some(stop) = stop {
        report.policy = if report.dane.status == "off" {
            asked.kind()
        } else {
            "dane"
        };
        return Ok(report.stopped(stop));
    }

    let verifier = tls_probe::webpki_verifier(config);
    let timeouts = Timeouts {
        connect: opts.timeout.min(d.connect_timeout.as_duration()),
        command: opts.timeout.min(d.command_timeout.as_duration()),
        data: opts.timeout,
    };
    let helo = config.helo_name().to_string();
    let checks = hosts.iter().map(|host| {
        let validating = validating.as_ref().filter(|_| dane_secure);
        check_host(
            &plan,
            &dns,
            validating,
            &asked,
            published.as_deref(),
            host,
            verifier.as_ref(),
            timeouts,
            &helo,
        )
    });
    report.mx = futures_util::future::join_all(checks).await;
    report.conclude();
    Ok(report)
}

/// The validating resolver delivery would ask for this domain, or the
/// deferral when `dane-only` cannot have one.
async fn dane_for_domain(plan: &Plan<'_>) -> (Option<Dns>, Option<Stop>) {
    let d = &plan.config.delivery;
    if !plan.dane {
        return (None, None);
    }
    let built = d
        .dane
        .trust_anchors()
        .and_then(|anchors| Dns::validating(&plan.config.dns, anchors));
    match built {
        Ok(v) => (Some(v), None),
        Err(e) if plan.dane_only => (
            None,
            Some(Stop {
                code: "4.7.5",
                text: format!(
                    "TLS policy for {} (delivery.tls_policy: dane-only) requires DANE, but this relay has no DNSSEC-validating resolver: {e}",
                    plan.domain
                ),
                fix: "fix [delivery.dane] trust_anchor (or remove it to use the DNS root's keys)"
                    .into(),
            }),
        ),
        Err(_) => (None, None),
    }
}

fn dane_off_reason(plan: &Plan<'_>) -> String {
    let d = &plan.config.delivery;
    match plan.configured {
        Some(c) if c.overrides_published => format!(
            "not used: delivery.tls_policy for {} is {}!, which sets published policies aside",
            plan.domain,
            c.level.as_str()
        ),
        Some(c) if matches!(c.level, TlsLevel::Dane | TlsLevel::DaneOnly) => {
            "not used: this relay cannot build its DNSSEC-validating resolver (see [delivery.dane] trust_anchor)".into()
        }
        _ if !d.dane.enabled => {
            "not used: [delivery.dane] enabled = false and no tls_policy line asks for dane".into()
        }
        _ => "not used: this relay cannot build its DNSSEC-validating resolver (see [delivery.dane] trust_anchor)".into(),
    }
}

/// Which policy applies and why, in words.
fn applies(plan: &Plan<'_>, sts: &StsReport, asked: &Rule, dane_secure: bool) -> String {
    let domain = plan.domain;
    let mut parts = Vec::new();
    if let Some(c) = plan.configured {
        let bang = if c.overrides_published { "!" } else { "" };
        parts.push(format!(
            "delivery.tls_policy for {domain} is {}{bang}{}",
            c.level.as_str(),
            if c.overrides_published {
                " (sets published MTA-STS and DANE policies aside)"
            } else {
                ""
            }
        ));
    }
    if dane_secure {
        parts.push("DANE applies to MX hosts with TLSA records (MX records signed)".into());
    }
    let sts_words = match (sts.status, &sts.policy) {
        (StsStatus::Enforce, Some(p)) if plan.dane_only => {
            format!("MTA-STS enforce id {} is not used under dane-only", p.id)
        }
        (StsStatus::Enforce, Some(p)) if plan.overridden => {
            format!("MTA-STS enforce id {} is set aside by the ! line", p.id)
        }
        (StsStatus::Enforce, Some(p)) => format!(
            "MTA-STS enforce id {} (mx: {}){}",
            p.id,
            p.mx.join(", "),
            if dane_secure {
                " for hosts without TLSA records"
            } else {
                ""
            }
        ),
        (StsStatus::Testing, Some(p)) => {
            format!("MTA-STS testing id {}: reported on, not enforced", p.id)
        }
        (StsStatus::None, _) => "MTA-STS policy of mode none: no policy".into(),
        (StsStatus::Failed, _) => match &sts.error {
            Some(e) => format!(
                "MTA-STS record published, but no policy could be fetched ({}): delivery goes on as without one",
                e.result_type
            ),
            None => "no MTA-STS policy could be fetched".into(),
        },
        (StsStatus::InvalidRecord, _) => {
            format!("the _mta-sts.{domain} TXT record is invalid and ignored: no MTA-STS policy")
        }
        (StsStatus::DnsError, _) => {
            "the _mta-sts TXT record could not be read: delivery goes on as without a policy".into()
        }
        (StsStatus::Disabled, _) => "MTA-STS is off ([delivery.mta_sts] enabled = false)".into(),
        _ => "no MTA-STS policy".into(),
    };
    parts.push(sts_words);
    if matches!(asked, Rule::Default(_)) && !dane_secure {
        parts.push(format!(
            "delivery.starttls = {}",
            match plan.config.delivery.starttls {
                StarttlsPolicy::Opportunistic =>
                    "opportunistic (TLS when offered, any certificate)",
                StarttlsPolicy::Required => "required (TLS, any certificate)",
                StarttlsPolicy::Disabled => "disabled (no TLS)",
            }
        ));
    }
    parts.join("; ")
}

/// One MX host: its TLSA records, the rule that applies to it, and a
/// session to each of its addresses.
#[allow(clippy::too_many_arguments)]
async fn check_host(
    plan: &Plan<'_>,
    dns: &Dns,
    validating: Option<&Dns>,
    asked: &Rule,
    published: Option<&Policy>,
    mx: &crate::dns::MxHost,
    verifier: Option<&Arc<rustls::client::WebPkiServerVerifier>>,
    timeouts: Timeouts,
    helo: &str,
) -> MxReport {
    let domain = plan.domain;
    let host = mx.name.as_str();
    let port = plan.config.delivery.port;
    let mut report = MxReport {
        host: host.to_string(),
        preference: mx.preference,
        policy: asked.kind(),
        requires: need_name(asked.need()),
        in_mta_sts: published
            .filter(|p| p.mode != crate::deliver::mta_sts::Mode::None)
            .map(|p| p.allows_mx(host)),
        tlsa: None,
        addresses: Vec::new(),
        delivers: false,
        finding: String::new(),
        result: String::new(),
        code: None,
        fix: None,
    };
    let skip = |mut r: MxReport, code: &'static str, result: String, fix: String| {
        r.finding = result.clone();
        r.result = result;
        r.code = Some(code);
        r.fix = Some(fix);
        r
    };

    // RFC 7672 §2.2: the host's TLSA records, when its MX records are proven.
    let mut rule = asked.clone();
    if let Some(v) = validating {
        let name = format!("_{port}._tcp.{host}");
        let mut tlsa = TlsaReport {
            name: name.clone(),
            dnssec: "insecure",
            records: Vec::new(),
            usable: false,
        };
        match v.tlsa(&name).await {
            Ok(Validated::Secure(records)) if !records.is_empty() => {
                let set = Arc::new(TlsaSet { name, records });
                tlsa.dnssec = "secure";
                tlsa.records = set.policy_strings();
                tlsa.usable = set.any_usable();
                rule = Rule::Dane(set);
            }
            Ok(Validated::Bogus) => {
                tlsa.dnssec = "bogus";
                report.tlsa = Some(tlsa);
                report.policy = "dane";
                return skip(
                    report,
                    "4.7.5",
                    format!(
                        "the TLSA records of {host} ({name}) fail DNSSEC validation (bogus): {host} is not used"
                    ),
                    format!(
                        "repair the DNSSEC signatures of {name} (re-sign the zone that holds it)"
                    ),
                );
            }
            Ok(v) => {
                if let Validated::Secure(_) = v {
                    tlsa.dnssec = "secure";
                }
                if plan.dane_only {
                    report.tlsa = Some(tlsa);
                    report.policy = "tls_policy";
                    return skip(
                        report,
                        "4.7.5",
                        format!(
                            "TLS policy for {domain} (delivery.tls_policy: dane-only) requires DANE; {host} has no DNSSEC-signed TLSA records at {name}: not used"
                        ),
                        format!(
                            "publish a TLSA record for {host} at {name} in a signed zone (for its current key: {name}. TLSA 3 1 1 <SHA-256 of the key>), or change the dane-only line"
                        ),
                    );
                }
            }
            Err(e) => {
                tlsa.dnssec = "error";
                report.tlsa = Some(tlsa);
                report.policy = "dane";
                return skip(
                    report,
                    "4.4.3",
                    format!("DANE: {e}; {host} is not used until its TLSA records can be read"),
                    "check that [dns] nameservers answer TLSA queries and pass DNSSEC records through".into(),
                );
            }
        }
        report.tlsa = Some(tlsa);
    }
    report.policy = rule.kind();
    report.requires = need_name(rule.need());

    if let Rule::MtaSts(p) = &rule
        && !p.allows_mx(host)
    {
        let url = format!("https://mta-sts.{domain}/.well-known/mta-sts.txt");
        return skip(
            report,
            "4.7.5",
            format!(
                "the MTA-STS policy of {domain} (enforce, id {}) does not list {host} among {}: {host} is not used",
                p.id,
                p.mx.join(", ")
            ),
            format!(
                "add \"mx: {host}\" to the policy at {url} and change the id in the _mta-sts.{domain} TXT record (or stop using {host} as an MX)"
            ),
        );
    }

    let ips = match dns.ips(host).await {
        Ok(ips) if !ips.is_empty() => ips,
        Ok(_) => {
            return skip(
                report,
                "4.4.3",
                format!("{host} has no address"),
                format!("publish A or AAAA records for {host}"),
            );
        }
        Err(e) => {
            return skip(
                report,
                "4.4.3",
                e.to_string(),
                "check the nameservers of the MX host's domain".into(),
            );
        }
    };
    let tlsa_set = match &rule {
        Rule::Dane(set) => Some(set.clone()),
        _ => None,
    };
    let sessions = ips.iter().map(|&ip| {
        let addr = SocketAddr::new(ip, port);
        let source = plan
            .config
            .delivery
            .source_ips
            .iter()
            .find(|s| s.is_ipv4() == ip.is_ipv4())
            .copied();
        tls_probe::probe(host, addr, source, helo, timeouts)
    });
    let probes = futures_util::future::join_all(sessions).await;
    for (ip, probe) in ips.iter().zip(probes) {
        let cert = judge_certificate(&probe.chain, host, verifier, tlsa_set.as_deref());
        report
            .addresses
            .push(judge(domain, host, port, *ip, &rule, probe, cert));
    }
    // The host's verdict: its first address that delivers, else the first
    // failure.
    let pick = report
        .addresses
        .iter()
        .find(|a| a.delivers)
        .or(report.addresses.first())
        .cloned();
    if let Some(a) = pick {
        report.delivers = a.delivers;
        report.finding = a.finding;
        report.result = a.result;
        report.code = a.code;
        report.fix = a.fix;
    }
    report
}

/// What delivery does over one session, from what the session showed.
fn judge(
    domain: &str,
    host: &str,
    port: u16,
    ip: IpAddr,
    rule: &Rule,
    p: Probe,
    cert: Option<CertReport>,
) -> AddrReport {
    let need = rule.need();
    let who = rule.who(domain);
    let mut a = AddrReport {
        ip,
        error: p.error.clone(),
        starttls: p.starttls,
        starttls_refused: p.starttls_refused.clone(),
        handshake_error: p.handshake_error.clone(),
        tls: p.tls_version,
        cipher: p.cipher.clone(),
        certificate: cert,
        finding: String::new(),
        delivers: false,
        encrypted: false,
        result: String::new(),
        code: None,
        fix: None,
    };
    let at = format!("{host} [{ip}]");
    let requires = match need {
        Need::Dane => "requires TLS with a certificate its TLSA records name",
        Need::Verify => "requires TLS with a certificate valid for the MX host",
        _ => "requires TLS",
    };
    let defer = |a: &mut AddrReport, code: &'static str, what: String, fix: String| {
        a.result = format!("{who} {requires}; {what}: delivery to {host} defers ({code})");
        a.finding = what;
        a.code = Some(code);
        a.fix = Some(fix);
    };
    if let Some(e) = &p.error
        && p.tls_version.is_none()
    {
        a.finding = format!("cannot open a session: {e}");
        a.result = a.finding.clone();
        a.code = Some("4.4.1");
        a.fix = Some(format!(
            "check that {host} accepts SMTP connections from this relay on port {} (firewall, blocklist, server down)",
            port
        ));
        return a;
    }
    let tls_up = p.tls_ok();
    match need {
        Need::Plain => {
            a.delivers = true;
            a.finding = format!("{who} says no STARTTLS");
            a.result = format!("{}: delivery to {at} goes in clear", a.finding);
            return a;
        }
        Need::Opportunistic => {
            a.delivers = true;
            a.encrypted = tls_up;
            (a.finding, a.result) = if tls_up {
                let f = format!("{at} offers STARTTLS ({})", p.tls_version.unwrap_or("TLS"));
                let r = format!(
                    "{f}; the certificate is not checked: delivery uses TLS without authentication"
                );
                (f, r)
            } else if p.starttls == Some(false) {
                let f = format!("{at} offers no STARTTLS");
                let r = format!("{f}: delivery goes in clear (opportunistic TLS)");
                (f, r)
            } else if let Some(r) = &p.starttls_refused {
                let f = format!("{at} refused STARTTLS ({r})");
                let r = format!("{f}: delivery goes in clear");
                (f, r)
            } else {
                let f = format!(
                    "the TLS handshake with {at} failed ({})",
                    p.handshake_error.as_deref().unwrap_or("no reason given")
                );
                let r = format!("{f}: delivery retries in clear");
                (f, r)
            };
            if !tls_up {
                a.fix = Some(format!(
                    "enable STARTTLS on {host} with a certificate valid for {host}"
                ));
            }
            return a;
        }
        Need::Encrypt | Need::Verify | Need::Dane => {}
    }
    let cert_fix = match need {
        Need::Dane => format!("the key its TLSA record names ({})", tlsa_name(rule)),
        _ => format!("a certificate valid for {host}"),
    };
    if p.starttls == Some(false) {
        defer(
            &mut a,
            "4.7.10",
            format!("{at} offered no STARTTLS"),
            format!("enable STARTTLS on {host} (port {}) with {cert_fix}", port),
        );
        return a;
    }
    if let Some(r) = &p.starttls_refused {
        defer(
            &mut a,
            "4.7.10",
            format!("{at} refused STARTTLS: {r}"),
            format!("make {host} accept STARTTLS, with {cert_fix}"),
        );
        return a;
    }
    if !tls_up {
        let why = p
            .handshake_error
            .clone()
            .or(p.error.clone())
            .unwrap_or_else(|| "no reason given".into());
        defer(
            &mut a,
            "4.7.5",
            format!("the TLS handshake with {at} failed: {why}"),
            format!("fix the TLS set-up of {host} (protocol versions, ciphers) with {cert_fix}"),
        );
        return a;
    }
    let version = p.tls_version.unwrap_or("TLS");
    let Some(cert) = a.certificate.clone() else {
        defer(
            &mut a,
            "4.7.5",
            format!("{at} presented no certificate"),
            format!("install {cert_fix} on {host}"),
        );
        return a;
    };
    match need {
        Need::Encrypt => {
            a.delivers = true;
            a.encrypted = true;
            a.finding = format!("{at} offers STARTTLS ({version})");
            a.result = format!(
                "{}; {who} checks no certificate: delivery uses TLS",
                a.finding
            );
        }
        Need::Verify if cert.webpki_valid => {
            a.delivers = true;
            a.encrypted = true;
            a.finding = format!(
                "{host} presents a certificate valid for {host} (issued by {}, until {})",
                cert.summary.issuer.as_deref().unwrap_or("an unnamed CA"),
                cert.not_after.as_deref().unwrap_or("an unknown date")
            );
            a.result = format!("{}: delivery uses verified TLS ({version})", a.finding);
        }
        Need::Verify => {
            let fault = cert.webpki_fault.unwrap_or(CertFault::Other);
            let what = match fault {
                CertFault::WrongName => format!(
                    "{host} presents a certificate for {}",
                    cert.summary.names_text()
                ),
                _ => format!(
                    "the certificate of {at} is not valid: {}",
                    cert.webpki_error.as_deref().unwrap_or("refused")
                ),
            };
            defer(&mut a, "4.7.5", what, webpki_fix(fault, host));
        }
        Need::Dane if cert.tlsa_match == Some(true) => {
            a.delivers = true;
            a.encrypted = true;
            a.finding = format!(
                "{host} matches its TLSA record {}",
                cert.tlsa_record.as_deref().unwrap_or("")
            );
            a.result = format!("{}: delivery uses verified TLS ({version})", a.finding);
        }
        Need::Dane => {
            let name = tlsa_name(rule);
            let fix = match &cert.tlsa_for_key {
                Some(record) => format!(
                    "publish \"{name}. TLSA {record}\" for the key {host} presents (keep the old record until the new one has propagated), or put back the certificate whose key the current record names"
                ),
                None => format!(
                    "install on {host} the certificate whose key the record at {name} names"
                ),
            };
            defer(
                &mut a,
                "4.7.5",
                cert.tlsa_error
                    .clone()
                    .unwrap_or_else(|| format!("no TLSA record at {name} matches the certificate")),
                fix,
            );
        }
        Need::Plain | Need::Opportunistic => unreachable!("handled above"),
    }
    a
}

fn tlsa_name(rule: &Rule) -> String {
    match rule {
        Rule::Dane(set) => set.name.clone(),
        _ => String::new(),
    }
}

impl TlsReport {
    /// A report whose domain defers (or bounces) before any MX is tried.
    fn stopped(mut self, stop: Stop) -> TlsReport {
        self.delivers = false;
        let lead = if self.applies.is_empty() {
            String::new()
        } else {
            format!("{}: ", self.applies)
        };
        self.verdict = format!("{lead}{} ({}); fix: {}", stop.text, stop.code, stop.fix);
        self.fixes.push(stop.fix);
        self
    }

    /// The policy behind a host's verdict, briefly: `DANE applies (MX
    /// records signed, TLSA on mx1.example.com)`, `MTA-STS enforce id X`.
    fn lead(&self, kind: &str) -> String {
        match (kind, &self.mta_sts) {
            ("dane", _) => {
                let with: Vec<&str> = self
                    .mx
                    .iter()
                    .filter(|h| h.tlsa.as_ref().is_some_and(|t| !t.records.is_empty()))
                    .map(|h| h.host.as_str())
                    .collect();
                format!(
                    "DANE applies (MX records signed, TLSA on {})",
                    with.join(", ")
                )
            }
            ("mta-sts", s) => format!("MTA-STS enforce id {}", s.id.as_deref().unwrap_or("?")),
            ("tls_policy", _) => format!(
                "delivery.tls_policy for {}: {}",
                self.domain,
                self.tls_policy.as_deref().unwrap_or("?")
            ),
            (_, s) if s.status == StsStatus::Testing => format!(
                "MTA-STS testing id {} (not enforced)",
                s.id.as_deref().unwrap_or("?")
            ),
            (_, s) if s.status == StsStatus::Failed => format!(
                "MTA-STS policy unavailable ({}): delivery as without one",
                s.error.as_ref().map_or("error", |e| e.result_type)
            ),
            _ => "no TLS policy applies (delivery.starttls)".into(),
        }
    }

    /// The verdict from the MX hosts' results, in delivery's order.
    fn conclude(&mut self) {
        let domain = &self.domain;
        for h in &self.mx {
            if let Some(f) = &h.fix
                && !self.fixes.contains(f)
            {
                self.fixes.push(f.clone());
            }
        }
        if let Some(e) = &self.mta_sts.error
            && self.mta_sts.status == StsStatus::Failed
        {
            self.fixes.push(e.fix.clone());
        }
        let chosen = self.mx.iter().position(|h| h.delivers);
        match chosen {
            Some(i) => {
                let h = &self.mx[i];
                self.delivers = true;
                self.policy = h.policy;
                let how = match h.addresses.iter().find(|a| a.delivers) {
                    Some(a) if a.encrypted && matches!(h.requires, "verify" | "dane") => {
                        "verified TLS"
                    }
                    Some(a) if a.encrypted => "TLS (certificate not checked)",
                    _ => "no TLS",
                };
                let mut verdict = format!(
                    "{}: {}: delivery will use {} with {how}",
                    self.lead(h.policy),
                    h.finding,
                    h.host
                );
                let skipped: Vec<String> = self.mx[..i]
                    .iter()
                    .map(|s| format!("{} is passed over ({})", s.host, s.finding))
                    .collect();
                if !skipped.is_empty() {
                    verdict.push_str(&format!("; {}", skipped.join("; ")));
                }
                let failing: Vec<String> = self.mx[i + 1..]
                    .iter()
                    .filter(|s| !s.delivers)
                    .map(|s| format!("{} would defer if used ({})", s.host, s.finding))
                    .collect();
                if !failing.is_empty() {
                    verdict.push_str(&format!("; {}", failing.join("; ")));
                }
                self.verdict = verdict;
            }
            None => {
                let first = self.mx.first();
                self.policy = first.map_or("default", |h| h.policy);
                self.verdict = match first {
                    Some(h) => format!(
                        "{}: {} — delivery to {domain} defers{}{}",
                        self.lead(h.policy),
                        h.finding,
                        h.code.map(|c| format!(" ({c})")).unwrap_or_default(),
                        h.fix
                            .as_ref()
                            .map(|f| format!("; fix: {f}"))
                            .unwrap_or_default()
                    ),
                    None => format!("{}: no usable mail server for {domain}", self.applies),
                };
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Text output

impl fmt::Display for TlsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "herald tls check: {}", self.domain)?;
        writeln!(f, "  policy    {}", self.applies)?;
        if let Some(line) = &self.tls_policy {
            writeln!(f, "  config    delivery.tls_policy: {line}")?;
        }
        write_sts(f, &self.mta_sts)?;
        writeln!(
            f,
            "  dane      {}{}",
            self.dane.status,
            if self.dane.detail.is_empty() {
                String::new()
            } else {
                format!(": {}", self.dane.detail)
            }
        )?;
        for h in &self.mx {
            let listed = match h.in_mta_sts {
                Some(true) => ", listed in MTA-STS",
                Some(false) => ", NOT listed in MTA-STS",
                None => "",
            };
            let requires = match h.requires {
                "none" => "no TLS",
                "opportunistic" => "STARTTLS when offered",
                "encrypt" => "STARTTLS, any certificate",
                "verify" => "STARTTLS with a certificate valid for the host",
                _ => "STARTTLS with a certificate its TLSA records name",
            };
            writeln!(
                f,
                "  mx {} (preference {}): {}: {requires}{listed}",
                h.host, h.preference, h.policy
            )?;
            if let Some(t) = &h.tlsa {
                if t.records.is_empty() {
                    writeln!(f, "      tlsa     {} ({}): none", t.name, t.dnssec)?;
                } else {
                    for r in &t.records {
                        writeln!(f, "      tlsa     {} ({}): {r}", t.name, t.dnssec)?;
                    }
                }
            }
            for a in &h.addresses {
                let status = if a.delivers { "ok" } else { "FAIL" };
                writeln!(f, "    {status:<4} [{}]", a.ip)?;
                let starttls = match a.starttls {
                    Some(true) => "offered",
                    Some(false) => "not offered",
                    None => "not reached",
                };
                writeln!(f, "      starttls {starttls}")?;
                if let Some(v) = a.tls {
                    writeln!(
                        f,
                        "      tls      {v}{}",
                        a.cipher
                            .as_ref()
                            .map(|c| format!(" {c}"))
                            .unwrap_or_default()
                    )?;
                }
                if let Some(e) = &a.handshake_error {
                    writeln!(f, "      tls      handshake failed: {e}")?;
                }
                if let Some(c) = &a.certificate {
                    writeln!(
                        f,
                        "      cert     for {}; issuer {}; valid until {}{}",
                        c.summary.names_text(),
                        c.summary.issuer.as_deref().unwrap_or("?"),
                        c.not_after.as_deref().unwrap_or("?"),
                        if c.expired { " (EXPIRED)" } else { "" }
                    )?;
                    match &c.webpki_error {
                        None => writeln!(f, "      webpki   valid for {}", h.host)?,
                        Some(e) => writeln!(f, "      webpki   not valid: {e}")?,
                    }
                    match (c.tlsa_match, &c.tlsa_record, &c.tlsa_error) {
                        (Some(true), Some(r), _) => writeln!(f, "      dane     matches {r}")?,
                        (Some(false), _, Some(e)) => writeln!(f, "      dane     {e}")?,
                        _ => {}
                    }
                }
                writeln!(f, "      result   {}", a.result)?;
            }
            if h.addresses.is_empty() {
                writeln!(f, "    FAIL {}", h.result)?;
            }
            if let Some(fix) = &h.fix {
                writeln!(f, "      fix      {fix}")?;
            }
        }
        write!(
            f,
            "{} {}",
            if self.delivers {
                "result:"
            } else {
                "result: DEFERS:"
            },
            self.verdict
        )
    }
}

fn write_sts(f: &mut fmt::Formatter<'_>, s: &StsReport) -> fmt::Result {
    let status = match s.status {
        StsStatus::Disabled => "disabled ([delivery.mta_sts] enabled = false)".to_string(),
        StsStatus::Absent => "no _mta-sts TXT record".into(),
        StsStatus::DnsError => "the _mta-sts TXT record could not be read".into(),
        StsStatus::InvalidRecord => format!("invalid TXT record, ignored: {}", s.txt.join(" | ")),
        StsStatus::Enforce | StsStatus::Testing => format!(
            "mode {}, id {}, mx {}, max_age {}",
            s.mode.unwrap_or("?"),
            s.id.as_deref().unwrap_or("?"),
            s.mx.join(", "),
            s.max_age.unwrap_or(0)
        ),
        StsStatus::None => "mode none (no policy)".into(),
        StsStatus::Failed => "TXT record published, but no policy".into(),
    };
    writeln!(f, "  mta-sts   {status}")?;
    if let Some(e) = &s.error {
        writeln!(f, "            {}: {}", e.result_type, e.meaning)?;
        writeln!(f, "            {}", e.detail)?;
        writeln!(f, "            fix: {}", e.fix)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Command line

/// `herald tls ...`
#[derive(clap::Subcommand, Debug)]
pub enum TlsCommand {
    /// Which TLS policy applies to a destination domain and why, each MX
    /// host's STARTTLS, certificate and TLSA result, and what delivery
    /// will do, with the fix.
    Check(CheckArgs),
}

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// The recipient domain, e.g. example.com.
    pub domain: String,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Bound on each SMTP step: connect, TLS handshake, each reply ("10s").
    #[arg(long, default_value = "10s", value_parser = parse_timeout)]
    pub timeout: Duration,
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = crate::config::units::Span::parse(s)?.0;
    if d.is_zero() {
        return Err("the timeout must be more than 0".into());
    }
    Ok(d)
}

/// Runs `herald tls check`: exit 0 when delivery would succeed under the
/// policy that applies, 1 when it would defer (or bounce), 2 for an
/// unusable command line or config.
pub fn cli(
    command: TlsCommand,
    config: &std::path::Path,
    rt: &tokio::runtime::Runtime,
) -> std::process::ExitCode {
    use std::process::ExitCode;
    let TlsCommand::Check(args) = command;
    if let Err(e) = super::domain_check::normalize_domain(&args.domain) {
        eprintln!("herald tls check: {e}");
        return ExitCode::from(2);
    }
    let Some(cfg) = Config::load_or_print(config) else {
        return ExitCode::from(2);
    };
    let opts = Options {
        timeout: args.timeout,
    };
    let report = match rt.block_on(check(&cfg, &args.domain, &opts)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("herald tls check: {e}");
            return ExitCode::from(2);
        }
    };
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("herald tls check: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        println!("{report}");
    }
    if report.delivers {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_need_what_delivery_requires() {
        assert_eq!(
            Rule::Default(StarttlsPolicy::Opportunistic).need(),
            Need::Opportunistic
        );
        assert_eq!(
            Rule::Default(StarttlsPolicy::Required).need(),
            Need::Encrypt
        );
        assert_eq!(Rule::Default(StarttlsPolicy::Disabled).need(), Need::Plain);
        assert_eq!(Rule::Config(TlsLevel::None).need(), Need::Plain);
        assert_eq!(Rule::Config(TlsLevel::Dane).need(), Need::Opportunistic);
        assert_eq!(Rule::Config(TlsLevel::Verify).need(), Need::Verify);
        let unusable = Arc::new(TlsaSet {
            name: "_25._tcp.mx.test".into(),
            records: vec![crate::dns::Tlsa {
                usage: 1,
                selector: 1,
                matching: 1,
                data: vec![0; 32],
            }],
        });
        // RFC 7672 §2.2: unusable records still require TLS, unauthenticated.
        assert_eq!(Rule::Dane(unusable.clone()).need(), Need::Encrypt);
        let usable = Arc::new(TlsaSet {
            records: vec![crate::dns::Tlsa {
                usage: 3,
                ..unusable.records[0].clone()
            }],
            ..(*unusable).clone()
        });
        assert_eq!(Rule::Dane(usable).need(), Need::Dane);
    }
}
