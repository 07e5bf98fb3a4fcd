//! The `VMModule` interface and its dispatch table: from a zbus request to a
//! call of a [`VmModule`] method and back to an [`Output`].
//!
//! The rules that keep Go callers alive are enforced here, once, for every
//! method (see `shared/spec/zbus-wire.md`): a method failure is always an
//! `Output.Error`, a value-returning method always carries a decodable
//! `Data` (its zero value on failure), `Exists` is always a bool, and a panic
//! in a method is a method error, not a protocol error.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_bytes::ByteBuf;

use crate::api::{MachineInfo, MachineMetrics, Stream, Vm, VmInfo};
use crate::zbus::codec;
use crate::zbus::server::{Access, Call, Dispatch, Service};
use crate::zbus::wire::{Output, RemoteError};

/// The error a method returns; its text is what the caller sees. The VM
/// module's own errors (`vm::VmError`) become one at this edge only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodError(pub String);

impl std::fmt::Display for MethodError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for MethodError {}

impl MethodError {
    pub fn new(msg: impl Into<String>) -> Self {
        MethodError(msg.into())
    }
}

pub type MethodResult<T> = Result<T, MethodError>;

/// The methods of the Zero-OS `VMModule`, with their Go signatures.
pub trait VmModule: Send + Sync + 'static {
    fn run(&self, vm: Vm) -> impl Future<Output = MethodResult<MachineInfo>> + Send;
    fn inspect(&self, name: String) -> impl Future<Output = MethodResult<VmInfo>> + Send;
    fn delete(&self, name: String) -> impl Future<Output = MethodResult<()>> + Send;
    /// Go's signature has no error: the answer is always a bool.
    fn exists(&self, name: String) -> impl Future<Output = bool> + Send;
    fn logs(&self, name: String) -> impl Future<Output = MethodResult<String>> + Send;
    fn logs_full(&self, name: String) -> impl Future<Output = MethodResult<String>> + Send;
    fn list(&self) -> impl Future<Output = MethodResult<Vec<String>>> + Send;
    fn metrics(&self) -> impl Future<Output = MethodResult<MachineMetrics>> + Send;
    fn lock(&self, name: String, lock: bool) -> impl Future<Output = MethodResult<()>> + Send;
    fn stream_create(
        &self,
        name: String,
        stream: Stream,
    ) -> impl Future<Output = MethodResult<()>> + Send;
    fn stream_delete(&self, id: String) -> impl Future<Output = MethodResult<()>> + Send;
}

/// The methods of the interface, without their arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    Run,
    Inspect,
    Delete,
    Exists,
    Logs,
    LogsFull,
    List,
    Metrics,
    Lock,
    StreamCreate,
    StreamDelete,
}

impl Method {
    /// In the order of the Go interface.
    pub const ALL: [Method; 11] = [
        Method::Run,
        Method::Inspect,
        Method::Delete,
        Method::Exists,
        Method::Logs,
        Method::LogsFull,
        Method::List,
        Method::Metrics,
        Method::Lock,
        Method::StreamCreate,
        Method::StreamDelete,
    ];

    /// The wire name (Go's method name, case-sensitive).
    pub const fn name(self) -> &'static str {
        match self {
            Method::Run => "Run",
            Method::Inspect => "Inspect",
            Method::Delete => "Delete",
            Method::Exists => "Exists",
            Method::Logs => "Logs",
            Method::LogsFull => "LogsFull",
            Method::List => "List",
            Method::Metrics => "Metrics",
            Method::Lock => "Lock",
            Method::StreamCreate => "StreamCreate",
            Method::StreamDelete => "StreamDelete",
        }
    }

    pub fn from_name(name: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.name() == name)
    }

    /// `Data` when the method fails: the Go zero value of its result, or nil
    /// for methods that return only an error.
    fn zero_data(self) -> Option<ByteBuf> {
        match self {
            Method::Run => Some(encode_or_nil(&MachineInfo::default())),
            Method::Inspect => Some(encode_or_nil(&VmInfo::default())),
            Method::Exists => Some(encode_or_nil(&false)),
            Method::Logs | Method::LogsFull => Some(encode_or_nil(&String::new())),
            Method::List => Some(encode_or_nil(&Vec::<String>::new())),
            Method::Metrics => Some(encode_or_nil(&MachineMetrics::default())),
            Method::Delete | Method::Lock | Method::StreamCreate | Method::StreamDelete => None,
        }
    }
}

/// The wire names of the methods, in the order of the Go interface.
pub const METHODS: [&str; 11] = {
    let mut out = [""; 11];
    let mut i = 0;
    while i < out.len() {
        out[i] = Method::ALL[i].name();
        i += 1;
    }
    out
};

/// One call of the interface, decoded once from a request.
#[derive(Debug, Clone, PartialEq)]
pub enum VmCall {
    Run(Box<Vm>),
    Inspect(String),
    Delete(String),
    Exists(String),
    Logs(String),
    LogsFull(String),
    List,
    Metrics,
    Lock(String, bool),
    StreamCreate(String, Stream),
    StreamDelete(String),
}

/// The key a stream id is serialised under (VM names cannot contain ':').
fn stream_key(id: &str) -> String {
    format!("stream:{id}")
}

impl VmCall {
    /// Decodes a request's method and arguments. `Err` is the protocol error
    /// Go's server sends for the same input, to the byte.
    pub fn decode(method: &str, inputs: &[ByteBuf]) -> Result<VmCall, String> {
        let m = Method::from_name(method).ok_or_else(|| "not a function".to_owned())?;
        let i = inputs;
        let s = |n| arg::<String>(i, n, "string");
        Ok(match m {
            Method::Run => {
                argc(i, 1)?;
                VmCall::Run(Box::new(arg(i, 0, "pkg.VM")?))
            }
            Method::Inspect => {
                argc(i, 1)?;
                VmCall::Inspect(s(0)?)
            }
            Method::Delete => {
                argc(i, 1)?;
                VmCall::Delete(s(0)?)
            }
            Method::Exists => {
                argc(i, 1)?;
                VmCall::Exists(s(0)?)
            }
            Method::Logs => {
                argc(i, 1)?;
                VmCall::Logs(s(0)?)
            }
            Method::LogsFull => {
                argc(i, 1)?;
                VmCall::LogsFull(s(0)?)
            }
            Method::List => {
                argc(i, 0)?;
                VmCall::List
            }
            Method::Metrics => {
                argc(i, 0)?;
                VmCall::Metrics
            }
            Method::Lock => {
                argc(i, 2)?;
                VmCall::Lock(s(0)?, arg(i, 1, "bool")?)
            }
            Method::StreamCreate => {
                argc(i, 2)?;
                VmCall::StreamCreate(s(0)?, arg(i, 1, "pkg.Stream")?)
            }
            Method::StreamDelete => {
                argc(i, 1)?;
                VmCall::StreamDelete(s(0)?)
            }
        })
    }

    /// The request's arguments, encoded as Go's stub encodes them: the
    /// inverse of [`VmCall::decode`] (the typed client sends these).
    pub fn inputs(&self) -> Result<Vec<Vec<u8>>, codec::EncodeError> {
        use codec::encode as e;
        Ok(match self {
            VmCall::Run(vm) => vec![e(vm.as_ref())?],
            VmCall::Inspect(s)
            | VmCall::Delete(s)
            | VmCall::Exists(s)
            | VmCall::Logs(s)
            | VmCall::LogsFull(s)
            | VmCall::StreamDelete(s) => vec![e(s)?],
            VmCall::List | VmCall::Metrics => Vec::new(),
            VmCall::Lock(name, lock) => vec![e(name)?, e(lock)?],
            VmCall::StreamCreate(name, stream) => vec![e(name)?, e(stream)?],
        })
    }

    pub fn method(&self) -> Method {
        match self {
            VmCall::Run(_) => Method::Run,
            VmCall::Inspect(_) => Method::Inspect,
            VmCall::Delete(_) => Method::Delete,
            VmCall::Exists(_) => Method::Exists,
            VmCall::Logs(_) => Method::Logs,
            VmCall::LogsFull(_) => Method::LogsFull,
            VmCall::List => Method::List,
            VmCall::Metrics => Method::Metrics,
            VmCall::Lock(..) => Method::Lock,
            VmCall::StreamCreate(..) => Method::StreamCreate,
            VmCall::StreamDelete(_) => Method::StreamDelete,
        }
    }

    /// What the call needs before it runs, and where it runs. Reads see the
    /// state on disk, which every change replaces atomically, and must never
    /// wait behind a long change (the caller's deadline is short): the cheap
    /// ones are answered on the front, Metrics (a walk over every VM) and
    /// LogsFull (up to 16 MiB) on the pool. Changes are serialised per VM; a
    /// stream also has an id of its own: StreamCreate holds both, so it
    /// cannot interleave with a Delete of the VM (which removes the VM's
    /// streams) nor with a StreamDelete of the id.
    pub fn access(&self) -> Access {
        match self {
            VmCall::Inspect(_) | VmCall::Exists(_) | VmCall::Logs(_) | VmCall::List => {
                Access::Quick
            }
            VmCall::LogsFull(_) | VmCall::Metrics => Access::Read,
            VmCall::Run(vm) => Access::Change(vec![vm.name.clone()]),
            VmCall::Delete(name) | VmCall::Lock(name, _) => Access::Change(vec![name.clone()]),
            VmCall::StreamCreate(name, stream) => {
                Access::Change(vec![name.clone(), stream_key(&stream.id)])
            }
            VmCall::StreamDelete(id) => Access::Change(vec![stream_key(id)]),
        }
    }

    /// Runs the call on `m`. Whatever happens, the output is one a Go stub
    /// takes: method failures and panics are `Output.Error` beside the zero
    /// value of the result.
    pub async fn call<M: VmModule>(self, m: &M) -> Output {
        let method = self.method();
        match self {
            VmCall::Run(vm) => valued(method, m.run(*vm)).await,
            VmCall::Inspect(name) => valued(method, m.inspect(name)).await,
            VmCall::Delete(name) => unit(method, m.delete(name)).await,
            VmCall::Exists(name) => valued(method, m.exists(name).map(Ok)).await,
            VmCall::Logs(name) => valued(method, m.logs(name)).await,
            VmCall::LogsFull(name) => valued(method, m.logs_full(name)).await,
            VmCall::List => valued(method, m.list()).await,
            VmCall::Metrics => valued(method, m.metrics()).await,
            VmCall::Lock(name, lock) => unit(method, m.lock(name, lock)).await,
            VmCall::StreamCreate(name, stream) => unit(method, m.stream_create(name, stream)).await,
            VmCall::StreamDelete(id) => unit(method, m.stream_delete(id)).await,
        }
    }
}

/// Serves a [`VmModule`] as a zbus object.
pub struct ModuleService<M>(pub Arc<M>);

impl<M: VmModule> ModuleService<M> {
    /// Decodes and runs one call at once, without the server's ordering:
    /// the dispatch path of the server, for tests and tools.
    pub fn call(&self, method: String, inputs: Vec<ByteBuf>) -> Call {
        match self.dispatch(&method, inputs) {
            Ok(d) => d.call,
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }
}

/// A malformed call: wrong argument count or an argument of the wrong type.
/// These are the only protocol errors vmd sends for a known method.
fn argc(inputs: &[ByteBuf], want: usize) -> Result<(), String> {
    if inputs.len() != want {
        return Err(format!(
            "invalid number of arguments expecting {want} got {}",
            inputs.len()
        ));
    }
    Ok(())
}

fn arg<T: DeserializeOwned>(inputs: &[ByteBuf], i: usize, go_type: &str) -> Result<T, String> {
    codec::decode(&inputs[i]).map_err(|e| {
        // The text is Go's, to the byte; the detail only helps the operator.
        tracing::debug!(arg = i, error = %e, "undecodable argument");
        format!("invalid argument type [{i}] expecting {go_type} got")
    })
}

fn encode_or_nil<T: Serialize>(v: &T) -> ByteBuf {
    // Encoding our own types cannot fail short of a bug; nil still decodes
    // into every Go type, so the caller gets a zero value instead of a panic.
    ByteBuf::from(codec::encode(v).unwrap_or_else(|_| vec![0xc0]))
}

fn failed(method: Method, message: String) -> Output {
    Output {
        data: method.zero_data(),
        error: Some(RemoteError { message }),
    }
}

/// Runs a value-returning method: `Data` is set whatever happens.
async fn valued<T, F>(method: Method, fut: F) -> Output
where
    T: Serialize,
    F: Future<Output = MethodResult<T>>,
{
    match AssertUnwindSafe(fut).catch_unwind().await {
        Ok(Ok(v)) => Output {
            data: Some(encode_or_nil(&v)),
            error: None,
        },
        Ok(Err(e)) => failed(method, e.0),
        Err(_) => failed(
            method,
            format!("internal error: {} panicked", method.name()),
        ),
    }
}

/// Runs an error-only method: `Data` stays nil, as Go sends it.
async fn unit<F: Future<Output = MethodResult<()>>>(method: Method, fut: F) -> Output {
    match AssertUnwindSafe(fut).catch_unwind().await {
        Ok(Ok(())) => Output::default(),
        Ok(Err(e)) => failed(method, e.0),
        Err(_) => failed(
            method,
            format!("internal error: {} panicked", method.name()),
        ),
    }
}

impl<M: VmModule> Service for ModuleService<M> {
    fn dispatch(&self, method: &str, inputs: Vec<ByteBuf>) -> Result<Dispatch, String> {
        let call = VmCall::decode(method, &inputs)?;
        let m = Arc::clone(&self.0);
        Ok(Dispatch {
            access: call.access(),
            call: Box::pin(async move { Ok(call.call(&*m).await) }),
        })
    }

    fn refuse(&self, method: &str, message: String) -> Output {
        match Method::from_name(method) {
            Some(m) => failed(m, message),
            // Only known methods get this far; nil decodes into anything.
            None => Output {
                data: Some(ByteBuf::from(vec![0xc0])),
                error: Some(RemoteError { message }),
            },
        }
    }

    fn action(&self, object: &str, method: &str) -> String {
        format!("[{object}].{method}()")
    }
}
