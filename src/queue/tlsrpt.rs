//! Sends the daily TLS reports (RFC 8460) built from the sessions delivery
//! counted ([`crate::report::tlsrpt`]): once a UTC day is over (plus
//! `send_after` and a random part of `send_jitter`), for each policy domain
//! of that day, the `_smtp._tls.<domain>` TXT record (RFC 8460 §3) says
//! where its report goes. An `https:` URI gets a POST of the gzipped JSON
//! (§5.4); a `mailto:` URI gets a multipart/report message (§5.3),
//! DKIM-signed and queued here like a DSN, so it is as durable and retried
//! as any mail herald sends.
//!
//! Each URI served is recorded in the day file before the next is tried,
//! so a restart neither sends a report twice nor forgets one. A report that
//! could not go out is tried again every [`RETRY_EVERY`] until its day is
//! [`KEEP_DAYS`](crate::report::tlsrpt::KEEP_DAYS) old. Also runs the
//! writer of the counts: every [`FLUSH_EVERY`] while they change.
//!
//! Trusted input: the counts (herald's own). The TXT record is the
//! recipient domain's: parsed by mail-auth, and only `https:` and
//! `mailto:` URIs are used.

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use mail_auth::common::parse::TxtRecordParser;
use mail_auth::mta_sts::{ReportUri, TlsRpt};
use mail_auth::report::tlsrpt::TlsReport;
use rand::Rng;
use tokio_util::sync::CancellationToken;

use super::{Envelope, Queue, QueueId, Recipient};
use crate::clock::unix_now;
use crate::config::Config;
use crate::dns::{Dns, DnsError};
use crate::metrics::Metrics;
use crate::report::tlsrpt::{ReportSource, TlsRptCounts, UtcDay, gzip, post, report_json};

/// The counts' directory under `server.spool_dir`.
pub const DIR: &str = "tlsrpt";
/// How often changed counts are written to disk: what a crash can lose.
pub const FLUSH_EVERY: Duration = Duration::from_secs(5);
/// How often reports that could not go out are tried again.
pub const RETRY_EVERY: Duration = Duration::from_secs(3600);
/// Waits between the POSTs of one report to one `https:` URI.
const POST_RETRIES: [Duration; 2] = [Duration::from_secs(1), Duration::from_secs(4)];

/// What one [`TlsReportSender::send_day`] did, counted per report URI
/// (`no_record`: per domain).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SendSummary {
    /// Reports posted, or queued for a `mailto:` URI.
    pub sent: usize,
    /// Reports that could not go out (tried again later).
    pub failed: usize,
    /// Domains that publish no usable TLS-RPT record.
    pub no_record: usize,
    /// Why the failed ones failed: `domain uri: error`.
    pub errors: Vec<String>,
}

/// Sends the reports of the queue's counts.
pub struct TlsReportSender {
    /// Weak: the queue's last owner ends the events writer when it goes.
    queue: Weak<Queue>,
    counts: TlsRptCounts,
    dns: Dns,
    source: ReportSource,
    from: String,
    tls: tokio_rustls::TlsConnector,
    https_timeout: Duration,
    send_after: Duration,
    send_jitter: Duration,
    metrics: Arc<Metrics>,
    /// One sending at a time, so that no URI is served twice.
    sending: tokio::sync::Mutex<()>,
}

impl TlsReportSender {
    /// A sender for `queue`'s counts; none when `[delivery.tls_reports]` is
    /// off. Errors only for an unreadable `ca_file`.
    pub fn new(
        config: &Config,
        queue: &Arc<Queue>,
        dns: Dns,
    ) -> Result<Option<Arc<TlsReportSender>>, String> {
        let cfg = &config.delivery.tls_reports;
        let (Some(counts), Some(from)) = (queue.tls_reports(), cfg.from.clone()) else {
            return Ok(None);
        };
        let roots = crate::tls::client_roots(cfg.ca_file.as_deref())?;
        if roots.is_empty() {
            tracing::warn!(
                "no trusted root certificates found: TLS reports to https: URIs will fail"
            );
        }
        let hostname = &config.server.hostname;
        let source = ReportSource {
            organization: cfg.organization.clone().unwrap_or_else(|| hostname.clone()),
            contact: cfg
                .contact
                .clone()
                .unwrap_or_else(|| format!("mailto:{from}")),
            submitter: cfg.submitter.clone().unwrap_or_else(|| hostname.clone()),
        };
        Ok(Some(Arc::new(TlsReportSender {
            queue: Arc::downgrade(queue),
            counts: counts.clone(),
            dns,
            source,
            from,
            tls: crate::tls::client_connector(roots),
            https_timeout: cfg.https_timeout.as_duration(),
            send_after: cfg.send_after.as_duration(),
            send_jitter: cfg.send_jitter.as_duration(),
            metrics: queue.reporter().metrics().clone(),
            sending: tokio::sync::Mutex::new(()),
        })))
    }

    /// Sends the reports of `day` not sent yet, now, whether or not the day
    /// is over (the daily run sends only finished days; tests and operators
    /// call this directly).
    pub async fn send_day(&self, day: UtcDay) -> SendSummary {
        let _one = self.sending.lock().await;
        let mut summary = SendSummary::default();
        for domain in self.counts.unfinished(day) {
            self.send_domain(day, &domain, &mut summary).await;
        }
        summary
    }

    async fn send_domain(&self, day: UtcDay, domain: &str, summary: &mut SendSummary) {
        let uris = match self.report_uris(domain).await {
            Ok(Some(uris)) => uris,
            Ok(None) => {
                tracing::debug!(%day, domain, "no TLS-RPT record: no report to send");
                summary.no_record += 1;
                self.mark_complete(day, domain).await;
                return;
            }
            Err(e) => {
                tracing::warn!(%day, domain, error = %e, "TLS report not sent; will retry");
                summary.failed += 1;
                summary.errors.push(format!("{domain}: {e}"));
                return;
            }
        };
        let Some(report) = self.counts.report(day, domain, &self.source) else {
            return;
        };
        let gzipped = match report_json(&report)
            .map_err(std::io::Error::other)
            .and_then(|j| gzip(j.as_bytes()))
        {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(%day, domain, error = %e, "cannot build the TLS report");
                summary.failed += 1;
                summary
                    .errors
                    .push(format!("{domain}: cannot build the report: {e}"));
                return;
            }
        };
        let done = self.counts.sent(day, domain).delivered;
        let mut all_served = true;
        for uri in uris {
            let (name, transport) = match &uri {
                ReportUri::Http(url) => (url.clone(), "https"),
                ReportUri::Mail(addr) => (format!("mailto:{addr}"), "mailto"),
            };
            if done.contains(&name) {
                continue;
            }
            let result = match &uri {
                ReportUri::Http(url) => self
                    .post_with_retries(url, &gzipped)
                    .await
                    .map_err(|e| e.to_string()),
                ReportUri::Mail(addr) => self.mail(domain, addr, &report, &gzipped).await,
            };
            match result {
                Ok(()) => {
                    tracing::info!(%day, domain, uri = %name, report_id = %report.report_id, "TLS report sent");
                    self.metrics.tls_reports_sent.inc(transport);
                    summary.sent += 1;
                    if let Err(e) = self.counts.mark_delivered(day, domain, &name).await {
                        // Sent, but not recorded: a restart may send it again,
                        // with the same report-id.
                        tracing::error!(%day, domain, uri = %name, error = %e, "cannot record a sent TLS report");
                    }
                }
                Err(e) => {
                    tracing::warn!(%day, domain, uri = %name, error = %e, "TLS report not sent; will retry");
                    self.metrics.tls_reports_failed.inc(transport);
                    summary.failed += 1;
                    summary.errors.push(format!("{domain} {name}: {e}"));
                    all_served = false;
                }
            }
        }
        if all_served {
            self.mark_complete(day, domain).await;
        }
    }

    async fn mark_complete(&self, day: UtcDay, domain: &str) {
        if let Err(e) = self.counts.mark_complete(day, domain).await {
            tracing::error!(%day, domain, error = %e, "cannot record a finished TLS report");
        }
    }

    /// The report URIs `domain` publishes; none when it has no usable
    /// record. RFC 8460 §3: records not starting with `v=TLSRPTv1` are
    /// ignored, and unless exactly one is left the domain does not take
    /// reports.
    async fn report_uris(&self, domain: &str) -> Result<Option<Vec<ReportUri>>, DnsError> {
        let records = self.dns.txt(&format!("_smtp._tls.{domain}")).await?;
        let mut ours = records
            .iter()
            .filter(|r| r.trim_start().starts_with("v=TLSRPTv1"));
        let (Some(record), None) = (ours.next(), ours.next()) else {
            return Ok(None);
        };
        Ok(TlsRpt::parse(record.trim().as_bytes()).ok().map(|r| r.rua))
    }

    async fn post_with_retries(
        &self,
        url: &str,
        gzipped: &[u8],
    ) -> Result<(), crate::report::tlsrpt::PostError> {
        let mut waits = POST_RETRIES.iter();
        loop {
            match post(
                url,
                gzipped.to_vec(),
                &self.dns,
                &self.tls,
                self.https_timeout,
            )
            .await
            {
                Ok(()) => return Ok(()),
                Err(e) => match waits.next() {
                    Some(wait) => {
                        tracing::debug!(url, error = %e, retry_in = ?wait, "TLS report POST failed");
                        tokio::time::sleep(*wait).await;
                    }
                    None => return Err(e),
                },
            }
        }
    }

    /// Queues the report for `mailto` (an address, maybe with `?` header
    /// fields, which are ignored): RFC 8460 §5.3's message, DKIM-signed
    /// with the keys of `from`'s domain.
    async fn mail(
        &self,
        domain: &str,
        mailto: &str,
        report: &TlsReport,
        gzipped: &[u8],
    ) -> Result<(), String> {
        let queue = self.queue.upgrade().ok_or("the queue has closed")?;
        let to: Vec<&str> = mailto
            .split('?')
            .next()
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .collect();
        if to.is_empty() || to.iter().any(|a| !a.contains('@')) {
            return Err(format!("mailto:{mailto} names no address"));
        }
        let mut message = Vec::new();
        report
            .write_rfc5322_from_bytes(
                domain,
                &self.source.submitter,
                self.from.as_str(),
                to.iter().copied(),
                gzipped,
                &mut message,
            )
            .map_err(|e| format!("cannot build the message: {e}"))?;
        // The envelope sender is `from`, not the null sender: RFC 8460 asks
        // for none in particular, and a bounce loop would need herald to
        // answer the bounce of a report, which it never does (the bounce
        // ends in `from`'s mailbox). A real sender in the From: domain lets
        // the report pass SPF and DMARC alignment at receivers that check
        // them, and reach those that refuse null-sender mail.
        let envelope = Envelope {
            sender: self.from.clone(),
            tenant: None,
            message_id: message_id(&message),
            received_at: unix_now(),
            client_ip: std::net::Ipv4Addr::LOCALHOST.into(),
            smtputf8: false,
            body_8bit: false,
            ret: None,
            env_id: None,
            require_tls: false,
            ignore_tls_policies: true,
        };
        // Signed like DSNs: RFC 8460 §5.3 wants mailed reports DKIM-signed
        // by the reporting domain. A report that cannot be signed goes
        // unsigned: the receiver may still use it.
        let signed = match queue.dkim.sign(&envelope, message.clone()).await {
            Ok(signed) => signed,
            Err(e) => {
                tracing::warn!(domain, error = %e, "cannot DKIM-sign the TLS report; sending it unsigned");
                message
            }
        };
        let recipients = to.iter().map(|a| Recipient::new(a.to_string())).collect();
        queue
            .enqueue(
                QueueId::generate(),
                envelope,
                recipients,
                Bytes::from(signed),
            )
            .await
            .map_err(|e| format!("cannot queue the report: {e}"))
    }

    /// Until `shutdown`: writes changed counts every [`FLUSH_EVERY`], and
    /// sends the reports of finished days once a day, retrying those left
    /// every [`RETRY_EVERY`]. (The last write is the queue's, at close.)
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let jitter = self
            .send_jitter
            .mul_f64(rand::rng().random_range(0.0..=1.0))
            .as_secs();
        let due = |day: UtcDay| day.start().max(0) as u64 + self.send_after.as_secs() + jitter;
        let now = unix_now();
        // After a restart past today's time, catch up soon, not at once:
        // the relay has just started and so may many others.
        let mut next = due(UtcDay::of_unix(now)).max(now + 60);
        let mut flush = tokio::time::interval(FLUSH_EVERY);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let wait = Duration::from_secs(next.saturating_sub(unix_now()));
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = flush.tick() => {
                    if let Err(e) = self.counts.flush().await {
                        tracing::error!(error = %e, "cannot save the TLS report counts");
                    }
                }
                _ = tokio::time::sleep(wait) => {
                    let today = UtcDay::today();
                    let left = self.send_finished_days(today).await;
                    next = if left {
                        unix_now() + RETRY_EVERY.as_secs()
                    } else {
                        due(today.next())
                    };
                }
            }
        }
    }

    /// Sends what is left of the days before `today`, after forgetting the
    /// days too old to report; true when something is still left.
    async fn send_finished_days(&self, today: UtcDay) -> bool {
        if let Err(e) = self.counts.prune(today).await {
            tracing::warn!(error = %e, "cannot remove old TLS report counts");
        }
        let mut left = false;
        for day in self.counts.days().into_iter().filter(|d| *d < today) {
            let summary = self.send_day(day).await;
            left |= summary.failed > 0;
        }
        left
    }
}

/// The Message-ID of a message herald built (for the queue's index).
fn message_id(message: &[u8]) -> Option<String> {
    let head = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(message, |end| &message[..end]);
    String::from_utf8_lossy(head).lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("message-id")
            .then(|| value.trim().to_string())
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn message_id_is_read_from_the_header() {
        let m =
            b"From: a@b\r\nMessage-ID: <x.y@relay.test>\r\nSubject: s\r\n\r\nMessage-ID: no\r\n";
        assert_eq!(super::message_id(m).as_deref(), Some("<x.y@relay.test>"));
        assert_eq!(super::message_id(b"From: a@b\r\n\r\n"), None);
    }
}
