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
use crate::zbus::server::{Call, Service};
use crate::zbus::wire::{Output, RemoteError};

/// The error a method returns; its text is what the caller sees.
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

    pub fn not_implemented(method: &str) -> Self {
        MethodError(format!("{method} is not implemented yet in this vmd"))
    }
}

impl From<anyhow::Error> for MethodError {
    fn from(e: anyhow::Error) -> Self {
        // `{:#}` keeps the context chain on one line: "a: b: c".
        MethodError(format!("{e:#}"))
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

/// The wire names of the methods, in the order of the Go interface.
pub const METHODS: [&str; 11] = [
    "Run",
    "Inspect",
    "Delete",
    "Exists",
    "Logs",
    "LogsFull",
    "List",
    "Metrics",
    "Lock",
    "StreamCreate",
    "StreamDelete",
];

/// Serves a [`VmModule`] as a zbus object.
pub struct ModuleService<M>(pub Arc<M>);

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

fn method_error(msg: String) -> Option<RemoteError> {
    Some(RemoteError { message: msg })
}

/// Runs a value-returning method: `Data` is set whatever happens.
async fn valued<T, F>(method: &str, fut: F) -> Output
where
    T: Serialize + Default,
    F: Future<Output = MethodResult<T>>,
{
    match AssertUnwindSafe(fut).catch_unwind().await {
        Ok(Ok(v)) => Output {
            data: Some(encode_or_nil(&v)),
            error: None,
        },
        Ok(Err(e)) => Output {
            data: Some(encode_or_nil(&T::default())),
            error: method_error(e.0),
        },
        Err(_) => Output {
            data: Some(encode_or_nil(&T::default())),
            error: method_error(format!("internal error: {method} panicked")),
        },
    }
}

/// Runs an error-only method: `Data` stays nil, as Go sends it.
async fn unit<F: Future<Output = MethodResult<()>>>(method: &str, fut: F) -> Output {
    match AssertUnwindSafe(fut).catch_unwind().await {
        Ok(Ok(())) => Output::default(),
        Ok(Err(e)) => Output {
            data: None,
            error: method_error(e.0),
        },
        Err(_) => Output {
            data: None,
            error: method_error(format!("internal error: {method} panicked")),
        },
    }
}

impl<M: VmModule> Service for ModuleService<M> {
    fn serial_keys(&self, method: &str, inputs: &[ByteBuf]) -> Vec<String> {
        // Only calls that change a VM are serialised per VM; reads see the
        // state on disk, which every change replaces atomically, and must
        // not wait behind a long Delete (the caller's deadline is short).
        // A stream belongs to a VM and has an id of its own: StreamCreate
        // holds both, so it cannot interleave with a Delete of the VM (which
        // removes the VM's streams) nor with a StreamDelete of the id.
        let first = |i: &[ByteBuf]| -> Option<String> { codec::decode(i.first()?).ok() };
        match method {
            "Run" => inputs
                .first()
                .and_then(|b| codec::decode::<Vm>(b).ok())
                .map(|vm| vec![vm.name])
                .unwrap_or_default(),
            "Delete" | "Lock" => first(inputs).into_iter().collect(),
            "StreamCreate" => {
                let mut keys: Vec<String> = first(inputs).into_iter().collect();
                if let Some(s) = inputs.get(1).and_then(|b| codec::decode::<Stream>(b).ok()) {
                    keys.push(format!("stream:{}", s.id));
                }
                keys
            }
            "StreamDelete" => first(inputs)
                .map(|id| vec![format!("stream:{id}")])
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    fn call(&self, method: String, inputs: Vec<ByteBuf>) -> Call {
        let m = Arc::clone(&self.0);
        Box::pin(async move {
            let i = &inputs[..];
            let out = match method.as_str() {
                "Run" => {
                    argc(i, 1)?;
                    let vm: Vm = arg(i, 0, "pkg.VM")?;
                    valued("Run", m.run(vm)).await
                }
                "Inspect" => {
                    argc(i, 1)?;
                    valued("Inspect", m.inspect(arg(i, 0, "string")?)).await
                }
                "Delete" => {
                    argc(i, 1)?;
                    unit("Delete", m.delete(arg(i, 0, "string")?)).await
                }
                "Exists" => {
                    argc(i, 1)?;
                    let name: String = arg(i, 0, "string")?;
                    valued("Exists", m.exists(name).map(Ok)).await
                }
                "Logs" => {
                    argc(i, 1)?;
                    valued("Logs", m.logs(arg(i, 0, "string")?)).await
                }
                "LogsFull" => {
                    argc(i, 1)?;
                    valued("LogsFull", m.logs_full(arg(i, 0, "string")?)).await
                }
                "List" => {
                    argc(i, 0)?;
                    valued("List", m.list()).await
                }
                "Metrics" => {
                    argc(i, 0)?;
                    valued("Metrics", m.metrics()).await
                }
                "Lock" => {
                    argc(i, 2)?;
                    let name: String = arg(i, 0, "string")?;
                    let lock: bool = arg(i, 1, "bool")?;
                    unit("Lock", m.lock(name, lock)).await
                }
                "StreamCreate" => {
                    argc(i, 2)?;
                    let name: String = arg(i, 0, "string")?;
                    let stream: Stream = arg(i, 1, "pkg.Stream")?;
                    unit("StreamCreate", m.stream_create(name, stream)).await
                }
                "StreamDelete" => {
                    argc(i, 1)?;
                    unit("StreamDelete", m.stream_delete(arg(i, 0, "string")?)).await
                }
                _ => return Err("not a function".to_owned()),
            };
            Ok(out)
        })
    }

    fn action(&self, object: &str, method: &str) -> String {
        format!("[{object}].{method}()")
    }
}
