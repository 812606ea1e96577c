//! What a failed SMTP client session means, read once for everyone who
//! talks SMTP outward: direct delivery and smarthosts (the 4xx reply the
//! queue records and the class of the failure), `herald smtp-test` (the
//! cause and fix in plain words) and `herald loadgen` (one line per kind of
//! failure).
//!
//! The advice is worded for the command line (`--starttls`, `--tls`);
//! smarthosts translate it to their config keys.

use super::classify::Classifier;
use super::client::{ClientError, Stage};
use super::explain::{Advice, Step, explain_reply};
use crate::event::Reason;
use crate::reply::{Enhanced, Reply};

/// A session that failed before (or outside) a transaction's replies.
#[derive(Clone, Debug)]
pub struct SessionFailure {
    /// The transient enhanced status code herald records (RFC 3463: 4.4.1
    /// no answer, 4.4.2 bad connection, 4.5.0 protocol, 4.7.5 cryptographic
    /// failure; a refusal keeps the server's subject and detail).
    pub enhanced: Enhanced,
    /// What happened, naming the server: `Connection to mx [192.0.2.1]:25
    /// refused`.
    pub what: String,
    /// The server's own reply, when it refused a step.
    pub reply: Option<Reply>,
    pub class: Reason,
    /// Whether another address of the same destination may fare better: a
    /// dead address may, a TLS or login problem will not.
    pub try_next: bool,
    /// The likely cause and what to do, in plain words.
    pub advice: Advice,
}

impl SessionFailure {
    /// Reads `e`; `at` names the server (`mx.example [192.0.2.1]:25`) and
    /// `port` is the port connected to, which the advice may name.
    pub fn of(classifier: &Classifier, e: &ClientError, at: &str, port: u16) -> SessionFailure {
        let classify = |r: &Reply| classifier.classify(r).reason;
        use Reason::{Network, Other, Policy, Tls};
        let f = |enhanced, what: String, class, try_next| SessionFailure {
            enhanced,
            what,
            reply: None,
            class,
            try_next,
            advice: advice(e, port),
        };
        match e {
            ClientError::Refused => f(
                Enhanced(4, 4, 1),
                format!("Connection to {at} refused"),
                Network,
                true,
            ),
            ClientError::Connect(err) => f(
                Enhanced(4, 4, 1),
                format!("Connection to {at} failed: {err}"),
                Network,
                true,
            ),
            ClientError::Timeout(Stage::Connect) => f(
                Enhanced(4, 4, 1),
                format!("Connection to {at} timed out"),
                Network,
                true,
            ),
            ClientError::Timeout(Stage::TlsHandshake) => f(
                Enhanced(4, 7, 5),
                format!("TLS handshake with {at} timed out"),
                Tls,
                false,
            ),
            ClientError::Timeout(stage) => f(
                Enhanced(4, 4, 2),
                format!("Connection to {at} timed out {stage}"),
                Network,
                true,
            ),
            ClientError::Closed(stage) => f(
                Enhanced(4, 4, 2),
                format!("Connection to {at} closed by the server {stage}"),
                Network,
                true,
            ),
            ClientError::Io { stage, source } => f(
                Enhanced(4, 4, 2),
                format!("Connection to {at} lost {stage}: {source}"),
                Network,
                true,
            ),
            ClientError::Tls(err) => f(
                Enhanced(4, 7, 5),
                format!("TLS handshake with {at} failed: {err}"),
                Tls,
                false,
            ),
            ClientError::Protocol { stage, what } => f(
                Enhanced(4, 5, 0),
                format!("{at} broke the SMTP protocol {stage}: {what}"),
                Network,
                true,
            ),
            ClientError::Rejected { stage, reply } => {
                // The refusal of the session is kept in the reply, and its
                // enhanced code (made transient) in ours: another host or a
                // later try is the answer to a refused greeting or EHLO.
                let enh = reply.enhanced_or_default();
                let (what, class, try_next) = match stage {
                    Stage::Greeting => ("refused the session", classify(reply), true),
                    Stage::Ehlo | Stage::Helo => ("refused EHLO and HELO", classify(reply), true),
                    Stage::StartTls => ("refused STARTTLS", Tls, false),
                    Stage::Auth => ("refused AUTH", Policy, false),
                    _ => ("refused", classify(reply), true),
                };
                SessionFailure {
                    enhanced: Enhanced(4, enh.1, enh.2),
                    what: format!("{at} {what}"),
                    reply: Some(reply.clone()),
                    class,
                    try_next,
                    advice: advice(e, port),
                }
            }
            ClientError::NoStartTls => f(
                Enhanced(4, 7, 10),
                format!("{at} does not offer STARTTLS"),
                Tls,
                false,
            ),
            ClientError::NoAuthMechanism => f(
                Enhanced(4, 7, 8),
                format!("{at} offers no AUTH PLAIN or LOGIN"),
                Policy,
                false,
            ),
            ClientError::InvalidArgument(_) | ClientError::NotUsable => f(
                Enhanced(4, 3, 0),
                format!("Local error talking to {at}: {e}"),
                Other,
                false,
            ),
        }
    }

    /// What happened and the server's reply, on one line.
    pub fn text(&self) -> String {
        match &self.reply {
            Some(r) => format!("{}: {}", self.what, one_line(r)),
            None => self.what.clone(),
        }
    }

    /// The 451 reply the queue records for the attempt.
    pub fn deferral(&self) -> Reply {
        Reply::new(451, self.enhanced, self.text())
    }
}

fn one_line(r: &Reply) -> String {
    r.to_string().replace(['\r', '\n'], " ")
}

/// The step of `herald smtp-test` a session stage belongs to.
pub fn step_of(stage: Stage) -> Step {
    match stage {
        Stage::Connect => Step::Connect,
        Stage::Greeting => Step::Banner,
        Stage::Ehlo | Stage::Helo | Stage::Rset | Stage::Quit => Step::Ehlo,
        Stage::StartTls | Stage::TlsHandshake => Step::Tls,
        Stage::Auth => Step::Auth,
        Stage::Mail | Stage::Rcpt | Stage::Data | Stage::Body | Stage::DataEnd => Step::MailFrom,
    }
}

/// The likely cause of `e` and its fix. `port` is the port connected to.
pub fn advice(e: &ClientError, port: u16) -> Advice {
    match e {
        ClientError::Timeout(Stage::Connect) => Advice::new(
            format!("outbound connections to port {port} are probably blocked by a firewall"),
            if port == 25 {
                "many cloud providers block 25; try 587 or 465, or ask the network admin to allow outbound connections to port 25".to_string()
            } else {
                format!(
                    "try 587 or 465 (the provider's submission ports), or ask the network admin to allow outbound connections to port {port}"
                )
            },
        ),
        ClientError::Refused => Advice::new(
            "nothing listens on that port; check the port number",
            "submission is usually 587 (with --starttls) or 465 (with --tls); check the provider's documentation",
        ),
        ClientError::Connect(_) => Advice::new(
            "this machine has no route to the server",
            "check this machine's network connection (and IPv6 connectivity if only IPv6 failed)",
        ),
        ClientError::Tls(_) | ClientError::Timeout(Stage::TlsHandshake) => tls_advice(e),
        ClientError::Timeout(Stage::Greeting) => Advice::new(
            "the server took the connection but sent no greeting: it is overloaded, a firewall or proxy holds the connection, or the port waits for a TLS handshake (implicit TLS)",
            "try again later; check the port number and the TLS mode with the provider",
        ),
        ClientError::Timeout(_) => Advice::new(
            "the server stopped answering",
            "try again later, or with a longer --timeout",
        ),
        ClientError::Closed(Stage::Greeting)
        | ClientError::Io {
            stage: Stage::Greeting,
            ..
        } => Advice::new(
            "the server drops connections from this client (a blocklisted address or a connection limit), or another service listens on this port",
            "check the port number; ask the provider whether this address is blocked",
        ),
        ClientError::Closed(_) | ClientError::Io { .. } => Advice::new(
            "the connection failed",
            "try again; if it persists, ask the provider",
        ),
        ClientError::Protocol {
            stage: Stage::Greeting,
            ..
        } => Advice::new(
            "something other than an SMTP server listens on this port",
            "check the port number: submission is usually 587 or 465",
        ),
        ClientError::Protocol { .. } => Advice::new(
            "the server broke the SMTP protocol",
            "try again; if it persists, ask the provider",
        ),
        ClientError::Rejected { stage, reply } => explain_reply(step_of(*stage), reply),
        ClientError::NoStartTls => Advice::new(
            "the server does not offer STARTTLS on this port, and herald sends neither passwords nor mail that must be encrypted in plaintext",
            "use --tls on port 465, or ask the provider which port offers STARTTLS (usually 587)",
        ),
        ClientError::NoAuthMechanism => Advice::new(
            "the server offers no password login herald can use (PLAIN or LOGIN)",
            "ask the provider to allow password logins (PLAIN or LOGIN) for SMTP; accounts limited to OAuth cannot be used with a password",
        ),
        ClientError::InvalidArgument(_) => Advice::new(
            "the value given cannot be sent",
            "check the value given on the command line",
        ),
        ClientError::NotUsable => {
            Advice::new("the session failed earlier and cannot be used", "try again")
        }
    }
}

/// A failed TLS handshake, read from rustls's error text.
fn tls_advice(e: &ClientError) -> Advice {
    let text = e.to_string();
    if text.contains("ProtocolVersion")
        || text.contains("protocol version")
        || text.contains("PeerIncompatible")
    {
        Advice::new(
            "the server only speaks an old TLS version (1.0 or 1.1) or ciphers herald refuses",
            "ask the provider to enable TLS 1.2 or 1.3",
        )
    } else if matches!(e, ClientError::Timeout(_)) {
        Advice::new(
            "the server did not take part in a TLS handshake",
            "check the TLS mode: --tls for port 465, --starttls for 587",
        )
    } else if text.contains("InvalidContentType") || text.contains("corrupt message") {
        Advice::new(
            "the server did not answer in TLS",
            "check the TLS mode: --tls for port 465, --starttls for 587",
        )
    } else {
        Advice::new(
            "the TLS handshake failed",
            "try the other TLS mode (--tls on 465, --starttls on 587); if it persists, ask the provider",
        )
    }
}

/// A key that counts failures of one kind together: no address, no
/// operating-system detail.
pub fn kind(e: &ClientError) -> String {
    match e {
        ClientError::Rejected { stage, reply } => match reply.enhanced {
            Some(en) => format!("{} {en} {stage}", reply.code),
            None => format!("{} {stage}", reply.code),
        },
        ClientError::Io { stage, .. } => format!("connection lost {stage}"),
        ClientError::Connect(err) => format!("cannot connect: {}", err.kind()),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AT: &str = "mx1.example.net [192.0.2.1]:25";

    #[test]
    fn network_failures_are_transient_and_name_the_server() {
        let f = SessionFailure::of(&Classifier::default(), &ClientError::Refused, AT, 25);
        assert_eq!(f.enhanced, Enhanced(4, 4, 1));
        assert_eq!(f.class, Reason::Network);
        assert!(f.try_next);
        assert_eq!(
            f.deferral().to_string(),
            "451 4.4.1 Connection to mx1.example.net [192.0.2.1]:25 refused"
        );
        let f = SessionFailure::of(
            &Classifier::default(),
            &ClientError::Timeout(Stage::Greeting),
            AT,
            25,
        );
        assert_eq!(f.enhanced, Enhanced(4, 4, 2));
        assert!(
            f.text().contains("timed out waiting for the greeting"),
            "{}",
            f.text()
        );
    }

    #[test]
    fn tls_failures_do_not_try_the_next_host() {
        for e in [
            ClientError::Tls("bad record".into()),
            ClientError::Timeout(Stage::TlsHandshake),
            ClientError::NoStartTls,
        ] {
            let f = SessionFailure::of(&Classifier::default(), &e, AT, 25);
            assert_eq!(f.class, Reason::Tls, "{e}");
            assert_eq!(f.enhanced.1, 7, "{e}");
            assert!(!f.try_next, "{e}");
        }
    }

    #[test]
    fn a_refusal_keeps_the_servers_reply_and_detail_made_transient() {
        let reply = Reply::from_wire(554, "5.7.1 go away");
        let e = ClientError::Rejected {
            stage: Stage::Greeting,
            reply,
        };
        let f = SessionFailure::of(&Classifier::default(), &e, AT, 25);
        assert_eq!(f.enhanced, Enhanced(4, 7, 1));
        assert!(
            f.text().ends_with("refused the session: 554 5.7.1 go away"),
            "{}",
            f.text()
        );
    }

    #[test]
    fn a_refused_login_is_explained_from_the_table() {
        let reply = Reply::from_wire(
            534,
            "5.7.9 Application-specific password required. For more information, go to https://support.google.com/mail/?p=InvalidSecondFactor",
        );
        let e = ClientError::Rejected {
            stage: Stage::Auth,
            reply,
        };
        let f = SessionFailure::of(&Classifier::default(), &e, AT, 587);
        assert_eq!(f.class, Reason::Policy);
        assert!(f.advice.cause.contains("app password"), "{:?}", f.advice);
    }

    #[test]
    fn the_firewall_advice_names_the_port() {
        let a = advice(&ClientError::Timeout(Stage::Connect), 587);
        assert!(a.cause.contains("port 587"), "{a:?}");
        let a = advice(&ClientError::Timeout(Stage::Connect), 25);
        assert!(a.fix.contains("block 25"), "{a:?}");
    }

    #[test]
    fn kinds_leave_out_operating_system_detail() {
        let e = ClientError::Io {
            stage: Stage::Body,
            source: std::io::Error::other("broken pipe (os error 32)"),
        };
        assert_eq!(kind(&e), "connection lost while sending the message");
    }
}
