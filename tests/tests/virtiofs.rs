//! Golden cloud-hypervisor command lines, virtio-fs with a real virtiofsd,
//! and PCI devices owned by one VM at a time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmd::api::{Boot, SharedDir, Vm, VmDisk, VmIface};
use vmd::stub::VmdStub;
use vmd::vm::plan::{plan, InUse, Plan, Settings};
use vmd::vm::Host;
use vmd_runtime::vmm::args::hypervisor_args;
use vmd_runtime::vmm::Version;
use vmd_runtime::HostPaths;
use vmd_tests::supervisor::processes_with;
use vmd_tests::{RedisServer, Supervisor, VmdProcess};

/// The plan of `vm` on `host`, no PCI device owned by another VM.
fn validate(vm: &Vm, host: &Host, settings: &Settings) -> Result<Plan, String> {
    plan(vm, host, settings, &InUse::new()).map_err(|e| e.to_string())
}

fn layout(t: &Path) -> Host {
    Host {
        paths: HostPaths::new(t.join("root"), t.join("run")),
        zinit_dir: t.join("zinit"),
        zinit_socket: t.join("zinit.sock"),
        shim: "/usr/bin/vmd-shim".into(),
        hypervisor: "/usr/bin/cloud-hypervisor".into(),
        virtiofsd: Some("/usr/libexec/virtiofsd".into()),
        logstream: "/usr/bin/vmd-logstream".into(),
        netns_dir: "/var/run/netns".into(),
        stream_ca_file: None,
        console: vmd::vm::host::ConsoleHost {
            server: "/usr/bin/vmd-console".into(),
            assets: None,
        },
        api_socket_dir: t.join("api"),
        go_config_dir: Some(t.join("go-config")),
        jail: None,
        tap_netns: None,
        net_dev: "/proc/thread-self/net/dev".into(),
        stream_uid: None,
    }
}

fn fixture(t: &Path) -> (Settings, String) {
    for f in ["vmlinux", "initrd", "root.img", "data.img"] {
        std::fs::write(t.join(f), "x").unwrap();
    }
    for d in ["rootfs", "share1", "share2"] {
        std::fs::create_dir_all(t.join(d)).unwrap();
    }
    std::fs::create_dir_all(t.join("net/t-web")).unwrap();
    std::fs::write(t.join("net/t-web/tun_flags"), "0x1002").unwrap();
    let settings = Settings {
        sys_net: t.join("net"),
        allowed_paths: vec![t.to_path_buf()],
        ..Default::default()
    };
    (settings, t.display().to_string())
}

fn argv(vm: &Vm, t: &Path, settings: &Settings, version: Version) -> String {
    let l = layout(t);
    let valid = validate(vm, &l, settings).unwrap();
    let args = hypervisor_args(&valid.spec, &l.paths.run_dir(&valid.name), version);
    args.join(" ").replace(&t.display().to_string(), "{T}")
}

fn base(t: &str) -> Vm {
    let mut args = BTreeMap::new();
    args.insert("quiet".to_owned(), String::new());
    args.insert("root".to_owned(), "/dev/sda".to_owned());
    Vm {
        name: "web".into(),
        cpu: 1,
        memory: 512 << 20,
        kernel_image: format!("{t}/vmlinux"),
        initrd_image: format!("{t}/initrd"),
        kernel_args: args,
        ..Default::default()
    }
}

#[test]
fn golden_command_line_disk_boot() {
    let dir = tempfile::tempdir().unwrap();
    let (settings, t) = fixture(dir.path());
    let mut vm = base(&t);
    vm.boot = Boot {
        kind: 0,
        path: format!("{t}/root.img"),
    };
    vm.disks.push(VmDisk {
        path: format!("{t}/data.img"),
        target: "/data".into(),
    });
    vm.network.ifaces.push(VmIface {
        tap: "t-web".into(),
        mac: "DE:AD:BE:EF:00:01".into(),
        ..Default::default()
    });
    // v39, what Zero-OS ships: no `image_type` (it refuses the option).
    assert_eq!(
        argv(&vm, dir.path(), &settings, Version::new(39, 0)),
        "--api-socket path={T}/api/web \
         --kernel {T}/vmlinux --initramfs {T}/initrd \
         --cmdline=boot.shell_on_fail console=ttyS0 panic=1 quiet reboot=k root=/dev/vda rw \
         --cpus boot=1 --memory size=512M \
         --serial tty --console off --event-monitor fd=3 \
         --disk path={T}/root.img path={T}/data.img path={T}/root/cloud-init/web.img,readonly=on \
         --net fd=4,mac=de:ad:be:ef:00:01"
    );
    // v53: every disk declared with the format detected at Run.
    assert_eq!(
        argv(&vm, dir.path(), &settings, Version::new(53, 0)),
        "--api-socket path={T}/api/web \
         --kernel {T}/vmlinux --initramfs {T}/initrd \
         --cmdline=boot.shell_on_fail console=ttyS0 panic=1 quiet reboot=k root=/dev/vda rw \
         --cpus boot=1 --memory size=512M \
         --serial tty --console off --event-monitor fd=3 \
         --disk path={T}/root.img,image_type=raw path={T}/data.img,image_type=raw \
         path={T}/root/cloud-init/web.img,readonly=on,image_type=raw \
         --net fd=4,mac=de:ad:be:ef:00:01"
    );
}

#[test]
fn golden_command_line_virtiofs_boot_with_shares() {
    let dir = tempfile::tempdir().unwrap();
    let (settings, t) = fixture(dir.path());
    let mut vm = base(&t);
    vm.boot = Boot {
        kind: 1,
        path: format!("{t}/rootfs"),
    };
    vm.shared.push(SharedDir {
        id: "data".into(),
        path: format!("{t}/share1"),
        target: "/data".into(),
    });
    vm.shared.push(SharedDir {
        id: "cache".into(),
        path: format!("{t}/share2"),
        target: "/var/cache".into(),
    });
    assert_eq!(
        argv(&vm, dir.path(), &settings, Version::new(53, 0)),
        "--api-socket path={T}/api/web \
         --kernel {T}/vmlinux --initramfs {T}/initrd \
         --cmdline=boot.shell_on_fail console=ttyS0 panic=1 quiet reboot=k root=vroot rootdelay=30 rootfstype=virtiofs rw \
         --cpus boot=1 --memory size=512M,shared=on \
         --serial tty --console off --event-monitor fd=3 \
         --disk path={T}/root/cloud-init/web.img,readonly=on,image_type=raw \
         --fs tag=vroot,socket={T}/run/vms/web/fs-0.sock tag=data,socket={T}/run/vms/web/fs-1.sock \
         tag=cache,socket={T}/run/vms/web/fs-2.sock"
    );
    // Bad shares are refused.
    let mut bad = vm.clone();
    bad.shared[1].id = "data".into();
    assert!(validate(&bad, &layout(dir.path()), &settings)
        .err()
        .unwrap()
        .contains("used twice"));
    let mut bad = vm.clone();
    bad.shared[0].id = "a b".into();
    assert!(validate(&bad, &layout(dir.path()), &settings)
        .err()
        .unwrap()
        .contains("invalid share id"));
    let mut bad = vm.clone();
    bad.shared[0].path = format!("{t}/vmlinux");
    assert!(validate(&bad, &layout(dir.path()), &settings)
        .err()
        .unwrap()
        .contains("not a directory"));
    let mut no_daemon = layout(dir.path());
    no_daemon.virtiofsd = None;
    assert!(validate(&vm, &no_daemon, &settings)
        .err()
        .unwrap()
        .contains("needs virtiofsd"));
}

fn virtiofsd() -> PathBuf {
    if let Some(p) = std::env::var_os("VMD_TEST_VIRTIOFSD") {
        return p.into();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("virtiofsd"))
        .chain([PathBuf::from("/usr/libexec/virtiofsd")])
        .find(|p| p.exists())
        .expect("virtiofsd not found: the test command installs it (cargo install virtiofsd)")
}

/// The `Field:` of a `/proc/<pid>/status` text.
fn status_field(status: &str, field: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in {status}"))
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtiofsd_runs_hardened_like_the_vmm() {
    if vmd_tests::vm::real_ch() {
        eprintln!("skipped: the shared guest has no virtio-fs driver");
        return;
    }
    // A virtiofsd that records how the shim started it (the real one
    // restricts itself further, which would hide what the shim did).
    let probe = vmd_tests::bin("vmd-test-probe")
        .to_string_lossy()
        .into_owned();
    let env = vmd_tests::stack::Stack::start(&["--virtiofsd", &probe]).await;
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().display().to_string();
    fixture(dir.path());
    let mut vm = base(&t);
    vm.shared.push(SharedDir {
        id: "one".into(),
        path: format!("{t}/share1"),
        target: "/one".into(),
    });
    env.stub.run(&vm).await.unwrap();
    let status = std::fs::read_to_string(env.run_dir("web").join("fs-0.sock.status")).unwrap();
    assert_eq!(status_field(&status, "NoNewPrivs"), "1");
    if unsafe { libc::geteuid() } == 0 {
        // As root: only what a file server needs, nothing of network,
        // modules, devices, tracing or system administration.
        let bounding = u64::from_str_radix(&status_field(&status, "CapBnd"), 16).unwrap();
        // CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID SETGID SETUID SETPCAP
        // SYS_CHROOT SYS_RESOURCE MKNOD SETFCAP
        let allowed = [0, 1, 2, 3, 4, 6, 7, 8, 18, 24, 27, 31];
        // (of those this machine allows at all).
        let ours = std::fs::read_to_string("/proc/self/status").unwrap();
        let ours = u64::from_str_radix(&status_field(&ours, "CapBnd"), 16).unwrap();
        let want: u64 = allowed.iter().map(|b| 1u64 << b).sum::<u64>() & ours;
        assert_eq!(bounding, want, "virtiofsd bounding set {bounding:#x}");
    }
    env.stub.delete("web").await.unwrap();
    env.assert_gone("web").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_shares_run_two_real_virtiofsd_and_delete_leaves_nothing() {
    if vmd_tests::vm::real_ch() {
        eprintln!("skipped: the shared guest has no virtio-fs driver");
        return;
    }
    let redis = RedisServer::start();
    let zinit = Supervisor::start();
    let daemon = virtiofsd().to_string_lossy().into_owned();
    let vmd = VmdProcess::start_with(&redis, Some(&zinit), &["--virtiofsd", &daemon]);
    let stub = VmdStub::new(redis.broker()).with_timeout(Duration::from_secs(60));
    vmd.wait_ready().await;
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().display().to_string();
    let (_, _) = fixture(dir.path());
    let mut vm = base(&t);
    vm.shared.push(SharedDir {
        id: "one".into(),
        path: format!("{t}/share1"),
        target: "/one".into(),
    });
    vm.shared.push(SharedDir {
        id: "two".into(),
        path: format!("{t}/share2"),
        target: "/two".into(),
    });
    // The double refuses to start unless it can connect to both sockets.
    stub.run(&vm).await.unwrap();
    let run = vmd.runtime().join("vms/web");
    let marker = run.display().to_string();
    let daemons: Vec<i32> = processes_with(&marker)
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("--shared-dir="))
        })
        .collect();
    assert_eq!(daemons.len(), 2, "virtiofsd processes: {daemons:?}");
    assert!(run.join("fs-0.sock").exists() && run.join("fs-1.sock").exists());
    let ring = zinit
        .client()
        .service_log(&"vm:web".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(
        ring.iter()
            .filter(|l| l.contains("virtiofsd for share"))
            .count(),
        2,
        "{ring:?}"
    );
    stub.delete("web").await.unwrap();
    let t0 = Instant::now();
    while !processes_with(&marker).is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "daemons left: {:?}",
            processes_with(&marker)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!run.exists(), "sockets left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pci_device_belongs_to_one_vm() {
    if vmd_tests::vm::real_ch() {
        eprintln!(
            "skipped: the PCI device is a fake sysfs entry; a real cloud-hypervisor needs a real \
             VFIO-bound device, and this host has no VFIO"
        );
        return;
    }
    let redis = RedisServer::start();
    let zinit = Supervisor::start();
    let dir = tempfile::tempdir().unwrap();
    let pci = dir.path().join("pci");
    std::fs::create_dir_all(pci.join("0000:01:00.0")).unwrap();
    let pci_flag = pci.display().to_string();
    let vmd = VmdProcess::start_with(&redis, Some(&zinit), &["--sys-pci", &pci_flag]);
    let stub = VmdStub::new(redis.broker()).with_timeout(Duration::from_secs(60));
    vmd.wait_ready().await;
    let t = dir.path().display().to_string();
    let (_, _) = fixture(dir.path());
    let mut a = base(&t);
    a.devices.push("0000:01:00.0".into());
    stub.run(&a).await.unwrap();
    let mut b = a.clone();
    b.name = "other".into();
    let e = stub.run(&b).await.unwrap_err().to_string();
    assert!(
        e.contains("PCI device 0000:01:00.0 is already used by vm web"),
        "{e}"
    );
    assert!(!vmd.runtime().join("vms/other").exists());
    stub.delete("web").await.unwrap();
    stub.run(&b).await.unwrap();
}
