//! Receiving: the submission SMTP server.

pub mod senders;
