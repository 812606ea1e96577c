//! What a report that came back to the return path means for the app:
//! which message and recipient it is about (from the VERP token), and the
//! `bounced`, `deferred` or `complained` event that tells the app. The
//! suppression list hears the same events (a permanent bounce whose reason
//! says the address cannot receive mail, or a complaint, adds it).

use crate::bounces::{Action, Bounce, BouncedRecipient, Complaint, Report};
use crate::deliver::classify::Classifier;
use crate::envelope::QueueId;
use crate::queue::Queue;
use crate::reply::{Enhanced, Reply};
use crate::report::{Event, EventKind, Reporter};
use crate::verp::Verp;

/// Reads `message`, sent to `recipients` on the bounce listener, and emits
/// an event per affected recipient. Returns how many events it emitted.
pub fn ingest(
    classifier: &Classifier,
    verp: Option<&Verp>,
    queue: &Queue,
    reporter: &Reporter,
    recipients: &[&str],
    message: &[u8],
) -> usize {
    let Some(verp) = verp else {
        return 0;
    };
    let Some(report) = crate::bounces::parse(message) else {
        tracing::info!("message on the bounce listener is no delivery or feedback report; dropped");
        return 0;
    };
    let targets = targets(verp, recipients, &report, message);
    if targets.is_empty() {
        tracing::warn!("report names no message herald sent (no valid VERP address); dropped");
        return 0;
    }
    let mut emitted = 0;
    for (id, index) in targets {
        // A report about a message herald no longer knows cannot say whose
        // it is: the addresses in it are the sender's word, and trusting
        // them would let anyone put addresses on a suppression list.
        let Some(about) = About::look_up(queue, id, index) else {
            tracing::warn!(queue_id = %id, "report about a message no longer in the queue or history; dropped");
            continue;
        };
        let events = match &report {
            Report::Bounce(b) => bounce_events(classifier, &about, b),
            Report::Complaint(c) => vec![complaint_event(&about, c)],
        };
        for e in events {
            let kind = match e.event {
                EventKind::Complained => 0,
                EventKind::Bounced => 1,
                _ => 2,
            };
            if !queue.history().first_report(id, index, kind) {
                tracing::info!(queue_id = %id, "repeated report; counted once");
                continue;
            }
            tracing::info!(
                queue_id = %id,
                event = ?e.event,
                recipient = e.recipient.as_deref().unwrap_or(""),
                "late report"
            );
            late_dsn(queue, id, index, &e);
            reporter.emit(e);
            emitted += 1;
        }
    }
    emitted
}

/// A late failure also goes to the message's sender as a DSN (when DSNs
/// apply to it): with VERP the report came to herald, not to them. A delay
/// warning does not.
fn late_dsn(queue: &Queue, id: QueueId, index: usize, e: &Event) {
    let (EventKind::Bounced, Some(smtp)) = (e.event, &e.smtp) else {
        return;
    };
    let reply = Reply {
        // No code in the report: the class its status gives.
        code: smtp
            .code
            .unwrap_or(match smtp.enhanced.as_deref().and_then(Enhanced::parse) {
                Some(Enhanced(4, ..)) => 450,
                _ => 550,
            }),
        enhanced: smtp.enhanced.as_deref().and_then(Enhanced::parse),
        text: smtp.text.clone(),
    };
    if queue.report_late_failure(id, index, reply, e.mx.clone()) {
        tracing::info!(queue_id = %id, "late failure reported to the sender in a DSN");
    }
}

/// The (message, recipient) pairs a report is about: the VERP addresses it
/// was sent to; for reports sent to a role address, a VERP address found
/// in the report (ARF's Original-Mail-From, the returned headers'
/// Return-Path, or anywhere in the text).
fn targets(
    verp: &Verp,
    recipients: &[&str],
    report: &Report,
    message: &[u8],
) -> Vec<(QueueId, usize)> {
    let mut found: Vec<(QueueId, usize)> =
        recipients.iter().filter_map(|r| verp.decode(r)).collect();
    if found.is_empty()
        && let Report::Complaint(c) = report
        && let Some(t) = c.original_mail_from.as_deref().and_then(|a| verp.decode(a))
    {
        found.push(t);
    }
    if found.is_empty() {
        found.extend(scan_for_verp(verp, message));
    }
    found.sort_unstable_by_key(|(id, i)| (id.0, *i));
    found.dedup();
    found
}

/// Every VERP address of `verp` in `text` (bounded: the first 8).
fn scan_for_verp(verp: &Verp, text: &[u8]) -> Vec<(QueueId, usize)> {
    let prefix = format!("{}+", crate::verp::PREFIX);
    let text = String::from_utf8_lossy(text);
    let lower = text.to_ascii_lowercase();
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(at) = lower[from..].find(&prefix) {
        let start = from + at;
        let end = lower[start..]
            .find(|c: char| {
                !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.' | '@' | '_'))
            })
            .map_or(lower.len(), |n| start + n);
        if let Some(t) = verp.decode(&lower[start..end]) {
            out.push(t);
            if out.len() == 8 {
                break;
            }
        }
        from = end.max(start + 1);
    }
    out
}

/// What herald knows of the message and recipient a report is about.
struct About {
    id: QueueId,
    recipient: String,
    sender: String,
    tenant: Option<String>,
    message_id: Option<String>,
}

impl About {
    fn look_up(queue: &Queue, id: QueueId, index: usize) -> Option<About> {
        let m = queue.find(id)?;
        Some(About {
            id,
            recipient: m.recipients.get(index)?.address.clone(),
            sender: m.envelope.sender.clone(),
            tenant: m.envelope.tenant.clone(),
            message_id: m.envelope.message_id.clone(),
        })
    }

    fn event(&self, kind: EventKind) -> Event {
        let mut e = Event::new(kind, &self.sender);
        e.queue_id = Some(self.id);
        e.tenant = self.tenant.clone();
        e.message_id = self.message_id.clone();
        e.recipient = Some(self.recipient.clone());
        e
    }
}

/// One event per recipient the bounce reports failed (`bounced`) or
/// delayed (`deferred`); a bounce with no usable recipient block still
/// bounces the VERP recipient.
fn bounce_events(classifier: &Classifier, about: &About, bounce: &Bounce) -> Vec<Event> {
    let Some(r) = bounce.about(&about.recipient) else {
        // No recipient block could be read: it may as well be a delay
        // warning as a failure, and a wrong permanent bounce would
        // suppress a good address. Say so in the log, emit nothing.
        tracing::warn!(queue_id = %about.id, format = ?bounce.format, "bounce without a readable recipient status; no event");
        return Vec::new();
    };
    let matching = [r];
    matching
        .into_iter()
        .map(|r| {
            let kind = if r.action == Action::Delayed {
                EventKind::Deferred
            } else {
                EventKind::Bounced
            };
            let reply = reply_of(r);
            let verdict = r.outcome(classifier);
            let mut e = about.event(kind).with_reply(&reply);
            if let Some(smtp) = &mut e.smtp {
                smtp.code = r.smtp_code;
            }
            e.classification = Some(verdict.classification());
            e.reason = Some(verdict.reason.as_str().into());
            e.permanent = Some(verdict.permanent);
            e.mx = r
                .remote_mta
                .clone()
                .or_else(|| bounce.reporting_mta.clone());
            e
        })
        .collect()
}

/// The remote server's reply as far as the report gives it.
fn reply_of(r: &BouncedRecipient) -> Reply {
    let text = r
        .diagnostic
        .as_deref()
        .map(|d| {
            // "smtp; 550 5.1.1 user unknown" → "user unknown"
            let d = d.split_once(';').map_or(d, |(_, rest)| rest).trim();
            let d = d.strip_prefix(|c: char| c.is_ascii_digit()).map_or(d, |_| {
                d.split_once(' ').map_or("", |(_, rest)| rest).trim_start()
            });
            match d.split_once(' ') {
                Some((first, rest)) if Enhanced::parse(first).is_some() => {
                    rest.trim_start().to_string()
                }
                _ => d.to_string(),
            }
        })
        .unwrap_or_default();
    let status = r.status;
    let code = r.smtp_code.unwrap_or(match status {
        Some(Enhanced(4, ..)) => 450,
        Some(Enhanced(2, ..)) => 250,
        _ => 550,
    });
    Reply {
        code,
        enhanced: status,
        text,
    }
}

fn complaint_event(about: &About, c: &Complaint) -> Event {
    let mut e = about.event(EventKind::Complained);
    e.reason = Some(match &c.user_agent {
        Some(ua) => format!("feedback report: {} (from {ua})", c.feedback_type),
        None => format!("feedback report: {}", c.feedback_type),
    });
    if e.message_id.is_none() {
        e.message_id = c.original_message_id.clone();
    }
    e
}

/// Property tests (STYLE.md point 9): a VERP address in a report is found
/// whatever bytes and characters surround it (invalid UTF-8, multi-byte
/// characters, 'İ', which grows when lower-cased).
#[cfg(test)]
mod prop_tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn verp_addresses_are_found_in_any_text(
            before in prop::collection::vec(any::<u8>(), 0..40),
            noise in "[a-z0-9+.@İé😀-]{0,30}",
            after in "(?s).{0,20}",
        ) {
            let verp = Verp::new("bounces.relay.example", b"0123456789abcdef0123");
            let addr = verp.address(QueueId(7), 3);
            let mut text = before;
            text.extend_from_slice(noise.as_bytes());
            text.extend_from_slice(format!(" <{addr}>").as_bytes());
            text.extend_from_slice(after.as_bytes());
            prop_assert!(scan_for_verp(&verp, &text).contains(&(QueueId(7), 3)));
            let _ = scan_for_verp(&verp, noise.as_bytes());
        }
    }
}
