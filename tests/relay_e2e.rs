//! End to end through real protocols: an app submits over TLS SMTP to a
//! herald listener; herald resolves MX through a DNS server on loopback and
//! delivers to MX sinks on 127.0.0.x; events are read back from the log.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::dns::{TestDns, Zone};
use common::mx::{MxSink, SinkReply, ip, reserve_port};
use common::relay::{Setup, TestRelay, field, queue_id};
use common::smtp::TestClient;

const WAIT: Duration = Duration::from_secs(20);

fn invoice(to: &str, n: u32) -> Vec<u8> {
    format!(
        "From: Acme Billing <billing@acme.test>\r\n\
         To: <{to}>\r\n\
         Subject: Invoice {n}\r\n\
         Date: Sun, 29 Nov 2026 10:00:00 +0000\r\n\
         Message-ID: <invoice-{n}@acme.test>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         \r\n\
         Dear customer,\r\n\
         .please find invoice {n} attached.\r\n\
         ..\r\n\
         Regards\r\n"
    )
    .into_bytes()
}

/// The zone most tests use: two domains with one MX each, one with two
/// MX (the first dead), a null-MX domain, and a domain with no mail server.
fn zone() -> Zone {
    Zone::new("test.")
        .mx("one.test", 10, "mx.one.test")
        .a("mx.one.test", ip(2))
        .mx("two.test", 10, "mx.two.test")
        .a("mx.two.test", ip(3))
        .mx("backup.test", 10, "dead.backup.test")
        .mx("backup.test", 20, "alive.backup.test")
        .a("dead.backup.test", ip(4))
        .a("alive.backup.test", ip(5))
        .mx("many.test", 10, "dead1.many.test")
        .mx("many.test", 20, "dead2.many.test")
        .mx("many.test", 30, "alive.many.test")
        .a("dead1.many.test", ip(4))
        .a("dead2.many.test", ip(4))
        .a("alive.many.test", ip(5))
        .null_mx("nomail.test")
        .a("www.nomx.test", ip(9))
}

struct World {
    _dns: TestDns,
    sinks: Vec<MxSink>,
    relay: TestRelay,
}

/// DNS + sinks on 127.0.0.2, .3, .5 (accepting everything unless a policy
/// is given) + relay. 127.0.0.4 is reserved but left dead.
async fn world(
    policy: impl Fn(&str, u32) -> SinkReply + Send + Sync + Clone + 'static,
    tweak: impl FnOnce(&mut Setup),
) -> World {
    let dns = TestDns::start(zone()).await;
    let (port, mut listeners) = reserve_port(&[ip(2), ip(3), ip(4), ip(5)]);
    let l5 = listeners.pop().unwrap();
    drop(listeners.pop()); // 127.0.0.4: dead MX
    let l3 = listeners.pop().unwrap();
    let l2 = listeners.pop().unwrap();
    let sinks = vec![
        MxSink::start_on(l2, policy.clone()).unwrap(),
        MxSink::start_on(l3, policy.clone()).unwrap(),
        MxSink::start_on(l5, policy).unwrap(),
    ];
    let mut setup = Setup::new(dns.addr, port);
    tweak(&mut setup);
    let relay = TestRelay::start(setup).await;
    World {
        _dns: dns,
        sinks,
        relay,
    }
}

fn accept(_: &str, _: u32) -> SinkReply {
    SinkReply::Accept
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_auth_message_arrives_byte_exact_with_received_header() {
    let w = world(accept, |_| {}).await;
    let body = invoice("bob@one.test", 1);
    let reply = w
        .relay
        .submit("billing@acme.test", &["bob@one.test"], &body)
        .await;
    let id = queue_id(&reply);
    assert!(reply.text().starts_with("2.0.0 Ok: queued as "), "{reply}");

    let got = w.sinks[0].wait_for_messages(1, WAIT);
    assert_eq!(got[0].from, "billing@acme.test");
    assert_eq!(got[0].rcpts, vec!["bob@one.test"]);
    assert_eq!(got[0].helo, "relay.test");
    let data = &got[0].data;
    assert!(
        data.starts_with(b"Received: from app.test"),
        "{}",
        String::from_utf8_lossy(data)
    );
    assert!(
        data.ends_with(&body),
        "body changed:\n{}",
        String::from_utf8_lossy(data)
    );
    let headers = String::from_utf8_lossy(&data[..data.len() - body.len()]).to_string();
    assert!(
        headers.contains(&id),
        "Received names the queue id: {headers}"
    );
    assert!(
        !data.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'),
        "bare LF emitted"
    );

    let ev = w
        .relay
        .wait_events("delivered", 1, WAIT, |e| field(e, "event") == "delivered")
        .await;
    assert_eq!(field(&ev[0], "queue_id"), id);
    assert_eq!(field(&ev[0], "recipient"), "bob@one.test");
    assert_eq!(field(&ev[0], "message_id"), "<invoice-1@acme.test>");
    assert_eq!(field(&ev[0], "tenant"), "acme");
    assert_eq!(field(&ev[0], "mx"), "mx.one.test");
    assert_eq!(ev[0]["smtp"]["code"], 250);
    let received = w
        .relay
        .wait_events("received", 1, WAIT, |e| field(e, "event") == "received")
        .await;
    assert_eq!(field(&received[0], "queue_id"), id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn implicit_tls_submission_is_delivered() {
    let w = world(accept, |_| {}).await;
    let mut c = TestClient::connect_tls(w.relay.implicit).await;
    assert!(c.tls_version().is_some());
    c.ehlo("app.test").await.assert_code(250);
    c.auth_login(common::relay::USER, common::relay::PASSWORD)
        .await
        .assert_code(235);
    let r = c
        .send_mail(
            "billing@acme.test",
            &["carol@two.test"],
            &invoice("carol@two.test", 2),
        )
        .await;
    queue_id(&r);
    let got = w.sinks[1].wait_for_messages(1, WAIT);
    assert_eq!(got[0].rcpts, vec!["carol@two.test"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipients_across_domains_each_get_one_copy() {
    let w = world(accept, |_| {}).await;
    let r = w
        .relay
        .submit(
            "billing@acme.test",
            &["a@one.test", "b@two.test", "c@one.test"],
            &invoice("a@one.test", 3),
        )
        .await;
    queue_id(&r);
    let one = w.sinks[0].wait_for_messages(1, WAIT);
    let mut rcpts = one[0].rcpts.clone();
    rcpts.sort();
    assert_eq!(
        rcpts,
        vec!["a@one.test", "c@one.test"],
        "one transaction per domain"
    );
    let two = w.sinks[1].wait_for_messages(1, WAIT);
    assert_eq!(two[0].rcpts, vec!["b@two.test"]);
    w.relay
        .wait_events("3 delivered", 3, WAIT, |e| field(e, "event") == "delivered")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_replies_deliver_some_and_bounce_others() {
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
    let r = w
        .relay
        .submit(
            "billing@acme.test",
            &["nobody@one.test", "real@one.test"],
            &invoice("real@one.test", 4),
        )
        .await;
    let id = queue_id(&r);
    let got = w.sinks[0].wait_for_messages(1, WAIT);
    assert_eq!(got[0].rcpts, vec!["real@one.test"]);
    let bounced = w
        .relay
        .wait_events("bounced", 1, WAIT, |e| field(e, "event") == "bounced")
        .await;
    assert_eq!(field(&bounced[0], "recipient"), "nobody@one.test");
    assert_eq!(field(&bounced[0], "queue_id"), id);
    assert_eq!(bounced[0]["smtp"]["code"], 550);
    assert_eq!(bounced[0]["smtp"]["enhanced"], "5.1.1");
    assert_eq!(bounced[0]["permanent"], true);
    assert_eq!(field(&bounced[0], "classification"), "invalid_recipient");
    w.relay
        .wait_events("delivered", 1, WAIT, |e| {
            field(e, "event") == "delivered" && field(e, "recipient") == "real@one.test"
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_first_mx_falls_back_to_second() {
    let w = world(accept, |_| {}).await;
    queue_id(
        &w.relay
            .submit(
                "billing@acme.test",
                &["x@backup.test"],
                &invoice("x@backup.test", 5),
            )
            .await,
    );
    let got = w.sinks[2].wait_for_messages(1, WAIT);
    assert_eq!(got[0].rcpts, vec!["x@backup.test"]);
    let ev = w
        .relay
        .wait_events("delivered", 1, WAIT, |e| field(e, "event") == "delivered")
        .await;
    assert_eq!(field(&ev[0], "mx"), "alive.backup.test");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mx_addresses_tried_per_attempt_are_limited() {
    let w = world(accept, |s| {
        s.delivery_extra = "max_mx_addresses = 2".into();
    })
    .await;
    queue_id(
        &w.relay
            .submit(
                "billing@acme.test",
                &["x@many.test"],
                &invoice("x@many.test", 11),
            )
            .await,
    );
    let ev = w
        .relay
        .wait_events("deferred", 1, WAIT, |e| field(e, "event") == "deferred")
        .await;
    assert_eq!(ev[0]["permanent"], false);
    assert_eq!(field(&ev[0], "mx"), "dead2.many.test", "{}", ev[0]);
    w.sinks[2].assert_no_message_within(Duration::from_millis(300));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_failure_is_retried_then_delivered() {
    let w = world(
        |_: &str, seen: u32| {
            if seen == 0 {
                SinkReply::Reply(451, "4.2.1 mailbox busy, try later")
            } else {
                SinkReply::Accept
            }
        },
        |_| {},
    )
    .await;
    let id = queue_id(
        &w.relay
            .submit(
                "billing@acme.test",
                &["later@one.test"],
                &invoice("later@one.test", 6),
            )
            .await,
    );
    let deferred = w
        .relay
        .wait_events("deferred", 1, WAIT, |e| field(e, "event") == "deferred")
        .await;
    assert_eq!(field(&deferred[0], "queue_id"), id);
    assert_eq!(deferred[0]["permanent"], false);
    assert_eq!(deferred[0]["attempt"], 1);
    let got = w.sinks[0].wait_for_messages(1, WAIT);
    assert_eq!(got[0].rcpts, vec!["later@one.test"]);
    let delivered = w
        .relay
        .wait_events("delivered", 1, WAIT, |e| field(e, "event") == "delivered")
        .await;
    assert_eq!(delivered[0]["attempt"], 2);
    assert_eq!(w.sinks[0].rcpt_attempts("later@one.test"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failure_bounces_without_retry() {
    let w = world(
        |_: &str, _| SinkReply::Reply(554, "5.7.1 rejected by policy"),
        |_| {},
    )
    .await;
    queue_id(
        &w.relay
            .submit(
                "billing@acme.test",
                &["p@two.test"],
                &invoice("p@two.test", 7),
            )
            .await,
    );
    let ev = w
        .relay
        .wait_events("bounced", 1, WAIT, |e| field(e, "event") == "bounced")
        .await;
    assert_eq!(ev[0]["smtp"]["code"], 554);
    assert_eq!(ev[0]["attempt"], 1);
    // The bounced message leaves the queue.
    w.relay.wait_queue_empty(WAIT).await;
    assert_eq!(w.sinks[1].rcpt_attempts("p@two.test"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_mx_and_domains_without_mail_server_are_refused_at_rcpt() {
    let w = world(accept, |_| {}).await;
    let mut c = w.relay.client().await;
    c.cmd("MAIL FROM:<billing@acme.test>")
        .await
        .assert_code(250);
    let r = c.cmd("RCPT TO:<x@nomail.test>").await;
    r.assert_code(556);
    assert_eq!(r.enhanced(), Some("5.1.10"));
    let r = c.cmd("RCPT TO:<x@doesnotexist.test>").await;
    r.assert_code(550);
    assert_eq!(r.enhanced(), Some("5.1.2"));
    assert!(r.text().contains("no mail server"), "{r}");
    // A name with an address but no MX is its own mail server (RFC 5321 §5.1).
    c.cmd("RCPT TO:<x@www.nomx.test>").await.assert_code(250);
    let r = c.cmd("RCPT TO:<not an address>").await;
    assert_eq!(r.code / 100, 5, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipient_expires_after_queue_lifetime() {
    let w = world(
        |_: &str, _| SinkReply::Reply(451, "4.3.0 temporarily unavailable"),
        |s| {
            s.lifetime = "3s";
        },
    )
    .await;
    let id = queue_id(
        &w.relay
            .submit(
                "billing@acme.test",
                &["e@one.test"],
                &invoice("e@one.test", 8),
            )
            .await,
    );
    let ev = w
        .relay
        .wait_events("expired", 1, WAIT, |e| field(e, "event") == "expired")
        .await;
    assert_eq!(field(&ev[0], "queue_id"), id);
    assert_eq!(ev[0]["permanent"], true);
    assert!(ev[0]["attempt"].as_u64().unwrap() >= 2, "{}", ev[0]);
    w.relay.wait_queue_empty(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_message_survives_restart() {
    // The only MX is dead at first: the message waits in the queue.
    let dns = TestDns::start(
        Zone::new("test.")
            .mx("later.test", 10, "mx.later.test")
            .a("mx.later.test", ip(6)),
    )
    .await;
    let (port, mut listeners) = reserve_port(&[ip(6)]);
    let l6 = listeners.pop().unwrap();
    let l6_addr = l6.local_addr().unwrap();
    drop(l6);
    let mut setup = Setup::new(dns.addr, port);
    setup.retry = r#"["1h"]"#;
    let mut relay = TestRelay::start(setup).await;
    let id = queue_id(
        &relay
            .submit(
                "billing@acme.test",
                &["r@later.test"],
                &invoice("r@later.test", 9),
            )
            .await,
    );
    relay
        .wait_events("deferred", 1, WAIT, |e| field(e, "event") == "deferred")
        .await;
    relay.stop().await;

    let sink = MxSink::accept_all(Ipv4Addr::new(127, 0, 0, 6), l6_addr.port()).unwrap();
    // Recovered recipients keep their schedule (the retry is an hour away),
    // so after checking the state survived, ask for the retry now.
    relay.restart().await;
    let view = relay
        .running()
        .queue
        .get(id.parse().unwrap())
        .expect("message recovered after restart");
    assert_eq!(view.recipients[0].attempts, 1);
    relay.running().queue.retry_now(id.parse().unwrap());
    let got = sink.wait_for_messages(1, WAIT);
    assert_eq!(got[0].rcpts, vec!["r@later.test"]);
    assert!(got[0].data.ends_with(&invoice("r@later.test", 9)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_smuggling_never_splits_a_message() {
    let w = world(accept, |_| {}).await;
    for (n, trick) in [
        &b"hello\n.\r\nMAIL FROM:<evil@acme.test>\r\n"[..],
        &b"hello\r\n.\nMAIL FROM:<evil@acme.test>\r\n"[..],
        &b"hello\r.\r\nMAIL FROM:<evil@acme.test>\r\n"[..],
        &b"hello\r\n.\rMAIL FROM:<evil@acme.test>\r\n"[..],
        &b"hello\r\n.\r\r\nMAIL FROM:<evil@acme.test>\r\n"[..],
    ]
    .iter()
    .enumerate()
    {
        let mut c = w.relay.client().await;
        c.cmd("MAIL FROM:<billing@acme.test>")
            .await
            .assert_code(250);
        c.cmd("RCPT TO:<victim@one.test>").await.assert_code(250);
        c.cmd("DATA").await.assert_code(354);
        let mut msg = b"Subject: smuggle\r\n\r\n".to_vec();
        msg.extend_from_slice(trick);
        msg.extend_from_slice(b"RCPT TO:<victim@one.test>\r\nDATA\r\nsmuggled\r\n.\r\n");
        c.send_raw(&msg).await;
        let r = c.read_reply().await;
        assert_eq!(r.code, 550, "trick {n}: {r}");
        // The session ends: nothing after the refusal is run as a command.
        c.expect_closed().await;
    }
    w.sinks[0].assert_no_message_within(Duration::from_millis(500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_message_is_refused_before_data() {
    let w = world(accept, |s| {
        s.server_extra = "max_message_size = \"10KiB\"".into();
    })
    .await;
    let mut c = w.relay.client().await;
    let ehlo = c.ehlo("app.test").await;
    assert_eq!(ehlo.extension("SIZE"), Some("10240"));
    let r = c.cmd("MAIL FROM:<billing@acme.test> SIZE=20000").await;
    r.assert_code(552);
    assert_eq!(r.enhanced(), Some("5.3.4"));
    // Without SIZE=, the message is read and refused at the end.
    c.cmd("MAIL FROM:<billing@acme.test>")
        .await
        .assert_code(250);
    c.cmd("RCPT TO:<big@one.test>").await.assert_code(250);
    let big = vec![b'x'; 70]
        .into_iter()
        .chain(*b"\r\n")
        .cycle()
        .take(20_000)
        .collect::<Vec<u8>>();
    let r = c.data(&big).await;
    r.assert_code(552);
    c.cmd("QUIT").await.assert_code(221);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_open_relay_and_sender_must_match_tenant() {
    let w = world(accept, |_| {}).await;
    // STARTTLS but no AUTH: may not relay.
    let mut c = TestClient::connect(w.relay.submission).await;
    c.ehlo("app.test").await;
    c.starttls().await.assert_code(220);
    c.ehlo("app.test").await;
    let r = c.cmd("MAIL FROM:<billing@acme.test>").await;
    r.assert_code(530);
    assert_eq!(r.enhanced(), Some("5.7.0"));
    // AUTH before STARTTLS is refused: passwords never travel in clear.
    let mut c = TestClient::connect(w.relay.submission).await;
    let ehlo = c.ehlo("app.test").await;
    assert!(
        !ehlo.has_extension("AUTH"),
        "AUTH offered before TLS: {ehlo}"
    );
    let r = c.cmd("AUTH PLAIN AGFjbWUAc2VjcmV0").await;
    assert_eq!(r.code, 530, "{r}");
    // Authenticated, but the sender is another company's domain.
    let mut c = w.relay.client().await;
    let r = c.cmd("MAIL FROM:<ceo@other.test>").await;
    r.assert_code(553);
    assert_eq!(r.enhanced(), Some("5.7.1"));
    assert!(
        r.text().contains("ceo@other.test") && r.text().contains("*@acme.test"),
        "{r}"
    );
    let rejected = w
        .relay
        .wait_events("rejected", 1, WAIT, |e| field(e, "event") == "rejected")
        .await;
    assert_eq!(field(&rejected[0], "sender"), "ceo@other.test");
    // The trusted-network listener relays without AUTH.
    let mut t = TestClient::connect(w.relay.trusted).await;
    t.ehlo("app.test").await.assert_code(250);
    queue_id(
        &t.send_mail(
            "anyone@elsewhere.test",
            &["t@two.test"],
            &invoice("t@two.test", 10),
        )
        .await,
    );
    w.sinks[1].wait_for_messages(1, WAIT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_refused_and_repeated_failures_are_cut_off() {
    let w = world(accept, |s| {
        s.server_extra = "max_auth_failures = 3\nauth_failure_delay = \"10ms\"".into();
    })
    .await;
    let mut refused = 0;
    let mut cut_off = false;
    for _ in 0..6 {
        let mut c = TestClient::connect(w.relay.submission).await;
        if c.greeting.code == 421 {
            cut_off = true;
            break;
        }
        c.ehlo("app.test").await;
        c.starttls().await.assert_code(220);
        c.ehlo("app.test").await;
        let r = c.auth_plain("acme", "wrong").await;
        match r.code {
            535 => {
                assert_eq!(r.enhanced(), Some("5.7.8"));
                refused += 1;
            }
            421 => {
                cut_off = true;
                break;
            }
            other => panic!("unexpected reply {other}: {r}"),
        }
    }
    assert!(
        refused >= 1 && cut_off,
        "refused {refused}, cut off {cut_off}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_timeout_at_rcpt_is_a_temporary_error() {
    let silent = common::dns::SilentDns::start().await;
    let relay = TestRelay::start(Setup::new(silent.addr, 25)).await;
    let mut c = relay.client().await;
    c.cmd("MAIL FROM:<billing@acme.test>")
        .await
        .assert_code(250);
    let r = c.cmd("RCPT TO:<x@slow.test>").await;
    r.assert_code(451);
    assert_eq!(r.enhanced(), Some("4.4.3"));
}
