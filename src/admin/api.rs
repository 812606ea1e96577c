//! The JSON resources of the admin API and their handlers. The response
//! types are shared with the `herald queue` commands, which read them back.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::AdminState;
use crate::clock::{rfc3339, unix_now};
use crate::config::Span;
use crate::envelope::{QueueId, RcptStatus, Recipient};
use crate::metrics::{Gauges, TOP_DOMAINS};
use crate::queue::MessageView;
use crate::queue::spool::SpoolDamage;
use crate::report::SmtpDetail;

/// An error answered as `{"error": "..."}` with its status code. The text
/// is written for the postmaster and never carries a secret.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    fn unknown(id: QueueId) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("message {id} is unknown, or finished longer ago than [history] retention"),
        )
    }

    fn not_queued(id: QueueId) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "message {id} is not in the queue (unknown, or finished: its recipients' outcomes are in the events)"
            ),
        )
    }
}

/// The body of every error response.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"herald\""),
            );
        }
        resp
    }
}

/// Proof that the request carried the configured bearer token. Every
/// `/api` handler takes one.
pub struct Authorized;

impl FromRequestParts<Arc<AdminState>> for Authorized {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AdminState>,
    ) -> Result<Self, ApiError> {
        let Some(token) = &state.token else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "the admin API is disabled: set [admin] token in the config",
            ));
        };
        let given = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim());
        match given {
            None => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing bearer token (Authorization: Bearer <[admin] token>)",
            )),
            Some(t) if constant_time_eq(t.as_bytes(), token.expose().as_bytes()) => Ok(Authorized),
            Some(_) => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "wrong bearer token",
            )),
        }
    }
}

/// Compares without an early exit, so the time taken says nothing about
/// how much of the token was right (only whether its length was).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn parse_id(s: &str) -> Result<QueueId, ApiError> {
    s.parse()
        .map_err(|e: String| ApiError::new(StatusCode::BAD_REQUEST, e))
}

/// One message in a queue listing.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MessageSummary {
    pub id: String,
    #[serde(default)]
    pub tenant: Option<String>,
    pub sender: String,
    #[serde(default)]
    pub message_id: Option<String>,
    /// RFC 3339.
    pub received_at: String,
    pub age_seconds: u64,
    pub size: u64,
    /// Number of recipients by status (`pending`, `deferred`, ...).
    pub recipients: BTreeMap<String, usize>,
    /// Domains of the recipients still waiting.
    pub domains: Vec<String>,
    /// The earliest next attempt of a waiting recipient, RFC 3339.
    #[serde(default)]
    pub next_attempt: Option<String>,
    /// The latest reply to a waiting recipient, as `code enhanced text`.
    #[serde(default)]
    pub last_reply: Option<String>,
}

/// `GET /api/queue`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QueueListing {
    /// Messages in the whole queue.
    pub total: usize,
    /// Those that matched the filters, oldest first.
    pub messages: Vec<MessageSummary>,
    /// Present only when the spool's replay found damage at start-up or
    /// files are kept in its `corrupt/` directory: counts, the queue ids
    /// lost or possibly delivered again, and the files kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spool_damage: Option<SpoolDamage>,
}

/// One recipient's state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecipientStatus {
    pub address: String,
    pub status: RcptStatus,
    pub attempts: u32,
    /// RFC 3339; only for recipients still waiting.
    #[serde(default)]
    pub next_attempt: Option<String>,
    /// RFC 3339 of the last status change; none before the first attempt.
    #[serde(default)]
    pub updated_at: Option<String>,
    #[serde(default)]
    pub last_reply: Option<SmtpDetail>,
    /// The host that gave the last reply.
    #[serde(default)]
    pub last_mx: Option<String>,
}

/// `GET /api/queue/{id}` and `GET /api/messages/{id}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MessageDetail {
    pub id: String,
    #[serde(default)]
    pub tenant: Option<String>,
    pub sender: String,
    #[serde(default)]
    pub message_id: Option<String>,
    pub received_at: String,
    pub age_seconds: u64,
    pub size: u64,
    pub client_ip: String,
    pub recipients: Vec<RecipientStatus>,
    /// `true` once every recipient is final and the message has left the
    /// queue (it is then shown from `[history]`).
    #[serde(default)]
    pub finished: bool,
}

/// The reply to retry, delete and flush.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ActionResult {
    /// What was done: `retry`, `delete` or `flush`.
    pub action: String,
    /// The message acted on (retry, delete).
    #[serde(default)]
    pub id: Option<String>,
    /// Messages concerned.
    pub messages: usize,
}

fn status_name(s: RcptStatus) -> &'static str {
    match s {
        RcptStatus::Pending => "pending",
        RcptStatus::Deferred => "deferred",
        RcptStatus::Delivered => "delivered",
        RcptStatus::Bounced => "bounced",
        RcptStatus::Expired => "expired",
    }
}

fn parse_status(s: &str) -> Result<RcptStatus, ApiError> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "pending" => RcptStatus::Pending,
        "deferred" => RcptStatus::Deferred,
        "delivered" => RcptStatus::Delivered,
        "bounced" => RcptStatus::Bounced,
        "expired" => RcptStatus::Expired,
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("state {s:?} is not one of pending, deferred, delivered, bounced, expired"),
            ));
        }
    })
}

fn summary(m: &MessageView, now: u64) -> MessageSummary {
    let mut recipients = BTreeMap::new();
    let mut domains: Vec<String> = Vec::new();
    let mut next: Option<u64> = None;
    let mut last: Option<(u64, &Recipient)> = None;
    for r in &m.recipients {
        *recipients
            .entry(status_name(r.status).to_string())
            .or_insert(0) += 1;
        if r.status.is_final() {
            continue;
        }
        let d = r.domain();
        if !domains.contains(&d) {
            domains.push(d);
        }
        next = Some(next.map_or(r.next_attempt, |n| n.min(r.next_attempt)));
        if r.last_reply.is_some() && last.is_none_or(|(t, _)| r.updated_at > t) {
            last = Some((r.updated_at, r));
        }
    }
    MessageSummary {
        id: m.id.to_string(),
        tenant: m.envelope.tenant.clone(),
        sender: m.envelope.sender.clone(),
        message_id: m.envelope.message_id.clone(),
        received_at: rfc3339(m.envelope.received_at),
        age_seconds: now.saturating_sub(m.envelope.received_at),
        size: m.size,
        recipients,
        domains,
        next_attempt: next.map(rfc3339),
        last_reply: last
            .and_then(|(_, r)| r.last_reply.as_ref())
            .map(|r| SmtpDetail::from(r).to_string()),
    }
}

fn detail(m: &MessageView, now: u64) -> MessageDetail {
    MessageDetail {
        finished: m.recipients.iter().all(|r| r.status.is_final()),
        id: m.id.to_string(),
        tenant: m.envelope.tenant.clone(),
        sender: m.envelope.sender.clone(),
        message_id: m.envelope.message_id.clone(),
        received_at: rfc3339(m.envelope.received_at),
        age_seconds: now.saturating_sub(m.envelope.received_at),
        size: m.size,
        client_ip: m.envelope.client_ip.to_string(),
        recipients: m
            .recipients
            .iter()
            .map(|r| RecipientStatus {
                address: r.address.clone(),
                status: r.status,
                attempts: r.attempts,
                next_attempt: (!r.status.is_final()).then(|| rfc3339(r.next_attempt)),
                updated_at: (r.updated_at != 0).then(|| rfc3339(r.updated_at)),
                last_reply: r.last_reply.as_ref().map(SmtpDetail::from),
                last_mx: r.last_mx.clone(),
            })
            .collect(),
    }
}

/// The filters of `GET /api/queue`; a message matches when all given ones do.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListFilter {
    /// A recipient still waiting at this domain.
    pub domain: Option<String>,
    /// Submitted by this tenant.
    pub tenant: Option<String>,
    /// A recipient in this state.
    pub state: Option<String>,
    /// At least this old, e.g. `30m`, `2h`.
    pub min_age: Option<String>,
}

pub async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

pub async fn metrics(State(st): State<Arc<AdminState>>) -> Response {
    let now = unix_now();
    let mut domains: Vec<(String, u64, u64)> = st
        .queue
        .waiting_by_domain()
        .into_iter()
        .map(|(d, (n, oldest))| (d, n, now.saturating_sub(oldest)))
        .collect();
    // Largest first, then by name so the order is stable between scrapes.
    domains.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    domains.truncate(TOP_DOMAINS);
    let suspended = st.control.counts();
    let damage = st.queue.spool_damage();
    let gauges = Gauges {
        queue_messages: st.queue.len() as u64,
        queue_domains: domains,
        connections_open: (st.open_connections)() as u64,
        suspended_domains: suspended.0 as u64,
        suspended_tenants: suspended.1 as u64,
        paused_tenants: suspended.2 as u64,
        spool_damaged_records: damage.skipped_records,
        spool_lost_messages: damage.lost_queue_ids.len() as u64,
        spool_quarantined_files: damage.quarantined.len() as u64,
        spool_full: st.queue.spool_full(),
        redis_fallbacks: st.metrics.redis_fallbacks.load(Ordering::Relaxed),
        stream_sent: st.metrics.stream_sent.load(Ordering::Relaxed),
        stream_dropped: st.metrics.stream_dropped.load(Ordering::Relaxed),
        stream_pending: st.metrics.stream_pending.load(Ordering::Relaxed),
        suppression_redis_pending: st.metrics.suppression_redis_pending.load(Ordering::Relaxed),
        suppression_redis_errors: st.metrics.suppression_redis_errors.load(Ordering::Relaxed),
        dnsbl: st.metrics.dnsbl_zones(),
    };
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.metrics.render(&gauges),
    )
        .into_response()
}

pub async fn list(
    _: Authorized,
    State(st): State<Arc<AdminState>>,
    filter: Result<Query<ListFilter>, QueryRejection>,
) -> Result<Json<QueueListing>, ApiError> {
    let Query(f) = filter.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let state = f.state.as_deref().map(parse_status).transpose()?;
    let min_age = f
        .min_age
        .as_deref()
        .map(|s| {
            Span::parse(s)
                .map(|s| s.as_duration().as_secs())
                .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("min_age: {e}")))
        })
        .transpose()?;
    let domain = f
        .domain
        .as_deref()
        .map(|d| d.trim_end_matches('.').to_ascii_lowercase());
    let now = unix_now();
    let all = st.queue.list();
    let total = all.len();
    let messages = all
        .iter()
        .filter(|m| {
            f.tenant
                .as_deref()
                .is_none_or(|t| m.envelope.tenant.as_deref() == Some(t))
        })
        .filter(|m| min_age.is_none_or(|a| now.saturating_sub(m.envelope.received_at) >= a))
        .filter(|m| state.is_none_or(|s| m.recipients.iter().any(|r| r.status == s)))
        .filter(|m| {
            domain.as_deref().is_none_or(|d| {
                m.recipients
                    .iter()
                    .any(|r| !r.status.is_final() && r.domain() == d)
            })
        })
        .map(|m| summary(m, now))
        .collect();
    let damage = st.queue.spool_damage();
    Ok(Json(QueueListing {
        total,
        messages,
        spool_damage: (!damage.is_empty()).then_some(damage),
    }))
}

pub async fn show(
    _: Authorized,
    State(st): State<Arc<AdminState>>,
    Path(id): Path<String>,
) -> Result<Json<MessageDetail>, ApiError> {
    let id = parse_id(&id)?;
    let m = st.queue.get(id).ok_or_else(|| ApiError::not_queued(id))?;
    Ok(Json(detail(&m, unix_now())))
}

/// `GET /api/messages/{id}`: a queued message, or a finished one within
/// `[history] retention`.
pub async fn status(
    _: Authorized,
    State(st): State<Arc<AdminState>>,
    Path(id): Path<String>,
) -> Result<Json<MessageDetail>, ApiError> {
    let id = parse_id(&id)?;
    let m = st.queue.find(id).ok_or_else(|| ApiError::unknown(id))?;
    Ok(Json(detail(&m, unix_now())))
}

/// `GET /api/messages?message_id=<...>[&tenant=NAME]`: the same, found by
/// the Message-ID the app gave (per tenant; no tenant = trusted networks).
#[derive(Debug, Deserialize)]
pub struct ByMessageId {
    pub message_id: String,
    #[serde(default)]
    pub tenant: Option<String>,
}

pub async fn status_by_message_id(
    _: Authorized,
    State(st): State<Arc<AdminState>>,
    query: Result<Query<ByMessageId>, QueryRejection>,
) -> Result<Json<MessageDetail>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let id = st
        .queue
        .history()
        .by_message_id(q.tenant.as_deref(), &q.message_id)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "no message with Message-ID {} from {} is remembered",
                    q.message_id,
                    q.tenant
                        .as_deref()
                        .map_or("trusted networks".to_string(), |t| format!("tenant {t}"))
                ),
            )
        })?;
    let m = st.queue.find(id).ok_or_else(|| ApiError::unknown(id))?;
    Ok(Json(detail(&m, unix_now())))
}

pub async fn retry(
    _: Authorized,
    State(st): State<Arc<AdminState>>,
    Path(id): Path<String>,
) -> Result<Json<ActionResult>, ApiError> {
    let id = parse_id(&id)?;
    if !st.queue.retry_now(id) {
        return Err(ApiError::not_queued(id));
    }
    tracing::info!(queue_id = %id, "admin: retry now");
    Ok(Json(ActionResult {
        action: "retry".into(),
        id: Some(id.to_string()),
        messages: 1,
    }))
}

pub async fn delete(
    _: Authorized,
    State(st): State<Arc<AdminState>>,
    Path(id): Path<String>,
) -> Result<Json<ActionResult>, ApiError> {
    let id = parse_id(&id)?;
    if !st.queue.delete(id) {
        return Err(ApiError::not_queued(id));
    }
    tracing::info!(queue_id = %id, "admin: message deleted from the queue");
    Ok(Json(ActionResult {
        action: "delete".into(),
        id: Some(id.to_string()),
        messages: 1,
    }))
}

pub async fn flush(
    _: Authorized,
    State(st): State<Arc<AdminState>>,
) -> Result<Json<ActionResult>, ApiError> {
    let n = st.queue.flush();
    tracing::info!(messages = n, "admin: queue flushed");
    Ok(Json(ActionResult {
        action: "flush".into(),
        id: None,
        messages: n,
    }))
}

/// What a reload did.
#[derive(Debug, Serialize, Deserialize)]
pub struct ReloadResult {
    pub reloaded: bool,
    /// "delivery changed: takes effect after restart", ...
    pub pending_restart: Vec<String>,
    /// Every problem of a file that does not validate ("key.path: why").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

/// `POST /api/reload`: re-reads the config file for new connections, as
/// SIGHUP does. 422 with every problem when the file does not validate (the
/// running config stays).
pub async fn reload(
    _: Authorized,
    State(st): State<Arc<AdminState>>,
) -> Result<(StatusCode, Json<ReloadResult>), ApiError> {
    let Some(reload) = &st.reload else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "this relay was started without a config file to read again",
        ));
    };
    Ok(match reload() {
        Ok(pending_restart) => {
            tracing::info!(pending = pending_restart.len(), "admin: config reloaded");
            (
                StatusCode::OK,
                Json(ReloadResult {
                    reloaded: true,
                    pending_restart,
                    problems: Vec::new(),
                }),
            )
        }
        Err(errs) => {
            tracing::error!(
                problems = errs.0.len(),
                "admin: the config does not validate; the running config stays"
            );
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(ReloadResult {
                    reloaded: false,
                    pending_restart: Vec::new(),
                    problems: errs.0.iter().map(|e| e.to_string()).collect(),
                }),
            )
        }
    })
}

/// Unknown paths: a JSON 404 like every other error.
pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such endpoint")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn states_parse_case_insensitively() {
        assert_eq!(parse_status("Deferred").unwrap(), RcptStatus::Deferred);
        assert_eq!(
            parse_status("lost").unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }
}
