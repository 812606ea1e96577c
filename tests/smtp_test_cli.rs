//! `herald smtp-test` against scripted SMTP servers on 127.0.0.1 that fail
//! each way a tenant's provider can: a port that drops connections, nothing
//! listening, a 554 greeting, a server that never greets, the wrong TLS
//! mode, bad certificates, no AUTH, AUTH refused with Gmail's and
//! Microsoft's texts, the sender refused; and the path where all is well.
//!
//! Certificates come from a test CA (rcgen) that the binary trusts through
//! `SSL_CERT_FILE`, as an admin would point it at a private CA. Every wait
//! is bounded; the binary runs with `--timeout 1s`.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use common::pki::{Pki, self_signed_acceptor};

const PASSWORD: &str = "s3cret-pa55word";
/// Bound on one run of the binary.
const RUN_LIMIT: Duration = Duration::from_secs(30);
/// Bound on one scripted session.
const SESSION_LIMIT: Duration = Duration::from_secs(20);

// ---- a scripted SMTP server ----------------------------------------------------------------

#[derive(Clone)]
struct Script {
    /// The greeting; `None` never greets.
    greeting: Option<&'static str>,
    /// EHLO keywords before TLS, one per line.
    ehlo: &'static str,
    /// EHLO keywords after STARTTLS.
    ehlo_tls: &'static str,
    /// Serves STARTTLS with this.
    starttls: Option<TlsAcceptor>,
    /// TLS from the first byte with this.
    implicit: Option<TlsAcceptor>,
    /// The reply once the credentials are in.
    auth: &'static str,
    mail: &'static str,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            greeting: Some("220 smtp.provider.test ESMTP ready"),
            ehlo: "PIPELINING\nSIZE 35882577\nSTARTTLS\nENHANCEDSTATUSCODES\n8BITMIME",
            ehlo_tls: "PIPELINING\nSIZE 35882577\nAUTH LOGIN PLAIN XOAUTH2\nENHANCEDSTATUSCODES\n8BITMIME",
            starttls: None,
            implicit: None,
            auth: "235 2.7.0 Accepted",
            mail: "250 2.1.0 OK",
        }
    }
}

type Lines = Arc<Mutex<Vec<String>>>;

async fn serve(script: Script) -> (SocketAddr, Lines) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let lines: Lines = Arc::default();
    let rec = lines.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (script, rec) = (script.clone(), rec.clone());
            tokio::spawn(tokio::time::timeout(SESSION_LIMIT, async move {
                if let Some(acceptor) = &script.implicit {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        session(tls, &script, &rec, true).await;
                    }
                } else if let Some(tcp) = session(tcp, &script, &rec, false).await
                    && let Some(acceptor) = &script.starttls
                    && let Ok(tls) = acceptor.accept(tcp).await
                {
                    session(tls, &script, &rec, true).await;
                }
            }));
        }
    });
    (addr, lines)
}

fn ehlo_reply(keywords: &str) -> String {
    let mut lines = vec!["smtp.provider.test Hello".to_string()];
    lines.extend(keywords.lines().map(str::to_string));
    let n = lines.len();
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| format!("250{}{l}\r\n", if i + 1 == n { ' ' } else { '-' }))
        .collect()
}

/// Serves one session; returns the stream after a 220 to STARTTLS.
async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    script: &Script,
    rec: &Mutex<Vec<String>>,
    tls: bool,
) -> Option<S> {
    let mut r = BufReader::new(io);
    if !tls || script.implicit.is_some() {
        let Some(greeting) = script.greeting else {
            // Hold the connection open without a word.
            tokio::time::sleep(SESSION_LIMIT).await;
            return None;
        };
        r.get_mut()
            .write_all(format!("{greeting}\r\n").as_bytes())
            .await
            .ok()?;
        if !greeting.starts_with("220") {
            return None;
        }
    }
    let read = async |r: &mut BufReader<S>| -> Option<String> {
        let mut line = String::new();
        if r.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        let line = line.trim_end().to_string();
        rec.lock().unwrap().push(line.clone());
        Some(line)
    };
    loop {
        let cmd = read(&mut r).await?;
        let upper = cmd.to_ascii_uppercase();
        let out = if upper.starts_with("EHLO") {
            ehlo_reply(if tls { script.ehlo_tls } else { script.ehlo })
        } else if upper == "STARTTLS" && script.starttls.is_some() && !tls {
            r.get_mut()
                .write_all(b"220 2.0.0 Ready to start TLS\r\n")
                .await
                .ok()?;
            return Some(r.into_inner());
        } else if upper.starts_with("AUTH PLAIN ") {
            format!("{}\r\n", script.auth)
        } else if upper == "AUTH LOGIN" {
            r.get_mut().write_all(b"334 VXNlcm5hbWU6\r\n").await.ok()?;
            read(&mut r).await?;
            r.get_mut().write_all(b"334 UGFzc3dvcmQ6\r\n").await.ok()?;
            read(&mut r).await?;
            format!("{}\r\n", script.auth)
        } else if upper.starts_with("MAIL FROM:") {
            format!("{}\r\n", script.mail)
        } else if upper == "QUIT" {
            r.get_mut().write_all(b"221 2.0.0 Bye\r\n").await.ok()?;
            return None;
        } else {
            "502 5.5.1 Unrecognized command\r\n".to_string()
        };
        r.get_mut().write_all(out.as_bytes()).await.ok()?;
    }
}

/// A port with nobody listening.
fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

// ---- running the binary --------------------------------------------------------------------

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `herald smtp-test ARGS --timeout 1s`, the password (if any) on
/// standard input, trusting only `ca_file`.
async fn smtp_test(args: &[&str], ca_file: Option<&std::path::Path>) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let empty_ca = dir.path().join("none.pem");
    std::fs::write(&empty_ca, "").unwrap();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.arg("smtp-test")
        .args(args)
        .args(["--timeout", "1s"])
        .env("SSL_CERT_FILE", ca_file.unwrap_or(&empty_ca))
        .env_remove("SSL_CERT_DIR")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("run herald");
    let mut stdin = child.stdin.take().unwrap();
    if args.contains(&"--password-stdin") {
        stdin
            .write_all(format!("{PASSWORD}\n").as_bytes())
            .await
            .unwrap();
    }
    drop(stdin);
    let out = tokio::time::timeout(RUN_LIMIT, child.wait_with_output())
        .await
        .expect("herald smtp-test finished in time")
        .unwrap();
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    // Shown with --nocapture.
    println!(
        "$ herald smtp-test {}\n{}{}",
        args.join(" "),
        run.stdout,
        run.stderr
    );
    assert!(
        !run.stdout.contains(PASSWORD) && !run.stderr.contains(PASSWORD),
        "the password was printed:\n{}{}",
        run.stdout,
        run.stderr
    );
    run
}

/// The report line of `step` and the cause/fix lines under it.
fn step<'a>(run: &'a Run, name: &str) -> &'a str {
    let start = run
        .stdout
        .find(&format!(" {name:<16} "))
        .unwrap_or_else(|| panic!("no {name} step in:\n{}", run.stdout));
    let line_start = run.stdout[..start].rfind('\n').map_or(0, |i| i + 1);
    let rest = &run.stdout[line_start..];
    let mut end = rest.find('\n').unwrap_or(rest.len());
    while let Some(next) = rest[end + 1..].find('\n') {
        let line = &rest[end + 1..end + 1 + next];
        if !line.starts_with(&" ".repeat(25)) {
            break;
        }
        end += 1 + next;
    }
    &rest[..end]
}

fn assert_step(run: &Run, name: &str, status: &str, fragments: &[&str]) {
    let text = step(run, name);
    assert!(
        text.trim_start().starts_with(status),
        "{name} is not {status}:\n{}\nstderr: {}",
        run.stdout,
        run.stderr
    );
    for f in fragments {
        assert!(
            text.contains(f),
            "{name} lacks {f:?}:\n{}\nstderr: {}",
            run.stdout,
            run.stderr
        );
    }
}

// ---- the tests -----------------------------------------------------------------------------

#[tokio::test]
async fn a_port_that_drops_connections_is_a_firewall() {
    // A listener whose accept queue is full: Linux drops further SYNs, so a
    // connect hangs as it does behind a firewall that drops packets.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    let mut full = false;
    for _ in 0..16 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => fillers.push(s),
            Err(_) => {
                full = true;
                break;
            }
        }
    }
    assert!(full, "could not fill the accept queue");
    let run = smtp_test(&["--server", &addr.to_string()], None).await;
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert_step(
        &run,
        "connect",
        "FAIL",
        &[
            "no answer within 1 s",
            &format!(
                "outbound connections to port {} are probably blocked by a firewall",
                addr.port()
            ),
            "try 587 or 465",
        ],
    );
    drop(fillers);
}

#[tokio::test]
async fn nothing_listening() {
    let addr = closed_port();
    let run = smtp_test(&["--server", &addr.to_string(), "--starttls"], None).await;
    assert_eq!(run.code, 1);
    assert_step(&run, "dns", "ok", &["IP address"]);
    assert_step(
        &run,
        "connect",
        "FAIL",
        &[
            "connection refused",
            "nothing listens on that port; check the port number",
        ],
    );
    assert!(run.stdout.contains("(not reached)"), "{}", run.stdout);
}

#[tokio::test]
async fn a_server_that_never_greets() {
    let (addr, _) = serve(Script {
        greeting: None,
        ..Script::default()
    })
    .await;
    let run = smtp_test(&["--server", &addr.to_string()], None).await;
    assert_eq!(run.code, 1);
    assert_step(&run, "connect", "ok", &[]);
    assert_step(
        &run,
        "banner",
        "FAIL",
        &["no banner within 1 s", "sent no greeting"],
    );
}

#[tokio::test]
async fn a_554_greeting_is_explained() {
    let (addr, _) = serve(Script {
        greeting: Some(
            "554 5.7.1 Service unavailable; client host [127.0.0.1] blocked using zen.example",
        ),
        ..Script::default()
    })
    .await;
    let run = smtp_test(&["--server", &addr.to_string(), "--starttls"], None).await;
    assert_eq!(run.code, 1);
    assert_step(
        &run,
        "banner",
        "FAIL",
        &["554 5.7.1 Service unavailable", "blocklist"],
    );
}

#[tokio::test]
async fn an_implicit_tls_port_without_tls_is_recognised() {
    let pki = Pki::new();
    let (addr, _) = serve(Script {
        implicit: Some(pki.acceptor(&["127.0.0.1"])),
        ..Script::default()
    })
    .await;
    let run = smtp_test(&["--server", &addr.to_string()], Some(&pki.ca_file)).await;
    assert_eq!(run.code, 1);
    assert_step(
        &run,
        "banner",
        "FAIL",
        &[
            "no banner within 1 s",
            "this looks like an implicit-TLS port: use --tls",
        ],
    );
}

#[tokio::test]
async fn plain_smtp_with_tls_is_recognised() {
    let (addr, _) = serve(Script::default()).await;
    let run = smtp_test(&["--server", &addr.to_string(), "--tls"], None).await;
    assert_eq!(run.code, 1);
    assert_step(
        &run,
        "tls",
        "FAIL",
        &[
            "TLS handshake failed",
            "this port speaks plain SMTP",
            "use --starttls",
        ],
    );
}

#[tokio::test]
async fn a_self_signed_certificate_on_starttls() {
    let pki = Pki::new();
    let (addr, lines) = serve(Script {
        starttls: Some(self_signed_acceptor()),
        ..Script::default()
    })
    .await;
    let run = smtp_test(
        &[
            "--server",
            &addr.to_string(),
            "--starttls",
            "--user",
            "app@acme.test",
            "--password-stdin",
        ],
        Some(&pki.ca_file),
    )
    .await;
    assert_eq!(run.code, 1);
    assert_step(&run, "ehlo", "ok", &["STARTTLS"]);
    assert_step(&run, "tls", "FAIL", &["TLSv1.3", "self-signed"]);
    // What the server offers is still shown, but no password goes to it.
    assert_step(&run, "auth-mechanisms", "ok", &["LOGIN, PLAIN, XOAUTH2"]);
    assert_step(&run, "auth", "skip", &["password was not sent"]);
    assert!(
        !lines.lock().unwrap().iter().any(|l| l.starts_with("AUTH")),
        "{:?}",
        lines.lock().unwrap()
    );
}

#[tokio::test]
async fn wrong_host_name_and_expired_certificates_are_named() {
    let pki = Pki::new();
    let (addr, _) = serve(Script {
        starttls: Some(pki.acceptor(&["mail.other.test"])),
        ..Script::default()
    })
    .await;
    let run = smtp_test(
        &["--server", &addr.to_string(), "--starttls"],
        Some(&pki.ca_file),
    )
    .await;
    assert_eq!(run.code, 1);
    assert_step(
        &run,
        "tls",
        "FAIL",
        &[
            "wrong host name",
            "not valid for 127.0.0.1",
            "mail.other.test",
        ],
    );

    let (addr, _) = serve(Script {
        implicit: Some(pki.expired_acceptor(&["127.0.0.1"])),
        ..Script::default()
    })
    .await;
    let run = smtp_test(
        &["--server", &addr.to_string(), "--tls"],
        Some(&pki.ca_file),
    )
    .await;
    assert_eq!(run.code, 1);
    assert_step(&run, "tls", "FAIL", &["expired on 2020-01-01"]);
    assert_step(&run, "banner", "ok", &["220 smtp.provider.test"]);
}

#[tokio::test]
async fn no_auth_offered() {
    let pki = Pki::new();
    let (addr, _) = serve(Script {
        starttls: Some(pki.acceptor(&["127.0.0.1"])),
        ehlo_tls: "PIPELINING\n8BITMIME",
        ..Script::default()
    })
    .await;
    let run = smtp_test(
        &[
            "--server",
            &addr.to_string(),
            "--starttls",
            "--user",
            "app@acme.test",
            "--password-stdin",
        ],
        Some(&pki.ca_file),
    )
    .await;
    assert_eq!(run.code, 1);
    assert_step(&run, "tls", "ok", &["certificate verified for 127.0.0.1"]);
    assert_step(
        &run,
        "auth-mechanisms",
        "FAIL",
        &["none offered", "the server offers no AUTH on this port"],
    );
}

async fn auth_refused_with(reply: &'static str) -> Run {
    let pki = Pki::new();
    let (addr, _) = serve(Script {
        starttls: Some(pki.acceptor(&["127.0.0.1"])),
        auth: reply,
        ..Script::default()
    })
    .await;
    smtp_test(
        &[
            "--server",
            &addr.to_string(),
            "--starttls",
            "--user",
            "app@acme.test",
            "--password-stdin",
            "--from",
            "billing@acme.test",
        ],
        Some(&pki.ca_file),
    )
    .await
}

#[tokio::test]
async fn gmail_wants_an_app_password() {
    let run = auth_refused_with(
        "534-5.7.9 Application-specific password required. For more information, go to\r\n534 5.7.9  https://support.google.com/mail/?p=InvalidSecondFactor",
    )
    .await;
    assert_eq!(run.code, 1);
    assert_step(
        &run,
        "auth",
        "FAIL",
        &[
            "534 5.7.9",
            "two-factor accounts need an app password",
            "App passwords",
        ],
    );
    assert_step(&run, "mail-from", "skip", &["not logged in"]);
    assert_step(&run, "quit", "ok", &[]);
}

#[tokio::test]
async fn microsoft_has_smtp_auth_switched_off() {
    let run = auth_refused_with(
        "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.",
    )
    .await;
    assert_eq!(run.code, 1);
    assert_step(
        &run,
        "auth",
        "FAIL",
        &[
            "535 5.7.139",
            "SMTP AUTH is switched off for this mailbox/tenant",
            "Authenticated SMTP",
        ],
    );
}

#[tokio::test]
async fn the_sender_is_refused() {
    let pki = Pki::new();
    let (addr, lines) = serve(Script {
        starttls: Some(pki.acceptor(&["127.0.0.1"])),
        mail: "553 5.7.1 <billing@acme.test>: Sender address rejected: not owned by user app@acme.test",
        ..Script::default()
    })
    .await;
    let run = smtp_test(
        &[
            "--server",
            &addr.to_string(),
            "--starttls",
            "--user",
            "app@acme.test",
            "--password-stdin",
            "--from",
            "billing@acme.test",
        ],
        Some(&pki.ca_file),
    )
    .await;
    assert_eq!(run.code, 1);
    assert_step(&run, "auth", "ok", &["logged in as app@acme.test"]);
    assert_step(
        &run,
        "mail-from",
        "FAIL",
        &[
            "553 5.7.1",
            "the sender must match the account (or an alias the provider allows)",
        ],
    );
    let lines = lines.lock().unwrap();
    assert!(
        !lines.iter().any(|l| l.starts_with("RCPT") || l == "DATA"),
        "{lines:?}"
    );
}

#[tokio::test]
async fn all_is_well_with_starttls_as_json() {
    let pki = Pki::new();
    let (addr, lines) = serve(Script {
        starttls: Some(pki.acceptor(&["127.0.0.1"])),
        ..Script::default()
    })
    .await;
    let run = smtp_test(
        &[
            "--server",
            &addr.to_string(),
            "--starttls",
            "--user",
            "app@acme.test",
            "--password-stdin",
            "--from",
            "app@acme.test",
            "--json",
        ],
        Some(&pki.ca_file),
    )
    .await;
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let report: serde_json::Value = serde_json::from_str(&run.stdout).expect("JSON report");
    assert_eq!(report["ok"], true);
    assert_eq!(report["security"], "starttls");
    let steps = report["steps"].as_array().unwrap();
    let names: Vec<&str> = steps.iter().map(|s| s["step"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "dns",
            "connect",
            "banner",
            "ehlo",
            "tls",
            "auth_mechanisms",
            "auth",
            "mail_from",
            "quit"
        ]
    );
    for s in steps {
        assert_eq!(s["status"], "ok", "{s}");
    }
    assert_eq!(
        steps[4]["detail"],
        "TLSv1.3; certificate verified for 127.0.0.1"
    );

    let lines = lines.lock().unwrap();
    let plain = BASE64.encode(format!("\0app@acme.test\0{PASSWORD}"));
    assert!(lines.contains(&format!("AUTH PLAIN {plain}")), "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("MAIL FROM:<app@acme.test>"))
    );
    assert!(
        !lines.iter().any(|l| l.starts_with("RCPT") || l == "DATA"),
        "{lines:?}"
    );
    assert_eq!(lines.last().map(String::as_str), Some("QUIT"));
}

#[tokio::test]
async fn all_is_well_with_implicit_tls() {
    let pki = Pki::new();
    let (addr, _) = serve(Script {
        implicit: Some(pki.acceptor(&["127.0.0.1"])),
        ehlo_tls: "PIPELINING\nAUTH LOGIN",
        ..Script::default()
    })
    .await;
    let run = smtp_test(
        &[
            "--server",
            &addr.to_string(),
            "--tls",
            "--user",
            "app@acme.test",
            "--password-stdin",
        ],
        Some(&pki.ca_file),
    )
    .await;
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert_step(&run, "tls", "ok", &["certificate verified"]);
    assert_step(&run, "auth", "ok", &[]);
    assert_step(&run, "mail-from", "skip", &["no --from given"]);
    assert!(
        run.stdout.contains("result: every step passed"),
        "{}",
        run.stdout
    );
}

#[tokio::test]
async fn a_password_needs_stdin_or_a_terminal() {
    let run = smtp_test(&["--server", "127.0.0.1:25", "--user", "u"], None).await;
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("--password-stdin"), "{}", run.stderr);
    let run = smtp_test(&["--server", "127.0.0.1:25", "--password", "x"], None).await;
    assert_eq!(run.code, 2, "a --password flag must not exist");
}

#[tokio::test]
async fn a_name_that_does_not_resolve() {
    // `.invalid` never exists (RFC 6761 §6.4); the resolver answers it
    // locally, without a query leaving the machine.
    let run = smtp_test(&["--server", "nosuch.invalid:587", "--starttls"], None).await;
    assert_eq!(run.code, 1);
    assert_step(
        &run,
        "dns",
        "FAIL",
        &["host name does not resolve: check spelling"],
    );
}
