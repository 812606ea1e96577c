//! The delivery stage against real servers on loopback: herald's SMTP client
//! against a mailin-embedded MX, and the dispatcher with an in-process DNS
//! zone (MX order, dead hosts, null MX, unknown domains, shutdown).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::dns::{TestDns, Zone};
use common::mx::{MxSink, SinkReply, ip, reserve_port};
use common::within;
use herald::config::Config;
use herald::deliver::client::{MailParams, RcptParams, SmtpClient, Timeouts};
use herald::deliver::{AttemptSink, start_with};
use herald::dns::Dns;
use herald::envelope::QueueId;
use herald::queue::{AttemptResult, DeliveryJob, Envelope, JobRecipient, Notify, RcptOutcome};
use herald::reply::Enhanced;
use herald::report::Reason;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

fn timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(5),
        command: Duration::from_secs(10),
        data: Duration::from_secs(10),
    }
}

fn refuse_bad(addr: &str, _seen: u32) -> SinkReply {
    if addr.starts_with("bad") {
        SinkReply::Reply(550, "5.1.1 no such user")
    } else if addr.starts_with("later") {
        SinkReply::Reply(451, "4.2.0 try again later")
    } else {
        SinkReply::Accept
    }
}

fn rcpt(address: &str) -> RcptParams<'_> {
    RcptParams {
        address,
        ..RcptParams::default()
    }
}

/// Lines that start with dots, a lone dot, a body without a final CRLF.
const BODY: &[u8] = b"From: app@acme.test\r\nTo: a@example.test\r\nSubject: dots\r\n\r\n.\r\n..\r\n.leading\r\nmid.dle\r\n\r\n.\r\nlast line";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_delivers_byte_exact_with_one_refused_recipient() {
    let sink = MxSink::start(ip(2), 0, refuse_bad).unwrap();
    let mut c = within(
        WAIT,
        "connect",
        SmtpClient::connect(sink.addr, None, timeouts()),
    )
    .await
    .unwrap();
    c.ehlo("relay.test").await.unwrap();
    let mail = MailParams {
        from: "app@acme.test",
        ..MailParams::default()
    };
    let tx = within(
        WAIT,
        "transaction",
        c.send(
            &mail,
            &[
                rcpt("a@example.test"),
                rcpt("bad@example.test"),
                rcpt("c@example.test"),
            ],
            BODY,
        ),
    )
    .await
    .unwrap();
    let codes: Vec<u16> = tx.rcpts.iter().map(|r| r.code).collect();
    assert_eq!(codes, [250, 550, 250]);
    assert_eq!(tx.rcpts[1].enhanced, Some(Enhanced(5, 1, 1)));
    assert_eq!(tx.data.as_ref().map(|d| d.code), Some(250));

    // Reuse: a transaction with every recipient refused, then one more.
    let tx = c
        .send(&mail, &[rcpt("bad@example.test")], BODY)
        .await
        .unwrap();
    assert_eq!(tx.accepted(), 0);
    let body2 = b"Subject: two\r\n\r\nsecond\r\n";
    let tx = c
        .send(&mail, &[rcpt("d@example.test")], body2)
        .await
        .unwrap();
    assert_eq!(tx.data.as_ref().map(|d| d.code), Some(250));
    c.quit().await;

    let got = sink.messages();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].helo, "relay.test");
    assert_eq!(got[0].from, "app@acme.test");
    assert_eq!(got[0].rcpts, ["a@example.test", "c@example.test"]);
    let mut want = BODY.to_vec();
    want.extend_from_slice(b"\r\n");
    assert_eq!(
        String::from_utf8_lossy(&got[0].data),
        String::from_utf8_lossy(&want)
    );
    assert_eq!(got[1].data, body2);
    assert_eq!(got[1].rcpts, ["d@example.test"]);
}

/// Collects what the dispatcher reports.
struct Recorder(mpsc::UnboundedSender<(QueueId, Vec<RcptOutcome>)>);

impl AttemptSink for Recorder {
    fn complete_attempt(&self, id: QueueId, outcomes: Vec<RcptOutcome>) {
        let _ = self.0.send((id, outcomes));
    }
}

fn job(domain: &str, locals: &[&str], body: &[u8]) -> DeliveryJob {
    DeliveryJob {
        id: QueueId::generate(),
        envelope: Arc::new(Envelope {
            sender: "app@acme.test".into(),
            tenant: None,
            message_id: None,
            received_at: 0,
            client_ip: [127, 0, 0, 1].into(),
            smtputf8: false,
            body_8bit: false,
            ret: None,
            env_id: None,
            require_tls: false,
            ignore_tls_policies: false,
        }),
        body: Bytes::copy_from_slice(body),
        domain: domain.into(),
        recipients: locals
            .iter()
            .enumerate()
            .map(|(i, l)| JobRecipient {
                index: i,
                address: format!("{l}@{domain}"),
                orcpt: None,
                notify: Notify::default(),
                attempt: 1,
            })
            .collect(),
        return_path: None,
    }
}

fn config(dns: SocketAddr, port: u16, extra: &str) -> Arc<Config> {
    let text = format!(
        r#"
        [[listener]]
        address = "127.0.0.1:0"
        tls = "none"
        auth = "none"
        trusted_networks = ["127.0.0.0/8"]

        [dns]
        nameservers = ["{dns}"]
        timeout = "2s"

        [delivery]
        helo_name = "relay.test"
        port = {port}
        connect_timeout = "3s"
        command_timeout = "10s"
        idle_timeout = "500ms"
        {extra}
        "#
    );
    Arc::new(Config::from_toml_str(&text).unwrap_or_else(|e| panic!("{e}")))
}

struct Harness {
    tx: mpsc::UnboundedSender<DeliveryJob>,
    rx: mpsc::UnboundedReceiver<(QueueId, Vec<RcptOutcome>)>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _dns: TestDns,
}

impl Harness {
    async fn start(zone: Zone, port: u16, extra: &str) -> Harness {
        let dns = TestDns::start(zone).await;
        let config = config(dns.addr, port, extra);
        let resolver = Dns::new(&config.dns).unwrap();
        let (tx, jobs) = mpsc::unbounded_channel();
        let (otx, rx) = mpsc::unbounded_channel();
        let shutdown = CancellationToken::new();
        let task = start_with(
            config,
            resolver,
            Arc::new(Recorder(otx)),
            jobs,
            shutdown.clone(),
        );
        Harness {
            tx,
            rx,
            shutdown,
            task,
            _dns: dns,
        }
    }

    async fn outcome(&mut self, id: QueueId) -> Vec<RcptOutcome> {
        let (got, outcomes) = within(WAIT, "an attempt outcome", self.rx.recv())
            .await
            .expect("dispatcher alive");
        assert_eq!(got, id, "outcome for an unexpected job");
        outcomes
    }

    async fn stop(self) -> mpsc::UnboundedReceiver<(QueueId, Vec<RcptOutcome>)> {
        self.shutdown.cancel();
        within(WAIT, "the delivery task to end", self.task)
            .await
            .unwrap();
        self.rx
    }
}

fn zone() -> Zone {
    Zone::new("test.")
        .mx("example.test", 10, "mx1.example.test")
        .mx("example.test", 20, "mx2.example.test")
        .a("mx1.example.test", ip(3))
        .a("mx2.example.test", ip(2))
        .mx("dead.test", 10, "mx1.example.test")
        .mx("silent.test", 10, "mx.silent.test")
        .a("mx.silent.test", ip(4))
        .null_mx("nullmx.test")
        .a("implicit.test", ip(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatcher_outcomes_per_recipient_and_destination() {
    // 127.0.0.2 is the MX sink, 127.0.0.3 refuses connections.
    let (port, mut listeners) = reserve_port(&[ip(2), ip(3)]);
    drop(listeners.pop());
    let sink = MxSink::start_on(listeners.pop().unwrap(), refuse_bad).unwrap();
    let mut h = Harness::start(zone(), port, "").await;

    // The first MX refuses; the second takes the message for two of three.
    let j = job(
        "example.test",
        &["a", "bad", "later", "c"],
        b"Subject: x\r\n\r\n.hi\r\n",
    );
    let id = j.id;
    h.tx.send(j).unwrap();
    let out = h.outcome(id).await;
    assert_eq!(out.len(), 4);
    for o in &out {
        assert_eq!(o.mx.as_deref(), Some("mx2.example.test"));
        assert_eq!(o.tls, None);
    }
    assert!(matches!(&out[0].result, AttemptResult::Delivered(r) if r.code == 250));
    assert!(matches!(
        &out[1].result,
        AttemptResult::Bounced(r, Reason::UserUnknown) if r.code == 550
    ));
    assert!(matches!(&out[2].result, AttemptResult::Deferred(r, _) if r.code == 451));
    assert!(matches!(&out[3].result, AttemptResult::Delivered(_)));
    let got = sink.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpts, ["a@example.test", "c@example.test"]);
    assert_eq!(got[0].data, b"Subject: x\r\n\r\n.hi\r\n");

    // A domain without MX is its own mail server (RFC 5321 §5.1).
    let j = job("implicit.test", &["z"], b"Subject: y\r\n\r\nbody\r\n");
    let id = j.id;
    h.tx.send(j).unwrap();
    let out = h.outcome(id).await;
    assert!(matches!(&out[0].result, AttemptResult::Delivered(_)));
    assert_eq!(out[0].mx.as_deref(), Some("implicit.test"));

    // Null MX: a bounce at once, without any connection.
    let j = job("nullmx.test", &["x", "y"], b"\r\n");
    let id = j.id;
    h.tx.send(j).unwrap();
    let out = h.outcome(id).await;
    for o in &out {
        match &o.result {
            AttemptResult::Bounced(r, Reason::NotAccept) => {
                assert_eq!(r.code, 556);
                assert_eq!(r.enhanced, Some(Enhanced(5, 1, 10)));
            }
            other => panic!("{other:?}"),
        }
    }

    // No such domain.
    let j = job("nosuch.test", &["x"], b"\r\n");
    let id = j.id;
    h.tx.send(j).unwrap();
    let out = h.outcome(id).await;
    assert!(matches!(
        &out[0].result,
        AttemptResult::Bounced(r, _) if r.code == 550 && r.enhanced == Some(Enhanced(5, 1, 2))
    ));

    // Only a dead MX: deferred, never bounced.
    let j = job("dead.test", &["x"], b"\r\n");
    let id = j.id;
    h.tx.send(j).unwrap();
    let out = h.outcome(id).await;
    match &out[0].result {
        AttemptResult::Deferred(r, Reason::Network) => {
            assert_eq!(r.code, 451);
            assert_eq!(r.enhanced, Some(Enhanced(4, 4, 1)));
            assert_eq!(
                r.text,
                format!("Connection to mx1.example.test [127.0.0.3]:{port} refused")
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(out[0].mx.as_deref(), Some("mx1.example.test"));

    let mut rx = h.stop().await;
    assert!(rx.try_recv().is_err(), "no further outcomes expected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_jobs_share_connections() {
    let (port, mut listeners) = reserve_port(&[ip(2)]);
    let sink = MxSink::start_on(listeners.pop().unwrap(), refuse_bad).unwrap();
    let mut h = Harness::start(
        zone(),
        port,
        "max_connections_per_domain = 2\nmax_messages_per_connection = 3",
    )
    .await;
    let mut ids = Vec::new();
    for i in 0..10 {
        let j = job(
            "implicit.test",
            &["a"],
            format!("Subject: {i}\r\n\r\nbody {i}\r\n").as_bytes(),
        );
        ids.push(j.id);
        h.tx.send(j).unwrap();
    }
    let mut done = 0;
    while done < ids.len() {
        let (id, out) = within(WAIT, "outcomes", h.rx.recv()).await.unwrap();
        assert!(ids.contains(&id));
        assert!(
            matches!(&out[0].result, AttemptResult::Delivered(_)),
            "{out:?}"
        );
        done += 1;
    }
    assert_eq!(sink.messages().len(), 10);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_hands_back_jobs_not_started() {
    // 127.0.0.4 accepts TCP connections (kernel backlog) but never greets.
    let (port, silent) = reserve_port(&[ip(4)]);
    let h = Harness::start(zone(), port, "max_connections_per_domain = 1").await;
    let a = job("silent.test", &["x"], b"\r\n");
    let b = job("silent.test", &["y"], b"\r\n");
    let (ida, idb) = (a.id, b.id);
    h.tx.send(a).unwrap();
    h.tx.send(b).unwrap();
    // Wait until the connection task is connecting (its connection sits in
    // the silent listener's backlog), so shutdown finds a job in flight.
    silent[0].set_nonblocking(true).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let _held = loop {
        match silent[0].accept() {
            Ok((conn, _)) => break conn,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no connection attempt"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    let mut rx = h.stop().await;
    let mut seen = Vec::new();
    while let Ok((id, out)) = rx.try_recv() {
        assert!(
            matches!(out[0].result, AttemptResult::NotAttempted),
            "{out:?}"
        );
        seen.push(id);
    }
    seen.sort();
    let mut want = vec![ida, idb];
    want.sort();
    assert_eq!(seen, want);
}
