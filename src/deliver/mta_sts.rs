//! MTA-STS (RFC 8461): a recipient domain's policy saying which MX hosts
//! may receive its mail and whether TLS with a valid certificate is
//! required of them.
//!
//! [`MtaSts::lookup`] reads the `_mta-sts.<domain>` TXT record (§3.1) for
//! the policy's current id, and fetches the policy itself from
//! `https://mta-sts.<domain>/.well-known/mta-sts.txt` (§3.3) only when no
//! cached policy has that id. Policies are cached for their `max_age` in
//! memory and in one JSON file, rewritten atomically after each change, so
//! that a restart keeps them. A cached policy stays in use while a new one
//! cannot be fetched or the TXT record cannot be read: that is what keeps an
//! attacker who blocks the fetch or the DNS answer from turning enforcement
//! off (§10.2). A policy close to expiry is refreshed in the background.
//!
//! What it trusts: nothing from DNS or the policy host. The TXT record and
//! the policy text are parsed strictly; the host must present a certificate
//! for `mta-sts.<domain>` valid under the system's trust store (or the
//! configured `ca_file`); redirects are not followed; the body is capped at
//! 64 KiB. The cache file is herald's own, but a damaged one is logged and
//! ignored, never a reason not to start.
//!
//! Not here: applying the policy to MX hosts and certificates during
//! delivery (the caller uses [`Policy::allows_mx`] and [`Policy::mode`]),
//! and TLS-RPT reports (RFC 8460), for which [`Lookup::Failed`] names the
//! result type.

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hyper::body::Body as _;
use hyper::{Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;
use tokio_rustls::TlsConnector;

use crate::clock::unix_now;
pub use crate::config::MtaStsConfig;
use crate::dns::Dns;

/// The largest `max_age` a policy may give, about a year (RFC 8461 §3.2).
pub const MAX_AGE_LIMIT: u64 = 31_557_600;

/// The largest policy body read; a policy is a few lines.
pub const MAX_POLICY_BYTES: usize = 64 * 1024;

/// TLS-RPT result types (RFC 8460 §4.3.2.2) for a policy that could not be had.
pub const FETCH_ERROR: &str = "sts-policy-fetch-error";
pub const POLICY_INVALID: &str = "sts-policy-invalid";
pub const WEBPKI_INVALID: &str = "sts-webpki-invalid";

const WELL_KNOWN: &str = "/.well-known/mta-sts.txt";
const DAY: u64 = 86_400;

/// How long a failed fetch of one domain's policy id is not tried again:
/// without it, a domain whose policy host hangs would cost every delivery
/// attempt a full `fetch_timeout`.
const FAILURE_HOLD: Duration = Duration::from_secs(300);

/// The cache file's format version.
const CACHE_VERSION: u32 = 1;

/// What a policy asks of senders (RFC 8461 §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Deliver only to listed MX hosts over TLS with a valid certificate.
    Enforce,
    /// Deliver as usual, but report what would have failed.
    Testing,
    /// The domain has withdrawn its policy.
    None,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Testing => "testing",
            Mode::None => "none",
        }
    }
}

/// A parsed policy file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// The id of the TXT record it was fetched under.
    pub id: String,
    pub mode: Mode,
    /// MX patterns, lower case, without a trailing dot: `mx.example.com`
    /// or `*.example.com`.
    pub mx: Vec<String>,
    /// Seconds the policy may be cached, at most [`MAX_AGE_LIMIT`].
    pub max_age: u64,
}

impl Policy {
    /// The policy as TLS-RPT quotes it (RFC 8460 §4.4: `policy-string`,
    /// one element per line of the policy file).
    pub fn lines(&self) -> Vec<String> {
        let mut lines = vec![
            "version: STSv1".to_string(),
            format!("mode: {}", self.mode.as_str()),
        ];
        lines.extend(self.mx.iter().map(|mx| format!("mx: {mx}")));
        lines.push(format!("max_age: {}", self.max_age));
        lines
    }

    /// RFC 8461 §3.2 strict parse of the policy file text: `version: STSv1`
    /// first, then `mode`, `max_age` and one or more `mx` (none needed with
    /// mode none), one `key: value` per line ended by CRLF or LF. Unknown
    /// keys are ignored if well formed; a known key given twice (but `mx`)
    /// is an error, as the policy would be ambiguous. Blank lines are
    /// skipped. Errors name the line.
    pub fn parse(text: &str, id: &str) -> Result<Policy, String> {
        let mut version = false;
        let mut mode = None;
        let mut max_age = None;
        let mut mx = Vec::new();
        for (i, raw) in text.split('\n').enumerate() {
            let n = i + 1;
            let line = raw.strip_suffix('\r').unwrap_or(raw);
            if line.trim_matches(WSP).is_empty() {
                continue;
            }
            let Some((key, value)) = line.split_once(':') else {
                return Err(format!("line {n}: expected \"key: value\""));
            };
            if !valid_key(key) {
                return Err(format!("line {n}: {key:?} is not a valid key"));
            }
            let value = value.trim_matches(WSP);
            if value.is_empty() {
                return Err(format!("line {n}: {key} has no value"));
            }
            if !value.bytes().all(value_char) {
                return Err(format!(
                    "line {n}: the value of {key} holds a character a policy may not"
                ));
            }
            let key = key.to_ascii_lowercase();
            if !version && key != "version" {
                return Err(format!(
                    "line {n}: a policy must begin with \"version: STSv1\""
                ));
            }
            let twice = || format!("line {n}: {key} is given twice");
            match key.as_str() {
                "version" => {
                    if version {
                        return Err(twice());
                    }
                    // ABNF literals are case-insensitive (RFC 5234 §2.3).
                    if !value.eq_ignore_ascii_case("STSv1") {
                        return Err(format!("line {n}: version {value:?} is not STSv1"));
                    }
                    version = true;
                }
                "mode" => {
                    if mode.is_some() {
                        return Err(twice());
                    }
                    mode = Some(match value.to_ascii_lowercase().as_str() {
                        "enforce" => Mode::Enforce,
                        "testing" => Mode::Testing,
                        "none" => Mode::None,
                        _ => {
                            return Err(format!(
                                "line {n}: mode {value:?} is not enforce, testing or none"
                            ));
                        }
                    });
                }
                "max_age" => {
                    if max_age.is_some() {
                        return Err(twice());
                    }
                    // 1*10DIGIT, at most about a year.
                    let age = (value.len() <= 10 && value.bytes().all(|b| b.is_ascii_digit()))
                        .then(|| value.parse::<u64>().ok())
                        .flatten()
                        .ok_or_else(|| format!("line {n}: max_age {value:?} is not a number"))?;
                    if age > MAX_AGE_LIMIT {
                        return Err(format!(
                            "line {n}: max_age {age} is more than {MAX_AGE_LIMIT}"
                        ));
                    }
                    max_age = Some(age);
                }
                "mx" => mx.push(
                    mx_pattern(value)
                        .ok_or_else(|| format!("line {n}: mx {value:?} is not a host pattern"))?,
                ),
                // §3.2: unknown fields are ignored.
                _ => {}
            }
        }
        if !version {
            return Err("the policy is empty".into());
        }
        let mode = mode.ok_or("the policy has no mode")?;
        let max_age = max_age.ok_or("the policy has no max_age")?;
        if mx.is_empty() && mode != Mode::None {
            return Err("the policy names no mx".into());
        }
        Ok(Policy {
            id: id.to_string(),
            mode,
            mx,
            max_age,
        })
    }

    /// RFC 8461 §4.1: whether MX host `host` is one the policy names.
    /// `mx.example.com` matches only itself; `*.example.com` matches
    /// exactly one label left of `example.com`. Case-insensitive; a
    /// trailing dot on either side is ignored.
    pub fn allows_mx(&self, host: &str) -> bool {
        let host = host.strip_suffix('.').unwrap_or(host);
        self.mx.iter().any(|p| mx_matches(p, host))
    }
}

const WSP: [char; 2] = [' ', '\t'];

/// `sts-policy-ext-name` (and the TXT record's extension names):
/// 1*32(ALPHA / DIGIT) *31(ALPHA / DIGIT / "_" / "-" / ".").
fn valid_key(key: &str) -> bool {
    let alnum = key.bytes().take_while(u8::is_ascii_alphanumeric).count();
    alnum >= 1
        && key.len() - alnum.min(32) <= 31
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// `sts-policy-vchar` / `sts-ext-value`: visible ASCII but ';' and '='.
fn value_char(b: u8) -> bool {
    matches!(b, 0x21..=0x3a | 0x3c | 0x3e..=0x7e)
}

/// `mx-pattern = ["*."] Domain` (RFC 5321 §4.1.2), normalised to lower
/// case without a trailing dot.
fn mx_pattern(value: &str) -> Option<String> {
    let value = value
        .strip_suffix('.')
        .unwrap_or(value)
        .to_ascii_lowercase();
    let domain = value.strip_prefix("*.").unwrap_or(&value);
    is_domain(domain).then_some(value)
}

fn is_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn mx_matches(pattern: &str, host: &str) -> bool {
    let pattern = pattern.strip_suffix('.').unwrap_or(pattern);
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            // One whole label, then '.', then the suffix.
            let Some(cut) = host.len().checked_sub(suffix.len() + 1) else {
                return false;
            };
            // The '.' (ASCII) first: it makes `cut` a char boundary.
            cut > 0
                && host.as_bytes()[cut] == b'.'
                && host[cut + 1..].eq_ignore_ascii_case(suffix)
                && !host[..cut].contains('.')
        }
        None => host.eq_ignore_ascii_case(pattern),
    }
}

/// What the `_mta-sts` TXT records say.
#[derive(Debug, PartialEq, Eq)]
enum Txt {
    /// No record begins with `v=STSv1`.
    Absent,
    /// The current policy id.
    Id(String),
    /// Several STS records, or one that is malformed: RFC 8461 §3.1 says
    /// to assume no policy is published.
    Invalid(String),
}

/// RFC 8461 §3.1: records not beginning with `v=STSv1` are discarded; of
/// the rest there must be exactly one, valid.
fn txt_id(records: &[String]) -> Txt {
    let sts: Vec<&String> = records
        .iter()
        .filter(|r| {
            r.strip_prefix("v=STSv1")
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([';', ' ', '\t']))
        })
        .collect();
    match sts.as_slice() {
        [] => Txt::Absent,
        [one] => match txt_record_id(one) {
            Ok(id) => Txt::Id(id),
            Err(why) => Txt::Invalid(format!("{one:?}: {why}")),
        },
        more => Txt::Invalid(format!(
            "{} records begin with v=STSv1, where one is allowed",
            more.len()
        )),
    }
}

/// `v=STSv1; id=...;` with optional extensions. Parsed by hand: mail-auth's
/// parser accepts `v=` anywhere in the record and any id.
fn txt_record_id(record: &str) -> Result<String, String> {
    let rest = &record["v=STSv1".len()..];
    let mut fields = rest.split(';');
    if !fields.next().unwrap_or("").trim_matches(WSP).is_empty() {
        return Err("v=STSv1 must be followed by ';'".into());
    }
    let mut id = None;
    for field in fields {
        let field = field.trim_matches(WSP);
        if field.is_empty() {
            continue;
        }
        let (key, value) = field
            .split_once('=')
            .ok_or_else(|| format!("{field:?} is not key=value"))?;
        if key == "id" {
            if id.is_some() {
                return Err("id is given twice".into());
            }
            if value.is_empty()
                || value.len() > 32
                || !value.bytes().all(|b| b.is_ascii_alphanumeric())
            {
                return Err(format!("id {value:?} is not 1 to 32 letters and digits"));
            }
            id = Some(value.to_string());
        } else if !valid_key(key) || value.is_empty() || !value.bytes().all(value_char) {
            return Err(format!("{field:?} is not a valid field"));
        }
    }
    id.ok_or_else(|| "no id".into())
}

/// The policy that applies to a destination domain now.
#[derive(Clone, Debug)]
pub enum Lookup {
    /// No policy: no TXT record, or mode none.
    NoPolicy,
    /// Mode enforce or testing.
    Policy(Arc<Policy>),
    /// A TXT record exists but no valid policy could be fetched and none is
    /// cached: what TLS-RPT calls sts-policy-fetch-error /
    /// sts-policy-invalid / sts-webpki-invalid. RFC 8461 §5: then deliver
    /// as without a policy.
    Failed {
        result_type: &'static str,
        detail: String,
    },
}

impl Lookup {
    fn from_policy(policy: Arc<Policy>) -> Lookup {
        match policy.mode {
            Mode::None => Lookup::NoPolicy,
            Mode::Enforce | Mode::Testing => Lookup::Policy(policy),
        }
    }
}

/// Why a policy could not be had, as TLS-RPT would report it.
#[derive(Clone, Debug)]
struct FetchError {
    result_type: &'static str,
    detail: String,
}

impl FetchError {
    fn fetch(detail: String) -> FetchError {
        FetchError {
            result_type: FETCH_ERROR,
            detail,
        }
    }

    fn invalid(detail: String) -> FetchError {
        FetchError {
            result_type: POLICY_INVALID,
            detail,
        }
    }
}

type Fetched = Result<Arc<Policy>, FetchError>;

/// A cached policy.
#[derive(Clone, Debug)]
struct Entry {
    policy: Arc<Policy>,
    /// Unix seconds.
    fetched_at: u64,
    /// `fetched_at + max_age`, Unix seconds.
    expires_at: u64,
}

impl Entry {
    fn new(policy: Arc<Policy>, fetched_at: u64) -> Entry {
        let expires_at = fetched_at + policy.max_age.min(MAX_AGE_LIMIT);
        Entry {
            policy,
            fetched_at,
            expires_at,
        }
    }

    /// Whether to fetch again ahead of expiry: with under a quarter of its
    /// life left, or under a day (but never in the first half of a short
    /// life, which would refetch at once).
    fn refresh_due(&self, now: u64) -> bool {
        let life = self.expires_at.saturating_sub(self.fetched_at);
        let threshold = (life / 4).max(DAY.min(life / 2));
        self.expires_at.saturating_sub(now) < threshold
    }
}

/// A fetch of one policy id that failed, not tried again before `until`.
struct Failure {
    id: String,
    until: Instant,
    error: FetchError,
}

#[derive(Default)]
struct State {
    policies: HashMap<String, Entry>,
    /// Domains without an STS TXT record, until when that is believed.
    absent: HashMap<String, Instant>,
    failed: HashMap<String, Failure>,
    /// The fetch under way per domain, which concurrent lookups share.
    fetching: HashMap<String, Arc<OnceCell<Fetched>>>,
}

struct Inner {
    enabled: bool,
    fetch_timeout: Duration,
    negative_cache: Duration,
    dns: Dns,
    tls: TlsConnector,
    port: AtomicU16,
    cache_file: PathBuf,
    state: Mutex<State>,
    /// Held while the cache file is written, so that writes land in order.
    writing: Mutex<()>,
    /// Where the number of cached policies is shown.
    metrics: std::sync::OnceLock<Arc<crate::metrics::Metrics>>,
}

/// The certificates trusted for policy hosts and for MX hosts that must be
/// verified: the system's trust store and `ca_file` (PEM).
pub fn trust_roots(ca_file: Option<&std::path::Path>) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if let Some(path) = ca_file {
        let extra = crate::config::smarthost::load_roots(path)?;
        roots.roots.extend(extra.roots);
    }
    Ok(roots)
}

/// MTA-STS policy lookups with their cache; cheap to clone.
#[derive(Clone)]
pub struct MtaSts {
    inner: Arc<Inner>,
}

impl MtaSts {
    /// Loads the durable cache from `cache_file` (missing: empty; damaged:
    /// logged and ignored) and the trust anchors: the system's trust store
    /// and `ca_file`. Errors only for an unreadable `ca_file`.
    pub fn new(config: &MtaStsConfig, dns: Dns, cache_file: PathBuf) -> Result<MtaSts, String> {
        let roots = trust_roots(config.ca_file.as_deref())?;
        if roots.is_empty() && config.enabled {
            tracing::warn!(
                "no trusted root certificates found: every MTA-STS policy fetch will fail"
            );
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("cannot set up TLS for MTA-STS: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let state = State {
            policies: load_cache(&cache_file, unix_now()),
            ..State::default()
        };
        Ok(MtaSts {
            inner: Arc::new(Inner {
                enabled: config.enabled,
                fetch_timeout: config.fetch_timeout.0,
                negative_cache: config.negative_cache.0,
                dns,
                tls: TlsConnector::from(Arc::new(tls)),
                port: AtomicU16::new(config.https_port),
                cache_file,
                state: Mutex::new(state),
                writing: Mutex::new(()),
                metrics: std::sync::OnceLock::new(),
            }),
        })
    }

    /// Shows the number of cached policies in `metrics` from now on.
    pub fn count_into(&self, metrics: Arc<crate::metrics::Metrics>) {
        let n = self.lock().policies.len() as u64;
        metrics
            .mta_sts_cached
            .store(n, std::sync::atomic::Ordering::Relaxed);
        let _ = self.inner.metrics.set(metrics);
    }

    /// Fetches policies from `port` instead of 443: tests cannot bind 443.
    #[doc(hidden)]
    pub fn with_https_port(self, port: u16) -> Self {
        self.inner.port.store(port, Ordering::Relaxed);
        self
    }

    /// The policy for a destination domain now.
    ///
    /// A cached unexpired policy whose id equals the current TXT id is used
    /// without fetching. TXT id changed, or no cached policy: fetch (within
    /// `fetch_timeout`). The fetch fails but an unexpired cached policy
    /// exists: keep using it, and log. The TXT record cannot be read (DNS
    /// error), or is gone, with a cached unexpired policy: use it.
    /// Concurrent lookups of one domain share one fetch.
    pub async fn lookup(&self, domain: &str) -> Lookup {
        if !self.inner.enabled {
            return Lookup::NoPolicy;
        }
        // A domain in Unicode (SMTPUTF8 recipients) is looked up, and its
        // policy host named, by its A-labels (RFC 8461 §3.3 speaks of
        // A-labels only).
        let domain = match hickory_resolver::proto::rr::Name::from_utf8(domain) {
            Ok(name) => name.to_ascii(),
            Err(_) => return Lookup::NoPolicy,
        };
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        if !is_domain(&domain) {
            return Lookup::NoPolicy;
        }
        let cached = self.cached_entry(&domain, unix_now());
        if cached.is_none() && self.known_absent(&domain) {
            return Lookup::NoPolicy;
        }
        let txt = match self.inner.dns.txt(&format!("_mta-sts.{domain}")).await {
            Ok(records) => txt_id(&records),
            Err(e) => {
                tracing::debug!(domain, error = %e, cached = cached.is_some(), "MTA-STS TXT lookup failed");
                // A nameserver that times out would otherwise cost every new
                // connection to the domain a DNS timeout: ask again later.
                if cached.is_none() {
                    self.remember_absent_for(&domain, FAILURE_HOLD);
                }
                return cached.map_or(Lookup::NoPolicy, |c| Lookup::from_policy(c.policy));
            }
        };
        let id = match txt {
            Txt::Id(id) => id,
            Txt::Absent | Txt::Invalid(_) => {
                if let Txt::Invalid(why) = &txt {
                    tracing::warn!(domain, why, "ignoring an invalid _mta-sts TXT record");
                }
                // A withdrawn policy is published as mode none (§8.3); a
                // record that merely disappears may be an attacker's doing,
                // so the cached policy holds until it expires.
                if let Some(c) = cached {
                    return Lookup::from_policy(c.policy);
                }
                self.remember_absent(&domain);
                return Lookup::NoPolicy;
            }
        };
        match cached {
            Some(c) if c.policy.id == id => {
                if c.refresh_due(unix_now()) {
                    self.spawn_refresh(&domain, &id);
                }
                Lookup::from_policy(c.policy)
            }
            // The failure was logged by the fetch, with the cached policy
            // that stays in force.
            Some(c) => match self.fetch_shared(&domain, &id).await {
                Ok(policy) => Lookup::from_policy(policy),
                Err(_) => Lookup::from_policy(c.policy),
            },
            None => match self.fetch_shared(&domain, &id).await {
                Ok(policy) => Lookup::from_policy(policy),
                Err(e) => Lookup::Failed {
                    result_type: e.result_type,
                    detail: e.detail,
                },
            },
        }
    }

    /// Policies in the cache, expired ones not counted.
    pub fn cached(&self) -> usize {
        let now = unix_now();
        self.lock()
            .policies
            .values()
            .filter(|e| e.expires_at > now)
            .count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The unexpired cached policy of `domain`; an expired one is dropped
    /// (from the file at its next write).
    fn cached_entry(&self, domain: &str, now: u64) -> Option<Entry> {
        let mut state = self.lock();
        match state.policies.get(domain) {
            Some(e) if e.expires_at > now => Some(e.clone()),
            Some(_) => {
                state.policies.remove(domain);
                None
            }
            None => None,
        }
    }

    fn known_absent(&self, domain: &str) -> bool {
        let mut state = self.lock();
        match state.absent.get(domain) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                state.absent.remove(domain);
                false
            }
            None => false,
        }
    }

    fn remember_absent(&self, domain: &str) {
        self.remember_absent_for(domain, self.inner.negative_cache);
    }

    fn remember_absent_for(&self, domain: &str, how_long: Duration) {
        let until = Instant::now() + how_long;
        self.lock().absent.insert(domain.to_string(), until);
    }

    /// Fetches `domain`'s policy for `id` in the background, unless a
    /// fetch is under way or failed lately.
    fn spawn_refresh(&self, domain: &str, id: &str) {
        {
            let state = self.lock();
            if state.fetching.contains_key(domain)
                || state
                    .failed
                    .get(domain)
                    .is_some_and(|f| f.id == id && f.until > Instant::now())
            {
                return;
            }
        }
        let this = self.clone();
        let (domain, id) = (domain.to_string(), id.to_string());
        tokio::spawn(async move {
            let _ = this.fetch_shared(&domain, &id).await;
        });
    }

    /// One fetch per domain at a time: later callers wait for the first
    /// one's result. A fetch of the same id that failed within
    /// [`FAILURE_HOLD`] is not repeated.
    async fn fetch_shared(&self, domain: &str, id: &str) -> Fetched {
        let cell = {
            let mut state = self.lock();
            if let Some(f) = state.failed.get(domain)
                && f.id == id
                && f.until > Instant::now()
            {
                return Err(f.error.clone());
            }
            state
                .fetching
                .entry(domain.to_string())
                .or_default()
                .clone()
        };
        let result = cell
            .get_or_init(|| self.fetch_and_store(domain, id))
            .await
            .clone();
        let mut state = self.lock();
        if state
            .fetching
            .get(domain)
            .is_some_and(|c| Arc::ptr_eq(c, &cell))
        {
            state.fetching.remove(domain);
        }
        result
    }

    async fn fetch_and_store(&self, domain: &str, id: &str) -> Fetched {
        let result = match self.fetch_text(domain).await {
            Ok(text) => Policy::parse(&text, id).map_err(|e| {
                FetchError::invalid(format!("the policy of {domain} is not valid: {e}"))
            }),
            Err(e) => Err(e),
        };
        match result {
            Ok(policy) => {
                let policy = Arc::new(policy);
                tracing::info!(
                    domain,
                    id,
                    mode = policy.mode.as_str(),
                    max_age = policy.max_age,
                    mx = ?policy.mx,
                    "fetched MTA-STS policy"
                );
                {
                    let mut state = self.lock();
                    state.failed.remove(domain);
                    state.absent.remove(domain);
                    state
                        .policies
                        .insert(domain.to_string(), Entry::new(policy.clone(), unix_now()));
                }
                self.persist().await;
                Ok(policy)
            }
            Err(error) => {
                let cached = self.cached_entry(domain, unix_now());
                match &cached {
                    Some(c) => tracing::warn!(
                        domain,
                        id,
                        result_type = error.result_type,
                        detail = %error.detail,
                        cached_id = %c.policy.id,
                        cached_until = %crate::clock::rfc3339(c.expires_at),
                        "cannot fetch MTA-STS policy; the cached one stays in force"
                    ),
                    None => tracing::warn!(
                        domain,
                        id,
                        result_type = error.result_type,
                        detail = %error.detail,
                        "cannot fetch MTA-STS policy; delivering as without one"
                    ),
                }
                self.lock().failed.insert(
                    domain.to_string(),
                    Failure {
                        id: id.to_string(),
                        until: Instant::now() + FAILURE_HOLD,
                        error: error.clone(),
                    },
                );
                Err(error)
            }
        }
    }

    /// The policy text of `domain`, within `fetch_timeout`.
    async fn fetch_text(&self, domain: &str) -> Result<String, FetchError> {
        let host = format!("mta-sts.{domain}");
        let timeout = self.inner.fetch_timeout;
        match tokio::time::timeout(timeout, self.get_policy(&host)).await {
            Ok(result) => result,
            Err(_) => Err(FetchError::fetch(format!(
                "no policy from {host} within {timeout:?}"
            ))),
        }
    }

    /// RFC 8461 §3.3: GET over HTTPS with a certificate valid for `host`,
    /// redirects not followed, only 200 with `text/plain`.
    async fn get_policy(&self, host: &str) -> Result<String, FetchError> {
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| FetchError::fetch(format!("{host} is not a host name: {e}")))?;
        let ips = self
            .inner
            .dns
            .ips(host)
            .await
            .map_err(|e| FetchError::fetch(e.to_string()))?;
        let port = self.inner.port.load(Ordering::Relaxed);
        let mut tcp = None;
        let mut last_error = format!("{host} has no address");
        for ip in ips {
            let addr = SocketAddr::new(ip, port);
            match tokio::net::TcpStream::connect(addr).await {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last_error = format!("cannot connect to {host} at {addr}: {e}"),
            }
        }
        let tcp = tcp.ok_or_else(|| FetchError::fetch(last_error))?;
        let tls = self
            .inner
            .tls
            .connect(name, tcp)
            .await
            .map_err(|e| tls_failure(host, &e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| FetchError::fetch(format!("HTTP with {host}: {e}")))?;
        let _conn = AbortOnDrop(tokio::spawn(conn));
        let authority = if port == 443 {
            host.to_string()
        } else {
            format!("{host}:{port}")
        };
        let req = Request::get(WELL_KNOWN)
            .header(header::HOST, authority)
            .header(
                header::USER_AGENT,
                concat!("herald/", env!("CARGO_PKG_VERSION")),
            )
            .body(String::new())
            .map_err(|e| FetchError::fetch(format!("bad request: {e}")))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| FetchError::fetch(format!("HTTP with {host}: {e}")))?;
        let url = format!("https://{host}{WELL_KNOWN}");
        let status = resp.status();
        if status.is_redirection() {
            let to = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("nowhere");
            return Err(FetchError::fetch(format!(
                "{url} answered {status}, a redirect to {to}, which RFC 8461 §3.3 forbids following"
            )));
        }
        if status != StatusCode::OK {
            return Err(FetchError::fetch(format!("{url} answered {status}")));
        }
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let media_type = content_type.split(';').next().unwrap_or("").trim();
        if !media_type.eq_ignore_ascii_case("text/plain") {
            return Err(FetchError::invalid(format!(
                "{url} is served as {content_type:?}, not text/plain"
            )));
        }
        let too_big = || FetchError::invalid(format!("{url} is over {MAX_POLICY_BYTES} bytes"));
        if resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .is_some_and(|len| len > MAX_POLICY_BYTES as u64)
        {
            return Err(too_big());
        }
        let mut body = resp.into_body();
        let mut text = Vec::new();
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            let frame = frame.map_err(|e| FetchError::fetch(format!("reading {url}: {e}")))?;
            if let Ok(data) = frame.into_data() {
                if text.len() + data.len() > MAX_POLICY_BYTES {
                    return Err(too_big());
                }
                text.extend_from_slice(&data);
            }
        }
        String::from_utf8(text).map_err(|_| FetchError::invalid(format!("{url} is not UTF-8")))
    }

    /// Writes the cache file; a failure is logged, and the policies stay
    /// cached in memory.
    async fn persist(&self) {
        let this = self.clone();
        let result = tokio::task::spawn_blocking(move || this.write_cache()).await;
        let error = match result {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        tracing::warn!(path = %self.inner.cache_file.display(), error, "cannot write the MTA-STS policy cache");
    }

    fn write_cache(&self) -> io::Result<()> {
        let _writing = self
            .inner
            .writing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Taken under the write lock, so the last write holds the latest state.
        let now = unix_now();
        let mut policies: Vec<Stored> = self
            .lock()
            .policies
            .iter()
            .filter(|(_, e)| e.expires_at > now)
            .map(|(domain, e)| Stored {
                domain: domain.clone(),
                id: e.policy.id.clone(),
                policy: (*e.policy).clone(),
                fetched_at: e.fetched_at,
                expires_at: e.expires_at,
            })
            .collect();
        if let Some(m) = self.inner.metrics.get() {
            m.mta_sts_cached
                .store(policies.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        policies.sort_by(|a, b| a.domain.cmp(&b.domain));
        let file = CacheFile {
            version: CACHE_VERSION,
            policies,
        };
        let json = serde_json::to_vec_pretty(&file).map_err(io::Error::other)?;
        write_atomically(&self.inner.cache_file, &json)
    }
}

/// Aborts the HTTP connection task when the fetch ends or is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<Result<(), hyper::Error>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A certificate the trust anchors reject is `sts-webpki-invalid`; any
/// other TLS failure is a fetch error.
fn tls_failure(host: &str, e: &io::Error) -> FetchError {
    let certificate = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|r| {
            matches!(
                r,
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
            )
        });
    if certificate {
        FetchError {
            result_type: WEBPKI_INVALID,
            detail: format!("the certificate of {host} is not valid: {e}"),
        }
    } else {
        FetchError::fetch(format!("TLS with {host}: {e}"))
    }
}

/// The cache file.
#[derive(Serialize, Deserialize)]
struct CacheFile {
    version: u32,
    policies: Vec<Stored>,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    domain: String,
    id: String,
    policy: Policy,
    fetched_at: u64,
    expires_at: u64,
}

/// The unexpired policies in the cache file. A missing file is an empty
/// cache; a damaged one is logged and ignored: policies are fetched again.
fn load_cache(path: &Path, now: u64) -> HashMap<String, Entry> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return HashMap::new(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the MTA-STS policy cache; starting without it");
            return HashMap::new();
        }
    };
    let file: CacheFile = match serde_json::from_slice(&bytes) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "damaged MTA-STS policy cache ignored");
            return HashMap::new();
        }
    };
    if file.version != CACHE_VERSION {
        tracing::warn!(path = %path.display(), version = file.version, "MTA-STS policy cache of an unknown version ignored");
        return HashMap::new();
    }
    let mut policies = HashMap::new();
    for s in file.policies {
        let domain = s.domain.trim_end_matches('.').to_ascii_lowercase();
        if !is_domain(&domain) || s.id != s.policy.id {
            tracing::warn!(path = %path.display(), domain = %s.domain, "skipping a damaged MTA-STS cache entry");
            continue;
        }
        // Recomputed, so an edited file cannot stretch a policy's life.
        let entry = Entry::new(Arc::new(s.policy), s.fetched_at);
        if entry.expires_at > now && entry.fetched_at <= now + DAY {
            policies.insert(domain, entry);
        }
    }
    policies
}

/// Temp file, fsync, rename, fsync of the directory: the file is always
/// either the old or the new whole.
fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 8461 §3.2's example.
    const EXAMPLE: &str = "version: STSv1\nmode: enforce\nmx: mail.example.com\nmx: *.example.net\nmx: backupmx.example.com\nmax_age: 604800\n";

    #[test]
    fn parses_the_rfc_example() {
        let p = Policy::parse(EXAMPLE, "20160831085700Z").unwrap();
        assert_eq!(
            p,
            Policy {
                id: "20160831085700Z".into(),
                mode: Mode::Enforce,
                mx: vec![
                    "mail.example.com".into(),
                    "*.example.net".into(),
                    "backupmx.example.com".into()
                ],
                max_age: 604800,
            }
        );
    }

    #[test]
    fn parses_crlf_blank_lines_spaces_unknown_keys_and_case() {
        let text = "VERSION: stsv1\r\nmode:testing \r\n\r\nMX:\tMX1.Example.COM.\r\nfuture_key.v2: some-value\r\nmax_age: 86400";
        let p = Policy::parse(text, "1").unwrap();
        assert_eq!(p.mode, Mode::Testing);
        assert_eq!(p.mx, vec!["mx1.example.com"]);
        assert_eq!(p.max_age, 86400);
    }

    #[test]
    fn mode_none_needs_no_mx() {
        let p = Policy::parse("version: STSv1\nmode: none\nmax_age: 86400\n", "1").unwrap();
        assert_eq!(p.mode, Mode::None);
        assert!(p.mx.is_empty());
        assert!(!p.allows_mx("mx.example.com"));
    }

    #[test]
    fn max_age_limit_is_accepted() {
        let text =
            format!("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: {MAX_AGE_LIMIT}\n");
        assert_eq!(Policy::parse(&text, "1").unwrap().max_age, MAX_AGE_LIMIT);
    }

    #[test]
    fn malformed_policies_are_refused_naming_the_line() {
        let v = "version: STSv1\n";
        let body = "mode: enforce\nmx: mx.example.com\nmax_age: 86400\n";
        let cases: Vec<(String, &str)> = vec![
            (String::new(), "the policy is empty"),
            ("\n\n".into(), "the policy is empty"),
            (body.into(), "line 1: a policy must begin"),
            (
                format!("mode: enforce\n{v}mx: a.example\nmax_age: 1\n"),
                "line 1: a policy must begin",
            ),
            (
                format!("version: STSv2\n{body}"),
                "line 1: version \"STSv2\"",
            ),
            (format!("{v}{v}{body}"), "line 2: version is given twice"),
            (
                format!("{v}mode enforce\n"),
                "line 2: expected \"key: value\"",
            ),
            (
                format!("{v}mode : enforce\n"),
                "line 2: \"mode \" is not a valid key",
            ),
            (format!("{v}: enforce\n"), "line 2: \"\" is not a valid key"),
            (format!("{v}mode:\n"), "line 2: mode has no value"),
            (
                format!("{v}mode: strict\nmx: a.example\nmax_age: 1\n"),
                "line 2: mode \"strict\"",
            ),
            (
                format!("{v}mode: enforce\nmode: none\nmx: a.example\nmax_age: 1\n"),
                "line 3: mode is given twice",
            ),
            (
                format!("{v}mode: enforce\nmx: a.example\nmax_age: 31557601\n"),
                "line 4: max_age 31557601 is more than",
            ),
            (
                format!("{v}mode: enforce\nmx: a.example\nmax_age: -1\n"),
                "line 4: max_age \"-1\" is not a number",
            ),
            (
                format!("{v}mode: enforce\nmx: a.example\nmax_age: 12345678901\n"),
                "line 4: max_age \"12345678901\"",
            ),
            (
                format!("{v}mode: enforce\nmx: a.example\nmax_age: 1d\n"),
                "line 4: max_age \"1d\"",
            ),
            (
                format!("{v}mode: enforce\nmx: a.example\nmax_age: 60\nmax_age: 60\n"),
                "line 5: max_age is given twice",
            ),
            (
                format!("{v}mode: enforce\nmx: mx.*.example\nmax_age: 1\n"),
                "line 3: mx \"mx.*.example\"",
            ),
            (
                format!("{v}mode: enforce\nmx: *\nmax_age: 1\n"),
                "line 3: mx \"*\"",
            ),
            (
                format!("{v}mode: enforce\nmx: -mx.example\nmax_age: 1\n"),
                "line 3: mx \"-mx.example\"",
            ),
            (
                format!("{v}mode: enforce\nmx: mx..example\nmax_age: 1\n"),
                "line 3: mx \"mx..example\"",
            ),
            (
                format!("{v}mode: enforce\nmx: mx_1.example\nmax_age: 1\n"),
                "line 3: mx \"mx_1.example\"",
            ),
            (
                format!("{v}mode: enforce\nmx: mx.example and more\nmax_age: 1\n"),
                "line 3: the value of mx holds",
            ),
            (
                format!("{v}mode: enforce\nmx: a.example\rmax_age: 1\n"),
                "line 3: the value of mx holds",
            ),
            (
                format!("{v}mode: enforce\nmx: a.example\nmax_age: 1\nnote: a=b\n"),
                "line 5: the value of note holds",
            ),
            (
                format!("{v}mode: enforce\nmx: a.example\nmax_age: 1\n_x: y\n"),
                "line 5: \"_x\" is not a valid key",
            ),
            (
                format!("{v}mode: enforce\nmx: m\u{e9}l.example\nmax_age: 1\n"),
                "line 3: the value of mx holds",
            ),
            (
                format!("{v}mx: a.example\nmax_age: 1\n"),
                "the policy has no mode",
            ),
            (
                format!("{v}mode: enforce\nmx: a.example\n"),
                "the policy has no max_age",
            ),
            (
                format!("{v}mode: enforce\nmax_age: 1\n"),
                "the policy names no mx",
            ),
            (
                format!("{v}mode: testing\nmax_age: 1\n"),
                "the policy names no mx",
            ),
        ];
        for (text, want) in cases {
            let err = Policy::parse(&text, "1").expect_err(&text);
            assert!(
                err.starts_with(want),
                "{text:?}: got {err:?}, want {want:?}"
            );
        }
    }

    #[test]
    fn key_syntax_follows_the_abnf() {
        assert!(valid_key("max_age"));
        assert!(valid_key(&"a".repeat(63)));
        assert!(valid_key(&format!("{}{}", "a".repeat(32), "_".repeat(31))));
        assert!(!valid_key(&format!("{}{}", "a".repeat(32), "_".repeat(32))));
        assert!(!valid_key(&format!("a{}", "_".repeat(32))));
        assert!(!valid_key("-a"));
        assert!(!valid_key(""));
    }

    fn policy(mx: &[&str]) -> Policy {
        Policy {
            id: "1".into(),
            mode: Mode::Enforce,
            mx: mx.iter().map(|m| m.to_string()).collect(),
            max_age: 86400,
        }
    }

    #[test]
    fn mx_patterns_match_as_section_4_1_says() {
        let p = policy(&["mail.example.com", "*.example.net"]);
        // Any text as a host name: no panic at a multi-byte character.
        for host in ["é.example.net", "aé.example.net", "€", "x.éxample.net"] {
            let _ = p.allows_mx(host);
        }
        for host in [
            "mail.example.com",
            "MAIL.Example.COM",
            "mail.example.com.",
            "mx1.example.net",
            "MX1.EXAMPLE.NET.",
        ] {
            assert!(p.allows_mx(host), "{host} should match");
        }
        for host in [
            "example.com",
            "mail2.example.com",
            "mail.example.com.evil",
            "evilmail.example.com",
            // The wildcard covers exactly one label.
            "example.net",
            "a.b.example.net",
            ".example.net",
            "mx1example.net",
            "",
        ] {
            assert!(!p.allows_mx(host), "{host} should not match");
        }
        // Patterns given with a trailing dot or in capitals still match.
        assert!(policy(&["*.Example.Org."]).allows_mx("mx.example.org"));
        assert!(!policy(&[]).allows_mx("mx.example.org"));
    }

    #[test]
    fn txt_records_give_one_id() {
        let t = |r: &[&str]| txt_id(&r.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        // RFC 8461 §3.1's example.
        assert_eq!(
            t(&["v=STSv1; id=20160831085700Z;"]),
            Txt::Id("20160831085700Z".into())
        );
        assert_eq!(t(&["v=STSv1;id=abc"]), Txt::Id("abc".into()));
        assert_eq!(t(&["v=STSv1 ; id=abc ; ext=1;"]), Txt::Id("abc".into()));
        assert_eq!(t(&["v=spf1 -all", "v=STSv1; id=2;"]), Txt::Id("2".into()));
        assert_eq!(t(&[]), Txt::Absent);
        assert_eq!(t(&["v=spf1 -all"]), Txt::Absent);
        assert_eq!(t(&["v=STSv10; id=1"]), Txt::Absent);
        // Not at the start: discarded.
        assert_eq!(t(&["id=1; v=STSv1;"]), Txt::Absent);
        for bad in [
            &["v=STSv1; id=1;", "v=STSv1; id=2;"][..],
            &["v=STSv1"],
            &["v=STSv1;"],
            &["v=STSv1 id=1"],
            &["v=STSv1; id=;"],
            &["v=STSv1; id=a-b;"],
            &["v=STSv1; id=123456789012345678901234567890123;"],
            &["v=STSv1; id=1; id=2;"],
            &["v=STSv1; id=1; junk"],
            &["v=STSv1; ID=1;"],
        ] {
            assert!(matches!(t(bad), Txt::Invalid(_)), "{bad:?}: {:?}", t(bad));
        }
    }

    #[test]
    fn refresh_starts_in_the_last_quarter_or_the_last_day() {
        let year = Entry::new(
            Arc::new(Policy {
                max_age: 364 * DAY,
                ..policy(&["a.example"])
            }),
            0,
        );
        assert!(!year.refresh_due(272 * DAY));
        assert!(year.refresh_due(274 * DAY));
        let week = Entry::new(
            Arc::new(Policy {
                max_age: 7 * DAY,
                ..policy(&["a.example"])
            }),
            0,
        );
        // A quarter of a week is 42 hours: more than a day.
        assert!(!week.refresh_due(5 * DAY));
        assert!(week.refresh_due(5 * DAY + 7 * 3600));
        let two_days = Entry::new(
            Arc::new(Policy {
                max_age: 2 * DAY,
                ..policy(&["a.example"])
            }),
            0,
        );
        assert!(!two_days.refresh_due(DAY - 1));
        assert!(two_days.refresh_due(DAY + 1));
        // A short life is not refetched at once.
        let hour = Entry::new(
            Arc::new(Policy {
                max_age: 3600,
                ..policy(&["a.example"])
            }),
            0,
        );
        assert!(!hour.refresh_due(60));
        assert!(hour.refresh_due(1801));
    }

    fn no_dns() -> Dns {
        Dns::new(&crate::config::DnsConfig {
            nameservers: vec!["127.0.0.1:9".into()],
            ..Default::default()
        })
        .unwrap()
    }

    fn new_cache(path: &Path) -> MtaSts {
        MtaSts::new(&MtaStsConfig::default(), no_dns(), path.to_path_buf()).unwrap()
    }

    #[tokio::test]
    async fn cache_is_written_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mta-sts-cache.json");
        let sts = new_cache(&path);
        assert_eq!(sts.cached(), 0);
        let now = unix_now();
        let p = Arc::new(Policy::parse(EXAMPLE, "abc").unwrap());
        sts.lock()
            .policies
            .insert("example.com".into(), Entry::new(p.clone(), now));
        sts.persist().await;
        assert!(!path.with_extension("json.tmp").exists());

        let again = new_cache(&path);
        assert_eq!(again.cached(), 1);
        let entry = again.cached_entry("example.com", now).unwrap();
        assert_eq!(*entry.policy, *p);
        assert_eq!(entry.fetched_at, now);
        assert_eq!(entry.expires_at, now + 604800);
    }

    #[tokio::test]
    async fn expired_and_damaged_entries_are_dropped_on_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mta-sts-cache.json");
        let now = unix_now();
        let stored = |domain: &str, id: &str, fetched_at: u64, max_age: u64| Stored {
            domain: domain.into(),
            id: id.into(),
            policy: Policy {
                id: "1".into(),
                max_age,
                ..policy(&["mx.example"])
            },
            fetched_at,
            // Ignored on load: recomputed from max_age.
            expires_at: u64::MAX,
        };
        let file = CacheFile {
            version: CACHE_VERSION,
            policies: vec![
                stored("fresh.example", "1", now - 10, 3600),
                stored("expired.example", "1", now - 7200, 3600),
                stored("mismatch.example", "2", now, 3600),
                stored("bad domain", "1", now, 3600),
                stored("future.example", "1", now + 10 * DAY, 3600),
            ],
        };
        std::fs::write(&path, serde_json::to_vec(&file).unwrap()).unwrap();
        let sts = new_cache(&path);
        assert_eq!(sts.cached(), 1);
        assert!(sts.cached_entry("fresh.example", now).is_some());
        // Expiry while running: the entry is no longer offered.
        assert!(sts.cached_entry("fresh.example", now + 3600).is_none());
        assert_eq!(sts.cached(), 0);
    }

    #[tokio::test]
    async fn a_damaged_cache_file_does_not_block_startup() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mta-sts-cache.json");
        for junk in [
            &b"{\"version\":1,\"policies\":[{\"dom"[..],
            b"\xff\xfe",
            b"{\"version\":9,\"policies\":[]}",
        ] {
            std::fs::write(&path, junk).unwrap();
            assert_eq!(new_cache(&path).cached(), 0);
        }
    }

    #[tokio::test]
    async fn disabled_looks_nothing_up() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = MtaStsConfig {
            enabled: false,
            ..MtaStsConfig::default()
        };
        let sts = MtaSts::new(&cfg, no_dns(), dir.path().join("c.json")).unwrap();
        assert!(matches!(sts.lookup("example.com").await, Lookup::NoPolicy));
    }
}
