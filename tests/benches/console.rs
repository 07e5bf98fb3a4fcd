//! The console path, with the cloud-hypervisor double (its shell echoes each
//! key): `cargo build --release --workspace --bins && cargo bench -p
//! vmd-tests --bench console` (as root: the web console lives in a network
//! namespace the bench makes).
//!
//! * keystroke → echo round trip through the web console (a WebSocket
//!   client in the namespace) and through `vmd ctl console` (in a pty),
//!   against the double's own echo with its serial port on a pty and a pipe
//!   by hand (the floor: what vmd adds is the difference);
//! * console output to 1 and 16 web clients while the guest prints as fast
//!   as it can, against the same flood with no client: the log's rate, each
//!   client's, and whether the log is complete;
//! * memory of the console path per VM: `vmd-console`'s private memory,
//!   and what attached clients add to the shim's.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use vmd_runtime::state::ShimState;
use vmd_runtime::RunDir;
use vmd_tests::vm::{ch_binary, real_ch, settled_memory_kib};
use vmd_tests::web::{console_server, Web};
use vmd_tests::{ms, pct};

const KEYS: usize = 300;

fn main() {
    vmd_tests::bench_main(bench());
}

fn raw(fd: std::os::fd::BorrowedFd<'_>) {
    let mut t = nix::sys::termios::tcgetattr(fd).unwrap();
    nix::sys::termios::cfmakeraw(&mut t);
    nix::sys::termios::tcsetattr(fd, nix::sys::termios::SetArg::TCSANOW, &t).unwrap();
}

/// The floor: the double started by hand, a key written into its serial
/// input (a pty, as the shim gives it) until its echo on its stdout.
fn by_hand() -> Vec<Duration> {
    let pty = nix::pty::openpty(None, None).unwrap();
    raw(pty.slave.as_fd());
    let api = tempfile::tempdir().unwrap();
    let kernel = api.path().join("vmlinux");
    std::fs::write(&kernel, "not a kernel").unwrap();
    let mut child = Command::new(ch_binary())
        .args(["--kernel"])
        .arg(&kernel)
        .args([
            "--cmdline",
            "console=ttyS0 gaction=shell double.boot_ms=0",
            "--cpus",
            "boot=1",
            "--memory",
            "size=256M",
            "--serial",
            "tty",
            "--console",
            "off",
            "--api-socket",
        ])
        .arg(format!("path={}", api.path().join("api.sock").display()))
        .stdin(std::fs::File::from(pty.slave))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut master = std::fs::File::from(pty.master);
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.ends_with(b"/ # ") {
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0, "the double exited");
        seen.extend_from_slice(&buf[..n]);
    }
    let mut v = Vec::new();
    for _ in 0..KEYS {
        let t0 = Instant::now();
        master.write_all(b"a").unwrap();
        let n = out.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"a");
        v.push(t0.elapsed());
    }
    let _ = child.kill();
    let _ = child.wait();
    v
}

/// Through `vmd ctl console` in a pty: a key in, its echo out.
fn via_ctl(runtime: &std::path::Path, name: &str) -> Vec<Duration> {
    let pty = nix::pty::openpty(None, None).unwrap();
    let slave = std::fs::File::from(pty.slave);
    let mut child = Command::new(vmd_tests::bin("vmd"))
        .args(["ctl", "console", name, "--history", "0", "--runtime-dir"])
        .arg(runtime)
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave)
        .spawn()
        .unwrap();
    let mut master = std::fs::File::from(pty.master);
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("detaches]") {
        let n = master.read(&mut buf).unwrap();
        seen.extend_from_slice(&buf[..n]);
    }
    let mut v = Vec::new();
    for _ in 0..KEYS {
        let t0 = Instant::now();
        master.write_all(b"a").unwrap();
        let mut got = Vec::new();
        while !got.contains(&b'a') {
            let n = master.read(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        v.push(t0.elapsed());
    }
    master.write_all(&[0x1d]).unwrap();
    let _ = child.wait();
    v
}

/// Through the web console: a key in a frame, until a frame holds its echo.
async fn via_web(web: &Web, port: u16) -> Vec<Duration> {
    let mut c = web.ws(port).await;
    c.wait_shell_of_boot(1).await;
    let mut v = Vec::new();
    for _ in 0..KEYS {
        let t0 = Instant::now();
        c.ws.send(Message::Binary(b"a".to_vec().into()))
            .await
            .unwrap();
        loop {
            match c.ws.next().await {
                Some(Ok(Message::Binary(b))) if b.contains(&b'a') => break,
                Some(Ok(_)) => {}
                other => panic!("the web console closed: {other:?}"),
            }
        }
        v.push(t0.elapsed());
    }
    v
}

/// The port of a `ConsoleURL` (`10.20.2.1:20005`).
fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a console URL")
}

fn row(what: &str, v: &[Duration], floor: &[Duration]) {
    println!(
        "| {what} | {} | {} | {} | {:.2}× | ≤ 2 ms |",
        ms(pct(v, 50)),
        ms(pct(v, 99)),
        ms(pct(floor, 50)),
        pct(v, 50).as_secs_f64() / pct(floor, 50).as_secs_f64()
    );
}

/// A flood of `bytes` at `bps` (0: as fast as the double prints), with `clients` web
/// clients reading: (log MB/s, slowest client MB/s, clients cut, log
/// complete).
async fn flood(
    web: &Web,
    name: &str,
    octet: u8,
    clients: usize,
    bytes: u64,
    bps: u64,
) -> (f64, f64, usize, bool) {
    let mut vm = web.vm(name, octet);
    for (k, v) in [
        ("gaction", "wait"),
        ("double.boot_ms", "2000"),
        ("double.flood_bps", &bps.to_string()),
        ("double.flood_bytes", &bytes.to_string()),
    ] {
        vm.kernel_args.insert(k.into(), v.into());
    }
    let info = web.env.stub.run(&vm).await.unwrap();
    let port = port_of(&info.console_url);
    let mut readers = Vec::new();
    for _ in 0..clients {
        let c = web.ws(port).await;
        readers.push(tokio::spawn(async move {
            let mut c = c;
            let (mut got, mut first, mut last) = (0u64, None, Instant::now());
            while let Ok(Some(Ok(m))) =
                tokio::time::timeout(Duration::from_secs(5), c.ws.next()).await
            {
                got += m.len() as u64;
                // From the flood's start (past the short history).
                if got > 4096 && first.is_none() {
                    first = Some(Instant::now());
                }
                last = Instant::now();
                if got >= bytes {
                    break;
                }
            }
            (got, first.map(|f| last.duration_since(f)))
        }));
    }
    let log = web.env.log(name);
    let t0 = Instant::now();
    let mut start = None;
    let took = loop {
        let (_, end) = vmd_runtime::console::extent(&log).unwrap_or_default();
        let text_len = end;
        if start.is_none() && text_len > 4096 {
            start = Some(Instant::now());
        }
        let done = std::fs::read(&log)
            .map(|t| {
                let s = String::from_utf8_lossy(&t[t.len().saturating_sub(200)..]).into_owned();
                s.contains("FLOOD") && end >= bytes
            })
            .unwrap_or(false);
        if done {
            break start.map_or(t0.elapsed(), |s| s.elapsed());
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the flood did not end"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let log_rate = bytes as f64 / took.as_secs_f64() / 1e6;
    let (mut slowest, mut cut) = (f64::MAX, 0);
    for r in readers {
        let (got, span) = r.await.unwrap();
        if got < bytes {
            cut += 1;
        } else if let Some(span) = span {
            slowest = slowest.min(got as f64 / span.as_secs_f64().max(1e-6) / 1e6);
        }
    }
    // Complete: every FLOOD sequence number once, in order, in what the
    // log still holds (rotation keeps its tail).
    let text = String::from_utf8_lossy(&std::fs::read(&log).unwrap()).into_owned();
    let seqs: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("FLOOD "))
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect();
    let complete = seqs.windows(2).all(|w| w[1] == w[0] + 1);
    web.env.stub.delete(name).await.unwrap();
    (
        log_rate,
        if slowest == f64::MAX { 0.0 } else { slowest },
        cut,
        complete,
    )
}

async fn bench() {
    if real_ch() {
        println!("Skipped: the console benchmark needs the double's shell and flood.");
        return;
    }
    let web = match Web::start(Some("10.20.2.1/24")).await {
        Ok(w) => w,
        Err(why) => {
            println!("Skipped: {why} (the web console lives in a network namespace).");
            return;
        }
    };
    let floor = by_hand();
    let info = web.env.stub.run(&web.vm("echo", 5)).await.unwrap();
    let port = port_of(&info.console_url);
    let web_rt = via_web(&web, port).await;
    let runtime = web.env.vmd.runtime();
    let ctl = tokio::task::spawn_blocking(move || via_ctl(&runtime, "echo"))
        .await
        .unwrap();

    println!("Keystroke → echo, {KEYS} keys each, the double's shell answering:");
    println!();
    println!("| path | p50 | p99 | by hand, p50 (baseline) | ratio | goal (p50) |");
    println!("|---|---|---|---|---|---|");
    row("web console (WebSocket in the namespace)", &web_rt, &floor);
    row("`vmd ctl console` (pty)", &ctl, &floor);
    println!();
    println!(
        "By hand: the double with its serial input on a raw pty and its output on a pipe, \
         one key written and its echo read. vmd adds the shim's console socket, its paced \
         keyboard, and vmd-console (web) or the ctl terminal."
    );
    println!();

    // Memory of the console path of one VM.
    let server = console_server("echo").expect("a vmd-console");
    let run = RunDir::new(web.env.run_dir("echo"));
    let shim = ShimState::load(&run.state())
        .unwrap()
        .unwrap_or_default()
        .shim_pid as i32;
    let (_, server_idle) = settled_memory_kib(server).await;
    let (_, shim_idle) = settled_memory_kib(shim).await;
    let mut clients = Vec::new();
    for _ in 0..16 {
        let mut c = web.ws(port).await;
        c.wait_shell_of_boot(1).await;
        clients.push(c);
    }
    let (_, server_16) = settled_memory_kib(server).await;
    let (_, shim_16) = settled_memory_kib(shim).await;
    drop(clients);
    println!("Memory of the console path of one VM (private dirty, KiB):");
    println!();
    println!("| process | idle | 16 web clients attached | goal |");
    println!("|---|---|---|---|");
    println!("| vmd-console | {server_idle} | {server_16} | ≤ 1024 |");
    println!("| vmd-shim (the whole shim, for scale) | {shim_idle} | {shim_16} | |");
    println!();
    web.env.stub.delete("echo").await.unwrap();

    // Output to web clients during a flood.
    let bytes = 32u64 << 20;
    println!("Console output to web clients, 32 MiB printed by the guest:");
    println!();
    println!("| guest prints at | web clients | log MB/s | slowest client MB/s | clients cut | log complete |");
    println!("|---|---|---|---|---|---|");
    let mut octet = 10;
    for (bps, label) in [(0u64, "its fastest"), (10_000_000, "10 MB/s")] {
        for n in [0usize, 1, 16] {
            octet += 1;
            let (log, client, cut, complete) =
                flood(&web, &format!("flood{octet}"), octet, n, bytes, bps).await;
            let client = if n == 0 || cut == n {
                "—".to_owned()
            } else {
                format!("{client:.1}")
            };
            println!(
                "| {label} | {n} | {log:.1} | {client} | {cut} | {} |",
                if complete { "yes" } else { "NO" }
            );
        }
    }
    println!();
    println!(
        "0 clients is the baseline: the shim writing the log alone. A client that cannot keep \
         up is cut (the page reconnects and replays the history); the log never waits for one. \
         A serial line at 115200 baud carries 0.0115 MB/s."
    );
}
