//! Sending replies: pipelined, retried across reconnects, bounded in time.

use redis::aio::MultiplexedConnection;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tracing::{error, warn};

use super::super::broker::Broker;
use super::super::codec;
use super::super::wire::Response;
use super::{Backoff, REPLY_RETRY_FOR, REPLY_TTL_SECS};

/// A reply on its way, with the room its request took: the room is given
/// back only once Redis has the reply, so that a drain waits for it.
struct Outgoing {
    reply_to: String,
    payload: Vec<u8>,
    deadline: tokio::time::Instant,
    _room: Option<OwnedSemaphorePermit>,
}

/// Sends replies: calls queue them without waiting, one task writes
/// whatever is queued as one pipeline (RPUSH + EXPIRE each) on its own
/// connection, reconnecting when it breaks. A reply is retried for
/// [`REPLY_RETRY_FOR`] while Redis is away, then given up.
pub(super) struct Replier {
    queue: mpsc::UnboundedSender<Outgoing>,
}

/// Replies written in one pipeline, at most.
const REPLY_BATCH: usize = 256;

impl Replier {
    /// Must be called on the runtime the replies are written from.
    pub(super) fn start(broker: Broker) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(reply_loop(broker, rx));
        Replier { queue }
    }

    /// Queues `response` for `reply_to`; `room` is held until it is sent.
    pub(super) fn send(
        &self,
        reply_to: String,
        response: &Response,
        room: Option<OwnedSemaphorePermit>,
    ) {
        let payload = match codec::encode(response) {
            Ok(p) => p,
            Err(e) => {
                error!(error = %e, "cannot encode a reply");
                return;
            }
        };
        let out = Outgoing {
            reply_to,
            payload,
            deadline: tokio::time::Instant::now() + REPLY_RETRY_FOR,
            _room: room,
        };
        if self.queue.send(out).is_err() {
            error!("the replier is gone; a reply is lost");
        }
    }
}

async fn reply_loop(broker: Broker, mut rx: mpsc::UnboundedReceiver<Outgoing>) {
    let mut conn: Option<MultiplexedConnection> = None;
    let mut backoff = Backoff::new();
    let mut batch: Vec<Outgoing> = Vec::new();
    loop {
        if batch.is_empty() {
            match rx.recv().await {
                Some(o) => batch.push(o),
                None => return,
            }
        }
        while batch.len() < REPLY_BATCH {
            match rx.try_recv() {
                Ok(o) => batch.push(o),
                Err(_) => break,
            }
        }
        let c = match &mut conn {
            Some(c) => c,
            None => match broker.connect().await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    warn!(error = %e, "cannot reach the broker to reply");
                    give_up_expired(&mut batch);
                    backoff.wait().await;
                    continue;
                }
            },
        };
        // One write, no MULTI/EXEC: Redis runs each pair or, if it dies in
        // between, loses the reply with everything else.
        let mut pipe = redis::pipe();
        for o in &batch {
            pipe.cmd("RPUSH")
                .arg(&o.reply_to)
                .arg(&o.payload)
                .ignore()
                .cmd("EXPIRE")
                .arg(&o.reply_to)
                .arg(REPLY_TTL_SECS)
                .ignore();
        }
        let sent: redis::RedisResult<()> = pipe.query_async(c).await;
        match sent {
            Ok(()) => {
                batch.clear();
                backoff.reset();
            }
            Err(e) => {
                warn!(error = %e, replies = batch.len(), "reply failed, reconnecting");
                conn = None;
                give_up_expired(&mut batch);
                backoff.wait().await;
            }
        }
    }
}

fn give_up_expired(batch: &mut Vec<Outgoing>) {
    let now = tokio::time::Instant::now();
    batch.retain(|o| {
        let keep = o.deadline > now;
        if !keep {
            error!(
                reply_to = %o.reply_to,
                "giving up a reply: broker unreachable for {REPLY_RETRY_FOR:?}"
            );
        }
        keep
    });
}
