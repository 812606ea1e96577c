//! MTA-STS policy lookups (RFC 8461) over real protocols on loopback: the
//! `_mta-sts` TXT record and the policy host's address from an in-process
//! DNS server, the policy from an HTTPS server with a certificate from a
//! test CA.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::dns::{ScriptedDns, TestDns, Zone};
use common::https::{Answer, PolicyServer, closed_port};
use common::pki::Pki;
use common::within;
use herald::config::{DnsConfig, MtaStsConfig, Span};
use herald::deliver::mta_sts::{Lookup, Mode, MtaSts, Policy};
use herald::dns::Dns;

const LIMIT: Duration = Duration::from_secs(20);
const DOMAIN: &str = "example.test";
const HOST: &str = "mta-sts.example.test";
const POLICY: &str =
    "version: STSv1\nmode: enforce\nmx: mx1.example.test\nmx: *.mx.example.test\nmax_age: 86400\n";

fn zone(id: &str, ip: Ipv4Addr) -> Zone {
    Zone::new("test.")
        .txt(&format!("_mta-sts.{DOMAIN}"), &format!("v=STSv1; id={id};"))
        .a(HOST, ip)
}

fn resolver(addr: SocketAddr) -> Dns {
    Dns::new(&DnsConfig {
        nameservers: vec![addr.to_string()],
        timeout: Span(Duration::from_secs(2)),
        attempts: 1,
    })
    .expect("resolver")
}

/// A lookup service trusting the test CA, fetching from `port`.
fn sts(dns_addr: SocketAddr, pki: &Pki, cache: &Path, port: u16) -> MtaSts {
    let config = MtaStsConfig {
        ca_file: Some(pki.ca_file.clone()),
        fetch_timeout: Span(Duration::from_secs(5)),
        ..MtaStsConfig::default()
    };
    MtaSts::new(&config, resolver(dns_addr), cache.to_path_buf())
        .expect("MtaSts::new")
        .with_https_port(port)
}

fn cache_file(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("mta-sts-cache.json")
}

#[track_caller]
fn policy(lookup: Lookup) -> Arc<Policy> {
    match lookup {
        Lookup::Policy(p) => p,
        other => panic!("expected a policy, got {other:?}"),
    }
}

#[track_caller]
fn failure(lookup: Lookup) -> (&'static str, String) {
    match lookup {
        Lookup::Failed {
            result_type,
            detail,
        } => (result_type, detail),
        other => panic!("expected a failure, got {other:?}"),
    }
}

async fn lookup(sts: &MtaSts) -> Lookup {
    within(LIMIT, "the MTA-STS lookup", sts.lookup(DOMAIN)).await
}

async fn server(pki: &Pki, ip: Ipv4Addr, answer: Answer) -> PolicyServer {
    PolicyServer::start(ip, pki.acceptor(&[HOST]), answer).await
}

#[tokio::test]
async fn a_valid_policy_is_fetched_and_parsed() {
    let ip = Ipv4Addr::new(127, 0, 0, 61);
    let pki = Pki::new();
    let web = server(&pki, ip, Answer::policy(POLICY)).await;
    let dns = TestDns::start(zone("20260101T000000", ip)).await;
    let dir = tempfile::tempdir().unwrap();
    let sts = sts(dns.addr, &pki, &cache_file(&dir), web.addr.port());

    let p = policy(lookup(&sts).await);
    assert_eq!(p.id, "20260101T000000");
    assert_eq!(p.mode, Mode::Enforce);
    assert_eq!(p.max_age, 86400);
    assert!(p.allows_mx("mx1.example.test"));
    assert!(p.allows_mx("a.mx.example.test"));
    assert!(!p.allows_mx("mx2.example.test"));
    assert_eq!(web.requests(), 1);
    assert_eq!(sts.cached(), 1);
    let saved = std::fs::read_to_string(cache_file(&dir)).unwrap();
    assert!(saved.contains("20260101T000000"), "{saved}");
    // A trailing dot and capitals name the same domain.
    policy(within(LIMIT, "lookup", sts.lookup("Example.TEST.")).await);
    assert_eq!(web.requests(), 1);
}

#[tokio::test]
async fn a_cached_policy_is_used_without_a_fetch() {
    let ip = Ipv4Addr::new(127, 0, 0, 62);
    let pki = Pki::new();
    let web = server(&pki, ip, Answer::policy(POLICY)).await;
    let dns = TestDns::start(zone("1", ip)).await;
    let dir = tempfile::tempdir().unwrap();
    let sts = sts(dns.addr, &pki, &cache_file(&dir), web.addr.port());
    for _ in 0..5 {
        assert_eq!(policy(lookup(&sts).await).id, "1");
    }
    assert_eq!(web.requests(), 1);
}

#[tokio::test]
async fn concurrent_lookups_share_one_fetch() {
    let ip = Ipv4Addr::new(127, 0, 0, 63);
    let pki = Pki::new();
    let web = server(&pki, ip, Answer::policy(POLICY)).await;
    let dns = TestDns::start(zone("1", ip)).await;
    let dir = tempfile::tempdir().unwrap();
    let sts = sts(dns.addr, &pki, &cache_file(&dir), web.addr.port());
    let lookups: Vec<_> = (0..8)
        .map(|_| {
            let sts = sts.clone();
            tokio::spawn(async move { sts.lookup(DOMAIN).await })
        })
        .collect();
    for l in lookups {
        let result = within(LIMIT, "concurrent lookups", l).await.unwrap();
        assert_eq!(policy(result).id, "1");
    }
    assert_eq!(web.requests(), 1);
}

#[tokio::test]
async fn a_changed_id_is_fetched_again() {
    let ip = Ipv4Addr::new(127, 0, 0, 64);
    let pki = Pki::new();
    let web = server(&pki, ip, Answer::policy(POLICY)).await;
    let dir = tempfile::tempdir().unwrap();
    let old_dns = TestDns::start(zone("1", ip)).await;
    let first = sts(old_dns.addr, &pki, &cache_file(&dir), web.addr.port());
    assert_eq!(policy(lookup(&first).await).id, "1");

    // The domain publishes a new policy under a new id.
    web.set(Answer::policy(
        "version: STSv1\nmode: testing\nmx: mx9.example.test\nmax_age: 3600\n",
    ));
    let new_dns = TestDns::start(zone("2", ip)).await;
    let second = sts(new_dns.addr, &pki, &cache_file(&dir), web.addr.port());
    let p = policy(lookup(&second).await);
    assert_eq!((p.id.as_str(), p.mode), ("2", Mode::Testing));
    assert!(p.allows_mx("mx9.example.test"));
    assert!(!p.allows_mx("mx1.example.test"));
    assert_eq!(web.requests(), 2);
    // The new policy replaced the old one in the cache file too.
    let third = sts(new_dns.addr, &pki, &cache_file(&dir), web.addr.port());
    assert_eq!(policy(lookup(&third).await).id, "2");
    assert_eq!(web.requests(), 2);
}

#[tokio::test]
async fn the_cache_survives_a_restart() {
    let ip = Ipv4Addr::new(127, 0, 0, 65);
    let pki = Pki::new();
    let mut web = server(&pki, ip, Answer::policy(POLICY)).await;
    let dns = TestDns::start(zone("1", ip)).await;
    let dir = tempfile::tempdir().unwrap();
    let port = web.addr.port();
    let before = sts(dns.addr, &pki, &cache_file(&dir), port);
    assert_eq!(policy(lookup(&before).await).id, "1");
    drop(before);
    web.stop().await;

    let after = sts(dns.addr, &pki, &cache_file(&dir), port);
    assert_eq!(after.cached(), 1);
    let p = policy(lookup(&after).await);
    assert_eq!(p.id, "1");
    assert!(p.allows_mx("mx1.example.test"));
}

#[tokio::test]
async fn a_server_down_leaves_the_cached_policy_in_force() {
    let ip = Ipv4Addr::new(127, 0, 0, 66);
    let pki = Pki::new();
    let mut web = server(&pki, ip, Answer::policy(POLICY)).await;
    let port = web.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let old_dns = TestDns::start(zone("1", ip)).await;
    assert_eq!(
        policy(lookup(&sts(old_dns.addr, &pki, &cache_file(&dir), port)).await).id,
        "1"
    );

    // A new id is published, but the policy host cannot be reached (as an
    // attacker blocking it would arrange): the cached policy still holds.
    web.stop().await;
    let new_dns = TestDns::start(zone("2", ip)).await;
    let sts = sts(new_dns.addr, &pki, &cache_file(&dir), port);
    let p = policy(lookup(&sts).await);
    assert_eq!((p.id.as_str(), p.mode), ("1", Mode::Enforce));
    // And again, without a second wait on the dead host.
    assert_eq!(policy(lookup(&sts).await).id, "1");
}

#[tokio::test]
async fn a_dns_failure_leaves_the_cached_policy_in_force() {
    let ip = Ipv4Addr::new(127, 0, 0, 67);
    let pki = Pki::new();
    let web = server(&pki, ip, Answer::policy(POLICY)).await;
    let dir = tempfile::tempdir().unwrap();
    let dns = TestDns::start(zone("1", ip)).await;
    let port = web.addr.port();
    assert_eq!(
        policy(lookup(&sts(dns.addr, &pki, &cache_file(&dir), port)).await).id,
        "1"
    );

    let failing = ScriptedDns::start(zone("2", ip), &["_mta-sts.example.test"]).await;
    let sts = sts(failing.addr, &pki, &cache_file(&dir), port);
    assert_eq!(policy(lookup(&sts).await).id, "1");
    assert_eq!(web.requests(), 1);
}

/// A nameserver failing for `_mta-sts` with nothing cached: no policy,
/// and not asked again at once (every new connection would otherwise wait
/// for the DNS timeout).
#[tokio::test]
async fn a_dns_failure_without_a_cache_is_not_asked_again_at_once() {
    let ip = Ipv4Addr::new(127, 0, 0, 90);
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let failing = ScriptedDns::start(zone("1", ip), &["_mta-sts.example.test"]).await;
    let sts = sts(failing.addr, &pki, &cache_file(&dir), 443);
    assert!(matches!(lookup(&sts).await, Lookup::NoPolicy));
    let asked = failing.queries();
    assert!(asked >= 1);
    assert!(matches!(lookup(&sts).await, Lookup::NoPolicy));
    assert_eq!(failing.queries(), asked, "asked again at once");
}

#[tokio::test]
async fn a_server_down_without_a_cache_is_a_fetch_error() {
    let ip = Ipv4Addr::new(127, 0, 0, 68);
    let pki = Pki::new();
    let dns = TestDns::start(zone("1", ip)).await;
    let dir = tempfile::tempdir().unwrap();
    let sts = sts(dns.addr, &pki, &cache_file(&dir), closed_port(ip).await);
    let (kind, detail) = failure(lookup(&sts).await);
    assert_eq!(kind, "sts-policy-fetch-error");
    assert!(
        detail.contains("cannot connect to mta-sts.example.test"),
        "{detail}"
    );
    assert_eq!(sts.cached(), 0);
}

#[tokio::test]
async fn a_silent_server_is_a_fetch_error_within_the_timeout() {
    let ip = Ipv4Addr::new(127, 0, 0, 69);
    let pki = Pki::new();
    // Connections complete in the kernel's backlog; nothing ever answers.
    let silent = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let dns = TestDns::start(zone("1", ip)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = MtaStsConfig {
        ca_file: Some(pki.ca_file.clone()),
        fetch_timeout: Span(Duration::from_millis(500)),
        ..MtaStsConfig::default()
    };
    let sts = MtaSts::new(&config, resolver(dns.addr), cache_file(&dir))
        .unwrap()
        .with_https_port(silent.local_addr().unwrap().port());
    let (kind, detail) = failure(lookup(&sts).await);
    assert_eq!(kind, "sts-policy-fetch-error");
    assert!(detail.contains("within"), "{detail}");
}

#[tokio::test]
async fn a_certificate_for_another_name_is_webpki_invalid() {
    let ip = Ipv4Addr::new(127, 0, 0, 70);
    let pki = Pki::new();
    let web = PolicyServer::start(
        ip,
        pki.acceptor(&["www.example.test"]),
        Answer::policy(POLICY),
    )
    .await;
    let dns = TestDns::start(zone("1", ip)).await;
    let dir = tempfile::tempdir().unwrap();
    let sts = sts(dns.addr, &pki, &cache_file(&dir), web.addr.port());
    let (kind, detail) = failure(lookup(&sts).await);
    assert_eq!(kind, "sts-webpki-invalid");
    assert!(detail.contains("mta-sts.example.test"), "{detail}");
    assert_eq!(web.requests(), 0);
}

#[tokio::test]
async fn a_certificate_from_an_untrusted_ca_is_webpki_invalid() {
    let ip = Ipv4Addr::new(127, 0, 0, 71);
    let (pki, other) = (Pki::new(), Pki::new());
    let web = server(&other, ip, Answer::policy(POLICY)).await;
    let dns = TestDns::start(zone("1", ip)).await;
    let dir = tempfile::tempdir().unwrap();
    let sts = sts(dns.addr, &pki, &cache_file(&dir), web.addr.port());
    assert_eq!(failure(lookup(&sts).await).0, "sts-webpki-invalid");
}

#[tokio::test]
async fn a_redirect_is_not_followed() {
    let ip = Ipv4Addr::new(127, 0, 0, 72);
    let pki = Pki::new();
    let web = server(
        &pki,
        ip,
        Answer::redirect("https://mta-sts.example.test/elsewhere.txt"),
    )
    .await;
    let dns = TestDns::start(zone("1", ip)).await;
    let dir = tempfile::tempdir().unwrap();
    let sts = sts(dns.addr, &pki, &cache_file(&dir), web.addr.port());
    let (kind, detail) = failure(lookup(&sts).await);
    assert_eq!(kind, "sts-policy-fetch-error");
    assert!(detail.contains("301"), "{detail}");
    assert!(detail.contains("/elsewhere.txt"), "{detail}");
    assert_eq!(web.requests(), 1);
}

#[tokio::test]
async fn an_oversize_policy_is_refused() {
    let ip = Ipv4Addr::new(127, 0, 0, 73);
    let pki = Pki::new();
    let big = format!("{POLICY}{}", "comment: x\n".repeat(7000));
    let web = server(&pki, ip, Answer::policy(&big)).await;
    let dns = TestDns::start(zone("1", ip)).await;
    let dir = tempfile::tempdir().unwrap();
    let sts = sts(dns.addr, &pki, &cache_file(&dir), web.addr.port());
    let (kind, detail) = failure(lookup(&sts).await);
    assert_eq!(kind, "sts-policy-invalid");
    assert!(detail.contains("65536 bytes"), "{detail}");
}

#[tokio::test]
async fn a_malformed_policy_or_wrong_type_is_invalid() {
    let ip = Ipv4Addr::new(127, 0, 0, 74);
    let pki = Pki::new();
    let mut html = Answer::policy(POLICY);
    html.headers = vec![("Content-Type".into(), "text/html".into())];
    let web = server(&pki, ip, html).await;
    let dns = TestDns::start(zone("1", ip)).await;
    let dir = tempfile::tempdir().unwrap();
    let sts = sts(dns.addr, &pki, &cache_file(&dir), web.addr.port());
    let (kind, detail) = failure(lookup(&sts).await);
    assert_eq!(kind, "sts-policy-invalid");
    assert!(detail.contains("text/html"), "{detail}");

    // A fresh instance: the failure above is held for a while per id.
    web.set(Answer::policy(
        "version: STSv1\nmode: enforce\nmax_age: 60\n",
    ));
    let sts = sts_fresh(dns.addr, &pki, &dir, web.addr.port());
    let (kind, detail) = failure(lookup(&sts).await);
    assert_eq!(kind, "sts-policy-invalid");
    assert!(detail.contains("names no mx"), "{detail}");
}

fn sts_fresh(dns_addr: SocketAddr, pki: &Pki, dir: &tempfile::TempDir, port: u16) -> MtaSts {
    sts(dns_addr, pki, &dir.path().join("other-cache.json"), port)
}

#[tokio::test]
async fn no_txt_record_or_mode_none_is_no_policy() {
    let ip = Ipv4Addr::new(127, 0, 0, 75);
    let pki = Pki::new();
    let web = server(
        &pki,
        ip,
        Answer::policy("version: STSv1\nmode: none\nmax_age: 86400\n"),
    )
    .await;
    let dns = TestDns::start(zone("1", ip).a("mta-sts.plain.test", ip)).await;
    let dir = tempfile::tempdir().unwrap();
    let sts = sts(dns.addr, &pki, &cache_file(&dir), web.addr.port());
    // No TXT record: nothing is fetched even though a host would answer.
    assert!(matches!(
        within(LIMIT, "lookup", sts.lookup("plain.test")).await,
        Lookup::NoPolicy
    ));
    assert_eq!(web.requests(), 0);
    // Mode none: no policy applies, but it is cached like any other.
    assert!(matches!(lookup(&sts).await, Lookup::NoPolicy));
    assert!(matches!(lookup(&sts).await, Lookup::NoPolicy));
    assert_eq!(web.requests(), 1);
    assert_eq!(sts.cached(), 1);
}

#[tokio::test]
async fn a_policy_near_expiry_is_refreshed_in_the_background() {
    let ip = Ipv4Addr::new(127, 0, 0, 76);
    let pki = Pki::new();
    let web = server(&pki, ip, Answer::policy(POLICY)).await;
    let dns = TestDns::start(zone("1", ip)).await;
    let dir = tempfile::tempdir().unwrap();
    // Fetched 50 minutes ago with a one-hour max_age: in its last quarter.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let fetched_at = now - 3000;
    let stored = serde_json::json!({
        "version": 1,
        "policies": [{
            "domain": DOMAIN,
            "id": "1",
            "policy": {"id": "1", "mode": "enforce", "mx": ["old.example.test"], "max_age": 3600},
            "fetched_at": fetched_at,
            "expires_at": fetched_at + 3600,
        }],
    });
    std::fs::write(cache_file(&dir), stored.to_string()).unwrap();
    let sts = sts(dns.addr, &pki, &cache_file(&dir), web.addr.port());

    // The cached policy answers at once; the refresh runs behind it.
    assert!(policy(lookup(&sts).await).allows_mx("old.example.test"));
    within(LIMIT, "the background refresh", web.wait_requests(1)).await;
    // The refreshed policy is written to the file after it is in memory.
    let saved = within(LIMIT, "the refreshed cache file", async {
        loop {
            if let Ok(text) = std::fs::read_to_string(cache_file(&dir))
                && let Ok(saved) = serde_json::from_str::<serde_json::Value>(&text)
                && saved["policies"][0]["fetched_at"].as_u64() >= Some(now)
            {
                break saved;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let entry = &saved["policies"][0];
    assert_eq!(entry["policy"]["max_age"], 86400);
    assert!(policy(lookup(&sts).await).allows_mx("mx1.example.test"));
    assert_eq!(web.requests(), 1);
}

/// A recipient domain in Unicode (SMTPUTF8) has its policy looked up and
/// fetched by its A-labels.
#[tokio::test]
async fn a_unicode_domain_is_looked_up_by_its_a_labels() {
    let ip = Ipv4Addr::new(127, 0, 0, 79);
    let ace = "xn--bcher-kva.test";
    let host = format!("mta-sts.{ace}");
    let pki = Pki::new();
    let web = PolicyServer::start(
        ip,
        pki.acceptor(&[&host]),
        Answer::policy(
            "version: STSv1\nmode: enforce\nmx: mx.xn--bcher-kva.test\nmax_age: 86400\n",
        ),
    )
    .await;
    let dns = TestDns::start(
        Zone::new("test.")
            .txt(&format!("_mta-sts.{ace}"), "v=STSv1; id=7;")
            .a(&host, ip),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let sts = sts(dns.addr, &pki, &cache_file(&dir), web.addr.port());
    let p = policy(within(LIMIT, "lookup", sts.lookup("bücher.test")).await);
    assert_eq!(p.id, "7");
    assert!(p.allows_mx("mx.xn--bcher-kva.test"));
    assert_eq!(web.requests(), 1);
}
