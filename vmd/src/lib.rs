//! vmd: the virtual-machine daemon of a Zero-OS style host.
//!
//! * [`zbus`] — the RPC transport (Redis lists + Go-flavoured msgpack).
//! * [`api`] — the wire types of the `VMModule` interface.
//! * [`events`] — lifecycle events: pushed by the shims, published on the bus.
//! * [`openmetrics`] — the Prometheus endpoint: the VMs and vmd itself.
//! * [`module`] — the interface as a Rust trait and its dispatch table.
//! * [`stub`] — a typed client, used by the operator CLI and the tests.
//! * [`telemetry`] — what vmd counts of its calls to peers and its reconciliations.
//! * [`vm`] — the VM module itself: VMs as zinit services running vmd-shim.

pub mod api;
pub mod events;
pub mod module;
pub mod network;
pub mod openmetrics;
pub mod provision;
pub mod stub;
pub mod telemetry;
pub mod vm;
pub mod zbus;
