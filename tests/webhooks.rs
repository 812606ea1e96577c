//! Webhooks end to end: an app submits over SMTP, herald delivers to an MX
//! sink, and every event of the tenant is POSTed to an HTTP receiver running
//! in the test on loopback — signed, retried, and kept across a restart.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use common::dns::{TestDns, Zone};
use common::mx::{MxSink, SinkReply, ip, reserve_port};
use common::relay::{PASSWORD, Setup, TestRelay, field, queue_id};
use common::smtp::TestClient;
use common::within;
use serde_json::Value;
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(20);
const SECRET: &str = "whsec-test-secret";

/// One request the receiver got, and what it answered.
#[derive(Clone, Debug)]
struct Hit {
    headers: HeaderMap,
    body: Bytes,
    status: u16,
}

#[derive(Default)]
struct HookState {
    hits: Mutex<Vec<Hit>>,
    /// Requests still to be answered 500.
    fail_next: AtomicUsize,
    count: Option<watch::Sender<usize>>,
}

/// A webhook receiver on 127.0.0.1 that records requests, can answer 500,
/// and can be taken down and brought up again on the same port.
struct Receiver {
    addr: SocketAddr,
    state: Arc<HookState>,
    count: watch::Receiver<usize>,
    task: Option<tokio::task::JoinHandle<()>>,
}

async fn record(State(s): State<Arc<HookState>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let fail = s
        .fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let status = if fail {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    };
    let n = {
        let mut hits = s.hits.lock().unwrap();
        hits.push(Hit {
            headers,
            body,
            status: status.as_u16(),
        });
        hits.len()
    };
    if let Some(c) = &s.count {
        c.send_replace(n);
    }
    status
}

impl Receiver {
    async fn start() -> Receiver {
        let (tx, count) = watch::channel(0);
        let state = Arc::new(HookState {
            count: Some(tx),
            ..HookState::default()
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut r = Receiver {
            addr,
            state,
            count,
            task: None,
        };
        r.serve(listener);
        r
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(record))
            .with_state(self.state.clone());
        self.task = Some(tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        }));
    }

    /// Stops listening: connections to the port are refused.
    async fn down(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    async fn up(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .expect("rebind the receiver's port");
        self.serve(listener);
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn hits(&self) -> Vec<Hit> {
        self.state.hits.lock().unwrap().clone()
    }

    /// Waits until every id in `ids` was answered 200.
    async fn wait_delivered(&self, ids: &BTreeSet<String>) -> BTreeMap<String, Hit> {
        let mut count = self.count.clone();
        within(WAIT, "webhooks for every event", async {
            loop {
                let got = self.delivered();
                if ids.iter().all(|id| got.contains_key(id)) {
                    return got;
                }
                count.changed().await.expect("receiver alive");
            }
        })
        .await
    }

    /// The 2xx-answered requests by event id.
    fn delivered(&self) -> BTreeMap<String, Hit> {
        self.hits()
            .into_iter()
            .filter(|h| h.status == 200)
            .map(|h| (header(&h, "x-herald-event-id").to_string(), h))
            .collect()
    }
}

fn header<'a>(h: &'a Hit, name: &str) -> &'a str {
    h.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex signature"))
        .collect()
}

/// Checks both signatures the way a receiver would.
fn assert_signed(h: &Hit) {
    use aws_lc_rs::hmac;
    let key = hmac::Key::new(hmac::HMAC_SHA256, SECRET.as_bytes());
    assert_eq!(header(h, "content-type"), "application/json");
    let sig = header(h, "x-herald-signature");
    assert_eq!(sig.len(), 64, "hex SHA-256: {sig}");
    hmac::verify(&key, &h.body, &unhex(sig)).expect("X-Herald-Signature verifies");
    let ts = header(h, "x-herald-timestamp");
    let ts_n: u64 = ts.parse().expect("Unix seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(ts_n <= now && now - ts_n < 600, "fresh timestamp {ts}");
    let mut signed = format!("{ts}.").into_bytes();
    signed.extend_from_slice(&h.body);
    hmac::verify(&key, &signed, &unhex(header(h, "x-herald-signature-v2")))
        .expect("X-Herald-Signature-V2 verifies");
    let wrong = hmac::Key::new(hmac::HMAC_SHA256, b"another secret");
    assert!(hmac::verify(&wrong, &h.body, &unhex(sig)).is_err());
}

/// The raw lines of the events log, by event id, for `tenant`.
fn logged(relay: &TestRelay, tenant: &str) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(relay.events_path()).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let v: Value = serde_json::from_str(l).ok()?;
            (field(&v, "tenant") == tenant)
                .then(|| (field(&v, "event_id").to_string(), l.to_string()))
        })
        .collect()
}

/// Every webhook body is byte for byte its line in the events log.
fn assert_bodies_match_log(relay: &TestRelay, got: &BTreeMap<String, Hit>) {
    let log = logged(relay, "acme");
    for (id, line) in &log {
        let hit = got
            .get(id)
            .unwrap_or_else(|| panic!("no webhook for {line}"));
        assert_eq!(
            std::str::from_utf8(&hit.body).unwrap(),
            line,
            "body of {id}"
        );
        assert_signed(hit);
    }
}

fn invoice(n: u32) -> Vec<u8> {
    format!(
        "From: Acme Billing <billing@acme.test>\r\n\
         To: <bob@one.test>\r\n\
         Subject: Invoice {n}\r\n\
         Message-ID: <invoice-{n}@acme.test>\r\n\
         \r\n\
         Invoice {n}.\r\n"
    )
    .into_bytes()
}

struct World {
    _dns: TestDns,
    sink: MxSink,
    relay: TestRelay,
}

/// DNS, one MX sink accepting everything for one.test, and a relay whose
/// tenant `acme` posts to `hook` (when given) with short backoffs.
async fn world(hook: Option<&Receiver>, extra: &str) -> World {
    let dns = TestDns::start(
        Zone::new("test.")
            .mx("one.test", 10, "mx.one.test")
            .a("mx.one.test", ip(2)),
    )
    .await;
    let (port, mut listeners) = reserve_port(&[ip(2)]);
    let sink = MxSink::start_on(listeners.pop().unwrap(), |_: &str, _| SinkReply::Accept).unwrap();
    let mut setup = Setup::new(dns.addr, port);
    if let Some(h) = hook {
        setup.tenant_extra = format!(
            "webhook_url = \"{}\"\nwebhook_secret = \"{SECRET}\"",
            h.url()
        );
    }
    setup.extra = format!(
        "[webhooks]\nbackoff_min = \"50ms\"\nbackoff_max = \"200ms\"\ntimeout = \"2s\"\nretry_for = \"1h\"\n{extra}"
    );
    let relay = TestRelay::start(setup).await;
    World {
        _dns: dns,
        sink,
        relay,
    }
}

/// Event ids of `acme` in the log once `n` delivered events are there.
async fn wait_logged(relay: &TestRelay, n: usize) -> BTreeSet<String> {
    relay
        .wait_events("delivered", n, WAIT, |e| field(e, "event") == "delivered")
        .await;
    logged(relay, "acme").into_keys().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_message_produces_signed_webhooks_equal_to_the_log() {
    let hook = Receiver::start().await;
    let w = world(Some(&hook), "").await;
    let id = queue_id(
        &w.relay
            .submit("billing@acme.test", &["bob@one.test"], &invoice(1))
            .await,
    );
    w.sink.wait_for_messages(1, WAIT);
    let ids = wait_logged(&w.relay, 1).await;
    assert_eq!(ids.len(), 2, "received + delivered: {ids:?}");
    let got = hook.wait_delivered(&ids).await;
    assert_bodies_match_log(&w.relay, &got);
    let kinds: BTreeSet<String> = got
        .values()
        .map(|h| {
            let v: Value = serde_json::from_slice(&h.body).unwrap();
            assert_eq!(field(&v, "queue_id"), id);
            assert_eq!(field(&v, "tenant"), "acme");
            field(&v, "event").to_string()
        })
        .collect();
    assert_eq!(
        kinds,
        BTreeSet::from(["delivered".into(), "received".into()])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_answering_500_gets_the_event_again() {
    let hook = Receiver::start().await;
    hook.state.fail_next.store(1, Ordering::SeqCst);
    let w = world(Some(&hook), "").await;
    queue_id(
        &w.relay
            .submit("billing@acme.test", &["bob@one.test"], &invoice(2))
            .await,
    );
    let ids = wait_logged(&w.relay, 1).await;
    let got = hook.wait_delivered(&ids).await;
    assert_bodies_match_log(&w.relay, &got);
    let hits = hook.hits();
    let failed: Vec<&Hit> = hits.iter().filter(|h| h.status == 500).collect();
    assert_eq!(failed.len(), 1);
    let retried = header(failed[0], "x-herald-event-id");
    assert!(got.contains_key(retried), "the refused event arrived later");
    assert_eq!(got[retried].body, failed[0].body, "same body on retry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_down_across_a_restart_loses_nothing() {
    let mut hook = Receiver::start().await;
    hook.down().await;
    let mut w = world(Some(&hook), "").await;
    for n in 0..3 {
        queue_id(
            &w.relay
                .submit("billing@acme.test", &["bob@one.test"], &invoice(10 + n))
                .await,
        );
    }
    let before = wait_logged(&w.relay, 3).await;
    assert_eq!(before.len(), 6, "3 received + 3 delivered");
    assert!(hook.hits().is_empty());
    w.relay.restart().await;
    // Pending events are on disk in the outbox.
    let outbox = std::fs::read_to_string(w.relay.dir.path().join("spool/webhooks.jsonl")).unwrap();
    for id in &before {
        assert!(outbox.contains(id.as_str()), "{id} kept across the restart");
    }
    hook.up().await;
    let ids: BTreeSet<String> = logged(&w.relay, "acme").into_keys().collect();
    assert!(ids.is_superset(&before));
    let got = hook.wait_delivered(&ids).await;
    assert_bodies_match_log(&w.relay, &got);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_without_webhook_url_gets_none() {
    let hook = Receiver::start().await;
    // acme has no webhook; beta posts to the receiver.
    let beta = format!(
        "[[tenant]]\nname = \"beta\"\nusername = \"beta\"\npassword_hash = \"{}\"\nallowed_senders = [\"*@beta.test\"]\nwebhook_url = \"{}\"\nwebhook_secret = \"{SECRET}\"\n",
        common::relay::PASSWORD_HASH,
        hook.url()
    );
    let w = world(None, &beta).await;
    queue_id(
        &w.relay
            .submit("billing@acme.test", &["bob@one.test"], &invoice(20))
            .await,
    );
    wait_logged(&w.relay, 1).await;

    let mut c = TestClient::connect(w.relay.submission).await;
    c.ehlo("app.test").await.assert_code(250);
    c.starttls().await.assert_code(220);
    c.ehlo("app.test").await.assert_code(250);
    c.auth_plain("beta", PASSWORD).await.assert_code(235);
    let body = b"From: <billing@beta.test>\r\nTo: <bob@one.test>\r\nSubject: x\r\n\r\nx\r\n";
    queue_id(
        &c.send_mail("billing@beta.test", &["bob@one.test"], body)
            .await,
    );
    let _ = c.cmd("QUIT").await;
    w.relay
        .wait_events("2 delivered", 2, WAIT, |e| field(e, "event") == "delivered")
        .await;
    let beta_ids: BTreeSet<String> = logged(&w.relay, "beta").into_keys().collect();
    assert_eq!(beta_ids.len(), 2);
    let got = hook.wait_delivered(&beta_ids).await;
    assert!(
        got.values().all(|h| {
            let v: Value = serde_json::from_slice(&h.body).unwrap();
            field(&v, "tenant") == "beta"
        }),
        "only beta's events are posted"
    );
    // acme's events never entered the outbox.
    let outbox = std::fs::read_to_string(w.relay.dir.path().join("spool/webhooks.jsonl")).unwrap();
    for id in logged(&w.relay, "acme").keys() {
        assert!(!outbox.contains(id.as_str()));
    }
}
