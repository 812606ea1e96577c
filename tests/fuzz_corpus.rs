//! The fuzz targets under `cargo test`: the same entry points as
//! `fuzz/fuzz_targets/` (this file includes `fuzz/src/lib.rs`), run over
//! (a) every committed seed and regression input and (b) proptest input
//! built from each target's alphabet: SMTP verbs and parameters, CRLF, dots,
//! NUL, umlauts and ß, base64, header and DSN field names.
//!
//! Each property test stops generating new cases after its own time budget,
//! so the file stays within seconds in a debug build.
//!
//! `cargo test --test fuzz_corpus -- --ignored write_seeds` rewrites the
//! generated seeds in `fuzz/seeds/` (SMTP sessions, delivery-client
//! scripts, spool segments from the current writer).

#[path = "../fuzz/src/lib.rs"]
mod fuzz;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config as ProptestConfig, RngAlgorithm, TestRng, TestRunner};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The files directly in `dirs` (relative to the repository), sorted.
fn files(dirs: &[&str]) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(root().join(dir)) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_file() {
                out.push((
                    path.clone(),
                    std::fs::read(&path).expect("read corpus file"),
                ));
            }
        }
    }
    out.sort();
    out
}

/// Seeds and regressions of `target`, and the other directories it is
/// fuzzed with.
fn corpus(target: &str, extra: &[&str]) -> Vec<(PathBuf, Vec<u8>)> {
    let seeds = format!("fuzz/seeds/{target}");
    let regressions = format!("fuzz/regressions/{target}");
    let mut dirs = vec![seeds.as_str(), regressions.as_str()];
    dirs.extend_from_slice(extra);
    files(&dirs)
}

/// Runs `f` on every input, naming the one that fails.
fn replay(inputs: &[(PathBuf, Vec<u8>)], f: fn(&[u8])) {
    for (path, data) in inputs {
        if catch_unwind(AssertUnwindSafe(|| f(data))).is_err() {
            panic!("{} fails (panic above)", path.display());
        }
    }
}

/// Runs `f` on inputs from `strategy` until `cases` ran or `budget` has
/// passed; a failing input is shrunk (within another `budget`) and reported.
/// The generator is seeded the same way every run, so a failure here is a
/// failure on every machine, not a flake; finding new inputs at random is
/// the fuzzer's job.
fn explore(budget: Duration, cases: u32, strategy: impl Strategy<Value = Vec<u8>>, f: fn(&[u8])) {
    let fails = |input: &[u8]| catch_unwind(AssertUnwindSafe(|| f(input))).is_err();
    let deadline = Instant::now() + budget;
    let mut runner = TestRunner::new_with_rng(
        ProptestConfig::default(),
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    for _ in 0..cases {
        if Instant::now() >= deadline {
            return;
        }
        let mut tree = strategy.new_tree(&mut runner).expect("strategy");
        if !fails(&tree.current()) {
            continue;
        }
        // Proptest's own shrinking walk: simplify while it still fails,
        // step back when it passes.
        let mut smallest = tree.current();
        let stop = Instant::now() + budget;
        if tree.simplify() {
            while Instant::now() < stop {
                let input = tree.current();
                if fails(&input) {
                    smallest = input;
                    if !tree.simplify() {
                        break;
                    }
                } else if !tree.complicate() {
                    break;
                }
            }
        }
        panic!(
            "fails on {} bytes: b\"{}\"",
            smallest.len(),
            smallest.escape_ascii()
        );
    }
}

/// A concatenation of 0..`max` tokens.
fn tokens(token: impl Strategy<Value = Vec<u8>>, max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(token, 0..max).prop_map(|t| t.concat())
}

/// One of `words` (most of the time) or a few arbitrary bytes.
fn token(words: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => prop::sample::select(words).prop_map(|w| w.as_bytes().to_vec()),
        1 => prop::collection::vec(any::<u8>(), 0..6),
    ]
}

/// `base` with `insert` put in at a point and a stretch cut out after it.
fn spliced(
    bases: Vec<Vec<u8>>,
    insert: impl Strategy<Value = Vec<u8>>,
) -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(bases),
        any::<prop::sample::Index>(),
        0usize..64,
        insert,
    )
        .prop_map(|(base, at, cut, insert)| {
            let at = at.index(base.len() + 1);
            let end = (at + cut).min(base.len());
            [&base[..at], &insert[..], &base[end..]].concat()
        })
}

const LINE_ENDS: &[&str] = &["\r\n", "\r\n", "\n", "\r", "\r\n.\r\n", ".", "\0"];

const SMTP_WORDS: &[&str] = &[
    "EHLO app.test\r\n",
    "HELO x\r\n",
    "MAIL FROM:<billing@acme.test>",
    "MAIL FROM:<>",
    "MAIL FROM:<j\u{fc}rgen@acme.test>",
    "RCPT TO:<bob@example.test>",
    "RCPT TO:<x@nullmx.test>",
    "RCPT TO:<x@nx.test>",
    "RCPT TO:<bounce@example.test>",
    "RCPT TO:<stra\u{df}e@ex\u{e4}mple.test>",
    " SIZE=100",
    " BODY=8BITMIME",
    " SMTPUTF8",
    " RET=FULL",
    " ENVID=a+2Bb",
    " NOTIFY=SUCCESS,FAILURE,DELAY",
    " ORCPT=rfc822;a@b.test",
    "DATA\r\n",
    "BDAT 5\r\n",
    "BDAT 0 LAST\r\n",
    "BDAT 12 LAST\r\n",
    "AUTH PLAIN ",
    "AUTH PLAIN AGFjbWUAZnV6ei1wYXNzd29yZA==\r\n",
    "AUTH LOGIN\r\n",
    "YWNtZQ==\r\n",
    "*\r\n",
    "STARTTLS\r\n",
    "RSET\r\n",
    "NOOP\r\n",
    "QUIT\r\n",
    "VRFY x\r\n",
    "HELP\r\n",
    "From: billing@acme.test\r\n",
    "Subject: \u{c4}pfel \u{df}\r\n",
    "Message-ID: <1@acme.test>\r\n",
    "\r\n",
    "\r\n",
    "\r\n.\r\n",
    "\n",
    "\r",
    ".",
    "\0",
    "\u{e4}",
    "\u{df}",
    " ",
    "<",
    ">",
    ":",
    "@",
];

/// A session that often opens a transaction first, so that the rest lands
/// in RCPT, DATA or the message.
fn smtp_session() -> impl Strategy<Value = Vec<u8>> {
    let opening = prop::sample::select(vec![
        "",
        "EHLO app.test\r\n",
        "EHLO app.test\r\nMAIL FROM:<billing@acme.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n",
        "EHLO app.test\r\nMAIL FROM:<billing@acme.test>\r\nRCPT TO:<bob@example.test>\r\n",
        "EHLO app.test\r\nAUTH PLAIN AGFjbWUAZnV6ei1wYXNzd29yZA==\r\nMAIL FROM:<billing@acme.test>\r\n",
    ]);
    (
        0u8..4,
        any::<(u8, u8)>(),
        opening,
        tokens(token(SMTP_WORDS), 40),
    )
        .prop_map(|(listener, (a, b), opening, rest)| {
            let mut v = fuzz::session::encode(listener, &[opening.as_bytes(), &rest].concat());
            v[1] = a;
            v[2] = b;
            v
        })
}

const MESSAGE_WORDS: &[&str] = &[
    "From: ",
    "To: ",
    "Subject: ",
    "Date: Thu, 01 Jan 1970 00:00:00 +0000",
    "Message-ID: <a@b>",
    "Return-Path: <>",
    "MAILER-DAEMON@mx.example.test",
    "Content-Type: ",
    "multipart/mixed; boundary=\"b\"",
    "multipart/report; report-type=delivery-status; boundary=\"b\"",
    "multipart/report; report-type=feedback-report; boundary=\"b\"",
    "message/delivery-status",
    "message/global-delivery-status",
    "message/feedback-report",
    "message/rfc822",
    "text/html",
    "application/zip; name=\"a.zip\"",
    "Content-Transfer-Encoding: base64",
    "Content-Disposition: attachment; filename=\"invoice.exe\"",
    "--b",
    "--b--",
    "Reporting-MTA: dns; mx.example.test",
    "Final-Recipient: rfc822; bob@example.test",
    "Original-Recipient: rfc822;",
    "Action: failed",
    "Action: delayed",
    "Status: 5.1.1",
    "Status: 4.2.2",
    "Diagnostic-Code: smtp; 550 5.1.1 user unknown",
    "Feedback-Type: abuse",
    "Original-Mail-From: <a@acme.test>",
    "Original-Rcpt-To: <b@example.test>",
    "Auto-Submitted: auto-replied",
    "<a href=\"http://bit.ly/x\">https://bank.example.test</a>",
    "http://192.0.2.1/login",
    "=?UTF-8?B?w4RwZmVs?=",
    "=?utf-8?q?Gr=C3=BC=C3=9Fe?=",
    "UEsFBgAAAAAAAAAAAAAAAAAAAAAAAA==",
    "PK\u{5}\u{6}",
    "PK\u{1}\u{2}",
    ": ",
    " ",
    "\t",
    "\u{e4}",
    "\u{df}",
];

fn message_token() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![4 => token(MESSAGE_WORDS), 2 => token(LINE_ENDS)]
}

/// Messages: the fixtures with alphabet spliced in, or alphabet alone.
fn message(fixtures: &[(PathBuf, Vec<u8>)]) -> impl Strategy<Value = Vec<u8>> {
    let bases: Vec<Vec<u8>> = fixtures.iter().map(|(_, d)| d.clone()).collect();
    prop_oneof![
        spliced(bases, tokens(message_token(), 8)),
        tokens(message_token(), 60),
    ]
}

const REPLY_WORDS: &[&str] = &[
    "220 mx.example.test ESMTP",
    "220-",
    "250-mx",
    "250-",
    "250 ",
    "235 2.7.0 ok",
    "334 VXNlcm5hbWU6",
    "334 ",
    "354 go ahead",
    "421 4.3.2 bye",
    "451 4.7.1 greylisted",
    "452 4.5.3 too many recipients",
    "503 5.5.1 bad sequence",
    "550 5.1.1 user unknown",
    "552 5.3.4 too big",
    "554 5.7.1 spam",
    "PIPELINING",
    "SIZE 1000",
    "SIZE",
    "AUTH PLAIN LOGIN",
    "AUTH=LOGIN",
    "8BITMIME",
    "SMTPUTF8",
    "DSN",
    "CHUNKING",
    "STARTTLS",
    "ENHANCEDSTATUSCODES",
    "5.1.1",
    "4.4.1",
    " ",
    "\u{e4}",
];

fn reply_script() -> impl Strategy<Value = Vec<u8>> {
    let opening = prop::sample::select(vec![
        "",
        "220 mx ESMTP\r\n",
        "220 mx ESMTP\r\n250-mx\r\n250-PIPELINING\r\n250 AUTH PLAIN LOGIN\r\n",
    ]);
    (
        any::<u8>(),
        opening,
        tokens(
            prop_oneof![3 => token(REPLY_WORDS), 2 => token(LINE_ENDS)],
            40,
        ),
    )
        .prop_map(|(flags, opening, rest)| [&[flags][..], opening.as_bytes(), &rest].concat())
}

const TOML_WORDS: &[&str] = &[
    "[server]\n",
    "[[listener]]\n",
    "[tls]\n",
    "[[tenant]]\n",
    "[dns]\n",
    "[delivery]\n",
    "[bounces]\n",
    "[limits]\n",
    "[policy.spam]\n",
    "[policy.dmarc]\n",
    "[[policy.dnsbl]]\n",
    "[[smarthost]]\n",
    "[[dkim]]\n",
    "hostname = \"relay.test\"\n",
    "address = \"127.0.0.1:2525\"\n",
    "address = \"[::1]:0\"\n",
    "tls = \"none\"\n",
    "auth = \"none\"\n",
    "trusted_networks = [\"10.0.0.0/8\"]\n",
    "max_message_size = \"25MiB\"\n",
    "command_timeout = \"5m\"\n",
    "retry = [\"1s\", \"2h\"]\n",
    "nameservers = [\"127.0.0.1:53\"]\n",
    "name = \"acme\"\n",
    "username = \"acme\"\n",
    "password_hash = \"$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$AAAAAAAAAAAAAAAAAAAAAA\"\n",
    "allowed_senders = [\"*@acme.test\"]\n",
    "weights = { link_mismatch = -1.5 }\n",
    "messages = \"100/h\"\n",
    "= ",
    "\"",
    "'''",
    "[",
    "]",
    "{",
    "}",
    ",",
    ".",
    "\n",
    "1e400",
    "-0",
    "18446744073709551616",
    "\u{e4}",
    "\u{df}",
    "\\u00e4",
];

fn toml_text() -> impl Strategy<Value = Vec<u8>> {
    let words = prop_oneof![
        6 => prop::sample::select(TOML_WORDS).prop_map(|w| w.as_bytes().to_vec()),
        1 => "[a-z_]{1,12}".prop_map(String::into_bytes),
    ];
    tokens(words, 40)
}

/// Segments from the current writer with bytes flipped, cut or appended.
fn segment(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(seeds),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        any::<prop::sample::Index>(),
        prop::collection::vec(any::<u8>(), 0..32),
    )
        .prop_map(|(mut seg, flips, cut, tail)| {
            for (at, x) in flips {
                if !seg.is_empty() {
                    let i = at.index(seg.len());
                    seg[i] ^= x;
                }
            }
            seg.truncate(cut.index(seg.len() + 1).max(8));
            seg.extend_from_slice(&tail);
            seg
        })
}

fn generated(seeds: Vec<(String, Vec<u8>)>) -> Vec<(PathBuf, Vec<u8>)> {
    seeds
        .into_iter()
        .map(|(name, data)| (PathBuf::from(format!("(generated) {name}")), data))
        .collect()
}

const MESSAGE_FIXTURES: &[&str] = &["tests/fixtures", "tests/fixtures/bounces"];

#[test]
fn smtp_session_corpus_and_properties() {
    replay(&corpus("smtp_session", &[]), fuzz::session::run);
    replay(&generated(fuzz::session::seeds()), fuzz::session::run);
    explore(
        Duration::from_secs(6),
        2000,
        smtp_session(),
        fuzz::session::run,
    );
}

#[test]
fn headers_and_spam_corpus_and_properties() {
    let inputs = corpus("headers_and_spam", MESSAGE_FIXTURES);
    replay(&inputs, fuzz::message::run);
    explore(
        Duration::from_secs(3),
        3000,
        message(&inputs),
        fuzz::message::run,
    );
}

#[test]
fn bounce_parser_corpus_and_properties() {
    let inputs = corpus("bounce_parser", MESSAGE_FIXTURES);
    replay(&inputs, fuzz::bounce::run);
    explore(
        Duration::from_secs(3),
        3000,
        message(&inputs),
        fuzz::bounce::run,
    );
}

#[test]
fn spool_replay_corpus_and_properties() {
    replay(&corpus("spool_replay", &[]), fuzz::spool::run);
    let seeds = generated(fuzz::spool::seeds());
    replay(&seeds, fuzz::spool::run);
    let segments = seeds.into_iter().map(|(_, d)| d).collect();
    explore(
        Duration::from_secs(2),
        1000,
        segment(segments),
        fuzz::spool::run,
    );
}

#[test]
fn smtp_reply_corpus_and_properties() {
    replay(&corpus("smtp_reply", &[]), fuzz::reply::run);
    replay(&generated(fuzz::reply::seeds()), fuzz::reply::run);
    explore(
        Duration::from_secs(3),
        2000,
        reply_script(),
        fuzz::reply::run,
    );
}

#[test]
fn config_load_corpus_and_properties() {
    replay(
        &corpus("config_load", &["config", "tests/bad_configs"]),
        fuzz::config::run,
    );
    explore(Duration::from_secs(2), 5000, toml_text(), fuzz::config::run);
}

/// Writes the generated seeds to `fuzz/seeds/<target>/`.
#[test]
#[ignore = "rewrites fuzz/seeds; run by hand after changing a generator"]
fn write_seeds() {
    let sets = [
        ("smtp_session", fuzz::session::seeds()),
        ("smtp_reply", fuzz::reply::seeds()),
        ("spool_replay", fuzz::spool::seeds()),
    ];
    for (target, seeds) in sets {
        let dir = root().join("fuzz/seeds").join(target);
        std::fs::create_dir_all(&dir).expect("create seed dir");
        for (name, data) in seeds {
            std::fs::write(dir.join(name), data).expect("write seed");
        }
    }
}
