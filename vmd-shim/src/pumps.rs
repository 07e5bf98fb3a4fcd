//! What a running VMM produces, moved to where it belongs: its log lines to
//! the console log and stderr, its events to the exit judgement, its serial
//! output (stdout, see [`crate::serial`]) to the console log
//! (and the terminals attached to it, [`crate::console`]).

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};

use vmd_runtime::vmm::VmState;

use crate::console::{lock, Console};
use crate::shared::Shared;

/// The VMM's stdout or stderr.
pub type Pipe = Box<dyn AsyncRead + Unpin + Send>;

fn append(log: &Mutex<Console>, bytes: &[u8]) {
    lock(log).write(bytes);
}

/// The VMM's own output: into the console log and to our stderr. A vCPU
/// error is remembered: the VMM then exits 0 although the guest died.
pub async fn vmm_lines(pipe: Pipe, log: Arc<Mutex<Console>>, vcpu_error: Arc<AtomicBool>) {
    let mut lines = BufReader::new(pipe).split(b'\n');
    while let Ok(Some(mut line)) = lines.next_segment().await {
        if line.windows(20).any(|w| w == b"VCPU generated error") {
            vcpu_error.store(true, Ordering::SeqCst);
        }
        line.push(b'\n');
        append(&log, &line);
        let _ = std::io::stderr().lock().write_all(&line);
    }
}

/// What the VMM's event monitor said that the shim acts on.
pub struct Events {
    /// The guest shut down (its own power-off: a clean exit follows).
    pub shutdown: AtomicBool,
    /// Where the guest's state goes: booted, paused, resumed.
    pub shared: Shared,
}

/// The event monitor: a stream of JSON objects (`{"source":"vm",
/// "event":"booted",…}`). The VM's state is recorded as it changes, so vmd
/// reads it from `state.json` instead of asking the VMM.
pub async fn events(fd: std::os::fd::OwnedFd, events: Arc<Events>) {
    let Ok(mut rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
        return;
    };
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = match rx.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut consumed = 0;
        let mut stream =
            serde_json::Deserializer::from_slice(&buf).into_iter::<serde_json::Value>();
        while let Some(Ok(ev)) = stream.next() {
            consumed = stream.byte_offset();
            if ev["source"] != "vm" {
                continue;
            }
            let now = match ev["event"].as_str() {
                Some("shutdown") => {
                    events.shutdown.store(true, Ordering::SeqCst);
                    continue;
                }
                Some("booted") | Some("resumed") => VmState::Running,
                Some("paused") => VmState::Paused,
                _ => continue,
            };
            events.shared.set_vm(now);
        }
        buf.drain(..consumed);
        if buf.len() > 1 << 20 {
            buf.clear();
        }
    }
}

/// Serial output: the VMM's stdout, appended as it comes, to the end (a
/// pipe keeps what the VMM wrote before it exited).
pub async fn serial(mut out: Pipe, log: Arc<Mutex<Console>>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match out.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => append(&log, &buf[..n]),
        }
    }
}

/// Waits up to 2 s for `tasks` to end (what is left of a dead VMM's output).
pub async fn drain(tasks: &mut Vec<tokio::task::JoinHandle<()>>) {
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        for t in tasks.drain(..) {
            let _ = t.await;
        }
    })
    .await;
}
