//! DMARC alignment before acceptance (`herald::policy::alignment`), against
//! the in-process DNS server: DMARC records, DKIM public keys and SPF
//! policies (with include and a mechanisms) are real TXT/A records on
//! loopback, and SPF is evaluated by mail-auth's verifier over them.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::dns::{SilentDns, TestDns, Zone};
use common::relay::PASSWORD_HASH;
use common::within;
use herald::config::{Config, DkimAlgorithm};
use herald::dns::Dns;
use herald::policy::Verdict;
use herald::policy::alignment::{
    Alignment, AlignmentVerdict, DkimFailure, DmarcAction, DmarcPolicy, KeyState, SpfFailure,
    verdict_for,
};
use herald::policy::dkim::{self, Signer};

const WAIT: Duration = Duration::from_secs(15);

/// herald's sending IPs in these tests (`[delivery] public_ips`).
const IP_A: &str = "192.0.2.10";
const IP_B: &str = "198.51.100.7";

struct Keys {
    _dir: tempfile::TempDir,
    /// `[[dkim]]` sections.
    config: String,
    /// Record text of acme.test's key (published).
    acme: String,
    /// Record text of nokey.test's key (not published).
    nokey: String,
}

fn keys() -> Keys {
    let dir = tempfile::tempdir().unwrap();
    let mut config = String::new();
    let mut make = |domain: &str, alg: DkimAlgorithm, name: &str| {
        let key = dkim::generate(alg, 2048).unwrap();
        let path = dir.path().join(format!("{domain}.key"));
        dkim::write_key_file(&path, &key.pem).unwrap();
        config.push_str(&format!(
            "[[dkim]]\ndomain = \"{domain}\"\nselector = \"herald1\"\nalgorithm = \"{name}\"\nkey = \"{}\"\n",
            path.display()
        ));
        key.txt_record()
    };
    let acme = make("acme.test", DkimAlgorithm::Ed25519Sha256, "ed25519-sha256");
    let nokey = make("nokey.test", DkimAlgorithm::RsaSha256, "rsa-sha256");
    Keys {
        _dir: dir,
        config,
        acme,
        nokey,
    }
}

fn zone(keys: &Keys) -> Zone {
    Zone::new("test.")
        // DKIM alone passes.
        .txt(
            "_dmarc.acme.test",
            "v=DMARC1; p=reject; rua=mailto:d@acme.test",
        )
        .txt("herald1._domainkey.acme.test", &keys.acme)
        // Nothing passes: the key is not in DNS, SPF lists another IP.
        .txt("_dmarc.nokey.test", "v=DMARC1; p=reject")
        .txt("nokey.test", "v=spf1 ip4:192.0.2.1 -all")
        .txt("_dmarc.none.test", "v=DMARC1; p=none")
        // SPF alone passes, through include: and a: on an aligned
        // subdomain of the From: domain (relaxed alignment).
        .txt("_dmarc.spf.test", "v=DMARC1; p=quarantine")
        .txt("bounces.spf.test", "v=spf1 include:_spf.relay.test -all")
        .txt(
            "_spf.relay.test",
            "v=spf1 a:out.relay.test ip4:198.51.100.0/24 -all",
        )
        .a("out.relay.test", "192.0.2.10".parse().unwrap())
        // The same SPF, but aspf=s: a subdomain return path does not align.
        .txt("_dmarc.strict.test", "v=DMARC1; p=reject; aspf=s")
        .txt("bounces.strict.test", "v=spf1 include:_spf.relay.test -all")
        .a("bare.test", "192.0.2.99".parse().unwrap())
}

fn config(dns: std::net::SocketAddr, keys: &Keys, delivery: &str, dmarc: &str) -> Config {
    let text = format!(
        r#"
[server]
hostname = "relay.test"

[[listener]]
address = "127.0.0.1:0"
tls = "none"
auth = "none"
trusted_networks = ["127.0.0.0/8"]

[[tenant]]
name = "acme"
username = "acme"
password_hash = "{PASSWORD_HASH}"
allowed_senders = ["*@acme.test"]

[dns]
nameservers = ["{dns}"]
timeout = "1s"
attempts = 1

[delivery]
helo_name = "relay.test"
{delivery}

{dkim}

[policy.dmarc]
action = "reject"
{dmarc}
"#,
        dkim = keys.config
    );
    Config::from_toml_str(&text).unwrap_or_else(|e| panic!("test config: {e}"))
}

fn alignment(config: &Config) -> Alignment {
    let signer = Signer::load(config).expect("keys load");
    let dns = Dns::new(&config.dns).expect("resolver");
    Alignment::new(config, &dns, Arc::new(signer))
}

fn public_ips() -> String {
    format!("public_ips = [\"{IP_A}\", \"{IP_B}\"]")
}

async fn check(a: &Alignment, tenant: Option<&str>, from: &str, rp: &str) -> AlignmentVerdict {
    within(WAIT, "alignment check", a.check(tenant, from, rp)).await
}

#[tokio::test]
async fn published_dkim_key_passes_under_p_reject() {
    let keys = keys();
    let dns = TestDns::start(zone(&keys)).await;
    let a = alignment(&config(dns.addr, &keys, &public_ips(), ""));
    // The return path is not aligned and SPF is not even consulted: DKIM
    // alone is enough.
    assert_eq!(
        check(&a, None, "billing@acme.test", "bounces.relay.test").await,
        AlignmentVerdict::Pass
    );
    // The tenant that owns acme.test signs with its key too.
    assert_eq!(
        check(&a, Some("acme"), "billing@acme.test", "acme.test").await,
        AlignmentVerdict::Pass
    );
    assert_eq!(a.verdict(&AlignmentVerdict::Pass), (None, None));
}

#[tokio::test]
async fn unpublished_key_and_unauthorised_ips_would_fail_naming_both() {
    let keys = keys();
    let dns = TestDns::start(zone(&keys)).await;
    let a = alignment(&config(dns.addr, &keys, &public_ips(), ""));
    let v = check(&a, None, "billing@nokey.test", "nokey.test").await;
    let AlignmentVerdict::WouldFail(f) = &v else {
        panic!("expected WouldFail, got {v:?}")
    };
    assert_eq!(f.domain, "nokey.test");
    assert_eq!(f.policy_domain, "nokey.test");
    assert_eq!(f.policy, DmarcPolicy::Reject);
    let DkimFailure::Keys(problems) = &f.dkim else {
        panic!("{:?}", f.dkim)
    };
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].name, "herald1._domainkey.nokey.test");
    assert_eq!(problems[0].problem, KeyState::NotPublished);
    let ip_a = IP_A.parse().unwrap();
    let ip_b = IP_B.parse().unwrap();
    assert_eq!(
        f.spf,
        SpfFailure::NotAuthorised {
            return_path_domain: "nokey.test".into(),
            ips: vec![(ip_a, "fail"), (ip_b, "fail")],
        }
    );
    // The fixes: the DKIM record, then the SPF record with herald's IPs
    // added to what is published.
    assert_eq!(f.fixes.len(), 2);
    assert_eq!(f.fixes[0].name, "herald1._domainkey.nokey.test");
    assert_eq!(f.fixes[0].record, keys.nokey);
    assert_eq!(f.fixes[1].name, "nokey.test");
    assert_eq!(
        f.fixes[1].record,
        format!("v=spf1 ip4:{IP_A} ip4:{IP_B} ip4:192.0.2.1 -all")
    );

    // action = reject: 550 5.7.26 naming the domain, both failures and the
    // record; every reply line fits RFC 5321's 512 octets.
    let (verdict, warning) = a.verdict(&v);
    assert_eq!(warning, None);
    let Some(Verdict::Reject { reply, rule }) = verdict else {
        panic!("expected a reject, got {verdict:?}")
    };
    assert_eq!(rule.as_str(), "dmarc");
    assert_eq!(reply.to_string().get(..10), Some("550 5.7.26"));
    for want in [
        "nokey.test",
        "p=reject",
        "herald1._domainkey.nokey.test is not published",
        "does not authorise 192.0.2.10 (fail)",
        keys.nokey.as_str(),
    ] {
        assert!(reply.text.contains(want), "{want:?} missing from {reply}");
    }
    let wire = String::from_utf8(reply.to_wire()).unwrap();
    assert!(wire.split("\r\n").all(|l| l.len() <= 512), "{wire}");

    // A tenant may not use nokey.test's key: herald would sign with none.
    let v = check(&a, Some("acme"), "billing@nokey.test", "nokey.test").await;
    let AlignmentVerdict::WouldFail(f) = &v else {
        panic!("expected WouldFail, got {v:?}")
    };
    assert_eq!(f.dkim, DkimFailure::NoKey { signs_as: None });

    // A return path outside the From: domain does not align.
    let v = check(&a, None, "billing@nokey.test", "bounces.relay.test").await;
    let AlignmentVerdict::WouldFail(f) = &v else {
        panic!("expected WouldFail, got {v:?}")
    };
    assert_eq!(
        f.spf,
        SpfFailure::NotAligned {
            return_path_domain: "bounces.relay.test".into(),
            strict: false
        }
    );
    assert_eq!(f.fixes.len(), 1, "{:?}", f.fixes);
}

#[tokio::test]
async fn p_none_or_no_record_is_not_enforced() {
    let keys = keys();
    let dns = TestDns::start(zone(&keys)).await;
    let a = alignment(&config(dns.addr, &keys, &public_ips(), ""));
    assert_eq!(
        check(&a, None, "x@none.test", "none.test").await,
        AlignmentVerdict::NotEnforced
    );
    assert_eq!(
        check(&a, None, "x@bare.test", "bare.test").await,
        AlignmentVerdict::NotEnforced
    );
    // A subdomain without its own record inherits the parent's policy.
    let v = check(&a, None, "x@mail.nokey.test", "mail.nokey.test").await;
    assert!(matches!(v, AlignmentVerdict::WouldFail(_)), "{v:?}");
}

#[tokio::test]
async fn authorised_and_aligned_return_path_passes_without_dkim() {
    let keys = keys();
    let dns = TestDns::start(zone(&keys)).await;
    let a = alignment(&config(dns.addr, &keys, &public_ips(), ""));
    // IP_A through include: → a:, IP_B through include: → ip4:.
    assert_eq!(
        check(&a, None, "billing@spf.test", "bounces.spf.test").await,
        AlignmentVerdict::Pass
    );
    // source_ips are used when there are no public_ips.
    let only_a = config(dns.addr, &keys, &format!("source_ips = [\"{IP_A}\"]"), "");
    assert_eq!(
        check(
            &alignment(&only_a),
            None,
            "billing@spf.test",
            "bounces.spf.test"
        )
        .await,
        AlignmentVerdict::Pass
    );
    // aspf=s: the subdomain return path does not align, whatever SPF says.
    let v = check(&a, None, "billing@strict.test", "bounces.strict.test").await;
    let AlignmentVerdict::WouldFail(f) = &v else {
        panic!("expected WouldFail, got {v:?}")
    };
    assert_eq!(
        f.spf,
        SpfFailure::NotAligned {
            return_path_domain: "bounces.strict.test".into(),
            strict: true
        }
    );
    assert!(matches!(f.dkim, DkimFailure::NoKey { .. }), "{:?}", f.dkim);
}

#[tokio::test]
async fn without_sending_ips_spf_is_unknown_not_a_failure() {
    let keys = keys();
    let dns = TestDns::start(zone(&keys)).await;
    let a = alignment(&config(dns.addr, &keys, "", ""));
    let v = check(&a, None, "billing@nokey.test", "nokey.test").await;
    let AlignmentVerdict::Unknown(reason) = &v else {
        panic!("expected Unknown, got {v:?}")
    };
    assert!(reason.contains("no sending IPs"), "{reason}");
    // The DKIM record to publish is still named.
    assert!(reason.contains(&keys.nokey), "{reason}");
    let (verdict, warning) = a.verdict(&v);
    assert_eq!(verdict, None);
    assert!(warning.is_some_and(|w| w.contains("nokey.test")));
    // DKIM alone still passes.
    assert_eq!(
        check(&a, None, "billing@acme.test", "acme.test").await,
        AlignmentVerdict::Pass
    );
}

#[tokio::test]
async fn dns_timeout_is_unknown_and_never_rejects() {
    let keys = keys();
    let silent = SilentDns::start().await;
    let a = alignment(&config(silent.addr, &keys, &public_ips(), ""));
    let v = check(&a, None, "billing@acme.test", "acme.test").await;
    assert!(matches!(v, AlignmentVerdict::Unknown(_)), "{v:?}");
    for action in [DmarcAction::Reject, DmarcAction::Defer, DmarcAction::Warn] {
        let (verdict, warning) = verdict_for(action, &v);
        assert_eq!(verdict, None, "{action:?}");
        assert!(warning.is_some(), "{action:?}");
    }
}

#[tokio::test]
async fn cached_verdict_needs_no_dns() {
    let keys = keys();
    let dns = TestDns::start(zone(&keys)).await;
    let a = Arc::new(alignment(&config(dns.addr, &keys, &public_ips(), "")));
    // Messages arriving together for a domain not yet cached share one
    // set of lookups.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..20 {
        let a = a.clone();
        set.spawn(async move {
            a.check(None, &format!("u{i}@nokey.test"), "nokey.test")
                .await
        });
    }
    let all = within(WAIT, "concurrent checks", set.join_all()).await;
    let first = all[0].clone();
    assert!(matches!(first, AlignmentVerdict::WouldFail(_)), "{first:?}");
    assert!(all.iter().all(|v| *v == first));
    assert_eq!(a.evaluations(), 1);
    drop(dns);
    // Same domains (any case, any local part): the cached verdict.
    let again = check(&a, None, "Other@NOKEY.test", "nokey.test.").await;
    assert_eq!(again, first);
    assert_eq!(a.evaluations(), 1, "the second check asked DNS");
    // A pair not seen before does ask, and the server is gone.
    let v = check(&a, None, "billing@acme.test", "acme.test").await;
    assert!(matches!(v, AlignmentVerdict::Unknown(_)), "{v:?}");
    assert_eq!(a.evaluations(), 2);
    assert_eq!(a.cached_len(), 2);
}

#[tokio::test]
async fn cached_verdict_expires_after_max_ttl() {
    let keys = keys();
    let dns = TestDns::start(zone(&keys)).await;
    let a = alignment(&config(
        dns.addr,
        &keys,
        &public_ips(),
        "min_ttl = \"1s\"\nmax_ttl = \"1s\"",
    ));
    assert_eq!(
        check(&a, None, "x@acme.test", "acme.test").await,
        AlignmentVerdict::Pass
    );
    assert_eq!(a.evaluations(), 1);
    // The records' TTL is 60 s, max_ttl 1 s: the entry expires first.
    within(WAIT, "the cached verdict to expire", async {
        while a.evaluations() < 2 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(
                a.check(None, "x@acme.test", "acme.test").await,
                AlignmentVerdict::Pass
            );
        }
    })
    .await;
}

#[test]
fn dmarc_config_is_validated_with_key_paths() {
    let paths = |dmarc: &str| -> Vec<String> {
        let text = format!(
            "[[listener]]\naddress = \"127.0.0.1:0\"\ntls = \"none\"\nauth = \"none\"\ntrusted_networks = [\"127.0.0.0/8\"]\n[policy.dmarc]\n{dmarc}\n"
        );
        match Config::from_toml_str(&text) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.into_iter().map(|e| e.path).collect(),
        }
    };
    assert!(paths("action = \"warn\"").is_empty());
    assert_eq!(paths("action = \"maybe\""), ["policy.dmarc.action"]);
    assert_eq!(
        paths("min_ttl = \"2h\"\nmax_ttl = \"1h\""),
        ["policy.dmarc.min_ttl"]
    );
    assert_eq!(paths("cache_size = 0"), ["policy.dmarc.cache_size"]);
    assert_eq!(paths("colour = 1"), ["policy.dmarc.colour"]);
}

/// End to end: the check runs before the message is accepted.
mod through_the_relay {
    use super::*;
    use common::mx::{MxSink, SinkReply, ip, reserve_port};
    use common::relay::{Setup, TestRelay, field};

    async fn relay(action: &str) -> (TestDns, MxSink, TestRelay) {
        let zone = Zone::new("test.")
            .mx("one.test", 10, "mx.one.test")
            .a("mx.one.test", ip(2))
            .txt("_dmarc.acme.test", "v=DMARC1; p=reject")
            .txt("acme.test", "v=spf1 ip4:192.0.2.1 -all");
        let dns = TestDns::start(zone).await;
        let (port, mut listeners) = reserve_port(&[ip(2)]);
        let mx = MxSink::start_on(listeners.pop().unwrap(), |_, _| SinkReply::Accept).unwrap();
        let mut setup = Setup::new(dns.addr, port);
        setup.delivery_extra = format!("public_ips = [\"{IP_A}\"]\n");
        setup.extra = format!("[policy.dmarc]\naction = \"{action}\"\n");
        let relay = TestRelay::start(setup).await;
        (dns, mx, relay)
    }

    const INVOICE: &[u8] = b"From: Acme Billing <billing@acme.test>\r\n\
        To: <payer@one.test>\r\nSubject: Invoice 7\r\n\r\nInvoice attached.\r\n";

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reject_refuses_at_data_with_the_record_to_publish() {
        within(Duration::from_secs(60), "DMARC reject end to end", async {
            let (_dns, _mx, relay) = relay("reject").await;
            let r = relay
                .submit("billing@acme.test", &["payer@one.test"], INVOICE)
                .await;
            r.assert_code(550);
            assert_eq!(r.enhanced(), Some("5.7.26"));
            let text = r.text();
            assert!(text.contains("acme.test"), "{text}");
            assert!(
                text.contains("v=spf1"),
                "names the SPF record to publish: {text}"
            );
            assert!(text.contains(IP_A), "{text}");
            let rejected = relay
                .wait_events("rejected", 1, WAIT, |e| field(e, "event") == "rejected")
                .await;
            assert_eq!(field(&rejected[0], "rule"), "dmarc");
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn warn_accepts_and_says_so_in_the_received_event() {
        within(Duration::from_secs(60), "DMARC warn end to end", async {
            let (_dns, mx, relay) = relay("warn").await;
            let r = relay
                .submit("billing@acme.test", &["payer@one.test"], INVOICE)
                .await;
            r.assert_code(250);
            let received = relay
                .wait_events("received", 1, WAIT, |e| field(e, "event") == "received")
                .await;
            let warnings = received[0]["warnings"].as_array().expect("warnings");
            assert!(
                warnings
                    .iter()
                    .any(|w| w.as_str().unwrap().contains("acme.test")),
                "{warnings:?}"
            );
            tokio::task::block_in_place(|| mx.wait_for_messages(1, WAIT));
        })
        .await;
    }
}
