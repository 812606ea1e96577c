//! The suppression list: recipients a tenant must not send to again, because
//! a message to them bounced hard (`invalid_recipient`), because they
//! complained (ARF, RFC 5965), or because a postmaster said so.
//!
//! Entries are per tenant and keyed by tenant name + lower-cased address.
//! Mail from a trusted network without AUTH has no tenant; its entries use
//! the tenant key `""` (shown as `-` by the CLI). One tenant's entries
//! never affect, and are never shown to, another tenant's SMTP sessions.
//!
//! * Adding: [`Suppressions::observe`] sees every event the reporter emits
//!   (one `match` on the kind, nothing else on the hot path) and adds the
//!   recipient of a permanent `bounced` event classified `invalid_recipient`
//!   and of every `complained` event. The write happens in the store's
//!   background writer; the entry is visible to RCPT checks at once.
//!   The admin API adds and removes entries by hand.
//! * Checking: [`Suppressions::lookup`] at RCPT TO is a read-locked hash
//!   lookup in memory; a hit is refused with `550 5.1.1` ([`refusal`]) and
//!   a `suppressed` event ([`suppressed_event`]).
//! * Expiry: `[suppression] expire_after` gives each new entry an expiry
//!   time (none when unset); expired entries are ignored, dropped from
//!   memory within the hour and from the file at the next start.
//! * Storage: behind [`SuppressionStore`]. [`local::LocalStore`] keeps a
//!   JSON-lines log on local disk (compacted at start); with `[cluster]
//!   redis_url`, [`redis::RedisStore`] shares the list through Redis and
//!   keeps the local store as this node's replica.
//!
//! Input trusted: events from herald's own stages; API input is validated
//! in [`Suppressions::manual_entry`].

pub mod local;
pub mod redis;

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::clock::rfc3339;
use crate::clock::unix_now;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::reply::{Enhanced, Reply};
use crate::report::{Event, EventKind, Reason};
pub use local::LocalStore;

/// The tenant key of mail relayed for a trusted network without AUTH.
pub const NO_TENANT: &str = "";

/// Longest reason kept, in characters (a reply text can be long).
const MAX_REASON: usize = 300;

/// How an address came onto the list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// A hard bounce (`invalid_recipient`), synchronous or late.
    Bounce,
    /// A complaint (ARF feedback report).
    Complaint,
    /// Added through the admin API or `herald suppression add`.
    Manual,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Bounce => "bounce",
            Source::Complaint => "complaint",
            Source::Manual => "manual",
        }
    }
}

/// One suppressed address of one tenant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Tenant name, [`NO_TENANT`] for trusted-network mail without AUTH.
    pub tenant: String,
    /// Lower case, without angle brackets or a trailing dot.
    pub address: String,
    /// Why, for people: the bounce reply, the complaint, the postmaster's note.
    pub reason: String,
    pub source: Source,
    /// The message whose bounce or complaint added the entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_id: Option<String>,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds; none = never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

impl Entry {
    /// Whether the entry still applies at `now` (Unix seconds).
    pub fn is_active(&self, now: u64) -> bool {
        self.expires_at.is_none_or(|t| now < t)
    }
}

/// A store failure; the text is for the postmaster's log and API answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot write the suppression list: {0}")]
    Io(#[from] std::io::Error),
    #[error("the suppression list is closed")]
    Closed,
}

/// What a store's slow operations return. `'static`, so that a caller may
/// spawn it (see [`Suppressions::observe`]).
pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'static>>;

/// Where entries live. Implementations: [`LocalStore`] (a file); a Redis
/// store shared by a cluster later. Semantics every store keeps:
///
/// * `tenant` is a key as given (names are case-sensitive, `""` is the
///   no-tenant key); `address` is already normalized ([`normalize`]).
/// * [`lookup`](Self::lookup) runs on the RCPT path for every recipient: it
///   answers from memory, never waits on I/O or a lock held across I/O.
/// * [`add`](Self::add) and [`remove`](Self::remove) change what `lookup`
///   sees before they return; their future resolves once the change is
///   durable (or shared), and may be dropped when the caller does not care.
pub trait SuppressionStore: Send + Sync + 'static {
    /// The active entry for this recipient of this tenant, if any.
    fn lookup(&self, tenant: &str, address: &str, now: u64) -> Option<Entry>;
    /// Adds the entry, replacing one for the same tenant and address.
    fn add(&self, entry: Entry) -> StoreFuture<()>;
    /// Removes the entry; resolves to what was removed, if it was active.
    fn remove(&self, tenant: &str, address: &str) -> StoreFuture<Option<Entry>>;
    /// Active entries, of one tenant or of all, sorted by tenant and address.
    fn list(&self, tenant: Option<&str>, now: u64) -> StoreFuture<Vec<Entry>>;
    /// Resolves once every change made so far is durable.
    fn flush(&self) -> StoreFuture<()>;
}

/// The handle the relay's stages share: cheap to clone.
#[derive(Clone)]
pub struct Suppressions {
    store: Arc<dyn SuppressionStore>,
    /// `[suppression] expire_after`, in seconds.
    expire_after: Option<u64>,
    /// Tenant names in the config, for validating API input.
    tenants: Arc<[String]>,
}

impl Suppressions {
    /// Opens the store the config names: the local file
    /// (`[suppression] file`, by default `suppressions.jsonl` in the spool
    /// directory), loaded and compacted; with `[cluster] redis_url`, the
    /// list shared through Redis with that file as this node's replica
    /// ([`redis::RedisStore`]).
    /// `metrics` counts the shared list's Redis trouble.
    pub async fn open(config: &Config, metrics: Arc<Metrics>) -> std::io::Result<Suppressions> {
        let path = config.suppression_file();
        let store: Arc<dyn SuppressionStore> = match config.cluster.redis_url.as_deref() {
            Some(url) => Arc::new(redis::RedisStore::open(&path, config, url, metrics).await?),
            None => Arc::new(LocalStore::open(&path).await?),
        };
        Ok(Suppressions::with_store(store, config))
    }

    /// A handle over any store.
    pub fn with_store(store: Arc<dyn SuppressionStore>, config: &Config) -> Suppressions {
        Suppressions {
            store,
            expire_after: config
                .suppression
                .expire_after
                .map(|s| s.as_duration().as_secs()),
            tenants: config.tenants.iter().map(|t| t.name.clone()).collect(),
        }
    }

    /// A list kept in memory only, empty at start (tools and tests).
    pub fn in_memory() -> Suppressions {
        Suppressions {
            store: Arc::new(LocalStore::in_memory()),
            expire_after: None,
            tenants: Arc::from(Vec::new()),
        }
    }

    /// The active entry for a recipient of a tenant ([`NO_TENANT`] when the
    /// session has none). Cheap: memory only.
    pub fn lookup(&self, tenant: &str, address: &str) -> Option<Entry> {
        self.store.lookup(tenant, &normalize(address), unix_now())
    }

    /// Adds the recipient of a permanent bounce whose reason says the
    /// address cannot receive mail ([`Reason::may_suppress`]) or of a
    /// complaint. Never blocks: the store writes in the background.
    pub fn observe(&self, e: &Event) {
        let source = match e.event {
            // Only a reason that says the address cannot receive mail: a
            // blocklisted IP, a full mailbox or an SPF failure says nothing
            // about the address.
            EventKind::Bounced
                if e.permanent == Some(true)
                    && e.reason
                        .as_deref()
                        .and_then(Reason::parse)
                        .is_some_and(Reason::may_suppress) =>
            {
                Source::Bounce
            }
            EventKind::Complained => Source::Complaint,
            _ => return,
        };
        let Some(recipient) = e.recipient.as_deref() else {
            return;
        };
        let tenant = e.tenant.as_deref().unwrap_or(NO_TENANT);
        let reason = match (&e.smtp, source) {
            (Some(s), _) => s.to_string(),
            (None, Source::Complaint) => "the recipient reported a message as spam".into(),
            (None, _) => "hard bounce".into(),
        };
        let queue_id = e.queue_id.map(|q| q.to_string());
        self.record(tenant, recipient, source, &reason, queue_id);
    }

    /// Adds an entry from a bounce or complaint unless the address is
    /// already on the list (its first reason and date are kept).
    fn record(
        &self,
        tenant: &str,
        address: &str,
        source: Source,
        reason: &str,
        queue_id: Option<String>,
    ) {
        let address = normalize(address).into_owned();
        let now = unix_now();
        if self.store.lookup(tenant, &address, now).is_some() {
            return;
        }
        let entry = Entry {
            tenant: tenant.to_string(),
            address,
            reason: clean_reason(reason),
            source,
            queue_id,
            created_at: now,
            expires_at: self.expire_after.map(|s| now.saturating_add(s)),
        };
        tracing::info!(
            tenant = %entry.tenant,
            recipient = %entry.address,
            source = entry.source.as_str(),
            reason = %entry.reason,
            "address added to the suppression list"
        );
        let written = self.store.add(entry);
        // The entry is already visible to RCPT checks; the write completes
        // in the background.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = written.await {
                    tracing::error!(error = %e, "suppression entry not saved");
                }
            });
        }
    }

    /// Validates API input and builds a manual entry. `expire_after`
    /// overrides `[suppression] expire_after` for this entry.
    pub fn manual_entry(
        &self,
        tenant: &str,
        address: &str,
        reason: Option<&str>,
        expire_after: Option<u64>,
    ) -> Result<Entry, String> {
        self.check_tenant(tenant)?;
        let address = normalize(address).into_owned();
        check_address(&address)?;
        let now = unix_now();
        Ok(Entry {
            tenant: tenant.to_string(),
            address,
            reason: clean_reason(reason.unwrap_or("added by the postmaster")),
            source: Source::Manual,
            queue_id: None,
            created_at: now,
            expires_at: expire_after
                .or(self.expire_after)
                .map(|s| now.saturating_add(s)),
        })
    }

    /// A tenant key the config knows: a tenant's name or [`NO_TENANT`].
    pub fn check_tenant(&self, tenant: &str) -> Result<(), String> {
        if tenant == NO_TENANT || self.tenants.iter().any(|t| t == tenant) {
            return Ok(());
        }
        let known = if self.tenants.is_empty() {
            "none".to_string()
        } else {
            self.tenants.join(", ")
        };
        Err(format!(
            "no tenant named {tenant:?} in the config (tenants: {known}; leave tenant empty for trusted-network mail without AUTH)"
        ))
    }

    /// Adds (or replaces) an entry; resolves once it is durable.
    pub async fn add(&self, entry: Entry) -> Result<(), StoreError> {
        tracing::info!(
            tenant = %entry.tenant,
            recipient = %entry.address,
            source = entry.source.as_str(),
            "address added to the suppression list"
        );
        self.store.add(entry).await
    }

    /// Removes an entry; the removed entry, if there was an active one.
    pub async fn remove(&self, tenant: &str, address: &str) -> Result<Option<Entry>, StoreError> {
        let address = normalize(address);
        let removed = self.store.remove(tenant, &address).await?;
        if removed.is_some() {
            tracing::info!(tenant = %tenant, recipient = %address, "address removed from the suppression list");
        }
        Ok(removed)
    }

    /// Active entries, of one tenant or of all.
    pub async fn list(&self, tenant: Option<&str>) -> Result<Vec<Entry>, StoreError> {
        self.store.list(tenant, unix_now()).await
    }

    /// Waits until every change so far is durable (shutdown).
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.store.flush().await
    }
}

/// The key form of an address: without surrounding space and angle
/// brackets, without a trailing dot on the domain, lower case. (Local parts
/// are case-sensitive in theory, RFC 5321 §2.4; no mailbox provider treats
/// them so, and a suppression must not be dodged by a capital letter.)
pub fn normalize(address: &str) -> Cow<'_, str> {
    let a = address.trim();
    let a = a
        .strip_prefix('<')
        .and_then(|s| s.strip_suffix('>'))
        .unwrap_or(a);
    let a = a.strip_suffix('.').unwrap_or(a);
    if a.chars().any(char::is_uppercase) {
        Cow::Owned(a.to_lowercase())
    } else {
        Cow::Borrowed(a)
    }
}

/// Rough address syntax for API input: `local@domain`, no spaces or
/// control characters, at most 254 octets (RFC 5321 §4.5.3.1.3).
fn check_address(address: &str) -> Result<(), String> {
    let Some((local, domain)) = address.rsplit_once('@') else {
        return Err(format!("{address:?} is not an address: write user@domain"));
    };
    if local.is_empty()
        || domain.is_empty()
        || address.len() > 254
        || address
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '<' || c == '>')
    {
        return Err(format!("{address:?} is not an address: write user@domain"));
    }
    Ok(())
}

/// One line, no control characters, at most [`MAX_REASON`] characters: the
/// reason goes into SMTP replies.
fn clean_reason(reason: &str) -> String {
    let mut out = String::with_capacity(reason.len().min(MAX_REASON));
    let mut space = false;
    for c in reason.trim().chars() {
        if c.is_control() || c.is_whitespace() {
            space = true;
            continue;
        }
        if out.chars().count() >= MAX_REASON {
            out.push('…');
            break;
        }
        if space && !out.is_empty() {
            out.push(' ');
        }
        space = false;
        out.push(c);
    }
    out
}

/// The reply to a RCPT TO of a suppressed address: since when and why, and
/// how to lift it. Only the session's own tenant's entry is ever shown.
pub fn refusal(recipient: &str, entry: &Entry) -> Reply {
    let day = rfc3339(entry.created_at);
    let day = day.get(..10).unwrap_or(&day);
    let how = match entry.source {
        Source::Bounce => "it bounced",
        Source::Complaint => "its owner complained",
        Source::Manual => "the postmaster added it",
    };
    let tenant = if entry.tenant.is_empty() {
        String::new()
    } else {
        format!(" --tenant {}", entry.tenant)
    };
    Reply::new(
        550,
        Enhanced(5, 1, 1),
        format!(
            "<{recipient}> is on the suppression list since {day} because {how} (reason: {}); if the address is valid again, ask the postmaster to run `herald suppression remove {}{tenant}`",
            entry.reason, entry.address
        ),
    )
}

/// The `suppressed` event for a refused RCPT TO.
pub fn suppressed_event(
    tenant: Option<String>,
    sender: &str,
    recipient: &str,
    client_ip: std::net::IpAddr,
    reply: &Reply,
    entry: &Entry,
) -> Event {
    let mut e = Event::new(EventKind::Suppressed, sender).with_reply(reply);
    e.tenant = tenant;
    e.recipient = Some(recipient.to_string());
    e.client_ip = Some(client_ip);
    e.rule = Some(crate::event::RejectRule::SuppressionList);
    e.reason = Some(entry.reason.clone());
    e.permanent = Some(true);
    e
}

/// Fed every event by the bus. Not herald's own DSNs (null sender, no
/// tenant): a report that cannot reach a tenant's sender says nothing about
/// the app's recipients, and would land on the no-tenant list.
impl crate::report::EventSink for Suppressions {
    fn observe(&self, event: &Event) -> Option<Event> {
        if !(event.sender.is_empty() && event.tenant.is_none()) {
            Suppressions::observe(self, event);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::QueueId;
    use crate::report::SmtpDetail;

    fn config(extra: &str) -> Config {
        Config::from_toml_str(&format!(
            "[[listener]]\naddress = \"127.0.0.1:2587\"\n{extra}"
        ))
        .unwrap()
    }

    fn bounce(tenant: Option<&str>, rcpt: &str, reason: Reason) -> Event {
        let mut e = Event::new(EventKind::Bounced, "billing@acme.test");
        e.queue_id = Some(QueueId(7));
        e.tenant = tenant.map(str::to_string);
        e.recipient = Some(rcpt.into());
        e.smtp = Some(SmtpDetail {
            code: Some(550),
            enhanced: Some("5.1.1".into()),
            text: "user\r\nunknown".into(),
        });
        e.classification = Some(reason.classification());
        e.reason = Some(reason.as_str().into());
        e.permanent = Some(true);
        e
    }

    #[test]
    fn config_section() {
        let c = config("[server]\nspool_dir = \"/srv/spool\"\n");
        assert_eq!(c.suppression.expire_after, None);
        assert_eq!(
            c.suppression_file(),
            std::path::Path::new("/srv/spool/suppressions.jsonl")
        );
        let errs = Config::from_toml_str(
            "[[listener]]\naddress = \"127.0.0.1:2587\"\n[suppression]\nexpire_after = \"0s\"\nkeep = true\n",
        )
        .unwrap_err();
        let paths: Vec<&str> = errs.0.iter().map(|e| e.path.as_str()).collect();
        assert!(paths.contains(&"suppression.expire_after"), "{paths:?}");
        assert!(paths.contains(&"suppression.keep"), "{paths:?}");
    }

    #[test]
    fn addresses_normalize() {
        assert_eq!(normalize(" <Bob@Example.NET.> "), "bob@example.net");
        assert!(matches!(normalize("bob@x.test"), Cow::Borrowed(_)));
    }

    #[test]
    fn reasons_are_one_short_line() {
        assert_eq!(
            clean_reason(" 550 user\r\n  unknown \t"),
            "550 user unknown"
        );
        let long = clean_reason(&"x".repeat(1000));
        assert_eq!(long.chars().count(), MAX_REASON + 1);
    }

    #[tokio::test]
    async fn hard_bounce_adds_per_tenant() {
        let s = Suppressions::in_memory();
        s.observe(&bounce(
            Some("acme"),
            "Nobody@One.test",
            Reason::UserUnknown,
        ));
        s.observe(&bounce(Some("acme"), "full@one.test", Reason::MailboxFull));
        s.observe(&bounce(None, "ghost@one.test", Reason::UserUnknown));
        let e = s.lookup("acme", "nobody@one.test").expect("suppressed");
        assert_eq!(e.source, Source::Bounce);
        assert_eq!(e.reason, "550 5.1.1 user unknown");
        assert_eq!(e.queue_id.as_deref(), Some(&*QueueId(7).to_string()));
        assert!(
            s.lookup("other", "nobody@one.test").is_none(),
            "other tenants unaffected"
        );
        assert!(s.lookup("acme", "full@one.test").is_none(), "soft category");
        assert!(s.lookup(NO_TENANT, "ghost@one.test").is_some());
        assert!(s.lookup("acme", "ghost@one.test").is_none());
        // A deferral or a delivery adds nothing.
        let mut d = bounce(Some("acme"), "x@one.test", Reason::UserUnknown);
        d.event = EventKind::Deferred;
        d.permanent = Some(false);
        s.observe(&d);
        assert!(s.lookup("acme", "x@one.test").is_none());
    }

    #[tokio::test]
    async fn complaints_add_and_first_reason_is_kept() {
        let s = Suppressions::in_memory();
        let mut c = Event::new(EventKind::Complained, "billing@acme.test");
        c.tenant = Some("acme".into());
        c.recipient = Some("angry@one.test".into());
        s.observe(&c);
        let first = s.lookup("acme", "angry@one.test").unwrap();
        assert_eq!(first.source, Source::Complaint);
        s.observe(&bounce(Some("acme"), "angry@one.test", Reason::UserUnknown));
        assert_eq!(s.lookup("acme", "angry@one.test").unwrap(), first);
    }

    #[tokio::test]
    async fn manual_entries_are_validated_and_expire() {
        let cfg = config(&format!(
            "{}[suppression]\nexpire_after = \"1d\"\n",
            crate::config::test_support::tenant("acme", r#""*@acme.test""#)
        ));
        let s = Suppressions::with_store(Arc::new(LocalStore::in_memory()), &cfg);
        assert!(s.manual_entry("nope", "a@b.test", None, None).is_err());
        assert!(
            s.manual_entry("acme", "not an address", None, None)
                .is_err()
        );
        assert!(s.manual_entry("acme", "@b.test", None, None).is_err());
        let e = s
            .manual_entry("acme", "A@B.test", Some("asked"), None)
            .unwrap();
        assert_eq!(e.address, "a@b.test");
        assert_eq!(e.expires_at, Some(e.created_at + 86400));
        assert!(e.is_active(e.created_at + 86399));
        assert!(!e.is_active(e.created_at + 86400));
        s.add(e).await.unwrap();
        assert!(s.lookup("acme", "a@b.test").is_some());
        let gone = s.manual_entry("acme", "old@b.test", None, Some(0)).unwrap();
        s.add(gone).await.unwrap();
        assert!(s.lookup("acme", "old@b.test").is_none(), "expired at once");
        assert_eq!(s.list(None).await.unwrap().len(), 1);
        assert!(s.remove("acme", "A@b.test").await.unwrap().is_some());
        assert!(s.remove("acme", "a@b.test").await.unwrap().is_none());
    }

    #[test]
    fn refusal_says_since_when_and_why() {
        let e = Entry {
            tenant: "acme".into(),
            address: "bob@one.test".into(),
            reason: "550 5.1.1 user unknown".into(),
            source: Source::Bounce,
            queue_id: None,
            created_at: 1_795_953_600, // 2026-11-29
            expires_at: None,
        };
        let r = refusal("Bob@one.test", &e);
        assert_eq!(
            r.to_string(),
            "550 5.1.1 <Bob@one.test> is on the suppression list since 2026-11-29 because it bounced (reason: 550 5.1.1 user unknown); if the address is valid again, ask the postmaster to run `herald suppression remove bob@one.test --tenant acme`"
        );
        let ev = suppressed_event(
            Some("acme".into()),
            "s@acme.test",
            "Bob@one.test",
            "127.0.0.1".parse().unwrap(),
            &r,
            &e,
        );
        let v = serde_json::to_value(&ev).unwrap();
        assert_eq!(v["event"], "suppressed");
        assert_eq!(v["reason"], "550 5.1.1 user unknown");
        assert_eq!(v["smtp"]["enhanced"], "5.1.1");
    }
}
