//! A test certificate authority (rcgen) and TLS acceptors with server
//! certificates from it, for scripted TLS servers a client verifies.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// A test CA and the PEM file of its certificate.
pub struct Pki {
    _dir: tempfile::TempDir,
    /// The CA certificate, PEM: what a client trusts.
    pub ca_file: std::path::PathBuf,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    pub fn new() -> Pki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "herald test CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&ca_key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        Pki {
            _dir: dir,
            ca_file,
            ca,
            ca_key,
        }
    }

    /// An acceptor with a certificate from this CA for `names`, valid now.
    pub fn acceptor(&self, names: &[&str]) -> TlsAcceptor {
        self.issue(names, false)
    }

    /// The same with a certificate that expired in 2020.
    pub fn expired_acceptor(&self, names: &[&str]) -> TlsAcceptor {
        self.issue(names, true)
    }

    fn issue(&self, names: &[&str], expired: bool) -> TlsAcceptor {
        self.issue_chain(names, expired, false).acceptor
    }

    /// A server certificate from this CA for `names`, with what DANE records
    /// name: the certificate, its public key and the CA's certificate. With
    /// `send_ca`, the server sends the CA certificate after its own (as a
    /// DANE-TA server must, RFC 7671 §5.2.2).
    pub fn issue_chain(&self, names: &[&str], expired: bool, send_ca: bool) -> Issued {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, names[0]);
        if expired {
            params.not_before = rcgen::date_time_ymd(2019, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        }
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        let mut chain = vec![cert.der().clone()];
        if send_ca {
            chain.push(self.ca.der().clone());
        }
        Issued {
            acceptor: acceptor_with_chain(chain, &key),
            cert: cert.der().to_vec(),
            spki: key.public_key_der(),
            ca_cert: self.ca.der().to_vec(),
        }
    }
}

/// A server certificate and the bytes TLSA records are made of.
pub struct Issued {
    pub acceptor: TlsAcceptor,
    /// The server certificate, DER.
    pub cert: Vec<u8>,
    /// Its SubjectPublicKeyInfo, DER.
    pub spki: Vec<u8>,
    /// The issuing CA's certificate, DER.
    pub ca_cert: Vec<u8>,
}

/// SHA-256, as TLSA matching type 1 takes it.
pub fn sha256(data: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

/// An acceptor with a self-signed certificate for 127.0.0.1.
pub fn self_signed_acceptor() -> TlsAcceptor {
    self_signed_for(&["127.0.0.1"])
}

/// An acceptor with a self-signed certificate for `names`.
pub fn self_signed_for(names: &[&str]) -> TlsAcceptor {
    let names = names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    let ck = rcgen::generate_simple_self_signed(names).unwrap();
    acceptor(ck.cert.der().clone(), &ck.key_pair)
}

fn acceptor(cert: CertificateDer<'static>, key: &rcgen::KeyPair) -> TlsAcceptor {
    acceptor_with_chain(vec![cert], key)
}

fn acceptor_with_chain(chain: Vec<CertificateDer<'static>>, key: &rcgen::KeyPair) -> TlsAcceptor {
    let key = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    TlsAcceptor::from(Arc::new(config))
}
