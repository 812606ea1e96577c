//! TLS on the receiving side, over real sessions: the Received: field names
//! the negotiated cipher suite by its IANA name, for TLS 1.3 and 1.2; and a
//! client that sends an IP address as SNI (as clients connecting by IP do)
//! gets its handshake and costs no warning in herald's log.
//!
//! The log is captured with a subscriber set for the test's own thread: the
//! runtime is single-threaded, so the relay's sessions log there too, and
//! rustls's `log` records reach it through the `log` bridge that
//! tracing-subscriber installs with a (silent) global subscriber.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use common::relay::{OneTest, PASSWORD, TestRelay, USER, one_test, queue_id};
use common::smtp::TestClient;
use common::within;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, SupportedCipherSuite, SupportedProtocolVersion};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const WAIT: Duration = Duration::from_secs(20);

async fn world() -> OneTest {
    one_test(|_| {}).await
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

/// What the test thread's subscriber wrote.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Logs into the returned buffer, on this thread, until the guard drops.
fn capture(filter: tracing_subscriber::EnvFilter) -> (Captured, tracing::subscriber::DefaultGuard) {
    static BRIDGE: Once = Once::new();
    BRIDGE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::sink)
            .try_init();
    });
    let out = Captured::default();
    let writer = out.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    (out, tracing::subscriber::set_default(subscriber))
}

/// Opens a session on `relay`'s submission port, sends STARTTLS and a
/// ClientHello whose SNI is `127.0.0.1`, and returns the type of the first
/// TLS record the relay answers with.
async fn hello_with_ip_sni(relay: &TestRelay) -> u8 {
    // rustls never sends an IP address as SNI: a ClientHello for a
    // same-length host name has its name swapped in.
    let placeholder = "ipsni.tst";
    let mut conn = rustls::ClientConnection::new(
        Arc::new(common::smtp::insecure_client_config()),
        ServerName::try_from(placeholder).unwrap(),
    )
    .unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    let at = hello
        .windows(placeholder.len())
        .position(|w| w == placeholder.as_bytes())
        .expect("SNI in the ClientHello");
    hello[at..at + placeholder.len()].copy_from_slice(b"127.0.0.1");

    within(WAIT, "a TLS answer to an IP-address SNI", async {
        let tcp = tokio::net::TcpStream::connect(relay.submission)
            .await
            .unwrap();
        let mut r = BufReader::new(tcp);
        let mut line = String::new();
        let mut reply = async |r: &mut BufReader<tokio::net::TcpStream>| loop {
            line.clear();
            r.read_line(&mut line).await.unwrap();
            if line.as_bytes().get(3) == Some(&b' ') {
                return line.clone();
            }
        };
        assert!(reply(&mut r).await.starts_with("220"));
        r.get_mut().write_all(b"EHLO app.test\r\n").await.unwrap();
        assert!(reply(&mut r).await.starts_with("250"));
        r.get_mut().write_all(b"STARTTLS\r\n").await.unwrap();
        assert!(reply(&mut r).await.starts_with("220"));
        r.get_mut().write_all(&hello).await.unwrap();
        r.read_u8().await.unwrap()
    })
    .await
}

#[tokio::test(flavor = "current_thread")]
async fn an_ip_address_as_sni_is_no_warning() {
    let w = world().await;
    const HANDSHAKE: u8 = 22;
    // rustls warns on its own: with a plain filter the line is there.
    let (plain, guard) = capture(tracing_subscriber::EnvFilter::new("info"));
    assert_eq!(hello_with_ip_sni(&w.relay).await, HANDSHAKE);
    drop(guard);
    assert!(
        plain.text().contains("WARN") && plain.text().contains("SNI"),
        "the warning is visible without herald's filter: {}",
        plain.text()
    );
    // herald's filter leaves it out; the handshake goes on all the same.
    let (quiet, guard) = capture(herald::server::log_filter(None));
    assert_eq!(hello_with_ip_sni(&w.relay).await, HANDSHAKE);
    tracing::warn!("a warning of herald's own");
    drop(guard);
    let text = quiet.text();
    assert!(text.contains("a warning of herald's own"), "{text}");
    assert!(!text.contains("SNI"), "{text}");
    // An operator who asks for rustls's logs gets them.
    let (asked, guard) = capture(herald::server::log_filter(Some("info,rustls=warn")));
    assert_eq!(hello_with_ip_sni(&w.relay).await, HANDSHAKE);
    drop(guard);
    assert!(asked.text().contains("SNI"), "{}", asked.text());
}
