//! Rate limits end to end (`[limits]`, `[cluster] redis_url`): a tenant
//! over its message rate gets `451 4.7.1` naming the limit; a client IP over
//! its connection rate gets `421 4.7.0`; a domain's delivery rate spaces
//! deliveries without any deferral; two relays sharing one Redis obey one
//! limit together; an unreachable Redis leaves local limits in force.
//!
//! The cluster test needs Redis on 127.0.0.1:6379: without it, it is
//! skipped with a printed reason, unless `CI` is set (then it fails).

mod common;

use std::time::{Duration, Instant};

use common::dns::{TestDns, Zone};
use common::mx::{MxSink, ip, reserve_port};
use common::redis::REDIS;
use common::relay::{Setup, TestRelay, field};
use common::smtp::TestClient;

const WAIT: Duration = Duration::from_secs(20);

fn message(n: u32) -> Vec<u8> {
    format!(
        "From: Acme Billing <billing@acme.test>\r\n\
         To: <bob@one.test>\r\n\
         Subject: Invoice {n}\r\n\
         Date: Sun, 29 Nov 2026 10:00:00 +0000\r\n\
         Message-ID: <rl-{n}@acme.test>\r\n\
         \r\n\
         Invoice {n}\r\n"
    )
    .into_bytes()
}

struct World {
    _dns: TestDns,
    sink: MxSink,
    relay: TestRelay,
}

/// DNS with `one.test` → 127.0.0.2, an accepting sink there, and a relay
/// whose config ends with `extra`.
async fn world(extra: &str) -> World {
    let dns = TestDns::start(
        Zone::new("test.")
            .mx("one.test", 10, "mx.one.test")
            .a("mx.one.test", ip(2)),
    )
    .await;
    let (port, mut listeners) = reserve_port(&[ip(2)]);
    let sink = MxSink::start_on(listeners.pop().unwrap(), |_, _| {
        common::mx::SinkReply::Accept
    })
    .unwrap();
    let mut setup = Setup::new(dns.addr, port);
    setup.extra = extra.to_string();
    let relay = TestRelay::start(setup).await;
    World {
        _dns: dns,
        sink,
        relay,
    }
}

/// Whether MAIL FROM is accepted on this authenticated session; the
/// transaction is then completed so that the message counts.
async fn try_send(c: &mut TestClient, n: u32) -> common::smtp::Reply {
    let r = c
        .send_mail("billing@acme.test", &["bob@one.test"], &message(n))
        .await;
    if r.code / 100 != 2 {
        let _ = c.cmd("RSET").await;
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_over_its_message_rate_gets_451_naming_the_limit() {
    let w = world("[limits]\ntenant_messages = \"3/m\"\n").await;
    let mut c = w.relay.client().await;
    for n in 0..3 {
        try_send(&mut c, n).await.assert_code(250);
    }
    let r = try_send(&mut c, 3).await;
    r.assert_code(451);
    assert_eq!(r.enhanced(), Some("4.7.1"), "{r}");
    let text = r.text();
    assert!(
        text.contains("tenant acme exceeded 3 messages/minute; retry after "),
        "{text}"
    );
    // Recipients are not limited here; the three messages arrive.
    w.sink.wait_for_messages(3, WAIT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_recipient_rate_is_checked_at_rcpt() {
    let w = world("[limits]\ntenant_recipients = \"2/m\"\n").await;
    let mut c = w.relay.client().await;
    c.cmd("MAIL FROM:<billing@acme.test>")
        .await
        .assert_code(250);
    c.cmd("RCPT TO:<a@one.test>").await.assert_code(250);
    c.cmd("RCPT TO:<b@one.test>").await.assert_code(250);
    let r = c.cmd("RCPT TO:<c@one.test>").await;
    r.assert_code(451);
    assert!(
        r.text()
            .contains("tenant acme exceeded 2 recipients/minute; retry after "),
        "{r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_over_its_connection_rate_gets_421() {
    let w = world("[limits]\nip_connections = \"2/m\"\n").await;
    let a = TestClient::connect(w.relay.trusted).await;
    a.greeting.assert_code(220);
    let b = TestClient::connect(w.relay.trusted).await;
    b.greeting.assert_code(220);
    let mut c = TestClient::connect(w.relay.trusted).await;
    c.greeting.assert_code(421);
    assert_eq!(c.greeting.enhanced(), Some("4.7.0"));
    assert!(
        c.greeting
            .text()
            .contains("client 127.0.0.1 exceeded 2 connections/minute; retry after "),
        "{}",
        c.greeting
    );
    c.expect_closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_rate_spaces_deliveries_without_deferring_them() {
    // One message every 300 ms to one.test, none at once beyond the first.
    let w = world("[limits.domains]\n\"one.test\" = \"200/m burst 1\"\n").await;
    let mut c = w.relay.client().await;
    let start = Instant::now();
    for n in 0..5 {
        try_send(&mut c, n).await.assert_code(250);
    }
    // Record when each message arrives.
    let mut arrivals = Vec::new();
    let deadline = Instant::now() + WAIT;
    while arrivals.len() < 5 {
        let n = w.sink.messages().len();
        while arrivals.len() < n {
            arrivals.push(start.elapsed());
        }
        assert!(
            Instant::now() < deadline,
            "only {} of 5 delivered: {arrivals:?}",
            arrivals.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // 4 intervals of 300 ms between the first and the last at the least.
    let span = arrivals[4] - arrivals[0];
    assert!(span >= Duration::from_millis(1000), "{arrivals:?}");
    w.relay
        .wait_events("5 delivered", 5, WAIT, |e| field(e, "event") == "delivered")
        .await;
    let bad: Vec<_> = w
        .relay
        .events()
        .into_iter()
        .filter(|e| matches!(field(e, "event"), "deferred" | "bounced" | "expired"))
        .collect();
    assert!(bad.is_empty(), "waiting is not a failure: {bad:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_redis_leaves_local_limits_in_force() {
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let w = world(&format!(
        "[limits]\ntenant_messages = \"2/m\"\n[cluster]\nredis_url = \"redis://127.0.0.1:{closed}\"\n"
    ))
    .await;
    let mut c = w.relay.client().await;
    try_send(&mut c, 0).await.assert_code(250);
    try_send(&mut c, 1).await.assert_code(250);
    try_send(&mut c, 2).await.assert_code(451);
    w.sink.wait_for_messages(2, WAIT);
    assert!(
        w.relay
            .metric("herald_ratelimit_redis_fallbacks_total")
            .await
            >= 3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_sharing_redis_obey_one_limit() {
    if !common::redis::available("two_relays_sharing_redis_obey_one_limit").await {
        return;
    }
    // A key prefix of its own, so that parallel runs do not collide.
    let prefix = common::redis::unique_prefix("rl");
    let extra = format!(
        "[limits]\ntenant_messages = \"4/m\"\n\
         [cluster]\nredis_url = \"redis://{REDIS}\"\nkey_prefix = \"{prefix}\"\nredis_timeout = \"2s\"\n"
    );
    let a = world(&extra).await;
    let b = world(&extra).await;
    let start = Instant::now();
    let mut ca = a.relay.client().await;
    let mut cb = b.relay.client().await;
    let (mut accepted, mut refused) = ([0u32; 2], 0);
    for n in 0..10 {
        let (c, i) = if n % 2 == 0 {
            (&mut ca, 0)
        } else {
            (&mut cb, 1)
        };
        let r = try_send(c, n).await;
        match r.code {
            250 => accepted[i] += 1,
            451 => {
                assert!(
                    r.text().contains("tenant acme exceeded 4 messages/minute"),
                    "{r}"
                );
                refused += 1;
            }
            _ => panic!("unexpected reply {r}"),
        }
    }
    let elapsed = start.elapsed();
    // 4 at once, then one per 15 s.
    let allowed = 4 + (elapsed.as_secs() / 15) as u32;
    let total = accepted[0] + accepted[1];
    assert!(
        (4..=allowed).contains(&total),
        "accepted {accepted:?} in {elapsed:?}; one shared limit allows {allowed}"
    );
    assert!(accepted[0] > 0 && accepted[1] > 0, "{accepted:?}");
    assert_eq!(total + refused, 10);
    drop((ca, cb, a, b));
    common::redis::delete_prefix(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_gcra_script_matches_the_local_math() {
    if !common::redis::available("redis_gcra_script_matches_the_local_math").await {
        return;
    }
    let prefix = common::redis::unique_prefix("gcra");
    let text = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\ntls = \"none\"\nauth = \"none\"\n\
         trusted_networks = [\"127.0.0.0/8\"]\n\
         [limits]\nip_connections = \"3/m\"\n\
         [cluster]\nredis_url = \"redis://{REDIS}\"\nkey_prefix = \"{prefix}\"\n\
         redis_timeout = \"2s\"\n"
    );
    let config = herald::config::Config::from_toml_str(&text).unwrap();
    // Two nodes' worth of limiters, one shared state.
    let a = herald::ratelimit::RateLimits::new(&config, Default::default());
    let b = herald::ratelimit::RateLimits::new(&config, Default::default());
    let ip = "192.0.2.7".parse().unwrap();
    a.ip_connection(ip).await.unwrap();
    b.ip_connection(ip).await.unwrap();
    a.ip_connection(ip).await.unwrap();
    let e = b.ip_connection(ip).await.unwrap_err();
    // T = 20 s: the 4th of a burst of 3 waits (almost) one interval.
    assert!(
        e.retry_after > Duration::from_secs(19) && e.retry_after <= Duration::from_secs(20),
        "{e:?}"
    );
    assert_eq!(e.what, "client 192.0.2.7 exceeded 3 connections/minute");
    // Another subject has its own key.
    a.ip_connection("192.0.2.8".parse().unwrap()).await.unwrap();
    common::redis::delete_prefix(&prefix).await;
}
