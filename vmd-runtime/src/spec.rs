//! The runtime description of one VM: what vmd writes and vmd-shim reads.
//!
//! It lives at [`crate::RunDir::spec`]. Everything the shim needs is in it,
//! resolved by vmd (kernel command line, memory in MiB, paths). What would
//! break cloud-hypervisor's command line is checked here, once, by
//! [`VmSpec::validate`]: vmd calls it before writing the file, the shim when
//! it loads it (a file from another vmd version, or edited by hand).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::vmm::{ImageFormat, Release};

/// The format of `vm.json`. Bumped on incompatible changes; the shim refuses
/// what it does not understand rather than guessing.
pub const SPEC_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub version: u32,
    pub name: String,
    /// The cloud-hypervisor binary.
    pub hypervisor: PathBuf,
    /// Its release as vmd probed it at Run, with the file's identity: the
    /// shim trusts it while the file is the same, and probes otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypervisor_release: Option<Release>,
    /// The virtiofsd binary, one daemon per share (needed only with shares).
    #[serde(default = "default_virtiofsd")]
    pub virtiofsd: PathBuf,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    #[serde(default)]
    pub disks: Vec<Disk>,
    #[serde(default)]
    pub nets: Vec<Net>,
    #[serde(default)]
    pub shares: Vec<Share>,
    /// PCI addresses, `0000:01:00.0`.
    #[serde(default)]
    pub devices: Vec<String>,
    /// Restart the VM when the guest powers off (Zero-OS: not `NoKeepAlive`).
    pub keep_alive: bool,
    /// How long a stop waits for the guest to power off before forcing it.
    pub grace_secs: u64,
    pub restart: RestartPolicy,
    pub console: ConsoleSpec,
    /// The web console, where the VM has one (a private network): placed
    /// once at Run, so it comes back after any restart without asking the
    /// network module again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web_console: Option<WebConsole>,
    /// Where the VMM's REST API listens. vmd puts it where the Go VM module
    /// looks (`/var/run/cloud-hypervisor/<name>`: the last part of the path
    /// is the VM's name, which is how the Go module's `/proc` rule names a
    /// VMM); `None` (descriptions written before): `api.sock` in the run
    /// directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_socket: Option<PathBuf>,
    /// The VM's config file in the Go VM module's format, which vmd keeps
    /// for a roll-back (docs/zero-os-node.md). When it is gone while vmd's
    /// own record of the VM is not, the Go module deleted the VM after a
    /// roll-back: the shim does not start its VMM again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub go_config: Option<PathBuf>,
    /// A VMM the Go VM module started, which vmd took over with its VM
    /// (docs/zero-os-node.md): while this very process runs, the shim
    /// watches it instead of starting one; every later VMM is the shim's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopted: Option<crate::state::ProcessIdentity>,
    /// The VM's own user (docs/security.md): its VMM's uid and jail, its
    /// console log's group; `None`: none (a shim that is not root,
    /// descriptions written before), the VMM runs as the shim's user,
    /// without capabilities, in the shim's mount namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail: Option<JailSpec>,
    /// The network namespace the VM's taps are in, where it is not the
    /// shim's own (`None`, as on Zero-OS, where they are in the host's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap_netns: Option<PathBuf>,
}

/// A VM's own user, taken by its shim from a range: uid `u` runs its VMM
/// (with group `u`), group `u + uids` reads its console log (its stream
/// workers run in it, and in no other VM's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailSpec {
    /// The first uid of the range the VMs' users are taken from.
    pub first_uid: u32,
    /// How many uids the range has.
    pub uids: u32,
    /// Where the shims hold the lock on the uid each took (one file per
    /// uid; a lock dies with its shim, so none can leak).
    pub lock_dir: PathBuf,
    /// Whether the VMM runs as that user in a mount view of only the VM's
    /// files (not for PCI passthrough: VFIO needs `/dev/vfio`, the
    /// devices' sysfs and locked memory).
    #[serde(default = "yes")]
    pub confine_vmm: bool,
}

fn yes() -> bool {
    true
}

impl JailSpec {
    /// The group of the console log of the VM whose user is `uid`.
    pub fn log_gid(&self, uid: u32) -> u32 {
        uid + self.uids
    }
}

impl VmSpec {
    /// Where the VMM's REST API listens.
    pub fn api_socket_in(&self, run: &crate::RunDir) -> PathBuf {
        self.api_socket.clone().unwrap_or_else(|| run.api_socket())
    }
}

/// Where the web console listens and what serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebConsole {
    /// The network namespace (a file under `ip netns`'s directory).
    pub netns: PathBuf,
    /// The address in that namespace: the private subnet's `.1`.
    pub address: std::net::Ipv4Addr,
    /// 20000 + the last octet of the VM's address on that network.
    pub port: u16,
    /// The console server (`vmd-console`).
    pub server: PathBuf,
    /// The page's files (a `console/web` directory after `npm ci`), in place
    /// of the page built into `vmd-console`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assets: Option<PathBuf>,
}

impl WebConsole {
    /// What `Run` returns as `ConsoleURL`: `10.20.2.1:20005`.
    pub fn url(&self) -> String {
        format!("{}:{}", self.address, self.port)
    }
}

fn default_virtiofsd() -> PathBuf {
    PathBuf::from("virtiofsd")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
    /// The format detected when the VM was created; passed to the VMM as
    /// `image_type=` where the version has it. Absent in descriptions
    /// written before it was recorded: the VMM then detects it itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<ImageFormat>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Net {
    pub tap: String,
    pub mac: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// virtio-fs tag the guest mounts.
    pub tag: String,
    /// virtiofsd's vhost-user socket.
    pub socket: PathBuf,
    /// Host directory served.
    pub source: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartPolicy {
    /// This many VMM exits within `window_secs` and the shim gives up.
    pub max_exits: u32,
    pub window_secs: u64,
    /// Back-off between restarts doubles from 1 s up to this.
    pub max_backoff_secs: u64,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            max_exits: 5,
            window_secs: 300,
            max_backoff_secs: 30,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleSpec {
    /// The console log (Zero-OS: `/var/cache/modules/vmd/logs/<name>`).
    pub log: PathBuf,
    /// Rotate when the log grows past this many bytes…
    pub rotate_bytes: u64,
    /// …keeping this many bytes of its tail.
    pub keep_bytes: u64,
}

impl ConsoleSpec {
    pub const ZOS_ROTATE: u64 = 8 << 20;
    pub const ZOS_KEEP: u64 = 4 << 20;
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("unsupported vm.json version {0} (this shim reads {SPEC_VERSION})")]
    Version(u32),
    #[error("{what} {value:?} cannot be passed to cloud-hypervisor: {why}")]
    Unrepresentable {
        what: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("cannot read {0}: {1}")]
    Read(String, #[source] std::io::Error),
    #[error("{0} is not a VM description: {1}")]
    Parse(String, #[source] serde_json::Error),
    #[error("{0}: {1}")]
    InFile(String, Box<SpecError>),
}

fn plain(what: &'static str, value: &str) -> Result<(), SpecError> {
    // cloud-hypervisor splits option values on ',' and '='-pairs: neither
    // may occur inside a value, nor may control characters.
    let bad = |why| SpecError::Unrepresentable {
        what,
        value: value.to_owned(),
        why,
    };
    if value.is_empty() {
        return Err(bad("empty"));
    }
    if value.contains(',') {
        return Err(bad("contains ','"));
    }
    if value.chars().any(|c| c.is_control()) {
        return Err(bad("contains a control character"));
    }
    Ok(())
}

fn plain_path(what: &'static str, p: &Path) -> Result<(), SpecError> {
    let s = p.to_str().ok_or_else(|| SpecError::Unrepresentable {
        what,
        value: p.display().to_string(),
        why: "not UTF-8",
    })?;
    if !p.is_absolute() {
        return Err(SpecError::Unrepresentable {
            what,
            value: s.to_owned(),
            why: "not an absolute path",
        });
    }
    plain(what, s)
}

impl VmSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.version != SPEC_VERSION {
            return Err(SpecError::Version(self.version));
        }
        if self.vcpus == 0 {
            return Err(SpecError::Invalid("vcpus must be at least 1".into()));
        }
        if self.memory_mib == 0 {
            return Err(SpecError::Invalid("memory must be at least 1 MiB".into()));
        }
        plain_path("kernel", &self.kernel)?;
        if let Some(i) = &self.initramfs {
            plain_path("initramfs", i)?;
        }
        if self.cmdline.contains('\0') || self.cmdline.contains('\n') {
            return Err(SpecError::Invalid(
                "kernel command line holds a NUL or newline".into(),
            ));
        }
        for d in &self.disks {
            plain_path("disk", &d.path)?;
        }
        for n in &self.nets {
            plain("tap", &n.tap)?;
            plain("mac", &n.mac)?;
            if n.tap.contains('=') || n.mac.contains('=') {
                return Err(SpecError::Invalid(format!("net {}: '=' in a value", n.tap)));
            }
        }
        for s in &self.shares {
            plain("share tag", &s.tag)?;
            plain_path("share socket", &s.socket)?;
        }
        for d in &self.devices {
            plain("device", d)?;
            if d.contains('/') {
                return Err(SpecError::Invalid(format!(
                    "device {d:?} is not a PCI address"
                )));
            }
        }
        if self.console.keep_bytes >= self.console.rotate_bytes {
            return Err(SpecError::Invalid(
                "console keep_bytes must be below rotate_bytes".into(),
            ));
        }
        if let Some(w) = &self.web_console {
            plain_path("console namespace", &w.netns)?;
            plain_path("console server", &w.server)?;
            if let Some(assets) = &w.assets {
                plain_path("console assets", assets)?;
            }
            if w.port == 0 {
                return Err(SpecError::Invalid("console port 0".into()));
            }
        }
        if self.restart.max_exits == 0 {
            return Err(SpecError::Invalid(
                "restart.max_exits must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// Reads and validates a `vm.json`.
    pub fn load(path: &Path) -> Result<Self, SpecError> {
        let shown = || path.display().to_string();
        let text = std::fs::read(path).map_err(|e| SpecError::Read(shown(), e))?;
        let spec: VmSpec =
            serde_json::from_slice(&text).map_err(|e| SpecError::Parse(shown(), e))?;
        spec.validate()
            .map_err(|e| SpecError::InFile(shown(), Box::new(e)))?;
        Ok(spec)
    }

    /// Writes the spec, durably (see [`crate::files`]).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        crate::files::write_json(path, self, 0o600)
    }
}
