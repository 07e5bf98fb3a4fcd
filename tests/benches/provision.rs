//! provisiond benchmark: `cargo build --release --workspace --bins && cargo bench -p vmd-tests --bench provision`.
//!
//! Real Redis, the zinit double, the release `vmd`, vmd-shim and the
//! cloud-hypervisor double, the provisiond double in this process;
//! `VMD_BENCH_VMS` VMs (default 1000), all named as workloads, so every one
//! is asked about in every pass (`--reap-interval-secs 10`, as the Go
//! module). Measured in one run, phases alternating:
//!
//! * `Exists` round trip p50/p99 while provisiond answers, and while it is
//!   dead (every call to it then runs into its 2 s deadline): a dead peer
//!   must cost vmd's callers nothing (goal: ratio ≤ 1.1);
//! * a pass at that scale: asks per second to provisiond and vmd's CPU
//!   while passes run, against vmd's CPU with `--provision-module none`
//!   measured before (the baseline: the same VMs, nothing asked).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmd::api::Vm;
use vmd::stub::VmdStub;
use vmd_tests::provision_double::{ProvisionDouble, Workloads};
use vmd_tests::vm::cpu_ticks;
use vmd_tests::{ms, pct, RedisServer, Supervisor, VmdProcess};

fn main() {
    let vms: usize = vmd_tests::knob("VMD_BENCH_VMS", 1000);
    vmd_tests::bench_main(bench(vms));
}

/// vmd's CPU over `window`, in % of one core.
async fn cpu(pid: i32, window: Duration) -> f64 {
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let before = cpu_ticks(pid);
    // A measurement window, not a wait for something to happen.
    tokio::time::sleep(window).await;
    (cpu_ticks(pid) - before) as f64 / hz / window.as_secs_f64() * 100.0
}

/// `Exists` round trips for `window`.
async fn exists_for(stub: &VmdStub, window: Duration) -> Vec<Duration> {
    let mut out = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed() < window {
        let t = Instant::now();
        assert!(stub.exists("1-0-vm").await.unwrap());
        out.push(t.elapsed());
    }
    out
}

async fn bench(n_vms: usize) {
    let redis = RedisServer::start();
    let zinit = Supervisor::start_on_tmpfs();
    let run = vmd_tests::tmpfs_dir("vmd-bench-run-");
    let run_path = run.path().to_string_lossy().into_owned();
    let common = ["--log", "warn", "--runtime-dir", run_path.as_str()];
    let mut flags = common.to_vec();
    flags.extend(["--provision-module", "none"]);
    let mut vmd = VmdProcess::start_with(&redis, Some(&zinit), &flags);
    let stub = Arc::new(VmdStub::new(redis.broker()).with_timeout(Duration::from_secs(120)));
    vmd.wait_ready().await;
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, "x").unwrap();
    let vm = |name: &str| Vm {
        name: name.into(),
        cpu: 1,
        memory: 256 << 20,
        kernel_image: kernel.to_string_lossy().into_owned(),
        kernel_args: BTreeMap::new(),
        ..Default::default()
    };
    let fleet = (0..n_vms).map(|i| vm(&format!("1-{i}-vm"))).collect();
    vmd_tests::run_all(&stub, fleet, 16).await;
    assert_eq!(stub.list().await.unwrap().len(), n_vms);
    // Baseline: nothing asked.
    let cpu_none = cpu(vmd.pid() as i32, Duration::from_secs(10)).await;

    // The same VMs, vmd asking provisiond (restarted with the flags).
    let mut w = Workloads::default();
    for i in 0..n_vms {
        w.states.insert(format!("1-{i}-vm"), "ok".into());
    }
    let mut prov = ProvisionDouble::start(&redis.broker(), "provision", w).await;
    // The same vmd restarted, asking provisiond.
    vmd.crash();
    let args = vmd.args_mut();
    if let Some(i) = args.iter().position(|a| a == "--provision-module") {
        args.drain(i..i + 2);
    }
    args.extend(
        [
            "--reap-interval-secs",
            "10",
            "--provision-timeout-secs",
            "2",
        ]
        .map(String::from),
    );
    vmd.restart();
    vmd.wait_ready().await;
    // One pass to settle, then a measured one.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let asked0 = prov.calls_of("GetWorkloadStatus").len();
    let t0 = Instant::now();
    let cpu_passes = cpu(vmd.pid() as i32, Duration::from_secs(10)).await;
    let asked = prov.calls_of("GetWorkloadStatus").len() - asked0;
    let asks_per_sec = asked as f64 / t0.elapsed().as_secs_f64();

    // Exists while provisiond answers and while it is dead, alternating.
    let caller = VmdStub::new(redis.broker()).with_timeout(Duration::from_secs(5));
    let window = Duration::from_secs(8);
    let (mut alive, mut dead) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        alive.extend(exists_for(&caller, window).await);
        prov.kill();
        dead.extend(exists_for(&caller, window).await);
        prov.resume(&redis.broker(), "provision").await;
    }
    assert_eq!(stub.list().await.unwrap().len(), n_vms, "a VM was reaped");

    println!(
        "provision benchmark — {n_vms} VMs named as workloads, passes every 10 s, provisiond double"
    );
    println!("| figure | vmd | baseline | ratio | goal |");
    println!("|---|---|---|---|---|");
    let (a50, d50) = (pct(&alive, 50), pct(&dead, 50));
    let (a99, d99) = (pct(&alive, 99), pct(&dead, 99));
    println!(
        "| Exists p50, provisiond dead (baseline: alive) | {} | {} | {:.2}× | ≤ 1.1× |",
        ms(d50),
        ms(a50),
        d50.as_secs_f64() / a50.as_secs_f64()
    );
    println!(
        "| Exists p99, provisiond dead (baseline: alive) | {} | {} | {:.2}× | |",
        ms(d99),
        ms(a99),
        d99.as_secs_f64() / a99.as_secs_f64()
    );
    println!(
        "| asks to provisiond per second during passes | {asks_per_sec:.0}/s | {:.0}/s ({n_vms} VMs / 10 s) | {:.2}× | ≤ 100/s |",
        n_vms as f64 / 10.0,
        asks_per_sec / (n_vms as f64 / 10.0)
    );
    println!(
        "| vmd CPU while passes run (baseline: nothing asked) | {cpu_passes:.1} % | {cpu_none:.1} % | | |"
    );
    println!("Exists samples: {} alive, {} dead", alive.len(), dead.len());
}
