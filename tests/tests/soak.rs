//! Fault-injection soak: several zbus clients drive random Run / Delete /
//! Lock / StreamCreate / StreamDelete (and reads) against the real `vmd`,
//! while a chaos loop kill -9s vmd, shims, VMMs and stream workers and
//! restarts Redis. At the end, after the faults stop:
//!
//! * what vmd reports (List, Exists, Inspect's state and streams) equals
//!   what the clients were told, call by call;
//! * every VM's console log has no hole inside a boot (bytes a VMM printed
//!   reach the log, whatever else was killed);
//! * every live stream delivered every console byte still in the log from
//!   the moment it was created (duplicates allowed: a killed worker resends
//!   what it had not recorded);
//! * after deleting everything: no process, socket, file or zinit service
//!   is left.
//!
//! `soak_short` runs in CI (90 s of faults). The long run is opt-in:
//! `VMD_SOAK_SECS=1800 cargo test -p vmd-tests --test soak -- --ignored --nocapture`.
//! `VMD_SOAK_SEED` replays a run's random choices (they are printed).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use vmd::api::{Stream, Vm};
use vmd::stub::VmdStub;
use vmd::zbus::client::ClientError;
use vmd_tests::supervisor::processes_with;
use vmd_tests::vm::real_ch;
use vmd_tests::{gunzip, RedisServer, Supervisor, VmdProcess};

const CLIENTS: usize = 3;
const NAMES_PER_CLIENT: usize = 2;
/// Console output of every VM: 64-byte FLOOD lines at this rate.
const FLOOD_BPS: u64 = 4_000;
/// Small logs, so rotation happens during the run.
const ROTATE_BYTES: u64 = 256 << 10;
const KEEP_BYTES: u64 = 128 << 10;
/// The shim gives up after 5 VMM exits in 300 s: the chaos stays below.
const KILLS_PER_VM_PER_WINDOW: usize = 3;
const KILL_WINDOW: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_short() {
    if real_ch() {
        eprintln!("skipped: needs the double's flood knob and hundreds of boots");
        return;
    }
    soak(Duration::from_secs(90)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "long: VMD_SOAK_SECS=1800 cargo test --test soak -- --ignored"]
async fn soak_long() {
    let secs = std::env::var("VMD_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1800);
    soak(Duration::from_secs(secs)).await;
}

/// xorshift64*: reproducible choices without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

/// What the clients were told about one VM.
#[derive(Default, Clone, Debug)]
struct Expected {
    present: bool,
    locked: bool,
    /// Stream id → absolute console offset when StreamCreate answered.
    streams: BTreeMap<String, u64>,
}

#[derive(Default)]
struct Counters {
    ops: AtomicU64,
    /// Calls retried after no answer while Redis restarted: what Redis
    /// held is gone, queues and in-flight lists with it.
    lost_to_redis: AtomicU64,
    /// Calls retried after no answer with Redis up all along: a reply vmd
    /// lost (killed with the request in hand). Must stay 0.
    lost_replies: AtomicU64,
    /// Odd while Redis is being restarted; a call that sees it change
    /// overlapped a restart.
    redis_epoch: AtomicU64,
    run_refused: AtomicU64,
    lock_deferred: AtomicU64,
    /// Streams checked byte for byte before they went, and their bytes.
    streams_verified: AtomicU64,
    bytes_verified: AtomicU64,
    kill_vmd: AtomicU64,
    kill_shim: AtomicU64,
    kill_vmm: AtomicU64,
    kill_worker: AtomicU64,
    redis_restarts: AtomicU64,
}

struct World {
    redis: Mutex<RedisServer>,
    receiver: RedisServer,
    zinit: Supervisor,
    vmd: Mutex<VmdProcess>,
    runtime: PathBuf,
    root: PathBuf,
    kernel: PathBuf,
    stub: VmdStub,
    expected: Mutex<BTreeMap<String, Expected>>,
    /// Stream id → gunzipped messages, in arrival order.
    received: Mutex<HashMap<String, Vec<Vec<u8>>>>,
    counters: Counters,
    kills: Mutex<HashMap<String, VecDeque<Instant>>>,
    /// Calls that got an answer vmd should never give.
    wrong: Mutex<Vec<String>>,
    stop_chaos: AtomicBool,
    _scratch: tempfile::TempDir,
}

fn add(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// A transport failure (lost reply, dead broker): the call's outcome is
/// unknown, and the caller retries it (every call here is idempotent).
fn transport(e: &ClientError) -> bool {
    !matches!(e, ClientError::Method(_))
}

impl World {
    fn vm(&self, name: &str) -> Vm {
        let mut vm = Vm {
            name: name.into(),
            cpu: 1,
            memory: 256 << 20,
            kernel_image: self.kernel.to_string_lossy().into_owned(),
            ..Default::default()
        };
        vm.kernel_args
            .insert("double.flood_bps".into(), FLOOD_BPS.to_string());
        vm
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.root.join("logs").join(name)
    }

    fn stream_for(&self, id: &str) -> Stream {
        Stream {
            id: id.into(),
            namespace: String::new(),
            output: format!("redis://127.0.0.1:{}/soak.{id}", self.receiver.tcp_port()),
        }
    }

    /// Calls `f` until it gets an answer (a result or a method error).
    async fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T, String>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let t0 = Instant::now();
        loop {
            let epoch = get(&self.counters.redis_epoch);
            match f().await {
                Ok(v) => return Ok(v),
                Err(ClientError::Method(m)) => return Err(m),
                Err(e) => {
                    assert!(transport(&e));
                    let now = get(&self.counters.redis_epoch);
                    if epoch != now || now % 2 == 1 {
                        add(&self.counters.lost_to_redis);
                    } else {
                        add(&self.counters.lost_replies);
                        self.wrong(format!(
                            "{what}: no answer within the deadline while Redis was up: {e}"
                        ));
                    }
                    assert!(
                        t0.elapsed() < Duration::from_secs(120),
                        "{what}: no answer for 2 minutes: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    fn wrong(&self, msg: String) {
        eprintln!("WRONG: {msg}");
        self.wrong.lock().unwrap().push(msg);
    }

    fn expected(&self, name: &str) -> Expected {
        self.expected
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .unwrap_or_default()
    }

    fn set_expected(&self, name: &str, e: Expected) {
        self.expected.lock().unwrap().insert(name.into(), e);
    }

    /// One random call on `name`, which only this client touches.
    async fn step(&self, rng: &mut Rng, name: &str, serial: &mut u64) {
        add(&self.counters.ops);
        let mut exp = self.expected(name);
        let roll = rng.below(100);
        if !exp.present {
            if roll < 70 {
                let vm = self.vm(name);
                match self.call("Run", || self.stub.run(&vm)).await {
                    Ok(_) => {
                        exp = Expected {
                            present: true,
                            ..Default::default()
                        }
                    }
                    // A VMM killed while it boots fails the Run, cleanly.
                    Err(m) if m.contains("failed to start vm") => {
                        add(&self.counters.run_refused);
                    }
                    Err(m) => self.wrong(format!("Run({name}): {m}")),
                }
            } else if roll < 80 {
                if let Err(m) = self.call("Delete", || self.stub.delete(name)).await {
                    self.wrong(format!("Delete of absent {name}: {m}"));
                }
            } else if roll < 90 {
                match self.call("Inspect", || self.stub.inspect(name)).await {
                    Ok(i) => self.wrong(format!("Inspect of absent {name} answered {i:?}")),
                    Err(m) if m.contains("does not exist") => {}
                    Err(m) => self.wrong(format!("Inspect of absent {name}: {m}")),
                }
            } else {
                let id = format!("{name}-x{serial}");
                *serial += 1;
                let s = self.stream_for(&id);
                match self
                    .call("StreamCreate", || self.stub.stream_create(name, &s))
                    .await
                {
                    Ok(()) => self.wrong(format!("StreamCreate on absent {name} accepted")),
                    Err(m) if m.contains("does not exist") => {}
                    Err(m) => self.wrong(format!("StreamCreate on absent {name}: {m}")),
                }
            }
        } else if roll < 12 {
            for (id, created) in &exp.streams {
                self.verify_stream(name, id, *created).await;
            }
            match self.call("Delete", || self.stub.delete(name)).await {
                Ok(()) => {
                    for id in exp.streams.keys() {
                        self.received.lock().unwrap().remove(id);
                    }
                    exp = Expected::default();
                }
                Err(m) => self.wrong(format!("Delete({name}): {m}")),
            }
        } else if roll < 30 {
            let want = !exp.locked;
            match self.call("Lock", || self.stub.lock(name, want)).await {
                Ok(()) => exp.locked = want,
                // The lock is recorded; it applies when the VMM is back.
                Err(m)
                    if m.contains("applies when it starts")
                        || m.contains("cannot pause")
                        || m.contains("cannot resume") =>
                {
                    add(&self.counters.lock_deferred);
                    exp.locked = want;
                }
                Err(m) => self.wrong(format!("Lock({name}, {want}): {m}")),
            }
        } else if roll < 60 && exp.streams.len() < 2 {
            let id = format!("{name}-s{serial}");
            *serial += 1;
            let s = self.stream_for(&id);
            self.received.lock().unwrap().insert(id.clone(), Vec::new());
            match self
                .call("StreamCreate", || self.stub.stream_create(name, &s))
                .await
            {
                Ok(()) => {
                    let (_, base, len) = read_log(&self.log_path(name));
                    exp.streams.insert(id, base + len);
                }
                Err(m) => {
                    self.received.lock().unwrap().remove(&id);
                    self.wrong(format!("StreamCreate({name}, {id}): {m}"));
                }
            }
        } else if roll < 66 && !exp.streams.is_empty() {
            let id = exp.streams.keys().next().cloned().unwrap_or_default();
            self.verify_stream(name, &id, exp.streams[&id]).await;
            match self
                .call("StreamDelete", || self.stub.stream_delete(&id))
                .await
            {
                Ok(()) => {
                    exp.streams.remove(&id);
                    self.received.lock().unwrap().remove(&id);
                }
                Err(m) => self.wrong(format!("StreamDelete({id}): {m}")),
            }
        } else if roll < 85 {
            match self.call("Inspect", || self.stub.inspect(name)).await {
                Ok(_) => {}
                Err(m) => self.wrong(format!("Inspect of present {name}: {m}")),
            }
        } else {
            match self.call("Logs", || self.stub.logs(name)).await {
                Ok(_) => {}
                Err(m) => self.wrong(format!("Logs of present {name}: {m}")),
            }
        }
        // Whatever happened, vmd's Exists agrees with what the client was told.
        match self.call("Exists", || self.stub.exists(name)).await {
            Ok(e) if e == exp.present => {}
            Ok(e) => self.wrong(format!("Exists({name}) = {e}, expected {}", exp.present)),
            Err(m) => self.wrong(format!("Exists({name}): {m}")),
        }
        self.set_expected(name, exp);
    }

    /// Before a stream goes (StreamDelete, or Delete of its VM), while the
    /// faults go on: waits until it delivered the log up to now, and checks
    /// every byte since its creation still in the log arrived.
    async fn verify_stream(&self, name: &str, id: &str, created: u64) {
        let path = self.log_path(name);
        let (_, base, len) = read_log(&path);
        let end = base + len;
        let t0 = Instant::now();
        loop {
            let (log, base, _) = read_log(&path);
            let from = created.max(base);
            let msgs = self.received.lock().unwrap()[id].clone();
            let holes = uncovered(&log, base, &msgs, from, end);
            if holes.is_empty() {
                add(&self.counters.streams_verified);
                self.counters
                    .bytes_verified
                    .fetch_add(end.saturating_sub(from), Ordering::Relaxed);
                return;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                let progress = std::fs::read_to_string(
                    self.runtime
                        .join("streams/progress")
                        .join(format!("{id}.progress")),
                )
                .unwrap_or_default();
                let svc = format!("stream:{id}");
                let ring: Vec<String> = self
                    .zinit
                    .client()
                    .log_snapshot()
                    .await
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|l| l.contains(&svc))
                    .collect();
                let sizes: Vec<usize> = msgs.iter().map(Vec::len).collect();
                // What was there and what came, around the first hole: the
                // evidence for whoever reads the failure.
                let (lo, hi) = holes[0];
                let around = |from: u64, to: u64| {
                    let (a, b) = (
                        from.saturating_sub(base) as usize,
                        to.saturating_sub(base) as usize,
                    );
                    String::from_utf8_lossy(&log[a.min(log.len())..b.min(log.len())])
                        .escape_debug()
                        .to_string()
                };
                let sent: Vec<String> = msgs
                    .iter()
                    .take(6)
                    .map(|m| {
                        String::from_utf8_lossy(&m[..m.len().min(120)])
                            .escape_debug()
                            .to_string()
                    })
                    .collect();
                self.wrong(format!(
                    "stream {id} of {name} (created at {created}, log {base}..{end}) misses {holes:?}; \
                     {} messages {sizes:?}; progress {progress}; worker said {ring:#?}; \
                     the log around the first hole: {:?} [{:?}] {:?}; the first messages began {sent:#?}",
                    msgs.len(),
                    around(lo.saturating_sub(120), lo),
                    around(lo, hi),
                    around(hi, hi + 120),
                ));
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Processes of this test's VMs and streams (not vmd): (pid, argv).
    fn processes(&self) -> Vec<(i32, Vec<String>)> {
        let marker = self.vmd.lock().unwrap().dir.path().display().to_string();
        processes_with(&marker)
            .into_iter()
            .filter_map(|p| {
                let raw = std::fs::read(format!("/proc/{p}/cmdline")).ok()?;
                let argv = raw
                    .split(|b| *b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect::<Vec<_>>();
                let vmd = argv.first().is_some_and(|a| Path::new(a).ends_with("vmd"));
                (!vmd).then_some((p, argv))
            })
            .collect()
    }

    /// The VM a shim or VMM belongs to (from `…/vms/<name>` or the API
    /// socket `path=…/api/<name>` in its argv).
    fn vm_of(argv: &[String]) -> Option<String> {
        argv.iter().find_map(|a| {
            // A VMM: its API socket, `path=<runtime>/api/<name>`.
            if let Some(sock) = a.strip_prefix("path=").filter(|s| s.contains("/api/")) {
                return Some(sock.rsplit('/').next()?.to_owned());
            }
            let (_, rest) = a.split_once("/vms/")?;
            Some(rest.split('/').next()?.to_owned())
        })
    }

    /// May a VM's shim or VMM be killed now (the shim's crash-loop budget)?
    fn may_kill(&self, vm: &str) -> bool {
        let mut kills = self.kills.lock().unwrap();
        let q = kills.entry(vm.to_owned()).or_default();
        while q.front().is_some_and(|t| t.elapsed() > KILL_WINDOW) {
            q.pop_front();
        }
        if q.len() >= KILLS_PER_VM_PER_WINDOW {
            return false;
        }
        q.push_back(Instant::now());
        true
    }

    /// The chaos loop, on a thread of its own: the processes it restarts die
    /// with the thread that started them (PR_SET_PDEATHSIG), so it must not
    /// be a runtime thread that may go away; it stays until `done` closes.
    fn chaos(self: Arc<Self>, mut rng: Rng, done: std::sync::mpsc::Receiver<()>) {
        while !self.stop_chaos.load(Ordering::Relaxed) {
            std::thread::sleep(rng.millis(800, 3000));
            if self.stop_chaos.load(Ordering::Relaxed) {
                break;
            }
            let roll = rng.below(100);
            let program = |argv: &[String]| {
                Path::new(argv.first().map_or("", String::as_str))
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default()
            };
            if roll < 20 {
                let pause = rng.millis(0, 700);
                self.vmd.lock().unwrap().crash();
                add(&self.counters.kill_vmd);
                std::thread::sleep(pause);
                self.vmd.lock().unwrap().restart();
            } else if roll < 35 {
                add(&self.counters.redis_epoch);
                self.redis.lock().unwrap().restart();
                add(&self.counters.redis_epoch);
                add(&self.counters.redis_restarts);
            } else {
                let vmm = vmd_tests::vm::ch_program_name();
                let (want, counter) = match roll {
                    35..=57 => ("vmd-shim", &self.counters.kill_shim),
                    58..=80 => (vmm.as_str(), &self.counters.kill_vmm),
                    _ => ("vmd-logstream", &self.counters.kill_worker),
                };
                let mut victims: Vec<(i32, Vec<String>)> = self
                    .processes()
                    .into_iter()
                    .filter(|(_, argv)| program(argv) == want)
                    .collect();
                if victims.is_empty() {
                    continue;
                }
                let (pid, argv) = victims.swap_remove(rng.below(victims.len() as u64) as usize);
                if want != "vmd-logstream" {
                    match Self::vm_of(&argv) {
                        Some(vm) if self.may_kill(&vm) => {}
                        _ => continue,
                    }
                }
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
                add(counter);
            }
        }
        let _ = done.recv();
    }
}

/// The console log as it is now: (bytes, absolute offset of its first
/// byte, length). Retried until the file and its sidecar agree.
fn read_log(path: &Path) -> (Vec<u8>, u64, u64) {
    for _ in 0..100 {
        let Ok(mut f) = std::fs::File::open(path) else {
            return (Vec::new(), 0, 0);
        };
        let ino = f.metadata().map(|m| m.ino()).unwrap_or(0);
        let base = match vmd_runtime::console::file_base(path, ino) {
            Some(base) => base,
            None => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
        };
        let mut bytes = Vec::new();
        if f.read_to_end(&mut bytes).is_err() {
            continue;
        }
        let len = bytes.len() as u64;
        return (bytes, base, len);
    }
    panic!("the log {} and its sidecar never agreed", path.display());
}

/// `FLOOD <seq> b<boot>` at the start of `line`.
fn flood_id(line: &[u8]) -> Option<(u64, u64)> {
    let rest = line.strip_prefix(b"FLOOD ")?;
    let seq = std::str::from_utf8(rest.get(..12)?).ok()?.parse().ok()?;
    let boot = rest.get(12..14).filter(|b| b == b" b")?;
    let _ = boot;
    let boot = std::str::from_utf8(rest.get(14..21)?).ok()?.parse().ok()?;
    Some((boot, seq))
}

/// Offsets (in `log`) of complete FLOOD lines, by (boot, seq).
fn index_lines(log: &[u8]) -> HashMap<(u64, u64), usize> {
    let mut out = HashMap::new();
    let mut start = 0;
    for (i, b) in log.iter().enumerate() {
        if *b == b'\n' {
            if let Some(id) = flood_id(&log[start..i]) {
                out.insert(id, start);
            }
            start = i + 1;
        }
    }
    out
}

/// Holes inside a boot: per boot id, its FLOOD lines must be consecutive.
/// A boot may start mid-sequence only at the file's start (rotation) and may
/// end early (its VMM or shim was killed).
fn holes_in(log: &[u8]) -> Vec<String> {
    let mut last: HashMap<u64, u64> = HashMap::new();
    let mut holes = Vec::new();
    for line in log.split(|b| *b == b'\n') {
        let Some((boot, seq)) = flood_id(line) else {
            continue;
        };
        if let Some(prev) = last.insert(boot, seq) {
            if seq != prev + 1 {
                holes.push(format!("boot {boot}: {prev} then {seq}"));
            }
        }
    }
    holes
}

/// Where each received message sits in the console (absolute offsets),
/// for those still in the log; then the parts of [from, to) no message
/// covered.
fn uncovered(log: &[u8], base: u64, msgs: &[Vec<u8>], from: u64, to: u64) -> Vec<(u64, u64)> {
    let index = index_lines(log);
    let mut spans: Vec<(u64, u64)> = Vec::new();
    let mut expected: Option<u64> = None;
    for m in msgs {
        // A FLOOD line starting inside the message pins it down.
        let pinned = memchr_all(m).into_iter().find_map(|at| {
            let id = flood_id(&m[at..])?;
            let line = *index.get(&id)? as u64;
            (line + base).checked_sub(at as u64)
        });
        // Else right after the previous message, else (a first message of
        // boot lines only) where it occurs nearest the stream's start.
        let at = pinned.or(expected).or_else(|| {
            let n = m.len();
            (n > 0 && n <= log.len())
                .then(|| {
                    log.windows(n)
                        .enumerate()
                        .filter(|(_, w)| *w == m.as_slice())
                        .map(|(i, _)| base + i as u64)
                        .min_by_key(|p| p.abs_diff(from))
                })
                .flatten()
        });
        expected = None;
        let Some(at) = at else { continue };
        let (lo, hi) = (at, at + m.len() as u64);
        // Only the part still in the log counts: a message may straddle
        // the start of a rotated log.
        let (clo, chi) = (lo.max(base), hi.min(base + log.len() as u64));
        if clo >= chi {
            continue;
        }
        let here = &log[(clo - base) as usize..(chi - base) as usize];
        if here != &m[(clo - lo) as usize..(chi - lo) as usize] {
            continue;
        }
        spans.push((clo, chi));
        expected = Some(hi);
    }
    spans.sort();
    let mut holes = Vec::new();
    let mut pos = from;
    for (lo, hi) in spans {
        if hi <= pos {
            continue;
        }
        if lo > pos {
            holes.push((pos, lo.min(to)));
        }
        pos = pos.max(hi);
        if pos >= to {
            break;
        }
    }
    if pos < to {
        holes.push((pos, to));
    }
    holes.retain(|(a, b)| a < b);
    holes
}

/// Starts of lines in `m` that begin with `FLOOD ` (0 included).
fn memchr_all(m: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    if m.starts_with(b"FLOOD ") {
        out.push(0);
    }
    for (i, b) in m.iter().enumerate() {
        if *b == b'\n' && m[i + 1..].starts_with(b"FLOOD ") {
            out.push(i + 1);
        }
    }
    out
}

/// Receives every `soak.<id>` channel of the receiver Redis.
async fn listen(world: Arc<World>) {
    let url = format!("redis://127.0.0.1:{}/", world.receiver.tcp_port());
    let client = redis::Client::open(url).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.psubscribe("soak.*").await.unwrap();
    tokio::spawn(async move {
        let mut msgs = pubsub.on_message();
        while let Some(m) = msgs.next().await {
            let channel = m.get_channel_name().to_owned();
            let payload: Vec<u8> = m.get_payload().unwrap();
            let id = channel.trim_start_matches("soak.");
            if let Some(v) = world.received.lock().unwrap().get_mut(id) {
                v.push(gunzip(&payload));
            }
        }
    });
}

async fn soak(duration: Duration) {
    let seed = std::env::var("VMD_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!(
        "soak: {} s of faults, seed {seed} (VMD_SOAK_SEED to replay)",
        duration.as_secs()
    );
    let redis = RedisServer::start();
    let receiver = RedisServer::start_tcp();
    let zinit = Supervisor::start();
    let scratch = tempfile::tempdir().unwrap();
    let kernel = scratch.path().join("vmlinux");
    std::fs::write(&kernel, "the double boots anything").unwrap();
    let sys_net = scratch.path().join("net").to_string_lossy().into_owned();
    let (rotate, keep) = (ROTATE_BYTES.to_string(), KEEP_BYTES.to_string());
    let vmd = VmdProcess::start_with(
        &redis,
        Some(&zinit),
        &[
            "--sys-net",
            &sys_net,
            "--grace-secs",
            "3",
            "--log-rotate-bytes",
            &rotate,
            "--log-keep-bytes",
            &keep,
        ],
    );
    vmd.wait_ready().await;
    // A deadline that a call survives two vmd kills in (each: a pause, the
    // reconciliation of its VM, the call served again).
    let stub = VmdStub::new(redis.broker()).with_timeout(Duration::from_secs(30));
    let world = Arc::new(World {
        runtime: vmd.runtime(),
        root: vmd.root(),
        redis: Mutex::new(redis),
        receiver,
        zinit,
        vmd: Mutex::new(vmd),
        kernel,
        stub,
        expected: Mutex::new(BTreeMap::new()),
        received: Mutex::new(HashMap::new()),
        counters: Counters::default(),
        kills: Mutex::new(HashMap::new()),
        wrong: Mutex::new(Vec::new()),
        stop_chaos: AtomicBool::new(false),
        _scratch: scratch,
    });
    listen(Arc::clone(&world)).await;

    let t0 = Instant::now();
    let deadline = t0 + duration;
    let mut seeder = Rng(seed);
    let (done, chaos_done) = std::sync::mpsc::channel::<()>();
    let chaos = {
        let world = Arc::clone(&world);
        let rng = Rng(seeder.next() | 1);
        std::thread::spawn(move || world.chaos(rng, chaos_done))
    };
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let world = Arc::clone(&world);
        let mut rng = Rng(seeder.next() | 1);
        clients.push(tokio::spawn(async move {
            let names: Vec<String> = (0..NAMES_PER_CLIENT)
                .map(|i| format!("soak-{c}-{i}"))
                .collect();
            let mut serial = 0u64;
            while Instant::now() < deadline {
                let name = &names[rng.below(names.len() as u64) as usize];
                world.step(&mut rng, name, &mut serial).await;
                tokio::time::sleep(rng.millis(20, 400)).await;
            }
        }));
    }
    let mut last_report = Instant::now();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if last_report.elapsed() > Duration::from_secs(60) {
            last_report = Instant::now();
            report(&world, t0.elapsed());
        }
    }
    for c in clients {
        c.await.expect("a client panicked");
    }
    world.stop_chaos.store(true, Ordering::Relaxed);
    let faults_over = Instant::now();
    report(&world, t0.elapsed());
    let up = Instant::now();
    while world.stub.status().await.is_err() {
        if up.elapsed() > Duration::from_secs(60) {
            let mut vmd = world.vmd.lock().unwrap();
            let err = vmd.stderr();
            panic!(
                "vmd not answering 60 s after the faults stopped (exited: {:?}); its log ends:\n{}",
                vmd.exited(),
                &err[err.len().saturating_sub(6000)..]
            );
        }
    }

    // 1. What vmd reports converges to what the clients were told.
    let expected = world.expected.lock().unwrap().clone();
    let present: BTreeSet<String> = expected
        .iter()
        .filter(|(_, e)| e.present)
        .map(|(n, _)| n.clone())
        .collect();
    let converge = Instant::now();
    loop {
        let mut diffs = Vec::new();
        let list: BTreeSet<String> = world
            .call("List", || world.stub.list())
            .await
            .unwrap()
            .into_iter()
            .collect();
        if list != present {
            diffs.push(format!("List {list:?}, expected {present:?}"));
        }
        for (name, e) in &expected {
            if !e.present {
                continue;
            }
            let Ok(i) = world.call("Inspect", || world.stub.inspect(name)).await else {
                diffs.push(format!("{name}: Inspect failed"));
                continue;
            };
            let want = if e.locked { "paused" } else { "running" };
            if i.state.as_deref() != Some(want) {
                diffs.push(format!("{name}: state {:?}, expected {want}", i.state));
            }
            let streams: BTreeSet<String> = i
                .streams
                .unwrap_or_default()
                .into_iter()
                .map(|s| s.id)
                .collect();
            let want: BTreeSet<String> = e.streams.keys().cloned().collect();
            if streams != want {
                diffs.push(format!("{name}: streams {streams:?}, expected {want:?}"));
            }
        }
        if diffs.is_empty() {
            break;
        }
        assert!(
            converge.elapsed() < Duration::from_secs(90),
            "vmd's state did not converge to the expected one:\n{}",
            diffs.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let converged_in = converge.elapsed();

    // 2. Console logs: no hole inside a boot.
    let mut log_bytes = 0u64;
    for name in &present {
        let (log, _, _) = read_log(&world.log_path(name));
        log_bytes += log.len() as u64;
        let holes = holes_in(&log);
        assert!(
            holes.is_empty(),
            "{name}'s console log has holes: {holes:?}"
        );
    }

    // 3. Streams: every byte from creation on, still in the log, delivered.
    let mut streamed = 0u64;
    let mut stream_count = 0;
    for (name, e) in &expected {
        for (id, created) in &e.streams {
            stream_count += 1;
            let (_, base, len) = read_log(&world.log_path(name));
            let end = base + len;
            let t = Instant::now();
            loop {
                let (log, base, _) = read_log(&world.log_path(name));
                let from = (*created).max(base);
                let msgs = world.received.lock().unwrap()[id].clone();
                let holes = uncovered(&log, base, &msgs, from, end);
                if holes.is_empty() {
                    streamed += end - from;
                    break;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(60),
                    "stream {id} of {name} (created at {created}, log {base}..{end}) misses {holes:?}"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }

    let wrong = world.wrong.lock().unwrap().clone();
    assert!(wrong.is_empty(), "wrong answers:\n{}", wrong.join("\n"));

    // 4. Delete everything: nothing may be left.
    for name in &present {
        world
            .call("Delete", || world.stub.delete(name))
            .await
            .unwrap_or_else(|m| panic!("final Delete({name}): {m}"));
    }
    assert!(world.stub.list().await.unwrap().is_empty());
    vmd_tests::stack::assert_nothing_left(&world.zinit, &world.runtime, &world.root).await;
    let vmd_stderr = world.vmd.lock().unwrap().stderr();
    assert!(!vmd_stderr.contains("panicked"), "vmd panicked");

    drop(done);
    chaos.join().expect("the chaos loop panicked");
    let c = &world.counters;
    eprintln!(
        "soak passed: {} s of faults (seed {seed}); converged {:.1} s after the faults stopped \
         ({:.1} s to the first check); {} VMs at the end with {} KiB of console checked for holes; \
         {stream_count} live streams, {} KiB checked byte for byte (and {} streams, {} KiB, checked \
         before they were deleted under faults); {} calls, {} lost replies (vmd killed), \
         {} calls lost with Redis restarts, \
         {} Runs refused (VMM killed while booting), {} locks deferred",
        duration.as_secs(),
        converged_in.as_secs_f64(),
        (converge - faults_over).as_secs_f64(),
        present.len(),
        log_bytes >> 10,
        streamed >> 10,
        get(&c.streams_verified),
        get(&c.bytes_verified) >> 10,
        get(&c.ops),
        get(&c.lost_replies),
        get(&c.lost_to_redis),
        get(&c.run_refused),
        get(&c.lock_deferred),
    );
}

fn report(world: &World, elapsed: Duration) {
    let c = &world.counters;
    eprintln!(
        "soak {:>5} s: {} calls ({} lost replies, {} lost with Redis); killed vmd {}, shims {}, VMMs {}, stream workers {}; Redis restarted {}",
        elapsed.as_secs(),
        get(&c.ops),
        get(&c.lost_replies),
        get(&c.lost_to_redis),
        get(&c.kill_vmd),
        get(&c.kill_shim),
        get(&c.kill_vmm),
        get(&c.kill_worker),
        get(&c.redis_restarts),
    );
}

// The checkers themselves: they must see what they are there to see.

fn lines(boot: u64, seqs: std::ops::Range<u64>) -> Vec<u8> {
    let mut out = Vec::new();
    for seq in seqs {
        out.extend(format!("FLOOD {seq:012} b{boot:07} {}\n", "x".repeat(35)).bytes());
    }
    out
}

#[test]
fn the_hole_checker_sees_a_missing_line_and_accepts_cut_boots() {
    let mut log = lines(7, 5..50);
    log.extend(b"FLOOD 000000000050 b00");
    log.extend(b"GUEST-HELLO\n");
    log.extend(lines(8, 1..30));
    assert!(holes_in(&log).is_empty());
    let mut holed = lines(7, 1..10);
    holed.extend(lines(7, 11..20));
    assert_eq!(holes_in(&holed), ["boot 7: 9 then 11"]);
}

#[test]
fn the_stream_checker_places_messages_and_finds_gaps() {
    let log = lines(3, 1..200);
    let base = 1_000_000;
    let end = base + log.len() as u64;
    let chunks: Vec<Vec<u8>> = log.chunks(1000).map(<[u8]>::to_vec).collect();
    // In order, split anywhere: covered.
    assert!(uncovered(&log, base, &chunks, base, end).is_empty());
    // A worker restart resends from an earlier point: still covered.
    let mut resent = chunks[..5].to_vec();
    resent.extend(chunks[3..].iter().cloned());
    assert!(uncovered(&log, base, &resent, base, end).is_empty());
    // A lost chunk is a hole exactly where it was.
    let mut lost = chunks.clone();
    lost.remove(4);
    assert_eq!(
        uncovered(&log, base, &lost, base, end),
        [(base + 4000, base + 5000)]
    );
    // A corrupted chunk covers nothing.
    let mut bad = chunks.clone();
    bad[2][100] ^= 1;
    assert_eq!(
        uncovered(&log, base, &bad, base, end),
        [(base + 2000, base + 3000)]
    );
    // A message straddling the start of a rotated log counts for its part
    // inside it.
    let cut = 2500;
    let rotated = &log[cut..];
    assert!(uncovered(rotated, base + cut as u64, &chunks, base + cut as u64, end).is_empty());
    let mut without = chunks.clone();
    without.remove(2);
    assert_eq!(
        uncovered(rotated, base + cut as u64, &without, base + cut as u64, end),
        [(base + cut as u64, base + 3000)]
    );
    // A first message with no numbered line is found by its bytes.
    let mut boot = b"GUEST-HELLO kernel=x\nGUEST-READY\n".to_vec();
    boot.extend(&log);
    let first = boot[..40].to_vec();
    let rest = boot[40..].to_vec();
    assert!(uncovered(&boot, 0, &[first, rest.clone()], 0, boot.len() as u64).is_empty());
    assert_eq!(
        uncovered(&boot, 0, &[rest], 0, boot.len() as u64),
        [(0, 40)]
    );
    // Bytes before the stream's start are not required.
    assert!(uncovered(&log, base, &chunks[6..], base + 6000, end).is_empty());
    assert!(!uncovered(&log, base, &chunks[6..], base + 5999, end).is_empty());
}
