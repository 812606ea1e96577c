//! Admin: the postmaster's HTTP API, Prometheus metrics, and the `herald
//! queue` and `herald suppression` commands that call the API.
//!
//! The API listens on `[admin] address` (loopback by default) and speaks
//! JSON over HTTP/1.1 (`api.rs`):
//!
//! | method and path | what it does |
//! | --- | --- |
//! | `GET /healthz` | liveness, no token |
//! | `GET /metrics` | Prometheus text format, no token (`metrics.rs`) |
//! | `GET /api/queue` | list, filters `domain`, `tenant`, `state`, `min_age` |
//! | `GET /api/queue/{id}` | one message with its recipients |
//! | `POST /api/queue/{id}/retry` | make its waiting recipients due now |
//! | `DELETE /api/queue/{id}` | drop it from the queue |
//! | `POST /api/queue/flush` | retry every waiting recipient now |
//! | `GET /api/messages/{id}` | per-recipient status of a queued or finished message |
//! | `GET /api/messages?message_id=M&tenant=T` | the same, by the app's Message-ID |
//! | `GET /api/suppressions` | the suppression list (`suppressions.rs`) |
//! | `POST /api/suppressions` | add an address to a tenant's list |
//! | `DELETE /api/suppressions/{address}` | remove it (`?tenant=`) |
//! | `GET /api/suspensions` | suspended domains and tenants (`control.rs`) |
//! | `POST /api/suspensions` | suspend delivery: `{"domain": D}` or `{"tenant": T}` |
//! | `DELETE /api/suspensions/domain/{d}`, `/tenant/{t}` | resume delivery now |
//! | `GET /api/tenants/{name}` | pause state and reputation rates |
//! | `POST /api/tenants/{name}/resume` | lift a reputation pause |
//!
//! Trust: every `/api` request must carry `Authorization: Bearer <token>`
//! with `[admin] token`, compared in constant time; without a configured
//! token the API refuses everything with 401. `/healthz` and `/metrics` are
//! open so that probes and scrapers need no secret: they expose aggregate
//! counts only, no addresses or tenants. The token never reaches a log line
//! or an error message.

pub mod api;
pub mod cli;
pub mod control;

pub mod suppressions;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{AdminConfig, Secret};
pub use crate::metrics::Metrics;
use crate::queue::Queue;
use crate::suppression::Suppressions;

/// What the handlers read and steer.
pub struct AdminState {
    pub queue: Arc<Queue>,
    pub metrics: Arc<Metrics>,
    /// SMTP client connections open now (read at scrape time).
    pub open_connections: Box<dyn Fn() -> usize + Send + Sync>,
    /// Empty unless set with [`AdminState::with_suppressions`].
    pub suppressions: Suppressions,
    /// Suspensions and paused tenants (`control.rs`); nothing suspended
    /// unless set with [`AdminState::with_control`].
    pub control: crate::control::Control,
    /// Re-reads the config for new connections (`POST /api/reload`):
    /// what changed but needs a restart, or every problem of the file.
    pub reload: Option<Reload>,
    token: Option<Secret>,
}

/// See [`AdminState::reload`].
pub type Reload = Box<dyn Fn() -> Result<Vec<String>, crate::config::ConfigErrors> + Send + Sync>;

impl AdminState {
    pub fn new(
        config: &AdminConfig,
        queue: Arc<Queue>,
        metrics: Arc<Metrics>,
        open_connections: Box<dyn Fn() -> usize + Send + Sync>,
    ) -> AdminState {
        AdminState {
            queue,
            metrics,
            open_connections,
            suppressions: Suppressions::in_memory(),
            control: crate::control::Control::empty(),
            reload: None,
            token: config.token.clone(),
        }
    }

    /// The suppression list the `/api/suppressions` routes manage.
    pub fn with_suppressions(mut self, suppressions: Suppressions) -> AdminState {
        self.suppressions = suppressions;
        self
    }
}

impl AdminState {
    /// The suspensions and pauses the `/api/suspensions` and `/api/tenants`
    /// routes manage.
    pub fn with_control(mut self, control: crate::control::Control) -> AdminState {
        self.control = control;
        self
    }
}

/// The routes of the admin API.
pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/healthz", get(api::healthz))
        .route("/api/reload", post(api::reload))
        .route("/metrics", get(api::metrics))
        .route("/api/queue", get(api::list))
        .route("/api/queue/flush", post(api::flush))
        .route("/api/queue/{id}", get(api::show).delete(api::delete))
        .route("/api/queue/{id}/retry", post(api::retry))
        .route("/api/messages", get(api::status_by_message_id))
        .route("/api/messages/{id}", get(api::status))
        .route(
            "/api/suppressions",
            get(suppressions::list).post(suppressions::add),
        )
        .route(
            "/api/suppressions/{address}",
            axum::routing::delete(suppressions::remove),
        )
        .route(
            "/api/suspensions",
            get(control::list).post(control::suspend),
        )
        .route(
            "/api/suspensions/{kind}/{name}",
            axum::routing::delete(control::resume),
        )
        .route("/api/tenants/{name}", get(control::tenant))
        .route("/api/tenants/{name}/resume", post(control::resume_tenant))
        .fallback(api::not_found)
        .with_state(state)
}

/// Binds `[admin] address`. Done before the other stages start, so that a
/// taken port stops the relay before it accepts anything.
pub async fn bind(config: &AdminConfig) -> std::io::Result<TcpListener> {
    TcpListener::bind(config.address).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("admin: cannot listen on {}: {e}", config.address),
        )
    })
}

/// The running admin server.
pub struct AdminServer {
    pub addr: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// Longest wait for a request's header: a client that sends it slowly or
/// not at all gives its connection up.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest life of one connection, requests and keep-alive included.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 512;

/// Serves the API on `listener` until [`AdminServer::shutdown`].
///
/// hyper's HTTP/1 server directly rather than `axum::serve`, which sets no
/// timer and so never enforces a header-read timeout.
pub fn serve(listener: TcpListener, state: Arc<AdminState>) -> std::io::Result<AdminServer> {
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    let app = router(state);
    let task = tokio::spawn(accept_loop(listener, app, stop.clone()));
    tracing::info!(address = %addr, "admin API listening");
    Ok(AdminServer { addr, stop, task })
}

async fn accept_loop(listener: TcpListener, app: Router, stop: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            permit = Arc::clone(&slots).acquire_owned() => permit,
        };
        let Ok(permit) = permit else { break };
        let tcp = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "admin API: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let app = app.clone();
        let stop = stop.clone();
        conns.spawn(async move {
            let _permit = permit;
            serve_connection(tcp, app, stop).await;
        });
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}

async fn serve_connection(tcp: tokio::net::TcpStream, app: Router, stop: CancellationToken) {
    use tower::ServiceExt as _;
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        app.clone().oneshot(req.map(axum::body::Body::new))
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
    let mut conn = std::pin::pin!(conn);
    let lifetime = tokio::time::sleep(CONNECTION_LIFETIME);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = stop.cancelled() => {}
        _ = lifetime => {}
    }
    // Finish the request in progress, if any, then close.
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
}

impl AdminServer {
    /// Stops accepting, lets requests in progress finish for a moment, then
    /// closes what is left.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(5), &mut task)
            .await
            .is_err()
        {
            task.abort();
            let _ = task.await;
        }
    }
}
