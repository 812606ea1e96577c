//! `herald queue ...`: the queue commands, as calls to the admin API of the
//! running relay at `[admin] address` with `[admin] token` from the same
//! config. Prints readable tables, or the API's JSON with `--json`.
//!
//! The client is a bare hyper HTTP/1.1 connection per command: one request
//! to a loopback address needs no pool and no TLS.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use super::api::{ActionResult, ErrorBody, MessageDetail, QueueListing};
use crate::config::AdminConfig;
use crate::queue::spool::SpoolDamage;

/// How long one command may take, connection included.
const TIMEOUT: Duration = Duration::from_secs(15);
/// Largest response read (a listing of a very large queue).
const MAX_BODY: usize = 256 << 20;

/// `herald queue` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum QueueCommand {
    /// List the messages in the queue, oldest first.
    List {
        /// Only messages with a recipient still waiting at this domain.
        #[arg(long)]
        domain: Option<String>,
        /// Only messages submitted by this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Only messages with a recipient in this state
        /// (pending, deferred, delivered, bounced, expired).
        #[arg(long)]
        state: Option<String>,
        /// Only messages at least this old, e.g. 30m, 2h.
        #[arg(long)]
        min_age: Option<String>,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one message with the state of each recipient.
    Show {
        /// Queue id (20 hex digits, as in `250 ... queued as ID`).
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// A message's status for the app: like `show`, and also for messages
    /// that have left the queue (within `[history] retention`); by queue id
    /// or by the app's Message-ID.
    Status {
        /// Queue id; or give --message-id.
        #[arg(required_unless_present = "message_id")]
        id: Option<String>,
        /// The Message-ID the app wrote, e.g. "<invoice-42@acme.example>".
        #[arg(long, conflicts_with = "id")]
        message_id: Option<String>,
        /// With --message-id: the tenant that submitted it.
        #[arg(long, requires = "message_id")]
        tenant: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Try a message's waiting recipients now.
    Retry {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove a message from the queue without delivering it further.
    Delete {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Try every waiting recipient in the queue now.
    Flush {
        #[arg(long)]
        json: bool,
    },
}

/// `herald reload`: has the running relay re-read its config file
/// (`POST /api/reload`, as SIGHUP does). What to print; the error lists
/// every problem of a file that does not validate.
pub async fn reload(admin: &AdminConfig) -> Result<String, String> {
    let client = Client::new(admin)?;
    let (status, body) = tokio::time::timeout(
        TIMEOUT,
        client.send(Method::POST, "/api/reload", Vec::new()),
    )
    .await
    .map_err(|_| {
        format!(
            "the admin API at {} did not answer within {}s",
            client.addr,
            TIMEOUT.as_secs()
        )
    })??;
    match serde_json::from_slice::<super::api::ReloadResult>(&body) {
        Ok(r) if r.reloaded => {
            let mut out = "config reloaded: new connections use it".to_string();
            for p in r.pending_restart {
                out.push_str(&format!("\n{p}"));
            }
            Ok(out)
        }
        Ok(r) => Err(format!(
            "the config does not validate; the running config stays:\n{}",
            r.problems.join("\n")
        )),
        Err(_) => {
            let text = serde_json::from_slice::<ErrorBody>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).trim().to_string());
            Err(format!("{status}: {text}"))
        }
    }
}

/// Runs one command against the admin API; returns what to print, or the
/// error to report (exit status non-zero).
pub async fn run(admin: &AdminConfig, cmd: QueueCommand) -> Result<String, String> {
    let client = Client::new(admin)?;
    match cmd {
        QueueCommand::List {
            domain,
            tenant,
            state,
            min_age,
            json,
        } => {
            let mut query = String::new();
            for (k, v) in [
                ("domain", domain),
                ("tenant", tenant),
                ("state", state),
                ("min_age", min_age),
            ] {
                if let Some(v) = v {
                    query.push(if query.is_empty() { '?' } else { '&' });
                    query.push_str(k);
                    query.push('=');
                    query.push_str(&percent_encode(&v));
                }
            }
            let body = client
                .call(Method::GET, &format!("/api/queue{query}"))
                .await?;
            if json {
                return Ok(pretty(&body));
            }
            Ok(list_table(&parse::<QueueListing>(&body)?))
        }
        QueueCommand::Show { id, json } => {
            let body = client
                .call(Method::GET, &format!("/api/queue/{}", percent_encode(&id)))
                .await?;
            if json {
                return Ok(pretty(&body));
            }
            Ok(show_text(&parse::<MessageDetail>(&body)?))
        }
        QueueCommand::Status {
            id,
            message_id,
            tenant,
            json,
        } => {
            let path = match (id, message_id) {
                (Some(id), _) => format!("/api/messages/{}", percent_encode(&id)),
                (None, Some(mid)) => {
                    let mut p = format!("/api/messages?message_id={}", percent_encode(&mid));
                    if let Some(t) = tenant {
                        p.push_str(&format!("&tenant={}", percent_encode(&t)));
                    }
                    p
                }
                (None, None) => return Err("give a queue id or --message-id".into()),
            };
            let body = client.call(Method::GET, &path).await?;
            if json {
                return Ok(pretty(&body));
            }
            Ok(show_text(&parse::<MessageDetail>(&body)?))
        }
        QueueCommand::Retry { id, json } => {
            let path = format!("/api/queue/{}/retry", percent_encode(&id));
            let body = client.call(Method::POST, &path).await?;
            if json {
                return Ok(pretty(&body));
            }
            parse::<ActionResult>(&body)?;
            Ok(format!("{id}: waiting recipients will be tried now"))
        }
        QueueCommand::Delete { id, json } => {
            let path = format!("/api/queue/{}", percent_encode(&id));
            let body = client.call(Method::DELETE, &path).await?;
            if json {
                return Ok(pretty(&body));
            }
            parse::<ActionResult>(&body)?;
            Ok(format!("{id}: deleted from the queue"))
        }
        QueueCommand::Flush { json } => {
            let body = client.call(Method::POST, "/api/queue/flush").await?;
            if json {
                return Ok(pretty(&body));
            }
            let r = parse::<ActionResult>(&body)?;
            Ok(format!(
                "{} message(s): waiting recipients will be tried now",
                r.messages
            ))
        }
    }
}

pub(super) struct Client {
    addr: SocketAddr,
    /// `Bearer <token>`; never printed.
    authorization: String,
}

impl Client {
    pub(super) fn new(admin: &AdminConfig) -> Result<Client, String> {
        let Some(token) = &admin.token else {
            return Err(
                "no [admin] token in the config: the admin API refuses every request without one"
                    .into(),
            );
        };
        // A server listening on every address is reached on loopback.
        let mut addr = admin.address;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
        }
        Ok(Client {
            addr,
            authorization: format!("Bearer {}", token.expose()),
        })
    }

    /// One request; the body of a 2xx answer, or the API's error text.
    pub(super) async fn call(&self, method: Method, path: &str) -> Result<Vec<u8>, String> {
        self.call_with_body(method, path, Vec::new()).await
    }

    /// [`Client::call`] with a JSON request body (none when empty).
    pub(super) async fn call_with_body(
        &self,
        method: Method,
        path: &str,
        json: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        let (status, body) = tokio::time::timeout(TIMEOUT, self.send(method, path, json))
            .await
            .map_err(|_| {
                format!(
                    "the admin API at {} did not answer within {}s",
                    self.addr,
                    TIMEOUT.as_secs()
                )
            })??;
        if status.is_success() {
            return Ok(body);
        }
        let text = serde_json::from_slice::<ErrorBody>(&body)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).trim().to_string());
        Err(format!("{status}: {text}"))
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        json: Vec<u8>,
    ) -> Result<(StatusCode, Vec<u8>), String> {
        let addr = self.addr;
        let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| {
            format!("cannot reach the admin API at {addr}: {e} (is `herald serve` running with this config?)")
        })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("admin API at {addr}: {e}"))?;
        let conn = tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, addr.to_string())
            .header(header::AUTHORIZATION, &self.authorization)
            .header(header::ACCEPT, "application/json");
        if !json.is_empty() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Body::from(json))
            .map_err(|e| format!("bad request: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("admin API at {addr}: {e}"))?;
        let status = resp.status();
        let body = axum::body::to_bytes(Body::new(resp.into_body()), MAX_BODY)
            .await
            .map_err(|e| format!("admin API at {addr}: reading the answer: {e}"))?;
        drop(sender);
        conn.abort();
        Ok((status, body.to_vec()))
    }
}

pub(super) fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("unexpected answer from the admin API: {e}"))
}

pub(super) fn pretty(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .and_then(|v| serde_json::to_string_pretty(&v))
        .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned())
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub(super) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// `3d4h`, `2h5m`, `4m10s`, `45s`.
pub(super) fn age(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d{h}h")
    } else if h > 0 {
        format!("{h}h{m}m")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

/// Columns padded to their widest cell; the last column is not padded.
pub(super) fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, c) in cells.enumerate() {
            if i + 1 < width.len() {
                let _ = write!(l, "{c:<w$}  ", w = width[i]);
            } else {
                l.push_str(c);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut head.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

fn list_table(l: &QueueListing) -> String {
    let warning = l
        .spool_damage
        .as_ref()
        .map(damage_warning)
        .unwrap_or_default();
    if l.messages.is_empty() {
        return format!("{warning}no matching messages ({} in the queue)", l.total);
    }
    let rows: Vec<Vec<String>> = l
        .messages
        .iter()
        .map(|m| {
            let states = m
                .recipients
                .iter()
                .map(|(s, n)| format!("{n} {s}"))
                .collect::<Vec<_>>()
                .join(", ");
            vec![
                m.id.clone(),
                age(m.age_seconds),
                m.size.to_string(),
                m.tenant.clone().unwrap_or_else(|| "-".into()),
                if m.sender.is_empty() {
                    "<>".into()
                } else {
                    m.sender.clone()
                },
                states,
                m.domains.join(","),
                m.next_attempt.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut out = warning;
    out += &table(
        &[
            "QUEUE ID",
            "AGE",
            "SIZE",
            "TENANT",
            "SENDER",
            "RECIPIENTS",
            "WAITING FOR",
            "NEXT ATTEMPT",
        ],
        &rows,
    );
    let _ = write!(
        out,
        "{} of {} message(s) in the queue",
        l.messages.len(),
        l.total
    );
    out
}

/// Lines that say the spool was damaged, before a listing; empty when it
/// was not.
fn damage_warning(d: &SpoolDamage) -> String {
    let mut out = String::new();
    let dir = d.corrupt_dir.display();
    if d.damaged_segments > 0 || d.skipped_records > 0 {
        let _ = write!(
            out,
            "warning: the spool had {} damaged record(s) in {} segment(s) at start-up",
            d.skipped_records, d.damaged_segments
        );
        if !d.lost_queue_ids.is_empty() {
            let _ = write!(out, "; lost, not delivered: {}", few(&d.lost_queue_ids));
        }
        if !d.redelivery_queue_ids.is_empty() {
            let _ = write!(
                out,
                "; may be delivered again: {}",
                few(&d.redelivery_queue_ids)
            );
        }
        let _ = writeln!(
            out,
            "; damaged segments are kept in {dir}/ once delivered (details in the log)"
        );
    }
    if !d.quarantined.is_empty() {
        let names: Vec<String> = d
            .quarantined
            .iter()
            .map(|p| {
                p.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        let _ = writeln!(
            out,
            "warning: {} damaged or unusable spool file(s) kept in {dir}/: {}",
            names.len(),
            few(&names)
        );
    }
    out
}

/// The first few of a list, and how many more.
fn few<T: std::fmt::Display>(items: &[T]) -> String {
    const SHOWN: usize = 10;
    let mut s = items
        .iter()
        .take(SHOWN)
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > SHOWN {
        let _ = write!(s, " and {} more", items.len() - SHOWN);
    }
    s
}

fn show_text(m: &MessageDetail) -> String {
    let mut out = String::new();
    let none = || "-".to_string();
    let _ = writeln!(out, "Queue ID:    {}", m.id);
    let _ = writeln!(
        out,
        "Message-ID:  {}",
        m.message_id.clone().unwrap_or_else(none)
    );
    let _ = writeln!(
        out,
        "Tenant:      {}",
        m.tenant.clone().unwrap_or_else(none)
    );
    let _ = writeln!(
        out,
        "Sender:      {}",
        if m.sender.is_empty() { "<>" } else { &m.sender }
    );
    let _ = writeln!(
        out,
        "Received:    {} ({} ago) from {}",
        m.received_at,
        age(m.age_seconds),
        m.client_ip
    );
    let _ = writeln!(out, "Size:        {} bytes", m.size);
    out.push('\n');
    let rows: Vec<Vec<String>> = m
        .recipients
        .iter()
        .map(|r| {
            let status = serde_json::to_value(r.status)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let reply = r
                .last_reply
                .as_ref()
                .map(|s| s.to_string().replace('\n', " / "));
            let reply = match (reply, &r.last_mx) {
                (Some(t), Some(mx)) => format!("{t} (from {mx})"),
                (Some(t), None) => t,
                (None, _) => none(),
            };
            vec![
                r.address.clone(),
                status,
                r.attempts.to_string(),
                r.next_attempt.clone().unwrap_or_else(none),
                reply,
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "RECIPIENT",
            "STATUS",
            "ATTEMPTS",
            "NEXT ATTEMPT",
            "LAST REPLY",
        ],
        &rows,
    ));
    out.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::QueueId;

    #[test]
    fn ages_are_short() {
        assert_eq!(age(45), "45s");
        assert_eq!(age(250), "4m10s");
        assert_eq!(age(7500), "2h5m");
        assert_eq!(age(3 * 86400 + 4 * 3600 + 5), "3d4h");
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(percent_encode("a b&c=d"), "a%20b%26c%3Dd");
        assert_eq!(percent_encode("one.test"), "one.test");
    }

    #[test]
    fn a_listing_warns_of_spool_damage() {
        let lost = QueueId(0x1234);
        let damage = SpoolDamage {
            damaged_segments: 1,
            skipped_records: 2,
            lost_queue_ids: vec![lost],
            redelivery_queue_ids: Vec::new(),
            corrupt_dir: "var/spool/corrupt".into(),
            quarantined: vec!["var/spool/corrupt/seg-0000000000000003.log".into()],
        };
        let mut l = QueueListing {
            total: 0,
            messages: Vec::new(),
            spool_damage: Some(damage),
        };
        let out = list_table(&l);
        let first = out.lines().next().unwrap();
        assert_eq!(
            first,
            format!(
                "warning: the spool had 2 damaged record(s) in 1 segment(s) at start-up; lost, not delivered: {lost}; damaged segments are kept in var/spool/corrupt/ once delivered (details in the log)"
            )
        );
        assert_eq!(
            out.lines().nth(1).unwrap(),
            "warning: 1 damaged or unusable spool file(s) kept in var/spool/corrupt/: seg-0000000000000003.log"
        );
        assert!(
            out.ends_with("no matching messages (0 in the queue)"),
            "{out}"
        );
        l.spool_damage = None;
        assert!(!list_table(&l).contains("warning"));
    }

    #[test]
    fn tables_align_columns() {
        let t = table(
            &["A", "BB"],
            &[vec!["xyz".into(), "1".into()], vec!["q".into(), "2".into()]],
        );
        assert_eq!(t, "A    BB\nxyz  1\nq    2\n");
    }
}
