//! Sending replies: each pushed in the transaction that takes its request
//! off the in-flight list; pipelined, retried across reconnects (then by a
//! script, only if the request is still in flight), bounded in time. Quick calls' replies
//! ride with the popper's next take instead (see `pop`).

use redis::aio::MultiplexedConnection;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tracing::{error, warn};
use vmd_runtime::clip::Clipped;

use super::super::broker::Broker;
use super::super::codec;
use super::super::wire::Response;
use super::inflight::Entry;
use super::{Backoff, REPLY_RETRY_FOR, REPLY_TTL_SECS};

/// Delivers one reply again (a first delivery is a transaction, see
/// [`Outgoing::add_to`]): removes the request's entry from its in-flight
/// list and pushes the reply (with its `EXPIRE`), as one script, so the
/// entry leaves if and only if the reply is in the caller's list, and
/// nothing is pushed if the entry is gone already (a retry must not answer
/// twice). `KEYS[1]`: the in-flight list; `KEYS[2]`: the reply list, if
/// any. `ARGV`: the entry, the reply, its TTL. A reply address naming a key
/// of another type gets nothing (the caller's word: it must not fail the
/// replies sent with it); `RPUSH` could not store into it anyway.
pub(super) const DELIVER: &str = r"
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
if KEYS[2] then
  local t = redis.call('TYPE', KEYS[2])['ok']
  if t ~= 'none' and t ~= 'list' then return -1 end
  redis.call('RPUSH', KEYS[2], ARGV[2])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
  return 1
end
return 0
";

/// A reply on its way (or only a request to settle), with the room its
/// request took: the room is given back only once Redis has the reply, so
/// that a drain waits for it.
pub(super) struct Outgoing {
    /// Where to and what; `None`: the request gets no reply (it named no
    /// address), only its entry is removed.
    reply: Option<(String, Vec<u8>)>,
    entry: Entry,
    /// Deliver only if the entry is still in flight: set once a delivery
    /// may have happened without its answer coming back.
    checked: bool,
    deadline: tokio::time::Instant,
    _room: Option<OwnedSemaphorePermit>,
}

impl Outgoing {
    /// The reply `response` to `reply_to` for the request of `entry`.
    pub(super) fn reply(
        reply_to: String,
        response: &Response,
        entry: Entry,
        room: Option<OwnedSemaphorePermit>,
    ) -> Option<Outgoing> {
        match codec::encode(response) {
            Ok(p) => Some(Self::new(Some((reply_to, p)), entry, room)),
            // Cannot happen short of a bug: the entry stays, and the next run
            // tries again.
            Err(e) => {
                error!(error = %e, "cannot encode a reply");
                None
            }
        }
    }

    /// The removal of the entry of a request that gets no reply.
    pub(super) fn settle(entry: Entry, room: Option<OwnedSemaphorePermit>) -> Outgoing {
        Self::new(None, entry, room)
    }

    fn new(
        reply: Option<(String, Vec<u8>)>,
        entry: Entry,
        room: Option<OwnedSemaphorePermit>,
    ) -> Outgoing {
        Outgoing {
            reply,
            entry,
            checked: false,
            deadline: tokio::time::Instant::now() + REPLY_RETRY_FOR,
            _room: room,
        }
    }

    /// Adds its delivery to `pipe` (its answer ignored); `deliver` is the
    /// SHA1 of [`DELIVER`] as [`load_scripts`] returned it.
    pub(super) fn add_to(&self, pipe: &mut redis::Pipeline, deliver: &str) {
        // A first delivery: a transaction of plain commands (a script costs
        // about 15 µs on the path of every call: BENCHMARKS.md). `EXEC` runs
        // all of it or, if the connection drops before it, none. A reply
        // list of another type fails its `RPUSH` alone, inside the `EXEC`.
        if !self.checked {
            pipe.cmd("MULTI").ignore();
            if let Some((to, payload)) = &self.reply {
                pipe.cmd("RPUSH")
                    .arg(to)
                    .arg(payload)
                    .ignore()
                    .cmd("EXPIRE")
                    .arg(to)
                    .arg(REPLY_TTL_SECS)
                    .ignore();
            }
            pipe.cmd("LREM")
                .arg(&*self.entry.list)
                .arg(1)
                .arg(self.entry.stored())
                .ignore()
                .cmd("EXEC")
                .ignore();
            return;
        }
        let (keys, reply, to): (usize, &[u8], Option<&str>) = match &self.reply {
            Some((to, payload)) => (2, payload, Some(to)),
            None => (1, &[], None),
        };
        pipe.cmd("EVALSHA")
            .arg(deliver)
            .arg(keys)
            .arg(&*self.entry.list);
        if let Some(to) = to {
            pipe.arg(to);
        }
        pipe.arg(self.entry.stored())
            .arg(reply)
            .arg(REPLY_TTL_SECS)
            .ignore();
    }

    /// Marks it as possibly delivered already.
    pub(super) fn checked(mut self) -> Outgoing {
        self.checked = true;
        self
    }
}

/// Sends replies: calls queue them without waiting, one task writes
/// whatever is queued as one pipeline of deliveries (see
/// [`Outgoing::add_to`]) on its own connection, reconnecting when it breaks. A reply is retried (checked) for
/// [`REPLY_RETRY_FOR`] while Redis is away, then given up (its request stays
/// in flight for the next run).
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

    /// Queues a reply; its room is held until it is delivered.
    pub(super) fn push(&self, out: Outgoing) {
        if self.queue.send(out).is_err() {
            error!("the replier is gone; a reply waits for the next run");
        }
    }
}

/// Loads [`DELIVER`] on a connection (a Redis that restarted has forgotten
/// it); its SHA1, for `EVALSHA`.
pub(super) async fn load_deliver(conn: &mut MultiplexedConnection) -> redis::RedisResult<String> {
    redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(DELIVER)
        .query_async::<String>(conn)
        .await
}

async fn reply_loop(broker: Broker, mut rx: mpsc::UnboundedReceiver<Outgoing>) {
    let mut conn: Option<(MultiplexedConnection, String)> = None;
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
        let (c, deliver) = match &mut conn {
            Some(c) => c,
            None => {
                let connected = match broker.connect().await {
                    Ok(mut c) => load_deliver(&mut c)
                        .await
                        .map(|sha| (c, sha))
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match connected {
                    Ok(c) => conn.insert(c),
                    Err(e) => {
                        warn!(error = %e, "cannot reach the broker to reply");
                        give_up_expired(&mut batch);
                        backoff.wait().await;
                        continue;
                    }
                }
            }
        };
        let mut pipe = redis::pipe();
        for o in &batch {
            o.add_to(&mut pipe, deliver);
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
                // Some may have gone out: from now on each only if its
                // request is still in flight.
                batch = batch.drain(..).map(Outgoing::checked).collect();
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
            let reply_to = o.reply.as_ref().map_or("", |(r, _)| r.as_str());
            error!(
                reply_to = %Clipped(reply_to),
                "giving up a reply: broker unreachable for {REPLY_RETRY_FOR:?}; \
                 its request stays in flight for the next run"
            );
        }
        keep
    });
}
