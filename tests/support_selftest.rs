//! Checks that the shared test support in `tests/common` works.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::dns::{LookupOutcome, SilentDns, TestDns, Zone, classify, test_resolver};
use common::mx::{MxSink, SinkReply, ip, reserve_port};
use common::smtp::{TestClient, dot_stuff};
use common::within;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::RData;

const WAIT: Duration = Duration::from_secs(10);

fn zone() -> Zone {
    Zone::new("test.")
        .mx("example.test", 10, "mx1.example.test")
        .mx("example.test.", 20, "mx2.example.test.")
        .a("mx1.example.test", Ipv4Addr::new(127, 0, 0, 2))
        .aaaa("mx1.example.test", "::1".parse().unwrap())
        .null_mx("nullmx.test")
        .txt("example.test", "v=spf1 ip4:127.0.0.1 -all")
        .txt("sel._domainkey.example.test", &"k".repeat(600))
}

#[tokio::test]
async fn dns_answers_mx_a_aaaa_txt() {
    let dns = TestDns::start(zone()).await;
    assert!(dns.addr.ip().is_loopback());
    let resolver = dns.resolver();

    let mx = within(WAIT, "MX lookup", resolver.mx_lookup("example.test."))
        .await
        .expect("MX lookup");
    let mut mxs: Vec<(u16, String)> = mx
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::MX(mx) => Some((mx.preference, mx.exchange.to_string())),
            _ => None,
        })
        .collect();
    mxs.sort();
    assert_eq!(
        mxs,
        vec![
            (10, "mx1.example.test.".to_string()),
            (20, "mx2.example.test.".to_string())
        ]
    );

    let a = within(WAIT, "A lookup", resolver.ipv4_lookup("mx1.example.test."))
        .await
        .expect("A lookup");
    let ips: Vec<_> = a.answers().iter().map(|r| r.data.clone()).collect();
    assert_eq!(ips, vec![RData::A(Ipv4Addr::new(127, 0, 0, 2).into())]);

    let aaaa = within(WAIT, "AAAA", resolver.ipv6_lookup("mx1.example.test."))
        .await
        .expect("AAAA lookup");
    assert_eq!(aaaa.answers().len(), 1);

    // lookup_ip also works (A and AAAA)
    let both = within(WAIT, "lookup_ip", resolver.lookup_ip("mx1.example.test."))
        .await
        .expect("lookup_ip");
    let mut got: Vec<IpAddr> = both.iter().collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
            "::1".parse::<IpAddr>().unwrap()
        ]
    );

    let txt = within(WAIT, "TXT", resolver.txt_lookup("example.test."))
        .await
        .expect("TXT lookup");
    let texts: Vec<String> = txt
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::TXT(t) => Some(t.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(texts, vec!["v=spf1 ip4:127.0.0.1 -all".to_string()]);

    // A TXT longer than 255 bytes is split into character-strings that concatenate back.
    let long = within(
        WAIT,
        "long TXT",
        resolver.txt_lookup("sel._domainkey.example.test."),
    )
    .await
    .expect("long TXT lookup");
    let RData::TXT(t) = &long.answers()[0].data else {
        panic!("not TXT")
    };
    let joined: Vec<u8> = t.txt_data.iter().flat_map(|p| p.iter().copied()).collect();
    assert_eq!(joined, "k".repeat(600).into_bytes());
}

#[tokio::test]
async fn dns_null_mx() {
    let dns = TestDns::start(zone()).await;
    let mx = dns
        .resolver()
        .mx_lookup("nullmx.test")
        .await
        .expect("null MX lookup");
    let recs: Vec<_> = mx
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::MX(mx) => Some((mx.preference, mx.exchange.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].0, 0);
    assert!(recs[0].1.is_root(), "exchange {:?}", recs[0].1);
    assert_eq!(recs[0].1.to_string(), ".");
}

#[tokio::test]
async fn dns_nxdomain_versus_nodata() {
    let dns = TestDns::start(zone()).await;
    let resolver = dns.resolver();

    // A name that does not exist: NXDOMAIN.
    let err = within(WAIT, "NX lookup", resolver.mx_lookup("nosuch.test."))
        .await
        .expect_err("nosuch.test must not resolve");
    assert!(err.is_nx_domain(), "{err:?}");
    assert!(err.is_no_records_found(), "{err:?}");
    match &err {
        NetError::Dns(DnsError::NoRecordsFound(no)) => {
            assert_eq!(no.response_code, ResponseCode::NXDomain);
            assert!(
                no.soa.is_some(),
                "authoritative negative answer carries the SOA"
            );
        }
        other => panic!("expected NoRecordsFound, got {other:?}"),
    }
    assert_eq!(classify(&err), LookupOutcome::NxDomain);

    // A name that exists with other types only: NOERROR, no data.
    let err = within(
        WAIT,
        "no-data lookup",
        resolver.mx_lookup("mx1.example.test."),
    )
    .await
    .expect_err("mx1.example.test has no MX");
    assert!(!err.is_nx_domain(), "{err:?}");
    assert!(err.is_no_records_found(), "{err:?}");
    match &err {
        NetError::Dns(DnsError::NoRecordsFound(no)) => {
            assert_eq!(no.response_code, ResponseCode::NoError);
        }
        other => panic!("expected NoRecordsFound, got {other:?}"),
    }
    assert_eq!(classify(&err), LookupOutcome::NoData);

    // An empty non-terminal (only names below it exist) is NOERROR too.
    let err = resolver
        .mx_lookup("_domainkey.example.test.")
        .await
        .expect_err("empty non-terminal");
    assert_eq!(classify(&err), LookupOutcome::NoData, "{err:?}");

    // Names without a trailing dot work the same (ndots = 0, no search list).
    let err = resolver.mx_lookup("nosuch.test").await.expect_err("nosuch");
    assert!(err.is_nx_domain(), "{err:?}");

    // Outside the served origin: REFUSED, a temporary error.
    let err = resolver
        .mx_lookup("example.com.")
        .await
        .expect_err("outside the zone");
    assert!(
        matches!(
            err,
            NetError::Dns(DnsError::ResponseCode(ResponseCode::Refused))
        ),
        "{err:?}"
    );
    assert_eq!(classify(&err), LookupOutcome::Temporary);
}

#[tokio::test]
async fn dns_root_origin_answers_nxdomain_everywhere() {
    let dns = TestDns::start(Zone::new(".").mx("example.com", 5, "mx.example.com")).await;
    let resolver = dns.resolver();
    let mx = resolver.mx_lookup("example.com").await.expect("MX");
    assert_eq!(mx.answers().len(), 1);
    let err = resolver.mx_lookup("nosuch.org.").await.expect_err("nx");
    assert!(err.is_nx_domain(), "{err:?}");
}

#[tokio::test]
async fn dns_server_stops_on_drop() {
    let dns = TestDns::start(zone()).await;
    let addr = dns.addr;
    drop(dns);
    let resolver = test_resolver(addr, Duration::from_millis(300));
    let err = within(
        WAIT,
        "lookup after drop",
        resolver.mx_lookup("example.test."),
    )
    .await
    .expect_err("server was dropped");
    assert_eq!(classify(&err), LookupOutcome::Temporary, "{err:?}");
}

#[tokio::test]
async fn silent_dns_times_out() {
    let silent = SilentDns::start().await;
    assert!(silent.addr.ip().is_loopback());
    let resolver = test_resolver(silent.addr, Duration::from_millis(300));
    let started = Instant::now();
    let err = within(WAIT, "silent lookup", resolver.mx_lookup("example.test."))
        .await
        .expect_err("a silent server cannot answer");
    let elapsed = started.elapsed();
    assert!(
        matches!(err, NetError::Timeout),
        "{err:?} after {elapsed:?}"
    );
    assert_eq!(classify(&err), LookupOutcome::Temporary);
    assert!(elapsed >= Duration::from_millis(250), "{elapsed:?}");
}

#[tokio::test]
async fn sink_records_exact_message_and_applies_policy() {
    let sink = MxSink::start(ip(1), 0, |rcpt, _seen| {
        if rcpt.starts_with("nobody@") {
            SinkReply::Reply(550, "5.1.1 no such user")
        } else {
            SinkReply::Accept
        }
    })
    .unwrap();
    assert_eq!(sink.addr.ip(), IpAddr::V4(ip(1)));

    let mut c = TestClient::connect(sink.addr).await;
    c.greeting.assert_code(220);
    let ehlo = c.ehlo("client.test").await;
    ehlo.assert_code(250);
    assert!(!ehlo.has_extension("PIPELINING"));

    c.cmd("MAIL FROM:<sender@example.test>")
        .await
        .assert_code(250);
    let r = c.cmd("RCPT TO:<nobody@example.test>").await;
    r.assert_code(550);
    assert_eq!(r.enhanced(), Some("5.1.1"));
    assert_eq!(r.text(), "5.1.1 no such user");
    c.cmd("RCPT TO:<rcpt@example.test>").await.assert_code(250);
    let body: &[u8] = b"Subject: hi\r\n\r\n.leading dot\r\n..two dots\r\nend\r\n";
    c.data(body).await.assert_code(250);
    c.cmd("QUIT").await.assert_code(221);

    let got = sink.wait_for_messages(1, WAIT);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].from, "sender@example.test");
    assert_eq!(got[0].rcpts, vec!["rcpt@example.test".to_string()]);
    assert_eq!(got[0].helo, "client.test");
    assert_eq!(
        got[0].data,
        body,
        "{:?}",
        String::from_utf8_lossy(&got[0].data)
    );
    assert_eq!(sink.rcpt_attempts("nobody@example.test"), 1);
    assert_eq!(sink.rcpt_attempts("rcpt@example.test"), 1);
    assert_eq!(sink.rcpt_attempts("other@example.test"), 0);
}

#[tokio::test]
async fn sink_policy_sees_retries_and_send_mail_works() {
    let sink = MxSink::start(ip(1), 0, |_rcpt, seen| {
        if seen == 0 {
            SinkReply::Reply(451, "4.3.0 try later")
        } else {
            SinkReply::Accept
        }
    })
    .unwrap();
    let mut c = TestClient::connect(sink.addr).await;
    c.ehlo("client.test").await.assert_code(250);
    // First attempt: the RCPT is deferred, send_mail stops there.
    let r = c
        .send_mail("a@example.test", &["b@example.test"], b"x\r\n")
        .await;
    assert!(r.is_transient(), "{r}");
    assert_eq!(r.enhanced(), Some("4.3.0"));
    c.cmd("RSET").await.assert_code(250);
    // The retry is accepted. A body without a final CRLF gets one.
    let r = c
        .send_mail("a@example.test", &["b@example.test"], b"no newline")
        .await;
    r.assert_code(250);
    let got = sink.wait_for_messages(1, WAIT);
    assert_eq!(got[0].data, b"no newline\r\n");
    assert_eq!(sink.wait_for_rcpt_attempts("b@example.test", 2, WAIT), 2);
    sink.assert_no_message_within(Duration::from_millis(50));
}

#[tokio::test]
async fn sink_data_policy() {
    let (_, mut l) = reserve_port(&[ip(1)]);
    let sink = MxSink::start_on_with_data_policy(
        l.pop().unwrap(),
        |_, _| SinkReply::Accept,
        |_mail, attempt| {
            if attempt == 0 {
                SinkReply::Reply(554, "5.6.0 rejected content")
            } else {
                SinkReply::Accept
            }
        },
    )
    .unwrap();
    let mut c = TestClient::connect(sink.addr).await;
    c.ehlo("c.test").await;
    let r = c.send_mail("a@x.test", &["b@x.test"], b"one\r\n").await;
    r.assert_code(554);
    assert_eq!(r.enhanced(), Some("5.6.0"));
    // mailin cannot go on after refusing at the final dot: the sink hangs up.
    c.expect_closed().await;
    let mut c = TestClient::connect(sink.addr).await;
    c.ehlo("c.test").await;
    let r = c.send_mail("a@x.test", &["b@x.test"], b"two\r\n").await;
    r.assert_code(250);
    let got = sink.wait_for_messages(1, WAIT);
    assert_eq!(got[0].data, b"two\r\n");
    let refused = sink.refused();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].0.data, b"one\r\n");
    assert_eq!(sink.data_attempts(), 2);
}

#[test]
#[should_panic(expected = "expected 1 message(s)")]
fn sink_wait_panics_with_clear_message() {
    let sink = MxSink::accept_all(ip(1), 0).unwrap();
    sink.wait_for_messages(1, Duration::from_millis(50));
}

#[tokio::test]
async fn reserve_port_dead_and_live_mx() {
    let (port, listeners) = reserve_port(&[ip(2), ip(3)]);
    assert_eq!(listeners.len(), 2);
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    assert_eq!(addrs[0], SocketAddr::from((ip(2), port)));
    assert_eq!(addrs[1], SocketAddr::from((ip(3), port)));
    // Nobody else can bind it meanwhile.
    assert!(std::net::TcpListener::bind((ip(2), port)).is_err());

    let mut listeners = listeners.into_iter();
    let live = listeners.next().unwrap();
    let dead = listeners.next().unwrap();
    drop(dead);
    let sink = MxSink::start_on(live, |_, _| SinkReply::Accept).unwrap();
    assert_eq!(sink.addr, SocketAddr::from((ip(2), port)));

    // 127.0.0.3 refuses, 127.0.0.2 serves on the same port.
    let refused = tokio::net::TcpStream::connect((ip(3), port)).await;
    assert_eq!(
        refused.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );
    let mut c = TestClient::connect(sink.addr).await;
    c.greeting.assert_code(220);
    c.ehlo("c.test").await.assert_code(250);
    c.send_mail("a@x.test", &["b@x.test"], b"hello\r\n")
        .await
        .assert_code(250);
    sink.wait_for_messages(1, WAIT);
}

#[tokio::test]
async fn sink_stop_refuses_new_connections() {
    let mut sink = MxSink::accept_all(ip(4), 0).unwrap();
    let addr = sink.addr;
    // A session open across the stop keeps working.
    let mut before = TestClient::connect(addr).await;
    sink.stop();
    let err = tokio::net::TcpStream::connect(addr).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    before.ehlo("c.test").await.assert_code(250);
    before
        .send_mail("a@x.test", &["b@x.test"], b"late\r\n")
        .await
        .assert_code(250);
    assert_eq!(sink.wait_for_messages(1, WAIT)[0].data, b"late\r\n");
    // The address can be served again.
    let again = MxSink::accept_all(ip(4), addr.port()).unwrap();
    TestClient::connect(again.addr)
        .await
        .greeting
        .assert_code(220);
}

#[test]
fn dot_stuffing() {
    assert_eq!(dot_stuff(b""), b".\r\n");
    assert_eq!(dot_stuff(b"a\r\n"), b"a\r\n.\r\n");
    assert_eq!(dot_stuff(b"a"), b"a\r\n.\r\n");
    assert_eq!(dot_stuff(b".a\r\n.\r\nb"), b"..a\r\n..\r\nb\r\n.\r\n");
    // Only CRLF ends a line.
    assert_eq!(dot_stuff(b"a\n.b\r\n"), b"a\n.b\r\n.\r\n");
}

// ---- TLS: a minimal scripted SMTP server with an rcgen certificate -------------------

fn tls_acceptor() -> tokio_rustls::TlsAcceptor {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into());
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![ck.cert.der().clone()], key)
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// Serves one connection: greeting, EHLO (multi-line), STARTTLS, AUTH PLAIN / LOGIN
/// (user "u", password "p"), QUIT. Implicit TLS if `implicit`.
async fn mini_server(listener: tokio::net::TcpListener, implicit: bool) {
    use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

    async fn session<S: AsyncRead + AsyncWrite + Unpin>(s: S, tls: bool) -> Option<S> {
        let mut s = BufReader::new(s);
        let mut line = String::new();
        let mut login_step = 0;
        loop {
            line.clear();
            if s.read_line(&mut line).await.ok()? == 0 {
                return None;
            }
            let cmd = line.trim_end().to_string();
            let reply: String = if login_step == 1 {
                login_step = 2;
                assert_eq!(cmd, "dQ=="); // "u"
                "334 UGFzc3dvcmQ6\r\n".into()
            } else if login_step == 2 {
                login_step = 0;
                if cmd == "cA==" {
                    "235 2.7.0 ok\r\n".into()
                } else {
                    "535 5.7.8 bad\r\n".into()
                }
            } else if cmd.starts_with("EHLO ") {
                let mut r = String::from("250-mini.test greets you\r\n250-8BITMIME\r\n");
                if !tls {
                    r.push_str("250-STARTTLS\r\n");
                }
                r.push_str("250 AUTH PLAIN LOGIN\r\n");
                r
            } else if cmd == "STARTTLS" && !tls {
                s.write_all(b"220 2.0.0 go ahead\r\n").await.ok()?;
                s.flush().await.ok()?;
                return Some(s.into_inner());
            } else if cmd == "AUTH PLAIN AHUAcA==" {
                "235 2.7.0 ok\r\n".into()
            } else if cmd.starts_with("AUTH PLAIN") {
                "535 5.7.8 bad\r\n".into()
            } else if cmd == "AUTH LOGIN" {
                login_step = 1;
                "334 VXNlcm5hbWU6\r\n".into()
            } else if cmd == "QUIT" {
                s.write_all(b"221 2.0.0 bye\r\n").await.ok()?;
                return None;
            } else {
                "500 5.5.2 what?\r\n".into()
            };
            s.write_all(reply.as_bytes()).await.ok()?;
            s.flush().await.ok()?;
        }
    }

    let acceptor = tls_acceptor();
    let (tcp, _) = listener.accept().await.unwrap();
    if implicit {
        let tls = acceptor.accept(tcp).await.unwrap();
        let mut tls = tls;
        tls.write_all(b"220 mini.test ESMTP\r\n").await.unwrap();
        session(tls, true).await;
    } else {
        let mut tcp = tcp;
        tcp.write_all(b"220 mini.test ESMTP\r\n").await.unwrap();
        if let Some(tcp) = session(tcp, false).await {
            let tls = acceptor.accept(tcp).await.unwrap();
            session(tls, true).await;
        }
    }
}

#[tokio::test]
async fn client_starttls_and_auth() {
    let listener = tokio::net::TcpListener::bind((ip(1), 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(mini_server(listener, false));

    let mut c = TestClient::connect(addr).await;
    assert_eq!(c.greeting.code, 220);
    assert_eq!(c.greeting.text(), "mini.test ESMTP");
    let ehlo = c.ehlo("client.test").await;
    assert_eq!(ehlo.code, 250);
    assert_eq!(ehlo.lines.len(), 4);
    assert_eq!(ehlo.lines[0], "mini.test greets you");
    assert!(ehlo.has_extension("starttls"));
    assert_eq!(ehlo.extension("AUTH"), Some("PLAIN LOGIN"));
    assert_eq!(c.tls_version(), None);

    let r = c.starttls().await;
    assert_eq!(r.code, 220, "{r}");
    assert_eq!(r.enhanced(), Some("2.0.0"));
    let v = c.tls_version().expect("TLS after STARTTLS");
    assert!(v.starts_with("TLSv1_"), "{v}");
    assert_eq!(c.peer_certificates().unwrap().len(), 1);
    let ehlo = c.ehlo("client.test").await;
    assert!(!ehlo.has_extension("STARTTLS"), "{ehlo}");

    c.auth_plain("u", "wrong").await.assert_code(535);
    c.auth_plain("u", "p").await.assert_code(235);
    c.auth_login("u", "p").await.assert_code(235);
    c.auth_login("u", "x").await.assert_code(535);
    c.cmd("QUIT").await.assert_code(221);
    c.expect_closed().await;
    within(WAIT, "mini server", server).await.unwrap();
}

#[tokio::test]
async fn client_implicit_tls() {
    let listener = tokio::net::TcpListener::bind((ip(1), 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(mini_server(listener, true));
    let mut c = TestClient::connect_tls(addr).await;
    assert_eq!(c.greeting.code, 220);
    assert_eq!(c.tls_version().as_deref(), Some("TLSv1_3"));
    let ehlo = c.ehlo("client.test").await;
    assert!(ehlo.has_extension("AUTH"));
    c.cmd("QUIT").await.assert_code(221);
    within(WAIT, "mini server", server).await.unwrap();
}
