//! Dropping root. A worker talks to a receiver a VM's user chose (a TLS
//! stack, a WebSocket or Redis protocol parser on the other end's bytes):
//! once it is in its network namespace and has read what only root may
//! (its record with the receiver's credentials, the CA file), it goes on
//! as an unprivileged uid, in its VM's log group only, with no capability
//! and `no_new_privs`.
//!
//! Its files are reached afterwards through directories it opened while it
//! was root (`/proc/self/fd/N/<file>`): it needs no search permission on
//! vmd's private directories, only read on its VM's log (group) and write
//! on the workers' progress directory (owner).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("cannot open {}: {source}", .path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot drop root ({what}): {source}")]
    Drop {
        what: &'static str,
        source: std::io::Error,
    },
}

/// A path that keeps working after the drop: `path`'s directory, opened
/// now, and the name in it. Keep the `File` open as long as the path is used.
pub fn through_open_dir(path: &Path) -> Result<(File, PathBuf), UserError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let f = File::open(dir).map_err(|source| UserError::Open {
        path: dir.to_owned(),
        source,
    })?;
    let mut p = PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
    if let Some(name) = path.file_name() {
        p.push(name);
    }
    Ok((f, p))
}

/// Becomes `uid` in group `gid` alone, with every capability gone for good
/// and `no_new_privs`. Before the runtime's threads exist (the bounding set
/// and `no_new_privs` are per thread; the uid change reaches every thread).
pub fn become_user(uid: u32, gid: u32) -> Result<(), UserError> {
    let fail = |what| {
        move |()| UserError::Drop {
            what,
            source: std::io::Error::last_os_error(),
        }
    };
    let ok = |r: libc::c_int| if r == 0 { Ok(()) } else { Err(()) };
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        // EINVAL: past the kernel's last capability.
        if r != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(fail("bounding set")(()));
        }
    }
    // SAFETY: plain system calls with integer arguments or a null list.
    unsafe {
        ok(libc::setgroups(0, std::ptr::null())).map_err(fail("groups"))?;
        ok(libc::setresgid(gid, gid, gid)).map_err(fail("gid"))?;
        // Leaving uid 0 clears the permitted, effective and ambient sets.
        ok(libc::setresuid(uid, uid, uid)).map_err(fail("uid"))?;
        ok(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)).map_err(fail("no_new_privs"))?;
    }
    Ok(())
}
