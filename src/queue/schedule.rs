//! The retry schedule: which wait follows the n-th failed attempt, stretched
//! by random jitter so that recipients deferred together do not all come
//! back in the same second (chasquid and Postfix do the same), and when a
//! recipient that keeps failing expires.

use std::time::Duration;

use rand::Rng;

use crate::config::DeliveryConfig;

#[derive(Clone, Debug)]
pub struct RetrySchedule {
    steps: Vec<Duration>,
    jitter: f64,
    lifetime: Duration,
}

/// What to do with a recipient after a temporary failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextStep {
    /// Try again at this Unix time (seconds).
    RetryAt(u64),
    /// The queue lifetime is over: give up.
    Expire,
}

impl RetrySchedule {
    pub fn new(steps: Vec<Duration>, jitter: f64, lifetime: Duration) -> RetrySchedule {
        assert!(!steps.is_empty(), "config validation guarantees a step");
        RetrySchedule {
            steps,
            jitter,
            lifetime,
        }
    }

    pub fn from_config(d: &DeliveryConfig) -> RetrySchedule {
        RetrySchedule::new(
            d.retry.iter().map(|s| s.as_duration()).collect(),
            d.retry_jitter,
            d.max_queue_lifetime.as_duration(),
        )
    }

    /// The wait after `attempts` failed attempts (1 = after the first),
    /// before jitter. The last step repeats.
    pub fn base_delay(&self, attempts: u32) -> Duration {
        let i = (attempts.max(1) as usize - 1).min(self.steps.len() - 1);
        self.steps[i]
    }

    /// The wait with jitter drawn from `rng`: uniformly within
    /// ±`jitter` of the base.
    pub fn delay(&self, attempts: u32, rng: &mut impl Rng) -> Duration {
        let base = self.base_delay(attempts).as_secs_f64();
        let factor = if self.jitter > 0.0 {
            rng.random_range(1.0 - self.jitter..=1.0 + self.jitter)
        } else {
            1.0
        };
        Duration::from_secs_f64((base * factor).max(1.0))
    }

    /// Decides the next step for a recipient of a message received at
    /// `received_at` that has now failed `attempts` times. A retry that would
    /// fall after the lifetime is moved to the moment the lifetime ends, so
    /// the last attempt happens then; a failure at or after it expires.
    pub fn next(&self, received_at: u64, now: u64, attempts: u32, rng: &mut impl Rng) -> NextStep {
        let expires_at = received_at + self.lifetime.as_secs();
        if now >= expires_at {
            return NextStep::Expire;
        }
        let at = now + self.delay(attempts, rng).as_secs();
        NextStep::RetryAt(at.min(expires_at))
    }

    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn m(n: u64) -> Duration {
        Duration::from_secs(n * 60)
    }

    fn schedule(jitter: f64) -> RetrySchedule {
        RetrySchedule::new(
            vec![m(5), m(10), m(20), m(40), m(60), m(120), m(240)],
            jitter,
            Duration::from_secs(5 * 86400),
        )
    }

    #[test]
    fn steps_then_last_repeats() {
        let s = schedule(0.0);
        assert_eq!(s.base_delay(1), m(5));
        assert_eq!(s.base_delay(2), m(10));
        assert_eq!(s.base_delay(7), m(240));
        assert_eq!(s.base_delay(8), m(240));
        assert_eq!(s.base_delay(100), m(240));
        assert_eq!(s.base_delay(0), m(5));
    }

    #[test]
    fn jitter_stays_within_bounds_and_varies() {
        let s = schedule(0.1);
        let mut rng = StdRng::seed_from_u64(7);
        let delays: Vec<u64> = (0..200).map(|_| s.delay(1, &mut rng).as_secs()).collect();
        assert!(delays.iter().all(|d| (270..=330).contains(d)), "{delays:?}");
        let distinct: std::collections::HashSet<_> = delays.iter().collect();
        assert!(distinct.len() > 20, "jitter should spread retries");
    }

    #[test]
    fn retry_is_capped_at_expiry_then_expires() {
        let s = RetrySchedule::new(vec![m(60)], 0.0, Duration::from_secs(7200));
        let mut rng = StdRng::seed_from_u64(1);
        let t0 = 1_000_000;
        assert_eq!(
            s.next(t0, t0 + 10, 1, &mut rng),
            NextStep::RetryAt(t0 + 3610)
        );
        assert_eq!(
            s.next(t0, t0 + 5000, 2, &mut rng),
            NextStep::RetryAt(t0 + 7200)
        );
        assert_eq!(s.next(t0, t0 + 7200, 3, &mut rng), NextStep::Expire);
    }
}
