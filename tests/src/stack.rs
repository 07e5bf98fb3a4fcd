//! The whole stack a test drives: a real Redis, zinit (the double, or the
//! real one with `VMD_TEST_ZINIT`), the `vmd` binary on private paths, a
//! stub, and a directory of host files VMs use (kernel, disks, a fake sysfs).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vmd::api::Vm;
use vmd::stub::VmdStub;

use crate::supervisor::processes_with;
use crate::vm::{boot_timeout, real_ch};
use crate::{until, RedisServer, Supervisor, VmdProcess};

pub struct Stack {
    pub redis: RedisServer,
    pub zinit: Supervisor,
    pub vmd: VmdProcess,
    /// A patient caller (Run waits for a boot).
    pub stub: VmdStub,
    /// Host files: `vmlinux`, disks, `net/<tap>` (vmd's `--sys-net`).
    pub sys: tempfile::TempDir,
    /// Where the shims open the VMs' taps (vmd's `--tap-netns`): a private
    /// network namespace, so that the taps a test names are real ones,
    /// made there, and gone with it. `None` where namespaces cannot be made.
    pub taps: Option<crate::netns::NetNs>,
}

/// Where vmd reads the taps' counters.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Counters {
    /// Those [`Stack::tap`] writes.
    Fake,
    /// The real taps', in their namespace (vmd's default).
    Real,
}

impl Stack {
    /// Starts everything; `extra` flags go to vmd. Returns once vmd answers.
    pub async fn start(extra: &[&str]) -> Stack {
        Self::start_with(Supervisor::start(), extra, Counters::Fake).await
    }

    /// [`Stack::start`], with vmd reading the real taps' counters (made by
    /// the test in [`Stack::taps`]) instead of those [`Stack::tap`] writes.
    pub async fn start_with_real_tap_counters(extra: &[&str]) -> Stack {
        Self::start_with(Supervisor::start(), extra, Counters::Real).await
    }

    /// As on a Zero-OS node, whose root file system is in RAM: zinit's
    /// config directory and vmd's runtime directory on a tmpfs (`--root`,
    /// `/var/cache` there, stays on disk). For benchmarks.
    pub async fn start_like_a_node(extra: &[&str]) -> Stack {
        let zinit = Supervisor::start_on_tmpfs();
        let run = zinit.dir.path().join("vmd-run");
        let run = run.to_string_lossy().into_owned();
        let mut flags = vec!["--runtime-dir", run.as_str()];
        flags.extend_from_slice(extra);
        Self::start_with(zinit, &flags, Counters::Fake).await
    }

    async fn start_with(zinit: Supervisor, extra: &[&str], counters: Counters) -> Stack {
        let redis = RedisServer::start();
        let sys = tempfile::tempdir().unwrap();
        let sys_net = sys.path().join("net").to_string_lossy().into_owned();
        let net_dev = sys.path().join("net-dev").to_string_lossy().into_owned();
        let mut flags = vec!["--sys-net", &sys_net];
        if counters == Counters::Fake {
            flags.extend(["--net-dev", net_dev.as_str()]);
        }
        let taps = crate::netns::NetNs::new(None).ok();
        let taps_path = taps
            .as_ref()
            .map(|t| t.path().to_string_lossy().into_owned());
        if let Some(p) = &taps_path {
            flags.extend(["--tap-netns", p.as_str()]);
        }
        flags.extend_from_slice(extra);
        let vmd = VmdProcess::start_with(&redis, Some(&zinit), &flags);
        let stub = VmdStub::new(redis.broker()).with_timeout(Duration::from_secs(90));
        vmd.wait_ready().await;
        Stack {
            redis,
            zinit,
            vmd,
            stub,
            sys,
            taps,
        }
    }

    /// Another caller, with its own deadline (a Go caller's is short).
    pub fn caller(&self, timeout: Duration) -> VmdStub {
        VmdStub::new(self.redis.broker()).with_timeout(timeout)
    }

    /// The guest kernel: `VMD_TEST_KERNEL`, or a file the double accepts.
    pub fn kernel(&self) -> String {
        match std::env::var("VMD_TEST_KERNEL") {
            Ok(k) => k,
            Err(_) => {
                let k = self.sys.path().join("vmlinux");
                if !k.exists() {
                    std::fs::write(&k, "not a kernel: the double only opens it").unwrap();
                }
                k.to_string_lossy().into_owned()
            }
        }
    }

    /// A VM whose guest is steered by `knobs` (`gaction=wait`, double knobs…).
    pub fn vm(&self, name: &str, knobs: &[(&str, &str)]) -> Vm {
        let mut args: BTreeMap<String, String> = BTreeMap::new();
        if real_ch() {
            // The test guest's needs on an emulated KVM (shared/guest).
            args.insert(
                "clearcpuid".into(),
                "141,151,158,306,308,145,298,59,534".into(),
            );
            args.insert("noxsave".into(), String::new());
            args.insert("nofsgsbase".into(), String::new());
        }
        for (k, v) in knobs {
            args.insert((*k).into(), (*v).into());
        }
        Vm {
            name: name.into(),
            cpu: 1,
            memory: 256 << 20,
            kernel_image: self.kernel(),
            initrd_image: std::env::var("VMD_TEST_INITRD").unwrap_or_default(),
            kernel_args: args,
            ..Default::default()
        }
    }

    /// A fake tap in the sysfs vmd looks at, with its counters (also in
    /// the fake `/proc/net/dev` vmd reads them from).
    pub fn tap(&self, name: &str, c: [u64; 4]) {
        let dir = self.sys.path().join("net").join(name);
        std::fs::create_dir_all(dir.join("statistics")).unwrap();
        std::fs::write(dir.join("tun_flags"), "0x1002\n").unwrap();
        for (f, v) in ["rx_bytes", "rx_packets", "tx_bytes", "tx_packets"]
            .iter()
            .zip(c)
        {
            std::fs::write(dir.join("statistics").join(f), format!("{v}\n")).unwrap();
        }
        write_net_dev(
            &self.sys.path().join("net"),
            &self.sys.path().join("net-dev"),
        );
    }

    /// The VMM's API socket of `name` (what its argv names).
    pub fn api_socket(&self, name: &str) -> PathBuf {
        self.vmd.runtime().join("api").join(name)
    }

    /// The Go VM module's config file of `name` (docs/zero-os-node.md).
    pub fn go_config(&self, name: &str) -> PathBuf {
        self.vmd.runtime().join("go-config").join(name)
    }

    pub fn run_dir(&self, name: &str) -> PathBuf {
        self.vmd.runtime().join("vms").join(name)
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.vmd.root().join("logs").join(name)
    }

    /// Waits until `marker` is on `name`'s console (as `LogsFull` shows it).
    pub async fn wait_logs(&self, name: &str, marker: &str) {
        self.wait_logs_since(name, marker, 0).await;
    }

    /// [`Stack::wait_logs`] for output after byte `from` of `LogsFull`
    /// (a later boot's, say).
    pub async fn wait_logs_since(&self, name: &str, marker: &str, from: usize) {
        until(
            boot_timeout(),
            format!("{marker} on {name}'s console after byte {from}"),
            || async {
                self.stub
                    .logs_full(name)
                    .await
                    .is_ok_and(|l| l.get(from..).is_some_and(|l| l.contains(marker)))
            },
        )
        .await;
    }

    /// Nothing of VM `name` is left: files, service, processes.
    pub async fn assert_gone(&self, name: &str) {
        assert!(!self.run_dir(name).exists(), "run dir of {name} left");
        assert!(!self.log(name).exists(), "log of {name} left");
        let seed = self
            .vmd
            .root()
            .join("cloud-init")
            .join(format!("{name}.img"));
        assert!(!seed.exists(), "cloud-init image of {name} left");
        let svc = format!("vm:{name}");
        assert!(
            !self
                .zinit
                .config_path()
                .join(format!("{svc}.yaml"))
                .exists(),
            "service file left"
        );
        let list = self.zinit.client().list().await.unwrap();
        assert!(!list.contains_key(&svc), "zinit still has {svc}");
        let marker = self.run_dir(name).to_string_lossy().into_owned();
        assert!(
            processes_with(&marker).is_empty(),
            "processes of {name} left"
        );
    }

    /// Waits until the files of `name` are gone (start-up reconciliation
    /// finishes in the background), then checks that nothing at all is left.
    pub async fn wait_gone(&self, name: &str) {
        let run = self.run_dir(name);
        let svc = self.zinit.config_path().join(format!("vm:{name}.yaml"));
        until(Duration::from_secs(30), format!("{name} gone"), || {
            std::future::ready(!run.exists() && !svc.exists())
        })
        .await;
        self.assert_gone(name).await;
    }

    /// Nothing of any VM or stream is left anywhere (after deleting all).
    pub async fn assert_nothing_left(&self) {
        assert_nothing_left(&self.zinit, &self.vmd.runtime(), &self.vmd.root()).await;
    }
}

/// What a vmd on `runtime`/`root` under `zinit` may leave once every VM and
/// stream is deleted: nothing — no service (running or as a file), no VM
/// directory, index entry, stream record or console log, no process.
pub async fn assert_nothing_left(zinit: &Supervisor, runtime: &Path, root: &Path) {
    // Shims and virtiofsd name their run dir, VMMs their API socket, stream
    // workers their progress file; vmd itself names none of them.
    let procs: Vec<String> = ["vms", "streams", "api"]
        .iter()
        .flat_map(|d| processes_with(&format!("{}/{d}/", runtime.display())))
        .map(|p| {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            format!(
                "{p}: {} [{}]",
                String::from_utf8_lossy(&cmd).replace('\0', " "),
                stat.split(' ').nth(2).unwrap_or("?")
            )
        })
        .collect();
    assert!(procs.is_empty(), "processes left: {procs:#?}");
    let services: Vec<String> = zinit
        .client()
        .list()
        .await
        .unwrap()
        .into_keys()
        .filter(|k| k.starts_with("vm:") || k.starts_with("stream:"))
        .collect();
    assert!(services.is_empty(), "zinit services left: {services:?}");
    let files = zinit.config_dir().list().unwrap();
    assert!(files.is_empty(), "service files left: {files:?}");
    for dir in [
        runtime.join("vms"),
        runtime.join("present"),
        runtime.join("streams"),
        runtime.join("streams").join("progress"),
        runtime.join("api"),
        runtime.join("go-config"),
        root.join("logs"),
        root.join("cloud-init"),
    ] {
        // The workers' progress directory stays (it is checked itself).
        let left: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name())
                    .filter(|n| !(dir.ends_with("streams") && n == "progress"))
                    .collect()
            })
            .unwrap_or_default();
        assert!(left.is_empty(), "{} not empty: {left:?}", dir.display());
    }
}

/// Writes `net_dev` in `/proc/net/dev`'s format from a fake sysfs `net`
/// directory (`<tap>/statistics/{rx,tx}_{bytes,packets}`), atomically.
pub fn write_net_dev(net: &std::path::Path, net_dev: &std::path::Path) {
    let mut out = String::from(
        "Inter-|   Receive                                                |  Transmit\n \
         face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n",
    );
    let mut taps: Vec<_> = std::fs::read_dir(net)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    taps.sort();
    for tap in taps {
        let stat = |f: &str| -> u64 {
            std::fs::read_to_string(net.join(&tap).join("statistics").join(f))
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        out.push_str(&format!(
            "{:>6}: {} {} 0 0 0 0 0 0 {} {} 0 0 0 0 0 0\n",
            tap.to_string_lossy(),
            stat("rx_bytes"),
            stat("rx_packets"),
            stat("tx_bytes"),
            stat("tx_packets")
        ));
    }
    let tmp = net_dev.with_extension("tmp");
    std::fs::write(&tmp, out).unwrap();
    std::fs::rename(tmp, net_dev).unwrap();
}
