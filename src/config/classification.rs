//! `[classification]`: rules that label delivery failures, tried before the
//! built-in ones (`deliver::classify` applies them).

use serde::Deserialize;

use crate::event::{Classification, Reason};

/// `[classification]`: extra rules, tried in order before the defaults.
///
/// ```toml
/// [[classification.rules]]
/// match = "mailbox is over its size limit"   # substring, any case
/// status = "5.2"                               # optional enhanced-code prefix
/// reason = "mailbox_full"                     # or category = "..."; see below
/// permanent = false                            # optional; default: the code's
/// ```
///
/// A rule names a `reason` (the finer taxonomy, [`Reason`]), a `category`
/// ([`Classification`]) or both; a reason alone implies its category, a
/// category alone its most common reason (`invalid_recipient` →
/// `user_unknown`, which may suppress).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct ClassificationConfig {
    pub rules: Vec<Rule>,
}

/// One configured rule; it matches when every condition given holds.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawRule")]
pub struct Rule {
    /// Lower-cased substring of the reply text.
    pub needle: Option<String>,
    /// Enhanced status code prefix, by components: `[5]`, `[5, 7]`, `[5, 7, 1]`.
    pub status: Option<Vec<u16>>,
    /// Basic reply code, exactly.
    pub code: Option<u16>,
    pub category: Classification,
    pub reason: Reason,
    /// Overrides the permanence the code implies.
    pub permanent: Option<bool>,
}

/// A rule as written in the config.
#[derive(Deserialize)]
struct RawRule {
    #[serde(rename = "match")]
    needle: Option<String>,
    status: Option<String>,
    code: Option<u16>,
    category: Option<Classification>,
    reason: Option<Reason>,
    permanent: Option<bool>,
}

impl TryFrom<RawRule> for Rule {
    type Error = String;

    fn try_from(r: RawRule) -> Result<Rule, String> {
        let needle = r.needle.map(|m| m.to_lowercase());
        if needle.as_deref() == Some("") {
            return Err("match must not be empty".into());
        }
        let status = r.status.as_deref().map(status_prefix).transpose()?;
        if needle.is_none() && status.is_none() && r.code.is_none() {
            return Err("a rule needs at least one of match, status, code".into());
        }
        if r.code.is_some_and(|c| !(200..600).contains(&c)) {
            return Err("code must be an SMTP reply code (200-599)".into());
        }
        let (category, reason) = match (r.category, r.reason) {
            (Some(c), Some(r)) if r.classification() != c => {
                return Err(format!(
                    "reason {r} belongs to category {:?}, not {c:?}; give one of them",
                    r.classification()
                ));
            }
            (Some(c), Some(r)) => (c, r),
            (Some(c), None) => (c, Reason::of_classification(c)),
            (None, Some(r)) => (r.classification(), r),
            (None, None) => return Err("a rule needs a reason or a category".into()),
        };
        Ok(Rule {
            needle,
            status,
            code: r.code,
            category,
            reason,
            permanent: r.permanent,
        })
    }
}

/// `"5"`, `"5.7"`, `"5.7.1"` (a trailing dot allowed) → components.
fn status_prefix(s: &str) -> Result<Vec<u16>, String> {
    let err = || {
        format!(
            "status {s:?} is not an enhanced status code or a prefix of one, like \"5.7\" or \"5.1.1\""
        )
    };
    let parts: Vec<u16> = s
        .trim()
        .trim_end_matches('.')
        .split('.')
        .map(|p| p.parse::<u16>().map_err(|_| err()))
        .collect::<Result<_, _>>()?;
    if parts.is_empty()
        || parts.len() > 3
        || !matches!(parts[0], 2 | 4 | 5)
        || parts.iter().any(|p| *p > 999)
    {
        return Err(err());
    }
    Ok(parts)
}
