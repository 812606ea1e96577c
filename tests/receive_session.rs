//! The submission server over real sockets: a `ReceiveContext` built directly
//! on a real queue (its delivery jobs land in the test's channel, nothing is
//! delivered), the in-process DNS server, and the wire-level test client.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::dns::{SilentDns, TestDns, Zone};
use common::smtp::TestClient;
use common::within;
use herald::config::Config;
use herald::dns::Dns;
use herald::queue::{DeliveryJob, Queue};
use herald::receive::{self, ReceiveContext};
use herald::report::Reporter;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(15);
const PASSWORD: &str = "correct horse";

/// Listener indexes in the harness config.
const STARTTLS: usize = 0;
const IMPLICIT: usize = 1;
const TRUSTED: usize = 2;

struct Harness {
    addrs: Vec<SocketAddr>,
    jobs: mpsc::UnboundedReceiver<DeliveryJob>,
    events: PathBuf,
    shutdown: CancellationToken,
    handle: Option<JoinHandle<()>>,
    _dns_server: Option<TestDns>,
    _silent: Option<SilentDns>,
    _dir: tempfile::TempDir,
}

fn zone() -> Zone {
    Zone::new("test.")
        .mx("example.test", 10, "mx.example.test")
        .a("mx.example.test", Ipv4Addr::new(127, 0, 0, 2))
        .a("implicit.test", Ipv4Addr::new(127, 0, 0, 3))
        .null_mx("nullmx.test")
}

fn password_hash() -> String {
    use argon2::PasswordHasher as _;
    let salt = argon2::password_hash::SaltString::encode_b64(b"herald-test-salt").unwrap();
    argon2::Argon2::default()
        .hash_password(PASSWORD.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

async fn harness(server_extra: &str) -> Harness {
    let dns = TestDns::start(zone()).await;
    let addr = dns.addr;
    harness_with(server_extra, addr, Some(dns), None).await
}

async fn harness_with(
    server_extra: &str,
    dns_addr: SocketAddr,
    dns_server: Option<TestDns>,
    silent: Option<SilentDns>,
) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let text = format!(
        r#"
        [server]
        hostname = "relay.test"
        spool_dir = "{d}/spool"
        max_message_size = "16KiB"
        max_recipients = 3
        {server_extra}

        [[listener]]
        address = "127.0.0.1:0"
        tls = "starttls"
        auth = "required"

        [[listener]]
        address = "127.0.0.1:0"
        tls = "implicit"
        auth = "required"

        [[listener]]
        address = "127.0.0.1:0"
        tls = "none"
        auth = "none"
        trusted_networks = ["127.0.0.0/8"]

        [tls]
        cert = "{d}/certs/relay.crt"
        key = "{d}/certs/relay.key"

        [[tenant]]
        name = "acme"
        username = "acme"
        password_hash = "{hash}"
        allowed_senders = ["*@acme.test", "billing@example.test"]

        [[tenant]]
        name = "loose"
        username = "loose"
        password_hash = "{hash}"
        allowed_senders = ["*@loose.test"]
        bind_from_header = false

        [dns]
        nameservers = ["{dns_addr}"]
        timeout = "1s"
        attempts = 1

        [events]
        log = "{d}/events.jsonl"
        "#,
        hash = password_hash(),
    );
    let config = Arc::new(Config::from_toml_str(&text).unwrap_or_else(|e| panic!("{e}")));
    let tls = herald::tls::acceptor(&config).unwrap();
    let dns = Dns::new(&config.dns).unwrap();
    let (reporter, _events_task) = Reporter::start(&config.events.log).await.unwrap();
    let (jobs_tx, jobs) = mpsc::unbounded_channel();
    let queue = Queue::open(&config, reporter.clone(), jobs_tx).unwrap();
    let shutdown = CancellationToken::new();
    let ctx = Arc::new(ReceiveContext::new(
        config.clone(),
        queue,
        dns,
        reporter,
        Some(tls),
        shutdown.clone(),
    ));
    let (addrs, handle) = receive::start(ctx).await.unwrap();
    assert_eq!(addrs.len(), 3);
    assert!(addrs.iter().all(|a| a.port() != 0));
    Harness {
        addrs,
        jobs,
        events: config.events.log.clone(),
        shutdown,
        handle: Some(handle),
        _dns_server: dns_server,
        _silent: silent,
        _dir: dir,
    }
}

impl Harness {
    async fn client(&self, listener: usize) -> TestClient {
        let c = TestClient::connect(self.addrs[listener]).await;
        c.greeting.assert_code(220);
        c
    }

    /// STARTTLS, EHLO and AUTH PLAIN as acme.
    async fn authed(&self) -> TestClient {
        let mut c = self.client(STARTTLS).await;
        c.ehlo("app.test").await.assert_code(250);
        c.starttls().await.assert_code(220);
        c.ehlo("app.test").await.assert_code(250);
        c.auth_plain("acme", PASSWORD).await.assert_code(235);
        c
    }

    async fn job(&mut self) -> DeliveryJob {
        within(WAIT, "a queued message", self.jobs.recv())
            .await
            .expect("jobs channel open")
    }

    /// Events written so far, as JSON values.
    async fn events(&self) -> Vec<serde_json::Value> {
        // The writer task flushes per batch; give it a moment.
        for _ in 0..50 {
            if let Ok(text) = std::fs::read_to_string(&self.events)
                && !text.is_empty()
            {
                return text
                    .lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Vec::new()
    }

    async fn wait_event(&self, kind: &str) -> serde_json::Value {
        for _ in 0..100 {
            if let Some(e) = self.events().await.into_iter().find(|e| e["event"] == kind) {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no {kind} event in {:?}", self.events().await);
    }
}

const MESSAGE: &[u8] = b"From: Billing <billing@acme.test>\r\nTo: bob@example.test\r\nSubject: Invoice 42\r\n\r\nPlease find your invoice.\r\n";

#[tokio::test]
async fn starttls_auth_and_a_queued_message() {
    let mut h = harness("").await;
    let mut c = h.client(STARTTLS).await;
    assert_eq!(c.greeting.lines[0], "relay.test ESMTP herald");
    let ehlo = c.ehlo("app.test").await;
    ehlo.assert_code(250);
    for cap in [
        "PIPELINING",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "DSN",
        "CHUNKING",
        "STARTTLS",
    ] {
        assert!(ehlo.has_extension(cap), "{cap} missing: {ehlo}");
    }
    assert_eq!(ehlo.extension("SIZE"), Some("16384"));
    assert!(
        !ehlo.has_extension("AUTH"),
        "AUTH offered before TLS: {ehlo}"
    );

    // AUTH and MAIL before TLS are refused with the reason.
    let r = c.auth_plain("acme", PASSWORD).await;
    r.assert_code(530);
    assert_eq!(r.enhanced(), Some("5.7.0"));
    assert!(r.text().contains("STARTTLS"), "{r}");
    c.cmd("MAIL FROM:<billing@acme.test>")
        .await
        .assert_code(530);

    c.starttls().await.assert_code(220);
    assert_eq!(c.tls_version().as_deref(), Some("TLSv1_3"));
    let ehlo = c.ehlo("app.test").await;
    assert_eq!(ehlo.extension("AUTH"), Some("PLAIN LOGIN"));
    assert!(!ehlo.has_extension("STARTTLS"));
    c.cmd("MAIL FROM:<billing@acme.test>")
        .await
        .assert_code(530);
    c.auth_plain("acme", PASSWORD).await.assert_code(235);

    let r = c
        .send_mail("billing@acme.test", &["bob@example.test"], MESSAGE)
        .await;
    r.assert_code(250);
    assert_eq!(r.enhanced(), Some("2.0.0"));
    let id = r
        .text()
        .strip_prefix("2.0.0 Ok: queued as ")
        .unwrap()
        .to_string();

    let job = h.job().await;
    assert_eq!(job.id.to_string(), id);
    assert_eq!(job.envelope.tenant.as_deref(), Some("acme"));
    assert_eq!(job.envelope.sender, "billing@acme.test");
    assert_eq!(job.recipients[0].address, "bob@example.test");
    let body = String::from_utf8(job.body.to_vec()).unwrap();
    assert!(
        body.starts_with("Received: from app.test ([127.0.0.1])\r\n\t(using TLSv1.3 with cipher "),
        "{body}"
    );
    assert!(
        body.contains(&format!(
            "by relay.test (herald) with ESMTPSA id {id}\r\n\tfor <bob@example.test>;"
        )),
        "{body}"
    );
    let message_id = format!("<{id}@relay.test>");
    assert!(
        body.contains(&format!("Message-ID: {message_id}\r\n")),
        "{body}"
    );
    assert!(body.contains("\r\nDate: "), "{body}");
    assert!(
        body.ends_with("\r\n\r\nPlease find your invoice.\r\n"),
        "{body}"
    );
    assert_eq!(
        job.envelope.message_id.as_deref(),
        Some(message_id.as_str())
    );

    let e = h.wait_event("received").await;
    assert_eq!(e["queue_id"], id);
    assert_eq!(e["tenant"], "acme");
    assert_eq!(e["message_id"], message_id);
    assert_eq!(e["recipients"][0], "bob@example.test");
    assert_eq!(e["size"], body.len());

    // A second transaction on the same connection, keeping the app's own
    // Message-ID and Date.
    let own = b"From: billing@acme.test\r\nDate: Tue, 14 Jan 2025 10:00:00 +0000\r\nMessage-Id: <inv-42@acme.test>\r\n\r\nx\r\n";
    c.send_mail(
        "billing@acme.test",
        &["a@example.test", "b@example.test"],
        own,
    )
    .await
    .assert_code(250);
    let job = h.job().await;
    assert_eq!(
        job.envelope.message_id.as_deref(),
        Some("<inv-42@acme.test>")
    );
    let body = String::from_utf8(job.body.to_vec()).unwrap();
    assert!(!body.contains("Message-ID: <"), "{body}");
    assert_eq!(body.matches("Date:").count(), 1, "{body}");
    assert!(
        !body.contains("\tfor <"),
        "several recipients are not named: {body}"
    );
    c.cmd("QUIT").await.assert_code(221);
}

#[tokio::test]
async fn implicit_tls_and_auth_login() {
    let h = harness("").await;
    let mut c = TestClient::connect_tls(h.addrs[IMPLICIT]).await;
    c.greeting.assert_code(220);
    let ehlo = c.ehlo("app.test").await;
    assert!(ehlo.has_extension("AUTH"));
    assert!(!ehlo.has_extension("STARTTLS"));
    let r = c.auth_login("acme", "wrong").await;
    r.assert_code(535);
    assert_eq!(r.text(), "5.7.8 Authentication credentials invalid");
    let r = c.cmd("AUTH LOGIN").await;
    r.assert_code(334);
    c.cmd("*").await.assert_code(501);
    c.auth_login("acme", PASSWORD).await.assert_code(235);
    c.cmd("AUTH PLAIN").await.assert_code(503);
}

#[tokio::test]
async fn auth_failures_per_ip_end_in_421() {
    let h = harness("max_auth_failures = 2\nauth_failure_delay = \"10ms\"").await;
    let mut c = TestClient::connect_tls(h.addrs[IMPLICIT]).await;
    c.ehlo("app.test").await;
    c.auth_plain("acme", "bad1").await.assert_code(535);
    c.auth_plain("nobody", "bad2").await.assert_code(535);
    let r = c.auth_plain("acme", PASSWORD).await;
    r.assert_code(421);
    assert_eq!(r.enhanced(), Some("4.7.0"));
    c.expect_closed().await;
    // The count is per IP, not per connection.
    let mut c = TestClient::connect_tls(h.addrs[IMPLICIT]).await;
    c.ehlo("app.test").await;
    c.auth_plain("acme", PASSWORD).await.assert_code(421);
}

#[tokio::test]
async fn sender_not_allowed_names_address_and_patterns() {
    let h = harness("").await;
    let mut c = h.authed().await;
    let r = c.cmd("MAIL FROM:<ceo@other.test>").await;
    r.assert_code(553);
    assert_eq!(
        r.text(),
        "5.7.1 Sender address <ceo@other.test> is not allowed for account \"acme\"; allowed: *@acme.test, billing@example.test"
    );
    let e = h.wait_event("rejected").await;
    assert_eq!(e["rule"], "sender_not_allowed");
    assert_eq!(e["client_ip"], "127.0.0.1");
    assert_eq!(e["smtp"]["code"], 553);
    // The null sender is for delivery reports, not for a tenant's mail.
    let r = c.cmd("MAIL FROM:<>").await;
    assert_eq!((r.code, r.enhanced()), (553, Some("5.7.1")), "{r}");
    assert!(r.text().contains("null sender"), "{r}");
    // An allowed sender after refusals is fine.
    c.cmd("MAIL FROM:<billing@EXAMPLE.test> SIZE=100 BODY=8BITMIME RET=HDRS ENVID=abc")
        .await
        .assert_code(250);
}

#[tokio::test]
async fn recipient_domains_are_checked() {
    let h = harness("").await;
    let mut c = h.authed().await;
    c.cmd("MAIL FROM:<billing@acme.test>")
        .await
        .assert_code(250);
    let r = c.cmd("RCPT TO:<bob@nullmx.test>").await;
    r.assert_code(556);
    assert_eq!(r.enhanced(), Some("5.1.10"));
    let r = c.cmd("RCPT TO:<bob@nxdomain.test>").await;
    r.assert_code(550);
    assert_eq!(
        r.text(),
        "5.1.2 Recipient domain <nxdomain.test> has no mail server (no MX or A/AAAA record): check the address for typos"
    );
    let r = c.cmd("RCPT TO:<bob>").await;
    assert_eq!((r.code, r.enhanced()), (501, Some("5.1.3")), "{r}");
    c.cmd("RCPT TO:<bob@implicit.test> NOTIFY=FAILURE,DELAY ORCPT=rfc822;bob+x@implicit.test")
        .await
        .assert_code(250);
    let rejected: Vec<_> = h
        .events()
        .await
        .into_iter()
        .filter(|e| e["event"] == "rejected")
        .map(|e| e["rule"].as_str().unwrap().to_string())
        .collect();
    assert!(
        rejected.contains(&"recipient_null_mx".to_string()),
        "{rejected:?}"
    );
}

#[tokio::test]
async fn dns_failure_is_temporary() {
    let silent = SilentDns::start().await;
    let addr = silent.addr;
    let h = harness_with("", addr, None, Some(silent)).await;
    let mut c = h.client(TRUSTED).await;
    c.ehlo("app.test").await;
    c.cmd("MAIL FROM:<x@acme.test>").await.assert_code(250);
    let r = within(WAIT, "RCPT reply", c.cmd("RCPT TO:<bob@example.test>")).await;
    r.assert_code(451);
    assert_eq!(r.enhanced(), Some("4.4.3"));
}

#[tokio::test]
async fn pipelined_transaction_on_a_trusted_network() {
    let mut h = harness("").await;
    let mut c = h.client(TRUSTED).await;
    c.send_raw(b"EHLO app.test\r\nMAIL FROM:<x@anything.test>\r\nRCPT TO:<a@example.test>\r\nRCPT TO:<b@nullmx.test>\r\nRCPT TO:<c@example.test>\r\nDATA\r\n")
        .await;
    let codes: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..6 {
            v.push(c.read_reply().await.code);
        }
        v
    };
    assert_eq!(codes, vec![250, 250, 250, 556, 250, 354]);
    c.send_raw(b"From: x@anything.test\r\n\r\nhello\r\n.\r\n")
        .await;
    c.read_reply().await.assert_code(250);
    let job = h.job().await;
    assert_eq!(job.envelope.tenant, None);
    let rcpts: Vec<_> = job.recipients.iter().map(|r| r.address.as_str()).collect();
    assert_eq!(rcpts, vec!["a@example.test", "c@example.test"]);
    let body = String::from_utf8(job.body.to_vec()).unwrap();
    assert!(body.contains("with ESMTP id"), "{body}");
}

#[tokio::test]
async fn untrusted_unauthenticated_clients_cannot_relay() {
    let h = harness("").await;
    let mut c = TestClient::connect_tls(h.addrs[IMPLICIT]).await;
    c.ehlo("app.test").await;
    c.cmd("MAIL FROM:<billing@acme.test>")
        .await
        .assert_code(530);
    c.cmd("RCPT TO:<bob@example.test>").await.assert_code(530);
    c.cmd("QUIT").await.assert_code(221);
}

/// The smuggling shapes: none may end the message; each refuses it whole,
/// and what looked like a second transaction inside is never run.
#[tokio::test]
async fn bare_lf_and_cr_refuse_the_message_and_never_split_it() {
    let mut h = harness("").await;
    for end in [
        &b"\n.\r\n"[..],
        b"\r\n.\n",
        b"\r.\r\n",
        b"\n.\n",
        b"\r\n.\r",
        b"\r\n.\r\r\n",
    ] {
        let mut c = h.client(TRUSTED).await;
        c.ehlo("app.test").await;
        c.cmd("MAIL FROM:<x@acme.test>").await.assert_code(250);
        c.cmd("RCPT TO:<a@example.test>").await.assert_code(250);
        c.cmd("DATA").await.assert_code(354);
        let mut data = b"From: x@acme.test\r\n\r\nhi".to_vec();
        data.extend_from_slice(end);
        data.extend_from_slice(b"MAIL FROM:<evil@acme.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nsmuggled\r\n.\r\n");
        c.send_raw(&data).await;
        let r = c.read_reply().await;
        assert_eq!((r.code, r.enhanced()), (550, Some("5.5.2")), "{end:?}: {r}");
        // The session ends there: what followed is never run as commands.
        c.expect_closed().await;
    }
    assert!(h.jobs.try_recv().is_err(), "nothing may be queued");
    let e = h.wait_event("rejected").await;
    assert_eq!(e["rule"], "bare_line_end");
}

#[tokio::test]
async fn empty_message_right_after_data_ends_at_the_dot() {
    let h = harness("").await;
    let mut c = h.client(TRUSTED).await;
    c.ehlo("app.test").await;
    c.cmd("MAIL FROM:<x@acme.test>").await.assert_code(250);
    c.cmd("RCPT TO:<a@example.test>").await.assert_code(250);
    c.cmd("DATA").await.assert_code(354);
    // No From: so policy refuses it, but the point is that ".\r\n" ended it.
    let r = c.cmd(".").await;
    assert_eq!(r.code, 550, "{r}");
    c.cmd("NOOP").await.assert_code(250);
}

#[tokio::test]
async fn size_limits() {
    let h = harness("").await;
    let mut c = h.client(TRUSTED).await;
    c.ehlo("app.test").await;
    let r = c.cmd("MAIL FROM:<x@acme.test> SIZE=999999").await;
    assert_eq!((r.code, r.enhanced()), (552, Some("5.3.4")), "{r}");

    c.cmd("MAIL FROM:<x@acme.test>").await.assert_code(250);
    c.cmd("RCPT TO:<a@example.test>").await.assert_code(250);
    let mut big = b"From: x@acme.test\r\n\r\n".to_vec();
    while big.len() < 40_000 {
        big.extend_from_slice(
            b"0123456789012345678901234567890123456789012345678901234567890123456789\r\n",
        );
    }
    let r = c.data(&big).await;
    assert_eq!((r.code, r.enhanced()), (552, Some("5.3.4")), "{r}");
    // The session is still in step.
    c.cmd("NOOP").await.assert_code(250);

    // Max recipients.
    c.cmd("MAIL FROM:<x@acme.test>").await.assert_code(250);
    for r in ["a", "b", "c"] {
        c.cmd(&format!("RCPT TO:<{r}@example.test>"))
            .await
            .assert_code(250);
    }
    let r = c.cmd("RCPT TO:<d@example.test>").await;
    assert_eq!((r.code, r.enhanced()), (452, Some("4.5.3")), "{r}");
}

#[tokio::test]
async fn bdat_chunks() {
    let mut h = harness("").await;
    let mut c = h.client(TRUSTED).await;
    c.ehlo("app.test").await;
    // BDAT without a transaction: its bytes are read, never run as commands.
    c.send_raw(b"BDAT 6\r\nHELP\r\n").await;
    c.read_reply().await.assert_code(503);
    c.cmd("NOOP").await.assert_code(250);

    c.cmd("MAIL FROM:<x@acme.test>").await.assert_code(250);
    c.cmd("RCPT TO:<a@example.test>").await.assert_code(250);
    let part1 = b"From: x@acme.test\r\n\r\n";
    let part2 = b"binary-counted body\r\n";
    c.send_raw(format!("BDAT {}\r\n", part1.len()).as_bytes())
        .await;
    c.send_raw(part1).await;
    c.read_reply().await.assert_code(250);
    c.send_raw(format!("BDAT {} LAST\r\n", part2.len()).as_bytes())
        .await;
    c.send_raw(part2).await;
    let r = c.read_reply().await;
    r.assert_code(250);
    assert!(r.text().contains("queued as"), "{r}");
    let job = h.job().await;
    assert!(job.body.ends_with(b"\r\n\r\nbinary-counted body\r\n"));

    // A chunk over the size limit is read and refused; so are the chunks
    // pipelined after it.
    c.cmd("MAIL FROM:<x@acme.test>").await.assert_code(250);
    c.cmd("RCPT TO:<a@example.test>").await.assert_code(250);
    let big = vec![b'a'; 20_000];
    let mut data = b"BDAT 20000\r\n".to_vec();
    data.extend_from_slice(&big);
    data.extend_from_slice(b"BDAT 4 LAST\r\nHELP");
    c.send_raw(&data).await;
    let r = c.read_reply().await;
    assert_eq!((r.code, r.enhanced()), (552, Some("5.3.4")), "{r}");
    c.read_reply().await.assert_code(503);
    c.cmd("NOOP").await.assert_code(250);

    // Bare LF in a BDAT body.
    c.cmd("MAIL FROM:<x@acme.test>").await.assert_code(250);
    c.cmd("RCPT TO:<a@example.test>").await.assert_code(250);
    c.send_raw(b"BDAT 25 LAST\r\nFrom: x@acme.test\n\r\nbody\r\n")
        .await;
    c.read_reply().await.assert_code(550);
}

#[tokio::test]
async fn overlong_line_is_refused_whole() {
    let h = harness("").await;
    let mut c = h.client(TRUSTED).await;
    let mut line = b"NOOP ".to_vec();
    line.extend(std::iter::repeat_n(b'x', 8000));
    line.extend_from_slice(b"HELP\r\n");
    c.send_raw(&line).await;
    let r = c.read_reply().await;
    assert_eq!((r.code, r.enhanced()), (500, Some("5.5.6")), "{r}");
    // The tail ("HELP") was not run: the next reply is the NOOP's.
    c.cmd("NOOP").await.assert_code(250);
}

/// CVE-2011-0411: plaintext sent after STARTTLS in the same packet must not
/// be answered inside TLS. Driven by hand: the test client always waits for
/// the 220 before it goes on.
#[tokio::test]
async fn plaintext_pipelined_after_starttls_is_discarded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = harness("").await;
    let mut tcp = tokio::net::TcpStream::connect(h.addrs[STARTTLS])
        .await
        .unwrap();
    tcp.write_all(b"EHLO app.test\r\nSTARTTLS\r\nHELP\r\n")
        .await
        .unwrap();
    // Read up to and including the 220 to STARTTLS, byte by byte so that
    // nothing of the TLS stream is consumed.
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("220 2.0.0 Ready to start TLS\r\n") {
        let mut b = [0u8; 1];
        let n = within(WAIT, "STARTTLS reply", tcp.read(&mut b))
            .await
            .unwrap();
        assert_eq!(n, 1, "closed early: {:?}", String::from_utf8_lossy(&seen));
        seen.push(b[0]);
    }
    let connector =
        tokio_rustls::TlsConnector::from(Arc::new(common::smtp::insecure_client_config()));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = within(WAIT, "handshake", connector.connect(name, tcp))
        .await
        .unwrap();
    tls.write_all(b"NOOP\r\n").await.unwrap();
    let mut buf = vec![0u8; 256];
    let n = within(WAIT, "NOOP reply", tls.read(&mut buf))
        .await
        .unwrap();
    let reply = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(
        reply.starts_with("250 "),
        "the injected HELP was answered: {reply:?}"
    );

    // And the state is reset: EHLO is needed again (RFC 3207 §4.2).
    tls.write_all(b"MAIL FROM:<billing@acme.test>\r\n")
        .await
        .unwrap();
    let n = within(WAIT, "MAIL reply", tls.read(&mut buf))
        .await
        .unwrap();
    assert!(
        buf[..n].starts_with(b"503 5.5.1"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
}

#[tokio::test]
async fn bad_commands_end_the_session() {
    let h = harness("max_bad_commands = 2").await;
    let mut c = h.client(TRUSTED).await;
    c.cmd("FOO").await.assert_code(500);
    c.cmd("BAR").await.assert_code(500);
    let r = c.cmd("BAZ").await;
    assert_eq!((r.code, r.enhanced()), (421, Some("4.7.0")), "{r}");
    c.expect_closed().await;
}

#[tokio::test]
async fn connection_limit_per_ip() {
    let h = harness("max_connections_per_ip = 2").await;
    let _a = h.client(TRUSTED).await;
    let _b = h.client(TRUSTED).await;
    let c = TestClient::connect(h.addrs[TRUSTED]).await;
    assert_eq!(c.greeting.code, 421);
    assert!(
        c.greeting.text().contains("from your IP address"),
        "{}",
        c.greeting
    );
    drop(_a);
    // The slot comes back when the session ends.
    for _ in 0..100 {
        let c = TestClient::connect(h.addrs[TRUSTED]).await;
        if c.greeting.code == 220 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("slot not released");
}

#[tokio::test]
async fn command_timeout_says_421() {
    let h = harness("command_timeout = \"1s\"").await;
    let mut c = h.client(TRUSTED).await;
    let r = within(WAIT, "timeout reply", c.read_reply()).await;
    assert_eq!((r.code, r.enhanced()), (421, Some("4.4.2")), "{r}");
}

#[tokio::test]
async fn shutdown_closes_idle_sessions_and_lets_transactions_finish() {
    let mut h = harness("shutdown_grace = \"10s\"").await;
    let mut idle = h.client(TRUSTED).await;
    let mut busy = h.client(TRUSTED).await;
    busy.ehlo("app.test").await;
    busy.cmd("MAIL FROM:<x@acme.test>").await.assert_code(250);
    busy.cmd("RCPT TO:<a@example.test>").await.assert_code(250);

    h.shutdown.cancel();
    let r = idle.read_reply().await;
    assert_eq!((r.code, r.enhanced()), (421, Some("4.3.2")), "{r}");
    // The transaction in progress completes.
    busy.data(b"From: x@acme.test\r\n\r\nlast one\r\n")
        .await
        .assert_code(250);
    h.job().await;
    // Then that session is told too.
    let r = busy.cmd("MAIL FROM:<x@acme.test>").await;
    assert_eq!(r.code, 421, "{r}");
    let handle = h.handle.take().unwrap();
    within(WAIT, "receive stage to stop", handle).await.unwrap();
    assert!(
        tokio::net::TcpStream::connect(h.addrs[TRUSTED])
            .await
            .is_err()
    );
}

/// A REFUSED (or SERVFAIL) answer says nothing about the domain: 451, never
/// 5xx.
#[tokio::test]
async fn refused_dns_answer_is_temporary() {
    let h = harness("").await;
    let mut c = h.client(TRUSTED).await;
    c.ehlo("app.test").await;
    c.cmd("MAIL FROM:<x@acme.test>").await.assert_code(250);
    // The test server is authoritative for "test." only and refuses this.
    let r = c.cmd("RCPT TO:<bob@outside.example>").await;
    assert_eq!((r.code, r.enhanced()), (451, Some("4.4.3")), "{r}");
}

// ---- Hostile and slow clients ----

/// Eight sessions wait at 334 with a guess each; the guesses arrive at once.
/// Failures are counted when checked, so only `max_auth_failures` (plus the
/// checks already running) are ever checked, the rest get 421, and a
/// session that reached 334 before the lockout cannot log in after it, not
/// even with the right password.
#[tokio::test]
async fn auth_limit_holds_for_sessions_already_waiting_at_334() {
    let h = harness("max_auth_failures = 3\nauth_failure_delay = \"0s\"").await;
    let mut waiting = Vec::new();
    for _ in 0..9 {
        let mut c = TestClient::connect_tls(h.addrs[IMPLICIT]).await;
        c.ehlo("app.test").await.assert_code(250);
        c.cmd("AUTH PLAIN").await.assert_code(334);
        waiting.push(c);
    }
    let last = waiting.pop().unwrap();
    let mut guesses = tokio::task::JoinSet::new();
    for (i, mut c) in waiting.into_iter().enumerate() {
        guesses.spawn(async move {
            let creds = base64_plain("acme", &format!("guess{i}"));
            c.cmd(&creds).await
        });
    }
    let (mut refused, mut locked) = (0, 0);
    while let Some(r) = guesses.join_next().await {
        let r = r.unwrap();
        match r.code {
            535 => refused += 1,
            421 => {
                assert_eq!(r.enhanced(), Some("4.7.0"), "{r}");
                locked += 1;
            }
            _ => panic!("unexpected reply to a guess: {r}"),
        }
    }
    assert!(
        (3..=3 + herald::receive::auth::VERIFICATIONS_PER_IP - 1).contains(&refused),
        "{refused} guesses were checked, {locked} locked out"
    );
    assert_eq!(refused + locked, 8);
    let mut last = last;
    let r = last.cmd(&base64_plain("acme", PASSWORD)).await;
    assert_eq!((r.code, r.enhanced()), (421, Some("4.7.0")), "{r}");
    last.expect_closed().await;
}

fn base64_plain(user: &str, password: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"))
}

/// A command line trickling in a byte at a time is due within
/// `command_timeout` of its first byte: the trickle does not reset it.
#[tokio::test]
async fn a_command_line_trickling_in_times_out() {
    let h = harness("command_timeout = \"1s\"").await;
    let mut c = h.client(TRUSTED).await;
    c.ehlo("app.test").await.assert_code(250);
    let reply = within(WAIT, "the timeout reply", async {
        for b in b"NOOP NOOP NOOP NOOP NOOP NOOP NOOP NOOP NOOP NOOP"
            .iter()
            .cycle()
        {
            c.send_raw(&[*b]).await;
            // The next byte well inside the timeout, as a slow attacker would.
            if let Ok(Ok(Some(r))) =
                tokio::time::timeout(Duration::from_millis(250), c.try_read_reply()).await
            {
                return r;
            }
        }
        unreachable!()
    })
    .await;
    assert_eq!(
        (reply.code, reply.enhanced()),
        (421, Some("4.4.2")),
        "{reply}"
    );
}

/// A transaction is due within `transaction_timeout` of its MAIL FROM,
/// however lively its commands (here: the command timeout is a minute).
#[tokio::test]
async fn a_transaction_has_a_deadline() {
    let h =
        harness("command_timeout = \"60s\"\ndata_timeout = \"1s\"\ntransaction_timeout = \"1s\"")
            .await;
    let mut c = h.client(TRUSTED).await;
    c.ehlo("app.test").await.assert_code(250);
    c.cmd("MAIL FROM:<x@acme.test>").await.assert_code(250);
    let r = within(WAIT, "the timeout reply", c.read_reply()).await;
    assert_eq!((r.code, r.enhanced()), (421, Some("4.4.2")), "{r}");
    c.expect_closed().await;
}

/// NOOP, RSET and the like are capped between messages; an accepted
/// message starts the count again.
#[tokio::test]
async fn junk_commands_are_capped_between_messages() {
    let mut h = harness("max_junk_commands = 3").await;
    let mut c = h.client(TRUSTED).await;
    c.ehlo("app.test").await.assert_code(250);
    c.cmd("NOOP").await.assert_code(250);
    c.cmd("RSET").await.assert_code(250);
    c.cmd("MAIL FROM:<x@acme.test>").await.assert_code(250);
    c.cmd("RCPT TO:<a@example.test>").await.assert_code(250);
    c.data(MESSAGE).await.assert_code(250);
    h.job().await;
    for cmd in ["NOOP", "VRFY x", "HELP"] {
        c.cmd(cmd).await;
    }
    let r = c.cmd("NOOP").await;
    assert_eq!((r.code, r.enhanced()), (421, Some("4.7.0")), "{r}");
    c.expect_closed().await;
}

/// BDAT from a client that neither logged in nor started a transaction is
/// refused and the connection closed at once: its "chunk" is never read.
#[tokio::test]
async fn bdat_from_a_stranger_closes_at_once() {
    let h = harness("").await;
    for chunk in ["BDAT 9223372036854775807", "BDAT 1000000 LAST", "BDAT 5"] {
        let mut c = h.client(STARTTLS).await;
        c.ehlo("app.test").await.assert_code(250);
        let r = c.cmd(chunk).await;
        assert!(r.is_permanent(), "{chunk}: {r}");
        c.expect_closed().await;
    }
    // A logged-in client's absurd chunk too.
    let mut c = h.authed().await;
    c.cmd("MAIL FROM:<x@acme.test>").await.assert_code(250);
    c.cmd("RCPT TO:<a@example.test>").await.assert_code(250);
    let r = c.cmd("BDAT 9000000000").await;
    assert_eq!(r.code, 552, "{r}");
    c.expect_closed().await;
}

/// A NUL byte in a message is refused, in DATA and in BDAT (a receiver
/// that strips NULs would see another message); the session goes on.
#[tokio::test]
async fn nul_bytes_are_refused() {
    let mut h = harness("").await;
    let mut c = h.client(TRUSTED).await;
    c.ehlo("app.test").await;
    c.cmd("MAIL FROM:<x@acme.test>").await.assert_code(250);
    c.cmd("RCPT TO:<a@example.test>").await.assert_code(250);
    c.cmd("DATA").await.assert_code(354);
    c.send_raw(b"From: x@acme.test\r\n\r\nhi\r\n\x00.\r\nMAIL FROM:<evil@acme.test>\r\n.\r\n")
        .await;
    let r = c.read_reply().await;
    assert_eq!((r.code, r.enhanced()), (550, Some("5.6.0")), "{r}");
    let e = h.wait_event("rejected").await;
    assert_eq!(e["rule"], "nul_byte");

    c.cmd("MAIL FROM:<x@acme.test>").await.assert_code(250);
    c.cmd("RCPT TO:<a@example.test>").await.assert_code(250);
    let body = b"From: x@acme.test\r\n\r\nnul\x00here\r\n";
    c.send_raw(format!("BDAT {} LAST\r\n", body.len()).as_bytes())
        .await;
    c.send_raw(body).await;
    let r = c.read_reply().await;
    assert_eq!((r.code, r.enhanced()), (550, Some("5.6.0")), "{r}");

    // The session is in step: a clean message goes through.
    c.cmd("MAIL FROM:<x@acme.test>").await.assert_code(250);
    c.cmd("RCPT TO:<a@example.test>").await.assert_code(250);
    c.data(MESSAGE).await.assert_code(250);
    let job = h.job().await;
    assert!(!job.body.contains(&0));
}

/// `max_receiving_bytes` bounds the message bytes held at once over all
/// sessions: a DATA that cannot be held gets 452 4.3.1 at once, a message
/// that outgrows the room is read to its end and refused with 452, and the
/// room comes back when a message is done.
#[tokio::test]
async fn receiving_bytes_are_bounded() {
    let mut h = harness("max_receiving_bytes = \"40KiB\"").await;
    let addr = h.addrs[TRUSTED];
    let start = |size: Option<u32>| async move {
        let mut c = TestClient::connect(addr).await;
        c.greeting.assert_code(220);
        c.ehlo("app.test").await;
        let mail = match size {
            Some(n) => format!("MAIL FROM:<x@acme.test> SIZE={n}"),
            None => "MAIL FROM:<x@acme.test>".to_string(),
        };
        c.cmd(&mail).await.assert_code(250);
        c.cmd("RCPT TO:<a@example.test>").await.assert_code(250);
        c
    };
    // 16,000 bytes announced: held from DATA on.
    let mut big = start(Some(16_000)).await;
    big.cmd("DATA").await.assert_code(354);
    let mut big2 = start(Some(16_000)).await;
    big2.cmd("DATA").await.assert_code(354);
    // The next one does not fit next to them.
    let mut next = start(None).await;
    let r = next.cmd("DATA").await;
    assert_eq!((r.code, r.enhanced()), (452, Some("4.3.1")), "{r}");
    let e = h.wait_event("rejected").await;
    assert_eq!(e["rule"], "receiving_budget");
    // The first finishes; its room comes back.
    big.send_raw(b"From: x@acme.test\r\n\r\nsmall after all\r\n.\r\n")
        .await;
    big.read_reply().await.assert_code(250);
    h.job().await;
    big2.send_raw(b"From: x@acme.test\r\n\r\nsmall too\r\n.\r\n")
        .await;
    big2.read_reply().await.assert_code(250);
    h.job().await;

    // Next to a large one, two small ones fit; one of them growing past the
    // room is refused at its end, and the others are not disturbed.
    let mut large = start(Some(16_000)).await;
    large.cmd("DATA").await.assert_code(354);
    let mut a = start(None).await;
    let mut b = start(None).await;
    a.cmd("DATA").await.assert_code(354);
    b.cmd("DATA").await.assert_code(354);
    let mut grown = b"From: x@acme.test\r\n\r\n".to_vec();
    grown.extend(std::iter::repeat_n(b"0123456789abcdefghijklmnopqrstuvwxyz\r\n", 400).flatten());
    a.send_raw(&grown).await;
    a.send_raw(b".\r\n").await;
    let r = a.read_reply().await;
    assert_eq!((r.code, r.enhanced()), (452, Some("4.3.1")), "{r}");
    b.send_raw(b"From: x@acme.test\r\n\r\nfine\r\n.\r\n").await;
    b.read_reply().await.assert_code(250);
    large
        .send_raw(b"From: x@acme.test\r\n\r\nfine too\r\n.\r\n")
        .await;
    large.read_reply().await.assert_code(250);
}

/// Clients not yet known (no login from their IP, not trusted) may hold
/// few connections per IP and never the reserved slots; a login makes the
/// IP known.
#[tokio::test]
async fn strangers_get_few_connections_and_never_the_reserve() {
    use std::net::Ipv4Addr;
    let h = harness(
        "max_connections = 8\nmax_connections_per_ip = 8\nreserved_connections = 3\nmax_unauthenticated_per_ip = 2",
    )
    .await;
    let at = |n: u8| Ipv4Addr::new(127, 0, 0, n);
    let connect = |n: u8, listener: usize| TestClient::connect_from(at(n), h.addrs[listener]);
    let mut strangers = Vec::new();
    for n in [11, 11] {
        let c = connect(n, STARTTLS).await;
        c.greeting.assert_code(220);
        strangers.push(c);
    }
    // A third from one IP: over the per-IP cap for strangers.
    let c = connect(11, STARTTLS).await;
    assert_eq!(c.greeting.code, 421, "{}", c.greeting);
    assert!(
        c.greeting.text().contains("not logged in"),
        "{}",
        c.greeting
    );
    for n in [12, 12, 13] {
        let c = connect(n, STARTTLS).await;
        c.greeting.assert_code(220);
        strangers.push(c);
    }
    // Five strangers' slots are all there are (8 less 3 reserved).
    let c = connect(14, STARTTLS).await;
    assert_eq!(c.greeting.code, 421, "{}", c.greeting);
    assert!(
        c.greeting.text().contains("kept for clients"),
        "{}",
        c.greeting
    );
    // A trusted client takes a reserved slot.
    connect(15, TRUSTED).await.greeting.assert_code(220);
    // A stranger that logs in leaves the strangers' count, and its IP is
    // known from then on: it gets a reserved slot too.
    let mut app = strangers.remove(0);
    app.ehlo("app.test").await;
    app.starttls().await.assert_code(220);
    app.ehlo("app.test").await;
    app.auth_plain("acme", PASSWORD).await.assert_code(235);
    connect(11, STARTTLS).await.greeting.assert_code(220);
}

/// A tenant's From: header must name one of its own domains (unless the
/// tenant says `bind_from_header = false`); a German company name in it is
/// just text.
#[tokio::test]
async fn from_header_is_bound_to_the_tenants_domains() {
    let mut h = harness("").await;
    let mut c = h.authed().await;
    c.cmd("MAIL FROM:<billing@acme.test>")
        .await
        .assert_code(250);
    c.cmd("RCPT TO:<a@example.test>").await.assert_code(250);
    let r = c
        .data(b"From: CEO <ceo@victim.test>\r\nSubject: pay now\r\n\r\nurgent\r\n")
        .await;
    assert_eq!((r.code, r.enhanced()), (550, Some("5.7.1")), "{r}");
    assert!(r.text().contains("<ceo@victim.test>"), "{r}");
    let e = h.wait_event("rejected").await;
    assert_eq!(e["rule"], "from_not_allowed");

    c.cmd("MAIL FROM:<billing@acme.test>")
        .await
        .assert_code(250);
    c.cmd("RCPT TO:<a@example.test>").await.assert_code(250);
    let german = "From: Grünbäume GmbH <billing@acme.test>\r\nTo: Jürgen Groß <a@example.test>\r\nSubject: Rechnung Nr. 42 für Straße 5\r\n\r\nSehr geehrte Damen und Herren, anbei Ihre Rechnung.\r\n";
    c.data(german.as_bytes()).await.assert_code(250);
    let job = h.job().await;
    let name = "Grünbäume".as_bytes();
    assert!(job.body.windows(name.len()).any(|w| w == name));

    let mut loose = h.client(STARTTLS).await;
    loose.ehlo("app.test").await;
    loose.starttls().await.assert_code(220);
    loose.ehlo("app.test").await;
    loose.auth_plain("loose", PASSWORD).await.assert_code(235);
    loose
        .cmd("MAIL FROM:<news@loose.test>")
        .await
        .assert_code(250);
    loose.cmd("RCPT TO:<a@example.test>").await.assert_code(250);
    loose
        .data(b"From: Partner <news@partner.test>\r\n\r\nhi\r\n")
        .await
        .assert_code(250);
}

/// An app's HTML invoice with a 2,000-character line is accepted and
/// queued with every line within 998 octets (the HTML part re-encoded as
/// quoted-printable), and the `received` event says so; a header line that
/// cannot be folded is refused at once, naming the line.
#[tokio::test]
async fn long_lines_are_reencoded_or_refused_at_submission() {
    let mut h = harness("").await;
    let mut c = h.authed().await;
    let row = "<td>Grünbäume GmbH, Straße 5</td>".repeat(60);
    assert!(row.len() > 2000);
    let message = format!(
        "From: Billing <billing@acme.test>\r\nTo: bob@example.test\r\nSubject: Rechnung 42\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\
         Content-Transfer-Encoding: 8bit\r\n\r\n<html><table><tr>{row}</tr></table></html>\r\n"
    );
    c.cmd("MAIL FROM:<billing@acme.test> BODY=8BITMIME")
        .await
        .assert_code(250);
    c.cmd("RCPT TO:<bob@example.test>").await.assert_code(250);
    c.data(message.as_bytes()).await.assert_code(250);
    let job = h.job().await;
    let longest = job
        .body
        .split(|&b| b == b'\n')
        .map(<[u8]>::len)
        .max()
        .unwrap();
    assert!(longest <= 1000, "a line of {longest} octets was queued");
    let text = String::from_utf8_lossy(&job.body);
    assert!(
        text.contains("Content-Transfer-Encoding: quoted-printable"),
        "{text}"
    );
    let e = h.wait_event("received").await;
    assert!(
        e["warnings"][0].as_str().unwrap().contains("re-encoded"),
        "{e}"
    );

    c.cmd("MAIL FROM:<billing@acme.test>")
        .await
        .assert_code(250);
    c.cmd("RCPT TO:<bob@example.test>").await.assert_code(250);
    let token = "x".repeat(1500);
    let r = c
        .data(format!("From: billing@acme.test\r\nX-Tracking: {token}\r\n\r\nhi\r\n").as_bytes())
        .await;
    assert_eq!((r.code, r.enhanced()), (554, Some("5.6.3")), "{r}");
    assert!(r.text().contains("line 2"), "{r}");
}
