//! A DNS server on loopback for benchmarks: serves MX records that send each
//! given domain to one IP, like the tests' zones. Prints its address
//! (`127.0.0.1:PORT`) on stdout, then serves until killed.
//!
//! `cargo run --release --example bench_dns -- dest.example=127.0.0.2 [...]`

#![allow(dead_code)]

#[path = "../tests/common/dns.rs"]
mod dns;

use std::io::Write;
use std::net::Ipv4Addr;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut zone = dns::Zone::new(".");
    for arg in std::env::args().skip(1) {
        let (domain, ip) = arg
            .split_once('=')
            .expect("arguments are DOMAIN=IPV4, e.g. dest.example=127.0.0.2");
        let ip: Ipv4Addr = ip.parse().expect("an IPv4 address after '='");
        let mx = format!("mx.{domain}");
        zone = zone.mx(domain, 10, &mx).a(&mx, ip);
    }
    let server = dns::TestDns::start(zone).await;
    println!("{}", server.addr);
    std::io::stdout().flush().expect("stdout");
    std::future::pending::<()>().await;
}
