//! vmd-shim: the process of one VM under zinit.
//!
//! * [`spec`] — the runtime description vmd writes (`vm.json`);
//! * [`args`] — cloud-hypervisor's command line for a spec (pure);
//! * [`console`] — the console log with rotation and its offset sidecar;
//! * [`state`] — the shim's persisted state and the restart policy;
//! * [`api`] — a small client of the VMM's REST API;
//! * [`hygiene`] — how the VMM is spawned (privileges, process group, death signal);
//! * [`control`] — the shim's control socket protocol (for vmd).

pub mod api;
pub mod args;
pub mod console;
pub mod control;
pub mod hygiene;
pub mod spec;
pub mod state;
