//! `[policy.spam]`: the outbound spam heuristics' settings and the names
//! and default weights of their rules (the scorer is `policy::spam`).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::ConfigErrors;

/// The rules, in report order: name, default weight.
pub(crate) const RULES: [(&str, f64); 15] = [
    ("date_malformed", 1.0),
    ("message_id_malformed", 1.0),
    ("from_malformed", 2.0),
    ("display_name_domain", 2.5),
    ("subject_caps", 1.5),
    ("subject_punctuation", 1.5),
    ("html_only", 1.0),
    ("link_mismatch", 3.0),
    ("ip_url", 2.0),
    ("url_shortener", 1.5),
    ("executable_attachment", 5.0),
    ("macro_attachment", 2.5),
    ("archive_executable", 5.0),
    ("hidden_text", 2.0),
    ("too_many_recipients", 2.0),
];

/// The names of every rule, as used in `[policy.spam.weights]`.
pub fn rule_names() -> impl Iterator<Item = &'static str> {
    RULES.iter().map(|(n, _)| *n)
}

/// A rule's default weight; `None` for an unknown name.
pub fn default_weight(rule: &str) -> Option<f64> {
    RULES.iter().find(|(n, _)| *n == rule).map(|(_, w)| *w)
}

/// Hosts of common URL shorteners: a shortened link hides where it goes.
const DEFAULT_SHORTENERS: &[&str] = &[
    "bit.ly",
    "bitly.com",
    "tinyurl.com",
    "t.co",
    "goo.gl",
    "ow.ly",
    "is.gd",
    "buff.ly",
    "rebrand.ly",
    "cutt.ly",
    "t.ly",
    "v.gd",
    "tiny.cc",
    "shorturl.at",
    "rb.gy",
    "s.id",
    "lnkd.in",
    "bl.ink",
    "short.io",
    "soo.gd",
    "clck.ru",
    "qrco.de",
    "tr.im",
    "x.co",
];

/// `[policy.spam]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct SpamConfig {
    /// Score messages at all.
    pub enabled: bool,
    /// Score at which a message is refused.
    pub threshold: f64,
    /// Weight per rule name, replacing the default; 0 turns a rule off.
    pub weights: BTreeMap<String, f64>,
    /// Most addresses in To: and Cc: together before `too_many_recipients`.
    pub max_header_recipients: usize,
    /// Hosts of URL shorteners (a subdomain matches too).
    pub shorteners: Vec<String>,
}

impl Default for SpamConfig {
    fn default() -> Self {
        SpamConfig {
            enabled: true,
            threshold: 5.0,
            weights: BTreeMap::new(),
            max_header_recipients: 50,
            shorteners: DEFAULT_SHORTENERS.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// Checks `[policy.spam]`; `path` is its key path.
pub fn validate(cfg: &SpamConfig, path: &str, errs: &mut ConfigErrors) {
    if !(cfg.threshold.is_finite() && cfg.threshold > 0.0) {
        errs.push(format!("{path}.threshold"), "must be a number more than 0");
    }
    for (name, weight) in &cfg.weights {
        if default_weight(name).is_none() {
            let known: Vec<&str> = rule_names().collect();
            errs.push(
                format!("{path}.weights.{name}"),
                format!("unknown rule; the rules are: {}", known.join(", ")),
            );
        } else if !(weight.is_finite() && *weight >= 0.0) {
            errs.push(
                format!("{path}.weights.{name}"),
                "must be a number of 0 or more (0 turns the rule off)",
            );
        }
    }
    if cfg.max_header_recipients == 0 {
        errs.push(
            format!("{path}.max_header_recipients"),
            "must be at least 1",
        );
    }
    for (i, host) in cfg.shorteners.iter().enumerate() {
        let ok = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
            && host.contains('.');
        if !ok {
            errs.push(
                format!("{path}.shorteners[{i}]"),
                "must be a host name such as \"bit.ly\" (no scheme, no path)",
            );
        }
    }
}
