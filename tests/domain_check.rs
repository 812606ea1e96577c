//! `herald domain check DOMAIN` run as a binary against a real DNS server
//! on 127.0.0.1 (TestDns) serving a zone with one well set-up domain and
//! domains broken each way: no SPF, SPF over the lookup limit, two SPF
//! records, SPF not authorising herald, DKIM missing and mismatched, DMARC
//! missing / p=none / unparsable, no MX; a VERP return path; `--json`; and
//! a DNS server that never answers ("could not check", never a verdict).

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::dns::{SilentDns, TestDns, Zone};
use common::https::{Answer, PolicyServer};
use common::pki::Pki;
use common::submission::{Script, SubmissionServer, TlsMode};
use herald::config::Config;
use herald::policy::dkim::Signer;
use std::net::Ipv4Addr;

/// Bound on one run of the binary.
const RUN_LIMIT: Duration = Duration::from_secs(60);

const HERALD_V4: &str = "192.0.2.10";
const HERALD_V6: &str = "2001:db8::10";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn dkim_table(domain: &str, selector: &str, alg: &str, key: &str) -> String {
    format!(
        "[[dkim]]\ndomain = \"{domain}\"\nselector = \"{selector}\"\nalgorithm = \"{alg}\"\nkey = \"{}\"\n",
        fixture(key).display()
    )
}

/// herald's keys: good.test, mismatch.test and nodkim.test sign with the
/// RSA fixture; silent.test with the Ed25519 one.
fn keys() -> String {
    [
        dkim_table(
            "good.test",
            "herald1",
            "rsa-sha256",
            "dkim-rsa2048-pkcs1.pem",
        ),
        dkim_table(
            "mismatch.test",
            "herald1",
            "rsa-sha256",
            "dkim-rsa2048-pkcs1.pem",
        ),
        dkim_table(
            "nodkim.test",
            "herald1",
            "rsa-sha256",
            "dkim-rsa2048-pkcs1.pem",
        ),
        dkim_table(
            "silent.test",
            "herald1",
            "ed25519-sha256",
            "dkim-ed25519-openssl.pem",
        ),
    ]
    .concat()
}

/// `delivery`: more lines for `[delivery]` (the MX port, `[delivery.mta_sts]`).
fn config_text(dns: std::net::SocketAddr, delivery: &str, extra: &str) -> String {
    format!(
        "[server]\nhostname = \"relay.test\"\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\ntls = \"none\"\nauth = \"none\"\ntrusted_networks = [\"127.0.0.0/8\"]\n\
         [dns]\nnameservers = [\"{dns}\"]\ntimeout = \"1s\"\nattempts = 1\n\
         [delivery]\npublic_ips = [\"{HERALD_V4}\", \"{HERALD_V6}\"]\n\
         {delivery}\n{extra}\n{}",
        keys()
    )
}

/// The TXT record text of herald's RSA and Ed25519 fixture keys.
fn key_records() -> (String, String) {
    let text = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\ntls = \"none\"\nauth = \"none\"\ntrusted_networks = [\"127.0.0.0/8\"]\n{}{}",
        dkim_table("a.test", "s", "rsa-sha256", "dkim-rsa2048-pkcs1.pem"),
        dkim_table("b.test", "s", "ed25519-sha256", "dkim-ed25519-openssl.pem"),
    );
    let signer = Signer::load(&Config::from_toml_str(&text).unwrap()).unwrap();
    (signer.keys()[0].txt_record(), signer.keys()[1].txt_record())
}

fn zone() -> Zone {
    let (rsa, ed25519) = key_records();
    let mut z = Zone::new("test.")
        // herald's SPF include and the return-path domain.
        .txt(
            "_spf.relay.test",
            "v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/64 -all",
        )
        .mx("bounces.relay.test", 10, "relay.test")
        .a("relay.test", Ipv4Addr::new(127, 0, 0, 2))
        .txt(
            "bounces.relay.test",
            "v=spf1 include:_spf.relay.test -all",
        )
        // The well set-up domain.
        .mx("good.test", 10, "mx.good.test")
        .a("mx.good.test", Ipv4Addr::new(127, 0, 0, 3))
        .txt("good.test", "v=spf1 mx include:_spf.relay.test -all")
        .txt("good.test", "google-site-verification=abc")
        .txt("herald1._domainkey.good.test", &rsa)
        .txt(
            "_dmarc.good.test",
            "v=DMARC1; p=reject; rua=mailto:dmarc@good.test",
        )
        .txt("_mta-sts.good.test", "v=STSv1; id=20261129T000000")
        .txt(
            "_smtp._tls.good.test",
            "v=TLSRPTv1; rua=mailto:tlsrpt@good.test",
        )
        // No SPF at all.
        .mx("nospf.test", 10, "mx.good.test")
        // 2 includes + 4 + 5 `a` terms = 11 lookups.
        .mx("lookups.test", 10, "mx.good.test")
        .txt(
            "lookups.test",
            "v=spf1 include:a.lookups.test include:b.lookups.test ip4:192.0.2.10 -all",
        )
        .txt(
            "a.lookups.test",
            "v=spf1 a:h1.lookups.test a:h2.lookups.test a:h3.lookups.test a:h4.lookups.test -all",
        )
        .txt(
            "b.lookups.test",
            "v=spf1 a:h1.lookups.test a:h2.lookups.test a:h3.lookups.test a:h4.lookups.test a:h5.lookups.test -all",
        )
        // Two SPF records.
        .mx("twospf.test", 10, "mx.good.test")
        .txt("twospf.test", "v=spf1 ip4:192.0.2.10 -all")
        .txt("twospf.test", "v=spf1 include:_spf.relay.test ~all")
        // SPF that authorises someone else.
        .mx("noauth.test", 10, "mx.good.test")
        .txt("noauth.test", "v=spf1 ip4:198.51.100.1 -all")
        .txt("_dmarc.noauth.test", "v=DMARC1; p=reject; rua=mailto:d@noauth.test")
        // DKIM: another key published; none published.
        .txt("herald1._domainkey.mismatch.test", &ed25519)
        .txt("nodkim.test", "v=spf1 include:_spf.relay.test -all")
        // DMARC: none, monitoring only, broken.
        .txt("dmarcnone.test", "v=spf1 include:_spf.relay.test -all")
        .txt("_dmarc.dmarcnone.test", "v=DMARC1; p=none; rua=mailto:d@dmarcnone.test")
        .txt("baddmarc.test", "v=spf1 include:_spf.relay.test -all")
        .txt("_dmarc.baddmarc.test", "v=DMARC1; p=rejct")
        // No MX, only an SPF record; and a null MX.
        .txt("nomx.test", "v=spf1 include:_spf.relay.test -all")
        .null_mx("nullmx.test");
    for h in 1..=5 {
        z = z.a(&format!("h{h}.lookups.test"), Ipv4Addr::new(127, 0, 1, h));
    }
    z
}

/// The zone on a test DNS server, and good.test's MTA-STS policy host
/// and MX host (STARTTLS with a certificate from a test CA).
struct World {
    dir: tempfile::TempDir,
    dns: TestDns,
    _pki: Pki,
    _policy: PolicyServer,
    _mx: SubmissionServer,
    delivery: String,
}

impl World {
    async fn start() -> World {
        let pki = Pki::new();
        let policy = PolicyServer::start(
            Ipv4Addr::new(127, 0, 0, 9),
            pki.acceptor(&["mta-sts.good.test"]),
            Answer::policy("version: STSv1\nmode: enforce\nmx: mx.good.test\nmax_age: 86400\n"),
        )
        .await;
        let mx = SubmissionServer::start_at(
            (Ipv4Addr::new(127, 0, 0, 3), 0).into(),
            Script {
                tls: TlsMode::Starttls(pki.acceptor(&["mx.good.test"])),
                open_relay: true,
                ..Script::default()
            },
        )
        .await;
        let delivery = format!(
            "port = {}\n[delivery.mta_sts]\nca_file = \"{}\"\nhttps_port = {}\nfetch_timeout = \"5s\"\n",
            mx.port(),
            pki.ca_file.display(),
            policy.addr.port()
        );
        World {
            dir: tempfile::tempdir().unwrap(),
            dns: TestDns::start(zone().a("mta-sts.good.test", Ipv4Addr::new(127, 0, 0, 9))).await,
            _pki: pki,
            _policy: policy,
            _mx: mx,
            delivery,
        }
    }

    fn config(&self, extra: &str) -> PathBuf {
        let path = self.dir.path().join(format!("herald-{}.toml", extra.len()));
        std::fs::write(&path, config_text(self.dns.addr, &self.delivery, extra)).unwrap();
        path
    }
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The human-output line of item `check` that mentions `needle`.
    fn line(&self, status: &str, check: &str, needle: &str) -> &str {
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

    /// The fix line following the item line that contains `needle`.
    fn fix_after(&self, needle: &str) -> &str {
        let mut lines = self.stdout.lines().skip_while(|l| !l.contains(needle));
        lines.next();
        lines
            .next()
            .filter(|l| l.trim_start().starts_with("publish:"))
            .unwrap_or_else(|| panic!("no fix after {needle:?} in:\n{}", self.stdout))
    }
}

async fn run(config: &Path, args: &[&str]) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.arg("--config")
        .arg(config)
        .args(["domain", "check"])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(RUN_LIMIT, cmd.output())
        .await
        .expect("herald domain check finished in time")
        .expect("run herald");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_well_set_up_domain_passes_every_item() {
    let w = World::start().await;
    let r = run(&w.config(""), &["good.test"]).await;
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(
        !r.stdout.contains("FAIL") && !r.stdout.contains("warn "),
        "{}",
        r.stdout
    );
    r.line("pass", "mx", "mx.good.test (10)");
    r.line("pass", "spf", "v=spf1 mx include:_spf.relay.test -all");
    r.line("pass", "spf-lookups", "2 DNS lookup(s)");
    r.line(
        "pass",
        "spf-herald",
        "192.0.2.10 (via include:_spf.relay.test)",
    );
    r.line("pass", "spf-herald", "2001:db8::10");
    r.line("pass", "spf-all", "-all");
    r.line(
        "pass",
        "dkim",
        "herald1._domainkey.good.test publishes herald's key",
    );
    r.line("pass", "dmarc", "p=reject");
    r.line("pass", "dmarc-alignment", "DKIM (d=good.test)");
    r.line("pass", "mta-sts", "v=STSv1; id=20261129T000000");
    r.line("pass", "mta-sts-policy", "mode enforce, mx mx.good.test");
    r.line("pass", "mta-sts-mx", "mx.good.test is listed");
    r.line("pass", "mta-sts-cert", "valid for mx.good.test");
    r.line("pass", "tls-rpt", "v=TLSRPTv1");
    assert!(
        r.stdout.contains("result: 0 failed, 0 warning(s)"),
        "{}",
        r.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spf_problems_fail_with_the_record_to_publish() {
    let w = World::start().await;
    let cfg = w.config("");

    let r = run(&cfg, &["nospf.test"]).await;
    assert_eq!(r.code, 1, "{}", r.stdout);
    r.line("FAIL", "spf", "has no SPF record");
    assert!(
        r.fix_after("has no SPF record")
            .contains("nospf.test. TXT \"v=spf1 ip4:192.0.2.10 ip6:2001:db8::10 ~all\""),
        "{}",
        r.stdout
    );

    let r = run(&cfg, &["lookups.test"]).await;
    assert_eq!(r.code, 1, "{}", r.stdout);
    r.line(
        "FAIL",
        "spf-lookups",
        "11 DNS lookups, more than the 10 allowed",
    );
    // The receiver's evaluation stops at the limit too: herald's terms
    // first let its mail pass before the limit.
    r.line("FAIL", "spf-herald", "permerror");
    assert!(
        r.fix_after("does not authorise").contains(
            "\"v=spf1 ip4:192.0.2.10 ip6:2001:db8::10 include:a.lookups.test include:b.lookups.test -all\""
        ),
        "{}",
        r.stdout
    );

    let r = run(&cfg, &["twospf.test"]).await;
    assert_eq!(r.code, 1, "{}", r.stdout);
    r.line("FAIL", "spf", "has 2 SPF records");
    assert!(
        r.fix_after("has 2 SPF records")
            .contains("\"v=spf1 ip4:192.0.2.10 include:_spf.relay.test ip6:2001:db8::10 -all\""),
        "{}",
        r.stdout
    );

    let r = run(&cfg, &["noauth.test"]).await;
    assert_eq!(r.code, 1, "{}", r.stdout);
    r.line("FAIL", "spf-herald", "192.0.2.10 (result: fail)");
    let fix = r.fix_after("does not authorise");
    assert!(
        fix.contains(
            "noauth.test. TXT \"v=spf1 ip4:198.51.100.1 ip4:192.0.2.10 ip6:2001:db8::10 -all\""
        ),
        "{fix}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dkim_missing_or_mismatched_fails_with_the_exact_record() {
    let w = World::start().await;
    let cfg = w.config("");
    let (rsa, _) = key_records();

    let r = run(&cfg, &["nodkim.test"]).await;
    assert_eq!(r.code, 1, "{}", r.stdout);
    r.line(
        "FAIL",
        "dkim",
        "herald1._domainkey.nodkim.test is not published",
    );
    assert!(
        r.fix_after("is not published")
            .contains(&format!("herald1._domainkey.nodkim.test. TXT \"{rsa}\"")),
        "{}",
        r.stdout
    );
    // Its SPF still authorises herald: DMARC aligns that way.
    r.line(
        "pass",
        "dmarc-alignment",
        "SPF (envelope sender at nodkim.test",
    );

    let r = run(&cfg, &["mismatch.test"]).await;
    assert_eq!(r.code, 1, "{}", r.stdout);
    r.line("FAIL", "dkim", "publishes a different key");
    // Neither DKIM nor SPF aligns, and no DMARC policy yet: a warning.
    r.line("warn", "dmarc-alignment", "once a policy is published");
    assert!(
        r.fix_after("publishes a different key")
            .contains(&format!("herald1._domainkey.mismatch.test. TXT \"{rsa}\"")),
        "{}",
        r.stdout
    );

    // A domain herald has no key for: the keygen command to run.
    let r = run(&cfg, &["noauth.test", "--selector", "google"]).await;
    r.line(
        "FAIL",
        "dkim",
        "herald dkim keygen --domain noauth.test --selector herald1",
    );
    r.line(
        "FAIL",
        "dkim",
        "google._domainkey.noauth.test: no DKIM key record",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dmarc_missing_monitoring_or_broken() {
    let w = World::start().await;
    let cfg = w.config("");

    let r = run(&cfg, &["nodkim.test"]).await;
    r.line("warn", "dmarc", "no DMARC record at _dmarc.nodkim.test");
    assert!(
        r.fix_after("no DMARC record")
            .contains("_dmarc.nodkim.test. TXT \"v=DMARC1; p=none; rua=mailto:dmarc@nodkim.test\""),
        "{}",
        r.stdout
    );

    let r = run(&cfg, &["dmarcnone.test"]).await;
    r.line("warn", "dmarc", "monitoring only");
    assert!(
        r.fix_after("monitoring only")
            .contains("\"v=DMARC1; p=quarantine; rua=mailto:d@dmarcnone.test\""),
        "{}",
        r.stdout
    );

    let r = run(&cfg, &["baddmarc.test"]).await;
    assert_eq!(r.code, 1, "{}", r.stdout);
    r.line("FAIL", "dmarc", "p=rejct is not a policy");

    // p=reject, and herald's mail aligns neither way: it would be rejected.
    let r = run(&cfg, &["noauth.test"]).await;
    r.line("pass", "dmarc", "p=reject");
    r.line(
        "FAIL",
        "dmarc-alignment",
        "under p=reject receivers will reject it",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_without_mx_is_warned_about() {
    let w = World::start().await;
    let cfg = w.config("");
    let r = run(&cfg, &["nomx.test"]).await;
    r.line("warn", "mx", "cannot receive replies and bounces");
    assert!(
        r.fix_after("cannot receive replies")
            .contains("nomx.test. MX 10 ")
    );
    let r = run(&cfg, &["nullmx.test"]).await;
    r.line("warn", "mx", "null MX");
    // MTA-STS and TLS-RPT absent: warnings with the record to publish.
    r.line("warn", "mta-sts", "no MTA-STS record");
    assert!(
        r.fix_after("no MTA-STS record")
            .contains("_mta-sts.nullmx.test. TXT \"v=STSv1; id=")
    );
    r.line("warn", "tls-rpt", "no TLS-RPT record");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_output_is_stable_and_parses() {
    let w = World::start().await;
    let r = run(&w.config(""), &["noauth.test", "--json"]).await;
    assert_eq!(r.code, 1, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("JSON report");
    assert_eq!(v["domain"], "noauth.test");
    let items = v["items"].as_array().unwrap();
    let spf = items
        .iter()
        .find(|i| i["check"] == "spf-herald")
        .expect("spf-herald item");
    assert_eq!(spf["status"], "fail");
    assert_eq!(spf["fix"]["name"], "noauth.test");
    assert_eq!(spf["fix"]["type"], "TXT");
    assert_eq!(
        spf["fix"]["value"],
        "v=spf1 ip4:198.51.100.1 ip4:192.0.2.10 ip6:2001:db8::10 -all"
    );
    let mx = items.iter().find(|i| i["check"] == "mx").unwrap();
    assert_eq!(mx["status"], "pass");
    assert!(mx["fix"].is_null());
    for i in items {
        assert!(i["finding"].as_str().is_some_and(|f| !f.is_empty()), "{i}");
    }
    assert_eq!(v["summary"]["status"], "fail");
    assert!(v["summary"]["fail"].as_u64().unwrap() >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verp_return_path_is_checked_and_softens_the_domain_spf() {
    let w = World::start().await;
    let cfg = w.config("[bounces]\nreturn_path_domain = \"bounces.relay.test\"\nverp_secret = \"0123456789abcdef0123456789abcdef\"\n");

    let r = run(&cfg, &["good.test"]).await;
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    r.line("warn", "return-path", "SPF cannot align for DMARC");
    r.line("pass", "return-path-mx", "relay.test (10)");
    r.line("pass", "return-path-spf-herald", "192.0.2.10");
    r.line("pass", "dmarc-alignment", "DKIM (d=good.test)");

    // The customer domain's SPF no longer decides herald's mail: a warning.
    let r = run(&cfg, &["nospf.test"]).await;
    r.line("warn", "spf", "uses the return path bounces.relay.test");
    assert!(
        !r.stdout
            .lines()
            .any(|l| l.trim_start().starts_with("FAIL  spf")),
        "{}",
        r.stdout
    );
    let r = run(&cfg, &["noauth.test"]).await;
    r.line(
        "warn",
        "spf-herald",
        "not needed while herald's mail uses the return path",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_that_does_not_answer_is_could_not_check_never_a_verdict() {
    let silent = SilentDns::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("herald.toml");
    std::fs::write(&path, config_text(silent.addr, "", "")).unwrap();
    let r = run(&path, &["silent.test", "--json"]).await;
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("JSON report");
    let items = v["items"].as_array().unwrap();
    assert!(!items.is_empty());
    for i in items {
        assert_eq!(i["status"], "warn", "{i}");
        assert!(
            i["finding"]
                .as_str()
                .unwrap()
                .starts_with("could not check: "),
            "{i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_usage_and_bad_config_exit_2() {
    let w = World::start().await;
    let r = run(&w.config(""), &["not a domain"]).await;
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("is not a domain name"), "{}", r.stderr);
    let bad = w.dir.path().join("bad.toml");
    std::fs::write(&bad, "[server]\nhostnme = \"x\"\n").unwrap();
    let r = run(&bad, &["good.test"]).await;
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("server.hostnme"), "{}", r.stderr);
}
