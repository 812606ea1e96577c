//! `[policy.dmarc]`: what the DMARC alignment check (`policy::alignment`)
//! does with a message that would fail DMARC at the receiver, and how long
//! it caches verdicts.

use std::time::Duration;

use serde::Deserialize;

use super::{ConfigErrors, Span};

/// What to do with a message that would fail DMARC at a domain whose policy
/// is quarantine or reject.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DmarcAction {
    /// 550 5.7.26 naming the domain, what fails and the record to publish.
    Reject,
    /// 451 4.7.26: try again later (after the DNS is fixed).
    Defer,
    /// Accept, log, and say so in the `received` event.
    #[default]
    Warn,
    /// Do not check.
    Off,
}

/// `[policy.dmarc]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct DmarcConfig {
    pub action: DmarcAction,
    /// Shortest time a verdict is cached, whatever the records' TTL; also
    /// how long a failing verdict is kept, so a fix in DNS shows soon.
    pub min_ttl: Span,
    /// Longest time a verdict is cached, whatever the records' TTL.
    pub max_ttl: Span,
    /// How long a verdict made during DNS trouble is kept.
    pub error_ttl: Span,
    /// Most (From: domain, return-path domain, keys) verdicts kept.
    pub cache_size: usize,
}

impl Default for DmarcConfig {
    fn default() -> Self {
        DmarcConfig {
            action: DmarcAction::default(),
            min_ttl: Span(Duration::from_secs(60)),
            max_ttl: Span(Duration::from_secs(3600)),
            error_ttl: Span(Duration::from_secs(30)),
            cache_size: 10_000,
        }
    }
}

/// Checks `[policy.dmarc]`; `path` is its key path.
pub fn validate(cfg: &DmarcConfig, path: &str, errs: &mut ConfigErrors) {
    if cfg.min_ttl.0 > cfg.max_ttl.0 {
        errs.push(format!("{path}.min_ttl"), "must not be longer than max_ttl");
    }
    if cfg.max_ttl.0 > Duration::from_secs(86_400) {
        errs.push(format!("{path}.max_ttl"), "must be at most 1d");
    }
    if cfg.error_ttl.0.is_zero() {
        errs.push(
            format!("{path}.error_ttl"),
            "must be more than 0 (otherwise every message waits for a failing DNS)",
        );
    }
    if cfg.cache_size == 0 {
        errs.push(format!("{path}.cache_size"), "must be at least 1");
    }
}
