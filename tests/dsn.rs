//! Bounce reports end to end: an app submits through herald, the recipient's
//! MX (a mailin sink on 127.0.0.2) refuses or defers, and herald mails a DSN
//! with the null sender to the sender's own MX — a small tokio sink on
//! 127.0.0.3 written here, because the mailin sink answers `MAIL FROM:<>`
//! with 500. The DSN is parsed back with mail-parser, and its DKIM
//! signature verified with mail-auth against the test DNS. A late bounce
//! posted to the bounce listener (VERP on) makes a DSN the same way.

mod common;

use common::reports::Dsn;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::dns::{TestDns, Zone};
use common::mx::{MxSink, SinkReply, ip, reserve_port};
use common::relay::{Setup, TestRelay, field, queue_id};
use herald::config::DkimAlgorithm;
use herald::policy::dkim;
use mail_auth::DkimResult;
use mail_parser::{MessageParser, MimeHeaders, PartType};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::Notify;

const WAIT: Duration = Duration::from_secs(20);

/// A message the null-sender sink accepted.
#[derive(Clone, Debug)]
struct Got {
    from: String,
    rcpts: Vec<String>,
    data: Vec<u8>,
}

/// The sender's MX: a minimal SMTP server that accepts everything,
/// including the null reverse path, and keeps what it got.
struct NullSenderSink {
    got: Arc<Mutex<Vec<Got>>>,
    changed: Arc<Notify>,
}

impl NullSenderSink {
    fn start(listener: std::net::TcpListener) -> NullSenderSink {
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let changed = Arc::new(Notify::new());
        let (g, c) = (got.clone(), changed.clone());
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let (g, c) = (g.clone(), c.clone());
                tokio::spawn(async move {
                    let _ = session(sock, g, c).await;
                });
            }
        });
        NullSenderSink { got, changed }
    }

    fn messages(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Got> {
        common::within(timeout, &format!("{n} DSN(s) at the sender's MX"), async {
            loop {
                let wait = self.changed.notified();
                let got = self.messages();
                if got.len() >= n {
                    return got;
                }
                wait.await;
            }
        })
        .await
    }
}

async fn session(
    sock: tokio::net::TcpStream,
    got: Arc<Mutex<Vec<Got>>>,
    changed: Arc<Notify>,
) -> std::io::Result<()> {
    let (r, mut w) = sock.into_split();
    let mut r = BufReader::new(r);
    w.write_all(b"220 sender-mx.test ESMTP\r\n").await?;
    let mut cur = Got {
        from: String::new(),
        rcpts: Vec::new(),
        data: Vec::new(),
    };
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let cmd = line.trim_end().to_string();
        let upper = cmd.to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO") {
            // Speaks DSN (RFC 3461), so NOTIFY and ORCPT come along.
            b"250-sender-mx.test\r\n250 DSN\r\n"
        } else if upper.starts_with("HELO") {
            b"250 sender-mx.test\r\n"
        } else if let Some(rest) = upper.strip_prefix("MAIL FROM:<") {
            let end = rest.find('>').unwrap_or(0);
            cur = Got {
                from: cmd["MAIL FROM:<".len().."MAIL FROM:<".len() + end].to_string(),
                rcpts: Vec::new(),
                data: Vec::new(),
            };
            b"250 2.1.0 ok\r\n"
        } else if upper.starts_with("RCPT TO:<") {
            let rest = &cmd["RCPT TO:<".len()..];
            cur.rcpts
                .push(rest[..rest.find('>').unwrap_or(0)].to_string());
            b"250 2.1.5 ok\r\n"
        } else if upper == "DATA" {
            w.write_all(b"354 go ahead\r\n").await?;
            let mut data = Vec::new();
            loop {
                let mut l = Vec::new();
                if r.read_until(b'\n', &mut l).await? == 0 {
                    return Ok(());
                }
                if l == b".\r\n" {
                    break;
                }
                let l = l.strip_prefix(b".").unwrap_or(&l);
                data.extend_from_slice(l);
            }
            cur.data = data;
            got.lock().unwrap().push(cur.clone());
            changed.notify_waiters();
            b"250 2.0.0 ok\r\n"
        } else if upper == "QUIT" {
            w.write_all(b"221 bye\r\n").await?;
            return Ok(());
        } else {
            b"250 ok\r\n"
        };
        w.write_all(reply).await?;
    }
}

struct World {
    dns: TestDns,
    mx: MxSink,
    sender_mx: NullSenderSink,
    relay: TestRelay,
}

/// one.test's MX (the mailin sink) on 127.0.0.2; acme.test's (the sender's)
/// and two.test's on 127.0.0.3.
fn zone() -> Zone {
    Zone::new("test.")
        .mx("one.test", 10, "mx.one.test")
        .a("mx.one.test", ip(2))
        .mx("acme.test", 10, "mx.acme.test")
        .mx("two.test", 10, "mx.acme.test")
        .a("mx.acme.test", ip(3))
}

async fn world(
    policy: impl Fn(&str, u32) -> SinkReply + Send + Sync + 'static,
    tweak: impl FnOnce(&mut Setup),
) -> World {
    world_in(zone(), policy, tweak).await
}

async fn world_in(
    zone: Zone,
    policy: impl Fn(&str, u32) -> SinkReply + Send + Sync + 'static,
    tweak: impl FnOnce(&mut Setup),
) -> World {
    let dns = TestDns::start(zone).await;
    let (port, mut listeners) = reserve_port(&[ip(2), ip(3)]);
    let sender_mx = NullSenderSink::start(listeners.pop().unwrap());
    let mx = MxSink::start_on(listeners.pop().unwrap(), policy).unwrap();
    let mut setup = Setup::new(dns.addr, port);
    tweak(&mut setup);
    let relay = TestRelay::start(setup).await;
    World {
        dns,
        mx,
        sender_mx,
        relay,
    }
}

/// A DKIM key for herald's own domain (`relay.test`, the DSNs' From:
/// domain): its `[[dkim]]` section and the zone publishing it.
struct RelayKey {
    _dir: tempfile::TempDir,
    section: String,
    zone: Zone,
}

fn relay_key() -> RelayKey {
    let dir = tempfile::tempdir().unwrap();
    let key = dkim::generate(DkimAlgorithm::RsaSha256, 2048).expect("key generation");
    let path = dir.path().join("relay.test.key");
    dkim::write_key_file(&path, &key.pem).expect("write key");
    RelayKey {
        section: format!(
            "[[dkim]]\ndomain = \"relay.test\"\nselector = \"dsn1\"\n\
             algorithm = \"rsa-sha256\"\nkey = \"{}\"\n",
            path.display()
        ),
        zone: zone().txt("dsn1._domainkey.relay.test", &key.txt_record()),
        _dir: dir,
    }
}

/// Every DKIM signature of `message` as mail-auth verifies it against the
/// test DNS: (d=, s=, result).
async fn dkim_results(dns: SocketAddr, message: &[u8]) -> Vec<(String, String, DkimResult)> {
    common::dkim::verify(&common::dkim::verifier(dns), message).await
}

fn signed_by_relay(results: &[(String, String, DkimResult)]) -> bool {
    matches!(results, [(d, s, DkimResult::Pass)] if d == "relay.test" && s == "dsn1")
}

fn invoice(to: &str) -> Vec<u8> {
    format!(
        "From: Acme Billing <billing@acme.test>\r\n\
         To: <{to}>\r\n\
         Subject: Invoice 42\r\n\
         Date: Sun, 29 Nov 2026 10:00:00 +0000\r\n\
         Message-ID: <invoice-42.{to}>\r\n\
         \r\n\
         Dear customer, please find invoice 42.\r\n"
    )
    .into_bytes()
}

/// Submits with raw MAIL/RCPT lines so that DSN parameters can be given.
async fn submit(relay: &TestRelay, mail: &str, rcpt: &str, to: &str) -> String {
    let mut c = relay.client().await;
    c.cmd(mail).await.assert_code(250);
    c.cmd(rcpt).await.assert_code(250);
    let id = queue_id(&c.data(&invoice(to)).await);
    let _ = c.cmd("QUIT").await;
    id
}

/// The delivery-status fields, per block: [per-message, recipient...].
fn status_blocks(data: &[u8]) -> Vec<Vec<(String, String)>> {
    let msg = MessageParser::default().parse(data).expect("DSN parses");
    let ct = msg.content_type().expect("content type");
    assert_eq!(ct.ctype(), "multipart");
    assert_eq!(ct.subtype(), Some("report"));
    assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
    let part = msg
        .parts
        .iter()
        .find(|p| {
            p.content_type()
                .is_some_and(|c| c.subtype() == Some("delivery-status"))
        })
        .expect("a message/delivery-status part");
    let text = match &part.body {
        PartType::Text(t) => t.to_string(),
        PartType::Binary(b) | PartType::InlineBinary(b) => String::from_utf8_lossy(b).into(),
        other => panic!("delivery-status body: {other:?}"),
    };
    text.split("\r\n\r\n")
        .filter(|b| !b.trim().is_empty())
        .map(|b| {
            let mut fields: Vec<(String, String)> = Vec::new();
            for l in b.split("\r\n") {
                if l.starts_with(['\t', ' ']) {
                    if let Some(last) = fields.last_mut() {
                        last.1 = format!("{} {}", last.1, l.trim());
                    }
                } else if let Some((n, v)) = l.split_once(':') {
                    fields.push((n.to_ascii_lowercase(), v.trim().to_string()));
                }
            }
            fields
        })
        .collect()
}

/// Checks a recipient block reporting `550 5.1.1` for `rcpt` from `remote`.
#[track_caller]
fn assert_failed_5_1_1(r: &[(String, String)], rcpt: &str, remote: &str) {
    assert_eq!(get(r, "final-recipient"), format!("rfc822; {rcpt}"));
    assert_eq!(get(r, "action"), "failed");
    assert_eq!(get(r, "status"), "5.1.1");
    assert_eq!(get(r, "remote-mta"), format!("dns; {remote}"));
    assert!(
        get(r, "diagnostic-code").starts_with("smtp; 550 5.1.1"),
        "{r:?}"
    );
}

fn get<'a>(b: &'a [(String, String)], name: &str) -> &'a str {
    b.iter()
        .find(|(n, _)| n == name)
        .map_or("", |(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_recipient_gets_a_dsn_at_the_senders_mx() {
    let w = world(
        |rcpt: &str, _| {
            if rcpt.starts_with("nobody") {
                SinkReply::Reply(550, "5.1.1 <nobody@one.test>: user unknown")
            } else {
                SinkReply::Accept
            }
        },
        |_| {},
    )
    .await;
    let id = submit(
        &w.relay,
        "MAIL FROM:<billing@acme.test> ENVID=inv-42",
        "RCPT TO:<nobody@one.test> NOTIFY=FAILURE ORCPT=rfc822;Nobody@one.test",
        "nobody@one.test",
    )
    .await;
    w.relay
        .wait_events("bounced", 1, WAIT, |e| field(e, "event") == "bounced")
        .await;

    let got = w.sender_mx.wait_for(1, WAIT).await;
    assert_eq!(got[0].from, "", "a DSN has the null sender");
    assert_eq!(got[0].rcpts, ["billing@acme.test"]);
    let data = &got[0].data;
    assert!(data.is_ascii(), "7-bit");
    let msg = MessageParser::default().parse(&data[..]).unwrap();
    assert_eq!(msg.subject(), Some("Undelivered Mail Returned to Sender"));
    assert_eq!(
        msg.header_raw("Auto-Submitted").map(str::trim),
        Some("auto-replied")
    );
    let blocks = status_blocks(data);
    assert_eq!(blocks.len(), 2, "{blocks:?}");
    assert_eq!(get(&blocks[0], "reporting-mta"), "dns; relay.test");
    assert_eq!(get(&blocks[0], "original-envelope-id"), "inv-42");
    assert_eq!(get(&blocks[0], "x-herald-queue-id"), id);
    let r = &blocks[1];
    assert_failed_5_1_1(r, "nobody@one.test", "mx.one.test");
    assert_eq!(get(r, "original-recipient"), "rfc822;Nobody@one.test");
    // Headers only (no RET): the original's Subject, not its body.
    let text = String::from_utf8_lossy(data);
    assert!(text.contains("text/rfc822-headers"));
    assert!(text.contains("Subject: Invoice 42"));
    assert!(!text.contains("Dear customer"));
    // The DSN itself went out as a message of its own, and was delivered.
    w.relay
        .wait_events("DSN delivered", 1, WAIT, |e| {
            field(e, "event") == "delivered" && field(e, "recipient") == "billing@acme.test"
        })
        .await;
    assert_eq!(w.mx.messages().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_never_gets_no_dsn() {
    let w = world(|_, _| SinkReply::Reply(550, "5.1.1 user unknown"), |_| {}).await;
    submit(
        &w.relay,
        "MAIL FROM:<billing@acme.test>",
        "RCPT TO:<quiet@one.test> NOTIFY=NEVER",
        "quiet@one.test",
    )
    .await;
    w.relay
        .wait_events("first bounce", 1, WAIT, |e| field(e, "event") == "bounced")
        .await;
    // A second bounce that does want a report: once it is in, the first
    // one would have been too.
    submit(
        &w.relay,
        "MAIL FROM:<billing@acme.test>",
        "RCPT TO:<loud@one.test>",
        "loud@one.test",
    )
    .await;
    let got = w.sender_mx.wait_for(1, WAIT).await;
    let text = String::from_utf8_lossy(&got[0].data);
    assert!(text.contains("loud@one.test"), "{text}");
    w.relay
        .wait_events("DSN delivered", 1, WAIT, |e| {
            field(e, "event") == "delivered" && field(e, "sender").is_empty()
        })
        .await;
    let all = w.sender_mx.messages();
    assert_eq!(all.len(), 1, "no DSN for NOTIFY=NEVER: {all:?}");
}

/// RFC 3461 §5.2.2: herald reports success as "relayed" only when the next
/// hop does not speak DSN; one that does got NOTIFY=SUCCESS and reports
/// the final delivery itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_is_reported_only_when_the_next_hop_cannot() {
    let w = world(|_, _| SinkReply::Accept, |_| {}).await;
    // two.test's MX (the sender-side sink) announces DSN.
    submit(
        &w.relay,
        "MAIL FROM:<billing@acme.test>",
        "RCPT TO:<b@two.test> NOTIFY=SUCCESS",
        "b@two.test",
    )
    .await;
    w.relay
        .wait_events("delivered to two.test", 1, WAIT, |e| {
            field(e, "event") == "delivered" && field(e, "recipient") == "b@two.test"
        })
        .await;
    // one.test's MX (mailin) does not: herald reports "relayed".
    submit(
        &w.relay,
        "MAIL FROM:<billing@acme.test>",
        "RCPT TO:<a@one.test> NOTIFY=SUCCESS",
        "a@one.test",
    )
    .await;
    let got = w.sender_mx.wait_for(2, WAIT).await;
    assert_eq!(got[0].rcpts, ["b@two.test"], "the message itself");
    assert_eq!(got[1].from, "", "a DSN: {:?}", got[1]);
    let blocks = status_blocks(&got[1].data);
    assert_eq!(get(&blocks[1], "final-recipient"), "rfc822; a@one.test");
    assert_eq!(get(&blocks[1], "action"), "relayed");
    w.relay
        .wait_events("DSN delivered", 1, WAIT, |e| {
            field(e, "event") == "delivered" && field(e, "sender").is_empty()
        })
        .await;
    let all = w.sender_mx.messages();
    assert_eq!(all.len(), 2, "no report for b@two.test: {all:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dsn_disabled_in_config_sends_none() {
    let w = world(
        |_, _| SinkReply::Reply(550, "5.1.1 user unknown"),
        |s| s.extra = "[dsn]\nenabled = false\n".into(),
    )
    .await;
    submit(
        &w.relay,
        "MAIL FROM:<billing@acme.test>",
        "RCPT TO:<gone@one.test>",
        "gone@one.test",
    )
    .await;
    w.relay
        .wait_events("bounce", 1, WAIT, |e| field(e, "event") == "bounced")
        .await;
    // Nothing is queued for the sender: the queue empties.
    w.relay.wait_queue_empty(WAIT).await;
    assert!(w.sender_mx.messages().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_with_dsn_off_gets_none() {
    let w = world(
        |_, _| SinkReply::Reply(550, "5.1.1 user unknown"),
        |s| {
            s.extra = format!(
                "[[tenant]]\nname = \"hooks\"\nusername = \"hooks\"\n\
                 password_hash = \"{}\"\nallowed_senders = [\"*@acme.test\"]\ndsn = false\n",
                common::relay::PASSWORD_HASH
            )
        },
    )
    .await;
    let mut c = common::smtp::TestClient::connect(w.relay.submission).await;
    c.ehlo("app.test").await.assert_code(250);
    c.starttls().await.assert_code(220);
    c.ehlo("app.test").await.assert_code(250);
    c.auth_plain("hooks", common::relay::PASSWORD)
        .await
        .assert_code(235);
    let r = c
        .send_mail(
            "billing@acme.test",
            &["gone@one.test"],
            &invoice("gone@one.test"),
        )
        .await;
    queue_id(&r);
    let _ = c.cmd("QUIT").await;
    w.relay
        .wait_events("bounce", 1, WAIT, |e| field(e, "event") == "bounced")
        .await;
    // The acme tenant still gets its reports: once that one is in, the
    // other tenant's would have been too.
    submit(
        &w.relay,
        "MAIL FROM:<billing@acme.test>",
        "RCPT TO:<loud@one.test>",
        "loud@one.test",
    )
    .await;
    let got = w.sender_mx.wait_for(1, WAIT).await;
    assert!(String::from_utf8_lossy(&got[0].data).contains("loud@one.test"));
    w.relay
        .wait_events("DSN delivered", 1, WAIT, |e| {
            field(e, "event") == "delivered" && field(e, "sender").is_empty()
        })
        .await;
    assert_eq!(w.sender_mx.messages().len(), 1, "none for tenant hooks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_sends_a_failed_dsn_and_delay_one_delayed() {
    let w = world(
        |_, _| SinkReply::Reply(451, "4.2.1 mailbox busy, try later"),
        |s| {
            s.retry = r#"["1s"]"#;
            s.lifetime = "3s";
            s.extra = "[dsn]\ndelay_after = \"1s\"\n".into();
        },
    )
    .await;
    submit(
        &w.relay,
        "MAIL FROM:<billing@acme.test>",
        "RCPT TO:<busy@one.test> NOTIFY=DELAY,FAILURE",
        "busy@one.test",
    )
    .await;
    w.relay
        .wait_events("expired", 1, WAIT, |e| field(e, "event") == "expired")
        .await;
    let got = w.sender_mx.wait_for(2, WAIT).await;
    let actions: Vec<(String, String)> = got
        .iter()
        .map(|g| {
            let b = status_blocks(&g.data);
            (
                get(&b[1], "action").to_string(),
                get(&b[1], "status").to_string(),
            )
        })
        .collect();
    assert_eq!(
        actions,
        [
            ("delayed".to_string(), "4.2.1".to_string()),
            ("failed".to_string(), "5.4.7".to_string())
        ],
        "one delayed report, then the failure"
    );
    let delayed = status_blocks(&got[0].data);
    assert!(!get(&delayed[1], "will-retry-until").is_empty());
    let failed = String::from_utf8_lossy(&got[1].data).to_string();
    assert!(failed.contains("451 4.2.1 mailbox busy"), "{failed}");
    assert_eq!(w.sender_mx.messages().len(), 2, "one delayed report only");
}

/// A DSN is DKIM-signed like relayed mail: with the key of its From:
/// domain (herald's hostname), and it verifies against the key in DNS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dsn_is_dkim_signed_with_its_from_domains_key() {
    let key = relay_key();
    let w = world_in(
        key.zone.clone(),
        |_, _| SinkReply::Reply(550, "5.1.1 user unknown"),
        |s| s.extra = key.section.clone(),
    )
    .await;
    submit(
        &w.relay,
        "MAIL FROM:<billing@acme.test>",
        "RCPT TO:<gone@one.test>",
        "gone@one.test",
    )
    .await;
    let got = w.sender_mx.wait_for(1, WAIT).await;
    assert_eq!(got[0].from, "", "a DSN: {:?}", got[0]);
    let msg = MessageParser::default().parse(&got[0].data[..]).unwrap();
    assert_eq!(
        msg.from().and_then(|f| f.first()).and_then(|a| a.address()),
        Some("MAILER-DAEMON@relay.test")
    );
    let results = dkim_results(w.dns.addr, &got[0].data).await;
    assert!(signed_by_relay(&results), "{results:?}");
}

/// A Postfix-style RFC 3464 report to `return_path` about `to`.
fn late_report(return_path: &str, to: &str, action: &str, status: &str, diag: &str) -> Vec<u8> {
    Dsn {
        return_path,
        to,
        action,
        status,
        diagnostic: Some(diag),
        message_id: None,
    }
    .bytes()
}

/// With VERP a late bounce comes back to herald, not to the app: herald
/// tells the original sender in a DSN of its own (signed, saying what the
/// report said), once per recipient however often the report comes, and
/// not for a delay warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_bounce_reaches_the_original_sender_as_a_dsn() {
    common::within(Duration::from_secs(90), "late bounce to DSN", async {
        let key = relay_key();
        let w = world_in(
            key.zone.clone(),
            |_, _| SinkReply::Accept,
            |s| {
                s.extra = format!(
                    "{}[bounces]\n\
                     return_path_domain = \"bounces.relay.test\"\n\
                     verp_secret = \"bounce-test-secret-0123456789\"\n\
                     listener = \"127.0.0.1:0\"\n",
                    key.section
                )
            },
        )
        .await;
        let id = submit(
            &w.relay,
            "MAIL FROM:<billing@acme.test>",
            "RCPT TO:<gone@one.test>",
            "gone@one.test",
        )
        .await;
        let other = submit(
            &w.relay,
            "MAIL FROM:<billing@acme.test>",
            "RCPT TO:<left@one.test>",
            "left@one.test",
        )
        .await;
        let got = tokio::task::block_in_place(|| w.mx.wait_for_messages(2, WAIT));
        let return_path = |to: &str| {
            let m = got.iter().find(|m| m.rcpts == [to]).expect("delivered");
            assert!(m.from.starts_with("bounces+"), "{m:?}");
            m.from.clone()
        };
        let (gone_rp, left_rp) = (return_path("gone@one.test"), return_path("left@one.test"));
        w.relay
            .wait_events("both delivered", 2, WAIT, |e| {
                field(e, "event") == "delivered"
            })
            .await;

        let bounce_listener = *w.relay.running().smtp_addrs.last().unwrap();
        let mut c = common::smtp::TestClient::connect(bounce_listener).await;
        c.ehlo("mx.one.test").await.assert_code(250);
        let failed = late_report(
            &gone_rp,
            "gone@one.test",
            "failed",
            "5.1.1",
            "550 5.1.1 <gone@one.test>: Recipient address rejected: User unknown",
        );
        for (rcpt, body) in [
            (
                &gone_rp,
                late_report(
                    &gone_rp,
                    "gone@one.test",
                    "delayed",
                    "4.2.2",
                    "452 4.2.2 mailbox full",
                ),
            ),
            (&gone_rp, failed.clone()),
            (&gone_rp, failed),
            (
                &left_rp,
                late_report(
                    &left_rp,
                    "left@one.test",
                    "failed",
                    "5.2.1",
                    "550 5.2.1 mailbox disabled",
                ),
            ),
        ] {
            c.cmd("MAIL FROM:<>").await.assert_code(250);
            c.cmd(&format!("RCPT TO:<{rcpt}>")).await.assert_code(250);
            c.data(&body).await.assert_code(250);
        }
        let _ = c.cmd("QUIT").await;

        let got = w.sender_mx.wait_for(2, WAIT).await;
        // Every DSN queued by then has been delivered too.
        w.relay.wait_queue_empty(WAIT).await;
        let all = w.sender_mx.messages();
        assert_eq!(all.len(), 2, "one DSN per failed recipient: {all:?}");
        let about = |who: &str| {
            got.iter()
                .find(|g| String::from_utf8_lossy(&g.data).contains(who))
                .unwrap_or_else(|| panic!("a DSN about {who}: {got:?}"))
        };
        let dsn = about("gone@one.test");
        assert_eq!(dsn.from, "", "a DSN has the null sender");
        assert_eq!(dsn.rcpts, ["billing@acme.test"], "the original sender");
        let blocks = status_blocks(&dsn.data);
        assert_eq!(blocks.len(), 2, "{blocks:?}");
        assert_eq!(get(&blocks[0], "x-herald-queue-id"), id);
        assert_failed_5_1_1(&blocks[1], "gone@one.test", "store.one.test");
        let results = dkim_results(w.dns.addr, &dsn.data).await;
        assert!(signed_by_relay(&results), "{results:?}");

        let blocks = status_blocks(&about("left@one.test").data);
        assert_eq!(get(&blocks[0], "x-herald-queue-id"), other);
        assert_eq!(get(&blocks[1], "status"), "5.2.1");
    })
    .await;
}
