//! The suppression list in the admin API, and `herald suppression ...`.
//!
//! | method and path | what it does |
//! | --- | --- |
//! | `GET /api/suppressions[?tenant=T]` | active entries, of one tenant or all |
//! | `POST /api/suppressions` | add `{"tenant", "address", "reason"?, "expire_after"?}` |
//! | `DELETE /api/suppressions/{address}[?tenant=T]` | remove one entry |
//!
//! `tenant` is a tenant's name; empty or absent (for POST and DELETE) is the
//! list of trusted-network mail sent without AUTH. The API is the
//! postmaster's: it shows every tenant's entries. SMTP clients only ever see
//! their own tenant's entry, in the RCPT reply.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{Method, StatusCode};
use serde::{Deserialize, Serialize};

use super::AdminState;
use super::api::{ApiError, Authorized};
use super::cli::{Client, age, parse, percent_encode, pretty, table};
use crate::clock::rfc3339;
use crate::clock::unix_now;
use crate::config::{AdminConfig, Span};
use crate::suppression::{Entry, NO_TENANT, Source, StoreError};

/// One entry as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SuppressionView {
    /// Empty for trusted-network mail without a tenant.
    pub tenant: String,
    pub address: String,
    pub reason: String,
    /// `bounce`, `complaint` or `manual`.
    pub source: Source,
    /// The message whose bounce or complaint added it.
    #[serde(default)]
    pub queue_id: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    /// Seconds since `created_at`.
    pub age_seconds: u64,
    /// RFC 3339; none = never.
    #[serde(default)]
    pub expires_at: Option<String>,
}

impl From<&Entry> for SuppressionView {
    fn from(e: &Entry) -> Self {
        SuppressionView {
            tenant: e.tenant.clone(),
            address: e.address.clone(),
            reason: e.reason.clone(),
            source: e.source,
            queue_id: e.queue_id.clone(),
            created_at: rfc3339(e.created_at),
            age_seconds: unix_now().saturating_sub(e.created_at),
            expires_at: e.expires_at.map(rfc3339),
        }
    }
}

/// `GET /api/suppressions`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SuppressionListing {
    pub total: usize,
    /// Sorted by tenant, then address.
    pub suppressions: Vec<SuppressionView>,
}

/// The body of `POST /api/suppressions`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewSuppression {
    #[serde(default)]
    pub tenant: String,
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// e.g. `30d`; default `[suppression] expire_after`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_after: Option<String>,
}

/// `?tenant=` of list and delete.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantQuery {
    pub tenant: Option<String>,
}

fn store_error(e: StoreError) -> ApiError {
    tracing::error!(error = %e, "admin: suppression list");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

fn tenant_label(tenant: &str) -> String {
    if tenant == NO_TENANT {
        "trusted-network mail without a tenant".into()
    } else {
        format!("tenant {tenant:?}")
    }
}

pub async fn list(
    _: Authorized,
    State(st): State<Arc<AdminState>>,
    query: Result<Query<TenantQuery>, QueryRejection>,
) -> Result<Json<SuppressionListing>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let entries = st
        .suppressions
        .list(q.tenant.as_deref())
        .await
        .map_err(store_error)?;
    Ok(Json(SuppressionListing {
        total: entries.len(),
        suppressions: entries.iter().map(SuppressionView::from).collect(),
    }))
}

pub async fn add(
    _: Authorized,
    State(st): State<Arc<AdminState>>,
    body: Result<Json<NewSuppression>, JsonRejection>,
) -> Result<(StatusCode, Json<SuppressionView>), ApiError> {
    let Json(n) = body.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "{}; send {{\"tenant\": \"...\", \"address\": \"...\", \"reason\": \"...\"}}",
                e.body_text()
            ),
        )
    })?;
    let expire_after = n
        .expire_after
        .as_deref()
        .map(|s| {
            Span::parse(s)
                .map(|s| s.as_duration().as_secs())
                .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("expire_after: {e}")))
        })
        .transpose()?;
    let entry = st
        .suppressions
        .manual_entry(&n.tenant, &n.address, n.reason.as_deref(), expire_after)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    let view = SuppressionView::from(&entry);
    st.suppressions.add(entry).await.map_err(store_error)?;
    Ok((StatusCode::CREATED, Json(view)))
}

pub async fn remove(
    _: Authorized,
    State(st): State<Arc<AdminState>>,
    Path(address): Path<String>,
    query: Result<Query<TenantQuery>, QueryRejection>,
) -> Result<Json<SuppressionView>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let tenant = q.tenant.as_deref().unwrap_or(NO_TENANT);
    match st.suppressions.remove(tenant, &address).await {
        Ok(Some(e)) => Ok(Json(SuppressionView::from(&e))),
        Ok(None) => {
            // Say where it is instead, so that a missing --tenant is obvious.
            let elsewhere: Vec<String> = st
                .suppressions
                .list(None)
                .await
                .map_err(store_error)?
                .into_iter()
                .filter(|e| e.address == crate::suppression::normalize(&address))
                .map(|e| tenant_label(&e.tenant))
                .collect();
            let hint = if elsewhere.is_empty() {
                String::new()
            } else {
                format!(
                    "; it is on the list of {} (give the tenant)",
                    elsewhere.join(", ")
                )
            };
            Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "{address} is not on the suppression list of {}{hint}",
                    tenant_label(tenant)
                ),
            ))
        }
        Err(e) => Err(store_error(e)),
    }
}

/// `herald suppression` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum SuppressionCommand {
    /// List the suppressed addresses, by tenant.
    List {
        /// Only this tenant's entries ("" for trusted-network mail without AUTH).
        #[arg(long)]
        tenant: Option<String>,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop sending to an address: RCPT TO to it is refused with 550 5.1.1.
    Add {
        address: String,
        /// The tenant whose mail to it is refused; omitted = trusted-network
        /// mail without AUTH.
        #[arg(long, default_value = "")]
        tenant: String,
        /// Why, shown in the SMTP refusal.
        #[arg(long)]
        reason: Option<String>,
        /// Lift it automatically after this long, e.g. 30d (default:
        /// `[suppression] expire_after`).
        #[arg(long)]
        expire_after: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Allow sending to an address again.
    Remove {
        address: String,
        /// The tenant's list; omitted = trusted-network mail without AUTH.
        #[arg(long, default_value = "")]
        tenant: String,
        #[arg(long)]
        json: bool,
    },
}

/// Runs one command against the admin API; returns what to print, or the
/// error to report (exit status non-zero).
pub async fn run(admin: &AdminConfig, cmd: SuppressionCommand) -> Result<String, String> {
    let client = Client::new(admin)?;
    match cmd {
        SuppressionCommand::List { tenant, json } => {
            let query = tenant
                .map(|t| format!("?tenant={}", percent_encode(&t)))
                .unwrap_or_default();
            let body = client
                .call(Method::GET, &format!("/api/suppressions{query}"))
                .await?;
            if json {
                return Ok(pretty(&body));
            }
            Ok(list_table(&parse::<SuppressionListing>(&body)?))
        }
        SuppressionCommand::Add {
            address,
            tenant,
            reason,
            expire_after,
            json,
        } => {
            let req = NewSuppression {
                tenant,
                address,
                reason,
                expire_after,
            };
            let req = serde_json::to_vec(&req).map_err(|e| e.to_string())?;
            let body = client
                .call_with_body(Method::POST, "/api/suppressions", req)
                .await?;
            if json {
                return Ok(pretty(&body));
            }
            let v = parse::<SuppressionView>(&body)?;
            let until = match &v.expires_at {
                Some(t) => format!(" until {t}"),
                None => String::new(),
            };
            Ok(format!(
                "{}: added to the suppression list of {}{until}",
                v.address,
                tenant_label(&v.tenant)
            ))
        }
        SuppressionCommand::Remove {
            address,
            tenant,
            json,
        } => {
            let path = format!(
                "/api/suppressions/{}?tenant={}",
                percent_encode(&address),
                percent_encode(&tenant)
            );
            let body = client.call(Method::DELETE, &path).await?;
            if json {
                return Ok(pretty(&body));
            }
            let v = parse::<SuppressionView>(&body)?;
            Ok(format!(
                "{}: removed from the suppression list of {}",
                v.address,
                tenant_label(&v.tenant)
            ))
        }
    }
}

fn list_table(l: &SuppressionListing) -> String {
    if l.suppressions.is_empty() {
        return "no suppressed addresses".into();
    }
    let rows: Vec<Vec<String>> = l
        .suppressions
        .iter()
        .map(|s| {
            vec![
                if s.tenant.is_empty() {
                    "-".into()
                } else {
                    s.tenant.clone()
                },
                s.address.clone(),
                s.source.as_str().into(),
                format!("{} ({} ago)", s.created_at, age(s.age_seconds)),
                s.expires_at.clone().unwrap_or_else(|| "never".into()),
                s.reason.clone(),
            ]
        })
        .collect();
    let mut out = table(
        &["TENANT", "ADDRESS", "SOURCE", "SINCE", "EXPIRES", "REASON"],
        &rows,
    );
    let _ = write!(out, "{} suppressed address(es)", l.total);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_table() {
        let l = SuppressionListing {
            total: 1,
            suppressions: vec![SuppressionView {
                tenant: String::new(),
                address: "bob@one.test".into(),
                reason: "550 5.1.1 user unknown".into(),
                source: Source::Bounce,
                queue_id: None,
                created_at: rfc3339(1000),
                age_seconds: 250,
                expires_at: None,
            }],
        };
        let t = list_table(&l);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("TENANT  ADDRESS"), "{t}");
        assert!(
            lines[1].starts_with(
                "-       bob@one.test  bounce  1970-01-01T00:16:40Z (4m10s ago)  never"
            ),
            "{t}"
        );
        assert_eq!(lines[2], "1 suppressed address(es)");
    }
}
