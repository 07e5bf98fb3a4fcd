//! cloud-hypervisor, the VMM: the command line the shim starts it with
//! ([`args`]) and its REST API ([`api`]). Only the shim runs and talks to
//! its VMM; vmd asks the shim ([`crate::control`]).

pub mod api;
pub mod args;

pub use api::{ApiError, VmInfo, VmState, VmmApi};
