//! The cloud-init seed a Zero-OS guest configures itself from: a small FAT
//! image labelled `cidata`, attached read-only as the VM's last disk.
//!
//! * `meta-data` — instance id (the VM name) and hostname;
//! * `network-config` — netplan v2: one ethernet per interface, matched by
//!   MAC, static addresses with prefix, default gateways (from the public
//!   interfaces when there is one, else from all), routes, and the
//!   nameservers on the first interface;
//! * `user-data` — root's SSH keys (`Environment["SSH_KEY"]`, split on
//!   newlines and commas) and mounts of each disk and share `Target`;
//! * `zosrc` — a shell file: the environment as quoted `export`s, and the
//!   entrypoint as `init=<argv0>` plus `set -- <args>`.
//!
//! Everything is built as values and serialised (YAML) or quoted (shell):
//! a hostile value stays a value.

use std::collections::BTreeMap;
use std::io::{Seek, SeekFrom, Write};
use std::net::IpAddr;
use std::path::Path;

use serde::Serialize;

use super::error::{invalid, Invalid};
use crate::api::{Ip, IpNet, Vm};

/// Zero-OS's size for the seed image.
pub const IMAGE_SIZE: u64 = 2 << 20;
pub const LABEL: &str = "cidata";

/// The four files of the seed, by name.
pub type SeedFiles = BTreeMap<&'static str, String>;

/// `value` as one shell word, inside single quotes (`'` becomes `'\''`).
pub fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

fn addr(ip: &Ip) -> Option<IpAddr> {
    ip.addr()
}

/// `a.b.c.d/len` from an address and a mask; `None` when the mask is not
/// contiguous or does not fit the address.
fn cidr(net: &IpNet) -> Result<String, Invalid> {
    let ip = addr(&net.ip).ok_or("an address is not an IP")?;
    let mask = &net.mask.0;
    let bits = mask.len() * 8;
    let ones: usize = mask.iter().map(|b| b.count_ones() as usize).sum();
    let contiguous = mask
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| b >> i & 1))
        .skip_while(|&b| b == 1)
        .all(|b| b == 0);
    let family_bits = if ip.is_ipv4() { 32 } else { 128 };
    if !contiguous || (bits != family_bits && !(ip.is_ipv4() && bits == 128)) {
        return invalid(format!("mask of {ip} is not a valid prefix"));
    }
    // A 16-byte mask on an IPv4 address (Go's ::ffff: form) counts its
    // last 32 bits.
    let prefix = if ip.is_ipv4() && bits == 128 {
        ones.saturating_sub(96)
    } else {
        ones
    };
    Ok(format!("{ip}/{prefix}"))
}

#[derive(Serialize)]
struct Match {
    macaddress: String,
}

#[derive(Serialize)]
struct RouteCfg {
    to: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    via: Option<String>,
}

#[derive(Serialize)]
struct Nameservers {
    addresses: Vec<String>,
}

#[derive(Serialize)]
struct Ethernet {
    #[serde(rename = "match")]
    matching: Match,
    #[serde(rename = "set-name")]
    set_name: String,
    addresses: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gateway4: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gateway6: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    routes: Vec<RouteCfg>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nameservers: Option<Nameservers>,
}

#[derive(Serialize)]
struct NetworkConfig {
    version: u8,
    ethernets: BTreeMap<String, Ethernet>,
}

#[derive(Serialize)]
struct MetaData<'a> {
    #[serde(rename = "instance-id")]
    instance_id: &'a str,
    #[serde(rename = "local-hostname")]
    local_hostname: &'a str,
}

#[derive(Serialize)]
struct RootUser {
    name: &'static str,
    ssh_authorized_keys: Vec<String>,
}

#[derive(Serialize)]
struct UserData {
    users: Vec<RootUser>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    mounts: Vec<[String; 4]>,
}

fn yaml<T: Serialize>(v: &T) -> Result<String, Invalid> {
    serde_yaml_ng::to_string(v).map_err(|e| Invalid(e.to_string()))
}

/// The guest device name of the `i`-th disk (`vda`, `vdb`, …).
fn disk_device(i: usize) -> String {
    let mut name = String::new();
    let mut n = i;
    loop {
        name.insert(0, (b'a' + (n % 26) as u8) as char);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    format!("/dev/vd{name}")
}

/// The seed's files for `vm`.
pub fn seed_files(vm: &Vm) -> Result<SeedFiles, Invalid> {
    let mut files = SeedFiles::new();
    let hostname = if vm.hostname.is_empty() {
        &vm.name
    } else {
        &vm.hostname
    };
    files.insert(
        "meta-data",
        yaml(&MetaData {
            instance_id: &vm.name,
            local_hostname: hostname,
        })?,
    );

    let ifaces = &vm.network.ifaces;
    let any_public = ifaces.iter().any(|i| i.public_ipv4 || i.public_ipv6);
    let mut ethernets = BTreeMap::new();
    for (n, nic) in ifaces.iter().enumerate() {
        let gateways = !any_public || nic.public_ipv4 || nic.public_ipv6;
        let gw = |ip: &Ip| addr(ip).filter(|_| gateways).map(|a| a.to_string());
        let mut routes = Vec::new();
        for r in &nic.routes {
            routes.push(RouteCfg {
                to: cidr(&r.net)?,
                via: addr(&r.gateway).map(|a| a.to_string()),
            });
        }
        let nameservers = (n == 0 && !vm.network.nameservers.is_empty()).then(|| Nameservers {
            addresses: vm
                .network
                .nameservers
                .iter()
                .filter_map(addr)
                .map(|a| a.to_string())
                .collect(),
        });
        ethernets.insert(
            format!("eth{n}"),
            Ethernet {
                matching: Match {
                    macaddress: nic.mac.to_ascii_lowercase(),
                },
                set_name: format!("eth{n}"),
                addresses: nic.ips.iter().map(cidr).collect::<Result<_, _>>()?,
                gateway4: gw(&nic.ip4_default_gateway),
                gateway6: gw(&nic.ip6_default_gateway),
                routes,
                nameservers,
            },
        );
    }
    files.insert(
        "network-config",
        yaml(&NetworkConfig {
            version: 2,
            ethernets,
        })?,
    );

    let keys: Vec<String> = vm
        .environment
        .get("SSH_KEY")
        .map(|k| {
            k.split(['\n', ','])
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    // Disks in the guest: the boot disk (if any) is vda, then `Disks` in order.
    let first = usize::from(vm.boot.kind == 0 && !vm.boot.path.is_empty());
    let mut mounts = Vec::new();
    for (i, d) in vm.disks.iter().enumerate() {
        if !d.target.is_empty() {
            mounts.push([
                disk_device(first + i),
                d.target.clone(),
                "auto".into(),
                "defaults".into(),
            ]);
        }
    }
    for s in &vm.shared {
        if !s.target.is_empty() {
            mounts.push([
                s.id.clone(),
                s.target.clone(),
                "virtiofs".into(),
                "defaults".into(),
            ]);
        }
    }
    let user = yaml(&UserData {
        users: vec![RootUser {
            name: "root",
            ssh_authorized_keys: keys,
        }],
        mounts,
    })?;
    files.insert("user-data", format!("#cloud-config\n{user}"));

    let mut zosrc = String::new();
    for (k, v) in &vm.environment {
        zosrc.push_str(&format!("export {k}={}\n", shell_quote(v)));
    }
    if !vm.entrypoint.trim().is_empty() {
        let argv = shlex::split(&vm.entrypoint)
            .filter(|a| !a.is_empty())
            .ok_or_else(|| format!("entrypoint {:?} has unbalanced quotes", vm.entrypoint))?;
        zosrc.push_str(&format!("init={}\n", shell_quote(&argv[0])));
        let rest: Vec<String> = argv[1..].iter().map(|a| shell_quote(a)).collect();
        zosrc.push_str(&format!("set -- {}\n", rest.join(" ")).replace("set -- \n", "set --\n"));
    }
    files.insert("zosrc", zosrc);
    Ok(files)
}

/// Writes the FAT image holding `files` at `path` (sparse, 2 MiB), to be
/// synced by the caller. Not `files::write_atomic`: only the image's used
/// part is written, the rest of its 2 MiB left a hole, and the sync waits.
pub fn write_image(path: &Path, files: &SeedFiles) -> std::io::Result<Unsynced> {
    use std::os::unix::fs::OpenOptionsExt;
    let image = image(files)?;
    let tmp = vmd_runtime::files::temp_path(path);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&image)?;
    // The rest is zeros: a hole.
    f.set_len(IMAGE_SIZE)?;
    std::fs::rename(&tmp, path)?;
    Ok(Unsynced(f))
}

/// The seed's FAT image up to its last byte that is not zero (the volume
/// is `IMAGE_SIZE`). Built in memory: fatfs reads and writes sector by
/// sector, which straight to the file was 1 500 syscalls, most of a
/// millisecond of every Run.
fn image(files: &SeedFiles) -> std::io::Result<Vec<u8>> {
    let mut disk = Sparse::default();
    let mut label = [b' '; 11];
    label[..LABEL.len()].copy_from_slice(LABEL.as_bytes());
    fatfs::format_volume(
        &mut disk,
        fatfs::FormatVolumeOptions::new()
            .volume_label(label)
            .total_sectors((IMAGE_SIZE / 512) as u32),
    )?;
    disk.seek(SeekFrom::Start(0))?;
    {
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new())?;
        {
            let root = fs.root_dir();
            for (name, content) in files {
                let mut file = root.create_file(name)?;
                file.truncate()?;
                file.write_all(content.as_bytes())?;
            }
        }
        fs.unmount()?;
    }
    Ok(disk.written)
}

/// An `IMAGE_SIZE` disk in memory holding only what was written: the
/// rest reads as zeros, as the file's hole will. (A whole 2 MiB buffer
/// costs more in page faults than the syscalls it saves.)
#[derive(Default)]
struct Sparse {
    written: Vec<u8>,
    pos: u64,
}

impl std::io::Read for Sparse {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(IMAGE_SIZE.saturating_sub(self.pos) as usize);
        let pos = self.pos as usize;
        let have = self.written.len().saturating_sub(pos).min(n);
        buf[..have].copy_from_slice(&self.written[pos.min(self.written.len())..][..have]);
        buf[have..n].fill(0);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for Sparse {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let end = self.pos + buf.len() as u64;
        if end > IMAGE_SIZE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                "the seed does not fit its image",
            ));
        }
        let (pos, end) = (self.pos as usize, end as usize);
        if self.written.len() < end {
            self.written.resize(end, 0);
        }
        self.written[pos..end].copy_from_slice(buf);
        self.pos = end as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Seek for Sparse {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(d) => IMAGE_SIZE.checked_add_signed(d),
        };
        match pos {
            Some(p) if p <= IMAGE_SIZE => {
                self.pos = p;
                Ok(p)
            }
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a seek outside the seed image",
            )),
        }
    }
}

/// A seed image in place but maybe not on disk yet: the VMM reads it
/// through the page cache at once, so Run syncs it beside the VM's start
/// rather than before it (a few ms of every Run on a busy disk), and waits
/// for it only before the VM exists (its commit).
#[must_use = "sync it before the VM is committed"]
pub struct Unsynced(std::fs::File);

impl Unsynced {
    /// Syncs on a blocking thread.
    pub fn sync_later(self) -> tokio::task::JoinHandle<std::io::Result<()>> {
        tokio::task::spawn_blocking(move || self.0.sync_all())
    }

    /// Syncs now.
    pub fn sync(self) -> std::io::Result<()> {
        self.0.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn the_sparse_disk_reads_zeros_where_nothing_was_written() {
        let mut disk = Sparse::default();
        disk.seek(SeekFrom::Start(10)).unwrap();
        disk.write_all(b"ab").unwrap();
        assert_eq!(disk.written.len(), 12);
        disk.seek(SeekFrom::Start(8)).unwrap();
        let mut buf = [9u8; 8];
        disk.read_exact(&mut buf).unwrap();
        assert_eq!(buf, [0, 0, b'a', b'b', 0, 0, 0, 0]);
        // Its size is the image's: the end reads as the end.
        assert_eq!(disk.seek(SeekFrom::End(-1)).unwrap(), IMAGE_SIZE - 1);
        assert_eq!(disk.read(&mut buf).unwrap(), 1);
        assert_eq!(disk.read(&mut buf).unwrap(), 0);
        assert!(disk.write_all(b"x").is_err(), "a write past the end");
        assert!(disk.seek(SeekFrom::End(1)).is_err());
        assert!(disk
            .seek(SeekFrom::Current(-(IMAGE_SIZE as i64) - 1))
            .is_err());
    }

    #[test]
    fn a_seed_larger_than_its_image_is_an_error() {
        let files = SeedFiles::from([("zosrc", "x".repeat(IMAGE_SIZE as usize))]);
        assert!(image(&files).is_err());
    }

    #[test]
    fn shell_quoting_keeps_everything_literal() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("$(rm -rf /)"), "'$(rm -rf /)'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn devices_and_prefixes() {
        assert_eq!(disk_device(0), "/dev/vda");
        assert_eq!(disk_device(25), "/dev/vdz");
        assert_eq!(disk_device(26), "/dev/vdaa");
        let net = |ip: &[u8], mask: &[u8]| IpNet {
            ip: Ip(serde_bytes::ByteBuf::from(ip.to_vec())),
            mask: Ip(serde_bytes::ByteBuf::from(mask.to_vec())),
        };
        assert_eq!(
            cidr(&net(&[10, 0, 0, 5], &[255, 255, 255, 0])).unwrap(),
            "10.0.0.5/24"
        );
        assert!(cidr(&net(&[10, 0, 0, 5], &[255, 0, 255, 0])).is_err());
        assert!(cidr(&net(&[10, 0, 0, 5], &[255, 255])).is_err());
    }
}
