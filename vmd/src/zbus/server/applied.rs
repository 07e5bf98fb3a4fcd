//! The replies of changes that were applied, kept for their replays.
//!
//! A change's effect and its reply's push are two steps: a process dying
//! between them leaves the request in flight, and the next run serves it
//! again. Each change is idempotent on its own (a Run of the same VM is
//! answered as the first, Delete and StreamDelete of what is gone succeed,
//! a Lock is a mark), but two changes of one VM both caught in that window —
//! a Run, then a Delete — replayed in another order would leave the VM
//! created again. So the reply of every change is recorded in Redis while
//! its keys are still held, before the next change of those VMs starts, and
//! a replayed change answers with the recorded reply instead of running.
//!
//! Redis holds the record because Redis holds the in-flight lists: both go
//! together when Redis restarts, and both expire after the replay age.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use tokio::sync::Mutex;
use tracing::{debug, warn};
use vmd_runtime::clip::Clipped;

use super::super::broker::Broker;
use super::super::codec;
use super::super::wire::Response;

/// Longer request ids are not recorded (Go's are 36 characters): a caller
/// cannot make vmd keep arbitrary amounts of memory in Redis.
const MAX_ID: usize = 128;
/// How long a record waits for Redis: a change holds its VM meanwhile.
const TIMEOUT: Duration = Duration::from_secs(2);

pub(super) struct Applied {
    broker: Broker,
    prefix: String,
    keep: Duration,
    conn: Mutex<Option<MultiplexedConnection>>,
}

impl Applied {
    pub(super) fn new(broker: Broker, module: &str, keep: Duration) -> Self {
        Applied {
            broker,
            prefix: format!("{module}:applied:"),
            keep,
            conn: Mutex::new(None),
        }
    }

    fn key(&self, id: &str) -> Option<String> {
        (!id.is_empty() && id.len() <= MAX_ID).then(|| format!("{}{id}", self.prefix))
    }

    async fn conn(&self) -> Option<MultiplexedConnection> {
        let mut held = self.conn.lock().await;
        if held.is_none() {
            match self.broker.connect().await {
                Ok(c) => *held = Some(c),
                Err(e) => {
                    warn!(error = %e, "cannot reach the broker to record a reply");
                    return None;
                }
            }
        }
        held.clone()
    }

    async fn forget_conn(&self) {
        *self.conn.lock().await = None;
    }

    /// Records the reply of an applied change. Best effort: without Redis
    /// the reply cannot go out either, and the change's own idempotence
    /// still answers a replay.
    pub(super) async fn record(&self, response: &Response) {
        let Some(key) = self.key(&response.id) else {
            return;
        };
        let Ok(bytes) = codec::encode(response) else {
            return;
        };
        let Some(mut c) = self.conn().await else {
            return;
        };
        let mut cmd = redis::cmd("SET");
        cmd.arg(&key)
            .arg(bytes)
            .arg("PX")
            .arg(self.keep.as_millis().max(1) as u64);
        let set = cmd.query_async::<()>(&mut c);
        match tokio::time::timeout(TIMEOUT, set).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(id = %Clipped(&response.id), error = %e, "cannot record a reply");
                self.forget_conn().await;
            }
            Err(_) => {
                warn!(id = %Clipped(&response.id), "recording a reply timed out");
                self.forget_conn().await;
            }
        }
    }

    /// The reply recorded for request `id`, if its change was applied.
    /// Unreachable Redis reads as none: the change runs again, idempotent.
    pub(super) async fn recorded(&self, id: &str) -> Option<Response> {
        let key = self.key(id)?;
        let mut c = self.conn().await?;
        let mut cmd = redis::cmd("GET");
        cmd.arg(&key);
        let get = cmd.query_async::<Option<Vec<u8>>>(&mut c);
        let bytes = match tokio::time::timeout(TIMEOUT, get).await {
            Ok(Ok(b)) => b?,
            Ok(Err(e)) => {
                warn!(id = %Clipped(id), error = %e, "cannot read a recorded reply");
                self.forget_conn().await;
                return None;
            }
            Err(_) => {
                self.forget_conn().await;
                return None;
            }
        };
        match codec::decode::<Response>(&bytes) {
            Ok(r) => Some(r),
            Err(e) => {
                debug!(id = %Clipped(id), error = %e, "a recorded reply does not decode");
                None
            }
        }
    }
}
