//! Delivery to the recipients' MX hosts.
