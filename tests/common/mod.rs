#![allow(dead_code)]
//! Shared support for herald's integration tests. Use with `mod common;` in a test file.
//!
//! * [`dane`]: MX hosts with certificates and the TLSA records that name them (or not).
//! * [`dns`]: an in-process authoritative DNS server ([`dns::TestDns`], [`dns::Zone`]), a
//!   DNS server that never answers ([`dns::SilentDns`]) and a resolver pointed at either.
//! * [`mx`]: scriptable recipient MX sinks on 127.0.0.x ([`mx::MxSink`], [`mx::reserve_port`]).
//! * [`smtp`]: a wire-level async SMTP client with TLS ([`smtp::TestClient`]).
//! * [`http`]: a bare HTTP/1.1 client for the admin API ([`http::api`]).
//! * [`https`]: a scripted HTTPS server for MTA-STS policy files ([`https::PolicyServer`]) and
//!   one that records uploads such as TLS reports ([`https::RecordingServer`]).
//! * [`redis`]: the test Redis for cluster tests ([`redis::available`], key prefixes, clean-up).
//! * [`submission`]: a scripted submission server (STARTTLS / implicit TLS, AUTH) and a test
//!   CA, standing in for a customer's SMTP provider used as a smarthost.
//! * [`tmpfs`]: a small tmpfs mounted for a test, a real disk that fills up.
//!
//! Rules: loopback addresses only, no sleeps as synchronisation, every wait bounded.

pub mod dane;
pub mod dkim;
pub mod dns;
pub mod http;
pub mod https;
pub mod mx;
pub mod pki;
pub mod redis;
pub mod relay;
pub mod reports;
pub mod smtp;
pub mod submission;
pub mod tmpfs;

use std::future::Future;
use std::time::Duration;

/// Runs `fut` with a deadline; panics naming `what` if it does not finish in time.
pub async fn within<T>(timeout: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(timeout, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}
