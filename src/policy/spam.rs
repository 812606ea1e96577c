//! Outbound spam heuristics: named, weighted rules over a message's
//! headers, structure and content. A score at or over the threshold is
//! refused (550 5.7.1) with the rules that fired; below it, the score goes
//! into the `received` event.
//!
//! Input: the whole message as it will be queued, from an authenticated
//! tenant; it is still untrusted bytes. The message is parsed once with
//! mail-parser; HTML and text are read by small byte scanners (no regex)
//! that look at no more than [`SCAN_BUDGET`] bytes of body text, so a huge
//! message costs the I/O path a bounded amount of work. ZIP attachments are
//! opened only as far as their central directory (file names), see
//! [`zip_names`].
//!
//! The rules are deliberately conservative: each is a hint, and only a sum
//! of hints reaches the threshold. A plain invoice (text + HTML + PDF)
//! fires none of them.

use mail_parser::{
    Address, HeaderName, HeaderValue, Message, MessageParser, MimeHeaders, PartType,
};

use super::headers::HeaderView;
use crate::config::spam::RULES;
pub use crate::config::spam::SpamConfig;

/// Body text (text and HTML parts together) scanned per message; the rest
/// of a larger body is not looked at.
pub const SCAN_BUDGET: usize = 512 * 1024;

/// Body text scanned per text or HTML part: SpamAssassin's
/// `body_part_scan_size` default (50,000 bytes). Spam puts its links and
/// tricks early; scanning the whole of a long part costs every message
/// (a 100 KiB part took 2.5x the parse) for hardly any more catches.
pub const PART_SCAN_SIZE: usize = 50_000;

/// Most URL domains reported in [`SpamReport::url_domains`].
pub const MAX_URL_DOMAINS: usize = 50;

/// Most file names read from one ZIP central directory.
const MAX_ZIP_NAMES: usize = 1000;

/// Hidden HTML text fires only with at least this many words: a short
/// e-mail "preheader" (a hidden one-line summary many templates carry) is
/// not spam; keyword stuffing and hash busters are much longer.
const HIDDEN_MIN_WORDS: usize = 15;

/// Subject in capitals: at least this many letters, and this share upper case.
const CAPS_MIN_LETTERS: usize = 10;
const CAPS_MIN_SHARE: f64 = 0.8;

/// Nesting of message/rfc822 parts followed for attachments.
const MAX_NESTING: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rule {
    DateMalformed,
    MessageIdMalformed,
    FromMalformed,
    DisplayNameDomain,
    SubjectCaps,
    SubjectPunctuation,
    HtmlOnly,
    LinkMismatch,
    IpUrl,
    UrlShortener,
    ExecutableAttachment,
    MacroAttachment,
    ArchiveExecutable,
    HiddenText,
    TooManyRecipients,
}

impl Rule {
    fn name(self) -> &'static str {
        RULES[self as usize].0
    }
}

/// One rule that fired.
#[derive(Clone, Debug, PartialEq)]
pub struct FiredRule {
    pub name: &'static str,
    pub weight: f64,
    /// What in the message made it fire, for the log and the reply.
    pub detail: String,
}

/// The outcome of scoring one message.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SpamReport {
    pub score: f64,
    pub fired: Vec<FiredRule>,
    /// Domains of the URLs in the body (lower case, deduplicated, at most
    /// [`MAX_URL_DOMAINS`], IP literals left out), for the domain blocklists.
    pub url_domains: Vec<String>,
}

impl SpamReport {
    /// The rules that fired with their weights, for a reply or a log line:
    /// `link_mismatch (3), url_shortener (1.5)`.
    pub fn rules_summary(&self) -> String {
        let mut s = String::new();
        for (i, r) in self.fired.iter().enumerate() {
            if i > 0 {
                s.push_str(", ");
            }
            s.push_str(&format!("{} ({})", r.name, r.weight));
        }
        s
    }

    /// Whether the rule named `rule` fired.
    pub fn has_fired(&self, rule: &str) -> bool {
        self.fired.iter().any(|r| r.name == rule)
    }
}

/// The rules, compiled once from config.
#[derive(Clone, Debug)]
pub struct SpamRules {
    enabled: bool,
    threshold: f64,
    weights: [f64; RULES.len()],
    max_header_recipients: usize,
    shorteners: Vec<String>,
}

impl SpamRules {
    /// Expects a config that passed [`validate`]; unknown weight names are
    /// ignored here.
    pub fn new(cfg: &SpamConfig) -> SpamRules {
        let mut weights = [0.0; RULES.len()];
        for (w, (name, default)) in weights.iter_mut().zip(RULES.iter()) {
            *w = cfg.weights.get(*name).copied().unwrap_or(*default);
        }
        SpamRules {
            enabled: cfg.enabled,
            threshold: cfg.threshold,
            weights,
            max_header_recipients: cfg.max_header_recipients,
            shorteners: cfg
                .shorteners
                .iter()
                .map(|s| s.trim_end_matches('.').to_ascii_lowercase())
                .collect(),
        }
    }

    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn on(&self, rule: Rule) -> bool {
        self.weights[rule as usize] > 0.0
    }

    /// Scores a whole message (header and body, as it will be queued).
    /// Rules with weight 0 are not evaluated; `url_domains` is always filled.
    pub fn score(&self, message: &[u8]) -> SpamReport {
        self.score_with(message, &HeaderView::read(message))
    }

    /// [`SpamRules::score`] with the header block already read.
    pub fn score_with(&self, message: &[u8], headers: &HeaderView) -> SpamReport {
        let mut sc = Scorer {
            rules: self,
            report: SpamReport::default(),
        };
        let Some(msg) = MessageParser::new().parse(parse_window(message, headers)) else {
            sc.fire(Rule::FromMalformed, || {
                "the message could not be parsed".into()
            });
            return sc.report;
        };
        sc.headers(&msg);
        sc.bodies(&msg);
        sc.attachments(&msg, 0);
        // Report order is table order, whatever order the checks ran in.
        sc.report
            .fired
            .sort_by_key(|f| RULES.iter().position(|(n, _)| *n == f.name));
        sc.report
    }
}

/// What of `message` is parsed: all of it, except for a text message
/// without MIME structure, whose body past [`PART_SCAN_SIZE`] is never
/// looked at — mail-parser would still decode all of it (half the cost of
/// scoring a long plain-text message). Cut after a line end, so that no
/// encoded word or base64 quantum is split.
fn parse_window<'m>(message: &'m [u8], headers: &HeaderView) -> &'m [u8] {
    if message.len() <= PART_SCAN_SIZE * 2 {
        return message;
    }
    let text = headers.text_only;
    // The header ends at the first empty line.
    let Some(body) = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
    else {
        return message;
    };
    if !text {
        return message;
    }
    let end = (body + PART_SCAN_SIZE).min(message.len());
    match message[body..end].iter().rposition(|&b| b == b'\n') {
        Some(i) => &message[..=body + i],
        None => &message[..end],
    }
}

/// URL host names in the text and HTML parts of a message (lower case,
/// deduplicated, at most [`MAX_URL_DOMAINS`]), without scoring it.
pub fn url_domains(message: &[u8]) -> Vec<String> {
    url_domains_with(message, &HeaderView::read(message))
}

/// [`url_domains`] with the header block already read.
pub fn url_domains_with(message: &[u8], headers: &HeaderView) -> Vec<String> {
    match MessageParser::new().parse(parse_window(message, headers)) {
        Some(msg) => scan_bodies(&msg, &[]).0.domains,
        None => Vec::new(),
    }
}

/// Reads the text and HTML parts of a message: [`PART_SCAN_SIZE`] bytes of
/// each, [`SCAN_BUDGET`] bytes at most in all.
fn scan_bodies<'r>(msg: &Message<'_>, shorteners: &'r [String]) -> (Urls<'r>, HtmlFindings) {
    let mut urls = Urls::new(shorteners);
    let mut html = HtmlFindings::default();
    let mut budget = SCAN_BUDGET;
    for part in &msg.parts {
        let (text, is_html) = match &part.body {
            PartType::Text(t) => (t.as_bytes(), false),
            PartType::Html(t) => (t.as_bytes(), true),
            _ => continue,
        };
        if budget == 0 {
            break;
        }
        let text = take_budget(&text[..text.len().min(PART_SCAN_SIZE)], &mut budget);
        scan_bare_urls(text, &mut urls);
        if is_html {
            html.merge(scan_html(text, &mut urls));
        }
    }
    (urls, html)
}

struct Scorer<'r> {
    rules: &'r SpamRules,
    report: SpamReport,
}

impl Scorer<'_> {
    fn fire(&mut self, rule: Rule, detail: impl FnOnce() -> String) {
        let weight = self.rules.weights[rule as usize];
        if weight > 0.0 && !self.report.has_fired(rule.name()) {
            self.report.score += weight;
            self.report.fired.push(FiredRule {
                name: rule.name(),
                weight,
                detail: detail(),
            });
        }
    }

    fn headers(&mut self, msg: &Message<'_>) {
        let rules = self.rules;
        if rules.on(Rule::DateMalformed) {
            match msg.header(HeaderName::Date) {
                None => self.fire(Rule::DateMalformed, || "no Date: field".into()),
                Some(HeaderValue::DateTime(d)) if d.is_valid() => {}
                Some(_) => self.fire(Rule::DateMalformed, || {
                    let raw = msg.header_raw(HeaderName::Date).unwrap_or("");
                    format!("Date: {:?} is not an RFC 5322 date", clip(raw.trim(), 60))
                }),
            }
        }
        if rules.on(Rule::MessageIdMalformed) {
            match msg.header_raw(HeaderName::MessageId) {
                None => self.fire(Rule::MessageIdMalformed, || "no Message-ID: field".into()),
                Some(raw) if !msg_id_ok(raw) => self.fire(Rule::MessageIdMalformed, || {
                    format!("Message-ID: {:?} is not <left@right>", clip(raw.trim(), 60))
                }),
                Some(_) => {}
            }
        }
        let from_fields = msg
            .headers()
            .iter()
            .filter(|h| h.name == HeaderName::From)
            .count();
        let from = msg.from();
        let from_addr = from.and_then(single_mailbox);
        if rules.on(Rule::FromMalformed) {
            let problem = if from_fields == 0 {
                Some("no From: field".to_string())
            } else if from_fields > 1 {
                Some(format!("{from_fields} From: fields"))
            } else {
                match from_addr {
                    None => Some("From: holds no single mailbox".to_string()),
                    Some((_, addr)) if !mailbox_ok(addr) => {
                        Some(format!("From: address {:?} is malformed", clip(addr, 80)))
                    }
                    Some(_) => None,
                }
            };
            if let Some(p) = problem {
                self.fire(Rule::FromMalformed, || p);
            }
        }
        if rules.on(Rule::DisplayNameDomain)
            && let Some((Some(name), addr)) = from_addr
            && let Some((_, addr_domain)) = addr.rsplit_once('@')
            && let Some(shown) = foreign_domain_in(name, addr_domain)
        {
            self.fire(Rule::DisplayNameDomain, || {
                format!("display name shows {shown}, address is {}", clip(addr, 80))
            });
        }
        if let Some(subject) = msg.subject() {
            if rules.on(Rule::SubjectCaps) && mostly_capitals(subject) {
                self.fire(Rule::SubjectCaps, || {
                    format!("subject {:?} is mostly capitals", clip(subject, 60))
                });
            }
            if rules.on(Rule::SubjectPunctuation) && repeated_marks(subject) {
                self.fire(Rule::SubjectPunctuation, || {
                    format!("subject {:?} repeats ! or ?", clip(subject, 60))
                });
            }
        }
        if rules.on(Rule::TooManyRecipients) {
            let n: usize = msg
                .all_to()
                .chain(msg.all_cc())
                .map(|a| a.iter().count())
                .sum();
            if n > rules.max_header_recipients {
                let max = rules.max_header_recipients;
                self.fire(Rule::TooManyRecipients, || {
                    format!("{n} addresses in To: and Cc: (at most {max})")
                });
            }
        }
    }

    fn bodies(&mut self, msg: &Message<'_>) {
        let is = |id: &u32, html: bool| {
            msg.parts.get(*id as usize).is_some_and(|p| match &p.body {
                PartType::Html(_) => html,
                PartType::Text(t) => !html && !t.trim().is_empty(),
                _ => false,
            })
        };
        // mail-parser lists an HTML-only message's HTML part among the text
        // bodies too (and a text-only one's text among the HTML bodies), so
        // look at what the parts really are.
        let has_html = msg.html_body.iter().any(|id| is(id, true));
        let has_text = msg.text_body.iter().any(|id| is(id, false));
        if has_html && !has_text {
            self.fire(Rule::HtmlOnly, || {
                "HTML body without a text/plain alternative".into()
            });
        }

        let (mut urls, mut html) = scan_bodies(msg, &self.rules.shorteners);
        if let Some(host) = urls.ip.take() {
            self.fire(Rule::IpUrl, || format!("URL to the IP address {host}"));
        }
        if let Some(host) = urls.shortener.take() {
            self.fire(Rule::UrlShortener, || format!("URL shortener {host}"));
        }
        if let Some((shown, target)) = html.mismatch.take() {
            let n = html.mismatches;
            self.fire(Rule::LinkMismatch, || {
                let more = if n > 1 {
                    format!(" ({n} such links)")
                } else {
                    String::new()
                };
                format!("link text shows {shown} but goes to {target}{more}")
            });
        }
        if html.hidden_words >= HIDDEN_MIN_WORDS {
            let (n, how) = (html.hidden_words, html.hidden_how.unwrap_or("hidden"));
            self.fire(Rule::HiddenText, || {
                format!("{n} words of hidden HTML text ({how})")
            });
        }
        self.report.url_domains = urls.domains;
    }

    fn attachments(&mut self, msg: &Message<'_>, depth: usize) {
        for part in &msg.parts {
            if let PartType::Message(inner) = &part.body {
                if depth < MAX_NESTING {
                    self.attachments(inner, depth + 1);
                }
                continue;
            }
            let name = part.attachment_name();
            let data = match &part.body {
                PartType::Binary(b) | PartType::InlineBinary(b) => Some(b.as_ref()),
                _ => None,
            };
            let ctype = part
                .content_type()
                .map(|ct| (ct.ctype(), ct.subtype().unwrap_or("")));
            if let Some(name) = name {
                match dangerous_name(name) {
                    Some(Danger::Executable) => {
                        self.fire(Rule::ExecutableAttachment, || {
                            format!("attachment {:?}", clip(name, 80))
                        });
                    }
                    Some(Danger::Macro) => {
                        self.fire(Rule::MacroAttachment, || {
                            format!("macro-enabled document {:?}", clip(name, 80))
                        });
                    }
                    None => {}
                }
            }
            if let Some((t, s)) = ctype
                && t.eq_ignore_ascii_case("application")
                && EXECUTABLE_TYPES.iter().any(|e| s.eq_ignore_ascii_case(e))
            {
                self.fire(Rule::ExecutableAttachment, || {
                    format!("attachment of type {t}/{s}")
                });
            }
            let Some(data) = data else { continue };
            if is_pe_executable(data) {
                self.fire(Rule::ExecutableAttachment, || {
                    format!(
                        "attachment {:?} is a Windows program",
                        clip(name.unwrap_or("(unnamed)"), 80)
                    )
                });
            }
            let zip_like = name.is_some_and(|n| ends_with_ci(n.trim_end(), ".zip"))
                || ctype.is_some_and(|(_, s)| {
                    s.eq_ignore_ascii_case("zip") || s.eq_ignore_ascii_case("x-zip-compressed")
                })
                || data.starts_with(b"PK\x03\x04");
            if zip_like
                && self.rules.on(Rule::ArchiveExecutable)
                && let Some(names) = zip_names(data, MAX_ZIP_NAMES)
                && let Some(bad) = names
                    .iter()
                    .find(|n| std::str::from_utf8(n).is_ok_and(|n| dangerous_name(n).is_some()))
            {
                let inner = String::from_utf8_lossy(bad).into_owned();
                self.fire(Rule::ArchiveExecutable, || {
                    format!(
                        "{:?} inside {:?}",
                        clip(&inner, 80),
                        clip(name.unwrap_or("(unnamed)"), 80)
                    )
                });
            }
        }
    }
}

/// `s` cut to at most `max` bytes on a character boundary.
fn clip(s: &str, max: usize) -> &str {
    &s[..s.floor_char_boundary(max)]
}

fn take_budget<'t>(text: &'t [u8], budget: &mut usize) -> &'t [u8] {
    let n = text.len().min(*budget);
    *budget -= n;
    &text[..n]
}

fn ends_with_ci(s: &str, suffix: &str) -> bool {
    s.len() >= suffix.len()
        && s.as_bytes()[s.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
}

fn starts_with_ci(s: &[u8], prefix: &[u8]) -> bool {
    s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix)
}

// ---------------------------------------------------------------- headers

/// RFC 5322 §3.6.4 msg-id: `<id-left@id-right>`, nothing else but spaces
/// (and folding) around it.
fn msg_id_ok(raw: &str) -> bool {
    let v = raw.trim();
    let Some(inner) = v.strip_prefix('<').and_then(|v| v.strip_suffix('>')) else {
        return false;
    };
    let Some((left, right)) = inner.rsplit_once('@') else {
        return false;
    };
    let atext = |c: char| !c.is_whitespace() && !c.is_control() && !"<>@\"\\,;:()".contains(c);
    !left.is_empty()
        && !right.is_empty()
        && left.chars().all(atext)
        && (right.chars().all(atext) || (right.starts_with('[') && right.ends_with(']')))
}

/// The one mailbox of a From: field (display name, address); `None` for a
/// group or a list of several.
fn single_mailbox<'m>(a: &'m Address<'_>) -> Option<(Option<&'m str>, &'m str)> {
    let list = a.as_list()?;
    if list.len() != 1 {
        return None;
    }
    let addr = &list[0];
    Some((addr.name.as_deref(), addr.address.as_deref()?))
}

fn mailbox_ok(addr: &str) -> bool {
    let Some((local, domain)) = addr.rsplit_once('@') else {
        return false;
    };
    !local.is_empty()
        && !local.contains(char::is_whitespace)
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && domain
            .chars()
            .all(|c| c.is_alphanumeric() || c == '.' || c == '-' || c == '_')
}

/// A domain named in a display name that is not the address's own site.
fn foreign_domain_in(name: &str, addr_domain: &str) -> Option<String> {
    let addr_domain = addr_domain.to_ascii_lowercase();
    for token in name.split(|c: char| c.is_whitespace() || "\"'()<>[],;|".contains(c)) {
        let token = token.rsplit('@').next().unwrap_or(token);
        if let Some(d) = domain_token(token, false)
            && !same_site(&d, &addr_domain)
        {
            return Some(d);
        }
    }
    None
}

fn mostly_capitals(subject: &str) -> bool {
    let (mut letters, mut upper) = (0usize, 0usize);
    for c in subject.chars().filter(|c| c.is_alphabetic()) {
        letters += 1;
        if c.is_uppercase() {
            upper += 1;
        }
    }
    letters >= CAPS_MIN_LETTERS && upper as f64 >= CAPS_MIN_SHARE * letters as f64
}

/// Three or more `!`/`?` in a row (spaces between them do not break the run).
fn repeated_marks(subject: &str) -> bool {
    let mut run = 0;
    for c in subject.chars() {
        match c {
            '!' | '?' | '！' | '？' | '¡' | '¿' => {
                run += 1;
                if run >= 3 {
                    return true;
                }
            }
            ' ' => {}
            _ => run = 0,
        }
    }
    false
}

// ---------------------------------------------------------------- domains

/// Top-level domains accepted when a domain is recognised in free text (a
/// display name, a link's text) rather than in a URL: the generic ones
/// seen in mail, the reserved test ones, and any two-letter country code.
/// Without this, "John.Smith" or "invoice.pdf" would look like domains.
#[rustfmt::skip]
const TEXT_TLDS: &[&str] = &[
    "com", "net", "org", "info", "biz", "edu", "gov", "mil", "int", "app", "dev", "xyz", "top",
    "online", "site", "shop", "store", "club", "live", "tech", "cloud", "email", "link",
    "click", "website", "space", "pro", "mobi", "name", "asia", "bank", "money", "finance",
    "pay", "page", "support", "help", "services", "digital", "company", "business", "agency",
    "group", "global", "world", "today", "news", "media", "solutions", "network", "systems",
    "security", "center", "example", "test", "invalid", "localhost",
];

/// A domain written in free text: `www.paypal.com`, `https://paypal.com/x`,
/// `PayPal.com`. `in_url` = the token came after a scheme (any TLD goes).
fn domain_token(token: &str, in_url: bool) -> Option<String> {
    let mut t = token.trim_matches(|c: char| ".,:;!?*".contains(c));
    let mut url = in_url;
    for scheme in ["https://", "http://"] {
        // `get`: the scheme's length may end inside a character ("Grünbäume").
        if t.get(..scheme.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(scheme))
        {
            t = &t[scheme.len()..];
            url = true;
        }
    }
    let host = t.split(['/', '?', '#', ':']).next()?.trim_end_matches('.');
    let host = host.rsplit('@').next()?;
    if host.len() < 3 || host.len() > 253 {
        return None;
    }
    let host = host.to_lowercase();
    let labels: Vec<&str> = host.split('.').collect();
    if labels.len() < 2
        || labels.iter().any(|l| {
            l.is_empty() || !l.chars().all(|c| c.is_alphanumeric() || c == '-') || l.len() > 63
        })
    {
        return None;
    }
    let tld = labels[labels.len() - 1];
    if !tld.chars().all(|c| c.is_ascii_alphabetic()) {
        return None;
    }
    if !url {
        let known = (tld.len() == 2) || TEXT_TLDS.contains(&tld);
        let www = labels[0] == "www";
        let has_word = labels[..labels.len() - 1].iter().any(|l| l.len() >= 2);
        if !(known || www) || !has_word {
            return None;
        }
    }
    Some(host)
}

/// The registrable part of a host (`example.co.uk`), by the Public Suffix
/// List.
fn site(host: &str) -> &str {
    super::dmarc::registrable_domain(host)
}

/// Two hosts of one organisation: equal, one inside the other, or the same
/// registrable domain.
fn same_site(a: &str, b: &str) -> bool {
    let a = a.strip_prefix("www.").unwrap_or(a);
    let b = b.strip_prefix("www.").unwrap_or(b);
    let inside = |x: &str, y: &str| {
        x == y
            || (x.len() > y.len() && x.ends_with(y) && x.as_bytes()[x.len() - y.len() - 1] == b'.')
    };
    inside(a, b) || inside(b, a) || site(a).eq_ignore_ascii_case(site(b))
}

/// An IP address written as a URL host: dotted quad, `[v6]`, or the
/// decimal / hex / octal spellings browsers also accept (`0x7f.1`,
/// `2130706433`). No real TLD is all digits, so this is safe.
fn is_ip_host(host: &str) -> bool {
    if host.starts_with('[') {
        return true;
    }
    !host.is_empty()
        && host.split('.').all(|l| {
            !l.is_empty()
                && (l.bytes().all(|b| b.is_ascii_digit())
                    || ((l.starts_with("0x") || l.starts_with("0X"))
                        && l[2..].bytes().all(|b| b.is_ascii_hexdigit())))
        })
}

// ---------------------------------------------------------------- URLs

/// What the URL scanners found.
struct Urls<'r> {
    shorteners: &'r [String],
    domains: Vec<String>,
    /// First IP-literal host and first shortener host seen.
    ip: Option<String>,
    shortener: Option<String>,
}

impl<'r> Urls<'r> {
    fn new(shorteners: &'r [String]) -> Urls<'r> {
        Urls {
            shorteners,
            domains: Vec::new(),
            ip: None,
            shortener: None,
        }
    }

    /// Records one URL host as written (may carry case, a trailing dot).
    fn add(&mut self, raw: &[u8]) {
        let raw = trim_end_bytes(raw, b".");
        let valid = !raw.is_empty()
            && raw.len() <= 253
            && raw
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b"-._[]:".contains(&b) || b >= 0x80);
        if !valid {
            return;
        }
        // Most URLs of a message repeat a few hosts: recognise a repeat
        // before allocating anything.
        if raw.is_ascii()
            && self
                .domains
                .iter()
                .any(|d| d.as_bytes().eq_ignore_ascii_case(raw))
        {
            return;
        }
        let Ok(host) = std::str::from_utf8(raw) else {
            return;
        };
        if is_ip_host(host) {
            if self.ip.is_none() {
                self.ip = Some(host.to_ascii_lowercase());
            }
            return;
        }
        if !host.contains('.') || host.contains(['[', ']', ':']) {
            return;
        }
        let host = host.to_lowercase();
        if self.shortener.is_none()
            && self.shorteners.iter().any(|s| {
                host == *s
                    || (host.ends_with(s.as_str()) && host[..host.len() - s.len()].ends_with('.'))
            })
        {
            self.shortener = Some(host.clone());
        }
        if self.domains.len() < MAX_URL_DOMAINS && !self.domains.contains(&host) {
            self.domains.push(host);
        }
    }
}

fn trim_end_bytes<'b>(mut s: &'b [u8], chars: &[u8]) -> &'b [u8] {
    while let [rest @ .., last] = s {
        if chars.contains(last) {
            s = rest;
        } else {
            break;
        }
    }
    s
}

/// Ends the host part of a URL: a 256-entry table, as this runs on every
/// byte of every URL.
fn ends_host(b: u8) -> bool {
    const TABLE: [bool; 256] = {
        let mut t = [false; 256];
        let ends = b" \t\r\n\x0b\x0c/?#\\\"'<>(){}|,;*^`";
        let mut i = 0;
        while i < ends.len() {
            t[ends[i] as usize] = true;
            i += 1;
        }
        t
    };
    TABLE[b as usize]
}

/// Reads the authority of a URL starting at `start` (after `scheme://`, or
/// at `www.`), records its host, and returns where it ended.
fn read_authority(text: &[u8], start: usize, urls: &mut Urls<'_>) -> usize {
    let mut end = start;
    while end < text.len() && end - start < 300 && !ends_host(text[end]) {
        end += 1;
    }
    let auth = &text[start..end];
    // userinfo@host: the host is what follows the last '@'
    // (`http://paypal.com@evil.example/`).
    let host = match auth.iter().rposition(|&b| b == b'@') {
        Some(i) => &auth[i + 1..],
        None => auth,
    };
    let host = if host.first() == Some(&b'[') {
        match host.iter().position(|&b| b == b']') {
            Some(i) => &host[..=i],
            None => host,
        }
    } else {
        match host.iter().position(|&b| b == b':') {
            Some(i) => &host[..i],
            None => host,
        }
    };
    urls.add(host);
    end
}

/// Finds `http://`, `https://` and bare `www.` URLs anywhere in `text`
/// (plain text, or HTML including its attributes).
fn scan_bare_urls(text: &[u8], urls: &mut Urls<'_>) {
    // Every URL has a ':' (`http://`) or a '.' (`www.`): jump between
    // those, eight bytes at a time, instead of looking at every byte.
    let mut i = 0;
    while let Some(p) = find2(&text[i..], b':', b'.') {
        i += p;
        if text[i] == b':' {
            if text[i + 1..].starts_with(b"//") {
                let mut s = i;
                while s > 0 && i - s < 5 && text[s - 1].is_ascii_alphabetic() {
                    s -= 1;
                }
                let scheme = &text[s..i];
                if scheme.eq_ignore_ascii_case(b"http") || scheme.eq_ignore_ascii_case(b"https") {
                    i = read_authority(text, i + 3, urls);
                    continue;
                }
            }
        } else if i >= 3
            && text[i - 3..i].eq_ignore_ascii_case(b"www")
            && (i == 3 || {
                let before = text[i - 4];
                !(before.is_ascii_alphanumeric() || b"./-@".contains(&before))
            })
        {
            i = read_authority(text, i - 3, urls);
            continue;
        }
        i += 1;
    }
}

/// Position of the first byte equal to `a` or `b`: a word-at-a-time
/// search (the classic "has zero byte" trick), several times faster than
/// a byte loop on long text.
fn find2(hay: &[u8], a: u8, b: u8) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let (ma, mb) = (LO * a as u64, LO * b as u64);
    let has_zero = |x: u64| x.wrapping_sub(LO) & !x & HI != 0;
    let mut i = 0;
    for chunk in hay.chunks_exact(8) {
        let x = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        if has_zero(x ^ ma) || has_zero(x ^ mb) {
            break;
        }
        i += 8;
    }
    hay[i..]
        .iter()
        .position(|&c| c == a || c == b)
        .map(|p| i + p)
}

// ---------------------------------------------------------------- HTML

#[derive(Default)]
struct HtmlFindings {
    /// First link whose text shows another site than its target.
    mismatch: Option<(String, String)>,
    mismatches: usize,
    hidden_words: usize,
    hidden_how: Option<&'static str>,
}

impl HtmlFindings {
    fn merge(&mut self, other: HtmlFindings) {
        if self.mismatch.is_none() {
            self.mismatch = other.mismatch;
        }
        self.mismatches += other.mismatches;
        self.hidden_words += other.hidden_words;
        self.hidden_how = self.hidden_how.or(other.hidden_how);
    }
}

/// Elements that never have content or a closing tag.
#[rustfmt::skip]
const VOID: &[&[u8]] = &[
    b"area", b"base", b"br", b"col", b"embed", b"hr", b"img", b"input", b"link", b"meta",
    b"source", b"track", b"wbr",
];

/// A tag name, lower-cased, without allocating (names are cut at 16 bytes).
#[derive(Clone, Copy)]
struct TagName {
    buf: [u8; 16],
    len: usize,
}

impl TagName {
    fn new(raw: &[u8]) -> TagName {
        let mut buf = [0u8; 16];
        let len = raw.len().min(16);
        for (d, s) in buf.iter_mut().zip(&raw[..len]) {
            *d = s.to_ascii_lowercase();
        }
        TagName { buf, len }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// The open `<a>` being read.
struct Anchor {
    target: Option<String>,
    text: Vec<u8>,
}

/// One pass over HTML: anchors (href host against the domain shown in
/// the link text) and text inside hidden elements. Not a full HTML parser:
/// it reads tags, attributes and text, skips comments, scripts and styles,
/// and tracks one hidden element (with its nesting) at a time.
fn scan_html(html: &[u8], urls: &mut Urls<'_>) -> HtmlFindings {
    let mut f = HtmlFindings::default();
    let mut anchor: Option<Anchor> = None;
    // The hidden element: its tag name and how deep inside it we are.
    let mut hidden: Option<(TagName, usize)> = None;
    let mut i = 0;
    while i < html.len() {
        let lt = find2(&html[i..], b'<', b'<').map_or(html.len(), |p| i + p);
        let text = &html[i..lt];
        if hidden.is_some() {
            f.hidden_words += count_words(text);
        }
        if let Some(a) = anchor.as_mut() {
            let room = 256usize.saturating_sub(a.text.len());
            a.text.extend_from_slice(&text[..text.len().min(room)]);
        }
        if lt >= html.len() {
            break;
        }
        let rest = &html[lt..];
        if rest.starts_with(b"<!--") {
            i = find(rest, b"-->").map_or(html.len(), |p| lt + p + 3);
            continue;
        }
        let closing = rest.get(1) == Some(&b'/');
        let name_start = lt + 1 + closing as usize;
        let mut name_end = name_start;
        while name_end < html.len()
            && name_end - name_start < 16
            && html[name_end].is_ascii_alphanumeric()
        {
            name_end += 1;
        }
        if name_end == name_start {
            // "<" that starts no tag ("a < b", "<!DOCTYPE", "<?xml").
            i = match html[lt..].iter().position(|&b| b == b'>') {
                Some(p) if !html[lt + 1..].first().is_some_and(u8::is_ascii_whitespace) => {
                    lt + p + 1
                }
                Some(_) => lt + 1,
                // No tag can follow: stop rather than rescan the rest
                // for every further '<'.
                None => break,
            };
            continue;
        }
        let gt = tag_end(html, name_end);
        // Compared in place, case-insensitively: no copy per tag.
        let name = &html[name_start..name_end];
        let attrs = &html[name_end..gt.min(html.len())];
        i = (gt + 1).min(html.len());

        if closing {
            if name.eq_ignore_ascii_case(b"a")
                && let Some(a) = anchor.take()
            {
                check_anchor(a, &mut f);
            }
            if let Some((h, depth)) = hidden.as_mut()
                && h.as_bytes().eq_ignore_ascii_case(name)
            {
                *depth -= 1;
                if *depth == 0 {
                    hidden = None;
                }
            }
            continue;
        }
        if let Some(raw) = [&b"script"[..], b"style", b"title"]
            .into_iter()
            .find(|n| name.eq_ignore_ascii_case(n))
        {
            // Not visible text: skip to the closing tag.
            let mut close = b"</".to_vec();
            close.extend_from_slice(raw);
            i = find_ci(&html[i..], &close).map_or(html.len(), |p| i + p);
            continue;
        }
        if name.eq_ignore_ascii_case(b"a") {
            if let Some(a) = anchor.take() {
                check_anchor(a, &mut f);
            }
            let target = attr(attrs, b"href").and_then(|h| href_host(h, urls));
            anchor = Some(Anchor {
                target,
                text: Vec::new(),
            });
        }
        let self_closing =
            attrs.last() == Some(&b'/') || VOID.iter().any(|v| name.eq_ignore_ascii_case(v));
        if self_closing {
            continue;
        }
        match hidden.as_mut() {
            Some((h, depth)) if h.as_bytes().eq_ignore_ascii_case(name) => *depth += 1,
            Some(_) => {}
            None => {
                if let Some(how) = hides(attrs) {
                    f.hidden_how.get_or_insert(how);
                    hidden = Some((TagName::new(name), 1));
                }
            }
        }
    }
    if let Some(a) = anchor.take() {
        check_anchor(a, &mut f);
    }
    f
}

/// Where the tag whose name ends at `from` closes: its `>` outside quotes.
fn tag_end(html: &[u8], from: usize) -> usize {
    let mut quote = None;
    let mut j = from;
    while j < html.len() {
        let b = html[j];
        match quote {
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None if b == b'"' || b == b'\'' => quote = Some(b),
            None if b == b'>' => return j,
            None => {}
        }
        j += 1;
    }
    html.len()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn find_ci(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle))
}

/// The attributes of a tag, `(name, value)`, from the text after its
/// name; a bare attribute such as `hidden` has an empty value.
struct Attrs<'h> {
    rest: &'h [u8],
}

impl<'h> Iterator for Attrs<'h> {
    type Item = (&'h [u8], &'h [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let a = self.rest;
        let mut i = 0;
        loop {
            while i < a.len() && (a[i].is_ascii_whitespace() || a[i] == b'/') {
                i += 1;
            }
            if i >= a.len() {
                self.rest = &[];
                return None;
            }
            let n0 = i;
            while i < a.len() && !a[i].is_ascii_whitespace() && !b"=/>".contains(&a[i]) {
                i += 1;
            }
            let key = &a[n0..i];
            while i < a.len() && a[i].is_ascii_whitespace() {
                i += 1;
            }
            let mut value: &[u8] = b"";
            if a.get(i) == Some(&b'=') {
                i += 1;
                while i < a.len() && a[i].is_ascii_whitespace() {
                    i += 1;
                }
                match a.get(i) {
                    Some(&q) if q == b'"' || q == b'\'' => {
                        let v0 = i + 1;
                        let len = a[v0..].iter().position(|&b| b == q).unwrap_or(a.len() - v0);
                        value = &a[v0..v0 + len];
                        i = (v0 + len + 1).min(a.len());
                    }
                    _ => {
                        let v0 = i;
                        while i < a.len() && !a[i].is_ascii_whitespace() {
                            i += 1;
                        }
                        value = &a[v0..i];
                    }
                }
            }
            if key.is_empty() {
                // A stray '=' or '>': step over it.
                i += 1;
                continue;
            }
            self.rest = &a[i.min(a.len())..];
            return Some((key, value));
        }
    }
}

/// The value of attribute `name` in a tag's attribute text.
fn attr<'h>(attrs: &'h [u8], name: &[u8]) -> Option<&'h [u8]> {
    Attrs { rest: attrs }
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

/// The host an href goes to, when it goes to the web; recorded as a URL.
fn href_host(href: &[u8], urls: &mut Urls<'_>) -> Option<String> {
    let href = href.trim_ascii();
    let start = if starts_with_ci(href, b"http://") {
        7
    } else if starts_with_ci(href, b"https://") {
        8
    } else if href.starts_with(b"//") {
        2
    } else {
        return None;
    };
    // Read the host alone first, then record it with the message's URLs.
    let mut probe = Urls::new(&[]);
    read_authority(href, start, &mut probe);
    let host = probe.domains.pop().or(probe.ip)?;
    urls.add(host.as_bytes());
    Some(host)
}

fn check_anchor(a: Anchor, f: &mut HtmlFindings) {
    let Some(target) = a.target else { return };
    let text = String::from_utf8_lossy(&a.text);
    for token in text.split(|c: char| c.is_whitespace() || "\"'<>()[]{},;!|&".contains(c)) {
        if let Some(shown) = domain_token(token, false) {
            if !same_site(&shown, &target) {
                f.mismatches += 1;
                if f.mismatch.is_none() {
                    f.mismatch = Some((shown, target));
                }
            }
            return;
        }
    }
}

/// Words (two or more letters) in a stretch of HTML text; entities such as
/// `&nbsp;` are not words.
fn count_words(text: &[u8]) -> usize {
    let mut n = 0;
    let mut run = 0;
    let mut i = 0;
    while i < text.len() {
        let b = text[i];
        if b == b'&'
            && let Some(p) = text[i..text.len().min(i + 10)]
                .iter()
                .position(|&c| c == b';')
        {
            if run >= 2 {
                n += 1;
            }
            run = 0;
            i += p + 1;
            continue;
        }
        if b.is_ascii_alphabetic() || b >= 0x80 {
            run += 1;
        } else {
            if run >= 2 {
                n += 1;
            }
            run = 0;
        }
        i += 1;
    }
    if run >= 2 {
        n += 1;
    }
    n
}

/// Whether a tag's attributes hide its content, and how. One pass over
/// the attributes, no allocation unless both a text and a background
/// colour are set.
fn hides(attrs: &[u8]) -> Option<&'static str> {
    let (mut style, mut color, mut background) = (None, None, None);
    for (k, v) in (Attrs { rest: attrs }) {
        if k.eq_ignore_ascii_case(b"hidden") {
            return Some("hidden attribute");
        } else if k.eq_ignore_ascii_case(b"style") {
            style = Some(v);
        } else if k.eq_ignore_ascii_case(b"color") {
            color = Some(v);
        } else if k.eq_ignore_ascii_case(b"bgcolor") {
            background = Some(v);
        }
    }
    for decl in style.unwrap_or_default().split(|&b| b == b';') {
        let Some(colon) = decl.iter().position(|&b| b == b':') else {
            continue;
        };
        let prop = decl[..colon].trim_ascii();
        let value = decl[colon + 1..].trim_ascii();
        let value = value
            .strip_suffix(b"!important")
            .unwrap_or(value)
            .trim_ascii();
        let is = |name: &[u8]| prop.eq_ignore_ascii_case(name);
        if is(b"display") && value.eq_ignore_ascii_case(b"none") {
            return Some("display:none");
        } else if is(b"visibility") && value.eq_ignore_ascii_case(b"hidden") {
            return Some("visibility:hidden");
        } else if is(b"font-size") && is_zero_length(value) {
            return Some("font-size:0");
        } else if is(b"opacity") && is_zero_length(value) {
            return Some("opacity:0");
        } else if is(b"color") {
            color = Some(value);
        } else if is(b"background-color") || is(b"background") {
            // `background: #fff url(...)`: the colour comes first.
            color_first(value, &mut background);
        }
    }
    match (color, background) {
        (Some(c), Some(b)) if !c.is_empty() && normal_color(c) == normal_color(b) => {
            Some("text colour equals background")
        }
        _ => None,
    }
}

fn color_first<'v>(value: &'v [u8], into: &mut Option<&'v [u8]>) {
    *into = value.split(|b| b.is_ascii_whitespace()).next();
}

/// `0`, `0px`, `0.0em`, `0%`: a length (or number) of zero.
fn is_zero_length(v: &[u8]) -> bool {
    let digits_end = v
        .iter()
        .position(|b| !(b.is_ascii_digit() || *b == b'.'))
        .unwrap_or(v.len());
    let (num, unit) = v.split_at(digits_end);
    !num.is_empty()
        && num.iter().all(|&b| b == b'0' || b == b'.')
        && num.contains(&b'0')
        && unit.iter().all(|b| b.is_ascii_alphabetic() || *b == b'%')
}

/// A CSS/HTML colour in one spelling: `#fff`, `#FFFFFF`, `white` and
/// `rgb(255,255,255)` all become `#ffffff`; others are lower-cased.
fn normal_color(v: &[u8]) -> String {
    let s: String = String::from_utf8_lossy(v)
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase();
    match s.as_str() {
        "white" | "#fff" | "#ffffff" | "rgb(255,255,255)" => "#ffffff".into(),
        "black" | "#000" | "#000000" | "rgb(0,0,0)" => "#000000".into(),
        _ if s.len() == 4 && s.starts_with('#') => {
            let mut out = String::from("#");
            for c in s[1..].chars() {
                out.push(c);
                out.push(c);
            }
            out
        }
        _ => s,
    }
}

// ---------------------------------------------------------------- attachments

enum Danger {
    Executable,
    Macro,
}

/// Extensions that run code when opened on a common desktop: programs,
/// scripts, installers, shortcuts and disk images (which mount and show
/// programs).
#[rustfmt::skip]
const EXECUTABLE_EXT: &[&str] = &[
    "exe", "scr", "js", "jse", "vbs", "vbe", "wsf", "wsh", "bat", "cmd", "com", "pif", "cpl",
    "jar", "ps1", "psm1", "hta", "msi", "msp", "lnk", "iso", "img", "vhd", "vhdx", "reg", "scf",
    "url", "appx", "msix", "application", "gadget", "dll", "sys", "ocx", "chm", "inf", "sct",
    "xll", "one",
];

/// Office documents that carry macros.
#[rustfmt::skip]
const MACRO_EXT: &[&str] = &[
    "docm", "dotm", "xlsm", "xltm", "xlam", "pptm", "potm", "ppsm", "ppam", "sldm",
];

/// MIME subtypes of `application/` that are programs.
const EXECUTABLE_TYPES: &[&str] = &[
    "x-msdownload",
    "x-msdos-program",
    "x-dosexec",
    "x-ms-installer",
    "x-msi",
    "hta",
    "x-ms-shortcut",
    "vnd.microsoft.portable-executable",
    "java-archive",
    "x-sh",
    "x-bat",
];

fn dangerous_name(name: &str) -> Option<Danger> {
    // Windows drops trailing dots and spaces: "invoice.exe. " runs as .exe.
    let name = name.trim_end_matches(['.', ' ', '\0']);
    let (_, ext) = name.rsplit_once('.')?;
    let ext = ext.to_ascii_lowercase();
    if EXECUTABLE_EXT.contains(&ext.as_str()) {
        Some(Danger::Executable)
    } else if MACRO_EXT.contains(&ext.as_str()) {
        Some(Danger::Macro)
    } else {
        None
    }
}

/// A Windows PE program: `MZ` header whose e_lfanew points at `PE\0\0`.
fn is_pe_executable(data: &[u8]) -> bool {
    if !data.starts_with(b"MZ") {
        return false;
    }
    let Some(off) = data.get(0x3c..0x40) else {
        return false;
    };
    let off = u32::from_le_bytes([off[0], off[1], off[2], off[3]]) as usize;
    off.checked_add(4)
        .and_then(|end| data.get(off..end))
        .is_some_and(|sig| sig == b"PE\0\0")
}

fn le16(d: &[u8], at: usize) -> Option<usize> {
    d.get(at..at + 2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
}

fn le32(d: &[u8], at: usize) -> Option<usize> {
    d.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

/// The file names in a ZIP archive's central directory (APPNOTE.TXT §4.3.12,
/// §4.3.16), at most `max`; `None` when there is no readable directory.
/// Reads only the end of the file and the directory records, every offset
/// bounds-checked; nothing is decompressed. ZIP64 archives (over 4 GiB or
/// 65535 entries) are not read.
pub fn zip_names(data: &[u8], max: usize) -> Option<Vec<&[u8]>> {
    const EOCD: &[u8] = b"PK\x05\x06";
    const CDH: &[u8] = b"PK\x01\x02";
    if data.len() < 22 {
        return None;
    }
    // The end-of-central-directory record is the last 22 bytes plus a
    // comment of up to 65535 bytes: search back that far for its signature.
    let lowest = data.len().saturating_sub(22 + 0xffff);
    let eocd = (lowest..=data.len() - 22)
        .rev()
        .find(|&p| &data[p..p + 4] == EOCD)?;
    let entries = le16(data, eocd + 10)?;
    let cd_size = le32(data, eocd + 12)?;
    let cd_offset = le32(data, eocd + 16)?;
    // Data prepended to the archive (self-extractors) shifts every offset:
    // the directory then sits right before the end record.
    let start = if data.get(cd_offset..cd_offset + 4) == Some(CDH) {
        cd_offset
    } else {
        let p = eocd.checked_sub(cd_size)?;
        if data.get(p..p + 4) != Some(CDH) {
            return None;
        }
        p
    };
    let mut names = Vec::new();
    let mut p = start;
    while names.len() < entries.min(max) && data.get(p..p + 4) == Some(CDH) {
        let name_len = le16(data, p + 28)?;
        let extra_len = le16(data, p + 30)?;
        let comment_len = le16(data, p + 32)?;
        let name = data.get(p + 46..p + 46 + name_len)?;
        names.push(name);
        p += 46 + name_len + extra_len + comment_len;
    }
    Some(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigErrors;
    use crate::config::spam::{rule_names, validate};

    #[test]
    fn a_long_plain_text_message_is_parsed_only_as_far_as_it_is_scanned() {
        let line = "word ".repeat(15) + "\r\n";
        let mut m = b"From: a@b.example\r\nSubject: long\r\n\r\n".to_vec();
        while m.len() < 3 * PART_SCAN_SIZE {
            m.extend_from_slice(line.as_bytes());
        }
        let w = parse_window(&m, &HeaderView::read(&m));
        assert!(w.len() < m.len() && w.len() > PART_SCAN_SIZE, "{}", w.len());
        assert!(w.ends_with(b"\r\n"));
        // Structured messages are parsed whole (a ZIP's directory is at
        // its end), and so are short ones.
        let mut multi = b"Content-Type: multipart/mixed; boundary=x\r\n\r\n".to_vec();
        multi.extend_from_slice(&m);
        assert_eq!(
            parse_window(&multi, &HeaderView::read(&multi)).len(),
            multi.len()
        );
        assert_eq!(
            parse_window(&m[..PART_SCAN_SIZE], &HeaderView::read(&m)).len(),
            PART_SCAN_SIZE
        );
    }

    const INVOICE_PDF: &[u8] = include_bytes!("../../tests/fixtures/invoice-pdf.eml");
    const INVOICE_HTML_PDF: &[u8] = include_bytes!("../../tests/fixtures/invoice-html-pdf.eml");
    const SPAM_PHISHING: &[u8] = include_bytes!("../../tests/fixtures/spam-phishing.eml");
    const SPAM_ZIP_EXE: &[u8] = include_bytes!("../../tests/fixtures/spam-zip-exe.eml");
    const SPAM_BULK: &[u8] = include_bytes!("../../tests/fixtures/spam-bulk.eml");

    fn rules() -> SpamRules {
        SpamRules::new(&SpamConfig::default())
    }

    fn names(r: &SpamReport) -> Vec<&'static str> {
        let mut n: Vec<_> = r.fired.iter().map(|f| f.name).collect();
        n.sort_unstable();
        n
    }

    /// A well-formed message with `extra` header lines and a text body.
    fn plain(extra: &str, body: &str) -> Vec<u8> {
        format!(
            "From: Acme Billing <billing@acme.test>\r\nTo: <bob@one.test>\r\n\
             Subject: Invoice 1\r\nDate: Sun, 29 Nov 2026 10:00:00 +0000\r\n\
             Message-ID: <1@acme.test>\r\n{extra}MIME-Version: 1.0\r\n\
             Content-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n"
        )
        .into_bytes()
    }

    /// A message with a text and an HTML alternative.
    fn alternative(text: &str, html: &str) -> Vec<u8> {
        format!(
            "From: Acme Billing <billing@acme.test>\r\nTo: <bob@one.test>\r\n\
             Subject: Invoice 1\r\nDate: Sun, 29 Nov 2026 10:00:00 +0000\r\n\
             Message-ID: <1@acme.test>\r\nMIME-Version: 1.0\r\n\
             Content-Type: multipart/alternative; boundary=\"b\"\r\n\r\n\
             --b\r\nContent-Type: text/plain\r\n\r\n{text}\r\n\
             --b\r\nContent-Type: text/html\r\n\r\n{html}\r\n--b--\r\n"
        )
        .into_bytes()
    }

    /// A message with a text body and one base64 attachment.
    fn with_attachment(name: &str, ctype: &str, data: &[u8]) -> Vec<u8> {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(data);
        format!(
            "From: Acme Billing <billing@acme.test>\r\nTo: <bob@one.test>\r\n\
             Subject: Invoice 1\r\nDate: Sun, 29 Nov 2026 10:00:00 +0000\r\n\
             Message-ID: <1@acme.test>\r\nMIME-Version: 1.0\r\n\
             Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n\
             --b\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n\
             --b\r\nContent-Type: {ctype}; name=\"{name}\"\r\n\
             Content-Disposition: attachment; filename=\"{name}\"\r\n\
             Content-Transfer-Encoding: base64\r\n\r\n{b64}\r\n--b--\r\n"
        )
        .into_bytes()
    }

    fn fires(msg: &[u8], rule: &str) -> bool {
        rules().score(msg).has_fired(rule)
    }

    #[test]
    fn invoices_score_zero() {
        for (name, m) in [
            ("invoice-pdf", INVOICE_PDF),
            ("invoice-html-pdf", INVOICE_HTML_PDF),
        ] {
            let r = rules().score(m);
            assert_eq!(r.score, 0.0, "{name}: {:?}", r.fired);
            assert!(r.fired.is_empty(), "{name}");
        }
    }

    #[test]
    fn invoice_url_domains() {
        let r = rules().score(INVOICE_HTML_PDF);
        assert_eq!(
            r.url_domains,
            [
                "pay.acme.test",
                "www.acme.test",
                "acme.test",
                "billing.acme.test"
            ]
        );
        assert_eq!(url_domains(INVOICE_HTML_PDF), r.url_domains);
        assert!(rules().score(INVOICE_PDF).url_domains.is_empty());
    }

    #[test]
    fn phishing_fixture() {
        let r = rules().score(SPAM_PHISHING);
        assert_eq!(
            names(&r),
            [
                "display_name_domain",
                "html_only",
                "link_mismatch",
                "url_shortener"
            ]
        );
        assert!(r.score >= rules().threshold(), "{r:?}");
        assert_eq!(r.url_domains, ["bit.ly", "www.paypal.com"]);
        let link = r.fired.iter().find(|f| f.name == "link_mismatch").unwrap();
        assert_eq!(
            link.detail,
            "link text shows www.paypal.com but goes to bit.ly"
        );
        assert_eq!(
            r.rules_summary(),
            "display_name_domain (2.5), html_only (1), link_mismatch (3), url_shortener (1.5)"
        );
    }

    #[test]
    fn zip_fixture() {
        let r = rules().score(SPAM_ZIP_EXE);
        assert_eq!(names(&r), ["archive_executable"]);
        assert!(
            r.fired[0].detail.contains("Invoice_2026_0044.pdf.exe"),
            "{r:?}"
        );
        assert!(r.score >= rules().threshold());
    }

    #[test]
    fn bulk_fixture() {
        let r = rules().score(SPAM_BULK);
        assert_eq!(
            names(&r),
            [
                "date_malformed",
                "hidden_text",
                "ip_url",
                "message_id_malformed",
                "subject_caps",
                "subject_punctuation",
                "too_many_recipients",
            ]
        );
        assert!(r.url_domains.is_empty(), "IP literals are not domains");
    }

    #[test]
    fn date_rule() {
        assert!(fires(
            &plain("", "x").replace_header("Date", None),
            "date_malformed"
        ));
        assert!(fires(
            &plain("", "x").replace_header("Date", Some("31/02/2026")),
            "date_malformed"
        ));
        assert!(!fires(&plain("", "x"), "date_malformed"));
    }

    #[test]
    fn message_id_rule() {
        for bad in ["abc", "<abc>", "<a b@c>", "<@c>", "<a@>", "a@b"] {
            let m = plain("", "x").replace_header("Message-ID", Some(bad));
            assert!(fires(&m, "message_id_malformed"), "{bad}");
        }
        let m = plain("", "x").replace_header("Message-ID", None);
        assert!(fires(&m, "message_id_malformed"));
        for good in ["<a.b-c@d.example>", " <x@[127.0.0.1]> "] {
            let m = plain("", "x").replace_header("Message-ID", Some(good));
            assert!(!fires(&m, "message_id_malformed"), "{good}");
        }
    }

    #[test]
    fn from_rule() {
        for bad in [
            None,
            Some("billing"),
            Some("<billing@>"),
            Some("a@b.example, c@d.example"),
            Some("undisclosed:;"),
            Some("<billing@localhost>"),
        ] {
            let m = plain("", "x").replace_header("From", bad);
            assert!(fires(&m, "from_malformed"), "{bad:?}");
        }
        let twice = plain("From: <other@acme.test>\r\n", "x");
        assert!(fires(&twice, "from_malformed"));
    }

    #[test]
    fn display_name_rule() {
        let cases = [
            ("\"paypal.com\" <x@evil.example>", true),
            ("PayPal.com Support <x@evil.example>", true),
            ("\"service@paypal.com\" <x@evil.example>", true),
            ("\"www.amazon.co.uk\" <x@amazon.co.uk.evil.example>", true),
            ("Acme.test Billing <billing@mail.acme.test>", false),
            ("news.acme.test <billing@mail.acme.test>", false),
            ("John.Smith <john@acme.test>", false),
            ("J.R.R. Tolkien <jrr@acme.test>", false),
            ("Invoice No. 1.2 <billing@acme.test>", false),
        ];
        for (from, want) in cases {
            let m = plain("", "x").replace_header("From", Some(from));
            assert_eq!(fires(&m, "display_name_domain"), want, "{from}");
        }
    }

    #[test]
    fn subject_rules() {
        let caps = |s: &str| {
            let m = plain("", "x").replace_header("Subject", Some(s));
            let r = rules().score(&m);
            (
                r.has_fired("subject_caps"),
                r.has_fired("subject_punctuation"),
            )
        };
        assert_eq!(caps("URGENT PAYMENT REQUIRED"), (true, false));
        assert_eq!(caps("Invoice ACME-2026-0042 from ACME"), (false, false));
        assert_eq!(
            caps("RE: PO 12"),
            (false, false),
            "too few letters to judge"
        );
        assert_eq!(caps("Act now!!!"), (false, true));
        assert_eq!(caps("Really ? ? ?"), (false, true));
        assert_eq!(caps("Paid? Thanks!"), (false, false));
    }

    #[test]
    fn html_only_rule() {
        let html_only = b"From: <a@acme.test>\r\nDate: Sun, 29 Nov 2026 10:00:00 +0000\r\n\
Message-ID: <1@acme.test>\r\nContent-Type: text/html\r\n\r\n<p>Hello</p>\r\n";
        assert!(fires(html_only, "html_only"));
        let empty_text = alternative("  ", "<p>Hello</p>");
        assert!(
            fires(&empty_text, "html_only"),
            "a blank text part is no text"
        );
        assert!(!fires(&alternative("Hello", "<p>Hello</p>"), "html_only"));
        assert!(!fires(&plain("", "Hello"), "html_only"));
    }

    #[test]
    fn link_mismatch_rule() {
        let cases = [
            (
                r#"<a href="https://evil.example/x">www.acme.test</a>"#,
                true,
            ),
            (
                r#"<a href="http://evil.example">https://acme.test/pay</a>"#,
                true,
            ),
            (
                r#"<A HREF='//evil.example/'>Pay at <b>acme.test</b></A>"#,
                true,
            ),
            (
                r#"<a href="https://pay.acme.test/i/1">acme.test/pay</a>"#,
                false,
            ),
            (r#"<a href="https://acme.test/i/1">Pay now</a>"#, false),
            (r#"<a href="https://acme.test/f">invoice.pdf</a>"#, false),
            (r#"<a href="mailto:x@evil.example">acme.test</a>"#, false),
        ];
        for (html, want) in cases {
            let m = alternative("x", html);
            assert_eq!(fires(&m, "link_mismatch"), want, "{html}");
        }
    }

    #[test]
    fn ip_and_shortener_rules() {
        let r = rules().score(&plain("", "see http://10.1.2.3:8080/x"));
        assert!(r.has_fired("ip_url") && !r.has_fired("url_shortener"));
        for body in [
            "http://[2001:db8::1]/x",
            "http://0x7f000001/",
            "https://2130706433/a",
        ] {
            assert!(fires(&plain("", body), "ip_url"), "{body}");
        }
        for body in ["https://bit.ly/abc", "go to tinyurl.com/x or www.t.co"] {
            let r = rules().score(&plain("", &format!("{body} http://WWW.Bit.Ly/z")));
            assert!(r.has_fired("url_shortener"), "{body}");
        }
        let r = rules().score(&plain("", "https://bitly.example/x https://notbit.ly/y"));
        assert!(!r.has_fired("url_shortener"));
        // Configured list replaces the default.
        let cfg = SpamConfig {
            shorteners: vec!["Short.Example".into()],
            ..SpamConfig::default()
        };
        let r =
            SpamRules::new(&cfg).score(&plain("", "https://a.short.example/x https://bit.ly/y"));
        let f = r.fired.iter().find(|f| f.name == "url_shortener").unwrap();
        assert_eq!(f.detail, "URL shortener a.short.example");
    }

    #[test]
    fn attachment_rules() {
        let cases = [
            (
                "setup.exe",
                "application/octet-stream",
                "executable_attachment",
            ),
            (
                "Invoice.PDF.js",
                "application/octet-stream",
                "executable_attachment",
            ),
            ("run.ps1. ", "text/plain", "executable_attachment"),
            (
                "disk.iso",
                "application/octet-stream",
                "executable_attachment",
            ),
            (
                "report.xlsm",
                "application/octet-stream",
                "macro_attachment",
            ),
            (
                "Letter.DOCM",
                "application/octet-stream",
                "macro_attachment",
            ),
        ];
        for (name, ctype, rule) in cases {
            let m = with_attachment(name, ctype, b"data");
            let r = rules().score(&m);
            assert_eq!(names(&r), [rule], "{name}");
        }
        let m = with_attachment("invoice.pdf", "application/x-msdownload", b"data");
        assert!(fires(&m, "executable_attachment"));
        // A program whatever its name says.
        let mut pe = vec![0u8; 128];
        pe[..2].copy_from_slice(b"MZ");
        pe[0x3c] = 0x40;
        pe[0x40..0x44].copy_from_slice(b"PE\0\0");
        let m = with_attachment("invoice.pdf", "application/pdf", &pe);
        assert!(fires(&m, "executable_attachment"));
        let m = with_attachment("invoice.pdf", "application/pdf", b"%PDF-1.4 MZ");
        assert!(rules().score(&m).fired.is_empty());
    }

    /// The ZIP attachment of the fixture, decoded.
    fn fixture_zip() -> Vec<u8> {
        let msg = MessageParser::new().parse(SPAM_ZIP_EXE).unwrap();
        msg.attachment(0).unwrap().contents().to_vec()
    }

    #[test]
    fn zip_central_directory() {
        let zip = fixture_zip();
        let names = zip_names(&zip, 100).unwrap();
        assert_eq!(
            names,
            [&b"readme.txt"[..], &b"Invoice_2026_0044.pdf.exe"[..]]
        );
        assert_eq!(zip_names(&zip, 1).unwrap().len(), 1, "capped");
        // A self-extractor stub in front moves every offset.
        let mut shifted = b"stub-bytes".repeat(10);
        shifted.extend_from_slice(&zip);
        assert_eq!(zip_names(&shifted, 100).unwrap().len(), 2);
        // Truncated or garbage archives give no names and no panic.
        for cut in 0..zip.len() {
            let _ = zip_names(&zip[..cut], 100);
            let _ = zip_names(&zip[cut..], 100);
        }
        assert_eq!(zip_names(b"PK\x05\x06", 10), None);
        assert_eq!(zip_names(&[0u8; 100], 10), None);
        // Found inside an attachment whatever the attachment is called.
        let m = with_attachment("documents", "application/octet-stream", &zip);
        assert!(fires(&m, "archive_executable"));
        let m = with_attachment("docs.zip", "application/zip", &zip[..zip.len() / 2]);
        assert!(!fires(&m, "archive_executable"), "unreadable archive");
    }

    #[test]
    fn hidden_text_rule() {
        let words = "buy cheap watches now ".repeat(5);
        let cases = [
            (format!("<div style=\"display: none\">{words}</div>"), true),
            (
                format!("<span style='VISIBILITY:hidden !important'>{words}</span>"),
                true,
            ),
            (format!("<p style=\"font-size:0px\">{words}</p>"), true),
            (format!("<div hidden>{words}</div>"), true),
            (
                format!("<font color=\"#FFF\" style=\"background:white\">{words}</font>"),
                true,
            ),
            (
                format!("<div style=\"display:none\"><div>x</div><p>{words}</p></div>"),
                true,
            ),
            // Closed before the words: visible.
            (
                format!("<div style=\"display:none\"><div>a</div></div><p>{words}</p>"),
                false,
            ),
            // A short preheader.
            (
                "<div style=\"display:none\">Your invoice is ready</div>".into(),
                false,
            ),
            // White text on a coloured button.
            (
                format!(
                    "<a style=\"color:#fff;background-color:#0b5cad\" href=\"https://acme.test\">{words}</a>"
                ),
                false,
            ),
            (format!("<p style=\"font-size:10px\">{words}</p>"), false),
        ];
        for (html, want) in cases {
            let m = alternative("x", &html);
            assert_eq!(fires(&m, "hidden_text"), want, "{html}");
        }
    }

    #[test]
    fn too_many_recipients_rule() {
        let to: Vec<String> = (0..30).map(|i| format!("<u{i}@one.test>")).collect();
        let cc: Vec<String> = (0..21).map(|i| format!("<c{i}@one.test>")).collect();
        let extra = format!("Cc: {}\r\n", cc.join(", "));
        let m = plain(&extra, "x").replace_header("To", Some(&to.join(", ")));
        let r = rules().score(&m);
        let f = r
            .fired
            .iter()
            .find(|f| f.name == "too_many_recipients")
            .unwrap();
        assert_eq!(f.detail, "51 addresses in To: and Cc: (at most 50)");
        let cfg = SpamConfig {
            max_header_recipients: 60,
            ..SpamConfig::default()
        };
        assert!(
            !SpamRules::new(&cfg)
                .score(&m)
                .has_fired("too_many_recipients")
        );
    }

    #[test]
    fn weights_override_and_disable() {
        let mut cfg = SpamConfig::default();
        cfg.weights.insert("url_shortener".into(), 0.0);
        cfg.weights.insert("link_mismatch".into(), 7.5);
        let r = SpamRules::new(&cfg).score(SPAM_PHISHING);
        assert_eq!(
            names(&r),
            ["display_name_domain", "html_only", "link_mismatch"]
        );
        assert_eq!(r.score, 2.5 + 1.0 + 7.5);
        assert_eq!(
            r.url_domains,
            ["bit.ly", "www.paypal.com"],
            "URLs are collected with the rule off"
        );
    }

    #[test]
    fn threshold_is_inclusive() {
        // The ZIP fixture scores exactly the default 5.0.
        let r = rules().score(SPAM_ZIP_EXE);
        assert_eq!(r.score, 5.0);
        assert!(r.score >= rules().threshold());
        let cfg = SpamConfig {
            threshold: 5.5,
            ..SpamConfig::default()
        };
        assert!(SpamRules::new(&cfg).score(SPAM_ZIP_EXE).score < 5.5);
        assert!(SpamRules::new(&cfg).enabled());
    }

    #[test]
    fn url_extraction() {
        let body = "a http://paypal.com@Evil.Example:8080/x b HTTPS://WWW.Acme.Test./p \
                    c (https://acme.test) d www.shop.example, e https://acme.test?q \
                    f ftp://skip.example g xhttp://no.example h <https://last.example>";
        let r = rules().score(&plain("", body));
        assert_eq!(
            r.url_domains,
            [
                "evil.example",
                "www.acme.test",
                "acme.test",
                "www.shop.example",
                "last.example"
            ]
        );
        let many: String = (0..80).map(|i| format!("https://h{i}.example/ ")).collect();
        let r = rules().score(&plain("", &many));
        assert_eq!(r.url_domains.len(), MAX_URL_DOMAINS);
        assert_eq!(r.url_domains[49], "h49.example");
    }

    #[test]
    fn scanning_is_bounded() {
        // A URL past the scan budget is not looked at.
        let filler = "word ".repeat(SCAN_BUDGET / 5 + 10);
        let m = alternative(
            "x",
            &format!("<p>{filler}</p><a href=\"http://10.0.0.1/\">x</a>"),
        );
        let r = rules().score(&m);
        assert!(!r.has_fired("ip_url"));
        assert!(r.url_domains.is_empty());
    }

    #[test]
    fn validate_reports_key_paths() {
        let mut cfg = SpamConfig {
            threshold: 0.0,
            max_header_recipients: 0,
            shorteners: vec!["https://bit.ly/".into(), "ok.example".into()],
            ..SpamConfig::default()
        };
        cfg.weights.insert("no_such_rule".into(), 1.0);
        cfg.weights.insert("html_only".into(), -1.0);
        cfg.weights.insert("ip_url".into(), f64::NAN);
        cfg.weights.insert("hidden_text".into(), 0.0);
        let mut errs = ConfigErrors::default();
        validate(&cfg, "policy.spam", &mut errs);
        let paths: Vec<&str> = errs.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "policy.spam.threshold",
                "policy.spam.weights.html_only",
                "policy.spam.weights.ip_url",
                "policy.spam.weights.no_such_rule",
                "policy.spam.max_header_recipients",
                "policy.spam.shorteners[0]",
            ]
        );
        let unknown = &errs.0[3].message;
        for name in rule_names() {
            assert!(unknown.contains(name), "{unknown}");
        }
        let mut errs = ConfigErrors::default();
        validate(&SpamConfig::default(), "policy.spam", &mut errs);
        assert!(errs.0.is_empty(), "{errs}");
    }

    #[test]
    fn config_from_toml() {
        let cfg: SpamConfig = toml::from_str(
            "threshold = 7.5\nmax_header_recipients = 10\n[weights]\nhtml_only = 0\n",
        )
        .unwrap();
        assert!(cfg.enabled);
        assert_eq!(cfg.threshold, 7.5);
        assert_eq!(cfg.max_header_recipients, 10);
        assert!(cfg.shorteners.iter().any(|s| s == "bit.ly"));
        assert_eq!(cfg.weights.get("html_only"), Some(&0.0));
    }

    #[test]
    fn internal_scanners() {
        let hay = b"0123456789abcdefghij:klmnop.qrstuvwxyz";
        for start in 0..hay.len() {
            let want = hay[start..].iter().position(|&c| c == b':' || c == b'.');
            assert_eq!(find2(&hay[start..], b':', b'.'), want, "{start}");
        }
        assert_eq!(find2(b"aaaaaaaaaaaaaaaa", b':', b'.'), None);
        let mut urls = Urls::new(&[]);
        scan_bare_urls(
            b"www.first.example xwww.no.example WWW.Up.Example",
            &mut urls,
        );
        assert_eq!(urls.domains, ["www.first.example", "www.up.example"]);
        assert_eq!(site("a.b.acme.co.uk"), "acme.co.uk");
        assert_eq!(site("mail.acme.test"), "acme.test");
        assert!(same_site("www.acme.test", "acme.test"));
        assert!(!same_site("acme.test", "evilacme.test"));
        assert_eq!(domain_token("John.Smith", false), None);
        assert_eq!(domain_token("invoice.pdf", false), None);
        assert_eq!(
            domain_token("PayPal.com.", false).as_deref(),
            Some("paypal.com")
        );
        assert_eq!(
            domain_token("http://x.y.zz/a", false).as_deref(),
            Some("x.y.zz")
        );
        // Multi-byte characters where the scheme's length ends.
        for t in [
            "Grünbäume",
            "ää",
            "€€€",
            "Straße1",
            "İİİİ",
            "😀😀",
            "漢字漢字",
        ] {
            assert_eq!(domain_token(t, false), None, "{t}");
        }
        assert_eq!(
            domain_token("HTTPS://Bücher.de/x", false).as_deref(),
            Some("bücher.de")
        );
        assert!(is_zero_length(b"0") && is_zero_length(b"0.0em") && !is_zero_length(b"10px"));
        assert_eq!(normal_color(b"RGB(255, 255, 255)"), "#ffffff");
        assert_eq!(normal_color(b"#AbC"), "#aabbcc");
        assert_eq!(count_words(b"two words&nbsp;x &amp; more"), 3);
        assert_eq!(
            attr(b" a=1 HREF = 'x y' hidden", b"href"),
            Some(&b"x y"[..])
        );
        assert_eq!(attr(b" hidden", b"hidden"), Some(&b""[..]));
    }

    #[test]
    fn a_non_ascii_display_name_scores() {
        let m =
            plain("", "Grüße").replace_header("From", Some("Grünbäume GmbH <billing@acme.test>"));
        let r = rules().score(&m);
        assert!(!r.has_fired("display_name_domain"), "{r:?}");
        let m = alternative("x", "<a href=\"https://acme.test/\">Grünbäume GmbH</a>");
        assert!(!fires(&m, "link_mismatch"));
    }

    #[test]
    fn odd_input_does_not_panic() {
        let rules = rules();
        for m in [
            &b""[..],
            b"\r\n\r\n",
            b"Content-Type: text/html\r\n\r\n<a href=\"http://",
            b"Content-Type: text/html\r\n\r\n<a href='//[",
            b"Content-Type: text/html\r\n\r\n<div style=\"display:none\"><div",
            b"Content-Type: text/html\r\n\r\n<<<>>></a></div><!--",
            b"Content-Type: text/plain\r\n\r\nhttp://@:/ www. https://[::1",
        ] {
            let _ = rules.score(m);
        }
        // Work stays linear on hostile HTML: '<' without any '>', unclosed
        // quotes, comments and scripts (quadratic scanning would take
        // minutes here).
        let start = std::time::Instant::now();
        for filler in [
            "<",
            "<a href=\"",
            "<!--",
            "<script>",
            "<div style=display:none>",
            "www.",
        ] {
            let mut m = b"Content-Type: text/html\r\n\r\n".to_vec();
            m.extend_from_slice(&filler.as_bytes().repeat(SCAN_BUDGET / filler.len()));
            let _ = rules.score(&m);
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(20));
    }

    /// Text biased to what breaks byte arithmetic (two-, three- and
    /// four-byte characters, 'İ' which grows when lower-cased, URL and
    /// address punctuation, NUL), or any Unicode at all.
    fn mail_text() -> impl proptest::strategy::Strategy<Value = String> {
        proptest::prop_oneof![
            "[a-zA-Z0-9 .:/@!?<>\"üäößİ€😀漢字\u{0}-]{0,40}",
            "(?s).{0,40}",
        ]
    }

    proptest::proptest! {
        #[test]
        fn any_unicode_scores_without_panic(
            name in mail_text(),
            subject in mail_text(),
            link in mail_text(),
            body in mail_text(),
            encoded in proptest::bool::ANY,
        ) {
            use base64::Engine;
            let subject = if encoded {
                let b64 = base64::engine::general_purpose::STANDARD.encode(&subject);
                format!("=?utf-8?B?{b64}?=")
            } else {
                subject
            };
            let m = format!(
                "From: {name} <billing@acme.test>\r\nSubject: {subject}\r\n\
                 MIME-Version: 1.0\r\n\
                 Content-Type: multipart/alternative; boundary=\"b\"\r\n\r\n\
                 --b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body} http://{link}\r\n\
                 --b\r\nContent-Type: text/html; charset=utf-8\r\n\r\n\
                 <a href=\"https://{link}/\">{link}</a><p hidden>{body}</p>\r\n--b--\r\n"
            );
            let r = rules().score(m.as_bytes());
            proptest::prop_assert!(r.score >= 0.0);
            let _ = url_domains(m.as_bytes());
            let _ = domain_token(&link, false);
            let _ = foreign_domain_in(&name, &link);
        }

        #[test]
        fn any_html_scores_without_panic(body in proptest::collection::vec(
            proptest::sample::select(&b"<>/=\"' a:.!@#[]-_wWhtpsdivlyefonzx0&;\r\n"[..]), 0..400)) {
            let mut m = b"From: <a@acme.test>\r\nContent-Type: text/html\r\n\r\n".to_vec();
            m.extend_from_slice(&body);
            let r = rules().score(&m);
            proptest::prop_assert!(r.score >= 0.0);
            let _ = zip_names(&body, 10);
        }
    }

    /// Test helper: replace (or drop, with `None`) one header field.
    trait ReplaceHeader {
        fn replace_header(self, name: &str, value: Option<&str>) -> Vec<u8>;
    }

    impl ReplaceHeader for Vec<u8> {
        fn replace_header(self, name: &str, value: Option<&str>) -> Vec<u8> {
            let text = String::from_utf8(self).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            let prefix = format!("{name}:");
            let mut out: Vec<String> = head
                .split("\r\n")
                .filter(|l| !l.starts_with(&prefix))
                .map(str::to_string)
                .collect();
            if let Some(v) = value {
                out.insert(0, format!("{name}: {v}"));
            }
            format!("{}\r\n\r\n{body}", out.join("\r\n")).into_bytes()
        }
    }
}
