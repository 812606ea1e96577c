//! Pure functions on a received message: the bare-LF/CR check that defends
//! against SMTP smuggling, a look at the header block (is there a Date:, a
//! Message-ID:, and what is it), and the trace and missing header fields
//! herald adds before the message is queued.
//!
//! Input: the message as received, already un-dot-stuffed (DATA) or as
//! counted (BDAT); nothing in it is trusted. Nothing here panics on any byte
//! sequence: slices are taken at positions found in the same buffer.
//!
//! RFCs: 5321 §2.3.8 (CRLF is the only line end) and §4.4 (trace fields),
//! 5322 §2.2.3 (folding), §3.6.1 (Date:), §3.6.4 (Message-ID:), 3848
//! (ESMTPSA and friends), 6531 §3.7.3 (UTF8SMTP protocol names).

use std::fmt::Write as _;
use std::net::IpAddr;

/// Where the first line end that is not CRLF sits, if any: a LF without a CR
/// before it, or a CR without a LF after it. RFC 5321 §2.3.8 forbids both;
/// receivers that accept them can be made to split one message into two
/// (SMTP smuggling), so herald refuses such a message outright instead of
/// repairing it.
pub fn find_bare_line_end(body: &[u8]) -> Option<usize> {
    let mut prev = 0u8;
    for (i, &b) in body.iter().enumerate() {
        match b {
            b'\n' if prev != b'\r' => return Some(i),
            b'\r' if body.get(i + 1) != Some(&b'\n') => return Some(i),
            _ => {}
        }
        prev = b;
    }
    None
}

/// What herald needs to know about a message's header block.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderInfo {
    /// The first Message-ID: field's value, unfolded and trimmed.
    pub message_id: Option<String>,
    /// A non-empty Message-ID: field is present, usable or not (then it is
    /// kept as it is rather than doubled).
    pub has_message_id: bool,
    pub has_date: bool,
    pub has_from: bool,
    /// Length of the header block, including the empty line that ends it
    /// (or the whole message when there is none).
    pub header_len: usize,
}

/// Looks at the header block only: it ends at the first empty line, so a
/// "Date:" line in the body or in an attached message counts for nothing.
/// Field names compare case-insensitively; a line starting with a space or
/// tab continues the field before it (RFC 5322 §2.2.3).
pub fn inspect_headers(message: &[u8]) -> HeaderInfo {
    let mut info = HeaderInfo::default();
    // The field being read when it is one whose value we keep.
    let mut collecting_id: Option<Vec<u8>> = None;
    let mut seen_message_id = false;
    let mut pos = 0;
    while pos < message.len() {
        let rest = &message[pos..];
        let line_len = rest
            .iter()
            .position(|&b| b == b'\n')
            .map_or(rest.len(), |i| i + 1);
        let line = &rest[..line_len];
        pos += line_len;
        let content = trim_line_end(line);
        if content.is_empty() {
            // The empty line that separates header and body.
            break;
        }
        if matches!(content[0], b' ' | b'\t') {
            if let Some(v) = collecting_id.as_mut()
                && v.len() <= MAX_MESSAGE_ID
            {
                v.extend_from_slice(content);
            }
            continue;
        }
        if let Some(v) = collecting_id.take() {
            info.has_message_id = !v.trim_ascii().is_empty();
            info.message_id = clean_message_id(&v);
        }
        let Some(colon) = content.iter().position(|&b| b == b':') else {
            // Not a header field; header sanity is the policy stage's job.
            continue;
        };
        let name = trim_ascii(&content[..colon]);
        let value = &content[colon + 1..];
        if name.eq_ignore_ascii_case(b"date") {
            info.has_date = true;
        } else if name.eq_ignore_ascii_case(b"from") {
            info.has_from = true;
        } else if name.eq_ignore_ascii_case(b"message-id") && !seen_message_id {
            seen_message_id = true;
            collecting_id = Some(value.to_vec());
        }
    }
    if let Some(v) = collecting_id.take() {
        info.has_message_id = !v.trim_ascii().is_empty();
        info.message_id = clean_message_id(&v);
    }
    info.header_len = pos;
    info
}

fn trim_line_end(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn trim_ascii(s: &[u8]) -> &[u8] {
    s.trim_ascii()
}

/// Longest Message-ID kept (RFC 5322 §2.1.1's line limit): it is copied
/// into the spool and every event, so a folded monster is treated as absent.
const MAX_MESSAGE_ID: usize = 998;

/// The unfolded value, trimmed; `None` when empty, too long or not text.
fn clean_message_id(raw: &[u8]) -> Option<String> {
    if raw.len() > MAX_MESSAGE_ID {
        return None;
    }
    let s = std::str::from_utf8(raw).ok()?;
    let s: String = s.split_ascii_whitespace().collect::<Vec<_>>().join("");
    (!s.is_empty() && !s.chars().any(char::is_control)).then_some(s)
}

/// How the message came in, for the `with` clause of the Received: field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Protocol {
    /// EHLO rather than HELO.
    pub esmtp: bool,
    pub tls: bool,
    pub authenticated: bool,
    /// The transaction used SMTPUTF8 (RFC 6531 §3.7.3).
    pub utf8: bool,
}

impl Protocol {
    /// `SMTP`, `ESMTP`, `ESMTPS`, `ESMTPA`, `ESMTPSA` (RFC 3848) or their
    /// `UTF8SMTP` forms (RFC 6531).
    pub fn name(self) -> String {
        if !self.esmtp {
            return "SMTP".into();
        }
        let mut s = String::from(if self.utf8 { "UTF8SMTP" } else { "ESMTP" });
        if self.tls {
            s.push('S');
        }
        if self.authenticated {
            s.push('A');
        }
        s
    }
}

/// What goes into the trace field.
pub struct TraceInfo<'a> {
    pub helo: &'a str,
    pub client_ip: IpAddr,
    pub hostname: &'a str,
    pub protocol: Protocol,
    /// e.g. `"TLSv1.3"` and the cipher suite name.
    pub tls: Option<(&'a str, &'a str)>,
    pub queue_id: &'a str,
    /// Named only when the message has a single recipient, so that one
    /// recipient never learns of the others (as Postfix and Sendmail do).
    pub single_recipient: Option<&'a str>,
    /// RFC 5322 date-time.
    pub date: &'a str,
}

/// Writes the `Received:` field (RFC 5321 §4.4), folded, ending in CRLF.
pub fn write_received(out: &mut Vec<u8>, t: &TraceInfo<'_>) {
    let mut s = String::with_capacity(256);
    let _ = write!(
        s,
        "Received: from {} ([{}])\r\n",
        sanitize_helo(t.helo),
        t.client_ip
    );
    if let Some((version, cipher)) = t.tls {
        let _ = write!(
            s,
            "\t(using {} with cipher {})\r\n",
            sanitize_atom(version),
            sanitize_atom(cipher)
        );
    }
    let _ = write!(
        s,
        "\tby {} (herald) with {} id {}",
        t.hostname,
        t.protocol.name(),
        t.queue_id
    );
    if let Some(rcpt) = t.single_recipient {
        let _ = write!(s, "\r\n\tfor <{}>", sanitize_address(rcpt));
    }
    let _ = write!(s, ";\r\n\t{}\r\n", t.date);
    out.extend_from_slice(s.as_bytes());
}

/// The client's EHLO argument as it may appear in a header: anything but
/// the characters of a host name or address literal becomes '?', so a
/// hostile HELO can neither break the field nor add a comment.
fn sanitize_helo(helo: &str) -> String {
    if helo.is_empty() {
        return "unknown".into();
    }
    helo.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']') {
                c
            } else {
                '?'
            }
        })
        .collect()
}

fn sanitize_atom(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '(' && c != ')' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// An address already parsed by the SMTP parser; only control characters
/// and angle brackets could still hurt the header.
fn sanitize_address(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() || c == '<' || c == '>' {
                '?'
            } else {
                c
            }
        })
        .collect()
}

/// The header fields a message lacks that herald adds (RFC 5322 §3.6:
/// Date: is required, Message-ID: should be present). Returns the bytes to
/// insert after the trace field and the Message-ID the message ends up with.
pub fn missing_fields(
    info: &HeaderInfo,
    queue_id: &str,
    hostname: &str,
    date: &str,
) -> (Vec<u8>, String) {
    let mut add = Vec::new();
    let message_id = match &info.message_id {
        Some(id) => id.clone(),
        None => {
            // Events need an id; the message gets one only if it has none
            // at all (an unusable one is left alone rather than doubled).
            let id = format!("<{queue_id}@{hostname}>");
            if !info.has_message_id {
                add.extend_from_slice(b"Message-ID: ");
                add.extend_from_slice(id.as_bytes());
                add.extend_from_slice(b"\r\n");
            }
            id
        }
    };
    if !info.has_date {
        add.extend_from_slice(b"Date: ");
        add.extend_from_slice(date.as_bytes());
        add.extend_from_slice(b"\r\n");
    }
    (add, message_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_lf_and_cr_are_found_anywhere() {
        assert_eq!(find_bare_line_end(b"a\r\nb\r\n"), None);
        assert_eq!(find_bare_line_end(b""), None);
        assert_eq!(find_bare_line_end(b"a\nb\r\n"), Some(1));
        assert_eq!(find_bare_line_end(b"a\r\n\n"), Some(3));
        assert_eq!(find_bare_line_end(b"a\rb\r\n"), Some(1));
        assert_eq!(find_bare_line_end(b"a\r\r\n"), Some(1));
        assert_eq!(find_bare_line_end(b"end\r"), Some(3));
        assert_eq!(find_bare_line_end(b"\n"), Some(0));
        // The smuggling shapes, as they remain after un-dot-stuffing.
        for s in [
            &b"hi\r\n\n.\r\nMAIL FROM:<x@y>\r\n"[..],
            b"hi\r\n.\nMAIL FROM:<x@y>\r\n",
            b"hi\r\r\n.\r\n",
            b"hi\r\n\r.\r\n",
        ] {
            assert!(find_bare_line_end(s).is_some(), "{s:?}");
        }
    }

    #[test]
    fn headers_are_read_from_the_header_block_only() {
        let m =
            b"From: a@b.example\r\nSubject: x\r\n\r\nDate: not a header\r\nMessage-ID: <no@x>\r\n";
        let i = inspect_headers(m);
        assert!(i.has_from);
        assert!(!i.has_date);
        assert_eq!(i.message_id, None);
        assert_eq!(
            i.header_len,
            b"From: a@b.example\r\nSubject: x\r\n\r\n".len()
        );
    }

    #[test]
    fn header_names_are_case_insensitive_and_folding_is_undone() {
        let m = b"FROM: a@b.example\r\ndate: Tue, 14 Jan 2025 10:00:00 +0000\r\nmessage-id:\r\n  <abc@host.example>\r\nSubject: s\r\n\r\nbody\r\n";
        let i = inspect_headers(m);
        assert!(i.has_from && i.has_date);
        assert_eq!(i.message_id.as_deref(), Some("<abc@host.example>"));
    }

    #[test]
    fn folded_lines_are_not_fields() {
        // "Date:" here continues Subject:, it is not a field of its own.
        let m = b"Subject: hello\r\n Date: nope\r\n\r\n";
        assert!(!inspect_headers(m).has_date);
    }

    #[test]
    fn header_only_and_empty_messages() {
        let i = inspect_headers(b"Message-ID: <a@b>\r\n");
        assert_eq!(i.message_id.as_deref(), Some("<a@b>"));
        assert_eq!(i.header_len, 19);
        let i = inspect_headers(b"");
        assert_eq!(i, HeaderInfo::default());
        let i = inspect_headers(b"\r\nbody only\r\n");
        assert_eq!(i.header_len, 2);
        assert!(!i.has_from);
    }

    #[test]
    fn empty_message_id_is_treated_as_missing() {
        let i = inspect_headers(b"Message-ID:   \r\n\r\n");
        assert_eq!(i.message_id, None);
        let (add, id) = missing_fields(&i, "ABC", "relay.example.net", "DATE");
        assert_eq!(id, "<ABC@relay.example.net>");
        assert_eq!(
            String::from_utf8(add).unwrap(),
            "Message-ID: <ABC@relay.example.net>\r\nDate: DATE\r\n"
        );
    }

    #[test]
    fn nothing_added_when_present() {
        let i = inspect_headers(b"Date: x\r\nMessage-Id: <q@r>\r\n\r\n");
        let (add, id) = missing_fields(&i, "ABC", "h", "DATE");
        assert!(add.is_empty());
        assert_eq!(id, "<q@r>");
    }

    #[test]
    fn protocol_names() {
        let p = |esmtp, tls, authenticated, utf8| {
            Protocol {
                esmtp,
                tls,
                authenticated,
                utf8,
            }
            .name()
        };
        assert_eq!(p(false, true, true, false), "SMTP");
        assert_eq!(p(true, false, false, false), "ESMTP");
        assert_eq!(p(true, true, false, false), "ESMTPS");
        assert_eq!(p(true, false, true, false), "ESMTPA");
        assert_eq!(p(true, true, true, false), "ESMTPSA");
        assert_eq!(p(true, true, true, true), "UTF8SMTPSA");
    }

    #[test]
    fn received_field_is_folded_and_sanitized() {
        let mut out = Vec::new();
        write_received(
            &mut out,
            &TraceInfo {
                helo: "app (evil)\r\nX-Injected: 1",
                client_ip: "192.0.2.7".parse().unwrap(),
                hostname: "relay.example.net",
                protocol: Protocol {
                    esmtp: true,
                    tls: true,
                    authenticated: true,
                    utf8: false,
                },
                tls: Some(("TLSv1.3", "TLS_AES_256_GCM_SHA384")),
                queue_id: "0123456789ABCDEF0123",
                single_recipient: Some("bob@example.com"),
                date: "Tue, 14 Jan 2025 10:00:00 +0000",
            },
        );
        let s = String::from_utf8(out).unwrap();
        assert_eq!(
            s,
            "Received: from app??evil???X-Injected:?1 ([192.0.2.7])\r\n\
             \t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)\r\n\
             \tby relay.example.net (herald) with ESMTPSA id 0123456789ABCDEF0123\r\n\
             \tfor <bob@example.com>;\r\n\
             \tTue, 14 Jan 2025 10:00:00 +0000\r\n"
        );
        assert_eq!(find_bare_line_end(s.as_bytes()), None);
        // The field parses as one header of the message it precedes.
        let mut msg = s.into_bytes();
        msg.extend_from_slice(b"From: a@b.example\r\n\r\nhi\r\n");
        assert!(inspect_headers(&msg).has_from);
    }

    #[test]
    fn received_without_tls_or_single_recipient() {
        let mut out = Vec::new();
        write_received(
            &mut out,
            &TraceInfo {
                helo: "",
                client_ip: "2001:db8::1".parse().unwrap(),
                hostname: "h.example",
                protocol: Protocol {
                    esmtp: false,
                    tls: false,
                    authenticated: false,
                    utf8: false,
                },
                tls: None,
                queue_id: "Q",
                single_recipient: None,
                date: "D",
            },
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Received: from unknown ([2001:db8::1])\r\n\tby h.example (herald) with SMTP id Q;\r\n\tD\r\n"
        );
    }

    #[test]
    fn date_is_rfc5322() {
        let d = crate::clock::rfc5322_now();
        assert!(d.ends_with("+0000"), "{d}");
        assert_eq!(d.as_bytes()[3], b',');
    }

    #[test]
    fn an_overlong_message_id_counts_as_missing() {
        let mut msg = b"From: a@b.test\r\nMessage-ID: <x".to_vec();
        for _ in 0..200 {
            msg.extend_from_slice(b"\r\n aaaaaaaaaa");
        }
        msg.extend_from_slice(b"@b.test>\r\n\r\nbody\r\n");
        let info = inspect_headers(&msg);
        assert_eq!(info.message_id, None);
        assert!(info.has_message_id);
        let (added, _) = missing_fields(&info, "Q", "relay.test", "date");
        assert!(
            !String::from_utf8(added).unwrap().contains("Message-ID"),
            "never a second Message-ID"
        );
    }
}
