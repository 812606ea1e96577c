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
}

impl Dns {
    pub fn new(cfg: &DnsConfig) -> Result<Dns, String> {
        let servers = cfg.nameserver_addrs()?;
        let mut opts = ResolverOpts::default();
        opts.timeout = cfg.timeout.as_duration();
        opts.attempts = cfg.attempts;
        // Mail routing names are always fully qualified.
        opts.ndots = 0;
        // IPv4 first: a host whose IPv6 path silently drops packets would
        // otherwise cost a connect timeout per MX.
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
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
        let resolver = builder
            .with_options(opts)
            .with_tls_config(no_roots)
            .build()
            .map_err(|e| format!("cannot build the DNS resolver: {e}"))?;
        Ok(Dns {
            resolver: Arc::new(resolver),
        })
    }

    /// Where mail for `domain` goes.
    pub async fn mx(&self, domain: &str) -> Result<MxLookup, DnsError> {
        let fqdn = fqdn(domain);
        match self.resolver.mx_lookup(fqdn.as_str()).await {
            Ok(lookup) => {
                let mut hosts: Vec<MxHost> = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::MX(mx) => Some(MxHost {
                            name: mx.exchange.to_ascii().trim_end_matches('.').to_string(),
                            preference: mx.preference,
                        }),
                        _ => None,
                    })
                    .collect();
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
                None => Err(temp_error(domain, &e)),
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
        match self.resolver.lookup_ip(fqdn(host).as_str()).await {
            Ok(l) => Ok(l.iter().collect()),
            Err(e) if negative(&e).is_some() => Ok(Vec::new()),
            Err(e) => Err(temp_error(host, &e)),
        }
    }

    /// The TXT records at `name`, each with its character-strings joined
    /// (RFC 6376 §3.6.2.2, RFC 7208 §3.3); empty when there are none.
    pub async fn txt(&self, name: &str) -> Result<Vec<String>, DnsError> {
        match self.resolver.txt_lookup(fqdn(name).as_str()).await {
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
            Err(e) => Err(temp_error(name, &e)),
        }
    }
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

fn temp_error(name: &str, e: &NetError) -> DnsError {
    DnsError {
        name: name.to_string(),
        reason: e.to_string(),
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
