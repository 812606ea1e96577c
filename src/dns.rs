//! The one resolver herald uses for mail routing: MX lookup with preference
//! order (RFC 5321 §5.1), implicit MX when a domain has none, null MX
//! (RFC 7505), and host addresses. Tests point it at a DNS server on
//! loopback through `[dns] nameservers`.
//!
//! A temporary failure (timeout, SERVFAIL) is always [`DnsError`], never a
//! verdict about the domain: callers turn it into 4xx, not 5xx.

use std::net::IpAddr;
use std::sync::Arc;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError as WireError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::RData;
use rand::seq::SliceRandom;

use crate::config::DnsConfig;

/// One mail exchanger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MxHost {
    /// Host name without the trailing dot.
    pub name: String,
    pub preference: u16,
}

/// What a domain says about where its mail goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MxLookup {
    /// Hosts to try in order: by preference, shuffled within one preference.
    /// A domain without MX but with an address is its own implicit MX.
    Hosts(Vec<MxHost>),
    /// `MX 0 .`: the domain accepts no mail (RFC 7505).
    NullMx,
    /// The domain does not exist, or has neither MX nor address records.
    NoMailServer,
}

#[derive(Clone, Debug, thiserror::Error)]
#[error("DNS lookup of {name} failed temporarily: {reason}")]
pub struct DnsError {
    pub name: String,
    pub reason: String,
}

#[derive(Clone)]
pub struct Dns {
    resolver: Arc<TokioResolver>,
    /// Lookup latency and failures (`herald_dns_*`); none in tools.
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// An answer from the validating resolver ([`Dns::validating`]), with what
/// DNSSEC proved of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Validated<T> {
    /// Signed, and the signatures chain to a trust anchor.
    Secure(T),
    /// From a zone that is provably unsigned (or not signed all the way).
    Insecure(T),
    /// Signatures that should be there and are not, or do not verify: an
    /// attacker, or a broken zone. Never a reason to go on without DNSSEC.
    Bogus,
}

/// One TLSA record (RFC 6698 §2.1), as published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tlsa {
    /// 0 PKIX-TA, 1 PKIX-EE, 2 DANE-TA, 3 DANE-EE.
    pub usage: u8,
    /// 0 the full certificate, 1 its SubjectPublicKeyInfo.
    pub selector: u8,
    /// 0 exact, 1 SHA-256, 2 SHA-512.
    pub matching: u8,
    pub data: Vec<u8>,
}

impl Dns {
    pub fn new(cfg: &DnsConfig) -> Result<Dns, String> {
        Self::build(cfg, None)
    }

    /// A resolver that validates DNSSEC itself (RFC 4035) from `anchors`
    /// (the DNS root's keys unless the caller has its own), for DANE. Kept
    /// apart from the routing resolver so that SPF, DKIM and MX lookups
    /// are unchanged by a signature problem somewhere.
    pub fn validating(
        cfg: &DnsConfig,
        anchors: hickory_resolver::proto::dnssec::TrustAnchors,
    ) -> Result<Dns, String> {
        Self::build(cfg, Some(anchors))
    }

    fn build(
        cfg: &DnsConfig,
        anchors: Option<hickory_resolver::proto::dnssec::TrustAnchors>,
    ) -> Result<Dns, String> {
        let servers = cfg.nameserver_addrs()?;
        let mut opts = ResolverOpts::default();
        opts.timeout = cfg.timeout.as_duration();
        opts.attempts = cfg.attempts;
        // Mail routing names are always fully qualified.
        opts.ndots = 0;
        // IPv4 first: a host whose IPv6 path silently drops packets would
        // otherwise cost a connect timeout per MX.
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.validate = anchors.is_some();
        let builder = if servers.is_empty() {
            TokioResolver::builder_tokio()
                .map_err(|e| format!("cannot read the system resolver configuration: {e}"))?
        } else {
            let ns = servers
                .iter()
                .map(|addr| {
                    let mut n = NameServerConfig::udp_and_tcp(addr.ip());
                    for c in &mut n.connections {
                        c.port = addr.port();
                    }
                    n
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(ns),
                TokioRuntimeProvider::default(),
            )
        };
        // The resolver never uses DNS over TLS, but with the TLS feature on
        // (mail-auth enables it) it would otherwise load the platform's CA
        // certificates at build time and fail on a machine without them.
        let no_roots = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot build the DNS resolver: {e}"))?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let builder = match anchors {
            Some(a) => builder.with_trust_anchor(Arc::new(a)),
            None => builder,
        };
        let resolver = builder
            .with_options(opts)
            .with_tls_config(no_roots)
            .build()
            .map_err(|e| format!("cannot build the DNS resolver: {e}"))?;
        Ok(Dns {
            resolver: Arc::new(resolver),
            metrics: None,
        })
    }

    /// The metrics registry lookups are counted into, if any.
    pub fn metrics(&self) -> Option<&Arc<crate::metrics::Metrics>> {
        self.metrics.as_ref()
    }

    /// Counts lookups and failures into `metrics`; set before the first clone.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Dns {
        self.metrics = Some(metrics);
        self
    }

    async fn timed<T>(
        &self,
        lookup: impl std::future::Future<Output = Result<T, NetError>>,
    ) -> Result<T, NetError> {
        let mut timing = Timing {
            metrics: self.metrics.as_deref(),
            started: std::time::Instant::now(),
            done: false,
        };
        let result = lookup.await;
        timing.done = true;
        result
    }

    /// A temporary failure: counted, and never a verdict about the name.
    fn temp_error(&self, name: &str, e: &NetError) -> DnsError {
        if let Some(m) = &self.metrics {
            m.dns_failures.inc(cause(e));
        }
        DnsError {
            name: name.to_string(),
            reason: e.to_string(),
        }
    }

    /// The resolver itself, shared with mail-auth (its `MessageAuthenticator`
    /// wraps a `TokioResolver`) so SPF and DMARC lookups ask the same servers.
    pub fn resolver(&self) -> &TokioResolver {
        &self.resolver
    }

    /// The MX records published at `domain`, as they are: no implicit MX,
    /// a null MX kept as a host with an empty name, sorted by preference
    /// only; empty when there are none (NXDOMAIN or no data). For
    /// diagnostics and SPF's `mx` mechanism (RFC 7208 §5.4), not routing.
    pub async fn mx_records(&self, domain: &str) -> Result<Vec<MxHost>, DnsError> {
        match self
            .timed(self.resolver.mx_lookup(fqdn(domain).as_str()))
            .await
        {
            Ok(lookup) => {
                let mut hosts = mx_hosts(lookup.answers());
                hosts.sort_by_key(|h| h.preference);
                Ok(hosts)
            }
            Err(e) if negative(&e).is_some() => Ok(Vec::new()),
            Err(e) => Err(self.temp_error(domain, &e)),
        }
    }

    /// The A (`ipv6` false) or AAAA (`ipv6` true) records of `host` alone;
    /// empty when there are none. SPF asks for one family at a time, and an
    /// empty answer is a "void lookup" (RFC 7208 §4.6.4).
    pub async fn addresses(&self, host: &str, ipv6: bool) -> Result<Vec<IpAddr>, DnsError> {
        use hickory_resolver::proto::rr::RecordType;
        let rtype = if ipv6 {
            RecordType::AAAA
        } else {
            RecordType::A
        };
        match self
            .timed(self.resolver.lookup(fqdn(host).as_str(), rtype))
            .await
        {
            Ok(l) => Ok(l
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::A(a) if !ipv6 => Some(IpAddr::V4(a.0)),
                    RData::AAAA(a) if ipv6 => Some(IpAddr::V6(a.0)),
                    _ => None,
                })
                .collect()),
            Err(e) if negative(&e).is_some() => Ok(Vec::new()),
            Err(e) => Err(self.temp_error(host, &e)),
        }
    }

    /// Where mail for `domain` goes.
    pub async fn mx(&self, domain: &str) -> Result<MxLookup, DnsError> {
        let fqdn = fqdn(domain);
        match self.timed(self.resolver.mx_lookup(fqdn.as_str())).await {
            Ok(lookup) => {
                let mut hosts = mx_hosts(lookup.answers());
                if hosts.is_empty() {
                    return self.implicit_mx(domain).await;
                }
                // RFC 7505 §3: a single MX with an empty exchange ("."), and
                // any MX set containing one is treated the same way.
                if hosts.iter().any(|h| h.name.is_empty()) {
                    return Ok(MxLookup::NullMx);
                }
                order_hosts(&mut hosts);
                Ok(MxLookup::Hosts(hosts))
            }
            Err(e) => match negative(&e) {
                Some(Negative::NxDomain) => Ok(MxLookup::NoMailServer),
                Some(Negative::NoData) => self.implicit_mx(domain).await,
                None => Err(self.temp_error(domain, &e)),
            },
        }
    }

    /// RFC 5321 §5.1: no MX records, so the domain itself is the host if it
    /// has an address.
    async fn implicit_mx(&self, domain: &str) -> Result<MxLookup, DnsError> {
        let ips = self.ips(domain).await?;
        if ips.is_empty() {
            Ok(MxLookup::NoMailServer)
        } else {
            Ok(MxLookup::Hosts(vec![MxHost {
                name: domain.trim_end_matches('.').to_ascii_lowercase(),
                preference: 0,
            }]))
        }
    }

    /// IPv4 and IPv6 addresses of a host; empty when it has none.
    pub async fn ips(&self, host: &str) -> Result<Vec<IpAddr>, DnsError> {
        if let Ok(ip) = host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<IpAddr>()
        {
            return Ok(vec![ip]);
        }
        match self
            .timed(self.resolver.lookup_ip(fqdn(host).as_str()))
            .await
        {
            Ok(l) => Ok(l.iter().collect()),
            Err(e) if negative(&e).is_some() => Ok(Vec::new()),
            Err(e) => Err(self.temp_error(host, &e)),
        }
    }

    /// The TXT records at `name`, each with its character-strings joined
    /// (RFC 6376 §3.6.2.2, RFC 7208 §3.3); empty when there are none.
    pub async fn txt(&self, name: &str) -> Result<Vec<String>, DnsError> {
        match self
            .timed(self.resolver.txt_lookup(fqdn(name).as_str()))
            .await
        {
            Ok(l) => Ok(l
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::TXT(t) => Some(
                        t.txt_data
                            .iter()
                            .map(|s| String::from_utf8_lossy(s))
                            .collect::<String>(),
                    ),
                    _ => None,
                })
                .collect()),
            Err(e) if negative(&e).is_some() => Ok(Vec::new()),
            Err(e) => Err(self.temp_error(name, &e)),
        }
    }

    /// The MX hosts of `domain` (ordered as [`Dns::mx`] orders them) and
    /// whether DNSSEC proves them; from a [`Dns::validating`] resolver. A
    /// domain without MX records, or with a null MX, is `Insecure` with no
    /// hosts: DANE has nothing to say about it and [`Dns::mx`] decides.
    pub async fn mx_validated(&self, domain: &str) -> Result<Validated<Vec<MxHost>>, DnsError> {
        match self
            .timed(self.resolver.mx_lookup(fqdn(domain).as_str()))
            .await
        {
            Ok(lookup) => {
                let answers = lookup.answers();
                let mut hosts = mx_hosts(answers);
                if hosts.is_empty() || hosts.iter().any(|h| h.name.is_empty()) {
                    return Ok(Validated::Insecure(Vec::new()));
                }
                order_hosts(&mut hosts);
                let proofs = answers
                    .iter()
                    .filter(|r| matches!(r.data, RData::MX(_)))
                    .map(|r| r.proof);
                Ok(judged(proofs, hosts))
            }
            Err(NetError::Dns(WireError::DnssecBogus)) => Ok(Validated::Bogus),
            Err(e) if negative(&e).is_some() => Ok(Validated::Insecure(Vec::new())),
            Err(e) => Err(self.temp_error(domain, &e)),
        }
    }

    /// The TLSA records at `name` (`_25._tcp.mx.example.`) and whether
    /// DNSSEC proves them; none when the name has none.
    pub async fn tlsa(&self, name: &str) -> Result<Validated<Vec<Tlsa>>, DnsError> {
        match self
            .timed(self.resolver.tlsa_lookup(fqdn(name).as_str()))
            .await
        {
            Ok(lookup) => {
                let records: Vec<_> = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::TLSA(t) => Some((
                            r.proof,
                            Tlsa {
                                usage: t.cert_usage.into(),
                                selector: t.selector.into(),
                                matching: t.matching.into(),
                                data: t.cert_data.clone(),
                            },
                        )),
                        _ => None,
                    })
                    .collect();
                let proofs: Vec<_> = records.iter().map(|(p, _)| *p).collect();
                let records = records.into_iter().map(|(_, t)| t).collect();
                Ok(judged(proofs.into_iter(), records))
            }
            Err(NetError::Dns(WireError::DnssecBogus)) => Ok(Validated::Bogus),
            Err(e) if negative(&e).is_some() => Ok(Validated::Insecure(Vec::new())),
            Err(e) => Err(self.temp_error(name, &e)),
        }
    }

    /// The IPv4 addresses at `name` and how long the answer may be cached:
    /// what is left of the answer's TTL, or for NXDOMAIN / no data (an empty
    /// list) the negative TTL from the SOA (RFC 2308), zero when the answer
    /// carried none. For DNSBL lookups (RFC 5782), cached by their caller.
    pub async fn a_with_ttl(
        &self,
        name: &str,
    ) -> Result<(Vec<std::net::Ipv4Addr>, std::time::Duration), DnsError> {
        use hickory_resolver::proto::rr::RecordType;
        match self
            .timed(self.resolver.lookup(fqdn(name).as_str(), RecordType::A))
            .await
        {
            Ok(l) => {
                let ips = l
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::A(a) => Some(a.0),
                        _ => None,
                    })
                    .collect();
                let ttl = l
                    .valid_until()
                    .saturating_duration_since(std::time::Instant::now());
                Ok((ips, ttl))
            }
            Err(e) => match &e {
                NetError::Dns(WireError::NoRecordsFound(no)) if negative(&e).is_some() => {
                    let secs = no.negative_ttl.unwrap_or(0);
                    Ok((Vec::new(), std::time::Duration::from_secs(secs.into())))
                }
                _ => Err(self.temp_error(name, &e)),
            },
        }
    }
}

/// What DNSSEC proved of an RRset, from its records' proofs: one bogus
/// record spoils it, all must be secure for it to be.
fn judged<T>(
    proofs: impl Iterator<Item = hickory_resolver::proto::dnssec::Proof> + Clone,
    value: T,
) -> Validated<T> {
    use hickory_resolver::proto::dnssec::Proof;
    if proofs.clone().any(|p| p == Proof::Bogus) {
        Validated::Bogus
    } else if proofs.into_iter().all(|p| p == Proof::Secure) {
        Validated::Secure(value)
    } else {
        Validated::Insecure(value)
    }
}

/// The MX records among `answers`, in answer order.
fn mx_hosts(answers: &[hickory_resolver::proto::rr::Record]) -> Vec<MxHost> {
    answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::MX(mx) => Some(MxHost {
                name: mx.exchange.to_ascii().trim_end_matches('.').to_string(),
                preference: mx.preference,
            }),
            _ => None,
        })
        .collect()
}

fn fqdn(name: &str) -> String {
    if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    }
}

/// A definite negative answer, as opposed to a failure to get one.
enum Negative {
    /// NXDOMAIN: the name does not exist.
    NxDomain,
    /// NOERROR without records of the type asked for.
    NoData,
}

/// Only NXDOMAIN and NOERROR/no-data are facts about a domain; REFUSED,
/// SERVFAIL and timeouts say nothing about it and must stay temporary.
fn negative(e: &NetError) -> Option<Negative> {
    match e {
        NetError::Dns(WireError::NoRecordsFound(no)) => match no.response_code {
            ResponseCode::NXDomain => Some(Negative::NxDomain),
            ResponseCode::NoError => Some(Negative::NoData),
            _ => None,
        },
        _ => None,
    }
}

/// Records a lookup's time when it ends — also when its caller gives up
/// on it (a blocklist or alignment deadline drops the future), which is
/// then counted as a failure, `abandoned`.
struct Timing<'a> {
    metrics: Option<&'a crate::metrics::Metrics>,
    started: std::time::Instant,
    done: bool,
}

impl Drop for Timing<'_> {
    fn drop(&mut self) {
        if let Some(m) = self.metrics {
            m.dns_latency.observe(self.started.elapsed());
            if !self.done {
                m.dns_failures.inc("abandoned");
            }
        }
    }
}

/// Why a lookup failed, as a metric label.
fn cause(e: &NetError) -> &'static str {
    match e {
        NetError::Timeout => "timeout",
        NetError::Dns(WireError::NoRecordsFound(no)) => match no.response_code {
            ResponseCode::ServFail => "servfail",
            ResponseCode::Refused => "refused",
            _ => "other",
        },
        _ => "other",
    }
}

/// Sorts by preference and shuffles hosts of equal preference, so load
/// spreads over them as RFC 5321 §5.1 asks.
fn order_hosts(hosts: &mut [MxHost]) {
    hosts.shuffle(&mut rand::rng());
    hosts.sort_by_key(|h| h.preference);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_labelled_by_cause() {
        assert_eq!(cause(&NetError::Timeout), "timeout");
        assert_eq!(cause(&NetError::from("broken pipe")), "other");
    }

    #[test]
    fn hosts_sorted_by_preference() {
        let mut h = vec![
            MxHost {
                name: "b".into(),
                preference: 20,
            },
            MxHost {
                name: "a".into(),
                preference: 10,
            },
            MxHost {
                name: "c".into(),
                preference: 10,
            },
        ];
        order_hosts(&mut h);
        assert_eq!(h[2].name, "b");
        assert!(h[..2].iter().all(|x| x.preference == 10));
    }
}
