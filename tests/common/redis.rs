//! The test Redis on 127.0.0.1:6379, for cluster tests: whether it is up
//! (skip with a printed reason, or fail under CI), a key prefix of the
//! test's own, a connection, and clean-up of the prefix's keys.

use std::time::Duration;

/// Where the tests expect Redis.
pub const REDIS: &str = "127.0.0.1:6379";

/// Whether the test Redis is up; `false` (skip, with a printed reason) only
/// when `CI` is unset, `""` or `"false"`. Under CI a missing Redis panics.
pub async fn available(test: &str) -> bool {
    let up = tokio::time::timeout(
        Duration::from_secs(1),
        tokio::net::TcpStream::connect(REDIS),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    if !up {
        if std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false") {
            panic!("{test}: Redis is not reachable on {REDIS}, and CI is set");
        }
        eprintln!(
            "skipping {test}: Redis is not reachable on {REDIS} (set CI=true to make this fail)"
        );
    }
    up
}

/// A key prefix no other test run uses.
pub fn unique_prefix(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("herald-test-{tag}-{}-{nanos}", std::process::id())
}

/// A connection to the test Redis (bounded).
pub async fn connect() -> ::redis::aio::MultiplexedConnection {
    let client = ::redis::Client::open(format!("redis://{REDIS}")).expect("Redis URL");
    super::within(
        Duration::from_secs(5),
        "a Redis connection",
        client.get_multiplexed_async_connection(),
    )
    .await
    .expect("connect to the test Redis")
}

/// Deletes every key under `prefix:` (end of a test).
pub async fn delete_prefix(prefix: &str) {
    let mut conn = connect().await;
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: Result<(), _> = ::redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
    }
}

/// A port on 127.0.0.1 nobody listens on: a Redis that is down.
pub fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
