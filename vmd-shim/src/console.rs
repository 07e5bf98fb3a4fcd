//! The serial console has one owner, the shim; this module shares it.
//!
//! * [`Console`] — the console log and the terminals attached to it. Every
//!   byte appended to the log is also queued for each attached terminal,
//!   under one lock, so a terminal that attaches gets the log up to a point
//!   and everything after it, exactly once. A terminal that falls
//!   [`MAX_QUEUED`] bytes behind is disconnected: the VM, the log and the
//!   other terminals never wait for it.
//! * [`Keyboard`] — input from every terminal, typed into the guest at the
//!   pace of a serial line (a guest reads its UART byte by byte; bytes
//!   pushed faster pile up in the VMM, and a slow guest loses them).
//! * [`listen`] — the console socket ([`vmd_runtime::attach`]).

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use vmd_runtime::attach::{self, Request};
use vmd_runtime::console::ConsoleLog;
use vmd_runtime::process::say;

/// Terminals attached at once (web clients and host consoles together).
pub const MAX_VIEWERS: usize = 80;
/// How far a terminal may fall behind before it is disconnected.
pub const MAX_QUEUED: usize = 256 << 10;
/// Input: a chunk read from one terminal at a time.
const INPUT_CHUNK: usize = 1024;
/// Input queued for the guest, in chunks, before terminals are not read.
const INPUT_QUEUE: usize = 16;
/// Input pace: a 115200-baud line (11 520 bytes/s), in bursts of one
/// 16550 FIFO, so a keystroke goes at once and a paste does not flood.
const INPUT_RATE: u64 = 11_520;
const INPUT_BURST: u64 = 16;

/// A terminal's queue of console output.
struct Viewer {
    tx: mpsc::UnboundedSender<Bytes>,
    queued: Arc<AtomicUsize>,
}

/// The console log and who watches it.
pub struct Console {
    log: ConsoleLog,
    viewers: Vec<Viewer>,
}

pub type SharedConsole = Arc<Mutex<Console>>;

/// What an attaching terminal gets: the past, then the live stream.
struct Attachment {
    from: u64,
    history: Vec<u8>,
    live: mpsc::UnboundedReceiver<Bytes>,
    queued: Arc<AtomicUsize>,
}

impl Console {
    pub fn new(log: ConsoleLog) -> SharedConsole {
        Arc::new(Mutex::new(Console {
            log,
            viewers: Vec::new(),
        }))
    }

    /// Takes in what another process appended to the log (the Go module's
    /// console process, while its VMM ran).
    pub fn resync(&mut self) -> std::io::Result<()> {
        self.log.resync()
    }

    /// Appends to the log and queues a copy for every terminal.
    pub fn write(&mut self, bytes: &[u8]) {
        if let Err(e) = self.log.write(bytes) {
            eprintln!("console log write failed: {e}");
        }
        if self.viewers.is_empty() {
            return;
        }
        let chunk = Bytes::copy_from_slice(bytes);
        self.viewers.retain(|v| {
            let queued = v.queued.fetch_add(chunk.len(), Ordering::SeqCst) + chunk.len();
            // Dropping the sender ends the terminal's stream: it is
            // disconnected, and can attach again from where it was.
            queued <= MAX_QUEUED && v.tx.send(chunk.clone()).is_ok()
        });
    }

    pub fn tail(&self, n: u64) -> String {
        self.log.tail(n)
    }

    pub fn viewers(&self) -> usize {
        self.viewers.len()
    }

    fn attach(&mut self, req: Request) -> Result<Attachment, Refusal> {
        self.viewers.retain(|v| !v.tx.is_closed());
        if self.viewers.len() >= MAX_VIEWERS {
            return Err(Refusal::Full);
        }
        let (from, history) = self
            .log
            .read_from(req.start(self.log.end()))
            .map_err(Refusal::Log)?;
        let (tx, live) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        self.viewers.push(Viewer {
            tx,
            queued: Arc::clone(&queued),
        });
        Ok(Attachment {
            from,
            history,
            live,
            queued,
        })
    }
}

/// Why a terminal is not attached (the text is sent to it after `error: `).
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error(transparent)]
    Request(attach::RequestError),
    #[error("{MAX_VIEWERS} terminals are attached already")]
    Full,
    #[error("cannot read the console log: {0}")]
    Log(#[source] std::io::Error),
}

pub fn lock(c: &Mutex<Console>) -> std::sync::MutexGuard<'_, Console> {
    c.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The guest's keyboard: what terminals type, paced into the serial port of
/// whichever VMM runs now (nothing is kept for a VMM that does not run).
#[derive(Clone)]
pub struct Keyboard {
    keys: mpsc::Sender<Bytes>,
    port: Arc<watch::Sender<Option<Arc<AsyncFd<OwnedFd>>>>>,
}

/// While a VMM runs, its serial input is connected to the keyboard.
pub struct Plugged {
    port: Arc<watch::Sender<Option<Arc<AsyncFd<OwnedFd>>>>>,
}

impl Drop for Plugged {
    fn drop(&mut self) {
        self.port.send_replace(None);
    }
}

impl Keyboard {
    /// Starts the task that types into the port.
    pub fn start() -> Keyboard {
        let (keys, rx) = mpsc::channel(INPUT_QUEUE);
        let (port, port_rx) = watch::channel(None);
        tokio::spawn(type_keys(rx, port_rx));
        Keyboard {
            keys,
            port: Arc::new(port),
        }
    }

    /// Connects the shim's end of a VMM's serial input (a pty master) until
    /// the returned guard is dropped.
    pub fn plug(&self, master: OwnedFd) -> std::io::Result<Plugged> {
        nix::fcntl::fcntl(
            &master,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .map_err(std::io::Error::from)?;
        // SAFETY: the AsyncFd owns the descriptor; nothing else closes or
        // replaces it while it is registered.
        let fd = unsafe { AsyncFd::register_with_interest(master, tokio::io::Interest::WRITABLE)? };
        self.port.send_replace(Some(Arc::new(fd)));
        Ok(Plugged {
            port: Arc::clone(&self.port),
        })
    }
}

/// Types every chunk into the current port, no faster than the line rate.
async fn type_keys(
    mut keys: mpsc::Receiver<Bytes>,
    port: watch::Receiver<Option<Arc<AsyncFd<OwnedFd>>>>,
) {
    // A token bucket: `credit` bytes may go now; it refills at the rate.
    let mut credit = INPUT_BURST;
    let mut refilled = Instant::now();
    while let Some(mut chunk) = keys.recv().await {
        while !chunk.is_empty() {
            let now = Instant::now();
            let earned = now.duration_since(refilled).as_micros() as u64 * INPUT_RATE / 1_000_000;
            if earned > 0 {
                credit = (credit + earned).min(INPUT_BURST);
                refilled = now;
            }
            if credit == 0 {
                tokio::time::sleep(Duration::from_micros(1_000_000 / INPUT_RATE + 1)).await;
                continue;
            }
            let Some(fd) = port.borrow().clone() else {
                // No VMM: what was typed meanwhile reaches no one.
                break;
            };
            let n = chunk.len().min(credit as usize);
            match write_some(&fd, &chunk[..n]).await {
                Ok(w) => {
                    credit -= w as u64;
                    let _ = chunk.split_to(w);
                }
                // The VMM is gone (its end of the pty closed).
                Err(_) => break,
            }
        }
    }
}

async fn write_some(fd: &AsyncFd<OwnedFd>, bytes: &[u8]) -> std::io::Result<usize> {
    loop {
        let mut ready = fd.writable().await?;
        match ready.try_io(|f| nix::unistd::write(f.get_ref(), bytes).map_err(std::io::Error::from))
        {
            Ok(r) => return r,
            Err(_would_block) => continue,
        }
    }
}

/// Listens on the console socket (mode 0600, like the control socket).
pub fn listen(
    path: &std::path::Path,
    console: SharedConsole,
    keyboard: Keyboard,
) -> std::io::Result<()> {
    vmd_runtime::files::remove_file(path)?;
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(serve(s, Arc::clone(&console), keyboard.clone()));
        }
    });
    Ok(())
}

/// One attached terminal.
pub async fn serve(mut s: UnixStream, console: SharedConsole, keyboard: Keyboard) {
    let line = tokio::time::timeout(Duration::from_secs(5), attach::read_line(&mut s)).await;
    let req = match line {
        Ok(Ok(line)) => Request::parse(&line),
        _ => return,
    };
    let attached = req
        .map_err(Refusal::Request)
        .and_then(|r| lock(&console).attach(r));
    let mut a = match attached {
        Ok(a) => a,
        Err(e) => {
            let _ = s
                .write_all(vmd_runtime::control::error_reply(e).as_bytes())
                .await;
            let _ = s.write_all(b"\n").await;
            return;
        }
    };
    let who = peer(&s);
    say(format!(
        "console: terminal attached ({who}), {} attached",
        lock(&console).viewers()
    ));
    let (mut rd, mut wr) = s.into_split();
    let output = async move {
        let live = a.from + a.history.len() as u64;
        wr.write_all(attach::ok_line(a.from, live).as_bytes())
            .await?;
        wr.write_all(&a.history).await?;
        drop(std::mem::take(&mut a.history));
        while let Some(chunk) = a.live.recv().await {
            wr.write_all(&chunk).await?;
            a.queued.fetch_sub(chunk.len(), Ordering::SeqCst);
        }
        // Dropped for falling behind, or the shim is exiting.
        Ok::<_, std::io::Error>("fell behind")
    };
    let input = async move {
        let mut buf = vec![0u8; INPUT_CHUNK];
        loop {
            let n = rd.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>("detached");
            }
            // Waits while the guest's queue is full: this terminal is not
            // read meanwhile (its sender slows down), nobody else waits.
            if keyboard
                .keys
                .send(Bytes::copy_from_slice(&buf[..n]))
                .await
                .is_err()
            {
                return Ok("shim exiting");
            }
        }
    };
    let how = tokio::select! {
        r = output => r,
        r = input => r,
    };
    let how = match how {
        Ok(h) => h.to_owned(),
        Err(e) => format!("connection lost: {e}"),
    };
    say(format!("console: terminal detached ({who}): {how}"));
}

/// The attaching process, from the socket's credentials.
fn peer(s: &UnixStream) -> String {
    match s.peer_cred() {
        Ok(c) => format!(
            "pid {} uid {}",
            c.pid().map_or("?".into(), |p| p.to_string()),
            c.uid()
        ),
        Err(_) => format!("fd {}", s.as_raw_fd()),
    }
}
