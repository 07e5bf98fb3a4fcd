//! vmd benchmark: `cargo build --release --workspace --bins && cargo bench -p vmd-tests --bench vmd`.
//!
//! Real Redis, the zinit double, the release `vmd` (16 workers), vmd-shim and
//! the cloud-hypervisor double; zinit's config and vmd's runtime directory
//! on a tmpfs, as on a Zero-OS node (its root file system is in RAM;
//! `--root`, on /var/cache, is on disk there and here).
//! Measured in one run:
//!
//! * Run → VMM exec'd: from the moment the client sends `Run` to the moment
//!   the VMM process starts (it writes its own clock first thing), p50/p99
//!   over sequential Runs; baseline: the bench spawning the same double
//!   itself (fork+exec of one process).
//! * 50 concurrent Runs: wall time until all answered; baseline: the same 50
//!   Runs one after the other.
//! * With `VMD_BENCH_VMS` VMs (default 1000), each with a private and a
//!   public tap: List and Metrics p50, against the zbus round trip of
//!   `Exists` (the transport floor); every tap's counters move between two
//!   Metrics calls, as they do on a busy node (so each call saves them);
//!   vmd's RSS against its RSS with no VM.
//! * vmd's CPU over 10 s without calls, with every VM's shim watched,
//!   against the same with no VM (nothing polls: both should be ~0).
//! * VMM exit → `crashed` received by a subscriber of the events channel,
//!   p50/p99 over 200 kill -9 of a VMM (each of another VM); baseline: a raw `PUBLISH` → the same
//!   kind of subscriber (the transport floor). Split in two: kill → the VMM
//!   gone (the kernel's exit, as a thread of the bench blocked on the VMM's
//!   pidfd sees it) and from there → the event (the shim's, vmd's and the
//!   broker's part).

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vmd::api::{Vm, VmIface};
use vmd::events::subscribe::{Filter, Subscription};
use vmd::stub::VmdStub;
use vmd_tests::vm::{cpu_ticks, exec_time, proc_state, rss_kib, settled_memory_kib};
use vmd_tests::{bin, ms, pct, RedisServer, Supervisor, VmdProcess};

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// One scrape of the OpenMetrics endpoint, as Prometheus asks: its size.
fn scrape(at: std::net::SocketAddr) -> usize {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(at).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.0\r\nAccept: application/openmetrics-text;version=1.0.0\r\n\r\n"
    )
    .unwrap();
    let mut body = Vec::new();
    s.read_to_end(&mut body).unwrap();
    assert!(body.ends_with(b"# EOF\n"), "a scrape ended early");
    body.len()
}

fn exec_times(log: &std::path::Path) -> Vec<u128> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(1).and_then(|n| n.parse().ok()))
        .collect()
}

/// vmd's CPU use over `window`, in percent of one core.
async fn idle_cpu(pid: i32, window: Duration) -> f64 {
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let before = cpu_ticks(pid);
    // A measurement window, not a wait for something to happen.
    tokio::time::sleep(window).await;
    (cpu_ticks(pid) - before) as f64 / hz / window.as_secs_f64() * 100.0
}

fn vmm_pid(runtime: &std::path::Path, name: &str) -> Option<i32> {
    let st =
        vmd_runtime::state::ShimState::load(&runtime.join("vms").join(name).join("state.json"))
            .ok()??;
    st.vmm.filter(|v| v.alive()).map(|v| v.pid)
}

/// VMMs killed for the event latency (a p99 needs more than 50).
const KILLS: usize = 200;

/// When a process is gone, as its parent (the shim) can learn it: a thread
/// of the bench blocked on the process's pidfd. The kill is sent only once
/// that thread sleeps in `poll`, so its clock reads the wake-up that the
/// exit causes, not a late look at a pidfd that was already readable. What
/// the kernel does between the SIGKILL and that moment (tearing down the
/// VMM's memory, threads and files) is no watcher's doing.
struct ExitWatch(std::thread::JoinHandle<Instant>);

impl ExitWatch {
    fn start(pid: i32) -> Self {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        assert!(
            fd >= 0,
            "pidfd_open({pid}): {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let _ = tid_tx.send(nix::unistd::gettid().as_raw());
            let mut p = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut p, 1, 30_000) };
            let at = Instant::now();
            assert_eq!(n, 1, "the VMM {pid} did not exit within 30 s");
            at
        });
        // Asleep: the only wait that thread has after sending its id.
        let tid = tid_rx.recv().expect("the exit watch started");
        let stat = format!("/proc/self/task/{tid}/stat");
        while proc_state(&stat) != Some('S') {
            std::thread::yield_now();
        }
        ExitWatch(thread)
    }

    fn exited(self) -> Instant {
        self.0.join().expect("the exit watch panicked")
    }
}

fn main() {
    let vms: usize = vmd_tests::knob("VMD_BENCH_VMS", 1000);
    vmd_tests::bench_main(bench(vms));
}

async fn bench(n_vms: usize) {
    let redis = RedisServer::start();
    let zinit = Supervisor::start_on_tmpfs();
    // zinit's config and vmd's runtime directory on a tmpfs, as on a node
    // (Zero-OS runs from RAM; only `--root`, /var/cache, is on disk).
    let run = vmd_tests::tmpfs_dir("vmd-bench-run-");
    let run_path = run.path().to_string_lossy().into_owned();
    // The fleet's taps: real ones, made by the shims in a namespace of
    // their own; their counters, in a `/proc/net/dev` the bench writes.
    let taps_ns = vmd_tests::netns::NetNs::new(None).expect("a namespace for the taps (root)");
    let taps_ns_path = taps_ns.path().to_string_lossy().into_owned();
    let sys = tempfile::tempdir().unwrap();
    let sys_net = sys.path().join("net");
    let net_dev = sys.path().join("net-dev");
    let (sys_net_s, net_dev_s) = (
        sys_net.to_string_lossy().into_owned(),
        net_dev.to_string_lossy().into_owned(),
    );
    let scrape_at = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let scrape_s = scrape_at.to_string();
    let vmd = VmdProcess::start_with(
        &redis,
        Some(&zinit),
        &[
            "--metrics-listen",
            &scrape_s,
            "--log",
            "warn",
            "--runtime-dir",
            &run_path,
            "--sys-net",
            &sys_net_s,
            "--net-dev",
            &net_dev_s,
            "--tap-netns",
            &taps_ns_path,
        ],
    );
    let stub = Arc::new(VmdStub::new(redis.broker()).with_timeout(Duration::from_secs(120)));
    let t0 = Instant::now();
    while stub.status().await.is_err() {
        assert!(t0.elapsed() < Duration::from_secs(20), "vmd did not start");
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, "x").unwrap();
    let vm = |name: &str, timed: bool| {
        let mut args = BTreeMap::new();
        if timed {
            // On its stderr, which the shim logs: a jailed VMM reaches no
            // file of the bench's.
            args.insert("double.exec_log".to_owned(), "stderr".to_owned());
        }
        Vm {
            name: name.into(),
            cpu: 1,
            memory: 256 << 20,
            kernel_image: kernel.to_string_lossy().into_owned(),
            kernel_args: args,
            ..Default::default()
        }
    };
    let (rss_empty, _) = settled_memory_kib(vmd.pid() as i32).await;
    let idle_empty = idle_cpu(vmd.pid() as i32, Duration::from_secs(10)).await;

    // Run → VMM exec'd, sequential.
    let runs = 60;
    let mut to_exec = Vec::new();
    let mut run_total = Vec::new();
    for i in 0..runs {
        let before = now_ns();
        let t = Instant::now();
        stub.run(&vm(&format!("lat-{i}"), true)).await.unwrap();
        run_total.push(t.elapsed());
        let exec = exec_time(&vmd.root().join("logs").join(format!("lat-{i}"))).await;
        to_exec.push(Duration::from_nanos((exec - before) as u64));
    }
    let (exec_p50, exec_p99) = (pct(&to_exec, 50), pct(&to_exec, 99));
    let run_p50 = pct(&run_total, 50);
    // Baseline: spawning the double directly.
    let direct_log = dir.path().join("direct.log");
    let mut direct = Vec::new();
    for _ in 0..runs {
        let before = now_ns();
        let mut c = Command::new(bin("ch-double"))
            .args([
                "--cmdline",
                &format!("double.exec_log={}", direct_log.display()),
                "--console",
                "off",
            ])
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while exec_times(&direct_log).len() < direct.len() + 1 {
            assert!(t0.elapsed() < Duration::from_secs(5));
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let exec = *exec_times(&direct_log).last().unwrap();
        direct.push(Duration::from_nanos((exec - before) as u64));
        let _ = c.kill();
        let _ = c.wait();
    }
    let direct_p50 = pct(&direct, 50);
    for i in 0..runs {
        stub.delete(&format!("lat-{i}")).await.unwrap();
    }

    // 50 concurrent Runs, and the same 50 sequentially.
    let t0 = Instant::now();
    let calls: Vec<_> = (0..50)
        .map(|i| {
            let (s, v) = (stub.clone(), vm(&format!("conc-{i}"), false));
            tokio::spawn(async move { s.run(&v).await.unwrap() })
        })
        .collect();
    for c in calls {
        c.await.unwrap();
    }
    let concurrent = t0.elapsed();
    for i in 0..50 {
        stub.delete(&format!("conc-{i}")).await.unwrap();
    }
    let t0 = Instant::now();
    for i in 0..50 {
        stub.run(&vm(&format!("seq-{i}"), false)).await.unwrap();
    }
    let sequential = t0.elapsed();
    for i in 0..50 {
        stub.delete(&format!("seq-{i}")).await.unwrap();
    }

    // Scale.
    let taps_of = |i: usize| [format!("t-many-{i}"), format!("p-many-{i}")];
    // Persistent, as the network module makes them on a node (a tap that
    // dies with its VMM costs the kernel a device teardown at each exit).
    let mut batch = String::new();
    for i in 0..n_vms {
        for t in taps_of(i) {
            std::fs::create_dir_all(sys_net.join(&t)).unwrap();
            std::fs::write(sys_net.join(&t).join("tun_flags"), "0x1002\n").unwrap();
            batch.push_str(&format!("tuntap add {t} mode tap vnet_hdr\n"));
        }
    }
    let batch_file = sys.path().join("taps.batch");
    std::fs::write(&batch_file, batch).unwrap();
    let made = taps_ns
        .command("ip")
        .arg("-batch")
        .arg(&batch_file)
        .status()
        .unwrap();
    assert!(made.success(), "cannot make the fleet's taps");
    let write_counters = |round: u64| {
        let mut text =
            String::from("Inter-| Receive | Transmit\n face |bytes packets|bytes packets\n");
        for i in 0..n_vms {
            for t in taps_of(i) {
                let b = (i as u64 + 1) * 1000 * (round + 1);
                text.push_str(&format!(
                    "{t}: {b} {} 0 0 0 0 0 0 {b} {} 0 0 0 0 0 0\n",
                    b / 100,
                    b / 100
                ));
            }
        }
        let tmp = net_dev.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &net_dev).unwrap();
    };
    write_counters(0);
    let t0 = Instant::now();
    let fleet = (0..n_vms)
        .map(|i| {
            let mut v = vm(&format!("many-{i}"), false);
            for (k, t) in taps_of(i).into_iter().enumerate() {
                v.network.ifaces.push(VmIface {
                    tap: t,
                    mac: format!("02:00:00:{:02x}:{:02x}:{:02x}", k, i >> 8, i & 0xff),
                    ..Default::default()
                });
            }
            v
        })
        .collect();
    vmd_tests::run_all(&stub, fleet, 16).await;
    let start_all = t0.elapsed();
    assert_eq!(stub.list().await.unwrap().len(), n_vms);
    // Let the fleet's boots finish (a quiet host, not a wait for an event).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut list = Vec::new();
    for _ in 0..100 {
        let t = Instant::now();
        assert_eq!(stub.list().await.unwrap().len(), n_vms);
        list.push(t.elapsed());
    }
    let mut metrics = Vec::new();
    for round in 0..20u64 {
        // Every tap moved since the last call (not timed).
        write_counters(round + 1);
        let t = Instant::now();
        let m = stub.metrics().await.unwrap();
        metrics.push(t.elapsed());
        assert_eq!(m.len(), n_vms, "Metrics lost VMs");
        let last = &m[&format!("many-{}", n_vms - 1)];
        assert_eq!(
            last.public.net_rx_bytes,
            n_vms as u64 * 1000 * (round + 2),
            "Metrics did not see the counters move"
        );
    }
    // vmd's `Usage` (what `vmd ctl metrics` and `top` ask): the same
    // counters and each VMM's /proc.
    let mut usage = Vec::new();
    for round in 20..40u64 {
        write_counters(round + 1);
        let t = Instant::now();
        let u = stub.usage().await.unwrap();
        usage.push(t.elapsed());
        assert_eq!(u.len(), n_vms, "Usage lost VMs");
        assert!(
            u.values().all(|v| v.cpu_time_ms.is_some()),
            "Usage without the VMMs' CPU"
        );
    }
    // The OpenMetrics endpoint, as Prometheus scrapes it.
    let rss_before_scrapes = rss_kib(vmd.pid() as i32);
    let mut scrapes = Vec::new();
    let mut scrape_bytes = 0;
    for _ in 0..20 {
        let t = Instant::now();
        scrape_bytes = scrape(scrape_at);
        scrapes.push(t.elapsed());
    }
    let rss_after_scrapes = rss_kib(vmd.pid() as i32);
    let mut exists = Vec::new();
    for _ in 0..100 {
        let t = Instant::now();
        assert!(stub.exists("many-0").await.unwrap());
        exists.push(t.elapsed());
    }
    let rss_full = rss_kib(vmd.pid() as i32);
    let idle_full = idle_cpu(vmd.pid() as i32, Duration::from_secs(10)).await;

    // VMM exit → the event at a subscriber.
    let mut sub = Subscription::start(&redis.broker(), Filter::default(), true)
        .await
        .unwrap();
    let mut to_event = Vec::new();
    let (mut kill_to_exit, mut exit_to_event) = (Vec::new(), Vec::new());
    for i in 0..KILLS.min(n_vms) {
        let name = format!("many-{i}");
        let pid = vmm_pid(&vmd.runtime(), &name).expect("a running VMM");
        let exit = ExitWatch::start(pid);
        let t = Instant::now();
        // SAFETY: kill has no memory effects.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
        loop {
            let e = tokio::time::timeout(Duration::from_secs(10), sub.next())
                .await
                .expect("no event within 10 s")
                .expect("subscription ended");
            if e.name == name && e.event == "crashed" {
                let at = Instant::now();
                to_event.push(at - t);
                let exited = exit.exited();
                kill_to_exit.push(exited.saturating_duration_since(t));
                exit_to_event.push(at.saturating_duration_since(exited));
                break;
            }
        }
    }
    drop(sub);
    let mut raw = Vec::new();
    {
        use futures_util::StreamExt;
        let mut ps = redis.broker().pubsub().await.unwrap();
        ps.subscribe("bench.raw").await.unwrap();
        let mut msgs = ps.into_on_message();
        let mut conn = redis.broker().connect().await.unwrap();
        for _ in 0..KILLS {
            let t = Instant::now();
            let _: () = redis::cmd("PUBLISH")
                .arg("bench.raw")
                .arg(&b"x"[..])
                .query_async(&mut conn)
                .await
                .unwrap();
            msgs.next().await.unwrap();
            raw.push(t.elapsed());
        }
    }
    // The killed VMMs come back (back-off 1 s) before the fleet is deleted.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t0 = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(16));
    let calls: Vec<_> = (0..n_vms)
        .map(|i| {
            let (s, sem) = (stub.clone(), sem.clone());
            tokio::spawn(async move {
                let _p = sem.acquire().await.unwrap();
                s.delete(&format!("many-{i}")).await.unwrap()
            })
        })
        .collect();
    for c in calls {
        c.await.unwrap();
    }
    let delete_all = t0.elapsed();
    let (list_p50, metrics_p50, exists_p50) = (pct(&list, 50), pct(&metrics, 50), pct(&exists, 50));

    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("vmd benchmark — {cpus} CPUs, redis + zinit double + vmd + vmd-shim + cloud-hypervisor double, release");
    println!("{runs} sequential Runs for latency; {n_vms} VMs for the scale figures (started 16 at a time in {start_all:?}, deleted in {delete_all:?})");
    println!();
    println!("| figure | vmd | baseline | ratio | goal |");
    println!("|---|---|---|---|---|");
    println!(
        "| Run → VMM exec'd p50 | {} | {} (fork+exec of the VMM) | {:.1}× | ≤ 15 ms |",
        ms(exec_p50),
        ms(direct_p50),
        exec_p50.as_secs_f64() / direct_p50.as_secs_f64()
    );
    println!("| Run → VMM exec'd p99 | {} | | | ≤ 50 ms |", ms(exec_p99));
    println!(
        "| Run answered (VM booted) p50 | {} | | | ≤ 10 ms |",
        ms(run_p50)
    );
    println!(
        "| 50 concurrent Runs, total | {} | {} (the same 50 one by one) | {:.2}× | |",
        ms(concurrent),
        ms(sequential),
        concurrent.as_secs_f64() / sequential.as_secs_f64()
    );
    println!(
        "| List p50, {n_vms} VMs | {} | {} (Exists round trip) | {:.1}× | ≤ 5 ms |",
        ms(list_p50),
        ms(exists_p50),
        list_p50.as_secs_f64() / exists_p50.as_secs_f64()
    );
    println!(
        "| Metrics p50, {n_vms} VMs (2 taps each, all moving) | {} | {} (Exists round trip) | {:.1}× | ≤ 10 ms |",
        ms(metrics_p50),
        ms(exists_p50),
        metrics_p50.as_secs_f64() / exists_p50.as_secs_f64()
    );
    println!(
        "| Usage p50, {n_vms} VMs (Metrics and each VMM's /proc) | {} | {} (Exists round trip) | {:.1}× | |",
        ms(pct(&usage, 50)),
        ms(exists_p50),
        pct(&usage, 50).as_secs_f64() / exists_p50.as_secs_f64()
    );
    println!(
        "| OpenMetrics scrape p50, {n_vms} VMs | {} ({} KiB) | {} (Exists round trip) | {:.1}× | ≤ 50 ms |",
        ms(pct(&scrapes, 50)),
        scrape_bytes / 1024,
        ms(exists_p50),
        pct(&scrapes, 50).as_secs_f64() / exists_p50.as_secs_f64()
    );
    println!(
        "| vmd RSS after 20 scrapes | +{:.1} MiB | {:.1} MiB (before) | | ≤ +5 MiB |",
        (rss_after_scrapes as f64 - rss_before_scrapes as f64) / 1024.0,
        rss_before_scrapes as f64 / 1024.0
    );
    println!(
        "| vmd CPU, {n_vms} idle VMs, no calls, 10 s | {idle_full:.2} % of a core | {idle_empty:.2} % (no VM) | | ≤ 1 % |"
    );
    println!(
        "| VMM exit → `crashed` at a subscriber p50 | {} | {} (raw PUBLISH → subscriber p50) | {:.1}× | |",
        ms(pct(&to_event, 50)),
        ms(pct(&raw, 50)),
        pct(&to_event, 50).as_secs_f64() / pct(&raw, 50).as_secs_f64()
    );
    println!(
        "| VMM exit → `crashed` at a subscriber p99 | {} | {} (raw p99) | | ≤ 5 ms |",
        ms(pct(&to_event, 99)),
        ms(pct(&raw, 99))
    );
    println!(
        "| of which kill → VMM gone (the kernel's exit) p50 / p99 | {} / {} | | | |",
        ms(pct(&kill_to_exit, 50)),
        ms(pct(&kill_to_exit, 99))
    );
    println!(
        "| VMM gone → `crashed` at a subscriber p50 / p99 | {} / {} | {} / {} (raw PUBLISH) | | p99 ≤ 5 ms |",
        ms(pct(&exit_to_event, 50)),
        ms(pct(&exit_to_event, 99)),
        ms(pct(&raw, 50)),
        ms(pct(&raw, 99))
    );
    println!(
        "| vmd RSS, {n_vms} VMs | {:.1} MiB | {:.1} MiB (no VM) | {:.2}× | ≤ 32 MiB |",
        rss_full as f64 / 1024.0,
        rss_empty as f64 / 1024.0,
        rss_full as f64 / rss_empty.max(1) as f64
    );
}
