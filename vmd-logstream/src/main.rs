//! `vmd-logstream --log <console log> --output <url> [--namespace <netns>]
//! --state <file>`: ships a VM's console to one receiver, as zinit service
//! `stream:<id>`. Lifecycle lines on stdout (zinit's ring).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use vmd_logstream::follow::{Follower, Start};
use vmd_logstream::output::Output;
use vmd_logstream::progress::Progress;
use vmd_logstream::sink::{tls_config, Sink};

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
    /// redis://[user][:pass@]host[:port]/<channel>, ws://…, wss://…, console://
    #[arg(long)]
    output: Output,
    /// Network namespace to send from (a name under --netns-dir).
    #[arg(long)]
    namespace: Option<String>,
    #[arg(long, default_value = "/var/run/netns")]
    netns_dir: PathBuf,
    /// Progress file: the worker resumes where it left off.
    #[arg(long)]
    state: PathBuf,
    /// On a first start, begin with this many bytes of the existing log.
    #[arg(long, default_value_t = 8192)]
    tail: u64,
    #[arg(long, value_enum, default_value = "gzip")]
    compression: Compression,
    /// Console bytes held in memory while the receiver is slow or away.
    #[arg(long, default_value_t = 4 << 20)]
    buffer_bytes: usize,
    /// Extra CA certificates (PEM) for wss, besides the system's.
    #[arg(long)]
    ca_file: Option<PathBuf>,
}

fn say(msg: impl AsRef<str>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", msg.as_ref());
    let _ = out.flush();
}

/// Enters the named network namespace. Before any thread exists: setns
/// applies to the calling thread, and threads created later inherit it.
fn enter_netns(dir: &std::path::Path, name: &str) -> Result<(), String> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(format!("invalid network namespace name {name:?}"));
    }
    let path = dir.join(name);
    let f = std::fs::File::open(&path)
        .map_err(|e| format!("network namespace {}: {e}", path.display()))?;
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("cannot enter network namespace {name}: {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(ns) = cli.namespace.as_deref().filter(|n| !n.is_empty()) {
        if let Err(e) = enter_netns(&cli.netns_dir, ns) {
            say(e);
            return ExitCode::FAILURE;
        }
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            say(format!("cannot start: {e}"));
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run(cli))
}

async fn run(cli: Cli) -> ExitCode {
    // The system's roots cost memory: only wss needs them.
    let tls = match &cli.output {
        Output::WebSocket { tls: true, .. } => match tls_config(cli.ca_file.as_deref()) {
            Ok(t) => Some(t),
            Err(e) => {
                say(format!("cannot set up TLS: {e}"));
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    let mut progress = Progress::load(&cli.state);
    let start = match &progress {
        Some(p) => Start::At(p.pos),
        None => Start::Tail(cli.tail),
    };
    let mut progress = progress.take().unwrap_or_default();
    let mut follower = loop {
        match Follower::open(&cli.log, start) {
            Ok(f) => break f,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    say(format!(
        "streaming {} to {} from offset {}",
        cli.log.display(),
        cli.output,
        follower.position()
    ));
    // Where a first start begins is recorded before anything is sent: a
    // worker killed before its first periodic save resumes there, instead of
    // at a later tail with a gap in between.
    progress.pos = follower.position();
    let _ = progress.save(&cli.state);
    let mut queue: VecDeque<(u64, usize, Vec<u8>)> = VecDeque::new();
    let mut queued = 0usize;
    let mut buf = vec![0u8; 8192];
    let mut sink: Option<Sink> = None;
    let mut backoff = Duration::from_millis(250);
    let mut retry_at = Instant::now();
    let mut reported_drop = follower.dropped;
    let mut last_save = Instant::now();
    let mut unheard = 0u64;
    let mut gzip = vmd_logstream::Gzip::default();
    loop {
        // Read what the bound allows; the rotated log is the buffer beyond it.
        while queued < cli.buffer_bytes {
            let n = match follower.read(&mut buf) {
                Ok(n) => n,
                Err(e) => {
                    say(format!("cannot read the console log: {e}"));
                    0
                }
            };
            if n == 0 {
                break;
            }
            let chunk = match cli.compression {
                Compression::Gzip => gzip.member(&buf[..n]),
                Compression::None => buf[..n].to_vec(),
            };
            queued += n;
            queue.push_back((follower.position(), n, chunk));
        }
        if follower.dropped > reported_drop {
            say(format!(
                "the console log rotated past the stream: {} bytes dropped ({} in all)",
                follower.dropped - reported_drop,
                follower.dropped
            ));
            reported_drop = follower.dropped;
            progress.dropped_bytes = follower.dropped;
        }
        if queue.is_empty() {
            if last_save.elapsed() > Duration::from_millis(500) {
                let _ = progress.save(&cli.state);
                last_save = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        if sink.is_none() {
            if Instant::now() < retry_at {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            match Sink::connect(&cli.output, tls.as_ref()).await {
                Ok(s) => {
                    say(format!("connected to {}", cli.output));
                    sink = Some(s);
                    backoff = Duration::from_millis(250);
                    progress.connected = true;
                }
                Err(e) => {
                    say(format!(
                        "cannot reach {}: {e}; retrying in {:?}",
                        cli.output, backoff
                    ));
                    progress.connected = false;
                    progress.last_error = Some(e);
                    let _ = progress.save(&cli.state);
                    retry_at = Instant::now() + backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            }
        }
        let Some(s) = sink.as_mut() else { continue };
        // Up to 32 chunks or 256 KiB on the wire per round trip.
        let mut batch = 0;
        let mut wire = 0;
        while batch < queue.len() && batch < 32 && wire < 256 << 10 {
            wire += queue[batch].2.len();
            batch += 1;
        }
        let chunks: Vec<&[u8]> = queue
            .iter()
            .take(batch)
            .map(|(_, _, c)| c.as_slice())
            .collect();
        match s.send(&chunks).await {
            Ok(heard) => {
                for h in heard {
                    let Some((end, raw, _)) = queue.pop_front() else {
                        break;
                    };
                    queued -= raw;
                    progress.pos = end;
                    progress.sent_bytes += raw as u64;
                    if h == Some(0) {
                        unheard += 1;
                        progress.unheard_bytes += raw as u64;
                        if unheard == 1 || unheard.is_power_of_two() {
                            say(format!(
                                "{unheard} chunks published with no subscriber listening"
                            ));
                        }
                    }
                }
                if last_save.elapsed() > Duration::from_millis(200) {
                    let _ = progress.save(&cli.state);
                    last_save = Instant::now();
                }
            }
            Err(e) => {
                say(format!("lost {}: {e}; reconnecting", cli.output));
                sink = None;
                progress.connected = false;
                progress.last_error = Some(e);
                let _ = progress.save(&cli.state);
                retry_at = Instant::now() + backoff;
            }
        }
    }
}
