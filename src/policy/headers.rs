//! A message's header block, read once: what the policy checks, spam
//! scoring and DKIM key selection need of it.

use mail_parser::{MessageParser, MimeHeaders as _};

/// The header block as the policy stage sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderView {
    /// The addresses of the first From: field (RFC 5322 allows a list), in
    /// order; the first is the one DMARC judges.
    pub from: Vec<String>,
    /// The top-level content type is `text/*` (or absent, which means
    /// `text/plain`): the message has no MIME structure to walk.
    pub text_only: bool,
}

impl HeaderView {
    /// Reads the header block of `message` (header and body, or the header
    /// alone).
    pub fn read(message: &[u8]) -> HeaderView {
        let Some(parsed) = MessageParser::new().parse_headers(message) else {
            // Nothing to go by: the whole message is looked at.
            return HeaderView {
                from: Vec::new(),
                text_only: false,
            };
        };
        HeaderView {
            from: parsed
                .from()
                .map(|a| {
                    a.iter()
                        .filter_map(|a| a.address())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default(),
            text_only: parsed
                .content_type()
                .is_none_or(|ct| ct.ctype().eq_ignore_ascii_case("text")),
        }
    }

    /// The From: address DMARC judges and DKIM signs for.
    pub fn from_address(&self) -> Option<&str> {
        self.from.first().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_from_and_the_content_type_once() {
        let v = HeaderView::read(
            "From: Grünbäume GmbH <billing@grünbäume.example>, b@x.example\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\nFrom: not@this.example\r\n"
                .as_bytes(),
        );
        assert_eq!(v.from, ["billing@grünbäume.example", "b@x.example"]);
        assert_eq!(v.from_address(), Some("billing@grünbäume.example"));
        assert!(!v.text_only);
        let v = HeaderView::read(b"Subject: x\r\n\r\nbody\r\n");
        assert!(v.from.is_empty() && v.text_only);
    }
}
