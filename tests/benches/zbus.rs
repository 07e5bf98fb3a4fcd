//! zbus benchmark: `cargo bench -p vmd-tests --bench zbus`.
//!
//! What it measures, all in one run on one machine, against a real
//! `redis-server` on a unix socket:
//!
//! * **baseline**: a raw echo over Redis — a separate single-threaded process
//!   that BLPOPs a list and RPUSHes the same bytes back (pipelined with
//!   EXPIRE and its next BLPOP, as vmd replies with its next take), and a
//!   client that RPUSHes a request-sized payload and BLPOPs its reply
//!   (pipelined, as vmd's client does). This is the floor of any
//!   RPC over Redis lists: the same Redis commands, no msgpack, no dispatch.
//! * **floor**: one client RPUSH+BLPOP of its own list, no server at all.
//! * **vmd**: the real `vmd` binary answering `Exists` through
//!   `VmdStub` (uuid, msgpack both ways, dispatch, status bookkeeping).
//!
//! Figures: p50 / mean of sequential round trips (one client), and calls/s
//! with 8 concurrent clients for a fixed time. Ratios are vmd / baseline.
//! Set `VMD_BENCH_SECS` to change the duration of each throughput phase.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmd::stub::VmdStub;
use vmd::zbus::broker::Broker;
use vmd_tests::vm::cpu_time;
use vmd_tests::{RedisServer, VmdProcess};

const ECHO_QUEUE: &str = "bench.echo@1.0";
/// As big as a zbus `Exists` request (154 bytes in the Go vectors).
const PAYLOAD: usize = 154;
/// Sequential round trips per figure (`VMD_BENCH_SEQUENTIAL` changes it,
/// e.g. to run long enough under a profiler).
fn sequential_count() -> usize {
    std::env::var("VMD_BENCH_SEQUENTIAL")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000)
}
const WARMUP: usize = 300;
const CLIENTS: usize = 8;

fn main() {
    // Re-executed as the echo server process.
    if let Ok(sock) = std::env::var("VMD_BENCH_ECHO_SERVER") {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(echo_server(Broker::unix(sock)));
        return;
    }
    let secs: u64 = vmd_tests::knob("VMD_BENCH_SECS", 3);
    vmd_tests::bench_main(bench(Duration::from_secs(secs)));
}

/// The leanest echo over Redis lists: one thread, one connection, no
/// decoding; each reply goes out in one write with its EXPIRE and the next
/// pop, as vmd sends its replies with its next take. (An echo that popped
/// in a write of its own after each reply was slower, and that write landed
/// while the next call, vmd's in the alternation, was under way: it added
/// about 40 us to vmd's p50. BENCHMARKS.md has the runs.)
async fn echo_server(broker: Broker) {
    let mut conn = broker.connect().await.unwrap();
    let mut got: Option<(String, Vec<u8>)> = None;
    loop {
        let Some((_, payload)) = got else {
            got = redis::cmd("BLPOP")
                .arg(ECHO_QUEUE)
                .arg(1)
                .query_async(&mut conn)
                .await
                .unwrap();
            continue;
        };
        // The reply list is named in the first 36 bytes, as a request's ID.
        let key = String::from_utf8_lossy(&payload[..36]).into_owned();
        let (next,): (Option<(String, Vec<u8>)>,) = redis::pipe()
            .cmd("RPUSH")
            .arg(&key)
            .arg(&payload)
            .ignore()
            .cmd("EXPIRE")
            .arg(&key)
            .arg(300)
            .ignore()
            .cmd("BLPOP")
            .arg(ECHO_QUEUE)
            .arg(1)
            .query_async(&mut conn)
            .await
            .unwrap();
        got = next;
    }
}

struct EchoClient {
    conn: redis::aio::MultiplexedConnection,
    payload: Vec<u8>,
    key: String,
}

impl EchoClient {
    async fn new(broker: &Broker) -> Self {
        let key = uuid::Uuid::new_v4().to_string();
        let mut payload = key.clone().into_bytes();
        payload.resize(PAYLOAD, b'x');
        EchoClient {
            conn: broker.connect().await.unwrap(),
            payload,
            key,
        }
    }
    /// No server at all: push to our own list and pop it back.
    async fn self_round_trip(&mut self) {
        let (_, got): (i64, Option<(String, Vec<u8>)>) = redis::pipe()
            .cmd("RPUSH")
            .arg(&self.key)
            .arg(&self.payload)
            .cmd("BLPOP")
            .arg(&self.key)
            .arg(5)
            .query_async(&mut self.conn)
            .await
            .unwrap();
        assert_eq!(got.expect("own element").1.len(), PAYLOAD);
    }

    async fn call(&mut self) {
        let (_, got): (i64, Option<(String, Vec<u8>)>) = redis::pipe()
            .cmd("RPUSH")
            .arg(ECHO_QUEUE)
            .arg(&self.payload)
            .cmd("BLPOP")
            .arg(&self.key)
            .arg(5)
            .query_async(&mut self.conn)
            .await
            .unwrap();
        assert_eq!(got.expect("echo reply").1.len(), PAYLOAD);
    }
}

struct Latency {
    p50: Duration,
    p99: Duration,
    mean: Duration,
}

fn summarise(mut v: Vec<Duration>) -> Latency {
    v.sort();
    let mean = v.iter().sum::<Duration>() / v.len() as u32;
    Latency {
        p50: v[v.len() / 2],
        p99: v[v.len() * 99 / 100],
        mean,
    }
}

/// Latency of `SEQUENTIAL` sequential runs of `$call` after a warm-up.
macro_rules! sequential {
    ($call:expr) => {{
        for _ in 0..WARMUP {
            $call;
        }
        let n = sequential_count();
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            $call;
            v.push(t.elapsed());
        }
        summarise(v)
    }};
}

/// Calls/s of `CLIENTS` concurrent loops for `dur`.
async fn throughput<F, Fut>(dur: Duration, make: F) -> f64
where
    F: Fn(Arc<AtomicBool>, Arc<AtomicU64>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(make(stop.clone(), count.clone())))
        .collect();
    // Warm up, then count over `dur`.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c0 = count.load(Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(dur).await;
    let n = count.load(Ordering::Relaxed) - c0;
    let el = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / el.as_secs_f64()
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

async fn bench(dur: Duration) {
    let redis = RedisServer::start();
    let broker = redis.broker();

    // Baseline server: this binary again, as its own process (like vmd).
    let mut echo = std::process::Command::new(std::env::current_exe().unwrap())
        .env("VMD_BENCH_ECHO_SERVER", redis.socket())
        .spawn()
        .unwrap();
    let vmd = VmdProcess::start(&redis, &["--log", "warn"]);
    let stub = Arc::new(VmdStub::new(broker.clone()).with_timeout(Duration::from_secs(5)));
    let t0 = Instant::now();
    while stub.status().await.is_err() {
        assert!(t0.elapsed() < Duration::from_secs(10), "vmd did not start");
    }

    let mut ec = EchoClient::new(&broker).await;
    let bare = sequential!(ec.self_round_trip().await);
    // vmd and the echo answer alternately, so that both see the same
    // moments of a noisy machine; each server's CPU time is the scheduler's
    // (`/proc/<pid>/task/*/schedstat`).
    let n = sequential_count();
    for _ in 0..WARMUP {
        ec.call().await;
        assert!(!stub.exists("bench-vm").await.unwrap());
    }
    let (mut raw, mut ours) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let cpu0 = (cpu_time(echo.id() as i32), cpu_time(vmd.pid() as i32));
    for i in 0..n {
        let echo_first = i % 2 == 0;
        if echo_first {
            let t = Instant::now();
            ec.call().await;
            raw.push(t.elapsed());
        }
        let t = Instant::now();
        assert!(!stub.exists("bench-vm").await.unwrap());
        ours.push(t.elapsed());
        if !echo_first {
            let t = Instant::now();
            ec.call().await;
            raw.push(t.elapsed());
        }
    }
    let echo_cpu = (cpu_time(echo.id() as i32) - cpu0.0) / n as u32;
    let vmd_cpu = (cpu_time(vmd.pid() as i32) - cpu0.1) / n as u32;
    let (raw, ours) = (summarise(raw), summarise(ours));

    let raw_tput = {
        let broker = broker.clone();
        throughput(dur, move |stop, count| {
            let broker = broker.clone();
            async move {
                let mut c = EchoClient::new(&broker).await;
                while !stop.load(Ordering::Relaxed) {
                    c.call().await;
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
        .await
    };
    let ours_tput = {
        let stub = stub.clone();
        throughput(dur, move |stop, count| {
            let s = stub.clone();
            async move {
                while !stop.load(Ordering::Relaxed) {
                    assert!(!s.exists("bench-vm").await.unwrap());
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
        .await
    };
    let _ = echo.kill();
    let _ = echo.wait();
    drop(vmd);

    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("zbus benchmark — {cpus} CPUs, redis-server on a unix socket, vmd");
    println!(
        "sequential: {} round trips each after {WARMUP} warm-up, vmd and the echo alternating; throughput: {CLIENTS} clients for {dur:?}",
        sequential_count()
    );
    println!();
    println!("| figure | vmd | baseline (raw Redis echo) | ratio | goal |");
    println!("|---|---|---|---|---|");
    println!(
        "| Exists round trip p50 | {} | {} | {:.2}× | ≤ 1.2× |",
        us(ours.p50),
        us(raw.p50),
        ours.p50.as_secs_f64() / raw.p50.as_secs_f64()
    );
    println!(
        "| (floor: one client RPUSH+BLPOP of its own list, no server) | | {} | {:.2}× | |",
        us(bare.p50),
        ours.p50.as_secs_f64() / bare.p50.as_secs_f64()
    );
    println!(
        "| Exists round trip mean | {} | {} | {:.2}× | |",
        us(ours.mean),
        us(raw.mean),
        ours.mean.as_secs_f64() / raw.mean.as_secs_f64()
    );
    println!(
        "| Exists round trip p99 | {} | {} | {:.2}× | |",
        us(ours.p99),
        us(raw.p99),
        ours.p99.as_secs_f64() / raw.p99.as_secs_f64()
    );
    println!(
        "| server CPU per sequential call | {} | {} | {:.2}× | |",
        us(vmd_cpu),
        us(echo_cpu),
        vmd_cpu.as_secs_f64() / echo_cpu.as_secs_f64()
    );
    println!(
        "| calls/s, {CLIENTS} clients | {:.0} | {:.0} | {:.2}× | ≥ 20000/s |",
        ours_tput,
        raw_tput,
        ours_tput / raw_tput
    );
}
