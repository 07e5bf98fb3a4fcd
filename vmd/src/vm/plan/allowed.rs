//! Where a VM's host files may be: the paths a request names (kernel,
//! initrd, disks, shares) are attacker-influenced — they come from users'
//! deployments — so each is resolved (symlinks and `..` followed) and must
//! then be
//!
//! 1. under one of the allowed prefixes (`--allowed-path`; by default where
//!    a Zero-OS node keeps them: storage pools under `/mnt/<pool>` — volumes
//!    `/mnt/<pool>/<volume>`, virtual disks `/mnt/<pool>/vdisks/<id>` — and
//!    flists mounted under `/var/cache/modules/flistd/`, kernels and images
//!    included);
//! 2. outside vmd's own files (its root with every VM's console log and
//!    cloud-init seed, its runtime directory with every VM's spec, request
//!    and sockets, zinit's service files), and a shared directory may not
//!    contain them either;
//! 3. of the kind asked for: a regular file for a kernel, an initrd or a
//!    disk (no block or character device, pipe or socket: devices go
//!    through `Devices`), a directory for a share.
//!
//! A refused path says which rule refused it.

use std::path::{Path, PathBuf};

use super::super::error::{invalid, Invalid};
use super::checks::plain_path;

/// Where a Zero-OS node keeps what VMs use (`threefoldtech/zos`:
/// `pkg/storage` mounts pools at `/mnt/<name>`, vdisks live in the
/// `vdisks` volume of a pool; `flistd` mounts flists under
/// `/var/cache/modules/flistd/mountpoint/`).
pub const ZOS_ALLOWED: [&str; 2] = ["/mnt", "/var/cache/modules/flistd"];

/// What a path must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
}

/// The allowed prefixes, and vmd's own directories that stay out of reach.
#[derive(Debug, Clone)]
pub struct AllowedPaths {
    allowed: Vec<PathBuf>,
    own: Vec<PathBuf>,
}

/// A path as far as it resolves: the canonical form of what exists, the
/// rest as given (vmd's directories may not exist yet at start).
fn resolved(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned())
}

impl AllowedPaths {
    /// `allowed`: the prefixes a VM's files may be under; `own`: vmd's
    /// directories (root, runtime, zinit's), never reachable.
    pub fn new(allowed: &[PathBuf], own: &[&Path]) -> Self {
        AllowedPaths {
            allowed: allowed.iter().map(|p| resolved(p)).collect(),
            own: own.iter().map(|p| resolved(p)).collect(),
        }
    }

    /// Zero-OS's prefixes ([`ZOS_ALLOWED`]).
    pub fn zos(own: &[&Path]) -> Self {
        let allowed: Vec<PathBuf> = ZOS_ALLOWED.iter().map(PathBuf::from).collect();
        Self::new(&allowed, own)
    }

    /// Checks `given` (named `what` in errors) and returns the path to use:
    /// the resolved one, so that what was checked is what the VMM opens.
    pub fn check(&self, what: &str, given: &str, kind: Kind) -> Result<PathBuf, Invalid> {
        let path = plain_path(what, given)?;
        let real =
            std::fs::canonicalize(&path).or_else(|e| invalid(format!("{what} {given:?}: {e}")))?;
        if let Some(own) = self.own.iter().find(|o| real.starts_with(o)) {
            return invalid(format!(
                "{what} {given:?} is inside vmd's own files ({}): another VM's or vmd's, never a VM's to use",
                own.display()
            ));
        }
        if !self.allowed.iter().any(|a| real.starts_with(a)) {
            let list: Vec<String> = self
                .allowed
                .iter()
                .map(|a| a.display().to_string())
                .collect();
            return invalid(format!(
                "{what} {given:?}{} is outside the paths VMs may use ({}; --allowed-path)",
                if real == path {
                    String::new()
                } else {
                    format!(" (really {})", real.display())
                },
                list.join(", ")
            ));
        }
        let meta =
            std::fs::metadata(&real).or_else(|e| invalid(format!("{what} {given:?}: {e}")))?;
        match kind {
            Kind::File if meta.is_dir() => invalid(format!("{what} {given:?} is a directory")),
            Kind::File if !meta.is_file() => invalid(format!(
                "{what} {given:?} is not a regular file (a device, a pipe or a socket; PCI devices go through Devices)"
            )),
            Kind::Dir if !meta.is_dir() => {
                invalid(format!("{what} {given:?} is not a directory"))
            }
            Kind::Dir => match self.own.iter().find(|o| o.starts_with(&real)) {
                Some(own) => invalid(format!(
                    "{what} {given:?} contains vmd's own files ({})",
                    own.display()
                )),
                None => Ok(real),
            },
            Kind::File => Ok(real),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, AllowedPaths) {
        let t = tempfile::tempdir().unwrap();
        let p = t.path();
        for d in [
            "pool/vdisks",
            "pool/vol",
            "vmd/root/cloud-init",
            "vmd/run/vms/a",
        ] {
            std::fs::create_dir_all(p.join(d)).unwrap();
        }
        std::fs::write(p.join("pool/vdisks/d1"), "disk").unwrap();
        std::fs::write(p.join("vmd/root/cloud-init/a.img"), "seed").unwrap();
        std::fs::write(p.join("vmd/run/vms/a/request.json"), "{}").unwrap();
        std::fs::write(p.join("elsewhere"), "secret").unwrap();
        std::os::unix::fs::symlink(p.join("elsewhere"), p.join("pool/vdisks/link")).unwrap();
        std::os::unix::fs::symlink("/dev/null", p.join("pool/vdisks/null")).unwrap();
        let allowed = AllowedPaths::new(
            &[p.join("pool"), p.join("vmd")],
            &[&p.join("vmd/root"), &p.join("vmd/run")],
        );
        (t, allowed)
    }

    fn refusal(r: Result<PathBuf, Invalid>) -> String {
        r.unwrap_err().0
    }

    #[test]
    fn what_a_node_keeps_for_vms_is_accepted() {
        let (t, a) = setup();
        let d = t.path().join("pool/vdisks/d1");
        assert_eq!(a.check("disk", d.to_str().unwrap(), Kind::File).unwrap(), d);
        let v = t.path().join("pool/vol");
        assert_eq!(a.check("share", v.to_str().unwrap(), Kind::Dir).unwrap(), v);
    }

    #[test]
    fn each_rule_says_it_refused() {
        let (t, a) = setup();
        let p = |s: &str| t.path().join(s).to_string_lossy().into_owned();
        // Another VM's seed as a disk, its request as an initrd: vmd's own.
        let m = refusal(a.check("disk", &p("vmd/root/cloud-init/a.img"), Kind::File));
        assert!(m.contains("inside vmd's own files"), "{m}");
        let m = refusal(a.check("initrd", &p("vmd/run/vms/a/request.json"), Kind::File));
        assert!(m.contains("inside vmd's own files"), "{m}");
        // The same through `..` and through a symlink.
        let m = refusal(a.check("disk", &p("pool/../vmd/root/cloud-init/a.img"), Kind::File));
        assert!(m.contains("inside vmd's own files"), "{m}");
        let m = refusal(a.check("disk", &p("pool/vdisks/link"), Kind::File));
        assert!(
            m.contains("outside the paths VMs may use") && m.contains("really"),
            "{m}"
        );
        // Outside every prefix.
        let m = refusal(a.check("disk", "/etc/shadow", Kind::File));
        assert!(m.contains("outside the paths VMs may use"), "{m}");
        // A directory holding vmd's files is no share.
        let m = refusal(a.check("share", &p("vmd"), Kind::Dir));
        assert!(m.contains("contains vmd's own files"), "{m}");
        let m = refusal(a.check("share", "/", Kind::Dir));
        assert!(m.contains("outside"), "{m}");
        // Kinds.
        let m = refusal(a.check("disk", &p("pool/vol"), Kind::File));
        assert!(m.contains("is a directory"), "{m}");
        let m = refusal(a.check("share", &p("pool/vdisks/d1"), Kind::Dir));
        assert!(m.contains("not a directory"), "{m}");
        let m = refusal(a.check("disk", &p("pool/vdisks/missing"), Kind::File));
        assert!(m.contains("No such file"), "{m}");
    }

    #[test]
    fn a_device_is_no_disk_even_where_devices_are_allowed() {
        let a = AllowedPaths::new(&[PathBuf::from("/dev")], &[]);
        let m = refusal(a.check("disk", "/dev/null", Kind::File));
        assert!(m.contains("not a regular file"), "{m}");
    }
}
