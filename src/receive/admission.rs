//! Limits of the receive stage that protect the server rather than police a
//! tenant: how many client connections are open at once (over all
//! listeners, per client IP, and for clients not known to be good), and how
//! many message bytes are being received at once.
//!
//! A connection slot is held by a [`ConnSlot`] for as long as its session
//! lives and given back when it is dropped, so no exit path of a session can
//! leak one; the same holds for a [`Reservation`] of message bytes.
//!
//! Strangers and known clients: a client is *known* when it connects from a
//! listener's `trusted_networks` or from an IP that logged in successfully
//! within `server.auth_known_for`. Clients not known may hold at most
//! `server.max_unauthenticated_per_ip` connections per IP and cannot take
//! the last `server.reserved_connections` slots, so a flood from strangers
//! (or a password-guessing botnet) never locks the apps out. A session that
//! logs in stops counting as a stranger's. The known IPs are kept in
//! `known_clients.json` in the spool directory, so that a restart (or a
//! flood right after one) does not turn the apps into strangers.
//!
//! IPv6 clients are counted per address, not per /64.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::clock::unix_now;

/// Known IPs remembered at most before expired ones are pruned.
const KNOWN_PRUNE_AT: usize = 100_000;
/// A known IP's saved expiry is renewed once it is this much out of date.
const KNOWN_RESAVE_AFTER: u64 = 86_400;
/// The file of known IPs, in the spool directory.
pub const KNOWN_FILE: &str = "known_clients.json";

/// Which limit refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitHit {
    /// `server.max_connections` connections are open.
    Total(usize),
    /// `server.max_connections_per_ip` connections are open from this IP.
    PerIp(usize),
    /// The slots strangers may use are taken; the rest are reserved.
    Reserved(usize),
    /// `server.max_unauthenticated_per_ip` connections that have not
    /// logged in are open from this IP.
    UnknownPerIp(usize),
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
            LimitHit::Reserved(_) => "Too many connections: the server is busy, and its remaining connections are kept for clients that have logged in before; try again later".to_string(),
            LimitHit::UnknownPerIp(n) => format!(
                "Too many connections from your IP address that have not logged in (limit {n} at once until a login succeeds), try again later"
            ),
        }
    }
}

#[derive(Default)]
struct PerIp {
    all: usize,
    unknown: usize,
}

#[derive(Default)]
struct Counts {
    total: usize,
    unknown: usize,
    per_ip: HashMap<IpAddr, PerIp>,
}

/// The shared counters.
pub struct ConnLimits {
    max_total: usize,
    max_per_ip: usize,
    max_unknown_per_ip: usize,
    /// Slots strangers may use: `max_total` less the reserve.
    max_unknown: usize,
    counts: Mutex<Counts>,
    /// IPs that logged in, and until when (Unix seconds) they count as known.
    known: Mutex<HashMap<IpAddr, u64>>,
    known_for: Duration,
    /// Where the known IPs are kept across restarts; the lock orders saves.
    known_file: Option<PathBuf>,
    save_lock: Mutex<()>,
}

/// The settings of [`ConnLimits`], from `[server]`.
#[derive(Clone, Debug)]
pub struct ConnLimitsConfig {
    pub max_total: usize,
    pub max_per_ip: usize,
    pub max_unknown_per_ip: usize,
    pub reserved: usize,
    pub known_for: Duration,
    /// Where known IPs are kept across restarts (none: in memory only).
    pub known_file: Option<PathBuf>,
}

impl ConnLimitsConfig {
    /// The limits `[server]` asks for, with `max_connections` lowered to
    /// `fd_capacity` when the process may not open that many sockets.
    pub fn from_server(s: &crate::config::ServerConfig, fd_capacity: Option<usize>) -> Self {
        let max_total = match fd_capacity {
            Some(cap) => s.max_connections.min(cap.max(1)),
            None => s.max_connections,
        };
        let reserved = s
            .reserved_connections
            .unwrap_or(s.max_connections / 10)
            .min(max_total.saturating_sub(1));
        ConnLimitsConfig {
            max_total,
            max_per_ip: s.max_connections_per_ip,
            max_unknown_per_ip: s.max_unauthenticated_per_ip,
            reserved,
            known_for: s.auth_known_for.as_duration(),
            known_file: Some(s.spool_dir.join(KNOWN_FILE)),
        }
    }
}

impl ConnLimits {
    pub fn new(c: ConnLimitsConfig) -> Arc<ConnLimits> {
        let known = c.known_file.as_deref().map(load_known).unwrap_or_default();
        Arc::new(ConnLimits {
            max_total: c.max_total,
            max_per_ip: c.max_per_ip,
            max_unknown_per_ip: c.max_unknown_per_ip.min(c.max_per_ip),
            max_unknown: c.max_total - c.reserved.min(c.max_total),
            counts: Mutex::new(Counts::default()),
            known: Mutex::new(known),
            known_for: c.known_for,
            known_file: c.known_file,
            save_lock: Mutex::new(()),
        })
    }

    /// The most connections taken at once (`server.max_connections`, or
    /// less when the file-descriptor limit is lower).
    pub fn max_total(&self) -> usize {
        self.max_total
    }

    /// Whether `ip` logged in successfully within `server.auth_known_for`.
    pub fn is_known(&self, ip: IpAddr) -> bool {
        let known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        known.get(&ip).is_some_and(|until| *until > unix_now())
    }

    /// Takes a slot for a connection from `ip`, or says which limit is full.
    /// `known`: the client is trusted or logged in recently.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr, known: bool) -> Result<ConnSlot, LimitHit> {
        // A poisoned lock only means a panic elsewhere; the counts are still
        // consistent because every update is a single statement.
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if c.total >= self.max_total {
            return Err(LimitHit::Total(self.max_total));
        }
        if !known && c.unknown >= self.max_unknown {
            return Err(LimitHit::Reserved(self.max_unknown));
        }
        let n = c.per_ip.entry(ip).or_default();
        if n.all >= self.max_per_ip {
            return Err(LimitHit::PerIp(self.max_per_ip));
        }
        if !known && n.unknown >= self.max_unknown_per_ip {
            return Err(LimitHit::UnknownPerIp(self.max_unknown_per_ip));
        }
        n.all += 1;
        if !known {
            n.unknown += 1;
            c.unknown += 1;
        }
        c.total += 1;
        Ok(ConnSlot {
            limits: Arc::clone(self),
            ip,
            unknown: !known,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }

    fn release(&self, ip: IpAddr, unknown: bool) {
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        c.total = c.total.saturating_sub(1);
        if unknown {
            c.unknown = c.unknown.saturating_sub(1);
        }
        if let Some(n) = c.per_ip.get_mut(&ip) {
            n.all = n.all.saturating_sub(1);
            if unknown {
                n.unknown = n.unknown.saturating_sub(1);
            }
            if n.all == 0 {
                c.per_ip.remove(&ip);
            }
        }
    }

    fn forget_unknown(&self, ip: IpAddr) {
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        c.unknown = c.unknown.saturating_sub(1);
        if let Some(n) = c.per_ip.get_mut(&ip) {
            n.unknown = n.unknown.saturating_sub(1);
        }
    }

    fn remember_login(self: &Arc<Self>, ip: IpAddr) {
        let now = unix_now();
        let until = now.saturating_add(self.known_for.as_secs());
        let stale = {
            let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
            if known.len() >= KNOWN_PRUNE_AT {
                known.retain(|_, u| *u > now);
            }
            let before = known.insert(ip, until);
            before.is_none_or(|b| b + KNOWN_RESAVE_AFTER < until)
        };
        if stale && self.known_file.is_some() {
            // A new (or long unseen) IP: rare, so each is saved at once.
            let me = Arc::clone(self);
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(rt.spawn_blocking(move || me.save_known())),
                Err(_) => me.save_known(),
            }
        }
    }

    /// Writes the known IPs to their file (temp file, fsync, rename).
    fn save_known(&self) {
        let Some(path) = &self.known_file else {
            return;
        };
        // Serialised, and each save takes the map as it is then: the last
        // save writes the newest state.
        let _order = self
            .save_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = unix_now();
        let entries: Vec<(IpAddr, u64)> = self
            .known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(_, u)| **u > now)
            .map(|(ip, u)| (*ip, *u))
            .collect();
        let result = (|| {
            let tmp = path.with_extension("json.tmp");
            let mut f = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut f, &serde_json::to_vec(&entries)?)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), error = %e, "cannot save the IPs that logged in; after a restart they count as strangers until they log in again");
        }
    }
}

/// One open connection's place in the counts.
pub struct ConnSlot {
    limits: Arc<ConnLimits>,
    ip: IpAddr,
    /// Counted as a stranger's connection.
    unknown: bool,
}

impl ConnSlot {
    /// The client logged in: its IP is known from now on, and this
    /// connection no longer counts against the strangers' limits.
    pub fn logged_in(&mut self) {
        self.limits.remember_login(self.ip);
        if std::mem::take(&mut self.unknown) {
            self.limits.forget_unknown(self.ip);
        }
    }
}

/// The known IPs saved by an earlier run, without the expired ones. A
/// missing or unreadable file only means nobody is known yet.
fn load_known(path: &std::path::Path) -> HashMap<IpAddr, u64> {
    let now = unix_now();
    match std::fs::read(path) {
        Ok(bytes) => match serde_json::from_slice::<Vec<(IpAddr, u64)>>(&bytes) {
            Ok(entries) => entries.into_iter().filter(|(_, u)| *u > now).collect(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable file of IPs that logged in");
                HashMap::new()
            }
        },
        Err(_) => HashMap::new(),
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.limits.release(self.ip, self.unknown);
    }
}

/// The file descriptors this process may use for client connections: its
/// open-files limit less a reserve for the spool, delivery connections,
/// DNS, the admin API and logs. `None` when the limit is unknown or
/// unlimited.
pub fn fd_capacity() -> Option<usize> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0
        || lim.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    let soft = usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX);
    Some(soft - fd_reserve(soft))
}

/// Descriptors kept for everything but client connections.
fn fd_reserve(soft: usize) -> usize {
    (soft / 4).clamp(16, 1024).min(soft)
}

/// Raises the soft open-files limit to the hard one, as far as the system
/// allows; returns the soft limit now in force.
pub fn raise_fd_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write only the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    Some(lim.rlim_cur)
}

/// Message bytes being received at once, over all sessions
/// (`server.max_receiving_bytes`).
pub struct ByteBudget {
    limit: usize,
    used: AtomicUsize,
}

impl ByteBudget {
    pub fn new(limit: usize) -> Arc<ByteBudget> {
        Arc::new(ByteBudget {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    /// Bytes reserved now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Reserves `bytes`, or `None` when that would go over the limit.
    pub fn reserve(self: &Arc<Self>, bytes: usize) -> Option<Reservation> {
        let mut r = Reservation {
            budget: Arc::clone(self),
            bytes: 0,
        };
        r.grow_to(bytes).then_some(r)
    }

    fn take(&self, more: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(more).filter(|&n| n <= self.limit)
            })
            .is_ok()
    }
}

/// Bytes of a [`ByteBudget`] held by one message being received.
pub struct Reservation {
    budget: Arc<ByteBudget>,
    bytes: usize,
}

impl Reservation {
    /// Holds at least `bytes` in all; false (and nothing more held) when the
    /// budget cannot give them.
    pub fn grow_to(&mut self, bytes: usize) -> bool {
        if bytes <= self.bytes {
            return true;
        }
        if !self.budget.take(bytes - self.bytes) {
            return false;
        }
        self.bytes = bytes;
        true
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_total: usize, max_per_ip: usize) -> Arc<ConnLimits> {
        ConnLimits::new(ConnLimitsConfig {
            max_total,
            max_per_ip,
            max_unknown_per_ip: max_per_ip,
            reserved: 0,
            known_for: Duration::from_secs(60),
            known_file: None,
        })
    }

    #[test]
    fn per_ip_and_total_limits() {
        let l = limits(3, 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let s1 = l.acquire(a, true).unwrap();
        let _s2 = l.acquire(a, true).unwrap();
        assert_eq!(l.acquire(a, true).err(), Some(LimitHit::PerIp(2)));
        let _s3 = l.acquire(b, true).unwrap();
        assert_eq!(l.acquire(b, true).err(), Some(LimitHit::Total(3)));
        drop(s1);
        assert_eq!(l.open(), 2);
        let _s4 = l.acquire(b, true).unwrap();
        assert!(LimitHit::PerIp(2).reply_text().contains("IP address"));
    }

    #[test]
    fn released_ips_leave_the_map() {
        let l = limits(10, 10);
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        drop(l.acquire(a, false).unwrap());
        assert!(l.counts.lock().unwrap().per_ip.is_empty());
        assert_eq!(l.open(), 0);
        assert_eq!(l.counts.lock().unwrap().unknown, 0);
    }

    #[test]
    fn strangers_are_capped_and_leave_the_reserve_to_known_clients() {
        let l = ConnLimits::new(ConnLimitsConfig {
            max_total: 10,
            max_per_ip: 8,
            max_unknown_per_ip: 2,
            reserved: 4,
            known_for: Duration::from_secs(60),
            known_file: None,
        });
        let ip = |i: u8| IpAddr::from([192, 0, 2, i]);
        let mut held = Vec::new();
        held.push(l.acquire(ip(1), false).unwrap());
        held.push(l.acquire(ip(1), false).unwrap());
        assert_eq!(
            l.acquire(ip(1), false).err(),
            Some(LimitHit::UnknownPerIp(2))
        );
        for i in 2..=3 {
            for _ in 0..2 {
                held.push(l.acquire(ip(i), false).unwrap());
            }
        }
        // Six strangers' slots taken: the last four are reserved.
        assert_eq!(l.acquire(ip(9), false).err(), Some(LimitHit::Reserved(6)));
        assert!(!l.is_known(ip(1)));
        // A known client still gets in, up to the total.
        let mut app = Vec::new();
        for _ in 0..4 {
            app.push(l.acquire(ip(7), true).unwrap());
        }
        assert_eq!(l.acquire(ip(7), true).err(), Some(LimitHit::Total(10)));
        // A stranger's session that logs in frees a stranger's slot and makes
        // its IP known.
        held[0].logged_in();
        assert!(l.is_known(ip(1)));
        assert!(l.acquire(ip(9), false).is_err(), "the total is still full");
        drop(app.pop());
        let _s = l.acquire(ip(9), false).unwrap();
        drop(held);
        drop(app);
        let c = l.counts.lock().unwrap();
        assert_eq!((c.total, c.unknown), (1, 1));
    }

    #[test]
    fn known_ips_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let config = |known_for: u64| ConnLimitsConfig {
            max_total: 10,
            max_per_ip: 10,
            max_unknown_per_ip: 1,
            reserved: 0,
            known_for: Duration::from_secs(known_for),
            known_file: Some(dir.path().join(KNOWN_FILE)),
        };
        let l = ConnLimits::new(config(3600));
        let app: IpAddr = "192.0.2.20".parse().unwrap();
        let mut slot = l.acquire(app, false).unwrap();
        slot.logged_in();
        drop(slot);
        drop(l);
        let l = ConnLimits::new(config(3600));
        assert!(l.is_known(app));
        assert!(!l.is_known("192.0.2.21".parse().unwrap()));
        // Garbage in the file: nobody is known, nothing fails.
        std::fs::write(dir.path().join(KNOWN_FILE), b"{not json").unwrap();
        assert!(!ConnLimits::new(config(3600)).is_known(app));
    }

    #[test]
    fn the_fd_limit_lowers_max_connections() {
        let s = crate::config::ServerConfig::default();
        let c = ConnLimitsConfig::from_server(&s, Some(768));
        assert_eq!(c.max_total, 768);
        assert!(c.reserved < c.max_total);
        let c = ConnLimitsConfig::from_server(&s, None);
        assert_eq!((c.max_total, c.reserved), (10_000, 1_000));
        assert_eq!(fd_reserve(1024), 256);
        assert_eq!(fd_reserve(100_000), 1024);
        assert_eq!(fd_reserve(8), 8);
    }

    #[test]
    fn byte_budget_refuses_over_the_limit_and_returns_on_drop() {
        let b = ByteBudget::new(100);
        let mut r1 = b.reserve(60).unwrap();
        assert!(b.reserve(50).is_none());
        assert!(!r1.grow_to(101));
        assert_eq!(r1.bytes(), 60);
        assert!(r1.grow_to(100));
        assert_eq!(b.used(), 100);
        drop(r1);
        assert_eq!(b.used(), 0);
        let _r2 = b.reserve(100).unwrap();
    }
}
