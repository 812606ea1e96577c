//! The admin API, metrics and `herald queue` commands against a running
//! relay whose queue holds messages: the only MX of `dead.test` refuses
//! connections, so its recipients stay deferred (retry every hour);
//! `one.test` has a sink that accepts everyone but `nobody@`.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;

use common::dns::{TestDns, Zone};
use common::http::Resp;
use common::mx::{MxSink, SinkReply, ip, reserve_port};
use common::relay::{ADMIN_TOKEN, Setup, TestRelay, field, herald, queue_id};
use common::smtp::TestClient;

const WAIT: Duration = Duration::from_secs(20);

struct World {
    _dns: TestDns,
    _sink: MxSink,
    relay: TestRelay,
}

async fn world() -> World {
    let dns = TestDns::start(
        Zone::new("test.")
            .mx("one.test", 10, "mx.one.test")
            .a("mx.one.test", ip(2))
            .mx("dead.test", 10, "mx.dead.test")
            .a("mx.dead.test", ip(4)),
    )
    .await;
    let (port, mut listeners) = reserve_port(&[ip(2), ip(4)]);
    drop(listeners.pop()); // 127.0.0.4: refuses connections
    let sink = MxSink::start_on(listeners.pop().unwrap(), |rcpt: &str, _| {
        if rcpt.starts_with("nobody") {
            SinkReply::Reply(550, "5.1.1 no such user")
        } else {
            SinkReply::Accept
        }
    })
    .unwrap();
    let mut setup = Setup::new(dns.addr, port);
    setup.retry = r#"["1h"]"#;
    // No bounce reports: acme.test has no MX in this zone, so each DSN would
    // bounce in turn and add to the counted sequence (tests/dsn.rs covers them).
    setup.extra = "[dsn]\nenabled = false\n".into();
    let relay = TestRelay::start(setup).await;
    World {
        _dns: dns,
        _sink: sink,
        relay,
    }
}

fn message(to: &str) -> Vec<u8> {
    format!(
        "From: <billing@acme.test>\r\nTo: <{to}>\r\nSubject: invoice\r\n\
         Date: Sun, 29 Nov 2026 10:00:00 +0000\r\n\r\nInvoice attached.\r\n"
    )
    .into_bytes()
}

async fn api(relay: &TestRelay, method: &str, path: &str) -> Resp {
    http(relay.admin, method, path, Some(relay.admin_token)).await
}

async fn http(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> Resp {
    common::http::request(addr, method, path, token, None).await
}

/// The queue ids listed for a query, in order.
async fn listed(relay: &TestRelay, query: &str) -> Vec<String> {
    let r = api(relay, "GET", &format!("/api/queue{query}")).await;
    assert_eq!(r.status, 200, "{query}: {}", r.text());
    r.json()["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

/// Waits for a `deferred` event of message `id` with attempt `n`.
async fn wait_deferred(relay: &TestRelay, id: &str, n: u64) {
    relay
        .wait_events(&format!("deferred {id} attempt {n}"), 1, WAIT, |e| {
            field(e, "event") == "deferred" && field(e, "queue_id") == id && e["attempt"] == n
        })
        .await;
}

/// Three messages waiting: A (acme, dead.test), B (acme, dead.test and a
/// delivered one.test recipient), C (trusted network, no tenant, dead.test).
async fn queued(w: &World) -> (String, String, String) {
    let r = &w.relay;
    let a = queue_id(
        &r.submit(
            "billing@acme.test",
            &["x@dead.test"],
            &message("x@dead.test"),
        )
        .await,
    );
    let b = queue_id(
        &r.submit(
            "billing@acme.test",
            &["y@dead.test", "z@one.test"],
            &message("y@dead.test"),
        )
        .await,
    );
    let mut t = TestClient::connect(r.trusted).await;
    t.ehlo("app.test").await.assert_code(250);
    let c = queue_id(
        &t.send_mail(
            "ops@elsewhere.test",
            &["w@dead.test"],
            &message("w@dead.test"),
        )
        .await,
    );
    for id in [&a, &b, &c] {
        wait_deferred(r, id, 1).await;
    }
    r.wait_events("z delivered", 1, WAIT, |e| {
        field(e, "event") == "delivered" && field(e, "recipient") == "z@one.test"
    })
    .await;
    (a, b, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_requires_the_bearer_token() {
    let w = world().await;
    let r = &w.relay;
    let health = http(r.admin, "GET", "/healthz", None).await;
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["status"], "ok");

    let none = http(r.admin, "GET", "/api/queue", None).await;
    assert_eq!(none.status, 401);
    assert!(none.header("www-authenticate").is_some());
    assert!(none.json()["error"].as_str().unwrap().contains("bearer"));

    let wrong = http(r.admin, "GET", "/api/queue", Some("not-the-token")).await;
    assert_eq!(wrong.status, 401);
    let wrong_long = http(
        r.admin,
        "POST",
        "/api/queue/flush",
        Some(&format!("{ADMIN_TOKEN}x")),
    )
    .await;
    assert_eq!(wrong_long.status, 401);
    for resp in [&none, &wrong, &wrong_long] {
        assert!(
            !resp.text().contains(ADMIN_TOKEN),
            "token leaked: {}",
            resp.text()
        );
    }
    let right = api(r, "GET", "/api/queue").await;
    assert_eq!(right.status, 200, "{}", right.text());
    assert_eq!(right.json()["total"], 0);

    // Unknown endpoints and bad ids answer JSON errors.
    let nope = api(r, "GET", "/api/nothing").await;
    assert_eq!(nope.status, 404);
    assert_eq!(nope.json()["error"], "no such endpoint");
    let bad = api(r, "GET", "/api/queue/not-an-id").await;
    assert_eq!(bad.status, 400);
    assert!(bad.json()["error"].as_str().unwrap().contains("queue id"));
    let unknown = api(r, "GET", "/api/queue/0000000000000000ABCD").await;
    assert_eq!(unknown.status, 404);
    assert!(
        unknown.json()["error"]
            .as_str()
            .unwrap()
            .contains("not in the queue")
    );
    for (m, p) in [
        ("POST", "/api/queue/0000000000000000ABCD/retry"),
        ("DELETE", "/api/queue/0000000000000000ABCD"),
        ("GET", "/api/messages/0000000000000000ABCD"),
    ] {
        assert_eq!(api(r, m, p).await.status, 404, "{m} {p}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_list_filters_show_retry_flush_delete() {
    let w = world().await;
    let r = &w.relay;
    let (a, b, c) = queued(&w).await;

    // List, oldest first, and each filter.
    assert_eq!(listed(r, "").await, [a.as_str(), &b, &c]);
    assert_eq!(listed(r, "?domain=dead.test").await, [a.as_str(), &b, &c]);
    assert_eq!(listed(r, "?domain=DEAD.test").await, [a.as_str(), &b, &c]);
    assert!(
        listed(r, "?domain=one.test").await.is_empty(),
        "one.test's recipient is delivered, nothing waits for it"
    );
    assert_eq!(listed(r, "?tenant=acme").await, [a.as_str(), &b]);
    assert_eq!(listed(r, "?state=delivered").await, [b.as_str()]);
    assert_eq!(
        listed(r, "?state=deferred&tenant=acme").await,
        [a.as_str(), &b]
    );
    assert_eq!(listed(r, "?min_age=0s").await.len(), 3);
    assert!(listed(r, "?min_age=1h").await.is_empty());
    for bad in ["?state=lost", "?min_age=soon", "?colour=red"] {
        let resp = api(r, "GET", &format!("/api/queue{bad}")).await;
        assert_eq!(resp.status, 400, "{bad}: {}", resp.text());
        assert!(resp.json()["error"].is_string());
    }
    let all = api(r, "GET", "/api/queue").await.json();
    assert_eq!(all["total"], 3);
    let mb = &all["messages"][1];
    assert_eq!(mb["tenant"], "acme");
    assert_eq!(mb["sender"], "billing@acme.test");
    assert_eq!(mb["recipients"]["deferred"], 1);
    assert_eq!(mb["recipients"]["delivered"], 1);
    assert_eq!(mb["domains"], serde_json::json!(["dead.test"]));
    assert!(mb["next_attempt"].is_string());
    assert!(mb["last_reply"].as_str().unwrap().starts_with('4'), "{mb}");

    // Show one message, and its per-recipient status.
    let shown = api(r, "GET", &format!("/api/queue/{b}")).await;
    assert_eq!(shown.status, 200);
    let m = shown.json();
    assert_eq!(m["id"], b.as_str());
    assert_eq!(m["tenant"], "acme");
    assert!(m["size"].as_u64().unwrap() > 0);
    let status = api(r, "GET", &format!("/api/messages/{b}")).await.json();
    let rcpts = status["recipients"].as_array().unwrap();
    assert_eq!(rcpts.len(), 2);
    assert_eq!(rcpts[0]["address"], "y@dead.test");
    assert_eq!(rcpts[0]["status"], "deferred");
    assert_eq!(rcpts[0]["attempts"], 1);
    assert!(rcpts[0]["next_attempt"].is_string());
    assert!(rcpts[0]["updated_at"].is_string());
    assert_eq!(rcpts[0]["last_reply"]["code"].as_u64().unwrap() / 100, 4);
    assert_eq!(rcpts[1]["address"], "z@one.test");
    assert_eq!(rcpts[1]["status"], "delivered");
    assert_eq!(rcpts[1]["last_reply"]["code"], 250);
    assert_eq!(rcpts[1]["last_mx"], "mx.one.test");
    assert!(rcpts[1]["next_attempt"].is_null());

    // Retry one: its recipient is tried again at once (the next retry was an hour away).
    let retried = api(r, "POST", &format!("/api/queue/{a}/retry")).await;
    assert_eq!(retried.status, 200, "{}", retried.text());
    assert_eq!(retried.json()["action"], "retry");
    wait_deferred(r, &a, 2).await;

    // Flush: every waiting recipient is tried again.
    let flushed = api(r, "POST", "/api/queue/flush").await;
    assert_eq!(flushed.status, 200);
    assert_eq!(flushed.json()["messages"], 3);
    wait_deferred(r, &a, 3).await;
    wait_deferred(r, &b, 2).await;
    wait_deferred(r, &c, 2).await;

    // Delete one.
    let deleted = api(r, "DELETE", &format!("/api/queue/{c}")).await;
    assert_eq!(deleted.status, 200);
    assert_eq!(deleted.json()["id"], c.as_str());
    assert_eq!(api(r, "GET", &format!("/api/queue/{c}")).await.status, 404);
    assert_eq!(
        api(r, "DELETE", &format!("/api/queue/{c}")).await.status,
        404
    );
    assert_eq!(listed(r, "").await, [a.as_str(), &b]);
}

/// Reads `name{labels} value` (or `name value`) from a metrics page.
fn metric(page: &str, series: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{page}"))
        .trim()
        .parse::<f64>()
        .unwrap() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_known_sequence() {
    let w = world().await;
    let r = &w.relay;
    // 2 delivered + 1 bounced in one message, 1 deferred in another.
    queue_id(
        &r.submit(
            "billing@acme.test",
            &["ok1@one.test", "ok2@one.test", "nobody@one.test"],
            &message("ok1@one.test"),
        )
        .await,
    );
    let waiting = queue_id(
        &r.submit(
            "billing@acme.test",
            &["x@dead.test"],
            &message("x@dead.test"),
        )
        .await,
    );
    // One refusal: another company's sender.
    let mut c = r.client().await;
    c.cmd("MAIL FROM:<ceo@other.test>").await.assert_code(553);
    r.wait_events("2 delivered", 2, WAIT, |e| field(e, "event") == "delivered")
        .await;
    r.wait_events("bounced", 1, WAIT, |e| field(e, "event") == "bounced")
        .await;
    wait_deferred(r, &waiting, 1).await;
    r.wait_events("rejected", 1, WAIT, |e| field(e, "event") == "rejected")
        .await;

    // Scraped without a token; `c` is still connected.
    let resp = http(r.admin, "GET", "/metrics", None).await;
    assert_eq!(resp.status, 200);
    assert!(
        resp.header("content-type")
            .unwrap()
            .starts_with("text/plain"),
        "{:?}",
        resp.header("content-type")
    );
    let page = resp.text();
    assert_eq!(metric(&page, "herald_messages_received_total"), 2);
    assert_eq!(metric(&page, "herald_recipients_received_total"), 4);
    let delivered = metric(&page, "herald_recipients_delivered_total{tls=\"yes\"}")
        + metric(&page, "herald_recipients_delivered_total{tls=\"no\"}");
    assert_eq!(delivered, 2);
    assert_eq!(
        metric(
            &page,
            "herald_recipients_bounced_total{classification=\"invalid_recipient\"}"
        ),
        1
    );
    let bounced_other: u64 = page
        .lines()
        .filter(|l| l.starts_with("herald_recipients_bounced_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(bounced_other, 1, "exactly one bounce in all classes");
    let deferred: u64 = page
        .lines()
        .filter(|l| l.starts_with("herald_recipients_deferred_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(deferred, 1);
    assert_eq!(metric(&page, "herald_recipients_expired_total"), 0);
    assert_eq!(
        metric(&page, "herald_rejected_total{rule=\"sender_not_allowed\"}"),
        1
    );
    assert_eq!(metric(&page, "herald_queue_messages"), 1);
    assert_eq!(
        metric(&page, "herald_queue_recipients{domain=\"dead.test\"}"),
        1
    );
    assert!(page.contains("herald_queue_oldest_age_seconds{domain=\"dead.test\"} "));
    assert!(metric(&page, "herald_connections_open") >= 1);
    assert_eq!(metric(&page, "herald_delivery_latency_seconds_count"), 2);
    assert_eq!(metric(&page, "herald_enqueue_latency_seconds_count"), 2);
    assert_eq!(
        metric(&page, "herald_enqueue_latency_seconds_bucket{le=\"+Inf\"}"),
        2
    );
    assert_eq!(metric(&page, "herald_accept_latency_seconds_count"), 2);
    // Three STARTTLS sessions (two submissions and `c`); the sink offers
    // no TLS, so delivery went in plaintext (one connection per domain
    // attempt that connected).
    assert_eq!(
        metric(&page, "herald_tls_sessions_in_total{version=\"TLSv1.3\"}"),
        3
    );
    assert!(metric(&page, "herald_connections_out_total{tls=\"none\"}") >= 1);
    // At least the MX lookups at RCPT (the resolver caches the rest).
    assert!(metric(&page, "herald_dns_lookup_seconds_count") >= 2);
    let _ = c.cmd("QUIT").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_cli_calls_the_api() {
    let w = world().await;
    let r = &w.relay;
    let id = queue_id(
        &r.submit(
            "billing@acme.test",
            &["x@dead.test", "z@one.test"],
            &message("x@dead.test"),
        )
        .await,
    );
    wait_deferred(r, &id, 1).await;
    let cfg = r.cli_config();

    let (ok, out, err) = herald(&cfg, &["queue", "list"]).await;
    assert!(ok, "{err}");
    let header = out.lines().next().unwrap();
    assert!(
        header.starts_with("QUEUE ID") && header.contains("NEXT ATTEMPT"),
        "{out}"
    );
    let row = out.lines().nth(1).unwrap();
    assert!(row.starts_with(&id), "{out}");
    assert!(
        row.contains("acme") && row.contains("billing@acme.test"),
        "{out}"
    );
    assert!(
        row.contains("1 deferred") && row.contains("dead.test"),
        "{out}"
    );
    assert!(out.contains("1 of 1 message(s)"), "{out}");

    let (ok, out, _) = herald(&cfg, &["queue", "list", "--domain", "other.test"]).await;
    assert!(ok);
    assert!(
        out.contains("no matching messages (1 in the queue)"),
        "{out}"
    );

    let (ok, out, _) = herald(&cfg, &["queue", "list", "--domain", "dead.test", "--json"]).await;
    assert!(ok);
    let v: Value = serde_json::from_str(&out).expect("--json prints JSON");
    assert_eq!(v["messages"][0]["id"], id.as_str());

    let (ok, out, err) = herald(&cfg, &["queue", "show", &id]).await;
    assert!(ok, "{err}");
    assert!(out.contains(&format!("Queue ID:    {id}")), "{out}");
    let x = out
        .lines()
        .find(|l| l.starts_with("x@dead.test"))
        .expect(&out);
    assert!(x.contains("deferred"), "{out}");
    let z = out
        .lines()
        .find(|l| l.starts_with("z@one.test"))
        .expect(&out);
    assert!(
        z.contains("delivered") && z.contains("(from mx.one.test)"),
        "{out}"
    );

    let (ok, out, _) = herald(&cfg, &["queue", "show", &id, "--json"]).await;
    assert!(ok);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["recipients"][0]["status"], "deferred");

    let (ok, out, err) = herald(&cfg, &["queue", "retry", &id]).await;
    assert!(ok, "{err}");
    assert!(out.contains("tried now"), "{out}");
    wait_deferred(r, &id, 2).await;

    let (ok, out, err) = herald(&cfg, &["queue", "flush"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("1 message(s)"), "{out}");
    wait_deferred(r, &id, 3).await;

    let (ok, out, err) = herald(&cfg, &["queue", "delete", &id]).await;
    assert!(ok, "{err}");
    assert!(out.contains("deleted"), "{out}");
    assert!(r.running().queue.is_empty());

    // Failures: exit status non-zero and the API's reason on stderr.
    let (ok, _, err) = herald(&cfg, &["queue", "show", &id]).await;
    assert!(!ok);
    assert!(
        err.contains("404") && err.contains("not in the queue"),
        "{err}"
    );
    let (ok, _, err) = herald(&cfg, &["queue", "show", "xyz"]).await;
    assert!(!ok);
    assert!(err.contains("400"), "{err}");

    let wrong = r.dir.path().join("herald-wrong-token.toml");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(ADMIN_TOKEN, "guess");
    std::fs::write(&wrong, text).unwrap();
    let (ok, _, err) = herald(&wrong, &["queue", "list"]).await;
    assert!(!ok);
    assert!(
        err.contains("401") && err.contains("wrong bearer token"),
        "{err}"
    );
    assert!(!err.contains("guess"), "the token is never printed: {err}");
}

/// Clients that send half a request and stop are cut off after the
/// header-read timeout, and meanwhile the API still answers others.
#[tokio::test]
async fn half_sent_requests_are_cut_off() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let w = world().await;
    let mut stalled = Vec::new();
    for _ in 0..300 {
        let mut s = tokio::net::TcpStream::connect(w.relay.admin).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: herald\r\n")
            .await
            .unwrap();
        stalled.push(s);
    }
    let r = http(w.relay.admin, "GET", "/healthz", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // The stalled ones are closed by the server, not left hanging.
    let mut first = stalled.swap_remove(0);
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), first.read_to_end(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(_)) | Ok(Err(_))),
        "a half-sent request was still open after 30 s"
    );
    assert!(
        !String::from_utf8_lossy(&buf).contains("200 OK"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
}
