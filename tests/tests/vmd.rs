//! vmd end to end: the zbus client → a real Redis → the `vmd` binary →
//! zinit (double or real) → vmd-shim → cloud-hypervisor (double or real).

use std::time::{Duration, Instant};

use vmd::api::{Vm, VmDisk, VmIface};
use vmd::zbus::client::ClientError;
use vmd_tests::stack::Stack;
use vmd_tests::until;
use vmd_tests::vm::{alive, pvm_host, real_ch, LineClock};

type Env = Stack;

/// Starts vmd again and asks, as a Go caller with a 1 s deadline that
/// starts with the process: the status object, then `Exists(bystander)`.
async fn restart_and_serve_at_once(env: &mut Env, bystander: &str) -> Duration {
    let go = env.caller(Duration::from_secs(1));
    let t0 = Instant::now();
    env.vmd.restart();
    let answered = tokio::time::timeout(Duration::from_secs(1), async {
        go.status().await.map(drop)?;
        go.exists(bystander).await
    })
    .await;
    match answered {
        Ok(Ok(true)) => t0.elapsed(),
        other => panic!(
            "status and Exists({bystander}) not answered within 1 s of the restart: {other:?}\n{}",
            env.vmd.stderr()
        ),
    }
}

fn vms_dir_is_empty(env: &Env) -> bool {
    std::fs::read_dir(env.vmd.runtime().join("vms")).map_or(true, |mut d| d.next().is_none())
}

fn method_err(e: ClientError) -> String {
    match e {
        ClientError::Method(m) => m,
        other => panic!("expected a method error, got {other}"),
    }
}

async fn vmm_pid(env: &Env, name: &str) -> i64 {
    let t0 = Instant::now();
    loop {
        if let Some(pid) = env.stub.inspect(name).await.unwrap().pid {
            return pid;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no VMM pid for {name}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_full_lifecycle() {
    let mut env = Env::start(&[]).await;
    let s = env.caller(Duration::from_secs(90));
    let s = &s;
    env.tap("t-web", [1000, 10, 2000, 20]);
    env.tap("p-web", [3000, 30, 4000, 40]);
    let mut vm = env.vm("12-345-web", &[("gaction", "wait")]);
    for (tap, mac) in [
        ("t-web", "de:ad:be:ef:00:01"),
        ("p-web", "DE:AD:BE:EF:00:02"),
    ] {
        vm.network.ifaces.push(VmIface {
            tap: tap.into(),
            mac: mac.into(),
            ..Default::default()
        });
    }
    let disk = env.sys.path().join("data.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    vm.disks.push(VmDisk {
        path: disk.to_string_lossy().into_owned(),
        target: "/data".into(),
    });
    let t0 = Instant::now();
    let info = s.run(&vm).await.unwrap();
    eprintln!("Run returned after {:?}", t0.elapsed());
    assert_eq!(info.console_url, "");
    assert!(s.exists("12-345-web").await.unwrap());
    assert_eq!(s.list().await.unwrap(), ["12-345-web"]);
    // A retried Run of the same VM is answered like the first; a different
    // VM under the same name is refused.
    s.run(&vm).await.unwrap();
    let mut other = vm.clone();
    other.cpu = 2.min(std::thread::available_parallelism().map_or(1, |n| n.get()) as u8);
    other.memory += 1 << 20;
    assert_eq!(
        method_err(s.run(&other).await.unwrap_err()),
        "a vm with same name already exists"
    );

    // zinit sees it, and its ring has the shim's lifecycle lines.
    let z = env.zinit.client();
    assert!(z.list().await.unwrap().contains_key("vm:12-345-web"));
    let ring = z
        .service_log(&"vm:12-345-web".parse().unwrap())
        .await
        .unwrap();
    assert!(
        ring.iter().any(|l| l.contains("vmm running pid=")),
        "{ring:?}"
    );

    let i = s.inspect("12-345-web").await.unwrap();
    assert_eq!((i.cpu, i.memory, i.ht_enabled), (1, 256, false));
    assert_eq!(i.state.as_deref(), Some("running"));
    assert_eq!(i.restarts, Some(0));
    let pid = i.pid.unwrap();
    assert!(alive(pid as i32));
    // The cloud-init seed is the VMM's last disk, read-only.
    let seed = env.vmd.root().join("cloud-init").join("12-345-web.img");
    assert_eq!(std::fs::metadata(&seed).unwrap().len(), 2 << 20);
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.run_dir("12-345-web").join("vm.json")).unwrap())
            .unwrap();
    let disks = spec["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2);
    assert_eq!(disks[1]["path"].as_str(), seed.to_str());
    assert_eq!(disks[1]["readonly"], true);
    env.wait_logs("12-345-web", "GUEST-READY").await;
    let tail = s.logs("12-345-web").await.unwrap();
    assert!(tail.len() <= 2048 && tail.contains("GUEST-READY"), "{tail}");
    assert!(s
        .logs_full("12-345-web")
        .await
        .unwrap()
        .contains("GUEST-HELLO"));
    assert!(s
        .logs_full("12-345-web")
        .await
        .unwrap()
        .contains("GUEST-DISK vda"));

    // Lock pauses, unlock resumes; both idempotent.
    s.lock("12-345-web", true).await.unwrap();
    s.lock("12-345-web", true).await.unwrap();
    assert_eq!(
        s.inspect("12-345-web").await.unwrap().state.as_deref(),
        Some("paused")
    );
    s.lock("12-345-web", false).await.unwrap();
    s.lock("12-345-web", false).await.unwrap();
    assert_eq!(
        s.inspect("12-345-web").await.unwrap().state.as_deref(),
        Some("running")
    );

    // Metrics: taps summed by kind, restarts, never going backwards; what
    // the VMM uses only from `Usage`, with the same counters.
    let m = &s.metrics().await.unwrap()["12-345-web"];
    assert_eq!(
        (m.private.net_rx_bytes, m.private.net_tx_packets),
        (1000, 20)
    );
    assert_eq!((m.public.net_rx_bytes, m.public.net_tx_bytes), (3000, 4000));
    assert_eq!(m.restarts, Some(0));
    assert_eq!((m.memory_rss, m.cpu_time_ms), (None, None));
    let u = &s.usage().await.unwrap()["12-345-web"];
    assert!(u.memory_rss.unwrap() > 0);
    assert!(u.cpu_time_ms.is_some() && u.disk_read_bytes.is_some());
    assert_eq!(
        (&u.private, &u.public, u.restarts),
        (&m.private, &m.public, m.restarts)
    );
    env.tap("t-web", [1500, 15, 2500, 25]);
    assert_eq!(
        s.metrics().await.unwrap()["12-345-web"]
            .private
            .net_rx_bytes,
        1500
    );
    // The tap is re-created: its counters restart from zero.
    env.tap("t-web", [100, 1, 200, 2]);
    let m = &s.metrics().await.unwrap()["12-345-web"];
    assert_eq!(m.private.net_rx_bytes, 1600, "went backwards");
    assert_eq!(m.private.net_tx_packets, 27);
    // What a caller was told survives a kill -9 of vmd, and a re-creation
    // of the tap while vmd is down.
    env.vmd.crash();
    env.tap("t-web", [50, 1, 60, 1]);
    env.vmd.restart();
    env.vmd.wait_ready().await;
    let m = &env.stub.metrics().await.unwrap()["12-345-web"];
    assert_eq!(
        (m.private.net_rx_bytes, m.private.net_tx_packets),
        (1650, 28),
        "went backwards across a vmd restart"
    );

    let t0 = Instant::now();
    s.delete("12-345-web").await.unwrap();
    let took = t0.elapsed();
    eprintln!("Delete (graceful) took {took:?}");
    // Before vmd's grace (30 s): the guest powered off by itself, it was
    // not forced (issue 27: real guests too).
    assert!(took < Duration::from_secs(30), "forced: {took:?}");
    assert!(!alive(pid as i32));
    assert!(!s.exists("12-345-web").await.unwrap());
    assert!(s.list().await.unwrap().is_empty());
    assert_eq!(s.logs("12-345-web").await.unwrap(), "no logs available");
    assert_eq!(
        method_err(s.inspect("12-345-web").await.unwrap_err()),
        "machine '12-345-web' does not exist"
    );
    env.assert_gone("12-345-web").await;
    // Idempotent.
    s.delete("12-345-web").await.unwrap();
    assert!(s.metrics().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_that_cannot_start_leaves_nothing_and_says_why() {
    if real_ch() {
        eprintln!("skipped: needs the double's crash knobs");
        return;
    }
    let env = Env::start(&[]).await;
    // What a kernel cloud-hypervisor cannot load does: an error chain, exit 1.
    let vm = env.vm("broken", &[("double.boot_fail", "1")]);
    let e = method_err(env.stub.run(&vm).await.unwrap_err());
    assert!(
        e.starts_with("failed to start vm broken: the VM stopped right after its start: exit 1"),
        "{e}"
    );
    assert!(
        e.contains("Cannot load the kernel"),
        "no console tail in: {e}"
    );
    assert!(!env.stub.exists("broken").await.unwrap());
    env.assert_gone("broken").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_vms_and_hostile_names_are_refused_and_nothing_is_written() {
    let env = Env::start(&[]).await;
    let s = &env.stub;
    let ok = env.vm("valid", &[]);
    let mut cases: Vec<(Vm, &str)> = Vec::new();
    for name in [
        "",
        "../x",
        "a/b",
        "a b",
        "a\"b",
        "a\nb",
        "$(id)",
        ".hidden",
        &"x".repeat(300),
    ] {
        cases.push((
            Vm {
                name: name.into(),
                ..ok.clone()
            },
            "name",
        ));
    }
    cases.push((
        Vm {
            cpu: 0,
            ..ok.clone()
        },
        "cpu 0",
    ));
    cases.push((
        Vm {
            cpu: 255,
            ..ok.clone()
        },
        "cpu 255",
    ));
    cases.push((
        Vm {
            memory: 100 << 20,
            ..ok.clone()
        },
        "below the minimum",
    ));
    cases.push((
        Vm {
            kernel_image: String::new(),
            ..ok.clone()
        },
        "kernel image is required",
    ));
    cases.push((
        Vm {
            kernel_image: "/no/such/kernel".into(),
            ..ok.clone()
        },
        "kernel image",
    ));
    cases.push((
        Vm {
            kernel_image: "relative/kernel".into(),
            ..ok.clone()
        },
        "absolute",
    ));
    cases.push((
        Vm {
            initrd_image: "/no/initrd".into(),
            ..ok.clone()
        },
        "initrd",
    ));
    let mut v = ok.clone();
    v.disks.push(VmDisk {
        path: env.kernel(),
        target: "/".into(),
    });
    cases.push((v, "target cannot be '/'"));
    let mut v = ok.clone();
    v.disks.push(VmDisk {
        path: "/no/disk,x".into(),
        target: String::new(),
    });
    cases.push((v, "disk"));
    let mut v = ok.clone();
    v.kernel_args.insert("init".into(), "/bin/sh -c x".into());
    cases.push((v, "cannot be put on the command line"));
    let mut v = ok.clone();
    v.network.ifaces.push(VmIface {
        tap: "t-missing".into(),
        mac: "de:ad:be:ef:00:01".into(),
        ..Default::default()
    });
    cases.push((v, "does not exist"));
    env.tap("t-ok", [0; 4]);
    let mut v = ok.clone();
    v.network.ifaces.push(VmIface {
        tap: "t-ok".into(),
        mac: "not-a-mac".into(),
        ..Default::default()
    });
    cases.push((v, "invalid MAC"));
    let mut v = ok.clone();
    v.network.ifaces.push(VmIface {
        tap: "t-ok; rm".into(),
        mac: "de:ad:be:ef:00:01".into(),
        ..Default::default()
    });
    cases.push((v, "invalid tap name"));
    let mut v = ok.clone();
    let mut nic = VmIface {
        tap: "t-ok".into(),
        mac: "de:ad:be:ef:00:01".into(),
        ..Default::default()
    };
    nic.ips.push(vmd::api::IpNet {
        ip: vmd::api::Ip(serde_bytes::ByteBuf::from(vec![10, 0, 0])),
        mask: vmd::api::Ip(serde_bytes::ByteBuf::from(vec![255, 255, 255, 0])),
    });
    v.network.ifaces.push(nic);
    cases.push((v, "not an IP address"));
    let mut v = ok.clone();
    v.entrypoint = "/bin/sh -c 'unbalanced".into();
    cases.push((v, "unbalanced quotes"));
    let mut v = ok.clone();
    v.devices.push("0000:01:00.0; x".into());
    cases.push((v, "invalid PCI address"));
    let mut v = ok.clone();
    v.environment.insert("BAD-NAME".into(), "x".into());
    cases.push((v, "environment variable"));
    let mut v = ok.clone();
    v.boot.kind = 7;
    cases.push((v, "unknown boot type"));
    for (vm, want) in cases {
        let e = method_err(s.run(&vm).await.unwrap_err());
        assert!(
            e.starts_with("machine configuration validation failed: "),
            "{e}"
        );
        assert!(e.contains(want), "{:?}: {e:?} lacks {want:?}", vm.name);
    }
    assert!(vms_dir_is_empty(&env), "something was written");
    assert!(
        env.zinit.config_dir().list().unwrap().is_empty(),
        "a service file was written"
    );
    for bad in ["../x", "a b", "a\nb", ""] {
        assert!(!s.exists(bad).await.unwrap());
        assert!(s.inspect(bad).await.is_err());
        assert!(s.lock(bad, true).await.is_err());
        assert_eq!(s.logs(bad).await.unwrap(), "no logs available");
    }
    assert!(s.delete("../x").await.is_err());
    assert!(s.list().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_shim_and_vmm_come_back_and_inspect_counts_restarts() {
    let env = Env::start(&[]).await;
    let s = &env.stub;
    s.run(&env.vm("phoenix", &[("gaction", "wait")]))
        .await
        .unwrap();
    let first = vmm_pid(&env, "phoenix").await;
    unsafe {
        libc::kill(first as i32, libc::SIGKILL);
    }
    let t0 = Instant::now();
    loop {
        let i = s.inspect("phoenix").await.unwrap();
        if i.pid.is_some_and(|p| p != first) {
            assert_eq!(i.restarts, Some(1));
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "VMM not restarted: {i:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Now the shim.
    let st = env
        .zinit
        .client()
        .status(&"vm:phoenix".parse().unwrap())
        .await
        .unwrap();
    let vmm = vmm_pid(&env, "phoenix").await;
    unsafe {
        libc::kill(st.pid as i32, libc::SIGKILL);
    }
    let t0 = Instant::now();
    loop {
        let i = s.inspect("phoenix").await.unwrap();
        if i.pid.is_some_and(|p| p != vmm) {
            assert_eq!(i.restarts, Some(2));
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "VM not back after the shim died: {i:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!alive(vmm as i32), "orphan VMM");
    s.delete("phoenix").await.unwrap();
    env.assert_gone("phoenix").await;
}

/// Polls Inspect until the VM's state is `want` (or fails after 20 s).
async fn wait_state(env: &Env, name: &str, want: &str) -> vmd::api::VmInfo {
    let t0 = Instant::now();
    loop {
        let i = env.stub.inspect(name).await.unwrap();
        if i.state.as_deref() == Some(want) {
            return i;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{name} never {want}: {i:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_outlives_a_vmm_crash_and_a_locked_vm_still_deletes_gracefully() {
    let env = Env::start(&[]).await;
    let s = &env.stub;
    s.run(&env.vm("frozen", &[])).await.unwrap();
    s.lock("frozen", true).await.unwrap();
    wait_state(&env, "frozen", "paused").await;
    let first = vmm_pid(&env, "frozen").await;
    unsafe {
        libc::kill(first as i32, libc::SIGKILL);
    }
    // The new VMM boots the guest and is paused again by the shim.
    let t0 = Instant::now();
    while vmm_pid(&env, "frozen").await == first {
        assert!(t0.elapsed() < Duration::from_secs(15), "VMM not restarted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let i = wait_state(&env, "frozen", "paused").await;
    assert_eq!(i.restarts, Some(1));
    // Unlocked, a later crash brings it back running.
    s.lock("frozen", false).await.unwrap();
    wait_state(&env, "frozen", "running").await;
    let second = vmm_pid(&env, "frozen").await;
    unsafe {
        libc::kill(second as i32, libc::SIGKILL);
    }
    let t0 = Instant::now();
    while vmm_pid(&env, "frozen").await == second {
        assert!(t0.elapsed() < Duration::from_secs(15), "VMM not restarted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Console output of this (third) boot starts here.
    let third_boot = s.logs_full("frozen").await.unwrap().len();
    // The shim decides about the lock once the guest of a VMM booted, and
    // says so: after its decision for this third VMM the unlocked VM must
    // still run.
    let third = vmm_pid(&env, "frozen").await;
    let svc = zinit::ServiceName::new("vm:frozen").unwrap();
    until(
        Duration::from_secs(20),
        "the shim's lock decision for the third VMM",
        || async {
            let ring = env
                .zinit
                .client()
                .service_log(&svc)
                .await
                .unwrap_or_default();
            let started = format!("vmm running pid={third}");
            ring.iter()
                .skip_while(|l| !l.contains(&started))
                .any(|l| l.contains("the guest booted"))
        },
    )
    .await;
    wait_state(&env, "frozen", "running").await;
    // A paused guest cannot see the power button: the shim resumes it for
    // its shutdown instead of waiting out the 30 s grace. (A real guest's
    // `acpid` listens a few seconds after GUEST-READY; the shim's later
    // presses cover that.)
    if real_ch() {
        env.wait_logs_since("frozen", "GUEST-READY", third_boot)
            .await;
    }
    s.lock("frozen", true).await.unwrap();
    wait_state(&env, "frozen", "paused").await;
    // A second name for the console log, to show it should this fail:
    // Delete removes the log's name, not what the shim writes until it ends.
    let console = env.sys.path().join("frozen.console");
    std::fs::hard_link(env.log("frozen"), &console).unwrap();
    let clock = LineClock::start(console.clone());
    let t0 = Instant::now();
    s.delete("frozen").await.unwrap();
    let took = t0.elapsed();
    // On a kvm_pvm host a real guest often cannot power off after a pause
    // (see `pvm_host`): there the shim must still resume it, press, and
    // force it after the grace; everywhere else the guest powers off by
    // itself, well inside the grace.
    let guest_may_fail = real_ch() && pvm_host();
    let limit = Duration::from_secs(match (real_ch(), guest_may_fail) {
        (false, _) => 10,
        (true, false) => 25,
        (true, true) => 30 + 10,
    });
    let ring = env.zinit.client().log_snapshot().await.unwrap_or_default();
    assert!(
        took < limit,
        "delete took {took:?}; zinit: {:#?}\nconsole:\n{}\nconsole during the delete:\n{}",
        ring.iter()
            .filter(|l| l.contains("vm:frozen"))
            .collect::<Vec<_>>(),
        vmd_tests::vm::tail(
            &String::from_utf8_lossy(&std::fs::read(&console).unwrap_or_default()),
            2000
        ),
        clock.report()
    );
    env.assert_gone("frozen").await;
    let said = |what: &str| {
        ring.iter()
            .any(|l| l.contains("vm:frozen") && l.contains(what))
    };
    assert!(
        said("resuming it so it can shut down"),
        "no resume before the shutdown in zinit's log"
    );
    assert!(said("stopping: power button"), "no press: {ring:#?}");
    if guest_may_fail && !said("stopped: the guest powered off") {
        assert!(
            said("stopped: forced after the grace period"),
            "neither powered off nor forced: {ring:#?}"
        );
        eprintln!(
            "kvm_pvm host: the resumed guest did not power off within the grace \
             (see vmd_tests::vm::pvm_host); forced as designed; console during \
             the delete:\n{}",
            clock.report()
        );
    } else {
        assert!(
            said("stopped: the guest powered off"),
            "the guest did not power off by itself: {ring:#?}"
        );
    }
    eprintln!("locked VM deleted in {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_is_reported_failed_listed_and_deletable() {
    if real_ch() {
        eprintln!("skipped: needs the double's crash knob");
        return;
    }
    let env = Env::start(&["--restart-max", "3"]).await;
    let s = &env.stub;
    // Up long enough for Run to succeed, then dying again and again.
    s.run(&env.vm("looper", &[("double.crash_after_ms", "400")]))
        .await
        .unwrap();
    let t0 = Instant::now();
    let info = loop {
        let i = s.inspect("looper").await.unwrap();
        if i.state.as_deref() == Some("failed") {
            break i;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "never failed: {i:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let reason = info.reason.unwrap();
    assert!(
        reason.contains("3 times") && reason.contains("vCPU error"),
        "{reason}"
    );
    assert_eq!(s.list().await.unwrap(), ["looper"]);
    // The console of a failed VM is kept until it is deleted.
    assert!(s.logs("looper").await.unwrap().contains("GUEST-HELLO"));
    s.delete("looper").await.unwrap();
    env.assert_gone("looper").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmd_killed_during_run_serves_at_once_and_answers_the_run() {
    if real_ch() {
        eprintln!("skipped: needs the double's api delay knob");
        return;
    }
    let mut env = Env::start(&[]).await;
    env.stub.run(&env.vm("bystander", &[])).await.unwrap();
    // The VMM's API comes up late: vmd is killed while it waits for it.
    for (i, at) in [10u64, 150, 600].iter().enumerate() {
        let name = format!("half-{i}");
        let vm = env.vm(&name, &[("double.api_delay_ms", "1500")]);
        let stub = env.caller(Duration::from_secs(60));
        let call = tokio::spawn(async move { stub.run(&vm).await });
        tokio::time::sleep(Duration::from_millis(*at)).await;
        env.vmd.crash();
        let took = restart_and_serve_at_once(&mut env, "bystander").await;
        eprintln!("killed {at} ms into a Run: served {took:?} after the restart");
        // The caller still waits: the restarted vmd rolls the half-done Run
        // back, serves it again, and answers it as a first Run.
        call.await.unwrap().unwrap();
        assert!(env.stub.exists(&name).await.unwrap(), "killed at {at} ms");
        let log = env.vmd.stderr();
        assert!(
            log.contains("serving a request an earlier run took"),
            "killed at {at} ms: the Run was not served again\n{log}"
        );
    }
    // Killed right after Run answered: the VM is there and adopted.
    env.stub.run(&env.vm("whole", &[])).await.unwrap();
    let pid = vmm_pid(&env, "whole").await;
    env.vmd.crash_and_restart();
    env.vmd.wait_ready().await;
    assert!(env.stub.exists("whole").await.unwrap());
    assert_eq!(
        vmm_pid(&env, "whole").await,
        pid,
        "the VM was restarted instead of adopted"
    );
    // bystander, half-0..2 and whole.
    until(Duration::from_secs(20), "no reconciliation report", || {
        std::future::ready(env.vmd.stderr().contains("adopted=5"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmd_killed_during_a_graceful_delete_serves_at_once_and_finishes_it() {
    if real_ch() {
        eprintln!("skipped: needs the double's ignore_power_button knob");
        return;
    }
    let grace = 3;
    let mut env = Env::start(&["--grace-secs", &grace.to_string()]).await;
    env.stub.run(&env.vm("bystander", &[])).await.unwrap();
    for (i, at) in [50u64, 1000, 2500].iter().enumerate() {
        let name = format!("doomed-{i}");
        env.stub
            .run(&env.vm(&name, &[("double.ignore_power_button", "1")]))
            .await
            .unwrap();
        let pid = vmm_pid(&env, &name).await;
        let stub = env.caller(Duration::from_secs(60));
        let n = name.clone();
        let call = tokio::spawn(async move { stub.delete(&n).await });
        tokio::time::sleep(Duration::from_millis(*at)).await;
        env.vmd.crash();
        call.abort();
        // The restarted vmd finishes the Delete in the background, waiting
        // for the guest, and serves everyone else meanwhile.
        let took = restart_and_serve_at_once(&mut env, "bystander").await;
        eprintln!("killed {at} ms into a graceful Delete: served {took:?} after the restart");
        assert!(!env.stub.exists(&name).await.unwrap());
        if i == 0 {
            // Retried at once: the call waits for this VM's reconciliation
            // and answers as a Delete of a VM that is gone.
            env.stub.delete(&name).await.unwrap();
            env.assert_gone(&name).await;
        } else {
            env.wait_gone(&name).await;
            env.stub.delete(&name).await.unwrap();
        }
        assert!(!alive(pid as i32));
        assert!(env.stub.exists("bystander").await.unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_answer_at_once_while_64_graceful_deletes_wait_for_their_guests() {
    if real_ch() {
        eprintln!("skipped: 64 real guests do not fit this machine; needs ignore_power_button");
        return;
    }
    let grace = 3u64;
    let env = Env::start(&["--grace-secs", &grace.to_string()]).await;
    env.stub.run(&env.vm("bystander", &[])).await.unwrap();
    let names: Vec<String> = (0..64).map(|i| format!("stubborn-{i}")).collect();
    let mut runs = Vec::new();
    for name in &names {
        let stub = env.caller(Duration::from_secs(120));
        let vm = env.vm(name, &[("double.ignore_power_button", "1")]);
        runs.push(tokio::spawn(async move { stub.run(&vm).await }));
    }
    for r in runs {
        r.await.unwrap().unwrap();
    }
    let mut deletes = Vec::new();
    for name in &names {
        let stub = env.caller(Duration::from_secs(120));
        let name = name.clone();
        deletes.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let got = stub.delete(&name).await;
            (name, got, t0.elapsed())
        }));
    }
    // All 64 are in flight, each waiting for its own guest, and each past
    // its first step (the VM is gone for callers).
    let go = env.caller(Duration::from_secs(1));
    until(
        Duration::from_secs(10),
        "64 Deletes never ran at once",
        || async {
            let all_running = go.status().await.is_ok_and(|st| {
                st.workers
                    .iter()
                    .filter(|w| w.action.ends_with(".Delete()"))
                    .count()
                    == 64
            });
            all_running && go.list().await.is_ok_and(|l| l == ["bystander"])
        },
    )
    .await;
    // Go callers with a 1 s deadline, while every Delete is still running.
    let mut worst = Duration::ZERO;
    for round in 0..5 {
        let t0 = Instant::now();
        assert!(go.exists("bystander").await.unwrap(), "round {round}");
        assert!(
            !go.exists("stubborn-7").await.unwrap(),
            "a VM being deleted is gone for callers"
        );
        assert_eq!(go.list().await.unwrap(), ["bystander"]);
        assert_eq!(
            go.inspect("bystander").await.unwrap().state.as_deref(),
            Some("running")
        );
        assert!(go.inspect("stubborn-9").await.is_err());
        assert!(go.logs("bystander").await.is_ok());
        go.status().await.unwrap();
        worst = worst.max(t0.elapsed());
    }
    let st = go.status().await.unwrap();
    let still = st
        .workers
        .iter()
        .filter(|w| w.action.ends_with(".Delete()"))
        .count();
    assert_eq!(
        still, 64,
        "the reads were only answered after Deletes ended"
    );
    eprintln!("5 rounds of 7 reads while 64 Deletes were in flight: worst round {worst:?}");
    let mut longest = Duration::ZERO;
    for d in deletes {
        let (name, got, took) = d.await.unwrap();
        got.unwrap_or_else(|e| panic!("Delete({name}): {e}"));
        // Each waits for its own guest only, not behind the others.
        assert!(
            took <= Duration::from_secs(grace + 2),
            "Delete({name}) took {took:?} (grace {grace} s)"
        );
        longest = longest.max(took);
    }
    eprintln!("64 graceful Deletes: longest {longest:?} (grace {grace} s)");
    for name in &names {
        env.assert_gone(name).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_are_removed_at_start_up() {
    let mut env = Env::start(&[]).await;
    env.stub.run(&env.vm("keeper", &[])).await.unwrap();
    env.vmd.crash();
    // A service without a VM, and a VM directory without a service.
    let dir = env.zinit.config_dir();
    let ghost: zinit::ServiceName = "vm:ghost".parse().unwrap();
    let sleeper = zinit::Command::new(["/bin/sleep", "1000"]).unwrap();
    dir.install(&ghost, &zinit::Service::new(sleeper)).unwrap();
    env.zinit.client().monitor(&ghost).await.unwrap();
    let stray = env.run_dir("stray");
    std::fs::create_dir_all(&stray).unwrap();
    std::fs::write(stray.join("vm.json"), "{}").unwrap();
    env.vmd.restart();
    env.vmd.wait_ready().await;
    // Reconciliation runs in the background.
    let z = env.zinit.client();
    until(Duration::from_secs(20), "orphans never removed", || async {
        !stray.exists()
            && !dir.exists(&ghost)
            && z.list().await.is_ok_and(|l| !l.contains_key("vm:ghost"))
    })
    .await;
    assert_eq!(env.stub.list().await.unwrap(), ["keeper"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_run_delete_cycles_leave_nothing_behind() {
    if real_ch() {
        eprintln!("skipped: 200 real guests take hours");
        return;
    }
    let env = Env::start(&[]).await;
    let t0 = Instant::now();
    for round in 0..20 {
        let mut calls = Vec::new();
        for i in 0..10 {
            let stub = env.caller(Duration::from_secs(60));
            let vm = env.vm(&format!("cycle-{round}-{i}"), &[]);
            calls.push(tokio::spawn(async move {
                stub.run(&vm).await.unwrap();
                stub.delete(&vm.name).await.unwrap();
            }));
        }
        for c in calls {
            c.await.unwrap();
        }
    }
    eprintln!("200 Run/Delete cycles in {:?}", t0.elapsed());
    assert!(env.stub.list().await.unwrap().is_empty());
    env.assert_nothing_left().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_named_like_another_ones_sidecar_is_refused_and_touches_nothing() {
    // `logs/a.meta` is VM a's console sidecar: a VM named `a.meta` would
    // write its console over it (and `Delete a` would remove its log).
    let env = Env::start(&[]).await;
    env.stub.run(&env.vm("a", &[])).await.unwrap();
    env.wait_logs("a", "GUEST-HELLO").await;
    let meta = env.log("a").with_file_name("a.meta");
    let before = std::fs::read(&meta).unwrap();
    for taken in ["a.meta", "a.rotating", "a.tmp"] {
        let m = method_err(env.stub.run(&env.vm(taken, &[])).await.unwrap_err());
        assert!(m.contains("keeps for the files beside"), "{taken}: {m}");
        assert!(!env.stub.exists(taken).await.unwrap());
    }
    assert_eq!(std::fs::read(&meta).unwrap(), before, "a's sidecar changed");
    assert!(env.stub.logs("a").await.unwrap().contains("GUEST-HELLO"));
    env.stub.delete("a").await.unwrap();
    env.assert_gone("a").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_reaches_no_file_outside_the_allowed_paths_nor_another_vms() {
    // Paths in a spec come from users' deployments. What was accepted
    // before: another VM's cloud-init seed (its SSH keys, its secrets) as a
    // writable disk, another VM's request as an initrd, /etc/shadow as a
    // disk, / as a share. Each refused now, saying by which rule.
    // The Go module's config directory where a VM could name it (under an
    // allowed path): refused all the same.
    let go = tempfile::tempdir().unwrap();
    let go_dir = go.path().join("go-config");
    let env = Env::start(&["--go-config-dir", go_dir.to_str().unwrap()]).await;
    env.stub.run(&env.vm("victim", &[])).await.unwrap();
    let seed = env.vmd.root().join("cloud-init").join("victim.img");
    let request = env.run_dir("victim").join("request.json");
    assert!(seed.exists() && request.exists());
    let disk = |p: &std::path::Path| VmDisk {
        path: p.to_string_lossy().into_owned(),
        target: String::new(),
    };
    let link = env.sys.path().join("innocent.img");
    std::os::unix::fs::symlink(&seed, &link).unwrap();
    let mut cases: Vec<(&str, Vm, &str)> = Vec::new();
    let mut vm = env.vm("thief", &[]);
    vm.disks = vec![disk(&seed)];
    cases.push(("another VM's seed as a disk", vm, "inside vmd's own files"));
    let mut vm = env.vm("thief", &[]);
    vm.disks = vec![disk(&link)];
    cases.push(("a link to it", vm, "inside vmd's own files"));
    let mut vm = env.vm("thief", &[]);
    vm.initrd_image = request.to_string_lossy().into_owned();
    cases.push((
        "another VM's request as an initrd",
        vm,
        "inside vmd's own files",
    ));
    let mut vm = env.vm("thief", &[]);
    vm.disks = vec![disk(&go_dir.join("victim"))];
    cases.push((
        "another VM's Go config as a disk",
        vm,
        "inside vmd's own files",
    ));
    let mut vm = env.vm("thief", &[]);
    vm.disks = vec![disk(std::path::Path::new("/etc/shadow"))];
    cases.push(("/etc/shadow as a disk", vm, "outside the paths VMs may use"));
    let mut vm = env.vm("thief", &[]);
    vm.shared = vec![vmd::api::SharedDir {
        id: "all".into(),
        path: "/".into(),
        target: "/mnt/all".into(),
    }];
    cases.push(("/ as a share", vm, "outside the paths VMs may use"));
    for (what, vm, rule) in cases {
        let m = method_err(env.stub.run(&vm).await.unwrap_err());
        assert!(m.contains(rule), "{what}: {m}");
        assert!(!env.stub.exists("thief").await.unwrap(), "{what}");
    }
    // What the test's own directory holds is fine.
    let ok = env.sys.path().join("data.img");
    std::fs::write(&ok, vec![0u8; 1 << 20]).unwrap();
    let mut vm = env.vm("honest", &[]);
    vm.disks = vec![disk(&ok)];
    env.stub.run(&vm).await.unwrap();
    for name in ["honest", "victim"] {
        env.stub.delete(name).await.unwrap();
    }
    env.assert_nothing_left().await;
}
