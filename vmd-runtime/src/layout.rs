//! Where everything is. Every path of vmd's state derives from two
//! directories given by flags (so tests, and several vmds, run side by side
//! in temp dirs), and is built here and nowhere else.
//!
//! ```text
//! <runtime>/present/<name>            the VM exists: created last by Run, removed first by Delete
//! <runtime>/vms/<name>/               the VM's run directory (RunDir):
//!                      request.json   the VM as the caller asked for it (wire fields)
//!                      vm.json        the shim's runtime description (desired state)
//!                      creating       a Run in progress: rolled back if vmd dies
//!                      deleted        a Delete in progress: completed if vmd dies;
//!                                     a shim respawned by zinit starts nothing
//!                      locked         the VM is locked: every VMM is paused once booted
//!                      state.json     the shim's state
//!                      metrics.json   tap counter offsets (metrics never go backwards)
//!                      api.sock shim.sock fs-<n>.sock (the serial port is the
//!                      VMM's stdin/stdout: no socket)
//! <runtime>/streams/<id>.json         a log stream as the caller asked for it
//! <runtime>/streams/<id>.progress     its worker's position and counters
//! <root>/logs/<name>                  the console log (+ .meta), kept until Delete
//! <root>/cloud-init/<name>.img        the cloud-init seed (FAT, `cidata`), the VM's last disk
//! ```

use std::path::{Path, PathBuf};

use crate::name::{StreamId, VmName};

/// The paths of one host's vmd.
#[derive(Debug, Clone)]
pub struct HostPaths {
    root: PathBuf,
    runtime: PathBuf,
}

impl HostPaths {
    /// `root`: what outlives a reboot (console logs, seeds); `runtime`: what
    /// does not (run directories, sockets, stream records).
    pub fn new(root: impl Into<PathBuf>, runtime: impl Into<PathBuf>) -> Self {
        HostPaths {
            root: root.into(),
            runtime: runtime.into(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn runtime(&self) -> &Path {
        &self.runtime
    }

    /// The run directories, one per VM.
    pub fn vms_dir(&self) -> PathBuf {
        self.runtime.join("vms")
    }

    /// One empty file per VM that exists: List is one directory read.
    pub fn present_dir(&self) -> PathBuf {
        self.runtime.join("present")
    }

    pub fn present_mark(&self, name: &VmName) -> PathBuf {
        self.present_dir().join(name.as_str())
    }

    pub fn run_dir(&self, name: &VmName) -> RunDir {
        RunDir::new(self.vms_dir().join(name.as_str()))
    }

    pub fn seeds_dir(&self) -> PathBuf {
        self.root.join("cloud-init")
    }

    pub fn seed(&self, name: &VmName) -> PathBuf {
        self.seeds_dir().join(format!("{}.img", name.as_str()))
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.root.join("logs")
    }

    /// The console log of a VM (its sidecar: [`crate::console::meta_path`]).
    pub fn log(&self, name: &VmName) -> PathBuf {
        self.logs_dir().join(name.as_str())
    }

    pub fn streams_dir(&self) -> PathBuf {
        self.runtime.join("streams")
    }

    /// What the caller asked for (`StreamSpec`).
    pub fn stream_spec(&self, id: &StreamId) -> PathBuf {
        self.streams_dir().join(format!("{id}.json"))
    }

    /// The tap counters `Metrics` saw, by VM and tap (what keeps them from
    /// going backwards for a caller across a tap's re-creation).
    pub fn tap_counters(&self) -> PathBuf {
        self.runtime.join("tap-counters.json")
    }

    /// Where the workers save their progress: a directory of their own
    /// (they write it after dropping root), apart from the records.
    pub fn progress_dir(&self) -> PathBuf {
        self.streams_dir().join("progress")
    }

    /// The worker's [`crate::progress::Progress`].
    pub fn stream_progress(&self, id: &StreamId) -> PathBuf {
        self.progress_dir().join(format!("{id}.progress"))
    }

    /// A Loki worker's pushes under way (`vmd_logstream::loki::InFlight`),
    /// beside its progress: the worker derives this name from that one.
    pub fn stream_inflight(&self, id: &StreamId) -> PathBuf {
        self.progress_dir().join(format!("{id}.inflight"))
    }
}

/// The run directory of one VM: the files vmd and its shim share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir {
    dir: PathBuf,
}

impl RunDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        RunDir { dir: dir.into() }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn exists(&self) -> bool {
        self.dir.exists()
    }

    /// `vm.json`: the [`crate::spec::VmSpec`].
    pub fn spec(&self) -> PathBuf {
        self.dir.join("vm.json")
    }

    /// The request as the caller sent it (answers a retried Run, Inspect).
    pub fn request(&self) -> PathBuf {
        self.dir.join("request.json")
    }

    /// Present while a Run has not committed.
    pub fn creating_mark(&self) -> PathBuf {
        self.dir.join("creating")
    }

    /// Present once a Delete began: a shim respawned by zinit starts nothing.
    pub fn deleted_mark(&self) -> PathBuf {
        self.dir.join("deleted")
    }

    /// Present while the VM is locked (`Lock(name, true)`): every VMM the
    /// shim starts is paused once booted, so a crash does not unlock it.
    pub fn locked_mark(&self) -> PathBuf {
        self.dir.join("locked")
    }

    pub fn is_locked(&self) -> bool {
        self.locked_mark().exists()
    }

    /// What vmd told the provisioning engine of the VM's failure (vmd's
    /// own record; the shim never reads it).
    pub fn reported(&self) -> PathBuf {
        self.dir.join("reported.json")
    }

    /// The shim's [`crate::state::ShimState`].
    pub fn state(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// Tap counters seen by `Metrics`, as vmd kept them before
    /// [`HostPaths::tap_counters`] (read once, for VMs of an older vmd).
    pub fn metrics(&self) -> PathBuf {
        self.dir.join("metrics.json")
    }

    /// cloud-hypervisor's REST API (only the shim talks to it).
    pub fn api_socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }

    /// The shim's control socket ([`crate::control`]).
    pub fn control_socket(&self) -> PathBuf {
        self.dir.join("shim.sock")
    }

    /// The shim's console socket ([`crate::attach`]): the serial console,
    /// its history and live output, and input to the guest.
    pub fn console_socket(&self) -> PathBuf {
        self.dir.join("console.sock")
    }

    /// virtiofsd's vhost-user socket for share number `n`.
    pub fn share_socket(&self, n: usize) -> PathBuf {
        self.dir.join(format!("fs-{n}.sock"))
    }
}

/// Finds `program` the way a shell would (absolute, or on PATH), so that
/// service files and specs name an absolute path and do not depend on
/// anyone's PATH.
pub fn resolve_program(program: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.components().count() > 1 {
        // Absolute, but links are not resolved: `/usr/bin/cloud-hypervisor`
        // switched to a new release later is the new release for new VMs
        // and restarts (the version is probed per start, by file identity).
        let p = std::path::absolute(program).ok()?;
        return executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| executable(p))
}
