//! The suppression list end to end: an MX answering `550 5.1.1` puts the
//! recipient on the submitting tenant's list; the next RCPT TO to it from
//! that tenant is refused at once with `550 5.1.1` and a `suppressed`
//! event, while other tenants still send to it. Entries are managed through
//! the admin API and the `herald suppression` commands, survive a restart
//! and expire after `[suppression] expire_after`.
//!
//! Tenants: `acme` (the test relay's) and `globex` (added here); mail from
//! the trusted listener has no tenant.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::dns::{TestDns, Zone};
use common::mx::{MxSink, SinkReply, ip, reserve_port};
use common::relay::{PASSWORD, PASSWORD_HASH, Setup, TestRelay, USER, field, herald, queue_id};
use common::smtp::{Reply, TestClient};

const WAIT: Duration = Duration::from_secs(20);

struct World {
    _dns: TestDns,
    sink: MxSink,
    relay: TestRelay,
}

/// DNS for `one.test` → 127.0.0.2, a sink there refusing `nobody@` with
/// `550 5.1.1`, and a relay with a second tenant plus `extra` config.
async fn world(extra: &str) -> World {
    let dns = TestDns::start(
        Zone::new("test.")
            .mx("one.test", 10, "mx.one.test")
            .a("mx.one.test", ip(2)),
    )
    .await;
    let (port, mut listeners) = reserve_port(&[ip(2)]);
    let sink = MxSink::start_on(listeners.pop().unwrap(), |rcpt: &str, _| {
        if rcpt.starts_with("nobody") {
            SinkReply::Reply(550, "5.1.1 <nobody@one.test>: user unknown")
        } else {
            SinkReply::Accept
        }
    })
    .unwrap();
    let mut setup = Setup::new(dns.addr, port);
    setup.extra = format!(
        r#"
[[tenant]]
name = "globex"
username = "globex"
password_hash = "{PASSWORD_HASH}"
allowed_senders = ["*@globex.test"]

{extra}
"#
    );
    let relay = TestRelay::start(setup).await;
    World {
        _dns: dns,
        sink,
        relay,
    }
}

fn message(from: &str, to: &str) -> Vec<u8> {
    format!(
        "From: <{from}>\r\nTo: <{to}>\r\nSubject: invoice\r\n\
         Date: Sun, 29 Nov 2026 10:00:00 +0000\r\n\r\nInvoice attached.\r\n"
    )
    .into_bytes()
}

/// An authenticated session of `user` (STARTTLS, AUTH PLAIN).
async fn session(relay: &TestRelay, user: &str) -> TestClient {
    let mut c = TestClient::connect(relay.submission).await;
    c.ehlo("app.test").await.assert_code(250);
    c.starttls().await.assert_code(220);
    c.ehlo("app.test").await.assert_code(250);
    c.auth_plain(user, PASSWORD).await.assert_code(235);
    c
}

/// A session on the trusted listener: no AUTH, no tenant.
async fn trusted(relay: &TestRelay) -> TestClient {
    let mut c = TestClient::connect(relay.trusted).await;
    c.ehlo("app.test").await.assert_code(250);
    c
}

/// The reply to RCPT TO in a fresh transaction.
async fn rcpt(c: &mut TestClient, from: &str, to: &str) -> Reply {
    c.cmd("RSET").await.assert_code(250);
    c.cmd(&format!("MAIL FROM:<{from}>")).await.assert_code(250);
    c.cmd(&format!("RCPT TO:<{to}>")).await
}

/// One request with the admin token (unless `token` is none): (status, JSON).
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let r = common::http::request(addr, method, path, token, body.as_ref()).await;
    (r.status, r.json())
}

async fn api(relay: &TestRelay, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    http(relay.admin, method, path, Some(relay.admin_token), body).await
}

/// The addresses on the list, as `tenant/address`.
async fn listed(relay: &TestRelay, query: &str) -> Vec<String> {
    let (status, v) = api(relay, "GET", &format!("/api/suppressions{query}"), None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["total"].as_u64().unwrap() as usize,
        v["suppressions"].as_array().unwrap().len()
    );
    v["suppressions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| format!("{}/{}", field(e, "tenant"), field(e, "address")))
        .collect()
}

/// Sends a message from acme to nobody@one.test and waits for its bounce.
async fn bounce_nobody(w: &World) -> String {
    let r = w
        .relay
        .submit(
            "billing@acme.test",
            &["nobody@one.test"],
            &message("billing@acme.test", "nobody@one.test"),
        )
        .await;
    let id = queue_id(&r);
    w.relay
        .wait_events("bounced nobody@one.test", 1, WAIT, |e| {
            field(e, "event") == "bounced" && field(e, "queue_id") == id
        })
        .await;
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_bounce_suppresses_the_address_for_its_tenant_only() {
    let w = world("").await;
    let id = bounce_nobody(&w).await;
    assert_eq!(w.sink.rcpt_attempts("nobody@one.test"), 1);

    // The bounce put the address on acme's list, with where it came from.
    let (status, v) = api(&w.relay, "GET", "/api/suppressions?tenant=acme", None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["total"], 1, "{v}");
    let e = &v["suppressions"][0];
    assert_eq!(e["tenant"], "acme");
    assert_eq!(e["address"], "nobody@one.test");
    assert_eq!(e["source"], "bounce");
    assert_eq!(e["queue_id"], id.as_str());
    assert_eq!(e["reason"], "550 5.1.1 <nobody@one.test>: user unknown");
    assert!(e["expires_at"].is_null(), "never expires by default: {e}");
    let day = &field(e, "created_at")[..10];

    // The next RCPT TO from acme is refused at once, in any letter case.
    let mut c = session(&w.relay, USER).await;
    let r = rcpt(&mut c, "billing@acme.test", "Nobody@One.test").await;
    r.assert_code(550);
    assert_eq!(r.enhanced(), Some("5.1.1"), "{r}");
    let text = r.text();
    for want in [
        "<Nobody@One.test> is on the suppression list since ",
        day,
        "because it bounced",
        "user unknown",
        "herald suppression remove nobody@one.test --tenant acme",
    ] {
        assert!(text.contains(want), "{want:?} missing in {text}");
    }
    // Other recipients of acme are not affected.
    rcpt(&mut c, "billing@acme.test", "bob@one.test")
        .await
        .assert_code(250);
    let _ = c.cmd("QUIT").await;

    let ev = w
        .relay
        .wait_events("suppressed", 1, WAIT, |e| field(e, "event") == "suppressed")
        .await;
    assert_eq!(field(&ev[0], "tenant"), "acme");
    assert_eq!(field(&ev[0], "recipient"), "Nobody@One.test");
    assert_eq!(field(&ev[0], "sender"), "billing@acme.test");
    assert_eq!(
        field(&ev[0], "reason"),
        "550 5.1.1 <nobody@one.test>: user unknown"
    );
    assert_eq!(ev[0]["smtp"]["code"], 550);
    assert_eq!(ev[0]["permanent"], true);

    // Another tenant, and mail without a tenant, still send to it.
    let mut g = session(&w.relay, "globex").await;
    rcpt(&mut g, "billing@globex.test", "nobody@one.test")
        .await
        .assert_code(250);
    let _ = g.cmd("QUIT").await;
    let mut t = trusted(&w.relay).await;
    rcpt(&mut t, "app@anything.test", "nobody@one.test")
        .await
        .assert_code(250);
    let _ = t.cmd("QUIT").await;

    // The refused recipient never reached the MX again.
    assert_eq!(w.sink.rcpt_attempts("nobody@one.test"), 1);
    let page = metrics_page(&w.relay).await;
    assert!(page.contains("herald_suppressed_total 1"), "{page}");
}

/// `GET /metrics` as text.
async fn metrics_page(relay: &TestRelay) -> String {
    common::http::request(relay.admin, "GET", "/metrics", None, None)
        .await
        .text()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_adds_lists_and_removes() {
    let w = world("").await;
    let r = &w.relay;

    let (status, _) = http(
        r.admin,
        "POST",
        "/api/suppressions",
        None,
        Some(json!({"tenant": "acme", "address": "carol@one.test"})),
    )
    .await;
    assert_eq!(status, 401, "the token is required");

    let (status, v) = api(
        r,
        "POST",
        "/api/suppressions",
        Some(json!({"tenant": "initech", "address": "carol@one.test"})),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        field(&v, "error").contains("no tenant named \"initech\""),
        "{v}"
    );
    let (status, v) = api(
        r,
        "POST",
        "/api/suppressions",
        Some(json!({"tenant": "acme", "address": "carol at one.test"})),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    let (status, v) = api(
        r,
        "POST",
        "/api/suppressions",
        Some(json!({"tenant": "acme"})),
    )
    .await;
    assert_eq!(status, 400, "{v}");

    let (status, v) = api(
        r,
        "POST",
        "/api/suppressions",
        Some(json!({"tenant": "acme", "address": "Carol@One.test", "reason": "asked to stop"})),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["address"], "carol@one.test");
    assert_eq!(v["source"], "manual");
    assert_eq!(v["reason"], "asked to stop");

    let mut c = session(r, USER).await;
    let refused = rcpt(&mut c, "billing@acme.test", "carol@one.test").await;
    refused.assert_code(550);
    assert!(
        refused
            .text()
            .contains("the postmaster added it (reason: asked to stop)"),
        "{refused}"
    );

    assert_eq!(listed(r, "").await, vec!["acme/carol@one.test"]);
    assert_eq!(listed(r, "?tenant=acme").await, vec!["acme/carol@one.test"]);
    assert!(listed(r, "?tenant=globex").await.is_empty());
    let (status, _) = api(r, "GET", "/api/suppressions?tenant=acme&bogus=1", None).await;
    assert_eq!(status, 400);

    // Without the tenant, the removal says whose list has it.
    let (status, v) = api(r, "DELETE", "/api/suppressions/carol@one.test", None).await;
    assert_eq!(status, 404);
    assert!(field(&v, "error").contains("tenant \"acme\""), "{v}");
    let (status, v) = api(
        r,
        "DELETE",
        "/api/suppressions/carol@one.test?tenant=acme",
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["address"], "carol@one.test");
    assert!(listed(r, "").await.is_empty());
    rcpt(&mut c, "billing@acme.test", "carol@one.test")
        .await
        .assert_code(250);
    let _ = c.cmd("QUIT").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_adds_lists_and_removes() {
    let w = world("").await;
    let r = &w.relay;
    let cfg = r.cli_config();

    let (ok, out, err) = herald(
        &cfg,
        &[
            "suppression",
            "add",
            "dave@one.test",
            "--tenant",
            "globex",
            "--reason",
            "bounced elsewhere",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert!(
        out.contains("dave@one.test: added to the suppression list of tenant \"globex\""),
        "{out}"
    );

    let (ok, out, err) = herald(&cfg, &["suppression", "add", "eve@one.test"]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("trusted-network mail without a tenant"),
        "{out}"
    );

    let (ok, out, err) = herald(&cfg, &["suppression", "list"]).await;
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("TENANT"), "{out}");
    assert!(lines[1].starts_with("-"), "no-tenant entry first: {out}");
    assert!(lines[1].contains("eve@one.test"), "{out}");
    assert!(lines[2].starts_with("globex"), "{out}");
    for want in ["dave@one.test", "manual", "never", "bounced elsewhere"] {
        assert!(lines[2].contains(want), "{want} missing: {out}");
    }
    assert_eq!(lines[3], "2 suppressed address(es)");

    let (ok, out, err) = herald(
        &cfg,
        &["suppression", "list", "--tenant", "globex", "--json"],
    )
    .await;
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["total"], 1);
    assert_eq!(v["suppressions"][0]["address"], "dave@one.test");

    // Each list applies to its own sessions only.
    let mut g = session(r, "globex").await;
    rcpt(&mut g, "billing@globex.test", "dave@one.test")
        .await
        .assert_code(550);
    rcpt(&mut g, "billing@globex.test", "eve@one.test")
        .await
        .assert_code(250);
    let mut t = trusted(r).await;
    let refused = rcpt(&mut t, "app@anything.test", "eve@one.test").await;
    refused.assert_code(550);
    assert!(
        refused
            .text()
            .ends_with("`herald suppression remove eve@one.test`"),
        "{refused}"
    );
    rcpt(&mut t, "app@anything.test", "dave@one.test")
        .await
        .assert_code(250);

    let (ok, _, err) = herald(&cfg, &["suppression", "remove", "dave@one.test"]).await;
    assert!(!ok, "not on the no-tenant list");
    assert!(
        err.contains("404") && err.contains("tenant \"globex\""),
        "{err}"
    );
    let (ok, out, err) = herald(
        &cfg,
        &[
            "suppression",
            "remove",
            "dave@one.test",
            "--tenant",
            "globex",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert!(
        out.contains("removed from the suppression list of tenant \"globex\""),
        "{out}"
    );
    rcpt(&mut g, "billing@globex.test", "dave@one.test")
        .await
        .assert_code(250);
    let _ = g.cmd("QUIT").await;
    let _ = t.cmd("QUIT").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_list_survives_a_restart() {
    let mut w = world("").await;
    bounce_nobody(&w).await;
    for a in ["carol@one.test", "erin@one.test"] {
        let (status, v) = api(
            &w.relay,
            "POST",
            "/api/suppressions",
            Some(json!({"tenant": "acme", "address": a})),
        )
        .await;
        assert_eq!(status, 201, "{v}");
    }
    let (status, _) = api(
        &w.relay,
        "DELETE",
        "/api/suppressions/erin@one.test?tenant=acme",
        None,
    )
    .await;
    assert_eq!(status, 200);

    w.relay.restart().await;

    assert_eq!(
        listed(&w.relay, "").await,
        vec!["acme/carol@one.test", "acme/nobody@one.test"]
    );
    let mut c = session(&w.relay, USER).await;
    rcpt(&mut c, "billing@acme.test", "nobody@one.test")
        .await
        .assert_code(550);
    rcpt(&mut c, "billing@acme.test", "erin@one.test")
        .await
        .assert_code(250);
    let _ = c.cmd("QUIT").await;
    // Compacted at start: one line per entry.
    let file = w.relay.dir.path().join("spool").join("suppressions.jsonl");
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(text.lines().count(), 2, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_expire_after_the_configured_time() {
    let w = world("[suppression]\nexpire_after = \"3s\"\n").await;
    let r = &w.relay;
    let (status, v) = api(
        r,
        "POST",
        "/api/suppressions",
        Some(json!({"tenant": "acme", "address": "carol@one.test"})),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    assert!(v["expires_at"].is_string(), "{v}");
    let mut c = session(r, USER).await;
    rcpt(&mut c, "billing@acme.test", "carol@one.test")
        .await
        .assert_code(550);

    // Expiry is a matter of time: poll the list until the entry is gone.
    let deadline = Instant::now() + WAIT;
    while !listed(r, "").await.is_empty() {
        assert!(Instant::now() < deadline, "entry did not expire");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    rcpt(&mut c, "billing@acme.test", "carol@one.test")
        .await
        .assert_code(250);
    let _ = c.cmd("QUIT").await;
}
