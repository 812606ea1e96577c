//! Would this message pass DMARC at the receiver? Checked before it is
//! accepted, from the From: domain's published records and herald's own
//! keys, sending IPs and return-path domain (RFC 7489 §3.1, §4.2; the
//! DMARCbis DNS tree walk, RFC 9989 §4.10, as mail-auth 0.13.3 does it).
//!
//! DMARC passes when one of two identifiers passes *and* aligns with the
//! From: domain:
//! - DKIM: herald signs with a key whose `d=` aligns with the From: domain
//!   (the same domain; relaxed: the same organizational domain) and DNS
//!   publishes that key's public half at `selector._domainkey.d`.
//! - SPF: the return-path domain aligns with the From: domain (relaxed
//!   unless the DMARC record says `aspf=s`) and its SPF policy authorises
//!   every one of herald's sending IPs (`Config::sending_ips`). SPF is
//!   evaluated by mail-auth's verifier (include, redirect, a, mx, ip4,
//!   ip6, macros, the 10-lookup limit).
//!
//! The DMARC records and the organizational domain come from
//! [`super::dmarc`] (the DNS tree walk over `_dmarc` records, as mail-auth's
//! DMARC verifier does it), which `herald domain check` reads too.
//!
//! Trust: the domains come from the message (untrusted) but are only used
//! as DNS names. A lookup that fails temporarily (timeout, SERVFAIL,
//! REFUSED) gives [`AlignmentVerdict::Unknown`], which never rejects nor
//! defers: herald's resolver having trouble says nothing about what the
//! receiver will see, and invoices must not stop because of it.
//!
//! Cost: verdicts are cached per (From: domain, return-path domain, signing
//! keys) for the records' TTL (bounded by `min_ttl`/`max_ttl`); a cached
//! verdict costs a hash, one short mutex hold and an `Arc` clone.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{MessageAuthenticator, Parameters, ResolverCache, SpfResult};
use tokio::sync::OnceCell;

use super::Verdict;
use super::dkim::{self, Key, Published, Signer};
use super::dmarc::{Mode, Policy, applied_policy, in_domain, organizational_domain};
use crate::config::Config;
pub use crate::config::dmarc::{DmarcAction, DmarcConfig};
use crate::dns::Dns;
use crate::reply::{Enhanced, Reply};

// ---------------------------------------------------------------------------
// Verdicts.

/// Would the message pass DMARC at the receiver? Cheap to clone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AlignmentVerdict {
    /// DKIM or SPF passes aligned.
    Pass,
    /// The From: domain publishes no DMARC record, or `p=none`.
    NotEnforced,
    /// DMARC would fail at a domain with `p=quarantine` or `p=reject`.
    WouldFail(Arc<Failure>),
    /// Could not tell: DNS trouble, or DKIM fails and SPF cannot be judged
    /// (no sending IPs configured). Never a reason to refuse mail.
    Unknown(Arc<str>),
    /// `[policy.dmarc] action = "off"`, or no From: domain to check.
    Skipped,
}

/// The policy a failing domain publishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmarcPolicy {
    Quarantine,
    Reject,
}

impl fmt::Display for DmarcPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DmarcPolicy::Quarantine => "p=quarantine",
            DmarcPolicy::Reject => "p=reject",
        })
    }
}

/// Why DMARC would fail, and what to publish to make it pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The From: domain.
    pub domain: String,
    /// Where the DMARC record applied was found (the From: domain or its
    /// organizational domain).
    pub policy_domain: String,
    pub policy: DmarcPolicy,
    pub dkim: DkimFailure,
    pub spf: SpfFailure,
    /// Records that would make DMARC pass (any one of them is enough when
    /// the other identifier's problem is fixed alike).
    pub fixes: Vec<Fix>,
}

/// Why DKIM does not pass aligned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DkimFailure {
    /// herald has no key for the From: domain (nor for its organizational
    /// domain in relaxed mode); `signs_as` is the domain it would sign as.
    NoKey { signs_as: Option<String> },
    /// herald's aligned keys are not usable by the receiver.
    Keys(Vec<KeyProblem>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyProblem {
    /// `selector._domainkey.domain`.
    pub name: String,
    pub problem: KeyState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyState {
    NotPublished,
    /// Published with an empty `p=`.
    Revoked,
    /// DNS publishes another key.
    Mismatch,
}

/// Why SPF does not pass aligned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpfFailure {
    /// The return-path domain is not the From: domain (strict) or not in
    /// its organizational domain (relaxed).
    NotAligned {
        return_path_domain: String,
        strict: bool,
    },
    /// The return-path domain's SPF does not authorise these sending IPs;
    /// each with mail-auth's SPF result (`fail`, `softfail`, `none`...).
    NotAuthorised {
        return_path_domain: String,
        ips: Vec<(IpAddr, &'static str)>,
    },
}

/// A TXT record to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fix {
    /// Where: `selector._domainkey.domain` or the return-path domain.
    pub name: String,
    /// The TXT record's text.
    pub record: String,
}

impl Failure {
    fn dkim_text(&self) -> String {
        dkim_text(&self.domain, &self.dkim)
    }

    fn spf_text(&self) -> String {
        spf_text(&self.domain, &self.spf)
    }

    /// The explanation, one sentence per line.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![
            format!(
                "{} would fail DMARC at the receiver: {} publishes {}",
                self.domain, self.policy_domain, self.policy
            ),
            format!("DKIM fails: {}", self.dkim_text()),
            format!("SPF fails: {}", self.spf_text()),
        ];
        for (i, fix) in self.fixes.iter().enumerate() {
            out.push(format!(
                "{} TXT at {}: {}",
                if i == 0 { "Publish" } else { "or publish" },
                fix.name,
                fix.record
            ));
        }
        out
    }
}

fn dkim_text(domain: &str, f: &DkimFailure) -> String {
    match f {
        DkimFailure::NoKey { signs_as } => {
            let mut s = format!("herald has no DKIM key for {}", domain);
            if let Some(d) = signs_as {
                s.push_str(&format!(" (it signs as {d}, which does not align)"));
            }
            s.push_str(&format!(
                "; create one with `herald dkim keygen --domain {domain} --selector herald1`, add it as a [[dkim]] key and publish the record it prints"
            ));
            s
        }
        DkimFailure::Keys(problems) => problems
            .iter()
            .map(|p| match p.problem {
                KeyState::NotPublished => format!("key {} is not published in DNS", p.name),
                KeyState::Revoked => format!("key {} is revoked in DNS (empty p=)", p.name),
                KeyState::Mismatch => {
                    format!("DNS publishes another key at {}", p.name)
                }
            })
            .collect::<Vec<_>>()
            .join(", "),
    }
}

fn spf_text(domain: &str, f: &SpfFailure) -> String {
    match f {
        SpfFailure::NotAligned {
            return_path_domain,
            strict,
        } => format!(
            "return path {return_path_domain} does not align with {}{}",
            domain,
            if *strict { " (aspf=s)" } else { "" }
        ),
        SpfFailure::NotAuthorised {
            return_path_domain,
            ips,
        } => format!(
            "SPF of {return_path_domain} does not authorise {}",
            ips.iter()
                .map(|(ip, r)| format!("{ip} ({r})"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.lines().join("; "))
    }
}

/// Reply lines are at most 512 octets with the code (RFC 5321 §4.5.3.1.5);
/// "550-5.7.26 " takes 11.
const MAX_REPLY_TEXT: usize = 490;

fn reply_text(first: &str, lines: &[String]) -> String {
    let mut out: Vec<&str> = vec![first];
    for line in lines {
        let mut rest = line.as_str();
        while rest.len() > MAX_REPLY_TEXT {
            let mut cut = MAX_REPLY_TEXT;
            while !rest.is_char_boundary(cut) {
                cut -= 1;
            }
            out.push(&rest[..cut]);
            rest = &rest[cut..];
        }
        out.push(rest);
    }
    out.join("\n")
}

/// Maps a verdict to what the session does under `action`: a reply to
/// refuse or defer the message with, and/or a warning to log and put in
/// the `received` event. `Unknown` only ever warns, whatever the action
/// (a reject is never made from DNS trouble, and deferring every message
/// while herald's own resolver struggles would stop mail for nothing).
pub fn verdict_for(action: DmarcAction, v: &AlignmentVerdict) -> (Option<Verdict>, Option<String>) {
    if action == DmarcAction::Off {
        return (None, None);
    }
    match v {
        AlignmentVerdict::Pass | AlignmentVerdict::NotEnforced | AlignmentVerdict::Skipped => {
            (None, None)
        }
        AlignmentVerdict::Unknown(reason) => (None, Some(format!("DMARC check: {reason}"))),
        AlignmentVerdict::WouldFail(f) => match action {
            DmarcAction::Reject => (
                Some(Verdict::Reject {
                    reply: Reply::new(
                        550,
                        Enhanced(5, 7, 26),
                        reply_text("Message refused: it would fail DMARC", &f.lines()),
                    ),
                    rule: crate::event::RejectRule::Dmarc,
                }),
                None,
            ),
            DmarcAction::Defer => (
                Some(Verdict::Tempfail {
                    reply: Reply::new(
                        451,
                        Enhanced(4, 7, 26),
                        reply_text(
                            "Message deferred: it would fail DMARC; try again once DNS is fixed",
                            &f.lines(),
                        ),
                    ),
                    rule: crate::event::RejectRule::Dmarc,
                }),
                None,
            ),
            DmarcAction::Warn | DmarcAction::Off => (None, Some(f.to_string())),
        },
    }
}

// ---------------------------------------------------------------------------
// The checker.

/// Checks DMARC alignment for messages, with a verdict cache.
pub struct Alignment {
    cfg: DmarcConfig,
    auth: MessageAuthenticator,
    dns: Dns,
    dkim: Arc<Signer>,
    sending_ips: Vec<IpAddr>,
    helo: String,
    hasher: RandomState,
    cache: Mutex<HashMap<u64, Entry>>,
    /// Checks being made now, so that messages arriving together for a
    /// domain not yet cached wait for one set of lookups.
    inflight: Mutex<HashMap<InflightKey, Arc<OnceCell<AlignmentVerdict>>>>,
    /// Uncached checks made (each one asks DNS).
    evaluations: AtomicU64,
}

/// (From: domain, return-path domain, signing key indices), lower case.
type InflightKey = (Box<str>, Box<str>, Box<[usize]>);

struct Entry {
    from: Box<str>,
    return_path: Box<str>,
    keys: Box<[usize]>,
    verdict: AlignmentVerdict,
    expires: Instant,
}

/// Logged once at start: what the check cannot judge with this config.
pub fn warn_unjudged(config: &Config) {
    if config.policy.dmarc.action != DmarcAction::Off && config.sending_ips().is_empty() {
        tracing::warn!(
            "DMARC check: SPF cannot be judged because neither [delivery] public_ips nor source_ips is set; only DKIM alignment is checked"
        );
    }
}

impl Alignment {
    /// mail-auth evaluates SPF and reads DMARC records through `dns`'s own
    /// resolver, so tests' `[dns] nameservers` apply to it too.
    pub fn new(config: &Config, dns: &Dns, dkim: Arc<Signer>) -> Alignment {
        let sending_ips = config.sending_ips().to_vec();
        let cfg = config.policy.dmarc.clone();
        Alignment {
            cfg,
            auth: MessageAuthenticator(dns.resolver().clone()),
            dns: dns.clone(),
            dkim,
            sending_ips,
            helo: config.helo_name().to_ascii_lowercase(),
            hasher: RandomState::new(),
            cache: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            evaluations: AtomicU64::new(0),
        }
    }

    pub fn action(&self) -> DmarcAction {
        self.cfg.action
    }

    /// See [`verdict_for`].
    pub fn verdict(&self, v: &AlignmentVerdict) -> (Option<Verdict>, Option<String>) {
        verdict_for(self.cfg.action, v)
    }

    /// Would a message from `tenant` (none: a trusted network) with From:
    /// `from` (the address; a bare domain also works) and this return-path
    /// domain (the VERP domain, or the envelope sender's; empty for a null
    /// sender, which SPF judges by herald's HELO name) pass DMARC?
    pub async fn check(
        &self,
        tenant: Option<&str>,
        from: &str,
        return_path_domain: &str,
    ) -> AlignmentVerdict {
        if self.cfg.action == DmarcAction::Off {
            return AlignmentVerdict::Skipped;
        }
        let from_domain = from
            .rsplit_once('@')
            .map_or(from, |(_, d)| d)
            .trim_end_matches('.');
        if from_domain.is_empty() {
            return AlignmentVerdict::Skipped;
        }
        let keys = if from.contains('@') {
            self.dkim.keys_for(tenant, Some(from))
        } else {
            self.dkim
                .keys_for(tenant, Some(&format!("postmaster@{from_domain}")))
        };
        let rp = return_path_domain.trim_end_matches('.');
        let rp = if rp.is_empty() {
            self.helo.as_str()
        } else {
            rp
        };

        let hash = self.key_hash(from_domain, rp, keys);
        if let Some(v) = self.cached(hash, from_domain, rp, keys) {
            return v;
        }

        let key: InflightKey = (
            from_domain.to_ascii_lowercase().into(),
            rp.to_ascii_lowercase().into(),
            keys.iter().map(|k| k.index).collect(),
        );
        let cell = self
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        let verdict = cell
            .get_or_init(|| self.evaluate_and_store(hash, &key, keys))
            .await
            .clone();
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if inflight.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            inflight.remove(&key);
        }
        verdict
    }

    async fn evaluate_and_store(
        &self,
        hash: u64,
        key: &InflightKey,
        keys: &[Arc<Key>],
    ) -> AlignmentVerdict {
        let (from, rp) = (&*key.0, &*key.1);
        let (verdict, ttl) = self.evaluate(from, rp, keys).await;
        match &verdict {
            AlignmentVerdict::WouldFail(f) => {
                tracing::warn!(domain = %from, return_path = %rp, "DMARC would fail: {f}")
            }
            AlignmentVerdict::Unknown(reason) => {
                tracing::info!(domain = %from, return_path = %rp, "DMARC check undecided: {reason}")
            }
            _ => tracing::debug!(domain = %from, return_path = %rp, ?verdict, "DMARC check"),
        }
        self.store(
            hash,
            Entry {
                from: key.0.clone(),
                return_path: key.1.clone(),
                keys: key.2.clone(),
                verdict: verdict.clone(),
                expires: Instant::now() + ttl,
            },
        );
        verdict
    }

    fn key_hash(&self, from: &str, rp: &str, keys: &[Arc<Key>]) -> u64 {
        let mut h = self.hasher.build_hasher();
        for b in from.bytes() {
            h.write_u8(b.to_ascii_lowercase());
        }
        h.write_u8(0);
        for b in rp.bytes() {
            h.write_u8(b.to_ascii_lowercase());
        }
        h.write_u8(0);
        for k in keys {
            h.write_usize(k.index);
        }
        h.finish()
    }

    fn cached(
        &self,
        hash: u64,
        from: &str,
        rp: &str,
        keys: &[Arc<Key>],
    ) -> Option<AlignmentVerdict> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let e = cache.get(&hash)?;
        let same = e.expires > Instant::now()
            && e.from.eq_ignore_ascii_case(from)
            && e.return_path.eq_ignore_ascii_case(rp)
            && e.keys.iter().copied().eq(keys.iter().map(|k| k.index));
        same.then(|| e.verdict.clone())
    }

    fn store(&self, hash: u64, entry: Entry) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= self.cfg.cache_size && !cache.contains_key(&hash) {
            let now = Instant::now();
            cache.retain(|_, e| e.expires > now);
            // Still full of live entries: drop an arbitrary one (HashMap
            // order is random enough to be fair).
            if cache.len() >= self.cfg.cache_size
                && let Some(k) = cache.keys().next().copied()
            {
                cache.remove(&k);
            }
        }
        cache.insert(hash, entry);
    }

    /// How many checks were not answered from the cache (each asked DNS).
    pub fn evaluations(&self) -> u64 {
        self.evaluations.load(Ordering::Relaxed)
    }

    /// Number of cached verdicts (for tests and metrics).
    pub fn cached_len(&self) -> usize {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The uncached check; returns the verdict and how long to keep it.
    async fn evaluate(
        &self,
        from: &str,
        rp: &str,
        keys: &[Arc<Key>],
    ) -> (AlignmentVerdict, Duration) {
        self.evaluations.fetch_add(1, Ordering::Relaxed);
        let rec = TtlRecorder::default();
        let unknown = |reason: String| {
            (
                AlignmentVerdict::Unknown(reason.into()),
                self.cfg.error_ttl.0,
            )
        };

        // 1. The DMARC record that applies (RFC 9989 §4.10.1).
        let walk = match super::dmarc::walk(&self.auth, from, Some(&rec)).await {
            Ok(w) => w,
            Err(e) => return unknown(format!("cannot read the DMARC record of {from}: {e}")),
        };
        let Some(applied) = applied_policy(&walk, from) else {
            return (AlignmentVerdict::NotEnforced, self.ttl(&rec));
        };
        let policy = match applied.policy {
            Policy::Reject => DmarcPolicy::Reject,
            Policy::Quarantine => DmarcPolicy::Quarantine,
            Policy::None | Policy::Unspecified => {
                return (AlignmentVerdict::NotEnforced, self.ttl(&rec));
            }
        };
        let org = organizational_domain(&walk, from).to_string();

        // 2. DKIM: enough on its own.
        let dkim = self.dkim_state(from, &org, applied.adkim, keys, &rec).await;
        if matches!(dkim, State::Pass) {
            return (AlignmentVerdict::Pass, self.ttl(&rec));
        }
        // 3. SPF.
        let spf = self.spf_state(from, &org, applied.aspf, rp, &rec).await;
        if matches!(spf, State::Pass) {
            return (AlignmentVerdict::Pass, self.ttl(&rec));
        }
        match (dkim, spf) {
            (State::Fail(dkim, dkim_fix), State::Fail(spf, spf_fix)) => {
                let failure = Failure {
                    domain: from.to_string(),
                    policy_domain: applied.domain,
                    policy,
                    dkim,
                    spf,
                    fixes: dkim_fix.into_iter().chain(spf_fix).collect(),
                };
                // Kept briefly: the sender is being told to fix DNS.
                (
                    AlignmentVerdict::WouldFail(Arc::new(failure)),
                    self.cfg.min_ttl.0,
                )
            }
            (dkim, spf) => {
                let dkim_why = match &dkim {
                    State::Fail(f, fix) => {
                        let mut s = format!("DKIM fails: {}", dkim_text(from, f));
                        if let Some(fix) = fix {
                            s.push_str(&format!(" (publish TXT at {}: {})", fix.name, fix.record));
                        }
                        s
                    }
                    State::Unknown(r) | State::Config(r) => format!("DKIM undecided: {r}"),
                    State::Pass => "DKIM passes".into(),
                };
                let spf_why = match &spf {
                    State::Fail(f, _) => format!("SPF fails: {}", spf_text(from, f)),
                    State::Unknown(r) | State::Config(r) => format!("SPF undecided: {r}"),
                    State::Pass => "SPF passes".into(),
                };
                let reason = format!(
                    "cannot tell whether {from} would pass DMARC ({policy} at {}): {dkim_why}; {spf_why}",
                    applied.domain
                );
                // Undecided because of configuration (no sending IPs) is as
                // stable as the records; because of DNS trouble, it is not.
                let ttl = if dkim.is_dns_trouble() || spf.is_dns_trouble() {
                    self.cfg.error_ttl.0
                } else {
                    self.cfg.min_ttl.0
                };
                (AlignmentVerdict::Unknown(reason.into()), ttl)
            }
        }
    }

    /// The cache lifetime of a decided verdict: the shortest TTL of the
    /// records it was made from, within `min_ttl..=max_ttl`.
    fn ttl(&self, rec: &TtlRecorder) -> Duration {
        let left = rec
            .earliest()
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(self.cfg.min_ttl.0);
        left.clamp(self.cfg.min_ttl.0, self.cfg.max_ttl.0)
    }

    /// Whether `domain` aligns with the author domain `author` whose
    /// organizational domain is `org` (RFC 7489 §3.1).
    async fn aligned(
        &self,
        domain: &str,
        author: &str,
        org: &str,
        mode: Mode,
        rec: &TtlRecorder,
    ) -> Result<bool, String> {
        if domain.eq_ignore_ascii_case(author) {
            return Ok(true);
        }
        if mode == Mode::Strict || !in_domain(domain, org) {
            return Ok(false);
        }
        let walk = super::dmarc::walk(&self.auth, domain, Some(rec)).await?;
        Ok(organizational_domain(&walk, domain).eq_ignore_ascii_case(org))
    }

    async fn dkim_state(
        &self,
        from: &str,
        org: &str,
        mode: Mode,
        keys: &[Arc<Key>],
        rec: &TtlRecorder,
    ) -> State<DkimFailure> {
        let mut aligned = Vec::new();
        for key in keys {
            match self.aligned(&key.domain, from, org, mode, rec).await {
                Ok(true) => aligned.push(key),
                Ok(false) => {}
                Err(e) => return State::Unknown(e),
            }
        }
        if aligned.is_empty() {
            let signs_as = keys.first().map(|k| k.domain.clone());
            return State::Fail(DkimFailure::NoKey { signs_as }, None);
        }
        let mut problems = Vec::new();
        let mut fix = None;
        let mut trouble = None;
        for key in aligned {
            let name = key.dns_name();
            let state = match self.dns.txt(&name).await {
                Ok(records) => dkim::compare_published(key.algorithm, &public_of(key), &records),
                Err(e) => Published::Unknown(e.to_string()),
            };
            let problem = match state {
                Published::Matches => return State::Pass,
                Published::Unknown(e) => {
                    trouble.get_or_insert(e);
                    continue;
                }
                Published::Missing => KeyState::NotPublished,
                Published::Revoked => KeyState::Revoked,
                Published::Mismatch => KeyState::Mismatch,
            };
            fix.get_or_insert_with(|| Fix {
                name: name.clone(),
                record: key.txt_record(),
            });
            problems.push(KeyProblem { name, problem });
        }
        match trouble {
            Some(e) => State::Unknown(e),
            None => State::Fail(DkimFailure::Keys(problems), fix),
        }
    }

    async fn spf_state(
        &self,
        from: &str,
        org: &str,
        mode: Mode,
        rp: &str,
        rec: &TtlRecorder,
    ) -> State<SpfFailure> {
        match self.aligned(rp, from, org, mode, rec).await {
            Ok(true) => {}
            Ok(false) => {
                return State::Fail(
                    SpfFailure::NotAligned {
                        return_path_domain: rp.to_string(),
                        strict: mode == Mode::Strict,
                    },
                    None,
                );
            }
            Err(e) => return State::Unknown(e),
        }
        if self.sending_ips.is_empty() {
            return State::Config(
                "no sending IPs are configured ([delivery] public_ips or source_ips)".into(),
            );
        }
        let sender = format!("postmaster@{rp}");
        let mut failing = Vec::new();
        for &ip in &self.sending_ips {
            let params = Parameters::new(SpfParameters::verify_mail_from(
                ip, &self.helo, &self.helo, &sender,
            ))
            .with_txt_cache(rec)
            .with_mx_cache(rec)
            .with_ipv4_cache(rec)
            .with_ipv6_cache(rec);
            let out = self.auth.verify_spf(params).await;
            match out.result() {
                SpfResult::Pass => {}
                SpfResult::TempError => {
                    return State::Unknown(format!(
                        "SPF of {rp} could not be evaluated for {ip}: temporary DNS error"
                    ));
                }
                other => failing.push((ip, spf_name(other))),
            }
        }
        if failing.is_empty() {
            return State::Pass;
        }
        let existing = match self.dns.txt(rp).await {
            Ok(records) => records
                .into_iter()
                .find(|r| is_spf_record(r))
                .unwrap_or_default(),
            Err(_) => String::new(),
        };
        let ips: Vec<IpAddr> = failing.iter().map(|(ip, _)| *ip).collect();
        let fix = Fix {
            name: rp.to_string(),
            record: suggest_spf(&existing, &ips),
        };
        State::Fail(
            SpfFailure::NotAuthorised {
                return_path_domain: rp.to_string(),
                ips: failing,
            },
            Some(fix),
        )
    }
}

/// One identifier's outcome during a check.
enum State<F> {
    Pass,
    /// Fails, with the record that would fix it when there is one.
    Fail(F, Option<Fix>),
    /// DNS trouble.
    Unknown(String),
    /// Cannot be judged from this configuration (SPF without sending IPs).
    Config(String),
}

impl<F> State<F> {
    fn is_dns_trouble(&self) -> bool {
        matches!(self, State::Unknown(_))
    }
}

/// The public key DNS must publish, read back from the key's record text.
fn public_of(key: &Key) -> Vec<u8> {
    let record = key.txt_record();
    record
        .rsplit_once("p=")
        .and_then(|(_, p)| BASE64.decode(p.trim()).ok())
        .unwrap_or_default()
}

fn spf_name(r: SpfResult) -> &'static str {
    match r {
        SpfResult::Pass => "pass",
        SpfResult::Fail => "fail",
        SpfResult::SoftFail => "softfail",
        SpfResult::Neutral => "neutral",
        SpfResult::TempError => "temperror",
        SpfResult::PermError => "permerror",
        SpfResult::None => "no SPF record",
    }
}

fn is_spf_record(r: &str) -> bool {
    let r = r.trim_start();
    // `get`: a TXT record is any text; byte 6 may fall inside a character.
    r.get(..6).is_some_and(|v| v.eq_ignore_ascii_case("v=spf1"))
        && r[6..].chars().next().is_none_or(|c| c == ' ')
}

/// The SPF record to publish: the existing one with the missing IPs
/// added first, or a new one ending in `~all`.
fn suggest_spf(existing: &str, ips: &[IpAddr]) -> String {
    let mechanisms: Vec<String> = ips
        .iter()
        .map(|ip| match ip {
            IpAddr::V4(v4) => format!("ip4:{v4}"),
            IpAddr::V6(v6) => format!("ip6:{v6}"),
        })
        .collect();
    let added = mechanisms.join(" ");
    if is_spf_record(existing) {
        let rest = existing.trim_start()[6..].trim();
        if rest.is_empty() {
            format!("v=spf1 {added} ~all")
        } else {
            format!("v=spf1 {added} {rest}")
        }
    } else {
        format!("v=spf1 {added} ~all")
    }
}

/// A mail-auth cache that stores nothing but remembers when the earliest
/// answer it was offered expires: the verdict built from those answers is
/// kept no longer than that.
#[derive(Default)]
struct TtlRecorder {
    earliest: Mutex<Option<Instant>>,
}

impl TtlRecorder {
    fn earliest(&self) -> Option<Instant> {
        *self.earliest.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<K, V> ResolverCache<K, V> for TtlRecorder {
    fn get<Q>(&self, _: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        None
    }

    fn remove<Q>(&self, _: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        None
    }

    fn insert(&self, _: K, _: V, valid_until: Instant) {
        let mut e = self.earliest.lock().unwrap_or_else(|e| e.into_inner());
        *e = Some(e.map_or(valid_until, |t| t.min(valid_until)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::dmarc::validate;
    use crate::config::{ConfigErrors, Span};

    fn failure() -> AlignmentVerdict {
        AlignmentVerdict::WouldFail(Arc::new(Failure {
            domain: "acme.example".into(),
            policy_domain: "acme.example".into(),
            policy: DmarcPolicy::Reject,
            dkim: DkimFailure::Keys(vec![KeyProblem {
                name: "herald1._domainkey.acme.example".into(),
                problem: KeyState::NotPublished,
            }]),
            spf: SpfFailure::NotAligned {
                return_path_domain: "bounces.relay.example".into(),
                strict: false,
            },
            fixes: vec![Fix {
                name: "herald1._domainkey.acme.example".into(),
                record: format!("v=DKIM1; k=rsa; p={}", "A".repeat(600)),
            }],
        }))
    }

    #[test]
    fn reject_is_550_5_7_26_naming_domain_failures_and_record() {
        let (v, warning) = verdict_for(DmarcAction::Reject, &failure());
        assert_eq!(warning, None);
        let Some(Verdict::Reject { reply, rule }) = v else {
            panic!("{v:?}")
        };
        assert_eq!(
            (reply.code, reply.enhanced),
            (550, Some(Enhanced(5, 7, 26)))
        );
        assert_eq!(rule, crate::event::RejectRule::Dmarc);
        for want in [
            "acme.example would fail DMARC",
            "p=reject",
            "herald1._domainkey.acme.example is not published",
            "bounces.relay.example does not align",
            "Publish TXT at herald1._domainkey.acme.example: v=DKIM1; k=rsa; p=AAA",
        ] {
            assert!(reply.text.contains(want), "{want:?} not in {}", reply.text);
        }
        // A 600-character key is split over reply lines of legal length,
        // and joining them back gives the record.
        let wire = String::from_utf8(reply.to_wire()).unwrap();
        assert!(wire.split("\r\n").all(|l| l.len() <= 512), "{wire}");
        assert!(reply.text.replace('\n', "").contains(&"A".repeat(600)));
    }

    #[test]
    fn defer_is_451_4_7_26_and_warn_accepts_with_the_same_text() {
        let (v, warning) = verdict_for(DmarcAction::Defer, &failure());
        assert_eq!(warning, None);
        let Some(Verdict::Tempfail { reply, rule }) = v else {
            panic!("{v:?}")
        };
        assert_eq!(
            (reply.code, reply.enhanced),
            (451, Some(Enhanced(4, 7, 26)))
        );
        assert_eq!(rule, crate::event::RejectRule::Dmarc);
        assert!(reply.text.contains("acme.example"));

        let (v, warning) = verdict_for(DmarcAction::Warn, &failure());
        assert_eq!(v, None);
        let warning = warning.unwrap();
        assert!(!warning.contains('\n'), "one line for logs: {warning}");
        assert!(warning.contains("herald1._domainkey.acme.example"));
        assert!(warning.contains("v=DKIM1; k=rsa; p=AAA"));

        assert_eq!(verdict_for(DmarcAction::Off, &failure()), (None, None));
    }

    #[test]
    fn unknown_only_warns_and_pass_does_nothing() {
        let unknown = AlignmentVerdict::Unknown("DNS timed out".into());
        for action in [DmarcAction::Reject, DmarcAction::Defer, DmarcAction::Warn] {
            let (v, warning) = verdict_for(action, &unknown);
            assert_eq!(v, None, "{action:?}");
            assert!(warning.unwrap().contains("DNS timed out"));
        }
        assert_eq!(verdict_for(DmarcAction::Off, &unknown), (None, None));
        for quiet in [
            AlignmentVerdict::Pass,
            AlignmentVerdict::NotEnforced,
            AlignmentVerdict::Skipped,
        ] {
            assert_eq!(verdict_for(DmarcAction::Reject, &quiet), (None, None));
        }
    }

    #[test]
    fn spf_suggestion_adds_ips_to_the_published_record() {
        let ips: Vec<IpAddr> = vec![
            "203.0.113.7".parse().unwrap(),
            "2001:db8::7".parse().unwrap(),
        ];
        assert_eq!(
            suggest_spf("", &ips),
            "v=spf1 ip4:203.0.113.7 ip6:2001:db8::7 ~all"
        );
        assert_eq!(
            suggest_spf("v=spf1 include:_spf.google.com -all", &ips[..1]),
            "v=spf1 ip4:203.0.113.7 include:_spf.google.com -all"
        );
        assert_eq!(
            suggest_spf("v=spf10 x", &ips[..1]),
            "v=spf1 ip4:203.0.113.7 ~all"
        );
        assert_eq!(
            suggest_spf("v=spf1", &ips[..1]),
            "v=spf1 ip4:203.0.113.7 ~all"
        );
        // TXT records with a multi-byte character across byte 6.
        for r in ["v=spfé", "ab€€", "İİİİ", "😀😀", "v=sp漢字"] {
            assert!(!is_spf_record(r), "{r}");
            assert_eq!(suggest_spf(r, &ips[..1]), "v=spf1 ip4:203.0.113.7 ~all");
        }
        assert!(is_spf_record("v=spf1 a:bücher.example -all"));
    }

    #[test]
    fn config_defaults_and_errors() {
        let d = DmarcConfig::default();
        assert_eq!(d.action, DmarcAction::Warn);
        let mut errs = ConfigErrors::default();
        validate(&d, "policy.dmarc", &mut errs);
        assert!(errs.0.is_empty());
        let bad = DmarcConfig {
            min_ttl: Span(Duration::from_secs(10)),
            max_ttl: Span(Duration::from_secs(5)),
            error_ttl: Span(Duration::ZERO),
            cache_size: 0,
            ..d
        };
        validate(&bad, "policy.dmarc", &mut errs);
        let paths: Vec<&str> = errs.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "policy.dmarc.min_ttl",
                "policy.dmarc.error_ttl",
                "policy.dmarc.cache_size"
            ]
        );
    }
}

/// Property tests (STYLE.md point 9): TXT records and domain names from the
/// network, in any Unicode, never make the record and name helpers panic.
#[cfg(test)]
mod prop_tests {
    use super::*;
    use crate::policy::dmarc::Dmarc;
    use mail_auth::common::parse::TxtRecordParser as _;
    use proptest::prelude::*;

    /// Text biased to multi-byte characters near the lengths compared
    /// ("v=spf1" is 6 bytes) and to DNS punctuation, or any Unicode.
    fn dns_text() -> impl Strategy<Value = String> {
        prop_oneof![
            "(v=spf1|v=DMARC1|v=sp|v=)?[a-z0-9 .;=:~-]{0,8}[éİ€😀漢ß\u{0}]{0,3}[a-z0-9 .;=-]{0,12}",
            "(?s).{0,40}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn txt_records_and_domain_names_never_panic(record in dns_text(), a in dns_text(), b in dns_text()) {
            let ip: IpAddr = "192.0.2.1".parse().unwrap();
            let _ = is_spf_record(&record);
            prop_assert!(suggest_spf(&record, &[ip]).starts_with("v=spf1 ip4:192.0.2.1 "));
            let _ = mail_auth::spf::Spf::parse(record.as_bytes());
            let _ = Dmarc::parse(record.as_bytes());
            let long = b.repeat(40);
            let text = reply_text(&a, &[record, long]);
            prop_assert!(text.split('\n').skip(1).all(|l| l.len() <= MAX_REPLY_TEXT));
        }
    }
}
