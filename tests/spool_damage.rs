//! Damage in the spool, as the postmaster sees it: a relay holding
//! deferred messages stops, one byte of one message's record is flipped on
//! disk, and after the restart the other messages are still queued while
//! the admin API, the metrics and `herald queue list` name the lost one.

mod common;

use std::path::Path;
use std::time::Duration;

use common::dns::{TestDns, Zone};
use common::mx::{ip, reserve_port};
use common::relay::{Setup, TestRelay, herald, queue_id};

fn message(marker: &str) -> Vec<u8> {
    format!(
        "From: <billing@acme.test>\r\nTo: <x@dead.test>\r\nSubject: invoice\r\n\
         Date: Sun, 29 Nov 2026 10:00:00 +0000\r\n\r\nInvoice {marker}.\r\n"
    )
    .into_bytes()
}

/// Flips one bit of the first occurrence of `needle` in the spool's
/// segment files.
fn damage(spool: &Path, needle: &[u8]) {
    for entry in std::fs::read_dir(spool).unwrap() {
        let path = entry.unwrap().path();
        if !path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("seg-")
        {
            continue;
        }
        let mut bytes = std::fs::read(&path).unwrap();
        if let Some(at) = bytes.windows(needle.len()).position(|w| w == needle) {
            bytes[at] ^= 0x01;
            std::fs::write(&path, bytes).unwrap();
            return;
        }
    }
    panic!("{} not found in the spool", String::from_utf8_lossy(needle));
}

fn metric(page: &str, name: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{page}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_record_is_reported_by_the_api_metrics_and_cli() {
    common::within(Duration::from_secs(120), "the whole test", async {
        // The only MX of dead.test refuses connections: messages wait.
        let dns = TestDns::start(
            Zone::new("test.")
                .mx("dead.test", 10, "mx.dead.test")
                .a("mx.dead.test", ip(4)),
        )
        .await;
        let (port, listeners) = reserve_port(&[ip(4)]);
        drop(listeners);
        let mut setup = Setup::new(dns.addr, port);
        setup.retry = r#"["1h"]"#;
        setup.extra = "[dsn]\nenabled = false\n".into();
        let mut relay = TestRelay::start(setup).await;
        let mut ids = Vec::new();
        for marker in ["alpha-0001", "bravo-0002", "charlie-0003"] {
            let r = relay
                .submit("billing@acme.test", &["x@dead.test"], &message(marker))
                .await;
            ids.push(queue_id(&r));
        }
        relay.stop().await;
        damage(&relay.dir.path().join("spool"), b"bravo-0002");
        relay.restart().await;

        let api = |path: &'static str| {
            common::http::request(relay.admin, "GET", path, Some(relay.admin_token), None)
        };
        let r = api("/api/queue").await;
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        assert_eq!(v["total"], 2, "{v}");
        let d = &v["spool_damage"];
        assert_eq!(d["lost_queue_ids"], serde_json::json!([ids[1]]), "{v}");
        assert_eq!(d["skipped_records"], 1);
        assert_eq!(d["damaged_segments"], 1);

        let page = api("/metrics").await.text();
        assert_eq!(metric(&page, "herald_spool_damaged_records_total"), 1);
        assert_eq!(metric(&page, "herald_spool_lost_messages_total"), 1);
        assert_eq!(metric(&page, "herald_spool_quarantined_segments"), 0);
        assert_eq!(metric(&page, "herald_spool_full"), 0);

        let (ok, out, err) = herald(&relay.cli_config(), &["queue", "list"]).await;
        assert!(ok, "{err}");
        let first = out.lines().next().unwrap();
        assert!(
            first.starts_with("warning: the spool had 1 damaged record(s) in 1 segment(s)")
                && first.contains(&ids[1])
                && first.contains("corrupt/"),
            "{out}"
        );
        assert!(out.contains("2 of 2 message(s)"), "{out}");
        relay.stop().await;
    })
    .await;
}
