//! cloud-hypervisor, the VMM: which release a binary is ([`version`]), the
//! command line the shim starts it with for that release ([`args`]), the
//! disk formats it is told ([`image`]) and its REST API ([`api`]). Only the
//! shim runs and talks to its VMM; vmd asks the shim ([`crate::control`]).

pub mod api;
pub mod args;
pub mod image;
pub mod version;

pub use api::{ApiError, VmInfo, VmState, VmmApi};
pub use image::ImageFormat;
pub use version::{Release, Version, VersionCache, VersionError};
