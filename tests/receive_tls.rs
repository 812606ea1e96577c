//! TLS on the receiving side, over real sessions: the Received: field names
//! the negotiated cipher suite by its IANA name, for TLS 1.3 and 1.2.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::dns::{TestDns, Zone};
use common::mx::{MxSink, SinkReply, ip, reserve_port};
use common::relay::{PASSWORD, Setup, TestRelay, USER, queue_id};
use common::smtp::TestClient;
use rustls::{ClientConfig, SupportedCipherSuite, SupportedProtocolVersion};

const WAIT: Duration = Duration::from_secs(20);

struct World {
    _dns: TestDns,
    mx: MxSink,
    relay: TestRelay,
}

async fn world() -> World {
    let zone = Zone::new("test.")
        .mx("one.test", 10, "mx.one.test")
        .a("mx.one.test", ip(2));
    let dns = TestDns::start(zone).await;
    let (port, mut listeners) = reserve_port(&[ip(2)]);
    let mx = MxSink::start_on(listeners.pop().unwrap(), |_, _| SinkReply::Accept).unwrap();
    let relay = TestRelay::start(Setup::new(dns.addr, port)).await;
    World {
        _dns: dns,
        mx,
        relay,
    }
}

/// A client that offers one protocol version and one cipher suite, and
/// accepts the relay's self-signed certificate.
fn client_config(
    version: &'static SupportedProtocolVersion,
    suite: SupportedCipherSuite,
) -> ClientConfig {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites = vec![suite];
    let provider = Arc::new(provider);
    ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[version])
        .expect("TLS version")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(herald::net::AcceptAnyCert(provider)))
        .with_no_client_auth()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn received_names_the_cipher_suite_by_its_iana_name() {
    use rustls::crypto::aws_lc_rs::cipher_suite as cs;
    let w = world().await;
    // herald's generated certificate has an ECDSA key.
    for (n, version, suite, want) in [
        (
            1,
            &rustls::version::TLS13,
            cs::TLS13_AES_256_GCM_SHA384,
            "(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)",
        ),
        (
            2,
            &rustls::version::TLS12,
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            "(using TLSv1.2 with cipher TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256)",
        ),
    ] {
        let mut c = TestClient::connect(w.relay.submission).await;
        c.ehlo("app.test").await.assert_code(250);
        c.starttls_with(client_config(version, suite))
            .await
            .assert_code(220);
        c.ehlo("app.test").await.assert_code(250);
        c.auth_plain(USER, PASSWORD).await.assert_code(235);
        let to = format!("r{n}@one.test");
        let body = format!(
            "From: <billing@acme.test>\r\nTo: <{to}>\r\nSubject: cipher {n}\r\n\r\nHello.\r\n"
        );
        queue_id(
            &c.send_mail("billing@acme.test", &[&to], body.as_bytes())
                .await,
        );
        let _ = c.cmd("QUIT").await;
        let got = tokio::task::block_in_place(|| w.mx.wait_for_messages(n, WAIT));
        let m = got.iter().find(|m| m.rcpts == [to.as_str()]).unwrap();
        let text = String::from_utf8_lossy(&m.data);
        let received = text.split("\r\n\r\n").next().unwrap();
        assert!(received.contains(want), "{received}");
    }
}
