//! The pieces `herald tls check` and `herald domain check` share to look at
//! a destination's transport security the way delivery does: the MTA-STS
//! policy as delivery fetches it, one STARTTLS session to an MX address,
//! and the certificate it presented judged under WebPKI and under the MX
//! host's TLSA records.
//!
//! The session is opened with herald's own SMTP client
//! ([`crate::deliver::client::SmtpClient`]): EHLO with the relay's name,
//! STARTTLS, the handshake with SNI for the MX host. The handshake accepts
//! any certificate but records the chain (handshake signatures are still
//! checked), so a single session tells both whether TLS works at all and
//! what the certificate is; the chain is then checked with the verifiers
//! delivery uses ([`rustls::client::WebPkiServerVerifier`] over
//! [`mta_sts::trust_roots`], and [`DaneVerifier`]).
//!
//! Every network step is bounded: DNS by `[dns] timeout`, the policy fetch
//! by `[delivery.mta_sts] fetch_timeout`, SMTP by the caller's timeouts.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use rustls::CertificateError;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use serde::Serialize;

use super::certinfo::{CertSummary, rfc3339};
use crate::config::{Config, MtaStsConfig};
use crate::deliver::client::{ClientError, SmtpClient, Timeouts, Tls};
use crate::deliver::dane::{self, DaneVerifier, TlsaSet};
use crate::deliver::mta_sts::{self, Lookup, Mode, MtaSts, Policy};
use crate::dns::Dns;
use crate::net::AcceptAnyCert;

// ---------------------------------------------------------------------------
// MTA-STS

/// What became of a domain's MTA-STS policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StsStatus {
    /// `[delivery.mta_sts] enabled = false`: not looked up.
    Disabled,
    /// No `_mta-sts` TXT record beginning with `v=STSv1`.
    Absent,
    /// The TXT record could not be read (a temporary DNS failure).
    DnsError,
    /// A TXT record that is malformed, or several: ignored (RFC 8461 §3.1).
    InvalidRecord,
    /// A policy with mode enforce.
    Enforce,
    /// A policy with mode testing: reported on, not enforced.
    Testing,
    /// A policy with mode none (withdrawn), or none fetched at all.
    None,
    /// A TXT record, but no valid policy could be had.
    Failed,
}

/// Why a policy could not be had, by its TLS-RPT result type.
#[derive(Clone, Debug, Serialize)]
pub struct StsError {
    /// `sts-policy-fetch-error`, `sts-policy-invalid` or `sts-webpki-invalid`.
    pub result_type: &'static str,
    /// The result type in plain words.
    pub meaning: String,
    /// What went wrong, as delivery logs it (a parse error names its line).
    pub detail: String,
    /// What to change.
    pub fix: String,
}

/// A domain's MTA-STS record and policy, as delivery would see them now
/// with an empty cache.
#[derive(Clone, Debug, Serialize)]
pub struct StsReport {
    pub status: StsStatus,
    /// The TXT records at `_mta-sts.DOMAIN` that begin with `v=STSv1`.
    pub txt: Vec<String>,
    pub id: Option<String>,
    pub mode: Option<&'static str>,
    /// The policy's `mx:` patterns.
    pub mx: Vec<String>,
    pub max_age: Option<u64>,
    pub error: Option<StsError>,
    /// The policy file's address.
    pub url: String,
    #[serde(skip)]
    pub policy: Option<Arc<Policy>>,
}

impl StsReport {
    fn new(domain: &str, status: StsStatus) -> StsReport {
        StsReport {
            status,
            txt: Vec::new(),
            id: None,
            mode: None,
            mx: Vec::new(),
            max_age: None,
            error: None,
            url: format!("https://mta-sts.{domain}/.well-known/mta-sts.txt"),
            policy: None,
        }
    }
}

/// A directory of our own under the system's temp dir, removed on drop:
/// the policy cache of a diagnosis must not touch the relay's.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> std::io::Result<TempDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path =
            std::env::temp_dir().join(format!("herald-tls-check-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&path)?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The TLS-RPT result type in plain words, and the fix.
fn sts_error(domain: &str, result_type: &'static str, detail: String) -> StsError {
    let host = format!("mta-sts.{domain}");
    let url = format!("https://{host}/.well-known/mta-sts.txt");
    let (meaning, fix) = match result_type {
        mta_sts::POLICY_INVALID => (
            "the policy file was fetched but is not a valid MTA-STS policy".to_string(),
            format!(
                "correct the policy file at {url} (\"version: STSv1\" first, then mode, one mx: line per MX host, max_age; served as text/plain), then change the id in the _mta-sts.{domain} TXT record"
            ),
        ),
        mta_sts::WEBPKI_INVALID => (
            format!("the HTTPS certificate of {host} is not valid (expired, wrong name or untrusted issuer)"),
            format!("install a certificate valid for {host} from a public CA on the web server that serves {url}"),
        ),
        _ => (
            "the policy file could not be fetched (no address, connection refused, HTTP error, redirect or timeout)".to_string(),
            format!("serve the policy at {url} over HTTPS (status 200, no redirect), or remove the _mta-sts.{domain} TXT record if the domain has no policy"),
        ),
    };
    StsError {
        result_type,
        meaning,
        detail,
        fix,
    }
}

/// Whether one TXT record is a valid `v=STSv1; id=...;` (RFC 8461 §3.1),
/// for telling an ignored record from a policy of mode none: delivery
/// answers "no policy" for both.
fn valid_sts_txt(record: &str) -> bool {
    let mut fields = record.split(';').map(|f| f.trim_matches([' ', '\t']));
    if fields.next() != Some("v=STSv1") {
        return false;
    }
    let ids: Vec<&str> = fields.filter_map(|f| f.strip_prefix("id=")).collect();
    matches!(ids.as_slice(), [id] if !id.is_empty() && id.len() <= 32 && id.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// The domain's MTA-STS policy, looked up and fetched with delivery's own
/// code ([`MtaSts::lookup`], with `cfg`, the relay's `[delivery.mta_sts]`)
/// and an empty, throw-away cache: what is published now. Never fails;
/// problems are in the report.
pub async fn fetch_policy(cfg: &MtaStsConfig, dns: &Dns, domain: &str) -> StsReport {
    if !cfg.enabled {
        return StsReport::new(domain, StsStatus::Disabled);
    }
    let mut report = StsReport::new(domain, StsStatus::Absent);
    match dns.txt(&format!("_mta-sts.{domain}")).await {
        Ok(records) => {
            report.txt = records
                .into_iter()
                .filter(|r| r.starts_with("v=STSv1"))
                .collect();
        }
        Err(e) => {
            report.status = StsStatus::DnsError;
            report.error = Some(StsError {
                result_type: mta_sts::FETCH_ERROR,
                meaning: "the _mta-sts TXT record could not be read".into(),
                detail: e.to_string(),
                fix: format!("check the nameservers of {domain}"),
            });
            return report;
        }
    }
    if report.txt.is_empty() {
        return report;
    }
    let dir = match TempDir::new() {
        Ok(d) => d,
        Err(e) => {
            report.status = StsStatus::Failed;
            report.error = Some(StsError {
                result_type: mta_sts::FETCH_ERROR,
                meaning: "this machine cannot hold a policy cache".into(),
                detail: format!("cannot create a temporary directory: {e}"),
                fix: "check TMPDIR".into(),
            });
            return report;
        }
    };
    let sts = match MtaSts::new(cfg, dns.clone(), dir.0.join("mta-sts-cache.json")) {
        Ok(s) => s,
        Err(e) => {
            report.status = StsStatus::Failed;
            report.error = Some(StsError {
                result_type: mta_sts::WEBPKI_INVALID,
                meaning: "this relay cannot load its trust anchors".into(),
                detail: e,
                fix: "check [delivery.mta_sts] ca_file".into(),
            });
            return report;
        }
    };
    match sts.lookup(domain).await {
        Lookup::Policy(p) => {
            report.status = match p.mode {
                Mode::Enforce => StsStatus::Enforce,
                Mode::Testing => StsStatus::Testing,
                Mode::None => StsStatus::None,
            };
            report.id = Some(p.id.clone());
            report.mode = Some(p.mode.as_str());
            report.mx = p.mx.clone();
            report.max_age = Some(p.max_age);
            report.policy = Some(p);
        }
        // Delivery answers "no policy" both for a TXT record it ignores
        // and for a policy of mode none.
        Lookup::NoPolicy if matches!(report.txt.as_slice(), [one] if valid_sts_txt(one)) => {
            report.status = StsStatus::None;
            report.mode = Some(Mode::None.as_str());
        }
        Lookup::NoPolicy => report.status = StsStatus::InvalidRecord,
        Lookup::Failed {
            result_type,
            detail,
        } => {
            report.status = StsStatus::Failed;
            report.error = Some(sts_error(domain, result_type, detail));
        }
    }
    report
}

// ---------------------------------------------------------------------------
// One STARTTLS session

/// Accepts any certificate and keeps the chain it was shown; handshake
/// signatures are checked as always.
#[derive(Debug)]
struct ChainRecorder {
    signatures: AcceptAnyCert,
    chain: Mutex<Vec<CertificateDer<'static>>>,
}

impl ServerCertVerifier for ChainRecorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.clone().into_owned()];
        chain.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        *self.chain.lock().unwrap_or_else(|e| e.into_inner()) = chain;
        Ok(ServerCertVerified::assertion())
    }

    crate::net::signatures_checked_by!(signatures);
}

/// What one session to an MX address showed.
#[derive(Clone, Debug, Default)]
pub struct Probe {
    /// The session failed before or after TLS (connect, greeting, EHLO).
    pub error: Option<String>,
    /// Whether EHLO offered STARTTLS; `None` when not reached.
    pub starttls: Option<bool>,
    /// The server's refusal of the STARTTLS command.
    pub starttls_refused: Option<String>,
    /// The handshake failed.
    pub handshake_error: Option<String>,
    pub tls_version: Option<&'static str>,
    pub cipher: Option<String>,
    /// The certificates the server sent, its own first.
    pub chain: Vec<CertificateDer<'static>>,
}

impl Probe {
    /// TLS is up: handshake done and EHLO answered over it.
    pub fn tls_ok(&self) -> bool {
        self.tls_version.is_some() && self.handshake_error.is_none() && self.error.is_none()
    }
}

/// Connects to `addr` (the MX host `host`), says EHLO `helo`, and tries
/// STARTTLS when offered; then QUIT. Each step within `timeouts`.
pub async fn probe(
    host: &str,
    addr: SocketAddr,
    source: Option<IpAddr>,
    helo: &str,
    timeouts: Timeouts,
) -> Probe {
    let mut p = Probe::default();
    let mut client = match SmtpClient::connect(addr, source, timeouts).await {
        Ok(c) => c,
        Err(e) => {
            p.error = Some(format!("{host} [{}]: {e}", addr.ip()));
            return p;
        }
    };
    if let Err(e) = client.ehlo(helo).await {
        p.error = Some(format!("{host} [{}]: {e}", addr.ip()));
        return p;
    }
    let offered = client.capabilities().starttls;
    p.starttls = Some(offered);
    if !offered {
        client.quit().await;
        return p;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let recorder = Arc::new(ChainRecorder {
        signatures: AcceptAnyCert(provider.clone()),
        chain: Mutex::new(Vec::new()),
    });
    let tls = Tls::with_verifier(provider, recorder.clone());
    let result = client.starttls(&tls, host, helo).await;
    p.tls_version = client.tls_version();
    p.cipher = client.tls_cipher();
    match result {
        Ok(()) => client.quit().await,
        Err(ClientError::Rejected { reply, .. }) => {
            p.starttls_refused = Some(reply.to_string());
            client.quit().await;
        }
        Err(ClientError::Tls(f)) => p.handshake_error = Some(f.text),
        Err(e) if p.tls_version.is_none() => p.handshake_error = Some(e.to_string()),
        Err(e) => p.error = Some(format!("{host} [{}] over TLS: {e}", addr.ip())),
    }
    p.chain = std::mem::take(&mut *recorder.chain.lock().unwrap_or_else(|e| e.into_inner()));
    p
}

// ---------------------------------------------------------------------------
// The certificate

/// What a WebPKI check refused, in the terms a fix needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CertFault {
    /// Valid, but not for the MX host name.
    WrongName,
    Expired,
    NotYetValid,
    /// Self-signed, or from an issuer this relay does not trust.
    Untrusted,
    /// This relay has no trusted roots at all.
    NoTrustStore,
    Other,
}

/// The certificate an MX presented, judged.
#[derive(Clone, Debug, Serialize)]
pub struct CertReport {
    #[serde(flatten)]
    pub summary: CertSummary,
    /// RFC 3339.
    pub not_before: Option<String>,
    /// RFC 3339.
    pub not_after: Option<String>,
    pub expired: bool,
    /// Valid for the MX host name under WebPKI with the relay's trust
    /// roots (system store and `[delivery.mta_sts] ca_file`).
    pub webpki_valid: bool,
    pub webpki_fault: Option<CertFault>,
    /// Why not, in words.
    pub webpki_error: Option<String>,
    /// Whether a usable TLSA record of the host names it; `None` when the
    /// host has no TLSA records proven by DNSSEC.
    pub tlsa_match: Option<bool>,
    /// The record that matched (`3 1 1 ab12cd34…`).
    pub tlsa_record: Option<String>,
    pub tlsa_error: Option<String>,
    /// `3 1 1 <hex>`: the DANE-EE record that would name this certificate's key.
    pub tlsa_for_key: Option<String>,
}

/// The WebPKI verifier delivery uses for verified TLS (MTA-STS, `verify`):
/// the system's trust store and `[delivery.mta_sts] ca_file`. `None` when
/// it holds no root.
pub fn webpki_verifier(config: &Config) -> Option<Arc<WebPkiServerVerifier>> {
    let roots = mta_sts::trust_roots(config.delivery.mta_sts.ca_file.as_deref()).ok()?;
    if roots.is_empty() {
        return None;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .ok()
}

fn server_name(host: &str) -> Option<ServerName<'static>> {
    ServerName::try_from(host.trim_end_matches('.').to_string()).ok()
}

/// Judges the chain an MX host presented: WebPKI for `host` with
/// `verifier`, and the TLSA records `tlsa` when there are some.
pub fn judge_certificate(
    chain: &[CertificateDer<'static>],
    host: &str,
    verifier: Option<&Arc<WebPkiServerVerifier>>,
    tlsa: Option<&TlsaSet>,
) -> Option<CertReport> {
    let (end_entity, intermediates) = chain.split_first()?;
    let summary = CertSummary::parse(end_entity);
    let now = UnixTime::now();
    let now_secs = now.as_secs() as i64;
    let expired = summary.not_after.is_some_and(|t| t < now_secs);
    let name = server_name(host);
    let webpki = match (verifier, &name) {
        (None, _) => Err((
            CertFault::NoTrustStore,
            "this relay has no trusted root certificates to verify it with".to_string(),
        )),
        (Some(_), None) => Err((CertFault::Other, format!("{host} is not a host name"))),
        (Some(v), Some(name)) => v
            .verify_server_cert(end_entity, intermediates, name, &[], now)
            .map(|_| ())
            .map_err(|e| webpki_words(&e, host, &summary)),
    };
    let spki = webpki::EndEntityCert::try_from(end_entity)
        .ok()
        .map(|c| c.subject_public_key_info().as_ref().to_vec());
    let tlsa_for_key = spki.map(|spki| {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &spki);
        let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        format!("3 1 1 {hex}")
    });
    let (tlsa_match, tlsa_record, tlsa_error) = match (tlsa, &name) {
        (Some(set), Some(name)) if set.any_usable() => {
            match dane_match(set, end_entity, intermediates, name, now) {
                Ok(record) => (Some(true), Some(record), None),
                Err(e) => (Some(false), None, Some(e)),
            }
        }
        (Some(set), _) if !set.records.is_empty() => (
            Some(false),
            None,
            Some(format!(
                "no usable TLSA record at {} ({}): only DANE-TA (2) and DANE-EE (3) count for SMTP",
                set.name,
                dane::summary(set)
            )),
        ),
        _ => (None, None, None),
    };
    Some(CertReport {
        not_before: summary.not_before.map(rfc3339),
        not_after: summary.not_after.map(rfc3339),
        summary,
        expired,
        webpki_valid: webpki.is_ok(),
        webpki_fault: webpki.as_ref().err().map(|(f, _)| *f),
        webpki_error: webpki.err().map(|(_, e)| e),
        tlsa_match,
        tlsa_record,
        tlsa_error,
        tlsa_for_key,
    })
}

/// Which usable record of `set` names the certificate, checked one record
/// at a time with delivery's [`DaneVerifier`]; the whole set's error when
/// none does.
fn dane_match(
    set: &TlsaSet,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    name: &ServerName<'_>,
    now: UnixTime,
) -> Result<String, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    for record in set.usable() {
        let one = Arc::new(TlsaSet {
            name: set.name.clone(),
            records: vec![record.clone()],
        });
        let verifier = DaneVerifier::new(one.clone(), provider.clone());
        if verifier
            .verify_server_cert(end_entity, intermediates, name, &[], now)
            .is_ok()
        {
            return Ok(dane::summary(&one));
        }
    }
    let verifier = DaneVerifier::new(Arc::new(set.clone()), provider);
    match verifier.verify_server_cert(end_entity, intermediates, name, &[], now) {
        Ok(_) => Ok(dane::summary(set)),
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(o)))
            if o.0.downcast_ref::<dane::NoMatch>().is_some() =>
        {
            Err(format!(
                "no TLSA record at {} matches the certificate ({})",
                set.name,
                dane::summary(set)
            ))
        }
        Err(e) => Err(format!(
            "a DANE-TA record at {} names an issuer in the chain, but the chain check failed: {}",
            set.name,
            rustls_words(&e)
        )),
    }
}

/// rustls's text for an error, with a verifier's own message unwrapped.
fn rustls_words(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::Other(o)) => o.0.to_string(),
        other => other.to_string(),
    }
}

fn webpki_words(e: &rustls::Error, host: &str, cert: &CertSummary) -> (CertFault, String) {
    use CertificateError as C;
    let rustls::Error::InvalidCertificate(c) = e else {
        return (CertFault::Other, rustls_words(e));
    };
    match c {
        C::NotValidForName | C::NotValidForNameContext { .. } => (
            CertFault::WrongName,
            format!("the certificate is for {}, not {host}", cert.names_text()),
        ),
        C::Expired | C::ExpiredContext { .. } => (
            CertFault::Expired,
            match cert.not_after {
                Some(t) => format!("the certificate expired on {}", rfc3339(t)),
                None => "the certificate has expired".into(),
            },
        ),
        C::NotValidYet | C::NotValidYetContext { .. } => (
            CertFault::NotYetValid,
            match cert.not_before {
                Some(t) => format!("the certificate is not valid before {}", rfc3339(t)),
                None => "the certificate is not valid yet".into(),
            },
        ),
        C::UnknownIssuer if cert.self_signed => (
            CertFault::Untrusted,
            "the certificate is self-signed: no trusted CA vouches for it".into(),
        ),
        C::UnknownIssuer | C::BadSignature => (
            CertFault::Untrusted,
            format!(
                "the certificate's issuer ({}) is not a CA this relay trusts, or the server does not send the intermediate certificates",
                cert.issuer.as_deref().unwrap_or("unnamed")
            ),
        ),
        _ => (CertFault::Other, rustls_words(e)),
    }
}

/// The fix for a certificate WebPKI refused on MX host `host`.
pub fn webpki_fix(fault: CertFault, host: &str) -> String {
    match fault {
        CertFault::WrongName => {
            format!("install a certificate valid for {host} on {host} (its name in subjectAltName)")
        }
        CertFault::Expired => format!(
            "renew the certificate of {host} (and automate renewal, e.g. with an ACME client)"
        ),
        CertFault::NotYetValid => format!(
            "check the clock of this machine; otherwise install a certificate valid now on {host}"
        ),
        CertFault::Untrusted => format!(
            "install a certificate for {host} from a public CA with its full chain of intermediates; for a private CA add it to [delivery.mta_sts] ca_file"
        ),
        CertFault::NoTrustStore => {
            "give this machine a trust store (/etc/ssl/certs) or set [delivery.mta_sts] ca_file"
                .into()
        }
        CertFault::Other => format!("install a valid certificate for {host} on {host}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sts_txt_records_are_told_valid_or_not() {
        assert!(valid_sts_txt("v=STSv1; id=20261208T1;"));
        assert!(valid_sts_txt("v=STSv1;id=abc"));
        assert!(!valid_sts_txt("v=STSv1"));
        assert!(!valid_sts_txt("v=STSv1; id=a-b;"));
        assert!(!valid_sts_txt("v=STSv1; id=1; id=2"));
        assert!(!valid_sts_txt("id=1; v=STSv1"));
    }
}
