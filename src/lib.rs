//! herald: an outbound SMTP relay for applications.
//!
//! The mail path, one module per stage: [`receive`] (SMTP submission) →
//! [`policy`] → [`queue`] (durable spool, scheduler) → [`deliver`] (MX
//! delivery) → [`report`] (events, and the [`suppression`] list they
//! feed). [`config`], [`dns`] and [`reply`] serve them all; [`admin`] is the
//! postmaster's HTTP API, metrics and CLI.

pub mod admin;
pub mod bounces;
pub mod clock;
pub mod config;
pub mod control;
pub mod deliver;
pub mod diagnose;
pub mod dns;
pub mod envelope;
pub mod event;
pub mod loadgen;
pub mod metrics;
pub mod net;
pub mod policy;
pub mod queue;
pub mod ratelimit;
pub mod receive;
pub mod reply;
pub mod report;
pub mod server;
pub mod suppression;
pub mod tls;
pub mod verp;
