//! The tenant reputation guard's measure: per tenant, the outcomes of its
//! last `window` recipients (delivered, or bounced hard as
//! `invalid_recipient`), and the complaints that arrived while those
//! outcomes came in. A tenant whose hard-bounce or complaint rate is over
//! its limit, once at least `min_volume` recipients are counted, gets its
//! submissions paused (see [`super::Control::observe`]).
//!
//! Why these defaults: mailbox providers and ESPs act on about these rates.
//! Amazon SES puts an account under review at a 5% bounce rate (and at a
//! 0.1% complaint rate); Google's sender guidelines (2024) ask bulk senders
//! to stay under 0.1% spam complaints and never reach 0.3%. A shared relay
//! pauses one tenant before the shared IPs pay for it: 5% hard bounces or
//! 0.3% complaints over the last 500 recipients, once 100 are counted.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

pub use crate::config::reputation::{PauseReply, ReputationConfig};

/// What a window holds now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    /// Recipient outcomes counted (at most `window`).
    pub recipients: usize,
    pub hard_bounces: usize,
    pub complaints: usize,
    pub hard_bounce_rate: f64,
    pub complaint_rate: f64,
}

/// The sliding window of one tenant.
#[derive(Debug)]
pub struct Window {
    cap: usize,
    /// `true` = hard bounce, oldest first.
    outcomes: VecDeque<bool>,
    hard: usize,
    /// Outcomes recorded ever: the clock complaints are aged by.
    seq: u64,
    /// For each complaint in the window, `seq` when it arrived. A complaint
    /// is about a message delivered earlier, so it is counted against the
    /// outcomes that came in while it did, and leaves with them.
    complaints: VecDeque<u64>,
}

impl Window {
    pub fn new(cap: usize) -> Window {
        let cap = cap.max(1);
        Window {
            cap,
            outcomes: VecDeque::with_capacity(cap.min(1024)),
            hard: 0,
            seq: 0,
            complaints: VecDeque::new(),
        }
    }

    /// One recipient's final outcome: delivered (or a bounce that is not a
    /// hard `invalid_recipient`), or a hard bounce.
    pub fn record(&mut self, hard_bounce: bool) {
        if self.outcomes.len() == self.cap && self.outcomes.pop_front() == Some(true) {
            self.hard -= 1;
        }
        self.outcomes.push_back(hard_bounce);
        if hard_bounce {
            self.hard += 1;
        }
        self.seq += 1;
        let cap = self.cap as u64;
        while self
            .complaints
            .front()
            .is_some_and(|&c| c + cap <= self.seq)
        {
            self.complaints.pop_front();
        }
    }

    pub fn complaint(&mut self) {
        if self.complaints.len() == self.cap {
            self.complaints.pop_front();
        }
        self.complaints.push_back(self.seq);
    }

    pub fn rates(&self) -> Rates {
        let n = self.outcomes.len();
        let rate = |k: usize| if n == 0 { 0.0 } else { k as f64 / n as f64 };
        Rates {
            recipients: n,
            hard_bounces: self.hard,
            complaints: self.complaints.len(),
            hard_bounce_rate: rate(self.hard),
            complaint_rate: rate(self.complaints.len()),
        }
    }

    /// Why the tenant must be paused, when it must.
    pub fn verdict(&self, c: &ReputationConfig) -> Option<String> {
        let r = self.rates();
        if r.recipients < c.min_volume {
            return None;
        }
        if r.hard_bounce_rate > c.max_hard_bounce_rate {
            return Some(format!(
                "hard-bounce rate {} ({} of the last {} recipients) is over the limit of {}",
                percent(r.hard_bounce_rate),
                r.hard_bounces,
                r.recipients,
                percent(c.max_hard_bounce_rate)
            ));
        }
        if r.complaint_rate > c.max_complaint_rate {
            return Some(format!(
                "complaint rate {} ({} complaint(s) over the last {} recipients) is over the limit of {}",
                percent(r.complaint_rate),
                r.complaints,
                r.recipients,
                percent(c.max_complaint_rate)
            ));
        }
        None
    }
}

/// `0.05` → `5%`, `0.003` → `0.3%`.
pub fn percent(f: f64) -> String {
    let p = f * 100.0;
    let s = format!("{p:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}%")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigErrors;
    use crate::config::reputation::validate;

    fn config(window: usize, min_volume: usize) -> ReputationConfig {
        ReputationConfig {
            window,
            min_volume,
            ..ReputationConfig::default()
        }
    }

    #[test]
    fn no_verdict_below_min_volume() {
        let c = config(10, 3);
        let mut w = Window::new(10);
        w.record(true);
        w.record(false);
        assert_eq!(w.rates().hard_bounce_rate, 0.5);
        assert_eq!(w.verdict(&c), None, "one bounce of two proves nothing");
        w.record(false);
        let v = w.verdict(&c).expect("1 of 3 is over 5%");
        assert!(
            v.contains("hard-bounce rate 33.33% (1 of the last 3 recipients)"),
            "{v}"
        );
    }

    #[test]
    fn old_outcomes_leave_the_window() {
        let c = config(4, 4);
        let mut w = Window::new(4);
        w.record(true);
        for _ in 0..3 {
            w.record(false);
        }
        assert_eq!(w.rates().hard_bounces, 1);
        assert!(w.verdict(&c).is_some());
        w.record(false);
        let r = w.rates();
        assert_eq!((r.recipients, r.hard_bounces), (4, 0));
        assert_eq!(w.verdict(&c), None);
    }

    #[test]
    fn rate_at_the_limit_does_not_trip() {
        let c = ReputationConfig {
            window: 100,
            min_volume: 100,
            max_hard_bounce_rate: 0.05,
            ..ReputationConfig::default()
        };
        let mut w = Window::new(100);
        for i in 0..100 {
            w.record(i >= 95);
        }
        assert_eq!(w.rates().hard_bounce_rate, 0.05);
        assert_eq!(w.verdict(&c), None, "exactly 5% is not over 5%");
        w.record(true);
        assert!(w.verdict(&c).is_some(), "6 of the last 100");
    }

    #[test]
    fn complaints_age_with_the_outcomes() {
        let c = ReputationConfig {
            window: 3,
            min_volume: 3,
            max_hard_bounce_rate: 1.0,
            max_complaint_rate: 0.0,
            ..ReputationConfig::default()
        };
        let mut w = Window::new(3);
        for _ in 0..3 {
            w.record(false);
        }
        w.complaint();
        let r = w.rates();
        assert_eq!(r.complaints, 1);
        assert!((r.complaint_rate - 1.0 / 3.0).abs() < 1e-9);
        let v = w.verdict(&c).expect("any complaint is over 0%");
        assert!(v.starts_with("complaint rate 33.33%"), "{v}");
        for _ in 0..2 {
            w.record(false);
        }
        assert_eq!(w.rates().complaints, 1, "still within the last 3 outcomes");
        w.record(false);
        assert_eq!(w.rates().complaints, 0, "3 outcomes later it has left");
        assert_eq!(w.verdict(&c), None);
    }

    #[test]
    fn complaints_without_outcomes_stay_bounded() {
        let mut w = Window::new(5);
        for _ in 0..50 {
            w.complaint();
        }
        assert_eq!(w.rates().complaints, 5);
        assert_eq!(w.rates().complaint_rate, 0.0, "nothing counted yet");
    }

    #[test]
    fn percent_is_short() {
        assert_eq!(percent(0.05), "5%");
        assert_eq!(percent(0.003), "0.3%");
        assert_eq!(percent(1.0 / 3.0), "33.33%");
        assert_eq!(percent(0.0), "0%");
    }

    #[test]
    fn config_errors_name_the_key() {
        let mut errs = ConfigErrors::default();
        let c = ReputationConfig {
            window: 10,
            min_volume: 20,
            max_hard_bounce_rate: 5.0,
            ..ReputationConfig::default()
        };
        validate(&c, "reputation", &mut errs);
        let text = errs.to_string();
        assert!(text.contains("reputation.min_volume"), "{text}");
        assert!(text.contains("reputation.max_hard_bounce_rate"), "{text}");
        let mut errs = ConfigErrors::default();
        validate(&ReputationConfig::default(), "reputation", &mut errs);
        assert!(errs.0.is_empty());
    }
}
