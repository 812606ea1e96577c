//! A herald relay running in the test process: a temp directory holding its
//! config, spool, certificate and events log, three listeners on loopback
//! (STARTTLS+AUTH, implicit TLS+AUTH, trusted network without AUTH), DNS
//! pointed at the test's server and delivery to the test's MX port.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use herald::config::Config;
use herald::server::{self, Running};
use serde_json::Value;

use super::smtp::{Reply, TestClient};

pub const USER: &str = "acme";
pub const PASSWORD: &str = "secret";
/// `[admin] token` of every test relay.
pub const ADMIN_TOKEN: &str = "test-admin-token";
/// argon2id of PASSWORD with small parameters, so tests stay fast.
pub const PASSWORD_HASH: &str = "$argon2id$v=19$m=1024,t=1,p=1$B6L8QT2wCAPY51s0DWRqFQ$NNVWFBUvhPRSg6faKHKflje/Y7dsH5sVf70a5Hhp2pw";

/// What a test may change in the relay's config.
pub struct Setup {
    pub dns: SocketAddr,
    pub mx_port: u16,
    /// `[delivery] retry`, as TOML array text.
    pub retry: &'static str,
    pub lifetime: &'static str,
    /// Extra lines for `[server]` and `[delivery]`.
    pub server_extra: String,
    pub delivery_extra: String,
    /// Extra lines for the `acme` `[[tenant]]` (e.g. `webhook_url`).
    pub tenant_extra: String,
    /// Whole sections appended at the end (e.g. `[suppression]`, more `[[tenant]]`s).
    pub extra: String,
}

impl Setup {
    pub fn new(dns: SocketAddr, mx_port: u16) -> Setup {
        Setup {
            dns,
            mx_port,
            retry: r#"["1s"]"#,
            lifetime: "1h",
            server_extra: String::new(),
            delivery_extra: String::new(),
            tenant_extra: String::new(),
            extra: String::new(),
        }
    }
}

pub struct TestRelay {
    pub dir: tempfile::TempDir,
    pub config_text: String,
    /// STARTTLS, AUTH required.
    pub submission: SocketAddr,
    /// Implicit TLS, AUTH required.
    pub implicit: SocketAddr,
    /// Plain, no AUTH, 127.0.0.0/8 trusted.
    pub trusted: SocketAddr,
    /// The admin API (`[admin]` on 127.0.0.1:0, token [`ADMIN_TOKEN`]).
    pub admin: SocketAddr,
    pub admin_token: &'static str,
    running: Option<Running>,
}

impl TestRelay {
    pub async fn start(setup: Setup) -> TestRelay {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path().display();
        let config_text = format!(
            r#"
[server]
hostname = "relay.test"
spool_dir = "{d}/spool"
shutdown_grace = "5s"
command_timeout = "30s"
{server_extra}

[[listener]]
address = "127.0.0.1:0"
tls = "starttls"
auth = "required"

[[listener]]
address = "127.0.0.1:0"
tls = "implicit"
auth = "required"

[[listener]]
address = "127.0.0.1:0"
tls = "none"
auth = "none"
trusted_networks = ["127.0.0.0/8"]

[tls]
cert = "{d}/relay.crt"
key = "{d}/relay.key"

[[tenant]]
name = "acme"
username = "{USER}"
password_hash = "{PASSWORD_HASH}"
allowed_senders = ["*@acme.test"]
{tenant_extra}

[dns]
nameservers = ["{dns}"]
timeout = "1s"
attempts = 1

[delivery]
helo_name = "relay.test"
port = {port}
retry = {retry}
retry_jitter = 0.0
max_queue_lifetime = "{lifetime}"
connect_timeout = "2s"
command_timeout = "10s"
data_timeout = "10s"
idle_timeout = "1s"
{delivery_extra}

[events]
log = "{d}/events.jsonl"

[admin]
address = "127.0.0.1:0"
token = "{ADMIN_TOKEN}"

{extra}
"#,
            server_extra = setup.server_extra,
            dns = setup.dns,
            port = setup.mx_port,
            retry = setup.retry,
            lifetime = setup.lifetime,
            delivery_extra = setup.delivery_extra,
            tenant_extra = setup.tenant_extra,
            extra = setup.extra,
        );
        std::fs::write(dir.path().join("herald.toml"), &config_text).expect("write config");
        let mut relay = TestRelay {
            dir,
            config_text,
            submission: "0.0.0.0:0".parse().unwrap(),
            implicit: "0.0.0.0:0".parse().unwrap(),
            trusted: "0.0.0.0:0".parse().unwrap(),
            admin: "0.0.0.0:0".parse().unwrap(),
            admin_token: ADMIN_TOKEN,
            running: None,
        };
        relay.boot().await;
        relay
    }

    async fn boot(&mut self) {
        let mut config = Config::from_toml_str(&self.config_text).expect("test config is valid");
        // As `Config::load` would: a reload reads this file again.
        config.source = Some(self.config_path());
        let running = server::start(config).await.expect("relay starts");
        self.submission = running.smtp_addrs[0];
        self.implicit = running.smtp_addrs[1];
        self.trusted = running.smtp_addrs[2];
        self.admin = running.admin_addr.expect("admin API is running");
        self.running = Some(running);
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("herald.toml")
    }

    pub fn events_path(&self) -> PathBuf {
        self.dir.path().join("events.jsonl")
    }

    /// The relay's `/metrics` page.
    pub async fn metrics_page(&self) -> String {
        super::http::request(self.admin, "GET", "/metrics", Some(self.admin_token), None)
            .await
            .text()
    }

    /// A counter or gauge without labels from the relay's `/metrics` page.
    pub async fn metric(&self, name: &str) -> u64 {
        let page = self.metrics_page().await;
        page.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{page}"))
    }

    /// Waits until the queue holds nothing (a message leaves it shortly
    /// after its last event is emitted).
    pub async fn wait_queue_empty(&self, timeout: Duration) {
        super::within(timeout, "the queue to empty", async {
            while !self.running().queue.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().expect("relay is running")
    }

    /// Graceful shutdown (as on SIGTERM).
    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            tokio::time::timeout(Duration::from_secs(30), r.shutdown())
                .await
                .expect("relay shuts down within 30s");
        }
    }

    /// Stops and starts again on the same spool (listeners get new ports).
    pub async fn restart(&mut self) {
        self.stop().await;
        self.boot().await;
    }

    /// A client on the submission port after EHLO, STARTTLS, EHLO, AUTH.
    pub async fn client(&self) -> TestClient {
        let mut c = TestClient::connect(self.submission).await;
        c.ehlo("app.test").await.assert_code(250);
        c.starttls().await.assert_code(220);
        c.ehlo("app.test").await.assert_code(250);
        c.auth_plain(USER, PASSWORD).await.assert_code(235);
        c
    }

    /// Sends one message through an authenticated session; returns the
    /// final reply.
    pub async fn submit(&self, from: &str, rcpts: &[&str], body: &[u8]) -> Reply {
        let mut c = self.client().await;
        let r = c.send_mail(from, rcpts, body).await;
        let _ = c.cmd("QUIT").await;
        r
    }

    /// Every event logged so far.
    pub fn events(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.events_path()).unwrap_or_default();
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).expect("event lines are JSON"))
            .collect()
    }

    /// Waits until `n` logged events match `pred`; panics with the log
    /// after `timeout`.
    pub async fn wait_events(
        &self,
        what: &str,
        n: usize,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let hits: Vec<Value> = self.events().into_iter().filter(|e| pred(e)).collect();
            if hits.len() >= n {
                return hits;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {n} event(s): {what}; log:\n{}",
                    std::fs::read_to_string(self.events_path()).unwrap_or_default()
                );
            }
            // The log is written by another task: re-read it shortly.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl TestRelay {
    /// The relay's config with the admin port it actually bound (the test
    /// config asks for port 0), for the CLI commands that call the API.
    pub fn cli_config(&self) -> PathBuf {
        let text = self.config_text.replace(
            "[admin]\naddress = \"127.0.0.1:0\"",
            &format!("[admin]\naddress = \"{}\"", self.admin),
        );
        assert_ne!(text, self.config_text, "admin section found");
        let path = self.dir.path().join("herald-cli.toml");
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// Runs the built `herald --config CONFIG ARGS...`; (success, stdout, stderr).
pub async fn herald(config: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = super::within(
        Duration::from_secs(20),
        &format!("herald {}", args.join(" ")),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .arg("--config")
            .arg(config)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("run herald");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The queue id out of `250 2.0.0 Ok: queued as <id>`.
pub fn queue_id(reply: &Reply) -> String {
    reply.assert_code(250);
    reply
        .text()
        .rsplit(' ')
        .next()
        .expect("queue id in reply")
        .to_string()
}

/// An event's field as a string ("" when absent).
pub fn field<'a>(e: &'a Value, key: &str) -> &'a str {
    e.get(key).and_then(Value::as_str).unwrap_or("")
}

/// `one.test`, whose MX `mx.one.test` (127.0.0.2) is a sink that accepts
/// everything, and a relay delivering there: the world most delivery tests
/// start from.
pub struct OneTest {
    pub dns: super::dns::TestDns,
    pub mx: super::mx::MxSink,
    pub relay: TestRelay,
}

/// Starts a [`OneTest`]; `configure` adds to the relay's [`Setup`].
pub async fn one_test(configure: impl FnOnce(&mut Setup)) -> OneTest {
    use super::mx::{MxSink, SinkReply, ip, reserve_port};
    let zone = super::dns::Zone::new("test.")
        .mx("one.test", 10, "mx.one.test")
        .a("mx.one.test", ip(2));
    let dns = super::dns::TestDns::start(zone).await;
    let (port, mut listeners) = reserve_port(&[ip(2)]);
    let mx = MxSink::start_on(listeners.pop().unwrap(), |_, _| SinkReply::Accept).unwrap();
    let mut setup = Setup::new(dns.addr, port);
    configure(&mut setup);
    let relay = TestRelay::start(setup).await;
    OneTest { dns, mx, relay }
}
