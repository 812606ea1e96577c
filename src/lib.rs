//! herald: an outbound SMTP relay for applications.
//!
//! The mail path, one module per stage: [`receive`] (SMTP submission) →
//! [`policy`] → [`queue`] (durable spool, scheduler) → [`deliver`] (MX
//! delivery) → [`report`] (events). [`config`], [`dns`] and [`reply`] serve
//! them all; [`admin`] is the postmaster's HTTP API, metrics and CLI.

pub mod admin;
pub mod config;
pub mod deliver;
pub mod dns;
pub mod loadgen;
pub mod policy;
pub mod queue;
pub mod receive;
pub mod reply;
pub mod report;
pub mod server;
pub mod tls;
