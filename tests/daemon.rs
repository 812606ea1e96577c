//! herald as a daemon, on the real binary: systemd's readiness and watchdog
//! notifications (sd_notify(3) datagrams to `NOTIFY_SOCKET`), and the
//! events log reopened on SIGUSR1/SIGHUP after `logrotate` moved it.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::dns::{TestDns, Zone};
use common::smtp::TestClient;

const LIMIT: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A config for one trusted plaintext listener at `smtp`, delivering
/// through the DNS at `dns`, logging events to `<dir>/events.jsonl`.
fn write_config(dir: &Path, smtp: SocketAddr, dns: SocketAddr) -> PathBuf {
    let d = dir.display();
    let config = dir.join("herald.toml");
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
retry = ["1h"]
[events]
log = "{d}/events.jsonl"
[admin]
address = "127.0.0.1:{admin_port}"
token = "daemon-test-token-0123456789"
"#,
            admin_port = free_port()
        ),
    )
    .unwrap();
    config
}

/// herald running as a child process, its log beside its config.
struct Herald(Child, PathBuf);

impl Herald {
    fn spawn(config: &Path, env: &[(&str, String)]) -> Herald {
        let log_path = config.with_extension("log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
        cmd.arg("--config")
            .arg(config)
            .arg("serve")
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Herald(cmd.spawn().expect("start herald"), log_path)
    }

    /// What it logged, for a failure's message.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, sig) };
    }

    async fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + LIMIT;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "herald did not exit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Herald {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("herald's log:\n{}", self.log());
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The next notification datagram, within the test's limit.
async fn next_notice(sock: &tokio::net::UnixDatagram, what: &str) -> String {
    let mut buf = vec![0u8; 4096];
    let n = common::within(LIMIT, what, sock.recv(&mut buf))
        .await
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_only_once_the_listener_accepts_then_watchdog_and_stopping() {
    let dns = TestDns::start(Zone::new("test.")).await;
    let dir = tempfile::tempdir().unwrap();
    let smtp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = write_config(dir.path(), smtp, dns.addr);
    let socket_path = dir.path().join("notify.sock");
    let sock = tokio::net::UnixDatagram::bind(&socket_path).unwrap();

    let mut herald = Herald::spawn(
        &config,
        &[
            ("NOTIFY_SOCKET", socket_path.display().to_string()),
            ("WATCHDOG_USEC", "200000".into()),
        ],
    );
    let ready = next_notice(&sock, "READY").await;
    assert!(ready.starts_with("READY=1"), "{ready}");
    // Ready means accepting: the first connection after it is served.
    let mut c = TestClient::connect(smtp).await;
    c.ehlo("app.test").await.assert_code(250);
    let _ = c.cmd("QUIT").await;

    // The watchdog is fed at half its timeout.
    let ping = next_notice(&sock, "WATCHDOG").await;
    assert_eq!(ping, "WATCHDOG=1");

    herald.signal(libc::SIGTERM);
    let stopping = loop {
        let n = next_notice(&sock, "STOPPING").await;
        if n != "WATCHDOG=1" {
            break n;
        }
    };
    assert!(stopping.starts_with("STOPPING=1"), "{stopping}");
    assert!(herald.wait_exit().await.success());
}

fn events(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("whole JSON lines"))
        .collect()
}

/// Waits until the events log at `path` has a `received` event for
/// `message_id`.
async fn wait_received(path: &Path, message_id: &str) {
    let deadline = Instant::now() + LIMIT;
    while !events(path)
        .iter()
        .any(|e| e["event"] == "received" && e["message_id"] == message_id)
    {
        assert!(
            Instant::now() < deadline,
            "no received event for {message_id} in {}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn submit(smtp: SocketAddr, message_id: &str) {
    let mut c = TestClient::connect(smtp).await;
    c.ehlo("app.test").await.assert_code(250);
    let body = format!(
        "From: billing@acme.test\r\nTo: carol@nowhere.test\r\nSubject: Rechnung\r\n\
         Message-ID: {message_id}\r\n\r\nBitte zahlen.\r\n"
    );
    c.send_mail(
        "billing@acme.test",
        &["carol@nowhere.test"],
        body.as_bytes(),
    )
    .await
    .assert_code(250);
    let _ = c.cmd("QUIT").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_events_log_is_reopened_after_rotation_and_loses_nothing() {
    // nowhere.test has a mail server that never answers: messages wait.
    let dns = TestDns::start(
        Zone::new("test.")
            .mx("nowhere.test", 10, "mx.nowhere.test")
            .a("mx.nowhere.test", common::mx::ip(200)),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let smtp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = write_config(dir.path(), smtp, dns.addr);
    let log = dir.path().join("events.jsonl");
    let mut herald = Herald::spawn(&config, &[]);
    let deadline = Instant::now() + LIMIT;
    while tokio::net::TcpStream::connect(smtp).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "herald did not listen; its log:\n{}",
            herald.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    for (round, sig) in [(1, libc::SIGUSR1), (2, libc::SIGHUP)] {
        let before = format!("<before-{round}@acme.test>");
        submit(smtp, &before).await;
        wait_received(&log, &before).await;
        // logrotate's default: move the file, then signal.
        let moved = dir.path().join(format!("events.jsonl.{round}"));
        std::fs::rename(&log, &moved).unwrap();
        herald.signal(sig);
        // Until the signal is handled, events still go to the moved file:
        // submit until one lands in the new one.
        let deadline = Instant::now() + LIMIT;
        let mut sent = Vec::new();
        while !log.exists() || events(&log).is_empty() {
            assert!(
                Instant::now() < deadline,
                "no new events log; herald's log:\n{}",
                herald.log()
            );
            let id = format!("<after-{round}-{}@acme.test>", sent.len());
            submit(smtp, &id).await;
            sent.push(id);
        }
        let last = sent.last().unwrap().clone();
        wait_received(&log, &last).await;
        // Nothing lost, nothing twice: each message's received event is in
        // exactly one of the files, every line of both whole.
        let (old, new) = (events(&moved), events(&log));
        for id in std::iter::once(&before).chain(&sent) {
            let count = |file: &[serde_json::Value]| {
                file.iter()
                    .filter(|e| e["event"] == "received" && e["message_id"] == id.as_str())
                    .count()
            };
            assert_eq!(count(&old) + count(&new), 1, "{id}");
        }
        assert!(
            old.iter().any(|e| e["message_id"] == before.as_str()),
            "the moved file keeps what was written before the rotation"
        );
    }
    herald.signal(libc::SIGTERM);
    assert!(herald.wait_exit().await.success());
}

/// contrib/systemd/herald.service passes `systemd-analyze verify`, pointed
/// at this build's binary (skipped where systemd-analyze is missing).
#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/contrib/systemd/herald.service"
    ))
    .unwrap();
    assert!(unit.contains("Type=notify") && unit.contains("ExecReload=/bin/kill -HUP $MAINPID"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("herald.service");
    std::fs::write(
        &path,
        unit.replace("/usr/bin/herald", env!("CARGO_BIN_EXE_herald")),
    )
    .unwrap();
    let out = match Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            eprintln!("skipped: systemd-analyze cannot run here: {e}");
            return;
        }
    };
    assert!(
        out.status.success(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// SIGHUP re-reads the config: new connections see the new message size
/// limit; a file that does not validate is refused and herald runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_config_for_new_connections() {
    let dns = TestDns::start(Zone::new("test.")).await;
    let dir = tempfile::tempdir().unwrap();
    let smtp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = write_config(dir.path(), smtp, dns.addr);
    let text = std::fs::read_to_string(&config).unwrap();
    let socket_path = dir.path().join("notify.sock");
    let sock = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
    let herald = Herald::spawn(
        &config,
        &[("NOTIFY_SOCKET", socket_path.display().to_string())],
    );
    assert!(next_notice(&sock, "READY").await.starts_with("READY=1"));
    let size = |r: common::smtp::Reply| r.extension("SIZE").map(str::to_string);
    let mut c = TestClient::connect(smtp).await;
    let before = size(c.ehlo("app.test").await);

    let with_limit = |limit: &str| {
        text.replace(
            "shutdown_grace = \"2s\"",
            &format!("shutdown_grace = \"2s\"\nmax_message_size = \"{limit}\""),
        )
    };
    std::fs::write(&config, with_limit("1MiB")).unwrap();
    herald.signal(libc::SIGHUP);
    assert_eq!(next_notice(&sock, "RELOADING").await, "RELOADING=1");
    assert_eq!(next_notice(&sock, "READY again").await, "READY=1");
    let mut c2 = TestClient::connect(smtp).await;
    assert_eq!(size(c2.ehlo("app.test").await).as_deref(), Some("1048576"));
    // The session from before keeps its config.
    assert_eq!(size(c.ehlo("app.test").await), before);

    std::fs::write(&config, with_limit("a lot")).unwrap();
    herald.signal(libc::SIGHUP);
    assert_eq!(next_notice(&sock, "RELOADING").await, "RELOADING=1");
    assert_eq!(next_notice(&sock, "READY again").await, "READY=1");
    let mut c3 = TestClient::connect(smtp).await;
    assert_eq!(size(c3.ehlo("app.test").await).as_deref(), Some("1048576"));
    let log = herald.log();
    assert!(log.contains("server.max_message_size"), "{log}");
    assert!(log.contains("the running config stays"), "{log}");

    // `herald reload` asks the running relay through its admin API.
    let reload = || {
        Command::new(env!("CARGO_BIN_EXE_herald"))
            .arg("--config")
            .arg(&config)
            .arg("reload")
            .output()
            .unwrap()
    };
    let out = reload();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("server.max_message_size"), "{err}");
    std::fs::write(&config, with_limit("2MiB")).unwrap();
    let out = reload();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("config reloaded"));
    let mut c4 = TestClient::connect(smtp).await;
    assert_eq!(size(c4.ehlo("app.test").await).as_deref(), Some("2097152"));
}
