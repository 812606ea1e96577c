//! SMTP replies as data: a basic code, an enhanced status code (RFC 3463) and
//! a human sentence, kept apart so that severity is derived from the code and
//! the wire form is produced in one place (RFC 5321 §4.2).

use std::fmt;

use serde::{Deserialize, Serialize};

/// An enhanced status code `class.subject.detail` (RFC 3463).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Enhanced(pub u8, pub u16, pub u16);

impl fmt::Display for Enhanced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

impl Enhanced {
    /// Parses `"5.1.1"`; `None` for anything else.
    pub fn parse(s: &str) -> Option<Enhanced> {
        let mut parts = s.split('.');
        let class: u8 = parts.next()?.parse().ok()?;
        let subject: u16 = parts.next()?.parse().ok()?;
        let detail: u16 = parts.next()?.parse().ok()?;
        if parts.next().is_some() || !matches!(class, 2 | 4 | 5) || subject > 999 || detail > 999 {
            return None;
        }
        Some(Enhanced(class, subject, detail))
    }
}

impl Serialize for Enhanced {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Enhanced {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Enhanced::parse(&s).ok_or_else(|| serde::de::Error::custom("invalid enhanced status code"))
    }
}

/// One SMTP reply, ours or a remote server's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub code: u16,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub enhanced: Option<Enhanced>,
    /// The text without code and enhanced code; several lines joined by '\n'.
    pub text: String,
}

/// How bad a reply is, from its first digit (RFC 5321 §4.2.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Positive,
    Intermediate,
    Transient,
    Permanent,
}

impl Reply {
    pub fn new(code: u16, enhanced: Enhanced, text: impl Into<String>) -> Reply {
        Reply {
            code,
            enhanced: Some(enhanced),
            text: text.into(),
        }
    }

    /// A reply read off the wire: splits a leading enhanced code from the text
    /// when the server put one there.
    pub fn from_wire(code: u16, text: &str) -> Reply {
        let (enhanced, rest) = match text.split_once(' ') {
            Some((first, rest)) => match Enhanced::parse(first) {
                Some(e) => (Some(e), rest),
                None => (None, text),
            },
            None => match Enhanced::parse(text) {
                Some(e) => (Some(e), ""),
                None => (None, text),
            },
        };
        Reply {
            code,
            enhanced,
            text: rest.to_string(),
        }
    }

    pub fn severity(&self) -> Severity {
        match self.code / 100 {
            2 => Severity::Positive,
            3 => Severity::Intermediate,
            4 => Severity::Transient,
            _ => Severity::Permanent,
        }
    }

    pub fn is_positive(&self) -> bool {
        self.severity() == Severity::Positive
    }

    pub fn is_transient(&self) -> bool {
        self.severity() == Severity::Transient
    }

    pub fn is_permanent(&self) -> bool {
        self.severity() == Severity::Permanent
    }

    /// The enhanced code, or the generic one its basic code implies.
    pub fn enhanced_or_default(&self) -> Enhanced {
        self.enhanced.unwrap_or(match self.severity() {
            Severity::Positive | Severity::Intermediate => Enhanced(2, 0, 0),
            Severity::Transient => Enhanced(4, 0, 0),
            Severity::Permanent => Enhanced(5, 0, 0),
        })
    }

    /// Appends the wire form: every line gets the code, continuation lines
    /// use '-', and the enhanced code is repeated on each line (RFC 2034 §4).
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let mut lines = self.text.split('\n').peekable();
        loop {
            let line = lines.next().unwrap_or("");
            let last = lines.peek().is_none();
            out.extend_from_slice(self.code.to_string().as_bytes());
            out.push(if last { b' ' } else { b'-' });
            if let Some(e) = self.enhanced {
                out.extend_from_slice(e.to_string().as_bytes());
                if !line.is_empty() {
                    out.push(b' ');
                }
            }
            // Never let a stray CR or LF from a remote text split our reply.
            out.extend(line.bytes().filter(|b| *b != b'\r' && *b != b'\n'));
            out.extend_from_slice(b"\r\n");
            if last {
                break;
            }
        }
    }

    pub fn to_wire(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.text.len() + 16);
        self.write_to(&mut v);
        v
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.enhanced {
            Some(e) => write!(f, "{} {} {}", self.code, e, self.text.replace('\n', " ")),
            None => write!(f, "{} {}", self.code, self.text.replace('\n', " ")),
        }
    }
}

/// Replies herald sends often, named so the session code reads like the RFC.
pub mod codes {
    use super::{Enhanced, Reply};

    pub fn ok() -> Reply {
        Reply::new(250, Enhanced(2, 0, 0), "Ok")
    }
    pub fn sender_ok() -> Reply {
        Reply::new(250, Enhanced(2, 1, 0), "Sender ok")
    }
    pub fn recipient_ok() -> Reply {
        Reply::new(250, Enhanced(2, 1, 5), "Recipient ok")
    }
    pub fn reset_ok() -> Reply {
        Reply::new(250, Enhanced(2, 0, 0), "Reset ok")
    }
    pub fn bye() -> Reply {
        Reply::new(221, Enhanced(2, 0, 0), "Bye")
    }
    pub fn start_data() -> Reply {
        Reply {
            code: 354,
            enhanced: None,
            text: "End data with <CR><LF>.<CR><LF>".into(),
        }
    }
    pub fn ready_tls() -> Reply {
        Reply::new(220, Enhanced(2, 0, 0), "Ready to start TLS")
    }
    pub fn auth_ok() -> Reply {
        Reply::new(235, Enhanced(2, 7, 0), "Authentication successful")
    }
    pub fn bad_sequence(text: &str) -> Reply {
        Reply::new(503, Enhanced(5, 5, 1), text)
    }
    pub fn syntax(text: &str) -> Reply {
        Reply::new(501, Enhanced(5, 5, 4), text)
    }
    pub fn unknown_command() -> Reply {
        Reply::new(500, Enhanced(5, 5, 2), "Command not recognized")
    }
    pub fn line_too_long() -> Reply {
        Reply::new(500, Enhanced(5, 5, 6), "Line too long")
    }
    pub fn not_implemented(text: &str) -> Reply {
        Reply::new(502, Enhanced(5, 5, 1), text)
    }
    pub fn auth_required() -> Reply {
        Reply::new(530, Enhanced(5, 7, 0), "Authentication required")
    }
    pub fn tls_required() -> Reply {
        Reply::new(
            530,
            Enhanced(5, 7, 0),
            "Must issue a STARTTLS command first: authentication is only allowed over TLS",
        )
    }
    pub fn local_error() -> Reply {
        Reply::new(
            451,
            Enhanced(4, 3, 0),
            "Local error in processing, try again later",
        )
    }
    /// Memory or disk for the message is short for now (RFC 3463 4.3.1).
    pub fn insufficient_storage(text: &str) -> Reply {
        Reply::new(452, Enhanced(4, 3, 1), text)
    }
    pub fn shutting_down() -> Reply {
        Reply::new(
            421,
            Enhanced(4, 3, 2),
            "Service shutting down, try again later",
        )
    }
    pub fn timeout() -> Reply {
        Reply::new(
            421,
            Enhanced(4, 4, 2),
            "Timeout exceeded, closing connection",
        )
    }
    pub fn too_many_errors() -> Reply {
        Reply::new(
            421,
            Enhanced(4, 7, 0),
            "Too many errors, closing connection",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_repeats_code_and_enhanced_on_every_line() {
        let r = Reply::new(550, Enhanced(5, 1, 1), "no such user\nreally");
        assert_eq!(
            String::from_utf8(r.to_wire()).unwrap(),
            "550-5.1.1 no such user\r\n550 5.1.1 really\r\n"
        );
    }

    #[test]
    fn wire_form_strips_embedded_cr() {
        let r = Reply::new(451, Enhanced(4, 0, 0), "a\rb");
        assert_eq!(r.to_wire(), b"451 4.0.0 ab\r\n");
    }

    #[test]
    fn parses_enhanced_code_from_remote_text() {
        let r = Reply::from_wire(550, "5.1.1 <x@y>: Recipient address rejected");
        assert_eq!(r.enhanced, Some(Enhanced(5, 1, 1)));
        assert_eq!(r.text, "<x@y>: Recipient address rejected");
        let r = Reply::from_wire(421, "mx.example closing");
        assert_eq!(r.enhanced, None);
        assert!(r.is_transient());
        assert_eq!(r.enhanced_or_default(), Enhanced(4, 0, 0));
    }

    #[test]
    fn rejects_malformed_enhanced_codes() {
        assert_eq!(Enhanced::parse("3.1.1"), None);
        assert_eq!(Enhanced::parse("5.1"), None);
        assert_eq!(Enhanced::parse("5.1.1.1"), None);
        assert_eq!(Enhanced::parse("5.x.1"), None);
    }
}
