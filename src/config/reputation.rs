//! `[reputation]`: the tenant reputation guard's settings (the guard is
//! `control::reputation`).

use serde::{Deserialize, Serialize};

use super::ConfigErrors;

/// `[reputation]`: the tenant reputation guard.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct ReputationConfig {
    /// Pause a tenant's submissions when its rates cross the limits.
    pub enabled: bool,
    /// How many of the tenant's most recent recipient outcomes are counted.
    pub window: usize,
    /// No verdict before this many outcomes are counted (one bounce out of
    /// two messages says nothing).
    pub min_volume: usize,
    /// Hard bounces (`invalid_recipient`, permanent) per recipient counted.
    pub max_hard_bounce_rate: f64,
    /// Complaints (ARF reports) per recipient counted.
    pub max_complaint_rate: f64,
    /// What a paused tenant's MAIL FROM gets.
    pub reply: PauseReply,
}

impl Default for ReputationConfig {
    fn default() -> Self {
        ReputationConfig {
            enabled: true,
            window: 500,
            min_volume: 100,
            max_hard_bounce_rate: 0.05,
            max_complaint_rate: 0.003,
            reply: PauseReply::Tempfail,
        }
    }
}

/// The refusal a paused tenant's MAIL FROM gets.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PauseReply {
    /// `451 4.7.1`: the app keeps the message and retries it; once a
    /// postmaster resumes the tenant, it goes out and nothing was lost.
    #[default]
    Tempfail,
    /// `550 5.7.1`: the app marks the message failed at once.
    Reject,
}

/// Checks `[reputation]`; errors name the key path under `prefix`.
pub fn validate(c: &ReputationConfig, prefix: &str, errs: &mut ConfigErrors) {
    if c.window == 0 {
        errs.push(format!("{prefix}.window"), "must be at least 1");
    }
    if c.min_volume == 0 {
        errs.push(format!("{prefix}.min_volume"), "must be at least 1");
    }
    if c.min_volume > c.window {
        errs.push(
            format!("{prefix}.min_volume"),
            format!(
                "must not be more than window ({}): the guard would never decide",
                c.window
            ),
        );
    }
    for (key, v) in [
        ("max_hard_bounce_rate", c.max_hard_bounce_rate),
        ("max_complaint_rate", c.max_complaint_rate),
    ] {
        if !(0.0..=1.0).contains(&v) {
            errs.push(
                format!("{prefix}.{key}"),
                "must be a fraction from 0.0 to 1.0, e.g. 0.05 for 5%",
            );
        }
    }
}
