//! Clustered relays (`[cluster] redis_url`), end to end against a real
//! Redis on 127.0.0.1:6379 and real SMTP:
//!
//! * every event goes to the Redis stream with the events log's JSON, and
//!   `events_stream_maxlen` caps it;
//! * the suppression list is shared: a hard bounce seen by one relay makes
//!   the other refuse the recipient at RCPT, and a removal through the
//!   other's API lets the first accept it again;
//! * with Redis down, mail flows, the suppression list works on the node's
//!   own copy, and nothing hangs.
//!
//! Tests that need Redis are skipped with a printed reason when it is not
//! reachable, unless `CI` is set (then they fail). Each uses a key prefix
//! of its own and deletes its keys at the end.

mod common;

use std::time::{Duration, Instant};

use common::dns::{TestDns, Zone};
use common::http::api;
use common::mx::{MxSink, SinkReply, ip, reserve_port};
use common::redis::{REDIS, available, closed_port, connect, delete_prefix, unique_prefix};
use common::relay::{Setup, TestRelay, field};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

fn message(n: u32, to: &str) -> Vec<u8> {
    format!(
        "From: Acme Billing <billing@acme.test>\r\n\
         To: <{to}>\r\n\
         Subject: Invoice {n}\r\n\
         Date: Sun, 29 Nov 2026 10:00:00 +0000\r\n\
         Message-ID: <cluster-{n}-{}@acme.test>\r\n\
         \r\n\
         Invoice {n}\r\n",
        std::process::id()
    )
    .into_bytes()
}

/// DNS with `one.test` → 127.0.0.2 and an MX there that refuses
/// `gone@one.test` with `550 5.1.1` at RCPT and accepts everyone else.
struct World {
    dns: TestDns,
    port: u16,
    sink: MxSink,
}

async fn world() -> World {
    let dns = TestDns::start(
        Zone::new("test.")
            .mx("one.test", 10, "mx.one.test")
            .a("mx.one.test", ip(2)),
    )
    .await;
    let (port, mut listeners) = reserve_port(&[ip(2)]);
    let sink = MxSink::start_on(listeners.pop().unwrap(), |rcpt, _| {
        if rcpt.eq_ignore_ascii_case("gone@one.test") {
            SinkReply::Reply(550, "5.1.1 no such user here")
        } else {
            SinkReply::Accept
        }
    })
    .unwrap();
    World { dns, port, sink }
}

impl World {
    async fn relay(&self, extra: &str) -> TestRelay {
        let mut setup = Setup::new(self.dns.addr, self.port);
        // Bounces to the sender would only add events to wait through.
        setup.extra = format!("[dsn]\nenabled = false\n{extra}");
        TestRelay::start(setup).await
    }
}

fn cluster(redis_url: &str, prefix: &str, more: &str) -> String {
    format!(
        "[cluster]\nredis_url = \"{redis_url}\"\nkey_prefix = \"{prefix}\"\nredis_timeout = \"1s\"\n{more}\n"
    )
}

/// The `event` field of every entry of the stream, oldest first.
async fn stream_events(
    conn: &mut ::redis::aio::MultiplexedConnection,
    stream: &str,
) -> Vec<String> {
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .expect("XRANGE");
    entries
        .into_iter()
        .map(|(_, fields)| {
            assert_eq!(fields.len(), 1, "one field per entry: {fields:?}");
            assert_eq!(fields[0].0, "event");
            fields[0].1.clone()
        })
        .collect()
}

fn log_lines(relay: &TestRelay) -> Vec<String> {
    std::fs::read_to_string(relay.events_path())
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_go_to_the_redis_stream_as_logged() {
    if !available("events_go_to_the_redis_stream_as_logged").await {
        return;
    }
    let prefix = unique_prefix("stream");
    let w = world().await;
    let mut relay = w
        .relay(&cluster(&format!("redis://{REDIS}"), &prefix, ""))
        .await;
    let r = relay
        .submit(
            "billing@acme.test",
            &["bob@one.test"],
            &message(1, "bob@one.test"),
        )
        .await;
    r.assert_code(250);
    relay
        .wait_events("delivered", 1, WAIT, |e| field(e, "event") == "delivered")
        .await;
    let stream = format!("{prefix}:events");
    let mut conn = connect().await;
    // The stream is written every 20 ms: wait until it holds every line.
    let deadline = Instant::now() + WAIT;
    let (mut logged, mut streamed) = loop {
        let logged = log_lines(&relay);
        let streamed = stream_events(&mut conn, &stream).await;
        if streamed.len() >= logged.len() || Instant::now() > deadline {
            break (logged, streamed);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let kinds: Vec<String> = streamed
        .iter()
        .map(|s| {
            let v: Value = serde_json::from_str(s).expect("stream entries are JSON");
            field(&v, "event").to_string()
        })
        .collect();
    assert!(kinds.contains(&"received".to_string()), "{kinds:?}");
    assert!(kinds.contains(&"delivered".to_string()), "{kinds:?}");
    // Byte for byte the log's lines (the order may differ between two
    // events emitted at once by different tasks).
    logged.sort();
    streamed.sort();
    assert_eq!(streamed, logged);
    relay.stop().await;
    delete_prefix(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_is_capped_and_named_by_config() {
    if !available("events_stream_is_capped_and_named_by_config").await {
        return;
    }
    let prefix = unique_prefix("maxlen");
    let stream = format!("{prefix}:custom-events");
    let w = world().await;
    let mut relay = w
        .relay(&cluster(
            &format!("redis://{REDIS}"),
            &prefix,
            &format!("events_stream = \"{stream}\"\nevents_stream_maxlen = 10"),
        ))
        .await;
    // 3 messages to 80 recipients each: 243 events. `MAXLEN ~ 10` trims
    // whole stream nodes (100 entries by default), so the stream keeps at
    // most 10 + 100 of them.
    let rcpts: Vec<String> = (0..80).map(|i| format!("r{i}@one.test")).collect();
    let rcpts: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    for n in 0..3 {
        relay
            .submit("billing@acme.test", &rcpts, &message(n, "r0@one.test"))
            .await
            .assert_code(250);
    }
    relay
        .wait_events("240 delivered", 240, WAIT, |e| {
            field(e, "event") == "delivered"
        })
        .await;
    let mut conn = connect().await;
    let sent_before = relay.metric("herald_events_stream_sent_total").await;
    // Wait until the last logged event is in the stream.
    let deadline = Instant::now() + WAIT;
    let last = log_lines(&relay).pop().unwrap();
    let entries = loop {
        let entries = stream_events(&mut conn, &stream).await;
        if entries.contains(&last) || Instant::now() > deadline {
            break entries;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(entries.contains(&last), "the newest event is kept");
    let len = entries.len();
    assert!(
        (10..=110).contains(&len),
        "243 events added, {len} kept with MAXLEN ~ 10"
    );
    assert!(sent_before > 0);
    // Nothing went to the default name.
    let other: i64 = redis::cmd("EXISTS")
        .arg(format!("{prefix}:events"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(other, 0);
    relay.stop().await;
    delete_prefix(&prefix).await;
}

/// The addresses on a relay's suppression list for tenant acme.
async fn listed(relay: &TestRelay) -> Vec<String> {
    let (status, body) = api(relay, "GET", "/api/suppressions?tenant=acme", None).await;
    assert_eq!(status, 200, "{body}");
    body["suppressions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["address"].as_str().unwrap().to_string())
        .collect()
}

/// Waits until `pred` holds for the relay's list; panics after [`WAIT`].
async fn wait_listed(relay: &TestRelay, what: &str, pred: impl Fn(&[String]) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        let l = listed(relay).await;
        if pred(&l) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {l:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// RCPT TO on a fresh authenticated session; the reply.
async fn rcpt(relay: &TestRelay, to: &str) -> common::smtp::Reply {
    let mut c = relay.client().await;
    c.cmd("MAIL FROM:<billing@acme.test>")
        .await
        .assert_code(250);
    let r = c.cmd(&format!("RCPT TO:<{to}>")).await;
    let _ = c.cmd("QUIT").await;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_share_the_suppression_list() {
    if !available("two_relays_share_the_suppression_list").await {
        return;
    }
    let prefix = unique_prefix("supp");
    let w = world().await;
    let extra = cluster(&format!("redis://{REDIS}"), &prefix, "");
    let mut a = w.relay(&extra).await;
    let mut b = w.relay(&extra).await;
    // B accepts the address before anything bounced.
    rcpt(&b, "gone@one.test").await.assert_code(250);

    // A's MX refuses it: a hard bounce, and the address goes on the list.
    a.submit(
        "billing@acme.test",
        &["gone@one.test"],
        &message(1, "gone@one.test"),
    )
    .await
    .assert_code(250);
    a.wait_events("bounced", 1, WAIT, |e| field(e, "event") == "bounced")
        .await;
    wait_listed(&b, "B to see A's entry", |l| {
        l.iter().any(|x| x == "gone@one.test")
    })
    .await;
    let mut conn = connect().await;
    let stored: Option<String> = redis::cmd("HGET")
        .arg(format!("{prefix}:supp:t:acme"))
        .arg("gone@one.test")
        .query_async(&mut conn)
        .await
        .unwrap();
    let stored: Value = serde_json::from_str(&stored.expect("entry in Redis")).unwrap();
    assert_eq!(stored["source"], "bounce");
    assert!(
        stored["reason"].as_str().unwrap().contains("5.1.1"),
        "{stored}"
    );

    // B refuses it at RCPT, saying since when and why.
    let r = rcpt(&b, "gone@one.test").await;
    r.assert_code(550);
    assert_eq!(r.enhanced(), Some("5.1.1"), "{r}");
    assert!(r.text().contains("suppression list"), "{r}");
    b.wait_events("suppressed", 1, WAIT, |e| field(e, "event") == "suppressed")
        .await;

    // Removed through B's API: A accepts it again.
    let (status, body) = api(
        &b,
        "DELETE",
        "/api/suppressions/gone@one.test?tenant=acme",
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    wait_listed(&a, "A to see B's removal", |l| l.is_empty()).await;
    rcpt(&a, "gone@one.test").await.assert_code(250);
    let gone: Option<String> = redis::cmd("HGET")
        .arg(format!("{prefix}:supp:t:acme"))
        .arg("gone@one.test")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(gone, None);

    // A manual entry with an expiry made on A reaches B with it.
    let (status, body) = api(
        &a,
        "POST",
        "/api/suppressions",
        Some(serde_json::json!({"tenant": "acme", "address": "Later@One.test", "reason": "asked", "expire_after": "1h"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    wait_listed(&b, "B to see A's manual entry", |l| {
        l.iter().any(|x| x == "later@one.test")
    })
    .await;
    let (_, listing) = api(&b, "GET", "/api/suppressions?tenant=acme", None).await;
    let entry = &listing["suppressions"][0];
    assert_eq!(entry["reason"], "asked");
    assert_eq!(entry["source"], "manual");
    assert!(entry["expires_at"].is_string(), "{entry}");
    rcpt(&b, "later@one.test").await.assert_code(550);

    a.stop().await;
    b.stop().await;
    delete_prefix(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_mail_flows_and_the_list_works_locally() {
    let start = Instant::now();
    let url = format!("redis://127.0.0.1:{}", closed_port());
    let w = world().await;
    let mut relay = w.relay(&cluster(&url, &unique_prefix("down"), "")).await;

    // Mail flows.
    relay
        .submit(
            "billing@acme.test",
            &["bob@one.test"],
            &message(1, "bob@one.test"),
        )
        .await
        .assert_code(250);
    w.sink.wait_for_messages(1, WAIT);
    relay
        .wait_events("delivered", 1, WAIT, |e| field(e, "event") == "delivered")
        .await;

    // A hard bounce still adds the address, and RCPT refuses it.
    relay
        .submit(
            "billing@acme.test",
            &["gone@one.test"],
            &message(2, "gone@one.test"),
        )
        .await
        .assert_code(250);
    relay
        .wait_events("bounced", 1, WAIT, |e| field(e, "event") == "bounced")
        .await;
    wait_listed(&relay, "the bounce on the local list", |l| {
        l.iter().any(|x| x == "gone@one.test")
    })
    .await;
    rcpt(&relay, "gone@one.test").await.assert_code(550);

    // The API adds and removes, each answer bounded.
    let t = Instant::now();
    let (status, body) = api(
        &relay,
        "POST",
        "/api/suppressions",
        Some(serde_json::json!({"tenant": "acme", "address": "x@one.test"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    rcpt(&relay, "x@one.test").await.assert_code(550);
    let (status, body) = api(
        &relay,
        "DELETE",
        "/api/suppressions/x@one.test?tenant=acme",
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    rcpt(&relay, "x@one.test").await.assert_code(250);
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "API calls took {:?}",
        t.elapsed()
    );

    // The outage shows in the metrics.
    let errors = relay.metric("herald_suppression_redis_errors_total").await;
    assert!(errors > 0, "no Redis errors counted");
    let metrics = common::http::request(
        relay.admin,
        "GET",
        "/metrics",
        Some(relay.admin_token),
        None,
    )
    .await;
    let metrics = metrics.text();
    assert!(
        metrics.contains("herald_events_stream_pending"),
        "{metrics}"
    );
    assert!(
        metrics.contains("herald_suppression_redis_errors_total"),
        "{metrics}"
    );

    relay.stop().await;
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "took {:?}",
        start.elapsed()
    );
}

/// A TCP forwarder from `port` on 127.0.0.1 to the test Redis: Redis
/// "comes back" on an address that was closed.
async fn forward_to_redis(port: u16) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("the reserved port is free again");
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(REDIS).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_outage_buffered_events_and_changes_reach_redis() {
    if !available("after_an_outage_buffered_events_and_changes_reach_redis").await {
        return;
    }
    let prefix = unique_prefix("outage");
    let port = closed_port();
    let w = world().await;
    let mut a = w
        .relay(&cluster(&format!("redis://127.0.0.1:{port}"), &prefix, ""))
        .await;
    // While Redis is away: a delivery and a manual suppression.
    a.submit(
        "billing@acme.test",
        &["bob@one.test"],
        &message(1, "bob@one.test"),
    )
    .await
    .assert_code(250);
    a.wait_events("delivered", 1, WAIT, |e| field(e, "event") == "delivered")
        .await;
    let (status, body) = api(
        &a,
        "POST",
        "/api/suppressions",
        Some(serde_json::json!({"tenant": "acme", "address": "quiet@one.test"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");

    // Redis is back: both reach it, without anything new happening.
    let proxy = forward_to_redis(port).await;
    let mut conn = connect().await;
    let stream = format!("{prefix}:events");
    let deadline = Instant::now() + WAIT;
    let mut logged = log_lines(&a);
    loop {
        let mut streamed = stream_events(&mut conn, &stream).await;
        streamed.sort();
        logged.sort();
        if streamed == logged {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "events not in the stream after Redis came back: {streamed:?} vs {logged:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let stored: Option<String> = redis::cmd("HGET")
            .arg(format!("{prefix}:supp:t:acme"))
            .arg("quiet@one.test")
            .query_async(&mut conn)
            .await
            .unwrap();
        if stored.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the change made during the outage never reached Redis"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A node joining now gets it.
    let mut b = w
        .relay(&cluster(&format!("redis://{REDIS}"), &prefix, ""))
        .await;
    wait_listed(&b, "the new node to load the list", |l| {
        l.iter().any(|x| x == "quiet@one.test")
    })
    .await;
    rcpt(&b, "quiet@one.test").await.assert_code(550);

    a.stop().await;
    b.stop().await;
    proxy.abort();
    delete_prefix(&prefix).await;
}

/// Two stores on one Redis prefix, without relays: the store's semantics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_store_keeps_the_local_semantics_and_converges() {
    if !available("shared_store_keeps_the_local_semantics_and_converges").await {
        return;
    }
    use herald::suppression::Suppressions;
    let prefix = unique_prefix("store");
    let dir = tempfile::tempdir().unwrap();
    let open = |name: &str| {
        let text = format!(
            "[[listener]]\naddress = \"127.0.0.1:0\"\n\
             [suppression]\nfile = \"{}\"\n\
             [cluster]\nredis_url = \"redis://{REDIS}\"\nkey_prefix = \"{prefix}\"\nredis_timeout = \"1s\"\n",
            dir.path().join(name).display()
        );
        let config = herald::config::Config::from_toml_str(&text).unwrap();
        async move {
            Suppressions::open(&config, Default::default())
                .await
                .unwrap()
        }
    };
    let a = open("a.jsonl").await;
    let b = open("b.jsonl").await;
    let until = |what: &'static str, s: Suppressions, pred: fn(&Suppressions) -> bool| async move {
        let deadline = Instant::now() + WAIT;
        while !pred(&s) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };

    // Add on A: B sees the same entry (reason, source, times).
    let e = a
        .manual_entry("", "One@X.test", Some("asked"), None)
        .unwrap();
    a.add(e.clone()).await.unwrap();
    until("B to see the entry", b.clone(), |s| {
        s.lookup("", "one@x.test").is_some()
    })
    .await;
    assert_eq!(b.lookup("", "one@x.test").unwrap(), e);
    // Other tenants' lists are untouched.
    assert!(b.lookup("acme", "one@x.test").is_none());

    // An entry that has expired is nowhere active.
    let old = a.manual_entry("", "old@x.test", None, Some(0)).unwrap();
    a.add(old).await.unwrap();
    assert!(a.lookup("", "old@x.test").is_none());
    assert!(
        b.list(None)
            .await
            .unwrap()
            .iter()
            .all(|e| e.address != "old@x.test")
    );

    // Both write one address at once: both end with the same entry.
    let ea = a
        .manual_entry("", "both@x.test", Some("from a"), None)
        .unwrap();
    let eb = b
        .manual_entry("", "both@x.test", Some("from b"), None)
        .unwrap();
    let (ra, rb) = tokio::join!(a.add(ea), b.add(eb));
    ra.unwrap();
    rb.unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let (x, y) = (a.lookup("", "both@x.test"), b.lookup("", "both@x.test"));
        if x.is_some() && x == y {
            break;
        }
        assert!(Instant::now() < deadline, "no convergence: {x:?} vs {y:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Remove on B: A answers with nothing, and the removal says what it was.
    let removed = b.remove("", "ONE@x.test").await.unwrap();
    assert_eq!(removed.map(|r| r.reason), Some("asked".to_string()));
    until("A to see the removal", a.clone(), |s| {
        s.lookup("", "one@x.test").is_none()
    })
    .await;
    let left: Vec<String> = a
        .list(None)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.address)
        .collect();
    assert_eq!(left, vec!["both@x.test".to_string()]);

    // A third store opened later loads the list, and its file has it too.
    let c = open("c.jsonl").await;
    until("C to load the list", c.clone(), |s| {
        s.lookup("", "both@x.test").is_some()
    })
    .await;
    c.flush().await.unwrap();
    let file = std::fs::read_to_string(dir.path().join("c.jsonl")).unwrap();
    assert!(file.contains("both@x.test"), "{file}");
    drop((a, b, c));
    delete_prefix(&prefix).await;
}
