//! Sending replies: each pushed in the write that takes its request off the
//! in-flight list (see [`ONE_WRITE`]); pipelined, retried across reconnects
//! (then by a script, only if the request is still in flight), bounded in
//! time. Quick calls' replies ride with the popper's next take instead (see
//! `pop`).

use redis::aio::MultiplexedConnection;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tracing::{error, warn};
use vmd_runtime::clip::Clipped;

use super::super::broker::Broker;
use super::super::codec;
use super::super::wire::Response;
use super::inflight::Entry;
use super::{command, Backoff, REPLY_RETRY_FOR, REPLY_TTL_SECS};

/// Delivers one reply again (a first delivery is plain commands, see
/// [`ONE_WRITE`]): removes the request's entry from its in-flight
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

    /// How many bytes its delivery puts on the wire, about.
    fn size(&self) -> usize {
        let reply = self
            .reply
            .as_ref()
            .map_or(0, |(to, p)| 2 * to.len() + p.len());
        reply + self.entry.list.len() + self.entry.stored().len()
    }

    /// Adds its delivery to `pipe`; the number of answers it gets back.
    /// `deliver` is the SHA1 of [`DELIVER`] as [`load_deliver`] returned it.
    /// `atomic`: a first delivery as a transaction (see [`add_deliveries`]).
    fn add_to(&self, pipe: &mut redis::Pipeline, deliver: &str, atomic: bool) -> usize {
        if self.checked {
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
            pipe.arg(self.entry.stored()).arg(reply).arg(REPLY_TTL_SECS);
            return 1;
        }
        // A first delivery: plain commands, no script (a script costs about
        // 15 µs on the path of every call: BENCHMARKS.md). The reply before
        // the removal, so that a delivery cut short can only leave the
        // request in flight, to be answered again (checked), never drop it.
        let mut answers = 0;
        if atomic {
            pipe.cmd("MULTI");
            answers += 1;
        }
        if let Some((to, payload)) = &self.reply {
            let mut push = command("RPUSH", 2, to.len() + payload.len());
            push.arg(to).arg(payload);
            let mut expire = command("EXPIRE", 2, to.len() + 20);
            expire.arg(to).arg(REPLY_TTL_SECS);
            pipe.add_command(push).add_command(expire);
            answers += 2;
        }
        let (list, stored) = (&*self.entry.list, self.entry.stored());
        let mut remove = command("LREM", 3, list.len() + 1 + stored.len());
        remove.arg(list).arg(1).arg(stored);
        pipe.add_command(remove);
        answers += 1;
        if atomic {
            pipe.cmd("EXEC");
            answers += 1;
        }
        answers
    }

    /// What its answers say: `None` if it is done with (delivered, or
    /// refused for good), else itself to deliver again.
    fn settled_by(self, answers: &[redis::Value]) -> Option<Outgoing> {
        let refused = answers.iter().find_map(server_error);
        let reply_to = self.reply.as_ref().map_or("", |(r, _)| r.as_str());
        // The caller's word: a reply address naming a string, a stream...
        // That reply is dropped; its request's entry went with it (`RPUSH`
        // fails alone; [`DELIVER`] says -1).
        let not_a_list = refused
            .as_ref()
            .is_some_and(|e| e.code() == Some("WRONGTYPE"))
            || (self.checked && matches!(answers, [redis::Value::Int(-1)]));
        if not_a_list {
            warn!(reply_to = %Clipped(reply_to), "a reply address names a key that is not a list; its reply is dropped");
            return None;
        }
        let e = refused?;
        error!(reply_to = %Clipped(reply_to), error = %e,
               "the broker refused a reply; sending it again while its request is in flight");
        Some(self.checked())
    }

    /// Marks it as possibly delivered already.
    pub(super) fn checked(mut self) -> Outgoing {
        self.checked = true;
        self
    }
}

/// Pipelines larger than this are written as one transaction per reply.
/// A smaller one goes out in a single `write(2)` on a connection with
/// nothing else in flight (its answers are awaited before the next), so
/// Redis gets all of it or none, and plain commands are as safe as a
/// transaction, which costs about 9 k instructions per call in Redis and
/// 12 k in vmd's parser (BENCHMARKS.md). A larger one may be written in parts, and a
/// death between them must not leave a reply pushed with its request
/// still in flight (the next run would answer it a second time).
const ONE_WRITE: usize = 4096;

/// Adds the deliveries of `batch` to `pipe`; the number of answers each
/// gets back, for [`settle`].
pub(super) fn add_deliveries(
    pipe: &mut redis::Pipeline,
    batch: &[Outgoing],
    deliver: &str,
) -> Vec<usize> {
    let atomic = batch.iter().map(Outgoing::size).sum::<usize>() > ONE_WRITE;
    batch
        .iter()
        .map(|o| o.add_to(pipe, deliver, atomic))
        .collect()
}

/// Reads the answers of the deliveries of `batch` (as many as
/// [`add_deliveries`] said, in order); what must be delivered again.
pub(super) fn settle(
    batch: Vec<Outgoing>,
    counts: &[usize],
    answers: &[redis::Value],
) -> Vec<Outgoing> {
    let mut at = 0;
    let mut again = Vec::new();
    for (o, n) in batch.into_iter().zip(counts) {
        let mine = answers.get(at..at + n).unwrap_or(&[]);
        at += n;
        again.extend(o.settled_by(mine));
    }
    again
}

/// The first error in an answer (a transaction's answer holds its
/// commands' answers).
fn server_error(v: &redis::Value) -> Option<redis::RedisError> {
    match v {
        redis::Value::ServerError(e) => Some(e.clone().into()),
        redis::Value::Array(items) => items.iter().find_map(server_error),
        _ => None,
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
        let counts = add_deliveries(&mut pipe, &batch, deliver);
        let total = counts.iter().sum();
        match c.send_packed_commands(&pipe, 0, total).await {
            Ok(answers) => {
                batch = settle(std::mem::take(&mut batch), &counts, &answers);
                if batch.is_empty() {
                    backoff.reset();
                } else {
                    // Refused by the broker (out of memory, no disk for
                    // its snapshot): not at once again.
                    give_up_expired(&mut batch);
                    backoff.wait().await;
                }
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

#[cfg(test)]
mod tests {
    use super::super::inflight::Takes;
    use super::*;
    use redis::Value;

    /// A reply of `bytes` bytes of message to the request `stored`.
    fn outgoing(stored: &[u8], bytes: usize) -> Outgoing {
        let list = Takes::new().next("vmd.manager@0.0.1");
        let entry = list.entries(vec![stored.to_vec()]).remove(0);
        let response = Response::protocol_error("id", "x".repeat(bytes));
        Outgoing::reply("reply-list".into(), &response, entry, None).unwrap()
    }

    fn packed(batch: &[Outgoing]) -> (String, Vec<usize>) {
        let mut pipe = redis::pipe();
        let counts = add_deliveries(&mut pipe, batch, "sha");
        (
            String::from_utf8_lossy(&pipe.get_packed_pipeline()).into_owned(),
            counts,
        )
    }

    #[test]
    fn a_small_write_is_plain_commands_a_large_one_a_transaction_per_reply() {
        let (small, counts) = packed(&[outgoing(b"req-1", 100), outgoing(b"req-2", 100)]);
        assert!(!small.contains("MULTI"), "{small}");
        assert_eq!(small.matches("RPUSH").count(), 2);
        assert_eq!(counts, [3, 3]);
        // The reply first: a write cut short leaves its request in flight.
        assert!(small.find("RPUSH").unwrap() < small.find("LREM").unwrap());

        let (large, counts) = packed(&[outgoing(b"req-1", 100), outgoing(b"req-2", ONE_WRITE)]);
        assert_eq!(large.matches("MULTI").count(), 2, "{large}");
        assert_eq!(large.matches("EXEC").count(), 2);
        assert_eq!(counts, [5, 5]);
    }

    fn error(text: &str) -> Value {
        redis::parse_redis_value(format!("-{text}\r\n").as_bytes()).unwrap()
    }

    #[test]
    fn a_refused_reply_goes_again_checked_one_to_a_key_of_another_type_is_dropped() {
        let batch = vec![outgoing(b"a", 10), outgoing(b"b", 10), outgoing(b"c", 10)];
        let (_, counts) = packed(&batch);
        let answers = [
            // Delivered.
            Value::Int(1),
            Value::Int(1),
            Value::Int(1),
            // The caller named a string.
            error("WRONGTYPE Operation against a key holding the wrong kind of value"),
            Value::Int(1),
            Value::Int(1),
            // Redis out of memory.
            error("OOM command not allowed when used memory > 'maxmemory'."),
            Value::Int(0),
            Value::Int(1),
        ];
        let again = settle(batch, &counts, &answers);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].entry.stored(), b"c");
        assert!(again[0].checked, "sent again only while still in flight");

        // Checked, by the script: -1 is its word for a key of another type.
        let retried = vec![outgoing(b"d", 10).checked(), outgoing(b"e", 10).checked()];
        let (script, counts) = packed(&retried);
        assert!(script.contains("EVALSHA") && !script.contains("RPUSH"));
        assert_eq!(counts, [1, 1]);
        assert!(settle(retried, &counts, &[Value::Int(-1), Value::Int(0)]).is_empty());
    }

    #[test]
    fn a_refused_transaction_goes_again() {
        let batch = vec![outgoing(b"a", ONE_WRITE)];
        let (_, counts) = packed(&batch);
        let answers = [
            Value::Okay,
            error("OOM command not allowed when used memory > 'maxmemory'."),
            Value::SimpleString("QUEUED".into()),
            Value::SimpleString("QUEUED".into()),
            error("EXECABORT Transaction discarded because of previous errors."),
        ];
        assert_eq!(settle(batch, &counts, &answers).len(), 1);
    }
}
