//! The events stream of a cluster: with `[cluster] redis_url` set, every
//! event is also appended to a Redis stream (`[cluster] events_stream`,
//! default `<key_prefix>:events`) with
//! `XADD <stream> MAXLEN ~ <events_stream_maxlen> * event <json>`.
//!
//! Each stream entry has one field, `event`, whose value is exactly the
//! JSON of the event's line in the events log (the same serializer, no
//! newline). Consumers read it with `XRANGE`/`XREAD` or a consumer group;
//! Redis trims the stream to about `events_stream_maxlen` entries
//! (`MAXLEN ~` lets it trim whole nodes, which is cheap).
//!
//! The stream is a convenience feed, not the record: events wait in a
//! bounded buffer ([`BUFFER`]) and are sent by one writer task every
//! [`WRITE_TICK`], one pipeline per batch, so mail never waits on Redis.
//! When Redis is down the outage is logged once (and its end once), the
//! writer retries with backoff, and events that do not fit in the buffer
//! are dropped and counted ([`counters`]). The JSON-lines events log and
//! the webhook outbox remain the durable record of every event.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::Event;
use crate::config::Config;
use crate::metrics::Metrics;

/// Events held for Redis at most: in the channel, and again in the
/// writer's batch. Beyond it new events are dropped (and counted).
pub const BUFFER: usize = 10_000;

/// Most events in one pipeline.
const BATCH: usize = 1000;

/// How often the writer collects queued events, like the events log's
/// writer: emitting an event wakes no other thread.
const WRITE_TICK: Duration = Duration::from_millis(20);

/// Wait after the first failed send; doubled after each further one.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Hands events to the stream writer; cheap to clone, never blocks.
#[derive(Clone)]
pub struct EventStream {
    tx: mpsc::Sender<Event>,
    /// `herald_events_stream_*`.
    metrics: Arc<Metrics>,
}

impl EventStream {
    /// Starts the writer when `[cluster] redis_url` is set (`None`
    /// otherwise). Connects lazily: an unreachable Redis does not hold up
    /// the start. The task ends once every [`EventStream`] is dropped and
    /// what is left was sent (one attempt when Redis is down).
    pub fn start(
        config: &Config,
        metrics: Arc<Metrics>,
    ) -> Option<Result<(EventStream, tokio::task::JoinHandle<()>), String>> {
        let url = config.cluster.redis_url.as_deref()?;
        Some(Self::start_with(config, url, metrics))
    }

    fn start_with(
        config: &Config,
        url: &str,
        metrics: Arc<Metrics>,
    ) -> Result<(EventStream, tokio::task::JoinHandle<()>), String> {
        let client = ::redis::Client::open(url).map_err(|e| format!("invalid Redis URL: {e}"))?;
        let timeout = config.cluster.redis_timeout.as_duration();
        // A batch of BATCH entries may take longer than one quick check.
        let response = timeout.max(Duration::from_secs(1));
        let cfg = ::redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout.max(Duration::from_millis(200))))
            .set_response_timeout(Some(response))
            .set_number_of_retries(1);
        let conn = ::redis::aio::ConnectionManager::new_lazy_with_config(client, cfg)
            .map_err(|e| format!("cannot set up the Redis connection: {e}"))?;
        let (tx, rx) = mpsc::channel(BUFFER);
        let writer = Writer {
            conn,
            stream: config.cluster.events_stream_name(),
            maxlen: config.cluster.events_stream_maxlen,
            deadline: response * 2,
            metrics: metrics.clone(),
        };
        Ok((EventStream { tx, metrics }, tokio::spawn(writer.run(rx))))
    }

    /// Queues the event for the stream; drops (and counts) it when the
    /// buffer is full.
    pub fn offer(&self, event: &Event) {
        if self.tx.try_send(event.clone()).is_err() {
            self.metrics.stream_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

struct Writer {
    conn: ::redis::aio::ConnectionManager,
    stream: String,
    maxlen: u64,
    /// Bound on one pipeline, whatever the connection manager does.
    deadline: Duration,
    metrics: Arc<Metrics>,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Event>) {
        let mut pending: VecDeque<String> = VecDeque::new();
        let mut tick = tokio::time::interval(WRITE_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut backoff = BACKOFF_MIN;
        let mut retry_at = Instant::now();
        // Events dropped since the outage began (for the recovery line).
        let mut outage: Option<u64> = None;
        loop {
            tick.tick().await;
            let mut closed = false;
            while pending.len() < BUFFER {
                match rx.try_recv() {
                    Ok(ev) => match serde_json::to_string(&ev) {
                        Ok(json) => pending.push_back(json),
                        Err(_) => {
                            self.metrics.stream_dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    },
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
            self.metrics
                .stream_pending
                .store((pending.len() + rx.len()) as u64, Ordering::Relaxed);
            if pending.is_empty() || (!closed && Instant::now() < retry_at) {
                if closed {
                    return;
                }
                continue;
            }
            // Send everything held, a batch at a time, while Redis answers.
            while !pending.is_empty() {
                let n = pending.len().min(BATCH);
                match self.send(pending.range(..n)).await {
                    Ok(()) => {
                        pending.drain(..n);
                        self.metrics
                            .stream_sent
                            .fetch_add(n as u64, Ordering::Relaxed);
                        backoff = BACKOFF_MIN;
                        if let Some(start) = outage.take() {
                            tracing::info!(
                                stream = %self.stream,
                                dropped = self.metrics.stream_dropped.load(Ordering::Relaxed) - start,
                                "Redis reachable again: events go to the stream again"
                            );
                        }
                    }
                    Err(e) => {
                        if outage.is_none() {
                            outage = Some(self.metrics.stream_dropped.load(Ordering::Relaxed));
                            tracing::warn!(
                                stream = %self.stream,
                                error = %e,
                                "Redis unreachable: events wait for the stream (the events log and webhooks are unaffected)"
                            );
                        }
                        retry_at = Instant::now() + backoff;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        break;
                    }
                }
            }
            self.metrics
                .stream_pending
                .store((pending.len() + rx.len()) as u64, Ordering::Relaxed);
            if closed {
                if !pending.is_empty() {
                    self.metrics
                        .stream_dropped
                        .fetch_add(pending.len() as u64, Ordering::Relaxed);
                    self.metrics.stream_pending.store(0, Ordering::Relaxed);
                    tracing::warn!(
                        stream = %self.stream,
                        events = pending.len(),
                        "events not added to the stream at shutdown (they are in the events log)"
                    );
                }
                return;
            }
        }
    }

    /// One pipeline: an `XADD ... MAXLEN ~ N * event <json>` per event.
    async fn send(&mut self, events: impl Iterator<Item = &String>) -> Result<(), String> {
        let mut pipe = ::redis::pipe();
        for json in events {
            pipe.cmd("XADD")
                .arg(&self.stream)
                .arg("MAXLEN")
                .arg("~")
                .arg(self.maxlen)
                .arg("*")
                .arg("event")
                .arg(json)
                .ignore();
        }
        match tokio::time::timeout(self.deadline, pipe.query_async::<()>(&mut self.conn)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.deadline)),
        }
    }
}

/// Fed every event by the bus.
impl super::EventSink for EventStream {
    fn observe(&self, event: &Event) -> Option<Event> {
        self.offer(event);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(cluster: &str) -> Result<Config, crate::config::ConfigErrors> {
        Config::from_toml_str(&format!(
            "[[listener]]\naddress = \"127.0.0.1:2587\"\n[cluster]\n{cluster}\n"
        ))
    }

    #[test]
    fn stream_name_and_cap_from_config() {
        let c = config("key_prefix = \"eu1\"").unwrap();
        assert_eq!(c.cluster.events_stream_name(), "eu1:events");
        assert_eq!(c.cluster.events_stream_maxlen, 100_000);
        let c = config("events_stream = \"app:herald\"\nevents_stream_maxlen = 500").unwrap();
        assert_eq!(c.cluster.events_stream_name(), "app:herald");
        assert_eq!(c.cluster.events_stream_maxlen, 500);
        let errs = config("events_stream = \"\"\nevents_stream_maxlen = 0").unwrap_err();
        let paths: Vec<&str> = errs.0.iter().map(|e| e.path.as_str()).collect();
        assert!(paths.contains(&"cluster.events_stream"), "{paths:?}");
        assert!(paths.contains(&"cluster.events_stream_maxlen"), "{paths:?}");
    }

    #[tokio::test]
    async fn single_node_has_no_stream() {
        assert!(EventStream::start(&config("").unwrap(), Arc::default()).is_none());
    }

    #[tokio::test]
    async fn a_full_buffer_drops_and_counts() {
        let (tx, _rx) = mpsc::channel(1);
        let s = EventStream {
            tx,
            metrics: Arc::default(),
        };
        let e = Event::new(super::super::EventKind::Received, "a@b.test");
        s.offer(&e);
        s.offer(&e);
        s.offer(&e);
        assert_eq!(s.metrics.stream_dropped.load(Ordering::Relaxed), 2);
    }
}
