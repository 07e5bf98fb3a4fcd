//! What the request names on the host, looked at: files (the kernel, an
//! initrd), disk images (their format read from their header), taps and
//! PCI devices (in sysfs), and what other VMs already hold.

use std::collections::BTreeMap;
use std::path::Path;

use vmd_runtime::spec::{Disk, VmSpec};
use vmd_runtime::vmm::ImageFormat;
use vmd_runtime::VmName;

use super::super::error::{invalid, Invalid};
use super::allowed::{AllowedPaths, Kind};
use super::checks::{pci_address, tap_name};
use crate::api::Vm;

/// What VMs hold that one VM at a time may use: PCI devices (by address)
/// and writable disk images (by file, whatever path names it — two VMMs
/// writing one image corrupt it, and only v46+ locks images).
#[derive(Debug, Default)]
pub struct InUse {
    pub devices: BTreeMap<String, VmName>,
    pub disks: BTreeMap<FileId, VmName>,
}

/// A file by identity: (device, inode).
pub type FileId = (u64, u64);

pub fn file_id(path: &Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl InUse {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records what the VM of `spec` holds.
    pub fn add(&mut self, owner: &VmName, spec: &VmSpec) {
        for d in &spec.devices {
            self.devices.insert(d.clone(), owner.clone());
        }
        for d in spec.disks.iter().filter(|d| !d.readonly) {
            if let Some(id) = file_id(&d.path) {
                self.disks.insert(id, owner.clone());
            }
        }
    }
}

/// Whether Run must know what other VMs hold to check `vm`.
pub fn needs_in_use(vm: &Vm) -> bool {
    !vm.devices.is_empty()
        || !vm.disks.is_empty()
        || (vm.boot.kind == 0 && !vm.boot.path.is_empty())
}

/// A disk of the guest, with its format detected now — before the guest
/// ever ran, so nothing it writes can change how the VMM opens the image.
pub fn writable_disk(allowed: &AllowedPaths, what: &str, p: &str) -> Result<Disk, Invalid> {
    let path = allowed.check(what, p, Kind::File)?;
    let format = ImageFormat::detect(&path)
        .or_else(|e| invalid(format!("{what} {p:?} cannot be read: {e}")))?;
    Ok(Disk {
        path,
        readonly: false,
        format: Some(format),
    })
}

/// An existing tap device named `t`.
pub fn tap(t: &str, sys_net: &Path) -> Result<(), Invalid> {
    tap_name(t)?;
    let dev = sys_net.join(t);
    if !dev.exists() {
        return invalid(format!("tap device {t:?} does not exist"));
    }
    if !dev.join("tun_flags").exists() {
        return invalid(format!("network device {t:?} is not a tap"));
    }
    Ok(())
}

/// An existing PCI device at `id`.
pub fn pci(id: &str, sys_pci: &Path) -> Result<(), Invalid> {
    pci_address(id)?;
    if !sys_pci.join(id).exists() {
        return invalid(format!("PCI device {id} does not exist"));
    }
    Ok(())
}

/// The host's CPUs (a VM gets no more vCPUs).
pub fn host_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Writable disks that are one file twice, or another VM's.
/// `given`: each disk's path as the caller wrote it, for the errors.
pub fn disks_free(
    disks: &[Disk],
    given: &[String],
    name: &VmName,
    in_use: &InUse,
) -> Result<(), Invalid> {
    let mut own = BTreeMap::new();
    for (i, d) in disks.iter().enumerate() {
        let Some(id) = file_id(&d.path) else { continue };
        let shown = given
            .get(i)
            .map_or_else(|| d.path.display().to_string(), Clone::clone);
        if let Some(other) = own.insert(id, shown.clone()) {
            return invalid(format!("disk {shown} is the same file as {other}"));
        }
        if let Some(owner) = in_use.disks.get(&id).filter(|o| **o != *name) {
            return invalid(format!("disk {shown} is already used by vm {owner}"));
        }
    }
    Ok(())
}
