//! One VM under a zinit for tests: a runtime description, a zinit service
//! `vm:<name>` running `vmd-shim`, and helpers to watch it.
//!
//! The hypervisor is the double unless `VMD_TEST_CH` names a real
//! cloud-hypervisor; then `VMD_TEST_KERNEL` (and `VMD_TEST_INITRD`) must name
//! a guest that boots there (see `shared/guest/`), and `VMD_TEST_CMDLINE`
//! may give its base command line. `VMD_TEST_CH_VERSION=39` (any release
//! from 39 to 53) makes the double play that release (default: 53).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vmd_runtime::spec::{ConsoleSpec, JailSpec, RestartPolicy, VmSpec, SPEC_VERSION};
use vmd_runtime::state::ShimState;
use vmd_runtime::RunDir;
use zinit::{Command, Service, ServiceName};

use crate::{bin, Supervisor};

/// Whether a real cloud-hypervisor runs the tests.
pub fn real_ch() -> bool {
    std::env::var_os("VMD_TEST_CH").is_some()
}

/// Whether this host's `/dev/kvm` is the software-virtualised `kvm_pvm`
/// (`shared/guest/README.md`). There a real guest paused and resumed by
/// cloud-hypervisor often has processes it starts afterwards fault on
/// their thread-local data (`segfault at 0 ip …4a4d02 … in busybox`, a null
/// read through the FS base), so its power-button handler runs but its
/// `poweroff` dies and the guest does not power off. Seen by hand with no vmd
/// in the loop (v53.0, guest idle 30 s after GUEST-READY: `vm.pause`, 1 s,
/// `vm.resume`, five presses over 60 s, four handler runs, no power-off),
/// and in vmd's runs on v39.0 and v53.0. Whether a resumed guest powers
/// off cannot be checked on such a host.
pub fn pvm_host() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

pub fn ch_binary() -> PathBuf {
    if let Some(real) = std::env::var_os("VMD_TEST_CH") {
        return PathBuf::from(real);
    }
    match std::env::var("VMD_TEST_CH_VERSION") {
        Ok(v) if v != "53" => double_playing(&v),
        _ => bin("ch-double"),
    }
}

/// The double run by the name that makes it play release `v`:
/// `ch-double-v<v>`, a link next to it (made once; many tests race here).
fn double_playing(v: &str) -> PathBuf {
    let n: u16 = v
        .parse()
        .ok()
        .filter(|n| (39..=53).contains(n))
        .unwrap_or_else(|| panic!("VMD_TEST_CH_VERSION={v}: a release from 39 to 53"));
    let double = bin("ch-double");
    let link = double.with_file_name(format!("ch-double-v{n}"));
    if std::fs::read_link(&link).ok().as_deref() != Some(double.as_path()) {
        // Unique per process *and* per call: the tests of one binary run on
        // threads of one process, and a name shared by two of them let one
        // remove the link the other was about to rename (seen in CI).
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let nth = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = double.with_file_name(format!(".ch-double-v{n}.{}.{nth}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&double, &tmp).unwrap();
        std::fs::rename(&tmp, &link).unwrap();
    }
    link
}

/// The program name the VMM runs as (what `ps` shows).
/// What a VMM's argv[0] is: the shim names every VMM as the Go VM module's
/// `/proc` rule wants it, whatever its binary.
pub fn ch_program_name() -> String {
    "cloud-hypervisor".into()
}

/// How long a guest may take to print GUEST-READY (a real one on an
/// emulated KVM takes about 40 s).
pub fn boot_timeout() -> Duration {
    if real_ch() {
        // `VMD_TEST_BOOT_SECS` for slower hosts (seen: 4 min per boot).
        Duration::from_secs(crate::knob("VMD_TEST_BOOT_SECS", 240))
    } else {
        Duration::from_secs(15)
    }
}

/// The guest knobs go after the base command line of the guest.
fn base_cmdline() -> String {
    std::env::var("VMD_TEST_CMDLINE").unwrap_or_else(|_| {
        "console=ttyS0 clearcpuid=141,151,158,306,308,145,298,59,534 noxsave nofsgsbase panic=0"
            .into()
    })
}

pub struct TestVm {
    pub name: String,
    pub run: RunDir,
    pub spec: VmSpec,
    pub service: ServiceName,
}

/// The first uid of the VMMs' range in the tests (vmd's default).
pub const TEST_FIRST_UID: u32 = 1_879_048_192;

impl TestVm {
    /// A VM description for `name` with guest knobs `knobs` (e.g. `gaction=wait`).
    pub fn new(z: &Supervisor, name: &str, knobs: &str) -> Self {
        let root = z.dir.path();
        let run = RunDir::new(root.join("run").join(name));
        std::fs::create_dir_all(run.path()).unwrap();
        let kernel = match std::env::var_os("VMD_TEST_KERNEL") {
            Some(k) => PathBuf::from(k),
            None => {
                let k = root.join("vmlinux");
                if !k.exists() {
                    std::fs::write(&k, b"not a kernel: the double only opens it").unwrap();
                }
                k
            }
        };
        let initramfs = std::env::var_os("VMD_TEST_INITRD").map(PathBuf::from);
        // vmd makes the API socket directory (`--api-socket-dir`).
        std::fs::create_dir_all(root.join("api")).unwrap();
        let spec = VmSpec {
            version: SPEC_VERSION,
            name: name.into(),
            hypervisor: ch_binary(),
            hypervisor_release: None,
            virtiofsd: "virtiofsd".into(),
            vcpus: 1,
            memory_mib: 256,
            kernel,
            initramfs,
            cmdline: format!("{} {knobs}", base_cmdline()).trim().to_owned(),
            disks: vec![],
            nets: vec![],
            shares: vec![],
            devices: vec![],
            keep_alive: true,
            grace_secs: 30,
            restart: RestartPolicy::default(),
            console: ConsoleSpec {
                log: root.join("logs").join(name),
                rotate_bytes: ConsoleSpec::ZOS_ROTATE,
                keep_bytes: ConsoleSpec::ZOS_KEEP,
            },
            web_console: None,
            // Where vmd puts it (outside the run directory).
            api_socket: Some(root.join("api").join(name)),
            go_config: None,
            adopted: None,
            // Jailed as vmd jails it, where the test can (as root);
            // `VMD_TEST_NO_JAIL=1` runs the VMM as before the jail (for
            // experiments that take one difference away at a time).
            jail: (nix::unistd::geteuid().is_root()
                && std::env::var_os("VMD_TEST_NO_JAIL").is_none())
            .then(|| JailSpec {
                first_uid: TEST_FIRST_UID,
                uids: 65536,
                lock_dir: root.join("vmm-uids"),
                confine_vmm: true,
            }),
            tap_netns: None,
        };
        TestVm {
            name: name.into(),
            service: format!("vm:{name}").parse().unwrap(),
            run,
            spec,
        }
    }

    /// Adds a writable raw disk at `path`: `bytes` of zeroes, mode 0600
    /// (root's: only a jailed VMM's own user can be given it).
    pub fn add_private_disk(&mut self, path: &std::path::Path, bytes: usize) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, vec![0u8; bytes]).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
        self.spec.disks.push(vmd_runtime::spec::Disk {
            path: path.to_owned(),
            readonly: false,
            format: Some(vmd_runtime::vmm::ImageFormat::Raw),
        });
    }

    /// Adds a tap named `<prefix><test pid>`, opened (so made) by the shim
    /// in `ns`; returns its name.
    pub fn add_tap(&mut self, ns: &crate::netns::NetNs, prefix: &str, mac: &str) -> String {
        let tap = format!("{prefix}{}", std::process::id() % 100_000);
        self.spec.nets.push(vmd_runtime::spec::Net {
            tap: tap.clone(),
            mac: mac.into(),
        });
        self.spec.tap_netns = Some(ns.path());
        tap
    }

    /// The VMM's API socket.
    pub fn api_socket(&self) -> PathBuf {
        self.spec.api_socket_in(&self.run)
    }

    pub fn write_spec(&self) {
        std::fs::write(
            self.run.spec(),
            serde_json::to_vec_pretty(&self.spec).unwrap(),
        )
        .unwrap();
    }

    /// Writes the description and the service, and asks zinit to monitor it.
    pub async fn start(&self, z: &Supervisor) {
        self.write_spec();
        let exec = Command::new([
            bin("vmd-shim").to_string_lossy().into_owned(),
            "--dir".into(),
            self.run.path().to_string_lossy().into_owned(),
        ])
        .unwrap();
        z.config_dir()
            .install(&self.service, &Service::new(exec))
            .unwrap();
        z.client().monitor(&self.service).await.unwrap();
    }

    pub fn state(&self) -> ShimState {
        ShimState::load(&self.run.state())
            .unwrap()
            .unwrap_or_default()
    }

    pub fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.spec.console.log).unwrap_or_default())
            .into_owned()
    }

    /// Waits until the console log contains `marker` `times` times.
    pub async fn wait_console(&self, marker: &str, times: usize, limit: Duration) {
        let t0 = Instant::now();
        loop {
            if self.console().matches(marker).count() >= times {
                return;
            }
            assert!(
                t0.elapsed() < limit,
                "{marker:?} x{times} not on the console within {limit:?}; console:\n{}",
                tail(&self.console(), 2000)
            );
            tokio::time::sleep(crate::poll_interval(t0.elapsed())).await;
        }
    }

    /// Waits until `f(state)` holds.
    pub async fn wait_state(
        &self,
        what: &str,
        limit: Duration,
        f: impl Fn(&ShimState) -> bool,
    ) -> ShimState {
        let t0 = Instant::now();
        loop {
            let st = self.state();
            if f(&st) {
                return st;
            }
            assert!(
                t0.elapsed() < limit,
                "{what}: not within {limit:?}; state: {st:?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The pid of the VM's shim, as zinit reports it.
    pub async fn shim_pid(&self, z: &Supervisor) -> i32 {
        let c = z.client();
        let t0 = Instant::now();
        loop {
            let st = c.status(&self.service).await.unwrap();
            if st.pid > 0 {
                return st.pid as i32;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "no shim process");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The running VMM's pid (identity-checked).
    pub async fn vmm_pid(&self, limit: Duration) -> i32 {
        let st = self
            .wait_state("a running VMM", limit, |s| s.vmm.is_some_and(|v| v.alive()))
            .await;
        st.vmm.unwrap().pid
    }
}

pub fn tail(s: &str, n: usize) -> &str {
    let start = s.len().saturating_sub(n);
    let mut i = start;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// When each line appended to a console log after [`LineClock::start`]
/// appeared (to the nearest 100 ms), for a failure to say *when* the guest
/// printed what: a real guest's timing is most of what can go wrong.
pub struct LineClock {
    lines: std::sync::Arc<std::sync::Mutex<Vec<(Duration, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl LineClock {
    pub fn start(path: PathBuf) -> Self {
        use std::io::{Read, Seek};
        let lines = std::sync::Arc::<std::sync::Mutex<Vec<_>>>::default();
        let seen = lines.clone();
        // Opened here, not in the task: what is appended once `start`
        // returns must count, however late the task first runs.
        let mut file = std::fs::File::open(&path)
            .unwrap_or_else(|e| panic!("cannot watch {}: {e}", path.display()));
        file.seek(std::io::SeekFrom::End(0)).unwrap();
        let t0 = Instant::now();
        let task = tokio::spawn(async move {
            // Only what was appended is read; `pending` holds a line not
            // yet ended.
            let mut pending = Vec::new();
            loop {
                let _ = file.read_to_end(&mut pending);
                if let Some(end) = pending.iter().rposition(|c| *c == b'\n') {
                    let done: Vec<u8> = pending.drain(..=end).collect();
                    let at = t0.elapsed();
                    seen.lock().unwrap().extend(
                        String::from_utf8_lossy(&done)
                            .lines()
                            .map(|x| (at, x.trim_end().to_owned())),
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        LineClock { lines, task }
    }

    /// `  12.3 s  line`, one per line seen so far.
    pub fn report(&self) -> String {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|(t, l)| format!("{:>7.1} s  {l}\n", t.as_secs_f64()))
            .collect()
    }
}

impl Drop for LineClock {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether `pid` exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    proc_state(&format!("/proc/{pid}/stat")).is_some_and(|s| s != 'Z')
}

/// The state letter (`R`, `S`, `Z`…) in a `stat` file of `/proc`, a
/// process's or a thread's (`/proc/self/task/<tid>/stat`); None if it is
/// gone.
pub fn proc_state(stat: &str) -> Option<char> {
    let text = std::fs::read_to_string(stat).ok()?;
    text.rsplit_once(") ")?.1.chars().next()
}

/// A field of `/proc/<pid>/status`, e.g. `NoNewPrivs`.
pub fn proc_status(pid: i32, field: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix(&format!("{field}:"))
            .map(|v| v.trim().to_owned())
    })
}

/// user + system CPU time of `pid`, in clock ticks.
pub fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split(' ').collect();
    f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
}

/// CPU time `pid` ran, all its threads, to the nanosecond (the scheduler's
/// own count, `/proc/<pid>/task/*/schedstat`). `cpu_ticks` counts whole
/// clock ticks to whichever task a tick finds running: a server that runs
/// a few microseconds per wake-up was charged three times its time by it
/// on this host. Threads that exited are not counted.
pub fn cpu_time(pid: i32) -> Duration {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten();
    let ns: u64 = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split(' ').next().and_then(|n| n.parse::<u64>().ok()))
        .sum();
    Duration::from_nanos(ns)
}

/// Resident memory of `pid` in KiB.
pub fn rss_kib(pid: i32) -> u64 {
    proc_status(pid, "VmRSS")
        .and_then(|v| v.trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Private dirty memory of `pid` in KiB: what this process alone costs
/// (code pages are shared by every process of the same binary).
pub fn private_dirty_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Private_Dirty:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

/// RSS and private dirty memory (KiB) of an idle `pid`, once they stopped
/// changing (two reads 100 ms apart agree; at most 5 s).
pub async fn settled_memory_kib(pid: i32) -> (u64, u64) {
    let read = || (rss_kib(pid), private_dirty_kib(pid));
    let mut last = read();
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let now = read();
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

/// When the VMM of the VM whose console log is `log` was exec'd (Unix
/// nanoseconds): the double's `DOUBLE-EXEC <pid> <ns>` line, which it
/// prints first thing with `double.exec_log=stderr`.
pub async fn exec_time(log: &std::path::Path) -> u128 {
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(ns) = text
            .lines()
            .find_map(|l| l.split("DOUBLE-EXEC ").nth(1))
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
        {
            return ns;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no exec line in {}",
            log.display()
        );
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Only lines appended after the start, each once, a line reported
    /// only once it ends.
    #[tokio::test]
    async fn a_line_clock_reports_appended_lines_once_they_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "before\n").unwrap();
        let clock = LineClock::start(path.clone());
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"one\n").unwrap();
        crate::until(Duration::from_secs(5), "line one", || async {
            clock.report().contains("one")
        })
        .await;
        f.write_all(b"two\nthr").unwrap();
        crate::until(Duration::from_secs(5), "line two", || async {
            clock.report().contains("two")
        })
        .await;
        assert!(!clock.report().contains("thr"), "{}", clock.report());
        f.write_all(b"ee\n").unwrap();
        crate::until(Duration::from_secs(5), "line three", || async {
            clock.report().contains("three")
        })
        .await;
        let lines: Vec<String> = clock
            .report()
            .lines()
            .map(|l| l.split_once(" s  ").unwrap().1.to_owned())
            .collect();
        assert_eq!(lines, ["one", "two", "three"]);
    }
}
