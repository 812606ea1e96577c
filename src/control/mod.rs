//! Control: the postmaster's pauses, kept durably.
//!
//! - **Suspended delivery** to a destination domain or for a tenant: mail is
//!   accepted as usual and stays queued; delivery hands such jobs straight
//!   back ([`Control::hold_if_suspended`]) and the queue keeps them held:
//!   no connection, no attempt counted, no event, nothing bounces. A held recipient is looked at again
//!   every [`HOLD_RECHECK`] (a safety net only): a resume makes the
//!   recipients concerned due at once (see `admin::control`).
//!   The queue lifetime keeps running, counted from acceptance as always,
//!   but it is enforced only at a real attempt: nothing expires while
//!   suspended; after a resume a recipient past its lifetime gets one
//!   attempt, and expires if that one is deferred. This is what Postfix does
//!   with mail on hold (it does not expire on hold, and becomes subject to
//!   expiry once released): the suspension itself never bounces mail.
//! - **Paused submissions** of a tenant, set by the reputation guard
//!   ([`reputation`]): its MAIL FROM is refused (`[reputation] reply`) until
//!   a postmaster resumes it. Mail it already queued is still delivered.
//!
//! The state lives in `control.json` in `server.spool_dir`, rewritten whole
//! on each change (write to a temporary file, fsync, rename, fsync the
//! directory) and read at start; a file that cannot be read stops the start
//! rather than silently resuming what a postmaster suspended. The
//! reputation windows are in memory only: a restart starts them afresh.
//!
//! Trust: domain and tenant names come from the postmaster (admin API) and
//! are checked for shape; tenants must exist in the config.

pub mod reputation;

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::rfc3339;
use crate::clock::unix_now;
use crate::config::Config;
use crate::reply::{Enhanced, Reply};
use crate::report::{Classification, Event, EventKind};
pub use reputation::{PauseReply, Rates, ReputationConfig, Window};

/// How long a held (suspended) recipient waits before delivery looks at it
/// again. Only a safety net: a resume makes the recipients concerned due at
/// once. Long, so that a large suspended backlog is not read back from the
/// spool over and over.
pub const HOLD_RECHECK: Duration = Duration::from_secs(300);

/// The state file's name in `server.spool_dir`.
pub const STATE_FILE: &str = "control.json";

/// A suspension of delivery (of a domain or a tenant).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suspension {
    /// Unix seconds.
    pub since: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A tenant whose submissions are paused for its reputation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pause {
    /// Unix seconds.
    pub since: u64,
    /// The sentence that names the rate over its limit.
    pub reason: String,
    /// The window when the pause began.
    pub rates: Rates,
}

/// What `control.json` holds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct State {
    #[serde(default)]
    suspended_domains: BTreeMap<String, Suspension>,
    #[serde(default)]
    suspended_tenants: BTreeMap<String, Suspension>,
    #[serde(default)]
    paused_tenants: BTreeMap<String, Pause>,
}

/// What a change through the admin API may run into.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A domain or tenant name of the wrong shape, or an unknown tenant.
    #[error("{0}")]
    Invalid(String),
    /// The change is in force but not on disk: it will not survive a
    /// restart.
    #[error(
        "the change is in force but could not be saved to {path}: {source}; it will be lost at restart"
    )]
    Save {
        path: String,
        source: std::io::Error,
    },
}

/// What suspensions and pauses there are now.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub suspended_domains: BTreeMap<String, Suspension>,
    pub suspended_tenants: BTreeMap<String, Suspension>,
    pub paused_tenants: BTreeMap<String, Pause>,
}

/// The control state of one node. Cheap to clone: every clone shares it.
#[derive(Clone)]
pub struct Control {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None`: kept in memory only (tests, tools).
    path: Option<PathBuf>,
    state: Mutex<State>,
    /// Any delivery suspension at all: the check delivery makes per job
    /// costs one atomic load while there is none.
    any_suspended: AtomicBool,
    any_paused: AtomicBool,
    /// Held while delivery checks a job and hands it back, and while a
    /// suspension is lifted: a resume then either comes before the check
    /// (the job goes out) or after the job is back in the queue (and the
    /// resume's retry finds it), never in between.
    gate: Mutex<()>,
    /// One writer of the state file at a time; each writes the latest state.
    writer: Mutex<()>,
    reputation: ReputationConfig,
    windows: Mutex<HashMap<String, Window>>,
    /// Configured tenants, for checking names given by the postmaster.
    tenants: Vec<String>,
    /// `postmaster@<server.hostname>`, named in the refusal.
    postmaster: String,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The state is replaced whole or changed in one step: a panic elsewhere
    // cannot leave it half-written.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A destination domain as the queue keeps it: lower case, no final dot.
pub fn normalize_domain(d: &str) -> Result<String, String> {
    let d = d.trim().trim_end_matches('.').to_lowercase();
    let bad = d.is_empty()
        || d.len() > 253
        || d.split('.').any(str::is_empty)
        || d.chars().any(|c| {
            c.is_whitespace()
                || c.is_control()
                || matches!(
                    c,
                    '@' | '/' | '\\' | '<' | '>' | '[' | ']' | ',' | ';' | ':'
                )
        });
    if bad {
        return Err(format!(
            "{d:?} is not a domain name: give the recipient domain, e.g. \"example.com\""
        ));
    }
    Ok(d)
}

impl Control {
    /// Loads `control.json` from `server.spool_dir` (none yet = nothing
    /// suspended). A file that exists but cannot be read or parsed is an
    /// error.
    pub fn open(config: &Config) -> std::io::Result<Control> {
        let path = config.server.spool_dir.join(STATE_FILE);
        let state = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<State>(&bytes).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(e),
        };
        let control = Control::build(config, Some(path), state);
        let s = control.snapshot();
        if !s.suspended_domains.is_empty() || !s.suspended_tenants.is_empty() {
            tracing::warn!(
                domains = ?s.suspended_domains.keys().collect::<Vec<_>>(),
                tenants = ?s.suspended_tenants.keys().collect::<Vec<_>>(),
                "delivery is suspended (herald resume ...)"
            );
        }
        if !s.paused_tenants.is_empty() {
            tracing::warn!(
                tenants = ?s.paused_tenants.keys().collect::<Vec<_>>(),
                "tenant submissions are paused for reputation (herald tenant resume NAME)"
            );
        }
        Ok(control)
    }

    /// A control kept in memory only, with the config's tenants and
    /// `[reputation]`.
    pub fn in_memory(config: &Config) -> Control {
        Control::build(config, None, State::default())
    }

    /// A control with nothing suspended, no tenants and the guard off, kept
    /// in memory (for a stage started without one).
    pub fn empty() -> Control {
        Control::from_parts(
            None,
            State::default(),
            ReputationConfig {
                enabled: false,
                ..ReputationConfig::default()
            },
            Vec::new(),
            "postmaster".into(),
        )
    }

    fn build(config: &Config, path: Option<PathBuf>, state: State) -> Control {
        Control::from_parts(
            path,
            state,
            config.reputation.clone(),
            config.tenants.iter().map(|t| t.name.clone()).collect(),
            format!("postmaster@{}", config.server.hostname),
        )
    }

    fn from_parts(
        path: Option<PathBuf>,
        state: State,
        reputation: ReputationConfig,
        tenants: Vec<String>,
        postmaster: String,
    ) -> Control {
        let any_suspended =
            !state.suspended_domains.is_empty() || !state.suspended_tenants.is_empty();
        let any_paused = !state.paused_tenants.is_empty();
        Control {
            inner: Arc::new(Inner {
                path,
                state: Mutex::new(state),
                any_suspended: AtomicBool::new(any_suspended),
                any_paused: AtomicBool::new(any_paused),
                gate: Mutex::new(()),
                writer: Mutex::new(()),
                reputation,
                windows: Mutex::new(HashMap::new()),
                tenants,
                postmaster,
            }),
        }
    }

    /// Where the state is kept (`None` in memory).
    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    pub fn reputation_config(&self) -> &ReputationConfig {
        &self.inner.reputation
    }

    /// Every suspension and pause now.
    pub fn snapshot(&self) -> Snapshot {
        let st = lock(&self.inner.state);
        Snapshot {
            suspended_domains: st.suspended_domains.clone(),
            suspended_tenants: st.suspended_tenants.clone(),
            paused_tenants: st.paused_tenants.clone(),
        }
    }

    /// (suspended domains, suspended tenants, paused tenants), for metrics.
    pub fn counts(&self) -> (usize, usize, usize) {
        let st = lock(&self.inner.state);
        (
            st.suspended_domains.len(),
            st.suspended_tenants.len(),
            st.paused_tenants.len(),
        )
    }

    /// Checks that `name` is a configured tenant.
    pub fn check_tenant(&self, name: &str) -> Result<(), ControlError> {
        if self.inner.tenants.iter().any(|t| t == name) {
            return Ok(());
        }
        Err(ControlError::Invalid(format!(
            "no [[tenant]] is named {name:?}; configured: {}",
            if self.inner.tenants.is_empty() {
                "none".to_string()
            } else {
                self.inner.tenants.join(", ")
            }
        )))
    }

    // ---- delivery ----

    /// Whether delivery of mail for `domain` from `tenant` is suspended, and
    /// by which suspension (`"domain"` or `"tenant"`).
    pub fn delivery_suspended(&self, domain: &str, tenant: Option<&str>) -> Option<&'static str> {
        if !self.inner.any_suspended.load(Ordering::Acquire) {
            return None;
        }
        let st = lock(&self.inner.state);
        if st.suspended_domains.contains_key(domain) {
            return Some("domain");
        }
        if tenant.is_some_and(|t| st.suspended_tenants.contains_key(t)) {
            return Some("tenant");
        }
        None
    }

    /// For delivery: when mail for `domain` from `tenant` is suspended,
    /// calls `hold` with the Unix time to look at it again (the caller hands
    /// the job back to the queue with it) and returns true. Under the gate,
    /// so that a concurrent resume cannot miss the job (see `Inner::gate`).
    pub fn hold_if_suspended(
        &self,
        domain: &str,
        tenant: Option<&str>,
        hold: impl FnOnce(u64),
    ) -> bool {
        if !self.inner.any_suspended.load(Ordering::Acquire) {
            return false;
        }
        let _gate = lock(&self.inner.gate);
        if self.delivery_suspended(domain, tenant).is_none() {
            return false;
        }
        hold(unix_now() + HOLD_RECHECK.as_secs());
        true
    }

    /// Suspends delivery to `domain`. Returns the suspension in force and
    /// whether it is new (an existing one is kept as it was).
    pub async fn suspend_domain(
        &self,
        domain: &str,
        reason: Option<String>,
    ) -> Result<(String, Suspension, bool), ControlError> {
        let domain = normalize_domain(domain).map_err(ControlError::Invalid)?;
        let (s, new) = self.change(|st| insert(&mut st.suspended_domains, &domain, reason));
        if new {
            tracing::warn!(domain = %domain, "delivery suspended for domain");
            self.save().await?;
        }
        Ok((domain, s, new))
    }

    /// Suspends delivery of `tenant`'s mail.
    pub async fn suspend_tenant(
        &self,
        tenant: &str,
        reason: Option<String>,
    ) -> Result<(Suspension, bool), ControlError> {
        self.check_tenant(tenant)?;
        let (s, new) = self.change(|st| insert(&mut st.suspended_tenants, tenant, reason));
        if new {
            tracing::warn!(tenant = %tenant, "delivery suspended for tenant");
            self.save().await?;
        }
        Ok((s, new))
    }

    /// Lifts the suspension of `domain`: the suspension lifted, if there was
    /// one. The caller then makes the domain's recipients due
    /// (the queue retries them).
    pub async fn resume_domain(
        &self,
        domain: &str,
    ) -> Result<Option<(String, Suspension)>, ControlError> {
        let domain = normalize_domain(domain).map_err(ControlError::Invalid)?;
        let Some(s) = self.change(|st| st.suspended_domains.remove(&domain)) else {
            return Ok(None);
        };
        tracing::info!(domain = %domain, "delivery resumed for domain");
        self.save().await?;
        Ok(Some((domain, s)))
    }

    /// Lifts the suspension of `tenant`'s delivery.
    pub async fn resume_tenant(&self, tenant: &str) -> Result<Option<Suspension>, ControlError> {
        let Some(s) = self.change(|st| st.suspended_tenants.remove(tenant)) else {
            return Ok(None);
        };
        tracing::info!(tenant = %tenant, "delivery resumed for tenant");
        self.save().await?;
        Ok(Some(s))
    }

    // ---- submission ----

    /// The pause of `tenant`'s submissions, if it is paused.
    pub fn paused(&self, tenant: &str) -> Option<Pause> {
        if !self.inner.any_paused.load(Ordering::Acquire) {
            return None;
        }
        lock(&self.inner.state).paused_tenants.get(tenant).cloned()
    }

    /// The refusal of a paused tenant's MAIL FROM.
    pub fn pause_reply(&self, tenant: &str, p: &Pause) -> Reply {
        let (code, enhanced) = match self.inner.reputation.reply {
            PauseReply::Tempfail => (451, Enhanced(4, 7, 1)),
            PauseReply::Reject => (550, Enhanced(5, 7, 1)),
        };
        Reply::new(
            code,
            enhanced,
            format!(
                "Account \"{tenant}\" is paused for its sending reputation since {}: {}; contact the postmaster ({}) to resume it",
                rfc3339(p.since),
                p.reason,
                self.inner.postmaster
            ),
        )
    }

    /// Lifts the pause of `tenant`'s submissions and starts its reputation
    /// window afresh (else the next outcome would pause it again). The pause
    /// lifted, if it was paused.
    pub async fn resume_submissions(&self, tenant: &str) -> Result<Option<Pause>, ControlError> {
        let Some(p) = self.change(|st| st.paused_tenants.remove(tenant)) else {
            return Ok(None);
        };
        lock(&self.inner.windows).remove(tenant);
        tracing::info!(tenant = %tenant, "tenant submissions resumed by the postmaster");
        self.save().await?;
        Ok(Some(p))
    }

    /// The tenant's reputation window now.
    pub fn rates(&self, tenant: &str) -> Rates {
        lock(&self.inner.windows)
            .get(tenant)
            .map(Window::rates)
            .unwrap_or_default()
    }

    /// Called for every event (as a sink of the event bus): counts a
    /// tenant's delivered, bounced, expired and complained recipients, and
    /// pauses the tenant when a rate crosses its limit. Returns the event
    /// that announces a new pause (`rejected`, rule `tenant_paused`), to be
    /// emitted by the caller. Never blocks on I/O: the state is saved in
    /// the background.
    pub fn observe(&self, e: &Event) -> Option<Event> {
        let c = &self.inner.reputation;
        if !c.enabled {
            return None;
        }
        let tenant = e.tenant.as_deref()?;
        let hard = match e.event {
            EventKind::Delivered | EventKind::Expired => Some(false),
            EventKind::Bounced => Some(
                e.classification == Some(Classification::InvalidRecipient)
                    && e.permanent != Some(false),
            ),
            EventKind::Complained => None,
            _ => return None,
        };
        let verdict = {
            let mut windows = lock(&self.inner.windows);
            let w = windows
                .entry(tenant.to_string())
                .or_insert_with(|| Window::new(c.window));
            match hard {
                Some(h) => w.record(h),
                None => w.complaint(),
            }
            w.verdict(c).map(|reason| (reason, w.rates()))
        }?;
        let (reason, rates) = verdict;
        let pause = Pause {
            since: unix_now(),
            reason,
            rates,
        };
        let new = self.change_ungated(|st| {
            if st.paused_tenants.contains_key(tenant) {
                false
            } else {
                st.paused_tenants.insert(tenant.to_string(), pause.clone());
                true
            }
        });
        if !new {
            return None;
        }
        tracing::warn!(
            tenant = %tenant,
            reason = %pause.reason,
            hard_bounce_rate = rates.hard_bounce_rate,
            complaint_rate = rates.complaint_rate,
            "tenant submissions paused for reputation (resume: herald tenant resume {tenant})"
        );
        self.save_in_background();
        let reply = self.pause_reply(tenant, &pause);
        let mut ev = Event::new(EventKind::Rejected, "").with_reply(&reply);
        ev.tenant = Some(tenant.to_string());
        ev.rule = Some(crate::event::RejectRule::TenantPaused);
        ev.reason = Some(format!("paused: {}", pause.reason));
        ev.permanent = Some(reply.is_permanent());
        Some(ev)
    }

    // ---- state ----

    /// Changes the state under the gate and updates the flags.
    fn change<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let _gate = lock(&self.inner.gate);
        self.change_ungated(f)
    }

    /// [`Control::change`] without the gate: for pauses, which delivery
    /// does not look at. [`Control::observe`] runs inside event emission,
    /// so it must not wait on a gate held around queue calls.
    fn change_ungated<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut st = lock(&self.inner.state);
        let r = f(&mut st);
        self.inner.any_suspended.store(
            !st.suspended_domains.is_empty() || !st.suspended_tenants.is_empty(),
            Ordering::Release,
        );
        self.inner
            .any_paused
            .store(!st.paused_tenants.is_empty(), Ordering::Release);
        r
    }

    /// Writes the state file, off the async threads.
    async fn save(&self) -> Result<(), ControlError> {
        let Some(path) = self.inner.path.clone() else {
            return Ok(());
        };
        let inner = self.inner.clone();
        let result = match tokio::task::spawn_blocking(move || inner.write()).await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e.to_string())),
        };
        result.map_err(|source| {
            tracing::error!(path = %path.display(), error = %source, "cannot save the control state");
            ControlError::Save {
                path: path.display().to_string(),
                source,
            }
        })
    }

    /// [`Control::save`] from a synchronous caller: in a blocking task when
    /// there is a runtime, else at once.
    fn save_in_background(&self) {
        if self.inner.path.is_none() {
            return;
        }
        let inner = self.inner.clone();
        let write = move || {
            if let Err(e) = inner.write() {
                tracing::error!(error = %e, "cannot save the control state; a pause will be lost at restart");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(write);
            }
            Err(_) => write(),
        }
    }
}

/// Adds `name` unless present; returns the entry in force and whether it
/// is new.
fn insert(
    map: &mut BTreeMap<String, Suspension>,
    name: &str,
    reason: Option<String>,
) -> (Suspension, bool) {
    if let Some(s) = map.get(name) {
        return (s.clone(), false);
    }
    let s = Suspension {
        since: unix_now(),
        reason: reason.filter(|r| !r.trim().is_empty()),
    };
    map.insert(name.to_string(), s.clone());
    (s, true)
}

impl Inner {
    /// Writes the latest state atomically: temp file, fsync, rename, fsync
    /// of the directory. Writers take turns, and each takes its snapshot
    /// after its turn came, so an older state never overwrites a newer one.
    fn write(&self) -> std::io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let _turn = lock(&self.writer);
        let json = {
            let st = lock(&self.state);
            serde_json::to_vec_pretty(&*st).map_err(std::io::Error::other)?
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = path.with_extension("json.tmp");
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&json)?;
            f.write_all(b"\n")?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    }
}

/// Fed every event by the bus; a new pause is announced after the event
/// that caused it.
impl crate::report::EventSink for Control {
    fn observe(&self, event: &Event) -> Option<Event> {
        Control::observe(self, event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, extra: &str) -> Config {
        let text = format!(
            r#"
            [server]
            hostname = "relay.test"
            spool_dir = "{}"
            {listener}
            {tenant}
            {extra}
            "#,
            dir.display(),
            listener = crate::config::test_support::RELAY_LISTENER,
            tenant = crate::config::test_support::tenant("acme", r#""*@acme.test""#)
        );
        Config::from_toml_str(&text).expect("valid config")
    }

    fn outcome(kind: EventKind, class: Option<Classification>) -> Event {
        let mut e = Event::new(kind, "billing@acme.test");
        e.tenant = Some("acme".into());
        e.recipient = Some("bob@one.test".into());
        e.classification = class;
        e.permanent = Some(kind != EventKind::Deferred);
        e
    }

    #[test]
    fn domains_are_normalized_and_checked() {
        assert_eq!(normalize_domain(" One.TEST. ").unwrap(), "one.test");
        for bad in ["", "a..b", "bob@one.test", "one test", "."] {
            assert!(normalize_domain(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn suspensions_survive_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), "");
        let c = Control::open(&cfg).unwrap();
        let (d, _, new) = c.suspend_domain("One.Test", None).await.unwrap();
        assert_eq!(d, "one.test");
        assert!(new);
        let (_, again) = c
            .suspend_tenant("acme", Some("abuse review".into()))
            .await
            .unwrap();
        assert!(again);
        assert!(matches!(
            c.suspend_tenant("nobody", None).await,
            Err(ControlError::Invalid(m)) if m.contains("acme")
        ));
        assert_eq!(c.delivery_suspended("one.test", None), Some("domain"));
        assert_eq!(
            c.delivery_suspended("two.test", Some("acme")),
            Some("tenant")
        );
        assert_eq!(c.delivery_suspended("two.test", None), None);

        let c2 = Control::open(&cfg).unwrap();
        let s = c2.snapshot();
        assert!(s.suspended_domains.contains_key("one.test"));
        assert_eq!(
            s.suspended_tenants["acme"].reason.as_deref(),
            Some("abuse review")
        );
        assert_eq!(c2.counts(), (1, 1, 0));

        assert!(c2.resume_domain("one.test").await.unwrap().is_some());
        assert!(c2.resume_domain("one.test").await.unwrap().is_none());
        let mut held = None;
        assert!(!c2.hold_if_suspended("one.test", None, |t| held = Some(t)));
        assert!(c2.hold_if_suspended("one.test", Some("acme"), |t| held = Some(t)));
        assert!(held.unwrap() >= unix_now() + HOLD_RECHECK.as_secs() - 1);
        assert_eq!(Control::open(&cfg).unwrap().counts(), (0, 1, 0));
    }

    #[test]
    fn a_corrupt_state_file_stops_the_start() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), b"{not json").unwrap();
        let e = Control::open(&config(dir.path(), ""))
            .err()
            .expect("refused");
        assert!(e.to_string().contains(STATE_FILE), "{e}");
    }

    #[tokio::test]
    async fn hard_bounces_pause_the_tenant_until_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(
            dir.path(),
            "[reputation]\nwindow = 10\nmin_volume = 3\nreply = \"reject\"",
        );
        let c = Control::open(&cfg).unwrap();
        let hard = || outcome(EventKind::Bounced, Some(Classification::InvalidRecipient));
        assert!(c.observe(&hard()).is_none());
        assert!(c.observe(&outcome(EventKind::Delivered, None)).is_none());
        // A soft bounce and a non-tenant event do not count as hard.
        assert!(
            c.observe(&outcome(
                EventKind::Deferred,
                Some(Classification::InvalidRecipient)
            ))
            .is_none()
        );
        let ev = c.observe(&hard()).expect("2 of 3 is over 5%");
        assert_eq!(ev.event, EventKind::Rejected);
        assert_eq!(ev.rule, Some(crate::event::RejectRule::TenantPaused));
        assert_eq!(ev.smtp.as_ref().unwrap().code, Some(550));
        assert!(
            ev.reason
                .as_deref()
                .unwrap()
                .contains("hard-bounce rate 66.67%")
        );
        assert!(c.observe(&hard()).is_none(), "announced once");

        let p = c.paused("acme").expect("paused");
        let r = c.pause_reply("acme", &p);
        assert_eq!((r.code, r.enhanced), (550, Some(Enhanced(5, 7, 1))));
        assert!(r.text.contains("postmaster@relay.test"), "{}", r.text);
        assert!(r.text.contains("since "), "{}", r.text);

        // Saved in the background: wait for the file with a deadline.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while Control::open(&cfg).unwrap().counts().2 != 1 {
            assert!(std::time::Instant::now() < deadline, "pause not saved");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        assert!(c.resume_submissions("acme").await.unwrap().is_some());
        assert!(c.paused("acme").is_none());
        assert_eq!(c.rates("acme").recipients, 0, "window starts afresh");
        assert_eq!(Control::open(&cfg).unwrap().counts().2, 0);
    }

    #[test]
    fn complaints_pause_too_and_disabled_guard_does_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), "[reputation]\nwindow = 10\nmin_volume = 3");
        let c = Control::in_memory(&cfg);
        for _ in 0..3 {
            assert!(c.observe(&outcome(EventKind::Delivered, None)).is_none());
        }
        let ev = c
            .observe(&outcome(EventKind::Complained, None))
            .expect("1 complaint in 3 is over 0.3%");
        assert!(ev.reason.unwrap().contains("complaint rate"));
        // The default reply is a tempfail: the app keeps and retries its mail.
        let smtp = ev.smtp.unwrap();
        assert_eq!(
            (smtp.code, smtp.enhanced.as_deref()),
            (Some(451), Some("4.7.1"))
        );

        let cfg = config(
            dir.path(),
            "[reputation]\nenabled = false\nwindow = 10\nmin_volume = 3",
        );
        let c = Control::in_memory(&cfg);
        for _ in 0..5 {
            let e = outcome(EventKind::Bounced, Some(Classification::InvalidRecipient));
            assert!(c.observe(&e).is_none());
        }
        assert!(c.paused("acme").is_none());
    }
}
