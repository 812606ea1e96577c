//! Rate limits (`[limits]`): per tenant (messages at MAIL FROM, recipients
//! at RCPT TO), per client IP (new connections), and per recipient domain
//! on the delivery side (traffic shaping).
//!
//! Every limit is a [`Rate`] enforced as GCRA (the generic cell rate
//! algorithm): one unit every `period / count`, at most `burst` at once.
//! Single node: in memory, with governor's lock-free limiters. Clustered
//! (`[cluster] redis_url`): the same GCRA runs as one Lua script in Redis
//! (one EVALSHA per check, one key per limit and subject, with a TTL), so
//! all nodes share each limit. Redis time is used, so node clocks need not
//! agree.
//!
//! Redis is never on the critical path for mail: a check that fails or
//! takes longer than `cluster.redis_timeout` falls back to the local
//! limiter, the outage is logged once (and its end once), every fallback is
//! counted (`herald_ratelimit_redis_fallbacks_total`), and Redis is tried again after
//! [`REDIS_RETRY_PAUSE`]. During an outage each node enforces each limit on
//! its own, so the cluster as a whole may let through up to N times a limit.
//!
//! Over a limit at submission, the caller answers `451 4.7.1` (or `421
//! 4.7.0` at connect) with [`Exceeded`]'s sentence. On the delivery side
//! [`RateLimits::domain_ready`] waits: the job stays with its connection
//! task, unattempted, until the domain's limit lets it go.
//!
//! Input trusted: the config. Subjects (tenant names, IPs, domains) become
//! parts of Redis keys; they are never interpreted.

use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Rate};
use crate::metrics::Metrics;
use crate::reply::{Enhanced, Reply};

/// After a failed Redis check, local limits are used for this long before
/// Redis is tried again.
pub const REDIS_RETRY_PAUSE: Duration = Duration::from_secs(2);

/// Keyed limiters forget idle keys every this many checks.
const RETAIN_EVERY: u64 = 4096;

/// The GCRA script. `KEYS[1]`: the limit and subject. `ARGV[1]`: emission
/// interval `T` in microseconds; `ARGV[2]`: burst. Returns 0 when the unit
/// is allowed (and records it), else the wait in microseconds. Mirrors
/// [`gcra`]. Numbers are written with `%.0f`: Lua 5.1's `tostring` would
/// round microsecond timestamps to 14 digits.
const GCRA_LUA: &str = r#"
local t = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000000 + tonumber(now[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now) or now
if tat < now then tat = now end
local over = tat - now - (burst - 1) * t
if over > 0 then return over end
local new_tat = tat + t
local ttl_ms = math.floor((new_tat - now) / 1000) + 1000
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', string.format('%.0f', ttl_ms))
return 0
"#;

/// One GCRA step, the math of the Redis script: with theoretical arrival
/// time `tat` (0 = never used) at time `now`, emission interval `t` and
/// `burst`, either the unit is allowed and the new `tat` is returned, or
/// the wait until it would be is. All in the same unit (microseconds).
pub fn gcra(tat: u64, now: u64, t: u64, burst: u32) -> Result<u64, u64> {
    let tat = tat.max(now);
    let tolerance = u64::from(burst.saturating_sub(1)).saturating_mul(t);
    let over = (tat - now).saturating_sub(tolerance);
    if over > 0 {
        return Err(over);
    }
    Ok(tat.saturating_add(t))
}

/// A refusal: which limit, and how long until it would pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exceeded {
    /// `"tenant acme exceeded 500 messages/hour"`.
    pub what: String,
    pub retry_after: Duration,
}

impl Exceeded {
    /// Whole seconds to wait, at least 1.
    pub fn retry_secs(&self) -> u64 {
        self.retry_after.as_secs_f64().ceil().max(1.0) as u64
    }

    /// `451 4.7.1 tenant acme exceeded 500 messages/hour; retry after 12 s`.
    pub fn reply(&self) -> Reply {
        Reply::new(451, Enhanced(4, 7, 1), self.to_string())
    }

    /// `421 4.7.0 ...`, for a refusal at connect.
    pub fn connect_reply(&self) -> Reply {
        Reply::new(421, Enhanced(4, 7, 0), self.to_string())
    }
}

impl fmt::Display for Exceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}; retry after {} s", self.what, self.retry_secs())
    }
}

/// Which limit a check is about: part of the Redis key and of the sentence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    TenantMessages,
    TenantRecipients,
    IpConnections,
    Domain,
}

impl Kind {
    fn key(self) -> &'static str {
        match self {
            Kind::TenantMessages => "tm",
            Kind::TenantRecipients => "tr",
            Kind::IpConnections => "ip",
            Kind::Domain => "dom",
        }
    }

    fn describe(self, subject: &(dyn fmt::Display + Sync), rate: &Rate) -> String {
        let (who, noun) = match self {
            Kind::TenantMessages => ("tenant", "messages"),
            Kind::TenantRecipients => ("tenant", "recipients"),
            Kind::IpConnections => ("client", "connections"),
            Kind::Domain => ("domain", "messages"),
        };
        format!(
            "{who} {subject} exceeded {} {noun}/{}",
            rate.count,
            rate.unit_name()
        )
    }
}

fn quota(rate: &Rate) -> Quota {
    let period = rate.interval().max(Duration::from_nanos(1));
    let burst = NonZeroU32::new(rate.burst).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(period)
        .expect("period is not zero")
        .allow_burst(burst)
}

/// One limit with one subject (a tenant, a configured domain).
struct Direct {
    rate: Rate,
    local: DefaultDirectRateLimiter,
}

impl Direct {
    fn new(rate: Rate) -> Direct {
        Direct {
            rate,
            local: DefaultDirectRateLimiter::direct(quota(&rate)),
        }
    }

    fn check_local(&self) -> Result<(), Duration> {
        self.local
            .check()
            .map_err(|e| e.wait_time_from(DefaultClock::default().now()))
    }
}

/// One limit with many subjects (client IPs, domains without an entry).
struct Keyed<K: Hash + Eq + Clone> {
    rate: Rate,
    local: DefaultKeyedRateLimiter<K>,
    checks: AtomicU64,
}

impl<K: Hash + Eq + Clone> Keyed<K> {
    fn new(rate: Rate) -> Keyed<K> {
        Keyed {
            rate,
            local: DefaultKeyedRateLimiter::keyed(quota(&rate)),
            checks: AtomicU64::new(0),
        }
    }

    fn check_local(&self, key: &K) -> Result<(), Duration> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % RETAIN_EVERY == RETAIN_EVERY - 1 {
            self.local.retain_recent();
            self.local.shrink_to_fit();
        }
        self.local
            .check_key(key)
            .map_err(|e| e.wait_time_from(DefaultClock::default().now()))
    }
}

/// The Redis side of clustered limits.
struct Shared {
    conn: redis::aio::ConnectionManager,
    script: redis::Script,
    prefix: String,
    timeout: Duration,
    start: Instant,
    /// Milliseconds since `start` before which Redis is not tried.
    down_until: AtomicU64,
    /// An outage is going on (logged at its start and end only).
    outage: AtomicBool,
    /// Counts the checks answered locally.
    metrics: Arc<Metrics>,
}

impl Shared {
    fn new(config: &Config, url: &str, metrics: Arc<Metrics>) -> Result<Shared, String> {
        let client = redis::Client::open(url).map_err(|e| format!("invalid Redis URL: {e}"))?;
        let timeout = config.cluster.redis_timeout.as_duration();
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1);
        let conn = redis::aio::ConnectionManager::new_lazy_with_config(client, cfg)
            .map_err(|e| format!("cannot set up the Redis connection: {e}"))?;
        Ok(Shared {
            conn,
            script: redis::Script::new(GCRA_LUA),
            prefix: config.cluster.key_prefix.clone(),
            timeout,
            start: Instant::now(),
            down_until: AtomicU64::new(0),
            outage: AtomicBool::new(false),
            metrics,
        })
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// The shared verdict, or `None` when Redis cannot give one now.
    async fn check(
        &self,
        kind: Kind,
        subject: &(dyn fmt::Display + Sync),
        rate: &Rate,
    ) -> Option<Result<(), Duration>> {
        if self.now_ms() < self.down_until.load(Ordering::Relaxed) {
            self.metrics.redis_fallbacks.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let key = format!("{}:rl:{}:{subject}", self.prefix, kind.key());
        let t_us = u64::try_from(rate.interval().as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut conn = self.conn.clone();
        let mut inv = self.script.key(&key);
        inv.arg(t_us).arg(rate.burst);
        let failure =
            match tokio::time::timeout(self.timeout, inv.invoke_async::<i64>(&mut conn)).await {
                Ok(Ok(wait)) => {
                    if self.outage.swap(false, Ordering::Relaxed) {
                        tracing::info!("Redis reachable again: rate limits are shared again");
                    }
                    return Some(if wait <= 0 {
                        Ok(())
                    } else {
                        Err(Duration::from_micros(wait as u64))
                    });
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {:?}", self.timeout),
            };
        self.down_until.store(
            self.now_ms() + REDIS_RETRY_PAUSE.as_millis() as u64,
            Ordering::Relaxed,
        );
        self.metrics.redis_fallbacks.fetch_add(1, Ordering::Relaxed);
        if !self.outage.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %failure, "Redis unreachable: using local rate limits until it answers again");
        }
        None
    }
}

/// Every configured rate limit, local and (when clustered) shared.
pub struct RateLimits {
    /// Indexed like `config.tenants`.
    tenant_messages: Vec<Option<Direct>>,
    tenant_recipients: Vec<Option<Direct>>,
    tenant_names: Vec<String>,
    ip_connections: Option<Keyed<IpAddr>>,
    /// `[limits.domains]`, names in lower case.
    domains: Vec<(String, Direct)>,
    /// `limits.domain_default`, keyed by a hash of the lower-case name (no
    /// allocation per check).
    domain_default: Option<Keyed<u64>>,
    shared: Option<Shared>,
}

impl RateLimits {
    /// The limits of `config`; none when `[limits]` sets none. Checks
    /// Redis could not answer are counted in `metrics`.
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> RateLimits {
        let l = &config.limits;
        let per_tenant = |pick: &dyn Fn(&crate::config::TenantLimits) -> Option<Rate>,
                          default: Option<Rate>| {
            config
                .tenants
                .iter()
                .map(|t| {
                    l.tenants
                        .get(&t.name)
                        .and_then(pick)
                        .or(default)
                        .map(Direct::new)
                })
                .collect::<Vec<_>>()
        };
        let shared = config.cluster.redis_url.as_deref().and_then(|url| {
            Shared::new(config, url, metrics)
                .inspect_err(|e| tracing::error!(error = %e, "rate limits stay local"))
                .ok()
        });
        RateLimits {
            tenant_messages: per_tenant(&|t| t.messages, l.tenant_messages),
            tenant_recipients: per_tenant(&|t| t.recipients, l.tenant_recipients),
            tenant_names: config.tenants.iter().map(|t| t.name.clone()).collect(),
            ip_connections: l.ip_connections.map(Keyed::new),
            domains: l
                .domains
                .iter()
                .map(|(d, r)| (d.to_ascii_lowercase(), Direct::new(*r)))
                .collect(),
            domain_default: l.domain_default.map(Keyed::new),
            shared,
        }
    }

    /// Whether any delivery-side limit is set.
    pub fn shapes_delivery(&self) -> bool {
        !self.domains.is_empty() || self.domain_default.is_some()
    }

    async fn check(
        &self,
        kind: Kind,
        subject: &(dyn fmt::Display + Sync),
        rate: &Rate,
        local: impl FnOnce() -> Result<(), Duration>,
    ) -> Result<(), Exceeded> {
        let verdict = match &self.shared {
            Some(s) => match s.check(kind, subject, rate).await {
                Some(v) => v,
                None => local(),
            },
            None => local(),
        };
        verdict.map_err(|retry_after| Exceeded {
            what: kind.describe(subject, rate),
            retry_after,
        })
    }

    /// One more message from tenant number `tenant` (index into
    /// `config.tenants`), at MAIL FROM.
    pub async fn tenant_message(&self, tenant: usize) -> Result<(), Exceeded> {
        self.tenant(Kind::TenantMessages, &self.tenant_messages, tenant)
            .await
    }

    /// One more accepted recipient for tenant number `tenant`, at RCPT TO.
    pub async fn tenant_recipient(&self, tenant: usize) -> Result<(), Exceeded> {
        self.tenant(Kind::TenantRecipients, &self.tenant_recipients, tenant)
            .await
    }

    async fn tenant(
        &self,
        kind: Kind,
        limits: &[Option<Direct>],
        tenant: usize,
    ) -> Result<(), Exceeded> {
        let Some(Some(d)) = limits.get(tenant) else {
            return Ok(());
        };
        let name = &self.tenant_names[tenant];
        self.check(kind, name, &d.rate, || d.check_local()).await
    }

    /// One more connection from `ip`.
    pub async fn ip_connection(&self, ip: IpAddr) -> Result<(), Exceeded> {
        let Some(k) = &self.ip_connections else {
            return Ok(());
        };
        self.check(Kind::IpConnections, &ip, &k.rate, || k.check_local(&ip))
            .await
    }

    /// One more message to `domain`.
    pub async fn domain_message(&self, domain: &str) -> Result<(), Exceeded> {
        if let Some((_, d)) = self
            .domains
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(domain))
        {
            return self
                .check(Kind::Domain, &domain, &d.rate, || d.check_local())
                .await;
        }
        let Some(k) = &self.domain_default else {
            return Ok(());
        };
        let mut h = DefaultHasher::new();
        for b in domain.bytes() {
            b.to_ascii_lowercase().hash(&mut h);
        }
        let key = h.finish();
        self.check(Kind::Domain, &domain, &k.rate, || k.check_local(&key))
            .await
    }

    /// Waits until `domain`'s limit lets one more message go, and takes
    /// that place. `false` when `stop` was cancelled first. Each round
    /// sleeps for the wait the limiter named (at least 1 ms), so it cannot
    /// spin; only the calling task waits, so other domains go on.
    pub async fn domain_ready(&self, domain: &str, stop: &CancellationToken) -> bool {
        loop {
            match self.domain_message(domain).await {
                Ok(()) => return true,
                Err(e) => {
                    let wait = e.retry_after.max(Duration::from_millis(1));
                    tracing::debug!(
                        domain,
                        wait_ms = wait.as_millis() as u64,
                        "domain rate limit: waiting"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.cancelled() => return false,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcra_lets_a_burst_through_then_one_per_interval() {
        // 3 per 60 s, burst 3: T = 20 s.
        let t = 20_000_000;
        let mut tat = 0;
        let now = 1_000_000_000;
        for _ in 0..3 {
            tat = gcra(tat, now, t, 3).unwrap();
        }
        // The 4th must wait one interval.
        assert_eq!(gcra(tat, now, t, 3), Err(t));
        // Half an interval later: half an interval to go.
        assert_eq!(gcra(tat, now + t / 2, t, 3), Err(t / 2));
        // After one interval exactly one more passes.
        let tat = gcra(tat, now + t, t, 3).unwrap();
        assert!(gcra(tat, now + t, t, 3).is_err());
        // After a long quiet spell the whole burst is back, no more.
        let later = now + 100 * t;
        let mut tat2 = tat;
        for _ in 0..3 {
            tat2 = gcra(tat2, later, t, 3).unwrap();
        }
        assert!(gcra(tat2, later, t, 3).is_err());
    }

    #[test]
    fn gcra_burst_one_spaces_evenly() {
        let t = 1000;
        let tat = gcra(0, 5000, t, 1).unwrap();
        assert_eq!(tat, 6000);
        assert_eq!(gcra(tat, 5000, t, 1), Err(1000));
        assert_eq!(gcra(tat, 5999, t, 1), Err(1));
        assert_eq!(gcra(tat, 6000, t, 1), Ok(7000));
    }

    fn config(limits: &str) -> Config {
        let text = format!(
            r#"
{listener}
{tenant}
[limits]
{limits}
"#,
            listener = crate::config::test_support::RELAY_LISTENER,
            tenant = crate::config::test_support::tenant("acme", r#""*@acme.example""#)
        );
        Config::from_toml_str(&text).unwrap()
    }

    #[test]
    fn config_errors_name_the_key() {
        let text = |limits: &str| {
            format!(
                "[[listener]]\naddress = \"127.0.0.1:0\"\ntls = \"none\"\nauth = \"none\"\n\
                 trusted_networks = [\"127.0.0.0/8\"]\n[limits]\n{limits}\n"
            )
        };
        let e = Config::from_toml_str(&text("tenant_messages = \"500/w\"")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("limits.tenant_messages: invalid rate \"500/w\": unknown unit"),
            "{e}"
        );
        let e =
            Config::from_toml_str(&text("[limits.domains]\n\"gmail.com\" = \"lots\"")).unwrap_err();
        assert!(e.to_string().contains("limits.domains.gmail.com"), "{e}");
        let e = Config::from_toml_str(&text("[limits.tenants.nobody]\nmessages = \"1/s\""))
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("limits.tenants.nobody: no [[tenant]] has this name"),
            "{e}"
        );
        let e = Config::from_toml_str(&text("tenant_mesages = \"1/s\"")).unwrap_err();
        assert!(
            e.to_string().contains("limits.tenant_mesages: unknown key"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn tenant_limit_refuses_with_the_limit_and_the_wait() {
        let l = RateLimits::new(&config(r#"tenant_messages = "3/m""#), Arc::default());
        for _ in 0..3 {
            l.tenant_message(0).await.unwrap();
        }
        let e = l.tenant_message(0).await.unwrap_err();
        assert_eq!(e.what, "tenant acme exceeded 3 messages/minute");
        assert!((19..=20).contains(&e.retry_secs()), "{e}");
        let r = e.reply().to_string();
        assert!(
            r.starts_with("451 4.7.1 tenant acme exceeded 3 messages/minute; retry after "),
            "{r}"
        );
        // No recipient limit set: none applies.
        for _ in 0..100 {
            l.tenant_recipient(0).await.unwrap();
        }
    }

    #[tokio::test]
    async fn per_tenant_override_and_domains() {
        let l = RateLimits::new(
            &config(
                r#"tenant_messages = "1/m"
domain_default = "1/h"
[limits.tenants.acme]
messages = "2/m"
[limits.domains]
"Gmail.com" = "2/h"
"#,
            ),
            Arc::default(),
        );
        l.tenant_message(0).await.unwrap();
        l.tenant_message(0).await.unwrap();
        assert!(l.tenant_message(0).await.is_err());
        l.domain_message("gmail.com").await.unwrap();
        l.domain_message("GMAIL.com").await.unwrap();
        let e = l.domain_message("gmail.com").await.unwrap_err();
        assert_eq!(e.what, "domain gmail.com exceeded 2 messages/hour");
        l.domain_message("a.example").await.unwrap();
        assert!(l.domain_message("A.example").await.is_err());
        l.domain_message("b.example").await.unwrap();
        assert!(l.shapes_delivery());
    }

    #[tokio::test]
    async fn ip_limit_and_no_limits() {
        let l = RateLimits::new(&config(r#"ip_connections = "2/s burst 1""#), Arc::default());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        l.ip_connection(ip).await.unwrap();
        let e = l.ip_connection(ip).await.unwrap_err();
        assert!(e.connect_reply().to_string().starts_with(
            "421 4.7.0 client 192.0.2.1 exceeded 2 connections/second; retry after 1 s"
        ));
        l.ip_connection("192.0.2.2".parse().unwrap()).await.unwrap();
        let none = RateLimits::new(&config(""), Arc::default());
        assert!(!none.shapes_delivery());
        for _ in 0..1000 {
            none.tenant_message(0).await.unwrap();
            none.domain_message("x.example").await.unwrap();
        }
    }

    #[tokio::test]
    async fn domain_ready_waits_and_stops_on_cancel() {
        let l = RateLimits::new(
            &config(r#"domain_default = "20/s burst 1""#),
            Arc::default(),
        );
        let stop = CancellationToken::new();
        let start = Instant::now();
        for _ in 0..3 {
            assert!(l.domain_ready("x.example", &stop).await);
        }
        assert!(start.elapsed() >= Duration::from_millis(90));
        let slow = RateLimits::new(&config(r#"domain_default = "1/h burst 1""#), Arc::default());
        assert!(slow.domain_ready("x.example", &stop).await);
        stop.cancel();
        assert!(!slow.domain_ready("x.example", &stop).await);
    }

    #[tokio::test]
    async fn unreachable_redis_falls_back_to_local_limits() {
        let metrics = Arc::new(Metrics::default());
        let l = RateLimits::new(
            &config("tenant_messages = \"2/m\"\n[cluster]\nredis_url = \"redis://127.0.0.1:9\""),
            metrics.clone(),
        );
        l.tenant_message(0).await.unwrap();
        l.tenant_message(0).await.unwrap();
        assert!(l.tenant_message(0).await.is_err());
        assert_eq!(metrics.redis_fallbacks.load(Ordering::Relaxed), 3);
    }
}
