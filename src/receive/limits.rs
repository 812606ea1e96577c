//! Connection limits: how many client connections are open at once, over all
//! listeners and per client IP address (`server.max_connections`,
//! `server.max_connections_per_ip`). A slot is held by a [`ConnSlot`] for as
//! long as its session lives and given back when it is dropped, so no exit
//! path of a session can leak one.
//!
//! IPv6 clients are counted per address, not per /64.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// Which limit refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitHit {
    /// `server.max_connections` connections are open.
    Total(usize),
    /// `server.max_connections_per_ip` connections are open from this IP.
    PerIp(usize),
}

impl LimitHit {
    /// The sentence of the 421 reply: it says which limit was reached, so an
    /// app's operator knows whether to open fewer connections or wait.
    pub fn reply_text(self) -> String {
        match self {
            LimitHit::Total(n) => format!(
                "Too many connections: the server limit of {n} open connections is reached, try again later"
            ),
            LimitHit::PerIp(n) => format!(
                "Too many connections from your IP address (limit {n} at once), try again later"
            ),
        }
    }
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// The shared counters.
pub struct ConnLimits {
    max_total: usize,
    max_per_ip: usize,
    counts: Mutex<Counts>,
}

impl ConnLimits {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<ConnLimits> {
        Arc::new(ConnLimits {
            max_total,
            max_per_ip,
            counts: Mutex::new(Counts::default()),
        })
    }

    /// Takes a slot for a connection from `ip`, or says which limit is full.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnSlot, LimitHit> {
        // A poisoned lock only means a panic elsewhere; the counts are still
        // consistent because every update is a single statement.
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if c.total >= self.max_total {
            return Err(LimitHit::Total(self.max_total));
        }
        let n = c.per_ip.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            return Err(LimitHit::PerIp(self.max_per_ip));
        }
        *n += 1;
        c.total += 1;
        Ok(ConnSlot {
            limits: Arc::clone(self),
            ip,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }

    fn release(&self, ip: IpAddr) {
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&ip);
            }
        }
    }
}

/// One open connection's place in the counts.
pub struct ConnSlot {
    limits: Arc<ConnLimits>,
    ip: IpAddr,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.limits.release(self.ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_ip_and_total_limits() {
        let l = ConnLimits::new(3, 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let s1 = l.acquire(a).unwrap();
        let _s2 = l.acquire(a).unwrap();
        assert_eq!(l.acquire(a).err(), Some(LimitHit::PerIp(2)));
        let _s3 = l.acquire(b).unwrap();
        assert_eq!(l.acquire(b).err(), Some(LimitHit::Total(3)));
        drop(s1);
        assert_eq!(l.open(), 2);
        let _s4 = l.acquire(b).unwrap();
        assert!(LimitHit::PerIp(2).reply_text().contains("IP address"));
    }

    #[test]
    fn released_ips_leave_the_map() {
        let l = ConnLimits::new(10, 10);
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        drop(l.acquire(a).unwrap());
        assert!(l.counts.lock().unwrap().per_ip.is_empty());
        assert_eq!(l.open(), 0);
    }
}
