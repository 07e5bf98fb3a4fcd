//! Taking over the VMs the Go VM module runs on a live node, without
//! restarting their guests (`docs/zero-os-node.md`).
//!
//! At start, vmd looks for them the way the Go module's monitor does
//! (zosbase `vm/find.go`): every process whose `argv[0]` is exactly
//! `cloud-hypervisor`, named after the last part of its `--api-socket`. One
//! is the Go module's when its socket is in vmd's `--api-socket-dir` (the Go
//! module's `/var/run/cloud-hypervisor`), its config file is in
//! `--go-config-dir` (its tmpfs) and vmd has no VM of that name.
//!
//! Each becomes a VM of vmd's like any other: a run directory (its
//! description built from the Go config, the request a Go caller would
//! have sent as far as the config tells), a zinit service with a shim, the
//! `present` mark. The description names the running VMM (`adopted`): its
//! shim watches that process instead of starting one, stops it gracefully
//! on Delete, and when it exits starts the VM again its own way — the same
//! disks (the Go module's cloud-init image included), taps and console log.
//! Never two VMMs: the shim starts one only once the adopted one is gone.
//!
//! The order of the writes makes a take-over that is interrupted harmless:
//! the files first, then the `present` mark, then the service. Before the
//! mark nothing runs and the next start begins again; after it, the VM is
//! vmd's and start-up reconciliation gives it its service. Nothing here
//! ever stops or signals the Go module's processes.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use vmd_runtime::spec::{ConsoleSpec, Disk, Net, Share, VmSpec, WebConsole, SPEC_VERSION};
use vmd_runtime::state::ProcessIdentity;
use vmd_runtime::{files, VmName};

use super::error::{IoContext, VmError};
use super::goconfig::{Console, Machine};
use super::host::is_netns_name;
use super::manager::{service_of, Manager};
use crate::api::{Vm, VmIface, VmNetworkInfo};
use crate::events::Seen;
use tokio::sync::broadcast::Receiver;

/// How long start-up waits for the shims of the VMs taken over to report.
const TAKE_OVER_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A cloud-hypervisor process as the Go module's `/proc` rule sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundVmm {
    pub vmm: ProcessIdentity,
    /// The value after `--api-socket`, as given.
    pub api_socket: PathBuf,
}

impl FoundVmm {
    /// The VM's name: the last part of its API socket's path.
    pub fn name(&self) -> Option<&str> {
        self.api_socket.file_name()?.to_str()
    }
}

/// Every process under `proc` that the Go module's rule calls a VMM.
pub fn scan(proc: &Path) -> Vec<FoundVmm> {
    let Ok(dir) = std::fs::read_dir(proc) else {
        return Vec::new();
    };
    let mut out: Vec<FoundVmm> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let cmdline = std::fs::read(proc.join(pid.to_string()).join("cmdline")).ok()?;
            let api_socket = api_socket_of(&cmdline)?;
            Some(FoundVmm {
                vmm: ProcessIdentity::of(pid)?,
                api_socket,
            })
        })
        .collect();
    out.sort_by_key(|f| f.vmm.pid);
    out
}

/// The API socket of a command line that is cloud-hypervisor's by the Go
/// module's rule: `argv[0]` exactly `cloud-hypervisor` (a path does not
/// match), `--api-socket <path>` or `--api-socket=<path>`.
fn api_socket_of(cmdline: &[u8]) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    // Each argument ends with a NUL.
    let cmdline = cmdline.strip_suffix(&[0]).unwrap_or(cmdline);
    let mut args = cmdline.split(|b| *b == 0).map(std::ffi::OsStr::from_bytes);
    if args.next()? != "cloud-hypervisor" {
        return None;
    }
    while let Some(a) = args.next() {
        let value = if a == "--api-socket" {
            args.next()
        } else {
            a.as_bytes()
                .strip_prefix(b"--api-socket=")
                .map(std::ffi::OsStr::from_bytes)
        };
        if let Some(v) = value {
            return Some(v).filter(|v| !v.is_empty()).map(PathBuf::from);
        }
    }
    None
}

/// Why one VM of the Go module was not taken over.
#[derive(Debug, thiserror::Error)]
pub enum TakeOverError {
    #[error("cannot read its config {path}: {source}")]
    Config {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("its config {path} is not the Go module's format: {source}")]
    Format {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("its config cannot be run by vmd: {0}")]
    Spec(String),
    #[error(transparent)]
    Vm(#[from] VmError),
}

impl Manager {
    /// Takes over every VM the Go module runs (see the module's text); the
    /// names taken over. A VM that cannot be is left to the Go module's
    /// processes, running, and logged.
    pub async fn take_over(&self, proc: &Path) -> Vec<VmName> {
        let Some(config_dir) = self.host().go_config_dir.clone() else {
            return Vec::new();
        };
        let mut taken = Vec::new();
        let mut watched = Vec::new();
        for found in scan(proc) {
            if found.api_socket.parent() != Some(self.host().api_socket_dir.as_path()) {
                continue;
            }
            let Some(name) = found.name().and_then(|n| VmName::new(n).ok()) else {
                continue;
            };
            if self.present(&name) {
                // vmd's own VM (or one taken over before).
                continue;
            }
            let config = config_dir.join(name.as_str());
            if !config.exists() {
                // The Go module kills it within 10 s; vmd leaves it be.
                tracing::warn!(vm = %name, pid = found.vmm.pid, "a cloud-hypervisor without a config in the Go module's directory: not taking it over");
                continue;
            }
            let run = self.run_dir(&name);
            if run.exists() {
                if run.creating_mark().exists() {
                    tracing::warn!(vm = %name, "a Run of vmd's was interrupted for this name; reconciliation rolls it back, the next start takes the VM over");
                    continue;
                }
                // An interrupted take-over: nothing of it runs yet.
                if let Err(e) = std::fs::remove_dir_all(run.path()) {
                    tracing::error!(vm = %name, error = %e, "cannot remove an interrupted take-over");
                    continue;
                }
            }
            match self.adopt(&name, &found, &config).await {
                Ok(seen) => {
                    tracing::info!(vm = %name, pid = found.vmm.pid, "took over the Go VM module's VM; its guest keeps running");
                    watched.push((name.clone(), seen));
                    taken.push(name);
                }
                Err(e) => {
                    tracing::error!(vm = %name, pid = found.vmm.pid, error = %e, "cannot take over the Go VM module's VM; left as it runs");
                }
            }
        }
        // Until their shims say they watch them: a caller's first Inspect
        // sees them running, not starting. Bounded: serving waits for it.
        let deadline = tokio::time::Instant::now() + TAKE_OVER_WAIT;
        for (name, seen) in watched {
            match tokio::time::timeout_at(deadline, self.wait_up(&name, seen)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(vm = %name, error = %e, "the VM taken over is not running")
                }
                Err(_) => {
                    tracing::warn!(vm = %name, "the shim of the VM taken over has not reported yet; serving anyway")
                }
            }
        }
        taken
    }

    async fn adopt(
        &self,
        name: &VmName,
        found: &FoundVmm,
        config: &Path,
    ) -> Result<Receiver<Seen>, TakeOverError> {
        let bytes = std::fs::read(config).map_err(|source| TakeOverError::Config {
            path: config.to_owned(),
            source,
        })?;
        let machine = Machine::parse(&bytes).map_err(|source| TakeOverError::Format {
            path: config.to_owned(),
            source,
        })?;
        let run = self.run_dir(name);
        let spec = self.spec_of(name, &machine, found, config);
        spec.validate()
            .map_err(|e| TakeOverError::Spec(e.to_string()))?;
        let service = super::plan::service_file(self.host(), self.settings(), &run)
            .map_err(|e| TakeOverError::Spec(e.to_string()))?;
        files::create_dir(run.path(), 0o700)
            .what(|| format!("cannot create the run directory of vm {name}"))?;
        // Listening before its shim can say anything (the watch needs the
        // run directory).
        let seen = self.events().follow(name, true);
        files::write_json(&run.request(), &request_of(name, &machine), 0o600)
            .what(|| format!("cannot write the request of vm {name}"))?;
        spec.save(&run.spec())
            .what(|| format!("cannot write the description of vm {name}"))?;
        // The commit point: the VM is vmd's from here on.
        self.mark(&self.paths().present_mark(name))?;
        self.events().created(name);
        let svc = service_of(name);
        self.services()
            .install(&svc, &service)
            .what(|| format!("cannot write the service file of {svc}"))?;
        match self.zinit().monitor(&svc).await {
            Ok(()) | Err(zinit::ZinitError::AlreadyMonitored(_)) => Ok(seen),
            // Reconciliation monitors it once zinit answers.
            Err(e) => Err(VmError::ServiceStart {
                service: svc.to_string(),
                source: e,
            }
            .into()),
        }
    }

    /// vmd's description of a VM the Go module runs: what its config says,
    /// with vmd's settings for what it does not (restarts, grace, console
    /// log rotation), and the running VMM.
    fn spec_of(&self, name: &VmName, m: &Machine, found: &FoundVmm, config: &Path) -> VmSpec {
        let host = self.host();
        let settings = self.settings();
        let run = self.run_dir(name);
        let nets = m
            .interfaces
            .iter()
            .enumerate()
            .map(|(i, nic)| Net {
                tap: nic.host_dev_name.clone(),
                mac: if nic.guest_mac.is_empty() {
                    // The Go module let cloud-hypervisor pick one at each
                    // start; vmd gives the VM one that stays.
                    stable_mac(name, i)
                } else {
                    nic.guest_mac.to_ascii_lowercase()
                },
            })
            .collect();
        VmSpec {
            version: SPEC_VERSION,
            name: name.as_str().to_owned(),
            hypervisor: host.hypervisor.clone(),
            hypervisor_release: None,
            virtiofsd: host.virtiofsd.clone().unwrap_or_else(|| "virtiofsd".into()),
            vcpus: m.config.vcpu_count,
            memory_mib: m.config.mem_size_mib,
            kernel: m.boot.kernel_image_path.clone().into(),
            initramfs: Some(&m.boot.initrd_path)
                .filter(|p| !p.is_empty())
                .map(PathBuf::from),
            cmdline: m.boot.boot_args.clone(),
            disks: m
                .drives
                .iter()
                .map(|d| Disk {
                    path: d.path_on_host.clone().into(),
                    readonly: d.is_read_only,
                    format: None,
                })
                .collect(),
            nets,
            shares: m
                .fs
                .iter()
                .enumerate()
                .map(|(i, f)| Share {
                    tag: f.tag.clone(),
                    socket: run.share_socket(i),
                    source: f.path.clone().into(),
                })
                .collect(),
            devices: m.devices.clone(),
            keep_alive: !m.no_keep_alive,
            grace_secs: settings.grace_secs,
            restart: settings.restart,
            console: ConsoleSpec {
                log: self.paths().log(name),
                rotate_bytes: settings.log_rotate_bytes,
                keep_bytes: settings.log_keep_bytes,
            },
            web_console: m
                .interfaces
                .iter()
                .filter_map(|i| i.console.as_ref())
                .next_back()
                .and_then(|c| self.web_console_of(c)),
            api_socket: Some(found.api_socket.clone()),
            go_config: Some(config.to_owned()),
            adopted: Some(found.vmm),
            jail: super::plan::jail_of(self.host(), &m.devices),
            tap_netns: self.host().tap_netns.clone(),
        }
    }

    /// The web console where the Go module's `cloud-console` serves it (the
    /// last interface that has one, as the Go module's `ConsoleURL`): the
    /// network's `.1`, port 20000 + the VM's last octet. It listens once
    /// the Go module's console is gone with its VMM.
    fn web_console_of(&self, c: &Console) -> Option<WebConsole> {
        if !is_netns_name(&c.namespace) {
            return None;
        }
        let network: Ipv4Addr = c.network_addr.ip.parse().ok()?;
        let ip: Ipv4Addr = c.ip.ip.parse().ok()?;
        Some(WebConsole {
            netns: self.host().netns_dir.join(&c.namespace),
            address: Ipv4Addr::from(u32::from(network) | 1),
            port: 20000 + u16::from(ip.octets()[3]),
            server: self.host().console.server.clone(),
            assets: self.host().console.assets.clone(),
        })
    }
}

/// What a Go caller's `Run` held, as far as the config tells: what
/// `Inspect` answers from (its CPU and memory) and a retried `Run`
/// compares with.
fn request_of(name: &VmName, m: &Machine) -> Vm {
    Vm {
        name: name.as_str().to_owned(),
        cpu: m.config.vcpu_count,
        memory: m.config.mem_size_mib << 20,
        network: VmNetworkInfo {
            ifaces: m
                .interfaces
                .iter()
                .map(|i| VmIface {
                    tap: i.host_dev_name.clone(),
                    mac: i.guest_mac.clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        },
        kernel_image: m.boot.kernel_image_path.clone(),
        initrd_image: m.boot.initrd_path.clone(),
        no_keep_alive: m.no_keep_alive,
        devices: m.devices.clone(),
        ..Default::default()
    }
}

/// A locally administered unicast MAC that depends only on the VM's name
/// and the interface: the same at every start.
fn stable_mac(name: &VmName, iface: usize) -> String {
    // FNV-1a: stable across builds, unlike std's hasher's keys.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.as_str().bytes().chain(std::iter::once(iface as u8)) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        (b[0] & 0xfe) | 0x02,
        b[1],
        b[2],
        b[3],
        b[4],
        b[5]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmdline(args: &[&str]) -> Vec<u8> {
        let mut v = Vec::new();
        for a in args {
            v.extend_from_slice(a.as_bytes());
            v.push(0);
        }
        v
    }

    #[test]
    fn the_go_rule_names_a_vmm_by_its_api_socket() {
        let sock = |a: &[&str]| api_socket_of(&cmdline(a));
        assert_eq!(
            sock(&[
                "cloud-hypervisor",
                "--kernel",
                "k",
                "--api-socket",
                "/run/ch/7-1-a"
            ]),
            Some("/run/ch/7-1-a".into())
        );
        assert_eq!(
            sock(&["cloud-hypervisor", "--api-socket=/run/ch/b"]),
            Some("/run/ch/b".into())
        );
        // A full path is not the Go rule's argv[0].
        assert_eq!(
            sock(&["/usr/bin/cloud-hypervisor", "--api-socket", "/x"]),
            None
        );
        assert_eq!(sock(&["cloud-hypervisor", "--kernel", "k"]), None);
        assert_eq!(sock(&["cloud-hypervisor", "--api-socket"]), None);
        assert_eq!(sock(&[]), None);
    }

    #[test]
    fn a_stable_mac_is_unicast_local_and_per_interface() {
        let n = VmName::new("7-1-a").unwrap();
        let a = stable_mac(&n, 0);
        assert_eq!(a, stable_mac(&n, 0));
        assert_ne!(a, stable_mac(&n, 1));
        let first = u8::from_str_radix(&a[..2], 16).unwrap();
        assert_eq!(first & 0x03, 0x02, "{a}");
    }
}
