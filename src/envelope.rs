//! A message's envelope and the state of each of its recipients: what the
//! receive stage builds, the spool persists, delivery updates and events,
//! the admin API and DSNs report.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::reply::Reply;

/// A queue id: 48 bits of milliseconds since the epoch and 32 bits of a
/// per-process counter seeded at random, written as 20 upper-case hex
/// digits. Sorts by arrival; unique across restarts of one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueId(pub u128);

static COUNTER: AtomicU64 = AtomicU64::new(0);

impl QueueId {
    pub fn generate() -> QueueId {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
            & 0xFFFF_FFFF_FFFF;
        // Seeded at random so two processes started in the same millisecond
        // do not collide.
        static SEED: OnceLock<u32> = OnceLock::new();
        let seed = *SEED.get_or_init(rand::random::<u32>);
        let c = seed.wrapping_add(COUNTER.fetch_add(1, Ordering::Relaxed) as u32);
        QueueId(((ms as u128) << 32) | c as u128)
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:020X}", self.0)
    }
}

impl FromStr for QueueId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 20 {
            return Err(format!("{s:?} is not a queue id (20 hex digits)"));
        }
        u128::from_str_radix(s, 16)
            .map(QueueId)
            .map_err(|_| format!("{s:?} is not a queue id (20 hex digits)"))
    }
}

impl Serialize for QueueId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for QueueId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// DSN RET (RFC 3461 §4.3): what a bounce should carry of the original.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ret {
    Full,
    Hdrs,
}

/// DSN NOTIFY (RFC 3461 §4.1) as flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notify {
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub success: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub failure: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub delay: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub never: bool,
}

/// The message as a whole: who sent it, how it came in, DSN options.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Reverse path; empty for the null sender `<>`.
    pub sender: String,
    /// Tenant that submitted it (AUTH), or none for a trusted network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// Unix seconds.
    pub received_at: u64,
    pub client_ip: std::net::IpAddr,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub smtputf8: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub body_8bit: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ret: Option<Ret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_id: Option<String>,
    /// MAIL FROM ... REQUIRETLS (RFC 8689): deliver only over TLS with a
    /// verified certificate to a host that keeps the requirement, or bounce.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_tls: bool,
    /// herald's own TLS reports (RFC 8460 §3): where the destination's
    /// published policy (MTA-STS, DANE) fails, delivered with opportunistic
    /// TLS instead of deferred, since the report may be about that failure.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_tls_policies: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RcptStatus {
    /// Waiting for its first attempt.
    Pending,
    /// Failed temporarily; `next_attempt` says when it is tried again.
    Deferred,
    Delivered,
    Bounced,
    Expired,
}

impl RcptStatus {
    /// Delivered, bounced and expired recipients need nothing more.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RcptStatus::Delivered | RcptStatus::Bounced | RcptStatus::Expired
        )
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recipient {
    pub address: String,
    /// DSN ORCPT as given (`rfc822;user@example`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orcpt: Option<String>,
    #[serde(default)]
    pub notify: Notify,
    pub status: RcptStatus,
    #[serde(default)]
    pub attempts: u32,
    /// Unix seconds of the next attempt (Pending/Deferred).
    #[serde(default)]
    pub next_attempt: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reply: Option<Reply>,
    /// The host that gave the last reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_mx: Option<String>,
    /// Unix seconds of the last status change.
    #[serde(default)]
    pub updated_at: u64,
    /// A "delayed" DSN went out for it (NOTIFY=DELAY): only one is sent.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub delay_reported: bool,
}

impl Recipient {
    pub fn new(address: String) -> Recipient {
        Recipient {
            address,
            orcpt: None,
            notify: Notify::default(),
            status: RcptStatus::Pending,
            attempts: 0,
            next_attempt: 0,
            last_reply: None,
            last_mx: None,
            updated_at: 0,
            delay_reported: false,
        }
    }

    /// The domain part, lower-cased: what delivery groups by.
    pub fn domain(&self) -> String {
        domain_of(&self.address)
    }
}

/// The lower-cased domain of an address (after the last '@').
pub fn domain_of(address: &str) -> String {
    address
        .rsplit_once('@')
        .map(|(_, d)| d)
        .unwrap_or("")
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_ids_are_unique_and_round_trip() {
        let a = QueueId::generate();
        let b = QueueId::generate();
        assert_ne!(a, b);
        let s = a.to_string();
        assert_eq!(s.len(), 20);
        assert_eq!(s.parse::<QueueId>().unwrap(), a);
        assert!("xyz".parse::<QueueId>().is_err());
    }

    #[test]
    fn domains_are_lower_cased() {
        assert_eq!(domain_of("Bob@Example.COM"), "example.com");
        assert_eq!(domain_of("a@b@c.test."), "c.test");
    }
}
