//! The zbus v1 server side.
//!
//! Layout (one process, tokio):
//!
//! ```text
//!  popper (own connection) ── BLPOP object queues, then LPOP up to free capacity
//!     │ one task per request, at most `max_inflight` popped and not yet answered
//!     ▼
//!  per-VM lock (mutating calls) → worker permit (`workers`) → Service::call
//!     │
//!     ▼
//!  replier (shared connection) ── RPUSH reply + EXPIRE 300, retried across reconnects
//!
//!  status popper (own connection) ── BLPOP vmd.zbus@1.0, answered without a worker
//! ```
//!
//! A request is popped only when there is room for it, so a popped request is
//! always answered unless the process dies. Every Redis failure leads to a
//! reconnect with capped exponential back-off, never to a spin.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use serde_bytes::ByteBuf;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, error, info, warn};

use super::broker::Broker;
use super::codec::{self, GoTime};
use super::keyed::KeyedLocks;
use super::wire::{ObjectId, Output, Request, Response, Status, WorkerState, WorkerStatus};

/// The future of one call: its output, or a protocol error message.
pub type Call = Pin<Box<dyn Future<Output = Result<Output, String>> + Send>>;

/// An object served on the bus.
pub trait Service: Send + Sync + 'static {
    /// Calls sharing a key run one after the other; no keys: runs freely.
    fn serial_keys(&self, method: &str, inputs: &[ByteBuf]) -> Vec<String>;
    /// Runs `method`. `Err` is a protocol error (unknown method, malformed
    /// arguments); method failures belong in the returned [`Output`].
    fn call(&self, method: String, inputs: Vec<ByteBuf>) -> Call;
    /// What the status object shows for a busy worker.
    fn action(&self, object: &str, method: &str) -> String {
        format!("[{object}].{method}()")
    }
}

/// How long a reply stays in Redis for its caller (the Go value).
pub const REPLY_TTL_SECS: u64 = 300;
/// BLPOP timeout. Short, so that shutdown never has to cancel a BLPOP whose
/// element may already be on its way (which would lose that request).
const POP_TIMEOUT_SECS: u64 = 1;
/// How long a reply is retried while Redis is away before it is given up.
const REPLY_RETRY_FOR: Duration = Duration::from_secs(60);

pub struct ServerConfig {
    /// Module name: queues are `<module>.<object>@<version>`.
    pub module: String,
    /// Calls run at once (the Go server runs one).
    pub workers: usize,
    /// Requests popped but not yet answered, at most.
    pub max_inflight: usize,
    /// After shutdown is asked, how long calls in flight may still take.
    pub drain_timeout: Duration,
}

impl ServerConfig {
    pub fn new(module: impl Into<String>) -> Self {
        ServerConfig {
            module: module.into(),
            workers: 8,
            max_inflight: 256,
            drain_timeout: Duration::from_secs(40),
        }
    }
}

pub struct Server {
    config: ServerConfig,
    broker: Broker,
    services: HashMap<ObjectId, Arc<dyn Service>>,
    registered: Vec<ObjectId>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("no object registered")]
    NoObjects,
    #[error("workers must be at least 1")]
    NoWorkers,
}

struct Shared {
    module: String,
    services: HashMap<ObjectId, Arc<dyn Service>>,
    /// Objects as the status reply lists them (aliases of one service once).
    status_objects: Vec<ObjectId>,
    workers: Semaphore,
    slots: Mutex<Vec<WorkerStatus>>,
    locks: KeyedLocks,
    replier: Replier,
}

impl Server {
    pub fn new(broker: Broker, config: ServerConfig) -> Self {
        Server {
            config,
            broker,
            services: HashMap::new(),
            registered: Vec::new(),
        }
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
        if self.config.workers == 0 {
            return Err(ServerError::NoWorkers);
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
        let now = GoTime::now();
        let shared = Arc::new(Shared {
            module: self.config.module.clone(),
            status_objects,
            workers: Semaphore::new(self.config.workers),
            slots: Mutex::new(vec![
                WorkerStatus {
                    state: WorkerState::Free,
                    start_time: now,
                    action: String::new(),
                };
                self.config.workers
            ]),
            locks: KeyedLocks::default(),
            replier: Replier::new(self.broker.clone()),
            services: self.services,
        });

        let mut queues: Vec<String> = shared
            .services
            .keys()
            .map(|o| o.queue(&shared.module))
            .collect();
        queues.sort();
        let status_queue = ObjectId::status().queue(&shared.module);
        info!(queues = ?queues, status = %status_queue, workers = self.config.workers,
              broker = %self.broker, "zbus server started");

        let inflight = Arc::new(Semaphore::new(self.config.max_inflight));
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
            let _a = inflight.acquire_many(self.config.max_inflight as u32).await;
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

async fn pop_loop(
    broker: Broker,
    queues: Vec<String>,
    shared: Arc<Shared>,
    inflight: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new();
    // Redis < 6.2 has no LPOP count; then we only pop one at a time.
    let mut batching = true;
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
            let popped: redis::RedisResult<Option<(String, Vec<u8>)>> = redis::cmd("BLPOP")
                .arg(&queues)
                .arg(POP_TIMEOUT_SECS)
                .query_async(&mut conn)
                .await;
            let (queue, payload) = match popped {
                Ok(Some(popped)) => popped,
                Ok(None) => continue,
                Err(e) => {
                    warn!(error = %e, "lost the broker while waiting for requests");
                    backoff.wait().await;
                    continue 'connect;
                }
            };
            backoff.reset();
            spawn_request(&shared, payload, Some(permit));

            // Under load more requests wait behind this one: take as many as
            // there is room for in one round trip, from the same queue.
            let room = inflight.available_permits();
            if !batching || room == 0 {
                continue;
            }
            let more: redis::RedisResult<Option<Vec<Vec<u8>>>> = redis::cmd("LPOP")
                .arg(&queue)
                .arg(room)
                .query_async(&mut conn)
                .await;
            match more {
                Ok(more) => {
                    for payload in more.into_iter().flatten() {
                        let permit = Arc::clone(&inflight).try_acquire_owned().ok();
                        spawn_request(&shared, payload, permit);
                    }
                }
                Err(e) if e.kind() == redis::ErrorKind::ResponseError => {
                    info!(error = %e, "broker has no LPOP count; popping one at a time");
                    batching = false;
                }
                Err(e) => {
                    warn!(error = %e, "lost the broker while taking requests");
                    continue 'connect;
                }
            }
        }
    }
}

fn spawn_request(shared: &Arc<Shared>, payload: Vec<u8>, permit: Option<OwnedSemaphorePermit>) {
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        handle(&shared, payload).await;
        drop(permit);
    });
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

async fn handle(shared: &Shared, payload: Vec<u8>) {
    let req: Request = match codec::decode(&payload) {
        Ok(r) => r,
        Err(e) => {
            match salvage_reply_address(&payload) {
                Some((id, reply_to)) => {
                    warn!(bytes = payload.len(), error = %e, reply_to = %reply_to,
                          "malformed request; answering with a protocol error");
                    let resp = Response::protocol_error(&id, format!("invalid request: {e}"));
                    shared.replier.send(&reply_to, &resp).await;
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
    let response = serve(shared, req.object, req.method, req.inputs, &req.id).await;
    shared.replier.send(&req.reply_to, &response).await;
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
    // Taken in sorted order by every call, so two calls sharing keys cannot
    // each hold one the other waits for.
    let mut keys = service.serial_keys(&method, &inputs);
    keys.sort();
    keys.dedup();
    let mut _held = Vec::with_capacity(keys.len());
    for k in keys {
        _held.push(shared.locks.lock(k).await);
    }
    let Ok(_worker) = shared.workers.acquire().await else {
        return Response::protocol_error(id, "server is shutting down");
    };
    let slot = claim_slot(shared, service.action(&object.to_string(), &method));
    debug!(id, object = %object, method = %method, "call");
    let result = service.call(method, inputs).await;
    release_slot(shared, slot);
    Response::from_call(id, result)
}

fn claim_slot(shared: &Shared, action: String) -> Option<usize> {
    let mut slots = shared.slots.lock().unwrap_or_else(PoisonError::into_inner);
    let i = slots.iter().position(|s| s.state == WorkerState::Free)?;
    slots[i] = WorkerStatus {
        state: WorkerState::Busy,
        start_time: GoTime::now(),
        action,
    };
    Some(i)
}

fn release_slot(shared: &Shared, slot: Option<usize>) {
    if let Some(i) = slot {
        let mut slots = shared.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots[i] = WorkerStatus {
            state: WorkerState::Free,
            start_time: GoTime::now(),
            action: String::new(),
        };
    }
}

fn status_response(shared: &Shared, id: &str) -> Response {
    let status = Status {
        objects: shared.status_objects.clone(),
        workers: shared
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone(),
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

/// Sends replies on one shared connection, reconnecting when it breaks.
struct Replier {
    broker: Broker,
    conn: tokio::sync::Mutex<Option<(u64, MultiplexedConnection)>>,
}

impl Replier {
    fn new(broker: Broker) -> Self {
        Replier {
            broker,
            conn: tokio::sync::Mutex::new(None),
        }
    }

    async fn connection(&self) -> Option<(u64, MultiplexedConnection)> {
        let mut guard = self.conn.lock().await;
        if guard.is_none() {
            match self.broker.connect().await {
                Ok(c) => *guard = Some((rand_generation(), c)),
                Err(e) => {
                    warn!(error = %e, "cannot reach the broker to reply");
                    return None;
                }
            }
        }
        guard.clone()
    }

    async fn invalidate(&self, generation: u64) {
        let mut guard = self.conn.lock().await;
        if guard.as_ref().is_some_and(|(g, _)| *g == generation) {
            *guard = None;
        }
    }

    async fn send(&self, reply_to: &str, response: &Response) {
        let payload = match codec::encode(response) {
            Ok(p) => p,
            Err(e) => {
                error!(error = %e, "cannot encode a reply");
                return;
            }
        };
        let deadline = tokio::time::Instant::now() + REPLY_RETRY_FOR;
        let mut backoff = Backoff::new();
        loop {
            if let Some((generation, mut conn)) = self.connection().await {
                // One write, no MULTI/EXEC: Redis runs both or, if it dies in
                // between, loses the reply with everything else.
                let sent: redis::RedisResult<()> = redis::pipe()
                    .cmd("RPUSH")
                    .arg(reply_to)
                    .arg(&payload)
                    .ignore()
                    .cmd("EXPIRE")
                    .arg(reply_to)
                    .arg(REPLY_TTL_SECS)
                    .ignore()
                    .query_async(&mut conn)
                    .await;
                match sent {
                    Ok(()) => return,
                    Err(e) => {
                        warn!(error = %e, reply_to, "reply failed, reconnecting");
                        self.invalidate(generation).await;
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                error!(
                    reply_to,
                    "giving up a reply: broker unreachable for {REPLY_RETRY_FOR:?}"
                );
                return;
            }
            backoff.wait().await;
        }
    }
}

fn rand_generation() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
