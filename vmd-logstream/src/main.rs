//! `vmd-logstream --log <console log> (--output <url> | --output-from <record>)
//! [--namespace <netns>] --state <file>`: ships a VM's console to one
//! receiver (Redis, WebSocket, Loki), as zinit service `stream:<id>`. Lifecycle lines on stdout
//! (zinit's ring), the receiver shown without credentials.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use vmd_logstream::follow::{Follower, Start};
use vmd_logstream::loki::{Cut, Framed, Framer, InFlight, PushError, Pushing};
use vmd_logstream::sink::{tls_config, Sink, SinkError};
use vmd_runtime::output::Output;
use vmd_runtime::process::{current_thread_runtime, say};
use vmd_runtime::progress::Progress;

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Compression {
    Gzip,
    None,
}

#[derive(Parser)]
#[command(
    name = "vmd-logstream",
    about = "Ships a VM's console log to a receiver"
)]
struct Cli {
    /// The VM's console log (written by vmd-shim).
    #[arg(long)]
    log: PathBuf,
    /// redis://[user][:pass@]host[:port]/<channel>, ws://…, wss://…,
    /// http(s)://[user:pass@]host[:port][/prefix][?tenant_id=…] (Loki), console://
    /// (visible to anyone who can list processes: see --output-from).
    #[arg(
        long,
        required_unless_present = "output_from",
        conflicts_with = "output_from"
    )]
    output: Option<Output>,
    /// A JSON file whose `output` field is the receiver: what vmd passes, so
    /// that credentials in the URL appear on no command line.
    #[arg(long)]
    output_from: Option<PathBuf>,
    /// Network namespace to send from (a name under --netns-dir).
    #[arg(long)]
    namespace: Option<String>,
    #[arg(long, default_value = "/var/run/netns")]
    netns_dir: PathBuf,
    /// Progress file: the worker resumes where it left off. A Loki stream
    /// also keeps its pushes under way beside it (`<state>` with the
    /// extension `inflight`).
    #[arg(long)]
    state: PathBuf,
    /// On a first start, begin with this many bytes of the existing log.
    #[arg(long, default_value_t = 8192)]
    tail: u64,
    /// Of each chunk sent to Redis and WebSocket receivers. A Loki push is
    /// always Loki's own snappy-compressed protobuf.
    #[arg(long, value_enum, default_value = "gzip")]
    compression: Compression,
    /// Console bytes held in memory while the receiver is slow or away.
    #[arg(long, default_value_t = 4 << 20)]
    buffer_bytes: usize,
    /// Extra CA certificates (PEM) for wss and https, besides the system's.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Once set up, go on as this uid, in the console log's group alone
    /// (its VM's), without capabilities.
    #[arg(long)]
    user: Option<u32>,
    /// The log's path as given, for messages (`log` may be reached through
    /// an open directory).
    #[arg(skip)]
    shown_log: Option<PathBuf>,
}

/// Enters the named network namespace. Before any thread exists: setns
/// applies to the calling thread, and threads created later inherit it.
fn enter_netns(dir: &std::path::Path, name: &str) -> Result<(), NetnsError> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(NetnsError::InvalidName(name.to_owned()));
    }
    let path = dir.join(name);
    let f = std::fs::File::open(&path).map_err(|source| NetnsError::Open { path, source })?;
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
        name: name.to_owned(),
        source,
    })
}

/// Why the worker could not enter its VM's network namespace.
#[derive(Debug, thiserror::Error)]
enum NetnsError {
    #[error("invalid network namespace name {0:?}")]
    InvalidName(String),
    #[error("network namespace {}: {source}", .path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {name}: {source}")]
    Enter { name: String, source: nix::Error },
}

/// What `--output-from` reads (vmd's stream record; other fields ignored).
#[derive(serde::Deserialize)]
struct Record {
    output: String,
}

#[derive(Debug, thiserror::Error)]
enum OutputFromError {
    #[error("cannot read the stream record {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the stream record {path} is not one: {source}")]
    Decode {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("the stream record {path}: {source}")]
    Output {
        path: PathBuf,
        source: vmd_runtime::output::OutputError,
    },
}

fn output_from(path: &std::path::Path) -> Result<Output, OutputFromError> {
    let text = std::fs::read(path).map_err(|source| OutputFromError::Read {
        path: path.to_owned(),
        source,
    })?;
    let r: Record = serde_json::from_slice(&text).map_err(|source| OutputFromError::Decode {
        path: path.to_owned(),
        source,
    })?;
    r.output.parse().map_err(|source| OutputFromError::Output {
        path: path.to_owned(),
        source,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let output = match (&cli.output, &cli.output_from) {
        (Some(o), _) => o.clone(),
        (None, Some(path)) => match output_from(path) {
            Ok(o) => o,
            Err(e) => {
                say(e.to_string());
                return ExitCode::FAILURE;
            }
        },
        // clap requires one of the two.
        (None, None) => {
            say("no --output or --output-from");
            return ExitCode::FAILURE;
        }
    };
    if let Some(ns) = cli.namespace.as_deref().filter(|n| !n.is_empty()) {
        if let Err(e) = enter_netns(&cli.netns_dir, ns) {
            say(e.to_string());
            return ExitCode::FAILURE;
        }
    }
    // The system's roots cost memory: only wss and https need them. Read
    // while the worker may still read any CA file.
    let wants_tls = match &output {
        Output::WebSocket { tls, .. } => *tls,
        Output::Loki(l) => l.tls,
        _ => false,
    };
    let tls = match wants_tls {
        true => match tls_config(cli.ca_file.as_deref()) {
            Ok(t) => Some(t),
            Err(e) => {
                say(format!("cannot set up TLS: {e}"));
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    let mut cli = cli;
    let dirs = match cli.user {
        Some(uid) => match drop_root(&mut cli, uid) {
            Ok(d) => d,
            Err(e) => {
                say(e.to_string());
                return ExitCode::FAILURE;
            }
        },
        None => Vec::new(),
    };
    match current_thread_runtime() {
        Ok(rt) => rt.block_on(run(cli, output, tls, dirs)),
        Err(e) => {
            say(e.to_string());
            ExitCode::FAILURE
        }
    }
}

/// Becomes `uid` in the console log's group, its log and progress file
/// reached through their directories opened before. Waits for the log (a
/// stream may be made before its VM first starts). A log still in root's
/// group (a VM whose shim gives it no user: not root, or older) keeps the
/// worker as it is, which it says.
fn drop_root(
    cli: &mut Cli,
    uid: u32,
) -> Result<Vec<std::fs::File>, vmd_logstream::user::UserError> {
    use std::os::unix::fs::MetadataExt;
    let mut waited = false;
    let gid = loop {
        match std::fs::metadata(&cli.log) {
            Ok(m) => break m.gid(),
            Err(_) => {
                if !waited {
                    say(format!("waiting for the console log {}", cli.log.display()));
                    waited = true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    if gid == 0 {
        say(format!(
            "the console log {} is in root's group (no user of its VM's): staying as started",
            cli.log.display()
        ));
        return Ok(Vec::new());
    }
    let (log_dir, log) = vmd_logstream::user::through_open_dir(&cli.log)?;
    let (state_dir, state) = vmd_logstream::user::through_open_dir(&cli.state)?;
    vmd_logstream::user::become_user(uid, gid)?;
    say(format!(
        "running as uid {uid}, group {gid}, no capabilities"
    ));
    cli.shown_log = Some(std::mem::replace(&mut cli.log, log));
    cli.state = state;
    Ok(vec![log_dir, state_dir])
}

async fn run(
    cli: Cli,
    output: Output,
    tls: Option<Arc<rustls::ClientConfig>>,
    _dirs: Vec<std::fs::File>,
) -> ExitCode {
    let saved = Progress::load(&cli.state);
    // A Loki stream's push under way, to be made again identically.
    let inflight = match &output {
        Output::Loki(_) => match InFlight::open(&cli.state.with_extension("inflight")) {
            Ok(f) => Some(f),
            Err(e) => {
                say(format!(
                    "cannot open the in-flight file beside {}: {e}",
                    cli.state.display()
                ));
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    // A stream made anew has no progress yet: nothing recorded is its own.
    let pushing = inflight
        .as_ref()
        .filter(|_| saved.is_some())
        .and_then(InFlight::load)
        .unwrap_or_default();
    let start = match &saved {
        // Everything before the push under way was acknowledged.
        Some(p) => Start::At(p.pos.max(pushing.start)),
        None => Start::Tail(cli.tail),
    };
    let mut said = false;
    let follower = loop {
        match Follower::open(&cli.log, start) {
            Ok(f) => break f,
            Err(e) => {
                // Once: a log that is not there yet is the usual case.
                if !said {
                    say(format!("waiting for the console log: {e}"));
                    said = true;
                }
                tokio::time::sleep(Duration::from_millis(200)).await
            }
        }
    };
    say(format!(
        "streaming {} to {} from offset {}",
        cli.shown_log.as_ref().unwrap_or(&cli.log).display(),
        output,
        follower.position()
    ));
    let framer = inflight
        .is_some()
        .then(|| Framer::new(follower.position(), pushing.cuts));
    let mut worker = Worker {
        framer,
        inflight,
        prepared: None,
        compressor: Default::default(),
        progress: saved.unwrap_or_default(),
        reported_drop: follower.dropped,
        follower,
        tls,
        output,
        queue: VecDeque::new(),
        queued: 0,
        gzip: vmd_logstream::Gzip::default(),
        sink: None,
        backoff: FIRST_BACKOFF,
        retry_at: Instant::now(),
        last_save: Instant::now(),
        unheard: 0,
        cli,
    };
    // Where a first start begins is recorded before anything is sent: a
    // worker killed before its first periodic save resumes there, instead of
    // at a later tail with a gap in between.
    worker.progress.pos = worker.follower.position();
    worker.save();
    worker.run().await
}

const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const IDLE_POLL: Duration = Duration::from_millis(20);
/// [`Worker::bound`] of a Loki stream.
const LOKI_BUFFER: usize = 1 << 20;
/// A batch: chunks and bytes sent in one round trip.
const BATCH_CHUNKS: usize = 32;
const BATCH_WIRE: usize = 256 << 10;

/// A chunk read but not yet heard by the receiver.
struct Chunk {
    /// Absolute offset just past its last byte.
    end: u64,
    /// Loki: its first entry's timestamp (recorded before a push).
    ts: u64,
    /// Console bytes in it (before compression).
    raw: usize,
    wire: Vec<u8>,
}

/// One stream: the console log it follows, the chunks in flight, the link
/// to the receiver and the progress it reports.
struct Worker {
    cli: Cli,
    output: Output,
    tls: Option<Arc<rustls::ClientConfig>>,
    follower: Follower,
    /// Loki: the console cut into lines, and the pushes under way.
    framer: Option<Framer>,
    inflight: Option<InFlight>,
    /// Loki: the next push's body, made while the previous one was out:
    /// for the first `n` chunks of the queue, the last ending at `end`.
    prepared: Option<(usize, u64, Vec<u8>)>,
    /// Loki: makes every push's body (one set of buffers).
    compressor: vmd_logstream::loki::Compressor,
    progress: Progress,
    /// Read, not yet sent; at most `--buffer-bytes` of console bytes: the
    /// rotated log is the buffer beyond that.
    queue: VecDeque<Chunk>,
    queued: usize,
    gzip: vmd_logstream::Gzip,
    sink: Option<Sink>,
    backoff: Duration,
    retry_at: Instant,
    reported_drop: u64,
    last_save: Instant,
    unheard: u64,
}

impl Worker {
    async fn run(mut self) -> ExitCode {
        // A chunk per read. For Loki too: small steps keep reading and
        // the receiver's work overlapped (64 KiB reads measured slower).
        let mut buf = vec![0u8; 8192];
        loop {
            self.fill(&mut buf);
            self.note_drops();
            if self.queue.is_empty() {
                self.save_if_older(Duration::from_millis(500));
                tokio::time::sleep(IDLE_POLL).await;
                continue;
            }
            if self.connected().await {
                self.send_batch(&mut buf).await;
            }
        }
    }

    /// Console bytes held at most. A Loki chunk stays uncompressed until
    /// its push (its entries are joined then): a smaller bound keeps its
    /// memory near the others'.
    fn bound(&self) -> usize {
        match self.framer {
            Some(_) => self.cli.buffer_bytes.min(LOKI_BUFFER),
            None => self.cli.buffer_bytes,
        }
    }

    /// Reads into the queue what one batch takes (more is read while the
    /// batch is on its way: the receiver works meanwhile).
    fn fill(&mut self, buf: &mut [u8]) {
        while self.queue.len() < BATCH_CHUNKS && self.queued < self.bound() && self.fill_step(buf) {
        }
        let mut framed = Vec::new();
        if let Some(framer) = self.framer.as_mut() {
            framer.flush_idle(&mut framed);
        }
        self.queue_framed(framed);
    }

    /// One read into the queue; whether there was anything to read.
    fn fill_step(&mut self, buf: &mut [u8]) -> bool {
        let n = match self.follower.read(buf) {
            Ok(n) => n,
            Err(e) => {
                say(format!("cannot read the console log: {e}"));
                0
            }
        };
        if let Some(framer) = self.framer.as_mut() {
            // After a rotation past unread bytes the position jumps: the
            // framer sees the hole.
            let at = self.follower.position() - n as u64;
            let mut framed = Vec::new();
            framer.push(at, &buf[..n], &mut framed);
            self.queue_framed(framed);
            return n > 0;
        }
        if n == 0 {
            return false;
        }
        let wire = match self.cli.compression {
            Compression::Gzip => self.gzip.member(&buf[..n]),
            Compression::None => buf[..n].to_vec(),
        };
        self.queued += n;
        self.queue.push_back(Chunk {
            end: self.follower.position(),
            ts: 0,
            raw: n,
            wire,
        });
        true
    }

    fn queue_framed(&mut self, framed: Vec<Framed>) {
        for Framed { cut, raw, entries } in framed {
            self.queued += raw;
            self.queue.push_back(Chunk {
                end: cut.end,
                ts: cut.ts,
                raw,
                wire: entries,
            });
        }
    }

    fn note_drops(&mut self) {
        let dropped = self.follower.dropped;
        if dropped > self.reported_drop {
            say(format!(
                "the console log rotated past the stream: {} bytes dropped ({dropped} in all)",
                dropped - self.reported_drop,
            ));
            self.reported_drop = dropped;
            self.progress.dropped_bytes = dropped;
        }
    }

    /// Whether a sink is there, connecting when the back-off allows.
    async fn connected(&mut self) -> bool {
        if self.sink.as_ref().is_some_and(Sink::is_closed) {
            // The receiver ended an idle connection: a new one, at once.
            self.sink = None;
            self.retry_at = Instant::now();
        }
        if self.sink.is_some() {
            return true;
        }
        if Instant::now() < self.retry_at {
            tokio::time::sleep(IDLE_POLL).await;
            return false;
        }
        match Sink::connect(&self.output, self.tls.as_ref()).await {
            Ok(s) => {
                say(format!("connected to {}", self.output));
                self.sink = Some(s);
                self.backoff = FIRST_BACKOFF;
                self.progress.connected = true;
                true
            }
            Err(e) => {
                say(format!(
                    "cannot reach {}: {e}; retrying in {:?}",
                    self.output, self.backoff
                ));
                self.lost(&e);
                self.backoff = (self.backoff * 2).min(Duration::from_secs(30));
                false
            }
        }
    }

    /// The receiver is unreachable: say why and retry after the back-off.
    fn lost(&mut self, e: &SinkError) {
        self.sink = None;
        self.progress.connected = false;
        self.progress.last_error = Some(e.to_string());
        self.save();
        self.retry_at = Instant::now() + self.backoff;
    }

    /// Sends up to 32 chunks or 256 KiB in one round trip, reading on
    /// while the receiver works on them.
    async fn send_batch(&mut self, buf: &mut [u8]) {
        let Some(mut sink) = self.sink.take() else {
            return;
        };
        // What was made ahead is for the queue's first chunks, still there.
        let (n, prepared) = match self.prepared.take() {
            Some((pn, end, data))
                if pn > 0 && self.queue.get(pn - 1).is_some_and(|c| c.end == end) =>
            {
                (pn, Some(data))
            }
            _ => (self.batch_len(), None),
        };
        // Loki's body is made here (with the worker's buffers), not by
        // the sink.
        let prepared = prepared.or_else(|| self.loki_body(n));
        // Out of the queue while it is sent, so that reading can go on;
        // still counted in `queued`, so the bound holds.
        let batch: Vec<Chunk> = self.queue.drain(..n).collect();
        if let Some(f) = self.inflight.as_mut() {
            // Recorded with where it starts: a worker killed from here on
            // pushes these same entries again, which Loki keeps once.
            let pushing = Pushing {
                start: self.progress.pos,
                cuts: batch
                    .iter()
                    .map(|c| Cut {
                        end: c.end,
                        ts: c.ts,
                    })
                    .collect(),
            };
            if let Err(e) = f.record(&pushing) {
                say(format!("cannot record the push under way: {e}"));
            }
        }
        let result = {
            let chunks: Vec<&[u8]> = batch.iter().map(|c| c.wire.as_slice()).collect();
            let send = sink.send(&chunks, prepared);
            tokio::pin!(send);
            loop {
                if self.queued >= self.bound() || !self.fill_step(buf) {
                    self.prepare_next();
                    break send.await;
                }
                if let std::task::Poll::Ready(r) = futures_util::poll!(&mut send) {
                    break r;
                }
                // Lets the connection's own task move the bytes.
                tokio::task::yield_now().await;
            }
        };
        match result {
            Ok(heard) => {
                self.sink = Some(sink);
                for (c, h) in batch.into_iter().zip(heard) {
                    self.sent(c, h == Some(0));
                }
                self.save_if_older(Duration::from_millis(200));
            }
            Err(SinkError::Loki(PushError::Rejected { status, message })) => {
                // Never to be taken: dropped, counted, said; the stream goes on.
                self.sink = Some(sink);
                let bytes: u64 = batch.iter().map(|c| c.raw as u64).sum();
                for c in batch {
                    self.sent(c, false);
                }
                self.progress.rejected_bytes += bytes;
                say(format!(
                    "{} rejected {bytes} console bytes ({status}: {message}); {} in all",
                    self.output, self.progress.rejected_bytes
                ));
                self.save();
            }
            Err(e) => {
                // Sent again, first, once the receiver is back (what was
                // made ahead was for the chunks after these).
                self.prepared = None;
                for c in batch.into_iter().rev() {
                    self.queue.push_front(c);
                }
                say(format!("lost {}: {e}; reconnecting", self.output));
                self.lost(&e);
            }
        }
    }

    /// How many chunks of the queue the next batch takes.
    fn batch_len(&self) -> usize {
        let mut n = 0;
        let mut wire = 0;
        while n < self.queue.len() && n < BATCH_CHUNKS && wire < BATCH_WIRE {
            wire += self.queue[n].wire.len();
            n += 1;
        }
        n
    }

    /// Loki: makes the next push's body now, while Loki works on the one
    /// out (the two overlap instead of taking turns).
    fn prepare_next(&mut self) {
        let n = self.batch_len();
        if self.prepared.is_some() || n == 0 {
            return;
        }
        if let Some(data) = self.loki_body(n) {
            self.prepared = Some((n, self.queue[n - 1].end, data));
        }
    }

    /// Loki: the push body of the queue's first `n` chunks, made with the
    /// worker's kept buffers (`None` for other outputs).
    fn loki_body(&mut self, n: usize) -> Option<Vec<u8>> {
        let Output::Loki(loki) = &self.output else {
            return None;
        };
        let chunks: Vec<&[u8]> = self
            .queue
            .iter()
            .take(n)
            .map(|c| c.wire.as_slice())
            .collect();
        self.compressor.compress(&loki.job, &chunks).ok()
    }

    /// A chunk was delivered (`unheard`: published to nobody).
    fn sent(&mut self, c: Chunk, unheard: bool) {
        self.queued -= c.raw;
        self.progress.pos = c.end;
        self.progress.sent_bytes += c.raw as u64;
        if unheard {
            self.unheard += 1;
            self.progress.unheard_bytes += c.raw as u64;
            if self.unheard == 1 || self.unheard.is_power_of_two() {
                say(format!(
                    "{} chunks published with no subscriber listening",
                    self.unheard
                ));
            }
        }
    }

    fn save(&mut self) {
        if let Err(e) = self.progress.save(&self.cli.state) {
            say(format!("cannot save {}: {e}", self.cli.state.display()));
        }
        self.last_save = Instant::now();
    }

    fn save_if_older(&mut self, age: Duration) {
        if self.last_save.elapsed() > age {
            self.save();
        }
    }
}
