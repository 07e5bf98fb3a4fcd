//! vmd-runtime: everything vmd, vmd-shim and vmd-logstream agree on, in one
//! place. Each process is a binary over this crate; none imports another.
//!
//! * [`layout`] — where every file and socket of a host and of one VM is
//!   ([`HostPaths`], [`RunDir`]); no path is built anywhere else;
//! * [`name`] — VM names and stream ids (they become paths and service names);
//! * [`spec`] — `vm.json`, what the shim runs, with its one validation;
//! * [`state`] — `state.json`, what the shim remembers and reports;
//! * [`console`] — the console log, its rotation and the `.meta` sidecar
//!   (the writer and the one reader of it);
//! * [`progress`] — a stream worker's `.progress` file;
//! * [`output`] — the stream outputs receivers accept;
//! * [`control`] — the shim's control socket, client and server side by side;
//! * [`events`] — a VM's lifecycle events, as shims push them to watchers;
//! * [`attach`] — the shim's console socket: history, live output, input;
//! * [`vmm`] — cloud-hypervisor: its command line and its REST API;
//! * [`files`] — the durable atomic write every state file goes through;
//! * [`clip`] — outsiders' texts shown bounded in logs and replies;
//! * [`process`] — what every vmd binary does at start (runtime, stdout lines).

pub mod attach;
pub mod clip;
pub mod console;
pub mod control;
pub mod events;
pub mod files;
pub mod layout;
pub mod name;
pub mod output;
pub mod process;
pub mod progress;
pub mod spec;
pub mod state;
mod unix;
pub mod vmm;

pub use layout::{HostPaths, RunDir};
pub use name::{NameError, StreamId, StreamIdError, VmName};
