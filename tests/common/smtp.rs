//! A small async SMTP test client (tokio, tokio-rustls) that drives a server at the wire
//! level. It accepts any server certificate (herald uses a self-signed one in tests), but
//! still checks the handshake signatures.
//!
//! Every read is bounded by [`READ_TIMEOUT`] and panics with a clear message on timeout or
//! on an unexpected end of the connection.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rustls::ClientConfig;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Bound on every read of a reply.
pub const READ_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on connecting and on the TLS handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest reply line accepted (RFC 5321 says 512; be lenient).
const MAX_LINE: usize = 64 * 1024;

/// One SMTP reply: `code` and the text of each line without the `250-` / `250 ` prefix.
#[derive(Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    /// The lines joined with `\n`.
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }

    /// The RFC 3463 enhanced status code at the start of the first line (`5.1.1`), if any.
    pub fn enhanced(&self) -> Option<&str> {
        let first = self.lines.first()?;
        let token = first.split(' ').next()?;
        let parts: Vec<&str> = token.split('.').collect();
        let ok = parts.len() == 3
            && matches!(parts[0], "2" | "4" | "5")
            && parts[1..]
                .iter()
                .all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()));
        ok.then_some(token)
    }

    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    pub fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }

    /// Whether an EHLO reply advertises `keyword` (case-insensitive, first word of a line
    /// after the greeting line), e.g. `has_extension("STARTTLS")`, `has_extension("AUTH")`.
    pub fn has_extension(&self, keyword: &str) -> bool {
        self.extension(keyword).is_some()
    }

    /// The parameters of an EHLO extension: for `AUTH PLAIN LOGIN`, `extension("auth")`
    /// gives `Some("PLAIN LOGIN")`; for a bare keyword `Some("")`.
    pub fn extension(&self, keyword: &str) -> Option<&str> {
        self.lines.iter().skip(1).find_map(|line| {
            let (kw, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
            kw.eq_ignore_ascii_case(keyword).then_some(rest)
        })
    }

    /// Panics with the whole reply unless its code is `code`.
    #[track_caller]
    pub fn assert_code(&self, code: u16) -> &Self {
        assert_eq!(self.code, code, "unexpected SMTP reply: {self}");
        self
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.lines.len();
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i + 1 == n { ' ' } else { '-' };
            if i > 0 {
                f.write_str("\\n")?;
            }
            write!(f, "{}{}{}", self.code, sep, line)?;
        }
        if n == 0 {
            write!(f, "{}", self.code)?;
        }
        Ok(())
    }
}

impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Reply({self})")
    }
}

enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Only during the STARTTLS upgrade.
    Gone,
}

pub struct TestClient {
    pub greeting: Reply,
    pub peer: SocketAddr,
    conn: Conn,
    /// Bytes read but not yet consumed.
    buf: Vec<u8>,
}

impl TestClient {
    /// Connects over plain TCP and reads the greeting (any code; check `greeting.code`).
    pub async fn connect(addr: SocketAddr) -> TestClient {
        let tcp = tcp_connect(addr).await;
        let mut client = TestClient {
            greeting: Reply {
                code: 0,
                lines: Vec::new(),
            },
            peer: addr,
            conn: Conn::Plain(tcp),
            buf: Vec::new(),
        };
        client.greeting = client.read_reply().await;
        client
    }

    /// Like [`TestClient::connect`], from the loopback address `source`
    /// (127.0.0.x: Linux routes all of 127/8 to loopback), as another
    /// client host would.
    pub async fn connect_from(source: std::net::Ipv4Addr, addr: SocketAddr) -> TestClient {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::from((source, 0)))
            .unwrap_or_else(|e| panic!("SMTP client: binding {source} failed: {e}"));
        let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => panic!("SMTP client: connecting to {addr} from {source} failed: {e}"),
            Err(_) => panic!("SMTP client: connecting to {addr} timed out"),
        };
        let mut client = TestClient {
            greeting: Reply {
                code: 0,
                lines: Vec::new(),
            },
            peer: addr,
            conn: Conn::Plain(tcp),
            buf: Vec::new(),
        };
        client.greeting = client.read_reply().await;
        client
    }

    /// Connects with implicit TLS (port 465 style, SNI "localhost") and reads the greeting.
    pub async fn connect_tls(addr: SocketAddr) -> TestClient {
        let tcp = tcp_connect(addr).await;
        let tls = tls_handshake(tcp, addr, insecure_client_config()).await;
        let mut client = TestClient {
            greeting: Reply {
                code: 0,
                lines: Vec::new(),
            },
            peer: addr,
            conn: Conn::Tls(Box::new(tls)),
            buf: Vec::new(),
        };
        client.greeting = client.read_reply().await;
        client
    }

    /// Sends `line` + CRLF and reads one (possibly multi-line) reply.
    pub async fn cmd(&mut self, line: &str) -> Reply {
        let mut bytes = Vec::with_capacity(line.len() + 2);
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        self.send_raw(&bytes).await;
        self.read_reply().await
    }

    /// Writes bytes as they are (no CRLF added), e.g. to pipeline commands.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        let peer = self.peer;
        let res = tokio::time::timeout(READ_TIMEOUT, async {
            match &mut self.conn {
                Conn::Plain(s) => {
                    s.write_all(bytes).await?;
                    s.flush().await
                }
                Conn::Tls(s) => {
                    s.write_all(bytes).await?;
                    s.flush().await
                }
                Conn::Gone => unreachable!("connection lost during STARTTLS"),
            }
        })
        .await;
        match res {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("SMTP client: writing to {peer} failed: {e}"),
            Err(_) => panic!("SMTP client: writing to {peer} timed out after {READ_TIMEOUT:?}"),
        }
    }

    /// Reads one reply; panics on timeout, EOF or a malformed reply.
    pub async fn read_reply(&mut self) -> Reply {
        match self.try_read_reply().await {
            Ok(Some(reply)) => reply,
            Ok(None) => panic!(
                "SMTP client: {} closed the connection while a reply was expected",
                self.peer
            ),
            Err(e) => panic!("SMTP client: reading a reply from {}: {e}", self.peer),
        }
    }

    /// Reads one reply; `Ok(None)` if the server closed the connection cleanly before
    /// sending anything. Panics on timeout.
    pub async fn try_read_reply(&mut self) -> std::io::Result<Option<Reply>> {
        let mut code = None;
        let mut lines = Vec::new();
        loop {
            let Some(line) = self.read_line().await? else {
                if code.is_none() {
                    return Ok(None);
                }
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("connection closed in the middle of a reply: {lines:?}"),
                ));
            };
            let bad = || {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("malformed reply line {line:?}"),
                )
            };
            let digits = line.get(..3).ok_or_else(bad)?;
            if !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            let this_code: u16 = digits.parse().map_err(|_| bad())?;
            if let Some(c) = code
                && c != this_code
            {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("reply code changed within a multi-line reply: {c} then {line:?}"),
                ));
            }
            code = Some(this_code);
            let (last, text) = match line.as_bytes().get(3) {
                None => (true, ""),
                Some(b' ') => (true, &line[4..]),
                Some(b'-') => (false, &line[4..]),
                Some(_) => return Err(bad()),
            };
            lines.push(text.to_string());
            if last {
                return Ok(Some(Reply {
                    code: this_code,
                    lines,
                }));
            }
        }
    }

    /// Asserts that the server closes the connection (EOF or reset) within the read
    /// timeout, without sending anything more.
    pub async fn expect_closed(&mut self) {
        match self.try_read_reply().await {
            Ok(None) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
                ) => {}
            Ok(Some(r)) => panic!("SMTP client: expected {} to close, got {r}", self.peer),
            Err(e) => panic!(
                "SMTP client: expected {} to close, got error {e}",
                self.peer
            ),
        }
    }

    /// One line without its CRLF (a bare LF also ends it); `None` on EOF with nothing
    /// buffered.
    async fn read_line(&mut self) -> std::io::Result<Option<String>> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return String::from_utf8(line).map(Some).map_err(|e| {
                    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
                });
            }
            if self.buf.len() > MAX_LINE {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("reply line longer than {MAX_LINE} bytes"),
                ));
            }
            let mut chunk = [0u8; 4096];
            let peer = self.peer;
            let read = tokio::time::timeout(READ_TIMEOUT, async {
                match &mut self.conn {
                    Conn::Plain(s) => s.read(&mut chunk).await,
                    Conn::Tls(s) => s.read(&mut chunk).await,
                    Conn::Gone => unreachable!("connection lost during STARTTLS"),
                }
            })
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "SMTP client: no reply from {peer} within {READ_TIMEOUT:?} (partial: {:?})",
                    String::from_utf8_lossy(&self.buf)
                )
            });
            let n = read?;
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed after a partial line {:?}",
                        String::from_utf8_lossy(&self.buf)
                    ),
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    pub async fn ehlo(&mut self, name: &str) -> Reply {
        self.cmd(&format!("EHLO {name}")).await
    }

    /// Sends STARTTLS; on 220 performs the TLS handshake (SNI "localhost"). Returns the
    /// STARTTLS reply; re-EHLO afterwards. Panics if the server sent anything after its 220
    /// before the handshake (that would be a STARTTLS response-injection bug).
    pub async fn starttls(&mut self) -> Reply {
        self.starttls_with(insecure_client_config()).await
    }

    /// [`TestClient::starttls`] with this client configuration (one TLS
    /// version or cipher suite, say).
    pub async fn starttls_with(&mut self, config: ClientConfig) -> Reply {
        let reply = self.cmd("STARTTLS").await;
        if reply.code != 220 {
            return reply;
        }
        assert!(
            self.buf.is_empty(),
            "server sent data after 220 to STARTTLS, before the TLS handshake: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        let tcp = match std::mem::replace(&mut self.conn, Conn::Gone) {
            Conn::Plain(tcp) => tcp,
            Conn::Tls(_) => panic!("STARTTLS on a connection that already uses TLS"),
            Conn::Gone => unreachable!(),
        };
        let tls = tls_handshake(tcp, self.peer, config).await;
        self.conn = Conn::Tls(Box::new(tls));
        reply
    }

    /// `AUTH PLAIN` with an initial response.
    pub async fn auth_plain(&mut self, user: &str, pass: &str) -> Reply {
        let token = BASE64.encode(format!("\0{user}\0{pass}"));
        self.cmd(&format!("AUTH PLAIN {token}")).await
    }

    /// `AUTH LOGIN` in three steps; returns the first reply that is not 334.
    pub async fn auth_login(&mut self, user: &str, pass: &str) -> Reply {
        let reply = self.cmd("AUTH LOGIN").await;
        if reply.code != 334 {
            return reply;
        }
        let reply = self.cmd(&BASE64.encode(user)).await;
        if reply.code != 334 {
            return reply;
        }
        self.cmd(&BASE64.encode(pass)).await
    }

    /// MAIL FROM, RCPT TO for each recipient, then [`TestClient::data`]. Returns the final
    /// reply, or the first reply that is not 2xx (the transaction is then left as it is;
    /// send RSET to reuse the connection). To go on after a refused recipient, drive
    /// MAIL/RCPT with [`TestClient::cmd`] and finish with [`TestClient::data`].
    pub async fn send_mail(&mut self, from: &str, rcpts: &[&str], body: &[u8]) -> Reply {
        let reply = self.cmd(&format!("MAIL FROM:<{from}>")).await;
        if reply.code / 100 != 2 {
            return reply;
        }
        for rcpt in rcpts {
            let reply = self.cmd(&format!("RCPT TO:<{rcpt}>")).await;
            if reply.code / 100 != 2 {
                return reply;
            }
        }
        self.data(body).await
    }

    /// DATA; on 354 sends `body` dot-stuffed and terminated, and returns the final reply
    /// (otherwise the DATA reply). If `body` ends in CRLF only `.CRLF` is appended, so the
    /// server receives `body` exactly; otherwise `CRLF.CRLF` is appended.
    pub async fn data(&mut self, body: &[u8]) -> Reply {
        let reply = self.cmd("DATA").await;
        if reply.code != 354 {
            return reply;
        }
        self.send_raw(&dot_stuff(body)).await;
        self.read_reply().await
    }

    /// The negotiated TLS version (e.g. `"TLSv1_3"`), `None` on a plain connection.
    pub fn tls_version(&self) -> Option<String> {
        match &self.conn {
            Conn::Tls(s) => s.get_ref().1.protocol_version().map(|v| format!("{v:?}")),
            _ => None,
        }
    }

    /// The certificates the server presented, `None` on a plain connection.
    pub fn peer_certificates(&self) -> Option<Vec<CertificateDer<'static>>> {
        match &self.conn {
            Conn::Tls(s) => s
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| c.iter().map(|c| c.clone().into_owned()).collect()),
            _ => None,
        }
    }
}

/// Dot-stuffs `body` (a `.` is added to every line that starts with `.`; lines end in
/// CRLF) and appends the terminating `.CRLF` (after a CRLF if `body` lacks one at its end).
pub fn dot_stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 64 + 5);
    let mut at_line_start = true;
    for (i, &b) in body.iter().enumerate() {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n' && i > 0 && body[i - 1] == b'\r';
    }
    if !(body.is_empty() || body.ends_with(b"\r\n")) {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

async fn tcp_connect(addr: SocketAddr) -> TcpStream {
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => panic!("SMTP client: connecting to {addr} failed: {e}"),
        Err(_) => panic!("SMTP client: connecting to {addr} timed out after {CONNECT_TIMEOUT:?}"),
    }
}

async fn tls_handshake(
    tcp: TcpStream,
    addr: SocketAddr,
    config: ClientConfig,
) -> TlsStream<TcpStream> {
    let connector = TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from("localhost").expect("server name");
    match tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => panic!("SMTP client: TLS handshake with {addr} failed: {e}"),
        Err(_) => panic!("SMTP client: TLS handshake with {addr} timed out"),
    }
}

/// A rustls client configuration (aws-lc-rs, TLS 1.2 and 1.3) that accepts any server
/// certificate.
pub fn insecure_client_config() -> ClientConfig {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(herald::net::AcceptAnyCert(provider)))
        .with_no_client_auth()
}
