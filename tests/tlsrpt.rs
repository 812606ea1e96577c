//! TLS reports (RFC 8460) end to end over real protocols on loopback: a
//! relay's counts (fed through the API delivery uses) survive a restart;
//! the day's reports then go to the `_smtp._tls` record's URIs from an
//! in-process DNS server: a `mailto:` URI gets a DKIM-signed
//! multipart/report message through the relay's queue to an MX sink, an
//! `https:` URI a POST to an HTTPS server with a certificate from a test
//! CA. The JSON is checked against RFC 8460 §4.4's schema rules, and a
//! second trigger sends nothing.

mod common;

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use common::dns::{TestDns, Zone};
use common::https::RecordingServer;
use common::mx::{MxSink, SinkReply, ip, reserve_port};
use common::pki::Pki;
use common::relay::{Setup, TestRelay};
use common::within;
use herald::config::DkimAlgorithm;
use herald::policy::dkim;
use herald::queue::tlsrpt::SendSummary;
use herald::report::tlsrpt::{TlsRptCounts, UtcDay};
use mail_auth::DkimResult;
use mail_auth::report::tlsrpt::{FailureDetails, PolicyDetails, PolicyType, ResultType};
use mail_parser::{MessageParser, MimeHeaders, PartType};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(30);
const RUA_MAIL: &str = "tlsrpt@reports.test";
const RUA_HOST: &str = "tlsrpt.reports.test";

/// The RFC 8460 §4.3 result types.
const RESULT_TYPES: [&str; 11] = [
    "starttls-not-supported",
    "certificate-host-mismatch",
    "certificate-expired",
    "certificate-not-trusted",
    "validation-failure",
    "tlsa-invalid",
    "dnssec-invalid",
    "dane-required",
    "sts-policy-fetch-error",
    "sts-policy-invalid",
    "sts-webpki-invalid",
];

struct World {
    dns: TestDns,
    sink: MxSink,
    web: RecordingServer,
    relay: TestRelay,
    _pki: Pki,
    _key_dir: tempfile::TempDir,
}

/// `sts.test` (MTA-STS) takes reports by mail and HTTPS, `dane.test`
/// (DANE) by mail only, `quiet.test` publishes no TLS-RPT record; the mail
/// goes to `reports.test`, whose MX is a sink on 127.0.0.120; the HTTPS
/// receiver is on 127.0.0.121. The relay signs with a `relay.test` key.
async fn world() -> World {
    let pki = Pki::new();
    let web = RecordingServer::start(ip(121), pki.acceptor(&[RUA_HOST])).await;
    let (port, mut listeners) = reserve_port(&[ip(120)]);
    let sink = MxSink::start_on(listeners.pop().unwrap(), |_, _| SinkReply::Accept).unwrap();

    let key_dir = tempfile::tempdir().unwrap();
    let key = dkim::generate(DkimAlgorithm::RsaSha256, 2048).expect("key generation");
    let key_path = key_dir.path().join("relay.test.key");
    dkim::write_key_file(&key_path, &key.pem).expect("write key");

    let https_uri = format!("https://{RUA_HOST}:{}/v1/reports", web.addr.port());
    let zone = Zone::new("test.")
        .txt(
            "_smtp._tls.sts.test",
            &format!("v=TLSRPTv1; rua=mailto:{RUA_MAIL},{https_uri}"),
        )
        .txt(
            "_smtp._tls.dane.test",
            &format!("v=TLSRPTv1;rua=mailto:{RUA_MAIL}"),
        )
        .txt("_smtp._tls.quiet.test", "v=spf1 -all")
        .mx("reports.test", 10, "mx.reports.test")
        .a("mx.reports.test", ip(120))
        .a(RUA_HOST, ip(121))
        .txt("tls1._domainkey.relay.test", &key.txt_record());
    let dns = TestDns::start(zone).await;

    let mut setup = Setup::new(dns.addr, port);
    setup.extra = format!(
        "[delivery.tls_reports]\nenabled = true\nfrom = \"tls-reports@relay.test\"\n\
         organization = \"Relay Test Org\"\nhttps_timeout = \"5s\"\nca_file = \"{ca}\"\n\n\
         [[dkim]]\ndomain = \"relay.test\"\nselector = \"tls1\"\nalgorithm = \"rsa-sha256\"\n\
         key = \"{key}\"\n",
        ca = pki.ca_file.display(),
        key = key_path.display(),
    );
    let relay = TestRelay::start(setup).await;
    World {
        dns,
        sink,
        web,
        relay,
        _pki: pki,
        _key_dir: key_dir,
    }
}

fn counts(relay: &TestRelay) -> &TlsRptCounts {
    relay
        .running()
        .queue
        .tls_reports()
        .expect("TLS reports are enabled")
}

fn sts_policy() -> PolicyDetails {
    PolicyDetails {
        policy_type: PolicyType::Sts,
        policy_string: vec![
            "version: STSv1".into(),
            "mode: enforce".into(),
            "mx: mx.sts.test".into(),
            "max_age: 86400".into(),
        ],
        policy_domain: "sts.test".into(),
        mx_host: vec!["mx.sts.test".into()],
    }
}

fn tlsa_policy() -> PolicyDetails {
    PolicyDetails {
        policy_type: PolicyType::Tlsa,
        policy_string: vec![
            "3 1 1 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".into(),
        ],
        policy_domain: "dane.test".into(),
        mx_host: vec!["mx.dane.test".into()],
    }
}

fn failure(result: ResultType, mx: &str, mx_ip: Ipv4Addr) -> FailureDetails {
    let mut d = FailureDetails::new(result)
        .with_receiving_mx_hostname(mx)
        .with_receiving_ip(IpAddr::V4(mx_ip));
    d.sending_mta_ip = Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)));
    // Ignored: each call is one session.
    d.failed_session_count = 99;
    d
}

/// A day of sessions: sts.test 5 good, 2 without STARTTLS, 1 with a wrong
/// certificate name; dane.test 3 good, 1 wrong name; quiet.test 1 good.
fn record_day(c: &TlsRptCounts) {
    let sts = sts_policy();
    let mx_ip = Ipv4Addr::new(198, 51, 100, 7);
    for _ in 0..5 {
        c.success(&sts);
    }
    for _ in 0..2 {
        c.failure(
            &sts,
            failure(ResultType::StartTlsNotSupported, "mx.sts.test", mx_ip),
        );
    }
    c.failure(
        &sts,
        failure(ResultType::CertificateHostMismatch, "mx.sts.test", mx_ip),
    );
    let tlsa = tlsa_policy();
    for _ in 0..3 {
        c.success(&tlsa);
    }
    c.failure(
        &tlsa,
        failure(ResultType::CertificateHostMismatch, "mx.dane.test", mx_ip),
    );
    c.success(&PolicyDetails::new(PolicyType::Sts, "quiet.test"));
}

/// Checks `v` against RFC 8460 §4.4's schema: required members and their
/// types, only the members the schema names, no nulls, RFC 3339 dates,
/// policy and result types from the RFC's lists, counts that add up.
fn check_schema(v: &Value) {
    fn keys_within(obj: &serde_json::Map<String, Value>, allowed: &[&str], at: &str) {
        for k in obj.keys() {
            assert!(
                allowed.contains(&k.as_str()),
                "{at}: member {k:?} not in the schema"
            );
        }
    }
    fn string<'a>(obj: &'a serde_json::Map<String, Value>, key: &str, at: &str) -> &'a str {
        obj.get(key)
            .unwrap_or_else(|| panic!("{at}: required {key:?} missing"))
            .as_str()
            .unwrap_or_else(|| panic!("{at}: {key:?} must be a string"))
    }
    fn count(obj: &serde_json::Map<String, Value>, key: &str, at: &str) -> u64 {
        obj.get(key)
            .unwrap_or_else(|| panic!("{at}: required {key:?} missing"))
            .as_u64()
            .unwrap_or_else(|| panic!("{at}: {key:?} must be a non-negative integer"))
    }
    fn strings(v: Option<&Value>, at: &str) {
        if let Some(v) = v {
            let items = v
                .as_array()
                .unwrap_or_else(|| panic!("{at}: must be an array"));
            assert!(items.iter().all(Value::is_string), "{at}: strings only");
        }
    }
    fn no_nulls(v: &Value, at: &str) {
        match v {
            Value::Null => panic!("{at}: null"),
            Value::Object(m) => m
                .iter()
                .for_each(|(k, v)| no_nulls(v, &format!("{at}.{k}"))),
            Value::Array(a) => a
                .iter()
                .enumerate()
                .for_each(|(i, v)| no_nulls(v, &format!("{at}[{i}]"))),
            _ => {}
        }
    }
    // RFC 3339 §5.6 date-time: YYYY-MM-DDTHH:MM:SS[.frac](Z|+HH:MM|-HH:MM);
    // returns Unix seconds.
    let rfc3339 = |s: &str, at: &str| {
        let b = s.as_bytes();
        let digits =
            |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
        let mut rest = 19;
        if b.get(rest) == Some(&b'.') {
            rest += 1;
            while b.get(rest).is_some_and(u8::is_ascii_digit) {
                rest += 1;
            }
        }
        let zone_ok = match b.get(rest) {
            Some(b'Z') => b.len() == rest + 1,
            Some(b'+' | b'-') => {
                b.len() == rest + 6
                    && digits(rest + 1..rest + 3)
                    && b[rest + 3] == b':'
                    && digits(rest + 4..rest + 6)
            }
            _ => false,
        };
        let ok = digits(0..4)
            && b.get(4) == Some(&b'-')
            && digits(5..7)
            && b.get(7) == Some(&b'-')
            && digits(8..10)
            && b.get(10) == Some(&b'T')
            && digits(11..13)
            && b.get(13) == Some(&b':')
            && digits(14..16)
            && b.get(16) == Some(&b':')
            && digits(17..19)
            && zone_ok;
        assert!(ok, "{at}: {s:?} is not an RFC 3339 date-time");
        mail_parser::DateTime::parse_rfc3339(s)
            .unwrap_or_else(|| panic!("{at}: {s:?} does not parse"))
            .to_timestamp()
    };

    no_nulls(v, "report");
    let top = v.as_object().expect("the report is an object");
    keys_within(
        top,
        &[
            "organization-name",
            "date-range",
            "contact-info",
            "report-id",
            "policies",
        ],
        "report",
    );
    for key in ["organization-name", "contact-info", "report-id"] {
        assert!(!string(top, key, "report").is_empty(), "{key} empty");
    }
    let range = top
        .get("date-range")
        .and_then(Value::as_object)
        .expect("date-range object");
    keys_within(range, &["start-datetime", "end-datetime"], "date-range");
    let start = rfc3339(
        string(range, "start-datetime", "date-range"),
        "start-datetime",
    );
    let end = rfc3339(string(range, "end-datetime", "date-range"), "end-datetime");
    assert!(
        start < end,
        "date-range: start {start} not before end {end}"
    );
    let policies = top
        .get("policies")
        .and_then(Value::as_array)
        .expect("policies array");
    assert!(!policies.is_empty(), "policies empty");
    for (i, p) in policies.iter().enumerate() {
        let at = format!("policies[{i}]");
        let p = p.as_object().expect("policy object");
        keys_within(p, &["policy", "summary", "failure-details"], &at);
        let policy = p.get("policy").and_then(Value::as_object).expect("policy");
        keys_within(
            policy,
            &["policy-type", "policy-string", "policy-domain", "mx-host"],
            &at,
        );
        let kind = string(policy, "policy-type", &at);
        assert!(
            ["tlsa", "sts", "no-policy-found"].contains(&kind),
            "{at}: policy-type {kind:?}"
        );
        assert!(!string(policy, "policy-domain", &at).is_empty());
        strings(policy.get("policy-string"), &format!("{at}.policy-string"));
        strings(policy.get("mx-host"), &format!("{at}.mx-host"));
        let summary = p
            .get("summary")
            .and_then(Value::as_object)
            .expect("summary");
        keys_within(
            summary,
            &[
                "total-successful-session-count",
                "total-failure-session-count",
            ],
            &at,
        );
        count(summary, "total-successful-session-count", &at);
        let failures = count(summary, "total-failure-session-count", &at);
        let mut itemized = 0;
        if let Some(details) = p.get("failure-details") {
            for (j, d) in details
                .as_array()
                .expect("failure-details array")
                .iter()
                .enumerate()
            {
                let at = format!("{at}.failure-details[{j}]");
                let d = d.as_object().expect("failure detail object");
                keys_within(
                    d,
                    &[
                        "result-type",
                        "sending-mta-ip",
                        "receiving-mx-hostname",
                        "receiving-mx-helo",
                        "receiving-ip",
                        "failed-session-count",
                        "additional-information",
                        "failure-reason-code",
                    ],
                    &at,
                );
                let t = string(d, "result-type", &at);
                assert!(RESULT_TYPES.contains(&t), "{at}: result-type {t:?}");
                itemized += count(d, "failed-session-count", &at);
                for ip_key in ["sending-mta-ip", "receiving-ip"] {
                    if d.contains_key(ip_key) {
                        string(d, ip_key, &at)
                            .parse::<IpAddr>()
                            .unwrap_or_else(|e| panic!("{at}.{ip_key}: {e}"));
                    }
                }
                for text in [
                    "receiving-mx-hostname",
                    "receiving-mx-helo",
                    "additional-information",
                    "failure-reason-code",
                ] {
                    if d.contains_key(text) {
                        string(d, text, &at);
                    }
                }
            }
        }
        assert_eq!(
            itemized, failures,
            "{at}: failure details add up to the total"
        );
    }
}

/// The policy of `kind` in a report: (successes, failures, failures by
/// result type).
fn summary(report: &Value, kind: &str) -> (u64, u64, Vec<(String, u64)>) {
    let p = report["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["policy"]["policy-type"] == kind)
        .unwrap_or_else(|| panic!("no {kind} policy in {report}"));
    let mut by_type: Vec<(String, u64)> = p["failure-details"]
        .as_array()
        .map(|d| {
            d.iter()
                .map(|d| {
                    (
                        d["result-type"].as_str().unwrap().to_string(),
                        d["failed-session-count"].as_u64().unwrap(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    by_type.sort();
    (
        p["summary"]["total-successful-session-count"]
            .as_u64()
            .unwrap(),
        p["summary"]["total-failure-session-count"]
            .as_u64()
            .unwrap(),
        by_type,
    )
}

fn gunzip(data: &[u8]) -> Value {
    let mut json = String::new();
    mail_auth::flate2::read::GzDecoder::new(data)
        .read_to_string(&mut json)
        .expect("the report is gzip");
    serde_json::from_str(&json).expect("the report is JSON")
}

/// The mailed report: its header fields checked, its JSON returned.
fn mailed_report(data: &[u8], domain: &str) -> Value {
    let msg = MessageParser::default().parse(data).expect("report parses");
    let ct = msg.content_type().expect("content type");
    assert_eq!((ct.ctype(), ct.subtype()), ("multipart", Some("report")));
    assert_eq!(ct.attribute("report-type"), Some("tlsrpt"));
    let header = |name: &str| {
        msg.header_raw(name)
            .unwrap_or_else(|| panic!("no {name} header"))
            .trim()
            .to_string()
    };
    assert!(header("From").contains("tls-reports@relay.test"));
    assert!(header("To").contains(RUA_MAIL));
    assert_eq!(header("TLS-Report-Domain"), domain);
    assert_eq!(header("TLS-Report-Submitter"), "relay.test");
    let subject = msg.subject().expect("Subject");
    assert!(
        subject.starts_with(&format!(
            "Report Domain: {domain} Submitter: relay.test Report-ID: <"
        )),
        "{subject}"
    );
    assert!(msg.date().is_some(), "Date header");
    assert!(msg.message_id().is_some(), "Message-ID header");
    let part = msg
        .parts
        .iter()
        .find(|p| {
            p.content_type()
                .is_some_and(|c| c.ctype() == "application" && c.subtype() == Some("tlsrpt+gzip"))
        })
        .expect("an application/tlsrpt+gzip part");
    match &part.body {
        PartType::Binary(b) | PartType::InlineBinary(b) => gunzip(b),
        other => panic!("tlsrpt+gzip body: {other:?}"),
    }
}

async fn metrics_page(relay: &TestRelay) -> String {
    common::http::request(
        relay.admin,
        "GET",
        "/metrics",
        Some(relay.admin_token),
        None,
    )
    .await
    .text()
}

async fn send_day(relay: &TestRelay, day: UtcDay) -> SendSummary {
    let sender = relay
        .running()
        .tls_reports
        .clone()
        .expect("TLS report sender running");
    within(LIMIT, "sending the day's TLS reports", sender.send_day(day)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_days_reports_survive_a_restart_and_go_out_once_by_mail_and_https() {
    let mut w = world().await;
    let day = UtcDay::today();
    record_day(counts(&w.relay));
    assert_eq!(counts(&w.relay).totals(day), (9, 4));

    w.relay.restart().await;
    assert_eq!(
        counts(&w.relay).totals(day),
        (9, 4),
        "the counts survive a restart"
    );

    let first = send_day(&w.relay, day).await;
    assert_eq!(
        (first.sent, first.failed, first.no_record),
        (3, 0, 1),
        "{first:?}"
    );

    // (b) https: one POST of the gzipped sts.test report.
    let posts = within(LIMIT, "the HTTPS report", w.web.wait_requests(1)).await;
    assert_eq!(posts.len(), 1);
    let post = &posts[0];
    assert!(
        post.head.starts_with("POST /v1/reports HTTP/1.1"),
        "{}",
        post.head
    );
    assert_eq!(post.header("Content-Type"), Some("application/tlsrpt+gzip"));
    let posted = gunzip(&post.body);
    check_schema(&posted);

    // (a) mailto: one message per domain, through the queue, signed.
    let sink = &w.sink;
    let mails = tokio::task::block_in_place(|| sink.wait_for_messages(2, LIMIT));
    assert_eq!(mails.len(), 2);
    let auth = common::dkim::verifier(w.dns.addr);
    let mut by_domain = std::collections::BTreeMap::new();
    for m in &mails {
        assert_eq!(m.from, "tls-reports@relay.test");
        assert_eq!(m.rcpts, vec![RUA_MAIL.to_string()]);
        let results = common::dkim::verify(&auth, &m.data).await;
        assert!(
            results
                .iter()
                .any(|(d, s, r)| d == "relay.test" && s == "tls1" && *r == DkimResult::Pass),
            "DKIM: {results:?}"
        );
        let domain = MessageParser::default()
            .parse(&m.data[..])
            .and_then(|p| {
                p.header_raw("TLS-Report-Domain")
                    .map(|v| v.trim().to_string())
            })
            .expect("TLS-Report-Domain");
        let report = mailed_report(&m.data, &domain);
        check_schema(&report);
        by_domain.insert(domain, report);
    }
    let sts = &by_domain["sts.test"];
    let dane = &by_domain["dane.test"];
    assert_eq!(*sts, posted, "the same report by mail and by HTTPS");

    // (c) the content: right totals, the RFC's fields.
    assert_eq!(
        summary(sts, "sts"),
        (
            5,
            3,
            vec![
                ("certificate-host-mismatch".into(), 1),
                ("starttls-not-supported".into(), 2)
            ]
        )
    );
    assert_eq!(
        summary(dane, "tlsa"),
        (3, 1, vec![("certificate-host-mismatch".into(), 1)])
    );
    assert_eq!(sts["organization-name"], "Relay Test Org");
    assert_eq!(sts["contact-info"], "mailto:tls-reports@relay.test");
    assert_eq!(
        sts["date-range"]["start-datetime"],
        format!("{day}T00:00:00Z")
    );
    assert_ne!(sts["report-id"], dane["report-id"]);
    let policy = &sts["policies"][0]["policy"];
    assert_eq!(policy["policy-domain"], "sts.test");
    assert_eq!(policy["mx-host"][0], "mx.sts.test");
    assert_eq!(policy["policy-string"][1], "mode: enforce");
    let detail = sts["policies"][0]["failure-details"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["result-type"] == "starttls-not-supported")
        .unwrap();
    assert_eq!(detail["receiving-mx-hostname"], "mx.sts.test");
    assert_eq!(detail["receiving-ip"], "198.51.100.7");
    assert_eq!(detail["sending-mta-ip"], "192.0.2.1");

    let page = metrics_page(&w.relay).await;
    assert!(
        page.contains("herald_tls_reports_sent_total{transport=\"https\"} 1"),
        "{page}"
    );
    assert!(
        page.contains("herald_tls_reports_sent_total{transport=\"mailto\"} 2"),
        "{page}"
    );

    // (d) a second trigger sends nothing, before and after a restart.
    assert_eq!(send_day(&w.relay, day).await, SendSummary::default());
    w.relay.wait_queue_empty(LIMIT).await;
    w.relay.restart().await;
    assert_eq!(send_day(&w.relay, day).await, SendSummary::default());
    assert_eq!(w.web.received().len(), 1);
    assert_eq!(w.sink.messages().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_that_could_not_be_posted_is_tried_again_and_mail_is_not_repeated() {
    let w = world().await;
    let (mut relay, sink) = (w.relay, w.sink);
    let day = UtcDay::today();
    counts(&relay).success(&sts_policy());
    // The HTTPS receiver is gone: the POST fails (after its retries); the
    // mailed copy goes.
    drop(w.web);
    let first = send_day(&relay, day).await;
    assert_eq!((first.sent, first.failed), (1, 1), "{first:?}");
    tokio::task::block_in_place(|| sink.wait_for_messages(1, LIMIT));
    let sent = counts(&relay).sent(day, "sts.test");
    assert!(!sent.complete);
    assert_eq!(
        sent.delivered.into_iter().collect::<Vec<_>>(),
        vec![format!("mailto:{RUA_MAIL}")]
    );
    let page = metrics_page(&relay).await;
    assert!(
        page.contains("herald_tls_reports_failed_total{transport=\"https\"} 1"),
        "{page}"
    );
    // Still pending after a restart; tried again, the mail is not repeated.
    relay.wait_queue_empty(LIMIT).await;
    relay.restart().await;
    assert_eq!(counts(&relay).unfinished(day), vec!["sts.test".to_string()]);
    let again = send_day(&relay, day).await;
    assert_eq!((again.sent, again.failed), (0, 1), "{again:?}");
    assert_eq!(sink.messages().len(), 1);
    relay.stop().await;
}
