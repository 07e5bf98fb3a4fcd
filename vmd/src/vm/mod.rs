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
//! The interface (`crate::module::VmModule`) is implemented here: it is
//! the zbus edge, where a [`VmError`] becomes a method error.

pub mod cloudinit;
pub mod cmdline;
pub mod delete;
pub mod error;
pub mod host;
pub mod inspect;
pub mod lock;
pub mod manager;
pub mod metrics;
pub mod plan;
pub mod reconcile;
pub mod run;
pub mod streams;

pub use error::VmError;
pub use host::Host;
pub use manager::Manager;
pub use plan::Settings;

use crate::api::{MachineInfo, MachineMetrics, Stream, Vm, VmInfo};
use crate::module::{MethodError, MethodResult, VmModule};

impl From<VmError> for MethodError {
    fn from(e: VmError) -> Self {
        MethodError::new(e.to_string())
    }
}

impl VmModule for Manager {
    async fn run(&self, vm: Vm) -> MethodResult<MachineInfo> {
        Ok(Manager::run(self, vm).await?)
    }

    async fn inspect(&self, name: String) -> MethodResult<VmInfo> {
        Ok(Manager::inspect(self, &name).await?)
    }

    async fn delete(&self, name: String) -> MethodResult<()> {
        Ok(Manager::delete(self, &name).await?)
    }

    async fn exists(&self, name: String) -> bool {
        Manager::exists(self, &name)
    }

    async fn logs(&self, name: String) -> MethodResult<String> {
        Ok(Manager::logs(self, &name, false))
    }

    async fn logs_full(&self, name: String) -> MethodResult<String> {
        Ok(Manager::logs(self, &name, true))
    }

    async fn list(&self) -> MethodResult<Vec<String>> {
        Ok(Manager::list(self))
    }

    async fn metrics(&self) -> MethodResult<MachineMetrics> {
        Ok(Manager::metrics(self).await)
    }

    async fn lock(&self, name: String, lock: bool) -> MethodResult<()> {
        Ok(Manager::lock(self, &name, lock).await?)
    }

    async fn stream_create(&self, name: String, stream: Stream) -> MethodResult<()> {
        Ok(Manager::stream_create(self, &name, &stream).await?)
    }

    async fn stream_delete(&self, id: String) -> MethodResult<()> {
        Ok(Manager::stream_delete(self, &id).await?)
    }
}
