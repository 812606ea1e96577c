//! DKIM verification of what herald sent, by mail-auth against the test DNS.

use std::net::SocketAddr;
use std::time::Duration;

use mail_auth::hickory_resolver::config::ResolverOpts;
use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator};

/// mail-auth's verifier, asking only the test DNS server at `dns`.
pub fn verifier(dns: SocketAddr) -> MessageAuthenticator {
    let mut opts = ResolverOpts::default();
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 1;
    MessageAuthenticator::new(super::dns::resolver_config(dns), opts).expect("verifier")
}

/// Every DKIM signature of `message`: (d=, s=, result).
pub async fn verify(
    auth: &MessageAuthenticator,
    message: &[u8],
) -> Vec<(String, String, DkimResult)> {
    let parsed = AuthenticatedMessage::parse(message).expect("message parses");
    auth.verify_dkim(&parsed)
        .await
        .into_iter()
        .map(|o| {
            let sig = o.signature().expect("a signature");
            (sig.d.clone(), sig.s.clone(), o.result().clone())
        })
        .collect()
}
