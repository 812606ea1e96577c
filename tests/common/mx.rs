//! Scriptable recipient MX sinks on 127.0.0.x, built on mailin-embedded 0.8.3.
//!
//! herald delivers to every MX host on one configured port, so a test typically reserves
//! one port on several loopback addresses and starts sinks on some of them:
//!
//! ```ignore
//! let (port, mut listeners) = reserve_port(&[ip(2), ip(3)]);
//! let dead = listeners.pop().unwrap();      // 127.0.0.3
//! drop(dead);                               // connections to 127.0.0.3:port are refused
//! let sink = MxSink::start_on(listeners.pop().unwrap(), |_, _| SinkReply::Accept)?;
//! ```
//!
//! Limits of mailin-embedded (a blocking server on a thread pool): no PIPELINING, no
//! STARTTLS here, `MAIL FROM:<>` (a null sender) and ESMTP parameters such as `SIZE=`,
//! `SMTPUTF8`, `RET=`, `ENVID=`, `NOTIFY=` are answered `500 Syntax error`; only
//! `BODY=8BITMIME` is understood. Each sink serves at most [`SINK_THREADS`] sessions at once
//! (further connections wait, unanswered, for a free thread).
//!
//! Dropping an [`MxSink`] (or calling [`MxSink::stop`]) closes its listening socket, so
//! the address refuses connections afterwards; sessions in progress run to their end.

use std::collections::HashMap;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use mailin_embedded::{Handler, Response, Server};

/// Size of each sink's thread pool = the number of concurrent sessions it serves.
pub const SINK_THREADS: u32 = 16;

/// `127.0.0.n`
pub fn ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, n)
}

/// What the sink answers to a RCPT TO (or, with a data policy, at the end of DATA).
#[derive(Clone, Debug, PartialEq)]
pub enum SinkReply {
    /// 250 OK
    Accept,
    /// Any reply, e.g. `Reply(550, "5.1.1 no such user")`, `Reply(451, "4.3.0 try later")`.
    /// A 421 reply also closes the connection.
    Reply(u16, &'static str),
}

impl SinkReply {
    fn to_response(&self) -> Response {
        match self {
            SinkReply::Accept => mailin_embedded::response::OK,
            SinkReply::Reply(code, text) => Response::custom(*code, text.to_string()),
        }
    }
}

/// A message the sink accepted (250 after the final dot).
#[derive(Clone, Debug, PartialEq)]
pub struct ReceivedMail {
    /// The name the client gave in EHLO/HELO.
    pub helo: String,
    /// The reverse path without angle brackets.
    pub from: String,
    /// The accepted recipients, in order, without angle brackets.
    pub rcpts: Vec<String>,
    /// The message exactly as received, after dot-unstuffing, without the final `.CRLF`
    /// (a message sent as `...\r\n.\r\n` ends in `\r\n`).
    pub data: Vec<u8>,
}

type RcptPolicy = dyn Fn(&str, u32) -> SinkReply + Send + Sync;
/// Called with the complete message and the number of earlier DATA attempts on this sink.
type DataPolicy = dyn Fn(&ReceivedMail, u32) -> SinkReply + Send + Sync;

#[derive(Default)]
struct Record {
    messages: Vec<ReceivedMail>,
    rcpt_attempts: HashMap<String, u32>,
    data_attempts: u32,
    /// Messages refused at the end of DATA by the data policy, with the reply.
    refused: Vec<(ReceivedMail, SinkReply)>,
}

struct Shared {
    record: Mutex<Record>,
    changed: Condvar,
    rcpt_policy: Box<RcptPolicy>,
    data_policy: Option<Box<DataPolicy>>,
}

/// One handler per connection (mailin-embedded clones it for every session).
#[derive(Clone)]
struct SinkHandler {
    shared: Arc<Shared>,
    helo: String,
    current: Option<ReceivedMail>,
}

impl Handler for SinkHandler {
    fn helo(&mut self, _ip: IpAddr, domain: &str) -> Response {
        self.helo = domain.to_string();
        mailin_embedded::response::OK
    }

    fn mail(&mut self, _ip: IpAddr, _domain: &str, _from: &str) -> Response {
        self.current = None;
        mailin_embedded::response::OK
    }

    fn rcpt(&mut self, to: &str) -> Response {
        let seen = {
            let mut rec = self.shared.record.lock().unwrap();
            let n = rec.rcpt_attempts.entry(to.to_string()).or_insert(0);
            let seen = *n;
            *n += 1;
            seen
        };
        self.shared.changed.notify_all();
        (self.shared.rcpt_policy)(to, seen).to_response()
    }

    fn data_start(&mut self, domain: &str, from: &str, _is8bit: bool, to: &[String]) -> Response {
        self.current = Some(ReceivedMail {
            helo: domain.to_string(),
            from: from.to_string(),
            rcpts: to.to_vec(),
            data: Vec::new(),
        });
        mailin_embedded::response::OK
    }

    fn data(&mut self, buf: &[u8]) -> std::io::Result<()> {
        if let Some(m) = self.current.as_mut() {
            m.data.extend_from_slice(buf);
        }
        Ok(())
    }

    fn data_end(&mut self) -> Response {
        let Some(mut mail) = self.current.take() else {
            return mailin_embedded::response::INTERNAL_ERROR;
        };
        if mail.helo.is_empty() {
            mail.helo.clone_from(&self.helo);
        }
        let mut rec = self.shared.record.lock().unwrap();
        let attempt = rec.data_attempts;
        rec.data_attempts += 1;
        let reply = match &self.shared.data_policy {
            Some(policy) => policy(&mail, attempt),
            None => SinkReply::Accept,
        };
        if reply == SinkReply::Accept {
            rec.messages.push(mail);
        } else {
            rec.refused.push((mail, reply.clone()));
        }
        drop(rec);
        self.shared.changed.notify_all();
        let mut response = reply.to_response();
        if response.is_error {
            // mailin 0.6.5 stays in its DATA state after an error reply to the final dot
            // (the next commands would be taken as message text), so close the connection
            // after the reply instead.
            response.action = mailin_embedded::Action::Close;
        }
        response
    }
}

/// A recipient MX: an SMTP server on its own thread pool.
pub struct MxSink {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    /// The listening socket's descriptor, owned by the mailin-embedded thread.
    listener_fd: Option<RawFd>,
}

impl MxSink {
    /// Start a sink on ip:port (port 0 picks a free port). `rcpt_policy` decides each RCPT TO
    /// reply; it is called with the recipient address and how many times this sink has seen
    /// that address before (0 the first time), so a test can answer 451 first and 250 on the
    /// retry.
    pub fn start(
        ip: Ipv4Addr,
        port: u16,
        rcpt_policy: impl Fn(&str, u32) -> SinkReply + Send + Sync + 'static,
    ) -> std::io::Result<MxSink> {
        let listener = TcpListener::bind((ip, port))?;
        Self::start_on(listener, rcpt_policy)
    }

    /// A sink that accepts every recipient and message.
    pub fn accept_all(ip: Ipv4Addr, port: u16) -> std::io::Result<MxSink> {
        Self::start(ip, port, |_, _| SinkReply::Accept)
    }

    /// Start a sink on an already bound listener (e.g. one from [`reserve_port`]).
    pub fn start_on(
        listener: TcpListener,
        rcpt_policy: impl Fn(&str, u32) -> SinkReply + Send + Sync + 'static,
    ) -> std::io::Result<MxSink> {
        Self::start_inner(listener, Box::new(rcpt_policy), None)
    }

    /// Like [`MxSink::start_on`], with a policy for the reply after the final dot. It gets
    /// the complete message and the number of earlier DATA attempts on this sink (0 the
    /// first time). Refused messages are not in [`MxSink::messages`] but in
    /// [`MxSink::refused`]. After a refusal the sink closes the connection (mailin cannot
    /// continue the session after an error reply to the final dot).
    pub fn start_on_with_data_policy(
        listener: TcpListener,
        rcpt_policy: impl Fn(&str, u32) -> SinkReply + Send + Sync + 'static,
        data_policy: impl Fn(&ReceivedMail, u32) -> SinkReply + Send + Sync + 'static,
    ) -> std::io::Result<MxSink> {
        Self::start_inner(listener, Box::new(rcpt_policy), Some(Box::new(data_policy)))
    }

    fn start_inner(
        listener: TcpListener,
        rcpt_policy: Box<RcptPolicy>,
        data_policy: Option<Box<DataPolicy>>,
    ) -> std::io::Result<MxSink> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(false)?;
        let shared = Arc::new(Shared {
            record: Mutex::new(Record::default()),
            changed: Condvar::new(),
            rcpt_policy,
            data_policy,
        });
        let handler = SinkHandler {
            shared: shared.clone(),
            helo: String::new(),
            current: None,
        };
        let listener_fd = listener.as_raw_fd();
        let mut server = Server::new(handler);
        server
            .with_name(format!("sink-{}", addr.ip()))
            .with_num_threads(SINK_THREADS)
            .with_tcp_listener(listener);
        std::thread::Builder::new()
            .name(format!("mx-sink-{addr}"))
            .spawn(move || {
                // Runs until the process exits (or until `stop` swaps the listening socket).
                let _ = server.serve();
            })?;
        Ok(MxSink {
            addr,
            shared,
            listener_fd: Some(listener_fd),
        })
    }

    /// Messages accepted so far, in order of arrival.
    pub fn messages(&self) -> Vec<ReceivedMail> {
        self.shared.record.lock().unwrap().messages.clone()
    }

    /// Messages refused at the end of DATA by the data policy, with the reply given.
    pub fn refused(&self) -> Vec<(ReceivedMail, SinkReply)> {
        self.shared.record.lock().unwrap().refused.clone()
    }

    /// Waits until at least `n` messages were accepted and returns all of them. Panics
    /// naming what was received if fewer than `n` arrive within `timeout`.
    #[track_caller]
    pub fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<ReceivedMail> {
        let rec = self.wait_until(timeout, |r| r.messages.len() >= n);
        match rec {
            Ok(r) => r.messages.clone(),
            Err(r) => panic!(
                "MX sink {}: expected {n} message(s) within {timeout:?}, got {}: {:#?}\n\
                 RCPT attempts: {:?}\nrefused at DATA: {:#?}",
                self.addr,
                r.messages.len(),
                summarize(&r.messages),
                r.rcpt_attempts,
                r.refused
                    .iter()
                    .map(|(m, reply)| (summarize(std::slice::from_ref(m)), reply))
                    .collect::<Vec<_>>(),
            ),
        }
    }

    /// Waits until `addr` has been tried at least `n` times in RCPT TO; returns the count.
    #[track_caller]
    pub fn wait_for_rcpt_attempts(&self, addr: &str, n: u32, timeout: Duration) -> u32 {
        let count = |r: &Record| r.rcpt_attempts.get(addr).copied().unwrap_or(0);
        match self.wait_until(timeout, |r| count(r) >= n) {
            Ok(r) => count(&r),
            Err(r) => panic!(
                "MX sink {}: expected {n} RCPT attempt(s) for {addr} within {timeout:?}, \
                 got {}; all RCPT attempts: {:?}",
                self.addr,
                count(&r),
                r.rcpt_attempts
            ),
        }
    }

    /// Asserts that no message arrives within `period` (a bounded wait on the condition
    /// "a message arrived", not a sleep).
    #[track_caller]
    pub fn assert_no_message_within(&self, period: Duration) {
        let before = self.shared.record.lock().unwrap().messages.len();
        if let Ok(r) = self.wait_until(period, |r| r.messages.len() > before) {
            panic!(
                "MX sink {}: expected no new message within {period:?}, got {:#?}",
                self.addr,
                summarize(&r.messages[before..])
            );
        }
    }

    /// How many times `addr` was given in RCPT TO on this sink.
    pub fn rcpt_attempts(&self, addr: &str) -> u32 {
        let rec = self.shared.record.lock().unwrap();
        rec.rcpt_attempts.get(addr).copied().unwrap_or(0)
    }

    /// How many DATA transactions reached the final dot (accepted or refused).
    pub fn data_attempts(&self) -> u32 {
        self.shared.record.lock().unwrap().data_attempts
    }

    fn wait_until(
        &self,
        timeout: Duration,
        cond: impl Fn(&Record) -> bool,
    ) -> Result<std::sync::MutexGuard<'_, Record>, std::sync::MutexGuard<'_, Record>> {
        let deadline = Instant::now() + timeout;
        let mut rec = self.shared.record.lock().unwrap();
        loop {
            if cond(&rec) {
                return Ok(rec);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(rec);
            }
            rec = self
                .shared
                .changed
                .wait_timeout(rec, deadline - now)
                .unwrap()
                .0;
        }
    }

    /// Stops accepting connections: the address refuses connections once this returns
    /// (sessions in progress continue). Also done on drop.
    ///
    /// mailin-embedded has no shutdown, and its thread blocks in `accept` forever. So the
    /// listening descriptor is replaced (dup2) by a Unix socket nobody can reach, and one
    /// connection wakes the blocked `accept`; when that returns, the last reference to the
    /// TCP socket goes and the kernel closes it. The idle thread is leaked.
    pub fn stop(&mut self) {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let Some(fd) = self.listener_fd.take() else {
            return;
        };
        let name = format!(
            "herald-test-sink-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let parked = {
            use std::os::linux::net::SocketAddrExt;
            let sa = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                .expect("abstract socket name");
            std::os::unix::net::UnixListener::bind_addr(&sa).expect("bind abstract unix socket")
        };
        let parked_fd = parked.into_raw_fd();
        // SAFETY: `fd` is the listener owned by the mailin-embedded accept thread, which
        // never exits on its own (its accept loop is infinite), so the descriptor is still
        // open and still ours. dup2 atomically makes it refer to the parked socket.
        unsafe {
            assert!(libc::dup2(parked_fd, fd) >= 0, "dup2 failed");
            libc::close(parked_fd);
        }
        // Wake an `accept` blocked on the old socket. Once we see the greeting (or EOF /
        // reset), that accept has returned and the old socket is closed. If the connect is
        // refused, it is already closed.
        if let Ok(mut s) = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf);
        }
    }
}

impl Drop for MxSink {
    fn drop(&mut self) {
        self.stop();
    }
}

fn summarize(messages: &[ReceivedMail]) -> Vec<String> {
    messages
        .iter()
        .map(|m| {
            let data = String::from_utf8_lossy(&m.data);
            let head: String = data.chars().take(200).collect();
            format!(
                "helo={} from=<{}> rcpts={:?} {} bytes: {head:?}",
                m.helo,
                m.from,
                m.rcpts,
                m.data.len()
            )
        })
        .collect()
}

/// A port that is free on every given IP at once, returned with the bound listeners (in
/// the order of `ips`) so nothing can take it. Drop a listener to leave a "dead MX" there
/// (connections refused); pass one to [`MxSink::start_on`] to serve it.
pub fn reserve_port(ips: &[Ipv4Addr]) -> (u16, Vec<TcpListener>) {
    assert!(!ips.is_empty(), "reserve_port needs at least one IP");
    let mut last_err = None;
    for _ in 0..100 {
        let first = TcpListener::bind((ips[0], 0)).expect("bind a loopback address");
        let port = first.local_addr().expect("local addr").port();
        let mut listeners = vec![first];
        for ip in &ips[1..] {
            match TcpListener::bind((*ip, port)) {
                Ok(l) => listeners.push(l),
                Err(e) => {
                    last_err = Some(e);
                    break;
                }
            }
        }
        if listeners.len() == ips.len() {
            return (port, listeners);
        }
    }
    panic!("no port free on all of {ips:?}: {last_err:?}");
}
