//! A STARTTLS SMTP sink and an MTA-STS policy host on loopback for
//! benchmarks of verified delivery (benches/run.sh `SINK=tls`).
//!
//! ```text
//! bench_tls init DIR
//!     Creates a test CA and two server certificates from it in DIR
//!     (ca.pem: what herald's [delivery.mta_sts] ca_file names; mx.pem/mx.key
//!     for mx.dest.example; sts.pem/sts.key for mta-sts.dest.example) unless
//!     DIR/ca.pem exists, then prints the SHA-256 of the MX certificate's
//!     public key (hex): the data of a `3 1 1` TLSA record.
//! bench_tls serve DIR [--smtp 127.0.0.2:2526] [--https 127.0.0.3:8443]
//!     [--policy FILE] [ignored smtp-sink arguments...]
//!     Serves SMTP with PIPELINING and STARTTLS (certificate mx.pem) on the
//!     --smtp address, accepting every command and message, and the policy
//!     (default `version: STSv1 / mode: enforce / mx: mx.dest.example /
//!     max_age: 86400`) at any HTTPS path with sts.pem on the --https
//!     address, until killed. Writes smtp-sink's `-c` counter line
//!     (`sess=N quit=N mesg=N` + CR) to stdout whenever it changed (at most
//!     every 2 ms), so `../shared/bench/smtpbench.py` can start it in place
//!     of smtp-sink (run.sh puts a shim named smtp-sink first in PATH).
//! ```
//!
//! One thread (a current-thread runtime), as smtp-sink is one process.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;

const MX_HOST: &str = "mx.dest.example";
const POLICY_HOST: &str = "mta-sts.dest.example";
const POLICY: &str = "version: STSv1\nmode: enforce\nmx: mx.dest.example\nmax_age: 86400\n";

static SESSIONS: AtomicU64 = AtomicU64::new(0);
static QUITS: AtomicU64 = AtomicU64::new(0);
static MESSAGES: AtomicU64 = AtomicU64::new(0);

fn usage() -> ! {
    eprintln!(
        "usage: bench_tls init DIR\n       bench_tls serve DIR [--smtp ADDR] [--https ADDR] [--policy FILE]"
    );
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("init") if args.len() == 2 => init(Path::new(&args[1])),
        Some("serve") if args.len() >= 2 => {
            let dir = PathBuf::from(&args[1]);
            let mut smtp: SocketAddr = "127.0.0.2:2526".parse().unwrap();
            let mut https: SocketAddr = "127.0.0.3:8443".parse().unwrap();
            let mut policy = POLICY.to_string();
            let mut rest = args[2..].iter();
            while let Some(a) = rest.next() {
                match a.as_str() {
                    "--smtp" => smtp = rest.next().unwrap_or_else(|| usage()).parse().unwrap(),
                    "--https" => https = rest.next().unwrap_or_else(|| usage()).parse().unwrap(),
                    "--policy" => {
                        policy = std::fs::read_to_string(rest.next().unwrap_or_else(|| usage()))
                            .expect("reading the policy file")
                    }
                    // smtp-sink's own arguments (when started in its place).
                    _ => {}
                }
            }
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(serve(&dir, smtp, https, policy));
        }
        _ => usage(),
    }
}

/// The CA, the two server certificates and their keys, as PEM files in
/// `dir`; prints the MX key's SHA-256 (hex).
fn init(dir: &Path) {
    std::fs::create_dir_all(dir).expect("creating the PKI directory");
    if !dir.join("ca.pem").exists() {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "herald bench CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&ca_key).unwrap();
        for (file, name) in [("mx", MX_HOST), ("sts", POLICY_HOST)] {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
            std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
        }
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    }
    let cert = CertificateDer::from_pem_file(dir.join("mx.pem")).expect("reading mx.pem");
    let parsed = webpki::EndEntityCert::try_from(&cert).expect("parsing mx.pem");
    // The whole SubjectPublicKeyInfo, DER (as DANE's matcher reads it).
    let spki = parsed.subject_public_key_info();
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, spki.as_ref());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    println!("{hex}");
}

fn acceptor(dir: &Path, name: &str) -> TlsAcceptor {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(dir.join(format!("{name}.pem")))
            .expect("reading the certificate")
            .collect::<Result<_, _>>()
            .expect("parsing the certificate");
    let key =
        PrivateKeyDer::from_pem_file(dir.join(format!("{name}.key"))).expect("reading the key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("server certificate and key");
    TlsAcceptor::from(Arc::new(config))
}

async fn serve(dir: &Path, smtp: SocketAddr, https: SocketAddr, policy: String) {
    let mx = acceptor(dir, "mx");
    let sts = acceptor(dir, "sts");
    let smtp = tokio::net::TcpListener::bind(smtp)
        .await
        .expect("binding the SMTP address");
    let https = tokio::net::TcpListener::bind(https)
        .await
        .expect("binding the HTTPS address");
    std::thread::spawn(counter_writer);
    let policy: Arc<str> = policy.into();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = https.accept().await else {
                continue;
            };
            let (sts, policy) = (sts.clone(), policy.clone());
            tokio::spawn(async move {
                let _ = policy_request(sts, tcp, &policy).await;
            });
        }
    });
    loop {
        let Ok((tcp, _)) = smtp.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        SESSIONS.fetch_add(1, Ordering::Relaxed);
        let mx = mx.clone();
        tokio::spawn(async move {
            let _ = smtp_session(mx, tcp).await;
        });
    }
}

/// smtp-sink's `-c` output: one CR-terminated counter line per change.
fn counter_writer() {
    let mut last = (u64::MAX, 0, 0);
    let mut out = std::io::stdout();
    loop {
        let now = (
            SESSIONS.load(Ordering::Relaxed),
            QUITS.load(Ordering::Relaxed),
            MESSAGES.load(Ordering::Relaxed),
        );
        if now != last {
            let _ = write!(out, "sess={} quit={} mesg={}\r", now.0, now.1, now.2);
            let _ = out.flush();
            last = now;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

async fn policy_request(
    acceptor: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    policy: &str,
) -> std::io::Result<()> {
    let mut tls = acceptor.accept(tcp).await?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        let n = tls.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let answer = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{policy}",
        policy.len()
    );
    tls.write_all(answer.as_bytes()).await?;
    tls.shutdown().await
}

/// How a run of [`session`] ended.
enum End {
    Starttls,
    Closed,
}

async fn smtp_session(
    acceptor: TlsAcceptor,
    mut tcp: tokio::net::TcpStream,
) -> std::io::Result<()> {
    tcp.write_all(b"220 mx.dest.example ESMTP bench_tls\r\n")
        .await?;
    if let End::Starttls = session(&mut tcp, false).await? {
        let mut tls = acceptor.accept(tcp).await?;
        session(&mut tls, true).await?;
    }
    Ok(())
}

/// Reads commands and answers them, several per write when pipelined,
/// until QUIT, EOF or (before TLS) STARTTLS. Message text is scanned line by
/// line for the lone dot and dropped.
async fn session<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, tls: bool) -> std::io::Result<End> {
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut out: Vec<u8> = Vec::with_capacity(1024);
    let mut in_data = false;
    // In DATA, the bytes before buf[0] ended mid-line.
    let mut mid_line = false;
    loop {
        let mut start = 0;
        while let Some(nl) = buf[start..].iter().position(|&b| b == b'\n') {
            let line = &buf[start..start + nl + 1];
            start += nl + 1;
            if in_data {
                if !mid_line && (line == b".\r\n" || line == b".\n") {
                    in_data = false;
                    MESSAGES.fetch_add(1, Ordering::Relaxed);
                    out.extend_from_slice(b"250 2.0.0 Ok: queued\r\n");
                }
                mid_line = false;
                continue;
            }
            let cmd = line.trim_ascii_end();
            let verb = cmd
                .split(|&b| b == b' ')
                .next()
                .unwrap_or_default()
                .to_ascii_uppercase();
            match verb.as_slice() {
                b"EHLO" => {
                    out.extend_from_slice(b"250-mx.dest.example\r\n250-PIPELINING\r\n250-SIZE 104857600\r\n250-8BITMIME\r\n");
                    if !tls {
                        out.extend_from_slice(b"250-STARTTLS\r\n");
                    }
                    out.extend_from_slice(b"250 ENHANCEDSTATUSCODES\r\n");
                }
                b"HELO" => out.extend_from_slice(b"250 mx.dest.example\r\n"),
                b"STARTTLS" if !tls => {
                    out.extend_from_slice(b"220 2.0.0 Ready to start TLS\r\n");
                    s.write_all(&out).await?;
                    return Ok(End::Starttls);
                }
                b"DATA" => {
                    in_data = true;
                    mid_line = false;
                    out.extend_from_slice(b"354 End data with <CR><LF>.<CR><LF>\r\n");
                }
                b"QUIT" => {
                    QUITS.fetch_add(1, Ordering::Relaxed);
                    out.extend_from_slice(b"221 2.0.0 Bye\r\n");
                    s.write_all(&out).await?;
                    let _ = s.shutdown().await;
                    return Ok(End::Closed);
                }
                _ => out.extend_from_slice(b"250 2.0.0 Ok\r\n"),
            }
        }
        if in_data && start < buf.len() {
            // A partial line of message text: drop it, remembering that the
            // next bytes continue it, unless it may be the start of the
            // final dot (at most a line's worth stays buffered outside DATA).
            let rest = &buf[start..];
            if mid_line || rest.len() > 2 || rest[0] != b'.' {
                mid_line = true;
                start = buf.len();
            }
        }
        buf.drain(..start);
        if !out.is_empty() {
            s.write_all(&out).await?;
            out.clear();
        }
        let len = buf.len();
        buf.resize(len + 16 * 1024, 0);
        let n = s.read(&mut buf[len..]).await?;
        buf.truncate(len + n);
        if n == 0 {
            return Ok(End::Closed);
        }
    }
}
