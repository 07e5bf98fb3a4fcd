//! Go callers never wait:
//! `cargo build --release --workspace --bins && cargo bench -p vmd-tests --bench callers`.
//!
//! Real Redis, the zinit double, the release `vmd` (`--grace-secs 10`),
//! vmd-shim and the cloud-hypervisor double; guests that ignore the power
//! button, so a graceful Delete waits out its whole grace. Measured in one run:
//!
//! * Reads (`Exists`, `List`, `Inspect`) p50/p99 while 64 graceful Deletes of
//!   64 VMs are in flight, against the same reads with nothing in flight; the
//!   longest of those Deletes against the grace.
//! * Exec → first answer: vmd is killed, the status object, `Exists` and
//!   `List` requests are queued in Redis, vmd is exec'd, and the time from the
//!   exec to each reply is taken. With `VMD_BENCH_VMS` VMs (default 1000) on
//!   disk, and with 64 graceful Deletes interrupted by the kill on top, against
//!   the same with no VM at all.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_bytes::ByteBuf;
use vmd::api::{self, Vm};
use vmd::stub::VmdStub;
use vmd::zbus::codec;
use vmd::zbus::wire::{ObjectId, Request, Response};
use vmd_tests::{ms, pct, until, RedisServer, Supervisor, VmdProcess};

const GRACE_SECS: u64 = 10;
const STUBBORN: usize = 64;

fn main() {
    let vms: usize = vmd_tests::knob("VMD_BENCH_VMS", 1000);
    vmd_tests::bench_main(bench(vms));
}

struct Bench {
    redis: RedisServer,
    _zinit: Supervisor,
    vmd: VmdProcess,
    stub: Arc<VmdStub>,
    kernel: String,
    _dir: tempfile::TempDir,
}

impl Bench {
    fn vm(&self, name: &str, stubborn: bool) -> Vm {
        let mut args = BTreeMap::new();
        if stubborn {
            args.insert("double.ignore_power_button".to_owned(), "1".to_owned());
        }
        Vm {
            name: name.into(),
            cpu: 1,
            memory: 256 << 20,
            kernel_image: self.kernel.clone(),
            kernel_args: args,
            ..Default::default()
        }
    }

    /// Runs `names`, at most 32 at a time.
    async fn run_all(&self, names: &[String], stubborn: bool) {
        let fleet = names.iter().map(|n| self.vm(n, stubborn)).collect();
        vmd_tests::run_all(&self.stub, fleet, 32).await;
    }

    /// Starts a Delete of each of `names` at once; each task answers its
    /// duration.
    fn delete_all(&self, names: &[String]) -> Vec<tokio::task::JoinHandle<Duration>> {
        names
            .iter()
            .map(|n| {
                let (s, n) = (self.stub.clone(), n.clone());
                tokio::spawn(async move {
                    let t0 = Instant::now();
                    s.delete(&n).await.unwrap();
                    t0.elapsed()
                })
            })
            .collect()
    }

    async fn deletes_in_flight(&self) -> usize {
        self.stub.status().await.map_or(0, |st| {
            st.workers
                .iter()
                .filter(|w| w.action.ends_with(".Delete()"))
                .count()
        })
    }

    /// Waits until the Deletes of `names` are all running and past their
    /// first step (the VMs are gone for callers).
    async fn wait_deletes_in_flight(&self, names: &[String]) {
        until(Duration::from_secs(30), "Deletes in flight", || async {
            self.deletes_in_flight().await == names.len()
                && self
                    .stub
                    .list()
                    .await
                    .is_ok_and(|l| !l.iter().any(|n| names.contains(n)))
        })
        .await;
    }

    /// One round of the reads a Go node makes all the time.
    async fn reads(&self, out: &mut Vec<Duration>) {
        let t = Instant::now();
        assert!(self.stub.exists("bystander").await.unwrap());
        out.push(t.elapsed());
        let t = Instant::now();
        assert!(!self.stub.list().await.unwrap().is_empty());
        out.push(t.elapsed());
        let t = Instant::now();
        self.stub.inspect("bystander").await.unwrap();
        out.push(t.elapsed());
    }

    /// Kills vmd, queues a status, an Exists and a List request, execs vmd
    /// and takes the time from the exec to each reply.
    async fn exec_to_answers(&mut self) -> [Duration; 3] {
        self.vmd.crash();
        let mut conn = self.redis.broker().connect().await.unwrap();
        let status = ObjectId::status();
        let manager = ObjectId::new(api::OBJECT, api::VERSION);
        let exists_arg = ByteBuf::from(codec::encode(&"bystander").unwrap());
        let calls = [
            (status, "", vec![]),
            (manager.clone(), "Exists", vec![exists_arg]),
            (manager, "List", vec![]),
        ];
        let mut ids = Vec::new();
        for (object, method, inputs) in calls {
            let id = uuid::Uuid::new_v4().to_string();
            let req = Request {
                id: id.clone(),
                inputs,
                object: object.clone(),
                reply_to: id.clone(),
                method: method.to_owned(),
            };
            let _: i64 = redis::cmd("RPUSH")
                .arg(object.queue(api::MODULE))
                .arg(codec::encode(&req).unwrap())
                .query_async(&mut conn)
                .await
                .unwrap();
            ids.push(id);
        }
        let t0 = Instant::now();
        self.vmd.restart();
        let mut took = [Duration::ZERO; 3];
        for (i, id) in ids.iter().enumerate() {
            let got: Option<(String, Vec<u8>)> = redis::cmd("BLPOP")
                .arg(id)
                .arg(30)
                .query_async(&mut conn)
                .await
                .unwrap();
            took[i] = t0.elapsed();
            let (_, bytes) = got.expect("no reply within 30 s");
            let resp: Response = codec::decode(&bytes).unwrap();
            assert!(resp.error.is_none(), "{resp:?}");
        }
        took
    }

    /// Medians of `n` restarts.
    async fn startup(&mut self, n: usize) -> [Duration; 3] {
        let mut all: [Vec<Duration>; 3] = Default::default();
        for _ in 0..n {
            let t = self.exec_to_answers().await;
            for i in 0..3 {
                all[i].push(t[i]);
            }
        }
        [pct(&all[0], 50), pct(&all[1], 50), pct(&all[2], 50)]
    }
}

async fn bench(n_vms: usize) {
    let redis = RedisServer::start();
    let zinit = Supervisor::start();
    let grace = GRACE_SECS.to_string();
    let vmd = VmdProcess::start_with(
        &redis,
        Some(&zinit),
        &["--log", "warn", "--grace-secs", &grace],
    );
    let stub = Arc::new(VmdStub::new(redis.broker()).with_timeout(Duration::from_secs(120)));
    vmd.wait_ready().await;
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, "x").unwrap();
    let mut b = Bench {
        redis,
        _zinit: zinit,
        vmd,
        stub,
        kernel: kernel.to_string_lossy().into_owned(),
        _dir: dir,
    };

    // Start-up with nothing on disk (the bystander exists in the later ones
    // only; an Exists of a VM that is not there is answered all the same).
    let empty = b.startup(5).await;

    // Reads, idle and while 64 graceful Deletes are in flight.
    b.run_all(&["bystander".to_owned()], false).await;
    let stubborn: Vec<String> = (0..STUBBORN).map(|i| format!("stubborn-{i}")).collect();
    b.run_all(&stubborn, true).await;
    let mut idle = Vec::new();
    for _ in 0..300 {
        b.reads(&mut idle).await;
    }
    let deletes = b.delete_all(&stubborn);
    b.wait_deletes_in_flight(&stubborn).await;
    let mut loaded = Vec::new();
    for _ in 0..300 {
        b.reads(&mut loaded).await;
    }
    let still = b.deletes_in_flight().await;
    assert_eq!(still, STUBBORN, "some Deletes ended before the reads did");
    let mut longest = Duration::ZERO;
    for d in deletes {
        longest = longest.max(d.await.unwrap());
    }

    // Start-up with N VMs on disk.
    let many: Vec<String> = (0..n_vms).map(|i| format!("many-{i}")).collect();
    let t0 = Instant::now();
    b.run_all(&many, false).await;
    let started = t0.elapsed();
    let full = b.startup(5).await;

    // ... and with 64 graceful Deletes interrupted by the kill.
    let mut interrupted: [Vec<Duration>; 3] = Default::default();
    for round in 0..3 {
        let doomed: Vec<String> = (0..STUBBORN)
            .map(|i| format!("doomed-{round}-{i}"))
            .collect();
        b.run_all(&doomed, true).await;
        let deletes = b.delete_all(&doomed);
        b.wait_deletes_in_flight(&doomed).await;
        let t = b.exec_to_answers().await;
        for d in deletes {
            d.abort();
        }
        for i in 0..3 {
            interrupted[i].push(t[i]);
        }
        // The restarted vmd finishes them in the background.
        let s = b.stub.clone();
        until(
            Duration::from_secs(GRACE_SECS * 3),
            "interrupted Deletes",
            || async {
                s.list()
                    .await
                    .is_ok_and(|l| !l.iter().any(|n| n.starts_with("doomed-")))
            },
        )
        .await;
    }
    let interrupted = [
        pct(&interrupted[0], 50),
        pct(&interrupted[1], 50),
        pct(&interrupted[2], 50),
    ];

    let t0 = Instant::now();
    let mut all = many.clone();
    all.push("bystander".to_owned());
    for d in b.delete_all(&all) {
        d.await.unwrap();
    }
    let deleted = t0.elapsed();

    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("callers benchmark — {cpus} CPUs, redis + zinit double + vmd (--grace-secs {GRACE_SECS}) + vmd-shim + cloud-hypervisor double, release");
    println!(
        "reads: {} rounds of Exists + List + Inspect, idle and while {STUBBORN} graceful Deletes (guests ignoring the power button) were all in flight; \
         start-up: exec → reply of requests queued before the exec, median of 5 restarts (3 with interrupted Deletes); \
         {n_vms} VMs started in {started:?}, deleted in {deleted:?}",
        idle.len() / 3
    );
    println!();
    println!("| figure | vmd | baseline | ratio | goal |");
    println!("|---|---|---|---|---|");
    let (lp50, lp99, ip50, ip99) = (
        pct(&loaded, 50),
        pct(&loaded, 99),
        pct(&idle, 50),
        pct(&idle, 99),
    );
    println!(
        "| read p50, {STUBBORN} Deletes in flight | {} | {} (idle) | {:.2}× | |",
        ms(lp50),
        ms(ip50),
        lp50.as_secs_f64() / ip50.as_secs_f64()
    );
    println!(
        "| read p99, {STUBBORN} Deletes in flight | {} | {} (idle) | {:.2}× | ≤ 5 ms |",
        ms(lp99),
        ms(ip99),
        lp99.as_secs_f64() / ip99.as_secs_f64()
    );
    println!(
        "| longest of {STUBBORN} concurrent graceful Deletes | {} | {GRACE_SECS} s (the grace) | {:.2}× | ≤ grace + 2 s |",
        ms(longest),
        longest.as_secs_f64() / GRACE_SECS as f64
    );
    for (i, what) in ["status object", "Exists", "List"].iter().enumerate() {
        println!(
            "| exec → {what} answered, {n_vms} VMs | {} | {} (no VM) | {:.2}× | ≤ 1 s |",
            ms(full[i]),
            ms(empty[i]),
            full[i].as_secs_f64() / empty[i].as_secs_f64()
        );
    }
    for (i, what) in ["status object", "Exists", "List"].iter().enumerate() {
        println!(
            "| exec → {what} answered, {n_vms} VMs + {STUBBORN} interrupted Deletes | {} | {} (no VM) | {:.2}× | ≤ 1 s |",
            ms(interrupted[i]),
            ms(empty[i]),
            interrupted[i].as_secs_f64() / empty[i].as_secs_f64()
        );
    }
}
