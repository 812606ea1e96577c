//! DANE for SMTP (RFC 7672) in delivery, end to end on loopback: a real
//! herald relay whose DANE resolver validates DNSSEC from the test zone's
//! own key (given as `[delivery.dane] trust_anchor`), an in-process DNS
//! server serving that zone signed, and MX hosts speaking SMTP with
//! STARTTLS and certificates their TLSA records name — or do not.

mod common;

use std::time::Duration;

use common::dane::{Mx, Tlsa, mx, start_mxs};
use common::dns::{TestDns, Zone, ZoneKey};
use common::https::{Answer, PolicyServer};
use common::mx::ip;
use common::pki::Pki;
use common::relay::{Setup, TestRelay, field};
use common::submission::SubmissionServer;
use herald::report::tlsrpt::UtcDay;

const WAIT: Duration = Duration::from_secs(30);
const DOMAIN: &str = "dane.test";

/// How the world around the relay is set up.
#[derive(Default)]
struct Options {
    /// Sign the zone with a key the relay does not trust: every answer is
    /// bogus to it.
    bogus: bool,
    /// An enforced MTA-STS policy listing these MX hosts.
    mta_sts: Option<&'static [&'static str]>,
    /// `[delivery.tls_policy]` lines; `[delivery.dane] enabled` unless set.
    tls_policy: &'static str,
    /// The MX hosts offer REQUIRETLS (RFC 8689).
    requiretls: bool,
}

struct World {
    _pki: Pki,
    _dns: TestDns,
    _policy: PolicyServer,
    _dir: tempfile::TempDir,
    mxs: Vec<SubmissionServer>,
    relay: TestRelay,
}

async fn world(mxs: &[Mx], options: Options) -> World {
    let pki = Pki::new();
    let policy_text = format!(
        "version: STSv1\nmode: enforce\n{}max_age: 86400\n",
        options
            .mta_sts
            .unwrap_or_default()
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
    if options.mta_sts.is_some() {
        zone = zone.txt(&format!("_mta-sts.{DOMAIN}"), "v=STSv1; id=20261208T1;");
    }
    let (zone, servers, port) = start_mxs(&pki, DOMAIN, mxs, zone, options.requiretls).await;
    let key = ZoneKey::generate();
    let dns = if options.bogus {
        TestDns::start_signed(zone, &ZoneKey::generate()).await
    } else {
        TestDns::start_signed(zone, &key).await
    };
    let dir = tempfile::tempdir().unwrap();
    let anchor = dir.path().join("anchor.keys");
    std::fs::write(&anchor, key.trust_anchor("test.")).unwrap();
    let mut setup = Setup::new(dns.addr, port);
    let enabled = options.tls_policy.is_empty();
    setup.extra = format!(
        "[delivery.dane]\nenabled = {enabled}\ntrust_anchor = \"{}\"\n\
         [delivery.mta_sts]\nca_file = \"{}\"\nhttps_port = {}\nfetch_timeout = \"5s\"\n\
         [delivery.tls_reports]\nenabled = true\nfrom = \"tls-reports@acme.test\"\n\
         [delivery.tls_policy]\n{}\n",
        anchor.display(),
        pki.ca_file.display(),
        policy.addr.port(),
        options.tls_policy,
    );
    let relay = TestRelay::start(setup).await;
    World {
        _pki: pki,
        _dns: dns,
        _policy: policy,
        _dir: dir,
        mxs: servers,
        relay,
    }
}

impl World {
    async fn send(&self) {
        let to = format!("carol@{DOMAIN}");
        let body = format!(
            "From: billing@acme.test\r\nTo: {to}\r\nSubject: Invoice 7\r\n\
             Message-ID: <inv-7@acme.test>\r\n\r\nPlease pay.\r\n"
        );
        self.relay
            .submit("billing@acme.test", &[&to], body.as_bytes())
            .await
            .assert_code(250);
    }

    /// Submits with `MAIL FROM:<...> REQUIRETLS`, after checking the relay
    /// offers it over TLS only.
    async fn send_requiretls(&self) {
        let mut plain = common::smtp::TestClient::connect(self.relay.submission).await;
        let ehlo = plain.ehlo("app.test").await;
        assert!(!ehlo.has_extension("REQUIRETLS"), "offered in clear");
        let mut c = self.relay.client().await;
        let ehlo = c.ehlo("app.test").await;
        assert!(ehlo.has_extension("REQUIRETLS"), "not offered over TLS");
        c.cmd("MAIL FROM:<billing@acme.test> REQUIRETLS")
            .await
            .assert_code(250);
        c.cmd(&format!("RCPT TO:<carol@{DOMAIN}>"))
            .await
            .assert_code(250);
        let body = "From: billing@acme.test\r\nTo: carol@dane.test\r\nSubject: Invoice 8\r\n\r\nConfidential.\r\n";
        c.data(body.as_bytes()).await.assert_code(250);
    }

    async fn first(&self, kind: &str) -> serde_json::Value {
        self.relay
            .wait_events(kind, 1, WAIT, |e| field(e, "event") == kind)
            .await
            .remove(0)
    }

    /// Sessions counted for TLS-RPT today (and yesterday, should the test
    /// run across midnight): (successes, failures).
    fn tls_report_totals(&self) -> (u64, u64) {
        let counts = self
            .relay
            .running()
            .queue
            .tls_reports()
            .expect("reports on");
        let today = UtcDay::today();
        let (a, b) = counts.totals(today);
        let (c, d) = counts.totals(today.prev());
        (a + c, b + d)
    }

    /// The first deferral's reply text, after checking it is a TLS one.
    async fn deferred(&self) -> String {
        let e = self.first("deferred").await;
        assert_eq!(field(&e, "classification"), "tls", "{e}");
        assert!(
            self.mxs.iter().all(|m| m.messages().is_empty()),
            "delivered anyway"
        );
        e["smtp"]["text"].as_str().unwrap_or_default().to_string()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dane_ee_match_delivers_whatever_the_name_on_the_certificate() {
    common::within(WAIT * 2, "DANE-EE match", async {
        // RFC 7672 §3.1.1: under DANE-EE the key is vouched for by the
        // signed DNS; the certificate's names and dates do not count.
        let w = world(
            &[mx(&["not-the-mx.example"], Tlsa::EeKey)],
            Options::default(),
        )
        .await;
        w.send().await;
        let e = w.first("delivered").await;
        assert_eq!(field(&e, "mx"), "mx1.dane.test", "{e}");
        assert_eq!(e["tls_info"]["verified"], "dane", "{e}");
        let page = w.relay.metrics_page().await;
        assert!(
            page.contains("herald_delivered_tls_verified_total{verified=\"dane\"} 1"),
            "{page}"
        );
        let policy = e["tls_info"]["policy"].as_str().unwrap_or_default();
        assert!(policy.starts_with("dane _"), "{e}");
        assert!(policy.ends_with("._tcp.mx1.dane.test"), "{e}");
        let got = w.mxs[0].wait_messages(1, WAIT).await;
        assert!(got[0].tls, "delivered in clear");
        assert_eq!(w.tls_report_totals(), (1, 0), "one session for TLS-RPT");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_no_tlsa_record_names_is_refused() {
    common::within(WAIT * 2, "TLSA mismatch", async {
        let w = world(&[mx(&["mx1.dane.test"], Tlsa::EeOther)], Options::default()).await;
        w.send().await;
        let text = w.deferred().await;
        assert!(
            text.contains("DANE for dane.test (TLSA records at _"),
            "{text}"
        );
        assert!(
            text.contains("no TLSA record matches the certificate"),
            "{text}"
        );
        let page = w.relay.metrics_page().await;
        assert!(
            page.contains("herald_tls_policy_failures_total{result=\"tlsa-invalid\"}"),
            "{page}"
        );
        let (ok, failed) = w.tls_report_totals();
        assert_eq!(ok, 0);
        assert!(failed >= 1, "the refused session counts for TLS-RPT");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dane_never_delivers_in_clear_when_starttls_is_missing() {
    common::within(WAIT * 2, "DANE, no STARTTLS", async {
        let w = world(&[mx(&[], Tlsa::EeOther)], Options::default()).await;
        w.send().await;
        let text = w.deferred().await;
        assert!(text.contains("offered no STARTTLS"), "{text}");
        assert!(text.contains("DANE for dane.test"), "{text}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bogus_dnssec_defers_and_never_downgrades() {
    common::within(WAIT * 2, "bogus", async {
        let w = world(
            &[mx(&["mx1.dane.test"], Tlsa::EeKey)],
            Options {
                bogus: true,
                ..Options::default()
            },
        )
        .await;
        w.send().await;
        let text = w.deferred().await;
        assert!(
            text.contains("MX records of dane.test fail DNSSEC validation (bogus"),
            "{text}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dane_wins_over_an_mta_sts_policy_the_host_would_fail() {
    common::within(WAIT * 2, "DANE over MTA-STS", async {
        // MTA-STS alone would refuse mx1 (a certificate for another name);
        // its TLSA record names the key, and RFC 8461 §2 lets DANE decide.
        let w = world(
            &[mx(&["other.example"], Tlsa::EeKey)],
            Options {
                mta_sts: Some(&["mx1.dane.test"]),
                ..Options::default()
            },
        )
        .await;
        w.send().await;
        let e = w.first("delivered").await;
        assert_eq!(e["tls_info"]["verified"], "dane", "{e}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dane_ta_record_anchors_a_chain_checked_for_the_mx_name() {
    common::within(WAIT * 2, "DANE-TA", async {
        let w = world(
            &[mx(&["mx1.dane.test"], Tlsa::TaIssuer)],
            Options::default(),
        )
        .await;
        w.send().await;
        let e = w.first("delivered").await;
        assert_eq!(e["tls_info"]["verified"], "dane", "{e}");

        // The same anchor, but a certificate for another name: refused.
        let w = world(
            &[mx(&["other.example"], Tlsa::TaIssuer)],
            Options::default(),
        )
        .await;
        w.send().await;
        let text = w.deferred().await;
        assert!(text.contains("not valid for name"), "{text}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_tlsa_records_still_require_tls() {
    common::within(WAIT * 2, "PKIX-EE only", async {
        // RFC 7672 §2.2: TLSA records, none usable: TLS, unauthenticated.
        let w = world(
            &[mx(&["other.example"], Tlsa::PkixOnly)],
            Options::default(),
        )
        .await;
        w.send().await;
        let e = w.first("delivered").await;
        assert_eq!(e["tls_info"]["verified"], "none", "{e}");
        assert!(w.mxs[0].wait_messages(1, WAIT).await[0].tls);

        let w = world(&[mx(&[], Tlsa::PkixOnly)], Options::default()).await;
        w.send().await;
        let text = w.deferred().await;
        assert!(text.contains("requires TLS; "), "{text}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_without_tlsa_get_opportunistic_tls_unless_the_policy_is_dane_only() {
    common::within(WAIT * 2, "no TLSA", async {
        let w = world(&[mx(&["other.example"], Tlsa::None)], Options::default()).await;
        w.send().await;
        let e = w.first("delivered").await;
        assert_eq!(e["tls_info"]["verified"], "none", "{e}");

        let w = world(
            &[mx(&["mx1.dane.test"], Tlsa::None)],
            Options {
                tls_policy: "\"dane.test\" = \"dane-only\"",
                ..Options::default()
            },
        )
        .await;
        w.send().await;
        let text = w.deferred().await;
        assert!(
            text.contains("dane-only) requires DANE; mail server mx1.dane.test has no DNSSEC-signed TLSA records"),
            "{text}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_policy_line_turns_dane_on_for_one_domain() {
    common::within(WAIT * 2, "tls_policy dane", async {
        let w = world(
            &[mx(&["mx1.dane.test"], Tlsa::EeOther)],
            Options {
                tls_policy: "\"dane.test\" = \"dane\"",
                ..Options::default()
            },
        )
        .await;
        w.send().await;
        let text = w.deferred().await;
        assert!(text.contains("no TLSA record matches"), "{text}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requiretls_goes_only_over_verified_tls_to_hosts_that_keep_it() {
    common::within(WAIT * 3, "REQUIRETLS", async {
        // DANE-verified, and the MX offers REQUIRETLS: delivered, with the
        // requirement passed on.
        let w = world(
            &[mx(&["mx1.dane.test"], Tlsa::EeKey)],
            Options {
                requiretls: true,
                ..Options::default()
            },
        )
        .await;
        w.send_requiretls().await;
        let e = w.first("delivered").await;
        assert_eq!(e["tls_info"]["verified"], "dane", "{e}");
        let got = w.mxs[0].wait_messages(1, WAIT).await;
        assert!(
            got[0].mail_command.ends_with(" REQUIRETLS"),
            "{}",
            got[0].mail_command
        );

        // Verified, but the MX would not keep the requirement: bounced.
        let w = world(&[mx(&["mx1.dane.test"], Tlsa::EeKey)], Options::default()).await;
        w.send_requiretls().await;
        let e = w.first("bounced").await;
        assert_eq!(e["smtp"]["enhanced"], "5.7.30", "{e}");
        assert!(w.mxs[0].messages().is_empty());

        // No verified path at all (no TLSA, no MTA-STS): bounced.
        let w = world(
            &[mx(&["mx1.dane.test"], Tlsa::None)],
            Options {
                requiretls: true,
                ..Options::default()
            },
        )
        .await;
        w.send_requiretls().await;
        let e = w.first("bounced").await;
        assert_eq!(e["smtp"]["enhanced"], "5.7.10", "{e}");
        let text = e["smtp"]["text"].as_str().unwrap_or_default();
        assert!(
            text.starts_with("REQUIRETLS: the sender asked for TLS with a verified certificate"),
            "{e}"
        );
        assert!(w.mxs[0].messages().is_empty());
    })
    .await;
}
