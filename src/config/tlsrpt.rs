//! `[delivery.tls_reports]`: the daily TLS reports (TLS-RPT, RFC 8460)
//! herald sends to recipient domains about its sessions with their MX
//! hosts. Counting is `report::tlsrpt`; sending is `queue::tlsrpt`.
//!
//! Checked while the section is read (the checks need several keys at
//! once); every problem of the section is named in one message, each with
//! its key.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::Span;

/// `[delivery.tls_reports]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(try_from = "RawTlsReportsConfig")]
pub struct TlsReportsConfig {
    /// Count sessions and send reports at all. Default false: a relay
    /// reports only once its operator has chosen a From: address.
    pub enabled: bool,
    /// `organization-name` of the reports; default `server.hostname`.
    pub organization: Option<String>,
    /// `contact-info` of the reports (a `mailto:` address or a URL);
    /// default `mailto:` + `from`.
    pub contact: Option<String>,
    /// The address mailed reports come from (From: and envelope sender);
    /// its domain is the DKIM signing domain, so a `[[dkim]]` key for it
    /// (or a fallback key) should exist. Required when enabled.
    pub from: Option<String>,
    /// `TLS-Report-Submitter` and the report-id's domain; default
    /// `server.hostname`.
    pub submitter: Option<String>,
    /// How long after UTC midnight the previous day's reports go out.
    /// Default 1h.
    pub send_after: Span,
    /// A random wait of up to this much is added to `send_after`, so that
    /// report receivers are not hit by every sender at once (RFC 8460 §4.1
    /// asks senders to spread their reports). Default 1h.
    pub send_jitter: Span,
    /// One POST to an `https:` report URI: connect, TLS, answer.
    /// Default 30s.
    pub https_timeout: Span,
    /// A PEM file of CA certificates trusted for `https:` report URIs
    /// besides the system's trust store (private deployments, tests).
    pub ca_file: Option<PathBuf>,
}

/// The section as written, before its checks.
#[derive(Deserialize)]
#[serde(default)]
struct RawTlsReportsConfig {
    enabled: bool,
    organization: Option<String>,
    contact: Option<String>,
    from: Option<String>,
    submitter: Option<String>,
    send_after: Span,
    send_jitter: Span,
    https_timeout: Span,
    ca_file: Option<PathBuf>,
}

impl Default for RawTlsReportsConfig {
    fn default() -> Self {
        let d = TlsReportsConfig::default();
        RawTlsReportsConfig {
            enabled: d.enabled,
            organization: d.organization,
            contact: d.contact,
            from: d.from,
            submitter: d.submitter,
            send_after: d.send_after,
            send_jitter: d.send_jitter,
            https_timeout: d.https_timeout,
            ca_file: d.ca_file,
        }
    }
}

impl Default for TlsReportsConfig {
    fn default() -> Self {
        TlsReportsConfig {
            enabled: false,
            organization: None,
            contact: None,
            from: None,
            submitter: None,
            send_after: Span(Duration::from_secs(3600)),
            send_jitter: Span(Duration::from_secs(3600)),
            https_timeout: Span(Duration::from_secs(30)),
            ca_file: None,
        }
    }
}

impl TryFrom<RawTlsReportsConfig> for TlsReportsConfig {
    type Error = String;

    fn try_from(raw: RawTlsReportsConfig) -> Result<Self, String> {
        let mut problems = Vec::new();
        match raw.from.as_deref() {
            None if raw.enabled => problems.push(
                "from: required when enabled = true (the address reports are sent from, e.g. \"tls-reports@relay.example\")".to_string(),
            ),
            None => {}
            Some(a) => {
                if let Err(e) = check_address(a) {
                    problems.push(format!("from: {e}"));
                }
            }
        }
        for (key, value) in [
            ("organization", &raw.organization),
            ("contact", &raw.contact),
            ("submitter", &raw.submitter),
        ] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                problems.push(format!(
                    "{key}: must not be empty (leave it out for the default)"
                ));
            }
        }
        if raw
            .submitter
            .as_deref()
            .is_some_and(|s| s.contains(char::is_whitespace))
        {
            problems.push("submitter: a host name has no spaces".to_string());
        }
        if raw.send_after.0 >= Duration::from_secs(24 * 3600) {
            problems.push("send_after: must be less than 24h".to_string());
        }
        if raw.send_jitter.0 > Duration::from_secs(12 * 3600) {
            problems.push("send_jitter: must be at most 12h".to_string());
        }
        if raw.https_timeout.0.is_zero() {
            problems.push("https_timeout: must be longer than 0".to_string());
        }
        if let Some(path) = &raw.ca_file
            && let Err(e) = super::smarthost::load_roots(path)
        {
            problems.push(format!("ca_file: {e}"));
        }
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        Ok(TlsReportsConfig {
            enabled: raw.enabled,
            organization: raw.organization,
            contact: raw.contact,
            from: raw.from,
            submitter: raw.submitter,
            send_after: raw.send_after,
            send_jitter: raw.send_jitter,
            https_timeout: raw.https_timeout,
            ca_file: raw.ca_file,
        })
    }
}

/// A bare `local@domain` address, as reports need for From: and MAIL FROM.
fn check_address(a: &str) -> Result<(), String> {
    let Some((local, domain)) = a.rsplit_once('@') else {
        return Err(format!("{a:?} is not an address (local@domain)"));
    };
    if local.is_empty()
        || domain.is_empty()
        || !domain.contains('.')
        || a.contains(|c: char| c.is_whitespace() || matches!(c, '<' | '>' | ',' | '"'))
    {
        return Err(format!(
            "{a:?} is not a bare address such as \"tls-reports@relay.example\""
        ));
    }
    Ok(())
}

impl TlsReportsConfig {
    /// The domain of `from`: the DKIM signing domain of mailed reports.
    pub fn from_domain(&self) -> Option<&str> {
        self.from.as_deref()?.rsplit_once('@').map(|(_, d)| d)
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn load(section: &str) -> Result<Config, Vec<(String, String)>> {
        let text = format!("[[listener]]\naddress = \"127.0.0.1:2587\"\n{section}");
        Config::from_toml_str(&text).map_err(|e| {
            e.0.into_iter()
                .map(|e| (e.path, e.message))
                .collect::<Vec<_>>()
        })
    }

    #[test]
    fn off_by_default() {
        let c = load("").unwrap();
        assert!(!c.delivery.tls_reports.enabled);
        assert_eq!(c.delivery.tls_reports.send_after.0.as_secs(), 3600);
    }

    #[test]
    fn enabled_needs_a_from_address() {
        let errs = load("[delivery.tls_reports]\nenabled = true\n").unwrap_err();
        assert_eq!(errs[0].0, "delivery.tls_reports", "{errs:?}");
        assert!(errs[0].1.contains("from: required"), "{errs:?}");
    }

    #[test]
    fn every_problem_is_named_with_its_key() {
        let errs = load(
            "[delivery.tls_reports]\nenabled = true\nfrom = \"nobody\"\nsend_after = \"25h\"\nhttps_timeout = \"0s\"\ncontact = \"\"\nca_file = \"/nonexistent/ca.pem\"\n",
        )
        .unwrap_err();
        let msg = &errs[0].1;
        for key in [
            "from:",
            "send_after:",
            "https_timeout:",
            "contact:",
            "ca_file:",
        ] {
            assert!(msg.contains(key), "{key} missing in {msg}");
        }
    }

    #[test]
    fn unknown_keys_are_refused_with_their_path() {
        let errs = load("[delivery.tls_reports]\nenabeld = true\n").unwrap_err();
        assert_eq!(errs[0].0, "delivery.tls_reports.enabeld", "{errs:?}");
    }

    #[test]
    fn a_complete_section_loads() {
        let c = load(
            "[delivery.tls_reports]\nenabled = true\nfrom = \"tls-reports@relay.example\"\norganization = \"Example Relay\"\nsend_after = \"30m\"\n",
        )
        .unwrap();
        let t = &c.delivery.tls_reports;
        assert!(t.enabled);
        assert_eq!(t.from_domain(), Some("relay.example"));
        assert_eq!(t.organization.as_deref(), Some("Example Relay"));
    }
}
