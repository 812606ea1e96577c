//! Config reload on a running relay (what SIGHUP does): a changed tenant
//! password and a renewed certificate apply to new connections, a session
//! open across the reload finishes with the config it started with, a file
//! that does not validate changes nothing and names each problem, and what
//! needs a restart is reported as such.

mod common;

use std::time::Duration;

use argon2::password_hash::{PasswordHasher, SaltString};
use common::dns::{TestDns, Zone};
use common::relay::{PASSWORD, PASSWORD_HASH, Setup, TestRelay, USER};
use common::smtp::TestClient;

const LIMIT: Duration = Duration::from_secs(30);
const NEW_PASSWORD: &str = "n3w-s3cret";

fn hash(password: &str) -> String {
    let params = argon2::Params::new(1024, 1, 1, None).unwrap();
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::encode_b64(b"reload-test-salt").unwrap();
    argon
        .hash_password(password.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

/// A STARTTLS session up to EHLO over TLS; its certificate.
async fn tls_session(relay: &TestRelay) -> (TestClient, Vec<u8>) {
    let mut c = TestClient::connect(relay.submission).await;
    c.ehlo("app.test").await.assert_code(250);
    c.starttls().await.assert_code(220);
    c.ehlo("app.test").await.assert_code(250);
    let cert = c.peer_certificates().expect("TLS")[0].to_vec();
    (c, cert)
}

fn pem_der(path: &std::path::Path) -> Vec<u8> {
    let pem = std::fs::read(path).unwrap();
    let mut reader = &pem[..];
    let first = rustls_pemfile::certs(&mut reader).next().unwrap().unwrap();
    first.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_to_new_connections_and_spares_open_ones() {
    common::within(LIMIT, "reload", async {
        // carol's domain has a mail server (that never answers: mail waits).
        let dns = TestDns::start(
            Zone::new("test.")
                .mx("one.test", 10, "mx.one.test")
                .a("mx.one.test", common::mx::ip(201)),
        )
        .await;
        let relay = TestRelay::start(Setup::new(dns.addr, 25)).await;
        let dir = relay.config_path().parent().unwrap().to_path_buf();
        let (mut open, old_cert) = tls_session(&relay).await;
        open.auth_plain(USER, PASSWORD).await.assert_code(235);
        open.cmd("MAIL FROM:<billing@acme.test>")
            .await
            .assert_code(250);

        // A new password and a renewed certificate, as an operator (or an
        // ACME client) would write them.
        let (crt, key) = (dir.join("renewed.crt"), dir.join("renewed.key"));
        herald::tls::generate_self_signed(&crt, &key, "renewed.relay.test").unwrap();
        let text = relay
            .config_text
            .replace(PASSWORD_HASH, &hash(NEW_PASSWORD))
            .replace("relay.crt", "renewed.crt")
            .replace("relay.key", "renewed.key");
        std::fs::write(relay.config_path(), &text).unwrap();
        let pending = relay.running().reload(&relay.config_path()).unwrap();
        assert!(pending.is_empty(), "{pending:?}");

        // The session open across the reload finishes its message.
        open.cmd("RCPT TO:<carol@one.test>").await.assert_code(250);
        open.data(b"From: billing@acme.test\r\nTo: carol@one.test\r\nSubject: across\r\n\r\nstill here\r\n")
            .await
            .assert_code(250);

        let (mut c, cert) = tls_session(&relay).await;
        assert_ne!(cert, old_cert, "new sessions see the renewed certificate");
        assert_eq!(cert, pem_der(&crt));
        c.auth_plain(USER, PASSWORD).await.assert_code(535);
        let (mut c, _) = tls_session(&relay).await;
        c.auth_plain(USER, NEW_PASSWORD).await.assert_code(235);

        // A broken file: refused whole, each problem named, nothing changed.
        let broken = text
            .replace("shutdown_grace = \"5s\"", "shutdown_grace = \"soon\"")
            .replace("[[tenant]]", "[[tenant]]\ncolour = \"blue\"");
        std::fs::write(relay.config_path(), &broken).unwrap();
        let errs = relay
            .running()
            .reload(&relay.config_path())
            .unwrap_err()
            .to_string();
        assert!(errs.contains("server.shutdown_grace"), "{errs}");
        let (mut c, cert) = tls_session(&relay).await;
        assert_eq!(cert, pem_der(&crt));
        c.auth_plain(USER, NEW_PASSWORD).await.assert_code(235);

        // What only a restart applies is said so.
        // A changed secret is seen although Debug hides it; the admin API
        // keeps its token until a restart.
        let retokened = text.replace(common::relay::ADMIN_TOKEN, "another-admin-token-0123456789");
        std::fs::write(relay.config_path(), &retokened).unwrap();
        let pending = relay.running().reload(&relay.config_path()).unwrap();
        assert_eq!(
            pending,
            vec!["admin changed: takes effect after restart".to_string()]
        );

        // Through the admin API, as `herald reload` asks.
        let later = text.replace("connect_timeout = \"2s\"", "connect_timeout = \"7s\"");
        std::fs::write(relay.config_path(), &later).unwrap();
        let (status, body) = common::http::api(&relay, "POST", "/api/reload", None).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["reloaded"], true, "{body}");
        assert_eq!(
            body["pending_restart"],
            serde_json::json!(["delivery changed: takes effect after restart"])
        );
        std::fs::write(relay.config_path(), &broken).unwrap();
        let (status, body) = common::http::api(&relay, "POST", "/api/reload", None).await;
        assert_eq!(status, 422, "{body}");
        assert_eq!(body["reloaded"], false, "{body}");
        let problems = body["problems"].as_array().expect("problems");
        assert!(
            problems
                .iter()
                .any(|p| p.as_str().unwrap_or_default().starts_with("server.shutdown_grace")),
            "{body}"
        );
    })
    .await;
}
