//! DANE for SMTP (RFC 7672): when an MX host's TLSA records are proven by
//! DNSSEC, TLS to it is mandatory and its certificate must match one of
//! them; a name or a date in the certificate counts only under DANE-TA.
//!
//! - DANE-EE (usage 3): the server's own certificate, or its public key,
//!   is the record's. Name and expiry are not checked (RFC 7672 §3.1.1):
//!   the DNS, signed, vouches for the key.
//! - DANE-TA (usage 2): a certificate the server sent in its chain is the
//!   record's; it is then the trust anchor of an ordinary chain check,
//!   names and dates included, for the MX host name (RFC 7672 §3.1.2).
//! - PKIX-TA and PKIX-EE (0, 1) are unusable for SMTP (RFC 7672 §3.1.3),
//!   as are selectors and matching types this relay does not know. A host
//!   whose TLSA records are all unusable still gets TLS, unauthenticated
//!   (RFC 7672 §2.2).

use std::fmt;
use std::sync::Arc;

use rustls::CertificateError;
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

use crate::dns::Tlsa;
use crate::net::AcceptAnyCert;

/// An MX host's TLSA RRset, proven by DNSSEC.
#[derive(Clone, Debug)]
pub struct TlsaSet {
    /// Where it was published: `_25._tcp.mx1.example.net`.
    pub name: String,
    pub records: Vec<Tlsa>,
}

impl TlsaSet {
    /// Records a client can use for SMTP: DANE-TA or DANE-EE, with a
    /// selector and matching type this relay knows.
    pub fn usable(&self) -> impl Iterator<Item = &Tlsa> {
        self.records
            .iter()
            .filter(|t| matches!(t.usage, 2 | 3) && t.selector <= 1 && t.matching <= 2)
    }

    pub fn any_usable(&self) -> bool {
        self.usable().next().is_some()
    }

    /// The records as published (`3 1 1 ab12…`), for replies and reports.
    pub fn policy_strings(&self) -> Vec<String> {
        self.records.iter().map(record_string).collect()
    }
}

/// `3 1 1 ab12cd…`: a record in presentation form, the data shortened so a
/// reply stays one readable line.
fn record_string(t: &Tlsa) -> String {
    let hex: String = t.data.iter().map(|b| format!("{b:02x}")).collect();
    format!("{} {} {} {hex}", t.usage, t.selector, t.matching)
}

/// A short form of the records for a reply: `3 1 1 ab12cd34…`.
pub fn summary(set: &TlsaSet) -> String {
    set.records
        .iter()
        .map(|t| {
            let s = record_string(t);
            if s.len() > 24 {
                format!("{}…", &s[..24])
            } else {
                s
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether `cert` (DER) is what `record` names.
fn matches(record: &Tlsa, cert: &CertificateDer<'_>) -> bool {
    let selected: Vec<u8> = match record.selector {
        0 => cert.as_ref().to_vec(),
        1 => match webpki::EndEntityCert::try_from(cert) {
            Ok(parsed) => parsed.subject_public_key_info().as_ref().to_vec(),
            Err(_) => return false,
        },
        _ => return false,
    };
    let digest = |alg: &'static aws_lc_rs::digest::Algorithm| {
        aws_lc_rs::digest::digest(alg, &selected).as_ref().to_vec()
    };
    let computed = match record.matching {
        0 => selected.clone(),
        1 => digest(&aws_lc_rs::digest::SHA256),
        2 => digest(&aws_lc_rs::digest::SHA512),
        _ => return false,
    };
    // Public data on both sides: no need for a constant-time compare.
    computed == record.data
}

/// Checks a server's certificate against an MX host's TLSA records.
pub struct DaneVerifier {
    set: Arc<TlsaSet>,
    provider: Arc<CryptoProvider>,
    /// Handshake signatures are checked as always: a certificate matched
    /// by the DNS is worth nothing if the server does not hold its key.
    signatures: AcceptAnyCert,
}

impl fmt::Debug for DaneVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DaneVerifier")
            .field("tlsa", &self.set.name)
            .finish()
    }
}

impl DaneVerifier {
    pub fn new(set: Arc<TlsaSet>, provider: Arc<CryptoProvider>) -> DaneVerifier {
        DaneVerifier {
            set,
            signatures: AcceptAnyCert(provider.clone()),
            provider,
        }
    }

    /// DANE-TA: `anchor` (a certificate of the chain that a record names)
    /// is the root of an ordinary WebPKI check of the chain, for the name.
    fn chain_to(
        &self,
        anchor: &CertificateDer<'_>,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(anchor.clone().into_owned())
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, intermediates, server_name, &[], now)
    }
}

/// Why no TLSA record matched: a rustls error whose text the deferral
/// quotes.
fn no_match(set: &TlsaSet) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        NoMatch(summary(set)),
    ))))
}

/// DANE's refusal: no TLSA record names the certificate.
#[derive(Debug)]
pub struct NoMatch(String);

impl fmt::Display for NoMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no TLSA record matches the certificate ({})", self.0)
    }
}

impl std::error::Error for NoMatch {}

impl ServerCertVerifier for DaneVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self
            .set
            .usable()
            .any(|t| t.usage == 3 && matches(t, end_entity))
        {
            return Ok(ServerCertVerified::assertion());
        }
        let mut last = None;
        for record in self.set.usable().filter(|t| t.usage == 2) {
            for anchor in intermediates.iter().filter(|c| matches(record, c)) {
                match self.chain_to(anchor, end_entity, intermediates, server_name, now) {
                    Ok(v) => return Ok(v),
                    Err(e) => last = Some(e),
                }
            }
        }
        // A trust anchor that matched but whose chain failed says more
        // (expired, wrong name) than "no match".
        Err(last.unwrap_or_else(|| no_match(&self.set)))
    }

    crate::net::signatures_checked_by!(signatures);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert() -> (CertificateDer<'static>, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["mx.test".into()]).unwrap();
        let spki = key.public_key_der();
        let c = params.self_signed(&key).unwrap();
        (c.der().clone(), spki)
    }

    fn rec(usage: u8, selector: u8, matching: u8, data: Vec<u8>) -> Tlsa {
        Tlsa {
            usage,
            selector,
            matching,
            data,
        }
    }

    #[test]
    fn dane_ee_matches_the_key_or_the_certificate_by_each_digest() {
        let (der, spki) = cert();
        let sha256 = |b: &[u8]| {
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b)
                .as_ref()
                .to_vec()
        };
        let sha512 = |b: &[u8]| {
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA512, b)
                .as_ref()
                .to_vec()
        };
        assert!(matches(&rec(3, 1, 1, sha256(&spki)), &der));
        assert!(matches(&rec(3, 1, 2, sha512(&spki)), &der));
        assert!(matches(&rec(3, 1, 0, spki.clone()), &der));
        assert!(matches(&rec(3, 0, 1, sha256(der.as_ref())), &der));
        assert!(matches(&rec(3, 0, 0, der.as_ref().to_vec()), &der));
        assert!(!matches(&rec(3, 1, 1, sha256(der.as_ref())), &der));
        assert!(!matches(&rec(3, 1, 3, sha256(&spki)), &der));
        let (other, _) = cert();
        assert!(!matches(&rec(3, 1, 1, sha256(&spki)), &other));
    }

    #[test]
    fn pkix_usages_and_unknown_types_are_unusable() {
        let set = TlsaSet {
            name: "_25._tcp.mx.test".into(),
            records: vec![
                rec(0, 1, 1, vec![1; 32]),
                rec(1, 1, 1, vec![1; 32]),
                rec(3, 2, 1, vec![1; 32]),
                rec(3, 1, 9, vec![1; 32]),
            ],
        };
        assert!(!set.any_usable());
        let set = TlsaSet {
            records: vec![rec(2, 0, 1, vec![1; 32])],
            ..set
        };
        assert!(set.any_usable());
        assert_eq!(set.policy_strings()[0].len(), "2 0 1 ".len() + 64);
    }
}
