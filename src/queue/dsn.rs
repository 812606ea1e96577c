//! Delivery status notifications: the bounce reports herald mails back to a
//! message's envelope sender.
//!
//! [`build`] is a pure function from the original envelope, the recipients
//! to report on and the original message to the bytes of one DSN; the queue
//! decides when one is due ([`wanted`], [`DsnSettings`]), DKIM-signs it
//! with the keys its From: domain picks (as for submitted mail) and
//! enqueues the result with the null sender, so a DSN is spooled and
//! retried like any other message and is itself never bounced.
//!
//! The multipart is written by hand rather than with mail-builder: it is
//! three fixed parts, and writing it here keeps it deterministic (boundary
//! and Message-ID come from the DSN's queue id, the date is an input), so the
//! fixtures in `tests/fixtures/dsn-*.eml` are byte-exact, and every line is
//! known to be 7-bit, CRLF-terminated and at most 998 octets.
//!
//! Input trusted: nothing in the original message or the remote replies;
//! every value copied into a header or the report is reduced to printable
//! ASCII and bounded in length.
//!
//! RFCs: 3461 (NOTIFY, RET, ENVID, ORCPT), 3462/6522 (multipart/report),
//! 3463 (enhanced status codes), 3464 (message/delivery-status), 3834
//! (Auto-Submitted), 6533 §3 (`\x{..}` for non-ASCII addresses).

use std::collections::HashSet;
use std::fmt::Write as _;

use crate::config::Config;
use crate::envelope::{Envelope, Notify, RcptStatus, Recipient, Ret};
use crate::event::EventKind;
use crate::reply::Reply;

/// Longest remote reply text copied into a DSN; keeps every line far below
/// the 998-octet limit of RFC 5322 §2.1.1.
const MAX_DIAGNOSTIC: usize = 800;

/// What happened to a recipient, as RFC 3464 §2.3.3 names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    /// Delivered to an MX; shown as `relayed` (see [`Action::as_str`]).
    Relayed,
    Delayed,
    Failed,
}

impl Action {
    /// herald hands the message to the recipient's MX, not to a mailbox, so
    /// a success is `relayed` (RFC 3461 §5.2.2.1 / RFC 3464 §2.3.3): the
    /// final MX may send its own `delivered` report.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
            Action::Relayed => "relayed",
        }
    }
}

/// Whether a recipient's NOTIFY asks for a report of `action` (RFC 3461
/// §4.1). Without NOTIFY herald reports failures only; delays and successes
/// only when asked for by name; NEVER silences everything.
pub fn wanted(notify: Notify, action: Action) -> bool {
    if notify.never {
        return false;
    }
    match action {
        Action::Failed => notify.failure || (!notify.success && !notify.delay),
        Action::Delayed => notify.delay,
        Action::Relayed => notify.success,
    }
}

/// The DSN-related config the queue consults for every outcome, resolved
/// once at start.
#[derive(Clone, Debug)]
pub struct DsnSettings {
    /// `server.hostname`: Reporting-MTA, From: and Message-ID domain.
    pub hostname: String,
    /// Seconds a recipient must have waited before a `delayed` report.
    pub delay_after: u64,
    /// `delivery.max_queue_lifetime` in seconds, for Will-Retry-Until.
    pub lifetime: u64,
    /// Largest original returned whole when RET=FULL.
    pub max_full: usize,
    /// Tenants with `dsn = false`.
    pub tenants_off: HashSet<String>,
}

impl DsnSettings {
    /// `None` when `[dsn] enabled = false`.
    pub fn from_config(config: &Config) -> Option<DsnSettings> {
        let d = &config.dsn;
        d.enabled.then(|| DsnSettings {
            hostname: config.server.hostname.clone(),
            delay_after: d.delay_after.0.as_secs(),
            lifetime: config.delivery.max_queue_lifetime.0.as_secs(),
            max_full: usize::try_from(d.max_full_size.bytes()).unwrap_or(usize::MAX),
            tenants_off: config
                .tenants
                .iter()
                .filter(|t| !t.dsn)
                .map(|t| t.name.clone())
                .collect(),
        })
    }

    /// Whether a message may cause DSNs at all: never for the null sender
    /// (a bounce is never bounced, RFC 3461 §6.2 / RFC 5321 §4.5.5), never
    /// for a tenant that turned them off.
    pub fn applies_to(&self, env: &Envelope) -> bool {
        !env.sender.is_empty()
            && env
                .tenant
                .as_ref()
                .is_none_or(|t| !self.tenants_off.contains(t))
    }
}

/// Called by the queue for each recorded outcome, under its lock: whether
/// this outcome goes into a DSN, and with what. Cheap for the common case
/// (a delivery without NOTIFY=SUCCESS is two flag tests). Marks the
/// recipient when a "delayed" report is due, so that it gets only one; the
/// queue persists that with the rest of the recipient's state.
pub fn on_outcome(
    settings: &DsnSettings,
    env: &Envelope,
    r: &mut Recipient,
    kind: EventKind,
    reply: &Reply,
    mx: Option<&str>,
    now: u64,
) -> Option<DsnRecipient> {
    let action = match kind {
        EventKind::Bounced | EventKind::Expired => Action::Failed,
        EventKind::Deferred => Action::Delayed,
        EventKind::Delivered => Action::Relayed,
        _ => return None,
    };
    if !wanted(r.notify, action) {
        return None;
    }
    if action == Action::Delayed
        && (r.delay_reported || now.saturating_sub(env.received_at) < settings.delay_after)
    {
        return None;
    }
    if !settings.applies_to(env) {
        return None;
    }
    if action == Action::Delayed {
        r.delay_reported = true;
    }
    Some(DsnRecipient {
        address: r.address.clone(),
        orcpt: r.orcpt.clone(),
        action,
        reply: Some(reply.clone()),
        remote_mta: mx.map(str::to_string),
        last_attempt: now,
        will_retry_until: (action == Action::Delayed)
            .then(|| env.received_at.saturating_add(settings.lifetime)),
    })
}

/// A failure reported after herald handed the message on (a late bounce
/// to the VERP return path, which the sender never sees): the recipient to
/// put in a DSN, under the rules of herald's own failures (see
/// [`DsnSettings::applies_to`] and [`wanted`]). Only for a recipient herald
/// counted as delivered: a failure herald saw itself was reported then.
pub fn late_failure(
    settings: &DsnSettings,
    env: &Envelope,
    r: &Recipient,
    reply: Reply,
    remote_mta: Option<String>,
    now: u64,
) -> Option<DsnRecipient> {
    let ok = r.status == RcptStatus::Delivered
        && wanted(r.notify, Action::Failed)
        && settings.applies_to(env);
    ok.then(|| DsnRecipient {
        address: r.address.clone(),
        orcpt: r.orcpt.clone(),
        action: Action::Failed,
        reply: Some(reply),
        remote_mta,
        last_attempt: now,
        will_retry_until: None,
    })
}

/// One recipient in a report.
#[derive(Clone, Debug, PartialEq)]
pub struct DsnRecipient {
    pub address: String,
    /// ORCPT as given (`rfc822;addr`).
    pub orcpt: Option<String>,
    pub action: Action,
    /// The last reply: the MX's, or herald's own description of a local
    /// failure (null MX, DNS, connection refused).
    pub reply: Option<Reply>,
    /// The MX that gave `reply`, when one did.
    pub remote_mta: Option<String>,
    /// Unix seconds.
    pub last_attempt: u64,
    /// Unix seconds; for `delayed`.
    pub will_retry_until: Option<u64>,
}

/// Everything one DSN is made of.
pub struct Notification<'a> {
    /// `server.hostname`.
    pub reporting_mta: &'a str,
    /// The original message's queue id.
    pub queue_id: &'a str,
    pub envelope: &'a Envelope,
    pub recipients: &'a [DsnRecipient],
    /// The original message as spooled; empty when it could not be read
    /// (the third part is then left out, as RFC 6522 §3 allows).
    pub original: &'a [u8],
    /// Unix seconds: the DSN's Date:.
    pub date: u64,
    /// Unique token (the DSN's own queue id): Message-ID and boundary.
    pub token: &'a str,
    /// Largest original returned whole when RET=FULL.
    pub max_full: usize,
}

impl Notification<'_> {
    /// The DSN's Message-ID, with angle brackets.
    pub fn message_id(&self) -> String {
        format!("<{}.dsn@{}>", self.token, ascii(self.reporting_mta))
    }
}

/// Builds the DSN: `multipart/report; report-type=delivery-status` with a
/// plain-text explanation, the `message/delivery-status` part and the
/// original's header (`text/rfc822-headers`) or whole message
/// (`message/rfc822`).
///
/// What is returned (RFC 3461 §4.3): the whole message only with RET=FULL,
/// when it is at most `max_full` octets and 7-bit (an 8-bit body cannot go
/// inside a 7-bit report unchanged) and not sent with REQUIRETLS; otherwise
/// — and without RET — only the header, with any non-ASCII octet replaced
/// by `?`.
pub fn build(r: &Notification<'_>) -> Vec<u8> {
    let host = ascii(r.reporting_mta);
    let boundary = format!("{}/{}", r.token, host);
    let worst = r
        .recipients
        .iter()
        .map(|x| x.action)
        .max()
        .unwrap_or(Action::Failed);
    let subject = match worst {
        Action::Failed => "Undelivered Mail Returned to Sender",
        Action::Delayed => "Delayed Mail (still being retried)",
        Action::Relayed => "Successful Mail Delivery Report",
    };
    let mut out = String::with_capacity(2048 + r.original.len().min(r.max_full));
    line(
        &mut out,
        &format!("From: Mail Delivery System <MAILER-DAEMON@{host}>"),
    );
    if r.envelope.sender.is_ascii() {
        line(&mut out, &format!("To: <{}>", ascii(&r.envelope.sender)));
    }
    line(&mut out, &format!("Subject: {subject}"));
    line(&mut out, &format!("Date: {}", rfc5322(r.date)));
    line(&mut out, &format!("Message-ID: {}", r.message_id()));
    if let Some(id) = r.envelope.message_id.as_deref().filter(|m| is_msg_id(m)) {
        line(&mut out, &format!("In-Reply-To: {id}"));
        line(&mut out, &format!("References: {id}"));
    }
    // RFC 3834 §5: an automatic response; RFC 3464 reports use auto-replied.
    line(&mut out, "Auto-Submitted: auto-replied");
    line(&mut out, "MIME-Version: 1.0");
    line(
        &mut out,
        "Content-Type: multipart/report; report-type=delivery-status;",
    );
    line(&mut out, &format!("\tboundary=\"{boundary}\""));
    line(&mut out, "Content-Transfer-Encoding: 7bit");
    line(&mut out, "");
    line(&mut out, "This is a MIME-encapsulated message.");
    line(&mut out, "");

    // 1. For people.
    line(&mut out, &format!("--{boundary}"));
    line(&mut out, "Content-Description: Notification");
    line(&mut out, "Content-Type: text/plain; charset=us-ascii");
    line(&mut out, "");
    human_part(&mut out, r, &host, worst);
    line(&mut out, "");

    // 2. For programs (RFC 3464 §2).
    line(&mut out, &format!("--{boundary}"));
    line(&mut out, "Content-Description: Delivery report");
    line(&mut out, "Content-Type: message/delivery-status");
    line(&mut out, "");
    status_part(&mut out, r, &host);
    line(&mut out, "");

    // 3. The original, as RET says.
    let mut tail: Vec<u8> = Vec::new();
    if !r.original.is_empty() {
        line(&mut out, &format!("--{boundary}"));
        // RFC 8689 §5: a REQUIRETLS message's body does not travel back in
        // a report that itself has no such protection; its header does.
        let full = r.envelope.ret == Some(Ret::Full)
            && !r.envelope.require_tls
            && r.original.len() <= r.max_full
            && r.original.is_ascii();
        if full {
            line(&mut out, "Content-Description: Undelivered Message");
            line(&mut out, "Content-Type: message/rfc822");
            line(&mut out, "");
            tail.extend_from_slice(r.original);
        } else {
            line(&mut out, "Content-Description: Undelivered Message Headers");
            line(&mut out, "Content-Type: text/rfc822-headers");
            line(&mut out, "");
            tail.extend(
                header_block(r.original)
                    .iter()
                    .map(|&b| if b.is_ascii() { b } else { b'?' }),
            );
        }
        if !tail.is_empty() && !tail.ends_with(b"\r\n") {
            tail.extend_from_slice(b"\r\n");
        }
    }
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&tail);
    bytes.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    bytes
}

fn human_part(out: &mut String, r: &Notification<'_>, host: &str, worst: Action) {
    line(out, &format!("This is the mail system at host {host}."));
    line(out, "");
    match worst {
        Action::Failed => {
            line(
                out,
                "I'm sorry to have to inform you that your message could",
            );
            line(
                out,
                "not be delivered to one or more recipients. The details",
            );
            line(out, "are below.");
        }
        Action::Delayed => {
            line(
                out,
                "Your message could not be delivered yet to one or more",
            );
            line(
                out,
                "recipients. It is still in the queue and will be tried",
            );
            line(out, "again; you do not need to send it again.");
        }
        Action::Relayed => {
            line(out, "Your message was delivered to the mail server of the");
            line(out, "recipients below, as you asked to be told.");
        }
    }
    if let Some(id) = r.envelope.message_id.as_deref() {
        line(out, "");
        line(out, &format!("Your message: {}", clip(&ascii(id), 200)));
    }
    for x in r.recipients {
        line(out, "");
        let what = match x.action {
            Action::Failed => "delivery failed, it will not be tried again",
            Action::Delayed => match x.will_retry_until {
                Some(t) => &format!("not delivered yet; retried until {}", rfc5322(t)),
                None => "not delivered yet; still being retried",
            },
            Action::Relayed => "delivered to the recipient's mail server",
        };
        line(out, &format!("<{}>: {what}", clip(&ascii(&x.address), 300)));
        if let Some(reply) = &x.reply {
            let who = match &x.remote_mta {
                Some(mx) => format!("The mail server {} said:", clip(&ascii(mx), 200)),
                None => format!("The mail system at {host} reported:"),
            };
            line(out, &format!("    {who}"));
            // Wrapped for reading; the exact reply is in Diagnostic-Code.
            for l in wrap(&diagnostic(reply), 72) {
                line(out, &format!("    {l}"));
            }
        }
    }
}

fn status_part(out: &mut String, r: &Notification<'_>, host: &str) {
    // Per-message fields (RFC 3464 §2.2).
    line(out, &format!("Reporting-MTA: dns; {host}"));
    line(out, &format!("X-Herald-Queue-ID: {}", ascii(r.queue_id)));
    if let Some(envid) = &r.envelope.env_id {
        line(
            out,
            &format!("Original-Envelope-Id: {}", clip(&xtext(envid), 200)),
        );
    }
    line(
        out,
        &format!("Arrival-Date: {}", rfc5322(r.envelope.received_at)),
    );
    // Per-recipient fields (RFC 3464 §2.3), each block after an empty line.
    for x in r.recipients {
        line(out, "");
        if let Some(o) = &x.orcpt {
            // Stored as "type;addr"; a bare address is rfc822 (RFC 3461 §4.2).
            let (kind, addr) = o.split_once(';').unwrap_or(("rfc822", o));
            line(
                out,
                &format!(
                    "Original-Recipient: {};{}",
                    ascii(kind.trim()),
                    clip(&ascii(addr.trim()), 400)
                ),
            );
        }
        let (kind, addr) = address_type(&x.address);
        line(
            out,
            &format!("Final-Recipient: {kind}; {}", clip(&addr, 400)),
        );
        line(out, &format!("Action: {}", x.action.as_str()));
        line(out, &format!("Status: {}", status(x)));
        if let Some(mx) = &x.remote_mta {
            line(out, &format!("Remote-MTA: dns; {}", clip(&ascii(mx), 255)));
        }
        if let Some(reply) = &x.reply {
            fold(out, "Diagnostic-Code: smtp; ", &diagnostic(reply));
        }
        line(
            out,
            &format!("Last-Attempt-Date: {}", rfc5322(x.last_attempt)),
        );
        if let (Action::Delayed, Some(t)) = (x.action, x.will_retry_until) {
            line(out, &format!("Will-Retry-Until: {}", rfc5322(t)));
        }
    }
}

/// The Status field (RFC 3464 §2.3.4): the reply's enhanced code when its
/// class fits the action, otherwise the generic code of that class. A
/// recipient that failed after temporary errors (queue lifetime over) gets
/// 5.4.7, "delivery time expired" (RFC 3463 §3.5); its last reply is in
/// Diagnostic-Code.
pub fn status(x: &DsnRecipient) -> String {
    let class = match x.action {
        Action::Failed => 5,
        Action::Delayed => 4,
        Action::Relayed => 2,
    };
    match x.reply.as_ref().and_then(|r| r.enhanced) {
        Some(e) if e.0 == class => e.to_string(),
        _ => match (x.action, x.reply.as_ref().map(|r| r.code / 100)) {
            (Action::Failed, Some(4)) => "5.4.7".into(),
            _ => format!("{class}.0.0"),
        },
    }
}

/// The reply as one line: `550 5.1.1 text`, printable ASCII, bounded.
fn diagnostic(reply: &Reply) -> String {
    let text: String = reply.text.split_whitespace().collect::<Vec<_>>().join(" ");
    let s = match reply.enhanced {
        Some(e) => format!("{} {} {}", reply.code, e, text),
        None => format!("{} {}", reply.code, text),
    };
    clip(&ascii(&s), MAX_DIAGNOSTIC)
}

/// `rfc822; addr`, or `utf-8; addr` with non-ASCII characters written as
/// `\x{HEX}` (RFC 6533 §3) for an internationalized address.
fn address_type(addr: &str) -> (&'static str, String) {
    if addr.is_ascii() {
        return ("rfc822", ascii(addr));
    }
    let mut s = String::new();
    for c in addr.chars() {
        if c.is_ascii_graphic() && c != '\\' {
            s.push(c);
        } else {
            let _ = write!(s, "\\x{{{:X}}}", c as u32);
        }
    }
    ("utf-8", s)
}

/// xtext (RFC 3461 §4): `+HH` for `+`, `=` and anything outside `!`..`~`.
fn xtext(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            let _ = write!(out, "+{b:02X}");
        }
    }
    out
}

/// Printable ASCII only: controls become spaces, anything else `?`.
fn ascii(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            ' '..='~' => c,
            c if c.is_control() => ' ',
            _ => '?',
        })
        .collect()
}

fn clip(s: &str, max: usize) -> String {
    // `s` is ASCII here, so any index is a char boundary.
    if s.len() <= max {
        s.to_string()
    } else {
        format!("{}...", &s[..max])
    }
}

fn is_msg_id(s: &str) -> bool {
    s.len() <= 500
        && s.starts_with('<')
        && s.ends_with('>')
        && s.bytes().all(|b| b.is_ascii_graphic())
}

fn line(out: &mut String, s: &str) {
    out.push_str(s);
    out.push_str("\r\n");
}

/// Words of `s` in lines of at most `width` (a longer word on its own).
fn wrap(s: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut cur = String::new();
    for w in s.split(' ').filter(|w| !w.is_empty()) {
        if !cur.is_empty() && cur.len() + 1 + w.len() > width {
            lines.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(w);
    }
    if !cur.is_empty() {
        lines.push(cur);
    }
    lines
}

/// A header field folded at spaces (RFC 5322 §2.2.3) so lines stay near 78.
fn fold(out: &mut String, name: &str, value: &str) {
    let mut lines = wrap(value, 78usize.saturating_sub(name.len()).max(40)).into_iter();
    line(out, &format!("{name}{}", lines.next().unwrap_or_default()));
    for l in lines {
        line(out, &format!("\t{l}"));
    }
}

/// The header block of a message, up to and including the empty line.
fn header_block(msg: &[u8]) -> &[u8] {
    if msg.starts_with(b"\r\n") {
        return &msg[..2];
    }
    match msg.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => &msg[..i + 4],
        None => msg,
    }
}

/// Unix seconds as an RFC 5322 date-time in UTC.
pub fn rfc5322(unix: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc2822)
                .ok()
        })
        .unwrap_or_else(|| "Thu, 01 Jan 1970 00:00:00 +0000".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply::Enhanced;
    use mail_parser::{MessageParser, MimeHeaders, PartType};

    const DATE: u64 = 1_795_946_400; // Sun, 29 Nov 2026 10:00:00 +0000

    fn envelope() -> Envelope {
        Envelope {
            sender: "billing@acme.test".into(),
            tenant: Some("acme".into()),
            message_id: Some("<invoice-7@acme.test>".into()),
            received_at: DATE - 3600,
            client_ip: "127.0.0.1".parse().unwrap(),
            smtputf8: false,
            body_8bit: false,
            ret: None,
            env_id: Some("inv 7+x".into()),
            require_tls: false,
            ignore_tls_policies: false,
        }
    }

    const ORIGINAL: &[u8] = b"Received: from app.test ([127.0.0.1])\r\n\tby relay.test (herald) with ESMTPSA id 0001\r\n\
From: Acme Billing <billing@acme.test>\r\nTo: <bob@one.test>\r\nSubject: Invoice 7\r\n\
Message-ID: <invoice-7@acme.test>\r\n\r\nDear customer,\r\nplease find invoice 7.\r\n";

    fn bounced(addr: &str) -> DsnRecipient {
        DsnRecipient {
            address: addr.into(),
            orcpt: Some(format!("rfc822;{addr}")),
            action: Action::Failed,
            reply: Some(Reply::new(
                550,
                Enhanced(5, 1, 1),
                "<bob@one.test>: Recipient address rejected: User unknown",
            )),
            remote_mta: Some("mx.one.test".into()),
            last_attempt: DATE - 60,
            will_retry_until: None,
        }
    }

    fn report<'a>(
        env: &'a Envelope,
        rcpts: &'a [DsnRecipient],
        original: &'a [u8],
    ) -> Notification<'a> {
        Notification {
            reporting_mta: "relay.test",
            queue_id: "0123456789ABCDEF0123",
            envelope: env,
            recipients: rcpts,
            original,
            date: DATE,
            token: "FEDCBA98765432100000",
            max_full: 1 << 20,
        }
    }

    /// Every line CRLF-terminated, at most 998 octets, 7-bit.
    fn assert_wire_safe(bytes: &[u8]) {
        assert!(bytes.is_ascii(), "not 7-bit");
        assert!(bytes.ends_with(b"\r\n"));
        for (i, l) in bytes.split(|&b| b == b'\n').enumerate() {
            if l.is_empty() {
                continue;
            }
            assert!(l.ends_with(b"\r"), "line {i} not CRLF");
            assert!(l.len() <= 999, "line {i} too long");
            assert!(!l[..l.len() - 1].contains(&b'\r'), "bare CR in line {i}");
        }
    }

    /// The delivery-status part's field blocks, as (name, value) lists.
    fn status_blocks(bytes: &[u8]) -> Vec<Vec<(String, String)>> {
        let msg = MessageParser::default().parse(bytes).expect("parses");
        let part = msg
            .parts
            .iter()
            .find(|p| {
                p.content_type().is_some_and(|c| {
                    c.ctype() == "message" && c.subtype() == Some("delivery-status")
                })
            })
            .expect("delivery-status part");
        let text = match &part.body {
            PartType::Text(t) => t.to_string(),
            PartType::Binary(b) | PartType::InlineBinary(b) => {
                String::from_utf8_lossy(b).into_owned()
            }
            other => panic!("unexpected body {other:?}"),
        };
        let mut blocks = Vec::new();
        for block in text.split("\r\n\r\n").filter(|b| !b.trim().is_empty()) {
            let mut fields: Vec<(String, String)> = Vec::new();
            for l in block.split("\r\n") {
                if l.starts_with(['\t', ' ']) {
                    let last = fields.last_mut().expect("continuation");
                    last.1.push(' ');
                    last.1.push_str(l.trim());
                } else if let Some((n, v)) = l.split_once(':') {
                    fields.push((n.to_string(), v.trim().to_string()));
                }
            }
            blocks.push(fields);
        }
        blocks
    }

    fn get<'a>(block: &'a [(String, String)], name: &str) -> Option<&'a str> {
        block
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn bounce_parses_back_as_a_multipart_report() {
        let env = envelope();
        let rcpts = [bounced("bob@one.test"), bounced("carol@one.test")];
        let bytes = build(&report(&env, &rcpts, ORIGINAL));
        assert_wire_safe(&bytes);
        let msg = MessageParser::default().parse(&bytes[..]).unwrap();
        let ct = msg.content_type().unwrap();
        assert_eq!(ct.ctype(), "multipart");
        assert_eq!(ct.subtype(), Some("report"));
        assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
        assert_eq!(msg.subject(), Some("Undelivered Mail Returned to Sender"));
        assert_eq!(
            msg.from().unwrap().first().unwrap().address(),
            Some("MAILER-DAEMON@relay.test")
        );
        assert_eq!(
            msg.message_id(),
            Some("FEDCBA98765432100000.dsn@relay.test")
        );
        assert_eq!(
            msg.header_raw("Auto-Submitted").map(str::trim),
            Some("auto-replied")
        );
        let types: Vec<String> = msg.parts[1..]
            .iter()
            .map(|p| {
                let c = p.content_type().unwrap();
                format!("{}/{}", c.ctype(), c.subtype().unwrap_or(""))
            })
            .collect();
        assert_eq!(
            types,
            [
                "text/plain",
                "message/delivery-status",
                "text/rfc822-headers"
            ]
        );
        let human = msg.body_text(0).unwrap();
        assert!(human.contains("<bob@one.test>: delivery failed"), "{human}");
        assert!(human.contains("mx.one.test said"), "{human}");
        assert!(human.contains("User unknown"), "{human}");

        let blocks = status_blocks(&bytes);
        assert_eq!(blocks.len(), 3, "{blocks:?}");
        assert_eq!(get(&blocks[0], "Reporting-MTA"), Some("dns; relay.test"));
        assert_eq!(get(&blocks[0], "Original-Envelope-Id"), Some("inv+207+2Bx"));
        assert!(get(&blocks[0], "Arrival-Date").unwrap().contains("2026"));
        for (b, who) in blocks[1..].iter().zip(["bob@one.test", "carol@one.test"]) {
            assert_eq!(get(b, "Final-Recipient"), Some(&*format!("rfc822; {who}")));
            assert_eq!(
                get(b, "Original-Recipient"),
                Some(&*format!("rfc822;{who}"))
            );
            assert_eq!(get(b, "Action"), Some("failed"));
            assert_eq!(get(b, "Status"), Some("5.1.1"));
            assert_eq!(get(b, "Remote-MTA"), Some("dns; mx.one.test"));
            assert_eq!(
                get(b, "Diagnostic-Code"),
                Some("smtp; 550 5.1.1 <bob@one.test>: Recipient address rejected: User unknown")
            );
            assert!(get(b, "Last-Attempt-Date").is_some());
            assert!(get(b, "Will-Retry-Until").is_none());
        }
        // Headers only by default: the body stays home.
        assert!(!bytes.windows(13).any(|w| w == b"Dear customer"));
        assert!(bytes.windows(18).any(|w| w == b"Subject: Invoice 7"));
    }

    #[test]
    fn ret_full_returns_the_message_unless_too_large_or_8bit() {
        let mut env = envelope();
        env.ret = Some(Ret::Full);
        let rcpts = [bounced("bob@one.test")];
        let bytes = build(&report(&env, &rcpts, ORIGINAL));
        let msg = MessageParser::default().parse(&bytes[..]).unwrap();
        let last = msg.parts.last().unwrap();
        let c = last.content_type().unwrap();
        assert_eq!((c.ctype(), c.subtype()), ("message", Some("rfc822")));
        let PartType::Message(inner) = &last.body else {
            panic!("message/rfc822 body is a message: {:?}", last.body)
        };
        assert_eq!(inner.subject(), Some("Invoice 7"));
        assert!(inner.body_text(0).unwrap().contains("Dear customer"));

        let mut guarded = env.clone();
        guarded.require_tls = true;
        let bytes = build(&report(&guarded, &rcpts, ORIGINAL));
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("text/rfc822-headers"), "{text}");
        assert!(!text.contains("Dear customer"), "{text}");

        let mut small = report(&env, &rcpts, ORIGINAL);
        small.max_full = 100;
        let bytes = build(&small);
        assert!(String::from_utf8_lossy(&bytes).contains("text/rfc822-headers"));

        let mut eight = ORIGINAL.to_vec();
        eight.extend_from_slice("Grüße\r\n".as_bytes());
        let bytes = build(&report(&env, &rcpts, &eight));
        assert_wire_safe(&bytes);
        assert!(String::from_utf8_lossy(&bytes).contains("text/rfc822-headers"));
    }

    #[test]
    fn delayed_and_relayed_reports() {
        let env = envelope();
        let delayed = DsnRecipient {
            action: Action::Delayed,
            reply: Some(Reply::new(
                451,
                Enhanced(4, 2, 2),
                "mailbox full, try later",
            )),
            will_retry_until: Some(DATE + 86_400),
            orcpt: None,
            ..bounced("dora@two.test")
        };
        let bytes = build(&report(&env, std::slice::from_ref(&delayed), ORIGINAL));
        assert_wire_safe(&bytes);
        let msg = MessageParser::default().parse(&bytes[..]).unwrap();
        assert_eq!(msg.subject(), Some("Delayed Mail (still being retried)"));
        let blocks = status_blocks(&bytes);
        assert_eq!(get(&blocks[1], "Action"), Some("delayed"));
        assert_eq!(get(&blocks[1], "Status"), Some("4.2.2"));
        assert!(get(&blocks[1], "Original-Recipient").is_none());
        assert!(
            get(&blocks[1], "Will-Retry-Until")
                .unwrap()
                .contains("2026")
        );

        let relayed = DsnRecipient {
            action: Action::Relayed,
            reply: Some(Reply::new(250, Enhanced(2, 0, 0), "Ok: queued as X1")),
            ..bounced("erin@two.test")
        };
        let bytes = build(&report(&env, std::slice::from_ref(&relayed), ORIGINAL));
        let msg = MessageParser::default().parse(&bytes[..]).unwrap();
        assert_eq!(msg.subject(), Some("Successful Mail Delivery Report"));
        let blocks = status_blocks(&bytes);
        assert_eq!(get(&blocks[1], "Action"), Some("relayed"));
        assert_eq!(get(&blocks[1], "Status"), Some("2.0.0"));
    }

    #[test]
    fn expiry_after_temporary_errors_is_5_4_7() {
        let x = DsnRecipient {
            reply: Some(Reply::new(451, Enhanced(4, 4, 1), "connection refused")),
            ..bounced("a@b.test")
        };
        assert_eq!(status(&x), "5.4.7");
        let y = DsnRecipient {
            reply: Some(Reply::new(554, Enhanced(5, 0, 0), "deleted")),
            ..bounced("a@b.test")
        };
        assert_eq!(status(&y), "5.0.0");
    }

    #[test]
    fn hostile_reply_text_and_utf8_addresses_stay_7bit_and_short() {
        let env = envelope();
        let x = DsnRecipient {
            address: "jöhn@exämple.test".into(),
            reply: Some(Reply::new(
                550,
                Enhanced(5, 7, 1),
                format!("bad\r\nInjected: yes\n{}", "é".repeat(5000)),
            )),
            ..bounced("x@y.test")
        };
        let bytes = build(&report(&env, std::slice::from_ref(&x), ORIGINAL));
        assert_wire_safe(&bytes);
        let blocks = status_blocks(&bytes);
        assert_eq!(
            get(&blocks[1], "Final-Recipient"),
            Some("utf-8; j\\x{F6}hn@ex\\x{E4}mple.test")
        );
        assert!(!blocks[1].iter().any(|(n, _)| n == "Injected"));
    }

    #[test]
    fn notify_decides() {
        let none = Notify::default();
        assert!(wanted(none, Action::Failed));
        assert!(!wanted(none, Action::Delayed));
        assert!(!wanted(none, Action::Relayed));
        let never = Notify {
            never: true,
            ..Notify::default()
        };
        assert!(!wanted(never, Action::Failed));
        let success = Notify {
            success: true,
            ..Notify::default()
        };
        assert!(
            !wanted(success, Action::Failed),
            "SUCCESS alone excludes FAILURE"
        );
        assert!(wanted(success, Action::Relayed));
        let delay = Notify {
            delay: true,
            failure: true,
            ..Notify::default()
        };
        assert!(wanted(delay, Action::Delayed) && wanted(delay, Action::Failed));
    }

    #[test]
    fn null_sender_and_opted_out_tenants_get_no_dsn() {
        let cfg = Config::from_toml_str(
            r#"
            [[listener]]
            address = "127.0.0.1:2587"
            [dsn]
            delay_after = "2h"
            "#,
        )
        .unwrap();
        let mut s = DsnSettings::from_config(&cfg).unwrap();
        assert_eq!(s.delay_after, 7200);
        let mut env = envelope();
        assert!(s.applies_to(&env));
        s.tenants_off.insert("acme".into());
        assert!(!s.applies_to(&env));
        env.tenant = None;
        assert!(s.applies_to(&env));
        env.sender = String::new();
        assert!(!s.applies_to(&env), "a bounce is never bounced");

        let off = Config::from_toml_str(
            "[[listener]]\naddress = \"127.0.0.1:2587\"\n[dsn]\nenabled = false\n",
        )
        .unwrap();
        assert!(DsnSettings::from_config(&off).is_none());
    }

    /// A late failure is reported for a delivered recipient that wants
    /// failure reports, of a message that may cause DSNs; never otherwise.
    #[test]
    fn late_failures_follow_the_rules_of_herald_s_own() {
        let cfg = Config::from_toml_str("[[listener]]\naddress = \"127.0.0.1:2587\"\n").unwrap();
        let mut s = DsnSettings::from_config(&cfg).unwrap();
        let env = envelope();
        let mut r = Recipient::new("bob@one.test".into());
        r.orcpt = Some("rfc822;Bob@one.test".into());
        r.status = RcptStatus::Delivered;
        let reply = Reply::new(550, Enhanced(5, 1, 1), "user unknown");
        let late = |s: &DsnSettings, env: &Envelope, r: &Recipient| {
            late_failure(s, env, r, reply.clone(), Some("mx.one.test".into()), DATE)
        };
        let x = late(&s, &env, &r).expect("reported");
        assert_eq!(x.action, Action::Failed);
        assert_eq!(status(&x), "5.1.1");
        assert_eq!(x.orcpt.as_deref(), Some("rfc822;Bob@one.test"));
        assert_eq!(x.remote_mta.as_deref(), Some("mx.one.test"));
        assert_eq!(x.will_retry_until, None);

        for status in [
            RcptStatus::Pending,
            RcptStatus::Deferred,
            RcptStatus::Bounced,
        ] {
            let r = Recipient {
                status,
                ..r.clone()
            };
            assert!(late(&s, &env, &r).is_none(), "{status:?}");
        }
        let mut never = r.clone();
        never.notify.never = true;
        assert!(late(&s, &env, &never).is_none(), "NOTIFY=NEVER");
        let null = Envelope {
            sender: String::new(),
            ..envelope()
        };
        assert!(late(&s, &null, &r).is_none(), "a bounce is never bounced");
        s.tenants_off.insert("acme".into());
        assert!(late(&s, &env, &r).is_none(), "tenant with DSNs off");
    }

    #[test]
    fn tenants_turn_dsns_off_in_config() {
        use crate::config::test_support::tenant;
        let cfg = Config::from_toml_str(&format!(
            "[[listener]]\naddress = \"127.0.0.1:2587\"\n{}{}dsn = false\n",
            tenant("acme", r#""*@acme.test""#),
            tenant("hooks", r#""*@hooks.test""#),
        ))
        .unwrap();
        let s = DsnSettings::from_config(&cfg).unwrap();
        assert_eq!(s.delay_after, 4 * 3600, "default delay_after");
        let mut env = envelope();
        assert!(s.applies_to(&env));
        env.tenant = Some("hooks".into());
        assert!(!s.applies_to(&env));
    }

    /// The queue's hook: one DSN for the recipients that failed in one
    /// attempt, read back from the spool after the message finished, sent
    /// from `<>` to the sender; NOTIFY=NEVER left out; a DSN's own failure
    /// never reported.
    #[tokio::test]
    async fn queue_sends_one_dsn_per_attempt_to_the_sender() {
        use crate::envelope::QueueId;
        use crate::queue::{AttemptResult, Queue, RcptOutcome};
        use crate::report::{Reason, Reporter};
        use std::time::Duration;

        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::from_toml_str(&format!(
            r#"
            [server]
            hostname = "relay.test"
            spool_dir = "{}"
            [[listener]]
            address = "127.0.0.1:0"
            [delivery]
            retry = ["1h"]
            retry_jitter = 0.0
            "#,
            dir.path().display()
        ))
        .unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let q = Queue::open(&cfg, Reporter::discard(), tx).unwrap();
        let id = QueueId::generate();
        let mut never = Recipient::new("c@one.test".into());
        never.notify.never = true;
        let rcpts = vec![
            Recipient::new("a@one.test".into()),
            Recipient::new("b@one.test".into()),
            never,
        ];
        q.enqueue(id, envelope(), rcpts, bytes::Bytes::from_static(ORIGINAL))
            .await
            .unwrap();
        assert_eq!(rx.recv().await.unwrap().recipients.len(), 3);
        let refused = |index| RcptOutcome {
            index,
            result: AttemptResult::Bounced(
                Reply::new(550, Enhanced(5, 1, 1), "user unknown"),
                Reason::UserUnknown,
            ),
            mx: Some("mx.one.test".into()),
            tls: None,
            next_hop_dsn: false,
        };
        q.complete_attempt(id, vec![refused(0), refused(1), refused(2)]);
        assert!(q.get(id).is_none(), "the original is finished");
        let dsn = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a DSN is queued")
            .unwrap();
        assert_eq!(dsn.envelope.sender, "");
        assert_eq!(dsn.domain, "acme.test");
        assert_eq!(dsn.recipients[0].address, "billing@acme.test");
        let blocks = status_blocks(&dsn.body);
        let finals: Vec<_> = blocks[1..]
            .iter()
            .map(|b| get(b, "Final-Recipient").unwrap())
            .collect();
        assert_eq!(finals, ["rfc822; a@one.test", "rfc822; b@one.test"]);
        assert!(
            String::from_utf8_lossy(&dsn.body).contains("Subject: Invoice 7"),
            "the original was read back"
        );
        // The DSN bounces in turn: nothing more.
        q.complete_attempt(dsn.id, vec![refused(0)]);
        assert!(
            tokio::time::timeout(Duration::from_millis(300), rx.recv())
                .await
                .is_err(),
            "a bounce is never bounced"
        );
        q.close().await;
    }

    /// Keeps `tests/fixtures/dsn-*.eml` byte-exact with what herald builds;
    /// `HERALD_UPDATE_FIXTURES=1` (or a missing file) rewrites them.
    #[test]
    fn fixtures_match() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let env = envelope();
        let mut full = envelope();
        full.ret = Some(Ret::Full);
        let failed = [bounced("bob@one.test")];
        let delayed = [DsnRecipient {
            action: Action::Delayed,
            reply: Some(Reply::new(451, Enhanced(4, 4, 1), "connection refused")),
            remote_mta: None,
            will_retry_until: Some(DATE + 4 * 86_400),
            ..bounced("dora@two.test")
        }];
        for (name, bytes) in [
            (
                "dsn-failed-hdrs.eml",
                build(&report(&env, &failed, ORIGINAL)),
            ),
            (
                "dsn-failed-full.eml",
                build(&report(&full, &failed, ORIGINAL)),
            ),
            ("dsn-delayed.eml", build(&report(&env, &delayed, ORIGINAL))),
        ] {
            let path = dir.join(name);
            if std::env::var_os("HERALD_UPDATE_FIXTURES").is_some() || !path.exists() {
                std::fs::write(&path, &bytes).unwrap();
            }
            let want = std::fs::read(&path).unwrap();
            assert!(
                want == bytes,
                "{name} differs from what herald builds; rerun with HERALD_UPDATE_FIXTURES=1 if intended:\n{}",
                String::from_utf8_lossy(&bytes)
            );
        }
    }

    /// Text biased to multi-byte characters, controls and the separators
    /// the report's fields use, or any Unicode.
    fn network_text() -> impl proptest::strategy::Strategy<Value = String> {
        proptest::prop_oneof![
            "[a-zA-Z0-9 .;:@<>+=\\\\-]{0,20}[éİ€😀漢ß\u{0}\r\n\t]{0,4}[a-z@. ]{0,20}",
            "(?s).{0,120}",
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 256,
            failure_persistence: None,
            ..Default::default()
        })]

        /// Whatever a remote server answered and the client gave (addresses,
        /// ORCPT, ENVID, Message-ID, in any Unicode), the report is 7-bit,
        /// CRLF only, with no line over 998 octets.
        #[test]
        fn any_reply_and_address_make_a_wire_safe_dsn(
            text in network_text(),
            address in network_text(),
            orcpt in network_text(),
            mx in network_text(),
            env_id in network_text(),
            message_id in network_text(),
            code in 200u16..600,
            full in proptest::bool::ANY,
            action in 0..3usize,
        ) {
            let mut env = envelope();
            env.env_id = Some(env_id);
            env.message_id = Some(message_id);
            env.ret = full.then_some(Ret::Full);
            let rcpts = [DsnRecipient {
                address,
                orcpt: Some(orcpt),
                action: [Action::Failed, Action::Delayed, Action::Relayed][action],
                reply: Some(Reply::from_wire(code, &text)),
                remote_mta: Some(mx),
                last_attempt: DATE,
                will_retry_until: Some(DATE + 3600),
            }];
            assert_wire_safe(&build(&report(&env, &rcpts, ORIGINAL)));
            // The receive stage refuses bare CR and LF in a message.
            let line = text.replace(['\r', '\n'], " ");
            let original = format!("Subject: {line}\r\n\r\n{line}\r\n");
            assert_wire_safe(&build(&report(&env, &rcpts, original.as_bytes())));
        }
    }
}
