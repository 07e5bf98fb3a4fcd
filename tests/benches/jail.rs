//! What the VMM's jail costs a `Run` (issue 26: at most 2 ms p50): the same
//! Runs against vmd as it runs by default (each VMM under its VM's uid, in
//! a mount view of only its files) and against vmd with `--no-vmm-jail`,
//! two stacks side by side, alternating round by round so a slow moment of
//! the machine hits both: `cargo build --release --workspace --bins &&
//! cargo bench -p vmd-tests --bench jail` (as root: the jail takes root).
//!
//! Two figures: `Run` sent → the VMM exec'd (the double prints
//! `DOUBLE-EXEC <pid> <ns>` on its stderr first thing, which the shim puts
//! in the console log: a jailed VMM can reach no other file), and `Run`
//! sent → answered (the guest booted).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vmd_tests::stack::Stack;
use vmd_tests::vm::exec_time;
use vmd_tests::{ms, pct};

fn main() {
    vmd_tests::bench_main(bench());
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

#[derive(Default)]
struct Figures {
    exec: Vec<Duration>,
    answered: Vec<Duration>,
}

async fn round(env: &Stack, prefix: &str, runs: usize, into: &mut Figures) {
    let knobs: &[(&str, &str)] = &[("gaction", "wait"), ("double.exec_log", "stderr")];
    for i in 0..runs {
        let name = format!("{prefix}-{i}");
        let vm = env.vm(&name, knobs);
        let before = now_ns();
        let t0 = Instant::now();
        env.stub.run(&vm).await.unwrap();
        into.answered.push(t0.elapsed());
        let exec = exec_time(&env.log(&name)).await;
        into.exec
            .push(Duration::from_nanos(exec.saturating_sub(before) as u64));
    }
    for i in 0..runs {
        env.stub.delete(&format!("{prefix}-{i}")).await.unwrap();
    }
}

async fn bench() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: the jail takes root");
        return;
    }
    let jailed = Stack::start_like_a_node(&["--log", "warn"]).await;
    let plain = Stack::start_like_a_node(&["--log", "warn", "--no-vmm-jail"]).await;
    let rounds: usize = vmd_tests::knob("VMD_BENCH_ROUNDS", 6);
    let per: usize = vmd_tests::knob("VMD_BENCH_RUNS", 10);
    let (mut j, mut p) = (Figures::default(), Figures::default());
    // A first Run of each warms the shim's version cache and the page cache.
    round(&jailed, "warm", 1, &mut Figures::default()).await;
    round(&plain, "warm", 1, &mut Figures::default()).await;
    for r in 0..rounds {
        round(&jailed, &format!("j{r}"), per, &mut j).await;
        round(&plain, &format!("p{r}"), per, &mut p).await;
    }
    let n = rounds * per;
    println!("The VMM's jail, {n} Runs each way in {rounds} alternating rounds, the double:");
    println!();
    println!("| figure | jailed | `--no-vmm-jail` (baseline) | difference | goal |");
    println!("|---|---|---|---|---|");
    for (what, a, b, goal) in [
        ("`Run` → VMM exec'd, p50", &j.exec, &p.exec, "≤ 2 ms"),
        ("`Run` → VMM exec'd, p99", &j.exec, &p.exec, ""),
        ("`Run` answered, p50", &j.answered, &p.answered, "≤ 2 ms"),
        ("`Run` answered, p99", &j.answered, &p.answered, ""),
    ] {
        let q = if what.ends_with("p50") { 50 } else { 99 };
        let (x, y) = (pct(a, q), pct(b, q));
        println!(
            "| {what} | {} | {} | {:+.2} ms | {goal} |",
            ms(x),
            ms(y),
            (x.as_secs_f64() - y.as_secs_f64()) * 1e3
        );
    }
}
