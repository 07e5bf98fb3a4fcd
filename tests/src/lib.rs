//! Fixtures of the integration tests: a real `redis-server` on a private
//! unix socket, zinit (double or real), the `vmd` binary, the whole [`stack`]
//! of them, the Go vectors, a fixture module, paths of the built binaries,
//! and [`until`], the one way a test waits for something.

pub mod browser;
pub mod fixture;
pub mod flood;
pub mod go_server;
pub mod gomodule;
pub mod guest;
pub mod loki;
pub mod netns;
pub mod network_double;
pub mod provision_double;
pub mod redis_server;
pub mod scrape;
pub mod stack;
pub mod supervisor;
pub mod terminal;
pub mod tls;
pub mod vm;
pub mod vmd_process;
pub mod web;

use std::collections::BTreeMap;
use std::path::PathBuf;

pub use redis_server::RedisServer;
pub use supervisor::Supervisor;
pub use vmd_process::VmdProcess;

/// The Go vectors, recorded from the real Go encoder (zbus v1.0.1), kept in
/// the repository as test data: `tests/fixtures/go-vectors/` (see its README).
/// The web console page of the repository (`console/web`, with xterm.js
/// installed by `npm ci`).
pub fn console_assets() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository")
        .join("console/web")
}

pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// The messages of `fixtures/go-vectors/vectors.txt`, by name.
pub fn vectors() -> BTreeMap<String, Vec<u8>> {
    let path = fixtures_dir().join("go-vectors/vectors.txt");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut out = BTreeMap::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some((name, rest)) = line.split_once(" (") else {
            continue;
        };
        let len: usize = rest
            .trim_end_matches(" bytes):")
            .parse()
            .unwrap_or_else(|_| panic!("bad header {line:?}"));
        let hex = lines.next().expect("hex line after header").trim();
        let bytes = unhex(hex);
        assert_eq!(bytes.len(), len, "length of vector {name}");
        out.insert(name.to_owned(), bytes);
    }
    out
}

pub fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
        .collect()
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A binary of the workspace (`cargo build --workspace` must have run).
pub fn bin(name: &str) -> PathBuf {
    // target/<profile>/deps/<test>-<hash> → target/<profile>/<name>
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// A benchmark's knob: the environment variable `name` if it parses, else
/// `default`.
pub fn knob<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// A directory on a tmpfs (`/dev/shm`), where a Zero-OS node keeps vmd's
/// runtime directory (its root file system is in RAM); the temp dir if
/// there is none.
pub fn tmpfs_dir(prefix: &str) -> tempfile::TempDir {
    let b = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/dev/shm");
    b.unwrap_or_else(|_| {
        tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("temp dir")
    })
}

/// Runs a benchmark on the runtime they all use: two workers, like the
/// machines the figures of BENCHMARKS.md come from.
pub fn bench_main<F: std::future::Future>(bench: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("the benchmark's runtime")
        .block_on(bench)
}

/// The `p`-th percentile of `v` (p in 0..=100).
/// Runs every VM of `vms` through `stub`, at most `at_once` at a time;
/// panics on any error (benchmarks set up their fleet with it).
pub async fn run_all(
    stub: &std::sync::Arc<vmd::stub::VmdStub>,
    vms: Vec<vmd::api::Vm>,
    at_once: usize,
) {
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(at_once));
    let calls: Vec<_> = vms
        .into_iter()
        .map(|v| {
            let (s, sem) = (std::sync::Arc::clone(stub), std::sync::Arc::clone(&sem));
            tokio::spawn(async move {
                let _p = sem.acquire().await.unwrap();
                s.run(&v).await.unwrap()
            })
        })
        .collect();
    for c in calls {
        c.await.unwrap();
    }
}

pub fn pct(v: &[std::time::Duration], p: usize) -> std::time::Duration {
    let mut v = v.to_vec();
    v.sort();
    v[(v.len() * p / 100).min(v.len() - 1)]
}

/// A duration in milliseconds, for benchmark tables.
pub fn ms(d: std::time::Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Polls `cond` every 10 ms until it holds; panics naming `what` once
/// `limit` has passed. The one way the tests wait for something to happen.
pub async fn until<F, Fut>(limit: std::time::Duration, what: impl std::fmt::Display, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    until_some(limit, what, || {
        let c = cond();
        async move { c.await.then_some(()) }
    })
    .await
}

/// [`until`] for a value: polls `f` until it yields `Some`, and returns it.
pub async fn until_some<T, F, Fut>(
    limit: std::time::Duration,
    what: impl std::fmt::Display,
    mut f: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let t0 = std::time::Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(poll_interval(t0.elapsed())).await;
    }
}

/// How long a poll waits before looking again, `waited` into its wait:
/// 10 ms at first, then a twentieth of the time waited so far (≤ 5 % late),
/// at most 250 ms. A double answers within milliseconds; a real guest on an
/// emulated KVM takes minutes to boot, and looking at 100 calls/s for that
/// long took a quarter of a core from the guests it waited for.
pub fn poll_interval(waited: std::time::Duration) -> std::time::Duration {
    (waited / 20).clamp(
        std::time::Duration::from_millis(10),
        std::time::Duration::from_millis(250),
    )
}

/// One log-stream message, gunzipped (each is a complete gzip member).
pub fn gunzip(b: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(b)
        .read_to_end(&mut out)
        .expect("each message is a complete gzip member");
    out
}
