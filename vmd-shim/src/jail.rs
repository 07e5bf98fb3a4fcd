//! The VMM's jail, after firecracker's jailer: a guest that escapes into
//! cloud-hypervisor finds itself
//!
//! * under a uid (and a group of the same number) of its own, one per VM,
//!   taken from a range no other process uses: it cannot signal, trace or
//!   write to anything of another VM or of the host, and without
//!   capabilities it cannot change that;
//! * in a mount namespace whose root is an empty, read-only tmpfs holding
//!   only the VM's own files — kernel, initrd, disks, the shares' sockets,
//!   its API socket's directory, `/dev/kvm`, `/dev/null`, `/dev/urandom`
//!   and the hypervisor binary (with the system's libraries only if it is
//!   linked dynamically) — each at the path its command line names, so the
//!   command line is the same jailed or not (the Go VM module's `/proc`
//!   rule and `vm.info` see what they always saw).
//!
//! The uid is taken by locking `<lock_dir>/<uid>` (a lock dies with its
//! shim, so a uid never leaks), starting from a hash of the VM's name so a
//! VM usually gets the same one back. The shim keeps the lock for its whole
//! life: every restart of the VMM runs as the same user.
//!
//! What the VMM must open and its user may not is made so: a disk (only
//! this VM's: vmd refuses another VM's writable disk) is given to the
//! user; a kernel or initrd it may not read (they are often shared) is
//! copied for it into the run directory; the shares' sockets, which the
//! shim's virtiofsd created, are given to it.
//!
//! Everything that mounts runs between fork and exec ([`View::enter`]) on
//! data prepared here.

use std::ffi::{CString, OsStr};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use vmd_runtime::process::say;
use vmd_runtime::spec::{JailSpec, VmSpec};
use vmd_runtime::RunDir;

/// Why a VMM could not be jailed.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("no free uid for the VMM in {first}..={last} ({} VMMs hold them all)", .last - .first + 1)]
    NoUid { first: u32, last: u32 },
    #[error("cannot lock the VMM's uid in {}: {source}", .dir.display())]
    Lock {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot prepare {} for the VMM's user: {source}", .path.display())]
    Prepare {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the VMM's user {uid} cannot execute {} (mode {mode:o}): make it executable by all", .path.display())]
    NotExecutable { path: PathBuf, uid: u32, mode: u32 },
    #[error("{} is inside the API socket's directory {}, which the VMM gets a directory of its own for", .path.display(), .dir.display())]
    InApiDir { path: PathBuf, dir: PathBuf },
    #[error("a path with a NUL byte: {}", .0.display())]
    Nul(PathBuf),
}

/// The uid a shim took for its VMMs, held until the shim exits.
pub struct Lease {
    pub uid: u32,
    _lock: std::fs::File,
}

/// FNV-1a: a stable hash, so a VM gets the same uid back across shims and
/// vmd versions.
fn fnv1a(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

impl Lease {
    /// Takes the first free uid of the range, from the name's hash on.
    pub fn take(jail: &JailSpec, name: &str) -> Result<Lease, JailError> {
        let lock_err = |source| JailError::Lock {
            dir: jail.lock_dir.clone(),
            source,
        };
        vmd_runtime::files::create_dir(&jail.lock_dir, 0o700).map_err(lock_err)?;
        let n = jail.uids.max(1);
        let start = fnv1a(name) % n;
        for i in 0..n {
            let uid = jail.first_uid + (start + i) % n;
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(jail.lock_dir.join(uid.to_string()))
                .map_err(lock_err)?;
            // SAFETY: flock on a descriptor this process owns.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(Lease { uid, _lock: f });
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(lock_err(e));
            }
        }
        Err(JailError::NoUid {
            first: jail.first_uid,
            last: jail.first_uid + n - 1,
        })
    }
}

/// How a path is bound into the view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read only, nothing executable (kernel, initrd, read-only disks).
    Read,
    /// Read and write, nothing executable (disks, sockets, the API dir).
    Write,
    /// Read only and executable (the hypervisor, system libraries).
    Exec,
    /// A device node (read and write).
    Device,
}

impl Access {
    fn flags(self) -> libc::c_ulong {
        let base = libc::MS_NOSUID;
        match self {
            Access::Read => base | libc::MS_RDONLY | libc::MS_NODEV | libc::MS_NOEXEC,
            Access::Write => base | libc::MS_NODEV | libc::MS_NOEXEC,
            Access::Exec => base | libc::MS_RDONLY | libc::MS_NODEV,
            Access::Device => base | libc::MS_NOEXEC,
        }
    }
}

/// One thing the view holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// `source` on the host, bound at `path` in the view.
    Bind {
        path: PathBuf,
        source: PathBuf,
        dir: bool,
        access: Access,
    },
    /// A symbolic link at `path` to `target`.
    Link { path: PathBuf, target: PathBuf },
}

impl Entry {
    fn path(&self) -> &Path {
        match self {
            Entry::Bind { path, .. } | Entry::Link { path, .. } => path,
        }
    }
}

/// One step of building the view, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Dir(PathBuf),
    File(PathBuf),
    Bind {
        source: PathBuf,
        target: PathBuf,
        flags: libc::c_ulong,
    },
    Link {
        target: PathBuf,
        path: PathBuf,
    },
}

/// The steps that build `entries` under `root`: each entry's parent
/// directories once, in order, then its mount point and mount (or link).
/// An entry under a directory another entry binds, or under a link, is
/// left out: the directory or link already gives the VMM what is there.
pub fn steps(root: &Path, entries: &[Entry]) -> Vec<Step> {
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    let mut made: Vec<PathBuf> = Vec::new();
    let mut out = Vec::new();
    for e in entries {
        let path = e.path();
        let covered = entries.iter().any(|o| {
            !std::ptr::eq(o, e)
                && path.starts_with(o.path())
                && path != o.path()
                && matches!(o, Entry::Bind { dir: true, .. } | Entry::Link { .. })
        });
        if covered || made.iter().any(|m| m == path) {
            continue;
        }
        let mut parents: Vec<&Path> = path.ancestors().skip(1).collect();
        parents.reverse();
        for p in parents {
            if p == Path::new("/") || made.iter().any(|m| m == p) {
                continue;
            }
            made.push(p.to_owned());
            out.push(Step::Dir(inside(p)));
        }
        made.push(path.to_owned());
        match e {
            Entry::Bind {
                source,
                dir,
                access,
                ..
            } => {
                out.push(if *dir {
                    Step::Dir(inside(path))
                } else {
                    Step::File(inside(path))
                });
                out.push(Step::Bind {
                    source: source.clone(),
                    target: inside(path),
                    flags: access.flags(),
                });
            }
            Entry::Link { target, .. } => out.push(Step::Link {
                target: target.clone(),
                path: inside(path),
            }),
        }
    }
    out
}

/// The steps with their paths as C strings, ready for the child.
#[derive(Debug)]
enum CStep {
    Dir(CString),
    File(CString),
    Bind {
        source: CString,
        target: CString,
        flags: libc::c_ulong,
    },
    Link {
        target: CString,
        path: CString,
    },
}

fn cstr(p: &Path) -> Result<CString, JailError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| JailError::Nul(p.to_owned()))
}

/// A VMM's jail, ready to be entered by the child.
#[derive(Debug)]
pub struct View {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: the group of `/dev/kvm` where it is not open
    /// to all.
    pub groups: Vec<u32>,
    root: CString,
    steps: Vec<CStep>,
}

/// Whether `uid` (in `groups`) may `need` (rwx bits) `meta`.
fn may(meta: &std::fs::Metadata, uid: u32, groups: &[u32], need: u32) -> bool {
    let mode = meta.mode();
    let bits = if meta.uid() == uid {
        mode >> 6
    } else if groups.contains(&meta.gid()) {
        mode >> 3
    } else {
        mode
    } & 7;
    bits & need == need
}

const R: u32 = 4;
const W: u32 = 2;
const X: u32 = 1;

/// Whether `program` needs the system's libraries: a dynamically linked
/// ELF (it names an interpreter) or a script.
fn needs_system(program: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    // Only the headers are read: the binary itself can be tens of MiB,
    // and this runs at every start of the VMM.
    let Ok(mut f) = std::fs::File::open(program) else {
        return true;
    };
    let mut head = [0u8; 64];
    if f.read_exact(&mut head).is_err() {
        // Shorter than an ELF header: a script, or nothing runnable.
        return true;
    }
    if head.starts_with(b"#!") || !head.starts_with(b"\x7fELF") || head[4] != 2 {
        return true;
    }
    let u16_at = |o: usize| usize::from(u16::from_le_bytes([head[o], head[o + 1]]));
    let phoff = u64::from_le_bytes(head[0x20..0x28].try_into().unwrap_or_default());
    let (size, count) = (u16_at(0x36), u16_at(0x38));
    let mut table = vec![0u8; (size * count).min(64 << 10)];
    if size < 4 || f.seek(SeekFrom::Start(phoff)).is_err() || f.read_exact(&mut table).is_err() {
        return true;
    }
    // PT_INTERP: it names a dynamic loader.
    table
        .chunks(size)
        .any(|ph| ph.get(..4) == Some(&3u32.to_le_bytes()[..]))
}

/// The system's library directories as the host has them: links where
/// the host has links (merged /usr), read-only binds where it has
/// directories.
fn system_entries() -> Vec<Entry> {
    let mut out = Vec::new();
    for p in [
        "/lib",
        "/lib64",
        "/lib32",
        "/usr/lib",
        "/usr/lib64",
        "/usr/lib32",
        "/bin",
        "/usr/bin",
    ] {
        let path = PathBuf::from(p);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                if let Ok(target) = std::fs::read_link(&path) {
                    out.push(Entry::Link { path, target });
                }
            }
            Ok(m) if m.is_dir() => out.push(Entry::Bind {
                source: path.clone(),
                path,
                dir: true,
                access: Access::Exec,
            }),
            _ => {}
        }
    }
    out
}

impl View {
    /// Prepares the jail of the VMM of `spec` for user `lease`: files made
    /// accessible to it, the API socket's directory, the steps.
    pub fn prepare(spec: &VmSpec, run: &RunDir, lease: &Lease) -> Result<View, JailError> {
        let uid = lease.uid;
        let gid = uid;
        let prep = |path: &Path| {
            let path = path.to_owned();
            move |source| JailError::Prepare { path, source }
        };
        let mut groups = Vec::new();
        let mut entries = Vec::new();
        for dev in ["/dev/kvm", "/dev/null", "/dev/urandom"] {
            let Ok(meta) = std::fs::metadata(dev) else {
                continue;
            };
            if !may(&meta, uid, &[], R | W) && may(&meta, u32::MAX, &[meta.gid()], R | W) {
                groups.push(meta.gid());
            }
            entries.push(Entry::Bind {
                path: dev.into(),
                source: dev.into(),
                dir: false,
                access: Access::Device,
            });
        }
        let hv = &spec.hypervisor;
        let meta = std::fs::metadata(hv).map_err(prep(hv))?;
        if !may(&meta, uid, &groups, X) {
            return Err(JailError::NotExecutable {
                path: hv.clone(),
                uid,
                mode: meta.mode() & 0o7777,
            });
        }
        entries.push(Entry::Bind {
            path: hv.clone(),
            source: hv.clone(),
            dir: false,
            access: Access::Exec,
        });
        // The API socket: the VMM creates it in a directory of its own,
        // which the view has where the command line names it; on the
        // host, the socket's path is a link into that directory.
        let api = spec.api_socket_in(run);
        let own = run.path().join("vmm");
        let api_dir = api.parent().unwrap_or(Path::new("/")).to_owned();
        vmd_runtime::files::create_dir(&own, 0o700).map_err(prep(&own))?;
        std::os::unix::fs::chown(&own, Some(uid), Some(gid)).map_err(prep(&own))?;
        let file = api.file_name().unwrap_or(OsStr::new("api.sock"));
        for stale in [own.join(file), own.join(lock_name(file))] {
            vmd_runtime::files::remove_file(&stale).map_err(prep(&stale))?;
        }
        vmd_runtime::files::create_dir(&api_dir, 0o700).map_err(prep(&api_dir))?;
        // `Vmm::start` removed what was at `api` before.
        std::os::unix::fs::symlink(own.join(file), &api).map_err(prep(&api))?;
        entries.push(Entry::Bind {
            path: api_dir.clone(),
            source: own.clone(),
            dir: true,
            access: Access::Write,
        });
        let copies = run.path().join("vmm-files");
        let mut read = vec![("kernel", spec.kernel.clone())];
        if let Some(i) = &spec.initramfs {
            read.push(("initrd", i.clone()));
        }
        for (what, path) in read {
            let meta = std::fs::metadata(&path).map_err(prep(&path))?;
            let source = if may(&meta, uid, &groups, R) {
                path.clone()
            } else {
                copy_for(&path, &copies.join(what), uid, gid)?
            };
            entries.push(Entry::Bind {
                path,
                source,
                dir: false,
                access: Access::Read,
            });
        }
        for d in &spec.disks {
            let need = if d.readonly { R } else { R | W };
            give(&d.path, uid, gid, &groups, need)?;
            entries.push(Entry::Bind {
                path: d.path.clone(),
                source: d.path.clone(),
                dir: false,
                access: if d.readonly {
                    Access::Read
                } else {
                    Access::Write
                },
            });
        }
        for s in &spec.shares {
            // Connecting to a socket takes write permission on it.
            std::os::unix::fs::chown(&s.socket, Some(uid), Some(gid)).map_err(prep(&s.socket))?;
            entries.push(Entry::Bind {
                path: s.socket.clone(),
                source: s.socket.clone(),
                dir: false,
                access: Access::Write,
            });
        }
        for e in &entries {
            if e.path().starts_with(&api_dir) && e.path() != api_dir {
                return Err(JailError::InApiDir {
                    path: e.path().to_owned(),
                    dir: api_dir,
                });
            }
        }
        if needs_system(hv) {
            entries.extend(system_entries());
        }
        let root = run.path().join("jail");
        vmd_runtime::files::create_dir(&root, 0o755).map_err(prep(&root))?;
        let steps = steps(&root, &entries)
            .iter()
            .map(|s| {
                Ok(match s {
                    Step::Dir(p) => CStep::Dir(cstr(p)?),
                    Step::File(p) => CStep::File(cstr(p)?),
                    Step::Bind {
                        source,
                        target,
                        flags,
                    } => CStep::Bind {
                        source: cstr(source)?,
                        target: cstr(target)?,
                        flags: *flags,
                    },
                    Step::Link { target, path } => CStep::Link {
                        target: cstr(target)?,
                        path: cstr(path)?,
                    },
                })
            })
            .collect::<Result<_, JailError>>()?;
        Ok(View {
            uid,
            gid,
            groups,
            root: cstr(&root)?,
            steps,
        })
    }

    /// Builds the view in a new mount namespace and makes it the root.
    ///
    /// # Safety
    /// To be called only in the child between fork and exec: raw system
    /// calls on data prepared before the fork.
    pub unsafe fn enter(&self) -> std::io::Result<()> {
        let err = std::io::Error::last_os_error;
        let null = std::ptr::null::<libc::c_char>();
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(err());
        }
        // Nothing mounted here reaches the host, nor the host's later
        // mounts the view.
        if libc::mount(
            null,
            c"/".as_ptr(),
            null,
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(err());
        }
        let tmpfs_flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        if libc::mount(
            c"vmd-jail".as_ptr(),
            self.root.as_ptr(),
            c"tmpfs".as_ptr(),
            tmpfs_flags,
            c"mode=0755,size=64k,nr_inodes=1024".as_ptr().cast(),
        ) != 0
        {
            return Err(err());
        }
        for s in &self.steps {
            match s {
                CStep::Dir(p) => {
                    if libc::mkdir(p.as_ptr(), 0o755) != 0
                        && *libc::__errno_location() != libc::EEXIST
                    {
                        return Err(err());
                    }
                }
                CStep::File(p) => {
                    let fd = libc::open(
                        p.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                        0o644,
                    );
                    if fd < 0 {
                        return Err(err());
                    }
                    libc::close(fd);
                }
                CStep::Bind {
                    source,
                    target,
                    flags,
                } => {
                    if libc::mount(
                        source.as_ptr(),
                        target.as_ptr(),
                        null,
                        libc::MS_BIND,
                        std::ptr::null(),
                    ) != 0
                    {
                        return Err(err());
                    }
                    // A bind mount takes its flags on a remount.
                    if libc::mount(
                        null,
                        target.as_ptr(),
                        null,
                        libc::MS_BIND | libc::MS_REMOUNT | flags,
                        std::ptr::null(),
                    ) != 0
                    {
                        return Err(err());
                    }
                }
                CStep::Link { target, path } => {
                    if libc::symlink(target.as_ptr(), path.as_ptr()) != 0 {
                        return Err(err());
                    }
                }
            }
        }
        // Nothing new in the view's own directories.
        if libc::mount(
            null,
            self.root.as_ptr(),
            null,
            libc::MS_REMOUNT | libc::MS_RDONLY | tmpfs_flags,
            std::ptr::null(),
        ) != 0
        {
            return Err(err());
        }
        if libc::chdir(self.root.as_ptr()) != 0 {
            return Err(err());
        }
        // pivot_root(".", "."), then the old root (stacked on the new one)
        // detached: the host's tree is gone from this namespace. A host
        // whose root is the initial ramfs (pivot_root refuses it) gets the
        // view moved over its root and a chroot, as switch_root does.
        let dot = c".".as_ptr();
        if libc::syscall(libc::SYS_pivot_root, dot, dot) == 0 {
            if libc::umount2(dot, libc::MNT_DETACH) != 0 {
                return Err(err());
            }
        } else if libc::mount(dot, c"/".as_ptr(), null, libc::MS_MOVE, std::ptr::null()) != 0
            || libc::chroot(dot) != 0
        {
            return Err(err());
        }
        if libc::chdir(c"/".as_ptr()) != 0 {
            return Err(err());
        }
        Ok(())
    }
}

/// `<file>.lock`: what cloud-hypervisor v53 leaves beside its socket.
fn lock_name(file: &OsStr) -> std::ffi::OsString {
    let mut l = file.to_owned();
    l.push(".lock");
    l
}

/// Makes `path` (a disk of this VM's) accessible to `uid` for `need`,
/// giving it to the user where it is not.
fn give(path: &Path, uid: u32, gid: u32, groups: &[u32], need: u32) -> Result<(), JailError> {
    let err = |source| JailError::Prepare {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(err)?;
    if may(&meta, uid, groups, need) {
        return Ok(());
    }
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(err)?;
    let mode = meta.mode() & 0o7777;
    if (mode >> 6) & need != need {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode | (need << 6)))
            .map_err(err)?;
    }
    say(format!(
        "gave {} to the VMM's user {uid} (it could not open it)",
        path.display()
    ));
    Ok(())
}

/// A private copy of `path` for `uid`, readable by it only.
fn copy_for(path: &Path, copy: &Path, uid: u32, gid: u32) -> Result<PathBuf, JailError> {
    let err = |p: &Path| {
        let p = p.to_owned();
        move |source| JailError::Prepare { path: p, source }
    };
    let dir = copy.parent().unwrap_or(Path::new("/"));
    vmd_runtime::files::create_dir(dir, 0o700).map_err(err(dir))?;
    vmd_runtime::files::remove_file(copy).map_err(err(copy))?;
    std::fs::copy(path, copy).map_err(err(path))?;
    std::fs::set_permissions(copy, std::fs::Permissions::from_mode(0o400)).map_err(err(copy))?;
    std::os::unix::fs::chown(copy, Some(uid), Some(gid)).map_err(err(copy))?;
    say(format!(
        "the VMM's user {uid} may not read {}: it gets a copy",
        path.display()
    ));
    Ok(copy.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind(path: &str, dir: bool, access: Access) -> Entry {
        Entry::Bind {
            path: path.into(),
            source: format!("/host{path}").into(),
            dir,
            access,
        }
    }

    #[test]
    fn each_entry_gets_its_parents_once_then_its_mount() {
        let s = steps(
            Path::new("/j"),
            &[
                bind("/dev/kvm", false, Access::Device),
                bind("/dev/null", false, Access::Device),
                bind("/var/run/ch", true, Access::Write),
            ],
        );
        assert_eq!(
            s,
            [
                Step::Dir("/j/dev".into()),
                Step::File("/j/dev/kvm".into()),
                Step::Bind {
                    source: "/host/dev/kvm".into(),
                    target: "/j/dev/kvm".into(),
                    flags: libc::MS_NOSUID | libc::MS_NOEXEC,
                },
                Step::File("/j/dev/null".into()),
                Step::Bind {
                    source: "/host/dev/null".into(),
                    target: "/j/dev/null".into(),
                    flags: libc::MS_NOSUID | libc::MS_NOEXEC,
                },
                Step::Dir("/j/var".into()),
                Step::Dir("/j/var/run".into()),
                Step::Dir("/j/var/run/ch".into()),
                Step::Bind {
                    source: "/host/var/run/ch".into(),
                    target: "/j/var/run/ch".into(),
                    flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                },
            ]
        );
    }

    #[test]
    fn what_a_bound_directory_or_link_holds_is_not_mounted_again() {
        let s = steps(
            Path::new("/j"),
            &[
                bind("/usr/bin/cloud-hypervisor", false, Access::Exec),
                bind("/usr/lib", true, Access::Exec),
                Entry::Link {
                    path: "/lib".into(),
                    target: "usr/lib".into(),
                },
                bind("/lib/x", false, Access::Read),
                bind("/usr/lib/y", false, Access::Read),
            ],
        );
        let targets: Vec<_> = s
            .iter()
            .filter_map(|s| match s {
                Step::Bind { target, .. } => Some(target.clone()),
                Step::Link { path, .. } => Some(path.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(
            targets,
            [
                PathBuf::from("/j/usr/bin/cloud-hypervisor"),
                "/j/usr/lib".into(),
                "/j/lib".into()
            ]
        );
    }

    #[test]
    fn read_only_things_are_mounted_read_only_and_nothing_but_the_vmm_executes() {
        for (a, ro, exec) in [
            (Access::Read, true, false),
            (Access::Write, false, false),
            (Access::Exec, true, true),
            (Access::Device, false, false),
        ] {
            let f = a.flags();
            assert_eq!(f & libc::MS_RDONLY != 0, ro, "{a:?}");
            assert_eq!(f & libc::MS_NOEXEC == 0, exec, "{a:?}");
            assert!(f & libc::MS_NOSUID != 0, "{a:?}");
        }
    }

    #[test]
    fn the_uid_hash_is_stable() {
        // FNV-1a test vectors: a VM keeps its uid across vmd versions.
        assert_eq!(fnv1a(""), 0x811c_9dc5);
        assert_eq!(fnv1a("a"), 0xe40c_292c);
        assert_eq!(fnv1a("foobar"), 0xbf9c_f968);
    }

    #[test]
    fn uids_are_taken_once_and_come_back_when_released() {
        let dir = tempfile::tempdir().unwrap();
        let spec = JailSpec {
            first_uid: 5000,
            uids: 2,
            lock_dir: dir.path().join("uids"),
            confine_vmm: true,
        };
        let a = Lease::take(&spec, "a").unwrap();
        let b = Lease::take(&spec, "a").unwrap();
        assert_ne!(a.uid, b.uid);
        assert!((5000..5002).contains(&a.uid) && (5000..5002).contains(&b.uid));
        assert!(matches!(
            Lease::take(&spec, "c"),
            Err(JailError::NoUid {
                first: 5000,
                last: 5001
            })
        ));
        let uid = a.uid;
        drop(a);
        assert_eq!(Lease::take(&spec, "a").unwrap().uid, uid);
    }

    #[test]
    fn permissions_are_read_as_the_kernel_does() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, "").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        let meta = std::fs::metadata(&f).unwrap();
        let (owner, group) = (meta.uid(), meta.gid());
        assert!(may(&meta, owner, &[], R | W));
        assert!(!may(&meta, owner, &[], X));
        assert!(may(&meta, owner + 1, &[group], R));
        assert!(!may(&meta, owner + 1, &[group], W));
        assert!(!may(&meta, owner + 1, &[], R));
    }

    #[test]
    fn a_static_binary_needs_no_system_libraries() {
        // This test binary is linked dynamically (it names ld.so).
        let me = std::env::current_exe().unwrap();
        assert!(needs_system(&me));
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("s");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        assert!(needs_system(&script));
        // A minimal static ELF64 header: no program header names ld.so.
        let mut elf = vec![0u8; 64 + 56];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        elf[64..68].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        let stat = dir.path().join("static");
        std::fs::write(&stat, &elf).unwrap();
        assert!(!needs_system(&stat));
    }
}
