//! Which envelope senders a tenant may use: patterns such as
//! `*@acme.example`, `*@*.acme.example`, `billing@acme.example` or `*`.

/// Checks one pattern's form; the error says how to write it.
pub fn validate_pattern(pattern: &str) -> Result<(), String> {
    if pattern == "*" {
        return Ok(());
    }
    let Some((local, domain)) = pattern.rsplit_once('@') else {
        return Err(format!(
            "{pattern:?} is not a sender pattern: write \"*@domain\", \"*@*.domain\" or \"user@domain\""
        ));
    };
    let domain_ok = {
        let d = domain.strip_prefix("*.").unwrap_or(domain);
        !d.is_empty() && !d.contains('*') && !d.contains(char::is_whitespace) && d.contains('.')
    };
    let local_ok = local == "*" || (!local.is_empty() && !local.contains(['*', ' ']));
    if domain_ok && local_ok {
        Ok(())
    } else {
        Err(format!(
            "{pattern:?} is not a sender pattern: write \"*@domain\", \"*@*.domain\" or \"user@domain\""
        ))
    }
}

/// Whether `address` matches `pattern`; domains compare case-insensitively,
/// local parts exactly (RFC 5321 §2.4).
pub fn matches(pattern: &str, address: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let (Some((pl, pd)), Some((al, ad))) = (pattern.rsplit_once('@'), address.rsplit_once('@'))
    else {
        return false;
    };
    domain_matches(pd, ad) && (pl == "*" || pl == al)
}

/// Whether a pattern's domain part (`acme.example` or `*.acme.example`)
/// covers `domain`.
fn domain_matches(pd: &str, ad: &str) -> bool {
    let ad = ad.trim_end_matches('.');
    match pd.strip_prefix("*.") {
        Some(suffix) => {
            // Compared as bytes: the address comes from the network and may
            // be UTF-8 (SMTPUTF8), where a str slice at a byte offset could
            // fall inside a character and panic.
            let (ad, suffix) = (ad.as_bytes(), suffix.as_bytes());
            ad.len() > suffix.len() + 1
                && ad[ad.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                && ad[ad.len() - suffix.len() - 1] == b'.'
        }
        None => ad.eq_ignore_ascii_case(pd),
    }
}

/// Whether any of the patterns allows some address at `domain`: the
/// domains a tenant may write in its From: header.
pub fn domain_allowed(patterns: &[String], domain: &str) -> bool {
    patterns.iter().any(|p| {
        p == "*"
            || p.rsplit_once('@')
                .is_some_and(|(_, pd)| domain_matches(pd, domain))
    })
}

/// Whether any of the patterns allows the address.
pub fn allowed(patterns: &[String], address: &str) -> bool {
    patterns.iter().any(|p| matches(p, address))
}

#[cfg(test)]
mod tests {
    #[test]
    fn from_header_domains() {
        use super::domain_allowed;
        let p = vec![
            "billing@acme.example".to_string(),
            "*@*.globex.example".into(),
        ];
        assert!(domain_allowed(&p, "acme.example"));
        assert!(domain_allowed(&p, "ACME.example."));
        assert!(domain_allowed(&p, "mail.globex.example"));
        assert!(!domain_allowed(&p, "globex.example"));
        assert!(!domain_allowed(&p, "victim.org"));
        assert!(!domain_allowed(&p, "grünbäume.example"));
        assert!(domain_allowed(&["*".to_string()], "victim.org"));
    }

    use super::*;

    #[test]
    fn patterns() {
        assert!(matches("*@acme.example", "billing@ACME.example"));
        assert!(!matches("*@acme.example", "billing@evil-acme.example"));
        assert!(!matches("*@acme.example", "billing@sub.acme.example"));
        assert!(matches("*@*.acme.example", "x@eu.acme.example"));
        assert!(!matches("*@*.acme.example", "x@acme.example"));
        assert!(!matches("*@*.acme.example", "x@evilacme.example"));
        assert!(matches("billing@acme.example", "billing@acme.example"));
        assert!(!matches("billing@acme.example", "sales@acme.example"));
        assert!(matches("*", "anyone@anywhere.example"));
        assert!(!matches("*@acme.example", ""));
        // Non-ASCII domains (SMTPUTF8) are compared without panicking.
        assert!(!matches("*@*.acme.example", "x@a\u{e9}bbbbbbbbbbb"));
        assert!(matches("*@*.acme.example", "x@b\u{fc}cher.acme.example"));
    }

    #[test]
    fn pattern_forms() {
        assert!(validate_pattern("*@acme.example").is_ok());
        assert!(validate_pattern("*@*.acme.example").is_ok());
        assert!(validate_pattern("acme.example").is_err());
        assert!(validate_pattern("*@*").is_err());
        assert!(validate_pattern("a*b@acme.example").is_err());
    }
}
