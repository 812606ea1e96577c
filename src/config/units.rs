//! The small languages of the config file, parsed once at load:
//! durations (`"30s"`, `"5m"`, `"1h30m"`, `"5d"`), sizes (`"25MiB"`) and
//! rates (`"500/h"`, `"20/s burst 40"`).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written as `"250ms"`, `"30s"`, `"5m"`, `"1h"`, `"5d"` or a
/// sum of them (`"1h30m"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Span(pub Duration);

impl Span {
    pub fn parse(s: &str) -> Result<Span, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty duration; write e.g. \"30s\", \"5m\", \"1h\" or \"5d\"".into());
        }
        let mut total = Duration::ZERO;
        let mut rest = s;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(format!(
                    "invalid duration {s:?}: expected a number before {rest:?}; write e.g. \"30s\", \"5m\", \"1h\" or \"5d\""
                ));
            }
            let n: u64 = rest[..digits]
                .parse()
                .map_err(|_| format!("invalid duration {s:?}: number too large"))?;
            rest = &rest[digits..];
            let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
            let unit = &rest[..unit_len];
            rest = &rest[unit_len..];
            let one_ms: u64 = match unit {
                "ms" => 1,
                "s" => 1000,
                "m" => 60_000,
                "h" => 3_600_000,
                "d" => 86_400_000,
                "" => {
                    return Err(format!(
                        "invalid duration {s:?}: a unit is required (ms, s, m, h or d)"
                    ));
                }
                other => {
                    return Err(format!(
                        "invalid duration {s:?}: unknown unit {other:?} (use ms, s, m, h or d)"
                    ));
                }
            };
            // In u64 milliseconds, so that every value Display writes
            // (e.g. "4320000001ms" for "50d1ms") parses back.
            total = n
                .checked_mul(one_ms)
                .and_then(|ms| total.checked_add(Duration::from_millis(ms)))
                .ok_or_else(|| format!("invalid duration {s:?}: too large"))?;
        }
        Ok(Span(total))
    }

    pub fn as_duration(self) -> Duration {
        self.0
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.as_secs();
        if self.0.subsec_millis() != 0 || secs == 0 {
            write!(f, "{}ms", self.0.as_millis())
        } else if secs.is_multiple_of(86400) {
            write!(f, "{}d", secs / 86400)
        } else if secs.is_multiple_of(3600) {
            write!(f, "{}h", secs / 3600)
        } else if secs.is_multiple_of(60) {
            write!(f, "{}m", secs / 60)
        } else {
            write!(f, "{secs}s")
        }
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Span::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Span {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A byte count written as `"25MiB"`, `"512KiB"`, `"10MB"`, `"1GiB"` or a
/// bare integer of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl Size {
    pub fn parse(s: &str) -> Result<Size, String> {
        let t = s.trim();
        let digits = t.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!(
                "invalid size {s:?}: write e.g. \"25MiB\", \"512KiB\" or a number of bytes"
            ));
        }
        let n: u64 = t[..digits]
            .parse()
            .map_err(|_| format!("invalid size {s:?}: number too large"))?;
        let mult: u64 = match t[digits..].trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "KB" | "kB" => 1000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            other => {
                return Err(format!(
                    "invalid size {s:?}: unknown unit {other:?} (use B, KiB, MiB, GiB, KB, MB or GB)"
                ));
            }
        };
        n.checked_mul(mult)
            .map(Size)
            .ok_or_else(|| format!("invalid size {s:?}: too large"))
    }

    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        if n != 0 && n.is_multiple_of(1 << 30) {
            write!(f, "{}GiB", n >> 30)
        } else if n != 0 && n.is_multiple_of(1 << 20) {
            write!(f, "{}MiB", n >> 20)
        } else if n != 0 && n.is_multiple_of(1 << 10) {
            write!(f, "{}KiB", n >> 10)
        } else {
            write!(f, "{n}")
        }
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Size(n)),
            Raw::Str(s) => Size::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A rate limit written as `"<count>/<unit>"` with an optional burst:
/// `"500/h"`, `"20/s"`, `"3000/h"`, `"20/s burst 40"`. Units: `s`, `m`
/// (or `min`), `h`, `d`. The burst is how many may pass at once after a
/// quiet spell; without one it is the count (`"500/h"` lets 500 through at
/// once, then one every 7.2 s), as in KumoMTA's throttles and governor.
/// Enforced as GCRA: one unit of the limit every `period / count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rate {
    /// How many per `per`.
    pub count: u32,
    pub per: Duration,
    /// At most this many at once (>= 1).
    pub burst: u32,
}

impl Rate {
    pub fn parse(s: &str) -> Result<Rate, String> {
        let hint = "write e.g. \"500/h\", \"20/s\" or \"20/s burst 40\"";
        let t = s.trim();
        let (rate, burst) = match t.split_once("burst") {
            Some((r, b)) => (r.trim(), Some(b.trim())),
            None => (t, None),
        };
        let Some((n, unit)) = rate.split_once('/') else {
            return Err(format!("invalid rate {s:?}: {hint}"));
        };
        let count: u32 = n.trim().parse().map_err(|_| {
            format!(
                "invalid rate {s:?}: {:?} is not a whole number; {hint}",
                n.trim()
            )
        })?;
        if count == 0 {
            return Err(format!(
                "invalid rate {s:?}: the count must be at least 1 (leave the key out for no limit)"
            ));
        }
        let per = match unit.trim() {
            "s" | "sec" => Duration::from_secs(1),
            "m" | "min" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            "d" | "day" => Duration::from_secs(86400),
            other => {
                return Err(format!(
                    "invalid rate {s:?}: unknown unit {other:?} (use s, m, h or d)"
                ));
            }
        };
        let burst = match burst {
            None => count,
            Some(b) => match b.parse::<u32>() {
                Ok(0) => return Err(format!("invalid rate {s:?}: the burst must be at least 1")),
                Ok(b) => b,
                Err(_) => {
                    return Err(format!(
                        "invalid rate {s:?}: the burst {b:?} is not a whole number; {hint}"
                    ));
                }
            },
        };
        Ok(Rate { count, per, burst })
    }

    /// The time one unit of the limit takes to replenish (GCRA's emission
    /// interval `T`).
    pub fn interval(&self) -> Duration {
        self.per / self.count
    }

    /// The unit as a word: `"second"`, `"minute"`, `"hour"`, `"day"`.
    pub fn unit_name(&self) -> &'static str {
        match self.per.as_secs() {
            1 => "second",
            60 => "minute",
            3600 => "hour",
            _ => "day",
        }
    }

    fn unit_symbol(&self) -> &'static str {
        match self.per.as_secs() {
            1 => "s",
            60 => "m",
            3600 => "h",
            _ => "d",
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, self.unit_symbol())?;
        if self.burst != self.count {
            write!(f, " burst {}", self.burst)?;
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Rate::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(Span::parse("30s").unwrap().0, Duration::from_secs(30));
        assert_eq!(Span::parse("5m").unwrap().0, Duration::from_secs(300));
        assert_eq!(Span::parse("1h30m").unwrap().0, Duration::from_secs(5400));
        assert_eq!(Span::parse("5d").unwrap().0, Duration::from_secs(432_000));
        assert_eq!(Span::parse("250ms").unwrap().0, Duration::from_millis(250));
        assert!(Span::parse("30").unwrap_err().contains("unit is required"));
        assert!(Span::parse("3w").unwrap_err().contains("unknown unit"));
        assert!(Span::parse("").is_err());
        assert!(Span::parse("h").is_err());
        assert!(Span::parse("99999999999999999999s").is_err());
    }

    #[test]
    fn duration_display_round_trips() {
        for s in ["30s", "5m", "4h", "5d", "250ms"] {
            assert_eq!(Span::parse(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(Size::parse("25MiB").unwrap().0, 25 << 20);
        assert_eq!(Size::parse("512KiB").unwrap().0, 512 << 10);
        assert_eq!(Size::parse("10MB").unwrap().0, 10_000_000);
        assert_eq!(Size::parse("1024").unwrap().0, 1024);
        assert!(Size::parse("25 parsecs").is_err());
        assert!(Size::parse("MiB").is_err());
        assert_eq!(Size(25 << 20).to_string(), "25MiB");
    }

    #[test]
    fn rates() {
        let r = Rate::parse("500/h").unwrap();
        assert_eq!(
            (r.count, r.per, r.burst),
            (500, Duration::from_secs(3600), 500)
        );
        assert_eq!(r.interval(), Duration::from_millis(7200));
        let r = Rate::parse(" 20/s burst 40 ").unwrap();
        assert_eq!((r.count, r.per, r.burst), (20, Duration::from_secs(1), 40));
        assert_eq!(r.interval(), Duration::from_millis(50));
        assert_eq!(Rate::parse("3/min").unwrap().per, Duration::from_secs(60));
        assert_eq!(Rate::parse("1/d burst 1").unwrap().burst, 1);
        assert!(Rate::parse("500").unwrap_err().contains("write e.g."));
        assert!(Rate::parse("0/h").unwrap_err().contains("at least 1"));
        assert!(Rate::parse("5/w").unwrap_err().contains("unknown unit"));
        assert!(
            Rate::parse("x/s")
                .unwrap_err()
                .contains("not a whole number")
        );
        assert!(
            Rate::parse("5/s burst 0")
                .unwrap_err()
                .contains("burst must be")
        );
        assert!(Rate::parse("5/s burst lots").unwrap_err().contains("burst"));
        assert!(Rate::parse("-5/s").is_err());
    }

    #[test]
    fn rate_display_round_trips() {
        for s in ["500/h", "20/s", "20/s burst 40", "3/m", "7/d burst 1"] {
            assert_eq!(Rate::parse(s).unwrap().to_string(), s);
        }
    }
}
