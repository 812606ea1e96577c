//! Diagnostics for the postmaster and the app's support team: offline tools
//! that look at something outside herald and say, in plain words, what is
//! wrong with it and how to fix it.
//!
//! * [`smtp_test`]: `herald smtp-test`, a step-by-step check of an SMTP
//!   server a tenant wants to send through (DNS, TCP, banner, EHLO, TLS,
//!   AUTH, MAIL FROM), for "my SMTP settings fail".
//! * [`domain_check`]: `herald domain check`, a sending domain's MX, SPF,
//!   DKIM, DMARC, MTA-STS and TLS-RPT records, each with the fix.
//! * [`explain`]: the table of known server replies (Gmail, Microsoft 365,
//!   generic) and certificate problems → likely cause and fix.
//! * [`cert`]: certificate verification against the system's trust store
//!   that records the precise problem instead of just failing the handshake.
//!
//! What they trust: nothing the remote server says; its replies are shown as
//! data and matched against the table, never interpreted further. Secrets
//! (the tenant's SMTP password) are held in [`crate::config::Secret`] and
//! never printed, logged or put in a report.

pub mod cert;
pub mod domain_check;
pub mod explain;
pub mod password;
pub mod smtp_test;
