//! DKIM signing end to end: an app submits to a herald relay configured
//! with `[[dkim]]` keys; herald delivers to an MX on loopback; the message
//! as the MX received it is verified with mail-auth's verifier, which reads
//! the public keys from the test DNS server (`S._domainkey.D` TXT records).
//!
//! Keys are generated at test time with herald's own generator (the one
//! behind `herald dkim keygen`); `tests/fixtures/dkim-*.pem` are test-only
//! keys made with openssl (a 1024-bit RSA key that must be refused, a
//! PKCS#1 RSA key, an openssl Ed25519 key).
//!
//! SMTPUTF8: the usual test MX (mailin-embedded) refuses the SMTPUTF8 MAIL
//! parameter, and herald rightly bounces such a message there (RFC 6531
//! §3.2). The SMTPUTF8 case is therefore delivered to [`Utf8Mx`], a small
//! MX in this file that offers 8BITMIME and SMTPUTF8 and keeps what it got.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::dkim::{verifier, verify};
use common::dns::{TestDns, Zone};
use common::mx::{MxSink, SinkReply, ip, reserve_port};
use common::relay::{Setup, TestRelay, queue_id};
use common::smtp::TestClient;
use common::within;
use herald::config::{Config, DkimAlgorithm};
use herald::policy::dkim::{self, Published, Signer};
use mail_auth::DkimResult;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(20);

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A generated key: its file and the TXT record text for DNS.
struct TestKey {
    domain: &'static str,
    selector: &'static str,
    algorithm: DkimAlgorithm,
    path: PathBuf,
    record: String,
}

impl TestKey {
    fn new(
        dir: &Path,
        domain: &'static str,
        selector: &'static str,
        algorithm: DkimAlgorithm,
    ) -> TestKey {
        let key = dkim::generate(algorithm, 2048).expect("key generation");
        let path = dir.join(format!("{domain}.{selector}.key"));
        dkim::write_key_file(&path, &key.pem).expect("write key");
        TestKey {
            domain,
            selector,
            algorithm,
            path,
            record: key.txt_record(),
        }
    }

    fn config(&self, extra: &str) -> String {
        let alg = match self.algorithm {
            DkimAlgorithm::RsaSha256 => "rsa-sha256",
            DkimAlgorithm::Ed25519Sha256 => "ed25519-sha256",
        };
        format!(
            "[[dkim]]\ndomain = \"{}\"\nselector = \"{}\"\nalgorithm = \"{alg}\"\nkey = \"{}\"\n{extra}\n",
            self.domain,
            self.selector,
            self.path.display()
        )
    }

    fn dns_name(&self) -> String {
        format!("{}._domainkey.{}", self.selector, self.domain)
    }
}

/// An MX that offers 8BITMIME and SMTPUTF8 (which mailin-embedded does not)
/// and hands every message it accepts, un-dot-stuffed, to a channel.
struct Utf8Mx {
    messages: mpsc::UnboundedReceiver<Vec<u8>>,
    task: tokio::task::JoinHandle<()>,
}

impl Utf8Mx {
    fn start(listener: std::net::TcpListener) -> Utf8Mx {
        listener.set_nonblocking(true).expect("nonblocking");
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        let (tx, messages) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _ = Utf8Mx::session(stream, tx).await;
                });
            }
        });
        Utf8Mx { messages, task }
    }

    async fn session(
        stream: tokio::net::TcpStream,
        tx: mpsc::UnboundedSender<Vec<u8>>,
    ) -> std::io::Result<()> {
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r);
        w.write_all(b"220 utf8-mx ESMTP\r\n").await?;
        let mut line = Vec::new();
        loop {
            line.clear();
            if r.read_until(b'\n', &mut line).await? == 0 {
                return Ok(());
            }
            let verb = String::from_utf8_lossy(&line[..line.len().min(4)]).to_ascii_uppercase();
            let reply: &[u8] = match verb.as_str() {
                "EHLO" => {
                    b"250-utf8-mx\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 ENHANCEDSTATUSCODES\r\n"
                }
                "HELO" | "MAIL" | "RCPT" | "RSET" | "NOOP" => b"250 2.0.0 Ok\r\n",
                "QUIT" => {
                    w.write_all(b"221 2.0.0 Bye\r\n").await?;
                    return Ok(());
                }
                "DATA" => {
                    w.write_all(b"354 Go ahead\r\n").await?;
                    let mut data = Vec::new();
                    loop {
                        line.clear();
                        if r.read_until(b'\n', &mut line).await? == 0 {
                            return Ok(());
                        }
                        if line == b".\r\n" {
                            break;
                        }
                        let l = line.strip_prefix(b".").unwrap_or(&line);
                        data.extend_from_slice(l);
                    }
                    let _ = tx.send(data);
                    b"250 2.0.0 Ok: kept\r\n"
                }
                _ => b"502 5.5.2 Not here\r\n",
            };
            w.write_all(reply).await?;
        }
    }

    async fn next(&mut self) -> Vec<u8> {
        within(WAIT, "a message at the SMTPUTF8 MX", self.messages.recv())
            .await
            .expect("the MX is running")
    }
}

impl Drop for Utf8Mx {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// DNS with MX records and the keys' TXT records, an accepting mailin MX
/// on 127.0.0.2 (`one.test`), an SMTPUTF8 MX on 127.0.0.3 (`utf8.test`),
/// and a relay with these `[[dkim]]` sections.
struct World {
    dns: TestDns,
    sink: MxSink,
    utf8: Utf8Mx,
    relay: TestRelay,
    _keys: tempfile::TempDir,
}

async fn world(
    keys_dir: tempfile::TempDir,
    keys: &[(&TestKey, &str)],
    published: &[&TestKey],
) -> World {
    let mut zone = Zone::new("test.")
        .mx("one.test", 10, "mx.one.test")
        .a("mx.one.test", ip(2))
        .mx("utf8.test", 10, "mx.utf8.test")
        .a("mx.utf8.test", ip(3));
    for k in published {
        zone = zone.txt(&k.dns_name(), &k.record);
    }
    let dns = TestDns::start(zone).await;
    let (port, mut listeners) = reserve_port(&[ip(2), ip(3)]);
    let utf8 = Utf8Mx::start(listeners.pop().unwrap());
    let sink = MxSink::start_on(listeners.pop().unwrap(), |_, _| SinkReply::Accept).unwrap();
    let mut setup = Setup::new(dns.addr, port);
    setup.extra = keys.iter().map(|(k, extra)| k.config(extra)).collect();
    let relay = TestRelay::start(setup).await;
    World {
        dns,
        sink,
        utf8,
        relay,
        _keys: keys_dir,
    }
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).expect("fixture")
}

/// Submits over STARTTLS + AUTH with this MAIL command; returns the queue id.
async fn submit(relay: &TestRelay, mail: &str, rcpt: &str, body: &[u8]) -> String {
    let mut c = relay.client().await;
    c.cmd(mail).await.assert_code(250);
    c.cmd(&format!("RCPT TO:<{rcpt}>")).await.assert_code(250);
    let id = queue_id(&c.data(body).await);
    let _ = c.cmd("QUIT").await;
    id
}

fn assert_all_pass(got: &[(String, String, DkimResult)], want: &[(&str, &str)], what: &str) {
    let mut names: Vec<(&str, &str)> = got
        .iter()
        .map(|(d, s, _)| (d.as_str(), s.as_str()))
        .collect();
    names.sort();
    let mut want = want.to_vec();
    want.sort();
    assert_eq!(names, want, "{what}: signatures {got:?}");
    for (d, s, r) in got {
        assert_eq!(
            *r,
            DkimResult::Pass,
            "{what}: {s}._domainkey.{d} gave {r:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_and_ed25519_dual_signatures_verify_for_pdf_8bit_and_smtputf8_mail() {
    let dir = tempfile::tempdir().unwrap();
    let rsa = TestKey::new(dir.path(), "acme.test", "rsa1", DkimAlgorithm::RsaSha256);
    let ed = TestKey::new(dir.path(), "acme.test", "ed1", DkimAlgorithm::Ed25519Sha256);
    let w = world(dir, &[(&rsa, ""), (&ed, "")], &[&rsa, &ed]).await;
    let auth = verifier(w.dns.addr);
    let both = [("acme.test", "rsa1"), ("acme.test", "ed1")];

    // An invoice with a PDF attachment.
    let body = read("invoice-pdf.eml");
    let id = submit(
        &w.relay,
        "MAIL FROM:<billing@acme.test>",
        "bob@one.test",
        &body,
    )
    .await;
    let got = w.sink.wait_for_messages(1, WAIT);
    let data = &got[0].data;
    assert!(data.ends_with(&body), "body changed on the way");
    // Both signatures on top, in config order, then herald's Received:.
    let text = String::from_utf8_lossy(data);
    let rsa_at = text
        .find("DKIM-Signature: v=1; a=rsa-sha256; s=rsa1; d=acme.test")
        .unwrap();
    let ed_at = text
        .find("DKIM-Signature: v=1; a=ed25519-sha256; s=ed1; d=acme.test")
        .unwrap();
    let received_at = text.find("Received: from app.test").unwrap();
    assert!(rsa_at == 0 && ed_at < received_at, "{text}");
    assert!(text[..received_at + 400].contains(&id));
    assert_all_pass(&verify(&auth, data).await, &both, "invoice-pdf.eml");

    // The verifier really checks: a changed body fails both signatures
    // (mail-auth reports a body-hash mismatch as Neutral, others as Fail).
    let mut tampered = data.clone();
    let at = tampered.len() - body.len() + body.windows(6).position(|w| w == b"Amount").unwrap();
    tampered[at] = b'a';
    for (_, s, r) in verify(&auth, &tampered).await {
        assert!(
            matches!(r, DkimResult::Fail(_) | DkimResult::Neutral(_)),
            "{s}: tampered body gave {r:?}"
        );
    }

    // 8-bit body (BODY=8BITMIME), UTF-8 in encoded words.
    let body = read("utf8-body-8bitmime.eml");
    submit(
        &w.relay,
        "MAIL FROM:<billing@acme.test> BODY=8BITMIME",
        "bob@one.test",
        &body,
    )
    .await;
    let got = w.sink.wait_for_messages(2, WAIT);
    assert!(got[1].data.ends_with(&body));
    assert_all_pass(
        &verify(&auth, &got[1].data).await,
        &both,
        "utf8-body-8bitmime.eml",
    );

    // Raw UTF-8 in the header section (SMTPUTF8), to an MX that offers it.
    let body = read("utf8-smtputf8.eml");
    let mut utf8 = w.utf8;
    submit(
        &w.relay,
        "MAIL FROM:<billing@acme.test> BODY=8BITMIME SMTPUTF8",
        "josé@utf8.test",
        &body,
    )
    .await;
    let data = utf8.next().await;
    assert!(data.ends_with(&body), "{}", String::from_utf8_lossy(&data));
    assert!(data.starts_with(b"DKIM-Signature: "));
    assert_all_pass(&verify(&auth, &data).await, &both, "utf8-smtputf8.eml");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_without_a_key_gets_the_fallback_signature() {
    let dir = tempfile::tempdir().unwrap();
    let acme = TestKey::new(dir.path(), "acme.test", "rsa1", DkimAlgorithm::RsaSha256);
    let relay_key = TestKey::new(dir.path(), "relay.test", "r1", DkimAlgorithm::Ed25519Sha256);
    let w = world(
        dir,
        &[(&acme, ""), (&relay_key, "fallback = true")],
        &[&acme, &relay_key],
    )
    .await;
    let auth = verifier(w.dns.addr);

    // A trusted-network client (no tenant) sending as a domain herald has
    // no key for: the relay's own key signs.
    let mut c = TestClient::connect(w.relay.trusted).await;
    c.ehlo("app.test").await.assert_code(250);
    let body =
        b"From: App <app@elsewhere.test>\r\nTo: bob@one.test\r\nSubject: Hi\r\n\r\nHello\r\n";
    c.send_mail("app@elsewhere.test", &["bob@one.test"], body)
        .await
        .assert_code(250);
    let got = w.sink.wait_for_messages(1, WAIT);
    assert_all_pass(
        &verify(&auth, &got[0].data).await,
        &[("relay.test", "r1")],
        "fallback",
    );

    // The tenant's own domain: only its key, not the fallback.
    let body = b"From: Billing <billing@acme.test>\r\nTo: bob@one.test\r\nSubject: Invoice\r\n\r\nHello\r\n";
    w.relay
        .submit("billing@acme.test", &["bob@one.test"], body)
        .await
        .assert_code(250);
    let got = w.sink.wait_for_messages(2, WAIT);
    assert_all_pass(
        &verify(&auth, &got[1].data).await,
        &[("acme.test", "rsa1")],
        "own key",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_keys_stop_the_start_and_fail_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
        [[listener]]
        address = "127.0.0.1:0"
        tls = "none"
        auth = "none"
        trusted_networks = ["127.0.0.0/8"]
        [server]
        spool_dir = "{d}/spool"
        [events]
        log = "{d}/events.jsonl"
        [admin]
        address = "127.0.0.1:0"
        [dns]
        nameservers = ["127.0.0.1:9"]
        [[dkim]]
        domain = "acme.test"
        selector = "old"
        key = "{small}"
        [[dkim]]
        domain = "acme.test"
        selector = "gone"
        algorithm = "ed25519-sha256"
        key = "{d}/missing.key"
        "#,
        d = dir.path().display(),
        small = fixture("dkim-rsa1024.pem").display(),
    );
    let config = Config::from_toml_str(&text).expect("the file itself is valid");
    let errs = herald::server::check(&config).await.unwrap_err();
    let shown = errs.to_string();
    assert!(
        shown.contains("dkim[0].key")
            && shown.contains("dkim-rsa1024.pem")
            && shown.contains("2048"),
        "{shown}"
    );
    assert!(
        shown.contains("dkim[1].key") && shown.contains("missing.key"),
        "{shown}"
    );
    let pem = std::fs::read_to_string(fixture("dkim-rsa1024.pem")).unwrap();
    assert!(
        !shown.contains(&pem.lines().nth(1).unwrap()[..16]),
        "key material in {shown}"
    );

    let err = match herald::server::start(config).await {
        Ok(_) => panic!("the relay started with an unusable key"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("dkim[0].key") && err.contains("dkim[1].key"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_compared_with_what_dns_publishes() {
    let dir = tempfile::tempdir().unwrap();
    let good = TestKey::new(dir.path(), "acme.test", "good", DkimAlgorithm::RsaSha256);
    let stale = TestKey::new(
        dir.path(),
        "acme.test",
        "stale",
        DkimAlgorithm::Ed25519Sha256,
    );
    let other = TestKey::new(dir.path(), "acme.test", "x", DkimAlgorithm::Ed25519Sha256);
    let absent = TestKey::new(
        dir.path(),
        "acme.test",
        "absent",
        DkimAlgorithm::Ed25519Sha256,
    );
    let dns = TestDns::start(
        Zone::new("test.")
            .txt(&good.dns_name(), &good.record)
            // Another key published under this selector.
            .txt(&stale.dns_name(), &other.record),
    )
    .await;
    let text = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\ntls = \"none\"\nauth = \"none\"\ntrusted_networks = [\"127.0.0.0/8\"]\n[dns]\nnameservers = [\"{}\"]\ntimeout = \"2s\"\nattempts = 1\n{}{}{}",
        dns.addr,
        good.config(""),
        stale.config(""),
        absent.config("")
    );
    let config = Config::from_toml_str(&text).unwrap();
    let signer = Signer::load(&config).unwrap();
    let dns_client = herald::dns::Dns::new(&config.dns).unwrap();
    let found: Vec<Published> = within(
        WAIT,
        "DNS checks",
        dkim::check_published(&signer, &dns_client),
    )
    .await
    .into_iter()
    .map(|(_, p)| p)
    .collect();
    assert_eq!(
        found,
        [Published::Matches, Published::Mismatch, Published::Missing]
    );
    // check-config reports these as warnings, not errors.
    herald::server::check(&config).await.expect("warnings only");
}
