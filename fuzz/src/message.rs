//! `headers_and_spam`: what the receive stage reads from a message before
//! it queues it — the header block (`inspect_headers`, the fields herald
//! adds), the bare line-end check, and the spam rules with every rule on,
//! including the URL and ZIP directory readers behind them.

use std::sync::OnceLock;

use herald::policy::spam::{self, MAX_URL_DOMAINS, SpamConfig, SpamRules};
use herald::receive::message;

/// Most file names asked of [`spam::zip_names`].
const ZIP_NAMES: usize = 64;

fn rules() -> &'static SpamRules {
    static RULES: OnceLock<SpamRules> = OnceLock::new();
    RULES.get_or_init(|| SpamRules::new(&SpamConfig::default()))
}

pub fn run(data: &[u8]) {
    let info = message::inspect_headers(data);
    assert!(
        info.header_len <= data.len(),
        "header_len {} past the end of a {}-byte message",
        info.header_len,
        data.len()
    );
    if info.message_id.is_some() {
        assert!(info.has_message_id, "a Message-ID value without the field");
    }
    if let Some(at) = message::find_bare_line_end(data) {
        assert!(matches!(data.get(at), Some(b'\r' | b'\n')));
    }
    // What herald inserts into the header must never itself carry a bare
    // line end, whatever the message's own fields were.
    let (added, id) = message::missing_fields(
        &info,
        "0123456789ABCDEF0123",
        "relay.test",
        "Thu, 01 Jan 1970 00:00:00 +0000",
    );
    assert!(message::find_bare_line_end(&added).is_none(), "{added:?}");
    assert!(!id.is_empty());

    let report = rules().score(data);
    assert!(
        report.score.is_finite() && report.score >= 0.0,
        "score {}",
        report.score
    );
    assert!(report.url_domains.len() <= MAX_URL_DOMAINS);
    for d in &report.url_domains {
        assert!(
            !d.bytes().any(|b| b.is_ascii_uppercase()),
            "{d:?} not lower case"
        );
    }
    let _ = report.rules_summary();
    assert!(spam::url_domains(data).len() <= MAX_URL_DOMAINS);

    if let Some(names) = spam::zip_names(data, ZIP_NAMES) {
        assert!(names.len() <= ZIP_NAMES);
        assert!(names.iter().all(|n| n.len() <= data.len()));
    }
}
