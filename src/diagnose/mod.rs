//! Diagnostics for the postmaster and the app's support team: offline tools
//! that look at something outside herald and say, in plain words, what is
//! wrong with it and how to fix it.
//!
//! * [`smtp_test`]: `herald smtp-test`, a step-by-step check of an SMTP
//!   server a tenant wants to send through (DNS, TCP, banner, EHLO, TLS,
//!   AUTH, MAIL FROM), for "my SMTP settings fail".
//! * [`domain_check`]: `herald domain check`, a sending domain's MX, SPF,
//!   DKIM, DMARC, MTA-STS and TLS-RPT records, each with the fix.
//! * [`tls_check`]: `herald tls check`, which TLS policy applies to a
//!   destination domain (config line, DANE, MTA-STS) and what each MX host
//!   presents, judged as delivery judges it ([`tls_probe`], [`certinfo`]).
//!
//! They explain what they find with the delivery stage's own table of known
//! replies and certificate problems (`deliver::explain`, `deliver::cert`),
//! so a smarthost's deferral and `smtp-test` say the same thing.
//!
//! What they trust: nothing the remote server says; its replies are shown as
//! data and matched against the table, never interpreted further. Secrets
//! (the tenant's SMTP password) are held in [`crate::config::Secret`] and
//! never printed, logged or put in a report.

pub mod certinfo;
pub mod domain_check;
pub mod domain_tls;
pub mod password;
pub mod smtp_test;
pub mod tls_check;
pub mod tls_probe;
