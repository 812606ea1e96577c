//! VERP return paths (`[bounces] return_path_domain`): each recipient's copy
//! goes out with the envelope sender `bounces+TOKEN@<return_path_domain>`,
//! so that receivers evaluate SPF on herald's domain and a late bounce comes
//! back to herald naming the exact message and recipient.
//!
//! TOKEN is `<queue id>-<recipient index>-<mac>`: the queue id in hex, the
//! recipient's index within its message in decimal, and the first 40 bits
//! of HMAC-SHA256(secret, "<queue id>-<index>") in base32. The MAC stops
//! anyone from forging bounces for other messages (which would suppress
//! addresses). Only lower-case hex, digits and base32 letters are used and
//! decoding ignores case, because some MTAs fold local parts to one case.
//! The local part stays under 50 octets (RFC 5321 §4.5.3.1.1 allows 64).

use aws_lc_rs::hmac;

use crate::config::BouncesConfig;
use crate::envelope::QueueId;

/// The local-part prefix before `+TOKEN`.
pub const PREFIX: &str = "bounces";
const MAC_CHARS: usize = 8;

/// Encodes and checks VERP addresses.
#[derive(Clone)]
pub struct Verp {
    domain: String,
    key: hmac::Key,
}

impl std::fmt::Debug for Verp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verp")
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

impl Verp {
    /// `None` when `return_path_domain` is not set (VERP off).
    pub fn from_config(cfg: &BouncesConfig) -> Option<Verp> {
        let domain = cfg.return_path_domain.as_ref()?;
        let secret = cfg.verp_secret.as_ref()?;
        Some(Verp::new(domain, secret.expose().as_bytes()))
    }

    pub fn new(domain: &str, secret: &[u8]) -> Verp {
        Verp {
            domain: domain.to_ascii_lowercase(),
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// The return-path domain.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The envelope sender for recipient `index` of message `id`.
    pub fn address(&self, id: QueueId, index: usize) -> String {
        let base = format!("{:020x}-{index}", id.0);
        format!("{PREFIX}+{base}-{}@{}", self.mac(&base), self.domain)
    }

    /// The message and recipient a VERP address stands for; `None` for any
    /// other address, another domain, or a wrong MAC.
    pub fn decode(&self, address: &str) -> Option<(QueueId, usize)> {
        let (local, domain) = address.rsplit_once('@')?;
        if !domain
            .trim_end_matches('.')
            .eq_ignore_ascii_case(&self.domain)
        {
            return None;
        }
        let token = local
            .get(..PREFIX.len() + 1)
            .filter(|p| p.eq_ignore_ascii_case(&format!("{PREFIX}+")))
            .map(|_| &local[PREFIX.len() + 1..])?
            .to_ascii_lowercase();
        let (base, mac) = token.rsplit_once('-')?;
        let (id, index) = base.split_once('-')?;
        if id.len() != 20 || mac.len() != MAC_CHARS {
            return None;
        }
        let id = u128::from_str_radix(id, 16).ok()?;
        let index: usize = index.parse().ok()?;
        // Recomputed from the canonical form, so "007" is not index 7.
        let canonical = format!("{id:020x}-{index}");
        if canonical != base {
            return None;
        }
        let expected = self.mac(&canonical);
        // Constant time: the MAC is what keeps forged bounces out.
        let same = expected.len() == mac.len()
            && expected
                .bytes()
                .zip(mac.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        same.then_some((QueueId(id), index))
    }

    fn mac(&self, base: &str) -> String {
        let tag = hmac::sign(&self.key, base.as_bytes());
        base32_lower(&tag.as_ref()[..5])
    }
}

/// RFC 4648 base32 in lower case, without padding (5 bytes → 8 chars).
fn base32_lower(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let (mut acc, mut bits) = (0u64, 0u32);
    for &b in bytes {
        acc = (acc << 8) | u64::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((acc << (5 - bits)) & 31) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verp() -> Verp {
        Verp::new("Bounces.Relay.Example", b"0123456789abcdef0123")
    }

    #[test]
    fn address_round_trips_and_fits_a_local_part() {
        let v = verp();
        let id = QueueId(0x0123_4567_89AB_CDEF_0123);
        let a = v.address(id, 7);
        let (local, domain) = a.rsplit_once('@').unwrap();
        assert_eq!(domain, "bounces.relay.example");
        assert!(local.starts_with("bounces+0123456789abcdef0123-7-"), "{a}");
        assert!(local.len() <= 64);
        assert_eq!(v.decode(&a), Some((id, 7)));
        // Case folded by some MTA on the way back.
        assert_eq!(v.decode(&a.to_ascii_uppercase()), Some((id, 7)));
    }

    #[test]
    fn forged_or_foreign_addresses_are_refused() {
        let v = verp();
        let id = QueueId(42);
        let a = v.address(id, 1);
        let other_index = a.replacen("-1-", "-2-", 1);
        assert_eq!(v.decode(&other_index), None);
        let other_domain = a.replace("bounces.relay.example", "evil.example");
        assert_eq!(v.decode(&other_domain), None);
        let other_key = Verp::new("bounces.relay.example", b"another secret key!!");
        assert_eq!(other_key.decode(&a), None);
        let padded = a.replacen("-1-", "-01-", 1);
        assert_eq!(v.decode(&padded), None);
        for junk in [
            "",
            "@",
            "bounces+@bounces.relay.example",
            "x@bounces.relay.example",
        ] {
            assert_eq!(v.decode(junk), None, "{junk}");
        }
    }

    #[test]
    fn base32_matches_rfc4648() {
        // RFC 4648 §10: BASE32("fooba") = "MZXW6YTB".
        assert_eq!(base32_lower(b"fooba"), "mzxw6ytb");
        assert_eq!(base32_lower(b"f"), "my");
    }
}
