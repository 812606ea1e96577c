//! DNS blocklists (RFC 5782): the client's IP and the domains of a message
//! (From: and URLs) looked up in the configured zones.
//!
//! An IPv4 address is asked as its reversed octets (`2.0.0.127.zone`), an
//! IPv6 address as its 32 reversed nibbles (RFC 5782 §2.4), a domain as
//! `domain.zone` (§3). An A answer in 127.0.0.0/8 is a listing and the TXT
//! record at the same name its reason (§2.1) — except the return codes the
//! operators document as errors about the query itself (see
//! [`error_code_meaning`]), which are logged and counted, never acted on.
//! Answers outside 127/8 come from a resolver that invents answers
//! (NXDOMAIN rewriting) and are not listings either.
//!
//! Trust: answers come from the network and decide whether mail is refused,
//! so a lookup that fails (timeout, SERVFAIL, error code) lists nothing:
//! the message goes on (fail open) and the failure is logged and counted.
//! Every (zone, name) is looked up at once, each bounded by its zone's
//! `timeout`; results, listed or not, are cached for their DNS TTL.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::config::Config;
pub use crate::config::dnsbl::{ZoneAction, ZoneConfig, ZoneKind};
use crate::dns::Dns;
use crate::metrics::{DNSBL_ERROR_CAUSES, DnsblCounters};

/// One listing found.
#[derive(Clone, Debug, PartialEq)]
pub struct Listing {
    pub zone: String,
    /// The IP address or domain that is listed.
    pub listed: String,
    pub action: ZoneAction,
    pub weight: f64,
    /// The zone's TXT reason, when it gives one (printable ASCII only, at
    /// most [`MAX_REASON`] characters: it goes into an SMTP reply).
    pub reason: Option<String>,
}

/// What one zone said about one IP address or domain.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    Listed {
        /// The A records in 127/8, e.g. 127.0.0.2 (the zone's categories).
        codes: Vec<Ipv4Addr>,
        reason: Option<String>,
    },
    NotListed,
    /// No verdict: acts as not listed.
    Error {
        cause: ErrorCause,
        detail: String,
    },
}

/// Why a zone gave no verdict (the `cause` label of
/// `herald_dnsbl_errors_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCause {
    /// No answer within the zone's `timeout`.
    Timeout,
    /// SERVFAIL, REFUSED, network trouble.
    Dns,
    /// A documented "query refused / error" return code.
    ErrorCode,
    /// An A answer outside 127/8: a resolver that rewrites NXDOMAIN.
    NotBlocklistAnswer,
}

impl ErrorCause {
    fn index(self) -> usize {
        match self {
            ErrorCause::Timeout => 0,
            ErrorCause::Dns => 1,
            ErrorCause::ErrorCode => 2,
            ErrorCause::NotBlocklistAnswer => 3,
        }
    }

    pub fn name(self) -> &'static str {
        DNSBL_ERROR_CAUSES[self.index()]
    }
}

/// One zone's answer for one IP address or domain.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ZoneResult {
    pub zone: String,
    /// The IP address or domain asked about.
    pub item: String,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// Longest TXT reason kept.
pub const MAX_REASON: usize = 200;
/// Cache lifetime bounds: a TTL of 0 would make a burst of messages from
/// one client cost a lookup each; one of days would keep a delisted IP
/// blocked long after the zone dropped it.
const MIN_TTL: Duration = Duration::from_secs(10);
const MAX_TTL: Duration = Duration::from_secs(3600);
/// Cached answers kept at most (about 200 bytes each).
const MAX_CACHE: usize = 10_000;
/// Distinct domains looked up per message: a body with hundreds of URL
/// domains would otherwise cost hundreds of queries per zone (the spam
/// rules still see every URL).
pub const MAX_DOMAINS: usize = 20;
/// Lookups in flight at once for one check.
const MAX_IN_FLIGHT: usize = 16;
/// Failures of one zone are logged at most once per this interval (a dead
/// zone would otherwise log once per message); the counters see them all.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The meaning of an A answer in 127/8 that operators document as an error
/// about the query, not a listing; `None` for a listing code.
pub fn error_code_meaning(code: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, d] = code.octets();
    match (a, b, c, d) {
        // Spamhaus reserves 127.255.255.0/24 for errors about the query
        // (DNSBL return codes technical update, 2019).
        (127, 255, 255, 252) => Some("typing error in the DNSBL name (Spamhaus)"),
        (127, 255, 255, 254) => Some(
            "query refused: it came through a public/open resolver or one with generic rDNS (Spamhaus); use your own resolver or Spamhaus DQS",
        ),
        (127, 255, 255, 255) => {
            Some("query refused: excessive number of queries (Spamhaus); use Spamhaus DQS")
        }
        (127, 255, 255, _) => Some("error code in Spamhaus's range 127.255.255.0/24"),
        // DBL: an IP address was asked in a domain zone.
        (127, 0, 1, 255) => Some("IP queries are not allowed in this zone (Spamhaus DBL)"),
        // URIBL and SURBL answer 127.0.0.1 to queries they refuse (bit 0x1
        // is never a listing category there); no zone lists with it.
        (127, 0, 0, 1) => Some(
            "query refused (URIBL/SURBL answer 127.0.0.1 to blocked resolvers); use your own resolver",
        ),
        _ => None,
    }
}

/// When a zone's last no-verdict warning was logged, to log at most one
/// per [`WARN_EVERY`].
#[derive(Default)]
struct WarnClock {
    /// Seconds since [`EPOCH`] of the last warning logged, plus one.
    last_warn: AtomicU64,
}

static EPOCH: LazyLock<std::time::Instant> = LazyLock::new(std::time::Instant::now);

impl WarnClock {
    /// Whether a warning may be logged now (at most one per [`WARN_EVERY`]).
    fn warn_allowed(&self) -> bool {
        let now = EPOCH.elapsed().as_secs() + 1;
        let last = self.last_warn.load(Ordering::Relaxed);
        (last == 0 || now.saturating_sub(last) >= WARN_EVERY.as_secs())
            && self
                .last_warn
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

struct Zone {
    cfg: ZoneConfig,
    /// Lower case, without the trailing dot.
    name: String,
    /// The zone's counters in the metrics registry.
    stats: Arc<DnsblCounters>,
    warned: WarnClock,
}

struct CacheEntry {
    outcome: Outcome,
    expires: Instant,
}

struct Inner {
    zones: Vec<Zone>,
    dns: Dns,
    /// By query name (`2.0.0.127.zen.spamhaus.org`), which names the zone.
    cache: Mutex<HashMap<String, CacheEntry>>,
}

#[derive(Clone)]
pub struct Dnsbl {
    inner: Arc<Inner>,
}

impl Dnsbl {
    /// Counts into the resolver's metrics registry (a private one when it
    /// has none, as in `herald dnsbl check`).
    pub fn new(zones: &[ZoneConfig], dns: Dns) -> Dnsbl {
        let metrics = dns.metrics().cloned().unwrap_or_default();
        let zones = zones
            .iter()
            .map(|cfg| {
                let name = cfg.zone.trim().trim_end_matches('.').to_ascii_lowercase();
                Zone {
                    stats: metrics.dnsbl_zone(&name),
                    warned: WarnClock::default(),
                    name,
                    cfg: cfg.clone(),
                }
            })
            .collect();
        Dnsbl {
            inner: Arc::new(Inner {
                zones,
                dns,
                cache: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.inner.zones.is_empty()
    }

    /// Whether some zone lists IP addresses.
    pub fn has_ip_zones(&self) -> bool {
        self.inner.zones.iter().any(|z| z.cfg.kind == ZoneKind::Ip)
    }

    /// This checker's zones' counters (shared through the metrics registry
    /// with every checker of the same zone).
    pub fn counters(&self) -> Vec<crate::metrics::DnsblZone> {
        self.inner
            .zones
            .iter()
            .map(|z| z.stats.read(&z.name))
            .collect()
    }

    /// Every listing of `ip` and `domains` in the configured zones. A zone
    /// that cannot answer (timeout, SERVFAIL, error code) lists nothing.
    pub async fn check(&self, ip: Option<IpAddr>, domains: &[String]) -> Vec<Listing> {
        let ips: Vec<IpAddr> = ip.into_iter().collect();
        self.lookup(&ips, domains)
            .await
            .into_iter()
            .filter_map(|(i, r)| match r.outcome {
                Outcome::Listed { reason, .. } => {
                    let cfg = &self.inner.zones[i].cfg;
                    Some(Listing {
                        zone: r.zone,
                        listed: r.item,
                        action: cfg.action,
                        weight: cfg.weight,
                        reason,
                    })
                }
                _ => None,
            })
            .collect()
    }

    /// What every zone says about each of `ips` (IP zones) and `domains`
    /// (domain zones), errors included: the blocklist monitor's view.
    pub async fn report(&self, ips: &[IpAddr], domains: &[String]) -> Vec<ZoneResult> {
        self.lookup(ips, domains)
            .await
            .into_iter()
            .map(|(_, r)| r)
            .collect()
    }

    /// Looks up every (zone, item) at once; results in zone order, then
    /// item order, each with its zone's index.
    async fn lookup(&self, ips: &[IpAddr], domains: &[String]) -> Vec<(usize, ZoneResult)> {
        let start = Instant::now();
        let ip_items: Vec<(String, String)> = ips
            .iter()
            .map(|ip| (ip.to_canonical().to_string(), reversed(*ip)))
            .collect();
        let domain_items = domain_items(domains);
        let limit = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
        let mut slots: Vec<Option<(usize, ZoneResult)>> = Vec::new();
        let mut tasks = tokio::task::JoinSet::new();
        for (zi, zone) in self.inner.zones.iter().enumerate() {
            let items = match zone.cfg.kind {
                ZoneKind::Ip => &ip_items,
                ZoneKind::Domain => &domain_items,
            };
            for (item, label) in items {
                let qname = format!("{label}.{}", zone.name);
                let slot = slots.len();
                if let Some(outcome) = self.cached(&qname) {
                    slots.push(Some((zi, result(zone, item, outcome))));
                    continue;
                }
                slots.push(None);
                let inner = self.inner.clone();
                let limit = limit.clone();
                let item = item.clone();
                let deadline = start + zone.cfg.timeout.0;
                tasks.spawn(async move {
                    let outcome = inner.query(zi, &qname, deadline, &limit).await;
                    (slot, zi, item, outcome)
                });
            }
        }
        while let Some(done) = tasks.join_next().await {
            // A panicked lookup leaves its slot empty: no verdict, like a
            // failed one.
            if let Ok((slot, zi, item, outcome)) = done {
                slots[slot] = Some((zi, result(&self.inner.zones[zi], &item, outcome)));
            }
        }
        slots.into_iter().flatten().collect()
    }

    fn cached(&self, qname: &str) -> Option<Outcome> {
        let cache = self.inner.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(qname)
            .filter(|e| e.expires > Instant::now())
            .map(|e| e.outcome.clone())
    }
}

fn result(zone: &Zone, item: &str, outcome: Outcome) -> ZoneResult {
    ZoneResult {
        zone: zone.name.clone(),
        item: item.to_string(),
        outcome,
    }
}

impl Inner {
    /// One lookup (cache miss): A, then TXT for a listing. Waiting for a
    /// slot counts against the deadline, so a check never outlasts its
    /// zones' timeouts.
    async fn query(
        &self,
        zi: usize,
        qname: &str,
        deadline: Instant,
        limit: &tokio::sync::Semaphore,
    ) -> Outcome {
        let zone = &self.zones[zi];
        let answer = tokio::time::timeout_at(deadline, async {
            let _permit = limit.acquire().await;
            zone.stats.lookups.fetch_add(1, Ordering::Relaxed);
            self.dns.a_with_ttl(qname).await
        })
        .await;
        // Timeouts and SERVFAIL are not cached: the next message asks again.
        // Error codes and foreign answers are, like any answer: asking a
        // zone that refuses us again at once only makes it refuse longer.
        let (outcome, ttl) = match answer {
            Err(_) => {
                let detail = format!("no answer within {}", zone.cfg.timeout);
                return self.no_verdict(zone, qname, ErrorCause::Timeout, detail);
            }
            Ok(Err(e)) => return self.no_verdict(zone, qname, ErrorCause::Dns, e.reason),
            Ok(Ok((addrs, ttl))) => match self.classify(zone, qname, &addrs, deadline).await {
                // The reason could not be fetched: ask again soon.
                (outcome, false) => (outcome, MIN_TTL),
                (outcome, true) => (outcome, ttl.clamp(MIN_TTL, MAX_TTL)),
            },
        };
        self.store(qname, &outcome, ttl);
        outcome
    }

    /// What an A answer means; false when it is a listing whose TXT reason
    /// could not be fetched (timeout, SERVFAIL).
    async fn classify(
        &self,
        zone: &Zone,
        qname: &str,
        addrs: &[Ipv4Addr],
        deadline: Instant,
    ) -> (Outcome, bool) {
        if addrs.is_empty() {
            return (Outcome::NotListed, true);
        }
        let codes: Vec<Ipv4Addr> = addrs
            .iter()
            .copied()
            .filter(|a| a.octets()[0] == 127 && error_code_meaning(*a).is_none())
            .collect();
        if !codes.is_empty() {
            zone.stats.listings.fetch_add(1, Ordering::Relaxed);
            let (reason, complete) = match tokio::time::timeout_at(deadline, self.dns.txt(qname))
                .await
            {
                Ok(Ok(txts)) => (
                    txts.iter().map(|t| sanitize(t)).find(|t| !t.is_empty()),
                    true,
                ),
                Ok(Err(e)) => {
                    tracing::debug!(zone = %zone.name, name = qname, error = %e, "DNSBL reason (TXT) not available");
                    (None, false)
                }
                Err(_) => (None, false),
            };
            return (Outcome::Listed { codes, reason }, complete);
        }
        if let Some((code, meaning)) = addrs
            .iter()
            .find_map(|a| error_code_meaning(*a).map(|m| (a, m)))
        {
            let detail = format!("{code}: {meaning}");
            return (
                self.no_verdict(zone, qname, ErrorCause::ErrorCode, detail),
                true,
            );
        }
        let detail = format!(
            "answer {} is outside 127.0.0.0/8: the resolver rewrites NXDOMAIN (use one that does not)",
            addrs[0]
        );
        let outcome = self.no_verdict(zone, qname, ErrorCause::NotBlocklistAnswer, detail);
        (outcome, true)
    }

    /// Counts and logs a lookup without a verdict.
    fn no_verdict(&self, zone: &Zone, qname: &str, cause: ErrorCause, detail: String) -> Outcome {
        zone.stats.errors[cause.index()].fetch_add(1, Ordering::Relaxed);
        if zone.warned.warn_allowed() {
            tracing::warn!(
                zone = %zone.name,
                name = qname,
                cause = cause.name(),
                "DNSBL lookup gave no verdict, treated as not listed: {detail} (further failures of this zone are logged at most once a minute; see herald_dnsbl_errors_total)"
            );
        }
        Outcome::Error { cause, detail }
    }

    fn store(&self, qname: &str, outcome: &Outcome, ttl: Duration) {
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHE && !cache.contains_key(qname) {
            cache.retain(|_, e| e.expires > now);
            // Still full of live entries (a flood of distinct names): start
            // over rather than track recency; it costs only lookups.
            if cache.len() >= MAX_CACHE {
                cache.clear();
            }
        }
        cache.insert(
            qname.to_string(),
            CacheEntry {
                outcome: outcome.clone(),
                expires: now + ttl,
            },
        );
    }
}

/// The query label of an IP address (RFC 5782 §2.1, §2.4). An IPv4-mapped
/// IPv6 address (a dual-stack listener's view of an IPv4 client) is asked
/// as the IPv4 address it is.
pub fn reversed(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("{d}.{c}.{b}.{a}")
        }
        IpAddr::V6(v6) => {
            let mut out = String::with_capacity(63);
            for byte in v6.octets().iter().rev() {
                for nibble in [byte & 0xf, byte >> 4] {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push(char::from_digit(u32::from(nibble), 16).unwrap_or('0'));
                }
            }
            out
        }
    }
}

/// The domains worth asking a domain zone about, as (domain, query label):
/// lower case, internationalized names in their A-label (punycode) form,
/// each once, at most [`MAX_DOMAINS`].
fn domain_items(domains: &[String]) -> Vec<(String, String)> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for d in domains {
        let d = d.trim().trim_end_matches('.');
        // An IP literal is not a domain: domain zones answer it with an
        // error code (Spamhaus DBL: 127.0.1.255) or not at all.
        if d.is_empty() || d.trim_matches(['[', ']']).parse::<IpAddr>().is_ok() {
            continue;
        }
        let Some(ascii) = to_ascii(d) else {
            // Not a DNS name, so no zone can list it.
            tracing::debug!(domain = d, "not a DNS name; not looked up in DNSBLs");
            continue;
        };
        if !seen.insert(ascii.clone()) {
            continue;
        }
        if out.len() == MAX_DOMAINS {
            tracing::debug!(
                max = MAX_DOMAINS,
                "more domains than looked up in DNSBLs per message; the rest are skipped"
            );
            break;
        }
        out.push((ascii.clone(), ascii));
    }
    out
}

fn to_ascii(domain: &str) -> Option<String> {
    let name = hickory_resolver::proto::rr::Name::from_utf8(domain).ok()?;
    let ascii = name.to_ascii().trim_end_matches('.').to_ascii_lowercase();
    // Room for the zone; a longer name could not be asked.
    let ok = !ascii.is_empty()
        && ascii.len() <= 190
        && ascii.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    ok.then_some(ascii)
}

/// A TXT reason fit for an SMTP reply and a log line: printable ASCII,
/// whitespace collapsed, at most [`MAX_REASON`] characters.
fn sanitize(text: &str) -> String {
    let mut out = String::new();
    for word in text.split_whitespace() {
        let word: String = word.chars().filter(|c| c.is_ascii_graphic()).collect();
        if word.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&word);
    }
    if out.len() > MAX_REASON {
        out.truncate(MAX_REASON);
    }
    out
}

/// `herald dnsbl ...`
#[derive(clap::Subcommand)]
pub enum DnsblCommand {
    /// Are herald's sending IPs (delivery.public_ips, else
    /// delivery.source_ips), or the IPs given, listed in the IP zones of
    /// [[policy.dnsbl]]? One line per (IP, zone). Exit status: 0 none
    /// listed, 1 listed somewhere, 2 nothing to check (no IP, no IP zone,
    /// bad config), 3 none listed but some zones gave no answer.
    Check(CheckArgs),
}

#[derive(clap::Args)]
pub struct CheckArgs {
    /// IP addresses to check instead of the configured sending IPs.
    pub ips: Vec<IpAddr>,
    /// One JSON array of {item, zone, status, ...} objects instead of lines
    /// (status "listed" with codes and reason, "not_listed", or "error" with
    /// cause and detail).
    #[arg(long)]
    pub json: bool,
}

/// Runs `herald dnsbl check`.
pub fn cli(config_path: &Path, command: DnsblCommand, rt: &tokio::runtime::Runtime) -> ExitCode {
    let DnsblCommand::Check(args) = command;
    let Some(cfg) = Config::load_or_print(config_path) else {
        return ExitCode::from(2);
    };
    let ips: Vec<IpAddr> = if args.ips.is_empty() {
        cfg.sending_ips().to_vec()
    } else {
        args.ips.clone()
    };
    if ips.is_empty() {
        eprintln!(
            "herald dnsbl check: no IP address to check: none given, and the config sets neither delivery.public_ips nor delivery.source_ips. Give the addresses: herald dnsbl check 192.0.2.10"
        );
        return ExitCode::from(2);
    }
    let dns = match Dns::new(&cfg.dns) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("herald dnsbl check: {e}");
            return ExitCode::from(2);
        }
    };
    let dnsbl = Dnsbl::new(&cfg.policy.dnsbl, dns);
    if !dnsbl.has_ip_zones() {
        eprintln!(
            "herald dnsbl check: no IP zone configured: add a [[policy.dnsbl]] with kind = \"ip\", e.g. zone = \"zen.spamhaus.org\""
        );
        return ExitCode::from(2);
    }
    let results = rt.block_on(dnsbl.report(&ips, &[]));
    if args.json {
        match serde_json::to_string_pretty(&results) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("herald dnsbl check: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        for r in &results {
            println!("{}", describe(r));
        }
    }
    let listed = results
        .iter()
        .any(|r| matches!(r.outcome, Outcome::Listed { .. }));
    let failed = results
        .iter()
        .any(|r| matches!(r.outcome, Outcome::Error { .. }));
    if listed {
        ExitCode::from(1)
    } else if failed {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    }
}

/// One line of `herald dnsbl check`.
fn describe(r: &ZoneResult) -> String {
    let verdict = match &r.outcome {
        Outcome::Listed { codes, reason } => {
            let codes: Vec<String> = codes.iter().map(Ipv4Addr::to_string).collect();
            match reason {
                Some(why) => format!("LISTED ({}): {why}", codes.join(", ")),
                None => format!("LISTED ({})", codes.join(", ")),
            }
        }
        Outcome::NotListed => "not listed".to_string(),
        Outcome::Error { cause, detail } => format!("error ({}): {detail}", cause.name()),
    };
    format!("{} {}: {verdict}", r.item, r.zone)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::dnsbl::validate;
    use crate::config::{ConfigErrors, Span};
    use std::time::Duration;

    #[test]
    fn ipv4_is_reversed_octets() {
        assert_eq!(reversed("192.0.2.99".parse().unwrap()), "99.2.0.192");
        // IPv4-mapped IPv6 is asked as IPv4.
        assert_eq!(reversed("::ffff:192.0.2.99".parse().unwrap()), "99.2.0.192");
    }

    #[test]
    fn ipv6_is_reversed_nibbles() {
        // RFC 5782 §2.4's example.
        assert_eq!(
            reversed("2001:db8:1:2:3:4:567:89ab".parse().unwrap()),
            "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2"
        );
    }

    #[test]
    fn documented_error_codes_are_not_listings() {
        for code in [
            "127.255.255.252",
            "127.255.255.254",
            "127.255.255.255",
            "127.0.1.255",
            "127.0.0.1",
        ] {
            assert!(
                error_code_meaning(code.parse().unwrap()).is_some(),
                "{code}"
            );
        }
        for code in ["127.0.0.2", "127.0.0.4", "127.0.1.2", "127.0.0.10"] {
            assert!(
                error_code_meaning(code.parse().unwrap()).is_none(),
                "{code}"
            );
        }
    }

    #[test]
    fn domains_are_normalized_deduplicated_and_bounded() {
        let input: Vec<String> = [
            "Example.TEST.",
            "example.test",
            "192.0.2.1",
            "[::1]",
            "bad domain",
            "bücher.test",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let items: Vec<String> = domain_items(&input).into_iter().map(|(d, _)| d).collect();
        assert_eq!(items, ["example.test", "xn--bcher-kva.test"]);
        let many: Vec<String> = (0..50).map(|i| format!("d{i}.test")).collect();
        assert_eq!(domain_items(&many).len(), MAX_DOMAINS);
    }

    #[test]
    fn reasons_are_made_safe_for_smtp() {
        assert_eq!(sanitize("Listed\r\n by  \x07 zone"), "Listed by zone");
        assert_eq!(sanitize(&"x".repeat(500)).len(), MAX_REASON);
    }

    #[test]
    fn zone_validation_names_the_key() {
        let zone = |z: &str, w: f64| ZoneConfig {
            zone: z.into(),
            kind: ZoneKind::Ip,
            action: ZoneAction::Reject,
            weight: w,
            timeout: Span(Duration::from_secs(2)),
        };
        let mut errs = ConfigErrors(Vec::new());
        validate(&zone("zen.spamhaus.org", 1.0), "policy.dnsbl[0]", &mut errs);
        validate(
            &zone("zen.spamhaus.org.", 0.0),
            "policy.dnsbl[1]",
            &mut errs,
        );
        assert!(errs.0.is_empty(), "{errs}");
        validate(&zone("", 1.0), "policy.dnsbl[2]", &mut errs);
        validate(&zone("bad zone!.org", 1.0), "policy.dnsbl[3]", &mut errs);
        validate(&zone("ok.test", f64::NAN), "policy.dnsbl[4]", &mut errs);
        validate(&zone("ok.test", -1.0), "policy.dnsbl[5]", &mut errs);
        let text = errs.to_string();
        for key in [
            "policy.dnsbl[2].zone",
            "policy.dnsbl[3].zone",
            "policy.dnsbl[4].weight",
            "policy.dnsbl[5].weight",
        ] {
            assert!(text.contains(key), "{key} missing in {text}");
        }
    }
}

/// Property tests (STYLE.md point 9): whatever a zone's TXT record or a
/// message's URL domains hold, the reason sanitiser and the query names
/// never panic and keep their promises.
#[cfg(test)]
mod prop_tests {
    use super::*;
    use proptest::prelude::*;

    /// Text biased to multi-byte characters (a cut at [`MAX_REASON`] may
    /// fall inside one), URL and DNS punctuation, or any Unicode.
    fn txt() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-zA-Z0-9 .:/_-]{0,220}[éİ€😀漢ß\u{0}\t\r\n]{0,4}[a-z0-9 ]{0,20}",
            "(?s).{0,300}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn txt_reasons_and_domains_never_panic(reason in txt(), domains in prop::collection::vec(txt(), 0..4)) {
            let clean = sanitize(&reason);
            prop_assert!(clean.len() <= MAX_REASON);
            prop_assert!(clean.bytes().all(|b| b == b' ' || b.is_ascii_graphic()), "{clean:?}");
            for (domain, label) in domain_items(&domains) {
                prop_assert!(label.is_ascii() && label.len() <= 190, "{domain:?} -> {label:?}");
            }
        }
    }
}
