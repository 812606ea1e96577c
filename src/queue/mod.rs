//! The queue: the durable spool of accepted messages and the scheduler that
//! hands due recipients to delivery, applies the retry schedule and expires
//! what has waited too long.

pub mod message;
pub mod schedule;
pub mod spool;

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::report::Classification;
use crate::reply::Reply;
pub use message::{Envelope, Notify, QueueId, RcptStatus, Recipient, Ret};

/// Recipients of one message at one domain, due for an attempt.
#[derive(Clone, Debug)]
pub struct DeliveryJob {
    pub id: QueueId,
    pub envelope: Arc<Envelope>,
    /// The message as it goes on the wire (CRLF line ends, not dot-stuffed).
    pub body: Bytes,
    /// Lower-case recipient domain.
    pub domain: String,
    pub recipients: Vec<JobRecipient>,
}

#[derive(Clone, Debug)]
pub struct JobRecipient {
    /// Index of the recipient within its message.
    pub index: usize,
    pub address: String,
    pub orcpt: Option<String>,
    pub notify: Notify,
    /// This attempt's number, from 1.
    pub attempt: u32,
}

/// What one attempt did for one recipient.
#[derive(Clone, Debug)]
pub struct RcptOutcome {
    pub index: usize,
    pub result: AttemptResult,
    /// The host that answered, when one did.
    pub mx: Option<String>,
    /// TLS version of the connection, e.g. "TLSv1.3".
    pub tls: Option<String>,
}

#[derive(Clone, Debug)]
pub enum AttemptResult {
    /// The MX took responsibility (2xx after DATA).
    Delivered(Reply),
    /// Try again later: a 4xx, or a local or network problem described as a
    /// 4xx reply (e.g. `451 4.4.1 connection refused by mx1...`).
    Deferred(Reply, Classification),
    /// Give up: a 5xx from the MX, or a permanent fact such as a null MX.
    Bounced(Reply, Classification),
    /// Not attempted (shutdown, destination limit): reschedule without
    /// counting an attempt.
    NotAttempted,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("spool I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("the queue is shutting down")]
    Closed,
}

pub struct Queue {
    _jobs: mpsc::UnboundedSender<DeliveryJob>,
}

impl Queue {
    /// Stores a message durably and schedules its first attempt. Returns
    /// only once the message is on stable storage.
    pub async fn enqueue(
        &self,
        _envelope: Envelope,
        _recipients: Vec<Recipient>,
        _body: Bytes,
    ) -> Result<QueueId, QueueError> {
        todo!()
    }

    /// Records what an attempt did for some recipients of a message.
    pub fn complete_attempt(&self, _id: QueueId, _outcomes: Vec<RcptOutcome>) {
        todo!()
    }
}
