//! Late bounces and complaints end to end: herald sends with VERP return
//! paths, then reports come back over SMTP to the bounce listener
//! (`[bounces] listener`) and become `bounced` / `complained` events for the
//! right queue id and recipient, suppression entries, and message status.
//! Also idempotent submission by Message-ID.

mod common;

use std::time::Duration;

use common::dns::TestDns;
use common::http::api;
use common::mx::MxSink;
use common::relay::{OneTest, TestRelay, field, herald, one_test, queue_id};
use common::reports::Dsn;
use common::smtp::TestClient;

const WAIT: Duration = Duration::from_secs(20);

struct World {
    _dns: TestDns,
    mx: MxSink,
    relay: TestRelay,
}

async fn world() -> World {
    let OneTest { dns, mx, relay } = one_test(|setup| {
        setup.extra = "[bounces]\n\
            return_path_domain = \"bounces.relay.test\"\n\
            verp_secret = \"bounce-test-secret-0123456789\"\n\
            listener = \"127.0.0.1:0\"\n"
            .to_string();
    })
    .await;
    World {
        _dns: dns,
        mx,
        relay,
    }
}

impl World {
    /// The bounce listener: the last SMTP listener.
    async fn bounce_client(&self) -> TestClient {
        let addr = *self.relay.running().smtp_addrs.last().unwrap();
        let mut c = TestClient::connect(addr).await;
        c.greeting.assert_code(220);
        c.ehlo("mx.one.test").await.assert_code(250);
        c
    }

    /// Sends an invoice to `to` and waits for its delivery; returns the
    /// queue id and the VERP return path it went out with.
    async fn deliver(&self, to: &str, message_id: &str) -> (String, String) {
        let before = self.mx.messages().len();
        let reply = self
            .relay
            .submit("billing@acme.test", &[to], &invoice(to, message_id))
            .await;
        let id = queue_id(&reply);
        let got = tokio::task::block_in_place(|| self.mx.wait_for_messages(before + 1, WAIT));
        let m = got.iter().find(|m| m.rcpts == [to]).expect("delivered");
        (id, m.from.clone())
    }
}

fn invoice(to: &str, message_id: &str) -> Vec<u8> {
    format!(
        "From: Acme Billing <billing@acme.test>\r\n\
         To: <{to}>\r\n\
         Subject: Invoice 42\r\n\
         Message-ID: {message_id}\r\n\
         \r\n\
         Dear customer, please find invoice 42.\r\n"
    )
    .into_bytes()
}

/// A Postfix-style RFC 3464 report saying `to` does not exist.
fn dsn(return_path: &str, to: &str, message_id: &str) -> Vec<u8> {
    let diagnostic = format!("550 5.1.1 <{to}>: Recipient address rejected: User unknown");
    Dsn {
        return_path,
        to,
        action: "failed",
        status: "5.1.1",
        diagnostic: Some(&diagnostic),
        message_id: Some(message_id),
    }
    .bytes()
}

/// An ARF report (RFC 5965) about a message to `to`.
fn arf(return_path: &str, to: &str, message_id: &str) -> Vec<u8> {
    format!(
        "From: feedback@fbl.one.test\r\n\
         To: postmaster@bounces.relay.test\r\n\
         Subject: Abuse report\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=feedback-report; boundary=\"F1\"\r\n\
         \r\n\
         --F1\r\n\
         Content-Type: text/plain\r\n\
         \r\n\
         This is an email abuse report.\r\n\
         \r\n\
         --F1\r\n\
         Content-Type: message/feedback-report\r\n\
         \r\n\
         Feedback-Type: abuse\r\n\
         User-Agent: OneTestFBL/1.0\r\n\
         Version: 1\r\n\
         Original-Mail-From: <{return_path}>\r\n\
         Original-Rcpt-To: <{to}>\r\n\
         Source-IP: 127.0.0.1\r\n\
         \r\n\
         --F1\r\n\
         Content-Type: message/rfc822\r\n\
         \r\n\
         Return-Path: <{return_path}>\r\n\
         From: billing@acme.test\r\n\
         To: {to}\r\n\
         Message-ID: {message_id}\r\n\
         Subject: Invoice 42\r\n\
         \r\n\
         Dear customer.\r\n\
         \r\n\
         --F1--\r\n"
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_dsn_bounces_the_right_recipient_and_suppresses_it() {
    common::within(Duration::from_secs(60), "late DSN", async {
        let w = world().await;
        let (id, return_path) = w.deliver("gone@one.test", "<inv-1@acme.test>").await;
        assert!(return_path.starts_with("bounces+"), "{return_path}");
        w.relay
            .wait_events("delivered", 1, WAIT, |e| field(e, "event") == "delivered")
            .await;

        let mut c = w.bounce_client().await;
        c.cmd("MAIL FROM:<>").await.assert_code(250);
        c.cmd(&format!("RCPT TO:<{return_path}>"))
            .await
            .assert_code(250);
        let r = c
            .data(&dsn(&return_path, "gone@one.test", "<inv-1@acme.test>"))
            .await;
        r.assert_code(250);
        let _ = c.cmd("QUIT").await;

        let bounced = w
            .relay
            .wait_events("late bounce", 1, WAIT, |e| field(e, "event") == "bounced")
            .await;
        let e = &bounced[0];
        assert_eq!(field(e, "queue_id"), id);
        assert_eq!(field(e, "recipient"), "gone@one.test");
        assert_eq!(field(e, "tenant"), "acme");
        assert_eq!(field(e, "sender"), "billing@acme.test");
        assert_eq!(field(e, "classification"), "invalid_recipient");
        assert_eq!(field(e, "reason"), "user_unknown");
        assert_eq!(e["permanent"], true);
        assert_eq!(e["smtp"]["code"], 550);
        assert_eq!(e["smtp"]["enhanced"], "5.1.1");

        // The hard bounce put the address on the tenant's list: refused at
        // RCPT from now on.
        let mut c = w.relay.client().await;
        c.cmd("MAIL FROM:<billing@acme.test>")
            .await
            .assert_code(250);
        let r = c.cmd("RCPT TO:<gone@one.test>").await;
        r.assert_code(550);
        assert_eq!(r.enhanced(), Some("5.1.1"));

        // The finished message's status is still there.
        let (status, v) = api(&w.relay, "GET", &format!("/api/messages/{id}"), None).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["finished"], true);
        assert_eq!(v["recipients"][0]["address"], "gone@one.test");
        assert_eq!(v["recipients"][0]["status"], "delivered");
        let (status, v) = api(
            &w.relay,
            "GET",
            "/api/messages?message_id=%3Cinv-1@acme.test%3E&tenant=acme",
            None,
        )
        .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["id"], id);
        // The same from the command line.
        let cfg = w.relay.cli_config();
        let (ok, out, err) = herald(
            &cfg,
            &[
                "queue",
                "status",
                "--message-id",
                "<inv-1@acme.test>",
                "--tenant",
                "acme",
            ],
        )
        .await;
        assert!(ok, "{err}");
        assert!(out.contains(&id) && out.contains("gone@one.test"), "{out}");
        let (ok, out, err) = herald(&cfg, &["queue", "status", &id, "--json"]).await;
        assert!(ok, "{err}");
        assert!(out.contains("\"finished\": true"), "{out}");
    })
    .await;
}

/// The text wins over a Status: that names another cause, and a blocked
/// IP says nothing about the address: reported, never suppressed. A
/// report without a reply code keeps `"code": null`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_blocklist_bounce_is_reported_and_suppresses_nothing() {
    common::within(Duration::from_secs(60), "late blocklist DSN", async {
        let w = world().await;
        let mut paths = Vec::new();
        for (to, mid) in [
            ("listed@one.test", "<inv-b1@acme.test>"),
            ("nocode@one.test", "<inv-b2@acme.test>"),
        ] {
            let (_, return_path) = w.deliver(to, mid).await;
            paths.push((to, mid, return_path));
        }
        w.relay
            .wait_events("delivered", 2, WAIT, |e| field(e, "event") == "delivered")
            .await;
        let reports = [
            Dsn {
                return_path: &paths[0].2,
                to: paths[0].0,
                action: "failed",
                status: "5.1.1",
                diagnostic: Some(
                    "550 5.7.1 Service unavailable; client [192.0.2.1] blocked using zen.spamhaus.org",
                ),
                message_id: Some(paths[0].1),
            }
            .bytes(),
            Dsn {
                return_path: &paths[1].2,
                to: paths[1].0,
                action: "failed",
                status: "5.2.2",
                diagnostic: None,
                message_id: Some(paths[1].1),
            }
            .bytes(),
        ];
        for ((_, _, return_path), report) in paths.iter().zip(&reports) {
            let mut c = w.bounce_client().await;
            c.cmd("MAIL FROM:<>").await.assert_code(250);
            c.cmd(&format!("RCPT TO:<{return_path}>"))
                .await
                .assert_code(250);
            c.data(report).await.assert_code(250);
            let _ = c.cmd("QUIT").await;
        }
        let bounced = w
            .relay
            .wait_events("late bounces", 2, WAIT, |e| {
                field(e, "event") == "bounced" && field(e, "tenant") == "acme"
            })
            .await;
        let of = |to: &str| {
            bounced
                .iter()
                .find(|e| field(e, "recipient") == to)
                .unwrap_or_else(|| panic!("no bounce for {to}: {bounced:?}"))
        };
        let listed = of("listed@one.test");
        assert_eq!(field(listed, "reason"), "blocked", "{listed}");
        assert_eq!(field(listed, "classification"), "spam_block", "{listed}");
        assert_eq!(listed["smtp"]["enhanced"], "5.7.1", "{listed}");
        let nocode = of("nocode@one.test");
        assert_eq!(field(nocode, "reason"), "mailbox_full", "{nocode}");
        assert!(nocode["smtp"]["code"].is_null(), "{nocode}");

        // Neither address went on the suppression list.
        let mut c = w.relay.client().await;
        c.cmd("MAIL FROM:<billing@acme.test>")
            .await
            .assert_code(250);
        for to in ["listed@one.test", "nocode@one.test"] {
            c.cmd(&format!("RCPT TO:<{to}>")).await.assert_code(250);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_arf_report_to_postmaster_is_a_complaint_about_the_right_message() {
    common::within(Duration::from_secs(60), "ARF", async {
        let w = world().await;
        let (id, return_path) = w.deliver("reader@one.test", "<inv-2@acme.test>").await;

        let mut c = w.bounce_client().await;
        c.cmd("MAIL FROM:<feedback@fbl.one.test>")
            .await
            .assert_code(250);
        c.cmd("RCPT TO:<postmaster@bounces.relay.test>")
            .await
            .assert_code(250);
        // RFC 5321 §4.1.1.3: the bare <postmaster> too, in any case.
        c.cmd("RCPT TO:<PostMaster>").await.assert_code(250);
        c.data(&arf(&return_path, "reader@one.test", "<inv-2@acme.test>"))
            .await
            .assert_code(250);

        let complained = w
            .relay
            .wait_events("complaint", 1, WAIT, |e| field(e, "event") == "complained")
            .await;
        let e = &complained[0];
        assert_eq!(field(e, "queue_id"), id);
        assert_eq!(field(e, "recipient"), "reader@one.test");
        assert_eq!(field(e, "tenant"), "acme");
        assert!(field(e, "reason").contains("abuse"), "{e}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bounce_listener_relays_nothing_and_refuses_forged_tokens() {
    common::within(Duration::from_secs(60), "bounce listener refusals", async {
        let w = world().await;
        let (_, return_path) = w.deliver("someone@one.test", "<inv-3@acme.test>").await;
        let mut c = w.bounce_client().await;
        c.cmd("MAIL FROM:<>").await.assert_code(250);
        for rcpt in [
            "someone@one.test".to_string(),
            "nobody@bounces.relay.test".to_string(),
            // A valid token with one character changed.
            {
                let (local, domain) = return_path.rsplit_once('@').unwrap();
                let mut l = local.to_string();
                let last = l.pop().unwrap();
                l.push(if last == 'a' { 'b' } else { 'a' });
                format!("{l}@{domain}")
            },
        ] {
            let r = c.cmd(&format!("RCPT TO:<{rcpt}>")).await;
            r.assert_code(550);
            assert_eq!(r.enhanced(), Some("5.1.1"), "{rcpt}");
        }
        // An auto-reply to a real VERP address is taken and dropped.
        c.cmd(&format!("RCPT TO:<{return_path}>")).await.assert_code(250);
        c.data(
            b"From: someone@one.test\r\nSubject: Out of office\r\nAuto-Submitted: auto-replied\r\n\r\nI am away.\r\n",
        )
        .await
        .assert_code(250);
        let _ = c.cmd("QUIT").await;
        let events = w.relay.events();
        assert!(
            !events
                .iter()
                .any(|e| matches!(field(e, "event"), "bounced" | "complained")),
            "{events:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_message_id_is_accepted_once_and_delivered_once() {
    common::within(Duration::from_secs(60), "idempotent submission", async {
        let w = world().await;
        let body = invoice("payer@one.test", "<inv-4@acme.test>");
        let first = queue_id(
            &w.relay
                .submit("billing@acme.test", &["payer@one.test"], &body)
                .await,
        );
        let again = w
            .relay
            .submit("billing@acme.test", &["payer@one.test"], &body)
            .await;
        assert_eq!(queue_id(&again), first, "{again:?}");
        assert!(again.text().contains("duplicate Message-ID"), "{again:?}");

        let received = w
            .relay
            .wait_events("two received events", 2, WAIT, |e| {
                field(e, "event") == "received"
            })
            .await;
        assert_eq!(received[1]["duplicate"], true);
        assert_eq!(field(&received[1], "queue_id"), first);
        w.relay
            .wait_events("delivered", 1, WAIT, |e| field(e, "event") == "delivered")
            .await;
        tokio::task::block_in_place(|| w.mx.assert_no_message_within(Duration::from_millis(500)));
        assert_eq!(w.mx.messages().len(), 1, "delivered once");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_or_unknown_reports_count_at_most_once() {
    common::within(Duration::from_secs(60), "report deduplication", async {
        let w = world().await;
        let (id, return_path) = w.deliver("reader@one.test", "<inv-5@acme.test>").await;
        let report = arf(&return_path, "reader@one.test", "<inv-5@acme.test>");
        // A token for a message herald never sent (valid MAC: the secret
        // is the test's), naming an address of the report's choosing.
        let verp = herald::verp::Verp::new("bounces.relay.test", b"bounce-test-secret-0123456789");
        let stranger = verp.address(herald::queue::QueueId(42), 0);
        let forged = dsn(&stranger, "victim@one.test", "<other@acme.test>");
        let mut c = w.bounce_client().await;
        for (rcpt, body) in [
            (&return_path, &report),
            (&return_path, &report),
            (&return_path, &report),
            (&stranger, &forged),
        ] {
            c.cmd("MAIL FROM:<>").await.assert_code(250);
            c.cmd(&format!("RCPT TO:<{rcpt}>")).await.assert_code(250);
            c.data(body).await.assert_code(250);
        }
        let _ = c.cmd("QUIT").await;
        // A later bounce of another message shows the reports before it
        // were all processed.
        let (other, other_rp) = w.deliver("gone@one.test", "<inv-6@acme.test>").await;
        let mut c = w.bounce_client().await;
        c.cmd("MAIL FROM:<>").await.assert_code(250);
        c.cmd(&format!("RCPT TO:<{other_rp}>"))
            .await
            .assert_code(250);
        c.data(&dsn(&other_rp, "gone@one.test", "<inv-6@acme.test>"))
            .await
            .assert_code(250);
        w.relay
            .wait_events("the last bounce", 1, WAIT, |e| {
                field(e, "event") == "bounced" && field(e, "queue_id") == other
            })
            .await;
        let events = w.relay.events();
        let complaints: Vec<_> = events
            .iter()
            .filter(|e| field(e, "event") == "complained")
            .collect();
        assert_eq!(complaints.len(), 1, "{complaints:?}");
        assert_eq!(field(complaints[0], "queue_id"), id);
        assert!(
            !events
                .iter()
                .any(|e| field(e, "recipient") == "victim@one.test"),
            "a report about an unknown message names nobody: {events:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_message_id_to_other_recipients_is_not_a_duplicate() {
    common::within(Duration::from_secs(60), "split submission", async {
        let w = world().await;
        // A client told "452 too many recipients" sends the rest of the
        // recipients in a second transaction, with the same Message-ID.
        let first = w
            .relay
            .submit(
                "billing@acme.test",
                &["a@one.test"],
                &invoice("a@one.test", "<inv-7@acme.test>"),
            )
            .await;
        let second = w
            .relay
            .submit(
                "billing@acme.test",
                &["b@one.test"],
                &invoice("b@one.test", "<inv-7@acme.test>"),
            )
            .await;
        assert_ne!(queue_id(&first), queue_id(&second));
        let got = tokio::task::block_in_place(|| w.mx.wait_for_messages(2, WAIT));
        assert_eq!(got.len(), 2);
    })
    .await;
}

/// `herald bounce parse` reads a report as the listener does and says why
/// an address would (or would not) be suppressed; the config's rules
/// apply, and a missing config file means the built-in rules.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounce_parse_explains_what_herald_reads() {
    common::within(Duration::from_secs(60), "bounce parse", async {
        let dir = tempfile::tempdir().unwrap();
        let report = dir.path().join("report.eml");
        std::fs::write(
            &report,
            dsn("bounces+x@relay.test", "gone@one.test", "<inv-9@acme.test>"),
        )
        .unwrap();
        let report = report.to_str().unwrap();
        let no_config = dir.path().join("absent.toml");
        let (ok, out, err) = herald(&no_config, &["bounce", "parse", report, "--json"]).await;
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["kind"], "bounce");
        assert_eq!(v["format"], "rfc3464");
        let r = &v["recipients"][0];
        assert_eq!(r["address"], "gone@one.test");
        assert_eq!(r["status"], "5.1.1");
        assert_eq!(r["code"], 550);
        assert_eq!(r["reason"], "user_unknown");
        assert_eq!(r["would_suppress"], true);

        let (ok, out, err) = herald(&no_config, &["bounce", "parse", report]).await;
        assert!(ok, "{err}");
        assert!(
            out.contains("reason: user_unknown (the mailbox does not exist)"),
            "{out}"
        );
        assert!(out.contains("would suppress: yes"), "{out}");

        // A config rule that calls this text something else is obeyed.
        let config = dir.path().join("herald.toml");
        std::fs::write(
            &config,
            "[[listener]]\naddress = \"127.0.0.1:2587\"\n\
             [[classification.rules]]\nmatch = \"user unknown\"\nreason = \"mailbox_disabled\"\n",
        )
        .unwrap();
        let (ok, out, err) = herald(&config, &["bounce", "parse", report]).await;
        assert!(ok, "{err}");
        assert!(out.contains("reason: mailbox_disabled"), "{out}");
        assert!(out.contains("would suppress: no"), "{out}");

        // Not a report: said so, nothing recorded.
        let reply = dir.path().join("reply.eml");
        std::fs::write(
            &reply,
            "From: Bob <bob@one.test>\r\nSubject: Re: Invoice 9\r\n\r\nThanks, paid.\r\n",
        )
        .unwrap();
        let (ok, out, _) = herald(&no_config, &["bounce", "parse", reply.to_str().unwrap()]).await;
        assert!(ok);
        assert!(out.starts_with("not a bounce or complaint"), "{out}");

        // A file that cannot be read: a clear error, exit code 2.
        let (ok, _, err) = herald(&no_config, &["bounce", "parse", "/nonexistent/x.eml"]).await;
        assert!(!ok);
        assert!(err.contains("cannot read /nonexistent/x.eml"), "{err}");
    })
    .await;
}
