//! Certificate checking for diagnosis: verify the server's certificate
//! against the system's trust store, but *record* a failure instead of
//! aborting the handshake, so `herald smtp-test` can name the problem
//! precisely (expired, wrong host name, self-signed, unknown issuer) and
//! still look at what the server offers after TLS.
//!
//! Whoever uses a connection through a [`RecordingVerifier`] must read
//! [`RecordingVerifier::outcome`] before trusting it: smtp-test sends no
//! password over a connection whose certificate did not verify.
//!
//! The trust store is the operating system's (rustls-native-certs: on Linux
//! /etc/ssl/certs, or the files named by `SSL_CERT_FILE` / `SSL_CERT_DIR`).
//! Handshake signatures are always checked against the certificate shown.

use std::sync::{Arc, Mutex};

use rustls::CertificateError;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

use crate::deliver::client::Tls;
use crate::net::AcceptAnyCert;

/// What became of the certificate check.
#[derive(Clone, Debug)]
pub enum CertOutcome {
    /// The chain leads to a trusted root and names the host.
    Verified,
    /// The check failed; the handshake went on regardless.
    Failed {
        error: CertificateError,
        /// The server's certificate is its own issuer.
        self_signed: bool,
    },
    /// Some other verification error (not a certificate problem).
    Error(String),
    /// This machine has no trusted CA certificates to check against.
    NoTrustStore,
}

/// A rustls verifier that checks like a browser and records what it found.
/// For diagnosis it then lets the handshake go on whatever the verdict; in
/// strict mode (delivery through a smarthost) it refuses as usual.
#[derive(Debug)]
pub struct RecordingVerifier {
    /// Checks the handshake signatures whatever the certificate's verdict.
    signatures: AcceptAnyCert,
    inner: Option<Arc<WebPkiServerVerifier>>,
    strict: bool,
    outcome: Mutex<Option<CertOutcome>>,
}

/// A verifier over the system's trust store; `None` when it holds no
/// certificate. Problems reading single files are ignored as long as some
/// certificates load.
pub fn system_roots(
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Option<Arc<WebPkiServerVerifier>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if roots.is_empty() {
        return None;
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .ok()
}

impl RecordingVerifier {
    /// For diagnosis, over the system's trust store: records, never refuses.
    pub fn from_system() -> Arc<RecordingVerifier> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        Arc::new(RecordingVerifier {
            inner: system_roots(&provider),
            signatures: AcceptAnyCert(provider),
            strict: false,
            outcome: Mutex::new(None),
        })
    }

    /// Checks with `inner` (none: no trust store) and never refuses: for
    /// policies that only report (MTA-STS testing mode).
    pub fn lenient(inner: Option<Arc<WebPkiServerVerifier>>) -> Arc<RecordingVerifier> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        Arc::new(RecordingVerifier {
            inner,
            signatures: AcceptAnyCert(provider),
            strict: false,
            outcome: Mutex::new(None),
        })
    }

    /// Verifies with `inner` and refuses what it refuses, keeping the
    /// reason for the caller to explain.
    pub fn strict(
        provider: Arc<rustls::crypto::CryptoProvider>,
        inner: Arc<WebPkiServerVerifier>,
    ) -> Arc<RecordingVerifier> {
        Arc::new(RecordingVerifier {
            signatures: AcceptAnyCert(provider),
            inner: Some(inner),
            strict: true,
            outcome: Mutex::new(None),
        })
    }

    /// A [`Tls`] for herald's SMTP client that verifies through `self`.
    pub fn tls(self: &Arc<Self>) -> Tls {
        Tls::with_verifier(self.signatures.0.clone(), self.clone())
    }

    /// The result of the last certificate check; `None` when no handshake
    /// got that far.
    pub fn outcome(&self) -> Option<CertOutcome> {
        self.outcome
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn record(&self, outcome: CertOutcome) {
        *self.outcome.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
    }
}

impl ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(v) = &self.inner else {
            self.record(CertOutcome::NoTrustStore);
            return Ok(ServerCertVerified::assertion());
        };
        let result =
            v.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now);
        self.record(match &result {
            Ok(_) => CertOutcome::Verified,
            Err(rustls::Error::InvalidCertificate(error)) => CertOutcome::Failed {
                error: error.clone(),
                self_signed: is_self_signed(end_entity),
            },
            Err(e) => CertOutcome::Error(e.to_string()),
        });
        if self.strict {
            return result;
        }
        // Go on: the caller reads the outcome and decides (no password is
        // sent unless it is `Verified`).
        Ok(ServerCertVerified::assertion())
    }

    crate::net::signatures_checked_by!(signatures);
}

/// Whether a certificate's issuer and subject are the same name (RFC 5280
/// §4.1: Certificate → tbsCertificate → [version], serialNumber, signature,
/// issuer, validity, subject). Only the DER structure is walked; anything
/// unexpected answers false.
pub fn is_self_signed(cert: &[u8]) -> bool {
    fn inner(cert: &[u8]) -> Option<bool> {
        let (tag, certificate, _) = der_next(cert)?;
        if tag != 0x30 {
            return None;
        }
        let (tag, tbs, _) = der_next(certificate)?;
        if tag != 0x30 {
            return None;
        }
        let (mut tag, _, mut rest) = der_next(tbs)?;
        if tag == 0xa0 {
            // [0] EXPLICIT version; the serial number follows.
            (tag, _, rest) = der_next(rest)?;
        }
        if tag != 0x02 {
            return None;
        }
        let (_, _, rest) = der_next(rest)?; // signature algorithm
        let (tag, issuer, rest) = der_next(rest)?;
        let (_, _, rest) = der_next(rest)?; // validity
        let (tag2, subject, _) = der_next(rest)?;
        (tag == 0x30 && tag2 == 0x30).then_some(issuer == subject)
    }
    inner(cert).unwrap_or(false)
}

/// One DER element: (tag, contents, what follows). Single-byte tags only,
/// which is all an X.509 certificate's top levels use.
pub(crate) fn der_next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_is_told_from_ca_issued() {
        let own = rcgen::generate_simple_self_signed(vec!["a.test".into()]).unwrap();
        assert!(is_self_signed(own.cert.der()));

        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Test CA");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["b.test".into()])
            .unwrap()
            .signed_by(&leaf_key, &ca, &ca_key)
            .unwrap();
        assert!(!is_self_signed(leaf.der()));
        assert!(is_self_signed(ca.der()));

        assert!(!is_self_signed(b""));
        assert!(!is_self_signed(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]));
        assert!(!is_self_signed(&own.cert.der()[..40]));
    }
}
