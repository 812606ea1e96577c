//! Suspending delivery (a destination domain, a tenant) and the tenant
//! reputation guard, end to end: real SMTP submission, a real recipient MX
//! on 127.0.0.2, the admin API and the `herald` binary's commands.
//!
//! `one.test` and `two.test` both have their MX on one sink, which refuses
//! `nobody*@` with `550 5.1.1` and accepts everyone else.

mod common;

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::dns::{TestDns, Zone};
use common::http::{api, request};
use common::mx::{MxSink, SinkReply, ip, reserve_port};
use common::relay::{Setup, TestRelay, field, herald, queue_id};

const WAIT: Duration = Duration::from_secs(20);
/// How long a suspended message is watched for an unwanted delivery.
const QUIET: Duration = Duration::from_millis(2500);

struct World {
    _dns: TestDns,
    sink: MxSink,
    relay: TestRelay,
}

async fn world(extra: &str) -> World {
    let dns = TestDns::start(
        Zone::new("test.")
            .mx("one.test", 10, "mx.one.test")
            .mx("two.test", 10, "mx.one.test")
            .a("mx.one.test", ip(2)),
    )
    .await;
    let (port, mut listeners) = reserve_port(&[ip(2)]);
    let sink = MxSink::start_on(listeners.pop().unwrap(), |rcpt: &str, _| {
        if rcpt.starts_with("nobody") {
            SinkReply::Reply(550, "5.1.1 no such user")
        } else {
            SinkReply::Accept
        }
    })
    .unwrap();
    let mut setup = Setup::new(dns.addr, port);
    // No bounce reports: acme.test has no MX here, so each DSN would only
    // add deferrals to the log (tests/dsn.rs covers them).
    setup.extra = format!("[dsn]\nenabled = false\n\n{extra}");
    let relay = TestRelay::start(setup).await;
    World {
        _dns: dns,
        sink,
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

/// The first recipient of a queued message, from the API.
async fn recipient(relay: &TestRelay, id: &str) -> Value {
    let (status, v) = api(relay, "GET", &format!("/api/queue/{id}"), None).await;
    assert_eq!(status, 200, "{v}");
    v["recipients"][0].clone()
}

/// Watches a suspended message for `QUIET`: never attempted, still pending,
/// no delivery event of any kind.
async fn assert_held(w: &World, id: &str) {
    tokio::task::block_in_place(|| w.sink.assert_no_message_within(QUIET));
    let r = recipient(&w.relay, id).await;
    assert_eq!(r["status"], "pending", "{r}");
    assert_eq!(r["attempts"], 0, "{r}");
    let touched: Vec<Value> = w
        .relay
        .events()
        .into_iter()
        .filter(|e| field(e, "queue_id") == id && field(e, "event") != "received")
        .collect();
    assert!(
        touched.is_empty(),
        "no outcome while suspended: {touched:?}"
    );
}

async fn metrics(relay: &TestRelay) -> String {
    let r = request(relay.admin, "GET", "/metrics", None, None).await;
    assert_eq!(r.status, 200);
    r.text()
}

fn gauge(page: &str, name: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{page}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_domain_keeps_its_mail_until_resumed() {
    let w = world("").await;
    let r = &w.relay;

    let (status, v) = api(
        r,
        "POST",
        "/api/suspensions",
        Some(json!({"domain": "One.Test.", "reason": "their MX is migrating"})),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["suspension"]["name"], "one.test");
    assert_eq!(v["new"], true);
    // Suspending again keeps the first suspension.
    let (status, v) = api(
        r,
        "POST",
        "/api/suspensions",
        Some(json!({"domain": "one.test"})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["new"], false);
    assert_eq!(v["suspension"]["reason"], "their MX is migrating");

    // Accepted as usual, and held; another domain still goes out.
    let held = queue_id(
        &r.submit(
            "billing@acme.test",
            &["bob@one.test"],
            &message("bob@one.test"),
        )
        .await,
    );
    let _ = queue_id(
        &r.submit(
            "billing@acme.test",
            &["carol@two.test"],
            &message("carol@two.test"),
        )
        .await,
    );
    let got = tokio::task::block_in_place(|| w.sink.wait_for_messages(1, WAIT));
    assert_eq!(got[0].rcpts, vec!["carol@two.test".to_string()]);
    assert_held(&w, &held).await;

    let (status, v) = api(r, "GET", "/api/suspensions", None).await;
    assert_eq!(status, 200);
    assert_eq!(v["domains"][0]["name"], "one.test", "{v}");
    assert_eq!(v["tenants"].as_array().unwrap().len(), 0, "{v}");
    assert_eq!(gauge(&metrics(r).await, "herald_suspended_domains"), 1);

    // Resume: delivered at once, not after the hold's re-check interval.
    let started = Instant::now();
    let (status, v) = api(r, "DELETE", "/api/suspensions/domain/one.test", None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["messages"], 1, "{v}");
    let got = tokio::task::block_in_place(|| w.sink.wait_for_messages(2, WAIT));
    assert_eq!(got[1].rcpts, vec!["bob@one.test".to_string()]);
    assert!(started.elapsed() < Duration::from_secs(15));
    let ev = r
        .wait_events("bob delivered", 1, WAIT, |e| {
            field(e, "event") == "delivered" && field(e, "queue_id") == held
        })
        .await;
    assert_eq!(ev[0]["attempt"], 1, "the suspension counted no attempt");
    assert_eq!(gauge(&metrics(r).await, "herald_suspended_domains"), 0);

    let (status, v) = api(r, "DELETE", "/api/suspensions/domain/one.test", None).await;
    assert_eq!(status, 404, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspension_requests_are_checked() {
    let w = world("").await;
    let r = &w.relay;
    for (body, want) in [
        (json!({"domain": "not a domain"}), 400),
        (json!({"domain": "bob@one.test"}), 400),
        (json!({"tenant": "nobody"}), 404),
        (json!({}), 400),
        (json!({"domain": "one.test", "tenant": "acme"}), 400),
        (json!({"domain": "one.test", "color": "red"}), 400),
    ] {
        let (status, v) = api(r, "POST", "/api/suspensions", Some(body.clone())).await;
        assert_eq!(status, want, "{body} → {v}");
        assert!(!field(&v, "error").is_empty(), "{v}");
    }
    let (status, v) = api(r, "DELETE", "/api/suspensions/host/one.test", None).await;
    assert_eq!(status, 404, "{v}");
    let (status, _) = api(r, "GET", "/api/tenants/nobody", None).await;
    assert_eq!(status, 404);
    let (status, v) = api(r, "POST", "/api/tenants/acme/resume", None).await;
    assert_eq!(status, 409, "not paused: {v}");
    // The token is required like everywhere under /api.
    let resp = request(r.admin, "GET", "/api/suspensions", None, None).await;
    assert_eq!(resp.status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_tenant_survives_a_restart_and_resumes_by_cli() {
    let mut w = world("").await;
    let cfg = w.relay.cli_config();
    let (ok, out, err) = herald(
        &cfg,
        &["suspend", "tenant", "acme", "--reason", "billing dispute"],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("tenant acme: delivery suspended"), "{out}");

    let id = queue_id(
        &w.relay
            .submit(
                "billing@acme.test",
                &["bob@one.test"],
                &message("bob@one.test"),
            )
            .await,
    );
    assert_held(&w, &id).await;

    w.relay.restart().await;
    let cfg = w.relay.cli_config();
    let (ok, out, err) = herald(&cfg, &["suspensions"]).await;
    assert!(ok, "{err}");
    let row = out
        .lines()
        .find(|l| l.starts_with("tenant"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        row.contains("acme")
            && row.contains("delivery suspended")
            && row.contains("billing dispute"),
        "{out}"
    );
    let (ok, out, _) = herald(&cfg, &["suspensions", "--json"]).await;
    assert!(ok);
    let v: Value = serde_json::from_str(&out).expect("--json prints JSON");
    assert_eq!(v["tenants"][0]["name"], "acme");
    // Recovered from the spool, and still held.
    assert_held(&w, &id).await;

    let (ok, out, err) = herald(&cfg, &["resume", "tenant", "acme"]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("tenant acme: delivery resumed") && out.contains("1 queued message(s)"),
        "{out}"
    );
    let got = tokio::task::block_in_place(|| w.sink.wait_for_messages(1, WAIT));
    assert_eq!(got[0].rcpts, vec!["bob@one.test".to_string()]);
    let (ok, _, err) = herald(&cfg, &["resume", "tenant", "acme"]).await;
    assert!(!ok);
    assert!(
        err.contains("herald resume: 404") && err.contains("not suspended"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_reputation_pauses_submissions_until_a_postmaster_resumes() {
    let mut w = world("[reputation]\nwindow = 10\nmin_volume = 3\nreply = \"reject\"\n").await;

    // One message, three unknown recipients: three hard bounces.
    let id = queue_id(
        &w.relay
            .submit(
                "billing@acme.test",
                &["nobody1@one.test", "nobody2@one.test", "nobody3@one.test"],
                &message("nobody1@one.test"),
            )
            .await,
    );
    w.relay
        .wait_events("3 hard bounces", 3, WAIT, |e| {
            field(e, "event") == "bounced" && field(e, "queue_id") == id
        })
        .await;
    let start = w
        .relay
        .wait_events("the pause announced", 1, WAIT, |e| {
            field(e, "event") == "rejected" && field(e, "rule") == "tenant_paused"
        })
        .await;
    assert_eq!(field(&start[0], "tenant"), "acme");
    assert!(
        field(&start[0], "reason").contains("hard-bounce rate 100%"),
        "{}",
        start[0]
    );

    // The next MAIL FROM is refused, saying why and since when.
    let mut c = w.relay.client().await;
    let reply = c.cmd("MAIL FROM:<billing@acme.test>").await;
    assert_eq!(reply.code, 550, "{:?}", reply.text());
    assert_eq!(reply.enhanced(), Some("5.7.1"));
    let text = reply.text();
    for part in [
        "\"acme\" is paused",
        "since 20",
        "hard-bounce rate 100% (3 of the last 3 recipients)",
        "postmaster@relay.test",
    ] {
        assert!(text.contains(part), "{part:?} not in {text:?}");
    }
    let _ = c.cmd("QUIT").await;
    let refused = w
        .relay
        .wait_events("the MAIL refusal", 1, WAIT, |e| {
            field(e, "rule") == "tenant_paused" && !field(e, "client_ip").is_empty()
        })
        .await;
    assert_eq!(field(&refused[0], "sender"), "billing@acme.test");
    assert_eq!(refused[0]["smtp"]["code"], 550);
    assert!(
        field(&refused[0], "reason").starts_with("paused: "),
        "{}",
        refused[0]
    );

    let (status, v) = api(&w.relay, "GET", "/api/tenants/acme", None).await;
    assert_eq!(status, 200);
    assert_eq!(v["paused"]["rates"]["hard_bounces"], 3, "{v}");
    assert_eq!(v["reputation"]["min_volume"], 3, "{v}");
    assert_eq!(gauge(&metrics(&w.relay).await, "herald_paused_tenants"), 1);

    // The pause is durable.
    w.relay.restart().await;
    let mut c = w.relay.client().await;
    assert_eq!(c.cmd("MAIL FROM:<billing@acme.test>").await.code, 550);
    let _ = c.cmd("QUIT").await;

    let cfg = w.relay.cli_config();
    let (ok, out, err) = herald(&cfg, &["tenant", "show", "acme"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("Submissions:  PAUSED since"), "{out}");
    assert!(out.contains("herald tenant resume acme"), "{out}");
    let (ok, out, err) = herald(&cfg, &["tenant", "resume", "acme"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("tenant acme: submissions resumed"), "{out}");

    let reply = w
        .relay
        .submit(
            "billing@acme.test",
            &["bob@one.test"],
            &message("bob@one.test"),
        )
        .await;
    reply.assert_code(250);
    let got = tokio::task::block_in_place(|| w.sink.wait_for_messages(1, WAIT));
    assert_eq!(got[0].rcpts, vec!["bob@one.test".to_string()]);
    let (_, v) = api(&w.relay, "GET", "/api/tenants/acme", None).await;
    assert!(v["paused"].is_null(), "{v}");
    let (ok, _, err) = herald(&cfg, &["tenant", "resume", "acme"]).await;
    assert!(!ok && err.contains("is not paused"), "{err}");
}
