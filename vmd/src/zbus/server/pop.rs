//! Taking requests: one connection per set of queues, `BLMPOP … COUNT`
//! (or what an older Redis has), only with room to serve what is taken;
//! each request decoded and served, malformed ones answered when they say
//! where to.

use std::sync::Arc;

use futures_util::FutureExt;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tracing::{info, warn};
use vmd_runtime::clip::Clipped;

use super::super::broker::Broker;
use super::super::codec;
use super::super::wire::{Request, Response};
use super::{serve, Backoff, Shared, POP_BATCH, POP_TIMEOUT_SECS};

/// How the popper takes requests: the newest way the broker supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PopMode {
    /// Redis ≥ 7.0: `BLMPOP … COUNT n` waits and takes a batch in one round
    /// trip.
    Blmpop,
    /// Redis 6.2: `BLPOP`, then `LPOP queue n` for whatever queued behind it.
    BlpopLpop,
    /// Older: one at a time.
    Blpop,
}

/// The broker does not know a command, or not in this form: an older Redis
/// ("unknown command 'BLMPOP'"; before 6.2, LPOP with a count is "wrong
/// number of arguments").
fn unknown_command(e: &redis::RedisError) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    e.kind() == redis::ErrorKind::ResponseError
        && (text.contains("unknown command") || text.contains("wrong number of arguments"))
}

pub(super) async fn pop_loop(
    broker: Broker,
    queues: Vec<String>,
    shared: Arc<Shared>,
    inflight: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new();
    let mut mode = PopMode::Blmpop;
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
        loop {
            if *shutdown.borrow() {
                return;
            }
            // Wait for room first: what is popped must be served.
            let permit = tokio::select! {
                p = Arc::clone(&inflight).acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
                _ = shutdown.changed() => continue,
            };
            // Under load more requests wait behind the first: take as many
            // as there is room for, a bounded batch at a time (what is taken
            // is held in memory until its reply is out).
            let room = (inflight.available_permits() + 1).min(POP_BATCH);
            let popped: redis::RedisResult<Option<(String, Vec<Vec<u8>>)>> = match mode {
                PopMode::Blmpop => {
                    redis::cmd("BLMPOP")
                        .arg(POP_TIMEOUT_SECS)
                        .arg(queues.len())
                        .arg(&queues)
                        .arg("LEFT")
                        .arg("COUNT")
                        .arg(room)
                        .query_async(&mut conn)
                        .await
                }
                PopMode::BlpopLpop | PopMode::Blpop => {
                    let one: redis::RedisResult<Option<(String, Vec<u8>)>> = redis::cmd("BLPOP")
                        .arg(&queues)
                        .arg(POP_TIMEOUT_SECS)
                        .query_async(&mut conn)
                        .await;
                    one.map(|o| o.map(|(q, p)| (q, vec![p])))
                }
            };
            let (queue, mut payloads) = match popped {
                Ok(Some(popped)) => popped,
                Ok(None) => continue,
                Err(e) if mode == PopMode::Blmpop && unknown_command(&e) => {
                    info!(error = %e, "broker has no BLMPOP (Redis < 7.0); using BLPOP");
                    mode = PopMode::BlpopLpop;
                    continue;
                }
                Err(e) => {
                    warn!(error = %e, "lost the broker while waiting for requests");
                    backoff.wait().await;
                    continue 'connect;
                }
            };
            backoff.reset();
            if mode == PopMode::BlpopLpop && room > 1 {
                let more: redis::RedisResult<Option<Vec<Vec<u8>>>> = redis::cmd("LPOP")
                    .arg(&queue)
                    .arg(room - 1)
                    .query_async(&mut conn)
                    .await;
                match more {
                    Ok(more) => payloads.extend(more.into_iter().flatten()),
                    Err(e) if unknown_command(&e) => {
                        info!(error = %e, "broker has no LPOP count (Redis < 6.2); popping one at a time");
                        mode = PopMode::Blpop;
                    }
                    Err(e) => {
                        // What was popped is still served; the rest waits.
                        serve_popped(&shared, &inflight, permit, payloads);
                        warn!(error = %e, "lost the broker while taking requests");
                        continue 'connect;
                    }
                }
            }
            serve_popped(&shared, &inflight, permit, payloads);
            // Quick calls were answered inline: let the replier send them
            // before taking more.
            tokio::task::yield_now().await;
        }
    }
}

/// Serves what one pop took: the first request with the room the popper
/// waited for, each other with room of its own (at most the room there was
/// were popped, and only the popper takes room: each finds some).
fn serve_popped(
    shared: &Arc<Shared>,
    inflight: &Arc<Semaphore>,
    first: OwnedSemaphorePermit,
    payloads: Vec<Vec<u8>>,
) {
    let mut first = Some(first);
    for payload in payloads {
        let room = first
            .take()
            .or_else(|| Arc::clone(inflight).try_acquire_owned().ok());
        spawn_request(shared, payload, room);
    }
}

/// Serves one popped request. A quick call that needs no I/O (`Exists`,
/// `List`) is answered right here, without a task; anything that waits
/// becomes a task of its own. (A task is polled at once when spawned, so
/// what the first poll registered with the no-op waker is registered again.)
fn spawn_request(shared: &Arc<Shared>, payload: Vec<u8>, permit: Option<OwnedSemaphorePermit>) {
    let mut call = Box::pin(handle(Arc::clone(shared), payload, permit));
    if (&mut call).now_or_never().is_none() {
        tokio::spawn(call);
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

async fn handle(shared: Arc<Shared>, payload: Vec<u8>, room: Option<OwnedSemaphorePermit>) {
    let req: Request = match codec::decode(&payload) {
        Ok(r) => r,
        Err(e) => {
            match salvage_reply_address(&payload) {
                Some((id, reply_to)) => {
                    // The error may quote the payload: a prefix of it only.
                    let e = e.to_string();
                    warn!(bytes = payload.len(), error = %Clipped(&e), reply_to = %Clipped(&reply_to),
                          "malformed request; answering with a protocol error");
                    let resp =
                        Response::protocol_error(&id, format!("invalid request: {}", Clipped(&e)));
                    shared.replier.send(reply_to, &resp, room);
                }
                None => warn!(bytes = payload.len(), error = %Clipped(&e.to_string()),
                              "dropping a payload that is not a zbus request (no reply address)"),
            }
            return;
        }
    };
    if req.reply_to.is_empty() {
        warn!(id = %Clipped(&req.id), method = %Clipped(&req.method), "dropping a request without ReplyTo");
        return;
    }
    let response = serve(&shared, req.object, req.method, req.inputs, &req.id).await;
    shared.replier.send(req.reply_to, &response, room);
}
