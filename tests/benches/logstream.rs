//! vmd-logstream benchmark: `cargo build --release --workspace --bins && cargo bench -p vmd-tests --bench logstream`.
//!
//! A console log of `VMD_BENCH_MB` MB (default 64) of 64-byte lines is
//! written first; a worker started with `--tail` covering all of it ships it
//! as fast as it can to a local Redis (a subscriber counts the bytes), to
//! a local WebSocket server, gzip per chunk, and to a local Loki push
//! endpoint (one entry per line, Loki's snappy protobuf per push; the
//! receiver decodes every push and counts the lines' bytes). Baseline, same run: gzip alone
//! over the same data in 8 KiB chunks (the CPU floor of the job). Also the
//! worker's RSS and CPU per MB.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use vmd_runtime::console::ConsoleLog;
use vmd_tests::vm::{cpu_ticks, private_dirty_kib, rss_kib, settled_memory_kib};
use vmd_tests::{bin, RedisServer};

fn gunzip_len(b: &[u8]) -> u64 {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(b)
        .read_to_end(&mut out)
        .unwrap();
    out.len() as u64
}

/// The console bytes a Loki push carries (a protobuf `PushRequest`,
/// `pkg/push/push.proto`): each entry's line and the newline the worker
/// took off.
fn loki_line_bytes(message: Vec<u8>) -> u64 {
    use prost::Message;
    #[derive(Clone, PartialEq, prost::Message)]
    struct PushRequest {
        #[prost(message, repeated, tag = "1")]
        streams: Vec<StreamAdapter>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct StreamAdapter {
        #[prost(string, tag = "1")]
        labels: String,
        #[prost(message, repeated, tag = "2")]
        entries: Vec<EntryAdapter>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct EntryAdapter {
        #[prost(bytes = "bytes", tag = "2")]
        line: bytes::Bytes,
    }
    let push = PushRequest::decode(bytes::Bytes::from(message)).unwrap();
    push.streams
        .iter()
        .flat_map(|s| &s.entries)
        .map(|e| e.line.len() as u64 + 1)
        .sum()
}

fn worker(log: &std::path::Path, output: &str, state: &std::path::Path, tail: u64) -> Child {
    Command::new(bin("vmd-logstream"))
        .arg("--log")
        .arg(log)
        .args(["--output", output, "--tail", &tail.to_string()])
        .arg("--state")
        .arg(state)
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

struct Run {
    secs: f64,
    cpu_ms: f64,
    rss_kib: u64,
    private_kib: u64,
    idle_rss_kib: u64,
}

async fn measure(mut child: Child, got: Arc<AtomicU64>, total: u64) -> Run {
    let pid = child.id() as i32;
    let t0 = Instant::now();
    let mut rss = 0;
    let mut private = 0;
    let mut cpu = 0;
    while got.load(Ordering::Relaxed) < total {
        rss = rss.max(rss_kib(pid));
        private = private.max(private_dirty_kib(pid));
        cpu = cpu_ticks(pid);
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "stalled at {}",
            got.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu.max(cpu_ticks(pid));
    // Caught up and idle, following the log.
    let (idle_rss_kib, _) = settled_memory_kib(pid).await;
    let _ = child.kill();
    let _ = child.wait();
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Run {
        secs,
        cpu_ms: cpu as f64 * 1000.0 / tick,
        rss_kib: rss,
        private_kib: private,
        idle_rss_kib,
    }
}

fn main() {
    let mb: u64 = vmd_tests::knob("VMD_BENCH_MB", 64);
    vmd_tests::bench_main(bench(mb * 1_000_000));
}

async fn bench(total: u64) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("console");
    let mut data = Vec::with_capacity(total as usize);
    let mut seq = 0u64;
    while (data.len() as u64) < total {
        seq += 1;
        data.extend_from_slice(format!("FLOOD {seq:012} {}\n", "x".repeat(44)).as_bytes());
    }
    data.truncate(total as usize);
    let mut console = ConsoleLog::open(&log, total * 2, total).unwrap();
    console.write(&data).unwrap();
    drop(console);

    // Baseline: gzip alone, 8 KiB chunks.
    let t0 = Instant::now();
    let mut compressed = 0usize;
    let mut gz = vmd_logstream::Gzip::default();
    for c in data.chunks(8192) {
        compressed += gz.member(c).len();
    }
    let gzip_secs = t0.elapsed().as_secs_f64();

    // To Redis.
    let receiver = RedisServer::start_tcp();
    let client =
        redis::Client::open(format!("redis://127.0.0.1:{}/", receiver.tcp_port())).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe("bench").await.unwrap();
    let got = Arc::new(AtomicU64::new(0));
    let g = got.clone();
    tokio::spawn(async move {
        let mut m = pubsub.on_message();
        while let Some(msg) = m.next().await {
            let p: Vec<u8> = msg.get_payload().unwrap();
            g.fetch_add(gunzip_len(&p), Ordering::Relaxed);
        }
    });
    let out = format!("redis://127.0.0.1:{}/bench", receiver.tcp_port());
    let redis_run = measure(
        worker(&log, &out, &dir.path().join("r.state"), total),
        got,
        total,
    )
    .await;

    // To a WebSocket server.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let got = Arc::new(AtomicU64::new(0));
    let g = got.clone();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        while let Some(Ok(m)) = ws.next().await {
            if let tokio_tungstenite::tungstenite::Message::Binary(b) = m {
                g.fetch_add(gunzip_len(&b), Ordering::Relaxed);
            }
        }
    });
    let out = format!("ws://127.0.0.1:{port}/");
    let ws_run = measure(
        worker(&log, &out, &dir.path().join("w.state"), total),
        got,
        total,
    )
    .await;

    // To a Loki push endpoint.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let got = Arc::new(AtomicU64::new(0));
    let g = got.clone();
    let receiver_ns = Arc::new(AtomicU64::new(0));
    let busy = receiver_ns.clone();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let (g, busy) = (g.clone(), busy.clone());
            async move {
                use http_body_util::BodyExt;
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let t0 = Instant::now();
                let raw = snap::raw::Decoder::new().decompress_vec(&body).unwrap();
                g.fetch_add(loki_line_bytes(raw), Ordering::Relaxed);
                busy.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
                Ok::<_, std::convert::Infallible>(
                    hyper::Response::builder()
                        .status(204)
                        .body(http_body_util::Full::new(bytes::Bytes::new()))
                        .unwrap(),
                )
            }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
            .await;
    });
    let out = format!("http://127.0.0.1:{port}");
    let loki_run = measure(
        worker(&log, &out, &dir.path().join("l.state"), total),
        got,
        total,
    )
    .await;

    let mbs = |secs: f64| total as f64 / 1e6 / secs;
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("vmd-logstream benchmark — {cpus} CPUs, release; {} MB of console (64-byte lines), gzip per 8 KiB chunk (ratio {:.1}:1)", total / 1_000_000, total as f64 / compressed as f64);
    println!("(the receivers gunzip in the bench process, on the same 2 cores)");
    println!();
    println!("| figure | vmd-logstream | baseline | ratio | goal |");
    println!("|---|---|---|---|---|");
    println!(
        "| throughput to local Redis | {:.0} MB/s | {:.0} MB/s (gzip alone) | {:.2}× | |",
        mbs(redis_run.secs),
        mbs(gzip_secs),
        mbs(redis_run.secs) / mbs(gzip_secs)
    );
    println!(
        "| throughput to a local WebSocket | {:.0} MB/s | {:.0} MB/s (gzip alone) | {:.2}× | |",
        mbs(ws_run.secs),
        mbs(gzip_secs),
        mbs(ws_run.secs) / mbs(gzip_secs)
    );
    println!(
        "| throughput to a local Loki | {:.0} MB/s | {:.0} MB/s (gzip alone) | {:.2}× | ≥ 0.8× |",
        mbs(loki_run.secs),
        mbs(gzip_secs),
        mbs(loki_run.secs) / mbs(gzip_secs)
    );
    let per_mb = |ms: f64| ms / (total as f64 / 1e6);
    println!(
        "| Loki receiver's decoding (snappy, protobuf), in the bench | {:.2} ms/MB | | | |",
        per_mb(receiver_ns.load(Ordering::Relaxed) as f64 / 1e6)
    );
    let gzip_ms_mb = gzip_secs * 1000.0 / (total as f64 / 1e6);
    println!(
        "| worker CPU per MB (gzip) | {:.2} ms/MB (Redis), {:.2} ms/MB (WS), {:.2} ms/MB (Loki) | {:.2} ms/MB (gzip alone) | {:.2}× (Redis), {:.2}× (Loki) | |",
        per_mb(redis_run.cpu_ms),
        per_mb(ws_run.cpu_ms),
        per_mb(loki_run.cpu_ms),
        gzip_ms_mb,
        per_mb(redis_run.cpu_ms) / gzip_ms_mb,
        per_mb(loki_run.cpu_ms) / gzip_ms_mb,
    );
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "| worker RSS, idle after catching up | {:.2} MiB (Redis), {:.2} MiB (WS), {:.2} MiB (Loki) | | | ≤ 4 MiB |",
        mib(redis_run.idle_rss_kib),
        mib(ws_run.idle_rss_kib),
        mib(loki_run.idle_rss_kib)
    );
    println!(
        "| worker peak RSS while streaming | {:.2} MiB (Redis), {:.2} MiB (WS), {:.2} MiB (Loki) | | | |",
        mib(redis_run.rss_kib),
        mib(ws_run.rss_kib),
        mib(loki_run.rss_kib)
    );
    println!(
        "| worker peak private dirty memory | {:.2} MiB (Redis), {:.2} MiB (WS), {:.2} MiB (Loki) | | | |",
        mib(redis_run.private_kib),
        mib(ws_run.private_kib),
        mib(loki_run.private_kib)
    );
}
