//! The entry points of herald's fuzz targets, one module per target.
//!
//! Each `run` takes arbitrary bytes, feeds them to herald's public API the
//! way the network (or the disk, for the spool) would, and panics only when
//! herald misbehaves. The binaries in `fuzz_targets/` call these functions
//! under libFuzzer; `tests/fuzz_corpus.rs` includes this same file and calls
//! them under `cargo test` over the committed seeds and proptest input, so
//! the two cannot check different things.
//!
//! Seeds that are made rather than written by hand (SMTP sessions with their
//! input header, spool segments from the current writer) come from each
//! module's `seeds()`.

pub mod bounce;
pub mod config;
mod dns;
pub mod message;
pub mod reply;
pub mod session;
pub mod spool;

/// The lines of `text` split at CRLF, and what follows the last CRLF.
pub fn crlf_lines(text: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    let mut lines = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.windows(2).position(|w| w == b"\r\n") {
        lines.push(&rest[..i]);
        rest = &rest[i + 2..];
    }
    (lines, rest)
}
