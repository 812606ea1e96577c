//! Reporting: every outcome of every recipient becomes one [`Event`], in the
//! JSON shape of DESIGN.md. Events are appended to the events log as JSON
//! lines by one writer task, so that sessions and deliveries never wait on
//! that file. Webhooks, DSNs and the suppression list consume the same
//! events (see the bounces issue).

pub mod dsn;
pub mod stream;
pub mod webhook;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::envelope::{Envelope, QueueId};
use crate::reply::Reply;

/// The closed set of lifecycle events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Received,
    Delivered,
    Deferred,
    Bounced,
    Expired,
    Rejected,
    Complained,
    Suppressed,
}

/// Why a delivery failed, in words an app can act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Classification {
    InvalidRecipient,
    MailboxFull,
    MessageTooLarge,
    SpamBlock,
    Policy,
    Dns,
    Tls,
    Network,
    Other,
}

/// The SMTP reply in an event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SmtpDetail {
    pub code: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enhanced: Option<String>,
    pub text: String,
}

impl From<&Reply> for SmtpDetail {
    fn from(r: &Reply) -> Self {
        SmtpDetail {
            code: r.code,
            enhanced: r.enhanced.map(|e| e.to_string()),
            text: r.text.clone(),
        }
    }
}

/// One event: the same JSON in the log, webhooks and the Redis stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub event: EventKind,
    /// Unique per event (128 random bits, hex): webhooks are delivered at
    /// least once, so the app deduplicates on this.
    #[serde(default)]
    pub event_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_id: Option<QueueId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub sender: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient: Option<String>,
    /// RFC 3339, UTC.
    pub timestamp: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mx: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smtp: Option<SmtpDetail>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classification: Option<Classification>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permanent: Option<bool>,
    /// For `received`: the recipients accepted; for `deferred`: next attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipients: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// For `rejected`: the client and the rule that refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// For `suppressed`: why the address is on the suppression list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For `received`: the outbound spam score (see `[policy.spam]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spam_score: Option<f64>,
    /// For `received`: policy findings that did not refuse the message
    /// (DMARC would fail with `[policy.dmarc] action = "warn"`, a blocklist
    /// listing with `action = "log"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warnings: Option<Vec<String>>,
    /// For `received`: this submission repeated a Message-ID the tenant
    /// sent within `[history] idempotency_window`; `queue_id` is the first
    /// submission's and nothing is sent again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate: Option<bool>,
}

impl Event {
    /// An event with only the kind, sender and time set.
    pub fn new(event: EventKind, sender: &str) -> Event {
        Event {
            event,
            event_id: format!("{:032x}", rand::random::<u128>()),
            queue_id: None,
            message_id: None,
            tenant: None,
            sender: sender.to_string(),
            recipient: None,
            timestamp: crate::clock::rfc3339_now(),
            attempt: None,
            mx: None,
            tls: None,
            smtp: None,
            classification: None,
            permanent: None,
            recipients: None,
            next_attempt: None,
            size: None,
            client_ip: None,
            rule: None,
            reason: None,
            spam_score: None,
            warnings: None,
            duplicate: None,
        }
    }

    /// An event about a queued message, filled from its envelope.
    pub fn for_message(event: EventKind, id: QueueId, env: &Envelope) -> Event {
        let mut e = Event::new(event, &env.sender);
        e.queue_id = Some(id);
        e.message_id = env.message_id.clone();
        e.tenant = env.tenant.clone();
        e
    }

    pub fn with_reply(mut self, reply: &Reply) -> Event {
        self.smtp = Some(reply.into());
        self
    }
}

/// Hands events to the writer; cheap to clone, never blocks.
#[derive(Clone)]
pub struct Reporter {
    tx: mpsc::UnboundedSender<Event>,
    /// Counters fed by every event: relaxed atomics, so emit stays cheap.
    metrics: std::sync::Arc<crate::admin::Metrics>,
    /// Adds hard-bounced and complaining recipients (see
    /// [`crate::suppression::Suppressions::observe`]).
    suppressions: Option<crate::suppression::Suppressions>,
    /// Events of tenants with a `webhook_url` go to the webhook outbox.
    webhooks: Option<webhook::Outbox>,
    /// When clustered, every event also goes to the Redis stream.
    stream: Option<stream::EventStream>,
    /// Counts tenants' outcomes for the reputation guard (see
    /// [`crate::control::Control::observe`]).
    control: Option<crate::control::Control>,
}

impl Reporter {
    /// Starts the events-log writer task appending to `path`.
    pub async fn start(path: &Path) -> std::io::Result<(Reporter, tokio::task::JoinHandle<()>)> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir).await?;
        }
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(write_events(file, path.to_path_buf(), rx));
        Ok((
            Reporter {
                tx,
                metrics: Default::default(),
                suppressions: None,
                webhooks: None,
                stream: None,
                control: None,
            },
            task,
        ))
    }

    /// A reporter that drops events (tools that need no log).
    pub fn discard() -> Reporter {
        let (tx, _rx) = mpsc::unbounded_channel();
        Reporter {
            tx,
            metrics: Default::default(),
            suppressions: None,
            webhooks: None,
            stream: None,
            control: None,
        }
    }

    /// Feeds every event to the suppression list as well. Call before the
    /// reporter is cloned: clones made earlier do not feed it.
    pub fn with_suppressions(mut self, s: crate::suppression::Suppressions) -> Reporter {
        self.suppressions = Some(s);
        self
    }

    /// Feeds every event to the webhook outbox as well. Call before the
    /// reporter is cloned, like [`Reporter::with_suppressions`].
    pub fn with_webhooks(mut self, w: webhook::Outbox) -> Reporter {
        self.webhooks = Some(w);
        self
    }

    /// Feeds every event to the Redis events stream as well. Call before
    /// the reporter is cloned, like [`Reporter::with_suppressions`].
    pub fn with_stream(mut self, s: stream::EventStream) -> Reporter {
        self.stream = Some(s);
        self
    }

    /// Feeds every event to the reputation guard as well. Call before the
    /// reporter is cloned, like [`Reporter::with_suppressions`].
    pub fn with_control(mut self, c: crate::control::Control) -> Reporter {
        self.control = Some(c);
        self
    }

    /// The metrics this reporter's events are counted in.
    pub fn metrics(&self) -> &std::sync::Arc<crate::admin::Metrics> {
        &self.metrics
    }

    pub fn emit(&self, event: Event) {
        // The events log is the record; this line is for debugging only, so
        // that the hot path does not format and write a line per event.
        tracing::debug!(
            event = ?event.event,
            queue_id = event.queue_id.map(|q| q.to_string()).unwrap_or_default(),
            recipient = event.recipient.as_deref().unwrap_or(""),
            smtp = event.smtp.as_ref().map(|s| format!("{} {}", s.code, s.text)).unwrap_or_default(),
            "event"
        );
        self.metrics.observe(&event);
        // Not for herald's own DSNs (null sender, no tenant): a report that
        // cannot reach a tenant's sender says nothing about the app's
        // recipients, and would land on the no-tenant list.
        if let Some(s) = &self.suppressions
            && !(event.sender.is_empty() && event.tenant.is_none())
        {
            s.observe(&event);
        }
        if let Some(w) = &self.webhooks {
            w.offer(&event);
        }
        if let Some(s) = &self.stream {
            s.offer(&event);
        }
        // A tenant just paused for its reputation: its announcement follows.
        let paused = self.control.as_ref().and_then(|c| c.observe(&event));
        let _ = self.tx.send(event);
        if let Some(p) = paused {
            self.emit(p);
        }
    }
}

/// How often the writer collects queued events. Polling on a tick instead of
/// waiting on the channel means an event costs its sender no wake-up of
/// another thread (see PERFORMANCE.md: cross-core wake-ups are expensive).
const WRITE_TICK: std::time::Duration = std::time::Duration::from_millis(20);

/// Appends the queued events every [`WRITE_TICK`] and flushes once per
/// batch. The log closes when every [`Reporter`] is dropped, after writing
/// what is left.
async fn write_events(
    file: tokio::fs::File,
    path: PathBuf,
    mut rx: mpsc::UnboundedReceiver<Event>,
) {
    let mut out = tokio::io::BufWriter::new(file);
    let mut buf = Vec::new();
    let mut tick = tokio::time::interval(WRITE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        buf.clear();
        let closed = loop {
            match rx.try_recv() {
                Ok(ev) => {
                    if serde_json::to_writer(&mut buf, &ev).is_ok() {
                        buf.push(b'\n');
                    }
                }
                Err(mpsc::error::TryRecvError::Empty) => break false,
                Err(mpsc::error::TryRecvError::Disconnected) => break true,
            }
        };
        if !buf.is_empty()
            && let Err(e) = async {
                out.write_all(&buf).await?;
                out.flush().await
            }
            .await
        {
            tracing::error!(path = %path.display(), error = %e, "cannot write events log");
        }
        if closed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_json_has_the_documented_shape() {
        let mut e = Event::new(EventKind::Bounced, "billing@acme.example");
        e.recipient = Some("bob@example.net".into());
        e.smtp = Some(SmtpDetail {
            code: 550,
            enhanced: Some("5.1.1".into()),
            text: "no such user".into(),
        });
        e.classification = Some(Classification::InvalidRecipient);
        e.permanent = Some(true);
        let v: serde_json::Value = serde_json::to_value(&e).unwrap();
        assert_eq!(v["event"], "bounced");
        assert_eq!(v["smtp"]["enhanced"], "5.1.1");
        assert_eq!(v["classification"], "invalid_recipient");
        assert!(v.get("mx").is_none());
        let back: Event = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
    }
}
