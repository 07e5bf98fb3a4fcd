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
//! * With `VMD_BENCH_VMS` VMs (default 1000): List and Metrics p50, against
//!   the zbus round trip of `Exists` (the transport floor); vmd's RSS against
//!   its RSS with no VM.
//! * vmd's CPU over 10 s without calls, with every VM's shim watched,
//!   against the same with no VM (nothing polls: both should be ~0).
//! * VMM exit → `crashed` received by a subscriber of the events channel,
//!   p50/p99 over 200 kill -9 of a VMM (each of another VM); baseline: a raw `PUBLISH` → the same
//!   kind of subscriber (the transport floor).

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vmd::api::Vm;
use vmd::events::subscribe::{Filter, Subscription};
use vmd::stub::VmdStub;
use vmd_tests::vm::{cpu_ticks, rss_kib, settled_memory_kib};
use vmd_tests::{bin, ms, pct, RedisServer, Supervisor, VmdProcess};

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
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
    let vmd = VmdProcess::start_with(
        &redis,
        Some(&zinit),
        &["--log", "warn", "--runtime-dir", &run_path],
    );
    let stub = Arc::new(VmdStub::new(redis.broker()).with_timeout(Duration::from_secs(120)));
    let t0 = Instant::now();
    while stub.status().await.is_err() {
        assert!(t0.elapsed() < Duration::from_secs(20), "vmd did not start");
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, "x").unwrap();
    let exec_log = dir.path().join("exec.log");
    let vm = |name: &str, timed: bool| {
        let mut args = BTreeMap::new();
        if timed {
            args.insert(
                "double.exec_log".to_owned(),
                exec_log.to_string_lossy().into_owned(),
            );
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
        let execs = exec_times(&exec_log);
        let exec = *execs.last().expect("exec time");
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
    let t0 = Instant::now();
    let fleet = (0..n_vms)
        .map(|i| vm(&format!("many-{i}"), false))
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
    for _ in 0..20 {
        let t = Instant::now();
        let m = stub.metrics().await.unwrap();
        metrics.push(t.elapsed());
        assert_eq!(m.len(), n_vms, "Metrics lost VMs");
    }
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
    for i in 0..KILLS.min(n_vms) {
        let name = format!("many-{i}");
        let pid = vmm_pid(&vmd.runtime(), &name).expect("a running VMM");
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
                to_event.push(t.elapsed());
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
        "| Metrics p50, {n_vms} VMs | {} | {} (Exists round trip) | {:.1}× | ≤ 50 ms |",
        ms(metrics_p50),
        ms(exists_p50),
        metrics_p50.as_secs_f64() / exists_p50.as_secs_f64()
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
        "| vmd RSS, {n_vms} VMs | {:.1} MiB | {:.1} MiB (no VM) | {:.2}× | ≤ 32 MiB |",
        rss_full as f64 / 1024.0,
        rss_empty as f64 / 1024.0,
        rss_full as f64 / rss_empty.max(1) as f64
    );
}
