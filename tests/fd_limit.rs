//! The open-files limit and `server.max_connections`, on the real binary:
//! started with a limit far below `max_connections`, herald says so at
//! start, takes what the limit allows, and answers every client beyond it
//! with 421 at once instead of leaving it hanging without a greeting.

mod common;

use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::smtp::TestClient;
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
