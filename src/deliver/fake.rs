//! Test only: a scripted SMTP server on loopback with enough ESMTP to
//! check what the client puts on the wire, PIPELINING and STARTTLS
//! included. (The shared MX sink in tests/common has neither.)

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

#[derive(Clone)]
pub struct Script {
    /// Raw greeting bytes, sent in two writes (first 3 bytes, rest)
    /// to check replies split over reads.
    pub greeting: &'static [u8],
    /// EHLO keywords after the host name; `None` refuses EHLO with 500.
    pub ehlo: Option<&'static str>,
    pub mail: fn(&str) -> &'static str,
    pub rcpt: fn(&str) -> &'static str,
    pub data: &'static str,
    /// Serves STARTTLS (or implicit TLS) with this.
    pub tls: Option<TlsAcceptor>,
    /// TLS from the first byte (port 465 style); needs `tls`.
    pub implicit_tls: bool,
    /// Answers STARTTLS with 220, then sends junk instead of a handshake.
    pub broken_tls: bool,
    /// Sends a second reply right behind the 220 to STARTTLS, in the same
    /// write, as a man in the middle injecting plaintext would.
    pub inject_after_starttls: bool,
    /// Drops the connection without a word after this many messages, as a
    /// server whose idle timer ran out does.
    pub close_after: Option<usize>,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            greeting: b"220 fake.test ESMTP\r\n",
            ehlo: Some("PIPELINING\nSIZE 1000000\n8BITMIME\nDSN"),
            mail: |_| "250 2.1.0 Ok",
            rcpt: |_| "250 2.1.5 Ok",
            data: "250 2.0.0 Ok: queued as 1",
            tls: None,
            implicit_tls: false,
            broken_tls: false,
            inject_after_starttls: false,
            close_after: None,
        }
    }
}

#[derive(Default)]
pub struct Record {
    /// Every command line, without CRLF.
    pub lines: Vec<String>,
    /// Each message as it came over the wire (still dot-stuffed),
    /// without the final ".CRLF".
    pub messages: Vec<Vec<u8>>,
    /// For each MAIL FROM: whether the rest of the group had arrived
    /// with it (i.e. it was pipelined).
    pub pipelined: Vec<bool>,
    /// Connections accepted.
    pub connections: usize,
}

pub async fn start(script: Script) -> (SocketAddr, Arc<Mutex<Record>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let rec = Arc::new(Mutex::new(Record::default()));
    let rec2 = rec.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            rec2.lock().unwrap().connections += 1;
            let (script, rec) = (script.clone(), rec2.clone());
            tokio::spawn(async move {
                if script.implicit_tls {
                    if let Some(acceptor) = &script.tls
                        && let Ok(tls) = acceptor.accept(tcp).await
                    {
                        session(tls, &script, &rec, true, true).await;
                    }
                } else if let Some(tcp) = session(tcp, &script, &rec, false, true).await
                    && let Some(acceptor) = &script.tls
                    && let Ok(tls) = acceptor.accept(tcp).await
                {
                    session(tls, &script, &rec, true, false).await;
                }
            });
        }
    });
    (addr, rec)
}

fn reply(text: &str) -> Vec<u8> {
    let mut out = text.replace('\n', "\r\n").into_bytes();
    out.extend_from_slice(b"\r\n");
    out
}

/// Serves until QUIT or EOF; returns the stream on STARTTLS.
async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    script: &Script,
    rec: &Mutex<Record>,
    tls: bool,
    greet: bool,
) -> Option<S> {
    let mut r = BufReader::new(io);
    if greet {
        let (a, b) = script.greeting.split_at(3.min(script.greeting.len()));
        r.get_mut().write_all(a).await.ok()?;
        r.get_mut().flush().await.ok()?;
        tokio::time::sleep(Duration::from_millis(20)).await;
        r.get_mut().write_all(b).await.ok()?;
    }
    let mut accepted = 0;
    let mut delivered = 0;
    loop {
        let mut line = Vec::new();
        if r.read_until(b'\n', &mut line).await.ok()? == 0 {
            return None;
        }
        let cmd = String::from_utf8_lossy(&line).trim_end().to_string();
        rec.lock().unwrap().lines.push(cmd.clone());
        let upper = cmd.to_ascii_uppercase();
        let arg = |prefix: &str| {
            cmd.get(prefix.len()..)
                .unwrap_or("")
                .trim_start_matches('<')
                .split('>')
                .next()
                .unwrap_or("")
                .to_string()
        };
        let out = if upper.starts_with("EHLO") {
            match script.ehlo {
                Some("") => reply("250 fake.test"),
                Some(kw) => {
                    let mut lines: Vec<&str> = vec!["fake.test"];
                    lines.extend(kw.split('\n'));
                    let n = lines.len();
                    let mut out = Vec::new();
                    for (i, l) in lines.iter().enumerate() {
                        let sep = if i + 1 == n { ' ' } else { '-' };
                        out.extend_from_slice(format!("250{sep}{l}\r\n").as_bytes());
                    }
                    out
                }
                None => reply("500 5.5.1 What?"),
            }
        } else if upper.starts_with("HELO") {
            reply("250 fake.test")
        } else if upper.starts_with("MAIL FROM:") {
            accepted = 0;
            let pipelined = !r.buffer().is_empty();
            rec.lock().unwrap().pipelined.push(pipelined);
            reply((script.mail)(&arg("MAIL FROM:")))
        } else if upper.starts_with("RCPT TO:") {
            let text = (script.rcpt)(&arg("RCPT TO:"));
            if text.starts_with('2') {
                accepted += 1;
            }
            reply(text)
        } else if upper == "DATA" {
            if accepted == 0 {
                reply("554 5.5.1 No valid recipients")
            } else {
                r.get_mut().write_all(b"354 Go ahead\r\n").await.ok()?;
                let mut msg = Vec::new();
                loop {
                    let mut l = Vec::new();
                    if r.read_until(b'\n', &mut l).await.ok()? == 0 {
                        return None;
                    }
                    if l == b".\r\n" {
                        break;
                    }
                    msg.extend_from_slice(&l);
                }
                rec.lock().unwrap().messages.push(msg);
                delivered += 1;
                if script.close_after == Some(delivered) {
                    r.get_mut().write_all(&reply(script.data)).await.ok()?;
                    r.get_mut().flush().await.ok()?;
                    return None;
                }
                reply(script.data)
            }
        } else if upper == "RSET" {
            accepted = 0;
            reply("250 2.0.0 Ok")
        } else if upper == "QUIT" {
            r.get_mut().write_all(b"221 2.0.0 Bye\r\n").await.ok()?;
            return None;
        } else if upper == "STARTTLS" && script.inject_after_starttls {
            r.get_mut()
                .write_all(b"220 2.0.0 Go\r\n250 injected\r\n")
                .await
                .ok()?;
            return None;
        } else if upper == "STARTTLS" && script.broken_tls {
            r.get_mut().write_all(b"220 2.0.0 Go\r\n").await.ok()?;
            tokio::time::sleep(Duration::from_millis(50)).await;
            r.get_mut().write_all(b"this is not TLS\r\n").await.ok()?;
            return None;
        } else if upper == "STARTTLS" && !tls && script.tls.is_some() {
            r.get_mut().write_all(b"220 2.0.0 Go\r\n").await.ok()?;
            return Some(r.into_inner());
        } else if upper == "AUTH LOGIN" {
            let mut got = Vec::new();
            for challenge in [&b"334 VXNlcm5hbWU6\r\n"[..], b"334 UGFzc3dvcmQ6\r\n"] {
                r.get_mut().write_all(challenge).await.ok()?;
                let mut l = Vec::new();
                r.read_until(b'\n', &mut l).await.ok()?;
                got.push(String::from_utf8_lossy(&l).trim_end().to_string());
            }
            if got == [BASE64.encode("user"), BASE64.encode("secret")] {
                reply("235 2.7.0 Ok")
            } else {
                reply("535 5.7.8 Bad credentials")
            }
        } else if upper.starts_with("AUTH PLAIN ") {
            let want = BASE64.encode(b"\0user\0secret");
            if cmd.get(11..) == Some(want.as_str()) && tls {
                reply("235 2.7.0 Ok")
            } else {
                reply("535 5.7.8 Bad credentials")
            }
        } else {
            reply("502 5.5.2 Not implemented")
        };
        r.get_mut().write_all(&out).await.ok()?;
    }
}

pub fn tls_acceptor() -> TlsAcceptor {
    let ck = rcgen::generate_simple_self_signed(vec!["fake.test".to_string()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![ck.cert.der().clone()], key)
    .unwrap();
    TlsAcceptor::from(Arc::new(config))
}
