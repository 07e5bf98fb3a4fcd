//! `Run` → the guest's first console byte in the log, against the same
//! cloud-hypervisor started by hand with the same guest and its serial
//! port on a pipe: `cargo build --release --workspace --bins && cargo
//! bench -p vmd-tests --bench firstbyte`.
//!
//! The double by default; a real VMM and guest with `VMD_TEST_CH`,
//! `VMD_TEST_KERNEL`, `VMD_TEST_INITRD` (as the tests). The two ways
//! alternate, so a slow moment of the machine hits both. What vmd adds is
//! the zbus call, the files and zinit service it writes, zinit starting the
//! shim, the shim's version probe (cached after the first start) and its
//! hardened spawn of the VMM: fixed costs, small against a real boot.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmd_tests::stack::Stack;
use vmd_tests::vm::{ch_binary, real_ch};
use vmd_tests::{ms, pct};

fn main() {
    vmd_tests::bench_main(bench());
}

/// The VMM started by hand: spawn → first byte on its stdout (the serial
/// port, `--serial tty`, as vmd runs it).
fn by_hand(kernel: &str, initrd: &str, cmdline: &str) -> Duration {
    let mut cmd = Command::new(ch_binary());
    cmd.args(["--kernel", kernel]);
    if !initrd.is_empty() {
        cmd.args(["--initramfs", initrd]);
    }
    cmd.args([
        "--cmdline",
        cmdline,
        "--cpus",
        "boot=1",
        "--memory",
        "size=256M",
        "--serial",
        "tty",
        "--console",
        "off",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    let t0 = Instant::now();
    let mut child = cmd.spawn().expect("the VMM");
    let mut byte = [0u8; 1];
    let n = child.stdout.as_mut().unwrap().read(&mut byte).unwrap();
    let took = t0.elapsed();
    assert_eq!(n, 1, "the VMM exited before printing");
    let _ = child.kill();
    let _ = child.wait();
    took
}

async fn bench() {
    // zinit's and vmd's runtime files on a tmpfs, as on a node.
    let env = Stack::start_like_a_node(&["--log", "warn"]).await;
    let runs = if real_ch() { 3 } else { 30 };
    let knobs: &[(&str, &str)] = &[("gaction", "wait")];
    let sample = env.vm("probe", knobs);
    let cmdline = sample
        .kernel_args
        .iter()
        .map(|(k, v)| {
            if v.is_empty() {
                k.clone()
            } else {
                format!("{k}={v}")
            }
        })
        .chain(["console=ttyS0".to_owned()])
        .collect::<Vec<_>>()
        .join(" ");
    let (mut via_vmd, mut direct) = (Vec::new(), Vec::new());
    // One caller for all runs, as a Go daemon keeps its connection pool:
    // a new connection per Run is the bench's cost, not vmd's.
    let stub = std::sync::Arc::new(env.caller(Duration::from_secs(300)));
    assert!(!stub.exists("fb-warm").await.unwrap());
    for i in 0..runs {
        direct.push(by_hand(
            &sample.kernel_image,
            &sample.initrd_image,
            &cmdline,
        ));
        let name = format!("fb-{i}");
        let vm = env.vm(&name, knobs);
        let log = env.log(&name);
        let stub = std::sync::Arc::clone(&stub);
        let t0 = Instant::now();
        let run = tokio::spawn(async move { stub.run(&vm).await });
        // Polled every 100 µs: the resolution of this figure.
        let first = loop {
            if std::fs::read(&log).is_ok_and(|l| has_guest_output(&l)) {
                break t0.elapsed();
            }
            assert!(t0.elapsed() < Duration::from_secs(300), "no console byte");
            tokio::time::sleep(Duration::from_micros(100)).await;
        };
        via_vmd.push(first);
        run.await.unwrap().unwrap();
        env.stub.delete(&name).await.unwrap();
    }
    let (v50, d50) = (pct(&via_vmd, 50), pct(&direct, 50));
    let what = if real_ch() {
        format!("cloud-hypervisor {} and its guest", ch_binary().display())
    } else {
        "the cloud-hypervisor double".to_owned()
    };
    println!("`Run` → first console byte in the log, {runs} runs, with {what}:");
    println!();
    println!("| figure | vmd | by hand (baseline) | ratio | goal |");
    println!("|---|---|---|---|---|");
    println!(
        "| first console byte, p50 | {} | {} | {:.2}× | ≤ 2× |",
        ms(v50),
        ms(d50),
        v50.as_secs_f64() / d50.as_secs_f64()
    );
    println!(
        "| first console byte, max | {} | {} | | |",
        ms(pct(&via_vmd, 100)),
        ms(pct(&direct, 100))
    );
    println!();
    println!(
        "By hand: the bench spawns the VMM with the guest's serial port on a pipe and reads \
         its first byte. vmd: from sending `Run` until the console log holds a byte of the \
         guest's (the VMM's own log lines, which the shim also copies there, do not count)."
    );
}

/// Whether the console log holds a byte the guest printed: anything but the
/// VMM's own log lines (`cloud-hypervisor: <secs>s: <thread> WARN:…`, which
/// a real v53 writes within 10 ms, long before the guest's first byte), and
/// not the start of one.
fn has_guest_output(log: &[u8]) -> bool {
    const VMM: &[u8] = b"cloud-hypervisor: ";
    let mut rest = log;
    while !rest.is_empty() {
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            // An unfinished line: the guest's unless it may become the VMM's.
            let n = rest.len().min(VMM.len());
            return rest[..n] != VMM[..n];
        };
        if !rest.starts_with(VMM) {
            return true;
        }
        rest = &rest[end + 1..];
    }
    false
}
