//! The retry schedule: backoff steps with jitter, and expiry.
