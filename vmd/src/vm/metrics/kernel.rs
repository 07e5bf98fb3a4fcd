//! What the collector reads from the kernel and from vmd's files, cheaply:
//! every tap's counters in one read, a VMM's `/proc` entries opened from a
//! directory descriptor, a file's stamp to tell whether it changed.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::Path;

use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::Mode;
use vmd_runtime::HostPaths;

use super::Counters;

/// What `/proc` says of a live VMM.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct VmmUsage {
    /// User and system time of all its threads, milliseconds.
    pub cpu_ms: Option<u64>,
    pub rss_bytes: Option<u64>,
    /// Storage I/O the process caused (`/proc/<pid>/io`): its guest's disks.
    pub read_bytes: Option<u64>,
    pub write_bytes: Option<u64>,
}

/// A file's identity and version: a rewrite (a rename over it, or a write
/// in place) changes one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stamp {
    dev: u64,
    ino: u64,
    mtime: (i64, i64),
    size: i64,
}

/// The directories a collection reads under, open once per call: each file
/// is then found from its directory, not by walking its whole path again
/// (path walks were the largest cost at a thousand VMs).
pub(super) struct Dirs {
    paths: HostPaths,
    vms: Option<OwnedFd>,
    proc: Option<OwnedFd>,
}

impl Dirs {
    pub(super) fn open(paths: &HostPaths) -> Self {
        let dir = |p: &Path| {
            nix::fcntl::open(
                p,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .ok()
        };
        Dirs {
            paths: paths.clone(),
            vms: dir(&paths.vms_dir()),
            proc: dir(Path::new("/proc")),
        }
    }

    /// `path` relative to the VMs' directory, if it is under it.
    fn in_vms<'p>(&self, path: &'p Path) -> Option<(&OwnedFd, &'p Path)> {
        let vms = self.vms.as_ref()?;
        Some((vms, path.strip_prefix(self.paths.vms_dir()).ok()?))
    }

    pub(super) fn stamp(&self, path: &Path) -> Option<Stamp> {
        let st = match self.in_vms(path) {
            Some((dir, rel)) => nix::sys::stat::fstatat(dir, rel, AtFlags::empty()),
            None => nix::sys::stat::stat(path),
        }
        .ok()?;
        Some(Stamp {
            dev: st.st_dev,
            ino: st.st_ino,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            size: st.st_size,
        })
    }

    /// The text of `/proc/<pid>/<file>`.
    fn proc_file(&self, pid: i32, file: &str, into: &mut String) -> Option<()> {
        use std::io::Read;
        into.clear();
        let rel = format!("{pid}/{file}");
        let fd = match &self.proc {
            Some(proc) => nix::fcntl::openat(
                proc,
                rel.as_str(),
                OFlag::O_RDONLY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .ok()?,
            None => {
                return std::fs::File::open(format!("/proc/{rel}"))
                    .ok()?
                    .read_to_string(into)
                    .ok()
                    .map(drop)
            }
        };
        std::fs::File::from(fd).read_to_string(into).ok().map(drop)
    }
}

/// Every interface's counters from a file in `/proc/net/dev`'s format, read
/// inside `netns` when it is given (the taps' namespace).
pub(super) fn read_net_dev(
    path: &Path,
    netns: Option<&Path>,
) -> Result<HashMap<String, Counters>, String> {
    let text = match netns {
        None => std::fs::read_to_string(path).map_err(|e| e.to_string())?,
        Some(ns) => {
            let (path, ns) = (path.to_owned(), ns.to_owned());
            // A thread of its own: it leaves vmd's namespace for good.
            std::thread::spawn(move || -> Result<String, String> {
                let f = std::fs::File::open(&ns).map_err(|e| format!("{}: {e}", ns.display()))?;
                nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| format!("entering {}: {e}", ns.display()))?;
                std::fs::read_to_string(&path).map_err(|e| e.to_string())
            })
            .join()
            .map_err(|_| "the reading thread failed".to_owned())??
        }
    };
    Ok(parse_net_dev(&text))
}

/// `/proc/net/dev`: two header lines, then `name: rx_bytes rx_packets errs
/// drop fifo frame compressed multicast tx_bytes tx_packets …`.
pub fn parse_net_dev(text: &str) -> HashMap<String, Counters> {
    text.lines()
        .skip(2)
        .filter_map(|line| {
            let (name, rest) = line.split_once(':')?;
            let f: Vec<u64> = rest
                .split_ascii_whitespace()
                .map(|v| v.parse().ok())
                .collect::<Option<_>>()?;
            (f.len() >= 10).then(|| (name.trim().to_owned(), [f[0], f[1], f[8], f[9]]))
        })
        .collect()
}

fn ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).max(4096) as u64
}

/// CPU, memory and storage I/O of the VMM `pid`, if it is still the process
/// that started at `start_ticks` (not a pid reused since).
pub(super) fn vmm_usage(
    dirs: &Dirs,
    buf: &mut String,
    pid: i32,
    start_ticks: u64,
) -> Option<VmmUsage> {
    dirs.proc_file(pid, "stat", buf)?;
    let mut u = {
        // The command name may hold spaces and parentheses: skip past the last ')'.
        let mut f = buf.rsplit_once(") ")?.1.split(' ');
        // Fields from the state (3rd of the line) on: utime is the 12th.
        let mut nth = |skip: usize| f.nth(skip).and_then(|v| v.parse::<u64>().ok());
        let (utime, stime) = (nth(11)?, nth(0)?);
        if nth(6)? != start_ticks {
            return None;
        }
        let rss_pages = nth(1);
        VmmUsage {
            cpu_ms: Some((utime + stime) * 1000 / ticks_per_sec()),
            rss_bytes: rss_pages.map(|pages| pages * page_size()),
            ..Default::default()
        }
    };
    if dirs.proc_file(pid, "io", buf).is_some() {
        let field = |k: &str| {
            buf.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        u.read_bytes = field("read_bytes:");
        u.write_bytes = field("write_bytes:");
    }
    Some(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_kernels_format() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
lo:  123456     789    0    0    0     0          0         0   654321     987    0    0    0     0       0          0\n\
p-web: 1 2 0 0 0 0 0 0 3 4 0 0 0 0 0 0\n\
broken: 1 2 x\n";
        let c = parse_net_dev(text);
        assert_eq!(c["lo"], [123456, 789, 654321, 987]);
        assert_eq!(c["p-web"], [1, 2, 3, 4]);
        assert!(!c.contains_key("broken"));
    }

    #[test]
    fn a_reused_pid_is_not_the_vmm() {
        let me = std::process::id() as i32;
        let id = vmd_runtime::state::ProcessIdentity::of(me).unwrap();
        let dirs = Dirs::open(&HostPaths::new("/nonexistent", "/nonexistent"));
        let mut buf = String::new();
        let u = vmm_usage(&dirs, &mut buf, me, id.start_ticks).unwrap();
        assert!(u.cpu_ms.is_some() && u.rss_bytes.unwrap() > 0 && u.read_bytes.is_some());
        assert!(vmm_usage(&dirs, &mut buf, me, id.start_ticks + 1).is_none());
    }
}
