//! What the collector reads from the kernel and from vmd's files, cheaply:
//! every tap's counters in one read, a VMM's `/proc` entries opened from a
//! directory descriptor, a file's stamp to tell whether it changed.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

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

    /// `/proc/<pid>/<file>`, opened.
    fn open_proc(&self, pid: i32, file: &str) -> Option<File> {
        let rel = format!("{pid}/{file}");
        match &self.proc {
            Some(proc) => nix::fcntl::openat(
                proc,
                rel.as_str(),
                OFlag::O_RDONLY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .ok()
            .map(File::from),
            None => File::open(format!("/proc/{rel}")).ok(),
        }
    }
}

/// The whole text of a `/proc` file from its start (the kernel makes it
/// anew at offset 0).
fn pread_all(f: &File, into: &mut String) -> Option<()> {
    let mut buf = [0u8; 4096];
    let n = f.read_at(&mut buf, 0).ok()?;
    into.clear();
    into.push_str(std::str::from_utf8(&buf[..n]).ok()?);
    Some(())
}

/// How many `/proc` files the collector may keep open, and how many it
/// does: within `RLIMIT_NOFILE`, leaving room for everything else vmd
/// opens.
#[derive(Debug, Clone)]
pub struct ProcBudget {
    open: Arc<AtomicUsize>,
    most: usize,
}

impl ProcBudget {
    /// Half of what the descriptor limit leaves above 512.
    pub fn from_limit() -> Self {
        let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(1024, |(soft, _)| soft);
        let soft = usize::try_from(soft).unwrap_or(usize::MAX);
        ProcBudget {
            open: Arc::default(),
            most: soft.saturating_sub(512) / 2,
        }
    }

    #[cfg(test)]
    pub fn of(most: usize) -> Self {
        ProcBudget {
            open: Arc::default(),
            most,
        }
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    fn take(&self, n: usize) -> Option<Taken> {
        let mut now = self.open.load(Ordering::Relaxed);
        loop {
            if now + n > self.most {
                return None;
            }
            match self
                .open
                .compare_exchange(now, now + n, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    return Some(Taken {
                        budget: self.open.clone(),
                        n,
                    })
                }
                Err(v) => now = v,
            }
        }
    }
}

/// Descriptors counted against a [`ProcBudget`] while held.
#[derive(Debug)]
struct Taken {
    budget: Arc<AtomicUsize>,
    n: usize,
}

impl Drop for Taken {
    fn drop(&mut self) {
        self.budget.fetch_sub(self.n, Ordering::Relaxed);
    }
}

/// A VMM's `/proc/<pid>/stat` and `io`, kept open between collections:
/// reading them again is one `pread` each, where opening them each time
/// cost most of a collection at a thousand VMs.
#[derive(Debug)]
pub(super) struct ProcFiles {
    pid: i32,
    start_ticks: u64,
    stat: File,
    io: Option<File>,
    _taken: Taken,
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
/// that started at `start_ticks` (not a pid reused since). Its files are
/// kept in `kept` while the budget allows.
pub(super) fn vmm_usage(
    dirs: &Dirs,
    budget: &ProcBudget,
    kept: &mut Option<ProcFiles>,
    buf: &mut String,
    pid: i32,
    start_ticks: u64,
) -> Option<VmmUsage> {
    if kept
        .as_ref()
        .is_some_and(|k| (k.pid, k.start_ticks) != (pid, start_ticks))
    {
        *kept = None;
    }
    if kept.is_none() {
        if let Some(taken) = budget.take(2) {
            *kept = dirs.open_proc(pid, "stat").map(|stat| ProcFiles {
                pid,
                start_ticks,
                stat,
                io: dirs.open_proc(pid, "io"),
                _taken: taken,
            });
        }
    }
    let read = match kept.as_ref() {
        Some(k) => pread_all(&k.stat, buf),
        None => dirs.open_proc(pid, "stat").and_then(|f| pread_all(&f, buf)),
    };
    if read.is_none() {
        // Gone (a kept file of an exited process reads as an error): its
        // files go too.
        *kept = None;
        return None;
    }
    let mut u = {
        // The command name may hold spaces and parentheses: skip past the last ')'.
        let mut f = buf.rsplit_once(") ")?.1.split(' ');
        // Fields from the state (3rd of the line) on: utime is the 12th.
        let mut nth = |skip: usize| f.nth(skip).and_then(|v| v.parse::<u64>().ok());
        let (utime, stime) = (nth(11)?, nth(0)?);
        if nth(6)? != start_ticks {
            *kept = None;
            return None;
        }
        let rss_pages = nth(1);
        VmmUsage {
            cpu_ms: Some((utime + stime) * 1000 / ticks_per_sec()),
            rss_bytes: rss_pages.map(|pages| pages * page_size()),
            ..Default::default()
        }
    };
    let io_read = match kept.as_ref().and_then(|k| k.io.as_ref()) {
        Some(f) => pread_all(f, buf),
        None => dirs.open_proc(pid, "io").and_then(|f| pread_all(&f, buf)),
    };
    if io_read.is_some() {
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
        let budget = ProcBudget::of(10);
        let mut kept = None;
        let u = vmm_usage(&dirs, &budget, &mut kept, &mut buf, me, id.start_ticks).unwrap();
        assert!(u.cpu_ms.is_some() && u.rss_bytes.unwrap() > 0 && u.read_bytes.is_some());
        let t = id.start_ticks + 1;
        assert!(vmm_usage(&dirs, &budget, &mut kept, &mut buf, me, t).is_none());
        assert!(kept.is_none());
        assert_eq!(budget.open(), 0);
    }

    #[test]
    fn files_are_kept_within_the_budget_and_dropped_with_their_process() {
        let dirs = Dirs::open(&HostPaths::new("/nonexistent", "/nonexistent"));
        let mut buf = String::new();
        let budget = ProcBudget::of(3);
        let mut a = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let mut b = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let id = |c: &std::process::Child| {
            let pid = c.id() as i32;
            (
                pid,
                vmd_runtime::state::ProcessIdentity::of(pid)
                    .unwrap()
                    .start_ticks,
            )
        };
        let ((pa, ta), (pb, tb)) = (id(&a), id(&b));
        let (mut ka, mut kb) = (None, None);
        assert!(vmm_usage(&dirs, &budget, &mut ka, &mut buf, pa, ta).is_some());
        assert!(ka.is_some());
        assert_eq!(budget.open(), 2);
        // No room for two more: read all the same, opened for the call.
        assert!(vmm_usage(&dirs, &budget, &mut kb, &mut buf, pb, tb).is_some());
        assert!(kb.is_none());
        // Read again through the kept files: the same process, alive.
        let u = vmm_usage(&dirs, &budget, &mut ka, &mut buf, pa, ta).unwrap();
        assert!(u.cpu_ms.is_some() && u.rss_bytes.is_some());
        a.kill().unwrap();
        a.wait().unwrap();
        assert!(vmm_usage(&dirs, &budget, &mut ka, &mut buf, pa, ta).is_none());
        assert!(ka.is_none());
        assert_eq!(budget.open(), 0);
        // The room is free again.
        assert!(vmm_usage(&dirs, &budget, &mut kb, &mut buf, pb, tb).is_some());
        assert!(kb.is_some());
        b.kill().unwrap();
        b.wait().unwrap();
    }
}
