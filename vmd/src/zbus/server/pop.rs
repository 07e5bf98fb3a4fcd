//! Taking requests: one connection per queue; each take atomically moves a
//! batch of requests to the queue's in-flight list (see [`super::inflight`]),
//! only with room to serve what is taken; each request decoded and served,
//! malformed ones answered when they say where to. A popper's first act is
//! to serve what a previous run left in flight.

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
use super::inflight::{list_of, Entry, Stamp, TAKE};
use super::reply::{load_deliver, Outgoing};
use super::{serve, Backoff, Shared, POP_BATCH, POP_TIMEOUT_SECS};

/// How the popper waits for a request without taking it: the newest way
/// the broker supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// Redis ≥ 6.2: `BLMOVE q q LEFT LEFT` hands back the head and leaves
    /// the queue as it was.
    Blmove,
    /// Older: `BRPOPLPUSH q q` moves the newest request to the head. The
    /// take that follows then serves it first: order within a batch is not
    /// kept, nothing is lost.
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
    Take(Stamp),
}

pub(super) async fn pop_loop(
    broker: Broker,
    queue: String,
    shared: Arc<Shared>,
    inflight: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    let list: Arc<str> = list_of(&queue).into();
    let mut backoff = Backoff::new();
    let mut wait = Wait::Blmove;
    let mut recover = Recover::All;
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
        match recover_left(&mut conn, &list, &recover, &shared, &inflight).await {
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
            let stamp = shared.takes.next();
            let sending = std::mem::take(&mut ready);
            let take = Take {
                wait,
                scripts: &scripts,
                queue: &queue,
                list: &list,
                room,
                stamp: &stamp,
            };
            // Cancelling a take is safe at any instant: the wait takes
            // nothing, what the script took is in the in-flight list for the
            // next run, and the replies sent with it go again, checked.
            let taken = tokio::select! {
                t = take.run(&mut conn, &sending) => t,
                _ = shutdown.changed() => {
                    sending.into_iter().for_each(|o| shared.replier.push(o.checked()));
                    return;
                }
            };
            let stored = match taken {
                // Delivered: their room is free again.
                Ok(stored) => {
                    drop(sending);
                    stored
                }
                Err(e) => {
                    sending
                        .into_iter()
                        .for_each(|o| shared.replier.push(o.checked()));
                    // The script may have run: find what it took.
                    recover = Recover::Take(stamp);
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
            if stored.is_empty() {
                continue;
            }
            backoff.reset();
            let entries = stored
                .into_iter()
                .filter_map(|s| Entry::parse(Arc::clone(&list), s).ok())
                .collect();
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
/// request, then the script that moves up to `room` of them to `list`,
/// stamped. One write and one round trip: Redis runs the script as soon as
/// the wait returns.
struct Take<'a> {
    wait: Wait,
    scripts: &'a Scripts,
    queue: &'a str,
    list: &'a str,
    room: usize,
    stamp: &'a Stamp,
}

impl Take<'_> {
    async fn run(
        &self,
        conn: &mut MultiplexedConnection,
        replies: &[Outgoing],
    ) -> redis::RedisResult<Vec<Vec<u8>>> {
        let mut pipe = redis::pipe();
        for r in replies {
            r.add_to(&mut pipe, &self.scripts.deliver);
        }
        let q = self.queue;
        match self.wait {
            Wait::Blmove => pipe.cmd("BLMOVE").arg(q).arg(q).arg("LEFT").arg("LEFT"),
            Wait::Brpoplpush => pipe.cmd("BRPOPLPUSH").arg(q).arg(q),
        }
        .arg(POP_TIMEOUT_SECS)
        .ignore();
        pipe.cmd("EVALSHA")
            .arg(&self.scripts.take)
            .arg(2)
            .arg(q)
            .arg(self.list)
            .arg(self.room)
            .arg(self.stamp.as_str());
        let (stored,): (Vec<Vec<u8>>,) = pipe.query_async(conn).await?;
        Ok(stored)
    }
}

/// Serves what an earlier run left in `list` (at the first connection), or
/// what a take of this run lost on its way back.
async fn recover_left(
    conn: &mut MultiplexedConnection,
    list: &Arc<str>,
    recover: &Recover,
    shared: &Arc<Shared>,
    inflight: &Arc<Semaphore>,
) -> redis::RedisResult<()> {
    let stored: Vec<Vec<u8>> = redis::cmd("LRANGE")
        .arg(&**list)
        .arg(0)
        .arg(-1)
        .query_async(conn)
        .await?;
    let now = SystemTime::now();
    let mut replays = Vec::new();
    for s in stored {
        let entry = match Entry::parse(Arc::clone(list), s) {
            Ok(e) => e,
            Err(s) => {
                warn!(list = %list, bytes = s.len(), "removing an in-flight element no take wrote");
                remove(conn, list, &s).await?;
                continue;
            }
        };
        match recover {
            Recover::Take(stamp) if !entry.taken_by(stamp) => continue,
            Recover::Take(_) => replays.push(entry),
            Recover::All => {
                let age = entry.age(now);
                if age > shared.replay_max_age {
                    // Its caller gave up long ago: serving it now would apply
                    // a change nobody waits for.
                    warn!(list = %list, age = ?age, max = ?shared.replay_max_age,
                          "dropping a request left in flight by an earlier run: too old to answer");
                    remove(conn, list, entry.stored()).await?;
                    continue;
                }
                replays.push(entry);
            }
        }
    }
    if !replays.is_empty() {
        info!(list = %list, requests = replays.len(), "serving requests left in flight");
        let replay = matches!(recover, Recover::All);
        serve_taken(shared, inflight, None, replays, replay, None);
    }
    Ok(())
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
