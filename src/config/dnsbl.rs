//! `[[policy.dnsbl]]`: the DNS blocklists the policy stage asks
//! (`policy::dnsbl`), what each lists and what a listing does.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigErrors, Span};

/// What a zone lists.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ZoneKind {
    /// IP addresses (IPv4 reversed octets, IPv6 reversed nibbles).
    #[default]
    Ip,
    /// Domain names (From: domain, URL domains), e.g. a DBL/URIBL zone.
    Domain,
}

/// What a listing does to a message.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ZoneAction {
    /// 554 5.7.1 with the listing's reason.
    #[default]
    Reject,
    /// Add `weight` to the spam score.
    Score,
    /// Log it and accept.
    Log,
}

/// `[[policy.dnsbl]]`.
#[derive(Clone, Debug, Deserialize)]
pub struct ZoneConfig {
    /// The zone queried, e.g. `"zen.spamhaus.org"`.
    pub zone: String,
    #[serde(default)]
    pub kind: ZoneKind,
    #[serde(default)]
    pub action: ZoneAction,
    /// Added to the spam score when `action = "score"`.
    #[serde(default = "one")]
    pub weight: f64,
    /// Longest wait for this zone's answer; past it the zone lists nothing.
    #[serde(default = "default_timeout")]
    pub timeout: Span,
}

fn one() -> f64 {
    1.0
}

fn default_timeout() -> Span {
    Span(Duration::from_secs(2))
}

/// Checks one `[[policy.dnsbl]]`; `path` is its key path.
pub fn validate(zone: &ZoneConfig, path: &str, errs: &mut ConfigErrors) {
    if let Err(e) = check_zone_name(&zone.zone) {
        errs.push(format!("{path}.zone"), e);
    }
    if !zone.weight.is_finite() || zone.weight < 0.0 {
        errs.push(
            format!("{path}.weight"),
            "must be a number of at least 0, e.g. 2.5",
        );
    }
    if zone.timeout.0.is_zero() {
        errs.push(
            format!("{path}.timeout"),
            "must be longer than 0, e.g. \"2s\"",
        );
    }
}

fn check_zone_name(zone: &str) -> Result<(), String> {
    const EXAMPLE: &str = "e.g. \"zen.spamhaus.org\"";
    let z = zone.trim().trim_end_matches('.');
    if z.is_empty() {
        return Err(format!("must be a DNS zone, {EXAMPLE}"));
    }
    // The longest IPv6 query name (64 bytes of nibbles) must still fit in
    // the 253 characters of a DNS name.
    if z.len() > 253 - 64 {
        return Err(format!("{zone:?} is too long for a DNS zone"));
    }
    for label in z.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(format!("{zone:?} is not a valid DNS name, {EXAMPLE}"));
        }
    }
    Ok(())
}
