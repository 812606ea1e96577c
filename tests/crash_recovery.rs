//! The durability promise, tested on the real binary: herald is killed with
//! SIGKILL while several clients submit, then started again on the same
//! spool; every message that got a 250 must reach the MX (at least once).

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::dns::{TestDns, Zone};
use common::mx::{MxSink, SinkReply, ip, reserve_port};
use common::smtp::TestClient;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn_herald(config: &std::path::Path, log: &std::path::Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("--config")
        .arg(config)
        .arg("serve")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start herald")
}

async fn wait_listening(addr: SocketAddr, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("herald exited early: {status}");
        }
        assert!(Instant::now() < deadline, "herald did not listen on {addr}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn message(id: &str) -> Vec<u8> {
    format!(
        "From: <billing@acme.test>\r\nTo: <r@crash.test>\r\nSubject: crash test\r\n\
         Message-ID: <{id}>\r\nDate: Sun, 29 Nov 2026 10:00:00 +0000\r\n\r\n{}\r\n",
        "invoice line\r\n".repeat(100)
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_no_accepted_message() {
    let dns = TestDns::start(
        Zone::new("test.")
            .mx("crash.test", 10, "mx.crash.test")
            .a("mx.crash.test", ip(7)),
    )
    .await;
    let (mx_port, mut listeners) = reserve_port(&[ip(7)]);
    // Every other recipient is deferred on its first attempt, so that at the
    // kill some accepted messages are delivered, some wait for a retry and
    // some are still in flight.
    let sink = MxSink::start_on(listeners.pop().unwrap(), |rcpt: &str, seen| {
        if seen == 0 && rcpt.starts_with("defer") {
            SinkReply::Reply(451, "4.3.0 try again")
        } else {
            SinkReply::Accept
        }
    })
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let smtp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = dir.path().join("herald.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
hostname = "relay.test"
spool_dir = "{d}/spool"
shutdown_grace = "2s"
[[listener]]
address = "{smtp}"
tls = "none"
auth = "none"
trusted_networks = ["127.0.0.0/8"]
[dns]
nameservers = ["{dns}"]
timeout = "1s"
[delivery]
port = {mx_port}
retry = ["1s"]
connect_timeout = "2s"
idle_timeout = "1s"
[events]
log = "{d}/events.jsonl"
[admin]
address = "127.0.0.1:0"
"#,
            dns = dns.addr
        ),
    )
    .unwrap();
    let log = dir.path().join("herald.log");

    let mut child = spawn_herald(&config, &log);
    wait_listening(smtp, &mut child).await;

    // Four clients submit as fast as they can, recording every 250.
    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut clients = Vec::new();
    for t in 0..4 {
        let accepted = accepted.clone();
        clients.push(tokio::spawn(async move {
            let mut c = TestClient::connect(smtp).await;
            c.ehlo("app.test").await;
            for i in 0.. {
                let id = format!("crash-{t}-{i}@acme.test");
                let rcpt = if i % 2 == 0 {
                    format!("defer-{t}-{i}@crash.test")
                } else {
                    format!("ok-{t}-{i}@crash.test")
                };
                let r = c
                    .send_mail("billing@acme.test", &[&rcpt], &message(&id))
                    .await;
                if r.code == 250 {
                    accepted.lock().unwrap().push(id);
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while accepted.lock().unwrap().len() < 150 {
        assert!(Instant::now() < deadline, "clients got too few 250s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().expect("SIGKILL");
    child.wait().unwrap();
    // The clients fail on the dead connection and stop.
    for c in clients {
        let _ = tokio::time::timeout(Duration::from_secs(30), c).await;
    }
    let accepted: HashSet<String> = accepted.lock().unwrap().iter().cloned().collect();

    let mut child = spawn_herald(&config, &log);
    wait_listening(smtp, &mut child).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let arrived: HashSet<String> = sink
            .messages()
            .iter()
            .filter_map(|m| {
                let text = String::from_utf8_lossy(&m.data);
                let start = text.find("Message-ID: <")? + 13;
                let end = text[start..].find('>')? + start;
                Some(text[start..end].to_string())
            })
            .collect();
        let missing: Vec<_> = accepted.difference(&arrived).collect();
        if missing.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "{} of {} accepted messages never arrived, e.g. {:?}; herald log:\n{}",
                missing.len(),
                accepted.len(),
                &missing[..missing.len().min(5)],
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Graceful stop: SIGTERM, and it exits by itself.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "herald ignored SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
