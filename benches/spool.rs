//! Group commit, measured: durable appends of 2 KiB message records from C
//! concurrent writers into herald's spool, against one writer (which is what
//! "fsync every message" costs). Prints records/s, fdatasync calls/s and
//! records per sync (the group-commit factor).
//!
//! `cargo bench --bench spool` (spool under var/bench-spool, on the same
//! disk as production would be; tmpfs would measure nothing).

use std::sync::Arc;
use std::time::{Duration, Instant};

use herald::clock::unix_now;
use herald::envelope::{Envelope, QueueId, Recipient};
use herald::queue::spool::{Record, Spool};

fn envelope() -> Envelope {
    Envelope {
        sender: "billing@acme.example".into(),
        tenant: Some("acme".into()),
        message_id: Some("<bench@acme.example>".into()),
        received_at: unix_now(),
        client_ip: "127.0.0.1".parse().unwrap(),
        smtputf8: false,
        body_8bit: false,
        ret: None,
        env_id: None,
        require_tls: false,
        ignore_tls_policies: false,
    }
}

async fn run(writers: usize, duration: Duration) -> (f64, f64) {
    let dir = std::path::Path::new("var/bench-spool");
    let _ = std::fs::remove_dir_all(dir);
    let (spool, _, _) = Spool::open(dir).expect("open spool");
    let spool = Arc::new(spool);
    let body = bytes::Bytes::from(vec![b'x'; 2048]);
    let rcpts = vec![Recipient::new("rcpt@dest.example".into())];
    let start = Instant::now();
    let syncs0 = spool.syncs();
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let spool = spool.clone();
        let body = body.clone();
        let rcpts = rcpts.clone();
        tasks.push(tokio::spawn(async move {
            let env = envelope();
            let mut n = 0u64;
            while start.elapsed() < duration {
                let rec = Record::message(QueueId::generate(), &env, &rcpts, body.clone());
                spool.append_durable(rec).await.expect("append");
                n += 1;
            }
            n
        }));
    }
    let mut records = 0;
    for t in tasks {
        records += t.await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let syncs = spool.syncs() - syncs0;
    spool.close().await;
    let _ = std::fs::remove_dir_all(dir);
    (records as f64 / secs, syncs as f64 / secs)
}

#[tokio::main]
async fn main() {
    let duration = Duration::from_secs(
        std::env::var("SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(5),
    );
    println!("| writers | records/s | fdatasync/s | records per sync | vs 1 writer |");
    println!("| --- | --- | --- | --- | --- |");
    let mut base = None;
    for writers in [1, 10, 50] {
        let (rps, sps) = run(writers, duration).await;
        let base = *base.get_or_insert(rps);
        println!(
            "| {writers} | {rps:.0} | {sps:.0} | {:.1} | {:.1}x |",
            rps / sps.max(1.0),
            rps / base
        );
    }
}
