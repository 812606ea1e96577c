//! Typed configuration, loaded once from TOML.
//!
//! Every section is read on its own so that one mistake does not hide the
//! next: unknown keys, type errors and semantic problems are all collected
//! and reported together, each with its key path (`listener[1].tls`).
//! Durations and sizes are parsed here (see [`units`]), never later.

pub mod classification;
pub mod dmarc;
pub mod dnsbl;
pub mod reputation;
pub mod senders;
pub mod smarthost;
pub mod spam;
pub mod tlsrpt;
pub mod units;
pub mod webhook;

#[cfg(test)]
pub mod test_support;

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;
use serde::de::DeserializeOwned;

pub use units::{Rate, Size, Span};

/// The file `herald serve` reads when no `--config` is given.
pub const DEFAULT_PATH: &str = "config/herald.toml";

/// Checks the VERP keys of `[bounces]`.
fn validate_verp(cfg: &BouncesConfig, errs: &mut ConfigErrors) {
    let Some(domain) = &cfg.return_path_domain else {
        return;
    };
    if domain.is_empty()
        || domain.starts_with('.')
        || domain.ends_with('.')
        || !domain
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        errs.push(
            "bounces.return_path_domain",
            "must be a domain name, e.g. \"bounces.relay.example.net\"",
        );
    }
    match &cfg.verp_secret {
        None => errs.push(
            "bounces.verp_secret",
            "needed with return_path_domain: it authenticates the bounce addresses (at least 16 random characters, e.g. `openssl rand -hex 32`)",
        ),
        Some(s) if s.expose().len() < MIN_VERP_SECRET_LEN => errs.push(
            "bounces.verp_secret",
            format!("too short: use at least {MIN_VERP_SECRET_LEN} random characters"),
        ),
        Some(_) => {}
    }
}

/// Shortest `[bounces] verp_secret`: the MAC of bounce addresses is only as
/// good as its key.
pub const MIN_VERP_SECRET_LEN: usize = 16;

/// One problem in the config, tied to the key it is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found in one config file.
#[derive(Clone, Debug, Default)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    pub(crate) fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError {
            path: path.into(),
            message: message.into(),
        });
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A value that must never reach a log line or an error message.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub server: ServerConfig,
    pub listeners: Vec<ListenerConfig>,
    pub tls: TlsConfig,
    pub tenants: Vec<TenantConfig>,
    pub dns: DnsConfig,
    pub delivery: DeliveryConfig,
    pub dkim: Vec<DkimConfig>,
    pub bounces: BouncesConfig,
    pub events: EventsConfig,
    pub admin: AdminConfig,
    pub cluster: ClusterConfig,
    pub suppression: SuppressionConfig,
    pub limits: LimitsConfig,
    pub webhooks: WebhooksConfig,
    pub dsn: DsnConfig,
    pub policy: PolicyConfig,
    pub history: HistoryConfig,
    /// `[reputation]`: the tenant reputation guard.
    pub reputation: reputation::ReputationConfig,
    /// `[classification]`: rules that label failures, tried before the
    /// built-in ones.
    pub classification: classification::ClassificationConfig,
    /// `[[smarthost]]`: providers some mail is relayed through.
    pub smarthosts: Vec<smarthost::SmarthostConfig>,
    /// The file it was read from, which a reload reads again; none for a
    /// config built from text.
    pub source: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct ServerConfig {
    /// Name in the banner, EHLO reply, Received header and DSN Reporting-MTA.
    pub hostname: String,
    /// Where accepted messages are kept until every recipient is done.
    pub spool_dir: PathBuf,
    /// Size at which a spool segment file is closed and the next started.
    pub spool_segment_size: Size,
    /// Largest message accepted (announced in EHLO SIZE).
    pub max_message_size: Size,
    /// Recipients per message; further RCPTs get 452 4.5.3 (RFC 5321 §4.5.3.1.8).
    pub max_recipients: usize,
    /// Client connections open at once, over all listeners.
    pub max_connections: usize,
    /// Client connections open at once from one IP address.
    pub max_connections_per_ip: usize,
    /// Connections open at once from one IP address that has not logged in
    /// recently and is not in a listener's `trusted_networks`: far below
    /// `max_connections_per_ip`, so a few hosts cannot hold every slot.
    pub max_unauthenticated_per_ip: usize,
    /// Of `max_connections`, slots that only clients known to be good may
    /// take: a trusted network, or an IP that logged in within
    /// `auth_known_for`. A flood of strangers never locks out the apps.
    /// Unset: a tenth of `max_connections`.
    pub reserved_connections: Option<usize>,
    /// How long an IP that logged in successfully counts as known.
    pub auth_known_for: Span,
    /// How long to wait for a command line, counted from its first byte, so
    /// a byte now and then does not keep a session open (RFC 5321 §4.5.3.2:
    /// at least 5 minutes).
    pub command_timeout: Span,
    /// How long a whole DATA or BDAT transfer may take.
    pub data_timeout: Span,
    /// How long one transaction may take, from MAIL FROM to the end of its
    /// message.
    pub transaction_timeout: Span,
    /// NOOP, RSET, VRFY, HELP, EHLO and HELO accepted between two messages;
    /// past it the session is closed (Postfix's junk command limit).
    pub max_junk_commands: u32,
    /// Message bytes being received at once over all sessions; a message
    /// that would go over is refused with `452 4.3.1`.
    pub max_receiving_bytes: Size,
    /// Unknown or malformed commands tolerated before 421 and disconnect.
    pub max_bad_commands: u32,
    /// Failed AUTH attempts from one IP before it is refused (421).
    pub max_auth_failures: u32,
    /// Each failed AUTH from an IP delays that IP's next AUTH reply by this much.
    pub auth_failure_delay: Span,
    /// How long failed AUTH attempts are remembered per IP.
    pub auth_failure_window: Span,
    /// How long SIGTERM waits for sessions and deliveries in flight.
    pub shutdown_grace: Span,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            hostname: "localhost".into(),
            spool_dir: "var/spool".into(),
            spool_segment_size: Size(64 << 20),
            max_message_size: Size(25 << 20),
            max_recipients: 100,
            max_connections: 10_000,
            max_connections_per_ip: 500,
            max_unauthenticated_per_ip: 50,
            reserved_connections: None,
            auth_known_for: Span(std::time::Duration::from_secs(7 * 86_400)),
            command_timeout: Span(std::time::Duration::from_secs(300)),
            data_timeout: Span(std::time::Duration::from_secs(600)),
            transaction_timeout: Span(std::time::Duration::from_secs(1_200)),
            max_junk_commands: 100,
            max_receiving_bytes: Size(512 << 20),
            max_bad_commands: 10,
            max_auth_failures: 10,
            auth_failure_delay: Span(std::time::Duration::from_secs(1)),
            auth_failure_window: Span(std::time::Duration::from_secs(900)),
            shutdown_grace: Span(std::time::Duration::from_secs(30)),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    None,
    #[default]
    Starttls,
    /// TLS from the first byte (port 465, RFC 8314).
    Implicit,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    #[default]
    Required,
    Optional,
    None,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ListenerConfig {
    pub address: SocketAddr,
    #[serde(default)]
    pub tls: TlsMode,
    #[serde(default)]
    pub auth: AuthMode,
    /// Clients in these networks may relay without AUTH.
    #[serde(default)]
    pub trusted_networks: Vec<IpNet>,
    /// Offer AUTH without TLS. Only allowed on a loopback address.
    #[serde(default)]
    pub allow_plaintext_auth: bool,
    /// Not a config key: set on the listener made from `[bounces]
    /// listener`, which takes in late bounces and complaints for the VERP
    /// addresses and relays nothing.
    #[serde(skip)]
    pub bounces: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Generate a self-signed certificate at `cert`/`key` when they are missing.
    pub self_signed: bool,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert: "certs/relay.crt".into(),
            key: "certs/relay.key".into(),
            self_signed: true,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct TenantConfig {
    pub name: String,
    pub username: String,
    /// argon2id PHC string, as printed by `herald hash-password`.
    pub password_hash: Secret,
    /// `*@acme.example`, `*@*.acme.example`, `billing@acme.example` or `*`.
    #[serde(default)]
    pub allowed_senders: Vec<String>,
    #[serde(default)]
    pub webhook_url: Option<String>,
    #[serde(default)]
    pub webhook_secret: Option<Secret>,
    /// Send RFC 3464 bounce reports (DSNs) to this tenant's senders; off
    /// for an app that relies on webhooks alone.
    #[serde(default = "yes")]
    pub dsn: bool,
    /// Deliver this tenant's mail through this `[[smarthost]]` (by name)
    /// instead of to the recipients' MX hosts.
    #[serde(default)]
    pub smarthost: Option<String>,
    /// The From: header's domain must be one that `allowed_senders`
    /// covers, as the envelope sender's must (off: any From:).
    #[serde(default = "yes")]
    pub bind_from_header: bool,
}

fn yes() -> bool {
    true
}

/// `[dsn]`: bounce reports to the envelope sender.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct DsnConfig {
    /// Off = no DSN for anyone (tenants' `dsn` is then moot).
    pub enabled: bool,
    /// A recipient that asked for NOTIFY=DELAY and is still not delivered
    /// after this long gets one "delayed" report.
    pub delay_after: Span,
    /// With RET=FULL the whole message goes back up to this size; larger
    /// ones (and 8-bit ones) get their header only.
    pub max_full_size: Size,
}

impl Default for DsnConfig {
    fn default() -> Self {
        DsnConfig {
            enabled: true,
            delay_after: Span(std::time::Duration::from_secs(4 * 3600)),
            max_full_size: Size(256 << 10),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct DnsConfig {
    /// `"127.0.0.1:5353"` or `"192.0.2.1"` (port 53); empty = system resolver.
    pub nameservers: Vec<String>,
    /// Per query.
    pub timeout: Span,
    pub attempts: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: Vec::new(),
            timeout: Span(std::time::Duration::from_secs(5)),
            attempts: 2,
        }
    }
}

impl DnsConfig {
    /// Nameserver addresses, port 53 where none is given.
    pub fn nameserver_addrs(&self) -> Result<Vec<SocketAddr>, String> {
        self.nameservers
            .iter()
            .map(|s| {
                s.parse::<SocketAddr>()
                    .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                    .map_err(|_| format!("{s:?} is not an IP address or IP:port"))
            })
            .collect()
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StarttlsPolicy {
    /// Use STARTTLS when offered, without certificate checks; fall back to
    /// plaintext when the handshake fails (RFC 3207 / RFC 7435).
    #[default]
    Opportunistic,
    /// Defer rather than send in plaintext.
    Required,
    Disabled,
}

/// A destination's TLS level in `[delivery.tls_policy]`, as Postfix's
/// `smtp_tls_policy_maps` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsLevel {
    /// No STARTTLS.
    None,
    /// STARTTLS when offered, any certificate, plaintext when it fails.
    May,
    /// STARTTLS required, any certificate.
    Encrypt,
    /// STARTTLS required with a certificate valid for the MX host name.
    Verify,
    /// DANE (RFC 7672) where the MX hosts publish TLSA records under
    /// DNSSEC; elsewhere as `may`, or as the domain's MTA-STS policy says.
    Dane,
    /// DANE or nothing: an MX host without usable TLSA records is not used.
    DaneOnly,
}

impl TlsLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsLevel::None => "none",
            TlsLevel::May => "may",
            TlsLevel::Encrypt => "encrypt",
            TlsLevel::Verify => "verify",
            TlsLevel::Dane => "dane",
            TlsLevel::DaneOnly => "dane-only",
        }
    }
}

/// One entry of `[delivery.tls_policy]`: a level, and whether it may be
/// weaker than what the domain publishes (`"may!"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct TlsPolicyEntry {
    pub level: TlsLevel,
    /// Written with a trailing `!`: applies even where a published MTA-STS
    /// policy asks for more.
    pub overrides_published: bool,
}

impl TryFrom<String> for TlsPolicyEntry {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        let (name, bang) = match s.strip_suffix('!') {
            Some(n) => (n, true),
            None => (s.as_str(), false),
        };
        let level = match name {
            "none" => TlsLevel::None,
            "may" => TlsLevel::May,
            "encrypt" => TlsLevel::Encrypt,
            "verify" => TlsLevel::Verify,
            "dane" => TlsLevel::Dane,
            "dane-only" => TlsLevel::DaneOnly,
            other => {
                return Err(format!(
                    "unknown TLS level {other:?}; one of \"none\", \"may\", \"encrypt\", \"verify\", \"dane\", \"dane-only\" (a trailing ! lets it weaken a published MTA-STS or DANE policy)"
                ));
            }
        };
        Ok(TlsPolicyEntry {
            level,
            overrides_published: bang,
        })
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct DeliveryConfig {
    /// EHLO name; defaults to `server.hostname`.
    pub helo_name: Option<String>,
    /// Port of the recipients' MX hosts (25; tests and staging use sinks).
    pub port: u16,
    /// Local addresses to send from, used in turn; empty = the OS's choice.
    pub source_ips: Vec<IpAddr>,
    /// Waits between attempts; the last one repeats until the lifetime ends.
    pub retry: Vec<Span>,
    /// Each wait is stretched or shrunk at random by up to this fraction.
    pub retry_jitter: f64,
    /// After this, a recipient still not delivered expires and bounces.
    pub max_queue_lifetime: Span,
    pub connect_timeout: Span,
    /// Per command (EHLO, MAIL, RCPT, ...; RFC 5321 §4.5.3.2).
    pub command_timeout: Span,
    /// For sending the message and getting the final reply.
    pub data_timeout: Span,
    /// Connections open at once to one destination domain.
    pub max_connections_per_domain: usize,
    /// MX addresses tried per attempt before giving up until the next retry.
    pub max_mx_addresses: usize,
    /// Messages sent over one connection before it is closed.
    pub max_messages_per_connection: usize,
    /// How long an idle connection is kept for reuse.
    pub idle_timeout: Span,
    /// Bodies of queued messages read back into memory for delivery at
    /// once; retries wait beyond that (a backlog after a restart or flush).
    pub max_bytes_in_flight: Size,
    pub starttls: StarttlsPolicy,
    /// Per destination domain (`"bank.example"`, or `".bank.example"` for
    /// its subdomains): the TLS level delivery uses there instead of
    /// `starttls`; see [`TlsPolicyEntry`].
    pub tls_policy: std::collections::BTreeMap<String, TlsPolicyEntry>,
    /// The public addresses receivers see herald's mail come from, when
    /// they differ from `source_ips` (NAT); used by SPF alignment, `domain
    /// check` and `dnsbl check`.
    pub public_ips: Vec<IpAddr>,
    /// `[delivery.dane]`: DANE for SMTP (RFC 7672).
    pub dane: DaneConfig,

    /// `[delivery.mta_sts]`: MTA-STS policies of recipient domains (RFC 8461).
    pub mta_sts: MtaStsConfig,
    /// `[delivery.tls_reports]`: daily TLS reports to recipient domains (RFC 8460).
    pub tls_reports: tlsrpt::TlsReportsConfig,
}

impl DeliveryConfig {
    /// The `[delivery.tls_policy]` entry for a destination domain: its own,
    /// else the nearest `.parent` entry.
    pub fn tls_policy_for(&self, domain: &str) -> Option<TlsPolicyEntry> {
        // Keys as written ("Bank.Example.") match like DNS names do.
        let get = |name: &str| {
            self.tls_policy
                .iter()
                .find(|(k, _)| k.trim_end_matches('.').eq_ignore_ascii_case(name))
                .map(|(_, e)| *e)
        };
        let domain = domain.trim_end_matches('.');
        if let Some(e) = get(domain) {
            return Some(e);
        }
        let mut rest = domain;
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some(e) = get(&format!(".{parent}")) {
                return Some(e);
            }
            rest = parent;
        }
        None
    }

    /// Whether any destination may need DANE's validating resolver.
    pub fn dane_anywhere(&self) -> bool {
        self.dane.enabled
            || self
                .tls_policy
                .values()
                .any(|e| matches!(e.level, TlsLevel::Dane | TlsLevel::DaneOnly))
    }

    /// What the config says of TLS to `domain`, before any lookup: the
    /// rules delivery applies and `herald tls check` explains.
    pub fn tls_plan(&self, domain: &str) -> TlsPlan {
        let configured = self.tls_policy_for(domain);
        let overridden = configured.is_some_and(|c| c.overrides_published);
        TlsPlan {
            configured,
            overridden,
            dane_only: configured.is_some_and(|c| c.level == TlsLevel::DaneOnly),
            // A `dane` line asks for DANE here; `[delivery.dane] enabled`
            // everywhere a "!" line does not override published policies.
            dane: match configured {
                Some(c) if matches!(c.level, TlsLevel::Dane | TlsLevel::DaneOnly) => true,
                _ => self.dane.enabled && !overridden,
            },
        }
    }
}

/// The config's part in the TLS of one destination (see
/// [`DeliveryConfig::tls_plan`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlsPlan {
    /// Its `[delivery.tls_policy]` entry.
    pub configured: Option<TlsPolicyEntry>,
    /// Written with "!": published policies (MTA-STS, DANE) are not used.
    pub overridden: bool,
    /// `dane-only`: hosts without DNSSEC-signed TLSA records are not used.
    pub dane_only: bool,
    /// DANE is asked for this destination.
    pub dane: bool,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        let m = |n: u64| Span(std::time::Duration::from_secs(n * 60));
        DeliveryConfig {
            helo_name: None,
            port: 25,
            source_ips: Vec::new(),
            retry: vec![m(5), m(10), m(20), m(40), m(60), m(120), m(240)],
            retry_jitter: 0.1,
            max_queue_lifetime: m(5 * 24 * 60),
            connect_timeout: Span(std::time::Duration::from_secs(30)),
            command_timeout: m(5),
            data_timeout: m(10),
            max_connections_per_domain: 16,
            max_mx_addresses: 5,
            max_messages_per_connection: 100,
            idle_timeout: Span(std::time::Duration::from_secs(5)),
            max_bytes_in_flight: Size(256 << 20),
            starttls: StarttlsPolicy::Opportunistic,
            tls_policy: std::collections::BTreeMap::new(),
            public_ips: Vec::new(),
            dane: DaneConfig::default(),

            mta_sts: MtaStsConfig::default(),
            tls_reports: tlsrpt::TlsReportsConfig::default(),
        }
    }
}

/// `[delivery.dane]`: DANE for SMTP (RFC 7672), checked with a resolver of
/// its own that validates DNSSEC.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct DaneConfig {
    /// DANE for every destination (as `tls_policy` level `"dane"` does for
    /// one). Default false: it needs nameservers that pass DNSSEC records
    /// through, or every signed destination would defer as bogus.
    pub enabled: bool,
    /// A file of DNSKEY records in zone-file form
    /// (`example. 3600 IN DNSKEY 257 3 13 ...`) trusted instead of the
    /// DNS root's keys (private roots, tests). Default: the root's.
    pub trust_anchor: Option<PathBuf>,
}

impl DaneConfig {
    /// The keys DNSSEC validation starts from.
    pub fn trust_anchors(&self) -> Result<hickory_resolver::proto::dnssec::TrustAnchors, String> {
        match &self.trust_anchor {
            None => Ok(Default::default()),
            Some(path) => hickory_resolver::proto::dnssec::TrustAnchors::from_file(path)
                .map_err(|e| format!("cannot read DNSKEY records from {}: {e}", path.display())),
        }
    }
}

/// `[delivery.mta_sts]`: how recipient domains' MTA-STS policies (RFC 8461)
/// are fetched and cached.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct MtaStsConfig {
    /// Look policies up at all. Default true.
    pub enabled: bool,
    /// The whole fetch of one policy: address lookup, connect, TLS, answer.
    /// Default 10s.
    pub fetch_timeout: Span,
    /// A PEM file of CA certificates trusted for policy hosts besides the
    /// system's trust store (private deployments, tests). Default none.
    pub ca_file: Option<PathBuf>,
    /// How long a domain without an `_mta-sts` TXT record is remembered as
    /// such. Default 1h.
    pub negative_cache: Span,
    /// The port policy hosts are asked on. RFC 8461 says 443; only tests
    /// (which cannot bind 443) change it.
    pub https_port: u16,
}

impl Default for MtaStsConfig {
    fn default() -> Self {
        MtaStsConfig {
            enabled: true,
            fetch_timeout: Span(std::time::Duration::from_secs(10)),
            ca_file: None,
            negative_cache: Span(std::time::Duration::from_secs(3600)),
            https_port: 443,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
pub enum DkimAlgorithm {
    #[default]
    #[serde(rename = "rsa-sha256")]
    RsaSha256,
    #[serde(rename = "ed25519-sha256", alias = "ed25519")]
    Ed25519Sha256,
}

#[derive(Clone, Debug, Deserialize)]
pub struct DkimConfig {
    /// Signing domain (`d=`); signs mail whose From: is in this domain or
    /// below it.
    pub domain: String,
    /// Selector (`s=`): the key is published at `selector._domainkey.domain`.
    pub selector: String,
    #[serde(default)]
    pub algorithm: DkimAlgorithm,
    /// PEM private key: RSA (PKCS#1 or PKCS#8, 2048+ bits) or Ed25519 (PKCS#8).
    pub key: PathBuf,
    /// Also sign messages whose From: domain has no key of its own (the
    /// relay's own domain). Default false.
    #[serde(default)]
    pub fallback: bool,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct BouncesConfig {
    /// VERP return-path domain; unset = keep the app's sender.
    pub return_path_domain: Option<String>,
    /// Where late bounces and complaints come in.
    pub listener: Option<SocketAddr>,
    /// Key of the HMAC that authenticates VERP addresses; needed with
    /// `return_path_domain`.
    pub verp_secret: Option<Secret>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct EventsConfig {
    /// JSON lines, one event per line.
    pub log: PathBuf,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            log: "var/events.jsonl".into(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct AdminConfig {
    pub address: SocketAddr,
    pub token: Option<Secret>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            address: SocketAddr::from(([127, 0, 0, 1], 8025)),
            token: None,
        }
    }
}

/// `[suppression]`: the per-tenant list of addresses not to send to.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct SuppressionConfig {
    /// How long a new entry lasts; none (the default) = until removed.
    pub expire_after: Option<Span>,
    /// The list's JSON-lines log; default `suppressions.jsonl` in
    /// `server.spool_dir`.
    pub file: Option<PathBuf>,
}

/// `[webhooks]`: how events are POSTed to each tenant's `webhook_url`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct WebhooksConfig {
    /// How long an event is retried before it is given up.
    pub retry_for: Span,
    /// For one whole request: connect, TLS, send, answer.
    pub timeout: Span,
    /// Requests in flight at once, over all tenants.
    pub max_concurrency: usize,
    /// Wait after the first failure; doubled after each further one.
    pub backoff_min: Span,
    /// Longest wait between two attempts.
    pub backoff_max: Span,
    /// The durable outbox (JSON lines); default `webhooks.jsonl` in
    /// `server.spool_dir`.
    pub outbox: Option<PathBuf>,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        let s = |n: u64| Span(std::time::Duration::from_secs(n));
        WebhooksConfig {
            retry_for: s(3 * 24 * 3600),
            timeout: s(10),
            max_concurrency: 8,
            backoff_min: s(10),
            backoff_max: s(3600),
            outbox: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct ClusterConfig {
    pub redis_url: Option<String>,
    /// Prefix of every key herald writes to Redis (`<prefix>:rl:...`), so
    /// that several installations can share one Redis.
    pub key_prefix: String,
    /// How long one shared rate-limit check may take in Redis; past it (or
    /// on any Redis error) herald uses its local limits for a while. Also
    /// the connect timeout of the events stream and the shared suppression
    /// list (at least 200 ms; their batches get at least 1 s to answer).
    pub redis_timeout: Span,
    /// The Redis stream every event is XADDed to; default
    /// `<key_prefix>:events`.
    pub events_stream: Option<String>,
    /// `MAXLEN ~` of that stream: Redis trims it to about this many events.
    pub events_stream_maxlen: u64,
}

impl ClusterConfig {
    /// `events_stream`, or its default `<key_prefix>:events`.
    pub fn events_stream_name(&self) -> String {
        self.events_stream
            .clone()
            .unwrap_or_else(|| format!("{}:events", self.key_prefix))
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            redis_url: None,
            key_prefix: "herald".into(),
            redis_timeout: Span(std::time::Duration::from_millis(50)),
            events_stream: None,
            events_stream_maxlen: 100_000,
        }
    }
}

/// `[policy]`: checks on each message before it is accepted. Each part has
/// its keys and their validation in a module of its own here.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct PolicyConfig {
    /// `[policy.spam]`: outbound spam heuristics.
    pub spam: spam::SpamConfig,
    /// `[policy.dmarc]`: would the message pass DMARC at the receiver.
    pub dmarc: dmarc::DmarcConfig,
    /// `[[policy.dnsbl]]`: DNS blocklist zones.
    pub dnsbl: Vec<dnsbl::ZoneConfig>,
}

/// `[history]`: finished messages remembered for the status API, late
/// bounces and idempotent submission.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct HistoryConfig {
    /// How long a finished message's status stays queryable.
    pub retention: Span,
    /// At most this many finished messages are kept (oldest go first).
    pub max_messages: usize,
    /// A message whose Message-ID the same tenant submitted within this
    /// window is answered 250 with the first queue id and not sent again;
    /// "0s" turns it off.
    pub idempotency_window: Span,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            retention: Span(std::time::Duration::from_secs(7 * 24 * 3600)),
            max_messages: 500_000,
            idempotency_window: Span(std::time::Duration::from_secs(24 * 3600)),
        }
    }
}

/// How long, and how much, is kept.
#[derive(Clone, Copy, Debug)]
pub struct HistoryRetention {
    pub retention_secs: u64,
    pub max_messages: usize,
    /// A tenant's Message-ID seen within this many seconds is a duplicate;
    /// 0 = idempotent submission off.
    pub idempotency_secs: u64,
}

impl HistoryConfig {
    pub fn limits(&self) -> HistoryRetention {
        HistoryRetention {
            retention_secs: self.retention.0.as_secs(),
            max_messages: self.max_messages,
            idempotency_secs: self.idempotency_window.0.as_secs(),
        }
    }
}

/// `[limits]`: rate limits. Every limit
/// is unset by default: no limit.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct LimitsConfig {
    /// Messages per tenant (checked at MAIL FROM; 451 4.7.1 over it).
    pub tenant_messages: Option<Rate>,
    /// Accepted recipients per tenant (checked at RCPT TO; 451 4.7.1).
    pub tenant_recipients: Option<Rate>,
    /// New connections per client IP (421 4.7.0 at connect).
    pub ip_connections: Option<Rate>,
    /// Delivery: messages per recipient domain without an entry in
    /// `domains` (traffic shaping; over it, mail waits in the queue).
    pub domain_default: Option<Rate>,
    /// Delivery: messages per recipient domain, e.g. `"gmail.com" = "3000/h"`.
    pub domains: std::collections::BTreeMap<String, Rate>,
    /// Per-tenant overrides of `tenant_messages` / `tenant_recipients`,
    /// keyed by tenant name.
    pub tenants: std::collections::BTreeMap<String, TenantLimits>,
}

/// `[limits.tenants.<name>]`: this tenant's own limits.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct TenantLimits {
    pub messages: Option<Rate>,
    pub recipients: Option<Rate>,
}

impl Config {
    /// Reads and validates a config file.
    /// [`Config::load`] for a command line: every problem printed to
    /// standard error with its key path, `None` then.
    pub fn load_or_print(path: &Path) -> Option<Config> {
        match Config::load(path) {
            Ok(c) => Some(c),
            Err(errs) => {
                eprintln!("{}: {} problem(s):\n{errs}", path.display(), errs.0.len());
                None
            }
        }
    }

    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                path: path.display().to_string(),
                message: format!("cannot read config file: {e}"),
            }])
        })?;
        let mut config = Config::from_toml_str(&text)?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses and validates config text.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigErrors> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let mut msg = e.message().to_string();
            if let Some(span) = e.span() {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                msg = format!("line {line}: {msg}");
            }
            ConfigErrors(vec![ConfigError {
                path: "(syntax)".into(),
                message: msg,
            }])
        })?;

        let mut errs = ConfigErrors::default();
        const KNOWN: &[&str] = &[
            "server",
            "listener",
            "tls",
            "tenant",
            "dns",
            "delivery",
            "dkim",
            "bounces",
            "events",
            "admin",
            "cluster",
            "suppression",
            "limits",
            "webhooks",
            "dsn",
            "policy",
            "history",
            "reputation",
            "classification",
            "smarthost",
        ];
        for key in table.keys() {
            if !KNOWN.contains(&key.as_str()) {
                errs.push(
                    // An empty name still needs a visible key path.
                    if key.is_empty() {
                        "\"\"".to_string()
                    } else {
                        key.clone()
                    },
                    format!("unknown section; known ones are {}", KNOWN.join(", ")),
                );
            }
        }

        // Array items keep their position, so that paths like `listener[1]`
        // stay right when an earlier item failed to parse.
        let listeners: Vec<Option<ListenerConfig>> = array(&table, "listener", &mut errs);
        let tenants: Vec<Option<TenantConfig>> = array(&table, "tenant", &mut errs);
        let smarthosts: Vec<Option<smarthost::SmarthostConfig>> =
            array(&table, "smarthost", &mut errs);
        let cfg = Config {
            server: section(&table, "server", &mut errs).unwrap_or_default(),
            listeners: listeners.iter().flatten().cloned().collect(),
            tls: section(&table, "tls", &mut errs).unwrap_or_default(),
            tenants: tenants.iter().flatten().cloned().collect(),
            dns: section(&table, "dns", &mut errs).unwrap_or_default(),
            delivery: section(&table, "delivery", &mut errs).unwrap_or_default(),
            dkim: array(&table, "dkim", &mut errs)
                .into_iter()
                .flatten()
                .collect(),
            bounces: section(&table, "bounces", &mut errs).unwrap_or_default(),
            events: section(&table, "events", &mut errs).unwrap_or_default(),
            admin: section(&table, "admin", &mut errs).unwrap_or_default(),
            cluster: section(&table, "cluster", &mut errs).unwrap_or_default(),
            suppression: section(&table, "suppression", &mut errs).unwrap_or_default(),
            limits: section(&table, "limits", &mut errs).unwrap_or_default(),
            webhooks: section(&table, "webhooks", &mut errs).unwrap_or_default(),
            dsn: section(&table, "dsn", &mut errs).unwrap_or_default(),
            policy: section(&table, "policy", &mut errs).unwrap_or_default(),
            history: section(&table, "history", &mut errs).unwrap_or_default(),
            reputation: section(&table, "reputation", &mut errs).unwrap_or_default(),
            classification: section(&table, "classification", &mut errs).unwrap_or_default(),
            smarthosts: smarthosts.iter().flatten().cloned().collect(),
            source: None,
        };
        cfg.validate(&listeners, &tenants, &mut errs);
        smarthost::validate(&smarthosts, &tenants, &mut errs);
        let mut cfg = cfg;
        if let Some(address) = cfg.bounces.listener {
            if cfg.bounces.return_path_domain.is_none() {
                errs.push(
                    "bounces.listener",
                    "needs return_path_domain: the listener takes mail only for the VERP addresses there",
                );
            }
            if cfg
                .listeners
                .iter()
                .any(|l| l.address == address && address.port() != 0)
            {
                errs.push(
                    "bounces.listener",
                    format!("{address} is used by a [[listener]]"),
                );
            }
            // Last, so that [[listener]] indexes stay as written.
            cfg.listeners.push(ListenerConfig {
                address,
                tls: TlsMode::Starttls,
                auth: AuthMode::None,
                trusted_networks: Vec::new(),
                allow_plaintext_auth: false,
                bounces: true,
            });
        }
        if errs.0.is_empty() {
            Ok(cfg)
        } else {
            Err(errs)
        }
    }

    /// The name used in EHLO when delivering.
    pub fn helo_name(&self) -> &str {
        self.delivery
            .helo_name
            .as_deref()
            .unwrap_or(&self.server.hostname)
    }

    /// Where the suppression list is kept (`[suppression] file`).
    pub fn suppression_file(&self) -> PathBuf {
        self.suppression
            .file
            .clone()
            .unwrap_or_else(|| self.server.spool_dir.join("suppressions.jsonl"))
    }

    /// Where the webhook outbox is kept (`[webhooks] outbox`).
    pub fn webhook_outbox(&self) -> PathBuf {
        self.webhooks
            .outbox
            .clone()
            .unwrap_or_else(|| self.server.spool_dir.join("webhooks.jsonl"))
    }

    /// The addresses receivers see herald's mail come from:
    /// `delivery.public_ips`, else `delivery.source_ips`.
    pub fn sending_ips(&self) -> &[IpAddr] {
        if self.delivery.public_ips.is_empty() {
            &self.delivery.source_ips
        } else {
            &self.delivery.public_ips
        }
    }

    /// Whether any listener needs a certificate.
    pub fn needs_tls(&self) -> bool {
        self.listeners.iter().any(|l| l.tls != TlsMode::None)
    }

    fn validate(
        &self,
        listeners: &[Option<ListenerConfig>],
        tenants: &[Option<TenantConfig>],
        errs: &mut ConfigErrors,
    ) {
        let host = &self.server.hostname;
        if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c.is_control()) {
            errs.push(
                "server.hostname",
                "must be a host name without spaces, e.g. \"relay.example.net\"",
            );
        }
        if self.server.max_message_size.0 == 0 {
            errs.push("server.max_message_size", "must be more than 0");
        }
        // Spool records carry 32-bit lengths; no receiver takes such mail anyway.
        if self.server.max_message_size.0 > 1 << 30 {
            errs.push(
                "server.max_message_size",
                "must be at most 1GiB (mail servers commonly refuse more than 25-150MiB)",
            );
        }
        if self.server.max_recipients == 0 {
            errs.push("server.max_recipients", "must be at least 1");
        }
        if self.server.max_connections == 0 || self.server.max_connections_per_ip == 0 {
            errs.push(
                "server.max_connections",
                "max_connections and max_connections_per_ip must be at least 1",
            );
        }
        if let Some(token) = &self.admin.token
            && token.expose().trim().is_empty()
        {
            errs.push(
                "admin.token",
                "is empty, which no client could present; set a long random token (e.g. the output of `openssl rand -hex 32`) or remove the key to keep the API closed",
            );
        }
        if self.server.max_connections_per_ip > self.server.max_connections {
            errs.push(
                "server.max_connections_per_ip",
                format!(
                    "{} is more than server.max_connections ({})",
                    self.server.max_connections_per_ip, self.server.max_connections
                ),
            );
        }
        if self.server.max_unauthenticated_per_ip == 0 {
            errs.push("server.max_unauthenticated_per_ip", "must be at least 1");
        }
        if let Some(r) = self.server.reserved_connections
            && r >= self.server.max_connections
        {
            errs.push(
                "server.reserved_connections",
                format!(
                    "{r} leaves no connection for clients not yet known: it must be less than server.max_connections ({})",
                    self.server.max_connections
                ),
            );
        }
        if self.server.transaction_timeout.0 < self.server.data_timeout.0 {
            errs.push(
                "server.transaction_timeout",
                "must be at least server.data_timeout: a transaction includes its DATA",
            );
        }
        if self.server.max_receiving_bytes.0 < self.server.max_message_size.0 {
            errs.push(
                "server.max_receiving_bytes",
                "must be at least server.max_message_size, or no message of the largest size could be received",
            );
        }

        if listeners.is_empty() {
            errs.push(
                "listener",
                "at least one [[listener]] is needed, e.g. address = \"127.0.0.1:2587\"",
            );
        }
        let mut seen = HashSet::new();
        for (i, l) in listeners.iter().enumerate() {
            let Some(l) = l else { continue };
            let p = format!("listener[{i}]");
            if l.address.port() != 0 && !seen.insert(l.address) {
                errs.push(
                    format!("{p}.address"),
                    format!("{} is used by another listener", l.address),
                );
            }
            if l.tls == TlsMode::None && l.auth != AuthMode::None && !l.allow_plaintext_auth {
                errs.push(
                    format!("{p}.auth"),
                    "AUTH is only offered over TLS: set tls = \"starttls\" or \"implicit\", or auth = \"none\" with trusted_networks, or allow_plaintext_auth = true on a loopback address",
                );
            }
            if l.allow_plaintext_auth && !l.address.ip().is_loopback() {
                errs.push(
                    format!("{p}.allow_plaintext_auth"),
                    "allowed only on a loopback address: passwords would cross the network in clear",
                );
            }
            if l.auth == AuthMode::None && l.trusted_networks.is_empty() {
                errs.push(
                    format!("{p}.auth"),
                    "auth = \"none\" without trusted_networks would accept nothing; name the networks that may relay",
                );
            }
        }

        let mut users = HashSet::new();
        let mut names = HashSet::new();
        for (i, t) in tenants.iter().enumerate() {
            let Some(t) = t else { continue };
            let p = format!("tenant[{i}]");
            if !names.insert(&t.name) {
                errs.push(format!("{p}.name"), format!("{:?} is used twice", t.name));
            }
            if !users.insert(&t.username) {
                errs.push(
                    format!("{p}.username"),
                    format!("{:?} is used twice", t.username),
                );
            }
            match argon2::PasswordHash::new(t.password_hash.expose()) {
                Ok(h) if h.algorithm.as_str().starts_with("argon2") => {}
                // The value itself is a secret: describe it, never echo it.
                _ => errs.push(
                    format!("{p}.password_hash"),
                    "must be an argon2 PHC string ($argon2id$...); make one with `herald hash-password`",
                ),
            }
            if t.allowed_senders.is_empty() {
                errs.push(
                    format!("{p}.allowed_senders"),
                    "list the sender addresses this tenant may use, e.g. [\"*@acme.example\"]",
                );
            }
            for (j, pat) in t.allowed_senders.iter().enumerate() {
                if let Err(e) = crate::config::senders::validate_pattern(pat) {
                    errs.push(format!("{p}.allowed_senders[{j}]"), e);
                }
            }
            if let Some(url) = &t.webhook_url {
                if let Err(e) = webhook::Target::parse(url) {
                    errs.push(format!("{p}.webhook_url"), e);
                }
                if t.webhook_secret
                    .as_ref()
                    .is_none_or(|s| s.expose().is_empty())
                {
                    errs.push(
                        format!("{p}.webhook_secret"),
                        "needed with webhook_url: the app checks each request's signature with it",
                    );
                }
            }
        }
        for name in self.limits.tenants.keys() {
            if !self.tenants.iter().any(|t| &t.name == name) {
                errs.push(
                    format!("limits.tenants.{name}"),
                    "no [[tenant]] has this name",
                );
            }
        }
        if let Some(url) = &self.cluster.redis_url
            && let Err(e) = redis::Client::open(url.as_str())
        {
            errs.push("cluster.redis_url", format!("invalid Redis URL: {e}"));
        }
        if self.cluster.events_stream_maxlen == 0 {
            errs.push("cluster.events_stream_maxlen", "must be at least 1");
        }
        if self.cluster.events_stream.as_deref() == Some("") {
            errs.push("cluster.events_stream", "must not be empty");
        }
        let w = &self.webhooks;
        if w.max_concurrency == 0 {
            errs.push("webhooks.max_concurrency", "must be at least 1");
        }
        for (key, span) in [
            ("webhooks.retry_for", w.retry_for),
            ("webhooks.timeout", w.timeout),
            ("webhooks.backoff_min", w.backoff_min),
        ] {
            if span.0.is_zero() {
                errs.push(key, "must be longer than 0");
            }
        }
        if w.backoff_max.0 < w.backoff_min.0 {
            errs.push("webhooks.backoff_max", "must be at least backoff_min");
        }

        validate_verp(&self.bounces, errs);
        if self.history.retention.0.as_secs() == 0 {
            errs.push("history.retention", "must be at least 1s");
        }
        if self.history.idempotency_window.0 > self.history.retention.0 {
            errs.push(
                "history.idempotency_window",
                "must not be longer than history.retention",
            );
        }
        spam::validate(&self.policy.spam, "policy.spam", errs);
        reputation::validate(&self.reputation, "reputation", errs);
        dmarc::validate(&self.policy.dmarc, "policy.dmarc", errs);
        for (i, zone) in self.policy.dnsbl.iter().enumerate() {
            dnsbl::validate(zone, &format!("policy.dnsbl[{i}]"), errs);
        }

        if let Err(e) = self.dns.nameserver_addrs() {
            errs.push("dns.nameservers", e);
        }
        if self.dns.attempts == 0 {
            errs.push("dns.attempts", "must be at least 1");
        }
        if self.suppression.expire_after.is_some_and(|s| s.0.is_zero()) {
            errs.push(
                "suppression.expire_after",
                "must be longer than 0; leave it unset for entries that never expire",
            );
        }

        let d = &self.delivery;
        if d.retry.is_empty() {
            errs.push("delivery.retry", "needs at least one wait, e.g. [\"5m\"]");
        }
        if d.retry.iter().any(|s| s.0.is_zero()) {
            errs.push("delivery.retry", "waits must be longer than 0");
        }
        if !(0.0..=0.5).contains(&d.retry_jitter) {
            errs.push("delivery.retry_jitter", "must be between 0.0 and 0.5");
        }
        if d.max_queue_lifetime.0.is_zero() {
            errs.push("delivery.max_queue_lifetime", "must be longer than 0");
        }
        if d.port == 0 {
            errs.push("delivery.port", "must be a port number from 1 to 65535");
        }
        if d.max_mx_addresses == 0 {
            errs.push("delivery.max_mx_addresses", "must be at least 1");
        }
        if d.max_connections_per_domain == 0 {
            errs.push("delivery.max_connections_per_domain", "must be at least 1");
        }
        if d.max_messages_per_connection == 0 {
            errs.push("delivery.max_messages_per_connection", "must be at least 1");
        }
        for (domain, entry) in &d.tls_policy {
            if domain.trim_start_matches('.').is_empty() || domain.contains(char::is_whitespace) {
                errs.push(
                    format!("delivery.tls_policy.{domain:?}"),
                    "not a domain (\"bank.example\", or \".bank.example\" for its subdomains)",
                );
            }
            if entry.overrides_published {
                tracing::warn!(domain = %domain, level = entry.level.as_str(), "delivery.tls_policy overrides what the domain publishes (MTA-STS): it may deliver with weaker TLS than the domain asks for");
            }
        }
        if d.dane.trust_anchor.is_some()
            && let Err(e) = d.dane.trust_anchors()
        {
            errs.push("delivery.dane.trust_anchor", e);
        }
        if d.mta_sts.fetch_timeout.0.is_zero() {
            errs.push("delivery.mta_sts.fetch_timeout", "must be longer than 0");
        }
        if let Some(path) = &d.mta_sts.ca_file
            && let Err(e) = smarthost::load_roots(path)
        {
            errs.push("delivery.mta_sts.ca_file", e);
        }

        if self.needs_tls() && !self.tls.self_signed {
            for (key, file) in [("tls.cert", &self.tls.cert), ("tls.key", &self.tls.key)] {
                if !file.exists() {
                    errs.push(
                        key,
                        format!(
                            "{} does not exist (set tls.self_signed = true to generate one)",
                            file.display()
                        ),
                    );
                }
            }
        }
    }
}

/// Renders serde_ignored's path as `a.b[0].c`.
fn ignored_path(p: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path as P;
    match p {
        P::Root => String::new(),
        P::Seq { parent, index } => format!("{}[{index}]", ignored_path(parent)),
        P::Map { parent, key } => {
            let head = ignored_path(parent);
            if head.is_empty() {
                key.clone()
            } else {
                format!("{head}.{key}")
            }
        }
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
            ignored_path(parent)
        }
    }
}

/// Deserializes one value, recording unknown keys and the first type error
/// of this value under `prefix`.
fn typed<T: DeserializeOwned>(
    value: toml::Value,
    prefix: &str,
    errs: &mut ConfigErrors,
) -> Option<T> {
    let mut unknown = Vec::new();
    let mut track = serde_path_to_error::Track::new();
    let de = serde_path_to_error::Deserializer::new(value, &mut track);
    let result: Result<T, _> = serde_ignored::deserialize(de, |p| unknown.push(ignored_path(&p)));
    for key in unknown {
        errs.push(join(prefix, &key), "unknown key");
    }
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            let path = track.path().to_string();
            let path = if path == "." {
                prefix.to_string()
            } else {
                join(prefix, &path)
            };
            // toml appends "in `key`" on a second line; the path says that.
            let msg = e.to_string();
            errs.push(path, msg.lines().next().unwrap_or_default());
            None
        }
    }
}

fn join(prefix: &str, rest: &str) -> String {
    if rest.is_empty() {
        prefix.to_string()
    } else if rest.starts_with('[') {
        format!("{prefix}{rest}")
    } else {
        format!("{prefix}.{rest}")
    }
}

fn section<T: DeserializeOwned>(
    table: &toml::Table,
    key: &str,
    errs: &mut ConfigErrors,
) -> Option<T> {
    let value = table.get(key)?.clone();
    if !value.is_table() {
        errs.push(
            key,
            "must be a table: write it as [".to_string() + key + "]",
        );
        return None;
    }
    typed(value, key, errs)
}

fn array<T: DeserializeOwned>(
    table: &toml::Table,
    key: &str,
    errs: &mut ConfigErrors,
) -> Vec<Option<T>> {
    let Some(value) = table.get(key) else {
        return Vec::new();
    };
    let Some(items) = value.as_array() else {
        errs.push(
            key,
            format!("must be an array of tables: write each as [[{key}]]"),
        );
        return Vec::new();
    };
    items
        .iter()
        .enumerate()
        .map(|(i, v)| typed(v.clone(), &format!("{key}[{i}]"), errs))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn config_needs_a_long_secret() {
        let mut cfg = BouncesConfig {
            return_path_domain: Some("bounces.relay.example".into()),
            ..Default::default()
        };
        let mut errs = ConfigErrors::default();
        validate_verp(&cfg, &mut errs);
        assert_eq!(errs.0[0].path, "bounces.verp_secret");
        cfg.verp_secret = Some(crate::config::Secret::new("short"));
        let mut errs = ConfigErrors::default();
        validate_verp(&cfg, &mut errs);
        assert!(errs.0[0].message.contains("too short"));
        assert!(!errs.0[0].message.contains("short\""));
        cfg.verp_secret = Some(crate::config::Secret::new("0123456789abcdef"));
        let mut errs = ConfigErrors::default();
        validate_verp(&cfg, &mut errs);
        assert!(errs.0.is_empty());
        assert!(crate::verp::Verp::from_config(&cfg).is_some());
    }

    use super::*;

    use test_support::TEST_HASH as HASH;

    fn paths(text: &str) -> Vec<String> {
        Config::from_toml_str(text)
            .unwrap_err()
            .0
            .into_iter()
            .map(|e| e.path)
            .collect()
    }

    #[test]
    fn tls_policy_levels_and_lookup() {
        let base = "[[listener]]\naddress = \"127.0.0.1:2587\"\n[delivery.tls_policy]\n";
        let c = Config::from_toml_str(&format!(
            "{base}\"bank.example\" = \"verify\"\n\".corp.example\" = \"encrypt\"\n\"Old.Example.\" = \"may!\"\n"
        ))
        .unwrap();
        let d = &c.delivery;
        let at = |name: &str| {
            d.tls_policy_for(name)
                .map(|e| (e.level, e.overrides_published))
        };
        assert_eq!(at("Bank.Example."), Some((TlsLevel::Verify, false)));
        assert_eq!(at("OLD.example"), Some((TlsLevel::May, true)));
        assert_eq!(at("mail.bank.example"), None, "no parent entry");
        assert_eq!(at("a.b.corp.example"), Some((TlsLevel::Encrypt, false)));
        assert_eq!(at("corp.example"), None, "a dot entry is for subdomains");
        assert_eq!(at("old.example"), Some((TlsLevel::May, true)));

        for (value, says) in [
            ("dane-sometimes", "unknown TLS level \"dane-sometimes\""),
            ("sometimes", "unknown TLS level \"sometimes\""),
        ] {
            let e = Config::from_toml_str(&format!("{base}\"bank.example\" = \"{value}\"\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("delivery.tls_policy"), "{e}");
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn minimal_config_loads_with_defaults() {
        let c = Config::from_toml_str(
            r#"
            [[listener]]
            address = "127.0.0.1:2587"
            "#,
        )
        .unwrap();
        assert_eq!(c.server.max_message_size, Size(25 << 20));
        assert_eq!(c.delivery.port, 25);
        assert_eq!(c.delivery.retry.len(), 7);
        assert_eq!(c.listeners[0].tls, TlsMode::Starttls);
    }

    #[test]
    fn all_problems_are_reported_with_key_paths() {
        let p = paths(
            r#"
            [server]
            hostnme = "typo"
            max_message_size = "25 parsecs"

            [[listener]]
            address = "127.0.0.1:2587"
            tls = "sometimes"

            [[listener]]
            address = "127.0.0.1:2588"
            tls = "none"
            auth = "required"

            [delivery]
            retry = ["5x"]

            [bogus]
            "#,
        );
        for want in [
            "server.hostnme",
            "server.max_message_size",
            "listener[0].tls",
            "listener[1].auth",
            "delivery.retry[0]",
            "bogus",
        ] {
            assert!(p.contains(&want.to_string()), "missing {want} in {p:?}");
        }
    }

    #[test]
    fn tenant_checks_do_not_echo_the_hash() {
        let text = r#"
            [[listener]]
            address = "127.0.0.1:2587"
            [[tenant]]
            name = "acme"
            username = "acme"
            password_hash = "hunter2-not-a-hash"
            allowed_senders = ["acme.example"]
            "#;
        let errs = Config::from_toml_str(text).unwrap_err();
        let shown = errs.to_string();
        assert!(shown.contains("tenant[0].password_hash"), "{shown}");
        assert!(shown.contains("tenant[0].allowed_senders[0]"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn valid_tenant_loads() {
        let text = format!(
            r#"
            [[listener]]
            address = "127.0.0.1:2587"
            [[tenant]]
            name = "acme"
            username = "acme"
            password_hash = "{HASH}"
            allowed_senders = ["*@acme.example"]
            "#
        );
        let c = Config::from_toml_str(&text).unwrap();
        assert_eq!(c.tenants[0].allowed_senders, vec!["*@acme.example"]);
        assert!(!format!("{:?}", c.tenants[0]).contains("argon2id"));
    }

    #[test]
    fn plaintext_auth_only_on_loopback() {
        let p = paths(
            r#"
            [[listener]]
            address = "0.0.0.0:2525"
            tls = "none"
            allow_plaintext_auth = true
            "#,
        );
        assert_eq!(p, vec!["listener[0].allow_plaintext_auth"]);
    }

    #[test]
    fn syntax_error_names_the_line() {
        let errs = Config::from_toml_str("[server]\nhostname = \n").unwrap_err();
        assert!(errs.to_string().contains("line 2"), "{errs}");
    }
}
