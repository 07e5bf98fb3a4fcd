//! The VM module: VMs as zinit services running vmd-shim.

pub mod cloudinit;
pub mod cmdline;
pub mod layout;
pub mod manager;
pub mod metrics;
pub mod name;
pub mod reconcile;
pub mod streams;
pub mod validate;

pub use layout::Layout;
pub use manager::Manager;
pub use validate::Settings;
