//! What can go wrong in the VM module. The `Display` of [`VmError`] is the
//! text a Go caller receives (`Output.Error`), to the byte where Zero-OS has
//! one; it becomes a method error only at the zbus edge (`vm/mod.rs`).

use std::io;

use zinit::ZinitError;

/// Why a VM description or a stream is refused: a pure check failed. The
/// text says which value and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

impl From<String> for Invalid {
    fn from(s: String) -> Self {
        Invalid(s)
    }
}

impl From<vmd_runtime::NameError> for Invalid {
    fn from(e: vmd_runtime::NameError) -> Self {
        Invalid(e.to_string())
    }
}

impl From<vmd_runtime::StreamIdError> for Invalid {
    fn from(e: vmd_runtime::StreamIdError) -> Self {
        Invalid(e.to_string())
    }
}

impl From<&str> for Invalid {
    fn from(s: &str) -> Self {
        Invalid(s.to_owned())
    }
}

/// A refused check, as a `Result`.
pub fn invalid<T>(why: String) -> Result<T, Invalid> {
    Err(Invalid(why))
}

/// Why a VM that Run started did not come up: what the caller reads after
/// `failed to start vm NAME: `.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotUp {
    /// Its VMM exited before the guest booted (the exit status, as the shim
    /// judged it).
    #[error("the VM stopped right after its start: {0}")]
    Stopped(String),
    /// The shim gave up on it, or it cannot start at all (the shim's reason).
    #[error("{0}")]
    Failed(String),
    /// zinit cannot keep the shim itself running.
    #[error("the shim could not start ({state}): {last_line}")]
    ShimFailed { state: String, last_line: String },
    #[error("the VMM did not answer within {0:?}")]
    Timeout(std::time::Duration),
    #[error("vmd stopped following the VM")]
    Lost,
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("machine '{0}' does not exist")]
    NotFound(String),
    #[error("machine configuration validation failed: {0}")]
    InvalidVm(Invalid),
    #[error("a vm with same name already exists")]
    AlreadyExists,
    #[error("invalid vm name: {0}")]
    InvalidName(vmd_runtime::NameError),
    #[error("failed to start vm {name}: {reason}{}", console_suffix(.console))]
    StartFailed {
        name: String,
        reason: NotUp,
        /// The end of the console log, shown to the caller.
        console: String,
    },
    /// The node's cloud-hypervisor cannot run VMs (missing, not one, or a
    /// release outside the supported range): said at Run, not by a guest.
    #[error("{0}")]
    Hypervisor(#[from] vmd_runtime::vmm::VersionError),
    /// The network module could not place the web console (Zero-OS wording).
    #[error("could not get console config for vm {name}: {reason}")]
    ConsoleConfig { name: String, reason: String },
    #[error("cannot start service {service}: {source}")]
    ServiceStart {
        service: String,
        #[source]
        source: ZinitError,
    },
    #[error(
        "cannot remove service {service}: {source}; the VM is gone for callers and \
         its removal completes on the next Delete or when vmd restarts"
    )]
    ServiceRemove {
        service: String,
        #[source]
        source: ZinitError,
    },
    #[error("cannot record the lock of vm {name}: {source}")]
    LockRecord {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("vm {name} is not running ({why}); the {} applies when it starts again", if *.lock { "lock" } else { "unlock" })]
    LockDeferred {
        name: String,
        lock: bool,
        why: String,
    },
    #[error("cannot {} vm {name}: {why}", if *.lock { "pause" } else { "resume" })]
    LockFailed {
        name: String,
        lock: bool,
        why: String,
    },
    /// A stream refused by a check (id, output, namespace).
    #[error("{0}")]
    InvalidStream(Invalid),
    #[error("stream with id '{0}' already exists")]
    StreamExists(String),
    #[error("cannot start stream {id}: {source}")]
    StreamStart {
        id: String,
        #[source]
        source: ZinitError,
    },
    #[error("cannot stop stream {id}: {source}")]
    StreamStop {
        id: String,
        #[source]
        source: ZinitError,
    },
    /// A file of vmd's state (or zinit's service directory) could not be
    /// read or written.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn console_suffix(console: &str) -> String {
    if console.trim().is_empty() {
        String::new()
    } else {
        format!("\nconsole:\n{}", console.trim_end())
    }
}

/// Context for a file error: `.what(|| "cannot write the request of vm web")`.
pub trait IoContext<T> {
    fn what(self, what: impl FnOnce() -> String) -> Result<T, VmError>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> IoContext<T> for Result<T, E> {
    fn what(self, what: impl FnOnce() -> String) -> Result<T, VmError> {
        self.map_err(|source| VmError::Io {
            what: what(),
            source: Box::new(source),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_are_the_wire_texts() {
        assert_eq!(
            VmError::NotFound("web".into()).to_string(),
            "machine 'web' does not exist"
        );
        assert_eq!(
            VmError::AlreadyExists.to_string(),
            "a vm with same name already exists"
        );
        assert_eq!(
            VmError::InvalidVm("cpu 0 must be between 1 and 2 (host cpus)".into()).to_string(),
            "machine configuration validation failed: cpu 0 must be between 1 and 2 (host cpus)"
        );
        let failed = VmError::StartFailed {
            name: "web".into(),
            reason: NotUp::Timeout(std::time::Duration::from_secs(30)),
            console: "boot\nlast line\n".into(),
        };
        assert_eq!(
            failed.to_string(),
            "failed to start vm web: the VMM did not answer within 30s\nconsole:\nboot\nlast line"
        );
        let quiet = VmError::StartFailed {
            name: "web".into(),
            reason: NotUp::Failed("r".into()),
            console: " \n".into(),
        };
        assert_eq!(quiet.to_string(), "failed to start vm web: r");
        let deferred = VmError::LockDeferred {
            name: "web".into(),
            lock: false,
            why: "no VMM".into(),
        };
        assert_eq!(
            deferred.to_string(),
            "vm web is not running (no VMM); the unlock applies when it starts again"
        );
    }
}
