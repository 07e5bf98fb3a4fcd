//! The zbus v1 server side.
//!
//! Layout (one process, two tokio runtimes):
//!
//! ```text
//!  front: one thread, current-thread runtime — nothing on it ever blocks
//!  ───────────────────────────────────────────────────────────────────
//!  popper (own connection) ── BLMPOP object queues COUNT free room
//!     │ one task per request; at most `max_changes + READ_ROOM` popped and
//!     │ not yet answered
//!     ▼
//!  Service::dispatch: decoded once into a typed call and what it needs
//!     │ quick  → answered here (a few small files, async I/O)
//!     │ read   → runs on the pool; never waits for a change
//!     │ change → a slot of `max_changes` (none left: refused at once),
//!     │          then its keys (same VM: one after the other), then the pool
//!     ▼
//!  replier (own connection, one task) ── queued replies as one pipeline of
//!     RPUSH + EXPIRE 300 each, retried across reconnects
//!  status popper (own connection) ── BLMPOP vmd.zbus@1.0, answered here
//!
//!  pool: multi-thread runtime — changes (which may wait on guests, fsync,
//!  run processes) and reads that take CPU or disk (Metrics, LogsFull)
//! ```
//!
//! Waiting is not working: a call that waits for its guest (a graceful
//! Delete) holds its VM's key and a change slot, nothing that calls on other
//! VMs or reads need. The change slots bound memory, not concurrency: past
//! them a change is answered with a method error at once rather than queued
//! past its caller's deadline (a Go caller panics when that passes). The
//! whole path of a quick read stays on one thread, as lean as an echo over
//! Redis: no hop between threads, no task of the pool involved.
//!
//! A request is popped only when there is room for it, so a popped request is
//! always answered unless the process dies. Every Redis failure leads to a
//! reconnect with capped exponential back-off, never to a spin.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::FutureExt;
use redis::aio::MultiplexedConnection;
use serde_bytes::ByteBuf;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, error, info, warn};

use super::broker::Broker;
use super::codec::{self, GoTime};
use super::keyed::KeyedLocks;
use super::wire::{ObjectId, Output, Request, Response, Status, WorkerState, WorkerStatus};

/// The future of one call: its output, or a protocol error message.
pub type Call = Pin<Box<dyn Future<Output = Result<Output, String>> + Send>>;

/// What a call needs before it may run, and where it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Reads a few small files and maybe asks a socket (async): answered on
    /// the front, at once. Never waits for a change in flight: every change
    /// replaces what it reads atomically.
    Quick,
    /// Reads, but may take milliseconds of CPU or disk: runs on the pool,
    /// never waits for a change either.
    Read,
    /// Changes what these keys name: calls sharing a key run one at a time,
    /// on the pool.
    Change(Vec<String>),
}

/// A request decoded into a call: what it needs, and the call itself (a
/// future, so nothing runs before its keys are held).
pub struct Dispatch {
    pub access: Access,
    pub call: Call,
}

/// An object served on the bus.
pub trait Service: Send + Sync + 'static {
    /// Decodes a request once. `Err` is a protocol error (unknown method,
    /// malformed arguments), answered without waiting for anything.
    fn dispatch(&self, method: &str, inputs: Vec<ByteBuf>) -> Result<Dispatch, String>;
    /// The answer to a well-formed call that is refused without running
    /// (too many changes in flight): a method error a Go caller can take.
    fn refuse(&self, method: &str, message: String) -> Output;
    /// What the status object shows for a running call.
    fn action(&self, object: &str, method: &str) -> String {
        format!("[{object}].{method}()")
    }
}

/// Popped requests that are not changes always find room: reads are short
/// and never wait for a change, so this many at once is a flood, not a queue.
pub const READ_ROOM: usize = 256;

/// How long a reply stays in Redis for its caller (the Go value).
pub const REPLY_TTL_SECS: u64 = 300;
/// BLPOP timeout. Short, so that shutdown never has to cancel a BLPOP whose
/// element may already be on its way (which would lose that request).
const POP_TIMEOUT_SECS: u64 = 1;
/// Requests taken in one round trip, at most.
const POP_BATCH: usize = 64;
/// How long a reply is retried while Redis is away before it is given up.
const REPLY_RETRY_FOR: Duration = Duration::from_secs(60);

pub struct ServerConfig {
    /// Module name: queues are `<module>.<object>@<version>`.
    pub module: String,
    /// Changes in flight (running or waiting for their keys), at most; one
    /// more is refused at once with a method error. A bound on memory (a
    /// waiting change is a small task), not on how many run at once.
    pub max_changes: usize,
    /// After shutdown is asked, how long calls in flight may still take.
    pub drain_timeout: Duration,
    /// Where changes and heavy reads run; `None`: on the server's runtime.
    pub pool: Option<tokio::runtime::Handle>,
}

impl ServerConfig {
    pub fn new(module: impl Into<String>) -> Self {
        ServerConfig {
            module: module.into(),
            max_changes: 1024,
            drain_timeout: Duration::from_secs(40),
            pool: None,
        }
    }
}

pub struct Server {
    config: ServerConfig,
    broker: Broker,
    services: HashMap<ObjectId, Arc<dyn Service>>,
    registered: Vec<ObjectId>,
    locks: Arc<KeyedLocks>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("no object registered")]
    NoObjects,
    #[error("max_changes must be at least 1")]
    NoChanges,
}

struct Shared {
    module: String,
    services: HashMap<ObjectId, Arc<dyn Service>>,
    /// Objects as the status reply lists them (aliases of one service once).
    status_objects: Vec<ObjectId>,
    changes: Arc<Semaphore>,
    max_changes: usize,
    running: Running,
    locks: Arc<KeyedLocks>,
    replier: Replier,
    pool: tokio::runtime::Handle,
}

/// The calls running now, as the status object shows them.
struct Running {
    calls: Mutex<BTreeMap<u64, RunningEntry>>,
    next: AtomicU64,
    since: GoTime,
}

/// What a call was asked as; the action text is made only when the status
/// is asked for, so a call costs no formatting.
struct RunningEntry {
    start_time: GoTime,
    object: ObjectId,
    method: String,
}

impl Running {
    fn new() -> Self {
        Running {
            calls: Mutex::new(BTreeMap::new()),
            next: AtomicU64::new(0),
            since: GoTime::now(),
        }
    }

    fn enter(&self, object: ObjectId, method: String) -> RunningCall<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let entry = RunningEntry {
            start_time: GoTime::now(),
            object,
            method,
        };
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, entry);
        RunningCall { running: self, id }
    }

    /// One busy worker per running call, oldest first, and a free one while
    /// another change would be taken: what a Go server with as many workers
    /// as needed would show.
    fn snapshot(&self, shared: &Shared, room: bool) -> Vec<WorkerStatus> {
        let mut out: Vec<WorkerStatus> = self
            .calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(|e| WorkerStatus {
                state: WorkerState::Busy,
                start_time: e.start_time,
                action: match shared.services.get(&e.object) {
                    Some(s) => s.action(&e.object.to_string(), &e.method),
                    None => format!("[{}].{}()", e.object, e.method),
                },
            })
            .collect();
        if room {
            out.push(WorkerStatus {
                state: WorkerState::Free,
                start_time: self.since,
                action: String::new(),
            });
        }
        out
    }
}

struct RunningCall<'a> {
    running: &'a Running,
    id: u64,
}

impl Drop for RunningCall<'_> {
    fn drop(&mut self) {
        self.running
            .calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

impl Server {
    pub fn new(broker: Broker, config: ServerConfig) -> Self {
        Server {
            config,
            broker,
            services: HashMap::new(),
            registered: Vec::new(),
            locks: Arc::new(KeyedLocks::default()),
        }
    }

    /// The per-key locks of changes. Whoever holds a key before `run` (start-
    /// up reconciliation of an interrupted Delete) makes the calls changing
    /// that VM wait for it, and only those.
    pub fn locks(&self) -> Arc<KeyedLocks> {
        Arc::clone(&self.locks)
    }

    /// Serves `service` as `object`. The same service may be registered under
    /// several names (vmd's `manager` and `vmd`).
    pub fn register(&mut self, object: ObjectId, service: Arc<dyn Service>) -> &mut Self {
        if self.services.insert(object.clone(), service).is_none() {
            self.registered.push(object);
        }
        self
    }

    /// Serves until `shutdown` turns true, then stops popping, lets the calls
    /// in flight finish (up to the drain timeout) and returns.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<(), ServerError> {
        if self.services.is_empty() {
            return Err(ServerError::NoObjects);
        }
        if self.config.max_changes == 0 {
            return Err(ServerError::NoChanges);
        }
        // The status reply lists each service once, under the name it was
        // first registered with (`manager`, which zbusdebug and callers know).
        let mut status_objects: Vec<ObjectId> = Vec::new();
        let mut seen: Vec<usize> = Vec::new();
        for id in &self.registered {
            let p = Arc::as_ptr(&self.services[id]) as *const () as usize;
            if !seen.contains(&p) {
                seen.push(p);
                status_objects.push(id.clone());
            }
        }
        let shared = Arc::new(Shared {
            module: self.config.module.clone(),
            status_objects,
            changes: Arc::new(Semaphore::new(self.config.max_changes)),
            max_changes: self.config.max_changes,
            running: Running::new(),
            pool: self
                .config
                .pool
                .clone()
                .unwrap_or_else(tokio::runtime::Handle::current),
            locks: self.locks,
            replier: Replier::start(self.broker.clone()),
            services: self.services,
        });

        let mut queues: Vec<String> = shared
            .services
            .keys()
            .map(|o| o.queue(&shared.module))
            .collect();
        queues.sort();
        let status_queue = ObjectId::status().queue(&shared.module);
        info!(queues = ?queues, status = %status_queue, max_changes = self.config.max_changes,
              broker = %self.broker, "zbus server started");

        let max_inflight = self.config.max_changes + READ_ROOM;
        let inflight = Arc::new(Semaphore::new(max_inflight));
        let status_inflight = Arc::new(Semaphore::new(16));
        let main = tokio::spawn(pop_loop(
            self.broker.clone(),
            queues,
            Arc::clone(&shared),
            Arc::clone(&inflight),
            shutdown.clone(),
        ));
        let status = tokio::spawn(pop_loop(
            self.broker.clone(),
            vec![status_queue],
            Arc::clone(&shared),
            Arc::clone(&status_inflight),
            shutdown.clone(),
        ));
        let _ = shutdown.wait_for(|s| *s).await;
        info!("shutting down: no new requests are taken");
        let _ = main.await;
        let _ = status.await;
        let drained = tokio::time::timeout(self.config.drain_timeout, async {
            let _a = inflight.acquire_many(max_inflight as u32).await;
            let _b = status_inflight.acquire_many(16).await;
        })
        .await;
        if drained.is_err() {
            warn!("calls still running after the drain timeout; leaving them");
        }
        Ok(())
    }
}

/// Capped exponential back-off for reconnects.
struct Backoff(Duration);

impl Backoff {
    const MIN: Duration = Duration::from_millis(50);
    const MAX: Duration = Duration::from_secs(2);

    fn new() -> Self {
        Backoff(Self::MIN)
    }
    fn reset(&mut self) {
        self.0 = Self::MIN;
    }
    async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Self::MAX);
    }
}

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

async fn pop_loop(
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
                    warn!(bytes = payload.len(), error = %e, reply_to = %reply_to,
                          "malformed request; answering with a protocol error");
                    let resp = Response::protocol_error(&id, format!("invalid request: {e}"));
                    shared.replier.send(reply_to, &resp, room);
                }
                None => warn!(bytes = payload.len(), error = %e,
                              "dropping a payload that is not a zbus request (no reply address)"),
            }
            return;
        }
    };
    if req.reply_to.is_empty() {
        warn!(id = %req.id, method = %req.method, "dropping a request without ReplyTo");
        return;
    }
    let response = serve(&shared, req.object, req.method, req.inputs, &req.id).await;
    shared.replier.send(req.reply_to, &response, room);
}

async fn serve(
    shared: &Shared,
    object: ObjectId,
    method: String,
    inputs: Vec<ByteBuf>,
    id: &str,
) -> Response {
    if object == ObjectId::status() {
        return status_response(shared, id);
    }
    let Some(service) = shared.services.get(&object) else {
        debug!(object = %object, "request for an unknown object");
        return Response::protocol_error(id, "unknown object");
    };
    let dispatch = match service.dispatch(&method, inputs) {
        Ok(d) => d,
        Err(e) => return Response::protocol_error(id, e),
    };
    let result = match dispatch.access {
        Access::Quick => {
            let _running = shared.running.enter(object, method);
            dispatch.call.await
        }
        Access::Read => on_pool(shared, service.as_ref(), object, method, dispatch.call).await,
        Access::Change(keys) => {
            let Ok(_slot) = Arc::clone(&shared.changes).try_acquire_owned() else {
                warn!(id, method = %method, max = shared.max_changes, "too many changes in flight; refused");
                let msg = format!(
                    "vmd is busy: {} changes are in flight already; try again later",
                    shared.max_changes
                );
                return Response::from_call(id, Ok(service.refuse(&method, msg)));
            };
            let _held = shared.locks.lock_all(keys).await;
            on_pool(shared, service.as_ref(), object, method, dispatch.call).await
        }
    };
    Response::from_call(id, result)
}

/// Runs `call` on the pool, shown as running, and waits for it. A call that
/// cannot finish (the pool is shutting down) gets a Go-safe method error.
async fn on_pool(
    shared: &Shared,
    service: &dyn Service,
    object: ObjectId,
    method: String,
    call: Call,
) -> Result<Output, String> {
    let _running = shared.running.enter(object, method.clone());
    match shared.pool.spawn(call).await {
        Ok(result) => result,
        Err(e) => {
            error!(error = %e, method = %method, "a call on the pool did not finish");
            Ok(service.refuse(&method, "internal error: the call was cancelled".into()))
        }
    }
}

fn status_response(shared: &Shared, id: &str) -> Response {
    let status = Status {
        objects: shared.status_objects.clone(),
        workers: shared
            .running
            .snapshot(shared, shared.changes.available_permits() > 0),
    };
    status_reply(id, &status)
}

/// The reply of the status object, as the Go server encodes it.
pub fn status_reply(id: &str, status: &Status) -> Response {
    let result = codec::encode(status)
        .map(|data| Output {
            data: Some(ByteBuf::from(data)),
            error: None,
        })
        .map_err(|e| format!("cannot encode status: {e}"));
    Response::from_call(id, result)
}

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
struct Replier {
    queue: mpsc::UnboundedSender<Outgoing>,
}

/// Replies written in one pipeline, at most.
const REPLY_BATCH: usize = 256;

impl Replier {
    /// Must be called on the runtime the replies are written from.
    fn start(broker: Broker) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(reply_loop(broker, rx));
        Replier { queue }
    }

    /// Queues `response` for `reply_to`; `room` is held until it is sent.
    fn send(&self, reply_to: String, response: &Response, room: Option<OwnedSemaphorePermit>) {
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
