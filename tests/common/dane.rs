//! MX hosts for DANE tests: the names on each one's certificate (none: no
//! STARTTLS) and what its TLSA records say of that certificate. Started as
//! scripted SMTP servers on 127.0.0.2, .3, … sharing one port, their MX, A
//! and TLSA records added to the test's zone.

use std::net::SocketAddr;

use super::dns::Zone;
use super::mx::ip;
use super::pki::{Pki, sha256};
use super::submission::{Script, SubmissionServer, TlsMode};

/// What an MX host's TLSA records say of the certificate it presents.
#[derive(Clone, Copy, PartialEq)]
pub enum Tlsa {
    /// `3 1 1`: the SHA-256 of its public key (DANE-EE).
    EeKey,
    /// `3 1 1` of another key.
    EeOther,
    /// `2 0 1`: the SHA-256 of its issuer's certificate (DANE-TA), which the
    /// server sends in its chain.
    TaIssuer,
    /// `1 1 1` (PKIX-EE): unusable for SMTP.
    PkixOnly,
    /// No TLSA records.
    None,
}

/// One MX host.
pub struct Mx {
    pub names: &'static [&'static str],
    pub tlsa: Tlsa,
}

pub const fn mx(names: &'static [&'static str], tlsa: Tlsa) -> Mx {
    Mx { names, tlsa }
}

/// Starts `mxs` as mx1.`domain`, mx2.`domain`, … (in that order of
/// preference; open relays, offering REQUIRETLS when `requiretls`) with
/// certificates from `pki`, and adds their MX, A and `_<port>._tcp` TLSA
/// records to `zone`. Returns the zone, the servers and their port.
pub async fn start_mxs(
    pki: &Pki,
    domain: &str,
    mxs: &[Mx],
    mut zone: Zone,
    requiretls: bool,
) -> (Zone, Vec<SubmissionServer>, u16) {
    let mut servers = Vec::new();
    let mut issued = Vec::new();
    let mut port = 0;
    for (n, m) in mxs.iter().enumerate() {
        let host = format!("mx{}.{domain}", n + 1);
        let addr = ip(2 + n as u8);
        zone = zone.mx(domain, 10 * (n as u16 + 1), &host).a(&host, addr);
        let tls = if m.names.is_empty() {
            issued.push(None);
            TlsMode::None
        } else {
            let i = pki.issue_chain(m.names, false, m.tlsa == Tlsa::TaIssuer);
            let acceptor = i.acceptor.clone();
            issued.push(Some(i));
            TlsMode::Starttls(acceptor)
        };
        let server = SubmissionServer::start_at(
            SocketAddr::from((addr, port)),
            Script {
                tls,
                open_relay: true,
                requiretls,
                ..Script::default()
            },
        )
        .await;
        port = server.port();
        servers.push(server);
    }
    for (n, m) in mxs.iter().enumerate() {
        let name = format!("_{port}._tcp.mx{}.{domain}", n + 1);
        let i = issued[n].as_ref();
        let spki = i.map(|i| i.spki.clone()).unwrap_or_else(|| vec![1; 32]);
        zone = match m.tlsa {
            Tlsa::EeKey => zone.tlsa(&name, 3, 1, 1, &sha256(&spki)),
            Tlsa::EeOther => zone.tlsa(&name, 3, 1, 1, &sha256(b"another key")),
            Tlsa::TaIssuer => {
                let ca = i.map(|i| i.ca_cert.clone()).unwrap_or_default();
                zone.tlsa(&name, 2, 0, 1, &sha256(&ca))
            }
            Tlsa::PkixOnly => zone.tlsa(&name, 1, 1, 1, &sha256(&spki)),
            Tlsa::None => zone,
        };
    }
    (zone, servers, port)
}
