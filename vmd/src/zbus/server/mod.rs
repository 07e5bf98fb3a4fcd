//! The zbus v1 server side.
//!
//! Layout (one process, two tokio runtimes):
//!
//! ```text
//!  front: one thread, current-thread runtime — nothing on it ever blocks
//!  ───────────────────────────────────────────────────────────────────
//!  poppers (one per queue, own connection) ── BLMOVE + LMOVEs: up to
//!     │ `room` requests moved to an in-flight list of the take's own (`inflight`)
//!     │ one task per request; at most `max_changes + READ_ROOM` taken and
//!     │ not yet answered
//!     ▼
//!  Service::dispatch: decoded once into a typed call and what it needs
//!     │ quick  → answered here (a few small files, async I/O); the reply
//!     │          goes out in the same write as the popper's next take
//!     │ read   → runs on the pool; never waits for a change
//!     │ change → a slot of `max_changes` (none left: refused at once),
//!     │          then its keys (same VM: one after the other), then the pool;
//!     │          its reply recorded (`applied`) before the keys are let go
//!     ▼
//!  replier (own connection, one task) ── other replies, pipelined: per
//!     reply the push (RPUSH + EXPIRE 300) and the removal of the request's
//!     in-flight entry, in one write (`reply`); retried across reconnects
//!     by a script, then only while the request is still in flight
//!  status popper (own connection) ── vmd.zbus@1.0 the same way, answered here
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
//! A request is taken only when there is room for it, so a taken request is
//! always answered — by this process, or, if it dies first, by the next one,
//! which starts by serving what is left in the in-flight lists (at most
//! `replay_max_age` old). Every Redis failure leads to a reconnect with
//! capped exponential back-off, never to a spin.
//!
//! Here: the contract with a served object ([`Service`]), the server and
//! the routing of a call by its [`Access`]; [`pop`] takes requests,
//! [`inflight`] is what taken requests look like in Redis, [`reply`] sends
//! answers, [`applied`] keeps the replies of changes for their replays,
//! [`status`] is the status object.

mod applied;
mod inflight;
mod pop;
mod reply;
mod stats;
mod status;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_bytes::ByteBuf;
use tokio::sync::{watch, Semaphore};
use tracing::{debug, error, info, warn};
use vmd_runtime::clip::Clipped;

use super::broker::Broker;
use super::keyed::KeyedLocks;
use super::wire::{ObjectId, Output, Response};
use applied::Applied;
use inflight::Takes;
use pop::pop_loop;
use reply::Replier;
pub use stats::{CallStats, Outcome};
pub use status::status_reply;
use status::{status_response, Running};

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
/// How long one wait for a request lasts before it is sent again. Waiting
/// takes nothing, so it may be cancelled at any time; this only bounds how
/// long a dead connection goes unnoticed.
const POP_TIMEOUT_SECS: u64 = 5;
/// Requests taken in one round trip, at most.
const POP_BATCH: usize = 64;
/// How long a reply is retried while Redis is away before it is given up.
const REPLY_RETRY_FOR: Duration = Duration::from_secs(60);

/// A command with room for `args` arguments of `bytes` bytes in all, numbers
/// included: `redis::cmd` grows its buffers argument by argument, a few
/// reallocations per command on the path of every call.
fn command(name: &'static str, args: usize, bytes: usize) -> redis::Cmd {
    let mut c = redis::Cmd::with_capacity(args + 1, name.len() + bytes);
    c.arg(name);
    c
}

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
    /// Requests an earlier run left in flight are served if younger than
    /// this; older ones are dropped (their callers gave up).
    pub replay_max_age: Duration,
    /// Where the calls answered are counted (the OpenMetrics endpoint).
    pub stats: CallStats,
}

impl ServerConfig {
    pub fn new(module: impl Into<String>) -> Self {
        ServerConfig {
            module: module.into(),
            max_changes: 1024,
            drain_timeout: Duration::from_secs(40),
            pool: None,
            replay_max_age: Duration::from_secs(REPLY_TTL_SECS),
            stats: CallStats::default(),
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
    takes: Takes,
    replay_max_age: Duration,
    applied: Applied,
    stats: CallStats,
}

impl Shared {
    /// Whether `key` is in vmd's own part of the broker (its queues,
    /// in-flight lists, records): never a caller's reply list.
    fn own_key(&self, key: &str) -> bool {
        key.strip_prefix(self.module.as_str())
            .is_some_and(|rest| rest.starts_with('.') || rest.starts_with(':'))
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
            takes: Takes::new(),
            replay_max_age: self.config.replay_max_age,
            stats: self.config.stats.clone(),
            applied: Applied::new(
                self.broker.clone(),
                &self.config.module,
                self.config.replay_max_age,
            ),
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
        let poppers: Vec<_> = queues
            .into_iter()
            .map(|queue| {
                tokio::spawn(pop_loop(
                    self.broker.clone(),
                    queue,
                    Arc::clone(&shared),
                    Arc::clone(&inflight),
                    shutdown.clone(),
                ))
            })
            .collect();
        let status = tokio::spawn(pop_loop(
            self.broker.clone(),
            status_queue,
            Arc::clone(&shared),
            Arc::clone(&status_inflight),
            shutdown.clone(),
        ));
        let _ = shutdown.wait_for(|s| *s).await;
        info!("shutting down: no new requests are taken");
        for p in poppers {
            let _ = p.await;
        }
        let _ = status.await;
        let drained = tokio::time::timeout(self.config.drain_timeout, async {
            let _a = inflight.acquire_many(max_inflight as u32).await;
            let _b = status_inflight.acquire_many(16).await;
        })
        .await;
        if drained.is_err() {
            warn!("calls still running after the drain timeout; leaving them in flight for the next run");
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

async fn serve(
    shared: &Shared,
    object: ObjectId,
    method: String,
    inputs: Vec<ByteBuf>,
    id: &str,
    replay: bool,
) -> Response {
    if object == ObjectId::status() {
        return status_response(shared, id);
    }
    let t0 = Instant::now();
    let Some(service) = shared.services.get(&object) else {
        debug!(object = %Clipped(&object.to_string()), "request for an unknown object");
        shared
            .stats
            .record(None, Outcome::ProtocolError, t0.elapsed().as_secs_f64());
        return Response::protocol_error(id, "unknown object");
    };
    let dispatch = match service.dispatch(&method, inputs) {
        Ok(d) => d,
        Err(e) => {
            shared
                .stats
                .record(None, Outcome::ProtocolError, t0.elapsed().as_secs_f64());
            // It may quote the caller's arguments: a prefix of them only.
            return Response::protocol_error(id, Clipped(&e).to_string());
        }
    };
    let (response, refused) = answer(
        shared,
        service.as_ref(),
        object,
        &method,
        dispatch,
        id,
        replay,
    )
    .await;
    let outcome = if refused {
        Outcome::Refused
    } else {
        Outcome::of(&response)
    };
    shared
        .stats
        .record(Some(&method), outcome, t0.elapsed().as_secs_f64());
    response
}

/// A well-formed call's response, and whether it was refused unrun.
async fn answer(
    shared: &Shared,
    service: &dyn Service,
    object: ObjectId,
    method: &str,
    dispatch: Dispatch,
    id: &str,
    replay: bool,
) -> (Response, bool) {
    let method = method.to_owned();
    let result = match dispatch.access {
        Access::Quick => {
            let _running = shared.running.enter(object, method);
            dispatch.call.await
        }
        Access::Read => on_pool(shared, service, object, method, dispatch.call).await,
        // Boxed: its locks and records make its future large, and every
        // quick call's future would otherwise be as large.
        Access::Change(keys) => {
            let call = dispatch.call;
            return Box::pin(async move {
                let Ok(_slot) = Arc::clone(&shared.changes).try_acquire_owned() else {
                    warn!(id = %Clipped(id), method = %method, max = shared.max_changes, "too many changes in flight; refused");
                    let msg = format!(
                        "vmd is busy: {} changes are in flight already; try again later",
                        shared.max_changes
                    );
                    return (
                        Response::from_call(id, Ok(service.refuse(&method, msg))),
                        true,
                    );
                };
                let _counted = shared.stats.change_started();
                let _held = shared.locks.lock_all(keys).await;
                // An earlier run may have applied it and died before its reply
                // went out: that reply, not a second application.
                if replay {
                    if let Some(recorded) = shared.applied.recorded(id).await {
                        info!(id = %Clipped(id), method = %method, "answering a replay with the reply it had");
                        return (recorded, false);
                    }
                }
                let result = on_pool(shared, service, object, method, call).await;
                let response = Response::from_call(id, result);
                // Before the keys are let go: the next change of these VMs
                // starts after this one is on record.
                shared.applied.record(&response).await;
                (response, false)
            })
            .await;
        }
    };
    (Response::from_call(id, result), false)
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
