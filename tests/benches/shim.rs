//! vmd-shim benchmark: `cargo build --release --workspace --bins && cargo bench -p vmd-tests --bench shim`.
//!
//! Against the zinit double and the cloud-hypervisor double, in one run:
//!
//! * idle RSS of a shim with one running VM, next to the RSS of `sleep`
//!   (the floor of any process with the same libc);
//! * console throughput: the double prints 64-byte lines as fast as it can
//!   for `VMD_BENCH_SECS` (default 10) through the shim into the rotated
//!   console log, against the same double writing its serial output straight
//!   into a file (`--serial file=`, no shim); and the shim's CPU per MB.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmd_tests::vm::{cpu_ticks, rss_kib, settled_memory_kib, TestVm};
use vmd_tests::{bin, Supervisor};

fn ticks_per_sec() -> f64 {
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

async fn shim_pid(z: &Supervisor, vm: &TestVm) -> i32 {
    loop {
        let st = z.client().status(&vm.service).await.unwrap();
        if st.pid > 0 {
            return st.pid as i32;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn main() {
    let secs: u64 = vmd_tests::knob("VMD_BENCH_SECS", 10);
    vmd_tests::bench_main(bench(Duration::from_secs(secs)));
}

async fn bench(dur: Duration) {
    // Idle RSS.
    let z = Supervisor::start();
    let vm = TestVm::new(&z, "idle", "gaction=wait");
    vm.start(&z).await;
    vm.wait_console("GUEST-READY", 1, Duration::from_secs(15))
        .await;
    let shim = shim_pid(&z, &vm).await;
    let (idle_rss, idle_private) = settled_memory_kib(shim).await;
    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    let (sleep_rss, sleep_private) = settled_memory_kib(sleeper.id() as i32).await;
    let _ = sleeper.kill();
    let _ = sleeper.wait();

    // Throughput through the shim.
    let flood = TestVm::new(&z, "flood", "gaction=wait double.flood_bps=0");
    flood.start(&z).await;
    let shim = shim_pid(&z, &flood).await;
    let end = |vm: &TestVm| -> u64 {
        let log = &vm.spec.console.log;
        let len = std::fs::metadata(log).map(|m| m.len()).unwrap_or(0);
        let meta: serde_json::Value = std::fs::read_to_string(vmd_runtime::console::meta_path(log))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        meta["base"].as_u64().unwrap_or(0) + len
    };
    // Flooding: the log's absolute end moves. (Not its first lines: at full
    // speed the log rotates them away between two looks.)
    vmd_tests::until(Duration::from_secs(15), "the flood never started", || {
        std::future::ready(end(&flood) > 1 << 20)
    })
    .await;
    let (b0, c0, t0) = (end(&flood), cpu_ticks(shim), Instant::now());
    let mut peak_rss = 0;
    while t0.elapsed() < dur {
        peak_rss = peak_rss.max(rss_kib(shim));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (b1, c1, el) = (end(&flood), cpu_ticks(shim), t0.elapsed());
    let through_shim = (b1 - b0) as f64 / el.as_secs_f64();
    let cpu_s = (c1 - c0) as f64 / ticks_per_sec();
    let mb = (b1 - b0) as f64 / 1e6;
    drop(z);

    // Baseline: the same producer writing its serial output to a file itself.
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, "x").unwrap();
    let out = dir.path().join("serial.out");
    let mut ch = Command::new(bin("ch-double"))
        .arg("--kernel")
        .arg(&kernel)
        .args([
            "--cmdline",
            "gaction=wait double.flood_bps=0",
            "--console",
            "off",
        ])
        .arg("--serial")
        .arg(format!("file={}", out.display()))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Warm-up before the sampling window.
    tokio::time::sleep(Duration::from_millis(800)).await;
    // The file grows without bound here: sample over a shorter window.
    let base_dur = dur.min(Duration::from_secs(3));
    let size = || std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    let (s0, t0) = (size(), Instant::now());
    tokio::time::sleep(base_dur).await;
    let (s1, el) = (size(), t0.elapsed());
    let _ = ch.kill();
    let _ = ch.wait();
    let direct = (s1 - s0) as f64 / el.as_secs_f64();

    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "vmd-shim benchmark — {cpus} CPUs, zinit double + cloud-hypervisor double, release build"
    );
    println!("throughput: {dur:?} of console flood (64-byte lines) through the shim; baseline {base_dur:?}");
    println!();
    println!("| figure | vmd-shim | baseline | ratio | goal |");
    println!("|---|---|---|---|---|");
    println!(
        "| RSS, one idle VM | {:.2} MiB | {:.2} MiB (`sleep`) | {:.2}× | ≤ 2 MiB |",
        idle_rss as f64 / 1024.0,
        sleep_rss as f64 / 1024.0,
        idle_rss as f64 / sleep_rss.max(1) as f64
    );
    println!(
        "| private dirty memory, one idle VM | {:.2} MiB | {:.2} MiB (`sleep`) | {:.2}× | |",
        idle_private as f64 / 1024.0,
        sleep_private as f64 / 1024.0,
        idle_private as f64 / sleep_private.max(1) as f64
    );
    println!(
        "| console throughput | {:.0} MB/s | {:.0} MB/s (double → file, no shim) | {:.2}× | ≥ 200 MB/s |",
        through_shim / 1e6,
        direct / 1e6,
        through_shim / direct
    );
    println!(
        "| shim CPU per MB | {:.2} ms/MB | | | |",
        cpu_s * 1000.0 / mb.max(1e-9)
    );
    println!(
        "| shim peak RSS during the flood | {:.2} MiB | | | |",
        peak_rss as f64 / 1024.0
    );
}
