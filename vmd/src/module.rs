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
use crate::zbus::client::{self, ClientError};
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

/// What a method answers, and how that goes on the wire both ways: the
/// `Data` of a failure (the Go zero value of the result, or nil for
/// error-only methods), the output of a call, and what the typed client
/// makes of an output.
pub trait Answer: Send + 'static {
    /// What the typed client returns on success.
    type Client;
    /// `Data` when the method fails.
    fn zero() -> Option<ByteBuf>;
    fn into_output(self, method: Method) -> Output;
    fn from_output(out: Output) -> Result<Self::Client, ClientError>;
}

/// Results carried in `Data` (error-only methods return `()`, which is not).
pub trait Valued: Serialize + DeserializeOwned + Default + Send + 'static {}
impl Valued for MachineInfo {}
impl Valued for VmInfo {}
impl Valued for String {}
impl Valued for Vec<String> {}
impl Valued for MachineMetrics {}

impl<T: Valued> Answer for MethodResult<T> {
    type Client = T;
    fn zero() -> Option<ByteBuf> {
        Some(encode_or_nil(&T::default()))
    }
    fn into_output(self, method: Method) -> Output {
        match self {
            Ok(v) => Output {
                data: Some(encode_or_nil(&v)),
                error: None,
            },
            Err(e) => failed(method, e.0),
        }
    }
    fn from_output(out: Output) -> Result<T, ClientError> {
        client::value(out)
    }
}

/// An error-only method: `Data` stays nil, as Go sends it.
impl Answer for MethodResult<()> {
    type Client = ();
    fn zero() -> Option<ByteBuf> {
        None
    }
    fn into_output(self, method: Method) -> Output {
        match self {
            Ok(()) => Output::default(),
            Err(e) => failed(method, e.0),
        }
    }
    fn from_output(out: Output) -> Result<(), ClientError> {
        client::unit(out)
    }
}

/// Go's `Exists` has no error: the answer is always a bool.
impl Answer for bool {
    type Client = bool;
    fn zero() -> Option<ByteBuf> {
        Some(encode_or_nil(&false))
    }
    fn into_output(self, _: Method) -> Output {
        Output {
            data: Some(encode_or_nil(&self)),
            error: None,
        }
    }
    fn from_output(out: Output) -> Result<bool, ClientError> {
        client::value(out)
    }
}

/// An argument of the typed client: borrowed or owned, `&str` for strings.
pub trait IntoArg<T> {
    fn into_arg(self) -> T;
}

impl<T> IntoArg<T> for T {
    fn into_arg(self) -> T {
        self
    }
}

impl<T: Clone> IntoArg<T> for &T {
    fn into_arg(self) -> T {
        self.clone()
    }
}

impl IntoArg<String> for &str {
    fn into_arg(self) -> String {
        self.to_owned()
    }
}

/// Generates everything about the methods from the one table below.
macro_rules! interface {
    (
        $(
            $(#[doc = $doc:literal])*
            $variant:ident => $fn:ident ( $( $arg:ident : $ty:ty as $go:literal ),* ) -> $ret:ty ,
                access $access:block ,
                serve |$m:ident| $serve:block ;
        )*
    ) => {
        /// The methods of the Zero-OS `VMModule`, with their Go signatures.
        pub trait VmModule: Send + Sync + 'static {
            $(
                $(#[doc = $doc])*
                fn $fn(&self, $($arg: $ty),*) -> impl Future<Output = $ret> + Send;
            )*
        }

        /// The methods of the interface, without their arguments.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Method {
            $($variant),*
        }

        impl Method {
            /// In the order of the Go interface.
            pub const ALL: &'static [Method] = &[$(Method::$variant),*];

            /// The wire name (Go's method name, case-sensitive).
            pub const fn name(self) -> &'static str {
                match self {
                    $(Method::$variant => stringify!($variant)),*
                }
            }

            pub fn from_name(name: &str) -> Option<Method> {
                Method::ALL.iter().copied().find(|m| m.name() == name)
            }

            /// `Data` when the method fails: the Go zero value of its
            /// result, or nil for methods that return only an error.
            fn zero_data(self) -> Option<ByteBuf> {
                match self {
                    $(Method::$variant => <$ret as Answer>::zero()),*
                }
            }
        }

        /// One call of the interface, decoded once from a request.
        #[derive(Debug, Clone, PartialEq)]
        // One per request, moved into its future: a box would only move the
        // allocation.
        #[allow(clippy::large_enum_variant)]
        pub enum VmCall {
            $($variant { $($arg: $ty),* }),*
        }

        impl VmCall {
            /// Decodes a request's method and arguments. `Err` is the
            /// protocol error Go's server sends for the same input, to the
            /// byte.
            // The argument counter's last step is never read.
            #[allow(unused_assignments)]
            pub fn decode(method: &str, inputs: &[ByteBuf]) -> Result<VmCall, String> {
                let m = Method::from_name(method).ok_or_else(|| "not a function".to_owned())?;
                match m {
                    $(Method::$variant => {
                        argc(inputs, <[&str]>::len(&[$(stringify!($arg)),*]))?;
                        #[allow(unused_mut, unused_variables)]
                        let mut next = 0usize;
                        Ok(VmCall::$variant {
                            $($arg: {
                                let v: $ty = arg(inputs, next, $go)?;
                                next += 1;
                                v
                            }),*
                        })
                    })*
                }
            }

            /// The request's arguments, encoded as Go's stub encodes them:
            /// the inverse of [`VmCall::decode`] (the typed client sends
            /// these).
            pub fn inputs(&self) -> Result<Vec<Vec<u8>>, codec::EncodeError> {
                match self {
                    $(VmCall::$variant { $($arg),* } => Ok(vec![$(codec::encode($arg)?),*])),*
                }
            }

            pub fn method(&self) -> Method {
                match self {
                    $(VmCall::$variant { .. } => Method::$variant),*
                }
            }

            /// What the call needs before it runs, and where it runs (see
            /// the table).
            pub fn access(&self) -> Access {
                match self {
                    $(
                        #[allow(unused_variables)]
                        VmCall::$variant { $($arg),* } => $access
                    ),*
                }
            }

            /// The call on `m`, to be run. Whatever happens, the output is
            /// one a Go stub takes: method failures and panics are
            /// `Output.Error` beside the zero value of the result.
            ///
            /// Each method's future is boxed on its own: one future over
            /// the whole match would be as large as the largest method's
            /// (`Run`'s), and every quick `Exists` would allocate and copy
            /// that much (about 11 000 instructions of `memcpy` a call,
            /// callgrind; BENCHMARKS.md).
            pub fn call<M: VmModule>(self, m: Arc<M>) -> Call {
                match self {
                    $(VmCall::$variant { $($arg),* } => Box::pin(async move {
                        Ok(answer(Method::$variant, m.$fn($($arg),*)).await)
                    }),)*
                }
            }
        }

        /// The VM module serves the interface: the handlers of the table.
        impl VmModule for crate::vm::Manager {
            $(
                async fn $fn(&self, $($arg: $ty),*) -> $ret {
                    let $m = self;
                    $serve
                }
            )*
        }

        /// The typed client: one method per method of the interface.
        impl crate::stub::VmdStub {
            $(
                $(#[doc = $doc])*
                pub async fn $fn(
                    &self,
                    $($arg: impl IntoArg<$ty>),*
                ) -> Result<<$ret as Answer>::Client, ClientError> {
                    let call = VmCall::$variant { $($arg: $arg.into_arg()),* };
                    <$ret as Answer>::from_output(self.send(&call).await?)
                }
            )*
        }
    };
}

// The interface: each method once, in the order of the Go interface — its
// arguments (with the Go type a decode error names), its result (which
// fixes its zero value and the client's return), what it needs before it
// runs, and its handler. Reads see the state on disk, which every change
// replaces atomically, and never wait behind a change (the caller's
// deadline is short): the cheap ones are answered on the front (`Quick`),
// Metrics (a walk over every VM) and LogsFull (up to 16 MiB) on the pool
// (`Read`). Changes are serialised per VM; a stream also has an id of its
// own: StreamCreate holds both, so it cannot interleave with a Delete of
// the VM (which removes the VM's streams) nor with a StreamDelete of the id.
interface! {
    /// Starts a VM; answers once its guest booted.
    Run => run(vm: Vm as "pkg.VM") -> MethodResult<MachineInfo>,
        access { Access::Change(vec![vm.name.clone()]) },
        serve |m| { Ok(m.run(vm).await?) };
    /// Details of a VM.
    Inspect => inspect(name: String as "string") -> MethodResult<VmInfo>,
        access { Access::Quick },
        serve |m| { Ok(m.inspect(&name).await?) };
    /// Stops a VM gracefully and removes it.
    Delete => delete(name: String as "string") -> MethodResult<()>,
        access { Access::Change(vec![name.clone()]) },
        serve |m| { Ok(m.delete(&name).await?) };
    /// Whether a VM exists.
    Exists => exists(name: String as "string") -> bool,
        access { Access::Quick },
        serve |m| { m.exists(&name) };
    /// The last 2 KiB of a VM's console.
    Logs => logs(name: String as "string") -> MethodResult<String>,
        access { Access::Quick },
        serve |m| { Ok(m.logs(&name, false)) };
    /// A VM's console, up to 16 MiB.
    LogsFull => logs_full(name: String as "string") -> MethodResult<String>,
        access { Access::Read },
        serve |m| { Ok(m.logs(&name, true)) };
    /// The names of the VMs.
    List => list() -> MethodResult<Vec<String>>,
        access { Access::Quick },
        serve |m| { Ok(m.list()) };
    /// Network counters of every VM.
    Metrics => metrics() -> MethodResult<MachineMetrics>,
        access { Access::Read },
        serve |m| { Ok(m.metrics().await) };
    /// Pauses (`true`) or resumes a VM.
    Lock => lock(name: String as "string", lock: bool as "bool") -> MethodResult<()>,
        access { Access::Change(vec![name.clone()]) },
        serve |m| { Ok(m.lock(&name, lock).await?) };
    /// Ships a VM's console to a receiver.
    StreamCreate => stream_create(name: String as "string", stream: Stream as "pkg.Stream") -> MethodResult<()>,
        access { Access::Change(vec![name.clone(), stream_key(&stream.id)]) },
        serve |m| { Ok(m.stream_create(&name, &stream).await?) };
    /// Stops a log stream.
    StreamDelete => stream_delete(id: String as "string") -> MethodResult<()>,
        access { Access::Change(vec![stream_key(id)]) },
        serve |m| { Ok(m.stream_delete(&id).await?) };
    /// vmd's own, not in the Go interface: `Metrics` and what each VM's
    /// VMM uses (CPU time, memory, disk I/O), for `vmd ctl metrics` and
    /// `top`. Kept out of `Metrics`, whose Go callers cannot see it.
    Usage => usage() -> MethodResult<MachineMetrics>,
        access { Access::Read },
        serve |m| { Ok(m.usage().await) };
}

/// The wire names of the methods, in the order of the Go interface.
pub const METHODS: [&str; Method::ALL.len()] = {
    let mut out = [""; Method::ALL.len()];
    let mut i = 0;
    while i < out.len() {
        out[i] = Method::ALL[i].name();
        i += 1;
    }
    out
};

/// The key a stream id is serialised under (VM names cannot contain ':').
fn stream_key(id: &str) -> String {
    format!("stream:{id}")
}

/// Runs a method: whatever it does — fails, panics — the output is one a
/// Go stub takes.
async fn answer<A: Answer, F: Future<Output = A>>(method: Method, fut: F) -> Output {
    match AssertUnwindSafe(fut).catch_unwind().await {
        Ok(a) => a.into_output(method),
        Err(_) => failed(
            method,
            format!("internal error: {} panicked", method.name()),
        ),
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

impl<M: VmModule> Service for ModuleService<M> {
    fn dispatch(&self, method: &str, inputs: Vec<ByteBuf>) -> Result<Dispatch, String> {
        let call = VmCall::decode(method, &inputs)?;
        Ok(Dispatch {
            access: call.access(),
            call: call.call(Arc::clone(&self.0)),
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
