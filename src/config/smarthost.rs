//! `[[smarthost]]`: providers some mail is relayed through with the
//! customer's own account (`deliver::smarthost` does the relaying), and
//! their checks at load.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{ConfigErrors, Secret, TenantConfig};

/// `[[smarthost]]`: one provider and the account herald logs in with.
#[derive(Clone, Debug, Deserialize)]
pub struct SmarthostConfig {
    /// What `[[tenant]] smarthost` refers to; also in logs.
    pub name: String,
    /// Host name (or IP address) of the provider's submission server; the
    /// certificate must be valid for it.
    pub host: String,
    /// 587 (STARTTLS) by default; 465 for implicit TLS.
    #[serde(default = "default_port")]
    pub port: u16,
    /// `"starttls"` or `"implicit"`; required. `"none"` is refused at load.
    pub tls: SmarthostTls,
    pub username: String,
    /// Kept in clear in the config file: the provider needs the password
    /// itself, not a hash of it.
    pub password: Secret,
    /// Check the server's certificate and name (default true).
    #[serde(default = "yes")]
    pub verify_certificate: bool,
    /// PEM file of the CA certificates to trust instead of the system's
    /// (a private CA).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Mail whose envelope sender is in one of these domains (or below
    /// one) goes through this smarthost, whichever tenant sent it.
    #[serde(default)]
    pub sender_domains: Vec<String>,
}

fn default_port() -> u16 {
    587
}

fn yes() -> bool {
    true
}

/// How the session with a smarthost is secured.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SmarthostTls {
    /// Plain, then STARTTLS before anything else (port 587).
    Starttls,
    /// TLS from the first byte (port 465).
    Implicit,
    /// Parsed only to refuse it with a reason.
    None,
}

/// Checks the `[[smarthost]]` tables and the tenants' `smarthost` keys.
/// Items that did not parse are `None` (their errors are already listed),
/// so that key paths keep their indexes.
pub fn validate(
    smarthosts: &[Option<SmarthostConfig>],
    tenants: &[Option<TenantConfig>],
    errs: &mut ConfigErrors,
) {
    let mut names = HashSet::new();
    let mut domains: HashMap<String, String> = HashMap::new();
    for (i, s) in smarthosts.iter().enumerate() {
        let Some(s) = s else { continue };
        let p = format!("smarthost[{i}]");
        if s.name.is_empty()
            || !s
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            errs.push(
                format!("{p}.name"),
                "must be letters, digits, '-', '_' or '.', e.g. \"acme-m365\"",
            );
        } else if !names.insert(s.name.as_str()) {
            errs.push(format!("{p}.name"), format!("{:?} is used twice", s.name));
        }
        let host_ok = !s.host.is_empty()
            && (s.host.parse::<IpAddr>().is_ok()
                || s.host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.')));
        if !host_ok {
            errs.push(
                format!("{p}.host"),
                "must be a host name or IP address without port, e.g. \"smtp.office365.com\" (the port goes in port)",
            );
        }
        if s.port == 0 {
            errs.push(format!("{p}.port"), "must be a port number from 1 to 65535");
        }
        if s.tls == SmarthostTls::None {
            errs.push(
                format!("{p}.tls"),
                "\"none\" is not allowed: the password and the mail would cross the network in clear; use \"starttls\" (port 587) or \"implicit\" (port 465)",
            );
        }
        if s.username.is_empty() {
            errs.push(
                format!("{p}.username"),
                "must not be empty (usually the account's full address)",
            );
        }
        // The value is a secret: say what is wrong, never echo it.
        if s.password.expose().is_empty() {
            errs.push(format!("{p}.password"), "must not be empty");
        }
        match (&s.ca_file, s.verify_certificate) {
            (Some(_), false) => errs.push(
                format!("{p}.ca_file"),
                "has no effect with verify_certificate = false: remove one of them",
            ),
            (Some(path), true) => {
                if let Err(e) = load_roots(path) {
                    errs.push(format!("{p}.ca_file"), e);
                }
            }
            (None, _) => {}
        }
        for (j, d) in s.sender_domains.iter().enumerate() {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            let ok = d.contains('.')
                && d.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'));
            if !ok {
                errs.push(
                    format!("{p}.sender_domains[{j}]"),
                    "must be a domain name without '@', e.g. \"acme.example\"",
                );
            } else if let Some(other) = domains.insert(d.clone(), s.name.clone()) {
                errs.push(
                    format!("{p}.sender_domains[{j}]"),
                    format!("{d} is already routed through smarthost {other:?}"),
                );
            }
        }
    }
    for (i, t) in tenants.iter().enumerate() {
        let Some(name) = t.as_ref().and_then(|t| t.smarthost.as_ref()) else {
            continue;
        };
        if !smarthosts.iter().flatten().any(|s| &s.name == name) {
            let known: Vec<&str> = smarthosts
                .iter()
                .flatten()
                .map(|s| s.name.as_str())
                .collect();
            let known = if known.is_empty() {
                "there is none".to_string()
            } else {
                format!("known: {}", known.join(", "))
            };
            errs.push(
                format!("tenant[{i}].smarthost"),
                format!("no [[smarthost]] is named {name:?} ({known})"),
            );
        }
    }
}

/// The CA certificates in a PEM file.
pub(crate) fn load_roots(path: &Path) -> Result<rustls::RootCertStore, String> {
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut std::io::BufReader::new(file)) {
        let cert = cert.map_err(|e| format!("{}: bad PEM: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: bad CA certificate: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    Ok(roots)
}
