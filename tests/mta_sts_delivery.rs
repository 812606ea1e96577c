//! MTA-STS in delivery (RFC 8461 §4/§5), end to end on loopback: a real
//! herald relay, its resolver asking the in-process test DNS, policies
//! fetched over HTTPS from a local policy server with a test CA, and MX
//! hosts that speak SMTP with STARTTLS and certificates from that CA — or
//! without STARTTLS, or with a certificate for another name.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::dns::{TestDns, Zone};
use common::https::{Answer, PolicyServer};
use common::mx::ip;
use common::pki::Pki;
use common::relay::{Setup, TestRelay, field};
use common::submission::{Script, SubmissionServer, TlsMode};

const WAIT: Duration = Duration::from_secs(30);
const DOMAIN: &str = "sts.test";

/// How an MX host secures its sessions.
enum Mx {
    /// STARTTLS with a certificate for these names.
    Tls(&'static [&'static str]),
    /// No STARTTLS offered (or stripped by someone on the path).
    Plain,
    /// STARTTLS with a certificate from the trusted CA that expired.
    Expired(&'static [&'static str]),
    /// STARTTLS with a certificate that is its own issuer.
    SelfSigned(&'static [&'static str]),
}

struct World {
    /// Its CA file must outlive the relay that reads it.
    _pki: Pki,
    _dns: TestDns,
    policy_server: PolicyServer,
    mxs: Vec<SubmissionServer>,
    relay: TestRelay,
}

/// `sts.test` with one MX per entry of `mxs` (mx1, mx2, ... in order of
/// preference, on 127.0.0.2, .3, ... and one port), publishing `policy`.
async fn world(mode: &str, listed: &[&str], mxs: &[Mx]) -> World {
    world_with(mode, listed, mxs, "").await
}

/// [`world`] without a published policy when `mode` is empty, and with
/// `tls_policy` lines in `[delivery.tls_policy]`.
async fn world_with(mode: &str, listed: &[&str], mxs: &[Mx], tls_policy: &str) -> World {
    world_reporting(mode, listed, mxs, tls_policy, false).await
}

/// [`world_with`]; with `tls_reports`, the relay sends TLS reports and
/// sts.test asks for them by mail at tlsrpt@sts.test.
async fn world_reporting(
    mode: &str,
    listed: &[&str],
    mxs: &[Mx],
    tls_policy: &str,
    tls_reports: bool,
) -> World {
    let pki = Pki::new();
    let policy_text = format!(
        "version: STSv1\nmode: {mode}\n{}max_age: 86400\n",
        listed
            .iter()
            .map(|m| format!("mx: {m}\n"))
            .collect::<String>()
    );
    let policy = PolicyServer::start(
        ip(9),
        pki.acceptor(&[&format!("mta-sts.{DOMAIN}")]),
        Answer::policy(&policy_text),
    )
    .await;
    let mut zone = Zone::new("test.").a(&format!("mta-sts.{DOMAIN}"), ip(9));
    if tls_reports {
        zone = zone.txt(
            &format!("_smtp._tls.{DOMAIN}"),
            &format!("v=TLSRPTv1; rua=mailto:tlsrpt@{DOMAIN}"),
        );
    }
    if !mode.is_empty() {
        zone = zone.txt(&format!("_mta-sts.{DOMAIN}"), "v=STSv1; id=20261207T1;");
    }
    let mut servers = Vec::new();
    let mut port = 0;
    for (n, mx) in mxs.iter().enumerate() {
        let host = format!("mx{}.{DOMAIN}", n + 1);
        let addr = ip(2 + n as u8);
        zone = zone.mx(DOMAIN, 10 * (n as u16 + 1), &host).a(&host, addr);
        let tls = match mx {
            Mx::Tls(names) => TlsMode::Starttls(pki.acceptor(names)),
            Mx::Plain => TlsMode::None,
            Mx::Expired(names) => TlsMode::Starttls(pki.expired_acceptor(names)),
            Mx::SelfSigned(names) => TlsMode::Starttls(common::pki::self_signed_for(names)),
        };
        let server = SubmissionServer::start_at(
            SocketAddr::from((addr, port)),
            Script {
                tls,
                open_relay: true,
                ..Script::default()
            },
        )
        .await;
        port = server.port();
        servers.push(server);
    }
    let dns = TestDns::start(zone).await;
    let mut setup = Setup::new(dns.addr, port);
    setup.extra = format!(
        "[delivery.mta_sts]\nca_file = \"{}\"\nhttps_port = {}\nfetch_timeout = \"5s\"\n\
         [delivery.tls_policy]\n{tls_policy}\n\
         [delivery.tls_reports]\nenabled = {tls_reports}\nfrom = \"tls-reports@acme.test\"\n",
        pki.ca_file.display(),
        policy.addr.port()
    );
    let relay = TestRelay::start(setup).await;
    World {
        _pki: pki,
        _dns: dns,
        policy_server: policy,
        mxs: servers,
        relay,
    }
}

fn invoice(to: &str) -> Vec<u8> {
    format!(
        "From: billing@acme.test\r\nTo: {to}\r\nSubject: Invoice 12\r\n\
         Message-ID: <inv-12@acme.test>\r\n\r\nPlease pay.\r\n"
    )
    .into_bytes()
}

impl World {
    async fn send(&self, to: &str) {
        self.relay
            .submit("billing@acme.test", &[to], &invoice(to))
            .await
            .assert_code(250);
    }

    async fn first(&self, kind: &str) -> serde_json::Value {
        self.relay
            .wait_events(kind, 1, WAIT, |e| field(e, "event") == kind)
            .await
            .remove(0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_with_a_valid_certificate_delivers_over_tls() {
    common::within(WAIT * 2, "enforce, valid", async {
        let w = world("enforce", &["mx1.sts.test"], &[Mx::Tls(&["mx1.sts.test"])]).await;
        w.send("carol@sts.test").await;
        let e = w.first("delivered").await;
        assert_eq!(field(&e, "mx"), "mx1.sts.test", "{e}");
        assert_eq!(e["tls"], "TLSv1.3", "{e}");
        let info = &e["tls_info"];
        assert_eq!(info["version"], "TLSv1.3", "{e}");
        assert!(
            info["cipher"]
                .as_str()
                .is_some_and(|c| c.starts_with("TLS_")),
            "{e}"
        );
        assert_eq!(info["verified"], "mta-sts", "{e}");
        assert_eq!(info["policy"], "mta-sts enforce id 20261207T1", "{e}");
        let got = w.mxs[0].wait_messages(1, WAIT).await;
        assert!(got[0].tls, "delivered in clear");
        let page = w.relay.metrics_page().await;
        assert!(
            page.contains("herald_delivered_tls_verified_total{verified=\"mta-sts\"} 1"),
            "{page}"
        );
        assert!(page.contains("herald_mta_sts_cached_policies 1"), "{page}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_never_delivers_in_clear_when_starttls_is_missing() {
    common::within(WAIT * 2, "enforce, no STARTTLS", async {
        let w = world("enforce", &["mx1.sts.test"], &[Mx::Plain]).await;
        w.send("carol@sts.test").await;
        let e = w.first("deferred").await;
        let text = e["smtp"]["text"].as_str().unwrap_or_default();
        assert!(
            text.contains("MTA-STS policy of sts.test (enforce, id 20261207T1)")
                && text.contains("offered no STARTTLS"),
            "{e}"
        );
        assert_eq!(e["smtp"]["enhanced"], "4.7.10", "{e}");
        assert_eq!(field(&e, "classification"), "tls", "{e}");
        // The retry (a second after) meets the same refusal.
        w.relay
            .wait_events("second deferral", 2, WAIT, |e| {
                field(e, "event") == "deferred"
            })
            .await;
        assert!(w.mxs[0].messages().is_empty(), "delivered in clear");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_refuses_a_certificate_for_another_name() {
    common::within(WAIT * 2, "enforce, wrong name", async {
        let w = world("enforce", &["mx1.sts.test"], &[Mx::Tls(&["other.example"])]).await;
        w.send("carol@sts.test").await;
        let e = w.first("deferred").await;
        let text = e["smtp"]["text"].as_str().unwrap_or_default();
        assert!(
            text.contains("requires TLS with a certificate valid for mx1.sts.test")
                && text.contains("handshake"),
            "{e}"
        );
        assert_eq!(e["smtp"]["enhanced"], "4.7.5", "{e}");
        assert!(w.mxs[0].messages().is_empty(), "delivered unverified");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_skips_mail_servers_the_policy_does_not_list() {
    common::within(WAIT * 2, "enforce, unlisted MX", async {
        // mx1 (preferred) is not in the policy; mx2 is.
        let w = world(
            "enforce",
            &["mx2.sts.test"],
            &[Mx::Tls(&["mx1.sts.test"]), Mx::Tls(&["mx2.sts.test"])],
        )
        .await;
        w.send("carol@sts.test").await;
        let e = w.first("delivered").await;
        assert_eq!(field(&e, "mx"), "mx2.sts.test", "{e}");
        assert_eq!(w.mxs[0].connections(), 0, "an unlisted MX was contacted");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testing_mode_delivers_as_before() {
    common::within(WAIT * 2, "testing", async {
        let w = world("testing", &["mx1.sts.test"], &[Mx::Plain]).await;
        w.send("carol@sts.test").await;
        let e = w.first("delivered").await;
        let got = w.mxs[0].wait_messages(1, WAIT).await;
        assert!(!got[0].tls);
        // The event still says what enforce would have refused.
        assert!(e["tls_info"].is_null(), "no TLS, no tls_info: {e}");
    })
    .await;
}

/// Testing mode checks the certificate as enforce would and notes the
/// failure in the event, delivering anyway (RFC 8461 §5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testing_mode_notes_what_enforce_would_refuse() {
    common::within(WAIT * 2, "testing, wrong name", async {
        let w = world(
            "testing",
            &["mx1.sts.test"],
            &[Mx::Tls(&["other.example"])],
        )
        .await;
        w.send("carol@sts.test").await;
        let e = w.first("delivered").await;
        let info = &e["tls_info"];
        assert_eq!(info["verified"], "none", "{e}");
        assert_eq!(info["policy"], "mta-sts testing id 20261207T1", "{e}");
        let failure = info["policy_failure"].as_str().unwrap_or_default();
        assert!(
            failure.starts_with("MTA-STS policy of sts.test (testing, id 20261207T1) would refuse this session: the certificate of mx1.sts.test"),
            "{e}"
        );
        assert!(w.mxs[0].wait_messages(1, WAIT).await[0].tls);

        // A certificate enforce would accept: nothing to note.
        let w = world("testing", &["mx1.sts.test"], &[Mx::Tls(&["mx1.sts.test"])]).await;
        w.send("carol@sts.test").await;
        let e = w.first("delivered").await;
        assert_eq!(e["tls_info"]["policy"], "mta-sts testing id 20261207T1", "{e}");
        assert!(e["tls_info"]["policy_failure"].is_null(), "{e}");
    })
    .await;
}

/// `[delivery.tls_policy]`: a domain that publishes nothing can still be
/// held to verified TLS by the postmaster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_verify_level_refuses_a_certificate_for_another_name() {
    common::within(WAIT * 2, "tls_policy verify", async {
        let w = world_with(
            "",
            &[],
            &[Mx::Tls(&["other.example"])],
            "\"sts.test\" = \"verify\"",
        )
        .await;
        w.send("carol@sts.test").await;
        let e = w.first("deferred").await;
        let text = e["smtp"]["text"].as_str().unwrap_or_default();
        assert!(
            text.starts_with(
                "TLS policy for sts.test (delivery.tls_policy: verify) requires TLS with a certificate valid for mx1.sts.test;"
            ),
            "{e}"
        );
        assert!(w.mxs[0].messages().is_empty(), "delivered unverified");
    })
    .await;
}

/// "encrypt": TLS required, any certificate; a parent entry covers
/// subdomains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_encrypt_level_needs_tls_but_no_name() {
    common::within(WAIT * 2, "tls_policy encrypt", async {
        let w = world_with(
            "",
            &[],
            &[Mx::Tls(&["other.example"])],
            "\".test\" = \"encrypt\"",
        )
        .await;
        w.send("carol@sts.test").await;
        let e = w.first("delivered").await;
        assert_eq!(e["tls_info"]["verified"], "none", "{e}");
        assert_eq!(e["tls_info"]["policy"], "tls_policy encrypt", "{e}");
        assert!(w.mxs[0].wait_messages(1, WAIT).await[0].tls);

        let w = world_with("", &[], &[Mx::Plain], "\"sts.test\" = \"encrypt\"").await;
        w.send("carol@sts.test").await;
        let e = w.first("deferred").await;
        let text = e["smtp"]["text"].as_str().unwrap_or_default();
        assert!(
            text.contains("(delivery.tls_policy: encrypt) requires TLS;")
                && text.contains("offered no STARTTLS"),
            "{e}"
        );
        assert!(w.mxs[0].messages().is_empty(), "delivered in clear");
    })
    .await;
}

/// A config line never weakens a published policy, unless written with
/// "!".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weaker_config_level_needs_a_bang_to_override_a_published_policy() {
    common::within(WAIT * 2, "tls_policy vs MTA-STS", async {
        let w = world_with(
            "enforce",
            &["mx1.sts.test"],
            &[Mx::Plain],
            "\"sts.test\" = \"may\"",
        )
        .await;
        w.send("carol@sts.test").await;
        let e = w.first("deferred").await;
        assert!(
            e["smtp"]["text"]
                .as_str()
                .unwrap_or_default()
                .starts_with("MTA-STS policy of sts.test (enforce"),
            "{e}"
        );
        assert!(w.mxs[0].messages().is_empty(), "delivered in clear");

        let w = world_with(
            "enforce",
            &["mx1.sts.test"],
            &[Mx::Plain],
            "\"sts.test\" = \"may!\"",
        )
        .await;
        w.send("carol@sts.test").await;
        w.first("delivered").await;
        assert!(!w.mxs[0].wait_messages(1, WAIT).await[0].tls);
    })
    .await;
}

/// A record whose policy cannot be had (here: the host redirects, which
/// RFC 8461 forbids following): delivered as without a policy, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_policy_is_delivered_without_and_counted() {
    common::within(WAIT * 2, "policy fetch error", async {
        let w = world("enforce", &["mx1.sts.test"], &[Mx::Plain]).await;
        w.policy_server.set(Answer::redirect(
            "https://elsewhere.test/.well-known/mta-sts.txt",
        ));
        w.send("carol@sts.test").await;
        w.first("delivered").await;
        assert!(!w.mxs[0].wait_messages(1, WAIT).await[0].tls);
        let page = w.relay.metrics_page().await;
        assert!(
            page.contains("herald_mta_sts_failures_total{result=\"sts-policy-fetch-error\"} 1"),
            "{page}"
        );
    })
    .await;
}

/// A TLS report may be about the very failure that makes the domain's
/// policy refuse its MX: it goes anyway, opportunistically, on a session
/// of its own, while the domain's other mail keeps waiting (RFC 8460 §3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_report_is_delivered_where_the_policy_it_reports_on_fails() {
    common::within(WAIT * 2, "TLS report through a failing policy", async {
        let w = world_reporting("enforce", &["mx1.sts.test"], &[Mx::Plain], "", true).await;
        w.send("carol@sts.test").await;
        w.first("deferred").await;
        let sender = w.relay.running().tls_reports.clone().expect("reports on");
        let today = herald::report::tlsrpt::UtcDay::today();
        let sent = common::within(WAIT, "sending the report", sender.send_day(today)).await;
        assert_eq!(sent.sent, 1, "{sent:?}");
        let got = w.mxs[0].wait_messages(1, WAIT).await;
        assert_eq!(got[0].rcpts, vec!["tlsrpt@sts.test".to_string()]);
        let text = String::from_utf8_lossy(&got[0].data);
        assert!(text.contains("TLS-Report-Domain: sts.test"), "{text}");
        assert!(!got[0].tls);
        // The invoice itself still waits for TLS.
        assert!(
            w.mxs[0]
                .messages()
                .iter()
                .all(|m| m.rcpts != vec!["carol@sts.test".to_string()])
        );
    })
    .await;
}

/// Under enforce, an expired certificate and a self-signed one are refused
/// like a wrong name, each named for what it is (TLS-RPT result types).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_refuses_expired_and_self_signed_certificates() {
    common::within(WAIT * 3, "enforce, expired / self-signed", async {
        for (mx, says, result) in [
            (
                Mx::Expired(&["mx1.sts.test"]),
                "certificate expired",
                "certificate-expired",
            ),
            (
                Mx::SelfSigned(&["mx1.sts.test"]),
                "UnknownIssuer",
                "certificate-not-trusted",
            ),
        ] {
            let w = world("enforce", &["mx1.sts.test"], &[mx]).await;
            w.send("carol@sts.test").await;
            let e = w.first("deferred").await;
            let text = e["smtp"]["text"].as_str().unwrap_or_default();
            assert!(text.contains("the TLS handshake with mx1.sts.test"), "{e}");
            assert!(text.contains(says), "{e}");
            assert_eq!(e["smtp"]["enhanced"], "4.7.5", "{e}");
            assert!(w.mxs[0].messages().is_empty(), "delivered anyway");
            let page = w.relay.metrics_page().await;
            assert!(
                page.contains(&format!(
                    "herald_tls_policy_failures_total{{result=\"{result}\"}}"
                )),
                "{page}"
            );
        }
    })
    .await;
}
