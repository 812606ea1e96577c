//! The parsers behind [`parse`]: RFC 3464 / RFC 6533 reports, ARF (RFC
//! 5965), and the plain-text bounces of the MTAs that send no report.
//!
//! mail-parser walks the MIME structure; the delivery-status and
//! feedback-report bodies ("header-like" field blocks separated by blank
//! lines, RFC 3464 §2.1) and the plain texts are read here. Everything is
//! read leniently (field names in any case, blocks without their blank line,
//! addresses with or without their type) because every field comes from
//! software we do not control.

use std::borrow::Cow;
use std::collections::HashMap;

use mail_parser::{Message, MessageParser, MessagePart, MimeHeaders, PartType};

use super::{Action, Bounce, BounceFormat, BouncedRecipient, Complaint, Report};
use crate::reply::Enhanced;

/// Bytes of a message that are looked at; the rest (the tail of a returned
/// original, usually) is ignored, so work stays bounded on any input. The
/// report parts come before the returned message in every format.
pub const MAX_INPUT: usize = 4 << 20;
/// Bytes of a human-readable text part searched by the plain-text parsers.
const MAX_TEXT: usize = 64 << 10;
/// Bytes of a delivery-status or feedback-report body that are read.
const MAX_FIELDS: usize = 256 << 10;
/// Recipients kept from one report.
const MAX_RECIPIENTS: usize = 1000;

/// Reads a message sent to the return path.
///
/// Returns `None` when the message is neither a bounce nor a complaint, so
/// the caller must not turn it into a `bounced` or `complained` event:
/// * an auto-reply (`X-Autoreply`, `X-Autorespond`, `Precedence:
///   auto_reply`, an "Out of office" / "Automatic reply" subject, or
///   `Auto-Submitted: auto-replied` from a person rather than a mail
///   system): it proves the mailbox exists and is read;
/// * a person's reply, or anything else not from a mail system (the
///   sender is not a mailer-daemon or postmaster, the return path is not
///   null and the subject is not a bounce subject);
/// * a report of another type (e.g. a read receipt,
///   `report-type=disposition-notification`);
/// * mail-parser finds no header at all.
///
/// A [`Report::Bounce`] may carry success or delay actions (NOTIFY=SUCCESS,
/// DELAY): see [`Bounce::failed`].
pub fn parse(message: &[u8]) -> Option<Report> {
    let message = message.get(..MAX_INPUT).unwrap_or(message);
    let msg = MessageParser::default().parse(message)?;
    if let Some(c) = feedback_report(&msg).or_else(|| legacy_complaint(&msg)) {
        // An authentication failure report (RFC 6591) or a "not spam"
        // report says nothing against the recipient.
        if matches!(c.feedback_type.as_str(), "auth-failure" | "not-spam") {
            return None;
        }
        return Some(Report::Complaint(c));
    }
    if let Some(mut b) = delivery_status(&msg) {
        names_from_text(&msg, &mut b);
        return Some(Report::Bounce(b));
    }
    let from_mail_system = from_mail_system(&msg);
    if is_auto_reply(&msg, from_mail_system) || !from_mail_system {
        return None;
    }
    if let Some(r) = forwarded_report(&msg) {
        return Some(r);
    }
    if let Some(text) = inline_fields(&msg) {
        return Some(Report::Bounce(delivery_status_of(&msg, &text)));
    }
    plain_text(&msg).map(Report::Bounce)
}

/// A report whose fields name nobody (no recipient block, or one without
/// an address) takes the addresses its human-readable text names.
fn names_from_text(msg: &Message<'_>, b: &mut Bounce) {
    let named =
        |r: &BouncedRecipient| r.final_recipient.is_some() || r.original_recipient.is_some();
    if b.recipients.iter().any(named) || b.recipients.len() > 1 {
        return;
    }
    let Some(text) = plain_text(msg) else { return };
    let found: Vec<BouncedRecipient> = text.recipients.into_iter().filter(named).collect();
    match (b.recipients.first_mut(), found.as_slice()) {
        (None, [_, ..]) => b.recipients = found,
        (Some(r), [one]) => r.final_recipient.clone_from(&one.final_recipient),
        _ => {}
    }
}

/// A report a mail system forwarded as an attachment (`message/rfc822`
/// holding the `multipart/report`): read the inner one.
fn forwarded_report(msg: &Message<'_>) -> Option<Report> {
    msg.parts.iter().find_map(|p| {
        let PartType::Message(inner) = &p.body else {
            return None;
        };
        if let Some(c) = feedback_report(inner) {
            return (!matches!(c.feedback_type.as_str(), "auth-failure" | "not-spam"))
                .then_some(Report::Complaint(c));
        }
        delivery_status(inner).map(Report::Bounce)
    })
}

/// The delivery-status fields of a report whose MIME structure is broken
/// (a boundary cut off or not matching its separators), so that they sit
/// in the body as text: from the first `Reporting-MTA:` or
/// `Final-Recipient:` line to the returned original.
fn inline_fields(msg: &Message<'_>) -> Option<String> {
    let root = msg.parts.first()?;
    let body = msg.raw_message.get(root.offset_body as usize..)?;
    let body = String::from_utf8_lossy(body.get(..MAX_FIELDS).unwrap_or(body));
    let mut out = String::new();
    let mut started = false;
    for line in body.lines() {
        let l = line.trim_start().to_ascii_lowercase();
        if !started {
            started = l.starts_with("reporting-mta:") || l.starts_with("final-recipient:");
            if !started {
                continue;
            }
        } else if l.starts_with("--")
            || l.starts_with("return-path:")
            || l.starts_with("received:")
            || l.starts_with("content-type:")
        {
            break;
        }
        out.push_str(line);
        out.push('\n');
    }
    (started && out.to_ascii_lowercase().contains("final-recipient:")).then_some(out)
}

// ---------------------------------------------------------------------------
// MIME helpers.

fn is_type(part: &MessagePart<'_>, ctype: &str, subtypes: &[&str]) -> bool {
    part.content_type().is_some_and(|c| {
        c.ctype().eq_ignore_ascii_case(ctype)
            && c.subtype()
                .is_some_and(|s| subtypes.iter().any(|t| s.eq_ignore_ascii_case(t)))
    })
}

/// A leaf part's decoded body as text (UTF-8, lossy), at most `max` bytes.
fn part_text<'a>(part: &'a MessagePart<'_>, max: usize) -> Option<Cow<'a, str>> {
    match &part.body {
        PartType::Text(t) | PartType::Html(t) => Some(Cow::Borrowed(cut(t, max))),
        PartType::Binary(b) | PartType::InlineBinary(b) => {
            Some(String::from_utf8_lossy(b.get(..max).unwrap_or(b)))
        }
        PartType::Message(_) | PartType::Multipart(_) => None,
    }
}

/// The first `max` bytes of `s`, cut at a char boundary.
fn cut(s: &str, max: usize) -> &str {
    &s[..s.floor_char_boundary(max)]
}

/// A top-level header's value as written, unfolded and trimmed (the first
/// one when repeated).
fn header(msg: &Message<'_>, name: &str) -> Option<String> {
    let root = msg.parts.first()?;
    let h = root
        .headers
        .iter()
        .find(|h| h.name.as_str().eq_ignore_ascii_case(name))?;
    let bytes = msg
        .raw_message
        .get(h.offset_start as usize..h.offset_end as usize)?;
    let value = unfold(&String::from_utf8_lossy(bytes));
    (!value.is_empty()).then_some(value)
}

fn unfold(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for (i, line) in s.split('\n').enumerate() {
        let line = line.trim_end_matches('\r');
        if i > 0 {
            out.push(' ');
            out.push_str(line.trim_start());
        } else {
            out.push_str(line);
        }
    }
    out.trim().to_string()
}

/// What a returned original (or its headers) tells: Message-ID as written,
/// the address of its To:, and Microsoft's X-HmXmrOriginalRecipient.
#[derive(Default)]
struct Original {
    message_id: Option<String>,
    to: Option<String>,
}

/// Finds the returned original among `msg`'s parts (never the root):
/// `message/rfc822`, `message/global` (RFC 6533), `text/rfc822-headers`
/// or `message/global-headers`.
fn original(msg: &Message<'_>) -> Option<Original> {
    let part = msg.parts.iter().skip(1).find(|p| {
        is_type(
            p,
            "message",
            &["rfc822", "global", "global-headers", "rfc822-headers"],
        ) || is_type(p, "text", &["rfc822-headers"])
    })?;
    match &part.body {
        PartType::Message(m) => Some(original_of(m)),
        // Headers only, or a message mail-parser could not parse as one.
        _ => {
            let text = part_text(part, MAX_FIELDS)?;
            let m = MessageParser::default().parse_headers(text.as_bytes())?;
            Some(original_of(&m))
        }
    }
}

fn original_of(m: &Message<'_>) -> Original {
    let to = m
        .to()
        .and_then(|a| a.first())
        .and_then(|a| a.address())
        .filter(|a| a.contains('@'))
        .map(str::to_string)
        .or_else(|| header(m, "X-HmXmrOriginalRecipient").map(|v| strip_angles(&v)));
    Original {
        message_id: header(m, "Message-ID"),
        to,
    }
}

fn strip_angles(s: &str) -> String {
    let s = s.trim();
    let s = s
        .strip_prefix('<')
        .and_then(|s| s.strip_suffix('>'))
        .unwrap_or(s)
        .trim();
    // A source route ("@relay.example:bob@example.org", RFC 5321 §4.1.2)
    // is not part of the address.
    match s.strip_prefix('@').and_then(|r| r.split_once(':')) {
        Some((_, addr)) => addr.trim().to_string(),
        None => s.to_string(),
    }
}

// ---------------------------------------------------------------------------
// Field blocks (RFC 3464 §2.1, RFC 5965 §3.1).

/// One field: lower-cased name, unfolded value.
type Field = (String, String);

/// Splits a delivery-status or feedback-report body into blocks of fields.
/// Continuation lines (leading space or tab) join the previous field with
/// one space; lines that are not fields are skipped.
fn field_blocks(text: &str) -> Vec<Vec<Field>> {
    let mut blocks = Vec::new();
    let mut block: Vec<Field> = Vec::new();
    for line in text.split('\n') {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            if !block.is_empty() {
                blocks.push(std::mem::take(&mut block));
            }
        } else if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = block.last_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
        } else if let Some((name, value)) = line.split_once(':') {
            let name = name.trim();
            if !name.is_empty() && !name.contains(char::is_whitespace) {
                block.push((name.to_ascii_lowercase(), value.trim().to_string()));
            }
        }
    }
    if !block.is_empty() {
        blocks.push(block);
    }
    blocks
}

/// `rfc822; bob@x` → `bob@x`; `utf-8; b\x{F8}b@x` → `bøb@x` (RFC 6533
/// §3); a value without a type is taken whole. Angle brackets dropped.
fn typed_address(value: &str) -> Option<String> {
    let (kind, addr) = match value.split_once(';') {
        Some((k, a)) => (k.trim(), a.trim()),
        None => ("", value.trim()),
    };
    let addr = if kind.eq_ignore_ascii_case("utf-8") {
        decode_unitext(addr)
    } else {
        addr.to_string()
    };
    let addr = strip_angles(&addr);
    // Text after the address (a comment, a folded line) is not part of it.
    let addr = match addr.split_whitespace().find(|t| t.contains('@')) {
        Some(t) if addr.contains(char::is_whitespace) && !addr.starts_with('"') => strip_angles(t),
        _ => addr,
    };
    // A local delivery's file or program ("rfc822;/var/spool/...") or a
    // bare host ("@relay.example") is no address to report.
    addr.split_once('@')
        .is_some_and(|(local, domain)| !local.is_empty() && !domain.is_empty())
        .then_some(addr)
}

/// Decodes the `\x{HEX}` escapes of RFC 6533's utf-8-addr-unitext.
fn decode_unitext(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("\\x{") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 3..];
        let decoded = after.find('}').and_then(|end| {
            let c = u32::from_str_radix(after.get(..end)?, 16).ok()?;
            Some((char::from_u32(c)?, end))
        });
        match decoded {
            Some((c, end)) => {
                out.push(c);
                rest = &after[end + 1..];
            }
            None => {
                out.push_str("\\x{");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// `dns; mx.example.net` → `mx.example.net`.
fn typed_name(value: &str) -> Option<String> {
    // Gmail appends "(2a00:..., the server for the domain ...)".
    let v = value
        .split_once(';')
        .map_or(value, |(_, name)| name)
        .split_whitespace()
        .next()?
        .trim_end_matches('.');
    (!v.is_empty()).then(|| v.to_string())
}

// ---------------------------------------------------------------------------
// RFC 3464 / RFC 6533.

fn delivery_status(msg: &Message<'_>) -> Option<Bounce> {
    let part = msg
        .parts
        .iter()
        .find(|p| is_type(p, "message", &["delivery-status", "global-delivery-status"]))?;
    let text = part_text(part, MAX_FIELDS).unwrap_or_default();
    Some(delivery_status_of(msg, &text))
}

/// A report from its delivery-status fields (`text`) and, for what they
/// leave out, the rest of `msg`.
fn delivery_status_of(msg: &Message<'_>, text: &str) -> Bounce {
    let mut bounce = Bounce {
        format: BounceFormat::Rfc3464,
        reporting_mta: None,
        recipients: Vec::new(),
        original_message_id: original(msg).and_then(|o| o.message_id),
        original_envelope_id: None,
    };
    let mut current: Option<DsnRecipient> = None;
    for block in field_blocks(text) {
        for (name, value) in block {
            match name.as_str() {
                "reporting-mta" => {
                    bounce.reporting_mta = bounce.reporting_mta.take().or(typed_name(&value))
                }
                "original-envelope-id"
                    if bounce.original_envelope_id.is_none() && !value.is_empty() =>
                {
                    bounce.original_envelope_id = Some(value);
                }
                // A recipient's first field starts a new recipient even
                // when a generator left out the blank line before it.
                "original-recipient" | "final-recipient" => {
                    let cur = current.get_or_insert_with(DsnRecipient::default);
                    let seen = if name == "original-recipient" {
                        cur.original_seen
                    } else {
                        cur.fin_seen
                    };
                    if seen {
                        push_recipient(&mut bounce.recipients, current.take());
                    }
                    let cur = current.get_or_insert_with(DsnRecipient::default);
                    if name == "original-recipient" {
                        cur.original = typed_address(&value);
                        cur.original_seen = true;
                    } else {
                        cur.fin = typed_address(&value);
                        cur.fin_seen = true;
                    }
                }
                "action" => current.get_or_insert_with(Default::default).action = Some(value),
                "status" => current.get_or_insert_with(Default::default).status = Some(value),
                "remote-mta" => {
                    current.get_or_insert_with(Default::default).remote_mta = typed_name(&value)
                }
                "diagnostic-code" => {
                    current.get_or_insert_with(Default::default).diagnostic =
                        (!value.is_empty()).then_some(value)
                }
                _ => {}
            }
        }
        push_recipient(&mut bounce.recipients, current.take());
    }
    human_reasons(msg, &mut bounce.recipients);
    failed_recipients_header(msg, &mut bounce.recipients);
    bounce
}

/// Exim's `X-Failed-Recipients:` header names the address of a failure
/// its text names only as a file, a program or a local name: given to the
/// one recipient without an address when the header lists one address the
/// report does not already name.
fn failed_recipients_header(msg: &Message<'_>, recipients: &mut [BouncedRecipient]) {
    let Some(value) = header(msg, "X-Failed-Recipients") else {
        return;
    };
    let listed: Vec<String> = addresses(&value)
        .into_iter()
        .filter(|a| {
            !recipients.iter().any(|r| {
                r.final_recipient
                    .as_deref()
                    .is_some_and(|f| f.eq_ignore_ascii_case(a))
            })
        })
        .collect();
    let mut unnamed = recipients
        .iter_mut()
        .filter(|r| r.final_recipient.is_none());
    if let ([one], Some(r), None) = (listed.as_slice(), unnamed.next(), unnamed.next()) {
        r.final_recipient = Some(one.clone());
    }
}

/// Fills the diagnostic of recipient blocks that have none from the
/// report's human-readable part: the line that names the recipient with a
/// reply code ("554 bob@example.org... aliasing/forwarding loop broken"),
/// or, for a report about one recipient, its first reply line.
fn human_reasons(msg: &Message<'_>, recipients: &mut [BouncedRecipient]) {
    if recipients.iter().all(|r| r.diagnostic.is_some()) {
        return;
    }
    let Some(text) = msg.body_text(0) else { return };
    let text = cut(&text, MAX_TEXT).replace("\r\n", "\n");
    let (head, _) = split_original(&text);
    let coded = |l: &str| basic_code(l, b"45").map(|(at, _)| l[at..].trim().to_string());
    let single = recipients.len() == 1;
    // Each text read once, whatever the number of recipient blocks (up to
    // MAX_RECIPIENTS): lower-cased lines, and the plain reading on demand.
    let lower: Vec<(String, &str)> = head.lines().map(|l| (l.to_ascii_lowercase(), l)).collect();
    let mut read: Option<Vec<BouncedRecipient>> = None;
    for r in recipients.iter_mut().filter(|r| r.diagnostic.is_none()) {
        let addr = r.final_recipient.as_deref().map(str::to_ascii_lowercase);
        let named = addr.as_deref().and_then(|a| {
            lower
                .iter()
                .filter(|(l, _)| l.contains(a))
                .find_map(|(_, l)| coded(l))
        });
        let any = || {
            single
                .then(|| {
                    head.lines()
                        .find(|l| basic_code(l.trim(), b"45").is_some_and(|(at, _)| at == 0))
                        .map(|l| l.trim().to_string())
                })
                .flatten()
        };
        // Else what the text says about it, read as any plain bounce.
        let from_text = || {
            let read = read.get_or_insert_with(|| generic(msg, head));
            read.iter()
                .find(|g| {
                    g.final_recipient
                        .as_deref()
                        .zip(addr.as_deref())
                        .is_some_and(|(g, a)| g.eq_ignore_ascii_case(a))
                })
                .or(if single { read.first() } else { None })
                .and_then(|g| g.diagnostic.clone())
                .filter(|d| !says_nothing(d))
        };
        let Some(diag) = named.or_else(any).or_else(from_text) else {
            continue;
        };
        let (code, enhanced) = reply_codes(&diag);
        r.smtp_code = r.smtp_code.or(code);
        if r.status.is_none() || r.status_derived {
            r.status = enhanced.or(r.status);
            r.status_derived = r.status_derived && enhanced.is_none();
        }
        r.diagnostic = Some(diag);
    }
}

/// A recipient block's fields as read.
#[derive(Default)]
struct DsnRecipient {
    original: Option<String>,
    fin: Option<String>,
    original_seen: bool,
    fin_seen: bool,
    action: Option<String>,
    status: Option<String>,
    remote_mta: Option<String>,
    diagnostic: Option<String>,
}

fn push_recipient(out: &mut Vec<BouncedRecipient>, r: Option<DsnRecipient>) {
    let Some(r) = r else { return };
    // A block without an address still reports a status (with VERP the
    // token names the recipient); one with neither is no recipient block.
    if out.len() >= MAX_RECIPIENTS || !(r.fin_seen || r.original_seen) {
        return;
    }
    let reported = r.status.as_deref().and_then(|s| {
        let first = s.split_whitespace().next()?;
        Enhanced::parse(first.trim_matches(|c: char| !c.is_ascii_digit()))
    });
    let (smtp_code, diag_status) = r.diagnostic.as_deref().map_or((None, None), reply_codes);
    let action = r
        .action
        .as_deref()
        .and_then(parse_action)
        .or_else(|| reported.or(diag_status).and_then(action_of_class))
        .unwrap_or(Action::Failed);
    // The diagnostic's own code wins over a Status: of the same class that
    // differs ("Status: 5.1.1" over "550 5.7.1 IP blacklisted", or a
    // generic "5.0.0"): it is the remote server's word.
    let status = match (reported, diag_status) {
        (Some(s), Some(d)) if s.0 == d.0 => Some(d),
        (s, d) => s.or(d),
    };
    let mut rcpt = BouncedRecipient {
        final_recipient: r.fin,
        original_recipient: r.original,
        action,
        status,
        status_derived: false,
        diagnostic: r.diagnostic,
        remote_mta: r.remote_mta,
        smtp_code,
    };
    derive_status(&mut rcpt);
    out.push(rcpt);
}

fn parse_action(v: &str) -> Option<Action> {
    let word = v.split_whitespace().next()?.trim_end_matches(';');
    [
        ("failed", Action::Failed),
        ("delayed", Action::Delayed),
        ("delivered", Action::Delivered),
        ("relayed", Action::Relayed),
        ("expanded", Action::Expanded),
    ]
    .into_iter()
    .find(|(name, _)| word.eq_ignore_ascii_case(name))
    .map(|(_, a)| a)
}

fn action_of_class(e: Enhanced) -> Option<Action> {
    match e.0 {
        2 => Some(Action::Delivered),
        4 => Some(Action::Delayed),
        5 => Some(Action::Failed),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Reply codes in free text.

/// The first basic reply code (2xx, 4xx, 5xx) in `s` and the enhanced code
/// after it (else the first one anywhere): `smtp; 550 5.1.1 user unknown`
/// → (550, 5.1.1); `#550 5.1.1 RESOLVER.ADR.RecipNotFound ##` likewise;
/// `(#5.1.1)` → (None, 5.1.1). Digits inside IP addresses, dates and
/// longer numbers are not codes.
pub(crate) fn reply_codes(s: &str) -> (Option<u16>, Option<Enhanced>) {
    // A failure's code before any 2xx: "220-laposte 421 4.2.1 Service
    // refused" is a refusal quoted after the greeting it came with.
    let code = basic_code(s, b"45").or_else(|| basic_code(s, b"2"));
    let from = code.map_or(0, |(at, _)| at);
    let enhanced = enhanced_code(&s[from..]).or_else(|| enhanced_code(s));
    (code.map(|(_, c)| c), enhanced)
}

/// A byte that may not touch a code: digits, letters (any non-ASCII byte
/// may be one) and '.'.
fn joins(b: Option<&u8>) -> bool {
    b.is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'.' || !b.is_ascii())
}

/// The first basic code whose first digit is in `classes`, with its offset.
fn basic_code(s: &str, classes: &[u8]) -> Option<(usize, u16)> {
    let b = s.as_bytes();
    (0..b.len().saturating_sub(2)).find_map(|i| {
        let digits = b.get(i..i + 3)?;
        let ok = classes.contains(&digits[0])
            && digits.iter().all(u8::is_ascii_digit)
            && (i == 0 || !joins(b.get(i - 1)))
            && matches!(
                b.get(i + 3),
                None | Some(b' ' | b'-' | b'\t' | b'\r' | b'\n')
            );
        // "550-5.1.1" and "550 ok" are codes; "550-" before a word is not
        // worth telling apart.
        ok.then(|| {
            (
                i,
                (digits[0] - b'0') as u16 * 100
                    + (digits[1] - b'0') as u16 * 10
                    + (digits[2] - b'0') as u16,
            )
        })
    })
}

/// The first enhanced status code in `s` (RFC 3463 syntax, class 2/4/5).
fn enhanced_code(s: &str) -> Option<Enhanced> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if matches!(b[i], b'2' | b'4' | b'5') && (i == 0 || !joins(b.get(i - 1))) {
            let mut end = i + 1;
            let mut ok = true;
            for _ in 0..2 {
                if b.get(end) != Some(&b'.') {
                    ok = false;
                    break;
                }
                let start = end + 1;
                end = start;
                while end < b.len() && b[end].is_ascii_digit() && end - start < 4 {
                    end += 1;
                }
                if end == start || end - start > 3 {
                    ok = false;
                    break;
                }
            }
            // "5.1.1." ends a sentence; "5.1.1.1" and "5.1.1x" are not codes.
            let after = b.get(end);
            let trailing_ok = match after {
                None => true,
                Some(b'.') => !b.get(end + 1).is_some_and(u8::is_ascii_digit),
                Some(c) => !c.is_ascii_alphanumeric(),
            };
            if ok
                && trailing_ok
                && let Some(e) = s.get(i..end).and_then(Enhanced::parse)
            {
                return Some(e);
            }
        }
        i += 1;
    }
    None
}

/// Text rules for a missing enhanced code, each unambiguous on its own:
/// (phrases, subject, detail).
const DERIVED: &[(&[&str], u16, u16)] = &[
    (
        &[
            "user unknown",
            "unknown user",
            "no such user",
            "no such mailbox",
            "no such recipient",
            "no mailbox here by that name",
            "mailbox not found",
            "user not found",
            "recipient not found",
            "recipnotfound",
            "recipientnotfound",
            "does not exist",
            "doesn't exist",
            "doesn't have a",
            "invalid recipient",
            "unknown recipient",
            "unrouteable address",
        ],
        1,
        1,
    ),
    (
        &[
            "mailbox full",
            "mailbox is full",
            "over quota",
            "overquota",
            "quota exceeded",
            "exceeded storage",
            "out of storage",
        ],
        2,
        2,
    ),
    (
        &[
            "message too large",
            "message too big",
            "message size exceeds",
            "exceeds size limit",
            "size limit exceeded",
        ],
        3,
        4,
    ),
];

/// Fills in a missing status from the diagnostic when exactly one rule
/// matches; the class comes from the SMTP code, else from the action.
fn derive_status(r: &mut BouncedRecipient) {
    if r.status.is_some() {
        return;
    }
    let Some(text) = r.diagnostic.as_deref() else {
        return;
    };
    let text = text.to_ascii_lowercase();
    let mut hits = DERIVED
        .iter()
        .filter(|(phrases, _, _)| phrases.iter().any(|p| text.contains(p)));
    let (Some((_, subject, detail)), None) = (hits.next(), hits.next()) else {
        return;
    };
    let class = match (r.smtp_code.map(|c| c / 100), r.action) {
        (Some(4), _) => 4,
        (Some(5), _) => 5,
        (Some(_), _) => return,
        (None, Action::Failed) => 5,
        (None, Action::Delayed) => 4,
        (None, _) => return,
    };
    r.status = Some(Enhanced(class, *subject, *detail));
    r.status_derived = true;
}

// ---------------------------------------------------------------------------
// ARF (RFC 5965).

/// A complaint in the older form before ARF, still sent by Hotmail's
/// (Outlook.com's) JMRP and Amazon SES's forwarding: a message from
/// `staff@hotmail.com` (or `complaints@email-abuse.amazonses.com`) whose
/// subject says "complaint about message from IP", with the complained
/// message attached; the recipient is the attached message's `To:` or
/// Microsoft's `X-HmXmrOriginalRecipient`.
fn legacy_complaint(msg: &Message<'_>) -> Option<Complaint> {
    let from = msg.from()?.first()?.address()?.to_ascii_lowercase();
    if !matches!(
        from.as_str(),
        "staff@hotmail.com" | "complaints@email-abuse.amazonses.com"
    ) {
        return None;
    }
    let subject = msg.subject().unwrap_or_default();
    let lower = subject.to_ascii_lowercase();
    let at = lower.find("complaint about message from")?;
    let source_ip = subject[at + "complaint about message from".len()..]
        .split_whitespace()
        .next()
        .map(|ip| {
            ip.trim_matches(|c: char| !c.is_ascii_hexdigit() && c != '.' && c != ':')
                .to_string()
        })
        .filter(|ip| !ip.is_empty());
    let original = original(msg).unwrap_or_default();
    Some(Complaint {
        feedback_type: "abuse".into(),
        user_agent: Some(if from.ends_with("hotmail.com") {
            "Hotmail (legacy complaint)".into()
        } else {
            "Amazon SES (legacy complaint)".into()
        }),
        original_mail_from: None,
        original_rcpt_to: None,
        reported_domain: None,
        source_ip,
        arrival_date: None,
        original_message_id: original.message_id,
        original_recipient_header: original.to,
    })
}

fn feedback_report(msg: &Message<'_>) -> Option<Complaint> {
    let part = msg
        .parts
        .iter()
        .find(|p| is_type(p, "message", &["feedback-report"]))?;
    let text = part_text(part, MAX_FIELDS).unwrap_or_default();
    let fields: Vec<Field> = field_blocks(&text).into_iter().flatten().collect();
    let get = |names: &[&str]| {
        names.iter().find_map(|n| {
            fields
                .iter()
                .find(|(f, v)| f == n && !v.is_empty())
                .map(|(_, v)| v.clone())
        })
    };
    let original = original(msg).unwrap_or_default();
    Some(Complaint {
        feedback_type: get(&["feedback-type"])
            .map(|v| v.to_ascii_lowercase())
            .unwrap_or_else(|| "other".into()),
        user_agent: get(&["user-agent"]),
        original_mail_from: get(&["original-mail-from"]).map(|v| strip_angles(&v)),
        // Removal-Recipient: the field of ARF drafts Microsoft still sends.
        original_rcpt_to: get(&["original-rcpt-to", "removal-recipient"]).map(|v| strip_angles(&v)),
        reported_domain: get(&["reported-domain"]),
        source_ip: get(&["source-ip"]),
        arrival_date: get(&["arrival-date", "received-date"]),
        original_message_id: original.message_id,
        original_recipient_header: original.to,
    })
}

// ---------------------------------------------------------------------------
// Who sent it.

/// Sent by a mail system rather than a person: a mailer-daemon or
/// postmaster sender, a null return path, or a bounce subject (not a
/// reply's or forward's).
fn from_mail_system(msg: &Message<'_>) -> bool {
    let null_path = header(msg, "Return-Path").is_some_and(|v| v.replace(' ', "") == "<>");
    let subject = msg.subject().unwrap_or_default().trim().to_lowercase();
    let is_reply = ["re:", "fwd:", "fw:", "aw:", "wg:", "tr:", "sv:", "vs:"]
        .iter()
        .any(|p| subject.starts_with(p));
    let bounce_subject = !is_reply && BOUNCE_SUBJECTS.iter().any(|p| subject.contains(p));
    daemon_sender(msg) || null_path || bounce_subject
}

/// Words of a bounce's subject (not a reply's or forward's).
const BOUNCE_SUBJECTS: &[&str] = &[
    "undeliver",
    "undelivered",
    "delivery status notification",
    "failure notice",
    "mail delivery failed",
    "returned mail",
    "delivery failure",
    "delivery failed",
    "delivery has failed",
    "could not be delivered",
    "non-delivery",
    "nondeliverable",
    "mail system error",
    "delayed mail",
    "delivery delayed",
    "warning: could not send message",
    "mail error",
    "delivery warning",
    "delivery problem",
    "bounce notification",
    "user unknown",
    "rejected mail",
    "mail failure",
    "failed mail",
];

/// Sent by a mailer-daemon or postmaster: whatever it says is about a
/// delivery.
fn daemon_sender(msg: &Message<'_>) -> bool {
    let from = msg
        .from()
        .and_then(|a| a.first())
        .map(|a| {
            (
                a.address().unwrap_or_default().to_ascii_lowercase(),
                a.name().unwrap_or_default().to_ascii_lowercase(),
            )
        })
        .unwrap_or_default();
    let local = from.0.split('@').next().unwrap_or_default();
    [
        "mailer-daemon",
        "postmaster",
        "post_master",
        "mail-daemon",
        "maildaemon",
        "mdaemon",
        "mail-delivery-subsystem",
    ]
    .contains(&local)
        || from.1.contains("mail delivery")
        || from.1.contains("mailer-daemon")
}

/// An auto-reply (RFC 3834 and its older, informal markers). Bounces carry
/// `Auto-Submitted: auto-replied` too, so that header alone counts only
/// when a person's mailbox sent it.
fn is_auto_reply(msg: &Message<'_>, from_mail_system: bool) -> bool {
    if header(msg, "X-Autoreply").is_some() || header(msg, "X-Autorespond").is_some() {
        return true;
    }
    if header(msg, "Precedence").is_some_and(|v| v.eq_ignore_ascii_case("auto_reply")) {
        return true;
    }
    let subject = msg.subject().unwrap_or_default().trim().to_lowercase();
    if [
        "out of office",
        "out of the office",
        "automatic reply",
        "auto:",
        "autoreply",
        "auto-reply",
        "auto reply",
        "abwesenheitsnotiz",
        "réponse automatique",
        "respuesta automática",
        "on vacation",
    ]
    .iter()
    .any(|p| subject.starts_with(p))
    {
        return true;
    }
    !from_mail_system
        && header(msg, "Auto-Submitted")
            .is_some_and(|v| v.to_ascii_lowercase().starts_with("auto-replied"))
}

// ---------------------------------------------------------------------------
// Plain-text bounces.

fn plain_text(msg: &Message<'_>) -> Option<Bounce> {
    // A broken MIME structure (a boundary lost) hides the text part: read
    // the raw body then.
    let body = msg.body_text(0).or_else(|| {
        let root = msg.parts.first()?;
        let raw = msg.raw_message.get(root.offset_body as usize..)?;
        Some(String::from_utf8_lossy(raw.get(..MAX_TEXT).unwrap_or(raw)))
    })?;
    let body = cut(&body, MAX_TEXT).replace("\r\n", "\n");
    let (head, tail) = split_original(&body);
    let lower = head.to_lowercase();
    let has = |p: &str| lower.contains(p);

    let (format, recipients, reporting_mta) =
        if has("this message was created automatically by mail delivery software") {
            (BounceFormat::Exim, exim(head), None)
        } else if has("this is the qmail-send program") {
            let host = after_phrase(head, "qmail-send program at ");
            (
                BounceFormat::Qmail,
                angle_paragraphs(head, Action::Failed),
                host,
            )
        } else if has("sorry, we were unable to deliver your message") {
            (
                BounceFormat::Yahoo,
                angle_paragraphs(head, Action::Failed),
                None,
            )
        } else if has("delivery to the following recipient")
            || has("your message wasn't delivered to")
            || has("there was a temporary problem delivering your message")
        {
            (BounceFormat::Gmail, gmail(head), None)
        } else if has("delivery has failed to these recipients")
            || has("delivery is delayed to these recipients")
            || has("remote server returned '")
            || has("your message did not reach some or all of the intended recipients")
        {
            let host = after_phrase(head, "Generating server: ");
            (BounceFormat::Exchange, exchange(head), host)
        } else if has("----- the following addresses had")
            || has("----- transcript of session follows")
        {
            (BounceFormat::Sendmail, sendmail(head), None)
        } else if has("are not accepting mail from") {
            (BounceFormat::Unknown, aol(msg, head), None)
        } else if has("this is the mail system at host")
            || has("this is the postfix program at host")
        {
            let host = after_phrase(head, " at host ");
            let action = if has("this is a warning only") {
                Action::Delayed
            } else {
                Action::Failed
            };
            (BounceFormat::Postfix, angle_paragraphs(head, action), host)
        } else {
            let r = generic(msg, head);
            if r.is_empty() {
                return None;
            }
            (BounceFormat::Unknown, r, None)
        };

    // A known layout that named nobody (a variant of it): read it as any.
    let mut recipients = if recipients.is_empty() {
        generic(msg, head)
    } else {
        recipients
    };
    recipients.truncate(MAX_RECIPIENTS);
    for r in &mut recipients {
        if let Some(d) = r.diagnostic.as_deref() {
            let (code, enhanced) = reply_codes(d);
            r.smtp_code = r.smtp_code.or(code);
            r.status = r.status.or(enhanced);
        }
        derive_status(r);
    }
    let returned = original(msg);
    // A recipient named by its local part only ("kijitora"): the
    // returned original's To: address with that local part.
    let to = returned
        .as_ref()
        .and_then(|o| o.to.clone())
        .or_else(|| inline_to(tail));
    for r in &mut recipients {
        if r.final_recipient
            .as_deref()
            .is_some_and(|n| !n.contains('@'))
        {
            let name = r.final_recipient.take().unwrap_or_default();
            r.final_recipient = to.clone().filter(|to| {
                to.split_once('@')
                    .is_some_and(|(local, _)| local.eq_ignore_ascii_case(&name))
            });
        }
    }
    failed_recipients_header(msg, &mut recipients);
    let original_message_id = returned
        .and_then(|o| o.message_id)
        .or_else(|| inline_message_id(tail));
    Some(Bounce {
        format,
        reporting_mta,
        recipients,
        original_message_id,
        original_envelope_id: None,
    })
}

/// Splits a plain bounce at the line that starts the returned original.
fn split_original(text: &str) -> (&str, &str) {
    const MARKERS: &[&str] = &[
        "copy of the message",
        "below this line is a copy",
        "original message follows",
        "original message headers",
        "----- original message -----",
        "returned message follows",
        "unsent message below",
        "unsent message follows",
    ];
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        // ASCII lower-casing keeps byte offsets: a marker's offset in `l`
        // is its offset in `line`.
        let l = line.to_ascii_lowercase();
        // An original copied in without a marker starts with its headers.
        if at > 0 && (l.starts_with("received: from ") || l.starts_with("return-path: <")) {
            return (&text[..at], &text[at..]);
        }
        // A marker may end a line that holds the whole report (an HTML
        // body turned to text): the text before it stays.
        if let Some(m) = MARKERS.iter().filter_map(|m| l.find(m)).min() {
            let cut = if line[..m].trim().len() < 40 {
                at
            } else {
                at + m
            };
            return (&text[..cut], &text[cut..]);
        }
        at += line.len();
    }
    (text, "")
}

/// The To: of an original copied inline after the marker, when it names
/// exactly one address.
fn inline_to(tail: &str) -> Option<String> {
    let value = tail.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim().eq_ignore_ascii_case("to").then_some(value)
    })?;
    let found = addresses(value);
    match found.as_slice() {
        [one] => Some(one.clone()),
        _ => None,
    }
}

/// The Message-ID header of an original copied inline after the marker.
fn inline_message_id(tail: &str) -> Option<String> {
    tail.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        (name.trim().eq_ignore_ascii_case("message-id") && !value.trim().is_empty())
            .then(|| value.trim().to_string())
    })
}

/// The token after `phrase` (case-insensitive), trailing '.' and ':' cut.
fn after_phrase(text: &str, phrase: &str) -> Option<String> {
    let at = text
        .to_ascii_lowercase()
        .find(&phrase.to_ascii_lowercase())?;
    let token = text.get(at + phrase.len()..)?.split_whitespace().next()?;
    let token = token.trim_end_matches(['.', ':', ',']);
    (!token.is_empty()).then(|| token.to_string())
}

/// The first thing in `s` shaped like an e-mail address.
fn find_address(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let local_char = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+/=?^_`{|}~.-".contains(&c);
    let domain_char = |c: u8| c.is_ascii_alphanumeric() || c == b'.' || c == b'-';
    for (at, _) in s.match_indices('@') {
        let mut start = at;
        while start > 0 && local_char(b[start - 1]) {
            start -= 1;
        }
        let mut end = at + 1;
        while end < b.len() && domain_char(b[end]) {
            end += 1;
        }
        // Only ASCII bytes were stepped over: both ends are char boundaries.
        // Quotes around an address and Exchange's X.400 "SMTP=" are not
        // part of it.
        let mut local = s[start..at].trim_start_matches(['.', '\'', '`']);
        if let Some((prefix, rest)) = local.split_once('=')
            && prefix.eq_ignore_ascii_case("smtp")
        {
            local = rest;
        }
        if local.starts_with('/') || local.starts_with('|') {
            continue;
        }
        let domain = s[at + 1..end].trim_end_matches(['.', '-']);
        if !local.is_empty() && domain.contains('.') {
            return Some(format!("{local}@{domain}"));
        }
    }
    None
}

fn recipient(addr: Option<String>, action: Action, diagnostic: Option<String>) -> BouncedRecipient {
    BouncedRecipient {
        final_recipient: addr,
        original_recipient: None,
        action,
        status: None,
        status_derived: false,
        diagnostic: diagnostic.filter(|d| !d.is_empty()),
        remote_mta: None,
        smtp_code: None,
    }
}

fn join_lines<'a>(lines: impl IntoIterator<Item = &'a str>) -> String {
    lines
        .into_iter()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Exim: each address indented by two spaces, its details by four or more
/// (`host NAME [IP]`, `SMTP error from remote mail server after ...:`, the
/// reply lines, or the older one-line `host NAME [IP]: 550 ...`). GMX and
/// 1&1 write the same text with `"addr":` lines at the margin and their
/// details under them up to the next address.
fn exim(head: &str) -> Vec<BouncedRecipient> {
    let action = if head.to_lowercase().contains("has not yet been delivered") {
        Action::Delayed
    } else {
        Action::Failed
    };
    // `"bob@example.org":` (GMX, 1&1) or `bob@example.org:` at the margin.
    let quoted = |l: &str| {
        let t = l.trim_end();
        !t.starts_with([' ', '\t'])
            && t.ends_with(':')
            && t.contains('@')
            && !t.contains(char::is_whitespace)
    };
    // Under "The following address(es) failed:" an entry need not be an
    // address: a local name, "save to FILE", "an undisclosed address".
    let list_at = head
        .to_ascii_lowercase()
        .find("following address")
        .unwrap_or(usize::MAX);
    let classic = |l: &str, at: usize| {
        l.starts_with("  ")
            && !l.starts_with("   ")
            && l.split_whitespace()
                .next()
                .is_some_and(|t| t.contains('@') || at > list_at)
    };
    let lines: Vec<&str> = head.lines().collect();
    let offsets: Vec<usize> = lines
        .iter()
        .scan(0, |at, l| {
            let here = *at;
            *at += l.len() + 1;
            Some(here)
        })
        .collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() && out.len() < MAX_RECIPIENTS {
        let line = lines[i];
        let line_at = offsets[i];
        i += 1;
        let is_quoted = quoted(line);
        if !is_quoted && !classic(line, line_at) {
            continue;
        }
        // "name@example.org <bob@example.org>: ...": the address in angle
        // brackets is the one; what precedes it is a display name.
        let addr = line
            .split_once('<')
            .and_then(|(_, r)| r.split_once('>'))
            .and_then(|(inner, _)| find_address(inner))
            .or_else(|| find_address(line));
        let mut details = Vec::new();
        // "  <bob@example.org>: 550 unknown user": the reply on its line.
        if let Some((_, rest)) = line.trim().split_once(">:")
            && !rest.trim().is_empty()
        {
            details.push(rest.trim());
        }
        // 1&1 writes the details at the margin, up to a blank line.
        let unindented = !is_quoted
            && lines.get(i).is_some_and(|n| {
                !n.trim().is_empty() && !n.starts_with(' ') && !n.starts_with('\t')
            });
        while let Some(next) = lines.get(i) {
            let more = if is_quoted || unindented {
                !next.trim().is_empty() && !quoted(next) && !classic(next, offsets[i])
            } else {
                next.starts_with("    ") || next.starts_with('\t')
            };
            if !more {
                break;
            }
            details.push(next.trim());
            i += 1;
        }
        // Or after a blank line, at the margin, up to the next blank line.
        if details.is_empty() {
            let mut j = i;
            while lines.get(j).is_some_and(|l| l.trim().is_empty()) {
                j += 1;
            }
            while let Some(next) = lines.get(j) {
                if next.trim().is_empty()
                    || next.starts_with(' ')
                    || next.starts_with('-')
                    || quoted(next)
                {
                    break;
                }
                details.push(next.trim());
                j += 1;
            }
            i = j.max(i);
        }
        let remote = details.iter().find_map(|d| {
            let h = d
                .strip_prefix("host:")
                .or_else(|| d.strip_prefix("host "))?;
            h.split_whitespace()
                .next()
                .map(|h| h.trim_end_matches(':').to_string())
        });
        // The reply itself: from its first line with a code on, the code at
        // the start or after `host NAME [IP]: `.
        let reply_at = details.iter().enumerate().find_map(|(n, d)| {
            if basic_code(d, b"245").is_some_and(|(at, _)| at == 0)
                || enhanced_code(d).is_some_and(|_| d.starts_with(|c: char| c.is_ascii_digit()))
            {
                return Some((n, *d));
            }
            let (_, after) = d.strip_prefix("host ")?.split_once("]: ")?;
            basic_code(after, b"245")
                .is_some_and(|(at, _)| at == 0)
                .then_some((n, after))
        });
        let diag = match reply_at {
            Some((n, first)) => {
                join_lines(std::iter::once(first).chain(details[n + 1..].iter().copied()))
            }
            None => join_lines(
                details
                    .iter()
                    .copied()
                    .filter(|d| !d.starts_with("host ") && !d.starts_with("host:")),
            ),
        };
        // "an undisclosed address (generated from bob@example.org)", or a
        // local name alone (matched against the original's To: later).
        let addr = addr
            .or_else(|| {
                details
                    .iter()
                    .find(|d| d.contains("generated from"))
                    .and_then(|d| find_address(d))
            })
            .or_else(|| Some(line.trim().to_string()).filter(|t| !t.is_empty()));
        let mut r = recipient(addr, action, Some(diag));
        r.remote_mta = remote;
        out.push(r);
    }
    out
}

/// qmail, Yahoo and plain Postfix: paragraphs that open with `<addr>:`,
/// the reason after it on the same line (Postfix) or on the next lines
/// (qmail's `Remote host said: ...`).
fn angle_paragraphs(head: &str, action: Action) -> Vec<BouncedRecipient> {
    let mut out = Vec::new();
    let mut lines = head.lines().peekable();
    let opens = |l: &str| {
        l.starts_with('<') && l.contains(">:")
            || l.starts_with('<') && l.contains("> (expanded from")
    };
    while let Some(line) = lines.next() {
        if !opens(line) {
            continue;
        }
        let close = line.find('>').unwrap_or(line.len());
        let addr = find_address(&line[..close]);
        let rest = line[close..].split_once(':').map_or("", |(_, r)| r).trim();
        let mut body = vec![rest];
        while let Some(next) = lines.peek() {
            if next.trim().is_empty() || opens(next) {
                break;
            }
            body.push(next);
            lines.next();
        }
        let joined = join_lines(body.iter().copied());
        // Postfix "host mx.example[192.0.2.1] said: 550 ...", perhaps folded
        // over lines; qmail "Giving up on 192.0.2.1."
        let postfix = joined.split_once(" said: ").and_then(|(before, reply)| {
            let mut tokens = before.split_whitespace().rev();
            let host = tokens.next()?;
            (tokens.next() == Some("host"))
                .then(|| (host.split('[').next().unwrap_or(host).to_string(), reply))
        });
        let giving_up = body.iter().find_map(|l| {
            l.trim()
                .strip_prefix("Giving up on ")
                .map(|h| h.trim_end_matches('.').to_string())
        });
        let said = joined.split_once("Remote host said:").map(|(_, reply)| {
            reply
                .split(" Giving up on ")
                .next()
                .unwrap_or(reply)
                .trim()
                .to_string()
        });
        let (remote, diag) = match (postfix, said) {
            (Some((host, reply)), _) => (Some(host), reply.trim().to_string()),
            (None, Some(reply)) => (giving_up, reply),
            (None, None) => (
                giving_up,
                join_lines(
                    body.iter()
                        .copied()
                        .filter(|l| !l.trim_start().starts_with("Giving up on")),
                ),
            ),
        };
        let mut r = recipient(addr, action, Some(diag));
        r.remote_mta = remote.filter(|h| !h.is_empty());
        out.push(r);
    }
    out
}

/// Gmail's plain forms: recipients listed under "Delivery to the following
/// recipient failed permanently:" or named in "Your message wasn't
/// delivered to ADDR because"; the reply after "The error that the other
/// server returned was:" / "The response from the remote server was:".
fn gmail(head: &str) -> Vec<BouncedRecipient> {
    let lower = head.to_lowercase();
    let action = if lower.contains("temporary problem") || lower.contains("has been delayed") {
        Action::Delayed
    } else {
        Action::Failed
    };
    let lines: Vec<&str> = head.lines().collect();
    let mut addrs: Vec<String> = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if addrs.len() >= MAX_RECIPIENTS {
            break;
        }
        let ll = l.to_ascii_lowercase();
        if ll.contains("delivery to the following recipient") {
            // One list per bounce: a second heading would only repeat it.
            addrs.extend(
                lines[i + 1..]
                    .iter()
                    .skip_while(|l| l.trim().is_empty())
                    .take_while(|l| !l.trim().is_empty())
                    .filter_map(|l| find_address(l))
                    .take(MAX_RECIPIENTS),
            );
            break;
        } else if let Some(at) = ll
            .find("wasn't delivered to ")
            .map(|p| p + "wasn't delivered to ".len())
            .or_else(|| {
                ll.find("problem delivering your message to ")
                    .map(|p| p + "problem delivering your message to ".len())
            })
        {
            addrs.extend(l.get(at..).and_then(find_address));
        }
    }
    let diag = lines
        .iter()
        .enumerate()
        .find_map(|(i, l)| {
            let ll = l.to_lowercase();
            (ll.contains("the other server returned")
                || ll.contains("the response from the remote server")
                || ll.trim() == "the response was:")
                .then(|| {
                    // "... returned was: 554 5.7.0 ..." on the same line,
                    // or the paragraph under it.
                    let same = l.split_once(':').map_or("", |(_, r)| r).trim();
                    let under = lines[i + 1..]
                        .iter()
                        .copied()
                        .skip_while(|l| l.trim().is_empty())
                        .take_while(|l| !l.trim().is_empty());
                    join_lines(std::iter::once(same).chain(under))
                })
        })
        // Older forms give only "Technical details: ... host X: 553 ...".
        .or_else(|| {
            lines
                .iter()
                .find_map(|l| basic_code(l, b"45").map(|(at, _)| l[at..].trim().to_string()))
        });
    let remote = lines.iter().find_map(|l| {
        let at = l.find("for the recipient domain ")?;
        let rest = &l[at..];
        let by = rest.find(" by ")?;
        rest[by + 4..]
            .split_whitespace()
            .next()
            .map(|h| h.trim_end_matches('.').to_string())
    });
    addrs.dedup();
    addrs
        .into_iter()
        .map(|a| {
            let mut r = recipient(Some(a), action, diag.clone());
            r.remote_mta = remote.clone();
            r
        })
        .collect()
}

/// Exchange / Outlook: under "Diagnostic information for administrators:",
/// each address followed by `Remote Server returned '...'` (or the older
/// `#550 5.1.1 ... ##`); without that section, the addresses listed after
/// "Delivery has failed to these recipients or groups:".
fn exchange(head: &str) -> Vec<BouncedRecipient> {
    let lower = head.to_lowercase();
    let action = if lower.contains("delivery is delayed to these recipients") {
        Action::Delayed
    } else {
        Action::Failed
    };
    let lines: Vec<&str> = head.lines().map(str::trim).collect();
    let mut out = Vec::new();
    let diag_start = lines.iter().position(|l| {
        l.to_lowercase()
            .starts_with("diagnostic information for administrators")
    });
    if let Some(start) = diag_start {
        let mut i = start + 1;
        while i < lines.len() {
            let l = lines[i];
            i += 1;
            if l.contains(' ') || !l.contains('@') {
                continue;
            }
            let Some(next) = lines.get(i) else { break };
            let diag = if let Some(q) = next.find(" returned '") {
                let inner = &next[q + " returned '".len()..];
                Some(inner.trim_end().trim_end_matches('\'').to_string())
            } else if next.starts_with('#') {
                Some(
                    next.trim_start_matches('#')
                        .trim_end_matches('#')
                        .trim()
                        .to_string(),
                )
            } else {
                None
            };
            let Some(diag) = diag else { continue };
            // "Remote Server at mx.example (192.0.2.1) returned '...'"
            let remote = next
                .split_once("Remote Server at ")
                .and_then(|(_, r)| r.split_whitespace().next())
                .map(str::to_string);
            let mut r = recipient(find_address(l), action, Some(diag));
            r.remote_mta = remote;
            out.push(r);
            i += 1;
        }
    }
    if out.is_empty() {
        let listed = lines.iter().position(|l| {
            let l = l.to_lowercase();
            l.starts_with("delivery has failed to these recipients")
                || l.starts_with("delivery is delayed to these recipients")
        });
        if let Some(p) = listed {
            out.extend(
                lines[p + 1..]
                    .iter()
                    .skip_while(|l| l.is_empty())
                    .take_while(|l| !l.is_empty())
                    .filter_map(|l| find_address(l))
                    .map(|a| recipient(Some(a), action, None)),
            );
        }
    }
    out
}

/// Sendmail: addresses under "----- The following addresses had permanent
/// fatal errors -----" (or "transient non-fatal errors": delayed), each
/// with an optional `(reason: ...)` line; the transcript's "while talking
/// to HOST:" names the remote MTA, and its lines that name the address
/// stand in for a missing reason.
fn sendmail(head: &str) -> Vec<BouncedRecipient> {
    let lines: Vec<&str> = head.lines().collect();
    let remote = lines.iter().find_map(|l| {
        let (_, h) = l.split_once("while talking to ")?;
        let h = h.trim().trim_end_matches(':').trim_end_matches('.');
        (!h.is_empty()).then(|| h.to_string())
    });
    // The transcript's replies, keyed by the address in their first <...>:
    // one pass, so many recipients cost no more than one.
    let mut transcript: HashMap<String, &str> = HashMap::new();
    for l in &lines {
        let t = l.trim().trim_start_matches("<<<").trim();
        if basic_code(t, b"45").is_some_and(|(at, _)| at == 0)
            && let Some((addr, _)) = t.split_once('<').and_then(|(_, r)| r.split_once('>'))
        {
            transcript.entry(addr.to_ascii_lowercase()).or_insert(t);
        }
    }
    let mut out: Vec<BouncedRecipient> = Vec::new();
    let mut i = 0;
    while i < lines.len() && out.len() < MAX_RECIPIENTS {
        let ll = lines[i].to_lowercase();
        i += 1;
        let action = if ll.contains("----- the following addresses had permanent fatal errors") {
            Action::Failed
        } else if ll.contains("----- the following addresses had transient non-fatal errors") {
            Action::Delayed
        } else {
            continue;
        };
        while i < lines.len() && !lines[i].trim().is_empty() && out.len() < MAX_RECIPIENTS {
            let line = lines[i];
            i += 1;
            let t = line.trim();
            if let Some(reason) = t.strip_prefix("(reason:") {
                if let Some(last) = out.last_mut() {
                    last.diagnostic = Some(reason.trim_end_matches(')').trim().to_string());
                }
            } else if !line.starts_with([' ', '\t']) && !t.starts_with('(') {
                out.push(recipient(find_address(t), action, None));
            }
        }
    }
    for r in &mut out {
        r.remote_mta = remote.clone();
        if r.diagnostic.is_none()
            && let Some(addr) = r.final_recipient.as_deref()
        {
            r.diagnostic = transcript
                .get(&addr.to_ascii_lowercase())
                .map(|t| t.to_string());
        }
    }
    out
}

/// AOL's old form: screen names (no domain) indented under "Your mail to
/// the following recipients could not be delivered because they are not
/// accepting mail from SENDER:"; the domain is the bounce's own.
fn aol(msg: &Message<'_>, head: &str) -> Vec<BouncedRecipient> {
    let domain = msg
        .from()
        .and_then(|a| a.first()?.address())
        .and_then(|a| a.split_once('@'))
        .map(|(_, d)| d.to_ascii_lowercase());
    let lines: Vec<&str> = head.lines().collect();
    let Some(at) = lines.iter().position(|l| {
        l.to_ascii_lowercase()
            .contains("are not accepting mail from")
    }) else {
        return Vec::new();
    };
    let reason = lines[at].trim().to_string();
    lines[at + 1..]
        .iter()
        .skip_while(|l| l.trim().is_empty())
        .take_while(|l| l.starts_with([' ', '\t']) && !l.trim().is_empty())
        .take(MAX_RECIPIENTS)
        .map(|l| {
            let name = l.trim();
            let addr = if name.contains('@') {
                find_address(name)
            } else {
                domain
                    .as_ref()
                    .map(|d| format!("{}@{d}", name.to_ascii_lowercase()))
            };
            recipient(addr, Action::Failed, Some(reason.clone()))
        })
        .collect()
}

/// Header names a plain bounce quotes about the returned message ("Your
/// message To: list@example.org Subject: ..."), whose addresses are not
/// the failed recipient's.
const QUOTED_HEADERS: &[&str] = &[
    "to",
    "from",
    "cc",
    "bcc",
    "subject",
    "sent",
    "date",
    "reply-to",
    "return-path",
    "received",
    "message-id",
    "sender",
    "in-reply-to",
    "references",
    "system contact",
    "contact",
];

fn quoted_header(line: &str) -> bool {
    let Some((name, _)) = line.trim_start().split_once(':') else {
        return false;
    };
    let name = name.trim().to_ascii_lowercase();
    QUOTED_HEADERS.contains(&name.as_str()) || name.starts_with("x-")
}

/// Words of a plain text that says a delivery failed, where no SMTP code
/// does: what makes a mail system's message a bounce.
const FAILURE_WORDS: &[&str] = &[
    "could not be delivered",
    "couldn't be delivered",
    "cannot be delivered",
    "can't be delivered",
    "was not delivered",
    "not be delivered",
    "unable to deliver",
    "undeliverable",
    "delivery failed",
    "delivery failure",
    "did not reach",
    "failed to deliver",
    "failed address",
    "permanent error",
    "user unknown",
    "unknown user",
    "no such user",
    "not listed in",
    "delivery problem",
    "has been returned",
    "returned because",
    "message not delivered",
    "delivery attempts",
    "not able to deliver",
    "wasn't able to deliver",
    "failed recipient",
    "automatically rejected",
    "incorrectly constructed",
    "malformed",
    "quota exceeded",
    "too many hops",
    "bounce notification",
    "delivery of email to this address",
    "failed mail",
    "was aborted",
    "could not find a gateway",
];

/// Words that say the mail system is still trying.
const DELAY_WORDS: &[&str] = &[
    "will continue to be made",
    "will keep trying",
    "will retry",
    "has not yet been delivered",
    "not yet been delivered",
    "this is a warning",
    "delivery is delayed",
];

/// Any other layout from a mail system (and the fallback of a known one
/// that named nobody): every address the text names outside quoted header
/// lines and the bounce's own sender and addressee, each with the rest of
/// its line and the lines under it as the reason; else the text's first
/// reply line, "Reason: ..." or "because: ..." line, or the subject. When
/// no address is named, one recipient without an address carries the
/// reason: with VERP the token says whom it is about.
fn generic(msg: &Message<'_>, head: &str) -> Vec<BouncedRecipient> {
    let lower = head.to_lowercase();
    let subject = msg.subject().unwrap_or_default().to_string();
    let has_code = head
        .lines()
        .any(|l| basic_code(l, b"45").is_some() || enhanced_code(l).is_some_and(|e| e.0 != 2));
    let failure = FAILURE_WORDS
        .iter()
        .chain(DELAY_WORDS)
        .any(|w| lower.contains(w) || subject.to_lowercase().contains(w));
    // A mailer-daemon writing in a language these words miss is still
    // writing about a failed delivery; in English it would have said so.
    let foreign_language = head
        .chars()
        .filter(|c| c.is_alphabetic() && !c.is_ascii())
        .count()
        >= 8;
    if !(has_code || failure || foreign_language && daemon_sender(msg)) {
        return Vec::new();
    }
    let action = if DELAY_WORDS.iter().any(|w| lower.contains(w)) {
        Action::Delayed
    } else {
        Action::Failed
    };
    let own: Vec<String> = [msg.from(), msg.to()]
        .into_iter()
        .flatten()
        .filter_map(|a| a.first()?.address())
        .map(str::to_ascii_lowercase)
        .collect();
    let foreign = |a: &str| {
        let a = a.to_ascii_lowercase();
        !own.contains(&a)
            && !a.starts_with("mailer-daemon@")
            && !a.starts_with("postmaster@")
            && !a.starts_with("bounces+")
    };
    let lines: Vec<&str> = head.lines().collect();
    let mut out: Vec<BouncedRecipient> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if out.len() >= MAX_RECIPIENTS || quoted_header(line) {
            continue;
        }
        let context = (
            i.checked_sub(1).map_or("", |p| lines[p]),
            lines.get(i + 1).copied().unwrap_or(""),
        );
        let lower_line = line.to_ascii_lowercase();
        let mut found = addresses(line);
        // "name@example.org <bob@example.org>": the first is a display
        // name; the one in brackets stands where it stands.
        let mut promoted = None;
        if let [first, second, ..] = found.as_slice()
            && lower_line.contains(&format!(
                "{} <{}>",
                first.to_ascii_lowercase(),
                second.to_ascii_lowercase()
            ))
        {
            let name = first.clone();
            promoted = Some((second.clone(), name.clone()));
            found.retain(|a| *a != name);
        }
        for addr in found {
            let stands = match &promoted {
                Some((bracketed, name)) if *bracketed == addr => prominent(line, name, context),
                _ => prominent(line, &addr, context),
            };
            if !foreign(&addr) || !stands {
                continue;
            }
            if out.iter().any(|r| {
                r.final_recipient
                    .as_deref()
                    .is_some_and(|f| f.eq_ignore_ascii_case(&addr))
            }) {
                continue;
            }
            let at = line
                .to_ascii_lowercase()
                .find(&addr.to_ascii_lowercase())
                .unwrap_or(0);
            let rest = line[(at + addr.len()).min(line.len())..]
                .trim_start_matches(['>', '"', '\'', ')', ':', ';', ',', '.', ' ', '\t'])
                .trim();
            let under = lines[i + 1..]
                .iter()
                .take_while(|l| {
                    !l.trim().is_empty()
                        && !quoted_header(l)
                        && !addresses(l).iter().any(|a| {
                            !a.eq_ignore_ascii_case(&addr)
                                && foreign(a)
                                && prominent(l, a, ("", ""))
                        })
                })
                .take(3)
                .copied();
            // "Invalid final delivery userid: bob@example.org": the words
            // before the address are the reason.
            let before = line[..at]
                .trim()
                .trim_end_matches([':', '<', '"', '\''])
                .trim();
            let rest = if rest.is_empty() && before.split_whitespace().count() >= 2 {
                before
            } else {
                rest
            };
            let diag = join_lines(std::iter::once(rest).chain(under));
            // "could not be delivered. Reason: 550 ...": the reply from its code.
            let diag = match basic_code(&diag, b"45") {
                Some((at, _)) => diag[at..].to_string(),
                None => diag,
            };
            out.push(recipient(Some(addr), action, Some(diag)));
        }
    }
    // The reason, when a recipient's own lines give none that says anything.
    let reason_line = lines
        .iter()
        .find(|l| {
            let t = l.trim();
            basic_code(t, b"45").is_some_and(|(at, _)| at == 0)
                || enhanced_code(t).is_some_and(|e| e.0 != 2)
        })
        .map(|l| l.trim().to_string())
        .or_else(|| {
            lines.iter().enumerate().find_map(|(i, l)| {
                let t = l.trim();
                let tl = t.to_ascii_lowercase();
                if let Some(r) = tl.strip_prefix("reason:") {
                    let r = t[t.len() - r.len()..].trim();
                    return (!r.is_empty()).then(|| r.to_string());
                }
                (tl == "because:" || tl == "reason:").then(|| {
                    join_lines(
                        lines[i + 1..]
                            .iter()
                            .skip_while(|l| l.trim().is_empty())
                            .take_while(|l| !l.trim().is_empty())
                            .copied(),
                    )
                })
            })
        })
        // The first line that names a cause, as the reply rules read it.
        .or_else(|| {
            // (The first 200 lines: the reason comes before any long text.)
            lines
                .iter()
                .take(200)
                .map(|l| l.trim())
                .find(|l| !l.is_empty() && !says_nothing(l))
                .map(str::to_string)
        })
        .or_else(|| {
            let s = subject.trim();
            let after = s.split_once(':').map_or(s, |(_, r)| r).trim();
            (!after.is_empty()).then(|| after.to_string())
        });
    let reason_has_code = reason_line
        .as_deref()
        .is_some_and(|l| basic_code(l, b"45").is_some());
    let reason_names_cause = reason_line.as_deref().is_some_and(|l| !says_nothing(l));
    for r in &mut out {
        let own_code = r
            .diagnostic
            .as_deref()
            .is_some_and(|d| basic_code(d, b"45").is_some());
        let weak = r.diagnostic.as_deref().is_none_or(|d| d.len() < 8);
        let silent = r.diagnostic.as_deref().is_none_or(says_nothing);
        if reason_line.is_some()
            && !own_code
            && (weak || reason_has_code || (silent && reason_names_cause))
        {
            r.diagnostic = reason_line.clone();
        }
    }
    // A text in a language these rules cannot read: any address it names
    // outside quoted headers is who it is about.
    if out.is_empty() && foreign_language {
        let mut seen: Vec<String> = Vec::new();
        for a in lines
            .iter()
            .filter(|l| !quoted_header(l))
            .flat_map(|l| addresses(l))
            .filter(|a| foreign(a))
        {
            if !seen.iter().any(|s| s.eq_ignore_ascii_case(&a)) {
                seen.push(a);
            }
        }
        out.extend(
            seen.into_iter()
                .take(MAX_RECIPIENTS)
                .map(|a| recipient(Some(a), action, reason_line.clone())),
        );
    }
    if out.is_empty() {
        out.push(recipient(None, action, reason_line));
    }
    out
}

/// Whether an address stands where a failed recipient is named: alone or
/// first on its line (not as the next word of a wrapped sentence), after
/// a label ("Intended recipient:") or a bullet, or after "to"/"for" in a
/// sentence about the failure ("could not be delivered to x@y", "your
/// message to x@y cannot be delivered"). Addresses inside other prose
/// (help texts, examples, the sender's address) are not. `context` is the
/// line before and the line after.
fn prominent(line: &str, addr: &str, context: (&str, &str)) -> bool {
    let Some(at) = line.to_ascii_lowercase().find(&addr.to_ascii_lowercase()) else {
        return false;
    };
    let before = line[..at]
        .trim_end_matches(['<', '"', '\'', '(', '[', ' ', '\t'])
        .trim()
        .to_ascii_lowercase();
    // A list's bullet: "* bob@example.org", "-- bob@example.org", "1. ...".
    let bullet = !before.is_empty()
        && before
            .chars()
            .all(|c| matches!(c, '*' | '-' | '.' | ')' | '\u{2022}') || c.is_ascii_digit());
    let (prev, next) = context;
    // "... If an address such as\nbob@example.org fails, try ...": the
    // address only continues a sentence of prose.
    let after = line[at + addr.len()..].trim_start();
    let wrapped = prev.trim().len() > 50
        && prev
            .trim_end()
            .ends_with(|c: char| c.is_ascii_alphabetic() || c == ',')
        && after.starts_with(|c: char| c.is_ascii_lowercase());
    let about_failure = || {
        let l = format!("{line} {next}").to_ascii_lowercase();
        FAILURE_WORDS.iter().any(|w| l.contains(w))
            || ["failed", "rejected", "returned", "cannot", "could not"]
                .iter()
                .any(|w| l.contains(w))
    };
    // A reply line names its recipient: "552 Quota violation for bob@...".
    let reply_line = basic_code(line.trim(), b"45").is_some_and(|(at, _)| at == 0);
    (before.is_empty() && !wrapped)
        || bullet
        || reply_line
        || before.ends_with("addressed to")
        || before.ends_with(':')
        || before.ends_with('=')
        || ((before.ends_with(" to")
            || before.ends_with(" for")
            || before == "to"
            || before == "for")
            && about_failure())
}

/// Whether a text names no cause the reply rules know ("Delivery failure",
/// "Undeliverable Address"): built-in rules only, as the parser has no
/// config; the listener classifies the chosen text with the config's.
fn says_nothing(text: &str) -> bool {
    crate::deliver::classify::classify_with(&[], None, 0, text).reason
        == crate::event::Reason::Other
}

/// Every address in `s`, in order.
fn addresses(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(a) = find_address(rest) {
        let Some(at) = rest.find(&a) else { break };
        rest = &rest[at + a.len()..];
        out.push(a);
        if out.len() >= 16 {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    macro_rules! fixture {
        ($name:literal) => {
            include_bytes!(concat!("../../tests/fixtures/bounces/", $name))
        };
    }

    fn bounce(bytes: &[u8]) -> Bounce {
        match parse(bytes) {
            Some(Report::Bounce(b)) => b,
            other => panic!("not a bounce: {other:?}"),
        }
    }

    fn complaint(bytes: &[u8]) -> Complaint {
        match parse(bytes) {
            Some(Report::Complaint(c)) => c,
            other => panic!("not a complaint: {other:?}"),
        }
    }

    fn s(v: &str) -> Option<String> {
        Some(v.to_string())
    }

    /// Checks the fields every test looks at: (final recipient, action,
    /// status, derived, smtp code).
    fn check(
        r: &BouncedRecipient,
        addr: &str,
        action: Action,
        status: Option<Enhanced>,
        derived: bool,
        code: Option<u16>,
    ) {
        assert_eq!(r.final_recipient.as_deref(), Some(addr), "{r:?}");
        assert_eq!(r.action, action, "{r:?}");
        assert_eq!(r.status, status, "{r:?}");
        assert_eq!(r.status_derived, derived, "{r:?}");
        assert_eq!(r.smtp_code, code, "{r:?}");
    }

    #[test]
    fn postfix_dsn_one_recipient() {
        let b = bounce(fixture!("postfix-dsn-1rcpt.eml"));
        assert_eq!(b.format, BounceFormat::Rfc3464);
        assert_eq!(b.reporting_mta, s("mail.one.example"));
        assert_eq!(b.original_message_id, s("<invoice-2026-0117@acme.example>"));
        assert_eq!(b.original_envelope_id, None);
        assert_eq!(b.recipients.len(), 1);
        let r = &b.recipients[0];
        check(
            r,
            "bob@one.example",
            Action::Failed,
            Some(Enhanced(5, 1, 1)),
            false,
            Some(550),
        );
        assert_eq!(r.original_recipient, s("bob@one.example"));
        assert_eq!(r.remote_mta, s("mx1.one.example"));
        // The continuation line is joined with one space.
        assert_eq!(
            r.diagnostic,
            s(
                "smtp; 550 5.1.1 <bob@one.example>: Recipient address rejected: User unknown in virtual mailbox table"
            )
        );
        assert_eq!(b.failed().count(), 1);
    }

    #[test]
    fn postfix_dsn_two_recipients_lower_case_fields() {
        let b = bounce(fixture!("postfix-dsn-2rcpt.eml"));
        assert_eq!(b.format, BounceFormat::Rfc3464);
        assert_eq!(b.reporting_mta, s("mail.two.example"));
        assert_eq!(b.original_envelope_id, s("0123456789ABCDEF0123"));
        // From the message/rfc822 part.
        assert_eq!(b.original_message_id, s("<invoice-2026-0118@acme.example>"));
        assert_eq!(b.recipients.len(), 2);
        let (carol, dave) = (&b.recipients[0], &b.recipients[1]);
        check(
            carol,
            "carol@two.example",
            Action::Failed,
            Some(Enhanced(5, 2, 2)),
            false,
            Some(552),
        );
        // `RFC822;` in any case; the ORCPT's case is kept.
        assert_eq!(carol.original_recipient, s("Carol@Two.example"));
        assert_eq!(
            carol.diagnostic,
            s("smtp; 552 5.2.2 <carol@two.example>: Recipient address rejected: Mailbox is full")
        );
        check(
            dave,
            "dave@two.example",
            Action::Failed,
            Some(Enhanced(5, 1, 1)),
            false,
            Some(550),
        );
        // A tab-indented continuation too.
        assert_eq!(
            dave.diagnostic,
            s("smtp; 550 5.1.1 <dave@two.example>: Recipient address rejected: User unknown")
        );
        assert_eq!(dave.remote_mta, s("mx.two.example"));
    }

    #[test]
    fn gmail_dsn() {
        let b = bounce(fixture!("gmail-dsn.eml"));
        assert_eq!(b.format, BounceFormat::Rfc3464);
        assert_eq!(b.reporting_mta, s("googlemail.com"));
        assert_eq!(b.original_message_id, s("<invoice-2026-0120@acme.example>"));
        assert_eq!(b.recipients.len(), 1);
        let r = &b.recipients[0];
        check(
            r,
            "erin@gmail.example",
            Action::Failed,
            Some(Enhanced(5, 1, 1)),
            false,
            Some(550),
        );
        // Gmail's comment after the host name is dropped.
        assert_eq!(r.remote_mta, s("gmail-smtp-in.l.google.com"));
        let d = r.diagnostic.as_deref().unwrap();
        assert!(
            d.starts_with(
                "smtp; 550-5.1.1 The email account that you tried to reach does not exist."
            ),
            "{d}"
        );
        assert!(d.ends_with("- gsmtp"), "{d}");
    }

    #[test]
    fn exchange_dsn_with_html_and_alternative_parts() {
        let b = bounce(fixture!("exchange-dsn.eml"));
        assert_eq!(b.format, BounceFormat::Rfc3464);
        assert_eq!(
            b.reporting_mta,
            s("AM9PR03MB7217.eurprd03.prod.outlook.example")
        );
        assert_eq!(b.original_message_id, s("<invoice-2026-0121@acme.example>"));
        assert_eq!(b.recipients.len(), 1);
        let r = &b.recipients[0];
        check(
            r,
            "frank@contoso.example",
            Action::Failed,
            Some(Enhanced(5, 1, 10)),
            false,
            Some(550),
        );
        assert_eq!(r.original_recipient, None);
        assert_eq!(r.remote_mta, None);
        assert_eq!(
            r.diagnostic,
            s(
                "smtp;550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient frank@contoso.example not found by SMTP address lookup"
            )
        );
    }

    #[test]
    fn delayed_dsn() {
        let b = bounce(fixture!("delayed-dsn.eml"));
        assert_eq!(b.format, BounceFormat::Rfc3464);
        assert_eq!(b.recipients.len(), 1);
        let r = &b.recipients[0];
        check(
            r,
            "grace@three.example",
            Action::Delayed,
            Some(Enhanced(4, 2, 2)),
            false,
            Some(452),
        );
        assert_eq!(r.remote_mta, s("mx.three.example"));
        assert_eq!(b.original_message_id, s("<invoice-2026-0122@acme.example>"));
        // A delay is not a failure.
        assert_eq!(b.failed().count(), 0);
    }

    #[test]
    fn global_delivery_status_in_utf8() {
        let b = bounce(fixture!("global-dsn.eml"));
        assert_eq!(b.format, BounceFormat::Rfc3464);
        assert_eq!(b.reporting_mta, s("mx.yūbin.example"));
        assert_eq!(b.original_envelope_id, s("0123456789ABCDEF0123"));
        // From message/global-headers.
        assert_eq!(b.original_message_id, s("<invoice-2026-0123@acme.example>"));
        let r = &b.recipients[0];
        check(
            r,
            "hélène@yūbin.example",
            Action::Failed,
            Some(Enhanced(5, 1, 1)),
            false,
            Some(550),
        );
        // `\x{E9}` escapes of utf-8-addr-unitext decoded.
        assert_eq!(r.original_recipient, s("hélène@yūbin.example"));
        assert_eq!(
            r.diagnostic,
            s("smtp; 550 5.1.1 <hélène@yūbin.example>: Benutzer unbekannt (user unknown)")
        );
    }

    #[test]
    fn exim() {
        let b = bounce(fixture!("exim.eml"));
        assert_eq!(b.format, BounceFormat::Exim);
        assert_eq!(b.original_message_id, s("<invoice-2026-0124@acme.example>"));
        assert_eq!(b.recipients.len(), 2);
        let (henry, ivy) = (&b.recipients[0], &b.recipients[1]);
        check(
            henry,
            "henry@four.example",
            Action::Failed,
            Some(Enhanced(5, 1, 1)),
            false,
            Some(550),
        );
        assert_eq!(henry.remote_mta, s("mail.four.example"));
        assert_eq!(
            henry.diagnostic,
            s(
                "550 5.1.1 <henry@four.example>: Recipient address rejected: User unknown in local recipient table"
            )
        );
        // No code at all: x.1.1 from the text, class from the action.
        check(
            ivy,
            "ivy@four.example",
            Action::Failed,
            Some(Enhanced(5, 1, 1)),
            true,
            None,
        );
        assert_eq!(ivy.diagnostic, s("Unrouteable address"));
    }

    #[test]
    fn recipients_classify_like_replies() {
        use crate::report::Classification;
        let b = bounce(fixture!("postfix-dsn-2rcpt.eml"));
        assert_eq!(
            b.recipients[0]
                .classify(&crate::deliver::classify::Classifier::default())
                .pair(),
            (Classification::MailboxFull, true)
        );
        assert_eq!(
            b.recipients[1]
                .classify(&crate::deliver::classify::Classifier::default())
                .pair(),
            (Classification::InvalidRecipient, true)
        );
        let b = bounce(fixture!("delayed-dsn.eml"));
        assert_eq!(
            b.recipients[0]
                .classify(&crate::deliver::classify::Classifier::default())
                .pair(),
            (Classification::MailboxFull, false)
        );
        // Exim's "Unrouteable address": no code, a derived 5.1.1 that the
        // classifier does not take for the server's; the text decides, and
        // the failed action makes it permanent.
        let b = bounce(fixture!("exim.eml"));
        assert_eq!(
            b.recipients[1]
                .outcome(&crate::deliver::classify::Classifier::default())
                .pair(),
            (Classification::InvalidRecipient, true)
        );
    }

    #[test]
    fn qmail() {
        let b = bounce(fixture!("qmail.eml"));
        assert_eq!(b.format, BounceFormat::Qmail);
        assert_eq!(b.reporting_mta, s("mail.five.example"));
        assert_eq!(b.original_message_id, s("<invoice-2026-0125@acme.example>"));
        assert_eq!(b.recipients.len(), 2);
        let (jack, kate) = (&b.recipients[0], &b.recipients[1]);
        // qmail's local "(#5.1.1)" is reported, not derived.
        check(
            jack,
            "jack@five.example",
            Action::Failed,
            Some(Enhanced(5, 1, 1)),
            false,
            None,
        );
        assert_eq!(
            jack.diagnostic,
            s("Sorry, no mailbox here by that name. (#5.1.1)")
        );
        check(
            kate,
            "kate@elsewhere.example",
            Action::Failed,
            Some(Enhanced(5, 2, 2)),
            false,
            Some(550),
        );
        assert_eq!(
            kate.diagnostic,
            s("550 5.2.2 <kate@elsewhere.example>: mailbox is full")
        );
        assert_eq!(kate.remote_mta, s("192.0.2.82"));
    }

    #[test]
    fn yahoo() {
        let b = bounce(fixture!("yahoo.eml"));
        assert_eq!(b.format, BounceFormat::Yahoo);
        assert_eq!(b.original_message_id, s("<invoice-2026-0126@acme.example>"));
        assert_eq!(b.recipients.len(), 1);
        let r = &b.recipients[0];
        // "doesn't have a yahoo.com account" → 5.1.1, derived.
        check(
            r,
            "liam@yahoo.example",
            Action::Failed,
            Some(Enhanced(5, 1, 1)),
            true,
            Some(554),
        );
        assert_eq!(
            r.diagnostic,
            s(
                "554 delivery error: dd This user doesn't have a yahoo.com account (liam@yahoo.example) [0] - mta1234.mail.ne1.yahoo.example [BODY]"
            )
        );
    }

    #[test]
    fn sendmail_plain() {
        let b = bounce(fixture!("sendmail-plain.eml"));
        assert_eq!(b.format, BounceFormat::Sendmail);
        assert_eq!(b.original_message_id, s("<invoice-2026-0127@acme.example>"));
        assert_eq!(b.recipients.len(), 2);
        let (mia, noah) = (&b.recipients[0], &b.recipients[1]);
        check(
            mia,
            "mia@six.example",
            Action::Failed,
            Some(Enhanced(5, 1, 1)),
            false,
            Some(550),
        );
        assert_eq!(
            mia.diagnostic,
            s("550 5.1.1 <mia@six.example>... User unknown")
        );
        assert_eq!(mia.remote_mta, s("mx.six.example"));
        // No "(reason: ...)": the transcript line naming the address.
        check(
            noah,
            "noah@six.example",
            Action::Failed,
            Some(Enhanced(5, 1, 3)),
            false,
            Some(553),
        );
        assert_eq!(
            noah.diagnostic,
            s("553 5.1.3 <noah@six.example>... Mailbox name not allowed")
        );
    }

    #[test]
    fn postfix_plain() {
        let b = bounce(fixture!("postfix-plain.eml"));
        assert_eq!(b.format, BounceFormat::Postfix);
        assert_eq!(b.reporting_mta, s("old.eight.example"));
        assert_eq!(b.recipients.len(), 2);
        let (ruth, sam) = (&b.recipients[0], &b.recipients[1]);
        check(
            ruth,
            "ruth@eight.example",
            Action::Failed,
            Some(Enhanced(5, 3, 4)),
            true,
            Some(552),
        );
        assert_eq!(
            ruth.diagnostic,
            s(
                "552 Message size exceeds fixed maximum message size (in reply to end of DATA command)"
            )
        );
        assert_eq!(ruth.remote_mta, s("mx.eight.example"));
        // "(expanded from <...>)" and the host folded onto the next line.
        check(
            sam,
            "sam@eight.example",
            Action::Failed,
            Some(Enhanced(5, 1, 1)),
            true,
            Some(550),
        );
        assert_eq!(sam.remote_mta, s("mx.eight.example"));
    }

    #[test]
    fn exchange_text() {
        let b = bounce(fixture!("exchange-text.eml"));
        assert_eq!(b.format, BounceFormat::Exchange);
        assert_eq!(b.reporting_mta, s("EXCH01.fabrikam.example"));
        assert_eq!(b.original_message_id, s("<invoice-2026-0128@acme.example>"));
        assert_eq!(b.recipients.len(), 2);
        let (olivia, paul) = (&b.recipients[0], &b.recipients[1]);
        check(
            olivia,
            "olivia@fabrikam.example",
            Action::Failed,
            Some(Enhanced(5, 1, 1)),
            false,
            Some(550),
        );
        assert_eq!(
            olivia.diagnostic,
            s("550 5.1.1 RESOLVER.ADR.RecipNotFound; not found")
        );
        check(
            paul,
            "paul@fabrikam.example",
            Action::Failed,
            Some(Enhanced(5, 2, 2)),
            false,
            Some(554),
        );
        assert_eq!(
            paul.diagnostic,
            s("554 5.2.2 mailbox full; STOREDRV.Deliver.Exception:QuotaExceededException")
        );
        assert_eq!(paul.remote_mta, s("mx2.fabrikam.example"));
    }

    #[test]
    fn gmail_plain() {
        let b = bounce(fixture!("gmail-plain.eml"));
        assert_eq!(b.format, BounceFormat::Gmail);
        assert_eq!(b.original_message_id, s("<invoice-2026-0129@acme.example>"));
        assert_eq!(b.recipients.len(), 1);
        let r = &b.recipients[0];
        check(
            r,
            "quinn@seven.example",
            Action::Failed,
            Some(Enhanced(5, 1, 1)),
            false,
            Some(550),
        );
        assert_eq!(r.remote_mta, s("mx.seven.example"));
        assert_eq!(
            r.diagnostic,
            s(
                "550 5.1.1 <quinn@seven.example>: Recipient address rejected: User unknown in virtual alias table"
            )
        );
    }

    #[test]
    fn arf_from_a_yahoo_style_fbl() {
        let c = complaint(fixture!("arf-yahoo.eml"));
        assert_eq!(
            c,
            Complaint {
                feedback_type: "abuse".into(),
                user_agent: s("Yahoo!-Mail-Feedback/2.0"),
                original_mail_from: s(
                    "bounces+0123456789ABCDEF0123-0-c0mpl41n@bounces.relay.example"
                ),
                original_rcpt_to: s("tina@yahoo.example"),
                reported_domain: s("acme.example"),
                source_ip: s("198.51.100.7"),
                arrival_date: s("Sun, 29 Nov 2026 09:20:11 +0000"),
                original_message_id: s("<invoice-2026-0130@acme.example>"),
                original_recipient_header: s("tina@yahoo.example"),
            }
        );
    }

    #[test]
    fn arf_from_microsoft_jmrp() {
        let c = complaint(fixture!("arf-jmrp.eml"));
        assert_eq!(
            c,
            Complaint {
                feedback_type: "abuse".into(),
                user_agent: s("Hotmail FBL"),
                original_mail_from: None,
                // Upper-case field names; the draft's Removal-Recipient.
                original_rcpt_to: s("uma@outlook.example"),
                reported_domain: None,
                source_ip: s("198.51.100.7"),
                arrival_date: s("Sun, 29 Nov 2026 10:11:02 -0800"),
                original_message_id: s("<invoice-2026-0131@acme.example>"),
                // To: is "undisclosed-recipients:;": Microsoft's own header.
                original_recipient_header: s("uma@outlook.example"),
            }
        );
    }

    #[test]
    fn out_of_office_is_not_a_bounce() {
        assert_eq!(parse(fixture!("auto-reply-ooo.eml")), None);
    }

    #[test]
    fn human_reply_is_not_a_bounce() {
        // It even mentions "550" and "mailbox is full".
        assert_eq!(parse(fixture!("human-reply.eml")), None);
    }

    const OOO_BODY: &str = "\r\nI am away until Monday.\r\n";

    #[test]
    fn auto_reply_markers() {
        for headers in [
            "From: a@x.example\r\nSubject: Invoice 7\r\nPrecedence: auto_reply\r\n",
            "From: a@x.example\r\nSubject: Invoice 7\r\nX-Autorespond: yes\r\n",
            "From: a@x.example\r\nSubject: Out of Office: Invoice 7\r\n",
            "From: a@x.example\r\nSubject: Abwesenheitsnotiz: Rechnung 7\r\n",
            "From: a@x.example\r\nSubject: Invoice 7\r\nAuto-Submitted: auto-replied (vacation)\r\n",
            // An auto-reply from a null return path still is one.
            "Return-Path: <>\r\nFrom: a@x.example\r\nSubject: Automatic reply: Invoice 7\r\nAuto-Submitted: auto-replied\r\n",
        ] {
            let msg = format!("{headers}{OOO_BODY}");
            assert_eq!(parse(msg.as_bytes()), None, "{headers}");
        }
    }

    #[test]
    fn a_derived_status_never_suppresses_on_its_own() {
        // "doesn't have a" derives 5.1.1, but the text names no missing
        // mailbox: not suppressed.
        let msg = "From: MAILER-DAEMON@mx.one.example\r\nSubject: Undelivered Mail\r\n\r\n\
            This is the mail system at host mx.one.example.\r\n\r\n\
            <bob@one.example>: host mx.one.example[192.0.2.1] said: 550 The message\r\n\
            doesn't have a valid Message-ID header\r\n";
        let b = bounce(msg.as_bytes());
        let v = b.recipients[0].outcome(&crate::deliver::classify::Classifier::default());
        assert!(!v.suppresses(), "{v:?}");
    }

    #[test]
    fn a_rule_that_says_temporary_holds_for_late_reports() {
        let config = crate::config::Config::from_toml_str(
            "[[listener]]\naddress = \"127.0.0.1:2587\"\n\
             [[classification.rules]]\nmatch = \"user unknown\"\ncategory = \"invalid_recipient\"\npermanent = false\n",
        )
        .unwrap();
        let c = crate::deliver::classify::Classifier::new(&config.classification);
        let b = bounce(fixture!("postfix-dsn-2rcpt.eml"));
        let r = b
            .recipients
            .iter()
            .find(|r| {
                r.diagnostic
                    .as_deref()
                    .is_some_and(|d| d.to_lowercase().contains("user unknown"))
            })
            .expect("a user unknown block");
        let v = r.outcome(&c);
        assert!(!v.permanent && !v.suppresses(), "{v:?}");
    }

    #[test]
    fn reply_codes_prefer_the_failure_to_a_greeting() {
        assert_eq!(
            reply_codes("220-laposte 421 4.2.1 Service refused"),
            (Some(421), Some(Enhanced(4, 2, 1)))
        );
        assert_eq!(
            reply_codes("smtp; 250 2.0.0 queued"),
            (Some(250), Some(Enhanced(2, 0, 0)))
        );
    }

    #[test]
    fn unknown_layout_from_a_mail_system() {
        let msg = "From: Mail Delivery System <MAILER-DAEMON@mx.eleven.example>\r\n\
            To: bounces+0123456789ABCDEF0123-0-abcdefgh@bounces.relay.example\r\n\
            Subject: Nondeliverable mail\r\n\r\n\
            Your mail to xavier@eleven.example could not be delivered.\r\n\
            Reason: 550 Requested action not taken: mailbox unavailable\r\n";
        let b = bounce(msg.as_bytes());
        assert_eq!(b.format, BounceFormat::Unknown);
        assert_eq!(b.recipients.len(), 1);
        let r = &b.recipients[0];
        check(
            r,
            "xavier@eleven.example",
            Action::Failed,
            None,
            false,
            Some(550),
        );
        assert_eq!(
            r.diagnostic,
            s("550 Requested action not taken: mailbox unavailable")
        );

        // The same from a person: not a bounce.
        let person = msg.replace("Mail Delivery System <MAILER-DAEMON@", "Xavier <x@");
        let person = person.replace("Nondeliverable mail", "About your invoice");
        assert_eq!(parse(person.as_bytes()), None);
        // Without an SMTP error the words still say it failed; the reason
        // is read from them alone.
        let no_error = msg.replace("550 Requested", "Requested");
        let b = bounce(no_error.as_bytes());
        assert_eq!(b.recipients.len(), 1);
        assert_eq!(b.recipients[0].smtp_code, None);
        // From a mail system but saying nothing failed: not a bounce.
        let notice = msg
            .replace("could not be delivered.", "was read.")
            .replace(
                "Reason: 550 Requested action not taken: mailbox unavailable",
                "Thanks.",
            )
            .replace("Nondeliverable mail", "Notice");
        assert_eq!(parse(notice.as_bytes()), None);
    }

    #[test]
    fn a_legacy_hotmail_complaint_is_a_complaint() {
        let msg = "From: staff@hotmail.com\r\nTo: bounces+x@relay.example\r\n\
            Subject: complaint about message from 192.0.2.1\r\n\
            MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n\
            --b\r\nContent-Type: message/rfc822\r\n\r\n\
            X-HmXmrOriginalRecipient: <carol@hotmail.example>\r\n\
            From: billing@acme.example\r\nMessage-ID: <inv-5@acme.example>\r\n\
            Subject: Invoice 5\r\n\r\nPay.\r\n--b--\r\n";
        let c = complaint(msg.as_bytes());
        assert_eq!(c.feedback_type, "abuse");
        assert_eq!(c.source_ip, s("192.0.2.1"));
        assert_eq!(c.original_message_id, s("<inv-5@acme.example>"));
        assert_eq!(c.original_recipient_header, s("carol@hotmail.example"));
        // The same subject from anyone else is no complaint.
        let forged = msg.replace("staff@hotmail.com", "someone@hotmail.com");
        assert!(!matches!(
            parse(forged.as_bytes()),
            Some(Report::Complaint(_))
        ));
    }

    #[test]
    fn a_read_receipt_is_not_a_bounce() {
        let msg = "From: Yvonne <y@twelve.example>\r\nSubject: Read: Invoice 7\r\n\
            Content-Type: multipart/report; report-type=disposition-notification; boundary=b\r\n\r\n\
            --b\r\nContent-Type: text/plain\r\n\r\nYour message was displayed.\r\n\
            --b\r\nContent-Type: message/disposition-notification\r\n\r\n\
            Final-Recipient: rfc822; y@twelve.example\r\nDisposition: manual-action/MDN-sent-manually; displayed\r\n\
            --b--\r\n";
        assert_eq!(parse(msg.as_bytes()), None);
    }

    #[test]
    fn delivery_status_without_blank_lines_between_recipients() {
        let msg = "From: MAILER-DAEMON@x.example\r\n\
            Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n\
            --b\r\nContent-Type: message/delivery-status\r\n\r\n\
            Reporting-MTA: dns; x.example\r\n\
            Final-Recipient: rfc822; <a@x.example>\r\nAction: failed\r\nStatus: 5.1.1 (user unknown)\r\n\
            Final-Recipient: b@x.example\r\nStatus: 4.4.1\r\n\
            Final-Recipient: rfc822; c@x.example\r\nAction: delivered\r\nStatus: 2.0.0\r\n\
            Diagnostic-Code: smtp; 250 2.0.0 ok\r\n\
            --b--\r\n";
        let b = bounce(msg.as_bytes());
        assert_eq!(b.reporting_mta, s("x.example"));
        assert_eq!(b.recipients.len(), 3);
        check(
            &b.recipients[0],
            "a@x.example",
            Action::Failed,
            Some(Enhanced(5, 1, 1)),
            false,
            None,
        );
        // No Action: from the status class.
        check(
            &b.recipients[1],
            "b@x.example",
            Action::Delayed,
            Some(Enhanced(4, 4, 1)),
            false,
            None,
        );
        check(
            &b.recipients[2],
            "c@x.example",
            Action::Delivered,
            Some(Enhanced(2, 0, 0)),
            false,
            Some(250),
        );
        assert_eq!(b.failed().count(), 1);
    }

    #[test]
    fn reply_codes_in_free_text() {
        assert_eq!(
            reply_codes("smtp; 550 5.1.1 user unknown"),
            (Some(550), Some(Enhanced(5, 1, 1)))
        );
        assert_eq!(
            reply_codes("550-5.1.1 The email account"),
            (Some(550), Some(Enhanced(5, 1, 1)))
        );
        assert_eq!(
            reply_codes("#550 5.1.1 RESOLVER ##"),
            (Some(550), Some(Enhanced(5, 1, 1)))
        );
        assert_eq!(
            reply_codes("no mailbox here (#5.1.1)"),
            (None, Some(Enhanced(5, 1, 1)))
        );
        assert_eq!(
            reply_codes("said: 552 5.2.2 full."),
            (Some(552), Some(Enhanced(5, 2, 2)))
        );
        assert_eq!(
            reply_codes("ends with 5.7.1."),
            (None, Some(Enhanced(5, 7, 1)))
        );
        // IP addresses, dates, version numbers and longer numbers are not codes.
        assert_eq!(
            reply_codes("host [203.0.113.5] 5.6.7.8 at 10:00:00 2026 v4.2.2a 5500"),
            (None, None)
        );
        assert_eq!(
            reply_codes("192.0.2.5 does not like recipient"),
            (None, None)
        );
        assert_eq!(reply_codes(""), (None, None));
        assert_eq!(reply_codes("ü550 é"), (None, None));
    }

    #[test]
    fn derived_status_needs_unambiguous_text() {
        let mut r = recipient(None, Action::Failed, s("452 mailbox full"));
        r.smtp_code = Some(452);
        derive_status(&mut r);
        assert_eq!(
            (r.status, r.status_derived),
            (Some(Enhanced(4, 2, 2)), true)
        );

        let mut r = recipient(None, Action::Failed, s("550 user unknown or mailbox full"));
        r.smtp_code = Some(550);
        derive_status(&mut r);
        assert_eq!((r.status, r.status_derived), (None, false));

        // A 2xx code with failure words: no guess.
        let mut r = recipient(None, Action::Failed, s("250 user unknown"));
        r.smtp_code = Some(250);
        derive_status(&mut r);
        assert_eq!(r.status, None);
    }

    #[test]
    fn typed_fields() {
        assert_eq!(typed_address("rfc822; bob@x.example"), s("bob@x.example"));
        assert_eq!(typed_address("RFC822;<bob@x.example>"), s("bob@x.example"));
        assert_eq!(typed_address("bob@x.example"), s("bob@x.example"));
        assert_eq!(typed_address("rfc822;"), None);
        assert_eq!(
            typed_address("utf-8; b\\x{F8}b@x.example"),
            s("bøb@x.example")
        );
        // A broken escape is kept as written.
        assert_eq!(typed_address("utf-8; a\\x{ZZ}@x"), s("a\\x{ZZ}@x"));
        assert_eq!(decode_unitext("\\x{110000}\\x{"), "\\x{110000}\\x{");
        assert_eq!(typed_name("dns; mx.example."), s("mx.example"));
        assert_eq!(typed_name("dns;"), None);
    }

    #[test]
    fn huge_input_is_cut() {
        let mut msg = fixture!("exim.eml").to_vec();
        msg.extend(std::iter::repeat_n(b'a', MAX_INPUT * 2));
        let b = bounce(&msg);
        assert_eq!(b.format, BounceFormat::Exim);
        assert_eq!(b.recipients.len(), 2);
    }

    /// Inputs built to make a careless parser quadratic: each must finish
    /// well within the bound (a debug build does all of them in well under
    /// a second here).
    #[test]
    fn adversarial_inputs_finish_quickly() {
        let daemon = "From: MAILER-DAEMON@x.example\r\nSubject: Undelivered Mail\r\n\r\n";
        let inputs: Vec<Vec<u8>> = vec![
            format!("{daemon}{}", "----- The following addresses had permanent fatal errors -----\r\n<a@b.example>\r\n".repeat(40_000)).into_bytes(),
            format!("{daemon}Delivery to the following recipient failed permanently:\r\n{}", "  a@b.example\r\n".repeat(200_000)).into_bytes(),
            format!("{daemon}This message was created automatically by mail delivery software.\r\n{}", "  a@b.example\r\n    550 5.1.1 x\r\n".repeat(100_000)).into_bytes(),
            format!("{daemon}{}", "5.5.5.5.5.5 550550 ".repeat(300_000)).into_bytes(),
            format!("Content-Type: multipart/report; boundary=b\r\n\r\n--b\r\nContent-Type: message/delivery-status\r\n\r\n{}", "Final-Recipient: rfc822; a@b.example\r\n Status: 5.1.1\r\n".repeat(100_000)).into_bytes(),
            "Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n".repeat(100_000).into_bytes(),
        ];
        for input in inputs {
            let started = std::time::Instant::now();
            let _ = parse(&input);
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "{:?} for {:?}...",
                started.elapsed(),
                String::from_utf8_lossy(&input[..80])
            );
        }
    }

    /// mail-parser 0.11.9 hits a `debug_assert!` on a message/rfc822 whose
    /// own Content-Type is message/rfc822, inside a multipart (found by the
    /// property tests below). Cargo.toml turns that crate's debug
    /// assertions off, as in release builds, where it parses on.
    #[test]
    fn nested_rfc822_inside_rfc822() {
        let msg = "From: MAILER-DAEMON@x.example\r\n\
            Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n\
            --b\r\nContent-Type: message/delivery-status\r\n\r\n\
            Final-Recipient: rfc822; a@x.example\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n\
            --b\r\nContent-Type: message/rfc822\r\n\r\n\
            Subject: x\r\nContent-Type: message/rfc822\r\n\r\n\
            Message-ID: <m@x.example>\r\n\r\nbody\r\n\
            --b--\r\n";
        let b = bounce(msg.as_bytes());
        assert_eq!(b.recipients.len(), 1);
    }

    #[test]
    fn empty_and_garbage() {
        assert_eq!(parse(b""), None);
        assert_eq!(parse(b"\r\n\r\n"), None);
        assert_eq!(parse(&[0xff; 64]), None);
    }
}

/// Property tests: whatever the bytes, `parse` returns (STYLE.md point 9).
/// Inputs are the fixtures mangled (bytes flipped, cut, spliced with
/// MIME-ish and DSN-ish fragments) and random text in a mail alphabet.
#[cfg(test)]
mod prop_tests {
    use super::*;
    use proptest::prelude::*;

    const FIXTURES: &[&[u8]] = &[
        include_bytes!("../../tests/fixtures/bounces/postfix-dsn-2rcpt.eml"),
        include_bytes!("../../tests/fixtures/bounces/gmail-dsn.eml"),
        include_bytes!("../../tests/fixtures/bounces/exchange-dsn.eml"),
        include_bytes!("../../tests/fixtures/bounces/global-dsn.eml"),
        include_bytes!("../../tests/fixtures/bounces/exim.eml"),
        include_bytes!("../../tests/fixtures/bounces/qmail.eml"),
        include_bytes!("../../tests/fixtures/bounces/sendmail-plain.eml"),
        include_bytes!("../../tests/fixtures/bounces/exchange-text.eml"),
        include_bytes!("../../tests/fixtures/bounces/gmail-plain.eml"),
        include_bytes!("../../tests/fixtures/bounces/postfix-plain.eml"),
        include_bytes!("../../tests/fixtures/bounces/arf-jmrp.eml"),
    ];

    const FRAGMENTS: &[&str] = &[
        "\r\n",
        "\n",
        "\r\n\r\n",
        " ",
        "\t",
        ":",
        ";",
        "<",
        ">:",
        "@",
        ".",
        "#",
        "\\x{",
        "}",
        "550 ",
        "5.1.1",
        "4.",
        "--b\r\n",
        "--b--\r\n",
        "Final-Recipient: rfc822; ",
        "Original-Recipient: utf-8; ",
        "Action: ",
        "Status: ",
        "Diagnostic-Code: smtp; ",
        "Content-Type: message/delivery-status\r\n\r\n",
        "Content-Type: message/feedback-report\r\n\r\n",
        "Content-Type: message/rfc822\r\n\r\n",
        "Content-Type: multipart/report; boundary=b\r\n\r\n",
        "Content-Transfer-Encoding: base64\r\n",
        "From: MAILER-DAEMON@x\r\n",
        "Remote host said: ",
        "  a@b.example\r\n    host ",
        "Remote Server returned '",
        "(reason: ",
        "----- The following addresses had permanent fatal errors -----\r\n",
        "Diagnostic information for administrators:\r\n",
        "Delivery to the following recipient failed permanently:\r\n",
        "é",
        "\u{0}",
        "\u{fffd}",
    ];

    fn mangled() -> impl Strategy<Value = Vec<u8>> {
        (
            0..FIXTURES.len(),
            prop::collection::vec(
                (
                    any::<prop::sample::Index>(),
                    0..FRAGMENTS.len(),
                    any::<u8>(),
                    any::<bool>(),
                ),
                0..24,
            ),
            any::<prop::sample::Index>(),
        )
            .prop_map(|(f, edits, cut_at)| {
                let mut m = FIXTURES[f].to_vec();
                for (at, frag, byte, insert) in edits {
                    let at = at.index(m.len() + 1);
                    if insert {
                        m.splice(at..at, FRAGMENTS[frag].bytes());
                    } else if at < m.len() {
                        m[at] = byte;
                    }
                }
                let cut_at = cut_at.index(m.len() + 1);
                if cut_at > m.len() / 2 {
                    m.truncate(cut_at);
                }
                m
            })
    }

    fn random_text() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(
            prop_oneof![
                4 => (0..FRAGMENTS.len()).prop_map(|i| FRAGMENTS[i].as_bytes().to_vec()),
                2 => "[a-zA-Z0-9 .@<>:;=-]{0,12}".prop_map(String::into_bytes),
                1 => prop::collection::vec(any::<u8>(), 0..8),
            ],
            0..80,
        )
        .prop_map(|parts| parts.concat())
    }

    /// Phrases the plain-text parsers look for, and what follows them.
    const PHRASES: &[&str] = &[
        "This message was created automatically by mail delivery software.\n",
        "This is the qmail-send program at ",
        "This is the mail system at host ",
        "Generating server: ",
        "Your message wasn't delivered to ",
        "There was a temporary problem delivering your message to ",
        "The error that the other server returned was:\n",
        "for the recipient domain ",
        " by ",
        "Remote Server at ",
        " returned '",
        "while talking to ",
        "Giving up on ",
        " said: ",
        "> (expanded from ",
        "Delivery has failed to these recipients or groups:\n",
        "----- The following addresses had transient non-fatal errors -----\n",
        "----- Original message -----\n",
        "Message-ID: ",
    ];

    /// Text biased to multi-byte characters (two to four bytes, and 'İ',
    /// which grows when lower-cased) beside the phrases and fields the
    /// parsers look for, or any Unicode.
    fn unicode_text() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop_oneof![
                3 => (0..FRAGMENTS.len()).prop_map(|i| FRAGMENTS[i].to_string()),
                3 => (0..PHRASES.len()).prop_map(|i| PHRASES[i].to_string()),
                3 => "[a-z0-9@.<>:; ]{0,6}[éİ€😀漢ßẞ]{1,3}",
                2 => "(\\n|  |\\* |-- |<)?[a-zé]{1,5}@[a-z]{1,5}\\.(de|com)(>|:| |\\n)",
                1 => "(?s).{0,8}",
            ],
            0..60,
        )
        .prop_map(|parts| parts.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn mangled_fixtures_never_panic(m in mangled()) {
            let _ = parse(&m);
        }

        #[test]
        fn random_text_never_panics(head in random_text(), body in random_text()) {
            let mut m = b"From: MAILER-DAEMON@x.example\r\nSubject: Undelivered Mail\r\n".to_vec();
            m.extend_from_slice(&head);
            m.extend_from_slice(b"\r\n\r\n");
            m.extend_from_slice(&body);
            let _ = parse(&m);
            let _ = parse(&body);
            let text = String::from_utf8_lossy(&body);
            let _ = reply_codes(&text);
            let _ = field_blocks(&text);
            let _ = typed_address(&text);
            let _ = find_address(&text);
        }
    }

    proptest! {
        // Each case parses two messages: fewer cases keep it near a second.
        #![proptest_config(ProptestConfig { cases: 192, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn unicode_text_never_panics(head in unicode_text(), body in unicode_text()) {
            let plain = format!(
                "From: MAILER-DAEMON@x.example\r\nSubject: Undelivered Mail {head}\r\n\
                 Content-Type: text/plain; charset=utf-8\r\n\r\n{body}"
            );
            let _ = parse(plain.as_bytes());
            let report = format!(
                "From: MAILER-DAEMON@x.example\r\n\
                 Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n\
                 --b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n\
                 --b\r\nContent-Type: message/delivery-status\r\n\r\n\
                 Reporting-MTA: dns; {head}\r\n\r\nFinal-Recipient: utf-8; {head}\r\n\
                 Action: {head}\r\nStatus: {head}\r\nRemote-MTA: dns; {body}\r\n\
                 Diagnostic-Code: smtp; {body}\r\n\r\n\
                 --b\r\nContent-Type: message/feedback-report\r\n\r\n\
                 Feedback-Type: {head}\r\nOriginal-Mail-From: {body}\r\n\r\n\
                 --b\r\nContent-Type: text/rfc822-headers; charset=utf-8\r\n\r\n\
                 To: {head}\r\nMessage-ID: {body}\r\n\r\n--b--\r\n"
            );
            let _ = parse(report.as_bytes());
            // The reader of any layout reports no address the message does
            // not hold (the AOL form, which adds its domain, aside).
            if !plain.contains("are not accepting mail from") {
                let lower = plain.to_lowercase();
                if let Some(Report::Bounce(b)) = parse(plain.as_bytes()) {
                    for r in &b.recipients {
                        if let Some(a) = r.final_recipient.as_deref().filter(|a| a.contains('@')) {
                            prop_assert!(lower.contains(&a.to_lowercase()), "{a} not in {plain:?}");
                        }
                    }
                }
            }
            // The plain parsers directly, on text mail-parser did not touch.
            let _ = exim(&body);
            let _ = gmail(&body);
            let _ = exchange(&body);
            let _ = sendmail(&body);
            let _ = angle_paragraphs(&body, Action::Failed);
            let _ = split_original(&body);
            let _ = inline_message_id(&body);
            let _ = after_phrase(&body, &head);
            let _ = decode_unitext(&body);
            let _ = typed_name(&body);
            let _ = unfold(&body);
            let _ = reply_codes(&body);
        }
    }
}
