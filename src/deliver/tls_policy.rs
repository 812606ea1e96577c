//! TLS policy on the delivery path: what a session to a destination must
//! reach and who asks for it ([`Asked`]: `delivery.starttls`, a
//! `[delivery.tls_policy]` line, an MTA-STS policy, DANE), the DANE
//! lookups, STARTTLS that must succeed, MTA-STS testing mode, REQUIRETLS,
//! and the sessions counted for TLS-RPT.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use mail_auth::report::tlsrpt::{FailureDetails, PolicyDetails, PolicyType, ResultType};

use super::client::{self, ClientError, SmtpClient, Stage, Tls};
use super::{ConnectFailure, Ctx, Session, cert, dane, mta_sts};
use crate::config::TlsLevel;
use crate::dns::Dns;
use crate::event::Reason;
use crate::queue::AttemptResult;
use crate::reply::{Enhanced, Reply};

/// What TLS a session to a destination must reach, and who asks for it.
#[derive(Clone, Copy)]
pub(super) enum Asked<'a> {
    /// `delivery.starttls` alone.
    Default,
    /// `[delivery.tls_policy]` for the domain.
    Config {
        domain: &'a str,
        level: crate::config::TlsLevel,
    },
    /// The domain's enforced MTA-STS policy: verified TLS to listed MX hosts.
    MtaSts {
        domain: &'a str,
        policy: &'a mta_sts::Policy,
    },
    /// The domain's MTA-STS policy in testing mode (RFC 8461 §5): delivery
    /// as without it, the certificate checked as enforce would and what
    /// fails reported, not refused.
    MtaStsTesting {
        domain: &'a str,
        policy: &'a mta_sts::Policy,
        recorder: &'a Arc<cert::RecordingVerifier>,
    },
    /// The MX host's TLSA records, proven by DNSSEC: TLS, and a certificate
    /// one of them names (none usable: TLS alone).
    Dane {
        domain: &'a str,
        tlsa: &'a Arc<dane::TlsaSet>,
    },
}

impl Asked<'_> {
    /// Who asks, for the reply that says why a session was refused.
    pub(super) fn who(&self) -> String {
        match self {
            Asked::Default => "delivery.starttls".into(),
            Asked::Config { domain, level } => {
                format!(
                    "TLS policy for {domain} (delivery.tls_policy: {})",
                    level.as_str()
                )
            }
            Asked::MtaSts { domain, policy } => {
                format!("MTA-STS policy of {domain} (enforce, id {})", policy.id)
            }
            Asked::Dane { domain, tlsa } => {
                format!("DANE for {domain} (TLSA records at {})", tlsa.name)
            }
            Asked::MtaStsTesting { domain, policy, .. } => {
                format!("MTA-STS policy of {domain} (testing, id {})", policy.id)
            }
        }
    }

    /// How a session it opened checked the certificate (`tls_info.verified`).
    pub(super) fn verified(&self) -> &'static str {
        match self {
            Asked::MtaSts { .. } => "mta-sts",
            Asked::Dane { tlsa, .. } if tlsa.any_usable() => "dane",
            Asked::Config {
                level: crate::config::TlsLevel::Verify,
                ..
            } => "verify",
            _ => "none",
        }
    }

    /// The policy that applied (`tls_info.policy`).
    pub(super) fn policy(&self) -> Option<String> {
        match self {
            Asked::MtaSts { policy, .. } => Some(format!("mta-sts enforce id {}", policy.id)),
            Asked::Dane { tlsa, .. } => Some(format!("dane {}", tlsa.name)),
            Asked::MtaStsTesting { policy, .. } => {
                Some(format!("mta-sts testing id {}", policy.id))
            }
            Asked::Config { level, .. } => Some(format!("tls_policy {}", level.as_str())),
            Asked::Default => None,
        }
    }

    /// The published policy a TLS-RPT report covers (RFC 8460 §4.4), for
    /// the session to `host`; none for what only this relay's config asks.
    pub(super) fn tls_report_policy(&self, host: &str) -> Option<PolicyDetails> {
        match self {
            Asked::MtaSts { domain, policy } | Asked::MtaStsTesting { domain, policy, .. } => {
                Some(PolicyDetails {
                    policy_type: PolicyType::Sts,
                    policy_string: policy.lines(),
                    policy_domain: domain.to_string(),
                    mx_host: policy.mx.clone(),
                })
            }
            Asked::Dane { domain, tlsa } => Some(PolicyDetails {
                policy_type: PolicyType::Tlsa,
                policy_string: tlsa.policy_strings(),
                policy_domain: domain.to_string(),
                mx_host: vec![host.to_string()],
            }),
            _ => None,
        }
    }
}

/// Why a REQUIRETLS message (RFC 8689 §5) may not go over this session:
/// it must be TLS with a certificate checked by a policy (MTA-STS enforce,
/// DANE, `tls_policy` verify, a smarthost's CA), to a server that offers
/// REQUIRETLS and so keeps the requirement on the next hop. Either failing
/// is permanent for the message: it bounces, as the RFC asks.
pub(super) fn requiretls_refusal(s: &Session, domain: &str) -> Option<Reply> {
    let verified = s.client.tls_version().is_some() && s.verified != "none";
    if !verified {
        return Some(Reply::new(
            550,
            Enhanced(5, 7, 10),
            format!(
                "REQUIRETLS: the sender asked for TLS with a verified certificate all the way, but {} offers no such path for {domain} (no MTA-STS enforce policy, no DANE TLSA records, no delivery.tls_policy verify line); not delivered",
                s.mx
            ),
        ));
    }
    if !s.client.capabilities().requiretls {
        return Some(Reply::new(
            550,
            Enhanced(5, 7, 30),
            format!(
                "REQUIRETLS: {} ({} verified TLS) does not offer REQUIRETLS, so it could not keep the sender's requirement; not delivered",
                s.mx, s.verified
            ),
        ));
    }
    None
}

/// What a session opened under an MTA-STS policy in testing mode would
/// have met under enforce: counted for TLS-RPT, and said in the event
/// (`tls_info.policy_failure`). `None` when it would have passed.
pub(super) fn testing_outcome(
    ctx: &Ctx,
    asked: &Asked<'_>,
    client: &SmtpClient,
    recorder: &cert::RecordingVerifier,
    host: &str,
    addr: SocketAddr,
) -> Option<String> {
    let policy = asked.tls_report_policy(host)?;
    let (result_type, what) = match (client.tls_version(), recorder.outcome()) {
        (Some(_), Some(cert::CertOutcome::Verified)) => {
            report_tls(ctx, &policy, None);
            return None;
        }
        (None, _) if !client.capabilities().starttls => (
            ResultType::StartTlsNotSupported,
            format!("{host} [{}] offered no STARTTLS", addr.ip()),
        ),
        (None, _) => (
            ResultType::ValidationFailure,
            format!("the TLS handshake with {host} [{}] failed", addr.ip()),
        ),
        (Some(_), Some(cert::CertOutcome::Failed { error, .. })) => (
            tls_result_type(client::CertProblem::of(&error)),
            format!("the certificate of {host} [{}]: {error}", addr.ip()),
        ),
        (Some(_), _) => (
            ResultType::CertificateNotTrusted,
            "this relay has no trusted root certificates to verify it with".to_string(),
        ),
    };
    report_tls(
        ctx,
        &policy,
        Some((result_type, Some(host), Some(addr.ip()), "")),
    );
    Some(format!("{} would refuse this session: {what}", asked.who()))
}

/// The TLS-RPT result type of a certificate problem.
pub(super) fn tls_result_type(problem: client::CertProblem) -> ResultType {
    use client::CertProblem;
    match problem {
        CertProblem::HostMismatch => ResultType::CertificateHostMismatch,
        CertProblem::Expired => ResultType::CertificateExpired,
        CertProblem::NotTrusted => ResultType::CertificateNotTrusted,
        CertProblem::NoTlsaMatch => ResultType::TlsaInvalid,
        CertProblem::Other => ResultType::ValidationFailure,
    }
}

/// TLS-RPT's result types and their names (RFC 8460 §4.3).
const RESULT_TYPES: [(ResultType, &str); 11] = [
    (ResultType::StartTlsNotSupported, "starttls-not-supported"),
    (
        ResultType::CertificateHostMismatch,
        "certificate-host-mismatch",
    ),
    (ResultType::CertificateExpired, "certificate-expired"),
    (ResultType::CertificateNotTrusted, "certificate-not-trusted"),
    (ResultType::ValidationFailure, "validation-failure"),
    (ResultType::TlsaInvalid, "tlsa-invalid"),
    (ResultType::DnssecInvalid, "dnssec-invalid"),
    (ResultType::DaneRequired, "dane-required"),
    (ResultType::StsPolicyFetchError, "sts-policy-fetch-error"),
    (ResultType::StsPolicyInvalid, "sts-policy-invalid"),
    (ResultType::StsWebpkiInvalid, "sts-webpki-invalid"),
];

pub(super) fn result_name(t: ResultType) -> &'static str {
    RESULT_TYPES
        .iter()
        .find(|(r, _)| *r == t)
        .map_or("validation-failure", |(_, n)| n)
}

/// The TLS-RPT result type of an MTA-STS lookup failure, by its name.
pub(super) fn sts_result_type(name: &str) -> ResultType {
    RESULT_TYPES
        .iter()
        .find(|(_, n)| *n == name)
        .map_or(ResultType::StsPolicyFetchError, |(r, _)| *r)
}

/// A deferral of the whole destination for a TLS policy reason.
pub(super) fn site_deferral(reply: Reply, mx: Option<String>) -> ConnectFailure {
    ConnectFailure::Site {
        result: AttemptResult::Deferred(reply, Reason::Tls),
        mx,
    }
}

/// Whether DNSSEC proves the MX records of `domain`, so that DANE applies
/// to its hosts (RFC 7672 §2.2.1). Bogus records, or for `dane-only`
/// unsigned ones, defer the domain: never a downgrade to no DANE.
pub(super) async fn dane_domain(
    ctx: &Ctx,
    validating: &Dns,
    domain: &str,
    dane_only: bool,
) -> Result<bool, Reply> {
    use crate::dns::Validated;
    let report = |result_type, info: &str| {
        report_tls(
            ctx,
            &PolicyDetails {
                policy_type: PolicyType::Tlsa,
                policy_string: Vec::new(),
                policy_domain: domain.to_string(),
                mx_host: Vec::new(),
            },
            Some((result_type, None, None, info)),
        )
    };
    match validating.mx_validated(domain).await {
        Ok(Validated::Secure(hosts)) if !hosts.is_empty() => Ok(true),
        Ok(Validated::Secure(_) | Validated::Insecure(_)) if dane_only => {
            report(ResultType::DaneRequired, "MX records not signed");
            Err(Reply::new(
                451,
                Enhanced(4, 7, 5),
                format!(
                    "TLS policy for {domain} (delivery.tls_policy: dane-only) requires DANE, but the MX records of {domain} are not signed (DNSSEC insecure)"
                ),
            ))
        }
        Ok(Validated::Secure(_) | Validated::Insecure(_)) => Ok(false),
        Ok(Validated::Bogus) => {
            report(ResultType::DnssecInvalid, "MX records bogus");
            Err(Reply::new(
                451,
                Enhanced(4, 7, 5),
                format!(
                    "DANE: the MX records of {domain} fail DNSSEC validation (bogus: signatures missing, expired or not matching); not delivering until they validate"
                ),
            ))
        }
        Err(e) => Err(Reply::new(
            451,
            Enhanced(4, 4, 3),
            format!("DANE: {e}; DNSSEC-validated MX records are needed before delivering"),
        )),
    }
}

/// The TLSA records of an MX host of a domain whose MX records DNSSEC
/// proved: `Some` when they are proven too, `None` when the host has none
/// (then MTA-STS or the config decides). Bogus or failed lookups make the
/// host unusable (RFC 7672 §2.2), as does no TLSA under `dane-only`.
pub(super) async fn dane_host(
    ctx: &Ctx,
    validating: &Dns,
    domain: &str,
    host: &str,
    dane_only: bool,
) -> Result<Option<Arc<dane::TlsaSet>>, Reply> {
    use crate::dns::Validated;
    let name = format!("_{}._tcp.{host}", ctx.config.delivery.port);
    let policy = PolicyDetails {
        policy_type: PolicyType::Tlsa,
        policy_string: Vec::new(),
        policy_domain: domain.to_string(),
        mx_host: vec![host.to_string()],
    };
    let failed = |result_type, info: &str| {
        report_tls(ctx, &policy, Some((result_type, Some(host), None, info)));
    };
    match validating.tlsa(&name).await {
        Ok(Validated::Secure(records)) if !records.is_empty() => {
            Ok(Some(Arc::new(dane::TlsaSet { name, records })))
        }
        Ok(Validated::Bogus) => {
            failed(ResultType::DnssecInvalid, "TLSA records bogus");
            Err(Reply::new(
                451,
                Enhanced(4, 7, 5),
                format!(
                    "DANE: the TLSA records of mail server {host} of {domain} ({name}) fail DNSSEC validation (bogus); not used"
                ),
            ))
        }
        Ok(_) if dane_only => {
            failed(ResultType::DaneRequired, "no TLSA records");
            Err(Reply::new(
                451,
                Enhanced(4, 7, 5),
                format!(
                    "TLS policy for {domain} (delivery.tls_policy: dane-only) requires DANE; mail server {host} has no DNSSEC-signed TLSA records at {name}; not used"
                ),
            ))
        }
        Ok(_) => Ok(None),
        Err(e) => Err(Reply::new(
            451,
            Enhanced(4, 4, 3),
            format!(
                "DANE: {e}; mail server {host} of {domain} not used until its TLSA records can be read"
            ),
        )),
    }
}

/// Counts one session (or a failure before it) for TLS-RPT, when reports
/// are on: `failure` is the result type, the MX host, its address and a
/// word on what happened.
pub(super) fn report_tls(
    ctx: &Ctx,
    policy: &PolicyDetails,
    failure: Option<(ResultType, Option<&str>, Option<IpAddr>, &str)>,
) {
    if let (Some((result_type, ..)), Some(m)) = (&failure, ctx.sink.metrics()) {
        m.tls_policy_failures.inc(result_name(*result_type));
    }
    let Some(counts) = ctx.sink.tls_reports() else {
        return;
    };
    match failure {
        None => counts.success(policy),
        Some((result_type, mx, ip, info)) => counts.failure(
            policy,
            FailureDetails {
                result_type,
                sending_mta_ip: None,
                receiving_mx_hostname: mx.map(str::to_string),
                receiving_mx_helo: None,
                receiving_ip: ip,
                failed_session_count: 1,
                additional_information: None,
                failure_reason_code: (!info.is_empty()).then(|| info.to_string()),
            },
        ),
    }
}

/// STARTTLS that must succeed, with the certificate checked as `asked`
/// says (WebPKI and the host name for MTA-STS and `verify`, RFC 8461
/// §4.2; the TLSA records for DANE; nothing for `encrypt`), or a deferral
/// that says who required it and what failed: never a delivery in clear.
/// Sessions under a published policy are counted for TLS-RPT.
pub(super) async fn required_tls(
    ctx: &Ctx,
    mut client: SmtpClient,
    host: &str,
    addr: SocketAddr,
    asked: &Asked<'_>,
) -> Result<SmtpClient, (Reply, Reason)> {
    let dane_tls;
    let (tls, needs) = match asked {
        Asked::Dane { tlsa, .. } if tlsa.any_usable() => {
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            dane_tls = Tls::with_verifier(
                provider.clone(),
                Arc::new(dane::DaneVerifier::new((*tlsa).clone(), provider)),
            );
            (
                Some(&dane_tls),
                format!(
                    "requires TLS with a certificate its TLSA records name ({})",
                    dane::summary(tlsa)
                ),
            )
        }
        Asked::Dane { .. }
        | Asked::Config {
            level: TlsLevel::Encrypt,
            ..
        } => (Some(&ctx.tls), "requires TLS".to_string()),
        _ => (
            ctx.verify_tls.as_ref(),
            format!("requires TLS with a certificate valid for {host}"),
        ),
    };
    let report = asked.tls_report_policy(host);
    let why = |enhanced: Enhanced, result_type: ResultType, what: String| {
        if let Some(policy) = &report {
            report_tls(
                ctx,
                policy,
                Some((result_type, Some(host), Some(addr.ip()), "")),
            );
        }
        (
            Reply::new(451, enhanced, format!("{} {needs}; {what}", asked.who())),
            Reason::Tls,
        )
    };
    if !client.capabilities().starttls {
        return Err(why(
            Enhanced(4, 7, 10),
            ResultType::StartTlsNotSupported,
            format!("{host} [{}] offered no STARTTLS", addr.ip()),
        ));
    }
    let Some(tls) = tls else {
        return Err(why(
            Enhanced(4, 7, 5),
            ResultType::CertificateNotTrusted,
            "this relay has no trusted root certificates to verify it with".into(),
        ));
    };
    match client.starttls(tls, host, &ctx.helo).await {
        Ok(()) => {
            if let Some(policy) = &report {
                report_tls(ctx, policy, None);
            }
            Ok(client)
        }
        Err(ClientError::Rejected {
            stage: Stage::StartTls,
            reply,
        }) => Err(why(
            Enhanced(4, 7, 10),
            ResultType::StartTlsNotSupported,
            format!("{host} [{}] refused STARTTLS: {reply}", addr.ip()),
        )),
        // TLS came up; the server then refused EHLO over it.
        Err(ClientError::Rejected { stage, reply }) => Err(why(
            Enhanced(4, 7, 5),
            ResultType::ValidationFailure,
            format!("{host} [{}] refused {stage} over TLS: {reply}", addr.ip()),
        )),
        Err(e) => {
            use client::CertProblem;
            let result_type = match &e {
                ClientError::Tls(f) => tls_result_type(f.cert.unwrap_or(CertProblem::Other)),
                _ => ResultType::ValidationFailure,
            };
            Err(why(
                Enhanced(4, 7, 5),
                result_type,
                format!("the TLS handshake with {host} [{}] failed: {e}", addr.ip()),
            ))
        }
    }
}
