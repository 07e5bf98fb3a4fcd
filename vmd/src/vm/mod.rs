//! The VM module: VMs as zinit services running vmd-shim.
//!
//! * [`manager`] — the module's handles (host, zinit) and what every
//!   operation shares; the crash-safety rules of its files;
//! * one file per operation: [`run`], [`delete`], [`lock`], [`inspect`]
//!   (all the reads), [`metrics`], [`streams`], [`reconcile`] (start-up);
//! * [`plan`] — from a `Vm` to what Run writes, after pure checks
//!   ([`cmdline`], [`cloudinit`] build parts of it);
//! * [`error`] — [`VmError`], whose text is what Go callers see;
//! * [`host`] — the flags that place vmd on a host.
//!
//! The interface (`crate::module::VmModule`) is served by [`Manager`]: the
//! handler of each method is named in the interface's table in
//! `crate::module`, where a [`VmError`] becomes a method error.

pub mod cloudinit;
pub mod cmdline;
pub mod delete;
pub mod error;
pub mod goconfig;
pub mod host;
pub mod inspect;
pub mod lock;
pub mod manager;
pub mod metrics;
pub mod plan;
pub mod reconcile;
pub mod run;
pub mod streams;
pub mod takeover;
pub mod workloads;

pub use error::VmError;
pub use host::Host;
pub use manager::Manager;
pub use plan::Settings;

use crate::module::MethodError;

impl From<VmError> for MethodError {
    fn from(e: VmError) -> Self {
        MethodError::new(e.to_string())
    }
}
