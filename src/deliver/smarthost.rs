//! Smarthost routing: a tenant's mail, or a sender domain's, goes through
//! the customer's own SMTP provider with its credentials instead of
//! straight to the recipients' MX hosts.
//!
//! Config: `[[smarthost]]` tables ([`SmarthostConfig`]); a `[[tenant]]`
//! names one with `smarthost = "NAME"`, and a smarthost claims envelope
//! sender domains with `sender_domains` (the domain or any subdomain). The
//! most specific sender domain wins, then the tenant's setting; mail from
//! the null sender (herald's own bounce reports) always goes direct, since
//! a provider takes mail only from its account's addresses.
//!
//! The session: the host's A/AAAA records (never MX), implicit TLS
//! (RFC 8314) or STARTTLS (RFC 3207) — never plaintext, so neither the
//! password nor the mail can cross the network in clear — with the
//! certificate verified for the host name (the system's trust store, or
//! `ca_file`), EHLO, then AUTH PLAIN, or LOGIN when only that is offered
//! (RFC 4954, RFC 4616). The dispatcher keeps one pool per smarthost
//! (`smarthost:NAME`), so connection reuse and the per-destination
//! connection limit apply, and hands it every recipient of a message in one
//! transaction; VERP is not used (the provider wants the account's sender).
//!
//! Failures are explained with the same table as `herald smtp-test`
//! ([`crate::deliver::explain`]): the deferral's text names the smarthost,
//! its reply, the likely cause and the fix. Anything up to and including
//! AUTH defers (a wrong password is the postmaster's to fix; the mail waits
//! until the queue lifetime ends), a refused MAIL FROM follows its reply
//! code. The password lives in a [`Secret`]: it is sent only inside TLS and
//! never reaches a log line, an event or an error.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;

use super::client::{ClientError, SmtpClient, Timeouts, Tls};
use crate::config::Secret;
use crate::config::smarthost::load_roots;
pub use crate::config::smarthost::{SmarthostConfig, SmarthostTls};
use crate::deliver::cert::{CertOutcome, RecordingVerifier};
use crate::deliver::classify::Classifier;
use crate::deliver::explain::{Advice, Step, explain_certificate, explain_reply};
use crate::deliver::failure::SessionFailure;
use crate::dns::Dns;
use crate::envelope::Envelope;
use crate::event::Reason;
use crate::reply::{Enhanced, Reply};

/// How a smarthost's certificate is checked.
enum Trust {
    /// `verify_certificate = false`: encrypted, not authenticated.
    Any(Tls),
    /// Against these roots, for the host name.
    Roots(Arc<WebPkiServerVerifier>),
    /// Cannot be checked (no trust store, unreadable `ca_file`): nothing is
    /// sent until that is fixed.
    Unusable(Advice),
}

/// One configured smarthost, ready to connect.
pub struct Smarthost {
    pub name: String,
    pub host: String,
    pub port: u16,
    implicit: bool,
    username: String,
    password: Secret,
    provider: Arc<CryptoProvider>,
    trust: Trust,
    /// Labels the smarthost's refusals (`[classification]`).
    classifier: Classifier,
}

impl fmt::Debug for Smarthost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Smarthost")
            .field("name", &self.name)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("implicit", &self.implicit)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Which smarthost, if any, each message goes through.
#[derive(Debug, Default)]
pub struct Routes {
    hosts: Vec<Arc<Smarthost>>,
    by_tenant: HashMap<String, usize>,
    /// (lower-case domain, smarthost), longest domain first.
    by_domain: Vec<(String, usize)>,
}

impl Routes {
    /// From a validated config. The system's trust store is read once, and
    /// only when some smarthost needs it.
    pub fn new(config: &crate::config::Config) -> Routes {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut system: Option<Option<Arc<WebPkiServerVerifier>>> = None;
        let mut hosts = Vec::new();
        for s in &config.smarthosts {
            let trust = if !s.verify_certificate {
                Trust::Any(Tls::opportunistic())
            } else if let Some(path) = &s.ca_file {
                match load_roots(path).and_then(|roots| {
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| format!("{}: {e}", path.display()))
                }) {
                    Ok(v) => Trust::Roots(v),
                    Err(e) => Trust::Unusable(Advice::new(
                        format!("its ca_file cannot be used: {e}"),
                        format!("fix ca_file in [[smarthost]] {:?}", s.name),
                    )),
                }
            } else {
                let verifier = system
                    .get_or_insert_with(|| crate::deliver::cert::system_roots(&provider))
                    .clone();
                match verifier {
                    Some(v) => Trust::Roots(v),
                    None => Trust::Unusable(Advice::new(
                        "this machine has no trusted CA certificates to check the smarthost's certificate against",
                        format!(
                            "install the system's CA certificates (Debian: apt-get install ca-certificates), or set ca_file in [[smarthost]] {:?}",
                            s.name
                        ),
                    )),
                }
            };
            hosts.push(Arc::new(Smarthost {
                name: s.name.clone(),
                host: s.host.trim_end_matches('.').to_ascii_lowercase(),
                port: s.port,
                implicit: s.tls == SmarthostTls::Implicit,
                username: s.username.clone(),
                password: s.password.clone(),
                provider: provider.clone(),
                trust,
                classifier: Classifier::new(&config.classification),
            }));
        }
        let index = |name: &str| config.smarthosts.iter().position(|s| s.name == name);
        let by_tenant = config
            .tenants
            .iter()
            .filter_map(|t| Some((t.name.clone(), index(t.smarthost.as_deref()?)?)))
            .collect();
        let mut by_domain: Vec<(String, usize)> = config
            .smarthosts
            .iter()
            .enumerate()
            .flat_map(|(i, s)| {
                s.sender_domains
                    .iter()
                    .map(move |d| (d.trim_end_matches('.').to_ascii_lowercase(), i))
            })
            .collect();
        by_domain.sort_by_key(|(d, _)| std::cmp::Reverse(d.len()));
        Routes {
            hosts,
            by_tenant,
            by_domain,
        }
    }

    /// The smarthost a message goes through, or `None` for direct delivery.
    pub fn route(&self, envelope: &Envelope) -> Option<&Arc<Smarthost>> {
        if self.hosts.is_empty() || envelope.sender.is_empty() {
            return None;
        }
        let domain = envelope
            .sender
            .rsplit_once('@')
            .map(|(_, d)| d.trim_end_matches('.').to_ascii_lowercase());
        let by_domain = domain.as_deref().and_then(|domain| {
            self.by_domain.iter().find(|(d, _)| {
                domain == d
                    || domain
                        .strip_suffix(d.as_str())
                        .is_some_and(|rest| rest.ends_with('.'))
            })
        });
        let i = match by_domain {
            Some((_, i)) => *i,
            None => *self.by_tenant.get(envelope.tenant.as_deref()?)?,
        };
        self.hosts.get(i)
    }
}

/// Why a smarthost could not be used, and whether another of its
/// addresses may do better.
struct Failure {
    reply: Reply,
    class: Reason,
    try_next: bool,
}

impl Smarthost {
    /// Connects, secures the session, and logs in. The error is the 4xx
    /// deferral to record, with what to fix in its text.
    pub(super) async fn open(
        &self,
        dns: &Dns,
        helo: &str,
        timeouts: Timeouts,
        source: impl Fn(IpAddr) -> Option<IpAddr>,
    ) -> Result<SmtpClient, (Reply, Reason)> {
        if let Trust::Unusable(advice) = &self.trust {
            let text = self.explained(
                &format!("cannot check the certificate of smarthost {}", self.host),
                None,
                advice,
            );
            return Err((Reply::new(451, Enhanced(4, 7, 5), text), Reason::Tls));
        }
        let ips = match dns.ips(&self.host).await {
            Ok(ips) if !ips.is_empty() => ips,
            Ok(_) => {
                let text = self.explained(
                    &format!("smarthost {} has no address", self.host),
                    None,
                    &Advice::new(
                        "the host name does not resolve (no such name, or no A/AAAA record)",
                        format!(
                            "check host in [[smarthost]] {:?} against the provider's documentation (e.g. smtp.office365.com)",
                            self.name
                        ),
                    ),
                );
                return Err((Reply::new(451, Enhanced(4, 4, 4), text), Reason::Dns));
            }
            Err(e) => {
                return Err((
                    Reply::new(
                        451,
                        Enhanced(4, 4, 3),
                        format!("smarthost {}: {e}", self.host),
                    ),
                    Reason::Dns,
                ));
            }
        };
        let mut last = None;
        let mut tried = HashSet::new();
        for ip in ips {
            if ip.is_unspecified() || ip.is_multicast() || !tried.insert(ip) {
                continue;
            }
            let addr = SocketAddr::new(ip, self.port);
            match self.open_addr(addr, helo, timeouts, source(ip)).await {
                Ok(client) => return Ok(client),
                Err(f) => {
                    tracing::warn!(smarthost = %self.name, %addr, reply = %f.reply, "cannot use smarthost");
                    let next = f.try_next;
                    last = Some((f.reply, f.class));
                    if !next {
                        break;
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            (
                Reply::new(
                    451,
                    Enhanced(4, 4, 4),
                    format!("smarthost {} has no usable address", self.host),
                ),
                Reason::Network,
            )
        }))
    }

    async fn open_addr(
        &self,
        addr: SocketAddr,
        helo: &str,
        timeouts: Timeouts,
        source: Option<IpAddr>,
    ) -> Result<SmtpClient, Failure> {
        // A verifier per connection: it holds this handshake's certificate
        // problem, if any (smarthost connections are few and long-lived).
        let (tls, checked) = match &self.trust {
            Trust::Any(tls) => (tls.clone(), None),
            Trust::Roots(v) => {
                let checked = RecordingVerifier::strict(self.provider.clone(), v.clone());
                (
                    Tls::with_verifier(self.provider.clone(), checked.clone()),
                    Some(checked),
                )
            }
            Trust::Unusable(_) => unreachable!("checked by open()"),
        };
        let fail = |e: ClientError| self.failure(e, addr, checked.as_deref());
        let connected = if self.implicit {
            SmtpClient::connect_tls(addr, source, timeouts, &tls, &self.host).await
        } else {
            SmtpClient::connect(addr, source, timeouts).await
        };
        let mut client = connected.map_err(fail)?;
        client.ehlo(helo).await.map_err(fail)?;
        if !self.implicit {
            // Never plaintext: no STARTTLS means no session at all.
            client
                .starttls(&tls, &self.host, helo)
                .await
                .map_err(fail)?;
        }
        client
            .auth_auto(&self.username, self.password.expose())
            .await
            .map_err(fail)?;
        Ok(client)
    }

    /// `what (reply): cause; fix: fix`, on one line.
    fn explained(&self, what: &str, reply: Option<&Reply>, advice: &Advice) -> String {
        let reply = reply
            .map(|r| format!(" ({})", r.to_string().replace(['\r', '\n'], " ")))
            .unwrap_or_default();
        format!(
            "{what}{reply}: {}; fix: {}",
            advice.cause,
            for_config(&advice.fix, &self.name)
        )
    }

    /// A failed session as the deferral the queue records, explained for
    /// this smarthost's config.
    fn failure(
        &self,
        e: ClientError,
        addr: SocketAddr,
        checked: Option<&RecordingVerifier>,
    ) -> Failure {
        // A refusal is named by the host the tenant configured (its reply
        // follows); a broken connection also by the address tried.
        let at = match e {
            ClientError::Rejected { .. } => format!("smarthost {}", self.host),
            _ => format!("smarthost {} [{}]:{}", self.host, addr.ip(), addr.port()),
        };
        let mut f = SessionFailure::of(&self.classifier, &e, &at, addr.port());
        if let ClientError::Tls(_) = e
            && let Some(CertOutcome::Failed { error, self_signed }) =
                checked.and_then(RecordingVerifier::outcome)
        {
            f.what = format!("{at}: TLS certificate not accepted");
            f.advice = explain_certificate(&error, &self.host, self_signed);
        }
        Failure {
            reply: Reply::new(
                451,
                f.enhanced,
                self.explained(&f.what, f.reply.as_ref(), &f.advice),
            ),
            class: f.class,
            try_next: f.try_next,
        }
    }

    /// The deferral or bounce for a MAIL FROM the smarthost refused: its
    /// reply code and enhanced code, the explanation in the text.
    pub(super) fn mail_refused(&self, reply: &Reply, sender: &str) -> Reply {
        let advice = explain_reply(Step::MailFrom, reply);
        Reply {
            code: reply.code,
            enhanced: reply.enhanced,
            text: self.explained(
                &format!("smarthost {} refused the sender <{sender}>", self.host),
                Some(reply),
                &advice,
            ),
        }
    }
}

/// smtp-test's fixes speak of its command-line options; here the same
/// advice is about the `[[smarthost]]` keys.
fn for_config(fix: &str, name: &str) -> String {
    let table = format!("[[smarthost]] {name:?}");
    fix.replace(
        "--starttls (port 587) or --tls (port 465)",
        "tls = \"starttls\" (port 587) or tls = \"implicit\" (port 465)",
    )
    .replace("--tls on port 465", "tls = \"implicit\" on port 465")
    .replace("--starttls", "tls = \"starttls\"")
    .replace("--tls", "tls = \"implicit\"")
    .replace(
        "give the account with --user",
        &format!("set username and password in {table}"),
    )
    .replace("in --server", &format!("as host in {table}"))
    .replace(
        "or point SSL_CERT_FILE at it",
        &format!("or set ca_file in {table}"),
    )
    .replace(
        "or with a longer --timeout",
        "or with a longer command_timeout in [delivery]",
    )
    .replace(
        "check the value given on the command line",
        &format!("check username in {table}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ConfigErrors};
    use crate::deliver::client::Stage;

    #[test]
    fn advice_for_a_smarthost_names_config_keys_not_flags() {
        let reply = Reply::from_wire(535, "5.7.8 Username and Password not accepted");
        let errors = [
            ClientError::Refused,
            ClientError::Connect(std::io::Error::other("no route")),
            ClientError::Timeout(Stage::Connect),
            ClientError::Timeout(Stage::Greeting),
            ClientError::Timeout(Stage::Ehlo),
            ClientError::Timeout(Stage::TlsHandshake),
            ClientError::Closed(Stage::Greeting),
            ClientError::Closed(Stage::Auth),
            ClientError::Tls("InvalidContentType".into()),
            ClientError::Tls("peer is incompatible: ProtocolVersion".into()),
            ClientError::Protocol {
                stage: Stage::Greeting,
                what: "not SMTP",
            },
            ClientError::Rejected {
                stage: Stage::Auth,
                reply,
            },
            ClientError::NoStartTls,
            ClientError::NoAuthMechanism,
            ClientError::InvalidArgument("username"),
            ClientError::NotUsable,
        ];
        for e in &errors {
            for port in [25, 465, 587] {
                let fix = for_config(&crate::deliver::failure::advice(e, port).fix, "m365");
                assert!(
                    !fix.contains("--") && !fix.contains("command line"),
                    "{e}: {fix}"
                );
            }
        }
    }

    use crate::config::test_support::TEST_HASH as HASH;

    fn config(extra: &str) -> Result<Config, ConfigErrors> {
        Config::from_toml_str(&format!(
            r#"
            [[listener]]
            address = "127.0.0.1:2587"
            [[tenant]]
            name = "acme"
            username = "acme"
            password_hash = "{HASH}"
            allowed_senders = ["*"]
            smarthost = "m365"
            [[tenant]]
            name = "other"
            username = "other"
            password_hash = "{HASH}"
            allowed_senders = ["*"]
            {extra}
            "#
        ))
    }

    const TWO: &str = r#"
        [[smarthost]]
        name = "m365"
        host = "smtp.office365.com"
        tls = "starttls"
        username = "billing@acme.example"
        password = "hunter2-secret"
        verify_certificate = false
        [[smarthost]]
        name = "gmail"
        host = "smtp.gmail.com"
        port = 465
        tls = "implicit"
        username = "x@beta.example"
        password = "pw"
        verify_certificate = false
        sender_domains = ["beta.example", "mail.acme.example"]
    "#;

    fn envelope(sender: &str, tenant: Option<&str>) -> Envelope {
        Envelope {
            sender: sender.into(),
            tenant: tenant.map(str::to_string),
            message_id: None,
            received_at: 0,
            client_ip: [127, 0, 0, 1].into(),
            smtputf8: false,
            body_8bit: false,
            ret: None,
            env_id: None,
            require_tls: false,
            ignore_tls_policies: false,
        }
    }

    #[test]
    fn sender_domain_then_tenant_and_never_the_null_sender() {
        let c = config(TWO).unwrap();
        assert_eq!(c.smarthosts[0].port, 587);
        let routes = Routes::new(&c);
        let via = |s: &str, t: Option<&str>| routes.route(&envelope(s, t)).map(|h| h.name.clone());
        assert_eq!(via("a@acme.example", Some("acme")).as_deref(), Some("m365"));
        // The more specific sender domain wins over the tenant's setting.
        assert_eq!(
            via("a@mail.acme.example", Some("acme")).as_deref(),
            Some("gmail")
        );
        assert_eq!(
            via("a@x.BETA.example", Some("other")).as_deref(),
            Some("gmail")
        );
        assert_eq!(via("a@notbeta.example", Some("other")), None);
        assert_eq!(via("a@acme.example", Some("other")), None);
        assert_eq!(via("a@acme.example", None), None);
        assert_eq!(via("", Some("acme")), None);
    }

    #[test]
    fn the_password_stays_out_of_debug_output() {
        let c = config(TWO).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!format!("{:?}", Routes::new(&c)).contains("hunter2"));
    }

    #[test]
    fn problems_are_reported_with_key_paths() {
        let errs = config(
            r#"
            [[smarthost]]
            name = "m365"
            host = "smtp.example.com:587"
            port = 0
            tls = "none"
            username = ""
            password = ""
            ca_file = "/nonexistent/ca.pem"
            sender_domains = ["@acme.example", "dup.example"]
            [[smarthost]]
            name = "m365"
            host = "smtp.example.com"
            tls = "implicit"
            username = "u"
            password = "p"
            verify_certificate = false
            ca_file = "/x.pem"
            sender_domains = ["DUP.example"]
            [[smarthost]]
            name = "no-tls"
            host = "smtp.example.com"
            username = "u"
            password = "p"
            "#,
        )
        .unwrap_err()
        .to_string();
        for want in [
            "smarthost[0].host: must be a host name",
            "smarthost[0].port: must be a port number",
            "smarthost[0].tls: \"none\" is not allowed",
            "smarthost[0].username: must not be empty",
            "smarthost[0].password: must not be empty",
            "smarthost[0].ca_file: cannot read /nonexistent/ca.pem",
            "smarthost[0].sender_domains[0]: must be a domain name",
            "smarthost[1].name: \"m365\" is used twice",
            "smarthost[1].ca_file: has no effect",
            "smarthost[1].sender_domains[0]: dup.example is already routed",
            "smarthost[2]: missing field `tls`",
        ] {
            assert!(errs.contains(want), "missing {want:?} in:\n{errs}");
        }

        let errs = config("").unwrap_err().to_string();
        assert!(
            errs.contains(
                "tenant[0].smarthost: no [[smarthost]] is named \"m365\" (there is none)"
            ),
            "{errs}"
        );
    }

    #[test]
    fn smtp_test_advice_is_reworded_for_the_config() {
        let fix = for_config("use --starttls (port 587) or --tls (port 465)", "m365");
        assert_eq!(
            fix,
            "use tls = \"starttls\" (port 587) or tls = \"implicit\" (port 465)"
        );
        let fix = for_config("give the account with --user", "m365");
        assert_eq!(fix, "set username and password in [[smarthost]] \"m365\"");
        let advice = explain_certificate(&rustls::CertificateError::UnknownIssuer, "h", false);
        assert!(for_config(&advice.fix, "m365").contains("set ca_file in [[smarthost]] \"m365\""));
    }
}
