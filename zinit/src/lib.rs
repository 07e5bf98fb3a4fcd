//! Everything vmd needs to talk to zinit, the process supervisor of Zero-OS:
//!
//! * [`ServiceName`] — what may be a service name (a file stem, one word);
//! * [`Service`] — the service file model, serialised as YAML;
//! * [`ConfigDir`] — atomic install and removal of service files;
//! * [`Client`] — the control-socket client (v0.2.x line protocol).
//!
//! The unit files that run vmd itself under zinit are in `zinit/etc/`.

pub mod client;
pub mod config_dir;
pub mod name;
pub mod service;
pub mod state;

pub use client::{Client, Status, ZinitError};
pub use config_dir::{ConfigDir, ConfigDirError};
pub use name::{NameError, ServiceName};
pub use service::{Command, Log, Service, ServiceError, SignalName, Signals};
pub use state::{State, Target, WaitStatus};
