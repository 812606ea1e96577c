//! `bounce_parser`: [`herald::bounces::parse`] on arbitrary messages — RFC
//! 3464 DSNs, ARF complaints (RFC 5965) and the plain-text bounces it
//! recognises all go through this one entry point; the DSN and ARF field
//! readers have none of their own. What a report yields is then used as the
//! inbound path uses it: classified, and its addresses read as VERP tokens.

use std::sync::OnceLock;

use herald::bounces::{self, Report};
use herald::verp::Verp;

fn verp() -> &'static Verp {
    static VERP: OnceLock<Verp> = OnceLock::new();
    VERP.get_or_init(|| Verp::new("bounces.relay.test", b"fuzz-verp-secret-0123"))
}

pub fn run(data: &[u8]) {
    let Some(report) = bounces::parse(data) else {
        return;
    };
    match &report {
        Report::Bounce(b) => {
            assert!(
                b.recipients.len() <= 1000,
                "{} recipients",
                b.recipients.len()
            );
            let _ = b.failed().count();
            for r in &b.recipients {
                let _ = r.classify(&herald::deliver::Classifier::default());
                for addr in [&r.final_recipient, &r.original_recipient]
                    .into_iter()
                    .flatten()
                {
                    let _ = verp().decode(addr);
                }
                if let Some(s) = r.status {
                    assert!(matches!(s.0, 2 | 4 | 5), "status {s}");
                }
            }
        }
        Report::Complaint(c) => {
            for addr in [&c.original_mail_from, &c.original_rcpt_to]
                .into_iter()
                .flatten()
            {
                let _ = verp().decode(addr);
            }
        }
    }
    // A second parse of the same bytes reads the same report.
    assert_eq!(bounces::parse(data).as_ref(), Some(&report));
}
