//! Over-long line check and rewrite (`receive::longlines::fix_long_lines`),
//! on one thread: the common case (no long line: one pass that reads only
//! the ends of lines) on fixtures and generated messages, and the rewrites,
//! including hostile sizes (a 25 MiB single line, 100,000 parts).
//!
//! `cargo bench --bench longlines` (SECONDS=N per case, default 2; OUT=FILE
//! appends one JSON line per case; ONLY=TEXT runs the cases whose name
//! contains TEXT).

use std::io::Write;
use std::time::{Duration, Instant};

use herald::receive::longlines::fix_long_lines;

const HEAD: &str = "From: Billing <billing@acme.example>\r\nTo: <bob@example.net>\r\n\
    Subject: Invoice 1\r\nDate: Sun, 29 Nov 2026 10:00:00 +0000\r\n\
    Message-ID: <1@acme.example>\r\nMIME-Version: 1.0\r\n";

/// A text/html message of about `size` bytes in lines of about 80.
fn short_lines(size: usize) -> Vec<u8> {
    let mut m = format!("{HEAD}Content-Type: text/html; charset=utf-8\r\n\r\n");
    let mut n = 0;
    while m.len() < size {
        n += 1;
        m += &format!("<tr><td>Line {n}</td><td>1 x consulting</td><td>EUR 120.00</td></tr>\r\n");
    }
    m.into_bytes()
}

/// An HTML invoice whose table is one line of about `len` bytes, beside a
/// text part and a 60 KiB base64 attachment.
fn invoice(len: usize) -> Vec<u8> {
    let mut row = String::new();
    let mut n = 0;
    while row.len() < len {
        n += 1;
        row += &format!("<tr><td>Grünbäume GmbH, Straße {n}</td><td>EUR {n}.00</td></tr>");
    }
    let pdf = "JVBERi0xLjQKJeLjz9MK".repeat(4).repeat(800);
    let pdf: Vec<&str> = pdf
        .as_bytes()
        .chunks(76)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect();
    format!(
        "{HEAD}Content-Type: multipart/mixed; boundary=m\r\n\r\n--m\r\n\
         Content-Type: multipart/alternative; boundary=a\r\n\r\n\
         --a\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nInvoice 1\r\n\
         --a\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<table>{row}</table>\r\n--a--\r\n\
         --m\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n{}\r\n--m--\r\n",
        pdf.join("\r\n")
    )
    .into_bytes()
}

/// One line of `size` bytes repeating `unit`.
fn one_line(size: usize, unit: &str) -> Vec<u8> {
    let mut m = format!("{HEAD}Content-Type: text/plain; charset=utf-8\r\n\r\n").into_bytes();
    m.extend(unit.bytes().cycle().take(size));
    m.extend_from_slice(b"\r\n");
    m
}

fn many_parts(parts: usize, long_every: usize) -> Vec<u8> {
    let mut m = format!("{HEAD}Content-Type: multipart/mixed; boundary=b\r\n\r\n");
    for i in 0..parts {
        let body = if (i + 1) % long_every == 0 {
            "x".repeat(1200)
        } else {
            format!("part {i}")
        };
        m += &format!("--b\r\nContent-Type: text/plain\r\n\r\n{body}\r\n");
    }
    m += "--b--\r\n";
    m.into_bytes()
}

/// Calls per second of `f` over `d` (at least one call).
fn rate(d: Duration, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    while n == 0 || start.elapsed() < d {
        f();
        n += 1;
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
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "invoice-html-pdf.eml",
            include_bytes!("../tests/fixtures/invoice-html-pdf.eml").to_vec(),
        ),
        ("short lines 100 KiB", short_lines(100 << 10)),
        ("short lines 25 MiB", short_lines(25 << 20)),
        ("invoice, 2,000-byte HTML line", invoice(2000)),
        (
            "one line 25 MiB, HTML",
            one_line(25 << 20, "<td style=\"color:#222\">EUR 120.00</td>"),
        ),
        (
            "one line 25 MiB, half escaped",
            one_line(25 << 20, "Grüße = a b "),
        ),
        ("100,000 parts, last long", many_parts(100_000, 100_000)),
        ("20,000 parts, all long", many_parts(20_000, 1)),
    ];
    println!("| message | bytes | result | calls/s | ms per call | MB/s |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let only = std::env::var("ONLY").unwrap_or_default();
    for (name, msg) in cases.iter().filter(|(n, _)| n.contains(&only)) {
        let result = match fix_long_lines(msg) {
            Ok(None) => "unchanged".to_string(),
            Ok(Some(new)) => format!("rewritten, {} bytes", new.len()),
            Err(e) => format!("refused: {e}"),
        };
        let calls = rate(d, || {
            let _ = std::hint::black_box(fix_long_lines(std::hint::black_box(msg)));
        });
        let mb_s = calls * msg.len() as f64 / 1e6;
        println!(
            "| {name} | {} | {result} | {calls:.0} | {:.3} | {mb_s:.0} |",
            msg.len(),
            1e3 / calls
        );
        if let Some(f) = out.as_mut() {
            let line = serde_json::json!({
                "bench": "longlines", "message": name, "bytes": msg.len(), "result": result,
                "calls_per_s": calls, "ms_per_call": 1e3 / calls, "mb_per_s": mb_s,
                "seconds": secs,
            });
            writeln!(f, "{line}").expect("write OUT");
        }
    }
}
