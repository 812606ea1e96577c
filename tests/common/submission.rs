//! A scripted submission server on 127.0.0.1 — what a customer's SMTP
//! provider looks like to herald used as a smarthost — and a test CA whose
//! certificates it presents.
//!
//! ```ignore
//! let pki = Pki::new();
//! let server = SubmissionServer::start(Script {
//!     tls: TlsMode::Starttls(pki.acceptor(&["smtp.provider.test"])),
//!     ..Script::default()
//! }).await;
//! // ... herald relays through it ...
//! let got = server.wait_messages(1, Duration::from_secs(20)).await;
//! ```
//!
//! It speaks EHLO, STARTTLS, AUTH PLAIN (with or without an initial
//! response) and LOGIN, MAIL, RCPT, DATA, RSET, NOOP and QUIT, answers
//! pipelined commands in order, and records every command line, every
//! login attempt and every message. AUTH is offered only after TLS unless
//! the script says otherwise; MAIL before a successful AUTH gets 530.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// Bound on one scripted session.
const SESSION_LIMIT: Duration = Duration::from_secs(30);

/// How the server secures its sessions.
#[derive(Clone)]
pub enum TlsMode {
    /// Offers STARTTLS (port 587 style).
    Starttls(TlsAcceptor),
    /// TLS from the first byte (port 465 style).
    Implicit(TlsAcceptor),
    /// No TLS at all; AUTH is then offered in plaintext (a badly set up
    /// provider, or a downgrade by someone on the path).
    None,
}

#[derive(Clone)]
pub struct Script {
    pub tls: TlsMode,
    pub user: &'static str,
    pub password: &'static str,
    /// The reply to wrong credentials.
    pub auth_refused: &'static str,
    /// The reply to MAIL FROM once logged in.
    pub mail: &'static str,
    /// Takes mail without AUTH, as an MX does.
    pub open_relay: bool,
    /// Offers REQUIRETLS (RFC 8689) once TLS is up.
    pub requiretls: bool,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            tls: TlsMode::None,
            user: "billing@acme.test",
            password: "provider-pa55word",
            auth_refused: "535 5.7.8 Authentication credentials invalid",
            mail: "250 2.1.0 Sender OK",
            open_relay: false,
            requiretls: false,
        }
    }
}

/// A message the server accepted.
#[derive(Clone, Debug)]
pub struct Received {
    /// The account logged in when it was sent.
    pub user: String,
    pub from: String,
    /// The whole MAIL FROM command, parameters included.
    pub mail_command: String,
    pub rcpts: Vec<String>,
    /// Dot-unstuffed, without the final `.CRLF`.
    pub data: Vec<u8>,
    /// It came over TLS.
    pub tls: bool,
}

/// A login attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Login {
    pub user: String,
    pub password: String,
    pub tls: bool,
}

#[derive(Default)]
pub struct Record {
    /// Every command line, in order (AUTH lines included).
    pub lines: Vec<String>,
    pub logins: Vec<Login>,
    pub messages: Vec<Received>,
    pub connections: usize,
}

pub struct SubmissionServer {
    pub addr: SocketAddr,
    record: Arc<Mutex<Record>>,
}

impl SubmissionServer {
    pub async fn start(script: Script) -> SubmissionServer {
        Self::start_at("127.0.0.1:0".parse().unwrap(), script).await
    }

    /// Listens on `addr` (127.0.0.x, a given or any port).
    pub async fn start_at(addr: SocketAddr, script: Script) -> SubmissionServer {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let record: Arc<Mutex<Record>> = Arc::default();
        let rec = record.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                rec.lock().unwrap().connections += 1;
                let (script, rec) = (script.clone(), rec.clone());
                tokio::spawn(tokio::time::timeout(SESSION_LIMIT, async move {
                    match &script.tls {
                        TlsMode::Implicit(acceptor) => {
                            if let Ok(tls) = acceptor.accept(tcp).await {
                                session(tls, &script, &rec, true).await;
                            }
                        }
                        TlsMode::Starttls(acceptor) => {
                            if let Some(tcp) = session(tcp, &script, &rec, false).await
                                && let Ok(tls) = acceptor.accept(tcp).await
                            {
                                session(tls, &script, &rec, true).await;
                            }
                        }
                        TlsMode::None => {
                            session(tcp, &script, &rec, false).await;
                        }
                    }
                }));
            }
        });
        SubmissionServer { addr, record }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn lines(&self) -> Vec<String> {
        self.record.lock().unwrap().lines.clone()
    }

    pub fn logins(&self) -> Vec<Login> {
        self.record.lock().unwrap().logins.clone()
    }

    pub fn messages(&self) -> Vec<Received> {
        self.record.lock().unwrap().messages.clone()
    }

    pub fn connections(&self) -> usize {
        self.record.lock().unwrap().connections
    }

    /// Waits until `n` messages arrived; panics with the command log after
    /// `timeout`.
    pub async fn wait_messages(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.messages();
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {n} message(s); commands seen: {:?}",
                self.lines()
            );
            // Sessions run in other tasks: look again shortly.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn ehlo_reply(keywords: &[&str]) -> String {
    let mut lines = vec!["smtp.provider.test Hello"];
    lines.extend_from_slice(keywords);
    let n = lines.len();
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| format!("250{}{l}\r\n", if i + 1 == n { ' ' } else { '-' }))
        .collect()
}

/// `<addr>` of `MAIL FROM:<addr> ...` / `RCPT TO:<addr> ...`.
fn path_of(line: &str) -> String {
    match (line.find('<'), line.find('>')) {
        (Some(a), Some(b)) if a < b => line[a + 1..b].to_string(),
        _ => String::new(),
    }
}

fn decode_plain(token: &str) -> Option<(String, String)> {
    let raw = BASE64.decode(token.trim()).ok()?;
    let mut parts = raw.split(|b| *b == 0);
    let _authzid = parts.next()?;
    let user = String::from_utf8(parts.next()?.to_vec()).ok()?;
    let pass = String::from_utf8(parts.next()?.to_vec()).ok()?;
    Some((user, pass))
}

fn decode(token: &str) -> String {
    BASE64
        .decode(token.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .unwrap_or_default()
}

/// Serves one session (or its part before STARTTLS, returning the stream
/// after the 220).
async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    script: &Script,
    rec: &Mutex<Record>,
    tls: bool,
) -> Option<S> {
    let mut r = BufReader::new(io);
    let starttls = matches!(script.tls, TlsMode::Starttls(_));
    if !(starttls && tls) {
        r.get_mut()
            .write_all(b"220 smtp.provider.test ESMTP ready\r\n")
            .await
            .ok()?;
    }
    let read = async |r: &mut BufReader<S>| -> Option<String> {
        let mut line = String::new();
        if r.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        let line = line.trim_end().to_string();
        rec.lock().unwrap().lines.push(line.clone());
        Some(line)
    };
    let mut user: Option<String> = None;
    let mut from: Option<String> = None;
    let mut mail_command = String::new();
    let mut rcpts: Vec<String> = Vec::new();
    loop {
        let cmd = read(&mut r).await?;
        let upper = cmd.to_ascii_uppercase();
        let out = if upper.starts_with("EHLO") {
            let mut kw = vec![
                "PIPELINING",
                "ENHANCEDSTATUSCODES",
                "8BITMIME",
                "SIZE 10000000",
            ];
            if starttls && !tls {
                kw.push("STARTTLS");
            }
            if tls || !starttls {
                kw.push("AUTH PLAIN LOGIN");
            }
            if tls && script.requiretls {
                kw.push("REQUIRETLS");
            }
            ehlo_reply(&kw)
        } else if upper == "STARTTLS" && starttls && !tls {
            r.get_mut()
                .write_all(b"220 2.0.0 Ready to start TLS\r\n")
                .await
                .ok()?;
            return Some(r.into_inner());
        } else if upper.starts_with("AUTH PLAIN") || upper == "AUTH LOGIN" {
            let (u, p) = if upper == "AUTH LOGIN" {
                r.get_mut().write_all(b"334 VXNlcm5hbWU6\r\n").await.ok()?;
                let u = decode(&read(&mut r).await?);
                r.get_mut().write_all(b"334 UGFzc3dvcmQ6\r\n").await.ok()?;
                let p = decode(&read(&mut r).await?);
                (u, p)
            } else {
                let token = match cmd.split_ascii_whitespace().nth(2) {
                    Some(t) => t.to_string(),
                    None => {
                        r.get_mut().write_all(b"334 \r\n").await.ok()?;
                        read(&mut r).await?
                    }
                };
                decode_plain(&token).unwrap_or_default()
            };
            let ok = u == script.user && p == script.password;
            rec.lock().unwrap().logins.push(Login {
                user: u.clone(),
                password: p,
                tls,
            });
            if ok {
                user = Some(u);
                "235 2.7.0 Authentication successful\r\n".to_string()
            } else {
                format!("{}\r\n", script.auth_refused)
            }
        } else if upper.starts_with("MAIL FROM:") {
            if user.is_none() && !script.open_relay {
                "530 5.7.0 Authentication required\r\n".to_string()
            } else {
                if script.mail.starts_with('2') {
                    from = Some(path_of(&cmd));
                    mail_command = cmd.clone();
                    rcpts.clear();
                }
                format!("{}\r\n", script.mail)
            }
        } else if upper.starts_with("RCPT TO:") {
            if from.is_none() {
                "503 5.5.1 MAIL first\r\n".to_string()
            } else {
                rcpts.push(path_of(&cmd));
                "250 2.1.5 Recipient OK\r\n".to_string()
            }
        } else if upper == "DATA" {
            if from.is_none() || rcpts.is_empty() {
                "503 5.5.1 No valid recipients\r\n".to_string()
            } else {
                r.get_mut()
                    .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    .await
                    .ok()?;
                let mut data = Vec::new();
                loop {
                    let mut line = Vec::new();
                    if r.read_until(b'\n', &mut line).await.ok()? == 0 {
                        return None;
                    }
                    if line == b".\r\n" {
                        break;
                    }
                    let line = line.strip_prefix(b".").unwrap_or(&line);
                    data.extend_from_slice(line);
                }
                rec.lock().unwrap().messages.push(Received {
                    user: user.clone().unwrap_or_default(),
                    from: from.take().unwrap_or_default(),
                    mail_command: std::mem::take(&mut mail_command),
                    rcpts: std::mem::take(&mut rcpts),
                    data,
                    tls,
                });
                "250 2.0.0 Ok: queued\r\n".to_string()
            }
        } else if upper == "RSET" {
            from = None;
            rcpts.clear();
            "250 2.0.0 OK\r\n".to_string()
        } else if upper == "NOOP" {
            "250 2.0.0 OK\r\n".to_string()
        } else if upper == "QUIT" {
            r.get_mut().write_all(b"221 2.0.0 Bye\r\n").await.ok()?;
            return None;
        } else {
            "502 5.5.1 Unrecognized command\r\n".to_string()
        };
        r.get_mut().write_all(out.as_bytes()).await.ok()?;
    }
}
