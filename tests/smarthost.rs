//! Smarthost routing end to end: an app submits to herald, herald relays
//! through a scripted provider on 127.0.0.1 (STARTTLS or implicit TLS with
//! a certificate from a test CA given as `ca_file`, AUTH required) instead
//! of the recipients' MX hosts; and each way that can fail — wrong
//! password, untrusted certificate, no STARTTLS — defers with the cause
//! named, never bounces, never sends the password in clear and never
//! writes it to the events log or the log output.

mod common;

use std::io::Write as _;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use common::dns::{TestDns, Zone};
use common::mx::{MxSink, SinkReply, ip, reserve_port};
use common::pki::Pki;
use common::relay::{Setup, TestRelay, field, queue_id};
use common::submission::{Login, Script, SubmissionServer, TlsMode};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);
const LIMIT: Duration = Duration::from_secs(60);
const HOST: &str = "smtp.provider.test";
const ACCOUNT: &str = "billing@acme.test";
/// What herald is configured with (and the provider expects, unless a
/// test says otherwise). Distinctive, so that a grep cannot miss it.
const PASSWORD: &str = "Pr0vider-S3cret-7f41c";

// ---- log capture -----------------------------------------------------------------------------

/// Everything herald logs in this test binary, at debug level.
fn logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(|| LogWriter)
            .try_init();
        Mutex::new(Vec::new())
    })
}

struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        logs().lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn assert_secret_kept(relay: &TestRelay, secret: &str) {
    let events = std::fs::read_to_string(relay.events_path()).unwrap_or_default();
    assert!(!events.is_empty(), "the events log was written");
    assert!(
        !events.contains(secret),
        "password in the events log:\n{events}"
    );
    let logged = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
    assert!(!logged.is_empty(), "log output was captured");
    assert!(!logged.contains(secret), "password in the log output");
}

// ---- set-up ----------------------------------------------------------------------------------

/// How herald's `[[smarthost]]` is written.
struct Route {
    tls: &'static str,
    password: &'static str,
    ca_file: Option<std::path::PathBuf>,
    /// Route by the tenant's `smarthost` key (else by sender domain).
    by_tenant: bool,
}

impl Route {
    /// The usual route: the tenant's, STARTTLS verified against the test
    /// CA, the right password.
    fn starttls(pki: &Pki) -> Route {
        Route {
            tls: "starttls",
            password: PASSWORD,
            ca_file: Some(pki.ca_file.clone()),
            by_tenant: true,
        }
    }
}

struct World {
    _dns: TestDns,
    /// The recipients' own MX (for one.test and two.test): must stay empty.
    mx: MxSink,
    relay: TestRelay,
}

async fn world(server: &SubmissionServer, route: Route) -> World {
    // Every name lives in the test DNS: the provider's host, and the
    // recipient domains (their MX is checked at RCPT and must not be used).
    let zone = Zone::new("test.")
        .a(HOST, ip(1))
        .mx("one.test", 10, "mx.one.test")
        .mx("two.test", 10, "mx.two.test")
        .a("mx.one.test", ip(2))
        .a("mx.two.test", ip(2));
    let dns = TestDns::start(zone).await;
    let (port, mut listeners) = reserve_port(&[ip(2)]);
    let mx = MxSink::start_on(listeners.pop().unwrap(), |_, _| SinkReply::Accept).unwrap();

    let mut setup = Setup::new(dns.addr, port);
    let ca = route
        .ca_file
        .as_deref()
        .map(|p| format!("ca_file = \"{}\"\n", p.display()))
        .unwrap_or_default();
    let senders = if route.by_tenant {
        setup.tenant_extra = "smarthost = \"provider\"".into();
        String::new()
    } else {
        "sender_domains = [\"acme.test\"]\n".into()
    };
    setup.extra = format!(
        "[[smarthost]]\nname = \"provider\"\nhost = \"{HOST}\"\nport = {port}\ntls = \"{tls}\"\n\
         username = \"{ACCOUNT}\"\npassword = \"{password}\"\n{ca}{senders}\n\
         [bounces]\nreturn_path_domain = \"bounces.relay.test\"\nverp_secret = \"test-verp-secret-0123456789\"\n",
        port = server.port(),
        tls = route.tls,
        password = route.password,
    );
    let relay = TestRelay::start(setup).await;
    World {
        _dns: dns,
        mx,
        relay,
    }
}

fn invoice() -> Vec<u8> {
    b"From: Acme Billing <billing@acme.test>\r\n\
      To: a@one.test, b@two.test\r\n\
      Subject: Invoice 42\r\n\
      \r\n\
      Dear customer, please find invoice 42.\r\n"
        .to_vec()
}

const RCPTS: [&str; 2] = ["a@one.test", "b@two.test"];

fn kind(e: &Value) -> &str {
    field(e, "event")
}

fn smtp_text(e: &Value) -> &str {
    e["smtp"]["text"].as_str().unwrap_or("")
}

/// Submits the invoice and returns the deferred event of its first attempt.
async fn first_deferral(w: &World) -> Value {
    let reply = w.relay.submit(ACCOUNT, &RCPTS, &invoice()).await;
    let id = queue_id(&reply);
    let deferred = w
        .relay
        .wait_events("deferred", 1, WAIT, |e| {
            kind(e) == "deferred" && field(e, "queue_id") == id
        })
        .await;
    let events = w.relay.events();
    assert!(
        !events.iter().any(|e| kind(e) == "bounced"),
        "a smarthost problem never bounces: {events:?}"
    );
    assert!(
        w.mx.messages().is_empty(),
        "nothing goes to the MX directly"
    );
    let e = deferred[0].clone();
    assert_eq!(e["permanent"], Value::Bool(false), "{e}");
    assert_eq!(e["smtp"]["code"], 451, "{e}");
    assert_eq!(field(&e, "mx"), HOST, "{e}");
    e
}

// ---- the path where all is well ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_routed_to_a_smarthost_sends_everything_there_with_its_own_sender() {
    logs();
    common::within(LIMIT, "delivery through a STARTTLS smarthost", async {
        let pki = Pki::new();
        let server = SubmissionServer::start(Script {
            tls: TlsMode::Starttls(pki.acceptor(&[HOST])),
            user: ACCOUNT,
            password: PASSWORD,
            ..Script::default()
        })
        .await;
        let w = world(&server, Route::starttls(&pki)).await;

        let reply = w.relay.submit(ACCOUNT, &RCPTS, &invoice()).await;
        let id = queue_id(&reply);
        let delivered = w
            .relay
            .wait_events("2 delivered", 2, WAIT, |e| {
                kind(e) == "delivered" && field(e, "queue_id") == id
            })
            .await;
        for e in &delivered {
            assert_eq!(field(e, "mx"), HOST, "the smarthost is the next hop: {e}");
            assert!(field(e, "tls").starts_with("TLSv1."), "{e}");
        }

        // One transaction for both domains, the app's own sender (VERP is
        // configured, but not used through a smarthost), logged in over TLS.
        let got = server.messages();
        assert_eq!(got.len(), 1, "{got:?}");
        let m = &got[0];
        assert_eq!(m.from, ACCOUNT);
        let mut rcpts = m.rcpts.clone();
        rcpts.sort();
        assert_eq!(rcpts, RCPTS);
        assert_eq!(m.user, ACCOUNT);
        assert!(m.tls);
        assert!(String::from_utf8_lossy(&m.data).contains("Subject: Invoice 42"));
        assert_eq!(
            server.logins(),
            [Login {
                user: ACCOUNT.into(),
                password: PASSWORD.into(),
                tls: true
            }]
        );
        let lines = server.lines();
        let starttls = lines
            .iter()
            .position(|l| l == "STARTTLS")
            .expect("STARTTLS");
        let auth = lines
            .iter()
            .position(|l| l.starts_with("AUTH"))
            .expect("AUTH");
        assert!(starttls < auth, "{lines:?}");
        assert!(
            w.mx.messages().is_empty(),
            "nothing went to the MX directly"
        );
        assert_secret_kept(&w.relay, PASSWORD);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_domain_is_routed_over_implicit_tls() {
    logs();
    common::within(LIMIT, "delivery through an implicit-TLS smarthost", async {
        let pki = Pki::new();
        let server = SubmissionServer::start(Script {
            tls: TlsMode::Implicit(pki.acceptor(&[HOST])),
            user: ACCOUNT,
            password: PASSWORD,
            ..Script::default()
        })
        .await;
        let w = world(
            &server,
            Route {
                tls: "implicit",
                password: PASSWORD,
                ca_file: Some(pki.ca_file.clone()),
                by_tenant: false,
            },
        )
        .await;
        let reply = w.relay.submit(ACCOUNT, &RCPTS, &invoice()).await;
        let id = queue_id(&reply);
        w.relay
            .wait_events("2 delivered", 2, WAIT, |e| {
                kind(e) == "delivered" && field(e, "queue_id") == id && field(e, "mx") == HOST
            })
            .await;
        let got = server.messages();
        let mut rcpts: Vec<String> = got.iter().flat_map(|m| m.rcpts.clone()).collect();
        rcpts.sort();
        assert_eq!(rcpts, RCPTS);
        assert!(got.iter().all(|m| m.from == ACCOUNT && m.tls), "{got:?}");
        assert!(w.mx.messages().is_empty());
    })
    .await;
}

// ---- failures ----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_password_defers_with_the_providers_explanation() {
    logs();
    const WRONG: &str = "Wr0ng-S3cret-92be1";
    common::within(LIMIT, "AUTH refused by the smarthost", async {
        let pki = Pki::new();
        let server = SubmissionServer::start(Script {
            tls: TlsMode::Starttls(pki.acceptor(&[HOST])),
            user: ACCOUNT,
            password: PASSWORD,
            auth_refused: "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.",
            ..Script::default()
        })
        .await;
        let w = world(
            &server,
            Route {
                tls: "starttls",
                password: WRONG,
                ca_file: Some(pki.ca_file.clone()),
                by_tenant: true,
            },
        )
        .await;
        let e = first_deferral(&w).await;
        assert_eq!(field(&e, "classification"), "policy", "{e}");
        let text = smtp_text(&e);
        for want in [
            "smarthost smtp.provider.test refused AUTH (535 5.7.139 Authentication unsuccessful",
            "SMTP AUTH is switched off",
            "Authenticated SMTP",
        ] {
            assert!(text.contains(want), "missing {want:?} in {text:?}");
        }
        // It was tried (over TLS only) and refused; no message went anywhere.
        let logins = server.logins();
        assert!(!logins.is_empty() && logins.iter().all(|l| l.tls && l.password == WRONG));
        assert!(server.messages().is_empty());
        assert!(!server.lines().iter().any(|l| l.starts_with("MAIL")));
        assert_secret_kept(&w.relay, WRONG);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_defers_and_the_password_is_not_sent() {
    logs();
    common::within(LIMIT, "untrusted smarthost certificate", async {
        let pki = Pki::new();
        let server = SubmissionServer::start(Script {
            tls: TlsMode::Starttls(pki.acceptor(&[HOST])),
            ..Script::default()
        })
        .await;
        // No ca_file: the system's trust store knows nothing of the test CA.
        let w = world(
            &server,
            Route {
                tls: "starttls",
                password: PASSWORD,
                ca_file: None,
                by_tenant: true,
            },
        )
        .await;
        let e = first_deferral(&w).await;
        assert_eq!(field(&e, "classification"), "tls", "{e}");
        let text = smtp_text(&e);
        assert!(text.contains("certificate"), "{text}");
        // "unknown issuer" normally; a machine without any CA certificates
        // says that instead.
        assert!(
            text.contains("unknown issuer") || text.contains("no trusted CA certificates"),
            "{text}"
        );
        assert!(text.contains("ca_file"), "the fix names the key: {text}");
        assert!(
            server.logins().is_empty(),
            "no password to an unverified server"
        );
        assert!(server.messages().is_empty());
        assert_secret_kept(&w.relay, PASSWORD);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_smarthost_without_starttls_gets_nothing_in_plaintext() {
    logs();
    common::within(LIMIT, "smarthost without STARTTLS", async {
        let pki = Pki::new();
        // Offers AUTH in plaintext, which herald must not take up.
        let server = SubmissionServer::start(Script {
            tls: TlsMode::None,
            user: ACCOUNT,
            password: PASSWORD,
            ..Script::default()
        })
        .await;
        let w = world(&server, Route::starttls(&pki)).await;
        let e = first_deferral(&w).await;
        assert_eq!(field(&e, "classification"), "tls", "{e}");
        let text = smtp_text(&e);
        assert!(text.contains("does not offer STARTTLS"), "{text}");
        assert!(text.contains("tls = \"implicit\""), "{text}");
        assert!(server.logins().is_empty());
        let lines = server.lines();
        assert!(
            !lines
                .iter()
                .any(|l| l.starts_with("AUTH") || l.starts_with("MAIL")),
            "{lines:?}"
        );
        assert_secret_kept(&w.relay, PASSWORD);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_the_provider_refuses_bounces_with_the_reason() {
    logs();
    common::within(LIMIT, "sender refused by the smarthost", async {
        let pki = Pki::new();
        let server = SubmissionServer::start(Script {
            tls: TlsMode::Starttls(pki.acceptor(&[HOST])),
            user: ACCOUNT,
            password: PASSWORD,
            mail: "550 5.7.60 SMTP; Client does not have permissions to send as this sender",
            ..Script::default()
        })
        .await;
        let w = world(
            &server,
            Route::starttls(&pki),
        )
        .await;
        let reply = w.relay.submit(ACCOUNT, &RCPTS, &invoice()).await;
        let id = queue_id(&reply);
        // A 5xx to MAIL FROM is the provider's final word on this sender.
        let bounced = w
            .relay
            .wait_events("2 bounced", 2, WAIT, |e| {
                kind(e) == "bounced" && field(e, "queue_id") == id
            })
            .await;
        for e in &bounced {
            assert_eq!(field(e, "mx"), HOST, "{e}");
            assert_eq!(e["smtp"]["code"], 550, "{e}");
            let text = smtp_text(e);
            assert!(
                text.starts_with("smarthost smtp.provider.test refused the sender <billing@acme.test> (550 5.7.60"),
                "{text}"
            );
            assert!(text.contains("the sender must match the account"), "{text}");
        }
        assert!(server.messages().is_empty());
        assert!(w.mx.messages().is_empty());
        assert_secret_kept(&w.relay, PASSWORD);
    })
    .await;
}

// ---- config ----------------------------------------------------------------------------------

#[test]
fn check_config_names_the_key_and_never_shows_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("herald.toml");
    let mut f = std::fs::File::create(&path).unwrap();
    write!(
        f,
        "[[listener]]\naddress = \"127.0.0.1:2587\"\n\
         [[smarthost]]\nname = \"provider\"\nhost = \"smtp.provider.example\"\ntls = \"none\"\n\
         username = \"u\"\npassword = \"{PASSWORD}\"\nca_file = \"{}\"\n",
        Path::new("/nonexistent/ca.pem").display()
    )
    .unwrap();
    drop(f);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("--config")
        .arg(&path)
        .arg("check-config")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("smarthost[0].tls: \"none\" is not allowed"),
        "{text}"
    );
    assert!(text.contains("smarthost[0].ca_file: cannot read"), "{text}");
    assert!(!text.contains(PASSWORD), "{text}");
}
