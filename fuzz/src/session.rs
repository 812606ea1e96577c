//! `smtp_session`: the submission server's SMTP state machine driven by
//! arbitrary client bytes over a real loopback connection.
//!
//! One server per process, built only from herald's public API (config from
//! TOML, a spool in a temporary directory, the reporter, the resolver, the
//! receive stage) with four listeners: a trusted-network relay without TLS,
//! AUTH over plaintext on loopback, STARTTLS with AUTH required, and the
//! bounce listener for VERP addresses. Its resolver asks `dns.rs`, so
//! every RCPT gets an answer at once, and whatever it queues is marked
//! delivered (or bounced, for `bounce*@` recipients, which makes a DSN) so
//! the spool does not grow over a long run.
//!
//! Input: byte 0 picks the listener, bytes 1 and 2 are where the client's
//! bytes are cut into separate writes, the rest is what the client sends
//! before it half-closes. The oracle: the server greets every connection,
//! every reply line is `ddd` and a space or hyphen, no reply is the `451
//! Internal error` that a panic inside a session turns into, and the
//! session ends once the client has finished.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use herald::config::Config;
use herald::deliver::classify;
use herald::dns::Dns;
use herald::policy::dkim::Signer;
use herald::queue::{AttemptResult, DeliveryJob, Queue, QueueId, RcptOutcome};
use herald::receive::{self, ReceiveContext};
use herald::reply::{Enhanced, Reply};
use herald::report::Reporter;
use herald::verp::Verp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Listener indexes, in the order of [`config_text`].
pub const RELAY: u8 = 0;
pub const AUTH: u8 = 1;
pub const STARTTLS: u8 = 2;
pub const BOUNCES: u8 = 3;
const LISTENERS: usize = 4;

pub const USERNAME: &str = "acme";
pub const PASSWORD: &str = "fuzz-password";
pub const VERP_DOMAIN: &str = "bounces.relay.test";
pub const VERP_SECRET: &str = "fuzz-verp-secret-0123";

/// How long a session may take after the client has sent everything. The
/// server has nothing to wait for (DNS answers at once, no delays are
/// configured), so running into this means a session that does not end.
const LIMIT: Duration = Duration::from_secs(10);

const DKIM_KEY: &str = include_str!("../../tests/fixtures/dkim-ed25519-openssl.pem");

struct Server {
    rt: Runtime,
    addrs: Vec<SocketAddr>,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        // One worker: the session runs beside the thread that drives the
        // client, and the machine's other core stays free.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let addrs = rt.block_on(start());
        Server { rt, addrs }
    })
}

/// Where the server's files go: tmpfs when there is one, since every
/// accepted message is fsynced.
fn work_dir() -> PathBuf {
    let base = Path::new("/dev/shm");
    let base = if base.is_dir() {
        base.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    // Statics are never dropped, so a finished run leaves its directory:
    // remove those whose process is gone.
    if let Ok(entries) = std::fs::read_dir(&base) {
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix("herald-fuzz-"))
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let dir = base.join(format!("herald-fuzz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the work directory");
    dir
}

/// An argon2id hash with the smallest parameters: every failed AUTH runs
/// it, and the target is about the protocol, not the password hash.
fn cheap_hash(password: &str) -> String {
    use argon2::password_hash::{PasswordHasher as _, SaltString};
    let params = argon2::Params::new(8, 1, 1, None).expect("argon2 params");
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::encode_b64(b"herald-fuzz-salt").expect("salt");
    argon
        .hash_password(password.as_bytes(), &salt)
        .expect("hash")
        .to_string()
}

fn config_text(dir: &Path, dns: SocketAddr) -> String {
    let d = dir.display();
    let hash = cheap_hash(PASSWORD);
    format!(
        r#"
        [server]
        hostname = "relay.test"
        spool_dir = "{d}/spool"
        spool_segment_size = "1MiB"
        max_message_size = "64KiB"
        max_recipients = 5
        max_connections_per_ip = 1000
        max_unauthenticated_per_ip = 1000
        max_auth_failures = 1000000
        auth_failure_delay = "0s"
        auth_failure_window = "1s"

        [[listener]]
        address = "127.0.0.1:0"
        tls = "none"
        auth = "none"
        trusted_networks = ["127.0.0.0/8"]

        [[listener]]
        address = "127.0.0.1:0"
        tls = "none"
        auth = "required"
        allow_plaintext_auth = true

        [[listener]]
        address = "127.0.0.1:0"
        tls = "starttls"
        auth = "required"

        [tls]
        cert = "{d}/relay.crt"
        key = "{d}/relay.key"
        self_signed = true

        [[tenant]]
        name = "acme"
        username = "{USERNAME}"
        password_hash = "{hash}"
        allowed_senders = ["*@acme.test"]

        [[dkim]]
        domain = "acme.test"
        selector = "fuzz"
        algorithm = "ed25519-sha256"
        key = "{d}/dkim.pem"
        fallback = true

        [bounces]
        return_path_domain = "{VERP_DOMAIN}"
        listener = "127.0.0.1:0"
        verp_secret = "{VERP_SECRET}"

        [dns]
        nameservers = ["{dns}"]
        timeout = "1s"
        attempts = 1

        # Events are serialized as in production and thrown away, so a long
        # run does not fill the disk.
        [events]
        log = "/dev/null"
        "#
    )
}

async fn start() -> Vec<SocketAddr> {
    let dir = work_dir();
    std::fs::write(dir.join("dkim.pem"), DKIM_KEY).expect("write the DKIM key");
    let dns_addr = super::dns::start().await;
    let config =
        Config::from_toml_str(&config_text(&dir, dns_addr)).unwrap_or_else(|e| panic!("{e}"));
    let config = Arc::new(config);
    let tls = herald::tls::acceptor(&config).expect("TLS acceptor");
    let dns = Dns::new(&config.dns).expect("resolver");
    let (reporter, _events) = Reporter::start(&config.events.log).await.expect("reporter");
    let (jobs_tx, jobs) = mpsc::unbounded_channel();
    let queue = Queue::open(&config, reporter.clone(), jobs_tx).expect("queue");
    tokio::spawn(deliver_all(queue.clone(), jobs));
    let signer = Signer::load(&config).unwrap_or_else(|e| panic!("{e}"));
    let ctx = ReceiveContext::new(
        config,
        queue,
        dns,
        reporter,
        Some(tls),
        CancellationToken::new(),
    )
    .with_dkim(Arc::new(signer));
    let (addrs, _handle) = receive::start(Arc::new(ctx)).await.expect("listeners");
    assert_eq!(addrs.len(), LISTENERS);
    addrs
}

/// Stands in for delivery: every recipient is delivered at once, except
/// `bounce*@` ones, which bounce (and so make a DSN when asked for).
async fn deliver_all(queue: Arc<Queue>, mut jobs: mpsc::UnboundedReceiver<DeliveryJob>) {
    while let Some(job) = jobs.recv().await {
        let outcomes = job
            .recipients
            .iter()
            .map(|r| {
                let result = if r.address.starts_with("bounce") {
                    let reply = Reply::new(550, Enhanced(5, 1, 1), "no such user");
                    let class = classify::Classifier::default().classify(&reply).reason;
                    AttemptResult::Bounced(reply, class)
                } else {
                    AttemptResult::Delivered(Reply::new(250, Enhanced(2, 0, 0), "queued"))
                };
                RcptOutcome {
                    index: r.index,
                    result,
                    mx: Some("mx.example.test".into()),
                    tls: None,
                    next_hop_dsn: false,
                }
            })
            .collect();
        queue.complete_attempt(job.id, outcomes);
    }
}

/// The listener, and the client's bytes cut into the writes they go in.
pub fn decode(data: &[u8]) -> (usize, Vec<&[u8]>) {
    let [listener, a, b, session @ ..] = data else {
        return (RELAY as usize, vec![data]);
    };
    let at = |c: u8| session.len() * c as usize / 255;
    let (x, y) = (at(*a).min(at(*b)), at(*a).max(at(*b)));
    let chunks = [&session[..x], &session[x..y], &session[y..]]
        .into_iter()
        .filter(|c| !c.is_empty())
        .collect();
    (*listener as usize % LISTENERS, chunks)
}

/// The input for `session` sent to `listener` in one write.
pub fn encode(listener: u8, session: &[u8]) -> Vec<u8> {
    let mut v = vec![listener, 0, 0];
    v.extend_from_slice(session);
    v
}

pub fn run(data: &[u8]) {
    let server = server();
    let (listener, chunks) = decode(data);
    let out = server
        .rt
        .block_on(exchange(server.addrs[listener], &chunks));
    // For looking at what an input does: `HERALD_FUZZ_SHOW=1`.
    if std::env::var_os("HERALD_FUZZ_SHOW").is_some() {
        eprintln!("{}", String::from_utf8_lossy(&out));
    }
    check(&out);
}

async fn exchange(addr: SocketAddr, chunks: &[&[u8]]) -> Vec<u8> {
    let stream = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("the server no longer accepts connections: {e}"));
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let write = async move {
        for c in chunks {
            if wr.write_all(c).await.is_err() {
                return;
            }
            // Let the session read this part on its own.
            tokio::task::yield_now().await;
        }
        let _ = wr.shutdown().await;
    };
    let read = async move {
        let mut out = Vec::new();
        let mut buf = [0u8; 8192];
        let done = tokio::time::timeout(LIMIT, async {
            // A reset (the server closed with input unread) ends it too.
            while let Ok(n) = rd.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
            }
        })
        .await;
        assert!(
            done.is_ok(),
            "session still open {LIMIT:?} after the client finished; replies so far: {:?}",
            String::from_utf8_lossy(&out)
        );
        out
    };
    let ((), out) = tokio::join!(write, read);
    out
}

/// `ddd ` or `ddd-` and then no CR or LF: one line of an SMTP reply.
pub fn well_formed(line: &[u8]) -> bool {
    line.len() >= 4
        && line[..3].iter().all(u8::is_ascii_digit)
        && matches!(line[3], b' ' | b'-')
        && !line.iter().any(|&b| b == b'\r' || b == b'\n')
}

fn check(out: &[u8]) {
    let shown = || String::from_utf8_lossy(out);
    assert!(
        out.starts_with(b"220 "),
        "no greeting: the server no longer takes sessions? {:?}",
        shown()
    );
    let (lines, rest) = super::crlf_lines(out);
    for (i, line) in lines.iter().enumerate() {
        assert!(
            !line.windows(14).any(|w| w == b"Internal error"),
            "a panic in the session, answered 451: {:?}",
            shown()
        );
        assert!(
            well_formed(line),
            "malformed reply line {:?} in {:?}",
            String::from_utf8_lossy(line),
            shown()
        );
        // A 220 after the greeting answers STARTTLS: what follows is TLS.
        if i > 0 && line.starts_with(b"220") {
            return;
        }
    }
    assert!(rest.is_empty(), "reply cut short: {:?}", shown());
}

/// A message body for DATA: CRLF line ends, dot-stuffed, and the final dot.
fn data(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 8);
    let text = String::from_utf8_lossy(message).replace("\r\n", "\n");
    for line in text.lines() {
        if line.starts_with('.') {
            out.push(b'.');
        }
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

fn b64(raw: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(raw)
}

/// Hand-written sessions, each with its input header (one write).
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let plain = b"From: Billing <billing@acme.test>\r\nTo: bob@example.test\r\nSubject: Invoice 42\r\nMessage-ID: <42@acme.test>\r\n\r\nPlease find your invoice.\r\n";
    let umlauts = "From: J\u{fc}rgen <j\u{fc}rgen@acme.test>\r\nTo: stra\u{df}e@example.test\r\nSubject: =?UTF-8?B?w4RwZmVs?= \u{c4}pfel\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGr\u{fc}\u{df}e aus K\u{f6}ln\r\n.leading dot\r\n";
    let verp = Verp::new(VERP_DOMAIN, VERP_SECRET.as_bytes())
        .address(QueueId(0x0123_4567_89ab_cdef_0123), 0);
    let dsn = include_bytes!("../../tests/fixtures/bounces/postfix-dsn-1rcpt.eml");
    let arf = include_bytes!("../../tests/fixtures/bounces/arf-jmrp.eml");
    let phishing = include_bytes!("../../tests/fixtures/spam-phishing.eml");
    let creds = b64(format!("\0{USERNAME}\0{PASSWORD}").as_bytes());

    let mut s: Vec<(&str, u8, Vec<u8>)> = Vec::new();
    fn add(
        s: &mut Vec<(&'static str, u8, Vec<u8>)>,
        name: &'static str,
        listener: u8,
        parts: &[&[u8]],
    ) {
        s.push((name, listener, parts.concat()));
    }
    add(
        &mut s,
        "relay-basic",
        RELAY,
        &[
            b"EHLO app.test\r\nMAIL FROM:<billing@acme.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n",
            &data(plain),
            b"QUIT\r\n",
        ],
    );
    add(
        &mut s,
        "relay-pipelined-params",
        RELAY,
        &[
            "EHLO app.test\r\nMAIL FROM:<j\u{fc}rgen@acme.test> SIZE=400 BODY=8BITMIME SMTPUTF8 RET=FULL ENVID=env+2Bid\r\nRCPT TO:<stra\u{df}e@ex\u{e4}mple.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;s@example.test\r\nRCPT TO:<x@nullmx.test>\r\nRCPT TO:<y@nx.test>\r\nRCPT TO:<z@tempfail.test>\r\nRCPT TO:<bounce-me@example.test> NOTIFY=FAILURE\r\nDATA\r\n".as_bytes(),
            &data(umlauts.as_bytes()),
            b"RSET\r\nQUIT\r\n",
        ],
    );
    add(
        &mut s,
        "relay-bdat",
        RELAY,
        &[
            b"EHLO app.test\r\nMAIL FROM:<>\r\nRCPT TO:<b@example.test>\r\nBDAT 19\r\nSubject: chunked\r\n\r\nBDAT 7 LAST\r\nhello\r\nBDAT 0 LAST\r\nQUIT\r\n",
        ],
    );
    add(
        &mut s,
        "relay-smuggling-bare-lf",
        RELAY,
        &[
            b"EHLO app.test\r\nMAIL FROM:<a@acme.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\nSubject: x\r\n\r\nhello\n.\r\nMAIL FROM:<evil@acme.test>\r\nRCPT TO:<c@example.test>\r\nDATA\r\nbare\rCR\r\n.\r\n",
        ],
    );
    add(
        &mut s,
        "relay-nul",
        RELAY,
        &[
            b"EHLO a\0b\r\nMAIL FROM:<a\0@acme.test>\r\nMAIL FROM:<a@acme.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\nSubject: nul\r\n\r\nx\0y\r\n.\r\n",
        ],
    );
    add(
        &mut s,
        "relay-long-lines",
        RELAY,
        &[
            b"EHLO ",
            &[b'a'; 5000],
            b"\r\nNOOP\r\nMAIL FROM:<a@acme.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\nSubject: long\r\n\r\n",
            &[b'x'; 3000],
            b"\r\n.\r\n",
        ],
    );
    add(
        &mut s,
        "relay-junk",
        RELAY,
        &[
            b"HELO x\r\nVRFY a\r\nHELP\r\nNOOP\r\nRSET\r\nFOO bar\r\n\r\nmail from:<A@ACME.TEST>\r\nrcpt to:<B@EXAMPLE.TEST>\r\nDATA extra\r\nEXPN x\r\nQUIT\r\n",
        ],
    );
    add(
        &mut s,
        "relay-spam",
        RELAY,
        &[
            b"EHLO app.test\r\nMAIL FROM:<a@acme.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n",
            &data(phishing),
        ],
    );
    add(
        &mut s,
        "auth-plain",
        AUTH,
        &[
            format!("EHLO app.test\r\nAUTH PLAIN {creds}\r\nMAIL FROM:<billing@acme.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n").as_bytes(),
            &data(plain),
            b"MAIL FROM:<billing@other.test>\r\nQUIT\r\n",
        ],
    );
    add(
        &mut s,
        "auth-login",
        AUTH,
        &[format!(
            "EHLO app.test\r\nAUTH LOGIN\r\n{}\r\n{}\r\nMAIL FROM:<x@acme.test>\r\nRCPT TO:<y@example.test>\r\nDATA\r\nFrom: x@other.test\r\n\r\nforeign From\r\n.\r\n",
            b64(USERNAME.as_bytes()),
            b64(PASSWORD.as_bytes())
        )
        .as_bytes()],
    );
    add(
        &mut s,
        "auth-failures",
        AUTH,
        &[b"EHLO app.test\r\nMAIL FROM:<a@acme.test>\r\nAUTH PLAIN\r\n*\r\nAUTH LOGIN dXNlcg==\r\n=\r\nAUTH CRAM-MD5\r\nAUTH PLAIN !!!\r\nAUTH PLAIN AGFjbWUAd3Jvbmc=\r\n"],
    );
    add(
        &mut s,
        "starttls-handshake",
        STARTTLS,
        &[b"EHLO app.test\r\nSTARTTLS\r\n\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00"],
    );
    add(
        &mut s,
        "starttls-refused",
        STARTTLS,
        &[b"EHLO app.test\r\nMAIL FROM:<a@acme.test>\r\nAUTH PLAIN AGFjbWUAeA==\r\nSTARTTLS now\r\nQUIT\r\n"],
    );
    add(
        &mut s,
        "bounce-dsn",
        BOUNCES,
        &[
            format!("EHLO mx.example.test\r\nMAIL FROM:<>\r\nRCPT TO:<{verp}>\r\nDATA\r\n")
                .as_bytes(),
            &data(dsn),
        ],
    );
    add(
        &mut s,
        "bounce-arf",
        BOUNCES,
        &[
            format!("EHLO mx.example.test\r\nMAIL FROM:<complaints@example.test>\r\nRCPT TO:<{verp}>\r\nRCPT TO:<postmaster>\r\nRCPT TO:<someone@{VERP_DOMAIN}>\r\nDATA\r\n").as_bytes(),
            &data(arf),
        ],
    );
    s.into_iter()
        .map(|(name, listener, session)| (name.to_string(), encode(listener, &session)))
        .collect()
}
