//! vmd-shim under a zinit (double or real) with a cloud-hypervisor (double
//! or real: `VMD_TEST_CH`, `VMD_TEST_KERNEL`, `VMD_TEST_INITRD`).

use std::time::{Duration, Instant};

use std::os::unix::fs::PermissionsExt;
use vmd_runtime::control;
use vmd_runtime::state::Phase;
use vmd_tests::vm::{
    alive, boot_timeout, cpu_ticks, proc_status, real_ch, rss_kib, tail, TestVm, TEST_FIRST_UID,
};
use vmd_tests::{until, until_some, Supervisor};
use zinit::State;

const SHORT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_the_vmm_hardened_with_the_console_in_the_log() {
    let z = Supervisor::start();
    let vm = TestVm::new(&z, "start", "gaction=wait");
    vm.start(&z).await;
    vm.wait_console("GUEST-READY", 1, boot_timeout()).await;
    let pid = vm.vmm_pid(SHORT).await;
    let shim = vm.shim_pid(&z).await;
    assert_eq!(vm.state().phase, Phase::Running);
    // Its own process group, child of the shim, dying with it, no new privileges.
    assert_eq!(unsafe { libc::getpgid(pid) }, pid);
    let ppid: i32 = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap()
        .rsplit_once(") ")
        .unwrap()
        .1
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(ppid, shim);
    assert_eq!(proc_status(pid, "NoNewPrivs").as_deref(), Some("1"));
    if unsafe { libc::geteuid() } == 0 {
        // No taps, no devices: no capability at all.
        assert_eq!(
            proc_status(pid, "CapBnd").as_deref(),
            Some("0000000000000000")
        );
        assert_eq!(
            proc_status(pid, "CapEff").as_deref(),
            Some("0000000000000000")
        );
        // The node's OOM killer takes other processes first (as the Go
        // module sets it); the shim keeps its own.
        let adj = |p: i32| std::fs::read_to_string(format!("/proc/{p}/oom_score_adj")).unwrap();
        // Lowering it takes CAP_SYS_RESOURCE, which some sandboxes (this
        // project's CI among them) withhold even from root: then the shim
        // says so and the VMM keeps the default.
        let ring = z.client().service_log(&vm.service).await.unwrap();
        if has_cap(CAP_SYS_RESOURCE) {
            assert_eq!(adj(pid).trim(), "-200", "{ring:#?}");
        } else {
            assert!(
                ring.iter()
                    .any(|l| l.contains("cannot set the VMM's oom_score_adj to -200")),
                "{ring:#?}"
            );
        }
        assert_ne!(adj(shim).trim(), "-200");
        // Its own user and group, from the range, and nothing else.
        let uid = vm_uid(pid);
        assert!(
            (TEST_FIRST_UID..TEST_FIRST_UID + 65536).contains(&uid),
            "{uid}"
        );
        assert_eq!(
            proc_status(pid, "Gid").as_deref(),
            Some(format!("{uid}\t{uid}\t{uid}\t{uid}").as_str())
        );
        // Its root is the jail: the host's /etc, /root, /proc are not there.
        let root = std::path::PathBuf::from(format!("/proc/{pid}/root"));
        for gone in ["etc", "root", "proc", "home", "var"] {
            assert!(!root.join(gone).exists(), "{gone} visible in the jail");
        }
        // Nor the files beside the VM's own: its console log, its record.
        let inside = |p: &std::path::Path| root.join(p.strip_prefix("/").unwrap());
        assert!(!inside(&vm.spec.console.log).exists());
        assert!(!inside(&vm.run.spec()).exists());
        assert!(root.join("dev/null").exists());
        assert!(root
            .join(vm.spec.kernel.strip_prefix("/").unwrap())
            .exists());
    }
    // Lifecycle lines are in zinit's ring, console bytes are not.
    let ring = z.client().service_log(&vm.service).await.unwrap();
    assert!(
        ring.iter().any(|l| l.contains("vmm running pid=")),
        "{ring:?}"
    );
    assert!(
        !ring.iter().any(|l| l.contains("GUEST-READY")),
        "console in the ring: {ring:?}"
    );
    // The API answers.
    let ping = vmd_runtime::vmm::api::expect_ok(&vm.api_socket(), "GET", "vmm.ping", SHORT)
        .await
        .unwrap();
    let ping: serde_json::Value = serde_json::from_slice(&ping).unwrap();
    assert_eq!(ping["pid"].as_i64(), Some(pid as i64));
    let info = vmd_runtime::vmm::api::expect_ok(&vm.api_socket(), "GET", "vm.info", SHORT)
        .await
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info).unwrap();
    assert_eq!(info["state"], "Running");
    assert_eq!(info["config"]["memory"]["size"].as_u64(), Some(256 << 20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_vmm_is_restarted_with_back_off() {
    let z = Supervisor::start();
    let vm = TestVm::new(&z, "vmmkill", "gaction=wait");
    vm.start(&z).await;
    vm.wait_console("GUEST-READY", 1, boot_timeout()).await;
    let first = vm.vmm_pid(SHORT).await;
    let shim = vm.shim_pid(&z).await;
    let killed = Instant::now();
    unsafe {
        libc::kill(first, libc::SIGKILL);
    }
    let st = vm
        .wait_state("a new VMM", SHORT, |s| {
            s.vmm.is_some_and(|v| v.pid != first && v.alive())
        })
        .await;
    let took = killed.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "restarted after {took:?}: no back-off"
    );
    assert_eq!(st.restarts, 1);
    assert_eq!(st.exits.len(), 1);
    assert!(st.exits[0].status.contains("SIGKILL"), "{:?}", st.exits);
    // Same shim: the VMM was restarted by the shim, not by zinit.
    assert_eq!(vm.shim_pid(&z).await, shim);
    vm.wait_console("GUEST-READY", 2, boot_timeout()).await;
    let ring = z.client().service_log(&vm.service).await.unwrap();
    assert!(
        ring.iter()
            .any(|l| l.contains("vmm exited: signal 9 (SIGKILL)")),
        "{ring:?}"
    );
    assert!(
        ring.iter().any(|l| l.contains("restarting in 1 s")),
        "{ring:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_shim_leaves_no_orphan_and_the_vm_comes_back() {
    let z = Supervisor::start();
    let vm = TestVm::new(&z, "shimkill", "gaction=wait");
    vm.start(&z).await;
    vm.wait_console("GUEST-READY", 1, boot_timeout()).await;
    let vmm = vm.vmm_pid(SHORT).await;
    let shim = vm.shim_pid(&z).await;
    unsafe {
        libc::kill(shim, libc::SIGKILL);
    }
    // The VMM dies with its shim (death signal), at once.
    let t0 = Instant::now();
    while alive(vmm) {
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "orphan VMM {vmm} outlived its shim"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // zinit respawns the shim, which starts the VM again.
    let st = vm
        .wait_state("the VM back", SHORT, |s| {
            s.vmm.is_some_and(|v| v.pid != vmm && v.alive())
        })
        .await;
    assert_ne!(vm.shim_pid(&z).await, shim);
    assert_eq!(st.restarts, 1, "{st:?}");
    vm.wait_console("GUEST-READY", 2, boot_timeout()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_gives_up_with_the_reason_and_burns_no_cpu() {
    if real_ch() {
        eprintln!("skipped: needs the double's crash knob");
        return;
    }
    let z = Supervisor::start();
    let mut vm = TestVm::new(&z, "loop", "gaction=wait double.crash_after_ms=150");
    vm.spec.restart.max_exits = 3;
    vm.spec.restart.max_backoff_secs = 1;
    vm.start(&z).await;
    let st = vm
        .wait_state("failed", Duration::from_secs(20), |s| {
            s.phase == Phase::Failed
        })
        .await;
    let reason = st.reason.clone().unwrap();
    assert!(reason.contains("3 times"), "{reason}");
    assert!(reason.contains("vCPU error"), "{reason}");
    assert!(
        st.last_console
            .as_deref()
            .unwrap_or("")
            .contains("GUEST-HELLO"),
        "{st:?}"
    );
    assert!(st.vmm.is_none());
    // Idle: no VMM, no CPU, and zinit sees a running (not respawning) shim.
    let shim = vm.shim_pid(&z).await;
    let before = cpu_ticks(shim);
    // Watched for 3 s: an observation window, not a wait for an event.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(cpu_ticks(shim), before, "an idle failed shim used CPU");
    assert_eq!(vm.shim_pid(&z).await, shim);
    assert_eq!(vm.state().exits.len(), 3);
    let ring = z.client().service_log(&vm.service).await.unwrap();
    assert!(ring.iter().any(|l| l.contains("gave up:")), "{ring:?}");
    // A shim restarted by zinit stays failed (the state is on disk).
    unsafe {
        libc::kill(shim, libc::SIGKILL);
    }
    let t0 = Instant::now();
    while vm.shim_pid(&z).await == shim {
        assert!(t0.elapsed() < SHORT);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The new shim reads the state and says it stays idle.
    let c = z.client();
    until(SHORT, "the new shim's decision", || async {
        let ring = c.service_log(&vm.service).await.unwrap_or_default();
        ring.iter().any(|l| l.contains("the VM failed earlier"))
    })
    .await;
    let st = vm.state();
    assert_eq!(st.phase, Phase::Failed);
    assert!(st.vmm.is_none(), "a failed VM was started again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cooperating_guest_stops_gracefully_before_the_grace_period() {
    let z = Supervisor::start();
    let vm = TestVm::new(&z, "graceful", "gaction=wait");
    vm.start(&z).await;
    vm.wait_console("GUEST-READY", 1, boot_timeout()).await;
    let vmm = vm.vmm_pid(SHORT).await;
    let t0 = Instant::now();
    // zinit stop = SIGTERM to the shim's group; the VMM is in its own group.
    z.client()
        .stop_and_wait(&vm.service, Duration::from_secs(60))
        .await
        .unwrap();
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(vm.spec.grace_secs),
        "took {took:?}; shim: {:?}\nconsole:\n{}",
        z.client()
            .service_log(&vm.service)
            .await
            .unwrap_or_default(),
        tail(&vm.console(), 3000)
    );
    assert!(!alive(vmm));
    let st = z.client().status(&vm.service).await.unwrap();
    assert_eq!(st.state, State::Success, "the shim did not exit 0");
    assert!(vm.console().contains("GUEST-POWER-BUTTON: powering off"));
    let s = vm.state();
    assert_eq!(s.phase, Phase::Stopped);
    assert!(s.reason.unwrap().contains("guest powered off"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_ignoring_the_power_button_is_forced_after_the_grace_period() {
    if real_ch() {
        eprintln!("skipped: needs the double's ignore_power_button knob");
        return;
    }
    let z = Supervisor::start();
    let mut vm = TestVm::new(&z, "stubborn", "gaction=wait double.ignore_power_button=1");
    vm.spec.grace_secs = 2;
    vm.start(&z).await;
    vm.wait_console("GUEST-READY", 1, boot_timeout()).await;
    let vmm = vm.vmm_pid(SHORT).await;
    // The way vmd stops a VM: through the shim's control socket first.
    let t0 = Instant::now();
    let reply = control::request(&vm.run.control_socket(), "stop", Duration::from_secs(30))
        .await
        .unwrap();
    let took = t0.elapsed();
    assert_eq!(reply, "stopped");
    assert!(
        took >= Duration::from_secs(2),
        "forced before the grace period: {took:?}"
    );
    assert!(took < Duration::from_secs(8), "took {took:?}");
    assert!(!alive(vmm));
    let s = vm.state();
    assert_eq!(s.phase, Phase::Stopped);
    assert!(
        s.reason
            .as_deref()
            .unwrap()
            .contains("forced after the grace period"),
        "{s:?}"
    );
    // After a control stop the shim idles: nothing restarts the VM
    // (watched for 3 s: an observation window, not a wait for an event).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(vm.state().vmm.is_none());
    let st = z.client().status(&vm.service).await.unwrap();
    assert_eq!(st.state, State::Running, "the shim should idle, not exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_powered_off_guest_is_restarted_unless_not_kept_alive() {
    let z = Supervisor::start();
    let vm = TestVm::new(&z, "keep", "gaction=poweroff");
    vm.start(&z).await;
    vm.wait_console("GUEST-POWEROFF", 2, boot_timeout() * 2)
        .await;
    let st = vm.state();
    assert!(st.restarts >= 1);
    assert!(st.exits.iter().all(|e| e.clean), "{st:?}");
    // Done with it: a real guest rebooting beside the next one would halve
    // the speed of both on an emulated KVM.
    z.client()
        .stop_and_wait(&vm.service, Duration::from_secs(60))
        .await
        .unwrap();

    let mut off = TestVm::new(&z, "nokeep", "gaction=poweroff");
    off.spec.keep_alive = false;
    off.start(&z).await;
    let st = off
        .wait_state("powered off", boot_timeout(), |s| {
            s.phase == Phase::PoweredOff
        })
        .await;
    assert_eq!(st.restarts, 0);
    // Watched for 2 s: an observation window, not a wait for an event.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        off.console().matches("GUEST-POWEROFF").count(),
        1,
        "restarted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shim_for_a_deleted_vm_starts_nothing() {
    let z = Supervisor::start();
    let vm = TestVm::new(&z, "gone", "gaction=wait");
    std::fs::write(vm.run.deleted_mark(), "").unwrap();
    vm.start(&z).await;
    let c = z.client();
    let t0 = Instant::now();
    loop {
        let st = c.status(&vm.service).await.unwrap();
        if st.state == State::Success {
            break;
        }
        assert!(t0.elapsed() < SHORT, "{st:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!vm.run.state().exists(), "the shim did something");
    assert!(!vm.api_socket().exists());
    let ring = c.service_log(&vm.service).await.unwrap();
    assert!(ring.iter().any(|l| l.contains("being deleted")), "{ring:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_api_socket_does_not_prevent_the_start() {
    let z = Supervisor::start();
    let vm = TestVm::new(&z, "stale", "gaction=wait");
    // What a SIGKILLed VMM leaves: a socket file nobody listens on, and its lock.
    std::fs::create_dir_all(vm.api_socket().parent().unwrap()).unwrap();
    let stale = std::os::unix::net::UnixListener::bind(vm.api_socket()).unwrap();
    drop(stale);
    std::fs::create_dir_all(vm.api_socket().parent().unwrap()).unwrap();
    let mut lock = vm.api_socket().into_os_string();
    lock.push(".lock");
    std::fs::write(lock, "").unwrap();
    vm.start(&z).await;
    vm.wait_console("GUEST-READY", 1, boot_timeout()).await;
    vm.vmm_pid(SHORT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_flood_stays_within_bounds() {
    if real_ch() {
        eprintln!("skipped: needs the double's flood knob");
        return;
    }
    let z = Supervisor::start();
    let vm = TestVm::new(&z, "flood", "gaction=wait double.flood_bps=0");
    vm.start(&z).await;
    vm.wait_console("GUEST-READY", 1, boot_timeout()).await;
    let shim = vm.shim_pid(&z).await;
    let mut rss = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        rss.push(rss_kib(shim));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let log = std::fs::read(&vm.spec.console.log).unwrap();
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(vmd_runtime::console::meta_path(&vm.spec.console.log)).unwrap(),
    )
    .unwrap();
    let total = meta["base"].as_u64().unwrap() + log.len() as u64;
    eprintln!(
        "flood: {} MB through the shim in 10 s ({:.0} MB/s), log {} bytes, shim RSS {:?} KiB",
        total / 1_000_000,
        total as f64 / 1e6 / 10.0,
        log.len(),
        (rss.iter().min().unwrap(), rss.iter().max().unwrap())
    );
    assert!(
        total > 8 << 20,
        "the flood never reached rotation ({total} bytes)"
    );
    assert!(
        log.len() as u64 <= (8 << 20) + (64 << 10),
        "log of {} bytes",
        log.len()
    );
    assert!(!log.contains(&0), "NUL bytes in the log");
    // The kept tail is whole lines, in order, with no gap.
    let text = String::from_utf8(log).unwrap();
    let seqs: Vec<u64> = text
        .lines()
        .filter_map(|l| {
            l.strip_prefix("FLOOD ")
                .and_then(|r| r.get(..12))
                .and_then(|n| n.parse().ok())
        })
        .collect();
    assert!(seqs.len() > 1000);
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "gap or disorder in the kept tail"
    );
    let (lo, hi) = (*rss.iter().min().unwrap(), *rss.iter().max().unwrap());
    assert!(hi - lo < 2048, "shim memory grew from {lo} to {hi} KiB");
    assert!(!tail(&text, 100).is_empty());
}

/// The console keeps every boot whole: its first line (the guest prints at
/// once; a serial socket connected after the start lost it on v39) and its
/// last line before power-off (a socket's queue was dropped at exit on v53),
/// across VMM restarts and a kill -9 of the shim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_boot_keeps_its_first_and_last_console_lines() {
    let z = Supervisor::start();
    let mut vm = TestVm::new(&z, "whole", "gaction=poweroff");
    // Restart after every power-off, never give up, back off 1 s at most.
    vm.spec.restart.max_exits = 1000;
    vm.spec.restart.window_secs = 1;
    vm.spec.restart.max_backoff_secs = 1;
    vm.start(&z).await;
    let boots = if real_ch() { 1 } else { 3 };
    let limit = boot_timeout() * (boots + 1);
    vm.wait_console("reboot: Power down", boots as usize, limit)
        .await;
    let shim = vm.shim_pid(&z).await;
    unsafe {
        libc::kill(shim, libc::SIGKILL);
    }
    vm.wait_console("reboot: Power down", 2 * boots as usize, limit)
        .await;
    // Every VMM start is a boot whose first line is in the log: the
    // double's is its GUEST-HELLO, printed at once; a real guest's is the
    // kernel's banner, about 10 s after the start — so the start under way
    // when the last power-off was seen is waited for, and one start may
    // lack it: the one killed with the shim within its first seconds.
    let (first_line, cut_short) = if real_ch() {
        ("Linux version", 1)
    } else {
        ("GUEST-HELLO", 0)
    };
    let (st, log, firsts) =
        until_some(boot_timeout(), "the first line of the latest start", || {
            let (st, log) = (vm.state(), vm.console());
            let firsts = log.matches(first_line).count() as u64;
            async move { (firsts + cut_short > st.restarts).then_some((st, log, firsts)) }
        })
        .await;
    assert!(
        (st.restarts + 1 - cut_short..=st.restarts + 2).contains(&firsts),
        "{firsts} boots in the log for {} VMM starts:\n{}",
        st.restarts + 1,
        tail(&log, 3000)
    );
    // … and every boot that was not cut short ends with its last line: at
    // most the one killed with the shim and the one still running do not.
    let segments: Vec<&str> = log.split("GUEST-HELLO").skip(1).collect();
    let cut: Vec<usize> = segments
        .iter()
        .enumerate()
        .filter(|(_, s)| !(s.contains("GUEST-POWEROFF") && s.contains("reboot: Power down")))
        .map(|(i, _)| i)
        .collect();
    let cut_before_the_last = cut.iter().filter(|&&i| i + 1 != segments.len()).count();
    assert!(
        cut_before_the_last <= 1,
        "boots without their last line: {cut:?} of {}:\n{}",
        segments.len(),
        tail(&log, 3000)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_socket_answers_while_a_share_daemon_is_slow_to_start() {
    if real_ch() {
        eprintln!("skipped: uses the recording virtiofsd");
        return;
    }
    let z = Supervisor::start();
    let mut vm = TestVm::new(&z, "slowfs", "gaction=wait");
    let shared = z.dir.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let socket = vm.run.share_socket(0);
    vm.spec.virtiofsd = vmd_tests::bin("vmd-test-probe");
    vm.spec.shares = vec![vmd_runtime::spec::Share {
        tag: "data".into(),
        socket: socket.clone(),
        source: shared,
    }];
    let mut delay = socket.clone().into_os_string();
    delay.push(".delay_ms");
    std::fs::write(&delay, "4000").unwrap();
    let mut status = socket.clone().into_os_string();
    status.push(".status");
    let status = std::path::PathBuf::from(status);
    vm.start(&z).await;
    until(SHORT, "the share daemon started", || async {
        status.exists()
    })
    .await;
    assert!(!socket.exists(), "the daemon bound its socket early");
    // The shim waits for the daemon's socket; its control socket answers
    // meanwhile (it froze for the whole wait when the wait blocked).
    let t0 = Instant::now();
    let line = vmd_runtime::control::request(
        &vm.run.control_socket(),
        "status",
        Duration::from_millis(1500),
    )
    .await
    .unwrap_or_else(|e| panic!("no status while virtiofsd starts: {e}"));
    assert!(line.contains("\"phase\":\"starting\""), "{line}");
    assert!(t0.elapsed() < Duration::from_millis(1500));
    assert!(
        !socket.exists(),
        "answered only after the wait: not a test of it"
    );
    vm.wait_state("booted", Duration::from_secs(20), |s| s.booted())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_state_is_said_and_kept_not_silently_reset() {
    let z = Supervisor::start();
    let vm = TestVm::new(&z, "corrupt", "gaction=wait");
    std::fs::write(vm.run.state(), b"{\"version\":1,\"phase\":\"fai").unwrap();
    vm.start(&z).await;
    let c = z.client();
    until(SHORT, "the shim says the state is corrupt", || async {
        let ring = c.service_log(&vm.service).await.unwrap_or_default();
        ring.iter()
            .any(|l| l.contains("is corrupt") && l.contains("kept as"))
    })
    .await;
    let kept = vm.run.state().with_extension("json.corrupt");
    assert_eq!(
        std::fs::read(&kept).unwrap(),
        b"{\"version\":1,\"phase\":\"fai"
    );
    vm.wait_state("booted", boot_timeout(), |s| s.booted())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_kernel_fails_the_vm_once_instead_of_a_crash_loop() {
    let z = Supervisor::start();
    let mut vm = TestVm::new(&z, "nokernel", "gaction=wait");
    vm.spec.kernel = z.dir.path().join("no-such-vmlinux");
    vm.start(&z).await;
    let st = vm
        .wait_state("failed", SHORT, |s| s.phase == Phase::Failed)
        .await;
    let reason = st.reason.clone().unwrap();
    assert!(
        reason.contains("the kernel") && reason.contains("does not exist"),
        "{reason}"
    );
    assert!(st.exits.is_empty(), "retried like a crash: {st:?}");
    assert_eq!(st.restarts, 0);
    let kinds: Vec<_> = st.events.recent.iter().map(|e| e.kind).collect();
    use vmd_runtime::events::EventKind;
    assert_eq!(kinds, [EventKind::Starting, EventKind::Failed]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_pushes_the_state_then_each_event_and_resumes_after_a_seq() {
    use vmd_runtime::control::ShimClient;
    use vmd_runtime::events::{EventKind, WatchLine};
    let z = Supervisor::start();
    let vm = TestVm::new(&z, "watched", "gaction=wait");
    vm.start(&z).await;
    vm.wait_state("booted", boot_timeout(), |s| s.booted())
        .await;
    let shim = ShimClient::new(&vm.run);
    let mut w = shim.watch(0, SHORT).await.unwrap();
    let Some(WatchLine::State(st)) = w.next().await.unwrap() else {
        panic!("the state comes first");
    };
    assert!(st.booted());
    let mut kinds = Vec::new();
    for _ in 0..st.events.seq {
        match w.next().await.unwrap() {
            Some(WatchLine::Event(e)) => kinds.push((e.seq, e.kind)),
            other => panic!("expected an event, got {other:?}"),
        }
    }
    assert_eq!(kinds, [(1, EventKind::Starting), (2, EventKind::Booted)]);
    // Live: a VMM crash arrives as it happens, on the open watch.
    let vmm = vm.vmm_pid(SHORT).await;
    unsafe {
        libc::kill(vmm, libc::SIGKILL);
    }
    let next = tokio::time::timeout(SHORT, w.next())
        .await
        .unwrap()
        .unwrap();
    match next {
        Some(WatchLine::Event(e)) => {
            assert_eq!((e.seq, e.kind), (3, EventKind::Crashed));
            assert!(e.reason.unwrap().starts_with("signal 9"));
        }
        other => panic!("expected the crash, got {other:?}"),
    }
    // A watcher that comes back after seq 2 gets the state, then 3 on.
    let mut again = shim.watch(2, SHORT).await.unwrap();
    assert!(matches!(
        again.next().await.unwrap(),
        Some(WatchLine::State(_))
    ));
    match again.next().await.unwrap() {
        Some(WatchLine::Event(e)) => assert_eq!(e.seq, 3),
        other => panic!("expected event 3, got {other:?}"),
    }
}

/// The VMM's uid, which must be the same real, effective, saved and fs.
fn vm_uid(pid: i32) -> u32 {
    let line = proc_status(pid, "Uid").unwrap();
    let ids: Vec<u32> = line.split('\t').map(|x| x.parse().unwrap()).collect();
    assert_eq!(ids.len(), 4, "{line}");
    assert!(ids.iter().all(|i| *i == ids[0]), "{line}");
    ids[0]
}

/// Finding 3 of issue 26: the VMM ran as uid 0 without capabilities, which
/// still writes every root-owned file. Jailed, a VMM (the double opens the
/// paths itself, as a guest that escaped into it would) finds the host's
/// files absent, the VM's read-only ones read-only, and may write only its
/// own disk; each VM has a user of its own, and its taps come open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jailed_vmm_writes_nothing_but_its_own_disk_and_gets_its_taps_open() {
    if real_ch() || unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root and the double's try_write knob");
        return;
    }
    let z = Supervisor::start();
    let ns = vmd_tests::netns::NetNs::new(None).unwrap();
    let host = tempfile::tempdir().unwrap();
    let secret = host.path().join("root-owned");
    std::fs::write(&secret, "host file").unwrap();
    let disk = host.path().join("disk.img");
    let mut vm = TestVm::new(&z, "jailed", "gaction=wait");
    let kernel = vm.spec.kernel.clone();
    vm.spec.cmdline.push_str(&format!(
        " double.try_write={},{},{}",
        secret.display(),
        kernel.display(),
        disk.display()
    ));
    vm.add_private_disk(&disk, 4096);
    let tap = vm.add_tap(&ns, "vt", "de:ad:be:ef:00:01");
    let other = TestVm::new(&z, "neighbour", "gaction=wait");
    vm.start(&z).await;
    other.start(&z).await;
    vm.wait_console("GUEST-READY", 1, boot_timeout()).await;
    other.wait_console("GUEST-READY", 1, boot_timeout()).await;
    let console = vm.console();
    let said = |p: &std::path::Path| {
        let marker = format!("GUEST-WRITE {} ", p.display());
        console
            .lines()
            .find_map(|l| {
                l.trim_end()
                    .strip_prefix(marker.as_str())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| panic!("no {marker} in {console}"))
    };
    assert!(
        said(&secret).starts_with("No such file or directory"),
        "{console}"
    );
    // Not the VM's own read-only files either (root's, and mounted so).
    let k = said(&kernel);
    assert!(
        k.starts_with("Permission denied") || k.starts_with("Read-only file system"),
        "{console}"
    );
    assert_eq!(said(&disk), "ok", "{console}");
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "host file");
    let pid = vm.vmm_pid(SHORT).await;
    let uid = vm_uid(pid);
    assert_ne!(uid, vm_uid(other.vmm_pid(SHORT).await), "two VMs, one user");
    // The disk was given to the VM's user, and only it.
    let meta = std::fs::metadata(&disk).unwrap();
    assert_eq!(
        (
            std::os::unix::fs::MetadataExt::uid(&meta),
            meta.permissions().mode() & 0o777
        ),
        (uid, 0o600)
    );
    // The tap: fd 4 of the VMM, attached to the VM's tap, in the VM's
    // namespace, up; and the VMM has no capability to attach to it itself.
    let fdinfo = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/4")).unwrap();
    assert!(fdinfo.contains(&format!("iff:\t{tap}")), "{fdinfo}");
    assert_eq!(
        proc_status(pid, "CapEff").as_deref(),
        Some("0000000000000000")
    );
    let link = std::process::Command::new("ip")
        .args(["-n", &ns.name, "-o", "link", "show", &tap])
        .output()
        .unwrap();
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(link.contains(",UP"), "{link}");
    let info = vmd_runtime::vmm::api::expect_ok(&vm.api_socket(), "GET", "vm.info", SHORT)
        .await
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info).unwrap();
    assert_eq!(
        info["config"]["net"][0]["fds"],
        serde_json::json!([-1]),
        "{info}"
    );
}

/// Whether this process has `cap` in its effective set.
fn has_cap(cap: u32) -> bool {
    let eff = proc_status(std::process::id() as i32, "CapEff").unwrap_or_default();
    u64::from_str_radix(&eff, 16).is_ok_and(|bits| bits & (1 << cap) != 0)
}

/// `capability.h`.
const CAP_SYS_RESOURCE: u32 = 24;

/// Issue 26, with the double or a real cloud-hypervisor and guest: a VM
/// with a disk, a tap and a share boots and powers off under its own uid
/// and mount view; the VMM has no capability, `no_new_privs`, and (a real
/// one) every thread under seccomp.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jailed_vm_with_a_disk_a_tap_and_a_share_boots_and_powers_off() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: the jail takes root");
        return;
    }
    let pinned = std::env::var_os("VMD_TEST_VIRTIOFSD").map(std::path::PathBuf::from);
    let Some(virtiofsd) = pinned
        .clone()
        .or_else(|| vmd_runtime::layout::resolve_program(std::path::Path::new("virtiofsd")))
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| std::path::PathBuf::from(h).join(".cargo/bin/virtiofsd"))
                .filter(|p| p.exists())
        })
    else {
        panic!("virtiofsd not found: the test command installs it");
    };
    let z = Supervisor::start();
    let ns = vmd_tests::netns::NetNs::new(None).unwrap();
    let host = tempfile::tempdir().unwrap();
    let disk = host.path().join("data.img");
    let share = host.path().join("share");
    std::fs::create_dir(&share).unwrap();
    // Slow enough a boot (the double's knob) to look at the VMM first.
    let mut vm = TestVm::new(&z, "whole-jail", "gaction=poweroff double.boot_ms=3000");
    vm.spec.keep_alive = false;
    vm.spec.virtiofsd = virtiofsd;
    vm.spec.memory_mib = 256;
    vm.add_private_disk(&disk, 4 << 20);
    vm.add_tap(&ns, "vj", "de:ad:be:ef:00:02");
    // A real v39 cannot talk to today's virtiofsd (1.14: `VhostUserGet
    // ProtocolFeatures(InvalidMessage)`, by hand too, no vmd in the loop;
    // 1.10.1 works): no share there unless one is given.
    let old_real = real_ch()
        && pinned.is_none()
        && std::process::Command::new(vmd_tests::vm::ch_binary())
            .arg("--version")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).starts_with("cloud-hypervisor v39"));
    if old_real {
        eprintln!("v39: no share (it cannot talk to virtiofsd 1.14; set VMD_TEST_VIRTIOFSD)");
    } else {
        vm.spec.shares.push(vmd_runtime::spec::Share {
            tag: "data".into(),
            socket: vm.run.share_socket(0),
            source: share.clone(),
        });
    }
    vm.start(&z).await;
    let pid = vm.vmm_pid(boot_timeout()).await;
    let uid = vm_uid(pid);
    assert!(
        (TEST_FIRST_UID..TEST_FIRST_UID + 65536).contains(&uid),
        "{uid}"
    );
    assert_eq!(
        proc_status(pid, "CapEff").as_deref(),
        Some("0000000000000000")
    );
    assert_eq!(
        proc_status(pid, "CapBnd").as_deref(),
        Some("0000000000000000")
    );
    assert_eq!(proc_status(pid, "NoNewPrivs").as_deref(), Some("1"));
    let root = std::path::PathBuf::from(format!("/proc/{pid}/root"));
    assert!(!root.join("etc").exists());
    assert!(
        root.join(disk.strip_prefix("/").unwrap()).exists(),
        "the disk is not in the VMM's view (alive: {}): {}",
        alive(pid),
        vm.console()
    );
    if real_ch() {
        // cloud-hypervisor's own filters, on every thread it started.
        vm.wait_console("GUEST-HELLO", 1, boot_timeout()).await;
        let mut unfiltered = Vec::new();
        for t in std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
        {
            let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            let name = status.lines().next().unwrap_or("").to_owned();
            if !status.lines().any(|l| l == "Seccomp:\t2") {
                unfiltered.push(name);
            }
        }
        eprintln!(
            "VMM pid {pid} uid {uid}: {} threads, without seccomp: {unfiltered:?}",
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .unwrap()
                .count()
        );
        assert!(
            unfiltered.is_empty(),
            "threads without seccomp: {unfiltered:?}"
        );
    }
    let st = vm
        .wait_state("powered off", boot_timeout(), |s| {
            s.phase == Phase::PoweredOff
        })
        .await;
    assert_eq!(st.restarts, 0, "{st:?}");
    let console = vm.console();
    assert!(console.contains("GUEST-POWEROFF"), "{console}");
    assert!(console.contains("GUEST-DISK vda sectors=8192"), "{console}");
}
