//! `herald tls check DOMAIN` and the MTA-STS / DANE items of `herald domain
//! check`, run as the binary against worlds on loopback: a DNS server
//! serving the test zone (signed for DANE, with the key given as
//! `[delivery.dane] trust_anchor`), an HTTPS policy host with a test CA
//! (`[delivery.mta_sts] ca_file`), and MX hosts speaking SMTP with or
//! without STARTTLS and certificates from that CA.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::dane::{Mx, Tlsa, mx, start_mxs};
use common::dns::{TestDns, Zone, ZoneKey};
use common::https::{Answer, PolicyServer};
use common::mx::ip;
use common::pki::Pki;
use common::submission::SubmissionServer;
use serde_json::Value;

/// Bound on one run of the binary (each SMTP step inside is bounded by
/// `--timeout 5s`, the policy fetch by `fetch_timeout`).
const RUN_LIMIT: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Options {
    /// The policy file served at mta-sts.DOMAIN (and the TXT record then).
    policy: Option<String>,
    /// Sign the zone, trusted by the relay.
    signed: bool,
    /// Sign it with a key the relay does not trust: bogus.
    bogus: bool,
    /// More `[delivery]` lines.
    delivery: &'static str,
}

struct World {
    _pki: Pki,
    _dns: TestDns,
    _policy: PolicyServer,
    _mxs: Vec<SubmissionServer>,
    _dir: tempfile::TempDir,
    config: PathBuf,
}

async fn world(domain: &str, mxs: &[Mx], options: Options) -> World {
    let pki = Pki::new();
    let policy = PolicyServer::start(
        ip(9),
        pki.acceptor(&[&format!("mta-sts.{domain}")]),
        Answer::policy(options.policy.as_deref().unwrap_or("")),
    )
    .await;
    let mut zone = Zone::new("test.").a(&format!("mta-sts.{domain}"), ip(9));
    if options.policy.is_some() {
        zone = zone.txt(&format!("_mta-sts.{domain}"), "v=STSv1; id=20261208T1;");
    }
    let (zone, servers, port) = start_mxs(&pki, domain, mxs, zone, false).await;
    let key = ZoneKey::generate();
    let dns = if options.bogus {
        TestDns::start_signed(zone, &ZoneKey::generate()).await
    } else if options.signed {
        TestDns::start_signed(zone, &key).await
    } else {
        TestDns::start(zone).await
    };
    let dir = tempfile::tempdir().unwrap();
    let anchor = dir.path().join("anchor.keys");
    std::fs::write(&anchor, key.trust_anchor("test.")).unwrap();
    let dane = if options.signed || options.bogus {
        format!(
            "[delivery.dane]\nenabled = true\ntrust_anchor = \"{}\"\n",
            anchor.display()
        )
    } else {
        String::new()
    };
    let config = dir.path().join("herald.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nhostname = \"relay.test\"\n\
             [[listener]]\naddress = \"127.0.0.1:0\"\ntls = \"none\"\nauth = \"none\"\ntrusted_networks = [\"127.0.0.0/8\"]\n\
             [dns]\nnameservers = [\"{}\"]\ntimeout = \"2s\"\nattempts = 1\n\
             [delivery]\nhelo_name = \"relay.test\"\nport = {port}\n{}\n\
             [delivery.mta_sts]\nca_file = \"{}\"\nhttps_port = {}\nfetch_timeout = \"5s\"\n{dane}",
            dns.addr,
            options.delivery,
            pki.ca_file.display(),
            policy.addr.port(),
        ),
    )
    .unwrap();
    World {
        _pki: pki,
        _dns: dns,
        _policy: policy,
        _mxs: servers,
        _dir: dir,
        config,
    }
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}\n{}", self.stdout, self.stderr))
    }

    fn has(&self, needle: &str) {
        assert!(
            self.stdout.contains(needle),
            "no {needle:?} in:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
    }
}

async fn run(config: &Path, args: &[&str]) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = common::within(
        RUN_LIMIT,
        &format!("herald {}", args.join(" ")),
        cmd.output(),
    )
    .await
    .expect("run herald");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn tls_check(w: &World, domain: &str, json: bool) -> Run {
    let mut args = vec!["tls", "check", domain, "--timeout", "5s"];
    if json {
        args.push("--json");
    }
    run(&w.config, &args).await
}

fn enforce(mx: &[&str]) -> Option<String> {
    Some(format!(
        "version: STSv1\nmode: enforce\n{}max_age: 86400\n",
        mx.iter().map(|m| format!("mx: {m}\n")).collect::<String>()
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mta_sts_enforce_with_a_valid_certificate_delivers() {
    let w = world(
        "sts.test",
        &[mx(&["mx1.sts.test"], Tlsa::None)],
        Options {
            policy: enforce(&["mx1.sts.test"]),
            ..Options::default()
        },
    )
    .await;
    let r = tls_check(&w, "sts.test", true).await;
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let j = r.json();
    assert_eq!(j["delivers"], true, "{j}");
    assert_eq!(j["policy"], "mta-sts", "{j}");
    assert_eq!(j["mta_sts"]["status"], "enforce", "{j}");
    assert_eq!(j["mta_sts"]["id"], "20261208T1", "{j}");
    assert_eq!(j["mta_sts"]["mx"][0], "mx1.sts.test", "{j}");
    let m = &j["mx"][0];
    assert_eq!(m["host"], "mx1.sts.test");
    assert_eq!(m["requires"], "verify");
    assert_eq!(m["in_mta_sts"], true);
    let a = &m["addresses"][0];
    assert_eq!(a["starttls"], true, "{a}");
    assert_eq!(a["certificate"]["webpki_valid"], true, "{a}");
    assert_eq!(a["certificate"]["names"][0], "mx1.sts.test", "{a}");
    assert!(
        j["verdict"]
            .as_str()
            .unwrap()
            .contains("delivery will use mx1.sts.test with verified TLS"),
        "{j}"
    );

    // The same in words.
    let r = tls_check(&w, "sts.test", false).await;
    assert_eq!(r.code, 0, "{}", r.stdout);
    r.has("mode enforce, id 20261208T1, mx mx1.sts.test, max_age 86400");
    r.has("webpki   valid for mx1.sts.test");
    r.has("result: MTA-STS enforce id 20261208T1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mta_sts_enforce_with_a_wrong_name_defers_and_names_the_fix() {
    let w = world(
        "sts.test",
        &[mx(&["other.example"], Tlsa::None)],
        Options {
            policy: enforce(&["*.sts.test"]),
            ..Options::default()
        },
    )
    .await;
    let r = tls_check(&w, "sts.test", false).await;
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    r.has("mx1.sts.test presents a certificate for other.example");
    r.has("(4.7.5)");
    r.has("fix: install a certificate valid for mx1.sts.test on mx1.sts.test");
    let j = tls_check(&w, "sts.test", true).await.json();
    assert_eq!(j["delivers"], false);
    assert_eq!(j["policy"], "mta-sts");
    let a = &j["mx"][0]["addresses"][0];
    assert_eq!(a["certificate"]["webpki_fault"], "wrong-name", "{a}");
    assert_eq!(a["code"], "4.7.5", "{a}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_starttls_under_an_enforced_policy_defers() {
    let w = world(
        "sts.test",
        &[mx(&[], Tlsa::None)],
        Options {
            policy: enforce(&["mx1.sts.test"]),
            ..Options::default()
        },
    )
    .await;
    let r = tls_check(&w, "sts.test", true).await;
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let j = r.json();
    let a = &j["mx"][0]["addresses"][0];
    assert_eq!(a["starttls"], false, "{a}");
    assert_eq!(a["code"], "4.7.10", "{a}");
    let verdict = j["verdict"].as_str().unwrap();
    assert!(verdict.contains("offered no STARTTLS"), "{verdict}");
    assert!(
        verdict.contains("fix: enable STARTTLS on mx1.sts.test"),
        "{verdict}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_any_policy_delivery_is_opportunistic() {
    let w = world("plain.test", &[mx(&[], Tlsa::None)], Options::default()).await;
    let r = tls_check(&w, "plain.test", true).await;
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let j = r.json();
    assert_eq!(j["policy"], "default");
    assert_eq!(j["mta_sts"]["status"], "absent");
    assert_eq!(j["dane"]["status"], "off");
    assert!(
        j["verdict"].as_str().unwrap().contains("with no TLS"),
        "{j}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dane_ee_match_delivers_and_says_dane() {
    let w = world(
        "dane.test",
        &[mx(&["not-the-mx.example"], Tlsa::EeKey)],
        Options {
            signed: true,
            ..Options::default()
        },
    )
    .await;
    let r = tls_check(&w, "dane.test", true).await;
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let j = r.json();
    assert_eq!(j["policy"], "dane", "{j}");
    assert_eq!(j["dane"]["status"], "secure", "{j}");
    let m = &j["mx"][0];
    assert_eq!(m["tlsa"]["dnssec"], "secure", "{m}");
    assert_eq!(m["requires"], "dane", "{m}");
    let cert = &m["addresses"][0]["certificate"];
    assert_eq!(cert["tlsa_match"], true, "{cert}");
    // DANE-EE: the name does not count (RFC 7672 §3.1.1); WebPKI says so.
    assert_eq!(cert["webpki_valid"], false, "{cert}");
    let verdict = j["verdict"].as_str().unwrap();
    assert!(verdict.starts_with("DANE applies"), "{verdict}");
    assert!(
        verdict.contains("mx1.dane.test matches its TLSA record 3 1 1 "),
        "{verdict}"
    );
    assert!(verdict.contains("with verified TLS"), "{verdict}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tlsa_mismatch_defers_with_the_record_to_publish() {
    let w = world(
        "dane.test",
        &[mx(&["mx1.dane.test"], Tlsa::EeOther)],
        Options {
            signed: true,
            ..Options::default()
        },
    )
    .await;
    let r = tls_check(&w, "dane.test", true).await;
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let j = r.json();
    assert_eq!(j["policy"], "dane");
    let cert = &j["mx"][0]["addresses"][0]["certificate"];
    assert_eq!(cert["tlsa_match"], false, "{cert}");
    let record = cert["tlsa_for_key"].as_str().unwrap();
    assert!(record.starts_with("3 1 1 "), "{cert}");
    let verdict = j["verdict"].as_str().unwrap();
    assert!(verdict.contains("no TLSA record at _"), "{verdict}");
    assert!(verdict.contains(&format!("TLSA {record}")), "{verdict}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bogus_dnssec_defers() {
    let w = world(
        "dane.test",
        &[mx(&["mx1.dane.test"], Tlsa::EeKey)],
        Options {
            bogus: true,
            ..Options::default()
        },
    )
    .await;
    let r = tls_check(&w, "dane.test", true).await;
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let j = r.json();
    assert_eq!(j["dane"]["status"], "bogus", "{j}");
    assert_eq!(j["delivers"], false);
    let verdict = j["verdict"].as_str().unwrap();
    assert!(verdict.contains("fail DNSSEC validation"), "{verdict}");
    assert!(
        verdict.contains("fix: repair DNSSEC for dane.test"),
        "{verdict}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mx_missing_from_the_policy_is_passed_over() {
    // mx1 is not listed (not used); mx2 is, and delivers.
    let w = world(
        "sts.test",
        &[
            mx(&["mx1.sts.test"], Tlsa::None),
            mx(&["mx2.sts.test"], Tlsa::None),
        ],
        Options {
            policy: enforce(&["mx2.sts.test"]),
            ..Options::default()
        },
    )
    .await;
    let r = tls_check(&w, "sts.test", true).await;
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let j = r.json();
    assert_eq!(j["mx"][0]["in_mta_sts"], false);
    assert_eq!(j["mx"][0]["delivers"], false);
    let verdict = j["verdict"].as_str().unwrap();
    assert!(
        verdict.contains("delivery will use mx2.sts.test"),
        "{verdict}"
    );
    assert!(verdict.contains("mx1.sts.test is passed over"), "{verdict}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_and_config_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(&dir.path().join("none.toml"), &["tls", "check", "a.test"]).await;
    assert_eq!(r.code, 2, "{}\n{}", r.stdout, r.stderr);
    let w = world("plain.test", &[mx(&[], Tlsa::None)], Options::default()).await;
    let r = run(&w.config, &["tls", "check", "not a domain"]).await;
    assert_eq!(r.code, 2, "{}\n{}", r.stdout, r.stderr);
}

// ---------------------------------------------------------------------------
// domain check

async fn domain_check(w: &World, domain: &str) -> Run {
    run(&w.config, &["domain", "check", domain]).await
}

impl Run {
    /// The line of item `check` with `status` that mentions `needle`.
    fn item(&self, status: &str, check: &str, needle: &str) -> &str {
        self.stdout
            .lines()
            .find(|l| {
                let mut w = l.split_whitespace();
                w.next() == Some(status) && w.next() == Some(check) && l.contains(needle)
            })
            .unwrap_or_else(|| {
                panic!(
                    "no line `{status} {check} ...{needle}...` in:\n{}\nstderr:\n{}",
                    self.stdout, self.stderr
                )
            })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_check_reports_a_policy_parse_error_with_its_line() {
    let w = world(
        "sts.test",
        &[mx(&["mx1.sts.test"], Tlsa::None)],
        Options {
            policy: Some(
                "version: STSv1\nmode: enforce\nmx: mx_1.sts.test\nmax_age: 86400\n".into(),
            ),
            ..Options::default()
        },
    )
    .await;
    let r = domain_check(&w, "sts.test").await;
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    r.item(
        "FAIL",
        "mta-sts-policy",
        "line 3: mx \"mx_1.sts.test\" is not a host pattern",
    );
    r.item("FAIL", "mta-sts-policy", "sts-policy-invalid");
    r.has("serve:   https://mta-sts.sts.test/.well-known/mta-sts.txt (text/plain):");
    r.has("mx: mx1.sts.test");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_check_reports_an_mx_missing_from_the_policy_and_bad_certificates() {
    let w = world(
        "sts.test",
        &[
            mx(&["mx1.sts.test"], Tlsa::None),
            mx(&["other.example"], Tlsa::None),
            mx(&["mx3.sts.test"], Tlsa::None),
        ],
        Options {
            policy: enforce(&["mx1.sts.test", "mx2.sts.test"]),
            ..Options::default()
        },
    )
    .await;
    let r = domain_check(&w, "sts.test").await;
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    r.item("pass", "mta-sts-policy", "mode enforce");
    r.item("pass", "mta-sts-mx", "mx1.sts.test is listed");
    r.item("FAIL", "mta-sts-mx", "MX mx3.sts.test is not listed");
    r.item(
        "pass",
        "mta-sts-cert",
        "mx1.sts.test presents a certificate valid",
    );
    r.item(
        "FAIL",
        "mta-sts-cert",
        "the certificate is for other.example, not mx2.sts.test",
    );
    r.has("install: on mx2.sts.test: a certificate valid for mx2.sts.test");
    // The policy to serve lists all three.
    r.has("mx: mx3.sts.test");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_check_compares_tlsa_records_with_what_each_mx_presents() {
    let w = world(
        "dane.test",
        &[
            mx(&["mx1.dane.test"], Tlsa::EeKey),
            mx(&["mx2.dane.test"], Tlsa::EeOther),
        ],
        Options {
            signed: true,
            ..Options::default()
        },
    )
    .await;
    let r = domain_check(&w, "dane.test").await;
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    r.item(
        "pass",
        "dane-tlsa",
        "mx1.dane.test matches its TLSA record 3 1 1",
    );
    r.item("FAIL", "dane-tlsa", "no TLSA record at _");
    r.has(". TLSA 3 1 1 ");
}
