//! `smtp_reply`: replies from remote MX hosts, which are untrusted. The
//! input (after a first byte of client options) is everything a server says
//! on one connection; herald's delivery client ([`SmtpClient`]) reads it on
//! a loopback socket while it runs a session (EHLO, maybe AUTH, one or two
//! transactions, RSET, QUIT). The same bytes, taken line by line, also go
//! through [`Reply::from_wire`], [`Enhanced::parse`],
//! [`Capabilities::parse_ehlo`] and the failure classifier.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use herald::deliver::classify;
use herald::deliver::client::{
    AuthMechanism, Capabilities, ClientError, MailParams, RcptParams, SmtpClient, Timeouts,
};
use herald::queue::{Notify, Ret};
use herald::reply::{Enhanced, Reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;

/// Far more than a session against a server that has said all it will say
/// (and closed) can take; past it the client is stuck.
const LIMIT: Duration = Duration::from_secs(10);

/// Bits of the first input byte: what the client tries.
pub const AUTH_AUTO: u8 = 1;
pub const AUTH_LOGIN: u8 = 2;
pub const TWO_TRANSACTIONS: u8 = 4;
pub const BODY_8BIT: u8 = 8;
pub const SMTPUTF8: u8 = 16;
pub const RSET: u8 = 32;

const BODY: &[u8] =
    b"From: a@acme.test\r\nSubject: x\r\n\r\n.a line with a dot\r\nbare\nLF\r\n.\r\n";

struct FakeMx {
    rt: Runtime,
    listener: TcpListener,
    addr: SocketAddr,
}

fn fake_mx() -> &'static FakeMx {
    static MX: OnceLock<FakeMx> = OnceLock::new();
    MX.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let listener = rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        FakeMx { rt, listener, addr }
    })
}

pub fn run(data: &[u8]) {
    let (flags, script) = match data.split_first() {
        Some((f, s)) => (*f, s),
        None => (0, data),
    };
    lines(script);
    let mx = fake_mx();
    mx.rt.block_on(async {
        let server = async {
            let Ok((mut sock, _)) = mx.listener.accept().await else {
                return;
            };
            // All at once, then end of input: the client never waits for
            // more, so every read ends in a reply or a close.
            let _ = sock.write_all(script).await;
            let _ = sock.shutdown().await;
            let mut sink = [0u8; 4096];
            while let Ok(n) = sock.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        };
        let done = tokio::time::timeout(LIMIT, async {
            tokio::join!(server, session(mx.addr, flags));
        })
        .await;
        assert!(done.is_ok(), "delivery client still busy after {LIMIT:?}");
    });
}

/// A delivery session as `deliver` runs one, with every reply checked.
async fn session(addr: SocketAddr, flags: u8) {
    let t = Duration::from_secs(5);
    let timeouts = Timeouts {
        connect: t,
        command: t,
        data: t,
    };
    let mut c = match SmtpClient::connect(addr, None, timeouts).await {
        Ok(c) => c,
        Err(e) => return failed(&e),
    };
    assert_eq!(c.greeting().code, 220);
    if let Err(e) = c.ehlo("client.test").await {
        failed(&e);
        return c.quit().await;
    }
    let auth = if flags & AUTH_LOGIN != 0 {
        Some(c.auth(AuthMechanism::Login, "user", "secret").await)
    } else if flags & AUTH_AUTO != 0 {
        Some(c.auth_auto("user", "secret").await)
    } else {
        None
    };
    if let Some(Err(e)) = auth {
        failed(&e);
    }
    let rounds = if flags & TWO_TRANSACTIONS != 0 { 2 } else { 1 };
    for _ in 0..rounds {
        if !c.is_usable() {
            break;
        }
        let mail = MailParams {
            from: "sender@acme.test",
            body_8bit: flags & BODY_8BIT != 0,
            smtputf8: flags & SMTPUTF8 != 0,
            ret: Some(Ret::Hdrs),
            env_id: Some("env-1"),
            require_tls: false,
        };
        let rcpts = [
            RcptParams {
                address: "a@example.test",
                notify: Notify {
                    failure: true,
                    ..Notify::default()
                },
                orcpt: Some("rfc822;a@example.test"),
            },
            RcptParams {
                address: "b@example.test",
                ..RcptParams::default()
            },
        ];
        match c.send(&mail, &rcpts, BODY).await {
            Ok(r) => {
                assert!(r.rcpts.len() <= rcpts.len(), "{r:?}");
                assert!(r.accepted() <= r.rcpts.len());
                for reply in std::iter::once(&r.mail).chain(&r.rcpts).chain(&r.data) {
                    checked(reply);
                }
            }
            Err(e) => failed(&e.error),
        }
        if flags & RSET != 0 && c.is_usable() {
            let _ = c.rset().await;
        }
    }
    c.quit().await;
}

/// A reply the client handed back: a valid code, and a classification.
fn checked(reply: &Reply) {
    assert!((200..600).contains(&reply.code), "{reply:?}");
    if !reply.is_positive() {
        let _ = classify::Classifier::default().classify(reply);
    }
    let _ = reply.to_string();
}

fn failed(e: &ClientError) {
    if let ClientError::Rejected { reply, .. } = e {
        checked(reply);
    }
    let _ = e.to_string();
}

/// The pure readers, line by line.
fn lines(script: &[u8]) {
    let text = String::from_utf8_lossy(script);
    let _ = Capabilities::parse_ehlo(&text);
    for line in text.split("\r\n") {
        let _ = Enhanced::parse(line);
        let code = line
            .get(..3)
            .and_then(|c| c.parse::<u16>().ok())
            .unwrap_or(0);
        let rest = line.get(4..).unwrap_or("");
        let reply = Reply::from_wire(code, rest);
        let _ = classify::Classifier::default().classify_parts(reply.enhanced, code, &reply.text);
        let _ = classify::Classifier::default().classify(&reply);
        round_trip(&reply);
    }
}

/// What herald writes for a reply reads back as the same reply, and its
/// lines are well-formed whatever the text held.
fn round_trip(reply: &Reply) {
    if !(100..1000).contains(&reply.code) {
        return;
    }
    let wire = reply.to_wire();
    let (lines, rest) = super::crlf_lines(&wire);
    assert!(rest.is_empty(), "reply does not end in CRLF: {wire:?}");
    for l in &lines {
        assert!(
            super::session::well_formed(l),
            "malformed line {:?} from {reply:?}",
            String::from_utf8_lossy(l)
        );
    }
    if let [one] = lines[..]
        && !reply.text.contains('\r')
    {
        let text = std::str::from_utf8(&one[4..]).expect("UTF-8 in, UTF-8 out");
        assert_eq!(
            &Reply::from_wire(reply.code, text),
            reply,
            "wire form {text:?}"
        );
    }
}

/// Servers' whole sides of a session, each after its client-options byte.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let scripts: [(&str, u8, &str); 7] = [
        (
            "pipelining-dsn",
            AUTH_AUTO | TWO_TRANSACTIONS | RSET,
            "220 mx.example.test ESMTP\r\n250-mx.example.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-DSN\r\n250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n250 AUTH PLAIN LOGIN\r\n235 2.7.0 ok\r\n250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 <b@example.test>: user unknown\r\n354 go ahead\r\n250 2.0.0 queued as 1234\r\n250 2.0.0 reset\r\n221 2.0.0 bye\r\n",
        ),
        (
            "no-pipelining-login",
            AUTH_LOGIN | BODY_8BIT,
            "220 mx ESMTP\r\n250-mx\r\n250 AUTH=LOGIN\r\n334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n235 ok\r\n250 ok\r\n250 ok\r\n250 ok\r\n354 send\r\n250 ok\r\n221 bye\r\n",
        ),
        (
            "helo-fallback",
            0,
            "220 old.example.test SMTP\r\n502 command not recognized\r\n250 old.example.test\r\n250 ok\r\n451 4.7.1 greylisted, try again in 5 minutes\r\n451 4.7.1 greylisted\r\n503 no valid recipients\r\n221 bye\r\n",
        ),
        (
            "multiline-utf8",
            SMTPUTF8,
            "220-mx.exämple.test ESMTP\r\n220 Grüße\r\n250-mx\r\n250-SMTPUTF8\r\n250 PIPELINING\r\n250 2.1.0 ok\r\n250 2.1.5 ok\r\n250 2.1.5 ok\r\n354 go\r\n552-5.3.4 message too big\r\n552 5.3.4 see https://example.test/größe\r\n",
        ),
        (
            "close-421",
            TWO_TRANSACTIONS,
            "220 mx\r\n250 mx\r\n421 4.3.2 shutting down\r\n",
        ),
        (
            "garbage",
            AUTH_AUTO,
            "220 mx\r\n250-mx\r\n250 AUTH PLAIN\r\n334 \r\n2x5 what\r\n999 no\r\n250\n\0\r\n",
        ),
        (
            "long-reply",
            0,
            "220 mx\r\n250-mx\r\n250-PIPELINING\r\n250 SIZE\r\n250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n250 ",
        ),
    ];
    let mut seeds: Vec<(String, Vec<u8>)> = scripts
        .iter()
        .map(|(name, flags, script)| {
            let mut v = vec![*flags];
            v.extend_from_slice(script.as_bytes());
            (name.to_string(), v)
        })
        .collect();
    // Past smtp-proto's 4 KiB reply limit.
    if let Some((_, v)) = seeds.last_mut() {
        v.extend(std::iter::repeat_n(b'x', 5000));
        v.extend_from_slice(b"\r\n");
    }
    seeds
}
