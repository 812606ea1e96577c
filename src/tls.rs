//! The server side of TLS: loads the certificate chain and private key named
//! in `[tls]` into a [`TlsAcceptor`] for STARTTLS (RFC 3207) and implicit-TLS
//! (RFC 8314) listeners. Also the trust anchors of herald's HTTPS clients
//! ([`client_roots`]), shared by the stages that fetch or post over HTTPS.
//!
//! When both files are missing and `tls.self_signed` is true, a self-signed
//! certificate for `server.hostname` and `localhost` is generated into those
//! paths first, so that a fresh install can serve TLS at once. The key file is
//! created with mode 0600. Key material never reaches a log line or an error:
//! errors name the file and the reason only.
//!
//! Trusted input: the files named in the config (written by the operator or by
//! this module). Only the aws-lc-rs provider is compiled into rustls, so the
//! process-wide default provider needs no installation.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::Config;

/// Why the certificate or key could not be made ready. Each variant names the
/// file; none carries key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error(
        "{} exists but {} does not: supply both, or remove the one left so that a new self-signed pair can be generated",
        present.display(),
        missing.display()
    )]
    HalfPair { present: PathBuf, missing: PathBuf },
    #[error(
        "{} does not exist (set tls.self_signed = true to generate a self-signed certificate)",
        path.display()
    )]
    Missing { path: PathBuf },
    #[error("cannot generate a self-signed certificate for {hostname:?}: {reason}")]
    Generate { hostname: String, reason: String },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate {} and key {} do not make a usable TLS configuration: {reason}", cert.display(), key.display())]
    Config {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

/// Builds the acceptor from `[tls]`, first generating a self-signed pair
/// for `server.hostname` when `tls.self_signed` allows it and both files are
/// missing.
///
/// Blocking (file I/O and key generation): call it at startup, before the
/// listeners run, or from `spawn_blocking`.
pub fn acceptor(config: &Config) -> Result<TlsAcceptor, TlsError> {
    let cfg = &config.tls;
    match (cfg.cert.exists(), cfg.key.exists()) {
        (true, true) => {}
        (false, false) if cfg.self_signed => {
            generate_self_signed(&cfg.cert, &cfg.key, &config.server.hostname)?
        }
        (false, false) => {
            return Err(TlsError::Missing {
                path: cfg.cert.clone(),
            });
        }
        // Never overwrite half of an operator's pair: the other half may be
        // the only copy of a real key or certificate.
        (true, false) => {
            return Err(TlsError::HalfPair {
                present: cfg.cert.clone(),
                missing: cfg.key.clone(),
            });
        }
        (false, true) => {
            return Err(TlsError::HalfPair {
                present: cfg.key.clone(),
                missing: cfg.cert.clone(),
            });
        }
    }
    load(&cfg.cert, &cfg.key)
}

/// Loads an existing PEM certificate chain and private key; generates
/// nothing (`herald check-config` uses it to test the files).
pub fn load(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let certs = read_certs(cert)?;
    let private_key = read_key(key)?;
    let mut config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, private_key)
        .map_err(|e| TlsError::Config {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            reason: e.to_string(),
        })?;
    // Stateless resumption tickets: an app that opens many short connections
    // skips the full handshake (and its signature) on most of them.
    if let Ok(ticketer) = rustls::crypto::aws_lc_rs::Ticketer::new() {
        config.ticketer = ticketer;
    }
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid {
            path: path.to_path_buf(),
            reason: format!("not a PEM certificate file: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Invalid {
            path: path.to_path_buf(),
            reason: "contains no \"BEGIN CERTIFICATE\" block".into(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    // The parser's error text describes the PEM structure, never the key bytes.
    match rustls_pemfile::private_key(&mut pem.as_slice()) {
        Ok(Some(key)) => Ok(key),
        Ok(None) => Err(TlsError::Invalid {
            path: path.to_path_buf(),
            reason: "contains no private key (expected a PKCS#8, PKCS#1 or SEC1 PEM block)".into(),
        }),
        Err(e) => Err(TlsError::Invalid {
            path: path.to_path_buf(),
            reason: format!("not a PEM private key file: {e}"),
        }),
    }
}

/// Generates a key pair and a self-signed certificate for `hostname` (and
/// `localhost`) and writes them as PEM to `cert` and `key`.
pub fn generate_self_signed(cert: &Path, key: &Path, hostname: &str) -> Result<(), TlsError> {
    let mut names = vec![hostname.to_string()];
    if !hostname.eq_ignore_ascii_case("localhost") {
        names.push("localhost".into());
    }
    let generate_err = |e: rcgen::Error| TlsError::Generate {
        hostname: hostname.to_string(),
        reason: e.to_string(),
    };
    let key_pair = rcgen::KeyPair::generate().map_err(generate_err)?;
    let mut params = rcgen::CertificateParams::new(names).map_err(generate_err)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, hostname);
    let certificate = params.self_signed(&key_pair).map_err(generate_err)?;

    // Key first: a crash between the two writes leaves a key without a
    // certificate, which the next start reports instead of overwriting.
    write_file(key, key_pair.serialize_pem().as_bytes(), 0o600)?;
    write_file(cert, certificate.pem().as_bytes(), 0o644)?;
    tracing::warn!(
        cert = %cert.display(),
        key = %key.display(),
        hostname,
        "no TLS certificate configured: generated a self-signed one; clients must be told to accept it, or configure a real certificate in [tls]"
    );
    Ok(())
}

/// Writes a new file (never replacing one) with `mode`, creating its
/// directory, and syncs it so a crash does not leave an empty key behind.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let err = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path).map_err(err)?;
    file.write_all(contents).map_err(err)?;
    file.sync_all().map_err(err)?;
    Ok(())
}

/// The IANA name of a cipher suite (`TLS_AES_256_GCM_SHA384`,
/// `TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256`), the name other MTAs and log
/// readers know. rustls's own names are IANA's for TLS 1.2 but
/// `TLS13_...` for the five TLS 1.3 suites (RFC 8446 §B.4), so those are
/// mapped here; a suite rustls has no name for is its code point.
pub fn cipher_name(suite: rustls::CipherSuite) -> String {
    use rustls::CipherSuite as S;
    let name = match suite {
        S::TLS13_AES_128_GCM_SHA256 => Some("TLS_AES_128_GCM_SHA256"),
        S::TLS13_AES_256_GCM_SHA384 => Some("TLS_AES_256_GCM_SHA384"),
        S::TLS13_CHACHA20_POLY1305_SHA256 => Some("TLS_CHACHA20_POLY1305_SHA256"),
        S::TLS13_AES_128_CCM_SHA256 => Some("TLS_AES_128_CCM_SHA256"),
        S::TLS13_AES_128_CCM_8_SHA256 => Some("TLS_AES_128_CCM_8_SHA256"),
        other => other.as_str(),
    };
    match name {
        Some(n) => n.to_string(),
        None => format!("0x{:04X}", u16::from(suite)),
    }
}

/// The roots an HTTPS client of herald trusts: the system's trust store
/// (read from disk: no list baked into the binary to go stale), plus the CA
/// certificates in `ca_file` for private deployments and tests. Errors only
/// for an unreadable or empty `ca_file`; an empty store is the caller's to
/// warn about.
pub fn client_roots(ca_file: Option<&Path>) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if let Some(path) = ca_file {
        let extra = crate::config::smarthost::load_roots(path)?;
        roots.roots.extend(extra.roots);
    }
    Ok(roots)
}

/// A TLS client that verifies servers against `roots` (aws-lc-rs, the
/// default protocol versions, no client certificate).
pub fn client_connector(roots: rustls::RootCertStore) -> tokio_rustls::TlsConnector {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("the default provider supports the default versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every suite herald's rustls can negotiate has its IANA name.
    #[test]
    fn cipher_suites_are_named_as_iana_does() {
        use rustls::CipherSuite as S;
        assert_eq!(
            cipher_name(S::TLS13_AES_256_GCM_SHA384),
            "TLS_AES_256_GCM_SHA384"
        );
        assert_eq!(
            cipher_name(S::TLS13_CHACHA20_POLY1305_SHA256),
            "TLS_CHACHA20_POLY1305_SHA256"
        );
        assert_eq!(
            cipher_name(S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256),
            "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"
        );
        assert_eq!(cipher_name(S::from(0x0a0a)), "0x0A0A");
        for s in rustls::crypto::aws_lc_rs::ALL_CIPHER_SUITES {
            let name = cipher_name(s.suite());
            assert!(
                name.starts_with("TLS_") && !name.starts_with("TLS13_"),
                "{:?} is named {name}",
                s.suite()
            );
        }
    }

    fn err(r: Result<TlsAcceptor, TlsError>) -> TlsError {
        match r {
            Ok(_) => panic!("expected an error"),
            Err(e) => e,
        }
    }

    fn cfg(dir: &Path, self_signed: bool) -> Config {
        let mut c = Config::from_toml_str(
            r#"
            [server]
            hostname = "relay.example.net"
            [[listener]]
            address = "127.0.0.1:0"
            "#,
        )
        .unwrap();
        c.tls.cert = dir.join("certs/relay.crt");
        c.tls.key = dir.join("certs/relay.key");
        c.tls.self_signed = self_signed;
        c
    }

    #[test]
    fn generates_a_self_signed_pair_when_missing_and_reuses_it() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), true);
        acceptor(&c).unwrap();
        let cert = std::fs::read_to_string(&c.tls.cert).unwrap();
        assert!(cert.contains("BEGIN CERTIFICATE"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&c.tls.key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // A second start loads the same files rather than generating new ones.
        acceptor(&c).unwrap();
        assert_eq!(std::fs::read_to_string(&c.tls.cert).unwrap(), cert);
    }

    #[test]
    fn missing_files_without_self_signed_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), false);
        let e = err(acceptor(&c));
        assert!(e.to_string().contains("relay.crt"), "{e}");
    }

    #[test]
    fn half_a_pair_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), true);
        std::fs::create_dir_all(c.tls.key.parent().unwrap()).unwrap();
        std::fs::write(&c.tls.key, "precious").unwrap();
        let e = err(acceptor(&c));
        assert!(matches!(e, TlsError::HalfPair { .. }), "{e}");
        assert_eq!(std::fs::read_to_string(&c.tls.key).unwrap(), "precious");
    }

    #[test]
    fn garbage_files_are_reported_without_their_contents() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), true);
        std::fs::create_dir_all(c.tls.key.parent().unwrap()).unwrap();
        std::fs::write(&c.tls.cert, "not a certificate").unwrap();
        std::fs::write(&c.tls.key, "secret-key-material").unwrap();
        let e = err(acceptor(&c));
        let shown = e.to_string();
        assert!(shown.contains("relay.crt"), "{shown}");

        generate_self_signed(
            &dir.path().join("ok.crt"),
            &dir.path().join("unused.key"),
            "x.example",
        )
        .unwrap();
        let shown = err(load(&dir.path().join("ok.crt"), &c.tls.key)).to_string();
        assert!(shown.contains("relay.key"), "{shown}");
        assert!(!shown.contains("secret-key-material"), "{shown}");
    }
}
