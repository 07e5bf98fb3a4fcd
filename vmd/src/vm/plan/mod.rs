//! From a `Vm` as a caller sent it to everything Run writes — the shim's
//! `VmSpec`, the cloud-init seed, the zinit service — or a clear reason why
//! not, before anything is written: [`checks`] of the request's own text,
//! then [`host_files`], what it names on the host (kernel, disks, taps, PCI
//! devices) and what other VMs hold.

pub mod allowed;
pub mod checks;
pub mod host_files;

use std::path::{Path, PathBuf};

use vmd_runtime::name::is_word_char;
use vmd_runtime::spec::{ConsoleSpec, Disk, Net, RestartPolicy, Share, VmSpec, SPEC_VERSION};
use vmd_runtime::vmm::ImageFormat;
use vmd_runtime::VmName;

use super::cmdline::{kernel_cmdline, DISK_DEFAULTS, VIRTIOFS_DEFAULTS};
use super::error::{invalid, Invalid};
use super::host::Host;
use crate::api::Vm;
use allowed::{AllowedPaths, Kind};
use checks::{ip, mac, target};
use host_files::{disks_free, host_cpus, pci, tap, writable_disk};
pub use host_files::{file_id, needs_in_use, FileId, InUse};

/// Zero-OS's minimum.
pub const MIN_MEMORY: u64 = 250 << 20;

/// Operator settings that shape every VM.
#[derive(Debug, Clone)]
pub struct Settings {
    pub grace_secs: u64,
    pub restart: RestartPolicy,
    pub log_rotate_bytes: u64,
    pub log_keep_bytes: u64,
    /// Where tap devices are looked up (`/sys/class/net`).
    pub sys_net: PathBuf,
    /// Where PCI devices are looked up (`/sys/bus/pci/devices`).
    pub sys_pci: PathBuf,
    /// Log streams of one VM, and of the host, at most: each is a process
    /// and a zinit service, and a spec's caller chooses how many.
    pub max_streams_per_vm: usize,
    pub max_streams: usize,
    /// Where a VM's kernel, initrd, disks and shares may be on the host
    /// (see [`allowed`]).
    pub allowed_paths: Vec<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            grace_secs: 30,
            restart: RestartPolicy::default(),
            log_rotate_bytes: ConsoleSpec::ZOS_ROTATE,
            log_keep_bytes: ConsoleSpec::ZOS_KEEP,
            sys_net: "/sys/class/net".into(),
            sys_pci: "/sys/bus/pci/devices".into(),
            max_streams_per_vm: 16,
            max_streams: 1024,
            allowed_paths: allowed::ZOS_ALLOWED.iter().map(PathBuf::from).collect(),
        }
    }
}

/// What Run writes for a VM.
#[derive(Debug)]
pub struct Plan {
    pub name: VmName,
    pub spec: VmSpec,
    /// The files of the cloud-init seed, written at start as the last disk.
    pub seed: super::cloudinit::SeedFiles,
    /// The zinit service running the VM's shim.
    pub service: zinit::Service,
}

/// Validates `vm` against Zero-OS's rules and stricter ones of vmd, and
/// plans what runs it. A PCI device or a writable disk `in_use` by another
/// VM is refused: they belong to one VM at a time.
pub fn plan(vm: &Vm, host: &Host, settings: &Settings, in_use: &InUse) -> Result<Plan, Invalid> {
    let name = VmName::new(&vm.name)?;
    name.check_new()?;
    let paths = &host.paths;
    let run = paths.run_dir(&name);
    size(vm)?;
    let zinit_dir = host.zinit_dir.as_path();
    let mut own = vec![
        paths.root(),
        paths.runtime(),
        zinit_dir,
        host.api_socket_dir.as_path(),
    ];
    if let Some(d) = &host.go_config_dir {
        own.push(d.as_path());
    }
    let allowed = AllowedPaths::new(&settings.allowed_paths, &own);
    let kernel = allowed.check("kernel image", &vm.kernel_image, Kind::File)?;
    let initramfs = match vm.initrd_image.as_str() {
        "" => None,
        p => Some(allowed.check("initrd image", p, Kind::File)?),
    };
    let Storage {
        mut disks,
        given,
        shares,
        defaults,
    } = storage(vm, &run, &allowed)?;
    if !shares.is_empty() && host.virtiofsd.is_none() {
        return invalid("virtio-fs needs virtiofsd, which is not installed (--virtiofsd)".into());
    }
    disks_free(&disks, &given, &name, in_use)?;
    let nets = network(vm, &settings.sys_net)?;
    for d in &vm.devices {
        pci(d, &settings.sys_pci)?;
        if let Some(owner) = in_use.devices.get(d).filter(|o| **o != name) {
            return invalid(format!("PCI device {d} is already used by vm {owner}"));
        }
    }
    guest_settings(vm)?;
    let cmdline = kernel_cmdline(defaults, &vm.kernel_args)?;
    let seed = super::cloudinit::seed_files(vm)?;
    // Zero-OS order: boot disk, `Disks`, then the seed, read-only.
    disks.push(Disk {
        path: paths.seed(&name),
        readonly: true,
        // vmd writes it: a FAT image, no header.
        format: Some(ImageFormat::Raw),
    });
    let spec = VmSpec {
        version: SPEC_VERSION,
        name: name.as_str().to_owned(),
        hypervisor: host.hypervisor.clone(),
        hypervisor_release: None,
        virtiofsd: host.virtiofsd.clone().unwrap_or_else(|| "virtiofsd".into()),
        vcpus: vm.cpu,
        memory_mib: vm.memory >> 20,
        kernel,
        initramfs,
        cmdline,
        disks,
        nets,
        shares,
        devices: vm.devices.clone(),
        keep_alive: !vm.no_keep_alive,
        grace_secs: settings.grace_secs,
        restart: settings.restart,
        console: ConsoleSpec {
            log: paths.log(&name),
            rotate_bytes: settings.log_rotate_bytes,
            keep_bytes: settings.log_keep_bytes,
        },
        web_console: None,
        api_socket: Some(host.api_socket_dir.join(name.as_str())),
        go_config: host.go_config_dir.as_ref().map(|d| d.join(name.as_str())),
        adopted: None,
        jail: jail_of(host, &vm.devices),
        tap_netns: host.tap_netns.clone(),
    };
    spec.validate().map_err(|e| Invalid(e.to_string()))?;
    let service = service_file(host, settings, &run)?;
    Ok(Plan {
        name,
        spec,
        seed,
        service,
    })
}

/// The VM's user on this host; its VMM jailed unless the VM has PCI
/// devices: VFIO needs `/dev/vfio`, the devices' sysfs and locked memory,
/// which a jail of only the VM's files does not give (docs/security.md).
pub fn jail_of(host: &Host, devices: &[String]) -> Option<vmd_runtime::spec::JailSpec> {
    host.jail.clone().map(|j| vmd_runtime::spec::JailSpec {
        confine_vmm: devices.is_empty(),
        ..j
    })
}

/// Zero-OS's memory minimum, and no more vCPUs than the host has.
fn size(vm: &Vm) -> Result<(), Invalid> {
    if vm.memory < MIN_MEMORY {
        return invalid(format!(
            "memory {} bytes is below the minimum of 250 MiB",
            vm.memory
        ));
    }
    let cpus = host_cpus();
    if vm.cpu == 0 || usize::from(vm.cpu) > cpus {
        return invalid(format!(
            "cpu {} must be between 1 and {cpus} (host cpus)",
            vm.cpu
        ));
    }
    Ok(())
}

/// The boot disk and `Disks` (without the seed), the virtio-fs shares (the
/// root first when the VM boots from one), and the kernel arguments that go
/// with the boot.
struct Storage {
    disks: Vec<Disk>,
    /// Each disk's path as the caller gave it (what errors name).
    given: Vec<String>,
    shares: Vec<Share>,
    defaults: &'static [(&'static str, &'static str)],
}

fn storage(vm: &Vm, run: &vmd_runtime::RunDir, allowed: &AllowedPaths) -> Result<Storage, Invalid> {
    let mut disks = Vec::new();
    let mut given = Vec::new();
    let mut shares = Vec::new();
    let defaults = match vm.boot.kind {
        0 => {
            if !vm.boot.path.is_empty() {
                disks.push(writable_disk(allowed, "boot disk", &vm.boot.path)?);
                given.push(vm.boot.path.clone());
            }
            DISK_DEFAULTS
        }
        1 => {
            let root = allowed.check("virtio-fs root", &vm.boot.path, Kind::Dir)?;
            add_share(&mut shares, run, "vroot", root)?;
            VIRTIOFS_DEFAULTS
        }
        k => return invalid(format!("unknown boot type {k} (0: disk, 1: virtio-fs)")),
    };
    for d in &vm.disks {
        target("disk", &d.target)?;
        disks.push(writable_disk(allowed, "disk", &d.path)?);
        given.push(d.path.clone());
    }
    for s in &vm.shared {
        target("share", &s.target)?;
        let source = allowed.check("share path", &s.path, Kind::Dir)?;
        add_share(&mut shares, run, &s.id, source)?;
    }
    Ok(Storage {
        disks,
        given,
        shares,
        defaults,
    })
}

/// Adds share `tag` of host directory `source` (checked), served on the run
/// dir's next virtio-fs socket.
fn add_share(
    shares: &mut Vec<Share>,
    run: &vmd_runtime::RunDir,
    tag: &str,
    source: PathBuf,
) -> Result<(), Invalid> {
    // virtio-fs tags are at most 36 bytes; they end up on command lines.
    let ok = !tag.is_empty() && tag.len() <= 36 && tag.chars().all(is_word_char);
    if !ok {
        return invalid(format!(
            "invalid share id {tag:?}: 1-36 letters, digits, '-', '_' or '.'"
        ));
    }
    if shares.iter().any(|s| s.tag == tag) {
        return invalid(format!("share id {tag:?} is used twice"));
    }
    shares.push(Share {
        tag: tag.to_owned(),
        socket: run.share_socket(shares.len()),
        source,
    });
    Ok(())
}

/// The interfaces (existing taps, MACs, well-formed addresses and routes)
/// and the nameservers.
fn network(vm: &Vm, sys_net: &Path) -> Result<Vec<Net>, Invalid> {
    let mut nets = Vec::new();
    for (i, nic) in vm.network.ifaces.iter().enumerate() {
        tap(&nic.tap, sys_net)?;
        mac(&nic.mac)?;
        for (j, n) in nic.ips.iter().enumerate() {
            ip(&format!("interface {i} address {j}"), &n.ip, true)?;
            ip(&format!("interface {i} address {j} mask"), &n.mask, true)?;
        }
        for (j, r) in nic.routes.iter().enumerate() {
            ip(&format!("interface {i} route {j}"), &r.net.ip, true)?;
            ip(
                &format!("interface {i} route {j} gateway"),
                &r.gateway,
                false,
            )?;
        }
        ip(
            &format!("interface {i} IPv4 gateway"),
            &nic.ip4_default_gateway,
            false,
        )?;
        ip(
            &format!("interface {i} IPv6 gateway"),
            &nic.ip6_default_gateway,
            false,
        )?;
        nets.push(Net {
            tap: nic.tap.clone(),
            mac: nic.mac.to_ascii_lowercase(),
        });
    }
    for (i, n) in vm.network.nameservers.iter().enumerate() {
        ip(&format!("nameserver {i}"), n, true)?;
    }
    Ok(nets)
}

/// What the guest configures from its seed: environment names and hostname.
fn guest_settings(vm: &Vm) -> Result<(), Invalid> {
    for k in vm.environment.keys() {
        let ok = k.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return invalid(format!("invalid environment variable name {k:?}"));
        }
    }
    let h = &vm.hostname;
    let bad_hostname = h.len() > 63
        || !h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        || h.starts_with('-');
    if !h.is_empty() && bad_hostname {
        return invalid(format!("invalid hostname {h:?}"));
    }
    Ok(())
}

/// The zinit service that runs the shim of the VM in `run`.
pub(crate) fn service_file(
    host: &Host,
    settings: &Settings,
    run: &vmd_runtime::RunDir,
) -> Result<zinit::Service, Invalid> {
    let exec = zinit::Command::new([
        host.shim.to_string_lossy().into_owned(),
        "--dir".to_owned(),
        run.path().to_string_lossy().into_owned(),
    ])
    .map_err(|e| Invalid(e.to_string()))?;
    let mut svc = zinit::Service::new(exec);
    // At system shutdown zinit waits this long for the graceful stop.
    svc.shutdown_timeout = Some(settings.grace_secs + 10);
    Ok(svc)
}
