//! A VM's config file in the Go VM module's format (zosbase
//! `pkg/vm/machine.go`), kept in its directory (`/var/run/cache/vmd/<name>`
//! on Zero-OS) for a roll-back: the Go module's monitor kills every
//! cloud-hypervisor it finds without a config there, and adopts those it
//! finds with one (`shared/spec/zos-node.md` §A, §C; docs/zero-os-node.md).
//!
//! Written with the VM's other files at Run, removed first thing at Delete.
//! Read only to take over a VM the Go module started ([`super::takeover`]):
//! then the file is the Go module's, and every field not needed is
//! optional, as Go's `encoding/json` has it.

use serde::{Deserialize, Serialize};
use vmd_runtime::spec::VmSpec;

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Machine {
    pub id: String,
    #[serde(rename = "boot-source")]
    pub boot: Boot,
    #[serde(default, deserialize_with = "null_default")]
    pub drives: Vec<Drive>,
    #[serde(default, deserialize_with = "null_default")]
    pub fs: Vec<VirtioFs>,
    #[serde(
        rename = "network-interfaces",
        default,
        deserialize_with = "null_default"
    )]
    pub interfaces: Vec<Interface>,
    #[serde(rename = "machine-config")]
    pub config: MachineConfig,
    #[serde(default, deserialize_with = "null_default")]
    pub devices: Vec<String>,
    #[serde(rename = "no-keep-alive", default)]
    pub no_keep_alive: bool,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Boot {
    pub kernel_image_path: String,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub initrd_path: String,
    #[serde(default)]
    pub boot_args: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Drive {
    #[serde(default)]
    pub drive_id: String,
    pub path_on_host: String,
    #[serde(default)]
    pub is_root_device: bool,
    #[serde(default)]
    pub is_read_only: bool,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct VirtioFs {
    #[serde(rename = "Tag")]
    pub tag: String,
    #[serde(rename = "Path")]
    pub path: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Interface {
    #[serde(default)]
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub guest_mac: String,
    /// Where the Go module's `cloud-console` serves this interface's
    /// console (private networks only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub console: Option<Console>,
}

/// A console's place, as the Go module keeps it (`net.IPNet`s: the IP as
/// text, the mask base64).
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Console {
    pub namespace: String,
    pub network_addr: GoIpNet,
    pub ip: GoIpNet,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct GoIpNet {
    #[serde(rename = "IP")]
    pub ip: String,
    #[serde(rename = "Mask", default)]
    pub mask: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct MachineConfig {
    pub vcpu_count: u8,
    pub mem_size_mib: u64,
    #[serde(default)]
    pub ht_enabled: bool,
}

/// Go writes a nil slice as `null`.
fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

fn text(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

impl Machine {
    /// The Go module's view of the VM `spec` describes. Drives are numbered
    /// from 1 in order (the boot disk, the disks, the cloud-init image last,
    /// read-only, as the Go module orders them); the first is the root
    /// device when the kernel boots from it.
    pub fn of(spec: &VmSpec) -> Machine {
        let boots_from_disk = spec.cmdline.split(' ').any(|a| a == "root=/dev/vda");
        Machine {
            id: spec.name.clone(),
            boot: Boot {
                kernel_image_path: text(&spec.kernel),
                initrd_path: spec.initramfs.as_deref().map(text).unwrap_or_default(),
                boot_args: spec.cmdline.clone(),
            },
            drives: spec
                .disks
                .iter()
                .enumerate()
                .map(|(i, d)| Drive {
                    drive_id: (i + 1).to_string(),
                    path_on_host: text(&d.path),
                    is_root_device: i == 0 && boots_from_disk,
                    is_read_only: d.readonly,
                })
                .collect(),
            fs: spec
                .shares
                .iter()
                .map(|s| VirtioFs {
                    tag: s.tag.clone(),
                    path: text(&s.source),
                })
                .collect(),
            interfaces: spec
                .nets
                .iter()
                .enumerate()
                .map(|(i, n)| Interface {
                    iface_id: format!("eth{i}"),
                    host_dev_name: n.tap.clone(),
                    guest_mac: n.mac.clone(),
                    console: None,
                })
                .collect(),
            config: MachineConfig {
                vcpu_count: spec.vcpus,
                mem_size_mib: spec.memory_mib,
                ht_enabled: false,
            },
            devices: spec.devices.clone(),
            no_keep_alive: !spec.keep_alive,
        }
    }

    /// The Go module's file, as it wrote it.
    pub fn parse(bytes: &[u8]) -> Result<Machine, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// One line of JSON, as the Go module writes it.
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).unwrap_or_default();
        v.push(b'\n');
        v
    }
}
