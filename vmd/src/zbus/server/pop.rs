//! Taking requests: one connection per queue; each take atomically moves a
//! batch of requests to an in-flight list of its own (see
//! [`super::inflight`]), only with room to serve what is taken; each request
//! decoded and served, malformed ones answered when they say where to. A
//! popper's first act is to serve what a previous run left in flight.

use std::sync::Arc;
use std::time::SystemTime;

use futures_util::FutureExt;
use redis::aio::MultiplexedConnection;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tracing::{info, warn};
use vmd_runtime::clip::Clipped;

use super::super::broker::Broker;
use super::super::codec;
use super::super::wire::{Request, Response};
use super::inflight::{pattern_of, Entry, TakeList, TAKE};
use super::reply::{add_deliveries, load_deliver, settle, Outgoing};
use super::{command, serve, Backoff, Shared, POP_BATCH, POP_TIMEOUT_SECS};

/// How the popper takes: the newest way the broker supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// Redis ≥ 6.2: `BLMOVE q <list> LEFT RIGHT` waits for the oldest
    /// request and moves it in one command; `LMOVE`s behind it move the
    /// rest of the batch. Plain commands: no script on the path of a call.
    Blmove,
    /// Older: `BRPOPLPUSH q q` waits without taking (it moves the newest
    /// request to the head), then the take script moves the batch. The
    /// newest is served first: order within a batch is not kept, nothing is
    /// lost.
    Brpoplpush,
}

/// The broker does not know a command (an older Redis: "unknown command
/// 'BLMOVE'").
fn unknown_command(e: &redis::RedisError) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    e.kind() == redis::ErrorKind::ResponseError && text.contains("unknown command")
}

/// What a popper must look for in its in-flight list after (re)connecting.
enum Recover {
    /// Everything: left by earlier runs (the popper's first connection).
    All,
    /// What one take of this process moved but never got back (its
    /// connection broke, or the broker did not know the wait command).
    Take(TakeList),
}

pub(super) async fn pop_loop(
    broker: Broker,
    queue: String,
    shared: Arc<Shared>,
    inflight: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new();
    let mut wait = Wait::Blmove;
    let mut recover = Recover::All;
    // How many requests the next take tries to move, and how many takes
    // in a row got their one request (see `next_batch`).
    let (mut batch, mut singles) = (1usize, 0usize);
    // Replies of quick calls answered inline: they go out in the pipeline of
    // the next take, one write for both, as an echo server would send them.
    let mut ready: Vec<Outgoing> = Vec::new();
    'connect: while !*shutdown.borrow() {
        let mut conn = match broker.connect().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "broker unreachable, retrying");
                tokio::select! {
                    _ = backoff.wait() => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
        };
        let scripts = match load_scripts(&mut conn).await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot load vmd's scripts into the broker");
                backoff.wait().await;
                continue;
            }
        };
        // Done once per connection: the way back here sets it anew.
        match recover_left(&mut conn, &queue, &recover, &shared, &inflight).await {
            Ok(()) => {}
            Err(e) => {
                warn!(error = %e, "lost the broker while reading requests in flight");
                backoff.wait().await;
                continue;
            }
        }
        loop {
            if *shutdown.borrow() {
                ready.drain(..).for_each(|o| shared.replier.push(o));
                return;
            }
            // No room left: what is ready must not wait for some.
            if inflight.available_permits() == 0 {
                ready.drain(..).for_each(|o| shared.replier.push(o));
            }
            // Wait for room first: what is taken must be served.
            let permit = tokio::select! {
                p = Arc::clone(&inflight).acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
                _ = shutdown.changed() => continue,
            };
            // Under load more requests wait behind the first: take as many
            // as there is room for, a bounded batch at a time.
            let room = (inflight.available_permits() + 1).min(POP_BATCH);
            let tries = batch.min(room);
            let list = shared.takes.next(&queue);
            let sending = std::mem::take(&mut ready);
            let take = Take {
                wait,
                scripts: &scripts,
                queue: &queue,
                list: &list,
                room,
                tries,
            };
            // Cancelling a take is safe at any instant: what its moves took
            // is in its in-flight list for the next run, and the replies
            // sent with it go again, checked.
            let taken = tokio::select! {
                t = take.run(&mut conn, &sending) => t,
                _ = shutdown.changed() => {
                    sending.into_iter().for_each(|o| shared.replier.push(o.checked()));
                    return;
                }
            };
            let took = match taken {
                Ok(answers) => {
                    // Delivered (their room is free again) or refused: those
                    // to send again go to the replier, with their room.
                    settle(sending, &answers.counts, &answers.sent)
                        .into_iter()
                        .for_each(|o| shared.replier.push(o));
                    answers.took
                }
                Err(e) => {
                    sending
                        .into_iter()
                        .for_each(|o| shared.replier.push(o.checked()));
                    Err(e)
                }
            };
            let stored = match took {
                Ok(stored) => stored,
                Err(e) => {
                    // The moves may have run: find what they took.
                    recover = Recover::Take(list);
                    if wait == Wait::Blmove && unknown_command(&e) {
                        info!(error = %e, "broker has no BLMOVE (Redis < 6.2); waiting with BRPOPLPUSH");
                        wait = Wait::Brpoplpush;
                    } else {
                        warn!(error = %e, "lost the broker while waiting for requests");
                        backoff.wait().await;
                    }
                    continue 'connect;
                }
            };
            batch = next_batch(&mut singles, tries, stored.len());
            if stored.is_empty() {
                continue;
            }
            backoff.reset();
            let entries = list.entries(stored);
            serve_taken(
                &shared,
                &inflight,
                Some(permit),
                entries,
                false,
                Some(&mut ready),
            );
        }
    }
}

/// How many requests a take after one that tried `tries` and got `got`
/// tries to move: doubled while takes come back full, one more than the
/// last got while there were several, one while calls come one at a time.
/// Each try that finds the queue empty costs a command on the path of a
/// call, for Redis and for vmd's parser, so a take of one request tries
/// a second move only every [`PROBE_EVERY`]th time, to find out whether
/// requests now wait behind each other.
fn next_batch(singles: &mut usize, tries: usize, got: usize) -> usize {
    if tries == 1 && got == 1 {
        *singles += 1;
        if *singles < PROBE_EVERY {
            return 1;
        }
    }
    *singles = 0;
    let next = if got >= tries {
        tries * 2
    } else if got <= 1 {
        1
    } else {
        got + 1
    };
    next.clamp(1, POP_BATCH)
}

/// See [`next_batch`].
const PROBE_EVERY: usize = 8;

/// The scripts of a connection, by SHA1.
struct Scripts {
    take: String,
    deliver: String,
}

async fn load_scripts(conn: &mut MultiplexedConnection) -> redis::RedisResult<Scripts> {
    let take: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(TAKE)
        .query_async(&mut *conn)
        .await?;
    let deliver = load_deliver(conn).await?;
    Ok(Scripts { take, deliver })
}

/// One take: the replies that are ready, then a wait until the queue has a
/// request and the moves of up to a batch of them to the take's own list.
/// One write and one round trip: Redis runs what follows the wait as soon as
/// the wait returns.
struct Take<'a> {
    wait: Wait,
    scripts: &'a Scripts,
    queue: &'a str,
    list: &'a TakeList,
    /// Free room: the most a take may move.
    room: usize,
    /// How many moves to send (`Wait::Blmove`; at most `room`).
    tries: usize,
}

impl Take<'_> {
    /// Sends `replies` and the take in one write. `Err`: the connection
    /// failed, and nothing is known of what was sent.
    async fn run(
        &self,
        conn: &mut MultiplexedConnection,
        replies: &[Outgoing],
    ) -> redis::RedisResult<Answers> {
        let mut pipe = redis::pipe();
        let counts = add_deliveries(&mut pipe, replies, &self.scripts.deliver);
        let delivered: usize = counts.iter().sum();
        let (q, list) = (self.queue, self.list.name());
        let take = match self.wait {
            Wait::Blmove => {
                let names = q.len() + list.len() + "LEFTRIGHT".len();
                let mut wait = command("BLMOVE", 5, names + 20);
                wait.arg(q)
                    .arg(list)
                    .arg("LEFT")
                    .arg("RIGHT")
                    .arg(POP_TIMEOUT_SECS);
                pipe.add_command(wait);
                for _ in 1..self.tries {
                    let mut more = command("LMOVE", 4, names);
                    more.arg(q).arg(list).arg("LEFT").arg("RIGHT");
                    pipe.add_command(more);
                }
                self.tries
            }
            Wait::Brpoplpush => {
                pipe.cmd("BRPOPLPUSH").arg(q).arg(q).arg(POP_TIMEOUT_SECS);
                pipe.cmd("EVALSHA")
                    .arg(&self.scripts.take)
                    .arg(2)
                    .arg(q)
                    .arg(list)
                    .arg(self.room);
                2
            }
        };
        let mut sent = conn
            .send_packed_commands(&pipe, 0, delivered + take)
            .await?;
        let took = sent.split_off(delivered.min(sent.len()));
        Ok(Answers {
            counts,
            sent,
            took: self.moved(&took),
        })
    }

    /// What the take's commands moved; `Err`: the broker refused them.
    fn moved(&self, took: &[redis::Value]) -> redis::RedisResult<Vec<Vec<u8>>> {
        match self.wait {
            // A move that finds the queue empty does not end the batch: a
            // caller's push may come between two moves, and what a later
            // one moved is in flight and must be served.
            Wait::Blmove => {
                let moved: Vec<Option<Vec<u8>>> =
                    took.iter().map(value).collect::<Result<_, _>>()?;
                Ok(moved.into_iter().flatten().collect())
            }
            // `BRPOPLPUSH` only waits (what it rotated stays queued); the
            // script moved the batch.
            Wait::Brpoplpush => {
                let [waited, script] = took else {
                    return Err(unexpected(took.len()));
                };
                value::<Option<Vec<u8>>>(waited)?;
                value(script)
            }
        }
    }
}

/// The answers to a take's write.
struct Answers {
    /// How many answers each reply sent with it has, in order.
    counts: Vec<usize>,
    /// The replies' answers.
    sent: Vec<redis::Value>,
    /// What the take moved, or the broker's error.
    took: redis::RedisResult<Vec<Vec<u8>>>,
}

/// An answer as `T`; the broker's error as an error.
fn value<T: redis::FromRedisValue>(v: &redis::Value) -> redis::RedisResult<T> {
    match v {
        redis::Value::ServerError(e) => Err(e.clone().into()),
        v => redis::from_redis_value(v),
    }
}

fn unexpected(answers: usize) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::ResponseError,
        "unexpected number of answers to a take",
        answers.to_string(),
    ))
}

/// Serves what an earlier run left in flight (at the first connection), or
/// what a take of this run lost on its way back.
async fn recover_left(
    conn: &mut MultiplexedConnection,
    queue: &str,
    recover: &Recover,
    shared: &Arc<Shared>,
    inflight: &Arc<Semaphore>,
) -> redis::RedisResult<()> {
    let lists = match recover {
        Recover::Take(list) => vec![list.clone()],
        Recover::All => scan_lists(conn, queue).await?,
    };
    let now = SystemTime::now();
    let mut replays = Vec::new();
    for list in lists {
        let stored: Vec<Vec<u8>> = match redis::cmd("LRANGE")
            .arg(list.name())
            .arg(0)
            .arg(-1)
            .query_async(conn)
            .await
        {
            Ok(s) => s,
            // Named like one, but not a list: not vmd's.
            Err(e) if e.kind() == redis::ErrorKind::TypeError || e.code() == Some("WRONGTYPE") => {
                warn!(key = %Clipped(list.name()), "skipping a key named like an in-flight list that is none");
                continue;
            }
            Err(e) => return Err(e),
        };
        for entry in list.entries(stored) {
            let age = entry.age(now);
            if matches!(recover, Recover::All) && age > shared.replay_max_age {
                // Its caller gave up long ago: serving it now would apply a
                // change nobody waits for.
                warn!(list = %entry.list, age = ?age, max = ?shared.replay_max_age,
                      "dropping a request left in flight by an earlier run: too old to answer");
                remove(conn, &entry.list, entry.stored()).await?;
                continue;
            }
            replays.push(entry);
        }
    }
    if !replays.is_empty() {
        info!(queue = %queue, requests = replays.len(), "serving requests left in flight");
        let replay = matches!(recover, Recover::All);
        serve_taken(shared, inflight, None, replays, replay, None);
    }
    Ok(())
}

/// Every in-flight list of `queue` in the broker. `SCAN` walks the whole
/// keyspace, which is fine once per start.
async fn scan_lists(
    conn: &mut MultiplexedConnection,
    queue: &str,
) -> redis::RedisResult<Vec<TakeList>> {
    let pattern = pattern_of(queue);
    let mut cursor = 0u64;
    let mut lists = Vec::new();
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        lists.extend(keys.iter().filter_map(|k| TakeList::parse(queue, k)));
        if next == 0 {
            break;
        }
        cursor = next;
    }
    // SCAN may return a key twice.
    lists.sort_by(|a, b| a.name().cmp(b.name()));
    lists.dedup();
    Ok(lists)
}

/// Removes one element of an in-flight list.
async fn remove(
    conn: &mut MultiplexedConnection,
    list: &str,
    stored: &[u8],
) -> redis::RedisResult<()> {
    redis::cmd("LREM")
        .arg(list)
        .arg(1)
        .arg(stored)
        .query_async(conn)
        .await
}

/// Serves what one take moved: the first request with the room the popper
/// waited for, each other with room of its own (at most the room there was
/// were taken, and only the popper takes room: each finds some). Replays
/// take room when there is some; they were taken within the bound already.
/// Replies of calls answered at once go to `ready`, if given.
fn serve_taken(
    shared: &Arc<Shared>,
    inflight: &Arc<Semaphore>,
    first: Option<OwnedSemaphorePermit>,
    entries: Vec<Entry>,
    replay: bool,
    mut ready: Option<&mut Vec<Outgoing>>,
) {
    let mut first = first;
    for entry in entries {
        let room = first
            .take()
            .or_else(|| Arc::clone(inflight).try_acquire_owned().ok());
        let mut call = Box::pin(handle(Arc::clone(shared), entry, room, replay));
        // A quick call that needs no I/O (`Exists`, `List`) is answered right
        // here, without a task; anything that waits becomes a task of its
        // own. (A task is polled at once when spawned, so what the first
        // poll registered with the no-op waker is registered again.)
        match ((&mut call).now_or_never(), ready.as_deref_mut()) {
            (Some(Some(out)), Some(ready)) => ready.push(out),
            (Some(Some(out)), None) => shared.replier.push(out),
            (Some(None), _) => {}
            (None, _) => {
                let shared = Arc::clone(shared);
                tokio::spawn(async move {
                    if let Some(out) = call.await {
                        shared.replier.push(out);
                    }
                });
            }
        }
    }
}

/// Finds `ID` and `ReplyTo` in a payload that is not a valid request, so
/// that its sender still gets an answer instead of waiting for nothing.
fn salvage_reply_address(payload: &[u8]) -> Option<(String, String)> {
    #[derive(serde::Deserialize)]
    struct Envelope {
        #[serde(rename = "ID", default)]
        id: Option<String>,
        #[serde(rename = "ReplyTo", default)]
        reply_to: Option<String>,
    }
    // Any field that fails to decode is skipped as `IgnoredAny`, so only the
    // two strings must be well-formed.
    let env: Envelope = codec::decode(payload).ok()?;
    let reply_to = env.reply_to.filter(|r| !r.is_empty())?;
    Some((env.id.unwrap_or_default(), reply_to))
}

async fn handle(
    shared: Arc<Shared>,
    entry: Entry,
    room: Option<OwnedSemaphorePermit>,
    replay: bool,
) -> Option<Outgoing> {
    let payload = entry.payload();
    let req: Request = match codec::decode(payload) {
        Ok(r) => r,
        Err(e) => {
            return match salvage_reply_address(payload) {
                Some((id, reply_to)) if !shared.own_key(&reply_to) => {
                    // The error may quote the payload: a prefix of it only.
                    let e = e.to_string();
                    warn!(bytes = payload.len(), error = %Clipped(&e), reply_to = %Clipped(&reply_to),
                          "malformed request; answering with a protocol error");
                    let resp =
                        Response::protocol_error(&id, format!("invalid request: {}", Clipped(&e)));
                    Outgoing::reply(reply_to, &resp, entry, room)
                }
                _ => {
                    warn!(bytes = payload.len(), error = %Clipped(&e.to_string()),
                          "dropping a payload that is not a zbus request (no reply address)");
                    Some(Outgoing::settle(entry, room))
                }
            };
        }
    };
    if req.reply_to.is_empty() || shared.own_key(&req.reply_to) {
        warn!(id = %Clipped(&req.id), method = %Clipped(&req.method), reply_to = %Clipped(&req.reply_to),
              "dropping a request without a reply address of its own");
        return Some(Outgoing::settle(entry, room));
    }
    if replay {
        info!(id = %Clipped(&req.id), method = %Clipped(&req.method), "serving a request an earlier run took");
    }
    let response = serve(&shared, req.object, req.method, req.inputs, &req.id, replay).await;
    Outgoing::reply(req.reply_to, &response, entry, room)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tries of `takes` takes in a row, each getting what the queue
    /// holds then (at most what it tried).
    fn tries_against(waiting: impl Fn(usize) -> usize, takes: usize) -> Vec<usize> {
        let (mut batch, mut singles) = (1, 0);
        (0..takes)
            .map(|i| {
                let tried = batch;
                batch = next_batch(&mut singles, tried, waiting(i).min(tried));
                tried
            })
            .collect()
    }

    #[test]
    fn calls_one_at_a_time_try_a_second_move_once_in_eight_takes() {
        let tries = tries_against(|_| 1, 32);
        assert_eq!(tries.iter().filter(|t| **t > 1).count(), 3, "{tries:?}");
        assert!(tries.iter().all(|t| *t <= 2), "{tries:?}");
    }

    #[test]
    fn a_backlog_is_found_within_eight_takes_and_taken_in_batches() {
        let tries = tries_against(|_| 100, 16);
        let first_batch = tries.iter().position(|t| *t > 1).unwrap();
        assert!(first_batch <= PROBE_EVERY, "{tries:?}");
        assert!(
            tries[first_batch..].windows(2).all(|w| w[1] >= w[0]),
            "{tries:?}"
        );
        assert_eq!(*tries.last().unwrap(), POP_BATCH, "{tries:?}");
    }

    #[test]
    fn takes_follow_a_steady_load_with_one_try_to_spare() {
        let tries = tries_against(|_| 5, 24);
        assert_eq!(&tries[tries.len() - 4..], &[6, 6, 6, 6], "{tries:?}");
    }

    #[test]
    fn when_the_load_ends_takes_go_back_to_one_move() {
        let tries = tries_against(|i| if i < 12 { 30 } else { 1 }, 16);
        assert_eq!(&tries[13..], &[1, 1, 1], "{tries:?}");
    }
}
