//! Lifecycle events: the closed set of what becomes of a message and each
//! recipient ([`Event`]), the same JSON in the events log, webhooks and the
//! Redis stream. Stages emit them on the bus of the `report` module.

use serde::{Deserialize, Serialize};

use crate::envelope::{Envelope, QueueId};
use crate::reply::Reply;

/// The closed set of lifecycle events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Received,
    Delivered,
    Deferred,
    Bounced,
    Expired,
    Rejected,
    Complained,
    Suppressed,
}

/// Why a delivery failed, in words an app can act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Classification {
    InvalidRecipient,
    MailboxFull,
    MessageTooLarge,
    SpamBlock,
    Policy,
    Dns,
    Tls,
    Network,
    Other,
}

/// Why a delivery failed, finer than [`Classification`]: the taxonomy of
/// bounce reasons (close to Sisimai's) that decides what may suppress an
/// address. Carried in an event's `reason` field by its [`Reason::as_str`]
/// name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The mailbox does not exist.
    UserUnknown,
    /// The address is gone and the reply names no new one, or names one
    /// (`551 user not local`, x.1.6).
    HasMoved,
    /// The recipient's domain does not exist or has no mail server.
    HostUnknown,
    /// The recipient's domain takes no mail (null MX, RFC 7505; x.1.10).
    NotAccept,
    /// The mailbox exists but is disabled, suspended or inactive.
    MailboxDisabled,
    MailboxFull,
    MessageTooLarge,
    /// The sending IP, host or domain is refused: a blocklist, poor
    /// reputation, missing reverse DNS.
    Blocked,
    /// The content was judged spam.
    SpamDetected,
    /// Refused by the receiver's content or access policy (a virus, an
    /// attachment type, a header, "not accepted for policy reasons").
    Policy,
    /// SPF, DKIM or DMARC failed.
    AuthFailure,
    /// Too many messages, connections or recipients: throttled.
    RateLimited,
    RelayingDenied,
    /// The envelope sender itself was refused.
    SenderRejected,
    /// Retried until the message's lifetime ran out.
    Expired,
    Network,
    Dns,
    Tls,
    /// The receiving system's own trouble: full disk, configuration, a loop.
    SystemError,
    /// An SMTP protocol error.
    SyntaxError,
    Other,
}

impl Reason {
    pub const ALL: [Reason; 21] = [
        Reason::UserUnknown,
        Reason::HasMoved,
        Reason::HostUnknown,
        Reason::NotAccept,
        Reason::MailboxDisabled,
        Reason::MailboxFull,
        Reason::MessageTooLarge,
        Reason::Blocked,
        Reason::SpamDetected,
        Reason::Policy,
        Reason::AuthFailure,
        Reason::RateLimited,
        Reason::RelayingDenied,
        Reason::SenderRejected,
        Reason::Expired,
        Reason::Network,
        Reason::Dns,
        Reason::Tls,
        Reason::SystemError,
        Reason::SyntaxError,
        Reason::Other,
    ];

    /// The name in events, config rules and `herald bounce parse`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::UserUnknown => "user_unknown",
            Reason::HasMoved => "has_moved",
            Reason::HostUnknown => "host_unknown",
            Reason::NotAccept => "not_accept",
            Reason::MailboxDisabled => "mailbox_disabled",
            Reason::MailboxFull => "mailbox_full",
            Reason::MessageTooLarge => "message_too_large",
            Reason::Blocked => "blocked",
            Reason::SpamDetected => "spam_detected",
            Reason::Policy => "policy",
            Reason::AuthFailure => "auth_failure",
            Reason::RateLimited => "rate_limited",
            Reason::RelayingDenied => "relaying_denied",
            Reason::SenderRejected => "sender_rejected",
            Reason::Expired => "expired",
            Reason::Network => "network",
            Reason::Dns => "dns",
            Reason::Tls => "tls",
            Reason::SystemError => "system_error",
            Reason::SyntaxError => "syntax_error",
            Reason::Other => "other",
        }
    }

    pub fn parse(name: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == name)
    }

    /// In plain words, for people reading `herald bounce parse`.
    pub fn describe(self) -> &'static str {
        match self {
            Reason::UserUnknown => "the mailbox does not exist",
            Reason::HasMoved => "the address is gone (the user has moved)",
            Reason::HostUnknown => "the recipient's domain does not exist or has no mail server",
            Reason::NotAccept => "the recipient's domain accepts no mail",
            Reason::MailboxDisabled => "the mailbox is disabled or suspended",
            Reason::MailboxFull => "the mailbox is full",
            Reason::MessageTooLarge => "the message is too large for the receiver",
            Reason::Blocked => {
                "the sending IP or domain is blocked: blocklist, reputation or reverse DNS"
            }
            Reason::SpamDetected => "the receiver judged the content spam",
            Reason::Policy => "refused by the receiver's policy",
            Reason::AuthFailure => "SPF, DKIM or DMARC failed",
            Reason::RateLimited => "the receiver throttles: too many messages or connections",
            Reason::RelayingDenied => "the server does not relay for this domain",
            Reason::SenderRejected => "the envelope sender was refused",
            Reason::Expired => "delivery was retried until the message expired",
            Reason::Network => "the receiving server could not be reached",
            Reason::Dns => "a DNS lookup failed",
            Reason::Tls => "a TLS (encryption) problem",
            Reason::SystemError => "the receiving system had a problem of its own",
            Reason::SyntaxError => "an SMTP protocol error",
            Reason::Other => "no cause named",
        }
    }

    /// Whether a permanent failure for this reason says the address itself
    /// can never receive mail, so that it may go on the suppression list.
    /// Everything else is the sender's, the content's or the receiver's
    /// problem and passes.
    pub fn may_suppress(self) -> bool {
        matches!(
            self,
            Reason::UserUnknown | Reason::HasMoved | Reason::HostUnknown | Reason::NotAccept
        )
    }

    /// The coarse category an app acts on.
    pub fn classification(self) -> Classification {
        use Classification as C;
        match self {
            Reason::UserUnknown
            | Reason::HasMoved
            | Reason::HostUnknown
            | Reason::NotAccept
            | Reason::MailboxDisabled => C::InvalidRecipient,
            Reason::MailboxFull => C::MailboxFull,
            Reason::MessageTooLarge => C::MessageTooLarge,
            Reason::Blocked | Reason::SpamDetected => C::SpamBlock,
            Reason::Policy
            | Reason::AuthFailure
            | Reason::RateLimited
            | Reason::RelayingDenied
            | Reason::SenderRejected => C::Policy,
            Reason::Dns => C::Dns,
            Reason::Tls => C::Tls,
            Reason::Network => C::Network,
            Reason::Expired | Reason::SystemError | Reason::SyntaxError | Reason::Other => C::Other,
        }
    }

    /// The reason a configured rule implies when it names only a category.
    pub fn of_classification(c: Classification) -> Reason {
        match c {
            Classification::InvalidRecipient => Reason::UserUnknown,
            Classification::MailboxFull => Reason::MailboxFull,
            Classification::MessageTooLarge => Reason::MessageTooLarge,
            Classification::SpamBlock => Reason::Blocked,
            Classification::Policy => Reason::Policy,
            Classification::Dns => Reason::Dns,
            Classification::Tls => Reason::Tls,
            Classification::Network => Reason::Network,
            Classification::Other => Reason::Other,
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The TLS of a delivery (`tls_info` of a `delivered` event).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsInfo {
    /// "TLSv1.3", "TLSv1.2".
    pub version: String,
    /// The cipher suite by its IANA name.
    pub cipher: String,
    /// How the server's certificate was checked: "none" (opportunistic or
    /// `encrypt`: any certificate), "verify" (WebPKI and the MX host name,
    /// asked by `delivery.tls_policy`), "mta-sts" (the same, asked by the
    /// domain's enforced MTA-STS policy), "dane" (a TLSA record of the MX
    /// host, RFC 7672), "smarthost" (a smarthost's CA).
    pub verified: String,
    /// The policy that applied, e.g. "mta-sts enforce id 20261207" or
    /// "tls_policy verify".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// What a policy in testing mode (MTA-STS `mode: testing`) would have
    /// refused in this session, which went ahead as the mode says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_failure: Option<String>,
}

/// The SMTP reply in an event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SmtpDetail {
    /// `null` when a late report gave no reply code: none is invented.
    pub code: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enhanced: Option<String>,
    pub text: String,
}

impl From<&Reply> for SmtpDetail {
    fn from(r: &Reply) -> Self {
        SmtpDetail {
            code: Some(r.code),
            enhanced: r.enhanced.map(|e| e.to_string()),
            text: r.text.clone(),
        }
    }
}

/// `550 5.1.1 text`, leaving out what is missing.
impl std::fmt::Display for SmtpDetail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts = [
            self.code.map(|c| c.to_string()),
            self.enhanced.clone(),
            Some(self.text.clone()),
        ];
        let parts: Vec<String> = parts
            .into_iter()
            .flatten()
            .filter(|p| !p.is_empty())
            .collect();
        f.write_str(&parts.join(" "))
    }
}

/// The rule behind a `rejected` event, named in its `rule` field and in
/// `herald_rejected_total{rule}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectRule {
    /// MAIL FROM outside the tenant's `allowed_senders`.
    SenderNotAllowed,
    /// `MAIL FROM:<>` from a tenant.
    NullSender,
    /// A From: header domain outside the tenant's domains.
    FromNotAllowed,
    /// `[limits] tenant_messages`.
    RateLimitTenantMessages,
    /// `[limits] tenant_recipients`.
    RateLimitTenantRecipients,
    /// `[limits] ip_connections`.
    RateLimitIpConnections,
    /// The tenant is paused by the reputation guard.
    TenantPaused,
    /// Over `server.max_message_size` (SIZE= or actual).
    MessageTooLarge,
    /// `server.max_receiving_bytes` had no room.
    ReceivingBudget,
    /// A bare LF or CR (SMTP smuggling).
    BareLineEnd,
    /// A NUL byte in the message.
    NulByte,
    /// A line over 998 octets that cannot be re-encoded.
    LineTooLong,
    /// A recipient address that is not valid.
    RecipientSyntax,
    /// The recipient domain publishes a null MX.
    RecipientNullMx,
    /// The recipient domain has no MX and no address.
    RecipientNoMailServer,
    /// The recipient domain's lookup failed for now (451).
    RecipientDnsTempfail,
    /// The recipient is on the tenant's suppression list.
    SuppressionList,
    /// No usable From: header.
    HeaderFrom,
    /// A blocklist with `action = "reject"` lists the client or a domain.
    Dnsbl,
    /// DMARC would fail at the receiver (`[policy.dmarc]`).
    Dmarc,
    /// The spam score reached the threshold.
    SpamScore,
    /// The message could not be signed.
    DkimSign,
}

impl RejectRule {
    /// The name in events and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectRule::SenderNotAllowed => "sender_not_allowed",
            RejectRule::NullSender => "null_sender",
            RejectRule::FromNotAllowed => "from_not_allowed",
            RejectRule::RateLimitTenantMessages => "rate_limit_tenant_messages",
            RejectRule::RateLimitTenantRecipients => "rate_limit_tenant_recipients",
            RejectRule::RateLimitIpConnections => "rate_limit_ip_connections",
            RejectRule::TenantPaused => "tenant_paused",
            RejectRule::MessageTooLarge => "message_too_large",
            RejectRule::ReceivingBudget => "receiving_budget",
            RejectRule::BareLineEnd => "bare_line_end",
            RejectRule::NulByte => "nul_byte",
            RejectRule::LineTooLong => "line_too_long",
            RejectRule::RecipientSyntax => "recipient_syntax",
            RejectRule::RecipientNullMx => "recipient_null_mx",
            RejectRule::RecipientNoMailServer => "recipient_no_mail_server",
            RejectRule::RecipientDnsTempfail => "recipient_dns_tempfail",
            RejectRule::SuppressionList => "suppression_list",
            RejectRule::HeaderFrom => "header_from",
            RejectRule::Dnsbl => "dnsbl",
            RejectRule::Dmarc => "dmarc",
            RejectRule::SpamScore => "spam_score",
            RejectRule::DkimSign => "dkim_sign",
        }
    }
}

impl std::fmt::Display for RejectRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One event: the same JSON in the log, webhooks and the Redis stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub event: EventKind,
    /// Unique per event (128 random bits, hex): webhooks are delivered at
    /// least once, so the app deduplicates on this.
    #[serde(default)]
    pub event_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_id: Option<QueueId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub sender: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient: Option<String>,
    /// RFC 3339, UTC.
    pub timestamp: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mx: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<String>,
    /// `delivered` only: version, cipher and how the server was verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_info: Option<TlsInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smtp: Option<SmtpDetail>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classification: Option<Classification>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permanent: Option<bool>,
    /// For `received`: the recipients accepted; for `deferred`: next attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipients: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// For `rejected`: the client and the rule that refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<std::net::IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<RejectRule>,
    /// For `suppressed`: why the address is on the suppression list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For `received`: the outbound spam score (see `[policy.spam]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spam_score: Option<f64>,
    /// For `received`: policy findings that did not refuse the message
    /// (DMARC would fail with `[policy.dmarc] action = "warn"`, a blocklist
    /// listing with `action = "log"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warnings: Option<Vec<String>>,
    /// For `received`: this submission repeated a Message-ID the tenant
    /// sent within `[history] idempotency_window`; `queue_id` is the first
    /// submission's and nothing is sent again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate: Option<bool>,
}

impl Event {
    /// An event with only the kind, sender and time set.
    pub fn new(event: EventKind, sender: &str) -> Event {
        Event {
            event,
            event_id: format!("{:032x}", rand::random::<u128>()),
            queue_id: None,
            message_id: None,
            tenant: None,
            sender: sender.to_string(),
            recipient: None,
            timestamp: crate::clock::rfc3339_now(),
            attempt: None,
            mx: None,
            tls: None,
            tls_info: None,
            smtp: None,
            classification: None,
            permanent: None,
            recipients: None,
            next_attempt: None,
            size: None,
            client_ip: None,
            rule: None,
            reason: None,
            spam_score: None,
            warnings: None,
            duplicate: None,
        }
    }

    /// An event about a queued message, filled from its envelope.
    pub fn for_message(event: EventKind, id: QueueId, env: &Envelope) -> Event {
        let mut e = Event::new(event, &env.sender);
        e.queue_id = Some(id);
        e.message_id = env.message_id.clone();
        e.tenant = env.tenant.clone();
        e
    }

    pub fn with_reply(mut self, reply: &Reply) -> Event {
        self.smtp = Some(reply.into());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_json_has_the_documented_shape() {
        let mut e = Event::new(EventKind::Bounced, "billing@acme.example");
        e.recipient = Some("bob@example.net".into());
        e.smtp = Some(SmtpDetail {
            code: Some(550),
            enhanced: Some("5.1.1".into()),
            text: "no such user".into(),
        });
        e.classification = Some(Classification::InvalidRecipient);
        e.permanent = Some(true);
        let v: serde_json::Value = serde_json::to_value(&e).unwrap();
        assert_eq!(v["event"], "bounced");
        assert_eq!(v["smtp"]["enhanced"], "5.1.1");
        assert_eq!(v["classification"], "invalid_recipient");
        assert!(v.get("mx").is_none());
        let back: Event = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
    }
}
