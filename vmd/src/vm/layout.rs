//! Where vmd keeps what: every path derives from the flags, so tests (and
//! several vmds) run side by side in temp dirs.
//!
//! ```text
//! <runtime-dir>/present/<name>            the VM exists: created last by Run, removed first by Delete
//! <runtime-dir>/vms/<name>/request.json   the VM as the caller asked for it (wire fields)
//!                          vm.json        the shim's runtime description (desired state)
//!                          creating       a Run in progress: rolled back if vmd dies
//!                          deleted        a Delete in progress: completed if vmd dies
//!                          state.json     the shim's state; api.sock serial.sock shim.sock
//!                          metrics.json   tap counter offsets (metrics never go backwards)
//! <root>/logs/<name>                      console log (+ .meta), kept until Delete
//! <root>/cloud-init/<name>.img            the cloud-init seed (FAT, `cidata`), the VM's last disk
//! <runtime-dir>/streams/<id>.json         a log stream (see `streams`)
//! <zinit-dir>/vm:<name>.yaml              the zinit service running vmd-shim
//! ```

use std::path::PathBuf;

use vmd_shim::spec::RunDir;

use super::name::VmName;

#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
    pub runtime: PathBuf,
    pub zinit_dir: PathBuf,
    pub zinit_socket: PathBuf,
    /// The vmd-shim binary zinit runs for each VM.
    pub shim: PathBuf,
    /// The cloud-hypervisor binary the shims run.
    pub hypervisor: PathBuf,
    /// The virtiofsd binary the shims run per share (absent: shares refused).
    pub virtiofsd: Option<PathBuf>,
    /// The vmd-logstream binary zinit runs per stream.
    pub logstream: PathBuf,
    /// Named network namespaces (`ip netns` keeps them in /var/run/netns).
    pub netns_dir: PathBuf,
    /// An extra CA for wss receivers (besides the system's roots).
    pub stream_ca_file: Option<PathBuf>,
}

pub const REQUEST_FILE: &str = "request.json";
pub const CREATING_MARK: &str = "creating";
pub const METRICS_FILE: &str = "metrics.json";

impl Layout {
    pub fn vms(&self) -> PathBuf {
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
        RunDir(self.vms().join(name.as_str()))
    }

    pub fn request(&self, name: &VmName) -> PathBuf {
        self.run_dir(name).0.join(REQUEST_FILE)
    }

    pub fn creating_mark(&self, name: &VmName) -> PathBuf {
        self.run_dir(name).0.join(CREATING_MARK)
    }

    pub fn metrics(&self, name: &VmName) -> PathBuf {
        self.run_dir(name).0.join(METRICS_FILE)
    }

    pub fn seeds(&self) -> PathBuf {
        self.root.join("cloud-init")
    }

    pub fn seed(&self, name: &VmName) -> PathBuf {
        self.seeds().join(format!("{}.img", name.as_str()))
    }

    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }

    pub fn log(&self, name: &VmName) -> PathBuf {
        self.logs().join(name.as_str())
    }
}

/// Finds `program` the way a shell would (absolute, or on PATH), so that the
/// service files name an absolute path and do not depend on zinit's PATH.
pub fn resolve_program(program: &std::path::Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &std::path::Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.components().count() > 1 {
        let p = std::fs::canonicalize(program).ok()?;
        return executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| executable(p))
}
