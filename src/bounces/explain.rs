//! `herald bounce parse FILE [--json]`: what herald reads from a bounce or
//! complaint, recipient by recipient, and whether it would suppress the
//! address. The tool support staff use when a customer asks "why is this
//! address blocked?": it runs the same parser and classifier as the bounce
//! listener.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde::Serialize;

use super::{Action, BounceFormat, BouncedRecipient, Report};
use crate::config::Config;
use crate::deliver::classify::Classifier;

#[derive(Debug, clap::Subcommand)]
pub enum BounceCommand {
    /// Read a bounce or complaint (a whole message, as received; `-` for
    /// standard input) and print what herald reads from it: layout,
    /// recipients, status, reply, reason, and whether each address would be
    /// suppressed.
    Parse {
        file: PathBuf,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// What herald reads from one message.
#[derive(Debug, Serialize)]
pub struct Reading {
    /// `bounce`, `complaint` or `none` (not a report: an auto-reply, a
    /// person's reply, a read receipt...).
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reporting_mta: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_message_id: Option<String>,
    pub recipients: Vec<RecipientReading>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub complaint: Option<ComplaintReading>,
}

#[derive(Debug, Serialize)]
pub struct RecipientReading {
    pub address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_recipient: Option<String>,
    pub action: &'static str,
    /// The enhanced status code; `status_derived` when herald derived it
    /// from the text because the report gave none.
    pub status: Option<String>,
    pub status_derived: bool,
    /// The basic reply code, `null` when the report gave none.
    pub code: Option<u16>,
    pub diagnostic: Option<String>,
    pub remote_mta: Option<String>,
    pub reason: &'static str,
    pub reason_text: &'static str,
    pub classification: crate::event::Classification,
    pub permanent: bool,
    /// Whether the bounce listener would put the address on the
    /// suppression list.
    pub would_suppress: bool,
}

#[derive(Debug, Serialize)]
pub struct ComplaintReading {
    pub feedback_type: String,
    pub recipient: Option<String>,
    pub user_agent: Option<String>,
    pub would_suppress: bool,
}

pub fn format_name(f: BounceFormat) -> &'static str {
    match f {
        BounceFormat::Rfc3464 => "rfc3464",
        BounceFormat::Exim => "exim",
        BounceFormat::Qmail => "qmail",
        BounceFormat::Postfix => "postfix",
        BounceFormat::Sendmail => "sendmail",
        BounceFormat::Exchange => "exchange",
        BounceFormat::Yahoo => "yahoo",
        BounceFormat::Gmail => "gmail",
        BounceFormat::Unknown => "unknown",
    }
}

fn action_name(a: Action) -> &'static str {
    match a {
        Action::Failed => "failed",
        Action::Delayed => "delayed",
        Action::Delivered => "delivered",
        Action::Relayed => "relayed",
        Action::Expanded => "expanded",
    }
}

fn recipient(r: &BouncedRecipient, classifier: &Classifier) -> RecipientReading {
    let v = r.outcome(classifier);
    let failed = r.action == Action::Failed;
    RecipientReading {
        address: r.final_recipient.clone(),
        original_recipient: r.original_recipient.clone(),
        action: action_name(r.action),
        status: r.status.map(|s| s.to_string()),
        status_derived: r.status_derived,
        code: r.smtp_code,
        diagnostic: r.diagnostic.clone(),
        remote_mta: r.remote_mta.clone(),
        reason: v.reason.as_str(),
        reason_text: v.reason.describe(),
        classification: v.classification(),
        permanent: v.permanent,
        would_suppress: failed && v.suppresses(),
    }
}

/// Reads `message` as the bounce listener does.
pub fn read(message: &[u8], classifier: &Classifier) -> Reading {
    let mut reading = Reading {
        kind: "none",
        format: None,
        reporting_mta: None,
        original_message_id: None,
        recipients: Vec::new(),
        complaint: None,
    };
    match super::parse(message) {
        None => {}
        Some(Report::Bounce(b)) => {
            reading.kind = "bounce";
            reading.format = Some(format_name(b.format));
            reading.reporting_mta = b.reporting_mta.clone();
            reading.original_message_id = b.original_message_id.clone();
            reading.recipients = b
                .recipients
                .iter()
                .map(|r| recipient(r, classifier))
                .collect();
        }
        Some(Report::Complaint(c)) => {
            reading.kind = "complaint";
            reading.format = Some("arf");
            reading.original_message_id = c.original_message_id.clone();
            reading.complaint = Some(ComplaintReading {
                feedback_type: c.feedback_type.clone(),
                recipient: c
                    .original_rcpt_to
                    .clone()
                    .or_else(|| c.original_recipient_header.clone()),
                user_agent: c.user_agent.clone(),
                would_suppress: true,
            });
        }
    }
    reading
}

impl std::fmt::Display for Reading {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut out = String::new();
        match self.kind {
            "none" => out.push_str(
                "not a bounce or complaint (an auto-reply, a person's reply, a read receipt or other mail): herald drops it and records nothing\n",
            ),
            kind => {
                let _ = writeln!(out, "{kind} ({})", self.format.unwrap_or("-"));
            }
        }
        if let Some(m) = &self.reporting_mta {
            let _ = writeln!(out, "reporting MTA: {m}");
        }
        if let Some(m) = &self.original_message_id {
            let _ = writeln!(out, "original Message-ID: {m}");
        }
        if self.kind == "bounce" && self.recipients.is_empty() {
            out.push_str("no recipient could be read: herald records nothing\n");
        }
        for r in &self.recipients {
            let _ = writeln!(
                out,
                "\nrecipient: {}",
                r.address
                    .as_deref()
                    .unwrap_or("(not named; the VERP address tells)")
            );
            let _ = writeln!(out, "  action: {}", r.action);
            let status = match (&r.status, r.status_derived) {
                (Some(s), true) => format!("{s} (derived from the text)"),
                (Some(s), false) => s.clone(),
                (None, _) => "-".into(),
            };
            let _ = writeln!(out, "  status: {status}");
            let code = r.code.map_or("-".into(), |c| c.to_string());
            let _ = writeln!(out, "  reply code: {code}");
            if let Some(d) = &r.diagnostic {
                let _ = writeln!(out, "  reply: {d}");
            }
            if let Some(m) = &r.remote_mta {
                let _ = writeln!(out, "  remote MTA: {m}");
            }
            let _ = writeln!(out, "  reason: {} ({})", r.reason, r.reason_text);
            let _ = writeln!(
                out,
                "  {}",
                if r.permanent {
                    "permanent"
                } else {
                    "temporary"
                }
            );
            let _ = writeln!(
                out,
                "  would suppress: {}",
                if r.would_suppress { "yes" } else { "no" }
            );
        }
        if let Some(c) = &self.complaint {
            let _ = writeln!(out, "feedback type: {}", c.feedback_type);
            let _ = writeln!(
                out,
                "recipient: {}",
                c.recipient
                    .as_deref()
                    .unwrap_or("(not named; the VERP address tells)")
            );
            let _ = writeln!(out, "would suppress: yes (a complaint)");
        }
        f.write_str(out.trim_end())
    }
}

/// Runs `herald bounce ...`. The config's `[classification]` rules apply
/// when the config file exists; without one, the built-in rules.
pub fn cli(config_path: &Path, command: BounceCommand) -> ExitCode {
    let BounceCommand::Parse { file, json } = command;
    let classifier = if config_path.exists() {
        match Config::load_or_print(config_path) {
            Some(c) => Classifier::new(&c.classification),
            None => return ExitCode::from(2),
        }
    } else {
        Classifier::default()
    };
    let bytes = if file.as_os_str() == "-" {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut b).map(|_| b)
    } else {
        std::fs::read(&file)
    };
    let bytes = match bytes {
        Ok(b) => b,
        Err(e) => {
            eprintln!("herald bounce parse: cannot read {}: {e}", file.display());
            return ExitCode::from(2);
        }
    };
    let reading = read(&bytes, &classifier);
    if json {
        match serde_json::to_string_pretty(&reading) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("herald bounce parse: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        println!("{reading}");
    }
    ExitCode::SUCCESS
}
