//! Why a VMM could not be started. The restart policy tells by the type
//! what a later attempt can fix (a busy host, a helper that died) from what
//! it cannot (no such kernel, no usable cloud-hypervisor): those fail the VM
//! at once, reported once, instead of being retried like a crash.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use vmd_runtime::vmm::VersionError;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cloud-hypervisor cannot be used: {0}")]
    Hypervisor(#[from] VersionError),
    #[error("the {what} {} does not exist", path.display())]
    Missing { what: &'static str, path: PathBuf },
    #[error("cannot remove the stale {}: {source}", path.display())]
    Stale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start {} for share {tag}: {source}", program.display())]
    VirtiofsdSpawn {
        program: PathBuf,
        tag: String,
        #[source]
        source: io::Error,
    },
    #[error("virtiofsd for share {tag} exited: {status}")]
    VirtiofsdExited { tag: String, status: String },
    #[error("virtiofsd for share {tag} did not create its socket within {after:?}")]
    VirtiofsdTimeout { tag: String, after: Duration },
    #[error("cannot create the VMM's event pipe: {0}")]
    EventPipe(#[source] nix::Error),
    #[error(transparent)]
    Tap(#[from] crate::taps::TapError),
    #[error("cannot jail the VMM: {0}")]
    Jail(#[from] crate::jail::JailError),
    #[error("cannot hand descriptors to the VMM: {0}")]
    Descriptors(#[source] io::Error),
    #[error("cannot start {}: {source}", program.display())]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A program that is not there, or not runnable, stays so until someone
/// installs it: no retry fixes that.
fn absent(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied
    )
}

impl StartError {
    /// No later attempt can succeed without someone changing the host or
    /// the VM: the VM fails now.
    pub fn is_permanent(&self) -> bool {
        match self {
            StartError::Hypervisor(e) => match e {
                VersionError::Run { source, .. } => absent(source),
                VersionError::Timeout { .. } => false,
                VersionError::Unrecognised { .. } | VersionError::Unsupported { .. } => true,
            },
            StartError::Missing { .. } => true,
            // A hypervisor its user may not run stays so; a full uid
            // range, a tap or a file that could not be opened may not.
            StartError::Jail(e) => matches!(e, crate::jail::JailError::NotExecutable { .. }),
            StartError::Tap(_) | StartError::Descriptors(_) => false,
            StartError::VirtiofsdSpawn { source, .. } | StartError::Spawn { source, .. } => {
                absent(source)
            }
            StartError::Stale { .. }
            | StartError::VirtiofsdExited { .. }
            | StartError::VirtiofsdTimeout { .. }
            | StartError::EventPipe(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_no_retry_fixes_is_permanent() {
        let missing = StartError::Missing {
            what: "kernel",
            path: "/k".into(),
        };
        assert!(missing.is_permanent());
        assert_eq!(missing.to_string(), "the kernel /k does not exist");
        let gone = StartError::Spawn {
            program: "/ch".into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        assert!(gone.is_permanent());
        let busy = StartError::Spawn {
            program: "/ch".into(),
            source: io::Error::from_raw_os_error(libc::EAGAIN),
        };
        assert!(!busy.is_permanent());
        let died = StartError::VirtiofsdExited {
            tag: "data".into(),
            status: "exit 1".into(),
        };
        assert!(!died.is_permanent());
    }
}
