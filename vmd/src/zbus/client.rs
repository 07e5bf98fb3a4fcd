//! The zbus v1 client side, as the Go client speaks it: push the request on
//! the object's queue, wait for the reply on a list named after the request.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_bytes::ByteBuf;

use super::broker::{Broker, BrokerError};
use super::codec::{self, DecodeError, EncodeError};
use super::wire::{ObjectId, Output, RequestRef, Response, Status};
use crate::telemetry::{PeerCalls, PeerOutcome};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("broker error: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("no reply from {queue} within {timeout:?} (is the server running?)")]
    Timeout { queue: String, timeout: Duration },
    #[error("cannot encode the request: {0}")]
    Encode(#[from] EncodeError),
    #[error("undecodable reply: {0}")]
    Decode(#[from] DecodeError),
    /// `Response.Error`: the server refused the call itself.
    #[error("protocol error from the server: {0}")]
    Protocol(String),
    /// `Output.Error`: the method ran and failed.
    #[error("{0}")]
    Method(String),
    #[error("reply to a value-returning method carries no data")]
    MissingData,
}

/// A zbus client for one module. Cheap to share; calls may run concurrently.
pub struct Client {
    broker: Broker,
    module: String,
    timeout: Duration,
    // Each call blocks its connection in BLPOP until the reply arrives, so
    // concurrent calls need a connection each; idle ones are kept here.
    idle: Mutex<Vec<MultiplexedConnection>>,
    /// Where calls are counted (vmd's calls to peer modules).
    stats: Option<PeerCalls>,
}

const MAX_IDLE: usize = 64;

/// What BLPOP returns: the list and the element, or nil on timeout.
type Popped = Option<(String, Vec<u8>)>;

impl Client {
    pub fn new(broker: Broker, module: impl Into<String>) -> Self {
        Client {
            broker,
            module: module.into(),
            timeout: Duration::from_secs(30),
            idle: Mutex::new(Vec::new()),
            stats: None,
        }
    }

    /// Counts every call by method and outcome in `stats`.
    pub fn with_stats(mut self, stats: PeerCalls) -> Self {
        self.stats = Some(stats);
        self
    }

    /// Deadline of each call.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// An idle connection (`true`: it came from the pool and may be stale)
    /// or a new one.
    async fn take(&self) -> Result<(MultiplexedConnection, bool), ClientError> {
        let cached = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        match cached {
            Some(c) => Ok((c, true)),
            None => Ok((self.broker.connect().await?, false)),
        }
    }

    fn give_back(&self, conn: MultiplexedConnection) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }

    /// Sends one request and waits for its response.
    pub async fn request(
        &self,
        object: &ObjectId,
        method: &str,
        inputs: Vec<Vec<u8>>,
    ) -> Result<Response, ClientError> {
        let mut uuid = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let id: &str = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut uuid);
        let payload = encode_request(id, object, method, inputs)?;
        let queue = object.queue(&self.module);
        let deadline = tokio::time::Instant::now() + self.timeout;
        let (mut conn, pooled) = self.take().await?;

        // Push and start waiting in one round trip.
        let wait = |left: Duration| left.as_secs_f64().clamp(0.01, 5.0);
        let push_and_wait = |queue: &str| {
            let mut p = redis::pipe();
            p.cmd("RPUSH")
                .arg(queue)
                .arg(&payload)
                .cmd("BLPOP")
                .arg(id)
                .arg(wait(self.timeout));
            p
        };
        let first: redis::RedisResult<(i64, Popped)> =
            push_and_wait(&queue).query_async(&mut conn).await;
        let (_, mut reply) = match first {
            // A pooled connection that Redis closed meanwhile (a restart)
            // fails before the request reaches Redis: safe to send again.
            Err(e) if pooled && is_stale(&e) => {
                conn = self.broker.connect().await?;
                push_and_wait(&queue).query_async(&mut conn).await?
            }
            other => other?,
        };
        while reply.is_none() {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                // The connection is idle again (BLPOP returned), keep it.
                self.give_back(conn);
                return Err(ClientError::Timeout {
                    queue,
                    timeout: self.timeout,
                });
            }
            reply = redis::cmd("BLPOP")
                .arg(id)
                .arg(wait(deadline - now))
                .query_async(&mut conn)
                .await?;
        }
        self.give_back(conn);
        let (_, bytes) = reply.unwrap_or_default();
        Ok(codec::decode(&bytes)?)
    }

    /// Calls a method and returns its [`Output`], turning protocol errors
    /// into [`ClientError::Protocol`].
    pub async fn call(
        &self,
        object: &ObjectId,
        method: &str,
        inputs: Vec<Vec<u8>>,
    ) -> Result<Output, ClientError> {
        let t0 = std::time::Instant::now();
        let resp = self.request(object, method, inputs).await;
        if let Some(stats) = &self.stats {
            if let Some(outcome) = PeerOutcome::of(&resp) {
                stats.record(&self.module, method, outcome, t0.elapsed());
            }
        }
        let resp = resp?;
        match resp.error {
            Some(e) if !e.is_empty() => Err(ClientError::Protocol(e)),
            _ => Ok(resp.output),
        }
    }

    /// Asks the status object of the module.
    pub async fn status(&self) -> Result<Status, ClientError> {
        let out = self.call(&ObjectId::status(), "", Vec::new()).await?;
        value(out)
    }
}

/// A request as the Go client encodes it: `ID` is also its `ReplyTo`.
pub fn encode_request(
    id: &str,
    object: &ObjectId,
    method: &str,
    inputs: Vec<Vec<u8>>,
) -> Result<Vec<u8>, ClientError> {
    let inputs: Vec<ByteBuf> = inputs.into_iter().map(ByteBuf::from).collect();
    Ok(codec::encode(&RequestRef {
        id,
        inputs: &inputs,
        object,
        reply_to: id,
        method,
    })?)
}

fn is_stale(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal()
}

/// Encodes one argument the way the Go client does (each on its own).
pub fn arg<T: Serialize + ?Sized>(v: &T) -> Result<Vec<u8>, ClientError> {
    Ok(codec::encode(v)?)
}

/// The value of a value-returning method; its error if it failed.
pub fn value<T: DeserializeOwned>(out: Output) -> Result<T, ClientError> {
    if let Some(e) = out.error.filter(|e| !e.message.is_empty()) {
        return Err(ClientError::Method(e.message));
    }
    let data = out.data.ok_or(ClientError::MissingData)?;
    Ok(codec::decode(&data)?)
}

/// The outcome of an error-only method.
pub fn unit(out: Output) -> Result<(), ClientError> {
    match out.error.filter(|e| !e.message.is_empty()) {
        Some(e) => Err(ClientError::Method(e.message)),
        None => Ok(()),
    }
}
