//! A DNS server on loopback for benchmarks: serves MX records that send each
//! given domain to one IP, like the tests' zones, and any further A, TXT and
//! TLSA records asked for, optionally DNSSEC-signed. Prints its address
//! (`127.0.0.1:PORT`) on stdout, then serves until killed.
//!
//! ```text
//! cargo run --release --example bench_dns -- dest.example=127.0.0.2 [...]
//!     [--a NAME=IPV4] [--txt NAME=TEXT] [--tlsa NAME=USAGE,SELECTOR,MATCHING,HEX]
//!     [--origin ORIGIN] [--signed ANCHOR_FILE]
//! ```
//!
//! `--signed` signs the zone (origin `.` unless `--origin`) with a new key
//! and writes that key as a trust anchor (`. 3600 IN DNSKEY 257 3 13 ...`)
//! to ANCHOR_FILE, the file `[delivery.dane] trust_anchor` reads.

#![allow(dead_code)]

#[path = "../tests/common/dns.rs"]
mod dns;

use std::io::Write;
use std::net::Ipv4Addr;

fn hex(text: &str) -> Vec<u8> {
    assert!(
        text.len().is_multiple_of(2),
        "hex digits come in pairs: {text}"
    );
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex digits"))
        .collect()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut origin = ".".to_string();
    let mut anchor_file = None;
    let mut records: Vec<(String, String)> = Vec::new();
    let mut mxs: Vec<(String, Ipv4Addr)> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |what: &str| args.next().unwrap_or_else(|| panic!("{arg} needs {what}"));
        match arg.as_str() {
            "--a" | "--txt" | "--tlsa" => {
                let v = value("NAME=VALUE");
                records.push((arg.clone(), v));
            }
            "--origin" => origin = value("a zone name"),
            "--signed" => anchor_file = Some(value("a file for the trust anchor")),
            _ => {
                let (domain, ip) = arg
                    .split_once('=')
                    .expect("arguments are DOMAIN=IPV4, e.g. dest.example=127.0.0.2");
                let ip: Ipv4Addr = ip.parse().expect("an IPv4 address after '='");
                mxs.push((domain.to_string(), ip));
            }
        }
    }
    let mut zone = dns::Zone::new(&origin);
    for (domain, ip) in &mxs {
        let mx = format!("mx.{domain}");
        zone = zone.mx(domain, 10, &mx).a(&mx, *ip);
    }
    for (kind, spec) in &records {
        let (name, v) = spec
            .split_once('=')
            .unwrap_or_else(|| panic!("{kind} takes NAME=VALUE, not {spec}"));
        zone = match kind.as_str() {
            "--a" => zone.a(name, v.parse().expect("an IPv4 address after '='")),
            "--txt" => zone.txt(name, v),
            _ => {
                let f: Vec<&str> = v.split(',').collect();
                assert_eq!(f.len(), 4, "--tlsa NAME=USAGE,SELECTOR,MATCHING,HEX");
                let n = |s: &str| s.parse::<u8>().expect("a TLSA field number");
                zone.tlsa(name, n(f[0]), n(f[1]), n(f[2]), &hex(f[3]))
            }
        };
    }
    let server = match &anchor_file {
        Some(path) => {
            let key = dns::ZoneKey::generate();
            std::fs::write(path, key.trust_anchor(&origin)).expect("writing the trust anchor");
            dns::TestDns::start_signed(zone, &key).await
        }
        None => dns::TestDns::start(zone).await,
    };
    println!("{}", server.addr);
    std::io::stdout().flush().expect("stdout");
    std::future::pending::<()>().await;
}
