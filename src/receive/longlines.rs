//! Over-long lines: SMTP allows at most 998 octets per line plus CRLF (RFC
//! 5321 §4.5.3.1.6), and a recipient MX that enforces it refuses the whole
//! message after herald has already answered 250. [`fix_long_lines`] finds
//! such lines in an accepted message and, where the content allows it,
//! rewrites only the part that holds one, before DKIM signing and policy:
//!
//! - a header line is folded at whitespace already in it (RFC 5322 §2.2.3),
//!   so unfolding gives back the same field;
//! - a 7bit, 8bit or binary body (or one without Content-Transfer-Encoding)
//!   is re-encoded as quoted-printable (RFC 2045 §6.7) and its
//!   Content-Transfer-Encoding replaced; decoding gives back its bytes;
//! - a long base64 line is cut into 76-character lines (RFC 2045 §6.8);
//! - a long quoted-printable line gets soft line breaks, nothing decoded.
//!
//! Everything else is refused with a [`LongLineError`] that names the line
//! and the part: preamble, epilogue and boundary lines (they belong to no
//! part), message/* parts (an attached message stays as it was written),
//! unknown encodings, and malformed base64 or quoted-printable.
//!
//! Input: the whole message with CRLF line ends (the bare LF/CR check runs
//! first); nothing in it is trusted. Nothing here panics on any bytes, and
//! time is linear in the message size: each multipart level holding a long
//! line reads its body once, and levels are capped at [`MAX_DEPTH`].
//!
//! The MIME structure is read here by RFC 2046 §5.1.1 (a delimiter is a
//! whole line, `--boundary` with optional `--` and trailing whitespace)
//! rather than taken from mail-parser's part offsets: mail-parser, made to
//! read lax mail, also ends a part at a `--boundary` in the middle of a
//! line, and a rewrite needs regions that start and end on line
//! boundaries. mail-parser still reads the field values (Content-Type and
//! its boundary parameter, Content-Transfer-Encoding).

use std::fmt;
use std::ops::Range;

use mail_parser::{MessageParser, MimeHeaders as _};

/// The longest line allowed, in octets without its CRLF.
pub const MAX_LINE: usize = 998;
/// Multipart levels read below the top; deeper long lines are refused, so
/// that hostile nesting cannot make the work quadratic.
pub const MAX_DEPTH: usize = 32;
/// Encoded line length (RFC 2045 §6.7 rule 5, §6.8).
const ENCODED_LINE: usize = 76;
/// Folded header line length to aim for (RFC 5322 §2.1.1).
const FOLDED_LINE: usize = 78;
const CTE_QP: &[u8] = b"Content-Transfer-Encoding: quoted-printable\r\n";

/// Why an over-long line cannot be rewritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unfixable {
    /// A header line without whitespace where a fold is needed.
    NoFoldingPoint,
    /// A line in a header block that is neither a field nor a continuation.
    NotHeaderField,
    /// A MIME preamble, epilogue or boundary line: part of no body.
    OutsideParts,
    /// A multipart body without a boundary parameter.
    NoBoundary,
    /// Inside a message/* part that is not base64 or quoted-printable.
    AttachedMessage,
    /// A Content-Transfer-Encoding other than 7bit, 8bit, binary, base64
    /// and quoted-printable.
    UnknownEncoding,
    /// A base64 line with characters outside the base64 alphabet.
    InvalidBase64,
    /// A quoted-printable line with no place for a soft line break.
    InvalidQuotedPrintable,
    /// A body line that starts with `--` and an enclosing boundary: lax
    /// MIME readers take it for a delimiter, strict ones for content.
    LooksLikeBoundary,
    /// Below more than [`MAX_DEPTH`] multipart levels.
    TooDeep,
}

impl fmt::Display for Unfixable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Unfixable::NoFoldingPoint => {
                "a header field can be folded only at a space or tab, and this one has none where a fold is needed"
            }
            Unfixable::NotHeaderField => "it is in a header block but is not a header field",
            Unfixable::OutsideParts => "it lies outside every MIME part",
            Unfixable::NoBoundary => "the multipart body has no boundary parameter",
            Unfixable::AttachedMessage => "attached messages are relayed as they are",
            Unfixable::UnknownEncoding => "its Content-Transfer-Encoding is not one herald can rewrap",
            Unfixable::InvalidBase64 => "it contains characters that are not base64",
            Unfixable::InvalidQuotedPrintable => {
                "the quoted-printable line has no place for a soft line break"
            }
            Unfixable::LooksLikeBoundary => "it starts like a MIME boundary line",
            Unfixable::TooDeep => "the MIME parts are nested too deeply",
        })
    }
}

/// An over-long line that [`fix_long_lines`] cannot rewrite.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line} is {length} octets long, in {part}: {reason}")]
pub struct LongLineError {
    /// 1-based line number in the submitted message.
    pub line: usize,
    /// Octets in the line, without its CRLF.
    pub length: usize,
    /// Where it is, e.g. "header Subject", "part 2 (image/png, base64)",
    /// "preamble of the message body (multipart/mixed)". Printable ASCII.
    pub part: String,
    pub reason: Unfixable,
}

impl LongLineError {
    /// The sentence for the refusal, ASCII and well under the 512-octet
    /// reply line (RFC 5321 §4.5.3.1.5). It fits `554 5.6.3` ("conversion
    /// required but not supported", RFC 3463), or the general `5.6.0`.
    pub fn reply_text(&self) -> String {
        let advice = match self.reason {
            Unfixable::NoFoldingPoint => {
                "shorten the header field or fold it at whitespace below 998 characters (RFC 5322 section 2.2.3)"
            }
            Unfixable::NotHeaderField => {
                "end the header with an empty line, and fold header fields below 998 characters"
            }
            _ => {
                "encode the part as quoted-printable or base64, or wrap lines below 998 characters"
            }
        };
        let part: String = self
            .part
            .chars()
            .take(120)
            .map(|c| {
                if c.is_ascii_graphic() || c == ' ' {
                    c
                } else {
                    '?'
                }
            })
            .collect();
        format!(
            "Message refused: line {} is {} octets long, in {part}, and herald cannot rewrap it: {}. \
             SMTP allows 998 octets per line plus CRLF (RFC 5321 section 4.5.3.1.6); {advice}",
            self.line, self.length, self.reason
        )
    }
}

/// Checks every line of `message` against the 998-octet limit and rewrites
/// what is too long.
///
/// `message` is the whole message as submitted (header and body, CRLF line
/// ends only). `Ok(None)` when no line is too long, the common case: one
/// pass that reads only the ends of lines and allocates nothing.
/// `Ok(Some(new))` when every long line could be fixed; only the parts that
/// held one differ from the input. `Err` names the first line that cannot
/// be fixed.
pub fn fix_long_lines(message: &[u8]) -> Result<Option<Vec<u8>>, LongLineError> {
    let Some(first) = next_long_line(message, 0) else {
        return Ok(None);
    };
    let mut long = Vec::new();
    let mut at = Some(first);
    while let Some(start) = at {
        let (end, next) = line_at(message, start, message.len());
        long.push(start..end);
        at = next_long_line(message, next);
    }
    let mut fixer = Fixer {
        msg: message,
        long: &long,
        edits: Vec::new(),
        part_reencoded: false,
    };
    fixer.entity(0..message.len(), None, false, 0, &mut Vec::new())?;
    let out = apply(message, fixer.edits);
    debug_assert!(next_long_line(&out, 0).is_none());
    Ok(Some(out))
}

/// The start of the first line at or after `from` (a line start) that is
/// longer than [`MAX_LINE`].
fn next_long_line(msg: &[u8], mut from: usize) -> Option<usize> {
    // A line is short enough when a LF lies within MAX_LINE + 2 octets of
    // its start. Searching each such window from its end finds the last LF
    // in it after reading about one line, so most octets are never read.
    while let Some(window) = msg.get(from..msg.len().min(from.saturating_add(MAX_LINE + 2))) {
        if window.is_empty() {
            return None;
        }
        match window.iter().rposition(|&b| b == b'\n') {
            Some(lf) => from += lf + 1,
            // No LF: a full window is a long line; a short one is the
            // unterminated last line, long only past MAX_LINE.
            None => return (window.len() > MAX_LINE).then_some(from),
        }
    }
    None
}

/// The line starting at `start`, looked for below `limit`: where its
/// content ends (before CRLF) and where the next line starts.
fn line_at(msg: &[u8], start: usize, limit: usize) -> (usize, usize) {
    let lf = msg
        .get(start..limit)
        .and_then(|s| s.iter().position(|&b| b == b'\n'));
    match lf {
        Some(i) => {
            let lf = start + i;
            let end = if lf > start && msg.get(lf - 1) == Some(&b'\r') {
                lf - 1
            } else {
                lf
            };
            (end, lf + 1)
        }
        None => (limit.max(start), limit.max(start)),
    }
}

/// Where the line break before the line starting at `start` begins.
fn break_before(msg: &[u8], start: usize, floor: usize) -> usize {
    if start >= floor + 2 && msg.get(start - 2..start) == Some(b"\r\n") {
        start - 2
    } else if start > floor && msg.get(start - 1) == Some(&b'\n') {
        start - 1
    } else {
        start
    }
}

fn line_number(msg: &[u8], at: usize) -> usize {
    1 + msg
        .get(..at)
        .map_or(0, |s| s.iter().filter(|&&b| b == b'\n').count())
}

fn is_wsp(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// Field names, types and encodings as they may appear in a reply: printable
/// ASCII of the token kind, bounded.
fn clean(s: &[u8]) -> String {
    s.iter()
        .take(64)
        .map(|&b| {
            if b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/".contains(&b) {
                char::from(b)
            } else {
                '?'
            }
        })
        .collect()
}

/// Bytes that replace `range` of the message.
struct Edit {
    range: Range<usize>,
    bytes: Vec<u8>,
}

/// Writes the message with the edits in place; they do not overlap.
fn apply(msg: &[u8], mut edits: Vec<Edit>) -> Vec<u8> {
    edits.sort_by_key(|e| (e.range.start, e.range.end));
    let removed: usize = edits.iter().map(|e| e.range.len()).sum();
    let added: usize = edits.iter().map(|e| e.bytes.len()).sum();
    let mut out = Vec::with_capacity((msg.len() + added).saturating_sub(removed));
    let mut at = 0;
    for e in edits {
        debug_assert!(e.range.start >= at, "overlapping edits");
        out.extend_from_slice(msg.get(at..e.range.start).unwrap_or_default());
        out.extend_from_slice(&e.bytes);
        at = at.max(e.range.end);
    }
    out.extend_from_slice(msg.get(at..).unwrap_or_default());
    out
}

/// A header block as far as rewriting needs it.
struct Header {
    /// Start of the empty line that ends the fields, or the region's end.
    fields_end: usize,
    /// First octet after the empty line, or the region's end.
    body_start: usize,
    /// Each over-long line, folded.
    folds: Vec<Edit>,
    /// Each Content-Transfer-Encoding field, up to the next field.
    cte_fields: Vec<Range<usize>>,
    has_content_type: bool,
    has_mime_version: bool,
}

/// What the header says about the body.
struct BodyType {
    /// Lower case; `text/plain` when absent (RFC 2045 §5.2), `message/rfc822`
    /// in a multipart/digest (RFC 2046 §5.1.5).
    ctype: String,
    subtype: String,
    boundary: Option<Vec<u8>>,
    /// Content-Transfer-Encoding's mechanism in lower case; `None` when
    /// absent or empty.
    encoding: Option<String>,
}

impl BodyType {
    fn read(header: &[u8], in_digest: bool) -> BodyType {
        let parsed = MessageParser::new().parse_headers(header);
        let ct = parsed.as_ref().and_then(|m| m.content_type());
        let (ctype, subtype) = match ct {
            Some(ct) => (
                ct.ctype().to_ascii_lowercase(),
                ct.subtype().unwrap_or_default().to_ascii_lowercase(),
            ),
            None if in_digest => ("message".into(), "rfc822".into()),
            None => ("text".into(), "plain".into()),
        };
        BodyType {
            boundary: ct
                .and_then(|ct| ct.attribute("boundary"))
                .filter(|b| !b.is_empty())
                .map(|b| b.as_bytes().to_vec()),
            encoding: parsed
                .as_ref()
                .and_then(|m| m.content_transfer_encoding())
                // The mechanism is one token; a comment may follow it.
                .and_then(|e| {
                    e.split(|c: char| c.is_whitespace() || c == '(')
                        .find(|t| !t.is_empty())
                })
                .map(str::to_ascii_lowercase),
            ctype,
            subtype,
        }
    }

    fn media(&self) -> String {
        format!(
            "{}/{}",
            clean(self.ctype.as_bytes()),
            clean(self.subtype.as_bytes())
        )
    }
}

/// "the message body" or "part 1.2".
fn part_name(section: Option<&str>) -> String {
    match section {
        None => "the message body".into(),
        Some(s) => format!("part {s}"),
    }
}

struct Fixer<'m> {
    msg: &'m [u8],
    /// Every over-long line's content, in message order.
    long: &'m [Range<usize>],
    edits: Vec<Edit>,
    /// A part below the top was re-encoded, so the top header needs
    /// MIME-Version for its Content-Transfer-Encoding to count.
    part_reencoded: bool,
}

impl<'m> Fixer<'m> {
    /// The long lines inside `region`.
    fn long_in(&self, region: &Range<usize>) -> &'m [Range<usize>] {
        let long: &'m [Range<usize>] = self.long;
        let lo = long.partition_point(|l| l.start < region.start);
        let hi = long.partition_point(|l| l.start < region.end);
        long.get(lo..hi.max(lo)).unwrap_or_default()
    }

    fn error(&self, line: &Range<usize>, part: String, reason: Unfixable) -> LongLineError {
        LongLineError {
            line: line_number(self.msg, line.start),
            length: line.len(),
            part,
            reason,
        }
    }

    /// Fixes the long lines of one entity (RFC 2045 §2.4: the message, or a
    /// body part) that spans `region`; `section` is `None` for the message.
    fn entity(
        &mut self,
        region: Range<usize>,
        section: Option<&str>,
        in_digest: bool,
        depth: usize,
        boundaries: &mut Vec<Vec<u8>>,
    ) -> Result<(), LongLineError> {
        let header = self.header(&region, section)?;
        let body = header.body_start..region.end.max(header.body_start);
        let body_long = self.long_in(&body);
        let mut reencoded = false;
        if let Some(first) = body_long.first() {
            let header_bytes = self
                .msg
                .get(region.start..header.body_start)
                .unwrap_or_default();
            let ty = BodyType::read(header_bytes, in_digest);
            let rewrappable = matches!(ty.encoding.as_deref(), Some("base64" | "quoted-printable"));
            match ty.ctype.as_str() {
                "multipart" => self.multipart(&body, &ty, section, depth, boundaries)?,
                // An attached message is relayed as written, unless it was
                // encoded (RFC 6532 allows it for message/global): rewrapping
                // the encoding leaves the message itself untouched.
                "message" if !rewrappable => {
                    let part = format!("{} ({})", part_name(section), ty.media());
                    return Err(self.error(first, part, Unfixable::AttachedMessage));
                }
                _ => reencoded = self.leaf(&body, body_long, &ty, section, boundaries)?,
            }
        }
        self.header_edits(header, &body, section, reencoded);
        Ok(())
    }

    /// Reads the header block at the start of `region`, folding its long
    /// lines.
    fn header(
        &self,
        region: &Range<usize>,
        section: Option<&str>,
    ) -> Result<Header, LongLineError> {
        let msg = self.msg;
        let mut h = Header {
            fields_end: region.end,
            body_start: region.end,
            folds: Vec::new(),
            cte_fields: Vec::new(),
            has_content_type: false,
            has_mime_version: false,
        };
        let where_ = |name: Option<&[u8]>| match (name, section) {
            (Some(n), None) => format!("header {}", clean(n)),
            (Some(n), Some(s)) => format!("header {} of part {s}", clean(n)),
            (None, None) => "the message header".to_string(),
            (None, Some(s)) => format!("the header of part {s}"),
        };
        // The field being read: where it starts and its name, if it has one.
        let mut field: Option<(usize, Option<&[u8]>)> = None;
        let mut at = region.start;
        while at < region.end {
            let (end, next) = line_at(msg, at, region.end);
            if end == at {
                h.fields_end = at;
                h.body_start = next;
                break;
            }
            let line = msg.get(at..end).unwrap_or_default();
            let continuation = line.first().is_some_and(|&b| is_wsp(b));
            if !continuation {
                if let Some((start, Some(name))) = field
                    && name.eq_ignore_ascii_case(b"content-transfer-encoding")
                {
                    h.cte_fields.push(start..at);
                }
                let name = field_name(line);
                if let Some(name) = name {
                    h.has_content_type |= name.eq_ignore_ascii_case(b"content-type");
                    h.has_mime_version |= name.eq_ignore_ascii_case(b"mime-version");
                }
                field = Some((at, name));
            }
            if line.len() > MAX_LINE {
                let name = field.and_then(|(_, name)| name);
                let line_range = at..end;
                // Folds go after the colon of a field's first line, and
                // after the first non-blank of a continuation, so that no
                // line is left blank (RFC 5322 §3.2.2).
                let min_break = if continuation {
                    line.iter().position(|&b| !is_wsp(b)).map(|i| i + 1)
                } else {
                    name.and_then(|_| line.iter().position(|&b| b == b':').map(|c| c + 1))
                };
                let Some(min_break) = min_break.filter(|_| name.is_some()) else {
                    return Err(self.error(&line_range, where_(None), Unfixable::NotHeaderField));
                };
                let Some(folded) = fold(line, min_break) else {
                    return Err(self.error(&line_range, where_(name), Unfixable::NoFoldingPoint));
                };
                h.folds.push(Edit {
                    range: line_range,
                    bytes: folded,
                });
            }
            at = next;
        }
        if let Some((start, Some(name))) = field
            && name.eq_ignore_ascii_case(b"content-transfer-encoding")
        {
            h.cte_fields.push(start..h.fields_end);
        }
        Ok(h)
    }

    /// The header's own edits: folds, and for a re-encoded body the new
    /// Content-Transfer-Encoding in place of the old one (others dropped);
    /// the top header gains MIME-Version, and Content-Type when needed.
    fn header_edits(
        &mut self,
        h: Header,
        body: &Range<usize>,
        section: Option<&str>,
        reencoded: bool,
    ) {
        let mut insert = Vec::new();
        if section.is_none() && !h.has_mime_version && (reencoded || self.part_reencoded) {
            insert.extend_from_slice(b"MIME-Version: 1.0\r\n");
        }
        if reencoded && section.is_some() {
            self.part_reencoded = true;
        }
        if !reencoded {
            self.edits.extend(h.folds);
            if !insert.is_empty() {
                self.edits.push(Edit {
                    range: h.fields_end..h.fields_end,
                    bytes: insert,
                });
            }
            return;
        }
        let body_bytes = self.msg.get(body.clone()).unwrap_or_default();
        if section.is_none() && !h.has_content_type && !body_bytes.is_ascii() {
            // Without Content-Type a MIME reader takes text/plain in
            // US-ASCII (RFC 2045 §5.2) and would show each escaped octet
            // as garbage. Before the re-encoding the octets were raw and
            // readers guessed; for apps that guess is UTF-8, and anything
            // else is labelled unknown-8bit (RFC 1428) rather than
            // mislabelled.
            insert.extend_from_slice(if std::str::from_utf8(body_bytes).is_ok() {
                b"Content-Type: text/plain; charset=utf-8\r\n".as_slice()
            } else {
                b"Content-Type: text/plain; charset=unknown-8bit\r\n".as_slice()
            });
        }
        let dropped = |r: &Range<usize>| {
            h.cte_fields
                .iter()
                .any(|f| f.start <= r.start && r.end <= f.end)
        };
        self.edits
            .extend(h.folds.into_iter().filter(|f| !dropped(&f.range)));
        for (i, f) in h.cte_fields.iter().enumerate() {
            self.edits.push(Edit {
                range: f.clone(),
                bytes: if i == 0 { CTE_QP.to_vec() } else { Vec::new() },
            });
        }
        if h.cte_fields.is_empty() {
            insert.extend_from_slice(CTE_QP);
        }
        if !insert.is_empty() {
            self.edits.push(Edit {
                range: h.fields_end..h.fields_end,
                bytes: insert,
            });
        }
    }

    /// Finds the parts of a multipart body and fixes those with long lines.
    fn multipart(
        &mut self,
        body: &Range<usize>,
        ty: &BodyType,
        section: Option<&str>,
        depth: usize,
        boundaries: &mut Vec<Vec<u8>>,
    ) -> Result<(), LongLineError> {
        let msg = self.msg;
        let body_long = self.long_in(body);
        let Some(first) = body_long.first() else {
            return Ok(());
        };
        let name = format!("{} ({})", part_name(section), ty.media());
        let Some(boundary) = &ty.boundary else {
            return Err(self.error(first, name, Unfixable::NoBoundary));
        };
        if depth >= MAX_DEPTH {
            return Err(self.error(first, name, Unfixable::TooDeep));
        }
        let mut dash_boundary = b"--".to_vec();
        dash_boundary.extend_from_slice(boundary);

        let mut parts: Vec<Range<usize>> = Vec::new();
        let mut first_delimiter = None;
        let mut epilogue = None;
        let mut open: Option<usize> = None;
        let mut long_iter = body_long.iter().peekable();
        let mut at = body.start;
        while at < body.end {
            // A long line's end is known: no need to read it for its LF.
            while long_iter.next_if(|l| l.start < at).is_some() {}
            let (end, next) = match long_iter.next_if(|l| l.start == at) {
                Some(l) => (l.end, line_at(msg, l.end, body.end).1),
                None => line_at(msg, at, body.end),
            };
            let line = msg.get(at..end).unwrap_or_default();
            if let Some(close) = delimiter(line, &dash_boundary) {
                first_delimiter.get_or_insert(at);
                if let Some(start) = open.take() {
                    parts.push(start..break_before(msg, at, start).max(start));
                }
                if close {
                    epilogue = Some(next);
                    break;
                }
                open = Some(next);
            }
            at = next;
        }
        if let Some(start) = open {
            parts.push(start..body.end.max(start));
        }

        // Both lists are in message order: one walk pairs lines with parts.
        let mut i = 0;
        let mut done = None;
        for line in body_long {
            while parts.get(i).is_some_and(|p| p.end < line.end) {
                i += 1;
            }
            let Some(part) = parts.get(i).filter(|p| p.start <= line.start) else {
                let what = if first_delimiter.is_none_or(|d| line.start < d) {
                    "the preamble"
                } else if epilogue.is_some_and(|e| line.start >= e) {
                    "the epilogue"
                } else {
                    "a boundary line"
                };
                return Err(self.error(line, format!("{what} of {name}"), Unfixable::OutsideParts));
            };
            if done == Some(i) {
                continue;
            }
            done = Some(i);
            let child = match section {
                None => (i + 1).to_string(),
                Some(s) => format!("{s}.{}", i + 1),
            };
            boundaries.push(boundary.clone());
            let fixed = self.entity(
                part.clone(),
                Some(&child),
                ty.subtype == "digest",
                depth + 1,
                boundaries,
            );
            boundaries.pop();
            fixed?;
        }
        Ok(())
    }

    /// Fixes the long lines of a body that is not multipart; true when it
    /// was re-encoded as quoted-printable.
    fn leaf(
        &mut self,
        body: &Range<usize>,
        body_long: &[Range<usize>],
        ty: &BodyType,
        section: Option<&str>,
        boundaries: &[Vec<u8>],
    ) -> Result<bool, LongLineError> {
        let msg = self.msg;
        let encoding = ty.encoding.as_deref();
        let name = || {
            format!(
                "{} ({}, {})",
                part_name(section),
                ty.media(),
                clean(encoding.unwrap_or("7bit").as_bytes())
            )
        };
        for line in body_long {
            let bytes = msg.get(line.clone()).unwrap_or_default();
            if boundaries
                .iter()
                .any(|b| bytes.strip_prefix(b"--").is_some_and(|r| r.starts_with(b)))
            {
                return Err(self.error(line, name(), Unfixable::LooksLikeBoundary));
            }
        }
        match encoding {
            None | Some("7bit" | "8bit" | "binary") => {
                let bytes = msg.get(body.clone()).unwrap_or_default();
                let mut out = Vec::new();
                encode_qp(bytes, ty.ctype == "text", &mut out);
                self.edits.push(Edit {
                    range: body.clone(),
                    bytes: out,
                });
                Ok(true)
            }
            Some(encoding @ ("base64" | "quoted-printable")) => {
                // Already encoded: only the long lines are rewrapped.
                let (wrap, invalid): (Rewrap, _) = if encoding == "base64" {
                    (wrap_base64, Unfixable::InvalidBase64)
                } else {
                    (wrap_qp, Unfixable::InvalidQuotedPrintable)
                };
                for line in body_long {
                    let bytes = msg.get(line.clone()).unwrap_or_default();
                    let Some(wrapped) = wrap(bytes) else {
                        return Err(self.error(line, name(), invalid));
                    };
                    self.edits.push(Edit {
                        range: line.clone(),
                        bytes: wrapped,
                    });
                }
                Ok(false)
            }
            Some(_) => {
                let first = body_long.first().unwrap_or(body);
                Err(self.error(first, name(), Unfixable::UnknownEncoding))
            }
        }
    }
}

/// The name of a header field line (before the colon; blanks before it are
/// obsolete syntax that readers accept, RFC 5322 §4.5); `None` when the
/// line is not a field.
fn field_name(line: &[u8]) -> Option<&[u8]> {
    let colon = line.iter().position(|&b| b == b':')?;
    let name = line.get(..colon)?.trim_ascii_end();
    (!name.is_empty() && name.iter().all(|&b| (33..=126).contains(&b))).then_some(name)
}

/// Is `line` a delimiter line for this `--boundary` (RFC 2046 §5.1.1)?
/// Some(true) for the close delimiter.
fn delimiter(line: &[u8], dash_boundary: &[u8]) -> Option<bool> {
    let rest = line.strip_prefix(dash_boundary)?;
    let (close, rest) = match rest.strip_prefix(b"--") {
        Some(rest) => (true, rest),
        None => (false, rest),
    };
    rest.iter().all(|&b| is_wsp(b)).then_some(close)
}

/// Folds one header line (no CRLF) by inserting CRLF before whitespace at
/// or after `min_break`: lines of at most 78 octets where whitespace
/// allows, never over [`MAX_LINE`]; `None` when that cannot be done.
fn fold(line: &[u8], min_break: usize) -> Option<Vec<u8>> {
    // A fold goes before the last blank of a run, so the new line starts
    // with one blank and then text, and no line is only blanks.
    let breaks: Vec<usize> = line
        .windows(2)
        .enumerate()
        .filter(|&(i, w)| i >= min_break && matches!(w, &[a, b] if is_wsp(a) && !is_wsp(b)))
        .map(|(i, _)| i)
        .collect();
    let mut out = Vec::with_capacity(line.len() + line.len() / 32);
    let mut start = 0;
    let mut next = 0;
    while line.len() - start > FOLDED_LINE {
        while breaks.get(next).is_some_and(|&b| b <= start) {
            next += 1;
        }
        let mut far = next;
        while breaks.get(far).is_some_and(|&b| b - start <= FOLDED_LINE) {
            far += 1;
        }
        // The farthest fold within 78 octets, or else the nearest one.
        let Some(&at) = breaks.get(if far > next { far - 1 } else { next }) else {
            break;
        };
        if at - start > MAX_LINE {
            return None;
        }
        out.extend_from_slice(line.get(start..at)?);
        out.extend_from_slice(b"\r\n");
        start = at;
    }
    if line.len() - start > MAX_LINE {
        return None;
    }
    out.extend_from_slice(line.get(start..)?);
    Some(out)
}

/// Octets quoted-printable may write as they are (RFC 2045 §6.7 rules 2
/// and 3): printable ASCII but '=', and blanks, which need care at a line end.
const LITERAL: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = matches!(b as u8, b' ' | b'\t' | b'!'..=b'<' | b'>'..=b'~');
        b += 1;
    }
    t
};

/// Quoted-printable (RFC 2045 §6.7) of a whole body. In text a CRLF is a
/// line break and stays one (rule 4); in other media it is data and is
/// escaped. Lines are at most 76 octets, blanks before a line end are
/// escaped (rule 3), and a line begun by a soft break never starts with
/// `--`, so no line this makes can pass for a MIME boundary.
fn encode_qp(body: &[u8], text: bool, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let escaped = body.iter().filter(|&&b| b >= 0x7f || b == b'=').count();
    out.reserve(body.len() + 2 * escaped + body.len() / 24);
    let crlf_at = |i: usize| text && body.get(i..i + 2) == Some(b"\r\n");
    let mut col = 0;
    let mut soft = false;
    let mut i = 0;
    while let Some(rest) = body.get(i..).filter(|r| !r.is_empty()) {
        let room = (ENCODED_LINE - 1).saturating_sub(col).min(rest.len());
        // Literal octets go a run at a time, up to the end of the line.
        let mut run = rest
            .get(..room)
            .and_then(|r| r.iter().position(|&b| !LITERAL[usize::from(b)]))
            .unwrap_or(room);
        // A trailing blank may end a line, and a soft-broken line may start
        // with "--": one octet at a time below.
        while run > 0 && rest.get(run - 1).is_some_and(|&b| is_wsp(b)) {
            run -= 1;
        }
        if soft && col == 0 && rest.starts_with(b"--") {
            run = 0;
        }
        if run > 0 {
            out.extend_from_slice(rest.get(..run).unwrap_or_default());
            col += run;
            i += run;
            continue;
        }
        let b = rest.first().copied().unwrap_or_default();
        if crlf_at(i) {
            out.extend_from_slice(b"\r\n");
            col = 0;
            soft = false;
            i += 2;
            continue;
        }
        let plain = match b {
            b' ' | b'\t' => i + 1 < body.len() && !crlf_at(i + 1),
            b'=' => false,
            b'!'..=b'~' => true,
            _ => false,
        };
        // Room for the soft break's "=" at the end of the line.
        if col + if plain { 1 } else { 3 } > ENCODED_LINE - 1 {
            out.extend_from_slice(b"=\r\n");
            col = 0;
            soft = true;
        }
        let plain = plain && !(soft && col == 0 && b == b'-' && body.get(i + 1) == Some(&b'-'));
        if plain {
            out.push(b);
            col += 1;
        } else {
            out.extend_from_slice(&[b'=', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
            col += 3;
        }
        i += 1;
    }
}

/// Rewraps one encoded line into lines within the limit; `None` when the
/// line is not valid in its encoding.
type Rewrap = fn(&[u8]) -> Option<Vec<u8>>;

/// Cuts one long base64 line into lines of 76; blanks dropped, `None`
/// for anything outside the base64 alphabet.
fn wrap_base64(line: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(line.len() + line.len() / 32);
    let mut col = 0;
    for &b in line {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'+' | b'/' | b'=' => {
                if col == ENCODED_LINE {
                    out.extend_from_slice(b"\r\n");
                    col = 0;
                }
                out.push(b);
                col += 1;
            }
            b' ' | b'\t' => {}
            _ => return None,
        }
    }
    Some(out)
}

/// Soft line breaks (RFC 2045 §6.7 rule 5) in one long quoted-printable
/// line, nothing decoded: a break never splits an `=XX` escape nor starts
/// a line with `--`. `None` when a stretch of 75 octets has no such place.
fn wrap_qp(line: &[u8]) -> Option<Vec<u8>> {
    let ok = |p: usize| {
        line.get(p.wrapping_sub(1)) != Some(&b'=')
            && line.get(p.wrapping_sub(2)) != Some(&b'=')
            && line.get(p..p + 2) != Some(b"--")
    };
    let mut out = Vec::with_capacity(line.len() + line.len() / 24);
    let mut start = 0;
    while line.len() - start > ENCODED_LINE {
        let mut at = start + ENCODED_LINE - 1;
        while at > start && !ok(at) {
            at -= 1;
        }
        if at == start {
            return None;
        }
        out.extend_from_slice(line.get(start..at)?);
        out.extend_from_slice(b"=\r\n");
        start = at;
    }
    out.extend_from_slice(line.get(start..)?);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as BASE64;
    use mail_parser::{MessageParser, PartType};

    const FIXTURES: &[(&str, &[u8])] = &[
        (
            "dsn-delayed",
            include_bytes!("../../tests/fixtures/dsn-delayed.eml"),
        ),
        (
            "dsn-failed-full",
            include_bytes!("../../tests/fixtures/dsn-failed-full.eml"),
        ),
        (
            "dsn-failed-hdrs",
            include_bytes!("../../tests/fixtures/dsn-failed-hdrs.eml"),
        ),
        (
            "invoice-html-pdf",
            include_bytes!("../../tests/fixtures/invoice-html-pdf.eml"),
        ),
        (
            "invoice-pdf",
            include_bytes!("../../tests/fixtures/invoice-pdf.eml"),
        ),
        (
            "spam-bulk",
            include_bytes!("../../tests/fixtures/spam-bulk.eml"),
        ),
        (
            "spam-phishing",
            include_bytes!("../../tests/fixtures/spam-phishing.eml"),
        ),
        (
            "spam-zip-exe",
            include_bytes!("../../tests/fixtures/spam-zip-exe.eml"),
        ),
        (
            "utf8-body-8bitmime",
            include_bytes!("../../tests/fixtures/utf8-body-8bitmime.eml"),
        ),
        (
            "utf8-smtputf8",
            include_bytes!("../../tests/fixtures/utf8-smtputf8.eml"),
        ),
    ];

    const FROM: &str = "From: Grünbäume Billing <billing@gruenbaeume.example>\r\n\
        To: Bob <bob@example.net>\r\nSubject: Rechnung 2026-0043\r\n\
        Date: Sun, 29 Nov 2026 10:00:00 +0100\r\nMessage-ID: <r43@gruenbaeume.example>\r\n";

    /// An HTML invoice row of about `n` octets, on one line.
    fn html_line(n: usize) -> String {
        let mut s = String::from("<table>");
        let mut i = 0;
        while s.len() < n {
            i += 1;
            s += &format!(
                "<tr><td>Grünbäume GmbH, Straße {i}</td><td style=\"text-align:right\">EUR {i}.00 = 100%</td></tr>"
            );
        }
        s + "</table>"
    }

    fn fixed(m: &[u8]) -> Vec<u8> {
        match fix_long_lines(m) {
            Ok(Some(out)) => out,
            other => panic!("expected a rewrite, got {other:?}"),
        }
    }

    /// Every line at most 998 octets and every line end CRLF.
    fn assert_sound(m: &[u8]) {
        assert_eq!(next_long_line(m, 0), None, "a long line is left");
        assert_eq!(
            crate::receive::message::find_bare_line_end(m),
            None,
            "bare CR or LF"
        );
    }

    /// Strict quoted-printable decoding: panics on anything malformed.
    fn qp_decode(s: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = 0;
        while let Some(&b) = s.get(i) {
            if b == b'=' {
                if s.get(i + 1..i + 3) == Some(b"\r\n") {
                    i += 3;
                    continue;
                }
                let hex = std::str::from_utf8(&s[i + 1..i + 3]).unwrap();
                assert_eq!(hex, hex.to_ascii_uppercase(), "lower-case hex");
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            } else {
                out.push(b);
                i += 1;
            }
        }
        out
    }

    /// Each leaf part as mail-parser decodes it: media type and content.
    fn decoded(m: &[u8]) -> Vec<(String, Vec<u8>)> {
        let msg = MessageParser::new().parse(m).expect("parses");
        msg.parts
            .iter()
            .filter(|p| !matches!(p.body, PartType::Multipart(_)))
            .map(|p| {
                let ct = p
                    .content_type()
                    .map(|c| format!("{}/{}", c.ctype(), c.subtype().unwrap_or("")))
                    .unwrap_or_default();
                (ct, p.contents().to_vec())
            })
            .collect()
    }

    fn header_of(m: &[u8]) -> &[u8] {
        let end = m.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 2;
        &m[..end]
    }

    fn count(hay: &[u8], needle: &[u8]) -> usize {
        hay.windows(needle.len()).filter(|w| w == &needle).count()
    }

    #[test]
    fn fixtures_have_no_long_line() {
        for (name, m) in FIXTURES {
            assert_eq!(fix_long_lines(m), Ok(None), "{name}");
        }
    }

    #[test]
    fn the_limit_is_998_octets_plus_crlf() {
        for (len, long) in [
            (0, false),
            (997, false),
            (998, false),
            (999, true),
            (5000, true),
        ] {
            let line = "a".repeat(len);
            let terminated = format!("Subject: x\r\n\r\n{line}\r\nend\r\n");
            assert_eq!(
                next_long_line(terminated.as_bytes(), 0).is_some(),
                long,
                "{len}"
            );
            let last = format!("Subject: x\r\n\r\nstart\r\n{line}");
            assert_eq!(
                next_long_line(last.as_bytes(), 0).is_some(),
                long,
                "{len} at the end"
            );
            // Many short lines before it: the window search must not skip it.
            let after = format!("{}{line}\r\n", "ab\r\n".repeat(700));
            assert_eq!(
                next_long_line(after.as_bytes(), 0).is_some(),
                long,
                "{len} late"
            );
        }
    }

    #[test]
    fn html_invoice_becomes_quoted_printable() {
        let html = format!("<html><body>\r\n{}\r\n</body></html>\r\n", html_line(2000));
        let m = format!(
            "{FROM}MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\
             Content-Transfer-Encoding: 8bit\r\nX-Mailer: Invoicer\r\n\r\n{html}"
        );
        let out = fixed(m.as_bytes());
        assert_sound(&out);
        let header = std::str::from_utf8(header_of(&out)).unwrap();
        // Replaced in place; the rest of the header as it was.
        assert!(header.ends_with(
            "Content-Type: text/html; charset=utf-8\r\n\
             Content-Transfer-Encoding: quoted-printable\r\nX-Mailer: Invoicer\r\n"
        ));
        assert!(header.starts_with(FROM));
        assert_eq!(count(header.as_bytes(), b"Content-Transfer-Encoding"), 1);
        assert_eq!(count(header.as_bytes(), b"MIME-Version"), 1);
        let body = &out[header.len() + 2..];
        assert!(body.split(|&b| b == b'\n').all(|l| l.len() <= 77));
        assert_eq!(qp_decode(body), html.as_bytes());
        assert!(
            std::str::from_utf8(body)
                .unwrap()
                .contains("Gr=C3=BCnb=C3=A4ume GmbH, Stra=C3=9Fe")
        );
        let parsed = MessageParser::new().parse(&out).unwrap();
        assert_eq!(parsed.body_html(0).unwrap(), html);
    }

    fn alternative_with_pdf(html: &str, pdf_b64: &str) -> String {
        format!(
            "{FROM}MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"=_mixed\"\r\n\r\n\
             This is a multi-part message in MIME format.\r\n\r\n\
             --=_mixed\r\nContent-Type: multipart/alternative; boundary=\"=_alt\"\r\n\r\n\
             --=_alt\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\
             Grünbäume GmbH, Straße 1: EUR 2.469,12\r\n\r\n\
             --=_alt\r\nContent-Type: text/html; charset=utf-8\r\n\r\n{html}\r\n\
             --=_alt--\r\n\r\n\
             --=_mixed\r\nContent-Type: application/pdf; name=\"Rechnung.pdf\"\r\n\
             Content-Disposition: attachment; filename=\"Rechnung.pdf\"\r\n\
             Content-Transfer-Encoding: base64\r\n\r\n{pdf_b64}\r\n--=_mixed--\r\n"
        )
    }

    fn pdf() -> Vec<u8> {
        let mut pdf = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n".to_vec();
        pdf.extend((0..3000u32).map(|i| (i * 7 % 251) as u8));
        pdf
    }

    fn wrapped_base64(data: &[u8]) -> String {
        let b = BASE64.encode(data);
        b.as_bytes()
            .chunks(76)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join("\r\n")
    }

    #[test]
    fn only_the_long_html_part_changes() {
        let html = format!("<p>Grüße</p>{}", html_line(2000));
        let m = alternative_with_pdf(&html, &wrapped_base64(&pdf()));
        let out = fixed(m.as_bytes());
        assert_sound(&out);
        let text = "\r\n--=_alt\r\nContent-Type: text/html";
        let (m_head, m_tail) = m.split_at(m.find(text).unwrap() + text.len());
        let pdf_at = m_tail.find("\r\n--=_mixed\r\n").unwrap();
        // Everything before the HTML part and the whole PDF part: byte for byte.
        assert!(out.starts_with(m_head.as_bytes()));
        assert!(out.ends_with(&m_tail.as_bytes()[pdf_at..]));
        let out_s = String::from_utf8(out.clone()).unwrap();
        assert!(out_s.contains(
            "--=_alt\r\nContent-Type: text/html; charset=utf-8\r\n\
             Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        ));
        // MIME-Version was there: not doubled.
        assert_eq!(count(&out, b"MIME-Version"), 1);
        let before = decoded(m.as_bytes());
        let after = decoded(&out);
        assert_eq!(before, after);
        assert_eq!(after[2], ("application/pdf".to_string(), pdf()));
        assert_eq!(after[1].1, html.as_bytes());
    }

    #[test]
    fn one_line_base64_is_rewrapped() {
        let one_line = BASE64.encode(pdf());
        assert!(one_line.len() > 3000);
        let m = alternative_with_pdf("<p>short</p>", &one_line);
        let out = fixed(m.as_bytes());
        assert_sound(&out);
        let out_s = String::from_utf8(out.clone()).unwrap();
        let wrapped = wrapped_base64(&pdf());
        assert!(out_s.contains(&format!(
            "Content-Transfer-Encoding: base64\r\n\r\n{wrapped}\r\n--=_mixed--\r\n"
        )));
        // Nothing else changed.
        assert_eq!(out_s.replace(&wrapped, &one_line), m);
        assert_eq!(decoded(&out), decoded(m.as_bytes()));
    }

    #[test]
    fn long_subject_is_folded_at_spaces() {
        let words: Vec<String> = (0..200).map(|i| format!("Straße{i}")).collect();
        let subject = format!("Ihre Rechnung: {}", words.join(" "));
        assert!(subject.len() > 1500);
        let m = format!("Subject: {subject}\r\nFrom: a@b.example\r\n\r\nHallo\r\n");
        let out = fixed(m.as_bytes());
        assert_sound(&out);
        let header = header_of(&out);
        for line in header.split(|&b| b == b'\n') {
            assert!(line.len() <= 80, "{}", String::from_utf8_lossy(line));
        }
        // Unfolding (RFC 5322 §2.2.3) gives the field back.
        let unfolded = String::from_utf8(header.to_vec())
            .unwrap()
            .replace("\r\n ", " ");
        assert!(unfolded.starts_with(&format!("Subject: {subject}\r\nFrom:")));
        assert!(out.ends_with(b"\r\n\r\nHallo\r\n"));
        let parsed = MessageParser::new().parse(&out).unwrap();
        assert_eq!(parsed.subject(), Some(subject.as_str()));
    }

    #[test]
    fn a_header_without_spaces_is_refused() {
        let token = "x".repeat(1500);
        let m = format!("From: a@b.example\r\nX-Tracking: {token}\r\n\r\nHallo\r\n");
        let err = fix_long_lines(m.as_bytes()).unwrap_err();
        assert_eq!(
            err,
            LongLineError {
                line: 2,
                length: 1512,
                part: "header X-Tracking".into(),
                reason: Unfixable::NoFoldingPoint,
            }
        );
        let text = err.reply_text();
        assert!(
            text.contains("line 2 is 1512 octets long, in header X-Tracking"),
            "{text}"
        );
        assert!(text.contains("fold it at whitespace"), "{text}");
        assert!(text.is_ascii() && text.len() < 450, "{text}");
        // A space only in the first 998 octets is not enough either.
        let m = format!("From: a@b.example\r\nX-Tracking: a {token}\r\n\r\nHallo\r\n");
        assert_eq!(
            fix_long_lines(m.as_bytes()).unwrap_err().reason,
            Unfixable::NoFoldingPoint
        );
    }

    #[test]
    fn folding_prefers_78_but_takes_what_there_is() {
        // Gaps of 500 between spaces: lines as long as the gaps, not longer.
        let field = format!(
            "X-Long: {} {} {}",
            "a".repeat(500),
            "b".repeat(500),
            "c".repeat(500)
        );
        let folded = fold(field.as_bytes(), 7).unwrap();
        let lines: Vec<&[u8]> = folded.split(|&b| b == b'\n').collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0], b"X-Long:\r");
        assert!(lines.iter().all(|l| l.len() <= 998));
        assert_eq!(
            String::from_utf8(folded).unwrap().replace("\r\n", ""),
            field
        );
        // No line made only of blanks.
        let blanks = format!("X: a{}b", " ".repeat(1200));
        let folded = fold(blanks.as_bytes(), 2);
        assert!(
            folded.is_none(),
            "the blanks cannot be split without a blank line"
        );
    }

    #[test]
    fn eight_bit_utf8_text_round_trips() {
        let base = FIXTURES[8].1;
        let s = std::str::from_utf8(base).unwrap();
        let long = format!(
            "\r\nGrüße aus Köln: {}\r\n\r\nZoë",
            "Ελληνικά, 日本語, emoji 📎 ".repeat(60)
        );
        let m = s.replace("\r\n\r\nZoë", &long);
        let out = fixed(m.as_bytes());
        assert_sound(&out);
        let out_s = std::str::from_utf8(&out).unwrap();
        assert!(out_s.contains("Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"));
        // A line that starts with a dot stays a line of its own.
        assert!(out_s.contains("\r\n.Eine Zeile, die mit einem Punkt beginnt.\r\n"));
        let parsed = MessageParser::new().parse(&out).unwrap();
        let original = MessageParser::new().parse(m.as_bytes()).unwrap();
        assert_eq!(parsed.body_text(0), original.body_text(0));
        assert_eq!(
            qp_decode(&out[header_of(&out).len() + 2..]),
            &m.as_bytes()[header_of(m.as_bytes()).len() + 2..]
        );
    }

    #[test]
    fn plain_message_gains_mime_headers() {
        // Non-ASCII, valid UTF-8: labelled utf-8.
        let body = format!("Grünbäume GmbH, Straße 1\r\n{}\r\n", "Öl ".repeat(500));
        let m = format!("From: a@b.example\r\nSubject: x\r\n\r\n{body}");
        let out = fixed(m.as_bytes());
        assert_sound(&out);
        assert_eq!(
            header_of(&out),
            b"From: a@b.example\r\nSubject: x\r\nMIME-Version: 1.0\r\n\
              Content-Type: text/plain; charset=utf-8\r\n\
              Content-Transfer-Encoding: quoted-printable\r\n"
        );
        let parsed = MessageParser::new().parse(&out).unwrap();
        assert_eq!(parsed.body_text(0).unwrap(), body);

        // ASCII: the default text/plain; charset=us-ascii is right.
        let m = format!("From: a@b.example\r\n\r\n{}\r\n", "word ".repeat(300));
        let out = fixed(m.as_bytes());
        assert_eq!(
            header_of(&out),
            b"From: a@b.example\r\nMIME-Version: 1.0\r\nContent-Transfer-Encoding: quoted-printable\r\n"
        );

        // Octets that are not UTF-8 are not called UTF-8.
        let mut m = b"From: a@b.example\r\n\r\n".to_vec();
        m.extend(std::iter::repeat_n(b"Stra\xdfe ".as_slice(), 200).flatten());
        let out = fixed(&m);
        assert!(header_of(&out).ends_with(b"Content-Type: text/plain; charset=unknown-8bit\r\nContent-Transfer-Encoding: quoted-printable\r\n"));

        // No header block at all: the fields go before the empty line.
        let m = format!("\r\n{}", "a".repeat(1200));
        let out = fixed(m.as_bytes());
        assert!(out.starts_with(
            b"MIME-Version: 1.0\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\naaa"
        ));
    }

    #[test]
    fn crlf_and_the_last_line_are_kept_exactly() {
        for tail in ["", "\r\n", "\r\n\r\n", " ", "\t\r\n"] {
            let body = format!("{}{tail}", "a".repeat(1500));
            let m = format!("Subject: x\r\nContent-Type: text/plain\r\n\r\n{body}");
            let out = fixed(m.as_bytes());
            assert_sound(&out);
            let out_body = &out[header_of(&out).len() + 2..];
            assert_eq!(qp_decode(out_body), body.as_bytes(), "{tail:?}");
            assert_eq!(out_body.ends_with(b"\r\n"), body.ends_with("\r\n"));
            // Blanks at the end of a line are escaped (RFC 2045 §6.7 rule 3).
            assert!(
                !out_body
                    .split(|&b| b == b'\n')
                    .any(|l| l.ends_with(b" \r") || l.ends_with(b"\t\r"))
            );
        }
    }

    #[test]
    fn long_quoted_printable_lines_get_soft_breaks() {
        // The fixture's HTML with its soft line breaks taken out.
        let m = std::str::from_utf8(FIXTURES[3].1).unwrap();
        let start = m.find("Content-Type: text/html").unwrap();
        let end = start + m[start..].find("\r\n--=_alt_4c77aa--").unwrap();
        let body_at = start + m[start..].find("\r\n\r\n").unwrap() + 4;
        // One line: soft breaks out, hard ones written as the escapes they decode like.
        let one_line = m[body_at..end]
            .replace("=\r\n", "")
            .replace("\r\n", "=0D=0A");
        let joined = format!("{}{one_line}{}", &m[..body_at], &m[end..]);
        assert!(next_long_line(joined.as_bytes(), 0).is_some());
        let out = fixed(joined.as_bytes());
        assert_sound(&out);
        assert_eq!(decoded(&out), decoded(m.as_bytes()));
        assert_eq!(&out[..start], &m.as_bytes()[..start]);

        assert_eq!(wrap_qp(&[b'='; 200]), None);
        let escapes = "=C3=BC".repeat(200);
        let wrapped = wrap_qp(escapes.as_bytes()).unwrap();
        assert_eq!(qp_decode(&wrapped), qp_decode(escapes.as_bytes()));
        assert!(wrapped.split(|&b| b == b'\n').all(|l| l.len() <= 77));
    }

    #[test]
    fn an_encoding_may_carry_a_comment() {
        let m = format!(
            "Content-Type: text/plain\r\nContent-Transfer-Encoding: 8bit (generated)\r\n\r\n{}\r\n",
            "a".repeat(1200)
        );
        let out = fixed(m.as_bytes());
        assert!(out.starts_with(
            b"Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\nMIME-Version: 1.0\r\n\r\n"
        ));
    }

    #[test]
    fn other_media_keep_their_crlf_as_data() {
        let json = format!("{{\"a\": \"{}\",\r\n \"ü\": 1}}\r\n", "x".repeat(1200));
        let m = format!(
            "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n\
             --b\r\nContent-Type: text/plain\r\n\r\nhi\r\n\
             --b\r\nContent-Type: application/json\r\nContent-Transfer-Encoding: 8bit\r\n\r\n{json}\r\n--b--\r\n"
        );
        let out = fixed(m.as_bytes());
        assert_sound(&out);
        let out_s = std::str::from_utf8(&out).unwrap();
        assert!(
            out_s.contains(",=0D=0A =22=C3=BC=22: 1}=0D=0A\r\n--b--") || out_s.contains("=0D=0A")
        );
        assert!(!out_s.contains(",\r\n \"ü\""));
        assert_eq!(decoded(&out), decoded(m.as_bytes()));
    }

    #[test]
    fn mime_version_is_added_for_a_reencoded_part() {
        let m = format!(
            "Content-Type: multipart/alternative; boundary=b\r\n\r\n\
             --b\r\nContent-Type: text/html\r\n\r\n{}\r\n--b--\r\n",
            "y".repeat(1100)
        );
        let out = fixed(m.as_bytes());
        assert!(out.starts_with(
            b"Content-Type: multipart/alternative; boundary=b\r\nMIME-Version: 1.0\r\n\r\n--b\r\n"
        ));
    }

    fn refusal(m: &str) -> LongLineError {
        fix_long_lines(m.as_bytes()).unwrap_err()
    }

    #[test]
    fn what_cannot_be_rewritten_is_refused_precisely() {
        let long = "z".repeat(1200);
        let head = "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n";

        let e = refusal(&format!("{head}{long}\r\n--b\r\n\r\nx\r\n--b--\r\n"));
        assert_eq!(
            (e.line, e.length, e.reason),
            (4, 1200, Unfixable::OutsideParts)
        );
        assert_eq!(e.part, "the preamble of the message body (multipart/mixed)");

        let e = refusal(&format!("{head}--b\r\n\r\nx\r\n--b--\r\n{long}\r\n"));
        assert_eq!(
            (e.line, e.part.as_str()),
            (8, "the epilogue of the message body (multipart/mixed)")
        );

        let e = refusal(&format!(
            "{head}--b{}\r\n\r\nx\r\n--b--\r\n",
            " ".repeat(1200)
        ));
        assert_eq!(
            (e.line, e.part.as_str()),
            (4, "a boundary line of the message body (multipart/mixed)")
        );

        let e = refusal(&format!(
            "{head}--b\r\nContent-Type: text/plain\r\n\r\nx\r\n\
             --b\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\n{long}\r\n--b--\r\n"
        ));
        assert_eq!((e.line, e.reason), (13, Unfixable::AttachedMessage));
        assert_eq!(e.part, "part 2 (message/rfc822)");

        // Encoded, it can be rewrapped all the same.
        let encoded = format!(
            "{head}--b\r\nContent-Type: message/global\r\nContent-Transfer-Encoding: base64\r\n\r\n{}\r\n--b--\r\n",
            BASE64.encode(format!("Subject: inner\r\n\r\n{long}\r\n"))
        );
        assert_sound(&fixed(encoded.as_bytes()));

        let e = refusal(&format!(
            "{head}--b\r\nContent-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\n{long}!\r\n--b--\r\n"
        ));
        assert_eq!(
            (e.reason, e.part.as_str()),
            (Unfixable::InvalidBase64, "part 1 (image/png, base64)")
        );

        let e = refusal(&format!(
            "{head}--b\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\n{long}\r\n--b--\r\n"
        ));
        assert_eq!(
            (e.reason, e.part.as_str()),
            (
                Unfixable::UnknownEncoding,
                "part 1 (text/plain, x-uuencode)"
            )
        );

        let e = refusal(&format!("{head}--b\r\n\r\n--b-junk{long}\r\n--b--\r\n"));
        assert_eq!((e.line, e.reason), (6, Unfixable::LooksLikeBoundary));
        assert_eq!(e.part, "part 1 (text/plain, 7bit)");

        let e = refusal(&format!(
            "MIME-Version: 1.0\r\nContent-Type: multipart/mixed\r\n\r\n--b\r\n\r\n{long}\r\n--b--\r\n"
        ));
        assert_eq!((e.line, e.reason), (6, Unfixable::NoBoundary));

        let e = refusal(&format!(
            "MIME-Version: 1.0\r\nContent-Type: multipart/digest; boundary=d\r\n\r\n--d\r\n\r\nSubject: x\r\n\r\n{long}\r\n--d--\r\n"
        ));
        assert_eq!(
            (e.reason, e.part.as_str()),
            (Unfixable::AttachedMessage, "part 1 (message/rfc822)")
        );

        // A header block that holds what is not a field.
        let e = refusal(&format!("{long}\r\n\r\nbody\r\n"));
        assert_eq!(
            (e.line, e.reason, e.part.as_str()),
            (1, Unfixable::NotHeaderField, "the message header")
        );
        let e = refusal(&format!(
            "{head}--b\r\nContent-Type: text/plain\r\n no colon {long}\r\n\r\nx\r\n--b--\r\n"
        ));
        assert_eq!(
            (e.reason, e.part.as_str()),
            (Unfixable::NoFoldingPoint, "header Content-Type of part 1")
        );

        let text = e.reply_text();
        assert!(text.starts_with("Message refused: line 6 is "), "{text}");
        let e = refusal(&format!("{head}{long}\r\n--b\r\n\r\nx\r\n--b--\r\n"));
        let text = e.reply_text();
        assert!(
            text.ends_with(
                "encode the part as quoted-printable or base64, or wrap lines below 998 characters"
            ),
            "{text}"
        );
        assert!(
            text.contains("in the preamble of the message body (multipart/mixed)"),
            "{text}"
        );
    }

    #[test]
    fn the_first_unfixable_line_is_named() {
        let long = "z".repeat(1200);
        let m = format!(
            "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n\
             --b\r\n\r\n{long}\r\n--b\r\nContent-Type: message/rfc822\r\n\r\n\r\n{long}\r\n--b--\r\n{long}\r\n"
        );
        let e = refusal(&m);
        assert_eq!((e.line, e.reason), (11, Unfixable::AttachedMessage));
    }

    #[test]
    fn nesting_is_followed_and_capped() {
        fn nested(levels: usize, leaf: &str) -> String {
            let mut m = leaf.to_string();
            for i in (0..levels).rev() {
                m = format!(
                    "Content-Type: multipart/mixed; boundary=\"b{i}\"\r\n\r\n--b{i}\r\n{m}\r\n--b{i}--"
                );
            }
            format!("MIME-Version: 1.0\r\n{m}\r\n")
        }
        let leaf = format!("Content-Type: text/plain\r\n\r\n{}", "w".repeat(1500));
        let out = fixed(nested(10, &leaf).as_bytes());
        assert_sound(&out);
        assert_eq!(decoded(&out), decoded(nested(10, &leaf).as_bytes()));
        let e = refusal(&nested(MAX_DEPTH + 1, &leaf));
        assert_eq!(e.reason, Unfixable::TooDeep);
        // Section numbers name nested parts.
        let e = refusal(&nested(
            3,
            &format!(
                "Content-Type: message/rfc822\r\n\r\n\r\n{}",
                "w".repeat(1500)
            ),
        ));
        assert_eq!(e.part, "part 1.1.1 (message/rfc822)");
    }

    #[test]
    fn hostile_sizes_stay_linear() {
        // One 8 MiB line, and 100,000 parts with the long line in the last.
        let m = format!("Subject: x\r\n\r\n{}\r\n", "a=b ".repeat(2 << 20));
        let started = std::time::Instant::now();
        let out = fixed(m.as_bytes());
        assert_sound(&out);
        let one_line = started.elapsed();

        let mut m =
            String::from("MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n");
        for i in 0..100_000 {
            m += &format!("--b\r\nContent-Type: text/plain\r\n\r\npart {i}\r\n");
        }
        m += &format!("--b\r\n\r\n{}\r\n--b--\r\n", "x".repeat(2000));
        let started = std::time::Instant::now();
        let out = fixed(m.as_bytes());
        assert!(out.ends_with(b"\r\n--b--\r\n"));
        let many_parts = started.elapsed();
        // Generous bounds for unoptimised builds on a shared machine.
        assert!(
            one_line.as_secs() < 20 && many_parts.as_secs() < 20,
            "{one_line:?} {many_parts:?}"
        );

        // Every part long: each is re-encoded, none read twice.
        let mut m =
            String::from("MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n");
        for _ in 0..2_000 {
            m += &format!("--b\r\n\r\n{}\r\n", "x".repeat(1000));
        }
        m += "--b--\r\n";
        let out = fixed(m.as_bytes());
        assert_eq!(
            count(&out, b"Content-Transfer-Encoding: quoted-printable"),
            2_000
        );
    }

    #[test]
    fn quoted_printable_encoding_rules() {
        let mut out = Vec::new();
        encode_qp(b"a=b \r\n\t\r\nend ", true, &mut out);
        assert_eq!(out, b"a=3Db=20\r\n=09\r\nend=20");
        let mut out = Vec::new();
        encode_qp(b"a\r\nb", false, &mut out);
        assert_eq!(out, b"a=0D=0Ab");
        // A soft break never leaves "--" at the start of a line.
        let mut out = Vec::new();
        encode_qp(
            format!("{}--boundary--", "a".repeat(75)).as_bytes(),
            true,
            &mut out,
        );
        assert_eq!(
            out,
            format!("{}=\r\n=2D-boundary--", "a".repeat(75)).as_bytes()
        );
        // A hard line that starts with "--" keeps it.
        let mut out = Vec::new();
        encode_qp(b"--sig\r\n", true, &mut out);
        assert_eq!(out, b"--sig\r\n");
    }

    mod prop_tests {
        use super::*;
        use proptest::prelude::*;

        const FRAGMENTS: &[&str] = &[
            "a",
            "Straße",
            "ü",
            "€",
            "📎",
            " ",
            "\t",
            "=",
            "==",
            "=3D",
            ".",
            "-",
            "--",
            "--b",
            "\r\n",
            "\r\n\r\n",
            "\r\n.",
            "\r\n ",
            ":",
            "Subject: ",
            "--b\r\n",
            "--b--\r\n",
            "Content-Type: multipart/mixed; boundary=b\r\n",
            "Content-Transfer-Encoding: base64\r\n",
            "Content-Transfer-Encoding: quoted-printable\r\n",
            "Content-Type: message/rfc822\r\n",
            "QUJD",
            "\n",
            "\r",
        ];

        /// Text biased to what matters here: '=', blanks, CRLF, dots,
        /// non-ASCII UTF-8 and long runs.
        fn body_text() -> impl Strategy<Value = String> {
            prop::collection::vec(
                prop_oneof![
                    6 => prop::sample::select(vec!["a", "=", " ", "\t", "\r\n", ".", "-", "--", "ü", "ß", "€", "📎", "=\r\n", " \r\n"]).prop_map(str::to_string),
                    2 => (1usize..400, prop::sample::select(vec!["x", " ", "=", "ä", "\t"])).prop_map(|(n, s)| s.repeat(n)),
                ],
                0..60,
            )
            .prop_map(|v| v.concat())
        }

        /// Bytes of any value, CR and LF only as CRLF.
        fn body_bytes() -> impl Strategy<Value = Vec<u8>> {
            prop::collection::vec(
                prop_oneof![
                    4 => any::<u8>().prop_map(|b| if b == b'\r' || b == b'\n' { vec![b'\r', b'\n'] } else { vec![b] }),
                    1 => (1usize..1500, any::<u8>()).prop_map(|(n, b)| vec![if b == b'\r' || b == b'\n' { b'x' } else { b }; n]),
                    1 => Just(b"\r\n".to_vec()),
                ],
                0..80,
            )
            .prop_map(|v| v.concat())
        }

        fn junk() -> impl Strategy<Value = Vec<u8>> {
            prop::collection::vec(
                prop_oneof![
                    4 => (0..FRAGMENTS.len()).prop_map(|i| FRAGMENTS[i].as_bytes().to_vec()),
                    2 => (1usize..1200, any::<u8>()).prop_map(|(n, b)| vec![b; n]),
                    1 => prop::collection::vec(any::<u8>(), 0..16),
                ],
                0..40,
            )
            .prop_map(|v| v.concat())
        }

        #[derive(Clone, Debug)]
        enum Tree {
            /// Media type, Content-Transfer-Encoding field (or none), body.
            Leaf(&'static str, Option<&'static str>, Vec<u8>),
            Multipart(&'static str, Vec<Tree>),
        }

        /// A leaf as an app might write it, long lines or not.
        fn leaf() -> impl Strategy<Value = Tree> {
            prop_oneof![
                body_text().prop_map(|t| Tree::Leaf(
                    "text/plain; charset=utf-8",
                    None,
                    t.into_bytes()
                )),
                body_text().prop_map(|t| Tree::Leaf(
                    "text/html; charset=utf-8",
                    Some("8bit"),
                    t.into_bytes()
                )),
                body_bytes().prop_map(|b| Tree::Leaf(
                    "application/octet-stream",
                    Some("binary"),
                    b
                )),
                (prop::collection::vec(any::<u8>(), 0..2000), any::<bool>()).prop_map(
                    |(b, wrap)| {
                        let b64 = BASE64.encode(b);
                        let b64 = if wrap { wrapped_base64_of(&b64) } else { b64 };
                        Tree::Leaf("image/png", Some("base64"), b64.into_bytes())
                    }
                ),
                body_text().prop_map(|t| {
                    let mut qp = Vec::new();
                    encode_qp(t.as_bytes(), true, &mut qp);
                    let long = String::from_utf8(qp).unwrap().replace("=\r\n", "");
                    Tree::Leaf(
                        "text/plain; charset=utf-8",
                        Some("quoted-printable"),
                        long.into_bytes(),
                    )
                }),
            ]
        }

        fn wrapped_base64_of(b64: &str) -> String {
            b64.as_bytes()
                .chunks(76)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect::<Vec<_>>()
                .join("\r\n")
        }

        fn tree() -> impl Strategy<Value = Tree> {
            leaf().prop_recursive(4, 24, 5, |inner| {
                (
                    prop::sample::select(vec!["mixed", "alternative", "related"]),
                    prop::collection::vec(inner, 1..5),
                )
                    .prop_map(|(sub, children)| Tree::Multipart(sub, children))
            })
        }

        /// Writes a part (header and body); every leaf's text goes to `leaves`.
        fn render(t: &Tree, depth: usize, out: &mut Vec<u8>, leaves: &mut Vec<Vec<u8>>) {
            match t {
                Tree::Leaf(ct, cte, body) => {
                    let mut part = format!("Content-Type: {ct}\r\n").into_bytes();
                    if let Some(cte) = cte {
                        part.extend_from_slice(
                            format!("Content-Transfer-Encoding: {cte}\r\n").as_bytes(),
                        );
                    }
                    part.extend_from_slice(b"\r\n");
                    part.extend_from_slice(body);
                    out.extend_from_slice(&part);
                    leaves.push(part);
                }
                Tree::Multipart(sub, children) => {
                    let b = format!("=_lvl{depth}_QZX");
                    out.extend_from_slice(
                        format!("Content-Type: multipart/{sub}; boundary=\"{b}\"\r\n\r\n")
                            .as_bytes(),
                    );
                    for c in children {
                        out.extend_from_slice(format!("--{b}\r\n").as_bytes());
                        render(c, depth + 1, out, leaves);
                        out.extend_from_slice(b"\r\n");
                    }
                    out.extend_from_slice(format!("--{b}--").as_bytes());
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

            #[test]
            fn any_mime_tree_is_fixed_and_decodes_as_before(t in tree()) {
                let mut m = b"From: a@b.example\r\nMIME-Version: 1.0\r\n".to_vec();
                let mut leaves = Vec::new();
                render(&t, 0, &mut m, &mut leaves);
                m.extend_from_slice(b"\r\n");
                let out = match fix_long_lines(&m) {
                    Ok(None) => {
                        prop_assert_eq!(next_long_line(&m, 0), None);
                        return Ok(());
                    }
                    Ok(Some(out)) => out,
                    Err(e) => return Err(TestCaseError::fail(format!("{e}"))),
                };
                prop_assert_eq!(next_long_line(&out, 0), None);
                prop_assert_eq!(crate::receive::message::find_bare_line_end(&out), None);
                prop_assert_eq!(decoded(&out), decoded(&m));
                // A part without long lines is there byte for byte.
                for part in leaves.iter().filter(|p| next_long_line(p, 0).is_none()) {
                    prop_assert!(out.windows(part.len().max(1)).any(|w| w == &part[..]) || part.is_empty());
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

            #[test]
            fn never_panics_and_never_leaves_a_long_line(bytes in junk(), fixture in 0..FIXTURES.len(), at in any::<prop::sample::Index>()) {
                if let Ok(Some(out)) = fix_long_lines(&bytes) {
                    prop_assert_eq!(next_long_line(&out, 0), None);
                }
                let mut m = FIXTURES[fixture].1.to_vec();
                let at = at.index(m.len() + 1);
                m.splice(at..at, bytes);
                if let Ok(Some(out)) = fix_long_lines(&m) {
                    prop_assert_eq!(next_long_line(&out, 0), None);
                }
            }

            #[test]
            fn qp_decodes_to_the_original(text in body_text(), bytes in body_bytes(), is_text in any::<bool>()) {
                for input in [text.as_bytes(), &bytes] {
                    let mut out = Vec::new();
                    encode_qp(input, is_text, &mut out);
                    prop_assert_eq!(qp_decode(&out), input);
                    prop_assert_eq!(crate::receive::message::find_bare_line_end(&out), None);
                    for line in out.split(|&b| b == b'\n') {
                        let line = line.strip_suffix(b"\r").unwrap_or(line);
                        prop_assert!(line.len() <= 76);
                        prop_assert!(!line.ends_with(b" ") && !line.ends_with(b"\t"));
                    }
                }
            }

            #[test]
            fn folding_unfolds_to_the_original(words in prop::collection::vec("[a-zA-Zäß=.;<>@]{0,120}", 1..60), blanks in prop::collection::vec(prop::sample::select(vec![" ", "\t", "  ", " \t "]), 60)) {
                let mut value = String::new();
                for (w, b) in words.iter().zip(&blanks) {
                    value += b;
                    value += w;
                }
                let line = format!("X-List:{value}");
                if let Some(folded) = fold(line.as_bytes(), 7) {
                    let s = String::from_utf8(folded).unwrap();
                    prop_assert_eq!(s.replace("\r\n", ""), line.clone());
                    for l in s.split("\r\n") {
                        prop_assert!(l.len() <= MAX_LINE);
                        prop_assert!(l.bytes().any(|b| !is_wsp(b)), "a blank line");
                    }
                }
                if line.len() > MAX_LINE && words.iter().all(|w| w.len() < 400) {
                    prop_assert!(fold(line.as_bytes(), 7).is_some());
                }
            }

            #[test]
            fn every_part_decodes_as_before(
                html in body_text(),
                data in body_bytes(),
                b64 in prop::collection::vec(any::<u8>(), 0..3000),
                qp in body_text(),
                subject in prop::collection::vec("[a-zA-Zäß]{1,40}", 1..80),
            ) {
                let subject = subject.join(" ");
                let mut qp_encoded = Vec::new();
                encode_qp(qp.as_bytes(), true, &mut qp_encoded);
                // Invalid quoted-printable as some generators write it: no soft breaks.
                let qp_long = String::from_utf8(qp_encoded).unwrap().replace("=\r\n", "");
                let mut m = format!(
                    "From: a@b.example\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\n\
                     Content-Type: multipart/mixed; boundary=\"BNDRY_42\"\r\n\r\n\
                     --BNDRY_42\r\nContent-Type: text/html; charset=utf-8\r\n\r\n{html}\r\n\
                     --BNDRY_42\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n{qp_long}\r\n\
                     --BNDRY_42\r\nContent-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\n{}\r\n\
                     --BNDRY_42\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: 8bit\r\n\r\n",
                    BASE64.encode(&b64)
                ).into_bytes();
                m.extend_from_slice(&data);
                m.extend_from_slice(b"\r\n--BNDRY_42--\r\n");
                let out = match fix_long_lines(&m) {
                    Ok(None) => {
                        prop_assert_eq!(next_long_line(&m, 0), None);
                        return Ok(());
                    }
                    Ok(Some(out)) => out,
                    Err(e) => return Err(TestCaseError::fail(format!("{e}"))),
                };
                prop_assert_eq!(next_long_line(&out, 0), None);
                prop_assert_eq!(crate::receive::message::find_bare_line_end(&out), None);
                let before = decoded(&m);
                let after = decoded(&out);
                prop_assert_eq!(before.len(), 4);
                prop_assert_eq!(&after, &before);
                prop_assert_eq!(&after[1].1, qp.as_bytes());
                prop_assert_eq!(&after[2].1, &b64);
                prop_assert_eq!(&after[3].1, &data);
                let parsed = MessageParser::new().parse(&out).unwrap();
                prop_assert_eq!(parsed.subject(), Some(subject.as_str()));
            }
        }
    }
}
