//! In-process authoritative DNS server for tests (hickory-server 0.26.3).
//!
//! ```ignore
//! let dns = TestDns::start(
//!     Zone::new("test.")
//!         .mx("example.test", 10, "mx1.example.test")
//!         .a("mx1.example.test", Ipv4Addr::new(127, 0, 0, 2))
//!         .null_mx("nomail.test"),
//! )
//! .await;
//! let resolver = test_resolver(dns.addr, Duration::from_secs(2));
//! ```
//!
//! Serve the *parent* zone (`test.`), not only `example.test.`: a name outside the served
//! origin is answered REFUSED (a temporary error for most clients, e.g. the DMARC walk up
//! to `_dmarc.test.`), while a name under the origin that does not exist is NXDOMAIN.
//! A zone with origin `"."` answers NXDOMAIN for every name it does not hold.
//!
//! # NXDOMAIN versus NOERROR/no data in hickory-resolver 0.26.3
//!
//! Both come back from `resolver.mx_lookup(..)` as `Err(NetError::Dns(DnsError::NoRecordsFound(
//! NoRecords { response_code, .. })))`. Tell them apart by `response_code`:
//!
//! * `ResponseCode::NXDomain`: the name does not exist at all. `NetError::is_nx_domain()` is a
//!   shortcut for exactly this match.
//! * `ResponseCode::NoError`: the name exists (it has other types, or names below it) but has
//!   no record of the asked type. `err.is_no_records_found() && !err.is_nx_domain()`.
//!
//! Everything else (`NetError::Timeout`, `NetError::Dns(DnsError::ResponseCode(ServFail |
//! Refused | ..))`, I/O errors) is a temporary failure. See [`classify`].

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ProtocolConfig, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_server::Server;
use hickory_server::proto::rr::rdata::{A, AAAA, MX, SOA, TXT};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordSet, RrKey};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};

/// TTL of every record (and the SOA minimum / negative TTL).
const TTL: u32 = 60;

/// Turns `"example.test"` or `"example.test."` into the absolute name `example.test.`;
/// `""` and `"."` are the root.
pub fn fqdn(name: &str) -> Name {
    let trimmed = name.trim_end_matches('.');
    if trimmed.is_empty() {
        return Name::root();
    }
    let mut n = Name::from_ascii(trimmed).unwrap_or_else(|e| panic!("bad DNS name {name:?}: {e}"));
    n.set_fqdn(true);
    n
}

/// Builder for the zone a [`TestDns`] serves. Names are always absolute (a missing trailing
/// dot is added); they must lie under the origin.
#[derive(Clone, Debug)]
pub struct Zone {
    origin: Name,
    records: Vec<Record>,
}

impl Zone {
    /// A zone with a SOA at `origin` (e.g. `"test."`).
    pub fn new(origin: &str) -> Self {
        let origin = fqdn(origin);
        let soa = SOA::new(
            fqdn(&format!("ns.{origin}")),
            fqdn(&format!("hostmaster.{origin}")),
            1,
            3600,
            600,
            86400,
            TTL,
        );
        let records = vec![Record::from_rdata(origin.clone(), TTL, RData::SOA(soa))];
        Zone { origin, records }
    }

    /// Any record (escape hatch for types without a helper).
    pub fn record(mut self, name: &str, rdata: RData) -> Self {
        let name = fqdn(name);
        assert!(
            self.origin.zone_of(&name),
            "{name} is not under the zone origin {}",
            self.origin
        );
        self.records.push(Record::from_rdata(name, TTL, rdata));
        self
    }

    pub fn mx(self, name: &str, preference: u16, exchange: &str) -> Self {
        self.record(name, RData::MX(MX::new(preference, fqdn(exchange))))
    }

    /// RFC 7505 null MX: `MX 0 .`
    pub fn null_mx(self, name: &str) -> Self {
        self.record(name, RData::MX(MX::new(0, Name::root())))
    }

    pub fn a(self, name: &str, ip: Ipv4Addr) -> Self {
        self.record(name, RData::A(A(ip)))
    }

    pub fn aaaa(self, name: &str, ip: Ipv6Addr) -> Self {
        self.record(name, RData::AAAA(AAAA(ip)))
    }

    /// One TXT record. Text longer than 255 bytes (DKIM keys) is split into several
    /// character-strings, which DNS clients concatenate again.
    pub fn txt(self, name: &str, text: &str) -> Self {
        let mut parts = Vec::new();
        let mut rest = text;
        while rest.len() > 255 {
            let mut cut = 255;
            while !rest.is_char_boundary(cut) {
                cut -= 1;
            }
            parts.push(rest[..cut].to_string());
            rest = &rest[cut..];
        }
        parts.push(rest.to_string());
        self.record(name, RData::TXT(TXT::new(parts)))
    }

    /// A TLSA record (RFC 6698), e.g. `tlsa("_25._tcp.mx1.example.test", 3, 1, 1, &sha256_of_spki)`.
    pub fn tlsa(self, name: &str, usage: u8, selector: u8, matching: u8, data: &[u8]) -> Self {
        use hickory_server::proto::rr::rdata::TLSA;
        use hickory_server::proto::rr::rdata::tlsa::{CertUsage, Matching, Selector};
        self.record(
            name,
            RData::TLSA(TLSA::new(
                CertUsage::from(usage),
                Selector::from(selector),
                Matching::from(matching),
                data.to_vec(),
            )),
        )
    }

    fn into_handler(self, key: Option<&ZoneKey>) -> InMemoryZoneHandler<TokioRuntimeProvider> {
        let mut map: BTreeMap<RrKey, RecordSet> = BTreeMap::new();
        for record in self.records {
            let key = RrKey::new(LowerName::from(&record.name), record.record_type());
            map.entry(key)
                .or_insert_with(|| {
                    RecordSet::with_ttl(record.name.clone(), record.record_type(), TTL)
                })
                .insert(record, 0);
        }
        let mut handler = InMemoryZoneHandler::new(
            self.origin.clone(),
            map,
            ZoneType::Primary,
            AxfrPolicy::Deny,
            key.map(|_| hickory_server::dnssec::NxProofKind::Nsec),
        )
        .expect("building the in-memory zone");
        if let Some(key) = key {
            handler
                .add_zone_signing_key_mut(key.signer(&self.origin))
                .expect("adding the zone key");
            handler.secure_zone_mut().expect("signing the zone");
        }
        handler
    }
}

/// A DNSSEC key (ECDSA P-256) that signs a test zone, and the trust anchor that makes a
/// validating resolver believe it.
pub struct ZoneKey {
    pkcs8: rustls::pki_types::PrivatePkcs8KeyDer<'static>,
}

impl ZoneKey {
    pub fn generate() -> ZoneKey {
        use hickory_server::proto::dnssec::{Algorithm, crypto::EcdsaSigningKey};
        ZoneKey {
            pkcs8: EcdsaSigningKey::generate_pkcs8(Algorithm::ECDSAP256SHA256)
                .expect("generating a zone key"),
        }
    }

    fn signing_key(&self) -> hickory_server::proto::dnssec::crypto::EcdsaSigningKey {
        use hickory_server::proto::dnssec::{Algorithm, crypto::EcdsaSigningKey};
        EcdsaSigningKey::from_pkcs8(&self.pkcs8, Algorithm::ECDSAP256SHA256)
            .expect("reading the zone key")
    }

    fn dnskey(&self) -> hickory_server::proto::dnssec::rdata::DNSKEY {
        use hickory_server::proto::dnssec::SigningKey as _;
        let public = self.signing_key().to_public_key().expect("public zone key");
        hickory_server::proto::dnssec::rdata::DNSKEY::from_key(&public)
    }

    fn signer(&self, origin: &Name) -> hickory_server::proto::dnssec::DnssecSigner {
        hickory_server::proto::dnssec::DnssecSigner::new(
            self.dnskey(),
            Box::new(self.signing_key()),
            origin.clone(),
            Duration::from_secs(7 * 86400),
        )
    }

    /// The zone's DNSKEY as a trust-anchor file line (`test. 3600 IN DNSKEY 257 3 13 ...`),
    /// the format `[delivery.dane] trust_anchor` reads.
    pub fn trust_anchor(&self, origin: &str) -> String {
        format!("{} 3600 IN DNSKEY {}\n", fqdn(origin), self.dnskey())
    }
}

/// An authoritative DNS server on 127.0.0.1 (UDP and TCP on the same port), running on the
/// caller's tokio runtime. Stops when dropped.
pub struct TestDns {
    pub addr: SocketAddr,
    origin: Name,
    _server: Server<Catalog>,
}

impl TestDns {
    pub async fn start(zone: Zone) -> TestDns {
        Self::serve(zone, None).await
    }

    /// Serves `zone` signed with `key` (NSEC denial of existence): answers carry RRSIGs
    /// when the query asks for DNSSEC records.
    pub async fn start_signed(zone: Zone, key: &ZoneKey) -> TestDns {
        Self::serve(zone, Some(key)).await
    }

    async fn serve(zone: Zone, key: Option<&ZoneKey>) -> TestDns {
        let origin = zone.origin.clone();
        let handler = zone.into_handler(key);
        let mut catalog = Catalog::new();
        catalog.upsert(LowerName::from(&origin), vec![Arc::new(handler)]);
        let (udp, tcp) = bind_udp_and_tcp().await;
        let addr = udp.local_addr().expect("udp local addr");
        let mut server = Server::new(catalog);
        server.register_socket(udp);
        // 32: how many responses may queue per TCP connection.
        server.register_listener(tcp, Duration::from_secs(10), 32);
        TestDns {
            addr,
            origin,
            _server: server,
        }
    }

    pub fn origin(&self) -> &Name {
        &self.origin
    }

    /// A resolver that asks only this server (see [`test_resolver`]).
    pub fn resolver(&self) -> TokioResolver {
        test_resolver(self.addr, Duration::from_secs(2))
    }
}

/// Sockets on 127.0.0.1 (UDP and TCP on the same port) that never answer: queries to them
/// time out. Closed when dropped.
pub struct SilentDns {
    pub addr: SocketAddr,
    _udp: tokio::net::UdpSocket,
    _tcp: tokio::net::TcpListener,
}

impl SilentDns {
    pub async fn start() -> SilentDns {
        // Nobody reads the UDP socket, nobody accepts on the listener: TCP connects still
        // succeed (kernel backlog) but no reply ever comes.
        let (udp, tcp) = bind_udp_and_tcp().await;
        let addr = udp.local_addr().expect("udp local addr");
        SilentDns {
            addr,
            _udp: udp,
            _tcp: tcp,
        }
    }
}

async fn bind_udp_and_tcp() -> (tokio::net::UdpSocket, tokio::net::TcpListener) {
    let mut last_err = None;
    for _ in 0..50 {
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind UDP 127.0.0.1:0");
        let port = udp.local_addr().expect("udp local addr").port();
        match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            Ok(tcp) => return (udp, tcp),
            Err(e) => last_err = Some(e),
        }
    }
    panic!("no port free for both UDP and TCP on 127.0.0.1: {last_err:?}");
}

/// hickory-resolver configuration that asks only the nameserver at `addr` (UDP and TCP on
/// `addr.port()`), with no system configuration, no hosts file and no search domains.
///
/// This is how to point a `TokioResolver` at 127.0.0.1:PORT in 0.26: `NameServerConfig` is
/// `#[non_exhaustive]`, so build it with `NameServerConfig::new(ip, trust_negative, conns)`
/// and set `port` on each `ConnectionConfig` (its `port` field is public).
pub fn resolver_config(addr: SocketAddr) -> ResolverConfig {
    let mut udp = ConnectionConfig::new(ProtocolConfig::Udp);
    udp.port = addr.port();
    let mut tcp = ConnectionConfig::new(ProtocolConfig::Tcp);
    tcp.port = addr.port();
    ResolverConfig::from_name_servers(vec![NameServerConfig::new(addr.ip(), true, vec![udp, tcp])])
}

/// A `TokioResolver` that asks only the nameserver at `addr`, with per-query `timeout`,
/// a single attempt, no hosts file and no cache (so tests see every query).
pub fn test_resolver(addr: SocketAddr, timeout: Duration) -> TokioResolver {
    let mut builder =
        TokioResolver::builder_with_config(resolver_config(addr), TokioRuntimeProvider::default());
    let opts: &mut ResolverOpts = builder.options_mut();
    opts.timeout = timeout;
    opts.attempts = 1;
    opts.cache_size = 0;
    opts.use_hosts_file = hickory_resolver::config::ResolveHosts::Never;
    opts.ndots = 0;
    builder.build().expect("building the test resolver")
}

/// How a lookup failure should be treated by a mail relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LookupOutcome {
    /// NXDOMAIN: the name does not exist (permanent).
    NxDomain,
    /// NOERROR with an empty answer: the name exists, but has no record of that type.
    NoData,
    /// Timeout, SERVFAIL, REFUSED, network trouble: try again later.
    Temporary,
}

/// Classifies a hickory-resolver 0.26 lookup error (see the module documentation).
pub fn classify(err: &NetError) -> LookupOutcome {
    match err {
        NetError::Dns(DnsError::NoRecordsFound(no))
            if no.response_code == ResponseCode::NXDomain =>
        {
            LookupOutcome::NxDomain
        }
        NetError::Dns(DnsError::NoRecordsFound(no))
            if no.response_code == ResponseCode::NoError =>
        {
            LookupOutcome::NoData
        }
        _ => LookupOutcome::Temporary,
    }
}

/// A [`TestDns`] that also answers SERVFAIL for chosen names and counts the queries it gets
/// (to show that a cache spared one). Stops when dropped.
pub struct ScriptedDns {
    pub addr: SocketAddr,
    queries: Arc<std::sync::atomic::AtomicUsize>,
    _server: Server<Scripted>,
}

impl ScriptedDns {
    /// Serves `zone`, except that queries for a name in `servfail` get SERVFAIL.
    pub async fn start(zone: Zone, servfail: &[&str]) -> ScriptedDns {
        let origin = zone.origin.clone();
        let handler = zone.into_handler(None);
        let mut catalog = Catalog::new();
        catalog.upsert(LowerName::from(&origin), vec![Arc::new(handler)]);
        let queries = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let scripted = Scripted {
            catalog,
            servfail: servfail.iter().map(|n| LowerName::from(fqdn(n))).collect(),
            queries: queries.clone(),
        };
        let (udp, tcp) = bind_udp_and_tcp().await;
        let addr = udp.local_addr().expect("udp local addr");
        let mut server = Server::new(scripted);
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(10), 32);
        ScriptedDns {
            addr,
            queries,
            _server: server,
        }
    }

    /// Queries received so far.
    pub fn queries(&self) -> usize {
        self.queries.load(std::sync::atomic::Ordering::SeqCst)
    }
}

struct Scripted {
    catalog: Catalog,
    servfail: Vec<LowerName>,
    queries: Arc<std::sync::atomic::AtomicUsize>,
}

// hickory-server declares the trait with `#[async_trait]`; this is that macro's expansion
// written out, so the tests need no async-trait dependency of their own.
impl hickory_server::server::RequestHandler for Scripted {
    fn handle_request<'life0, 'life1, 'async_trait, R, T>(
        &'life0 self,
        request: &'life1 hickory_server::server::Request,
        mut response_handle: R,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = hickory_server::server::ResponseInfo>
                + Send
                + 'async_trait,
        >,
    >
    where
        R: hickory_server::server::ResponseHandler + 'async_trait,
        T: hickory_server::net::runtime::Time + 'async_trait,
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            self.queries
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let fail = request
                .queries
                .queries()
                .iter()
                .any(|q| self.servfail.contains(q.name()));
            if !fail {
                return self
                    .catalog
                    .handle_request::<R, T>(request, response_handle)
                    .await;
            }
            let response =
                hickory_server::zone_handler::MessageResponseBuilder::new(&request.queries, None)
                    .error_msg(&request.metadata, ResponseCode::ServFail);
            match response_handle.send_response(response).await {
                Ok(info) => info,
                Err(e) => panic!("sending SERVFAIL: {e}"),
            }
        })
    }
}
