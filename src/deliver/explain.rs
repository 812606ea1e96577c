//! Why a server said what it said: known replies → likely cause and fix.
//!
//! The explanations are data ([`RULES`]): each rule names the step whose
//! reply it reads, a range of reply codes, and optionally an enhanced status
//! code (RFC 3463) and a text fragment that must both appear. The first rule
//! that matches wins, so provider-specific rules come before generic ones and
//! every step ends with a catch-all for its 4xx and its 5xx replies.
//!
//! Provider texts are the ones their documentation and support forums quote:
//! Gmail's `534 5.7.9 Application-specific password required` and
//! `535 5.7.8 Username and Password not accepted`; Microsoft 365's
//! `535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is
//! disabled for the Tenant` and `535 5.7.3 Authentication unsuccessful`;
//! Yahoo's `535 5.7.0 (#AUTH005) Too many bad auth attempts`.

use rustls::CertificateError;

use crate::reply::Reply;

/// The steps of `herald smtp-test`, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Dns,
    Connect,
    Banner,
    Ehlo,
    Tls,
    AuthMechanisms,
    Auth,
    MailFrom,
    Quit,
}

impl Step {
    /// Every step, in the order they run.
    pub const ALL: [Step; 9] = [
        Step::Dns,
        Step::Connect,
        Step::Banner,
        Step::Ehlo,
        Step::Tls,
        Step::AuthMechanisms,
        Step::Auth,
        Step::MailFrom,
        Step::Quit,
    ];

    /// The step's name in the report (`auth-mechanisms`).
    pub fn name(self) -> &'static str {
        match self {
            Step::Dns => "dns",
            Step::Connect => "connect",
            Step::Banner => "banner",
            Step::Ehlo => "ehlo",
            Step::Tls => "tls",
            Step::AuthMechanisms => "auth-mechanisms",
            Step::Auth => "auth",
            Step::MailFrom => "mail-from",
            Step::Quit => "quit",
        }
    }
}

/// The likely cause of a failure and what to do about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Advice {
    pub cause: String,
    pub fix: String,
}

impl Advice {
    pub fn new(cause: impl Into<String>, fix: impl Into<String>) -> Advice {
        Advice {
            cause: cause.into(),
            fix: fix.into(),
        }
    }
}

/// One entry of the table: when a reply matches, its cause and fix.
#[derive(Debug)]
pub struct Rule {
    pub step: Step,
    /// Reply codes the rule covers, both ends included.
    pub codes: (u16, u16),
    /// Enhanced status code the reply must carry, e.g. `"5.7.139"`.
    pub enhanced: Option<&'static str>,
    /// Fragment the reply text must contain (ASCII case ignored).
    pub text: Option<&'static str>,
    pub cause: &'static str,
    pub fix: &'static str,
}

impl Rule {
    fn matches(&self, step: Step, reply: &Reply) -> bool {
        self.step == step
            && (self.codes.0..=self.codes.1).contains(&reply.code)
            && self
                .enhanced
                .is_none_or(|e| reply.enhanced.is_some_and(|r| r.to_string() == e))
            && self
                .text
                .is_none_or(|t| contains_ignore_case(&reply.text, t))
    }
}

fn contains_ignore_case(haystack: &str, needle: &str) -> bool {
    haystack
        .to_ascii_lowercase()
        .contains(&needle.to_ascii_lowercase())
}

const ENABLE_M365_SMTP_AUTH: &str = "enable Authenticated SMTP for this mailbox: Microsoft 365 admin center → Users → Active users → the mailbox → Mail → Manage email apps → tick \"Authenticated SMTP\" (for the whole tenant: Set-TransportConfig -SmtpClientAuthenticationDisabled $false); changes can take an hour";
const GOOGLE_APP_PASSWORD: &str = "create an app password (Google Account → Security → 2-Step Verification → App passwords) and use it instead of the account password; the user name is the full address";
const CHECK_CREDENTIALS: &str = "check the user name (usually the full email address) and the password; with two-factor login most providers want an app password here";

/// The table. Order matters: first match wins.
pub const RULES: &[Rule] = &[
    // ---- greeting ----
    Rule {
        step: Step::Banner,
        codes: (421, 421),
        enhanced: None,
        text: None,
        cause: "the server is busy or refuses more connections from this address right now",
        fix: "try again in a few minutes; if it persists, ask the provider whether this address is rate-limited",
    },
    Rule {
        step: Step::Banner,
        codes: (554, 554),
        enhanced: None,
        text: None,
        cause: "the server refuses to talk to this client: the connecting address is probably on a blocklist, or the server only accepts mail from its own network",
        fix: "read the reason in the server's text; ask the provider to allow this address, or send from a network it accepts",
    },
    Rule {
        step: Step::Banner,
        codes: (400, 499),
        enhanced: None,
        text: None,
        cause: "the server cannot take connections right now (temporary)",
        fix: "try again later",
    },
    Rule {
        step: Step::Banner,
        codes: (500, 599),
        enhanced: None,
        text: None,
        cause: "the server refuses connections from this client",
        fix: "read the reason in the server's text and ask the provider",
    },
    // ---- EHLO ----
    Rule {
        step: Step::Ehlo,
        codes: (500, 599),
        enhanced: None,
        text: None,
        cause: "the server refused the EHLO greeting (some servers refuse a name that is not a real host name)",
        fix: "read the reason in the server's text; check this machine's host name",
    },
    Rule {
        step: Step::Ehlo,
        codes: (400, 499),
        enhanced: None,
        text: None,
        cause: "the server put off the EHLO greeting (temporary)",
        fix: "try again later",
    },
    // ---- STARTTLS command ----
    Rule {
        step: Step::Tls,
        codes: (400, 499),
        enhanced: None,
        text: None,
        cause: "the server announces STARTTLS but cannot start TLS now: its TLS setup is probably broken",
        fix: "ask the provider; meanwhile try implicit TLS on port 465 with --tls",
    },
    Rule {
        step: Step::Tls,
        codes: (500, 599),
        enhanced: None,
        text: None,
        cause: "the server refused STARTTLS",
        fix: "use --tls on port 465, or ask the provider which port offers STARTTLS (usually 587)",
    },
    // ---- AUTH: Gmail / Google Workspace ----
    Rule {
        step: Step::Auth,
        codes: (534, 534),
        enhanced: None,
        text: Some("application-specific password"),
        cause: "Google refuses the account password for SMTP: two-factor accounts need an app password",
        fix: GOOGLE_APP_PASSWORD,
    },
    Rule {
        step: Step::Auth,
        codes: (534, 534),
        enhanced: Some("5.7.9"),
        text: None,
        cause: "the server wants an application-specific password or a stronger login method for this account (two-factor accounts need an app password)",
        fix: GOOGLE_APP_PASSWORD,
    },
    Rule {
        step: Step::Auth,
        codes: (535, 535),
        enhanced: None,
        text: Some("username and password not accepted"),
        cause: "Google did not accept the user name and password; two-factor accounts need an app password",
        fix: GOOGLE_APP_PASSWORD,
    },
    // ---- AUTH: Microsoft 365 / Exchange Online ----
    Rule {
        step: Step::Auth,
        codes: (500, 599),
        enhanced: None,
        text: Some("smtpclientauthentication is disabled"),
        cause: "SMTP AUTH is switched off for this mailbox/tenant",
        fix: ENABLE_M365_SMTP_AUTH,
    },
    Rule {
        step: Step::Auth,
        codes: (500, 599),
        enhanced: Some("5.7.139"),
        text: Some("security defaults"),
        cause: "Microsoft 365 security defaults block password logins (SMTP AUTH) for this user",
        fix: "turn off security defaults in Microsoft Entra ID or exclude this account with a Conditional Access policy, then enable Authenticated SMTP for the mailbox",
    },
    Rule {
        step: Step::Auth,
        codes: (500, 599),
        enhanced: Some("5.7.139"),
        text: Some("basic authentication is disabled"),
        cause: "SMTP AUTH is switched off for this mailbox/tenant: password logins (basic authentication) are disabled",
        fix: ENABLE_M365_SMTP_AUTH,
    },
    Rule {
        step: Step::Auth,
        codes: (500, 599),
        enhanced: Some("5.7.139"),
        text: Some("credentials were incorrect"),
        cause: "Microsoft 365 did not accept the user name and password",
        fix: CHECK_CREDENTIALS,
    },
    Rule {
        step: Step::Auth,
        codes: (500, 599),
        enhanced: Some("5.7.139"),
        text: None,
        cause: "Microsoft 365 refused the login: SMTP AUTH is probably switched off for this mailbox/tenant",
        fix: ENABLE_M365_SMTP_AUTH,
    },
    Rule {
        step: Step::Auth,
        codes: (535, 535),
        enhanced: Some("5.7.3"),
        text: None,
        cause: "SMTP AUTH is switched off for this mailbox/tenant (Microsoft 365 gives the same reply for a wrong password)",
        fix: ENABLE_M365_SMTP_AUTH,
    },
    // ---- AUTH: lock-outs, TLS required, generic ----
    Rule {
        step: Step::Auth,
        codes: (500, 599),
        enhanced: None,
        text: Some("too many"),
        cause: "too many failed logins: the provider has locked SMTP logins for this account for a while",
        fix: "wait (often an hour), then try with the right password; most providers want an app password for SMTP",
    },
    Rule {
        step: Step::Auth,
        codes: (530, 530),
        enhanced: None,
        text: Some("tls"),
        cause: "the server wants TLS before AUTH",
        fix: "use --starttls (port 587) or --tls (port 465)",
    },
    Rule {
        step: Step::Auth,
        codes: (538, 538),
        enhanced: None,
        text: None,
        cause: "the server wants an encrypted connection for this login method",
        fix: "use --starttls (port 587) or --tls (port 465)",
    },
    Rule {
        step: Step::Auth,
        codes: (534, 534),
        enhanced: None,
        text: None,
        cause: "the server wants a stronger login method or an app password for this account",
        fix: "create an app password in the provider's account settings and use it",
    },
    Rule {
        step: Step::Auth,
        codes: (535, 535),
        enhanced: None,
        text: None,
        cause: "wrong user name or password",
        fix: CHECK_CREDENTIALS,
    },
    Rule {
        step: Step::Auth,
        codes: (454, 454),
        enhanced: None,
        text: None,
        cause: "the server could not check the credentials just now (temporary)",
        fix: "try again in a few minutes; if it persists, ask the provider",
    },
    Rule {
        step: Step::Auth,
        codes: (400, 499),
        enhanced: None,
        text: None,
        cause: "the server put off the login (temporary)",
        fix: "try again in a few minutes",
    },
    Rule {
        step: Step::Auth,
        codes: (500, 599),
        enhanced: None,
        text: None,
        cause: "the server refused the login",
        fix: CHECK_CREDENTIALS,
    },
    // ---- MAIL FROM ----
    Rule {
        step: Step::MailFrom,
        codes: (530, 530),
        enhanced: None,
        text: None,
        cause: "the server wants a login before it takes mail",
        fix: "give the account with --user",
    },
    Rule {
        step: Step::MailFrom,
        codes: (500, 599),
        enhanced: None,
        text: Some("authentication required"),
        cause: "the server wants a login before it takes mail",
        fix: "give the account with --user",
    },
    Rule {
        step: Step::MailFrom,
        codes: (500, 599),
        enhanced: None,
        text: None,
        cause: "the server does not let this account send as this address: the sender must match the account (or an alias the provider allows)",
        fix: "send from the account's own address, or add this address as an alias / \"send as\" permission at the provider",
    },
    Rule {
        step: Step::MailFrom,
        codes: (400, 499),
        enhanced: None,
        text: None,
        cause: "the server put off the sender (temporary: greylisting, a rate limit or a lookup that failed)",
        fix: "try again in a few minutes",
    },
];

/// The cause and fix for a reply at `step`: the first matching rule, or a
/// plain reading of the reply code when no rule matches.
pub fn explain_reply(step: Step, reply: &Reply) -> Advice {
    if reply.code == 421 && step != Step::Banner {
        return Advice::new(
            "the server is closing the connection (busy, shutting down, or too many connections or errors from this address)",
            "try again later",
        );
    }
    match RULES.iter().find(|r| r.matches(step, reply)) {
        Some(rule) => Advice::new(rule.cause, rule.fix),
        None if reply.is_transient() => Advice::new(
            "the server put this step off (temporary)",
            "try again later",
        ),
        None => Advice::new(
            "the server refused this step",
            "read the reason in the server's text",
        ),
    }
}

/// What a certificate problem means, for the host name the tenant gave.
pub fn explain_certificate(error: &CertificateError, host: &str, self_signed: bool) -> Advice {
    const ASK: &str = "ask the provider to renew or fix its certificate; meanwhile no password should be sent to this server";
    match error {
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            let when = match error {
                CertificateError::ExpiredContext { not_after, .. } => {
                    format!(" on {}", utc_date(not_after.as_secs()))
                }
                _ => String::new(),
            };
            Advice::new(format!("the server's certificate expired{when}"), ASK)
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => Advice::new(
            "the server's certificate is not valid yet (or this machine's clock is wrong)",
            "check this machine's date and time; otherwise ask the provider",
        ),
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            let names = match error {
                CertificateError::NotValidForNameContext { presented, .. }
                    if !presented.is_empty() =>
                {
                    {
                        // rustls renders them as `DnsName("mx.example")`.
                        let names: Vec<&str> = presented
                            .iter()
                            .map(|p| match (p.find('"'), p.rfind('"')) {
                                (Some(a), Some(b)) if a < b => &p[a + 1..b],
                                _ => p.as_str(),
                            })
                            .collect();
                        format!(" (it names {})", names.join(", "))
                    }
                }
                _ => String::new(),
            };
            Advice::new(
                format!("wrong host name: the server's certificate is not valid for {host}{names}"),
                "use the host name the provider documents for SMTP (the one the certificate names) in --server, or ask the provider to fix its certificate",
            )
        }
        CertificateError::UnknownIssuer if self_signed => Advice::new(
            "the server's certificate is self-signed: nothing vouches for it",
            "ask the provider for a certificate from a public CA (e.g. Let's Encrypt); for a private server, add its certificate to this machine's trust store or point SSL_CERT_FILE at it",
        ),
        CertificateError::UnknownIssuer => Advice::new(
            "the server's certificate has an unknown issuer: it was not issued by a CA this machine trusts, or the server does not send the intermediate certificates",
            "ask the provider to send the full certificate chain; for a private CA, add it to this machine's trust store or point SSL_CERT_FILE at it",
        ),
        CertificateError::Revoked => Advice::new("the server's certificate was revoked", ASK),
        CertificateError::BadSignature => Advice::new(
            "the server's certificate chain has a bad signature (corrupt or forged)",
            ASK,
        ),
        other => Advice::new(
            format!("the server's certificate was refused: {other:?}"),
            ASK,
        ),
    }
}

/// `YYYY-MM-DD` for seconds since the Unix epoch (UTC).
fn utc_date(secs: u64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(secs as i64) {
        Ok(t) => format!("{:04}-{:02}-{:02}", t.year(), t.month() as u8, t.day()),
        Err(_) => format!("{secs} s after 1970"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn advice(step: Step, wire: &str) -> Advice {
        let (code, text) = wire.split_once(' ').unwrap();
        explain_reply(step, &Reply::from_wire(code.parse().unwrap(), text))
    }

    #[test]
    fn gmail_replies_ask_for_an_app_password() {
        for wire in [
            "534 5.7.9 Application-specific password required. For more information, go to https://support.google.com/mail/?p=InvalidSecondFactor",
            "535 5.7.8 Username and Password not accepted. For more information, go to https://support.google.com/mail/?p=BadCredentials",
        ] {
            let a = advice(Step::Auth, wire);
            assert!(a.cause.contains("app password"), "{wire}: {a:?}");
            assert!(a.fix.contains("App passwords"), "{wire}: {a:?}");
        }
    }

    #[test]
    fn microsoft_replies_say_smtp_auth_is_off() {
        for wire in [
            "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.",
            "535 5.7.139 Authentication unsuccessful, basic authentication is disabled.",
            "535 5.7.3 Authentication unsuccessful",
        ] {
            let a = advice(Step::Auth, wire);
            assert!(
                a.cause.contains("SMTP AUTH is switched off"),
                "{wire}: {a:?}"
            );
            assert!(a.fix.contains("Authenticated SMTP"), "{wire}: {a:?}");
        }
        let a = advice(
            Step::Auth,
            "535 5.7.139 Authentication unsuccessful, user is locked by your organization's security defaults policy.",
        );
        assert!(a.cause.contains("security defaults"), "{a:?}");
        let a = advice(
            Step::Auth,
            "535 5.7.139 Authentication unsuccessful, the user credentials were incorrect.",
        );
        assert!(a.cause.contains("did not accept"), "{a:?}");
    }

    #[test]
    fn generic_auth_replies() {
        let a = advice(Step::Auth, "535 5.7.8 Authentication credentials invalid");
        assert_eq!(a.cause, "wrong user name or password");
        let a = advice(
            Step::Auth,
            "535 5.7.0 (#AUTH005) Too many bad auth attempts.",
        );
        assert!(a.cause.contains("locked"), "{a:?}");
        let a = advice(Step::Auth, "454 4.7.0 Temporary authentication failure");
        assert!(a.cause.contains("temporary"), "{a:?}");
        let a = advice(Step::Auth, "530 5.7.0 Must issue a STARTTLS command first");
        assert!(a.fix.contains("--starttls"), "{a:?}");
        let a = advice(Step::Auth, "421 4.7.0 Too many errors, closing");
        assert!(a.cause.contains("closing"), "{a:?}");
    }

    #[test]
    fn sender_refusals_say_the_sender_must_match() {
        for wire in [
            "553 5.7.1 <x@other.test>: Sender address rejected: not owned by user acme",
            "550 5.7.60 SMTP; Client does not have permissions to send as this sender",
        ] {
            let a = advice(Step::MailFrom, wire);
            assert!(a.cause.contains("sender must match the account"), "{a:?}");
        }
        let a = advice(Step::MailFrom, "530 5.7.0 Authentication required");
        assert!(a.fix.contains("--user"), "{a:?}");
        let a = advice(Step::MailFrom, "451 4.7.1 Greylisted, try again");
        assert!(a.cause.contains("temporary"), "{a:?}");
    }

    #[test]
    fn banner_replies() {
        let a = advice(Step::Banner, "554 5.7.1 Your IP is listed at zen.example");
        assert!(a.cause.contains("blocklist"), "{a:?}");
        let a = advice(Step::Banner, "421 4.3.2 Too busy");
        assert!(a.cause.contains("busy"), "{a:?}");
    }

    #[test]
    fn every_step_has_a_catch_all_for_4xx_and_5xx() {
        for step in [
            Step::Banner,
            Step::Ehlo,
            Step::Tls,
            Step::Auth,
            Step::MailFrom,
        ] {
            for code in [450, 550] {
                assert!(
                    RULES.iter().any(|r| r.step == step
                        && r.enhanced.is_none()
                        && r.text.is_none()
                        && (r.codes.0..=r.codes.1).contains(&code)),
                    "{step:?} {code}"
                );
            }
        }
    }

    #[test]
    fn certificate_problems_are_named() {
        use rustls::pki_types::{ServerName, UnixTime};
        let a = explain_certificate(
            &CertificateError::ExpiredContext {
                time: UnixTime::since_unix_epoch(std::time::Duration::from_secs(1_700_000_000)),
                not_after: UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                    1_577_836_800,
                )),
            },
            "smtp.test",
            false,
        );
        assert_eq!(a.cause, "the server's certificate expired on 2020-01-01");
        let a = explain_certificate(
            &CertificateError::NotValidForNameContext {
                expected: ServerName::try_from("smtp.test").unwrap(),
                presented: vec!["DnsName(\"mail.other.test\")".into()],
            },
            "smtp.test",
            false,
        );
        assert!(a.cause.starts_with("wrong host name"), "{a:?}");
        assert_eq!(
            a.cause,
            "wrong host name: the server's certificate is not valid for smtp.test (it names mail.other.test)"
        );
        let a = explain_certificate(&CertificateError::UnknownIssuer, "h", true);
        assert!(a.cause.contains("self-signed"), "{a:?}");
        let a = explain_certificate(&CertificateError::UnknownIssuer, "h", false);
        assert!(a.cause.contains("unknown issuer"), "{a:?}");
    }
}

/// Property tests (STYLE.md point 9): any reply at any step, and any names
/// or dates a server's certificate carries, are explained without panic.
#[cfg(test)]
mod prop_tests {
    use super::*;
    use proptest::prelude::*;
    use rustls::pki_types::{ServerName, UnixTime};

    /// Text biased to multi-byte characters, quotes and the fragments the
    /// rules look for, or any Unicode.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            "([245][.][0-9]{1,3}[.][0-9]{1,3} )?[a-zA-Z .\"()#-]{0,12}[éİ€😀漢ß\u{0}\"]{0,3}(Authentication unsuccessful|Application-specific|DnsName)?[a-zé\" ]{0,8}",
            "(?s).{0,60}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn any_reply_and_certificate_is_explained(
            step in 0..Step::ALL.len(),
            code in 0u16..1000,
            text in text(),
            names in prop::collection::vec(text(), 0..4),
            secs in any::<u64>(),
            self_signed in any::<bool>(),
        ) {
            let advice = explain_reply(Step::ALL[step], &Reply::from_wire(code, &text));
            prop_assert!(!advice.cause.is_empty() && !advice.fix.is_empty());
            let presented = names
                .iter()
                .map(|n| format!("DnsName({n:?})"))
                .chain(names.iter().cloned())
                .collect();
            let wrong_name = CertificateError::NotValidForNameContext {
                expected: ServerName::try_from("smtp.test").unwrap(),
                presented,
            };
            let _ = explain_certificate(&wrong_name, &text, self_signed);
            let when = UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs));
            let expired = CertificateError::ExpiredContext { time: when, not_after: when };
            let _ = explain_certificate(&expired, &text, self_signed);
        }
    }
}
