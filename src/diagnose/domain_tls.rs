//! The transport-security items of `herald domain check`: the domain's
//! MTA-STS policy file (RFC 8461 §3.2, §3.3), fetched and parsed as
//! delivery fetches and parses it; whether each MX host is listed in it
//! and presents a certificate valid for its name (§4.1, §4.2); and, where
//! the MX records are DNSSEC-signed and `[delivery.dane]` is configured,
//! whether each MX host's TLSA records name what it presents (RFC 7672).
//!
//! Items: `mta-sts-policy`, `mta-sts-mx` and `mta-sts-cert` (one per MX
//! host), `dane-tlsa` (one per MX host). A lookup or connection that fails
//! is "could not check" (warn), never a verdict.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::domain_check::{Fix, Item, Status};
use super::tls_probe::{self, CertFault, CertReport, Probe, StsStatus, webpki_fix};
use crate::config::{Config, TlsLevel};
use crate::deliver::client::Timeouts;
use crate::deliver::dane::TlsaSet;
use crate::deliver::mta_sts::{self, Mode, Policy};
use crate::dns::{Dns, MxHost, Validated};

/// Bound on each SMTP step of a probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// A policy file to serve, as a fix.
fn file_fix(domain: &str, text: String) -> Option<Fix> {
    Some(Fix {
        name: format!("https://mta-sts.{domain}/.well-known/mta-sts.txt"),
        rtype: "FILE".into(),
        value: text,
    })
}

/// A certificate to install on a host, as a fix.
fn cert_fix(host: &str, what: String) -> Option<Fix> {
    Some(Fix {
        name: host.to_string(),
        rtype: "CERT".into(),
        value: what,
    })
}

/// The policy file the domain should serve: its current mode and max_age
/// when it has a valid policy (else `testing` and a week), and an `mx:`
/// line per MX host (and per pattern already listed that still matches one).
fn policy_text(policy: Option<&Policy>, hosts: &[MxHost]) -> String {
    let mode = policy.map_or(Mode::Testing, |p| match p.mode {
        Mode::None => Mode::Testing,
        m => m,
    });
    let mut mx: Vec<String> = policy
        .map(|p| {
            p.mx.iter()
                .filter(|pat| {
                    hosts.iter().any(|h| {
                        Policy {
                            mx: vec![(*pat).clone()],
                            ..p.clone()
                        }
                        .allows_mx(&h.name)
                    })
                })
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    for h in hosts {
        let listed = policy.is_some_and(|p| {
            Policy {
                mx: mx.clone(),
                ..p.clone()
            }
            .allows_mx(&h.name)
        });
        if !listed && !mx.contains(&h.name) {
            mx.push(h.name.clone());
        }
    }
    let max_age = policy.map_or(604_800, |p| p.max_age.max(86_400));
    let mut text = format!("version: STSv1\nmode: {}\n", mode.as_str());
    for m in mx {
        text.push_str(&format!("mx: {m}\n"));
    }
    text.push_str(&format!("max_age: {max_age}\n"));
    text
}

/// The MTA-STS policy and DANE items for `domain`. `sts_record_ok`: the
/// `mta-sts` item found one valid TXT record, so there is a policy to fetch.
pub async fn check(config: &Config, dns: &Dns, domain: &str, sts_record_ok: bool) -> Vec<Item> {
    let mut items = Vec::new();
    let hosts: Vec<MxHost> = match dns.mx_records(domain).await {
        Ok(h) => h.into_iter().filter(|h| !h.name.is_empty()).collect(),
        Err(_) => Vec::new(), // the `mx` item says it could not check
    };

    // The policy file, fetched as delivery fetches it (whether or not this
    // relay enforces MTA-STS itself: other senders do).
    let mut policy = None;
    if sts_record_ok {
        let cfg = crate::config::MtaStsConfig {
            enabled: true,
            ..config.delivery.mta_sts.clone()
        };
        let sts = tls_probe::fetch_policy(&cfg, dns, domain).await;
        let url = sts.url.clone();
        items.push(match (sts.status, &sts.policy, &sts.error) {
            (StsStatus::Enforce | StsStatus::Testing, Some(p), _) => Item::pass(
                "mta-sts-policy",
                format!(
                    "{url}: mode {}, mx {}, max_age {}{}",
                    p.mode.as_str(),
                    p.mx.join(", "),
                    p.max_age,
                    if p.mode == Mode::Testing {
                        " (testing: senders report failures but deliver anyway)"
                    } else {
                        ""
                    }
                ),
            ),
            (StsStatus::None, _, _) => Item::new(
                "mta-sts-policy",
                Status::Warn,
                format!(
                    "{url} says mode none: the policy is withdrawn and senders do not require TLS"
                ),
                None,
            ),
            (StsStatus::DnsError, _, Some(e)) => Item::unknown("mta-sts-policy", &e.detail),
            (_, _, Some(e)) => {
                let fix = match e.result_type {
                    mta_sts::WEBPKI_INVALID => cert_fix(
                        &format!("mta-sts.{domain}"),
                        format!("an HTTPS certificate valid for mta-sts.{domain} from a public CA"),
                    ),
                    _ => file_fix(domain, policy_text(None, &hosts)),
                };
                Item::new(
                    "mta-sts-policy",
                    Status::Fail,
                    format!(
                        "{} ({}): {}; fix: {}",
                        e.meaning, e.result_type, e.detail, e.fix
                    ),
                    fix,
                )
            }
            _ => Item::unknown("mta-sts-policy", "no policy"),
        });
        policy = sts
            .policy
            .filter(|p| matches!(p.mode, Mode::Enforce | Mode::Testing));
    }

    // Each MX host in the policy.
    if let Some(p) = &policy {
        for h in &hosts {
            items.push(if p.allows_mx(&h.name) {
                Item::pass(
                    "mta-sts-mx",
                    format!("{} is listed in the MTA-STS policy (mx: {})", h.name, p.mx.join(", ")),
                )
            } else {
                Item::new(
                    "mta-sts-mx",
                    Status::Fail,
                    format!(
                        "MX {} is not listed in the MTA-STS policy (mx: {}): senders that enforce it do not deliver to {}; add it to the policy file and change the id in the _mta-sts.{domain} TXT record",
                        h.name,
                        p.mx.join(", "),
                        h.name
                    ),
                    file_fix(domain, policy_text(Some(p), &hosts)),
                )
            });
        }
    }

    // DANE, where this relay uses it and the MX records are signed.
    let d = &config.delivery;
    let dane_configured = d.dane.enabled
        || d.tls_policy
            .values()
            .any(|e| matches!(e.level, TlsLevel::Dane | TlsLevel::DaneOnly));
    let mut tlsa: Vec<Option<Result<Option<Arc<TlsaSet>>, Item>>> = vec![None; hosts.len()];
    if dane_configured
        && let Ok(v) = d
            .dane
            .trust_anchors()
            .and_then(|a| Dns::validating(&config.dns, a))
    {
        match v.mx_validated(domain).await {
            Ok(Validated::Secure(_)) => {
                for (i, h) in hosts.iter().enumerate() {
                    let name = format!("_{}._tcp.{}", d.port, h.name);
                    tlsa[i] = Some(match v.tlsa(&name).await {
                        Ok(Validated::Secure(records)) if !records.is_empty() => {
                            Ok(Some(Arc::new(TlsaSet { name, records })))
                        }
                        Ok(Validated::Bogus) => Err(Item::new(
                            "dane-tlsa",
                            Status::Fail,
                            format!(
                                "the TLSA records of {} at {name} fail DNSSEC validation (bogus): DANE senders do not deliver to {}; re-sign the zone that holds {name}",
                                h.name, h.name
                            ),
                            None,
                        )),
                        Ok(_) => Ok(None),
                        Err(e) => Err(Item::unknown("dane-tlsa", e)),
                    });
                }
            }
            Ok(Validated::Bogus) => items.push(Item::new(
                "dane-tlsa",
                Status::Fail,
                format!(
                    "the MX records of {domain} fail DNSSEC validation (bogus): DNSSEC-validating senders defer all mail to {domain}; re-sign the zone and check the DS record at the parent"
                ),
                None,
            )),
            Ok(Validated::Insecure(_)) => {}
            Err(e) => items.push(Item::unknown("dane-tlsa", e)),
        }
    }

    // One session per MX address where there is something to check.
    if policy.is_none() && tlsa.iter().all(Option::is_none) {
        return items;
    }
    let verifier = tls_probe::webpki_verifier(config);
    let helo = config.helo_name().to_string();
    let timeouts = Timeouts {
        connect: PROBE_TIMEOUT.min(d.connect_timeout.as_duration()),
        command: PROBE_TIMEOUT.min(d.command_timeout.as_duration()),
        data: PROBE_TIMEOUT,
    };
    let probes = futures_util::future::join_all(hosts.iter().map(|h| async {
        let ips = match dns.ips(&h.name).await {
            Ok(ips) if !ips.is_empty() => ips,
            Ok(_) => return Err(format!("{} has no address", h.name)),
            Err(e) => return Err(e.to_string()),
        };
        let mut out = Vec::new();
        for ip in ips {
            let addr = SocketAddr::new(ip, d.port);
            out.push((
                ip,
                tls_probe::probe(&h.name, addr, None, &helo, timeouts).await,
            ));
        }
        Ok(out)
    }))
    .await;

    for (i, (h, probes)) in hosts.iter().zip(probes).enumerate() {
        let set = match &tlsa[i] {
            Some(Ok(Some(set))) => Some(set.clone()),
            _ => None,
        };
        let sessions = match probes {
            Ok(s) => s,
            Err(e) => {
                if policy.as_ref().is_some_and(|p| p.allows_mx(&h.name)) {
                    items.push(Item::unknown("mta-sts-cert", &e));
                }
                if tlsa[i].is_some() {
                    items.push(Item::unknown("dane-tlsa", &e));
                }
                continue;
            }
        };
        let judged: Vec<(std::net::IpAddr, Probe, Option<CertReport>)> = sessions
            .into_iter()
            .map(|(ip, p)| {
                let c = tls_probe::judge_certificate(
                    &p.chain,
                    &h.name,
                    verifier.as_ref(),
                    set.as_deref(),
                );
                (ip, p, c)
            })
            .collect();
        if policy.as_ref().is_some_and(|p| p.allows_mx(&h.name)) {
            items.push(cert_item(&h.name, &judged));
        }
        match tlsa[i].take() {
            Some(Err(item)) => items.push(item),
            Some(Ok(Some(set))) => items.push(tlsa_item(&h.name, &set, &judged)),
            Some(Ok(None)) => items.push(Item::new(
                "dane-tlsa",
                Status::Warn,
                format!(
                    "the MX records of {domain} are signed but {} publishes no TLSA record at _{}._tcp.{} (optional: DANE lets senders require TLS with its key)",
                    h.name, d.port, h.name
                ),
                judged
                    .iter()
                    .find_map(|(_, _, c)| c.as_ref()?.tlsa_for_key.clone())
                    .map(|record| Fix {
                        name: format!("_{}._tcp.{}", d.port, h.name),
                        rtype: "TLSA".into(),
                        value: record,
                    }),
            )),
            None => {}
        }
    }
    items
}

/// `mta-sts-cert`: every address of `host` offers STARTTLS with a
/// certificate valid for `host`.
fn cert_item(host: &str, sessions: &[(std::net::IpAddr, Probe, Option<CertReport>)]) -> Item {
    const CHECK: &str = "mta-sts-cert";
    for (ip, p, cert) in sessions {
        if let Some(e) = &p.error
            && p.tls_version.is_none()
        {
            return Item::unknown(CHECK, e);
        }
        if p.starttls == Some(false) || p.starttls_refused.is_some() {
            return Item::new(
                CHECK,
                Status::Fail,
                format!(
                    "{host} [{ip}] offers no STARTTLS: senders that enforce the MTA-STS policy do not deliver to it"
                ),
                cert_fix(
                    host,
                    format!("STARTTLS enabled with a certificate valid for {host}"),
                ),
            );
        }
        if let Some(e) = &p.handshake_error {
            return Item::new(
                CHECK,
                Status::Fail,
                format!("the TLS handshake with {host} [{ip}] fails: {e}"),
                cert_fix(
                    host,
                    format!("a working TLS set-up with a certificate valid for {host}"),
                ),
            );
        }
        match cert {
            Some(c) if c.webpki_valid => {}
            Some(c) => {
                let fault = c.webpki_fault.unwrap_or(CertFault::Other);
                if fault == CertFault::NoTrustStore {
                    return Item::unknown(CHECK, "this relay has no trusted root certificates");
                }
                return Item::new(
                    CHECK,
                    Status::Fail,
                    format!(
                        "{host} [{ip}]: {}: senders that enforce the MTA-STS policy do not deliver to it; fix: {}",
                        c.webpki_error.as_deref().unwrap_or("certificate refused"),
                        webpki_fix(fault, host)
                    ),
                    cert_fix(
                        host,
                        format!(
                            "a certificate valid for {host} from a public CA, with its intermediates"
                        ),
                    ),
                );
            }
            None => {
                return Item::new(
                    CHECK,
                    Status::Fail,
                    format!("{host} [{ip}] presented no certificate"),
                    cert_fix(host, format!("a certificate valid for {host}")),
                );
            }
        }
    }
    let c = sessions.iter().find_map(|(_, _, c)| c.as_ref());
    Item::pass(
        CHECK,
        format!(
            "{host} presents a certificate valid for {host}{}",
            c.and_then(|c| c.not_after.as_deref())
                .map(|t| format!(" (until {t})"))
                .unwrap_or_default()
        ),
    )
}

/// `dane-tlsa`: every address of `host` presents what its TLSA records name.
fn tlsa_item(
    host: &str,
    set: &TlsaSet,
    sessions: &[(std::net::IpAddr, Probe, Option<CertReport>)],
) -> Item {
    const CHECK: &str = "dane-tlsa";
    let mut matched = None;
    for (ip, p, cert) in sessions {
        if let Some(e) = &p.error
            && p.tls_version.is_none()
        {
            return Item::unknown(CHECK, e);
        }
        let Some(c) = cert.as_ref().filter(|_| p.tls_ok()) else {
            return Item::new(
                CHECK,
                Status::Fail,
                format!(
                    "{host} [{ip}] has TLSA records at {} but {}: DANE senders do not deliver to it",
                    set.name,
                    if p.starttls == Some(false) {
                        "offers no STARTTLS".to_string()
                    } else {
                        format!(
                            "TLS fails ({})",
                            p.handshake_error.as_deref().unwrap_or("no certificate")
                        )
                    }
                ),
                cert_fix(
                    host,
                    format!(
                        "STARTTLS with the key its TLSA records at {} name",
                        set.name
                    ),
                ),
            );
        };
        match c.tlsa_match {
            Some(true) => matched = c.tlsa_record.clone(),
            _ => {
                return Item::new(
                    CHECK,
                    Status::Fail,
                    format!(
                        "{host} [{ip}]: {}: DANE senders do not deliver to it; publish a record for the key it presents (or put back the certificate the records name)",
                        c.tlsa_error.as_deref().unwrap_or("no TLSA record matches")
                    ),
                    c.tlsa_for_key.clone().map(|record| Fix {
                        name: set.name.clone(),
                        rtype: "TLSA".into(),
                        value: record,
                    }),
                );
            }
        }
    }
    Item::pass(
        CHECK,
        format!(
            "{host} matches its TLSA record {} at {}",
            matched.unwrap_or_default(),
            set.name
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mx(name: &str) -> MxHost {
        MxHost {
            name: name.into(),
            preference: 10,
        }
    }

    #[test]
    fn the_suggested_policy_lists_every_mx() {
        assert_eq!(
            policy_text(None, &[mx("mx1.a.test"), mx("mx2.a.test")]),
            "version: STSv1\nmode: testing\nmx: mx1.a.test\nmx: mx2.a.test\nmax_age: 604800\n"
        );
        let p = Policy {
            id: "1".into(),
            mode: Mode::Enforce,
            mx: vec!["*.a.test".into(), "old.b.test".into()],
            max_age: 86400,
        };
        assert_eq!(
            policy_text(Some(&p), &[mx("mx1.a.test"), mx("mx.c.test")]),
            "version: STSv1\nmode: enforce\nmx: *.a.test\nmx: mx.c.test\nmax_age: 86400\n"
        );
    }
}
