//! Suspensions and tenant pauses in the admin API (see [`crate::control`]),
//! and the `herald suspend|resume|suspensions|tenant` commands.
//!
//! | method and path | what it does |
//! | --- | --- |
//! | `GET /api/suspensions` | suspended domains and tenants, paused tenants |
//! | `POST /api/suspensions` | `{"domain": D}` or `{"tenant": T}` (and `"reason"`): suspend delivery |
//! | `DELETE /api/suspensions/domain/{d}` | resume delivery to `d`: its waiting recipients are due now |
//! | `DELETE /api/suspensions/tenant/{t}` | resume delivery of `t`'s mail, the same way |
//! | `GET /api/tenants/{name}` | the tenant's pause, suspension and reputation rates |
//! | `POST /api/tenants/{name}/resume` | lift the tenant's reputation pause |
//!
//! A suspension holds delivery only: mail is still accepted and queued. A
//! pause refuses the tenant's submissions (MAIL FROM) and is lifted only by
//! a postmaster.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{Method, StatusCode};
use serde::{Deserialize, Serialize};

use super::AdminState;
use super::api::{ApiError, Authorized};
use super::cli::{Client, age, parse, percent_encode, pretty, table};
use crate::clock::rfc3339;
use crate::clock::unix_now;
use crate::config::AdminConfig;
use crate::control::{ControlError, Pause, PauseReply, Rates, Suspension, reputation::percent};

/// What a suspension holds back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SuspensionKind {
    /// Mail to a recipient domain.
    Domain,
    /// Mail from a tenant.
    Tenant,
}

impl std::fmt::Display for SuspensionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SuspensionKind::Domain => "domain",
            SuspensionKind::Tenant => "tenant",
        })
    }
}

/// One suspension as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SuspensionView {
    pub kind: SuspensionKind,
    pub name: String,
    /// RFC 3339.
    pub since: String,
    pub age_seconds: u64,
    #[serde(default)]
    pub reason: Option<String>,
}

impl SuspensionView {
    fn new(kind: SuspensionKind, name: &str, s: &Suspension) -> SuspensionView {
        SuspensionView {
            kind,
            name: name.into(),
            since: rfc3339(s.since),
            age_seconds: unix_now().saturating_sub(s.since),
            reason: s.reason.clone(),
        }
    }
}

/// A tenant's reputation pause.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PauseView {
    pub tenant: String,
    /// RFC 3339.
    pub since: String,
    pub age_seconds: u64,
    pub reason: String,
    /// The tenant's window when the pause began.
    pub rates: Rates,
}

impl PauseView {
    fn new(tenant: &str, p: &Pause) -> PauseView {
        PauseView {
            tenant: tenant.into(),
            since: rfc3339(p.since),
            age_seconds: unix_now().saturating_sub(p.since),
            reason: p.reason.clone(),
            rates: p.rates,
        }
    }
}

/// `GET /api/suspensions`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SuspensionListing {
    pub domains: Vec<SuspensionView>,
    pub tenants: Vec<SuspensionView>,
    /// Tenants whose submissions are paused for reputation.
    pub paused_tenants: Vec<PauseView>,
}

/// The body of `POST /api/suspensions`: exactly one of `domain`, `tenant`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewSuspension {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The answer to `POST /api/suspensions` (201 when new, 200 when it was
/// already suspended: the existing suspension is kept).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SuspendResult {
    pub suspension: SuspensionView,
    pub new: bool,
}

/// The answer to `DELETE /api/suspensions/...`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResumeResult {
    /// The suspension lifted.
    pub suspension: SuspensionView,
    /// Queued messages whose waiting recipients were made due now.
    pub messages: usize,
}

/// `[reputation]` and the tenant's window now.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReputationView {
    pub enabled: bool,
    pub window: usize,
    pub min_volume: usize,
    pub max_hard_bounce_rate: f64,
    pub max_complaint_rate: f64,
    pub reply: PauseReply,
    /// The last `window` recipients' outcomes (in memory since start or the
    /// last resume).
    pub rates: Rates,
}

/// `GET /api/tenants/{name}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TenantView {
    pub tenant: String,
    /// Submissions paused for reputation.
    #[serde(default)]
    pub paused: Option<PauseView>,
    /// Delivery of its mail suspended by a postmaster.
    #[serde(default)]
    pub delivery_suspended: Option<SuspensionView>,
    pub reputation: ReputationView,
}

/// `POST /api/tenants/{name}/resume`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TenantResumed {
    pub tenant: String,
    /// The pause lifted.
    pub pause: PauseView,
}

fn control_error(e: ControlError) -> ApiError {
    match e {
        ControlError::Invalid(m) => ApiError::new(StatusCode::BAD_REQUEST, m),
        e @ ControlError::Save { .. } => {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
    }
}

/// 404 for a tenant the config does not name (and the state does not hold).
fn known_tenant(st: &AdminState, name: &str) -> Result<(), ApiError> {
    let s = st.control.snapshot();
    if s.paused_tenants.contains_key(name) || s.suspended_tenants.contains_key(name) {
        return Ok(());
    }
    st.control.check_tenant(name).map_err(|e| match e {
        ControlError::Invalid(m) => ApiError::new(StatusCode::NOT_FOUND, m),
        e => control_error(e),
    })
}

pub async fn list(_: Authorized, State(st): State<Arc<AdminState>>) -> Json<SuspensionListing> {
    let s = st.control.snapshot();
    Json(SuspensionListing {
        domains: s
            .suspended_domains
            .iter()
            .map(|(n, s)| SuspensionView::new(SuspensionKind::Domain, n, s))
            .collect(),
        tenants: s
            .suspended_tenants
            .iter()
            .map(|(n, s)| SuspensionView::new(SuspensionKind::Tenant, n, s))
            .collect(),
        paused_tenants: s
            .paused_tenants
            .iter()
            .map(|(n, p)| PauseView::new(n, p))
            .collect(),
    })
}

pub async fn suspend(
    _: Authorized,
    State(st): State<Arc<AdminState>>,
    body: Result<Json<NewSuspension>, JsonRejection>,
) -> Result<(StatusCode, Json<SuspendResult>), ApiError> {
    let usage =
        "send {\"domain\": \"example.com\"} or {\"tenant\": \"name\"}, with an optional \"reason\"";
    let Json(n) = body.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{}; {usage}", e.body_text()),
        )
    })?;
    let (view, new) = match (n.domain, n.tenant) {
        (Some(d), None) => {
            let (d, s, new) = st
                .control
                .suspend_domain(&d, n.reason)
                .await
                .map_err(control_error)?;
            (SuspensionView::new(SuspensionKind::Domain, &d, &s), new)
        }
        (None, Some(t)) => {
            st.control.check_tenant(&t).map_err(|e| match e {
                ControlError::Invalid(m) => ApiError::new(StatusCode::NOT_FOUND, m),
                e => control_error(e),
            })?;
            let (s, new) = st
                .control
                .suspend_tenant(&t, n.reason)
                .await
                .map_err(control_error)?;
            (SuspensionView::new(SuspensionKind::Tenant, &t, &s), new)
        }
        _ => return Err(ApiError::new(StatusCode::BAD_REQUEST, usage)),
    };
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(SuspendResult {
            suspension: view,
            new,
        }),
    ))
}

pub async fn resume(
    _: Authorized,
    State(st): State<Arc<AdminState>>,
    Path((kind, name)): Path<(String, String)>,
) -> Result<Json<ResumeResult>, ApiError> {
    match kind.as_str() {
        "domain" => {
            let Some((d, s)) = st
                .control
                .resume_domain(&name)
                .await
                .map_err(control_error)?
            else {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!("delivery to {name} is not suspended"),
                ));
            };
            // After the resume: a job checked before it is back in the
            // queue by now (see control::Inner::gate) and is found here.
            let messages = st.queue.retry_where(|_, r| r.domain() == d);
            Ok(Json(ResumeResult {
                suspension: SuspensionView::new(SuspensionKind::Domain, &d, &s),
                messages,
            }))
        }
        "tenant" => {
            let Some(s) = st
                .control
                .resume_tenant(&name)
                .await
                .map_err(control_error)?
            else {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!("delivery for tenant {name:?} is not suspended"),
                ));
            };
            let messages = st
                .queue
                .retry_where(|env, _| env.tenant.as_deref() == Some(name.as_str()));
            Ok(Json(ResumeResult {
                suspension: SuspensionView::new(SuspensionKind::Tenant, &name, &s),
                messages,
            }))
        }
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no such suspension kind {kind:?}: use /api/suspensions/domain/D or /api/suspensions/tenant/T"
            ),
        )),
    }
}

pub async fn tenant(
    _: Authorized,
    State(st): State<Arc<AdminState>>,
    Path(name): Path<String>,
) -> Result<Json<TenantView>, ApiError> {
    known_tenant(&st, &name)?;
    let s = st.control.snapshot();
    let c = st.control.reputation_config();
    Ok(Json(TenantView {
        paused: s
            .paused_tenants
            .get(&name)
            .map(|p| PauseView::new(&name, p)),
        delivery_suspended: s
            .suspended_tenants
            .get(&name)
            .map(|x| SuspensionView::new(SuspensionKind::Tenant, &name, x)),
        reputation: ReputationView {
            enabled: c.enabled,
            window: c.window,
            min_volume: c.min_volume,
            max_hard_bounce_rate: c.max_hard_bounce_rate,
            max_complaint_rate: c.max_complaint_rate,
            reply: c.reply,
            rates: st.control.rates(&name),
        },
        tenant: name,
    }))
}

pub async fn resume_tenant(
    _: Authorized,
    State(st): State<Arc<AdminState>>,
    Path(name): Path<String>,
) -> Result<Json<TenantResumed>, ApiError> {
    known_tenant(&st, &name)?;
    match st
        .control
        .resume_submissions(&name)
        .await
        .map_err(control_error)?
    {
        Some(p) => Ok(Json(TenantResumed {
            pause: PauseView::new(&name, &p),
            tenant: name,
        })),
        None => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("tenant {name:?} is not paused"),
        )),
    }
}

// ---- CLI ----

/// `herald suspend|resume|suspensions|tenant`: flattened into the top-level
/// commands.
#[derive(Debug, clap::Subcommand)]
pub enum ControlCommand {
    /// Suspend delivery to a destination domain or for a tenant: mail is
    /// still accepted and stays queued; nothing is attempted or bounced.
    Suspend {
        #[command(subcommand)]
        target: SuspendTarget,
    },
    /// Resume delivery to a domain or for a tenant: its waiting recipients
    /// are tried at once.
    Resume {
        #[command(subcommand)]
        target: ResumeTarget,
    },
    /// List suspended domains and tenants, and tenants paused for reputation.
    Suspensions {
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// A tenant's reputation: `tenant show NAME`, `tenant resume NAME`.
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum SuspendTarget {
    /// Suspend delivery to this recipient domain (exact name).
    Domain {
        domain: String,
        /// A note for other postmasters, shown in `herald suspensions`.
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Suspend delivery of this tenant's mail.
    Tenant {
        tenant: String,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum ResumeTarget {
    /// Resume delivery to this recipient domain.
    Domain {
        domain: String,
        #[arg(long)]
        json: bool,
    },
    /// Resume delivery of this tenant's mail.
    Tenant {
        tenant: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum TenantCommand {
    /// Show a tenant's reputation rates, pause and delivery suspension.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Lift a tenant's reputation pause: its submissions are accepted again.
    Resume {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

impl ControlCommand {
    /// The command's name, for error messages (`herald suspend: ...`).
    pub fn name(&self) -> &'static str {
        match self {
            ControlCommand::Suspend { .. } => "suspend",
            ControlCommand::Resume { .. } => "resume",
            ControlCommand::Suspensions { .. } => "suspensions",
            ControlCommand::Tenant { .. } => "tenant",
        }
    }
}

/// Runs one command against the admin API; returns what to print, or the
/// error to report (exit status non-zero).
pub async fn run(admin: &AdminConfig, cmd: ControlCommand) -> Result<String, String> {
    let client = Client::new(admin)?;
    match cmd {
        ControlCommand::Suspend { target } => {
            let (req, json) = match target {
                SuspendTarget::Domain {
                    domain,
                    reason,
                    json,
                } => (
                    NewSuspension {
                        domain: Some(domain),
                        tenant: None,
                        reason,
                    },
                    json,
                ),
                SuspendTarget::Tenant {
                    tenant,
                    reason,
                    json,
                } => (
                    NewSuspension {
                        domain: None,
                        tenant: Some(tenant),
                        reason,
                    },
                    json,
                ),
            };
            let req = serde_json::to_vec(&req).map_err(|e| e.to_string())?;
            let body = client
                .call_with_body(Method::POST, "/api/suspensions", req)
                .await?;
            if json {
                return Ok(pretty(&body));
            }
            let r = parse::<SuspendResult>(&body)?;
            let what = label(&r.suspension);
            Ok(if r.new {
                format!("{what}: delivery suspended; mail is accepted and kept in the queue")
            } else {
                format!(
                    "{what}: delivery was already suspended since {}",
                    r.suspension.since
                )
            })
        }
        ControlCommand::Resume { target } => {
            let (kind, name, json) = match target {
                ResumeTarget::Domain { domain, json } => ("domain", domain, json),
                ResumeTarget::Tenant { tenant, json } => ("tenant", tenant, json),
            };
            let path = format!("/api/suspensions/{kind}/{}", percent_encode(&name));
            let body = client.call(Method::DELETE, &path).await?;
            if json {
                return Ok(pretty(&body));
            }
            let r = parse::<ResumeResult>(&body)?;
            Ok(format!(
                "{}: delivery resumed after {}; {} queued message(s) will be tried now",
                label(&r.suspension),
                age(r.suspension.age_seconds),
                r.messages
            ))
        }
        ControlCommand::Suspensions { json } => {
            let body = client.call(Method::GET, "/api/suspensions").await?;
            if json {
                return Ok(pretty(&body));
            }
            Ok(listing_text(&parse::<SuspensionListing>(&body)?))
        }
        ControlCommand::Tenant { command } => match command {
            TenantCommand::Show { name, json } => {
                let path = format!("/api/tenants/{}", percent_encode(&name));
                let body = client.call(Method::GET, &path).await?;
                if json {
                    return Ok(pretty(&body));
                }
                Ok(tenant_text(&parse::<TenantView>(&body)?))
            }
            TenantCommand::Resume { name, json } => {
                let path = format!("/api/tenants/{}/resume", percent_encode(&name));
                let body = client.call(Method::POST, &path).await?;
                if json {
                    return Ok(pretty(&body));
                }
                let r = parse::<TenantResumed>(&body)?;
                Ok(format!(
                    "tenant {}: submissions resumed (paused since {}: {}); its reputation window starts afresh",
                    r.tenant, r.pause.since, r.pause.reason
                ))
            }
        },
    }
}

fn label(s: &SuspensionView) -> String {
    format!("{} {}", s.kind, s.name)
}

fn listing_text(l: &SuspensionListing) -> String {
    let mut rows: Vec<Vec<String>> = l
        .domains
        .iter()
        .chain(&l.tenants)
        .map(|s| {
            vec![
                s.kind.to_string(),
                s.name.clone(),
                "delivery suspended".into(),
                format!("{} ({} ago)", s.since, age(s.age_seconds)),
                s.reason.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    rows.extend(l.paused_tenants.iter().map(|p| {
        vec![
            "tenant".into(),
            p.tenant.clone(),
            "submissions paused".into(),
            format!("{} ({} ago)", p.since, age(p.age_seconds)),
            p.reason.clone(),
        ]
    }));
    if rows.is_empty() {
        return "nothing is suspended or paused".into();
    }
    let mut out = table(&["KIND", "NAME", "STATE", "SINCE", "REASON"], &rows);
    let _ = write!(
        out,
        "{} domain(s) and {} tenant(s) suspended, {} tenant(s) paused",
        l.domains.len(),
        l.tenants.len(),
        l.paused_tenants.len()
    );
    out
}

fn tenant_text(t: &TenantView) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Tenant:       {}", t.tenant);
    match &t.paused {
        Some(p) => {
            let _ = writeln!(
                out,
                "Submissions:  PAUSED since {} ({} ago): {}",
                p.since,
                age(p.age_seconds),
                p.reason
            );
            let _ = writeln!(
                out,
                "              resume with: herald tenant resume {}",
                t.tenant
            );
        }
        None => {
            let _ = writeln!(out, "Submissions:  accepted");
        }
    }
    match &t.delivery_suspended {
        Some(s) => {
            let _ = writeln!(
                out,
                "Delivery:     SUSPENDED since {} ({} ago){}",
                s.since,
                age(s.age_seconds),
                s.reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            );
        }
        None => {
            let _ = writeln!(out, "Delivery:     running");
        }
    }
    let r = &t.reputation;
    let _ = writeln!(
        out,
        "Reputation:   {} recipient(s) counted (window {}, since start or resume): {} hard bounce(s) ({}, limit {}), {} complaint(s) ({}, limit {})",
        r.rates.recipients,
        r.window,
        r.rates.hard_bounces,
        percent(r.rates.hard_bounce_rate),
        percent(r.max_hard_bounce_rate),
        r.rates.complaints,
        percent(r.rates.complaint_rate),
        percent(r.max_complaint_rate),
    );
    let guard = if !r.enabled {
        "off".to_string()
    } else if r.rates.recipients < r.min_volume {
        format!(
            "on; no verdict before {} recipients are counted",
            r.min_volume
        )
    } else {
        "on".to_string()
    };
    let _ = write!(out, "Guard:        {guard}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_shows_suspensions_and_pauses() {
        let l = SuspensionListing {
            domains: vec![SuspensionView {
                kind: SuspensionKind::Domain,
                name: "one.test".into(),
                since: rfc3339(1000),
                age_seconds: 250,
                reason: None,
            }],
            tenants: Vec::new(),
            paused_tenants: vec![PauseView {
                tenant: "acme".into(),
                since: rfc3339(2000),
                age_seconds: 45,
                reason:
                    "hard-bounce rate 10% (10 of the last 100 recipients) is over the limit of 5%"
                        .into(),
                rates: Rates::default(),
            }],
        };
        let t = listing_text(&l);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("KIND    NAME"), "{t}");
        assert!(lines[1].contains("one.test  delivery suspended"), "{t}");
        assert!(lines[2].contains("submissions paused"), "{t}");
        assert!(lines[2].contains("(45s ago)"), "{t}");
        assert_eq!(
            lines[3],
            "1 domain(s) and 0 tenant(s) suspended, 1 tenant(s) paused"
        );
        let empty = SuspensionListing {
            domains: Vec::new(),
            tenants: Vec::new(),
            paused_tenants: Vec::new(),
        };
        assert_eq!(listing_text(&empty), "nothing is suspended or paused");
    }
}
