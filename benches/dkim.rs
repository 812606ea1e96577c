//! DKIM signing rate (issue 3): RSA-2048 and Ed25519, 2 KiB and 100 KiB
//! messages, on one thread and on two (both cores), through herald's own
//! signer (`policy::dkim::sign_with`: relaxed/relaxed, herald's header list).
//!
//! `cargo bench --bench dkim` (SECONDS=N per case, default 2).

use std::sync::Arc;
use std::time::{Duration, Instant};

use herald::config::{Config, DkimAlgorithm};
use herald::policy::dkim::{Signer, generate, sign_with, write_key_file};

fn message(size: usize) -> Vec<u8> {
    let mut m = b"From: Acme Billing <billing@acme.example>\r\nTo: <bob@example.net>\r\n\
Subject: Invoice 1\r\nDate: Sun, 29 Nov 2026 10:00:00 +0000\r\nMessage-ID: <1@acme.example>\r\n\
MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        .to_vec();
    while m.len() < size {
        m.extend_from_slice(b"Invoice line: 1 x consulting, EUR 120.00, due in 30 days....\r\n");
    }
    m
}

fn rate(keys: &[Arc<herald::policy::dkim::Key>], msg: &[u8], threads: usize, d: Duration) -> f64 {
    let start = Instant::now();
    let total: u64 = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut n = 0u64;
                    while start.elapsed() < d {
                        sign_with(keys, msg.to_vec()).expect("sign");
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    });
    total as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let secs = std::env::var("SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let d = Duration::from_secs(secs);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut toml = String::from("[[listener]]\naddress = \"127.0.0.1:0\"\n");
    for (sel, alg, name) in [
        ("rsa", DkimAlgorithm::RsaSha256, "rsa-sha256"),
        ("ed", DkimAlgorithm::Ed25519Sha256, "ed25519-sha256"),
    ] {
        let key = generate(alg, 2048).expect("keygen");
        let path = dir.path().join(format!("{sel}.key"));
        write_key_file(&path, &key.pem).expect("write key");
        let domain = format!("{sel}.example");
        toml += &format!(
            "[[dkim]]\ndomain = \"{domain}\"\nselector = \"{sel}\"\nalgorithm = \"{name}\"\nkey = \"{}\"\n",
            path.display()
        );
    }
    let config = Config::from_toml_str(&toml).expect("config");
    let signer = Signer::load(&config).expect("keys");
    println!("| key | size | 1 thread signs/s | 2 threads signs/s | ms per signature (1 thread) |");
    println!("| --- | --- | --- | --- | --- |");
    for (label, domain) in [("RSA-2048", "rsa.example"), ("Ed25519", "ed.example")] {
        let keys = signer.keys_for(None, Some(&format!("billing@{domain}")));
        assert_eq!(keys.len(), 1, "one key for {domain}");
        for size in [2048, 102_400] {
            let msg = message(size);
            let one = rate(keys, &msg, 1, d);
            let two = rate(keys, &msg, 2, d);
            println!(
                "| {label} | {} KiB | {one:.0} | {two:.0} | {:.3} |",
                size / 1024,
                1000.0 / one
            );
        }
    }
}
