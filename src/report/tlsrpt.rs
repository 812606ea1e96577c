//! TLS-RPT (RFC 8460): counts of delivery sessions per UTC day and policy,
//! kept durable under `<spool_dir>/tlsrpt/`, the daily reports built from
//! them, and their upload to `https:` report URIs. (Mailed reports go
//! through the queue: `queue::tlsrpt` sends both kinds.)
//!
//! Delivery calls [`TlsRptCounts::success`] or [`TlsRptCounts::failure`]
//! once per SMTP session with a domain that has an MTA-STS or DANE policy:
//! a mutex'd map, no I/O. [`TlsRptCounts::flush`] writes each changed day
//! to `YYYY-MM-DD.json` (temp file, fsync, rename, fsync of the directory);
//! the sender calls it every few seconds and the queue at shutdown, and
//! [`TlsRptCounts::open`] reads the files back at start, so a restart loses
//! at most the last few seconds before a crash. The same file records which
//! report URIs of each domain were served, so that a restart neither sends
//! a report twice nor forgets one.
//!
//! Memory is bounded: at most [`MAX_DETAILS`] distinct failure details per
//! policy (later ones are counted under one aggregate detail per result
//! type, so totals stay right), at most [`MAX_POLICIES`] policies per day
//! (later ones are dropped and logged), [`KEEP_DAYS`] days.
//!
//! Trusted input: delivery's own observations. The JSON written follows
//! RFC 8460 §4.4: no `null` members, policy and result types from the RFC's
//! lists only (mail-auth's catch-all `Other` is mapped to one of them).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::Body;
use hyper::{Request, header};
use mail_auth::report::tlsrpt::{
    DateRange, FailureDetails, Policy, PolicyDetails, PolicyType, ResultType, Summary, TlsReport,
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// Distinct failure details kept per policy and day; further ones are
/// counted under an aggregate detail of their result type.
pub const MAX_DETAILS: usize = 100;
/// Distinct policies kept per day; sessions under further ones are dropped.
pub const MAX_POLICIES: usize = 10_000;
/// Days kept before today: reports not sent by then are given up.
pub const KEEP_DAYS: i64 = 3;
/// Bytes of `additional-information` kept per detail (error texts).
const MAX_TEXT: usize = 256;
/// `additional-information` of the aggregate detail.
pub const AGGREGATE_NOTE: &str = "further failures of this result type, not itemized";

/// One UTC day, as days since 1970-01-01; written `YYYY-MM-DD`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UtcDay(pub i64);

impl UtcDay {
    /// The day holding Unix time `secs`.
    pub fn of_unix(secs: u64) -> UtcDay {
        UtcDay((secs / 86_400) as i64)
    }

    /// The day it is now (UTC).
    pub fn today() -> UtcDay {
        UtcDay::of_unix(crate::clock::unix_now())
    }

    /// Unix time of its first second.
    pub fn start(self) -> i64 {
        self.0 * 86_400
    }

    /// Unix time of its last second (RFC 8460's example ends a daily
    /// report at 23:59:59Z).
    pub fn end(self) -> i64 {
        self.start() + 86_399
    }

    pub fn prev(self) -> UtcDay {
        UtcDay(self.0 - 1)
    }

    pub fn next(self) -> UtcDay {
        UtcDay(self.0 + 1)
    }

    fn date(self) -> time::Date {
        time::OffsetDateTime::from_unix_timestamp(self.start())
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
            .date()
    }
}

impl fmt::Display for UtcDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.date();
        write!(f, "{:04}-{:02}-{:02}", d.year(), d.month() as u8, d.day())
    }
}

impl std::str::FromStr for UtcDay {
    type Err = String;

    fn from_str(s: &str) -> Result<UtcDay, String> {
        let bad = || format!("{s:?} is not a day (YYYY-MM-DD)");
        let mut parts = s.splitn(3, '-');
        let mut next = || parts.next().ok_or_else(bad);
        let (y, m, d) = (next()?, next()?, next()?);
        let y: i32 = y.parse().map_err(|_| bad())?;
        let m: u8 = m.parse().map_err(|_| bad())?;
        let d: u8 = d.parse().map_err(|_| bad())?;
        let month = time::Month::try_from(m).map_err(|_| bad())?;
        let date = time::Date::from_calendar_date(y, month, d).map_err(|_| bad())?;
        Ok(UtcDay(
            date.midnight()
                .assume_utc()
                .unix_timestamp()
                .div_euclid(86_400),
        ))
    }
}

impl Serialize for UtcDay {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for UtcDay {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// RFC 8460 §4.4 `policy-type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Kind {
    Sts,
    Tlsa,
    NoPolicyFound,
}

/// What a policy is counted under: RFC 8460's policy fields.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
struct PolicyKey {
    kind: Kind,
    /// Lower case, without a trailing dot.
    domain: String,
    strings: Vec<String>,
    mx_hosts: Vec<String>,
}

impl PolicyKey {
    fn of(p: &PolicyDetails) -> PolicyKey {
        PolicyKey {
            kind: match p.policy_type {
                PolicyType::Sts => Kind::Sts,
                PolicyType::Tlsa => Kind::Tlsa,
                // mail-auth's catch-all is no RFC value; the RFC's own
                // "no policy" is the honest reading of it.
                PolicyType::NoPolicyFound | PolicyType::Other => Kind::NoPolicyFound,
            },
            domain: normal_domain(&p.policy_domain),
            strings: p.policy_string.clone(),
            mx_hosts: p.mx_host.clone(),
        }
    }

    fn details(&self) -> PolicyDetails {
        PolicyDetails {
            policy_type: match self.kind {
                Kind::Sts => PolicyType::Sts,
                Kind::Tlsa => PolicyType::Tlsa,
                Kind::NoPolicyFound => PolicyType::NoPolicyFound,
            },
            policy_string: self.strings.clone(),
            policy_domain: self.domain.clone(),
            mx_host: self.mx_hosts.clone(),
        }
    }
}

fn normal_domain(d: &str) -> String {
    d.trim_end_matches('.').to_ascii_lowercase()
}

/// What failures are counted under: RFC 8460's failure-detail fields but
/// the count.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
struct DetailKey {
    result_type: ResultType,
    sending_mta_ip: Option<IpAddr>,
    receiving_mx_hostname: Option<String>,
    receiving_mx_helo: Option<String>,
    receiving_ip: Option<IpAddr>,
    additional_information: Option<String>,
    failure_reason_code: Option<String>,
}

impl DetailKey {
    fn of(d: FailureDetails) -> DetailKey {
        DetailKey {
            result_type: match d.result_type {
                // mail-auth's catch-all is no RFC value: RFC 8460 §4.3.2.3
                // names validation-failure for failures not listed.
                ResultType::Other => ResultType::ValidationFailure,
                t => t,
            },
            sending_mta_ip: d.sending_mta_ip,
            receiving_mx_hostname: d.receiving_mx_hostname,
            receiving_mx_helo: d.receiving_mx_helo,
            receiving_ip: d.receiving_ip,
            additional_information: d.additional_information.map(|mut s| {
                if s.len() > MAX_TEXT {
                    let mut end = MAX_TEXT;
                    while !s.is_char_boundary(end) {
                        end -= 1;
                    }
                    s.truncate(end);
                }
                s
            }),
            failure_reason_code: d.failure_reason_code,
        }
    }

    fn aggregate(result_type: ResultType) -> DetailKey {
        DetailKey {
            result_type,
            sending_mta_ip: None,
            receiving_mx_hostname: None,
            receiving_mx_helo: None,
            receiving_ip: None,
            additional_information: Some(AGGREGATE_NOTE.to_string()),
            failure_reason_code: None,
        }
    }

    fn is_aggregate(&self) -> bool {
        *self == DetailKey::aggregate(self.result_type)
    }

    fn details(&self, count: u64) -> FailureDetails {
        FailureDetails {
            result_type: self.result_type,
            sending_mta_ip: self.sending_mta_ip,
            receiving_mx_hostname: self.receiving_mx_hostname.clone(),
            receiving_mx_helo: self.receiving_mx_helo.clone(),
            receiving_ip: self.receiving_ip,
            failed_session_count: clamp(count),
            additional_information: self.additional_information.clone(),
            failure_reason_code: self.failure_reason_code.clone(),
        }
    }
}

fn clamp(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[derive(Clone, Debug, Default)]
struct PolicyCounts {
    successes: u64,
    failures: u64,
    details: HashMap<DetailKey, u64>,
    /// Details in `details` that are not aggregates.
    itemized: usize,
}

impl PolicyCounts {
    fn fail(&mut self, key: DetailKey) {
        self.failures += 1;
        if let Some(n) = self.details.get_mut(&key) {
            *n += 1;
        } else if self.itemized < MAX_DETAILS {
            self.itemized += 1;
            self.details.insert(key, 1);
        } else {
            *self
                .details
                .entry(DetailKey::aggregate(key.result_type))
                .or_default() += 1;
        }
    }
}

/// What has been sent of one domain's report for one day.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainSent {
    /// Report URIs (as published) the report went to: posted, or handed
    /// to the queue.
    #[serde(default)]
    pub delivered: BTreeSet<String>,
    /// Nothing more to send: every URI served, or the domain publishes no
    /// usable TLS-RPT record.
    #[serde(default)]
    pub complete: bool,
}

#[derive(Default)]
struct DayCounts {
    policies: HashMap<PolicyKey, PolicyCounts>,
    sent: BTreeMap<String, DomainSent>,
    /// Changed since last written.
    dirty: bool,
    /// Sessions not counted because of [`MAX_POLICIES`].
    dropped: u64,
}

/// The day file: a day's counts and what was sent of them.
#[derive(Serialize, Deserialize)]
struct DayFile {
    day: UtcDay,
    policies: Vec<SavedPolicy>,
    #[serde(default)]
    sent: BTreeMap<String, DomainSent>,
}

#[derive(Serialize, Deserialize)]
struct SavedPolicy {
    policy: PolicyKey,
    successes: u64,
    failures: u64,
    #[serde(default)]
    details: Vec<SavedDetail>,
}

#[derive(Serialize, Deserialize)]
struct SavedDetail {
    detail: DetailKey,
    count: u64,
}

/// The fields of a report that are not counts.
#[derive(Clone, Debug)]
pub struct ReportSource {
    /// `organization-name`.
    pub organization: String,
    /// `contact-info`.
    pub contact: String,
    /// The submitter's host name: `TLS-Report-Submitter`, and the domain
    /// of the report-id.
    pub submitter: String,
}

/// Per UTC day and policy: successful sessions, failed ones, and the
/// failures by detail. Cheap to clone (one shared store).
#[derive(Clone, Default)]
pub struct TlsRptCounts {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    days: Mutex<BTreeMap<UtcDay, DayCounts>>,
    /// Where day files go; none: kept in memory only.
    dir: Option<PathBuf>,
    /// Held while a day file is written, so writes of one day never cross.
    disk: Mutex<()>,
}

impl TlsRptCounts {
    /// Counts kept in `dir` (created if missing): the day files found there
    /// are read back; a damaged one is logged and set aside as `.bad`.
    pub fn open(dir: &Path) -> io::Result<TlsRptCounts> {
        std::fs::create_dir_all(dir)?;
        let mut days = BTreeMap::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if name.ends_with(".tmp") {
                // A write that did not finish; the file it was to replace
                // is intact.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let Some(stem) = name.strip_suffix(".json") else {
                continue;
            };
            if stem.parse::<UtcDay>().is_err() {
                continue;
            }
            match read_day(&path) {
                Ok((day, counts)) => {
                    days.insert(day, counts);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "TLS report counts unreadable; set aside");
                    let _ = std::fs::rename(&path, path.with_extension("json.bad"));
                }
            }
        }
        Ok(TlsRptCounts {
            inner: Arc::new(Inner {
                days: Mutex::new(days),
                dir: Some(dir.to_path_buf()),
                disk: Mutex::new(()),
            }),
        })
    }

    /// One session that met `policy`.
    pub fn success(&self, policy: &PolicyDetails) {
        self.add(UtcDay::today(), policy, None);
    }

    /// One session that failed `policy` as `detail` says
    /// (`failed_session_count` is ignored: this is one session).
    pub fn failure(&self, policy: &PolicyDetails, detail: FailureDetails) {
        self.add(UtcDay::today(), policy, Some(detail));
    }

    fn add(&self, day: UtcDay, policy: &PolicyDetails, failure: Option<FailureDetails>) {
        let key = PolicyKey::of(policy);
        let mut days = self.lock();
        let counts = days.entry(day).or_default();
        counts.dirty = true;
        let n = counts.policies.len();
        let p = match counts.policies.get_mut(&key) {
            Some(p) => p,
            None if n >= MAX_POLICIES => {
                counts.dropped += 1;
                if counts.dropped == 1 {
                    tracing::warn!(%day, limit = MAX_POLICIES, "TLS report counts: too many policies today; further ones are not counted");
                }
                return;
            }
            None => counts.policies.entry(key).or_default(),
        };
        match failure {
            None => p.successes += 1,
            Some(d) => p.fail(DetailKey::of(d)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<UtcDay, DayCounts>> {
        self.inner
            .days
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The days that have counts, oldest first.
    pub fn days(&self) -> Vec<UtcDay> {
        self.lock().keys().copied().collect()
    }

    /// Successful and failed sessions of `day`, over every policy.
    pub fn totals(&self, day: UtcDay) -> (u64, u64) {
        self.lock().get(&day).map_or((0, 0), |c| {
            c.policies
                .values()
                .fold((0, 0), |(s, f), p| (s + p.successes, f + p.failures))
        })
    }

    /// The policy domains of `day` whose report is not complete, sorted.
    pub fn unfinished(&self, day: UtcDay) -> Vec<String> {
        self.lock().get(&day).map(unfinished_in).unwrap_or_default()
    }

    /// What has been sent of `domain`'s report for `day`.
    pub fn sent(&self, day: UtcDay, domain: &str) -> DomainSent {
        self.lock()
            .get(&day)
            .and_then(|c| c.sent.get(&normal_domain(domain)).cloned())
            .unwrap_or_default()
    }

    /// Records durably that `domain`'s report for `day` went to `uri`.
    pub async fn mark_delivered(&self, day: UtcDay, domain: &str, uri: &str) -> io::Result<()> {
        self.change_sent(day, domain, |s| {
            s.delivered.insert(uri.to_string());
        })
        .await
    }

    /// Records durably that nothing more is to be sent of `domain`'s report
    /// for `day`.
    pub async fn mark_complete(&self, day: UtcDay, domain: &str) -> io::Result<()> {
        self.change_sent(day, domain, |s| s.complete = true).await
    }

    async fn change_sent(
        &self,
        day: UtcDay,
        domain: &str,
        change: impl FnOnce(&mut DomainSent),
    ) -> io::Result<()> {
        {
            let mut days = self.lock();
            let c = days.entry(day).or_default();
            change(c.sent.entry(normal_domain(domain)).or_default());
            c.dirty = true;
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.write_day(day))
            .await
            .map_err(io::Error::other)?
    }

    /// The report of `domain` for `day`, or none when nothing was counted
    /// for it. Its report-id is the same whenever it is built, so that a
    /// receiver can recognise a report sent again after a crash.
    pub fn report(&self, day: UtcDay, domain: &str, source: &ReportSource) -> Option<TlsReport> {
        let domain = normal_domain(domain);
        let days = self.lock();
        let c = days.get(&day)?;
        let mut policies: Vec<(&PolicyKey, &PolicyCounts)> = c
            .policies
            .iter()
            .filter(|(k, _)| k.domain == domain)
            .collect();
        if policies.is_empty() {
            return None;
        }
        policies.sort_by(|a, b| a.0.cmp(b.0));
        let policies = policies
            .into_iter()
            .map(|(key, counts)| {
                let mut details: Vec<FailureDetails> =
                    counts.details.iter().map(|(k, n)| k.details(*n)).collect();
                // Most frequent first; the rest only for a stable order.
                details.sort_by(|a, b| {
                    b.failed_session_count
                        .cmp(&a.failed_session_count)
                        .then_with(|| format!("{a:?}").cmp(&format!("{b:?}")))
                });
                Policy {
                    policy: key.details(),
                    summary: Summary {
                        total_success: clamp(counts.successes),
                        total_failure: clamp(counts.failures),
                    },
                    failure_details: details,
                }
            })
            .collect();
        Some(TlsReport {
            organization_name: Some(source.organization.clone()),
            date_range: DateRange::from_timestamps(day.start(), day.end()),
            contact_info: Some(source.contact.clone()),
            report_id: format!("{day}.{domain}@{}", source.submitter),
            policies,
        })
    }

    /// Writes every day changed since its last write.
    pub async fn flush(&self) -> io::Result<()> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let dirty: Vec<UtcDay> = me
                .lock()
                .iter()
                .filter(|(_, c)| c.dirty)
                .map(|(d, _)| *d)
                .collect();
            dirty.into_iter().try_for_each(|d| me.write_day(d))
        })
        .await
        .map_err(io::Error::other)?
    }

    /// Forgets the days before `today - KEEP_DAYS`, in memory and on disk.
    pub async fn prune(&self, today: UtcDay) -> io::Result<()> {
        let old: BTreeMap<UtcDay, DayCounts> = {
            let mut days = self.lock();
            let keep = days.split_off(&UtcDay(today.0 - KEEP_DAYS));
            std::mem::replace(&mut *days, keep)
        };
        for (day, c) in &old {
            let unfinished = unfinished_in(c);
            if !unfinished.is_empty() {
                tracing::warn!(%day, domains = unfinished.len(), "TLS reports given up: not sent within {KEEP_DAYS} days");
            }
        }
        let old: Vec<UtcDay> = old.into_keys().collect();
        let Some(dir) = self.inner.dir.clone() else {
            return Ok(());
        };
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let _disk = me.inner.disk.lock().unwrap_or_else(PoisonError::into_inner);
            for day in old {
                match std::fs::remove_file(dir.join(format!("{day}.json"))) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            Ok(())
        })
        .await
        .map_err(io::Error::other)?
    }

    /// Writes `day`'s file from memory: temp file, fsync, rename, fsync of
    /// the directory. Blocking.
    fn write_day(&self, day: UtcDay) -> io::Result<()> {
        let Some(dir) = &self.inner.dir else {
            return Ok(());
        };
        let _disk = self
            .inner
            .disk
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let bytes = {
            let mut days = self.lock();
            let Some(c) = days.get_mut(&day) else {
                return Ok(());
            };
            c.dirty = false;
            serde_json::to_vec(&snapshot(day, c)).map_err(io::Error::other)?
        };
        let written = write_atomically(dir, &format!("{day}.json"), &bytes);
        if written.is_err()
            && let Some(c) = self.lock().get_mut(&day)
        {
            c.dirty = true;
        }
        written
    }
}

/// The policy domains of a day whose report is not complete, sorted.
fn unfinished_in(c: &DayCounts) -> Vec<String> {
    let domains: BTreeSet<&String> = c.policies.keys().map(|k| &k.domain).collect();
    domains
        .into_iter()
        .filter(|d| !c.sent.get(*d).is_some_and(|s| s.complete))
        .cloned()
        .collect()
}

fn snapshot(day: UtcDay, c: &DayCounts) -> DayFile {
    let mut policies: Vec<SavedPolicy> = c
        .policies
        .iter()
        .map(|(k, p)| SavedPolicy {
            policy: k.clone(),
            successes: p.successes,
            failures: p.failures,
            details: p
                .details
                .iter()
                .map(|(d, n)| SavedDetail {
                    detail: d.clone(),
                    count: *n,
                })
                .collect(),
        })
        .collect();
    policies.sort_by(|a, b| a.policy.cmp(&b.policy));
    DayFile {
        day,
        policies,
        sent: c.sent.clone(),
    }
}

fn read_day(path: &Path) -> io::Result<(UtcDay, DayCounts)> {
    let file: DayFile = serde_json::from_slice(&std::fs::read(path)?).map_err(io::Error::other)?;
    let mut counts = DayCounts {
        sent: file.sent,
        ..DayCounts::default()
    };
    for p in file.policies {
        let details: HashMap<DetailKey, u64> =
            p.details.into_iter().map(|d| (d.detail, d.count)).collect();
        let itemized = details.keys().filter(|k| !k.is_aggregate()).count();
        counts.policies.insert(
            p.policy,
            PolicyCounts {
                successes: p.successes,
                failures: p.failures,
                details,
                itemized,
            },
        );
    }
    Ok((file.day, counts))
}

/// Replaces `dir/name` with `bytes` so that a crash leaves the old file or
/// the new one, never a mix.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

/// The report as RFC 8460 §4.4 JSON. mail-auth writes absent optional
/// fields as `null`, which the RFC's schema does not allow: they are left
/// out, as are empty optional arrays.
pub fn report_json(report: &TlsReport) -> Result<String, serde_json::Error> {
    let mut v = serde_json::to_value(report)?;
    strip_absent(&mut v);
    serde_json::to_string(&v)
}

fn strip_absent(v: &mut Value) {
    const OPTIONAL_ARRAYS: [&str; 3] = ["policy-string", "mx-host", "failure-details"];
    match v {
        Value::Object(map) => {
            map.retain(|k, v| {
                !(v.is_null()
                    || (OPTIONAL_ARRAYS.contains(&k.as_str())
                        && v.as_array().is_some_and(Vec::is_empty)))
            });
            map.values_mut().for_each(strip_absent);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_absent),
        _ => {}
    }
}

/// gzip of `data` (RFC 8460 §5.1: reports travel gzip-compressed).
pub fn gzip(data: &[u8]) -> io::Result<Vec<u8>> {
    use mail_auth::flate2::{Compression, write::GzEncoder};
    let mut e = GzEncoder::new(Vec::with_capacity(data.len() / 4), Compression::default());
    e.write_all(data)?;
    e.finish()
}

/// The media type of a gzipped report (RFC 8460 §6.4).
pub const GZIP_MEDIA_TYPE: &str = "application/tlsrpt+gzip";

/// Why a report could not be posted to an `https:` report URI.
#[derive(Debug, thiserror::Error)]
pub enum PostError {
    #[error("{0}")]
    Uri(String),
    #[error("cannot connect to {host}:{port}: {source}")]
    Connect {
        host: String,
        port: u16,
        source: io::Error,
    },
    #[error("TLS with {host}: {source}")]
    Tls { host: String, source: io::Error },
    #[error("{0}")]
    Http(String),
    #[error("answered {status}{}", if .status.is_redirection() { " (redirects are not followed)" } else { "" })]
    Status { status: hyper::StatusCode },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// POSTs a gzipped report to `uri` (RFC 8460 §5.4): the host's addresses
/// from `dns`, tried in turn; its certificate verified by `tls`; no
/// redirect followed; all within `timeout`. Ok on 2xx.
pub async fn post(
    uri: &str,
    gzipped: Vec<u8>,
    dns: &crate::dns::Dns,
    tls: &tokio_rustls::TlsConnector,
    timeout: Duration,
) -> Result<(), PostError> {
    let t = crate::config::webhook::Target::parse(uri).map_err(PostError::Uri)?;
    if !t.https {
        return Err(PostError::Uri(format!("{uri:?} is not an https: URI")));
    }
    let req = Request::post(t.path_and_query.as_str())
        .header(header::HOST, t.authority.as_str())
        .header(header::CONTENT_TYPE, GZIP_MEDIA_TYPE)
        .header(
            header::USER_AGENT,
            concat!("herald/", env!("CARGO_PKG_VERSION")),
        )
        .body(Body::from(gzipped))
        .map_err(|e| PostError::Http(format!("bad request: {e}")))?;
    let status = tokio::time::timeout(timeout, async {
        let tcp = connect(dns, &t.host, t.port).await?;
        let name = rustls::pki_types::ServerName::try_from(t.host.clone())
            .map_err(|e| PostError::Uri(format!("{uri:?}: server name: {e}")))?;
        let stream = tls
            .connect(name, tcp)
            .await
            .map_err(|source| PostError::Tls {
                host: t.host.clone(),
                source,
            })?;
        super::webhook::send(stream, req)
            .await
            .map_err(PostError::Http)
    })
    .await
    .map_err(|_| PostError::Timeout(timeout))??;
    if status.is_success() {
        Ok(())
    } else {
        Err(PostError::Status { status })
    }
}

/// A connection to `host` (a name or an address literal) on `port`: its
/// addresses from herald's resolver, tried in turn.
async fn connect(
    dns: &crate::dns::Dns,
    host: &str,
    port: u16,
) -> Result<tokio::net::TcpStream, PostError> {
    let addrs = dns.ips(host).await.map_err(|e| PostError::Connect {
        host: host.to_string(),
        port,
        source: io::Error::other(e),
    })?;
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the name has no address");
    for ip in addrs {
        match tokio::net::TcpStream::connect((ip, port)).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = e,
        }
    }
    Err(PostError::Connect {
        host: host.to_string(),
        port,
        source: last,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sts(domain: &str) -> PolicyDetails {
        PolicyDetails {
            policy_type: PolicyType::Sts,
            policy_string: vec!["version: STSv1".into(), "mode: enforce".into()],
            policy_domain: domain.into(),
            mx_host: vec!["mx.example.test".into()],
        }
    }

    fn fail(t: ResultType, mx: &str) -> FailureDetails {
        FailureDetails::new(t).with_receiving_mx_hostname(mx)
    }

    const DAY: UtcDay = UtcDay(20_000);

    fn source() -> ReportSource {
        ReportSource {
            organization: "Relay".into(),
            contact: "mailto:tls@relay.test".into(),
            submitter: "relay.test".into(),
        }
    }

    #[test]
    fn days_are_written_and_read_as_dates() {
        assert_eq!(UtcDay(0).to_string(), "1970-01-01");
        assert_eq!(UtcDay::of_unix(1_796_601_600).to_string(), "2026-12-07");
        let d: UtcDay = "2026-12-07".parse().unwrap();
        assert_eq!(d, UtcDay::of_unix(1_796_601_600));
        assert_eq!(d.end() - d.start(), 86_399);
        assert!("2026-13-01".parse::<UtcDay>().is_err());
        assert!("yesterday".parse::<UtcDay>().is_err());
    }

    #[test]
    fn sessions_are_counted_per_policy_and_failure_detail() {
        let c = TlsRptCounts::default();
        c.add(DAY, &sts("Example.TEST."), None);
        c.add(DAY, &sts("example.test"), None);
        for _ in 0..3 {
            c.add(
                DAY,
                &sts("example.test"),
                Some(fail(ResultType::StartTlsNotSupported, "mx.example.test")),
            );
        }
        c.add(
            DAY,
            &sts("example.test"),
            Some(fail(ResultType::Other, "mx.example.test")),
        );
        c.add(DAY, &sts("other.test"), None);
        assert_eq!(c.totals(DAY), (3, 4));
        assert_eq!(c.unfinished(DAY), vec!["example.test", "other.test"]);
        let r = c.report(DAY, "example.test", &source()).unwrap();
        assert_eq!(r.policies.len(), 1);
        let p = &r.policies[0];
        assert_eq!((p.summary.total_success, p.summary.total_failure), (2, 4));
        assert_eq!(p.failure_details.len(), 2);
        assert_eq!(p.failure_details[0].failed_session_count, 3);
        assert_eq!(
            p.failure_details[1].result_type,
            ResultType::ValidationFailure
        );
        assert_eq!(r.report_id, format!("{DAY}.example.test@relay.test"));
        assert!(c.report(DAY, "none.test", &source()).is_none());
    }

    #[test]
    fn failure_details_are_bounded_and_totals_stay_right() {
        let c = TlsRptCounts::default();
        let extra = 50;
        for i in 0..MAX_DETAILS + extra {
            c.add(
                DAY,
                &sts("example.test"),
                Some(fail(
                    ResultType::CertificateExpired,
                    &format!("mx{i}.example.test"),
                )),
            );
        }
        let r = c.report(DAY, "example.test", &source()).unwrap();
        let p = &r.policies[0];
        assert_eq!(p.summary.total_failure as usize, MAX_DETAILS + extra);
        assert_eq!(p.failure_details.len(), MAX_DETAILS + 1);
        let sum: u32 = p
            .failure_details
            .iter()
            .map(|d| d.failed_session_count)
            .sum();
        assert_eq!(sum as usize, MAX_DETAILS + extra);
        let agg = &p.failure_details[0];
        assert_eq!(agg.failed_session_count as usize, extra);
        assert_eq!(agg.additional_information.as_deref(), Some(AGGREGATE_NOTE));
        // A detail already itemized is still counted under itself.
        c.add(
            DAY,
            &sts("example.test"),
            Some(fail(ResultType::CertificateExpired, "mx0.example.test")),
        );
        let r = c.report(DAY, "example.test", &source()).unwrap();
        assert_eq!(r.policies[0].failure_details.len(), MAX_DETAILS + 1);
    }

    #[test]
    fn long_texts_are_cut_on_a_char_boundary() {
        let c = TlsRptCounts::default();
        let mut d = fail(ResultType::ValidationFailure, "mx");
        d.additional_information = Some("é".repeat(MAX_TEXT));
        c.add(DAY, &sts("example.test"), Some(d));
        let r = c.report(DAY, "example.test", &source()).unwrap();
        let text = r.policies[0].failure_details[0]
            .additional_information
            .clone()
            .unwrap();
        assert!(text.len() <= MAX_TEXT && text.len() >= MAX_TEXT - 1);
    }

    #[test]
    fn json_has_no_nulls_nor_empty_optional_arrays() {
        let c = TlsRptCounts::default();
        c.add(
            DAY,
            &PolicyDetails::new(PolicyType::Other, "example.test"),
            Some(fail(ResultType::StartTlsNotSupported, "mx.example.test")),
        );
        let r = c.report(DAY, "example.test", &source()).unwrap();
        let json = report_json(&r).unwrap();
        assert!(!json.contains("null"), "{json}");
        assert!(!json.contains("\"mx-host\""), "{json}");
        assert!(!json.contains("\"Other\""), "{json}");
        let v: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["policies"][0]["policy"]["policy-type"], "no-policy-found");
        assert_eq!(
            v["date-range"]["start-datetime"],
            format!("{DAY}T00:00:00Z")
        );
        assert_eq!(v["date-range"]["end-datetime"], format!("{DAY}T23:59:59Z"));
        let gz = gzip(json.as_bytes()).unwrap();
        let mut back = String::new();
        io::Read::read_to_string(
            &mut mail_auth::flate2::read::GzDecoder::new(&gz[..]),
            &mut back,
        )
        .unwrap();
        assert_eq!(back, json);
    }

    #[tokio::test]
    async fn counts_and_sent_marks_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let c = TlsRptCounts::open(dir.path()).unwrap();
        for i in 0..MAX_DETAILS + 2 {
            c.add(
                DAY,
                &sts("example.test"),
                Some(fail(ResultType::CertificateExpired, &format!("mx{i}"))),
            );
        }
        c.add(DAY, &sts("other.test"), None);
        c.flush().await.unwrap();
        c.mark_delivered(DAY, "example.test", "mailto:a@b.test")
            .await
            .unwrap();
        c.mark_complete(DAY, "example.test").await.unwrap();
        let files: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(files, vec![format!("{DAY}.json")]);

        let again = TlsRptCounts::open(dir.path()).unwrap();
        assert_eq!(again.totals(DAY), (1, MAX_DETAILS as u64 + 2));
        assert_eq!(again.unfinished(DAY), vec!["other.test"]);
        let sent = again.sent(DAY, "example.test");
        assert!(sent.complete && sent.delivered.contains("mailto:a@b.test"));
        // The bound holds across the reopen.
        again.add(
            DAY,
            &sts("example.test"),
            Some(fail(ResultType::CertificateExpired, "new")),
        );
        let r = again.report(DAY, "example.test", &source()).unwrap();
        assert_eq!(r.policies[0].failure_details.len(), MAX_DETAILS + 1);
        assert_eq!(
            r.report_id,
            c.report(DAY, "example.test", &source()).unwrap().report_id
        );
    }

    #[tokio::test]
    async fn old_days_are_pruned_from_memory_and_disk() {
        let dir = tempfile::tempdir().unwrap();
        let c = TlsRptCounts::open(dir.path()).unwrap();
        for d in 0..6 {
            c.add(UtcDay(DAY.0 + d), &sts("example.test"), None);
        }
        c.flush().await.unwrap();
        let today = UtcDay(DAY.0 + 5);
        c.prune(today).await.unwrap();
        assert_eq!(
            c.days(),
            (2..6).map(|d| UtcDay(DAY.0 + d)).collect::<Vec<_>>()
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 4);
    }

    #[test]
    fn a_damaged_day_file_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(format!("{DAY}.json")), b"{not json").unwrap();
        std::fs::write(dir.path().join(format!(".{DAY}.json.tmp")), b"{").unwrap();
        let c = TlsRptCounts::open(dir.path()).unwrap();
        assert!(c.days().is_empty());
        assert!(dir.path().join(format!("{DAY}.json.bad")).exists());
        assert!(!dir.path().join(format!(".{DAY}.json.tmp")).exists());
    }

    mod prop_tests {
        use super::*;
        use proptest::prelude::*;

        fn result_type() -> impl Strategy<Value = ResultType> {
            prop::sample::select(vec![
                ResultType::StartTlsNotSupported,
                ResultType::CertificateHostMismatch,
                ResultType::CertificateExpired,
                ResultType::TlsaInvalid,
                ResultType::Other,
            ])
        }

        /// One call: (domain index, policy type is tlsa, failure: (type, mx index)).
        fn call() -> impl Strategy<Value = (u8, bool, Option<(ResultType, u16)>)> {
            (
                0u8..3,
                any::<bool>(),
                prop::option::of((result_type(), 0u16..300)),
            )
        }

        proptest! {
            #[test]
            fn totals_equal_the_number_of_calls(calls in prop::collection::vec(call(), 0..600)) {
                let c = TlsRptCounts::default();
                let (mut ok, mut failed) = (0u64, 0u64);
                for (domain, tlsa, failure) in &calls {
                    let mut p = sts(&format!("d{domain}.test"));
                    if *tlsa {
                        p.policy_type = PolicyType::Tlsa;
                    }
                    match failure {
                        None => {
                            ok += 1;
                            c.add(DAY, &p, None);
                        }
                        Some((t, mx)) => {
                            failed += 1;
                            c.add(DAY, &p, Some(fail(*t, &format!("mx{mx}"))));
                        }
                    }
                }
                prop_assert_eq!(c.totals(DAY), (ok, failed));
                let (mut s, mut f, mut detailed) = (0u64, 0u64, 0u64);
                for domain in c.unfinished(DAY) {
                    let r = c.report(DAY, &domain, &source()).unwrap();
                    for p in &r.policies {
                        s += u64::from(p.summary.total_success);
                        f += u64::from(p.summary.total_failure);
                        prop_assert!(p.failure_details.len() <= MAX_DETAILS + 5);
                        detailed += p.failure_details.iter().map(|d| u64::from(d.failed_session_count)).sum::<u64>();
                    }
                }
                prop_assert_eq!((s, f), (ok, failed));
                prop_assert_eq!(detailed, failed);
            }
        }
    }
}
