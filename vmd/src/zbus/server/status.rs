//! The status object (`vmd.zbus@1.0`): the calls running now, shown as a
//! Go server with as many workers as needed would show them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use serde_bytes::ByteBuf;

use super::super::codec::{self, GoTime};
use super::super::wire::{ObjectId, Output, Response, Status, WorkerState, WorkerStatus};
use super::Shared;

/// The calls running now, as the status object shows them.
pub(super) struct Running {
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
    pub(super) fn new() -> Self {
        Running {
            calls: Mutex::new(BTreeMap::new()),
            next: AtomicU64::new(0),
            since: GoTime::now(),
        }
    }

    pub(super) fn enter(&self, object: ObjectId, method: String) -> RunningCall<'_> {
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

pub(super) struct RunningCall<'a> {
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

pub(super) fn status_response(shared: &Shared, id: &str) -> Response {
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
