//! SMTP AUTH (RFC 4954) with the PLAIN (RFC 4616) and LOGIN mechanisms:
//! decoding the client's base64 responses, checking a username and password
//! against the tenants' argon2 hashes, and counting failed attempts per
//! client IP.
//!
//! Input: the SASL lines of an unauthenticated client, trusted in nothing.
//! Passwords stay in [`Credentials`], whose `Debug` hides them, and never
//! reach a log line, an event or a reply.
//!
//! Costs: an argon2 verification takes tens of milliseconds of CPU and
//! ~19 MiB of memory, so it runs on the blocking pool, as many at once as
//! there are cores, each in one of a fixed set of reused work areas (memory
//! stays flat however many clients try), and at most
//! [`VERIFICATIONS_PER_IP`] at once for one client IP. A successful check is
//! remembered for a few minutes under a keyed hash of (username, password):
//! an app opening many connections pays argon2 once, not on every
//! connection, and the cache holds no password.
//!
//! Guessing: failures are counted per client IP when credentials are
//! checked, and the limit is checked again just before each check, so
//! sessions that all sent AUTH before the limit was reached still get
//! `421` once it is (`server.max_auth_failures`).

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use blake2::digest::consts::U32;
use blake2::digest::{KeyInit, Mac};
use tokio::sync::Semaphore;

use super::session::{Mode, Next, Session};
use crate::config::{AuthMode, TenantConfig};
use crate::reply::{Enhanced, Reply, codes};

/// How long a successful verification is remembered.
const CACHE_TTL: Duration = Duration::from_secs(300);
/// Entries kept at most; beyond this the cache is pruned, then emptied.
const CACHE_MAX: usize = 4096;
/// IPs with failures remembered at most before stale ones are pruned.
const FAILURES_PRUNE_AT: usize = 10_000;
/// argon2 checks run at once for one client IP; others from it wait.
pub const VERIFICATIONS_PER_IP: usize = 2;

/// A PHC string to verify against when the username is unknown and there is
/// no tenant at all, so that a wrong username costs as much time as a wrong
/// password (no username oracle). argon2id with the crate's default costs.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$Zb7K+3e0fJrDPGjR2uUnEEc2F5w4ujSgmvNC6uxjl5M";

/// Base64 as RFC 4954 asks, but lenient about missing padding, which some
/// client libraries omit.
const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A username and password taken from a SASL exchange.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    password: Vec<u8>,
}

impl Credentials {
    pub fn new(username: impl Into<String>, password: impl Into<Vec<u8>>) -> Credentials {
        Credentials {
            username: username.into(),
            password: password.into(),
        }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"***")
            .finish()
    }
}

/// Where a SASL exchange stands while the server waits for the client's
/// next line.
#[derive(Clone, PartialEq, Eq)]
pub enum SaslState {
    /// `334 ` sent after `AUTH PLAIN` without an initial response.
    PlainResponse,
    /// `334 VXNlcm5hbWU6` ("Username:") sent.
    LoginUsername,
    /// `334 UGFzc3dvcmQ6` ("Password:") sent.
    LoginPassword { username: String },
}

impl fmt::Debug for SaslState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SaslState::PlainResponse => f.write_str("PlainResponse"),
            SaslState::LoginUsername => f.write_str("LoginUsername"),
            SaslState::LoginPassword { .. } => f.write_str("LoginPassword"),
        }
    }
}

/// What to do after a step of the exchange.
#[derive(Debug, PartialEq, Eq)]
pub enum Sasl {
    /// Send this 334 challenge and wait for a line in this state.
    Challenge(SaslState, Reply),
    /// The client has said who it is; verify.
    Verify(Credentials),
    /// The exchange ends with this error reply (nothing to verify).
    Fail(Reply),
}

fn challenge(text: &str) -> Reply {
    Reply {
        code: 334,
        enhanced: None,
        text: text.to_string(),
    }
}

/// RFC 4954 §4: "*" cancels the exchange.
fn cancelled() -> Reply {
    Reply::new(501, Enhanced(5, 0, 0), "Authentication cancelled")
}

/// RFC 4954 §4: a response that is not base64.
fn bad_base64() -> Reply {
    Reply::new(
        501,
        Enhanced(5, 5, 2),
        "Cannot decode the response: it must be base64",
    )
}

/// 535 5.7.8: the one answer for a wrong username or password alike.
pub fn invalid_credentials() -> Reply {
    Reply::new(535, Enhanced(5, 7, 8), "Authentication credentials invalid")
}

/// Too many failures from one IP in the window.
pub fn too_many_failures() -> Reply {
    Reply::new(
        421,
        Enhanced(4, 7, 0),
        "Too many failed authentication attempts from your IP address, try again later",
    )
}

/// Decodes one client response. `=` stands for an empty one (RFC 4954 §4).
fn decode(line: &str) -> Result<Vec<u8>, Reply> {
    let line = line.trim();
    if line == "*" {
        return Err(cancelled());
    }
    if line == "=" {
        return Ok(Vec::new());
    }
    B64.decode(line).map_err(|_| bad_base64())
}

/// Splits a PLAIN message `[authzid] NUL authcid NUL passwd` (RFC 4616 §2).
/// An authorization identity other than the user's own is refused: herald
/// has no notion of acting for someone else.
pub fn parse_plain(message: &[u8]) -> Result<Credentials, Reply> {
    let malformed = || {
        Reply::new(
            501,
            Enhanced(5, 5, 2),
            "Malformed PLAIN response: expected authzid NUL username NUL password",
        )
    };
    let mut parts = message.splitn(3, |&b| b == 0);
    let (Some(authzid), Some(authcid), Some(password)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed());
    };
    let Ok(username) = std::str::from_utf8(authcid) else {
        return Err(invalid_credentials());
    };
    if username.is_empty() {
        return Err(malformed());
    }
    if !authzid.is_empty() && authzid != authcid {
        return Err(invalid_credentials());
    }
    Ok(Credentials::new(username, password))
}

/// Starts an exchange for `AUTH <mechanism> [initial-response]`; the
/// mechanism is smtp-proto's `AUTH_*` bit.
pub fn start(mechanism: u64, initial_response: &str) -> Sasl {
    let initial = initial_response.trim();
    match mechanism {
        smtp_proto::AUTH_PLAIN if initial.is_empty() => {
            Sasl::Challenge(SaslState::PlainResponse, challenge(""))
        }
        smtp_proto::AUTH_PLAIN => step(SaslState::PlainResponse, initial),
        smtp_proto::AUTH_LOGIN if initial.is_empty() => {
            Sasl::Challenge(SaslState::LoginUsername, challenge("VXNlcm5hbWU6"))
        }
        // Some clients send the username with the command (RFC 4954 allows
        // an initial response for any mechanism).
        smtp_proto::AUTH_LOGIN => step(SaslState::LoginUsername, initial),
        _ => Sasl::Fail(Reply::new(
            504,
            Enhanced(5, 5, 4),
            "Unrecognized authentication mechanism: use PLAIN or LOGIN",
        )),
    }
}

/// Takes the client's next line in `state`.
pub fn step(state: SaslState, line: &str) -> Sasl {
    let decoded = match decode(line) {
        Ok(d) => d,
        Err(reply) => return Sasl::Fail(reply),
    };
    match state {
        SaslState::PlainResponse => match parse_plain(&decoded) {
            Ok(c) => Sasl::Verify(c),
            Err(r) => Sasl::Fail(r),
        },
        SaslState::LoginUsername => match String::from_utf8(decoded) {
            Ok(username) if !username.is_empty() => Sasl::Challenge(
                SaslState::LoginPassword { username },
                challenge("UGFzc3dvcmQ6"),
            ),
            _ => Sasl::Fail(invalid_credentials()),
        },
        SaslState::LoginPassword { username } => Sasl::Verify(Credentials::new(username, decoded)),
    }
}

struct CacheEntry {
    tenant: usize,
    expires: Instant,
}

struct FailureRecord {
    count: u32,
    last: Instant,
}

/// What checking credentials found.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The index of the tenant they belong to.
    Tenant(usize),
    Invalid,
    /// The client's IP has failed too often: nothing was checked.
    Locked,
}

/// Verifies credentials and keeps the per-IP failure counts. One per
/// server, shared by all sessions.
pub struct Authenticator {
    /// Key of the cache's hash; random per process, never leaves memory.
    cache_key: [u8; 32],
    cache: Mutex<HashMap<[u8; 32], CacheEntry>>,
    /// Bounds argon2 runs at once: each one needs a work area of ~19 MiB.
    verify_slots: Semaphore,
    /// The work areas, reused: memory allocated once per slot rather than
    /// per attempt (freed areas of that size are not given back to the OS).
    work_areas: Mutex<Vec<Vec<argon2::Block>>>,
    /// Checks in progress per client IP.
    per_ip: Mutex<HashMap<IpAddr, Arc<Semaphore>>>,
    failures: Mutex<HashMap<IpAddr, FailureRecord>>,
    failure_window: Duration,
    max_failures: u32,
}

impl Authenticator {
    /// `failure_window` is how long a failure is remembered after the last
    /// one from the same IP (`server.auth_failure_window`); `max_failures`
    /// failures within it lock the IP out (`server.max_auth_failures`).
    pub fn new(failure_window: Duration, max_failures: u32) -> Authenticator {
        let slots = std::thread::available_parallelism().map_or(2, |n| n.get());
        Authenticator {
            cache_key: rand::random(),
            cache: Mutex::new(HashMap::new()),
            verify_slots: Semaphore::new(slots),
            work_areas: Mutex::new(Vec::new()),
            per_ip: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            failure_window,
            max_failures,
        }
    }

    /// Whether `ip` has failed `max_failures` times within the window.
    pub fn locked(&self, ip: IpAddr) -> bool {
        self.failures(ip) >= self.max_failures
    }

    /// Checks credentials from `ip`, counting a failure against it.
    pub async fn verify(
        &self,
        ip: IpAddr,
        tenants: &[TenantConfig],
        creds: &Credentials,
    ) -> Verdict {
        if self.locked(ip) {
            return Verdict::Locked;
        }
        let tag = self.tag(creds);
        if let Some(tenant) = self.cached(&tag, tenants, &creds.username) {
            return Verdict::Tenant(tenant);
        }
        let ip_slots = self.ip_slots(ip);
        let Ok(_ip_slot) = ip_slots.acquire().await else {
            return Verdict::Invalid;
        };
        // Checked again after the wait: failures of this IP's other sessions
        // count, and the same credentials may have been verified meanwhile.
        if self.locked(ip) {
            return Verdict::Locked;
        }
        if let Some(tenant) = self.cached(&tag, tenants, &creds.username) {
            return Verdict::Tenant(tenant);
        }
        match self.check(tenants, creds).await {
            Some(tenant) => {
                self.remember(tag, tenant);
                Verdict::Tenant(tenant)
            }
            None => {
                self.record_failure(ip);
                Verdict::Invalid
            }
        }
    }

    /// The semaphore bounding `ip`'s checks in progress.
    fn ip_slots(&self, ip: IpAddr) -> Arc<Semaphore> {
        let mut map = self.per_ip.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= FAILURES_PRUNE_AT {
            // Entries nobody holds or waits on.
            map.retain(|_, s| Arc::strong_count(s) > 1);
        }
        Arc::clone(
            map.entry(ip)
                .or_insert_with(|| Arc::new(Semaphore::new(VERIFICATIONS_PER_IP))),
        )
    }

    /// The argon2 check itself: the tenant index when the password is right.
    async fn check(&self, tenants: &[TenantConfig], creds: &Credentials) -> Option<usize> {
        let index = tenants.iter().position(|t| t.username == creds.username);
        // An unknown user is verified against a real hash anyway, so that the
        // reply takes as long as for a known user with a wrong password.
        let phc = match index {
            Some(i) => tenants[i].password_hash.expose().to_string(),
            None => tenants
                .first()
                .map_or(DUMMY_HASH, |t| t.password_hash.expose())
                .to_string(),
        };
        let password = creds.password.clone();
        let ok = {
            let _slot = self.verify_slots.acquire().await.ok()?;
            let mut area = self
                .work_areas
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop()
                .unwrap_or_default();
            let (ok, area) = tokio::task::spawn_blocking(move || {
                let ok = verify_phc_in(&phc, &password, &mut area);
                (ok, area)
            })
            .await
            .unwrap_or_default();
            if !area.is_empty() {
                self.work_areas
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(area);
            }
            ok
        };
        index.filter(|_| ok)
    }

    /// Failed attempts from `ip` still remembered.
    pub fn failures(&self, ip: IpAddr) -> u32 {
        let map = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        match map.get(&ip) {
            Some(r) if r.last.elapsed() < self.failure_window => r.count,
            _ => 0,
        }
    }

    /// Counts one more failure from `ip`; returns the count now.
    pub fn record_failure(&self, ip: IpAddr) -> u32 {
        let now = Instant::now();
        let window = self.failure_window;
        let mut map = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= FAILURES_PRUNE_AT {
            map.retain(|_, r| now.duration_since(r.last) < window);
        }
        let r = map.entry(ip).or_insert(FailureRecord {
            count: 0,
            last: now,
        });
        if now.duration_since(r.last) >= window {
            r.count = 0;
        }
        r.count = r.count.saturating_add(1);
        r.last = now;
        r.count
    }

    fn tag(&self, creds: &Credentials) -> [u8; 32] {
        // Keyed BLAKE2b: without the key nobody can compute or test a tag,
        // and the length prefix keeps ("ab","c") and ("a","bc") apart.
        let mut mac = <blake2::Blake2bMac<U32> as KeyInit>::new_from_slice(&self.cache_key)
            .expect("a 32-byte key fits BLAKE2b's 64-byte limit");
        mac.update(&(creds.username.len() as u64).to_le_bytes());
        mac.update(creds.username.as_bytes());
        mac.update(&creds.password);
        mac.finalize().into_bytes().into()
    }

    fn cached(&self, tag: &[u8; 32], tenants: &[TenantConfig], username: &str) -> Option<usize> {
        let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        let e = cache.get(tag)?;
        // The tenant must still be the one with this username.
        (e.expires > Instant::now() && tenants.get(e.tenant)?.username == username)
            .then_some(e.tenant)
    }

    fn remember(&self, tag: [u8; 32], tenant: usize) {
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= CACHE_MAX {
            cache.retain(|_, e| e.expires > now);
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(
            tag,
            CacheEntry {
                tenant,
                expires: now + CACHE_TTL,
            },
        );
    }
}

impl Session {
    /// `AUTH <mechanism> [initial-response]`.
    pub(super) async fn auth(&mut self, mechanism: u64, initial_response: &str) -> Next {
        let l = self.listener_cfg();
        if l.auth == AuthMode::None {
            return self.error(codes::not_implemented(
                "Authentication is not offered on this port",
            ));
        }
        if !self.auth_offered() {
            return self.error(codes::tls_required());
        }
        if self.tenant.is_some() {
            return self.error(codes::bad_sequence("Already authenticated"));
        }
        if self.txn.is_some() {
            // RFC 4954 §4: not during a mail transaction.
            return self.error(codes::bad_sequence(
                "AUTH is not allowed during a mail transaction",
            ));
        }
        if self.helo.is_none() {
            return self.error(codes::bad_sequence("Send EHLO first"));
        }
        if self.ctx.auth.locked(self.ip) {
            return self.locked_out();
        }
        self.sasl(start(mechanism, initial_response)).await
    }

    /// `421` and close: this IP failed `server.max_auth_failures` times.
    fn locked_out(&mut self) -> Next {
        tracing::warn!(client_ip = %self.ip, "AUTH refused: too many failures from this address");
        self.mode = Mode::Command;
        self.reply(&too_many_failures());
        Next::Close
    }

    /// A SASL response line (CRLF included) in `state`.
    pub(super) async fn sasl_line(&mut self, state: SaslState, line: &[u8]) -> Next {
        if self.ctx.auth.locked(self.ip) {
            return self.locked_out();
        }
        match std::str::from_utf8(line) {
            Ok(text) => self.sasl(step(state, text)).await,
            Err(_) => self.sasl(Sasl::Fail(bad_base64())).await,
        }
    }

    async fn sasl(&mut self, s: Sasl) -> Next {
        match s {
            Sasl::Challenge(state, reply) => {
                self.mode = Mode::Auth(state);
                self.reply(&reply);
                Next::Continue
            }
            Sasl::Fail(reply) => {
                self.mode = Mode::Command;
                if reply.code == 535 {
                    self.auth_delay().await;
                    self.ctx.auth.record_failure(self.ip);
                    return self.auth_failed(None);
                }
                self.error(reply)
            }
            Sasl::Verify(creds) => {
                self.mode = Mode::Command;
                self.verify(creds).await
            }
        }
    }

    async fn verify(&mut self, creds: Credentials) -> Next {
        self.auth_delay().await;
        let ctx = Arc::clone(&self.ctx);
        // Boxed: holds the blocking task's handle only while it runs.
        match Box::pin(ctx.auth.verify(self.ip, &ctx.config.tenants, &creds)).await {
            Verdict::Tenant(tenant) => {
                self.tenant = Some(tenant);
                self.logged_in();
                tracing::info!(client_ip = %self.ip, tenant = %ctx.config.tenants[tenant].name, "authenticated");
                self.reply(&codes::auth_ok());
                Next::Continue
            }
            Verdict::Invalid => self.auth_failed(Some(&creds.username)),
            Verdict::Locked => self.locked_out(),
        }
    }

    /// Answers 535 to a failure already counted for the client's IP.
    fn auth_failed(&mut self, username: Option<&str>) -> Next {
        let failures = self.ctx.auth.failures(self.ip);
        // The username helps the operator find the misconfigured app; the
        // password never appears anywhere.
        tracing::warn!(
            client_ip = %self.ip,
            username = username.unwrap_or(""),
            failures,
            "authentication failed"
        );
        self.reply(&invalid_credentials());
        Next::Continue
    }

    /// Each failure remembered for this IP delays its AUTH replies by
    /// `server.auth_failure_delay`, which slows password guessing without
    /// costing CPU.
    async fn auth_delay(&self) {
        let failures = self.ctx.auth.failures(self.ip);
        if failures > 0 {
            let delay = self
                .ctx
                .config
                .server
                .auth_failure_delay
                .as_duration()
                .saturating_mul(failures);
            tokio::time::sleep(delay).await;
        }
    }
}

/// A new argon2id PHC string for `password` (`herald hash-password`), with
/// the crate's default costs (19 MiB, 2 passes) and a random salt.
pub fn hash_password(password: &str) -> Result<String, String> {
    use argon2::PasswordHasher as _;
    let mut salt = [0u8; 16];
    rand::fill(&mut salt);
    let salt = argon2::password_hash::SaltString::encode_b64(&salt)
        .map_err(|e| format!("cannot make a salt: {e}"))?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("cannot hash the password: {e}"))
}

/// argon2 verification of `password` against a PHC string, in the work
/// area `memory` (grown as the hash's cost asks, then reused); any parse
/// error is a failure. CPU-heavy: call from the blocking pool.
fn verify_phc_in(phc: &str, password: &[u8], memory: &mut Vec<argon2::Block>) -> bool {
    use argon2::password_hash::Output;
    use argon2::{Algorithm, Argon2, Params, PasswordHash, Version};
    let Ok(hash) = PasswordHash::new(phc) else {
        return false;
    };
    let (Ok(algorithm), Some(salt), Some(expected)) =
        (Algorithm::try_from(hash.algorithm), hash.salt, hash.hash)
    else {
        return false;
    };
    let Ok(version) = hash.version.map(Version::try_from).transpose() else {
        return false;
    };
    let Ok(params) = Params::try_from(&hash) else {
        return false;
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let blocks = params.block_count();
    if memory.len() < blocks {
        memory.resize(blocks, argon2::Block::default());
    }
    let mut out = vec![0u8; expected.len()];
    let argon = Argon2::new(algorithm, version.unwrap_or_default(), params);
    argon
        .hash_password_into_with_memory(password, salt, &mut out, &mut memory[..blocks])
        .is_ok()
        // Output's equality is constant-time.
        && Output::new(&out).is_ok_and(|o| o == expected)
}

#[cfg(test)]
fn verify_phc(phc: &str, password: &[u8]) -> bool {
    verify_phc_in(phc, password, &mut Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn hashed_passwords_verify() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_phc(&h, b"correct horse"));
        assert!(!verify_phc(&h, b"wrong horse"));
        assert_ne!(h, hash_password("correct horse").unwrap(), "salted");
    }

    fn b64(s: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn tenant(name: &str, password: &str) -> TenantConfig {
        use argon2::PasswordHasher as _;
        let salt = argon2::password_hash::SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let phc = argon2::Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .unwrap()
            .to_string();
        TenantConfig {
            name: name.into(),
            username: name.into(),
            password_hash: Secret::new(phc),
            allowed_senders: vec![format!("*@{name}.example")],
            webhook_url: None,
            webhook_secret: None,
            dsn: true,
            smarthost: None,
            bind_from_header: true,
        }
    }

    #[test]
    fn plain_with_initial_response() {
        let s = start(smtp_proto::AUTH_PLAIN, &b64(b"\0acme\0s3cret"));
        assert_eq!(s, Sasl::Verify(Credentials::new("acme", "s3cret")));
        // authzid equal to authcid is fine; another one is not.
        let s = start(smtp_proto::AUTH_PLAIN, &b64(b"acme\0acme\0pw"));
        assert!(matches!(s, Sasl::Verify(_)));
        let s = start(smtp_proto::AUTH_PLAIN, &b64(b"other\0acme\0pw"));
        assert!(matches!(s, Sasl::Fail(r) if r.code == 535));
    }

    #[test]
    fn plain_with_continuation_and_cancel() {
        let Sasl::Challenge(state, r) = start(smtp_proto::AUTH_PLAIN, "") else {
            panic!()
        };
        assert_eq!(r.to_wire(), b"334 \r\n");
        assert!(matches!(step(state.clone(), "*"), Sasl::Fail(r) if r.code == 501));
        assert!(matches!(step(state.clone(), "!!notbase64"), Sasl::Fail(r) if r.code == 501));
        assert!(matches!(step(state.clone(), &b64(b"no-nuls")), Sasl::Fail(r) if r.code == 501));
        assert!(matches!(step(state.clone(), "="), Sasl::Fail(r) if r.code == 501));
        // Unpadded base64 is accepted.
        let unpadded = b64(b"\0acme\0pw").trim_end_matches('=').to_string();
        assert_eq!(
            step(state, &unpadded),
            Sasl::Verify(Credentials::new("acme", "pw"))
        );
    }

    #[test]
    fn login_in_two_steps_or_with_initial_username() {
        let Sasl::Challenge(state, r) = start(smtp_proto::AUTH_LOGIN, "") else {
            panic!()
        };
        assert_eq!(r.to_wire(), b"334 VXNlcm5hbWU6\r\n");
        let Sasl::Challenge(state, r) = step(state, &b64(b"acme")) else {
            panic!()
        };
        assert_eq!(r.to_wire(), b"334 UGFzc3dvcmQ6\r\n");
        assert_eq!(
            step(state, &b64(b"pw")),
            Sasl::Verify(Credentials::new("acme", "pw"))
        );
        let Sasl::Challenge(state, _) = start(smtp_proto::AUTH_LOGIN, &b64(b"acme")) else {
            panic!()
        };
        assert!(matches!(state, SaslState::LoginPassword { .. }));
        assert!(matches!(step(state, "*"), Sasl::Fail(r) if r.code == 501));
    }

    #[test]
    fn unknown_mechanism() {
        assert!(matches!(start(smtp_proto::AUTH_CRAM_MD5, ""), Sasl::Fail(r) if r.code == 504));
    }

    #[test]
    fn passwords_are_not_in_debug_output() {
        let c = Credentials::new("acme", "hunter2");
        assert!(!format!("{c:?}").contains("hunter2"));
        let s = SaslState::LoginPassword {
            username: "acme".into(),
        };
        assert_eq!(format!("{s:?}"), "LoginPassword");
    }

    #[tokio::test]
    async fn verify_checks_hash_and_caches_success() {
        let tenants = vec![tenant("acme", "right"), tenant("globex", "other")];
        let a = Authenticator::new(Duration::from_secs(60), 10);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let v = |u: &'static str, p: &'static str| {
            let (a, tenants) = (&a, &tenants);
            async move { a.verify(ip, tenants, &Credentials::new(u, p)).await }
        };
        assert_eq!(v("acme", "right").await, Verdict::Tenant(0));
        assert_eq!(v("globex", "other").await, Verdict::Tenant(1));
        assert_eq!(v("acme", "wrong").await, Verdict::Invalid);
        assert_eq!(v("nobody", "right").await, Verdict::Invalid);
        // The other tenant's password is not this one's.
        assert_eq!(v("acme", "other").await, Verdict::Invalid);
        // Failures were counted when checked.
        assert_eq!(a.failures(ip), 3);
        // A cached success is found without argon2 (and only for the same pair).
        let tag = a.tag(&Credentials::new("acme", "right"));
        assert_eq!(a.cached(&tag, &tenants, "acme"), Some(0));
        let tag = a.tag(&Credentials::new("acme", "wrong"));
        assert_eq!(a.cached(&tag, &tenants, "acme"), None);
        // One work area per concurrent check, kept for the next.
        assert_eq!(a.work_areas.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_locked_ip_is_refused_even_with_the_right_password() {
        let tenants = vec![tenant("acme", "right")];
        let a = Arc::new(Authenticator::new(Duration::from_secs(60), 3));
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        // Twenty guesses arrive at once, as from twenty sessions at 334.
        let mut guesses = tokio::task::JoinSet::new();
        for i in 0..20 {
            let (a, tenants) = (Arc::clone(&a), tenants.clone());
            guesses.spawn(async move {
                a.verify(ip, &tenants, &Credentials::new("acme", format!("guess{i}")))
                    .await
            });
        }
        let mut checked = 0;
        while let Some(v) = guesses.join_next().await {
            match v.unwrap() {
                Verdict::Invalid => checked += 1,
                Verdict::Locked => {}
                Verdict::Tenant(_) => panic!("a guess logged in"),
            }
        }
        // At most the limit, plus the checks already running when it was
        // reached.
        assert!(
            (3..=3 + VERIFICATIONS_PER_IP).contains(&checked),
            "{checked} guesses were checked"
        );
        assert_eq!(
            a.verify(ip, &tenants, &Credentials::new("acme", "right"))
                .await,
            Verdict::Locked
        );
        let other: IpAddr = "192.0.2.10".parse().unwrap();
        assert_eq!(
            a.verify(other, &tenants, &Credentials::new("acme", "right"))
                .await,
            Verdict::Tenant(0)
        );
    }

    #[test]
    fn failures_are_counted_per_ip_within_the_window() {
        let a = Authenticator::new(Duration::from_secs(60), 10);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(a.failures(ip), 0);
        assert_eq!(a.record_failure(ip), 1);
        assert_eq!(a.record_failure(ip), 2);
        assert_eq!(a.failures(ip), 2);
        assert_eq!(a.failures(other), 0);

        let a = Authenticator::new(Duration::ZERO, 10);
        a.record_failure(ip);
        assert_eq!(a.failures(ip), 0);
        assert_eq!(a.record_failure(ip), 1);
    }
}
