//! DKIM signing (RFC 6376; Ed25519-SHA256 from RFC 8463), the last step of
//! the policy stage: a message that passed every check is signed just
//! before it is queued, so the queue stores and delivers signed bytes.
//!
//! Which keys sign: every `[[dkim]]` key of the From: header field's domain
//! (several keys of one domain sign together: dual RSA + Ed25519 signing,
//! or an old and a new selector during rotation). With no key for that exact
//! domain, the keys of its nearest configured parent domain sign instead
//! (`d=acme.example` for `From: billing@mail.acme.example` still aligns
//! under DMARC's relaxed mode, RFC 7489 §3.1.1). With none of those, the
//! keys marked `fallback = true` sign (the relay's own domain: the message
//! then carries a valid but unaligned signature). A tenant's key never
//! signs for another tenant: when the submitting tenant's `allowed_senders`
//! do not cover the From: address, only the fallback keys are used.
//!
//! How: relaxed/relaxed canonicalisation (RFC 6376 §3.4.2, §3.4.4), the
//! header fields in [`SIGNED_HEADERS`], From: over-signed (listed once more
//! than it occurs, §8.15) so that a second From: added in transit breaks the
//! signature. mail-auth also lists every absent field of that list in `h=`
//! (it "over-signs" absent fields), so none of them can be added later.
//! The DKIM-Signature fields are prepended to the message, above herald's
//! own Received: field, as §5.6 suggests (insert at the top, before any
//! other DKIM-Signature): the signature is the last thing this hop adds.
//! The Received: field is not signed (trace fields are added and rewritten
//! in transit).
//!
//! Where: RSA-2048 costs about 0.8 ms per signature, which would stall every
//! session sharing the I/O thread, so signing runs on tokio's blocking pool
//! (both cores under load). Only a small message signed with Ed25519 keys
//! alone is signed in place: there the hand-over to another thread would
//! cost more than the signature.
//!
//! Trust: keys come from the config (files the postmaster controls); the
//! message is untrusted and only its header block is read to pick the keys.
//! Key material never reaches a log line or an error: errors name the
//! config key (`dkim[1].key`) and the file.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::KeyPair as _;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use mail_auth::common::crypto::{DkimKey, Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter as _;
use mail_auth::dkim::{Canonicalization, DkimSigner, Done};
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject as _;

use super::Verdict;
use super::headers::HeaderView;
use crate::config::{Config, ConfigError, ConfigErrors, DkimAlgorithm};
use crate::envelope::Envelope;
use crate::reply::Enhanced;

/// Header fields signed, in this order (RFC 6376 §5.4.1 recommends the
/// ones a reader sees and the MIME structure). `From` appears twice: the
/// second entry over-signs it.
pub const SIGNED_HEADERS: &[&str] = &[
    "From",
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "In-Reply-To",
    "References",
];

/// Smallest RSA key accepted (RFC 8301 §3.2: signers MUST use at least 1024
/// bits; receivers increasingly ignore anything under 2048).
pub const MIN_RSA_BITS: usize = 2048;

/// A message up to this size signed with Ed25519 keys only is signed on
/// the session's own task (hashing 32 KiB and one Ed25519 signature take
/// well under the ~0.1 ms a wake-up on the other core costs).
const INLINE_MAX_BYTES: usize = 32 * 1024;

/// One loaded signing key.
pub struct Key {
    /// Position in the config (`dkim[index]`).
    pub index: usize,
    /// `d=`, lower case.
    pub domain: String,
    /// `s=`.
    pub selector: String,
    pub algorithm: DkimAlgorithm,
    /// Modulus size for RSA, 256 for Ed25519.
    pub bits: usize,
    pub fallback: bool,
    /// What DNS must publish as `p=`: SubjectPublicKeyInfo DER for RSA, the
    /// raw 32-byte key for Ed25519 (RFC 8463 §4.2).
    public: Vec<u8>,
    signer: DkimSigner<DkimKey, Done>,
}

impl fmt::Debug for Key {
    // Never the key itself.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("index", &self.index)
            .field("domain", &self.domain)
            .field("selector", &self.selector)
            .field("algorithm", &self.algorithm)
            .field("bits", &self.bits)
            .field("fallback", &self.fallback)
            .finish_non_exhaustive()
    }
}

impl Key {
    /// `selector._domainkey.domain`, where the public key is published.
    pub fn dns_name(&self) -> String {
        format!("{}._domainkey.{}", self.selector, self.domain)
    }

    /// The TXT record text to publish (`v=DKIM1; k=...; p=...`).
    pub fn txt_record(&self) -> String {
        txt_record(self.algorithm, &self.public)
    }

    fn sign(&self, message: &[u8], out: &mut Vec<u8>) -> Result<(), SignError> {
        let sig = self.signer.sign(message).map_err(|e| SignError::Crypto {
            domain: self.domain.clone(),
            selector: self.selector.clone(),
            reason: e.to_string(),
        })?;
        sig.write_header(out);
        Ok(())
    }
}

/// The TXT record text for a public key.
pub fn txt_record(algorithm: DkimAlgorithm, public: &[u8]) -> String {
    let k = match algorithm {
        DkimAlgorithm::RsaSha256 => "rsa",
        DkimAlgorithm::Ed25519Sha256 => "ed25519",
    };
    format!("v=DKIM1; k={k}; p={}", BASE64.encode(public))
}

/// Why a message could not be signed. Internal: the client only sees a
/// bland 451.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("DKIM signing with {selector}._domainkey.{domain} failed: {reason}")]
    Crypto {
        domain: String,
        selector: String,
        reason: String,
    },
    #[error("the DKIM signing task failed: {0}")]
    Task(String),
}

/// The tempfail for a message that could not be signed: sending it
/// unsigned could get it rejected under the domain's DMARC policy.
pub fn sign_failed() -> Verdict {
    Verdict::Tempfail {
        reply: crate::reply::Reply::new(
            451,
            Enhanced(4, 3, 0),
            "Message not accepted: it could not be DKIM-signed; please try again later",
        ),
        rule: crate::event::RejectRule::DkimSign,
    }
}

/// Every configured key, indexed for signing.
#[derive(Debug, Default)]
pub struct Signer {
    keys: Vec<Arc<Key>>,
    /// Lower-case domain → its keys, in config order.
    by_domain: HashMap<String, Vec<Arc<Key>>>,
    fallback: Vec<Arc<Key>>,
    /// Tenant name → its `allowed_senders`.
    tenants: HashMap<String, Vec<String>>,
}

impl Signer {
    /// No keys: messages pass unsigned.
    pub fn empty() -> Signer {
        Signer::default()
    }

    /// Loads every `[[dkim]]` key; all problems are reported together, each
    /// with its key path.
    pub fn load(config: &Config) -> Result<Signer, ConfigErrors> {
        let mut errs = Vec::new();
        let mut signer = Signer {
            tenants: config
                .tenants
                .iter()
                .map(|t| (t.name.clone(), t.allowed_senders.clone()))
                .collect(),
            ..Signer::default()
        };
        let mut seen = HashMap::new();
        for (i, c) in config.dkim.iter().enumerate() {
            let p = format!("dkim[{i}]");
            let domain = c.domain.trim_end_matches('.').to_ascii_lowercase();
            let mut ok = true;
            if let Err(e) = check_dns_label_text(&domain) {
                errs.push(err(format!("{p}.domain"), format!("{:?} {e}", c.domain)));
                ok = false;
            }
            if let Err(e) = check_dns_label_text(&c.selector) {
                errs.push(err(
                    format!("{p}.selector"),
                    format!("{:?} {e}", c.selector),
                ));
                ok = false;
            }
            if let Some(first) = seen.insert((domain.clone(), c.selector.to_ascii_lowercase()), i) {
                errs.push(err(
                    format!("{p}.selector"),
                    format!(
                        "{}._domainkey.{domain} is also dkim[{first}]: one selector names one key",
                        c.selector
                    ),
                ));
                ok = false;
            }
            let loaded = match load_key(&c.key, c.algorithm) {
                Ok(k) => k,
                Err(e) => {
                    errs.push(err(format!("{p}.key"), e));
                    continue;
                }
            };
            if !ok {
                continue;
            }
            let signer_key = DkimSigner::from_key(loaded.key)
                .domain(domain.clone())
                .selector(c.selector.clone())
                .headers(SIGNED_HEADERS.iter().copied())
                .header_canonicalization(Canonicalization::Relaxed)
                .body_canonicalization(Canonicalization::Relaxed);
            let key = Arc::new(Key {
                index: i,
                domain: domain.clone(),
                selector: c.selector.clone(),
                algorithm: c.algorithm,
                bits: loaded.bits,
                fallback: c.fallback,
                public: loaded.public,
                signer: signer_key,
            });
            tracing::info!(
                key = %format!("dkim[{i}]"), domain = %key.domain, selector = %key.selector,
                algorithm = ?key.algorithm, bits = key.bits, fallback = key.fallback,
                "DKIM key loaded"
            );
            signer.keys.push(key.clone());
            if key.fallback {
                signer.fallback.push(key.clone());
            }
            signer.by_domain.entry(domain).or_default().push(key);
        }
        if errs.is_empty() {
            Ok(signer)
        } else {
            Err(ConfigErrors(errs))
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Every key, in config order.
    pub fn keys(&self) -> &[Arc<Key>] {
        &self.keys
    }

    /// The keys that sign a message from `tenant` (none: a trusted network)
    /// whose From: address is `from`.
    pub fn keys_for(&self, tenant: Option<&str>, from: Option<&str>) -> &[Arc<Key>] {
        let Some((_, domain)) = from.and_then(|a| a.rsplit_once('@')) else {
            return &self.fallback;
        };
        let may_use_domain = match tenant {
            None => true,
            Some(t) => self.tenants.get(t).is_some_and(|patterns| {
                crate::config::senders::allowed(patterns, from.unwrap_or(""))
            }),
        };
        if may_use_domain {
            let domain = domain.trim_end_matches('.').to_ascii_lowercase();
            // The domain itself, then each parent (relaxed alignment).
            let mut d = domain.as_str();
            loop {
                if let Some(keys) = self.by_domain.get(d) {
                    return keys;
                }
                match d.split_once('.') {
                    Some((_, parent)) if parent.contains('.') => d = parent,
                    _ => break,
                }
            }
        }
        &self.fallback
    }

    /// Signs `message` with the keys its From: address picks
    /// ([`Signer::keys_for`]) and returns it
    /// with the DKIM-Signature fields prepended; unchanged when no key
    /// applies. RSA work runs on the blocking pool.
    pub async fn sign(&self, envelope: &Envelope, message: Vec<u8>) -> Result<Vec<u8>, SignError> {
        let headers = HeaderView::read(&message);
        self.sign_with_headers(envelope, &headers, message).await
    }

    /// [`Signer::sign`] with the header block already read (by the policy
    /// stage, over the same message).
    pub async fn sign_with_headers(
        &self,
        envelope: &Envelope,
        headers: &HeaderView,
        message: Vec<u8>,
    ) -> Result<Vec<u8>, SignError> {
        let keys = self.keys_for(envelope.tenant.as_deref(), headers.from_address());
        if keys.is_empty() {
            return Ok(message);
        }
        let inline = message.len() <= INLINE_MAX_BYTES
            && keys
                .iter()
                .all(|k| k.algorithm == DkimAlgorithm::Ed25519Sha256);
        if inline {
            return sign_with(keys, message);
        }
        let keys = keys.to_vec();
        tokio::task::spawn_blocking(move || sign_with(&keys, message))
            .await
            .map_err(|e| SignError::Task(e.to_string()))?
    }
}

/// Signs with each key and prepends the fields: the first key's field ends
/// up on top (§5.6: each new signature goes above the earlier ones).
pub fn sign_with(keys: &[Arc<Key>], message: Vec<u8>) -> Result<Vec<u8>, SignError> {
    let mut headers = Vec::with_capacity(keys.len() * 600);
    for key in keys {
        key.sign(&message, &mut headers)?;
    }
    let mut out = Vec::with_capacity(headers.len() + message.len());
    out.extend_from_slice(&headers);
    out.extend_from_slice(&message);
    Ok(out)
}

fn err(path: String, message: impl Into<String>) -> ConfigError {
    ConfigError {
        path,
        message: message.into(),
    }
}

/// A domain or selector: dot-separated labels of letters, digits, `-` and
/// `_` (RFC 6376 §3.1). Also keeps key file names free of `/` and `..`.
fn check_dns_label_text(s: &str) -> Result<(), &'static str> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(())
    } else {
        Err("is not a DNS name: use letters, digits, '-' and '_' in dot-separated labels")
    }
}

struct LoadedKey {
    key: DkimKey,
    bits: usize,
    public: Vec<u8>,
}

/// Reads a PEM private key: RSA as PKCS#1 (`RSA PRIVATE KEY`) or PKCS#8
/// (`PRIVATE KEY`), Ed25519 as PKCS#8. Errors name the file, never a byte
/// of its content.
fn load_key(path: &Path, algorithm: DkimAlgorithm) -> Result<LoadedKey, String> {
    let file = path.display();
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {file}: {e}"))?;
    let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|_| {
        format!(
            "{file} holds no PEM private key (expected \"-----BEGIN PRIVATE KEY-----\" or \"-----BEGIN RSA PRIVATE KEY-----\"); make one with `herald dkim keygen`"
        )
    })?;
    let rsa = match &der {
        PrivateKeyDer::Pkcs1(k) => Some(aws_lc_rs::rsa::KeyPair::from_der(k.secret_pkcs1_der())),
        PrivateKeyDer::Pkcs8(k) => Some(aws_lc_rs::rsa::KeyPair::from_pkcs8(k.secret_pkcs8_der())),
        _ => None,
    };
    let ed25519 = match &der {
        PrivateKeyDer::Pkcs8(k) => {
            aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8(k.secret_pkcs8_der()).ok()
        }
        _ => None,
    };
    match algorithm {
        DkimAlgorithm::RsaSha256 => {
            if ed25519.is_some() {
                return Err(format!(
                    "{file} holds an Ed25519 key, but algorithm = \"rsa-sha256\": set algorithm = \"ed25519-sha256\""
                ));
            }
            let pair = match rsa {
                Some(Ok(pair)) => pair,
                Some(Err(e)) if e.description_() == "TooSmall" => {
                    return Err(format!(
                        "{file} holds an RSA key shorter than {MIN_RSA_BITS} bits; DKIM keys need {MIN_RSA_BITS} bits or more (make one with `herald dkim keygen`)"
                    ));
                }
                _ => {
                    return Err(format!(
                        "{file} holds no usable RSA private key (PKCS#1 or PKCS#8 PEM)"
                    ));
                }
            };
            let bits = pair.public_modulus_len() * 8;
            if bits < MIN_RSA_BITS {
                return Err(format!(
                    "{file} holds a {bits}-bit RSA key; DKIM keys need {MIN_RSA_BITS} bits or more (make one with `herald dkim keygen`)"
                ));
            }
            let public = pair
                .public_key()
                .as_der()
                .map_err(|_| format!("{file}: cannot derive the RSA public key"))?
                .as_ref()
                .to_vec();
            let key = RsaKey::<Sha256>::from_key_der(der)
                .map_err(|_| format!("{file} holds no usable RSA private key"))?;
            Ok(LoadedKey {
                key: DkimKey::Rsa(key),
                bits,
                public,
            })
        }
        DkimAlgorithm::Ed25519Sha256 => {
            let Some(pair) = ed25519 else {
                return Err(if matches!(rsa, Some(Ok(_))) {
                    format!(
                        "{file} holds an RSA key, but algorithm = \"ed25519-sha256\": set algorithm = \"rsa-sha256\""
                    )
                } else {
                    format!("{file} holds no usable Ed25519 private key (PKCS#8 PEM)")
                });
            };
            let public = pair.public_key().as_ref().to_vec();
            let PrivateKeyDer::Pkcs8(k) = &der else {
                return Err(format!("{file} holds no usable Ed25519 private key"));
            };
            let key = Ed25519Key::from_pkcs8_der(k.secret_pkcs8_der())
                .map_err(|_| format!("{file} holds no usable Ed25519 private key"))?;
            Ok(LoadedKey {
                key: DkimKey::Ed25519(key),
                bits: 256,
                public,
            })
        }
    }
}

// ---------------------------------------------------------------------------
// Checking what DNS publishes.

/// What DNS says about one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Published {
    /// The TXT record's `p=` is this key's public half.
    Matches,
    /// No DKIM record at the name.
    Missing,
    /// A record with an empty `p=`: the key is revoked (RFC 6376 §3.6.1).
    Revoked,
    /// A record with another key (or an unreadable one).
    Mismatch,
    /// The lookup failed temporarily; nothing is known.
    Unknown(String),
}

/// Compares TXT record texts found at a key's name with its public half.
/// For RSA both the SubjectPublicKeyInfo and the bare RSAPublicKey forms
/// count (verifiers accept both).
pub fn compare_published(algorithm: DkimAlgorithm, public: &[u8], records: &[String]) -> Published {
    let mut saw_revoked = false;
    let mut saw_other = false;
    for r in records {
        let tags: HashMap<&str, &str> = r
            .split(';')
            .filter_map(|t| t.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect();
        if tags.get("v").is_some_and(|v| *v != "DKIM1") {
            continue;
        }
        let Some(p) = tags.get("p") else { continue };
        let p: String = p.chars().filter(|c| !c.is_whitespace()).collect();
        if p.is_empty() {
            saw_revoked = true;
            continue;
        }
        let Ok(bytes) = BASE64.decode(p.as_bytes()) else {
            saw_other = true;
            continue;
        };
        let same = bytes == public
            || (algorithm == DkimAlgorithm::RsaSha256 && spki_rsa_tail(public) == Some(&bytes[..]));
        if same {
            return Published::Matches;
        }
        saw_other = true;
    }
    if saw_other {
        Published::Mismatch
    } else if saw_revoked {
        Published::Revoked
    } else {
        Published::Missing
    }
}

/// The RSAPublicKey inside an RSA SubjectPublicKeyInfo: after the fixed
/// 2048-to-4096-bit prefix (algorithm identifier, BIT STRING header).
fn spki_rsa_tail(spki: &[u8]) -> Option<&[u8]> {
    // SEQUENCE { SEQUENCE { OID rsaEncryption, NULL }, BIT STRING { 00, RSAPublicKey } }
    const ALG: &[u8] = &[
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let rest = skip_header(spki, 0x30)?;
    let rest = rest.strip_prefix(ALG)?;
    let rest = skip_header(rest, 0x03)?;
    rest.strip_prefix(&[0u8])
}

/// The content after a DER tag and length.
fn skip_header(der: &[u8], tag: u8) -> Option<&[u8]> {
    let (&t, rest) = der.split_first()?;
    if t != tag {
        return None;
    }
    let (&len, rest) = rest.split_first()?;
    if len & 0x80 == 0 {
        return rest.get(..len as usize);
    }
    let n = (len & 0x7f) as usize;
    if n == 0 || n > 4 || rest.len() < n {
        return None;
    }
    let l = rest[..n].iter().fold(0usize, |a, &b| (a << 8) | b as usize);
    rest[n..].get(..l)
}

/// Looks up every key's record and compares it; one entry per key, in
/// config order. Each lookup is bounded by the resolver's own timeout.
pub async fn check_published(signer: &Signer, dns: &crate::dns::Dns) -> Vec<(Arc<Key>, Published)> {
    let mut out = Vec::with_capacity(signer.keys.len());
    for key in &signer.keys {
        let found = match dns.txt(&key.dns_name()).await {
            Ok(records) => compare_published(key.algorithm, &key.public, &records),
            Err(e) => Published::Unknown(e.to_string()),
        };
        out.push((key.clone(), found));
    }
    out
}

/// Logs a warning for each key whose public half DNS does not publish.
pub async fn warn_unpublished(signer: &Signer, dns: &crate::dns::Dns) {
    for (key, found) in check_published(signer, dns).await {
        let name = key.dns_name();
        let path = format!("dkim[{}].key", key.index);
        match found {
            Published::Matches => {
                tracing::debug!(key = %path, dns = %name, "DKIM key is published");
            }
            Published::Missing => tracing::warn!(
                key = %path, dns = %name, record = %key.txt_record(),
                "DKIM key not published: receivers cannot verify its signatures until this TXT record is in DNS"
            ),
            Published::Revoked => tracing::warn!(
                key = %path, dns = %name, record = %key.txt_record(),
                "DKIM key is revoked in DNS (empty p=): its signatures will fail"
            ),
            Published::Mismatch => tracing::warn!(
                key = %path, dns = %name, record = %key.txt_record(),
                "DKIM key does not match the public key in DNS: its signatures will fail; publish this record or fix the key file"
            ),
            Published::Unknown(reason) => tracing::warn!(
                key = %path, dns = %name, reason = %reason,
                "cannot check the DKIM key against DNS"
            ),
        }
    }
}

// ---------------------------------------------------------------------------
// Key generation: `herald dkim keygen`.

/// `herald dkim ...`
#[derive(clap::Subcommand)]
pub enum DkimCommand {
    /// Generate a signing key under certs/dkim/ (mode 0600) and print the
    /// DNS TXT record to publish.
    Keygen(KeygenArgs),
}

#[derive(clap::Args)]
pub struct KeygenArgs {
    /// The signing domain (`d=`), normally the From: domain.
    #[arg(long)]
    pub domain: String,
    /// The selector (`s=`), e.g. "herald1"; a new one for each rotation.
    #[arg(long)]
    pub selector: String,
    #[arg(long, value_enum, default_value_t = KeygenAlgorithm::RsaSha256)]
    pub algorithm: KeygenAlgorithm,
    /// RSA modulus size: 2048, 3072 or 4096.
    #[arg(long, default_value_t = 2048)]
    pub bits: usize,
    /// Directory for the key file.
    #[arg(long, default_value = "certs/dkim")]
    pub dir: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KeygenAlgorithm {
    #[value(name = "rsa-sha256")]
    RsaSha256,
    #[value(name = "ed25519", alias = "ed25519-sha256")]
    Ed25519,
}

impl From<KeygenAlgorithm> for DkimAlgorithm {
    fn from(a: KeygenAlgorithm) -> DkimAlgorithm {
        match a {
            KeygenAlgorithm::RsaSha256 => DkimAlgorithm::RsaSha256,
            KeygenAlgorithm::Ed25519 => DkimAlgorithm::Ed25519Sha256,
        }
    }
}

/// A fresh key: its PKCS#8 PEM and the public half for DNS.
pub struct GeneratedKey {
    pub algorithm: DkimAlgorithm,
    pub pem: String,
    pub public: Vec<u8>,
}

impl fmt::Debug for GeneratedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeneratedKey")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl GeneratedKey {
    pub fn txt_record(&self) -> String {
        txt_record(self.algorithm, &self.public)
    }
}

/// Generates a key with aws-lc-rs (already compiled for rustls): RSA of
/// `bits` (2048, 3072 or 4096) or Ed25519.
pub fn generate(algorithm: DkimAlgorithm, bits: usize) -> Result<GeneratedKey, String> {
    let (der, public) = match algorithm {
        DkimAlgorithm::RsaSha256 => {
            use aws_lc_rs::rsa::KeySize;
            let size = match bits {
                2048 => KeySize::Rsa2048,
                3072 => KeySize::Rsa3072,
                4096 => KeySize::Rsa4096,
                _ => {
                    return Err(format!(
                        "RSA keys of {bits} bits are not offered: use 2048, 3072 or 4096"
                    ));
                }
            };
            let pair = aws_lc_rs::rsa::KeyPair::generate(size)
                .map_err(|_| "RSA key generation failed".to_string())?;
            let der: aws_lc_rs::encoding::Pkcs8V1Der<'_> = pair
                .as_der()
                .map_err(|_| "cannot encode the RSA key".to_string())?;
            let public = pair
                .public_key()
                .as_der()
                .map_err(|_| "cannot encode the RSA public key".to_string())?;
            (der.as_ref().to_vec(), public.as_ref().to_vec())
        }
        DkimAlgorithm::Ed25519Sha256 => {
            let pair = aws_lc_rs::signature::Ed25519KeyPair::generate()
                .map_err(|_| "Ed25519 key generation failed".to_string())?;
            let der: aws_lc_rs::encoding::Pkcs8V1Der<'_> = pair
                .as_der()
                .map_err(|_| "cannot encode the Ed25519 key".to_string())?;
            (der.as_ref().to_vec(), pair.public_key().as_ref().to_vec())
        }
    };
    Ok(GeneratedKey {
        algorithm,
        pem: pem_encode("PRIVATE KEY", &der),
        public,
    })
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = BASE64.encode(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    s
}

/// The zone-file line for a TXT record: the text split into quoted
/// character-strings of at most 255 bytes (RFC 1035 §3.3.14; resolvers
/// join them again, RFC 6376 §3.6.2.2).
pub fn zone_line(domain: &str, selector: &str, text: &str) -> String {
    let strings: Vec<String> = text
        .as_bytes()
        .chunks(255)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect();
    format!(
        "{selector}._domainkey.{}. IN TXT {}",
        domain.trim_end_matches('.'),
        strings.join(" ")
    )
}

/// Writes a new key file with mode 0600; never overwrites one.
pub fn write_key_file(path: &Path, pem: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(pem.as_bytes())?;
    f.sync_all()
}

/// What `herald dkim keygen` did.
#[derive(Debug)]
pub struct Keygen {
    pub path: PathBuf,
    pub algorithm: DkimAlgorithm,
    /// The zone-file line to publish.
    pub zone_line: String,
}

/// `herald dkim keygen`: generate, write `DIR/DOMAIN.SELECTOR.key`, and
/// return the DNS record to publish.
pub fn keygen(args: &KeygenArgs) -> Result<Keygen, String> {
    let domain = args.domain.trim_end_matches('.').to_ascii_lowercase();
    check_dns_label_text(&domain).map_err(|e| format!("--domain {:?} {e}", args.domain))?;
    check_dns_label_text(&args.selector)
        .map_err(|e| format!("--selector {:?} {e}", args.selector))?;
    let algorithm = DkimAlgorithm::from(args.algorithm);
    let path = args.dir.join(format!("{domain}.{}.key", args.selector));
    if path.exists() {
        return Err(format!(
            "{} exists; refusing to overwrite a key (choose a new selector to rotate, or move the file away)",
            path.display()
        ));
    }
    let key = generate(algorithm, args.bits)?;
    write_key_file(&path, &key.pem).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => {
            format!("{} exists; refusing to overwrite a key", path.display())
        }
        _ => format!("cannot write {}: {e}", path.display()),
    })?;
    Ok(Keygen {
        zone_line: zone_line(&domain, &args.selector, &key.txt_record()),
        path,
        algorithm,
    })
}

/// Runs `herald dkim ...` and prints the result.
pub fn cli(command: DkimCommand) -> std::process::ExitCode {
    match command {
        DkimCommand::Keygen(args) => match keygen(&args) {
            Ok(k) => {
                let alg = match k.algorithm {
                    DkimAlgorithm::RsaSha256 => "rsa-sha256",
                    DkimAlgorithm::Ed25519Sha256 => "ed25519-sha256",
                };
                eprintln!(
                    "Wrote the private key to {} (mode 0600). Publish this DNS record:",
                    k.path.display()
                );
                println!("{}", k.zone_line);
                eprintln!(
                    "\nThen add to the config:\n\n[[dkim]]\ndomain = \"{}\"\nselector = \"{}\"\nalgorithm = \"{alg}\"\nkey = \"{}\"",
                    args.domain.trim_end_matches('.').to_ascii_lowercase(),
                    args.selector,
                    k.path.display()
                );
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("herald dkim keygen: {e}");
                std::process::ExitCode::FAILURE
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    /// A config with one listener, one tenant and the given `[[dkim]]` text.
    fn config(dkim: &str) -> Config {
        Config::from_toml_str(&format!(
            r#"
            [[listener]]
            address = "127.0.0.1:0"
            {tenant}
            {dkim}
            "#,
            tenant = crate::config::test_support::tenant(
                "acme",
                r#""*@acme.example", "*@*.acme.example""#
            )
        ))
        .expect("valid config")
    }

    fn write_generated(dir: &Path, name: &str, alg: DkimAlgorithm) -> PathBuf {
        let key = generate(alg, 2048).unwrap();
        let path = dir.join(name);
        write_key_file(&path, &key.pem).unwrap();
        path
    }

    fn entry(domain: &str, selector: &str, alg: &str, key: &Path, extra: &str) -> String {
        format!(
            "[[dkim]]\ndomain = \"{domain}\"\nselector = \"{selector}\"\nalgorithm = \"{alg}\"\nkey = \"{}\"\n{extra}\n",
            key.display()
        )
    }

    fn envelope(tenant: Option<&str>) -> Envelope {
        Envelope {
            sender: "billing@acme.example".into(),
            tenant: tenant.map(str::to_string),
            message_id: None,
            received_at: 0,
            client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            smtputf8: false,
            body_8bit: false,
            ret: None,
            env_id: None,
            require_tls: false,
            ignore_tls_policies: false,
        }
    }

    const MESSAGE: &[u8] =
        b"Received: from app.test ([127.0.0.1])\r\n\tby relay.test (herald) with ESMTPSA id X\r\n\
        From: Acme <billing@acme.example>\r\nTo: bob@one.test\r\nSubject: Invoice 1\r\n\
        Date: Sun, 29 Nov 2026 10:00:00 +0000\r\nMessage-ID: <1@acme.example>\r\n\r\nHello\r\n";

    #[test]
    fn loads_pkcs1_pkcs8_rsa_and_ed25519_keys() {
        let dir = tempfile::tempdir().unwrap();
        let rsa8 = write_generated(dir.path(), "rsa.key", DkimAlgorithm::RsaSha256);
        let ed = write_generated(dir.path(), "ed.key", DkimAlgorithm::Ed25519Sha256);
        let text = [
            entry("acme.example", "a", "rsa-sha256", &rsa8, ""),
            entry("acme.example", "b", "ed25519-sha256", &ed, ""),
            entry(
                "acme.example",
                "c",
                "rsa-sha256",
                &fixture("dkim-rsa2048-pkcs1.pem"),
                "",
            ),
            entry(
                "acme.example",
                "d",
                "ed25519",
                &fixture("dkim-ed25519-openssl.pem"),
                "",
            ),
        ]
        .concat();
        let s = Signer::load(&config(&text)).unwrap();
        let bits: Vec<usize> = s.keys().iter().map(|k| k.bits).collect();
        assert_eq!(bits, vec![2048, 256, 2048, 256]);
        assert!(
            s.keys()[0]
                .txt_record()
                .starts_with("v=DKIM1; k=rsa; p=MII")
        );
        assert!(
            s.keys()[1]
                .txt_record()
                .starts_with("v=DKIM1; k=ed25519; p=")
        );
        assert_eq!(s.keys()[2].dns_name(), "c._domainkey.acme.example");
        // Debug output names the key, never its material.
        let shown = format!("{:?}", s.keys()[0]);
        assert!(
            shown.contains("acme.example") && !shown.contains("MII"),
            "{shown}"
        );
    }

    #[test]
    fn bad_keys_are_config_errors_naming_the_key_and_file_only() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("garbage.key");
        std::fs::write(
            &garbage,
            "-----BEGIN PRIVATE KEY-----\nU0VDUkVUU1RVRkY=\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let plain = dir.path().join("plain.key");
        std::fs::write(&plain, "SECRETSTUFF").unwrap();
        let ed = write_generated(dir.path(), "ed.key", DkimAlgorithm::Ed25519Sha256);
        let small = fixture("dkim-rsa1024.pem");
        let text = [
            entry("acme.example", "a", "rsa-sha256", &small, ""),
            entry(
                "acme.example",
                "b",
                "rsa-sha256",
                &dir.path().join("missing.key"),
                "",
            ),
            entry("acme.example", "c", "rsa-sha256", &garbage, ""),
            entry("acme.example", "d", "rsa-sha256", &plain, ""),
            entry("acme.example", "e", "rsa-sha256", &ed, ""),
            entry(
                "acme.example",
                "f",
                "ed25519-sha256",
                &fixture("dkim-rsa2048-pkcs1.pem"),
                "",
            ),
        ]
        .concat();
        let errs = Signer::load(&config(&text)).unwrap_err();
        let paths: Vec<&str> = errs.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "dkim[0].key",
                "dkim[1].key",
                "dkim[2].key",
                "dkim[3].key",
                "dkim[4].key",
                "dkim[5].key"
            ]
        );
        let msg = |i: usize| errs.0[i].message.clone();
        assert!(
            msg(0).contains("2048 bits") && msg(0).contains("dkim-rsa1024.pem"),
            "{}",
            msg(0)
        );
        assert!(
            msg(1).contains("cannot read") && msg(1).contains("missing.key"),
            "{}",
            msg(1)
        );
        assert!(msg(2).contains("garbage.key"), "{}", msg(2));
        assert!(
            msg(4).contains("Ed25519") && msg(4).contains("ed25519-sha256"),
            "{}",
            msg(4)
        );
        assert!(
            msg(5).contains("RSA key") && msg(5).contains("rsa-sha256"),
            "{}",
            msg(5)
        );
        let all = errs.to_string();
        let small_pem = std::fs::read_to_string(&small).unwrap();
        for secret in [
            "SECRETSTUFF",
            "U0VDUkVU",
            &small_pem.lines().nth(1).unwrap()[..20],
        ] {
            assert!(!all.contains(secret), "key material in: {all}");
        }
    }

    #[test]
    fn names_are_checked_and_selectors_unique_per_domain() {
        let k = fixture("dkim-ed25519-openssl.pem");
        let text = [
            entry("acme.example", "s1", "ed25519", &k, ""),
            entry("ACME.example.", "s1", "ed25519", &k, ""),
            entry("acme.example", "../../etc", "ed25519", &k, ""),
            entry("bad domain", "s2", "ed25519", &k, ""),
        ]
        .concat();
        let errs = Signer::load(&config(&text)).unwrap_err();
        let paths: Vec<&str> = errs.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            ["dkim[1].selector", "dkim[2].selector", "dkim[3].domain"]
        );
    }

    #[test]
    fn keys_are_those_of_the_from_domain_its_parent_or_the_fallback() {
        let dir = tempfile::tempdir().unwrap();
        let ed = write_generated(dir.path(), "ed.key", DkimAlgorithm::Ed25519Sha256);
        let text = [
            entry("acme.example", "old", "ed25519", &ed, ""),
            entry("acme.example", "new", "ed25519", &ed, ""),
            entry("other.example", "s", "ed25519", &ed, ""),
            entry("relay.example", "r", "ed25519", &ed, "fallback = true"),
        ]
        .concat();
        let s = Signer::load(&config(&text)).unwrap();
        let sel = |tenant: Option<&str>, from: Option<&str>| -> Vec<String> {
            s.keys_for(tenant, from)
                .iter()
                .map(|k| format!("{}/{}", k.domain, k.selector))
                .collect()
        };
        // Dual signing: both keys of the domain, in config order.
        assert_eq!(
            sel(Some("acme"), Some("billing@ACME.example")),
            ["acme.example/old", "acme.example/new"]
        );
        // A subdomain signs with the parent's keys (relaxed alignment).
        assert_eq!(
            sel(Some("acme"), Some("x@mail.acme.example")),
            ["acme.example/old", "acme.example/new"]
        );
        // No key for the domain: the relay's fallback key.
        assert_eq!(sel(None, Some("x@third.example")), ["relay.example/r"]);
        assert_eq!(sel(None, None), ["relay.example/r"]);
        // A tenant may not sign with another domain's key.
        assert_eq!(
            sel(Some("acme"), Some("x@other.example")),
            ["relay.example/r"]
        );
        assert_eq!(
            sel(Some("ghost"), Some("billing@acme.example")),
            ["relay.example/r"]
        );
        // A trusted network (no tenant) signs as its From: says.
        assert_eq!(sel(None, Some("x@other.example")), ["other.example/s"]);
    }

    #[tokio::test]
    async fn signs_relaxed_with_from_oversigned_and_prepends_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let rsa = write_generated(dir.path(), "rsa.key", DkimAlgorithm::RsaSha256);
        let ed = write_generated(dir.path(), "ed.key", DkimAlgorithm::Ed25519Sha256);
        let text = [
            entry("acme.example", "r", "rsa-sha256", &rsa, ""),
            entry("acme.example", "e", "ed25519-sha256", &ed, ""),
        ]
        .concat();
        let s = Signer::load(&config(&text)).unwrap();
        let signed = s
            .sign(&envelope(Some("acme")), MESSAGE.to_vec())
            .await
            .unwrap();
        assert!(signed.ends_with(MESSAGE), "message itself unchanged");
        let added = String::from_utf8(signed[..signed.len() - MESSAGE.len()].to_vec()).unwrap();
        let fields: Vec<&str> = added.split("DKIM-Signature: ").skip(1).collect();
        assert_eq!(fields.len(), 2, "{added}");
        assert!(
            fields[0].contains("a=rsa-sha256; s=r; d=acme.example; c=relaxed/relaxed"),
            "{added}"
        );
        assert!(
            fields[1].contains("a=ed25519-sha256; s=e; d=acme.example"),
            "{added}"
        );
        let unfolded: String = fields[0].split_whitespace().collect();
        let h = unfolded
            .split(';')
            .find_map(|t| t.strip_prefix("h="))
            .expect("h= tag");
        let h: Vec<String> = h.split(':').map(str::to_ascii_lowercase).collect();
        assert_eq!(
            h.iter().filter(|x| *x == "from").count(),
            2,
            "From over-signed: {h:?}"
        );
        for want in [
            "to",
            "subject",
            "date",
            "message-id",
            "list-unsubscribe",
            "content-type",
        ] {
            assert!(h.iter().any(|x| x == want), "{want} missing from {h:?}");
        }
        assert!(!h.iter().any(|x| x == "received"), "{h:?}");
        assert!(!added.contains('\n') || !added.split("\r\n").any(|l| l.len() > 998));
        assert!(
            !signed.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'),
            "bare LF"
        );
    }

    #[tokio::test]
    async fn without_a_key_the_message_is_unchanged() {
        let s = Signer::empty();
        let out = s.sign(&envelope(None), MESSAGE.to_vec()).await.unwrap();
        assert_eq!(out, MESSAGE);
        let k = fixture("dkim-ed25519-openssl.pem");
        let s = Signer::load(&config(&entry("other.example", "s", "ed25519", &k, ""))).unwrap();
        let out = s
            .sign(&envelope(Some("acme")), MESSAGE.to_vec())
            .await
            .unwrap();
        assert_eq!(out, MESSAGE);
    }

    #[test]
    fn published_keys_are_compared_in_either_rsa_form() {
        let key = generate(DkimAlgorithm::RsaSha256, 2048).unwrap();
        let spki = key.public.clone();
        let bare = spki_rsa_tail(&spki).unwrap().to_vec();
        let rec = |p: &[u8]| format!("v=DKIM1; k=rsa; p={}", BASE64.encode(p));
        let alg = DkimAlgorithm::RsaSha256;
        assert_eq!(
            compare_published(alg, &spki, &[rec(&spki)]),
            Published::Matches
        );
        assert_eq!(
            compare_published(alg, &spki, &[rec(&bare)]),
            Published::Matches
        );
        // Folded in the zone file: whitespace inside p= does not count.
        let folded = rec(&spki).replacen("p=MII", "p=M I I", 1);
        assert_eq!(compare_published(alg, &spki, &[folded]), Published::Matches);
        let other = generate(DkimAlgorithm::RsaSha256, 2048).unwrap();
        assert_eq!(
            compare_published(alg, &spki, &["v=spf1 -all".into(), rec(&other.public)]),
            Published::Mismatch
        );
        assert_eq!(
            compare_published(alg, &spki, &["v=DKIM1; p=".into()]),
            Published::Revoked
        );
        assert_eq!(
            compare_published(alg, &spki, &["v=spf1 -all".into()]),
            Published::Missing
        );
        assert_eq!(compare_published(alg, &spki, &[]), Published::Missing);
    }

    #[test]
    fn zone_line_splits_into_255_byte_strings() {
        let key = generate(DkimAlgorithm::RsaSha256, 2048).unwrap();
        let text = key.txt_record();
        let line = zone_line("acme.example.", "herald1", &text);
        assert!(line.starts_with("herald1._domainkey.acme.example. IN TXT \"v=DKIM1; k=rsa; p="));
        let strings: Vec<&str> = line
            .split(" IN TXT ")
            .nth(1)
            .unwrap()
            .split('"')
            .filter(|s| !s.trim().is_empty())
            .collect();
        assert!(
            strings.len() >= 2 && strings.iter().all(|s| s.len() <= 255),
            "{line}"
        );
        assert_eq!(strings.concat(), text);
        let ed = generate(DkimAlgorithm::Ed25519Sha256, 0).unwrap();
        assert_eq!(
            zone_line("d", "s", &ed.txt_record()).matches('"').count(),
            2
        );
    }

    #[test]
    fn keygen_writes_0600_and_never_overwrites() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let args = KeygenArgs {
            domain: "Acme.Example.".into(),
            selector: "ed1".into(),
            algorithm: KeygenAlgorithm::Ed25519,
            bits: 2048,
            dir: dir.path().join("certs/dkim"),
        };
        let k = keygen(&args).unwrap();
        assert_eq!(k.path, dir.path().join("certs/dkim/acme.example.ed1.key"));
        let mode = std::fs::metadata(&k.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(
            k.zone_line
                .starts_with("ed1._domainkey.acme.example. IN TXT \"v=DKIM1; k=ed25519; p=")
        );
        // The written key loads, and its public half is the printed one.
        let s = Signer::load(&config(&entry(
            "acme.example",
            "ed1",
            "ed25519",
            &k.path,
            "",
        )))
        .unwrap();
        assert!(k.zone_line.contains(&s.keys()[0].txt_record()));
        let before = std::fs::read(&k.path).unwrap();
        let again = keygen(&args).unwrap_err();
        assert!(again.contains("refusing to overwrite"), "{again}");
        assert_eq!(std::fs::read(&k.path).unwrap(), before);
        let bad = KeygenArgs {
            selector: "../x".into(),
            ..args
        };
        assert!(keygen(&bad).unwrap_err().contains("--selector"));
        assert!(generate(DkimAlgorithm::RsaSha256, 1024).is_err());
    }

    /// Ed25519 keys for acme.example and a fallback for the relay's own
    /// domain, loaded once: every message then gets at least one signature.
    static PROP_SIGNER: std::sync::LazyLock<Signer> = std::sync::LazyLock::new(|| {
        let dir = tempfile::tempdir().unwrap();
        let ed = write_generated(dir.path(), "ed.key", DkimAlgorithm::Ed25519Sha256);
        let text = [
            entry("acme.example", "a", "ed25519", &ed, ""),
            entry("relay.example", "r", "ed25519", &ed, "fallback = true"),
        ]
        .concat();
        Signer::load(&config(&text)).unwrap()
    });

    /// Header text biased to what breaks byte arithmetic (multi-byte
    /// characters, 'İ' which grows when lower-cased, NUL, folding), or any
    /// Unicode at all.
    fn header_text() -> impl proptest::strategy::Strategy<Value = String> {
        proptest::prop_oneof![
            "[a-zA-Z0-9 .:;@<>\"=?éİ€😀漢ß\u{0}\t-]{0,40}",
            "(?s).{0,40}",
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 128,
            failure_persistence: None,
            ..Default::default()
        })]

        /// Whatever the header block holds, picking the keys and signing
        /// never panic, and the message comes back whole after the
        /// signatures; nor does comparing any TXT record with a key.
        #[test]
        fn any_header_selects_and_signs_without_panic(
            name in header_text(),
            local in header_text(),
            subject in header_text(),
            body in header_text(),
            junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..24),
            tenant in proptest::bool::ANY,
        ) {
            let mut m = format!(
                "From: {name} <{local}@acme.example>\r\nTo: =?utf-8?q?{subject}?=\r\n\
                 Subject: {subject}\r\nX-Junk: "
            )
            .into_bytes();
            m.extend_from_slice(&junk);
            m.extend_from_slice(format!("\r\n\r\n{body}\r\n").as_bytes());
            let headers = HeaderView::read(&m);
            let keys = PROP_SIGNER.keys_for(tenant.then_some("acme"), headers.from_address());
            proptest::prop_assert!(!keys.is_empty());
            let signed = sign_with(keys, m.clone()).unwrap();
            proptest::prop_assert!(signed.starts_with(b"DKIM-Signature:") && signed.ends_with(&m));
            let record = String::from_utf8_lossy(&junk);
            let _ = compare_published(DkimAlgorithm::Ed25519Sha256, &[0; 32], &[name, record.into()]);
        }
    }
}
