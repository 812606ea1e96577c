//! DNS blocklists (src/policy/dnsbl.rs) against a real DNS server on
//! loopback: listings with their TXT reason (IPv4, IPv6, domains), the
//! documented error codes, failing open on SERVFAIL and timeouts, the cache,
//! and `herald dnsbl check` run as the built binary.
//!
//! Each test uses its own zone name: the per-zone counters are shared by the
//! whole process (they feed /metrics).

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::dns::{ScriptedDns, SilentDns, TestDns, Zone};
use common::within;
use herald::config::{DnsConfig, Span};
use herald::dns::Dns;
use herald::policy::dnsbl::{Dnsbl, ErrorCause, Outcome, ZoneAction, ZoneConfig, ZoneKind};

const LIMIT: Duration = Duration::from_secs(10);

fn dns(addr: SocketAddr) -> Dns {
    Dns::new(&DnsConfig {
        nameservers: vec![addr.to_string()],
        timeout: Span(Duration::from_secs(5)),
        attempts: 1,
    })
    .expect("resolver")
}

fn zone(name: &str, kind: ZoneKind, action: ZoneAction) -> ZoneConfig {
    ZoneConfig {
        zone: name.into(),
        kind,
        action,
        weight: 2.5,
        timeout: Span(Duration::from_secs(2)),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn counters(bl: &Dnsbl, zone: &str) -> herald::metrics::DnsblZone {
    bl.counters()
        .into_iter()
        .find(|c| c.zone == zone)
        .unwrap_or_else(|| panic!("no counters for {zone}"))
}

fn errors(c: &herald::metrics::DnsblZone, cause: ErrorCause) -> u64 {
    c.errors
        .iter()
        .find(|(n, _)| *n == cause.name())
        .map(|(_, v)| *v)
        .unwrap()
}

#[tokio::test]
async fn ipv4_listing_carries_the_txt_reason() {
    let server = TestDns::start(
        Zone::new("test.")
            .a("2.0.0.127.bl-v4.test", Ipv4Addr::new(127, 0, 0, 2))
            .txt(
                "2.0.0.127.bl-v4.test",
                "Listed in bl-v4: see https://bl.test/q?127.0.0.2",
            )
            .a("3.0.0.127.bl-v4.test", Ipv4Addr::new(127, 0, 0, 4)),
    )
    .await;
    let bl = Dnsbl::new(
        &[zone("bl-v4.test", ZoneKind::Ip, ZoneAction::Reject)],
        dns(server.addr),
    );
    let listings = within(LIMIT, "check", bl.check(Some(ip("127.0.0.2")), &[])).await;
    assert_eq!(listings.len(), 1, "{listings:?}");
    let l = &listings[0];
    assert_eq!(l.zone, "bl-v4.test");
    assert_eq!(l.listed, "127.0.0.2");
    assert_eq!(l.action, ZoneAction::Reject);
    assert_eq!(l.weight, 2.5);
    assert_eq!(
        l.reason.as_deref(),
        Some("Listed in bl-v4: see https://bl.test/q?127.0.0.2")
    );

    // Listed without a TXT record: a listing without a reason.
    let listings = within(LIMIT, "check", bl.check(Some(ip("127.0.0.3")), &[])).await;
    assert_eq!(listings.len(), 1);
    assert_eq!(listings[0].reason, None);

    // Not in the zone: NXDOMAIN, no listing.
    let report = within(LIMIT, "report", bl.report(&[ip("127.0.0.9")], &[])).await;
    assert_eq!(report.len(), 1);
    assert_eq!(report[0].outcome, Outcome::NotListed);
    assert_eq!(counters(&bl, "bl-v4.test").listings, 2);
}

#[tokio::test]
async fn ipv6_is_asked_in_nibble_form() {
    // 2001:db8::1, reversed nibbles (RFC 5782 §2.4).
    let name = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl-v6.test";
    let server = TestDns::start(
        Zone::new("test.")
            .a(name, Ipv4Addr::new(127, 0, 0, 3))
            .txt(name, "IPv6 listed"),
    )
    .await;
    let bl = Dnsbl::new(
        &[zone("bl-v6.test", ZoneKind::Ip, ZoneAction::Score)],
        dns(server.addr),
    );
    let listings = within(LIMIT, "check", bl.check(Some(ip("2001:db8::1")), &[])).await;
    assert_eq!(listings.len(), 1, "{listings:?}");
    assert_eq!(listings[0].listed, "2001:db8::1");
    assert_eq!(listings[0].action, ZoneAction::Score);
    assert_eq!(listings[0].reason.as_deref(), Some("IPv6 listed"));
    let none = within(LIMIT, "check", bl.check(Some(ip("2001:db8::2")), &[])).await;
    assert!(none.is_empty(), "{none:?}");
}

#[tokio::test]
async fn documented_error_codes_and_foreign_answers_are_not_listings() {
    let server = TestDns::start(
        Zone::new("test.")
            .a("2.0.0.127.bl-err.test", Ipv4Addr::new(127, 255, 255, 254))
            .txt("2.0.0.127.bl-err.test", "query refused")
            .a("3.0.0.127.bl-err.test", Ipv4Addr::new(127, 0, 0, 1))
            .a("4.0.0.127.bl-err.test", Ipv4Addr::new(192, 0, 2, 80)),
    )
    .await;
    let bl = Dnsbl::new(
        &[zone("bl-err.test", ZoneKind::Ip, ZoneAction::Reject)],
        dns(server.addr),
    );
    for client in ["127.0.0.2", "127.0.0.3", "127.0.0.4"] {
        let listings = within(LIMIT, "check", bl.check(Some(ip(client)), &[])).await;
        assert!(listings.is_empty(), "{client}: {listings:?}");
    }
    let report = within(LIMIT, "report", bl.report(&[ip("127.0.0.2")], &[])).await;
    match &report[0].outcome {
        Outcome::Error { cause, detail } => {
            assert_eq!(*cause, ErrorCause::ErrorCode);
            assert!(detail.contains("127.255.255.254"), "{detail}");
        }
        other => panic!("expected an error code, got {other:?}"),
    }
    let c = counters(&bl, "bl-err.test");
    assert_eq!(errors(&c, ErrorCause::ErrorCode), 2, "{c:?}");
    assert_eq!(errors(&c, ErrorCause::NotBlocklistAnswer), 1, "{c:?}");
    assert_eq!(c.listings, 0);
    // The same counters on /metrics.
    let text = herald::admin::Metrics::default().render(&herald::metrics::Gauges {
        dnsbl: bl.counters(),
        ..Default::default()
    });
    for line in [
        "herald_dnsbl_lookups_total{zone=\"bl-err.test\"} 3\n",
        "herald_dnsbl_listings_total{zone=\"bl-err.test\"} 0\n",
        "herald_dnsbl_errors_total{zone=\"bl-err.test\",cause=\"error_code\"} 2\n",
        "herald_dnsbl_errors_total{zone=\"bl-err.test\",cause=\"not_blocklist_answer\"} 1\n",
    ] {
        assert!(text.contains(line), "{line} missing in:\n{text}");
    }
}

#[tokio::test]
async fn servfail_fails_open_and_is_counted() {
    let server = ScriptedDns::start(
        Zone::new("test.").a("2.0.0.127.bl-ok.test", Ipv4Addr::new(127, 0, 0, 2)),
        &["2.0.0.127.bl-sf.test"],
    )
    .await;
    let bl = Dnsbl::new(
        &[
            zone("bl-sf.test", ZoneKind::Ip, ZoneAction::Reject),
            zone("bl-ok.test", ZoneKind::Ip, ZoneAction::Reject),
        ],
        dns(server.addr),
    );
    let started = Instant::now();
    let listings = within(LIMIT, "check", bl.check(Some(ip("127.0.0.2")), &[])).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    // The failing zone lists nothing; the other one still answers.
    assert_eq!(listings.len(), 1, "{listings:?}");
    assert_eq!(listings[0].zone, "bl-ok.test");
    let c = counters(&bl, "bl-sf.test");
    assert_eq!(errors(&c, ErrorCause::Dns), 1, "{c:?}");
    // Not cached: the next message asks again.
    let before = server.queries();
    within(LIMIT, "check", bl.check(Some(ip("127.0.0.2")), &[])).await;
    assert!(server.queries() > before);
}

#[tokio::test]
async fn a_zone_that_does_not_answer_fails_open_within_its_timeout() {
    let silent = SilentDns::start().await;
    let mut z = zone("bl-slow.test", ZoneKind::Ip, ZoneAction::Reject);
    z.timeout = Span(Duration::from_millis(300));
    let bl = Dnsbl::new(&[z], dns(silent.addr));
    let started = Instant::now();
    let report = within(LIMIT, "report", bl.report(&[ip("127.0.0.2")], &[])).await;
    let took = started.elapsed();
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    assert!(
        matches!(
            report[0].outcome,
            Outcome::Error {
                cause: ErrorCause::Timeout,
                ..
            }
        ),
        "{report:?}"
    );
    let c = counters(&bl, "bl-slow.test");
    assert_eq!(errors(&c, ErrorCause::Timeout), 1);
}

#[tokio::test]
async fn domain_zones_get_domains_and_ip_zones_get_ips() {
    let server = ScriptedDns::start(
        Zone::new("test.")
            .a("evil.example.dbl-d.test", Ipv4Addr::new(127, 0, 1, 2))
            .txt("evil.example.dbl-d.test", "evil.example is a spam domain")
            // Would match if the IP were wrongly asked in the domain zone,
            // or a domain in the IP zone.
            .a("2.0.0.127.dbl-d.test", Ipv4Addr::new(127, 0, 1, 2))
            .a("evil.example.ipbl-d.test", Ipv4Addr::new(127, 0, 0, 2)),
        &[],
    )
    .await;
    let bl = Dnsbl::new(
        &[
            zone("dbl-d.test", ZoneKind::Domain, ZoneAction::Score),
            zone("ipbl-d.test", ZoneKind::Ip, ZoneAction::Reject),
        ],
        dns(server.addr),
    );
    let domains = vec!["Evil.Example".to_string(), "good.example".to_string()];
    let listings = within(LIMIT, "check", bl.check(Some(ip("127.0.0.2")), &domains)).await;
    assert_eq!(listings.len(), 1, "{listings:?}");
    assert_eq!(listings[0].zone, "dbl-d.test");
    assert_eq!(listings[0].listed, "evil.example");
    assert_eq!(
        listings[0].reason.as_deref(),
        Some("evil.example is a spam domain")
    );
    // Two domains in the domain zone and one IP in the IP zone.
    assert_eq!(counters(&bl, "dbl-d.test").lookups, 2);
    assert_eq!(counters(&bl, "ipbl-d.test").lookups, 1);
}

#[tokio::test]
async fn answers_are_cached_for_their_ttl() {
    let server = ScriptedDns::start(
        Zone::new("test.")
            .a("2.0.0.127.bl-cache.test", Ipv4Addr::new(127, 0, 0, 2))
            .txt("2.0.0.127.bl-cache.test", "cached reason"),
        &[],
    )
    .await;
    let bl = Dnsbl::new(
        &[zone("bl-cache.test", ZoneKind::Ip, ZoneAction::Reject)],
        dns(server.addr),
    );
    let first = within(LIMIT, "check", bl.check(Some(ip("127.0.0.2")), &[])).await;
    let none = within(LIMIT, "check", bl.check(Some(ip("127.0.0.9")), &[])).await;
    assert_eq!(first.len(), 1);
    assert!(none.is_empty());
    let queries = server.queries();
    let lookups = counters(&bl, "bl-cache.test").lookups;
    assert!(
        queries >= 3,
        "A + TXT + A expected, the server saw {queries}"
    );

    // A burst from the same client: no new query, same answers.
    for _ in 0..5 {
        let again = within(LIMIT, "check", bl.check(Some(ip("127.0.0.2")), &[])).await;
        assert_eq!(again, first);
        let none = within(LIMIT, "check", bl.check(Some(ip("127.0.0.9")), &[])).await;
        assert!(none.is_empty());
    }
    assert_eq!(server.queries(), queries);
    assert_eq!(counters(&bl, "bl-cache.test").lookups, lookups);

    // Still answered with the server gone.
    drop(server);
    let cached = within(LIMIT, "check", bl.check(Some(ip("127.0.0.2")), &[])).await;
    assert_eq!(cached, first);
}

fn write_config(dir: &std::path::Path, dns: SocketAddr, extra: &str) -> std::path::PathBuf {
    let path = dir.join("herald.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[server]
hostname = "relay.test"
spool_dir = "{d}/spool"

[[listener]]
address = "127.0.0.1:0"
tls = "none"
auth = "none"
trusted_networks = ["127.0.0.0/8"]

[dns]
nameservers = ["{dns}"]
timeout = "1s"
attempts = 1

{extra}

[[policy.dnsbl]]
zone = "bl-cli.test"
timeout = "2s"

[[policy.dnsbl]]
zone = "dbl-cli.test"
kind = "domain"
"#,
            d = dir.display()
        ),
    )
    .unwrap();
    path
}

async fn herald(args: &[&str]) -> (Option<i32>, String, String) {
    let out = within(
        LIMIT,
        "herald dnsbl check",
        tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(args)
            .output(),
    )
    .await
    .expect("run herald");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn dnsbl_check_cli_reports_listings_and_exits_1() {
    let server = TestDns::start(
        Zone::new("test.")
            .a("2.0.0.127.bl-cli.test", Ipv4Addr::new(127, 0, 0, 2))
            .txt(
                "2.0.0.127.bl-cli.test",
                "Listed for sending spam, see https://bl.test/",
            ),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), server.addr, "");
    let config = config.to_str().unwrap();

    let (code, out, err) = herald(&[
        "--config",
        config,
        "dnsbl",
        "check",
        "127.0.0.2",
        "127.0.0.3",
    ])
    .await;
    assert_eq!(code, Some(1), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains("127.0.0.2 bl-cli.test: LISTED (127.0.0.2): Listed for sending spam, see https://bl.test/"),
        "{out}"
    );
    assert!(out.contains("127.0.0.3 bl-cli.test: not listed"), "{out}");
    // Only IP zones are asked about IPs.
    assert!(!out.contains("dbl-cli.test"), "{out}");

    let (code, out, err) = herald(&["--config", config, "dnsbl", "check", "127.0.0.3"]).await;
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");

    let (code, out, _) =
        herald(&["--config", config, "dnsbl", "check", "--json", "127.0.0.2"]).await;
    assert_eq!(code, Some(1));
    let json: serde_json::Value = serde_json::from_str(&out).expect("JSON output");
    assert_eq!(json[0]["item"], "127.0.0.2");
    assert_eq!(json[0]["zone"], "bl-cli.test");
    assert_eq!(json[0]["status"], "listed");
    assert_eq!(json[0]["codes"][0], "127.0.0.2");
    assert_eq!(
        json[0]["reason"],
        "Listed for sending spam, see https://bl.test/"
    );
}

#[tokio::test]
async fn dnsbl_check_cli_uses_the_sending_ips_or_says_there_are_none() {
    let server =
        TestDns::start(Zone::new("test.").a("2.0.0.127.bl-cli.test", Ipv4Addr::new(127, 0, 0, 2)))
            .await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), server.addr, "");
    let (code, out, err) = herald(&["--config", config.to_str().unwrap(), "dnsbl", "check"]).await;
    assert_eq!(code, Some(2), "stdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains("no IP address to check"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        server.addr,
        "[delivery]\nsource_ips = [\"127.0.0.5\"]\npublic_ips = [\"127.0.0.2\"]",
    );
    let (code, out, err) = herald(&["--config", config.to_str().unwrap(), "dnsbl", "check"]).await;
    assert_eq!(code, Some(1), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("127.0.0.2 bl-cli.test: LISTED"), "{out}");
    assert!(!out.contains("127.0.0.5"), "public_ips come first: {out}");
}

fn invoice() -> Vec<u8> {
    b"From: Acme Billing <billing@acme.test>\r\n\
      To: <customer@one.test>\r\n\
      Subject: Invoice 42\r\n\
      Date: Sun, 29 Nov 2026 10:00:00 +0000\r\n\
      Message-ID: <invoice-42@acme.test>\r\n\
      MIME-Version: 1.0\r\n\
      Content-Type: text/plain; charset=utf-8\r\n\
      \r\n\
      Dear customer, please find invoice 42 attached.\r\n"
        .to_vec()
}

/// The recipient domain resolves (RCPT checks it); nothing is delivered.
fn relay_zone() -> Zone {
    Zone::new("test.")
        .mx("one.test", 10, "mx.one.test")
        .a("mx.one.test", Ipv4Addr::new(127, 0, 0, 2))
}

#[tokio::test]
async fn a_listed_client_is_refused_with_554_and_the_reason() {
    // The test client connects from 127.0.0.1.
    let dns = TestDns::start(
        relay_zone()
            .a("1.0.0.127.bl-e2e.test", Ipv4Addr::new(127, 0, 0, 2))
            .txt(
                "1.0.0.127.bl-e2e.test",
                "Client listed, see https://bl.test/127.0.0.1",
            ),
    )
    .await;
    let mut setup = common::relay::Setup::new(dns.addr, 9);
    setup.extra = "[[policy.dnsbl]]\nzone = \"bl-e2e.test\"\naction = \"reject\"\n".into();
    let relay = common::relay::TestRelay::start(setup).await;
    let reply = within(
        LIMIT,
        "submission",
        relay.submit("billing@acme.test", &["customer@one.test"], &invoice()),
    )
    .await;
    reply.assert_code(554);
    let text = reply.text();
    assert!(text.contains("5.7.1"), "{text}");
    assert!(
        text.contains("Client listed, see https://bl.test/127.0.0.1"),
        "{text}"
    );
    assert!(text.contains("bl-e2e.test"), "{text}");
    let events = relay
        .wait_events("rejected by the blocklist", 1, LIMIT, |e| {
            e["event"] == "rejected"
        })
        .await;
    assert_eq!(events[0]["rule"], "dnsbl", "{events:?}");
}

#[tokio::test]
async fn a_failing_blocklist_does_not_refuse_mail() {
    let dns = ScriptedDns::start(relay_zone(), &["1.0.0.127.bl-e2e-sf.test"]).await;
    let mut setup = common::relay::Setup::new(dns.addr, 9);
    setup.extra = "[[policy.dnsbl]]\nzone = \"bl-e2e-sf.test\"\naction = \"reject\"\n".into();
    let relay = common::relay::TestRelay::start(setup).await;
    let reply = within(
        LIMIT,
        "submission",
        relay.submit("billing@acme.test", &["customer@one.test"], &invoice()),
    )
    .await;
    reply.assert_code(250);
    // The zone was asked and failed: the relay's /metrics says so.
    let page = common::http::request(relay.admin, "GET", "/metrics", None, None)
        .await
        .text();
    let failed: u64 = page
        .lines()
        .find_map(|l| {
            l.strip_prefix("herald_dnsbl_errors_total{zone=\"bl-e2e-sf.test\",cause=\"dns\"} ")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no DNS errors of the zone in:\n{page}"));
    assert!(failed >= 1, "{page}");
}
