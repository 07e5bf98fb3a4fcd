//! A double of provisiond as far as the VM module asks it: a zbus server
//! for object `provision@0.0.1` answering `GetWorkloadStatus`,
//! `DecommissionCached` and, playing PR #96, `SetWorkloadError` and
//! `SetWorkloadOk` — byte-equal to the replies recorded from a real Go
//! `zbus.NewRedisServer` (`fixtures/go-vectors`: `resp_prov_*`, checked by
//! `tests/vectors.rs`).
//!
//! Its workloads are a map from id to state that tests change; their bodies
//! follow provisiond's `engine.go` (`shared/spec/zos-node.md` §B): an id
//! that does not parse is an error, an unknown one is `("", false)`, a
//! decommission of an unknown deployment fails with provisiond's text.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde_bytes::ByteBuf;
use vmd::zbus::codec;
use vmd::zbus::wire::{Output, RemoteError, Request, Response};

/// What the double knows: workload id → state (`ok`, `error`, `deleted`…).
#[derive(Debug, Clone, Default)]
pub struct Workloads {
    pub states: BTreeMap<String, String>,
    /// Play PR #96 (`SetWorkloadError`, `SetWorkloadOk`); else zosbase
    /// `main`, which answers them "not a function".
    pub pr96: bool,
}

/// One call as the double received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub method: String,
    pub args: Vec<String>,
}

fn parses(id: &str) -> bool {
    vmd::provision::WorkloadId::of_vm(id).is_some() || id.starts_with("healthcheck-vm")
}

fn data<T: serde::Serialize>(v: &T) -> Option<ByteBuf> {
    codec::encode(v).ok().map(ByteBuf::from)
}

fn error(message: &str) -> Option<RemoteError> {
    Some(RemoteError {
        message: message.into(),
    })
}

/// The Go server's reply to one request (`None`: not for this object), and
/// the call as received. Applies what the call changes.
pub fn answer(w: &mut Workloads, request: &[u8]) -> Option<(Vec<u8>, Received)> {
    let req: Request = codec::decode(request).ok()?;
    if req.object.name != "provision" || req.object.version != "0.0.1" {
        return None;
    }
    let args: Vec<String> = req
        .inputs
        .iter()
        .map(|i| codec::decode(i).unwrap_or_default())
        .collect();
    let received = Received {
        method: req.method.clone(),
        args: args.clone(),
    };
    let id = args.first().cloned().unwrap_or_default();
    let not_found = "deployment not found: deployment does not exist";
    let output = match req.method.as_str() {
        "GetWorkloadStatus" if !parses(&id) => Output {
            data: data(&("", false)),
            error: error("expected integer"),
        },
        "GetWorkloadStatus" => match w.states.get(&id) {
            Some(state) => Output {
                data: data(&(state.as_str(), true)),
                error: None,
            },
            None => Output {
                data: data(&("", false)),
                error: None,
            },
        },
        "DecommissionCached" => match w.states.get_mut(&id) {
            Some(state) => {
                if state != "deleted" && state != "error" {
                    *state = "deleted".into();
                }
                Output::default()
            }
            None => Output {
                data: None,
                error: error(not_found),
            },
        },
        "SetWorkloadError" | "SetWorkloadOk" if w.pr96 => match w.states.get_mut(&id) {
            Some(state) => {
                if state != "deleted" {
                    *state = if req.method == "SetWorkloadOk" {
                        "ok"
                    } else {
                        "error"
                    }
                    .into();
                }
                Output::default()
            }
            None => Output {
                data: None,
                error: error(not_found),
            },
        },
        _ => {
            let reply = codec::encode(&Response::protocol_error(&req.id, "not a function")).ok()?;
            return Some((reply, received));
        }
    };
    let reply = codec::encode(&Response {
        id: req.id,
        output,
        error: None,
    })
    .ok()?;
    Some((reply, received))
}

/// The double, serving on a broker until stopped or dropped.
pub struct ProvisionDouble {
    task: Option<tokio::task::JoinHandle<()>>,
    /// Every call, in order.
    pub calls: Arc<Mutex<Vec<Received>>>,
    pub workloads: Arc<Mutex<Workloads>>,
}

impl ProvisionDouble {
    /// Serves module `module` (Zero-OS: `provision`) on `broker`.
    pub async fn start(
        broker: &vmd::zbus::broker::Broker,
        module: &str,
        workloads: Workloads,
    ) -> Self {
        let mut double = ProvisionDouble {
            task: None,
            calls: Arc::default(),
            workloads: Arc::new(Mutex::new(workloads)),
        };
        double.resume(broker, module).await;
        double
    }

    /// Stops answering, as a dead provisiond: requests wait in its queue.
    pub fn kill(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// Answers again (what waited in the queue first), as provisiond back.
    pub async fn resume(&mut self, broker: &vmd::zbus::broker::Broker, module: &str) {
        self.kill();
        let queue = format!("{module}.provision@0.0.1");
        let calls = Arc::clone(&self.calls);
        let workloads = Arc::clone(&self.workloads);
        let task = crate::go_server::spawn(broker, queue, move |_, bytes| {
            let (reply, received) = answer(&mut workloads.lock().unwrap(), bytes)?;
            calls.lock().unwrap().push(received);
            Some(reply)
        })
        .await;
        self.task = Some(task);
    }

    /// Sets the state of a workload (`None`: it no longer exists).
    pub fn set(&self, id: &str, state: Option<&str>) {
        let mut w = self.workloads.lock().unwrap();
        match state {
            Some(s) => w.states.insert(id.into(), s.into()),
            None => w.states.remove(id),
        };
    }

    pub fn state(&self, id: &str) -> Option<String> {
        self.workloads.lock().unwrap().states.get(id).cloned()
    }

    /// The calls received of `method`, their arguments.
    pub fn calls_of(&self, method: &str) -> Vec<Vec<String>> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.method == method)
            .map(|c| c.args.clone())
            .collect()
    }
}

impl Drop for ProvisionDouble {
    fn drop(&mut self) {
        self.kill();
    }
}
