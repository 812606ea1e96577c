//! Spam scoring rate (issue 3): the invoice fixtures and generated
//! text + HTML messages of 2 KiB and 100 KiB, on one thread, through
//! `policy::spam::SpamRules::score` with the default rules. The "parse
//! only" column is mail-parser alone on the same bytes: the part of the
//! cost that any content check pays.
//!
//! `cargo bench --bench spam` (SECONDS=N per case, default 2; OUT=FILE
//! appends one JSON line per case; ONLY=TEXT runs the cases whose name
//! contains TEXT).

use std::io::Write;
use std::time::{Duration, Instant};

use herald::policy::spam::{SpamConfig, SpamRules};

/// A multipart/alternative invoice of about `size` bytes: text and HTML
/// halves of equal length, with links in both.
fn message(size: usize) -> Vec<u8> {
    let mut text =
        String::from("Dear Bob,\r\n\r\nyour invoice: https://pay.acme.example/i/1\r\n\r\n");
    let mut html = String::from(
        "<html><body><p>Dear Bob,</p>\r\n<p>Your invoice: \
         <a href=\"https://pay.acme.example/i/1\">pay.acme.example/i/1</a></p>\r\n<table>\r\n",
    );
    let mut n = 0;
    while text.len() + html.len() + 600 < size {
        n += 1;
        text +=
            &format!("Line {n}: 1 x consulting, EUR 120.00, see https://acme.example/l/{n}\r\n");
        html += &format!(
            "<tr><td>Line {n}</td><td style=\"color:#222\">1 x consulting</td>\
             <td align=\"right\">EUR 120.00</td></tr>\r\n"
        );
    }
    html += "</table></body></html>";
    format!(
        "From: Acme Billing <billing@acme.example>\r\nTo: <bob@example.net>\r\n\
         Subject: Invoice 1\r\nDate: Sun, 29 Nov 2026 10:00:00 +0000\r\n\
         Message-ID: <1@acme.example>\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/alternative; boundary=\"b\"\r\n\r\n\
         --b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n\
         --b\r\nContent-Type: text/html; charset=utf-8\r\n\r\n{html}\r\n--b--\r\n"
    )
    .into_bytes()
}

/// Calls per second of `f` over `d`.
fn rate(d: Duration, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < d {
        for _ in 0..16 {
            f();
        }
        n += 16;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let secs: u64 = std::env::var("SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let d = Duration::from_secs(secs);
    let mut out = std::env::var("OUT").ok().map(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .expect("open OUT")
    });
    let rules = SpamRules::new(&SpamConfig::default());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "invoice-pdf.eml",
            include_bytes!("../tests/fixtures/invoice-pdf.eml").to_vec(),
        ),
        (
            "invoice-html-pdf.eml",
            include_bytes!("../tests/fixtures/invoice-html-pdf.eml").to_vec(),
        ),
        (
            "spam-phishing.eml",
            include_bytes!("../tests/fixtures/spam-phishing.eml").to_vec(),
        ),
        ("text+html 2 KiB", message(2048)),
        ("text+html 100 KiB", message(102_400)),
    ];
    println!("| message | bytes | score | messages/s | µs per message | parse only µs |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let only = std::env::var("ONLY").unwrap_or_default();
    for (name, msg) in cases.iter().filter(|(n, _)| n.contains(&only)) {
        let score = rules.score(msg).score;
        let scored = rate(d, || {
            std::hint::black_box(rules.score(std::hint::black_box(msg)));
        });
        let parsed = rate(d, || {
            std::hint::black_box(
                mail_parser::MessageParser::new().parse(std::hint::black_box(msg)),
            );
        });
        println!(
            "| {name} | {} | {score} | {scored:.0} | {:.1} | {:.1} |",
            msg.len(),
            1e6 / scored,
            1e6 / parsed
        );
        if let Some(f) = out.as_mut() {
            let line = serde_json::json!({
                "bench": "spam", "message": name, "bytes": msg.len(), "score": score,
                "msgs_per_s": scored, "us_per_msg": 1e6 / scored,
                "parse_us_per_msg": 1e6 / parsed, "seconds": secs,
            });
            writeln!(f, "{line}").expect("write OUT");
        }
    }
}
