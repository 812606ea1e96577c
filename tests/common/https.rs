//! A scripted HTTPS server on 127.0.0.x standing in for an MTA-STS policy
//! host (RFC 8461 §3.3): it answers every request with the [`Answer`] set
//! last, and counts the requests it read. And [`RecordingServer`], which
//! keeps whole requests (a TLS report receiver, RFC 8460 §5.4).
//!
//! ```ignore
//! let server = PolicyServer::start(ip, pki.acceptor(&["mta-sts.example.test"]),
//!     Answer::policy("version: STSv1\nmode: enforce\nmx: mx.example.test\nmax_age: 86400\n")).await;
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

/// One canned HTTP response.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    /// 200 with `text/plain` and `text`.
    pub fn policy(text: &str) -> Answer {
        Answer {
            status: 200,
            headers: vec![("Content-Type".into(), "text/plain; charset=utf-8".into())],
            body: text.as_bytes().to_vec(),
        }
    }

    /// A 301 to `location`.
    pub fn redirect(location: &str) -> Answer {
        Answer {
            status: 301,
            headers: vec![("Location".into(), location.into())],
            body: Vec::new(),
        }
    }
}

/// Stops when dropped or [`PolicyServer::stop`]ped.
pub struct PolicyServer {
    pub addr: SocketAddr,
    answer: Arc<Mutex<Answer>>,
    requests: watch::Receiver<usize>,
    task: tokio::task::JoinHandle<()>,
}

impl PolicyServer {
    /// Listens on `ip` (127.0.0.x), any free port.
    pub async fn start(ip: Ipv4Addr, acceptor: TlsAcceptor, answer: Answer) -> PolicyServer {
        let listener = tokio::net::TcpListener::bind((ip, 0))
            .await
            .expect("bind the policy server");
        let addr = listener.local_addr().unwrap();
        let answer = Arc::new(Mutex::new(answer));
        let (count, requests) = watch::channel(0usize);
        let count = Arc::new(count);
        let shared = answer.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, answer, count) = (acceptor.clone(), shared.clone(), count.clone());
                // Dropped (and with it every connection) when the server stops.
                conns.spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                        if head.len() > 16 * 1024 {
                            return;
                        }
                    }
                    count.send_modify(|n| *n += 1);
                    let a = answer.lock().unwrap().clone();
                    let mut out = format!("HTTP/1.1 {} Scripted\r\n", a.status);
                    for (k, v) in &a.headers {
                        out.push_str(&format!("{k}: {v}\r\n"));
                    }
                    out.push_str(&format!(
                        "Content-Length: {}\r\nConnection: close\r\n\r\n",
                        a.body.len()
                    ));
                    let mut bytes = out.into_bytes();
                    bytes.extend_from_slice(&a.body);
                    let _ = tls.write_all(&bytes).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        PolicyServer {
            addr,
            answer,
            requests,
            task,
        }
    }

    /// What later requests get.
    pub fn set(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }

    /// Requests read so far.
    pub fn requests(&self) -> usize {
        *self.requests.borrow()
    }

    /// Waits (unbounded: wrap in `within`) until `n` requests were read.
    pub async fn wait_requests(&self, n: usize) {
        let mut rx = self.requests.clone();
        rx.wait_for(|&count| count >= n)
            .await
            .expect("policy server gone");
    }

    /// Closes the listening socket: later connections are refused.
    pub async fn stop(&mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for PolicyServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A port on `ip` with nothing listening (bound, then closed).
pub async fn closed_port(ip: Ipv4Addr) -> u16 {
    let l = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    l.local_addr().unwrap().port()
}

/// One request a [`RecordingServer`] read.
#[derive(Clone, Debug)]
pub struct Received {
    /// Request line and header fields, as sent.
    pub head: String,
    pub body: Vec<u8>,
}

impl Received {
    /// A header field's value (name matched case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// An HTTPS server on 127.0.0.x that reads whole requests (body by
/// `Content-Length`), keeps them, and answers each `200 OK`: a TLS report
/// receiver (RFC 8460 §5.4) or any upload endpoint.
pub struct RecordingServer {
    pub addr: SocketAddr,
    received: watch::Receiver<Vec<Received>>,
    task: tokio::task::JoinHandle<()>,
}

impl RecordingServer {
    /// Listens on `ip` (127.0.0.x), any free port.
    pub async fn start(ip: Ipv4Addr, acceptor: TlsAcceptor) -> RecordingServer {
        let listener = tokio::net::TcpListener::bind((ip, 0))
            .await
            .expect("bind the recording server");
        let addr = listener.local_addr().unwrap();
        let (tx, received) = watch::channel(Vec::new());
        let tx = Arc::new(tx);
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                conns.spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut raw = Vec::new();
                    let mut buf = [0u8; 4096];
                    let (head_len, body_len) = loop {
                        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&raw[..end]).into_owned();
                            let len = head
                                .lines()
                                .find_map(|l| {
                                    let (n, v) = l.split_once(':')?;
                                    n.eq_ignore_ascii_case("content-length")
                                        .then(|| v.trim().parse::<usize>().ok())?
                                })
                                .unwrap_or(0);
                            break (end + 4, len);
                        }
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => raw.extend_from_slice(&buf[..n]),
                        }
                    };
                    while raw.len() < head_len + body_len {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => raw.extend_from_slice(&buf[..n]),
                        }
                    }
                    let request = Received {
                        head: String::from_utf8_lossy(&raw[..head_len - 4]).into_owned(),
                        body: raw[head_len..head_len + body_len].to_vec(),
                    };
                    tx.send_modify(|v| v.push(request));
                    let _ = tls
                        .write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        )
                        .await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        RecordingServer {
            addr,
            received,
            task,
        }
    }

    /// Requests read so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.borrow().clone()
    }

    /// Waits (unbounded: wrap in `within`) until `n` requests were read.
    pub async fn wait_requests(&self, n: usize) -> Vec<Received> {
        let mut rx = self.received.clone();
        rx.wait_for(|v| v.len() >= n)
            .await
            .expect("recording server gone")
            .clone()
    }
}

impl Drop for RecordingServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
