//! Prometheus metrics: a small registry of atomics, rendered in the
//! Prometheus text exposition format (version 0.0.4).
//!
//! Counters derived from events are fed by [`Metrics::observe`], which
//! the event bus calls for every event: a few relaxed
//! atomic additions indexed by closed enums, no lock and no allocation on
//! that path. The one exception is the per-rule rejection count, whose label
//! set is open; it takes a mutex, on rejections only. Gauges (queue size,
//! connections) are read from their owners at scrape time.
//!
//! Why not the `prometheus-client` crate: its labelled `Family` hashes the
//! label set and takes a `RwLock` on every increment, and it brings four more
//! crates; the closed label sets here make fixed arrays of atomics simpler
//! and cheaper, and the text format is a few lines of code.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::event::{Classification, Event, EventKind};

/// Every [`Classification`], in the order of [`class_index`].
const CLASSES: [Classification; 9] = [
    Classification::InvalidRecipient,
    Classification::MailboxFull,
    Classification::MessageTooLarge,
    Classification::SpamBlock,
    Classification::Policy,
    Classification::Dns,
    Classification::Tls,
    Classification::Network,
    Classification::Other,
];

fn class_index(c: Classification) -> usize {
    match c {
        Classification::InvalidRecipient => 0,
        Classification::MailboxFull => 1,
        Classification::MessageTooLarge => 2,
        Classification::SpamBlock => 3,
        Classification::Policy => 4,
        Classification::Dns => 5,
        Classification::Tls => 6,
        Classification::Network => 7,
        Classification::Other => 8,
    }
}

/// The label value of a classification: its name in events.
fn class_name(c: Classification) -> &'static str {
    match c {
        Classification::InvalidRecipient => "invalid_recipient",
        Classification::MailboxFull => "mailbox_full",
        Classification::MessageTooLarge => "message_too_large",
        Classification::SpamBlock => "spam_block",
        Classification::Policy => "policy",
        Classification::Dns => "dns",
        Classification::Tls => "tls",
        Classification::Network => "network",
        Classification::Other => "other",
    }
}

/// One counter per [`Classification`].
#[derive(Default)]
struct ByClass([AtomicU64; 9]);

impl ByClass {
    fn inc(&self, c: Option<Classification>) {
        let i = class_index(c.unwrap_or(Classification::Other));
        self.0[i].fetch_add(1, Ordering::Relaxed);
    }
    fn get(&self, c: Classification) -> u64 {
        self.0[class_index(c)].load(Ordering::Relaxed)
    }
}

/// Counters keyed by one label whose values are few but not known in
/// advance (a rule, a TLS version): locked, so only for paths that are
/// not per-byte hot.
#[derive(Default)]
pub struct Labeled(Mutex<BTreeMap<String, u64>>);

impl Labeled {
    pub fn inc(&self, label: &str) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match map.get_mut(label) {
            Some(n) => *n += 1,
            None => {
                map.insert(label.to_string(), 1);
            }
        }
    }

    pub fn get(&self, label: &str) -> u64 {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(label).copied().unwrap_or(0)
    }

    fn render(&self, out: &mut String, name: &str, help: &str, label: &str) {
        header(out, name, help, "counter");
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for (value, n) in map.iter() {
            let _ = writeln!(out, "{name}{{{label}=\"{}\"}} {n}", escape(value));
        }
    }
}

/// A histogram with fixed bucket bounds (in seconds).
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket, not cumulative; the last one is `+Inf`.
    buckets: Vec<AtomicU64>,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        header(out, name, help, "histogram");
        let mut cumulative = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        cumulative += self.buckets[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// Time from acceptance to delivery: seconds to days.
const DELIVERY_BOUNDS: &[f64] = &[1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0];
/// Durable write of an accepted message (the bulk of the time before 250).
const ENQUEUE_BOUNDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// End of DATA to reply: policy lookups (DNS) may dominate.
const ACCEPT_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// One DNS lookup, cached or not.
const DNS_BOUNDS: &[f64] = &[0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];

/// Counters and histograms of one node.
pub struct Metrics {
    received: AtomicU64,
    received_rcpts: AtomicU64,
    received_bytes: AtomicU64,
    /// Rejections by rule.
    rejected: Labeled,
    delivered: AtomicU64,
    delivered_tls: AtomicU64,
    deferred: ByClass,
    bounced: ByClass,
    expired: AtomicU64,
    complained: AtomicU64,
    suppressed: AtomicU64,
    /// Webhook requests answered 2xx (by the webhook sender).
    pub webhooks_delivered: AtomicU64,
    /// Webhook events given up (no 2xx within `retry_for`) or not stored.
    pub webhooks_failed: AtomicU64,
    /// Webhook events not yet delivered nor given up (set by the sender).
    pub webhooks_backlog: AtomicU64,
    /// From acceptance to the delivering 250 of each recipient.
    pub delivery_latency: Histogram,
    /// The queue's durable write of each accepted message.
    pub enqueue_latency: Histogram,
    /// From the end of DATA to the reply: policy, signing and the durable
    /// write together.
    pub accept_latency: Histogram,
    /// Submission sessions that completed a TLS handshake, by version.
    pub tls_in: Labeled,
    /// Delivery connections opened, by TLS version ("none" for plaintext).
    pub connections_out: Labeled,
    /// Recipients delivered over TLS, by how the certificate was checked
    /// (`tls_info.verified`: none, verify, mta-sts, dane, smarthost).
    delivered_verified: Labeled,
    /// MTA-STS lookups that found a record but no usable policy, by the
    /// TLS-RPT result type (sts-policy-fetch-error, ...).
    pub mta_sts_failures: Labeled,
    /// MTA-STS policies in the cache, unexpired (set by its owner).
    pub mta_sts_cached: AtomicU64,
    /// Sessions (or lookups) that failed a published TLS policy, MTA-STS
    /// or DANE, by TLS-RPT result type; testing-mode failures included.
    pub tls_policy_failures: Labeled,
    /// TLS reports (RFC 8460) posted or queued, by transport (https, mailto).
    pub tls_reports_sent: Labeled,
    /// TLS reports that could not be posted or queued, by transport.
    pub tls_reports_failed: Labeled,
    /// DNS lookups (MX, address, TXT) and how long they took.
    pub dns_latency: Histogram,
    /// DNS lookups that failed temporarily, by cause.
    pub dns_failures: Labeled,
    /// Rate-limit checks answered locally because Redis did not answer.
    pub redis_fallbacks: AtomicU64,
    /// The Redis events stream: events added, dropped, waiting (set by the
    /// stream's writer).
    pub stream_sent: AtomicU64,
    pub stream_dropped: AtomicU64,
    pub stream_pending: AtomicU64,
    /// The shared suppression list: changes waiting for Redis, failed
    /// Redis operations.
    pub suppression_redis_pending: AtomicU64,
    pub suppression_redis_errors: AtomicU64,
    /// DNSBL counters by zone, handed to each zone's checker.
    dnsbl: Mutex<BTreeMap<String, std::sync::Arc<DnsblCounters>>>,
}

/// The causes of a DNSBL lookup without a verdict, as the
/// `herald_dnsbl_errors_total` label names them; [`DnsblCounters::errors`]
/// is indexed in this order.
pub const DNSBL_ERROR_CAUSES: [&str; 4] = ["timeout", "dns", "error_code", "not_blocklist_answer"];

/// One DNSBL zone's live counters.
#[derive(Debug, Default)]
pub struct DnsblCounters {
    /// Queries sent (cache misses).
    pub lookups: AtomicU64,
    /// Lookups that found a listing.
    pub listings: AtomicU64,
    /// Lookups without a verdict, by [`DNSBL_ERROR_CAUSES`].
    pub errors: [AtomicU64; 4],
}

impl DnsblCounters {
    /// The counters now, for zone `zone`.
    pub fn read(&self, zone: &str) -> DnsblZone {
        DnsblZone {
            zone: zone.to_string(),
            lookups: self.lookups.load(Ordering::Relaxed),
            listings: self.listings.load(Ordering::Relaxed),
            errors: std::array::from_fn(|i| {
                (
                    DNSBL_ERROR_CAUSES[i],
                    self.errors[i].load(Ordering::Relaxed),
                )
            }),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            received: AtomicU64::new(0),
            received_rcpts: AtomicU64::new(0),
            received_bytes: AtomicU64::new(0),
            rejected: Labeled::default(),
            delivered: AtomicU64::new(0),
            delivered_tls: AtomicU64::new(0),
            deferred: ByClass::default(),
            bounced: ByClass::default(),
            expired: AtomicU64::new(0),
            complained: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            webhooks_delivered: AtomicU64::new(0),
            webhooks_failed: AtomicU64::new(0),
            webhooks_backlog: AtomicU64::new(0),
            delivery_latency: Histogram::new(DELIVERY_BOUNDS),
            enqueue_latency: Histogram::new(ENQUEUE_BOUNDS),
            accept_latency: Histogram::new(ACCEPT_BOUNDS),
            tls_in: Labeled::default(),
            connections_out: Labeled::default(),
            delivered_verified: Labeled::default(),
            mta_sts_failures: Labeled::default(),
            mta_sts_cached: AtomicU64::new(0),
            tls_policy_failures: Labeled::default(),
            tls_reports_sent: Labeled::default(),
            tls_reports_failed: Labeled::default(),
            dns_latency: Histogram::new(DNS_BOUNDS),
            dns_failures: Labeled::default(),
            redis_fallbacks: AtomicU64::new(0),
            stream_sent: AtomicU64::new(0),
            stream_dropped: AtomicU64::new(0),
            stream_pending: AtomicU64::new(0),
            suppression_redis_pending: AtomicU64::new(0),
            suppression_redis_errors: AtomicU64::new(0),
            dnsbl: Mutex::new(BTreeMap::new()),
        }
    }
}

/// Values read from their owners when metrics are scraped.
#[derive(Debug, Default)]
pub struct Gauges {
    /// Messages not yet finished.
    pub queue_messages: u64,
    /// Per recipient domain: (unfinished recipients, age in seconds of the
    /// oldest message waiting for it). Rendered for the largest domains only.
    pub queue_domains: Vec<(String, u64, u64)>,
    /// SMTP client connections open on the submission listeners.
    pub connections_open: u64,
    /// Delivery suspensions and reputation pauses in force.
    pub suspended_domains: u64,
    pub suspended_tenants: u64,
    pub paused_tenants: u64,
    /// What the spool's replay found damaged at start-up, and the files in
    /// its `corrupt/` directory.
    pub spool_damaged_records: u64,
    pub spool_lost_messages: u64,
    pub spool_quarantined_files: u64,
    /// The spool has no room for new messages.
    pub spool_full: bool,
    /// Rate-limit checks answered locally because Redis did not answer.
    pub redis_fallbacks: u64,
    /// The Redis events stream: events added, dropped, waiting.
    pub stream_sent: u64,
    pub stream_dropped: u64,
    pub stream_pending: u64,
    /// The shared suppression list: changes waiting, failed operations.
    pub suppression_redis_pending: u64,
    pub suppression_redis_errors: u64,
    /// DNSBL counters by zone.
    pub dnsbl: Vec<DnsblZone>,
}

/// One DNSBL zone's counters (the zones come from the config: a closed set).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DnsblZone {
    pub zone: String,
    /// Queries sent (cache misses).
    pub lookups: u64,
    /// Lookups that found a listing.
    pub listings: u64,
    /// Lookups without a verdict, by cause.
    pub errors: [(&'static str, u64); 4],
}

/// Domains shown with their own queue gauges; the rest only count in the
/// totals (a label per recipient domain would be unbounded).
pub const TOP_DOMAINS: usize = 20;

impl Metrics {
    /// The counters of DNSBL zone `zone` (lower case), shared by every
    /// checker of it.
    pub fn dnsbl_zone(&self, zone: &str) -> std::sync::Arc<DnsblCounters> {
        let mut map = self.dnsbl.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(zone.to_string()).or_default().clone()
    }

    /// Every DNSBL zone's counters now, by zone name.
    pub fn dnsbl_zones(&self) -> Vec<DnsblZone> {
        let map = self.dnsbl.lock().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|(zone, c)| c.read(zone)).collect()
    }

    /// Counts one event. Called for every event, on the hot path.
    pub fn observe(&self, e: &Event) {
        let one = |c: &AtomicU64| {
            c.fetch_add(1, Ordering::Relaxed);
        };
        match e.event {
            EventKind::Received => {
                one(&self.received);
                let n = e.recipients.as_ref().map_or(0, Vec::len) as u64;
                self.received_rcpts.fetch_add(n, Ordering::Relaxed);
                self.received_bytes
                    .fetch_add(e.size.unwrap_or(0), Ordering::Relaxed);
            }
            EventKind::Rejected => self.rejected.inc(e.rule.map_or("unknown", |r| r.as_str())),
            EventKind::Delivered => {
                one(&self.delivered);
                if e.tls.is_some() {
                    one(&self.delivered_tls);
                }
                if let Some(info) = &e.tls_info {
                    self.delivered_verified.inc(&info.verified);
                }
            }
            EventKind::Deferred => self.deferred.inc(e.classification),
            EventKind::Bounced => self.bounced.inc(e.classification),
            EventKind::Expired => one(&self.expired),
            EventKind::Complained => one(&self.complained),
            EventKind::Suppressed => one(&self.suppressed),
        }
    }

    /// The text exposition of every metric, with the gauges given.
    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::with_capacity(4096);
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);

        counter(
            &mut out,
            "herald_messages_received_total",
            "Messages accepted and queued (250 after DATA).",
            load(&self.received),
        );
        counter(
            &mut out,
            "herald_recipients_received_total",
            "Recipients of the messages accepted.",
            load(&self.received_rcpts),
        );
        counter(
            &mut out,
            "herald_received_bytes_total",
            "Size of the messages accepted, in bytes.",
            load(&self.received_bytes),
        );

        self.rejected.render(
            &mut out,
            "herald_rejected_total",
            "Refusals reported to the client, by the rule that refused.",
            "rule",
        );

        header(
            &mut out,
            "herald_recipients_delivered_total",
            "Recipients delivered (the MX answered 2xx), by whether the connection used TLS.",
            "counter",
        );
        let tls = load(&self.delivered_tls);
        let all = load(&self.delivered);
        let _ = writeln!(
            out,
            "herald_recipients_delivered_total{{tls=\"yes\"}} {tls}"
        );
        let _ = writeln!(
            out,
            "herald_recipients_delivered_total{{tls=\"no\"}} {}",
            all.saturating_sub(tls)
        );

        by_class(
            &mut out,
            "herald_recipients_deferred_total",
            "Delivery attempts that failed temporarily, by classification.",
            &self.deferred,
        );
        by_class(
            &mut out,
            "herald_recipients_bounced_total",
            "Recipients that failed permanently, by classification.",
            &self.bounced,
        );
        counter(
            &mut out,
            "herald_recipients_expired_total",
            "Recipients given up after the maximum queue lifetime (or deleted by the postmaster).",
            load(&self.expired),
        );
        counter(
            &mut out,
            "herald_complaints_total",
            "Complaints (ARF reports) received.",
            load(&self.complained),
        );
        counter(
            &mut out,
            "herald_suppressed_total",
            "Recipients refused because they are on the suppression list.",
            load(&self.suppressed),
        );

        counter(
            &mut out,
            "herald_webhooks_delivered_total",
            "Webhook requests the receiver answered with 2xx.",
            load(&self.webhooks_delivered),
        );
        counter(
            &mut out,
            "herald_webhooks_failed_total",
            "Webhook events given up after webhooks.retry_for (or not stored in the outbox).",
            load(&self.webhooks_failed),
        );
        counter(
            &mut out,
            "herald_ratelimit_redis_fallbacks_total",
            "Rate-limit checks answered by local limits because Redis did not answer.",
            g.redis_fallbacks,
        );
        counter(
            &mut out,
            "herald_events_stream_sent_total",
            "Events added to the Redis events stream.",
            g.stream_sent,
        );
        counter(
            &mut out,
            "herald_events_stream_dropped_total",
            "Events not added to the Redis events stream (buffer full while Redis was down); they are in the events log.",
            g.stream_dropped,
        );
        gauge(
            &mut out,
            "herald_events_stream_pending",
            "Events waiting to be added to the Redis events stream.",
            g.stream_pending,
        );
        gauge(
            &mut out,
            "herald_suppression_redis_pending",
            "Suppression list changes waiting to be shared through Redis.",
            g.suppression_redis_pending,
        );
        counter(
            &mut out,
            "herald_suppression_redis_errors_total",
            "Failed Redis operations of the shared suppression list (the node then uses its own copy).",
            g.suppression_redis_errors,
        );
        dnsbl(&mut out, &g.dnsbl);
        gauge(
            &mut out,
            "herald_webhooks_backlog",
            "Webhook events waiting to be delivered (including retries and requests in flight).",
            load(&self.webhooks_backlog),
        );
        gauge(
            &mut out,
            "herald_queue_messages",
            "Messages in the queue (not yet finished).",
            g.queue_messages,
        );
        header(
            &mut out,
            "herald_queue_recipients",
            "Unfinished recipients in the queue, for the largest recipient domains.",
            "gauge",
        );
        for (d, n, _) in &g.queue_domains {
            let _ = writeln!(
                out,
                "herald_queue_recipients{{domain=\"{}\"}} {n}",
                escape(d)
            );
        }
        header(
            &mut out,
            "herald_queue_oldest_age_seconds",
            "Age of the oldest message waiting, for the largest recipient domains.",
            "gauge",
        );
        for (d, _, age) in &g.queue_domains {
            let _ = writeln!(
                out,
                "herald_queue_oldest_age_seconds{{domain=\"{}\"}} {age}",
                escape(d)
            );
        }
        gauge(
            &mut out,
            "herald_connections_open",
            "SMTP client connections open on the submission listeners.",
            g.connections_open,
        );
        gauge(
            &mut out,
            "herald_suspended_domains",
            "Destination domains whose delivery is suspended by the postmaster.",
            g.suspended_domains,
        );
        gauge(
            &mut out,
            "herald_suspended_tenants",
            "Tenants whose delivery is suspended by the postmaster.",
            g.suspended_tenants,
        );
        gauge(
            &mut out,
            "herald_paused_tenants",
            "Tenants whose submissions are paused for their reputation.",
            g.paused_tenants,
        );
        counter(
            &mut out,
            "herald_spool_damaged_records_total",
            "Spool records skipped at start-up because they failed their checks (damage on disk; see GET /api/queue and the log).",
            g.spool_damaged_records,
        );
        counter(
            &mut out,
            "herald_spool_lost_messages_total",
            "Accepted messages not recovered at start-up because their spool record was damaged.",
            g.spool_lost_messages,
        );
        gauge(
            &mut out,
            "herald_spool_quarantined_segments",
            "Files kept in the spool's corrupt/ directory: damaged segments and unusable segment files.",
            g.spool_quarantined_files,
        );
        gauge(
            &mut out,
            "herald_spool_full",
            "1 while the spool has no room for a new segment: new messages are refused, queued ones are still delivered.",
            u64::from(g.spool_full),
        );

        self.delivery_latency.render(
            &mut out,
            "herald_delivery_latency_seconds",
            "Time from acceptance to delivery of each recipient (1 s resolution).",
        );
        self.enqueue_latency.render(
            &mut out,
            "herald_enqueue_latency_seconds",
            "Time to store an accepted message durably, before the 250 reply.",
        );
        self.accept_latency.render(
            &mut out,
            "herald_accept_latency_seconds",
            "Time from the end of DATA to the 250 of accepted messages (policy, DKIM, durable write).",
        );
        self.tls_in.render(
            &mut out,
            "herald_tls_sessions_in_total",
            "Client sessions that completed TLS (STARTTLS or implicit), by version.",
            "version",
        );
        self.connections_out.render(
            &mut out,
            "herald_connections_out_total",
            "Delivery connections opened, by TLS version (\"none\" = plaintext).",
            "tls",
        );
        self.delivered_verified.render(
            &mut out,
            "herald_delivered_tls_verified_total",
            "Recipients delivered over TLS, by how the server's certificate was checked (none, verify, mta-sts, dane, smarthost).",
            "verified",
        );
        self.mta_sts_failures.render(
            &mut out,
            "herald_mta_sts_failures_total",
            "MTA-STS lookups that found a record but no usable policy, by TLS-RPT result type.",
            "result",
        );
        gauge(
            &mut out,
            "herald_mta_sts_cached_policies",
            "MTA-STS policies cached and unexpired.",
            self.mta_sts_cached.load(Ordering::Relaxed),
        );
        self.tls_policy_failures.render(
            &mut out,
            "herald_tls_policy_failures_total",
            "Delivery sessions that failed a published TLS policy (MTA-STS, DANE; testing mode included), by TLS-RPT result type.",
            "result",
        );
        self.tls_reports_sent.render(
            &mut out,
            "herald_tls_reports_sent_total",
            "TLS reports (RFC 8460) posted to https: report URIs or queued for mailto: ones, by transport.",
            "transport",
        );
        self.tls_reports_failed.render(
            &mut out,
            "herald_tls_reports_failed_total",
            "TLS reports that could not be posted or queued (retried later), by transport.",
            "transport",
        );
        self.dns_latency.render(
            &mut out,
            "herald_dns_lookup_seconds",
            "DNS lookups for routing and policy (MX, address, TXT), by duration.",
        );
        self.dns_failures.render(
            &mut out,
            "herald_dns_failures_total",
            "DNS lookups that failed temporarily (timeout, SERVFAIL, ...), by cause.",
            "cause",
        );
        out
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn counter(out: &mut String, name: &str, help: &str, v: u64) {
    header(out, name, help, "counter");
    let _ = writeln!(out, "{name} {v}");
}

fn gauge(out: &mut String, name: &str, help: &str, v: u64) {
    header(out, name, help, "gauge");
    let _ = writeln!(out, "{name} {v}");
}

/// DNSBL counters by zone (the zones come from the config: a closed set).
fn dnsbl(out: &mut String, zones: &[DnsblZone]) {
    header(
        out,
        "herald_dnsbl_lookups_total",
        "DNSBL queries sent (cache misses), by zone.",
        "counter",
    );
    for z in zones {
        let _ = writeln!(
            out,
            "herald_dnsbl_lookups_total{{zone=\"{}\"}} {}",
            escape(&z.zone),
            z.lookups
        );
    }
    header(
        out,
        "herald_dnsbl_listings_total",
        "DNSBL lookups that found a listing, by zone.",
        "counter",
    );
    for z in zones {
        let _ = writeln!(
            out,
            "herald_dnsbl_listings_total{{zone=\"{}\"}} {}",
            escape(&z.zone),
            z.listings
        );
    }
    header(
        out,
        "herald_dnsbl_errors_total",
        "DNSBL lookups without a verdict (treated as not listed), by zone and cause.",
        "counter",
    );
    for z in zones {
        for (cause, n) in z.errors {
            let _ = writeln!(
                out,
                "herald_dnsbl_errors_total{{zone=\"{}\",cause=\"{cause}\"}} {n}",
                escape(&z.zone)
            );
        }
    }
}

fn by_class(out: &mut String, name: &str, help: &str, c: &ByClass) {
    header(out, name, help, "counter");
    for class in CLASSES {
        let _ = writeln!(
            out,
            "{name}{{classification=\"{}\"}} {}",
            class_name(class),
            c.get(class)
        );
    }
}

/// A label value in the text format: backslash, quote and line feed escaped.
fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for ch in v.chars() {
        match ch {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(prefix) && l[prefix.len()..].starts_with(' '))
            .unwrap_or_else(|| panic!("no line {prefix} in\n{text}"))
    }

    #[test]
    fn events_are_counted_by_kind_and_label() {
        let m = Metrics::default();
        let mut e = Event::new(EventKind::Bounced, "a@b.test");
        e.classification = Some(Classification::InvalidRecipient);
        m.observe(&e);
        m.observe(&e);
        let mut d = Event::new(EventKind::Delivered, "a@b.test");
        m.observe(&d);
        d.tls = Some("TLSv1.3".into());
        m.observe(&d);
        let mut r = Event::new(EventKind::Rejected, "a@b.test");
        r.rule = Some(crate::event::RejectRule::SenderNotAllowed);
        m.observe(&r);
        let text = m.render(&Gauges::default());
        assert_eq!(
            line(
                &text,
                "herald_recipients_bounced_total{classification=\"invalid_recipient\"}"
            ),
            "herald_recipients_bounced_total{classification=\"invalid_recipient\"} 2"
        );
        assert!(text.contains("herald_recipients_delivered_total{tls=\"yes\"} 1\n"));
        assert!(text.contains("herald_recipients_delivered_total{tls=\"no\"} 1\n"));
        assert!(text.contains("herald_rejected_total{rule=\"sender_not_allowed\"} 1\n"));
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.enqueue_latency.observe(Duration::from_micros(300));
        m.enqueue_latency.observe(Duration::from_millis(3));
        m.enqueue_latency.observe(Duration::from_secs(5));
        let text = m.render(&Gauges::default());
        assert!(text.contains("herald_enqueue_latency_seconds_bucket{le=\"0.0005\"} 1\n"));
        assert!(text.contains("herald_enqueue_latency_seconds_bucket{le=\"0.005\"} 2\n"));
        assert!(text.contains("herald_enqueue_latency_seconds_bucket{le=\"1\"} 2\n"));
        assert!(text.contains("herald_enqueue_latency_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("herald_enqueue_latency_seconds_count 3\n"));
    }

    #[test]
    fn spool_damage_is_rendered() {
        let m = Metrics::default();
        let text = m.render(&Gauges {
            spool_damaged_records: 2,
            spool_lost_messages: 1,
            spool_quarantined_files: 3,
            spool_full: true,
            ..Gauges::default()
        });
        assert_eq!(
            line(&text, "herald_spool_damaged_records_total"),
            "herald_spool_damaged_records_total 2"
        );
        assert_eq!(
            line(&text, "herald_spool_lost_messages_total"),
            "herald_spool_lost_messages_total 1"
        );
        assert_eq!(
            line(&text, "herald_spool_quarantined_segments"),
            "herald_spool_quarantined_segments 3"
        );
        assert_eq!(line(&text, "herald_spool_full"), "herald_spool_full 1");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
