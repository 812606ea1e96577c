//! The real binary at the limits of its machine.
//!
//! Open files: started with a limit far below `max_connections`, herald
//! says so at start, takes what the limit allows, and answers every client
//! beyond it with 421 at once instead of leaving it hanging.
//!
//! A full spool disk: herald killed on a full disk starts again, delivers
//! what is queued, answers new mail with `452 4.3.1`, and takes mail again
//! by itself once there is room.

mod common;

use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::dns::{TestDns, Zone};
use common::mx::{MxSink, SinkReply, ip, reserve_port};
use common::smtp::TestClient;
use common::tmpfs::Tmpfs;
use common::within;

const OPEN_FILES: u64 = 128;

#[tokio::test]
async fn a_low_open_files_limit_caps_connections_with_421() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let smtp = listener.local_addr().unwrap();
    drop(listener);
    let config = dir.path().join("herald.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
hostname = "relay.test"
spool_dir = "{d}/spool"
max_connections = 10000
[[listener]]
address = "{smtp}"
tls = "none"
auth = "none"
trusted_networks = ["127.0.0.0/8"]
[dns]
nameservers = ["127.0.0.1:9"]
[events]
log = "{d}/events.jsonl"
[admin]
address = "127.0.0.1:0"
"#
        ),
    )
    .unwrap();
    let log = dir.path().join("herald.log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.arg("--config")
        .arg(&config)
        .arg("serve")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    // SAFETY: setrlimit is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: OPEN_FILES,
                rlim_max: OPEN_FILES,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("start herald");
    let guard = KillOnDrop(&mut child);
    wait_listening(smtp, guard.0).await;

    let mut held = Vec::new();
    let (mut greeted, mut refused) = (0, 0);
    for _ in 0..OPEN_FILES + 20 {
        let c = within(
            Duration::from_secs(20),
            "a greeting or a refusal",
            TestClient::connect(smtp),
        )
        .await;
        match c.greeting.code {
            220 => greeted += 1,
            421 => {
                assert!(
                    c.greeting.text().contains("Too many connections"),
                    "{}",
                    c.greeting
                );
                refused += 1;
            }
            other => panic!("unexpected greeting {other}: {}", c.greeting),
        }
        held.push(c);
    }
    assert!(
        refused > 0,
        "every one of {greeted} connections was greeted"
    );
    assert!(
        greeted > 0 && greeted < OPEN_FILES as usize,
        "{greeted} greeted under a limit of {OPEN_FILES} open files"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("more than the open-files limit allows"),
        "no warning in the log:\n{text}"
    );
    drop(held);
    drop(guard);
}

struct KillOnDrop<'a>(&'a mut std::process::Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_listening(addr: SocketAddr, child: &mut std::process::Child) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_disk_delivers_the_queue_refuses_new_mail_and_recovers() {
    // Room for two segments of 4 MiB zeros ahead, and a little more.
    let Some(disk) = Tmpfs::mount("10m") else {
        return;
    };
    let dns = TestDns::start(
        Zone::new("test.")
            .mx("full.test", 10, "mx.full.test")
            .a("mx.full.test", ip(8)),
    )
    .await;
    let (mx_port, mut listeners) = reserve_port(&[ip(8)]);
    let accept = Arc::new(AtomicBool::new(false));
    let open = accept.clone();
    let sink = MxSink::start_on(listeners.pop().unwrap(), move |_, _| {
        if open.load(Ordering::SeqCst) {
            SinkReply::Accept
        } else {
            SinkReply::Reply(451, "4.3.0 not yet")
        }
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let spool = disk.path().join("spool");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let smtp = listener.local_addr().unwrap();
    drop(listener);
    let config = dir.path().join("herald.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
hostname = "relay.test"
spool_dir = "{spool}"
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
[events]
log = "{d}/events.jsonl"
[admin]
address = "127.0.0.1:0"
"#,
            spool = spool.display(),
            dns = dns.addr
        ),
    )
    .unwrap();
    let log = dir.path().join("herald.log");
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_herald"))
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            )
            .spawn()
            .expect("start herald")
    };
    let message =
        b"From: <billing@acme.test>\r\nSubject: queued before the disk filled\r\n\r\ninvoice\r\n";

    let mut child = spawn();
    {
        let guard = KillOnDrop(&mut child);
        wait_listening(smtp, guard.0).await;
        let mut c = TestClient::connect(smtp).await;
        c.ehlo("app.test").await;
        c.send_mail("billing@acme.test", &["bob@full.test"], message)
            .await
            .assert_code(250);
        // Deferred once: it waits in the spool. Then the disk fills and
        // herald dies (SIGKILL on drop).
        within(Duration::from_secs(20), "a first attempt", async {
            while sink.rcpt_attempts("bob@full.test") == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }
    let filler = disk.fill();

    // It starts on the full disk; new mail gets a temporary refusal saying
    // why.
    let mut child = spawn();
    let guard = KillOnDrop(&mut child);
    wait_listening(smtp, guard.0).await;
    let mut c = TestClient::connect(smtp).await;
    c.ehlo("app.test").await;
    let r = c
        .send_mail("billing@acme.test", &["carol@full.test"], message)
        .await;
    assert_eq!((r.code, r.enhanced()), (452, Some("4.3.1")), "{r}");
    // What it has queued it delivers.
    accept.store(true, Ordering::SeqCst);
    let got = sink.wait_for_messages(1, Duration::from_secs(30));
    assert!(String::from_utf8_lossy(&got[0].data).contains("queued before the disk filled"));
    // Room again: mail is taken without a restart.
    std::fs::remove_file(filler).unwrap();
    let accepted = within(
        Duration::from_secs(30),
        "a 250 after the disk has room",
        async {
            loop {
                let r = c
                    .send_mail("billing@acme.test", &["carol@full.test"], message)
                    .await;
                if r.code == 250 {
                    return r;
                }
                assert_eq!(r.code, 452, "{r}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        },
    )
    .await;
    accepted.assert_code(250);
    sink.wait_for_messages(2, Duration::from_secs(30));
    drop(guard);
}
