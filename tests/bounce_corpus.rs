//! herald's bounce reading measured on real reports from public corpora
//! (`tests/fixtures/bounces/corpus/`, sources and licences in its
//! `SOURCES.md`, one hand-checked label per message and recipient in
//! `labels.toml`): detection, recipients, status, permanence and — what
//! matters most — which addresses would be suppressed.
//!
//! Run `cargo test --test bounce_corpus -- --nocapture` to see the figures
//! and every miss.

use std::collections::BTreeMap;
use std::path::Path;

use herald::bounces::{self, Action, Report};
use herald::deliver::classify::Classifier;
use herald::event::Reason;
use serde::Deserialize;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bounces/corpus");

#[derive(Deserialize)]
struct Labels {
    message: Vec<Labelled>,
}

#[derive(Deserialize)]
struct Labelled {
    file: String,
    source: String,
    kind: String,
    #[serde(default)]
    recipient: Vec<LabelledRecipient>,
}

#[derive(Deserialize)]
struct LabelledRecipient {
    address: String,
    status: String,
    #[allow(dead_code)]
    code: u16,
    permanent: bool,
    reason: String,
    suppress: bool,
}

/// A count of hits out of a total.
#[derive(Default, Clone, Copy)]
struct Ratio {
    hit: usize,
    of: usize,
}

impl Ratio {
    fn add(&mut self, hit: bool) {
        self.of += 1;
        self.hit += usize::from(hit);
    }

    fn value(self) -> f64 {
        if self.of == 0 {
            1.0
        } else {
            self.hit as f64 / self.of as f64
        }
    }
}

impl std::fmt::Display for Ratio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:>4}/{:<4} {:>6.1} %",
            self.hit,
            self.of,
            self.value() * 100.0
        )
    }
}

#[derive(Default)]
struct Figures {
    detected: Ratio,
    complaints: Ratio,
    false_positives: Ratio,
    found: Ratio,
    invented: Ratio,
    status_exact: Ratio,
    permanence: Ratio,
    reason: Ratio,
    /// Of the recipients herald would suppress, those whose label says so.
    precision: Ratio,
    /// Of the labelled unknown users, those herald would suppress.
    recall: Ratio,
    misses: BTreeMap<&'static str, Vec<String>>,
}

impl Figures {
    fn miss(&mut self, what: &'static str, line: String) {
        self.misses.entry(what).or_default().push(line);
    }
}

fn measure(labels: &Labels, source: Option<&str>) -> Figures {
    let classifier = Classifier::default();
    let mut f = Figures::default();
    for m in labels
        .message
        .iter()
        .filter(|m| source.is_none_or(|s| s == m.source))
    {
        let bytes = std::fs::read(Path::new(DIR).join(&m.file))
            .unwrap_or_else(|e| panic!("{}: {e}", m.file));
        let report = bounces::parse(&bytes);
        match (m.kind.as_str(), &report) {
            ("none", r) => {
                f.false_positives.add(r.is_some());
                if r.is_some() {
                    f.miss("false positive", m.file.clone());
                }
                continue;
            }
            ("complaint", r) => {
                let ok = matches!(r, Some(Report::Complaint(_)));
                f.complaints.add(ok);
                if !ok {
                    f.miss("complaint not read", m.file.clone());
                }
                continue;
            }
            (_, Some(Report::Bounce(_))) => f.detected.add(true),
            (_, _) => {
                f.detected.add(false);
                f.miss("not detected", m.file.clone());
            }
        }
        let Some(Report::Bounce(b)) = &report else {
            for r in &m.recipient {
                f.found.add(false);
                if r.suppress {
                    f.recall.add(false);
                }
            }
            continue;
        };
        let relevant: Vec<_> = b
            .recipients
            .iter()
            .filter(|r| matches!(r.action, Action::Failed | Action::Delayed))
            .collect();
        let named = |r: &bounces::BouncedRecipient, addr: &str| {
            [&r.final_recipient, &r.original_recipient]
                .iter()
                .any(|a| a.as_deref().is_some_and(|a| a.eq_ignore_ascii_case(addr)))
        };
        // A recipient without an address invents none: the VERP token says
        // whom the report is about.
        for r in relevant
            .iter()
            .filter(|r| r.final_recipient.is_some() || r.original_recipient.is_some())
        {
            let known = m.recipient.iter().any(|l| named(r, &l.address));
            f.invented.add(!known);
            if !known {
                f.miss(
                    "invented recipient",
                    format!("{}: {:?}", m.file, r.final_recipient),
                );
            }
        }
        for l in &m.recipient {
            let found = relevant.iter().any(|r| named(r, &l.address));
            f.found.add(found);
            if !found {
                f.miss("recipient not found", format!("{}: {}", m.file, l.address));
            }
            // What the bounce listener would record for this recipient.
            let about = b.about(&l.address);
            let verdict = about.map(|r| r.outcome(&classifier));
            let permanent = verdict.is_some_and(|v| v.permanent);
            let suppress = verdict.is_some_and(|v| v.suppresses());
            let status = about
                .and_then(|r| r.status.filter(|_| !r.status_derived))
                .map(|s| s.to_string())
                .unwrap_or_default();
            let diag = about.and_then(|r| r.diagnostic.clone()).unwrap_or_default();
            let got_reason = verdict.map_or("-", |v| v.reason.as_str());
            let line = format!(
                "{}: {} [{} {} {}{}] got [{} {} {}{}] {:.160}",
                m.file,
                l.address,
                l.status,
                l.reason,
                if l.permanent { "P" } else { "T" },
                if l.suppress { "S" } else { "-" },
                status,
                got_reason,
                if permanent { "P" } else { "T" },
                if suppress { "S" } else { "-" },
                diag
            );
            if !l.status.is_empty() {
                f.status_exact.add(status == l.status);
                if status != l.status {
                    f.miss("status", line.clone());
                }
            }
            f.permanence.add(permanent == l.permanent);
            if permanent != l.permanent {
                f.miss("permanence", line.clone());
            }
            assert!(
                Reason::parse(&l.reason).is_some(),
                "{}: unknown reason {}",
                m.file,
                l.reason
            );
            f.reason.add(got_reason == l.reason);
            if got_reason != l.reason {
                f.miss("reason", line.clone());
            }
            if suppress {
                f.precision.add(l.suppress);
                if !l.suppress {
                    f.miss("WRONGLY SUPPRESSED", line.clone());
                }
            }
            if l.suppress && l.reason == "user_unknown" {
                f.recall.add(suppress);
                if !suppress {
                    f.miss("unknown user not suppressed", line);
                }
            }
        }
    }
    f
}

fn print(name: &str, f: &Figures) {
    println!("== {name}");
    println!("  bounces detected         {}", f.detected);
    println!("  complaints read          {}", f.complaints);
    println!("  non-bounces taken        {}", f.false_positives);
    println!("  failed recipients found  {}", f.found);
    println!("  recipients invented      {}", f.invented);
    println!("  status exact             {}", f.status_exact);
    println!("  temporary/permanent      {}", f.permanence);
    println!("  reason as labelled       {}", f.reason);
    println!("  suppression precision    {}", f.precision);
    println!("  unknown-user recall      {}", f.recall);
}

#[test]
fn real_world_bounces() {
    let text = std::fs::read_to_string(Path::new(DIR).join("labels.toml")).unwrap();
    let labels: Labels = toml::from_str(&text).unwrap();
    let mut sources: Vec<&str> = labels.message.iter().map(|m| m.source.as_str()).collect();
    sources.sort();
    sources.dedup();
    for s in &sources {
        print(s, &measure(&labels, Some(s)));
    }
    let all = measure(&labels, None);
    print("all", &all);
    for (what, lines) in &all.misses {
        println!("-- {what} ({})", lines.len());
        for l in lines {
            println!("   {l}");
        }
    }
    assert!(labels.message.len() >= 100, "corpus too small");
    // The targets: what a relay that suppresses addresses must read.
    assert!(all.detected.value() >= 0.98, "detection {}", all.detected);
    assert_eq!(all.false_positives.hit, 0, "non-bounces taken");
    assert!(
        all.complaints.value() >= 0.98,
        "complaints {}",
        all.complaints
    );
    assert!(all.found.value() >= 0.97, "recipients {}", all.found);
    assert_eq!(all.invented.hit, 0, "recipients invented");
    assert!(
        all.status_exact.value() >= 0.95,
        "status {}",
        all.status_exact
    );
    assert!(
        all.permanence.value() >= 0.98,
        "permanence {}",
        all.permanence
    );
    assert!(
        all.precision.value() >= 0.995,
        "precision {}",
        all.precision
    );
    assert!(all.recall.value() >= 0.90, "recall {}", all.recall);
}

/// `[[classification.rules]]` decide for late reports as for replies at
/// delivery: a postmaster who knows that a provider's "Address rejected"
/// means a missing mailbox says so, and that corpus report then
/// suppresses; by default it does not.
#[test]
fn configured_rules_decide_for_corpus_reports() {
    let config = herald::config::Config::from_toml_str(
        "[[listener]]\naddress = \"127.0.0.1:2587\"\n\
         [[classification.rules]]\nmatch = \"address rejected\"\nstatus = \"5.1\"\nreason = \"user_unknown\"\n",
    )
    .unwrap();
    let configured = Classifier::new(&config.classification);
    let bytes = std::fs::read(Path::new(DIR).join("sisimai/email-gsuite-01.eml")).unwrap();
    let Some(Report::Bounce(b)) = bounces::parse(&bytes) else {
        panic!("not read as a bounce");
    };
    let r = b.about("kijitora@example.de").expect("a recipient block");
    let default = r.outcome(&Classifier::default());
    assert_eq!(default.reason, Reason::Policy);
    assert!(!default.suppresses());
    let v = r.outcome(&configured);
    assert_eq!(v.reason, Reason::UserUnknown);
    assert!(v.suppresses());
}
